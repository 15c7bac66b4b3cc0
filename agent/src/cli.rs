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
    /// Check the config, folders and permissions, the running agent and each connector, and
    /// the path to the cloud (DNS, TCP, proxy, TLS, clock); non-zero exit if anything is wrong.
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
        /// A deadline shorter than the connector's configured one.
        #[arg(long)]
        timeout_secs: Option<u64>,
    },
    /// Manage agent-held tenants (settings and credentials that never leave this network).
    Tenants {
        /// put, list or delete.
        #[command(subcommand)]
        action: TenantsCommand,
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
        eprintln!("lumos-agent: {e}");
        if matches!(e, ConfigError::Invalid(_)) {
            eprintln!("(run `lumos-agent check-config` after fixing to verify)");
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
            println!("lumos-agent {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        Command::CheckConfig => check_config(cli),
        Command::Doctor => block_on(crate::doctor::run(
            &cli.overrides(),
            &mut std::io::stdout().lock(),
        )),
        Command::Service { action } => service(cli, *action),
        command => {
            let config = match load_config(cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            block_on(client_command(&config, command))
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
            eprintln!("lumos-agent: cannot start a runtime: {e}");
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
                println!("service {}: {done}", winservice::SERVICE_NAME);
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("lumos-agent: {e}");
            exit::STARTUP
        }
    }
}

#[cfg(not(windows))]
fn service(_cli: &Cli, action: ServiceCommand) -> u8 {
    let _ = action;
    eprintln!("lumos-agent: `service` manages the Windows service; on Linux the systemd unit runs the agent (`systemctl enable --now lumos-agent`, see README)");
    exit::USAGE
}

fn check_config(cli: &Cli) -> u8 {
    match config::load(&cli.overrides()) {
        Ok(cfg) => {
            println!("config OK ({})", cfg.origin);
            println!("  plugins_dir  {}", cfg.plugins_dir.display());
            println!("  state_dir    {}", cfg.state_dir.display());
            println!("  api.listen   {}", cfg.api.listen);
            println!(
                "  calls        timeout {:?}, {} at once per connector",
                cfg.calls.timeout, cfg.calls.max_concurrency
            );
            match &cfg.cloud {
                None => println!("  cloud        none (standalone: the local API only)"),
                Some(cloud) => {
                    println!("  cloud        {}", cloud.endpoint);
                    // Not a config error: the file may be provisioned after the config, and
                    // the tunnel reads it again on every attempt. But the admin who runs this
                    // wants to know now, not from the log after the start.
                    if let Err(e) = crate::tunnel::read_token(&cloud.token_file) {
                        println!("  warning: {e}; until then the agent does not connect");
                    }
                }
            }
            if !cfg.plugins_dir.is_dir() {
                println!(
                    "  note: the plugins folder does not exist yet; the agent creates it at start"
                );
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("lumos-agent: {e}");
            exit::CONFIG
        }
    }
}

async fn client_command(config: &Config, command: &Command) -> u8 {
    let token_file = StatePaths::new(config.state_dir.clone()).admin_token();
    let client = match ApiClient::new(config.api.listen, &token_file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lumos-agent: {e}");
            return exit::UNREACHABLE;
        }
    };
    let result = match command {
        Command::Connectors { app_id, json } => connectors(&client, app_id.as_deref(), *json).await,
        Command::Call {
            app_id,
            capability,
            tenant,
            json,
            json_file,
            timeout_secs,
        } => {
            call(
                &client,
                app_id,
                capability,
                tenant.as_deref(),
                json.as_deref(),
                json_file.as_deref(),
                *timeout_secs,
            )
            .await
        }
        Command::Tenants { action } => tenants(&client, action).await,
        Command::Run
        | Command::CheckConfig
        | Command::Doctor
        | Command::Version
        | Command::Service { .. }
        | Command::PluginHost { .. }
        | Command::GroupReaper => Ok(exit::USAGE),
    };
    result.unwrap_or_else(|e| {
        eprintln!("lumos-agent: {e}");
        exit::UNREACHABLE
    })
}

/// Maps an API answer to an exit code, printing errors.
fn check_status(status: StatusCode, body: &[u8]) -> Option<u8> {
    if status == StatusCode::UNAUTHORIZED {
        eprintln!("lumos-agent: the agent refused the API token (is this the same state folder as the running agent?)");
        return Some(exit::UNAUTHORIZED);
    }
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        eprintln!("lumos-agent: {status}: {message}");
        return Some(exit::CALL_ERROR);
    }
    None
}

async fn connectors(
    client: &ApiClient,
    app_id: Option<&str>,
    json: bool,
) -> Result<u8, ClientError> {
    let path = match app_id {
        Some(id) => format!("/v1/connectors/{id}"),
        None => "/v1/connectors".to_string(),
    };
    let (status, body) = client.send(Method::GET, &path, None).await?;
    if let Some(code) = check_status(status, &body) {
        return Ok(code);
    }
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if json || app_id.is_some() {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    let rows = value.as_array().cloned().unwrap_or_default();
    println!(
        "{:<28} {:<10} {:<11} {:<10} DETAIL",
        "APP_ID", "VERSION", "KIND", "STATUS"
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
            None => row["capabilities"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
        };
        println!(
            "{:<28} {:<10} {:<11} {:<10} {detail}",
            name,
            row["version"].as_str().unwrap_or("-"),
            row["kind"].as_str().unwrap_or("-"),
            row["status"].as_str().unwrap_or("-"),
        );
    }
    Ok(exit::OK)
}

fn read_input(path: &Path) -> std::io::Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        std::fs::File::open(path)?.read_to_string(&mut text)?;
    }
    Ok(text)
}

async fn call(
    client: &ApiClient,
    app_id: &str,
    capability: &str,
    tenant: Option<&str>,
    json: Option<&str>,
    json_file: Option<&Path>,
    timeout_secs: Option<u64>,
) -> Result<u8, ClientError> {
    let text = match (json, json_file) {
        (Some(text), _) => Zeroizing::new(text.to_string()),
        (None, Some(path)) => match read_input(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("lumos-agent: cannot read {}: {e}", path.display());
                return Ok(exit::USAGE);
            }
        },
        (None, None) => Zeroizing::new("{}".to_string()),
    };
    let mut body: Map<String, Value> = match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => map,
        _ => {
            eprintln!("lumos-agent: the call body must be a JSON object like {{\"request\": {{}}, \"settings\": {{}}}}");
            return Ok(exit::USAGE);
        }
    };
    if let Some(tenant) = tenant {
        body.insert("tenant_id".into(), Value::String(tenant.to_string()));
    }
    if let Some(secs) = timeout_secs {
        body.insert("timeout_secs".into(), Value::from(secs));
    }
    let payload = serde_json::to_vec(&body).unwrap_or_default();
    let (status, answer) = client
        .send(
            Method::POST,
            &format!("/v1/connectors/{app_id}/{capability}"),
            Some(payload),
        )
        .await?;
    if status == StatusCode::UNAUTHORIZED {
        return Ok(check_status(status, &answer).unwrap_or(exit::UNAUTHORIZED));
    }
    // The answer is printed verbatim whatever it is: it is the connector's (or the agent's) JSON.
    println!("{}", String::from_utf8_lossy(&answer).trim_end());
    let is_error = !status.is_success()
        || serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v.get("is_error").and_then(Value::as_bool))
            == Some(true);
    Ok(if is_error { exit::CALL_ERROR } else { exit::OK })
}

async fn tenants(client: &ApiClient, action: &TenantsCommand) -> Result<u8, ClientError> {
    match action {
        TenantsCommand::Put {
            tenant_id,
            app_id,
            settings,
            auth_file,
            credentials_file,
        } => {
            let mut body = Map::new();
            body.insert("app_id".into(), Value::String(app_id.clone()));
            if let Some(settings) = settings {
                match serde_json::from_str::<Value>(settings) {
                    Ok(v @ Value::Object(_)) => {
                        body.insert("settings".into(), v);
                    }
                    _ => {
                        eprintln!("lumos-agent: --settings must be a JSON object");
                        return Ok(exit::USAGE);
                    }
                }
            }
            for (key, file) in [("auth", auth_file), ("credentials", credentials_file)] {
                let Some(file) = file else { continue };
                let text = match read_input(file) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("lumos-agent: cannot read {}: {e}", file.display());
                        return Ok(exit::USAGE);
                    }
                };
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) => {
                        body.insert(key.into(), v);
                    }
                    Err(e) => {
                        eprintln!("lumos-agent: {} is not JSON: {e}", file.display());
                        return Ok(exit::USAGE);
                    }
                }
            }
            let payload = Zeroizing::new(serde_json::to_vec(&body).unwrap_or_default());
            let (status, answer) = client
                .send(
                    Method::PUT,
                    &format!("/v1/tenants/{tenant_id}"),
                    Some(payload.to_vec()),
                )
                .await?;
            if let Some(code) = check_status(status, &answer) {
                return Ok(code);
            }
            println!("stored tenant {tenant_id} for {app_id}");
            // Tenants may be stored before their connector is dropped in, so this is no error;
            // but a mistyped app_id would otherwise show only at the first call. Advice only:
            // the tenant is stored, so a failure to ask does not fail the command.
            let asked = client
                .send(Method::GET, &format!("/v1/connectors/{app_id}"), None)
                .await;
            if matches!(asked, Ok((StatusCode::NOT_FOUND, _))) {
                println!(
                    "note: no connector with app_id {app_id:?} is loaded (yet); calls for this \
                     tenant need one (`lumos-agent connectors` lists them)"
                );
            }
            Ok(exit::OK)
        }
        TenantsCommand::List { json } => {
            let (status, answer) = client.send(Method::GET, "/v1/tenants", None).await?;
            if let Some(code) = check_status(status, &answer) {
                return Ok(code);
            }
            let value: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
                return Ok(exit::OK);
            }
            println!(
                "{:<24} {:<28} {:<16} SETTINGS",
                "TENANT", "APP_ID", "SECRETS"
            );
            for t in value.as_array().cloned().unwrap_or_default() {
                let secrets = if !t["auth"].is_null() {
                    "auth"
                } else if !t["credentials"].is_null() {
                    "credentials"
                } else {
                    "-"
                };
                println!(
                    "{:<24} {:<28} {:<16} {}",
                    t["tenant_id"].as_str().unwrap_or(""),
                    t["app_id"].as_str().unwrap_or(""),
                    secrets,
                    t["settings"]
                );
            }
            Ok(exit::OK)
        }
        TenantsCommand::Delete { tenant_id } => {
            let (status, answer) = client
                .send(Method::DELETE, &format!("/v1/tenants/{tenant_id}"), None)
                .await?;
            if let Some(code) = check_status(status, &answer) {
                return Ok(code);
            }
            println!("deleted tenant {tenant_id}");
            Ok(exit::OK)
        }
    }
}
