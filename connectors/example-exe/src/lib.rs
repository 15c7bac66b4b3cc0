//! The example Lumos connector's logic, shared by its executable (`src/main.rs`, the Lumos
//! connector CLI protocol) and its cdylib (`connectors/example-cdylib`, the C ABI).
//!
//! Capabilities:
//! - `validate_credentials`: answers `unique_tenant_id` = the first 16 hex characters of
//!   sha256(OAuth access token), like the interop connector in `shared/interop/`, so a test can
//!   tell which token reached the connector.
//! - `list_accounts`: `request.count` synthetic accounts (default 10), paged with
//!   `page.size` (default 100) and the opaque `page.token` it hands out.
#![forbid(unsafe_code)]

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The example's app_id.
pub const APP_ID: &str = "lumos_example";
/// The example's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error answered in the Lumos error shape.
#[derive(Debug)]
pub struct ConnectorError {
    code: &'static str,
    message: String,
    raised_in: &'static str,
}

impl ConnectorError {
    fn new(code: &'static str, raised_in: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            raised_in,
        }
    }

    /// The Lumos error document of the connector `app_id` (the executable's [`APP_ID`], or
    /// the app_id of a connector built on this logic under its own name, as the cdylib is):
    /// an error code is namespaced by the app that raised it.
    pub fn into_json(self, app_id: &str) -> Value {
        json!({
            "is_error": true,
            "error": {
                "message": self.message,
                "error_code": format!("{app_id}.{}", self.code),
                "app_id": app_id,
                "raised_by": "ConnectorError",
                "raised_in": self.raised_in,
                "error_metadata": {"fault": "client", "retryable": false, "refreshable": false},
            },
            "response": null,
            "raw_data": null,
        })
    }
}

/// Runs the CLI protocol's command line (without the program name).
pub fn run(args: &[String]) -> Result<Value, ConnectorError> {
    let Some(command) = args.first() else {
        return Err(ConnectorError::new(
            "bad_request",
            "main",
            "usage: lumos-example-connector info | <capability> (--json JSON | --json-file PATH)",
        ));
    };
    if command == "info" {
        return Ok(info());
    }
    let input = read_input(&args[1..])?;
    handle(command, &parse_input(input.as_bytes())?)
}

/// The parts of a Lumos envelope this connector reads. The others (`settings`,
/// `include_raw_data`) are skipped by the parser, not built into a document nobody reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Input {
    /// The capability's arguments.
    pub request: Value,
    /// The page asked for (`{"token", "size"}`), or null.
    pub page: Value,
    /// The single credential, if the app has one.
    pub auth: Value,
    /// The credentials, if the app has several.
    pub credentials: Value,
}

/// A document's bytes, serialised straight into a buffer: `Value::to_string` goes through the
/// `fmt` machinery, a formatter call per token, which cost this connector more than its
/// SHA-256.
pub fn to_bytes(value: &Value) -> Vec<u8> {
    // A `Value` always serialises (its map keys are strings); empty output would be reported
    // by the host as a bad answer.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Parses an envelope, a JSON object.
pub fn parse_input(json: &[u8]) -> Result<Input, ConnectorError> {
    let bad = |why: String| {
        ConnectorError::new(
            "bad_request",
            "read_input",
            format!("input is not a JSON envelope: {why}"),
        )
    };
    // serde would also take an array, as the fields in order.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(bad("expected a JSON object".into()));
    }
    serde_json::from_slice(json).map_err(|e| bad(e.to_string()))
}

/// Runs one capability on a parsed envelope.
pub fn handle(capability: &str, input: &Input) -> Result<Value, ConnectorError> {
    match capability {
        "validate_credentials" => validate_credentials(input),
        "list_accounts" => list_accounts(input),
        other => Err(ConnectorError::new(
            "unsupported_capability",
            "main",
            format!("capability {other:?} is not implemented by this connector"),
        )),
    }
}

/// The envelope's text, from `--json` or `--json-file`.
fn read_input(args: &[String]) -> Result<String, ConnectorError> {
    Ok(match args {
        [flag, value, ..] if flag == "--json" => value.clone(),
        [flag, path, ..] if flag == "--json-file" => {
            std::fs::read_to_string(path).map_err(|e| {
                ConnectorError::new(
                    "bad_request",
                    "read_input",
                    format!("cannot read {path}: {e}"),
                )
            })?
        }
        _ => {
            return Err(ConnectorError::new(
                "bad_request",
                "read_input",
                "expected --json JSON or --json-file PATH",
            ))
        }
    })
}

/// The `info` document (`{"response": {...}}`).
pub fn info() -> Value {
    json!({
        "response": {
            "app_id": APP_ID,
            "version": VERSION,
            "user_friendly_name": "Lumos example connector",
            "description": "Example connector shipped with lumos-agent: synthetic accounts, token echo.",
            "logo_url": null,
            "capabilities": ["list_accounts", "validate_credentials"],
            "capability_schema": {},
            "credentials_schema": [{
                "id": "oauth",
                "type": "oauth",
                "description": "OAuth access token",
                "optional": false
            }],
            "request_settings_schema": {"type": "object", "properties": {}},
            "entitlement_types": [],
            "resource_types": [],
        }
    })
}

/// The value at `path` in `value` (`Value::pointer` parses its path and allocates each step).
fn at<'v>(value: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

/// The first OAuth access token, from `auth` (single-credential) or `credentials` (multi).
fn access_token(input: &Input) -> Option<&str> {
    let from_auth =
        at(&input.auth, &["oauth", "access_token"]).or_else(|| at(&input.auth, &["access_token"]));
    let from_credentials = || {
        input.credentials.as_array()?.iter().find_map(|cred| {
            at(cred, &["oauth", "access_token"])
                .or_else(|| at(cred, &["oauth_client_credentials", "access_token"]))
        })
    };
    from_auth.or_else(from_credentials).and_then(Value::as_str)
}

fn validate_credentials(input: &Input) -> Result<Value, ConnectorError> {
    let token = access_token(input).ok_or_else(|| {
        ConnectorError::new(
            "missing_credentials",
            "validate_credentials",
            "no OAuth access token in `auth.oauth` or `credentials[].oauth`",
        )
    })?;
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    Ok(json!({
        "response": {"valid": true, "unique_tenant_id": &digest[..16]},
        "page": null,
        "raw_data": null,
    }))
}

fn list_accounts(input: &Input) -> Result<Value, ConnectorError> {
    let count = input
        .request
        .get("count")
        .and_then(Value::as_u64)
        .unwrap_or(10);
    let size = input
        .page
        .get("size")
        .and_then(Value::as_u64)
        .unwrap_or(100)
        .max(1);
    let start: u64 = match input.page.get("token").and_then(Value::as_str) {
        None => 0,
        Some(token) => token
            .strip_prefix("offset:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                ConnectorError::new(
                    "bad_request",
                    "list_accounts",
                    format!("bad page token {token:?}"),
                )
            })?,
    };
    let end = count.min(start.saturating_add(size));
    let accounts: Vec<Value> = (start..end)
        .map(|i| {
            json!({
                "integration_specific_id": format!("user-{i}"),
                "email": format!("user{i}@example.invalid"),
                "given_name": "User",
                "family_name": format!("{i}"),
                "username": format!("user{i}"),
                "user_status": "ACTIVE",
            })
        })
        .collect();
    let page = (end < count).then(|| json!({"token": format!("offset:{end}"), "size": size}));
    Ok(json!({"response": accounts, "page": page, "raw_data": null}))
}
