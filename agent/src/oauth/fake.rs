//! A scripted token endpoint on 127.0.0.1 for the OAuth tests (fault injection: any status,
//! header or body, per request).
#![allow(clippy::unwrap_used, reason = "test helper")]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;

/// What the fake token endpoint saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    pub uri: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub api_key: Option<String>,
    pub body: String,
}

pub(crate) type Script =
    Arc<dyn Fn(&Seen) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync>;

/// A token endpoint on 127.0.0.1 that answers as `script` says and records each request.
pub(crate) async fn fake_endpoint(script: Script) -> (String, Arc<Mutex<Vec<Seen>>>) {
    fake_endpoint_with(script, None).await
}

/// [`fake_endpoint`] over TLS with `issued`'s certificate (for `localhost`), as an in-house
/// authorization server with a private CA.
pub(crate) async fn fake_tls_endpoint(
    script: Script,
    issued: &rcgen::CertifiedKey<rcgen::KeyPair>,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        issued.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![issued.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    fake_endpoint_with(script, Some(acceptor)).await
}

async fn fake_endpoint_with(
    script: Script,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let url = match tls {
        Some(_) => format!("https://localhost:{}/token", addr.port()),
        None => format!("http://{addr}/token"),
    };
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (script, log, tls) = (script.clone(), log.clone(), tls.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (script, log) = (script.clone(), log.clone());
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned)
                            };
                            let mut seen = Seen {
                                uri: req.uri().to_string(),
                                authorization: header("authorization"),
                                content_type: header("content-type"),
                                api_key: header("x-api-key"),
                                body: String::new(),
                            };
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.body = String::from_utf8_lossy(&body).into_owned();
                            let (status, headers, body) = script(&seen);
                            log.lock().unwrap().push(seen);
                            let mut response = hyper::Response::builder().status(status);
                            for (name, value) in headers {
                                response = response.header(name, value);
                            }
                            Ok::<_, std::convert::Infallible>(
                                response.body(Full::new(Bytes::from(body))).unwrap(),
                            )
                        }
                    });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .await;
                    }
                    // A client that does not trust the certificate never gets this far.
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(tcp).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    (url, seen)
}
