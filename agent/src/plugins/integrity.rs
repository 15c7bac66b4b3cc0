//! Plugin integrity: who may have written a plugin file, and whether its bytes are the ones the
//! admin approved.
//!
//! - **Permissions** (like sshd's StrictModes): the file and every folder above it must be owned
//!   by root or the agent's user and not writable by group or others; otherwise anyone in that
//!   group could swap the connector for their own code. Sticky folders such as `/tmp` are
//!   accepted (others cannot rename what they do not own there). `plugins.strict_permissions =
//!   false` turns this off for development.
//! - **Allow-list** (`plugins.lock_file`): lines of `<sha256> [name]`; a file whose digest is not
//!   listed is rejected.
//! - **Signatures** (`plugins.signing_keys`): every plugin needs `<file>.sig` beside it, an
//!   ed25519 signature by one of the keys over the file's 32-byte SHA-256 digest (64 bytes, raw
//!   or hex). The digest is the one computed while copying the file into the private store, so
//!   the bytes verified are the bytes loaded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Checks that `path` (after symlinks) and every folder above it, and above the link itself,
/// can only be written by root or this process's user.
#[cfg(unix)]
pub fn check_permissions(path: &Path) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve the file: {e}"))?;
    check_one(&real, me, false)?;
    let mut seen = HashSet::new();
    let parents = [
        real.parent().map(Path::to_path_buf),
        path.parent().and_then(|p| std::fs::canonicalize(p).ok()),
    ];
    for start in parents.into_iter().flatten() {
        for dir in start.ancestors() {
            if seen.insert(dir.to_path_buf()) {
                check_one(dir, me, true)?;
            }
        }
    }
    Ok(())
}

/// On Windows, who may write a file is an ACL question; the plugins folder under
/// `%ProgramData%` is created by the installer for SYSTEM and Administrators only. Reading ACLs
/// is not implemented: the check accepts, and says so once at start.
#[cfg(windows)]
pub fn check_permissions(path: &Path) -> Result<(), String> {
    let _ = path;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!("plugins.strict_permissions: folder ACLs are not checked on Windows; keep the plugins folder writable by Administrators only");
    });
    Ok(())
}

#[cfg(unix)]
fn check_one(path: &Path, me: u32, is_dir: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (uid, mode) = (meta.uid(), meta.mode());
    let fix = "(or set plugins.strict_permissions = false for development)";
    if uid != 0 && uid != me {
        return Err(format!(
            "{} is owned by uid {uid}, not root or the agent's user (uid {me}): that user could replace the connector; chown it {fix}",
            path.display()
        ));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(is_dir && sticky) {
        let who = if mode & 0o002 != 0 { "world" } else { "group" };
        return Err(format!(
            "{} is {who}-writable (mode {:o}): others could replace the connector; run `chmod go-w {}` {fix}",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// Reads an allow-list: `<sha256> [name]` per line (`sha256sum` output, `*name` included);
/// `#` comments and blank lines ignored; a byte-order mark (a Windows editor's) and CRLF line
/// ends are taken as they are meant.
pub fn read_lock_file(path: &Path) -> Result<HashSet<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the allow-list {}: {e}", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut digests = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let digest = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{} line {}: expected a sha256 digest (64 hex characters)",
                path.display(),
                n + 1
            ));
        }
        digests.insert(digest);
    }
    Ok(digests)
}

/// The allow-list at `path` as an admin checking the install is told of it: the file and how
/// many digests it approves, or why it cannot be used (then every plugin is rejected).
pub fn describe_allow_list(path: &Path) -> Result<String, String> {
    match read_lock_file(path) {
        Ok(digests) => Ok(format!("{} ({} digest(s))", path.display(), digests.len())),
        Err(e) => Err(format!("{e}; until it is fixed every plugin is rejected")),
    }
}

/// A signature file holds 64 bytes, raw or as hex with blanks around: anything longer than
/// this is not one (and is not read further).
const MAX_SIGNATURE_FILE: u64 = 1024;

/// What a loaded version passed of the trust checks. Kept with it so that a reload can judge it
/// again under the checks as they are then, without loading it again: its file may hold other
/// bytes by now (the version is retained behind a rejected replacement), or none.
#[derive(Debug, Clone, Default)]
pub struct TrustEvidence {
    /// Its file's permissions were checked (`plugins.strict_permissions` was on).
    pub permissions_checked: bool,
    /// The signature it was verified with (`plugins.signing_keys` were set).
    pub signature: Option<[u8; 64]>,
}

/// The trust checks as configured at one moment, the allow-list read once.
#[derive(Debug)]
pub struct TrustPolicy {
    strict_permissions: bool,
    /// The allow-list file, and its digests or why it cannot be read (then every file is
    /// refused: the admin meant to restrict them).
    allow_list: Option<(PathBuf, Result<HashSet<String>, String>)>,
    signing_keys: Vec<[u8; 32]>,
}

impl TrustPolicy {
    /// The checks `plugins` configures; reads the allow-list.
    pub fn of(plugins: &crate::config::PluginsConfig) -> Self {
        Self {
            strict_permissions: plugins.strict_permissions,
            allow_list: plugins
                .lock_file
                .as_ref()
                .map(|path| (path.clone(), read_lock_file(path))),
            signing_keys: plugins.signing_keys.clone(),
        }
    }

    /// Whether files' permissions are checked.
    pub fn strict_permissions(&self) -> bool {
        self.strict_permissions
    }

    /// Whether the allow-list approves the bytes whose digest is `sha256_hex`.
    pub fn check_digest(&self, sha256_hex: &str) -> Result<(), String> {
        match &self.allow_list {
            None => Ok(()),
            Some((_, Ok(allowed))) if allowed.contains(sha256_hex) => Ok(()),
            Some((path, Ok(_))) => Err(format!(
                "sha256 {sha256_hex} is not in the allow-list {}: add it to approve this file",
                path.display()
            )),
            Some((_, Err(reason))) => Err(reason.clone()),
        }
    }

    /// Checks `<plugin>.sig` against the signing keys for the file whose digest is
    /// `sha256_hex`; the signature that matched, or `None` when no keys are set.
    pub fn check_signature(
        &self,
        plugin: &Path,
        sha256_hex: &str,
    ) -> Result<Option<[u8; 64]>, String> {
        if self.signing_keys.is_empty() {
            return Ok(None);
        }
        let sig_path = signature_path(plugin);
        let signature = read_signature(&sig_path)?;
        if self.verifies(&signature, sha256_hex) {
            Ok(Some(signature))
        } else {
            Err(format!(
                "the signature {} does not match this file for any of plugins.signing_keys",
                sig_path.display()
            ))
        }
    }

    /// Why these checks refuse a version that passed `evidence` when it was loaded from bytes
    /// whose digest is `sha256_hex`; `None` when they accept it.
    pub fn refuses(&self, sha256_hex: Option<&str>, evidence: &TrustEvidence) -> Option<String> {
        if self.strict_permissions && !evidence.permissions_checked {
            return Some(
                "plugins.strict_permissions is on, and its file's permissions were not checked when it was loaded".to_string(),
            );
        }
        let Some(sha256_hex) = sha256_hex else {
            return (self.allow_list.is_some() || !self.signing_keys.is_empty())
                .then(|| "its digest is unknown".to_string());
        };
        if let Err(reason) = self.check_digest(sha256_hex) {
            return Some(reason);
        }
        let signed = evidence
            .signature
            .is_some_and(|signature| self.verifies(&signature, sha256_hex));
        if !self.signing_keys.is_empty() && !signed {
            return Some(
                "it was not loaded with a signature that matches any of plugins.signing_keys now"
                    .to_string(),
            );
        }
        None
    }

    /// Whether one of the keys signed the digest `sha256_hex` with `signature`.
    fn verifies(&self, signature: &[u8; 64], sha256_hex: &str) -> bool {
        let Ok(digest) = hex::decode(sha256_hex) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.signing_keys.iter().any(|key| {
            ed25519_dalek::VerifyingKey::from_bytes(key)
                .is_ok_and(|key| key.verify_strict(&digest, &signature).is_ok())
        })
    }
}

/// Reads the signature file `sig_path`: 64 bytes, raw or hex.
fn read_signature(sig_path: &Path) -> Result<[u8; 64], String> {
    use std::io::Read as _;
    // Opened as a regular file only (a FIFO there would hold up the load), and read no
    // further than a signature can be long.
    let mut raw = Vec::new();
    let opened = crate::platform::open_regular_file(sig_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "no signature {}: plugins.signing_keys requires every plugin to be signed",
                sig_path.display()
            )
        } else {
            format!("cannot read the signature {}: {e}", sig_path.display())
        }
    })?;
    opened
        .take(MAX_SIGNATURE_FILE)
        .read_to_end(&mut raw)
        .map_err(|e| format!("cannot read the signature {}: {e}", sig_path.display()))?;
    let bytes: Vec<u8> = if raw.len() == 64 {
        raw
    } else {
        hex::decode(String::from_utf8_lossy(&raw).trim()).unwrap_or_default()
    };
    bytes.try_into().map_err(|_| {
        format!(
            "{} is not a signature (64 bytes, raw or hex)",
            sig_path.display()
        )
    })
}

/// Where a plugin's signature lives.
pub fn signature_path(plugin: &Path) -> std::path::PathBuf {
    let mut name = plugin.file_name().unwrap_or_default().to_os_string();
    name.push(".sig");
    plugin.with_file_name(name)
}

// Permission checks are Unix semantics; the Windows build has none to test.
#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writable_files_and_folders_are_refused_sticky_folders_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plugin");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The temp folder lives under /tmp, which is sticky: accepted.
        check_permissions(&file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check_permissions(&file)
            .unwrap_err()
            .contains("group-writable"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_permissions(&file)
            .unwrap_err()
            .contains("world-writable"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_permissions(&file).unwrap();
    }

    /// A loaded version is judged again by what it passed: its digest against the allow-list
    /// as it is now, its signature against the keys as they are now, and whether its file's
    /// permissions were checked at all.
    #[test]
    fn a_policy_judges_a_loaded_version_by_its_evidence() {
        use ed25519_dalek::Signer;
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("plugins.lock");
        let (digest, other) = ("a".repeat(64), "b".repeat(64));
        std::fs::write(&lock, format!("{digest}\n")).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let signature = key.sign(&hex::decode(&digest).unwrap()).to_bytes();
        let signed = TrustEvidence {
            permissions_checked: true,
            signature: Some(signature),
        };
        let policy = |strict: bool, lock: Option<&Path>, keys: Vec<[u8; 32]>| TrustPolicy {
            strict_permissions: strict,
            allow_list: lock.map(|path| (path.to_path_buf(), read_lock_file(path))),
            signing_keys: keys,
        };

        let everything = policy(true, Some(&lock), vec![key.verifying_key().to_bytes()]);
        assert_eq!(everything.refuses(Some(&digest), &signed), None);
        let unchecked = TrustEvidence::default();
        assert!(everything
            .refuses(Some(&digest), &unchecked)
            .unwrap()
            .contains("strict_permissions"));
        assert!(everything
            .refuses(Some(&other), &signed)
            .unwrap()
            .contains("not in the allow-list"));
        // Another key trusted instead: the signature kept no longer matches.
        let other_key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let rotated = policy(false, None, vec![other_key.verifying_key().to_bytes()]);
        assert!(rotated
            .refuses(Some(&digest), &signed)
            .unwrap()
            .contains("signing_keys"));
        // An allow-list that cannot be read refuses everything, and says why.
        std::fs::write(&lock, "not a digest\n").unwrap();
        let broken = policy(false, Some(&lock), Vec::new());
        assert!(broken
            .refuses(Some(&digest), &signed)
            .unwrap()
            .contains("line 1"));
        // Nothing configured: nothing refused.
        assert_eq!(
            policy(false, None, Vec::new()).refuses(Some(&other), &unchecked),
            None
        );
    }

    #[test]
    fn lock_files_are_parsed_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("plugins.lock");
        let digest = "a".repeat(64);
        std::fs::write(&lock, format!("# approved\n{digest}  connector\n\n")).unwrap();
        assert!(read_lock_file(&lock).unwrap().contains(&digest));
        std::fs::write(&lock, "not-a-digest x\n").unwrap();
        assert!(read_lock_file(&lock).unwrap_err().contains("line 1"));
        // As a Windows editor saves it (a byte-order mark, CRLF), and `sha256sum -b`'s `*name`.
        let other = "B".repeat(64);
        std::fs::write(
            &lock,
            format!("\u{feff}# approved\r\n{digest} *connector\r\n{other}\r\n"),
        )
        .unwrap();
        let digests = read_lock_file(&lock).unwrap();
        assert!(digests.contains(&digest) && digests.contains(&"b".repeat(64)));
        // A mark anywhere else is not skipped.
        std::fs::write(&lock, format!("{digest}\n\u{feff}{other}\n")).unwrap();
        assert!(read_lock_file(&lock).unwrap_err().contains("line 2"));
    }
}
