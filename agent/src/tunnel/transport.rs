//! The connection under the tunnel: TCP, optionally through an HTTP CONNECT proxy, then TLS
//! (rustls) with ALPN `h2`. tonic speaks HTTP/2 over whatever this returns.
//!
//! Why the agent does TLS itself rather than through tonic's TLS features: the proxy's CONNECT
//! must happen before the TLS handshake, and the trust store is the union of the web PKI, the
//! system store and an optional extra CA file, which tonic's options do not combine.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{HeaderValue, HOST, PROXY_AUTHORIZATION};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::config::{CloudConfig, ProxyUrl};

/// Why the agent could not reach the cloud.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The trust store could not be built (a bad `cloud.ca_file` or `oauth.ca_file`).
    #[error("cannot use {setting} {path}: {message}")]
    CaFile {
        /// The setting that names it.
        setting: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// TCP, proxy or TLS failed.
    #[error("cannot connect to {target}: {message}")]
    Connect {
        /// Where to.
        target: String,
        /// What failed, for a person.
        message: String,
    },
}

/// Streams the connector hands to tonic.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Connects to the cloud endpoint as configured. Cheap to clone.
#[derive(Clone)]
pub struct CloudConnector {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CloudConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudConnector")
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .field("tls", &self.inner.tls.is_some())
            .field("proxy", &self.inner.proxy)
            .finish()
    }
}

struct Inner {
    endpoint: Uri,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    proxy: Option<ProxyUrl>,
    timeout: Duration,
}

impl CloudConnector {
    /// Builds the trust store and proxy choice for `cloud`.
    pub fn new(cloud: &CloudConfig) -> Result<Self, TransportError> {
        let host = cloud
            .endpoint
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = cloud.endpoint.scheme_str() == Some("https");
        let port = cloud
            .endpoint
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(tokio_rustls::TlsConnector::from(Arc::new(client_config(
                cloud.ca_file.as_deref().map(|path| ("cloud.ca_file", path)),
                &[b"h2"],
            )?)))
        } else {
            None
        };
        let proxy = cloud
            .proxy
            .clone()
            .filter(|_| !bypasses_proxy(&host, &cloud.no_proxy));
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint: cloud.endpoint.clone(),
                host,
                port,
                tls,
                proxy,
                timeout: cloud.connect_timeout,
            }),
        })
    }

    /// A tonic channel over a fresh connection (proxy and TLS included).
    pub async fn channel(&self) -> Result<Channel, TransportError> {
        let inner = self.inner.clone();
        let target = self.target();
        // One deadline for everything: TCP, proxy, TLS and the HTTP/2 handshake (a peer that
        // accepts TLS but never speaks HTTP/2 must not hang the agent).
        tokio::time::timeout(inner.timeout, self.open())
            .await
            .map_err(|_| TransportError::Connect {
                target,
                message: format!(
                    "no connection within {:?} (cloud.connect_timeout_secs)",
                    inner.timeout
                ),
            })?
    }

    async fn open(&self) -> Result<Channel, TransportError> {
        let io = self.inner.connect().await?;
        // The connection is made once, here; tonic gets it through a one-shot connector.
        let slot = Arc::new(std::sync::Mutex::new(Some(io)));
        let connector = tower::service_fn(move |_: Uri| {
            let io = slot.lock().expect("connection slot poisoned").take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| io::Error::other("the tunnel connection was already used"))
            }
        });
        Endpoint::from(self.inner.endpoint.clone())
            // Large results go as many chunks; keep HTTP/2 windows big enough to stream them.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .connect_with_connector(connector)
            .await
            .map_err(|e| TransportError::Connect {
                target: self.target(),
                message: format!("HTTP/2 set-up failed: {}", error_chain(&e)),
            })
    }

    /// The cloud's host name (what TLS verifies).
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The cloud's port.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The proxy the connection goes through, if any (after `NO_PROXY`).
    pub fn proxy(&self) -> Option<&ProxyUrl> {
        self.inner.proxy.as_ref()
    }

    /// The TLS connector, `None` for an `http://` endpoint.
    pub fn tls(&self) -> Option<&tokio_rustls::TlsConnector> {
        self.inner.tls.as_ref()
    }

    /// `host:port`, and the proxy when one is used, for messages.
    pub fn target(&self) -> String {
        match &self.inner.proxy {
            Some(proxy) => format!("{}:{} via proxy {proxy}", self.inner.host, self.inner.port),
            None => format!("{}:{}", self.inner.host, self.inner.port),
        }
    }
}

impl Inner {
    async fn connect(&self) -> Result<Box<dyn Io>, TransportError> {
        let fail = |message: String| TransportError::Connect {
            target: format!("{}:{}", self.host, self.port),
            message,
        };
        let stream: Box<dyn Io> = match &self.proxy {
            None => {
                let tcp = TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| fail(format!("TCP: {e}")))?;
                // Small messages (acks, short results) must not wait for Nagle's delayed ACK.
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            Some(proxy) => Box::new(
                connect_via_proxy(proxy, &self.host, self.port)
                    .await
                    .map_err(|e| fail(format!("proxy {proxy}: {e}")))?,
            ),
        };
        let Some(tls) = &self.tls else {
            return Ok(stream);
        };
        let name = ServerName::try_from(self.host.clone()).map_err(|e| {
            fail(format!(
                "{:?} is not a valid TLS server name: {e}",
                self.host
            ))
        })?;
        let stream = tls
            .connect(name, stream)
            .await
            .map_err(|e| {
                // The usual cause behind a TLS-inspecting proxy or a private cloud: say the fix.
                let hint = if e.to_string().contains("certificate") {
                    "; if the cloud's certificate is issued by a private CA, put that CA in cloud.ca_file"
                } else {
                    ""
                };
                fail(format!("TLS: {e}{hint}"))
            })?;
        Ok(Box::new(stream))
    }
}

/// An extra CA file's certificates: PEM, at least one. The error says what is wrong, for a
/// person (config validation reports it too, so `check-config` catches a bad file).
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("it holds no PEM certificate".into());
    }
    Ok(certs)
}

/// rustls settings: web PKI roots, the system store and `ca_file` (with the name of its
/// setting, for errors), offering `alpn` (the tunnel asks for HTTP/2; token endpoints leave it
/// to hyper-rustls).
pub fn client_config(
    ca_file: Option<(&'static str, &std::path::Path)>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!("system certificate store: {error}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "trust store loaded");
    if let Some((setting, path)) = ca_file {
        let bad = |message: String| TransportError::CaFile {
            setting,
            path: path.display().to_string(),
            message,
        };
        for cert in read_ca_file(path).map_err(bad)? {
            roots
                .add(cert)
                .map_err(|e| bad(format!("a certificate is not usable as a CA: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Connect {
            target: "TLS".into(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// `CONNECT host:port` through the proxy (hyper's HTTP/1 client, upgraded to a raw stream).
pub async fn connect_via_proxy(proxy: &ProxyUrl, host: &str, port: u16) -> io::Result<impl Io> {
    let tcp = TcpStream::connect(proxy.authority.as_str()).await?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("proxy connection: {e}");
        }
    });
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.as_str())
        .header(HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(io::Error::other)?;
    if let Some(credentials) = &proxy.credentials {
        let encoded = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(credentials.as_bytes()),
        );
        let mut value = HeaderValue::from_str(&format!("Basic {}", encoded.as_str()))
            .map_err(io::Error::other)?;
        // Kept out of hyper's debug output and HPACK tables.
        value.set_sensitive(true);
        request.headers_mut().insert(PROXY_AUTHORIZATION, value);
    }
    let response = sender
        .send_request(request)
        .await
        .map_err(io::Error::other)?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
            return Err(io::Error::other(if proxy.credentials.is_some() {
                "the proxy refused its credentials (407)"
            } else {
                "the proxy wants credentials (407): put them in cloud.proxy as http://user:password@host:port"
            }))
        }
        status => {
            return Err(io::Error::other(format!(
                "the proxy answered CONNECT with {status}"
            )))
        }
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(io::Error::other)?;
    Ok(TokioIo::new(upgraded))
}

/// Whether the cloud's `host` is reached without the proxy. `NO_PROXY` rules, read as curl reads
/// them: `*`; a host name, which covers its subdomains too (`corp` or `.corp`); an IP address; an
/// IP network (`10.0.0.0/8`, `fd00::/8`). A rule's port (`svc:443`, `[::1]:443`) is ignored.
/// Loopback is not special (a test may put a proxy in front of a local cloud), as with curl.
pub fn bypasses_proxy(host: &str, no_proxy: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ip = host.parse::<std::net::IpAddr>().ok();
    no_proxy.iter().any(|rule| {
        let rule = rule.trim().to_ascii_lowercase();
        let rule = without_port(&rule);
        if rule == "*" {
            return true;
        }
        if let Some(ip) = ip {
            return rule.parse::<std::net::IpAddr>().is_ok_and(|r| r == ip)
                || rule
                    .parse::<ipnet::IpNet>()
                    .is_ok_and(|net| net.contains(&ip));
        }
        let suffix = rule.trim_start_matches('.').trim_end_matches('.');
        !suffix.is_empty() && (host == suffix || host.ends_with(&format!(".{suffix}")))
    })
}

/// A `NO_PROXY` rule without its port, if it has one: `svc:443` → `svc`, `[::1]:443` → `::1`,
/// `[::1]` → `::1`. An IPv6 address or network without brackets is left whole.
fn without_port(rule: &str) -> &str {
    if let Some(rest) = rule.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(address, _)| address);
    }
    match rule.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.parse::<u16>().is_ok() => name,
        _ => rule,
    }
}

/// An error and its sources, joined: tonic's top-level "transport error" alone says nothing.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_rules() {
        let rules: Vec<String> = ["corp.example", ".internal", "10.0.0.5", "svc:443"]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        assert!(bypasses_proxy("corp.example", &rules));
        assert!(bypasses_proxy("api.corp.example", &rules));
        assert!(bypasses_proxy("db.internal", &rules));
        assert!(bypasses_proxy("10.0.0.5", &rules));
        assert!(bypasses_proxy("SVC", &rules));
        assert!(!bypasses_proxy("notcorp.example", &rules));
        assert!(!bypasses_proxy("agents.lumos.example", &rules));
        assert!(bypasses_proxy("anything", &["*".to_string()]));
        assert!(!bypasses_proxy("anything", &[]));
        // A fully qualified name (a trailing dot) is the same host.
        assert!(bypasses_proxy("api.corp.example.", &rules));
    }

    #[test]
    fn no_proxy_rules_for_ip_addresses_and_networks() {
        let rules: Vec<String> = [
            "10.0.0.0/8",
            "192.168.1.7",
            "fd00::/8",
            "[2001:db8::1]:443",
            "172.16.0.9:8443",
            "corp.example",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        for host in [
            "10.1.2.3",
            "192.168.1.7",
            "fd12::5",
            "2001:db8::1",
            "172.16.0.9",
        ] {
            assert!(bypasses_proxy(host, &rules), "{host}");
        }
        for host in [
            "11.0.0.1",
            "192.168.1.8",
            "fe80::1",
            "2001:db8::2",
            "172.16.0.10",
        ] {
            assert!(!bypasses_proxy(host, &rules), "{host}");
        }
        // An address is matched by address and network rules only, never by its text's tail.
        assert!(!bypasses_proxy("10.0.0.1", &["0.0.1".to_string()]));
        assert!(bypasses_proxy("203.0.113.5", &["*".to_string()]));
        assert!(
            !bypasses_proxy("127.0.0.1", &rules),
            "loopback is not special"
        );
        assert!(bypasses_proxy("127.0.0.1", &["127.0.0.0/8".to_string()]));
    }
}
