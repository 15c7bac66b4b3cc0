//! The OAuth 2.0 token endpoint (RFC 6749 §3.2, §4.4, §6): the requests the token broker makes,
//! and a defensive reading of what comes back. This is the broker's wire layer (issue 6); the
//! broker itself (single-flight per credential, caching, rotation-safe persistence) builds on it.
//!
//! - Grants: `refresh_token`, `client_credentials`, `password`.
//! - Client authentication fixed per credential: `client_secret_basic` (id and secret each
//!   form-urlencoded before base64, RFC 6749 §2.3.1) or `client_secret_post`; a refusal is never
//!   retried with the other style.
//! - The request as a form body, a JSON body or a query string; an optional API-key header.
//! - Answers are classified, not trusted: a 200 with an `error`, an HTML 502, an empty or
//!   oversized body, `expires_in` as a string, missing, zero, negative or huge, `token_type` in
//!   any case or missing.
//! - Errors never carry a secret: the server's `error_description` is scrubbed of every secret
//!   the request sent, in case the server echoes it.

pub mod broker;
pub mod managed;

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use zeroize::Zeroizing;

/// Largest token response read; anything longer is not a token response.
const MAX_BODY: usize = 64 << 10;
/// A `Retry-After` longer than this is capped: a misconfigured server must not park a
/// credential for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// When a 429 names no (usable) `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// `expires_in` beyond this (a year) is treated as this.
const MAX_EXPIRES_IN: u64 = 365 * 86_400;

/// How the client proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))`.
    Basic,
    /// `client_id` and `client_secret` in the request body.
    Post,
}

/// Where the request's parameters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded` (the standard).
    Form,
    /// A JSON object (some APIs want this).
    Json,
    /// The URL's query string, empty body (a few old APIs).
    Query,
}

/// A token endpoint and the client registered at it. Secrets are zeroized on drop and never
/// shown by `Debug`.
#[derive(Clone)]
pub struct TokenEndpoint {
    /// The token URL (may have been built from the tenant's settings).
    pub url: String,
    /// The client id.
    pub client_id: String,
    /// The client secret, if the client has one.
    pub client_secret: Option<Zeroizing<String>>,
    /// How the client authenticates.
    pub auth: ClientAuth,
    /// How the parameters are sent.
    pub format: BodyFormat,
    /// Scopes to ask for (`scope`, space-separated); empty: none sent.
    pub scopes: Vec<String>,
    /// An API-key header some apps want beside the client authentication.
    pub api_key: Option<(HeaderName, Zeroizing<String>)>,
}

impl fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("auth", &self.auth)
            .field("format", &self.format)
            .field("scopes", &self.scopes)
            .field("api_key", &self.api_key.as_ref().map(|(h, _)| h))
            .finish()
    }
}

/// What to exchange for a token.
pub enum Grant<'a> {
    /// `grant_type=refresh_token`.
    RefreshToken(&'a str),
    /// `grant_type=client_credentials`.
    ClientCredentials,
    /// `grant_type=password` (only where an app needs it).
    Password {
        /// The resource owner.
        username: &'a str,
        /// Their password.
        password: &'a str,
    },
}

impl fmt::Debug for Grant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RefreshToken(_) => "RefreshToken([redacted])",
            Self::ClientCredentials => "ClientCredentials",
            Self::Password { .. } => "Password([redacted])",
        })
    }
}

/// A token response that holds an access token.
#[derive(Clone)]
pub struct Tokens {
    /// The access token.
    pub access_token: Zeroizing<String>,
    /// A new refresh token, if the server rotated it (or issued one).
    pub refresh_token: Option<Zeroizing<String>>,
    /// When the access token expires, as an absolute time; `None` if the server did not say.
    pub expires_at: Option<SystemTime>,
    /// `token_type` as sent (normalised to `Bearer` when it says so in any case, or is missing).
    pub token_type: String,
    /// `scope`, if the server named the granted scopes.
    pub scope: Option<String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"[redacted]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Why no token came back, in the classes the broker acts on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// `invalid_grant`: the refresh token (or password) is no longer good. The credential needs
    /// re-consent; retrying cannot help.
    #[error("the authorization server refused the grant (invalid_grant{}): the credential needs re-consent", describe(.description))]
    InvalidGrant {
        /// `error_description`, scrubbed of secrets.
        description: Option<String>,
    },
    /// The client's registration or the agent's settings are wrong: retrying cannot help until
    /// an admin changes `setting`.
    #[error("the authorization server rejected the request ({code}{}); check {setting}", describe(.description))]
    Config {
        /// The OAuth error code (`invalid_client`, `invalid_scope`, …) or the HTTP status.
        code: String,
        /// `error_description`, scrubbed of secrets.
        description: Option<String>,
        /// The setting to check.
        setting: &'static str,
    },
    /// 429: wait `retry_after` (shared by every credential of the same token host).
    #[error("rate limited by the authorization server; retry after {retry_after:?}")]
    RateLimited {
        /// How long to wait (from `Retry-After`, capped).
        retry_after: Duration,
    },
    /// 5xx, a timeout, a reset, an answer that is not a token response: retry with backoff
    /// while the still-valid token keeps being served.
    #[error("the authorization server is unavailable: {0}")]
    Unavailable(String),
}

impl TokenError {
    /// The class, for metrics labels and logs: `invalid_grant`, `config`, `rate_limited`,
    /// `unavailable`.
    pub fn class(&self) -> &'static str {
        match self {
            Self::InvalidGrant { .. } => "invalid_grant",
            Self::Config { .. } => "config",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

fn describe(description: &Option<String>) -> String {
    description
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Talks to token endpoints (HTTPS with the agent's trust store; `http://` too, for local
/// servers). Cheap to clone.
#[derive(Clone)]
pub struct TokenClient {
    http: HttpsClient,
    timeout: Duration,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenClient {
    /// A client trusting the web PKI, the system store and `ca_file` (`oauth.ca_file`); each
    /// request gets `timeout` in all.
    pub fn new(
        ca_file: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Self, crate::tunnel::transport::TransportError> {
        // hyper-rustls sets ALPN itself (and refuses a config that already has one).
        let tls = crate::tunnel::transport::client_config(
            ca_file.map(|path| ("oauth.ca_file", path)),
            &[],
        )?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            http: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        })
    }

    /// Asks `endpoint` for a token with `grant`.
    pub async fn request(
        &self,
        endpoint: &TokenEndpoint,
        grant: Grant<'_>,
    ) -> Result<Tokens, TokenError> {
        let secrets = secrets_of(endpoint, &grant);
        let request = build_request(endpoint, &grant)?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                // Scrubbed: a query-mode request carries its secrets in the URL.
                TokenError::Unavailable(scrub(&crate::tunnel::transport::error_chain(&e), &secrets))
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map(|b| Zeroizing::new(b.to_bytes().to_vec()))
                .map_err(|e| {
                    TokenError::Unavailable(if e.is::<http_body_util::LengthLimitError>() {
                        format!("the answer is over {MAX_BODY} bytes: not a token response")
                    } else {
                        format!("reading the answer failed: {e}")
                    })
                })?;
            Ok::<_, TokenError>((status, retry_after, body))
        };
        let (status, retry_after, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                TokenError::Unavailable(format!("no answer within {:?}", self.timeout))
            })??;
        classify(
            status,
            retry_after.as_deref(),
            &body,
            SystemTime::now(),
            &secrets,
        )
    }
}

/// The values that must never appear in an error: the client secret, the refresh token, the
/// password, the API key.
fn secrets_of(endpoint: &TokenEndpoint, grant: &Grant<'_>) -> Vec<Zeroizing<String>> {
    let mut secrets: Vec<Zeroizing<String>> = Vec::new();
    if let Some(secret) = &endpoint.client_secret {
        secrets.push(secret.clone());
        if endpoint.auth == ClientAuth::Basic {
            // A server that echoes headers would echo this one.
            let header = client_secret_basic(&endpoint.client_id, secret);
            secrets.push(Zeroizing::new(
                header.trim_start_matches("Basic ").to_string(),
            ));
        }
    }
    if let Some((_, key)) = &endpoint.api_key {
        secrets.push(key.clone());
    }
    match grant {
        Grant::RefreshToken(token) => secrets.push(Zeroizing::new((*token).to_string())),
        Grant::Password { password, .. } => secrets.push(Zeroizing::new((*password).to_string())),
        Grant::ClientCredentials => {}
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// Every byte but RFC 3986's unreserved characters is percent-encoded in Basic credentials.
const BASIC_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1). Spaces become `%20`,
/// not `+`: a form decoder reads both, but servers that decode with a plain percent-decoder
/// (authlib's `unquote`, for one) would keep a `+`.
pub fn client_secret_basic(client_id: &str, client_secret: &str) -> Zeroizing<String> {
    let id = percent_encoding::utf8_percent_encode(client_id, BASIC_ENCODE).to_string();
    let secret = Zeroizing::new(
        percent_encoding::utf8_percent_encode(client_secret, BASIC_ENCODE).to_string(),
    );
    let pair = Zeroizing::new(format!("{id}:{}", secret.as_str()));
    Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
    ))
}

fn build_request(
    endpoint: &TokenEndpoint,
    grant: &Grant<'_>,
) -> Result<Request<Full<Bytes>>, TokenError> {
    let bad_url = |detail: String| TokenError::Config {
        code: "bad token URL".into(),
        description: Some(detail),
        setting: "the credential's token URL",
    };
    let mut params: Vec<(&str, &str)> = Vec::new();
    match grant {
        Grant::RefreshToken(token) => {
            params.push(("grant_type", "refresh_token"));
            params.push(("refresh_token", token));
        }
        Grant::ClientCredentials => params.push(("grant_type", "client_credentials")),
        Grant::Password { username, password } => {
            params.push(("grant_type", "password"));
            params.push(("username", username));
            params.push(("password", password));
        }
    }
    let scope = endpoint.scopes.join(" ");
    if !scope.is_empty() {
        params.push(("scope", &scope));
    }
    let mut authorization = None;
    match (endpoint.auth, endpoint.client_secret.as_deref()) {
        (ClientAuth::Basic, Some(secret)) => {
            authorization = Some(client_secret_basic(&endpoint.client_id, secret));
        }
        (ClientAuth::Basic, None) => params.push(("client_id", &endpoint.client_id)),
        (ClientAuth::Post, secret) => {
            params.push(("client_id", &endpoint.client_id));
            if let Some(secret) = secret {
                params.push(("client_secret", secret));
            }
        }
    }
    let encoded = || {
        Zeroizing::new(
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params.iter())
                .finish(),
        )
    };
    let (url, content_type, body) = match endpoint.format {
        BodyFormat::Form => (
            endpoint.url.clone(),
            Some("application/x-www-form-urlencoded"),
            Zeroizing::new(encoded().as_bytes().to_vec()),
        ),
        BodyFormat::Json => {
            let map: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
                .collect();
            (
                endpoint.url.clone(),
                Some("application/json"),
                Zeroizing::new(Value::Object(map).to_string().into_bytes()),
            )
        }
        BodyFormat::Query => {
            let separator = if endpoint.url.contains('?') { '&' } else { '?' };
            (
                format!("{}{separator}{}", endpoint.url, encoded().as_str()),
                None,
                Zeroizing::new(Vec::new()),
            )
        }
    };
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(bad_url(format!("{} is not an http(s) URL", endpoint.url)));
    }
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(url.as_str())
        .header(ACCEPT, "application/json");
    if let Some(content_type) = content_type {
        builder = builder.header(CONTENT_TYPE, content_type);
    }
    let mut request = builder
        .body(Full::new(Bytes::from(body.to_vec())))
        .map_err(|_| bad_url(format!("{} is not a valid URL", endpoint.url)))?;
    let headers = request.headers_mut();
    if let Some(value) = authorization {
        let mut value = HeaderValue::from_str(&value).map_err(|_| TokenError::Config {
            code: "bad client credentials".into(),
            description: None,
            setting: "the credential's client id and secret",
        })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    if let Some((name, key)) = &endpoint.api_key {
        let mut value = HeaderValue::from_str(key).map_err(|_| TokenError::Config {
            code: "bad API key".into(),
            description: None,
            setting: "the credential's API key",
        })?;
        value.set_sensitive(true);
        headers.insert(name.clone(), value);
    }
    Ok(request)
}

/// Reads a token endpoint's answer.
fn classify(
    status: StatusCode,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
    secrets: &[Zeroizing<String>],
) -> Result<Tokens, TokenError> {
    let json: Option<serde_json::Map<String, Value>> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let error = field("error");
    let description = field("error_description").map(|d| scrub(&d, secrets));
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(TokenError::RateLimited {
            retry_after: parse_retry_after(retry_after, now),
        });
    }
    if status.is_server_error() {
        return Err(TokenError::Unavailable(format!(
            "HTTP {status}{}",
            if json.is_none() && !body.is_empty() {
                " (not JSON)"
            } else {
                ""
            }
        )));
    }
    // An error document, whatever the status (some servers answer errors with 200).
    if let Some(code) = error {
        return Err(match code.as_str() {
            "invalid_grant" => TokenError::InvalidGrant { description },
            "invalid_client" | "unauthorized_client" => TokenError::Config {
                code,
                description,
                setting:
                    "the credential's client id, secret and client authentication (basic or post)",
            },
            "invalid_scope" => TokenError::Config {
                code,
                description,
                setting: "the credential's scopes",
            },
            "unsupported_grant_type" | "invalid_request" => TokenError::Config {
                code,
                description,
                setting: "the credential's grant type and request format (form, json or query)",
            },
            "temporarily_unavailable" | "server_error" => TokenError::Unavailable(code),
            "slow_down" => TokenError::RateLimited {
                retry_after: parse_retry_after(retry_after, now),
            },
            _ => TokenError::Config {
                code: scrub(&code, secrets),
                description,
                setting: "the credential's OAuth settings",
            },
        });
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(TokenError::Config {
            code: format!("HTTP {status}"),
            description: None,
            setting: "the credential's client id, secret and client authentication (basic or post)",
        });
    }
    if !status.is_success() {
        return Err(TokenError::Config {
            code: format!("HTTP {status}"),
            description: None,
            setting: "the credential's token URL and request format",
        });
    }
    let Some(json) = json.as_ref() else {
        return Err(TokenError::Unavailable(if body.is_empty() {
            "an empty answer".into()
        } else {
            "an answer that is not JSON".into()
        }));
    };
    let Some(access_token) = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return Err(TokenError::Unavailable(
            "a JSON answer without access_token".into(),
        ));
    };
    let token_type = match json.get("token_type").and_then(Value::as_str) {
        None => "Bearer".to_string(),
        Some(t) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_string(),
        Some(t) => t.to_string(),
    };
    let expires_at = json
        .get("expires_in")
        .and_then(expires_in_secs)
        .map(|secs| now + Duration::from_secs(secs));
    Ok(Tokens {
        access_token: Zeroizing::new(access_token.to_string()),
        refresh_token: json
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_string())),
        expires_at,
        token_type,
        scope: json.get("scope").and_then(Value::as_str).map(str::to_owned),
    })
}

/// `expires_in` as sent: a number or a numeric string. Zero or negative: expired now; huge:
/// capped at a year; anything else: unknown.
fn expires_in_secs(value: &Value) -> Option<u64> {
    let secs = match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .map(|f| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64)
        })?,
        Value::String(s) => s.trim().parse::<f64>().ok().map(|f| f as i64)?,
        _ => return None,
    };
    Some(u64::try_from(secs.max(0)).unwrap_or(0).min(MAX_EXPIRES_IN))
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP date; missing or malformed:
/// [`DEFAULT_RETRY_AFTER`]; capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: Option<&str>, now: SystemTime) -> Duration {
    let Some(value) = value.map(str::trim) else {
        return DEFAULT_RETRY_AFTER;
    };
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(at) = httpdate::parse_http_date(value) {
        at.duration_since(now).unwrap_or(Duration::ZERO)
    } else {
        DEFAULT_RETRY_AFTER
    };
    wait.min(MAX_RETRY_AFTER)
}

/// `text` with every secret replaced, and cut short (an error line, not a document).
fn scrub(text: &str, secrets: &[Zeroizing<String>]) -> String {
    let mut out = crate::redact::redact(text, secrets.iter().map(|s| s.as_str()));
    if out.len() > 300 {
        let mut end = 300;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests {
    use super::fake::{fake_endpoint, Script, Seen};
    use super::*;
    use std::sync::Arc;

    fn endpoint(url: &str, auth: ClientAuth, format: BodyFormat) -> TokenEndpoint {
        TokenEndpoint {
            url: url.to_string(),
            client_id: "client-1".into(),
            client_secret: Some(Zeroizing::new("SECRET-canary".into())),
            auth,
            format,
            scopes: vec!["read".into(), "write".into()],
            api_key: None,
        }
    }

    /// One request to `url` with the standard test client.
    async fn ask(
        url: &str,
        auth: ClientAuth,
        format: BodyFormat,
        grant: Grant<'_>,
    ) -> Result<Tokens, TokenError> {
        client().request(&endpoint(url, auth, format), grant).await
    }

    fn client() -> TokenClient {
        TokenClient::new(None, Duration::from_secs(5)).unwrap()
    }

    fn answer(status: u16, body: &str) -> Script {
        let body = body.to_string();
        Arc::new(move |_| {
            (
                status,
                vec![("content-type", "application/json".into())],
                body.clone(),
            )
        })
    }

    fn form(body: &str) -> std::collections::HashMap<String, String> {
        form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect()
    }

    #[tokio::test]
    async fn a_refresh_with_client_secret_post_sends_a_form_and_reads_the_tokens() {
        let (url, seen) = fake_endpoint(answer(
            200,
            r#"{"access_token": "AT-1", "refresh_token": "RT-2", "expires_in": 3600, "token_type": "bearer", "scope": "read"}"#,
        ))
        .await;
        let before = SystemTime::now();
        let tokens = client()
            .request(
                &endpoint(&url, ClientAuth::Post, BodyFormat::Form),
                Grant::RefreshToken("RT-1"),
            )
            .await
            .unwrap();
        assert_eq!(tokens.access_token.as_str(), "AT-1");
        assert_eq!(
            tokens.refresh_token.as_deref().map(String::as_str),
            Some("RT-2")
        );
        assert_eq!(tokens.token_type, "Bearer");
        let expires = tokens.expires_at.unwrap().duration_since(before).unwrap();
        assert!((3599..=3601).contains(&expires.as_secs()), "{expires:?}");
        assert!(!format!("{tokens:?}").contains("AT-1"));

        let seen = seen.lock().unwrap()[0].clone();
        assert_eq!(
            seen.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        assert!(
            seen.authorization.is_none(),
            "post: no Authorization header"
        );
        let params = form(&seen.body);
        assert_eq!(params["grant_type"], "refresh_token");
        assert_eq!(params["refresh_token"], "RT-1");
        assert_eq!(params["client_id"], "client-1");
        assert_eq!(params["client_secret"], "SECRET-canary");
        assert_eq!(params["scope"], "read write");
    }

    #[tokio::test]
    async fn an_in_house_authorization_server_is_trusted_through_oauth_ca_file() {
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (url, seen) =
            super::fake::fake_tls_endpoint(answer(200, r#"{"access_token": "AT-tls"}"#), &issued)
                .await;
        let ep = endpoint(&url, ClientAuth::Post, BodyFormat::Form);
        // Its CA is in neither the web PKI nor the system store.
        let err = client()
            .request(&ep, Grant::RefreshToken("RT-1"))
            .await
            .unwrap_err();
        assert!(matches!(err, TokenError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");
        assert!(seen.lock().unwrap().is_empty(), "no request got through");

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("corp-ca.pem");
        std::fs::write(&ca, issued.cert.pem()).unwrap();
        let trusting = TokenClient::new(Some(&ca), Duration::from_secs(5)).unwrap();
        let tokens = trusting
            .request(&ep, Grant::RefreshToken("RT-1"))
            .await
            .unwrap();
        assert_eq!(tokens.access_token.as_str(), "AT-tls");
        assert_eq!(form(&seen.lock().unwrap()[0].body)["refresh_token"], "RT-1");

        // A file that is not a CA is an error that names the setting.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = TokenClient::new(Some(&junk), Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("oauth.ca_file") && err.contains("junk.pem"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_secret_basic_form_urlencodes_each_part_first() {
        let (url, seen) = fake_endpoint(answer(200, r#"{"access_token": "AT"}"#)).await;
        let id = "id:with+chars%/= and é";
        let secret = "s3:cr+t%/= x ü";
        let mut ep = endpoint(&url, ClientAuth::Basic, BodyFormat::Form);
        ep.client_id = id.into();
        ep.client_secret = Some(Zeroizing::new(secret.into()));
        client()
            .request(&ep, Grant::ClientCredentials)
            .await
            .unwrap();
        let seen = seen.lock().unwrap()[0].clone();
        let header = seen.authorization.unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(header.strip_prefix("Basic ").unwrap())
            .unwrap();
        let decoded = String::from_utf8(decoded).unwrap();
        // Exactly one unencoded colon: the separator.
        let (enc_id, enc_secret) = decoded.split_once(':').unwrap();
        assert!(!enc_id.contains(':') && !enc_secret.contains(':'));
        let unescape = |s: &str| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .unwrap()
                .1
                .into_owned()
        };
        assert_eq!(unescape(enc_id), id);
        assert_eq!(unescape(enc_secret), secret);
        let params = form(&seen.body);
        assert_eq!(params["grant_type"], "client_credentials");
        assert!(
            !params.contains_key("client_secret"),
            "basic: the secret stays out of the body"
        );
    }

    #[tokio::test]
    async fn json_and_query_formats_and_the_api_key_header() {
        let (url, seen) = fake_endpoint(answer(200, r#"{"access_token": "AT"}"#)).await;
        let mut ep = endpoint(&url, ClientAuth::Post, BodyFormat::Json);
        ep.api_key = Some((
            HeaderName::from_static("x-api-key"),
            Zeroizing::new("KEY-1".into()),
        ));
        client()
            .request(
                &ep,
                Grant::Password {
                    username: "u@x",
                    password: "p w",
                },
            )
            .await
            .unwrap();
        ep.format = BodyFormat::Query;
        client()
            .request(&ep, Grant::ClientCredentials)
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
        let json: Value = serde_json::from_str(&seen[0].body).unwrap();
        assert_eq!(json["grant_type"], "password");
        assert_eq!(json["username"], "u@x");
        assert_eq!(json["password"], "p w");
        assert_eq!(seen[0].api_key.as_deref(), Some("KEY-1"));
        assert!(seen[1].body.is_empty());
        let query = seen[1].uri.split_once('?').unwrap().1;
        assert_eq!(form(query)["grant_type"], "client_credentials");
        assert_eq!(form(query)["client_secret"], "SECRET-canary");
    }

    #[test]
    fn odd_token_responses_are_read_defensively() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ok = |body: &str| classify(StatusCode::OK, None, body.as_bytes(), now, &[]);
        let expiry = |body: &str| {
            ok(body)
                .unwrap()
                .expires_at
                .map(|t| t.duration_since(now).unwrap().as_secs())
        };
        assert_eq!(expiry(r#"{"access_token": "a"}"#), None, "missing: unknown");
        assert_eq!(
            expiry(r#"{"access_token": "a", "expires_in": "120"}"#),
            Some(120)
        );
        assert_eq!(expiry(r#"{"access_token": "a", "expires_in": 0}"#), Some(0));
        assert_eq!(
            expiry(r#"{"access_token": "a", "expires_in": -5}"#),
            Some(0)
        );
        assert_eq!(
            expiry(r#"{"access_token": "a", "expires_in": 1e300}"#),
            Some(MAX_EXPIRES_IN)
        );
        assert_eq!(
            expiry(r#"{"access_token": "a", "expires_in": "soon"}"#),
            None
        );
        assert_eq!(
            ok(r#"{"access_token": "a", "token_type": "BEARER"}"#)
                .unwrap()
                .token_type,
            "Bearer"
        );
        assert_eq!(ok(r#"{"access_token": "a"}"#).unwrap().token_type, "Bearer");
        // Not token responses.
        for body in [
            "",
            "<html>oops</html>",
            r#"{"token": "a"}"#,
            r#"{"access_token": ""}"#,
        ] {
            assert!(
                matches!(ok(body), Err(TokenError::Unavailable(_))),
                "{body:?}"
            );
        }
        // A 200 carrying an error.
        assert!(matches!(
            ok(r#"{"error": "invalid_grant"}"#),
            Err(TokenError::InvalidGrant { .. })
        ));
        // An HTML 502.
        let err = classify(
            StatusCode::BAD_GATEWAY,
            None,
            b"<html>bad gateway</html>",
            now,
            &[],
        )
        .unwrap_err();
        assert_eq!(err.class(), "unavailable");
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    #[test]
    fn errors_are_classified_and_name_the_setting() {
        let now = SystemTime::now();
        let err = |status: u16, body: &str| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                None,
                body.as_bytes(),
                now,
                &[],
            )
            .unwrap_err()
        };
        assert_eq!(
            err(400, r#"{"error": "invalid_grant"}"#).class(),
            "invalid_grant"
        );
        let client = err(401, r#"{"error": "invalid_client"}"#);
        assert_eq!(client.class(), "config");
        assert!(client.to_string().contains("client id, secret"), "{client}");
        assert!(err(400, r#"{"error": "invalid_scope"}"#)
            .to_string()
            .contains("scopes"));
        assert!(err(400, r#"{"error": "unsupported_grant_type"}"#)
            .to_string()
            .contains("request format"));
        assert_eq!(err(503, "").class(), "unavailable");
        assert_eq!(
            err(500, r#"{"error": "server_error"}"#).class(),
            "unavailable"
        );
        assert_eq!(err(401, "").class(), "config");
        assert_eq!(err(404, "not found").class(), "config");
    }

    #[test]
    fn retry_after_as_seconds_a_date_missing_malformed_or_huge() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(Some("7"), now), Duration::from_secs(7));
        let in_30s = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(Some(&in_30s), now),
            Duration::from_secs(30)
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(Some(&past), now), Duration::ZERO);
        assert_eq!(parse_retry_after(None, now), DEFAULT_RETRY_AFTER);
        assert_eq!(parse_retry_after(Some("soon"), now), DEFAULT_RETRY_AFTER);
        assert_eq!(parse_retry_after(Some("99999999"), now), MAX_RETRY_AFTER);
        let err = classify(StatusCode::TOO_MANY_REQUESTS, Some("12"), b"", now, &[]).unwrap_err();
        assert!(
            matches!(err, TokenError::RateLimited { retry_after } if retry_after == Duration::from_secs(12))
        );
    }

    #[test]
    fn secrets_that_overlap_in_an_echoed_description_leave_no_piece_behind() {
        // The client secret's end is the refresh token's start: replacing one secret after
        // the other left the refresh token's tail ("-refresh") in the error.
        let secrets = [
            Zeroizing::new("secret-abc-123".to_string()),
            Zeroizing::new("abc-123-refresh".to_string()),
        ];
        let err = classify(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"error": "invalid_grant", "error_description": "got secret-abc-123-refresh"}"#,
            SystemTime::now(),
            &secrets,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the authorization server refused the grant (invalid_grant: got [redacted]): the credential needs re-consent"
        );
    }

    #[tokio::test]
    async fn no_secret_reaches_an_error_even_when_the_server_echoes_the_request() {
        // The server echoes the whole request body into error_description.
        let script: Script = Arc::new(|seen: &Seen| {
            (
                400,
                vec![],
                serde_json::json!({"error": "invalid_grant", "error_description": format!("bad request: {} {:?}", seen.body, seen.authorization)}).to_string(),
            )
        });
        let (url, _) = fake_endpoint(script).await;
        for auth in [ClientAuth::Post, ClientAuth::Basic] {
            let ep = endpoint(&url, auth, BodyFormat::Form);
            let err = client()
                .request(&ep, Grant::RefreshToken("RT-canary"))
                .await
                .unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(text.contains("invalid_grant"), "{text}");
            assert!(
                !text.contains("RT-canary") && !text.contains("SECRET-canary"),
                "{text}"
            );
            assert!(!format!("{ep:?}").contains("SECRET-canary"));
        }
        // The Basic header itself (base64 of the secret) is not echoed back either.
        let basic = client_secret_basic("client-1", "SECRET-canary");
        let (url, _) = fake_endpoint(answer(
            400,
            &format!(
                r#"{{"error": "invalid_client", "error_description": "{}"}}"#,
                basic.as_str()
            ),
        ))
        .await;
        let ep = endpoint(&url, ClientAuth::Basic, BodyFormat::Form);
        let err = client()
            .request(&ep, Grant::ClientCredentials)
            .await
            .unwrap_err();
        assert!(
            !err.to_string().contains(basic.trim_start_matches("Basic ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn timeouts_and_oversized_answers_are_unavailable() {
        let big = "x".repeat(MAX_BODY + 10);
        let (oversized, _) = fake_endpoint(answer(200, &big)).await;
        // Nobody listening at all.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nobody = format!("http://{}/token", closed.local_addr().unwrap());
        drop(closed);
        for (url, says) in [(oversized, "not a token response"), (nobody, "")] {
            let err = ask(
                &url,
                ClientAuth::Post,
                BodyFormat::Form,
                Grant::ClientCredentials,
            )
            .await
            .unwrap_err();
            assert_eq!(err.class(), "unavailable", "{url}: {err}");
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
    }
}
