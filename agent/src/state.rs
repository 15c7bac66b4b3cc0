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

use zeroize::Zeroizing;

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

    /// The folders whose contents the agent writes and removes by itself (copies, unpacked
    /// bundles, call files, kept results, logs past their days): no place for anything else,
    /// the plugins folder least of all.
    pub fn own_folders(&self) -> [PathBuf; 6] {
        [
            self.bundles(),
            self.work(),
            self.store(),
            self.calls(),
            self.outbox(),
            self.logs(),
        ]
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

    /// Log files: the connectors' (in `connectors`) and, for the Windows service, the agent's.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Connector log files.
    pub fn connector_logs(&self) -> PathBuf {
        self.logs().join("connectors")
    }
}

/// Removes the regular files directly in `dir` that nothing has written to for `max_age`
/// before `now` (by their modification time), and returns how many it removed. Folders and
/// links are left alone, and a file that cannot be removed is logged and skipped.
pub fn remove_files_older_than(
    dir: &Path,
    max_age: std::time::Duration,
    now: std::time::SystemTime,
) -> std::io::Result<usize> {
    let Some(cutoff) = now.checked_sub(max_age) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in fs::read_dir(dir)?.filter_map(Result::ok) {
        // Not followed: a link's target is not the agent's to remove.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if !meta.is_file() || meta.modified().map_or(true, |written| written >= cutoff) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            // Removed meanwhile (by an admin, or another pass): nothing to do.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an old file")
            }
        }
    }
    Ok(removed)
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

/// The admin token as `api.admin_token` has it: read, or made at first start, when on; when
/// off, its file is removed (a token the agent refuses is no file to leave to whoever finds
/// it) and there is none.
pub fn admin_token_in_force(
    path: &Path,
    enabled: bool,
) -> std::io::Result<Option<Zeroizing<String>>> {
    if enabled {
        return ensure_admin_token(path).map(Some);
    }
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(
            "removed {}: api.admin_token = false, only the users of [api.users] or [api.ldap] log in",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(None)
}

/// Reads the admin token, creating a random one (0600) at first start. Every copy of it here
/// is zeroized when dropped.
fn ensure_admin_token(path: &Path) -> std::io::Result<Zeroizing<String>> {
    match fs::read_to_string(path).map(Zeroizing::new) {
        Ok(text) if !text.trim().is_empty() => return Ok(Zeroizing::new(text.trim().to_string())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).map_err(|e| std::io::Error::other(e.to_string()))?;
    let line = Zeroizing::new(format!("{}\n", hex::encode(bytes.as_ref())));
    write_atomic(path, line.as_bytes(), 0o600)?;
    Ok(Zeroizing::new(line.trim_end().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_not_written_to_for_the_age_are_removed() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let aged = |name: &str, age: Duration| {
            let path = dir.path().join(name);
            fs::write(&path, "a line\n").unwrap();
            fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(now - age)
                .unwrap();
            path
        };
        let old = aged("app_2026-11-01.log", 20 * day);
        let just_past = aged("app_2026-11-22.log", 14 * day + Duration::from_secs(60));
        let recent = aged("app_2026-12-06.log", day);
        let edge = aged("app_2026-11-23.log", 14 * day - Duration::from_secs(60));
        // A folder and a link, however old, are not the agent's files to remove.
        let folder = dir.path().join("sub");
        fs::create_dir(&folder).unwrap();
        fs::File::open(&folder)
            .unwrap()
            .set_modified(now - 20 * day)
            .unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("kept.log");
        fs::write(&target, "").unwrap();
        fs::File::options()
            .write(true)
            .open(&target)
            .unwrap()
            .set_modified(now - 20 * day)
            .unwrap();
        #[cfg(unix)]
        let link = dir.path().join("link.log");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let old = nix::sys::time::TimeSpec::from_duration(
                (now - 20 * day)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap(),
            );
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &link,
                &old,
                &old,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }

        let removed = remove_files_older_than(dir.path(), 14 * day, now).unwrap();
        assert_eq!(removed, 2);
        assert!(!old.exists() && !just_past.exists());
        assert!(recent.exists() && edge.exists() && folder.is_dir() && target.exists());
        #[cfg(unix)]
        assert!(link.symlink_metadata().is_ok(), "the link was removed");
        // Nothing left to remove; a missing folder is an error the caller logs.
        assert_eq!(
            remove_files_older_than(dir.path(), 14 * day, now).unwrap(),
            0
        );
        assert!(remove_files_older_than(&dir.path().join("missing"), day, now).is_err());
    }

    #[test]
    fn an_admin_token_turned_off_is_removed_and_turned_on_again_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let first = admin_token_in_force(&path, true).unwrap().unwrap();
        assert_eq!(admin_token_in_force(&path, false).unwrap(), None);
        assert!(!path.exists());
        assert_eq!(admin_token_in_force(&path, false).unwrap(), None);
        let second = admin_token_in_force(&path, true).unwrap().unwrap();
        assert_ne!(first, second);
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), second.as_str());
    }

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
