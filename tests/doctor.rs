//! `lumos-agent doctor` against a running agent and a real TLS cloud (the fake cloud), and
//! against a broken install: every problem gets a FAIL line that says what to do, and the exit
//! code says something is wrong.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::time::Duration;

use lumos_agent::config::Overrides;
use lumos_agent::{doctor, exit};
use lumos_agent_integration::fake_cloud::*;
use lumos_agent_integration::*;

const WAIT: Duration = Duration::from_secs(60);

fn overrides(dirs: &TestDirs, agent: Option<&TestAgent>) -> Overrides {
    Overrides {
        config_file: Some(dirs.root.path().join("agent.toml")),
        listen: agent.map(|a| a.api_addr.to_string()),
        ..Overrides::default()
    }
}

async fn doctor_says(overrides: &Overrides) -> (u8, String) {
    doctor_with_token(overrides, None).await
}

async fn doctor_with_token(overrides: &Overrides, token_file: Option<&Path>) -> (u8, String) {
    let mut out = Vec::new();
    let code = doctor::run(overrides, token_file, &mut out).await;
    (code, String::from_utf8(out).unwrap())
}

fn line<'a>(report: &'a str, verdict: &str, topic: &str) -> Option<&'a str> {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{verdict:<5} {topic}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_install_passes_every_check_with_the_certificate_and_clock_shown() {
    let (cert, key) = self_signed_cert();
    let cloud = FakeCloud::start_tls(FakeCloudOptions::default(), &cert, &key).await;
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let ca = dirs.root.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let config = cloud_config(
        &dirs,
        &format!("https://localhost:{}", cloud.addr.port()),
        &FakeCloudOptions::default().token,
        &format!("ca_file = {:?}", ca.display().to_string()),
    );
    let agent = TestAgent::start(&dirs, &config).await;
    let mut session = cloud.next_session(WAIT).await;
    session.inventory_where(WAIT, |_| true).await.unwrap();
    agent
        .put_tenant(
            "acme",
            serde_json::json!({"app_id": "tester", "auth": {"oauth": {"access_token": "CANARY-doctor"}}}),
        )
        .await;

    let (code, report) = doctor_says(&overrides(&dirs, Some(&agent))).await;
    assert_eq!(code, exit::OK, "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    for (topic, needle) in [
        ("config", "agent.toml"),
        ("state folder", "writable, private"),
        ("tenant store", "1 tenant(s), encrypted; key"),
        (
            "outbox",
            "no results kept; the call journal lists 0 call(s)",
        ),
        ("plugins folder", "only root and the agent's user"),
        ("agent", "running"),
        ("tunnel", "connected"),
        ("connector", "tester"),
        ("agent token", "readable, private"),
        ("dns", "localhost"),
        ("tcp", "127.0.0.1"),
        ("tls", "certificate for"),
        ("http/2", "the cloud answers"),
        ("clock", "this machine is"),
    ] {
        let found = line(&report, "ok", topic).unwrap_or_else(|| panic!("no ok {topic}: {report}"));
        assert!(found.contains(needle), "{topic}: {found}\n{report}");
    }
    // The certificate's details: the names it is for, and its expiry.
    let tls = line(&report, "ok", "tls").unwrap();
    assert!(
        tls.contains("localhost, 127.0.0.1") && tls.contains("days"),
        "{tls}"
    );
    // The free space is this machine's: low room is the one warning a healthy install may get.
    let disk = line(&report, "ok", "disk space")
        .or_else(|| line(&report, "WARN", "disk space"))
        .unwrap_or_else(|| panic!("no disk space line: {report}"));
    assert!(disk.contains("GiB free of"), "{disk}");
    let warnings = usize::from(disk.starts_with("WARN"));
    assert!(
        report.ends_with(&format!("0 problem(s), {warnings} warning(s)\n")),
        "{report}"
    );
    assert!(!report.contains("CANARY-doctor"), "{report}");
    let tenants = line(&report, "ok", "tenants").unwrap_or_else(|| panic!("{report}"));
    assert!(tenants.contains("1 agent-held"), "{tenants}");

    // A tenant whose credentials its connector does not read (a basic credential where the
    // example reads an OAuth token): a warning naming it, and no secret.
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    session
        .inventory_where(WAIT, |inventory| is_ready(inventory, "lumos_example"))
        .await
        .expect("the example connector in the inventory");
    agent
        .put_tenant(
            "mismatched",
            serde_json::json!({"app_id": "lumos_example", "auth": {"basic": {"password": "CANARY-doctor"}}}),
        )
        .await;
    let (code, report) = doctor_says(&overrides(&dirs, Some(&agent))).await;
    assert_eq!(code, exit::OK, "a warning is no failure: {report}");
    let noted = line(&report, "WARN", "tenant").unwrap_or_else(|| panic!("{report}"));
    assert!(
        noted.contains("mismatched: this auth holds \"basic\" where lumos_example reads \"oauth\""),
        "{noted}"
    );
    assert!(line(&report, "ok", "tenants").is_none(), "{report}");
    assert!(!report.contains("CANARY-doctor"), "{report}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_install_gets_a_fail_line_for_each_problem_and_a_nonzero_exit() {
    // A port nothing listens on: bind, note it, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let dirs = TestDirs::new();
    // A file that is no connector: rejected by the loader.
    std::fs::write(dirs.plugins().join("notes.txt"), "not a connector").unwrap();
    // An allow-list that is not there.
    let lock = dirs.root.path().join("missing.lock");
    let config = cloud_config(
        &dirs,
        &dead_endpoint,
        "a-token",
        &format!("[plugins]\nlock_file = {:?}\n", lock.display().to_string()),
    );
    let agent = TestAgent::start(&dirs, &config).await;
    // The token file is readable by everyone, and the plugins folder group-writable.
    lumos_agent::platform::set_mode(&dirs.root.path().join("cloud-token"), 0o644).unwrap();
    lumos_agent::platform::set_mode(&dirs.plugins(), 0o775).unwrap();

    let (code, report) = doctor_says(&overrides(&dirs, Some(&agent))).await;
    assert_eq!(code, exit::CHECK_FAILED, "{report}");
    let plugins = line(&report, "FAIL", "plugins folder").expect(&report);
    assert!(plugins.contains("chmod go-w"), "{plugins}");
    let allow_list = line(&report, "FAIL", "allow-list").expect(&report);
    assert!(
        allow_list.contains("cannot read the allow-list")
            && allow_list.contains("every plugin is rejected"),
        "{allow_list}"
    );
    let connector = line(&report, "FAIL", "connector").expect(&report);
    assert!(connector.contains("notes.txt"), "{connector}");
    let token = line(&report, "FAIL", "agent token").expect(&report);
    assert!(token.contains("chmod 600"), "{token}");
    assert!(
        !report.contains("a-token"),
        "the token itself is never printed"
    );
    let tcp = line(&report, "FAIL", "tcp").expect(&report);
    assert!(tcp.contains("firewall"), "{tcp}");
    assert!(
        line(&report, "FAIL", "tunnel").is_some() || line(&report, "WARN", "tunnel").is_some(),
        "{report}"
    );
    agent.shutdown().await;

    // A tenant store that the key does not open (restored from another machine's backup).
    agent_put_and_swap_key(&dirs);
    // With the agent stopped: a warning that it is not running, not a crash.
    let (_, report) = doctor_says(&overrides(&dirs, None)).await;
    let agent_line = line(&report, "WARN", "agent").expect(&report);
    assert!(agent_line.contains("not answering"), "{agent_line}");
    // A kept result a start could not read back: shown, named, for the admin to look at.
    let outbox = dirs.state().join("outbox");
    std::fs::write(outbox.join("0123.result.unreadable"), "garbage").unwrap();
    let (_, report) = doctor_says(&overrides(&dirs, None)).await;
    let kept = line(&report, "WARN", "outbox").expect(&report);
    assert!(kept.contains("0123.result.unreadable"), "{kept}");
    let store = line(&report, "FAIL", "tenant store").expect(&report);
    assert!(store.contains("cannot be decrypted"), "{store}");
    // No key at all in the state folder: doctor cannot see a service-supplied one, and says so.
    std::fs::remove_file(dirs.state().join("tenants.key")).unwrap();
    let (_, report) = doctor_says(&overrides(&dirs, None)).await;
    let store = line(&report, "WARN", "tenant store").expect(&report);
    assert!(store.contains("LoadCredential"), "{store}");

    // A broken config: one FAIL naming every problem, and nothing else is attempted.
    std::fs::write(
        dirs.root.path().join("agent.toml"),
        "bogus = 1\n[calls]\ntimeout_secs = \"soon\"\n",
    )
    .unwrap();
    let (code, report) = doctor_says(&overrides(&dirs, None)).await;
    assert_eq!(code, exit::CHECK_FAILED, "{report}");
    let config = line(&report, "FAIL", "config").expect(&report);
    assert!(config.contains("2 error(s)"), "{report}");
    assert!(
        line(&report, "skip", "everything else").is_some(),
        "{report}"
    );
}

/// Stores a tenant sealed under the current key, then replaces the key with another one.
fn agent_put_and_swap_key(dirs: &TestDirs) {
    let state = lumos_agent::state::StatePaths::new(dirs.state());
    let store = lumos_agent::tenants::TenantStore::open(
        state.tenants(),
        lumos_agent::tenants::StoreKey::load_or_create(&state).unwrap(),
        &state.tenants_plaintext(),
    )
    .unwrap();
    store
        .put(
            "t1",
            lumos_agent::tenants::Tenant {
                app_id: "app".into(),
                settings: serde_json::Map::new(),
                auth: None,
                credentials: None,
            },
        )
        .unwrap();
    std::fs::write(state.tenants_key(), "ab".repeat(32)).unwrap();
}

/// An `[api]` table with `settings` and the user olga (password "pw") of `role`.
fn api_with_olga(settings: &str, role: &str) -> String {
    let hash = lumos_agent::auth::hash_password(b"pw").unwrap();
    format!("[api]\n{settings}[api.users.olga]\npassword_hash = \"{hash}\"\nrole = \"{role}\"\n")
}

/// Users who log in from other machines would send their passwords over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_an_api_beyond_loopback_are_warned_of_passwords_in_the_clear() {
    let dirs = TestDirs::new();
    TestAgent::write_config(
        &dirs,
        &dirs.plugins(),
        &api_with_olga("listen = \"0.0.0.0:9\"\n", "viewer"),
    );
    let (_, report) = doctor_says(&overrides(&dirs, None)).await;
    let users = line(&report, "ok", "api users").expect(&report);
    assert!(users.contains("olga (viewer)"), "{users}");
    let warning = line(&report, "WARN", "api users").expect(&report);
    assert!(
        warning.contains("0.0.0.0:9 without TLS") && warning.contains("in the clear"),
        "{warning}"
    );
}

/// With `api.admin_token = false`, doctor says so, and without a saved login it cannot use the
/// local API: it says to log in rather than report a missing file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_an_admin_token_is_told_as_such() {
    let dirs = TestDirs::new();
    let api = api_with_olga("listen = \"127.0.0.1:9\"\nadmin_token = false\n", "admin");
    TestAgent::write_config(&dirs, &dirs.plugins(), &api);
    let (_, report) = doctor_says(&overrides(&dirs, None)).await;
    let users = line(&report, "ok", "api users").expect(&report);
    assert!(
        users.ends_with("olga (admin); no [api.ldap]; no admin token (api.admin_token = false)"),
        "{users}"
    );
    let agent = line(&report, "WARN", "agent").expect(&report);
    assert!(
        agent.contains("this agent takes no admin token (api.admin_token = false): log in first"),
        "{agent}"
    );

    // With a user's token (`--token-file`), the running agent is read as with the admin's.
    let running = TestAgent::start(&dirs, &api).await;
    let token_file = dirs.root.path().join("olga.token");
    std::fs::write(&token_file, running.login("olga", "pw").await).unwrap();
    let (_, report) = doctor_with_token(&overrides(&dirs, Some(&running)), Some(&token_file)).await;
    let agent = line(&report, "ok", "agent").expect(&report);
    assert!(
        agent.starts_with("ok    agent          running "),
        "{agent}"
    );
    running.shutdown().await;
}

/// Output that takes `lines` lines, then fails every write with `kind`, counting the tries.
struct FailingOutput {
    lines: usize,
    kind: std::io::ErrorKind,
    taken: Vec<u8>,
    failed_writes: usize,
}

impl FailingOutput {
    fn new(lines: usize, kind: std::io::ErrorKind) -> Self {
        Self {
            lines,
            kind,
            taken: Vec::new(),
            failed_writes: 0,
        }
    }
}

impl std::io::Write for FailingOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.lines == 0 {
            self.failed_writes += 1;
            return Err(self.kind.into());
        }
        self.taken.extend_from_slice(buf);
        self.lines -= buf.iter().filter(|b| **b == b'\n').count().min(self.lines);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A report that cannot be written ends the checks at the first failed line, as every
/// command's output does: quietly with success when its reader went away (`doctor | head -1`),
/// with the output exit code when it failed otherwise (a full disk). Not a run of every
/// remaining check, each line thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_cannot_be_written_stops_the_checks() {
    let dirs = TestDirs::new();
    TestAgent::write_config(&dirs, &dirs.plugins(), "");
    // Written whole, the report has many lines and a problem (the agent is not running).
    let (code, report) = doctor_says(&overrides(&dirs, None)).await;
    assert!(report.lines().count() > 5, "{report}");
    assert!(line(&report, "WARN", "agent").is_some(), "{report}");
    assert_eq!(code, exit::OK, "{report}");

    for (kind, expected) in [
        (std::io::ErrorKind::BrokenPipe, exit::OK),
        (std::io::ErrorKind::StorageFull, exit::OUTPUT),
    ] {
        let mut out = FailingOutput::new(1, kind);
        let code = doctor::run(&overrides(&dirs, None), None, &mut out).await;
        let taken = String::from_utf8(out.taken).unwrap();
        assert_eq!(code, expected, "{kind:?}: {taken}");
        assert!(taken.starts_with("ok    config"), "{kind:?}: {taken}");
        assert_eq!(taken.lines().count(), 1, "{kind:?}: {taken}");
        assert_eq!(
            out.failed_writes, 1,
            "{kind:?}: tried to write after the failure"
        );
    }
}
