//! Capped exponential backoff with full jitter, for retrying Xero and the API server.

use std::time::Duration;

/// Backoff settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay's upper bound.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
}

/// Xero retries: 200 ms doubling to 5 s; a lost answer is usually recovered on the next try.
pub const XERO_RETRY: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};

/// Across claims, after a refresh failed transiently through all its retries: 10 s doubling
/// to 5 minutes, kept in the Secret (`retry-not-before`, `failed-attempts`) so every party and a
/// restarted controller honour it. Xero failing for good costs a handful of calls per
/// connection an hour, not hundreds a minute.
pub const ACROSS_CLAIMS: Backoff = Backoff {
    base: Duration::from_secs(10),
    cap: Duration::from_secs(300),
};

/// Retries of a Secret write that must land (a rotated refresh token): quick first, then every
/// few seconds while the API server is unreachable.
pub const WRITE_RETRY: Backoff = Backoff {
    base: Duration::from_millis(50),
    cap: Duration::from_secs(5),
};

impl Backoff {
    /// The upper bound of the delay before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay in `[ceiling/2, ceiling]` (half jitter: spreads parties apart without ever
    /// retrying at once).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + ceiling.mul_f64(fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        let c: Vec<u128> = (0..6).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(c, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(1000), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn delays_stay_within_half_and_full_ceiling() {
        for attempt in 0..8 {
            let d = XERO_RETRY.delay(attempt);
            let c = XERO_RETRY.ceiling(attempt);
            assert!(d >= c / 2 && d <= c, "{d:?} vs {c:?}");
        }
    }

    /// The schedules docs/protocol.md states (P27, P34, P51), pinned: other implementations
    /// follow the document, so the code must say the same.
    #[test]
    fn the_documented_schedules() {
        let ms = |b: Backoff| -> Vec<u128> { (0..8).map(|a| b.ceiling(a).as_millis()).collect() };
        // Inside a claim and after an expired replay: 200 ms doubling to 5 s.
        assert_eq!(
            ms(XERO_RETRY),
            [200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        // Across claims: 10 s doubling to 5 minutes.
        assert_eq!(
            ms(ACROSS_CLAIMS),
            [
                10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000
            ]
        );
        // A store that must land: 50 ms doubling to 5 s.
        assert_eq!(ms(WRITE_RETRY), [50, 100, 200, 400, 800, 1600, 3200, 5000]);
    }
}
