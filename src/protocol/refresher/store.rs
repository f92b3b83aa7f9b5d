//! The refresher's writes to the Secret: the patch itself, the store of a new token set
//! (retried until it lands: Xero has rotated the refresh token already) and the release of a
//! claim. What a conflict leads to is [`round::after_store_conflict`] and
//! [`round::after_release_conflict`].

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};

use super::{AccessToken, Inner, is_conflict, is_not_found};
use crate::protocol::Error;
use crate::protocol::backoff::WRITE_RETRY;
use crate::protocol::format::{
    ANN_REFUSED_ACCESS_TOKEN, TokenRecord, annotations_patch, format_time, release_patch,
    token_patch,
};
use crate::protocol::round::{self, RELEASE_TRIES, ReleaseConflict, StoreConflict};
use crate::redact::Sensitive;
use crate::xero::TokenSet;

impl Inner {
    /// One merge patch of the Secret (conditional when `body` names a `resourceVersion`).
    pub(super) async fn patch(&self, body: &serde_json::Value) -> Result<Secret, kube::Error> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(watch) = &self.write_watch {
            watch.sending(&self.namespace, &self.name);
        }
        let result = self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(body))
            .await;
        if let Some(watch) = &self.write_watch {
            watch.ended(&self.namespace, &self.name, result.as_ref().ok());
        }
        let secret = match result {
            Ok(secret) => secret,
            Err(e) => {
                // A write whose outcome is unknown (a lost answer) may have landed: the next
                // read asks the API server, not a follower that may not have seen it yet.
                if !is_conflict(&e) {
                    self.ask_server_next.store(true, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        self.remember(&secret);
        Ok(secret)
    }

    /// Writes the new token set. Xero has already rotated the refresh token, so this write is
    /// retried until it lands: on a conflict with the freshest resourceVersion as long as the
    /// Secret still holds the token we presented (our answer is its successor); if another party
    /// already stored a successor, ours is not needed.
    ///
    /// The access token's expiry counts from `sent_at`, when the call was sent
    /// ([`round::stored_expiry`]), and so does `refreshed-at`: the lifetime the two span (whose
    /// half caps the clock skew) is then the one Xero gave, whatever the call's latency and
    /// however long the store took.
    pub(super) async fn persist(
        &self,
        rec: &TokenRecord,
        set: TokenSet,
        sent_at: SystemTime,
    ) -> Result<Option<AccessToken>, Error> {
        let expires_at = round::stored_expiry(&set, sent_at);
        let rotation = rec.rotation.saturating_add(1);
        let identity = self.identity.clone();
        let written = self
            .write_until_landed(rec, |rv| {
                token_patch(rv, &set, expires_at, &identity, sent_at, rotation)
            })
            .await?;
        let stored = self.record(&written);
        tracing::info!(
            secret = %self.name,
            refreshed_by = %identity,
            rotation,
            expires_at = %format_time(expires_at),
            "token refreshed"
        );
        // A grace-period replay can carry an access token that has already expired: it is stored
        // (its refresh token is what matters) but not handed out; the caller refreshes again.
        Ok(AccessToken::from_record(&stored).filter(|t| SystemTime::now() < t.usable_until))
    }

    /// Applies `patch(resourceVersion)` until it lands. On a conflict it re-reads: if the Secret
    /// still holds the token state of `rec`, it retries with the new resourceVersion; if not,
    /// another party stored a newer token and the Secret as it now is is returned instead.
    pub(super) async fn write_until_landed(
        &self,
        rec: &TokenRecord,
        patch: impl Fn(&str) -> serde_json::Value,
    ) -> Result<Secret, Error> {
        let mut rv = rec.resource_version.clone().unwrap_or_default();
        let mut attempt = 0;
        loop {
            match self.patch(&patch(&rv)).await {
                Ok(secret) => return Ok(secret),
                Err(e) if is_conflict(&e) => match self.fetch().await {
                    Ok(secret) => match round::after_store_conflict(rec, &self.record(&secret)) {
                        StoreConflict::Superseded => {
                            tracing::info!(secret = %self.name, "another party already stored a newer token; ours is not needed");
                            return Ok(secret);
                        }
                        StoreConflict::Retry { resource_version } => {
                            rv = resource_version;
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(secret = %self.name, error = %e, "re-reading after a conflict failed; retrying")
                    }
                },
                Err(e) if is_not_found(&e) => {
                    tracing::error!(secret = %self.name, "the token Secret was deleted while a new token was being stored");
                    return Err(Error::SecretNotFound {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, attempt, "storing the new token failed; retrying until it lands");
                }
            }
            tokio::time::sleep(WRITE_RETRY.delay(attempt)).await;
            attempt += 1;
        }
    }

    /// Marks `token` as refused by Xero in the Secret, if the Secret still holds it and it is
    /// not marked already (P70). A conflict means the Secret moved on: the next round decides on
    /// what it holds now.
    pub(super) async fn report_refused(&self, token: &Sensitive) -> Result<(), Error> {
        let rec = self.read_from_server().await?;
        let fingerprint = token.fingerprint();
        if rec.access_token.as_ref() != Some(token)
            || rec.refused_access_token.as_deref() == Some(fingerprint.as_str())
        {
            return Ok(());
        }
        let rv = rec.resource_version.clone().unwrap_or_default();
        let patch = annotations_patch(&rv, &[(ANN_REFUSED_ACCESS_TOKEN, Some(fingerprint))]);
        match self.patch(&patch).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(Error::Kube {
                action: "marking the access token as refused",
                source: e,
            }),
        }
    }

    /// Releases this party's claim (best effort: an expired claim is taken over anyway).
    /// After a conflict, the claim is released only if it is still this party's: another
    /// party's claim is never removed, only the `extra` markers are written then.
    pub(super) async fn release(&self, rec: &TokenRecord, extra: &[(&str, Option<String>)]) {
        let mut rv = rec.resource_version.clone().unwrap_or_default();
        let mut mine = true;
        for _ in 0..RELEASE_TRIES {
            let body = if mine {
                release_patch(&rv, extra)
            } else {
                annotations_patch(&rv, extra)
            };
            match self.patch(&body).await {
                Ok(_) => return,
                Err(e) if is_conflict(&e) => match self.fetch().await {
                    Ok(secret) => {
                        let fresh = self.record(&secret);
                        match round::after_release_conflict(
                            &fresh,
                            &self.identity,
                            !extra.is_empty(),
                        ) {
                            ReleaseConflict::Release { resource_version } => {
                                mine = true;
                                rv = resource_version;
                            }
                            ReleaseConflict::MarkersOnly { resource_version } => {
                                mine = false;
                                rv = resource_version;
                            }
                            ReleaseConflict::Done => return,
                        }
                    }
                    Err(_) => return,
                },
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, "releasing the refresh claim failed");
                    return;
                }
            }
        }
    }
}
