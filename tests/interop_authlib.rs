//! The agent's OAuth token client against a real token endpoint built with `authlib` (PyPI):
//! `client_secret_basic` with `: + % / =`, spaces and non-ASCII in the client id and secret
//! (each part percent-encoded before base64, RFC 6749 §2.3.1), `client_secret_post`, and a
//! wrong secret refused as a configuration error after one request, with no retry in the
//! other authentication style.
//!
//! Needs python3 (>= 3.10, with venv). The first run installs authlib and Flask from PyPI into
//! `~/.cache/lumos-agent-interop/oauth-venv` (`.ci/run` does it up front).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use lumos_agent::oauth::{BodyFormat, ClientAuth, Grant, TokenClient, TokenEndpoint, TokenError};
use lumos_agent_integration::interop_python;
use zeroize::Zeroizing;

const TRICKY_ID: &str = "id: +%/= é ü";
const TRICKY_SECRET: &str = "s:e+c%r/e=t with spaces ñ 秘密";

struct Server {
    child: std::process::Child,
    lines: Receiver<String>,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let python = interop_python("oauth-venv", "authlib, flask", &["authlib", "flask"]);
        let clients = serde_json::json!([
            {"client_id": TRICKY_ID, "client_secret": TRICKY_SECRET, "auth_method": "client_secret_basic"},
            {"client_id": "post-client", "client_secret": "post secret+/=", "auth_method": "client_secret_post"},
        ]);
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(python)
            .arg(here.join("python/authlib_token_server.py"))
            .arg(clients.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let port = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the authlib server's port");
        let port = port.strip_prefix("PORT ").unwrap().to_string();
        Self {
            child,
            lines,
            url: format!("http://127.0.0.1:{port}/token"),
        }
    }

    /// The request lines logged so far (after a short wait for the last one).
    fn requests(&self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(200));
        self.lines.try_iter().collect()
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
        server.requests(),
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
        server.requests(),
        vec!["REQUEST basic 401", "REQUEST basic 401"],
        "one request each, no retry in the other style"
    );
}
