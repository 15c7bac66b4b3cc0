//! Hot reload: the plugins folder is reconciled against the registry whenever something may
//! have changed. Watcher events are only hints: they schedule a reconcile after a quiet
//! `debounce`, the watcher's "events were lost" signal and its errors trigger one at once, and a
//! periodic timer catches whatever events miss (a folder removed and recreated, an NFS mount).
//!
//! A reconcile compares each file's [`Fingerprint`] with the record loaded from it:
//! - unchanged files keep their records (and running workers);
//! - a file modified less than `debounce` ago is still being written: it waits (one dated in
//!   the future waits until it has been seen unchanged for the debounce);
//! - new or changed files are loaded (and health-checked by `info`) *before* they are swapped in;
//!   a rejected replacement never displaces a good version: the old one keeps serving;
//! - vanished files are dropped.
//!
//! Calls in flight hold their record, so they finish on the version they started with; its
//! worker and private files go when the last call does.
//!
//! Each load is committed (and a new inventory revision published) as soon as it ends, so a
//! connector whose `info` is slow or hangs holds up no other: a reconcile runs `ACTIVE_LOADS`
//! loads at a time, in name order, and one still running after `SLOW_LOAD` gives up its place
//! (up to `MAX_LOADS` running in all). Reconciles run side by side (the watch loop starts the
//! next scan without waiting for the last one's loads): the loads in progress are registered by
//! file, a scan leaves a file being loaded to its load (a reload waits for it), and a file that
//! changes again or goes abandons its load (its `info` is killed). The state is changed only in
//! short commits, never across a wait, so a reconcile dropped part way (a stop) loses nothing:
//! what it did not commit, the registry never had.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::integrity::TrustPolicy;
use super::{is_ignored, Connector, ConnectorStatus, Fingerprint, PluginLoader, PluginRegistry};
use crate::config::SharedConfig;

/// What a plugin file currently contributes to the inventory.
#[derive(Debug)]
struct Slot {
    /// Loaded from the file's current content.
    current: Arc<Connector>,
    /// The previous good version, kept serving while `current` is rejected.
    retained: Option<Arc<Connector>>,
    /// Loaded under limits a reload has changed since: loaded again at the next scan, changed
    /// or not. (Set when a scan that was to load every file again left this one waiting, as
    /// still being written: the scan after the debounce would find it unchanged.)
    stale: bool,
}

/// The connectors a reconcile loads again though their files did not change.
#[derive(Debug, Default, PartialEq, Eq)]
struct ReloadScope {
    /// Every file.
    all: bool,
    /// The files of these app_ids (their current or their retained version's).
    apps: BTreeSet<String>,
    /// The files the trust checks may judge differently now (a reload re-read the allow-list
    /// or the configuration): those a version of which they refuse as they are now, and those
    /// they refused before.
    trust: bool,
}

impl ReloadScope {
    /// This scope and `other` together (two reloads before the next reconcile).
    fn widen(&mut self, other: ReloadScope) {
        self.all |= other.all;
        self.apps.extend(other.apps);
        self.trust |= other.trust;
    }

    fn covers(&self, slot: &Slot, trust: &TrustPolicy) -> bool {
        self.all
            || slot
                .versions()
                .any(|c| c.app_id.as_ref().is_some_and(|a| self.apps.contains(a)))
            || (self.trust && slot.judged_again(trust))
    }
}

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<PathBuf, Slot>,
    /// Records no longer in the inventory, with their private folders: removed once the last
    /// call using them has finished.
    retired: Vec<(Weak<Connector>, PathBuf)>,
    /// Files whose modification time is in the future: the fingerprint last seen, and since
    /// when (this agent's clock). See [`being_written`].
    dated_ahead: HashMap<PathBuf, (Fingerprint, Instant)>,
    /// Loads in progress, by file, whichever reconcile started them.
    loading: HashMap<PathBuf, Loading>,
    /// The id of the next load.
    next_load: u64,
}

/// A load in progress (or queued by its reconcile): which content, and how to abandon it.
#[derive(Debug)]
struct Loading {
    id: u64,
    fingerprint: Option<Fingerprint>,
    /// Once started.
    abort: Option<tokio::task::AbortHandle>,
    /// What the load is doing, and since when it runs (once started).
    stage: Arc<super::LoadStage>,
    started: Option<Instant>,
    /// Cancelled when this record goes (the load committed, abandoned or dropped): what a
    /// reconcile that found the file already being loaded waits for.
    ended: CancellationToken,
    _ends_with_me: tokio_util::sync::DropGuard,
    /// Set when the load is abandoned (its file changed again or went) rather than committed:
    /// a reload that waited for it looks at the folder again.
    abandoned: Arc<AtomicBool>,
    /// The file had not changed: a reload loads it again (under new settings or checks).
    again: bool,
}

impl Loading {
    fn new(id: u64, fingerprint: Option<Fingerprint>, again: bool) -> Self {
        let ended = CancellationToken::new();
        Self {
            id,
            again,
            fingerprint,
            abort: None,
            stage: Arc::default(),
            started: None,
            _ends_with_me: ended.clone().drop_guard(),
            ended,
            abandoned: Arc::default(),
        }
    }

    /// Stops the load (its `info` is killed); its result, if any, is dropped.
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        if let Some(abort) = &self.abort {
            abort.abort();
        }
    }
}

/// How many of a reconcile's loads run at a time (a folder of a hundred connectors is not a
/// hundred `info` processes at once); one running longer than [`SLOW_LOAD`] gives up its
/// place, so that loads that hang do not hold up the rest.
const ACTIVE_LOADS: usize = 4;

/// How many of a reconcile's loads run at a time, slow ones included: a folder of connectors
/// that all hang, or that each take seconds to start (a PyInstaller one-file program unpacks
/// itself at every run), is not as many processes at once. The next waits for one to end, at
/// the latest after `plugins.info_timeout_secs`.
const MAX_LOADS: usize = 16;

/// A load running this long is slow (an `info` that does not answer, a large bundle): it says
/// so in the log, and again as often, so that an admin waiting for a connector (or for the
/// start) sees why; and it gives up its place among its reconcile's [`ACTIVE_LOADS`].
const SLOW_LOAD: Duration = Duration::from_secs(5);

/// A load in progress, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadInProgress {
    /// The file's name in the plugins folder.
    pub file: String,
    /// What the load is doing ("unpacking the bundle"; "waiting for a place among the loads"
    /// before it starts).
    pub doing: &'static str,
    /// How long it has been running, in whole seconds.
    pub seconds: u64,
}

/// What a reconcile is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The first, at start: files modified a moment ago are loaded too (nothing else is
    /// running to look again after the debounce).
    Start,
    /// The watch loop's: files still being written wait for the debounce. It returns without
    /// waiting for loads another scan is running (scans that joined a load hanging for up to
    /// `plugins.info_timeout_secs` would pile up, one per event or timer tick).
    Watch,
    /// A reload's (SIGHUP): as the watch loop's, but it returns only once every file it found
    /// changed is loaded, whichever reconcile loads it, so that a reload is over when the
    /// folder is loaded.
    Reload,
}

/// What a reconcile did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The inventory changed (a new revision was published).
    pub changed: bool,
    /// Some file was still being written: reconcile again after the debounce.
    pub unsettled: bool,
}

/// Reconciles the plugins folder with the registry.
#[derive(Debug)]
pub struct Reconciler {
    loader: PluginLoader,
    registry: Arc<PluginRegistry>,
    /// Where `plugins_dir`, the debounce and the drain grace come from (a reload may change them).
    config: Arc<SharedConfig>,
    /// Private folders (store copies, unpacked bundles) that garbage collection may remove.
    private_roots: Vec<PathBuf>,
    /// A std mutex: held for a listing of the folder or a commit, never across an await.
    state: std::sync::Mutex<State>,
    /// Set by a config reload that changed limits fixed at load: the connectors the next
    /// reconcile loads again, changed or not.
    reload: std::sync::Mutex<ReloadScope>,
    /// Asks the watch loop for a reconcile after the debounce: files were still being written
    /// when one looked (whoever ran it: the loop, or a reload), or the folder moved and the
    /// watch must follow it.
    follow_up: tokio::sync::Notify,
}

impl Reconciler {
    /// A reconciler for the configured plugins folder.
    pub fn new(
        loader: PluginLoader,
        registry: Arc<PluginRegistry>,
        config: Arc<SharedConfig>,
        private_roots: Vec<PathBuf>,
    ) -> Self {
        Self {
            loader,
            registry,
            config,
            private_roots,
            state: std::sync::Mutex::new(State::default()),
            reload: std::sync::Mutex::default(),
            follow_up: tokio::sync::Notify::new(),
        }
    }

    /// Has the watch loop look again after the debounce (and re-arm its watch first).
    pub fn follow_up(&self) {
        self.follow_up.notify_one();
    }

    /// The folder reconciled (the configured one, which a reload may change).
    pub fn dir(&self) -> PathBuf {
        self.config.get().plugins_dir.clone()
    }

    /// Makes the next reconcile load every file again, as if each had changed (a reload changed
    /// limits that are fixed when a connector is loaded). Running versions drain as usual.
    pub fn reload_all_next(&self) {
        self.widen_reload(ReloadScope {
            all: true,
            ..ReloadScope::default()
        });
    }

    /// Makes the next reconcile load these connectors' files again (a reload changed their
    /// `[connectors.<app_id>]` tables); the others keep running undisturbed.
    pub fn reload_next(&self, app_ids: BTreeSet<String>) {
        self.widen_reload(ReloadScope {
            apps: app_ids,
            ..ReloadScope::default()
        });
    }

    /// Makes the next reconcile judge every file again under the trust checks as they are then
    /// (a reload: the allow-list, the keys or the strictness may have changed). Files it
    /// refused before are loaded again; so are those with a version it now refuses, which
    /// stops serving. The others keep running undisturbed: their `info` is not run again.
    pub fn recheck_trust_next(&self) {
        self.widen_reload(ReloadScope {
            trust: true,
            ..ReloadScope::default()
        });
    }

    fn widen_reload(&self, scope: ReloadScope) {
        let mut reload = self
            .reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reload.widen(scope);
    }

    /// The files being loaded (or waiting for a place), by name, sorted: what a start or a
    /// reload that takes long is waiting for.
    pub fn loading(&self) -> Vec<String> {
        self.loads().into_iter().map(|load| load.file).collect()
    }

    /// The loads in progress, by file name, with what each is doing: what an admin who
    /// dropped a file in, and does not see its connector yet, is waiting for.
    pub fn loads(&self) -> Vec<LoadInProgress> {
        let mut loads: Vec<LoadInProgress> = self
            .lock()
            .loading
            .iter()
            .map(|(path, load)| LoadInProgress {
                file: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                doing: match load.started {
                    Some(_) => load.stage.doing(),
                    None => "waiting for a place among the loads",
                },
                seconds: load.started.map_or(0, |at| at.elapsed().as_secs()),
            })
            .collect();
        loads.sort_by(|a, b| a.file.cmp(&b.file));
        loads
    }

    /// What a start or reload `doing` it is at: "starting: 2 connectors loaded; loading
    /// slow.py" (see [`progress_line`]).
    pub fn progress(&self, doing: &str) -> String {
        let loaded = self.registry.snapshot().connectors.len();
        progress_line(doing, loaded, &self.loading())
    }

    /// Brings the registry in line with the folder, as `scan` says. Returns once its own loads
    /// have ended (and for a [`Scan::Reload`], those of the files it found another reconcile
    /// loading); each is published as it ends, and reconciles may run side by side (see the
    /// module docs).
    ///
    /// A reload whose wait ended because a load was abandoned (the file changed again, and
    /// another scan loads the new content, or it went) looks at the folder again, and so on:
    /// it is over when the folder is loaded, not when the content it first saw stopped loading.
    pub async fn reconcile(&self, scan: Scan) -> Outcome {
        let mut outcome = Outcome::default();
        loop {
            let (pass, superseded) = self.reconcile_pass(scan).await;
            outcome.changed |= pass.changed;
            outcome.unsettled |= pass.unsettled;
            if scan != Scan::Reload || !superseded {
                return outcome;
            }
            tracing::debug!(
                "a load the reload waited for was abandoned (its file changed again or went): looking at the folder again"
            );
        }
    }

    /// One look at the folder, and the loads it starts or joins. Also says whether a load it
    /// waited for was abandoned rather than committed.
    async fn reconcile_pass(&self, scan: Scan) -> (Outcome, bool) {
        let wait_for_writes = scan != Scan::Start;
        let mut outcome = Outcome::default();
        // Ended or dropped (a stop drops a reconcile part way), this reconcile's loads leave the
        // registry of loads in progress (and its `JoinSet` aborts those still running).
        let mut mine = OwnLoads::new(&self.state);
        // A reload's: loads of files it found changed that another reconcile had started.
        let mut joined: Vec<(CancellationToken, Arc<AtomicBool>)> = Vec::new();

        let (slow_tx, mut slow_rx) = mpsc::unbounded_channel();
        let drain_grace = {
            let mut guard = self.lock();
            // Through a plain reference, so that its fields can be borrowed apart.
            let state = &mut *guard;
            // What a reload asks for, before the configuration it put in force is read: the
            // configuration read after it is that reload's or a later one.
            let reload = std::mem::take(
                &mut *self
                    .reload
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            // The configuration, and then the folder, are read under the lock: a reconcile that
            // read them before another's commit would undo it (bring back a file it removed, or
            // the folder a reload moved away from).
            let config = self.config.get();
            let (dir, settle, drain_grace) = (
                config.plugins_dir.clone(),
                config.plugins.debounce,
                config.calls.drain_grace,
            );
            // The trust checks as they are now: the files a reload has them judge again.
            let trust = TrustPolicy::of(&config.plugins);
            let listed = std::fs::read_dir(&dir).map(|entries| {
                let mut files: Vec<(PathBuf, Option<Fingerprint>)> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        !p.file_name()
                            .is_some_and(|n| is_ignored(&n.to_string_lossy()))
                    })
                    .map(|p| {
                        let fingerprint = Fingerprint::of(&p);
                        (p, fingerprint)
                    })
                    .collect();
                files.sort_by(|a, b| a.0.cmp(&b.0));
                files
            });
            let files = listed.unwrap_or_else(|e| {
                if !state.slots.is_empty() {
                    tracing::warn!(dir = %dir.display(), error = %e, "the plugins folder is gone; its connectors are removed");
                }
                Vec::new()
            });
            let listed = |path: &Path| files.binary_search_by(|f| f.0.as_path().cmp(path)).is_ok();
            state.dated_ahead.retain(|path, _| listed(path));
            state.loading.retain(|path, load| {
                let keep = listed(path);
                if !keep {
                    load.abandon();
                }
                keep
            });
            let gone: Vec<PathBuf> = state
                .slots
                .keys()
                .filter(|path| !listed(path))
                .cloned()
                .collect();
            for path in gone {
                self.loader.forget(&path);
                let Some(slot) = state.slots.remove(&path) else {
                    continue;
                };
                outcome.changed = true;
                let c = slot.retained.as_ref().unwrap_or(&slot.current);
                tracing::info!(
                    "removed {} {} ({})",
                    c.app_id.as_deref().unwrap_or("?"),
                    c.version.as_deref().unwrap_or("?"),
                    slot.current.file_name()
                );
                retire(&mut state.retired, slot.into_versions(), drain_grace);
            }

            for (path, fingerprint) in files {
                if let Some(load) = state.loading.get(&path) {
                    // A load in progress reads its connector's own limits (`[connectors.<id>]`)
                    // as it ends, after the reload put them in force, and the trust checks
                    // judge it again at its commit; only a reload of every file (limits
                    // applied before `info`) starts it again.
                    if load.fingerprint == fingerprint && !reload.all {
                        // Another reconcile is loading this content; it publishes it. A reload
                        // returns once it has: it is done when the folder is loaded.
                        if scan == Scan::Reload {
                            tracing::debug!(file = %path.display(), "the reload waits for this file's load, which another scan runs");
                            joined.push((load.ended.clone(), load.abandoned.clone()));
                        }
                        continue;
                    }
                    // Changed again meanwhile (or to be loaded under new limits): that load is
                    // abandoned, its `info` killed.
                    load.abandon();
                    state.loading.remove(&path);
                }
                let same = state
                    .slots
                    .get(&path)
                    .filter(|s| s.current.fingerprint == fingerprint);
                if same.is_some_and(|s| !reload.covers(s, &trust) && !s.stale) {
                    continue;
                }
                let again = same.is_some();
                if wait_for_writes
                    && fingerprint
                        .is_some_and(|f| being_written(&mut state.dated_ahead, &path, f, settle))
                {
                    // Still being written (or just renamed in): look again after the debounce.
                    outcome.unsettled = true;
                    if let Some(slot) = state.slots.get_mut(&path) {
                        // Its look after the debounce must load it even if it turns out unchanged.
                        slot.stale |= reload.covers(slot, &trust);
                    }
                    continue;
                }
                let id = state.next_load;
                state.next_load += 1;
                state
                    .loading
                    .insert(path.clone(), Loading::new(id, fingerprint, again));
                mine.queue.push_back((path, id));
            }
            if outcome.changed {
                self.publish(state, !wait_for_writes);
            }
            drain_grace
        };

        // Loads start in name order, `ACTIVE_LOADS` at a time; each is committed as it ends.
        self.start_loads(&mut mine, &slow_tx);
        loop {
            let first = tokio::select! {
                joined = mine.loads.join_next_with_id() => match joined {
                    Some(joined) => joined,
                    None if mine.queue.is_empty() => break,
                    None => {
                        self.start_loads(&mut mine, &slow_tx);
                        continue;
                    }
                },
                Some(task) = slow_rx.recv() => {
                    // Still loading after `SLOW_LOAD`: the next one starts beside it.
                    mine.uncount(task);
                    self.start_loads(&mut mine, &slow_tx);
                    continue;
                }
            };
            // Loads that ended together are published together.
            let mut ended = vec![first];
            while let Some(more) = mine.loads.try_join_next_with_id() {
                ended.push(more);
            }
            // The trust checks as they are at the commit, not as the loads found them: a reload
            // may have changed them since (and joined these loads rather than start them again).
            let trust = TrustPolicy::of(&self.config.get().plugins);
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut changed = false;
            // Their records go after the commit is published: a reconcile waiting on one of
            // them then finds the registry with it.
            let mut committed = Vec::new();
            for joined in ended {
                let (task, loaded) = match joined {
                    Ok((task, connector)) => (task, Ok(connector)),
                    Err(e) => (e.id(), Err(e)),
                };
                mine.uncount(task);
                let Some(Started { path, id, .. }) = mine.tasks.get(&task) else {
                    continue;
                };
                if state.loading.get(path).is_none_or(|load| load.id != *id) {
                    // Abandoned: the file changed again or went.
                    mine.superseded = true;
                    continue;
                }
                let load = state.loading.remove(path);
                let again = load.as_ref().is_some_and(|load| load.again);
                committed.extend(load);
                match loaded {
                    Ok(connector) => {
                        changed = true;
                        commit(state, path.clone(), connector, drain_grace, &trust, again);
                    }
                    Err(_) => {
                        tracing::error!(
                            "a plugin load task failed; that file is retried at the next reconcile"
                        );
                        // Whatever served before keeps serving meanwhile.
                        outcome.unsettled = true;
                    }
                }
            }
            if changed {
                outcome.changed = true;
                self.publish(state, !wait_for_writes);
            }
            drop(guard);
            drop(committed);
            self.start_loads(&mut mine, &slow_tx);
        }
        let mut superseded = mine.superseded;
        drop(mine);
        for (ended, abandoned) in joined {
            ended.cancelled().await;
            superseded |= abandoned.load(Ordering::Acquire);
        }

        {
            let mut state = self.lock();
            // A load in progress may have put its private folder in place without a record
            // yet: garbage is collected only when none is.
            if state.loading.is_empty() {
                self.collect_garbage(&mut state);
            }
        }
        if outcome.unsettled {
            // Those files are looked at again once they have been quiet for the debounce.
            self.follow_up();
        }
        (outcome, superseded)
    }

    /// Starts queued loads until [`ACTIVE_LOADS`] run (slow ones not counted), [`MAX_LOADS`] run
    /// (slow ones counted) or none is left; one abandoned before it started is skipped.
    fn start_loads(&self, mine: &mut OwnLoads<'_>, slow: &mpsc::UnboundedSender<tokio::task::Id>) {
        let room =
            |mine: &OwnLoads<'_>| mine.active() < ACTIVE_LOADS && mine.loads.len() < MAX_LOADS;
        if mine.queue.is_empty() || !room(mine) {
            if !mine.queue.is_empty() && mine.loads.len() >= MAX_LOADS && !mine.told_full {
                // The loads running each say what holds them; those waiting are named here.
                mine.told_full = true;
                tracing::warn!(
                    "{MAX_LOADS} connectors are loading and none has finished: {} more wait \
                     for one of them (each ends at the latest after plugins.info_timeout_secs \
                     = {:?})",
                    mine.queue.len(),
                    self.config.get().plugins.info_timeout
                );
            }
            return;
        }
        let mut state = self.lock();
        while room(mine) {
            let Some((path, id)) = mine.queue.pop_front() else {
                break;
            };
            let Some(entry) = state.loading.get_mut(&path).filter(|load| load.id == id) else {
                mine.superseded = true;
                continue;
            };
            let (loader, file) = (self.loader.clone(), path.clone());
            // Told once that this load turned slow.
            let mut slow = Some(slow.clone());
            let info_timeout = self.config.get().plugins.info_timeout;
            let stage = entry.stage.clone();
            let started = Instant::now();
            entry.started = Some(started);
            let abort = mine.loads.spawn(async move {
                let name = file
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let load = loader.load(file, &stage);
                tokio::pin!(load);
                let mut ticks = tokio::time::interval_at(started + SLOW_LOAD, SLOW_LOAD);
                loop {
                    tokio::select! {
                        connector = &mut load => return connector,
                        _ = ticks.tick() => {
                            tracing::info!(
                                "{name}: still loading after {:.0?} ({})",
                                started.elapsed(),
                                stage.describe(info_timeout)
                            );
                            if let Some(slow) = slow.take() {
                                let _ = slow.send(tokio::task::id());
                            }
                        }
                    }
                }
            });
            mine.tasks.insert(
                abort.id(),
                Started {
                    path,
                    id,
                    active: true,
                },
            );
            entry.abort = Some(abort);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes the slots as a new inventory revision. Said at `info` while running; at start
    /// (`quiet`) the start's summary says it once, not once per load.
    fn publish(&self, state: &State, quiet: bool) {
        let records: Vec<Arc<Connector>> = state
            .slots
            .values()
            .flat_map(|s| std::iter::once(s.current.clone()).chain(s.retained.clone()))
            .collect();
        let revision = self.registry.replace_shared(records);
        let inventory = self.registry.snapshot();
        let (ready, total) = (inventory.ready_count(), inventory.connectors.len());
        if quiet {
            tracing::debug!(revision, ready, total, "inventory changed");
        } else {
            tracing::info!(revision, ready, total, "inventory changed");
        }
    }

    /// Removes what loads of an earlier run left half-made in the private folders (a copy or
    /// an unpack cut short by a crash or a kill): only names of [`super::UNFINISHED_PREFIXES`].
    /// The garbage collection leaves dot-names alone, as they belong to loads in progress; so
    /// this runs once, before the first scan, when no load can be in progress (the state
    /// folder's lock keeps other agents out). Returns how many it removed.
    pub fn remove_unfinished(&self) -> usize {
        let mut removed = 0;
        for root in &self.private_roots {
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !super::UNFINISHED_PREFIXES
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
                {
                    continue;
                }
                let path = entry.path();
                let result = match entry.file_type() {
                    Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                match result {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove an unfinished copy an earlier run left")
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed unfinished copies an earlier run left in the state folder"
            );
        }
        removed
    }

    /// Removes private folders that no record uses any more.
    fn collect_garbage(&self, state: &mut State) {
        let in_use: Vec<PathBuf> = state
            .slots
            .values()
            .flat_map(|s| std::iter::once(&s.current).chain(s.retained.as_ref()))
            .filter_map(|c| c.private_dir.clone())
            .chain(
                state
                    .retired
                    .iter()
                    .filter(|(w, _)| w.strong_count() > 0)
                    .map(|(_, d)| d.clone()),
            )
            .collect();
        state.retired.retain(|(weak, _)| weak.strong_count() > 0);
        for root in &self.private_roots {
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                let name = entry.file_name();
                // Temporary names belong to loads in progress.
                if name.to_string_lossy().starts_with('.') || in_use.contains(&path) {
                    continue;
                }
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an unused private copy");
                } else {
                    tracing::debug!(path = %path.display(), "removed an unused private copy");
                }
            }
        }
    }
}

/// The status line of a start or reload still loading connectors: "starting: 3 connectors
/// loaded; loading slow.py, big.zip and 2 more".
pub fn progress_line(doing: &str, loaded: usize, loading: &[String]) -> String {
    const NAMED: usize = 3;
    let noun = if loaded == 1 {
        "connector"
    } else {
        "connectors"
    };
    let mut line = format!("{doing}: {loaded} {noun} loaded");
    if let Some((first, rest)) = loading.split_first() {
        line.push_str("; loading ");
        line.push_str(first);
        for name in rest.iter().take(NAMED - 1) {
            line.push_str(", ");
            line.push_str(name);
        }
        if loading.len() > NAMED {
            line.push_str(&format!(" and {} more", loading.len() - NAMED));
        }
    }
    line
}

/// Whether the file at `path` may still be being written: modified less than `settle` ago.
/// A modification time in the future tells nothing of that (the file came with its times from
/// a machine whose clock runs ahead: `tar x`, `cp -p`), and would hold the file back until that
/// time came; such a file counts as written once its fingerprint has not changed for `settle`
/// by this agent's clock. The admin is told once per content, if it is a second or more ahead.
fn being_written(
    dated_ahead: &mut HashMap<PathBuf, (Fingerprint, Instant)>,
    path: &Path,
    fingerprint: Fingerprint,
    settle: Duration,
) -> bool {
    let ahead = match fingerprint.age() {
        Ok(age) => {
            dated_ahead.remove(path);
            return age < settle;
        }
        Err(ahead) => ahead,
    };
    let since = match dated_ahead.get(path) {
        Some((seen, since)) if *seen == fingerprint => *since,
        _ => {
            // A skew under a second (an NFS server's clock, say) is not worth an admin's time.
            if ahead >= Duration::from_secs(1) {
                tracing::warn!(
                    "{}: its modification time is {}s in the future (does this machine's clock \
                 agree with the one it was copied from?); it is loaded once it has not changed \
                 for {settle:?}",
                    path.file_name().unwrap_or_default().to_string_lossy(),
                    ahead.as_secs()
                );
            }
            let now = Instant::now();
            dated_ahead.insert(path.to_path_buf(), (fingerprint, now));
            now
        }
    };
    since.elapsed() < settle
}

impl Slot {
    /// Its versions: the current record, and the one retained beside it.
    fn versions(&self) -> impl Iterator<Item = &Arc<Connector>> {
        std::iter::once(&self.current).chain(&self.retained)
    }

    /// Whether the trust checks as they are now may judge this file otherwise than they did:
    /// they refused it (and its digest, if that is what they refused, is not still refused:
    /// an unapproved bundle is not copied again at every reload), they refuse a version of it
    /// (by what it passed when loaded), or its file's permissions no longer pass.
    fn judged_again(&self, trust: &TrustPolicy) -> bool {
        let still_unapproved = |c: &Connector| {
            c.sha256
                .as_deref()
                .is_some_and(|sha256| trust.check_digest(sha256).is_err())
        };
        (self.current.distrusted && !still_unapproved(&self.current))
            || self.versions().any(|c| c.refused_by(trust).is_some())
            || (trust.strict_permissions()
                && self.current.runnable.is_some()
                && super::integrity::check_permissions(&self.current.path).is_err())
    }

    /// Its versions: the current record, and the one retained beside it.
    fn into_versions(self) -> impl Iterator<Item = Arc<Connector>> {
        std::iter::once(self.current).chain(self.retained)
    }
}

/// Takes `versions` out of service: their calls get the drain grace, then are cancelled, and
/// their private folders go once nothing uses them.
fn retire(
    retired: &mut Vec<(Weak<Connector>, PathBuf)>,
    versions: impl IntoIterator<Item = Arc<Connector>>,
    drain_grace: Duration,
) {
    for c in versions {
        if let Some(runnable) = &c.runnable {
            // Calls still running on this version get the drain grace, then are cancelled.
            let drain = runnable.drain.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(drain_grace) => drain.cancel(),
                    () = drain.cancelled() => {}
                }
            });
        }
        if let Some(dir) = c.private_dir.clone() {
            retired.push((Arc::downgrade(&c), dir));
        }
    }
}

/// Puts a connector just loaded from `path` in its slot, unless the trust checks as they are
/// now (`trust`) refuse it: then a refusal takes its place. A rejected replacement never
/// displaces a good version: the old one keeps serving beside it. Unless the trust checks
/// refuse that version too: the very file it was loaded from (a key revoked, strictness turned
/// on), or its own bytes (a digest taken out of the allow-list), though the file now holds
/// others. Then it stops too.
fn commit(
    state: &mut State,
    path: PathBuf,
    connector: Connector,
    drain_grace: Duration,
    trust: &TrustPolicy,
    again: bool,
) {
    let connector = match connector.refused_by(trust) {
        // It passed the checks as they were when it was loaded; no longer.
        Some(why) => {
            tracing::warn!(
                "rejected {}: {} {} was loaded, but the trust checks refuse it now: {why}",
                connector.file_name(),
                connector.app_id.as_deref().unwrap_or("?"),
                connector.version.as_deref().unwrap_or("?")
            );
            let refused = Connector {
                fingerprint: connector.fingerprint,
                ..Connector::distrusted(path.clone(), connector.kind, connector.sha256.clone(), why)
            };
            retire(&mut state.retired, [Arc::new(connector)], drain_grace);
            refused
        }
        None => connector,
    };
    let new = Arc::new(connector);
    let slot = match state.slots.remove(&path) {
        Some(old) if new.status == ConnectorStatus::Rejected => {
            let mut good = if old.current.status == ConnectorStatus::Rejected {
                old.retained
            } else {
                Some(old.current)
            };
            let refused = good.as_ref().and_then(|good| {
                let same_file = new.fingerprint.is_some() && new.fingerprint == good.fingerprint;
                if new.distrusted && same_file {
                    // The rejection just logged says why.
                    Some("the trust checks refuse the same file now".to_string())
                } else {
                    good.refused_by(trust)
                        .map(|why| format!("the trust checks refuse it now: {why}"))
                }
            });
            if let Some((why, revoked)) = refused.and_then(|why| Some((why, good.take()?))) {
                tracing::warn!(
                    "{}: {} {} stops serving; {why}",
                    new.file_name(),
                    revoked.app_id.as_deref().unwrap_or("?"),
                    revoked.version.as_deref().unwrap_or("?")
                );
                retire(&mut state.retired, [revoked], drain_grace);
            }
            match &good {
                // Loaded again by a reload, the file is rejected still (or now): the version
                // kept is the one loaded before, settings fixed at load and all.
                Some(good) if again => tracing::warn!(
                    "{}: loaded again by the reload, it is rejected; {} {} keeps serving as it was loaded, with the settings fixed then (environment, output limit, where it runs): a reload's new ones reach it once its file loads",
                    new.file_name(),
                    good.app_id.as_deref().unwrap_or("?"),
                    good.version.as_deref().unwrap_or("?")
                ),
                Some(good) => tracing::warn!(
                    "{}: the new content is rejected; {} {} keeps serving",
                    new.file_name(),
                    good.app_id.as_deref().unwrap_or("?"),
                    good.version.as_deref().unwrap_or("?")
                ),
                None => {}
            }
            Slot {
                current: new,
                retained: good,
                stale: false,
            }
        }
        Some(old) => {
            let was = old.retained.as_ref().unwrap_or(&old.current);
            if was.status == ConnectorStatus::Ready && new.status == ConnectorStatus::Ready {
                tracing::info!(
                    "replaced {} {} with {} {} ({})",
                    was.app_id.as_deref().unwrap_or("?"),
                    was.version.as_deref().unwrap_or("?"),
                    new.app_id.as_deref().unwrap_or("?"),
                    new.version.as_deref().unwrap_or("?"),
                    new.file_name()
                );
            }
            retire(&mut state.retired, old.into_versions(), drain_grace);
            Slot {
                current: new,
                retained: None,
                stale: false,
            }
        }
        None => Slot {
            current: new,
            retained: None,
            stale: false,
        },
    };
    state.slots.insert(path, slot);
}

/// One reconcile's loads: those still queued, those started. When the reconcile ends or is
/// dropped, the ones still registered as in progress leave the registry (a dropped
/// reconcile's tasks are aborted with its `JoinSet`).
struct OwnLoads<'a> {
    state: &'a std::sync::Mutex<State>,
    /// Registered, not started yet: (file, load id), in name order.
    queue: std::collections::VecDeque<(PathBuf, u64)>,
    loads: tokio::task::JoinSet<Connector>,
    tasks: HashMap<tokio::task::Id, Started>,
    /// The admin was told that loads wait for [`MAX_LOADS`] running ones.
    told_full: bool,
    /// One of them was abandoned (its file changed again or went) before it committed.
    superseded: bool,
}

/// A load a reconcile started.
struct Started {
    path: PathBuf,
    id: u64,
    /// Neither ended nor slow yet: it takes one of the [`ACTIVE_LOADS`] places.
    active: bool,
}

impl<'a> OwnLoads<'a> {
    fn new(state: &'a std::sync::Mutex<State>) -> Self {
        Self {
            state,
            queue: std::collections::VecDeque::new(),
            loads: tokio::task::JoinSet::new(),
            tasks: HashMap::new(),
            told_full: false,
            superseded: false,
        }
    }

    /// Loads taking a place.
    fn active(&self) -> usize {
        self.tasks.values().filter(|t| t.active).count()
    }

    /// `task` ended or turned slow: it no longer takes a place.
    fn uncount(&mut self, task: tokio::task::Id) {
        if let Some(started) = self.tasks.get_mut(&task) {
            started.active = false;
        }
    }
}

impl Drop for OwnLoads<'_> {
    fn drop(&mut self) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = self.tasks.values().map(|t| (&t.path, t.id));
        for (path, id) in self.queue.iter().map(|(p, id)| (p, *id)).chain(started) {
            if state.loading.get(path).is_some_and(|load| load.id == id) {
                state.loading.remove(path);
            }
        }
    }
}

/// How the watch loop runs.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// Watch the folder for events (otherwise only the periodic rescan).
    pub watch: bool,
    /// Quiet time after the last event before reconciling.
    pub debounce: Duration,
    /// Full reconcile period.
    pub rescan_interval: Duration,
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    /// Something may have changed: reconcile after the debounce.
    Hint,
    /// Events were lost, or the watcher failed: reconcile now.
    Rescan,
}

/// Watches the folder and reconciles until `shutdown`. (SIGHUP reconciles directly through
/// [`Reconciler::reconcile`].)
pub async fn watch_loop(
    reconciler: Arc<Reconciler>,
    settings: WatchSettings,
    shutdown: CancellationToken,
) {
    let (tx, mut signals) = mpsc::unbounded_channel();
    // The folder being watched; a config reload may move it.
    let watched = Arc::new(std::sync::RwLock::new(reconciler.dir()));
    let mut watcher = if settings.watch {
        start_watcher(watched.clone(), tx)
    } else {
        None
    };
    // Changes made between the first reconcile (at start) and arming the watcher raised no
    // event: reconcile once more now that it is armed.
    let mut due: Option<Instant> = Some(Instant::now());
    let mut periodic = tokio::time::interval(settings.rescan_interval);
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    periodic.reset();
    let mut scans = futures_util::stream::FuturesUnordered::new();
    loop {
        let run = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = futures_util::StreamExt::next(&mut scans) => false,
            signal = signals.recv() => {
                match signal {
                    Some(Signal::Hint) => due = Some(Instant::now() + settings.debounce),
                    Some(Signal::Rescan) => due = Some(Instant::now()),
                    None => {}
                }
                false
            }
            () = reconciler.follow_up.notified() => {
                due = Some(Instant::now() + settings.debounce);
                false
            }
            () = sleep_until_due(due) => true,
            _ = periodic.tick() => true,
        };
        if !run {
            continue;
        }
        due = None;
        // Re-arm the watch before listing: a folder removed and recreated lost its old watch,
        // and a file added after this point raises an event, while one added before is listed.
        if let Some(w) = watcher.as_mut() {
            let dir = reconciler.dir();
            let previous = std::mem::replace(
                &mut *watched.write().expect("watch lock poisoned"),
                dir.clone(),
            );
            if previous != dir {
                // A reload moved the plugins folder.
                let _ = w.unwatch(&previous);
                if let Some(parent) = previous.parent() {
                    let _ = w.unwatch(parent);
                }
                if let Some(parent) = dir.parent() {
                    let _ = w.watch(parent, RecursiveMode::NonRecursive);
                }
            }
            if dir.is_dir() {
                let _ = w.watch(&dir, RecursiveMode::NonRecursive);
            }
        }
        // Scans run side by side: one whose connector's `info` hangs (up to
        // `plugins.info_timeout_secs`) holds up neither the next scan nor the stop, which
        // drops the scans in progress (see `Reconciler::reconcile`).
        scans.push(reconciler.reconcile(Scan::Watch));
    }
}

async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a watcher event asks for, if anything. Events are hints, but not every event is one:
/// opening or reading a file changes nothing, and the agent itself reads every file it loads,
/// so such an event would only schedule another scan after each load (and, for a file whose
/// load is retried at every scan, one scan after another). A write being finished is a change.
fn signal_for(event: &notify::Event, watched: &std::path::Path) -> Option<Signal> {
    use notify::event::{AccessKind, AccessMode, EventKind};
    if event.need_rescan() {
        return Some(Signal::Rescan);
    }
    if matches!(event.kind, EventKind::Access(access) if access != AccessKind::Close(AccessMode::Write))
    {
        return None;
    }
    // Events of the parent folder matter only when they concern the plugins folder.
    event
        .paths
        .iter()
        .any(|p| p.starts_with(watched))
        .then_some(Signal::Hint)
}

fn start_watcher(
    watched: Arc<std::sync::RwLock<PathBuf>>,
    tx: mpsc::UnboundedSender<Signal>,
) -> Option<notify::RecommendedWatcher> {
    let dir = watched.read().expect("watch lock poisoned").clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let signal = match event {
            Ok(event) => {
                let dir = watched.read().expect("watch lock poisoned");
                match signal_for(&event, &dir) {
                    Some(signal) => signal,
                    None => return,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "plugins folder watcher error; rescanning");
                Signal::Rescan
            }
        };
        let _ = tx.send(signal);
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the plugins folder; relying on the periodic rescan");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the plugins folder yet; it is watched once it exists");
    }
    // The parent tells us when the folder itself is removed or recreated.
    if let Some(parent) = dir.parent() {
        let _ = watcher.watch(parent, RecursiveMode::NonRecursive);
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, EventKind, Flag, ModifyKind, RemoveKind,
    };

    #[test]
    fn the_progress_line_names_the_first_three_files_and_counts_the_rest() {
        let names = |n: usize| (1..=n).map(|i| format!("c{i}")).collect::<Vec<_>>();
        assert_eq!(
            progress_line("starting", 0, &[]),
            "starting: 0 connectors loaded"
        );
        assert_eq!(
            progress_line("reloading", 1, &names(1)),
            "reloading: 1 connector loaded; loading c1"
        );
        assert_eq!(
            progress_line("starting", 2, &names(3)),
            "starting: 2 connectors loaded; loading c1, c2, c3"
        );
        assert_eq!(
            progress_line("starting", 2, &names(5)),
            "starting: 2 connectors loaded; loading c1, c2, c3 and 2 more"
        );
    }

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn reading_a_file_is_no_change_and_a_finished_write_is() {
        let dir = std::path::Path::new("/plugins");
        let signal = |kind, path| signal_for(&event(kind, path), dir);
        // The agent's own reads of the files it loads schedule nothing.
        for access in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Open(AccessMode::Read),
            AccessKind::Close(AccessMode::Read),
            AccessKind::Read,
        ] {
            assert_eq!(signal(EventKind::Access(access), "/plugins/x"), None);
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert_eq!(signal(change, "/plugins/x"), Some(Signal::Hint));
        }
        // The parent's events count only where they concern the folder.
        assert_eq!(signal(EventKind::Create(CreateKind::File), "/other"), None);
        assert_eq!(
            signal(EventKind::Remove(RemoveKind::Folder), "/plugins"),
            Some(Signal::Hint)
        );
        let lost = notify::Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert_eq!(signal_for(&lost, dir), Some(Signal::Rescan));
    }
}
