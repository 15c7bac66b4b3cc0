//! The `lumos-agent` binary as an admin uses it: the README's `--dev` run, `check-config`,
//! `connectors`, `tenants`, `call`, exit codes and SIGTERM, and the group reaper on its own.
//! What the binary's helpers do when it is killed is in tests/native.rs (plugin workers) and
//! tests/tunnel.rs (the group reaper).
// Signals, process trees and the --dev examples (.so files) are the Linux binary's; the
// Windows build is type-checked in CI.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;
use support::{wait_for, SpawnKilledOnDrop as _};

mod support;

const AGENT: &str = env!("CARGO_BIN_EXE_lumos-agent");

fn agent(cwd: &Path, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .current_dir(cwd)
        .env_remove("LUMOS_AGENT_CONFIG")
        .output()
        .unwrap()
}

/// `lumos-agent run` on a state and a plugins folder of its own under `dir`, its API on
/// `listen`, its stdout discarded; the caller says where its log (stderr) goes.
fn agent_run(dir: &Path, listen: &str) -> Command {
    let mut command = Command::new(AGENT);
    command
        .args(["--state-dir", dir.join("state").to_str().unwrap()])
        .args(["--plugins-dir", dir.join("plugins").to_str().unwrap()])
        .args(["--listen", listen, "run"])
        .current_dir(dir)
        .env_remove("LUMOS_AGENT_CONFIG")
        .stdout(Stdio::null());
    command
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

/// The whole HTTP answer (status line, headers, body) of `GET path` on the API at `listen`;
/// `None` if it cannot be had.
fn http_get(listen: &str, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(listen).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).ok()?;
    Some(answer)
}

/// The bytes waiting unread in the receive queue of the loopback TCP connection whose local
/// port is `local` and remote port `remote` (`/proc/net/tcp`); `None` if there is no such
/// connection.
fn unread_bytes(local: u16, remote: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let (local, remote) = (format!(":{local:04X}"), format!(":{remote:04X}"));
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx_queue:rx_queue ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (queues, established) = (fields.get(4)?, fields.get(3)? == &"01");
        (established && fields.get(1)?.ends_with(&local) && fields.get(2)?.ends_with(&remote))
            .then(|| u64::from_str_radix(queues.split(':').nth(1)?, 16).ok())
            .flatten()
    })
}

/// `child`'s exit status, waited for up to `timeout`; past it the child is killed and `None`
/// returned, so that a regression fails the test instead of hanging it.
fn exited_within(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            return None;
        }
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

/// `check-config`'s output for `file` (on the `--dev` defaults), which must pass.
fn config_ok_output(dir: &Path, file: &Path) -> String {
    let out = agent(
        dir,
        &["--dev", "--config", file.to_str().unwrap(), "check-config"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn check_config_warns_of_an_agent_token_file_the_tunnel_would_refuse() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("agent.token");
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!("[cloud]\nendpoint = \"https://cloud.example\"\ntoken_file = {token:?}\n"),
    )
    .unwrap();
    // A valid config still: the file may be provisioned after it.
    let check = || config_ok_output(dir.path(), &file);
    let warning = |stdout: &str| {
        stdout
            .lines()
            .find(|l| l.contains("warning:"))
            .map(str::to_owned)
    };
    let stdout = check();
    assert!(
        stdout.contains("cloud        https://cloud.example/"),
        "{stdout}"
    );
    let missing = warning(&stdout).unwrap_or_else(|| panic!("no warning in:\n{stdout}"));
    assert!(missing.contains(token.to_str().unwrap()), "{missing}");
    std::fs::write(&token, "SECRET-AGENT-TOKEN\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stdout = check();
    let readable = warning(&stdout).unwrap_or_else(|| panic!("no warning in:\n{stdout}"));
    assert!(readable.contains("readable by other users"), "{readable}");
    assert!(!stdout.contains("SECRET-AGENT-TOKEN"), "{stdout}");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let stdout = check();
    assert_eq!(warning(&stdout), None, "{stdout}");
}

/// An API beyond loopback is a choice an admin may make, but one that sends secrets in the
/// clear: `check-config` says so before the start does.
#[test]
fn check_config_warns_of_an_api_listening_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    for (listen, warned) in [
        ("0.0.0.0:7878", true),
        ("[::]:7878", true),
        ("127.0.0.1:7878", false),
        ("[::1]:7878", false),
    ] {
        std::fs::write(&file, format!("[api]\nlisten = {listen:?}\n")).unwrap();
        let stdout = config_ok_output(dir.path(), &file);
        assert_eq!(
            stdout.contains("warning: the local API listens beyond loopback, without TLS"),
            warned,
            "{listen}:\n{stdout}"
        );
    }
}

#[test]
fn check_config_reads_the_allow_list_and_warns_of_one_every_plugin_would_fail() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("plugins.lock");
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, format!("[plugins]\nlock_file = {lock:?}\n")).unwrap();
    // A valid config still: the allow-list is read at every load.
    let check = || config_ok_output(dir.path(), &file);
    let stdout = check();
    assert!(
        stdout.contains("warning: cannot read the allow-list")
            && stdout.contains("until it is fixed every plugin is rejected"),
        "{stdout}"
    );
    std::fs::write(&lock, "# approved\nnot-a-digest connector\n").unwrap();
    let stdout = check();
    assert!(
        stdout.contains("line 2: expected a sha256 digest"),
        "{stdout}"
    );
    std::fs::write(&lock, format!("{}  connector\n", "a".repeat(64))).unwrap();
    let stdout = check();
    assert!(
        stdout.contains(&format!("allow-list   {} (1 digest(s))", lock.display())),
        "{stdout}"
    );
    assert!(!stdout.contains("warning"), "{stdout}");
    // The other trust checks are named too: signatures required, permissions not checked.
    std::fs::write(
        &file,
        format!(
            "[plugins]\nlock_file = {lock:?}\nstrict_permissions = false\nsigning_keys = [{:?}]\n",
            "01".repeat(32)
        ),
    )
    .unwrap();
    let stdout = check();
    assert!(
        stdout.contains("signatures   required: <file>.sig by one of 1 key(s)")
            && stdout.contains("permissions  not checked"),
        "{stdout}"
    );
}

/// Output that cannot be written never panics (Rust ignores SIGPIPE, so `println!` would):
/// a reader that has gone ends the command quietly with success; a full disk is reported.
#[test]
fn output_to_a_closed_pipe_or_a_full_disk_ends_the_command_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "state_dir = \"./state\"\nplugins_dir = \"./plugins\"\n",
    )
    .unwrap();
    let check_config = || {
        let mut command = Command::new(AGENT);
        command
            .args(["--config", config.to_str().unwrap(), "check-config"])
            .current_dir(dir.path())
            .stderr(Stdio::piped());
        command
    };
    // The pipe's reader is closed before the command writes its first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = check_config().stdout(writer).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");

    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = check_config().stdout(full).output().unwrap();
        assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("cannot write the output") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// The agent outlives its log's reader: when stderr becomes a broken pipe (journald
/// restarted, `run 2>&1 | head`), log lines are lost and nothing else. (The log subscriber
/// used to report the failed write with `eprintln!`, whose panic stopped the agent.)
#[test]
fn the_agent_keeps_serving_when_its_log_pipe_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let (state, plugins) = (dir.path().join("state"), dir.path().join("plugins"));
    std::fs::create_dir_all(&plugins).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let common = [
        "--state-dir",
        state.to_str().unwrap(),
        "--plugins-dir",
        plugins.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let (mut log, log_writer) = std::io::pipe().unwrap();
    let mut child = agent_run(dir.path(), &listen)
        .stderr(log_writer)
        .spawn_killed_on_drop();
    // Read until the agent says it is ready, then stop reading. (An agent that never gets
    // ready is killed after a minute, which ends the read.)
    let deadline = support::KillAfter::new(child.id(), Duration::from_secs(60));
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready:") {
        let mut chunk = [0u8; 4096];
        let n = std::io::Read::read(&mut log, &mut chunk).unwrap();
        assert!(n > 0, "the agent closed its log: {}", text(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    drop(deadline);
    drop(log);

    let cli = |command: &str| {
        let mut args = common.to_vec();
        args.push(command);
        agent(dir.path(), &args)
    };
    // Nothing loaded yet: the empty list says where connectors go (on stderr: the listing on
    // stdout stays the header alone, for scripts).
    let out = cli("connectors");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains(&format!(
            "no connectors yet; drop connector files into the agent's plugins folder ({}",
            plugins.display()
        )),
        "{}",
        text(&out.stderr)
    );

    // A file it rejects makes it log a warning, into the broken pipe.
    std::fs::write(plugins.join("not-a-connector.so"), b"not an ELF file").unwrap();
    wait_for("the rejected file in the inventory", || {
        let exited = child.try_wait().unwrap();
        assert_eq!(exited, None, "the agent exited when its log broke");
        let out = cli("connectors");
        assert!(
            out.status.success() || out.status.code() == Some(5),
            "{}",
            text(&out.stderr)
        );
        text(&out.stdout).contains("not-a-connector.so")
    });
    // Still serving after the lost lines, and it stops in order.
    let out = cli("connectors");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(child.try_wait().unwrap(), None, "the agent exited");
    support::signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A client that sends half a request and stops does not hold up the agent's stop: the drain
/// closes API connections with no request being answered at once. (It held the drain until
/// its grace ran out, and the agent then exited 7, "calls cancelled", with no call at all.)
/// Its connection is also closed after 75 s of unfinished headers (not waited for here).
#[test]
#[cfg_attr(not(target_os = "linux"), ignore = "reads /proc/net/tcp")]
fn half_a_request_does_not_hold_up_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = agent_run(dir.path(), &listen)
        // Short, so that the old behaviour fails fast: exit 7 after 2 s.
        .env("LUMOS_AGENT_CALLS__DRAIN_GRACE_SECS", "2")
        .stderr(Stdio::piped())
        .spawn_killed_on_drop();
    wait_for("the API", || {
        http_get(&listen, "/healthz").is_some_and(|a| a.contains("200 OK"))
    });
    let mut half = std::net::TcpStream::connect(&listen).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // The agent has read the partial request (its socket's receive queue is empty again): a
    // stop that came before would meet a connection that has sent nothing, which proves nothing.
    let (server, client) = (
        listen.parse::<std::net::SocketAddr>().unwrap().port(),
        half.local_addr().unwrap().port(),
    );
    wait_for("the agent to read the partial request", || {
        unread_bytes(server, client) == Some(0)
    });
    let log = stop_cleanly(&mut child);
    assert!(log.contains("stopped: every call finished"), "{log}");
    drop(half);
}

/// The log has colour codes for a person at a terminal only. Under systemd it goes to journald
/// (a socket), which keeps them as text: every line of `journalctl -u lumos-agent` was wrapped
/// in `ESC[2m…ESC[0m`.
#[test]
fn the_log_has_colour_codes_on_a_terminal_only() {
    let run = |stderr: Stdio, mut log: std::fs::File| -> String {
        let dir = tempfile::tempdir().unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = agent_run(dir.path(), &listen)
            .env_remove("NO_COLOR")
            .stderr(stderr)
            .spawn_killed_on_drop();
        // Read it all: SIGTERM once it is ready, then up to the end (a pty's reader gets EIO
        // once the agent, the last holder of its other side, is gone). An agent that neither
        // gets ready nor stops is killed after a minute: the read ends, and the test fails
        // instead of hanging.
        let deadline = support::KillAfter::new(child.id(), Duration::from_secs(60));
        let mut seen = Vec::new();
        let mut stopping = false;
        loop {
            let mut chunk = [0u8; 4096];
            match std::io::Read::read(&mut log, &mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
            if !stopping && text(&seen).contains("ready:") {
                stopping = true;
                support::signal(&child, nix::sys::signal::Signal::SIGTERM);
            }
        }
        assert_eq!(child.wait().unwrap().code(), Some(0), "{}", text(&seen));
        drop(deadline);
        let log = text(&seen);
        assert!(log.contains("ready:") && log.contains("stopped:"), "{log}");
        log
    };

    let (reader, writer) = std::io::pipe().unwrap();
    let piped = run(
        writer.into(),
        std::fs::File::from(std::os::fd::OwnedFd::from(reader)),
    );
    assert!(
        !piped.contains('\x1b'),
        "colour codes in a piped log:\n{piped}"
    );

    let pty = nix::pty::openpty(None, None).unwrap();
    let on_a_terminal = run(pty.slave.into(), std::fs::File::from(pty.master));
    assert!(
        on_a_terminal.contains("\x1b["),
        "no colour on a terminal:\n{on_a_terminal}"
    );
}

/// A call body that is not a JSON object is refused before anything is sent (and before the
/// token is read), saying where it breaks, and never echoing it (it may hold credentials).
#[test]
fn a_bad_call_body_is_refused_with_where_it_breaks_and_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    let call = |body: &str| {
        agent(
            dir.path(),
            &[
                "--listen",
                "127.0.0.1:1",
                "--token-file",
                token.to_str().unwrap(),
                "call",
                "x",
                "y",
                "--json",
                body,
            ],
        )
    };
    let out = call(r#"{"auth": {"oauth": {"access_token": "SECRET-canary"}} oops"#);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the call body is not JSON (expected `,` or `}` at line 1 column 55)")
            && !stderr.contains("SECRET-canary"),
        "{stderr}"
    );
    let out = call("[1]");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("the call body must be a JSON object"),
        "{}",
        text(&out.stderr)
    );
    // Checked before the token is read: without one, the body's fault is still the one told.
    std::fs::remove_file(&token).unwrap();
    let out = call("{oops");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the call body is not JSON"),
        "{}",
        text(&out.stderr)
    );
}

/// `tenants put` checks its settings and secret files before it reads the token, as `call`
/// checks its body: a mistyped file is told as such (where its JSON breaks, never its text),
/// whoever runs the command, and nothing is sent.
#[test]
fn a_bad_tenant_is_refused_before_the_token_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let no_token = dir.path().join("no-such-token");
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, r#"{"oauth": {"access_token": "SECRET-canary"} oops"#).unwrap();
    let put = |args: &[&str]| {
        let mut full = vec![
            "--listen",
            "127.0.0.1:1",
            "--token-file",
            no_token.to_str().unwrap(),
            "tenants",
            "put",
            "t1",
            "--app-id",
            "x",
        ];
        full.extend_from_slice(args);
        agent(dir.path(), &full)
    };
    let out = put(&["--auth-file", auth.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is not JSON: expected `,` or `}` at line 1 column 45")
            && !stderr.contains("SECRET-canary"),
        "{stderr}"
    );
    // From stdin, the message says so (not "- is not JSON").
    let mut child = Command::new(AGENT)
        .args(["--listen", "127.0.0.1:1", "--token-file"])
        .arg(&no_token)
        .args([
            "tenants",
            "put",
            "t1",
            "--app-id",
            "x",
            "--credentials-file",
            "-",
        ])
        .current_dir(dir.path())
        .env_remove("LUMOS_AGENT_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_killed_on_drop();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[{\"oauth\": ")
        .unwrap();
    let status = exited_within(&mut child, Duration::from_secs(30)).expect("it exits");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--credentials-file (standard input) is not JSON: EOF while parsing"),
        "{stderr}"
    );
    let out = put(&["--settings", "[1]"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--settings must be a JSON object"),
        "{}",
        text(&out.stderr)
    );
    let missing = dir.path().join("missing.json");
    let out = put(&["--credentials-file", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("cannot read {}", missing.display())),
        "{}",
        text(&out.stderr)
    );
    // With good input, the missing token is what is told.
    std::fs::write(&auth, r#"{"oauth": {"access_token": "a"}}"#).unwrap();
    let out = put(&["--auth-file", auth.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot read the API token"),
        "{}",
        text(&out.stderr)
    );
}

/// A secret read from stdin at a terminal is read to its end: the command says how to end it,
/// instead of seeming to hang (and then reads what was typed).
#[test]
fn reading_from_the_terminal_says_how_to_end_it() {
    let dir = tempfile::tempdir().unwrap();
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut terminal = std::fs::File::from(pty.master);
    let mut child = Command::new(AGENT)
        .args(["--listen", "127.0.0.1:1", "--token-file"])
        .arg(dir.path().join("no-such-token"))
        .args(["tenants", "put", "t1", "--app-id", "x", "--auth-file", "-"])
        .current_dir(dir.path())
        .stdin(Stdio::from(pty.slave))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_killed_on_drop();
    // Typed, then Ctrl-D on a line of its own.
    terminal
        .write_all(b"{\"oauth\": {\"access_token\": \"typed\"}}\n\x04")
        .unwrap();
    let status = exited_within(&mut child, Duration::from_secs(30)).expect("it read to the end");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("reading from the terminal until Ctrl-D on a line of its own"),
        "{stderr}"
    );
    // What was typed was read whole and is JSON: the missing token is what stops it.
    assert_eq!(status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("cannot read the API token"), "{stderr}");
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
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot reach the agent")
            && stderr.contains(&format!(
                "note: no agent runs on the state folder {}",
                state.display()
            )),
        "{stderr}"
    );
    // No token to send: the CLI says so itself, and no request is made.
    let empty = dir.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    for (file, said) in [
        (empty.clone(), "is empty"),
        (
            dir.path().join("missing.token"),
            "cannot read the API token",
        ),
    ] {
        let out = agent(
            dir.path(),
            &[
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token-file",
                file.to_str().unwrap(),
                "connectors",
            ],
        );
        assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(said),
            "{stderr}"
        );
    }
    // An agent that takes no admin token, and no login saved: the CLI asks for one.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[api]\nlisten = \"127.0.0.1:{port}\"\nadmin_token = false\n\
             [api.users.ann]\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\"\nrole = \"admin\"\n"
        ),
    )
    .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(AGENT)
        .args(["--config", config.to_str().unwrap(), "connectors"])
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("LUMOS_AGENT_TOKEN_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "this agent takes no admin token (api.admin_token = false): log in first (`lumos-agent login --user NAME`)"
        ),
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
        .spawn_killed_on_drop();
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
    let put_tenant_auth = |tenant: &str, app_id: &str, auth: &[u8]| {
        let put = Command::new(AGENT)
            .args(["--dev", "--listen", &listen, "tenants", "put", tenant])
            .args(["--app-id", app_id, "--auth-file", "-"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .output_with_stdin(auth);
        assert!(put.status.success(), "{}", text(&put.stderr));
        text(&put.stdout)
    };
    let put_tenant = |tenant: &str, app_id: &str| {
        put_tenant_auth(
            tenant,
            app_id,
            br#"{"oauth": {"access_token": "cli-token"}}"#,
        )
    };
    put_tenant("t1", "lumos_example");

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
        let stdout = put_tenant(&tenant, app);
        assert!(!stdout.contains("note:"), "{stdout}");
        let out = cli(&["call", app, "validate_credentials", "--tenant", &tenant]);
        assert_eq!(out.status.code(), Some(0), "{app}: {}", text(&out.stderr));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["response"]["unique_tenant_id"], *expected, "{app}");
    }

    // Credentials the connector does not read are stored, with a note naming what it reads
    // (from its `credentials_schema`), and no secret.
    let stdout = put_tenant_auth(
        "t-basic",
        "lumos_example",
        br#"{"basic": {"username": "u", "password": "cli-secret"}}"#,
    );
    assert!(
        stdout.contains("note: this auth holds \"basic\" where lumos_example reads \"oauth\""),
        "{stdout}"
    );
    assert!(!stdout.contains("cli-secret"), "{stdout}");
    // `tenants list` says it again, on stderr, so the table stays a table.
    let listed = cli(&["tenants", "list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(
        text(&listed.stderr).contains(
            "note: tenant t-basic: this auth holds \"basic\" where lumos_example reads \"oauth\""
        ),
        "{}",
        text(&listed.stderr)
    );
    assert!(!text(&listed.stdout).contains("note:"));

    // A tenant for an app_id no connector has is stored (its connector may come later), with
    // a note: a typo shows now, not at the first call.
    let stdout = put_tenant("t-typo", "lumos_exmaple");
    assert!(
        stdout.contains("note: no connector with app_id \"lumos_exmaple\" is loaded"),
        "{stdout}"
    );

    let tenants = text(&cli(&["tenants", "list"]).stdout);
    assert!(
        tenants.contains("t1") && !tenants.contains("cli-token"),
        "{tenants}"
    );

    let out = cli(&["call", "lumos_example", "no_such_capability"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("agent.unsupported_capability"));
    // A name with a space or a slash reaches the agent as that name.
    for (args, said) in [
        (&["tenants", "delete", "a b"][..], "no tenant \"a b\""),
        (
            &["connectors", "a/b"][..],
            "no connector with app_id \"a/b\"",
        ),
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(said), "{}", text(&out.stderr));
    }

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
    let log = stop_cleanly(&mut child);
    assert!(log.contains("loaded lumos_example"), "{log}");
}

/// SIGTERM while the first scan of the plugins folder waits for a connector whose `info`
/// hangs: the agent stops at once, exit 0, and the hanging `info` is killed. (The start
/// waited for the scan, up to `plugins.info_timeout_secs`, and only then saw the stop; a
/// second Ctrl-C waited as long.)
#[test]
fn a_stop_during_the_first_scan_does_not_wait_for_a_hanging_connector() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let pid_file = dir.path().join("info.pid");
    support::hanging_connector(&plugins.join("hangs"), &pid_file);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = agent_run(dir.path(), &listen)
        .env("LUMOS_AGENT_PLUGINS__INFO_TIMEOUT_SECS", "600")
        .stderr(Stdio::piped())
        .spawn_killed_on_drop();
    wait_for("the hanging info to start", || pid_file.exists());
    let pid = support::pid_in(&pid_file);
    // Meanwhile the API answers: healthy, not ready, and what it is loading.
    let health = http_get(&listen, "/healthz").unwrap();
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    let ready = http_get(&listen, "/readyz").unwrap();
    assert!(
        ready.starts_with("HTTP/1.1 503")
            && ready.contains(r#""reason":"starting""#)
            && ready.contains(r#""loading":["hangs"]"#),
        "{ready}"
    );
    let state = dir.path().join("state");
    let cli = |listen: &str, command: &[&str]| {
        let mut args = vec!["--state-dir", state.to_str().unwrap(), "--listen", listen];
        args.extend_from_slice(command);
        agent(dir.path(), &args)
    };
    let out = cli(&listen, &["connectors"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the agent is starting: 0 connectors loaded; loading hangs"),
        "{}",
        text(&out.stderr)
    );
    // Tenants do not wait for the connectors. None stored: the empty list says how to add one.
    let out = cli(&listen, &["tenants", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("no agent-held tenants")
            && text(&out.stderr).contains("lumos-agent tenants put <tenant>"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&listen, &["doctor"]);
    assert!(
        text(&out.stdout).contains("still starting: 0 connectors loaded; loading hangs"),
        "{}",
        text(&out.stdout)
    );
    // Asked on another address, the CLI says an agent runs on the folder, and where to look.
    let elsewhere = format!("127.0.0.1:{}", free_port());
    let out = cli(&elsewhere, &["connectors"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "note: an agent (pid {}) runs on the state folder {}, but does not answer on \
             api.listen = {elsewhere}",
            child.id(),
            state.display()
        )),
        "{stderr}"
    );
    support::signal(&child, nix::sys::signal::Signal::SIGTERM);
    // Not a timing: without the fix the stop waits for the 600 s `info` deadline.
    let status = exited_within(&mut child, Duration::from_secs(30))
        .expect("the stop waited for the plugins scan");
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("stopped before the agent was ready"), "{log}");
    wait_for("the hanging info to be killed", || {
        !lumos_agent::exec::is_process_alive(pid)
    });
}

/// A file dropped in whose load takes long (its `info` hangs) is shown while it loads, with
/// what the load is doing: an admin who does not see the connector listed yet learns why,
/// from `connectors`, `doctor` and the status. (Nothing said it until the load ended.)
#[test]
fn a_connector_still_loading_is_shown_with_what_its_load_does() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(example_built(), plugins.join("example")).unwrap();
    // Served, with nothing to call: its row says so instead of being blank.
    let nothing = plugins.join("nothing");
    std::fs::write(
        &nothing,
        "#!/bin/sh\necho '{\"response\": {\"app_id\": \"does_nothing\", \"version\": \"1.0.0\", \"capabilities\": []}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &nothing,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let _child = agent_run(dir.path(), &listen)
        .env("LUMOS_AGENT_PLUGINS__INFO_TIMEOUT_SECS", "600")
        .stderr(Stdio::null())
        .spawn_killed_on_drop();
    wait_for("the agent to be ready", || {
        http_get(&listen, "/readyz").is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    });
    let pid_file = dir.path().join("info.pid");
    support::hanging_connector(&dir.path().join("hangs"), &pid_file);
    std::fs::rename(dir.path().join("hangs"), plugins.join("hangs")).unwrap();
    wait_for("the hanging info to start", || pid_file.exists());

    let state = dir.path().join("state");
    let cli = |command: &[&str]| {
        let mut args = vec!["--state-dir", state.to_str().unwrap(), "--listen", &listen];
        args.extend_from_slice(command);
        agent(dir.path(), &args)
    };
    let out = cli(&["connectors"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("hangs "))
        .unwrap_or_else(|| panic!("no row for the file loading:\n{table}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[..4], ["hangs", "-", "-", "loading"], "{row}");
    assert!(row.contains(" waiting for its `info` ("), "{row}");
    assert!(
        table.lines().any(|l| l.starts_with("lumos_example ")),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("does_nothing "))
        .unwrap_or_else(|| panic!("no row for does_nothing:\n{table}"));
    assert!(row.ends_with(" ready      (no capabilities)"), "{row}");
    let out = cli(&["doctor"]);
    let report = text(&out.stdout);
    assert!(
        report.contains("hangs: still loading (waiting for its `info`, "),
        "{report}"
    );
    assert!(
        report.contains(
            "WARN  connector      does_nothing 1.0.0 (executable, nothing): ready, but its `info` lists no capabilities"
        ),
        "{report}"
    );
    let token = std::fs::read_to_string(state.join("admin.token")).unwrap();
    let mut stream = std::net::TcpStream::connect(&listen).unwrap();
    write!(
        stream,
        "GET /v1/status HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
        token.trim()
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    let body: serde_json::Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["loading"][0]["file"], "hangs", "{body}");
    assert_eq!(
        body["loading"][0]["doing"], "waiting for its `info`",
        "{body}"
    );
    assert_eq!(body["starting"], serde_json::Value::Null, "{body}");
}

/// The local API's users (design §6): `hash-password` makes the config's hash, `login` saves
/// a token of the user's role that the other commands then send, the role decides what they
/// may do, and `logout` ends the session.
#[test]
fn users_log_in_from_the_cli_and_their_role_decides_what_they_may_do() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(example_built(), plugins.join("example")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("agent.toml");
    // Every command as an admin's shell runs it: its own home, the agent's config.
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let mut command = Command::new(AGENT);
        command
            .args(["--config", config.to_str().unwrap(), "--listen", &listen])
            .args(args)
            .current_dir(dir.path())
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("LUMOS_AGENT_CONFIG")
            .env_remove("LUMOS_AGENT_TOKEN_FILE")
            .stdin(Stdio::piped());
        command.output_with_stdin(stdin.unwrap_or_default())
    };
    let hash_of = |password: &[u8]| {
        let out = run(&["hash-password", "--password-file", "-"], Some(password));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let (viewer, operator) = (hash_of(b"vic-pw\n"), hash_of(b"olga-pw\n"));
    assert!(viewer.starts_with("$argon2id$"), "{viewer}");
    std::fs::write(
        &config,
        format!(
            "plugins_dir = {plugins:?}\nstate_dir = {:?}\n[plugins]\nstrict_permissions = false\n\
             [api.users.vic]\npassword_hash = \"{viewer}\"\nrole = \"viewer\"\n\
             [api.users.olga]\npassword_hash = \"{operator}\"\nrole = \"operator\"\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    let mut child = Command::new(AGENT)
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &listen,
            "run",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_killed_on_drop();
    // The admin token (no login saved) serves until then.
    wait_for("the example connector to be ready", || {
        text(&run(&["connectors"], None).stdout).contains("ready")
    });

    let wrong = run(
        &["login", "--user", "vic", "--password-file", "-"],
        Some(b"nope\n"),
    );
    let unknown = run(
        &["login", "--user", "eve", "--password-file", "-"],
        Some(b"nope\n"),
    );
    for out in [&wrong, &unknown] {
        assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr),
            "lumos-agent: login refused: wrong user name or password\n"
        );
    }

    let out = run(
        &["login", "--user", "vic", "--password-file", "-"],
        Some(b"vic-pw\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!(
            "logged in to http://{listen} as vic (viewer) until "
        )),
        "{said}"
    );
    let saved = home
        .join(".config/lumos-agent")
        .join(format!("api-token-{}", listen.replace(':', "_")));
    assert!(said.contains(saved.to_str().unwrap()), "{said}");
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A viewer reads, and may not call.
    let out = run(&["connectors"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["call", "lumos_example", "validate_credentials"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "POST /v1/connectors/lumos_example/validate_credentials needs the operator role; vic \
             has the viewer role"
        ),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["logout"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let put_tenant = || {
        run(
            &[
                "tenants",
                "put",
                "t1",
                "--app-id",
                "lumos_example",
                "--auth-file",
                "-",
            ],
            Some(br#"{"oauth": {"access_token": "x"}}"#),
        )
    };
    assert!(
        text(&out.stdout).starts_with("logged out: session ended"),
        "{}",
        text(&out.stdout)
    );
    assert!(!saved.exists());

    // An operator calls, and may not store a tenant; its token ends when it is logged out.
    let password_file = dir.path().join("olga.pw");
    std::fs::write(&password_file, "olga-pw\n").unwrap();
    let out = run(
        &[
            "login",
            "--user",
            "olga",
            "--password-file",
            password_file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = std::fs::read_to_string(&saved).unwrap();
    let out = run(
        &[
            "call",
            "lumos_example",
            "validate_credentials",
            "--json",
            r#"{"auth": {"oauth": {"access_token": "t"}}}"#,
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = put_tenant();
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("needs the admin role; olga has the operator role"),
        "{}",
        text(&out.stderr)
    );
    assert!(run(&["logout"], None).status.success());
    let kept = dir.path().join("kept-token");
    std::fs::write(&kept, token).unwrap();
    let out = run(
        &["--token-file", kept.to_str().unwrap(), "connectors"],
        None,
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unknown bearer token"),
        "{}",
        text(&out.stderr)
    );
    // The admin token, as before, may do everything.
    let out = put_tenant();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let log = stop_cleanly(&mut child);
    // Who logged in is in the log; no password or token is.
    assert!(log.contains("API login"), "{log}");
    for secret in ["vic-pw", "olga-pw", "lat_"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// SIGTERM, which drains: the agent must exit 0. Its log (stderr).
fn stop_cleanly(child: &mut std::process::Child) -> String {
    support::signal(child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    log
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

/// One agent per state folder: a second is refused, naming the first's pid, before it touches
/// the folder; once the first is gone, even by SIGKILL, the folder is free again.
#[test]
fn a_second_agent_on_the_same_state_folder_is_refused_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (state, plugins) = (dir.path().join("state"), dir.path().join("plugins"));
    let run = || {
        let listen = format!("127.0.0.1:{}", free_port());
        Command::new(AGENT)
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--plugins-dir", plugins.to_str().unwrap()])
            .args(["--listen", &listen, "run"])
            .current_dir(dir.path())
            .env_remove("LUMOS_AGENT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn_killed_on_drop()
    };
    let holder = || {
        std::fs::read_to_string(state.join("agent.lock"))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
    };
    let mut first = run();
    // The lock is taken before the admin token is made (atomically, by a rename).
    wait_for(
        "the first agent to hold the folder and make its token",
        || holder() == Some(first.id()) && state.join("admin.token").exists(),
    );
    let token = std::fs::read(state.join("admin.token")).unwrap();

    // Waited for with a deadline: a regression would leave it running, not hang the test.
    let mut second = run();
    let Some(status) = exited_within(&mut second, Duration::from_secs(60)) else {
        panic!("a second agent ran on the state folder of the first");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(4), "{stderr}");
    let expected = format!(
        "another lumos-agent (pid {}) is running with the state folder {}",
        first.id(),
        state.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(first.try_wait().unwrap(), None, "the first agent runs on");
    assert_eq!(holder(), Some(first.id()));
    assert_eq!(std::fs::read(state.join("admin.token")).unwrap(), token);

    first.kill().unwrap();
    first.wait().unwrap();
    let mut third = run();
    wait_for(
        "an agent started after a SIGKILL to hold the folder",
        || holder() == Some(third.id()),
    );
    assert_eq!(third.try_wait().unwrap(), None);
    third.kill().unwrap();
    third.wait().unwrap();
}

/// The group reaper on its own: `+` lists a group, `-` takes it off, garbage and the ids 0 and 1
/// are ignored, and so is a last line cut off before its newline (`+12` of `+1234` would name
/// another group); when its stdin closes, every listed group dies and the rest live.
#[test]
fn group_reaper_kills_the_groups_listed_when_its_input_closes_and_no_others() {
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
    let sleeper = || {
        Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn_killed_on_drop()
    };
    let (mut first, mut second, mut forgotten, mut torn) =
        (sleeper(), sleeper(), sleeper(), sleeper());
    let mut reaper = Command::new(AGENT)
        .arg("group-reaper")
        .stdin(Stdio::piped())
        .spawn_killed_on_drop();
    let mut stdin = reaper.stdin.take().unwrap();
    let (first_id, second_id, forgotten_id, torn_id) =
        (first.id(), second.id(), forgotten.id(), torn.id());
    write!(
        stdin,
        "+{first_id}\n+{forgotten_id}\n-{forgotten_id}\n+0\n+1\n-x\nnonsense\n\n\
         +{forgotten_id}\n-{forgotten_id}\n+{second_id}\n+{torn_id}"
    )
    .unwrap();
    stdin.flush().unwrap();
    // Nothing dies before the input closes.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(first.try_wait().unwrap(), None);
    drop(stdin);
    assert!(reaper.wait().unwrap().success());
    for (name, child) in [("first", &mut first), ("second", &mut second)] {
        assert_eq!(child.wait().unwrap().signal(), Some(9), "{name}");
    }
    for (name, child) in [("taken off", &mut forgotten), ("torn line", &mut torn)] {
        assert_eq!(child.try_wait().unwrap(), None, "{name} lives");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
