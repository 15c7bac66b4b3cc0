//! Time from `rename` of a connector into the plugins folder to `ready` in `GET /v1/connectors`,
//! with the default debounce, for the Rust executable and the Rust cdylib examples.
//!
//! ```text
//! cargo bench -p lumos-agent-integration --bench reload_latency [-- ROUNDS]
//! ```
//! Target (issue 4): at most 1 s median.
#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::path::Path;
use std::time::{Duration, Instant};

use lumos_agent_integration::{native_lib, TestAgent, TestDirs};

const EXE: &str = env!("CARGO_BIN_EXE_lumos-test-connector");

async fn ready(agent: &TestAgent, file: &str) -> bool {
    agent
        .entries_for_file(file)
        .await
        .first()
        .is_some_and(|e| e["status"] == "ready")
}

async fn gone(agent: &TestAgent, file: &str) -> bool {
    agent.entries_for_file(file).await.is_empty()
}

/// Renames a staged copy of `source` into the folder and times until it is ready; then removes
/// it and waits until it is gone, so every round starts from the same inventory.
async fn round(agent: &TestAgent, plugins: &Path, source: &Path, name: &str) -> Duration {
    let staged = plugins.join(format!(".{name}.part"));
    std::fs::copy(source, &staged).unwrap();
    let started = Instant::now();
    std::fs::rename(&staged, plugins.join(name)).unwrap();
    while !ready(agent, name).await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(plugins.join(name)).unwrap();
    while !gone(agent, name).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    elapsed
}

fn report(kind: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let median = samples[samples.len() / 2];
    println!(
        "{kind:<22} median {:>7.1} ms   min {:>7.1} ms   max {:>7.1} ms   (n = {}; target median <= 1000 ms: {})",
        median.as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len(),
        if median <= Duration::from_secs(1) { "MET" } else { "MISSED" }
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dirs = TestDirs::new();
                // Default debounce and rescan interval.
        let agent = TestAgent::start(&dirs, "[log]\nlevel = \"warn\"\n").await;
        let plugins = dirs.plugins();
        let cdylib = native_lib("liblumos_example_cdylib.so");
        let mut exe_samples = Vec::new();
        let mut cdylib_samples = Vec::new();
        for i in 0..rounds {
            exe_samples.push(round(&agent, &plugins, Path::new(EXE), &format!("exe{i}")).await);
            cdylib_samples.push(round(&agent, &plugins, &cdylib, &format!("lib{i}.so")).await);
        }
        println!("rename into the plugins folder -> ready in GET /v1/connectors, default debounce (200 ms)");
        report("Rust executable", exe_samples);
        report("Rust cdylib (worker)", cdylib_samples);
        agent.shutdown().await;
    });
}
