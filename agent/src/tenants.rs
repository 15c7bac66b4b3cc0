//! Agent-held tenants: per Lumos connection, the settings and the credentials that the agent
//! injects into every call for it.
//!
//! Stored in `<state_dir>/tenants.json` (0600, written atomically). Secrets live in
//! [`SecretJson`]: redacted in `Debug`, zeroized on drop, never returned by the API.
//! Encryption at rest arrives with the credentials work (issue 6); until then the file's mode is
//! the protection.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::state::write_atomic;

/// A JSON document holding secrets (auth or credentials).
#[derive(Clone)]
pub struct SecretJson(Zeroizing<String>);

impl SecretJson {
    /// Wraps a JSON text, checking it is one JSON value.
    pub fn from_json_text(text: String) -> Result<Self, serde_json::Error> {
        let text = Zeroizing::new(text);
        serde_json::from_str::<&RawValue>(&text)?;
        Ok(Self(text))
    }

    /// Wraps a parsed value.
    pub fn from_value(value: &Value) -> Self {
        Self(Zeroizing::new(value.to_string()))
    }

    /// The JSON text, for splicing into a call envelope.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The top-level keys (e.g. `oauth`) or, for a list, each item's `id`: enough to show
    /// what is stored without showing any secret.
    fn outline(&self) -> Value {
        match serde_json::from_str::<Value>(&self.0) {
            Ok(Value::Object(map)) => {
                Value::Array(map.keys().map(|k| Value::String(k.clone())).collect())
            }
            Ok(Value::Array(items)) => Value::Array(
                items
                    .iter()
                    .map(|i| i.get("id").cloned().unwrap_or(Value::Null))
                    .collect(),
            ),
            _ => Value::Array(Vec::new()),
        }
    }
}

impl fmt::Debug for SecretJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretJson([redacted])")
    }
}

impl Serialize for SecretJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SecretJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(Self(Zeroizing::new(String::from(Box::<str>::from(raw)))))
    }
}

/// One tenant as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    /// The connector this tenant belongs to; calls for another app_id are refused.
    pub app_id: String,
    /// Connector settings (non-secret), overlaid by settings sent with a call.
    #[serde(default)]
    pub settings: Map<String, Value>,
    /// Single-credential auth (`{"oauth": {...}}`), if held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SecretJson>,
    /// Multi-credential list (`[{"id": ..., "oauth": {...}}]`), if held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretJson>,
}

impl Tenant {
    /// The API's view: everything but the secrets.
    pub fn view(&self, tenant_id: &str) -> Value {
        serde_json::json!({
            "tenant_id": tenant_id,
            "app_id": self.app_id,
            "settings": self.settings,
            "auth": self.auth.as_ref().map(SecretJson::outline),
            "credentials": self.credentials.as_ref().map(SecretJson::outline),
        })
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantStoreError {
    /// The file cannot be read or written.
    #[error("tenant store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS's words.
        source: std::io::Error,
    },
    /// The file is not a tenant store.
    #[error("tenant store {path} is corrupt ({detail}); move it aside to start empty")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        detail: String,
    },
    /// A bad tenant id.
    #[error("tenant id {0:?} must be 1-128 characters of A-Z a-z 0-9 _ - . :")]
    BadId(String),
}

#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    tenants: BTreeMap<String, Tenant>,
}

/// The agent-held tenants, in memory and on disk.
#[derive(Debug)]
pub struct TenantStore {
    path: PathBuf,
    tenants: RwLock<BTreeMap<String, Arc<Tenant>>>,
}

/// Checks a tenant id.
pub fn check_tenant_id(id: &str) -> Result<(), TenantStoreError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(TenantStoreError::BadId(id.to_string()))
    }
}

impl TenantStore {
    /// Opens the store at `path`, empty if the file does not exist yet.
    pub fn open(path: PathBuf) -> Result<Self, TenantStoreError> {
        let tenants = match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|e| TenantStoreError::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                file.tenants
                    .into_iter()
                    .map(|(k, v)| (k, Arc::new(v)))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(TenantStoreError::Io { path, source }),
        };
        Ok(Self {
            path,
            tenants: RwLock::new(tenants),
        })
    }

    /// The tenant, if stored.
    pub fn get(&self, tenant_id: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .read()
            .expect("tenant lock poisoned")
            .get(tenant_id)
            .cloned()
    }

    /// Every tenant id with its tenant.
    pub fn list(&self) -> Vec<(String, Arc<Tenant>)> {
        self.tenants
            .read()
            .expect("tenant lock poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Stores (or replaces) a tenant; durable when this returns.
    pub fn put(&self, tenant_id: &str, tenant: Tenant) -> Result<(), TenantStoreError> {
        check_tenant_id(tenant_id)?;
        let mut tenants = self.tenants.write().expect("tenant lock poisoned");
        let previous = tenants.insert(tenant_id.to_string(), Arc::new(tenant));
        if let Err(e) = self.persist(&tenants) {
            // Keep memory and disk in agreement: the caller was told it failed.
            match previous {
                Some(old) => tenants.insert(tenant_id.to_string(), old),
                None => tenants.remove(tenant_id),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes a tenant; returns whether it existed.
    pub fn delete(&self, tenant_id: &str) -> Result<bool, TenantStoreError> {
        let mut tenants = self.tenants.write().expect("tenant lock poisoned");
        let Some(old) = tenants.remove(tenant_id) else {
            return Ok(false);
        };
        if let Err(e) = self.persist(&tenants) {
            tenants.insert(tenant_id.to_string(), old);
            return Err(e);
        }
        Ok(true)
    }

    fn persist(&self, tenants: &BTreeMap<String, Arc<Tenant>>) -> Result<(), TenantStoreError> {
        let file = StoreFile {
            version: 1,
            tenants: tenants
                .iter()
                .map(|(k, v)| (k.clone(), Tenant::clone(v)))
                .collect(),
        };
        let bytes = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| {
            TenantStoreError::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            }
        })?);
        write_atomic(&self.path, &bytes, 0o600).map_err(|source| TenantStoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        let store = TenantStore::open(path.clone()).unwrap();
        let tenant = Tenant {
            app_id: "app".into(),
            settings: serde_json::from_str(r#"{"account_id": "a1"}"#).unwrap(),
            auth: Some(
                SecretJson::from_json_text(r#"{"oauth": {"access_token": "CANARY-1"}}"#.into())
                    .unwrap(),
            ),
            credentials: None,
        };
        assert!(!format!("{tenant:?}").contains("CANARY"));
        let view = tenant.view("t1").to_string();
        assert!(!view.contains("CANARY"), "{view}");
        assert!(view.contains("oauth"), "{view}");
        store.put("t1", tenant).unwrap();

        let reopened = TenantStore::open(path).unwrap();
        let t = reopened.get("t1").unwrap();
        assert!(t.auth.as_ref().unwrap().expose().contains("CANARY-1"));
        assert_eq!(t.settings["account_id"], "a1");
        assert!(reopened.delete("t1").unwrap());
        assert!(!reopened.delete("t1").unwrap());
        assert!(store
            .put(
                "../x",
                Tenant {
                    app_id: "a".into(),
                    settings: Map::new(),
                    auth: None,
                    credentials: None
                }
            )
            .is_err());
    }

    #[test]
    fn corrupt_store_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = TenantStore::open(path).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
