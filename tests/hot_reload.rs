//! Hot reload: connectors appear, change and disappear while the agent serves calls.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use lumos_agent::app::{Control, Stopped};
use lumos_agent_integration::*;
use serde_json::{json, Value};

/// Only the watcher reacts in these tests (the periodic rescan is an hour away), so they show
/// that events, not the timer, bring changes in.
const WATCH_ONLY: &str = "[plugins]\nrescan_interval_secs = 3600\n";
const WAIT: Duration = Duration::from_secs(20);

/// Polls the inventory until `pred` holds for the entries of `file_name`.
async fn until_entries(
    agent: &TestAgent,
    file_name: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let pred = &pred;
    eventually_ok(WAIT, what, || async move {
        let entries = agent.entries_for_file(file_name).await;
        if pred(&entries) {
            Ok(entries)
        } else {
            Err(entries)
        }
    })
    .await
}

/// Script lines that write the shell's pid to `pid_file` (whole, by a rename), then never end.
fn hang_writing_pid(pid_file: &std::path::Path) -> String {
    format!(
        "echo $$ > '{0}.tmp'\nmv '{0}.tmp' '{0}'\nexec sleep 600\n",
        pid_file.display()
    )
}

/// The pid a [`hang_writing_pid`] script wrote.
fn pid_in(pid_file: &std::path::Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn until_serves(agent: &TestAgent, app_id: &str, version: &str) {
    let what = format!("{app_id} {version} to serve");
    eventually_ok(WAIT, &what, || async {
        let (status, _, served) = agent.call_with_version(app_id, "echo", json!({})).await;
        if status == StatusCode::OK && served.as_deref() == Some(version) {
            Ok(())
        } else {
            Err((status, served))
        }
    })
    .await;
}

/// Calls `app_id` in a loop until stopped; counts failures and records the versions seen.
struct SteadyCalls {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    versions: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SteadyCalls {
    fn start(agent: Arc<TestAgent>, app_id: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (stop, failures, calls, versions) = (
                stop.clone(),
                failures.clone(),
                calls.clone(),
                versions.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, body, version) =
                        agent.call_with_version(app_id, "echo", json!({})).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    if status != StatusCode::OK {
                        eprintln!("steady call failed: {status} {body}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut seen = versions.lock().unwrap();
                    if let Some(v) = version {
                        if seen.last() != Some(&v) {
                            seen.push(v);
                        }
                    }
                }
            })
        };
        Self {
            stop,
            failures,
            calls,
            versions,
            task,
        }
    }

    /// Stops once the stream has seen `last` (a call it started before the switch to `last`
    /// may answer from the version before, after the switch was seen elsewhere).
    async fn finish(self, last: &str) -> (u64, u64, Vec<String>) {
        let versions = self.versions.clone();
        eventually(WAIT, &format!("the steady stream to see {last}"), || {
            versions.lock().unwrap().last().map(String::as_str) == Some(last)
        })
        .await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let versions = self.versions.lock().unwrap().clone();
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            versions,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_replace_and_remove_while_calls_run_lose_no_call() {
    captured_logs();
    let dirs = TestDirs::new();
    let plugins = dirs.plugins();
    versioned_connector(&plugins, "app", "app", "1.0.0");
    let agent = Arc::new(TestAgent::start(&dirs, WATCH_ONLY).await);
    let mut revision = agent.revision().await;
    let steady = SteadyCalls::start(agent.clone(), "app");

    // Add: a new connector appears.
    versioned_connector(&plugins, "other", "other", "1.0.0");
    until_entries(&agent, "other", "other to be ready", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    let r = agent.revision().await;
    assert!(
        r > revision,
        "a change makes a new revision ({r} after {revision})"
    );
    revision = r;

    // Replace at the same path: new calls answer from the new version.
    versioned_connector(&plugins, "app", "app", "2.0.0");
    until_serves(&agent, "app", "2.0.0").await;

    // Replace through a new path: the highest version serves, the other is superseded.
    versioned_connector(&plugins, "app-v3", "app", "3.0.0");
    until_serves(&agent, "app", "3.0.0").await;
    until_entries(&agent, "app", "2.0.0 to be superseded", |e| {
        e.len() == 1
            && e[0]["status"] == "superseded"
            && e[0]["reason"] == "app-v3 serves a higher version, 3.0.0"
    })
    .await;

    // Remove the newest: the remaining version serves again.
    std::fs::remove_file(plugins.join("app-v3")).unwrap();
    until_serves(&agent, "app", "2.0.0").await;

    let (calls, failures, versions) = steady.finish("2.0.0").await;
    assert!(calls > 20, "the steady stream ran ({calls} calls)");
    assert_eq!(failures, 0, "no call failed during add, replace and remove");
    // The stream saw versions only in the order they were installed (it may miss a short
    // window on a busy machine; that each version served was checked above), from the first
    // to the last (`finish` waited for it).
    let order = ["1.0.0", "2.0.0", "3.0.0", "2.0.0"];
    let mut rest = order.iter();
    assert!(
        versions.iter().all(|v| rest.any(|o| o == v)),
        "versions out of order: {versions:?}"
    );
    assert_eq!(
        versions.first().map(String::as_str),
        Some("1.0.0"),
        "{versions:?}"
    );
    assert!(agent.revision().await > revision);

    // Remove the last file while a call runs on it: the call finishes, then the app is gone.
    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("pid");
    let in_flight = {
        let agent = agent.clone();
        let body = json!({"request": {"secs": 1, "pid_file": pid_file.to_str().unwrap()}});
        tokio::spawn(async move { agent.call("app", "sleep", body).await })
    };
    let p = pid_file.clone();
    eventually(WAIT, "the call to start", move || p.exists()).await;
    std::fs::remove_file(plugins.join("app")).unwrap();
    until_entries(&agent, "app", "app to be removed", <[Value]>::is_empty).await;
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the in-flight call finished on the removed version: {body}"
    );
    let (status, body) = agent.call("app", "echo", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let logs = captured_logs();
    for line in [
        "replaced app 1.0.0 with app 2.0.0 (app)",
        "removed app 3.0.0 (app-v3)",
        "removed app 2.0.0 (app)",
        "loaded other 1.0.0 (executable, sha256",
    ] {
        assert!(logs.contains(line), "the log says {line:?}");
    }
    let agent = Arc::try_unwrap(agent).unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_copied_in_slowly_loads_once_complete() {
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    let bytes = std::fs::read(test_connector()).unwrap();
    let path = dirs.plugins().join("slowpoke");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        lumos_agent::platform::set_mode(&path, 0o755).unwrap();
        let chunk = bytes.len() / 20 + 1;
        for part in bytes.chunks(chunk) {
            file.write_all(part).unwrap();
            file.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    until_entries(&agent, "slowpoke", "the complete file to load", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    let entry = &agent.entries_for_file("slowpoke").await[0];
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(
        entry["sha256"],
        expected.as_str(),
        "what loaded is the whole file"
    );
    let (status, _) = agent.call("slowpoke", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_rejected_then_loads_when_fixed() {
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    let bytes = std::fs::read(test_connector()).unwrap();
    let tmp = dirs.plugins().join(".fixme.part");
    std::fs::write(&tmp, &bytes[..4096]).unwrap();
    lumos_agent::platform::set_mode(&tmp, 0o755).unwrap();
    std::fs::rename(&tmp, dirs.plugins().join("fixme")).unwrap();
    until_entries(&agent, "fixme", "the truncated file to be rejected", |e| {
        e.len() == 1 && e[0]["status"] == "rejected"
    })
    .await;
    // Named for what it is: its headers say how long the file should be.
    let reason = agent.entries_for_file("fixme").await[0]["reason"].to_string();
    assert!(
        reason.contains(&format!(
            "cut short: the file is 4096 bytes, but its ELF headers describe at least {} bytes",
            bytes.len()
        )),
        "{reason}"
    );

    install_plugin(&dirs.plugins(), &test_connector(), "fixme");
    until_entries(&agent, "fixme", "the fixed file to load", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_version_leaves_the_old_one_serving() {
    let dirs = TestDirs::new();
    versioned_connector(&dirs.plugins(), "app", "app", "1.0.0");
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    until_serves(&agent, "app", "1.0.0").await;

    write_script(
        &dirs.plugins(),
        "app",
        "#!/bin/sh\necho 'Traceback: broken build'\n",
    );
    until_entries(
        &agent,
        "app",
        "the rejected replacement beside the old version",
        |e| {
            e.len() == 2
                && e.iter().any(|c| c["status"] == "rejected")
                && e.iter()
                    .any(|c| c["status"] == "ready" && c["version"] == "1.0.0")
        },
    )
    .await;
    let rejected = agent
        .entries_for_file("app")
        .await
        .into_iter()
        .find(|c| c["status"] == "rejected")
        .unwrap();
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap()
            .contains("did not print a JSON document"),
        "{rejected}"
    );
    // The old version runs from its private copy: the broken file cannot touch it.
    until_serves(&agent, "app", "1.0.0").await;

    versioned_connector(&dirs.plugins(), "app", "app", "1.1.0");
    until_serves(&agent, "app", "1.1.0").await;
    until_entries(&agent, "app", "only the fixed version", |e| e.len() == 1).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_folder_removed_and_recreated_is_watched_again() {
    let dirs = TestDirs::new();
    versioned_connector(&dirs.plugins(), "first", "first", "1.0.0");
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    assert_eq!(agent.connectors().await.len(), 1);

    std::fs::remove_dir_all(dirs.plugins()).unwrap();
    eventually_ok(WAIT, "the folder's connectors to be removed", || async {
        let connectors = agent.connectors().await;
        if connectors.is_empty() {
            Ok(())
        } else {
            Err(connectors)
        }
    })
    .await;
    std::fs::create_dir(dirs.plugins()).unwrap();
    versioned_connector(&dirs.plugins(), "second", "second", "1.0.0");
    until_entries(
        &agent,
        "second",
        "a connector in the recreated folder",
        |e| e.len() == 1 && e[0]["status"] == "ready",
    )
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_rescan_catches_what_events_miss() {
    let dirs = TestDirs::new();
    // No watcher at all: as if every event were lost.
    let agent = TestAgent::start(
        &dirs,
        "[plugins]\nwatch = false\nrescan_interval_secs = 1\n",
    )
    .await;
    versioned_connector(&dirs.plugins(), "late", "late", "1.0.0");
    until_entries(&agent, "late", "the periodic rescan to load it", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    agent.shutdown().await;
}

/// A file rejected because the agent's own state folder failed it (there: the store is a
/// file, where a full disk is the usual cause) is loaded at a later scan once the folder works
/// again, though the file itself never changed; and its reason says whose fault it was. The
/// admin is warned once, not at every scan that tries it again (and again once for the file
/// removed and dropped in again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_state_folder_could_not_take_is_loaded_once_it_can() {
    captured_logs();
    let dirs = TestDirs::new();
    let agent = TestAgent::start(
        &dirs,
        "[plugins]\nwatch = false\nrescan_interval_secs = 1\n",
    )
    .await;
    let store = dirs.state().join("store");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::write(&store, b"in the way").unwrap();
    versioned_connector(&dirs.plugins(), "stuck", "stuck", "1.0.0");
    let entries = until_entries(&agent, "stuck", "the copy to fail", |e| {
        e.len() == 1 && e[0]["status"] == "rejected"
    })
    .await;
    let reason = entries[0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("cannot copy it into the state folder")
            && reason.contains("tried again at the next scan"),
        "{reason}"
    );
    // Tried again at later scans, and said once.
    let lines = |needle: &str| {
        captured_logs()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    };
    eventually(WAIT, "two more scans to try it again", || {
        lines("rejected stuck: cannot copy it into the state folder") >= 3
    })
    .await;
    assert_eq!(lines(" WARN lumos_agent::plugins: rejected stuck: "), 1);
    assert!(lines(" DEBUG lumos_agent::plugins: still rejected stuck: ") >= 2);
    // Removed, the file is forgotten: dropped in again, it is a new file, and warned of anew.
    let file = dirs.plugins().join("stuck");
    std::fs::remove_file(&file).unwrap();
    until_entries(&agent, "stuck", "the removal", <[Value]>::is_empty).await;
    versioned_connector(&dirs.plugins(), "stuck", "stuck", "1.0.0");
    eventually(WAIT, "the file dropped in again to be warned of", || {
        lines(" WARN lumos_agent::plugins: rejected stuck: ") == 2
    })
    .await;
    std::fs::remove_file(&store).unwrap();
    until_entries(&agent, "stuck", "a later scan to load it", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_library_replaced_at_the_same_path_runs_the_new_code() {
    let dirs = TestDirs::new();
    let path = dirs.plugins().join("libnative.so");
    std::fs::copy(lumos_example_c::LIBRARY, &path).unwrap();
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    assert_eq!(
        agent.entries_for_file("libnative.so").await[0]["app_id"],
        "lumos_example_c"
    );

    let tmp = dirs.plugins().join(".libnative.so.part");
    std::fs::copy(native_lib("liblumos_example_cdylib.so"), &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    until_entries(&agent, "libnative.so", "the new library to load", |e| {
        e.len() == 1 && e[0]["app_id"] == "lumos_example_cdylib"
    })
    .await;
    let (status, body) = agent
        .call(
            "lumos_example_cdylib",
            "validate_credentials",
            json!({"auth": {"oauth": {"access_token": "t"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = agent
        .call("lumos_example_c", "list_accounts", json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the old code no longer serves"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_a_replaced_version_are_cancelled_after_the_drain_grace() {
    let dirs = TestDirs::new();
    versioned_connector(&dirs.plugins(), "app", "app", "1.0.0");
    let agent = Arc::new(
        TestAgent::start(
            &dirs,
            &format!("{WATCH_ONLY}[calls]\ndrain_grace_secs = 1\n"),
        )
        .await,
    );
    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("pid");
    let long_call = {
        let agent = agent.clone();
        let body = json!({"request": {"secs": 600, "pid_file": pid_file.to_str().unwrap()}});
        tokio::spawn(async move { agent.call("app", "sleep", body).await })
    };
    let p = pid_file.clone();
    eventually(WAIT, "the long call to start", move || p.exists()).await;
    let pid: i32 = serde_json::from_str::<Value>(&std::fs::read_to_string(&pid_file).unwrap())
        .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;

    versioned_connector(&dirs.plugins(), "app", "app", "2.0.0");
    until_serves(&agent, "app", "2.0.0").await;
    // The old version's call does not hold the old version for its 600 s: after the 1 s drain
    // grace it is cancelled and its process killed.
    let (status, body) = long_call.await.unwrap();
    assert_eq!(
        body["error"]["error_code"], "agent.cancelled",
        "{status} {body}"
    );
    eventually(WAIT, "the old call's process to be gone", move || {
        !process_alive(pid)
    })
    .await;
    let agent = Arc::try_unwrap(agent).unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_published_with_a_growing_revision() {
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    let mut events = agent.registry.subscribe();
    let start = events.borrow_and_update().revision;

    versioned_connector(&dirs.plugins(), "one", "one", "1.0.0");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::timeout_at(deadline, events.changed())
            .await
            .expect("an inventory event")
            .unwrap();
        let inventory = events.borrow_and_update().clone();
        seen.push(inventory.revision);
        if inventory
            .connectors
            .iter()
            .any(|c| c.app_id.as_deref() == Some("one"))
        {
            break;
        }
    }
    std::fs::remove_file(dirs.plugins().join("one")).unwrap();
    loop {
        tokio::time::timeout_at(deadline + WAIT, events.changed())
            .await
            .expect("an inventory event")
            .unwrap();
        let inventory = events.borrow_and_update().clone();
        seen.push(inventory.revision);
        if inventory.connectors.is_empty() {
            break;
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]) && seen[0] > start,
        "revisions only grow: {start} then {seen:?}"
    );
    assert_eq!(
        agent.revision().await,
        *seen.last().unwrap(),
        "the API shows the latest revision"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_copies_of_removed_versions_are_cleaned_up() {
    let dirs = TestDirs::new();
    // A minimal bundle: the example connector as `main`, with its metadata.
    let bundle = dirs.root.path().join("example_on_prem-0.1.0.tar.gz");
    {
        let file = std::fs::File::create(&bundle).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        let main = std::fs::read(example_connector()).unwrap();
        let meta = b"[connector]\napp_id = \"example_on_prem\"\nversion = \"0.1.0\"\n";
        for (name, data, mode) in [
            ("main", &main[..], 0o755),
            ("metadata.toml", &meta[..], 0o644),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            tar.append_data(&mut header, name, data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }
    install_plugin(&dirs.plugins(), &bundle, "example_on_prem-0.1.0.tar.gz");
    install_plugin(&dirs.plugins(), &test_connector(), "exe");
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    let bundle_sha = agent.entries_for_file("example_on_prem-0.1.0.tar.gz").await[0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let exe_sha = agent.entries_for_file("exe").await[0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let unpacked = dirs.state().join("bundles").join(&bundle_sha[..32]);
    let stored = dirs.state().join("store").join(&exe_sha);
    assert!(unpacked.join("main").is_file() && stored.join("exe").is_file());

    std::fs::remove_file(dirs.plugins().join("example_on_prem-0.1.0.tar.gz")).unwrap();
    std::fs::remove_file(dirs.plugins().join("exe")).unwrap();
    let (u, s) = (unpacked.clone(), stored.clone());
    eventually(
        WAIT,
        "the unpacked bundle and the stored copy to be removed",
        move || !u.exists() && !s.exists(),
    )
    .await;
    assert!(agent.connectors().await.is_empty());
    agent.shutdown().await;
}

/// A stop does not wait for a connector whose `info` is still running, in a scan of the
/// watcher's or of a reload's (SIGHUP): the load is abandoned (its process killed) and the
/// agent drains at once. (The scan held the drain until the `info` answered or timed out, up
/// to `plugins.info_timeout_secs`; past the drain grace the agent stopped as forced, with no
/// call in flight.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_a_connector_still_loading() {
    for by_reload in [false, true] {
        let dirs = TestDirs::new();
        let pid_file = dirs.root.path().join("info.pid");
        let gate = dirs.root.path().join("gate");
        // Its `info` hangs once the gate exists, writing its pid first.
        let script = format!(
            "#!/bin/bash\nif [ -e '{}' ]; then\n{}fi\nexec -a 'slow@1.0.0' '{}' \"$@\"\n",
            gate.display(),
            hang_writing_pid(&pid_file),
            test_connector().display()
        );
        // The output limit is fixed when a connector is loaded: a new one loads it again.
        let config = |max_output_bytes: u32| {
            format!(
                "{WATCH_ONLY}info_timeout_secs = 600\n[calls]\ndrain_grace_secs = 3\n\
                 max_output_bytes = {max_output_bytes}\n"
            )
        };
        std::fs::write(&gate, "").unwrap();
        if by_reload {
            // Loaded at start; a reload with a new output limit loads it again, and it hangs.
            std::fs::remove_file(&gate).unwrap();
            let path = write_script(&dirs.plugins(), "slow", &script);
            // Written long ago, so the reload's own scan loads it (not one after the debounce).
            set_mtime(
                &path,
                std::time::SystemTime::now() - Duration::from_secs(3600),
            );
        }
        let agent = TestAgent::start(&dirs, &config(1 << 20)).await;
        if by_reload {
            let entries = agent.entries_for_file("slow").await;
            assert_eq!(entries.len(), 1, "{entries:?}");
            assert_eq!(entries[0]["status"], "ready", "{entries:?}");
            std::fs::write(&gate, "").unwrap();
            TestAgent::write_config(&dirs, &dirs.plugins(), &config(2 << 20));
            agent.control.send(Control::Reload).await.unwrap();
        } else {
            write_script(&dirs.plugins(), "slow", &script);
        }
        eventually(
            WAIT,
            &format!("the info to start (by reload: {by_reload})"),
            || pid_file.exists(),
        )
        .await;
        let pid = pid_in(&pid_file);
        assert!(process_alive(pid));
        // Not a timing: the old behaviour waited for the 600 s `info` timeout.
        let stopped = tokio::time::timeout(WAIT, agent.shutdown())
            .await
            .unwrap_or_else(|_| panic!("the stop waited for the scan (by reload: {by_reload})"));
        assert_eq!(stopped, Stopped::Drained, "by reload: {by_reload}");
        eventually(WAIT, "the abandoned info to be killed", || {
            !process_alive(pid)
        })
        .await;
    }
}

/// A connector whose `info` hangs holds up no other: a file loaded in the same scan and one
/// added while it hangs are served at once, the wait is named in a progress line, a new version of the hanging file abandons its
/// load (the process is killed) and loads, and so does removing such a file. (A scan published
/// nothing before its last load ended, and the next scan waited for it: up to
/// `plugins.info_timeout_secs` with no new connector.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_whose_info_hangs_holds_up_no_other() {
    captured_logs();
    let dirs = TestDirs::new();
    let staging = dirs.root.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    // A connector whose `info` writes its pid, then never answers.
    let hanging = |name: &str| {
        let pid_file = dirs.root.path().join(format!("{name}.pid"));
        let script = format!("#!/bin/bash\n{}", hang_writing_pid(&pid_file));
        write_script(&staging, name, &script);
        pid_file
    };
    let ready = |app_id: &'static str| {
        move |e: &[Value]| e.len() == 1 && e[0]["status"] == "ready" && e[0]["app_id"] == app_id
    };
    let agent = TestAgent::start(&dirs, &format!("{WATCH_ONLY}info_timeout_secs = 600\n")).await;

    // Moved in together, so that one scan finds both.
    let pid_file = hanging("hangs");
    versioned_connector(&staging, "first", "first", "1.0.0");
    for name in ["hangs", "first"] {
        std::fs::rename(staging.join(name), dirs.plugins().join(name)).unwrap();
    }
    until_entries(
        &agent,
        "first",
        "the connector beside the hanging one",
        ready("first"),
    )
    .await;
    eventually(WAIT, "the hanging info to start", || pid_file.exists()).await;
    let pid = pid_in(&pid_file);
    assert!(process_alive(pid), "the info still hangs");

    // Added while it hangs: a later scan.
    versioned_connector(&dirs.plugins(), "second", "second", "1.0.0");
    until_entries(
        &agent,
        "second",
        "a connector added while one hangs",
        ready("second"),
    )
    .await;
    assert!(process_alive(pid), "the info still hangs");
    assert!(agent.entries_for_file("hangs").await.is_empty());
    // The admin is told what the wait is for.
    eventually(WAIT, "a progress line for the hanging load", || {
        captured_logs().contains("hangs: still loading after")
    })
    .await;
    let line = captured_logs()
        .lines()
        .find(|l| l.contains("hangs: still loading after"))
        .map(str::to_owned)
        .unwrap();
    assert!(
        line.ends_with(
            "s (waiting for its `info`, which has up to plugins.info_timeout_secs = 600s to answer)"
        ),
        "{line}"
    );

    // A new version of the hanging file replaces its load.
    versioned_connector(&dirs.plugins(), "hangs", "fixed", "1.0.0");
    until_entries(
        &agent,
        "hangs",
        "the new version of the hanging file",
        ready("fixed"),
    )
    .await;
    eventually(WAIT, "the abandoned info to be killed", || {
        !process_alive(pid)
    })
    .await;

    // A hanging file removed: its load is abandoned.
    let pid_file = hanging("gone");
    std::fs::rename(staging.join("gone"), dirs.plugins().join("gone")).unwrap();
    eventually(WAIT, "the second hanging info to start", || {
        pid_file.exists()
    })
    .await;
    let pid = pid_in(&pid_file);
    std::fs::remove_file(dirs.plugins().join("gone")).unwrap();
    eventually(WAIT, "the removed file's info to be killed", || {
        !process_alive(pid)
    })
    .await;
    assert!(agent.entries_for_file("gone").await.is_empty());
    assert_eq!(agent.connectors().await.len(), 3, "first, second, fixed");
    agent.shutdown().await;
}

/// Four connectors whose `info` hangs, moved in with a fifth: a scan loads four files at a
/// time, and a load still running after 5 s gives up its place, so the fifth loads while the
/// four still hang. (It waited for one of them to time out, up to `plugins.info_timeout_secs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_hanging_together_give_up_their_places_in_the_scan() {
    let dirs = TestDirs::new();
    let staging = dirs.root.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let agent = TestAgent::start(&dirs, &format!("{WATCH_ONLY}info_timeout_secs = 600\n")).await;
    // Named to sort first: a scan starts its loads in name order.
    let hanging: Vec<String> = (0..4).map(|i| format!("a-hangs-{i}")).collect();
    for name in &hanging {
        write_script(&staging, name, "#!/bin/bash\nexec sleep 600\n");
    }
    versioned_connector(&staging, "b-ready", "ready", "1.0.0");
    for name in hanging.iter().map(String::as_str).chain(["b-ready"]) {
        std::fs::rename(staging.join(name), dirs.plugins().join(name)).unwrap();
    }
    until_entries(&agent, "b-ready", "the fifth connector", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    for name in &hanging {
        assert!(
            agent.entries_for_file(name).await.is_empty(),
            "{name} still hangs"
        );
    }
    agent.shutdown().await;
}

/// Seventeen connectors whose `info` hangs, found by one scan (a reload moves the plugins
/// folder to one that holds them all): sixteen run, the slow ones included, and the
/// seventeenth starts only once one of them ends. (Every load gave up its place after 5 s, so a
/// folder of connectors that hang, or each take seconds to start, ran as many processes at
/// once.)
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_runs_at_most_sixteen_loads_at_once() {
    captured_logs();
    let dirs = TestDirs::new();
    let config = format!("{WATCH_ONLY}info_timeout_secs = 600\n");
    let agent = TestAgent::start(&dirs, &config).await;
    let folder = dirs.root.path().join("many-hanging");
    std::fs::create_dir(&folder).unwrap();
    // Named to sort in the order they start.
    let pid_files: Vec<_> = (0..17)
        .map(|i| {
            let pid_file = dirs.root.path().join(format!("{i:02}.pid"));
            let script = format!("#!/bin/bash\n{}", hang_writing_pid(&pid_file));
            write_script(&folder, &format!("hangs-{i:02}"), &script);
            pid_file
        })
        .collect();
    TestAgent::write_config(&dirs, &folder, &config);
    agent.control.send(Control::Reload).await.unwrap();

    // Four at first, four more each time the last four turn slow (5 s): about 15 s.
    eventually(WAIT * 3, "sixteen hanging infos to start", || {
        pid_files[..16].iter().all(|p| p.exists())
    })
    .await;
    // The last of them has turned slow: without a bound, the seventeenth would start now.
    // (Its first tick says "after 5s", or more on a busy machine.)
    eventually(WAIT, "the sixteenth load to turn slow", || {
        captured_logs().contains("hangs-15: still loading after ")
    })
    .await;
    // The scan says it holds the seventeenth back (the admin is told why it waits), and has
    // not started it.
    eventually(WAIT, "the scan to hold the seventeenth load back", || {
        captured_logs().contains(
            "16 connectors are loading and none has finished: 1 more wait for one of them \
             (each ends at the latest after plugins.info_timeout_secs = 600s)",
        )
    })
    .await;
    assert!(!pid_files[16].exists(), "a seventeenth load ran");
    // One of them ends: the seventeenth takes its place.
    let mut pids: Vec<i32> = pid_files[..16].iter().map(|p| pid_in(p)).collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(WAIT, "the seventeenth info to start", || {
        pid_files[16].exists()
    })
    .await;
    assert!(pids[1..].iter().all(|pid| process_alive(*pid)));
    pids[0] = pid_in(&pid_files[16]);
    agent.shutdown().await;
    for pid in pids {
        eventually(WAIT, "the stop to kill the hanging infos", || {
            !process_alive(pid)
        })
        .await;
    }
}

/// A connector rewritten faster than it loads (its `info` is slow), with reloads (SIGHUP)
/// among the rewrites, so that scans run side by side and loads are abandoned part way: the
/// agent ends serving the last version, listed once, and its store keeps only that version's
/// private copy (an abandoned load's copy is collected too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_faster_than_a_slow_load_end_on_the_last_version() {
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, &format!("{WATCH_ONLY}debounce_ms = 20\n")).await;
    let script = |n: u32| {
        format!(
            "#!/bin/bash\nif [ \"$1\" = info ]; then sleep 0.3; fi\nexec -a 'slow@1.0.{n}' '{}' \"$@\"\n",
            test_connector().display()
        )
    };
    let last = 11;
    for n in 0..=last {
        write_script(&dirs.plugins(), "slow", &script(n));
        if n % 3 == 1 {
            agent.control.send(Control::Reload).await.unwrap();
        }
        // Now shorter, now longer than the debounce and the load.
        tokio::time::sleep(Duration::from_millis(u64::from(n % 4) * 150 + 10)).await;
    }
    until_serves(&agent, "slow", &format!("1.0.{last}")).await;
    let entries = agent.entries_for_file("slow").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["version"], format!("1.0.{last}"), "{entries:?}");
    let store = dirs.state().join("store");
    let copies = || std::fs::read_dir(&store).map_or(0, |d| d.count());
    eventually(WAIT, "one private copy left in the store", || copies() == 1).await;
    agent.shutdown().await;
}

/// A reload that finds a file being loaded by another scan waits for that load. If the file
/// changes again meanwhile, that load is abandoned and the new content loaded: the reload waits
/// for that one too, so that it is over when the folder is loaded. (It ended when the load it
/// first waited for was abandoned, with the new version still loading.)
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_waits_for_the_content_that_replaced_the_one_it_found_loading() {
    captured_logs();
    let dirs = TestDirs::new();
    let staging = dirs.root.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let agent = TestAgent::start(&dirs, &format!("{WATCH_ONLY}info_timeout_secs = 600\n")).await;
    let plugins = dirs.plugins();
    // Moved in whole and dated long ago: no scan waits for it to settle.
    let move_in = |script: &str| {
        let path = write_script(&staging, "replaced", script);
        set_mtime(
            &path,
            std::time::SystemTime::now() - Duration::from_secs(3600),
        );
        std::fs::rename(&path, plugins.join("replaced")).unwrap();
    };
    let log_has = |what: &str, field: &str| {
        captured_logs()
            .lines()
            .any(|line| line.contains(what) && line.contains(field))
    };
    // The first version's `info` hangs.
    let pid_file = dirs.root.path().join("first.pid");
    move_in(&format!("#!/bin/bash\n{}", hang_writing_pid(&pid_file)));
    eventually(WAIT, "the watcher's scan to load the first version", || {
        pid_file.exists()
    })
    .await;
    agent.control.send(Control::Reload).await.unwrap();
    let file = format!("file={}", plugins.join("replaced").display());
    eventually(WAIT, "the reload to wait for that load", || {
        log_has("the reload waits for this file's load", &file)
    })
    .await;
    // The second version takes 2 s to answer `info`.
    move_in(&format!(
        "#!/bin/bash\nif [ \"$1\" = info ]; then sleep 2; fi\nexec -a 'replaced@2.0.0' '{}' \"$@\"\n",
        test_connector().display()
    ));
    let dir = format!("dir={}", plugins.display());
    eventually(WAIT, "the reload to end", || {
        log_has("plugins folder rescanned", &dir)
    })
    .await;
    let entries = agent.entries_for_file("replaced").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        entries[0]["status"], "ready",
        "the reload ended with the new version still loading: {entries:?}"
    );
    assert_eq!(entries[0]["version"], "2.0.0", "{entries:?}");
    let pid = pid_in(&pid_file);
    eventually(WAIT, "the abandoned info to be killed", || {
        !process_alive(pid)
    })
    .await;
    agent.shutdown().await;
}

/// A file dated in the future (copied with its times from a machine whose clock runs ahead,
/// `tar x` or `cp -p`) loads once it has stopped changing for the debounce, with a warning
/// that names the skew. (Its modification time made it look still being written until that
/// time came, an hour here, rescanning the folder every debounce meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_dated_in_the_future_loads_once_it_stops_changing() {
    captured_logs();
    let dirs = TestDirs::new();
    let agent = TestAgent::start(&dirs, WATCH_ONLY).await;
    let path = versioned_connector(&dirs.plugins(), "ahead", "ahead", "1.0.0");
    set_mtime(
        &path,
        std::time::SystemTime::now() + Duration::from_secs(3600),
    );
    until_entries(&agent, "ahead", "the connector dated ahead to load", |e| {
        e.len() == 1 && e[0]["status"] == "ready"
    })
    .await;
    let logs = captured_logs();
    assert!(
        logs.contains("ahead") && logs.contains("in the future"),
        "{logs}"
    );
    agent.shutdown().await;
}

/// A reload that changes the limits connectors are loaded under loads every connector again,
/// also one its scan found still being written (here: dated in the future, so that scan's look
/// waits for the debounce): it is loaded under the new limits once it settles. (The scan after
/// the debounce found it unchanged and kept it on the old limits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_limits_reaches_a_file_that_was_still_settling() {
    let dirs = TestDirs::new();
    let infos_file = dirs.root.path().join("infos");
    let script = format!(
        "#!/bin/bash\nif [ \"$1\" = info ]; then echo >> '{}'; fi\nexec -a 'settling@1.0.0' '{}' \"$@\"\n",
        infos_file.display(),
        test_connector().display()
    );
    let path = write_script(&dirs.plugins(), "settling", &script);
    set_mtime(
        &path,
        std::time::SystemTime::now() + Duration::from_secs(3600),
    );
    // The output limit is fixed when a connector is loaded: a new one loads every connector.
    let config = |max_output_bytes: u32| {
        format!("{WATCH_ONLY}[calls]\nmax_output_bytes = {max_output_bytes}\n")
    };
    let agent = TestAgent::start(&dirs, &config(1 << 20)).await;
    let infos = || std::fs::read_to_string(&infos_file).map_or(0, |t| t.lines().count());
    assert_eq!(infos(), 1, "loaded at start");
    TestAgent::write_config(&dirs, &dirs.plugins(), &config(2 << 20));
    agent.control.send(Control::Reload).await.unwrap();
    eventually(
        WAIT,
        "the connector loaded again under the new limits",
        || infos() == 2,
    )
    .await;
    let entries = agent.entries_for_file("settling").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["status"], "ready", "{entries:?}");
    agent.shutdown().await;
}
