//! Logging: tracing to stderr (journald picks it up), human or JSON lines. The filter can be
//! changed while running (SIGHUP with a new `log.level`).

use std::sync::OnceLock;

use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the installed subscriber's filter; set by [`init`].
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Installs the daemon's global subscriber, writing to stderr (or, once an in-process connector
/// made the agent capture its stderr, to what stderr was: see [`crate::stderr_capture`]).
/// `RUST_LOG`, when set, overrides `log.level` (for debugging a running install without editing
/// its config).
pub fn init(log: &LogConfig) {
    // Looked at before the capture may put a pipe on fd 2: the log goes where stderr was.
    let colour = wants_colour(&std::io::stderr());
    crate::stderr_capture::enable();
    init_with_writer(log, BoxMakeWriter::new(LogDestination), colour);
}

/// Colour codes only for a person at a terminal, and not even then with `NO_COLOR` set
/// (no-color.org). journald and log files keep them as text: `journalctl` showed each line
/// wrapped in `[2m…[0m`.
fn wants_colour(log: &impl std::io::IsTerminal) -> bool {
    log.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The daemon's log: fd 2, or the copy of it the stderr capture keeps. Never fd 2 once that is
/// the capture's pipe: each log line would come back to be logged again.
struct LogDestination;

impl<'a> MakeWriter<'a> for LogDestination {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        crate::stderr_capture::original()
            .map_or(LogWriter::Stderr(std::io::stderr()), LogWriter::Original)
    }
}

enum LogWriter {
    Stderr(std::io::Stderr),
    Original(&'static std::fs::File),
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Stderr(w) => w.write(buf),
            Self::Original(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Stderr(w) => w.write_all(buf),
            Self::Original(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Stderr(w) => w.flush(),
            Self::Original(w) => w.flush(),
        }
    }
}

/// [`init`] with another destination (the Windows service writes to a file: a service has no
/// console), with or without colour codes in the human format.
pub fn init_with_writer(log: &LogConfig, writer: BoxMakeWriter, colour: bool) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let base = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour)
        // A line that cannot be written is lost, and nothing else: by default the subscriber
        // reports the failure with `eprintln!`, which panics when stderr is the broken pipe
        // that failed (journald restarted, a `| head` in front of the agent), and the agent
        // would exit on its next log line.
        .log_internal_errors(false);
    // Human and JSON builders are different types, each with its own reload handle.
    let installed: Result<SetFilter, _> = match log.format {
        LogFormat::Human => {
            let builder = base.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| -> SetFilter {
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
            })
        }
        LogFormat::Json => {
            let builder = base.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| -> SetFilter {
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
            })
        }
    };
    // A second init (tests) is harmless: the first subscriber stays.
    if let Ok(set) = installed {
        let _ = SET_FILTER.set(set);
    }
}

/// Lets through at most a few lines of a kind (an error code, say) in each window of time and
/// counts the rest: a storm of failing calls (a broken connector, an overloaded agent) would
/// otherwise write a line per call, costing CPU when the agent has least to spare and running
/// into journald's rate limit, which then drops the agent's other warnings too. The periodic
/// call summary counts every call whatever is let through here.
#[derive(Debug)]
pub struct LineThrottle {
    window: std::time::Duration,
    burst: u32,
    kinds: std::sync::Mutex<std::collections::BTreeMap<&'static str, LineWindow>>,
}

#[derive(Debug)]
struct LineWindow {
    started: tokio::time::Instant,
    let_through: u32,
    /// Held back since the last line let through.
    held_back: u64,
}

impl LineThrottle {
    /// At most `burst` lines of each kind per `window`.
    pub const fn new(window: std::time::Duration, burst: u32) -> Self {
        Self {
            window,
            burst,
            kinds: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Ten lines a minute of each kind.
    pub const fn per_minute() -> Self {
        Self::new(std::time::Duration::from_secs(60), 10)
    }

    /// Whether a line of `kind` may be written now: `Some(held_back)`, how many lines of the
    /// kind were held back before this one, or `None`: hold it back.
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = kinds.entry(kind).or_insert(LineWindow {
            started: now,
            let_through: 0,
            held_back: 0,
        });
        if now.duration_since(window.started) >= self.window {
            window.started = now;
            window.let_through = 0;
        }
        if window.let_through >= self.burst {
            window.held_back += 1;
            return None;
        }
        window.let_through += 1;
        Some(std::mem::take(&mut window.held_back))
    }
}

/// " (and 12 more like it before, not logged one by one)", for the line let through after
/// others were held back; nothing when none were.
pub fn held_back_note(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" (and {held_back} more like it before, not logged one by one)")
    }
}

/// Changes the log filter of the running agent.
pub fn set_filter(level: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("{level:?} is not a log filter: {e}"))?;
    match SET_FILTER.get() {
        Some(set) => set(filter),
        None => Err("logging was not initialised by the agent".into()),
    }
}

/// How many of the agent's daily log files [`daily_log_file`] keeps: two weeks, like the
/// connectors' logs by default.
pub const AGENT_LOG_FILES_KEPT: usize = 14;

/// The agent's own log file in `dir`, for where no journal takes its lines (the Windows
/// service): `agent.<YYYY-MM-DD>.log`, a new one each day (UTC), the oldest removed beyond
/// [`AGENT_LOG_FILES_KEPT`] at start and at each new day. A single file grew for as long as
/// the service ran (by a line per call, when calls were logged at `info`).
pub fn daily_log_file(
    dir: &std::path::Path,
) -> Result<tracing_appender::rolling::RollingFileAppender, String> {
    tracing_appender::rolling::RollingFileAppender::builder()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("agent")
        .filename_suffix("log")
        .max_log_files(AGENT_LOG_FILES_KEPT)
        .build(dir)
        .map_err(|e| format!("cannot open a log file in {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storm of lines of one kind is cut to a few per window and counted; the first line
    /// of the next window says how many were held back; another kind has its own budget.
    #[tokio::test(start_paused = true)]
    async fn a_storm_of_lines_is_cut_to_a_few_a_window_and_counted() {
        let throttle = LineThrottle::new(std::time::Duration::from_secs(60), 3);
        let storm: Vec<Option<u64>> = (0..7).map(|_| throttle.admit("busy")).collect();
        assert_eq!(storm, [Some(0), Some(0), Some(0), None, None, None, None]);
        assert_eq!(throttle.admit("timeout"), Some(0));
        tokio::time::advance(std::time::Duration::from_secs(59)).await;
        assert_eq!(throttle.admit("busy"), None);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(throttle.admit("busy"), Some(5));
        assert_eq!(throttle.admit("busy"), Some(0));
        assert_eq!(
            held_back_note(5),
            " (and 5 more like it before, not logged one by one)"
        );
        assert_eq!(held_back_note(0), "");
    }

    #[test]
    fn the_daily_log_file_is_dated_and_the_oldest_are_removed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        for day in 1..=20 {
            std::fs::write(
                dir.path().join(format!("agent.2026-01-{day:02}.log")),
                "old\n",
            )
            .unwrap();
        }
        // Neither the connectors' folder nor other files are the appender's.
        std::fs::create_dir(dir.path().join("connectors")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();

        let mut file = daily_log_file(dir.path()).unwrap();
        file.write_all(b"a line\n").unwrap();
        file.flush().unwrap();
        drop(file);

        let mut logs: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("agent.") && name.ends_with(".log"))
            .collect();
        logs.sort();
        assert_eq!(logs.len(), AGENT_LOG_FILES_KEPT, "{logs:?}");
        let today = logs
            .iter()
            .find(|name| !name.starts_with("agent.2026-01-"))
            .expect("today's file");
        assert_eq!(today.len(), "agent.YYYY-MM-DD.log".len(), "{today}");
        let text = std::fs::read_to_string(dir.path().join(today)).unwrap();
        assert_eq!(text, "a line\n");
        assert!(dir.path().join("connectors").is_dir() && dir.path().join("notes.txt").exists());
    }
}
