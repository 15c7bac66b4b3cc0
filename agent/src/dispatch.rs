//! Capability calls: find the connector, build the envelope with the tenant's settings and
//! credentials, run it under its deadline and concurrency limit, and hand back its JSON
//! verbatim (or an agent error in the same shape).

use std::ffi::OsString;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::config::SharedConfig;
use crate::error::{CallError, ErrorCode};
use crate::exec::{self, ExecError, ExecLimits, ScratchDir};
use crate::output::ResultBody;
use crate::plugins::{info::is_capability_name, PluginRegistry, Runner};
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
    pub version: String,
}

/// Runs capability calls.
#[derive(Debug)]
pub struct Dispatcher {
    metrics: Arc<crate::metrics::Metrics>,
    registry: Arc<PluginRegistry>,
    tenants: Arc<TenantStore>,
    scratch: ScratchDir,
    config: Arc<SharedConfig>,
}

impl Dispatcher {
    /// A dispatcher over the given registry and tenant store.
    pub fn new(
        registry: Arc<PluginRegistry>,
        tenants: Arc<TenantStore>,
        scratch: ScratchDir,
        config: Arc<SharedConfig>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            registry,
            tenants,
            scratch,
            config,
        }
    }

    /// Runs one call. `cancel` stops it (and kills its processes) early.
    pub async fn call(
        &self,
        req: CallRequest,
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
            Ok(answer) => tracing::info!(
                app_id = %req.app_id, capability = %req.capability, tenant_id = %tenant_id,
                version = %answer.version, bytes = answer.json.len(), elapsed_ms = elapsed.as_millis() as u64,
                "call answered"
            ),
            Err(e) => tracing::warn!(
                app_id = %req.app_id, capability = %req.capability, tenant_id = %tenant_id,
                code = e.code.as_str(), elapsed_ms = elapsed.as_millis() as u64, "call failed: {}", e.message
            ),
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
        let envelope = self.envelope(app_id, body)?;
        let Ok(_permit) = runnable.limiter.clone().try_acquire_owned() else {
            let mut err = CallError::new(
                ErrorCode::Busy,
                format!(
                    "{app_id} is running its maximum of {} calls; retry shortly",
                    self.config.get().max_concurrency_for(app_id)
                ),
            );
            err.retry_after_seconds = Some(1);
            return Err(err);
        };
        let timeout = [
            body.timeout_secs
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            deadline.filter(|d| !d.is_zero()),
        ]
        .into_iter()
        .flatten()
        .fold(runnable.timeout, Duration::min);
        let version = connector.version.clone().unwrap_or_default();
        // The call stops when the caller cancels or when this version's drain grace runs out
        // (it was replaced or removed); the relay forwards the first into the second's child.
        let call_token = runnable.drain.child_token();
        let relay = async {
            cancel.cancelled().await;
            call_token.cancel();
            std::future::pending::<std::convert::Infallible>().await
        };
        let run = async {
            match &runnable.runner {
                Runner::Executable { program, env } => {
                    self.run_executable(
                        app_id,
                        capability,
                        program,
                        env,
                        &envelope,
                        timeout,
                        &call_token,
                    )
                    .await
                }
                // Native connectors get the envelope in memory (over a private pipe to a worker).
                Runner::Worker(worker) => worker
                    .call(capability, &envelope, timeout, &call_token)
                    .await
                    .map(ResultBody::from),
                Runner::InProcess(native) => native
                    .call(capability, &envelope, timeout, &call_token)
                    .await
                    .map(ResultBody::from),
            }
        };
        let json = tokio::select! {
            result = run => result?,
            never = relay => match never {},
        };
        Ok(CallAnswer { json, version })
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
        envelope: &[u8],
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<ResultBody, CallError> {
        let input = self.scratch.write_secret_file(envelope).map_err(|e| {
            CallError::new(
                ErrorCode::Internal,
                format!("cannot write the call input file: {e}"),
            )
        })?;
        let config = self.config.get();
        let limits = ExecLimits {
            timeout,
            kill_grace: config.calls.kill_grace,
            max_output_bytes: config.calls.max_output_bytes,
            stderr_keep: config.calls.stderr_log_bytes,
            spool_dir: self.scratch.path().to_path_buf(),
        };
        let args = [
            OsString::from(capability),
            OsString::from("--json-file"),
            input.path().as_os_str().to_owned(),
        ];
        let output = exec::run(program, &args, env, &limits, cancel).await;
        drop(input);
        let output = output.map_err(|e| exec_error(app_id, e))?;
        if output.stdout.in_memory() {
            return classify_output(app_id, output, envelope);
        }
        // A large answer: the streaming JSON check reads it from disk, off the async threads.
        let app_id = app_id.to_string();
        let envelope = Zeroizing::new(envelope.to_vec());
        tokio::task::spawn_blocking(move || classify_output(&app_id, output, &envelope))
            .await
            .map_err(|e| CallError::new(ErrorCode::Internal, format!("output check failed: {e}")))?
    }

    /// `{"request", "settings", "auth" | "credentials", "page", "include_raw_data"}`, spliced
    /// from raw JSON so secrets are copied once, into a buffer that is zeroized.
    fn envelope(&self, app_id: &str, body: &CallBody) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let stored = match body.tenant_id.as_deref() {
            Some(id) if !id.is_empty() => self.tenants.get(id),
            _ => None,
        };
        if let Some(tenant) = &stored {
            if tenant.app_id != app_id {
                return Err(CallError::new(
                    ErrorCode::TenantMismatch,
                    format!("tenant {:?} belongs to {}, not {app_id}; its credentials are not sent to another connector", body.tenant_id.as_deref().unwrap_or_default(), tenant.app_id),
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

        let settings = serde_json::to_string(&settings)
            .map_err(|e| CallError::new(ErrorCode::Internal, e.to_string()))?;
        let request = body.request.as_deref().map_or("{}", RawValue::get);
        let page = body.page.as_deref().map_or("null", RawValue::get);
        let mut out = Zeroizing::new(Vec::with_capacity(
            request.len()
                + settings.len()
                + page.len()
                + auth.map_or(0, |a| a.expose().len())
                + credentials.map_or(0, |c| c.expose().len())
                + 128,
        ));
        out.extend_from_slice(b"{\"request\":");
        out.extend_from_slice(request.as_bytes());
        out.extend_from_slice(b",\"settings\":");
        out.extend_from_slice(settings.as_bytes());
        if let Some(auth) = auth {
            out.extend_from_slice(b",\"auth\":");
            out.extend_from_slice(auth.expose().as_bytes());
        }
        if let Some(credentials) = credentials {
            out.extend_from_slice(b",\"credentials\":");
            out.extend_from_slice(credentials.expose().as_bytes());
        }
        out.extend_from_slice(b",\"page\":");
        out.extend_from_slice(page.as_bytes());
        out.extend_from_slice(if body.include_raw_data == Some(true) {
            b",\"include_raw_data\":true}"
        } else {
            b",\"include_raw_data\":false}"
        });
        Ok(out)
    }
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

/// One JSON document on stdout is the answer, whatever the exit code (connector-py exits 0 on
/// its own errors, and a non-zero exit with a valid document still carries the connector's
/// words). Log lines before the document are tolerated; anything else is `bad_output`, or
/// `connector_crashed` when the process died.
fn classify_output(
    app_id: &str,
    output: exec::ProcessOutput,
    envelope: &[u8],
) -> Result<ResultBody, CallError> {
    let status = exec::describe_status(&output.status);
    if !output.status.success() {
        // A connector may print its input on stderr; its secrets must not reach the log.
        let tail = redact_secrets(output.stderr_tail.trim(), envelope);
        let tail = tail.as_str();
        tracing::warn!(
            app_id,
            "connector {status}; stderr tail: {}",
            if tail.is_empty() { "(empty)" } else { tail }
        );
    } else if !output.stderr_tail.trim().is_empty() {
        tracing::debug!(
            app_id,
            "connector stderr tail: {}",
            redact_secrets(output.stderr_tail.trim(), envelope)
        );
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

/// `text` with every secret of the call's envelope (each string in its `auth` and `credentials`)
/// replaced by `[redacted]`.
fn redact_secrets(text: &str, envelope: &[u8]) -> String {
    fn collect(value: &Value, out: &mut Vec<Zeroizing<String>>) {
        match value {
            // Short strings ("oauth", "Bearer") are labels, not secrets, and would redact noise.
            Value::String(s) if s.len() >= 6 => out.push(Zeroizing::new(s.clone())),
            Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            Value::Object(map) => map.values().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut secrets = Vec::new();
    // The parsed copy cannot be zeroized (serde_json::Value); it lives only for this call, on
    // the rare path where a connector wrote to stderr.
    if let Ok(doc) = serde_json::from_slice::<Value>(envelope) {
        for key in ["auth", "credentials"] {
            if let Some(part) = doc.get(key) {
                collect(part, &mut secrets);
            }
        }
    }
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_string();
    for secret in &secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "[redacted]");
        }
    }
    out
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
            stderr_tail: String::new(),
        }
    }

    fn classify(output: exec::ProcessOutput) -> Result<Bytes, CallError> {
        match classify_output("a", output, b"{}")? {
            ResultBody::Memory(bytes) => Ok(bytes),
            ResultBody::Spooled(_) => unreachable!("small outputs stay in memory"),
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
    fn secrets_of_the_envelope_are_redacted() {
        let envelope = br#"{"request":{},"settings":{"region":"eu-west"},"auth":{"oauth":{"access_token":"CANARY-TOKEN-1","refresh_token":"CANARY-REFRESH-2"}},"credentials":[{"id":"x","basic":{"password":"hunter2-CANARY"}}]}"#;
        let text = "got token CANARY-TOKEN-1 and CANARY-REFRESH-2 and hunter2-CANARY in eu-west";
        let redacted = redact_secrets(text, envelope);
        assert_eq!(
            redacted,
            "got token [redacted] and [redacted] and [redacted] in eu-west"
        );
        assert_eq!(
            redact_secrets("no secrets here", b"not json"),
            "no secrets here"
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
