//! Agent-held tenants: per Lumos connection, the settings and the credentials that the agent
//! injects into every call for it.
//!
//! Stored in `<state_dir>/tenants.enc` (0600, written atomically: temp file, fsync, rename,
//! fsync of the folder), encrypted with XChaCha20-Poly1305 under a 256-bit [`StoreKey`]: the
//! service manager's (systemd `LoadCredential=tenants-key:…`, read from
//! `$CREDENTIALS_DIRECTORY`), or `<state_dir>/tenants.key` (0600), created at first start. A
//! fresh random nonce seals every write; the header is authenticated too, so a damaged,
//! truncated or foreign file is refused with a clear error, never half-read.
//!
//! In memory, secrets live in [`SecretJson`]: redacted in `Debug`, zeroized on drop, never
//! returned by the API. The plaintext `tenants.json` of earlier versions is encrypted and
//! removed at the first start that finds it.
//!
//! The same sealed file holds the [`PendingUpdate`]s: tokens the broker refreshed for
//! cloud-held credentials, kept until the cloud acknowledges them, so that a rotated refresh
//! token survives a crash (the store is the one durable, encrypted home of every secret).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::state::{write_atomic, StatePaths};

/// The first bytes of an encrypted store: format and version, authenticated with the data.
const MAGIC: &[u8; 8] = b"LUMOSTS1";
const NONCE_LEN: usize = 24;
/// The file name under `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=tenants-key:…`).
pub const SERVICE_KEY_NAME: &str = "tenants-key";

/// The tenant store's 256-bit key. Zeroized on drop; `Debug` shows where it came from only.
pub struct StoreKey {
    key: Zeroizing<[u8; 32]>,
    origin: PathBuf,
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", self.origin.display())
    }
}

impl StoreKey {
    /// The service manager's key if it gives one (`$CREDENTIALS_DIRECTORY/tenants-key`), else
    /// `<state_dir>/tenants.key`, created when there is none yet. A store that exists without
    /// its key is an error: a new key would make it unreadable.
    pub fn load_or_create(state: &StatePaths) -> Result<Self, TenantStoreError> {
        if let Some(key) = Self::find(state)? {
            return Ok(key);
        }
        let path = state.tenants_key();
        if state.tenants().exists() {
            return Err(TenantStoreError::KeyMissing {
                store: state.tenants(),
                key: path,
            });
        }
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(|e| TenantStoreError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        write_atomic(&path, hex::encode(key.as_ref()).as_bytes(), 0o600).map_err(|source| {
            TenantStoreError::Io {
                path: path.clone(),
                source,
            }
        })?;
        tracing::info!(key = %path.display(), "created the tenant store's key; back it up with the state folder");
        Ok(Self { key, origin: path })
    }

    /// The key if there is one (the service manager's, else the state folder's); creates
    /// nothing (`doctor` uses this).
    pub fn find(state: &StatePaths) -> Result<Option<Self>, TenantStoreError> {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(SERVICE_KEY_NAME);
            if path.exists() {
                return Self::read(&path).map(Some);
            }
        }
        let path = state.tenants_key();
        match std::fs::metadata(&path) {
            Ok(_) => Self::read(&path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // Unreadable is not absent: never make a new key over one we cannot see.
            Err(source) => Err(TenantStoreError::Io { path, source }),
        }
    }

    /// Where the key was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Reads a key file: 64 hex characters (a trailing newline is fine) or 32 raw bytes.
    pub fn read(path: &Path) -> Result<Self, TenantStoreError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| TenantStoreError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        let mut key = Zeroizing::new([0u8; 32]);
        let text = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
        if text.len() == 64 && hex::decode_to_slice(text, key.as_mut()).is_ok() {
            return Ok(Self {
                key,
                origin: path.to_path_buf(),
            });
        }
        if bytes.len() == 32 {
            key.copy_from_slice(&bytes);
            return Ok(Self {
                key,
                origin: path.to_path_buf(),
            });
        }
        Err(TenantStoreError::BadKey(path.to_path_buf()))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.as_ref().into())
    }

    /// `MAGIC ‖ nonce ‖ ciphertext`, with a fresh random nonce.
    fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| "encryption failed".to_string())?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext of a sealed file; `None` if it is not ours, damaged, or another key's.
    fn open(&self, file: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let rest = file.strip_prefix(MAGIC)?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: MAGIC,
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

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
    /// The file cannot be decrypted with the key.
    #[error("tenant store {path} cannot be decrypted with the key {key}: it is damaged, or was written under another key; restore the matching key, or move the store aside to start empty")]
    Undecryptable {
        /// The store.
        path: PathBuf,
        /// Where the key came from.
        key: PathBuf,
    },
    /// The store exists but its key does not.
    #[error("tenant store {store} exists but its key {key} does not; restore the key from a backup (or give it as the service credential `tenants-key`), or move the store aside to start empty")]
    KeyMissing {
        /// The store.
        store: PathBuf,
        /// The expected key file.
        key: PathBuf,
    },
    /// The key file holds no key.
    #[error("the tenant store key {0} is not a key: expected 64 hex characters (or 32 bytes)")]
    BadKey(PathBuf),
    /// A bad tenant id.
    #[error("tenant id {0:?} must be 1-128 characters of A-Z a-z 0-9 _ - . :")]
    BadId(String),
}

/// New tokens for a cloud-held credential, waiting for the cloud's acknowledgement
/// (`CredentialUpdate` on the tunnel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingUpdate {
    /// Unique id; the cloud acknowledges it with `ResultAck(call_id = update_id)`.
    pub update_id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The credential's id (`credentials[].id`, or `auth`).
    pub credential_id: String,
    /// `refreshed` (the credential holds new tokens) or `needs_reconsent`.
    pub status: String,
    /// The credential as sent to the cloud: `{"access_token", "refresh_token", "expires_at",
    /// "token_type"}` (empty for `needs_reconsent`).
    pub credential: SecretJson,
    /// When the agent obtained it, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// Hex SHA-256 of the refresh tokens this update replaces: a call that still presents one
    /// of them comes from a cloud that has not applied the update yet.
    #[serde(default)]
    pub replaces: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    tenants: BTreeMap<String, Tenant>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending_updates: Vec<PendingUpdate>,
}

/// The agent-held tenants, in memory and on disk.
///
/// Readers take the current `Snapshot` and never wait for a write to reach the disk: a
/// writer builds the next snapshot from the current one, makes it durable (encrypt, write,
/// fsync, rename), and only then swaps it in. So a change is visible only once it is durable
/// (a rotated refresh token is on disk before the new access token is used), and a token
/// refresh's fsync does not stall every call that looks a tenant up.
pub struct TenantStore {
    path: PathBuf,
    key: StoreKey,
    /// What readers see; replaced whole, never changed in place.
    current: RwLock<Arc<Snapshot>>,
    /// Held by the one writer at a time, across its disk write.
    writer: Mutex<()>,
    /// Bumped on every change of the pending updates: a watcher never misses one, even if it
    /// was busy when it happened.
    pub updates: tokio::sync::watch::Sender<u64>,
    /// Runs once just before the next disk write (tests: hold a writer there).
    #[cfg(test)]
    before_write: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl fmt::Debug for TenantStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantStore")
            .field("path", &self.path)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The tenants and pending updates at one moment.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    tenants: BTreeMap<String, Arc<Tenant>>,
    pending: Vec<PendingUpdate>,
}

/// The tenants and the pending updates, as one transaction sees them.
#[derive(Debug)]
pub struct StoreContents<'a> {
    /// Every tenant.
    pub tenants: &'a mut BTreeMap<String, Arc<Tenant>>,
    /// Every pending credential update.
    pub pending: &'a mut Vec<PendingUpdate>,
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
    /// Opens the store at `path` with `key`, empty if the file does not exist yet. A plaintext
    /// store of an earlier version at `plaintext` is encrypted into `path` and then removed.
    pub fn open(path: PathBuf, key: StoreKey, plaintext: &Path) -> Result<Self, TenantStoreError> {
        let (tenants, pending) = read_sealed(&path, &key)?;
        let store = Self {
            path,
            key,
            current: RwLock::new(Arc::new(Snapshot { tenants, pending })),
            writer: Mutex::new(()),
            updates: tokio::sync::watch::Sender::new(0),
            #[cfg(test)]
            before_write: Mutex::new(None),
        };
        store.migrate(plaintext)?;
        Ok(store)
    }

    /// Encrypts an earlier version's plaintext store, once: written encrypted first, removed
    /// after, so a crash in between leaves both and the next start finishes the job.
    fn migrate(&self, plaintext: &Path) -> Result<(), TenantStoreError> {
        let bytes = match std::fs::read(plaintext) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(TenantStoreError::Io {
                    path: plaintext.to_path_buf(),
                    source,
                })
            }
        };
        let (old, _) = parse_store(plaintext, &bytes)?;
        let count = old.len();
        self.write(|next| {
            for (id, tenant) in old {
                // A tenant already in the encrypted store is newer than the plaintext copy.
                next.tenants.entry(id).or_insert(tenant);
            }
            (true, ())
        })?;
        std::fs::remove_file(plaintext).map_err(|source| TenantStoreError::Io {
            path: plaintext.to_path_buf(),
            source,
        })?;
        tracing::info!(tenants = count, from = %plaintext.display(), to = %self.path.display(), "encrypted the plaintext tenant store and removed it");
        Ok(())
    }

    /// The sealed file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The tenant, if stored.
    pub fn get(&self, tenant_id: &str) -> Option<Arc<Tenant>> {
        self.snapshot().tenants.get(tenant_id).cloned()
    }

    /// Every tenant id with its tenant.
    pub fn list(&self) -> Vec<(String, Arc<Tenant>)> {
        self.snapshot()
            .tenants
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Stores (or replaces) a tenant; durable when this returns.
    pub fn put(&self, tenant_id: &str, tenant: Tenant) -> Result<(), TenantStoreError> {
        check_tenant_id(tenant_id)?;
        self.write(|next| {
            next.tenants.insert(tenant_id.to_string(), Arc::new(tenant));
            (true, ())
        })
    }

    /// Removes a tenant; returns whether it existed.
    pub fn delete(&self, tenant_id: &str) -> Result<bool, TenantStoreError> {
        self.write(|next| {
            let existed = next.tenants.remove(tenant_id).is_some();
            (existed, existed)
        })
    }

    /// Changes tenants and pending updates together, durably: `change` returns whether it
    /// changed anything. Nothing is visible until it is on disk; if writing fails, nothing
    /// changed.
    pub fn transact<R>(
        &self,
        change: impl FnOnce(StoreContents<'_>) -> (bool, R),
    ) -> Result<R, TenantStoreError> {
        let mut changed = false;
        let out = self.write(|next| {
            let (did, out) = change(StoreContents {
                tenants: &mut next.tenants,
                pending: &mut next.pending,
            });
            changed = did;
            (did, out)
        })?;
        if changed {
            self.updates.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(out)
    }

    /// The one way to change the store: `change` edits a copy of the current snapshot and
    /// says whether it changed anything; a changed copy is written to disk, then made current.
    fn write<R>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> (bool, R),
    ) -> Result<R, TenantStoreError> {
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Snapshot::clone(&self.snapshot());
        let (changed, out) = change(&mut next);
        if !changed {
            return Ok(out);
        }
        #[cfg(test)]
        if let Some(hook) = self
            .before_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            hook();
        }
        self.persist(&next)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        Ok(out)
    }

    /// The pending update of one credential, if any (there is at most one: a newer one
    /// replaces it).
    pub fn pending_update(&self, tenant_id: &str, credential_id: &str) -> Option<PendingUpdate> {
        self.snapshot()
            .pending
            .iter()
            .find(|u| u.tenant_id == tenant_id && u.credential_id == credential_id)
            .cloned()
    }

    /// Whether the update `update_id` is pending (no copy of its secrets).
    pub fn has_pending_update(&self, update_id: &str) -> bool {
        self.snapshot()
            .pending
            .iter()
            .any(|u| u.update_id == update_id)
    }

    /// Every pending credential update.
    pub fn pending_updates(&self) -> Vec<PendingUpdate> {
        self.snapshot().pending.clone()
    }

    /// The cloud stored an update: forget it. Returns whether it was pending.
    pub fn acknowledge_update(&self, update_id: &str) -> Result<bool, TenantStoreError> {
        self.transact(|c| {
            let before = c.pending.len();
            c.pending.retain(|u| u.update_id != update_id);
            let removed = c.pending.len() != before;
            (removed, removed)
        })
    }

    fn persist(&self, snapshot: &Snapshot) -> Result<(), TenantStoreError> {
        let file = StoreFile {
            version: 1,
            tenants: snapshot
                .tenants
                .iter()
                .map(|(k, v)| (k.clone(), Tenant::clone(v)))
                .collect(),
            pending_updates: snapshot.pending.clone(),
        };
        let bytes = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| {
            TenantStoreError::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            }
        })?);
        let sealed = self.key.seal(&bytes).map_err(|e| TenantStoreError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.path, &sealed, 0o600).map_err(|source| TenantStoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The tenants in the sealed store at `path` (none if there is no file), changing nothing:
/// `doctor` checks a store with this.
pub fn inspect(path: &Path, key: &StoreKey) -> Result<usize, TenantStoreError> {
    read_sealed(path, key).map(|(t, _)| t.len())
}

type Contents = (BTreeMap<String, Arc<Tenant>>, Vec<PendingUpdate>);

fn read_sealed(path: &Path, key: &StoreKey) -> Result<Contents, TenantStoreError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let clear = key
                .open(&bytes)
                .ok_or_else(|| TenantStoreError::Undecryptable {
                    path: path.to_path_buf(),
                    key: key.origin.clone(),
                })?;
            parse_store(path, &clear)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((BTreeMap::new(), Vec::new())),
        Err(source) => Err(TenantStoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_store(path: &Path, bytes: &[u8]) -> Result<Contents, TenantStoreError> {
    let file: StoreFile = serde_json::from_slice(bytes).map_err(|e| TenantStoreError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok((
        file.tenants
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
        file.pending_updates,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(secret: &str) -> Tenant {
        Tenant {
            app_id: "app".into(),
            settings: serde_json::from_str(r#"{"account_id": "a1"}"#).unwrap(),
            auth: Some(
                SecretJson::from_json_text(format!(
                    r#"{{"oauth": {{"access_token": "{secret}"}}}}"#
                ))
                .unwrap(),
            ),
            credentials: None,
        }
    }

    /// The single auth of a stored tenant, as text.
    fn secret_of(store: &TenantStore, tenant_id: &str) -> String {
        let tenant = store.get(tenant_id).unwrap();
        tenant.auth.as_ref().unwrap().expose().to_string()
    }

    fn state() -> (tempfile::TempDir, StatePaths) {
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path().join("state"));
        state.prepare().unwrap();
        (dir, state)
    }

    fn open(state: &StatePaths) -> Result<TenantStore, TenantStoreError> {
        TenantStore::open(
            state.tenants(),
            StoreKey::load_or_create(state)?,
            &state.tenants_plaintext(),
        )
    }

    #[test]
    fn secrets_are_redacted_encrypted_at_rest_and_persisted() {
        let (_dir, state) = state();
        let store = open(&state).unwrap();
        let t = tenant("CANARY-1");
        assert!(!format!("{t:?}").contains("CANARY"));
        assert!(!format!("{:?}", store.key).contains(&hex::encode(store.key.key.as_ref())));
        let view = t.view("t1").to_string();
        assert!(!view.contains("CANARY"), "{view}");
        assert!(view.contains("oauth"), "{view}");
        store.put("t1", t).unwrap();

        // On disk: neither the secret nor even the settings are readable.
        let disk = std::fs::read(state.tenants()).unwrap();
        assert!(disk.starts_with(MAGIC));
        let text = String::from_utf8_lossy(&disk);
        assert!(!text.contains("CANARY") && !text.contains("account_id"));

        let reopened = open(&state).unwrap();
        let t = reopened.get("t1").unwrap();
        assert!(t.auth.as_ref().unwrap().expose().contains("CANARY-1"));
        assert_eq!(t.settings["account_id"], "a1");
        assert!(reopened.delete("t1").unwrap());
        assert!(!reopened.delete("t1").unwrap());
        assert!(store.put("../x", tenant("x")).is_err());
    }

    #[test]
    fn readers_never_wait_for_a_write_to_reach_the_disk_and_see_it_once_durable() {
        let (_dir, state) = state();
        let store = Arc::new(open(&state).unwrap());
        store.put("t1", tenant("OLD")).unwrap();
        // Hold the next writer just before its disk write.
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        *store.before_write.lock().unwrap() = Some(Box::new(move || {
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        }));
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || store.put("t1", tenant("NEW")))
        };
        entered_rx.recv().unwrap();
        // Readers are served while the write is under way, on another thread so that a reader
        // blocked by the writer fails this test instead of hanging it.
        let (read_tx, read_rx) = std::sync::mpsc::channel();
        {
            let store = store.clone();
            std::thread::spawn(move || {
                let seen = (
                    secret_of(&store, "t1"),
                    store.list().len(),
                    store.pending_updates().len(),
                );
                read_tx.send(seen).unwrap();
            });
        }
        let seen = read_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a reader waited for the writer's disk write");
        assert!(seen.0.contains("OLD"), "not durable yet, so not visible");
        assert_eq!((seen.1, seen.2), (1, 0));
        release_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        assert!(secret_of(&store, "t1").contains("NEW"));
        assert!(secret_of(&open(&state).unwrap(), "t1").contains("NEW"));
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let (dir, state) = state();
        let store = open(&state).unwrap();
        store.put("t1", tenant("KEPT")).unwrap();
        // The store's folder becomes a file's path: the next write cannot create its temp file.
        let moved = dir.path().join("moved");
        std::fs::rename(&state.root, &moved).unwrap();
        std::fs::write(&state.root, b"not a folder").unwrap();
        assert!(store.put("t2", tenant("LOST")).is_err());
        assert!(store.delete("t1").is_err());
        let updates = *store.updates.borrow();
        assert!(store
            .transact(|c| {
                c.tenants.clear();
                (true, ())
            })
            .is_err());
        assert_eq!(*store.updates.borrow(), updates, "no update announced");
        assert!(store.get("t2").is_none());
        assert!(secret_of(&store, "t1").contains("KEPT"));
        assert_eq!(store.list().len(), 1);
    }

    #[test]
    fn a_damaged_store_a_wrong_key_and_a_missing_key_are_clear_errors() {
        let (_dir, state) = state();
        open(&state).unwrap().put("t1", tenant("CANARY-2")).unwrap();
        let good = std::fs::read(state.tenants()).unwrap();

        // Every single flipped bit, anywhere (header, nonce, ciphertext, tag), is refused.
        for at in [0, MAGIC.len(), MAGIC.len() + NONCE_LEN, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(state.tenants(), &bad).unwrap();
            let err = open(&state).unwrap_err().to_string();
            assert!(err.contains("cannot be decrypted"), "{err}");
            assert!(!err.contains("CANARY"), "{err}");
        }
        // Truncated, and not ours at all.
        for bad in [&good[..20], b"{\"version\": 1}".as_slice()] {
            std::fs::write(state.tenants(), bad).unwrap();
            assert!(matches!(
                open(&state),
                Err(TenantStoreError::Undecryptable { .. })
            ));
        }
        std::fs::write(state.tenants(), &good).unwrap();

        // Another key: refused, and the store is left as it was.
        let key = std::fs::read(state.tenants_key()).unwrap();
        std::fs::write(state.tenants_key(), hex::encode([7u8; 32])).unwrap();
        assert!(matches!(
            open(&state),
            Err(TenantStoreError::Undecryptable { .. })
        ));
        assert_eq!(std::fs::read(state.tenants()).unwrap(), good);

        // No key: refused, and no new key is made (it would orphan the store).
        std::fs::remove_file(state.tenants_key()).unwrap();
        let err = open(&state).unwrap_err();
        assert!(matches!(err, TenantStoreError::KeyMissing { .. }), "{err}");
        assert!(!state.tenants_key().exists());

        // A key file that holds no key.
        std::fs::write(state.tenants_key(), "short").unwrap();
        assert!(matches!(open(&state), Err(TenantStoreError::BadKey(_))));

        // The right key again (raw bytes work as well as hex): everything is back.
        std::fs::write(state.tenants_key(), &key).unwrap();
        let store = open(&state).unwrap();
        assert!(store.get("t1").is_some());
    }

    #[test]
    fn a_plaintext_store_of_an_earlier_version_is_encrypted_and_removed() {
        let (_dir, state) = state();
        let old = serde_json::json!({"version": 1, "tenants": {"old": {"app_id": "app", "auth": {"oauth": {"access_token": "CANARY-3"}}}}});
        std::fs::write(state.tenants_plaintext(), old.to_string()).unwrap();
        let store = open(&state).unwrap();
        assert!(!state.tenants_plaintext().exists());
        assert!(store.get("old").is_some());
        let disk = std::fs::read(state.tenants()).unwrap();
        assert!(!String::from_utf8_lossy(&disk).contains("CANARY-3"));
        drop(store);
        assert!(open(&state).unwrap().get("old").is_some());
    }

    #[cfg(unix)]
    #[test]
    fn the_key_and_the_store_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, state) = state();
        open(&state).unwrap().put("t1", tenant("x")).unwrap();
        for path in [state.tenants(), state.tenants_key()] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
}
