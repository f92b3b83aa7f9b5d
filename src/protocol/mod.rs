//! The refresh protocol (`docs/protocol.md`): how the controller and any number of consumers
//! share one Xero token set through one Secret, so that exactly one party calls Xero per expiry
//! and a rotated refresh token is never lost.
//!
//! - [`format`]: the Secret's keys and annotations, parsed and patched (pure).
//! - [`decide`]: the decision function (pure, unit-tested exhaustively).
//! - [`backoff`]: retry delays.
//! - [`retry`]: after a failed call, call again within the claim or release it (pure).
//! - [`round`]: every other step of a refresh round, from what it knows to an action (pure).
//! - [`gate`]: one token bucket per Xero app for the controller's calls.
//! - [`follow`]: a consumer in use keeps its Secret watched, so a stored token reaches it at once.
//! - [`refresher`]: the I/O that carries the pure rules out, with single flight inside one
//!   process.

pub mod backoff;
pub mod decide;
pub mod follow;
pub mod format;
pub mod gate;
pub mod refresher;
pub mod retry;
pub mod round;

pub use decide::{Role, Step, decide};
pub use format::TokenRecord;
pub use refresher::{AccessToken, Refresher, process_identity};

use crate::xero::XeroError;

/// Errors a caller of the protocol can act on. None of them carries a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Xero refused the stored refresh token: a person must authorise again (`xero-token
    /// authorize`). Nobody calls Xero until the Secret's refresh token changes.
    #[error("re-authorisation required: Xero refused the stored refresh token ({0})")]
    ReauthorizationRequired(String),
    /// The Secret has no refresh token yet.
    #[error(
        "the token Secret has no refresh token yet: authorise the app first (xero-token authorize)"
    )]
    NoRefreshToken,
    /// The Secret's refresh token is not UTF-8 text, so it cannot be one Xero issued: a person
    /// must authorise again (or write the right one). No call is made with it.
    #[error(
        "the token Secret's refresh_token is not UTF-8 text, so it cannot be one Xero issued: authorise the app again (xero-token authorize)"
    )]
    UnreadableRefreshToken,
    /// The Secret has no `client_id`/`client_secret`, so this party cannot refresh.
    #[error("the token Secret has no client_id/client_secret: is the controller running?")]
    MissingClientCredentials,
    /// The token Secret does not exist.
    #[error("token Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    /// Xero did not give a usable answer within the claim (after retries), or refused the client.
    #[error("{0}")]
    Xero(#[from] XeroError),
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// Xero refused the request with an error only a configuration change can fix
    /// (`invalid_client`, `unauthorized_client`, `unsupported_grant_type`, `invalid_scope`,
    /// `invalid_request`, …). A stop marker in the Secret keeps everyone from calling again
    /// until the client credentials or the refresh token change.
    #[error(
        "Xero refused the request ({code}){}; no call is made until the client credentials or the refresh token change",
        description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    Stopped {
        code: String,
        description: Option<String>,
    },
    /// The token endpoint's host is not one this party may send credentials to.
    #[error("endpoint not allowed: {0}")]
    EndpointNotAllowed(String),
    /// No usable token within the time allowed: another party held the claim for longer.
    #[error("no usable token within {0:?}: {1}")]
    Timeout(std::time::Duration, String),
    /// Xero answered 429 (to this party or another): nobody calls before `until`, which is
    /// after this caller's deadline.
    #[error("rate limited: Xero asked to wait until {}", format::format_time(*until))]
    RateLimited { until: std::time::SystemTime },
    /// Refreshes kept failing (Xero unavailable, unusable answers): every party backs off until
    /// `until`, which is after this caller's deadline.
    #[error(
        "Xero unavailable: {failures} refreshes in a row failed; the next attempt is not before {}",
        format::format_time(*until)
    )]
    BackingOff {
        until: std::time::SystemTime,
        failures: u32,
    },
    /// The token Secret follows a newer revision of the protocol than this party implements:
    /// it only reads, and the stored token is not usable (P68). Upgrade it.
    #[error(
        "the token Secret follows protocol revision {secret}, newer than the {implemented} this program implements: it only reads, and the refresh needed now is not one it may make; upgrade it"
    )]
    OutdatedProtocol { implemented: u32, secret: u32 },
    /// The controller's own cap on calls per app (`--app-calls-per-minute`): its next permit
    /// comes in this long. (Only a refresher with a gate meets it; it never waits for one.)
    #[error("the app's calls are at the operator's cap; the next is permitted in {0:?}")]
    Throttled(std::time::Duration),
}

/// Which state a failure leaves a caller in: what every consumer surface names (the exit code of
/// `xero-token`, the `error` of `xero-token serve`, [`Error::kind`] of the library).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A person must authorise the app again (or for the first time).
    ReauthorizationRequired,
    /// The token Secret holds no refresh token yet.
    NoRefreshToken,
    /// Xero refused the app's credentials or the request for good: a person must fix them.
    Stopped,
    /// Xero asked to wait (429), or the operator's own per-app cap did.
    RateLimited,
    /// Xero is failing (5xx, no answer, unusable answers): every party backs off.
    XeroUnavailable,
    /// The Kubernetes API refused or failed (RBAC, the Secret missing, an outage), or the
    /// Secret lacks what a refresh needs.
    ApiUnavailable,
    /// Another party held the refresh for longer than this caller would wait.
    Timeout,
    /// The token endpoint is not one this party may send credentials to.
    EndpointNotAllowed,
    /// The token Secret follows a newer protocol revision: this program must be upgraded.
    OutdatedProtocol,
}

impl Kind {
    /// The name `xero-token serve` answers with.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReauthorizationRequired => "reauthorization_required",
            Self::NoRefreshToken => "no_refresh_token",
            Self::Stopped => "stopped",
            Self::RateLimited => "rate_limited",
            Self::XeroUnavailable => "xero_unavailable",
            Self::ApiUnavailable => "api_unavailable",
            Self::Timeout => "timeout",
            Self::EndpointNotAllowed => "endpoint_not_allowed",
            Self::OutdatedProtocol => "outdated_protocol",
        }
    }

    /// The exit code of `xero-token` (`docs/operating.md`, "Exit codes").
    pub fn exit_code(self) -> u8 {
        match self {
            Self::ReauthorizationRequired => 3,
            Self::NoRefreshToken => 4,
            Self::XeroUnavailable => 5,
            Self::ApiUnavailable | Self::EndpointNotAllowed => 6,
            Self::Timeout => 7,
            Self::Stopped => 8,
            Self::RateLimited => 9,
            Self::OutdatedProtocol => 10,
        }
    }
}

impl Error {
    /// The state this error leaves the caller in.
    pub fn kind(&self) -> Kind {
        match self {
            Self::ReauthorizationRequired(_) | Self::UnreadableRefreshToken => {
                Kind::ReauthorizationRequired
            }
            Self::NoRefreshToken => Kind::NoRefreshToken,
            Self::Stopped { .. } => Kind::Stopped,
            Self::Xero(XeroError::RateLimited { .. })
            | Self::RateLimited { .. }
            | Self::Throttled(_) => Kind::RateLimited,
            Self::Xero(_) | Self::BackingOff { .. } => Kind::XeroUnavailable,
            Self::Kube { .. } | Self::SecretNotFound { .. } | Self::MissingClientCredentials => {
                Kind::ApiUnavailable
            }
            Self::EndpointNotAllowed(_) => Kind::EndpointNotAllowed,
            Self::Timeout(..) => Kind::Timeout,
            Self::OutdatedProtocol { .. } => Kind::OutdatedProtocol,
        }
    }

    /// Exit code of the `xero-token` CLI for this error (documented in `docs/operating.md`, "Exit codes").
    pub fn exit_code(&self) -> u8 {
        self.kind().exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_has_its_own_name_and_exit_code() {
        use std::time::{Duration, SystemTime};
        let cases = [
            (
                Error::ReauthorizationRequired("x".into()),
                "reauthorization_required",
                3,
            ),
            (Error::NoRefreshToken, "no_refresh_token", 4),
            (
                Error::Stopped {
                    code: "invalid_client".into(),
                    description: None,
                },
                "stopped",
                8,
            ),
            (
                Error::RateLimited {
                    until: SystemTime::now(),
                },
                "rate_limited",
                9,
            ),
            (
                Error::Xero(XeroError::RateLimited {
                    retry_after: Duration::from_secs(1),
                    problem: "minute".into(),
                }),
                "rate_limited",
                9,
            ),
            (
                Error::Xero(XeroError::Unavailable(503)),
                "xero_unavailable",
                5,
            ),
            (
                Error::BackingOff {
                    until: SystemTime::now(),
                    failures: 2,
                },
                "xero_unavailable",
                5,
            ),
            (Error::MissingClientCredentials, "api_unavailable", 6),
            (
                Error::Timeout(Duration::from_secs(1), "held".into()),
                "timeout",
                7,
            ),
            (
                Error::OutdatedProtocol {
                    implemented: 2,
                    secret: 3,
                },
                "outdated_protocol",
                10,
            ),
        ];
        let mut codes = std::collections::BTreeMap::new();
        for (e, name, code) in cases {
            assert_eq!((e.kind().as_str(), e.exit_code()), (name, code), "{e}");
            codes.insert(name, code);
        }
        // One exit code per state.
        let distinct: std::collections::BTreeSet<_> = codes.values().collect();
        assert_eq!(distinct.len(), codes.len());
    }
}
