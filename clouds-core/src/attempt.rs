//! The retry policy of one call, as a plain state machine: it counts attempts and free
//! re-routes, remembers the providers tried, and says what follows each outcome. It does no
//! I/O and reads no clock of its own; `Client::invoke` drives it (publishes, waits, sleeps) and
//! applies its verdicts to the balancer.
//!
//! An attempt is used up by a timeout, a Redis error, an overloaded provider when no untried
//! one is left, or finding no provider at all. A call that certainly did not run (the PUBLISH
//! reached nobody, the provider refused it as overloaded or stopping) is re-routed at once at
//! no cost, up to [`FREE_REROUTES`] times per call.

use std::time::Duration;

use crate::error::Error;
use crate::node_id::NodeId;

/// Re-routes per call that cost no attempt (the call certainly did not run); bounded so a
/// flapping set of providers cannot keep a call looping.
pub(crate) const FREE_REROUTES: u32 = 16;

/// How one attempt on a provider ended (a reply with a result ends the call instead).
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The provider refused: at its in-flight limit.
    Overloaded,
    /// The provider refused: it is shutting down.
    ShuttingDown,
    /// The PUBLISH reached nobody: the provider's channel is gone.
    NotDelivered,
    /// No reply within the attempt's timeout.
    TimedOut,
    /// The attempt failed before a reply (a Redis error).
    Failed(Error),
}

/// What the caller should now believe about the provider it tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing new (it was busy, or the failure was not its fault).
    Unchanged,
    /// It did not answer in time: avoid it while others are healthy.
    Suspect,
    /// Its channel is gone: drop it until it announces itself again.
    Gone,
    /// It is leaving: drop it.
    Leaving,
}

/// What the call does next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Try another provider at once; the attempt was not counted.
    Reroute,
    /// Try again, counting a new attempt: after a backoff pause if `pause`, after re-reading
    /// the registry if `refresh`.
    Retry { pause: bool, refresh: bool },
    /// Give up with this error.
    Fail(Error),
}

/// One call's attempts.
#[derive(Debug)]
pub(crate) struct Attempts<'m> {
    method: &'m str,
    max: u32,
    used: u32,
    free_reroutes: u32,
    tried: Vec<NodeId>,
}

impl<'m> Attempts<'m> {
    /// A call of `method` allowed `retries` more attempts after the first.
    pub(crate) fn new(method: &'m str, retries: u32) -> Self {
        Attempts {
            method,
            max: retries.saturating_add(1),
            used: 0,
            free_reroutes: 0,
            tried: Vec::new(),
        }
    }

    /// Attempts counted so far.
    pub(crate) fn used(&self) -> u32 {
        self.used
    }

    /// Providers tried so far, that the balancer should avoid while others are left.
    pub(crate) fn tried(&self) -> &[NodeId] {
        &self.tried
    }

    /// Counts an attempt being sent.
    pub(crate) fn start(&mut self) {
        self.used += 1;
    }

    /// Whether this is still the call's first look for providers.
    pub(crate) fn is_first(&self) -> bool {
        self.used == 0
    }

    /// Nobody provides the method right now: wait for one to join, then look again.
    pub(crate) fn no_provider(&mut self) -> Next {
        self.used += 1;
        if self.used >= self.max {
            return Next::Fail(self.no_provider_error());
        }
        Next::Retry {
            pause: true,
            refresh: true,
        }
    }

    /// Reading the registry failed with `error`.
    pub(crate) fn lookup_failed(&mut self, error: Error) -> Next {
        self.used += 1;
        if self.used >= self.max {
            return Next::Fail(error);
        }
        Next::Retry {
            pause: true,
            refresh: true,
        }
    }

    /// What follows `outcome` on `provider`. `has_untried` says whether the balancer knows a
    /// provider not in the given list; `elapsed` is the time spent on the call so far.
    pub(crate) fn after(
        &mut self,
        provider: &NodeId,
        outcome: Outcome,
        has_untried: impl FnOnce(&[NodeId]) -> bool,
        elapsed: Duration,
    ) -> (Verdict, Next) {
        let (verdict, failure) = match outcome {
            Outcome::Overloaded => {
                self.remember(provider);
                if self.free_reroutes < FREE_REROUTES && has_untried(&self.tried) {
                    return (Verdict::Unchanged, self.reroute());
                }
                let error = Error::Overloaded {
                    method: self.method.to_string(),
                    attempts: self.used,
                };
                (Verdict::Unchanged, error)
            }
            Outcome::ShuttingDown => {
                if self.free_reroutes < FREE_REROUTES {
                    return (Verdict::Leaving, self.reroute());
                }
                (Verdict::Leaving, self.no_provider_error())
            }
            Outcome::NotDelivered => {
                if self.free_reroutes < FREE_REROUTES {
                    return (Verdict::Gone, self.reroute());
                }
                self.remember(provider);
                return (Verdict::Gone, self.retry_or_fail(false, true, None));
            }
            Outcome::TimedOut => {
                let error = Error::Timeout {
                    method: self.method.to_string(),
                    after: elapsed,
                    attempts: self.used,
                };
                (Verdict::Suspect, error)
            }
            Outcome::Failed(error @ (Error::TooLarge { .. } | Error::Codec { .. })) => {
                return (Verdict::Unchanged, Next::Fail(error));
            }
            Outcome::Failed(error) => (Verdict::Unchanged, error),
        };
        self.remember(provider);
        let pause = matches!(failure, Error::Redis(_) | Error::Overloaded { .. });
        (verdict, self.retry_or_fail(pause, false, Some(failure)))
    }

    fn remember(&mut self, provider: &NodeId) {
        if !self.tried.contains(provider) {
            self.tried.push(provider.clone());
        }
    }

    fn reroute(&mut self) -> Next {
        // The attempt just sent is not counted: the call certainly did not run.
        self.used -= 1;
        self.free_reroutes += 1;
        Next::Reroute
    }

    fn retry_or_fail(&self, pause: bool, refresh: bool, failure: Option<Error>) -> Next {
        if self.used >= self.max {
            return Next::Fail(failure.unwrap_or_else(|| self.no_provider_error()));
        }
        Next::Retry { pause, refresh }
    }

    fn no_provider_error(&self) -> Error {
        Error::NoProvider {
            method: self.method.to_string(),
            attempts: self.used,
        }
    }
}

/// Waits between attempts that found nothing to call: 25 ms doubling, at most a heartbeat.
pub(crate) fn backoff(attempt: u32, heartbeat: Duration) -> Duration {
    let exp = Duration::from_millis(25).saturating_mul(1 << attempt.min(10));
    exp.min(heartbeat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportError;

    fn id(name: &str) -> NodeId {
        NodeId::from(name)
    }

    const T: Duration = Duration::from_millis(100);

    fn redis_error() -> Error {
        Error::Redis(TransportError::Command {
            command: "PUBLISH",
            reason: "connection lost".into(),
        })
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let hb = Duration::from_secs(2);
        assert!(backoff(1, hb) < backoff(2, hb));
        assert_eq!(backoff(1, hb), Duration::from_millis(50));
        assert_eq!(backoff(30, hb), hb);
    }

    #[test]
    fn a_timeout_suspects_the_provider_and_retries_elsewhere_then_fails() {
        let mut a = Attempts::new("m.x", 1);
        a.start();
        let (verdict, next) = a.after(&id("p1"), Outcome::TimedOut, |_| true, T);
        assert_eq!(verdict, Verdict::Suspect);
        assert!(matches!(
            next,
            Next::Retry {
                pause: false,
                refresh: false
            }
        ));
        assert_eq!(a.tried(), &[id("p1")]);
        a.start();
        let (verdict, next) = a.after(&id("p2"), Outcome::TimedOut, |_| true, 2 * T);
        assert_eq!(verdict, Verdict::Suspect);
        match next {
            Next::Fail(Error::Timeout {
                attempts,
                after,
                method,
            }) => {
                assert_eq!((attempts, after, method.as_str()), (2, 2 * T, "m.x"));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn nobody_received_is_rerouted_at_no_cost_up_to_the_bound() {
        let mut a = Attempts::new("m.x", 0);
        for _ in 0..FREE_REROUTES {
            a.start();
            let (verdict, next) = a.after(&id("gone"), Outcome::NotDelivered, |_| true, T);
            assert_eq!(verdict, Verdict::Gone);
            assert!(matches!(next, Next::Reroute));
            assert_eq!(a.used(), 0, "not counted");
        }
        a.start();
        let (verdict, next) = a.after(&id("gone"), Outcome::NotDelivered, |_| true, T);
        assert_eq!(verdict, Verdict::Gone);
        assert!(matches!(
            next,
            Next::Fail(Error::NoProvider { attempts: 1, .. })
        ));
    }

    #[test]
    fn nobody_received_past_the_bound_refreshes_when_attempts_are_left() {
        let mut a = Attempts::new("m.x", 3);
        for _ in 0..FREE_REROUTES {
            a.start();
            a.after(&id("gone"), Outcome::NotDelivered, |_| true, T);
        }
        a.start();
        let (_, next) = a.after(&id("gone"), Outcome::NotDelivered, |_| true, T);
        assert!(matches!(
            next,
            Next::Retry {
                pause: false,
                refresh: true
            }
        ));
    }

    #[test]
    fn overloaded_goes_to_an_untried_provider_for_free() {
        let mut a = Attempts::new("m.x", 0);
        a.start();
        let (verdict, next) = a.after(
            &id("busy"),
            Outcome::Overloaded,
            |tried| {
                assert_eq!(tried, &[id("busy")], "the busy one counts as tried");
                true
            },
            T,
        );
        assert_eq!(verdict, Verdict::Unchanged);
        assert!(matches!(next, Next::Reroute));
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn overloaded_everywhere_fails_as_overloaded_after_a_pause() {
        let mut a = Attempts::new("m.x", 1);
        a.start();
        let (_, next) = a.after(&id("busy"), Outcome::Overloaded, |_| false, T);
        assert!(matches!(
            next,
            Next::Retry {
                pause: true,
                refresh: false
            }
        ));
        a.start();
        let (_, next) = a.after(&id("busy"), Outcome::Overloaded, |_| false, T);
        assert!(matches!(
            next,
            Next::Fail(Error::Overloaded { attempts: 2, .. })
        ));
    }

    #[test]
    fn a_stopping_provider_is_dropped_and_the_call_rerouted() {
        let mut a = Attempts::new("m.x", 0);
        a.start();
        let (verdict, next) = a.after(&id("leaving"), Outcome::ShuttingDown, |_| false, T);
        assert_eq!(verdict, Verdict::Leaving);
        assert!(matches!(next, Next::Reroute));
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn redis_errors_are_retried_after_a_pause() {
        let mut a = Attempts::new("m.x", 1);
        a.start();
        let (verdict, next) = a.after(&id("p"), Outcome::Failed(redis_error()), |_| true, T);
        assert_eq!(verdict, Verdict::Unchanged, "not the provider's fault");
        assert!(matches!(
            next,
            Next::Retry {
                pause: true,
                refresh: false
            }
        ));
        a.start();
        let (_, next) = a.after(&id("p"), Outcome::Failed(redis_error()), |_| true, T);
        assert!(matches!(next, Next::Fail(Error::Redis(_))));
    }

    #[test]
    fn errors_that_would_repeat_are_not_retried() {
        let mut a = Attempts::new("m.x", 5);
        a.start();
        let too_large = Error::TooLarge {
            what: "the call".into(),
            size: 10,
            max: 1,
        };
        let (_, next) = a.after(&id("p"), Outcome::Failed(too_large), |_| true, T);
        assert!(matches!(next, Next::Fail(Error::TooLarge { .. })));
    }

    #[test]
    fn no_provider_waits_and_looks_again_until_attempts_run_out() {
        let mut a = Attempts::new("m.x", 2);
        assert!(a.is_first());
        assert!(matches!(
            a.no_provider(),
            Next::Retry {
                pause: true,
                refresh: true
            }
        ));
        assert!(!a.is_first());
        assert!(matches!(a.no_provider(), Next::Retry { .. }));
        assert!(matches!(
            a.no_provider(),
            Next::Fail(Error::NoProvider { attempts: 3, .. })
        ));
    }

    #[test]
    fn a_failed_lookup_counts_and_returns_its_error_at_the_end() {
        let mut a = Attempts::new("m.x", 1);
        assert!(matches!(
            a.lookup_failed(redis_error()),
            Next::Retry {
                pause: true,
                refresh: true
            }
        ));
        assert!(matches!(
            a.lookup_failed(redis_error()),
            Next::Fail(Error::Redis(_))
        ));
    }

    #[test]
    fn tried_providers_are_remembered_once() {
        let mut a = Attempts::new("m.x", 5);
        for _ in 0..3 {
            a.start();
            a.after(&id("p"), Outcome::TimedOut, |_| true, T);
        }
        assert_eq!(a.tried(), &[id("p")]);
    }
}
