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
}

impl AppGate {
    /// At most `per_minute` calls per app per minute, in bursts of at most a tenth of that (so
    /// no minute-long window sees much more than `per_minute`).
    pub fn per_minute(per_minute: NonZeroU32) -> Self {
        let burst = NonZeroU32::new((per_minute.get() / 10).max(1)).expect("at least 1");
        let period = std::time::Duration::from_secs(60) / per_minute.get();
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_minute(per_minute))
            .allow_burst(burst);
        Self {
            limiter: Arc::new(DefaultKeyedRateLimiter::keyed(quota)),
        }
    }

    /// Waits until a call for `client_id` may go out.
    pub async fn until_ready(&self, client_id: &str) {
        self.limiter.until_key_ready(&client_id.to_owned()).await;
    }

    /// Whether a call for `client_id` may go out now (taking the permit if so).
    pub fn try_now(&self, client_id: &str) -> bool {
        self.limiter.check_key(&client_id.to_owned()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_a_tenth_of_the_minute_and_apps_are_separate() {
        let gate = AppGate::per_minute(NonZeroU32::new(100).expect("nonzero"));
        let admitted = (0..50).filter(|_| gate.try_now("app-a")).count();
        assert_eq!(admitted, 10, "burst of 100/10");
        assert!(gate.try_now("app-b"), "another app has its own bucket");
    }

    #[test]
    fn a_tiny_quota_still_admits_one() {
        let gate = AppGate::per_minute(NonZeroU32::new(1).expect("nonzero"));
        assert!(gate.try_now("a"));
        assert!(!gate.try_now("a"));
    }
}
