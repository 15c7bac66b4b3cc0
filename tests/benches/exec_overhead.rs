//! Per-call overhead of the agent's executable path (local API → dispatch → tenant injection →
//! secret input file → process group → output check → HTTP answer) over spawning the same
//! executable directly from a Rust loop, in the same run.
//!
//! ```text
//! cargo bench -p lumos-agent-integration --bench exec_overhead [-- ITERATIONS]
//! ```
//!
//! The two paths are interleaved call by call so machine noise hits both alike. Target (issue
//! 2): the agent adds at most 1 ms at p50.
#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::process::Stdio;
use std::time::{Duration, Instant};

use lumos_agent_integration::{install_plugin, TestAgent, TestDirs};
use serde_json::json;

const CONNECTOR: &str = env!("CARGO_BIN_EXE_lumos-test-connector");

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(name: &str, samples: &mut [Duration]) -> Duration {
    samples.sort();
    let p50 = percentile(samples, 0.50);
    println!(
        "{name:<28} p50 {:>8.3} ms   p90 {:>8.3} ms   p99 {:>8.3} ms   (n = {})",
        p50.as_secs_f64() * 1e3,
        percentile(samples, 0.90).as_secs_f64() * 1e3,
        percentile(samples, 0.99).as_secs_f64() * 1e3,
        samples.len()
    );
    p50
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(400);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dirs = TestDirs::new();
        install_plugin(&dirs.plugins(), std::path::Path::new(CONNECTOR), "bench");
        let agent = TestAgent::start(&dirs, "[log]\nlevel = \"warn\"\n").await;
        agent.put_tenant("t", json!({"app_id": "bench", "settings": {"region": "eu"}, "auth": {"oauth": {"access_token": "bench-token"}}})).await;

        // The direct baseline gets the same envelope, by file, as the agent sends.
        let scratch = tempfile::tempdir().unwrap();
        let input = scratch.path().join("in.json");
        let envelope = json!({"request": {}, "settings": {"region": "eu"}, "auth": {"oauth": {"access_token": "bench-token"}}, "page": null, "include_raw_data": false});
        std::fs::write(&input, envelope.to_string()).unwrap();
        let direct = || {
            let input = input.clone();
            async move {
                let started = Instant::now();
                let out = tokio::process::Command::new(CONNECTOR)
                    .args(["echo", "--json-file", input.to_str().unwrap()])
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .unwrap();
                let elapsed = started.elapsed();
                assert!(out.status.success());
                serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
                elapsed
            }
        };
        let via_agent = || async {
            let started = Instant::now();
            let (status, body) = agent.call("bench", "echo", json!({"tenant_id": "t"})).await;
            let elapsed = started.elapsed();
            assert_eq!(status, hyper::StatusCode::OK, "{body}");
            assert_eq!(body["response"]["auth"]["oauth"]["access_token"], "bench-token");
            elapsed
        };

        for _ in 0..20 {
            direct().await;
            via_agent().await;
        }
        let mut direct_samples = Vec::with_capacity(iterations);
        let mut agent_samples = Vec::with_capacity(iterations);
        for i in 0..iterations {
            // Alternate which goes first so neither always follows the other.
            if i % 2 == 0 {
                direct_samples.push(direct().await);
                agent_samples.push(via_agent().await);
            } else {
                agent_samples.push(via_agent().await);
                direct_samples.push(direct().await);
            }
        }
        println!("executable call overhead, concurrency 1, {iterations} interleaved iterations");
        let base = report("direct spawn (baseline)", &mut direct_samples);
        let full = report("through the agent's API", &mut agent_samples);
        let overhead = full.as_secs_f64() - base.as_secs_f64();
        println!("added by the agent at p50: {:.3} ms (target <= 1 ms): {}", overhead * 1e3, if overhead <= 1e-3 { "MET" } else { "MISSED" });
        agent.shutdown().await;
    });
}
