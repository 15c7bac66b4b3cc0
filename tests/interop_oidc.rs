//! The token broker against a REAL strict OAuth server: `oidc-provider` (npm) with refresh-token
//! rotation and no reuse grace, where presenting an already-rotated refresh token revokes the
//! whole grant. Any double use by the agent shows up as a dead grant.
//!
//! Calls go through the whole agent: the local API, the envelope, the broker, the tenant store,
//! and a real connector (the in-process Rust cdylib example, and a real `connector-py`
//! connector whose API client calls the provider's own userinfo endpoint `/me`).
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use lumos_agent_integration::*;
use serde_json::{json, Value};

/// oidc-provider's version, as `.ci/run` installs it.
const OIDC_PROVIDER: &str = "oidc-provider@9.13.3";
/// The confidential client the provider knows, its secret full of characters Basic auth and
/// form-encoding get wrong when done carelessly.
const CLIENT_ID: &str = "agent-client";
const CLIENT_SECRET: &str = "agent secret:+%/=~";
/// Where the interop connector-py build's API client points (baked in at build time).
const APP_PORT: u16 = 47391;

struct Provider {
    peer: PeerProcess,
    issuer: String,
    grant_id: String,
    refresh_token: String,
    access_token: String,
}

impl Provider {
    fn start(port: u16) -> Self {
        let dir = interop_node("oidc", &[OIDC_PROVIDER]);
        let script = dir.join("oidc_server.mjs");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("node/oidc_server.mjs"),
            &script,
        )
        .unwrap();
        let mut command = std::process::Command::new("node");
        command.arg(&script).arg(port.to_string());
        let peer = PeerProcess::start(command);
        let minted: Value = serde_json::from_str(&peer.next_lines(1)[0]).unwrap();
        let text = |k: &str| minted[k].as_str().unwrap().to_string();
        Self {
            issuer: text("issuer"),
            grant_id: text("grant_id"),
            refresh_token: text("refresh_token"),
            access_token: text("access_token"),
            peer,
        }
    }

    /// `{"token_requests", "grant_alive", "grant_errors"}`.
    async fn stats(&self) -> Value {
        let url = format!("{}/stats?grant={}", self.issuer, self.grant_id);
        http_get_json(&url).await
    }

    /// The broker block of a credential of this provider's confidential client.
    fn broker_block(&self, refresh_token: &str, expires_at: u64) -> Value {
        json!({
            "token_url": format!("{}/token", self.issuer),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "client_auth": "client_secret_basic",
            "refresh_token": refresh_token,
            "expires_at": expires_at,
        })
    }
}

async fn http_get_json(url: &str) -> Value {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The refresh token of `tenant_id`'s credential `credential_id`, read from the agent's
/// encrypted store on disk (the agent stopped).
fn stored_refresh_token(dirs: &TestDirs, tenant_id: &str, credential_id: &str) -> String {
    let state = lumos_agent::state::StatePaths::new(dirs.state());
    let key = lumos_agent::tenants::StoreKey::find(&state)
        .unwrap()
        .unwrap();
    let store =
        lumos_agent::tenants::TenantStore::open(state.tenants(), key, &state.tenants_plaintext())
            .unwrap();
    let tenant = store.get(tenant_id).unwrap();
    let creds: Value = serde_json::from_str(tenant.credentials.as_ref().unwrap().expose()).unwrap();
    let entry = creds
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == credential_id)
        .unwrap();
    entry["token_broker"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string()
}

const CDYLIB_APP: &str = "lumos_example_cdylib";

async fn agent_with_cdylib(dirs: &TestDirs) -> TestAgent {
    install_plugin(
        &dirs.plugins(),
        &native_lib("liblumos_example_cdylib.so"),
        "liblumos_example_cdylib.so",
    );
    TestAgent::start(
        dirs,
        &format!("[connectors.{CDYLIB_APP}]\nin_process = true\nmax_concurrency = 2000\n"),
    )
    .await
}

/// `n` concurrent `validate_credentials` calls for `tenant_id`, each of which must succeed;
/// the distinct token fingerprints the connector saw.
async fn concurrent_validations(
    agent: &Arc<TestAgent>,
    tenant_id: &'static str,
    n: usize,
) -> std::collections::HashSet<String> {
    let mut calls = Vec::new();
    for _ in 0..n {
        let agent = agent.clone();
        calls.push(tokio::spawn(async move {
            agent
                .call(
                    CDYLIB_APP,
                    "validate_credentials",
                    json!({"tenant_id": tenant_id}),
                )
                .await
        }));
    }
    let mut served = std::collections::HashSet::new();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        served.insert(
            body["response"]["unique_tenant_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_on_an_expired_token_make_one_refresh_and_the_grant_survives() {
    let provider = Provider::start(0);
    let dirs = TestDirs::new();
    let agent = Arc::new(agent_with_cdylib(&dirs).await);
    // Agent-held: the admin stored the tenant with a token that expired ten seconds ago.
    agent
        .put_tenant(
            "acme",
            json!({"app_id": CDYLIB_APP, "credentials": [{
                "id": "oidc",
                "oauth": {"access_token": provider.access_token},
                "token_broker": provider.broker_block(&provider.refresh_token, now_secs() - 10),
            }]}),
        )
        .await;
    let served = concurrent_validations(&agent, "acme", 1000).await;
    assert_eq!(
        served.len(),
        1,
        "every call got the same new token: {served:?}"
    );
    assert_ne!(
        served.iter().next().unwrap(),
        &token_hash(&provider.access_token),
        "not the expired one"
    );
    let stats = provider.stats().await;
    assert_eq!(stats["token_requests"], 1, "{stats}");
    assert_eq!(stats["grant_alive"], true, "{stats}");
    assert_eq!(stats["grant_errors"], json!([]), "{stats}");

    // The credential is healthy, and no secret is shown.
    let (_, view) = agent
        .request(hyper::Method::GET, "/v1/tenants/acme", None)
        .await;
    assert_eq!(view["credential_status"]["oidc"], "ok", "{view}");
    assert!(!view.to_string().contains(&provider.refresh_token));
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("lumos_agent_token_refreshes_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );

    // The rotated refresh token is the one on disk: it works once more at the provider, and
    // the grant is still alive after it (had the agent stored the old one, this would revoke).
    Arc::try_unwrap(agent).ok().unwrap().shutdown().await;
    let stored = stored_refresh_token(&dirs, "acme", "oidc");
    assert_ne!(
        stored, provider.refresh_token,
        "the rotated token was stored"
    );
    let dirs2 = TestDirs::new();
    let agent = agent_with_cdylib(&dirs2).await;
    agent
        .put_tenant(
            "acme",
            json!({"app_id": CDYLIB_APP, "credentials": [{
                "id": "oidc", "oauth": {},
                "token_broker": provider.broker_block(&stored, now_secs() - 10),
            }]}),
        )
        .await;
    let (status, body) = agent
        .call(
            CDYLIB_APP,
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stats = provider.stats().await;
    assert_eq!(stats["token_requests"], 2, "{stats}");
    assert_eq!(stats["grant_alive"], true, "{stats}");
    agent.shutdown().await;
    drop(provider.peer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_are_fetched_once_for_many_calls() {
    let provider = Provider::start(0);
    let dirs = TestDirs::new();
    let agent = Arc::new(agent_with_cdylib(&dirs).await);
    agent
        .put_tenant(
            "svc",
            json!({"app_id": CDYLIB_APP, "credentials": [{
                "id": "service", "oauth": {},
                "token_broker": {
                    "token_url": format!("{}/token", provider.issuer),
                    "grant": "client_credentials",
                    "client_id": "service-client",
                    "client_secret": "service-secret",
                    "client_auth": "client_secret_post",
                    "scopes": ["api:read"],
                },
            }]}),
        )
        .await;
    let before = provider.stats().await["token_requests"].as_u64().unwrap();
    let served = concurrent_validations(&agent, "svc", 200).await;
    assert_eq!(served.len(), 1);
    let after = provider.stats().await["token_requests"].as_u64().unwrap();
    assert_eq!(after - before, 1, "one client-credentials request");
    Arc::try_unwrap(agent).ok().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_connector_py_connector_refused_with_401_is_refreshed_and_retried_once() {
    let exe = connector_py_build(
        "exe",
        "demo-app",
        Some(&format!("http://127.0.0.1:{APP_PORT}")),
    );
    // The provider is the app: the connector calls its userinfo endpoint `/me` with the bearer
    // token, which answers 401 for a token it does not know.
    let provider = Provider::start(APP_PORT);
    let dirs = TestDirs::new();
    install_connector_py(&dirs.plugins(), &exe);
    let agent = TestAgent::start(&dirs, "").await;
    // The stored token looks valid for an hour, but the app does not accept it.
    agent
        .put_tenant(
            "acme",
            json!({"app_id": "demo-connector", "settings": {"account_id": "a1"}, "credentials": [{
                "id": "demo_connector_oauth",
                "oauth": {"access_token": "revoked-by-the-app"},
                "token_broker": provider.broker_block(&provider.refresh_token, now_secs() + 3600),
            }]}),
        )
        .await;
    let (status, body) = agent
        .call(
            "demo-connector",
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["valid"], true, "{body}");
    assert_ne!(
        body["response"]["unique_tenant_id"],
        token_hash("revoked-by-the-app"),
        "the retry carried the new token"
    );
    let stats = provider.stats().await;
    assert_eq!(stats["token_requests"], 1, "{stats}");
    assert_eq!(stats["grant_alive"], true, "{stats}");

    // The next call uses the new token directly: no refresh, no retry.
    let (status, again) = agent
        .call(
            "demo-connector",
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["response"], body["response"]);
    assert_eq!(provider.stats().await["token_requests"], 1);
    agent.shutdown().await;
}
