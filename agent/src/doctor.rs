//! `lumos-agent doctor`: checks what an admin would check by hand, one verdict per line, as
//! each check completes (the network ones can take seconds): the config, the folders and their
//! permissions, the running agent and each connector, and the path to the cloud (token file,
//! DNS, TCP, proxy, TLS with the certificate's details, HTTP/2, clock skew). Exits non-zero
//! when any line is FAIL.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::client::ApiClient;
use crate::config::{self, CloudConfig, Config, Overrides};
use crate::exit;
use crate::state::StatePaths;
use crate::tunnel::transport::{self, CloudConnector, Io};

/// Skew beyond which TLS and OAuth expiry times become unreliable.
const SKEW_WARN: Duration = Duration::from_secs(5);
const SKEW_FAIL: Duration = Duration::from_secs(60);
/// A certificate this close to its end gets a warning.
const CERT_WARN_DAYS: i64 = 14;

/// One line's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but an admin should look.
    Warn,
    /// Broken: the exit code says so.
    Fail,
    /// Not checked, and why (not a problem).
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
            Self::Skip => "skip",
        }
    }
}

/// Prints verdicts as they come and remembers the worst.
struct Report<'a> {
    out: &'a mut dyn Write,
    failures: usize,
    warnings: usize,
    /// The first error writing the report. Nothing more is written after it, and no further
    /// check is started: its verdict would have nowhere to go.
    lost: Option<std::io::Error>,
}

impl Report<'_> {
    fn line(&mut self, verdict: Verdict, topic: &str, text: impl AsRef<str>) {
        match verdict {
            Verdict::Fail => self.failures += 1,
            Verdict::Warn => self.warnings += 1,
            Verdict::Ok | Verdict::Skip => {}
        }
        self.write(format_args!(
            "{:<5} {:<14} {}",
            verdict.label(),
            topic,
            text.as_ref()
        ));
    }

    /// Writes a line at once (an admin watches the slow checks come in), unless an earlier
    /// write failed.
    fn write(&mut self, line: std::fmt::Arguments<'_>) {
        if self.lost.is_some() {
            return;
        }
        let written = self
            .out
            .write_fmt(line)
            .and_then(|()| self.out.write_all(b"\n"))
            .and_then(|()| self.out.flush());
        if let Err(e) = written {
            self.lost = Some(e);
        }
    }

    /// Whether the report can no longer be written, so the checks should stop.
    fn lost(&self) -> bool {
        self.lost.is_some()
    }
}

/// Runs every check, printing to `out`; returns the exit code. When `out` cannot be written,
/// the checks stop there, as every command's output does: quietly with success when its reader
/// went away (`doctor | head -3`), else with [`exit::OUTPUT`] and the reason on stderr.
/// `token_file` (`--token-file`) is the token the running agent is read with, as the client
/// commands send it ([`crate::client::token_file`]).
pub async fn run(overrides: &Overrides, token_file: Option<&Path>, out: &mut dyn Write) -> u8 {
    let mut report = Report {
        out,
        failures: 0,
        warnings: 0,
        lost: None,
    };
    let config = match config::load(overrides) {
        Ok(config) => {
            report.line(Verdict::Ok, "config", config.origin.to_string());
            if let Some(note) = config.relative_paths_note() {
                report.line(Verdict::Warn, "config paths", note);
            }
            config
        }
        Err(e) => {
            report.line(Verdict::Fail, "config", e.to_string());
            report.line(
                Verdict::Skip,
                "everything else",
                "needs a valid configuration",
            );
            return summary(&mut report);
        }
    };
    // Each stage stops the run when its lines could not be written: the network checks can
    // take seconds, for nobody.
    macro_rules! stage {
        ($check:expr) => {
            $check;
            if report.lost() {
                return summary(&mut report);
            }
        };
    }
    stage!(folders(&config, &mut report));
    stage!(free_space(&config.state_dir, &mut report));
    stage!(tenant_store(&config, &mut report));
    stage!(outbox(&config, &mut report));
    stage!(agent(&config, token_file, &mut report).await);
    stage!(api_users(&config, &mut report).await);
    match &config.cloud {
        None => report.line(
            Verdict::Skip,
            "cloud",
            "no [cloud] section: standalone, local API only",
        ),
        Some(cloud) => cloud_path(cloud, &mut report).await,
    }
    summary(&mut report)
}

fn summary(report: &mut Report<'_>) -> u8 {
    let (failures, warnings) = (report.failures, report.warnings);
    report.write(format_args!(
        "\n{failures} problem(s), {warnings} warning(s)"
    ));
    match &report.lost {
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return exit::OK,
        Some(e) => {
            // Best effort: stderr may be gone too, and the exit code says it anyway.
            let _ = writeln!(
                std::io::stderr().lock(),
                "lumos-agent: cannot write the output: {e}"
            );
            return exit::OUTPUT;
        }
        None => {}
    }
    if failures > 0 {
        exit::CHECK_FAILED
    } else {
        exit::OK
    }
}

fn folders(config: &Config, report: &mut Report<'_>) {
    let state = &config.state_dir;
    match std::fs::metadata(state) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.line(
            Verdict::Warn,
            "state folder",
            format!(
                "{} does not exist yet; the agent creates it at start",
                state.display()
            ),
        ),
        Err(e) => report.line(
            Verdict::Fail,
            "state folder",
            format!("{}: {e}", state.display()),
        ),
        Ok(meta) if !meta.is_dir() => report.line(
            Verdict::Fail,
            "state folder",
            format!("{} is not a folder", state.display()),
        ),
        Ok(meta) => {
            let mode = crate::platform::mode_of(&meta).map(|m| m & 0o777);
            match tempfile::tempfile_in(state) {
                Err(e) => report.line(
                    Verdict::Fail,
                    "state folder",
                    format!(
                        "{} is not writable by this user ({e}); run doctor as the service's user, e.g. `sudo -u lumos-agent lumos-agent doctor`",
                        state.display()
                    ),
                ),
                Ok(_) if !crate::platform::PERMISSIONS_CHECKED => report.line(
                    Verdict::Ok,
                    "state folder",
                    format!(
                        "{} (writable; its ACLs are not checked: keep it readable by the service and Administrators only)",
                        state.display()
                    ),
                ),
                Ok(_) if mode.is_some_and(|m| m & 0o077 != 0) => report.line(
                    Verdict::Warn,
                    "state folder",
                    format!(
                        "{} is mode {:o}; the agent tightens it to 700 at start",
                        state.display(),
                        mode.unwrap_or_default()
                    ),
                ),
                Ok(_) => report.line(
                    Verdict::Ok,
                    "state folder",
                    format!("{} (writable, private)", state.display()),
                ),
            }
        }
    }

    // Read at every load: one that cannot be read rejects every plugin.
    if let Some(lock_file) = &config.plugins.lock_file {
        match crate::plugins::integrity::describe_allow_list(lock_file) {
            Ok(described) => report.line(Verdict::Ok, "allow-list", described),
            Err(e) => report.line(Verdict::Fail, "allow-list", e),
        }
    }

    let plugins = &config.plugins_dir;
    if !plugins.is_dir() {
        report.line(
            Verdict::Warn,
            "plugins folder",
            format!(
                "{} does not exist yet; the agent creates it at start",
                plugins.display()
            ),
        );
        return;
    }
    let files = std::fs::read_dir(plugins).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    });
    if !crate::platform::PERMISSIONS_CHECKED {
        // `check_permissions` accepts everything there: saying "only the agent can write it"
        // would be a claim nobody checked.
        report.line(
            Verdict::Skip,
            "plugins folder",
            format!(
                "{} ({files} entries); its ACLs are not checked on Windows: keep it writable by Administrators only",
                plugins.display()
            ),
        );
    } else if config.plugins.strict_permissions {
        match crate::plugins::integrity::check_permissions(plugins) {
            Ok(()) => report.line(
                Verdict::Ok,
                "plugins folder",
                format!(
                    "{} ({files} entries; only root and the agent's user can write it)",
                    plugins.display()
                ),
            ),
            Err(e) => report.line(Verdict::Fail, "plugins folder", e),
        }
    } else {
        report.line(
            Verdict::Warn,
            "plugins folder",
            format!(
                "{} ({files} entries); plugins.strict_permissions = false: anyone who can write it can run code as the agent",
                plugins.display()
            ),
        );
    }
}

/// Below this much free space on the state folder's file system, doctor fails.
const FREE_SPACE_FAIL: u64 = 256 << 20;
/// Below this much (or a twentieth of the file system), doctor warns.
const FREE_SPACE_WARN: u64 = 1 << 30;

/// Free space where the agent writes: results spill to the outbox, bundles unpack and
/// connector logs grow in the state folder, and a full disk fails them all.
fn free_space(state: &std::path::Path, report: &mut Report<'_>) {
    // The state folder, or the nearest folder above it that exists (it is made at start).
    let Some(existing) = state.ancestors().find(|dir| dir.is_dir()) else {
        return;
    };
    // What the agent's user may still write (quotas and root's reserve excluded), of the
    // file system's (on Windows, the volume's) size.
    match fs4::statvfs(existing) {
        Ok(fs) => {
            let (verdict, text) = free_space_verdict(fs.available_space(), fs.total_space());
            report.line(verdict, "disk space", text);
        }
        Err(e) => report.line(
            Verdict::Warn,
            "disk space",
            format!("cannot read the free space of {}: {e}", existing.display()),
        ),
    }
}

/// What `free` bytes of `total` on the state folder's file system come to.
fn free_space_verdict(free: u64, total: u64) -> (Verdict, String) {
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    let text = format!(
        "{:.1} GiB free of {:.1} GiB on the state folder's file system",
        gib(free),
        gib(total)
    );
    if free < FREE_SPACE_FAIL {
        (
            Verdict::Fail,
            format!("{text}: results spilled to the outbox, unpacked bundles and connector logs need room; free some"),
        )
    } else if free < FREE_SPACE_WARN || free.saturating_mul(20) < total {
        (
            Verdict::Warn,
            format!("{text}: little room left for spilled results, bundles and connector logs"),
        )
    } else {
        (Verdict::Ok, text)
    }
}

/// The encrypted tenant store: its key is found and opens it (nothing is written).
fn tenant_store(config: &Config, report: &mut Report<'_>) {
    let state = StatePaths::new(config.state_dir.clone());
    if state.tenants_plaintext().exists() {
        report.line(
            Verdict::Warn,
            "tenant store",
            format!(
                "{} is an earlier version's plaintext store: the agent encrypts it at its next start",
                state.tenants_plaintext().display()
            ),
        );
    }
    if !state.tenants().exists() {
        report.line(
            Verdict::Skip,
            "tenant store",
            "none yet (agent-held tenants are stored when first put)",
        );
        return;
    }
    let key = match crate::tenants::StoreKey::find(&state) {
        Ok(Some(key)) => key,
        // No key here may still be fine: a unit that gives it with `LoadCredential=` puts it
        // where only the service sees it. doctor cannot tell, so it says both.
        Ok(None) if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() => {
            report.line(
                Verdict::Warn,
                "tenant store",
                format!(
                    "no key at {} and none from a service manager in this shell: fine if the unit gives it (LoadCredential=tenants-key:…), otherwise the agent will not start",
                    state.tenants_key().display()
                ),
            );
            return;
        }
        Ok(None) => {
            report.line(
                Verdict::Fail,
                "tenant store",
                crate::tenants::TenantStoreError::KeyMissing {
                    store: state.tenants(),
                    key: state.tenants_key(),
                }
                .to_string(),
            );
            return;
        }
        Err(e) => {
            report.line(Verdict::Fail, "tenant store", e.to_string());
            return;
        }
    };
    match crate::tenants::inspect(&state.tenants(), &key) {
        Ok(count) => report.line(
            Verdict::Ok,
            "tenant store",
            format!(
                "{count} tenant(s), encrypted; key {}",
                key.origin().display()
            ),
        ),
        Err(e) => report.line(Verdict::Fail, "tenant store", e.to_string()),
    }
}

/// What the outbox folder holds: results a stop kept for the cloud, files a start could not
/// read back, and the calls in the call journal.
fn outbox(config: &Config, report: &mut Report<'_>) {
    let dir = StatePaths::new(config.state_dir.clone()).outbox();
    let contents = match crate::tunnel::outbox::contents(&dir) {
        Ok(contents) => contents,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.line(
                Verdict::Skip,
                "outbox",
                "none yet (made at the first start)",
            );
            return;
        }
        Err(e) => {
            report.line(Verdict::Fail, "outbox", format!("{}: {e}", dir.display()));
            return;
        }
    };
    if !contents.unreadable.is_empty() {
        report.line(
            Verdict::Warn,
            "outbox",
            format!(
                "{} file(s) in {} could not be read at a start and were left for inspection: {}; what they held was not used (a kept result was not sent, a call journal's calls were not answered). Remove them once looked at",
                contents.unreadable.len(),
                dir.display(),
                contents.unreadable.join(", ")
            ),
        );
    }
    let journal = match crate::tunnel::journal::open_calls(&dir) {
        Ok(Some(open)) => format!(
            "the call journal lists {open} call(s) running or awaiting the cloud's acknowledgement"
        ),
        Ok(None) => "no call journal yet".to_string(),
        Err(e) => {
            report.line(
                Verdict::Fail,
                "outbox",
                format!("the call journal cannot be read: {e}"),
            );
            return;
        }
    };
    let kept = match contents.results {
        0 => "no results kept".to_string(),
        n => format!(
            "{n} result(s) ({} bytes) kept by the last stop, sent to the cloud after the next start",
            contents.bytes
        ),
    };
    report.line(Verdict::Ok, "outbox", format!("{kept}; {journal}"));
}

/// The running agent, through its local API: its status and each connector's.
async fn agent(config: &Config, token_file: Option<&Path>, report: &mut Report<'_>) {
    let client = match crate::client::token_file(token_file, config)
        .and_then(|token| ApiClient::new(config.api.listen, &token))
    {
        Ok(client) => client,
        Err(e) => {
            report.line(
                Verdict::Warn,
                "agent",
                format!("cannot use the local API: {e}"),
            );
            report.line(Verdict::Skip, "connectors", "needs the running agent");
            return;
        }
    };
    let status = match get_json(&client, "/v1/status").await {
        Ok(status) => status,
        Err(e) => {
            report.line(
                Verdict::Warn,
                "agent",
                format!(
                    "not answering on {} ({e}); start it (`systemctl start lumos-agent`)",
                    config.api.listen
                ),
            );
            report.line(Verdict::Skip, "connectors", "needs the running agent");
            return;
        }
    };
    let version = status["version"].as_str().unwrap_or("?");
    let draining = if status["draining"].as_bool() == Some(true) {
        ", draining"
    } else {
        ""
    };
    report.line(
        Verdict::Ok,
        "agent",
        format!("running {version} on {}{draining}", config.api.listen),
    );
    match status["cloud"].as_str().unwrap_or("?") {
        "connected" => report.line(Verdict::Ok, "tunnel", "connected to the Lumos cloud"),
        "standalone" => report.line(Verdict::Skip, "tunnel", "standalone"),
        "connecting" => report.line(
            Verdict::Warn,
            "tunnel",
            "connecting (just started, or reconnecting after a lost stream)",
        ),
        "unauthorized" => report.line(
            Verdict::Fail,
            "tunnel",
            "the cloud refuses the agent token, or the token file is unusable: see the agent's log",
        ),
        other => report.line(
            Verdict::Fail,
            "tunnel",
            format!(
                "{other}: the agent cannot reach the cloud; the checks below say where it breaks"
            ),
        ),
    }
    if let Some(starting) = status["starting"].as_object() {
        let loading: Vec<String> = starting
            .get("loading")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        let loaded = starting
            .get("connectors_loaded")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        report.line(
            Verdict::Warn,
            "connectors",
            format!(
                "{}: check again once it is ready",
                crate::plugins::reload::progress_line(
                    "still starting",
                    usize::try_from(loaded).unwrap_or(usize::MAX),
                    &loading
                )
            ),
        );
        return;
    }
    let connectors = match get_json(&client, "/v1/connectors").await {
        Ok(Value::Array(rows)) => rows,
        Ok(_) | Err(_) => {
            report.line(Verdict::Fail, "connectors", "cannot list them");
            return;
        }
    };
    let loading = status["loading"].as_array().cloned().unwrap_or_default();
    if connectors.is_empty() && loading.is_empty() {
        report.line(
            Verdict::Warn,
            "connectors",
            format!(
                "none: drop connector files into {}",
                config.plugins_dir.display()
            ),
        );
    }
    for row in connectors {
        let file = row["path"]
            .as_str()
            .and_then(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = row["app_id"].as_str().unwrap_or(&file);
        let version = row["version"].as_str().unwrap_or("-");
        let kind = row["kind"].as_str().unwrap_or("-");
        match row["status"].as_str() {
            Some("ready") if row["capabilities"].as_array().is_some_and(Vec::is_empty) => {
                report.line(
                    Verdict::Warn,
                    "connector",
                    format!(
                        "{name} {version} ({kind}, {file}): ready, but its `info` lists no capabilities: nothing can be called"
                    ),
                );
            }
            Some("ready") => report.line(
                Verdict::Ok,
                "connector",
                format!("{name} {version} ({kind}, {file}): ready"),
            ),
            Some("superseded") => report.line(
                Verdict::Skip,
                "connector",
                format!(
                    "{name} {version} ({file}): superseded: {}",
                    row["reason"]
                        .as_str()
                        .unwrap_or("another file serves this app_id")
                ),
            ),
            _ => report.line(
                Verdict::Fail,
                "connector",
                format!(
                    "{file}: rejected: {}",
                    row["reason"].as_str().unwrap_or("no reason given")
                ),
            ),
        }
    }
    // Files dropped in whose loads have not ended: not checked yet.
    for load in loading {
        report.line(
            Verdict::Skip,
            "connector",
            format!(
                "{}: still loading ({}, {}s): check again once it is done",
                load["file"].as_str().unwrap_or("?"),
                load["doing"].as_str().unwrap_or("?"),
                load["seconds"].as_u64().unwrap_or(0)
            ),
        );
    }
    // The agent-held tenants against the connectors loaded now: a connector upgraded since a
    // tenant was stored may read other credentials.
    let Ok(Value::Array(tenants)) = get_json(&client, "/v1/tenants").await else {
        report.line(Verdict::Warn, "tenants", "cannot list them");
        return;
    };
    let mut noted = false;
    for tenant in &tenants {
        let id = tenant["tenant_id"].as_str().unwrap_or("?");
        for note in crate::client::tenant_notes(tenant) {
            noted = true;
            report.line(Verdict::Warn, "tenant", format!("{id}: {note}"));
        }
    }
    if !tenants.is_empty() && !noted {
        report.line(
            Verdict::Ok,
            "tenants",
            format!(
                "{} agent-held; each has what its connector declares",
                tenants.len()
            ),
        );
    }
}

/// Who may log in to the local API, and whether the directory answers.
async fn api_users(config: &Config, report: &mut Report<'_>) {
    let users = &config.api.users;
    let listed = if users.is_empty() {
        "no [api.users]".to_string()
    } else {
        let names: Vec<String> = users
            .iter()
            .map(|(name, user)| format!("{name} ({})", user.role.as_str()))
            .collect();
        names.join(", ")
    };
    let logins = !users.is_empty() || config.api.ldap.is_some();
    if logins && !config.api.listen.ip().is_loopback() {
        report.line(
            Verdict::Warn,
            "api users",
            format!(
                "the API listens on {} without TLS: logins from other machines send passwords \
                 in the clear (keep api.listen on loopback, or put a TLS proxy in front)",
                config.api.listen
            ),
        );
    }
    let admin = if config.api.admin_token {
        "the admin token always works"
    } else {
        "no admin token (api.admin_token = false)"
    };
    let Some(settings) = &config.api.ldap else {
        report.line(
            Verdict::Ok,
            "api users",
            format!("{listed}; no [api.ldap]; {admin}"),
        );
        return;
    };
    report.line(
        Verdict::Ok,
        "api users",
        format!("{listed}; others from [api.ldap]; {admin}"),
    );
    match crate::auth::ldap::LdapDirectory::new(settings.clone())
        .probe()
        .await
    {
        Ok(found) => report.line(Verdict::Ok, "directory", found),
        Err(e) => report.line(
            Verdict::Fail,
            "directory",
            format!(
                "{e}; directory users cannot log in ({})",
                if config.api.admin_token {
                    "built-in users and the admin token still can"
                } else {
                    "built-in users still can"
                }
            ),
        ),
    }
}

async fn get_json(client: &ApiClient, path: &str) -> Result<Value, String> {
    let (status, body) = client
        .send(Method::GET, path, None)
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{path} answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{path} answered with bad JSON: {e}"))
}

/// The token file, then the network path step by step, each under the connect timeout.
async fn cloud_path(cloud: &CloudConfig, report: &mut Report<'_>) {
    match crate::tunnel::read_token(&cloud.token_file) {
        Ok(_) => report.line(
            Verdict::Ok,
            "agent token",
            format!(
                "{} (readable{})",
                cloud.token_file.display(),
                // `read_token` refuses a file others may read where a file has a mode.
                if crate::platform::PERMISSIONS_CHECKED {
                    ", private"
                } else {
                    "; its ACLs are not checked"
                }
            ),
        ),
        Err(e) => report.line(Verdict::Fail, "agent token", e.to_string()),
    }
    let connector = match CloudConnector::new(cloud) {
        Ok(connector) => connector,
        Err(e) => {
            report.line(Verdict::Fail, "trust store", e.to_string());
            return;
        }
    };
    let timeout = cloud.connect_timeout;
    let (host, port) = (connector.host().to_string(), connector.port());
    let proxy = connector.proxy().cloned();

    // DNS: the proxy's name when there is one (the proxy resolves the cloud's).
    let (dns_host, dns_port) = match &proxy {
        Some(p) => split_authority(&p.authority),
        None => (host.clone(), port),
    };
    let resolved = within(
        timeout,
        tokio::net::lookup_host((dns_host.as_str(), dns_port)),
    )
    .await;
    let addrs: Vec<SocketAddr> = match resolved {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            report.line(Verdict::Fail, "dns", format!("{dns_host}: {e}"));
            return;
        }
    };
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    let what = if proxy.is_some() { "proxy " } else { "" };
    report.line(
        Verdict::Ok,
        "dns",
        format!("{what}{dns_host} → {}", shown.join(", ")),
    );

    // TCP to the first address that answers.
    let started = Instant::now();
    let mut tcp = None;
    let mut last_error = String::from("no address");
    for addr in &addrs {
        match within(timeout, TcpStream::connect(addr)).await {
            Ok(stream) => {
                tcp = Some((stream, *addr));
                break;
            }
            Err(e) => last_error = format!("{addr}: {e}"),
        }
    }
    let Some((tcp, addr)) = tcp else {
        report.line(
            Verdict::Fail,
            "tcp",
            format!("{last_error} (check the endpoint; a firewall must allow outbound connections to {dns_host}:{dns_port})"),
        );
        return;
    };
    report.line(
        Verdict::Ok,
        "tcp",
        format!("{what}{addr} in {} ms", started.elapsed().as_millis()),
    );
    drop(tcp);

    let stream: Box<dyn Io> = match &proxy {
        None => match TcpStream::connect(addr).await {
            Ok(stream) => Box::new(stream),
            Err(e) => {
                report.line(Verdict::Fail, "tcp", format!("{addr}: {e}"));
                return;
            }
        },
        Some(p) => match within(timeout, transport::connect_via_proxy(p, &host, port)).await {
            Ok(stream) => {
                report.line(
                    Verdict::Ok,
                    "proxy",
                    format!("{p} tunnels to {host}:{port}"),
                );
                Box::new(stream)
            }
            Err(e) => {
                report.line(Verdict::Fail, "proxy", format!("{p}: CONNECT: {e}"));
                return;
            }
        },
    };

    let stream: Box<dyn Io> = match connector.tls() {
        None => {
            report.line(
                Verdict::Warn,
                "tls",
                "none: cloud.allow_insecure with an http:// endpoint (for development only)",
            );
            stream
        }
        Some(tls) => {
            let Ok(name) = ServerName::try_from(host.clone()) else {
                report.line(
                    Verdict::Fail,
                    "tls",
                    format!("{host:?} is not a valid TLS server name"),
                );
                return;
            };
            let stream = match within(timeout, tls.connect(name, stream)).await {
                Ok(stream) => stream,
                Err(e) => {
                    let hint = if e.contains("certificate") {
                        " (if the cloud's certificate comes from a private CA or a TLS-inspecting proxy, put that CA in cloud.ca_file)"
                    } else {
                        ""
                    };
                    report.line(Verdict::Fail, "tls", format!("{e}{hint}"));
                    return;
                }
            };
            let (_, session) = stream.get_ref();
            let version = session
                .protocol_version()
                .map_or("?".to_string(), |v| format!("{v:?}"));
            let alpn = session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let leaf = session.peer_certificates().and_then(|c| c.first());
            let (cert_verdict, cert_text) = match leaf {
                Some(der) => describe_certificate(der.as_ref()),
                None => (Verdict::Fail, "no certificate".to_string()),
            };
            report.line(
                cert_verdict,
                "tls",
                format!(
                    "{version}, verified; {cert_text}",
                    version = version.replace('_', ".")
                ),
            );
            if alpn.as_deref() != Some("h2") {
                report.line(
                    Verdict::Fail,
                    "http/2",
                    format!(
                        "the server did not agree to HTTP/2 (ALPN {}): something between the agent and the cloud (a TLS-inspecting proxy?) speaks only HTTP/1",
                        alpn.as_deref().unwrap_or("none")
                    ),
                );
                return;
            }
            Box::new(stream)
        }
    };
    clock(stream, &host, connector.tls().is_some(), timeout, report).await;
}

/// HTTP/2 to the cloud, and its `Date` against this machine's clock.
async fn clock(
    stream: Box<dyn Io>,
    host: &str,
    https: bool,
    timeout: Duration,
    report: &mut Report<'_>,
) {
    let asked = SystemTime::now();
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/2 set-up failed: {e}"))?;
        tokio::spawn(connection);
        let scheme = if https { "https" } else { "http" };
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{scheme}://{host}/"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("no HTTP/2 answer: {e}"))
    };
    let response = match within(timeout, exchange).await {
        Ok(response) => response,
        Err(e) => {
            report.line(Verdict::Fail, "http/2", e);
            return;
        }
    };
    report.line(
        Verdict::Ok,
        "http/2",
        format!("the cloud answers ({})", response.status()),
    );
    let date = response
        .headers()
        .get(hyper::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok());
    let Some(date) = date else {
        report.line(
            Verdict::Warn,
            "clock",
            "the cloud sent no Date header: skew unknown",
        );
        return;
    };
    // The Date has a one-second resolution; take the local time half-way through the exchange.
    let local = asked + asked.elapsed().unwrap_or_default() / 2;
    let (skew, direction) = match local.duration_since(date) {
        Ok(ahead) => (ahead, "ahead of"),
        Err(behind) => (behind.duration(), "behind"),
    };
    let text = format!(
        "this machine is {:.1} s {direction} the cloud",
        skew.as_secs_f64()
    );
    let verdict = if skew <= SKEW_WARN {
        Verdict::Ok
    } else if skew <= SKEW_FAIL {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    let advice = if verdict == Verdict::Ok {
        ""
    } else {
        " (certificates and OAuth token expiry depend on it: enable NTP, e.g. `timedatectl set-ntp true`)"
    };
    report.line(verdict, "clock", format!("{text}{advice}"));
}

/// `work` under the connect timeout; its error, or the timeout, as text.
async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Subject, issuer, names and validity of the cloud's certificate.
fn describe_certificate(der: &[u8]) -> (Verdict, String) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (
            Verdict::Warn,
            "the certificate could not be parsed for display".into(),
        );
    };
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => (*d).to_string(),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => {
                        match <[u8; 4]>::try_from(*ip) {
                            Ok(v4) => std::net::Ipv4Addr::from(v4).to_string(),
                            Err(_) => <[u8; 16]>::try_from(*ip).map_or_else(
                                |_| hex::encode(ip),
                                |v6| std::net::Ipv6Addr::from(v6).to_string(),
                            ),
                        }
                    }
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let not_after = cert.validity().not_after;
    let days_left = (not_after.timestamp()
        - SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
        / 86_400;
    let verdict = if days_left < CERT_WARN_DAYS {
        Verdict::Warn
    } else {
        Verdict::Ok
    };
    (
        verdict,
        format!(
            "certificate for {} ({}), issued by {}, expires {} ({days_left} days)",
            cert.subject(),
            if names.is_empty() {
                "no alternative names".to_string()
            } else {
                names.join(", ")
            },
            cert.issuer(),
            not_after
        ),
    )
}

/// `host:port` (or `[v6]:port`) into its parts; port 80 when absent.
fn split_authority(authority: &str) -> (String, u16) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => (
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port.parse().unwrap_or(80),
        ),
        _ => (authority.to_string(), 80),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("proxy.corp:3128"),
            ("proxy.corp".into(), 3128)
        );
        assert_eq!(split_authority("[::1]:8080"), ("::1".into(), 8080));
        assert_eq!(split_authority("proxy"), ("proxy".into(), 80));
    }

    #[test]
    fn free_space_fails_when_nearly_out_and_warns_when_low() {
        let gib = 1u64 << 30;
        let (verdict, text) = free_space_verdict(100 << 20, 100 * gib);
        assert_eq!(verdict, Verdict::Fail, "{text}");
        assert!(text.starts_with("0.1 GiB free of 100.0 GiB"), "{text}");
        // Under 1 GiB, or under a twentieth of the file system.
        assert_eq!(free_space_verdict(512 << 20, 4 * gib).0, Verdict::Warn);
        assert_eq!(free_space_verdict(40 * gib, 1000 * gib).0, Verdict::Warn);
        assert_eq!(free_space_verdict(60 * gib, 1000 * gib).0, Verdict::Ok);
        assert_eq!(free_space_verdict(2 * gib, 8 * gib).0, Verdict::Ok);
    }
}
