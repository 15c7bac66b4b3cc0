//! Service-manager integration: systemd's notify protocol for `Type=notify` units.
//!
//! `READY=1` once the plugins are loaded and the API listens; `STATUS=` lines an admin sees in
//! `systemctl status` ("3 connectors ready, 1 rejected; cloud connected; API on 127.0.0.1:7878;
//! calls in the last 15 min: …"), updated on every inventory, tunnel or call-summary change;
//! `WATCHDOG=1` pings at half the unit's `WatchdogSec`; `RELOADING=1` and
//! `STOPPING=1` around reloads and drains. A start or reload that waits on slow connectors
//! says so every few seconds (`EXTEND_TIMEOUT_USEC=` with a `STATUS=` of what it waits for),
//! and the drain asks for its grace: systemd's `TimeoutStartSec=` (90 s by default) and the
//! unit's `TimeoutStopSec=` would otherwise kill an agent that is making progress. Without
//! `NOTIFY_SOCKET` (not under systemd, tests) every call is a no-op. Connectors never see
//! `NOTIFY_SOCKET`: their environment is scrubbed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// The service manager waits this much longer for the next message (or for the state to
    /// end), beyond the unit's start, reload or stop timeout.
    ExtendTimeout(Duration),
}

/// Sends `states` over systemd's notify socket. On Windows the service control manager learns
/// of start and stop from the service host (`winservice`), and there is no status line.
fn send(states: &[NotifyState<'_>]) {
    #[cfg(unix)]
    {
        use sd_notify::NotifyState as Sd;
        // sd-notify's own variant takes a u32 of microseconds (71 minutes at most); a drain
        // grace may be up to a day.
        let extend = states.iter().find_map(|s| match s {
            NotifyState::ExtendTimeout(by) => {
                Some(format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
            }
            _ => None,
        });
        let mut sd: Vec<Sd<'_>> = states
            .iter()
            .filter_map(|s| match s {
                NotifyState::Ready => Some(Sd::Ready),
                NotifyState::Status(line) => Some(Sd::Status(line)),
                NotifyState::Watchdog => Some(Sd::Watchdog),
                NotifyState::Reloading => Some(Sd::Reloading),
                NotifyState::Stopping => Some(Sd::Stopping),
                NotifyState::ExtendTimeout(_) => None,
            })
            .collect();
        if let Some(extend) = &extend {
            sd.push(Sd::Custom(extend));
        }
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

/// What the `STATUS=` line is made of, each part kept current by its owner.
#[derive(Clone, Debug)]
pub struct StatusSources {
    /// The connectors.
    pub registry: Arc<PluginRegistry>,
    /// The tunnel's state.
    pub cloud: watch::Receiver<CloudStatus>,
    /// The last period's call summary ("calls in the last 15 min: …"), `None` for a quiet
    /// period or before the first one ends.
    pub calls: watch::Receiver<Option<String>>,
    /// Where the local API listens.
    pub api: SocketAddr,
}

impl StatusSources {
    /// The status line now (marking every part seen, so the notifier waits for the next
    /// change of each).
    pub fn line(&mut self) -> String {
        let cloud = *self.cloud.borrow_and_update();
        let calls = self.calls.borrow_and_update().clone();
        status_line(&self.registry.snapshot(), cloud, self.api, calls.as_deref())
    }
}

/// The `STATUS=` line: "3 connectors ready, 1 rejected; cloud connected; API on
/// 127.0.0.1:7878; calls in the last 15 min: 1234 answered, 7 failed (busy 5, timeout 2)",
/// what `systemctl status` shows first.
pub fn status_line(
    inventory: &Inventory,
    cloud: CloudStatus,
    api: SocketAddr,
    calls: Option<&str>,
) -> String {
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
    let calls = calls.map(|line| format!("; {line}")).unwrap_or_default();
    format!("{ready} {noun} ready{rejected}; {cloud}; API on {api}{calls}")
}

/// Tells the service manager the agent is ready, then keeps its status line current (on every
/// inventory, tunnel or call-summary change) and pings its watchdog until `stop`.
pub async fn run_notifier(mut sources: StatusSources, stop: CancellationToken) {
    send(&[NotifyState::Ready]);
    let mut inventory = sources.registry.subscribe();
    inventory.mark_unchanged();
    let status = sources.line();
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
                inventory.mark_unchanged();
                send(&[NotifyState::Status(&sources.line())]);
            }
            Ok(()) = sources.cloud.changed() => {
                send(&[NotifyState::Status(&sources.line())]);
            }
            Ok(()) = sources.calls.changed() => {
                send(&[NotifyState::Status(&sources.line())]);
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

/// The reload is done; `status` is the agent's status line now.
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// How often a start or reload that is still busy tells the service manager so.
const BUSY_EVERY: Duration = Duration::from_secs(5);

/// How long the service manager is asked to wait for the next word of a busy start or reload:
/// several of [`BUSY_EVERY`], so that a tick late on a loaded machine is no timeout.
const BUSY_WINDOW: Duration = Duration::from_secs(30);

/// What a drain is given beyond its grace to keep the unacknowledged results and exit.
const STOP_MARGIN: Duration = Duration::from_secs(15);

/// Runs `work`, a start-up step or a reload that may wait on connectors (their `info`, up to
/// `plugins.info_timeout_secs` each). Every 5 s while it runs, the service manager is asked
/// to wait 30 s more, and shown `status()` ("starting: 2 connectors loaded; loading …"):
/// `TimeoutStartSec=` bounds how long the agent may take without a word, not how long a folder
/// of slow connectors takes to load. The work itself always ends: each load has its deadline.
pub async fn while_busy<T>(work: impl Future<Output = T>, status: impl Fn() -> String) -> T {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + BUSY_EVERY, BUSY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                let line = status();
                send(&[NotifyState::ExtendTimeout(BUSY_WINDOW), NotifyState::Status(&line)]);
            }
        }
    }
}

/// The agent is draining and will exit: the service manager is asked to give it the grace
/// (which may be longer than the unit's `TimeoutStopSec=`) and a margin.
pub fn stopping(in_flight_grace: Duration) {
    let status = format!("draining: finishing in-flight calls (up to {in_flight_grace:?})");
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&status),
        NotifyState::ExtendTimeout(in_flight_grace.saturating_add(STOP_MARGIN)),
    ]);
}

#[cfg(test)]
mod tests {
    /// The status line `systemctl status` shows: the connectors, the cloud, the API, and the
    /// last period's calls when there were any.
    #[test]
    fn the_status_line_tells_the_last_periods_calls_when_there_were_any() {
        let inventory = crate::plugins::Inventory::default();
        let api = "127.0.0.1:7878".parse().unwrap();
        let standalone = crate::tunnel::CloudStatus::Standalone;
        assert_eq!(
            super::status_line(&inventory, standalone, api, None),
            "0 connectors ready; standalone (no cloud configured); API on 127.0.0.1:7878"
        );
        assert_eq!(
            super::status_line(
                &inventory,
                standalone,
                api,
                Some("calls in the last 15 min: 3 answered")
            ),
            "0 connectors ready; standalone (no cloud configured); API on 127.0.0.1:7878; \
             calls in the last 15 min: 3 answered"
        );
    }
}
