//! The agent as a systemd `Type=notify` service: what a NOTIFY_SOCKET listener receives.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::SpawnKilledOnDrop as _;

mod support;

const AGENT: &str = env!("CARGO_BIN_EXE_lumos-agent");

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notify message within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A socket for the agent's notify messages, at `path`.
fn notify_socket(path: &Path) -> UnixDatagram {
    let socket = UnixDatagram::bind(path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    socket
}

/// `lumos-agent run` on `plugins` and a state folder in `dir`, notifying `socket_path`.
fn agent_notifying(dir: &Path, plugins: &Path, socket_path: &Path) -> Command {
    let mut command = Command::new(AGENT);
    command
        .args(["--plugins-dir", plugins.to_str().unwrap()])
        .args(["--state-dir", dir.join("state").to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "run"])
        .env("NOTIFY_SOCKET", socket_path)
        .env_remove("LUMOS_AGENT_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// The first message that starts with none of `skip`: watchdog pings, and the "still
/// loading" ticks of a start or reload that takes over five seconds on a loaded machine.
fn receive_skipping(socket: &UnixDatagram, skip: &[&str]) -> String {
    loop {
        let message = receive(socket);
        if !skip.iter().any(|prefix| message.starts_with(prefix)) {
            return message;
        }
    }
}

const WATCHDOG: &str = "WATCHDOG=1\n";
const STARTING: &str = "STATUS=starting: ";
const RELOADING: &str = "STATUS=reloading: ";
/// Any status line: the inventory's, or a start's or reload's tick.
const STATUS: &str = "STATUS=";

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
    let socket = notify_socket(&socket_path);
    let mut child = agent_notifying(dir.path(), &plugins, &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .spawn_killed_on_drop();

    assert_eq!(receive_skipping(&socket, &[STARTING]), "READY=1\n");
    let status = receive(&socket);
    assert!(
        status.starts_with(
            "STATUS=1 connector ready, 1 rejected; standalone (no cloud configured); API on 127.0.0.1:"
        ),
        "{status:?}"
    );
    assert_eq!(receive(&socket), WATCHDOG);
    assert_eq!(
        receive(&socket),
        WATCHDOG,
        "the watchdog keeps being pinged"
    );

    // A reload (SIGHUP) says so, and when it is done, says the status line again.
    let not_watchdog = || receive_skipping(&socket, &[WATCHDOG, RELOADING]);
    support::signal(&child, nix::sys::signal::Signal::SIGHUP);
    let reloading = not_watchdog();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let reloaded = not_watchdog();
    assert!(
        reloaded.starts_with(
            "READY=1\nSTATUS=1 connector ready, 1 rejected; standalone (no cloud configured); API on 127.0.0.1:"
        ),
        "{reloaded:?}"
    );

    support::signal(&child, nix::sys::signal::Signal::SIGTERM);
    let stopping = receive_skipping(&socket, &[WATCHDOG]);
    // The drain's grace (30 s by default) and a margin, which may be beyond the unit's
    // TimeoutStopSec.
    assert_eq!(
        stopping,
        "STOPPING=1\nSTATUS=draining: finishing in-flight calls (up to 30s)\n\
         EXTEND_TIMEOUT_USEC=45000000\n"
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A start (or a reload) that waits on a connector whose `info` does not answer (up to
/// `plugins.info_timeout_secs`, here ten minutes) asks systemd for more time every few seconds,
/// saying what it waits for: `TimeoutStartSec=` (90 s by default) would otherwise kill the agent
/// part way, and `Restart=` start it again into the same wait, forever.
#[test]
fn a_start_or_reload_waiting_on_a_slow_connector_asks_for_more_time_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let pid_file = dir.path().join("info.pid");
    support::hanging_connector(&plugins.join("slow-connector"), &pid_file);
    let config = dir.path().join("agent.toml");
    let info_timeout = |secs: u32| {
        let text = format!("[plugins]\ninfo_timeout_secs = {secs}\n");
        std::fs::write(dir.path().join(".tmp"), text).unwrap();
        std::fs::rename(dir.path().join(".tmp"), &config).unwrap();
    };
    info_timeout(600);

    let socket_path = dir.path().join("notify.sock");
    let socket = notify_socket(&socket_path);
    let mut child = agent_notifying(dir.path(), &plugins, &socket_path)
        .args(["--config", config.to_str().unwrap()])
        .spawn_killed_on_drop();
    let waits_for_the_slow_connector = |doing: &str, loaded: &str| {
        // Twice: for as long as the load lasts, not once.
        for _ in 0..2 {
            assert_eq!(
                receive(&socket),
                format!(
                    "STATUS={doing}: {loaded} loaded; loading slow-connector\n\
                     EXTEND_TIMEOUT_USEC=30000000\n"
                )
            );
        }
        // Once the load ends (its `info` killed here: the connector is rejected), so does
        // the start or reload.
        support::end_hanging_info(&pid_file);
    };
    waits_for_the_slow_connector("starting", "0 connectors");
    assert_eq!(receive_skipping(&socket, &[STARTING]), "READY=1\n");
    let status = receive(&socket);
    assert!(
        status.starts_with("STATUS=0 connectors ready, 1 rejected;"),
        "{status:?}"
    );

    // A reload (SIGHUP) whose new `info_timeout_secs` has every connector loaded again.
    info_timeout(601);
    support::signal(&child, nix::sys::signal::Signal::SIGHUP);
    let reloading = receive(&socket);
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    waits_for_the_slow_connector("reloading", "1 connector");
    // The inventory's new status line may come before or after READY=1, which repeats it.
    let reloaded = receive_skipping(&socket, &[STATUS]);
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=0 connectors ready, 1 rejected;"),
        "{reloaded:?}"
    );
    support::signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A reload (SIGHUP) while the watch loop's scan is loading a new connector is done only once
/// that load is: READY=1 said "reloaded", with the old status line, while the connector was
/// still loading.
#[test]
fn a_reload_is_done_when_a_load_another_scan_started_is() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = notify_socket(&socket_path);
    let mut child = agent_notifying(dir.path(), &plugins, &socket_path).spawn_killed_on_drop();
    assert_eq!(receive_skipping(&socket, &[STARTING]), "READY=1\n");
    let status = receive(&socket);
    assert!(
        status.starts_with("STATUS=0 connectors ready;"),
        "{status:?}"
    );

    // Dropped in: the watch loop's scan loads it, and its `info` hangs.
    let pid_file = dir.path().join("info.pid");
    let staged = dir.path().join("slow-connector");
    support::hanging_connector(&staged, &pid_file);
    std::fs::rename(&staged, plugins.join("slow-connector")).unwrap();
    support::wait_for("the watch loop to load the new file", || pid_file.exists());

    support::signal(&child, nix::sys::signal::Signal::SIGHUP);
    let reloading = receive(&socket);
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    // The reload waits for that load, and says so.
    assert_eq!(
        receive(&socket),
        "STATUS=reloading: 0 connectors loaded; loading slow-connector\n\
         EXTEND_TIMEOUT_USEC=30000000\n"
    );
    support::end_hanging_info(&pid_file);
    // READY=1 repeats the status line with the connector in it (the inventory's own status
    // line may come first).
    let reloaded = receive_skipping(&socket, &[STATUS]);
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=0 connectors ready, 1 rejected;"),
        "{reloaded:?}"
    );
    support::signal(&child, nix::sys::signal::Signal::SIGTERM);
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
        .spawn_killed_on_drop();
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
