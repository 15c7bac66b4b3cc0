//! Failed logins slow down the next ones, per user name: the first [`FREE_FAILURES`] cost
//! nothing more, then each failure shuts that name out for twice as long as the one before
//! (1 s, 2 s, 4 s, … up to [`MAX_LOCKOUT`]). A success clears the name.
//!
//! Per name, not per address: the API listens on loopback, where every caller has the same
//! address. Unknown names are counted like known ones, so the refusal tells nothing about who
//! exists. A shut-out attempt is refused before its password is checked, which also bounds
//! what a guesser costs the agent. The price is that a guesser can keep a real user out for
//! up to [`MAX_LOCKOUT`] at a time; the admin token is never throttled.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Failures of a name before any wait.
pub const FREE_FAILURES: u32 = 5;
/// The longest a name is shut out after a failure.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(300);
/// Names remembered at most; beyond, the one that failed longest ago is forgotten (one that is
/// shut out only when every name is).
const MAX_NAMES: usize = 10_000;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    /// No attempt before this.
    until: Instant,
    last: Instant,
}

/// Failed logins by user name (lower case).
#[derive(Default)]
pub struct LoginThrottle {
    names: Mutex<HashMap<String, Failures>>,
}

impl std::fmt::Debug for LoginThrottle {
    // User names that failed are not for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle")
            .field("names", &self.names().len())
            .finish()
    }
}

impl LoginThrottle {
    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long `user` must wait before a login may be tried; `None`: now.
    pub fn wait(&self, user: &str) -> Option<Duration> {
        let now = Instant::now();
        self.names()
            .get(user)
            .map(|f| f.until.saturating_duration_since(now))
            .filter(|wait| !wait.is_zero())
    }

    /// A failed login of `user`.
    pub fn failed(&self, user: &str) {
        let now = Instant::now();
        let mut names = self.names();
        if names.len() >= MAX_NAMES && !names.contains_key(user) {
            if let Some(oldest) = names
                .iter()
                .min_by_key(|(_, f)| (f.until > now, f.last))
                .map(|(name, _)| name.clone())
            {
                names.remove(&oldest);
            }
        }
        let entry = names.entry(user.to_string()).or_insert(Failures {
            count: 0,
            until: now,
            last: now,
        });
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        if entry.count >= FREE_FAILURES {
            let doublings = (entry.count - FREE_FAILURES).min(16);
            entry.until = now + Duration::from_secs(1u64 << doublings).min(MAX_LOCKOUT);
        }
    }

    /// A successful login of `user`: its failures are forgotten.
    pub fn succeeded(&self, user: &str) {
        self.names().remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_past_the_free_ones_double_the_wait_up_to_the_maximum() {
        let throttle = LoginThrottle::default();
        for _ in 0..FREE_FAILURES - 1 {
            throttle.failed("olga");
            assert_eq!(throttle.wait("olga"), None);
        }
        let mut expected = Duration::from_secs(1);
        for _ in 0..12 {
            throttle.failed("olga");
            assert_eq!(throttle.wait("olga"), Some(expected));
            // Another name is not held back.
            assert_eq!(throttle.wait("ann"), None);
            tokio::time::advance(expected).await;
            assert_eq!(throttle.wait("olga"), None);
            expected = (expected * 2).min(MAX_LOCKOUT);
        }
        assert_eq!(expected, MAX_LOCKOUT);
        throttle.succeeded("olga");
        throttle.failed("olga");
        assert_eq!(
            throttle.wait("olga"),
            None,
            "a success starts the count again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_names_forgets_the_oldest_and_keeps_a_name_that_is_shut_out() {
        let throttle = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            throttle.failed("target");
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        for i in 0..MAX_NAMES {
            tokio::time::advance(Duration::from_micros(1)).await;
            throttle.failed(&format!("spray-{i}"));
        }
        assert_eq!(throttle.names().len(), MAX_NAMES);
        assert!(
            throttle.wait("target").is_some(),
            "spraying names frees no one"
        );
        assert!(!throttle.names().contains_key("spray-0"));
        assert!(throttle
            .names()
            .contains_key(&format!("spray-{}", MAX_NAMES - 1)));
    }
}
