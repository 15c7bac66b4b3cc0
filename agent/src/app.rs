//! The running agent: state folder, plugin registry, tenant store, dispatcher and local API,
//! started in-process (tests do exactly what `main` does) and stopped through [`Control`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::config::{Config, ConfigSource, SharedConfig};
use crate::dispatch::Dispatcher;
use crate::exec::ScratchDir;
use crate::metrics::Metrics;
use crate::plugins::reload::{watch_loop, Reconciler, Scan, WatchSettings};
use crate::plugins::{PluginLoader, PluginRegistry};
use crate::state::{admin_token_in_force, StatePaths};
use crate::tenants::{TenantStore, TenantStoreError};

/// What the outside world (signals, a service manager, a test) asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the plugins folder (SIGHUP).
    Reload,
    /// Stop taking calls, finish in-flight ones within the grace period, exit (SIGTERM, SIGINT).
    Shutdown,
    /// Stop now: in-flight calls are cancelled and their processes killed (a second signal).
    Quit,
}

/// A stop asked for on the control channel, during a reload or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopRequest {
    /// [`Control::Shutdown`], or nobody left to ask: drain.
    Drain,
    /// [`Control::Quit`].
    Quit,
    /// Not asked for: a supervised task failed (see [`RunningAgent::supervise`]).
    Failed,
}

impl StopRequest {
    /// The stop a control message asks for, if any (`None` for a reload).
    fn of(message: Option<Control>) -> Option<Self> {
        match message {
            Some(Control::Reload) => None,
            Some(Control::Shutdown) | None => Some(Self::Drain),
            Some(Control::Quit) => Some(Self::Quit),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every in-flight call finished.
    Drained,
    /// The grace period ran out; the remaining calls were cancelled.
    GraceExpired,
    /// Asked to quit at once.
    Quit,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state folder cannot be set up.
    #[error("cannot prepare the state folder {path}: {source}")]
    State {
        /// The folder.
        path: PathBuf,
        /// The OS's words.
        source: std::io::Error,
    },
    /// Another agent runs with the same state folder.
    #[error(
        "another lumos-agent{} is running with the state folder {path}: stop it first (`systemctl \
         stop lumos-agent`, or the service), or give this one a state folder of its own \
         (--state-dir)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    StateInUse {
        /// The folder.
        path: PathBuf,
        /// The other agent's process id, where the system tells it.
        holder: Option<u32>,
    },
    /// The tenant store cannot be opened.
    #[error(transparent)]
    Tenants(#[from] TenantStoreError),
    /// The tunnel to the cloud cannot be set up (agent id, trust store).
    #[error("cannot set up the tunnel to the Lumos cloud: {0}")]
    Tunnel(#[from] crate::tunnel::TunnelSetupError),
    /// The OAuth token client cannot be set up (the system trust store).
    #[error("cannot set up the OAuth token client: {0}")]
    TokenClient(crate::tunnel::transport::TransportError),
    /// A stop was asked for while the plugins folder was first scanned (see
    /// [`RunningAgent::start_until`]): not a failure.
    #[error("stopped before the agent was ready (while its plugins folder was first scanned)")]
    Stopped,
    /// The API address cannot be bound.
    #[error("cannot listen on {addr}: {source} (set api.listen or --listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS's words.
        source: std::io::Error,
    },
}

/// How long one token request may take in all (connect, TLS, answer).
const TOKEN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A long-lived task ended by itself (a panic, or a loop that returned): the agent cannot go on
/// safely, so it stops in order and exits with [`crate::exit::INTERNAL`].
#[derive(Debug, thiserror::Error)]
#[error("supervised task {0} stopped unexpectedly")]
pub struct TaskFailed(pub &'static str);

/// A started agent.
pub struct RunningAgent {
    /// Where the local API listens (useful with port 0).
    pub api_addr: SocketAddr,
    /// The connectors.
    pub registry: Arc<PluginRegistry>,
    /// The agent-held tenants.
    pub tenants: Arc<TenantStore>,
    /// The file holding the admin bearer token.
    pub admin_token_path: PathBuf,
    /// The local API's users and sessions (a reload replaces the users).
    api_auth: Arc<crate::auth::ApiAuth>,
    config: Arc<SharedConfig>,
    config_source: Option<ConfigSource>,
    reconciler: Arc<Reconciler>,
    draining: CancellationToken,
    abort: CancellationToken,
    failed: CancellationToken,
    failed_task: Arc<std::sync::Mutex<Option<&'static str>>>,
    tracker: TaskTracker,
    /// The tunnel's calls and outbox: what is unacknowledged at the end is kept on disk.
    calls: Arc<crate::tunnel::calls::CallTable>,
    outbox_dir: PathBuf,
    cloud: tokio::sync::watch::Receiver<crate::tunnel::CloudStatus>,
    /// The latest period's call summary, for the service manager's status line.
    call_summary: tokio::sync::watch::Receiver<Option<String>>,
    /// The `[cloud]` settings in force; a reload that changes them replaces the tunnel.
    cloud_settings: tokio::sync::watch::Sender<Option<crate::config::CloudConfig>>,
    /// `log.connector_log_days` in force; a reload that changes it makes the retention task
    /// pass at once.
    connector_log_days: tokio::sync::watch::Sender<u32>,
    /// The state folder is this agent's until it is dropped (`None` on a filesystem without
    /// locks).
    _state_lock: Option<crate::platform::ExclusiveLock>,
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("api_addr", &self.api_addr)
            .field("config", &self.config.get())
            .finish_non_exhaustive()
    }
}

impl RunningAgent {
    /// Prepares the state folder, loads every plugin, opens the tenant store and starts the
    /// API. Bad plugins never stop this; only an unusable state folder or address does.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_until(config, &CancellationToken::new()).await
    }

    /// [`start`](Self::start), but `stop` cancelled while the plugins folder is first scanned
    /// ends the start with [`StartError::Stopped`]: a connector whose `info` hangs would hold
    /// a stop (and a Ctrl-C) up to `plugins.info_timeout_secs`. The scan is the one wait that
    /// long; nothing of the last run's calls or results has been read before it, so dropping it
    /// loses nothing (its loads are abandoned, their `info` killed).
    pub async fn start_until(config: Config, stop: &CancellationToken) -> Result<Self, StartError> {
        let shared = SharedConfig::new(config);
        let config = shared.get();
        let state = StatePaths::new(config.state_dir.clone());
        let state_err = |source| StartError::State {
            path: config.state_dir.clone(),
            source,
        };
        state.prepare().map_err(state_err)?;
        // Before anything in the folder is read or written.
        let state_lock = match state.lock() {
            Ok(Ok(lock)) => Some(lock),
            Ok(Err(holder)) => {
                return Err(StartError::StateInUse {
                    path: config.state_dir.clone(),
                    holder,
                })
            }
            // Not a reason to refuse to start, only to say what is no longer guarded.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    dir = %config.state_dir.display(),
                    "cannot lock the state folder: {e}; make sure no other agent uses it"
                );
                None
            }
            Err(e) => return Err(state_err(e)),
        };
        let token = admin_token_in_force(&state.admin_token(), config.api.admin_token)
            .map_err(state_err)?;
        let scratch = ScratchDir::create(state.calls()).map_err(state_err)?;
        let store_key = crate::tenants::StoreKey::load_or_create(&state)?;
        let tenants = Arc::new(TenantStore::open(
            state.tenants(),
            store_key,
            &state.tenants_plaintext(),
        )?);

        if let Err(e) = std::fs::create_dir_all(&config.plugins_dir) {
            tracing::warn!(dir = %config.plugins_dir.display(), error = %e, "cannot create the plugins folder");
        }
        // Before any connector process starts.
        match crate::platform::agent_program(&config) {
            Ok(program) => crate::reaper::start(&program),
            Err(e) => {
                tracing::warn!(error = %e, "cannot find the agent binary to start the group reaper; if the agent is killed, connector processes it started may keep running")
            }
        }
        let registry = Arc::new(PluginRegistry::new());
        let abort = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let loader = PluginLoader::new(
            shared.clone(),
            state.clone(),
            abort.clone(),
            metrics.clone(),
        );
        let reconciler = Arc::new(Reconciler::new(
            loader,
            registry.clone(),
            shared.clone(),
            vec![state.store(), state.bundles()],
        ));
        // Before the first scan: no load of this run has started yet. (Off the runtime's
        // workers: a large bundle's half-unpacked folder takes a while to remove.)
        // Leftovers only cost disk space: a sweep that failed is logged, and the start goes on.
        if let Err(e) = tokio::task::spawn_blocking({
            let reconciler = reconciler.clone();
            move || reconciler.remove_unfinished()
        })
        .await
        {
            tracing::error!("the sweep of unfinished copies an earlier run left failed: {e}");
        }
        let listener = TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.api.listen,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.api.listen,
            source,
        })?;
        if !api_addr.ip().is_loopback() {
            tracing::warn!(%api_addr, "{}", crate::api::BEYOND_LOOPBACK);
        }

        let draining = CancellationToken::new();
        let tracker = TaskTracker::new();
        let broker = crate::oauth::broker::TokenBroker::new(
            crate::oauth::TokenClient::new(config.oauth.ca_file.as_deref(), TOKEN_REQUEST_TIMEOUT)
                .map_err(StartError::TokenClient)?,
            crate::oauth::broker::BrokerSettings::default(),
            crate::oauth::managed::persist_to(tenants.clone()),
        )
        .with_events(Arc::new(crate::oauth::managed::StoreEvents {
            store: tenants.clone(),
            metrics: metrics.clone(),
        }));
        let dispatcher = Dispatcher::new(
            registry.clone(),
            tenants.clone(),
            Arc::new(broker),
            scratch,
            shared.clone(),
            metrics.clone(),
        );
        let initial = if config.cloud.is_some() {
            crate::tunnel::CloudStatus::Connecting
        } else {
            crate::tunnel::CloudStatus::Standalone
        };
        metrics.set_cloud_status(initial.as_str());
        let cloud_status = Arc::new(tokio::sync::watch::Sender::new(initial));
        let calls = Arc::new(crate::tunnel::calls::CallTable::new(
            state.calls(),
            config
                .cloud
                .as_ref()
                .map_or(crate::config::DEFAULT_OUTBOX_MEMORY_BYTES, |c| {
                    c.outbox_memory_bytes
                }),
        ));
        let tunnel_parts = crate::tunnel::TunnelParts {
            state: state.clone(),
            dispatcher: dispatcher.clone(),
            registry: registry.clone(),
            table: calls.clone(),
            draining: draining.clone(),
            abort: abort.clone(),
            tracker: tracker.clone(),
            config: shared.clone(),
            status: cloud_status.clone(),
            metrics: metrics.clone(),
            refused_call_lines: Arc::new(crate::telemetry::LineThrottle::per_minute()),
        };
        // The first settings must work: a bad ca_file stops the start (a reload keeps the old).
        let first_tunnel = match &config.cloud {
            None => {
                tracing::info!("no cloud.endpoint configured: standalone mode, local API only");
                None
            }
            Some(cloud) => Some(crate::tunnel::TunnelContext::new(
                cloud.clone(),
                &tunnel_parts,
            )?),
        };
        let cloud_settings = tokio::sync::watch::Sender::new(config.cloud.clone());
        let connector_log_days = tokio::sync::watch::Sender::new(config.log.connector_log_days);
        let api_auth = Arc::new(crate::auth::ApiAuth::new(
            token.as_ref().map(|t| t.as_str()),
            &config.api,
        ));
        let starting = crate::api::StartProgress::new(reconciler.clone());
        let (summary_tx, call_summary_rx) = tokio::sync::watch::channel(None);
        let call_summary = call_summary_log(metrics.clone(), draining.clone(), summary_tx);
        let api_state = Arc::new(ApiState {
            dispatcher,
            metrics,
            registry: registry.clone(),
            tenants: tenants.clone(),
            auth: api_auth.clone(),
            abort: abort.clone(),
            draining: draining.clone(),
            cloud: cloud_status.subscribe(),
            calls: calls.clone(),
            starting: starting.clone(),
        });
        let agent = Self {
            cloud: cloud_status.subscribe(),
            call_summary: call_summary_rx,
            cloud_settings,
            connector_log_days,
            _state_lock: state_lock,
            api_addr,
            registry,
            tenants,
            admin_token_path: state.admin_token(),
            api_auth,
            config: shared,
            config_source: None,
            reconciler: reconciler.clone(),
            draining: draining.clone(),
            abort,
            failed: CancellationToken::new(),
            failed_task: Arc::default(),
            tracker: tracker.clone(),
            calls,
            outbox_dir: state.outbox(),
        };
        // The API serves from before the first scan: `/healthz` answers, and the rest says
        // what is loading (`agent.starting`) until it has ended.
        agent.supervise(
            "api",
            api::serve(
                listener,
                api_state,
                config.api.max_connections,
                draining.clone(),
                tracker.clone(),
            ),
        );
        if token.is_some() {
            tracing::info!(%api_addr, "local API listening; admin token in {}", agent.admin_token_path.display());
        } else {
            tracing::info!(%api_addr, "local API listening; no admin token (api.admin_token = false): users log in");
        }

        tracing::info!(dir = %config.plugins_dir.display(), "scanning the plugins folder");
        // At start every file is loaded, however recently it was written.
        let scan = crate::service::while_busy(reconciler.reconcile(Scan::Start), || {
            reconciler.progress("starting")
        });
        tokio::select! {
            _ = scan => {}
            () = stop.cancelled() => {
                tracing::info!("stop requested while the plugins folder was scanned; not starting");
                // The API's connections close (none holds a call: the API takes none yet).
                agent.draining.cancel();
                agent.tracker.close();
                agent.tracker.wait().await;
                return Err(StartError::Stopped);
            }
        }
        // Results the cloud had not acknowledged when the last run stopped go out first. Read
        // (and large ones copied) on a blocking thread.
        {
            let (calls, dir) = (agent.calls.clone(), state.outbox());
            let restored = tokio::task::spawn_blocking(move || {
                crate::tunnel::outbox::restore(&calls, &dir);
                // After the kept results, so that only calls without one are interrupted.
                crate::tunnel::journal::open(&calls, &dir);
            })
            .await;
            if let Err(e) = restored {
                tracing::error!(error = %e, "reading the kept results of the last run failed; they stay on disk");
            }
        }
        starting.finish();
        let inventory = agent.registry.snapshot();
        tracing::info!(
            revision = inventory.revision,
            ready = inventory.ready_count(),
            total = inventory.connectors.len(),
            "plugins loaded"
        );

        let watch = WatchSettings {
            watch: config.plugins.watch,
            debounce: config.plugins.debounce,
            rescan_interval: config.plugins.rescan_interval,
        };
        agent.supervise(
            "plugins-watch",
            watch_loop(reconciler, watch, draining.clone()),
        );
        agent.supervise(
            "tunnel",
            crate::tunnel::supervise(tunnel_parts, first_tunnel, agent.cloud_settings.subscribe()),
        );
        agent.supervise("call-summary", call_summary);
        agent.supervise(
            "connector-log-retention",
            connector_log_retention(
                state.connector_logs(),
                agent.connector_log_days.subscribe(),
                draining.clone(),
            ),
        );
        Ok(agent)
    }

    /// What the service manager's status line is made of, each part kept current by its owner.
    fn status_sources(&self) -> crate::service::StatusSources {
        crate::service::StatusSources {
            registry: self.registry.clone(),
            cloud: self.cloud.clone(),
            calls: self.call_summary.clone(),
            api: self.api_addr,
        }
    }

    /// Runs a long-lived task; if it panics or returns before shutdown, the agent stops in order.
    fn supervise(
        &self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.tracker.spawn(task);
        let failed = self.failed.clone();
        let draining = self.draining.clone();
        let slot = self.failed_task.clone();
        tokio::spawn(async move {
            let outcome = handle.await;
            if draining.is_cancelled() && outcome.is_ok() {
                return;
            }
            match outcome {
                Err(e) if e.is_panic() => {
                    tracing::error!(task = name, "supervised task panicked; stopping the agent")
                }
                _ => tracing::error!(
                    task = name,
                    "supervised task ended unexpectedly; stopping the agent"
                ),
            }
            *slot.lock().expect("failure slot poisoned") = Some(name);
            failed.cancel();
        });
    }

    /// Re-reads the plugins folder; returns the new inventory revision.
    pub async fn rescan(&self) -> u64 {
        self.reconciler.reconcile(Scan::Reload).await;
        let inventory = self.registry.snapshot();
        tracing::info!(
            dir = %self.config.get().plugins_dir.display(),
            revision = inventory.revision,
            ready = inventory.ready_count(),
            "plugins folder rescanned"
        );
        inventory.revision
    }

    /// Where SIGHUP re-reads the configuration from (the same file, environment and flags as
    /// at start). Without one, SIGHUP only rescans the plugins folder.
    pub fn set_config_source(&mut self, source: ConfigSource) {
        self.config_source = Some(source);
    }

    /// SIGHUP: re-reads the configuration and applies what can change live; a configuration
    /// with errors is reported and the running one kept. Then rescans the plugins folder.
    pub async fn reload(&self) {
        if let Some(source) = &self.config_source {
            match source() {
                Err(e) => {
                    tracing::error!("configuration reload failed; still running the previous configuration. {e}");
                    crate::service::status("configuration reload failed: see the log; running the previous configuration");
                }
                Ok(new) => self.apply(new),
            }
        }
        // The allow-list, the keys or the strictness may have changed (the allow-list is a file
        // of its own, edited without a word to the agent): every file is judged again.
        self.reconciler.recheck_trust_next();
        self.rescan().await;
        // After the scan: the loads it waited for read their limits before the new ones were
        // in force, or after; either way they are set now.
        self.apply_call_limits();
    }

    /// Sets every loaded connector's call limits (`calls.max_concurrency`,
    /// `calls.timeout_secs`, their `[connectors.<app_id>]` overrides) to the configuration's,
    /// in place: the version serving now takes them, a retained one too, and its running calls
    /// are not cut short.
    fn apply_call_limits(&self) {
        let config = self.config.get();
        for connector in &self.registry.snapshot().connectors {
            let (Some(app_id), Some(runnable)) = (&connector.app_id, &connector.runnable) else {
                continue;
            };
            let (max, timeout) = (
                config.max_concurrency_for(app_id),
                config.timeout_for(app_id),
            );
            if runnable.limits.set(max, timeout) {
                tracing::info!(
                    app_id = %app_id,
                    file = %connector.path.file_name().unwrap_or_default().to_string_lossy(),
                    max_concurrency = max,
                    timeout_secs = timeout.as_secs(),
                    "call limits changed"
                );
            }
        }
    }

    /// [`Self::reload`], unless a stop comes first: the reload's rescan may wait for
    /// connectors' `info` up to `plugins.info_timeout_secs`, and a stop does not wait for it
    /// (the rescan is dropped whole, see [`Reconciler::reconcile`]; the configuration is
    /// applied before it). Returns the stop, if one came. A reload asked for meanwhile starts
    /// it again, reading the newest configuration.
    async fn reload_unless_stopped(
        &self,
        control: &mut mpsc::Receiver<Control>,
    ) -> Option<StopRequest> {
        loop {
            tokio::select! {
                () = crate::service::while_busy(self.reload(), || {
                    self.reconciler.progress("reloading")
                }) => return None,
                // A reload may wait for a connector's `info`: a failure is not left waiting.
                () = self.failed.cancelled() => return Some(StopRequest::Failed),
                message = control.recv() => if let Some(stop) = StopRequest::of(message) {
                    return Some(stop);
                },
            }
        }
    }

    fn apply(&self, new: Config) {
        let old = self.config.get();
        if *old == new {
            tracing::info!("configuration reloaded: nothing changed");
            return;
        }
        let mut applied: Vec<String> = Vec::new();
        let mut needs_restart = Vec::new();
        if new.log.level != old.log.level {
            match crate::telemetry::set_filter(&new.log.level) {
                Ok(()) => {
                    // Visible only if the new filter lets debug through: proof it took effect.
                    tracing::debug!(filter = %new.log.level, "log filter changed");
                    applied.push("log.level".to_string());
                }
                Err(e) => tracing::warn!("cannot change the log level live: {e}"),
            }
        }
        let folder_moved = new.plugins_dir != old.plugins_dir;
        if folder_moved {
            if let Err(e) = std::fs::create_dir_all(&new.plugins_dir) {
                tracing::warn!(dir = %new.plugins_dir.display(), error = %e, "cannot create the new plugins folder");
            }
            applied.push("plugins_dir".to_string());
        }
        // Settings fixed when a connector is loaded (its environment, its worker, the checks
        // of its file): load every connector again under the new ones.
        let (old_calls, new_calls) = (&old.calls, &new.calls);
        let reload_all = new_calls.max_output_bytes != old_calls.max_output_bytes
            || new_calls.connector_log_level != old_calls.connector_log_level
            || new_calls.pass_env != old_calls.pass_env
            || new.plugins.info_timeout != old.plugins.info_timeout
            || new.plugins.max_file_bytes != old.plugins.max_file_bytes
            || new.plugins.max_bundle_bytes != old.plugins.max_bundle_bytes
            || new.plugins.max_bundle_entries != old.plugins.max_bundle_entries
            || new.plugins.worker_program != old.plugins.worker_program;
        if reload_all {
            applied.push("calls and plugin limits (every connector reloaded)".to_string());
        }
        // Judged again at every reload (`recheck_trust_next`): only the files they may now
        // judge otherwise are loaded again.
        if new.plugins.strict_permissions != old.plugins.strict_permissions
            || new.plugins.lock_file != old.plugins.lock_file
            || new.plugins.signing_keys != old.plugins.signing_keys
        {
            applied.push("plugins trust checks (files judged again)".to_string());
        }
        // Read per call or per scan, or (the call limits) set in place on the loaded connectors
        // once the reload's scan is done (`apply_call_limits`).
        for (changed, key) in [
            (new_calls.timeout != old_calls.timeout, "calls.timeout_secs"),
            (
                new_calls.max_concurrency != old_calls.max_concurrency,
                "calls.max_concurrency",
            ),
            (
                new_calls.kill_grace != old_calls.kill_grace,
                "calls.kill_grace_secs",
            ),
            (
                new_calls.drain_grace != old_calls.drain_grace,
                "calls.drain_grace_secs",
            ),
            (
                new_calls.stderr_log_bytes != old_calls.stderr_log_bytes,
                "calls.stderr_log_bytes",
            ),
            (
                new.plugins.debounce != old.plugins.debounce,
                "plugins.debounce_ms",
            ),
        ] {
            if changed {
                applied.push(key.to_string());
            }
        }
        // `[connectors.<app_id>]`: its call limits apply in place; `in_process` (where the
        // connector runs) loads that connector again.
        let named: BTreeSet<&String> = old.connectors.keys().chain(new.connectors.keys()).collect();
        let mut moved = BTreeSet::new();
        for app_id in named {
            let (was, is) = (old.connectors.get(app_id), new.connectors.get(app_id));
            if was == is {
                continue;
            }
            if was.is_some_and(|o| o.in_process) != is.is_some_and(|o| o.in_process) {
                applied.push(format!("connectors.{app_id} (its connector reloaded)"));
                moved.insert(app_id.clone());
            } else {
                applied.push(format!("connectors.{app_id} (its call limits)"));
            }
        }
        for (changed, key) in [
            (new.state_dir != old.state_dir, "state_dir"),
            (new.api.listen != old.api.listen, "api.listen"),
            (
                new.api.max_connections != old.api.max_connections,
                "api.max_connections",
            ),
            (new.log.format != old.log.format, "log.format"),
            (new.oauth != old.oauth, "oauth.ca_file"),
            (new.plugins.watch != old.plugins.watch, "plugins.watch"),
            (
                new.plugins.rescan_interval != old.plugins.rescan_interval,
                "plugins.rescan_interval_secs",
            ),
        ] {
            if changed {
                needs_restart.push(key);
            }
        }
        if new.log.connector_log_days != old.log.connector_log_days {
            // The retention task passes again now: an admin who shortens it to free the disk
            // does not wait for the hour.
            self.connector_log_days
                .send_replace(new.log.connector_log_days);
            applied.push("log.connector_log_days".to_string());
        }
        if new.api.users != old.api.users
            || new.api.token_ttl != old.api.token_ttl
            || new.api.ldap != old.api.ldap
        {
            // Sessions of users removed or given another role (or of a changed directory's
            // users) end now.
            self.api_auth.configure(&new.api);
            applied.push("api.users, api.ldap and api.token_ttl_secs".to_string());
        }
        let mut admin_token = old.api.admin_token;
        if new.api.admin_token != old.api.admin_token {
            match admin_token_in_force(&self.admin_token_path, new.api.admin_token) {
                Ok(token) => {
                    self.api_auth
                        .set_admin_token(token.as_ref().map(|t| t.as_str()));
                    admin_token = new.api.admin_token;
                    applied.push("api.admin_token".to_string());
                }
                Err(e) => tracing::error!(
                    error = %e,
                    path = %self.admin_token_path.display(),
                    "api.admin_token changed, but its file cannot be changed; the admin token stays as it was"
                ),
            }
        }
        if new.cloud != old.cloud {
            // The tunnel supervisor reconnects with them; results not yet acknowledged are
            // kept and sent on the new stream.
            self.cloud_settings.send_replace(new.cloud.clone());
            applied.push("cloud (the tunnel reconnects)".to_string());
        }
        let mut kept = (*old).clone();
        // Settings that need a restart keep their running values, so what is in force stays
        // what is running.
        kept.log.level = new.log.level;
        kept.log.connector_log_days = new.log.connector_log_days;
        kept.api.users = new.api.users;
        kept.api.token_ttl = new.api.token_ttl;
        kept.api.ldap = new.api.ldap;
        kept.api.admin_token = admin_token;
        kept.plugins_dir = new.plugins_dir;
        kept.calls = new.calls;
        kept.connectors = new.connectors;
        kept.cloud = new.cloud;
        kept.plugins = crate::config::PluginsConfig {
            watch: old.plugins.watch,
            rescan_interval: old.plugins.rescan_interval,
            ..new.plugins
        };
        self.config.replace(kept);
        // Asked for once the configuration is in force: a reconcile that takes the request reads
        // the configuration after it (see `Reconciler::reconcile_pass`), so it loads under the
        // new one.
        if folder_moved {
            // The watch loop moves its watch to the new folder when it next looks: now.
            self.reconciler.follow_up();
        }
        if reload_all {
            self.reconciler.reload_all_next();
        }
        if !moved.is_empty() {
            self.reconciler.reload_next(moved);
        }
        tracing::info!(applied = ?applied, "configuration reloaded");
        if !needs_restart.is_empty() {
            tracing::warn!(
                "configuration reloaded, but these changes need a restart to take effect: {}",
                needs_restart.join(", ")
            );
        }
    }

    /// Runs until [`Control::Shutdown`] or [`Control::Quit`] (or a supervised task fails), then
    /// drains within `config.calls.drain_grace`. A second stop request during the drain quits.
    /// However it stops, the results the cloud has not acknowledged are kept on disk for the
    /// next start ([`crate::tunnel::outbox`]).
    pub async fn run(self, control: mpsc::Receiver<Control>) -> Result<Stopped, TaskFailed> {
        let calls = self.calls.clone();
        let dir = self.outbox_dir.clone();
        let stopped = self.serve(control).await;
        // Every call has finished or been cancelled by now, so the table no longer changes.
        let kept = tokio::task::spawn_blocking(move || {
            // The last acks, so that the next start does not count their calls interrupted.
            calls.flush_journal();
            crate::tunnel::outbox::save(&calls, &dir)
        })
        .await;
        if let Err(e) = kept {
            tracing::error!(error = %e, "keeping the unacknowledged results failed; they are lost");
        }
        stopped
    }

    async fn serve(self, mut control: mpsc::Receiver<Control>) -> Result<Stopped, TaskFailed> {
        let notifier_stop = self.draining.child_token();
        tokio::spawn(crate::service::run_notifier(
            self.status_sources(),
            notifier_stop,
        ));
        loop {
            tokio::select! {
                message = control.recv() => {
                    let stop = match message {
                        Some(Control::Reload) => {
                            crate::service::reloading();
                            let interrupted = self.reload_unless_stopped(&mut control).await;
                            // The status line again: a slow reload's "reloading: …" may be
                            // the last one sent.
                            crate::service::reloaded(&self.status_sources().line());
                            interrupted
                        }
                        other => StopRequest::of(other),
                    };
                    match stop {
                        None => {}
                        Some(StopRequest::Drain) => break,
                        Some(StopRequest::Quit) => { self.quit().await; return Ok(Stopped::Quit); }
                        Some(StopRequest::Failed) => return Err(self.fail().await),
                    }
                }
                () = self.failed.cancelled() => return Err(self.fail().await),
            }
        }
        let grace = self.config.get().calls.drain_grace;
        tracing::info!(
            ?grace,
            "draining: no new calls; waiting for in-flight calls"
        );
        crate::service::stopping(grace);
        self.draining.cancel();
        self.tracker.close();
        let stopped = tokio::select! {
            () = self.tracker.wait() => Stopped::Drained,
            () = tokio::time::sleep(grace) => {
                tracing::warn!(?grace, "grace period over; cancelling the remaining calls");
                Stopped::GraceExpired
            }
            message = control.recv() => match message {
                Some(Control::Reload) | None => {
                    // Ignore reloads while draining; a closed channel means nobody can ask twice.
                    tokio::select! {
                        () = self.tracker.wait() => Stopped::Drained,
                        () = tokio::time::sleep(grace) => Stopped::GraceExpired,
                    }
                }
                Some(_) => {
                    tracing::warn!("second stop request: quitting now");
                    Stopped::Quit
                }
            },
        };
        if stopped != Stopped::Drained {
            self.quit().await;
        }
        Ok(stopped)
    }

    /// After a supervised task failed: quits, and names the task.
    async fn fail(&self) -> TaskFailed {
        let name = self
            .failed_task
            .lock()
            .expect("failure slot poisoned")
            .unwrap_or("unknown");
        self.quit().await;
        TaskFailed(name)
    }

    /// Cancels every call (killing its processes) and waits briefly for that to finish.
    async fn quit(&self) {
        self.draining.cancel();
        self.abort.cancel();
        // The tunnel's calls have tokens of their own (see `CallTable::admit`).
        self.calls.cancel_all();
        self.tracker.close();
        // Cancelled calls kill their process groups synchronously; this only waits for the
        // tasks to notice.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }
}

/// Copies the example connectors built next to this binary into the plugins folder (for
/// `--dev`), replacing stale copies. Returns the names copied.
pub fn stage_dev_connectors(config: &Config) -> std::io::Result<Vec<String>> {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX, EXE_SUFFIX};
    let examples = [
        format!("lumos-example-connector{EXE_SUFFIX}"),
        format!("{DLL_PREFIX}lumos_example_cdylib{DLL_SUFFIX}"),
        format!("{DLL_PREFIX}lumos_example_c{DLL_SUFFIX}"),
    ];
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .ok_or_else(|| std::io::Error::other("the agent binary has no folder"))?;
    std::fs::create_dir_all(&config.plugins_dir)?;
    let mut staged = Vec::new();
    for name in &examples {
        // `cargo build` puts workspace libraries next to the binary; when they were only built as
        // dependencies (e.g. by `cargo test`) they are in `deps/`.
        let from = [bin_dir.join(name), bin_dir.join("deps").join(name)]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| bin_dir.join(name));
        if !from.is_file() {
            tracing::warn!(
                "--dev: {} is missing; build it with `cargo build --workspace`",
                from.display()
            );
            continue;
        }
        let to = config.plugins_dir.join(name);
        let fresh = std::fs::read(&from)?;
        if std::fs::read(&to).ok().as_deref() == Some(fresh.as_slice()) {
            continue;
        }
        // Copy under a hidden name, then rename: the loader never sees a half-written file.
        let tmp = config.plugins_dir.join(format!(".{name}.staging"));
        std::fs::copy(&from, &tmp)?;
        std::fs::rename(&tmp, &to)?;
        staged.push(name.clone());
    }
    Ok(staged)
}

/// How often the log sums up the calls (they are not logged one by one at `info`).
const CALL_SUMMARY_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// Logs, every [`CALL_SUMMARY_INTERVAL`], how many calls were answered and how many failed by
/// error code (nothing for a period without calls), until the agent drains: the journal shows
/// the agent at work without a line per call, which cost a fifth of the tunnel's throughput.
/// `latest` gets each period's line (`None` for a quiet one) for the service manager's status.
async fn call_summary_log(
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    latest: tokio::sync::watch::Sender<Option<String>>,
) {
    let mut every = tokio::time::interval(CALL_SUMMARY_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: it only takes the starting totals.
    every.tick().await;
    let mut before = metrics.call_totals();
    let period = format!("{} min", CALL_SUMMARY_INTERVAL.as_secs() / 60);
    loop {
        tokio::select! {
            () = draining.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = metrics.call_totals();
        let line = crate::metrics::call_summary(&before, &now, &period);
        if let Some(line) = &line {
            tracing::info!("{line}");
        }
        latest.send_replace(line);
        before = now;
    }
}

/// How often old connector log files are looked for.
const LOG_RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Removes connector log files nothing has written to for `log.connector_log_days` days, at
/// start, every hour, and whenever a reload changes the days, until the agent drains.
/// connector-py starts a file per app and day and never removes one: without this, a busy
/// connector's logs grow until the disk is full.
async fn connector_log_retention(
    dir: PathBuf,
    mut days_in_force: tokio::sync::watch::Receiver<u32>,
    draining: CancellationToken,
) {
    let mut every = tokio::time::interval(LOG_RETENTION_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = draining.cancelled() => return,
            _ = every.tick() => {}
            changed = days_in_force.changed() => {
                if changed.is_err() {
                    // The agent is being dropped: nothing changes the days any more.
                    draining.cancelled().await;
                    return;
                }
                // The hour restarts from this pass.
                every.reset();
            }
        }
        let days = *days_in_force.borrow_and_update();
        if days == 0 {
            continue;
        }
        let max_age = Duration::from_secs(u64::from(days) * 24 * 3600);
        let folder = dir.clone();
        let pass = tokio::task::spawn_blocking(move || {
            crate::state::remove_files_older_than(&folder, max_age, std::time::SystemTime::now())
        })
        .await;
        match pass {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::info!(
                removed,
                dir = %dir.display(),
                "removed connector log files not written to for {days} days (log.connector_log_days)"
            ),
            Ok(Err(e)) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot list the connector log folder to remove old files"
            ),
            Err(e) => tracing::error!("the removal of old connector log files failed: {e}"),
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// A log kept in memory, for one test's thread.
    #[derive(Clone, Default)]
    struct MemoryLog(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for MemoryLog {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MemoryLog {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    /// Calls are not logged one by one at `info`; every period the log sums them up, and says
    /// nothing of a period without calls.
    #[tokio::test(start_paused = true)]
    async fn the_log_sums_up_each_periods_calls() {
        let log = MemoryLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let metrics = Arc::new(Metrics::new());
        // Counted before the task starts: not part of its first period.
        metrics.record_call("a", "x", "answered", Duration::from_millis(1));
        let draining = CancellationToken::new();
        let (latest, summary) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(call_summary_log(metrics.clone(), draining.clone(), latest));
        tokio::task::yield_now().await;
        for outcome in ["answered", "answered", "timeout"] {
            metrics.record_call("a", "x", outcome, Duration::from_millis(1));
        }
        tokio::time::sleep(CALL_SUMMARY_INTERVAL + Duration::from_secs(1)).await;
        let summaries = |text: &str| text.matches("calls in the last 15 min").count();
        assert!(
            log.text()
                .contains("calls in the last 15 min: 2 answered, 1 failed (timeout 1)"),
            "{}",
            log.text()
        );
        // The same line for the service manager's status.
        assert_eq!(
            summary.borrow().as_deref(),
            Some("calls in the last 15 min: 2 answered, 1 failed (timeout 1)")
        );
        // A quiet period: no line, and the status line says nothing of calls.
        tokio::time::sleep(CALL_SUMMARY_INTERVAL).await;
        assert_eq!(summaries(&log.text()), 1, "{}", log.text());
        assert_eq!(*summary.borrow(), None);
        draining.cancel();
        task.await.unwrap();
    }

    /// A supervised task that fails while a reload waits for a connector's `info` (up to
    /// `plugins.info_timeout_secs`) stops the agent at once, naming the task. (The control loop
    /// noticed only once the reload had ended.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_failing_during_a_reload_stops_the_agent_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        // Rejected at start (no JSON); once the gate exists, its `info` hangs.
        let (gate, pid_file) = (dir.path().join("gate"), dir.path().join("info.pid"));
        let script = plugins.join("hangs");
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\nif [ -e '{}' ]; then\n  echo $$ > '{1}.tmp'\n  mv '{1}.tmp' '{1}'\n  \
                 exec sleep 600\nfi\necho no-json\n",
                gate.display(),
                pid_file.display()
            ),
        )
        .unwrap();
        crate::platform::set_mode(&script, 0o755).unwrap();
        // Written long ago, so that the reload's scan loads it rather than wait for it to settle.
        std::fs::File::open(&script)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        let config_file = dir.path().join("agent.toml");
        let write_config = |max_output_bytes: u32| {
            std::fs::write(
                &config_file,
                format!(
                    "plugins_dir = {plugins:?}\nstate_dir = {:?}\n[api]\nlisten = \"127.0.0.1:0\"\n\
                     [plugins]\nwatch = false\nrescan_interval_secs = 3600\ninfo_timeout_secs = 600\n\
                     [calls]\nmax_output_bytes = {max_output_bytes}\n",
                    dir.path().join("state")
                ),
            )
            .unwrap();
        };
        write_config(1 << 20);
        let overrides = crate::config::Overrides {
            config_file: Some(config_file.clone()),
            dev: false,
            plugins_dir: None,
            state_dir: None,
            listen: None,
        };
        let config = crate::config::load_with_env(&overrides, &[]).unwrap();
        let mut agent = RunningAgent::start(config).await.unwrap();
        agent.set_config_source(Box::new(move || {
            crate::config::load_with_env(&overrides, &[])
        }));
        let (doom, doomed) = tokio::sync::oneshot::channel::<()>();
        agent.supervise("doomed", async move {
            let _ = doomed.await;
            panic!("a supervised task fails");
        });
        let (control, rx) = mpsc::channel(4);
        let stopped = tokio::spawn(agent.run(rx));

        // A new output limit (fixed when a connector is loaded): the reload loads every
        // connector again, and waits for this `info`.
        std::fs::write(&gate, "").unwrap();
        write_config(2 << 20);
        control.send(Control::Reload).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !pid_file.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reload's info did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        doom.send(()).unwrap();
        // Not a timing: before, the run waited for the reload, and so the 600 s `info` deadline.
        let ended = tokio::time::timeout(Duration::from_secs(20), stopped)
            .await
            .expect("the failure waited for the reload")
            .unwrap();
        assert_eq!(ended.map_err(|failed| failed.0), Err("doomed"));
    }
}
