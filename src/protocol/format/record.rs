//! A token Secret read into a [`TokenRecord`], from the API or from the kubelet's mount.
//! Parsing never fails: a missing or garbled field becomes a value the decision functions
//! handle safely.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;

use super::*;
use crate::crd::{DEFAULT_CLOCK_SKEW_SECONDS, DEFAULT_LEASE_DURATION_SECONDS, Grant};
use crate::redact::Sensitive;
use crate::text::{MAX_IDENTITY_CHARS, sanitize};
use crate::xero::{ClientCredentials, jwt_expiry};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::format::fixtures::secret;
    use base64::Engine;
    use k8s_openapi::ByteString;
    use serde_json::json;

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
