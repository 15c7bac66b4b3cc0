//! Loading the plugins folder: bundles and executables, good and hostile.
// Unix semantics under test (modes, symlinks, process groups, shell-script connectors): the
// Windows build is type-checked in CI, these scenarios run on Linux.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::io::Write;
use std::path::{Path, PathBuf};

use hyper::{Method, StatusCode};
use lumos_agent::app::Control;
use lumos_agent_integration::*;
use serde_json::{json, Value};

const METADATA: &str = "[connector]\napp_id = \"example_on_prem\"\nversion = \"0.1.0\"\n";

/// One entry of a hand-made archive; `Raw*` entries bypass the tar crate's own path checks, as
/// a hostile archive would.
enum Entry<'a> {
    File(&'a str, Vec<u8>, u32),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    RawFile(&'a str, Vec<u8>),
}

fn set_raw_name(header: &mut tar::Header, name: &str) {
    let gnu = header.as_gnu_mut().unwrap();
    gnu.name = [0; 100];
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
}

fn tar_gz(path: &Path, entries: Vec<Entry<'_>>) {
    let file = std::fs::File::create(path).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        match entry {
            Entry::File(name, data, mode) => {
                header.set_size(data.len() as u64);
                header.set_mode(mode);
                header.set_entry_type(tar::EntryType::Regular);
                builder
                    .append_data(&mut header, name, data.as_slice())
                    .unwrap();
            }
            Entry::Symlink(name, target) => {
                header.set_size(0);
                header.set_entry_type(tar::EntryType::Symlink);
                builder.append_link(&mut header, name, target).unwrap();
            }
            Entry::HardLink(name, target) => {
                header.set_size(0);
                header.set_entry_type(tar::EntryType::Link);
                builder.append_link(&mut header, name, target).unwrap();
            }
            Entry::RawFile(name, data) => {
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_entry_type(tar::EntryType::Regular);
                set_raw_name(&mut header, name);
                header.set_cksum();
                builder.append(&header, data.as_slice()).unwrap();
            }
        }
    }
    builder.into_inner().unwrap().finish().unwrap();
}

fn example_bytes() -> Vec<u8> {
    std::fs::read(example_connector()).unwrap()
}

/// A bundle shaped like `connector compile-on-prem` output, with the example connector as `main`.
fn good_bundle_entries() -> Vec<Entry<'static>> {
    vec![
        Entry::File("main", example_bytes(), 0o755),
        Entry::File("_internal/lib/data.txt", b"first copy".to_vec(), 0o644),
        Entry::Symlink("_internal/data-link", "lib/data.txt"),
        Entry::File("metadata.toml", METADATA.as_bytes().to_vec(), 0o644),
        // compile-on-prem lists every entry twice; the later one wins, as in tar(1).
        Entry::File("_internal/lib/data.txt", b"support file".to_vec(), 0o644),
        Entry::Symlink("_internal/data-link", "lib/data.txt"),
    ]
}

fn zip_bundle(path: &Path) {
    zip_bundle_with_program(path, "main", Some(0o755));
}

/// A zip bundle whose program is named `program` (`main.exe` in one made on Windows), with
/// `mode` as its Unix mode (`None`: what a zip made on Windows records, no mode at all).
fn zip_bundle_with_program(path: &Path, program: &str, mode: Option<u32>) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let exec = match mode {
        Some(mode) => zip::write::SimpleFileOptions::default().unix_permissions(mode),
        None => zip::write::SimpleFileOptions::default(),
    };
    let plain = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    zip.start_file(program, exec).unwrap();
    zip.write_all(&example_bytes()).unwrap();
    zip.start_file("metadata.toml", plain).unwrap();
    zip.write_all(b"[connector]\napp_id = \"example_zip\"\nversion = \"0.1.0\"\n")
        .unwrap();
    zip.finish().unwrap();
}

/// The tar.gz bundle of [`good_bundle_entries`] answers a call with a tenant's token.
async fn the_tar_gz_bundle_answers(agent: &TestAgent) {
    agent.put_tenant("t", json!({"app_id": "example_on_prem", "auth": {"oauth": {"access_token": "bundle-token"}}})).await;
    let (status, body) = agent
        .call(
            "example_on_prem",
            "validate_credentials",
            json!({"tenant_id": "t"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["response"]["unique_tenant_id"],
        token_hash("bundle-token")
    );
}

fn reason(entry: &Value) -> String {
    assert_eq!(entry["status"], "rejected", "{entry}");
    entry["reason"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_unpack_privately_and_answer() {
    let dirs = TestDirs::new();
    tar_gz(
        &dirs.plugins().join("example_on_prem-0.1.0.tar.gz"),
        good_bundle_entries(),
    );
    zip_bundle(&dirs.plugins().join("example_zip-0.1.0.zip"));
    let agent = TestAgent::start(&dirs, "").await;

    let entry = agent
        .connector_by_file("example_on_prem-0.1.0.tar.gz")
        .await;
    assert_eq!(entry["status"], "ready", "{entry}");
    assert_eq!(entry["kind"], "bundle");
    // The bundle is served under the app_id of its metadata.toml.
    assert_eq!(entry["app_id"], "example_on_prem");
    assert_eq!(entry["version"], "0.1.0");
    assert_eq!(entry["sha256"].as_str().unwrap().len(), 64);
    let zip_entry = agent.connector_by_file("example_zip-0.1.0.zip").await;
    assert_eq!(zip_entry["status"], "ready", "{zip_entry}");

    the_tar_gz_bundle_answers(&agent).await;
    let (status, body) = agent
        .call(
            "example_zip",
            "list_accounts",
            json!({"request": {"count": 2}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Unpacked under the state folder, content-addressed, private, executable kept.
    let sha = entry["sha256"].as_str().unwrap();
    let unpacked = dirs.state().join("bundles").join(&sha[..32]);
    assert!(unpacked.join("main").is_file());
    assert!(unpacked.join("_internal/lib/data.txt").is_file());
    assert_eq!(
        std::fs::read_to_string(unpacked.join("_internal/data-link")).unwrap(),
        "support file"
    );
    let marker_time = std::fs::metadata(unpacked.join(".lumos-complete"))
        .unwrap()
        .modified()
        .unwrap();
    agent.shutdown().await;

    // A restart reuses the unpacked folder instead of unpacking again.
    let agent = TestAgent::start(&dirs, "").await;
    assert_eq!(
        agent
            .connector_by_file("example_on_prem-0.1.0.tar.gz")
            .await["status"],
        "ready"
    );
    assert_eq!(
        std::fs::metadata(unpacked.join(".lumos-complete"))
            .unwrap()
            .modified()
            .unwrap(),
        marker_time
    );
    agent.shutdown().await;
}

/// `main` without an executable bit: a zip repacked by a tool that records no Unix modes (as
/// on Windows), and a tar.gz that says 0644. `main` is the program whatever the archive says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundles_main_runs_whatever_mode_the_archive_gives_it() {
    let dirs = TestDirs::new();
    let no_mode = dirs.root.path().join("no-mode.zip");
    zip_bundle_with_program(&no_mode, "main", None);
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&no_mode).unwrap()).unwrap();
    let mode = archive.by_name("main").unwrap().unix_mode();
    assert_eq!(
        mode.unwrap_or(0) & 0o111,
        0,
        "the archive does not make main executable"
    );
    std::fs::rename(&no_mode, dirs.plugins().join("example_zip-0.1.0.zip")).unwrap();
    let mut entries = good_bundle_entries();
    entries[0] = Entry::File("main", example_bytes(), 0o644);
    tar_gz(
        &dirs.plugins().join("example_on_prem-0.1.0.tar.gz"),
        entries,
    );
    let agent = TestAgent::start(&dirs, "").await;
    for (file, app_id) in [
        ("example_zip-0.1.0.zip", "example_zip"),
        ("example_on_prem-0.1.0.tar.gz", "example_on_prem"),
    ] {
        let entry = agent.connector_by_file(file).await;
        assert_eq!(entry["status"], "ready", "{entry}");
        let (status, body) = agent
            .call(app_id, "list_accounts", json!({"request": {"count": 1}}))
            .await;
        assert_eq!(status, StatusCode::OK, "{file}: {body}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_broken_bundles_are_rejected_with_reasons() {
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    let meta = || Entry::File("metadata.toml", METADATA.as_bytes().to_vec(), 0o644);
    let main = || Entry::File("main", b"#!/bin/sh\necho {}\n".to_vec(), 0o755);
    tar_gz(
        &p.join("dotdot-1.tar.gz"),
        vec![
            meta(),
            main(),
            Entry::RawFile("../../escaped.txt", b"x".to_vec()),
        ],
    );
    tar_gz(
        &p.join("absolute-1.tar.gz"),
        vec![
            meta(),
            main(),
            Entry::RawFile("/tmp/lumos-absolute-escape", b"x".to_vec()),
        ],
    );
    tar_gz(
        &p.join("link-1.tar.gz"),
        vec![meta(), main(), Entry::Symlink("out", "../../../etc")],
    );
    tar_gz(
        &p.join("abslink-1.tar.gz"),
        vec![meta(), main(), Entry::Symlink("out", "/etc")],
    );
    tar_gz(
        &p.join("linkcombo-1.tar.gz"),
        vec![
            meta(),
            main(),
            Entry::Symlink("a", "."),
            Entry::Symlink("b", "a/.."),
        ],
    );
    tar_gz(
        &p.join("through-1.tar.gz"),
        vec![
            meta(),
            main(),
            Entry::Symlink("d", "sub"),
            Entry::File("d/f", b"x".to_vec(), 0o644),
        ],
    );
    tar_gz(
        &p.join("hardlink-1.tar.gz"),
        vec![meta(), main(), Entry::HardLink("h", "main")],
    );
    // A file, then a path through it as if it were a folder: the archive's fault, not the
    // state folder's (which would be tried again at every scan).
    tar_gz(
        &p.join("conflict-1.tar.gz"),
        vec![
            meta(),
            main(),
            Entry::File("lib", b"x".to_vec(), 0o644),
            Entry::File("lib/mod.py", b"x".to_vec(), 0o644),
        ],
    );
    tar_gz(&p.join("nometa-1.tar.gz"), vec![main()]);
    tar_gz(
        &p.join("badmeta-1.tar.gz"),
        vec![
            main(),
            Entry::File(
                "metadata.toml",
                b"[connector]\nversion = \"1\"\n".to_vec(),
                0o644,
            ),
        ],
    );
    tar_gz(&p.join("nomain-1.tar.gz"), vec![meta()]);
    // A bundle made for another machine (compile-on-prem on an arm64 laptop, say).
    let mut foreign_main = example_bytes();
    let machine: u16 = if cfg!(target_arch = "aarch64") {
        0x3E
    } else {
        0xB7
    };
    foreign_main[18..20].copy_from_slice(&machine.to_le_bytes());
    tar_gz(
        &p.join("foreign-1.tar.gz"),
        vec![meta(), Entry::File("main", foreign_main, 0o755)],
    );
    std::fs::write(p.join("corrupt-1.tar.gz"), b"this is not gzip at all").unwrap();
    // A file caught half-copied: the first half of a good bundle.
    let good = dirs.root.path().join("good.tar.gz");
    tar_gz(&good, good_bundle_entries());
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(p.join("truncated-1.tar.gz"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(p.join("notzip-1.zip"), b"PK but not really").unwrap();
    // compile-on-prem run on Windows: a .zip whose program is `main.exe`.
    zip_bundle_with_program(&p.join("example_zip-0.1.0.zip"), "main.exe", Some(0o755));
    std::fs::copy(&good, p.join("example_on_prem-0.1.0.tar.gz")).unwrap();

    let agent = TestAgent::start(&dirs, "").await;
    let expect = [
        ("dotdot-1.tar.gz", "escapes the bundle"),
        ("absolute-1.tar.gz", "escapes the bundle"),
        ("link-1.tar.gz", "points outside"),
        ("abslink-1.tar.gz", "points outside"),
        ("linkcombo-1.tar.gz", "points outside"),
        (
            "through-1.tar.gz",
            "entry \"d/f\" lies under the bundle's symlink \"d\"",
        ),
        ("hardlink-1.tar.gz", "hard link"),
        (
            "conflict-1.tar.gz",
            "entry \"lib\" is a file that a later entry uses as a folder",
        ),
        ("nometa-1.tar.gz", "no metadata.toml"),
        ("badmeta-1.tar.gz", "no [connector] app_id"),
        ("nomain-1.tar.gz", "no `main` executable"),
        (
            "foreign-1.tar.gz",
            if cfg!(target_arch = "aarch64") {
                "its program main: built for x86_64, but this machine is aarch64"
            } else {
                "its program main: built for aarch64, but this machine is x86_64"
            },
        ),
        ("corrupt-1.tar.gz", "not a valid tar.gz"),
        ("truncated-1.tar.gz", "not a valid tar.gz"),
        ("notzip-1.zip", "not a valid zip"),
        (
            "example_zip-0.1.0.zip",
            "bundle has no `main` executable at its top level; it holds `main.exe`, so it was \
             built on Windows",
        ),
    ];
    for (file, needle) in expect {
        let entry = agent.connector_by_file(file).await;
        let why = reason(&entry);
        assert!(
            why.contains(needle),
            "{file}: {why:?} should mention {needle:?}"
        );
        assert_eq!(entry["kind"], "bundle");
    }
    // Nothing escaped, and no half-unpacked folder was left behind.
    assert!(
        !dirs.root.path().join("escaped.txt").exists()
            && !dirs
                .root
                .path()
                .parent()
                .unwrap()
                .join("escaped.txt")
                .exists()
    );
    assert!(!Path::new("/tmp/lumos-absolute-escape").exists());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dirs.state().join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".unpack")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The good bundle next to them is served.
    let (status, body) = agent
        .call(
            "example_on_prem",
            "list_accounts",
            json!({"request": {"count": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_bombs_hit_the_size_cap() {
    let dirs = TestDirs::new();
    tar_gz(
        &dirs.plugins().join("bomb-1.tar.gz"),
        vec![
            Entry::File("metadata.toml", METADATA.as_bytes().to_vec(), 0o644),
            Entry::File("_internal/zeros", vec![0u8; 3 << 20], 0o644),
            Entry::File("main", b"#!/bin/sh\n".to_vec(), 0o755),
        ],
    );
    let agent = TestAgent::start(&dirs, "[plugins]\nmax_bundle_bytes = 1048576\n").await;
    let why = reason(&agent.connector_by_file("bomb-1.tar.gz").await);
    assert!(why.contains("more than 1048576 bytes"), "{why}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugin_files_are_rejected_and_the_good_one_serves() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    install_plugin(&p, &example_connector(), "example");
    std::fs::write(p.join("plain-file"), b"not a program").unwrap();
    write_script(&p, "garbage-info", "#!/bin/sh\necho 'hello, not JSON'\n");
    write_script(
        &p,
        "failing-info",
        "#!/bin/sh\necho 'ImportError: no module named x' >&2\nexit 1\n",
    );
    write_script(&p, "hanging-info", "#!/bin/sh\nsleep 600\n");
    write_script(&p, "no-shebang", "echo hi\n");
    write_script(&p, "empty", "");
    // A script saved with Windows line endings, and one whose interpreter is not installed:
    // `execve` says "No such file or directory" of both.
    write_script(&p, "crlf-script", "#!/bin/sh\r\necho hi\r\n");
    write_script(
        &p,
        "no-interpreter",
        "#!/opt/no-such-venv/bin/python3\nprint(1)\n",
    );
    write_script(
        &p,
        "error-info",
        "#!/bin/sh\necho '{\"is_error\": true, \"error\": {\"message\": \"missing config\"}}'\n",
    );
    // A truncated ELF and one for another architecture (e_machine patched to aarch64).
    let elf = example_bytes();
    let truncated = p.join("truncated-elf");
    std::fs::write(&truncated, &elf[..4096]).unwrap();
    std::fs::set_permissions(&truncated, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut foreign = elf.clone();
    let machine: u16 = if cfg!(target_arch = "aarch64") {
        0x3E
    } else {
        0xB7
    };
    foreign[18..20].copy_from_slice(&machine.to_le_bytes());
    let foreign_path = p.join("foreign-arch");
    std::fs::write(&foreign_path, &foreign).unwrap();
    std::fs::set_permissions(&foreign_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    // One built against musl (as on Alpine): its program loader is not on this machine, and
    // `execve` would say "No such file or directory". Its loader's name patched in place.
    let glibc_loader = if cfg!(target_arch = "aarch64") {
        "/lib/ld-linux-aarch64.so.1"
    } else {
        "/lib64/ld-linux-x86-64.so.2"
    };
    // In a folder no machine has: a machine with musl installed has the real one.
    let musl_loader = format!("/no/ld-musl-{}.so.1", std::env::consts::ARCH);
    let mut musl = elf.clone();
    let at = musl
        .windows(glibc_loader.len() + 1)
        .position(|w| w == format!("{glibc_loader}\0").as_bytes())
        .expect("the example executable names the glibc loader");
    musl[at..at + glibc_loader.len()].fill(0);
    musl[at..at + musl_loader.len()].copy_from_slice(musl_loader.as_bytes());
    let musl_path = p.join("musl-build");
    std::fs::write(&musl_path, &musl).unwrap();
    std::fs::set_permissions(&musl_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(p.join("loop-b"), p.join("loop-a")).unwrap();
    std::os::unix::fs::symlink(p.join("loop-a"), p.join("loop-b")).unwrap();
    std::os::unix::fs::symlink(p.join("nowhere"), p.join("dangling")).unwrap();
    std::fs::create_dir(p.join("a-folder")).unwrap();
    std::fs::write(p.join("native.so"), b"\x7fELF").unwrap();
    // In-progress copies and hidden files are not connectors at all.
    std::fs::write(p.join("upload.part"), b"half").unwrap();
    std::fs::write(p.join(".hidden"), b"x").unwrap();

    let agent = TestAgent::start(&dirs, "[plugins]\ninfo_timeout_secs = 2\n").await;
    let musl_reason = format!(
        "needs the program loader {musl_loader}, which is not on this machine (the program was \
         built for a Linux with the musl C library, such as Alpine)"
    );
    let expect = [
        ("plain-file", "not executable"),
        ("garbage-info", "did not print a JSON document"),
        ("failing-info", "ImportError"),
        ("hanging-info", "no answer within"),
        (
            "no-shebang",
            "not a program for this machine (a script needs a #! line",
        ),
        ("crlf-script", "its #! line ends in a carriage return"),
        ("empty", "the file is empty"),
        (
            "no-interpreter",
            "its #! line names the interpreter /opt/no-such-venv/bin/python3, which is not on \
             this machine",
        ),
        ("error-info", "missing config"),
        (
            "foreign-arch",
            if cfg!(target_arch = "aarch64") {
                "built for x86_64, but this machine is aarch64"
            } else {
                "built for aarch64, but this machine is x86_64"
            },
        ),
        ("musl-build", musl_reason.as_str()),
        ("loop-a", "symlink loop"),
        ("dangling", "dangling symlink"),
        ("a-folder", "a folder, not a connector"),
        (
            "native.so",
            "cut short: the file is 4 bytes, too short for its own ELF header",
        ),
    ];
    for (file, needle) in expect {
        let why = reason(&agent.connector_by_file(file).await);
        assert!(
            why.contains(needle),
            "{file}: {why:?} should mention {needle:?}"
        );
    }
    // A truncated ELF is named from its headers, before it runs and dies of SIGSEGV.
    let why = reason(&agent.connector_by_file("truncated-elf").await);
    let describes = format!(
        "cut short: the file is 4096 bytes, but its ELF headers describe at least {} bytes",
        elf.len()
    );
    assert!(why.contains(&describes), "{why}");
    let files: Vec<String> = agent
        .connectors()
        .await
        .iter()
        .map(|c| c["path"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with("upload.part") || f.ends_with(".hidden")),
        "{files:?}"
    );

    let ready: Vec<Value> = agent
        .connectors()
        .await
        .into_iter()
        .filter(|c| c["status"] == "ready")
        .collect();
    assert_eq!(ready.len(), 1, "{ready:?}");
    let (status, body) = agent
        .call(
            "lumos_example",
            "list_accounts",
            json!({"request": {"count": 3}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.shutdown().await;
}

/// Files that are no connector and could hold the folder up: a FIFO (opening it waits for a
/// writer, and the scan waited for that load), a socket, a link to a device that never ends,
/// and a file over `plugins.max_file_bytes` (it would be copied into the state folder whole).
/// Each is rejected at once, named for what it is, and the connector beside them serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_sockets_devices_and_oversized_files_are_rejected_without_holding_up_the_folder() {
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    install_plugin(&p, &example_connector(), "example");
    nix::unistd::mkfifo(
        &p.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(p.join("socket")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", p.join("zeros")).unwrap();
    // Sparse: 300 MiB long, nothing written. (The limit leaves room for the example
    // connector's debug build.)
    std::fs::File::create(p.join("big.so"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let agent = TestAgent::start(&dirs, "[plugins]\nmax_file_bytes = 268435456\n").await;
    for (file, expected) in [
        ("fifo", "a named pipe (FIFO), not a connector file"),
        ("socket", "a socket, not a connector file"),
        ("zeros", "a device, not a connector file"),
        (
            "big.so",
            "the file is 314572800 bytes, over plugins.max_file_bytes (268435456)",
        ),
    ] {
        let entry = agent.connector_by_file(file).await;
        assert_eq!(entry["status"], "rejected", "{entry}");
        let why = reason(&entry);
        assert!(why.contains(expected), "{file}: {why}");
    }
    let (status, body) = agent
        .call(
            "lumos_example",
            "list_accounts",
            json!({"request": {"count": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_starts_when_every_plugin_is_bad() {
    let dirs = TestDirs::new();
    std::fs::write(dirs.plugins().join("junk"), b"junk").unwrap();
    write_script(&dirs.plugins(), "broken", "#!/bin/sh\nexit 7\n");
    let agent = TestAgent::start(&dirs, "").await;
    let (status, body) = agent.request(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["connectors_ready"], 0);
    assert_eq!(agent.connectors().await.len(), 2);
    let (status, body) = agent.call("broken", "x", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["error_code"], "agent.unknown_connector");
    agent.shutdown().await;
}

/// A stored copy damaged since it was made (cut short by a damaged disk, or a hand in the
/// state folder) is replaced from the plugins folder's file at the next load: it is neither
/// run nor blamed on the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_copy_is_replaced_at_the_next_load() {
    let dirs = TestDirs::new();
    let file = install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let agent = TestAgent::start(&dirs, "").await;
    assert_eq!(agent.connector_by_file("tester").await["status"], "ready");
    agent.shutdown().await;
    let copy = dirs
        .state()
        .join("store")
        .join(digest_of(&file))
        .join("tester");
    let whole = std::fs::metadata(&copy).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_len(whole / 2)
        .unwrap();

    let agent = TestAgent::start(&dirs, "").await;
    let row = agent.connector_by_file("tester").await;
    assert_eq!(row["status"], "ready", "{row}");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), whole);
    let (status, body) = agent.call("tester", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.shutdown().await;
}

/// An unpacked bundle damaged since it was unpacked (its program deleted, a support file cut
/// short) is unpacked again from the archive at the next load: it is neither run as it is nor
/// blamed on the archive, which is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_unpacked_bundle_is_unpacked_again() {
    captured_logs();
    let dirs = TestDirs::new();
    tar_gz(
        &dirs.plugins().join("example_on_prem-0.1.0.tar.gz"),
        good_bundle_entries(),
    );
    let agent = TestAgent::start(&dirs, "").await;
    let entry = agent
        .connector_by_file("example_on_prem-0.1.0.tar.gz")
        .await;
    assert_eq!(entry["status"], "ready", "{entry}");
    agent.shutdown().await;
    let sha = entry["sha256"].as_str().unwrap();
    let unpacked = dirs.state().join("bundles").join(&sha[..32]);
    std::fs::remove_file(unpacked.join("main")).unwrap();
    std::fs::write(unpacked.join("_internal/lib/data.txt"), b"sup").unwrap();

    let agent = TestAgent::start(&dirs, "").await;
    let entry = agent
        .connector_by_file("example_on_prem-0.1.0.tar.gz")
        .await;
    assert_eq!(entry["status"], "ready", "{entry}");
    assert!(unpacked.join("main").is_file());
    assert_eq!(
        std::fs::read_to_string(unpacked.join("_internal/data-link")).unwrap(),
        "support file"
    );
    assert!(
        captured_logs().contains("example_on_prem-0.1.0.tar.gz was damaged (2 of its 4 files missing or changed, _internal/lib/data.txt first); it is unpacked again"),
        "no warning of the damage"
    );
    the_tar_gz_bundle_answers(&agent).await;
    // Nothing is left beside it: the damaged copy was removed, not kept under another name.
    let names: Vec<String> = std::fs::read_dir(dirs.state().join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [sha[..32].to_string()]);
    agent.shutdown().await;
}

/// What a load cut short by a crash or a kill left in the state folder (a copy being written,
/// a bundle being unpacked, a damaged one being removed) is removed at the next start; nothing
/// else there is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_removes_what_loads_of_an_earlier_run_left_unfinished() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "tester");
    let agent = TestAgent::start(&dirs, "").await;
    assert_eq!(agent.connector_by_file("tester").await["status"], "ready");
    agent.shutdown().await;
    let (store, bundles) = (dirs.state().join("store"), dirs.state().join("bundles"));
    std::fs::create_dir_all(&bundles).unwrap();
    std::fs::write(store.join(".copy-0123456789abcdef"), b"half a copy").unwrap();
    for folder in [".unpack-0123456789abcdef", ".damaged-0123456789abcdef"] {
        std::fs::create_dir_all(bundles.join(folder).join("_internal")).unwrap();
        std::fs::write(bundles.join(folder).join("_internal/lib.so"), b"half").unwrap();
    }
    std::fs::write(bundles.join(".kept-by-someone"), b"not ours").unwrap();
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    let agent = TestAgent::start(&dirs, "").await;
    assert_eq!(listing(&store), [digest_of(&dirs.plugins().join("tester"))]);
    assert_eq!(listing(&bundles), [".kept-by-someone"]);
    assert!(captured_logs().lines().any(|line| line
        .contains("removed unfinished copies an earlier run left in the state folder")
        && line.ends_with("removed=3")));
    let (status, body) = agent.call("tester", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_highest_version_of_an_app_serves() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "multi@1.9.0");
    install_plugin(&dirs.plugins(), &test_connector(), "multi@1.10.0");
    install_plugin(&dirs.plugins(), &test_connector(), "multi@1.2.0");
    // The serving version again under another name (a copy an admin forgot): of equal
    // versions, the file whose name sorts last serves.
    versioned_connector(&dirs.plugins(), "multi-copy", "multi", "1.10.0");
    let agent = TestAgent::start(&dirs, "").await;
    let (status, body) = agent
        .request(Method::GET, "/v1/connectors/multi", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], "1.10.0");
    assert_eq!(body["info"]["app_id"], "multi");
    assert!(
        body["path"].as_str().unwrap().ends_with("/multi@1.10.0"),
        "{body}"
    );
    assert_eq!(body["reason"], Value::Null);
    // Each row that does not serve names the file that does, so the admin knows which to
    // remove.
    for (file, why) in [
        (
            "multi@1.9.0",
            "multi@1.10.0 serves a higher version, 1.10.0",
        ),
        (
            "multi@1.2.0",
            "multi@1.10.0 serves a higher version, 1.10.0",
        ),
        (
            "multi-copy",
            "the same version, 1.10.0, is also in multi@1.10.0, which serves: remove one of \
             the two files",
        ),
    ] {
        let row = agent.connector_by_file(file).await;
        assert_eq!(
            (&row["status"], &row["reason"]),
            (&json!("superseded"), &json!(why)),
            "{file}"
        );
    }
    agent.shutdown().await;
}

/// Reloads the agent and waits until the file `file` no longer serves `app_id` (asked for its
/// `capability`): its one row rejected for `why`, no version of it retained (a revocation).
async fn reload_and_see_it_stop(
    agent: &TestAgent,
    file: &str,
    (app_id, capability): (&str, &str),
    why: &str,
) {
    agent.control.send(Control::Reload).await.unwrap();
    eventually_ok(
        std::time::Duration::from_secs(20),
        &format!("{file} to stop serving"),
        || async {
            let (status, body) = agent.call(app_id, capability, json!({})).await;
            if body["error"]["error_code"] == "agent.unknown_connector" {
                Ok(())
            } else {
                Err((status, body))
            }
        },
    )
    .await;
    let rows = agent.entries_for_file(file).await;
    assert_eq!(rows.len(), 1, "no version of it is retained: {rows:?}");
    assert!(reason(&rows[0]).contains(why), "{rows:?}");
}

/// The configuration of an allow-list in the file `lock`.
fn allow_list(lock: &Path) -> String {
    format!("[plugins]\nlock_file = {:?}\n", lock.display().to_string())
}

fn digest_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_others_could_have_written_are_rejected_unless_strictness_is_off() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    install_plugin(&p, &test_connector(), "shared_group");
    std::fs::set_permissions(
        p.join("shared_group"),
        std::fs::Permissions::from_mode(0o775),
    )
    .unwrap();
    install_plugin(&p, &test_connector(), "fine");
    let agent = TestAgent::start(&dirs, "").await;
    let why = reason(&agent.connector_by_file("shared_group").await);
    assert!(
        why.contains("group-writable") && why.contains("chmod go-w"),
        "{why}"
    );
    assert_eq!(agent.connector_by_file("fine").await["status"], "ready");
    agent.shutdown().await;

    // A world-writable plugins folder (not sticky) puts every file in it at risk.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
    let agent = TestAgent::start(&dirs, "").await;
    let why = reason(&agent.connector_by_file("fine").await);
    assert!(why.contains("world-writable"), "{why}");
    agent.shutdown().await;

    // Development opt-out.
    let agent = TestAgent::start(&dirs, "[plugins]\nstrict_permissions = false\n").await;
    assert_eq!(agent.connector_by_file("fine").await["status"], "ready");
    assert_eq!(
        agent.connector_by_file("shared_group").await["status"],
        "ready"
    );
    // Turned on again by a reload, it checks the files already loaded: they are not left
    // running.
    TestAgent::write_config(&dirs, &p, "");
    reload_and_see_it_stop(
        &agent,
        "shared_group",
        ("shared_group", "echo"),
        "group-writable",
    )
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_files_in_the_allow_list_load() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "approved");
    install_plugin(&dirs.plugins(), &test_connector(), "unapproved");
    let lock = dirs.root.path().join("plugins.lock");
    std::fs::write(
        &lock,
        format!(
            "# approved by the admin\n{}  approved\n",
            digest_of(&example_connector())
        ),
    )
    .unwrap();
    let agent = TestAgent::start(&dirs, &allow_list(&lock)).await;
    assert_eq!(agent.connector_by_file("approved").await["status"], "ready");
    let why = reason(&agent.connector_by_file("unapproved").await);
    assert!(
        why.contains("not in the allow-list") && why.contains(&digest_of(&test_connector())),
        "{why}"
    );
    // Revoked: its digest taken out of the list, a reload stops serving it (the check of the
    // file loaded again must not leave the approved version running as a retained one).
    std::fs::write(&lock, "# nothing approved\n").unwrap();
    reload_and_see_it_stop(
        &agent,
        "approved",
        ("lumos_example", "list_accounts"),
        "not in the allow-list",
    )
    .await;
    agent.shutdown().await;
}

/// A reload judges every file again under the allow-list as it is then, by what each version
/// passed when it was loaded: a file approved since comes up, and so does one refused before
/// once the allow-list is no longer configured; a version still approved is not loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_loads_again_only_the_files_the_trust_checks_may_judge_otherwise() {
    captured_logs();
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    let approved = versioned_connector(&p, "judged_ok", "judged_ok", "1.0.0");
    let later = versioned_connector(&p, "judged_later", "judged_later", "1.0.0");
    let never = versioned_connector(&p, "judged_never", "judged_never", "1.0.0");
    // Written long ago: a reload loads them at once (one written less than the debounce ago
    // would wait for the scan after it).
    for file in [&approved, &later, &never] {
        set_mtime(
            file,
            std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
        );
    }
    let lock = dirs.root.path().join("plugins.lock");
    std::fs::write(&lock, format!("{}  judged_ok\n", digest_of(&approved))).unwrap();
    let with_lock = allow_list(&lock);
    let agent = TestAgent::start(&dirs, &with_lock).await;
    for file in ["judged_later", "judged_never"] {
        let why = reason(&agent.connector_by_file(file).await);
        assert!(why.contains("not in the allow-list"), "{file}: {why}");
    }
    let serving = || agent.registry.snapshot().resolve("judged_ok").unwrap();
    let original = serving();
    let refusals = || {
        captured_logs()
            .matches("rejected judged_never: sha256")
            .count()
    };
    assert_eq!(refusals(), 1);

    // One more approved. The same reload sets a call limit, which is put in force once its
    // scan is done: then the reload is over, and whatever it loaded again is in place.
    std::fs::write(
        &lock,
        format!(
            "{}  judged_ok\n{}  judged_later\n",
            digest_of(&approved),
            digest_of(&later)
        ),
    )
    .unwrap();
    TestAgent::write_config(
        &dirs,
        &p,
        &format!("{with_lock}[calls]\nmax_concurrency = 7\n"),
    );
    agent.control.send(Control::Reload).await.unwrap();
    let limits = |c: &lumos_agent::plugins::Connector| c.runnable.as_ref().unwrap().limits.max();
    eventually(
        std::time::Duration::from_secs(20),
        "the reload's call limit on the version loaded at start",
        || limits(&original) == 7,
    )
    .await;
    assert!(
        std::sync::Arc::ptr_eq(&serving(), &original),
        "a version still approved was loaded again"
    );
    let row = agent.connector_by_file("judged_later").await;
    assert_eq!(row["status"], "ready", "{row}");
    let (status, body) = agent.call("judged_later", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        reason(&agent.connector_by_file("judged_never").await).contains("not in the allow-list")
    );
    // Still unapproved, it was not copied and checked again.
    assert_eq!(refusals(), 1);

    // No allow-list any more: what it refused comes up.
    TestAgent::write_config(&dirs, &p, "[calls]\nmax_concurrency = 7\n");
    agent.control.send(Control::Reload).await.unwrap();
    eventually_ok(
        std::time::Duration::from_secs(20),
        "judged_never to come up",
        || async {
            let (status, body) = agent.call("judged_never", "echo", json!({})).await;
            if status == StatusCode::OK {
                Ok(())
            } else {
                Err((status, body))
            }
        },
    )
    .await;
    assert!(std::sync::Arc::ptr_eq(&serving(), &original));
    agent.shutdown().await;
}

/// A version kept serving behind a rejected replacement is revoked like one serving from its
/// file: by its own digest, though the file holds other bytes by now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_version_kept_behind_a_rejected_replacement() {
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    let kept = versioned_connector(&p, "kept", "kept", "1.0.0");
    let lock = dirs.root.path().join("plugins.lock");
    std::fs::write(&lock, format!("{}  kept\n", digest_of(&kept))).unwrap();
    let agent = TestAgent::start(&dirs, &allow_list(&lock)).await;
    // Replaced by bytes nobody approved: rejected, and 1.0.0 keeps serving beside them.
    versioned_connector(&p, "kept", "kept", "2.0.0");
    agent.until_rows("kept", 2).await;
    let (status, body) = agent.call("kept", "echo", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // 1.0.0's digest taken out of the list: the file did not change, yet it stops.
    std::fs::write(&lock, "# nothing approved\n").unwrap();
    reload_and_see_it_stop(&agent, "kept", ("kept", "echo"), "not in the allow-list").await;
    agent.shutdown().await;
}

/// A load that passed the allow-list before a reload revoked its digest (the reload joins it
/// rather than start it again) does not serve: it is judged again when it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_in_progress_when_its_digest_is_revoked_does_not_serve() {
    captured_logs();
    let dirs = TestDirs::new();
    let (started, release) = (
        dirs.root.path().join("started"),
        dirs.root.path().join("release"),
    );
    // Each run waits for the release, saying first that it started.
    let script = format!(
        "#!/bin/bash\ntouch '{}'\nwhile [ ! -e '{}' ]; do sleep 0.05; done\n\
         exec -a 'racing@1.0.0' '{}' \"$@\"\n",
        started.display(),
        release.display(),
        test_connector().display()
    );
    let scratch = tempfile::tempdir().unwrap();
    let digest = digest_of(&write_script(scratch.path(), "racing", &script));
    let lock = dirs.root.path().join("plugins.lock");
    std::fs::write(&lock, format!("{digest}  racing\n")).unwrap();
    let agent = TestAgent::start(&dirs, &allow_list(&lock)).await;
    write_script(&dirs.plugins(), "racing", &script);
    // Its digest checked, its `info` running.
    let wait = std::time::Duration::from_secs(20);
    eventually(wait, "the load's info to start", || started.exists()).await;
    std::fs::write(&lock, "# nothing approved\n").unwrap();
    agent.control.send(Control::Reload).await.unwrap();
    std::fs::write(&release, "").unwrap();
    eventually_ok(wait, "the load to be refused", || async {
        let rows = agent.entries_for_file("racing").await;
        if rows.iter().any(|row| row["status"] == "rejected") {
            Ok(())
        } else {
            Err(rows)
        }
    })
    .await;
    let rows = agent.entries_for_file("racing").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        reason(&rows[0]).contains("not in the allow-list"),
        "{rows:?}"
    );
    let (_, body) = agent.call("racing", "echo", json!({})).await;
    assert_eq!(
        body["error"]["error_code"], "agent.unknown_connector",
        "{body}"
    );
    assert!(captured_logs()
        .contains("rejected racing: racing 1.0.0 was loaded, but the trust checks refuse it now"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_signing_keys_only_validly_signed_files_load() {
    use ed25519_dalek::Signer;
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let sign = |key: &ed25519_dalek::SigningKey, file: &Path| {
        hex::encode(key.sign(&hex::decode(digest_of(file)).unwrap()).to_bytes())
    };

    install_plugin(&p, &test_connector(), "signed");
    std::fs::write(p.join("signed.sig"), sign(&key, &test_connector())).unwrap();
    install_plugin(&p, &test_connector(), "wrong_key");
    std::fs::write(p.join("wrong_key.sig"), sign(&other_key, &test_connector())).unwrap();
    install_plugin(&p, &test_connector(), "wrong_file");
    std::fs::write(p.join("wrong_file.sig"), sign(&key, &example_connector())).unwrap();
    install_plugin(&p, &test_connector(), "unsigned");

    let config = format!(
        "[plugins]\nsigning_keys = [{:?}]\n",
        hex::encode(key.verifying_key().to_bytes())
    );
    let agent = TestAgent::start(&dirs, &config).await;
    assert_eq!(agent.connector_by_file("signed").await["status"], "ready");
    for file in ["wrong_key", "wrong_file"] {
        let why = reason(&agent.connector_by_file(file).await);
        assert!(why.contains("does not match"), "{file}: {why}");
    }
    assert!(reason(&agent.connector_by_file("unsigned").await).contains("no signature"));
    // Signature files are not connectors themselves.
    assert!(agent
        .connectors()
        .await
        .iter()
        .all(|c| !c["path"].as_str().unwrap().ends_with(".sig")));
    // The key revoked (another one trusted instead), what it signed stops serving.
    TestAgent::write_config(
        &dirs,
        &p,
        &format!(
            "[plugins]\nsigning_keys = [{:?}]\n",
            hex::encode(other_key.verifying_key().to_bytes())
        ),
    );
    reload_and_see_it_stop(&agent, "signed", ("signed", "echo"), "does not match").await;
    agent.shutdown().await;
}
