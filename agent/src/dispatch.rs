//! Capability calls: find the connector, build the envelope with the tenant's settings and
//! credentials, run it under its deadline and concurrency limit, and hand back its JSON
//! verbatim (or an agent error in the same shape).

use std::ffi::OsString;
use std::io::Read;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::config::SharedConfig;
use crate::error::{CallError, ErrorCode};
use crate::exec::{self, ExecError, ExecLimits, ScratchDir};
use crate::oauth::broker::{GrantKind, TokenBroker};
use crate::oauth::managed::{PreparedCredentials, SecretValue};
use crate::oauth::{TokenError, Tokens};
use crate::output::ResultBody;
use crate::plugins::{info::is_capability_name, PluginRegistry, Runner};
use crate::redact::{SecretSpans, Secrets};
use crate::stop::CallStop;
use crate::tenants::{SecretJson, TenantStore};

/// What a caller sends with a call: any of the Lumos envelope's parts. Settings overlay the
/// tenant's stored settings; auth and credentials are used only when the agent holds none.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallBody {
    /// The Lumos connection whose settings and credentials are injected.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// The capability's request object.
    #[serde(default)]
    pub request: Option<Box<RawValue>>,
    /// Settings, overlaid on the tenant's.
    #[serde(default)]
    pub settings: Option<Map<String, Value>>,
    /// Single-credential auth.
    #[serde(default)]
    pub auth: Option<SecretJson>,
    /// Multi-credential list.
    #[serde(default)]
    pub credentials: Option<SecretJson>,
    /// Paging.
    #[serde(default)]
    pub page: Option<Box<RawValue>>,
    /// Ask the connector for raw data too.
    #[serde(default)]
    pub include_raw_data: Option<bool>,
    /// A deadline shorter than the connector's configured one.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// A capability call.
#[derive(Debug)]
pub struct CallRequest {
    /// The connector.
    pub app_id: String,
    /// The capability, e.g. `list_accounts`.
    pub capability: String,
    /// The envelope parts.
    pub body: CallBody,
    /// A deadline shorter than the connector's configured one (the tunnel's `deadline_ms`).
    pub deadline: Option<Duration>,
}

/// A connector's answer, verbatim.
#[derive(Debug)]
pub struct CallAnswer {
    /// The JSON document the connector printed (spooled to disk when large).
    pub json: ResultBody,
    /// The version that answered.
    pub version: Arc<str>,
}

/// Runs capability calls.
#[derive(Debug)]
pub struct Dispatcher {
    metrics: Arc<crate::metrics::Metrics>,
    registry: Arc<PluginRegistry>,
    tenants: Arc<TenantStore>,
    broker: Arc<TokenBroker>,
    scratch: ScratchDir,
    config: Arc<SharedConfig>,
    /// Itself, for refreshes that run the connector's `refresh_access_token`.
    me: Weak<Dispatcher>,
    /// The failed calls' log lines (a broken connector fails every call; the call summary
    /// has them all).
    failed_call_lines: crate::telemetry::LineThrottle,
}

/// The envelope of one call, and the managed credentials it carries (for a reactive refresh).
struct Envelope<'a> {
    rendered: Rendered,
    managed: Option<Managed<'a>>,
}

/// An envelope document, and where its secrets are in it (for the redaction of what the
/// connector logs).
struct Rendered {
    bytes: Zeroizing<Vec<u8>>,
    secrets: SecretSpans,
}

struct Managed<'a> {
    prepared: PreparedCredentials,
    /// The access token each managed credential was given.
    used: Vec<Zeroizing<String>>,
    parts: EnvelopeParts<'a>,
}

/// The non-secret parts of an envelope, kept to build it again after a refresh. The request
/// and page are borrowed from the call: a large request is never copied for this.
struct EnvelopeParts<'a> {
    settings: String,
    request: &'a str,
    page: &'a str,
    include_raw_data: bool,
}

impl Dispatcher {
    /// A dispatcher over the given registry, tenant store and token broker.
    pub fn new(
        registry: Arc<PluginRegistry>,
        tenants: Arc<TenantStore>,
        broker: Arc<TokenBroker>,
        scratch: ScratchDir,
        config: Arc<SharedConfig>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            metrics,
            registry,
            tenants,
            broker,
            scratch,
            config,
            me: me.clone(),
            failed_call_lines: crate::telemetry::LineThrottle::per_minute(),
        })
    }

    /// Counts a call refused before it reached a connector (the tunnel's own limit, a bad
    /// chunk, a stop), with its error code as the outcome, like the calls that fail here: an
    /// overloaded agent shows in `lumos_agent_calls_total` and the call summary. Only names
    /// of a loaded connector and its capabilities become labels.
    pub fn count_refusal(&self, app_id: &str, capability: &str, code: ErrorCode) {
        let connector = self.registry.snapshot().resolve(app_id).ok();
        let capabilities = connector
            .as_ref()
            .and_then(|connector| connector.runnable.as_ref())
            .map(|runnable| &runnable.info.capabilities);
        let (app_label, capability_label) = match capabilities {
            Some(capabilities) if capabilities.iter().any(|c| c == capability) => {
                (app_id, capability)
            }
            Some(_) => (app_id, "(unknown)"),
            None => ("(unknown)", "(unknown)"),
        };
        self.metrics
            .record_call(app_label, capability_label, code.as_str(), Duration::ZERO);
    }

    /// The token broker.
    pub fn broker(&self) -> &Arc<TokenBroker> {
        &self.broker
    }

    /// The tenant store (which also keeps the credential updates owed to the cloud).
    pub fn tenants(&self) -> &Arc<TenantStore> {
        &self.tenants
    }

    /// Runs one call. `cancel` stops it (and kills its processes) early.
    pub async fn call(
        &self,
        req: &CallRequest,
        cancel: &CancellationToken,
    ) -> Result<CallAnswer, CallError> {
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let tenant_id = req.body.tenant_id.clone().unwrap_or_default();
        let result = self
            .call_inner(
                req.app_id.as_str(),
                req.capability.as_str(),
                &req.body,
                req.deadline,
                cancel,
                Admission::Limited,
            )
            .await;
        let elapsed = started.elapsed();
        // Only names the agent validated become labels; a caller's typos do not.
        let (app_label, capability_label, outcome) = match &result {
            Ok(_) => (req.app_id.as_str(), req.capability.as_str(), "answered"),
            Err(e) => match e.code {
                ErrorCode::UnknownConnector => ("(unknown)", "(unknown)", e.code.as_str()),
                ErrorCode::UnsupportedCapability | ErrorCode::ConnectorRejected => {
                    (req.app_id.as_str(), "(unknown)", e.code.as_str())
                }
                code => (req.app_id.as_str(), req.capability.as_str(), code.as_str()),
            },
        };
        self.metrics
            .record_call(app_label, capability_label, outcome, elapsed);
        match &result {
            // Debug, not info: a line per call cost a fifth of the tunnel's throughput
            // (BENCHMARKS.md, issue 5), and at hundreds of calls a second journald's rate limit
            // would drop the warnings among them. The metrics count every call; an access log
            // is `log.level = "info,lumos_agent::dispatch=debug"`.
            Ok(answer) => tracing::debug!(
                app_id = %req.app_id, capability = %req.capability, tenant_id = %tenant_id,
                version = %answer.version, bytes = answer.json.len(), elapsed_ms = elapsed.as_millis() as u64,
                "call answered"
            ),
            Err(e) => {
                if let Some(held_back) = self.failed_call_lines.admit(e.code.as_str()) {
                    tracing::warn!(
                        app_id = %req.app_id, capability = %req.capability, tenant_id = %tenant_id,
                        code = e.code.as_str(), elapsed_ms = elapsed.as_millis() as u64,
                        "call failed: {}{}", e.message, crate::telemetry::held_back_note(held_back)
                    );
                }
            }
        }
        result
    }

    async fn call_inner(
        &self,
        app_id: &str,
        capability: &str,
        body: &CallBody,
        deadline: Option<Duration>,
        cancel: &CancellationToken,
        admission: Admission,
    ) -> Result<CallAnswer, CallError> {
        let inventory = self.registry.snapshot();
        let connector = inventory.resolve(app_id)?;
        let runnable = connector.runnable.as_ref().ok_or_else(|| {
            CallError::new(ErrorCode::Internal, "a ready connector has nothing to run")
        })?;
        if !is_capability_name(capability)
            || !runnable.info.capabilities.iter().any(|c| c == capability)
        {
            return Err(CallError::new(
                ErrorCode::UnsupportedCapability,
                format!(
                    "{app_id} has no capability {capability:?}; it offers {}",
                    runnable.info.capabilities.join(", ")
                ),
            ));
        }
        let mut envelope = self.envelope(app_id, body).await?;
        // The agent's own refreshes through the connector skip the limit: a call that waits
        // for one already holds a slot (with `max_concurrency = 1`, the only one), and they
        // are single-flight per credential, so they add at most one run per credential.
        let _permit = match admission {
            Admission::Limited => match runnable.limits.try_acquire() {
                Some(slot) => Some(slot),
                None => {
                    let mut err = CallError::new(
                        ErrorCode::Busy,
                        format!(
                            "{app_id} is running its maximum of {} calls; retry shortly",
                            runnable.limits.max()
                        ),
                    );
                    err.retry_after_seconds = Some(1);
                    return Err(err);
                }
            },
            Admission::TokenRefresh => None,
        };
        let timeout = [
            body.timeout_secs
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            deadline.filter(|d| !d.is_zero()),
        ]
        .into_iter()
        .flatten()
        .fold(runnable.limits.timeout(), Duration::min);
        let version = connector.version.clone().unwrap_or_default();
        // The call stops when the caller cancels or when this version's drain grace runs out
        // (it was replaced or removed).
        let stop = CallStop::new(cancel, &runnable.drain);
        let runner = &runnable.runner;
        let mut json = self
            .run(
                app_id,
                capability,
                runner,
                &envelope.rendered,
                timeout,
                stop,
            )
            .await?;
        // The app refused the access token (connector-py answers `refreshable` on a 401):
        // refresh once, single-flight, and run once more.
        if let Some(managed) = envelope.managed.as_mut().filter(|_| is_refreshable(&json)) {
            tracing::info!(
                app_id,
                capability,
                "the app refused the access token; refreshing it and running the call once more"
            );
            // Boxed: rare, and large.
            let rendered = Box::pin(self.refresh_after_rejection(managed)).await?;
            json = self
                .run(app_id, capability, runner, &rendered, timeout, stop)
                .await?;
        }
        Ok(CallAnswer { json, version })
    }

    /// Runs the connector once with `envelope`.
    async fn run(
        &self,
        app_id: &str,
        capability: &str,
        runner: &Runner,
        envelope: &Rendered,
        timeout: Duration,
        stop: CallStop<'_>,
    ) -> Result<ResultBody, CallError> {
        let (input, secrets) = (&envelope.bytes[..], &envelope.secrets);
        let answer = match runner {
            // The executable and worker paths are boxed: their futures are large, and every
            // call's future (an in-process one too) would otherwise carry their size, moved
            // at each step. A process spawn or a pipe round trip dwarfs the allocation.
            Runner::Executable { program, env } => {
                return Box::pin(
                    self.run_executable(app_id, capability, program, env, envelope, timeout, stop),
                )
                .await;
            }
            // Native connectors get the envelope in memory (over a private pipe to a worker).
            Runner::Worker(w) => Box::pin(w.call(capability, input, secrets, timeout, stop)).await,
            Runner::InProcess(n) => n.call(capability, input, secrets, timeout, stop).await,
        };
        answer.map(ResultBody::from)
    }

    /// New access tokens for the managed credentials of a call the app refused, and the
    /// envelope with them.
    async fn refresh_after_rejection(
        &self,
        managed: &mut Managed<'_>,
    ) -> Result<Rendered, CallError> {
        for i in 0..managed.prepared.managed.len() {
            let credential = &managed.prepared.managed[i];
            let grant = self.grant_for(credential);
            let token = self
                .broker
                .token_after_rejection(
                    &credential.key,
                    &credential.endpoint,
                    &grant,
                    &managed.used[i],
                )
                .await
                .map_err(|e| token_error(&credential.key.credential_id, &e))?;
            managed.prepared.set_token(i, &token.token);
            managed.used[i] = token.token.clone();
        }
        let (auth, credentials) = managed.prepared.render();
        Ok(render_envelope(
            &managed.parts,
            auth.as_ref(),
            credentials.as_ref(),
        ))
    }

    /// How the broker gets new tokens for `credential`: its grant, or, without a token URL,
    /// the connector's own `refresh_access_token` capability.
    fn grant_for(&self, credential: &crate::oauth::managed::ManagedCredential) -> GrantKind {
        if let Some(grant) = &credential.grant {
            return grant.clone();
        }
        let me = self.me.clone();
        let app_id = credential
            .key
            .token_url
            .strip_prefix("connector://")
            .unwrap_or_default()
            .to_string();
        let credential_id = credential.key.credential_id.clone();
        let client_id = credential.endpoint.client_id.clone();
        let client_secret =
            Zeroizing::new(credential.client_secret().unwrap_or_default().to_string());
        GrantKind::Exchange(Arc::new(move |refresh_token| {
            let me = me.clone();
            let app_id = app_id.clone();
            let request = SecretValue(serde_json::json!({
                "credential_id": credential_id,
                "client_id": client_id,
                "client_secret": client_secret.as_str(),
                "refresh_token": refresh_token.as_deref().map(String::as_str),
            }));
            async move {
                let me = me
                    .upgrade()
                    .ok_or_else(|| TokenError::Unavailable("the agent is stopping".into()))?;
                me.refresh_through_connector(&app_id, &request).await
            }
            .boxed()
        }))
    }

    /// Runs the connector's `refresh_access_token` with `request` and reads the new tokens.
    async fn refresh_through_connector(
        &self,
        app_id: &str,
        request: &SecretValue,
    ) -> Result<Tokens, TokenError> {
        let body = CallBody {
            request: RawValue::from_string(request.0.to_string()).ok(),
            ..CallBody::default()
        };
        let answer = self
            .call_inner(
                app_id,
                "refresh_access_token",
                &body,
                None,
                &CancellationToken::new(),
                Admission::TokenRefresh,
            )
            .await
            .map_err(|e| match e.code {
                // Retrying cannot help: the credential must name its token endpoint.
                ErrorCode::UnsupportedCapability => TokenError::Config {
                    code: "no_refresh_access_token".into(),
                    description: Some(format!(
                        "{app_id} has no refresh_access_token capability to refresh through"
                    )),
                    setting: "token_broker.token_url",
                },
                _ => TokenError::Unavailable(format!(
                    "{app_id}'s refresh_access_token failed: {}",
                    e.message
                )),
            })?;
        let json = answer.json;
        let doc: SecretValue = tokio::task::spawn_blocking(move || {
            let mut text = Zeroizing::new(String::new());
            json.reader().read_to_string(&mut text).ok()?;
            serde_json::from_str(&text).ok().map(SecretValue)
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            TokenError::Unavailable(format!(
                "{app_id}'s refresh_access_token did not answer JSON"
            ))
        })?;
        if doc.0.get("is_error") == Some(&Value::Bool(true)) {
            let words = doc.0.get("error").map(Value::to_string).unwrap_or_default();
            // The connector's own words for a refused refresh token.
            return Err(if words.contains("invalid_grant") {
                TokenError::InvalidGrant {
                    description: Some(format!("{app_id}'s refresh_access_token was refused")),
                }
            } else {
                TokenError::Unavailable(format!(
                    "{app_id}'s refresh_access_token answered an error"
                ))
            });
        }
        let response = doc.0.get("response");
        let text = |name: &str| {
            response
                .and_then(|r| r.get(name))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(|t| Zeroizing::new(t.to_string()))
        };
        let access_token = text("access_token").ok_or_else(|| {
            TokenError::Unavailable(format!(
                "{app_id}'s refresh_access_token answered no access_token"
            ))
        })?;
        Ok(Tokens {
            access_token,
            refresh_token: text("refresh_token"),
            // connector-py's answer carries no lifetime: the token is used until an app
            // refuses it (then the reactive refresh takes over).
            expires_at: None,
            token_type: "Bearer".into(),
            scope: None,
        })
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one private step of call_inner; named arguments read best"
    )]
    async fn run_executable(
        &self,
        app_id: &str,
        capability: &str,
        program: &std::path::Path,
        env: &crate::exec::ProcessEnv,
        envelope: &Rendered,
        timeout: Duration,
        stop: CallStop<'_>,
    ) -> Result<ResultBody, CallError> {
        let input = self
            .scratch
            .write_secret_file(&envelope.bytes)
            .map_err(|e| {
                CallError::new(
                    ErrorCode::Internal,
                    format!("cannot write the call input file: {e}"),
                )
            })?;
        let config = self.config.get();
        let stderr_log = StderrLog {
            secrets: Secrets::of_envelope(&envelope.bytes, &envelope.secrets),
            keep: config.calls.stderr_log_bytes,
        };
        let limits = ExecLimits {
            timeout,
            kill_grace: config.calls.kill_grace,
            max_output_bytes: config.calls.max_output_bytes,
            // A secret the capture's cut splits is caught whole in the margin, redacted, and
            // only then cut (`StderrLog::render`).
            stderr_keep: stderr_log.keep.saturating_add(stderr_log.secrets.longest()),
            spool_dir: self.scratch.path().to_path_buf(),
        };
        let args = [
            OsString::from(capability),
            OsString::from("--json-file"),
            input.path().as_os_str().to_owned(),
        ];
        let output = exec::run(program, &args, env, &limits, stop).await;
        drop(input);
        let output = output.map_err(|e| exec_error(app_id, e))?;
        if output.stdout.in_memory() {
            return classify_output(app_id, output, &stderr_log);
        }
        // A large answer: the streaming JSON check reads it from disk, off the async threads.
        let app_id = app_id.to_string();
        tokio::task::spawn_blocking(move || classify_output(&app_id, output, &stderr_log))
            .await
            .map_err(|e| CallError::new(ErrorCode::Internal, format!("output check failed: {e}")))?
    }

    /// `{"request", "settings", "auth" | "credentials", "page", "include_raw_data"}`, spliced
    /// from raw JSON so secrets are copied once, into a buffer that is zeroized. Managed OAuth
    /// credentials get a fresh access token from the broker first.
    async fn envelope<'a>(
        &self,
        app_id: &str,
        body: &'a CallBody,
    ) -> Result<Envelope<'a>, CallError> {
        let tenant_id = body.tenant_id.as_deref().unwrap_or_default();
        let stored = match tenant_id {
            "" => None,
            id => self.tenants.get(id),
        };
        if let Some(tenant) = &stored {
            if tenant.app_id != app_id {
                return Err(CallError::new(
                    ErrorCode::TenantMismatch,
                    format!("tenant {tenant_id:?} belongs to {}, not {app_id}; its credentials are not sent to another connector", tenant.app_id),
                ));
            }
        }
        let mut settings = stored
            .as_ref()
            .map(|t| t.settings.clone())
            .unwrap_or_default();
        if let Some(overlay) = &body.settings {
            settings.extend(overlay.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let agent_holds_secrets = stored
            .as_ref()
            .is_some_and(|t| t.auth.is_some() || t.credentials.is_some());
        let (auth, credentials): (Option<&SecretJson>, Option<&SecretJson>) = match &stored {
            Some(t) if agent_holds_secrets => (t.auth.as_ref(), t.credentials.as_ref()),
            _ => (body.auth.as_ref(), body.credentials.as_ref()),
        };
        let prepared = PreparedCredentials::parse(tenant_id, app_id, &settings, auth, credentials)
            .map_err(|e| {
                CallError::new(
                    ErrorCode::BadRequest,
                    format!("a managed credential is misconfigured: {e}"),
                )
            })?;
        let parts = EnvelopeParts {
            settings: serde_json::to_string(&settings)
                .map_err(|e| CallError::new(ErrorCode::Internal, e.to_string()))?,
            request: body.request.as_deref().map_or("{}", RawValue::get),
            page: body.page.as_deref().map_or("null", RawValue::get),
            include_raw_data: body.include_raw_data == Some(true),
        };
        let Some(mut prepared) = prepared else {
            return Ok(Envelope {
                rendered: render_envelope(&parts, auth, credentials),
                managed: None,
            });
        };
        if tenant_id.is_empty() {
            return Err(CallError::new(
                ErrorCode::BadRequest,
                "a call with managed OAuth credentials (token_broker) needs a tenant_id: tokens are kept per tenant",
            ));
        }
        let mut used = Vec::with_capacity(prepared.managed.len());
        for i in 0..prepared.managed.len() {
            let credential = &prepared.managed[i];
            if credential.needs_reconsent {
                return Err(token_error(
                    &credential.key.credential_id,
                    &TokenError::InvalidGrant { description: None },
                ));
            }
            let grant = self.grant_for(credential);
            let token = self
                .broker
                .token_presented(
                    &credential.key,
                    &credential.endpoint,
                    &grant,
                    credential.presented_refresh_token(),
                    // Only when the broker (re)seeds the credential: a cloud-held one may have
                    // newer tokens in an update the cloud has not acknowledged yet.
                    || {
                        let update = (!agent_holds_secrets)
                            .then(|| {
                                self.tenants
                                    .pending_update(tenant_id, &credential.key.credential_id)
                            })
                            .flatten();
                        credential.seed(update.as_ref())
                    },
                )
                .await
                .map_err(|e| token_error(&credential.key.credential_id, &e))?;
            prepared.set_token(i, &token.token);
            used.push(token.token.clone());
        }
        let (auth, credentials) = prepared.render();
        Ok(Envelope {
            rendered: render_envelope(&parts, auth.as_ref(), credentials.as_ref()),
            managed: Some(Managed {
                prepared,
                used,
                parts,
            }),
        })
    }
}

/// The envelope document from its parts.
fn render_envelope(
    parts: &EnvelopeParts<'_>,
    auth: Option<&SecretJson>,
    credentials: Option<&SecretJson>,
) -> Rendered {
    let (request, page) = (parts.request, parts.page);
    let mut out = Zeroizing::new(Vec::with_capacity(
        request.len()
            + parts.settings.len()
            + page.len()
            + auth.map_or(0, |a| a.expose().len())
            + credentials.map_or(0, |c| c.expose().len())
            + 128,
    ));
    // Appends `"key":value` and answers where the value is.
    let field = |out: &mut Vec<u8>, key: &[u8], value: &str| {
        out.extend_from_slice(key);
        let start = out.len();
        out.extend_from_slice(value.as_bytes());
        start..out.len()
    };
    let mut secrets = SecretSpans {
        request: Some(field(&mut out, b"{\"request\":", request)),
        ..SecretSpans::default()
    };
    field(&mut out, b",\"settings\":", &parts.settings);
    secrets.auth = auth.map(|auth| field(&mut out, b",\"auth\":", auth.expose()));
    secrets.credentials =
        credentials.map(|credentials| field(&mut out, b",\"credentials\":", credentials.expose()));
    field(&mut out, b",\"page\":", page);
    out.extend_from_slice(if parts.include_raw_data {
        b",\"include_raw_data\":true}"
    } else {
        b",\"include_raw_data\":false}"
    });
    Rendered {
        bytes: out,
        secrets,
    }
}

/// Whether a run counts against the connector's concurrency limit.
#[derive(Debug, Clone, Copy)]
enum Admission {
    /// A caller's call: above the limit it is refused with `agent.busy`.
    Limited,
    /// The agent refreshing a managed credential through the connector.
    TokenRefresh,
}

/// A broker failure as the call's error: re-consent is the caller's to fix; the rest is
/// retryable later.
fn token_error(credential_id: &str, e: &TokenError) -> CallError {
    match e {
        TokenError::InvalidGrant { .. } => CallError::new(
            ErrorCode::NeedsReconsent,
            format!("the credential {credential_id:?} was refused by its authorization server (invalid_grant): an admin must connect it again"),
        ),
        TokenError::Config { .. } => CallError::new(
            ErrorCode::CredentialMisconfigured,
            format!("cannot refresh the credential {credential_id:?}: {e}"),
        ),
        TokenError::RateLimited { retry_after } => {
            let mut err = CallError::new(
                ErrorCode::TokenRefreshFailed,
                format!("cannot refresh the credential {credential_id:?}: {e}"),
            );
            err.retry_after_seconds = Some(retry_after.as_secs().max(1));
            err
        }
        TokenError::Unavailable(_) => {
            let mut err = CallError::new(
                ErrorCode::TokenRefreshFailed,
                format!("cannot refresh the credential {credential_id:?}: {e}"),
            );
            err.retry_after_seconds = Some(5);
            err
        }
    }
}

/// Whether a connector's answer says the access token was refused and a refresh may help
/// (`error.error_metadata.refreshable`, which connector-py sets on an HTTP 401).
fn is_refreshable(json: &ResultBody) -> bool {
    // Such answers are small error documents; a large answer is data.
    if !json.in_memory() || json.len() > 64 * 1024 {
        return false;
    }
    let mut text = Vec::new();
    if json.reader().read_to_end(&mut text).is_err() {
        return false;
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        is_error: bool,
        error: Option<ErrorPart>,
    }
    #[derive(Deserialize)]
    struct ErrorPart {
        error_metadata: Option<Metadata>,
    }
    #[derive(Deserialize)]
    struct Metadata {
        #[serde(default)]
        refreshable: bool,
    }
    serde_json::from_slice::<Answer>(&text).is_ok_and(|a| {
        a.is_error
            && a.error
                .and_then(|e| e.error_metadata)
                .is_some_and(|m| m.refreshable)
    })
}

fn exec_error(app_id: &str, e: ExecError) -> CallError {
    match e {
        ExecError::Timeout(t) => CallError::new(
            ErrorCode::Timeout,
            format!("{app_id} gave no answer within {t:?}; its processes were stopped"),
        ),
        ExecError::OutputTooLarge(limit) => CallError::new(
            ErrorCode::OutputTooLarge,
            format!("{app_id} printed more than {limit} bytes (calls.max_output_bytes); its processes were stopped"),
        ),
        ExecError::Cancelled => CallError::new(ErrorCode::Cancelled, "the call was cancelled; its processes were stopped"),
        ExecError::StdoutHeldOpen => CallError::new(
            ErrorCode::BadOutput,
            format!("{app_id} exited but a detached process kept its output open; the answer was discarded"),
        ),
        ExecError::Spawn { source, .. } => {
            CallError::new(ErrorCode::ConnectorCrashed, format!("cannot start {app_id}: {source}"))
        }
        ExecError::Io(e) => CallError::new(ErrorCode::Internal, format!("reading {app_id}'s output failed: {e}")),
    }
}

/// How an executable's stderr tail reaches the log.
struct StderrLog {
    /// The call's secrets: a connector may print its input on stderr.
    secrets: Secrets,
    /// How much of the tail is logged (`calls.stderr_log_bytes`).
    keep: usize,
}

impl StderrLog {
    /// The captured tail, redacted, then cut to `keep` bytes, trimmed.
    fn render(&self, captured: &str) -> String {
        let tail = self.secrets.redact_tail(captured, self.keep);
        tail.trim().to_string()
    }
}

/// One JSON document on stdout is the answer, whatever the exit code (connector-py exits 0 on
/// its own errors, and a non-zero exit with a valid document still carries the connector's
/// words). Log lines before the document are tolerated; anything else is `bad_output`, or
/// `connector_crashed` when the process died.
fn classify_output(
    app_id: &str,
    output: exec::ProcessOutput,
    stderr_log: &StderrLog,
) -> Result<ResultBody, CallError> {
    let status = exec::describe_status(&output.status);
    let tail = stderr_log.render(&output.stderr_tail);
    if !output.status.success() {
        tracing::warn!(
            app_id,
            "connector {status}; stderr tail: {}",
            if tail.is_empty() { "(empty)" } else { &tail }
        );
    } else if !tail.is_empty() {
        tracing::debug!(app_id, "connector stderr tail: {tail}");
    }
    let stdout = output.stdout;
    let parse_error = match stdout.is_one_json_document() {
        Ok(()) => return Ok(stdout),
        Err(e) => e,
    };
    if let Some(last) = last_json_line(&stdout) {
        tracing::warn!(
            app_id,
            discarded_bytes = stdout.len() - last.len(),
            "connector printed text before its JSON answer; it was dropped"
        );
        return Ok(last);
    }
    if !output.status.success() {
        return Err(CallError::new(
            ErrorCode::ConnectorCrashed,
            format!("{app_id} {status} without an answer (see the agent log for its stderr)"),
        ));
    }
    if blank(&stdout) {
        return Err(CallError::new(
            ErrorCode::BadOutput,
            format!("{app_id} exited without printing an answer"),
        ));
    }
    Err(CallError::new(
        ErrorCode::BadOutput,
        format!(
            "{app_id} printed {} bytes that are not one JSON document ({parse_error})",
            stdout.len()
        ),
    ))
}

/// The last non-empty line after other text, if it is a JSON object, as a slice of `stdout`
/// (no copy).
fn last_json_line(stdout: &ResultBody) -> Option<ResultBody> {
    let (start, end) = stdout.last_line().ok()??;
    let line = stdout.slice(start, end);
    let mut first = [0u8; 1];
    let starts_with_brace = line.reader().read_exact(&mut first).is_ok() && first[0] == b'{';
    (starts_with_brace && line.is_one_json_document().is_ok()).then_some(line)
}

/// Whether the output is empty or only whitespace.
fn blank(stdout: &ResultBody) -> bool {
    std::io::BufReader::new(stdout.reader())
        .bytes()
        .all(|b| b.is_ok_and(|b| b.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn out(stdout: &str, code: i32) -> exec::ProcessOutput {
        exec::ProcessOutput {
            stdout: ResultBody::from(stdout.as_bytes().to_vec()),
            status: crate::platform::exit_status(code),
            stderr_tail: Default::default(),
        }
    }

    fn classify(output: exec::ProcessOutput) -> Result<Bytes, CallError> {
        let stderr_log = StderrLog {
            secrets: Secrets::default(),
            keep: 64,
        };
        match classify_output("a", output, &stderr_log)? {
            ResultBody::Memory(bytes) => Ok(bytes),
            ResultBody::Spooled(_) => unreachable!("small outputs stay in memory"),
        }
    }

    #[test]
    fn a_rendered_envelope_knows_where_its_secrets_are() {
        let parts = EnvelopeParts {
            settings: r#"{"domain":"example.test"}"#.into(),
            request: r#"{"refresh_token":"RT-canary"}"#,
            page: "null",
            include_raw_data: true,
        };
        let auth =
            SecretJson::from_value(&serde_json::json!({"oauth": {"access_token": "AT-canary"}}));
        let credentials = SecretJson::from_value(
            &serde_json::json!([{"id": "c", "basic": {"password": "PW-canary"}}]),
        );
        for (auth, credentials) in [
            (Some(&auth), Some(&credentials)),
            (Some(&auth), None),
            (None, Some(&credentials)),
            (None, None),
        ] {
            let rendered = render_envelope(&parts, auth, credentials);
            // The spans it records are the ones a parser finds in the document.
            assert_eq!(rendered.secrets, SecretSpans::find(&rendered.bytes));
            assert_eq!(
                rendered.secrets.auth.is_some(),
                auth.is_some(),
                "{:?}",
                rendered.secrets
            );
            let text = Secrets::of_envelope(&rendered.bytes, &rendered.secrets)
                .redact("AT-canary PW-canary RT-canary example.test");
            assert_eq!(
                text.matches("[redacted]").count(),
                1 + usize::from(auth.is_some()) + usize::from(credentials.is_some()),
                "{text}"
            );
            assert!(
                text.ends_with("example.test"),
                "settings are no secret: {text}"
            );
        }
    }

    #[test]
    fn output_classification() {
        assert_eq!(
            &classify(out("{\"response\":1}\n", 0)).unwrap()[..],
            b"{\"response\":1}\n"
        );
        assert_eq!(
            &classify(out("log line\n{\"response\":1}\n", 0)).unwrap()[..],
            b"{\"response\":1}"
        );
        assert_eq!(
            classify(out("garbage", 0)).unwrap_err().code,
            ErrorCode::BadOutput
        );
        assert_eq!(classify(out("", 0)).unwrap_err().code, ErrorCode::BadOutput);
        assert_eq!(
            classify(out("Traceback", 1)).unwrap_err().code,
            ErrorCode::ConnectorCrashed
        );
        // A non-zero exit with a document: the connector's words win.
        assert_eq!(
            &classify(out("{\"is_error\":true}", 2)).unwrap()[..],
            b"{\"is_error\":true}"
        );
    }

    #[test]
    fn call_body_rejects_unknown_fields_and_keeps_secrets_out_of_debug() {
        assert!(serde_json::from_str::<CallBody>(r#"{"tenant": "x"}"#).is_err());
        let body: CallBody = serde_json::from_str(
            r#"{"tenant_id": "t", "auth": {"oauth": {"access_token": "CANARY"}}}"#,
        )
        .unwrap();
        assert!(!format!("{body:?}").contains("CANARY"));
    }
}
