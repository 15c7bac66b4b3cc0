//! The command line: `run` starts the agent (see `main.rs`); every other command is a client of
//! the local API or a local check.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::client::{ApiClient, ClientError};
use crate::config::{self, Config, ConfigError, Overrides};
use crate::exit;
use crate::state::StatePaths;

/// `println!` for the commands' output, which must not panic when the output cannot be
/// written (Rust ignores SIGPIPE, so `println!` panics where a C program would quietly die):
/// see [`write_out`].
macro_rules! say {
    ($($arg:tt)*) => {
        write_out(format_args!($($arg)*))
    };
}

/// `eprintln!` for messages to the admin: a closed or broken stderr loses them, and nothing
/// else (`eprintln!` would panic).
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Writes a line of a command's output. When whoever reads it has gone (`lumos-agent
/// connectors | head -1`), the command ends there, quietly and with success, as a program
/// that SIGPIPE kills would; when it cannot be written for another reason (a full disk), the
/// command says so and ends with [`exit::OUTPUT`]. Either way the process exits at once: the
/// rest of the output has nowhere to go.
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(exit::OK.into()),
        Err(e) => {
            tell!("lumos-agent: cannot write the output: {e}");
            std::process::exit(exit::OUTPUT.into())
        }
    }
}

/// lumos-agent: hosts Lumos connectors on-prem and serves capability calls.
#[derive(Debug, Parser)]
#[command(name = "lumos-agent", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/lumos-agent/agent.toml on Linux, if present.
    #[arg(long, global = true, env = "LUMOS_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Use the embedded development default (./.lumos-agent-dev) and the example connectors.
    #[arg(long, global = true)]
    pub dev: bool,
    /// Plugins folder (overrides `plugins_dir`).
    #[arg(long, global = true, value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// State folder (overrides `state_dir`).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local API address (overrides `api.listen`).
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The API token the client commands send. Default: the one `lumos-agent login` saved for
    /// this agent's address, else <state_dir>/admin.token.
    #[arg(
        long,
        global = true,
        env = "LUMOS_AGENT_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (as the service does).
    Run,
    /// Validate the configuration and print every problem at once.
    CheckConfig,
    /// Check the config, folders and permissions, disk space, the running agent and each
    /// connector, and the path to the cloud (DNS, TCP, proxy, TLS, clock); non-zero exit if
    /// anything is wrong.
    Doctor,
    /// List connectors, or show one connector's full `info`.
    Connectors {
        /// Show this connector in detail.
        app_id: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Call a capability through the agent and print the connector's JSON answer.
    Call {
        /// The connector's app_id.
        app_id: String,
        /// The capability, e.g. validate_credentials.
        capability: String,
        /// The tenant whose stored settings and credentials are injected.
        #[arg(long)]
        tenant: Option<String>,
        /// The call body: {"request": …, "settings": …, "page": …}.
        #[arg(long, conflicts_with = "json_file")]
        json: Option<String>,
        /// Read the call body from a file (`-` for stdin); use this when it holds secrets.
        #[arg(long, value_name = "FILE")]
        json_file: Option<PathBuf>,
        /// A deadline shorter than the connector's configured one, in seconds (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: Option<u64>,
    },
    /// Manage agent-held tenants (settings and credentials that never leave this network).
    Tenants {
        /// put, list or delete.
        #[command(subcommand)]
        action: TenantsCommand,
    },
    /// Log in to the agent's API as a user of `[api.users]`; the token is saved (0600) for the
    /// other commands until it expires.
    Login {
        /// The user name.
        #[arg(long)]
        user: String,
        /// Read the password from a file (`-` for stdin) instead of asking for it.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// End the session of the saved login token and remove it.
    Logout,
    /// Print an Argon2 hash of a password for `[api.users.<name>] password_hash`.
    HashPassword {
        /// Read the password from a file (`-` for stdin) instead of asking for it twice.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Manage the Windows service (on Linux, the systemd unit does this: see README).
    Service {
        /// install, uninstall, start or stop.
        #[command(subcommand)]
        action: ServiceCommand,
    },
    /// Print the version.
    Version,
    /// Internal: host one native connector library in this process (a plugin worker). The agent
    /// starts these itself; they speak a framed protocol on stdin/stdout.
    #[command(hide = true)]
    PluginHost {
        /// The shared library.
        library: PathBuf,
    },
    /// Internal: end the connector process groups the agent lists on stdin once the agent is
    /// gone (it closes the pipe), however it went. The agent starts this itself.
    #[command(hide = true)]
    GroupReaper,
}

/// Windows service commands; run them from an elevated prompt.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ServiceCommand {
    /// Register the service (automatic start, restart on failure) with this executable and the
    /// given --config / --plugins-dir / --state-dir / --listen.
    Install,
    /// Stop and remove the service.
    Uninstall,
    /// Start the service.
    Start,
    /// Stop the service (it drains first, like SIGTERM).
    Stop,
    /// Internal: what the service control manager starts.
    #[command(hide = true)]
    Run,
}

/// Tenant commands. Secrets are read from files or stdin, never from the command line.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Store a tenant's settings and credentials.
    Put {
        /// The tenant (Lumos connection) id.
        tenant_id: String,
        /// The connector it belongs to.
        #[arg(long)]
        app_id: String,
        /// Settings as a JSON object (not secret).
        #[arg(long)]
        settings: Option<String>,
        /// Single-credential auth JSON, e.g. {"oauth": {"access_token": "…"}}; `-` for stdin.
        #[arg(long, value_name = "FILE", conflicts_with = "credentials_file")]
        auth_file: Option<PathBuf>,
        /// Multi-credential JSON list, e.g. [{"id": "…", "oauth": {…}}]; `-` for stdin.
        #[arg(long, value_name = "FILE")]
        credentials_file: Option<PathBuf>,
    },
    /// List tenants (without secrets).
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a tenant.
    Delete {
        /// The tenant id.
        tenant_id: String,
    },
}

impl Cli {
    /// The configuration overrides the flags give.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config_file: self.config.clone(),
            dev: self.dev,
            plugins_dir: self.plugins_dir.clone(),
            state_dir: self.state_dir.clone(),
            listen: self.listen.clone(),
        }
    }
}

/// Loads the configuration, printing every problem on failure.
pub fn load_config(cli: &Cli) -> Result<Config, u8> {
    config::load(&cli.overrides()).map_err(|e| {
        tell!("lumos-agent: {e}");
        if matches!(e, ConfigError::Invalid(_)) {
            tell!("(run `lumos-agent check-config` after fixing to verify)");
        }
        exit::CONFIG
    })
}

/// Runs every command except `run`; returns the exit code.
pub fn execute(cli: &Cli) -> u8 {
    match &cli.command {
        Command::Run => exit::USAGE,
        Command::PluginHost { library } => crate::native::worker::main(library),
        Command::GroupReaper => crate::reaper::main(),
        Command::Version => {
            say!("lumos-agent {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        Command::CheckConfig => check_config(cli),
        Command::HashPassword { password_file } => hash_password(password_file.as_deref()),
        Command::Doctor => block_on(crate::doctor::run(
            &cli.overrides(),
            cli.token_file.as_deref(),
            &mut std::io::stdout().lock(),
        )),
        Command::Service { action } => service(cli, *action),
        command => {
            let config = match load_config(cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            block_on(client_command(cli, &config, command))
        }
    }
}

/// Runs a command's future on a small runtime of its own.
fn block_on(work: impl std::future::Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(work),
        Err(e) => {
            tell!("lumos-agent: cannot start a runtime: {e}");
            exit::STARTUP
        }
    }
}

#[cfg(windows)]
fn service(cli: &Cli, action: ServiceCommand) -> u8 {
    use crate::winservice;
    let (result, done) = match action {
        ServiceCommand::Install => (
            winservice::install(&cli.overrides()),
            "installed; start it with `lumos-agent service start`",
        ),
        ServiceCommand::Uninstall => (winservice::uninstall(), "removed"),
        ServiceCommand::Start => (winservice::start(), "started"),
        ServiceCommand::Stop => (
            winservice::stop(),
            "asked to stop; it finishes in-flight calls first",
        ),
        ServiceCommand::Run => (winservice::run(cli.overrides()), "stopped"),
    };
    match result {
        Ok(()) => {
            if !matches!(action, ServiceCommand::Run) {
                say!("service {}: {done}", winservice::SERVICE_NAME);
            }
            exit::OK
        }
        Err(e) => {
            tell!("lumos-agent: {e}");
            exit::STARTUP
        }
    }
}

#[cfg(not(windows))]
fn service(_cli: &Cli, action: ServiceCommand) -> u8 {
    let _ = action;
    tell!("lumos-agent: `service` manages the Windows service; on Linux the systemd unit runs the agent (`systemctl enable --now lumos-agent`, see README)");
    exit::USAGE
}

fn check_config(cli: &Cli) -> u8 {
    match config::load(&cli.overrides()) {
        Ok(cfg) => {
            say!("config OK ({})", cfg.origin);
            say!("  plugins_dir  {}", cfg.plugins_dir.display());
            say!("  state_dir    {}", cfg.state_dir.display());
            if let Some(note) = cfg.relative_paths_note() {
                say!("  warning: {note}");
            }
            say!("  api.listen   {}", cfg.api.listen);
            if !cfg.api.listen.ip().is_loopback() {
                say!("  warning: {}", crate::api::BEYOND_LOOPBACK);
            }
            if !cfg.api.admin_token {
                say!("  admin token  off (api.admin_token = false): users log in");
            }
            if !cfg.api.users.is_empty() {
                let users: Vec<String> = cfg
                    .api
                    .users
                    .iter()
                    .map(|(name, user)| format!("{name} ({})", user.role.as_str()))
                    .collect();
                say!(
                    "  api.users    {}; tokens valid {:?}",
                    users.join(", "),
                    cfg.api.token_ttl
                );
            }
            say!(
                "  calls        timeout {:?}, {} at once per connector",
                cfg.calls.timeout,
                cfg.calls.max_concurrency
            );
            match &cfg.cloud {
                None => say!("  cloud        none (standalone: the local API only)"),
                Some(cloud) => {
                    say!("  cloud        {}", cloud.endpoint);
                    // Not a config error: the file may be provisioned after the config, and
                    // the tunnel reads it again on every attempt. But the admin who runs this
                    // wants to know now, not from the log after the start.
                    if let Err(e) = crate::tunnel::read_token(&cloud.token_file) {
                        say!("  warning: {e}; until then the agent does not connect");
                    }
                }
            }
            // Read at every load (an edit takes effect at the next reload), so not a config
            // error either; but a bad one rejects every plugin, which the admin wants to hear
            // of now.
            if let Some(lock_file) = &cfg.plugins.lock_file {
                match crate::plugins::integrity::describe_allow_list(lock_file) {
                    Ok(described) => say!("  allow-list   {described}"),
                    Err(e) => say!("  warning: {e}"),
                }
            }
            let keys = cfg.plugins.signing_keys.len();
            if keys > 0 {
                say!("  signatures   required: <file>.sig by one of {keys} key(s)");
            }
            if !cfg.plugins.strict_permissions {
                say!("  permissions  not checked (plugins.strict_permissions = false: for development only)");
            }
            if !cfg.plugins_dir.is_dir() {
                say!(
                    "  note: the plugins folder does not exist yet; the agent creates it at start"
                );
            }
            exit::OK
        }
        Err(e) => {
            tell!("lumos-agent: {e}");
            exit::CONFIG
        }
    }
}

/// Where `login` saves its token and `logout` finds it: `--token-file`, else the file for
/// this agent's address.
fn login_token_path(cli: &Cli, config: &Config) -> Option<PathBuf> {
    cli.token_file
        .clone()
        .or_else(|| crate::client::saved_token_path(config.api.listen))
}

/// A password from `file` (`-`: stdin; its first line), or asked for on the terminal
/// (`confirm`: twice).
fn read_password(file: Option<&Path>, confirm: bool) -> Result<Zeroizing<String>, String> {
    match file {
        Some(path) => {
            let text =
                read_input(path).map_err(|e| format!("cannot read {}: {e}", input_name(path)))?;
            let line = text.lines().next().unwrap_or_default();
            Ok(Zeroizing::new(line.to_string()))
        }
        None => {
            let first = Zeroizing::new(rpassword::prompt_password("Password: ").map_err(|e| {
                format!("cannot read a password from the terminal ({e}); use --password-file")
            })?);
            if confirm {
                let again = Zeroizing::new(
                    rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?,
                );
                if *again != *first {
                    return Err("the two passwords differ".into());
                }
            }
            Ok(first)
        }
    }
}

fn hash_password(file: Option<&Path>) -> u8 {
    let password = match read_password(file, true) {
        Ok(p) => p,
        Err(e) => {
            tell!("lumos-agent: {e}");
            return exit::USAGE;
        }
    };
    if password.is_empty() {
        tell!("lumos-agent: the password is empty");
        return exit::USAGE;
    }
    match crate::auth::hash_password(password.as_bytes()) {
        Ok(hash) => {
            say!("{hash}");
            tell!("put it in the agent's config:\n  [api.users.<name>]\n  password_hash = \"{hash}\"\n  role = \"viewer\"    # or operator, admin");
            exit::OK
        }
        Err(e) => {
            tell!("lumos-agent: cannot hash the password: {e}");
            exit::INTERNAL
        }
    }
}

async fn login(cli: &Cli, config: &Config, user: &str, password_file: Option<&Path>) -> u8 {
    let Some(path) = login_token_path(cli, config) else {
        tell!("lumos-agent: no home folder to save the token in; give --token-file");
        return exit::USAGE;
    };
    let password = match read_password(password_file, false) {
        Ok(p) => p,
        Err(e) => {
            tell!("lumos-agent: {e}");
            return exit::USAGE;
        }
    };
    #[derive(serde::Serialize)]
    struct Login<'a> {
        username: &'a str,
        password: &'a str,
    }
    let client = ApiClient::anonymous(config.api.listen);
    // One copy of the password, the request body, which hyper owns once sent (and cannot be
    // zeroized there).
    let body = serde_json::to_vec(&Login {
        username: user,
        password: password.as_str(),
    })
    .unwrap_or_default();
    let (status, answer) = match client
        .send(Method::POST, "/v1/auth/token", Some(body))
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            tell_client_error(config, &e);
            return exit::UNREACHABLE;
        }
    };
    let answer = Zeroizing::new(answer.to_vec());
    if !status.is_success() {
        tell!("lumos-agent: login refused: {}", error_message(&answer));
        return if status == StatusCode::UNAUTHORIZED
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::FORBIDDEN
        {
            exit::UNAUTHORIZED
        } else {
            exit::CALL_ERROR
        };
    }
    let doc: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    let Some(token) = doc["token"].as_str() else {
        tell!("lumos-agent: the agent's answer holds no token");
        return exit::CALL_ERROR;
    };
    if let Some(parent) = path.parent() {
        let created = {
            use crate::platform::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
        };
        if let Err(e) = created {
            tell!("lumos-agent: cannot create {}: {e}", parent.display());
            return exit::STARTUP;
        }
    }
    let token = Zeroizing::new(format!("{token}\n"));
    if let Err(e) = crate::state::write_atomic(&path, token.as_bytes(), 0o600) {
        tell!(
            "lumos-agent: cannot save the token in {}: {e}",
            path.display()
        );
        return exit::STARTUP;
    }
    let until = doc["expires_at"]
        .as_u64()
        .map(|secs| {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        })
        .unwrap_or_default();
    say!(
        "logged in to {} as {user} ({}) until {until}; token saved in {}",
        client.base(),
        doc["role"].as_str().unwrap_or("?"),
        path.display()
    );
    exit::OK
}

async fn logout(cli: &Cli, config: &Config) -> u8 {
    let Some(path) = login_token_path(cli, config).filter(|p| p.exists()) else {
        tell!(
            "lumos-agent: no saved login for {} (nothing to do)",
            config.api.listen
        );
        return exit::OK;
    };
    let ended = match ApiClient::new(config.api.listen, &path) {
        Ok(client) => match client.send(Method::DELETE, "/v1/auth/token", None).await {
            Ok((status, _)) if status.is_success() => "session ended",
            // Expired or unknown already: nothing left to end on the agent.
            Ok((StatusCode::UNAUTHORIZED, _)) => "session had already ended",
            Ok((_, body)) => {
                tell!("lumos-agent: {}", error_message(&body));
                return exit::CALL_ERROR;
            }
            Err(e) => {
                tell!("lumos-agent: {e}; the token file is kept");
                return exit::UNREACHABLE;
            }
        },
        Err(e) => {
            tell!("lumos-agent: {e}");
            return exit::USAGE;
        }
    };
    if let Err(e) = std::fs::remove_file(&path) {
        tell!("lumos-agent: cannot remove {}: {e}", path.display());
        return exit::STARTUP;
    }
    say!("logged out: {ended}; removed {}", path.display());
    exit::OK
}

/// The message of an API error body (the Lumos error shape), or the body as text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

async fn client_command(cli: &Cli, config: &Config, command: &Command) -> u8 {
    match command {
        Command::Login {
            user,
            password_file,
        } => return login(cli, config, user, password_file.as_deref()).await,
        Command::Logout => return logout(cli, config).await,
        _ => {}
    }
    // What the command sends is checked before the token is read: a mistyped body or file is
    // told as such, whoever runs the command (and nothing is sent).
    let body = match command {
        Command::Call {
            tenant,
            json,
            json_file,
            timeout_secs,
            ..
        } => call_body(
            tenant.as_deref(),
            json.as_deref(),
            json_file.as_deref(),
            *timeout_secs,
        ),
        Command::Tenants {
            action:
                TenantsCommand::Put {
                    app_id,
                    settings,
                    auth_file,
                    credentials_file,
                    ..
                },
        } => tenant_body(
            app_id,
            settings.as_deref(),
            auth_file.as_deref(),
            credentials_file.as_deref(),
        ),
        _ => Ok(Zeroizing::default()),
    };
    let body = match body {
        Ok(body) => body,
        Err(code) => return code,
    };
    let client = match crate::client::token_file(cli.token_file.as_deref(), config)
        .and_then(|token_file| ApiClient::new(config.api.listen, &token_file))
    {
        Ok(c) => c,
        Err(e) => {
            tell!("lumos-agent: {e}");
            return exit::UNAUTHORIZED;
        }
    };
    let result = match command {
        Command::Connectors { app_id, json } => {
            connectors(&client, app_id.as_deref(), *json, &config.plugins_dir).await
        }
        Command::Call {
            app_id, capability, ..
        } => call(&client, app_id, capability, body).await,
        Command::Tenants { action } => tenants(&client, action, body).await,
        Command::Run
        | Command::CheckConfig
        | Command::Doctor
        | Command::Version
        | Command::Service { .. }
        | Command::Login { .. }
        | Command::Logout
        | Command::HashPassword { .. }
        | Command::PluginHost { .. }
        | Command::GroupReaper => Ok(exit::USAGE),
    };
    result.unwrap_or_else(|e| {
        tell_client_error(config, &e);
        exit::UNREACHABLE
    })
}

/// Tells a client error; for an agent that does not answer, whether one runs on the state
/// folder at all: "cannot reach" alone would send the admin to start a second one, when the
/// one running listens elsewhere (another config) or is not listening yet (it binds its API
/// a moment after it takes the folder).
fn tell_client_error(config: &Config, e: &ClientError) {
    tell!("lumos-agent: {e}");
    if !matches!(e, ClientError::Unreachable { .. }) {
        return;
    }
    let state = StatePaths::new(config.state_dir.clone());
    let dir = config.state_dir.display();
    match crate::platform::lock_state(&state.lock_file()) {
        crate::platform::LockState::Held(holder) => {
            let pid = holder
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            tell!(
                "note: an agent{pid} runs on the state folder {dir}, but does not answer on \
                 api.listen = {}: it listens elsewhere (was it started with another config, \
                 --listen or LUMOS_AGENT_API__LISTEN?), or has only just started",
                config.api.listen
            );
        }
        crate::platform::LockState::Free => tell!(
            "note: no agent runs on the state folder {dir} (`lumos-agent run`, or `systemctl \
             start lumos-agent`)"
        ),
        crate::platform::LockState::Unknown => {}
    }
}

/// Maps an API answer to an exit code, printing errors.
fn check_status(status: StatusCode, body: &[u8]) -> Option<u8> {
    if status == StatusCode::UNAUTHORIZED {
        tell!(
            "lumos-agent: the agent refused the API token: {} (a token from `lumos-agent login`, \
             --token-file, or <state_dir>/admin.token of the same state folder as the running agent)",
            error_message(body)
        );
        return Some(exit::UNAUTHORIZED);
    }
    if status == StatusCode::FORBIDDEN {
        tell!("lumos-agent: not allowed: {}", error_message(body));
        return Some(exit::UNAUTHORIZED);
    }
    if !status.is_success() {
        tell!("lumos-agent: {status}: {}", error_message(body));
        return Some(exit::CALL_ERROR);
    }
    None
}

/// `plugins_dir`: the folder this command's config names, for the hint under an empty list.
async fn connectors(
    client: &ApiClient,
    app_id: Option<&str>,
    json: bool,
    plugins_dir: &Path,
) -> Result<u8, ClientError> {
    let path = match app_id {
        Some(id) => crate::client::v1_path(&["connectors", id]),
        None => "/v1/connectors".to_string(),
    };
    // Files dropped in whose connectors are not listed yet, with what each load is doing,
    // read *before* the list: a load that ends between the two reads is then in both (shown
    // once more as loading), where read after it, it would be in neither. (An agent that
    // cannot say, an older one, lists what it has.)
    let loading: Vec<Value> = if json || app_id.is_some() {
        Vec::new()
    } else {
        match client.send(Method::GET, "/v1/status", None).await {
            Ok((StatusCode::OK, body)) => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|status| status["loading"].as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    };
    let (status, body) = client.send(Method::GET, &path, None).await?;
    if let Some(code) = check_status(status, &body) {
        return Ok(code);
    }
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if json || app_id.is_some() {
        say!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    let rows = value.as_array().cloned().unwrap_or_default();
    if rows.is_empty() && loading.is_empty() {
        // On stderr: the listing itself stays a header and no rows, for scripts.
        tell!(
            "lumos-agent: no connectors yet; drop connector files into the agent's plugins \
             folder ({}, `plugins_dir`): they load within seconds",
            plugins_dir.display()
        );
    }
    say!(
        "{:<28} {:<10} {:<11} {:<10} DETAIL",
        "APP_ID",
        "VERSION",
        "KIND",
        "STATUS"
    );
    for row in rows {
        let file = row["path"]
            .as_str()
            .and_then(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let name = row["app_id"]
            .as_str()
            .map(str::to_owned)
            .or(file.clone())
            .unwrap_or_default();
        let detail = match row["reason"].as_str() {
            Some(reason) => format!("{}: {reason}", file.unwrap_or_default()),
            None => match row["capabilities"].as_array() {
                Some(c) if !c.is_empty() => c
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                // Served, but nothing can be called: say so rather than leave it blank.
                _ => "(no capabilities)".to_string(),
            },
        };
        say!(
            "{:<28} {:<10} {:<11} {:<10} {detail}",
            name,
            row["version"].as_str().unwrap_or("-"),
            row["kind"].as_str().unwrap_or("-"),
            row["status"].as_str().unwrap_or("-"),
        );
    }
    // A listed file may have a loading row too: its replacement, being checked.
    for load in &loading {
        say!(
            "{:<28} {:<10} {:<11} {:<10} {} ({}s)",
            load["file"].as_str().unwrap_or("?"),
            "-",
            "-",
            "loading",
            load["doing"].as_str().unwrap_or("?"),
            load["seconds"].as_u64().unwrap_or(0)
        );
    }
    Ok(exit::OK)
}

/// The text of `path`, or of stdin for `-`. Stdin at a terminal is read to its end too, which
/// looks like a hang to whoever does not know it: they are told how to end it.
fn read_input(path: &Path) -> std::io::Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    if path == Path::new("-") {
        let stdin = std::io::stdin();
        if std::io::IsTerminal::is_terminal(&stdin) {
            let end = if cfg!(windows) {
                "Ctrl-Z, then Enter"
            } else {
                "Ctrl-D"
            };
            tell!(
                "lumos-agent: reading from the terminal until {end} on a line of its own (what \
                 is typed shows: for secrets, prefer a file or a pipe)"
            );
        }
        stdin.lock().read_to_string(&mut text)?;
    } else {
        std::fs::File::open(path)?.read_to_string(&mut text)?;
    }
    Ok(text)
}

/// How a file argument is named in a message: `-` is standard input.
fn input_name(path: &Path) -> String {
    if path == Path::new("-") {
        "(standard input)".to_string()
    } else {
        path.display().to_string()
    }
}

/// [`read_input`] for a command's file argument; a file that cannot be read is told, as the
/// usage exit code `Err` carries.
fn read_argument_file(path: &Path) -> Result<Zeroizing<String>, u8> {
    read_input(path).map_err(|e| {
        tell!("lumos-agent: cannot read {}: {e}", input_name(path));
        exit::USAGE
    })
}

/// The body of a `call`: `--json`, `--json-file` (`-` for stdin) or `{}`, with the tenant and
/// the timeout put in. A body that is not a JSON object is told (where it breaks, never its
/// text: it may hold secrets) as the exit code `Err` carries.
fn call_body(
    tenant: Option<&str>,
    json: Option<&str>,
    json_file: Option<&Path>,
    timeout_secs: Option<u64>,
) -> Result<Zeroizing<Vec<u8>>, u8> {
    let text = match (json, json_file) {
        (Some(text), _) => Zeroizing::new(text.to_string()),
        (None, Some(path)) => read_argument_file(path)?,
        (None, None) => Zeroizing::new("{}".to_string()),
    };
    let mut body: Map<String, Value> = match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => map,
        // (serde_json's words give a position, never the text: the body may hold secrets.)
        Err(e) => {
            tell!("lumos-agent: the call body is not JSON ({e}); expected an object like {{\"request\": {{}}, \"settings\": {{}}}}");
            return Err(exit::USAGE);
        }
        Ok(_) => {
            tell!("lumos-agent: the call body must be a JSON object like {{\"request\": {{}}, \"settings\": {{}}}}");
            return Err(exit::USAGE);
        }
    };
    if let Some(tenant) = tenant {
        body.insert("tenant_id".into(), Value::String(tenant.to_string()));
    }
    if let Some(secs) = timeout_secs {
        body.insert("timeout_secs".into(), Value::from(secs));
    }
    Ok(Zeroizing::new(
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

async fn call(
    client: &ApiClient,
    app_id: &str,
    capability: &str,
    payload: Zeroizing<Vec<u8>>,
) -> Result<u8, ClientError> {
    let (status, answer) = client
        .send(
            Method::POST,
            &crate::client::v1_path(&["connectors", app_id, capability]),
            Some(payload.to_vec()),
        )
        .await?;
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Ok(check_status(status, &answer).unwrap_or(exit::UNAUTHORIZED));
    }
    // The answer is printed verbatim whatever it is: it is the connector's (or the agent's) JSON.
    say!("{}", String::from_utf8_lossy(&answer).trim_end());
    let is_error = !status.is_success()
        || serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v.get("is_error").and_then(Value::as_bool))
            == Some(true);
    Ok(if is_error { exit::CALL_ERROR } else { exit::OK })
}

/// The body of `tenants put`: the app_id, `--settings` (a JSON object) and the JSON of
/// `--auth-file` or `--credentials-file` (`-` for stdin). A fault is told (where a file's JSON
/// breaks, never its text: it holds secrets) as the exit code `Err` carries.
fn tenant_body(
    app_id: &str,
    settings: Option<&str>,
    auth_file: Option<&Path>,
    credentials_file: Option<&Path>,
) -> Result<Zeroizing<Vec<u8>>, u8> {
    let mut body = Map::new();
    body.insert("app_id".into(), Value::String(app_id.to_string()));
    if let Some(settings) = settings {
        match serde_json::from_str::<Value>(settings) {
            Ok(v @ Value::Object(_)) => {
                body.insert("settings".into(), v);
            }
            _ => {
                tell!("lumos-agent: --settings must be a JSON object");
                return Err(exit::USAGE);
            }
        }
    }
    for (key, file) in [("auth", auth_file), ("credentials", credentials_file)] {
        let Some(file) = file else { continue };
        let text = read_argument_file(file)?;
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => {
                body.insert(key.into(), v);
            }
            Err(e) => {
                tell!(
                    "lumos-agent: --{key}-file {} is not JSON: {e}",
                    input_name(file)
                );
                return Err(exit::USAGE);
            }
        }
    }
    Ok(Zeroizing::new(
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

async fn put_tenant(
    client: &ApiClient,
    tenant_id: &str,
    app_id: &str,
    body: Zeroizing<Vec<u8>>,
) -> Result<u8, ClientError> {
    let (status, answer) = client
        .send(
            Method::PUT,
            &crate::client::v1_path(&["tenants", tenant_id]),
            Some(body.to_vec()),
        )
        .await?;
    if let Some(code) = check_status(status, &answer) {
        return Ok(code);
    }
    say!("stored tenant {tenant_id} for {app_id}");
    // Advice from the agent (no connector for the app_id yet, credentials that do not match
    // what it declares): the tenant is stored either way.
    let view = serde_json::from_slice::<Value>(&answer).unwrap_or(Value::Null);
    for note in crate::client::tenant_notes(&view) {
        say!("note: {note}");
    }
    Ok(exit::OK)
}

/// A tenants command; `put_body` is what `put` sends, checked before the token was read.
async fn tenants(
    client: &ApiClient,
    action: &TenantsCommand,
    put_body: Zeroizing<Vec<u8>>,
) -> Result<u8, ClientError> {
    match action {
        TenantsCommand::Put {
            tenant_id, app_id, ..
        } => put_tenant(client, tenant_id, app_id, put_body).await,
        TenantsCommand::List { json } => {
            let (status, answer) = client.send(Method::GET, "/v1/tenants", None).await?;
            if let Some(code) = check_status(status, &answer) {
                return Ok(code);
            }
            let value: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            if *json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
                return Ok(exit::OK);
            }
            let tenants = value.as_array().map_or(&[][..], Vec::as_slice);
            if tenants.is_empty() {
                // On stderr, like the connectors' hint: the listing stays the header alone.
                tell!(
                    "lumos-agent: no agent-held tenants (calls from the cloud bring their own \
                     credentials); store one with `lumos-agent tenants put <tenant> --app-id \
                     <app_id> --auth-file -`"
                );
            }
            say!(
                "{:<24} {:<28} {:<16} SETTINGS",
                "TENANT",
                "APP_ID",
                "SECRETS"
            );
            for t in tenants {
                let secrets = if !t["auth"].is_null() {
                    "auth"
                } else if !t["credentials"].is_null() {
                    "credentials"
                } else {
                    "-"
                };
                say!(
                    "{:<24} {:<28} {:<16} {}",
                    t["tenant_id"].as_str().unwrap_or(""),
                    t["app_id"].as_str().unwrap_or(""),
                    secrets,
                    t["settings"]
                );
            }
            // Against the connectors loaded now, which may have changed since the tenants were
            // stored. On stderr, so that the table stays the table.
            for t in tenants {
                for note in crate::client::tenant_notes(t) {
                    tell!(
                        "note: tenant {}: {note}",
                        t["tenant_id"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(exit::OK)
        }
        TenantsCommand::Delete { tenant_id } => {
            let (status, answer) = client
                .send(
                    Method::DELETE,
                    &crate::client::v1_path(&["tenants", tenant_id]),
                    None,
                )
                .await?;
            if let Some(code) = check_status(status, &answer) {
                return Ok(code);
            }
            say!("deleted tenant {tenant_id}");
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// `--timeout-secs 0` would be no deadline of the caller's at all (the API reads 0 as
    /// "none given"), the opposite of what it says: refused before anything is sent.
    #[test]
    fn a_call_timeout_of_zero_is_refused() {
        let args = |secs: &'static str| {
            [
                "lumos-agent",
                "call",
                "app",
                "cap",
                "--json",
                "{}",
                "--timeout-secs",
                secs,
            ]
        };
        let err = super::Cli::try_parse_from(args("0"))
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("--timeout-secs")),
            "{err:?}"
        );
        assert!(super::Cli::try_parse_from(args("1")).is_ok());
    }

    /// The README's command-line summary is what an admin reads first: it names every command
    /// the binary has (hidden ones aside) and each of their options, so a new one is not
    /// left out of it.
    #[test]
    fn the_readme_summary_shows_every_command_and_option() {
        let summary =
            crate::readme::fenced_blocks(crate::readme::from("## Command line"), "text")[0];
        // Whether `option` is a word of `text` (`[--dev]`, `--json-file F|-`).
        let shows = |text: &str, option: &str| {
            text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .any(|word| word == option)
        };
        let options = |command: &clap::Command| -> Vec<String> {
            command
                .get_arguments()
                .filter(|arg| !arg.is_hide_set() && !arg.is_global_set())
                .filter_map(|arg| arg.get_long())
                .filter(|long| !matches!(*long, "help" | "version"))
                .map(|long| format!("--{long}"))
                .collect()
        };
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        let usage = summary.lines().next().unwrap_or_default();
        for global in cli.get_arguments().filter(|arg| arg.is_global_set()) {
            if let Some(long) = global.get_long() {
                if !shows(usage, &format!("--{long}")) {
                    missing.push(format!("global --{long}"));
                }
            }
        }
        for command in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
            let name = command.get_name();
            // Its lines: `name` alone, or followed by its arguments.
            let lines: Vec<&str> = summary
                .lines()
                .map(str::trim_start)
                .filter(|line| line.split_whitespace().next() == Some(name))
                .collect();
            if lines.is_empty() {
                missing.push(name.to_string());
                continue;
            }
            let text = lines.join("\n");
            let mut wanted = options(command);
            for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
                let sub_name = sub.get_name();
                if !text
                    .split(|c: char| c.is_whitespace() || c == '|')
                    .any(|w| w == sub_name)
                {
                    missing.push(format!("{name} {sub_name}"));
                }
                wanted.extend(options(sub));
            }
            for option in wanted {
                if !shows(&text, &option) {
                    missing.push(format!("{name} {option}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "the README's command-line summary does not show: {missing:?}"
        );
    }
}
