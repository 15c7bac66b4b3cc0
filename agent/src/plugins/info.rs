//! Parses a connector's `info` document (the Lumos connector CLI protocol).

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

/// What the agent needs from `info`; the whole document is kept for the API and the cloud.
#[derive(Debug, Clone)]
pub struct ConnectorInfo {
    /// `response.app_id`.
    pub app_id: String,
    /// `response.version`.
    pub version: String,
    /// `response.capabilities`, as names.
    pub capabilities: Vec<String>,
    /// The `response` object, verbatim.
    pub document: Arc<Value>,
}

/// Checks an app_id is safe to use in paths, logs and URLs.
pub fn check_app_id(app_id: &str) -> Result<(), String> {
    let ok = !app_id.is_empty()
        && app_id.len() <= 128
        && app_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !app_id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "app_id {app_id:?} must be 1-128 characters of A-Z a-z 0-9 _ - . (not starting with .)"
        ))
    }
}

/// Parses `<exe> info` output. Errors are sentences for the inventory's `reason`.
pub fn parse(stdout: &[u8]) -> Result<ConnectorInfo, String> {
    let doc: Value = serde_json::from_slice(stdout).map_err(|e| {
        format!("`info` did not print a JSON document ({e}); a Lumos connector prints {{\"response\": {{\"app_id\": …}}}}")
    })?;
    if doc.get("is_error").and_then(Value::as_bool) == Some(true) {
        let message = doc
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        return Err(format!("`info` answered with an error: {message}"));
    }
    let Some(response) = doc.get("response").filter(|r| r.is_object()) else {
        return Err("`info` output has no \"response\" object".into());
    };
    let text = |key: &str| {
        response
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("`info` response has no \"{key}\" string"))
    };
    let app_id = text("app_id")?;
    check_app_id(&app_id)?;
    let version = text("version")?;
    let capabilities = match response.get("capabilities") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(at, item)| match item {
                Value::String(name) => Ok(name.clone()),
                // Some SDK versions describe capabilities as objects.
                Value::Object(o) => o
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| not_a_name(at, item)),
                _ => Err(not_a_name(at, item)),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => return Err("`info` response has no \"capabilities\" list".into()),
    };
    if let Some(bad) = capabilities.iter().find(|c| !is_capability_name(c)) {
        return Err(format!(
            "capability name {bad:?} is not of the form lower_snake_case"
        ));
    }
    Ok(ConnectorInfo {
        app_id,
        version,
        capabilities,
        document: Arc::new(response.clone()),
    })
}

/// Which item of `info`'s capabilities list is no name, and what it is instead (cut short:
/// it is the connector's text, not the agent's).
fn not_a_name(at: usize, item: &Value) -> String {
    let mut shown = item.to_string();
    if shown.len() > 60 {
        let cut = (0..=57)
            .rev()
            .find(|&i| shown.is_char_boundary(i))
            .unwrap_or(0);
        shown.truncate(cut);
        shown.push('…');
    }
    format!(
        "`info` capabilities[{at}] is {shown}, not a name (a string, or an object with a \"name\" string)"
    )
}

/// Capability names become a process argument: only `lower_snake_case` is accepted, so a name
/// can never be read as an option (`--json …`).
pub fn is_capability_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 128
}

/// A credential a connector declares in its `info`'s `credentials_schema`.
struct DeclaredCredential<'a> {
    id: &'a str,
    /// The credential's type, the key of its token object (`oauth`, `basic`, …).
    kind: Option<&'a str>,
    optional: bool,
    /// The fields its token object must have (connector-py's `required`).
    required: Vec<&'a str>,
}

impl DeclaredCredential<'_> {
    fn describe(&self) -> String {
        match self.kind {
            Some(kind) => format!("{:?} ({kind})", self.id),
            None => format!("{:?}", self.id),
        }
    }

    /// Where `stored` (matched to this one) lacks what the connector reads: its token object,
    /// or a required field of it. A managed credential gets its `access_token` from the
    /// agent's token broker, so that one may be missing.
    fn lacks(&self, app_id: &str, name: &str, stored: &StoredCredential) -> Option<String> {
        let kind = self.kind?;
        let Some((_, fields)) = stored.keys.iter().find(|(key, _)| key == kind) else {
            return Some(format!(
                "{name} has no {kind:?} object, which {app_id} reads it from"
            ));
        };
        let managed = stored.keys.iter().any(|(key, _)| key == "token_broker");
        let missing: Vec<&str> = self
            .required
            .iter()
            .copied()
            .filter(|field| !fields.iter().any(|f| f == field))
            .filter(|field| !(managed && *field == "access_token"))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{name}'s {kind:?} object has no {}, which {app_id} requires",
                quoted_or_nothing(&missing)
            )
        })
    }
}

/// The credentials `document` declares: connector-py's shape (`id`, `x-credential-type`,
/// `x-optional`, `required`), or the shorter one of the examples (`id`, `type`, `optional`).
fn declared_credentials(document: &Value) -> Vec<DeclaredCredential<'_>> {
    let Some(entries) = document.get("credentials_schema").and_then(Value::as_array) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let text = |key: &str| entry.get(key).and_then(Value::as_str);
            let flag = |key: &str| entry.get(key).and_then(Value::as_bool);
            Some(DeclaredCredential {
                id: text("id")?,
                // A JSON schema's own `type` ("object") is no credential type.
                kind: text("x-credential-type").or(text("type").filter(|t| *t != "object")),
                optional: flag("x-optional").or(flag("optional")).unwrap_or(false),
                required: entry
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect(),
            })
        })
        .collect()
}

/// One stored credential without its secrets: its `id`, if it has one, and its keys, each
/// with the field names of its value when that is an object (`("oauth", ["access_token"])`).
#[derive(Debug, PartialEq, Eq)]
pub struct StoredCredential {
    id: Option<String>,
    keys: Vec<(String, Vec<String>)>,
}

/// What a tenant holds, without its secrets: its single `auth` object, or its `credentials`
/// list, as names only. Enough to compare with what a connector declares.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum CredentialShape {
    /// No credentials: calls bring their own.
    #[default]
    None,
    /// `auth`.
    Auth(StoredCredential),
    /// `credentials`.
    List(Vec<StoredCredential>),
}

impl CredentialShape {
    /// The shape of stored `auth` and `credentials` JSON texts, read in place: the secrets
    /// in them are not copied out of their (zeroized) texts.
    pub fn of_texts(auth: Option<&str>, credentials: Option<&str>) -> Self {
        type Object<'a> = std::collections::BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>;
        let stored = |map: &Object<'_>| StoredCredential {
            id: map
                .get("id")
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok()),
            keys: map
                .iter()
                .map(|(key, raw)| {
                    let fields = serde_json::from_str::<Object<'_>>(raw.get())
                        .map(|inner| inner.keys().map(|k| k.to_string()).collect())
                        .unwrap_or_default();
                    (key.to_string(), fields)
                })
                .collect(),
        };
        if let Some(Ok(items)) = credentials.map(serde_json::from_str::<Vec<Object<'_>>>) {
            return Self::List(items.iter().map(stored).collect());
        }
        match auth.map(serde_json::from_str::<Object<'_>>) {
            Some(Ok(map)) => Self::Auth(stored(&map)),
            _ => Self::None,
        }
    }
}

/// Where the credentials of a tenant stored for the connector of `document` do not match
/// what it declares: one line each, naming ids, types and field names only (a shape holds no
/// value). Advice for the admin (the tenant is stored either way): a mismatch otherwise shows
/// only as the connector's error at a call. Nothing when the connector declares nothing, or
/// the tenant holds no credentials (calls then bring their own).
pub fn credential_notes(app_id: &str, document: &Value, stored: &CredentialShape) -> Vec<String> {
    let declared = declared_credentials(document);
    if declared.is_empty() {
        return Vec::new();
    }
    let listed = declared
        .iter()
        .map(DeclaredCredential::describe)
        .collect::<Vec<_>>()
        .join(", ");
    let mut notes = Vec::new();
    match stored {
        CredentialShape::None => {}
        CredentialShape::List(items) => {
            for item in items {
                let Some(id) = &item.id else {
                    notes.push(format!(
                        "a credential has no \"id\"; {app_id} declares {listed}"
                    ));
                    continue;
                };
                match declared.iter().find(|d| d.id == id) {
                    None => notes.push(format!(
                        "credential {id:?} is not one {app_id} declares ({listed})"
                    )),
                    Some(declared) => {
                        notes.extend(declared.lacks(app_id, &format!("credential {id:?}"), item))
                    }
                }
            }
            for missing in declared.iter().filter(|d| {
                !d.optional && !items.iter().any(|item| item.id.as_deref() == Some(d.id))
            }) {
                notes.push(format!(
                    "{app_id} needs credential {}, which is not stored",
                    missing.describe()
                ));
            }
        }
        CredentialShape::Auth(auth) => {
            let required = declared.iter().filter(|d| !d.optional).count();
            if required > 1 {
                notes.push(format!(
                    "{app_id} declares {required} credentials ({listed}): store them as a list in \"credentials\" (--credentials-file), each with its id"
                ));
            }
            let has: Vec<&str> = auth
                .keys
                .iter()
                .map(|(key, _)| key.as_str())
                .filter(|key| !matches!(*key, "id" | "token_broker"))
                .collect();
            let kinds: Vec<&str> = declared.iter().filter_map(|d| d.kind).collect();
            match declared
                .iter()
                .find(|d| d.kind.is_some_and(|kind| has.contains(&kind)))
            {
                Some(declared) => notes.extend(declared.lacks(app_id, "this auth", auth)),
                None if !kinds.is_empty() => notes.push(format!(
                    "this auth holds {} where {app_id} reads {}",
                    quoted_or_nothing(&has),
                    kinds
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
                None => {}
            }
        }
    }
    notes
}

/// `"a", "b"`, or "nothing".
fn quoted_or_nothing(keys: &[&str]) -> String {
    if keys.is_empty() {
        return "nothing".into();
    }
    keys.iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connector_py_info() {
        let doc = br#"{"response": {"app_id": "demo-connector", "version": "0.1.0", "capabilities": ["validate_credentials", "list_accounts"]}, "page": null}"#;
        let info = parse(doc).unwrap();
        assert_eq!(info.app_id, "demo-connector");
        assert_eq!(info.capabilities, ["validate_credentials", "list_accounts"]);
    }

    #[test]
    fn rejects_with_reasons() {
        assert!(parse(b"hello")
            .unwrap_err()
            .contains("did not print a JSON document"));
        assert!(parse(br#"{"response": {"version": "1"}}"#)
            .unwrap_err()
            .contains("app_id"));
        assert!(
            parse(br#"{"response": {"app_id": "../x", "version": "1", "capabilities": []}}"#)
                .unwrap_err()
                .contains("app_id")
        );
        assert!(parse(
            br#"{"response": {"app_id": "a", "version": "1", "capabilities": ["--json"]}}"#
        )
        .unwrap_err()
        .contains("lower_snake_case"));
        // The item that is no name is pointed at, shown cut short.
        let long = "x".repeat(100);
        let doc = format!(
            r#"{{"response": {{"app_id": "a", "version": "1", "capabilities": ["ok", {{"title": "{long}"}}]}}}}"#
        );
        let err = parse(doc.as_bytes()).unwrap_err();
        assert!(
            err.starts_with("`info` capabilities[1] is {\"title\":\"xxx"),
            "{err}"
        );
        assert!(err.contains("…, not a name"), "{err}");
        assert!(!err.contains(&long), "{err}");
        assert_eq!(
            parse(br#"{"response": {"app_id": "a", "version": "1", "capabilities": [7]}}"#)
                .unwrap_err(),
            "`info` capabilities[0] is 7, not a name (a string, or an object with a \"name\" string)"
        );
        assert!(
            parse(br#"{"is_error": true, "error": {"message": "boom"}}"#)
                .unwrap_err()
                .contains("boom")
        );
    }

    #[test]
    fn stored_credentials_are_compared_with_what_the_connector_declares() {
        use serde_json::json;
        // What is stored, read in place from its text as the API reads it.
        let notes = |document: &Value, auth: Option<Value>, credentials: Option<Value>| {
            let texts = (
                auth.map(|v| v.to_string()),
                credentials.map(|v| v.to_string()),
            );
            let read = CredentialShape::of_texts(texts.0.as_deref(), texts.1.as_deref());
            credential_notes("app", document, &read)
        };
        // The examples' shape, one credential.
        let example = json!({"credentials_schema": [
            {"id": "oauth", "type": "oauth", "optional": false, "description": "d"}]});
        let token = json!({"access_token": "SECRET"});
        assert!(notes(&example, Some(json!({"oauth": token})), None).is_empty());
        // Its token_broker block is the agent's, beside the token object.
        let managed = json!({"oauth": token, "token_broker": {"client_secret": "SECRET"}});
        assert!(notes(&example, Some(managed), None).is_empty());
        let wrong = notes(&example, Some(json!({"basic": token})), None);
        assert_eq!(
            wrong,
            ["this auth holds \"basic\" where app reads \"oauth\""]
        );
        // connector-py's shape, as a real connector prints it.
        let real = json!({"credentials_schema": [
            {"id": "demo_oauth", "type": "object", "x-credential-type": "oauth",
             "x-optional": false, "required": ["access_token"]},
            {"id": "demo_key", "type": "object", "x-credential-type": "token",
             "x-optional": true}]});
        let listed = json!([{"id": "demo_oauth", "oauth": token}]);
        assert!(notes(&real, None, Some(listed)).is_empty());
        let mixed = notes(
            &real,
            None,
            Some(json!([{"id": "demo_key", "oauth": token}, {"id": "other", "oauth": token}])),
        );
        assert_eq!(
            mixed,
            [
                "credential \"demo_key\" has no \"token\" object, which app reads it from",
                "credential \"other\" is not one app declares (\"demo_oauth\" (oauth), \"demo_key\" (token))",
                "app needs credential \"demo_oauth\" (oauth), which is not stored",
            ]
        );
        // A required field of the token object, missing (a typo, say); a managed credential
        // gets its access token from the agent's broker.
        let typo = notes(
            &real,
            None,
            Some(json!([{"id": "demo_oauth", "oauth": {"acess_token": "SECRET"}}])),
        );
        assert_eq!(
            typo,
            ["credential \"demo_oauth\"'s \"oauth\" object has no \"access_token\", which app requires"]
        );
        let managed_list = json!([{"id": "demo_oauth", "oauth": {},
                                   "token_broker": {"refresh_token": "SECRET"}}]);
        assert!(notes(&real, None, Some(managed_list)).is_empty());
        let single = json!({"credentials_schema": [{"id": "only", "x-credential-type": "oauth",
                                                     "required": ["access_token"]}]});
        assert_eq!(
            notes(&single, Some(json!({"oauth": {"token": "SECRET"}})), None),
            ["this auth's \"oauth\" object has no \"access_token\", which app requires"]
        );
        assert!(notes(&single, Some(json!({"oauth": token})), None).is_empty());
        // Two required credentials do not fit one auth object.
        let two = json!({"credentials_schema": [
            {"id": "a", "x-credential-type": "oauth"}, {"id": "b", "x-credential-type": "basic"}]});
        let single = notes(&two, Some(json!({"oauth": token})), None);
        assert_eq!(single.len(), 1, "{single:?}");
        assert!(single[0].contains("store them as a list"), "{single:?}");
        // Nothing declared, or nothing stored: nothing to say. And never a value.
        assert!(notes(
            &json!({"credentials_schema": []}),
            Some(json!({"x": token})),
            None
        )
        .is_empty());
        assert!(notes(&example, None, None).is_empty());
        assert!(!format!("{wrong:?}{mixed:?}{single:?}{typo:?}").contains("SECRET"));
    }
}
