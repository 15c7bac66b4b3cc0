//! Unpacks Lumos connector bundles (`connector compile-on-prem` output: a PyInstaller folder
//! `main` + `_internal/` plus `metadata.toml`) into a private, content-addressed folder.
//!
//! Archives are hostile input. Every entry is checked before anything is written: no absolute
//! paths, no `..`, no device files or hard links, no writing through a symlink, symlinks that
//! resolve inside the bundle only, and caps on total size and entry count (archive bombs).
//! Unpacking goes to a temporary folder that is renamed into place only when complete, so a
//! crash never leaves a half-unpacked bundle that looks ready.

use crate::platform::{self, DirBuilderExt, OpenOptionsExt};
use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// Marks a folder as completely unpacked; holds nothing.
const COMPLETE_MARKER: &str = ".lumos-complete";
/// Largest `metadata.toml` read.
const MAX_METADATA_BYTES: u64 = 64 * 1024;

/// Archive formats a bundle may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// `.tar.gz` / `.tgz` (Linux and macOS bundles).
    TarGz,
    /// `.zip` (Windows bundles).
    Zip,
}

impl BundleFormat {
    /// The format a file name implies, if any.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            Some(Self::TarGz)
        } else if lower.ends_with(".zip") {
            Some(Self::Zip)
        } else {
            None
        }
    }
}

/// Caps on what one bundle may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    /// Total bytes of all files.
    pub max_bytes: u64,
    /// Number of entries.
    pub max_entries: u64,
}

/// A bundle ready to run.
#[derive(Debug, Clone)]
pub struct UnpackedBundle {
    /// The private folder it lives in.
    pub dir: PathBuf,
    /// `[connector] app_id` from `metadata.toml`.
    pub app_id: String,
    /// `[connector] version` from `metadata.toml`.
    pub version: String,
    /// The executable to call (`main`, or `main.exe` on Windows).
    pub program: PathBuf,
    /// Whether this call unpacked it (false: reused from an earlier start).
    pub freshly_unpacked: bool,
}

/// Why a bundle was rejected. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a readable archive of its format (also: a file still being copied).
    #[error("not a valid {format} archive ({detail}); if it is still being copied, it is retried when it changes")]
    Corrupt {
        /// `tar.gz` or `zip`.
        format: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// An entry's path leaves the bundle.
    #[error(
        "entry {path:?} escapes the bundle folder (absolute path or `..`): refusing to unpack"
    )]
    UnsafePath {
        /// The entry as written in the archive.
        path: String,
    },
    /// A symlink pointing outside the bundle.
    #[error("symlink {path:?} points outside the bundle ({target:?}): refusing to unpack")]
    EscapingLink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// An entry of a type bundles never contain.
    #[error("entry {path:?} is a {kind}, which bundles may not contain")]
    UnsupportedEntry {
        /// The entry.
        path: String,
        /// hard link, device, fifo…
        kind: &'static str,
    },
    /// Over the size or entry caps.
    #[error("bundle unpacks to more than {limit} {what} (plugins.max_bundle_{what}); raise the limit if this bundle is trusted")]
    TooLarge {
        /// `bytes` or `entries`.
        what: &'static str,
        /// The cap.
        limit: u64,
    },
    /// `metadata.toml` missing or wrong.
    #[error("{0}; a bundle made by `connector compile-on-prem` has metadata.toml with [connector] app_id and version")]
    BadMetadata(String),
    /// No `main` executable (`main.exe` on Windows); `other_system` is set when the bundle
    /// holds the other system's program instead: compile-on-prem builds for the system it
    /// runs on.
    #[error("bundle has no `{name}` executable at its top level{}", other_system.unwrap_or_default())]
    NoProgram {
        name: &'static str,
        other_system: Option<&'static str>,
    },
    /// Disk trouble in the state folder.
    #[error("cannot unpack into the state folder: {0}")]
    Io(#[from] std::io::Error),
}

/// Unpacks `archive` (whose content hash is `sha256`) under `bundles_dir`, or reuses an earlier
/// complete unpack of the same bytes.
pub fn unpack(
    archive: &Path,
    format: BundleFormat,
    sha256: &str,
    bundles_dir: &Path,
    limits: BundleLimits,
) -> Result<UnpackedBundle, BundleError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(bundles_dir)?;
    // Content-addressed: the same bytes always land in the same folder, and a replaced file
    // with new bytes never overwrites a folder that running calls use.
    let dest = bundles_dir.join(&sha256[..32.min(sha256.len())]);
    if dest.join(COMPLETE_MARKER).is_file() {
        return finish(dest, false);
    }
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = bundles_dir.join(format!(".unpack-{}", hex::encode(suffix)));
    fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let result = match format {
        BundleFormat::TarGz => unpack_tar_gz(archive, &tmp, limits),
        BundleFormat::Zip => unpack_zip(archive, &tmp, limits),
    }
    .and_then(|links| check_links_resolve_inside(&tmp, &links))
    .and_then(|()| read_metadata(&tmp).map(|_| ()));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::File::create(tmp.join(COMPLETE_MARKER))?;
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_dir_all(&tmp);
        // Another scan unpacked the same bytes first: theirs is complete, use it.
        if !dest.join(COMPLETE_MARKER).is_file() {
            return Err(e.into());
        }
    }
    finish(dest, true)
}

/// A bundle's program as compile-on-prem names it on Unix, and on Windows.
const UNIX_PROGRAM: &str = "main";
const WINDOWS_PROGRAM: &str = "main.exe";

fn finish(dir: PathBuf, freshly_unpacked: bool) -> Result<UnpackedBundle, BundleError> {
    let (app_id, version) = read_metadata(&dir)?;
    let (name, other_name, other_system) = if cfg!(windows) {
        (
            WINDOWS_PROGRAM,
            UNIX_PROGRAM,
            "; it holds `main`, so it was built on Linux or macOS: run `connector \
             compile-on-prem` on Windows for a bundle this agent can run (a .zip)",
        )
    } else {
        (
            UNIX_PROGRAM,
            WINDOWS_PROGRAM,
            "; it holds `main.exe`, so it was built on Windows: run `connector compile-on-prem` \
             on Linux for a bundle this agent can run (a .tar.gz)",
        )
    };
    let file_meta = |path: &Path| {
        fs::symlink_metadata(path)
            .ok()
            .filter(|meta| meta.is_file())
    };
    let program = dir.join(name);
    let Some(meta) = file_meta(&program) else {
        return Err(BundleError::NoProgram {
            name,
            other_system: file_meta(&dir.join(other_name)).map(|_| other_system),
        });
    };
    // `main` is the bundle's program by definition, so it is made executable whatever the
    // archive said: a zip made on Windows, or repacked by a tool that drops Unix modes,
    // records none, and its `main` failed with "Permission denied". Also on a folder unpacked
    // by an earlier version. (No modes on Windows: `mode_of` is `None`.)
    if let Some(mode) = platform::mode_of(&meta).filter(|mode| mode & 0o100 == 0) {
        platform::set_mode(&program, (mode | 0o100) & 0o7777)?;
    }
    Ok(UnpackedBundle {
        dir,
        app_id,
        version,
        program,
        freshly_unpacked,
    })
}

fn read_metadata(dir: &Path) -> Result<(String, String), BundleError> {
    let path = dir.join("metadata.toml");
    let meta = fs::symlink_metadata(&path).map_err(|_| {
        BundleError::BadMetadata("no metadata.toml at the top level of the bundle".into())
    })?;
    if !meta.is_file() || meta.len() > MAX_METADATA_BYTES {
        return Err(BundleError::BadMetadata(
            "metadata.toml is not a small regular file".into(),
        ));
    }
    let text = fs::read_to_string(&path)
        .map_err(|e| BundleError::BadMetadata(format!("cannot read metadata.toml: {e}")))?;
    let doc: toml::Table = text
        .parse()
        .map_err(|e| BundleError::BadMetadata(format!("metadata.toml is not TOML: {e}")))?;
    let section = doc
        .get("connector")
        .and_then(toml::Value::as_table)
        .ok_or_else(|| BundleError::BadMetadata("metadata.toml has no [connector] table".into()))?;
    let field = |key: &str| {
        section
            .get(key)
            .and_then(toml::Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                BundleError::BadMetadata(format!("metadata.toml has no [connector] {key}"))
            })
    };
    let app_id = field("app_id")?;
    super::info::check_app_id(&app_id)
        .map_err(|e| BundleError::BadMetadata(format!("metadata.toml: {e}")))?;
    Ok((app_id, field("version")?))
}

/// Turns an archive path into a relative path of normal components, or refuses it.
fn safe_relative(raw: &str) -> Result<PathBuf, BundleError> {
    let unsafe_path = || BundleError::UnsafePath {
        path: raw.to_string(),
    };
    if raw.contains('\0') || raw.contains('\\') && cfg!(windows) {
        return Err(unsafe_path());
    }
    let mut out = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_path())
            }
        }
    }
    Ok(out)
}

/// Refuses to write through a symlink created by an earlier entry (`link -> /etc`, then
/// `link/passwd`).
fn check_no_symlink_parents(root: &Path, rel: &Path) -> Result<(), BundleError> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            cur.push(part);
            if let Ok(meta) = fs::symlink_metadata(&cur) {
                if meta.file_type().is_symlink() {
                    return Err(BundleError::UnsafePath {
                        path: rel.display().to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Tracks the caps while entries are written.
struct Budget {
    format: &'static str,
    limits: BundleLimits,
    bytes: u64,
    entries: u64,
}

impl Budget {
    fn entry(&mut self) -> Result<(), BundleError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(BundleError::TooLarge {
                what: "entries",
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Copies at most the remaining budget; more is an error, whatever the header claimed.
    /// Read errors mean a broken archive (often one still being copied); write errors are ours.
    fn copy(&mut self, reader: &mut dyn Read, dest: &Path, mode: u32) -> Result<(), BundleError> {
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(dest)
        };
        let mut file = match create() {
            Ok(file) => file,
            // Tar semantics: a later entry for the same path wins, and compile-on-prem bundles
            // list every entry twice. Replace a file or a link (never write through it).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if fs::symlink_metadata(dest)?.is_dir() {
                    return Err(BundleError::UnsupportedEntry {
                        path: dest.display().to_string(),
                        kind: "file over a folder of the same name",
                    });
                }
                fs::remove_file(dest)?;
                create()?
            }
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(BundleError::Corrupt {
                        format: self.format,
                        detail: e.to_string(),
                    })
                }
            };
            self.bytes += n as u64;
            if self.bytes > self.limits.max_bytes {
                return Err(BundleError::TooLarge {
                    what: "bytes",
                    limit: self.limits.max_bytes,
                });
            }
            file.write_all(&buf[..n])?;
        }
        file.flush()?;
        Ok(())
    }
}

fn make_dirs(root: &Path, rel: &Path) -> Result<(), BundleError> {
    check_no_symlink_parents(root, &rel.join("x"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(root.join(rel))?;
    Ok(())
}

/// Executable bits are kept; setuid/setgid/sticky and group/other write are dropped.
fn file_mode(archive_mode: u32) -> u32 {
    (archive_mode & 0o755) | 0o600
}

fn unpack_tar_gz(
    archive: &Path,
    root: &Path,
    limits: BundleLimits,
) -> Result<Vec<PathBuf>, BundleError> {
    let corrupt = |e: std::io::Error| BundleError::Corrupt {
        format: "tar.gz",
        detail: e.to_string(),
    };
    let file = fs::File::open(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut budget = Budget {
        format: "tar.gz",
        limits,
        bytes: 0,
        entries: 0,
    };
    let mut links = Vec::new();
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        budget.entry()?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = safe_relative(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            make_dirs(root, &rel)?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            if let Some(parent) = rel.parent() {
                make_dirs(root, parent)?;
            }
            check_no_symlink_parents(root, &rel)?;
            let mode = file_mode(entry.header().mode().unwrap_or(0o644));
            budget.copy(&mut entry, &root.join(&rel), mode)?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(corrupt)?
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            add_symlink(root, &rel, &raw, &target)?;
            links.push(rel);
        } else if kind.is_hard_link() {
            return Err(BundleError::UnsupportedEntry {
                path: raw,
                kind: "hard link",
            });
        } else if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            // Metadata records; the tar crate applies them to the next entry.
        } else {
            return Err(BundleError::UnsupportedEntry {
                path: raw,
                kind: "device, fifo or unknown entry",
            });
        }
    }
    Ok(links)
}

fn unpack_zip(
    archive: &Path,
    root: &Path,
    limits: BundleLimits,
) -> Result<Vec<PathBuf>, BundleError> {
    let corrupt = |e: zip::result::ZipError| BundleError::Corrupt {
        format: "zip",
        detail: e.to_string(),
    };
    let file = fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(corrupt)?;
    let mut budget = Budget {
        format: "zip",
        limits,
        bytes: 0,
        entries: 0,
    };
    let mut links = Vec::new();
    for index in 0..zip.len() {
        budget.entry()?;
        let mut entry = zip.by_index(index).map_err(corrupt)?;
        let raw = entry.name().to_string();
        let rel = safe_relative(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        if entry.is_dir() {
            make_dirs(root, &rel)?;
        } else if entry.is_symlink() {
            let mut target = String::new();
            entry.by_ref().take(4096).read_to_string(&mut target)?;
            add_symlink(root, &rel, &raw, &target)?;
            links.push(rel);
        } else {
            if let Some(parent) = rel.parent() {
                make_dirs(root, parent)?;
            }
            check_no_symlink_parents(root, &rel)?;
            let mode = file_mode(entry.unix_mode().unwrap_or(0o644));
            budget.copy(&mut entry, &root.join(&rel), mode)?;
        }
    }
    Ok(links)
}

fn add_symlink(root: &Path, rel: &Path, raw: &str, target: &str) -> Result<(), BundleError> {
    let escaping = || BundleError::EscapingLink {
        path: raw.to_string(),
        target: target.to_string(),
    };
    if target.is_empty() || Path::new(target).is_absolute() {
        return Err(escaping());
    }
    // Lexical check: the target, taken from the link's folder, stays inside.
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for component in Path::new(target).components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(escaping()),
        }
        if depth < 0 {
            return Err(escaping());
        }
    }
    if let Some(parent) = rel.parent() {
        make_dirs(root, parent)?;
    }
    check_no_symlink_parents(root, rel)?;
    let path = root.join(rel);
    if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(&path)?;
    }
    crate::platform::symlink(Path::new(target), &path)?;
    Ok(())
}

/// Links that are lexically inside can still escape in combination (`a -> .`, `b -> a/..`);
/// once everything is on disk, resolve each one for real.
fn check_links_resolve_inside(root: &Path, links: &[PathBuf]) -> Result<(), BundleError> {
    let real_root = fs::canonicalize(root)?;
    for rel in links {
        let link = root.join(rel);
        let target = fs::read_link(&link)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        match fs::canonicalize(&link) {
            Ok(real) if real.starts_with(&real_root) => {}
            // Dangling inside the bundle is harmless; a loop or escape is not.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => {
                return Err(BundleError::EscapingLink {
                    path: rel.display().to_string(),
                    target,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_checked() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert_eq!(safe_relative("./a/b").unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn format_from_name() {
        assert_eq!(
            BundleFormat::from_file_name("x-1.0.0.tar.gz"),
            Some(BundleFormat::TarGz)
        );
        assert_eq!(
            BundleFormat::from_file_name("x-1.0.0.ZIP"),
            Some(BundleFormat::Zip)
        );
        assert_eq!(BundleFormat::from_file_name("x.so"), None);
    }
}
