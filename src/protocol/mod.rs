//! The refresh protocol (`docs/protocol.md`): how the controller and any number of consumers
//! share one Xero token set through one Secret, so that exactly one party calls Xero per expiry
//! and a rotated refresh token is never lost.
//!
//! - [`format`]: the Secret's keys and annotations, parsed and patched (pure).
//! - [`decide`]: the decision function (pure, unit-tested exhaustively).
//! - [`backoff`]: retry delays.
//! - [`gate`]: one token bucket per Xero app for the controller's calls.
//! - [`follow`]: a consumer in use keeps its Secret watched, so a stored token reaches it at once.
//! - [`refresher`]: the I/O around the decision, with single flight inside one process.

pub mod backoff;
pub mod decide;
pub mod follow;
pub mod format;
pub mod gate;
pub mod refresher;

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
    /// No usable token within the time allowed (another party held the claim, or Xero asked to
    /// wait).
    #[error("no usable token within {0:?}: {1}")]
    Timeout(std::time::Duration, String),
}

impl Error {
    /// Exit code of the `xero-token` CLI for this error (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::ReauthorizationRequired(_) | Self::UnreadableRefreshToken => 3,
            Self::NoRefreshToken => 4,
            Self::Xero(_) => 5,
            Self::Kube { .. }
            | Self::SecretNotFound { .. }
            | Self::MissingClientCredentials
            | Self::EndpointNotAllowed(_) => 6,
            Self::Timeout(..) => 7,
            Self::Stopped { .. } => 8,
        }
    }
}
