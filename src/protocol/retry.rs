//! What the claim's holder does after a call to Xero failed with an error that a later call may
//! not meet (docs/protocol.md, P26, P27): call again within the claim, or release it with a wait
//! that every party honours. Pure: the clock, the claim's end and the random part of each delay
//! are given.
//!
//! A claim holds at most [`MAX_CALLS_PER_CLAIM`] calls ([`MAX_CALLS_UNREACHED`] when Xero could
//! not be reached at all: nothing left, so trying again at once is pointless), and every call
//! must fit in the claim ([`LEASE_MARGIN`], [`MIN_CALL`]). Past either bound, the backoff stored
//! in the Secret takes over: a Xero that fails for good costs a few calls per claim, and claims
//! come ever more rarely (10 s doubling to 5 minutes), whatever the lease.

use std::time::{Duration, SystemTime};

/// Calls to Xero one claim holds at most (the first and two retries). A 429 counts: it is a call.
pub const MAX_CALLS_PER_CLAIM: u32 = 3;
/// Calls one claim holds when Xero could not be reached (refused, no such name).
pub const MAX_CALLS_UNREACHED: u32 = 1;
/// The holder stops calling this long before its claim ends, so it can still store or release
/// before another party may take over.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// The shortest call worth making: with less of the claim left, it is released instead.
pub const MIN_CALL: Duration = Duration::from_secs(1);

/// How a call failed, as far as the next step goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 429: Xero said when to come back.
    RateLimited { retry_after: Duration },
    /// A 5xx, no answer, an unusable answer, `temporarily_unavailable`: may pass.
    Transient,
    /// No connection could be made at all.
    Unreached,
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then call again within the same claim.
    CallAgain { after: Duration },
    /// Release the claim with `retry-not-before` (and, after transient failures, the raised
    /// `failed-attempts`): nobody calls before then.
    Release {
        not_before: SystemTime,
        failed_attempts: Option<u32>,
    },
}

/// The step after call number `calls` (1-based) of a claim ending at `lease_end` failed with
/// `failure` at `now`. `retry_delay` is the drawn delay before another call within the claim
/// (P27: 200 ms doubling to 5 s, jittered); `backoff` the drawn wait across claims for the
/// `failed_attempts` the Secret holds plus this one (P27: 10 s doubling to 5 minutes, jittered).
pub fn after_failed_call(
    failure: Failure,
    calls: u32,
    now: SystemTime,
    lease_end: SystemTime,
    failed_attempts: u32,
    retry_delay: Duration,
    backoff: Duration,
) -> Next {
    let limit = match failure {
        Failure::Unreached => MAX_CALLS_UNREACHED,
        Failure::RateLimited { .. } | Failure::Transient => MAX_CALLS_PER_CLAIM,
    };
    let wait = match failure {
        Failure::RateLimited { retry_after } => retry_after,
        Failure::Transient | Failure::Unreached => retry_delay,
    };
    let fits = now
        .checked_add(wait + LEASE_MARGIN + MIN_CALL)
        .is_some_and(|end| end < lease_end);
    if calls < limit && fits {
        return Next::CallAgain { after: wait };
    }
    match failure {
        Failure::RateLimited { retry_after } => Next::Release {
            not_before: now + retry_after,
            failed_attempts: None,
        },
        Failure::Transient | Failure::Unreached => Next::Release {
            not_before: now + backoff,
            failed_attempts: Some(failed_attempts.saturating_add(1)),
        },
    }
}

/// How long a call sent at `now` under a claim that ends at `lease_end` may take, at most
/// `timeout`: it is cut [`LEASE_MARGIN`] before the claim ends, so the holder can still store or
/// release before another party may claim, and two parties never wait on Xero with one refresh
/// token at once (an answer cut off this way may have been processed: the next party recovers
/// it through Xero's grace period). `None` when less than [`MIN_CALL`] is left: release
/// instead.
pub fn call_window(now: SystemTime, lease_end: SystemTime, timeout: Duration) -> Option<Duration> {
    let left = lease_end
        .duration_since(now)
        .unwrap_or_default()
        .saturating_sub(LEASE_MARGIN);
    (left >= MIN_CALL).then(|| timeout.min(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn a_claim_holds_three_calls_at_most_whatever_its_length() {
        // The CRD's longest lease: 600 s of claim, still three calls.
        let lease_end = t(600);
        let next =
            |calls| after_failed_call(Failure::Transient, calls, t(0), lease_end, 0, S / 5, 10 * S);
        assert_eq!(next(1), Next::CallAgain { after: S / 5 });
        assert_eq!(next(2), Next::CallAgain { after: S / 5 });
        assert_eq!(
            next(3),
            Next::Release {
                not_before: t(10),
                failed_attempts: Some(1)
            }
        );
    }

    #[test]
    fn an_unreachable_xero_is_called_once_per_claim() {
        assert_eq!(
            after_failed_call(Failure::Unreached, 1, t(0), t(600), 4, S / 5, 160 * S),
            Next::Release {
                not_before: t(160),
                failed_attempts: Some(5)
            }
        );
    }

    #[test]
    fn no_call_that_cannot_fit_in_the_claim() {
        // 30 s claim, 27 s in: a 200 ms delay plus a 1 s call plus the 2 s margin do not fit.
        assert!(matches!(
            after_failed_call(Failure::Transient, 1, t(27), t(30), 0, S / 5, 10 * S),
            Next::Release { .. }
        ));
        assert_eq!(
            after_failed_call(Failure::Transient, 1, t(26), t(30), 0, S / 5, 10 * S),
            Next::CallAgain { after: S / 5 }
        );
    }

    #[test]
    fn a_rate_limit_is_waited_out_in_the_claim_or_published() {
        let limited = Failure::RateLimited { retry_after: 5 * S };
        assert_eq!(
            after_failed_call(limited, 1, t(0), t(30), 2, S, 10 * S),
            Next::CallAgain { after: 5 * S }
        );
        // Too long for the claim: published as retry-not-before, no failure counted.
        let long = Failure::RateLimited {
            retry_after: 60 * S,
        };
        assert_eq!(
            after_failed_call(long, 1, t(0), t(30), 2, S, 10 * S),
            Next::Release {
                not_before: t(60),
                failed_attempts: None
            }
        );
        // The third 429 of a claim: published too.
        assert!(matches!(
            after_failed_call(limited, 3, t(0), t(600), 2, S, 10 * S),
            Next::Release {
                failed_attempts: None,
                ..
            }
        ));
    }

    #[test]
    fn no_call_outlives_the_claim() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let s = Duration::from_secs(1);
        // 30 s left: the timeout rules; 10 s left: cut 2 s before the end.
        assert_eq!(call_window(now, now + 30 * s, 10 * s), Some(10 * s));
        assert_eq!(call_window(now, now + 10 * s, 10 * s), Some(8 * s));
        assert_eq!(call_window(now, now + 3 * s, 10 * s), Some(s));
        assert_eq!(
            call_window(now, now + 3 * s - Duration::from_millis(1), 10 * s),
            None
        );
        assert_eq!(call_window(now, now - s, 10 * s), None);
    }
}
