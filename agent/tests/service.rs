//! The agent as a systemd `Type=notify` service: what a NOTIFY_SOCKET listener receives.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_lumos-agent");

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notify message within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notify_messages_arrive_in_order_ready_status_watchdog_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let library = Path::new(AGENT)
        .parent()
        .unwrap()
        .join("liblumos_example_c.so");
    std::fs::copy(&library, plugins.join("liblumos_example_c.so")).unwrap();
    std::fs::write(plugins.join("junk"), b"not a connector").unwrap();

    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(AGENT)
        .args([
            "--plugins-dir",
            plugins.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ])
        .args(["--listen", "127.0.0.1:0", "run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    assert_eq!(receive(&socket), "READY=1\n");
    let status = receive(&socket);
    assert!(
        status.starts_with(
            "STATUS=1 connector ready, 1 rejected; standalone (no cloud configured); API on 127.0.0.1:"
        ),
        "{status:?}"
    );
    assert_eq!(receive(&socket), "WATCHDOG=1\n");
    assert_eq!(
        receive(&socket),
        "WATCHDOG=1\n",
        "the watchdog keeps being pinged"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut stopping = receive(&socket);
    while stopping == "WATCHDOG=1\n" {
        stopping = receive(&socket);
    }
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=draining"),
        "{stopping:?}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn sighup_with_a_bad_config_keeps_running_and_with_a_good_one_applies_the_log_level() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let write = |extra: &str| {
        let text = format!(
            "plugins_dir = {:?}\nstate_dir = {:?}\n{extra}",
            dir.path().join("plugins"),
            dir.path().join("state")
        );
        std::fs::write(dir.path().join(".tmp"), text).unwrap();
        std::fs::rename(dir.path().join(".tmp"), &config).unwrap();
    };
    write("[log]\nlevel = \"info\"\n");
    let log_path = dir.path().join("agent.log");
    let mut child = Command::new(AGENT)
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "run",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let wait_for = |what: &str, needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !log().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("the agent to start", "local API listening");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let hup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();

    write("[log]\nlevel = 5\n");
    hup();
    wait_for(
        "the bad config to be reported",
        "configuration reload failed",
    );
    assert!(
        log().contains("`log.level`"),
        "the error names the key:\n{}",
        log()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent keeps running"
    );
    assert!(!log().contains("DEBUG"), "still at info");

    write("[log]\nlevel = \"debug\"\n");
    hup();
    wait_for("the new level to apply", "configuration reloaded");
    wait_for("debug lines after the change", "log filter changed");
    assert!(log().contains("DEBUG"));

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
