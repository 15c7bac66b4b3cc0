//! The plugins folder and the registry of connectors found in it.
//!
//! Every file in the folder becomes one [`Connector`] record, `ready` or `rejected` with a reason
//! a person can act on; nothing a plugin file contains can stop the agent from starting.
//! The registry is a snapshot swapped atomically ([`PluginRegistry::replace_shared`]) so calls
//! never see a half-updated inventory.

pub mod binary;
pub mod bundle;
pub mod info;
pub mod integrity;
pub mod limits;
pub mod reload;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::SharedConfig;
use crate::error::{CallError, ErrorCode};
use crate::exec::{self, ExecLimits, ProcessEnv};
use crate::native::{InProcessConnector, WorkerConnector, WorkerSettings};
use crate::platform::{self, OsErrorKind};
use crate::state::StatePaths;
use bundle::{BundleFormat, BundleLimits};
use info::ConnectorInfo;

/// How a connector is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorKind {
    /// A `connector compile-on-prem` archive.
    Bundle,
    /// An executable speaking the Lumos connector CLI protocol.
    Executable,
    /// A shared library exporting the connector C ABI.
    Cdylib,
}

/// Whether a connector can take calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorStatus {
    /// Loaded and answering.
    Ready,
    /// Loaded, but a higher version of the same app_id serves.
    Superseded,
    /// Not loaded; `reason` says why.
    Rejected,
}

/// One file of the plugins folder, as the registry knows it.
#[derive(Debug)]
pub struct Connector {
    /// The file in the plugins folder.
    pub path: PathBuf,
    /// Its packaging, when recognised.
    pub kind: Option<ConnectorKind>,
    /// sha256 of the file's bytes, when readable.
    pub sha256: Option<String>,
    /// Ready or rejected.
    pub status: ConnectorStatus,
    /// Why it was rejected.
    pub reason: Option<String>,
    /// The app_id, when known (from metadata.toml for bundles, from `info` otherwise).
    pub app_id: Option<String>,
    /// The version, when known. Shared: every call's answer names it.
    pub version: Option<Arc<str>>,
    /// How to call it; present exactly when `status` is `Ready`.
    pub runnable: Option<Runnable>,
    /// The file's identity when it was loaded: a different one means it changed.
    pub fingerprint: Option<Fingerprint>,
    /// Rejected for a fault of the agent's own (its state folder full, say), not of the file:
    /// loaded again at the next scan, changed or not.
    pub retry: bool,
    /// Rejected by the trust checks (`plugins.strict_permissions`, the allow-list, the
    /// signatures): the same file's version that served before must not keep serving.
    pub distrusted: bool,
    /// What it passed of the trust checks when it was loaded: a reload judges it again by it.
    pub trust: integrity::TrustEvidence,
    /// The private folder its bytes run from (store copy or unpacked bundle), removed once
    /// nothing uses it.
    pub private_dir: Option<PathBuf>,
}

/// What identifies a file's content cheaply: size, modification time, inode, mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    len: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
    mode: u32,
    /// The signature beside it (`<file>.sig`): a new signature means a new check.
    signature: Option<(u64, i128)>,
}

/// Modification time in nanoseconds since the epoch (0 if unknown or earlier).
fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Inode and device: a file replaced by rename changes them even with the same size and time.
/// Windows exposes no stable equivalent through std; size, time and the signature remain.
fn file_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (meta.ino(), meta.dev())
    }
    #[cfg(windows)]
    {
        let _ = meta;
        (0, 0)
    }
}

impl Fingerprint {
    /// The fingerprint of `path` (following symlinks), if it can be read.
    pub fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let (ino, dev) = file_identity(&meta);
        Some(Self {
            len: meta.len(),
            mtime_ns: mtime_ns(&meta),
            ino,
            dev,
            mode: platform::mode_of(&meta).unwrap_or(0),
            signature: std::fs::metadata(integrity::signature_path(path))
                .ok()
                .map(|m| (m.len(), mtime_ns(&m))),
        })
    }

    /// How long ago the file was last modified; or, for a modification time in the future
    /// (a file copied with its times from a machine whose clock runs ahead), how far ahead.
    pub fn age(&self) -> Result<Duration, Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let nanos = |n: i128| Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX));
        if self.mtime_ns > now {
            Err(nanos(self.mtime_ns - now))
        } else {
            Ok(nanos(now - self.mtime_ns))
        }
    }
}

/// What a ready connector needs to be called.
#[derive(Debug)]
pub struct Runnable {
    /// Its `info`.
    pub info: ConnectorInfo,
    /// How calls reach it.
    pub runner: Runner,
    /// How many calls it may run at once, and their deadline (a reload changes them in
    /// place).
    pub limits: limits::CallLimits,
    /// Cancelled when this version was replaced or removed and its drain grace ran out: the
    /// calls still running on it are cancelled.
    pub drain: CancellationToken,
}

/// How a ready connector is called.
#[derive(Debug)]
pub enum Runner {
    /// A process per call (executables and bundles).
    Executable {
        /// The executable.
        program: PathBuf,
        /// Its environment and working folder.
        env: ProcessEnv,
    },
    /// A native library in a worker process.
    Worker(Arc<WorkerConnector>),
    /// A vetted native library in the agent's own process.
    InProcess(Arc<InProcessConnector>),
}

impl Connector {
    fn rejected(
        path: PathBuf,
        kind: Option<ConnectorKind>,
        sha256: Option<String>,
        reason: String,
    ) -> Self {
        Self::rejected_for(path, kind, sha256, reason.into())
    }

    fn rejected_for(
        path: PathBuf,
        kind: Option<ConnectorKind>,
        sha256: Option<String>,
        rejection: Rejection,
    ) -> Self {
        Self {
            path,
            kind,
            sha256,
            status: ConnectorStatus::Rejected,
            reason: Some(rejection.reason),
            app_id: None,
            version: None,
            runnable: None,
            fingerprint: None,
            retry: rejection.retry,
            distrusted: false,
            trust: integrity::TrustEvidence::default(),
            private_dir: None,
        }
    }

    /// A file the trust checks refused.
    fn distrusted(
        path: PathBuf,
        kind: Option<ConnectorKind>,
        sha256: Option<String>,
        reason: String,
    ) -> Self {
        Self {
            distrusted: true,
            ..Self::rejected(path, kind, sha256, reason)
        }
    }

    /// Why the trust checks as configured now refuse this loaded version; `None` when they
    /// accept it, or when it is not loaded.
    pub fn refused_by(&self, trust: &integrity::TrustPolicy) -> Option<String> {
        self.runnable.as_ref()?;
        trust.refuses(self.sha256.as_deref(), &self.trust)
    }

    /// The file's name, for messages.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The API's view of this connector, with its status and reason as its inventory sees
    /// them ([`Inventory::view`]).
    fn view(
        &self,
        with_info: bool,
        status: ConnectorStatus,
        reason: Option<String>,
    ) -> ConnectorView {
        ConnectorView {
            app_id: self.app_id.clone(),
            version: self.version.as_deref().map(str::to_owned),
            kind: self.kind,
            status,
            reason,
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
            capabilities: self
                .runnable
                .as_ref()
                .map(|r| r.info.capabilities.clone())
                .unwrap_or_default(),
            max_concurrency: self.runnable.as_ref().map(|r| r.limits.max()),
            timeout_secs: self.runnable.as_ref().map(|r| r.limits.timeout().as_secs()),
            running: self.runnable.as_ref().map(|r| r.limits.running()),
            info: if with_info {
                self.runnable.as_ref().map(|r| (*r.info.document).clone())
            } else {
                None
            },
        }
    }
}

/// A connector as the local API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorView {
    /// app_id, when known.
    pub app_id: Option<String>,
    /// version, when known.
    pub version: Option<String>,
    /// bundle, executable or cdylib.
    pub kind: Option<ConnectorKind>,
    /// ready, superseded or rejected.
    pub status: ConnectorStatus,
    /// Why it was rejected, or which file serves in place of a superseded one.
    pub reason: Option<String>,
    /// The file in the plugins folder.
    pub path: String,
    /// sha256 of the file.
    pub sha256: Option<String>,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// Calls it may run at once (`calls.max_concurrency` or its override), when ready.
    pub max_concurrency: Option<usize>,
    /// Its calls' deadline in seconds (`calls.timeout_secs` or its override), when ready.
    pub timeout_secs: Option<u64>,
    /// Calls it is running now, when ready.
    pub running: Option<usize>,
    /// The full `info` response (detail view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// A consistent view of every connector, with a revision that grows on every change.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Grows by one on every change.
    pub revision: u64,
    /// Every plugin file, sorted by path (a file whose replacement was rejected may appear
    /// twice: the rejected new content and the old version that keeps serving).
    pub connectors: Vec<Arc<Connector>>,
}

impl Inventory {
    /// The connector serving `app_id`: the highest ready version.
    pub fn resolve(&self, app_id: &str) -> Result<Arc<Connector>, CallError> {
        if let Some(best) = self.serving(app_id) {
            return Ok(best.clone());
        }
        if let Some(rejected) = self
            .connectors
            .iter()
            .find(|c| c.app_id.as_deref() == Some(app_id))
        {
            return Err(CallError::new(
                ErrorCode::ConnectorRejected,
                format!(
                    "connector {app_id} ({}) is rejected: {}",
                    rejected.file_name(),
                    rejected.reason.as_deref().unwrap_or("no reason recorded")
                ),
            ));
        }
        Err(CallError::new(
            ErrorCode::UnknownConnector,
            format!("no connector with app_id {app_id:?} is loaded"),
        ))
    }

    /// The ready record of `app_id` with the highest version; of equal versions, the last in
    /// path order (`max_by` keeps the last maximum), so the choice does not depend on load order.
    fn serving(&self, app_id: &str) -> Option<&Arc<Connector>> {
        self.connectors
            .iter()
            .filter(|c| c.app_id.as_deref() == Some(app_id) && c.status == ConnectorStatus::Ready)
            .max_by(|a, b| {
                version_key(a.version.as_deref()).cmp(&version_key(b.version.as_deref()))
            })
    }

    /// A record's status as shown: ready records that do not serve are `superseded`.
    pub fn status_of(&self, connector: &Arc<Connector>) -> ConnectorStatus {
        match (connector.status, connector.app_id.as_deref()) {
            (ConnectorStatus::Ready, Some(app_id)) => match self.serving(app_id) {
                Some(best) if !Arc::ptr_eq(best, connector) => ConnectorStatus::Superseded,
                _ => ConnectorStatus::Ready,
            },
            (status, _) => status,
        }
    }

    /// Why a record does not serve, for a person: a rejected record's own reason, or for a
    /// superseded one the file that serves in its place (without it, an admin who sees two
    /// rows of one app_id cannot tell which file to remove).
    pub fn reason_of(&self, connector: &Arc<Connector>) -> Option<String> {
        if connector.reason.is_some() {
            return connector.reason.clone();
        }
        let app_id = connector.app_id.as_deref()?;
        let best = self.serving(app_id)?;
        if connector.status != ConnectorStatus::Ready || Arc::ptr_eq(best, connector) {
            return None;
        }
        let version = best.version.as_deref().unwrap_or("?");
        Some(if best.version == connector.version {
            // Ties go to the file whose name sorts last (`serving`).
            format!(
                "the same version, {version}, is also in {}, which serves: remove one of the \
                 two files",
                best.file_name()
            )
        } else {
            format!("{} serves a higher version, {version}", best.file_name())
        })
    }

    /// A record as the API shows it.
    pub fn view(&self, connector: &Arc<Connector>, with_info: bool) -> ConnectorView {
        connector.view(
            with_info,
            self.status_of(connector),
            self.reason_of(connector),
        )
    }

    /// Every record as the API shows it.
    pub fn views(&self) -> Vec<ConnectorView> {
        self.connectors
            .iter()
            .map(|c| self.view(c, false))
            .collect()
    }

    /// Number of connectors that serve calls.
    pub fn ready_count(&self) -> usize {
        self.connectors
            .iter()
            .filter(|c| self.status_of(c) == ConnectorStatus::Ready)
            .count()
    }
}

/// Semver when it parses, else the raw string; semver versions sort above non-semver ones.
fn version_key(version: Option<&str>) -> (Option<semver::Version>, String) {
    let raw = version.unwrap_or_default();
    (
        semver::Version::parse(raw.trim_start_matches('v')).ok(),
        raw.to_string(),
    )
}

/// Holds the current [`Inventory`] and publishes every new one (the tunnel sends them to the
/// cloud).
#[derive(Debug)]
pub struct PluginRegistry {
    current: tokio::sync::watch::Sender<Arc<Inventory>>,
}

impl Default for PluginRegistry {
    fn default() -> Self {
        Self {
            current: tokio::sync::watch::Sender::new(Arc::new(Inventory::default())),
        }
    }
}

impl PluginRegistry {
    /// An empty registry at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current inventory; cheap, and stays consistent while held.
    pub fn snapshot(&self) -> Arc<Inventory> {
        self.current.borrow().clone()
    }

    /// Inventory events: every change, in order of revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Inventory>> {
        self.current.subscribe()
    }

    /// Replaces the whole inventory with records that may be shared with the previous one.
    pub fn replace_shared(&self, mut connectors: Vec<Arc<Connector>>) -> u64 {
        connectors.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| b.status.cmp(&a.status)));
        let mut revision = 0;
        self.current.send_modify(|current| {
            revision = current.revision + 1;
            *current = Arc::new(Inventory {
                revision,
                connectors,
            });
        });
        revision
    }
}

/// Files that are never connectors: hidden files and the usual in-progress copy names.
fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [
            ".part",
            ".tmp",
            ".crdownload",
            ".partial",
            ".swp",
            ".sig",
            ".lock",
        ]
        .iter()
        .any(|s| name.ends_with(s))
        || name.eq_ignore_ascii_case("README")
        || name.eq_ignore_ascii_case("README.md")
        || name.eq_ignore_ascii_case("README.txt")
}

fn is_cdylib_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".so")
        || lower.contains(".so.")
        || lower.ends_with(".dll")
        || lower.ends_with(".dylib")
}

/// The name of a store copy being written, before it is renamed to its digest.
const COPY_PREFIX: &str = ".copy-";

/// Names in the private folders (the store, the unpacked bundles) of work a load has not
/// finished: a copy being written, a bundle being unpacked, a damaged one being removed.
pub const UNFINISHED_PREFIXES: [&str; 3] =
    [COPY_PREFIX, bundle::UNPACK_PREFIX, bundle::DAMAGED_PREFIX];

/// A fresh name under `dir` starting with `prefix` (one of [`UNFINISHED_PREFIXES`]): the
/// garbage collection leaves dot-names to the loads that made them, and a start removes those
/// an earlier run left.
fn private_name(dir: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(dir.join(format!("{prefix}{}", hex::encode(suffix))))
}

/// Loads plugin files into [`Connector`] records.
#[derive(Debug, Clone)]
pub struct PluginLoader {
    config: Arc<SharedConfig>,
    state: StatePaths,
    /// The agent's quit token; every version's drain token is its child.
    abort: CancellationToken,
    /// Where worker restarts are counted.
    metrics: Arc<crate::metrics::Metrics>,
    /// The reason each file is being retried for (the state folder failed it): while it stays
    /// the same, the retry at every scan is logged at debug, so that a full disk is one
    /// warning per file, not one per file a minute.
    retrying: Arc<std::sync::Mutex<HashMap<PathBuf, String>>>,
}

/// What a load is doing: the progress line of one that takes long says it, so that an admin
/// waiting on a large bundle is not told of `info`'s time limit (which its unpacking is not
/// under), and one waiting on a hanging `info` is.
#[derive(Debug, Default)]
pub struct LoadStage(std::sync::atomic::AtomicU8);

/// The stages of a load, in order (a load may skip some).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    Checking,
    Copying,
    Unpacking,
    Info,
    Worker,
    InProcess,
}

impl LoadStage {
    fn set(&self, stage: Stage) {
        self.0
            .store(stage as u8, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> Stage {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Stage::Copying,
            2 => Stage::Unpacking,
            3 => Stage::Info,
            4 => Stage::Worker,
            5 => Stage::InProcess,
            _ => Stage::Checking,
        }
    }

    /// What the load is doing, in a few words ("unpacking the bundle").
    pub fn doing(&self) -> &'static str {
        match self.get() {
            Stage::Checking => "checking the file",
            Stage::Copying => "copying it into the state folder and computing its sha256",
            Stage::Unpacking => "unpacking the bundle",
            Stage::Info => "waiting for its `info`",
            Stage::Worker => "starting its worker",
            Stage::InProcess => "loading the library into the agent",
        }
    }

    /// [`Self::doing`], with the time limit of the stages that run the connector
    /// (`info_timeout`, `plugins.info_timeout_secs`): for the log of a load that takes long.
    pub fn describe(&self, info_timeout: Duration) -> String {
        match self.get() {
            Stage::Info => format!(
                "{}, which has up to plugins.info_timeout_secs = {info_timeout:?} to answer",
                self.doing()
            ),
            Stage::Worker | Stage::InProcess => format!(
                "{}, which has up to plugins.info_timeout_secs = {info_timeout:?} to load the \
                 library and answer",
                self.doing()
            ),
            _ => self.doing().into(),
        }
    }
}

impl PluginLoader {
    /// A loader for `config`'s plugins and state folders.
    pub fn new(
        config: Arc<SharedConfig>,
        state: StatePaths,
        abort: CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            config,
            state,
            abort,
            metrics,
            retrying: Arc::default(),
        }
    }

    /// Loads one plugin file, saying in `stage` what it is doing. Never fails: problems become
    /// a rejected record.
    pub async fn load(&self, path: PathBuf, stage: &LoadStage) -> Connector {
        let started = Instant::now();
        // Taken before reading: if the file changes during the load, the next reconcile sees a
        // different fingerprint and loads it again.
        let fingerprint = Fingerprint::of(&path);
        let mut connector = self.load_inner(path, stage).await;
        // No fingerprint for one to retry: the next scan sees it as changed.
        connector.fingerprint = fingerprint.filter(|_| !connector.retry);
        match (&connector.status, &connector.reason) {
            (ConnectorStatus::Ready | ConnectorStatus::Superseded, _) => tracing::info!(
                "loaded {} {} ({}, sha256 {}) from {} in {:.1?}",
                connector.app_id.as_deref().unwrap_or("?"),
                connector.version.as_deref().unwrap_or("?"),
                connector.kind.map(kind_name).unwrap_or("?"),
                connector.sha256.as_deref().map(|s| &s[..12]).unwrap_or("?"),
                connector.file_name(),
                started.elapsed()
            ),
            (ConnectorStatus::Rejected, reason) => {
                let reason = reason.as_deref().unwrap_or("no reason");
                if self.retried_for_the_same_reason(&connector, reason) {
                    tracing::debug!("still rejected {}: {reason}", connector.file_name());
                } else {
                    tracing::warn!("rejected {}: {reason}", connector.file_name());
                }
            }
        }
        if !connector.retry {
            self.lock_retrying().remove(&connector.path);
        }
        connector
    }

    /// Whether `connector` is rejected for the agent's own fault, for the same `reason` as at
    /// the last scan (remembering the reason for the next).
    fn retried_for_the_same_reason(&self, connector: &Connector, reason: &str) -> bool {
        if !connector.retry {
            return false;
        }
        let previous = self
            .lock_retrying()
            .insert(connector.path.clone(), reason.to_string());
        previous.as_deref() == Some(reason)
    }

    /// Forgets why `path` was being retried: it left the folder, and the same file dropped in
    /// again is news to the admin.
    pub fn forget(&self, path: &Path) {
        self.lock_retrying().remove(path);
    }

    fn lock_retrying(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, String>> {
        // A panic while holding it cannot leave the map half-changed: recover it.
        self.retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn load_inner(&self, path: PathBuf, stage: &LoadStage) -> Connector {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Follows symlinks: an admin may link a connector in. Loops and dangling links fail here.
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) => {
                let reason = if platform::os_error_is(&e, OsErrorKind::SymlinkLoop) {
                    "symlink loop: the link points back at itself".to_string()
                } else if e.kind() == std::io::ErrorKind::NotFound {
                    "dangling symlink: its target does not exist".to_string()
                } else {
                    format!("cannot read the file: {e}")
                };
                return Connector::rejected(path, None, None, reason);
            }
        };
        if meta.is_dir() {
            return Connector::rejected(
                path,
                None,
                None,
                "a folder, not a connector: drop the bundle archive (<app_id>-<version>.tar.gz) or an executable file".into(),
            );
        }
        // Before anything is read: a FIFO would block the read (and the reconcile waiting for
        // it) until a writer comes, a device (a link to /dev/zero) would never end.
        if let Some(what) = platform::not_a_regular_file(&meta) {
            return Connector::rejected(path, None, None, format!("{what}, not a connector file"));
        }
        let kind = if BundleFormat::from_file_name(&name).is_some() {
            ConnectorKind::Bundle
        } else if is_cdylib_name(&name) {
            ConnectorKind::Cdylib
        } else {
            ConnectorKind::Executable
        };
        // Before it is copied: a stray document or archive in the folder costs no copy.
        if kind == ConnectorKind::Executable && !platform::is_executable(&meta, &path) {
            return Connector::rejected(
                path,
                Some(kind),
                None,
                format!("not executable: `chmod +x {name}` if it is a connector executable, or name a bundle <app_id>-<version>.tar.gz"),
            );
        }
        let config = self.config.get();
        let max_bytes = config.plugins.max_file_bytes;
        if meta.len() > max_bytes {
            return Connector::rejected(
                path,
                Some(kind),
                None,
                format!(
                    "the file is {} bytes, over plugins.max_file_bytes ({max_bytes}): not copied or loaded; raise the limit if this connector is really that large",
                    meta.len()
                ),
            );
        }
        let trust = integrity::TrustPolicy::of(&config.plugins);
        let mut evidence = integrity::TrustEvidence::default();
        // Who could have written it, before anything of it is read or run.
        if trust.strict_permissions() {
            if let Err(reason) = integrity::check_permissions(&path) {
                return Connector::distrusted(path, Some(kind), None, reason);
            }
            evidence.permissions_checked = true;
        }
        // Executables and libraries run from a private, content-addressed copy made from the
        // same read that hashes them: the bytes hashed are the bytes run, and replacing or
        // breaking the file in the plugins folder cannot touch a version that is serving.
        stage.set(Stage::Copying);
        let (sha256, copy) = match store_copy(&path, &self.state.store(), &name, max_bytes).await {
            Ok(pair) => pair,
            Err(failure) => {
                return Connector::rejected_for(path, Some(kind), None, failure.into());
            }
        };
        // Whether the admin approved these bytes: the digest of the copy that will run.
        let approved = trust
            .check_digest(&sha256)
            .and_then(|()| trust.check_signature(&path, &sha256));
        match approved {
            Ok(signature) => evidence.signature = signature,
            Err(reason) => return Connector::distrusted(path, Some(kind), Some(sha256), reason),
        }
        let private_dir = match kind {
            ConnectorKind::Bundle => Some(self.state.bundles().join(&sha256[..32])),
            _ => copy.parent().map(Path::to_path_buf),
        };
        let program = copy;
        // A foreign or cut-short binary, named by its headers before anything runs or maps it
        // (the loader and the kernel would report it as something else: see `binary`).
        let use_ = match kind {
            ConnectorKind::Executable => Some(binary::Use::Run),
            ConnectorKind::Cdylib => Some(binary::Use::Load),
            ConnectorKind::Bundle => None,
        };
        if let Some(use_) = use_ {
            if let Err(problem) = binary::check(&program, use_) {
                return Connector::rejected(path, Some(kind), Some(sha256), problem.to_string());
            }
        }
        let result = match kind {
            ConnectorKind::Bundle => {
                // Unpacked from the verified copy, which is not needed afterwards.
                let loaded = self.load_bundle(&program, &name, &sha256, stage).await;
                // Only this copy; the folder goes if empty (another name may hold the same bytes).
                let _ = std::fs::remove_file(&program);
                if let Some(dir) = program.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
                loaded
            }
            ConnectorKind::Executable => self
                .load_executable(&program, &name, stage)
                .await
                .map_err(Rejection::from),
            ConnectorKind::Cdylib => self
                .load_native(&program, &name, stage)
                .await
                .map_err(Rejection::from),
        };
        match result {
            Ok((info, runner, bundle_app_id)) => {
                let app_id = bundle_app_id.unwrap_or_else(|| info.app_id.clone());
                let config = self.config.get();
                Connector {
                    path,
                    kind: Some(kind),
                    sha256: Some(sha256),
                    status: ConnectorStatus::Ready,
                    reason: None,
                    version: Some(info.version.as_str().into()),
                    runnable: Some(Runnable {
                        limits: limits::CallLimits::new(
                            config.max_concurrency_for(&app_id),
                            config.timeout_for(&app_id),
                        ),
                        info,
                        runner,
                        drain: self.abort.child_token(),
                    }),
                    app_id: Some(app_id),
                    fingerprint: None,
                    retry: false,
                    distrusted: false,
                    trust: evidence,
                    private_dir,
                }
            }
            Err(rejection) => Connector::rejected_for(path, Some(kind), Some(sha256), rejection),
        }
    }

    async fn load_bundle(
        &self,
        path: &Path,
        name: &str,
        sha256: &str,
        stage: &LoadStage,
    ) -> Result<Loaded, Rejection> {
        let format = BundleFormat::from_file_name(name).ok_or("not a bundle name")?;
        let limits = BundleLimits {
            max_bytes: self.config.get().plugins.max_bundle_bytes,
            max_entries: self.config.get().plugins.max_bundle_entries,
        };
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let bundles = self.state.bundles();
        let (archive, sha) = (path.to_path_buf(), sha256.to_string());
        let started = Instant::now();
        if size > 16 << 20 {
            // The first load of a large bundle takes seconds; say so before, not only after.
            tracing::info!(
                "checking or unpacking {name} ({:.1} MiB)…",
                size as f64 / (1024.0 * 1024.0)
            );
        }
        stage.set(Stage::Unpacking);
        let unpacked = tokio::task::spawn_blocking(move || {
            bundle::unpack(&archive, format, &sha, &bundles, limits)
        })
        .await
        .map_err(|e| format!("unpacking failed: {e}"))?
        .map_err(|e| Rejection {
            // The state folder's trouble (a full disk), not the bundle's.
            retry: matches!(e, bundle::BundleError::Io(_)),
            reason: e.to_string(),
        })?;
        if unpacked.freshly_unpacked {
            tracing::info!(
                "unpacked {name} ({:.1} MiB) into {} in {:.1?}",
                size as f64 / (1024.0 * 1024.0),
                unpacked.dir.display(),
                started.elapsed()
            );
        }
        binary::check(&unpacked.program, binary::Use::Run).map_err(|problem| {
            let program = unpacked
                .program
                .strip_prefix(&unpacked.dir)
                .unwrap_or(&unpacked.program);
            format!("its program {}: {problem}", program.display())
        })?;
        let (info, runner, _) = self.load_executable(&unpacked.program, name, stage).await?;
        if info.version != unpacked.version {
            tracing::warn!(
                "{name}: metadata.toml says version {} but `info` says {}; serving as {}",
                unpacked.version,
                info.version,
                info.version
            );
        }
        if info.app_id != unpacked.app_id {
            // compile-on-prem writes the on-prem app_id into metadata.toml while `info` keeps
            // the connector's own; the cloud addresses on-prem bundles by the former.
            tracing::debug!(
                "{name}: served as {} (metadata.toml); `info` says {}",
                unpacked.app_id,
                info.app_id
            );
        }
        Ok((info, runner, Some(unpacked.app_id)))
    }

    async fn load_executable(
        &self,
        program: &Path,
        name: &str,
        stage: &LoadStage,
    ) -> Result<Loaded, String> {
        stage.set(Stage::Info);
        let env = self.connector_env(name)?;
        let limits = ExecLimits {
            timeout: self.config.get().plugins.info_timeout,
            kill_grace: self.config.get().calls.kill_grace,
            max_output_bytes: 16 << 20,
            stderr_keep: self.config.get().calls.stderr_log_bytes,
            spool_dir: self.state.calls(),
        };
        let args = [OsString::from("info")];
        let output = exec::run(program, &args, &env, &limits, crate::stop::CallStop::by(&CancellationToken::new())).await.map_err(|e| match e {
            exec::ExecError::Spawn { source, .. } if platform::os_error_is(&source, OsErrorKind::NotExecutable) => {
                "cannot execute: not a program for this machine (a script needs a #! line naming its interpreter, such as #!/bin/sh)".to_string()
            }
            exec::ExecError::Spawn { source, .. } => format!("cannot execute: {source}"),
            exec::ExecError::Timeout(t) => format!("`info` gave no answer within {t:?} (plugins.info_timeout_secs)"),
            other => format!("`info` failed: {other}"),
        })?;
        let stdout = output
            .stdout
            .to_bytes()
            .await
            .map_err(|e| format!("reading `info` output failed: {e}"))?;
        let parsed = info::parse(&stdout);
        if !output.status.success() {
            let status = exec::describe_status(&output.status);
            let hint = output.stderr_tail.lines().last().unwrap_or("").trim();
            let hint = if hint.is_empty() {
                String::new()
            } else {
                format!("; last stderr line: {}", truncate(hint, 200))
            };
            return match parsed {
                Ok(info) => {
                    tracing::warn!(
                        "{name}: `info` {status} but printed a valid document; accepting it"
                    );
                    Ok((
                        info,
                        Runner::Executable {
                            program: program.to_path_buf(),
                            env,
                        },
                        None,
                    ))
                }
                Err(_) => Err(format!("`info` {status}{hint}")),
            };
        }
        parsed.map(|info| {
            (
                info,
                Runner::Executable {
                    program: program.to_path_buf(),
                    env,
                },
                None,
            )
        })
    }
}

impl PluginLoader {
    /// A connector's environment: the scrubbed allow-list, its private working folder, and
    /// connector-py's logging variables.
    fn connector_env(&self, name: &str) -> Result<ProcessEnv, String> {
        let workdir = self
            .state
            .workdir_for(name)
            .map_err(|e| format!("cannot create its working folder: {e}"))?;
        let config = self.config.get();
        Ok(ProcessEnv::for_connector(
            workdir,
            &self.state.connector_logs(),
            &config.calls.connector_log_level,
            &config.calls.pass_env,
        ))
    }

    /// Loads a native library: a worker process loads it and checks its header first (a
    /// library's initialisers run at load, so never in the agent unless vetted). With
    /// `[connectors.<app_id>] in_process = true` it is then loaded into the agent from a
    /// content-addressed copy.
    async fn load_native(
        &self,
        path: &Path,
        name: &str,
        stage: &LoadStage,
    ) -> Result<Loaded, String> {
        stage.set(Stage::Worker);
        let program = crate::platform::agent_program(&self.config.get())
            .map_err(|e| format!("cannot find the agent binary to start a worker: {e}"))?;
        let settings = WorkerSettings {
            program,
            env: self.connector_env(name)?,
            max_output_bytes: self.config.get().calls.max_output_bytes,
            start_timeout: self.config.get().plugins.info_timeout,
            metrics: self.metrics.clone(),
        };
        let (worker, description) = WorkerConnector::start(path, settings).await?;
        if !self.config.get().in_process(&description.id) {
            return Ok((description.info, Runner::Worker(Arc::new(worker)), None));
        }
        drop(worker);
        // `path` is already the content-addressed store copy.
        let path = path.to_path_buf();
        stage.set(Stage::InProcess);
        // A library that loaded in a worker can still hang in the agent (its `init` may wait on
        // something only this process has). Its thread cannot be stopped, but the load must not
        // hold up every later scan: it is given up on, and the thread left to the exit.
        let limit = self.config.get().plugins.info_timeout;
        let loading = tokio::task::spawn_blocking(move || InProcessConnector::load(&path));
        let (connector, description) = tokio::time::timeout(limit, loading)
            .await
            .map_err(|_| {
                format!(
                    "loading it into the agent took over {limit:?} (plugins.info_timeout_secs), \
                     though it loaded in a worker; its thread stays stuck until the agent \
                     restarts. Serve it from a worker (remove in_process = true for it)"
                )
            })?
            .map_err(|e| format!("in-process load failed: {e}"))??;
        tracing::info!(
            "{name}: loaded in-process (vetted by [connectors.{}] in_process = true)",
            description.id
        );
        Ok((
            description.info,
            Runner::InProcess(Arc::new(connector)),
            None,
        ))
    }
}

/// `info`, how to call it, and (bundles) the app_id from metadata.toml.
type Loaded = (ConnectorInfo, Runner, Option<String>);

fn kind_name(kind: ConnectorKind) -> &'static str {
    match kind {
        ConnectorKind::Bundle => "bundle",
        ConnectorKind::Executable => "executable",
        ConnectorKind::Cdylib => "cdylib",
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Why a file was not loaded.
#[derive(Debug)]
struct Rejection {
    /// What to fix, for the inventory.
    reason: String,
    /// The agent's own fault (see [`Connector::retry`]).
    retry: bool,
}

impl From<String> for Rejection {
    fn from(reason: String) -> Self {
        Self {
            reason,
            retry: false,
        }
    }
}

impl From<&str> for Rejection {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

impl From<CopyFailure> for Rejection {
    fn from(failure: CopyFailure) -> Self {
        Self {
            retry: matches!(failure, CopyFailure::Store(_)),
            reason: failure.to_string(),
        }
    }
}

/// Why a plugin file could not be copied into the store.
#[derive(Debug, thiserror::Error)]
enum CopyFailure {
    /// The plugin file: gone, unreadable, not a regular file, grown past the limit.
    #[error("cannot read the file: {0}")]
    File(std::io::Error),
    /// The agent's own state folder (a full disk, say): nothing is wrong with the file.
    #[error("cannot copy it into the state folder ({0}); it is tried again at the next scan")]
    Store(std::io::Error),
}

/// Copies `path` to `<store>/<sha256>/<name>` (executable, private), hashing what it copies in
/// the same read: the copy that runs is the bytes hashed. An existing copy of the same content
/// is reused, unless its size says it was damaged since (then the new copy replaces it). At
/// most `max_bytes` (a file growing past them is refused), and only a regular
/// file (it may have become a FIFO or a link to a device since it was looked at: see
/// [`platform::open_regular_file`]).
async fn store_copy(
    path: &Path,
    store: &Path,
    name: &str,
    max_bytes: u64,
) -> Result<(String, PathBuf), CopyFailure> {
    use crate::platform::{DirBuilderExt, OpenOptionsExt};
    use std::io::Write;
    let (path, store, name) = (path.to_path_buf(), store.to_path_buf(), name.to_string());
    let make_dir = |dir: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(CopyFailure::Store)
    };
    tokio::task::spawn_blocking(move || {
        make_dir(&store)?;
        let tmp = private_name(&store, COPY_PREFIX).map_err(CopyFailure::Store)?;
        let result = (|| {
            // One byte over the limit tells a file that grew past it.
            let mut from = platform::open_regular_file(&path)
                .map_err(CopyFailure::File)?
                .take(max_bytes.saturating_add(1));
            let mut copied = 0u64;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&tmp)
                .map_err(CopyFailure::Store)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = from.read(&mut buf).map_err(CopyFailure::File)?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                if copied > max_bytes {
                    return Err(CopyFailure::File(std::io::Error::other(format!(
                        "it grew over plugins.max_file_bytes ({max_bytes}) while it was read"
                    ))));
                }
                hasher.update(&buf[..n]);
                to.write_all(&buf[..n]).map_err(CopyFailure::Store)?;
            }
            to.sync_all().map_err(CopyFailure::Store)?;
            let sha = hex::encode(hasher.finalize());
            let dir = store.join(&sha);
            let copy = dir.join(&name);
            match std::fs::symlink_metadata(&copy) {
                Ok(meta) if meta.is_file() && meta.len() == copied => {
                    std::fs::remove_file(&tmp).map_err(CopyFailure::Store)?;
                }
                existing => {
                    if existing.is_ok() {
                        // Named by a digest of other bytes: cut short or grown since (a damaged
                        // disk, a hand in the state folder). Running it would fail, or run
                        // something else.
                        tracing::warn!(copy = %copy.display(), "the stored copy of {name} was damaged; it is replaced");
                    }
                    make_dir(&dir)?;
                    std::fs::rename(&tmp, &copy).map_err(CopyFailure::Store)?;
                }
            }
            Ok((sha, copy))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    })
    .await
    .map_err(|e| CopyFailure::Store(std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_progress_copies_are_ignored() {
        for name in [".hidden", "x.part", "x.tmp", "x~", "x.crdownload"] {
            assert!(is_ignored(name), "{name}");
        }
        assert!(!is_ignored("connector"));
    }

    #[test]
    fn highest_semver_wins() {
        assert!(version_key(Some("1.10.0")) > version_key(Some("1.9.0")));
        assert!(version_key(Some("0.2.0")) > version_key(Some("0.2.0-rc.1")));
    }
}
