//! The agent's stderr once a native connector is loaded into its process, redacted.
//!
//! A connector in a worker writes its stderr into a pipe the agent reads, redacts and logs. One
//! loaded in-process shares the agent's fd 2, and is no more trusted than a worker's library to
//! keep the tokens it is handed out of what it prints (a panic message, a debug print). So on
//! Unix, in the daemon, before the first in-process library loads: the agent's log moves to a
//! copy of fd 2 (still the journal, the terminal or whatever fd 2 was), fd 2 becomes a pipe, and
//! a thread reads the pipe, redacts each line with the secrets of every in-process connector's
//! recent calls and logs it. The agent's own panic messages go to the copy directly, as they
//! would otherwise be lost with the process that dies of them.
//!
//! What it cannot do: a line written in the instant before the process dies (a C library's
//! `abort` message) may die in the pipe with it; a worker keeps those. Lines are capped at
//! [`MAX_LINE`] bytes, then cut; the rest of a longer line is dropped, never logged unredacted.
//!
//! Only the daemon captures ([`enable`], from its logging set-up): tests that run the agent
//! in a test process keep that process's stderr as it is. On Windows there is nothing to
//! capture: a service's stderr goes nowhere.

use std::sync::Arc;

use zeroize::Zeroize as _;

use crate::redact::RecentSecrets;

/// The longest stderr line kept whole; longer ones are cut (and their rest dropped). Far more
/// than the [`LOGGED_CHARS`] (at most 8000 bytes) that reach the log, so a secret cut in two at
/// this mark, which redaction cannot recognise, starts beyond what is shown unless it is
/// longer than 56 KiB.
pub const MAX_LINE: usize = 64 * 1024;

/// Characters of a stderr line that reach the log (a worker's or the captured one).
pub const LOGGED_CHARS: usize = 2000;

/// Cuts a byte stream (a connector's stderr) into lines for the log, without the newline, each
/// at most [`MAX_LINE`] bytes: a longer one is emitted cut (`true`) and the rest of it dropped,
/// so a line without end costs no more memory than that. What passes through may be a secret:
/// the buffer is zeroized after each line.
#[derive(Debug, Default)]
pub struct LineSplitter {
    line: Vec<u8>,
    /// Dropping the rest of a line cut at MAX_LINE.
    skipping: bool,
}

impl LineSplitter {
    /// Feeds the next bytes; `emit` gets each line they complete.
    pub fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let ends = piece.last() == Some(&b'\n');
            if self.skipping {
                self.skipping = !ends;
                continue;
            }
            let body = piece.strip_suffix(b"\n").unwrap_or(piece);
            let take = body.len().min(MAX_LINE - self.line.len());
            self.line.extend_from_slice(&body[..take]);
            let cut = take < body.len();
            if ends || cut {
                emit(&self.line, cut);
                self.line.zeroize();
                self.skipping = cut && !ends;
            }
        }
    }

    /// At the end of the stream: a last line without newline is a line too.
    pub fn finish(self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() {
            emit(&self.line, false);
        }
    }
}

impl Drop for LineSplitter {
    fn drop(&mut self) {
        self.line.zeroize();
    }
}

/// [`LineSplitter`] over a blocking reader, until its end or an error.
#[cfg(any(unix, test))]
fn split_lines(mut input: impl std::io::Read, mut emit: impl FnMut(&[u8], bool)) {
    let mut lines = LineSplitter::default();
    let mut chunk = zeroize::Zeroizing::new([0u8; 4096]);
    loop {
        match input.read(&mut chunk[..]) {
            Ok(0) => break,
            Ok(n) => lines.push(&chunk[..n], &mut emit),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The pipe's read end closes with the return: writers get EPIPE, never block.
            Err(_) => break,
        }
    }
    lines.finish(emit);
}

#[cfg(unix)]
mod imp {
    use std::fs::File;
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
    use std::time::Duration;

    use zeroize::Zeroizing;

    use super::{RecentSecrets, LOGGED_CHARS};

    /// Set by the daemon's logging set-up: this process's stderr is the agent's log.
    static ENABLED: AtomicBool = AtomicBool::new(false);
    /// Present once fd 2 is a pipe.
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    /// The secrets of in-process connectors, loaded or gone.
    static WATCHED: Mutex<Vec<Weak<RecentSecrets>>> = Mutex::new(Vec::new());

    struct Capture {
        /// What fd 2 was: where the log goes now.
        original: File,
        /// Says when the reader has logged everything and met the end of the pipe.
        finished: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    pub fn enable() {
        ENABLED.store(true, Ordering::Relaxed);
    }

    pub fn original() -> Option<&'static File> {
        CAPTURE.get().map(|c| &c.original)
    }

    pub fn watch(secrets: &Arc<RecentSecrets>) {
        {
            let mut watched = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
            watched.retain(|w| w.strong_count() > 0);
            watched.push(Arc::downgrade(secrets));
        }
        if !ENABLED.load(Ordering::Relaxed) || CAPTURE.get().is_some() {
            return;
        }
        // Two libraries loading at once: the first one in captures, the other finds it done.
        static INSTALLING: Mutex<()> = Mutex::new(());
        let _one = INSTALLING.lock().unwrap_or_else(PoisonError::into_inner);
        if CAPTURE.get().is_some() {
            return;
        }
        match install() {
            Ok(capture) => {
                let _ = CAPTURE.set(capture);
                install_panic_hook();
                tracing::info!(target: "lumos_agent::stderr_capture", "a native connector runs in the agent's process: the agent's stderr is read, redacted and logged from here on");
            }
            Err(e) => {
                tracing::warn!(target: "lumos_agent::stderr_capture", "cannot capture stderr for an in-process connector ({e}); what it writes there reaches the log unredacted")
            }
        }
    }

    fn install() -> std::io::Result<Capture> {
        use std::os::fd::AsFd as _;
        // Close-on-exec, as the pipe's ends: children get fd 2 or nothing of this.
        let original = File::from(std::io::stderr().as_fd().try_clone_to_owned()?);
        let (reader, writer) = cloexec_pipe()?;
        let reader = File::from(reader);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("stderr-capture".into())
            .spawn(move || {
                forward(reader);
                let _ = done.send(());
            })?;
        // From here, what anyone in the process writes to fd 2 goes through the reader. The
        // writer's own descriptor closes on return: fd 2 holds the pipe alone.
        nix::unistd::dup2_stderr(&writer)?;
        Ok(Capture {
            original,
            finished: Mutex::new(finished),
        })
    }

    fn cloexec_pipe() -> nix::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
        #[cfg(not(target_vendor = "apple"))]
        {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        }
        // No pipe2 there: a child forked in between may inherit the ends, and hold the pipe
        // open until it exits (which only delays `finish`).
        #[cfg(target_vendor = "apple")]
        {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            let (reader, writer) = nix::unistd::pipe()?;
            fcntl(&reader, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            fcntl(&writer, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            Ok((reader, writer))
        }
    }

    /// Logs lines from the pipe until every writer is gone.
    fn forward(pipe: File) {
        super::split_lines(pipe, log_line);
    }

    fn log_line(bytes: &[u8], cut: bool) {
        let mut text = Zeroizing::new(String::from_utf8_lossy(bytes).into_owned());
        let end = text.trim_end_matches('\r').len();
        text.truncate(end);
        let watched: Vec<Arc<RecentSecrets>> = WATCHED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for secrets in watched {
            text = Zeroizing::new(secrets.redact(&text));
        }
        // Redacted before it is cut short: a secret across the cut would leave a piece behind.
        let shown: String = text.chars().take(LOGGED_CHARS).collect();
        let cut = if cut || shown.len() < text.len() {
            " [cut]"
        } else {
            ""
        };
        tracing::info!(target: "lumos_agent::stderr_capture", "stderr: {shown}{cut}");
    }

    /// The default hook writes to fd 2, which is the pipe: a panic that ends the process would
    /// end the reader before its message is logged. Write it to the log's copy instead.
    fn install_panic_hook() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let Some(mut log) = original() else {
                return previous(info);
            };
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>");
            let _ = writeln!(log, "thread '{name}' {info}");
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                let _ = writeln!(log, "{backtrace}");
            }
        }));
    }

    pub fn finish(grace: Duration) {
        let Some(capture) = CAPTURE.get() else {
            return;
        };
        // fd 2 to /dev/null, not back to the terminal: a library's thread that still runs must
        // not print unredacted. That closes the agent's end of the pipe; the reader logs what
        // is left in it and stops (unless a child holds a copy: then after `grace`).
        let swapped = File::options()
            .write(true)
            .open("/dev/null")
            .and_then(|null| Ok(nix::unistd::dup2_stderr(&null)?));
        if swapped.is_ok() {
            let finished = capture
                .finished
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let _ = finished.recv_timeout(grace);
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use std::fs::File;
    use std::sync::Arc;
    use std::time::Duration;

    use super::RecentSecrets;

    pub fn enable() {}

    pub fn original() -> Option<&'static File> {
        None
    }

    pub fn watch(_secrets: &Arc<RecentSecrets>) {}

    pub fn finish(_grace: Duration) {}
}

/// Says that this process's stderr is the agent's log (the daemon's logging set-up), so an
/// in-process connector's arrival captures it.
pub fn enable() {
    imp::enable();
}

/// Where the log goes once stderr is captured: the descriptor fd 2 was. `None` before.
pub fn original() -> Option<&'static std::fs::File> {
    imp::original()
}

/// Registers the secrets of an in-process connector about to load, to be redacted from what the
/// process writes on stderr; captures stderr first if this is the first one (and the daemon
/// enabled it).
pub fn watch(secrets: &Arc<RecentSecrets>) {
    imp::watch(secrets);
}

/// At exit: lets the reader log what is still in the pipe, waiting at most `grace`.
pub fn finish(grace: std::time::Duration) {
    imp::finish(grace);
}

#[cfg(test)]
mod tests {
    use super::{split_lines, LineSplitter, MAX_LINE};

    fn lines_of(input: &[u8]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        // One byte per read at worst: lines come across reads.
        struct Trickle<'a>(&'a [u8], usize);
        impl std::io::Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(self.0.len()).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for step in [1, 7, 4096] {
            let mut these = Vec::new();
            split_lines(Trickle(input, step), |line, cut| {
                these.push((String::from_utf8_lossy(line).into_owned(), cut));
            });
            if step > 1 {
                assert_eq!(
                    these, out,
                    "the same lines whatever the reads ({step} bytes)"
                );
            }
            out = these;
        }
        out
    }

    /// The lines a stream must give, found the plain way: split at newlines; a line over the
    /// cap is cut there (`true`); a last line without newline counts if not empty.
    fn lines_by_model(input: &[u8]) -> Vec<(Vec<u8>, bool)> {
        let mut pieces: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
        let tail = pieces.pop().unwrap_or_default();
        let line = |l: &[u8]| (l[..l.len().min(MAX_LINE)].to_vec(), l.len() > MAX_LINE);
        let mut out: Vec<_> = pieces.into_iter().map(line).collect();
        if !tail.is_empty() {
            out.push(line(tail));
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// However a connector's stderr arrives (reads of any size), the lines logged are the
        /// same, lines at and around the cap included.
        #[test]
        fn the_lines_are_the_same_whatever_the_reads(
            segments in proptest::collection::vec(
                (
                    proptest::prop_oneof![0usize..3, MAX_LINE - 2..MAX_LINE + 3],
                    proptest::prelude::any::<bool>(),
                ),
                0..6,
            ),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..12),
        ) {
            let mut input = Vec::new();
            for (len, newline) in &segments {
                input.extend(std::iter::repeat_n(b'x', *len));
                if *newline {
                    input.push(b'\n');
                }
            }
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            at.push(0);
            at.push(input.len());
            at.sort_unstable();
            let mut splitter = LineSplitter::default();
            let mut got = Vec::new();
            for window in at.windows(2) {
                splitter.push(&input[window[0]..window[1]], |line, cut| got.push((line.to_vec(), cut)));
            }
            splitter.finish(|line, cut| got.push((line.to_vec(), cut)));
            proptest::prop_assert!(got == lines_by_model(&input), "{} lines against {}", got.len(), lines_by_model(&input).len());
        }
    }

    #[test]
    fn lines_are_split_at_newlines_and_a_last_unfinished_one_is_kept() {
        assert_eq!(
            lines_of(b"one\n\ntwo\r\nthree"),
            [
                ("one".to_string(), false),
                (String::new(), false),
                ("two\r".to_string(), false),
                ("three".to_string(), false),
            ]
        );
        assert!(lines_of(b"").is_empty());
    }

    #[test]
    fn a_line_longer_than_the_cap_is_cut_and_its_rest_dropped() {
        let mut input = vec![b'a'; MAX_LINE];
        input.push(b'\n');
        input.extend(std::iter::repeat_n(b'b', 3 * MAX_LINE));
        input.extend_from_slice(b"REST-OF-A-LONG-LINE\nnext\n");
        let lines = lines_of(&input);
        assert_eq!(
            lines.len(),
            3,
            "{:?}",
            lines.iter().map(|(l, c)| (l.len(), c)).collect::<Vec<_>>()
        );
        assert_eq!(
            lines[0],
            ("a".repeat(MAX_LINE), false),
            "exactly the cap is whole"
        );
        assert_eq!(lines[1], ("b".repeat(MAX_LINE), true));
        assert_eq!(lines[2], ("next".to_string(), false));
    }
}
