//! The call journal: which calls this agent started whose result the cloud has not
//! acknowledged, written down before they run. A crash (`kill -9`, the OOM killer, a plugin
//! bringing down the process) loses the results held in memory, since only a stop writes them
//! to [`super::outbox`]. Without this record, the next start would know nothing of those
//! calls, and the cloud, sending one again, would have it run twice.
//!
//! At the next start every call the journal shows started and unacknowledged, whose result was
//! not kept by a stop, gets an `agent.interrupted` result instead: sent to the cloud on the
//! first stream like any kept result, and given again if the cloud sends the call again. The
//! call is never run again by this agent; whether it took effect is for the cloud (or a
//! person) to find out.
//!
//! `<state>/outbox/calls.journal`, mode 0600, one line per record, in hex (call ids come from
//! the cloud and may hold any character):
//!
//! ```text
//! K <hex key>            the key of the fingerprints below (the first line)
//! S <hex call id>        the call was admitted to run
//! F <hex fingerprint>    the cloud acknowledged the result of the call with this fingerprint
//! ```
//!
//! The acknowledged ids come back too, as the call table keeps them: 128-bit fingerprints,
//! keyed by a random key the journal keeps (see `calls::FingerprintKey`), all 100 000
//! the table remembers. So a replay of a call acknowledged before a restart is refused with
//! `agent.duplicate_call` as it would have been before it. (Journals of earlier versions wrote
//! `A <hex call id>` for an acknowledged call and kept only the latest 10 000: they are read,
//! and rewritten in this form.)
//!
//! The call table adds records in memory as it admits calls and takes acks; the session writes
//! them with one `write` per burst of messages read, before the burst's calls start. No fsync:
//! the records survive the process dying, which is what this is for; after a power loss the
//! last records may be missing. When the file passes [`COMPACT_AT`], or after a failed write
//! (which may have left a torn line), it is rewritten whole from the table: one `S` line per
//! call still running or unacknowledged, one `F` line per acknowledged id it remembers.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::calls::{CallTable, FingerprintKey, Outcome};
use crate::error::{CallError, ErrorCode};
use crate::output::ResultBody;

/// The journal's file name in the outbox folder.
pub const FILE_NAME: &str = "calls.journal";
/// Size past which the journal is rewritten from the table: once the table remembers its
/// 100 000 acknowledged ids (a rewrite of 3.5 MB), every 30 000 to 45 000 calls, by the length
/// of their ids.
pub const COMPACT_AT: u64 = 8 << 20;

/// The key of the fingerprints.
const KEY: u8 = b'K';
/// A call admitted to run.
const STARTED: u8 = b'S';
/// A result the cloud acknowledged, by its call's fingerprint.
const ACKNOWLEDGED: u8 = b'F';
/// A result the cloud acknowledged, by its call id: written by earlier versions.
const ACKNOWLEDGED_ID: u8 = b'A';

/// The length of a fingerprint's record.
const FINGERPRINT_RECORD: usize = 3 + 2 * 16;

/// Appends `kind <hex bytes>\n` to `buf`.
fn record(buf: &mut Vec<u8>, kind: u8, bytes: &[u8]) {
    let hex_start = buf.len() + 2;
    buf.extend_from_slice(&[kind, b' ']);
    buf.resize(hex_start + 2 * bytes.len(), 0);
    // The slice is exactly twice the bytes' length, which is all encode_to_slice asks.
    let _ = hex::encode_to_slice(bytes, &mut buf[hex_start..]);
    buf.push(b'\n');
}

/// Appends the record of a call admitted to run.
pub(super) fn record_started(buf: &mut Vec<u8>, call_id: &str) {
    record(buf, STARTED, call_id.as_bytes());
}

/// Appends the record of an acknowledged call, by its fingerprint.
pub(super) fn record_acknowledged(buf: &mut Vec<u8>, fingerprint: u128) {
    record(buf, ACKNOWLEDGED, &fingerprint.to_be_bytes());
}

/// The open journal file. Owned by the [`CallTable`], which decides what is written.
#[derive(Debug)]
pub struct CallJournal {
    path: PathBuf,
    file: Option<fs::File>,
    written: u64,
    /// A write failed, so the file may end in a torn record: the next write rewrites it whole.
    rewrite: bool,
    /// Writes fail (logged once until they work again).
    failing: bool,
    /// Records taken from the table, written, then cleared (the buffer is reused).
    pub(super) spare: Vec<u8>,
}

impl CallJournal {
    /// Whether the next write must rewrite the file from the table.
    pub(super) fn needs_rewrite(&self) -> bool {
        self.rewrite || self.written >= COMPACT_AT
    }

    /// Appends the records in `spare`, and clears it. After a failure the next write is a
    /// rewrite.
    pub(super) fn append(&mut self) -> io::Result<()> {
        let result = match self.file.as_mut() {
            Some(file) => file.write_all(&self.spare),
            None => Err(io::Error::other("the journal is not open")),
        };
        match &result {
            Ok(()) => self.written += self.spare.len() as u64,
            Err(_) => self.rewrite = true,
        }
        self.spare.clear();
        result
    }

    /// Logs a failed write once, and the first success after failures.
    pub(super) fn report(&mut self, written: io::Result<()>) {
        match written {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(file = %self.path.display(), "the call journal is written again");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!(file = %self.path.display(), error = %e, "cannot write the call journal; calls still run, but until it can be written a crash may let the cloud run a call twice");
            }
            Err(_) => {}
        }
    }

    /// Replaces the file with the records of `ids`, atomically (a new file renamed over it),
    /// and keeps the new one open for appends. Not fsynced, like the appends: this runs on the
    /// session's loop every few tens of thousands of calls, and what it guards against is the
    /// process dying, after which the kernel still writes the file out.
    pub(super) fn rewrite(&mut self, ids: &JournalIds) -> io::Result<()> {
        self.spare.clear();
        self.rewrite = true;
        // Closed first: on Windows an open file may not be replaced.
        self.file = None;
        let open_len: usize = ids.open.iter().map(|id| 3 + 2 * id.len()).sum();
        let mut text =
            Vec::with_capacity(FINGERPRINT_RECORD * (1 + ids.acknowledged.len()) + open_len);
        record(&mut text, KEY, &ids.key.to_bytes());
        for &fingerprint in &ids.acknowledged {
            record_acknowledged(&mut text, fingerprint);
        }
        for id in &ids.open {
            record_started(&mut text, id);
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // Named like the outbox's other temporary files, which a start removes if a crash
        // left one. Created 0600.
        let mut new = tempfile::Builder::new()
            .prefix(".calls.journal.")
            .suffix(".tmp")
            .tempfile_in(dir)?;
        new.write_all(&text)?;
        // Its cursor is at the end: later writes append.
        self.file = Some(new.persist(&self.path).map_err(|e| e.error)?);
        self.written = text.len() as u64;
        self.rewrite = false;
        Ok(())
    }
}

/// What a journal holds, or must hold.
#[derive(Debug, PartialEq, Eq)]
pub struct JournalIds {
    /// The key of the fingerprints.
    pub(super) key: FingerprintKey,
    /// Calls started and not acknowledged, in the order the journal lists them (the order they
    /// started, since the last rewrite).
    pub open: Vec<String>,
    /// The fingerprints of the calls acknowledged, oldest first.
    pub acknowledged: Vec<u128>,
}

/// What [`open`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Calls that were running, or whose result was lost, when the last run died: each now
    /// has an `agent.interrupted` result.
    pub interrupted: usize,
    /// Lines that were not records (a torn last line after a power loss).
    pub torn: usize,
}

/// Reads the journal the last run left in `dir`, gives every call it started and never saw
/// acknowledged, and that has no result in `table` already (from [`super::outbox::restore`],
/// which runs first), an `agent.interrupted` result; then starts a new journal from the table
/// and hands it to the table. Blocking.
pub fn open(table: &CallTable, dir: &Path) -> Recovered {
    let path = dir.join(FILE_NAME);
    let mut recovered = Recovered::default();
    match fs::read(&path) {
        Ok(text) => {
            let (ids, torn) = read(&text);
            recovered.torn = torn;
            table.remember_acknowledged(ids.key, ids.acknowledged);
            for call_id in ids.open {
                if table.restore(call_id, Outcome::AgentError, interrupted()) {
                    recovered.interrupted += 1;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            let aside = super::outbox::set_aside(&path);
            tracing::error!(file = %aside.display(), error = %e, "cannot read the call journal of the last run: calls it was running when it stopped may run again if the cloud sends them again");
        }
    }
    if recovered.torn > 0 {
        tracing::warn!(
            lines = recovered.torn,
            file = %path.display(),
            "the call journal ends in a torn record (a power loss?); it was skipped"
        );
    }
    if recovered.interrupted > 0 {
        tracing::warn!(
            calls = recovered.interrupted,
            "the last run of the agent ended without a stop (a crash or a kill) while calls ran or waited for the cloud's acknowledgement: each gets an agent.interrupted result and is not run again"
        );
    }
    let mut journal = CallJournal {
        path,
        file: None,
        written: 0,
        rewrite: true,
        failing: false,
        spare: Vec::new(),
    };
    let written = journal.rewrite(&table.journal_ids());
    journal.report(written);
    table.keep_journal(journal);
    recovered
}

/// How many calls the journal in `dir` shows started and not acknowledged (for `doctor`);
/// `None` without a journal. Blocking.
pub fn open_calls(dir: &Path) -> io::Result<Option<usize>> {
    match fs::read(dir.join(FILE_NAME)) {
        Ok(text) => Ok(Some(read(&text).0.open.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a journal's records say, and how many lines were not records. The last record of an
/// id decides. A journal without a key (one of an earlier version) gets a new one.
fn read(text: &[u8]) -> (JournalIds, usize) {
    let mut lines = text.split_inclusive(|&b| b == b'\n').peekable();
    let mut torn = 0;
    let key = match lines.peek().and_then(|line| parse(line)) {
        Some((KEY, bytes)) => {
            lines.next();
            let key = <[u8; 16]>::try_from(bytes)
                .ok()
                .map(FingerprintKey::from_bytes);
            torn += usize::from(key.is_none());
            key
        }
        _ => None,
    };
    let key_found = key.is_some();
    let key = key.unwrap_or_else(FingerprintKey::random);
    // By fingerprint: the started calls with their ids, and the acknowledged ones, each with
    // the order they came in, so the log and the cloud see them in a sensible order.
    let (mut started, mut acked) = (HashMap::new(), HashSet::new());
    let (mut started_order, mut acked_order) = (Vec::new(), Vec::new());
    for line in lines {
        let fingerprint = match parse(line) {
            Some((STARTED, id)) => match String::from_utf8(id) {
                Ok(id) if !id.is_empty() => {
                    let fingerprint = key.fingerprint(&id);
                    acked.remove(&fingerprint);
                    started.insert(fingerprint, id);
                    started_order.push(fingerprint);
                    continue;
                }
                _ => None,
            },
            // Fingerprints under a lost key would match nothing.
            Some((ACKNOWLEDGED, bytes)) if key_found => {
                <[u8; 16]>::try_from(bytes).ok().map(u128::from_be_bytes)
            }
            Some((ACKNOWLEDGED_ID, id)) => String::from_utf8(id)
                .ok()
                .filter(|id| !id.is_empty())
                .map(|id| key.fingerprint(&id)),
            _ => None,
        };
        match fingerprint {
            Some(fingerprint) => {
                started.remove(&fingerprint);
                acked.insert(fingerprint);
                acked_order.push(fingerprint);
            }
            None => torn += 1,
        }
    }
    // Each once, at its first place in the order, if its last record left it there.
    let open = started_order
        .into_iter()
        .filter_map(|fingerprint| started.remove(&fingerprint))
        .collect();
    let acknowledged = acked_order
        .into_iter()
        .filter(|fingerprint| acked.remove(fingerprint))
        .collect();
    let ids = JournalIds {
        key,
        open,
        acknowledged,
    };
    (ids, torn)
}

/// A record's kind and bytes. A record is whole only with its newline: a torn last one may
/// still look like hex.
fn parse(line: &[u8]) -> Option<(u8, Vec<u8>)> {
    match line.strip_suffix(b"\n")? {
        [kind, b' ', hex @ ..] => Some((*kind, hex::decode(hex).ok()?)),
        _ => None,
    }
}

/// The result of a call the last run started and never finished delivering.
fn interrupted() -> ResultBody {
    let err = CallError::new(
        ErrorCode::Interrupted,
        "the agent stopped without a shutdown (a crash, a kill or a power loss) while this call ran or before its result reached the cloud; whether it took effect is unknown, and this agent does not run it again",
    );
    ResultBody::from(err.to_json_bytes(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tunnel::calls::{Admission, ACKED_MEMORY};

    fn body(text: &'static str) -> ResultBody {
        ResultBody::from(text.as_bytes().to_vec())
    }

    async fn text_of(result: &crate::tunnel::calls::StoredResult) -> serde_json::Value {
        serde_json::from_slice(&result.body.to_bytes().await.unwrap()).unwrap()
    }

    /// A run that dies: calls admitted, some finished, one acknowledged, one refused; the
    /// table is dropped without a stop (no outbox save).
    #[tokio::test]
    async fn after_a_crash_the_calls_started_and_unacknowledged_are_interrupted_not_run_again() {
        let spill = tempfile::tempdir().unwrap();
        let outbox = tempfile::tempdir().unwrap();
        let odd_id = "a\nS 00\n ünï";
        {
            let table = CallTable::new(spill.path().to_path_buf(), 1 << 20);
            assert_eq!(open(&table, outbox.path()), Recovered::default());
            for id in ["running", "finished", "acked", odd_id] {
                assert!(matches!(table.admit(id, 16), Admission::Run(_)));
            }
            assert!(matches!(table.admit("busy", 4), Admission::Busy));
            assert!(table.refuse("busy", body("{\"busy\":1}")));
            table.flush_journal();
            for id in ["finished", "acked", odd_id] {
                table.finish(id, Outcome::Answered, body("{}"), true).await;
            }
            assert!(table.acknowledge("acked"));
            table.flush_journal();
            // An ack recorded in memory but never written: lost with the crash.
            assert!(table.acknowledge(odd_id));
        }

        let after = CallTable::new(spill.path().to_path_buf(), 1 << 20);
        let mut rx = after.attach();
        let recovered = open(&after, outbox.path());
        assert_eq!(
            recovered,
            Recovered {
                interrupted: 3,
                torn: 0
            }
        );
        let mut sent = Vec::new();
        for _ in 0..3 {
            sent.push(rx.recv().await.unwrap().0);
        }
        assert_eq!(
            sent,
            ["running", "finished", odd_id],
            "in the order they started"
        );
        let result = after.result("running").unwrap();
        assert_eq!(result.outcome, Outcome::AgentError);
        let doc = text_of(&result).await;
        assert_eq!(doc["error"]["error_code"], "agent.interrupted");
        assert_eq!(doc["error"]["error_metadata"]["retryable"], false);
        // Sent again, none runs: the interrupted result is given again.
        assert!(matches!(after.admit("running", 16), Admission::Resent));
        assert!(matches!(after.admit("finished", 16), Admission::Resent));
        // An acknowledged call is still refused, as before the crash.
        assert!(matches!(after.admit("acked", 16), Admission::Acknowledged));
        // A refused call (it never ran) and an unknown one run.
        for id in ["busy", "new"] {
            assert!(matches!(after.admit(id, 16), Admission::Run(_)), "{id}");
        }
    }

    #[tokio::test]
    async fn results_kept_by_a_stop_stand_and_the_new_journal_carries_what_is_unacknowledged() {
        let spill = tempfile::tempdir().unwrap();
        let outbox = tempfile::tempdir().unwrap();
        {
            let table = CallTable::new(spill.path().to_path_buf(), 1 << 20);
            open(&table, outbox.path());
            for id in ["kept", "lost"] {
                assert!(matches!(table.admit(id, 16), Admission::Run(_)));
            }
            table.flush_journal();
            table
                .finish("kept", Outcome::Answered, body("{\"answer\":1}"), true)
                .await;
            // A stop kept "kept"; "lost" never finished.
            assert_eq!(super::super::outbox::save(&table, outbox.path()).results, 1);
        }
        // Start 2: the kept result is back as it was, "lost" is interrupted; this run then
        // dies too, before anything is acknowledged.
        {
            let table = CallTable::new(spill.path().to_path_buf(), 1 << 20);
            super::super::outbox::restore(&table, outbox.path());
            assert_eq!(open(&table, outbox.path()).interrupted, 1);
            assert_eq!(
                text_of(&table.result("kept").unwrap()).await,
                serde_json::json!({"answer": 1})
            );
        }
        // Start 3: both are still owed to the cloud, from the journal alone (no outbox file
        // was written by the crashed run; "kept" is now interrupted too: its result was only
        // in that run's memory).
        let table = CallTable::new(spill.path().to_path_buf(), 1 << 20);
        super::super::outbox::restore(&table, outbox.path());
        assert_eq!(open(&table, outbox.path()).interrupted, 2);
        assert!(table.acknowledge("kept"));
        assert!(table.acknowledge("lost"));
        table.flush_journal();
        drop(table);
        let table = CallTable::new(spill.path().to_path_buf(), 1 << 20);
        assert_eq!(open(&table, outbox.path()), Recovered::default());
    }

    #[test]
    fn a_torn_or_foreign_line_is_skipped_and_the_rest_read() {
        let key = FingerprintKey::random();
        let fingerprint = |id: &str| key.fingerprint(id);
        let mut text = Vec::new();
        record(&mut text, KEY, &key.to_bytes());
        record_started(&mut text, "one");
        record_started(&mut text, "two");
        record_acknowledged(&mut text, fingerprint("one"));
        text.extend_from_slice(b"X 00\nS zz\nS \nF 00\n");
        // A second key is not a record.
        record(&mut text, KEY, &FingerprintKey::random().to_bytes());
        // A torn record, whose hex would still decode ("th"), glued to the next one.
        text.extend_from_slice(b"S 7468");
        record_started(&mut text, "three");
        record_acknowledged(&mut text, fingerprint("three"));
        record_started(&mut text, "three");
        // Acknowledged by id, as earlier versions wrote.
        record_started(&mut text, "four");
        record(&mut text, ACKNOWLEDGED_ID, b"four");
        let ids = JournalIds {
            key: key.clone(),
            open: vec!["two".into(), "three".into()],
            acknowledged: vec![fingerprint("one"), fingerprint("four")],
        };
        // The torn record is not the last line here: records after it still count.
        assert_eq!(read(&text), (ids, 6));
    }

    /// What happens to the call table of one agent, for the property below.
    #[derive(Debug, Clone)]
    enum Step {
        /// The cloud sends call `i`.
        Send(usize),
        /// The session writes the journal and starts the calls it admitted.
        Start,
        /// Call `i`, if it runs, ends with a result.
        Finish(usize),
        /// Call `i` is refused before running (busy, malformed).
        Refuse(usize),
        /// The cloud acknowledges call `i`'s result.
        Ack(usize),
        /// The agent dies (`kill -9`): what is in memory is lost.
        Crash,
        /// The agent stops: running calls end, the unacknowledged results are kept.
        Stop,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..6usize).prop_map(Step::Send),
            3 => Just(Step::Start),
            3 => (0..6usize).prop_map(Step::Finish),
            1 => (0..6usize).prop_map(Step::Refuse),
            3 => (0..6usize).prop_map(Step::Ack),
            1 => Just(Step::Crash),
            1 => Just(Step::Stop),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// The tunnel's promise: whatever the cloud sends again, and however often the agent
        /// dies or stops in between, no call runs twice. A call runs when the session starts
        /// it, which is after its journal record is written; one admitted but not started when
        /// the agent died never ran, and may run after the restart.
        #[test]
        fn no_call_runs_twice_across_crashes_and_stops(
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let spill = tempfile::tempdir().unwrap();
            let outbox = tempfile::tempdir().unwrap();
            let start = || {
                let table = CallTable::new(spill.path().to_path_buf(), 1 << 20);
                crate::tunnel::outbox::restore(&table, outbox.path());
                open(&table, outbox.path());
                table
            };
            let id = |i: usize| format!("call-{i}");
            let mut table = start();
            // Admitted and not yet started; started and not finished; how often each ran.
            let (mut admitted, mut running) = (Vec::new(), Vec::new());
            let mut runs = [0usize; 6];
            for step in steps {
                match step {
                    Step::Send(i) => {
                        if let Admission::Run(_) = table.admit(&id(i), 3) {
                            admitted.push(i);
                        }
                    }
                    Step::Start => {
                        table.flush_journal();
                        for i in admitted.drain(..) {
                            runs[i] += 1;
                            running.push(i);
                        }
                    }
                    Step::Finish(i) => {
                        if let Some(at) = running.iter().position(|r| *r == i) {
                            running.remove(at);
                            runtime.block_on(table.finish(&id(i), Outcome::Answered, body("{}"), true));
                        }
                    }
                    Step::Refuse(i) => {
                        table.refuse(&id(i), body("{\"busy\":1}"));
                    }
                    Step::Ack(i) => {
                        table.acknowledge(&id(i));
                    }
                    Step::Crash => {
                        admitted.clear();
                        running.clear();
                        drop(table);
                        table = start();
                    }
                    Step::Stop => {
                        // A stop takes no new call: what was admitted and not started never runs.
                        admitted.clear();
                        for i in running.drain(..) {
                            runtime.block_on(table.finish(&id(i), Outcome::Answered, body("{}"), true));
                        }
                        table.flush_journal();
                        crate::tunnel::outbox::save(&table, outbox.path());
                        drop(table);
                        table = start();
                    }
                }
                proptest::prop_assert!(runs.iter().all(|n| *n <= 1), "runs per call: {:?}", runs);
            }
        }
    }

    /// One line of a journal, for the property below.
    #[derive(Debug, Clone)]
    enum Line {
        Started(usize),
        Acknowledged(usize),
        /// By id, as earlier versions wrote.
        AcknowledgedById(usize),
        /// A line that is no record: a foreign kind, bad hex, an empty id, a short fingerprint.
        Foreign(Vec<u8>),
    }

    fn line() -> impl proptest::strategy::Strategy<Value = Line> {
        use proptest::prelude::*;
        let foreign = prop_oneof![
            prop::collection::vec(
                any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
                0..20
            )
            .prop_map(|bytes| [&b"?"[..], &bytes, b"\n"].concat()),
            Just(b"S zz\n".to_vec()),
            Just(b"S \n".to_vec()),
            Just(b"F 0011\n".to_vec()),
        ];
        prop_oneof![
            (0..5usize).prop_map(Line::Started),
            (0..5usize).prop_map(Line::Acknowledged),
            (0..5usize).prop_map(Line::AcknowledgedById),
            foreign.prop_map(Line::Foreign),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Whatever the records and the lines that are not, a call is open after a crash when
        /// its last record says it started, and acknowledged when its last record says so;
        /// nothing else is lost or made up. (Each in the order of its first such record.)
        #[test]
        fn the_last_record_of_each_call_decides_whatever_lies_between(
            ids in proptest::collection::hash_set("\\PC{1,12}", 5),
            lines in proptest::collection::vec(line(), 0..40),
            torn_tail in proptest::option::of(0..5usize),
        ) {
            let ids: Vec<String> = ids.into_iter().collect();
            let key = FingerprintKey::random();
            let mut text = Vec::new();
            record(&mut text, KEY, &key.to_bytes());
            let mut last: HashMap<usize, bool> = HashMap::new();
            let (mut first_started, mut first_acked) = (Vec::new(), Vec::new());
            let mut foreign = 0;
            for line in &lines {
                match line {
                    Line::Started(i) => {
                        record_started(&mut text, &ids[*i]);
                        last.insert(*i, true);
                        if !first_started.contains(i) {
                            first_started.push(*i);
                        }
                    }
                    Line::Acknowledged(i) | Line::AcknowledgedById(i) => {
                        if let Line::Acknowledged(_) = line {
                            record_acknowledged(&mut text, key.fingerprint(&ids[*i]));
                        } else {
                            record(&mut text, ACKNOWLEDGED_ID, ids[*i].as_bytes());
                        }
                        last.insert(*i, false);
                        if !first_acked.contains(i) {
                            first_acked.push(*i);
                        }
                    }
                    Line::Foreign(bytes) => {
                        text.extend_from_slice(bytes);
                        foreign += 1;
                    }
                }
            }
            // A record cut short by the crash, at the very end: not a record.
            if let Some(i) = torn_tail {
                record_started(&mut text, &ids[i]);
                text.pop();
                foreign += 1;
            }
            let (read_ids, torn) = read(&text);
            let open: Vec<String> = first_started
                .iter()
                .filter(|i| last[*i])
                .map(|i| ids[*i].clone())
                .collect();
            let acknowledged: Vec<u128> = first_acked
                .iter()
                .filter(|i| !last[*i])
                .map(|i| key.fingerprint(&ids[*i]))
                .collect();
            proptest::prop_assert_eq!(read_ids.open, open);
            proptest::prop_assert_eq!(read_ids.acknowledged, acknowledged);
            proptest::prop_assert_eq!(torn, foreign);
        }
    }

    #[test]
    fn a_journal_of_an_earlier_version_is_read_with_a_new_key() {
        let mut text = Vec::new();
        for id in ["acked", "open", "again"] {
            record_started(&mut text, id);
        }
        for id in ["again", "acked"] {
            record(&mut text, ACKNOWLEDGED_ID, id.as_bytes());
        }
        record_started(&mut text, "again");
        // Fingerprints without a key match nothing.
        record_acknowledged(&mut text, 7);
        let (ids, torn) = read(&text);
        assert_eq!(torn, 1);
        assert_eq!(ids.open, ["open", "again"]);
        assert_eq!(ids.acknowledged, [ids.key.fingerprint("acked")]);
    }

    #[tokio::test]
    async fn a_large_journal_is_rewritten_from_the_table_and_carries_every_acknowledged_id() {
        let spill = tempfile::tempdir().unwrap();
        let outbox = tempfile::tempdir().unwrap();
        let table = CallTable::new(spill.path().to_path_buf(), 1 << 30);
        open(&table, outbox.path());
        let path = outbox.path().join(FILE_NAME);
        // Enough acknowledged calls to pass COMPACT_AT, with one left unacknowledged.
        let id_len = 60;
        let per_call = (3 + 2 * id_len + FINGERPRINT_RECORD) as u64;
        let calls = COMPACT_AT / per_call + 10;
        assert!(calls < ACKED_MEMORY as u64, "the table remembers them all");
        assert!(matches!(table.admit("open", 16), Admission::Run(_)));
        let id = |n: u64| format!("{n:0id_len$}");
        for n in 0..calls {
            assert!(matches!(table.admit(&id(n), 16), Admission::Run(_)));
            table
                .finish(&id(n), Outcome::Answered, body("{}"), true)
                .await;
            assert!(table.acknowledge(&id(n)));
        }
        // One append of all the records (written in several, the journal could pass the limit
        // before the last and be rewritten early).
        table.flush_journal();
        let before = fs::metadata(&path).unwrap().len();
        assert!(before >= COMPACT_AT, "{before}");
        // The next write is a rewrite: the open call and every acknowledged one.
        table.flush_journal();
        let text = fs::read(&path).unwrap();
        let (ids, torn) = read(&text);
        assert_eq!((&ids.open[..], torn), (&["open".to_string()][..], 0));
        let acknowledged: Vec<u128> = (0..calls).map(|n| ids.key.fingerprint(&id(n))).collect();
        assert_eq!(ids.acknowledged, acknowledged);
        assert_eq!(
            text.len(),
            FINGERPRINT_RECORD * (1 + calls as usize) + 3 + 2 * "open".len()
        );
        // After a restart the oldest acknowledged call is still refused, and the open one was
        // interrupted.
        drop(table);
        let after = CallTable::new(spill.path().to_path_buf(), 1 << 30);
        assert_eq!(open(&after, outbox.path()).interrupted, 1);
        assert!(matches!(after.admit(&id(0), 16), Admission::Acknowledged));
        assert!(matches!(after.admit("open", 16), Admission::Resent));
        assert!(matches!(after.admit("new", 16), Admission::Run(_)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
}
