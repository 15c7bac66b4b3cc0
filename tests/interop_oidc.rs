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
        Self::start_with(port, 3600)
    }

    /// With access tokens that live `access_ttl` seconds.
    fn start_with(port: u16, access_ttl: u64) -> Self {
        let dir = interop_node("oidc", &[OIDC_PROVIDER]);
        let script = dir.join("oidc_server.mjs");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("node/oidc_server.mjs"),
            &script,
        )
        .unwrap();
        let mut command = std::process::Command::new("node");
        command
            .arg(&script)
            .arg(port.to_string())
            .env("ACCESS_TTL", access_ttl.to_string());
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

    /// A new grant: `(grant_id, refresh_token)`.
    async fn mint(&self) -> (String, String) {
        use http_body_util::BodyExt as _;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let req = hyper::Request::post(format!("{}/mint", self.issuer))
            .body(http_body_util::Empty::new())
            .unwrap();
        let body = client
            .request(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        let minted: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
        (
            minted["grant_id"].as_str().unwrap().to_string(),
            minted["refresh_token"].as_str().unwrap().to_string(),
        )
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

/// No secret in anything the agent logged so far (its crates log at TRACE in tests), nor in
/// the `Debug` of what it holds.
fn assert_no_secret_logged(secrets: &[&str]) {
    let logs = captured_logs();
    assert!(!logs.is_empty(), "the log capture is installed");
    for secret in secrets {
        assert!(
            !logs.contains(secret),
            "a secret ({} bytes) was logged",
            secret.len()
        );
    }
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
    captured_logs();
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

/// Reads the session until a `CredentialUpdate` arrives (results met on the way are kept).
async fn next_update(
    s: &mut lumos_agent_integration::fake_cloud::CloudSession,
) -> lumos_agent_proto::v1::CredentialUpdate {
    use lumos_agent_proto::v1::agent_message::Message;
    loop {
        let msg = s
            .recv(std::time::Duration::from_secs(60))
            .await
            .expect("a CredentialUpdate");
        if let Some(Message::CredentialUpdate(update)) = msg.message {
            return update;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_held_tokens_go_back_to_the_cloud_and_survive_a_restart_before_its_ack() {
    use lumos_agent_integration::fake_cloud::*;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(60);
    let provider = Provider::start(0);
    let dirs = TestDirs::new();
    install_plugin(
        &dirs.plugins(),
        &native_lib("liblumos_example_cdylib.so"),
        "liblumos_example_cdylib.so",
    );
    let cloud = FakeCloud::start(FakeCloudOptions::default()).await;
    let config = format!(
        "{}[connectors.{CDYLIB_APP}]\nin_process = true\n",
        cloud_config(
            &dirs,
            &cloud.endpoint(),
            &FakeCloudOptions::default().token,
            ""
        )
    );
    // The cloud holds the credential and sends it with every call; the token expired.
    let payload = json!({"credentials": [{
        "id": "oidc",
        "oauth": {"access_token": provider.access_token},
        "token_broker": provider.broker_block(&provider.refresh_token, now_secs() - 10),
    }]});
    let agent = TestAgent::start(&dirs, &config).await;
    let mut s = cloud.next_session(WAIT).await;
    s.call("c1", CDYLIB_APP, "validate_credentials", "cloudy", &payload);
    // The update is stored, and sent, before the new token is used: it may come first.
    let update = next_update(&mut s).await;
    let first = s.result("c1", WAIT).await.expect("c1's result").json();
    s.ack("c1");
    assert_eq!(first["response"]["valid"], true, "{first}");
    assert_eq!(
        (
            update.tenant_id.as_str(),
            update.credential_id.as_str(),
            update.status.as_str()
        ),
        ("cloudy", "oidc", "refreshed")
    );
    let tokens: Value = serde_json::from_slice(&update.credential).unwrap();
    let rotated = tokens["refresh_token"].as_str().unwrap();
    assert_ne!(rotated, provider.refresh_token);
    assert!(captured_logs().contains("sending a credential update to the cloud"));
    assert_no_secret_logged(&[
        rotated,
        &provider.refresh_token,
        tokens["access_token"].as_str().unwrap(),
        CLIENT_SECRET,
    ]);
    assert!(tokens["expires_at"].as_u64().unwrap() > now_secs());
    assert_eq!(
        first["response"]["unique_tenant_id"],
        token_hash(tokens["access_token"].as_str().unwrap()),
        "the call used the tokens the cloud is told about"
    );
    assert_eq!(provider.stats().await["token_requests"], 1);

    // The agent stops before the cloud acknowledged the update (kept sealed in the store).
    agent.shutdown().await;
    drop(s);
    let agent = TestAgent::start(&dirs, &config).await;
    let mut s = cloud.next_session(WAIT).await;
    let again = next_update(&mut s).await;
    assert_eq!(
        again.update_id, update.update_id,
        "the same update, sent again"
    );
    // The cloud has not applied it and still sends the old, already rotated refresh token.
    // Using it would revoke the grant; the agent uses the update's tokens instead.
    s.call("c2", CDYLIB_APP, "validate_credentials", "cloudy", &payload);
    let second = s.result("c2", WAIT).await.expect("c2's result").json();
    s.ack("c2");
    assert_eq!(second["response"], first["response"], "{second}");
    let stats = provider.stats().await;
    assert_eq!(stats["token_requests"], 1, "{stats}");
    assert_eq!(stats["grant_alive"], true, "{stats}");

    // Acknowledged: forgotten, on disk too.
    s.ack(&update.update_id);
    let state = lumos_agent::state::StatePaths::new(dirs.state());
    eventually(
        WAIT,
        "the acknowledged update is removed from the store",
        || {
            let key = lumos_agent::tenants::StoreKey::find(&state)
                .unwrap()
                .unwrap();
            lumos_agent::tenants::TenantStore::open(
                state.tenants(),
                key,
                &state.tenants_plaintext(),
            )
            .is_ok_and(|store| store.pending_updates().is_empty())
        },
    )
    .await;
    agent.shutdown().await;
}

/// kill -9 the agent at random points while it refreshes, many times. After each kill the
/// store decrypts, and the refresh token on disk is the newest the server issued, or the one
/// before it when the newest was in flight (issued, but the agent died before storing it: the
/// server's answer never reached the disk). Never an older one, never none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_during_refreshes_never_loses_the_latest_stored_refresh_token() {
    // Access tokens live 2 s: with the skew halved to 1 s, calls refresh about once a second.
    let mut provider = Provider::start_with(0, 2);
    let dirs = TestDirs::new();
    install_plugin(
        &dirs.plugins(),
        &native_lib("liblumos_example_cdylib.so"),
        "liblumos_example_cdylib.so",
    );
    let agent_bin = workspace_bin("lumos-agent");
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut in_flight, mut stored_latest) = (0, 0);
    let mut needs_tenant = true;
    for round in 0..12 {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let mut child = KilledOnDrop::spawn(
            std::process::Command::new(&agent_bin)
                .arg("--plugins-dir")
                .arg(dirs.plugins())
                .arg("--state-dir")
                .arg(dirs.state())
                .args(["--listen", &format!("127.0.0.1:{port}"), "run"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let api = ApiClient::connect(port, &dirs).await;
        if needs_tenant {
            let (grant_id, refresh_token) = provider.mint().await;
            provider.grant_id = grant_id;
            api.put(
                "/v1/tenants/acme",
                json!({"app_id": CDYLIB_APP, "credentials": [{
                    "id": "oidc", "oauth": {},
                    "token_broker": provider.broker_block(&refresh_token, now_secs() - 10),
                }]}),
            )
            .await;
            needs_tenant = false;
        }
        // Calls until this round has refreshed at least once (whatever the machine's speed),
        // then for a random while more, so the kill lands at any point of later refreshes.
        let before = provider.stats().await["token_requests"].as_u64().unwrap();
        let path = format!("/v1/connectors/{CDYLIB_APP}/validate_credentials");
        let call = || api.post(&path, json!({"tenant_id": "acme"}));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while provider.stats().await["token_requests"].as_u64().unwrap() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no refresh within 2 minutes"
            );
            let _ = call().await;
        }
        let kill_after = std::time::Duration::from_millis(rng.u64(0..1500));
        let started = std::time::Instant::now();
        while started.elapsed() < kill_after {
            let _ = call().await;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();

        let on_disk = stored_refresh_token(&dirs, "acme", "oidc");
        let stats = provider.stats().await;
        let issued: Vec<&str> = stats["issued_refresh_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let newest = issued.len() - 1;
        if on_disk == issued[newest] {
            stored_latest += 1;
            assert_eq!(
                stats["grant_alive"], true,
                "round {round} (seed {seed}): {stats}"
            );
        } else {
            assert_eq!(
                on_disk,
                issued[newest - 1],
                "round {round} (seed {seed}): the stored refresh token is neither the newest nor the one in flight"
            );
            // The newest never reached the disk: that grant is lost to the agent, as OAuth
            // allows. Start the next round from a new one.
            in_flight += 1;
            needs_tenant = true;
        }
    }
    eprintln!("seed {seed}: stored the newest {stored_latest} times, killed with one in flight {in_flight} times");
    assert!(
        stored_latest > 0,
        "some rounds end with the newest token stored"
    );
}

/// The local API of an agent running as its own process.
struct ApiClient {
    base: String,
    token: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl ApiClient {
    /// Waits until the agent on `port` is ready (`GET /readyz` answers 200: its API listens
    /// from before its connectors are loaded, and answers `agent.starting` until then).
    async fn connect(port: u16, dirs: &TestDirs) -> Self {
        let ready = || {
            use std::io::{Read as _, Write as _};
            let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let mut answer = String::new();
            stream
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .is_ok()
                && stream.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let token_path = lumos_agent::state::StatePaths::new(dirs.state()).admin_token();
        let mut api = None;
        eventually(
            std::time::Duration::from_secs(60),
            "the agent's API answers",
            || {
                if let Ok(token) = std::fs::read_to_string(&token_path) {
                    api = Some(Self {
                        base: format!("http://127.0.0.1:{port}"),
                        token: token.trim().to_string(),
                        client: client.clone(),
                    });
                }
                api.is_some() && ready()
            },
        )
        .await;
        api.unwrap()
    }

    async fn send(&self, method: hyper::Method, path: &str, body: Value) -> StatusCode {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        match self.client.request(req).await {
            Ok(resp) => resp.status(),
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    async fn put(&self, path: &str, body: Value) {
        assert_eq!(
            self.send(hyper::Method::PUT, path, body).await,
            StatusCode::OK
        );
    }

    async fn post(&self, path: &str, body: Value) -> StatusCode {
        self.send(hyper::Method::POST, path, body).await
    }
}
