//! Xero's rate limits: per app per minute, per tenant per minute and per day, and calls in flight
//! per tenant. Sliding windows over request timestamps.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::state::Millis;

const MINUTE: Millis = 60_000;
const DAY: Millis = 24 * 60 * MINUTE;

/// The limits in force. Defaults are Xero's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimits {
    /// Calls per minute per app, across all tenants (token-endpoint calls count too).
    pub app_per_minute: u32,
    /// Calls per minute per tenant.
    pub tenant_per_minute: u32,
    /// Calls per day per tenant (5,000; 1,000 on the Starter tier).
    pub tenant_per_day: u32,
    /// Calls in flight at once per tenant.
    pub tenant_concurrent: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            app_per_minute: 10_000,
            tenant_per_minute: 60,
            tenant_per_day: 5_000,
            tenant_concurrent: 5,
        }
    }
}

/// Which limit was hit; sent as `X-Rate-Limit-Problem`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    AppMinute,
    Minute,
    Day,
    Concurrent,
}

impl Problem {
    pub fn header_value(self) -> &'static str {
        match self {
            Self::AppMinute => "appminute",
            Self::Minute => "minute",
            Self::Day => "day",
            Self::Concurrent => "concurrent",
        }
    }
}

/// A refused call: which limit, and how many seconds until a call would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub problem: Problem,
    pub retry_after_secs: u64,
}

/// What is left after an admitted call, for the `X-*-Remaining` headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    pub app_minute: u32,
    pub minute: Option<u32>,
    pub day: Option<u32>,
}

/// Sliding-window counters.
#[derive(Default)]
pub struct Limiter {
    pub limits: RateLimits,
    windows: HashMap<String, VecDeque<Millis>>,
    in_flight: HashMap<String, u32>,
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Forgets every window.
    pub fn reset(&mut self) {
        self.windows.clear();
        self.in_flight.clear();
    }

    /// Remaining calls in a window after pruning, or how long until one frees up.
    fn room(&mut self, key: &str, window: Millis, limit: u32, now: Millis) -> Result<u32, u64> {
        let q = self.windows.entry(key.to_owned()).or_default();
        while q.front().is_some_and(|t| t + window <= now) {
            q.pop_front();
        }
        let used = u32::try_from(q.len()).unwrap_or(u32::MAX);
        if used >= limit {
            let oldest = q.front().copied().unwrap_or(now);
            Err((oldest + window - now).div_ceil(1000).max(1))
        } else {
            Ok(limit - used)
        }
    }

    fn record(&mut self, key: &str, now: Millis) {
        self.windows
            .entry(key.to_owned())
            .or_default()
            .push_back(now);
    }

    /// Admits one app-level call (token endpoint, `/connections`).
    pub fn admit_app(&mut self, client_id: &str, now: Millis) -> Result<Remaining, Limited> {
        let key = format!("app/{client_id}");
        let left = self
            .room(&key, MINUTE, self.limits.app_per_minute, now)
            .map_err(|secs| Limited {
                problem: Problem::AppMinute,
                retry_after_secs: secs,
            })?;
        self.record(&key, now);
        Ok(Remaining {
            app_minute: left - 1,
            ..Remaining::default()
        })
    }

    /// Admits one API call for a tenant: app, tenant-minute, tenant-day and concurrency limits.
    /// On success the call is in flight until [`Limiter::leave`].
    pub fn admit_tenant(
        &mut self,
        client_id: &str,
        tenant: &str,
        now: Millis,
    ) -> Result<Remaining, Limited> {
        let limits = self.limits;
        let tenant_key = format!("tenant/{client_id}/{tenant}");
        let in_flight = self.in_flight.get(&tenant_key).copied().unwrap_or(0);
        if in_flight >= limits.tenant_concurrent {
            return Err(Limited {
                problem: Problem::Concurrent,
                retry_after_secs: 1,
            });
        }
        let day_key = format!("{tenant_key}/day");
        let minute = self
            .room(&tenant_key, MINUTE, limits.tenant_per_minute, now)
            .map_err(|s| Limited {
                problem: Problem::Minute,
                retry_after_secs: s,
            })?;
        let day = self
            .room(&day_key, DAY, limits.tenant_per_day, now)
            .map_err(|s| Limited {
                problem: Problem::Day,
                retry_after_secs: s,
            })?;
        let app = self.admit_app(client_id, now)?;
        self.record(&tenant_key, now);
        self.record(&day_key, now);
        *self.in_flight.entry(tenant_key).or_default() += 1;
        Ok(Remaining {
            app_minute: app.app_minute,
            minute: Some(minute - 1),
            day: Some(day - 1),
        })
    }

    /// Ends an API call admitted by [`Limiter::admit_tenant`].
    pub fn leave(&mut self, client_id: &str, tenant: &str) {
        if let Some(n) = self
            .in_flight
            .get_mut(&format!("tenant/{client_id}/{tenant}"))
        {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Limiter {
        Limiter::new(RateLimits {
            app_per_minute: 3,
            tenant_per_minute: 2,
            tenant_per_day: 3,
            tenant_concurrent: 1,
        })
    }

    #[test]
    fn app_limit_counts_down_then_refuses_until_the_window_slides() {
        let mut l = tiny();
        assert_eq!(l.admit_app("a", 0).expect("1").app_minute, 2);
        assert_eq!(l.admit_app("a", 10_000).expect("2").app_minute, 1);
        assert_eq!(l.admit_app("a", 20_000).expect("3").app_minute, 0);
        let refused = l.admit_app("a", 30_000).expect_err("4th in the minute");
        assert_eq!(
            refused,
            Limited {
                problem: Problem::AppMinute,
                retry_after_secs: 30
            }
        );
        // Another app has its own budget.
        l.admit_app("b", 30_000).expect("other app");
        // The first call leaves the window at 60 s.
        l.admit_app("a", 60_000).expect("window slid");
    }

    #[test]
    fn tenant_minute_day_and_concurrency_limits() {
        let mut l = tiny();
        let r = l.admit_tenant("a", "t1", 0).expect("first");
        assert_eq!((r.minute, r.day), (Some(1), Some(2)));
        assert_eq!(
            l.admit_tenant("a", "t1", 1)
                .expect_err("one in flight")
                .problem,
            Problem::Concurrent
        );
        l.leave("a", "t1");
        l.admit_tenant("a", "t1", 2).expect("second");
        l.leave("a", "t1");
        assert_eq!(
            l.admit_tenant("a", "t1", 3).expect_err("minute").problem,
            Problem::Minute
        );
        l.admit_tenant("a", "t1", 60_000)
            .expect("third, next minute");
        l.leave("a", "t1");
        let day = l.admit_tenant("a", "t1", 120_000).expect_err("day");
        assert_eq!(day.problem, Problem::Day);
        assert_eq!(day.retry_after_secs, (DAY - 120_000) / 1000);
    }

    #[test]
    fn refused_calls_do_not_consume_budget() {
        let mut l = tiny();
        for t in 0..3 {
            l.admit_app("a", t).expect("within limit");
        }
        for t in 3..10 {
            assert!(l.admit_app("a", t).is_err());
        }
        l.admit_app("a", MINUTE)
            .expect("only the 3 admitted calls counted");
    }
}
