//! A fake Lumos cloud: a real tonic `AgentTunnel` server that tests (and connector developers,
//! through the `lumos-fake-cloud` binary) drive by hand.
//!
//! Each stream the agent opens becomes a [`CloudSession`]: the test reads what the agent sent
//! (Hello, inventories, result chunks, heartbeats), sends calls, acks and cancels, closes the
//! stream, or goes silent. Fault injection lives here: wrong tokens, dropped streams, silence.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{captured_logs, write_private, TestDirs};
use lumos_agent_proto::v1::agent_tunnel_server::{AgentTunnel, AgentTunnelServer};
use lumos_agent_proto::v1::{
    agent_message, cloud_message, AgentMessage, CallRequest, CallResult, Cancel, CloudMessage,
    Heartbeat, Hello, Inventory, ResultAck, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// How the fake cloud behaves.
#[derive(Debug, Clone)]
pub struct FakeCloudOptions {
    /// The bearer token it accepts; anything else is UNAUTHENTICATED.
    pub token: String,
    /// Welcome.heartbeat_interval_ms; the cloud also sends heartbeats at this pace.
    pub heartbeat_interval_ms: u32,
    /// Welcome.max_chunk_size; also the size of the calls' payload chunks it sends.
    pub max_chunk_size: u32,
    /// Answer every stream with PERMISSION_DENIED instead (a revoked agent).
    pub deny: bool,
}

impl Default for FakeCloudOptions {
    fn default() -> Self {
        Self {
            token: "fake-cloud-agent-token".into(),
            heartbeat_interval_ms: 1000,
            max_chunk_size: 64 * 1024,
            deny: false,
        }
    }
}

/// A running fake cloud.
#[derive(Debug)]
pub struct FakeCloud {
    /// Where it listens (plain HTTP/2 unless started with TLS).
    pub addr: SocketAddr,
    /// Streams the agent opened, in order.
    sessions: tokio::sync::Mutex<mpsc::UnboundedReceiver<CloudSession>>,
    /// Every Connect attempt, accepted or not.
    attempts: Arc<AtomicUsize>,
    shutdown: tokio::sync::oneshot::Sender<()>,
}

struct Service {
    options: FakeCloudOptions,
    sessions: mpsc::UnboundedSender<CloudSession>,
    attempts: Arc<AtomicUsize>,
    next_session: AtomicUsize,
}

type CloudStream = Pin<Box<dyn Stream<Item = Result<CloudMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentTunnel for Service {
    type ConnectStream = CloudStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if auth != format!("Bearer {}", self.options.token) {
            return Err(Status::unauthenticated("unknown agent token"));
        }
        if self.options.deny {
            return Err(Status::permission_denied("this agent was revoked"));
        }
        let mut inbound = request.into_inner();
        // The protocol: the agent's first message is Hello.
        let hello = match inbound.message().await {
            Ok(Some(AgentMessage {
                message: Some(agent_message::Message::Hello(hello)),
            })) => hello,
            other => {
                return Err(Status::invalid_argument(format!(
                    "expected Hello first, got {other:?}"
                )))
            }
        };
        let id = self.next_session.fetch_add(1, Ordering::SeqCst);
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Result<CloudMessage, Status>>();
        let welcome = Welcome {
            session_id: format!("fake-session-{id}"),
            heartbeat_interval_ms: self.options.heartbeat_interval_ms,
            max_chunk_size: self.options.max_chunk_size,
        };
        let _ = out_tx.send(Ok(cloud(cloud_message::Message::Welcome(welcome))));
        let silent = Arc::new(AtomicBool::new(false));
        // The cloud's own heartbeats, unless told to go silent.
        {
            let out = out_tx.clone();
            let silent = silent.clone();
            let every =
                Duration::from_millis(u64::from(self.options.heartbeat_interval_ms.max(10)));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if silent.load(Ordering::SeqCst) {
                        continue;
                    }
                    let beat = cloud(cloud_message::Message::Heartbeat(Heartbeat {
                        sent_at_ms: 0,
                    }));
                    if out.send(Ok(beat)).is_err() {
                        return;
                    }
                }
            });
        }
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        if in_tx.send(Ok(msg)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = in_tx.send(Err("the agent closed the stream".to_string()));
                        return;
                    }
                    Err(status) => {
                        let _ = in_tx.send(Err(format!("stream error: {status}")));
                        return;
                    }
                }
            }
        });
        let session = CloudSession::new(
            id,
            hello,
            out_tx,
            in_rx,
            silent,
            self.options.max_chunk_size as usize,
        );
        let _ = self.sessions.send(session);
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            out_rx,
        ))))
    }
}

/// Accepted connections with Nagle off, as a real gRPC server has them.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
}

fn cloud(message: cloud_message::Message) -> CloudMessage {
    CloudMessage {
        message: Some(message),
    }
}

impl FakeCloud {
    /// Starts on `127.0.0.1:0`, plain HTTP/2.
    pub async fn start(options: FakeCloudOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self::serve(options, addr, nodelay(listener))
    }

    /// Starts on `addr` (e.g. a fixed port for the binary).
    pub async fn bind(options: FakeCloudOptions, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Self::serve(options, addr, nodelay(listener)))
    }

    /// Starts on `127.0.0.1:0` behind TLS with `cert_pem`/`key_pem`.
    pub async fn start_tls(options: FakeCloudOptions, cert_pem: &str, key_pem: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    // A failed handshake (an agent that does not trust us) just ends here.
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok::<_, std::io::Error>(TlsConn(tls))).await;
                    }
                });
            }
        });
        Self::serve(options, addr, ReceiverStream::new(rx))
    }

    fn serve<S, IO>(options: FakeCloudOptions, addr: SocketAddr, incoming: S) -> Self
    where
        S: Stream<Item = Result<IO, std::io::Error>> + Send + 'static,
        IO: tonic::transport::server::Connected
            + tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + Unpin
            + Send
            + 'static,
    {
        let (sessions_tx, sessions_rx) = mpsc::unbounded_channel();
        let attempts = Arc::new(AtomicUsize::new(0));
        let service = Service {
            options,
            sessions: sessions_tx,
            attempts: attempts.clone(),
            next_session: AtomicUsize::new(0),
        };
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let server = AgentTunnelServer::new(service)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        });
        Self {
            addr,
            sessions: tokio::sync::Mutex::new(sessions_rx),
            attempts,
            shutdown,
        }
    }

    /// `http://addr`, for `cloud.endpoint` (with `allow_insecure`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next stream the agent opens (waits up to `timeout`).
    pub async fn next_session(&self, timeout: Duration) -> CloudSession {
        tokio::time::timeout(timeout, self.sessions.lock().await.recv())
            .await
            .unwrap_or_else(|_| panic!("the agent opened no stream within {timeout:?}"))
            .expect("fake cloud stopped")
    }

    /// A stream the agent opened meanwhile, if any.
    pub async fn try_next_session(&self) -> Option<CloudSession> {
        self.sessions.lock().await.try_recv().ok()
    }

    /// Connect attempts so far, accepted or refused.
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    /// Stops the server.
    pub fn stop(self) {
        let _ = self.shutdown.send(());
    }
}

/// A TLS connection tonic can serve (tonic's own TLS features stay off in this workspace).
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A result as the cloud assembled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembledResult {
    /// `CallStatus` as a number (1 answered, 2 agent error).
    pub status: i32,
    /// The whole document (empty when the session discards data; see `len`).
    pub data: Vec<u8>,
    /// Its length in bytes.
    pub len: usize,
    /// How many chunks it came in.
    pub chunks: u32,
    /// The largest chunk.
    pub largest_chunk: usize,
}

impl AssembledResult {
    /// The document as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.data).unwrap_or_else(|e| {
            panic!(
                "result is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.data[..self.data.len().min(300)])
            )
        })
    }
}

/// One stream the agent opened.
#[derive(Debug)]
pub struct CloudSession {
    /// 0 for the first stream, then 1, 2…
    pub id: usize,
    /// The agent's Hello.
    pub hello: Hello,
    out: mpsc::UnboundedSender<Result<CloudMessage, Status>>,
    inbound: mpsc::UnboundedReceiver<Result<AgentMessage, String>>,
    silent: Arc<AtomicBool>,
    chunk: usize,
    partial: HashMap<String, (i32, Vec<u8>, u32, usize, usize)>,
    discard: bool,
    results: HashMap<String, AssembledResult>,
    inventory: Option<Inventory>,
    /// Every message kind received, in order (for assertions on the sequence).
    pub seen: Vec<&'static str>,
    /// `None`: a result that breaks the protocol fails the test at once (the default, for
    /// tests). `Some`: it is noted here and the result dropped (the binary, which a connector
    /// developer runs against agents of any version and must not crash).
    violations: Option<Vec<String>>,
    /// Calls whose result broke the protocol: their remaining chunks are skipped.
    garbled: std::collections::HashSet<String>,
}

impl CloudSession {
    fn new(
        id: usize,
        hello: Hello,
        out: mpsc::UnboundedSender<Result<CloudMessage, Status>>,
        inbound: mpsc::UnboundedReceiver<Result<AgentMessage, String>>,
        silent: Arc<AtomicBool>,
        chunk: usize,
    ) -> Self {
        Self {
            id,
            hello,
            out,
            inbound,
            silent,
            chunk,
            partial: HashMap::new(),
            discard: false,
            results: HashMap::new(),
            inventory: None,
            seen: Vec::new(),
            violations: None,
            garbled: std::collections::HashSet::new(),
        }
    }

    fn send(&self, message: cloud_message::Message) {
        let _ = self.out.send(Ok(cloud(message)));
    }

    /// Sends a call: the JSON envelope `payload`, chunked at the Welcome's chunk size.
    pub fn call(
        &self,
        call_id: &str,
        app_id: &str,
        capability: &str,
        tenant_id: &str,
        payload: &serde_json::Value,
    ) {
        self.call_raw(
            call_id,
            app_id,
            capability,
            tenant_id,
            0,
            &serde_json::to_vec(payload).unwrap(),
        );
    }

    /// Sends a call with raw payload bytes and a deadline.
    pub fn call_raw(
        &self,
        call_id: &str,
        app_id: &str,
        capability: &str,
        tenant_id: &str,
        deadline_ms: u64,
        payload: &[u8],
    ) {
        let pieces: Vec<&[u8]> = if payload.is_empty() {
            vec![&[][..]]
        } else {
            payload.chunks(self.chunk.max(1)).collect()
        };
        let count = pieces.len();
        for (seq, piece) in pieces.into_iter().enumerate() {
            self.send_chunk(CallRequest {
                call_id: call_id.into(),
                app_id: app_id.into(),
                capability: capability.into(),
                tenant_id: tenant_id.into(),
                deadline_ms,
                payload: Bytes::copy_from_slice(piece),
                seq: seq as u32,
                last: seq + 1 == count,
            });
        }
    }

    /// Sends one CallRequest chunk as given (malformed ones included).
    pub fn send_chunk(&self, chunk: CallRequest) {
        self.send(cloud_message::Message::CallRequest(chunk));
    }

    /// Sends an empty CloudMessage (no oneof case: what an unknown newer kind looks like).
    pub fn send_empty(&self) {
        let _ = self.out.send(Ok(CloudMessage { message: None }));
    }

    /// Acknowledges a result.
    pub fn ack(&self, call_id: &str) {
        self.send(cloud_message::Message::ResultAck(ResultAck {
            call_id: call_id.into(),
        }));
    }

    /// Cancels a call.
    pub fn cancel(&self, call_id: &str) {
        self.send(cloud_message::Message::Cancel(Cancel {
            call_id: call_id.into(),
        }));
    }

    /// Keep only the length of result data, not the bytes (for memory benchmarks).
    pub fn discard_data(&mut self, on: bool) {
        self.discard = on;
    }

    /// Results completed so far, taken out of the session.
    pub fn take_results(&mut self) -> Vec<(String, AssembledResult)> {
        self.results.drain().collect()
    }

    /// Ends the stream with an error, as a crashing cloud or a load balancer would.
    pub fn close(self) {
        let _ = self
            .out
            .send(Err(Status::unavailable("fake cloud dropped the stream")));
    }

    /// Stops sending anything (heartbeats included) but keeps the stream open: half-open TCP.
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    /// Receives the next message; `None` when the stream ended or `timeout` passed.
    pub async fn recv(&mut self, timeout: Duration) -> Option<AgentMessage> {
        let msg = match tokio::time::timeout(timeout, self.inbound.recv()).await {
            Ok(Some(Ok(msg))) => msg,
            _ => return None,
        };
        match &msg.message {
            Some(agent_message::Message::Hello(_)) => self.seen.push("hello"),
            Some(agent_message::Message::Inventory(inv)) => {
                self.seen.push("inventory");
                self.inventory = Some(inv.clone());
            }
            Some(agent_message::Message::CallResult(r)) => {
                self.seen.push("call_result");
                self.absorb(r);
            }
            Some(agent_message::Message::Heartbeat(_)) => self.seen.push("heartbeat"),
            Some(agent_message::Message::CredentialUpdate(_)) => {
                self.seen.push("credential_update")
            }
            Some(agent_message::Message::Draining(_)) => self.seen.push("draining"),
            None => self.seen.push("empty"),
        }
        Some(msg)
    }

    /// Notes a result that breaks the protocol instead of failing at once: the result is
    /// dropped, not acknowledged (so the agent sends it again on its next stream), and the
    /// violation is returned by [`Self::take_violations`].
    pub fn tolerate_violations(&mut self) {
        self.violations.get_or_insert_with(Vec::new);
    }

    /// The protocol violations noted since the last call (see [`Self::tolerate_violations`]).
    pub fn take_violations(&mut self) -> Vec<String> {
        self.violations
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn absorb(&mut self, r: &CallResult) {
        if self.garbled.contains(&r.call_id) {
            if r.last {
                self.garbled.remove(&r.call_id);
            }
            return;
        }
        let entry = self
            .partial
            .entry(r.call_id.clone())
            .or_insert_with(|| (r.status, Vec::new(), 0, 0, 0));
        let violation = if r.seq != entry.2 {
            Some(format!(
                "result chunks of {} out of order: chunk {} came where {} was due",
                r.call_id, r.seq, entry.2
            ))
        } else if r.status != entry.0 {
            Some(format!(
                "status changed between chunks of {}: {} after {}",
                r.call_id, r.status, entry.0
            ))
        } else {
            None
        };
        if let Some(violation) = violation {
            let Some(noted) = self.violations.as_mut() else {
                panic!("{violation}");
            };
            noted.push(format!(
                "{violation}; the result is dropped and not acknowledged"
            ));
            self.partial.remove(&r.call_id);
            if !r.last {
                self.garbled.insert(r.call_id.clone());
            }
            return;
        }
        if !self.discard {
            entry.1.extend_from_slice(&r.data);
        }
        entry.2 += 1;
        entry.3 = entry.3.max(r.data.len());
        entry.4 += r.data.len();
        if r.last {
            let (status, data, chunks, largest_chunk, len) =
                self.partial.remove(&r.call_id).unwrap();
            self.results.insert(
                r.call_id.clone(),
                AssembledResult {
                    status,
                    data,
                    len,
                    chunks,
                    largest_chunk,
                },
            );
        }
    }

    /// Reads until the whole result of `call_id` arrived; `None` if the stream ended first or
    /// `timeout` passed.
    pub async fn result(&mut self, call_id: &str, timeout: Duration) -> Option<AssembledResult> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(done) = self.results.remove(call_id) {
                return Some(done);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.recv(left).await?;
        }
    }

    /// Reads until an inventory satisfying `check` arrived.
    pub async fn inventory_where(
        &mut self,
        timeout: Duration,
        mut check: impl FnMut(&Inventory) -> bool,
    ) -> Option<Inventory> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(inv) = &self.inventory {
                if check(inv) {
                    return Some(inv.clone());
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.recv(left).await?;
        }
    }

    /// Reads until a message of `kind` (as in [`Self::seen`]) arrives.
    pub async fn until(&mut self, kind: &str, timeout: Duration) -> Option<AgentMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.recv(left).await?;
            if self.seen.last() == Some(&kind) {
                return Some(msg);
            }
        }
    }

    /// Reads until the agent ends the stream (or `timeout`); true if it ended.
    pub async fn ended(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.inbound.recv()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(msg))) => {
                    if let Some(agent_message::Message::CallResult(r)) = &msg.message {
                        self.absorb(r);
                    }
                }
            }
        }
    }
}

/// Whether `inventory` has `app_id` ready.
pub fn is_ready(inventory: &Inventory, app_id: &str) -> bool {
    inventory.connectors.iter().any(|c| {
        c.app_id == app_id && c.status == lumos_agent_proto::v1::ConnectorStatus::Ready as i32
    })
}

/// A self-signed certificate for `localhost` and `127.0.0.1`: (cert PEM, key PEM).
pub fn self_signed_cert() -> (String, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

/// Lines in a file (0 when it does not exist): how many times a counting connector ran.
pub fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Writes the agent token file (0600) for a test agent.
pub fn token_file(dirs: &TestDirs, token: &str) -> PathBuf {
    let path = dirs.root.path().join("cloud-token");
    write_private(&path, &format!("{token}\n"));
    path
}

/// The agent config for `endpoint`: a `[cloud]` section with fast backoff for tests, then
/// `extra` lines in it.
pub fn cloud_config(dirs: &TestDirs, endpoint: &str, token: &str, extra: &str) -> String {
    // Installs the log capture before the agent logs anything.
    captured_logs();
    let backoff_max = if extra.contains("backoff_max_secs") {
        ""
    } else {
        "backoff_max_secs = 1\n"
    };
    format!(
        "[calls]\ntimeout_secs = 120\nkill_grace_secs = 1\ndrain_grace_secs = 30\n[cloud]\nendpoint = {endpoint:?}\nallow_insecure = true\ntoken_file = {:?}\nbackoff_initial_ms = 50\n{backoff_max}cluster_id = \"test-cluster\"\n{extra}\n",
        token_file(dirs, token).display().to_string()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> CloudSession {
        let (out, _) = mpsc::unbounded_channel();
        let (_, inbound) = mpsc::unbounded_channel();
        CloudSession::new(0, Hello::default(), out, inbound, Arc::default(), 1024)
    }

    fn chunk(call_id: &str, seq: u32, data: &str, last: bool) -> CallResult {
        CallResult {
            call_id: call_id.into(),
            seq,
            data: Bytes::copy_from_slice(data.as_bytes()),
            last,
            status: 1,
        }
    }

    #[test]
    fn a_tolerant_session_notes_out_of_order_chunks_and_drops_only_that_result() {
        let mut s = session();
        s.tolerate_violations();
        s.absorb(&chunk("a", 0, "{\"x\":", false));
        s.absorb(&chunk("b", 0, "{}", true));
        s.absorb(&chunk("a", 2, "1", false));
        s.absorb(&chunk("a", 3, "}", true));
        let violations = s.take_violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].contains("result chunks of a out of order: chunk 2 came where 1 was due"),
            "{violations:?}"
        );
        let results = s.take_results();
        assert_eq!(results.len(), 1, "only b's result is whole");
        assert_eq!(
            (results[0].0.as_str(), &results[0].1.data[..]),
            ("b", &b"{}"[..])
        );
        // Sent again whole (as the agent does on its next stream), the result is taken.
        s.absorb(&chunk("a", 0, "{\"x\":1}", true));
        assert!(s.take_violations().is_empty());
        assert_eq!(s.take_results()[0].1.data, b"{\"x\":1}");
    }

    #[test]
    #[should_panic(expected = "result chunks of a out of order")]
    fn a_strict_session_fails_the_test_on_out_of_order_chunks() {
        let mut s = session();
        s.absorb(&chunk("a", 1, "{}", true));
    }
}
