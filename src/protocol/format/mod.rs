//! The token Secret's format (`docs/protocol.md`): its keys, labels, annotations and bounds here;
//! reading it in [`record`], what a party believes of it in [`trust`], its one time form in
//! [`time`], the writes in [`patch`]. Pure: no I/O.

use std::time::Duration;

/// Data keys.
pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";
pub const EXPIRES_AT: &str = "expires_at";
pub const TOKEN_TYPE: &str = "token_type";
pub const SCOPE: &str = "scope";
pub const TENANT_ID: &str = "tenant_id";
pub const TENANT_IDS: &str = "tenant_ids";
pub const CLIENT_ID: &str = "client_id";
pub const CLIENT_SECRET: &str = "client_secret";
/// The connection's clock skew in seconds, also in the data (the controller's copy of the
/// `clock-skew-seconds` annotation) so that readers of the mounted Secret, which see no
/// annotations, judge expiry as the API's readers do.
pub const CLOCK_SKEW_SECONDS: &str = "clock_skew_seconds";

/// Label naming the XeroConnection a token Secret belongs to (the controller watches by it).
pub const LABEL_CONNECTION: &str = "xero-operator.io/connection";

/// Annotations: protocol settings, written by the controller from the connection's spec.
pub const ANN_GRANT: &str = "xero-operator.io/grant";
pub const ANN_TOKEN_URL: &str = "xero-operator.io/token-url";
pub const ANN_SCOPES: &str = "xero-operator.io/scopes";
pub const ANN_CLOCK_SKEW: &str = "xero-operator.io/clock-skew-seconds";
pub const ANN_LEASE_DURATION: &str = "xero-operator.io/lease-duration-seconds";
/// Annotations: the refresh claim.
pub const ANN_HOLDER: &str = "xero-operator.io/refresh-holder";
pub const ANN_LEASE_EXPIRES: &str = "xero-operator.io/refresh-lease-expires";
/// Annotations: the last refresh.
pub const ANN_REFRESHED_BY: &str = "xero-operator.io/refreshed-by";
pub const ANN_REFRESHED_AT: &str = "xero-operator.io/refreshed-at";
pub const ANN_ROTATION: &str = "xero-operator.io/rotation";
/// Annotations: errors that stop everyone from calling Xero.
pub const ANN_REAUTH_FOR: &str = "xero-operator.io/reauthorization-required-for";
pub const ANN_REAUTH_REASON: &str = "xero-operator.io/reauthorization-reason";
pub const ANN_RETRY_NOT_BEFORE: &str = "xero-operator.io/retry-not-before";
/// Consecutive refreshes that ended in a transient failure (5xx, no answer, an unusable answer)
/// after all retries within a claim; `retry-not-before` then holds the backoff, which grows with
/// it. Cleared by a stored refresh.
pub const ANN_FAILED_ATTEMPTS: &str = "xero-operator.io/failed-attempts";
/// Fingerprint of the credentials (client id, client secret, refresh token) that Xero refused
/// with an error only a configuration change can fix (`invalid_client`, `unauthorized_client`,
/// …): nobody calls Xero while the Secret holds the same credentials.
pub const ANN_STOPPED_FOR: &str = "xero-operator.io/stopped-for";
/// Why: the OAuth error code and what to fix, without any token.
pub const ANN_STOP_REASON: &str = "xero-operator.io/stop-reason";

/// The revision of the protocol the Secret follows (written by the controller, which every
/// consumer may trust: consumers cannot change it under the chart's admission policy). A party
/// that finds a newer revision than it implements only reads and waits (P68). Absent: 1, the
/// revision before this annotation existed.
pub const ANN_PROTOCOL_VERSION: &str = "xero-operator.io/protocol-version";
/// The revision this implementation follows: 2 added the version itself and the admission rule
/// that refuses a claim under a stop marker (P69).
pub const PROTOCOL_VERSION: u32 = 2;

/// Fingerprint of an access token Xero refused before its expiry (a revocation, a restart of
/// the authorisation server), written by a party whose request it failed: the stored token is
/// due for refresh while it is that one (P70).
pub const ANN_REFUSED_ACCESS_TOKEN: &str = "xero-operator.io/refused-access-token";

/// The range of `clock-skew-seconds` (the CRD's `clockSkewSeconds`).
pub const CLOCK_SKEW_RANGE: std::ops::RangeInclusive<u64> = 0..=300;
/// The range of `lease-duration-seconds` (the CRD's `leaseDurationSeconds`).
pub const LEASE_DURATION_RANGE: std::ops::RangeInclusive<u64> = 5..=600;

/// How far after a reader's clock a `refreshed-at` may lie and still count: parties' clocks
/// differ, by less than the largest clock skew a connection may set.
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(*CLOCK_SKEW_RANGE.end());
/// The furthest ahead any party writes `retry-not-before`: a 429's `Retry-After` is clamped to
/// 24 hours (the backoff after failures is at most 5 minutes).
pub const MAX_RETRY_NOT_BEFORE: Duration = Duration::from_secs(24 * 3600);

mod patch;
mod record;
mod time;
mod trust;

pub use patch::*;
pub use record::*;
pub use time::*;
pub use trust::*;

#[cfg(test)]
pub(crate) mod fixtures {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    pub(crate) fn secret(data: &[(&str, &str)], ann: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.resource_version = Some("42".into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        s.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        s
    }
}
