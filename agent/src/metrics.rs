//! Prometheus metrics (`GET /metrics`, OpenMetrics text). Labels are connector ids, capability
//! names, outcomes and statuses: never tenants, never anything a caller sent.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::plugins::{ConnectorStatus, Inventory};

/// A call's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The connector.
    pub app_id: String,
    /// The capability.
    pub capability: String,
    /// `answered` (the connector's document, which may be its own error) or the agent error
    /// code (`timeout`, `busy`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    app_id: String,
    capability: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    in_flight: Gauge,
    worker_restarts: Family<AppLabels, Counter>,
    connectors: Family<StatusLabels, Gauge>,
    revision: Gauge,
    cloud: Family<StatusLabels, Gauge>,
    tunnel_disconnects: Family<ReasonLabels, Counter>,
    token_refreshes: Family<OutcomeLabels, Counter>,
    api_logins: Family<OutcomeLabels, Counter>,
    outbox_results: Gauge,
    outbox_memory: Gauge,
    /// The call metrics of each connector's capabilities, by app_id then capability.
    capability_calls: RwLock<HashMap<String, HashMap<String, CapabilityCalls>>>,
}

/// One capability's call metrics, looked up in the families once and kept: every call records,
/// and a family lookup builds its label strings each time.
#[derive(Debug)]
struct CapabilityCalls {
    latency: Histogram,
    /// A counter per outcome seen so far: `answered` and the few error codes that occurred.
    outcomes: RwLock<Vec<(&'static str, Counter)>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lumos_agent");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Capability calls by connector, capability and outcome",
            calls.clone(),
        );
        // 1 ms .. ~65 s: native calls take microseconds, Python connectors seconds.
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "call_duration_seconds",
            "Capability call latency",
            latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("calls_in_flight", "Calls running now", in_flight.clone());
        let worker_restarts = Family::<AppLabels, Counter>::default();
        registry.register(
            "worker_restarts",
            "Native connector worker processes restarted after dying",
            worker_restarts.clone(),
        );
        let connectors = Family::<StatusLabels, Gauge>::default();
        registry.register("connectors", "Plugin files by status", connectors.clone());
        let revision = Gauge::default();
        registry.register(
            "inventory_revision",
            "Revision of the connector inventory",
            revision.clone(),
        );
        let cloud = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "cloud_status",
            "The tunnel to the Lumos cloud: 1 for the current status (standalone, connecting, connected, unreachable, unauthorized), 0 for the others",
            cloud.clone(),
        );
        let tunnel_disconnects = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tunnel_disconnects",
            "Tunnel connections that ended or failed, by reason (lost, unreachable, unauthorized): each is followed by a reconnect",
            tunnel_disconnects.clone(),
        );
        let token_refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "token_refreshes",
            "OAuth token refreshes by the token broker, by outcome (ok, invalid_grant, config, rate_limited, unavailable)",
            token_refreshes.clone(),
        );
        let api_logins = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "api_logins",
            "Logins to the local API, by outcome (ok, wrong_credentials, no_role, throttled, unavailable, no_users, bad_request): many wrong_credentials or throttled mean someone is guessing",
            api_logins.clone(),
        );
        let outbox_results = Gauge::default();
        registry.register(
            "outbox_results",
            "Results of tunnel calls waiting for the cloud's acknowledgement (a growing number: the cloud is not taking them)",
            outbox_results.clone(),
        );
        let outbox_memory = Gauge::default();
        registry.register(
            "outbox_memory_bytes",
            "Bytes of those results held in memory (the rest are spilled to the state folder; see cloud.outbox_memory_bytes)",
            outbox_memory.clone(),
        );
        Self {
            registry,
            calls,
            latency,
            in_flight,
            worker_restarts,
            connectors,
            revision,
            cloud,
            tunnel_disconnects,
            token_refreshes,
            api_logins,
            outbox_results,
            outbox_memory,
            capability_calls: RwLock::default(),
        }
    }

    /// Counts a call as running until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight {
            metrics: self.clone(),
        }
    }

    /// Every call counted since start, by outcome.
    pub fn call_totals(&self) -> CallTotals {
        let mut totals = CallTotals::new();
        for capabilities in read(&self.capability_calls).values() {
            for calls in capabilities.values() {
                for (outcome, counter) in read(&calls.outcomes).iter() {
                    *totals.entry(outcome).or_default() += counter.get();
                }
            }
        }
        totals
    }

    /// Records a finished call. Callers pass only validated names (a loaded app_id, one of its
    /// capabilities), or `(unknown)`: labels must not be whatever a caller typed.
    pub fn record_call(
        &self,
        app_id: &str,
        capability: &str,
        outcome: &'static str,
        duration: std::time::Duration,
    ) {
        let record = |calls: &CapabilityCalls| {
            calls.latency.observe(duration.as_secs_f64());
            let counted = read(&calls.outcomes)
                .iter()
                .find(|(seen, _)| *seen == outcome)
                .map(|(_, counter)| counter.inc());
            if counted.is_none() {
                let mut outcomes = write(&calls.outcomes);
                // Another call may have added it since the read.
                if let Some((_, counter)) = outcomes.iter().find(|(seen, _)| *seen == outcome) {
                    counter.inc();
                    return;
                }
                let counter = self
                    .calls
                    .get_or_create(&CallLabels {
                        app_id: app_id.to_string(),
                        capability: capability.to_string(),
                        outcome: outcome.to_string(),
                    })
                    .clone();
                counter.inc();
                outcomes.push((outcome, counter));
            }
        };
        if let Some(calls) = read(&self.capability_calls)
            .get(app_id)
            .and_then(|capabilities| capabilities.get(capability))
        {
            return record(calls);
        }
        let mut known = write(&self.capability_calls);
        let calls = known
            .entry(app_id.to_string())
            .or_default()
            .entry(capability.to_string())
            .or_insert_with(|| CapabilityCalls {
                latency: self
                    .latency
                    .get_or_create(&LatencyLabels {
                        app_id: app_id.to_string(),
                        capability: capability.to_string(),
                    })
                    .clone(),
                outcomes: RwLock::default(),
            });
        record(calls);
    }

    /// A native connector's worker was restarted.
    pub fn worker_restarted(&self, app_id: &str) {
        self.worker_restarts
            .get_or_create(&AppLabels {
                app_id: app_id.to_string(),
            })
            .inc();
    }

    /// The tunnel's status now (one of [`crate::tunnel::CloudStatus`]'s names).
    pub fn set_cloud_status(&self, current: &str) {
        for status in crate::tunnel::CloudStatus::ALL {
            self.cloud
                .get_or_create(&StatusLabels {
                    status: status.as_str().to_string(),
                })
                .set(i64::from(status.as_str() == current));
        }
    }

    /// Counts a tunnel connection that ended or failed.
    pub fn tunnel_disconnected(&self, reason: &'static str) {
        self.tunnel_disconnects
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a token refresh by outcome (`ok` or the failure class).
    pub fn token_refreshed(&self, outcome: &'static str) {
        self.token_refreshes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a login to the local API by outcome.
    pub fn api_login(&self, outcome: &'static str) {
        self.api_logins
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The tunnel's outbox now: results waiting for an acknowledgement, and their bytes in
    /// memory. Set at scrape time.
    pub fn set_outbox(&self, results: usize, memory_bytes: u64) {
        self.outbox_results
            .set(i64::try_from(results).unwrap_or(i64::MAX));
        self.outbox_memory
            .set(i64::try_from(memory_bytes).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text, with inventory gauges taken from `inventory` now.
    pub fn render(&self, inventory: &Inventory) -> String {
        for status in [
            ConnectorStatus::Ready,
            ConnectorStatus::Superseded,
            ConnectorStatus::Rejected,
        ] {
            let count = inventory
                .connectors
                .iter()
                .filter(|c| inventory.status_of(c) == status)
                .count();
            let name = match status {
                ConnectorStatus::Ready => "ready",
                ConnectorStatus::Superseded => "superseded",
                ConnectorStatus::Rejected => "rejected",
            };
            self.connectors
                .get_or_create(&StatusLabels {
                    status: name.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.revision
            .set(i64::try_from(inventory.revision).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Calls counted so far, by outcome (`answered` or an agent error code), over every connector
/// and capability.
pub type CallTotals = std::collections::BTreeMap<&'static str, u64>;

/// The log's summary of the calls between two [`Metrics::call_totals`]: "calls in the last
/// 15 min: 1234 answered, 7 failed (busy 5, timeout 2)". `None` when there were none.
pub fn call_summary(before: &CallTotals, now: &CallTotals, period: &str) -> Option<String> {
    let since =
        |outcome: &str, total: u64| total.saturating_sub(*before.get(outcome).unwrap_or(&0));
    let answered = now
        .get("answered")
        .map_or(0, |&total| since("answered", total));
    let failed: Vec<(&str, u64)> = now
        .iter()
        .filter(|(outcome, _)| **outcome != "answered")
        .map(|(outcome, &total)| (*outcome, since(outcome, total)))
        .filter(|(_, count)| *count > 0)
        .collect();
    let failures: u64 = failed.iter().map(|(_, count)| count).sum();
    if answered == 0 && failures == 0 {
        return None;
    }
    let mut line = format!("calls in the last {period}: {answered} answered");
    if failures > 0 {
        let codes: Vec<String> = failed
            .iter()
            .map(|(outcome, count)| format!("{outcome} {count}"))
            .collect();
        line.push_str(&format!(", {failures} failed ({})", codes.join(", ")));
    }
    Some(line)
}

/// A read guard of a lock whose data stays consistent if a holder panicked (each change is one
/// insert): metrics keep counting rather than stop.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// The write guard, as [`read`].
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one running call.
#[derive(Debug)]
pub struct InFlight {
    metrics: Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn calls_are_counted_per_connector_capability_and_outcome() {
        let metrics = Metrics::new();
        for (app, capability, outcome) in [
            ("a", "x", "answered"),
            ("a", "x", "answered"),
            ("a", "x", "timeout"),
            ("a", "y", "answered"),
            ("b", "x", "answered"),
        ] {
            metrics.record_call(app, capability, outcome, Duration::from_millis(3));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        for line in [
            r#"lumos_agent_calls_total{app_id="a",capability="x",outcome="answered"} 2"#,
            r#"lumos_agent_calls_total{app_id="a",capability="x",outcome="timeout"} 1"#,
            r#"lumos_agent_calls_total{app_id="a",capability="y",outcome="answered"} 1"#,
            r#"lumos_agent_calls_total{app_id="b",capability="x",outcome="answered"} 1"#,
            r#"lumos_agent_call_duration_seconds_count{app_id="a",capability="x"} 3"#,
            r#"lumos_agent_call_duration_seconds_count{app_id="b",capability="x"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn the_calls_of_a_period_are_summed_by_outcome_for_the_log() {
        let metrics = Metrics::new();
        let start = metrics.call_totals();
        assert_eq!(call_summary(&start, &metrics.call_totals(), "15 min"), None);
        for (app, capability, outcome) in [
            ("a", "x", "answered"),
            ("a", "y", "answered"),
            ("b", "x", "timeout"),
            ("a", "x", "busy"),
            ("b", "x", "busy"),
        ] {
            metrics.record_call(app, capability, outcome, Duration::from_millis(1));
        }
        let first = metrics.call_totals();
        assert_eq!(
            call_summary(&start, &first, "15 min").as_deref(),
            Some("calls in the last 15 min: 2 answered, 3 failed (busy 2, timeout 1)")
        );
        // The next period counts only its own calls.
        metrics.record_call("a", "x", "answered", Duration::from_millis(1));
        assert_eq!(
            call_summary(&first, &metrics.call_totals(), "15 min").as_deref(),
            Some("calls in the last 15 min: 1 answered")
        );
        // Failures alone are said too.
        let second = metrics.call_totals();
        metrics.record_call("c", "z", "unknown_connector", Duration::from_millis(1));
        assert_eq!(
            call_summary(&second, &metrics.call_totals(), "15 min").as_deref(),
            Some("calls in the last 15 min: 0 answered, 1 failed (unknown_connector 1)")
        );
    }

    /// The README's list of metrics is what dashboards and alerts are built from: it names
    /// every metric `/metrics` serves, and none it does not.
    #[test]
    fn the_readme_names_every_metric_served() {
        let metrics = Metrics::new();
        // A family is served once it has a series: give each one.
        metrics.record_call("a", "x", "answered", Duration::from_millis(3));
        metrics.worker_restarted("a");
        metrics.set_cloud_status("connected");
        metrics.tunnel_disconnected("lost");
        metrics.token_refreshed("ok");
        metrics.api_login("ok");
        metrics.set_outbox(1, 10);
        let text = metrics.render(&Inventory::default());
        // `# TYPE lumos_agent_calls counter`: a counter is served as `<name>_total`.
        let served: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(name, kind)| match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_string(),
            })
            .collect();
        // Every family registered is in the text (a new one needs a series above).
        let registered = include_str!("metrics.rs")
            .matches(concat!("registry", ".register("))
            .count();
        assert_eq!(served.len(), registered, "{text}");
        let named: std::collections::BTreeSet<String> = crate::readme::TEXT
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("lumos_agent_"))
            .map(str::to_owned)
            .collect();
        assert_eq!(named, served);
    }
}
