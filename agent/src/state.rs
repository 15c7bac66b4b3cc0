//! The agent's private state folder and what lives in it.
//!
//! ```text
//! <state_dir>/            0700
//!   agent.lock            0600  held by the running agent (its pid inside): one agent per folder
//!   admin.token           0600  bearer token for the local API (written at first start)
//!   tenants.enc           0600  agent-held tenants (settings and credentials), encrypted
//!   tenants.key           0600  the tenant store's key (unless the service manager gives one)
//!   bundles/<sha256>/           unpacked connector bundles, content-addressed
//!   store/<sha256>/<name>       private copies of plugin executables and libraries, run from here
//!   work/<plugin>/              each connector's private working folder (HOME, TMPDIR)
//!   calls/                0700  call input files (0600), deleted after each call
//!   outbox/               0700  results the cloud had not acknowledged when the agent stopped
//!                               (0600), read back and removed at the next start
//!   logs/connectors/            connector-py log files (LUMOS_LOG_DIRECTORY)
//! ```

use crate::platform::{self, DirBuilderExt, OpenOptionsExt};
use std::fs;
use std::path::{Path, PathBuf};

/// Paths inside the state folder.
#[derive(Debug, Clone)]
pub struct StatePaths {
    /// The folder itself.
    pub root: PathBuf,
}

impl StatePaths {
    /// Paths under `root`; nothing is created yet.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Creates the folder tree with private modes.
    pub fn prepare(&self) -> std::io::Result<()> {
        for dir in [
            &self.root,
            &self.bundles(),
            &self.work(),
            &self.calls(),
            &self.outbox(),
            &self.connector_logs(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        for private in [&self.root, &self.calls(), &self.outbox()] {
            platform::set_mode(private, 0o700)?;
        }
        Ok(())
    }

    /// This install's stable identity for the cloud (`Hello.agent_id`).
    pub fn agent_id(&self) -> PathBuf {
        self.root.join("agent-id")
    }

    /// The lock the running agent holds (see [`StatePaths::lock`]).
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    /// Takes the folder for this process alone, or names the process that has it. Why: two
    /// agents on one folder would each read back the other's unacknowledged results, mark the
    /// other's running calls interrupted, and overwrite each other's tenant store, losing a
    /// rotated refresh token; and would both dial the cloud as the same agent.
    pub fn lock(&self) -> std::io::Result<Result<platform::ExclusiveLock, Option<u32>>> {
        platform::try_lock_exclusive(&self.lock_file())
    }

    /// The local API's admin bearer token.
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    /// The agent-held tenant store.
    pub fn tenants(&self) -> PathBuf {
        self.root.join("tenants.enc")
    }

    /// The plaintext tenant store of earlier versions, migrated at start.
    pub fn tenants_plaintext(&self) -> PathBuf {
        self.root.join("tenants.json")
    }

    /// The tenant store's key, when the service manager gives none.
    pub fn tenants_key(&self) -> PathBuf {
        self.root.join("tenants.key")
    }

    /// Unpacked bundles.
    pub fn bundles(&self) -> PathBuf {
        self.root.join("bundles")
    }

    /// Connectors' working folders.
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// The working folder of the plugin file `file_name`, created on demand.
    pub fn workdir_for(&self, file_name: &str) -> std::io::Result<PathBuf> {
        let safe: String = file_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = self.work().join(safe.trim_start_matches('.'));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("tmp"))?;
        Ok(dir)
    }

    /// Private, content-addressed copies of plugin executables and libraries, run from there.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Call input files.
    pub fn calls(&self) -> PathBuf {
        self.root.join("calls")
    }

    /// Results kept across a restart (`tunnel::outbox`).
    pub fn outbox(&self) -> PathBuf {
        self.root.join("outbox")
    }

    /// Connector log files.
    pub fn connector_logs(&self) -> PathBuf {
        self.root.join("logs").join("connectors")
    }
}

/// Writes `contents` to `path` atomically: a temporary file in the same folder, fsync, rename,
/// fsync of the folder. A crash leaves the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    write_atomic_with(path, mode, |file| file.write_all(contents))
}

/// [`write_atomic`] for contents written by `write` (streamed, however large).
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent folder"))?;
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        platform::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads the admin token, creating a random one (0600) at first start.
pub fn ensure_admin_token(path: &Path) -> std::io::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let token = hex::encode(bytes);
    write_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn admin_token_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path().join("state"));
        state.prepare().unwrap();
        let first = ensure_admin_token(&state.admin_token()).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(ensure_admin_token(&state.admin_token()).unwrap(), first);
        let mode = fs::metadata(state.admin_token())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(&state.root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn workdir_names_are_sanitized() {
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path().to_path_buf());
        let w = state.workdir_for("../evil name").unwrap();
        assert!(w.starts_with(state.work()), "{}", w.display());
    }
}
