//! What differs between Unix and Windows, in one place: file modes, process groups, the
//! identity the agent runs as, and OS error kinds. Everything else in the agent is portable and
//! calls these instead of `std::os::unix`.
//!
//! On Windows, file privacy comes from the ACLs the folders inherit (the service's
//! `%ProgramData%` folder is created by the installer for SYSTEM and Administrators), so the mode
//! arguments are accepted and ignored; a connector's helpers are stopped through a job object
//! instead of a process group.

use std::path::Path;

/// `.mode(..)` on [`std::fs::DirBuilder`] and [`std::fs::OpenOptions`]: the Unix permission bits
/// for what is created. Import these instead of the `std::os::unix` traits.
#[cfg(unix)]
pub use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

/// `.mode(..)` on a [`std::fs::DirBuilder`]; Windows folders inherit their ACLs instead.
#[cfg(windows)]
pub trait DirBuilderExt {
    /// Ignored on Windows.
    fn mode(&mut self, mode: u32) -> &mut Self;
}

#[cfg(windows)]
impl DirBuilderExt for std::fs::DirBuilder {
    fn mode(&mut self, _mode: u32) -> &mut Self {
        self
    }
}

/// `.mode(..)` on [`std::fs::OpenOptions`]; Windows files inherit their folder's ACLs instead.
#[cfg(windows)]
pub trait OpenOptionsExt {
    /// Ignored on Windows.
    fn mode(&mut self, mode: u32) -> &mut Self;
}

#[cfg(windows)]
impl OpenOptionsExt for std::fs::OpenOptions {
    fn mode(&mut self, _mode: u32) -> &mut Self {
        self
    }
}

/// Whether the agent checks who may read or write its files: the Unix mode bits. Windows ACLs
/// are not checked (see above), so whatever says a file is private must ask this first.
pub const PERMISSIONS_CHECKED: bool = cfg!(unix);

/// What a file that is neither a regular file nor a folder is ("a named pipe (FIFO)", "a
/// device", …, else "a special file"), to follow "it is" in a message; `None` for those two.
pub fn not_a_regular_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    if meta.is_file() || meta.is_dir() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        if kind.is_fifo() {
            return Some("a named pipe (FIFO)");
        }
        if kind.is_socket() {
            return Some("a socket");
        }
        if kind.is_char_device() || kind.is_block_device() {
            return Some("a device");
        }
    }
    Some("a special file")
}

/// Opens `path` (following links) for reading, if it is a regular file. Checked on the opened
/// file, so a file replaced since it was looked at cannot slip through; and on Unix opened
/// without waiting, as opening a FIFO waits for a writer. Reading a FIFO or a device could
/// wait for ever or never end.
pub fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, nix::libc::O_NONBLOCK);
    let file = open.open(path)?;
    let meta = file.metadata()?;
    match not_a_regular_file(&meta) {
        None if meta.is_dir() => Err(std::io::Error::other("it is a folder")),
        None => Ok(file),
        Some(what) => Err(std::io::Error::other(format!("it is {what}"))),
    }
}

/// Sets `path`'s permission bits (tightens a folder created earlier with looser ones).
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(windows)]
    {
        let _ = (path, mode);
        Ok(())
    }
}

/// Makes a rename or a new file in `dir` durable (after the file's own `sync_all`). On Windows
/// a folder cannot be opened as a file (that needs `FILE_FLAG_BACKUP_SEMANTICS`), and NTFS
/// journals the rename itself, so there is nothing to do.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(windows)]
    {
        let _ = dir;
        Ok(())
    }
}

/// ERROR_SHARING_VIOLATION: another process has the file open.
#[cfg(windows)]
const SHARING_VIOLATION: i32 = 32;

/// A file held exclusively by this process for as long as the value lives, and never longer
/// than the process: the system lets go of it when the process ends, however it ends (`flock`
/// on Unix; on Windows, the file opened with no sharing).
#[derive(Debug)]
pub struct ExclusiveLock {
    #[cfg(unix)]
    _lock: nix::fcntl::Flock<std::fs::File>,
    #[cfg(windows)]
    _file: std::fs::File,
}

/// How long [`try_lock_exclusive`] tries again before it names a holder: the CLI's
/// [`lock_state`] holds the lock (shared; on Windows, the file open) for a moment when it
/// looks, and an agent starting in that moment must not take it for another agent.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);
/// How long it waits between two tries.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// Takes [`ExclusiveLock`] on `path` (created 0600 if missing), trying again for a moment
/// (100 ms, so that a look by [`lock_state`], which holds it shared for a moment, is not taken
/// for another agent), and writes this process's id into it; `Ok(Err(holder))` when another
/// process holds it, with the id that process wrote (Unix; Windows lets no one else read the
/// file). An error of kind `Unsupported` when the filesystem has no locks.
pub fn try_lock_exclusive(path: &Path) -> std::io::Result<Result<ExclusiveLock, Option<u32>>> {
    lock_exclusive_within(path, LOCK_PATIENCE)
}

/// [`try_lock_exclusive`], trying again for up to `patience` while another process holds it.
fn lock_exclusive_within(
    path: &Path,
    patience: std::time::Duration,
) -> std::io::Result<Result<ExclusiveLock, Option<u32>>> {
    use std::io::{Seek, Write};
    let started = std::time::Instant::now();
    let again = || {
        let wait = started.elapsed() < patience;
        if wait {
            std::thread::sleep(LOCK_RETRY);
        }
        wait
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    options.mode(0o600);
    #[cfg(unix)]
    {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::Read;
        let mut file = options.open(path)?;
        let taken = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Err((held, nix::errno::Errno::EWOULDBLOCK)) if again() => file = held,
                other => break other,
            }
        };
        let mut lock = match taken {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Ok(Err(holder));
            }
            // NFS without a lock manager, and the like: the caller decides what that means.
            Err((_, errno @ (nix::errno::Errno::ENOLCK | nix::errno::Errno::EOPNOTSUPP))) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    format!("the filesystem does not support file locks ({errno})"),
                ))
            }
            Err((_, errno)) => return Err(errno.into()),
        };
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        Ok(Ok(ExclusiveLock { _lock: lock }))
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::OpenOptionsExt as _;
        options.share_mode(0);
        let mut file = loop {
            match options.open(path) {
                Ok(file) => break file,
                Err(e) if e.raw_os_error() == Some(SHARING_VIOLATION) => {
                    if !again() {
                        return Ok(Err(None));
                    }
                }
                Err(e) => return Err(e),
            }
        };
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Ok(ExclusiveLock { _file: file }))
    }
}

/// Who has an [`ExclusiveLock`]'s file, as [`lock_state`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    /// No process holds it (or there is no such file).
    Free,
    /// Another process holds it: the id it wrote (Unix; `None` on Windows, which lets no one
    /// else read the file).
    Held(Option<u32>),
    /// It cannot be told (no right to read the file, a filesystem without locks).
    Unknown,
}

/// Whether another process holds the [`ExclusiveLock`] on `path`. Takes nothing and writes
/// nothing: the lock is only tried, shared, and let go at once.
pub fn lock_state(path: &Path) -> LockState {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return LockState::Free,
        #[cfg(windows)]
        Err(e) if e.raw_os_error() == Some(SHARING_VIOLATION) => return LockState::Held(None),
        Err(_) => return LockState::Unknown,
    };
    #[cfg(unix)]
    {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::Read;
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_unlocked_on_drop) => LockState::Free,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                LockState::Held(
                    file.read_to_string(&mut text)
                        .ok()
                        .and_then(|_| text.trim().parse().ok()),
                )
            }
            Err(_) => LockState::Unknown,
        }
    }
    #[cfg(windows)]
    {
        drop(file);
        LockState::Free
    }
}

/// The permission bits of a file, `None` where the platform has none.
pub fn mode_of(meta: &std::fs::Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some(meta.mode())
    }
    #[cfg(windows)]
    {
        let _ = meta;
        None
    }
}

/// Whether a plugin file may be run as a program: an execute bit on Unix, an `.exe` name on
/// Windows.
pub fn is_executable(meta: &std::fs::Metadata, path: &Path) -> bool {
    #[cfg(unix)]
    {
        let _ = path;
        mode_of(meta).is_some_and(|m| m & 0o111 != 0)
    }
    #[cfg(windows)]
    {
        meta.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("exe"))
    }
}

/// Whether the agent runs as root (decides the default state folder).
pub fn is_root() -> bool {
    #[cfg(unix)]
    {
        nix::unistd::geteuid().is_root()
    }
    #[cfg(windows)]
    {
        false
    }
}

/// Makes a symbolic link (bundles carry them).
pub fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(target, link)
    }
    #[cfg(windows)]
    {
        // Windows needs to know what the link points at; a dangling link counts as a file.
        let resolved = link
            .parent()
            .map_or(target.to_path_buf(), |p| p.join(target));
        if resolved.is_dir() {
            std::os::windows::fs::symlink_dir(target, link)
        } else {
            std::os::windows::fs::symlink_file(target, link)
        }
    }
}

/// OS errors the agent explains in its own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsErrorKind {
    /// `ETXTBSY`: a file still open for writing was executed.
    TextBusy,
    /// `ELOOP`: a symlink loop.
    SymlinkLoop,
    /// `ENOEXEC`: not a program this system can run.
    NotExecutable,
}

/// Whether `e` is the OS error `kind`.
pub fn os_error_is(e: &std::io::Error, kind: OsErrorKind) -> bool {
    #[cfg(unix)]
    let code = match kind {
        OsErrorKind::TextBusy => nix::libc::ETXTBSY,
        OsErrorKind::SymlinkLoop => nix::libc::ELOOP,
        OsErrorKind::NotExecutable => nix::libc::ENOEXEC,
    };
    #[cfg(windows)]
    let code = match kind {
        OsErrorKind::TextBusy => 32,       // ERROR_SHARING_VIOLATION
        OsErrorKind::SymlinkLoop => 1921,  // ERROR_CANT_RESOLVE_FILENAME
        OsErrorKind::NotExecutable => 193, // ERROR_BAD_EXE_FORMAT
    };
    e.raw_os_error() == Some(code)
}

/// The machine's host name, for the cloud's console.
pub fn hostname() -> String {
    #[cfg(unix)]
    {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    }
    #[cfg(windows)]
    {
        std::env::var("COMPUTERNAME").unwrap_or_default()
    }
}

/// The agent binary, which the agent runs again as its helpers (plugin workers, the group
/// reaper): `plugins.worker_program` if set (tests point it at the built binary), else this
/// executable.
pub fn agent_program(config: &crate::config::Config) -> std::io::Result<std::path::PathBuf> {
    match &config.plugins.worker_program {
        Some(program) => Ok(program.clone()),
        // /proc/self/exe still works after a package upgrade replaced the file on disk.
        None if cfg!(target_os = "linux") => Ok("/proc/self/exe".into()),
        None => std::env::current_exe(),
    }
}

/// A connector process and everything it starts: a process group on Unix, a job object on
/// Windows. Killing it reaches the helpers too, so a deadline or a cancel leaves nothing behind;
/// dropping it kills it, so a dropped call future (the cloud went away, the agent quits) does
/// too. On Unix the group is listed with the [`crate::reaper`] while it lives, which kills it
/// if the agent is killed first.
#[derive(Debug)]
pub struct ProcessGroup {
    #[cfg(unix)]
    pgid: Option<nix::unistd::Pid>,
    #[cfg(windows)]
    job: std::sync::Mutex<Option<win32job::Job>>,
}

impl ProcessGroup {
    /// Makes the command start a group of its own. Call before spawning.
    pub fn prepare(cmd: &mut tokio::process::Command) {
        #[cfg(unix)]
        {
            cmd.process_group(0);
        }
        #[cfg(windows)]
        {
            // CREATE_NEW_PROCESS_GROUP: console Ctrl events meant for the agent do not reach it.
            cmd.creation_flags(0x0000_0200);
        }
    }

    /// The group of a child started from a [`prepare`](Self::prepare)d command.
    pub fn of(child: &tokio::process::Child) -> Self {
        #[cfg(unix)]
        {
            let pgid = child.id().and_then(|id| i32::try_from(id).ok());
            if let Some(pgid) = pgid {
                crate::reaper::watch(pgid);
            }
            Self {
                pgid: pgid.map(nix::unistd::Pid::from_raw),
            }
        }
        #[cfg(windows)]
        {
            // The job kills every process in it when its handle closes. A helper started in the
            // instant between spawn and assignment escapes it; the child itself is still
            // killed through its own handle.
            let job = child.raw_handle().and_then(|handle| {
                let mut info = win32job::ExtendedLimitInfo::new();
                info.limit_kill_on_job_close();
                let job = win32job::Job::create_with_limit_info(&info).ok()?;
                job.assign_process(handle as isize).ok()?;
                Some(job)
            });
            Self {
                job: std::sync::Mutex::new(job),
            }
        }
    }

    /// Asks the group to stop (SIGTERM). On Windows there is no polite request for a console
    /// program without a console, so this kills.
    pub fn terminate(&self) {
        #[cfg(unix)]
        self.signal(nix::sys::signal::Signal::SIGTERM);
        #[cfg(windows)]
        self.kill();
    }

    /// Kills every process in the group. Harmless when they are gone.
    pub fn kill(&self) {
        #[cfg(unix)]
        {
            self.signal(nix::sys::signal::Signal::SIGKILL);
            if let Some(pgid) = self.pgid {
                crate::reaper::forget(pgid.as_raw());
            }
        }
        #[cfg(windows)]
        drop(self.job.lock().expect("job lock poisoned").take());
    }

    /// The group's id, for logs.
    pub fn id(&self) -> Option<i64> {
        #[cfg(unix)]
        {
            self.pgid.map(|p| i64::from(p.as_raw()))
        }
        #[cfg(windows)]
        {
            None
        }
    }

    #[cfg(unix)]
    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is already gone) is the normal case after a clean exit.
            let _ = nix::sys::signal::killpg(pgid, signal);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An exit status from a plain exit code (tests build outputs by hand).
#[cfg(test)]
pub fn exit_status(code: i32) -> std::process::ExitStatus {
    #[cfg(unix)]
    {
        std::os::unix::process::ExitStatusExt::from_raw(code << 8)
    }
    #[cfg(windows)]
    {
        std::os::windows::process::ExitStatusExt::from_raw(code as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exclusive_lock_is_refused_while_held_and_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        let held = try_lock_exclusive(&path).unwrap().unwrap();
        // A second holder, even in the same process, is refused; on Unix it learns the pid.
        let refused = try_lock_exclusive(&path).unwrap().unwrap_err();
        if cfg!(unix) {
            assert_eq!(refused, Some(std::process::id()));
        }
        drop(held);
        let again = try_lock_exclusive(&path).unwrap();
        assert!(again.is_ok(), "free once the holder is dropped");
    }

    #[test]
    fn the_lock_state_names_the_holder_and_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        assert_eq!(lock_state(&path), LockState::Free, "no file");
        assert!(!path.exists(), "looking makes no file");
        let held = try_lock_exclusive(&path).unwrap().unwrap();
        let holder = if cfg!(unix) {
            Some(std::process::id())
        } else {
            None
        };
        assert_eq!(lock_state(&path), LockState::Held(holder));
        drop(held);
        assert_eq!(lock_state(&path), LockState::Free);
        // Looking holds nothing afterwards: the lock is taken at once.
        let again = try_lock_exclusive(&path).unwrap();
        assert!(again.is_ok());
    }

    /// A look at the moment an agent starts does not make it refuse to start: it tries again
    /// for a moment before it takes the holder for another agent. (Given a minute here, not
    /// the agent's 100 ms, so that a late thread on a busy machine is no failure.)
    #[cfg(unix)]
    #[test]
    fn a_lock_held_shared_for_a_moment_is_still_taken() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        std::fs::write(&path, "").unwrap();
        let looking = Flock::lock(
            std::fs::File::open(&path).unwrap(),
            FlockArg::LockSharedNonblock,
        )
        .unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(looking);
        });
        let taken = lock_exclusive_within(&path, std::time::Duration::from_secs(60)).unwrap();
        release.join().unwrap();
        assert!(taken.is_ok(), "refused: {taken:?}");
    }

    #[test]
    fn only_regular_files_are_opened_and_a_fifo_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"bytes").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_regular_file(&file).unwrap(), &mut text).unwrap();
        assert_eq!(text, "bytes");
        let refusal = |path: &Path| open_regular_file(path).unwrap_err().to_string();
        assert_eq!(refusal(dir.path()), "it is a folder");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo");
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            // No writer ever comes: a blocking open would never return.
            assert_eq!(refusal(&fifo), "it is a named pipe (FIFO)");
            assert_eq!(refusal(Path::new("/dev/zero")), "it is a device");
            let link = dir.path().join("link");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            assert_eq!(refusal(&link), "it is a device");
        }
    }
}
