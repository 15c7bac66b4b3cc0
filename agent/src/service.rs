//! Service-manager integration: systemd's notify protocol for `Type=notify` units.
//!
//! `READY=1` once the plugins are loaded and the API listens; `STATUS=` lines an admin sees in
//! `systemctl status` ("3 connectors ready, 1 rejected; API on 127.0.0.1:7878"), updated on every
//! inventory change; `WATCHDOG=1` pings at half the unit's `WatchdogSec`; `RELOADING=1` and
//! `STOPPING=1` around reloads and drains. Without `NOTIFY_SOCKET` (not under systemd, tests)
//! every call is a no-op. Connectors never see `NOTIFY_SOCKET`: their environment is scrubbed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use crate::plugins::{Inventory, PluginRegistry};
use crate::tunnel::CloudStatus;

/// What the agent tells its service manager.
#[cfg_attr(
    windows,
    allow(dead_code, reason = "only systemd reads the states' contents")
)]
enum NotifyState<'a> {
    Ready,
    Status(&'a str),
    Watchdog,
    Reloading,
    Stopping,
}

/// Sends `states` over systemd's notify socket. On Windows the service control manager learns
/// of start and stop from the service host (`winservice`), and there is no status line.
fn send(states: &[NotifyState<'_>]) {
    #[cfg(unix)]
    {
        use sd_notify::NotifyState as Sd;
        let mut sd: Vec<Sd<'_>> = states
            .iter()
            .map(|s| match s {
                NotifyState::Ready => Sd::Ready,
                NotifyState::Status(line) => Sd::Status(line),
                NotifyState::Watchdog => Sd::Watchdog,
                NotifyState::Reloading => Sd::Reloading,
                NotifyState::Stopping => Sd::Stopping,
            })
            .collect();
        // systemd wants the monotonic time with RELOADING=1 (Type=notify-reload).
        if states.iter().any(|s| matches!(s, NotifyState::Reloading)) {
            if let Ok(now) = Sd::monotonic_usec_now() {
                sd.push(now);
            }
        }
        if let Err(e) = sd_notify::notify(&sd) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }
    #[cfg(windows)]
    let _ = states;
}

/// The watchdog period the service manager expects pings within, if any.
fn watchdog_period() -> Option<std::time::Duration> {
    #[cfg(unix)]
    {
        sd_notify::watchdog_enabled()
    }
    #[cfg(windows)]
    {
        None
    }
}

/// The `STATUS=` line: "3 connectors ready, 1 rejected; cloud connected; API on 127.0.0.1:7878".
pub fn status_line(inventory: &Inventory, cloud: CloudStatus, api: SocketAddr) -> String {
    let ready = inventory.ready_count();
    let rejected = inventory
        .connectors
        .iter()
        .filter(|c| inventory.status_of(c) == crate::plugins::ConnectorStatus::Rejected)
        .count();
    let noun = if ready == 1 {
        "connector"
    } else {
        "connectors"
    };
    let rejected = if rejected > 0 {
        format!(", {rejected} rejected")
    } else {
        String::new()
    };
    let cloud = match cloud {
        CloudStatus::Standalone => "standalone (no cloud configured)".to_string(),
        other => format!("cloud {}", other.as_str()),
    };
    format!("{ready} {noun} ready{rejected}; {cloud}; API on {api}")
}

/// Tells the service manager the agent is ready, then keeps its status line current (on every
/// inventory or tunnel change) and pings its watchdog until `stop`.
pub async fn run_notifier(
    registry: Arc<PluginRegistry>,
    mut cloud: watch::Receiver<CloudStatus>,
    api: SocketAddr,
    stop: CancellationToken,
) {
    send(&[NotifyState::Ready]);
    let mut inventory = registry.subscribe();
    let line = |inventory: &mut watch::Receiver<Arc<Inventory>>,
                cloud: &mut watch::Receiver<CloudStatus>| {
        let cloud = *cloud.borrow_and_update();
        status_line(&inventory.borrow_and_update(), cloud, api)
    };
    let status = line(&mut inventory, &mut cloud);
    send(&[NotifyState::Status(&status)]);
    tracing::info!("ready: {status}");
    let watchdog = watchdog_period();
    let mut ping = watchdog.map(|period| tokio::time::interval(period / 2));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = inventory.changed() => {
                if changed.is_err() {
                    break;
                }
                send(&[NotifyState::Status(&line(&mut inventory, &mut cloud))]);
            }
            Ok(()) = cloud.changed() => {
                send(&[NotifyState::Status(&line(&mut inventory, &mut cloud))]);
            }
            _ = async { match ping.as_mut() { Some(p) => p.tick().await, None => std::future::pending().await } } => {
                send(&[NotifyState::Watchdog]);
            }
        }
    }
}

/// The agent is re-reading its configuration or plugins (SIGHUP).
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// A status line outside the inventory's (e.g. a failed reload).
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// The reload is done.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// The agent is draining and will exit.
pub fn stopping(in_flight_grace: std::time::Duration) {
    let status = format!("draining: finishing in-flight calls (up to {in_flight_grace:?})");
    send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
}
