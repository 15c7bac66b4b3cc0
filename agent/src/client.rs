//! A small client of the local API, used by the CLI (`connectors`, `call`, `tenants`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use zeroize::Zeroizing;

/// Why a request to the local API failed before an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error("cannot reach the agent at {url}: {detail} (is `lumos-agent run` running with the same config?)")]
    Unreachable {
        /// The API's URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The token file cannot be read.
    #[error(
        "cannot read the API token {path}: {source} (it is written by the agent at first start)"
    )]
    Token {
        /// The file.
        path: String,
        /// The OS's words.
        source: std::io::Error,
    },
    /// No token file was given, no login saved, and the agent takes no admin token.
    #[error("this agent takes no admin token (api.admin_token = false): log in first (`lumos-agent login --user NAME`), or give --token-file")]
    NoAdminToken,
    /// The token file holds nothing: sent as it is, the agent's refusal would say only "no
    /// bearer token".
    #[error("the API token file {path} is empty (the agent writes <state_dir>/admin.token at first start; `lumos-agent login` saves a user's token)")]
    EmptyToken {
        /// The file.
        path: String,
    },
}

/// What a name is escaped of in a path segment: all but RFC 3986's unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The API path `/v1/<parts>`, each part percent-encoded as one segment: a name typed on the
/// command line with a space, a `/` or a `?` in it reaches the agent as that name (which then
/// says what is wrong with it), not as a broken URL or another route.
pub fn v1_path(parts: &[&str]) -> String {
    let mut path = String::from("/v1");
    for part in parts {
        path.push('/');
        path.extend(percent_encoding::utf8_percent_encode(part, SEGMENT));
    }
    path
}

/// Where `login` saves the token for the agent at `listen` (one per address, so that logins
/// to two agents do not replace each other).
pub fn saved_token_path(listen: SocketAddr) -> Option<std::path::PathBuf> {
    let dirs = directories::ProjectDirs::from("com", "Lumos", "lumos-agent")?;
    let address = listen.to_string().replace([':', '[', ']'], "_");
    Some(dirs.config_dir().join(format!("api-token-{address}")))
}

/// The token file the client commands and `doctor` send: `explicit` (`--token-file`), else
/// a saved login, else the agent's admin token, unless `api.admin_token = false`.
pub fn token_file(
    explicit: Option<&Path>,
    config: &crate::config::Config,
) -> Result<std::path::PathBuf, ClientError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(saved) = saved_token_path(config.api.listen).filter(|path| path.exists()) {
        return Ok(saved);
    }
    if config.api.admin_token {
        Ok(crate::state::StatePaths::new(config.state_dir.clone()).admin_token())
    } else {
        Err(ClientError::NoAdminToken)
    }
}

/// The `notes` of a tenant as the API shows it (`tenants put`, `tenants list`, `doctor`).
pub fn tenant_notes(view: &serde_json::Value) -> impl Iterator<Item = &str> {
    view.get("notes")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
}

/// A client of one agent's API.
pub struct ApiClient {
    base: String,
    /// `None` for a client that only logs in.
    token: Option<Zeroizing<String>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client for the agent listening on `listen` (an unspecified address means loopback),
    /// authenticated with the token in `token_file`.
    pub fn new(listen: SocketAddr, token_file: &Path) -> Result<Self, ClientError> {
        let token = std::fs::read_to_string(token_file).map_err(|source| ClientError::Token {
            path: token_file.display().to_string(),
            source,
        })?;
        let token = Zeroizing::new(token);
        let token = Zeroizing::new(token.trim().to_string());
        if token.is_empty() {
            return Err(ClientError::EmptyToken {
                path: token_file.display().to_string(),
            });
        }
        Ok(Self::with_token(listen, Some(token)))
    }

    /// A client without a token: for `POST /v1/auth/token` and the open routes.
    pub fn anonymous(listen: SocketAddr) -> Self {
        Self::with_token(listen, None)
    }

    /// The API's base URL (`http://127.0.0.1:7878`).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn with_token(listen: SocketAddr, token: Option<Zeroizing<String>>) -> Self {
        let mut addr = listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let base = format!("http://{addr}");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            base,
            token,
            client,
        }
    }

    /// Sends a request; returns the status and the whole body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |detail: String| ClientError::Unreachable {
            url: self.base.clone(),
            detail,
        };
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {}", token.as_str()));
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(format!("the answer broke off: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_become_one_path_segment_each() {
        assert_eq!(super::v1_path(&["tenants"]), "/v1/tenants");
        assert_eq!(
            super::v1_path(&["connectors", "lumos_example", "list_accounts"]),
            "/v1/connectors/lumos_example/list_accounts"
        );
        assert_eq!(
            super::v1_path(&["tenants", "a b/c?d#e%f:g.h-i~j"]),
            "/v1/tenants/a%20b%2Fc%3Fd%23e%25f%3Ag.h-i~j"
        );
        assert_eq!(super::v1_path(&["tenants", "é"]), "/v1/tenants/%C3%A9");
    }
}
