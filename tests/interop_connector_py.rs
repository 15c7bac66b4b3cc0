//! Interop with REAL Lumos connectors built with the public `connector-py` SDK
//! (`shared/interop/lumos-connector.sh`): as an executable behind a one-line wrapper script, and
//! as a real `connector compile-on-prem` bundle.
//!
//! The builds are cached in `$LUMOS_INTEROP_CACHE` (default `~/.cache/lumos-agent-interop`);
//! the first build needs python3 and the package registry and takes a few minutes.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::Command;

use hyper::StatusCode;
use lumos_agent_integration::*;
use serde_json::{json, Value};

/// Where the interop connector's API client points (baked in at build time, so fixed).
const APP_PORT: u16 = 47391;
/// The real connector's OAuth credential id (from its `credentials_schema`).
const CREDENTIAL_ID: &str = "demo_connector_oauth";

/// Builds the real connector (see [`connector_py_build`]).
fn build(mode: &str, subdir: &str, app_base_url: Option<&str>) -> PathBuf {
    connector_py_build(mode, subdir, app_base_url)
}

/// A tenant of the real connector: its OAuth credential, and the `account_id` setting it needs.
fn tenant(app_id: &str, token: &str, account_id: Option<&str>) -> Value {
    let settings = match account_id {
        Some(id) => json!({"account_id": id}),
        None => json!({}),
    };
    json!({"app_id": app_id, "settings": settings, "credentials": [{"id": CREDENTIAL_ID, "oauth": {"access_token": token}}]})
}

/// Runs the connector directly, the way the agent would, for comparison.
fn run_directly(exe: &Path, capability: &str, envelope: &Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(&input, envelope.to_string()).unwrap();
    let out = Command::new(exe)
        .args([capability, "--json-file", input.to_str().unwrap()])
        .current_dir(dir.path())
        .env("LUMOS_LOG_DIRECTORY", dir.path())
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_connector_py_executable_answers_through_the_agent() {
    let exe = build("exe", "demo", None);
    let dirs = TestDirs::new();
    install_connector_py(&dirs.plugins(), &exe);
    let agent = TestAgent::start(&dirs, "").await;

    let entry = agent.connector_by_file("demo-connector").await;
    assert_eq!(entry["status"], "ready", "{entry}");
    assert_eq!(entry["app_id"], "demo-connector");
    assert_eq!(entry["version"], "0.1.0");
    assert_eq!(entry["kind"], "executable");
    assert!(entry["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("validate_credentials")));

    // The stored tenant's credentials reach the real connector; they are what its
    // `credentials_schema` declares, so storing them raises no note.
    let stored = agent
        .put_tenant("acme", tenant("demo-connector", "py-token-1", Some("a1")))
        .await;
    assert_eq!(stored["notes"], json!([]), "{stored}");
    // A credential under another id is stored too, with notes read from that schema.
    let stored = agent
        .put_tenant(
            "mistyped",
            json!({"app_id": "demo-connector", "credentials": [
                {"id": "demo_oauth", "oauth": {"access_token": "py-token-1"}}]}),
        )
        .await;
    assert_eq!(
        stored["notes"],
        json!([
            "credential \"demo_oauth\" is not one demo-connector declares (\"demo_connector_oauth\" (oauth))",
            "demo-connector needs credential \"demo_connector_oauth\" (oauth), which is not stored"
        ]),
        "{stored}"
    );
    let (status, body) = agent
        .call(
            "demo-connector",
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["valid"], true);
    assert_eq!(
        body["response"]["unique_tenant_id"],
        token_hash("py-token-1")
    );

    // Its own error document passes through unchanged.
    agent
        .put_tenant("no-settings", tenant("demo-connector", "py-token-1", None))
        .await;
    let (status, body) = agent
        .call(
            "demo-connector",
            "validate_credentials",
            json!({"tenant_id": "no-settings"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a connector's error is its answer, not an agent failure: {body}"
    );
    let direct = run_directly(
        &exe,
        "validate_credentials",
        &json!({"request": {}, "settings": {}, "credentials": [{"id": CREDENTIAL_ID, "oauth": {"access_token": "py-token-1"}}]}),
    );
    assert_eq!(body["error"], direct["error"]);
    assert_eq!(body["error"]["error_code"], "bad_request");

    // connector-py wrote its log into the agent's connector-log folder, not next to the connector.
    let logs = dirs.state().join("logs/connectors");
    let logged: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        logged
            .iter()
            .any(|n| n.to_string_lossy().starts_with("demo-connector")),
        "{logged:?}"
    );
    assert!(!dirs.plugins().join("logs").exists());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_refreshable_error_passes_through_verbatim() {
    let exe = build(
        "exe",
        "demo-app",
        Some(&format!("http://127.0.0.1:{APP_PORT}")),
    );
    // The app the connector calls: every token is expired.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", APP_PORT))
        .await
        .unwrap_or_else(|e| panic!("port {APP_PORT} (baked into the interop build) is taken: {e}"));
    let app = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let body = r#"{"error":"token expired"}"#;
                let reply = format!("HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    let dirs = TestDirs::new();
    install_connector_py(&dirs.plugins(), &exe);
    let agent = TestAgent::start(&dirs, "").await;
    agent
        .put_tenant(
            "expired",
            tenant("demo-connector", "expired-token", Some("a1")),
        )
        .await;
    let (status, body) = agent
        .call(
            "demo-connector",
            "validate_credentials",
            json!({"tenant_id": "expired"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["is_error"], true, "{body}");
    assert_eq!(
        body["error"]["error_metadata"]["refreshable"], true,
        "{body}"
    );
    assert_eq!(body["error"]["status_code"], 401);
    assert_eq!(body["error"]["error_code"], "unauthorized");
    agent.shutdown().await;
    app.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_compile_on_prem_bundle_is_unpacked_and_answers() {
    let bundle = build("bundle", "demo", None);
    let dirs = TestDirs::new();
    let name = bundle.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::copy(&bundle, dirs.plugins().join(format!(".{name}.copying"))).unwrap();
    std::fs::rename(
        dirs.plugins().join(format!(".{name}.copying")),
        dirs.plugins().join(&name),
    )
    .unwrap();
    let agent = TestAgent::start(&dirs, "").await;

    let entry = agent.connector_by_file(&name).await;
    assert_eq!(entry["status"], "ready", "{entry}");
    assert_eq!(entry["kind"], "bundle");
    // Served under the app_id of its metadata.toml, which compile-on-prem writes.
    let app_id = entry["app_id"].as_str().unwrap().to_string();
    assert_eq!(app_id, "demo_connector_on_prem");
    assert_eq!(entry["version"], "0.1.0");

    agent
        .put_tenant("acme", tenant(&app_id, "bundle-token", Some("a1")))
        .await;
    let (status, body) = agent
        .call(
            &app_id,
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["response"]["unique_tenant_id"],
        token_hash("bundle-token")
    );
    agent.shutdown().await;
}
