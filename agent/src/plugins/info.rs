//! Parses a connector's `info` document (the Lumos connector CLI protocol).

use std::sync::Arc;

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
            .map(|item| match item {
                Value::String(name) => Some(name.clone()),
                // Some SDK versions describe capabilities as objects.
                Value::Object(o) => o.get("name").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or("`info` capabilities must be names")?,
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

/// Capability names become a process argument: only `lower_snake_case` is accepted, so a name
/// can never be read as an option (`--json …`).
pub fn is_capability_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 128
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
        assert!(
            parse(br#"{"is_error": true, "error": {"message": "boom"}}"#)
                .unwrap_err()
                .contains("boom")
        );
    }
}
