//! Calls through the tunnel, measured from the cloud's side, against a bare tonic responder on
//! the same stream protocol in the same run; and the agent's memory while relaying a 100 MB
//! result.
//!
//! ```text
//! cargo bench -p lumos-agent-integration --bench tunnel_throughput [-- CALLS] [rounds=N] [throughput-only] [in-process-only] [baseline-only] [agent-only] [c64-only] [no-log]
//! ```
//! The agent logs as the daemon does by default (`info`, human lines), to /dev/null.
//! At concurrency 64 every subject runs once per round (5 by default), in turn, and a row
//! gives its median; its ratio to the baseline is the median of the per-round ratios.
//! - Throughput and p50/p99 latency at concurrency 1 and 64 of `validate_credentials` on the
//!   Rust cdylib example, in-process and in a worker, through the real agent; the baseline is
//!   a bare tonic client that answers every CallRequest at once with a CallResult of the same
//!   size (the tunnel with nothing behind it).
//!   Target (issue 5): in-process at concurrency 64 ≥ 0.7× the baseline's calls per second.
//! - A reference row with no agent at all: the bare client doing the example connector's own
//!   work (`lumos_example_connector::handle`, with the JSON parse and serialisation the plugin
//!   does) for each call before it answers. What the connector alone costs on this machine.
//! - Peak RSS growth of this process (the agent, the fake cloud discarding the data it
//!   receives) while a connector's 100 MB answer is relayed. Target: ≤ 32 MB.
#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lumos_agent_integration::fake_cloud::{CloudSession, FakeCloud, FakeCloudOptions};
use lumos_agent_integration::*;
use lumos_agent_proto::v1::agent_tunnel_client::AgentTunnelClient;
use lumos_agent_proto::v1::{agent_message, cloud_message, AgentMessage, CallResult, Hello};
use serde_json::json;

const PAYLOAD: &str = r#"{"request":{},"auth":{"oauth":{"access_token":"bench-token"}}}"#;

fn p(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

struct Run {
    calls_per_sec: f64,
    p50: Duration,
    p99: Duration,
    /// Process CPU time (user + system, both sides: cloud and agent) per call.
    cpu_per_call: Duration,
    /// How busy each runtime worker was during the run (0..1): one saturated worker and one
    /// idle one means a serial stage, not the CPU, limits the rate.
    worker_busy: Vec<f64>,
}

fn worker_busy_times() -> Vec<Duration> {
    let metrics = tokio::runtime::Handle::current().metrics();
    (0..metrics.num_workers())
        .map(|w| metrics.worker_total_busy_duration(w))
        .collect()
}

/// User + system CPU time of this process so far (`/proc/self/stat`, in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based, whole line).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Sends `calls` calls keeping `concurrency` outstanding; acks each result.
async fn drive(s: &mut CloudSession, app_id: &str, calls: usize, concurrency: usize) -> Run {
    let payload: serde_json::Value = serde_json::from_str(PAYLOAD).unwrap();
    let mut sent = 0;
    let mut outstanding: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(calls);
    let started = Instant::now();
    let cpu_before = cpu_time();
    let busy_before = worker_busy_times();
    while latencies.len() < calls {
        while outstanding.len() < concurrency && sent < calls {
            // Ids are unique across runs: the agent refuses to run an id twice.
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let id = format!(
                "b{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            outstanding.insert(id.clone(), Instant::now());
            s.call(&id, app_id, "validate_credentials", "", &payload);
            sent += 1;
        }
        s.recv(Duration::from_secs(60)).await.expect("results");
        for (id, result) in s.take_results() {
            assert_eq!(
                result.status,
                1,
                "{}",
                String::from_utf8_lossy(&result.data)
            );
            if let Some(at) = outstanding.remove(&id) {
                latencies.push(at.elapsed());
                s.ack(&id);
            }
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let worker_busy = worker_busy_times()
        .iter()
        .zip(&busy_before)
        .map(|(after, before)| after.saturating_sub(*before).as_secs_f64() / elapsed.as_secs_f64())
        .collect();
    latencies.sort();
    Run {
        cpu_per_call: cpu / u32::try_from(calls).unwrap(),
        calls_per_sec: calls as f64 / elapsed.as_secs_f64(),
        p50: p(&latencies, 0.5),
        p99: p(&latencies, 0.99),
        worker_busy,
    }
}

/// What the bare client answers.
#[derive(Clone)]
enum Reply {
    /// These bytes, at once (the baseline).
    Canned(bytes::Bytes),
    /// What the example connector answers, computed in the read loop (the reference row).
    Connector,
}

/// A bare tonic client on the tunnel protocol that answers every call with `reply`.
async fn bare_responder(cloud: &FakeCloud, reply: Reply) {
    let channel = tonic::transport::Endpoint::from_shared(cloud.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1024);
    tx.send(AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            agent_id: "bare".into(),
            ..Hello::default()
        })),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", FakeCloudOptions::default().token)
            .parse()
            .unwrap(),
    );
    let mut inbound = AgentTunnelClient::new(channel)
        .connect(request)
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = inbound.message().await {
            if let Some(cloud_message::Message::CallRequest(req)) = msg.message {
                if req.last {
                    let data = match &reply {
                        Reply::Canned(bytes) => bytes.clone(),
                        Reply::Connector => {
                            let input = lumos_example_connector::parse_input(&req.payload).unwrap();
                            let answer =
                                lumos_example_connector::handle("validate_credentials", &input)
                                    .unwrap();
                            bytes::Bytes::from(lumos_example_connector::to_bytes(&answer))
                        }
                    };
                    let result = CallResult {
                        call_id: req.call_id,
                        seq: 0,
                        data,
                        last: true,
                        status: 1,
                    };
                    let out = AgentMessage {
                        message: Some(agent_message::Message::CallResult(result)),
                    };
                    if tx.send(out).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`).
fn proc_status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Prints a row; `ratio`: (median, lowest, highest) over the rounds of calls per second
/// against the baseline's.
fn print_row(name: &str, concurrency: usize, run: &Run, ratio: Option<(f64, f64, f64)>) {
    let ratio = ratio.map_or(String::new(), |(median, low, high)| {
        if low == high {
            format!("  {median:.2}× baseline")
        } else {
            format!("  {median:.2}× baseline ({low:.2}–{high:.2})")
        }
    });
    let busy: Vec<String> = run
        .worker_busy
        .iter()
        .map(|b| format!("{:.0}%", b * 100.0))
        .collect();
    println!(
        "{name:<22} c={concurrency:<3} {:>9.0} calls/s  p50 {:>8.1} µs  p99 {:>8.1} µs  cpu {:>5.1} µs/call  workers busy {}{ratio}",
        run.calls_per_sec,
        run.p50.as_secs_f64() * 1e6,
        run.p99.as_secs_f64() * 1e6,
        run.cpu_per_call.as_secs_f64() * 1e6,
        busy.join("/")
    );
}

async fn agent_session(dirs: &TestDirs, extra: &str) -> (FakeCloud, TestAgent, CloudSession) {
    let cloud = FakeCloud::start(cloud_options()).await;
    let token = dirs.root.path().join("token");
    write_private(&token, &FakeCloudOptions::default().token);
    let config = format!(
        "[calls]\nmax_concurrency = 128\n[cloud]\nendpoint = {:?}\nallow_insecure = true\ntoken_file = {:?}\nmax_concurrent_calls = 128\n{extra}\n",
        cloud.endpoint(),
        token.display().to_string()
    );
    let agent = TestAgent::start(dirs, &config).await;
    let mut s = cloud.next_session(Duration::from_secs(60)).await;
    s.inventory_where(Duration::from_secs(60), |i| {
        i.connectors.iter().any(|c| c.status == 1)
    })
    .await
    .unwrap();
    (cloud, agent, s)
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn cloud_options() -> FakeCloudOptions {
    FakeCloudOptions {
        max_chunk_size: 1 << 20,
        heartbeat_interval_ms: 5000,
        ..FakeCloudOptions::default()
    }
}

/// One thing measured: a cloud session `drive` sends calls on, and what keeps it running.
struct Subject {
    name: &'static str,
    app_id: &'static str,
    session: CloudSession,
    /// The fake cloud `session` is a stream of.
    _cloud: FakeCloud,
    /// The agent and its folders; `None` for a bare client.
    agent: Option<(TestAgent, TestDirs)>,
    /// Its runs at concurrency 64, one per round.
    c64: Vec<Run>,
}

/// A bare client answering with `reply`, warmed up.
async fn bare_subject(name: &'static str, reply: Reply) -> Subject {
    let cloud = FakeCloud::start(cloud_options()).await;
    bare_responder(&cloud, reply).await;
    let mut session = cloud.next_session(Duration::from_secs(30)).await;
    drive(&mut session, "x", 200, 8).await;
    Subject {
        name,
        app_id: "x",
        session,
        _cloud: cloud,
        agent: None,
        c64: Vec::new(),
    }
}

/// The real agent with the Rust cdylib example (`extra`: its connector config), warmed up.
async fn agent_subject(name: &'static str, extra: &str) -> Subject {
    let dirs = TestDirs::new();
    install_plugin(
        &dirs.plugins(),
        &native_lib("liblumos_example_cdylib.so"),
        "liblumos_example_cdylib.so",
    );
    let (cloud, agent, mut session) = agent_session(&dirs, extra).await;
    drive(&mut session, "lumos_example_cdylib", 200, 8).await;
    Subject {
        name,
        app_id: "lumos_example_cdylib",
        session,
        _cloud: cloud,
        agent: Some((agent, dirs)),
        c64: Vec::new(),
    }
}

/// The value of a `name=value` option.
fn option(name: &str) -> Option<usize> {
    std::env::args().find_map(|a| a.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

fn main() {
    let calls: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    // The daemon's log, as it ships (`log.level = "info"`, human lines), written to /dev/null:
    // what the agent logs per call costs CPU on the call path (a line per call cost a fifth
    // of the throughput). `LUMOS_BENCH_LOG_LEVEL` sets another filter; `no-log` installs none.
    // (journald costs more per line than /dev/null: this is the least a line costs.)
    if !std::env::args().any(|a| a == "no-log") {
        let log = lumos_agent::config::LogConfig {
            level: std::env::var("LUMOS_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            format: lumos_agent::config::LogFormat::Human,
            connector_log_days: 14,
        };
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        lumos_agent::telemetry::init_with_writer(
            &log,
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(null)),
            false,
        );
    }
    // The agent's own runtime settings, shared by every subject (the baselines too).
    let runtime = two_worker_runtime();
    // The bench runs as a task on the runtime's two workers, like the agent and the fake cloud:
    // driven from `block_on` instead, it was a third thread on two cores, parked and woken by
    // a futex for every batch of results (a third of all futex calls of an agent run).
    runtime.block_on(async { tokio::spawn(run(calls)).await.unwrap() });
}

/// The median of `values` (sorted in place).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Options (any order, after `--`): a number of calls; `rounds=N` (default 5) runs at
/// concurrency 64; `throughput-only` skips the relay, `in-process-only` the worker runs,
/// `baseline-only` everything after the baselines, `agent-only` the baselines, `c64-only` the
/// runs at concurrency 1 (the last three for profiling); `no-log` installs no log subscriber.
///
/// Every subject (the bare client, the reference, the agent in-process and in a worker) is
/// started first; then each round runs each of them at concurrency 64 in turn. A subject's
/// ratio is the median of its per-round ratios to the bare client's run of the same round: the
/// machine's drift (a neighbour on the host, frequency changes) moves both runs of a round
/// alike, where measuring the baseline once and the agent afterwards caught different moments.
async fn run(calls: usize) {
    let rounds = option("rounds").unwrap_or(5).max(1);
    println!(
        "{calls} calls per run at c=64 ({rounds} rounds, medians), {} at c=1; 2 runtime threads, \
         event interval {}",
        calls / 5,
        lumos_agent::daemon::EVENT_INTERVAL
    );
    let mut subjects = Vec::new();
    if !flag("agent-only") {
        // The connector's answer, for the baseline to send the same bytes.
        let answer = bytes::Bytes::from(
            json!({"response": {"valid": true, "unique_tenant_id": "0123456789abcdef"}, "page": null, "raw_data": null})
                .to_string(),
        );
        subjects.push(bare_subject("bare tonic responder", Reply::Canned(answer)).await);
        subjects.push(bare_subject("responder + connector", Reply::Connector).await);
    }
    if !flag("baseline-only") {
        subjects.push(
            agent_subject(
                "agent, in-process",
                "[connectors.lumos_example_cdylib]\nin_process = true",
            )
            .await,
        );
        if !flag("in-process-only") {
            subjects.push(agent_subject("agent, worker", "").await);
        }
    }
    let has_baseline = !flag("agent-only");

    if !flag("c64-only") {
        let mut base1 = None;
        for (i, subject) in subjects.iter_mut().enumerate() {
            // The reference row is a c=64 comparison only.
            if has_baseline && i == 1 {
                continue;
            }
            let run = drive(&mut subject.session, subject.app_id, calls / 5, 1).await;
            let ratio = base1
                .as_ref()
                .map(|b: &Run| run.calls_per_sec / b.calls_per_sec);
            print_row(subject.name, 1, &run, ratio.map(|r| (r, r, r)));
            if has_baseline && i == 0 {
                base1 = Some(run);
            }
        }
    }

    for _ in 0..rounds {
        for subject in &mut subjects {
            let run = drive(&mut subject.session, subject.app_id, calls, 64).await;
            subject.c64.push(run);
        }
    }
    for (i, subject) in subjects.iter().enumerate() {
        let ratio = (has_baseline && i > 0).then(|| {
            let mut ratios: Vec<f64> = (0..rounds)
                .map(|r| subject.c64[r].calls_per_sec / subjects[0].c64[r].calls_per_sec)
                .collect();
            let m = median(&mut ratios);
            (m, ratios[0], ratios[rounds - 1])
        });
        let mut by_rate: Vec<&Run> = subject.c64.iter().collect();
        by_rate.sort_by(|a, b| a.calls_per_sec.total_cmp(&b.calls_per_sec));
        print_row(subject.name, 64, by_rate[rounds / 2], ratio);
    }
    for subject in subjects {
        if let Some((agent, _dirs)) = subject.agent {
            agent.shutdown().await;
        }
    }

    if flag("throughput-only") || flag("baseline-only") {
        return;
    }
    // 100 MB relayed: peak RSS growth of this process.
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let (_cloud, agent, mut s) = agent_session(&dirs, "").await;
    s.discard_data(true);
    // Warm up the path (spool, chunking) with a small large result.
    s.call(
        "warm",
        "tester",
        "big",
        "",
        &json!({"request": {"bytes": 4 << 20}}),
    );
    s.result("warm", Duration::from_secs(120)).await.unwrap();
    s.ack("warm");
    // Reset the peak to the current RSS (Linux: clear_refs 5), then relay 100 MB.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = proc_status_kb("VmRSS");
    let started = Instant::now();
    s.call(
        "huge",
        "tester",
        "big",
        "",
        &json!({"request": {"bytes": 100 << 20}}),
    );
    let result = s.result("huge", Duration::from_secs(600)).await.unwrap();
    let elapsed = started.elapsed();
    s.ack("huge");
    let peak = proc_status_kb("VmHWM");
    assert!(result.len > 100 << 20, "{}", result.len);
    println!(
        "100 MB result relayed in {:.2} s ({} chunks): RSS before {} MB, peak {} MB, growth {:.1} MB (target ≤ 32 MB)",
        elapsed.as_secs_f64(),
        result.chunks,
        before / 1024,
        peak / 1024,
        (peak.saturating_sub(before)) as f64 / 1024.0
    );
    agent.shutdown().await;
}
