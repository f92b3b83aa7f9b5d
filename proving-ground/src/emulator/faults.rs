//! Faults injected on demand: server errors, slow answers, requests that never get an answer,
//! rate-limit refusals, and refreshes that are processed but whose response is lost on the way
//! back (the case Xero's grace period exists for). Random fractions and a deterministic script.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One request's injected fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Answer 500 without processing the request.
    Error,
    /// Answer 503 without processing the request.
    Unavailable,
    /// Never answer (the connection stays open until the client gives up).
    Timeout,
    /// Process the request, then cut the connection instead of sending the answer.
    DropResponse,
    /// Answer 429 with `Retry-After` without processing the request.
    RateLimit,
    /// Answer 200 with an HTML page instead of JSON (a proxy or maintenance page).
    Html,
    /// Answer 200 with JSON cut in the middle.
    TruncatedJson,
    /// Answer 400 `invalid_grant` without processing the request.
    InvalidGrant,
    /// Answer 400 `invalid_request` without processing the request (a standards-following
    /// server's answer to a refresh token it does not know).
    InvalidRequest,
    /// Answer 400 `unauthorized_client` without processing the request.
    UnauthorizedClient,
    /// Answer 200 with a token response that has no `access_token`.
    NoAccessToken,
    /// Answer 200 with `expires_in: 0`.
    ExpiresInZero,
    /// Answer 200 with `expires_in` of a year.
    ExpiresInYear,
    /// Process the request (the refresh token rotates), then answer 200 with the new refresh
    /// token but no access token: an unusable answer whose new refresh token must be kept.
    RotatedWithoutAccessToken,
}

/// The endpoints faults can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    Token,
    Connections,
    Api,
    Revocation,
}

/// Fault settings; all off by default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Fraction (0..1) of requests answered 500.
    pub error_rate: f64,
    /// Fraction of requests never answered.
    pub timeout_rate: f64,
    /// Fraction of requests processed whose answer is then lost.
    pub drop_response_rate: f64,
    /// Fraction of requests answered 429.
    pub rate_limit_rate: f64,
    /// Delay added before every answer.
    #[serde(with = "duration_ms")]
    pub latency: Duration,
    /// Fates for the next requests, in order, consumed before the random fractions apply.
    pub script: VecDeque<FaultKind>,
    /// Which endpoints the faults apply to; empty means all of them.
    pub endpoints: Vec<Endpoint>,
}

/// One request's fate: the fault to apply, and the latency in force when it arrived (a later
/// change of the faults does not reach requests already in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fate {
    pub kind: Option<FaultKind>,
    pub latency: Duration,
}

/// Durations in JSON as milliseconds (`latency_ms`-style numbers are easiest to script).
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Faults {
    /// Only a script: these fates for the next requests, then normal answers.
    pub fn scripted(kinds: &[FaultKind]) -> Self {
        Self {
            script: kinds.iter().copied().collect(),
            ..Self::default()
        }
    }

    /// Checks the rates are fractions.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
            ("drop_response_rate", self.drop_response_rate),
            ("rate_limit_rate", self.rate_limit_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }

    /// The fate of one request to `endpoint`, decided when it arrives.
    pub fn fate(&mut self, endpoint: Endpoint) -> Fate {
        Fate {
            kind: self.decide(endpoint),
            latency: self.latency,
        }
    }

    /// The fault for one request to `endpoint`: `None` is a normal answer.
    pub fn decide(&mut self, endpoint: Endpoint) -> Option<FaultKind> {
        if !self.endpoints.is_empty() && !self.endpoints.contains(&endpoint) {
            return None;
        }
        if let Some(kind) = self.script.pop_front() {
            return Some(kind);
        }
        let roll = fastrand::f64();
        let mut edge = 0.0;
        for (rate, kind) in [
            (self.error_rate, FaultKind::Error),
            (self.timeout_rate, FaultKind::Timeout),
            (self.drop_response_rate, FaultKind::DropResponse),
            (self.rate_limit_rate, FaultKind::RateLimit),
        ] {
            edge += rate;
            if roll < edge {
                return Some(kind);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_comes_first_and_in_order() {
        let mut f = Faults {
            script: [FaultKind::DropResponse, FaultKind::Error].into(),
            ..Faults::default()
        };
        assert_eq!(f.decide(Endpoint::Token), Some(FaultKind::DropResponse));
        assert_eq!(f.decide(Endpoint::Token), Some(FaultKind::Error));
        assert_eq!(f.decide(Endpoint::Token), None);
    }

    #[test]
    fn endpoints_filter_where_faults_apply() {
        let mut f = Faults {
            error_rate: 1.0,
            endpoints: vec![Endpoint::Token],
            ..Faults::default()
        };
        assert_eq!(f.decide(Endpoint::Connections), None);
        assert_eq!(f.decide(Endpoint::Token), Some(FaultKind::Error));
    }

    #[test]
    fn rates_are_roughly_honoured() {
        fastrand::seed(7);
        let mut f = Faults {
            error_rate: 0.2,
            drop_response_rate: 0.1,
            ..Faults::default()
        };
        let n = 10_000;
        let (mut errors, mut drops) = (0, 0);
        for _ in 0..n {
            match f.decide(Endpoint::Token) {
                Some(FaultKind::Error) => errors += 1,
                Some(FaultKind::DropResponse) => drops += 1,
                _ => {}
            }
        }
        assert!((1800..2200).contains(&errors), "{errors}");
        assert!((800..1200).contains(&drops), "{drops}");
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        let f = Faults {
            timeout_rate: 1.5,
            ..Faults::default()
        };
        assert!(f.validate().unwrap_err().contains("timeout_rate"));
    }
}
