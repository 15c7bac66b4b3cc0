//! Credentials the token broker manages, as they travel in a call's envelope (design §5).
//!
//! A credential opts in with a `token_broker` block beside its token object. The block is the
//! agent's alone: the connector receives the credential without it, with a fresh
//! `access_token` in its token object (`oauth`, or `oauth_client_credentials`):
//!
//! ```json
//! {"id": "okta_oauth",
//!  "oauth": {"access_token": "…"},
//!  "token_broker": {
//!    "token_url": "https://{subdomain}.okta.com/oauth2/v1/token",
//!    "grant": "refresh_token", "client_id": "…", "client_secret": "…",
//!    "client_auth": "client_secret_basic", "request_format": "form", "scopes": ["okta.users.read"],
//!    "refresh_token": "…", "expires_at": 1764000000}}
//! ```
//!
//! The same shape serves both sources: stored in the tenant store (agent-held), or sent with
//! each call by the cloud (cloud-held). New tokens go back where the credential came from: into
//! the tenant store, or into a pending `CredentialUpdate` for the cloud (kept, sealed, in the
//! same store until acknowledged). Without `token_url`, the broker refreshes through the
//! connector's own `refresh_access_token` capability.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use hyper::header::HeaderName;
use serde_json::{json, Map, Value};
use zeroize::{Zeroize as _, Zeroizing};

use super::broker::{fingerprint, BrokerEvents, CredentialKey, GrantKind, Persist, Seed};
use super::{BodyFormat, ClientAuth, TokenEndpoint, Tokens};
use crate::tenants::{PendingUpdate, SecretJson, Tenant, TenantStore};

/// The block that makes a credential broker-managed.
pub const BROKER_FIELD: &str = "token_broker";

/// [`BROKER_FIELD`] as a JSON key, to tell cheaply whether a document can hold a managed
/// credential before parsing it (every call asks).
const BROKER_KEY: &str = "\"token_broker\"";

/// The credential id of the single-credential `auth` object.
pub const AUTH_CREDENTIAL_ID: &str = "auth";
/// Token objects the broker writes a fresh `access_token` into (connector-py's credential
/// kinds that carry an OAuth access token).
const TOKEN_KINDS: [&str; 2] = ["oauth", "oauth_client_credentials"];
/// How many superseded refresh tokens a pending update remembers.
const REPLACES_KEPT: usize = 16;

/// A parsed JSON document holding secrets: every string in it is zeroized on drop.
pub struct SecretValue(pub Value);

impl Drop for SecretValue {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue([redacted])")
    }
}

fn wipe(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe),
        Value::Object(map) => map.values_mut().for_each(wipe),
        _ => {}
    }
}

/// The path below `value` of a `token_broker` key at any depth (`.oauth.token_broker`), built
/// only when one is found. Depth is bounded by serde_json's recursion limit.
fn find_broker_key(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(key, value)| {
            if key == BROKER_FIELD {
                Some(format!(".{key}"))
            } else {
                find_broker_key(value).map(|rest| format!(".{key}{rest}"))
            }
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_broker_key(item).map(|rest| format!("[{i}]{rest}"))),
        _ => None,
    }
}

/// Refuses a `token_broker` block anywhere but where the broker looks for one: at the top of
/// `auth`, or of an item of `credentials`. Why: anywhere else the broker would not manage it,
/// and the connector would receive its client secret and refresh token.
fn check_broker_placement(
    auth: Option<&Value>,
    credentials: Option<&Value>,
) -> Result<(), SpecError> {
    let misplaced = |field: String| SpecError {
        field,
        problem: "a token_broker block belongs beside a credential's token object, at the top \
                  of `auth` or of an item of `credentials`; here the agent would not manage it \
                  and the connector would receive its secrets"
            .into(),
    };
    // Within one credential: the block itself is in place, any other is not. The path below
    // the credential of the first misplaced one.
    let misplaced_in = |entry: &Value| -> Option<String> {
        match entry {
            Value::Object(map) => {
                map.iter()
                    .filter(|(key, _)| *key != BROKER_FIELD)
                    .find_map(|(key, value)| {
                        find_broker_key(value).map(|rest| format!(".{key}{rest}"))
                    })
            }
            other => find_broker_key(other),
        }
    };
    if let Some(auth) = auth {
        if !auth.is_object() && find_broker_key(auth).is_some() {
            return Err(SpecError {
                field: "auth".into(),
                problem: SHAPE_OF_AUTH.into(),
            });
        }
        if let Some(rest) = misplaced_in(auth) {
            return Err(misplaced(format!("auth{rest}")));
        }
    }
    match credentials {
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(rest) = misplaced_in(item) {
                    return Err(misplaced(format!("credentials[{i}]{rest}")));
                }
            }
        }
        Some(other) if find_broker_key(other).is_some() => {
            return Err(SpecError {
                field: "credentials".into(),
                problem: SHAPE_OF_CREDENTIALS.into(),
            })
        }
        _ => {}
    }
    Ok(())
}

/// What `auth` must be (design §2), for error messages.
pub const SHAPE_OF_AUTH: &str =
    "must be one credential object, like {\"oauth\": {\"access_token\": …}}";
/// What `credentials` must be (design §2), for error messages.
pub const SHAPE_OF_CREDENTIALS: &str =
    "must be a list of credential objects, like [{\"id\": …, \"oauth\": {\"access_token\": …}}]";

/// Where a credential sits in the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The single `auth` object.
    Auth,
    /// An item of the `credentials` list.
    Credentials(usize),
}

/// A bad `token_broker` block: the call is refused with the field to fix.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// E.g. `credentials[0].token_broker.client_auth`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// One broker-managed credential of a call.
pub struct ManagedCredential {
    /// The broker's key.
    pub key: CredentialKey,
    /// The token endpoint (a `connector://` placeholder when refreshed through the connector).
    pub endpoint: TokenEndpoint,
    /// How new tokens are obtained; `None`: through the connector's `refresh_access_token`.
    pub grant: Option<GrantKind>,
    /// Where it sits in the envelope.
    pub part: Part,
    kind: &'static str,
    access_token: Option<Zeroizing<String>>,
    refresh_token: Option<Zeroizing<String>>,
    expires_at: Option<SystemTime>,
    issued_at: Option<SystemTime>,
    /// The agent recorded that the grant was refused: fail fast until an admin re-consents.
    pub needs_reconsent: bool,
}

impl std::fmt::Debug for ManagedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedCredential")
            .field("key", &self.key)
            .field("part", &self.part)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl ManagedCredential {
    /// The refresh token the call presented, if any.
    pub fn presented_refresh_token(&self) -> Option<&str> {
        self.refresh_token.as_deref().map(String::as_str)
    }

    /// What the broker starts from the first time it sees this credential (or when the call
    /// brings a new grant). A pending update that replaces the presented refresh token is
    /// newer than what the call brings: the cloud has not applied it yet.
    pub fn seed(&self, pending: Option<&PendingUpdate>) -> Seed {
        if let (Some(update), Some(presented)) = (pending, self.presented_refresh_token()) {
            if update.status == "refreshed"
                && update.replaces.contains(&hex(&fingerprint(presented)))
            {
                if let Some(seed) = seed_from_update(update) {
                    return seed;
                }
            }
        }
        Seed {
            issued_at: self.issued_at,
            access_token: self.access_token.clone(),
            expires_at: self.expires_at,
            refresh_token: self.refresh_token.clone(),
            supersedes: Vec::new(),
        }
    }

    /// The client secret (for a refresh through the connector).
    pub fn client_secret(&self) -> Option<&str> {
        self.endpoint.client_secret.as_deref().map(String::as_str)
    }
}

fn seed_from_update(update: &PendingUpdate) -> Option<Seed> {
    let doc = SecretValue(serde_json::from_str(update.credential.expose()).ok()?);
    let text = |name: &str| {
        doc.0
            .get(name)
            .and_then(Value::as_str)
            .map(|s| Zeroizing::new(s.to_string()))
    };
    Some(Seed {
        issued_at: Some(UNIX_EPOCH + Duration::from_millis(update.issued_at_ms)),
        access_token: Some(text("access_token")?),
        expires_at: doc
            .0
            .get("expires_at")
            .and_then(Value::as_u64)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        refresh_token: text("refresh_token"),
        supersedes: update.replaces.iter().filter_map(|h| unhex(h)).collect(),
    })
}

/// A call's `auth` and `credentials`, parsed because at least one credential is managed.
#[derive(Debug)]
pub struct PreparedCredentials {
    auth: Option<SecretValue>,
    credentials: Option<SecretValue>,
    /// The managed credentials, in envelope order.
    pub managed: Vec<ManagedCredential>,
}

impl PreparedCredentials {
    /// Finds the managed credentials of a call; `None` when there are none (the envelope is
    /// then spliced from the raw text, untouched). `settings` fill the token URL's `{name}`
    /// placeholders.
    pub fn parse(
        tenant_id: &str,
        app_id: &str,
        settings: &Map<String, Value>,
        auth: Option<&SecretJson>,
        credentials: Option<&SecretJson>,
    ) -> Result<Option<Self>, SpecError> {
        let mentions =
            |doc: Option<&SecretJson>| doc.is_some_and(|d| d.expose().contains(BROKER_KEY));
        if !mentions(auth) && !mentions(credentials) {
            return Ok(None);
        }
        let parse =
            |doc: Option<&SecretJson>, field: &str| -> Result<Option<SecretValue>, SpecError> {
                doc.map(|d| {
                    serde_json::from_str(d.expose())
                        .map(SecretValue)
                        .map_err(|e| SpecError {
                            field: field.into(),
                            problem: format!("not JSON: {e}"),
                        })
                })
                .transpose()
            };
        let auth = parse(auth, "auth")?;
        let credentials = parse(credentials, "credentials")?;
        check_broker_placement(
            auth.as_ref().map(|a| &a.0),
            credentials.as_ref().map(|c| &c.0),
        )?;
        let ctx = SpecContext {
            tenant_id,
            app_id,
            settings,
        };
        let mut managed = Vec::new();
        if let Some(Value::Object(entry)) = auth.as_ref().map(|a| &a.0) {
            if entry.contains_key(BROKER_FIELD) {
                managed.push(ctx.credential(entry, Part::Auth, AUTH_CREDENTIAL_ID, "auth")?);
            }
        }
        if let Some(Value::Array(items)) = credentials.as_ref().map(|c| &c.0) {
            for (i, item) in items.iter().enumerate() {
                let Value::Object(entry) = item else { continue };
                if !entry.contains_key(BROKER_FIELD) {
                    continue;
                }
                let path = format!("credentials[{i}]");
                let id = entry
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| SpecError {
                        field: format!("{path}.id"),
                        problem: "a managed credential needs its id".into(),
                    })?;
                // The id keys the token cache, the single-flight refresh and the updates sent
                // to the cloud: two credentials under one id would overwrite each other's
                // tokens.
                if managed
                    .iter()
                    .any(|m: &ManagedCredential| m.key.credential_id == id)
                {
                    return Err(SpecError {
                        field: format!("{path}.id"),
                        problem: format!(
                            "another managed credential of this tenant has the id {id:?} (the `auth` object counts as \"{AUTH_CREDENTIAL_ID}\"); give each its own"
                        ),
                    });
                }
                managed.push(ctx.credential(entry, Part::Credentials(i), id, &path)?);
            }
        }
        Ok(Some(Self {
            auth,
            credentials,
            managed,
        }))
    }

    /// Puts `token` into managed credential `index`'s token object.
    pub fn set_token(&mut self, index: usize, token: &str) {
        let (part, kind) = (self.managed[index].part, self.managed[index].kind);
        let entry = match part {
            Part::Auth => self.auth.as_mut().map(|a| &mut a.0),
            Part::Credentials(i) => self
                .credentials
                .as_mut()
                .and_then(|c| c.0.as_array_mut())
                .and_then(|items| items.get_mut(i)),
        };
        if let Some(Value::Object(entry)) = entry {
            let object = entry
                .entry(kind)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(object) = object {
                if let Some(Value::String(old)) = object.get_mut("access_token") {
                    old.zeroize();
                }
                object.insert("access_token".into(), Value::String(token.to_string()));
            }
        }
    }

    /// `auth` and `credentials` as the connector receives them: without the broker blocks.
    pub fn render(&self) -> (Option<SecretJson>, Option<SecretJson>) {
        let strip = |doc: &Option<SecretValue>| {
            doc.as_ref().map(|d| {
                let mut copy = SecretValue(d.0.clone());
                match &mut copy.0 {
                    Value::Object(entry) => strip_broker(entry),
                    Value::Array(items) => items
                        .iter_mut()
                        .filter_map(Value::as_object_mut)
                        .for_each(strip_broker),
                    _ => {}
                }
                SecretJson::from_value(&copy.0)
            })
        };
        (strip(&self.auth), strip(&self.credentials))
    }
}

fn strip_broker(entry: &mut Map<String, Value>) {
    if let Some(mut block) = entry.remove(BROKER_FIELD) {
        wipe(&mut block);
    }
}

struct SpecContext<'a> {
    tenant_id: &'a str,
    app_id: &'a str,
    settings: &'a Map<String, Value>,
}

impl SpecContext<'_> {
    fn credential(
        &self,
        entry: &Map<String, Value>,
        part: Part,
        credential_id: &str,
        path: &str,
    ) -> Result<ManagedCredential, SpecError> {
        let base = format!("{path}.{BROKER_FIELD}");
        let Some(Value::Object(block)) = entry.get(BROKER_FIELD) else {
            return Err(SpecError {
                field: base,
                problem: "must be an object".into(),
            });
        };
        let field = |name: &str| format!("{base}.{name}");
        let bad = |name: &str, problem: &str| SpecError {
            field: field(name),
            problem: problem.into(),
        };
        const KNOWN: [&str; 13] = [
            "token_url",
            "grant",
            "client_id",
            "client_secret",
            "client_auth",
            "request_format",
            "scopes",
            "refresh_token",
            "expires_at",
            "issued_at",
            "username",
            "password",
            "api_key_header",
        ];
        if let Some(unknown) = block
            .keys()
            .find(|k| !KNOWN.contains(&k.as_str()) && k.as_str() != "needs_reconsent")
        {
            return Err(bad(
                unknown,
                &format!("unknown field; expected one of {}", KNOWN.join(", ")),
            ));
        }
        let text = |name: &str| -> Result<Option<&str>, SpecError> {
            match block.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(bad(name, "must be a string")),
            }
        };
        let secret = |name: &str| -> Result<Option<Zeroizing<String>>, SpecError> {
            Ok(text(name)?.map(|s| Zeroizing::new(s.to_string())))
        };
        let time = |name: &str| -> Result<Option<SystemTime>, SpecError> {
            match block.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|s| Some(UNIX_EPOCH + Duration::from_secs(s)))
                    .ok_or_else(|| bad(name, "must be whole seconds since the Unix epoch")),
            }
        };
        let client_id = text("client_id")?
            .ok_or_else(|| bad("client_id", "is required"))?
            .to_string();
        let auth = match text("client_auth")? {
            None | Some("client_secret_post") => ClientAuth::Post,
            Some("client_secret_basic") => ClientAuth::Basic,
            Some(_) => {
                return Err(bad(
                    "client_auth",
                    "must be client_secret_post or client_secret_basic",
                ))
            }
        };
        let format = match text("request_format")? {
            None | Some("form") => BodyFormat::Form,
            Some("json") => BodyFormat::Json,
            Some("query") => BodyFormat::Query,
            Some(_) => return Err(bad("request_format", "must be form, json or query")),
        };
        let scopes = match block.get("scopes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("scopes", "must be strings"))?,
            Some(_) => return Err(bad("scopes", "must be a list of strings")),
        };
        let api_key = match block.get("api_key_header") {
            None | Some(Value::Null) => None,
            Some(Value::Object(h)) => {
                let name = h
                    .get("name")
                    .and_then(Value::as_str)
                    .and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .ok_or_else(|| bad("api_key_header.name", "must be an HTTP header name"))?;
                let value = h
                    .get("value")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("api_key_header.value", "must be a string"))?;
                Some((name, Zeroizing::new(value.to_string())))
            }
            Some(_) => return Err(bad("api_key_header", "must be {\"name\", \"value\"}")),
        };
        let refresh_token = secret("refresh_token")?;
        let token_url = text("token_url")?
            .map(|t| self.expand(t).map_err(|p| bad("token_url", &p)))
            .transpose()?;
        let grant =
            match (text("grant")?, &token_url) {
                (None | Some("refresh_token"), Some(_)) => Some(GrantKind::RefreshToken),
                // No token URL: only a refresh through the connector can work.
                (None | Some("refresh_token"), None) => None,
                (Some("client_credentials"), Some(_)) => Some(GrantKind::ClientCredentials),
                (Some("password"), Some(_)) => Some(GrantKind::Password {
                    username: text("username")?
                        .ok_or_else(|| bad("username", "is required for the password grant"))?
                        .to_string(),
                    password: secret("password")?
                        .ok_or_else(|| bad("password", "is required for the password grant"))?,
                }),
                (Some("client_credentials" | "password"), None) => return Err(bad(
                    "token_url",
                    "is required for this grant (only refresh_token can go through the connector)",
                )),
                (Some(_), _) => {
                    return Err(bad(
                        "grant",
                        "must be refresh_token, client_credentials or password",
                    ))
                }
            };
        let url = token_url.unwrap_or_else(|| format!("connector://{}", self.app_id));
        let kind = TOKEN_KINDS
            .into_iter()
            .find(|k| entry.contains_key(*k))
            .unwrap_or(TOKEN_KINDS[0]);
        let access_token = entry
            .get(kind)
            .and_then(|o| o.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_string()));
        Ok(ManagedCredential {
            key: CredentialKey {
                tenant_id: self.tenant_id.to_string(),
                credential_id: credential_id.to_string(),
                token_url: url.clone(),
                client_id: client_id.clone(),
                scopes: scopes.clone(),
            },
            endpoint: TokenEndpoint {
                url,
                client_id,
                client_secret: secret("client_secret")?,
                auth,
                format,
                scopes,
                api_key,
            },
            grant,
            part,
            kind,
            access_token,
            refresh_token,
            expires_at: time("expires_at")?,
            issued_at: time("issued_at")?,
            needs_reconsent: block.get("needs_reconsent") == Some(&Value::Bool(true)),
        })
    }

    /// Fills `{name}` from the settings. Values are limited to host-name characters, so a
    /// setting cannot redirect the request (a subdomain of `evil.example/` is refused).
    fn expand(&self, template: &str) -> Result<String, String> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').ok_or("has a `{` without its `}`")? + open;
            let name = &rest[open + 1..close];
            let value = match self.settings.get(name) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(format!(
                        "needs the setting {name:?}, which this tenant does not have"
                    ))
                }
            };
            if value.is_empty()
                || !value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
            {
                return Err(format!(
                    "the setting {name:?} may hold only letters, digits, '-', '.' and '_' to be part of a token URL"
                ));
            }
            out.push_str(&value);
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        if !(out.starts_with("https://") || out.starts_with("http://")) {
            return Err("must be an https:// (or http://) URL".into());
        }
        Ok(out)
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn epoch_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the agent holds the tenant's secrets (then its stored credentials are used, and
/// new tokens are stored with them).
fn agent_held(tenant: Option<&Arc<Tenant>>) -> bool {
    tenant.is_some_and(|t| t.auth.is_some() || t.credentials.is_some())
}

/// The broker's persistence: new tokens of an agent-held credential go into its tenant (only
/// if the tenant still holds the refresh token that was used: an admin's newer consent is not
/// overwritten); those of a cloud-held credential become a pending `CredentialUpdate`.
pub fn persist_to(store: Arc<TenantStore>) -> Persist {
    Arc::new(move |key, tokens, replaced| {
        let store = store.clone();
        let key = key.clone();
        let tokens = tokens.clone();
        let replaced = replaced.map(|r| Zeroizing::new(r.to_string()));
        async move {
            tokio::task::spawn_blocking(move || {
                record_tokens(
                    &store,
                    &key,
                    &tokens,
                    replaced.as_deref().map(String::as_str),
                )
            })
            .await
            .map_err(|e| format!("the store task failed: {e}"))?
        }
        .boxed()
    })
}

fn record_tokens(
    store: &TenantStore,
    key: &CredentialKey,
    tokens: &Tokens,
    replaced: Option<&str>,
) -> Result<(), String> {
    let now = SystemTime::now();
    store
        .transact(|c| {
            if agent_held(c.tenants.get(&key.tenant_id)) {
                let changed = update_stored(c.tenants, key, |block, token_object| {
                    let stored = block.get("refresh_token").and_then(Value::as_str);
                    if replaced.is_some() && stored != replaced {
                        tracing::info!(tenant_id = %key.tenant_id, credential = %key.credential_id, "the stored credential changed while it was refreshed; keeping the stored one");
                        return false;
                    }
                    if let Some(new) = &tokens.refresh_token {
                        block.insert("refresh_token".into(), Value::String(new.to_string()));
                    }
                    match tokens.expires_at {
                        Some(at) => block.insert("expires_at".into(), json!(epoch_secs(at))),
                        None => block.remove("expires_at"),
                    };
                    block.insert("issued_at".into(), json!(epoch_secs(now)));
                    block.remove("needs_reconsent");
                    token_object.insert(
                        "access_token".into(),
                        Value::String(tokens.access_token.to_string()),
                    );
                    true
                });
                return (changed, ());
            }
            let mut credential = SecretValue(json!({
                "access_token": tokens.access_token.as_str(),
                "token_type": tokens.token_type,
            }));
            if let Value::Object(map) = &mut credential.0 {
                if let Some(rt) = &tokens.refresh_token {
                    map.insert("refresh_token".into(), Value::String(rt.to_string()));
                }
                if let Some(at) = tokens.expires_at {
                    map.insert("expires_at".into(), json!(epoch_secs(at)));
                }
                if let Some(scope) = &tokens.scope {
                    map.insert("scope".into(), Value::String(scope.clone()));
                }
            }
            push_update(
                c.pending,
                key,
                "refreshed",
                SecretJson::from_value(&credential.0),
                now,
                replaced,
            );
            (true, ())
        })
        .map_err(|e| e.to_string())
}

/// Replaces any pending update of the same credential (the newest tokens win), carrying over
/// what the older one replaced.
fn push_update(
    pending: &mut Vec<PendingUpdate>,
    key: &CredentialKey,
    status: &str,
    credential: SecretJson,
    now: SystemTime,
    replaced: Option<&str>,
) {
    let mut replaces = Vec::new();
    pending.retain(|u| {
        let same = u.tenant_id == key.tenant_id && u.credential_id == key.credential_id;
        if same {
            replaces.extend(u.replaces.iter().cloned());
        }
        !same
    });
    if let Some(old) = replaced {
        let print = hex(&fingerprint(old));
        if !replaces.contains(&print) {
            replaces.push(print);
        }
    }
    if replaces.len() > REPLACES_KEPT {
        replaces.drain(..replaces.len() - REPLACES_KEPT);
    }
    pending.push(PendingUpdate {
        update_id: format!("cred-{}", uuid::Uuid::new_v4()),
        tenant_id: key.tenant_id.clone(),
        credential_id: key.credential_id.clone(),
        status: status.into(),
        credential,
        issued_at_ms: epoch_millis(now),
        replaces,
    });
}

/// Applies `change` to the stored credential's `token_broker` block and token object.
fn update_stored(
    tenants: &mut std::collections::BTreeMap<String, Arc<Tenant>>,
    key: &CredentialKey,
    change: impl FnOnce(&mut Map<String, Value>, &mut Map<String, Value>) -> bool,
) -> bool {
    let Some(tenant) = tenants.get(&key.tenant_id) else {
        return false;
    };
    let mut tenant = Tenant::clone(tenant);
    let doc = if key.credential_id == AUTH_CREDENTIAL_ID {
        &mut tenant.auth
    } else {
        &mut tenant.credentials
    };
    let Some(text) = doc.as_ref() else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<Value>(text.expose()) else {
        return false;
    };
    let mut value = SecretValue(value);
    let entry = if key.credential_id == AUTH_CREDENTIAL_ID {
        value.0.as_object_mut()
    } else {
        value.0.as_array_mut().and_then(|items| {
            items
                .iter_mut()
                .filter_map(Value::as_object_mut)
                .find(|e| e.get("id").and_then(Value::as_str) == Some(key.credential_id.as_str()))
        })
    };
    let Some(entry) = entry else { return false };
    let kind = TOKEN_KINDS
        .into_iter()
        .find(|k| entry.contains_key(*k))
        .unwrap_or(TOKEN_KINDS[0]);
    let mut token_object = match entry.remove(kind) {
        Some(Value::Object(o)) => o,
        _ => Map::new(),
    };
    let changed = match entry.get_mut(BROKER_FIELD) {
        Some(Value::Object(block)) => change(block, &mut token_object),
        _ => false,
    };
    entry.insert(kind.to_string(), Value::Object(token_object));
    if !changed {
        return false;
    }
    *doc = Some(SecretJson::from_value(&value.0));
    tenants.insert(key.tenant_id.clone(), Arc::new(tenant));
    true
}

/// The ids of the tenant's stored credentials marked as needing re-consent.
pub fn stored_reconsent(tenant: &Tenant) -> Vec<String> {
    let mut out = Vec::new();
    let marked = |entry: &Value| {
        entry
            .get(BROKER_FIELD)
            .and_then(|b| b.get("needs_reconsent"))
            == Some(&Value::Bool(true))
    };
    let parse = |doc: &Option<SecretJson>| {
        doc.as_ref()
            .filter(|d| d.expose().contains("\"needs_reconsent\""))
            .and_then(|d| serde_json::from_str::<Value>(d.expose()).ok())
            .map(SecretValue)
    };
    if let Some(auth) = parse(&tenant.auth) {
        if marked(&auth.0) {
            out.push(AUTH_CREDENTIAL_ID.to_string());
        }
    }
    if let Some(Value::Array(items)) = parse(&tenant.credentials).as_ref().map(|c| &c.0) {
        out.extend(
            items
                .iter()
                .filter(|e| marked(e))
                .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_string)),
        );
    }
    out
}

/// What the broker reports: refresh outcomes to the metrics; a refused grant to the tenant
/// store (agent-held: marked, so a restart does not ask again) or to the cloud (a pending
/// `needs_reconsent` update).
#[derive(Debug)]
pub struct StoreEvents {
    /// The store.
    pub store: Arc<TenantStore>,
    /// The metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl BrokerEvents for StoreEvents {
    fn refreshed(&self, outcome: &'static str) {
        self.metrics.token_refreshed(outcome);
    }

    fn needs_reconsent(&self, key: &CredentialKey) {
        let store = self.store.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            let result = store.transact(|c| {
                if agent_held(c.tenants.get(&key.tenant_id)) {
                    let changed = update_stored(c.tenants, &key, |block, _| {
                        block.insert("needs_reconsent".into(), Value::Bool(true));
                        true
                    });
                    return (changed, ());
                }
                push_update(
                    c.pending,
                    &key,
                    "needs_reconsent",
                    SecretJson::from_value(&json!({})),
                    now,
                    None,
                );
                (true, ())
            });
            if let Err(e) = result {
                tracing::error!(tenant_id = %key.tenant_id, credential = %key.credential_id, "cannot record that the credential needs re-consent: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Map<String, Value> {
        json!({"subdomain": "acme", "evil": "x.example/steal?"})
            .as_object()
            .unwrap()
            .clone()
    }

    fn parse(credentials: Value) -> Result<Option<PreparedCredentials>, SpecError> {
        let doc = SecretJson::from_value(&credentials);
        PreparedCredentials::parse("t", "app", &settings(), None, Some(&doc))
    }

    #[test]
    fn a_token_broker_block_out_of_place_is_refused_by_its_path() {
        let block = json!({"token_url": "https://idp.example/token", "client_id": "c",
                           "client_secret": "CANARY-SECRET", "refresh_token": "CANARY-RT"});
        let field = |auth: Option<Value>, credentials: Option<Value>| {
            let auth = auth.map(|a| SecretJson::from_value(&a));
            let credentials = credentials.map(|c| SecretJson::from_value(&c));
            let Err(error) = PreparedCredentials::parse(
                "t",
                "app",
                &settings(),
                auth.as_ref(),
                credentials.as_ref(),
            ) else {
                panic!("accepted");
            };
            assert!(!error.to_string().contains("CANARY"), "{error}");
            error.field
        };
        // Inside the token object, deeper still, and in an `auth` object's token object.
        let inside = json!([{"id": "o", "oauth": {"access_token": "x", "token_broker": block}}]);
        assert_eq!(
            field(None, Some(inside)),
            "credentials[0].oauth.token_broker"
        );
        let deeper = json!([{"id": "p"}, {"id": "o", "extra": [{"token_broker": block}]}]);
        assert_eq!(
            field(None, Some(deeper)),
            "credentials[1].extra[0].token_broker"
        );
        let in_auth = json!({"oauth": {"token_broker": block}});
        assert_eq!(field(Some(in_auth), None), "auth.oauth.token_broker");
        // The documents themselves in the wrong shape.
        let wrapped = json!({"credentials": [{"id": "o", "oauth": {}, "token_broker": block}]});
        assert_eq!(field(None, Some(wrapped)), "credentials");
        let listed = json!([{"oauth": {}, "token_broker": block}]);
        assert_eq!(field(Some(listed), None), "auth");
        // In place it is managed, and a value that merely reads "token_broker" is no block.
        let in_place = json!([{"id": "o", "oauth": {}, "token_broker": block}]);
        assert_eq!(parse(in_place).unwrap().unwrap().managed.len(), 1);
        let named = json!([{"id": "o", "basic": {"username": "token_broker"}}]);
        assert_eq!(parse(named).unwrap().unwrap().managed.len(), 0);
    }

    #[test]
    fn the_broker_key_is_the_broker_field_quoted() {
        assert_eq!(BROKER_KEY, format!("\"{BROKER_FIELD}\""));
    }

    #[test]
    fn a_managed_credential_is_parsed_and_rendered_without_its_broker_block() {
        let mut prepared = parse(json!([
            {"id": "plain", "basic": {"username": "u", "password": "p"}},
            {"id": "o", "oauth": {"access_token": "OLD"}, "token_broker": {
                "token_url": "https://{subdomain}.example.com/token", "client_id": "cid",
                "client_secret": "CANARY-SECRET", "client_auth": "client_secret_basic",
                "request_format": "json", "scopes": "a b", "refresh_token": "CANARY-RT",
                "expires_at": 1_700_000_000u64}}
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(prepared.managed.len(), 1);
        let m = &prepared.managed[0];
        assert_eq!(m.part, Part::Credentials(1));
        assert_eq!(m.key.credential_id, "o");
        assert_eq!(m.key.token_url, "https://acme.example.com/token");
        assert_eq!(m.key.scopes, vec!["a", "b"]);
        assert_eq!(m.endpoint.auth, ClientAuth::Basic);
        assert_eq!(m.endpoint.format, BodyFormat::Json);
        assert!(matches!(m.grant, Some(GrantKind::RefreshToken)));
        assert_eq!(m.presented_refresh_token(), Some("CANARY-RT"));
        assert!(!format!("{prepared:?}").contains("CANARY"));
        prepared.set_token(0, "FRESH");
        let (auth, creds) = prepared.render();
        assert!(auth.is_none());
        let creds: Value = serde_json::from_str(creds.unwrap().expose()).unwrap();
        assert_eq!(
            creds,
            json!([
                {"id": "plain", "basic": {"username": "u", "password": "p"}},
                {"id": "o", "oauth": {"access_token": "FRESH"}}
            ]),
            "the connector sees neither the refresh token nor the client secret"
        );
    }

    #[test]
    fn unmanaged_credentials_are_left_alone() {
        assert!(parse(json!([{"id": "o", "oauth": {"access_token": "x"}}]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_blocks_name_the_field_to_fix() {
        let cases = [
            (
                json!({"client_id": "c", "client_auth": "both"}),
                "credentials[0].token_broker.client_auth",
            ),
            (
                json!({"client_id": "c", "tokenurl": "x"}),
                "credentials[0].token_broker.tokenurl",
            ),
            (
                json!({"token_url": "https://x/t"}),
                "credentials[0].token_broker.client_id",
            ),
            (
                json!({"client_id": "c", "token_url": "https://{evil}/t"}),
                "credentials[0].token_broker.token_url",
            ),
            (
                json!({"client_id": "c", "token_url": "https://{region}.x/t"}),
                "credentials[0].token_broker.token_url",
            ),
            (
                json!({"client_id": "c", "token_url": "ftp://x/t"}),
                "credentials[0].token_broker.token_url",
            ),
            (
                json!({"client_id": "c", "grant": "client_credentials"}),
                "credentials[0].token_broker.token_url",
            ),
            (
                json!({"client_id": "c", "token_url": "https://x/t", "grant": "password"}),
                "credentials[0].token_broker.username",
            ),
            (
                json!({"client_id": "c", "expires_at": "tomorrow"}),
                "credentials[0].token_broker.expires_at",
            ),
        ];
        for (block, field) in cases {
            let err = parse(json!([{"id": "o", "oauth": {}, "token_broker": block}])).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let err = parse(json!([{"oauth": {}, "token_broker": {"client_id": "c"}}])).unwrap_err();
        assert_eq!(err.field, "credentials[0].id");
    }

    #[test]
    fn two_managed_credentials_may_not_share_an_id() {
        let block = json!({"client_id": "c", "token_url": "https://x.example/t"});
        let err = parse(json!([
            {"id": "o", "oauth": {}, "token_broker": block},
            {"id": "p", "oauth": {}, "token_broker": block},
            {"id": "o", "oauth": {}, "token_broker": block},
        ]))
        .unwrap_err();
        assert_eq!(err.field, "credentials[2].id");
        assert!(err.problem.contains("\"o\""), "{err}");
        // The `auth` object's id is "auth".
        let auth = SecretJson::from_value(&json!({"oauth": {}, "token_broker": block}));
        let creds =
            SecretJson::from_value(&json!([{"id": "auth", "oauth": {}, "token_broker": block}]));
        let err = PreparedCredentials::parse("t", "app", &settings(), Some(&auth), Some(&creds))
            .unwrap_err();
        assert_eq!(err.field, "credentials[0].id");
        // Unmanaged credentials are the connector's business, ids and all.
        let ok = parse(json!([
            {"id": "o", "oauth": {}, "token_broker": block},
            {"id": "o", "basic": {"username": "u", "password": "p"}},
        ]));
        assert_eq!(ok.unwrap().unwrap().managed.len(), 1);
    }

    #[test]
    fn a_pending_update_is_newer_than_a_call_that_presents_what_it_replaced() {
        let prepared = parse(
            json!([{"id": "o", "oauth": {"access_token": "AT-0"}, "token_broker": {
            "token_url": "https://x/t", "client_id": "c", "refresh_token": "RT-0"}}]),
        )
        .unwrap()
        .unwrap();
        let m = &prepared.managed[0];
        let update = PendingUpdate {
            update_id: "u".into(),
            tenant_id: "t".into(),
            credential_id: "o".into(),
            status: "refreshed".into(),
            credential: SecretJson::from_value(
                &json!({"access_token": "AT-1", "refresh_token": "RT-1", "expires_at": 2_000_000_000u64}),
            ),
            issued_at_ms: 1,
            replaces: vec![hex(&fingerprint("RT-0"))],
        };
        let seed = m.seed(Some(&update));
        assert_eq!(
            seed.refresh_token.as_deref().map(String::as_str),
            Some("RT-1")
        );
        assert_eq!(
            seed.access_token.as_deref().map(String::as_str),
            Some("AT-1")
        );
        assert_eq!(seed.supersedes, vec![fingerprint("RT-0")]);
        // A call presenting a token the update does not replace (a re-consent) wins.
        let other = PendingUpdate {
            replaces: vec![hex(&fingerprint("RT-x"))],
            ..update
        };
        let seed = m.seed(Some(&other));
        assert_eq!(
            seed.refresh_token.as_deref().map(String::as_str),
            Some("RT-0")
        );
        assert_eq!(unhex(&hex(&fingerprint("a"))), Some(fingerprint("a")));
    }
}
