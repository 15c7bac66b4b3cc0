//! Runs connector executables: one process group per call, a scrubbed environment, a capped
//! stdout, a deadline enforced on the whole group, and nothing left behind.
//!
//! Why a process group: connectors (PyInstaller bundles especially) start helpers. Killing only
//! the direct child leaves grandchildren holding the stdout pipe, so the read never ends and
//! the orphans outlive the call. Every exit path here kills the group: normal exit (stragglers),
//! deadline (SIGTERM, then SIGKILL after the grace), output cap, cancellation, and the future
//! being dropped (the caller went away).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::output::{ResultBody, Spool};
use crate::platform::{self, DirBuilderExt, OpenOptionsExt, OsErrorKind, ProcessGroup};
use crate::stop::CallStop;

/// Environment variables a connector may inherit from the agent; everything else is dropped
/// so no secret of the agent's own environment reaches a connector.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// How long to keep reading stdout after the connector exited, for data already in the pipe.
/// Stragglers in the group are killed first, so this only matters for a process that left the
/// group (setsid) and kept the pipe.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What a process may do.
#[derive(Debug, Clone)]
pub struct ExecLimits {
    /// The call's deadline.
    pub timeout: Duration,
    /// SIGTERM → SIGKILL grace at the deadline.
    pub kill_grace: Duration,
    /// Largest stdout accepted.
    pub max_output_bytes: u64,
    /// How much of the end of stderr is captured. The dispatcher asks for more than it logs
    /// (`calls.stderr_log_bytes` plus the longest secret), so it can redact before it cuts.
    pub stderr_keep: usize,
    /// Where stdout beyond [`crate::output::SPOOL_THRESHOLD`] is spooled.
    pub spool_dir: PathBuf,
}

/// Where and how a connector process runs.
#[derive(Debug, Clone)]
pub struct ProcessEnv {
    /// The connector's private working folder (connector-py writes `./logs` relative to it).
    pub workdir: PathBuf,
    /// Variables set for the connector, after the inherited allow-list.
    pub vars: Vec<(OsString, OsString)>,
}

impl ProcessEnv {
    /// The environment for a connector: the allow-list, `pass_env` names, a private HOME and
    /// TMPDIR, and connector-py's logging variables pointing at the agent's log folder.
    pub fn for_connector(
        workdir: PathBuf,
        log_dir: &Path,
        log_level: &str,
        pass_env: &[String],
    ) -> Self {
        let mut vars: Vec<(OsString, OsString)> = INHERITED_ENV
            .iter()
            .copied()
            .chain(pass_env.iter().map(String::as_str))
            .filter_map(|name| std::env::var_os(name).map(|v| (OsString::from(name), v)))
            .collect();
        if !vars.iter().any(|(k, _)| k == "PATH") {
            vars.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        vars.push(("HOME".into(), workdir.clone().into()));
        vars.push(("TMPDIR".into(), workdir.join("tmp").into()));
        vars.push(("LUMOS_LOG_DIRECTORY".into(), log_dir.into()));
        vars.push(("LUMOS_LOG_LEVEL".into(), log_level.into()));
        // stdout is the protocol: connector-py must never log there.
        vars.push(("LUMOS_LOG_TO_STDOUT".into(), "false".into()));
        Self { workdir, vars }
    }
}

/// A finished process.
#[derive(Debug)]
pub struct ProcessOutput {
    /// Everything it printed on stdout (spooled to disk when large).
    pub stdout: ResultBody,
    /// How it ended.
    pub status: ExitStatus,
    /// The last bytes of its stderr, lossily decoded; zeroized, as a connector may print its
    /// secrets there.
    pub stderr_tail: Zeroizing<String>,
}

/// Why a process did not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// It could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The executable.
        program: PathBuf,
        /// The OS's words.
        source: std::io::Error,
    },
    /// It ran past the deadline; its group was sent SIGTERM, then SIGKILL.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// It printed more than allowed; its group was killed.
    #[error("printed more than {0} bytes on stdout")]
    OutputTooLarge(u64),
    /// The call was cancelled; its group was killed.
    #[error("cancelled")]
    Cancelled,
    /// Its stdout stayed open after it exited (a process outside its group held it).
    #[error("stdout stayed open after the connector exited (a detached process holds it)")]
    StdoutHeldOpen,
    /// Reading its output failed.
    #[error("reading connector output failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs `program args…` under `limits`, returning its stdout.
pub async fn run(
    program: &Path,
    args: &[OsString],
    env: &ProcessEnv,
    limits: &ExecLimits,
    stop: CallStop<'_>,
) -> Result<ProcessOutput, ExecError> {
    let deadline = Instant::now() + limits.timeout;
    let mut child = spawn(program, args, env).await?;
    // Killed when dropped: a dropped call future leaves no process behind.
    let group = ProcessGroup::of(&child);

    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("stdout was not piped"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("stderr was not piped"))?;
    let mut stdout_task = tokio::spawn(read_capped(
        stdout,
        limits.max_output_bytes,
        Spool::new(&limits.spool_dir),
    ));
    let stderr_task = tokio::spawn(read_tail(stderr, limits.stderr_keep));

    // EOF on stdout and the exit arrive in either order; both are needed.
    let mut early_stdout: Option<ResultBody> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            read = &mut stdout_task, if early_stdout.is_none() => match read {
                Ok(Ok(bytes)) => early_stdout = Some(bytes),
                failed => {
                    group.kill();
                    let _ = child.wait().await;
                    return Err(match failed {
                        Ok(Err(ReadError::TooLarge)) => ExecError::OutputTooLarge(limits.max_output_bytes),
                        Ok(Err(ReadError::Io(e))) => ExecError::Io(e),
                        Ok(Ok(_)) => ExecError::StdoutHeldOpen,
                        Err(join) => ExecError::Io(std::io::Error::other(join)),
                    });
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                terminate_in_background(child, group, limits.kill_grace);
                stdout_task.abort();
                return Err(ExecError::Timeout(limits.timeout));
            }
            () = stop.stopped() => {
                group.kill();
                let _ = child.wait().await;
                stdout_task.abort();
                return Err(ExecError::Cancelled);
            }
        }
    };
    // The connector exited. Whatever it left running in its group goes now, so that a
    // grandchild holding the pipe cannot keep the read open.
    group.kill();
    let stdout = match early_stdout {
        Some(bytes) => bytes,
        None => match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut stdout_task).await {
            Ok(Ok(Ok(bytes))) => bytes,
            Ok(Ok(Err(ReadError::TooLarge))) => {
                return Err(ExecError::OutputTooLarge(limits.max_output_bytes))
            }
            Ok(Ok(Err(ReadError::Io(e)))) => return Err(ExecError::Io(e)),
            Ok(Err(join)) => return Err(ExecError::Io(std::io::Error::other(join))),
            Err(_elapsed) => {
                stdout_task.abort();
                return Err(ExecError::StdoutHeldOpen);
            }
        },
    };
    let stderr_tail = match tokio::time::timeout(DRAIN_AFTER_EXIT, stderr_task).await {
        Ok(Ok(tail)) => tail,
        _ => Zeroizing::default(),
    };
    Ok(ProcessOutput {
        stdout,
        status,
        stderr_tail,
    })
}

async fn spawn(program: &Path, args: &[OsString], env: &ProcessEnv) -> Result<Child, ExecError> {
    let mut attempt = 0;
    loop {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&env.workdir)
            .env_clear()
            .envs(env.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A group of its own, so deadlines and exits reach its helpers too.
        ProcessGroup::prepare(&mut cmd);
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            // ETXTBSY: another thread forked while this file was open for writing (a plugin
            // that was just copied in). It clears within milliseconds.
            Err(e) if platform::os_error_is(&e, OsErrorKind::TextBusy) && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            Err(source) => {
                return Err(ExecError::Spawn {
                    program: program.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// SIGTERM to the group, SIGKILL after the grace, and reap: off the caller's path so the call's
/// error is answered at the deadline, not a grace period later.
fn terminate_in_background(mut child: Child, group: ProcessGroup, grace: Duration) {
    group.terminate();
    // The group moves into the task: if the runtime drops the task (the agent is quitting),
    // dropping the group still SIGKILLs it.
    tokio::spawn(async move {
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::warn!(pgid = ?group.id(), "connector ignored SIGTERM; sending SIGKILL");
        }
        // Always: the leader may have exited while helpers in its group ignored SIGTERM.
        group.kill();
        let _ = child.wait().await;
    });
}

enum ReadError {
    TooLarge,
    Io(std::io::Error),
}

async fn read_capped(
    mut reader: impl AsyncRead + Unpin,
    cap: u64,
    mut out: Spool,
) -> Result<ResultBody, ReadError> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut chunk).await.map_err(ReadError::Io)?;
        if n == 0 {
            return out.finish().await.map_err(ReadError::Io);
        }
        if out.len() + n as u64 > cap {
            return Err(ReadError::TooLarge);
        }
        out.write(&chunk[..n]).await.map_err(ReadError::Io)?;
    }
}

/// Drains a stream, keeping only its last `keep` bytes.
async fn read_tail(mut reader: impl AsyncRead + Unpin, keep: usize) -> Zeroizing<String> {
    const CHUNK: usize = 16 * 1024;
    // Sized so it never reallocates: a reallocation would leave an unzeroized copy behind.
    let mut tail = Zeroizing::new(Vec::with_capacity(
        keep.saturating_mul(2).saturating_add(CHUNK),
    ));
    let mut chunk = Zeroizing::new(vec![0u8; CHUNK]);
    while let Ok(n) = reader.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > keep.saturating_mul(2) {
            let excess = tail.len() - keep;
            tail.drain(..excess);
        }
    }
    let excess = tail.len().saturating_sub(keep);
    tail.drain(..excess);
    Zeroizing::new(String::from_utf8_lossy(&tail).into_owned())
}

/// Whether a process is running. A zombie counts as dead: it runs nothing and holds nothing
/// but its exit status.
pub fn is_process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name, which is in parentheses and may contain
        // spaces: take what follows the last ") ".
        Ok(stat) => !matches!(
            stat.rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// Describes how a process ended, for messages.
pub fn describe_status(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| sig.to_string());
            return format!("was killed by signal {name}");
        }
    }
    "ended".to_string()
}

/// A private folder for call input files: mode 0700, created once.
#[derive(Debug, Clone)]
pub struct ScratchDir {
    dir: PathBuf,
}

impl ScratchDir {
    /// Creates (or re-secures) the folder.
    pub fn create(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        // An existing folder may have been created with a looser mode.
        platform::set_mode(&dir, 0o700)?;
        Ok(Self { dir })
    }

    /// The folder (also where large outputs are spooled).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `contents` to a new 0600 file that is removed when the returned guard drops.
    /// Secrets travel to connectors this way, never on the command line.
    pub fn write_secret_file(&self, contents: &[u8]) -> std::io::Result<SecretFile> {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| std::io::Error::other(e.to_string()))?;
        let path = self.dir.join(format!("{}.json", hex::encode(name)));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let guard = SecretFile { path };
        file.write_all(contents)?;
        Ok(guard)
    }
}

/// A 0600 file holding a call's input; deleted on drop.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    /// The file's path, for `--json-file`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(path = %self.path.display(), error = %e, "cannot remove a call input file");
            }
        }
    }
}

// The tests run shell-script connectors and check Unix modes.
#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio_util::sync::CancellationToken;

    /// `run` with nothing to stop it early.
    async fn run_unstopped(
        program: &Path,
        args: &[OsString],
        env: &ProcessEnv,
        limits: &ExecLimits,
    ) -> Result<ProcessOutput, ExecError> {
        run(
            program,
            args,
            env,
            limits,
            CallStop::by(&CancellationToken::new()),
        )
        .await
    }

    fn limits(timeout_ms: u64) -> ExecLimits {
        ExecLimits {
            timeout: Duration::from_millis(timeout_ms),
            kill_grace: Duration::from_millis(200),
            max_output_bytes: 1 << 20,
            stderr_keep: 64,
            spool_dir: std::env::temp_dir(),
        }
    }

    fn sh(script: &str) -> (PathBuf, Vec<OsString>) {
        (PathBuf::from("/bin/sh"), vec!["-c".into(), script.into()])
    }

    fn env() -> ProcessEnv {
        ProcessEnv {
            workdir: std::env::temp_dir(),
            vars: vec![("PATH".into(), "/usr/bin:/bin".into())],
        }
    }

    #[tokio::test]
    async fn captures_stdout_and_stderr_tail() {
        let (p, a) = sh("echo '{\"ok\":1}'; echo oops >&2; exit 3");
        let out = run_unstopped(&p, &a, &env(), &limits(5000)).await.unwrap();
        assert_eq!(&out.stdout.to_bytes().await.unwrap()[..], b"{\"ok\":1}\n");
        assert_eq!(out.stderr_tail.as_str(), "oops\n");
        assert_eq!(describe_status(&out.status), "exited with code 3");
    }

    /// EOF and exit race; whichever comes first, a quick process's answer is never lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quick_exits_never_lose_output() {
        let (p, a) = sh("echo ok");
        for _ in 0..200 {
            let out = run_unstopped(&p, &a, &env(), &limits(10_000))
                .await
                .unwrap();
            assert_eq!(&out.stdout.to_bytes().await.unwrap()[..], b"ok\n");
        }
    }

    #[tokio::test]
    async fn grandchild_holding_the_pipe_does_not_block_the_answer() {
        let (p, a) = sh("sleep 30 & echo done");
        let started = std::time::Instant::now();
        let out = run_unstopped(&p, &a, &env(), &limits(20_000))
            .await
            .unwrap();
        assert_eq!(&out.stdout.to_bytes().await.unwrap()[..], b"done\n");
        // Far below the 30 s the grandchild sleeps: the group was killed at the exit.
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[tokio::test]
    async fn deadline_is_a_typed_error() {
        let (p, a) = sh("trap '' TERM; sleep 30");
        let err = run_unstopped(&p, &a, &env(), &limits(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout(_)), "{err}");
    }

    /// The SIGTERM→SIGKILL escalation after a deadline runs on a background task; if the agent
    /// quits during the grace and that task is dropped, the group must still die.
    #[test]
    fn a_group_in_its_kill_grace_dies_when_the_runtime_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let script = format!(
            "trap '' TERM; sleep 30 & echo $$ $! > {}; wait",
            pids.display()
        );
        let (p, a) = sh(&script);
        let mut l = limits(300);
        l.kill_grace = Duration::from_secs(600);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let err = runtime
            .block_on(run_unstopped(&p, &a, &env(), &l))
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout(_)), "{err}");
        let text = std::fs::read_to_string(&pids).unwrap();
        let pids: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(pids.len(), 2);
        // Both ignore SIGTERM and the grace is ten minutes: only dropping their group can kill them now.
        assert!(pids.iter().all(|p| is_process_alive(p.parse().unwrap())));
        drop(runtime);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while pids.iter().any(|p| is_process_alive(p.parse().unwrap())) {
            assert!(
                std::time::Instant::now() < deadline,
                "a process of the group survived: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn output_cap_is_enforced() {
        let (p, a) = sh("head -c 5000000 /dev/zero");
        let err = run_unstopped(&p, &a, &env(), &limits(10_000))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::OutputTooLarge(_)), "{err}");
    }

    #[tokio::test]
    async fn environment_is_scrubbed() {
        let e =
            ProcessEnv::for_connector(std::env::temp_dir(), Path::new("/tmp/logs"), "INFO", &[]);
        assert!(
            e.vars.iter().all(|(k, _)| k != "CARGO" && k != "RUST_LOG"),
            "{:?}",
            e.vars
        );
        let (p, a) = sh("env");
        let out = run_unstopped(&p, &a, &e, &limits(5000)).await.unwrap();
        let text = String::from_utf8(out.stdout.to_bytes().await.unwrap().to_vec()).unwrap();
        assert!(text.contains("LUMOS_LOG_TO_STDOUT=false"));
        assert!(!text.contains("CARGO_PKG_NAME"), "{text}");
    }

    #[test]
    fn secret_files_are_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchDir::create(dir.path().join("calls")).unwrap();
        let mode = std::fs::metadata(dir.path().join("calls"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        let file = scratch.write_secret_file(b"secret").unwrap();
        let path = file.path().to_path_buf();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(file);
        assert!(!path.exists());
    }
}
