//! The refresh under a claim: call Xero within the claim's window, and act on the answer as
//! [`round::after_error`] and [`retry::after_failed_call`] say (store it, salvage a rotated
//! refresh token, call again, back off, stop, or ask for re-authorisation).

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::{AccessToken, Inner};
use crate::crd::Grant;
use crate::protocol::Error;
use crate::protocol::backoff::{ACROSS_CLAIMS, XERO_RETRY};
use crate::protocol::format::{TokenRecord, format_time, salvage_patch};
use crate::protocol::retry::{self, Next, after_failed_call};
use crate::protocol::round::{self, AfterError, InvalidGrant};
use crate::xero::XeroClient;

impl Inner {
    /// Calls Xero while holding the claim on `rec`, which ends at `lease_end`. `Ok(None)` means:
    /// start over from a fresh read.
    pub(super) async fn refresh(
        &self,
        rec: TokenRecord,
        lease_end: SystemTime,
    ) -> Result<Option<AccessToken>, Error> {
        let Some(app) = rec.client.clone() else {
            return Err(Error::MissingClientCredentials);
        };
        let mut endpoints = self.default_endpoints.clone();
        endpoints.token_url = self.token_url(&rec).to_owned();
        let http = self.http.get_or_init(crate::xero::new_http).clone();
        let presented = rec.refresh_token.clone();
        let mut attempt = 0;
        loop {
            let sent_at = SystemTime::now();
            let Some(window) = retry::call_window(sent_at, lease_end, self.xero_timeout) else {
                // Only before the first call (a claim taken over late): retries stop earlier.
                self.release(&rec, &[]).await;
                return Ok(None);
            };
            let xero = XeroClient::with_http(http.clone(), endpoints.clone(), window);
            self.xero_calls.fetch_add(1, Ordering::Relaxed);
            let answer = match (rec.settings.grant, &presented) {
                (Grant::RefreshToken, Some(rt)) => xero.refresh(&app, rt).await,
                (Grant::RefreshToken, None) => return Err(Error::NoRefreshToken),
                (Grant::ClientCredentials, _) => {
                    xero.client_credentials(&app, &rec.settings.scopes).await
                }
            };
            let err = match answer {
                Ok(set) => return self.persist(&rec, set, sent_at).await,
                Err(e) => e,
            };
            tracing::info!(secret = %self.name, error = %err, attempt, "refresh attempt failed");
            let failure = match round::after_error(&err, presented.as_ref()) {
                AfterError::InvalidGrant(description) => {
                    return self.on_invalid_grant(&rec, description).await;
                }
                AfterError::Salvage(new_rt) => {
                    // Xero rotated the token but the answer is unusable: keep the new refresh
                    // token (never lose it) and start over with it after a pause.
                    tracing::warn!(secret = %self.name, error = %err, "storing the rotated refresh token from an unusable answer");
                    let rotation = rec.rotation.saturating_add(1);
                    self.write_until_landed(&rec, |rv| {
                        salvage_patch(rv, &new_rt, &self.identity, SystemTime::now(), rotation)
                    })
                    .await?;
                    return Ok(None);
                }
                AfterError::Stop { code, description } => {
                    return Err(self.stop(&rec, code, description).await);
                }
                AfterError::Retry(failure) => failure,
            };
            let next = after_failed_call(
                failure,
                attempt + 1,
                SystemTime::now(),
                lease_end,
                rec.failed_attempts,
                XERO_RETRY.delay(attempt),
                ACROSS_CLAIMS.delay(rec.failed_attempts),
            );
            match next {
                Next::CallAgain { after } => tokio::time::sleep(after).await,
                Next::Release {
                    not_before,
                    failed_attempts,
                } => {
                    // Out of calls or of claim: everyone waits, longer after each claim that
                    // ended this way.
                    let markers = round::backoff_markers(not_before, failed_attempts);
                    tracing::warn!(secret = %self.name, error = %err, calls = attempt + 1, not_before = %format_time(not_before), "refresh failed; backing off");
                    if let Some(budget) = &self.budget {
                        budget.backed_off(not_before);
                    }
                    self.release(&rec, &markers).await;
                    return Err(Error::Xero(err));
                }
            }
            attempt += 1;
        }
    }

    /// An error only a configuration change can fix: release the claim with a stop marker for
    /// exactly these credentials, so no party calls Xero with them again.
    async fn stop(&self, rec: &TokenRecord, code: String, description: Option<String>) -> Error {
        let reason = round::stop_reason(&code, description.as_deref());
        tracing::error!(secret = %self.name, reason, "Xero refused the request for good: stopping until the credentials change");
        self.release(rec, &round::stop_markers(rec, reason)).await;
        Error::Stopped { code, description }
    }

    /// `invalid_grant`: if the Secret's refresh token changed meanwhile, another party rotated it
    /// (a lost race, not a revocation): start over. Otherwise record that a person must authorise
    /// again, so nobody retries until the refresh token changes.
    async fn on_invalid_grant(
        &self,
        rec: &TokenRecord,
        description: Option<String>,
    ) -> Result<Option<AccessToken>, Error> {
        // From the API server: a follower lagging behind the rotation must not make it look
        // like a revocation.
        let fresh = self.read_from_server().await?;
        match round::after_invalid_grant(rec, &fresh, &self.identity) {
            InvalidGrant::Rotated { release_mine } => {
                tracing::info!(secret = %self.name, "invalid_grant, but the refresh token changed meanwhile: using the new one");
                if release_mine {
                    self.release(&fresh, &[]).await;
                }
                Ok(None)
            }
            InvalidGrant::Refused => {
                let reason = round::reauthorization_reason(description.as_deref());
                tracing::error!(secret = %self.name, reason, "Xero refused the refresh token: re-authorisation required");
                let markers =
                    round::reauthorization_markers(rec.refresh_token.as_ref(), reason.clone());
                self.release(&fresh, &markers).await;
                Err(Error::ReauthorizationRequired(reason))
            }
        }
    }
}
