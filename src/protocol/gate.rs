//! One token bucket per Xero app (client id): caps the token calls all connections of an app make
//! from this process, so a thousand connections expiring in the same second never burst past
//! Xero's app-wide limit. Built on `governor` (GCRA).

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota};

/// A shared per-app limiter of token calls.
#[derive(Clone)]
pub struct AppGate {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    /// Told the client id of each permit given (the controller counts them per app).
    on_permit: Option<PermitHook>,
}

/// Told the client id of each permit given.
type PermitHook = Arc<dyn Fn(&str) + Send + Sync>;

impl AppGate {
    /// At most `per_minute` calls per app in any 60-second window (see [`bucket_for`]).
    pub fn per_minute(per_minute: NonZeroU32) -> Self {
        let (burst, period) = bucket_for(per_minute);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_minute(per_minute))
            .allow_burst(burst);
        Self {
            limiter: Arc::new(DefaultKeyedRateLimiter::keyed(quota)),
            on_permit: None,
        }
    }

    /// Calls `f` with the client id of each permit given.
    pub fn with_on_permit(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_permit = Some(Arc::new(f));
        self
    }

    fn permitted(&self, client_id: &str) {
        if let Some(f) = &self.on_permit {
            f(client_id);
        }
    }

    /// Waits until a call for `client_id` may go out.
    pub async fn until_ready(&self, client_id: &str) {
        self.limiter.until_key_ready(&client_id.to_owned()).await;
        self.permitted(client_id);
    }

    /// Whether a call for `client_id` may go out now (taking the permit if so).
    pub fn try_now(&self, client_id: &str) -> bool {
        let ok = self.limiter.check_key(&client_id.to_owned()).is_ok();
        if ok {
            self.permitted(client_id);
        }
        ok
    }
}

/// The bucket's burst and refill period for a cap of `per_minute` calls in any 60-second window.
///
/// A full bucket lets `burst` calls through at once and then one per `period`, so a 60-second
/// window can see `burst + 60 s / period` calls. The refill is slowed by the burst to keep that
/// within the cap (a bucket refilling at the full cap let a storm reach cap + burst: 3,273 calls
/// in a minute under a 3,000 cap). The burst is a hundredth of the cap, so the sustained rate
/// stays within 1 % of it.
pub fn bucket_for(per_minute: NonZeroU32) -> (NonZeroU32, std::time::Duration) {
    let cap = per_minute.get();
    let burst = (cap / 100).max(1);
    let refills = (cap - burst).max(1);
    let burst = NonZeroU32::new(burst).expect("at least 1");
    (burst, std::time::Duration::from_secs(60) / refills)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_a_hundredth_of_the_minute_and_apps_are_separate() {
        let gate = AppGate::per_minute(NonZeroU32::new(1000).expect("nonzero"));
        let admitted = (0..50).filter(|_| gate.try_now("app-a")).count();
        assert_eq!(admitted, 10, "burst of 1000/100");
        assert!(gate.try_now("app-b"), "another app has its own bucket");
    }

    #[test]
    fn no_minute_sees_more_than_the_cap_and_the_rate_stays_near_it() {
        for cap in [
            1, 2, 10, 99, 100, 101, 1000, 3000, 10_000, 60_000, 1_000_000,
        ] {
            let (burst, period) = bucket_for(NonZeroU32::new(cap).expect("nonzero"));
            // The most a window [t, t + 60 s) can see: the burst at t, then one call at each
            // t + k·period (k ≥ 1) before its end.
            let refills = (60_000_000_000u128.div_ceil(period.as_nanos()) - 1) as u32;
            assert!(
                burst.get() + refills <= cap,
                "cap {cap}: burst {burst} + {refills} refills"
            );
            if cap >= 100 {
                let sustained = 60.0 / period.as_secs_f64();
                assert!(
                    sustained >= 0.98 * f64::from(cap),
                    "cap {cap}: {sustained}/min"
                );
            }
        }
    }

    #[test]
    fn a_tiny_quota_still_admits_one() {
        let gate = AppGate::per_minute(NonZeroU32::new(1).expect("nonzero"));
        assert!(gate.try_now("a"));
        assert!(!gate.try_now("a"));
    }
}
