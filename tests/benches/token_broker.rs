//! The token broker's cost (issue 6): per call when the token is fresh (target ≤ 2 µs), and
//! 10 000 concurrent callers on an expired token against a local token endpoint (exactly one
//! request; the time until every caller has the new token).
//!
//! ```text
//! cargo bench -p lumos-agent-integration --bench token_broker
//! ```
#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::Full;
use lumos_agent::oauth::broker::{
    BrokerSettings, CredentialKey, GrantKind, Persist, Seed, TokenBroker,
};
use lumos_agent::oauth::{BodyFormat, ClientAuth, TokenClient, TokenEndpoint};
use zeroize::Zeroizing;

/// A token endpoint that counts requests and answers after `delay` (a real server's latency).
async fn endpoint(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let counter = counter.clone();
                    async move {
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(delay).await;
                        let body = format!(
                            r#"{{"access_token": "AT-{n}", "refresh_token": "RT-{n}", "expires_in": 3600}}"#
                        );
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, requests)
}

fn main() {
    let runtime = lumos_agent_integration::two_worker_runtime();
    runtime.block_on(async {
        let (url, requests) = endpoint(Duration::from_millis(20)).await;
        let persist: Persist = Arc::new(|_, _, _| async { Ok(()) }.boxed());
        let broker = Arc::new(TokenBroker::new(
            TokenClient::new(None, Duration::from_secs(10)).unwrap(),
            BrokerSettings::default(),
            persist,
        ));
        let ep = TokenEndpoint {
            url: url.clone(),
            client_id: "client".into(),
            client_secret: Some(Zeroizing::new("secret".into())),
            auth: ClientAuth::Basic,
            format: BodyFormat::Form,
            scopes: vec!["read".into()],
            api_key: None,
        };
        let key = |tenant: usize| CredentialKey {
            tenant_id: format!("tenant-{tenant}"),
            credential_id: String::new(),
            token_url: url.clone(),
            client_id: "client".into(),
            scopes: vec!["read".into()],
        };
        let expired = || Seed {
            issued_at: None,
            access_token: Some(Zeroizing::new("OLD".into())),
            expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
            refresh_token: Some(Zeroizing::new("RT-0".into())),
            supersedes: Vec::new(),
        };

        // Baseline for the herd: one token request made directly, same client and endpoint.
        let client = TokenClient::new(None, Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        client
            .request(&ep, lumos_agent::oauth::Grant::ClientCredentials)
            .await
            .unwrap();
        let single = started.elapsed();
        requests.store(0, Ordering::SeqCst);

        // 10 000 concurrent callers on one expired token.
        let started = Instant::now();
        let callers: Vec<_> = (0..10_000)
            .map(|_| {
                let (broker, ep, k) = (broker.clone(), ep.clone(), key(0));
                tokio::spawn(async move {
                    broker
                        .token(&k, &ep, &GrantKind::RefreshToken, expired)
                        .await
                        .map(|t| t.token.len())
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap().unwrap();
        }
        let herd = started.elapsed();
        println!(
            "10 000 concurrent callers on an expired token: {} token request(s), all served in {:.1} ms; baseline, one direct request: {:.1} ms",
            requests.load(Ordering::SeqCst),
            herd.as_secs_f64() * 1e3,
            single.as_secs_f64() * 1e3
        );

        // The fresh-token path: one task, many calls, hundreds of credentials in the broker.
        for tenant in 1..500 {
            let fresh = || Seed {
                issued_at: None,
                access_token: Some(Zeroizing::new("FRESH".into())),
                expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
                refresh_token: None,
                supersedes: Vec::new(),
            };
            broker.token(&key(tenant), &ep, &GrantKind::RefreshToken, fresh).await.unwrap();
        }
        let k = key(0);
        let rounds = 1_000_000u32;
        let started = Instant::now();
        for _ in 0..rounds {
            let token = broker
                .token(&k, &ep, &GrantKind::RefreshToken, Seed::default)
                .now_or_never()
                .unwrap()
                .unwrap();
            std::hint::black_box(token);
        }
        let per_call = started.elapsed() / rounds;
        // Baseline: the least any token cache does, a locked map lookup and an Arc clone.
        let map: std::sync::Mutex<std::collections::HashMap<CredentialKey, Arc<String>>> =
            std::sync::Mutex::new((0..500).map(|t| (key(t), Arc::new("FRESH".to_string()))).collect());
        let started = Instant::now();
        for _ in 0..rounds {
            let token = map.lock().unwrap().get(&k).cloned().unwrap();
            std::hint::black_box(token);
        }
        let baseline = started.elapsed() / rounds;
        println!(
            "fresh token: {:.0} ns per call over {rounds} calls, 500 credentials held (target ≤ 2 µs); baseline, a locked map lookup: {:.0} ns",
            per_call.as_secs_f64() * 1e9,
            baseline.as_secs_f64() * 1e9
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    });
}
