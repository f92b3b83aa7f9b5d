//! The rules of a refresh round besides [`decide`] itself: one pure function per step, from
//! what the round knows to what the I/O does next (docs/protocol.md). The refresher
//! (`refresher/`) only carries these actions out; the model check (`proving-ground`, `make
//! model`) drives these same functions. The clock is always given, never read here.
//!
//! - [`next`]: after a read, what the round does (hand the token out, ask the API server, wait,
//!   give up, claim, or call Xero under its own claim).
//! - [`hold`]: a claim made ahead of the due time waits for it, or is given back.
//! - [`after_error`]: what a failed call to Xero leads to.
//! - [`after_invalid_grant`], [`after_store_conflict`], [`after_release_conflict`]: the
//!   conditional writes' rules when the Secret moved on.

use std::time::{Duration, SystemTime};

use super::Error;
use super::decide::{PRODUCER_CLAIM_LEAD, Role, Step, WaitReason, call_delay, decide};
use super::format::{
    ANN_FAILED_ATTEMPTS, ANN_REAUTH_FOR, ANN_REAUTH_REASON, ANN_RETRY_NOT_BEFORE, ANN_STOP_REASON,
    ANN_STOPPED_FOR, Lease, TokenRecord, format_time,
};
use super::retry::Failure;
use crate::redact::Sensitive;
use crate::xero::{TokenSet, XeroError};

/// How much longer than [`PRODUCER_CLAIM_LEAD`] a holder waits for its due time before it
/// concludes the wall clock stepped back: room for the timer's and the clocks' granularity.
pub const HOLD_SLACK: Duration = Duration::from_millis(5);

/// How many times a release is written before it is left to expire (each try after a conflict
/// re-reads the Secret first).
pub const RELEASE_TRIES: u32 = 5;

/// What a round knows when it decides.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The Secret as read.
    pub rec: &'a TokenRecord,
    /// This party's clock at the read.
    pub now: SystemTime,
    /// This party's identity (the claim's holder name).
    pub me: &'a str,
    pub role: Role,
    /// The record is the follower's copy (a watch may lag behind a write), not the API
    /// server's answer to a read.
    pub followed: bool,
    /// How long this caller may still wait (until its deadline).
    pub left: Duration,
    /// This caller's limit on waiting (for the message of a give-up).
    pub max_wait: Duration,
}

/// What the round does next.
#[derive(Debug)]
pub enum Action {
    /// Hand out the stored access token.
    Hand,
    /// Read again, from the API server: only using, claiming and waiting are decided on the
    /// follower's copy; calling Xero and every error on the server's answer.
    AskServer,
    /// End this `get` with this error (nothing written).
    Fail(Error),
    /// Wait for the Secret to change, at most this long, then read again.
    Wait(Duration),
    /// Claim the refresh (a write conditional on the version read), holding it until
    /// `lease_end`; `replacing` is the holder of an expired or unreadable claim taken over.
    Claim {
        lease_end: SystemTime,
        replacing: Option<String>,
    },
    /// This party holds a live claim (ending at `lease_end`): call Xero.
    Call { lease_end: SystemTime },
}

/// The next action of a round, from what it read.
pub fn next(facts: &Facts) -> Action {
    let Facts { rec, now, me, .. } = *facts;
    let step = decide(rec, now, me, facts.role);
    if facts.followed && !matches!(step, Step::Use | Step::Claim { .. } | Step::Wait { .. }) {
        return Action::AskServer;
    }
    match step {
        Step::Use => Action::Hand,
        Step::ReauthorizationRequired => Action::Fail(Error::ReauthorizationRequired(
            rec.reauthorization_reason
                .clone()
                .unwrap_or_else(|| "invalid_grant".to_owned()),
        )),
        Step::NoRefreshToken => Action::Fail(Error::NoRefreshToken),
        Step::UnreadableRefreshToken => Action::Fail(Error::UnreadableRefreshToken),
        Step::MissingClientCredentials => Action::Fail(Error::MissingClientCredentials),
        Step::Stopped => {
            let reason = rec.stop_reason.clone().unwrap_or_default();
            let (code, description) = match reason.split_once(": ") {
                Some((c, d)) => (c.to_owned(), Some(d.to_owned())),
                None => (reason, None),
            };
            Action::Fail(Error::Stopped { code, description })
        }
        Step::Wait { until, reason } => {
            let wait = until.duration_since(now).unwrap_or_default();
            // A holder usually stores well before its claim runs out: watch for that until
            // the deadline. A rate limit or a backoff that ends after the deadline cannot end
            // sooner: say so at once.
            let give_up = match reason {
                WaitReason::HeldBy(_) | WaitReason::NotDueYet | WaitReason::NewerProtocol(_) => {
                    facts.left.is_zero()
                }
                WaitReason::RateLimited => wait > facts.left,
            };
            if !give_up {
                return Action::Wait(wait.min(facts.left));
            }
            // Giving up is decided on the API server's answer, like every error.
            if facts.followed {
                return Action::AskServer;
            }
            Action::Fail(match reason {
                WaitReason::HeldBy(holder) => Error::Timeout(
                    facts.max_wait,
                    format!(
                        "the refresh is held by {}",
                        crate::text::sanitize(&holder, crate::text::MAX_IDENTITY_CHARS)
                    ),
                ),
                WaitReason::NewerProtocol(secret) => Error::OutdatedProtocol {
                    implemented: super::format::PROTOCOL_VERSION,
                    secret,
                },
                WaitReason::NotDueYet => Error::Timeout(
                    facts.max_wait,
                    "the stored token lives less than twice the clock skew; its refresh is not due yet"
                        .to_owned(),
                ),
                // retry-not-before: the backoff after failures, or a 429's.
                WaitReason::RateLimited if rec.failed_attempts > 0 => Error::BackingOff {
                    until,
                    failures: rec.failed_attempts,
                },
                WaitReason::RateLimited => Error::RateLimited { until },
            })
        }
        Step::Claim { replacing } => Action::Claim {
            lease_end: now + rec.settings.lease_duration,
            replacing,
        },
        Step::Refresh => Action::Call {
            lease_end: match rec.lease {
                Lease::Held { expires, .. } => expires,
                _ => now + rec.settings.lease_duration,
            },
        },
    }
}

/// When a token set Xero sent in answer to a call sent at `sent_at` expires, as stored: counted
/// from the send, since Xero counts `expires_in` from its answer, which is no earlier (or the
/// access token's own `exp`, if earlier). The stored expiry is then never later than Xero's,
/// whatever the call's latency.
pub fn stored_expiry(set: &TokenSet, sent_at: SystemTime) -> SystemTime {
    set.expires_at(sent_at)
}

/// What the holder of a claim does before it calls Xero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The refresh is due: call now.
    CallNow,
    /// Not due yet: sleep this long, then ask again.
    Sleep(Duration),
    /// Still not due after the claim's lead (the wall clock stepped back): give the claim back
    /// and decide again rather than call Xero early.
    GiveBack,
}

/// Holding a claim made ahead of the due time ([`PRODUCER_CLAIM_LEAD`]), `held` after the hold
/// began, at `now`: call once it is due, and wait no longer than the lead (plus
/// [`HOLD_SLACK`]).
pub fn hold(rec: &TokenRecord, now: SystemTime, role: Role, held: Duration) -> Hold {
    let wait = call_delay(rec, now, role);
    if wait.is_zero() {
        return Hold::CallNow;
    }
    let left = (PRODUCER_CLAIM_LEAD + HOLD_SLACK).saturating_sub(held);
    if left.is_zero() {
        return Hold::GiveBack;
    }
    Hold::Sleep(wait.max(Duration::from_micros(100)).min(left))
}

/// What a call to Xero that did not bring a token set leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterError {
    /// `invalid_grant`: find out whether another party rotated the token ([`after_invalid_grant`]).
    InvalidGrant(Option<String>),
    /// An unusable answer that did carry a new refresh token: store it (never lose it), then
    /// start over with it.
    Salvage(Sensitive),
    /// A failure a later call may not meet: [`super::retry::after_failed_call`] says whether to
    /// call again within the claim or release it with a backoff.
    Retry(Failure),
    /// An error only a configuration change can fix: release with a stop marker for these
    /// credentials (`code`, `description` become the stop reason).
    Stop {
        code: String,
        description: Option<String>,
    },
}

/// The step after a call presenting `presented` (the refresh token, for that grant) failed
/// with `err`.
pub fn after_error(err: &XeroError, presented: Option<&Sensitive>) -> AfterError {
    match err {
        XeroError::InvalidGrant(description) => AfterError::InvalidGrant(description.clone()),
        XeroError::Malformed {
            refresh_token: Some(new),
            ..
        } if Some(new) != presented => AfterError::Salvage(new.clone()),
        XeroError::RateLimited { retry_after, .. } => AfterError::Retry(Failure::RateLimited {
            retry_after: *retry_after,
        }),
        XeroError::Unreachable(_) => AfterError::Retry(Failure::Unreached),
        e if e.is_retryable() => AfterError::Retry(Failure::Transient),
        XeroError::InvalidClient => AfterError::Stop {
            code: "invalid_client".to_owned(),
            description: None,
        },
        XeroError::OAuth { code, description } => AfterError::Stop {
            code: code.clone(),
            description: description.clone(),
        },
        // Every other variant is retryable (above); kept total for the compiler.
        _ => AfterError::Retry(Failure::Transient),
    }
}

/// The `stop-reason` a stop marker carries: Xero's code and description, written sanitised and
/// cut to [`crate::text::MAX_REASON_CHARS`] (P65): a description of any length or content
/// must not make the marker's write fail, nor reach a status or a terminal as it came.
pub fn stop_reason(code: &str, description: Option<&str>) -> String {
    let raw = match description {
        Some(d) => format!("{code}: {d}"),
        None => code.to_owned(),
    };
    crate::text::sanitize(&raw, crate::text::MAX_REASON_CHARS)
}

/// The `reauthorization-reason` written with an `invalid_grant` (P65, as [`stop_reason`]).
pub fn reauthorization_reason(description: Option<&str>) -> String {
    stop_reason("invalid_grant", description)
}

/// Annotations a release writes besides the claim's end (`None` removes one).
pub type Markers = Vec<(&'static str, Option<String>)>;

/// The backoff a release publishes ([`super::retry::Next::Release`]): `retry-not-before`, and
/// `failed-attempts` after transient failures.
pub fn backoff_markers(not_before: SystemTime, failed_attempts: Option<u32>) -> Markers {
    let mut markers = vec![(ANN_RETRY_NOT_BEFORE, Some(format_time(not_before)))];
    if let Some(n) = failed_attempts {
        markers.push((ANN_FAILED_ATTEMPTS, Some(n.to_string())));
    }
    markers
}

/// The stop marker for the credentials (and refresh token) of `rec`, with its `reason`
/// ([`stop_reason`]).
pub fn stop_markers(rec: &TokenRecord, reason: String) -> Markers {
    vec![
        (ANN_STOPPED_FOR, rec.credentials_fingerprint()),
        (ANN_STOP_REASON, Some(reason)),
    ]
}

/// The re-authorisation marker for the refresh token Xero refused, with its `reason`
/// ([`reauthorization_reason`]).
pub fn reauthorization_markers(refused: Option<&Sensitive>, reason: String) -> Markers {
    vec![
        (ANN_REAUTH_FOR, refused.map(Sensitive::fingerprint)),
        (ANN_REAUTH_REASON, Some(reason)),
    ]
}

/// After `invalid_grant` for the refresh token of `presented`, with the Secret re-read from
/// the API server as `fresh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidGrant {
    /// The refresh token changed meanwhile: another party rotated it (a lost race, not a
    /// revocation). Start over; release the claim first if it is still this party's.
    Rotated { release_mine: bool },
    /// The refresh token Xero refused is still the one stored: a person must authorise again.
    /// Release with the re-authorisation marker for it.
    Refused,
}

pub fn after_invalid_grant(presented: &TokenRecord, fresh: &TokenRecord, me: &str) -> InvalidGrant {
    if fresh.refresh_token != presented.refresh_token {
        return InvalidGrant::Rotated {
            release_mine: holds(fresh, me),
        };
    }
    InvalidGrant::Refused
}

/// A store of a new token set (or of a salvaged refresh token) conflicted; the Secret is now
/// `fresh`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConflict {
    /// The Secret still holds the token state the call presented: ours is its successor.
    /// Write again on this version.
    Retry { resource_version: String },
    /// Another party already stored a newer token: ours is not needed.
    Superseded,
}

/// `ours` is the Secret as it was when the call was made.
pub fn after_store_conflict(ours: &TokenRecord, fresh: &TokenRecord) -> StoreConflict {
    if fresh.refresh_token != ours.refresh_token || fresh.access_token != ours.access_token {
        return StoreConflict::Superseded;
    }
    StoreConflict::Retry {
        resource_version: fresh.resource_version.clone().unwrap_or_default(),
    }
}

/// A release conflicted; the Secret is now `fresh`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseConflict {
    /// The claim is still this party's: release it on this version.
    Release { resource_version: String },
    /// Another party holds the claim now: never remove it; write only the markers.
    MarkersOnly { resource_version: String },
    /// Another party holds the claim and there is nothing else to write.
    Done,
}

/// `markers`: whether the release carries markers (a backoff, a stop) besides the claim's end.
pub fn after_release_conflict(fresh: &TokenRecord, me: &str, markers: bool) -> ReleaseConflict {
    let resource_version = fresh.resource_version.clone().unwrap_or_default();
    match (holds(fresh, me), markers) {
        (true, _) => ReleaseConflict::Release { resource_version },
        (false, true) => ReleaseConflict::MarkersOnly { resource_version },
        (false, false) => ReleaseConflict::Done,
    }
}

/// Whether `me` holds the claim recorded in `rec` (live or not).
fn holds(rec: &TokenRecord, me: &str) -> bool {
    matches!(&rec.lease, Lease::Held { holder, .. } if holder == me)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decide::{sample_record, test_time as t};
    use crate::protocol::format::Expiry;

    const ME: &str = "me";
    const SEC: Duration = Duration::from_secs(1);

    /// A token that expires at t(100) (skew 5 s, lease 30 s), version "7".
    fn rec() -> TokenRecord {
        sample_record(t(100), "7")
    }

    fn facts(rec: &TokenRecord, now: SystemTime, followed: bool, left: Duration) -> Facts<'_> {
        Facts {
            rec,
            now,
            me: ME,
            role: Role::Consumer,
            followed,
            left,
            max_wait: 60 * SEC,
        }
    }

    fn held_by(holder: &str, expires: SystemTime) -> Lease {
        Lease::Held {
            holder: holder.into(),
            expires,
        }
    }

    #[test]
    fn the_stored_expiry_counts_from_the_send_and_never_past_the_jwt_s_exp() {
        let set = |access_token: &str| TokenSet {
            access_token: Sensitive::new(access_token),
            refresh_token: Some(Sensitive::new("rt2")),
            expires_in: 1800,
            token_type: "Bearer".into(),
            scope: String::new(),
        };
        assert_eq!(stored_expiry(&set("at"), t(10)), t(1810));
        // A JWT whose `exp` is earlier (a replayed access token): its `exp`.
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let exp = t(900)
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after")
            .as_secs();
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"exp":{exp}}}"#))
        );
        assert_eq!(stored_expiry(&set(&jwt), t(10)), t(900));
    }

    #[test]
    fn a_usable_token_is_handed_out_even_from_the_follower_s_copy() {
        let r = rec();
        assert!(matches!(
            next(&facts(&r, t(10), true, 60 * SEC)),
            Action::Hand
        ));
    }

    #[test]
    fn errors_and_calls_are_decided_on_the_server_s_answer_only() {
        let mut stopped = rec();
        stopped.expiry = Expiry::At(t(0));
        stopped.stopped_for = stopped.credentials_fingerprint();
        stopped.stop_reason = Some("invalid_client: bad secret".into());
        assert!(matches!(
            next(&facts(&stopped, t(10), true, 60 * SEC)),
            Action::AskServer
        ));
        match next(&facts(&stopped, t(10), false, 60 * SEC)) {
            Action::Fail(Error::Stopped { code, description }) => {
                assert_eq!(code, "invalid_client");
                assert_eq!(description.as_deref(), Some("bad secret"));
            }
            other => panic!("{other:?}"),
        }
        let mut mine = rec();
        mine.expiry = Expiry::At(t(0));
        mine.lease = held_by(ME, t(40));
        assert!(matches!(
            next(&facts(&mine, t(10), true, 60 * SEC)),
            Action::AskServer
        ));
        assert!(matches!(
            next(&facts(&mine, t(10), false, 60 * SEC)),
            Action::Call { lease_end } if lease_end == t(40)
        ));
    }

    #[test]
    fn a_claim_runs_for_the_lease_from_the_read() {
        let mut r = rec();
        r.expiry = Expiry::At(t(0));
        r.lease = held_by("gone", t(1));
        match next(&facts(&r, t(10), true, 60 * SEC)) {
            Action::Claim {
                lease_end,
                replacing,
            } => {
                assert_eq!(lease_end, t(10) + r.settings.lease_duration);
                assert_eq!(replacing.as_deref(), Some("gone"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_held_claim_is_waited_for_until_the_deadline_then_a_timeout() {
        let mut r = rec();
        r.expiry = Expiry::At(t(0));
        r.lease = held_by("other", t(30));
        assert!(matches!(
            next(&facts(&r, t(10), false, 3 * SEC)),
            Action::Wait(w) if w == 3 * SEC
        ));
        assert!(matches!(
            next(&facts(&r, t(10), true, Duration::ZERO)),
            Action::AskServer
        ));
        assert!(matches!(
            next(&facts(&r, t(10), false, Duration::ZERO)),
            Action::Fail(Error::Timeout(..))
        ));
    }

    #[test]
    fn a_backoff_past_the_deadline_is_said_at_once_and_named() {
        let mut r = rec();
        r.expiry = Expiry::At(t(0));
        r.retry_not_before = Some(t(40));
        assert!(matches!(
            next(&facts(&r, t(10), false, 30 * SEC)),
            Action::Wait(w) if w == 30 * SEC
        ));
        assert!(matches!(
            next(&facts(&r, t(10), false, 29 * SEC)),
            Action::Fail(Error::RateLimited { until }) if until == t(40)
        ));
        r.failed_attempts = 2;
        assert!(matches!(
            next(&facts(&r, t(10), false, 29 * SEC)),
            Action::Fail(Error::BackingOff { failures: 2, .. })
        ));
    }

    #[test]
    fn a_claim_made_ahead_is_held_until_due_and_given_back_if_the_clock_steps_back() {
        let producer = Role::Producer {
            ahead: Duration::ZERO,
        };
        let r = rec();
        let due = t(95);
        assert_eq!(hold(&r, due, producer, Duration::ZERO), Hold::CallNow);
        let ms = Duration::from_millis(1);
        assert_eq!(
            hold(&r, due - 30 * ms, producer, Duration::ZERO),
            Hold::Sleep(30 * ms)
        );
        assert_eq!(
            hold(
                &r,
                due - 30 * ms,
                producer,
                PRODUCER_CLAIM_LEAD + HOLD_SLACK
            ),
            Hold::GiveBack
        );
        // A consumer never holds.
        assert_eq!(
            hold(&r, due - SEC, Role::Consumer, Duration::ZERO),
            Hold::CallNow
        );
    }

    #[test]
    fn each_failure_leads_to_its_own_step() {
        let rt = Sensitive::new("rt");
        let cases = [
            (
                XeroError::InvalidGrant(None),
                AfterError::InvalidGrant(None),
            ),
            (
                XeroError::Malformed {
                    reason: "html".into(),
                    refresh_token: Some(Sensitive::new("rt2")),
                },
                AfterError::Salvage(Sensitive::new("rt2")),
            ),
            // The same refresh token back is nothing to salvage.
            (
                XeroError::Malformed {
                    reason: "html".into(),
                    refresh_token: Some(Sensitive::new("rt")),
                },
                AfterError::Retry(Failure::Transient),
            ),
            (
                XeroError::RateLimited {
                    retry_after: 7 * SEC,
                    problem: "minute".into(),
                },
                AfterError::Retry(Failure::RateLimited {
                    retry_after: 7 * SEC,
                }),
            ),
            (
                XeroError::Unreachable("refused".into()),
                AfterError::Retry(Failure::Unreached),
            ),
            (
                XeroError::Unavailable(503),
                AfterError::Retry(Failure::Transient),
            ),
            (
                XeroError::Transport("timeout".into()),
                AfterError::Retry(Failure::Transient),
            ),
            (
                XeroError::OAuth {
                    code: "temporarily_unavailable".into(),
                    description: None,
                },
                AfterError::Retry(Failure::Transient),
            ),
            (
                XeroError::InvalidClient,
                AfterError::Stop {
                    code: "invalid_client".into(),
                    description: None,
                },
            ),
            (
                XeroError::OAuth {
                    code: "unauthorized_client".into(),
                    description: Some("d".into()),
                },
                AfterError::Stop {
                    code: "unauthorized_client".into(),
                    description: Some("d".into()),
                },
            ),
        ];
        for (err, want) in cases {
            assert_eq!(after_error(&err, Some(&rt)), want, "{err}");
        }
    }

    #[test]
    fn reasons_are_written_sanitised_and_bounded() {
        assert_eq!(stop_reason("invalid_client", None), "invalid_client");
        assert_eq!(
            stop_reason("unauthorized_client", Some("no\u{1b}[31m way\n")),
            "unauthorized_client: no[31m way"
        );
        let long = stop_reason("invalid_request", Some(&"x".repeat(100_000)));
        assert_eq!(long.chars().count(), crate::text::MAX_REASON_CHARS);
        assert_eq!(reauthorization_reason(None), "invalid_grant");
        assert_eq!(
            reauthorization_reason(Some("expired")),
            "invalid_grant: expired"
        );
    }

    #[test]
    fn invalid_grant_is_a_revocation_only_if_the_token_is_still_stored() {
        let presented = rec();
        let mut fresh = rec();
        fresh.resource_version = Some("9".into());
        assert_eq!(
            after_invalid_grant(&presented, &fresh, ME),
            InvalidGrant::Refused
        );
        fresh.refresh_token = Some(Sensitive::new("rt2"));
        assert_eq!(
            after_invalid_grant(&presented, &fresh, ME),
            InvalidGrant::Rotated {
                release_mine: false
            }
        );
        fresh.lease = held_by(ME, t(40));
        assert_eq!(
            after_invalid_grant(&presented, &fresh, ME),
            InvalidGrant::Rotated { release_mine: true }
        );
    }

    #[test]
    fn a_store_retries_only_while_the_presented_token_is_still_there() {
        let ours = rec();
        let mut fresh = rec();
        fresh.resource_version = Some("8".into());
        fresh.lease = held_by("other", t(40));
        assert_eq!(
            after_store_conflict(&ours, &fresh),
            StoreConflict::Retry {
                resource_version: "8".into()
            }
        );
        let mut rotated = fresh.clone();
        rotated.refresh_token = Some(Sensitive::new("rt2"));
        assert_eq!(
            after_store_conflict(&ours, &rotated),
            StoreConflict::Superseded
        );
        let mut new_access = fresh;
        new_access.access_token = Some(Sensitive::new("at2"));
        assert_eq!(
            after_store_conflict(&ours, &new_access),
            StoreConflict::Superseded
        );
    }

    #[test]
    fn a_release_never_removes_another_party_s_claim() {
        let mut fresh = rec();
        fresh.resource_version = Some("8".into());
        fresh.lease = held_by(ME, t(40));
        assert_eq!(
            after_release_conflict(&fresh, ME, false),
            ReleaseConflict::Release {
                resource_version: "8".into()
            }
        );
        fresh.lease = held_by("other", t(40));
        assert_eq!(
            after_release_conflict(&fresh, ME, false),
            ReleaseConflict::Done
        );
        assert_eq!(
            after_release_conflict(&fresh, ME, true),
            ReleaseConflict::MarkersOnly {
                resource_version: "8".into()
            }
        );
    }
}
