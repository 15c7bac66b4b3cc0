//! The tunnel, end to end: the real agent in-process dials a fake cloud (a real tonic server)
//! and serves its calls; the fake cloud injects the faults.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::time::Duration;

use hyper::Method;
use lumos_agent::app::{Control, Stopped};
use lumos_agent_integration::fake_cloud::*;
use lumos_agent_integration::*;
use lumos_agent_proto::v1::{agent_message, CallRequest};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const ANSWERED: i32 = 1;
const AGENT_ERROR: i32 = 2;

/// The agent's config for dialling `cloud` with its default token, and `extra`.
fn config_for(dirs: &TestDirs, cloud: &FakeCloud, extra: &str) -> String {
    cloud_config(
        dirs,
        &cloud.endpoint(),
        &FakeCloudOptions::default().token,
        extra,
    )
}

async fn agent_for(dirs: &TestDirs, cloud: &FakeCloud, extra: &str) -> TestAgent {
    TestAgent::start(dirs, &config_for(dirs, cloud, extra)).await
}

/// Results a stop kept on disk for the next start.
fn kept_results(dirs: &TestDirs) -> usize {
    std::fs::read_dir(dirs.state().join("outbox"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("result".as_ref()))
        .count()
}

/// Folders with the test connector installed as `tester`.
fn tester_dirs() -> TestDirs {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    dirs
}

/// The test connector installed as `tester`, a fake cloud, and the config of an agent dialling
/// it with a drain grace of one second instead of thirty (for tests that stop it and start it
/// again).
async fn tester_cloud_and_short_grace() -> (TestDirs, FakeCloud, String) {
    let dirs = tester_dirs();
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let config =
        config_for(&dirs, &cloud, "").replace("drain_grace_secs = 30", "drain_grace_secs = 1");
    (dirs, cloud, config)
}

/// The test connector installed as `tester`, a fake cloud, and the agent dialling it with
/// `extra` config.
async fn tester_and_cloud(extra: &str) -> (TestDirs, FakeCloud, TestAgent) {
    let dirs = tester_dirs();
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let agent = agent_for(&dirs, &cloud, extra).await;
    (dirs, cloud, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_welcome_inventory_then_calls_with_the_tenant_injected() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let agent = agent_for(
        &dirs,
        &cloud,
        "max_concurrent_calls = 7\noperation_mode = \"read_preferred\"",
    )
    .await;
    agent
        .put_tenant(
            "acme",
            json!({"app_id": "tester", "settings": {"region": "eu"}, "auth": {"access_token": "CANARY-acme"}}),
        )
        .await;

    let mut s = cloud.next_session(WAIT).await;
    let hello = &s.hello;
    assert!(uuid_like(&hello.agent_id), "{}", hello.agent_id);
    assert_eq!(hello.cluster_id, "test-cluster");
    assert_eq!(hello.max_concurrent_calls, 7);
    assert_eq!(hello.operation_mode, 2);
    assert_eq!(hello.protocol_version, 1);
    assert_eq!(hello.os, std::env::consts::OS);
    let agent_id = hello.agent_id.clone();
    // The id is persisted: the file holds the one the cloud saw.
    assert_eq!(
        std::fs::read_to_string(dirs.state().join("agent-id"))
            .unwrap()
            .trim(),
        agent_id
    );

    let inv = s
        .inventory_where(WAIT, |i| is_ready(i, "tester"))
        .await
        .expect("an inventory");
    assert_eq!(
        s.seen.first(),
        Some(&"inventory"),
        "inventory comes first after Welcome: {:?}",
        s.seen
    );
    let entry = inv
        .connectors
        .iter()
        .find(|c| c.app_id == "tester")
        .unwrap();
    assert_eq!(entry.kind, 2, "executable");
    assert_eq!(entry.file_name, "tester");
    assert_eq!(entry.sha256.len(), 64);
    let info: Value = serde_json::from_slice(&entry.info).unwrap();
    assert_eq!(info["app_id"], "tester");

    s.call(
        "c-1",
        "tester",
        "echo",
        "acme",
        &json!({"request": {"x": 1}, "settings": {"extra": true}}),
    );
    let result = s.result("c-1", WAIT).await.expect("the result");
    assert_eq!(result.status, ANSWERED);
    let doc = result.json();
    assert_eq!(doc["response"]["request"], json!({"x": 1}));
    assert_eq!(
        doc["response"]["settings"],
        json!({"region": "eu", "extra": true})
    );
    assert_eq!(doc["response"]["auth"]["access_token"], "CANARY-acme");
    s.ack("c-1");

    // A deadline from the cloud is honoured: a typed timeout, not a hang.
    s.call_raw(
        "c-2",
        "tester",
        "sleep",
        "",
        300,
        br#"{"request": {"secs": 30}}"#,
    );
    let result = s.result("c-2", WAIT).await.unwrap();
    assert_eq!(result.status, AGENT_ERROR);
    assert_eq!(result.json()["error"]["error_code"], "agent.timeout");
    s.ack("c-2");
    assert!(
        !captured_logs().contains("CANARY-acme"),
        "a secret reached the log"
    );
    // The admin sees the tunnel's state in the API and the metrics.
    let (_, status) = agent.request(Method::GET, "/v1/status", None).await;
    assert_eq!(status["cloud"], "connected", "{status}");
    assert_eq!(status["connectors"]["ready"], 1, "{status}");
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("lumos_agent_cloud_status{status=\"connected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lumos_agent_cloud_status{status=\"unreachable\"} 0"),
        "{metrics}"
    );
    assert_eq!(agent.shutdown().await, Stopped::Drained);
}

fn uuid_like(text: &str) -> bool {
    text.len() == 36 && text.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_dropped_into_the_folder_shows_up_in_the_cloud_inventory() {
    let dirs = TestDirs::new();
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let agent = agent_for(&dirs, &cloud, "").await;
    let mut s = cloud.next_session(WAIT).await;
    let first = s.inventory_where(WAIT, |_| true).await.unwrap();
    assert!(first.connectors.is_empty());
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    std::fs::write(dirs.plugins().join("broken"), b"not a program").unwrap();
    let inv = s
        .inventory_where(WAIT, |i| {
            is_ready(i, "lumos_example") && i.connectors.len() == 2
        })
        .await
        .expect("the new connector in the cloud's inventory");
    assert!(inv.revision > first.revision);
    let broken = inv
        .connectors
        .iter()
        .find(|c| c.file_name == "broken")
        .unwrap();
    assert_eq!(broken.status, 3, "rejected");
    assert!(!broken.reason.is_empty());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_mid_result_delivers_it_whole_after_reconnect_and_runs_it_once() {
    let (dirs, cloud, agent) = tester_and_cloud("").await;
    let count = dirs.root.path().join("runs");
    let payload = json!({"request": {"bytes": 8 << 20, "count_file": count}});

    let mut s = cloud.next_session(WAIT).await;
    s.call("big-1", "tester", "big", "", &payload);
    // Wait for the first chunk of the result, then drop the stream.
    loop {
        let msg = s.recv(WAIT).await.expect("result chunks");
        if let Some(agent_message::Message::CallResult(r)) = msg.message {
            assert_eq!(r.seq, 0);
            assert!(!r.last, "an 8 MiB result in 64 KiB chunks is many chunks");
            break;
        }
    }
    s.close();

    let mut s2 = cloud.next_session(WAIT).await;
    // The unacknowledged result is sent again on the new stream, whole.
    let result = s2
        .result("big-1", WAIT)
        .await
        .expect("the whole result after reconnecting");
    assert_eq!(result.status, ANSWERED);
    assert!(result.largest_chunk <= 64 * 1024);
    let doc = result.json();
    assert_eq!(doc["n"], 8 << 20);
    assert_eq!(doc["response"].as_str().unwrap().len(), 8 << 20);
    // The cloud does not know whether the call ran: it sends it again. It must not run twice:
    // the stored result comes back instead.
    s2.call("big-1", "tester", "big", "", &payload);
    let again = s2
        .result("big-1", WAIT)
        .await
        .expect("the stored result again");
    assert_eq!(again, result);
    s2.ack("big-1");
    // Acknowledged, then replayed: refused, still not run.
    s2.call("big-1", "tester", "big", "", &payload);
    let replay = s2.result("big-1", WAIT).await.unwrap();
    assert_eq!(replay.json()["error"]["error_code"], "agent.duplicate_call");
    assert_eq!(count_lines(&count), 1, "the connector ran exactly once");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cloud_is_left_within_three_heartbeats() {
    let dirs = TestDirs::new();
    let options = FakeCloudOptions {
        heartbeat_interval_ms: 200,
        ..FakeCloudOptions::default()
    };
    let cloud = FakeCloud::start(options).await;
    let agent = agent_for(&dirs, &cloud, "").await;
    let mut s = cloud.next_session(WAIT).await;
    // The agent heartbeats at the Welcome's interval.
    s.until("heartbeat", WAIT)
        .await
        .expect("an agent heartbeat");
    s.go_silent();
    let s2 = cloud.next_session(WAIT).await;
    assert_eq!(s2.id, 1);
    assert!(
        captured_logs().contains("3 heartbeat intervals"),
        "the reason is logged"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_megabyte_result_arrives_chunked_and_intact() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let options = FakeCloudOptions {
        max_chunk_size: 1 << 20,
        ..FakeCloudOptions::default()
    };
    let cloud = FakeCloud::start(options).await;
    let agent = agent_for(&dirs, &cloud, "").await;
    let mut s = cloud.next_session(WAIT).await;
    s.call(
        "huge",
        "tester",
        "big",
        "",
        &json!({"request": {"bytes": 50 << 20}}),
    );
    let result = s.result("huge", WAIT).await.expect("the 50 MB result");
    assert_eq!(result.status, ANSWERED);
    assert!(result.chunks >= 50, "{} chunks", result.chunks);
    assert!(result.largest_chunk <= 1 << 20, "{}", result.largest_chunk);
    let doc = result.json();
    let text = doc["response"].as_str().unwrap();
    assert_eq!(text.len(), 50 << 20);
    assert!(text.bytes().all(|b| b == b'a'));
    s.ack("huge");
    agent.shutdown().await;
}

async fn pid_in(path: &Path) -> i32 {
    let p = path.to_path_buf();
    eventually(WAIT, "the connector's pid file", move || p.exists()).await;
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["pid"].as_i64().unwrap() as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_process_group_and_stray_cancels_are_harmless() {
    let (dirs, cloud, agent) = tester_and_cloud("").await;
    let mut s = cloud.next_session(WAIT).await;
    let pid_file = dirs.root.path().join("sleeper.pid");
    s.call(
        "long",
        "tester",
        "sleep",
        "",
        &json!({"request": {"secs": 3600, "pid_file": pid_file}}),
    );
    let pid = pid_in(&pid_file).await;
    assert!(process_alive(pid));
    s.cancel("long");
    let result = s.result("long", WAIT).await.unwrap();
    assert_eq!(result.status, AGENT_ERROR);
    assert_eq!(result.json()["error"]["error_code"], "agent.cancelled");
    eventually(WAIT, "the cancelled connector to be gone", || {
        !process_alive(pid)
    })
    .await;
    s.ack("long");
    // Cancel of a finished call, of one that never existed, twice: nothing happens.
    s.cancel("long");
    s.cancel("never-existed");
    s.cancel("never-existed");
    s.call(
        "after",
        "tester",
        "echo",
        "",
        &json!({"request": {"still": "serving"}}),
    );
    let result = s.result("after", WAIT).await.unwrap();
    assert_eq!(result.json()["response"]["request"]["still"], "serving");
    // Acknowledged, so the stop has no result to wait the grace for.
    s.ack("after");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_limit_get_a_retryable_busy() {
    captured_logs();
    let (dirs, cloud, agent) = tester_and_cloud("max_concurrent_calls = 2").await;
    let mut s = cloud.next_session(WAIT).await;
    let mut pids = Vec::new();
    for i in 0..2 {
        let pid_file = dirs.root.path().join(format!("s{i}.pid"));
        s.call(
            &format!("slow-{i}"),
            "tester",
            "sleep",
            "",
            &json!({"request": {"secs": 3600, "pid_file": pid_file}}),
        );
        pids.push(pid_in(&pid_file).await);
    }
    s.call("third", "tester", "echo", "", &json!({}));
    let busy = s.result("third", WAIT).await.unwrap();
    assert_eq!(busy.status, AGENT_ERROR);
    let doc = busy.json();
    assert_eq!(doc["error"]["error_code"], "agent.busy");
    s.ack("third");
    // Counted among the calls, so an overloaded agent shows in its metrics.
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains(
            "lumos_agent_calls_total{app_id=\"tester\",capability=\"echo\",outcome=\"busy\"} 1"
        ),
        "{metrics}"
    );
    // And in the log, so an admin reading it sees why the cloud's calls fail.
    let logs = captured_logs();
    assert!(
        logs.lines().any(|line| line.contains("third")
            && line.contains("call refused: this agent is running its maximum of 2 calls")),
        "{logs}"
    );
    for i in 0..2 {
        s.cancel(&format!("slow-{i}"));
        s.result(&format!("slow-{i}"), WAIT).await.unwrap();
        s.ack(&format!("slow-{i}"));
    }
    // Busy never ran: the same id may run now.
    s.call("third", "tester", "echo", "", &json!({"request": 3}));
    assert_eq!(
        s.result("third", WAIT).await.unwrap().json()["response"]["request"],
        3
    );
    s.ack("third");
    for pid in pids {
        assert!(!process_alive(pid));
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_payloads_get_an_error_for_that_call_and_nothing_else() {
    // The results are not acknowledged: at the stop the agent waits the grace for the acks.
    let (dirs, cloud, config) = tester_cloud_and_short_grace().await;
    let agent = TestAgent::start(&dirs, &config).await;
    let mut s = cloud.next_session(WAIT).await;
    let code = |r: &AssembledResult| {
        r.json()["error"]["error_code"]
            .as_str()
            .unwrap()
            .to_string()
    };

    s.call_raw("bad-json", "tester", "echo", "", 0, b"{not json");
    assert_eq!(
        code(&s.result("bad-json", WAIT).await.unwrap()),
        "agent.bad_request"
    );
    s.call_raw("not-object", "tester", "echo", "", 0, b"[1, 2]");
    assert_eq!(
        code(&s.result("not-object", WAIT).await.unwrap()),
        "agent.bad_request"
    );
    s.call("no-app", "", "echo", "", &json!({}));
    assert_eq!(
        code(&s.result("no-app", WAIT).await.unwrap()),
        "agent.bad_request"
    );
    s.call("unknown", "nope", "echo", "", &json!({}));
    assert_eq!(
        code(&s.result("unknown", WAIT).await.unwrap()),
        "agent.unknown_connector"
    );
    s.call("no-cap", "tester", "no_such_capability", "", &json!({}));
    assert_eq!(
        code(&s.result("no-cap", WAIT).await.unwrap()),
        "agent.unsupported_capability"
    );
    let chunk = |call_id: &str, seq: u32, last: bool| CallRequest {
        call_id: call_id.into(),
        app_id: "tester".into(),
        capability: "echo".into(),
        seq,
        last,
        payload: bytes::Bytes::from_static(b"{}"),
        ..CallRequest::default()
    };
    // A chunk out of order, and a call that starts at chunk 3.
    s.send_chunk(chunk("gap", 0, false));
    s.send_chunk(chunk("gap", 2, true));
    assert_eq!(
        code(&s.result("gap", WAIT).await.unwrap()),
        "agent.bad_request"
    );
    s.send_chunk(chunk("late", 3, true));
    assert_eq!(
        code(&s.result("late", WAIT).await.unwrap()),
        "agent.bad_request"
    );
    // Refused at its chunk 1 (no chunk 0), then sent again from chunk 0 as the refusal says,
    // before (or instead of) the rest of the first attempt: the new attempt runs. Likewise
    // after a Cancel of the refused call.
    for (call_id, cancel) in [("again", false), ("cancelled-then-again", true)] {
        s.send_chunk(chunk(call_id, 1, false));
        assert_eq!(
            code(&s.result(call_id, WAIT).await.unwrap()),
            "agent.bad_request"
        );
        s.ack(call_id);
        if cancel {
            s.cancel(call_id);
        }
        let piece = |seq: u32, last: bool, payload: &'static [u8]| CallRequest {
            payload: bytes::Bytes::from_static(payload),
            ..chunk(call_id, seq, last)
        };
        s.send_chunk(piece(0, false, br#"{"request": "#));
        s.send_chunk(piece(1, true, br#""sent again"}"#));
        let again = s
            .result(call_id, WAIT)
            .await
            .expect("the call sent again is answered");
        assert_eq!(again.status, ANSWERED, "{}", again.json());
        assert_eq!(again.json()["response"]["request"], "sent again");
    }
    // No call_id (nothing to answer), and an empty message: ignored.
    s.send_chunk(chunk("", 0, true));
    s.send_empty();
    // The stream is still good.
    s.call("good", "tester", "echo", "", &json!({"request": "fine"}));
    let good = s.result("good", WAIT).await.unwrap();
    assert_eq!(good.status, ANSWERED);
    assert_eq!(good.json()["response"]["request"], "fine");
    assert_eq!(s.id, 0, "no reconnect was needed");
    assert!(cloud.try_next_session().await.is_none());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_not_retried_in_a_tight_loop() {
    let dirs = TestDirs::new();
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    // backoff_max_secs = 3600: after a refusal the agent must wait the maximum, an hour.
    let config = cloud_config(
        &dirs,
        &cloud.endpoint(),
        "WRONG-TOKEN-SECRET",
        "backoff_max_secs = 3600",
    );
    let agent = TestAgent::start(&dirs, &config).await;
    eventually(WAIT, "a first attempt", || cloud.attempts() >= 1).await;
    eventually(WAIT, "the refusal to be logged", || {
        captured_logs().contains("refused this agent's token")
    })
    .await;
    // Had it retried with the initial 50 ms backoff, there would be dozens by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cloud.attempts(), 1, "retried after a permanent refusal");
    let logs = captured_logs();
    assert!(logs.contains("retrying in 3600s"), "{logs}");
    assert!(
        !logs.contains("WRONG-TOKEN-SECRET"),
        "the token reached the log"
    );
    let (_, status) = agent.request(Method::GET, "/v1/status", None).await;
    assert_eq!(status["cloud"], "unauthorized", "{status}");
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("lumos_agent_tunnel_disconnects_total{reason=\"unauthorized\"} 1"),
        "{metrics}"
    );
    agent.shutdown().await;

    // PERMISSION_DENIED (a revoked agent) is treated the same.
    let dirs = TestDirs::new();
    let denied = FakeCloud::start(FakeCloudOptions {
        deny: true,
        ..FakeCloudOptions::default()
    })
    .await;
    let agent = agent_for(&dirs, &denied, "backoff_max_secs = 3600").await;
    eventually(WAIT, "a first attempt", || denied.attempts() >= 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(denied.attempts(), 1);
    assert!(captured_logs().contains("PermissionDenied"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_announces_draining_finishes_in_flight_calls_and_flushes_results() {
    let (dirs, cloud, agent) = tester_and_cloud("").await;
    let mut s = cloud.next_session(WAIT).await;
    let pid_file = dirs.root.path().join("s.pid");
    s.call(
        "inflight",
        "tester",
        "sleep",
        "",
        &json!({"request": {"secs": 2, "pid_file": pid_file}}),
    );
    pid_in(&pid_file).await;
    // A reload changes the grace: the cloud is told the one in force, not the start's.
    TestAgent::write_config(
        &dirs,
        &dirs.plugins(),
        &config_for(&dirs, &cloud, "").replace("drain_grace_secs = 30", "drain_grace_secs = 45"),
    );
    let control = agent.control.clone();
    control
        .send(lumos_agent::app::Control::Reload)
        .await
        .unwrap();
    eventually(WAIT, "the reload to apply the new grace", || {
        captured_logs()
            .lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("calls.drain_grace_secs"))
    })
    .await;
    let stopped = agent.stopped;
    control
        .send(lumos_agent::app::Control::Shutdown)
        .await
        .unwrap();
    let msg = s.until("draining", WAIT).await.expect("Draining");
    let Some(agent_message::Message::Draining(d)) = msg.message else {
        unreachable!()
    };
    assert_eq!(d.in_flight, 1);
    assert_eq!(d.grace_ms, 45_000);
    // No new calls while draining.
    s.call("late", "tester", "echo", "", &json!({}));
    let late = s.result("late", WAIT).await.unwrap();
    assert_eq!(late.json()["error"]["error_code"], "agent.shutting_down");
    s.ack("late");
    let done = s
        .result("inflight", WAIT)
        .await
        .expect("the in-flight result is flushed");
    assert_eq!(done.json()["response"]["slept"], 2);
    s.ack("inflight");
    assert!(
        s.ended(WAIT).await,
        "the agent closes the stream once everything is delivered"
    );
    assert_eq!(stopped.await.unwrap().unwrap(), Stopped::Drained);
}

/// Calls that each take long inside an in-process connector's `start_call` (its work done
/// before returning) still run side by side on a runtime with more workers: the session runs
/// one itself and shares the rest of the burst out among the other workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_in_process_calls_of_one_burst_run_side_by_side() {
    let dirs = TestDirs::new();
    install_misbehave(&dirs.plugins());
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let agent = agent_for(&dirs, &cloud, "[connectors.misbehave]\nin_process = true").await;
    let mut s = cloud.next_session(WAIT).await;
    let slow = json!({"request": {"ms": 300}});
    for i in 0..6 {
        s.call(&format!("slow-{i}"), "misbehave", "block", "", &slow);
    }
    for i in 0..6 {
        let result = s.result(&format!("slow-{i}"), WAIT).await.unwrap();
        assert_eq!(result.status, ANSWERED);
        assert_eq!(result.json()["response"]["blocked_ms"], 300);
        s.ack(&format!("slow-{i}"));
    }
    s.call("most", "misbehave", "most_blocking", "", &json!({}));
    let most = s.result("most", WAIT).await.unwrap().json()["response"]["most_blocking"].clone();
    s.ack("most");
    // Whether the six arrive in one burst or two, the calls after the one the session runs
    // itself are shared among the other three workers: one task for all of them would make
    // this 1.
    assert!(most.as_u64().unwrap() >= 2, "at most {most} ran at once");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_running_when_the_grace_runs_out_is_cancelled_and_its_processes_killed() {
    let (dirs, cloud, config) = tester_cloud_and_short_grace().await;
    let agent = TestAgent::start(&dirs, &config).await;
    let s = cloud.next_session(WAIT).await;
    let pid_file = dirs.root.path().join("stuck.pid");
    s.call(
        "stuck",
        "tester",
        "sleep",
        "",
        &json!({"request": {"secs": 3600, "pid_file": pid_file}}),
    );
    let pid = pid_in(&pid_file).await;
    assert_eq!(agent.shutdown().await, Stopped::GraceExpired);
    eventually(WAIT, "the stuck connector to be killed", || {
        !process_alive(pid)
    })
    .await;
    assert_eq!(kept_results(&dirs), 1, "its result is kept for the cloud");

    // The next start tells the cloud the call was cancelled; it does not run it again.
    let agent = TestAgent::start(&dirs, &config).await;
    let mut s2 = cloud.next_session(WAIT).await;
    let result = s2.result("stuck", WAIT).await.unwrap();
    assert_eq!(result.status, AGENT_ERROR);
    assert_eq!(result.json()["error"]["error_code"], "agent.cancelled");
    s2.ack("stuck");
    assert_eq!(agent.shutdown().await, Stopped::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_unacknowledged_at_a_stop_are_sent_after_the_next_start_and_not_run_again() {
    let (dirs, cloud, config) = tester_cloud_and_short_grace().await;
    let kept_files = || kept_results(&dirs);
    let count = dirs.root.path().join("runs");
    // One result small enough for memory, one large enough to be spooled.
    let small = json!({"request": {"bytes": 1000, "count_file": count}});
    let large = json!({"request": {"bytes": 3 << 20, "count_file": count}});

    let agent = TestAgent::start(&dirs, &config).await;
    let mut s = cloud.next_session(WAIT).await;
    s.call("small", "tester", "big", "", &small);
    s.call("large", "tester", "big", "", &large);
    let first_small = s.result("small", WAIT).await.unwrap();
    let first_large = s.result("large", WAIT).await.unwrap();
    assert_eq!(first_large.json()["n"], 3 << 20);
    // The admin sees them waiting: two results, only the small one in memory (the large one is
    // spooled to disk as the connector writes it).
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("lumos_agent_outbox_results 2\n"),
        "{metrics}"
    );
    let in_memory = format!("lumos_agent_outbox_memory_bytes {}\n", first_small.len);
    assert!(metrics.contains(&in_memory), "{metrics}");
    // The cloud never acknowledges them (it went down before storing them, say): the drain
    // waits for the acks until its grace runs out, and the agent stops with them undelivered.
    assert_eq!(agent.shutdown().await, Stopped::GraceExpired);
    assert_eq!(kept_files(), 2, "both results are kept on disk");
    assert!(captured_logs().contains("sent again after the next start"));

    // The next start sends them on its first stream, whole, and a call the cloud sends again
    // gets its stored result instead of running again.
    let agent = TestAgent::start(&dirs, &config).await;
    assert_eq!(kept_files(), 0, "taken back, the files are removed");
    let mut s2 = cloud.next_session(WAIT).await;
    assert_eq!(s2.result("small", WAIT).await.unwrap(), first_small);
    assert_eq!(s2.result("large", WAIT).await.unwrap(), first_large);
    s2.call("large", "tester", "big", "", &large);
    assert_eq!(s2.result("large", WAIT).await.unwrap(), first_large);
    assert_eq!(count_lines(&count), 2, "each call ran exactly once");
    s2.ack("small");
    s2.ack("large");
    assert_eq!(agent.shutdown().await, Stopped::Drained);
    assert_eq!(kept_files(), 0, "nothing is left to keep");
}

/// The test connector as `tester` and a fake cloud, for [`start_binary`].
#[cfg(unix)]
async fn tester_and_cloud_for_the_binary() -> (TestDirs, FakeCloud) {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    TestAgent::write_config(&dirs, &dirs.plugins(), &config_for(&dirs, &cloud, ""));
    (dirs, cloud)
}

/// The real `lumos-agent` binary on the config [`tester_and_cloud_for_the_binary`] wrote.
#[cfg(unix)]
fn start_binary(dirs: &TestDirs) -> KilledOnDrop {
    KilledOnDrop::spawn(
        std::process::Command::new(workspace_bin("lumos-agent"))
            .arg("--config")
            .arg(dirs.root.path().join("agent.toml"))
            .args(["--listen", "127.0.0.1:0", "run"])
            // The fake cloud is on loopback: a proxy of the machine's must not come between.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
}

/// The real binary's group reaper, killed while a connector runs: the next connector's start
/// runs a new one with both groups listed, and a SIGKILLed agent leaves neither running.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_group_reaper_is_replaced_and_the_killed_agents_connectors_end() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let (dirs, cloud) = tester_and_cloud_for_the_binary().await;
    let mut agent = start_binary(&dirs);
    let agent_pid = agent.id();
    let reapers = move || children_of(agent_pid, "group-reaper");
    let mut s = cloud.next_session(WAIT).await;
    s.inventory_where(WAIT, |i| is_ready(i, "tester"))
        .await
        .unwrap();
    let first = match reapers()[..] {
        [one] => one,
        ref other => panic!("one reaper runs beside the agent, not {other:?}"),
    };

    let slow = |name: &str| {
        let pid_file = dirs.root.path().join(format!("{name}.pid"));
        (
            pid_file.clone(),
            json!({"request": {"secs": 600, "pid_file": pid_file}}),
        )
    };
    let (one_file, one) = slow("one");
    s.call("one", "tester", "sleep", "", &one);
    let one_pid = pid_in(&one_file).await;
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    eventually(WAIT, "the reaper to die", move || !process_alive(first)).await;

    let (two_file, two) = slow("two");
    s.call("two", "tester", "sleep", "", &two);
    let two_pid = pid_in(&two_file).await;
    // The agent starts the new reaper just after it starts the connector, and a connector
    // may write its pid file before that spawn is done: wait for it rather than look once.
    eventually(
        WAIT,
        "one new reaper, the dead one reaped",
        move || matches!(reapers()[..], [one] if one != first),
    )
    .await;
    let replaced = match reapers()[..] {
        [one] => one,
        ref other => panic!("one new reaper, the dead one reaped, not {other:?}"),
    };
    assert_ne!(replaced, first);

    agent.kill().unwrap();
    agent.wait().unwrap();
    for (name, pid) in [("one", one_pid), ("two", two_pid)] {
        eventually(WAIT, &format!("connector {name} to end"), move || {
            !process_alive(pid)
        })
        .await;
    }
    eventually(WAIT, "the new reaper to exit", move || {
        !process_alive(replaced)
    })
    .await;
}

/// The real binary, killed with SIGKILL while one call runs and another's result waits for its
/// ack: nothing is written at a kill, only the call journal (written before calls run) knows
/// about them, and about the call acknowledged before.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_a_killed_agent_are_reported_interrupted_after_the_restart_and_never_run_again() {
    let (dirs, cloud) = tester_and_cloud_for_the_binary().await;
    let start = || start_binary(&dirs);
    let count = dirs.root.path().join("runs");
    let echo = json!({"request": {"count_file": count}});
    let pid_file = dirs.root.path().join("slow.pid");
    let slow = json!({"request": {"secs": 600, "count_file": count, "pid_file": pid_file}});

    let mut agent = start();
    let mut s = cloud.next_session(WAIT).await;
    s.inventory_where(WAIT, |i| is_ready(i, "tester"))
        .await
        .unwrap();
    s.call("acked", "tester", "echo", "", &echo);
    assert_eq!(s.result("acked", WAIT).await.unwrap().status, ANSWERED);
    s.ack("acked");
    // Read after the ack on the same stream: once its result is here, the ack is written down.
    s.call("delivered", "tester", "echo", "", &echo);
    assert_eq!(s.result("delivered", WAIT).await.unwrap().status, ANSWERED);
    s.call("slow", "tester", "sleep", "", &slow);
    let slow_pid = pid_in(&pid_file).await;
    assert_eq!(count_lines(&count), 3);

    agent.kill().unwrap();
    agent.wait().unwrap();
    // The group reaper ends the running connector's process group.
    eventually(WAIT, "the killed agent's connector to end", move || {
        !process_alive(slow_pid)
    })
    .await;

    let mut agent = start();
    let mut s2 = cloud.next_session(WAIT).await;
    // Both calls whose results the cloud never acknowledged: one finished (its answer was in
    // the dead process's memory), one still running.
    for call_id in ["delivered", "slow"] {
        let result = s2.result(call_id, WAIT).await.unwrap();
        assert_eq!(result.status, AGENT_ERROR, "{call_id}");
        let doc = result.json();
        assert_eq!(doc["error"]["error_code"], "agent.interrupted", "{call_id}");
        assert_eq!(doc["error"]["error_metadata"]["retryable"], false);
    }
    // Sent again, neither runs again: the same answer.
    s2.inventory_where(WAIT, |i| is_ready(i, "tester"))
        .await
        .unwrap();
    s2.call("slow", "tester", "sleep", "", &slow);
    let again = s2.result("slow", WAIT).await.unwrap();
    assert_eq!(again.json()["error"]["error_code"], "agent.interrupted");
    // The acknowledged call is refused, as it was before the kill.
    s2.call("acked", "tester", "echo", "", &echo);
    let replay = s2.result("acked", WAIT).await.unwrap();
    assert_eq!(replay.json()["error"]["error_code"], "agent.duplicate_call");
    assert_eq!(count_lines(&count), 3, "no call ran twice");
    // A new call runs as usual; once acknowledged, none is owed after a clean stop.
    s2.call("fresh", "tester", "echo", "", &echo);
    assert_eq!(s2.result("fresh", WAIT).await.unwrap().status, ANSWERED);
    for call_id in ["delivered", "slow", "fresh"] {
        s2.ack(call_id);
    }
    s2.call("last", "tester", "echo", "", &echo);
    s2.result("last", WAIT).await.unwrap();
    s2.ack("last");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(agent.wait().unwrap().success());
    assert_eq!(kept_results(&dirs), 0, "nothing was owed at the clean stop");

    // And a third start owes the cloud nothing.
    let mut agent = start();
    let mut s3 = cloud.next_session(WAIT).await;
    s3.inventory_where(WAIT, |i| is_ready(i, "tester"))
        .await
        .unwrap();
    s3.call("probe", "tester", "echo", "", &echo);
    s3.result("probe", WAIT).await.unwrap();
    let owed: Vec<String> = s3
        .take_results()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| id != "probe")
        .collect();
    assert!(owed.is_empty(), "results sent again: {owed:?}");
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_cloud_certificate_and_trusts_an_extra_ca() {
    let (cert, key) = self_signed_cert();
    let cloud = FakeCloud::start_tls(FakeCloudOptions::default(), &cert, &key).await;
    let endpoint = format!("https://localhost:{}", cloud.addr.port());

    // Without the CA: the handshake fails and nothing is sent.
    let dirs = TestDirs::new();
    let config = cloud_config(&dirs, &endpoint, &FakeCloudOptions::default().token, "");
    let agent = TestAgent::start(&dirs, &config).await;
    eventually(WAIT, "a certificate error in the log", || {
        let logs = captured_logs();
        logs.contains("TLS:") && logs.contains("localhost")
    })
    .await;
    assert_eq!(cloud.attempts(), 0, "an untrusted cloud received a request");
    agent.shutdown().await;

    // With it (cloud.ca_file): connected.
    let dirs = TestDirs::new();
    let ca = dirs.root.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let config = cloud_config(
        &dirs,
        &endpoint,
        &FakeCloudOptions::default().token,
        &format!("ca_file = {:?}", ca.display().to_string()),
    );
    let agent = TestAgent::start(&dirs, &config).await;
    let mut s = cloud.next_session(WAIT).await;
    s.inventory_where(WAIT, |_| true)
        .await
        .expect("an inventory over TLS");
    agent.shutdown().await;
}

/// A minimal HTTP CONNECT proxy that requires basic auth and records what it saw.
async fn connect_proxy(
    expected_auth: &'static str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                log.lock().unwrap().push(head.clone());
                let target = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let authorized = head.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("proxy-authorization:")
                        && l.ends_with(expected_auth)
                });
                if !authorized {
                    let _ = client.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n").await;
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_goes_through_an_http_connect_proxy_with_basic_auth() {
    // user "agent", password "p@ss:w/rd" (percent-encoded in the URL).
    let expected = "Basic YWdlbnQ6cEBzczp3L3Jk";
    let (proxy, seen) = connect_proxy(expected).await;
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let dirs = TestDirs::new();
    let proxy_setting = format!("proxy = \"http://agent:p%40ss%3Aw%2Frd@{proxy}\"");
    let agent = agent_for(&dirs, &cloud, &proxy_setting).await;
    let mut s = cloud.next_session(WAIT).await;
    s.inventory_where(WAIT, |_| true)
        .await
        .expect("an inventory through the proxy");
    let heads = seen.lock().unwrap().clone();
    assert!(
        heads[0].starts_with(&format!("CONNECT {} HTTP/1.1", cloud.addr)),
        "{heads:?}"
    );
    assert!(
        !captured_logs().contains("p@ss"),
        "the proxy password reached the log"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_new_cloud_settings_reconnects_and_keeps_unacknowledged_results() {
    let first = FakeCloud::start(FakeCloudOptions::default()).await;
    let second = FakeCloud::start(FakeCloudOptions::default()).await;
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let agent = agent_for(&dirs, &first, "").await;
    let mut s1 = first.next_session(WAIT).await;
    s1.inventory_where(WAIT, |i| is_ready(i, "tester"))
        .await
        .unwrap();
    // A result the first cloud receives but never acknowledges.
    s1.call("kept", "tester", "echo", "", &json!({"request": {"n": 1}}));
    s1.result("kept", WAIT).await.unwrap();
    let token = FakeCloudOptions::default().token;
    let reload = |endpoint: &str, extra: &str| {
        TestAgent::write_config(
            &dirs,
            &dirs.plugins(),
            &cloud_config(&dirs, endpoint, &token, extra),
        );
        agent.control.send(Control::Reload)
    };

    // Unusable new settings (a CA file with no certificate): the reload is refused with the
    // file named, and the running tunnel stays.
    let bad_ca = dirs.root.path().join("bad-ca.pem");
    std::fs::write(&bad_ca, "not a certificate").unwrap();
    reload(
        &format!("https://localhost:{}", second.addr.port()),
        &format!("ca_file = {:?}", bad_ca.display().to_string()),
    )
    .await
    .unwrap();
    eventually(WAIT, "the bad settings to be reported", || {
        // The reload error lists each issue on a line of its own.
        let logs = captured_logs();
        logs.contains("still running the previous configuration")
            && logs
                .lines()
                .any(|line| line.contains("cloud.ca_file") && line.contains("bad-ca.pem"))
    })
    .await;
    s1.call("still", "tester", "echo", "", &json!({}));
    assert!(
        s1.result("still", WAIT).await.is_some(),
        "the first tunnel still serves"
    );
    s1.ack("still");
    assert_eq!(second.attempts(), 0);

    // Good new settings: the agent moves to the second cloud, with the same id, and the
    // unacknowledged result follows it.
    reload(&second.endpoint(), "").await.unwrap();
    let mut s2 = second.next_session(WAIT).await;
    assert_eq!(s2.hello.agent_id, s1.hello.agent_id);
    let kept = s2
        .result("kept", WAIT)
        .await
        .expect("the unacknowledged result");
    assert_eq!(kept.json()["response"]["request"], json!({"n": 1}));
    s2.ack("kept");
    assert!(s1.ended(WAIT).await, "the first stream is closed");
    let (_, status) = agent.request(Method::GET, "/v1/status", None).await;
    assert_eq!(status["cloud"], "connected");

    // No [cloud] at all: standalone.
    TestAgent::write_config(&dirs, &dirs.plugins(), "");
    agent.control.send(Control::Reload).await.unwrap();
    assert!(s2.ended(WAIT).await, "the tunnel is closed");
    eventually_ok(WAIT, "the agent to stand alone", || async {
        let (_, status) = agent.request(Method::GET, "/v1/status", None).await;
        if status["cloud"] == "standalone" {
            Ok(())
        } else {
            Err(status)
        }
    })
    .await;
    assert_eq!(agent.shutdown().await, Stopped::Drained);
}

/// What a scripted cloud sends in the chunk-rules property: a chunk of one of three calls, or
/// a Cancel of one.
#[derive(Debug, Clone)]
enum ChunkOp {
    Chunk { call: u8, seq: u32, last: bool },
    Cancel { call: u8 },
}

/// What the proto's delivery rules say a call's results are, from a model of them.
#[derive(Debug, Default)]
struct Expected {
    /// Refusals stored before the call ran (each may be withdrawn unsent by the next).
    refusals: usize,
    /// The op (its index is the `request` echoed) that ran the call, and whether a Cancel of
    /// it came after (its result may then be the cancellation).
    ran: Option<(usize, bool)>,
    /// Complete attempts after it ran: each may have the stored result sent again.
    resends: usize,
}

/// The delivery rules of `proto/lumos/agent/v1/tunnel.proto`, for one stream whose results
/// are not acknowledged: chunks numbered from 0, a call refused part-way has its later chunks
/// dropped up to its last one (a chunk 0 or a Cancel ends that), a refusal is stored only
/// while the call has not run, and a call that ran is never run again.
fn delivery_model(ops: &[ChunkOp]) -> [Expected; 3] {
    let mut expected: [Expected; 3] = Default::default();
    // Per call: the chunk expected next of an attempt being received, and whether a refused
    // attempt's chunks are being dropped.
    let mut next: [Option<(u32, usize)>; 3] = [None; 3];
    let mut dropping = [false; 3];
    for (index, op) in ops.iter().enumerate() {
        let (call, seq, last) = match *op {
            ChunkOp::Cancel { call } => {
                let c = usize::from(call);
                next[c] = None;
                dropping[c] = false;
                if let Some((_, cancelled)) = &mut expected[c].ran {
                    *cancelled = true;
                }
                continue;
            }
            ChunkOp::Chunk { call, seq, last } => (usize::from(call), seq, last),
        };
        if dropping[call] {
            if seq != 0 {
                dropping[call] &= !last;
                continue;
            }
            dropping[call] = false;
        }
        let attempt = match next[call].take() {
            None if seq == 0 => index,
            Some((want, attempt)) if seq == want => attempt,
            _ => {
                // Refused: no chunk 0, or out of order.
                dropping[call] = !last;
                if expected[call].ran.is_none() {
                    expected[call].refusals += 1;
                }
                continue;
            }
        };
        if !last {
            next[call] = Some((seq + 1, attempt));
        } else if expected[call].ran.is_none() {
            expected[call].ran = Some((attempt, false));
        } else {
            expected[call].resends += 1;
        }
    }
    expected
}

/// The payload piece of a chunk: in-order pieces of an attempt make the envelope
/// `{"request": "<index of its chunk 0>x…"}` (one `x` per middle chunk), so an answer names
/// the attempt that ran. (The envelope denies unknown fields, so the padding stays inside.)
fn chunk_piece(index: usize, seq: u32, last: bool) -> Vec<u8> {
    match (seq, last) {
        (0, true) => format!(r#"{{"request": "{index}"}}"#),
        (0, false) => format!(r#"{{"request": "{index}"#),
        (_, false) => "x".into(),
        (_, true) => r#""}"#.into(),
    }
    .into_bytes()
}

/// One scripted case: its ops go out on the stream, then a sentinel refusal (a chunk 1 with no
/// chunk 0), which the session answers after everything sent before it. Then each call's
/// results, in the order they came, must be what the model allows: some of its refusals, then
/// the result of the attempt that ran (the first complete one), then only copies of it.
async fn chunk_rules_case(
    s: &mut CloudSession,
    case: usize,
    ops: &[ChunkOp],
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prop_assert;
    let id = |call: u8| format!("rules-{case}-{call}");
    let chunk = |call_id: String, seq: u32, last: bool, payload: Vec<u8>| CallRequest {
        call_id,
        app_id: "tester".into(),
        capability: "echo".into(),
        seq,
        last,
        payload: payload.into(),
        ..CallRequest::default()
    };
    for (index, op) in ops.iter().enumerate() {
        match *op {
            ChunkOp::Chunk { call, seq, last } => {
                s.send_chunk(chunk(id(call), seq, last, chunk_piece(index, seq, last)))
            }
            ChunkOp::Cancel { call } => s.cancel(&id(call)),
        }
    }
    let sentinel = format!("rules-{case}-sentinel");
    s.send_chunk(chunk(sentinel.clone(), 1, true, Vec::new()));

    let expected = delivery_model(ops);
    let mut seen: [Vec<AssembledResult>; 3] = Default::default();
    let mut sentinel_seen = false;
    // Each result is a moment away: a missing one fails the case without holding up shrinking.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Until the sentinel and every call that ran have answered.
    while !sentinel_seen
        || (0..3).any(|c| {
            expected[c].ran.is_some()
                && !seen[c]
                    .iter()
                    .any(|r| r.status != AGENT_ERROR || !is_refusal(r))
        })
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        prop_assert!(
            s.recv(left).await.is_some(),
            "the stream ended or results are missing; seen {:?}, expected {expected:?}",
            seen.iter().map(|r| shown(r)).collect::<Vec<_>>()
        );
        for (call_id, result) in s.take_results() {
            if call_id == sentinel {
                sentinel_seen = true;
            } else if let Some(c) = (0..3u8).find(|c| id(*c) == call_id) {
                seen[usize::from(c)].push(result);
            } else {
                prop_assert!(false, "a result for {call_id}, of no call of this case");
            }
        }
    }
    for c in 0..3 {
        let (results, expected) = (&seen[c], &expected[c]);
        let refusals = results.iter().take_while(|r| is_refusal(r)).count();
        let rest = &results[refusals..];
        match expected.ran {
            None => {
                prop_assert!(rest.is_empty(), "call {c} never ran: {:?}", shown(results));
                prop_assert!(
                    (1.min(expected.refusals)..=expected.refusals).contains(&refusals),
                    "call {c}: {refusals} refusals, {expected:?}: {:?}",
                    shown(results)
                );
            }
            Some((attempt, cancelled)) => {
                prop_assert!(
                    refusals <= expected.refusals,
                    "call {c}: {:?}, {expected:?}",
                    shown(results)
                );
                let ran = &rest[0];
                let request = ran.json()["response"]["request"].clone();
                let answered = ran.status == ANSWERED
                    && request
                        .as_str()
                        .is_some_and(|r| r.trim_end_matches('x') == attempt.to_string());
                prop_assert!(
                    answered || (cancelled && ran.status == AGENT_ERROR),
                    "call {c} should have run attempt {attempt}: {}",
                    String::from_utf8_lossy(&ran.data)
                );
                prop_assert!(
                    rest[1..].iter().all(|r| r == ran) && rest.len() - 1 <= expected.resends,
                    "call {c}: after its result, only copies of it, at most one per attempt \
                     sent again: {:?}, {expected:?}",
                    shown(results)
                );
            }
        }
    }
    // Acknowledged, so that the table does not keep every case's results.
    for c in 0..3 {
        s.ack(&id(c));
    }
    s.ack(&sentinel);
    Ok(())
}

/// Results as status and body text, for a failure message a person can read.
fn shown(results: &[AssembledResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| format!("{}: {}", r.status, String::from_utf8_lossy(&r.data)))
        .collect()
}

fn is_refusal(result: &AssembledResult) -> bool {
    result.status == AGENT_ERROR && result.json()["error"]["error_code"] == "agent.bad_request"
}

/// The session's chunk handling against a model of the proto's delivery rules, over generated
/// scripts of chunks (in order, out of order, without a chunk 0, re-sent, interleaved) and
/// Cancels of three calls on one stream: no call runs twice or runs an attempt the rules do
/// not run, none that the rules run goes unanswered, a refused one is answered with a refusal,
/// and the stream survives it all.
#[test]
fn chunks_in_any_order_follow_the_delivery_rules() {
    use proptest::prelude::*;
    let runtime = two_worker_runtime();
    let (dirs, cloud, agent, session) = runtime.block_on(async {
        let (dirs, cloud, config) = tester_cloud_and_short_grace().await;
        let agent = TestAgent::start(&dirs, &config).await;
        let mut s = cloud.next_session(WAIT).await;
        s.inventory_where(WAIT, |inv| is_ready(inv, "tester"))
            .await
            .unwrap();
        (dirs, cloud, agent, s)
    });
    let session = std::sync::Mutex::new(session);
    let cases = std::sync::atomic::AtomicUsize::new(0);
    let op = prop_oneof![
        8 => (0..3u8, prop_oneof![3 => Just(0u32), 2 => Just(1), 1 => Just(2)], prop::bool::weighted(0.4))
            .prop_map(|(call, seq, last)| ChunkOp::Chunk { call, seq, last }),
        1 => (0..3u8).prop_map(|call| ChunkOp::Cancel { call }),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&proptest::collection::vec(op, 1..24), |ops| {
        let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut s = session.lock().unwrap();
        runtime.block_on(chunk_rules_case(&mut s, case, &ops))
    });
    let s = session.into_inner().unwrap();
    runtime.block_on(async move {
        assert_eq!(s.id, 0, "the stream was never dropped");
        agent.shutdown().await;
        drop((s, cloud, dirs));
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

/// The fake cloud for connector developers, as the README runs it: the binary prints the
/// `[cloud]` section, an agent given it connects, and a call typed on the fake cloud's stdin is
/// answered on its stdout. A reader that goes away (`lumos-fake-cloud | head`) ends it quietly,
/// not with a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_cloud_binary_serves_a_call_typed_on_its_stdin() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let mut cloud = tokio::process::Command::new(workspace_bin("lumos-fake-cloud"))
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(dirs.root.path().join("fake-cloud-token"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = cloud.stdin.take().unwrap();
    let mut stdout = tokio::io::BufReader::new(cloud.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(WAIT, stdout.next_line())
            .await
            .expect("the fake cloud said nothing")
            .unwrap()
            .expect("the fake cloud's stdout ended")
    };
    // Its `[cloud]` section, as printed, is the agent's.
    let mut section = String::new();
    loop {
        let line = next_line().await;
        if line == "[cloud]" || !section.is_empty() {
            if line.is_empty() {
                break;
            }
            section.push_str(&line);
            section.push('\n');
        }
    }
    let agent = TestAgent::start(&dirs, &section).await;
    while !next_line().await.contains(" connected, session ") {}

    // As the README types it: `""` for no tenant, then the envelope.
    stdin
        .write_all(b"call tester echo \"\" {\"auth\":{\"oauth\":{\"access_token\":\"t\"}}}\n")
        .await
        .unwrap();
    while !next_line().await.starts_with("sending cli-1…") {}
    let header = next_line().await;
    assert!(
        header.starts_with("cli-1: connector answered, "),
        "{header}"
    );
    let answer: Value = serde_json::from_str(&next_line().await).unwrap();
    assert_eq!(
        answer["response"]["auth"]["oauth"]["access_token"], "t",
        "{answer}"
    );

    // A slow call does not hold up the prompt: it can be cancelled while it runs.
    let pid_file = dirs.root.path().join("slow.pid");
    let envelope = json!({"request": {"secs": 3600, "pid_file": pid_file}});
    stdin
        .write_all(format!("call tester sleep - {envelope}\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        next_line().await,
        "sending cli-2… (`cancel cli-2` stops it)"
    );
    let pid = pid_in(&pid_file).await;
    stdin
        .write_all(b"cancel cli-9\ncancel cli-2\n")
        .await
        .unwrap();
    assert_eq!(next_line().await, "no call cli-9 is waiting for its result");
    assert_eq!(
        next_line().await,
        "cancel sent for cli-2; its result follows"
    );
    let header = next_line().await;
    assert!(header.starts_with("cli-2: agent error, "), "{header}");
    let answer: Value = serde_json::from_str(&next_line().await).unwrap();
    assert_eq!(answer["error"]["error_code"], "agent.cancelled", "{answer}");
    eventually(WAIT, "the cancelled connector to be gone", move || {
        !process_alive(pid)
    })
    .await;

    // The reader goes away; the next line it would print ends it, with success.
    drop(stdout);
    stdin.write_all(b"inventory\n").await.unwrap();
    let status = tokio::time::timeout(WAIT, cloud.wait())
        .await
        .expect("the fake cloud did not end")
        .unwrap();
    let mut stderr = String::new();
    cloud
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    agent.shutdown().await;
}
