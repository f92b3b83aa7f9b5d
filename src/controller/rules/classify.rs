//! What a failed refresh means for a connection: the `Ready` state a person sees and when the
//! controller looks again. Pure: the error, the token Secret as last read, and the clock in;
//! a state and a requeue delay out.

use std::time::{Duration, SystemTime};

use crate::controller::conditions::State;
use crate::controller::context::BACKOFF_BASE;
use crate::protocol::Error as ProtocolError;
use crate::protocol::format::{self as f, TokenRecord};
use crate::xero::XeroError;

/// Maps a protocol error to the state a person sees and when to look again.
pub fn classify(
    e: &ProtocolError,
    rec: Option<&TokenRecord>,
    recheck: Duration,
    now: SystemTime,
) -> (State, Duration) {
    match e {
        // The caller, which knows the Secret, names it in these two states.
        ProtocolError::ReauthorizationRequired(why) => (
            State::ReauthorizationRequired(
                format!("Xero refused the refresh token ({why})"),
                String::new(),
            ),
            recheck * 10,
        ),
        ProtocolError::UnreadableRefreshToken => (
            State::ReauthorizationRequired(
                "the token Secret's refresh_token is not UTF-8 text, so it cannot be one Xero \
                 issued"
                    .into(),
                String::new(),
            ),
            recheck * 10,
        ),
        ProtocolError::NoRefreshToken => {
            (State::WaitingForAuthorization(String::new()), recheck * 10)
        }
        ProtocolError::MissingClientCredentials => (
            State::MissingClientSecret("the token Secret lacks the app's credentials".into()),
            recheck,
        ),
        ProtocolError::Xero(XeroError::RateLimited {
            retry_after,
            problem,
        }) => (
            State::RateLimited(format!(
                "Xero rate limit ({problem}); retrying after {}s",
                retry_after.as_secs()
            )),
            *retry_after,
        ),
        // No call is made until the credentials change (the stop marker); the recheck only
        // reads, to notice the fix.
        ProtocolError::Stopped { code, description } => {
            let said = match description {
                Some(d) => format!("{code}: {d}"),
                None => code.clone(),
            };
            let state = match code.as_str() {
                "invalid_client" => State::InvalidClientCredentials(format!(
                    "Xero refused the app's client id or secret ({said}); fix the client Secret: \
                     no call is made until its credentials change"
                )),
                "invalid_request" => State::RequestRefused(format!(
                    "Xero refused the refresh as an invalid request ({said}); authorise again \
                     (xero-token authorize) or check the client credentials: no call is made \
                     until the refresh token or the credentials change"
                )),
                _ => State::RequestRefused(format!(
                    "Xero refused the request ({said}); check the app's grant type and scopes \
                     at developer.xero.com against spec.grant and spec.scopes: no call is made \
                     until the client credentials or the refresh token change"
                )),
            };
            (state, recheck)
        }
        // A newer operator wrote the Secret (a downgrade): this one only reads until upgraded.
        ProtocolError::OutdatedProtocol { .. } => (State::ApiError(e.to_string()), recheck * 10),
        ProtocolError::Xero(other) => (
            State::XeroUnavailable(other.to_string()),
            until_not_before(rec, now).unwrap_or(BACKOFF_BASE),
        ),
        ProtocolError::BackingOff { until, failures } => (
            State::XeroUnavailable(format!(
                "{failures} refreshes in a row failed (Xero unavailable or unusable answers); \
                 the next attempt is not before {}",
                f::format_time(*until)
            )),
            until_time(*until, now),
        ),
        ProtocolError::RateLimited { until } => (
            State::RateLimited(format!(
                "Xero asked to wait (429); the next call is not before {}",
                f::format_time(*until)
            )),
            until_time(*until, now),
        ),
        // The operator's own cap on an app's calls: looked at again when a permit is due,
        // without holding a reconcile slot meanwhile.
        ProtocolError::Throttled(wait) => {
            // No countdown in the text: a status rewritten on every throttled reconcile would
            // turn each write of a consumer's into a status write.
            let why = "the controller's calls to Xero are capped (per app: \
                --app-calls-per-minute, shared between namespaces; per connection: a minute after \
                its last refresh, or a quarter of a token's life): it refreshes when its turn \
                comes"
                .to_owned();
            let state = match rec {
                Some(r) if r.is_usable(now) => State::Refreshing(why),
                // Held back after failures: what the connection waits for is Xero.
                Some(r) if r.failed_attempts > 0 => State::XeroUnavailable(format!(
                    "{} refreshes in a row failed (Xero unavailable or unusable answers); the \
                     controller backs off",
                    r.failed_attempts
                )),
                _ => State::RateLimited(why),
            };
            // Looked at again at its turn, or when a usable token stops being so (Ready then
            // turns False on time).
            let requeue = match rec {
                Some(r) if r.is_usable(now) => (*wait).min(until_unusable(r, now)),
                _ => *wait,
            };
            (state, requeue.max(Duration::from_millis(10)))
        }
        ProtocolError::Timeout(_, why) => match rec {
            // Another party holds the claim: its store wakes the controller (the Secret is
            // watched); otherwise it looks again when the claim can be taken over.
            Some(r) if !r.is_usable(now) => (
                State::RefreshingExpired(why.clone()),
                until_claim_ends(r, now),
            ),
            // Ready while the token is usable: looked at again when it stops being so, if the
            // claim lasts longer, so that Ready never says True on an expired token.
            Some(r) => (
                State::Refreshing(why.clone()),
                until_claim_ends(r, now).min(until_unusable(r, now)),
            ),
            None => (State::Refreshing(why.clone()), Duration::from_secs(1)),
        },
        ProtocolError::EndpointNotAllowed(why) => (State::EndpointNotAllowed(why.clone()), recheck),
        ProtocolError::SecretNotFound { .. } => (State::ApiError(e.to_string()), BACKOFF_BASE),
        ProtocolError::Kube { .. } => (State::ApiError(e.to_string()), BACKOFF_BASE),
    }
}

/// How long until another party's claim on `rec` may be taken over (its end plus the clock
/// skew), at least 1 s.
fn until_claim_ends(rec: &TokenRecord, now: SystemTime) -> Duration {
    let end = match rec.lease {
        f::Lease::Held { expires, .. } => expires + rec.settings.clock_skew,
        _ => now,
    };
    end.duration_since(now)
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

/// How long until the access token of `rec` stops being usable, and a moment more.
fn until_unusable(rec: &TokenRecord, now: SystemTime) -> Duration {
    rec.usable_until()
        .and_then(|t| t.duration_since(now).ok())
        .unwrap_or_default()
        + Duration::from_millis(100)
}

/// How long until `t` (at least 1 s).
fn until_time(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now)
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

/// How long until the Secret's `retry-not-before`, if it is set and ahead (at least 1 s).
fn until_not_before(rec: Option<&TokenRecord>, now: SystemTime) -> Option<Duration> {
    let t = rec?.retry_not_before_as_of(now)?;
    Some(
        t.duration_since(now)
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;

    const RECHECK: Duration = Duration::from_secs(30);

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// A token Secret record with these annotations and an access token valid until
    /// `expires_in` from [`now`] (negative: expired).
    fn record(annotations: &[(&str, String)], expires_in: i64) -> TokenRecord {
        let expires = if expires_in >= 0 {
            now() + Duration::from_secs(expires_in.unsigned_abs())
        } else {
            now() - Duration::from_secs(expires_in.unsigned_abs())
        };
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "t",
                "annotations": annotations.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            },
            "stringData": {
                f::ACCESS_TOKEN: "opaque",
                f::EXPIRES_AT: f::format_time(expires),
            },
        }))
        .expect("secret");
        // stringData is what a client sends; a read Secret has data.
        let mut secret = secret;
        secret.data = Some(
            secret
                .string_data
                .take()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
                .collect(),
        );
        TokenRecord::from_secret(&secret)
    }

    fn check(e: ProtocolError, rec: Option<&TokenRecord>) -> (bool, &'static str, Duration) {
        let (state, requeue) = classify(&e, rec, RECHECK, now());
        (state.is_ready(), state.reason(), requeue)
    }

    #[test]
    fn what_only_a_person_can_fix_is_rechecked_slowly() {
        assert_eq!(
            check(ProtocolError::ReauthorizationRequired("x".into()), None),
            (false, "ReauthorizationRequired", RECHECK * 10)
        );
        assert_eq!(
            check(ProtocolError::UnreadableRefreshToken, None),
            (false, "ReauthorizationRequired", RECHECK * 10)
        );
        assert_eq!(
            check(ProtocolError::NoRefreshToken, None),
            (false, "WaitingForAuthorization", RECHECK * 10)
        );
        assert_eq!(
            check(ProtocolError::MissingClientCredentials, None),
            (false, "MissingClientSecret", RECHECK)
        );
        assert_eq!(
            check(ProtocolError::EndpointNotAllowed("x".into()), None),
            (false, "EndpointNotAllowed", RECHECK)
        );
    }

    #[test]
    fn a_stop_names_what_to_fix_by_its_oauth_code() {
        let stopped = |code: &str| ProtocolError::Stopped {
            code: code.into(),
            description: Some("told so".into()),
        };
        for (code, reason, hint) in [
            (
                "invalid_client",
                "InvalidClientCredentials",
                "fix the client Secret",
            ),
            ("invalid_request", "RequestRefused", "authorise again"),
            (
                "unauthorized_client",
                "RequestRefused",
                "grant type and scopes",
            ),
            ("invalid_scope", "RequestRefused", "grant type and scopes"),
            (
                "unsupported_grant_type",
                "RequestRefused",
                "grant type and scopes",
            ),
        ] {
            let (state, requeue) = classify(&stopped(code), None, RECHECK, now());
            assert_eq!((state.reason(), requeue), (reason, RECHECK), "{code}");
            assert!(!state.is_ready());
            let message = state.message();
            assert!(
                message.contains(&format!("{code}: told so")) && message.contains(hint),
                "{code}: {message}"
            );
        }
    }

    #[test]
    fn rate_limits_wait_as_long_as_xero_asked() {
        let e = ProtocolError::Xero(XeroError::RateLimited {
            retry_after: Duration::from_secs(42),
            problem: "minute".into(),
        });
        assert_eq!(
            check(e, None),
            (false, "RateLimited", Duration::from_secs(42))
        );
        // Told to wait by another party's 429: until its retry-not-before.
        assert_eq!(
            check(
                ProtocolError::RateLimited {
                    until: now() + Duration::from_secs(20)
                },
                None
            ),
            (false, "RateLimited", Duration::from_secs(20))
        );
    }

    #[test]
    fn the_operators_own_cap_requeues_at_the_next_permit() {
        let wait = Duration::from_millis(1500);
        // Due ahead of expiry (still usable): Ready, refreshing soon.
        assert_eq!(
            check(ProtocolError::Throttled(wait), Some(&record(&[], 600))),
            (true, "Refreshing", wait)
        );
        // Expired: not Ready, and why.
        let (state, requeue) = classify(
            &ProtocolError::Throttled(wait),
            Some(&record(&[], -1)),
            RECHECK,
            now(),
        );
        assert_eq!((state.reason(), requeue), ("RateLimited", wait));
        assert!(
            state.message().contains("--app-calls-per-minute"),
            "{}",
            state.message()
        );
        // Held back after failures: Xero is what it waits for.
        let failing = record(&[(f::ANN_FAILED_ATTEMPTS, "2".into())], -1);
        assert_eq!(
            check(ProtocolError::Throttled(wait), Some(&failing)),
            (false, "XeroUnavailable", wait)
        );
    }

    #[test]
    fn xero_failing_waits_for_the_shared_backoff() {
        let e = || ProtocolError::Xero(XeroError::Unavailable(503));
        assert_eq!(check(e(), None), (false, "XeroUnavailable", BACKOFF_BASE));
        let rec = record(
            &[
                (
                    f::ANN_RETRY_NOT_BEFORE,
                    f::format_time(now() + Duration::from_secs(90)),
                ),
                (f::ANN_FAILED_ATTEMPTS, "3".into()),
            ],
            -1,
        );
        assert_eq!(
            check(e(), Some(&rec)),
            (false, "XeroUnavailable", Duration::from_secs(90))
        );
        // A waiting party sees the backoff someone else published.
        let (state, requeue) = classify(
            &ProtocolError::BackingOff {
                until: now() + Duration::from_secs(90),
                failures: 3,
            },
            Some(&rec),
            RECHECK,
            now(),
        );
        assert_eq!(
            (state.reason(), requeue),
            ("XeroUnavailable", Duration::from_secs(90))
        );
        assert!(state.message().contains("3 refreshes in a row failed"));
        // A backoff already over: looked at again within a second, not at once.
        let over = record(
            &[(
                f::ANN_RETRY_NOT_BEFORE,
                f::format_time(now() - Duration::from_secs(5)),
            )],
            -1,
        );
        assert_eq!(check(e(), Some(&over)).2, Duration::from_secs(1));
    }

    #[test]
    fn another_partys_claim_is_ready_only_while_the_token_is_usable() {
        let claim = |expires_in| {
            record(
                &[
                    (f::ANN_HOLDER, "consumer/1".into()),
                    (
                        f::ANN_LEASE_EXPIRES,
                        f::format_time(now() + Duration::from_secs(10)),
                    ),
                    (f::ANN_CLOCK_SKEW, "5".into()),
                ],
                expires_in,
            )
        };
        let waiting = || ProtocolError::Timeout(Duration::ZERO, "held".into());
        // Looked at again when the claim may be taken over: its end plus the skew.
        assert_eq!(
            check(waiting(), Some(&claim(600))),
            (true, "Refreshing", Duration::from_secs(15))
        );
        assert_eq!(
            check(waiting(), Some(&claim(-1))),
            (false, "Refreshing", Duration::from_secs(15))
        );
        assert_eq!(
            check(waiting(), None),
            (true, "Refreshing", Duration::from_secs(1))
        );
        // A token that stops being usable before the claim ends: looked at again then, so
        // Ready turns False on time.
        assert_eq!(
            check(waiting(), Some(&claim(8))),
            (true, "Refreshing", Duration::from_millis(3100))
        );
    }

    #[test]
    fn kubernetes_errors_are_named_and_retried_with_backoff() {
        let e = ProtocolError::SecretNotFound {
            namespace: "n".into(),
            name: "t".into(),
        };
        assert_eq!(check(e, None), (false, "KubernetesApiError", BACKOFF_BASE));
    }
}
