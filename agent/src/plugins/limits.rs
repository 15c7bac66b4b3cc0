//! A loaded connector's call limits (`calls.max_concurrency`, `calls.timeout_secs` and their
//! `[connectors.<app_id>]` overrides), changed in place by a reload: a new limit applies to
//! the version serving now, a retained one included, without loading the connector again.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// How many calls a connector may run at once, and their deadline.
#[derive(Debug)]
pub struct CallLimits {
    slots: Semaphore,
    /// The configured maximum.
    max: AtomicUsize,
    /// Slots to retire as their calls end: a lowered maximum while more calls were running.
    /// Every operation keeps `available + running - owed == max`.
    owed: AtomicUsize,
    /// The deadline, in milliseconds (read per call; written only by a reload).
    timeout_ms: AtomicU64,
}

/// One running call's place among its connector's [`CallLimits`]; given back (or retired,
/// after the maximum was lowered) when dropped. It borrows the limits: a call holds its
/// connector's record anyway, and a borrow costs no shared reference count per call.
#[derive(Debug)]
pub struct CallSlot<'a> {
    permit: Option<SemaphorePermit<'a>>,
    limits: &'a CallLimits,
}

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            if self.limits.pay_one() {
                permit.forget();
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl CallLimits {
    /// `max` calls at once, each with `timeout`.
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self {
            slots: Semaphore::new(max),
            max: AtomicUsize::new(max),
            owed: AtomicUsize::new(0),
            timeout_ms: AtomicU64::new(millis(timeout)),
        }
    }

    /// A place for one more call, or `None` at the maximum.
    pub fn try_acquire(&self) -> Option<CallSlot<'_>> {
        let permit = self.slots.try_acquire().ok()?;
        Some(CallSlot {
            permit: Some(permit),
            limits: self,
        })
    }

    /// The maximum in force.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// The calls' deadline in force.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Places free now (for tests and the API).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }

    /// Calls running now (those of a lowered maximum included, until they end).
    pub fn running(&self) -> usize {
        // available + running - owed == max, read apart: a moment's skew is harmless here.
        (self.max() + self.owed.load(Ordering::Acquire)).saturating_sub(self.available())
    }

    /// New limits. A raised maximum frees places at once; a lowered one retires free places
    /// now and the rest as running calls end (those are never cut short). Whether anything
    /// changed.
    pub fn set(&self, max: usize, timeout: Duration) -> bool {
        let timeout_ms = millis(timeout);
        let timeout_changed = self.timeout_ms.swap(timeout_ms, Ordering::Relaxed) != timeout_ms;
        let old = self.max.swap(max, Ordering::AcqRel);
        if max > old {
            // Places still owed from an earlier cut are simply not retired.
            let add = max - old;
            let forgiven = self.take_owed(add);
            self.slots.add_permits(add - forgiven);
        } else if max < old {
            let cut = old - max;
            let retired = self.slots.forget_permits(cut);
            self.owed.fetch_add(cut - retired, Ordering::AcqRel);
            // A call that ended between the two took its place back instead of retiring it.
            let late = self.slots.forget_permits(self.owed.load(Ordering::Acquire));
            self.take_owed(late);
        }
        timeout_changed || max != old
    }

    /// Takes up to `n` owed places off the debt; how many.
    fn take_owed(&self, n: usize) -> usize {
        let mut taken = 0;
        let _ = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                taken = owed.min(n);
                Some(owed - taken)
            });
        taken
    }

    /// Whether an ending call's place is retired (one is owed) rather than given back.
    fn pay_one(&self) -> bool {
        // A load first: with nothing owed, as almost always, no write to a shared line.
        self.owed.load(Ordering::Acquire) > 0 && self.take_owed(1) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn a_raised_limit_frees_places_at_once() {
        let limits = CallLimits::new(1, T);
        let first = limits.try_acquire().unwrap();
        assert!(limits.try_acquire().is_none());
        assert!(limits.set(3, T));
        let (_second, _third) = (limits.try_acquire().unwrap(), limits.try_acquire().unwrap());
        assert!(limits.try_acquire().is_none());
        drop(first);
        assert_eq!(limits.available(), 1);
        assert!(!limits.set(3, T), "nothing changed");
    }

    #[test]
    fn a_lowered_limit_lets_running_calls_end_and_retires_their_places() {
        let limits = CallLimits::new(4, T);
        let running: Vec<CallSlot> = (0..3).map(|_| limits.try_acquire().unwrap()).collect();
        // 3 running, 1 free: lowered to 1, the free place goes now, two more as calls end.
        assert!(limits.set(1, Duration::from_secs(5)));
        assert_eq!(
            (limits.max(), limits.timeout()),
            (1, Duration::from_secs(5))
        );
        assert_eq!(limits.available(), 0);
        let mut running = running.into_iter();
        assert_eq!(limits.running(), 3);
        drop(running.next());
        assert_eq!(limits.available(), 0, "retired, not given back");
        assert_eq!(limits.running(), 2);
        drop(running.next());
        assert_eq!(limits.available(), 0, "retired, not given back");
        drop(running.next());
        assert_eq!(limits.available(), 1, "the one place of the new limit");
        let _one = limits.try_acquire().unwrap();
        assert!(limits.try_acquire().is_none());
    }

    #[test]
    fn raising_again_before_the_calls_end_forgives_what_is_owed() {
        let limits = CallLimits::new(3, T);
        let running: Vec<CallSlot> = (0..3).map(|_| limits.try_acquire().unwrap()).collect();
        limits.set(1, T); // two owed
        limits.set(2, T); // one forgiven: one owed
        drop(running);
        assert_eq!(limits.available(), 2);
        limits.set(5, T);
        assert_eq!(limits.available(), 5);
    }
}
