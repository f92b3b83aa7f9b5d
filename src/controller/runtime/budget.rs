//! What the controller may spend on one connection's calls to Xero, asked before each claim:
//! - the per-app cap, shared between namespaces ([`AppGate`]): no namespace's storm spends
//!   another's calls, and no app's budget slows another app;
//! - a minimum interval after the controller's own refresh of a connection (a minute, or a
//!   quarter of the token's lifetime as Xero gave it, whichever is shorter: a refresh is never
//!   due sooner than half the lifetime, P53, so no due refresh is held back), while the Secret
//!   still holds the
//!   pair that refresh stored: a consumer that expires that token again and again (a protocol
//!   field it may write) cannot make the controller spend the app's budget faster than that.
//!   A new pair (a person's authorisation, another party's refresh) and a failed call (the
//!   backoff every party shares governs those) start no interval. Consumers may still refresh
//!   themselves meanwhile.
//!
//! Nobody waits: a call that may not go out now is a [`crate::protocol::Error::Throttled`], and
//! the reconcile comes back when it may, without holding a worker slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::controller::context::lock;
use crate::protocol::format::TokenRecord;
use crate::protocol::gate::{AppGate, Permit, Turn};
use crate::protocol::refresher::CallBudget;

/// The longest minimum interval between the controller's calls for one connection.
pub const MIN_CALL_INTERVAL: Duration = Duration::from_secs(60);

/// What the controller remembers of its spending per connection (by uid).
#[derive(Default)]
pub struct Spending {
    connections: Mutex<HashMap<String, Spent>>,
}

#[derive(Clone, Debug, Default)]
struct Spent {
    /// The controller's last refresh of the connection: when, the lifetime Xero gave the
    /// token, and the fingerprint of the refresh token it stored.
    last_refresh: Option<(Instant, Duration, String)>,
    /// The backoff the controller's own last failed claim published (a consumer may clear it
    /// in the Secret; the controller keeps to it).
    backoff_until: Option<std::time::SystemTime>,
    /// A turn in the app's calls it holds, due at this instant.
    turn: Option<(Instant, Turn)>,
}

/// A turn not used this long after it came due is dropped (the refresh it was for went away).
const TURN_KEPT: Duration = Duration::from_secs(120);

impl Spending {
    /// Notes a refresh the controller itself just made for connection `uid`: Xero gave a token
    /// of `lifetime`, and the Secret now holds the pair of fingerprint `pair`.
    pub fn note_refresh(&self, uid: &str, lifetime: Duration, pair: String) {
        lock(&self.connections)
            .entry(uid.to_owned())
            .or_default()
            .last_refresh = Some((Instant::now(), lifetime, pair));
    }

    pub fn forget(&self, uid: &str) {
        lock(&self.connections).remove(uid);
    }

    /// The budget of connection `uid` in `namespace` under `gate` (if the app calls are capped),
    /// with `floor` as the longest minimum interval ([`MIN_CALL_INTERVAL`] in production).
    pub fn budget(
        self: &Arc<Self>,
        uid: &str,
        namespace: &str,
        gate: Option<AppGate>,
        floor: Duration,
    ) -> ConnectionBudget {
        ConnectionBudget {
            spending: self.clone(),
            uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            gate,
            floor,
        }
    }
}

/// The minimum interval after the controller's refresh of a connection whose token lives
/// `lifetime`: at most `floor`, at most a quarter of the lifetime (a refresh falls due half the
/// lifetime after it was stored at the soonest, P53).
pub fn min_interval(lifetime: Option<Duration>, floor: Duration) -> Duration {
    lifetime.map_or(floor, |l| floor.min(l / 4))
}

/// One connection's budget for one reconcile.
pub struct ConnectionBudget {
    spending: Arc<Spending>,
    uid: String,
    namespace: String,
    gate: Option<AppGate>,
    floor: Duration,
}

impl ConnectionBudget {
    fn ask_at(&self, client_id: &str, pair: &str, now: Instant) -> Result<(), Duration> {
        let mut all = lock(&self.spending.connections);
        let spent = all.entry(self.uid.clone()).or_default();
        if let Some(until) = spent.backoff_until
            && let Ok(left) = until.duration_since(std::time::SystemTime::now())
        {
            return Err(left);
        }
        if let Some((at, lifetime, stored)) = &spent.last_refresh
            && stored == pair
        {
            let next = *at + min_interval(Some(*lifetime), self.floor);
            if now < next {
                return Err(next - now);
            }
        }
        if let Some(gate) = &self.gate {
            let holding = match spent.turn {
                Some((at, _)) if at > now => return Err(at - now),
                Some((at, turn)) if now.duration_since(at) < TURN_KEPT => Some(turn),
                _ => None,
            };
            // Keyed by a fingerprint: a client id is a tenant's text, of any length.
            let app = crate::redact::Sensitive::new(client_id).fingerprint();
            match gate.ask(&app, &self.namespace, holding, now) {
                Permit::Go => spent.turn = None,
                Permit::ComeBack { at, turn } => {
                    spent.turn = Some((at, turn));
                    return Err(at.saturating_duration_since(now));
                }
            }
        }
        Ok(())
    }
}

impl CallBudget for ConnectionBudget {
    fn ask(&self, rec: &TokenRecord) -> Result<(), Duration> {
        let app = rec.client.as_ref().map_or("", |c| c.client_id.as_str());
        self.ask_at(app, &refreshed_what(rec), Instant::now())
    }

    fn backed_off(&self, until: std::time::SystemTime) {
        lock(&self.spending.connections)
            .entry(self.uid.clone())
            .or_default()
            .backoff_until = Some(until);
    }
}

/// What a refresh of `rec` renews, as the interval tells one refresh from the next: the refresh
/// token (a consumer that writes another access token or expiry renews nothing), or the app
/// alone for the client-credentials grant (every refresh there is of the same thing).
pub fn refreshed_what(rec: &TokenRecord) -> String {
    match rec.settings.grant {
        crate::crd::Grant::RefreshToken => rec
            .refresh_token
            .as_ref()
            .map(crate::redact::Sensitive::fingerprint)
            .unwrap_or_default(),
        crate::crd::Grant::ClientCredentials => "client-credentials".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_interval_is_a_minute_or_a_quarter_of_a_lifetime() {
        assert_eq!(min_interval(None, MIN_CALL_INTERVAL), 60 * S);
        // Xero's 30-minute tokens: a minute.
        assert_eq!(min_interval(Some(1800 * S), MIN_CALL_INTERVAL), 60 * S);
        // Short tokens (an emulator's): a quarter of their life.
        assert_eq!(
            min_interval(Some(10 * S), MIN_CALL_INTERVAL),
            2500 * S / 1000
        );
    }

    #[test]
    fn a_consumer_expiring_its_token_gets_one_controller_refresh_per_interval() {
        let spending = Arc::new(Spending::default());
        let budget = spending.budget("u1", "ns", None, MIN_CALL_INTERVAL);
        let t0 = Instant::now();
        assert_eq!(budget.ask_at("app", "pair-0", t0), Ok(()));
        // A failed call starts no interval.
        assert_eq!(budget.ask_at("app", "pair-0", t0 + S), Ok(()));
        spending.note_refresh("u1", 1800 * S, "pair-1".into());
        let t0 = Instant::now();
        // The pair it stored, expired again and again: one refresh a minute.
        assert!(
            matches!(budget.ask_at("app", "pair-1", t0 + 10 * S), Err(w) if w <= 50 * S && w > 49 * S)
        );
        assert!(budget.ask_at("app", "pair-1", t0 + 59 * S).is_err());
        assert_eq!(budget.ask_at("app", "pair-1", t0 + 60 * S), Ok(()));
        // Another pair (a person authorised again, another party refreshed): at once.
        assert_eq!(budget.ask_at("app", "pair-2", t0 + 10 * S), Ok(()));
        // Another connection is not held back.
        let other = spending.budget("u2", "ns", None, MIN_CALL_INTERVAL);
        assert_eq!(other.ask_at("app", "pair-1", t0 + 10 * S), Ok(()));
        // Forgotten with the connection.
        spending.forget("u1");
        assert_eq!(budget.ask_at("app", "pair-1", t0 + 10 * S), Ok(()));
    }

    #[test]
    fn a_turn_in_the_namespaces_share_is_kept_until_it_is_used() {
        let spending = Arc::new(Spending::default());
        let gate = AppGate::per_minute(NonZeroU32::new(2).expect("2"));
        let t0 = Instant::now();
        // Two connections of one namespace: the namespace's share is one a minute.
        let a = spending.budget("a", "ns", Some(gate.clone()), MIN_CALL_INTERVAL);
        let b = spending.budget("b", "ns", Some(gate.clone()), MIN_CALL_INTERVAL);
        assert_eq!(a.ask_at("app", "p", t0), Ok(()));
        let wait = b
            .ask_at("app", "p", t0)
            .expect_err("the namespace's share is spent");
        assert!(wait > 50 * S && wait <= 60 * S, "{wait:?}");
        // Coming back early changes nothing; at its turn it goes, asking the app's schedule
        // alone.
        assert_eq!(b.ask_at("app", "p", t0 + S), Err(wait - S));
        assert_eq!(b.ask_at("app", "p", t0 + wait), Ok(()));
    }
}
