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

/// Marks a folder as completely unpacked. It holds the folder's [`Manifest`] (or nothing, in
/// a folder unpacked by an earlier build of the agent: such a folder is trusted as it is).
const COMPLETE_MARKER: &str = ".lumos-complete";
/// The longest name of an entry's path, and the longest path: what file systems take
/// (Linux's 255-byte names and 4096-byte paths, less room for the state folder's own path).
const MAX_NAME_BYTES: usize = 255;
const MAX_PATH_BYTES: usize = 4000;
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
    /// An entry under a symlink an earlier entry made (`link -> /etc`, then `link/passwd`):
    /// never written through.
    #[error(
        "entry {path:?} lies under the bundle's symlink {link:?}: refusing to write through a link"
    )]
    ThroughLink {
        /// The entry.
        path: String,
        /// The link on its way.
        link: String,
    },
    /// A symlink pointing outside the bundle.
    #[error("symlink {path:?} points outside the bundle ({target:?}): refusing to unpack")]
    EscapingLink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A symlink that leads nowhere: a loop, or a path through a file.
    #[error("symlink {path:?} ({target:?}) cannot be followed ({detail}): refusing to unpack")]
    UnresolvableLink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
        /// The system's words.
        detail: String,
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
    let mut damaged = false;
    if dest.join(COMPLETE_MARKER).is_file() {
        match Manifest::check(&dest) {
            Ok(()) => return finish(dest, false),
            Err(what) => {
                // A damaged disk, or a hand in the state folder: running it would fail in ways
                // that blame the bundle. The archive is whole (its digest named the folder).
                tracing::warn!(folder = %dest.display(), "the unpacked copy of {} was damaged ({what}); it is unpacked again", archive.file_name().unwrap_or_default().to_string_lossy());
                damaged = true;
            }
        }
    }
    let tmp = super::private_name(bundles_dir, UNPACK_PREFIX)?;
    fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let result = match format {
        BundleFormat::TarGz => unpack_tar_gz(archive, &tmp, limits),
        BundleFormat::Zip => unpack_zip(archive, &tmp, limits),
    }
    .and_then(|links| check_links_resolve_inside(&tmp, &links))
    .and_then(|()| read_metadata(&tmp).map(|_| ()))
    .and_then(|()| Ok(Manifest::record(&tmp)?));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if damaged {
        // Another load of the same bytes may have replaced it meanwhile: keep theirs.
        if Manifest::check(&dest).is_ok() {
            let _ = fs::remove_dir_all(&tmp);
            return finish(dest, true);
        }
        // Moved aside, not removed in place: the new folder takes its name at once, and
        // calls running from the old one keep the files they have open.
        let aside = super::private_name(bundles_dir, DAMAGED_PREFIX)?;
        if fs::rename(&dest, &aside).is_ok() {
            if let Err(e) = fs::remove_dir_all(&aside) {
                tracing::warn!(folder = %aside.display(), error = %e, "cannot remove a damaged unpacked copy");
            }
        }
    }
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_dir_all(&tmp);
        // Another scan unpacked the same bytes first: theirs is complete, use it.
        if !dest.join(COMPLETE_MARKER).is_file() {
            return Err(e.into());
        }
    }
    finish(dest, true)
}

/// The name of a folder being unpacked, before it is renamed to its digest.
pub const UNPACK_PREFIX: &str = ".unpack-";
/// The name of a damaged folder moved aside to be removed.
pub const DAMAGED_PREFIX: &str = ".damaged-";

/// What an unpacked folder held when it was made: each file's path and size, and each link
/// (`None`). A reused folder is checked against it, so that one damaged since (a file deleted
/// or cut short) is unpacked again instead of failing its calls. Files a connector adds at run
/// time are not in it and do not matter.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Manifest {
    entries: Vec<(String, Option<u64>)>,
}

impl Manifest {
    /// Lists `root` into its complete marker.
    fn record(root: &Path) -> std::io::Result<()> {
        let mut entries = Vec::new();
        let mut folders = vec![PathBuf::new()];
        while let Some(folder) = folders.pop() {
            for entry in fs::read_dir(root.join(&folder))? {
                let entry = entry?;
                let rel = folder.join(entry.file_name());
                let kind = entry.file_type()?;
                let size = if kind.is_dir() {
                    folders.push(rel);
                    continue;
                } else if kind.is_symlink() {
                    None
                } else {
                    Some(entry.metadata()?.len())
                };
                // Entry names come from the archive as text, so this holds; a name that is
                // not is left out (it cannot be checked, nor can it have been written).
                if let Some(text) = rel.to_str() {
                    entries.push((text.to_string(), size));
                }
            }
        }
        entries.sort();
        let text = serde_json::to_vec(&Manifest { entries }).map_err(std::io::Error::other)?;
        fs::write(root.join(COMPLETE_MARKER), text)
    }

    /// Whether `root` still holds what its marker lists; if not, what is wrong, for the log.
    fn check(root: &Path) -> Result<(), String> {
        let text = fs::read(root.join(COMPLETE_MARKER))
            .map_err(|e| format!("its record of its files cannot be read: {e}"))?;
        if text.is_empty() {
            return Ok(());
        }
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|_| "its record of its files is unreadable".to_string())?;
        let intact = |(path, size): &(String, Option<u64>)| {
            fs::symlink_metadata(root.join(path)).is_ok_and(|meta| match size {
                Some(size) => meta.is_file() && meta.len() == *size,
                None => meta.file_type().is_symlink(),
            })
        };
        let mut damaged = manifest.entries.iter().filter(|e| !intact(e));
        match damaged.next() {
            None => Ok(()),
            Some((first, _)) => Err(format!(
                "{} of its {} files missing or changed, {first} first",
                1 + damaged.count(),
                manifest.entries.len()
            )),
        }
    }
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

/// An entry's name as a message shows it: cut after 200 characters, as a hostile archive's
/// name (a GNU long-name record) can be megabytes long, and the message goes to the log and the
/// inventory.
fn shown(raw: &str) -> String {
    let cut = super::truncate(raw, 200);
    if cut.len() < raw.len() {
        format!("{cut}…")
    } else {
        cut.to_string()
    }
}

/// Turns an archive path into a relative path of normal components, or refuses it.
fn safe_relative(raw: &str) -> Result<PathBuf, BundleError> {
    let unsafe_path = || BundleError::UnsafePath { path: shown(raw) };
    if raw.contains('\0') || raw.contains('\\') && cfg!(windows) {
        return Err(unsafe_path());
    }
    // Longer than file systems allow: the archive's fault, which the state folder's trouble
    // (ENAMETOOLONG from the file system) must not be taken for.
    let too_long = || BundleError::UnsupportedEntry {
        path: shown(raw),
        kind: "name longer than file systems allow (255 bytes a name, 4000 a path)",
    };
    if raw.len() > MAX_PATH_BYTES {
        return Err(too_long());
    }
    let mut out = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) if part.len() > MAX_NAME_BYTES => return Err(too_long()),
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_path())
            }
        }
    }
    Ok(out)
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
    fn copy(
        &mut self,
        reader: &mut dyn Read,
        root: &Path,
        rel: &Path,
        mode: u32,
    ) -> Result<(), BundleError> {
        let dest = &root.join(rel);
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
                        path: rel.display().to_string(),
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

/// Creates the folders of `rel` under `root`, one at a time, for the archive's entry `entry`. A
/// link on the way is refused (never write through one), and so is a file where a folder must
/// be: that is the archive's fault (`a` a file, then `a/b`), which the state folder's trouble
/// must not be taken for.
fn make_dirs(root: &Path, rel: &Path, entry: &str) -> Result<(), BundleError> {
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_symlink() => {
                return Err(BundleError::ThroughLink {
                    path: entry.to_string(),
                    link: at.strip_prefix(root).unwrap_or(&at).display().to_string(),
                })
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(BundleError::UnsupportedEntry {
                    path: at.strip_prefix(root).unwrap_or(&at).display().to_string(),
                    kind: "file that a later entry uses as a folder",
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o755).create(&at)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
            make_dirs(root, &rel, &raw)?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            if let Some(parent) = rel.parent() {
                make_dirs(root, parent, &raw)?;
            }
            let mode = file_mode(entry.header().mode().unwrap_or(0o644));
            budget.copy(&mut entry, root, &rel, mode)?;
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
            make_dirs(root, &rel, &raw)?;
        } else if entry.is_symlink() {
            // The target is the entry's data: a read error is a broken archive, and a target
            // that is not UTF-8 is taken as the tar path takes one (lossily), not as the
            // state folder's trouble.
            let mut target = Vec::new();
            entry
                .by_ref()
                .take(4096)
                .read_to_end(&mut target)
                .map_err(|e| BundleError::Corrupt {
                    format: "zip",
                    detail: e.to_string(),
                })?;
            add_symlink(root, &rel, &raw, &String::from_utf8_lossy(&target))?;
            links.push(rel);
        } else {
            if let Some(parent) = rel.parent() {
                make_dirs(root, parent, &raw)?;
            }
            let mode = file_mode(entry.unix_mode().unwrap_or(0o644));
            budget.copy(&mut entry, root, &rel, mode)?;
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
        make_dirs(root, parent, raw)?;
    }
    let path = root.join(rel);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            return Err(BundleError::UnsupportedEntry {
                path: raw.to_string(),
                kind: "link over a folder of the same name",
            })
        }
        // Tar semantics, as for files: a later entry for the same path wins.
        Ok(_) => fs::remove_file(&path)?,
        Err(_) => {}
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
            Ok(_) => {
                return Err(BundleError::EscapingLink {
                    path: rel.display().to_string(),
                    target,
                })
            }
            // A dangling link is left: it leads to nothing to read, and the agent follows no
            // link of a bundle (its `main` and `metadata.toml` must be regular files).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // A loop (`a -> b`, `b -> a`), or a link through a file.
            Err(e) => {
                return Err(BundleError::UnresolvableLink {
                    path: rel.display().to_string(),
                    target,
                    detail: e.to_string(),
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
        // A name of any length is named in a message of bounded length.
        for huge in ["x".repeat(1 << 20), format!("../{}", "y".repeat(1 << 20))] {
            let message = safe_relative(&huge).unwrap_err().to_string();
            assert!(message.len() < 400, "{} bytes", message.len());
            assert!(message.contains(&format!("{}…", &huge[..200])), "{message}");
        }
    }

    /// Generated archives (unix: they are full of symlinks, which Windows makes only with a
    /// privilege).
    #[cfg(unix)]
    mod generated {
        use super::*;

        /// One entry of a generated archive, named and aimed by pieces that include `..`, `.`,
        /// empty ones and a leading `/`.
        #[derive(Debug, Clone)]
        enum Entry {
            File(String, Vec<u8>),
            Dir(String),
            Symlink(String, String),
            HardLink(String, String),
        }

        const LONG_NAME: &str = concat!(
            "long-name-0123456789012345678901234567890123456789012345678901234567890123456789",
            "0123456789012345678901234567890123456789012345678901234567890123456789012345678",
            "0123456789012345678901234567890123456789012345678901234567890123456789012345678",
            "0123456789012345678901234567890123456789"
        );

        fn path_piece() -> impl proptest::strategy::Strategy<Value = String> {
            use proptest::prelude::*;
            // Mostly plain names, relative: most archives then get past their first entries, and
            // links that each stay inside but lead out together (`a -> .`, `b -> a/..`), then an
            // entry written through them, are what must be caught.
            let part = prop_oneof![
                8 => prop::sample::select(vec!["a", "b", "c", "main", "metadata.toml", "outside"]),
                1 => Just(".."),
                1 => Just("."),
                1 => Just(""),
                // Longer than a file name may be (255 bytes on Linux and Windows file systems).
                1 => Just(LONG_NAME),
            ];
            let absolute = prop::bool::weighted(0.05);
            (absolute, prop::collection::vec(part, 1..4)).prop_map(|(absolute, parts)| {
                format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"))
            })
        }

        /// Link targets: any piece, but mostly links to `.` and to a sibling's parent, which
        /// each stay inside and together lead out (`a -> .`, `b -> a/..`, `c -> b/..`).
        fn link_target() -> impl proptest::strategy::Strategy<Value = String> {
            use proptest::prelude::*;
            prop_oneof![
                1 => path_piece(),
                2 => prop::sample::select(vec![".", "a/..", "b/..", "c/..", "a", "b", "c"])
                    .prop_map(str::to_string),
            ]
        }

        /// An entry among the names `a`, `b` and `c`: a link (mostly to `.` or a sibling's
        /// parent), or a file or folder under one of them.
        fn chained_entry() -> impl proptest::strategy::Strategy<Value = Entry> {
            use proptest::prelude::*;
            let name = || prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string);
            let under = prop::sample::select(vec![
                "a/x",
                "b/x",
                "c/x",
                "c/outside",
                "b/outside/main",
                "a/b/x",
                "c/main",
            ])
            .prop_map(str::to_string);
            prop_oneof![
                3 => (name(), link_target()).prop_map(|(name, to)| Entry::Symlink(name, to)),
                2 => under.clone().prop_map(|name| Entry::File(name, b"x".to_vec())),
                1 => under.prop_map(Entry::Dir),
            ]
        }

        fn entry() -> impl proptest::strategy::Strategy<Value = Entry> {
            use proptest::prelude::*;
            prop_oneof![
                3 => (path_piece(), prop::collection::vec(any::<u8>(), 0..8))
                    .prop_map(|(name, data)| Entry::File(name, data)),
                2 => path_piece().prop_map(Entry::Dir),
                3 => (path_piece(), link_target()).prop_map(|(name, to)| Entry::Symlink(name, to)),
                1 => (path_piece(), path_piece()).prop_map(|(name, to)| Entry::HardLink(name, to)),
            ]
        }

        /// A tar.gz of `entries`, names written raw (as a hostile archive would, past the tar
        /// crate's own checks).
        fn tar_gz(path: &Path, entries: &[Entry]) {
            let file = fs::File::create(path).unwrap();
            let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ));
            for entry in entries {
                let mut header = tar::Header::new_gnu();
                let (name, data, link): (&str, &[u8], Option<&str>) = match entry {
                    Entry::File(name, data) => {
                        header.set_entry_type(tar::EntryType::Regular);
                        (name, data, None)
                    }
                    Entry::Dir(name) => {
                        header.set_entry_type(tar::EntryType::Directory);
                        (name, &[], None)
                    }
                    Entry::Symlink(name, to) => {
                        header.set_entry_type(tar::EntryType::Symlink);
                        (name, &[], Some(to))
                    }
                    Entry::HardLink(name, to) => {
                        header.set_entry_type(tar::EntryType::Link);
                        (name, &[], Some(to))
                    }
                };
                header.set_size(data.len() as u64);
                header.set_mode(0o755);
                // A name or target over 100 bytes goes before the entry in a GNU long-name record,
                // as GNU tar writes it.
                for (long, kind) in [
                    (Some(name), tar::EntryType::GNULongName),
                    (link, tar::EntryType::GNULongLink),
                ] {
                    if let Some(long) = long.filter(|l| l.len() > 100) {
                        let mut record = tar::Header::new_gnu();
                        record.set_entry_type(kind);
                        record.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
                        record.set_size(long.len() as u64 + 1);
                        record.set_cksum();
                        builder
                            .append(&record, [long.as_bytes(), b"\0"].concat().as_slice())
                            .unwrap();
                    }
                }
                let gnu = header.as_gnu_mut().unwrap();
                let cut = |text: &str| text.as_bytes()[..text.len().min(100)].to_vec();
                gnu.name = [0; 100];
                gnu.name[..cut(name).len()].copy_from_slice(&cut(name));
                if let Some(to) = link {
                    gnu.linkname = [0; 100];
                    gnu.linkname[..cut(to).len()].copy_from_slice(&cut(to));
                }
                header.set_cksum();
                builder.append(&header, data).unwrap();
            }
            builder.into_inner().unwrap().finish().unwrap();
        }

        /// A zip of `entries` (zip has no hard links: those are left out).
        fn zip(path: &Path, entries: &[Entry]) {
            use zip::write::SimpleFileOptions;
            let mut writer = zip::ZipWriter::new(fs::File::create(path).unwrap());
            let options = SimpleFileOptions::default().unix_permissions(0o755);
            for entry in entries {
                // The zip crate refuses some names (a repeated one, for instance): such an entry
                // is just not in the archive.
                let _ = match entry {
                    Entry::File(name, data) => writer
                        .start_file(name.as_str(), options)
                        .and_then(|()| Ok(writer.write_all(data)?)),
                    Entry::Dir(name) => writer.add_directory(name.as_str(), options),
                    Entry::Symlink(name, to) => {
                        writer.add_symlink(name.as_str(), to.as_str(), options)
                    }
                    Entry::HardLink(..) => Ok(()),
                };
            }
            writer.finish().unwrap();
        }

        /// Every path under `dir` with what it is: a file's bytes, a link's target, or a folder.
        fn listing(dir: &Path) -> Vec<(PathBuf, String)> {
            let mut out = Vec::new();
            let mut todo = vec![dir.to_path_buf()];
            while let Some(next) = todo.pop() {
                for item in fs::read_dir(&next).unwrap() {
                    let path = item.unwrap().path();
                    let meta = fs::symlink_metadata(&path).unwrap();
                    let what = if meta.is_symlink() {
                        format!("link to {}", fs::read_link(&path).unwrap().display())
                    } else if meta.is_dir() {
                        todo.push(path.clone());
                        "folder".into()
                    } else {
                        format!("{:?}", fs::read(&path).unwrap())
                    };
                    out.push((path, what));
                }
            }
            out.sort();
            out
        }

        /// Unpacks an archive of `entries` (and, with `with_metadata`, a `metadata.toml` and a
        /// `main` first) and checks that nothing outside the bundles folder changed, that no
        /// half-unpacked folder is left, and that an accepted bundle holds no link that leads
        /// out. (A complete folder that a later check refused is collected as garbage, like any
        /// unused copy.)
        fn unpack_changes_nothing_outside(
            entries: Vec<Entry>,
            with_metadata: bool,
            is_zip: bool,
        ) -> Result<(), proptest::test_runner::TestCaseError> {
            let scratch = tempfile::tempdir().unwrap();
            let root = scratch.path().to_path_buf();
            // `state/bundles/<hash>` is where the bundle goes; `outside` and `state/outside`
            // are what a hostile entry would aim at.
            let bundles = root.join("state/bundles");
            fs::create_dir_all(&bundles).unwrap();
            fs::create_dir_all(root.join("outside")).unwrap();
            fs::write(root.join("outside/main"), b"keep").unwrap();
            fs::write(root.join("state/outside"), b"keep").unwrap();
            let mut entries = entries;
            if with_metadata {
                entries.insert(0, Entry::File("main".into(), b"#!/bin/sh\n".to_vec()));
                entries.insert(
                    0,
                    Entry::File(
                        "metadata.toml".into(),
                        b"[connector]\napp_id = \"x\"\nversion = \"1\"\n".to_vec(),
                    ),
                );
            }
            let (archive, format) = if is_zip {
                (root.join("x-1.zip"), BundleFormat::Zip)
            } else {
                (root.join("x-1.tar.gz"), BundleFormat::TarGz)
            };
            if is_zip {
                zip(&archive, &entries)
            } else {
                tar_gz(&archive, &entries)
            }
            let before: Vec<_> = listing(&root)
                .into_iter()
                .filter(|(path, _)| !path.starts_with(&bundles))
                .collect();
            let limits = BundleLimits {
                max_bytes: 1 << 20,
                max_entries: 100,
            };
            let outcome = unpack(&archive, format, &"ab".repeat(32), &bundles, limits);
            let after: Vec<_> = listing(&root)
                .into_iter()
                .filter(|(path, _)| !path.starts_with(&bundles))
                .collect();
            let in_bundles = listing(&bundles);
            proptest::prop_assert_eq!(before, after, "outcome: {:?}", outcome);
            for folder in fs::read_dir(&bundles).unwrap() {
                let folder = folder.unwrap().path();
                proptest::prop_assert!(
                    folder.join(COMPLETE_MARKER).is_file(),
                    "{} is left half-unpacked ({:?})",
                    folder.display(),
                    outcome
                );
            }
            match outcome {
                // The disk is healthy here: a refusal is the archive's fault, never taken for
                // the state folder's (which would have the file tried again at every scan).
                Err(BundleError::Io(e)) => {
                    proptest::prop_assert!(false, "taken for the state folder's trouble: {e}")
                }
                Err(_) => {}
                Ok(bundle) => {
                    let real = fs::canonicalize(&bundle.dir).ok();
                    for (path, what) in &in_bundles {
                        if let (Ok(to), Some(real)) = (fs::canonicalize(path), &real) {
                            proptest::prop_assert!(
                                to.starts_with(real),
                                "{} ({what}) leads to {}",
                                path.display(),
                                to.display()
                            );
                        }
                    }
                }
            }
            Ok(())
        }

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

            /// Whatever a bundle holds, unpacking it writes nothing outside the bundles folder
            /// and leaves nothing half-unpacked.
            #[test]
            fn no_archive_writes_outside_its_folder_or_leaves_a_half_unpacked_one(
                entries in proptest::collection::vec(entry(), 0..12),
                with_metadata in proptest::prelude::any::<bool>(),
                is_zip in proptest::prelude::any::<bool>(),
            ) {
                unpack_changes_nothing_outside(entries, with_metadata, is_zip)?;
            }

            /// The same in a small world of names, where links that each stay inside but lead
            /// out together (`a -> .`, `b -> a/..`, `c -> b/..`) come often, with entries
            /// written through them (`c/outside`).
            #[test]
            fn links_that_lead_out_together_are_never_written_through(
                entries in proptest::collection::vec(chained_entry(), 0..8),
                is_zip in proptest::prelude::any::<bool>(),
            ) {
                unpack_changes_nothing_outside(entries, true, is_zip)?;
            }
        }
    }

    /// What a generated folder holds: files by relative path (pieces from a small alphabet, up
    /// to three deep) with their sizes.
    fn folder(
    ) -> impl proptest::strategy::Strategy<Value = std::collections::BTreeMap<String, usize>> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec!["a", "b", "lib", "main", "x.so"]);
        let path = prop::collection::vec(piece, 1..4).prop_map(|pieces| pieces.join("/"));
        prop::collection::btree_map(path, 0usize..64, 1..10).prop_map(|files| {
            // A path that is also a folder of another (`a` and `a/b`) cannot be both: keep the
            // deeper one.
            let names: Vec<String> = files.keys().cloned().collect();
            files
                .into_iter()
                .filter(|(path, _)| !names.iter().any(|n| n.starts_with(&format!("{path}/"))))
                .collect()
        })
    }

    /// How a folder is touched after its manifest was recorded.
    #[derive(Debug, Clone)]
    enum Touch {
        Delete(proptest::sample::Index),
        Resize(proptest::sample::Index, usize),
        Rewrite(proptest::sample::Index),
        AddFile,
    }

    fn touch() -> impl proptest::strategy::Strategy<Value = Touch> {
        use proptest::prelude::*;
        prop_oneof![
            any::<prop::sample::Index>().prop_map(Touch::Delete),
            (any::<prop::sample::Index>(), 1usize..64).prop_map(|(i, by)| Touch::Resize(i, by)),
            any::<prop::sample::Index>().prop_map(Touch::Rewrite),
            Just(Touch::AddFile),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// A recorded folder checks as intact however it is left with its files whole (one
        /// added, one rewritten with other bytes of the same size), and as damaged, naming the
        /// file, when one is deleted or changes size.
        #[test]
        fn the_manifest_finds_a_file_deleted_or_resized_and_nothing_else(
            files in folder(),
            touch in touch(),
        ) {
            use proptest::prelude::*;
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for (path, size) in &files {
                let file = root.join(path);
                fs::create_dir_all(file.parent().unwrap()).unwrap();
                fs::write(&file, vec![b'x'; *size]).unwrap();
            }
            Manifest::record(root).unwrap();
            prop_assert_eq!(Manifest::check(root), Ok(()));
            let paths: Vec<&String> = files.keys().collect();
            let damaged = match touch {
                Touch::Delete(i) => {
                    let path = i.get(&paths);
                    fs::remove_file(root.join(path)).unwrap();
                    Some(path)
                }
                Touch::Resize(i, by) => {
                    let path = i.get(&paths);
                    let size = files[*path];
                    let new = if size >= by { size - by } else { size + by };
                    fs::write(root.join(path), vec![b'x'; new]).unwrap();
                    Some(path)
                }
                Touch::Rewrite(i) => {
                    let path = i.get(&paths);
                    fs::write(root.join(path), vec![b'y'; files[*path]]).unwrap();
                    None
                }
                Touch::AddFile => {
                    fs::write(root.join("added-at-run-time.log"), b"log").unwrap();
                    None
                }
            };
            match damaged {
                None => prop_assert_eq!(Manifest::check(root), Ok(())),
                Some(path) => {
                    // (Windows records its own separators.)
                    let what = Manifest::check(root).unwrap_err().replace('\\', "/");
                    let expected = format!(
                        "1 of its {} files missing or changed, {path} first",
                        files.len()
                    );
                    prop_assert_eq!(what, expected);
                }
            }
        }
    }

    #[test]
    fn a_folder_unpacked_before_manifests_is_trusted_and_a_garbled_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(COMPLETE_MARKER), b"").unwrap();
        assert_eq!(Manifest::check(dir.path()), Ok(()));
        fs::write(dir.path().join(COMPLETE_MARKER), b"{\"entries\": [").unwrap();
        assert!(Manifest::check(dir.path())
            .unwrap_err()
            .contains("unreadable"));
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
