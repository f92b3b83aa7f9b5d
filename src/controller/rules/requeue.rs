//! When a reconcile looks at a connection again: the one decision of its requeue, pure.
//!
//! The token step says what it is waiting for ([`Next`]): the token's due time, or a delay of
//! its own (an error's recheck, a refusal's). The requeue is counted at the end of the
//! reconcile, so that the steps after the token step (tenants, status) do not make it late,
//! and a backoff after failures stretches it.

use std::time::{Duration, SystemTime};

use crate::protocol::decide::PRODUCER_CLAIM_LEAD;

/// A connection's reconcile is scheduled this long before its token is due: it reads what it
/// needs and claims the refresh ahead ([`PRODUCER_CLAIM_LEAD`]), then calls Xero at the due
/// time itself, so consumers at the moment of expiry wait on neither a reconcile's reads nor the
/// claim's write. Long enough for a reconcile's reads under load (8-15 ms measured), short
/// enough that a reconcile slot never idles for long; within the lead, so a reconcile woken by
/// its requeue always claims.
pub const PREWAKE: Duration = Duration::from_millis(30);
const _: () = assert!(PREWAKE.as_micros() <= PRODUCER_CLAIM_LEAD.as_micros());
/// The shortest requeue after a usable token whose due time has already passed (a token
/// stored with next to no lifetime): never a loop of instant reconciles.
pub const MIN_REQUEUE: Duration = Duration::from_millis(200);
/// The requeue for a token due within [`PREWAKE`]: a reconcile then claims ahead at once.
pub const AT_ONCE: Duration = Duration::from_millis(1);

/// What the reconcile waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The usable token is due for a refresh at this time.
    Due(SystemTime),
    /// Look again after this long (an error's or a refusal's own delay).
    After(Duration),
}

/// The requeue, counted from `now` (the end of the reconcile): [`PREWAKE`] before the due
/// time, or the step's own delay; never shorter than `backoff` (the in-process backoff after
/// failures, or the one every party shares in the Secret if longer).
pub fn after(next: Next, backoff: Option<Duration>, now: SystemTime) -> Duration {
    let planned = match next {
        Next::Due(due) => before_due(due.duration_since(now).unwrap_or_default()),
        Next::After(delay) => delay,
    };
    backoff.map_or(planned, |backoff| backoff.max(planned))
}

/// Given the time until the token is due: [`PREWAKE`] before it (at once when that is closer:
/// the reconcile claims ahead, within the lead), and [`MIN_REQUEUE`] when it is already due.
fn before_due(until_due: Duration) -> Duration {
    if until_due.is_zero() {
        return MIN_REQUEUE;
    }
    match until_due.checked_sub(PREWAKE) {
        Some(early) if !early.is_zero() => early,
        _ => AT_ONCE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_reconcile_is_scheduled_just_before_the_token_is_due() {
        // Far ahead: PREWAKE early; the step claims then, and calls Xero when due.
        assert_eq!(before_due(1800 * 1000 * MS), 1800 * 1000 * MS - PREWAKE);
        assert_eq!(before_due(400 * MS), 370 * MS);
        // Close (a reconcile woken by a change just before, or one whose status write took
        // long): still PREWAKE early, or at once when that is closer (it claims ahead, within
        // the lead); never after the token is due.
        assert_eq!(before_due(150 * MS), 120 * MS);
        assert_eq!(before_due(PREWAKE + MS), MS);
        assert_eq!(before_due(PREWAKE), AT_ONCE);
        assert_eq!(before_due(MS), AT_ONCE);
        // Already due (a token stored with no lifetime left): no loop of instant reconciles.
        assert_eq!(before_due(Duration::ZERO), MIN_REQUEUE);
    }

    #[test]
    fn the_requeue_is_counted_from_when_the_reconcile_ends() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let lifetime = 10 * 1000 * MS;
        let due = Next::Due(start + lifetime);
        // The reconcile's later steps (tenants, status) took 100 ms: the requeue is that much
        // shorter, so the reconcile still wakes PREWAKE before the due time.
        assert_eq!(
            after(due, None, start + 100 * MS),
            lifetime - PREWAKE - 100 * MS
        );
        // Nothing due (an error): the step's own delay, whenever the reconcile ends.
        let recheck = Next::After(lifetime);
        assert_eq!(after(recheck, None, start + 100 * MS), lifetime);
    }

    #[test]
    fn a_backoff_stretches_the_requeue_and_never_shortens_it() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let short = Next::After(2 * 1000 * MS);
        assert_eq!(after(short, Some(8 * 1000 * MS), now), 8 * 1000 * MS);
        assert_eq!(after(short, Some(MS), now), 2 * 1000 * MS);
    }
}
