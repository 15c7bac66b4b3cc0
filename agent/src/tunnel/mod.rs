//! The tunnel to the Lumos cloud (design §4): the agent dials out, opens one gRPC stream
//! (`lumos.agent.v1.AgentTunnel/Connect`), introduces itself, publishes its inventory, and
//! serves the cloud's calls over it, reconnecting for as long as it runs.
//!
//! - [`transport`]: TCP, HTTP CONNECT proxy, TLS.
//! - [`calls`]: running calls, the outbox of unacknowledged results, replay protection.
//! - [`outbox`]: the outbox kept on disk from a stop to the next start.
//! - [`journal`]: the calls started and unacknowledged, on disk as they start, for a crash.
//! - `session`: one stream, from Hello to its end.
//!
//! **Only this module knows the protocol's types** (`lumos_agent_proto`); the rest of the
//! agent speaks in dispatcher calls and inventories.

pub mod calls;
pub mod journal;
pub mod outbox;
mod session;
pub mod transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use crate::config::CloudConfig;
use crate::dispatch::Dispatcher;
use crate::plugins::PluginRegistry;
use calls::CallTable;
use transport::CloudConnector;

/// Why the tunnel cannot start at all (the agent refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum TunnelSetupError {
    /// The agent id file is unreadable or corrupt.
    #[error("the agent id file {path} {message}")]
    AgentId {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The trust store or endpoint is unusable.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
}

/// Why the agent token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("cannot read the agent token file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS's words.
        source: std::io::Error,
    },
    /// Other users could read it.
    #[error("the agent token file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// It is empty, or not one line of text.
    #[error("the agent token file {path} holds no token (expected one line, as issued by the Lumos admin console)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Where the tunnel stands, for the service status line, `/metrics`, `/v1/status` and
/// `doctor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudStatus {
    /// No `[cloud]` configured: local API only.
    Standalone,
    /// Dialling (at start, or after a lost stream).
    Connecting,
    /// Welcomed by the cloud; calls flow.
    Connected,
    /// The last attempt failed (network, proxy, TLS, the cloud); retrying with backoff.
    Unreachable,
    /// The cloud refused the agent token; retrying at the maximum backoff.
    Unauthorized,
}

impl CloudStatus {
    /// Every status, for metrics.
    pub const ALL: [Self; 5] = [
        Self::Standalone,
        Self::Connecting,
        Self::Connected,
        Self::Unreachable,
        Self::Unauthorized,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Unreachable => "unreachable",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// What every tunnel of one agent run shares, whatever its `[cloud]` settings: a reload that
/// changes them replaces the tunnel, not these.
#[derive(Debug, Clone)]
pub struct TunnelParts {
    /// The state folder (the agent id lives there).
    pub state: crate::state::StatePaths,
    /// Runs the calls.
    pub dispatcher: Arc<Dispatcher>,
    /// The inventory to publish.
    pub registry: Arc<PluginRegistry>,
    /// Calls and results across streams, and across tunnels: a result survives a reconnect and
    /// a change of cloud settings until it is acknowledged.
    pub table: Arc<CallTable>,
    /// Cancelled when the agent drains: announce `Draining`, finish, flush.
    pub draining: CancellationToken,
    /// Cancelled when the agent quits at once.
    pub abort: CancellationToken,
    /// Call tasks run here, so the agent's drain waits for them.
    pub tracker: TaskTracker,
    /// The configuration in force: `Draining.grace_ms` is its `calls.drain_grace_secs` when
    /// the drain starts (a reload may have changed it since the start).
    pub config: Arc<crate::config::SharedConfig>,
    /// Where the tunnel stands.
    pub status: Arc<tokio::sync::watch::Sender<CloudStatus>>,
    /// Connection metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The refused calls' log lines, across streams.
    pub refused_call_lines: Arc<crate::telemetry::LineThrottle>,
}

/// Everything one tunnel works with: its settings and connection, and the shared parts.
#[derive(Debug, Clone)]
pub struct TunnelContext {
    /// Where and how to connect.
    pub cloud: CloudConfig,
    /// `Hello.agent_id`.
    pub agent_id: String,
    /// Ends this tunnel (the agent quits, or new cloud settings replace it). Its calls go on:
    /// their tokens descend from `parts.abort`.
    pub stop: CancellationToken,
    /// Connections to the cloud.
    pub connector: CloudConnector,
    /// What every tunnel of this agent run shares.
    pub parts: TunnelParts,
}

impl TunnelContext {
    /// Prepares a tunnel for `cloud`: the agent id (created on first run) and the trust store.
    pub fn new(cloud: CloudConfig, parts: &TunnelParts) -> Result<Self, TunnelSetupError> {
        let agent_id = load_or_create_agent_id(&parts.state.agent_id())?;
        let connector = CloudConnector::new(&cloud)?;
        parts.table.set_memory_budget(cloud.outbox_memory_bytes);
        Ok(Self {
            cloud,
            agent_id,
            stop: parts.abort.child_token(),
            connector,
            parts: parts.clone(),
        })
    }

    /// Records where the tunnel stands.
    pub fn set_status(&self, status: CloudStatus) {
        set_status(&self.parts.status, &self.parts.metrics, status);
    }
}

fn set_status(
    current: &tokio::sync::watch::Sender<CloudStatus>,
    metrics: &crate::metrics::Metrics,
    status: CloudStatus,
) {
    current.send_if_modified(|current| {
        let changed = *current != status;
        *current = status;
        changed
    });
    metrics.set_cloud_status(status.as_str());
}

/// Runs the tunnel for the current `[cloud]` settings, replacing it whenever a reload changes
/// them (`None`: standalone). New settings that cannot be used (a bad `ca_file`) are reported
/// and the running tunnel kept. Returns when the agent quits, or drains with every result
/// delivered.
pub async fn supervise(
    parts: TunnelParts,
    first: Option<TunnelContext>,
    mut settings: tokio::sync::watch::Receiver<Option<CloudConfig>>,
) {
    let mut current = first;
    loop {
        let stop = current.as_ref().map(|ctx| ctx.stop.clone());
        let mut running = std::pin::pin!(run_or_stand_alone(current.clone(), &parts));
        let next = loop {
            tokio::select! {
                () = &mut running => return,
                changed = settings.changed() => {
                    if changed.is_err() {
                        // Nobody can change the settings any more: run these to the end.
                        running.await;
                        return;
                    }
                    let new = settings.borrow_and_update().clone();
                    match new.map(|cloud| TunnelContext::new(cloud, &parts)).transpose() {
                        Ok(next) => break next,
                        Err(e) => tracing::error!("the new [cloud] settings cannot be used, keeping the current ones: {e}"),
                    }
                }
            }
        };
        match &next {
            Some(ctx) => {
                tracing::info!(target = %ctx.connector.target(), "new [cloud] settings: reconnecting")
            }
            None => {
                tracing::info!("[cloud] removed: closing the tunnel; standalone, local API only")
            }
        }
        if let Some(stop) = stop {
            stop.cancel();
        }
        running.await;
        current = next;
    }
}

async fn run_or_stand_alone(ctx: Option<TunnelContext>, parts: &TunnelParts) {
    match ctx {
        Some(ctx) => run(ctx).await,
        None => {
            set_status(&parts.status, &parts.metrics, CloudStatus::Standalone);
            tokio::select! {
                () = parts.draining.cancelled() => {}
                () = parts.abort.cancelled() => {}
            }
        }
    }
}

/// Connects, serves, and reconnects until the agent quits, or until it drains and has
/// delivered every result.
pub async fn run(ctx: TunnelContext) {
    let target = ctx.connector.target();
    tracing::info!(agent_id = %ctx.agent_id, cluster_id = %ctx.cloud.cluster_id, %target, "connecting to the Lumos cloud");
    let mut failures: u32 = 0;
    loop {
        if ctx.stop.is_cancelled() || (ctx.parts.draining.is_cancelled() && idle(&ctx.parts.table))
        {
            return;
        }
        let delay = match read_token(&ctx.cloud.token_file) {
            Err(e) => {
                ctx.set_status(CloudStatus::Unauthorized);
                tracing::error!("{e}; retrying in {:?}", ctx.cloud.backoff_max);
                ctx.cloud.backoff_max
            }
            Ok(token) => {
                let attempt = async {
                    match ctx.connector.channel().await {
                        Ok(channel) => session::run(&ctx, channel, &token).await,
                        Err(e) => Err(session::SessionError::Failed(e.to_string())),
                    }
                };
                let outcome = tokio::select! {
                    outcome = attempt => outcome,
                    () = ctx.stop.cancelled() => return,
                };
                match outcome {
                    Ok(session::SessionEnd::Finished) => return,
                    Ok(session::SessionEnd::Lost(reason)) => {
                        ctx.set_status(CloudStatus::Connecting);
                        ctx.parts.metrics.tunnel_disconnected("lost");
                        // The stream worked: start the backoff over.
                        failures = 1;
                        let delay =
                            full_jitter(ctx.cloud.backoff_initial, ctx.cloud.backoff_max, failures);
                        tracing::warn!("lost the connection to the Lumos cloud: {reason}; reconnecting in {delay:?}");
                        delay
                    }
                    Err(session::SessionError::Unauthorized(message)) => {
                        ctx.set_status(CloudStatus::Unauthorized);
                        ctx.parts.metrics.tunnel_disconnected("unauthorized");
                        // Retrying fast cannot fix a rejected token: wait the maximum, and say so
                        // on every attempt.
                        tracing::error!(
                            "the Lumos cloud refused this agent's token: {message}. Check cloud.token_file ({}) against the admin console; retrying in {:?}",
                            ctx.cloud.token_file.display(),
                            ctx.cloud.backoff_max
                        );
                        ctx.cloud.backoff_max
                    }
                    Err(session::SessionError::Failed(message)) => {
                        ctx.set_status(CloudStatus::Unreachable);
                        ctx.parts.metrics.tunnel_disconnected("unreachable");
                        failures = failures.saturating_add(1);
                        let delay =
                            full_jitter(ctx.cloud.backoff_initial, ctx.cloud.backoff_max, failures);
                        tracing::warn!(attempt = failures, "cannot reach the Lumos cloud at {target}: {message}; retrying in {delay:?}");
                        delay
                    }
                }
            }
        };
        // A drain that starts during the wait ends it: with nothing to deliver the tunnel
        // stops at once, otherwise it tries to deliver now.
        let draining_already = ctx.parts.draining.is_cancelled();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.stop.cancelled() => return,
            () = ctx.parts.draining.cancelled(), if !draining_already => {}
        }
    }
}

fn idle(table: &CallTable) -> bool {
    table.is_empty()
}

/// Exponential backoff with full jitter: a uniform delay in `[0, min(max, initial·2^(n-1))]`.
/// Full jitter (rather than a jitter added to the exponential) is what spreads a fleet of
/// agents that lost the cloud at the same instant; no maintained crate offers exactly it, and
/// it is one line.
pub fn full_jitter(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=ceiling_ms))
}

/// The token, read fresh for every connection (so a rotated file takes effect without a
/// restart) and zeroized after use.
pub fn read_token(path: &Path) -> Result<Zeroizing<String>, TokenError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|source| TokenError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| TokenError::Unreadable {
                path: path.to_path_buf(),
                source,
            })?,
        );
    let token = text.trim();
    if token.is_empty() || token.contains(['\n', '\r']) {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Zeroizing::new(token.to_string()))
}

/// This install's identity: a UUID created on first start and kept in the state folder.
pub fn load_or_create_agent_id(path: &Path) -> Result<String, TunnelSetupError> {
    let bad = |message: String| TunnelSetupError::AgentId {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => uuid::Uuid::parse_str(text.trim())
            .map(|id| id.to_string())
            .map_err(|_| bad("is not a UUID; restore it from a backup, or delete it to register as a new agent".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            crate::state::write_atomic(path, format!("{id}\n").as_bytes(), 0o644)
                .map_err(|e| bad(format!("cannot be written: {e}")))?;
            tracing::info!(agent_id = %id, "created this agent's identity");
            Ok(id)
        }
        Err(e) => Err(bad(format!("cannot be read: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 1..40 {
            let ceiling = (initial * 2u32.pow(attempt.min(20) - 1)).min(max);
            for _ in 0..50 {
                assert!(full_jitter(initial, max, attempt) <= ceiling);
            }
        }
        // Spread, not lock-step: 200 draws at the cap are not all equal.
        let draws: std::collections::HashSet<_> =
            (0..200).map(|_| full_jitter(initial, max, 30)).collect();
        assert!(draws.len() > 50, "{} distinct delays", draws.len());
    }

    #[test]
    fn agent_id_is_created_once_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-id");
        let first = load_or_create_agent_id(&path).unwrap();
        assert_eq!(load_or_create_agent_id(&path).unwrap(), first);
        std::fs::write(&path, "garbage").unwrap();
        let err = load_or_create_agent_id(&path).unwrap_err().to_string();
        assert!(err.contains("not a UUID"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn token_file_must_be_private_and_non_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "secret-token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token(&path).unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && !err.contains("secret-token"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap().as_str(), "secret-token");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(read_token(&path), Err(TokenError::Empty { .. })));
    }
}
