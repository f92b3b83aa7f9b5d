//! The critical path of each rotation, from the writes seen on a watch of the token Secret, the
//! emulator's token-call times and the consumers' at-rotation gets: when the claim was sent
//! (relative to the token's usable end) and how long its write took to be delivered, how long
//! from the usable end until Xero received the call, the call to Xero (until the holder had the
//! answer in hand), the store write and its delivery over a watch, and the consumers' wake-up
//! (from that delivery until a get that was waiting for it returned).
//!
//! Every time is the one machine's wall clock in Unix milliseconds: the claim's send time is its
//! lease end minus the lease duration, the store's is its `refreshed-at` (both written by the
//! holder just before its request).

use std::time::SystemTime;

use serde_json::{Value, json};

use xero_operator::protocol::format::{Lease, TokenRecord};

/// One rotation's moments (Unix ms).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rotation {
    /// When the replaced token stopped being usable (its expiry minus the clock skew).
    pub usable_end: Option<u64>,
    /// When the winning claim was sent, and when the watch delivered it.
    pub claim_sent: Option<u64>,
    pub claim_seen: Option<u64>,
    /// When the holder sent the store, and when the watch delivered it.
    pub store_sent: Option<u64>,
    pub store_seen: u64,
}

/// Builds [`Rotation`]s from the Secret's versions, in the order a watch delivers them.
#[derive(Debug, Default)]
pub struct Timeline {
    rotations: Vec<Rotation>,
    current: Rotation,
    token: Option<String>,
}

fn unix_ms(t: SystemTime) -> Option<u64> {
    u64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis()).ok()
}

impl Timeline {
    /// Notes a version of the Secret delivered at `seen`.
    pub fn observe(&mut self, rec: &TokenRecord, seen: SystemTime) {
        let Some(seen_ms) = unix_ms(seen) else { return };
        if let Lease::Held { expires, .. } = &rec.lease
            && self.current.claim_sent.is_none()
        {
            self.current.claim_sent = expires
                .checked_sub(rec.settings.lease_duration)
                .and_then(unix_ms);
            self.current.claim_seen = Some(seen_ms);
        }
        let token = rec.access_token.as_ref().map(|t| t.expose().to_owned());
        if token.is_some() && token != self.token {
            let done = std::mem::take(&mut self.current);
            if self.token.is_some() {
                self.rotations.push(Rotation {
                    store_sent: rec.refreshed_at.and_then(unix_ms),
                    store_seen: seen_ms,
                    ..done
                });
            }
            self.token = token;
        }
        if !matches!(rec.lease, Lease::Held { .. }) {
            self.current.usable_end = rec.usable_until().and_then(unix_ms);
        }
    }

    pub fn rotations(&self) -> &[Rotation] {
        &self.rotations
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn p99(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * 0.99).round() as usize;
    Some(v[idx.min(v.len() - 1)])
}

/// The critical path's parts (milliseconds, the median over the rotations at expiry: those
/// whose call to Xero, or failing that whose claim, came at or after the token's usable end),
/// with `token_calls_ms` (the emulator's token-call receipt times) and `gets` (consumers'
/// at-rotation gets: when each returned, Unix ms, and how long it took, µs). `None` where no
/// rotation had that part. The claim is timed from the usable end (negative: claimed ahead, off
/// the path) and its write from sending to delivery; the path itself runs from the usable end
/// to the call, the call, the store's write and delivery, and the wake-up. The slowest gets are
/// placed on their rotation's timeline.
pub fn critical_path(rotations: &[Rotation], token_calls_ms: &[u64], gets: &[(u64, u64)]) -> Value {
    let (mut to_claim, mut claim_write, mut to_call, mut xero, mut store, mut wake) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut counted = 0;
    let mut slowest: Vec<(u64, Value)> = Vec::new();
    let mut each = Vec::new();
    let ms = |a: u64, b: u64| a as f64 - b as f64;
    for (i, r) in rotations.iter().enumerate() {
        let (Some(end), Some(claim), Some(sent)) = (r.usable_end, r.claim_sent, r.store_sent)
        else {
            continue;
        };
        let call = token_calls_ms
            .iter()
            .find(|&&t| t >= claim && t <= sent)
            .copied();
        if call.unwrap_or(claim) < end {
            continue;
        }
        counted += 1;
        to_claim.push(ms(claim, end));
        if let Some(seen) = r.claim_seen {
            claim_write.push(ms(seen, claim));
        }
        if let Some(call) = call {
            to_call.push(ms(call, end));
            xero.push(ms(sent, call));
        }
        store.push(ms(r.store_seen, sent));
        let next = rotations
            .get(i + 1)
            .and_then(|n| n.store_sent)
            .unwrap_or(u64::MAX);
        let of_this: Vec<&(u64, u64)> = gets
            .iter()
            .filter(|(g, _)| *g >= sent && *g < next)
            .collect();
        each.push(json!({
            "claim_sent_after_usable_end_ms": ms(claim, end),
            "store_seen_after_usable_end_ms": ms(r.store_seen, end),
            "gets": of_this.len(),
            "slowest_get_ms": of_this.iter().map(|g| g.1).max().unwrap_or_default() as f64 / 1000.0,
        }));
        for &&(done, took_us) in &of_this {
            let started = done as f64 - took_us as f64 / 1000.0;
            // Only a get that was waiting when the store arrived wakes up; one that started
            // later (a worker between two gets) answered from the new token at once.
            if started <= r.store_seen as f64 {
                wake.push(ms(done, r.store_seen));
            }
            slowest.push((
                took_us,
                json!({
                    "took_ms": took_us as f64 / 1000.0,
                    "started_after_usable_end_ms": (started - end as f64).round(),
                    "claim_sent_after_usable_end_ms": ms(claim, end),
                    "store_seen_after_usable_end_ms": ms(r.store_seen, end),
                    "returned_after_usable_end_ms": ms(done, end),
                }),
            ));
        }
    }
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    let slowest_three: Vec<Value> = slowest.into_iter().take(3).map(|(_, v)| v).collect();
    json!({
        "rotations": counted,
        "claim_sent_after_usable_end_ms": median(to_claim),
        "claim_write_and_delivery_ms": median(claim_write),
        "expiry_to_xero_call_ms": median(to_call),
        "xero_call_ms": median(xero),
        "store_write_and_delivery_ms": median(store),
        "wake_up_p50_ms": median(wake.clone()),
        "wake_up_p99_ms": p99(wake),
        "slowest_gets": slowest_three,
        "each_rotation": each,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// A token Secret holding `token` (expiring at `expires_ms`, 1 s skew, 5 s lease), stored at
    /// `stored_ms`, claimed until `claim_until_ms` if given.
    fn rec(
        token: &str,
        expires_ms: u64,
        claim_until_ms: Option<u64>,
        stored_ms: u64,
    ) -> TokenRecord {
        use xero_operator::protocol::format::{self as f, format_time};
        let mut annotations = serde_json::json!({
            f::ANN_CLOCK_SKEW: "1",
            f::ANN_LEASE_DURATION: "5",
            f::ANN_REFRESHED_AT: format_time(at(stored_ms)),
        });
        if let Some(until) = claim_until_ms {
            annotations[f::ANN_HOLDER] = "h".into();
            annotations[f::ANN_LEASE_EXPIRES] = format_time(at(until)).into();
        }
        let secret: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "t", "annotations": annotations},
                "data": {
                    f::ACCESS_TOKEN: base64(token),
                    f::REFRESH_TOKEN: base64("r"),
                    f::EXPIRES_AT: base64(&format_time(at(expires_ms))),
                },
            }))
            .expect("a Secret");
        TokenRecord::from_secret(&secret)
    }

    fn base64(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn a_rotation_at_expiry_is_broken_into_its_parts() {
        let mut t = Timeline::default();
        // Token a, usable until 9_000 (expiry 10_000, 1 s skew).
        t.observe(&rec("a", 10_000, None, 0), at(100));
        // Claimed at 9_002 (lease to 14_002), seen at 9_004.
        t.observe(&rec("a", 10_000, Some(14_002), 0), at(9_004));
        // Stored at 9_010 (token b), seen at 9_013.
        t.observe(&rec("b", 20_000, None, 9_010), at(9_013));
        let r = t.rotations();
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0],
            Rotation {
                usable_end: Some(9_000),
                claim_sent: Some(9_002),
                claim_seen: Some(9_004),
                store_sent: Some(9_010),
                store_seen: 9_013,
            }
        );
        let path = critical_path(
            r,
            &[50, 9_006],
            &[(9_012, 1_000), (9_014, 15_000), (9_020, 100)],
        );
        assert_eq!(path["rotations"], 1);
        assert_eq!(path["claim_sent_after_usable_end_ms"], 2.0);
        assert_eq!(path["claim_write_and_delivery_ms"], 2.0);
        assert_eq!(path["expiry_to_xero_call_ms"], 6.0);
        assert_eq!(path["xero_call_ms"], 4.0);
        assert_eq!(path["store_write_and_delivery_ms"], 3.0);
        // The get that started after the store (at 9_020) is not a wake-up.
        assert_eq!(path["wake_up_p50_ms"], 1.0);
        assert_eq!(path["wake_up_p99_ms"], 1.0);
        let slowest = &path["slowest_gets"][0];
        assert_eq!(slowest["took_ms"], 15.0);
        assert_eq!(slowest["started_after_usable_end_ms"], -1.0);
        assert_eq!(slowest["returned_after_usable_end_ms"], 14.0);
    }

    #[test]
    fn a_claim_made_just_ahead_of_a_call_at_expiry_counts_as_a_rotation_at_expiry() {
        let mut t = Timeline::default();
        t.observe(&rec("a", 10_000, None, 0), at(100));
        // Claimed at 8_980, ahead of the usable end (9_000); the call comes at 9_001.
        t.observe(&rec("a", 10_000, Some(13_980), 0), at(8_984));
        t.observe(&rec("b", 20_000, None, 9_002), at(9_006));
        let path = critical_path(t.rotations(), &[9_001], &[(9_008, 9_000)]);
        assert_eq!(path["rotations"], 1);
        assert_eq!(path["claim_sent_after_usable_end_ms"], -20.0);
        assert_eq!(path["claim_write_and_delivery_ms"], 4.0);
        assert_eq!(path["expiry_to_xero_call_ms"], 1.0);
        assert_eq!(path["xero_call_ms"], 1.0);
        assert_eq!(path["store_write_and_delivery_ms"], 4.0);
        assert_eq!(path["wake_up_p99_ms"], 2.0);
    }

    #[test]
    fn a_refresh_ahead_of_expiry_is_not_counted_as_one_at_expiry() {
        let mut t = Timeline::default();
        t.observe(&rec("a", 10_000, None, 0), at(100));
        t.observe(&rec("a", 10_000, Some(13_000), 0), at(8_001));
        t.observe(&rec("b", 20_000, None, 8_005), at(8_006));
        assert_eq!(t.rotations().len(), 1);
        assert_eq!(critical_path(t.rotations(), &[], &[])["rotations"], 0);
        // Nor when the emulator's call time shows the call itself came ahead.
        assert_eq!(critical_path(t.rotations(), &[8_003], &[])["rotations"], 0);
    }
}
