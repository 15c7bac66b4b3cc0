//! The tunnel to the Lumos cloud (design §4): the agent dials out, opens one gRPC stream
//! (`lumos.agent.v1.AgentTunnel/Connect`), introduces itself, publishes its inventory, and
//! serves the cloud's calls over it, reconnecting for as long as it runs.
//!
//! - [`transport`]: TCP, HTTP CONNECT proxy, TLS.
//! - [`calls`]: running calls, the outbox of unacknowledged results, replay protection.
//! - `session`: one stream, from Hello to its end.
//!
//! **Only this module knows the protocol's types** (`lumos_agent_proto`); the rest of the
//! agent speaks in dispatcher calls and inventories.

pub mod calls;
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

/// Everything the tunnel works with.
#[derive(Debug, Clone)]
pub struct TunnelContext {
    /// Where and how to connect.
    pub cloud: CloudConfig,
    /// Runs the calls.
    pub dispatcher: Arc<Dispatcher>,
    /// The inventory to publish.
    pub registry: Arc<PluginRegistry>,
    /// Calls and results across streams.
    pub table: Arc<CallTable>,
    /// `Hello.agent_id`.
    pub agent_id: String,
    /// Cancelled when the agent drains: announce `Draining`, finish, flush.
    pub draining: CancellationToken,
    /// Cancelled when the agent quits at once.
    pub abort: CancellationToken,
    /// Call tasks run here, so the agent's drain waits for them.
    pub tracker: TaskTracker,
    /// `Draining.grace_ms`.
    pub grace: Duration,
    /// Connections to the cloud.
    pub connector: CloudConnector,
}

impl TunnelContext {
    /// Prepares the tunnel: the agent id (created on first run), the trust store and the
    /// outbox.
    #[allow(
        clippy::too_many_arguments,
        reason = "one constructor that wires the agent's shared parts; named arguments read best"
    )]
    pub fn new(
        cloud: CloudConfig,
        state: &crate::state::StatePaths,
        dispatcher: Arc<Dispatcher>,
        registry: Arc<PluginRegistry>,
        draining: CancellationToken,
        abort: CancellationToken,
        tracker: TaskTracker,
        grace: Duration,
    ) -> Result<Self, TunnelSetupError> {
        let agent_id = load_or_create_agent_id(&state.agent_id())?;
        let connector = CloudConnector::new(&cloud)?;
        let table = Arc::new(CallTable::new(state.calls(), cloud.outbox_memory_bytes));
        Ok(Self {
            cloud,
            dispatcher,
            registry,
            table,
            agent_id,
            draining,
            abort,
            tracker,
            grace,
            connector,
        })
    }
}

/// Connects, serves, and reconnects until the agent quits, or until it drains and has
/// delivered every result.
pub async fn run(ctx: TunnelContext) {
    let target = ctx.connector.target();
    tracing::info!(agent_id = %ctx.agent_id, cluster_id = %ctx.cloud.cluster_id, %target, "connecting to the Lumos cloud");
    let mut failures: u32 = 0;
    loop {
        if ctx.abort.is_cancelled() || (ctx.draining.is_cancelled() && idle(&ctx.table)) {
            return;
        }
        let delay = match read_token(&ctx.cloud.token_file) {
            Err(e) => {
                tracing::error!("{e}; retrying in {:?}", ctx.cloud.backoff_max);
                ctx.cloud.backoff_max
            }
            Ok(token) => {
                let outcome = match ctx.connector.channel().await {
                    Ok(channel) => session::run(&ctx, channel, &token).await,
                    Err(e) => Err(session::SessionError::Failed(e.to_string())),
                };
                match outcome {
                    Ok(session::SessionEnd::Finished) => return,
                    Ok(session::SessionEnd::Lost(reason)) => {
                        // The stream worked: start the backoff over.
                        failures = 1;
                        let delay =
                            full_jitter(ctx.cloud.backoff_initial, ctx.cloud.backoff_max, failures);
                        tracing::warn!("lost the connection to the Lumos cloud: {reason}; reconnecting in {delay:?}");
                        delay
                    }
                    Err(session::SessionError::Unauthorized(message)) => {
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
        let draining_already = ctx.draining.is_cancelled();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.abort.cancelled() => return,
            () = ctx.draining.cancelled(), if !draining_already => {}
        }
    }
}

fn idle(table: &CallTable) -> bool {
    table.running() == 0 && table.unacknowledged() == 0
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
