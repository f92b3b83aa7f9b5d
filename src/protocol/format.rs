//! The token Secret's format: its keys, labels and annotations (`docs/protocol.md`), parsed into
//! a [`TokenRecord`] and written back as merge patches. Pure: no I/O.
//!
//! Parsing never fails: a missing or garbled field becomes a value the decision function handles
//! safely (an unparsable expiry is an expired token, an unparsable lease is no lease).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use crate::crd::{DEFAULT_CLOCK_SKEW_SECONDS, DEFAULT_LEASE_DURATION_SECONDS, Grant};
use crate::redact::Sensitive;
use crate::text::{MAX_IDENTITY_CHARS, sanitize};
use crate::xero::{ClientCredentials, TokenSet, jwt_expiry};

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

/// What a party knows from a better source than the token Secret, and uses instead of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted {
    /// The protocol settings (the controller: from the connection's spec).
    pub settings: Option<Settings>,
    /// The app's credentials (the controller: from the connection's client Secret).
    pub client: Option<ClientCredentials>,
}

/// When the access token expires, as far as the Secret says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Missing,
    Unparsable,
    At(SystemTime),
}

/// The refresh claim recorded on the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    None,
    /// A holder annotation without a readable expiry: treated as no claim.
    Unparsable {
        holder: String,
    },
    Held {
        holder: String,
        expires: SystemTime,
    },
}

/// The protocol settings carried by the Secret's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub grant: Grant,
    pub token_url: Option<String>,
    pub scopes: Vec<String>,
    pub clock_skew: Duration,
    pub lease_duration: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grant: Grant::RefreshToken,
            token_url: None,
            scopes: Vec::new(),
            clock_skew: Duration::from_secs(DEFAULT_CLOCK_SKEW_SECONDS.into()),
            lease_duration: Duration::from_secs(DEFAULT_LEASE_DURATION_SECONDS.into()),
        }
    }
}

/// A token Secret as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub resource_version: Option<String>,
    pub access_token: Option<Sensitive>,
    pub refresh_token: Option<Sensitive>,
    /// A `refresh_token` is stored but is not UTF-8 text, so it cannot be one Xero issued.
    pub refresh_token_unreadable: bool,
    pub expiry: Expiry,
    pub token_type: String,
    pub scope: String,
    /// The tenant ids: `tenant_ids`, or `tenant_id` when that is the only key.
    pub tenant_ids: Vec<String>,
    /// The `tenant_id` key as stored (readers of one tenant use it alone, so it is checked on
    /// its own).
    pub tenant_id: Option<String>,
    /// Whether the `tenant_ids` key holds any tenant (`tenant_ids` above may come from
    /// `tenant_id` alone).
    pub tenant_list_stored: bool,
    pub client: Option<ClientCredentials>,
    pub settings: Settings,
    pub lease: Lease,
    /// Fingerprint of a refresh token Xero refused with `invalid_grant`.
    pub reauthorization_required_for: Option<String>,
    /// Fingerprint of an access token Xero refused before its expiry ([`ANN_REFUSED_ACCESS_TOKEN`]).
    pub refused_access_token: Option<String>,
    pub reauthorization_reason: Option<String>,
    /// A 429 answered, or the backoff after transient failures: nobody calls Xero for this
    /// token before then.
    pub retry_not_before: Option<SystemTime>,
    /// Consecutive transient failures (the backoff's exponent).
    pub failed_attempts: u32,
    /// Fingerprint of the credentials Xero refused for good ([`ANN_STOPPED_FOR`]).
    pub stopped_for: Option<String>,
    /// Why ([`ANN_STOP_REASON`]), sanitised.
    pub stop_reason: Option<String>,
    pub refreshed_by: Option<String>,
    pub refreshed_at: Option<SystemTime>,
    pub rotation: u64,
    /// The protocol revision the Secret follows ([`ANN_PROTOCOL_VERSION`]; 1 when absent or
    /// unparsable).
    pub protocol_version: u32,
}

impl PartialEq for ClientCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.client_id == other.client_id && self.client_secret == other.client_secret
    }
}
impl Eq for ClientCredentials {}

/// RFC 3339 UTC with milliseconds.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 time in UTC: `YYYY-MM-DDTHH:MM:SS`, an optional fraction, and `Z`
/// (P52). Anything else is unparsable, an offset included: humantime's parser would read
/// `…00.000+05:30` as UTC, hours off.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let t = time.as_bytes();
    let well_formed = date.len() == 10
        && date.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && t.len() >= 8
        && t[2] == b':'
        && t[5] == b':'
        && (t.len() == 8 || (t[8] == b'.' && t.len() > 9))
        && t.iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 2 | 5 | 8) || b.is_ascii_digit());
    if !well_formed {
        return None;
    }
    humantime::parse_rfc3339_weak(s).ok()
}

/// Whether `key` holds bytes that are not UTF-8 text ([`text`] reads them as absent).
fn unreadable(data: &BTreeMap<String, k8s_openapi::ByteString>, key: &str) -> bool {
    data.get(key)
        .is_some_and(|v| std::str::from_utf8(&v.0).is_err())
}

fn text(data: &BTreeMap<String, k8s_openapi::ByteString>, key: &str) -> Option<String> {
    let bytes = &data.get(key)?.0;
    let s = String::from_utf8(bytes.clone()).ok()?;
    let s = s.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

impl TokenRecord {
    /// Reads a token Secret. Never fails: see the module docs.
    pub fn from_secret(secret: &Secret) -> Self {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let ann_empty = BTreeMap::new();
        let ann = secret.metadata.annotations.as_ref().unwrap_or(&ann_empty);
        Self::from_parts(secret.metadata.resource_version.clone(), data, ann)
    }

    fn from_parts(
        resource_version: Option<String>,
        data: &BTreeMap<String, k8s_openapi::ByteString>,
        ann: &BTreeMap<String, String>,
    ) -> Self {
        let a = |k: &str| {
            ann.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        // Settings are consumer-writable: a value outside the CRD's range is clamped into it,
        // so no hand edit can overflow the time arithmetic or stretch a claim without bound.
        let seconds = |k: &str, default: Duration, range: std::ops::RangeInclusive<u64>| {
            a(k).and_then(|v| v.parse::<u64>().ok())
                .map_or(default, |v| {
                    Duration::from_secs(v.clamp(*range.start(), *range.end()))
                })
        };
        let defaults = Settings::default();
        let settings = Settings {
            grant: match a(ANN_GRANT).as_deref() {
                Some("ClientCredentials") => Grant::ClientCredentials,
                _ => Grant::RefreshToken,
            },
            token_url: a(ANN_TOKEN_URL),
            scopes: a(ANN_SCOPES)
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            clock_skew: seconds(ANN_CLOCK_SKEW, defaults.clock_skew, CLOCK_SKEW_RANGE),
            lease_duration: seconds(
                ANN_LEASE_DURATION,
                defaults.lease_duration,
                LEASE_DURATION_RANGE,
            ),
        };
        let access_token = text(data, ACCESS_TOKEN).map(Sensitive::new);
        let expiry = match text(data, EXPIRES_AT) {
            None => Expiry::Missing,
            Some(s) => parse_time(&s).map_or(Expiry::Unparsable, Expiry::At),
        };
        // The stored expiry is only a claim: an access token that is a JWT (Xero's are) says
        // itself when it expires, and a hand-edited `expires_at` later than that must not keep
        // an expired token in use.
        let expiry = match (
            expiry,
            access_token.as_ref().and_then(|t| jwt_expiry(t.expose())),
        ) {
            (Expiry::At(at), Some(exp)) if exp < at => Expiry::At(exp),
            (e, _) => e,
        };
        let lease = match a(ANN_HOLDER) {
            None => Lease::None,
            Some(holder) => match a(ANN_LEASE_EXPIRES).as_deref().and_then(parse_time) {
                Some(expires) => Lease::Held { holder, expires },
                None => Lease::Unparsable { holder },
            },
        };
        let client = match (text(data, CLIENT_ID), text(data, CLIENT_SECRET)) {
            (Some(client_id), Some(secret)) => Some(ClientCredentials {
                client_id,
                client_secret: Sensitive::new(secret),
            }),
            _ => None,
        };
        let mut tenant_ids: Vec<String> = text(data, TENANT_IDS)
            .map(|s| {
                s.split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let tenant_id = text(data, TENANT_ID);
        let tenant_list_stored = !tenant_ids.is_empty();
        if tenant_ids.is_empty()
            && let Some(t) = &tenant_id
        {
            tenant_ids.push(t.clone());
        }
        Self {
            resource_version,
            access_token,
            refresh_token: text(data, REFRESH_TOKEN).map(Sensitive::new),
            refresh_token_unreadable: unreadable(data, REFRESH_TOKEN),
            expiry,
            token_type: text(data, TOKEN_TYPE).unwrap_or_else(|| "Bearer".to_owned()),
            scope: text(data, SCOPE).unwrap_or_default(),
            tenant_ids,
            tenant_id,
            tenant_list_stored,
            client,
            settings,
            lease,
            reauthorization_required_for: a(ANN_REAUTH_FOR),
            refused_access_token: a(ANN_REFUSED_ACCESS_TOKEN),
            // Consumer-writable text that reaches status, Events and logs: sanitised here.
            reauthorization_reason: a(ANN_REAUTH_REASON)
                .map(|r| sanitize(&r, crate::text::MAX_REASON_CHARS)),
            retry_not_before: a(ANN_RETRY_NOT_BEFORE).as_deref().and_then(parse_time),
            failed_attempts: a(ANN_FAILED_ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            stopped_for: a(ANN_STOPPED_FOR),
            stop_reason: a(ANN_STOP_REASON).map(|r| sanitize(&r, crate::text::MAX_REASON_CHARS)),
            refreshed_by: a(ANN_REFRESHED_BY).map(|r| sanitize(&r, MAX_IDENTITY_CHARS)),
            refreshed_at: a(ANN_REFRESHED_AT).as_deref().and_then(parse_time),
            rotation: a(ANN_ROTATION).and_then(|v| v.parse().ok()).unwrap_or(0),
            protocol_version: a(ANN_PROTOCOL_VERSION)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        }
    }

    /// The fingerprint of what a refresh presents: client id, client secret and (for the
    /// refresh-token grant) the refresh token. A stop marker names it, so a change of any of
    /// them lifts the stop.
    pub fn credentials_fingerprint(&self) -> Option<String> {
        let app = self.client.as_ref()?;
        let rt = match self.settings.grant {
            Grant::RefreshToken => self.refresh_token.as_ref().map_or("", Sensitive::expose),
            Grant::ClientCredentials => "",
        };
        Some(
            Sensitive::new(format!(
                "{}\n{}\n{rt}",
                app.client_id,
                app.client_secret.expose()
            ))
            .fingerprint(),
        )
    }

    /// `refreshed-at`, unless it lies more than [`FUTURE_TOLERANCE`] after `now`: a time no
    /// refresh can have written yet (a hand edit, a clock far ahead) is not shown, and does not
    /// start the refresh token's idle countdown or the last-refresh metric.
    pub fn refreshed_at_as_of(&self, now: SystemTime) -> Option<SystemTime> {
        self.refreshed_at.filter(|at| {
            now.checked_add(FUTURE_TOLERANCE)
                .is_none_or(|limit| *at <= limit)
        })
    }

    /// `retry-not-before`, unless it lies further ahead of `now` than any party writes one
    /// ([`MAX_RETRY_NOT_BEFORE`] plus the clock skew): such a marker (a hand edit of `2099-…`)
    /// counts as absent instead of freezing every party's refreshes.
    pub fn retry_not_before_as_of(&self, now: SystemTime) -> Option<SystemTime> {
        let limit = now.checked_add(MAX_RETRY_NOT_BEFORE + self.settings.clock_skew);
        self.retry_not_before
            .filter(|at| limit.is_none_or(|limit| *at <= limit))
    }

    /// This record with what `trusted` knows better put in place of what the Secret says: the
    /// controller reads its settings and the app's credentials from the connection and its
    /// client Secret, never from the token Secret, which every consumer may write.
    pub fn trusting(mut self, trusted: &Trusted) -> Self {
        if let Some(settings) = &trusted.settings {
            self.settings = settings.clone();
        }
        if let Some(client) = &trusted.client {
            self.client = Some(client.clone());
        }
        self
    }

    /// Reads the kubelet's projection of a token Secret mounted as a directory: one file per key
    /// (through the `..data` symlink). Only the data keys exist there, no annotations.
    pub fn from_dir(dir: &std::path::Path, default_clock_skew: Duration) -> std::io::Result<Self> {
        let mut data = BTreeMap::new();
        for key in [
            ACCESS_TOKEN,
            REFRESH_TOKEN,
            EXPIRES_AT,
            TOKEN_TYPE,
            SCOPE,
            TENANT_ID,
            TENANT_IDS,
            CLOCK_SKEW_SECONDS,
        ] {
            match std::fs::read(dir.join(key)) {
                Ok(bytes) => {
                    data.insert(key.to_owned(), k8s_openapi::ByteString(bytes));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if data.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} holds no token keys", dir.display()),
            ));
        }
        // The mount has no annotations: the skew comes from its data copy when the controller
        // wrote one, else from the caller (parsed, clamped and defaulted like the annotation).
        let skew = data
            .remove(CLOCK_SKEW_SECONDS)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_else(|| default_clock_skew.as_secs().to_string());
        let annotations = BTreeMap::from([(ANN_CLOCK_SKEW.to_owned(), skew)]);
        Ok(Self::from_parts(None, &data, &annotations))
    }
}

fn b64(s: &str) -> Value {
    Value::String(STANDARD.encode(s))
}

/// A merge patch, conditional on `resource_version`, setting `annotations` (`None` removes one).
pub fn annotations_patch(resource_version: &str, annotations: &[(&str, Option<String>)]) -> Value {
    let ann: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                v.clone().map_or(Value::Null, Value::String),
            )
        })
        .collect();
    json!({"metadata": {"resourceVersion": resource_version, "annotations": ann}})
}

/// The claim: this party holds the refresh until `expires`.
pub fn claim_patch(resource_version: &str, holder: &str, expires: SystemTime) -> Value {
    annotations_patch(
        resource_version,
        &[
            (ANN_HOLDER, Some(holder.to_owned())),
            (ANN_LEASE_EXPIRES, Some(format_time(expires))),
        ],
    )
}

/// The release of a claim, optionally recording an error for everyone.
pub fn release_patch(resource_version: &str, extra: &[(&str, Option<String>)]) -> Value {
    let mut annotations = vec![(ANN_HOLDER, None), (ANN_LEASE_EXPIRES, None)];
    annotations.extend_from_slice(extra);
    annotations_patch(resource_version, &annotations)
}

/// Writes a new token set and releases the claim in one conditional write. When the answer has
/// no refresh token (client-credentials grant), the stored one is left as it is.
pub fn token_patch(
    resource_version: &str,
    set: &TokenSet,
    expires_at: SystemTime,
    refreshed_by: &str,
    now: SystemTime,
    rotation: u64,
) -> Value {
    let mut data = serde_json::Map::new();
    data.insert(ACCESS_TOKEN.into(), b64(set.access_token.expose()));
    if let Some(rt) = &set.refresh_token {
        data.insert(REFRESH_TOKEN.into(), b64(rt.expose()));
    }
    data.insert(EXPIRES_AT.into(), b64(&format_time(expires_at)));
    data.insert(TOKEN_TYPE.into(), b64(&set.token_type));
    data.insert(SCOPE.into(), b64(&set.scope));
    let mut patch = rotation_patch(resource_version, refreshed_by, now, rotation, true);
    patch["data"] = Value::Object(data);
    patch
}

/// Releases the claim recording a rotation (who, when, the counter) and clearing the stop
/// markers of the credentials it replaced; with `clear_backoff`, the backoff too.
fn rotation_patch(
    resource_version: &str,
    refreshed_by: &str,
    now: SystemTime,
    rotation: u64,
    clear_backoff: bool,
) -> Value {
    let mut annotations = vec![
        (ANN_REFRESHED_BY, Some(refreshed_by.to_owned())),
        (ANN_REFRESHED_AT, Some(format_time(now))),
        (ANN_ROTATION, Some(rotation.to_string())),
        (ANN_REAUTH_FOR, None),
        (ANN_REAUTH_REASON, None),
        (ANN_STOPPED_FOR, None),
        (ANN_STOP_REASON, None),
        (ANN_REFUSED_ACCESS_TOKEN, None),
    ];
    if clear_backoff {
        annotations.extend([(ANN_RETRY_NOT_BEFORE, None), (ANN_FAILED_ATTEMPTS, None)]);
    }
    release_patch(resource_version, &annotations)
}

/// Stores a new refresh token from an unusable answer, with no usable access token, so the
/// rotated token is not lost; the next party refreshes with it.
pub fn salvage_patch(
    resource_version: &str,
    refresh_token: &Sensitive,
    refreshed_by: &str,
    now: SystemTime,
    rotation: u64,
) -> Value {
    // A rotation like any other (the refresh token changed): counted, attributed, and the stop
    // markers of the old credentials cleared; the answer was unusable, so the backoff stays.
    let mut patch = rotation_patch(resource_version, refreshed_by, now, rotation, false);
    patch["data"] = json!({
        REFRESH_TOKEN: b64(refresh_token.expose()),
        EXPIRES_AT: b64(&format_time(now)),
        ACCESS_TOKEN: Value::Null,
    });
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &str)], ann: &[(&str, &str)]) -> Secret {
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

    /// The stop marker's fingerprint (docs/protocol.md, step 2.4): client id, client secret and
    /// refresh token joined by newlines; the refresh token empty for client credentials.
    #[test]
    fn the_credentials_fingerprint_is_pinned() {
        let creds = [
            (CLIENT_ID, "emulator-client"),
            (CLIENT_SECRET, "emulator-secret"),
            (REFRESH_TOKEN, "rt-1"),
        ];
        let rec = TokenRecord::from_secret(&secret(&creds, &[]));
        assert_eq!(
            rec.credentials_fingerprint().as_deref(),
            Some("5de69f8bbbe8cf80")
        );
        let cc = TokenRecord::from_secret(&secret(&creds, &[(ANN_GRANT, "ClientCredentials")]));
        assert_eq!(
            cc.credentials_fingerprint().as_deref(),
            Some("32b28f6337ecd872")
        );
    }

    #[test]
    fn a_future_refreshed_at_and_a_far_retry_not_before_count_as_absent() {
        let now = parse_time("2030-01-01T00:00:00Z").expect("time");
        let rec = |refreshed: &str, not_before: &str| {
            TokenRecord::from_secret(&secret(
                &[],
                &[
                    (ANN_REFRESHED_AT, refreshed),
                    (ANN_RETRY_NOT_BEFORE, not_before),
                    (ANN_CLOCK_SKEW, "5"),
                ],
            ))
        };
        // Within a clock's difference: as written.
        let near = rec("2030-01-01T00:04:59Z", "2030-01-02T00:00:05Z");
        assert!(near.refreshed_at_as_of(now).is_some());
        assert!(near.retry_not_before_as_of(now).is_some());
        // Further than any party writes: a hand edit, ignored.
        let far = rec("2030-01-01T00:05:01Z", "2030-01-02T00:00:06Z");
        assert_eq!(far.refreshed_at_as_of(now), None);
        assert_eq!(far.retry_not_before_as_of(now), None);
        let absurd = rec("2099-01-01T00:00:00Z", "2099-01-01T00:00:00Z");
        assert_eq!(absurd.refreshed_at_as_of(now), None);
        assert_eq!(absurd.retry_not_before_as_of(now), None);
        // The past is always plausible.
        let past = rec("2029-01-01T00:00:00Z", "2029-01-01T00:00:00Z");
        assert!(past.refreshed_at_as_of(now).is_some());
        assert!(past.retry_not_before_as_of(now).is_some());
    }

    #[test]
    fn trusted_settings_and_credentials_replace_what_the_secret_says() {
        let forged = TokenRecord::from_secret(&secret(
            &[
                (CLIENT_ID, "rogue-app"),
                (CLIENT_SECRET, "rogue"),
                (REFRESH_TOKEN, "rt"),
            ],
            &[
                (ANN_TOKEN_URL, "http://attacker.example/token"),
                (ANN_CLOCK_SKEW, "300"),
                (ANN_GRANT, "ClientCredentials"),
            ],
        ));
        let app = ClientCredentials {
            client_id: "real-app".into(),
            client_secret: Sensitive::new("real"),
        };
        let settings = Settings {
            token_url: Some("https://identity.xero.com/connect/token".into()),
            ..Settings::default()
        };
        let trusted = Trusted {
            settings: Some(settings.clone()),
            client: Some(app.clone()),
        };
        let rec = forged.clone().trusting(&trusted);
        assert_eq!(rec.client, Some(app));
        assert_eq!(rec.settings, settings);
        // The protocol's own fields stay as the Secret says.
        assert_eq!(rec.refresh_token, forged.refresh_token);
        // Nothing trusted: nothing replaced.
        assert_eq!(forged.clone().trusting(&Trusted::default()), forged);
    }

    #[test]
    fn a_complete_secret_parses() {
        let r = TokenRecord::from_secret(&secret(
            &[
                (ACCESS_TOKEN, "at"),
                (REFRESH_TOKEN, "rt\n"),
                (EXPIRES_AT, "2030-01-01T00:00:00Z"),
                (TENANT_IDS, "t1, t2"),
                (CLIENT_ID, "app"),
                (CLIENT_SECRET, "s"),
            ],
            &[
                (ANN_HOLDER, "pod-a"),
                (ANN_LEASE_EXPIRES, "2030-01-01T00:00:30.000Z"),
                (ANN_CLOCK_SKEW, "0"),
                (ANN_GRANT, "ClientCredentials"),
                (ANN_ROTATION, "7"),
            ],
        ));
        assert_eq!(r.resource_version.as_deref(), Some("42"));
        assert_eq!(r.refresh_token.as_ref().map(Sensitive::expose), Some("rt"));
        assert_eq!(
            r.expiry,
            Expiry::At(parse_time("2030-01-01T00:00:00Z").expect("time"))
        );
        assert_eq!(r.tenant_ids, ["t1", "t2"]);
        assert_eq!(r.client.as_ref().map(|c| c.client_id.as_str()), Some("app"));
        assert!(matches!(r.lease, Lease::Held { ref holder, .. } if holder == "pod-a"));
        assert_eq!(r.settings.clock_skew, Duration::ZERO);
        assert_eq!(r.settings.grant, Grant::ClientCredentials);
        assert_eq!(r.rotation, 7);
    }

    #[test]
    fn a_stored_expiry_later_than_the_jwt_exp_is_cut_to_it() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwt = |exp: u64| {
            format!(
                "{}.{}.sig",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256"}"#),
                URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#))
            )
        };
        let exp = 1_900_000_000;
        let at_exp = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
        let r = TokenRecord::from_secret(&secret(
            &[
                (ACCESS_TOKEN, &jwt(exp)),
                (EXPIRES_AT, "9999-12-31T23:59:59Z"),
            ],
            &[],
        ));
        assert_eq!(r.expiry, Expiry::At(at_exp));
        // An earlier stored expiry stands (the stored one already includes rounding).
        let r = TokenRecord::from_secret(&secret(
            &[
                (ACCESS_TOKEN, &jwt(exp)),
                (EXPIRES_AT, "2000-01-01T00:00:00Z"),
            ],
            &[],
        ));
        assert_eq!(
            r.expiry,
            Expiry::At(parse_time("2000-01-01T00:00:00Z").expect("time"))
        );
        // An `exp` past the clock's range is ignored, not a panic.
        let r = TokenRecord::from_secret(&secret(
            &[
                (ACCESS_TOKEN, &jwt(u64::MAX)),
                (EXPIRES_AT, "2000-01-01T00:00:00Z"),
            ],
            &[],
        ));
        assert!(matches!(r.expiry, Expiry::At(_)));
    }

    #[test]
    fn only_utc_times_with_z_parse() {
        let ok = [
            "2026-11-23T10:15:00Z",
            "2026-11-23T10:15:00.000Z",
            "2026-11-23T10:15:00.5Z",
            " 2026-11-23T10:15:00Z\n",
        ];
        for t in ok {
            assert!(parse_time(t).is_some(), "{t:?}");
        }
        assert_eq!(
            parse_time("2026-11-23T10:15:00.250Z"),
            parse_time("2026-11-23T10:15:00Z").map(|t| t + std::time::Duration::from_millis(250))
        );
        let bad = [
            "2026-11-23T10:15:00.000+05:30",
            "2026-11-23T10:15:00+00:00",
            "2026-11-23T10:15:00",
            "2026-11-23t10:15:00z",
            "2026-11-23T10:15:00z",
            "2026-11-23 10:15:00Z",
            "2026-11-23T10:15Z",
            "2026-11-23T10:15:00.Z",
            "2026-11-23T10:15:00Zjunk",
            "2026-11-23T10:15:60.5.5Z",
            "1969-12-31T23:59:59Z",
            "",
        ];
        for t in bad {
            assert_eq!(parse_time(t), None, "{t:?}");
        }
    }

    #[test]
    fn unparsable_markers_and_counters_are_absent_or_zero() {
        for garbage in ["-1", "x", "1e3", "99999999999999999999999", " "] {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": "t", "annotations": {
                    ANN_RETRY_NOT_BEFORE: garbage,
                    ANN_FAILED_ATTEMPTS: garbage,
                    ANN_ROTATION: garbage,
                }},
            }))
            .expect("a Secret");
            let rec = TokenRecord::from_secret(&secret);
            assert_eq!(
                (rec.retry_not_before, rec.failed_attempts, rec.rotation),
                (None, 0, 0),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn settings_out_of_range_are_clamped_so_no_arithmetic_overflows() {
        let r = TokenRecord::from_secret(&secret(
            &[],
            &[
                (ANN_CLOCK_SKEW, "18446744073709551615"),
                (ANN_LEASE_DURATION, "18446744073709551615"),
                (ANN_ROTATION, "18446744073709551615"),
            ],
        ));
        assert_eq!(r.settings.clock_skew, Duration::from_secs(300));
        assert_eq!(r.settings.lease_duration, Duration::from_secs(600));
        let r = TokenRecord::from_secret(&secret(&[], &[(ANN_LEASE_DURATION, "0")]));
        assert_eq!(r.settings.lease_duration, Duration::from_secs(5));
    }

    #[test]
    fn consumer_written_text_is_sanitised() {
        let r = TokenRecord::from_secret(&secret(
            &[],
            &[
                (ANN_REFRESHED_BY, "pod\u{1b}[31m\nREADY True"),
                (ANN_REAUTH_REASON, &"x".repeat(10_000)),
            ],
        ));
        assert_eq!(r.refreshed_by.as_deref(), Some("pod[31mREADY True"));
        assert!(
            r.reauthorization_reason.expect("reason").chars().count()
                <= crate::text::MAX_REASON_CHARS
        );
    }

    #[test]
    fn garbage_parses_into_safe_values() {
        let r = TokenRecord::from_secret(&secret(
            &[(EXPIRES_AT, "tomorrow-ish"), (ACCESS_TOKEN, "")],
            &[
                (ANN_HOLDER, "pod-a"),
                (ANN_LEASE_EXPIRES, "not a time"),
                (ANN_CLOCK_SKEW, "-3"),
                (ANN_LEASE_DURATION, "lots"),
            ],
        ));
        assert_eq!(r.expiry, Expiry::Unparsable);
        assert!(r.access_token.is_none(), "an empty value is no value");
        assert_eq!(
            r.lease,
            Lease::Unparsable {
                holder: "pod-a".into()
            }
        );
        assert_eq!(r.settings, Settings::default());
        let empty = TokenRecord::from_secret(&Secret::default());
        assert_eq!(empty.expiry, Expiry::Missing);
        assert!(empty.client.is_none());
        let binary = TokenRecord::from_secret(&Secret {
            data: Some([(REFRESH_TOKEN.to_owned(), ByteString(vec![0xff, 0xfe]))].into()),
            ..Secret::default()
        });
        assert!(binary.refresh_token.is_none(), "non-UTF-8 is no token");
        assert!(
            binary.refresh_token_unreadable,
            "and is told apart from none"
        );
        assert!(!empty.refresh_token_unreadable);
    }

    #[test]
    fn a_single_tenant_key_is_read_too() {
        let r = TokenRecord::from_secret(&secret(&[(TENANT_ID, "t9")], &[]));
        assert_eq!(r.tenant_ids, ["t9"]);
    }

    #[test]
    fn the_token_patch_is_conditional_and_releases_the_claim() {
        let set = TokenSet {
            access_token: Sensitive::new("at2"),
            refresh_token: Some(Sensitive::new("rt2")),
            expires_in: 1800,
            token_type: "Bearer".into(),
            scope: "offline_access".into(),
        };
        let now = parse_time("2030-01-01T00:00:00Z").expect("t");
        let p = token_patch("42", &set, now + Duration::from_secs(1800), "pod-a", now, 8);
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert_eq!(p["metadata"]["annotations"][ANN_HOLDER], Value::Null);
        assert_eq!(p["metadata"]["annotations"][ANN_ROTATION], "8");
        assert_eq!(p["data"][REFRESH_TOKEN], STANDARD.encode("rt2"));
        assert_eq!(
            p["data"][EXPIRES_AT],
            STANDARD.encode("2030-01-01T00:30:00.000Z")
        );
        let no_rt = TokenSet {
            refresh_token: None,
            ..set
        };
        let p = token_patch("42", &no_rt, now, "pod-a", now, 9);
        assert!(
            p["data"].get(REFRESH_TOKEN).is_none(),
            "the stored refresh token stays"
        );
    }

    #[test]
    fn from_dir_reads_the_kubelet_layout() {
        let dir = tempfile::tempdir().expect("dir");
        // The kubelet writes files in a timestamped dir and links ..data and each key to it.
        let real = dir.path().join("..2026_01_01_00_00_00.000");
        std::fs::create_dir(&real).expect("mkdir");
        std::fs::write(real.join(ACCESS_TOKEN), "at").expect("write");
        std::fs::write(real.join(EXPIRES_AT), "2030-01-01T00:00:00Z").expect("write");
        std::os::unix::fs::symlink(&real, dir.path().join("..data")).expect("link");
        for key in [ACCESS_TOKEN, EXPIRES_AT] {
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.path().join(key))
                .expect("link");
        }
        let r = TokenRecord::from_dir(dir.path(), Duration::from_secs(7)).expect("read");
        assert_eq!(r.access_token.as_ref().map(Sensitive::expose), Some("at"));
        assert!(r.resource_version.is_none());
        assert_eq!(
            r.settings.clock_skew,
            Duration::from_secs(7),
            "the caller's skew"
        );
        // The controller's copy of the connection's skew wins, parsed like the annotation.
        std::fs::write(real.join(CLOCK_SKEW_SECONDS), "42").expect("write");
        std::os::unix::fs::symlink(
            format!("..data/{CLOCK_SKEW_SECONDS}"),
            dir.path().join(CLOCK_SKEW_SECONDS),
        )
        .expect("link");
        let r = TokenRecord::from_dir(dir.path(), Duration::from_secs(7)).expect("read");
        assert_eq!(r.settings.clock_skew, Duration::from_secs(42));
        std::fs::write(real.join(CLOCK_SKEW_SECONDS), "99999").expect("write");
        let r = TokenRecord::from_dir(dir.path(), Duration::from_secs(7)).expect("read");
        assert_eq!(r.settings.clock_skew, Duration::from_secs(300), "clamped");
        let empty = tempfile::tempdir().expect("dir");
        assert!(TokenRecord::from_dir(empty.path(), Duration::ZERO).is_err());
    }
}
