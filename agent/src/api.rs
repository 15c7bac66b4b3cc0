//! The local HTTP API (design §6): health, connectors, calls and tenants.
//!
//! `/healthz`, `/readyz`, `/metrics` and the login (`POST /v1/auth/token`) are open; every other
//! `/v1` route needs `Authorization: Bearer <token>` ([`crate::auth`]) of a role that allows it
//! (viewer: read; operator: also calls; admin: also tenants' writes). Errors are JSON in the
//! Lumos error shape with an HTTP status that matches the agent error code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiAuth, LoginError, Principal, Role};
use crate::dispatch::{CallBody, CallRequest, Dispatcher};
use crate::error::{CallError, ErrorCode};
use crate::plugins::info::CredentialShape;
use crate::plugins::reload::Reconciler;
use crate::plugins::PluginRegistry;
use crate::tenants::{SecretJson, Tenant, TenantStore};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 16 << 20;
/// Largest login body accepted: a name and a password.
const MAX_LOGIN_BYTES: usize = 64 << 10;
/// How long a client may take to send a request's headers, counted from the end of the last
/// response on a kept-alive connection (hyper times the wait for the next request the same
/// way). Without a bound, connections that never finish their headers (slowloris), or sit
/// idle, each hold a file descriptor for ever. Longer than the intervals scrapers use (10, 15,
/// 30, 60 s), so that a kept-alive connection is not closed just as the next scrape is sent on
/// it; the same as nginx's keep-alive default.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);
/// Header carrying the inventory revision on `GET /v1/connectors`.
pub const REVISION_HEADER: &str = "x-lumos-inventory-revision";

/// What an admin must know of an API that listens beyond loopback (said at start and by
/// `check-config`): it speaks plain HTTP.
pub const BEYOND_LOOPBACK: &str = "the local API listens beyond loopback, without TLS: anyone who can reach it needs only a bearer token, and tokens, login passwords and tenant secrets cross the network in the clear";

/// What the API serves.
#[derive(Debug)]
pub struct ApiState {
    /// Runs calls.
    pub dispatcher: Arc<Dispatcher>,
    /// What `/metrics` shows.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The connectors.
    pub registry: Arc<PluginRegistry>,
    /// The agent-held tenants.
    pub tenants: Arc<TenantStore>,
    /// Who may do what: the admin token, users, sessions.
    pub auth: Arc<ApiAuth>,
    /// Cancelled when the agent quits at once: in-flight calls stop.
    pub abort: CancellationToken,
    /// Cancelled when the agent drains: new calls are refused.
    pub draining: CancellationToken,
    /// Where the tunnel to the cloud stands.
    pub cloud: tokio::sync::watch::Receiver<crate::tunnel::CloudStatus>,
    /// The tunnel's calls and unacknowledged results (for the outbox gauges).
    pub calls: Arc<crate::tunnel::calls::CallTable>,
    /// Whether the first plugins scan is still running.
    pub starting: StartProgress,
}

/// Whether the agent is still at its first plugins scan, and what it is loading. The API
/// listens from before that scan, so that a health check passes (and a person asking learns
/// why nothing is listed yet) while slow connectors load: `/healthz` answers, `/readyz` and
/// the `/v1` routes other than the status, the tenants and the login answer 503
/// `agent.starting`.
#[derive(Debug, Clone)]
pub struct StartProgress {
    done: Arc<AtomicBool>,
    reconciler: Arc<Reconciler>,
}

impl StartProgress {
    /// Starting, loading what `reconciler` loads.
    pub fn new(reconciler: Arc<Reconciler>) -> Self {
        Self {
            done: Arc::new(AtomicBool::new(false)),
            reconciler,
        }
    }

    /// The first scan has ended: the API serves everything.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// Whether the first scan still runs.
    pub fn is_starting(&self) -> bool {
        !self.done.load(Ordering::Acquire)
    }

    /// The files still loading, while the first scan runs; `None` once it has ended.
    pub fn loading(&self) -> Option<Vec<String>> {
        self.is_starting().then(|| self.reconciler.loading())
    }

    /// The loads in progress, at start or later (a file just dropped in), with what each does.
    pub fn loads(&self) -> Vec<crate::plugins::reload::LoadInProgress> {
        self.reconciler.loads()
    }
}

/// Response bodies: small ones whole, call results streamed (they may be spooled on disk).
type ApiBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
type ApiResponse = Response<ApiBody>;

fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A result body as an HTTP body, read in chunks (a spooled result never sits whole in memory).
fn result_body(body: crate::output::ResultBody) -> ApiBody {
    const CHUNK: usize = 256 * 1024;
    if let crate::output::ResultBody::Memory(bytes) = body {
        return full(bytes);
    }
    let stream = futures_util::stream::try_unfold((body, 0u64), |(body, offset)| async move {
        if offset >= body.len() {
            return Ok(None);
        }
        let chunk = body.read_at(offset, CHUNK).await?;
        let next = offset + chunk.len() as u64;
        Ok(Some((hyper::body::Frame::data(chunk), (body, next))))
    });
    http_body_util::StreamBody::new(stream).boxed()
}

/// Accepts connections until `shutdown`, then lets in-flight requests finish (tracked by
/// `tracker`). At most `max_connections` are served at once: the next is accepted and waits,
/// and those after it wait in the listen backlog, until one closes (an idle one closes after
/// `HEADER_READ_TIMEOUT`), so that a client opening connections without end cannot use up the
/// file descriptors the connectors and the tunnel need.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let full_lines = crate::telemetry::LineThrottle::per_minute();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Accepted first, so that the warning is for a connection that waits, not for the
        // last place being taken; the one it holds is the only one over the limit (the next
        // wait in the backlog, unaccepted).
        let slot = match open.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if let Some(held_back) = full_lines.admit("api_full") {
                    tracing::warn!(
                        %peer,
                        "the local API has {max_connections} connections open (api.max_connections); new ones wait until one closes{}",
                        crate::telemetry::held_back_note(held_back)
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    slot = open.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            // Given back when the connection ends.
            let _slot = slot;
            // Requests of this connection being answered: at shutdown, a connection with none
            // is closed at once, whatever it is sending (half a request's headers would
            // otherwise hold the drain until its grace ran out).
            let answering = Arc::new(AtomicUsize::new(0));
            let service = {
                let answering = answering.clone();
                service_fn(move |req| {
                    let state = state.clone();
                    let answer = Answering::start(&answering);
                    async move {
                        let response = handle(&state, req, peer).await;
                        // Until the body is sent (a result can stream for a while), or dropped.
                        Ok::<_, Infallible>(response.map(|body| {
                            body.map_frame(move |frame| {
                                let _ = &answer;
                                frame
                            })
                            .boxed()
                        }))
                    }
                })
            };
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => if let Err(e) = res { tracing::debug!(error = %e, "API connection ended with an error") },
                () = shutdown.cancelled() => {
                    if answering.load(Ordering::Acquire) > 0 {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
        });
    }
}

/// One request of a connection being answered, from its headers to its response's last byte.
struct Answering(Arc<AtomicUsize>);

impl Answering {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn handle(state: &ApiState, req: Request<Incoming>, peer: SocketAddr) -> ApiResponse {
    let path = req.uri().path().to_string();
    let asked = req.method().clone();
    // HEAD is answered as GET (hyper sends the headers only): monitors that probe with HEAD
    // get the status a GET would.
    let method = if asked == Method::HEAD {
        Method::GET
    } else {
        asked.clone()
    };
    // Each segment decoded on its own: `%2F` is a slash inside a name, not a new segment.
    let decoded: Result<Vec<std::borrow::Cow<'_, str>>, _> = path
        .trim_matches('/')
        .split('/')
        .map(|segment| percent_encoding::percent_decode_str(segment).decode_utf8())
        .collect();
    let Ok(decoded) = decoded else {
        let err = CallError::new(
            ErrorCode::BadRequest,
            "the path is not UTF-8 once percent-decoded",
        );
        return agent_error(&err, None, StatusCode::BAD_REQUEST);
    };
    let segments: Vec<&str> = decoded.iter().map(AsRef::as_ref).collect();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
        // Open like the health checks (the API listens on loopback): metrics hold connector ids
        // and counts, never tenants or secrets.
        (&Method::GET, ["metrics"]) => {
            let (calls, metrics) = (&state.calls, &state.metrics);
            metrics.set_outbox(calls.unacknowledged(), calls.memory_bytes());
            let body = metrics.render(&state.registry.snapshot());
            let mut resp = Response::new(full(Bytes::from(body)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (&Method::GET, ["readyz"]) => {
            let inventory = state.registry.snapshot();
            if state.draining.is_cancelled() {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"ready": false, "reason": "draining"}),
                )
            } else if let Some(loading) = state.starting.loading() {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({
                        "ready": false,
                        "reason": "starting",
                        "connectors_loaded": inventory.connectors.len(),
                        "loading": loading,
                    }),
                )
            } else {
                json_response(
                    StatusCode::OK,
                    &json!({"ready": true, "connectors_ready": inventory.ready_count(), "revision": inventory.revision}),
                )
            }
        }
        (&Method::POST, ["v1", "auth", "token"]) => login(state, req, peer).await,
        (_, ["v1", ..]) => {
            let header = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match state.auth.check(header) {
                Err(denied) => unauthorized(&denied.to_string()),
                Ok(principal) => {
                    let rest = &segments[1..];
                    let needed = role_needed(&method, rest);
                    if principal.role < needed {
                        forbidden(&principal, needed, &method, &path)
                    } else if state.starting.is_starting()
                        // What does not depend on the connectors serves at once: an install
                        // script may store its tenants while slow connectors load.
                        && !matches!(rest, ["status"] | ["auth", ..] | ["tenants", ..])
                    {
                        starting(state)
                    } else {
                        v1(state, req, &method, rest, &principal).await
                    }
                }
            }
        }
        _ => no_route(&asked, &segments),
    };
    tracing::debug!(%peer, method = %asked, %path, status = response.status().as_u16(), "API request");
    response
}

/// `agent.starting`: what the first plugins scan has loaded and is still loading.
fn starting(state: &ApiState) -> ApiResponse {
    let line = state.starting.reconciler.progress("starting");
    let err = CallError::new(
        ErrorCode::Starting,
        format!("the agent is {line}; ask again once it is ready (GET /readyz)"),
    );
    agent_error(&err, None, StatusCode::SERVICE_UNAVAILABLE)
}

/// The least role a `/v1` route needs: reading takes a viewer, a call an operator, changing
/// tenants an admin. Unknown routes take a viewer (their 404 or 405 is no secret).
fn role_needed(method: &Method, rest: &[&str]) -> Role {
    match (method, rest) {
        (&Method::POST, ["connectors", _, _]) => Role::Operator,
        (&Method::PUT | &Method::DELETE, ["tenants", ..]) => Role::Admin,
        _ => Role::Viewer,
    }
}

fn unauthorized(message: &str) -> ApiResponse {
    let err = CallError::new(ErrorCode::Unauthenticated, message);
    let mut resp = agent_error(&err, None, StatusCode::UNAUTHORIZED);
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

fn forbidden(principal: &Principal, needed: Role, method: &Method, path: &str) -> ApiResponse {
    tracing::info!(user = %principal.user, role = principal.role.as_str(), %method, %path, "API request refused: role too low");
    let err = CallError::new(
        ErrorCode::Forbidden,
        format!(
            "{method} {path} needs the {} role; {} has the {} role",
            needed.as_str(),
            principal.user,
            principal.role.as_str()
        ),
    );
    agent_error(&err, None, StatusCode::FORBIDDEN)
}

/// `POST /v1/auth/token` with `{"username", "password"}`: a bearer token of the user's role.
async fn login(state: &ApiState, req: Request<Incoming>, peer: SocketAddr) -> ApiResponse {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Login {
        username: String,
        password: String,
    }
    let body = match read_body_up_to(req, MAX_LOGIN_BYTES).await {
        Ok(bytes) => zeroize::Zeroizing::new(bytes.to_vec()),
        Err(resp) => return resp,
    };
    let (username, password) = match serde_json::from_slice::<Login>(&body) {
        // Moved, not copied, into its zeroizing wrapper.
        Ok(login) => (login.username, zeroize::Zeroizing::new(login.password)),
        Err(e) => {
            // serde's words name fields and types, never the values.
            let err = CallError::new(
                ErrorCode::BadRequest,
                format!("expected {{\"username\": \"…\", \"password\": \"…\"}}: {e}"),
            );
            return agent_error(&err, None, StatusCode::BAD_REQUEST);
        }
    };
    // As typed, but escaped (no forged log lines): a name is no secret, though a password
    // typed into its field would be, which no log can tell apart.
    let shown = format!("{username:?}");
    let outcome = state.auth.login(&username, password.as_bytes()).await;
    state
        .metrics
        .api_login(outcome.as_ref().map_or_else(LoginError::outcome, |_| "ok"));
    let e = match outcome {
        Ok(issued) => {
            tracing::info!(user = %shown, role = issued.role.as_str(), %peer, "API login");
            return json_response(
                StatusCode::OK,
                &json!({
                    "token": issued.token.as_str(),
                    "token_type": "Bearer",
                    "role": issued.role.as_str(),
                    "expires_in": issued.expires_in.as_secs(),
                    "expires_at": unix_secs(issued.expires_at),
                }),
            );
        }
        Err(e) => e,
    };
    // The error's words may hold what was typed (a directory's answer, a name): escaped too.
    let said = format!("{:?}", e.to_string());
    let (code, status) = match &e {
        LoginError::WrongCredentials | LoginError::NoUsers => {
            (ErrorCode::Unauthenticated, StatusCode::UNAUTHORIZED)
        }
        LoginError::Throttled { .. } => (ErrorCode::Unauthenticated, StatusCode::TOO_MANY_REQUESTS),
        LoginError::NoRole { .. } => (ErrorCode::Forbidden, StatusCode::FORBIDDEN),
        LoginError::NameTooLong => (ErrorCode::BadRequest, StatusCode::BAD_REQUEST),
        LoginError::Unavailable { .. } => (ErrorCode::Internal, StatusCode::SERVICE_UNAVAILABLE),
    };
    if matches!(e, LoginError::Unavailable { .. }) {
        tracing::error!(user = %shown, %peer, error = %said, "API login failed");
    } else {
        tracing::warn!(user = %shown, %peer, reason = %said, "API login refused");
    }
    let mut err = CallError::new(code, e.to_string());
    if let LoginError::Throttled { retry_after } = e {
        err.retry_after_seconds = Some(retry_after.as_secs_f64().ceil() as u64);
    }
    if status == StatusCode::UNAUTHORIZED {
        return unauthorized(&err.message);
    }
    agent_error(&err, None, status)
}

/// Seconds since the Unix epoch, as the API's `expires_at` fields give times.
fn unix_secs(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn v1(
    state: &ApiState,
    req: Request<Incoming>,
    method: &Method,
    rest: &[&str],
    principal: &Principal,
) -> ApiResponse {
    match (method, rest) {
        (&Method::GET, ["auth", "whoami"]) => json_response(
            StatusCode::OK,
            &json!({
                "user": principal.user,
                "role": principal.role.as_str(),
                "expires_at": principal.expires_at.map(unix_secs),
            }),
        ),
        (&Method::DELETE, ["auth", "token"]) => {
            if state.auth.logout(principal) {
                tracing::info!(user = %principal.user, "API logout");
                json_response(StatusCode::OK, &json!({"logged_out": principal.user}))
            } else {
                let err = CallError::new(
                    ErrorCode::BadRequest,
                    "the admin token has no session to end (it is the file <state_dir>/admin.token)",
                );
                agent_error(&err, None, StatusCode::BAD_REQUEST)
            }
        }
        (&Method::GET, ["status"]) => {
            let inventory = state.registry.snapshot();
            let rejected = inventory
                .connectors
                .iter()
                .filter(|c| inventory.status_of(c) == crate::plugins::ConnectorStatus::Rejected)
                .count();
            json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "draining": state.draining.is_cancelled(),
                    "inventory_revision": inventory.revision,
                    "connectors": {"ready": inventory.ready_count(), "rejected": rejected},
                    "cloud": state.cloud.borrow().as_str(),
                    // While the first plugins scan runs: what it has loaded and is loading.
                    "starting": state.starting.loading().map(|loading| json!({
                        "connectors_loaded": inventory.connectors.len(),
                        "loading": loading,
                    })),
                    // Files being loaded now (at start or later), not listed as connectors yet.
                    "loading": state.starting.loads(),
                }),
            )
        }
        (&Method::GET, ["connectors"]) => {
            let inventory = state.registry.snapshot();
            let views = inventory.views();
            let mut resp = json_response(StatusCode::OK, &views);
            resp.headers_mut()
                .insert(REVISION_HEADER, HeaderValue::from(inventory.revision));
            resp
        }
        (&Method::GET, ["connectors", app_id]) => {
            let inventory = state.registry.snapshot();
            match inventory.resolve(app_id) {
                Ok(c) => json_response(StatusCode::OK, &inventory.view(&c, true)),
                Err(e) => match inventory
                    .connectors
                    .iter()
                    .find(|c| c.app_id.as_deref() == Some(*app_id))
                {
                    Some(rejected) => {
                        json_response(StatusCode::OK, &inventory.view(rejected, true))
                    }
                    None => agent_error(&e, Some(app_id), status_of(&e)),
                },
            }
        }
        (&Method::POST, ["connectors", app_id, capability]) => {
            call(state, req, app_id, capability).await
        }
        (&Method::GET, ["tenants"]) => {
            let list: Vec<Value> = state
                .tenants
                .list()
                .iter()
                .map(|(id, t)| tenant_view(state, id, t))
                .collect();
            json_response(StatusCode::OK, &list)
        }
        (&Method::GET, ["tenants", id]) => match state.tenants.get(id) {
            Some(t) => json_response(StatusCode::OK, &tenant_view(state, id, &t)),
            None => agent_error(
                &CallError::new(ErrorCode::UnknownTenant, format!("no tenant {id:?}")),
                None,
                StatusCode::NOT_FOUND,
            ),
        },
        (&Method::PUT, ["tenants", id]) => put_tenant(state, req, id).await,
        (&Method::DELETE, ["tenants", id]) => match store_blocking(state, {
            let id = id.to_string();
            move |tenants| tenants.delete(&id)
        })
        .await
        {
            Ok(true) => {
                state.dispatcher.broker().forget_tenant(id);
                json_response(StatusCode::OK, &json!({"deleted": id}))
            }
            Ok(false) => agent_error(
                &CallError::new(ErrorCode::UnknownTenant, format!("no tenant {id:?}")),
                None,
                StatusCode::NOT_FOUND,
            ),
            Err(e) => agent_error(
                &CallError::new(ErrorCode::Internal, e.to_string()),
                None,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        },
        _ => {
            let segments: Vec<&str> = std::iter::once("v1").chain(rest.iter().copied()).collect();
            // The method as asked: `method` is GET for a HEAD.
            no_route(req.method(), &segments)
        }
    }
}

/// The methods a path the API serves takes (HEAD wherever GET), `None` for a path it does not
/// serve; `segments` are the path's parts (`["v1", "tenants", "t1"]`). Keep it in step with
/// `handle` and `v1`: a test holds it to README's table of routes.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["healthz"] | ["readyz"] | ["metrics"] => Some("GET, HEAD"),
        ["v1", "auth", "token"] => Some("POST, DELETE"),
        ["v1", "auth", "whoami"]
        | ["v1", "status"]
        | ["v1", "connectors"]
        | ["v1", "connectors", _]
        | ["v1", "tenants"] => Some("GET, HEAD"),
        ["v1", "connectors", _, _] => Some("POST"),
        ["v1", "tenants", _] => Some("GET, HEAD, PUT, DELETE"),
        _ => None,
    }
}

/// A request no route answers: 405 with `Allow` for a path served with other methods (a
/// client's wrong verb is not a missing page), else 404.
fn no_route(method: &Method, segments: &[&str]) -> ApiResponse {
    let path = format!("/{}", segments.join("/"));
    match allowed_methods(segments) {
        Some(allow) => {
            let err = CallError::new(
                ErrorCode::BadRequest,
                format!("{path} does not take {method}; it takes {allow}"),
            );
            let mut resp = agent_error(&err, None, StatusCode::METHOD_NOT_ALLOWED);
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            resp
        }
        None => agent_error(
            &CallError::new(ErrorCode::BadRequest, format!("no route {method} {path}")),
            None,
            StatusCode::NOT_FOUND,
        ),
    }
}

async fn call(
    state: &ApiState,
    req: Request<Incoming>,
    app_id: &str,
    capability: &str,
) -> ApiResponse {
    if state.draining.is_cancelled() {
        let err = CallError::new(
            ErrorCode::ShuttingDown,
            "the agent is shutting down and takes no new calls",
        );
        return agent_error(&err, Some(app_id), status_of(&err));
    }
    let body = match read_body(req).await {
        Ok(bytes) => bytes,
        Err(resp) => return resp,
    };
    let body: CallBody = if body.iter().all(u8::is_ascii_whitespace) {
        CallBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                let err = CallError::new(ErrorCode::BadRequest, format!("the call body is not a valid call ({e}); expected {{\"tenant_id\", \"request\", \"settings\", \"auth\", \"credentials\", \"page\", \"include_raw_data\"}}"));
                return agent_error(&err, Some(app_id), StatusCode::BAD_REQUEST);
            }
        }
    };
    // A tenant a local caller names is one stored here, unless the call brings credentials
    // of its own (as the cloud's do): otherwise a mistyped id ran the connector with no
    // credentials at all, and its error did not say why.
    if let Some(id) = body.tenant_id.as_deref() {
        if body.auth.is_none() && body.credentials.is_none() && state.tenants.get(id).is_none() {
            let err = CallError::new(
                ErrorCode::UnknownTenant,
                format!(
                    "no tenant {id:?} is stored here, and the call brings no auth or \
                     credentials of its own (`lumos-agent tenants list` shows the stored ones)"
                ),
            );
            return agent_error(&err, Some(app_id), status_of(&err));
        }
    }
    let request = CallRequest {
        app_id: app_id.to_string(),
        capability: capability.to_string(),
        body,
        deadline: None,
    };
    // A dropped request (client gone) drops this future, and with it the call's processes.
    match state
        .dispatcher
        .call(&request, &state.abort.child_token())
        .await
    {
        Ok(answer) => {
            let mut resp = Response::new(result_body(answer.json));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Ok(v) = HeaderValue::from_str(&answer.version) {
                resp.headers_mut().insert("x-lumos-connector-version", v);
            }
            resp
        }
        Err(e) => agent_error(&e, Some(app_id), status_of(&e)),
    }
}

/// A tenant store change, which writes and fsyncs the store: on a blocking thread, not on
/// the runtime's workers.
async fn store_blocking<R: Send + 'static>(
    state: &ApiState,
    change: impl FnOnce(&crate::tenants::TenantStore) -> Result<R, crate::tenants::TenantStoreError>
        + Send
        + 'static,
) -> Result<R, crate::tenants::TenantStoreError> {
    let tenants = state.tenants.clone();
    let path = tenants.path().to_path_buf();
    tokio::task::spawn_blocking(move || change(&tenants))
        .await
        .unwrap_or_else(|e| {
            // Only a panic in the change ends the task early; the store is left as it was.
            Err(crate::tenants::TenantStoreError::Io {
                path,
                source: std::io::Error::other(format!("the change stopped: {e}")),
            })
        })
}

async fn put_tenant(state: &ApiState, req: Request<Incoming>, tenant_id: &str) -> ApiResponse {
    let body = match read_body(req).await {
        Ok(bytes) => zeroize::Zeroizing::new(bytes.to_vec()),
        Err(resp) => return resp,
    };
    let bad = |message: String| {
        agent_error(
            &CallError::new(ErrorCode::BadRequest, message),
            None,
            StatusCode::BAD_REQUEST,
        )
    };
    let mut doc: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return bad("the tenant body must be a JSON object".into()),
        Err(e) => return bad(format!("the tenant body is not JSON: {e}")),
    };
    for key in doc.keys() {
        if !["app_id", "settings", "auth", "credentials"].contains(&key.as_str()) {
            return bad(format!(
                "unknown field {key:?}; expected app_id, settings, auth, credentials"
            ));
        }
    }
    let Some(Value::String(app_id)) = doc.remove("app_id") else {
        return bad("the tenant needs an \"app_id\" string".into());
    };
    let settings = match doc.remove("settings") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return bad("\"settings\" must be an object".into()),
    };
    let secret = |v: Option<Value>| {
        v.filter(|v| !v.is_null())
            .map(|v| SecretJson::from_value(&v))
    };
    // The shapes connectors expect (design §2): stored any other way, every call would hand
    // the connector something it cannot read, and an admin would learn of it only then.
    use crate::oauth::managed::{SHAPE_OF_AUTH, SHAPE_OF_CREDENTIALS};
    match doc.get("auth") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return bad(format!("\"auth\" {SHAPE_OF_AUTH}")),
    }
    match doc.get("credentials") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_object) => {}
        Some(Value::Object(map)) if map.contains_key("credentials") => {
            return bad(format!(
                "\"credentials\" {SHAPE_OF_CREDENTIALS}, not an object that holds one (the \
                 CLI's --credentials-file takes the list itself)"
            ))
        }
        Some(_) => return bad(format!("\"credentials\" {SHAPE_OF_CREDENTIALS}")),
    }
    let auth = secret(doc.remove("auth"));
    let credentials = secret(doc.remove("credentials"));
    let tenant = Tenant {
        app_id,
        settings,
        auth,
        credentials,
    };
    // A misconfigured token_broker block is refused now, not at the first call.
    if let Err(e) = crate::oauth::managed::PreparedCredentials::parse(
        tenant_id,
        &tenant.app_id,
        &tenant.settings,
        tenant.auth.as_ref(),
        tenant.credentials.as_ref(),
    ) {
        return bad(format!("a managed credential is misconfigured: {e}"));
    }
    // Only for a tenant deleted again before its answer is made.
    let stored_view = tenant.view(tenant_id);
    match store_blocking(state, {
        let tenant_id = tenant_id.to_string();
        move |tenants| tenants.put(&tenant_id, tenant)
    })
    .await
    {
        Ok(()) => {
            // New credentials (a re-consent, say): the broker starts over from them.
            state.dispatcher.broker().forget_tenant(tenant_id);
            // The answer is what a GET shows now: `credential_status` and `notes` too.
            let view = state
                .tenants
                .get(tenant_id)
                .map_or(stored_view, |stored| tenant_view(state, tenant_id, &stored));
            json_response(StatusCode::OK, &view)
        }
        Err(crate::tenants::TenantStoreError::BadId(id)) => bad(format!(
            "tenant id {id:?} must be 1-128 characters of A-Z a-z 0-9 _ - . :"
        )),
        Err(e) => agent_error(
            &CallError::new(ErrorCode::Internal, e.to_string()),
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    }
}

/// What the admin storing a tenant should know, though it is stored: no connector serves its
/// app_id (yet), or its credentials do not match what the connector declares
/// ([`crate::plugins::info::credential_notes`]). Ids and types only, never a value.
fn tenant_notes(state: &ApiState, app_id: &str, stored: &CredentialShape) -> Vec<String> {
    let inventory = state.registry.snapshot();
    match inventory.resolve(app_id) {
        Ok(connector) => connector.runnable.as_ref().map_or_else(Vec::new, |runnable| {
            crate::plugins::info::credential_notes(app_id, &runnable.info.document, stored)
        }),
        // Tenants may be stored before their connector is dropped in, so this is no error;
        // but a mistyped app_id would otherwise show only at the first call.
        Err(e) if e.code == ErrorCode::UnknownConnector => vec![format!(
            "no connector with app_id {app_id:?} is loaded (yet); calls for this tenant need one (`lumos-agent connectors` lists them)"
        )],
        Err(e) => vec![format!(
            "{}; calls for this tenant fail until it loads",
            e.message
        )],
    }
}

/// A tenant as the API shows it: no secrets, the state of each managed credential (`ok`,
/// `failing`, `needs_reconsent`), and its `notes` against the connector loaded now (which
/// may have changed since the tenant was stored).
fn tenant_view(state: &ApiState, tenant_id: &str, tenant: &Tenant) -> Value {
    let mut view = tenant.view(tenant_id);
    let shape = CredentialShape::of_texts(
        tenant.auth.as_ref().map(SecretJson::expose),
        tenant.credentials.as_ref().map(SecretJson::expose),
    );
    let notes = tenant_notes(state, &tenant.app_id, &shape);
    let mut status = serde_json::Map::new();
    for id in crate::oauth::managed::stored_reconsent(tenant) {
        status.insert(id, json!("needs_reconsent"));
    }
    for (id, s) in state.dispatcher.broker().tenant_status(tenant_id) {
        status.entry(id).or_insert_with(|| json!(s.as_str()));
    }
    if let Value::Object(map) = &mut view {
        map.insert("credential_status".into(), Value::Object(status));
        map.insert("notes".into(), json!(notes));
    }
    view
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiResponse> {
    read_body_up_to(req, MAX_BODY_BYTES).await
}

async fn read_body_up_to(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiResponse> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let (status, message) = if too_large {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {limit} bytes"),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            };
            Err(agent_error(
                &CallError::new(ErrorCode::BadRequest, message),
                None,
                status,
            ))
        }
    }
}

fn status_of(err: &CallError) -> StatusCode {
    StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn agent_error(err: &CallError, app_id: Option<&str>, status: StatusCode) -> ApiResponse {
    let mut resp = Response::new(full(Bytes::from(err.to_json_bytes(app_id))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(secs) = err.retry_after_seconds {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    resp
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> ApiResponse {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> ApiResponse {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// README's table of routes (plus the open health and metrics routes named above it) and
    /// `allowed_methods` agree path by path: a wrong verb's 405 names exactly the documented
    /// methods.
    #[test]
    fn allowed_methods_are_the_documented_routes() {
        let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let rows = crate::readme::table_rows("| route | |");
        let open = ["GET /healthz", "GET /readyz", "GET /metrics"];
        let routes = rows
            .iter()
            .flat_map(|row| row[0].split(", ").map(|r| r.trim_matches('`').to_string()))
            .chain(open.iter().map(|r| r.to_string()));
        for route in routes {
            let (method, path) = route
                .split_once(' ')
                .unwrap_or_else(|| panic!("a route without a method: {route:?}"));
            let methods = documented.entry(path.to_string()).or_default();
            methods.insert(method.to_string());
            if method == "GET" {
                methods.insert("HEAD".to_string());
            }
        }
        assert!(documented.len() >= 10, "{documented:?}");
        for (path, methods) in documented {
            // `{app_id}` and the like stand for one segment.
            let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
            let allowed: BTreeSet<String> = allowed_methods(&segments)
                .unwrap_or_else(|| panic!("{path} is documented but not served"))
                .split(", ")
                .map(str::to_string)
                .collect();
            assert_eq!(allowed, methods, "{path}");
        }
        assert_eq!(allowed_methods(&["v1", "tenants", "t", "x"]), None);
        assert_eq!(allowed_methods(&[""]), None);
    }

    #[test]
    fn a_wrong_method_is_405_with_allow_and_an_unknown_path_404() {
        let resp = no_route(&Method::PATCH, &["v1", "tenants", "t1"]);
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[ALLOW], "GET, HEAD, PUT, DELETE");
        let resp = no_route(&Method::GET, &["v1", "nothing"]);
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(!resp.headers().contains_key(ALLOW));
    }
}
