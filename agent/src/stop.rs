//! What stops a call before it ends by itself.

use tokio_util::sync::CancellationToken;

/// A call stops when its caller cancels it (the cloud's `Cancel`, the agent quitting) or when
/// its connector version's drain grace runs out (the version was replaced or removed),
/// whichever comes first.
///
/// Two borrowed tokens rather than a child token of one: making and dropping a child token
/// locks its parent's list of children, and a version's drain token is the parent of every
/// call that version runs, on every worker thread at once.
#[derive(Debug, Clone, Copy)]
pub struct CallStop<'a> {
    caller: &'a CancellationToken,
    drain: Option<&'a CancellationToken>,
}

impl<'a> CallStop<'a> {
    /// Stopped by `caller` or by `drain`.
    pub fn new(caller: &'a CancellationToken, drain: &'a CancellationToken) -> Self {
        Self {
            caller,
            drain: Some(drain),
        }
    }

    /// Stopped by `caller` alone.
    pub fn by(caller: &'a CancellationToken) -> Self {
        Self {
            caller,
            drain: None,
        }
    }

    /// Completes when the call is to stop.
    pub async fn stopped(self) {
        match self.drain {
            Some(drain) => tokio::select! {
                () = self.caller.cancelled() => {}
                () = drain.cancelled() => {}
            },
            None => self.caller.cancelled().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    fn is_stopped(stop: CallStop<'_>) -> bool {
        stop.stopped().now_or_never().is_some()
    }

    #[test]
    fn either_token_stops_the_call() {
        for drained in [false, true] {
            let (caller, drain) = (CancellationToken::new(), CancellationToken::new());
            let stop = CallStop::new(&caller, &drain);
            assert!(!is_stopped(stop));
            if drained {
                drain.cancel();
            } else {
                caller.cancel();
            }
            assert!(is_stopped(stop), "drained: {drained}");
        }
        let caller = CancellationToken::new();
        let stop = CallStop::by(&caller);
        assert!(!is_stopped(stop));
        caller.cancel();
        assert!(is_stopped(stop));
    }

    #[tokio::test]
    async fn a_waiting_call_is_woken_by_either_token() {
        for drained in [false, true] {
            let (caller, drain) = (CancellationToken::new(), CancellationToken::new());
            let waiting = tokio::spawn({
                let (caller, drain) = (caller.clone(), drain.clone());
                async move { CallStop::new(&caller, &drain).stopped().await }
            });
            tokio::task::yield_now().await;
            if drained {
                drain.cancel();
            } else {
                caller.cancel();
            }
            // A guard against a hang, not a timing: waking takes microseconds.
            tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
                .await
                .expect("the waiting call was not woken")
                .unwrap();
        }
    }
}
