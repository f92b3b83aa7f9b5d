//! The refresh protocol's decision: a pure function of (the token Secret as read, now, who I am,
//! my role) → the next step. All the I/O around it lives in `refresher.rs`.

use std::time::{Duration, SystemTime};

use super::format::{Expiry, Lease, TokenRecord};
use crate::crd::Grant;

/// The producer claims a refresh this long before it is due, and calls Xero at the due time
/// itself ([`call_delay`]): consumers that find the token expired then wait only on the call and
/// the store, not on the claim's write and its delivery as well. A claim on a token that is
/// still usable keeps no one from using it (P10 comes first).
pub const PRODUCER_CLAIM_LEAD: Duration = Duration::from_millis(50);

/// Who is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A workload: wants a usable token now; refreshes only an expired one.
    Consumer,
    /// The controller: refreshes `ahead` before expiry (zero under the default `OnExpiry` policy).
    Producer { ahead: Duration },
    /// A person asking for a new token now (`kubectl xero renew`): due while the Secret's
    /// `refreshed-at` is still `seen`, the value read when the renewal was asked. Any store
    /// changes it, whoever made it, so a refresh that raced the request satisfies it and no
    /// second call is made; an equality test, so no two parties' clocks are compared. Claims,
    /// waits and stops apply as for anyone.
    Renew { seen: Option<SystemTime> },
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The access token is usable (or, for the producer, not due yet).
    Use,
    /// Xero refused the refresh token now stored; a person must authorise again.
    ReauthorizationRequired,
    /// The grant needs a refresh token and the Secret has none: waiting for the first one.
    NoRefreshToken,
    /// The grant needs a refresh token and the one stored is not UTF-8 text: a person must
    /// write a valid one (authorise again).
    UnreadableRefreshToken,
    /// The Secret lacks `client_id`/`client_secret`, so no one here can refresh.
    MissingClientCredentials,
    /// Xero refused these credentials with an error only a configuration change can fix: no
    /// call until the client credentials or the refresh token change.
    Stopped,
    /// Someone else holds a live claim, or Xero asked everyone to wait: wait until then (or until
    /// the Secret changes).
    Wait {
        until: SystemTime,
        reason: WaitReason,
    },
    /// Nobody holds a live claim: claim the refresh (a conditional write).
    Claim { replacing: Option<String> },
    /// I hold a live claim: call Xero.
    Refresh,
}

/// Why a party waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// Another party holds a live claim.
    HeldBy(String),
    /// `retry-not-before`: a 429's wait, or the backoff after failures.
    RateLimited,
    /// The stored token lives less than twice the skew: past its usable end, it is not handed
    /// out, and its refresh is not due until half its life is left.
    NotDueYet,
    /// The Secret follows this newer protocol revision: this party only reads (P68).
    NewerProtocol(u32),
}

impl TokenRecord {
    /// When the stored access token stops being usable (its expiry minus the whole clock skew),
    /// if the Secret holds a usable-looking one at all. No party hands a token out later than
    /// this, however short its life: the skew is what keeps a party whose clock is behind from
    /// using an expired token. (Only when a refresh is due is the skew capped:
    /// [`Self::due_at`].)
    pub fn usable_until(&self) -> Option<SystemTime> {
        match (&self.access_token, self.expiry) {
            (Some(_), Expiry::At(at)) => at.checked_sub(self.settings.clock_skew),
            _ => None,
        }
    }

    /// Half the stored token's lifetime (`refreshed-at` to `expires_at`), when both are known:
    /// the most that clock skew plus refreshing ahead may take from it. A larger margin would
    /// make every freshly stored token due at once — refreshing without end.
    pub fn margin_cap(&self) -> Option<Duration> {
        match (self.expiry, self.refreshed_at) {
            (Expiry::At(exp), Some(at)) => exp.duration_since(at).ok().map(|l| l / 2),
            _ => None,
        }
    }

    /// When a party refreshing `ahead` of the usable end must refresh (`ahead` zero: at the
    /// usable end): never earlier than the [`Self::margin_cap`] before expiry, so a freshly
    /// stored token is not due at once. `None` when there is no usable-looking token, or the
    /// time is before the epoch: due now. A token that lives less than twice the skew is
    /// therefore not handed out from its usable end until this due time (P10): its parties wait
    /// for the refresh.
    pub fn due_at(&self, ahead: Duration) -> Option<SystemTime> {
        let until = self.usable_until()?;
        match (self.margin_cap(), self.expiry) {
            (Some(cap), Expiry::At(exp)) if self.settings.clock_skew + ahead > cap => {
                exp.checked_sub(cap)
            }
            _ => until.checked_sub(ahead),
        }
    }

    /// Whether the access token is usable at `now`.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        self.usable_until().is_some_and(|until| now < until)
    }
}

/// When a refresh becomes due for `role`, given the Secret `rec` read at `now`; `None`: due
/// already. Everything that makes a refresh due counts: the expiry, a renewal, a refusal
/// (P70).
pub fn due_time(rec: &TokenRecord, now: SystemTime, role: Role) -> Option<SystemTime> {
    let ahead = match role {
        Role::Consumer | Role::Renew { .. } => Duration::ZERO,
        Role::Producer { ahead } => ahead,
    };
    if let Role::Renew { seen } = role
        && rec.refreshed_at == seen
    {
        return None;
    }
    // Xero refused the stored access token before its expiry (P70): due as soon as the token
    // has been stored for `refusal_min_age`, so that refusals cannot force refreshes faster.
    let refused_from = refused_since(rec).map(|stored| stored + refusal_min_age(rec));
    if refused_from.is_some_and(|from| now >= from) {
        return None;
    }
    let normal = normal_due_time(rec, now, ahead);
    match (refused_from, normal) {
        (Some(from), Some(due)) => Some(from.min(due)),
        (_, due) => due,
    }
}

/// When the stored access token was stored, if a party reported that Xero refused it (the
/// refusal names the token stored); `UNIX_EPOCH` when the time is unknown (honoured at once).
fn refused_since(rec: &TokenRecord) -> Option<SystemTime> {
    let refused = rec.refused_access_token.as_ref()?;
    let stored = rec.access_token.as_ref()?.fingerprint();
    (*refused == stored).then(|| rec.refreshed_at.unwrap_or(SystemTime::UNIX_EPOCH))
}

/// How long a stored access token must have been in use before a report that Xero refused it
/// makes it due: a quarter of its lifetime, at most a minute. A party that reports every token
/// it gets forces at most one refresh per that time.
pub fn refusal_min_age(rec: &TokenRecord) -> Duration {
    const MAX: Duration = Duration::from_secs(60);
    match (rec.expiry, rec.refreshed_at) {
        (Expiry::At(exp), Some(at)) => exp.duration_since(at).map_or(MAX, |l| (l / 4).min(MAX)),
        _ => MAX,
    }
}

/// The due time from the token's expiry alone.
fn normal_due_time(rec: &TokenRecord, now: SystemTime, ahead: Duration) -> Option<SystemTime> {
    // An expiry further ahead than any token Xero issues was not written by a refresh (a hand
    // edit, say): the token counts as expired rather than staying in use for ever.
    let limit = now.checked_add(Duration::from_secs(crate::xero::MAX_EXPIRES_IN));
    match rec.usable_until() {
        Some(until) if limit.is_some_and(|limit| until > limit) => None,
        Some(_) => rec.due_at(ahead),
        // Missing or unparsable expiry, or no access token: refresh (the safe recovery).
        None => None,
    }
}

/// How long the party holding the claim still waits before it calls Xero: the producer claims
/// up to [`PRODUCER_CLAIM_LEAD`] before the refresh is due and calls at the due time. Zero for
/// everyone else and once the refresh is due.
pub fn call_delay(rec: &TokenRecord, now: SystemTime, role: Role) -> Duration {
    if !matches!(role, Role::Producer { .. }) {
        return Duration::ZERO;
    }
    due_time(rec, now, role)
        .and_then(|due| due.duration_since(now).ok())
        .map_or(Duration::ZERO, |wait| wait.min(PRODUCER_CLAIM_LEAD))
}

/// The next step for `me` in `role`, given the Secret `rec` read at `now`.
pub fn decide(rec: &TokenRecord, now: SystemTime, me: &str, role: Role) -> Step {
    // A revision newer than this one may have rules this party does not know: read, never
    // write (P68). A renewal not done yet is a refresh this party may not make: it waits too,
    // rather than call the stored token renewed.
    if rec.protocol_version > super::format::PROTOCOL_VERSION {
        let renewal_pending = matches!(role, Role::Renew { seen } if rec.refreshed_at == seen);
        return if rec.is_usable(now) && !renewal_pending {
            Step::Use
        } else {
            Step::Wait {
                until: now + rec.settings.lease_duration,
                reason: WaitReason::NewerProtocol(rec.protocol_version),
            }
        };
    }
    let lead = match role {
        Role::Producer { .. } => PRODUCER_CLAIM_LEAD,
        Role::Consumer | Role::Renew { .. } => Duration::ZERO,
    };
    let due = due_time(rec, now, role)
        .and_then(|due| due.checked_sub(lead))
        .is_none_or(|claim_from| now >= claim_from);
    if !due {
        // Not due, but not usable either (a token that lives less than twice the skew, past its
        // usable end): a consumer waits for the refresh rather than hand it out; the producer
        // has nothing to do yet.
        return match role {
            Role::Consumer | Role::Renew { .. } if !rec.is_usable(now) => Step::Wait {
                until: due_time(rec, now, role).unwrap_or(now),
                reason: WaitReason::NotDueYet,
            },
            _ => Step::Use,
        };
    }
    if rec.settings.grant == Grant::RefreshToken {
        let Some(refresh_token) = &rec.refresh_token else {
            return if rec.refresh_token_unreadable {
                Step::UnreadableRefreshToken
            } else {
                Step::NoRefreshToken
            };
        };
        if rec.reauthorization_required_for.as_deref() == Some(&refresh_token.fingerprint()) {
            return Step::ReauthorizationRequired;
        }
    }
    if rec.client.is_none() {
        return Step::MissingClientCredentials;
    }
    if rec.stopped_for.is_some() && rec.stopped_for == rec.credentials_fingerprint() {
        return Step::Stopped;
    }
    let skew = rec.settings.clock_skew;
    match &rec.lease {
        // My own claim: refresh while it lives; once expired, claim afresh (no skew to wait out).
        Lease::Held { holder, expires } if holder == me && now < *expires => return Step::Refresh,
        Lease::Held { holder, .. } if holder == me => {}
        Lease::Held { holder, expires } if now < *expires + skew => {
            // A lease further ahead than any holder may take is garbage (a clock far ahead, or
            // a hand edit): it must not block everyone; take it over.
            let furthest = now + rec.settings.lease_duration + skew;
            if *expires <= furthest {
                return Step::Wait {
                    until: *expires + skew,
                    reason: WaitReason::HeldBy(holder.clone()),
                };
            }
        }
        _ => {}
    }
    // A marker further ahead than any party writes one is garbage: it must not freeze everyone.
    if let Some(not_before) = rec.retry_not_before_as_of(now)
        && now < not_before
    {
        return Step::Wait {
            until: not_before,
            reason: WaitReason::RateLimited,
        };
    }
    Step::Claim {
        replacing: match &rec.lease {
            Lease::None => None,
            Lease::Unparsable { holder } | Lease::Held { holder, .. } => Some(holder.clone()),
        },
    }
}

/// `secs` after a fixed time, for unit tests.
#[cfg(test)]
pub(crate) fn test_time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
}

/// A healthy record for unit tests: an access token expiring at `expiry`, a refresh token,
/// the app's credentials, default settings (skew 5 s, lease 30 s), no claim and no markers.
#[cfg(test)]
pub(crate) fn sample_record(expiry: SystemTime, resource_version: &str) -> TokenRecord {
    use crate::redact::Sensitive;
    use crate::xero::ClientCredentials;
    TokenRecord {
        resource_version: Some(resource_version.into()),
        access_token: Some(Sensitive::new("at")),
        refresh_token: Some(Sensitive::new("rt")),
        refresh_token_unreadable: false,
        expiry: Expiry::At(expiry),
        token_type: "Bearer".into(),
        scope: String::new(),
        tenant_ids: vec![],
        tenant_id: None,
        tenant_list_stored: false,
        client: Some(ClientCredentials {
            client_id: "app".into(),
            client_secret: Sensitive::new("s"),
        }),
        settings: super::format::Settings::default(),
        lease: Lease::None,
        reauthorization_required_for: None,
        refused_access_token: None,
        reauthorization_reason: None,
        retry_not_before: None,
        failed_attempts: 0,
        stopped_for: None,
        stop_reason: None,
        refreshed_by: None,
        refreshed_at: None,
        rotation: 0,
        protocol_version: super::format::PROTOCOL_VERSION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::Sensitive;
    use crate::xero::ClientCredentials;

    use test_time as t;

    const ME: &str = "me";
    const SEC: Duration = Duration::from_secs(1);

    /// A healthy record: token expires at t(100), skew 5 s, lease 30 s.
    fn rec() -> TokenRecord {
        sample_record(t(100), "1")
    }

    fn held(holder: &str, expires: SystemTime) -> Lease {
        Lease::Held {
            holder: holder.into(),
            expires,
        }
    }

    #[test]
    fn skew_and_ahead_never_take_more_than_half_the_token_s_life() {
        // A 100 s token (refreshed at t(0), expiring at t(100)).
        let mut r = rec();
        r.refreshed_at = Some(t(0));
        r.settings.clock_skew = 300 * SEC;
        // Handed out only while the whole skew is left (never, here); due when half the life
        // is left: meanwhile a consumer waits for the refresh rather than use a token a clock
        // a skew behind would use past its expiry.
        assert_eq!(r.usable_until(), t(100).checked_sub(300 * SEC));
        assert_eq!(r.due_at(Duration::ZERO), Some(t(50)), "not due at once");
        assert_eq!(
            decide(&r, t(49), ME, Role::Consumer),
            Step::Wait {
                until: t(50),
                reason: WaitReason::NotDueYet
            }
        );
        assert_eq!(
            decide(&r, t(50), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
        let producer = Role::Producer {
            ahead: Duration::ZERO,
        };
        assert_eq!(decide(&r, t(49), ME, producer), Step::Use, "nothing to do");
        let ahead = Role::Producer { ahead: 1500 * SEC };
        r.settings.clock_skew = 5 * SEC;
        assert_eq!(decide(&r, t(49), ME, ahead), Step::Use, "not due at once");
        assert_eq!(
            decide(&r, t(50), ME, ahead),
            Step::Claim { replacing: None }
        );
        // Within the cap, both apply as configured.
        let modest = Role::Producer { ahead: 20 * SEC };
        assert_eq!(decide(&r, t(74), ME, modest), Step::Use);
        assert_eq!(
            decide(&r, t(75), ME, modest),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn a_refused_token_is_due_once_it_has_been_in_use_a_while() {
        // A token stored at t(0) that lives 100 s: a refusal counts after 25 s in use.
        let mut r = rec();
        r.refreshed_at = Some(t(0));
        assert_eq!(refusal_min_age(&r), 25 * SEC);
        r.refused_access_token = Some(Sensitive::new("at").fingerprint());
        assert_eq!(
            decide(&r, t(24), ME, Role::Consumer),
            Step::Use,
            "too young"
        );
        for role in [
            Role::Consumer,
            Role::Producer {
                ahead: Duration::ZERO,
            },
        ] {
            assert_eq!(decide(&r, t(25), ME, role), Step::Claim { replacing: None });
        }
        // The producer claims its lead ahead of that time too, and waits for it to call.
        let producer = Role::Producer {
            ahead: Duration::ZERO,
        };
        assert_eq!(
            call_delay(&r, t(25) - PRODUCER_CLAIM_LEAD, producer),
            PRODUCER_CLAIM_LEAD
        );
        // A refusal of another token (one already replaced) is nothing.
        r.refused_access_token = Some(Sensitive::new("old").fingerprint());
        assert_eq!(decide(&r, t(50), ME, Role::Consumer), Step::Use);
        // Long-lived tokens: at most a minute.
        r.expiry = Expiry::At(t(1800));
        assert_eq!(refusal_min_age(&r), 60 * SEC);
    }

    #[test]
    fn a_newer_protocol_is_only_read() {
        let mut r = rec();
        r.protocol_version = crate::protocol::format::PROTOCOL_VERSION + 1;
        for role in [
            Role::Consumer,
            Role::Producer {
                ahead: Duration::ZERO,
            },
        ] {
            assert_eq!(decide(&r, t(10), ME, role), Step::Use, "usable: used");
            assert_eq!(
                decide(&r, t(96), ME, role),
                Step::Wait {
                    until: t(96) + r.settings.lease_duration,
                    reason: WaitReason::NewerProtocol(r.protocol_version)
                },
                "expired: never claimed"
            );
        }
        // A renewal is a refresh: not made, and the stored token is not called renewed.
        let renew = Role::Renew {
            seen: r.refreshed_at,
        };
        assert_eq!(
            decide(&r, t(10), ME, renew),
            Step::Wait {
                until: t(10) + r.settings.lease_duration,
                reason: WaitReason::NewerProtocol(r.protocol_version)
            }
        );
        let done = Role::Renew { seen: Some(t(1)) };
        assert_eq!(decide(&r, t(10), ME, done), Step::Use, "renewed by another");
        // This revision and older ones are followed.
        r.protocol_version = 1;
        assert_eq!(
            decide(&r, t(96), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn a_stop_marker_holds_until_the_credentials_change() {
        let mut r = rec();
        r.expiry = Expiry::At(t(0));
        r.stopped_for = r.credentials_fingerprint();
        for role in [
            Role::Consumer,
            Role::Producer {
                ahead: Duration::ZERO,
            },
        ] {
            assert_eq!(decide(&r, t(10), ME, role), Step::Stopped);
        }
        // A new client secret (the controller copies it from the client Secret) lifts it …
        let mut fixed = r.clone();
        fixed.client = Some(ClientCredentials {
            client_id: "app".into(),
            client_secret: Sensitive::new("new"),
        });
        assert_eq!(
            decide(&fixed, t(10), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
        // … and so does a new refresh token (a person authorised again).
        let mut reauthorised = r.clone();
        reauthorised.refresh_token = Some(Sensitive::new("rt2"));
        assert_eq!(
            decide(&reauthorised, t(10), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
        // A still-valid token is used meanwhile: the stop is about calls, not about reading.
        let mut valid = r;
        valid.expiry = Expiry::At(t(100));
        assert_eq!(decide(&valid, t(10), ME, Role::Consumer), Step::Use);
    }

    #[test]
    fn an_implausibly_distant_expiry_counts_as_expired() {
        let mut r = rec();
        r.expiry = Expiry::At(t(2 * 3600 + 4));
        assert_eq!(
            decide(&r, t(0), ME, Role::Consumer),
            Step::Use,
            "within bounds"
        );
        r.expiry = Expiry::At(t(2 * 3600 + 10));
        assert_eq!(
            decide(&r, t(0), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
        r.expiry =
            Expiry::At(crate::protocol::format::parse_time("9999-12-31T23:59:59Z").expect("time"));
        assert_eq!(
            decide(
                &r,
                t(0),
                ME,
                Role::Producer {
                    ahead: Duration::ZERO
                }
            ),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn a_valid_token_is_used_until_expiry_minus_skew() {
        let r = rec();
        assert_eq!(decide(&r, t(0), ME, Role::Consumer), Step::Use);
        assert_eq!(decide(&r, t(94), ME, Role::Consumer), Step::Use);
        assert_eq!(
            decide(&r, t(95), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn due_at_is_where_the_decision_turns_from_use() {
        let mut stored = rec();
        stored.refreshed_at = Some(t(40));
        // No ahead, some ahead, and so much ahead that half the lifetime caps it.
        for (r, ahead) in [
            (rec(), Duration::ZERO),
            (rec(), 10 * SEC),
            (stored, 50 * SEC),
        ] {
            let due = r.due_at(ahead).expect("a usable token");
            for role in [Role::Consumer, Role::Producer { ahead }] {
                if role == Role::Consumer && !ahead.is_zero() {
                    continue;
                }
                // The producer claims PRODUCER_CLAIM_LEAD early; a consumer at the time itself.
                let lead = if role == Role::Consumer {
                    Duration::ZERO
                } else {
                    PRODUCER_CLAIM_LEAD
                };
                let ms = Duration::from_millis(1);
                assert_eq!(decide(&r, due - lead - ms, ME, role), Step::Use);
                assert_ne!(decide(&r, due - lead, ME, role), Step::Use, "{ahead:?}");
            }
        }
        let mut none = rec();
        none.access_token = None;
        assert_eq!(none.due_at(Duration::ZERO), None, "no token: due now");
    }

    #[test]
    fn the_producer_refreshes_on_expiry_by_default_and_early_only_when_asked() {
        let r = rec();
        let on_expiry = Role::Producer {
            ahead: Duration::ZERO,
        };
        assert_eq!(decide(&r, t(94), ME, on_expiry), Step::Use);
        assert_eq!(
            decide(&r, t(95), ME, on_expiry),
            Step::Claim { replacing: None }
        );
        let ahead = Role::Producer { ahead: 60 * SEC };
        assert_eq!(decide(&r, t(34), ME, ahead), Step::Use);
        assert_eq!(
            decide(&r, t(35), ME, ahead),
            Step::Claim { replacing: None }
        );
        // A margin longer than the token's whole life is simply "due now".
        assert_eq!(
            decide(
                &r,
                t(0),
                ME,
                Role::Producer {
                    ahead: 10_000 * SEC
                }
            ),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn the_producer_claims_a_moment_early_and_calls_xero_when_due() {
        let r = rec();
        let on_expiry = Role::Producer {
            ahead: Duration::ZERO,
        };
        let due = t(95);
        let ms = Duration::from_millis(1);
        // Claimed up to the lead before the due time …
        assert_eq!(
            decide(&r, due - PRODUCER_CLAIM_LEAD, ME, on_expiry),
            Step::Claim { replacing: None }
        );
        // … held, but Xero called only at the due time itself.
        let mut mine = r.clone();
        mine.lease = held(ME, t(125));
        let early = due - PRODUCER_CLAIM_LEAD + 10 * ms;
        assert_eq!(decide(&mine, early, ME, on_expiry), Step::Refresh);
        assert_eq!(
            call_delay(&mine, early, on_expiry),
            PRODUCER_CLAIM_LEAD - 10 * ms
        );
        assert_eq!(call_delay(&mine, due, on_expiry), Duration::ZERO);
        assert_eq!(call_delay(&mine, due + ms, on_expiry), Duration::ZERO);
        // Never more than the lead, whatever the Secret says.
        assert_eq!(call_delay(&mine, t(0), on_expiry), PRODUCER_CLAIM_LEAD);
        // Nobody else waits: a consumer claims at the usable end and calls at once.
        assert_eq!(decide(&r, due - ms, ME, Role::Consumer), Step::Use);
        assert_eq!(call_delay(&mine, early, Role::Consumer), Duration::ZERO);
        assert_eq!(
            call_delay(&mine, t(0), Role::Renew { seen: None }),
            Duration::ZERO
        );
        // A token with no usable expiry is due at once: no wait.
        let mut broken = mine.clone();
        broken.expiry = Expiry::Unparsable;
        assert_eq!(call_delay(&broken, early, on_expiry), Duration::ZERO);
    }

    #[test]
    fn a_consumer_uses_a_valid_token_even_while_the_producer_holds_an_early_claim() {
        let mut r = rec();
        r.lease = held("controller", t(40));
        assert_eq!(decide(&r, t(30), ME, Role::Consumer), Step::Use);
    }

    #[test]
    fn an_expired_token_with_a_live_foreign_claim_means_wait_for_it() {
        let mut r = rec();
        r.lease = held("other", t(110));
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Wait {
                until: t(115),
                reason: WaitReason::HeldBy("other".into())
            }
        );
    }

    #[test]
    fn an_expired_foreign_claim_is_taken_over_after_the_skew() {
        let mut r = rec();
        r.lease = held("crashed", t(110));
        assert!(matches!(
            decide(&r, t(114), ME, Role::Consumer),
            Step::Wait { .. }
        ));
        assert_eq!(
            decide(&r, t(115), ME, Role::Consumer),
            Step::Claim {
                replacing: Some("crashed".into())
            }
        );
    }

    #[test]
    fn my_own_live_claim_means_refresh_and_my_expired_one_means_claim_again() {
        let mut r = rec();
        r.lease = held(ME, t(110));
        assert_eq!(decide(&r, t(100), ME, Role::Consumer), Step::Refresh);
        assert_eq!(
            decide(&r, t(110), ME, Role::Consumer),
            Step::Claim {
                replacing: Some(ME.into())
            }
        );
    }

    #[test]
    fn a_lease_from_the_future_does_not_block_anyone() {
        let mut r = rec();
        r.lease = held("clock-skewed", t(100 + 3600));
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Claim {
                replacing: Some("clock-skewed".into())
            }
        );
        // The longest legitimate lease (duration + skew) is still honoured.
        r.lease = held("other", t(100 + 35));
        assert!(matches!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Wait { .. }
        ));
    }

    #[test]
    fn an_unparsable_lease_is_no_lease() {
        let mut r = rec();
        r.lease = Lease::Unparsable { holder: "x".into() };
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Claim {
                replacing: Some("x".into())
            }
        );
    }

    #[test]
    fn missing_or_unparsable_expiry_or_access_token_means_refresh() {
        for broken in [
            TokenRecord {
                expiry: Expiry::Missing,
                ..rec()
            },
            TokenRecord {
                expiry: Expiry::Unparsable,
                ..rec()
            },
            TokenRecord {
                access_token: None,
                ..rec()
            },
        ] {
            assert_eq!(
                decide(&broken, t(0), ME, Role::Consumer),
                Step::Claim { replacing: None }
            );
        }
    }

    #[test]
    fn no_refresh_token_is_a_clear_state_not_a_call() {
        let r = TokenRecord {
            refresh_token: None,
            expiry: Expiry::Missing,
            ..rec()
        };
        assert_eq!(decide(&r, t(0), ME, Role::Consumer), Step::NoRefreshToken);
        // A valid access token is still handed out meanwhile.
        let r = TokenRecord {
            refresh_token: None,
            ..rec()
        };
        assert_eq!(decide(&r, t(0), ME, Role::Consumer), Step::Use);
    }

    #[test]
    fn a_renewal_is_due_until_the_secret_shows_another_refresh() {
        let renew = Role::Renew { seen: Some(t(40)) };
        // A valid token, still as it was when the renewal was asked: claim, though not expired.
        let before = TokenRecord {
            refreshed_at: Some(t(40)),
            ..rec()
        };
        assert_eq!(
            decide(&before, t(51), ME, renew),
            Step::Claim { replacing: None }
        );
        assert_eq!(decide(&before, t(51), ME, Role::Consumer), Step::Use);
        // Stored again since (by anyone, whatever their clock says): done, no second call.
        for stored_at in [t(50), t(30)] {
            let after = TokenRecord {
                refreshed_at: Some(stored_at),
                ..rec()
            };
            assert_eq!(decide(&after, t(51), ME, renew), Step::Use);
        }
        // Never refreshed before: due until a first refresh is stored.
        let never = TokenRecord {
            refreshed_at: None,
            ..rec()
        };
        assert_eq!(
            decide(&never, t(51), ME, Role::Renew { seen: None }),
            Step::Claim { replacing: None }
        );
        // Another party's live claim is waited for, as for anyone.
        let held = TokenRecord {
            lease: Lease::Held {
                holder: "other".into(),
                expires: t(60),
            },
            ..before
        };
        assert!(matches!(decide(&held, t(51), ME, renew), Step::Wait { .. }));
    }

    #[test]
    fn a_refresh_token_that_is_not_text_is_not_called_missing() {
        let r = TokenRecord {
            refresh_token: None,
            refresh_token_unreadable: true,
            expiry: Expiry::Missing,
            ..rec()
        };
        assert_eq!(
            decide(&r, t(0), ME, Role::Consumer),
            Step::UnreadableRefreshToken
        );
    }

    #[test]
    fn client_credentials_need_no_refresh_token() {
        let mut r = TokenRecord {
            refresh_token: None,
            ..rec()
        };
        r.settings.grant = Grant::ClientCredentials;
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn reauthorization_required_holds_only_for_the_refused_token() {
        let mut r = rec();
        r.reauthorization_required_for = Some(Sensitive::new("rt").fingerprint());
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::ReauthorizationRequired
        );
        // Still hands out a valid access token.
        assert_eq!(decide(&r, t(0), ME, Role::Consumer), Step::Use);
        // A person authorised again: a new refresh token lifts it.
        r.refresh_token = Some(Sensitive::new("rt-new"));
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn missing_client_credentials_are_reported() {
        let r = TokenRecord {
            client: None,
            ..rec()
        };
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::MissingClientCredentials
        );
    }

    #[test]
    fn a_rate_limit_makes_everyone_wait() {
        let mut r = rec();
        r.retry_not_before = Some(t(130));
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Wait {
                until: t(130),
                reason: WaitReason::RateLimited
            }
        );
        assert_eq!(
            decide(&r, t(130), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
    }

    #[test]
    fn zero_skew_is_allowed() {
        let mut r = rec();
        r.settings.clock_skew = Duration::ZERO;
        assert_eq!(decide(&r, t(99), ME, Role::Consumer), Step::Use);
        assert_eq!(
            decide(&r, t(100), ME, Role::Consumer),
            Step::Claim { replacing: None }
        );
    }
}
