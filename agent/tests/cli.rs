//! The `lumos-agent` binary as an admin uses it: the README's `--dev` run, `check-config`,
//! `connectors`, `tenants`, `call`, exit codes and SIGTERM.
// Signals, process trees and the --dev examples (.so files) are the Linux binary's; the
// Windows build is type-checked in CI.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

const AGENT: &str = env!("CARGO_BIN_EXE_lumos-agent");

fn agent(cwd: &Path, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .current_dir(cwd)
        .env_remove("LUMOS_AGENT_CONFIG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The example connector, built beside this binary by `cargo test --workspace`.
fn example_built() -> PathBuf {
    let path = Path::new(AGENT)
        .parent()
        .unwrap()
        .join("lumos-example-connector");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --workspace`",
        path.display()
    );
    path
}

#[test]
fn check_config_reports_every_error_with_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "plugins_dir = 3\n[calls]\ntimeout_secs = \"later\"\nmax_concurrency = -1\n[api]\nlisten = \"everywhere\"\n").unwrap();
    let out = agent(
        dir.path(),
        &["--config", file.to_str().unwrap(), "check-config"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    for key in [
        "`plugins_dir`",
        "`calls.timeout_secs`",
        "`calls.max_concurrency`",
        "`api.listen`",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert!(
        stderr.contains(file.to_str().unwrap()),
        "the file is named:\n{stderr}"
    );

    let out = agent(dir.path(), &["--dev", "check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("config OK"));
}

#[test]
fn cli_without_a_running_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("admin.token"), "x\n").unwrap();
    let out = agent(
        dir.path(),
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "connectors",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot reach the agent"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn dev_run_serves_the_example_connector_to_the_cli() {
    example_built();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(AGENT)
        .args(["--dev", "--listen", &listen, "run"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cli = |args: &[&str]| {
        let mut full = vec!["--dev", "--listen", listen.as_str()];
        full.extend_from_slice(args);
        agent(dir.path(), &full)
    };
    wait_for("the agent to answer `connectors`", || {
        cli(&["connectors"]).status.success()
    });
    let listing = text(&cli(&["connectors"]).stdout);
    for app in [
        "lumos_example ",
        "lumos_example_cdylib ",
        "lumos_example_c ",
    ] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(app))
            .unwrap_or_else(|| panic!("{app} missing:\n{listing}"));
        assert!(line.contains("ready"), "{line}");
    }

    // Secrets go in by stdin, never argv.
    let mut put = Command::new(AGENT)
        .args([
            "--dev",
            "--listen",
            &listen,
            "tenants",
            "put",
            "t1",
            "--app-id",
            "lumos_example",
            "--auth-file",
            "-",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .output_with_stdin(br#"{"oauth": {"access_token": "cli-token"}}"#);
    assert!(put.status.success(), "{}", text(&put.stderr));
    put.stdout.clear();

    let out = cli(&[
        "call",
        "lumos_example",
        "validate_credentials",
        "--tenant",
        "t1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = &hex::encode(sha2::Sha256::digest(b"cli-token"))[..16];
    assert_eq!(answer["response"]["unique_tenant_id"], *expected);

    // The native examples answer the same way, through their worker processes.
    for app in ["lumos_example_cdylib", "lumos_example_c"] {
        let tenant = format!("t-{app}");
        let put = Command::new(AGENT)
            .args([
                "--dev",
                "--listen",
                &listen,
                "tenants",
                "put",
                &tenant,
                "--app-id",
                app,
                "--auth-file",
                "-",
            ])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .output_with_stdin(br#"{"oauth": {"access_token": "cli-token"}}"#);
        assert!(put.status.success(), "{}", text(&put.stderr));
        let out = cli(&["call", app, "validate_credentials", "--tenant", &tenant]);
        assert_eq!(out.status.code(), Some(0), "{app}: {}", text(&out.stderr));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["response"]["unique_tenant_id"], *expected, "{app}");
    }

    let tenants = text(&cli(&["tenants", "list"]).stdout);
    assert!(
        tenants.contains("t1") && !tenants.contains("cli-token"),
        "{tenants}"
    );

    let out = cli(&["call", "lumos_example", "no_such_capability"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("agent.unsupported_capability"));

    // A token from another state folder is refused.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("admin.token"), "not-the-token\n").unwrap();
    let out = agent(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--state-dir",
            other.to_str().unwrap(),
            "connectors",
        ],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));

    // SIGTERM drains and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("loaded lumos_example"), "{log}");
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> Output;
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> Output {
        let mut child = self
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// The plugin workers whose parent is `parent`.
fn workers_of(parent: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("plugin-host") {
            found.push(pid);
        }
    }
    found
}

#[test]
fn killing_the_agent_leaves_no_worker_behind() {
    let library = Path::new(AGENT)
        .parent()
        .unwrap()
        .join("liblumos_example_c.so");
    assert!(
        library.is_file(),
        "{} is missing: run `cargo test --workspace`",
        library.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&library, plugins.join("liblumos_example_c.so")).unwrap();
    let mut child = Command::new(AGENT)
        .args([
            "--plugins-dir",
            plugins.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ])
        .args(["--listen", "127.0.0.1:0", "run"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut workers = Vec::new();
    wait_for("the agent to start a plugin worker", || {
        workers = workers_of(child.id());
        !workers.is_empty()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    for pid in workers {
        wait_for(&format!("worker {pid} to die with its agent"), || {
            !lumos_agent::exec::is_process_alive(pid)
        });
    }
}
