//! The LDAP auth provider (`[api.ldap]`) against a real OpenLDAP `slapd` (Debian's `slapd`
//! package; `.ci/run` installs it): users bind with their own password, their groups give their
//! role, what they type cannot widen a search, an empty password is no anonymous bind, the
//! built-in users come first, and a directory that is down is reported as such.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use lumos_agent_integration::*;
use serde_json::{json, Value};

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const BASE: &str = "dc=example,dc=com";

/// A `slapd` of its own, on a free loopback port, with a few people and groups.
struct Slapd {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn person(uid: &str, password: &str) -> String {
    format!(
        "dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {password}\n\n"
    )
}

fn group(cn: &str, members: &[&str]) -> String {
    let mut entry = format!("dn: cn={cn},ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: {cn}\n");
    for uid in members {
        entry.push_str(&format!("member: uid={uid},ou=people,{BASE}\n"));
    }
    entry + "\n"
}

impl Slapd {
    fn start() -> Self {
        assert!(
            Path::new(SLAPD).exists() && Path::new(SLAPADD).exists(),
            "OpenLDAP's slapd is missing: `.ci/run` installs it (apt-get install slapd)"
        );
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::create_dir(&db).unwrap();
        let conf = dir.path().join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "include /etc/ldap/schema/core.schema\n\
                 include /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\n\
                 modulepath /usr/lib/ldap\nmoduleload back_mdb\n\
                 pidfile {}\n\
                 database mdb\nsuffix \"{BASE}\"\nrootdn \"cn=admin,{BASE}\"\nrootpw admin-pw\n\
                 directory {}\n\
                 access to attrs=userPassword by self auth by anonymous auth by * none\n\
                 access to dn.subtree=\"ou=groups,{BASE}\" by dn.exact=\"cn=lumos-svc,{BASE}\" read by dn.exact=\"uid=vic,ou=people,{BASE}\" read by * none\n\
                 access to * by * read\n",
                dir.path().join("slapd.pid").display(),
                db.display()
            ),
        )
        .unwrap();
        let mut ldif = format!(
            "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
             dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n\
             dn: cn=lumos-svc,{BASE}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: lumos-svc\nuserPassword: svc-pw\n\n"
        );
        for (uid, password) in [
            ("olga", "olga-pw"),
            ("ann", "ann-pw"),
            ("vic", "vic-pw"),
            ("nobody", "nobody-pw"),
            ("local", "directory-pw"),
        ] {
            ldif.push_str(&person(uid, password));
        }
        ldif.push_str(&group("lumos-admins", &["ann"]));
        ldif.push_str(&group("lumos-operators", &["olga", "ann"]));
        ldif.push_str(&group("lumos-viewers", &["vic"]));
        let data = dir.path().join("data.ldif");
        std::fs::write(&data, ldif).unwrap();
        let added = Command::new(SLAPADD)
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            added.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // `-d 0`: in the foreground, so that the test owns (and kills) it.
        let child = Command::new(SLAPD)
            .arg("-d")
            .arg("0")
            .arg("-f")
            .arg(&conf)
            .arg("-h")
            .arg(format!("ldap://127.0.0.1:{port}/"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "slapd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }
}

/// `[api.ldap]` for `url`, finding users by `users` (TOML lines), plus a built-in user `local`
/// (a viewer) whose name the directory also has.
fn config(url: &str, users: &str) -> String {
    let local = lumos_agent::auth::hash_password(b"local-pw").unwrap();
    format!(
        "[api.users.local]\npassword_hash = \"{local}\"\nrole = \"viewer\"\n\
         [api.ldap]\nurl = \"{url}\"\nallow_insecure = true\ntimeout_secs = 5\n{users}\
         group_base = \"ou=groups,{BASE}\"\n\
         admin_groups = [\"cn=lumos-admins,ou=groups,{BASE}\"]\n\
         operator_groups = [\"CN=Lumos-Operators, OU=Groups, DC=example, DC=com\"]\n\
         viewer_groups = [\"cn=lumos-viewers,ou=groups,{BASE}\"]\n"
    )
}

async fn login(agent: &TestAgent, user: &str, password: &str) -> (StatusCode, Value) {
    let (status, body) = agent
        .request_with(
            Method::POST,
            "/v1/auth/token",
            Some(json!({"username": user, "password": password})),
            None,
        )
        .await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}

/// Each login's status and role (or error code).
async fn expect(agent: &TestAgent, cases: &[(&str, &str, StatusCode, &str)]) {
    for (user, password, status, what) in cases {
        let (got, answer) = login(agent, user, password).await;
        assert_eq!(got, *status, "{user}/{password}: {answer}");
        let said = if got == StatusCode::OK {
            &answer["role"]
        } else {
            &answer["error"]["error_code"]
        };
        assert_eq!(said, what, "{user}/{password}: {answer}");
    }
}

async fn doctor_report(dirs: &TestDirs, agent: &TestAgent) -> String {
    let overrides = lumos_agent::config::Overrides {
        config_file: Some(dirs.root.path().join("agent.toml")),
        listen: Some(agent.api_addr.to_string()),
        ..lumos_agent::config::Overrides::default()
    };
    let mut out = Vec::new();
    lumos_agent::doctor::run(&overrides, None, &mut out).await;
    String::from_utf8(out).unwrap()
}

fn directory_line(report: &str) -> String {
    report
        .lines()
        .find(|l| l.contains(" directory "))
        .unwrap_or_else(|| panic!("no directory line in:\n{report}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_users_bind_with_their_password_and_their_groups_give_the_role() {
    let slapd = Slapd::start();
    let dirs = TestDirs::new();
    let template = format!("user_dn = \"uid={{user}},ou=people,{BASE}\"\n");
    let svc_password = dirs.root.path().join("ldap-svc-pw");
    std::fs::write(&svc_password, "svc-pw\n").unwrap();
    let search = format!(
        "user_base = \"ou=people,{BASE}\"\nuser_filter = \"(uid={{user}})\"\n\
         bind_dn = \"cn=lumos-svc,{BASE}\"\nbind_password_file = {:?}\n",
        svc_password.display().to_string()
    );
    let wrong = "agent.unauthenticated";
    let no_role = "agent.forbidden";
    let (ok, refused, forbidden) = (
        StatusCode::OK,
        StatusCode::UNAUTHORIZED,
        StatusCode::FORBIDDEN,
    );

    // Users found by a search as the service account, which also reads their groups (this
    // directory lets only it read them).
    let agent = TestAgent::start(&dirs, &config(&slapd.url(), &search)).await;
    expect(
        &agent,
        &[
            ("olga", "olga-pw", ok, "operator"),
            ("ann", "ann-pw", ok, "admin"),
            ("Vic", "vic-pw", ok, "viewer"),
            ("olga", "wrong", refused, wrong),
            ("nobody", "nobody-pw", forbidden, no_role),
            ("nosuchuser", "x", refused, wrong),
            // An empty password would be an anonymous bind, which the directory accepts.
            ("olga", "", refused, wrong),
            // What a user types cannot widen the search.
            // (Unescaped, `ol*` would find olga alone and log in as her.)
            ("ol*", "olga-pw", refused, wrong),
            ("*", "olga-pw", refused, wrong),
            ("olga)(uid=*", "olga-pw", refused, wrong),
            // A built-in user's name is the built-in provider's, whatever the directory says.
            ("local", "local-pw", ok, "viewer"),
            ("local", "directory-pw", refused, wrong),
        ],
    )
    .await;
    let (_, answer) = login(&agent, "nobody", "nobody-pw").await;
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nobody is in none of the directory groups"),
        "{answer}"
    );

    // `doctor` checks the path: TLS settings, the service account, the two bases.
    let report = doctor_report(&dirs, &agent).await;
    let line = directory_line(&report);
    assert!(
        line.starts_with("ok ")
            && line.contains(&format!(
                "bound as cn=lumos-svc,{BASE}; user_base and group_base readable"
            )),
        "{report}"
    );

    // A directory user's token works like a built-in one's.
    let (_, answer) = login(&agent, "olga", "olga-pw").await;
    let olga = answer["token"].as_str().unwrap().to_string();
    let (status, body) = agent
        .request_with(Method::GET, "/v1/auth/whoami", None, Some(&olga))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["user"],
        "olga"
    );
    let (status, _) = agent
        .request_with(
            Method::PUT,
            "/v1/tenants/t",
            Some(json!({"app_id": "x", "settings": {}})),
            Some(&olga),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The template mode: the DN built from the name, escaped (no `*`, no extra RDN), and the
    // groups read as the user. This directory lets only vic (and the service account) read
    // them: olga's login names the search that failed.
    TestAgent::write_config(&dirs, &dirs.plugins(), &config(&slapd.url(), &template));
    agent
        .control
        .send(lumos_agent::app::Control::Reload)
        .await
        .unwrap();
    // The reload changed the directory's settings: olga's session ends.
    eventually_ok(
        Duration::from_secs(30),
        "the reload to end olga's session",
        || async {
            match agent
                .request_with(Method::GET, "/v1/status", None, Some(&olga))
                .await
            {
                (StatusCode::UNAUTHORIZED, _) => Ok(()),
                (status, _) => Err(status),
            }
        },
    )
    .await;
    expect(
        &agent,
        &[
            ("vic", "vic-pw", ok, "viewer"),
            ("olga", "wrong", refused, wrong),
            ("olga", "", refused, wrong),
            ("*", "olga-pw", refused, wrong),
            ("olga,ou=people", "olga-pw", refused, wrong),
        ],
    )
    .await;

    let (status, answer) = login(&agent, "olga", "olga-pw").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "searching ou=groups,{BASE} for the user's groups as uid=olga,ou=people,{BASE}"
        )) && message.contains("may it read api.ldap.group_base?"),
        "{message}"
    );

    // The directory goes away: a login says so (503), it is not a wrong password.
    drop(slapd);
    let (status, answer) = login(&agent, "olga", "olga-pw").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the LDAP auth provider cannot check passwords now"),
        "{message}"
    );
    // The built-in users still log in.
    expect(&agent, &[("local", "local-pw", ok, "viewer")]).await;
    let report = doctor_report(&dirs, &agent).await;
    let line = directory_line(&report);
    assert!(
        line.starts_with("FAIL") && line.contains("cannot connect to ldap://127.0.0.1"),
        "{report}"
    );
    agent.shutdown().await;
    // No password reached the log.
    let logs = captured_logs();
    for secret in ["olga-pw", "ann-pw", "svc-pw", "local-pw"] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
}
