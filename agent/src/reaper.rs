//! The group reaper: a small helper process that ends the connector process groups a killed
//! agent leaves behind.
//!
//! The agent kills a connector's process group when its call ends, at its deadline, on a
//! cancel and at every stop. A `kill -9`, the OOM killer or a crash skips all of that, and the
//! groups live on, reparented to init. Under systemd the unit's cgroup ends them
//! (`KillMode=mixed`); run any other way, a connector that sleeps or hangs would run until it
//! ended by itself. So the agent starts `<agent binary> group-reaper`, in a process group of
//! its own (a Ctrl-C at the terminal does not reach it), and tells it over its stdin which
//! groups are live: `+<pgid>` when one starts, `-<pgid>` when the agent kills it. When the
//! pipe closes, that is when the agent process is gone however it went, the reaper kills every
//! group still listed (SIGKILL) and exits.
//!
//! One reaper serves the whole process (tests run several agents in one). If it dies, the next
//! message starts a new one and lists the live groups again; so does one that stops reading,
//! after it is killed. Writes never block the agent.
//!
//! What it cannot cover: a group started in the instant before the agent's message about it, and
//! a group id reused by an unrelated new group leader in the instant between a group's end and
//! the agent's `-` (a process group's id is not reused while any process of it lives).
//!
//! Windows needs none of this: each connector runs in a job object that the kernel ends when
//! the agent's last handle to it closes, which a kill does too.

#[cfg(unix)]
pub use unix::{forget, main, start, watch};

#[cfg(windows)]
pub use windows::{forget, main, start, watch};

#[cfg(unix)]
mod unix {
    use std::collections::HashSet;
    use std::io::{BufRead as _, Write as _};
    use std::path::{Path, PathBuf};
    use std::process::{Child, ChildStdin, Command, Stdio};
    use std::sync::Mutex;

    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;

    /// The reaper of this process, once started.
    static REAPER: Mutex<Option<Reaper>> = Mutex::new(None);

    #[derive(Debug)]
    struct Reaper {
        program: PathBuf,
        process: Option<(Child, ChildStdin)>,
        /// The groups it must kill if the agent dies.
        live: HashSet<i32>,
        /// A problem was logged; the next one is not, until it works again.
        failing: bool,
    }

    impl Reaper {
        /// Sends `message`, starting a new reaper (with the whole list) if there is none or
        /// the last one died.
        fn send(&mut self, message: &str) {
            if let Some((_, stdin)) = self.process.as_mut() {
                // Each message is one line of at most 12 bytes, under PIPE_BUF: the pipe takes
                // it whole or not at all, so the reaper never reads half a line from us.
                match stdin.write_all(message.as_bytes()) {
                    Ok(()) => return self.works(),
                    // EPIPE: it died. WouldBlock: it stopped reading, and the next message
                    // would pile up behind a full pipe. Either way it is replaced below.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    Err(e) => self.fails(&format!("it stopped reading ({e}); starting another")),
                }
            }
            if let Some((mut child, _)) = self.process.take() {
                // SIGKILL, so that it does not kill the groups it lists: the new one takes
                // them over. Reaped so that no zombie stays.
                let _ = child.kill();
                let _ = child.wait();
            }
            match spawn(&self.program) {
                Ok((child, mut stdin)) => {
                    // The list covers `message` unless it is a `-`, which the new one need not hear.
                    let list: String = self.live.iter().map(|pgid| format!("+{pgid}\n")).collect();
                    match stdin.write_all(list.as_bytes()) {
                        Ok(()) => {
                            self.works();
                            self.process = Some((child, stdin));
                        }
                        Err(e) => {
                            self.fails(&format!("it did not take the list of groups ({e})"));
                            let mut child = child;
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                    }
                }
                Err(e) => self.fails(&format!("it cannot be started ({e})")),
            }
        }

        fn works(&mut self) {
            if self.failing {
                self.failing = false;
                tracing::info!("the group reaper works again");
            }
        }

        fn fails(&mut self, why: &str) {
            if !self.failing {
                self.failing = true;
                tracing::warn!(program = %self.program.display(), "the group reaper fails: {why}; if the agent is killed now, connector processes it started may keep running");
            }
        }
    }

    /// `<program> group-reaper`, in a group of its own, its stdin a pipe that writes never
    /// wait on.
    fn spawn(program: &Path) -> std::io::Result<(Child, ChildStdin)> {
        use std::os::unix::process::CommandExt as _;
        let mut child = Command::new(program)
            // `/proc/self/exe` would say nothing in `ps`.
            .arg0("lumos-agent")
            .arg("group-reaper")
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Not a captured stderr's pipe (crate::stderr_capture): the reaper outlives it.
            .stderr(match crate::stderr_capture::original() {
                Some(log) => Stdio::from(log.try_clone()?),
                None => Stdio::inherit(),
            })
            .process_group(0)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no pipe to the reaper"))?;
        let flags = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok((child, stdin))
    }

    /// Starts this process's reaper from `program` (the agent binary), unless one runs. A
    /// failure is logged; the agent runs without one.
    pub fn start(program: &Path) {
        let mut reaper = lock();
        if reaper.is_some() {
            return;
        }
        let mut new = Reaper {
            program: program.to_path_buf(),
            process: None,
            live: HashSet::new(),
            failing: false,
        };
        new.send("");
        *reaper = Some(new);
    }

    /// Lists a connector's process group with the reaper (no-op without one).
    pub fn watch(pgid: i32) {
        if pgid <= 1 {
            return;
        }
        if let Some(reaper) = lock().as_mut() {
            if reaper.live.insert(pgid) {
                reaper.send(&format!("+{pgid}\n"));
            }
        }
    }

    /// Takes a group the agent killed off the reaper's list.
    pub fn forget(pgid: i32) {
        if let Some(reaper) = lock().as_mut() {
            if reaper.live.remove(&pgid) {
                reaper.send(&format!("-{pgid}\n"));
            }
        }
    }

    fn lock() -> std::sync::MutexGuard<'static, Option<Reaper>> {
        // Nothing is left half-changed by a panic here: keep going.
        REAPER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reaper process: reads `+<pgid>` and `-<pgid>` lines until its stdin closes, then
    /// kills every group still listed. Returns its exit code.
    pub fn main() -> u8 {
        let mut live = HashSet::new();
        let mut input = std::io::stdin().lock();
        let mut line = Vec::new();
        loop {
            line.clear();
            // A read error is the agent gone too.
            match input.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line without its newline was cut off: `+12` of `+1234` names another group.
            let Some(line) = line.strip_suffix(b"\n") else {
                break;
            };
            let Some((&sign, number)) = line.split_first() else {
                continue;
            };
            // 0 and 1 would mean this reaper's own group and init's: never.
            let Some(pgid) = std::str::from_utf8(number)
                .ok()
                .and_then(|number| number.parse::<i32>().ok())
                .filter(|&pgid| pgid > 1)
            else {
                continue;
            };
            match sign {
                b'+' => live.insert(pgid),
                b'-' => live.remove(&pgid),
                _ => false,
            };
        }
        for pgid in live {
            // ESRCH: the group ended by itself.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        0
    }
}

#[cfg(windows)]
mod windows {
    use std::path::Path;

    /// No reaper on Windows: job objects end with the agent.
    pub fn start(_program: &Path) {}

    /// No reaper on Windows.
    pub fn watch(_pgid: i32) {}

    /// No reaper on Windows.
    pub fn forget(_pgid: i32) {}

    /// Not used on Windows.
    pub fn main() -> u8 {
        eprintln!("group-reaper: not used on Windows (job objects end connector processes)");
        crate::exit::USAGE
    }
}
