//! The agent's OAuth token client against a real token endpoint built with `authlib` (PyPI):
//! `client_secret_basic` with `: + % / =`, spaces and non-ASCII in the client id and secret
//! (each part percent-encoded before base64, RFC 6749 §2.3.1), `client_secret_post`, and a
//! wrong secret refused as a configuration error after one request, with no retry in the
//! other authentication style.
//!
//! Needs python3 (>= 3.10, with venv). The first run installs authlib and Flask from PyPI into
//! `~/.cache/lumos-agent-interop/oauth-venv` (`.ci/run` does it up front).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lumos_agent::oauth::{BodyFormat, ClientAuth, Grant, TokenClient, TokenEndpoint, TokenError};
use lumos_agent_integration::{interop_python, PeerProcess};
use zeroize::Zeroizing;

const TRICKY_ID: &str = "id: +%/= é ü";
const TRICKY_SECRET: &str = "s:e+c%r/e=t with spaces ñ 秘密";

struct Server {
    peer: PeerProcess,
    url: String,
}

impl Server {
    fn start() -> Self {
        let python = interop_python("oauth-venv", "authlib, flask", &["authlib", "flask"]);
        let clients = serde_json::json!([
            {"client_id": TRICKY_ID, "client_secret": TRICKY_SECRET, "auth_method": "client_secret_basic"},
            {"client_id": "post-client", "client_secret": "post secret+/=", "auth_method": "client_secret_post"},
        ]);
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut command = Command::new(python);
        command
            .arg(here.join("python/authlib_token_server.py"))
            .arg(clients.to_string());
        let peer = PeerProcess::start(command);
        let url = format!("http://127.0.0.1:{}/token", peer.port);
        Self { peer, url }
    }

    /// The server's log of the requests so far: it prints each line before it answers, so a
    /// retry (in the other style, say) would be among the first `n` and change them.
    fn requests(&self, n: usize) -> Vec<String> {
        let lines = self.peer.next_lines(n);
        // Anything more already printed is a request too many.
        std::thread::sleep(Duration::from_millis(100));
        lines
            .into_iter()
            .chain(self.peer.lines.try_iter())
            .collect()
    }

    fn endpoint(
        &self,
        id: &str,
        secret: &str,
        auth: ClientAuth,
        format: BodyFormat,
    ) -> TokenEndpoint {
        TokenEndpoint {
            url: self.url.clone(),
            client_id: id.into(),
            client_secret: Some(Zeroizing::new(secret.into())),
            auth,
            format,
            scopes: vec![],
            api_key: None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_accepts_basic_with_encoded_ids_and_secrets_and_post() {
    let server = Server::start();
    let client = TokenClient::new(None, Duration::from_secs(20)).unwrap();

    let basic = server.endpoint(
        TRICKY_ID,
        TRICKY_SECRET,
        ClientAuth::Basic,
        BodyFormat::Form,
    );
    let tokens = client
        .request(&basic, Grant::ClientCredentials)
        .await
        .unwrap();
    assert!(!tokens.access_token.is_empty());
    assert_eq!(tokens.token_type, "Bearer");
    assert!(tokens.expires_at.is_some());

    let post = server.endpoint(
        "post-client",
        "post secret+/=",
        ClientAuth::Post,
        BodyFormat::Form,
    );
    let tokens = client
        .request(&post, Grant::ClientCredentials)
        .await
        .unwrap();
    assert!(!tokens.access_token.is_empty());

    assert_eq!(
        server.requests(2),
        vec!["REQUEST basic 200", "REQUEST post 200"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_one_request_and_a_config_error_without_the_other_style() {
    let server = Server::start();
    let client = TokenClient::new(None, Duration::from_secs(20)).unwrap();
    let wrong = server.endpoint(
        TRICKY_ID,
        "not-the-secret",
        ClientAuth::Basic,
        BodyFormat::Form,
    );
    let err = client
        .request(&wrong, Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TokenError::Config { code, .. } if code == "invalid_client"),
        "{err}"
    );
    assert!(err.to_string().contains("client authentication"), "{err}");
    assert!(!err.to_string().contains("not-the-secret"), "{err}");
    // A post client presenting itself with Basic is refused too: the style is fixed per client.
    let style = server.endpoint(
        "post-client",
        "post secret+/=",
        ClientAuth::Basic,
        BodyFormat::Form,
    );
    let err = client
        .request(&style, Grant::ClientCredentials)
        .await
        .unwrap_err();
    assert_eq!(err.class(), "config", "{err}");
    assert_eq!(
        server.requests(2),
        vec!["REQUEST basic 401", "REQUEST basic 401"],
        "one request each, no retry in the other style"
    );
}

/// Query mode (parameters in the URL, empty body), as a few old APIs want: authlib reads the
/// grant from the query string and the client from the Basic header. (authlib takes
/// `client_secret_post` credentials from the body only, as RFC 6749 §2.3.1 says they belong.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_accepts_the_query_mode_with_basic_client_authentication() {
    let server = Server::start();
    let client = TokenClient::new(None, Duration::from_secs(20)).unwrap();
    let query = server.endpoint(
        TRICKY_ID,
        TRICKY_SECRET,
        ClientAuth::Basic,
        BodyFormat::Query,
    );
    let tokens = client
        .request(&query, Grant::ClientCredentials)
        .await
        .unwrap();
    assert!(!tokens.access_token.is_empty());
    assert_eq!(server.requests(1), vec!["REQUEST basic 200"]);
}
