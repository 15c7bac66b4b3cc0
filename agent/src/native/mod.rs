//! Native (cdylib) connectors through the C ABI.
//!
//! By default each library runs in a **worker process** (the agent binary re-executed as
//! `lumos-agent plugin-host <LIBRARY>`, see [`worker`]), speaking [`frame`]s over pipes, so a
//! panic, abort or segfault costs one worker, not the agent. Calls are multiplexed by id. A dead
//! worker fails its in-flight calls with `agent.connector_crashed` and is restarted on the next
//! call after an exponential backoff. A call that panics poisons its worker, which is replaced.
//!
//! **In-process** loading is an explicit opt-in per connector (`[connectors.<app_id>]
//! in_process = true`) for vetted plugins: the library is copied to a content-addressed file
//! (the loader's `<state_dir>/store/<sha256>/` copy, because dlopen of an already-loaded path
//! returns the old library) and never unloaded.

pub mod frame;
pub mod worker;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lumos_connector_abi::ffi::{log_level, status};
use lumos_connector_abi::host::{HostCallbacks, Instance, Library};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::{CallError, ErrorCode};
use crate::exec::ProcessEnv;
use crate::platform::ProcessGroup;
use crate::plugins::info::{self, ConnectorInfo};
use crate::redact::{RecentSecrets, SecretSpans};
use crate::stderr_capture::{LineSplitter, LOGGED_CHARS};
use crate::stop::CallStop;

/// Longest backoff between worker restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Largest frame accepted from a worker beyond the output cap (headers).
const FRAME_OVERHEAD: u64 = 1 << 16;

/// What the worker (or the in-process library) said about itself.
#[derive(Debug, Clone)]
pub struct Description {
    /// The header's plugin id.
    pub id: String,
    /// The header's version.
    pub version: String,
    /// The header's build info.
    pub build_info: String,
    /// The connector's `info`.
    pub info: ConnectorInfo,
}

/// How to start workers.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The agent binary to re-execute.
    pub program: PathBuf,
    /// Scrubbed environment and working folder.
    pub env: ProcessEnv,
    /// Largest answer a connector may give.
    pub max_output_bytes: u64,
    /// How long a worker may take to load the library and say HELLO.
    pub start_timeout: Duration,
    /// Where restarts are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

enum Reply {
    Done { status: u32, output: Vec<u8> },
    Died(String),
}

/// Calls waiting for their completion, by id.
#[derive(Default)]
struct Pending {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
}

impl Pending {
    fn register(&self, id: u64) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("pending lock poisoned")
            .insert(id, tx);
        rx
    }

    fn forget(&self, id: u64) {
        self.waiting
            .lock()
            .expect("pending lock poisoned")
            .remove(&id);
    }

    /// Delivers a completion; false when nobody waits (late after a timeout, or a repeat).
    fn deliver(&self, id: u64, reply: Reply) -> bool {
        match self
            .waiting
            .lock()
            .expect("pending lock poisoned")
            .remove(&id)
        {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    fn fail_all(&self, why: &str) {
        for (_, tx) in self.waiting.lock().expect("pending lock poisoned").drain() {
            let _ = tx.send(Reply::Died(why.to_string()));
        }
    }
}

/// Where a native connector's own words go (its log callbacks, its worker's stderr): the
/// agent's log, under its app_id, without the secrets of its recent calls. A plugin is not
/// trusted to keep the tokens it is handed out of what it writes.
#[derive(Debug, Clone)]
struct PluginLog {
    app_id: String,
    secrets: Arc<RecentSecrets>,
}

impl PluginLog {
    fn new(app_id: String) -> Self {
        Self {
            app_id,
            secrets: Arc::default(),
        }
    }

    /// A line from the host's log callback.
    fn callback(&self, level: u32, message: &[u8]) {
        let app_id = self.app_id.as_str();
        let message = self.secrets.redact(&String::from_utf8_lossy(message));
        match level {
            log_level::ERROR => tracing::error!(app_id, "plugin: {message}"),
            log_level::WARN => tracing::warn!(app_id, "plugin: {message}"),
            log_level::INFO => tracing::info!(app_id, "plugin: {message}"),
            _ => tracing::debug!(app_id, "plugin: {message}"),
        }
    }

    /// A line the worker wrote on stderr.
    fn stderr(&self, line: &str) {
        // Redacted before it is cut short: a secret across the cut would leave a piece behind.
        let line: String = self
            .secrets
            .redact(line)
            .chars()
            .take(LOGGED_CHARS)
            .collect();
        // At info, as a plugin's last words before a crash land here.
        tracing::info!(app_id = %self.app_id, "worker stderr: {line}");
    }
}

fn unix_ms(deadline: Duration) -> u64 {
    let at = std::time::SystemTime::now() + deadline;
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Waits for a call's reply under its deadline and cancellation; `abandon` tells the plugin.
async fn await_reply(
    app_id: &str,
    mut rx: oneshot::Receiver<Reply>,
    timeout: Duration,
    stop: CallStop<'_>,
    abandon: impl FnOnce(),
) -> Result<(u32, Vec<u8>), CallError> {
    let received = |reply: Option<Reply>| match reply {
        Some(Reply::Done { status, output }) => Ok((status, output)),
        Some(Reply::Died(why)) => Err(CallError::new(
            ErrorCode::ConnectorCrashed,
            format!("{app_id} crashed during the call: {why}"),
        )),
        None => Err(CallError::new(
            ErrorCode::ConnectorCrashed,
            format!("{app_id} dropped the call"),
        )),
    };
    // Synchronous plugins have answered before start_call returned: skip arming a timer.
    match rx.try_recv() {
        Ok(reply) => return received(Some(reply)),
        Err(oneshot::error::TryRecvError::Closed) => return received(None),
        Err(oneshot::error::TryRecvError::Empty) => {}
    }
    tokio::select! {
        reply = rx => received(reply.ok()),
        () = tokio::time::sleep(timeout) => {
            abandon();
            Err(CallError::new(ErrorCode::Timeout, format!("{app_id} gave no answer within {timeout:?}; the call was cancelled")))
        }
        () = stop.stopped() => {
            abandon();
            Err(CallError::new(ErrorCode::Cancelled, "the call was cancelled"))
        }
    }
}

/// Turns a completion into the answer: OK and ERROR carry the connector's JSON.
fn answer(app_id: &str, status: u32, output: Vec<u8>) -> Result<Bytes, CallError> {
    match status {
        status::OK | status::ERROR => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&output).is_err() {
                return Err(CallError::new(
                    ErrorCode::BadOutput,
                    format!(
                        "{app_id} answered {} bytes that are not one JSON document",
                        output.len()
                    ),
                ));
            }
            Ok(Bytes::from(output))
        }
        status::CANCELLED => Err(CallError::new(
            ErrorCode::Cancelled,
            format!("{app_id} cancelled the call"),
        )),
        status::PANIC => Err(CallError::new(
            ErrorCode::ConnectorCrashed,
            format!("{app_id} panicked during the call; its instance is poisoned and replaced"),
        )),
        other => Err(CallError::new(
            ErrorCode::BadOutput,
            format!("{app_id} completed with unknown status {other}"),
        )),
    }
}

/// How a worker's end is known: `dead` is cancelled by its reader when the worker is gone,
/// `retired` by the agent when it lets the worker go (its connector replaced, removed, or
/// loaded in-process instead), which makes that end no news.
#[derive(Debug, Clone, Default)]
struct WorkerEnd {
    dead: CancellationToken,
    retired: CancellationToken,
}

/// A running worker process.
struct Worker {
    /// Frames for the worker's stdin; a writer task batches whatever is queued into one write.
    outbox: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Pending>,
    end: WorkerEnd,
    /// The worker and whatever the plugin started.
    group: Arc<ProcessGroup>,
}

impl Worker {
    /// Spawns a worker for `library` and waits for its HELLO.
    async fn start(
        log: &PluginLog,
        library: &Path,
        settings: &WorkerSettings,
    ) -> Result<(Arc<Self>, Description), String> {
        let mut cmd = tokio::process::Command::new(&settings.program);
        cmd.args([
            OsString::from("plugin-host"),
            library.as_os_str().to_owned(),
        ])
        .current_dir(&settings.env.workdir)
        .env_clear()
        .envs(settings.env.vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        ProcessGroup::prepare(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start a worker ({}): {e}",
                settings.program.display()
            )
        })?;
        let group = Arc::new(ProcessGroup::of(&child));
        let stdin = child.stdin.take().ok_or("worker stdin missing")?;
        // Buffered: one read syscall serves many small frames.
        let mut stdout = tokio::io::BufReader::with_capacity(
            64 * 1024,
            child.stdout.take().ok_or("worker stdout missing")?,
        );
        let stderr = child.stderr.take().ok_or("worker stderr missing")?;
        let max_frame =
            u32::try_from(settings.max_output_bytes + FRAME_OVERHEAD).unwrap_or(u32::MAX);

        let hello = tokio::time::timeout(
            settings.start_timeout,
            frame::read_async(&mut stdout, max_frame),
        )
        .await;
        let description = match hello {
            Err(_) => {
                return Err(format!(
                    "the library did not start within {:?}",
                    settings.start_timeout
                ))
            }
            Ok(Err(e)) => return Err(format!("the worker sent garbage: {e}")),
            Ok(Ok(None)) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| crate::exec::describe_status(&s))
                    .unwrap_or_default();
                return Err(format!("the worker {status} while loading the library (it crashed in its initialisers?)"));
            }
            Ok(Ok(Some(f))) if f.kind == frame::LOAD_ERROR => {
                return Err(String::from_utf8_lossy(&f.payload).into_owned())
            }
            Ok(Ok(Some(f))) if f.kind == frame::HELLO => parse_hello(&f.payload)?,
            Ok(Ok(Some(f))) => {
                return Err(format!(
                    "the worker sent frame kind {} before HELLO",
                    f.kind
                ))
            }
        };

        let (outbox, queued) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_frames(stdin, queued));
        let worker = Arc::new(Self {
            outbox,
            pending: Arc::new(Pending::default()),
            end: WorkerEnd::default(),
            group: group.clone(),
        });
        tokio::spawn(forward_stderr(log.clone(), stderr));
        // The reader holds what it needs, not the Worker: dropping the Worker (the connector
        // was replaced or removed) must kill the process and close its stdin.
        tokio::spawn(read_replies(
            log.clone(),
            worker.pending.clone(),
            worker.end.clone(),
            child,
            group,
            stdout,
            max_frame,
        ));
        Ok((worker, description))
    }

    /// Queues a frame; an error means the worker is gone.
    fn send(&self, frame: Vec<u8>) -> std::io::Result<()> {
        self.outbox.send(frame).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the worker's input is closed",
            )
        })
    }

    fn kill(&self) {
        self.group.kill();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.end.retired.cancel();
        self.kill();
    }
}

fn parse_hello(payload: &[u8]) -> Result<Description, String> {
    let hello: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("bad HELLO: {e}"))?;
    let text = |k: &str| {
        hello
            .get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let document = serde_json::json!({"response": hello.get("info").cloned().unwrap_or_default()});
    let info = info::parse(document.to_string().as_bytes())?;
    let id = text("id");
    if info.app_id != id {
        return Err(format!(
            "the header says plugin id {id:?} but info says app_id {:?}; they must match",
            info.app_id
        ));
    }
    Ok(Description {
        id,
        version: text("version"),
        build_info: text("build_info"),
        info,
    })
}

/// A worker's stderr, line by line into the log: lines are capped (a worker printing without
/// end costs the agent no more than one line's buffer) and zeroized once logged.
async fn forward_stderr(log: PluginLog, mut stderr: tokio::process::ChildStderr) {
    use tokio::io::AsyncReadExt as _;
    let mut lines = LineSplitter::default();
    let mut chunk = zeroize::Zeroizing::new(vec![0u8; 4096]);
    let emit = |line: &[u8], _cut: bool| log.stderr(&String::from_utf8_lossy(line));
    while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
        lines.push(&chunk[..n], emit);
    }
    lines.finish(emit);
}

/// Writes queued frames to the worker, coalescing everything queued into one write. Ends when
/// the worker is dropped (its sender closes), which closes the worker's stdin: it exits.
async fn write_frames(
    mut stdin: ChildStdin,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Some(first) = queued.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < (1 << 20) {
            match queued.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if stdin.write_all(&batch).await.is_err() {
            break;
        }
    }
}

async fn read_replies(
    log: PluginLog,
    pending: Arc<Pending>,
    end: WorkerEnd,
    mut child: Child,
    group: Arc<ProcessGroup>,
    mut stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    max_frame: u32,
) {
    let why = loop {
        match frame::read_async(&mut stdout, max_frame).await {
            Ok(Some(f)) if f.kind == frame::COMPLETE => match frame::decode_complete(&f.payload) {
                Some((id, status, output)) => {
                    if !pending.deliver(
                        id,
                        Reply::Done {
                            status,
                            output: output.to_vec(),
                        },
                    ) {
                        tracing::debug!(
                            app_id = %log.app_id,
                            call_id = id,
                            "completion for a call nobody waits for (timed out or cancelled)"
                        );
                    }
                }
                None => break "it sent a malformed completion".to_string(),
            },
            Ok(Some(f)) if f.kind == frame::LOG => {
                if let Some((level, message)) = frame::decode_log(&f.payload) {
                    log.callback(level, message);
                }
            }
            Ok(Some(f)) => break format!("it sent unexpected frame kind {}", f.kind),
            Ok(None) => break String::new(),
            Err(e) => break format!("its output broke: {e}"),
        }
    };
    end.dead.cancel();
    let _ = child.start_kill();
    // Its process group: whatever the plugin started goes too.
    group.kill();
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => crate::exec::describe_status(&status),
        _ => "did not exit".to_string(),
    };
    let why = if why.is_empty() {
        format!("its worker {status}")
    } else {
        format!("{why}; its worker {status}")
    };
    if end.retired.is_cancelled() {
        tracing::debug!(app_id = %log.app_id, "native connector worker let go: {why}");
    } else {
        tracing::warn!(app_id = %log.app_id, "native connector worker stopped: {why}");
    }
    pending.fail_all(&why);
}

/// Restart pacing after crashes.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

/// A native connector served by worker processes.
pub struct WorkerConnector {
    /// Its app_id, and the secrets of its recent calls. Shared by its workers, one after
    /// another: a late line of an old worker is redacted too.
    log: PluginLog,
    library: PathBuf,
    settings: WorkerSettings,
    current: tokio::sync::Mutex<Option<Arc<Worker>>>,
    backoff: Mutex<Backoff>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for WorkerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConnector")
            .field("app_id", &self.log.app_id)
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

impl WorkerConnector {
    /// Starts a first worker for `library`: its HELLO is the load-time check (header, ABI
    /// major, info). Errors are reasons for the inventory.
    pub async fn start(
        library: &Path,
        settings: WorkerSettings,
    ) -> Result<(Self, Description), String> {
        let hint = library
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let first = PluginLog::new(hint);
        let (worker, description) = Worker::start(&first, library, &settings).await?;
        let connector = Self {
            log: PluginLog {
                app_id: description.id.clone(),
                secrets: first.secrets,
            },
            library: library.to_path_buf(),
            settings,
            current: tokio::sync::Mutex::new(Some(worker)),
            backoff: Mutex::new(Backoff::default()),
            next_id: AtomicU64::new(1),
        };
        Ok((connector, description))
    }

    async fn worker(&self, timeout: Duration) -> Result<Arc<Worker>, CallError> {
        let mut current = self.current.lock().await;
        if let Some(worker) = current.as_ref().filter(|w| !w.end.dead.is_cancelled()) {
            return Ok(worker.clone());
        }
        let had_one = current.take().is_some();
        let wait = {
            let mut backoff = self.backoff.lock().expect("backoff lock poisoned");
            if had_one {
                backoff.failures = backoff.failures.saturating_add(1);
                let delay = Duration::from_millis(100)
                    .saturating_mul(1 << backoff.failures.min(9))
                    .min(MAX_BACKOFF);
                backoff.not_before = Some(Instant::now() + delay);
            }
            backoff
                .not_before
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or_default()
        };
        if wait > timeout {
            let mut err = CallError::new(
                ErrorCode::ConnectorCrashed,
                format!(
                    "{} is restarting after crashes; retry in {wait:?}",
                    self.log.app_id
                ),
            );
            err.retry_after_seconds = Some(wait.as_secs().max(1));
            return Err(err);
        }
        tokio::time::sleep(wait).await;
        let (worker, _) = Worker::start(&self.log, &self.library, &self.settings)
            .await
            .map_err(|why| {
                CallError::new(
                    ErrorCode::ConnectorCrashed,
                    format!("cannot restart {}: {why}", self.log.app_id),
                )
            })?;
        if had_one {
            self.settings.metrics.worker_restarted(&self.log.app_id);
            tracing::info!(app_id = %self.log.app_id, "native connector worker restarted");
        }
        *current = Some(worker.clone());
        Ok(worker)
    }

    /// Runs one call in the worker. `secrets` says where `input`'s secrets are, for the
    /// redaction of what the worker logs.
    pub async fn call(
        &self,
        capability: &str,
        input: &[u8],
        secrets: &SecretSpans,
        timeout: Duration,
        stop: CallStop<'_>,
    ) -> Result<Bytes, CallError> {
        let started = Instant::now();
        let worker = self.worker(timeout).await?;
        let remaining = timeout.saturating_sub(started.elapsed());
        // Kept until this call returns: what the worker logs for it meanwhile is redacted.
        let _in_use = self.log.secrets.remember(capability, input, secrets);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = worker.pending.register(id);
        if let Err(e) = worker.send(frame::encode_call(
            id,
            unix_ms(remaining),
            capability,
            input,
        )) {
            worker.pending.forget(id);
            return Err(CallError::new(
                ErrorCode::ConnectorCrashed,
                format!("{}'s worker is gone: {e}", self.log.app_id),
            ));
        }
        let abandon = {
            let worker = worker.clone();
            move || {
                worker.pending.forget(id);
                let _ = worker.send(frame::encode(frame::CANCEL, &[&id.to_le_bytes()]));
            }
        };
        let (status, output) = await_reply(&self.log.app_id, rx, remaining, stop, abandon).await?;
        if status == status::PANIC {
            // Poisoned: the plugin's state may be corrupt. Replace the worker.
            worker.end.dead.cancel();
            worker.kill();
        } else {
            self.backoff.lock().expect("backoff lock poisoned").failures = 0;
        }
        answer(&self.log.app_id, status, output)
    }
}

/// Routes in-process completions to waiting calls.
struct InProcessCallbacks {
    log: PluginLog,
    pending: Arc<Pending>,
}

impl HostCallbacks for InProcessCallbacks {
    fn complete(&self, call_id: u64, status: u32, output: &[u8]) {
        if !self.pending.deliver(
            call_id,
            Reply::Done {
                status,
                output: output.to_vec(),
            },
        ) {
            tracing::warn!(app_id = %self.log.app_id, call_id, "completion for a call nobody waits for (late, or completed twice); ignored");
        }
    }

    fn log(&self, level: u32, message: &[u8]) {
        self.log.callback(level, message);
    }
}

/// A `start_call` that takes this long did the call's work before returning, where the ABI
/// asks it to return at once and complete later. Said once per loaded library: such a call
/// holds up whatever started it (the tunnel's session among them) for that long.
const SLOW_START: Duration = Duration::from_millis(100);

/// A vetted native connector loaded into the agent itself.
#[derive(Debug)]
pub struct InProcessConnector {
    app_id: String,
    /// Whether a slow `start_call` was reported already.
    slow_start_reported: AtomicBool,
    /// The secrets of its recent calls, which its log callbacks are redacted with.
    secrets: Arc<RecentSecrets>,
    instance: Instance,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    poisoned: AtomicBool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

impl InProcessConnector {
    /// Loads `library` into this process. The path must be content-addressed (the loader's
    /// private store copy): dlopen of a path already loaded returns the old library, so new
    /// bytes must come with a new path.
    pub fn load(library: &Path) -> Result<(Self, Description), String> {
        // Before the library's code first runs: from then on it shares the agent's stderr.
        let secrets = Arc::<RecentSecrets>::default();
        crate::stderr_capture::watch(&secrets);
        let lib = Library::load(library).map_err(|e| e.to_string())?;
        let pending = Arc::new(Pending::default());
        let log = PluginLog {
            app_id: lib.id(),
            secrets: secrets.clone(),
        };
        let callbacks = Arc::new(InProcessCallbacks {
            log,
            pending: pending.clone(),
        });
        let instance = lib.start(callbacks).map_err(|e| e.to_string())?;
        let hello = serde_json::json!({
            "id": lib.id(), "version": lib.version(), "build_info": lib.build_info(),
            "info": serde_json::from_slice::<serde_json::Value>(&instance.info()).map_err(|e| format!("the connector's info is not JSON: {e}"))?,
        });
        let description = parse_hello(hello.to_string().as_bytes())?;
        let connector = Self {
            app_id: description.id.clone(),
            slow_start_reported: AtomicBool::new(false),
            secrets,
            instance,
            pending,
            next_id: AtomicU64::new(1),
            poisoned: AtomicBool::new(false),
        };
        Ok((connector, description))
    }

    /// Tells the admin, once, about a `start_call` that did its work before returning.
    fn report_slow_start(&self, capability: &str, took: Duration) {
        if took < SLOW_START || self.slow_start_reported.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(
            app_id = %self.app_id,
            capability,
            took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "{} spent {took:?} inside start_call: an in-process connector must return from it at once and complete the call from a thread of its own (rule 4 of the C ABI), or every such call holds up the agent (the tunnel to the cloud among it) while it runs; its vendor should fix it, or run it in a worker (in_process = false). Said once per loaded library",
            self.app_id
        );
    }

    /// Runs one call in the agent's process. `secrets` says where `input`'s secrets are, for the
    /// redaction of what the plugin logs.
    pub async fn call(
        &self,
        capability: &str,
        input: &[u8],
        secrets: &SecretSpans,
        timeout: Duration,
        stop: CallStop<'_>,
    ) -> Result<Bytes, CallError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(CallError::new(
                ErrorCode::ConnectorCrashed,
                format!("{} panicked earlier and is poisoned; replace the plugin file or restart the agent", self.app_id),
            ));
        }
        // Kept until this call returns: what the plugin logs for it meanwhile is redacted.
        let _in_use = self.secrets.remember(capability, input, secrets);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = self.pending.register(id);
        let started = Instant::now();
        let accepted = self
            .instance
            .start_call(id, capability, input, unix_ms(timeout));
        self.report_slow_start(capability, started.elapsed());
        if !accepted {
            self.pending.forget(id);
            return Err(CallError::new(
                ErrorCode::Busy,
                format!("{} refused the call", self.app_id),
            ));
        }
        let (status, output) = await_reply(&self.app_id, rx, timeout, stop, || {
            self.pending.forget(id);
            self.instance.cancel(id);
        })
        .await?;
        if status == status::PANIC {
            self.poisoned.store(true, Ordering::Release);
        }
        answer(&self.app_id, status, output)
    }
}
