//! Configuration: a TOML file, `LUMOS_AGENT_*` environment overrides and command-line flags,
//! validated in one pass that reports every error with its key and where it came from.
//!
//! Layers, later wins: built-in defaults → the embedded development default (`--dev` only) → the
//! config file → `LUMOS_AGENT_<KEY>` environment variables (nested keys with `__`, e.g.
//! `LUMOS_AGENT_CALLS__TIMEOUT_SECS`) → command-line flags.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::{Map, Value, ValueKind};

/// The configuration used by `lumos-agent --dev`: everything under `./.lumos-agent-dev`.
pub const DEV_CONFIG_TOML: &str = include_str!("dev.toml");

/// Environment variables with the `LUMOS_AGENT_` prefix that belong to the command line, not to
/// the config file (`--config`'s); any other one is a config key, and a wrong one is reported.
const CLI_ONLY_ENV: &[&str] = &["LUMOS_AGENT_CONFIG"];

/// Where a configuration came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// No file: built-in defaults (plus environment and flags).
    Defaults,
    /// The development default compiled into the binary.
    EmbeddedDev,
    /// A TOML file.
    File(PathBuf),
}

impl fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Defaults => f.write_str("built-in defaults"),
            Self::EmbeddedDev => f.write_str("the embedded --dev default"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from.
    pub origin: ConfigOrigin,
    /// The folder watched for connectors.
    pub plugins_dir: PathBuf,
    /// Private state: tokens, tenants, unpacked bundles, call scratch files.
    pub state_dir: PathBuf,
    /// The local API.
    pub api: ApiConfig,
    /// Capability call limits.
    pub calls: CallsConfig,
    /// Plugin loading limits.
    pub plugins: PluginsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Per-connector overrides, by app_id.
    pub connectors: BTreeMap<String, ConnectorOverride>,
    /// The tunnel to the Lumos cloud; `None` is standalone mode (local API only).
    pub cloud: Option<CloudConfig>,
    /// `[oauth]`: how the token broker reaches authorization servers.
    pub oauth: OAuthConfig,
    /// Paths a config file or the environment gave relative (`plugins_dir = "plugins"`), as
    /// written there: they were taken from the working folder, which for a service is not
    /// the folder an admin runs `check-config` in. See [`Config::relative_paths_note`].
    pub relative_paths: Vec<String>,
}

impl Config {
    /// What to tell of [`Config::relative_paths`], `None` when there are none: the folder
    /// they were taken from, and that a service manager starts the agent in another one.
    pub fn relative_paths_note(&self) -> Option<String> {
        if self.relative_paths.is_empty() {
            return None;
        }
        let cwd = std::env::current_dir()
            .map_or_else(|_| "?".to_string(), |cwd| cwd.display().to_string());
        let one = self.relative_paths.len() == 1;
        Some(format!(
            "{} {} relative, taken from the working folder ({cwd}); a service manager starts \
             the agent in a folder of its own (systemd: /, a Windows service: System32), where \
             {} something else: write absolute paths",
            self.relative_paths.join(", "),
            if one { "is" } else { "are" },
            if one { "it names" } else { "they name" },
        ))
    }
}

/// How an agent prefers to be used within its cluster (`Hello.operation_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationMode {
    /// Any call.
    Default,
    /// Prefer reads.
    ReadPreferred,
    /// Prefer writes.
    WritePreferred,
}

/// `api.max_connections` when not set: far more than the CLI, a scraper and a few scripts
/// use, far fewer than the file descriptors a service is given.
pub const DEFAULT_API_CONNECTIONS: usize = 256;

/// `cloud.outbox_memory_bytes` when not set: unacknowledged results kept in memory before
/// they spill to the state folder.
pub const DEFAULT_OUTBOX_MEMORY_BYTES: u64 = 64 << 20;

/// The tunnel to the Lumos cloud (`[cloud]`).
#[derive(Debug, Clone, PartialEq)]
pub struct CloudConfig {
    /// The cloud's gRPC endpoint, `https://host[:port]` (`http://` only with `allow_insecure`).
    pub endpoint: hyper::Uri,
    /// A file (mode 0600) holding the agent's bearer token.
    pub token_file: PathBuf,
    /// Permit a plain `http://` endpoint (tests, local fake clouds).
    pub allow_insecure: bool,
    /// Extra CA certificates (PEM) trusted for the cloud, besides the web PKI and system roots.
    pub ca_file: Option<PathBuf>,
    /// HTTP CONNECT proxy (`cloud.proxy`, else `HTTPS_PROXY` from the environment, or
    /// `HTTP_PROXY` for an `http://` endpoint).
    pub proxy: Option<ProxyUrl>,
    /// Hosts reached without the proxy (`cloud.no_proxy`, else `NO_PROXY`): names, IPs and IP
    /// networks, read by [`crate::tunnel::transport::bypasses_proxy`].
    pub no_proxy: Vec<String>,
    /// The cluster this agent serves.
    pub cluster_id: String,
    /// How it prefers to be used in its cluster.
    pub operation_mode: OperationMode,
    /// Calls run at once for the cloud; more are answered `agent.busy`.
    pub max_concurrent_calls: usize,
    /// TCP + TLS + proxy set-up deadline, and the deadline for the cloud's Welcome.
    pub connect_timeout: Duration,
    /// First reconnect delay (before jitter).
    pub backoff_initial: Duration,
    /// Longest reconnect delay; also the delay after an authentication failure.
    pub backoff_max: Duration,
    /// Unacknowledged results kept in memory; beyond this they are spooled to the state folder.
    pub outbox_memory_bytes: u64,
    /// Largest call payload accepted from the cloud (all chunks together).
    pub max_request_bytes: u64,
}

/// A proxy URL; its password is never shown (`Debug`, `Display`, logs).
#[derive(Clone, PartialEq)]
pub struct ProxyUrl {
    /// `host:port` of the proxy.
    pub authority: String,
    /// `user:password`, when the URL carries credentials (percent-decoded).
    pub credentials: Option<zeroize::Zeroizing<String>>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.credentials {
            Some(_) => write!(f, "http://[credentials]@{}", self.authority),
            None => write!(f, "http://{}", self.authority),
        }
    }
}

/// Parses `[http://][user[:password]@]host[:port]`: port 80 when none is given, and a value
/// without a scheme taken as `http://`, as curl and Go take one (`HTTPS_PROXY=proxy:3128` is
/// common). No part of the text goes into an error: it may hold a password.
fn parse_proxy(text: &str) -> Result<ProxyUrl, String> {
    const SHAPE: &str = "expected http://[user:password@]host[:port]";
    let text = text.trim();
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some(_) => return Err(format!(
            "{SHAPE}: a proxy URL must start with http:// (the CONNECT request is plain HTTP; the tunnel inside it is TLS)"
        )),
        None => text,
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, authority) = match rest.rsplit_once('@') {
        Some((userinfo, authority)) => {
            let decode = |part: &str| {
                percent_decode(part).ok_or_else(|| {
                    "the proxy credentials are not valid percent-encoding".to_string()
                })
            };
            let joined = match userinfo.split_once(':') {
                Some((user, password)) => format!("{}:{}", decode(user)?, decode(password)?),
                None => format!("{}:", decode(userinfo)?),
            };
            (Some(zeroize::Zeroizing::new(joined)), authority)
        }
        None => (None, rest),
    };
    let parsed = authority
        .parse::<hyper::http::uri::Authority>()
        .ok()
        .filter(|parsed| !parsed.host().is_empty() && parsed.as_str() == authority)
        .ok_or_else(|| format!("{SHAPE}: the host and port are not valid"))?;
    // What follows the host is `:port`, if anything (the http crate takes a port over 65535
    // for none).
    let port = match authority[parsed.host().len()..].strip_prefix(':') {
        None => 80,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{SHAPE}: the port is not 1 – 65535"))?,
    };
    Ok(ProxyUrl {
        authority: format!("{}:{port}", parsed.host()),
        credentials,
    })
}

fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// How the token broker reaches authorization servers (token endpoints).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OAuthConfig {
    /// Extra CAs (PEM) trusted for token endpoints, besides the web PKI and the system store:
    /// an in-house authorization server with a private CA.
    pub ca_file: Option<PathBuf>,
}

/// The local API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// Address to listen on; loopback by default.
    pub listen: SocketAddr,
    /// How long a token issued at a login (`POST /v1/auth/token`) is valid.
    pub token_ttl: Duration,
    /// The built-in auth provider's users (`[api.users.<name>]`), by lower-case name.
    pub users: BTreeMap<String, ApiUser>,
    /// The LDAP auth provider (`[api.ldap]`), for user names not in `users`.
    pub ldap: Option<LdapConfig>,
    /// `api.max_connections`: connections served at once; more wait (one accepted, the rest in
    /// the listen backlog), so that clients that open many (or never finish a request) cannot
    /// use up the agent's file descriptors, which its connectors and the tunnel need too.
    pub max_connections: usize,
    /// `api.admin_token`: whether the agent's own token (`<state_dir>/admin.token`) is
    /// accepted. `false` leaves only the users' logins (each named in the log), and removes
    /// the file; it needs `users` or `ldap`.
    pub admin_token: bool,
}

/// A directory that checks the passwords of users not in `[api.users]`, and gives them the
/// role of the groups they are in.
#[derive(Debug, Clone, PartialEq)]
pub struct LdapConfig {
    /// `ldaps://host:636` or `ldap://host:389`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS.
    pub starttls: bool,
    /// Extra CAs (PEM) trusted for the directory's certificate.
    pub ca_file: Option<PathBuf>,
    /// Permits `ldap://` without StartTLS: passwords cross the network in the clear.
    pub allow_insecure: bool,
    /// How a user's entry is found.
    pub users: LdapUsers,
    /// Where the groups are searched.
    pub group_base: String,
    /// The groups a user is in: `{dn}` is the user's DN.
    pub group_filter: String,
    /// The groups (DNs, normalised by [`crate::auth::ldap::normalize_dn`]) that give each role.
    pub role_groups: Vec<(crate::auth::Role, Vec<String>)>,
    /// Connecting and each operation.
    pub timeout: Duration,
}

/// How the LDAP provider finds a user's DN.
#[derive(Debug, Clone, PartialEq)]
pub enum LdapUsers {
    /// `user_dn`: a template with `{user}`, bound to directly.
    Template(String),
    /// `user_base` and `user_filter` (`{user}`), searched anonymously or as `bind_dn` with the
    /// password in `bind_password_file`.
    Search {
        /// Where to search.
        base: String,
        /// The filter, with `{user}`.
        filter: String,
        /// The service account searching, and its password file.
        bind: Option<(String, PathBuf)>,
    },
}

/// A user of the built-in auth provider.
#[derive(Clone, PartialEq)]
pub struct ApiUser {
    /// An Argon2 hash in PHC form (`$argon2id$v=19$m=…`), as `lumos-agent hash-password`
    /// prints it.
    pub password_hash: String,
    /// What the user may do.
    pub role: crate::auth::Role,
}

impl std::fmt::Debug for ApiUser {
    // The hash is not the password, but an offline guess needs nothing else: not in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiUser")
            .field("password_hash", &"<redacted>")
            .field("role", &self.role)
            .finish()
    }
}

/// Capability call limits.
#[derive(Debug, Clone, PartialEq)]
pub struct CallsConfig {
    /// Deadline of a call when the caller gives none (and the maximum a caller may ask for).
    pub timeout: Duration,
    /// Calls one connector may run at once; more get `agent.busy`.
    pub max_concurrency: usize,
    /// Largest answer a connector may print.
    pub max_output_bytes: u64,
    /// After SIGTERM at a deadline, how long before SIGKILL.
    pub kill_grace: Duration,
    /// On shutdown, how long in-flight calls may take to finish before they are cancelled.
    pub drain_grace: Duration,
    /// How much of a connector's stderr is kept for the log, per call.
    pub stderr_log_bytes: usize,
    /// `LUMOS_LOG_LEVEL` handed to connector-py connectors.
    pub connector_log_level: String,
    /// Extra environment variable names passed through to connectors (e.g. proxies, CA bundles).
    pub pass_env: Vec<String>,
}

/// Plugin loading limits.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginsConfig {
    /// Deadline of a connector's `info` at load time.
    pub info_timeout: Duration,
    /// Largest plugin file (a bundle archive, an executable, a library): it is copied into the
    /// state folder before it is loaded.
    pub max_file_bytes: u64,
    /// Largest total unpacked size of one bundle.
    pub max_bundle_bytes: u64,
    /// Most entries in one bundle.
    pub max_bundle_entries: u64,
    /// The program re-executed as a plugin worker (`<program> plugin-host <library>`); normally
    /// unset, meaning this agent binary.
    pub worker_program: Option<PathBuf>,
    /// Watch the plugins folder for changes (otherwise only the periodic rescan).
    pub watch: bool,
    /// Quiet time after a change before the folder is reconciled; files modified more recently
    /// than this are still being written and wait.
    pub debounce: Duration,
    /// Full reconcile period, whatever the watcher says.
    pub rescan_interval: Duration,
    /// Refuse plugin files that others than root and the agent's user could have written.
    pub strict_permissions: bool,
    /// An allow-list of sha256 digests; files not in it are rejected.
    pub lock_file: Option<PathBuf>,
    /// ed25519 public keys; when set, every plugin needs a valid `<file>.sig`.
    pub signing_keys: Vec<[u8; 32]>,
}

/// Logging.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A tracing filter: `info`, or `info,lumos_agent::plugins=debug`.
    pub level: String,
    /// Human or JSON lines.
    pub format: LogFormat,
    /// Connector log files (`<state_dir>/logs/connectors`) not written to for this many days
    /// are removed; 0 keeps them for ever.
    pub connector_log_days: u32,
}

/// Settings for one connector, overriding `[calls]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectorOverride {
    /// Overrides `calls.max_concurrency`.
    pub max_concurrency: Option<usize>,
    /// Overrides `calls.timeout_secs`.
    pub timeout: Option<Duration>,
    /// Load this native connector into the agent's own process instead of a worker (only for
    /// vetted plugins: a crash in it takes the agent down).
    pub in_process: bool,
}

/// The message for a key the validator does not know: the key it likely meant, when it is a
/// near miss (a typo, another case, `-` for `_`), and every key it knows there.
fn unknown_key(key: &str, known: &[&str]) -> String {
    let folded = key.to_lowercase().replace('-', "_");
    let meant = known
        .iter()
        .map(|k| (strsim::jaro_winkler(&folded, k), k))
        .filter(|(likeness, _)| *likeness >= 0.9)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match meant {
        Some((_, meant)) => format!(
            "unknown key (did you mean `{meant}`?); known keys are {}",
            known.join(", ")
        ),
        None => format!("unknown key; known keys are {}", known.join(", ")),
    }
}

impl Config {
    /// Concurrency limit of one connector.
    pub fn max_concurrency_for(&self, app_id: &str) -> usize {
        self.connectors
            .get(app_id)
            .and_then(|o| o.max_concurrency)
            .unwrap_or(self.calls.max_concurrency)
    }

    /// Whether a native connector is loaded in-process.
    pub fn in_process(&self, app_id: &str) -> bool {
        self.connectors.get(app_id).is_some_and(|o| o.in_process)
    }

    /// Deadline of one connector's calls.
    pub fn timeout_for(&self, app_id: &str) -> Duration {
        self.connectors
            .get(app_id)
            .and_then(|o| o.timeout)
            .unwrap_or(self.calls.timeout)
    }
}

/// The configuration in force, replaced whole by a reload (SIGHUP). Readers take a snapshot
/// (`get`) per operation, so one call or one load sees one consistent configuration.
#[derive(Debug)]
pub struct SharedConfig(std::sync::RwLock<std::sync::Arc<Config>>);

impl SharedConfig {
    /// Shares `config`.
    pub fn new(config: Config) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::RwLock::new(std::sync::Arc::new(config))))
    }

    /// The configuration in force now.
    pub fn get(&self) -> std::sync::Arc<Config> {
        self.0.read().expect("config lock poisoned").clone()
    }

    /// Puts `config` in force; returns the previous one.
    pub fn replace(&self, config: Config) -> std::sync::Arc<Config> {
        std::mem::replace(
            &mut *self.0.write().expect("config lock poisoned"),
            std::sync::Arc::new(config),
        )
    }
}

/// Checks a `log.level` filter. Beyond tracing's own syntax, a directive without `=` must be a
/// level: tracing reads any other word as a module whose every line is logged, and a filter
/// of modules only logs nothing else. So `"warning"` (a Python level name, as
/// `calls.connector_log_level` takes) or `"verbose"` would silence the agent's own warnings
/// and errors without a word.
fn check_log_filter(filter: &str) -> Result<(), String> {
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(filter) {
        return Err(format!("{filter:?} is not a log filter: {e}"));
    }
    for directive in filter.split(',').map(str::trim) {
        let bare = !directive.is_empty() && !directive.contains('=') && !directive.contains('[');
        if bare
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "{directive:?} is not a level (trace, debug, info, warn, error, off); a filter names a level, then modules with theirs, like \"info,lumos_agent::plugins=debug\" (a whole module: \"{directive}=trace\")"
            ));
        }
    }
    Ok(())
}

/// Loads the configuration again (for SIGHUP), from the same file, environment and flags.
pub type ConfigSource = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Command-line values that override the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// An explicit config file; it must exist.
    pub config_file: Option<PathBuf>,
    /// Use the embedded development default instead of the platform's config file.
    pub dev: bool,
    /// `--plugins-dir`.
    pub plugins_dir: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
}

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The dotted key, e.g. `calls.timeout_secs`.
    pub key: String,
    /// Where the value came from: a file path, "the environment", "the command line".
    pub origin: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: `{}`: {}", self.origin, self.key, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("cannot read config {origin}: {message}")]
    Unreadable {
        /// The file.
        origin: String,
        /// The parser's or the OS's words.
        message: String,
    },
    /// One or more values are wrong; every one is listed.
    #[error("{} error(s) in the configuration:\n{}", .0.len(), .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

/// The platform's default config file: `/etc/lumos-agent/agent.toml` on Linux,
/// `%ProgramData%\Lumos\lumos-agent\agent.toml` on Windows (where the service reads it), the
/// user's config folder elsewhere.
pub fn default_config_path() -> Option<PathBuf> {
    if cfg!(target_os = "linux") {
        return Some(PathBuf::from("/etc/lumos-agent/agent.toml"));
    }
    if cfg!(windows) {
        return Some(windows_program_data().join("agent.toml"));
    }
    directories::ProjectDirs::from("com", "Lumos", "lumos-agent")
        .map(|d| d.config_dir().join("agent.toml"))
}

/// The platform's default state folder: `/var/lib/lumos-agent` for root on Linux,
/// `%ProgramData%\Lumos\lumos-agent\state` on Windows, the user's data folder otherwise.
fn default_state_dir() -> PathBuf {
    if cfg!(target_os = "linux") && crate::platform::is_root() {
        return PathBuf::from("/var/lib/lumos-agent");
    }
    if cfg!(windows) {
        return windows_program_data().join("state");
    }
    directories::ProjectDirs::from("com", "Lumos", "lumos-agent")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("lumos-agent-state"))
}

/// The machine-wide application data folder for the service (not a user's profile: the
/// service runs as LocalSystem, whose profile is no place for an admin to look).
fn windows_program_data() -> PathBuf {
    std::env::var_os("ProgramData")
        .map_or_else(|| PathBuf::from(r"C:\ProgramData"), PathBuf::from)
        .join("Lumos")
        .join("lumos-agent")
}

/// Loads and validates the configuration, reading the process environment.
pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(overrides, &env)
}

/// [`load`] with an explicit environment, so tests need not touch the process's.
pub fn load_with_env(
    overrides: &Overrides,
    env: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    let origin = if overrides.dev {
        builder = builder.add_source(config::File::from_str(
            DEV_CONFIG_TOML,
            config::FileFormat::Toml,
        ));
        ConfigOrigin::EmbeddedDev
    } else {
        ConfigOrigin::Defaults
    };
    let file = match (&overrides.config_file, overrides.dev) {
        (Some(path), _) => {
            let problem = match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => None,
                Ok(meta) if meta.is_dir() => {
                    Some("it is a folder: name the file in it (such as agent.toml)".to_string())
                }
                Ok(meta) => crate::platform::not_a_regular_file(&meta)
                    .map(|what| format!("it is {what}, not a file")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("no such file".into()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(message) = problem {
                return Err(ConfigError::Unreadable {
                    origin: path.display().to_string(),
                    message,
                });
            }
            Some(path.clone())
        }
        (None, false) => default_config_path().filter(|p| p.is_file()),
        (None, true) => None,
    };
    let origin = match &file {
        Some(path) => {
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
            ConfigOrigin::File(path.clone())
        }
        None => origin,
    };
    let env_map: Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("LUMOS_AGENT_") && !CLI_ONLY_ENV.contains(&k.as_str()))
        .cloned()
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("LUMOS_AGENT")
            .prefix_separator("_")
            .separator("__")
            .source(Some(env_map)),
    );
    let built = builder.build().map_err(|e| ConfigError::Unreadable {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    // `cache` keeps each value's origin (file path or "the environment") for messages.
    let table: Map<String, Value> = match built.cache.kind {
        ValueKind::Table(table) => table,
        _ => Map::new(),
    };
    let validator = Validator {
        issues: Vec::new(),
        relative: Vec::new(),
        file: file.map(|f| absolute(f).display().to_string()),
        fallback: if overrides.dev {
            "the embedded --dev default"
        } else {
            "built-in defaults"
        },
    };
    validator.validate(table, origin, overrides, env)
}

/// Walks the merged table once, collecting every problem instead of stopping at the first.
struct Validator {
    issues: Vec<ConfigIssue>,
    /// [`Config::relative_paths`].
    relative: Vec<String>,
    /// The config file's full path (the config crate records only what it was given).
    file: Option<String>,
    /// Values with no origin come from here.
    fallback: &'static str,
}

/// How long connector log files are kept by default: two weeks of a connector's own account
/// of its calls, for an admin looking into a complaint, without a busy connector filling the
/// disk over months.
pub const DEFAULT_CONNECTOR_LOG_DAYS: u32 = 14;

const TOP_KEYS: &[&str] = &[
    "plugins_dir",
    "state_dir",
    "api",
    "calls",
    "plugins",
    "log",
    "connectors",
    "cloud",
    "oauth",
];

/// `api.listen`: an address and port; `localhost:PORT` is taken as `127.0.0.1:PORT` (the
/// address the CLI then talks to). Other names are not resolved: the API must bind where the
/// admin expects, so the error says what to write instead.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let alone = |port: u16| {
        format!(
            "{text:?} is a port without an address: write 127.0.0.1:{port} (this machine only) or 0.0.0.0:{port} (every interface)"
        )
    };
    match text.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(port) if host.eq_ignore_ascii_case("localhost") => {
                return Ok(SocketAddr::from(([127, 0, 0, 1], port)))
            }
            Ok(port) if host.is_empty() => return Err(alone(port)),
            Ok(port)
                if !host.contains(':')
                    && !host.chars().all(|c| c.is_ascii_digit() || c == '.') =>
            {
                return Err(format!(
                    "{text:?} names a host; write the address to listen on, like 127.0.0.1:{port} (no name but localhost is looked up)"
                ))
            }
            _ => {}
        },
        None => {
            if let Ok(port) = text.parse::<u16>() {
                return Err(alone(port));
            }
        }
    }
    Err(format!(
        "{text:?} is not an address like 127.0.0.1:7878 or [::1]:7878"
    ))
}

impl Validator {
    fn issue(&mut self, key: &str, origin: Option<&str>, message: impl Into<String>) {
        let origin = match (origin, &self.file) {
            // An origin that names its variable already (`HTTPS_PROXY`) stays as it is.
            (Some(o), _) if o.starts_with("the environment (") => o.to_string(),
            // The variable as the admin set it: the key is what `config` made of its name.
            (Some("the environment"), _) => format!(
                "the environment (LUMOS_AGENT_{})",
                key.to_uppercase().replace('.', "__")
            ),
            (Some(o @ "the command line"), _) => o.to_string(),
            (Some(_), Some(file)) => file.clone(),
            (Some(o), None) => o.to_string(),
            (None, _) => self.fallback.to_string(),
        };
        self.issues.push(ConfigIssue {
            key: key.to_string(),
            origin,
            message: message.into(),
        });
    }

    fn validate(
        mut self,
        mut table: Map<String, Value>,
        origin: ConfigOrigin,
        cli: &Overrides,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        for (key, value) in &table {
            if !TOP_KEYS.contains(&key.as_str()) {
                self.issue(key, origin_of(value), unknown_key(key, TOP_KEYS));
            }
        }
        let mut api = self.section(
            &mut table,
            "api",
            &[
                "listen",
                "token_ttl_secs",
                "max_connections",
                "users",
                "ldap",
                "admin_token",
            ],
        );
        let mut calls = self.section(
            &mut table,
            "calls",
            &[
                "timeout_secs",
                "max_concurrency",
                "max_output_bytes",
                "kill_grace_secs",
                "drain_grace_secs",
                "stderr_log_bytes",
                "connector_log_level",
                "pass_env",
            ],
        );
        let mut plugins = self.section(
            &mut table,
            "plugins",
            &[
                "info_timeout_secs",
                "max_file_bytes",
                "max_bundle_bytes",
                "max_bundle_entries",
                "worker_program",
                "watch",
                "debounce_ms",
                "rescan_interval_secs",
                "strict_permissions",
                "lock_file",
                "signing_keys",
            ],
        );
        let mut log = self.section(
            &mut table,
            "log",
            &["level", "format", "connector_log_days"],
        );

        let origin_of = |table: &Map<String, Value>, flag: &Option<PathBuf>, key: &str| match flag {
            Some(_) => Some("the command line".to_string()),
            None => origin_in(table, key),
        };
        let state_origin = origin_of(&table, &cli.state_dir, "state_dir");
        let plugins_origin = origin_of(&table, &cli.plugins_dir, "plugins_dir");
        let state_dir = cli
            .state_dir
            .clone()
            .or_else(|| self.path(&mut table, "state_dir"))
            .unwrap_or_else(default_state_dir);
        let plugins_dir = cli
            .plugins_dir
            .clone()
            .or_else(|| self.path(&mut table, "plugins_dir"))
            .unwrap_or_else(|| state_dir.join("plugins"));
        self.folder("state_dir", &state_dir, state_origin.as_deref());
        self.folder("plugins_dir", &plugins_dir, plugins_origin.as_deref());
        // The state folder holds secrets and the agent's own files: as the plugins folder they
        // would be taken for plugins (and a dropped plugin would sit among them); inside it,
        // the state folder would be listed as one. (The plugins folder inside the state
        // folder, the default, is fine.)
        let resolved = |dir: &std::path::Path| {
            let dir = absolute(dir.to_path_buf());
            std::fs::canonicalize(&dir).unwrap_or(dir)
        };
        let (state_at, plugins_at) = (resolved(&state_dir), resolved(&plugins_dir));
        if state_at == plugins_at {
            self.issue(
                "plugins_dir",
                plugins_origin.as_deref(),
                format!("{} is also the state folder: the agent's own files would be taken for plugins; give the plugins a folder of their own (by default <state_dir>/plugins)", plugins_dir.display()),
            );
        } else if state_at.starts_with(&plugins_at) {
            self.issue(
                "state_dir",
                state_origin.as_deref(),
                format!("{} is inside the plugins folder {}: it would be listed as a plugin; put it elsewhere (the plugins folder may be inside the state folder, not the other way round)", state_dir.display(), plugins_dir.display()),
            );
        } else if let Some(own) = crate::state::StatePaths::new(state_at)
            .own_folders()
            .into_iter()
            .find(|own| plugins_at.starts_with(own))
        {
            // The agent removes what it did not put there: the admin's plugins would go.
            self.issue(
                "plugins_dir",
                plugins_origin.as_deref(),
                format!("{} is inside {}, a folder of the agent's own that it clears by itself; give the plugins a folder of their own (by default <state_dir>/plugins)", plugins_dir.display(), own.display()),
            );
        }

        let listen_text = match &cli.listen {
            Some(text) => Some((text.clone(), Some("the command line".to_string()))),
            None => self.string(&mut api, "api.listen"),
        };
        let listen = match listen_text {
            None => SocketAddr::from(([127, 0, 0, 1], 7878)),
            Some((text, from)) => match parse_listen(&text) {
                Ok(addr) => addr,
                Err(message) => {
                    self.issue("api.listen", from.as_deref(), message);
                    SocketAddr::from(([127, 0, 0, 1], 7878))
                }
            },
        };

        let token_ttl = Duration::from_secs(
            self.uint(&mut api, "api.token_ttl_secs", 1, 30 * 86_400)
                .unwrap_or(3600),
        );
        let max_connections = self
            .uint(&mut api, "api.max_connections", 1, 65_536)
            .map_or(DEFAULT_API_CONNECTIONS, to_usize);
        let users = self.api_users(&mut api);
        let ldap = self.ldap(&mut api);
        let admin_origin = origin_in(&api, "api.admin_token");
        let admin_token = self.boolean(&mut api, "api.admin_token").unwrap_or(true);
        if !admin_token && users.is_empty() && ldap.is_none() {
            self.issue(
                "api.admin_token",
                admin_origin.as_deref(),
                "false leaves nobody who can use the local API (or the CLI): add [api.users.<name>] or [api.ldap], or keep the admin token",
            );
        }

        let calls = CallsConfig {
            timeout: Duration::from_secs(
                self.uint(&mut calls, "calls.timeout_secs", 1, 86_400)
                    .unwrap_or(300),
            ),
            max_concurrency: self
                .uint(&mut calls, "calls.max_concurrency", 1, 10_000)
                .map_or(8, to_usize),
            max_output_bytes: self
                .uint(&mut calls, "calls.max_output_bytes", 1024, u64::MAX)
                .unwrap_or(256 << 20),
            kill_grace: Duration::from_secs(
                self.uint(&mut calls, "calls.kill_grace_secs", 0, 600)
                    .unwrap_or(5),
            ),
            drain_grace: Duration::from_secs(
                self.uint(&mut calls, "calls.drain_grace_secs", 0, 86_400)
                    .unwrap_or(30),
            ),
            stderr_log_bytes: self
                .uint(&mut calls, "calls.stderr_log_bytes", 0, 1 << 20)
                .map_or(8192, to_usize),
            connector_log_level: self
                .choice(
                    &mut calls,
                    "calls.connector_log_level",
                    &["DEBUG", "INFO", "WARNING", "ERROR"],
                )
                .unwrap_or_else(|| "INFO".into()),
            pass_env: {
                let origin = origin_in(&calls, "calls.pass_env");
                let names = self
                    .string_list(&mut calls, "calls.pass_env")
                    .unwrap_or_default();
                for name in names.iter().filter(|name| !is_env_name(name)) {
                    self.issue(
                        "calls.pass_env",
                        origin.as_deref(),
                        format!("{name:?} is not an environment variable name (no `=`, no blanks, not empty): list names only, the values come from the agent's environment"),
                    );
                }
                names
            },
        };
        let plugins = PluginsConfig {
            info_timeout: Duration::from_secs(
                self.uint(&mut plugins, "plugins.info_timeout_secs", 1, 3600)
                    .unwrap_or(30),
            ),
            max_file_bytes: self
                .uint(&mut plugins, "plugins.max_file_bytes", 1 << 20, u64::MAX)
                .unwrap_or(1 << 30),
            max_bundle_bytes: self
                .uint(&mut plugins, "plugins.max_bundle_bytes", 1 << 20, u64::MAX)
                .unwrap_or(4 << 30),
            max_bundle_entries: self
                .uint(&mut plugins, "plugins.max_bundle_entries", 1, u64::MAX)
                .unwrap_or(200_000),
            worker_program: self
                .path(&mut plugins, "plugins.worker_program")
                .map(absolute),
            watch: self.boolean(&mut plugins, "plugins.watch").unwrap_or(true),
            debounce: Duration::from_millis(
                self.uint(&mut plugins, "plugins.debounce_ms", 10, 60_000)
                    .unwrap_or(200),
            ),
            rescan_interval: Duration::from_secs(
                self.uint(&mut plugins, "plugins.rescan_interval_secs", 1, 86_400)
                    .unwrap_or(60),
            ),
            strict_permissions: self
                .boolean(&mut plugins, "plugins.strict_permissions")
                .unwrap_or(true),
            lock_file: self.path(&mut plugins, "plugins.lock_file").map(absolute),
            signing_keys: self.signing_keys(&mut plugins),
        };
        let log = LogConfig {
            level: match self.string(&mut log, "log.level") {
                None => "info".to_string(),
                Some((level, from)) => {
                    if let Err(why) = check_log_filter(&level) {
                        self.issue("log.level", from.as_deref(), why);
                    }
                    level
                }
            },
            format: match self
                .choice(&mut log, "log.format", &["human", "json"])
                .as_deref()
            {
                Some("json") => LogFormat::Json,
                _ => LogFormat::Human,
            },
            connector_log_days: self
                .uint(&mut log, "log.connector_log_days", 0, 3650)
                .map_or(DEFAULT_CONNECTOR_LOG_DAYS, |days| {
                    u32::try_from(days).unwrap_or(u32::MAX)
                }),
        };
        let connectors = self.connectors(&mut table);
        let cloud = self.cloud(&mut table, env);
        let mut oauth = self.section(&mut table, "oauth", &["ca_file"]);
        let oauth = OAuthConfig {
            ca_file: self.ca_file(&mut oauth, "oauth.ca_file"),
        };

        if self.issues.is_empty() {
            Ok(Config {
                origin,
                plugins_dir: absolute(plugins_dir),
                state_dir: absolute(state_dir),
                api: ApiConfig {
                    listen,
                    token_ttl,
                    users,
                    ldap,
                    max_connections,
                    admin_token,
                },
                calls,
                plugins,
                log,
                connectors,
                cloud,
                oauth,
                relative_paths: self.relative,
            })
        } else {
            Err(ConfigError::Invalid(self.issues))
        }
    }

    /// Takes a sub-table, reporting unknown keys in it.
    /// The table `name` (a dotted key: its last part is looked up in `table`), its unknown keys
    /// reported under `name`.
    /// Where a table came from, for a key missing from it: its values' origin, or, for an
    /// empty one (which only a file can hold), the file's. Else the key would be blamed on the
    /// built-in defaults, which hold no table a key can be missing from.
    fn table_origin(&self, table: &Map<String, Value>) -> Option<String> {
        table
            .values()
            .find_map(origin_of)
            .map(str::to_owned)
            .or_else(|| self.file.clone())
    }

    fn section(
        &mut self,
        table: &mut Map<String, Value>,
        name: &str,
        known: &[&str],
    ) -> Map<String, Value> {
        let Some(value) = table.remove(leaf(name)) else {
            return Map::new();
        };
        let origin = origin_of(&value).map(str::to_owned);
        match value.kind {
            ValueKind::Table(sub) => {
                for (key, v) in &sub {
                    if !known.contains(&key.as_str()) {
                        self.issue(
                            &format!("{name}.{key}"),
                            origin_of(v),
                            unknown_key(key, known),
                        );
                    }
                }
                sub
            }
            other => {
                self.issue(
                    name,
                    origin.as_deref(),
                    format!("expected a table, found {}", describe(&other)),
                );
                Map::new()
            }
        }
    }

    fn string(
        &mut self,
        table: &mut Map<String, Value>,
        key: &str,
    ) -> Option<(String, Option<String>)> {
        let value = table.remove(leaf(key))?;
        let origin = origin_of(&value).map(str::to_owned);
        match value.kind {
            ValueKind::String(s) => Some((s, origin)),
            other => {
                self.issue(
                    key,
                    origin.as_deref(),
                    format!("expected a string, found {}", describe(&other)),
                );
                None
            }
        }
    }

    fn path(&mut self, table: &mut Map<String, Value>, key: &str) -> Option<PathBuf> {
        let (text, origin) = self.string(table, key)?;
        if text.is_empty() {
            self.issue(key, origin.as_deref(), "must not be empty");
            return None;
        }
        // A value without an origin is the embedded --dev default's, relative by design.
        if origin.is_some() && !std::path::Path::new(&text).is_absolute() {
            self.relative.push(format!("{key} = {text:?}"));
        }
        Some(PathBuf::from(text))
    }

    /// A folder the agent creates when it is missing: something else at its path is reported
    /// now, not logged after the start (where an agent with a file for its plugins folder ran
    /// with no connectors at all).
    fn folder(&mut self, key: &str, path: &std::path::Path, origin: Option<&str>) {
        if std::fs::metadata(path).is_ok_and(|meta| !meta.is_dir()) {
            self.issue(
                key,
                origin,
                format!("{} exists and is not a folder", path.display()),
            );
        }
    }

    /// A CA file: a path to PEM certificates, read now so that a bad one is reported with the
    /// rest (and by `check-config`) rather than when the first connection needs it.
    fn ca_file(&mut self, table: &mut Map<String, Value>, key: &str) -> Option<PathBuf> {
        let origin = origin_in(table, key);
        let path = absolute(self.path(table, key)?);
        if let Err(message) = crate::tunnel::transport::read_ca_file(&path) {
            self.issue(
                key,
                origin.as_deref(),
                format!("cannot use {}: {message}", path.display()),
            );
        }
        Some(path)
    }

    fn uint(
        &mut self,
        table: &mut Map<String, Value>,
        key: &str,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        let value = table.remove(leaf(key))?;
        let origin = origin_of(&value).map(str::to_owned);
        let parsed = match &value.kind {
            ValueKind::I64(n) => u64::try_from(*n).ok(),
            ValueKind::U64(n) => Some(*n),
            ValueKind::I128(n) => u64::try_from(*n).ok(),
            ValueKind::U128(n) => u64::try_from(*n).ok(),
            // Environment variables arrive as strings.
            ValueKind::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.issue(
                    key,
                    origin.as_deref(),
                    format!("{n} is out of range {min}..={max}"),
                );
                None
            }
            None => {
                self.issue(
                    key,
                    origin.as_deref(),
                    format!("expected a whole number, found {}", describe(&value.kind)),
                );
                None
            }
        }
    }

    fn boolean(&mut self, table: &mut Map<String, Value>, key: &str) -> Option<bool> {
        let value = table.remove(leaf(key))?;
        let origin = origin_of(&value).map(str::to_owned);
        match &value.kind {
            ValueKind::Boolean(b) => Some(*b),
            // Environment variables arrive as strings.
            ValueKind::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            ValueKind::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            other => {
                self.issue(
                    key,
                    origin.as_deref(),
                    format!("expected true or false, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn signing_keys(&mut self, table: &mut Map<String, Value>) -> Vec<[u8; 32]> {
        let Some(list) = self.string_list(table, "plugins.signing_keys") else {
            return Vec::new();
        };
        let mut keys = Vec::new();
        for text in list {
            let parsed = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            match parsed.filter(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_ok()) {
                Some(key) => keys.push(key),
                None => self.issue(
                    "plugins.signing_keys",
                    None,
                    format!("{text:?} is not an ed25519 public key (64 hex characters)"),
                ),
            }
        }
        keys
    }

    fn choice(
        &mut self,
        table: &mut Map<String, Value>,
        key: &str,
        allowed: &[&str],
    ) -> Option<String> {
        let (text, origin) = self.string(table, key)?;
        match allowed.iter().find(|a| a.eq_ignore_ascii_case(&text)) {
            Some(a) => Some((*a).to_string()),
            None => {
                self.issue(
                    key,
                    origin.as_deref(),
                    format!("{text:?} is not one of {}", allowed.join(", ")),
                );
                None
            }
        }
    }

    fn string_list(&mut self, table: &mut Map<String, Value>, key: &str) -> Option<Vec<String>> {
        let value = table.remove(leaf(key))?;
        let origin = origin_of(&value).map(str::to_owned);
        match value.kind {
            ValueKind::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item.kind {
                        ValueKind::String(s) => out.push(s),
                        other => self.issue(
                            key,
                            origin.as_deref(),
                            format!("expected strings, found {}", describe(&other)),
                        ),
                    }
                }
                Some(out)
            }
            // `LUMOS_AGENT_CALLS__PASS_ENV=HTTPS_PROXY,NO_PROXY`
            ValueKind::String(s) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            other => {
                self.issue(
                    key,
                    origin.as_deref(),
                    format!("expected a list of strings, found {}", describe(&other)),
                );
                None
            }
        }
    }

    fn cloud(
        &mut self,
        table: &mut Map<String, Value>,
        env: &[(String, String)],
    ) -> Option<CloudConfig> {
        let mut cloud = self.section(
            table,
            "cloud",
            &[
                "endpoint",
                "token_file",
                "allow_insecure",
                "ca_file",
                "proxy",
                "no_proxy",
                "cluster_id",
                "operation_mode",
                "max_concurrent_calls",
                "connect_timeout_secs",
                "backoff_initial_ms",
                "backoff_max_secs",
                "outbox_memory_bytes",
                "max_request_bytes",
            ],
        );
        let endpoint = self.string(&mut cloud, "cloud.endpoint");
        let token_file = self.path(&mut cloud, "cloud.token_file").map(absolute);
        let allow_insecure = self
            .boolean(&mut cloud, "cloud.allow_insecure")
            .unwrap_or(false);
        let ca_file = self.ca_file(&mut cloud, "cloud.ca_file");
        let proxy_setting = self.string(&mut cloud, "cloud.proxy");
        let no_proxy_setting = self.string_list(&mut cloud, "cloud.no_proxy");
        let cluster_id = self
            .string(&mut cloud, "cloud.cluster_id")
            .map_or_else(|| "default".to_string(), |(id, _)| id);
        let operation_mode = match self
            .choice(
                &mut cloud,
                "cloud.operation_mode",
                &["default", "read_preferred", "write_preferred"],
            )
            .as_deref()
        {
            Some("read_preferred") => OperationMode::ReadPreferred,
            Some("write_preferred") => OperationMode::WritePreferred,
            _ => OperationMode::Default,
        };
        let max_concurrent_calls = self
            .uint(&mut cloud, "cloud.max_concurrent_calls", 1, 100_000)
            .map_or(64, to_usize);
        let connect_timeout = Duration::from_secs(
            self.uint(&mut cloud, "cloud.connect_timeout_secs", 1, 600)
                .unwrap_or(10),
        );
        let backoff_initial = Duration::from_millis(
            self.uint(&mut cloud, "cloud.backoff_initial_ms", 1, 600_000)
                .unwrap_or(500),
        );
        let backoff_max = Duration::from_secs(
            self.uint(&mut cloud, "cloud.backoff_max_secs", 1, 86_400)
                .unwrap_or(60),
        );
        let outbox_memory_bytes = self
            .uint(&mut cloud, "cloud.outbox_memory_bytes", 0, u64::MAX)
            .unwrap_or(DEFAULT_OUTBOX_MEMORY_BYTES);
        let max_request_bytes = self
            .uint(&mut cloud, "cloud.max_request_bytes", 1024, 1 << 32)
            .unwrap_or(64 << 20);

        let (endpoint_text, endpoint_origin) = endpoint?;
        let endpoint_origin = endpoint_origin.as_deref();
        let endpoint = match endpoint_text.parse::<hyper::Uri>() {
            Ok(uri) if uri.host().is_some() => match uri.scheme_str() {
                Some("https") => Some(uri),
                Some("http") if allow_insecure => Some(uri),
                Some("http") => {
                    self.issue("cloud.endpoint", endpoint_origin, format!("{endpoint_text:?} is plain http: the agent token and every call would travel unencrypted. Use https://, or set cloud.allow_insecure = true for a local test cloud"));
                    None
                }
                _ => {
                    self.issue(
                        "cloud.endpoint",
                        endpoint_origin,
                        format!("{endpoint_text:?} must start with https://"),
                    );
                    None
                }
            },
            _ => {
                self.issue(
                    "cloud.endpoint",
                    endpoint_origin,
                    format!("{endpoint_text:?} is not a URL like https://agents.lumos.example:443"),
                );
                None
            }
        };
        if token_file.is_none() {
            self.issue(
                "cloud.token_file",
                endpoint_origin,
                "required when cloud.endpoint is set: a file (mode 0600) holding the agent token from the Lumos admin console",
            );
        }
        if backoff_initial > backoff_max {
            self.issue(
                "cloud.backoff_initial_ms",
                None,
                "must not be longer than cloud.backoff_max_secs",
            );
        }
        // The first of `names` set to something, with the name it was set under.
        let env_var = |names: &[&'static str]| {
            names.iter().find_map(|name| {
                env.iter()
                    .find(|(k, v)| k == name && !v.trim().is_empty())
                    .map(|(_, v)| (*name, v.clone()))
            })
        };
        // From the environment as curl and Go read it: the variable of the endpoint's scheme
        // (`HTTP_PROXY` for a plain `http://` endpoint, e.g. a fake cloud in a lab).
        let proxy_vars: [&str; 2] = match &endpoint {
            Some(uri) if uri.scheme_str() == Some("http") => ["HTTP_PROXY", "http_proxy"],
            _ => ["HTTPS_PROXY", "https_proxy"],
        };
        let proxy = match proxy_setting {
            Some((text, origin)) => Some((text, origin)),
            None => env_var(&proxy_vars)
                .map(|(name, text)| (text, Some(format!("the environment ({name})")))),
        };
        let proxy = proxy.and_then(|(text, origin)| match parse_proxy(&text) {
            Ok(p) => Some(p),
            Err(e) => {
                self.issue("cloud.proxy", origin.as_deref(), e);
                None
            }
        });
        let no_proxy = no_proxy_setting.unwrap_or_else(|| {
            env_var(&["NO_PROXY", "no_proxy"])
                .map(|(_, v)| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        });
        Some(CloudConfig {
            endpoint: endpoint?,
            token_file: token_file?,
            allow_insecure,
            ca_file,
            proxy,
            no_proxy,
            cluster_id,
            operation_mode,
            max_concurrent_calls,
            connect_timeout,
            backoff_initial,
            backoff_max,
            outbox_memory_bytes,
            max_request_bytes,
        })
    }

    /// `[api.ldap]`.
    fn ldap(&mut self, api: &mut Map<String, Value>) -> Option<LdapConfig> {
        let origin = match &api.get("ldap")?.kind {
            ValueKind::Table(t) => self.table_origin(t),
            _ => None,
        };
        let mut t = self.section(
            api,
            "api.ldap",
            &[
                "url",
                "starttls",
                "ca_file",
                "allow_insecure",
                "user_dn",
                "user_base",
                "user_filter",
                "bind_dn",
                "bind_password_file",
                "group_base",
                "group_filter",
                "admin_groups",
                "operator_groups",
                "viewer_groups",
                "timeout_secs",
            ],
        );
        let required = |v: &mut Self, t: &mut Map<String, Value>, key: &str| -> Option<String> {
            let present = t.contains_key(leaf(key));
            match v.string(t, key) {
                Some((text, _)) if !text.trim().is_empty() => Some(text),
                Some((_, from)) => {
                    v.issue(key, from.as_deref(), "must not be empty");
                    None
                }
                None => {
                    if !present {
                        v.issue(key, origin.as_deref(), "missing: [api.ldap] needs it");
                    }
                    None
                }
            }
        };
        let url_origin = origin_in(&t, "url");
        let url = required(self, &mut t, "api.ldap.url");
        let starttls = self.boolean(&mut t, "api.ldap.starttls").unwrap_or(false);
        let allow_insecure = self
            .boolean(&mut t, "api.ldap.allow_insecure")
            .unwrap_or(false);
        if let Some(url) = &url {
            let lower = url.to_ascii_lowercase();
            if lower.starts_with("ldap://") {
                if !starttls && !allow_insecure {
                    self.issue(
                        "api.ldap.url",
                        url_origin.as_deref(),
                        "ldap:// without StartTLS sends passwords in the clear: use ldaps://, \
                         set starttls = true, or allow_insecure = true (a test directory only)",
                    );
                }
            } else if lower.starts_with("ldaps://") {
                if starttls {
                    self.issue(
                        "api.ldap.starttls",
                        url_origin.as_deref(),
                        "ldaps:// is TLS already; StartTLS is for ldap://",
                    );
                }
            } else {
                self.issue(
                    "api.ldap.url",
                    url_origin.as_deref(),
                    format!("{url:?} is not an ldap:// or ldaps:// URL"),
                );
            }
        }
        let ca_file = self.ca_file(&mut t, "api.ldap.ca_file");
        let template_origin = origin_in(&t, "user_dn");
        let template = self.string(&mut t, "api.ldap.user_dn").map(|(s, _)| s);
        let base = self.string(&mut t, "api.ldap.user_base").map(|(s, _)| s);
        let filter = self
            .string(&mut t, "api.ldap.user_filter")
            .map_or_else(|| "(uid={user})".to_string(), |(s, _)| s);
        let bind_dn = self.string(&mut t, "api.ldap.bind_dn").map(|(s, _)| s);
        let bind_password_file = self
            .path(&mut t, "api.ldap.bind_password_file")
            .map(absolute);
        let users = match (template, base) {
            (Some(template), None) => {
                if !template.contains("{user}") {
                    self.issue(
                        "api.ldap.user_dn",
                        template_origin.as_deref(),
                        "must contain {user}, e.g. \"uid={user},ou=people,dc=example,dc=com\"",
                    );
                }
                if bind_dn.is_some() || bind_password_file.is_some() {
                    self.issue(
                        "api.ldap.bind_dn",
                        template_origin.as_deref(),
                        "a service account searches for users (user_base); with user_dn the \
                         user binds directly: set one of user_dn and user_base",
                    );
                }
                Some(LdapUsers::Template(template))
            }
            (None, Some(base)) => {
                if !filter.contains("{user}") {
                    self.issue(
                        "api.ldap.user_filter",
                        origin.as_deref(),
                        "must contain {user}, e.g. \"(sAMAccountName={user})\"",
                    );
                }
                let bind = match (bind_dn, bind_password_file) {
                    (Some(dn), Some(file)) => Some((dn, file)),
                    (None, None) => None,
                    _ => {
                        self.issue(
                            "api.ldap.bind_password_file",
                            origin.as_deref(),
                            "bind_dn and bind_password_file go together",
                        );
                        None
                    }
                };
                Some(LdapUsers::Search { base, filter, bind })
            }
            (Some(_), Some(_)) => {
                self.issue(
                    "api.ldap.user_dn",
                    template_origin.as_deref(),
                    "set one of user_dn (bind directly) and user_base (search)",
                );
                None
            }
            (None, None) => {
                self.issue(
                    "api.ldap.user_dn",
                    origin.as_deref(),
                    "missing: set user_dn (\"uid={user},ou=people,…\") or user_base",
                );
                None
            }
        };
        let group_base = required(self, &mut t, "api.ldap.group_base");
        let group_filter = self.string(&mut t, "api.ldap.group_filter").map_or_else(
            || "(|(member={dn})(uniqueMember={dn}))".to_string(),
            |(s, _)| s,
        );
        if !group_filter.contains("{dn}") {
            self.issue(
                "api.ldap.group_filter",
                origin.as_deref(),
                "must contain {dn}, e.g. \"(member={dn})\"",
            );
        }
        let mut role_groups = Vec::new();
        for (role, key) in [
            (crate::auth::Role::Admin, "api.ldap.admin_groups"),
            (crate::auth::Role::Operator, "api.ldap.operator_groups"),
            (crate::auth::Role::Viewer, "api.ldap.viewer_groups"),
        ] {
            let groups = self.string_list(&mut t, key).unwrap_or_default();
            if !groups.is_empty() {
                role_groups.push((
                    role,
                    groups
                        .iter()
                        .map(|g| crate::auth::ldap::normalize_dn(g))
                        .collect(),
                ));
            }
        }
        if role_groups.is_empty() {
            self.issue(
                "api.ldap.admin_groups",
                origin.as_deref(),
                "no role groups: set admin_groups, operator_groups or viewer_groups (lists of \
                 group DNs), or no directory user gets a role",
            );
        }
        let timeout = Duration::from_secs(
            self.uint(&mut t, "api.ldap.timeout_secs", 1, 300)
                .unwrap_or(10),
        );
        Some(LdapConfig {
            url: url?,
            starttls,
            ca_file,
            allow_insecure,
            users: users?,
            group_base: group_base?,
            group_filter,
            role_groups,
            timeout,
        })
    }

    /// `[api.users.<name>]`: each with an Argon2 `password_hash` and a `role`.
    fn api_users(&mut self, api: &mut Map<String, Value>) -> BTreeMap<String, ApiUser> {
        let mut out = BTreeMap::new();
        let Some(value) = api.remove("users") else {
            return out;
        };
        let ValueKind::Table(all) = value.kind else {
            self.issue(
                "api.users",
                value.origin(),
                "expected tables like [api.users.<name>] with password_hash and role",
            );
            return out;
        };
        let users = self.named_tables(
            all,
            "api.users",
            "[api.users.<name>] with password_hash and role",
            &["password_hash", "role"],
        );
        for (name, origin, mut sub) in users {
            let prefix = format!("api.users.{name}");
            let hash = match self.string(&mut sub, &format!("{prefix}.password_hash")) {
                None => {
                    self.issue(
                        &format!("{prefix}.password_hash"),
                        origin.as_deref(),
                        "missing: every user needs one (make it with `lumos-agent hash-password`)",
                    );
                    None
                }
                Some((hash, from)) => match crate::auth::check_password_hash(&hash) {
                    Ok(()) => Some(hash),
                    Err(why) => {
                        self.issue(&format!("{prefix}.password_hash"), from.as_deref(), why);
                        None
                    }
                },
            };
            let role_key = format!("{prefix}.role");
            let has_role = sub.contains_key("role");
            let role = match self.choice(&mut sub, &role_key, crate::auth::Role::NAMES) {
                Some(role) => crate::auth::Role::parse(&role),
                None => {
                    // (A role that is there but not one of them is reported by `choice`.)
                    if !has_role {
                        self.issue(
                            &role_key,
                            origin.as_deref(),
                            format!("missing: one of {}", crate::auth::Role::NAMES.join(", ")),
                        );
                    }
                    None
                }
            };
            if let (Some(password_hash), Some(role)) = (hash, role) {
                out.insert(
                    name.to_lowercase(),
                    ApiUser {
                        password_hash,
                        role,
                    },
                );
            }
        }
        out
    }

    /// The tables `[<section>.<name>]` of `all`, each with its origin, their unknown keys
    /// reported (`like`: what one looks like, for a value that is not a table).
    fn named_tables(
        &mut self,
        all: Map<String, Value>,
        section: &str,
        like: &str,
        known: &[&str],
    ) -> Vec<(String, Option<String>, Map<String, Value>)> {
        let mut out = Vec::new();
        for (name, value) in all {
            let origin = origin_of(&value).map(str::to_owned);
            let prefix = format!("{section}.{name}");
            let ValueKind::Table(sub) = value.kind else {
                self.issue(
                    &prefix,
                    origin.as_deref(),
                    format!("expected a table like {like}"),
                );
                continue;
            };
            for (key, v) in &sub {
                if !known.contains(&key.as_str()) {
                    self.issue(
                        &format!("{prefix}.{key}"),
                        origin_of(v),
                        unknown_key(key, known),
                    );
                }
            }
            let origin = origin.or_else(|| self.table_origin(&sub));
            out.push((name, origin, sub));
        }
        out
    }

    fn connectors(
        &mut self,
        table: &mut Map<String, Value>,
    ) -> BTreeMap<String, ConnectorOverride> {
        let mut out = BTreeMap::new();
        let all = self.section(table, "connectors", &[]);
        // `section` reported every app_id as unknown; they are free-form here, so undo that.
        self.issues.retain(|i| !i.key.starts_with("connectors."));
        let tables = self.named_tables(
            all,
            "connectors",
            "[connectors.<app_id>]",
            &["max_concurrency", "timeout_secs", "in_process"],
        );
        for (app_id, origin, mut sub) in tables {
            let prefix = format!("connectors.{app_id}");
            // Settings under a name no connector can have would never apply.
            if let Err(why) = crate::plugins::info::check_app_id(&app_id) {
                self.issue(
                    &prefix,
                    origin.as_deref(),
                    format!("{why}: a [connectors.<app_id>] table is named by the app_id its connector reports (`lumos-agent connectors` lists them)"),
                );
                continue;
            }
            let over = ConnectorOverride {
                max_concurrency: self
                    .uint(&mut sub, &format!("{prefix}.max_concurrency"), 1, 10_000)
                    .map(to_usize),
                timeout: self
                    .uint(&mut sub, &format!("{prefix}.timeout_secs"), 1, 86_400)
                    .map(Duration::from_secs),
                in_process: self
                    .boolean(&mut sub, &format!("{prefix}.in_process"))
                    .unwrap_or(false),
            };
            out.insert(app_id, over);
        }
        out
    }
}

/// Where a value came from. The config crate records it for values, not for tables: a
/// table's is that of its first value that has one (`[cloud.proxy]` where a string was
/// expected is then blamed on the file that has it, not on the built-in defaults).
fn origin_of(value: &Value) -> Option<&str> {
    match &value.kind {
        ValueKind::Table(t) => value.origin().or_else(|| t.values().find_map(origin_of)),
        _ => value.origin(),
    }
}

fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Where the value of `key` in its section's `table` came from, before it is taken out.
fn origin_in(table: &Map<String, Value>, key: &str) -> Option<String> {
    table
        .get(leaf(key))
        .and_then(|v| origin_of(v).map(str::to_owned))
}

/// Whether `name` can name an environment variable: not empty, and no `=`, NUL or blank
/// (`std::env::var_os` finds nothing for such a name, so it would pass nothing, silently).
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(|c: char| c == '=' || c == '\0' || c.is_whitespace())
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn describe(kind: &ValueKind) -> String {
    match kind {
        ValueKind::Nil => "nothing".into(),
        ValueKind::Boolean(b) => format!("boolean {b}"),
        ValueKind::I64(n) => format!("number {n}"),
        ValueKind::I128(n) => format!("number {n}"),
        ValueKind::U64(n) => format!("number {n}"),
        ValueKind::U128(n) => format!("number {n}"),
        ValueKind::Float(n) => format!("number {n}"),
        ValueKind::String(s) => format!("string {s:?}"),
        ValueKind::Table(_) => "a table".into(),
        ValueKind::Array(_) => "a list".into(),
    }
}

/// Relative paths are taken from the working directory at start, once, so a later `chdir`
/// cannot move them. (`./plugins` becomes `<cwd>/plugins`, not `<cwd>/./plugins`: collecting
/// the components drops the `.`, which only names the same folder; a `..` stays, as a symlink
/// can make it mean something else than the folder above.)
fn absolute(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(&path).components().collect())
        .unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_file(path: &std::path::Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        load_with_env(
            &Overrides {
                config_file: Some(path.to_path_buf()),
                ..Default::default()
            },
            env,
        )
    }

    fn file(contents: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    #[test]
    fn a_file_where_a_folder_goes_is_reported_with_its_origin() {
        let (dir, path) = file("");
        let not_a_folder = dir.path().join("plugins");
        std::fs::write(&not_a_folder, "").unwrap();
        let toml = format!(
            "plugins_dir = {not_a_folder:?}\nstate_dir = {:?}\n",
            dir.path().join("state")
        );
        std::fs::write(&path, toml).unwrap();
        let ConfigError::Invalid(issues) = load_file(&path, &[]).unwrap_err() else {
            panic!("not a validation error");
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "plugins_dir");
        assert_eq!(issues[0].origin, path.display().to_string());
        assert!(issues[0].message.contains("exists and is not a folder"));
        // From the command line, and the state folder too.
        let issues = match load_with_env(
            &Overrides {
                config_file: Some(path.clone()),
                state_dir: Some(not_a_folder.clone()),
                plugins_dir: Some(dir.path().join("elsewhere")),
                ..Default::default()
            },
            &[],
        ) {
            Err(ConfigError::Invalid(issues)) => issues,
            other => panic!("{other:?}"),
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(
            (issues[0].key.as_str(), issues[0].origin.as_str()),
            ("state_dir", "the command line")
        );
        // A missing folder is no error: the agent creates it.
        std::fs::remove_file(&not_a_folder).unwrap();
        load_file(&path, &[]).unwrap();
    }

    #[test]
    fn defaults_are_sane() {
        let cfg = load_with_env(
            &Overrides {
                dev: true,
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        assert_eq!(cfg.api.listen.ip().to_string(), "127.0.0.1");
        assert!(cfg.plugins_dir.ends_with(".lumos-agent-dev/plugins"));
        assert_eq!(cfg.calls.max_concurrency, 8);
        assert_eq!(cfg.origin, ConfigOrigin::EmbeddedDev);
    }

    #[test]
    fn the_cloud_section_is_checked_and_proxies_come_from_the_environment() {
        let (_dir, path) = file(
            "[cloud]\nendpoint = \"http://cloud.example\"\nproxy = \"socks5://p\"\nbackoff_initial_ms = 90000\nbackoff_max_secs = 1\n",
        );
        let ConfigError::Invalid(issues) = load_file(&path, &[]).unwrap_err() else {
            panic!("expected Invalid")
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for key in [
            "cloud.endpoint",
            "cloud.token_file",
            "cloud.proxy",
            "cloud.backoff_initial_ms",
        ] {
            assert!(keys.contains(&key), "{key} not reported: {issues:?}");
        }
        assert!(issues.iter().any(|i| i.message.contains("allow_insecure")));

        let (_dir, path) =
            file("[cloud]\nendpoint = \"https://cloud.example\"\ntoken_file = \"/etc/t\"\n");
        let env = [
            (
                "HTTPS_PROXY".to_string(),
                "http://me:s%3Acret@proxy:3128".to_string(),
            ),
            ("NO_PROXY".to_string(), "internal, .corp".to_string()),
        ];
        let cloud = load_file(&path, &env).unwrap().cloud.unwrap();
        let proxy = cloud.proxy.unwrap();
        assert_eq!(proxy.authority, "proxy:3128");
        assert_eq!(
            proxy.credentials.as_deref().map(String::as_str),
            Some("me:s:cret")
        );
        assert!(!format!("{proxy:?} {proxy}").contains("s:cret"));
        assert_eq!(cloud.no_proxy, ["internal", ".corp"]);

        // The environment's proxy variable is the endpoint scheme's, as curl reads them; a bad
        // one is reported under its own name, never its value.
        let proxies = [
            (
                "HTTPS_PROXY".to_string(),
                "http://tls-proxy:3128".to_string(),
            ),
            ("http_proxy".to_string(), "plain-proxy:8080".to_string()),
        ];
        let cloud = load_file(&path, &proxies).unwrap().cloud.unwrap();
        assert_eq!(cloud.proxy.unwrap().authority, "tls-proxy:3128");
        let (_dir, plain) = file(
            "[cloud]\nendpoint = \"http://127.0.0.1:9\"\nallow_insecure = true\ntoken_file = \"/etc/t\"\n",
        );
        let cloud = load_file(&plain, &proxies).unwrap().cloud.unwrap();
        assert_eq!(cloud.proxy.unwrap().authority, "plain-proxy:8080");
        let cloud = load_file(&plain, &proxies[..1]).unwrap().cloud.unwrap();
        assert!(
            cloud.proxy.is_none(),
            "HTTPS_PROXY is not for an http:// endpoint"
        );
        let bad = [("HTTPS_PROXY".to_string(), "socks5://proxy:1080".to_string())];
        let ConfigError::Invalid(issues) = load_file(&path, &bad).unwrap_err() else {
            panic!("expected Invalid")
        };
        let issue = issues.iter().find(|i| i.key == "cloud.proxy").unwrap();
        assert_eq!(issue.origin, "the environment (HTTPS_PROXY)");
        assert!(!issue.to_string().contains("socks5"), "{issue}");
        // Named as the admin spelled it.
        let bad = [("http_proxy".to_string(), "socks5://proxy:1080".to_string())];
        let ConfigError::Invalid(issues) = load_file(&plain, &bad).unwrap_err() else {
            panic!("expected Invalid")
        };
        let issue = issues.iter().find(|i| i.key == "cloud.proxy").unwrap();
        assert_eq!(issue.origin, "the environment (http_proxy)");
        // Without [cloud]: standalone.
        let (_dir, path) = file("");
        assert!(load_file(&path, &[]).unwrap().cloud.is_none());
    }

    #[test]
    fn proxy_urls_as_admins_write_them() {
        let ok = |text: &str| {
            let proxy = parse_proxy(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            (
                proxy.authority,
                proxy.credentials.map(|c| c.as_str().to_string()),
            )
        };
        let plain = |authority: &str| (authority.to_string(), None);
        assert_eq!(ok("http://proxy:3128"), plain("proxy:3128"));
        assert_eq!(ok("http://proxy:3128/"), plain("proxy:3128"));
        assert_eq!(ok("HTTP://Proxy.Corp:3128"), plain("Proxy.Corp:3128"));
        assert_eq!(ok("proxy.corp:3128"), plain("proxy.corp:3128"));
        assert_eq!(ok(" http://proxy "), plain("proxy:80"));
        assert_eq!(ok("http://[::1]:3128"), plain("[::1]:3128"));
        assert_eq!(ok("http://[fd00::5]"), plain("[fd00::5]:80"));
        assert_eq!(ok("http://10.0.0.1:8080"), plain("10.0.0.1:8080"));
        assert_eq!(
            ok("http://me:p%40ss%3Aw%2Frd@proxy:3128"),
            ("proxy:3128".to_string(), Some("me:p@ss:w/rd".to_string()))
        );
        assert_eq!(
            ok("me@proxy"),
            ("proxy:80".to_string(), Some("me:".to_string()))
        );

        for (text, needle) in [
            ("https://proxy:3128", "must start with http://"),
            ("socks5://me:secret@proxy:1080", "must start with http://"),
            ("http://proxy:99999", "the port is not 1 – 65535"),
            ("http://proxy:0", "the port is not 1 – 65535"),
            ("http://:3128", "the host and port are not valid"),
            ("http://", "the host and port are not valid"),
            ("http://proxy:3128/path", "the host and port are not valid"),
            ("http://pro xy:3128", "the host and port are not valid"),
            ("http://proxy:port", "the port is not 1 – 65535"),
            ("http://me:%ff@proxy", "not valid percent-encoding"),
        ] {
            let err = parse_proxy(text).map(|p| p.authority).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains("secret"), "{text}: {err}");
        }
    }

    proptest::proptest! {
        /// Any text gives a proxy or one of a few fixed errors, never a panic, and never an
        /// error that quotes the text (it may hold a password). Credentials and host written into a URL come
        /// back as they were.
        #[test]
        fn proxy_urls_parse_without_panics_or_echoes(
            text in "\\PC{0,40}",
            user in "\\PC{1,12}",
            password in "\\PC{0,12}",
            host in "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5}){0,2}",
            port in 1..=u16::MAX,
        ) {
            if let Err(e) = parse_proxy(&text) {
                // One of a few fixed messages: nothing of the text in it.
                let fixed = [
                    "a proxy URL must start with http:// (the CONNECT request is plain HTTP; the tunnel inside it is TLS)",
                    "the host and port are not valid",
                    "the port is not 1 – 65535",
                ]
                .map(|m| format!("expected http://[user:password@]host[:port]: {m}"));
                proptest::prop_assert!(
                    fixed.contains(&e) || e == "the proxy credentials are not valid percent-encoding",
                    "{}", e
                );
            }
            let encode = |part: &str| {
                percent_encoding::utf8_percent_encode(part, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            };
            let url = format!("http://{}:{}@{host}:{port}", encode(&user), encode(&password));
            let proxy = parse_proxy(&url).map_err(proptest::test_runner::TestCaseError::fail)?;
            proptest::prop_assert_eq!(proxy.authority, format!("{host}:{port}"));
            let expected = format!("{user}:{password}");
            proptest::prop_assert_eq!(
                proxy.credentials.as_deref().map(String::as_str),
                Some(expected.as_str())
            );
        }
    }

    #[test]
    fn ca_files_are_read_when_validated_and_bad_ones_reported_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("corp-ca.pem");
        let issued = rcgen::generate_simple_self_signed(vec!["idp.corp".into()]).unwrap();
        std::fs::write(&good, issued.cert.pem()).unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");

        let (_d, path) = file(&format!(
            "[oauth]\nca_file = {:?}\n",
            good.display().to_string()
        ));
        let config = load_file(&path, &[]).unwrap();
        assert_eq!(config.oauth.ca_file.as_deref(), Some(good.as_path()));
        let (_d, path) = file("");
        assert_eq!(load_file(&path, &[]).unwrap().oauth, OAuthConfig::default());

        let (_d, path) = file(&format!(
            "[oauth]\nca_file = {:?}\ntypo = 1\n[cloud]\nendpoint = \"https://cloud.example\"\ntoken_file = \"/etc/t\"\nca_file = {:?}\n",
            junk.display().to_string(),
            missing.display().to_string()
        ));
        let err = load_file(&path, &[]).unwrap_err();
        let ConfigError::Invalid(issues) = err else {
            panic!("expected Invalid, got {err}")
        };
        let about = |key: &str| {
            issues
                .iter()
                .find(|i| i.key == key)
                .map(|i| i.message.clone())
                .unwrap_or_else(|| panic!("no issue for {key}: {issues:?}"))
        };
        assert!(about("oauth.ca_file").contains("no PEM certificate"));
        assert!(about("cloud.ca_file").contains("missing.pem"));
        assert!(issues.iter().any(|i| i.key.contains("typo")), "{issues:?}");
    }

    #[test]
    fn every_error_is_reported_at_once_with_key_and_origin() {
        let (_dir, path) = file(
            "plugins_dir = 5\nbogus = 1\n[calls]\ntimeout_secs = \"soon\"\nmax_concurrency = 0\ntypo = 1\n[log]\nformat = \"xml\"\n[api]\nlisten = \"nowhere\"\n",
        );
        let err = load_file(&path, &[]).unwrap_err();
        let ConfigError::Invalid(issues) = err else {
            panic!("expected Invalid, got {err}")
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for key in [
            "plugins_dir",
            "bogus",
            "calls.timeout_secs",
            "calls.max_concurrency",
            "calls.typo",
            "log.format",
            "api.listen",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(
            issues.iter().all(|i| i.origin.contains("agent.toml")),
            "{issues:?}"
        );
    }

    #[test]
    fn listen_addresses_as_admins_write_them() {
        let ok = |text: &str| parse_listen(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            ok("127.0.0.1:7878"),
            SocketAddr::from(([127, 0, 0, 1], 7878))
        );
        assert_eq!(
            ok(" localhost:9000 "),
            SocketAddr::from(([127, 0, 0, 1], 9000))
        );
        assert_eq!(ok("LocalHost:1"), SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(ok("[::1]:7878").to_string(), "[::1]:7878");
        assert_eq!(ok("0.0.0.0:7878").to_string(), "0.0.0.0:7878");
        for (text, needle) in [
            (
                "7878",
                "write 127.0.0.1:7878 (this machine only) or 0.0.0.0:7878",
            ),
            (":7878", "a port without an address"),
            (
                "agent.corp:7878",
                "names a host; write the address to listen on, like 127.0.0.1:7878",
            ),
            ("localhost", "not an address like 127.0.0.1:7878"),
            ("localhost:99999", "not an address"),
            ("10.0.0.300:7878", "not an address"),
            ("::1:7878", "[::1]:7878"),
            ("", "not an address"),
        ] {
            let error = parse_listen(text).expect_err(text);
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    /// A filter names levels, and modules with theirs. A bare word that is no level would be
    /// read by tracing as a module to log in full, and everything else would go unlogged.
    #[test]
    fn a_log_filter_word_that_is_no_level_is_refused() {
        for good in [
            "info",
            "WARN",
            "off",
            "warn,lumos_agent::plugins=debug",
            "lumos_agent=trace",
            "info,h2=off,",
            "info,[call]=debug",
        ] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
        }
        // tracing itself takes these, as modules.
        for bad in ["warning", "verbose", "info,lumos_agent", "critical,h2=off"] {
            assert!(tracing_subscriber::EnvFilter::builder().parse(bad).is_ok());
            let why = check_log_filter(bad).expect_err(bad);
            assert!(why.contains("is not a level (trace, debug"), "{bad}: {why}");
            assert!(why.contains("=trace\")"), "{bad}: {why}");
        }
        // And tracing's own errors are still reported.
        let why = check_log_filter("info,x=loud").unwrap_err();
        assert!(why.contains("is not a log filter"), "{why}");
    }

    /// Bad settings, each with its section and the key it must be reported under.
    const BAD_SETTINGS: &[(&str, &str, &str)] = &[
        ("", "plugins_dir = 5", "plugins_dir"),
        ("", "bogus = 1", "bogus"),
        ("calls", "timeout_secs = \"soon\"", "calls.timeout_secs"),
        ("calls", "max_concurrency = 0", "calls.max_concurrency"),
        ("calls", "kill_grace_secs = 601", "calls.kill_grace_secs"),
        (
            "calls",
            "connector_log_level = \"LOUD\"",
            "calls.connector_log_level",
        ),
        ("calls", "typo = 1", "calls.typo"),
        (
            "calls",
            "pass_env = [\"HTTPS_PROXY=http://proxy\"]",
            "calls.pass_env",
        ),
        ("log", "format = \"xml\"", "log.format"),
        ("log", "level = \"warning\"", "log.level"),
        ("api", "listen = \"nowhere\"", "api.listen"),
        ("api", "token_ttl_secs = 0", "api.token_ttl_secs"),
        ("api", "max_connections = 0", "api.max_connections"),
        // No users to log in as and no admin token: nobody could use the API.
        ("api", "admin_token = false", "api.admin_token"),
        (
            "plugins",
            "info_timeout_secs = 0",
            "plugins.info_timeout_secs",
        ),
        ("plugins", "debounce_ms = 5", "plugins.debounce_ms"),
        ("plugins", "watch = \"yes\"", "plugins.watch"),
        ("plugins", "max_file_bytes = 10", "plugins.max_file_bytes"),
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Whichever settings are wrong, each is reported under its own key, and nothing else
        /// is: one bad setting never hides another, in its section or in any other.
        #[test]
        fn whichever_settings_are_wrong_each_is_reported_and_nothing_else(
            chosen in proptest::sample::subsequence(BAD_SETTINGS, 0..=BAD_SETTINGS.len()),
        ) {
            let (dir, path) = file("");
            let mut sections: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for (section, line, _) in &chosen {
                sections.entry(section).or_default().push(line);
            }
            let mut text = format!("state_dir = {:?}\n", dir.path().join("state"));
            if !chosen.iter().any(|(_, _, key)| *key == "plugins_dir") {
                text.push_str(&format!("plugins_dir = {:?}\n", dir.path().join("plugins")));
            }
            // The top level ("") sorts first: a key after a table header would be in that table.
            for (section, lines) in &sections {
                if !section.is_empty() {
                    text.push_str(&format!("[{section}]\n"));
                }
                for line in lines {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            std::fs::write(&path, &text).unwrap();
            let mut expected: Vec<&str> = chosen.iter().map(|(_, _, key)| *key).collect();
            expected.sort_unstable();
            let mut reported: Vec<String> = match load_file(&path, &[]) {
                Ok(_) => Vec::new(),
                Err(ConfigError::Invalid(issues)) => issues.into_iter().map(|i| i.key).collect(),
                Err(other) => return Err(proptest::test_runner::TestCaseError::fail(format!("{other}"))),
            };
            reported.sort_unstable();
            reported.dedup();
            proptest::prop_assert_eq!(reported, expected, "config:\n{}", text);
        }
    }

    #[test]
    fn api_users_need_an_argon2_hash_and_a_role_and_every_problem_is_reported() {
        let good = crate::auth::hash_password(b"pw").unwrap();
        let (_dir, path) = file(&format!(
            "[api]\ntoken_ttl_secs = 900\n\
             [api.users.Alice]\npassword_hash = \"{good}\"\nrole = \"operator\"\n"
        ));
        let cfg = load_file(&path, &[]).unwrap();
        assert_eq!(cfg.api.token_ttl, Duration::from_secs(900));
        let alice = &cfg.api.users["alice"];
        assert_eq!(alice.role, crate::auth::Role::Operator);
        assert!(!format!("{alice:?}").contains(&good), "{alice:?}");

        let (_dir, path) = file(&format!(
            "[api]\ntoken_ttl_secs = 0\n\
             [api.users.plain]\npassword_hash = \"hunter2\"\nrole = \"viewer\"\n\
             [api.users.norole]\npassword_hash = \"{good}\"\n\
             [api.users.badrole]\npassword_hash = \"{good}\"\nrole = \"root\"\n\
             [api.users.nohash]\nrole = \"admin\"\nemail = \"x\"\n"
        ));
        let ConfigError::Invalid(issues) = load_file(&path, &[]).unwrap_err() else {
            panic!("expected Invalid")
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for key in [
            "api.token_ttl_secs",
            "api.users.plain.password_hash",
            "api.users.norole.role",
            "api.users.badrole.role",
            "api.users.nohash.password_hash",
            "api.users.nohash.email",
        ] {
            assert!(keys.contains(&key), "{key} missing from {issues:?}");
        }
        let plain = issues
            .iter()
            .find(|i| i.key == "api.users.plain.password_hash")
            .unwrap();
        assert!(plain.message.contains("hash-password"), "{plain:?}");
        assert!(!format!("{issues:?}").contains("hunter2"), "{issues:?}");
    }

    #[test]
    fn a_config_path_that_is_no_file_says_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let unreadable = |path: &std::path::Path| match load_file(path, &[]) {
            Err(ConfigError::Unreadable { message, .. }) => message,
            other => panic!("expected Unreadable, got {other:?}"),
        };
        assert!(unreadable(dir.path()).starts_with("it is a folder"));
        assert_eq!(unreadable(&dir.path().join("missing.toml")), "no such file");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("agent.toml");
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            assert_eq!(unreadable(&fifo), "it is a named pipe (FIFO), not a file");
        }
    }

    #[test]
    fn the_plugins_and_state_folders_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let with = |plugins: &str, state: &str| {
            let path = dir.path().join("agent.toml");
            let (plugins, state) = (dir.path().join(plugins), dir.path().join(state));
            std::fs::write(
                &path,
                format!("plugins_dir = {plugins:?}\nstate_dir = {state:?}\n"),
            )
            .unwrap();
            load_file(&path, &[])
        };
        let issue = |result: Result<Config, ConfigError>| match result {
            Err(ConfigError::Invalid(issues)) => issues.into_iter().next().unwrap(),
            other => panic!("expected Invalid, got {other:?}"),
        };
        let same = issue(with("one", "one"));
        assert_eq!(same.key, "plugins_dir");
        assert!(
            same.message.contains("is also the state folder"),
            "{same:?}"
        );
        // Also through `.` and a trailing slash.
        let same = issue(with("one/./", "one"));
        assert_eq!(same.key, "plugins_dir");
        let inside = issue(with("p", "p/state"));
        assert_eq!(inside.key, "state_dir");
        assert!(
            inside.message.contains("is inside the plugins folder"),
            "{inside:?}"
        );
        // The default layout: plugins inside the state folder.
        assert!(with("s/plugins", "s").is_ok());
        // But not in one of the folders the agent clears by itself.
        for own in [
            "s/store",
            "s/bundles/x",
            "s/work",
            "s/calls",
            "s/outbox",
            "s/logs/connectors",
        ] {
            let within = issue(with(own, "s"));
            assert_eq!(within.key, "plugins_dir", "{own}");
            assert!(
                within.message.contains("a folder of the agent's own"),
                "{own}: {within:?}"
            );
        }
        // A folder of its own beside them is fine.
        assert!(with("s/stored-plugins", "s").is_ok());
    }

    #[test]
    fn relative_paths_are_made_absolute_without_a_dot_in_the_middle() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute("./plugins".into()), cwd.join("plugins"));
        assert_eq!(absolute("state/./x/".into()), cwd.join("state/x"));
        // `..` is left alone: through a symlink it need not be the folder above.
        assert_eq!(absolute("link/../x".into()), cwd.join("link/../x"));
        assert_eq!(absolute("/etc/./x".into()), PathBuf::from("/etc/./x"));
    }

    /// Relative paths from a file or the environment are listed for a warning (a service
    /// starts elsewhere); the command line's and the --dev default's are not.
    #[test]
    fn relative_paths_from_a_file_or_the_environment_are_told() {
        let (dir, path) = file("plugins_dir = \"plugins\"\n[plugins]\nlock_file = \"/etc/lock\"\n");
        let env = [("LUMOS_AGENT_STATE_DIR".to_string(), "state".to_string())];
        let cfg = load_file(&path, &env).unwrap();
        assert_eq!(
            cfg.relative_paths,
            ["state_dir = \"state\"", "plugins_dir = \"plugins\""]
        );
        let note = cfg.relative_paths_note().unwrap();
        assert!(
            note.starts_with("state_dir = \"state\", plugins_dir = \"plugins\" are relative"),
            "{note}"
        );
        assert!(note.ends_with("write absolute paths"), "{note}");

        let cfg = load_with_env(
            &Overrides {
                config_file: Some(path),
                plugins_dir: Some("from-the-cli".into()),
                state_dir: Some(dir.path().join("state")),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        assert!(cfg.relative_paths.is_empty(), "{:?}", cfg.relative_paths);
        assert_eq!(cfg.relative_paths_note(), None);
        let dev = load_with_env(
            &Overrides {
                dev: true,
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        assert!(dev.relative_paths.is_empty(), "{:?}", dev.relative_paths);
    }

    /// The config crate keeps no origin for a table: a key missing from one the file
    /// declares, or a table where a value belongs, is still blamed on the file, not on the
    /// built-in defaults.
    #[test]
    fn a_key_missing_from_a_table_of_the_file_names_the_file() {
        let (_dir, path) = file(
            "[api.users.nohash]\nrole = \"admin\"\n\
             [api.users.empty]\n\
             [api.ldap]\ngroup_base = \"ou=groups,dc=example,dc=com\"\n\
             [cloud.proxy]\nurl = \"http://proxy:3128\"\n",
        );
        let ConfigError::Invalid(issues) = load_file(&path, &[]).unwrap_err() else {
            panic!("expected Invalid")
        };
        let file = path.display().to_string();
        for key in [
            "api.users.nohash.password_hash",
            "api.users.empty.password_hash",
            "api.users.empty.role",
            "api.ldap.url",
            "api.ldap.user_dn",
            // A table where a string belongs.
            "cloud.proxy",
        ] {
            let issue = issues
                .iter()
                .find(|i| i.key == key)
                .unwrap_or_else(|| panic!("{key} missing from {issues:?}"));
            assert_eq!(issue.origin, file, "{issue:?}");
        }
        // Set in the environment, the missing key is named as the variable to set.
        let env = [(
            "LUMOS_AGENT_API__LDAP__GROUP_BASE".to_string(),
            "ou=groups".to_string(),
        )];
        let ConfigError::Invalid(issues) = load_with_env(&Overrides::default(), &env).unwrap_err()
        else {
            panic!("expected Invalid")
        };
        let url = issues.iter().find(|i| i.key == "api.ldap.url").unwrap();
        assert_eq!(url.origin, "the environment (LUMOS_AGENT_API__LDAP__URL)");
    }

    #[test]
    fn an_ldap_directory_needs_tls_a_way_to_find_users_and_role_groups() {
        let (_dir, path) = file(
            "[api.ldap]\nurl = \"ldaps://ldap.example.com\"\n\
             user_base = \"ou=people,dc=example,dc=com\"\nuser_filter = \"(sAMAccountName={user})\"\n\
             bind_dn = \"cn=svc,dc=example,dc=com\"\nbind_password_file = \"/etc/lumos-agent/ldap-pw\"\n\
             group_base = \"ou=groups,dc=example,dc=com\"\n\
             operator_groups = [\"CN=Lumos Ops, OU=Groups,DC=example,DC=com\"]\n",
        );
        let cfg = load_file(&path, &[]).unwrap();
        let ldap = cfg.api.ldap.unwrap();
        assert_eq!(
            ldap.role_groups,
            vec![(
                crate::auth::Role::Operator,
                vec!["cn=lumos ops,ou=groups,dc=example,dc=com".to_string()]
            )]
        );
        assert!(matches!(
            ldap.users,
            LdapUsers::Search { bind: Some(_), .. }
        ));
        assert_eq!(ldap.group_filter, "(|(member={dn})(uniqueMember={dn}))");

        let (_dir, path) = file(
            "[api.ldap]\nurl = \"ldap://ldap.example.com\"\n\
             user_dn = \"uid=someone,ou=people\"\nbind_dn = \"cn=svc\"\n\
             group_filter = \"(member=x)\"\nsurname = 1\n",
        );
        let ConfigError::Invalid(issues) = load_file(&path, &[]).unwrap_err() else {
            panic!("expected Invalid")
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for key in [
            "api.ldap.url",
            "api.ldap.user_dn",
            "api.ldap.bind_dn",
            "api.ldap.group_base",
            "api.ldap.group_filter",
            "api.ldap.admin_groups",
            "api.ldap.surname",
        ] {
            assert!(keys.contains(&key), "{key} missing from {issues:?}");
        }
        let url = issues.iter().find(|i| i.key == "api.ldap.url").unwrap();
        assert!(url.message.contains("in the clear"), "{url:?}");
    }

    #[test]
    fn environment_overrides_the_file_and_is_named_as_origin() {
        let (_dir, path) = file("[calls]\ntimeout_secs = 10\n");
        let env = vec![
            (
                "LUMOS_AGENT_CALLS__TIMEOUT_SECS".to_string(),
                "42".to_string(),
            ),
            ("LUMOS_AGENT_CONFIG".to_string(), "/ignored".to_string()),
        ];
        let cfg = load_file(&path, &env).unwrap();
        assert_eq!(cfg.calls.timeout, Duration::from_secs(42));

        let env = vec![(
            "LUMOS_AGENT_CALLS__MAX_CONCURRENCY".to_string(),
            "many".to_string(),
        )];
        let err = load_file(&path, &env).unwrap_err();
        assert!(
            err.to_string().contains(
                "the environment (LUMOS_AGENT_CALLS__MAX_CONCURRENCY): `calls.max_concurrency`"
            ),
            "{err}"
        );
    }

    /// A near miss names the key meant, at the top level, in a section and in a named table;
    /// a key like none names none.
    #[test]
    fn a_mistyped_key_is_told_which_key_was_meant() {
        let (_dir, path) = file(
            "plugin_dir = \"p\"\n[calls]\nmax_concurency = 2\ntimeout = 5\n\
             [log]\nLevel = \"info\"\n[connectors.x]\nin-process = true\nwat = 1\n",
        );
        let err = load_file(&path, &[]).unwrap_err().to_string();
        for (key, meant) in [
            ("`plugin_dir`", "plugins_dir"),
            ("`calls.max_concurency`", "max_concurrency"),
            ("`calls.timeout`", "timeout_secs"),
            ("`log.Level`", "level"),
            ("`connectors.x.in-process`", "in_process"),
        ] {
            let line = err
                .lines()
                .find(|l| l.contains(key))
                .unwrap_or_else(|| panic!("no error for {key}: {err}"));
            assert!(
                line.contains(&format!(
                    "unknown key (did you mean `{meant}`?); known keys are "
                )),
                "{line}"
            );
        }
        let wat = err
            .lines()
            .find(|l| l.contains("`connectors.x.wat`"))
            .unwrap();
        assert!(wat.contains("unknown key; known keys are "), "{wat}");
    }

    #[test]
    fn connector_overrides_apply_per_app() {
        let (_dir, path) = file("[connectors.slow_app]\ntimeout_secs = 900\nmax_concurrency = 2\n[connectors.other]\nwat = 1\n");
        let err = load_file(&path, &[]).unwrap_err();
        assert!(err.to_string().contains("connectors.other.wat"), "{err}");
        std::fs::write(
            &path,
            "[connectors.slow_app]\ntimeout_secs = 900\nmax_concurrency = 2\n",
        )
        .unwrap();
        let cfg = load_file(&path, &[]).unwrap();
        assert_eq!(cfg.timeout_for("slow_app"), Duration::from_secs(900));
        assert_eq!(cfg.max_concurrency_for("slow_app"), 2);
        assert_eq!(cfg.max_concurrency_for("another"), 8);
        // A name no connector can report is refused, naming the rule.
        std::fs::write(&path, "[connectors.\"my app\"]\ntimeout_secs = 900\n").unwrap();
        let err = load_file(&path, &[]).unwrap_err().to_string();
        assert!(
            err.contains("`connectors.my app`") && err.contains("must be 1-128 characters"),
            "{err}"
        );
    }

    #[test]
    fn pass_env_takes_variable_names_only() {
        let (_dir, path) = file("[calls]\npass_env = [\"HTTPS_PROXY\", \"ProgramFiles(x86)\"]\n");
        let cfg = load_file(&path, &[]).unwrap();
        assert_eq!(cfg.calls.pass_env, ["HTTPS_PROXY", "ProgramFiles(x86)"]);
        for bad in ["HTTPS_PROXY=http://proxy:3128", "", "NO PROXY"] {
            std::fs::write(&path, format!("[calls]\npass_env = [{bad:?}]\n")).unwrap();
            let err = load_file(&path, &[]).unwrap_err().to_string();
            assert!(
                err.contains("`calls.pass_env`")
                    && err.contains("is not an environment variable name"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn missing_explicit_file_and_broken_toml_are_unreadable() {
        let err = load_with_env(
            &Overrides {
                config_file: Some("/nonexistent/agent.toml".into()),
                ..Default::default()
            },
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable { .. }), "{err}");
        let (_dir, path) = file("[calls\n");
        let err = load_file(&path, &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable { .. }), "{err}");
    }

    /// The README's TOML blocks, and for each the (section, key) pairs it shows, commented
    /// out or not. A named table (`[api.users.olga]`, `[connectors.my_app]`) counts as its
    /// kind (`api.users.*`, `connectors.*`); a table counts as a key of its parent.
    fn readme_blocks() -> Vec<(String, std::collections::BTreeSet<(String, String)>)> {
        let mut blocks = Vec::new();
        for body in crate::readme::fenced_blocks(crate::readme::TEXT, "toml") {
            let mut shown = std::collections::BTreeSet::new();
            let mut section = String::new();
            for line in body.lines() {
                let line = line.trim_start_matches('#').trim();
                if let Some(header) = line.strip_prefix('[') {
                    let name = header.split(']').next().unwrap_or_default();
                    let parts: Vec<&str> = name.split('.').collect();
                    section = match parts.as_slice() {
                        ["api", "users", _] => "api.users.*".to_string(),
                        ["connectors", _] => "connectors.*".to_string(),
                        _ => name.to_string(),
                    };
                    // Each enclosing table is a key of the one above it.
                    let mut parent = String::new();
                    for part in section.split('.') {
                        shown.insert((parent.clone(), part.to_string()));
                        parent = if parent.is_empty() {
                            part.to_string()
                        } else {
                            format!("{parent}.{part}")
                        };
                    }
                } else if let Some((key, _)) = line.split_once('=') {
                    let key = key.trim();
                    if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        shown.insert((section.clone(), key.to_string()));
                    }
                }
            }
            blocks.push((body.to_string(), shown));
        }
        blocks
    }

    /// The keys the validator knows in `section`, as its "unknown key" message lists them
    /// (so this test reads the validator's own lists, not a copy of them).
    fn known_keys(header: &str, section: &str) -> Vec<String> {
        let (_dir, path) = file(&format!("{header}\nzz_probe = 1\n"));
        let Err(ConfigError::Invalid(issues)) = load_file(&path, &[]) else {
            panic!("{header}: a probe key was accepted");
        };
        let probe = if section.is_empty() {
            "zz_probe".to_string()
        } else {
            format!("{section}.zz_probe")
        };
        let issue = issues
            .iter()
            .find(|i| i.key == probe)
            .unwrap_or_else(|| panic!("{header}: no issue for {probe}: {issues:?}"));
        let list = issue
            .message
            .strip_prefix("unknown key; known keys are ")
            .unwrap_or_else(|| panic!("{header}: {}", issue.message));
        list.split(", ").map(str::to_owned).collect()
    }

    /// The configuration reference an admin reads is the validator's: every key it knows is in
    /// the README, and the README's examples validate as written (a renamed or removed key, or
    /// a default that moved out of range, fails here rather than in an admin's `check-config`).
    #[test]
    fn the_readme_shows_every_key_and_its_examples_validate() {
        let blocks = readme_blocks();
        assert!(blocks.len() >= 2, "the README's TOML blocks were not found");
        for (text, _) in &blocks {
            let (_dir, path) = file(text);
            if let Err(e) = load_file(&path, &[]) {
                panic!("a README example does not validate: {e}\n{text}");
            }
        }
        let shown: std::collections::BTreeSet<(String, String)> =
            blocks.into_iter().flat_map(|(_, shown)| shown).collect();
        let sections = [
            ("", ""),
            ("[api]", "api"),
            ("[api.users.probe]\nrole = \"viewer\"", "api.users.*"),
            ("[api.ldap]\nurl = \"ldaps://ldap.example\"", "api.ldap"),
            ("[calls]", "calls"),
            ("[plugins]", "plugins"),
            ("[log]", "log"),
            ("[cloud]\nendpoint = \"https://cloud.example\"", "cloud"),
            ("[oauth]", "oauth"),
            ("[connectors.probe]", "connectors.*"),
        ];
        let mut missing = Vec::new();
        for (header, section) in sections {
            let probed = section.replace('*', "probe");
            for key in known_keys(header, &probed) {
                if !shown.contains(&(section.to_string(), key.clone())) {
                    missing.push(format!("{section}: {key}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "keys the validator knows but README's configuration does not show: {missing:?}"
        );
    }

    /// The configuration the `.deb` installs as `/etc/lumos-agent/agent.toml` validates as
    /// shipped, and with its commented keys and tables uncommented (what an admin does to
    /// change one), the placeholder password hash given a real one.
    #[test]
    fn the_packaged_configuration_validates_as_shipped_and_uncommented() {
        let packaged = include_str!("../../packaging/agent.toml");
        let (_dir, path) = file(packaged);
        if let Err(e) = load_file(&path, &[]) {
            panic!("packaging/agent.toml does not validate: {e}");
        }
        let hash = crate::auth::hash_password(b"any password").unwrap();
        let is_key =
            |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        let uncommented: Vec<String> = packaged
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(key, _)| is_key(key)) =>
                {
                    rest.replace("$argon2id$v=19$m=19456,t=2,p=1$...", &hash)
                }
                _ => line.to_string(),
            })
            .collect();
        let uncommented = uncommented.join("\n");
        assert!(
            uncommented.contains("\n[api.users.olga]\n") && uncommented.contains("\nrole = "),
            "nothing was uncommented:\n{uncommented}"
        );
        let (_dir, path) = file(&uncommented);
        let shown = match load_file(&path, &[]) {
            Ok(config) => config,
            Err(e) => {
                panic!("packaging/agent.toml uncommented does not validate: {e}\n{uncommented}")
            }
        };
        // Its values are the defaults, where it says so: a default changed in the code
        // must be changed there too. (The folders' defaults depend on the user running.)
        let (_dir, path) = file("");
        let defaults = load_file(&path, &[]).unwrap();
        assert_eq!(shown.calls, defaults.calls);
        assert_eq!(shown.log, defaults.log);
        assert_eq!(
            (shown.api.listen, shown.api.token_ttl),
            (defaults.api.listen, defaults.api.token_ttl)
        );
        assert_eq!(
            (
                shown.plugins.strict_permissions,
                &shown.plugins.signing_keys
            ),
            (
                defaults.plugins.strict_permissions,
                &defaults.plugins.signing_keys
            )
        );
    }
}
