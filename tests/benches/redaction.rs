//! What redacting one line of a native connector's log or stderr costs, with the secrets of few
//! and of the most (1 024) distinct envelope parts remembered, for a line with no secret (the
//! usual line) and one that leaks a remembered secret. Only the public API, so the same file
//! measures an older commit for a baseline.
//!
//! ```text
//! cargo bench -p lumos-agent-integration --bench redaction            # 2 000 lines per case
//! ```
#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::time::{Duration, Instant};

use lumos_agent::redact::{RecentSecrets, SecretSpans};

fn envelope(i: usize) -> String {
    format!(
        r#"{{"request":{{}},"auth":{{"oauth":{{"access_token":"at-{i}-0f3a9c1e7b5d"}}}},"credentials":[{{"id":"main","oauth":{{"access_token":"cred-{i}-9e8d7c6b5a4f3e2d","refresh_token":"rt-{i}-a1b2c3d4e5f6"}}}}]}}"#
    )
}

/// The median time of `redact(line)` over `n` runs.
fn median(recent: &RecentSecrets, line: &str, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let at = Instant::now();
            std::hint::black_box(recent.redact(std::hint::black_box(line)));
            at.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[n / 2]
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let clean = "call 1234 of list_accounts answered 250 accounts after 3 pages in 412 ms; next page cursor follows ".repeat(2);
    println!(
        "redacting one line of {} bytes, median of {n} runs",
        clean.len()
    );
    // Envelopes of 1 tenant, and of 512 (two secret-bearing parts each: 1 024 parts, the most
    // a connector remembers).
    for tenants in [1, 512] {
        let recent = RecentSecrets::default();
        for i in 0..tenants {
            let text = envelope(i);
            // Calls that have ended: their parts stay until newer ones crowd them out.
            drop(recent.remember(
                "list_accounts",
                text.as_bytes(),
                &SecretSpans::find(text.as_bytes()),
            ));
        }
        let leaking = format!("{clean} token cred-0-9e8d7c6b5a4f3e2d");
        assert!(recent.redact(&leaking).ends_with("token [redacted]"));
        assert_eq!(recent.redact(&clean), clean);
        for (what, line) in [("no secret", &clean), ("one secret", &leaking)] {
            let took = median(&recent, line, n);
            println!(
                "{tenants:>4} tenant(s) remembered, {what:<10}: {:>9.2} µs",
                took.as_secs_f64() * 1e6
            );
        }
    }
}
