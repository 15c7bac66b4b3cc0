//! Interop with a cloud written in Python `grpcio`: stubs generated from `proto/` by
//! `grpcio-tools` at test time, a real grpcio server accepting the real agent, receiving its
//! inventory, sending calls (one chunked) and acknowledging results.
//!
//! Needs python3 (>= 3.10, with venv). The first run installs grpcio and grpcio-tools from
//! PyPI into `~/.cache/lumos-agent-interop/grpc-venv` (`.ci/run` does it up front).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lumos_agent_integration::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const TOKEN: &str = "grpcio-cloud-agent-token";

fn grpc_python() -> PathBuf {
    if let Some(python) = std::env::var_os("LUMOS_GRPC_PYTHON") {
        return PathBuf::from(python);
    }
    interop_python("grpc-venv", "grpc, grpc_tools", &["grpcio", "grpcio-tools"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_cloud_accepts_the_agent_and_runs_calls() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new(grpc_python());
    command
        .arg(here.join("python/grpcio_cloud.py"))
        .arg(here.join("../proto"))
        .arg(TOKEN);
    let mut cloud = PeerProcess::start(command);
    let port = cloud.port;

    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let token_file = dirs.root.path().join("token");
    write_private(&token_file, TOKEN);
    let config = format!(
        "[cloud]\nendpoint = \"http://127.0.0.1:{port}\"\nallow_insecure = true\ntoken_file = {:?}\ncluster_id = \"py\"\nbackoff_initial_ms = 100\nbackoff_max_secs = 2\n",
        token_file.display().to_string()
    );
    let agent = TestAgent::start(&dirs, &config).await;

    // The receiver moves to a blocking thread; the peer keeps a closed one.
    let rx = std::mem::replace(&mut cloud.lines, std::sync::mpsc::channel().1);
    let report_line = tokio::task::spawn_blocking(move || loop {
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(line) if line.starts_with("REPORT ") => return line,
            Ok(_) => continue,
            Err(e) => panic!("no report from the Python cloud: {e}"),
        }
    })
    .await
    .unwrap();
    let report: Value = serde_json::from_str(report_line.strip_prefix("REPORT ").unwrap()).unwrap();
    let _ = cloud.child.wait();
    assert_eq!(report["errors"], serde_json::json!([]), "{report:#}");

    let hello = &report["hello"];
    assert_eq!(hello["cluster_id"], "py");
    assert_eq!(hello["protocol_version"], 1);
    assert_eq!(hello["agent_id"].as_str().unwrap().len(), 36);
    let example = report["inventory"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["app_id"] == "lumos_example")
        .unwrap();
    assert_eq!(example["status"], "CONNECTOR_STATUS_READY");
    assert_eq!(example["kind"], "CONNECTOR_KIND_EXECUTABLE");
    assert!(example["capabilities"]
        .as_array()
        .unwrap()
        .contains(&"list_accounts".into()));

    let results = &report["results"];
    let validated = &results["py-1"];
    assert_eq!(validated["status"], "CALL_STATUS_CONNECTOR_ANSWERED");
    let digest = hex::encode(Sha256::digest(b"grpcio-interop-token"));
    assert_eq!(
        validated["document"]["response"]["unique_tenant_id"],
        &digest[..16]
    );
    let listed = &results["py-2"];
    assert_eq!(listed["status"], "CALL_STATUS_CONNECTOR_ANSWERED");
    assert_eq!(listed["document"]["response"].as_array().unwrap().len(), 2);
    let unknown = &results["py-3"];
    assert_eq!(unknown["status"], "CALL_STATUS_AGENT_ERROR");
    assert_eq!(
        unknown["document"]["error"]["error_code"],
        "agent.unknown_connector"
    );
    assert_eq!(report["agent_heartbeat"], true);
    agent.shutdown().await;
}
