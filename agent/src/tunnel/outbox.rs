//! The outbox across restarts: the results the cloud has not acknowledged when the agent stops
//! are written to `<state>/outbox/` and taken back into the call table at the next start. A
//! restart (an upgrade, a stop while the cloud is unreachable, a drain whose grace ran out)
//! then loses no result and runs no call twice: the results are sent on the next stream, and a
//! call sent again gets its stored result.
//!
//! One file per result, named after its call id's SHA-256 (call ids come from the cloud and
//! are no file names), written atomically with mode 0600:
//!
//! ```text
//! lumos-agent-result 1 <answered|agent_error> <length of the call id>\n<call id><document>
//! ```
//!
//! A file is removed once its result is back in the table (a small one in memory, a large one
//! copied to an unlinked spool file like any large result). A file that cannot be read, or
//! whose document is not one whole JSON document (every kept result is one, so a file cut
//! short is caught), is renamed `*.unreadable` and left for the admin; the cloud times its
//! call out.
//!
//! Only a stop writes these files: writing every result as it finishes would cost an fsync
//! per call. A crash (`kill -9`) loses the results held at that moment; the call journal
//! ([`super::journal`]) makes sure those calls are answered `agent.interrupted` after the next
//! start rather than forgotten or run again.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::calls::{CallTable, Outcome};
use crate::output::{ResultBody, SPOOL_THRESHOLD};

const MAGIC: &str = "lumos-agent-result";
const FORMAT_VERSION: &str = "1";
const SUFFIX: &str = ".result";
/// The header line is short; anything longer is not one of these files.
const MAX_HEADER: u64 = 128;
/// Appended to the name of a file a start could not read, which is left for the admin.
const UNREADABLE: &str = ".unreadable";
/// Call ids are short; a longer one is a corrupt length.
const MAX_CALL_ID: usize = 64 * 1024;

/// Why a kept result cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum OutboxFileError {
    /// The file system refused.
    #[error("cannot be read: {0}")]
    Io(#[from] io::Error),
    /// It is not a result written by this agent (truncated, edited, another version).
    #[error("is not a result kept by this agent ({0})")]
    Format(&'static str),
}

/// What [`save`] wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// Results written.
    pub results: usize,
    /// Their documents' bytes.
    pub bytes: u64,
    /// Results that could not be written (each one logged).
    pub failed: usize,
}

/// What [`restore`] took back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Results back in the table.
    pub results: usize,
    /// Their documents' bytes.
    pub bytes: u64,
    /// Files that could not be read, renamed `*.unreadable` (each one logged).
    pub unreadable: usize,
}

/// What the outbox folder holds now, for `doctor`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// Results kept by the last stop (taken back, and their files removed, at the next start).
    pub results: usize,
    /// Their files' bytes.
    pub bytes: u64,
    /// Files a start could not read back, left for inspection (`*.unreadable`).
    pub unreadable: Vec<String>,
}

/// Lists `dir` without changing anything. Blocking.
pub fn contents(dir: &Path) -> io::Result<Contents> {
    let mut contents = Contents::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(SUFFIX) {
            contents.results += 1;
            contents.bytes += entry.metadata().map_or(0, |m| m.len());
        } else if name.ends_with(UNREADABLE) {
            contents.unreadable.push(name);
        }
    }
    contents.unreadable.sort();
    Ok(contents)
}

/// Writes every unacknowledged result of a call that ran into `dir`. Blocking.
pub fn save(table: &CallTable, dir: &Path) -> Saved {
    let mut saved = Saved::default();
    for (call_id, result) in table.undelivered() {
        let path = dir.join(file_name(&call_id));
        let written = crate::state::write_atomic_with(&path, 0o600, |file| {
            let mut out = io::BufWriter::new(file);
            writeln!(
                out,
                "{MAGIC} {FORMAT_VERSION} {} {}",
                outcome_name(result.outcome),
                call_id.len()
            )?;
            out.write_all(call_id.as_bytes())?;
            io::copy(&mut result.body.reader(), &mut out)?;
            out.flush()
        });
        match written {
            Ok(()) => {
                saved.results += 1;
                saved.bytes += result.body.len();
            }
            Err(e) => {
                saved.failed += 1;
                tracing::error!(%call_id, file = %path.display(), error = %e, "cannot keep an unacknowledged result for the next start; it is lost");
            }
        }
    }
    if saved.results > 0 {
        tracing::warn!(
            results = saved.results,
            bytes = saved.bytes,
            dir = %dir.display(),
            "the cloud has not acknowledged every result: they are kept on disk and sent again after the next start"
        );
    }
    saved
}

/// Takes back the results kept by [`save`] into `table`, and removes their files. Blocking.
pub fn restore(table: &CallTable, dir: &Path) -> Restored {
    let mut restored = Restored::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return restored,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read the kept results of the last run; they stay on disk");
            return restored;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            // A save interrupted before its rename: the result was not kept.
            let _ = fs::remove_file(&path);
            continue;
        }
        if !name.ends_with(SUFFIX) {
            continue;
        }
        match read_one(table, &path) {
            Ok((call_id, outcome, body)) => {
                let bytes = body.len();
                if table.restore(call_id, outcome, body) {
                    restored.results += 1;
                    restored.bytes += bytes;
                }
                if let Err(e) = fs::remove_file(&path) {
                    tracing::error!(file = %path.display(), error = %e, "cannot remove a kept result taken back; remove it by hand, or it is sent again after the next start");
                }
            }
            Err(e) => {
                restored.unreadable += 1;
                let aside = set_aside(&path);
                tracing::error!(file = %aside.display(), "a result kept by the last run {e}; left for inspection, and the cloud times its call out");
            }
        }
    }
    if restored.results > 0 {
        tracing::info!(
            results = restored.results,
            bytes = restored.bytes,
            "results the cloud had not acknowledged before the last stop are back in the outbox; they are sent when the cloud connects"
        );
    }
    restored
}

/// Renames a file a start could not read to `<name>.unreadable` (best effort: it is read
/// again at the next start otherwise), where `doctor` lists it. Returns the new path.
pub(super) fn set_aside(path: &Path) -> PathBuf {
    let mut aside = path.as_os_str().to_owned();
    aside.push(UNREADABLE);
    let aside = PathBuf::from(aside);
    let _ = fs::rename(path, &aside);
    aside
}

/// A kept result's file name: its call id's digest, so any id is a safe name.
fn file_name(call_id: &str) -> String {
    let digest = Sha256::digest(call_id.as_bytes());
    format!("{}{SUFFIX}", hex::encode(&digest[..16]))
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Answered => "answered",
        Outcome::AgentError => "agent_error",
    }
}

fn read_one(
    table: &CallTable,
    path: &Path,
) -> Result<(String, Outcome, ResultBody), OutboxFileError> {
    let file = fs::File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let mut header = Vec::new();
    reader
        .by_ref()
        .take(MAX_HEADER)
        .read_until(b'\n', &mut header)?;
    if header.pop() != Some(b'\n') {
        return Err(OutboxFileError::Format("no header line"));
    }
    let header = std::str::from_utf8(&header).map_err(|_| OutboxFileError::Format("header"))?;
    let mut fields = header.split(' ');
    if fields.next() != Some(MAGIC) {
        return Err(OutboxFileError::Format("not its header"));
    }
    if fields.next() != Some(FORMAT_VERSION) {
        return Err(OutboxFileError::Format("an unknown format version"));
    }
    let outcome = match fields.next() {
        Some("answered") => Outcome::Answered,
        Some("agent_error") => Outcome::AgentError,
        _ => return Err(OutboxFileError::Format("an unknown outcome")),
    };
    let id_len: usize = fields
        .next()
        .and_then(|n| n.parse().ok())
        .filter(|n| (1..=MAX_CALL_ID).contains(n))
        .ok_or(OutboxFileError::Format("a bad call id length"))?;
    if fields.next().is_some() {
        return Err(OutboxFileError::Format("extra header fields"));
    }
    let mut id = vec![0u8; id_len];
    reader.read_exact(&mut id).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => OutboxFileError::Format("truncated call id"),
        _ => OutboxFileError::Io(e),
    })?;
    let call_id = String::from_utf8(id).map_err(|_| OutboxFileError::Format("call id"))?;
    let body_len = file_len
        .checked_sub(header.len() as u64 + 1 + id_len as u64)
        .ok_or(OutboxFileError::Format("truncated"))?;
    let body = if body_len <= SPOOL_THRESHOLD as u64 && table.memory_room(body_len) {
        let mut bytes = Vec::with_capacity(usize::try_from(body_len).unwrap_or(0));
        reader.read_to_end(&mut bytes)?;
        ResultBody::from(bytes)
    } else {
        // Copied to an unlinked file like any large result, so the kept file can go at once.
        let mut spool = tempfile::tempfile_in(table.spill_dir())?;
        let copied = io::copy(&mut reader, &mut spool)?;
        spool.flush()?;
        ResultBody::from_file(spool, copied)
    };
    if body.len() != body_len {
        return Err(OutboxFileError::Format("changed while read"));
    }
    // Every result kept is one JSON document (a connector's answer is checked before it is
    // stored). A file cut short or damaged since its save must not go to the cloud as a
    // result: the header carries no length, so this check is what catches a cut.
    if body.is_one_json_document().is_err() {
        return Err(OutboxFileError::Format(
            "its result is not a whole JSON document: cut short or damaged",
        ));
    }
    Ok((call_id, outcome, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::tunnel::calls::Admission;

    /// A JSON document of exactly `len` bytes (at least 10).
    fn json_of_len(len: usize) -> Vec<u8> {
        let text: String = (0..len - 10)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        format!("{{\"data\":\"{text}\"}}").into_bytes()
    }

    async fn table_with(spill: &Path, results: &[(&str, Outcome, Vec<u8>, bool)]) -> CallTable {
        let table = CallTable::new(spill.to_path_buf(), 1 << 30);
        for (id, outcome, body, ran) in results {
            if *ran {
                assert!(matches!(table.admit(id, 16), Admission::Run(_)));
            }
            table
                .finish(id, *outcome, ResultBody::from(body.clone()), *ran)
                .await;
        }
        table
    }

    #[tokio::test]
    async fn unacknowledged_results_come_back_after_a_restart_and_do_not_run_again() {
        let spill = tempfile::tempdir().unwrap();
        let outbox = tempfile::tempdir().unwrap();
        // A large result (beyond the in-memory size), one with an awkward id, an agent error,
        // a refusal (not kept: the cloud sends that call again), and an acknowledged one.
        let large = json_of_len(SPOOL_THRESHOLD + 4096);
        let odd_id = "../../etc/passwd \n ünïcode";
        let before = table_with(
            spill.path(),
            &[
                (
                    "small",
                    Outcome::Answered,
                    b"{\"response\":1}".to_vec(),
                    true,
                ),
                ("large", Outcome::Answered, large.clone(), true),
                (
                    odd_id,
                    Outcome::AgentError,
                    b"{\"error\":{}}".to_vec(),
                    true,
                ),
                ("busy", Outcome::AgentError, b"{\"busy\":1}".to_vec(), false),
                ("acked", Outcome::Answered, b"{}".to_vec(), true),
            ],
        )
        .await;
        assert!(before.acknowledge("acked"));
        let saved = save(&before, outbox.path());
        assert_eq!(
            saved,
            Saved {
                results: 3,
                bytes: large.len() as u64 + 14 + 12,
                failed: 0
            }
        );
        drop(before);

        let after = CallTable::new(spill.path().to_path_buf(), 1 << 30);
        let restored = restore(&after, outbox.path());
        assert_eq!(restored.results, 3);
        assert_eq!(restored.unreadable, 0);
        assert_eq!(
            fs::read_dir(outbox.path()).unwrap().count(),
            0,
            "taken back, the files are removed"
        );
        let small = after.result("small").unwrap();
        assert_eq!(small.outcome, Outcome::Answered);
        assert!(small.ran && small.body.in_memory());
        assert_eq!(
            &small.body.to_bytes().await.unwrap()[..],
            b"{\"response\":1}"
        );
        let large_back = after.result("large").unwrap();
        assert!(!large_back.body.in_memory(), "a large result is spooled");
        assert_eq!(&large_back.body.to_bytes().await.unwrap()[..], &large[..]);
        let odd = after.result(odd_id).unwrap();
        assert_eq!(odd.outcome, Outcome::AgentError);
        assert!(after.result("busy").is_none());
        assert!(after.result("acked").is_none());
        assert_eq!(after.memory_bytes(), 14 + 12);
        // Sent on the next stream, and a call sent again is not run again.
        let mut queued: Vec<String> = Vec::new();
        let mut rx = after.attach();
        while let Ok((id, _)) = rx.try_recv() {
            queued.push(id);
        }
        queued.sort();
        assert_eq!(queued, [odd_id, "large", "small"]);
        assert!(matches!(after.admit("small", 16), Admission::Resent));
        assert!(after.acknowledge("small"));
        assert!(matches!(after.admit("small", 16), Admission::Acknowledged));
    }

    #[tokio::test]
    async fn unreadable_files_are_set_aside_and_interrupted_saves_removed() {
        let spill = tempfile::tempdir().unwrap();
        let outbox = tempfile::tempdir().unwrap();
        let good = table_with(
            spill.path(),
            &[("good", Outcome::Answered, b"{}".to_vec(), true)],
        )
        .await;
        assert_eq!(save(&good, outbox.path()).results, 1);
        let bad = [
            ("a.result", b"not a kept result at all".to_vec()),
            (
                "b.result",
                b"lumos-agent-result 1 answered 50\nshort".to_vec(),
            ),
            ("c.result", b"lumos-agent-result 2 answered 1\nx{}".to_vec()),
            ("d.result", b"lumos-agent-result 1 maybe 1\nx{}".to_vec()),
            ("e.result", b"lumos-agent-result 1 answered 0\n{}".to_vec()),
            ("f.result", vec![b'x'; 4096]),
            (
                "g.result",
                b"lumos-agent-result 1 answered 1\nx{\"response\": {\"users\": [".to_vec(),
            ),
        ];
        for (name, bytes) in &bad {
            fs::write(outbox.path().join(name), bytes).unwrap();
        }
        fs::write(outbox.path().join(".abc.result.123.tmp"), b"half").unwrap();
        fs::write(outbox.path().join("README"), b"not ours").unwrap();

        let table = CallTable::new(spill.path().to_path_buf(), 1 << 30);
        let restored = restore(&table, outbox.path());
        assert_eq!(restored.results, 1);
        assert_eq!(restored.unreadable, bad.len());
        assert!(table.result("good").is_some());
        let mut left: Vec<String> = fs::read_dir(outbox.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected: Vec<String> = bad
            .iter()
            .map(|(name, _)| format!("{name}.unreadable"))
            .collect();
        expected.push("README".into());
        expected.sort();
        assert_eq!(
            left, expected,
            "bad files set aside, the interrupted save gone"
        );
        // Set aside, they are not read again.
        assert_eq!(restore(&table, outbox.path()), Restored::default());
    }

    #[tokio::test]
    async fn over_the_memory_budget_a_small_result_comes_back_spooled() {
        let spill = tempfile::tempdir().unwrap();
        let outbox = tempfile::tempdir().unwrap();
        let before = table_with(
            spill.path(),
            &[("a", Outcome::Answered, json_of_len(64), true)],
        )
        .await;
        save(&before, outbox.path());
        let after = CallTable::new(spill.path().to_path_buf(), 16);
        assert_eq!(restore(&after, outbox.path()).results, 1);
        let a = after.result("a").unwrap();
        assert!(!a.body.in_memory());
        assert_eq!(after.memory_bytes(), 0);
        assert_eq!(
            a.body.to_bytes().await.unwrap(),
            Bytes::from(json_of_len(64))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// A kept file cut anywhere (a damaged disk, a copy of the state folder that stopped
        /// part-way) is set aside, never sent as a result; whole, it comes back as it was.
        /// Documents small and large (spooled), ids of any characters.
        #[test]
        fn a_kept_result_cut_anywhere_is_set_aside_never_sent(
            call_id in "\\PC{1,40}",
            doc_len in proptest::prop_oneof![10..200usize, (SPOOL_THRESHOLD - 64)..(SPOOL_THRESHOLD + 64)],
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let spill = tempfile::tempdir().unwrap();
            let outbox = tempfile::tempdir().unwrap();
            let doc = json_of_len(doc_len);
            let before = runtime.block_on(table_with(
                spill.path(),
                &[(call_id.as_str(), Outcome::Answered, doc.clone(), true)],
            ));
            proptest::prop_assert_eq!(save(&before, outbox.path()).results, 1);
            let file = outbox.path().join(file_name(&call_id));
            let whole = fs::read(&file).unwrap();
            // Anywhere from nothing left to all of it.
            let keep = cut.index(whole.len() + 1);
            fs::write(&file, &whole[..keep]).unwrap();

            let after = CallTable::new(spill.path().to_path_buf(), 1 << 30);
            let restored = restore(&after, outbox.path());
            if keep == whole.len() {
                proptest::prop_assert_eq!(restored.results, 1);
                let back = runtime
                    .block_on(after.result(&call_id).unwrap().body.to_bytes())
                    .unwrap();
                proptest::prop_assert_eq!(&back[..], &doc[..]);
            } else {
                proptest::prop_assert_eq!(
                    (restored.results, restored.unreadable),
                    (0, 1),
                    "cut to {} of {} bytes",
                    keep,
                    whole.len()
                );
                proptest::prop_assert!(after.result(&call_id).is_none());
            }
        }
    }
}
