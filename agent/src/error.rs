//! Agent errors as callers see them: a stable `agent.<code>` in the Lumos error shape.
//!
//! Connector answers (including their own `is_error` documents) are never wrapped: they pass
//! through verbatim. Only failures of the agent or of running the connector become a
//! [`CallError`].

use serde_json::json;

/// The stable error codes the agent answers with, as `agent.<code>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No connector with that app_id is loaded.
    UnknownConnector,
    /// The connector exists but was rejected at load time; the message says why.
    ConnectorRejected,
    /// The connector does not list that capability in its `info`.
    UnsupportedCapability,
    /// The call's body or arguments are malformed.
    BadRequest,
    /// The stored tenant belongs to a different app.
    TenantMismatch,
    /// No stored tenant with that id.
    UnknownTenant,
    /// The call ran past its deadline; the connector's process group was stopped.
    Timeout,
    /// The connector died (signal, non-zero exit) without a JSON answer.
    ConnectorCrashed,
    /// The connector answered with something that is not a JSON document.
    BadOutput,
    /// The connector's answer exceeded `calls.max_output_bytes`.
    OutputTooLarge,
    /// The connector is at its concurrency limit; retry later.
    Busy,
    /// The call was cancelled (caller went away, or the agent is shutting down).
    Cancelled,
    /// The agent is draining and takes no new calls.
    ShuttingDown,
    /// The agent is still loading its connectors at start; ask again shortly.
    Starting,
    /// The call's id already ran on this agent and the cloud acknowledged its result; it is
    /// not run twice.
    DuplicateCall,
    /// The agent stopped without a shutdown (a crash, a kill) while the call ran or before its
    /// result reached the cloud. Whether it took effect is unknown; it is not run again.
    Interrupted,
    /// A managed OAuth credential's grant was refused (`invalid_grant`): an admin must
    /// connect it again.
    NeedsReconsent,
    /// A managed OAuth credential could not be refreshed for now (the authorization server is
    /// down or rate-limits); the same call may work later.
    TokenRefreshFailed,
    /// A managed OAuth credential cannot be refreshed until an admin fixes it: the
    /// authorization server refuses the client (`invalid_client`, `invalid_scope`, an
    /// unsupported request format) or the credential lacks what a refresh needs. The message
    /// names the setting.
    CredentialMisconfigured,
    /// A local API request without a valid bearer token (missing, unknown or expired), or a
    /// login with a wrong user name or password.
    Unauthenticated,
    /// A local API request the caller's role does not allow.
    Forbidden,
    /// A bug or an I/O failure inside the agent.
    Internal,
}

impl ErrorCode {
    /// The code without the `agent.` prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownConnector => "unknown_connector",
            Self::ConnectorRejected => "connector_rejected",
            Self::UnsupportedCapability => "unsupported_capability",
            Self::BadRequest => "bad_request",
            Self::TenantMismatch => "tenant_mismatch",
            Self::UnknownTenant => "unknown_tenant",
            Self::Timeout => "timeout",
            Self::ConnectorCrashed => "connector_crashed",
            Self::BadOutput => "bad_output",
            Self::OutputTooLarge => "output_too_large",
            Self::Busy => "busy",
            Self::Cancelled => "cancelled",
            Self::ShuttingDown => "shutting_down",
            Self::Starting => "starting",
            Self::DuplicateCall => "duplicate_call",
            Self::Interrupted => "interrupted",
            Self::NeedsReconsent => "needs_reconsent",
            Self::TokenRefreshFailed => "token_refresh_failed",
            Self::CredentialMisconfigured => "credential_misconfigured",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::Internal => "internal",
        }
    }

    /// Whether the same call may succeed if simply retried later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::Timeout
                | Self::ConnectorCrashed
                | Self::Busy
                | Self::ShuttingDown
                | Self::Starting
                | Self::TokenRefreshFailed
        )
    }

    /// The HTTP status the local API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest | Self::TenantMismatch => 400,
            Self::UnknownConnector | Self::UnsupportedCapability | Self::UnknownTenant => 404,
            Self::ConnectorCrashed | Self::BadOutput | Self::OutputTooLarge => 502,
            Self::ConnectorRejected | Self::Busy | Self::ShuttingDown | Self::Starting => 503,
            Self::Timeout => 504,
            Self::Cancelled => 499,
            // Only ever a tunnel result; an API call dies with the agent's connection.
            Self::Interrupted => 500,
            Self::DuplicateCall => 409,
            Self::NeedsReconsent | Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::TokenRefreshFailed | Self::CredentialMisconfigured => 502,
            Self::Internal => 500,
        }
    }

    /// Whose fault it is, in the vocabulary of `connector-py`'s `error_metadata.fault`.
    fn fault(self) -> &'static str {
        match self {
            Self::BadRequest
            | Self::TenantMismatch
            | Self::UnknownConnector
            | Self::UnsupportedCapability
            | Self::UnknownTenant
            | Self::DuplicateCall
            | Self::NeedsReconsent
            | Self::Unauthenticated
            | Self::Forbidden
            | Self::CredentialMisconfigured
            | Self::Cancelled => "caller",
            Self::ConnectorCrashed
            | Self::BadOutput
            | Self::OutputTooLarge
            | Self::ConnectorRejected => "connector",
            Self::Timeout
            | Self::Busy
            | Self::ShuttingDown
            | Self::Starting
            | Self::TokenRefreshFailed
            | Self::Interrupted
            | Self::Internal => "agent",
        }
    }
}

/// A failed capability call, answered in the Lumos error shape.
///
/// The message is written for a person and never contains secrets or connector output.
#[derive(Debug, Clone, thiserror::Error)]
#[error("agent.{}: {message}", code.as_str())]
pub struct CallError {
    /// What went wrong.
    pub code: ErrorCode,
    /// A sentence a person can act on.
    pub message: String,
    /// Suggested wait before retrying, for `busy`.
    pub retry_after_seconds: Option<u64>,
}

impl CallError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    /// The `{"is_error": true, "error": {...}}` document, as connector-py shapes its own errors.
    pub fn to_json(&self, app_id: Option<&str>) -> serde_json::Value {
        json!({
            "is_error": true,
            "error": {
                "message": self.message,
                "error_code": format!("agent.{}", self.code.as_str()),
                "app_id": app_id,
                "raised_by": "lumos-agent",
                "raised_in": null,
                "error_metadata": {
                    "fault": self.code.fault(),
                    "retryable": self.code.retryable(),
                    "refreshable": false,
                    "retry_after_seconds": self.retry_after_seconds,
                },
            },
            "response": null,
            "raw_data": null,
            "page": null,
        })
    }

    /// [`Self::to_json`] serialized.
    pub fn to_json_bytes(&self, app_id: Option<&str>) -> Vec<u8> {
        // Serializing a `Value` we built ourselves cannot fail.
        serde_json::to_vec(&self.to_json(app_id)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_matches_connector_py() {
        let err = CallError::new(ErrorCode::Busy, "too many calls");
        let v = err.to_json(Some("x"));
        assert_eq!(v["is_error"], true);
        assert_eq!(v["error"]["error_code"], "agent.busy");
        assert_eq!(v["error"]["error_metadata"]["retryable"], true);
        assert_eq!(v["error"]["app_id"], "x");
        assert_eq!(err.to_string(), "agent.busy: too many calls");
    }

    /// Every code, as callers are told about them in the README.
    const ALL: [ErrorCode; 22] = [
        ErrorCode::UnknownConnector,
        ErrorCode::ConnectorRejected,
        ErrorCode::UnsupportedCapability,
        ErrorCode::BadRequest,
        ErrorCode::TenantMismatch,
        ErrorCode::UnknownTenant,
        ErrorCode::Timeout,
        ErrorCode::ConnectorCrashed,
        ErrorCode::BadOutput,
        ErrorCode::OutputTooLarge,
        ErrorCode::Busy,
        ErrorCode::Cancelled,
        ErrorCode::ShuttingDown,
        ErrorCode::Starting,
        ErrorCode::DuplicateCall,
        ErrorCode::Interrupted,
        ErrorCode::NeedsReconsent,
        ErrorCode::TokenRefreshFailed,
        ErrorCode::CredentialMisconfigured,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::Internal,
    ];

    /// The README's table of `agent.*` codes is what the cloud's and scripts' authors read:
    /// each code's HTTP status, whether it is retryable and whose fault it is, as the agent
    /// answers them, and no code missing or extra.
    #[test]
    fn the_readme_table_of_codes_matches_the_agents_answers() {
        // `ALL` holds every variant: as many as `as_str` has arms.
        let source = include_str!("error.rs");
        let as_str = source
            .split_once("pub fn as_str(self)")
            .and_then(|(_, rest)| rest.split_once("\n    }\n"))
            .unwrap()
            .0;
        assert_eq!(
            as_str.matches("Self::").count(),
            ALL.len(),
            "a code missing from ALL"
        );

        let rows = crate::readme::table_rows("| `agent.` code |");
        let expected: Vec<Vec<String>> = ALL
            .iter()
            .map(|code| {
                vec![
                    code.as_str().to_string(),
                    code.http_status().to_string(),
                    if code.retryable() { "yes" } else { "no" }.to_string(),
                    code.fault().to_string(),
                ]
            })
            .collect();
        let documented: Vec<Vec<String>> = rows.iter().map(|row| row[..4].to_vec()).collect();
        assert_eq!(documented, expected);
        // And the document itself says the same.
        for code in ALL {
            let doc = CallError::new(code, "m").to_json(None);
            assert_eq!(
                doc["error"]["error_code"],
                format!("agent.{}", code.as_str())
            );
            assert_eq!(
                doc["error"]["error_metadata"]["retryable"],
                code.retryable()
            );
            assert_eq!(doc["error"]["error_metadata"]["fault"], code.fault());
        }
    }
}
