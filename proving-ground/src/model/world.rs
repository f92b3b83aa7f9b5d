//! The world the parties act in: the API server's copy of the token Secret (a versioned
//! compare-and-swap store that applies the product's own merge patches, with the version
//! before it for a follower that lags), and Xero's token endpoint (rotation with a grace
//! period, replays, the faults it can answer with). Times are whole ticks of [`TICK`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde_json::Value;
use xero_operator::protocol::TokenRecord;
use xero_operator::protocol::format as f;
use xero_operator::redact::Sensitive;
use xero_operator::xero::TokenSet;

/// One step of the model's clock.
pub const TICK: Duration = Duration::from_secs(5);
/// The model's epoch (any fixed time).
pub const EPOCH_SECS: u64 = 1_800_000_000;

/// Tick `t` as a wall-clock time, shifted by a party's clock offset.
pub fn at(ticks: u8, offset: Duration, ahead: bool) -> SystemTime {
    let true_time = SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS) + TICK * ticks.into();
    if ahead {
        true_time + offset
    } else {
        true_time - offset
    }
}

/// The token Secret as the API server holds it: its version and its text (data decoded).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct StoredSecret {
    pub version: u32,
    pub data: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Landed,
    /// 409: the version named is not the current one.
    Conflict,
}

impl StoredSecret {
    /// The Secret as a reader gets it.
    pub fn to_secret(&self) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.name = Some("token".into());
        secret.metadata.resource_version = Some(self.version.to_string());
        secret.metadata.annotations = Some(self.annotations.clone());
        secret.data = Some(
            self.data
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        );
        secret
    }

    pub fn record(&self) -> TokenRecord {
        TokenRecord::from_secret(&self.to_secret())
    }

    /// Applies a JSON merge patch as the API server does: conditional when it names a
    /// `resourceVersion`; annotations and data keys set or (null) removed.
    pub fn apply(&mut self, patch: &Value) -> Written {
        if let Some(rv) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && rv != self.version.to_string()
        {
            return Written::Conflict;
        }
        if let Some(ann) = patch
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
        {
            for (k, v) in ann {
                match v.as_str() {
                    Some(v) => self.annotations.insert(k.clone(), v.to_owned()),
                    None => self.annotations.remove(k),
                };
            }
        }
        if let Some(data) = patch.get("data").and_then(Value::as_object) {
            for (k, v) in data {
                match v.as_str() {
                    Some(v) => {
                        let bytes = STANDARD.decode(v).expect("the product writes base64");
                        let text = String::from_utf8(bytes).expect("the model's values are text");
                        self.data.insert(k.clone(), text)
                    }
                    None => self.data.remove(k),
                };
            }
        }
        self.version += 1;
        Written::Landed
    }

    /// The generation of the refresh token stored (`rt<N>`).
    pub fn refresh_generation(&self) -> Option<u8> {
        self.data
            .get(f::REFRESH_TOKEN)?
            .strip_prefix("rt")?
            .parse()
            .ok()
    }
}

/// The Secret at the start: refresh token `rt0`, access token `at0` expiring at
/// `first_expiry`, the app's credentials and the connection's settings.
pub fn initial_secret(first_expiry: SystemTime, skew: Duration, lease: Duration) -> StoredSecret {
    let data = [
        (f::ACCESS_TOKEN, "at0".to_owned()),
        (f::REFRESH_TOKEN, "rt0".to_owned()),
        (f::EXPIRES_AT, f::format_time(first_expiry)),
        (f::TOKEN_TYPE, "Bearer".to_owned()),
        (f::CLIENT_ID, "app".to_owned()),
        (f::CLIENT_SECRET, "secret".to_owned()),
    ];
    let annotations = [
        (f::ANN_CLOCK_SKEW, skew.as_secs().to_string()),
        (f::ANN_LEASE_DURATION, lease.as_secs().to_string()),
    ];
    StoredSecret {
        version: 1,
        data: data.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        annotations: annotations
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    }
}

/// What Xero answered a call (as the party receives it).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Answer {
    /// A token set: generation `generation`, its access token living `expires_in` seconds.
    Tokens {
        generation: u8,
        expires_in: u64,
    },
    InvalidGrant,
    InvalidClient,
    Unavailable,
    RateLimited,
    /// No answer: the call was cut, or the answer was lost (Xero may have acted on it).
    NoAnswer,
}

impl Answer {
    pub fn token_set(generation: u8, expires_in: u64) -> TokenSet {
        TokenSet {
            access_token: Sensitive::new(format!("at{generation}")),
            refresh_token: Some(Sensitive::new(format!("rt{generation}"))),
            expires_in,
            token_type: "Bearer".into(),
            scope: String::new(),
        }
    }
}

/// Xero's token endpoint for one grant.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Xero {
    /// The newest refresh token's generation.
    pub current: u8,
    /// When each generation's access token really expires (tick), by generation.
    pub expires: Vec<u8>,
    /// When the refresh token before `current` was first used (its grace period runs from then).
    pub previous_used: Option<u8>,
    /// How long a used refresh token is still honoured, in ticks.
    pub grace: u8,
    /// Calls received; of which replays within the grace period, and refusals.
    pub calls: u8,
    pub replays: u8,
    pub refused: u8,
}

impl Xero {
    /// Xero after it issued generation 0, whose access token expires at tick `first_expiry`;
    /// a used refresh token is honoured for `grace` ticks.
    pub fn new(first_expiry: u8, grace: u8) -> Self {
        Self {
            grace,
            current: 0,
            expires: vec![first_expiry],
            previous_used: None,
            calls: 0,
            replays: 0,
            refused: 0,
        }
    }

    /// Whether Xero would accept refresh token generation `g` at tick `now`.
    pub fn accepts(&self, g: u8, now: u8) -> bool {
        g == self.current
            || (g + 1 == self.current
                && self
                    .previous_used
                    .is_some_and(|used| now.saturating_sub(used) <= self.grace))
    }

    /// A refresh presenting generation `g` at tick `now`, with an access token life of
    /// `life_ticks`.
    pub fn refresh(&mut self, g: u8, now: u8, life_ticks: u8) -> Answer {
        self.calls += 1;
        let remaining = |expiry: u8| u64::from(expiry.saturating_sub(now)) * TICK.as_secs();
        if g == self.current {
            self.current += 1;
            self.expires.push(now + life_ticks);
            self.previous_used = Some(now);
            return Answer::Tokens {
                generation: self.current,
                expires_in: remaining(now + life_ticks),
            };
        }
        if self.accepts(g, now) {
            // A replay within the grace period: the pair already issued, its access token as
            // old as it is.
            self.replays += 1;
            return Answer::Tokens {
                generation: self.current,
                expires_in: remaining(self.expires[usize::from(self.current)]),
            };
        }
        self.refused += 1;
        Answer::InvalidGrant
    }

    /// When generation `g`'s access token really expires (tick).
    pub fn expiry_tick(&self, g: u8) -> u8 {
        self.expires[usize::from(g)]
    }
}
