//! The tunnel's memory of calls, across streams: which are running, which results wait for
//! the cloud's `ResultAck` (the outbox), and which ids already ran and were acknowledged.
//!
//! This is what makes delivery exactly-once from the cloud's point of view: a result stays
//! here until acknowledged and is sent again on every new stream; a `call_id` seen before is
//! never run again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher as _, RandomState};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::journal::{self, CallJournal, JournalIds};
use crate::output::ResultBody;

/// How many acknowledged call ids are remembered, to refuse a replay of an old call, within a
/// run and over a restart (the call journal carries them: 3.5 MB of records).
pub(super) const ACKED_MEMORY: usize = 100_000;

/// How a call ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connector answered (its document is verbatim, even a connector error).
    Answered,
    /// The agent could not get an answer; the body is an agent error document.
    AgentError,
}

/// A finished call's result, waiting for its acknowledgement.
#[derive(Debug)]
pub struct StoredResult {
    /// How it ended.
    pub outcome: Outcome,
    /// The document.
    pub body: ResultBody,
    /// Whether the connector ran. A call refused before running (busy, draining) may be sent
    /// again by the cloud and then runs.
    pub ran: bool,
    /// Set when the table lets go of this result (acknowledged, or a refusal replaced): a copy
    /// still in a stream's queue is then not sent.
    withdrawn: AtomicBool,
}

impl StoredResult {
    fn new(outcome: Outcome, body: ResultBody, ran: bool) -> Arc<Self> {
        Arc::new(Self {
            outcome,
            body,
            ran,
            withdrawn: AtomicBool::new(false),
        })
    }

    /// Whether the table let go of this result since it was queued: not to be sent.
    pub fn withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Acquire)
    }

    fn withdraw(&self) {
        self.withdrawn.store(true, Ordering::Release);
    }
}

/// A result queued for a stream, with its call id. The result travels with its id so that the
/// stream need not look it up in the table (a lock per result); [`StoredResult::withdrawn`]
/// says whether it is still to be sent.
pub type Queued = (String, Arc<StoredResult>);

#[derive(Debug)]
enum Entry {
    Running(CancellationToken),
    Done(Arc<StoredResult>),
}

/// What to do with a call request.
#[derive(Debug)]
pub enum Admission {
    /// Run it; the token stops it (`Cancel`, agent quit).
    Run(CancellationToken),
    /// It is running; its result is sent when ready.
    AlreadyRunning,
    /// It ran; its stored result was queued to be sent again.
    Resent,
    /// It ran and the cloud acknowledged the result: refuse to run it twice.
    Acknowledged,
    /// Too many calls run: answer `agent.busy`.
    Busy,
}

/// Calls known to the tunnel. Shared by every stream of one agent run.
#[derive(Debug)]
pub struct CallTable {
    inner: Mutex<Inner>,
    /// Woken when the table becomes empty (every call finished and every result
    /// acknowledged): what a draining stream waits for before it closes. Only then, not at
    /// every result and ack: a wake-up nobody waits for still locks the `Notify`'s list, a
    /// lock both workers would take twice per call.
    pub emptied: Notify,
    spill_dir: PathBuf,
    memory_budget: AtomicU64,
    /// The journal file, once [`journal::open`] has read the last run's. Locked only to write
    /// (by the session, once per burst of messages), never while `inner` is held.
    journal: Mutex<Option<CallJournal>>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    running: usize,
    acked: AckedIds,
    memory_bytes: u64,
    /// The current stream's queue of results to send.
    sender: Option<mpsc::UnboundedSender<Queued>>,
    /// Journal records not written yet; `None` until the journal is open.
    journal_records: Option<Vec<u8>>,
    /// The agent quit: every call was cancelled, and a call admitted now starts cancelled.
    aborted: bool,
}

impl Inner {
    /// Whether a refusal may be stored for `call_id`: not when the id runs, ran or was
    /// acknowledged.
    fn refusable(&self, call_id: &str) -> bool {
        !self.acked.contains(call_id)
            && match self.entries.get(call_id) {
                Some(Entry::Running(_)) => false,
                Some(Entry::Done(result)) => !result.ran,
                None => true,
            }
    }

    /// Queues a stored result on the current stream, if there is one.
    fn queue(&self, call_id: &str, result: Arc<StoredResult>) {
        if let Some(sender) = &self.sender {
            let _ = sender.send((call_id.to_string(), result));
        }
    }

    /// Lets go of a stored result (acknowledged, or replaced): its bytes no longer count, and
    /// a copy still in a stream's queue is not sent.
    fn release(&mut self, result: &StoredResult) {
        result.withdraw();
        if result.body.in_memory() {
            self.memory_bytes = self.memory_bytes.saturating_sub(result.body.len());
        }
    }
}

/// The key of the fingerprints of acknowledged call ids: random at an agent's first start,
/// kept in the call journal, so that the fingerprints it carries still match after a restart.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct FingerprintKey([u64; 2]);

impl FingerprintKey {
    /// A new random key.
    pub(super) fn random() -> Self {
        let random = || {
            getrandom::u64().unwrap_or_else(|_| {
                // No system randomness (it does not happen on a supported system): std's
                // per-process random hash keys are the next best, and far better than a
                // fixed key.
                RandomState::new().hash_one(std::time::SystemTime::now())
            })
        };
        Self([random(), random()])
    }

    /// The key as 16 bytes (for the journal).
    pub(super) fn to_bytes(&self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.0[0].to_le_bytes());
        bytes[8..].copy_from_slice(&self.0[1].to_le_bytes());
        bytes
    }

    /// The key written by [`Self::to_bytes`].
    pub(super) fn from_bytes(bytes: [u8; 16]) -> Self {
        let half = |range: std::ops::Range<usize>| {
            u64::from_le_bytes(bytes[range].try_into().unwrap_or_default())
        };
        Self([half(0..8), half(8..16)])
    }

    /// The 128-bit keyed SipHash-1-3 of `id`.
    pub(super) fn fingerprint(&self, id: &str) -> u128 {
        use siphasher::sip128::Hasher128 as _;
        let mut hasher = siphasher::sip128::SipHasher13::new_with_keys(self.0[0], self.0[1]);
        hasher.write(id.as_bytes());
        hasher.finish128().as_u128()
    }
}

impl std::fmt::Debug for FingerprintKey {
    // Who knows the key can make ids collide on purpose: it stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

/// The call ids that ran and were acknowledged, to refuse a replay: the latest
/// [`ACKED_MEMORY`], as fingerprints, which the call journal carries over a restart.
///
/// A fingerprint is a 128-bit SipHash keyed at random per agent (see [`FingerprintKey`]).
/// The ids themselves (100 000 strings of some 40 bytes scattered over the heap, a copy made
/// at each ack and two string hashes and comparisons per ack) made the table slower the longer
/// the agent served, and the journal could carry only a tenth of them. Two ids share a
/// fingerprint with a chance of 2⁻¹²⁸ per pair, and a cloud cannot aim at one without the
/// key.
#[derive(Debug)]
struct AckedIds {
    key: FingerprintKey,
    fingerprints: HashSet<u128>,
    /// Oldest first.
    order: VecDeque<u128>,
}

impl Default for AckedIds {
    fn default() -> Self {
        Self {
            key: FingerprintKey::random(),
            fingerprints: HashSet::new(),
            order: VecDeque::new(),
        }
    }
}

impl AckedIds {
    fn contains(&self, id: &str) -> bool {
        self.fingerprints.contains(&self.key.fingerprint(id))
    }

    /// Remembers `id`, forgetting the oldest past the limit; returns its fingerprint.
    fn insert(&mut self, id: &str) -> u128 {
        let fingerprint = self.key.fingerprint(id);
        self.insert_fingerprint(fingerprint);
        fingerprint
    }

    fn insert_fingerprint(&mut self, fingerprint: u128) {
        if !self.fingerprints.insert(fingerprint) {
            return;
        }
        self.order.push_back(fingerprint);
        if self.order.len() > ACKED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.fingerprints.remove(&old);
            }
        }
    }
}

impl CallTable {
    /// A table that keeps up to `memory_budget` bytes of results in memory and spills the rest
    /// to unlinked files in `spill_dir`.
    pub fn new(spill_dir: PathBuf, memory_budget: u64) -> Self {
        Self {
            inner: Mutex::default(),
            emptied: Notify::new(),
            spill_dir,
            memory_budget: AtomicU64::new(memory_budget),
            journal: Mutex::default(),
        }
    }

    /// Changes the memory budget (new cloud settings); results already stored stay where they
    /// are.
    pub fn set_memory_budget(&self, bytes: u64) {
        self.memory_budget.store(bytes, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("call table poisoned")
    }

    /// Decides what to do with a request for `call_id`; `Run` registers it as running.
    pub fn admit(&self, call_id: &str, max_running: usize) -> Admission {
        let mut inner = self.lock();
        if inner.acked.contains(call_id) {
            return Admission::Acknowledged;
        }
        match inner.entries.get(call_id) {
            Some(Entry::Running(_)) => return Admission::AlreadyRunning,
            Some(Entry::Done(result)) if result.ran => {
                inner.queue(call_id, result.clone());
                return Admission::Resent;
            }
            // Refused before running: this request may run.
            Some(Entry::Done(_)) | None => {}
        }
        if inner.running >= max_running {
            return Admission::Busy;
        }
        if let Some(Entry::Done(old)) = inner.entries.remove(call_id) {
            inner.release(&old);
        }
        // A token of its own, not a child of the agent's: a child token locks its parent's
        // list of children when made and when dropped, a lock every call of every worker
        // would share. `cancel_all` reaches the running calls instead.
        let token = CancellationToken::new();
        if inner.aborted {
            token.cancel();
        }
        inner
            .entries
            .insert(call_id.to_string(), Entry::Running(token.clone()));
        inner.running += 1;
        if let Some(records) = inner.journal_records.as_mut() {
            journal::record_started(records, call_id);
        }
        Admission::Run(token)
    }

    /// Stores a call's result (spilling it to disk when memory is over budget) and queues it
    /// on the current stream.
    pub async fn finish(&self, call_id: &str, outcome: Outcome, body: ResultBody, ran: bool) {
        let kind = Stored::Result { outcome, ran };
        // Within the budget (the usual case) it is stored under the one lock that checks.
        let Err(body) = self.store(call_id, kind, body, Room::Check) else {
            return;
        };
        // A result may be a megabyte: written on a blocking thread. (A panic there keeps the
        // result in memory, from this cheap clone.)
        let (dir, id, kept) = (self.spill_dir.clone(), call_id.to_string(), body.clone());
        let body = tokio::task::spawn_blocking(move || spill_or_keep(&dir, &id, body))
            .await
            .unwrap_or(kept);
        let _ = self.store(call_id, kind, body, Room::Take);
    }

    /// Stores a result and queues it on the current stream, and says whether it did: a
    /// refusal is not stored where the call's own result stands. With [`Room::Check`], a
    /// result in memory that would take the results held in memory over the budget is handed
    /// back instead, to be spilled.
    fn store(
        &self,
        call_id: &str,
        kind: Stored,
        body: ResultBody,
        room: Room,
    ) -> Result<bool, ResultBody> {
        {
            let mut inner = self.lock();
            // Checked under the lock that stores: a call admitted in between keeps its entry.
            if kind == Stored::Refusal && !inner.refusable(call_id) {
                return Ok(false);
            }
            if body.in_memory() {
                let held = inner.memory_bytes.saturating_add(body.len());
                if room == Room::Check && held > self.memory_budget.load(Ordering::Relaxed) {
                    return Err(body);
                }
                inner.memory_bytes = held;
            }
            let (outcome, ran) = match kind {
                Stored::Result { outcome, ran } => (outcome, ran),
                Stored::Refusal => (Outcome::AgentError, false),
            };
            let result = StoredResult::new(outcome, body, ran);
            let done = Entry::Done(result.clone());
            // The running entry's key is reused: no new copy of the id.
            let previous = match inner.entries.get_mut(call_id) {
                Some(entry) => Some(std::mem::replace(entry, done)),
                None => inner.entries.insert(call_id.to_string(), done),
            };
            match previous {
                Some(Entry::Running(_)) => inner.running -= 1,
                // A refusal replaced by a newer refusal.
                Some(Entry::Done(old)) => inner.release(&old),
                None => {}
            }
            inner.queue(call_id, result);
        }
        // (A stored result leaves its entry in the table: nothing to tell `emptied`'s waiters.)
        Ok(true)
    }

    /// Stores an error answer for a call that is not run (busy, draining, malformed). Refused
    /// when the id runs, ran or was acknowledged: that call's own result stands. Returns
    /// whether it was stored.
    ///
    /// Not async, so that the session handles its messages without a future of its own per
    /// message: over the memory budget the refusal (an error document of a few hundred bytes)
    /// is written to its spill file in place.
    pub fn refuse(&self, call_id: &str, body: ResultBody) -> bool {
        match self.store(call_id, Stored::Refusal, body, Room::Check) {
            Ok(stored) => stored,
            Err(body) => {
                let body = spill_or_keep(&self.spill_dir, call_id, body);
                self.store(call_id, Stored::Refusal, body, Room::Take)
                    .unwrap_or(false)
            }
        }
    }

    /// The cloud stored the result: forget it, and remember that the id ran.
    pub fn acknowledge(&self, call_id: &str) -> bool {
        let mut inner = self.lock();
        let known = match inner.entries.remove_entry(call_id) {
            Some((id, Entry::Done(result))) => {
                inner.release(&result);
                if result.ran {
                    let fingerprint = inner.acked.insert(&id);
                    if let Some(records) = inner.journal_records.as_mut() {
                        journal::record_acknowledged(records, fingerprint);
                    }
                }
                true
            }
            // An ack for a call still running acknowledges nothing: it stays.
            Some((id, running)) => {
                inner.entries.insert(id, running);
                false
            }
            None => false,
        };
        let emptied = inner.entries.is_empty();
        drop(inner);
        if emptied {
            self.emptied.notify_waiters();
        }
        known
    }

    /// Stops a running call; anything else is ignored (harmless by contract).
    pub fn cancel(&self, call_id: &str) -> bool {
        match self.lock().entries.get(call_id) {
            Some(Entry::Running(token)) => {
                token.cancel();
                true
            }
            _ => false,
        }
    }

    /// Cancels every running call, and every call admitted from now on (the agent quits).
    pub fn cancel_all(&self) {
        let mut inner = self.lock();
        inner.aborted = true;
        for entry in inner.entries.values() {
            if let Entry::Running(token) = entry {
                token.cancel();
            }
        }
    }

    /// A stored result, if the call finished and is not acknowledged yet. (The streams get
    /// theirs with their queue; this is for tests.)
    #[cfg(test)]
    pub fn result(&self, call_id: &str) -> Option<Arc<StoredResult>> {
        match self.lock().entries.get(call_id) {
            Some(Entry::Done(result)) => Some(result.clone()),
            _ => None,
        }
    }

    /// Makes a new stream the receiver of results: every unacknowledged one is queued at
    /// once, oldest first is not guaranteed; later ones as they finish.
    pub fn attach(&self) -> mpsc::UnboundedReceiver<Queued> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        for (id, entry) in &inner.entries {
            if let Entry::Done(result) = entry {
                let _ = tx.send((id.clone(), result.clone()));
            }
        }
        inner.sender = Some(tx);
        rx
    }

    /// The results of calls that ran and wait for an acknowledgement, for keeping them across
    /// a restart. Refusals (busy, draining) are left out: the cloud sends those calls again.
    pub fn undelivered(&self) -> Vec<(String, Arc<StoredResult>)> {
        self.lock()
            .entries
            .iter()
            .filter_map(|(id, entry)| match entry {
                Entry::Done(result) if result.ran => Some((id.clone(), result.clone())),
                _ => None,
            })
            .collect()
    }

    /// Whether `bytes` more of results fit in the memory budget.
    pub fn memory_room(&self, bytes: u64) -> bool {
        self.lock().memory_bytes.saturating_add(bytes) <= self.memory_budget.load(Ordering::Relaxed)
    }

    /// Where results over the memory budget are spilled.
    pub fn spill_dir(&self) -> &std::path::Path {
        &self.spill_dir
    }

    /// Takes back a result of a call that ran in an earlier run of the agent: it is sent on the
    /// next stream like any other, and the call is not run again. Ignored (false) when the id
    /// is already known.
    pub fn restore(&self, call_id: String, outcome: Outcome, body: ResultBody) -> bool {
        let mut inner = self.lock();
        if inner.entries.contains_key(&call_id) || inner.acked.contains(&call_id) {
            return false;
        }
        if body.in_memory() {
            inner.memory_bytes += body.len();
        }
        let result = StoredResult::new(outcome, body, true);
        inner.queue(&call_id, result.clone());
        inner.entries.insert(call_id, Entry::Done(result));
        true
    }

    /// Starts recording calls in `journal` (see [`journal::open`]).
    pub fn keep_journal(&self, journal: CallJournal) {
        *self.journal_lock() = Some(journal);
        self.lock().journal_records.get_or_insert_with(Vec::new);
    }

    /// What a rewritten journal holds: the calls running and the calls that ran whose result
    /// is not acknowledged, and the fingerprints of the acknowledged ids, with their key.
    pub fn journal_ids(&self) -> JournalIds {
        Self::journal_ids_in(&self.lock())
    }

    fn journal_ids_in(inner: &Inner) -> JournalIds {
        let open = inner
            .entries
            .iter()
            .filter_map(|(id, entry)| match entry {
                Entry::Running(_) => Some(id.clone()),
                Entry::Done(result) if result.ran => Some(id.clone()),
                Entry::Done(_) => None,
            })
            .collect();
        JournalIds {
            key: inner.acked.key.clone(),
            open,
            acknowledged: inner.acked.order.iter().copied().collect(),
        }
    }

    /// Takes back the ids that ran and were acknowledged in an earlier run of the agent, as
    /// fingerprints under `key` (from its journal): a replay of one is refused, as within one
    /// run. Called at start, before any ack of this run (one taken earlier, under another
    /// key, would be forgotten, with a warning).
    pub(super) fn remember_acknowledged(&self, key: FingerprintKey, fingerprints: Vec<u128>) {
        let mut inner = self.lock();
        let acked = &mut inner.acked;
        if acked.key != key {
            if !acked.order.is_empty() {
                tracing::warn!(
                    acknowledged = acked.order.len(),
                    "acknowledgements taken before the call journal was read are not carried over a restart"
                );
            }
            *acked = AckedIds {
                key,
                ..AckedIds::default()
            };
        }
        for fingerprint in fingerprints {
            acked.insert_fingerprint(fingerprint);
        }
    }

    /// Writes the journal records taken since the last write (the calls admitted and the
    /// acks taken). Called before admitted calls start, so that a crash cannot forget a call
    /// that ran. A failure is logged (once until writes work again) and the calls run anyway:
    /// a full disk must not stop the agent serving; until the journal can be written, a crash
    /// may let the cloud run a call twice.
    pub fn flush_journal(&self) {
        let mut guard = self.journal_lock();
        let Some(journal) = guard.as_mut() else {
            return;
        };
        let written = if journal.needs_rewrite() {
            let ids = {
                let mut inner = self.lock();
                if let Some(records) = inner.journal_records.as_mut() {
                    // The rewrite covers them: it is taken from the table as it is now.
                    records.clear();
                }
                Self::journal_ids_in(&inner)
            };
            journal.rewrite(&ids)
        } else {
            match self.lock().journal_records.as_mut() {
                Some(records) if !records.is_empty() => std::mem::swap(records, &mut journal.spare),
                _ => return,
            }
            journal.append()
        };
        journal.report(written);
    }

    fn journal_lock(&self) -> std::sync::MutexGuard<'_, Option<CallJournal>> {
        // A panic while writing leaves nothing half-changed in memory: keep going.
        self.journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls running now.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Whether no call runs and no result waits for its acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// Results waiting for an acknowledgement.
    pub fn unacknowledged(&self) -> usize {
        let inner = self.lock();
        inner.entries.len() - inner.running
    }

    /// Bytes of unacknowledged results held in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.lock().memory_bytes
    }
}

/// What [`CallTable::store`] stores.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// The result of a call admitted to run (`ran`: it reached its connector).
    Result { outcome: Outcome, ran: bool },
    /// An error answer for a call that is not run.
    Refusal,
}

/// Whether [`CallTable::store`] checks the memory budget.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Hand a result in memory back when it does not fit.
    Check,
    /// Store it whatever it takes (spilled already, or failed to spill).
    Take,
}

/// `body` moved to a spill file in `dir`, or kept in memory if that fails: keeping it loses
/// nothing, and the budget is a soft limit. Blocking.
fn spill_or_keep(dir: &std::path::Path, call_id: &str, body: ResultBody) -> ResultBody {
    let len = body.len();
    body.spill(dir).unwrap_or_else(|(body, e)| {
        tracing::warn!(call_id, bytes = len, error = %e, "cannot spill a result to the state folder; keeping it in memory");
        body
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn body(text: &'static str) -> ResultBody {
        ResultBody::Memory(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test]
    async fn a_call_runs_once_and_its_result_waits_for_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let table = CallTable::new(dir.path().to_path_buf(), 1 << 20);
        let mut rx = table.attach();
        assert!(matches!(table.admit("c1", 4), Admission::Run(_)));
        assert!(matches!(table.admit("c1", 4), Admission::AlreadyRunning));
        assert!(
            !table.acknowledge("c1"),
            "an ack before the result acknowledges nothing"
        );
        assert_eq!(table.running(), 1, "the call still runs");
        table
            .finish("c1", Outcome::Answered, body("{}"), true)
            .await;
        assert_eq!(table.running(), 0);
        assert_eq!(rx.recv().await.map(|(id, _)| id).as_deref(), Some("c1"));
        // A replay before the ack re-sends the stored result.
        assert!(matches!(table.admit("c1", 4), Admission::Resent));
        assert_eq!(rx.recv().await.map(|(id, _)| id).as_deref(), Some("c1"));
        // A new stream gets it again.
        let mut rx2 = table.attach();
        let (id, queued) = rx2.recv().await.unwrap();
        assert_eq!(id, "c1");
        assert!(!queued.withdrawn());
        assert!(table.acknowledge("c1"));
        assert!(
            queued.withdrawn(),
            "a queued copy of an acknowledged result is not sent"
        );
        assert!(table.result("c1").is_none());
        assert!(matches!(table.admit("c1", 4), Admission::Acknowledged));
        assert!(!table.acknowledge("c1"), "a second ack is harmless");
        assert_eq!(table.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn busy_calls_may_run_later_and_results_over_budget_spill() {
        let dir = tempfile::tempdir().unwrap();
        let table = CallTable::new(dir.path().to_path_buf(), 4);
        let Admission::Run(token) = table.admit("a", 1) else {
            panic!("first call must run")
        };
        assert!(matches!(table.admit("b", 1), Admission::Busy));
        table
            .finish("b", Outcome::AgentError, body("{busy}"), false)
            .await;
        // Over the 4-byte budget: spilled to an (unlinked) file, not counted in memory.
        assert!(!table.result("b").unwrap().body.in_memory());
        // A refusal too, stored without a runtime.
        assert!(table.refuse("c", body("{busy}")));
        let refusal = table.result("c").unwrap();
        assert!(!refusal.body.in_memory());
        assert_eq!(&refusal.body.to_bytes().await.unwrap()[..], b"{busy}");
        assert_eq!(table.memory_bytes(), 0);
        assert!(table.cancel("a"));
        assert!(token.is_cancelled());
        table
            .finish("a", Outcome::AgentError, body("{}"), true)
            .await;
        assert_eq!(table.memory_bytes(), 2);
        // "b" never ran: a new request for it runs.
        assert!(matches!(table.admit("b", 1), Admission::Run(_)));
        assert!(!table.cancel("nonexistent"));
    }

    #[test]
    fn cancel_all_stops_every_running_call_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let table = CallTable::new(dir.path().to_path_buf(), 1 << 20);
        let Admission::Run(first) = table.admit("a", 4) else {
            panic!("a must run")
        };
        let Admission::Run(second) = table.admit("b", 4) else {
            panic!("b must run")
        };
        assert!(!first.is_cancelled() && !second.is_cancelled());
        table.cancel_all();
        assert!(first.is_cancelled() && second.is_cancelled());
        let Admission::Run(late) = table.admit("c", 4) else {
            panic!("c is admitted (the session refuses calls while draining, not the table)")
        };
        assert!(
            late.is_cancelled(),
            "a call admitted after the quit starts cancelled"
        );
    }

    #[tokio::test]
    async fn a_refusal_never_replaces_a_real_result_and_replacing_one_keeps_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let table = CallTable::new(dir.path().to_path_buf(), 1 << 20);
        let mut rx = table.attach();
        assert!(table.refuse("r", body("{busy}")));
        let (_, first) = rx.try_recv().unwrap();
        assert!(table.refuse("r", body("{bad}")));
        assert!(first.withdrawn(), "a replaced refusal is not sent");
        let (_, second) = rx.try_recv().unwrap();
        assert_eq!(
            table.memory_bytes(),
            5,
            "the first refusal's bytes were released"
        );
        assert!(matches!(table.admit("r", 4), Admission::Run(_)));
        assert!(second.withdrawn(), "nor one of a call that now runs");
        assert!(!table.refuse("r", body("{x}")), "running");
        table.finish("r", Outcome::Answered, body("{}"), true).await;
        assert!(!table.refuse("r", body("{x}")), "ran");
        assert!(table.acknowledge("r"));
        assert!(!table.refuse("r", body("{x}")), "acknowledged");
        assert_eq!(table.memory_bytes(), 0);
    }

    #[test]
    fn acknowledged_ids_are_remembered_up_to_the_limit_oldest_first() {
        let mut acked = AckedIds::default();
        for i in 0..=ACKED_MEMORY {
            acked.insert(&format!("call-{i}"));
        }
        assert!(!acked.contains("call-0"), "the oldest is forgotten");
        assert!(acked.contains("call-1"));
        assert!(acked.contains(&format!("call-{ACKED_MEMORY}")));
        assert!(!acked.contains("never-seen"));
        assert_eq!(acked.fingerprints.len(), ACKED_MEMORY);
        // A repeat changes nothing: the journal's list holds each id once.
        acked.insert(&format!("call-{ACKED_MEMORY}"));
        assert_eq!(acked.order.len(), ACKED_MEMORY);
        assert_eq!(acked.order.front(), Some(&acked.key.fingerprint("call-1")));
        let last = acked.key.fingerprint(&format!("call-{ACKED_MEMORY}"));
        assert_eq!(acked.order.back(), Some(&last));
    }

    #[test]
    fn fingerprints_depend_on_the_key_and_the_key_survives_its_bytes() {
        let (one, two) = (FingerprintKey::random(), FingerprintKey::random());
        assert_ne!(one, two);
        assert_ne!(one.fingerprint("call"), two.fingerprint("call"));
        assert_ne!(one.fingerprint("call"), one.fingerprint("call "));
        let again = FingerprintKey::from_bytes(one.to_bytes());
        assert_eq!(again.fingerprint("call"), one.fingerprint("call"));
        assert_eq!(format!("{one:?}"), "FingerprintKey(..)");
    }
}
