//! The plugins folder and the registry of connectors found in it.
//!
//! Every file in the folder becomes one [`Connector`] record, `ready` or `rejected` with a reason
//! a person can act on; nothing a plugin file contains can stop the agent from starting.
//! The registry is a snapshot swapped atomically ([`PluginRegistry::replace`]) so calls never
//! see a half-updated inventory.

pub mod bundle;
pub mod info;

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{CallError, ErrorCode};
use crate::exec::{self, ExecLimits, ProcessEnv};
use crate::native::{InProcessConnector, WorkerConnector, WorkerSettings};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorStatus {
    /// Loaded and answering.
    Ready,
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
    /// The version, when known.
    pub version: Option<String>,
    /// How to call it; present exactly when `status` is `Ready`.
    pub runnable: Option<Runnable>,
}

/// What a ready connector needs to be called.
#[derive(Debug)]
pub struct Runnable {
    /// Its `info`.
    pub info: ConnectorInfo,
    /// How calls reach it.
    pub runner: Runner,
    /// Per-connector concurrency limit.
    pub limiter: Arc<Semaphore>,
    /// Its call deadline.
    pub timeout: Duration,
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
        Self {
            path,
            kind,
            sha256,
            status: ConnectorStatus::Rejected,
            reason: Some(reason),
            app_id: None,
            version: None,
            runnable: None,
        }
    }

    /// The file's name, for messages.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The API's view of this connector.
    pub fn view(&self, with_info: bool) -> ConnectorView {
        ConnectorView {
            app_id: self.app_id.clone(),
            version: self.version.clone(),
            kind: self.kind,
            status: self.status,
            reason: self.reason.clone(),
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
            capabilities: self
                .runnable
                .as_ref()
                .map(|r| r.info.capabilities.clone())
                .unwrap_or_default(),
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
    /// ready or rejected.
    pub status: ConnectorStatus,
    /// Why it was rejected.
    pub reason: Option<String>,
    /// The file in the plugins folder.
    pub path: String,
    /// sha256 of the file.
    pub sha256: Option<String>,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// The full `info` response (detail view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// A consistent view of every connector, with a revision that grows on every change.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Grows by one on every change.
    pub revision: u64,
    /// Every plugin file, sorted by path.
    pub connectors: Vec<Arc<Connector>>,
}

impl Inventory {
    /// The connector serving `app_id`: the highest ready version.
    pub fn resolve(&self, app_id: &str) -> Result<Arc<Connector>, CallError> {
        let candidates = self
            .connectors
            .iter()
            .filter(|c| c.app_id.as_deref() == Some(app_id));
        let best = candidates
            .clone()
            .filter(|c| c.status == ConnectorStatus::Ready)
            .max_by(|a, b| {
                version_key(a.version.as_deref()).cmp(&version_key(b.version.as_deref()))
            });
        if let Some(best) = best {
            return Ok(best.clone());
        }
        if let Some(rejected) = candidates.clone().next() {
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

    /// Number of ready connectors.
    pub fn ready_count(&self) -> usize {
        self.connectors
            .iter()
            .filter(|c| c.status == ConnectorStatus::Ready)
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

/// Holds the current [`Inventory`].
#[derive(Debug, Default)]
pub struct PluginRegistry {
    current: RwLock<Arc<Inventory>>,
}

impl PluginRegistry {
    /// An empty registry at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current inventory; cheap, and stays consistent while held.
    pub fn snapshot(&self) -> Arc<Inventory> {
        self.current.read().expect("registry lock poisoned").clone()
    }

    /// Replaces the whole inventory, returning the new revision.
    pub fn replace(&self, mut connectors: Vec<Connector>) -> u64 {
        connectors.sort_by(|a, b| a.path.cmp(&b.path));
        let mut current = self.current.write().expect("registry lock poisoned");
        let revision = current.revision + 1;
        *current = Arc::new(Inventory {
            revision,
            connectors: connectors.into_iter().map(Arc::new).collect(),
        });
        revision
    }
}

/// Files that are never connectors: hidden files and the usual in-progress copy names.
fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".part", ".tmp", ".crdownload", ".partial", ".swp"]
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

/// Loads plugin files into [`Connector`] records.
#[derive(Debug, Clone)]
pub struct PluginLoader {
    config: Arc<Config>,
    state: StatePaths,
}

impl PluginLoader {
    /// A loader for `config`'s plugins and state folders.
    pub fn new(config: Arc<Config>, state: StatePaths) -> Self {
        Self { config, state }
    }

    /// Loads every file in the plugins folder, a few at a time (`info` of a Python connector
    /// takes about a second; bundles take seconds to unpack the first time).
    pub async fn scan(&self) -> Vec<Connector> {
        let dir = &self.config.plugins_dir;
        let mut names = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the plugins folder; no connectors loaded");
                return Vec::new();
            }
        };
        names.sort();
        let limit = Arc::new(Semaphore::new(4));
        let mut tasks = tokio::task::JoinSet::new();
        for path in names {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if is_ignored(&name) {
                tracing::debug!(file = %name, "ignoring hidden or in-progress file");
                continue;
            }
            let loader = self.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                loader.load(path).await
            });
        }
        let mut out = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(connector) => out.push(connector),
                Err(e) => {
                    tracing::error!(error = %e, "a plugin load task failed; that file is skipped until the next scan")
                }
            }
        }
        out
    }

    /// Loads one plugin file. Never fails: problems become a rejected record.
    pub async fn load(&self, path: PathBuf) -> Connector {
        let started = Instant::now();
        let connector = self.load_inner(path).await;
        match (&connector.status, &connector.reason) {
            (ConnectorStatus::Ready, _) => tracing::info!(
                "loaded {} {} ({}, sha256 {}) from {} in {:.1?}",
                connector.app_id.as_deref().unwrap_or("?"),
                connector.version.as_deref().unwrap_or("?"),
                connector.kind.map(kind_name).unwrap_or("?"),
                connector.sha256.as_deref().map(|s| &s[..12]).unwrap_or("?"),
                connector.file_name(),
                started.elapsed()
            ),
            (ConnectorStatus::Rejected, reason) => {
                tracing::warn!(
                    "rejected {}: {}",
                    connector.file_name(),
                    reason.as_deref().unwrap_or("no reason")
                );
            }
        }
        connector
    }

    async fn load_inner(&self, path: PathBuf) -> Connector {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Follows symlinks: an admin may link a connector in. Loops and dangling links fail here.
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) => {
                let reason = if e.raw_os_error() == Some(nix::libc::ELOOP) {
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
        let kind = if BundleFormat::from_file_name(&name).is_some() {
            ConnectorKind::Bundle
        } else if is_cdylib_name(&name) {
            ConnectorKind::Cdylib
        } else {
            ConnectorKind::Executable
        };
        let sha256 = match hash_file(&path).await {
            Ok(sha) => sha,
            Err(e) => {
                return Connector::rejected(
                    path,
                    Some(kind),
                    None,
                    format!("cannot read the file: {e}"),
                )
            }
        };
        let result = match kind {
            ConnectorKind::Bundle => self.load_bundle(&path, &name, &sha256).await,
            ConnectorKind::Executable => {
                if meta.permissions().mode() & 0o111 == 0 {
                    Err(format!(
                        "not executable: `chmod +x {name}` if it is a connector executable, or name a bundle <app_id>-<version>.tar.gz"
                    ))
                } else {
                    self.load_executable(&path, &name).await
                }
            }
            ConnectorKind::Cdylib => self.load_native(&path, &name, &sha256).await,
        };
        match result {
            Ok((info, runner, bundle_app_id)) => {
                let app_id = bundle_app_id.unwrap_or_else(|| info.app_id.clone());
                let limit = self.config.max_concurrency_for(&app_id);
                Connector {
                    path,
                    kind: Some(kind),
                    sha256: Some(sha256),
                    status: ConnectorStatus::Ready,
                    reason: None,
                    version: Some(info.version.clone()),
                    runnable: Some(Runnable {
                        timeout: self.config.timeout_for(&app_id),
                        info,
                        runner,
                        limiter: Arc::new(Semaphore::new(limit)),
                    }),
                    app_id: Some(app_id),
                }
            }
            Err(reason) => Connector::rejected(path, Some(kind), Some(sha256), reason),
        }
    }

    async fn load_bundle(&self, path: &Path, name: &str, sha256: &str) -> Result<Loaded, String> {
        let format = BundleFormat::from_file_name(name).ok_or("not a bundle name")?;
        let limits = BundleLimits {
            max_bytes: self.config.plugins.max_bundle_bytes,
            max_entries: self.config.plugins.max_bundle_entries,
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
        let unpacked = tokio::task::spawn_blocking(move || {
            bundle::unpack(&archive, format, &sha, &bundles, limits)
        })
        .await
        .map_err(|e| format!("unpacking failed: {e}"))?
        .map_err(|e| e.to_string())?;
        if unpacked.freshly_unpacked {
            tracing::info!(
                "unpacked {name} ({:.1} MiB) into {} in {:.1?}",
                size as f64 / (1024.0 * 1024.0),
                unpacked.dir.display(),
                started.elapsed()
            );
        }
        let (info, runner, _) = self.load_executable(&unpacked.program, name).await?;
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

    async fn load_executable(&self, program: &Path, name: &str) -> Result<Loaded, String> {
        let workdir = self
            .state
            .workdir_for(name)
            .map_err(|e| format!("cannot create its working folder: {e}"))?;
        let env = ProcessEnv::for_connector(
            workdir,
            &self.state.connector_logs(),
            &self.config.calls.connector_log_level,
            &self.config.calls.pass_env,
        );
        let limits = ExecLimits {
            timeout: self.config.plugins.info_timeout,
            kill_grace: self.config.calls.kill_grace,
            max_output_bytes: 16 << 20,
            stderr_keep: self.config.calls.stderr_log_bytes,
        };
        let args = [OsString::from("info")];
        let output = exec::run(program, &args, &env, &limits, &CancellationToken::new()).await.map_err(|e| match e {
            exec::ExecError::Spawn { source, .. } if source.raw_os_error() == Some(nix::libc::ENOEXEC) => {
                "cannot execute: not a program for this machine (truncated file, another architecture, or a script without #!)".to_string()
            }
            exec::ExecError::Spawn { source, .. } => format!("cannot execute: {source}"),
            exec::ExecError::Timeout(t) => format!("`info` gave no answer within {t:?} (plugins.info_timeout_secs)"),
            other => format!("`info` failed: {other}"),
        })?;
        let parsed = info::parse(&output.stdout);
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
    /// Loads a native library: a worker process loads it and checks its header first (a
    /// library's initialisers run at load, so never in the agent unless vetted). With
    /// `[connectors.<app_id>] in_process = true` it is then loaded into the agent from a
    /// content-addressed copy.
    async fn load_native(&self, path: &Path, name: &str, sha256: &str) -> Result<Loaded, String> {
        let workdir = self
            .state
            .workdir_for(name)
            .map_err(|e| format!("cannot create its working folder: {e}"))?;
        let program = match &self.config.plugins.worker_program {
            Some(program) => program.clone(),
            // /proc/self/exe still works after a package upgrade replaced the file on disk.
            None if cfg!(target_os = "linux") => PathBuf::from("/proc/self/exe"),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find the agent binary to start a worker: {e}"))?,
        };
        let settings = WorkerSettings {
            program,
            env: ProcessEnv::for_connector(
                workdir,
                &self.state.connector_logs(),
                &self.config.calls.connector_log_level,
                &self.config.calls.pass_env,
            ),
            max_output_bytes: self.config.calls.max_output_bytes,
            start_timeout: self.config.plugins.info_timeout,
        };
        let (worker, description) = WorkerConnector::start(path, settings).await?;
        if !self.config.in_process(&description.id) {
            return Ok((description.info, Runner::Worker(Arc::new(worker)), None));
        }
        drop(worker);
        let (path, sha, copies) = (
            path.to_path_buf(),
            sha256.to_string(),
            self.state.native_copies(),
        );
        let (connector, description) =
            tokio::task::spawn_blocking(move || InProcessConnector::load(&path, &sha, &copies))
                .await
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

/// sha256 of a file, streamed.
async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
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
