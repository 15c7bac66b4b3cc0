//! What the binary's tests share: children killed when a test fails, and a connector whose
//! `info` hangs.
#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(dead_code, reason = "each test file uses a part of it")]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod killed_on_drop;
pub use killed_on_drop::KilledOnDrop;

/// `Command::spawn`, for a [`KilledOnDrop`] child.
pub trait SpawnKilledOnDrop {
    fn spawn_killed_on_drop(&mut self) -> KilledOnDrop;
}

impl SpawnKilledOnDrop for Command {
    fn spawn_killed_on_drop(&mut self) -> KilledOnDrop {
        KilledOnDrop::spawn(self)
    }
}

/// Sends `signal` to `child`.
pub fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Kills a process (SIGKILL) if it is still there after a deadline, unless dropped first: for
/// a test that blocks on the process's output, so that a process that hangs fails the test
/// instead of hanging it.
pub struct KillAfter {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KillAfter {
    /// Kills `pid` after `deadline`.
    pub fn new(pid: u32, deadline: Duration) -> Self {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watching = done.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + deadline;
            while Instant::now() < end {
                if watching.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !watching.load(std::sync::atomic::Ordering::Acquire) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Self { done }
    }
}

impl Drop for KillAfter {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Writes an executable connector at `path` whose `info` never answers: it writes its pid to
/// `pid_file` (whole, by a rename) and sleeps for ten minutes.
pub fn hanging_connector(path: &Path, pid_file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(
        path,
        format!(
            "#!/bin/bash\necho $$ > '{0}.tmp'\nmv '{0}.tmp' '{0}'\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Ends the `info` of a [`hanging_connector`] (SIGKILL: its load ends, the connector is
/// rejected); the pid file is removed, so that a later `info` of it can be waited for.
pub fn end_hanging_info(pid_file: &Path) {
    let pid = pid_in(pid_file);
    std::fs::remove_file(pid_file).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Waits for `cond` (polling), failing the test after a minute.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid a [`hanging_connector`] wrote.
pub fn pid_in(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
