//! Service-manager integration: systemd's notify protocol for `Type=notify` units.
//!
//! `READY=1` once the plugins are loaded and the API listens; `STATUS=` lines an admin sees in
//! `systemctl status` ("3 connectors ready, 1 rejected; API on 127.0.0.1:7878"), updated on every
//! inventory change; `WATCHDOG=1` pings at half the unit's `WatchdogSec`; `RELOADING=1` and
//! `STOPPING=1` around reloads and drains. Without `NOTIFY_SOCKET` (not under systemd, tests)
//! every call is a no-op. Connectors never see `NOTIFY_SOCKET`: their environment is scrubbed.

use std::net::SocketAddr;
use std::sync::Arc;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::plugins::{Inventory, PluginRegistry};

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// The `STATUS=` line for an inventory.
pub fn status_line(inventory: &Inventory, api: SocketAddr) -> String {
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
    format!("{ready} {noun} ready{rejected}; API on {api}")
}

/// Tells the service manager the agent is ready, then keeps its status line current and pings
/// its watchdog until `stop`.
pub async fn run_notifier(registry: Arc<PluginRegistry>, api: SocketAddr, stop: CancellationToken) {
    send(&[NotifyState::Ready]);
    let mut inventory = registry.subscribe();
    let status = status_line(&inventory.borrow_and_update(), api);
    send(&[NotifyState::Status(&status)]);
    tracing::info!("ready: {status}");
    let watchdog = sd_notify::watchdog_enabled();
    let mut ping = watchdog.map(|period| tokio::time::interval(period / 2));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = inventory.changed() => {
                if changed.is_err() {
                    break;
                }
                let status = status_line(&inventory.borrow_and_update(), api);
                send(&[NotifyState::Status(&status)]);
            }
            _ = async { match ping.as_mut() { Some(p) => p.tick().await, None => std::future::pending().await } } => {
                send(&[NotifyState::Watchdog]);
            }
        }
    }
}

/// The agent is re-reading its configuration or plugins (SIGHUP).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
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
