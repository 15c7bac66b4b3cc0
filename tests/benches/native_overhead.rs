//! Per-call cost of native (cdylib) connector calls through the C ABI, in-process and in a
//! worker process, against a direct Rust call of the same function, in the same run, at
//! concurrency 1 and 16.
//!
//! ```text
//! cargo bench -p lumos-agent-integration --bench native_overhead [-- CALLS]
//! ```
//! Targets (issue 3): in-process adds ≤ 5 µs p50 over the direct call; the worker adds
//! ≤ 100 µs p50 over in-process.
#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lumos_agent::exec::ProcessEnv;
use lumos_agent::native::{InProcessConnector, WorkerConnector, WorkerSettings};
use lumos_agent::redact::SecretSpans;
use lumos_agent::stop::CallStop;
use lumos_agent_integration::native_lib;
use tokio_util::sync::CancellationToken;

const WORKER: &str = env!("CARGO_BIN_EXE_lumos-plugin-host");
const INPUT: &[u8] = br#"{"request":{},"settings":{},"auth":{"oauth":{"access_token":"bench-token"}},"page":null,"include_raw_data":false}"#;
/// Where INPUT's secrets are, as the dispatcher would have recorded them when rendering it.
static SECRETS: std::sync::LazyLock<SecretSpans> =
    std::sync::LazyLock::new(|| SecretSpans::find(INPUT));

/// What the example cdylib does per call, called directly.
fn direct(input: &[u8]) -> Vec<u8> {
    let input = lumos_example_connector::parse_input(input).unwrap();
    let answer = lumos_example_connector::handle("validate_credentials", &input).unwrap();
    lumos_example_connector::to_bytes(&answer)
}

/// One token for every call: allocating one per call would be measured as ABI cost.
fn never() -> CallStop<'static> {
    static NEVER: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();
    CallStop::by(NEVER.get_or_init(CancellationToken::new))
}

fn p(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let (p50, p99) = (p(&samples, 0.5), p(&samples, 0.99));
    println!(
        "  {name:<26} p50 {:>9.2} µs   p99 {:>9.2} µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    p50
}

/// Runs `calls` calls of `f` from `concurrency` tasks; returns every call's latency.
async fn measure<F, Fut>(calls: usize, concurrency: usize, f: Arc<F>) -> Vec<Duration>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(calls / concurrency);
            for _ in 0..calls / concurrency {
                let started = Instant::now();
                f().await;
                out.push(started.elapsed());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn main() {
    let calls: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let library = native_lib("liblumos_example_cdylib.so");
        let scratch = tempfile::tempdir().unwrap();
        let (inproc, _) = InProcessConnector::load(&library).unwrap();
        let settings = WorkerSettings {
            program: PathBuf::from(WORKER),
            env: ProcessEnv::for_connector(scratch.path().to_path_buf(), scratch.path(), "INFO", &[]),
                        max_output_bytes: 1 << 20,
            start_timeout: Duration::from_secs(10),
            metrics: Arc::new(lumos_agent::metrics::Metrics::new()),
        };
        let (worker, _) = WorkerConnector::start(&library, settings).await.unwrap();
        let (inproc, worker) = (Arc::new(inproc), Arc::new(worker));
        let expected = direct(INPUT);
        let timeout = Duration::from_secs(10);

        // The three paths give the same answer.
        assert_eq!(&inproc.call("validate_credentials", INPUT, &SECRETS, timeout, never()).await.unwrap()[..], &expected[..]);
        assert_eq!(&worker.call("validate_credentials", INPUT, &SECRETS, timeout, never()).await.unwrap()[..], &expected[..]);

        // Warm up every path (allocator, caches, the worker's pipes) before measuring.
        for _ in 0..2_000 {
            std::hint::black_box(direct(INPUT));
            inproc.call("validate_credentials", INPUT, &SECRETS, timeout, never()).await.unwrap();
            worker.call("validate_credentials", INPUT, &SECRETS, timeout, never()).await.unwrap();
        }
        println!("native call cost, example cdylib validate_credentials, {calls} calls per row");
        for concurrency in [1usize, 16] {
            println!("concurrency {concurrency}:");
            let direct_samples = measure(calls, concurrency, Arc::new(|| async {
                std::hint::black_box(direct(std::hint::black_box(INPUT)));
            }))
            .await;
            let inproc_samples = {
                let c = inproc.clone();
                measure(calls, concurrency, Arc::new(move || {
                    let c = c.clone();
                    async move {
                        std::hint::black_box(c.call("validate_credentials", INPUT, &SECRETS, timeout, never()).await.unwrap());
                    }
                }))
                .await
            };
            let worker_samples = {
                let c = worker.clone();
                measure(calls, concurrency, Arc::new(move || {
                    let c = c.clone();
                    async move {
                        std::hint::black_box(c.call("validate_credentials", INPUT, &SECRETS, timeout, never()).await.unwrap());
                    }
                }))
                .await
            };
            let d = report("direct Rust call", direct_samples);
            let i = report("in-process (C ABI)", inproc_samples);
            let w = report("worker process", worker_samples);
            let added_in = i.as_secs_f64() - d.as_secs_f64();
            let added_worker = w.as_secs_f64() - i.as_secs_f64();
            println!(
                "  in-process adds {:.2} µs p50 (target <= 5): {}; worker adds {:.2} µs p50 over in-process (target <= 100): {}",
                added_in * 1e6,
                if added_in <= 5e-6 { "MET" } else { "MISSED" },
                added_worker * 1e6,
                if added_worker <= 100e-6 { "MET" } else { "MISSED" },
            );
        }
    });
}
