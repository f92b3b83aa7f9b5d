//! A `get`'s rounds: read the Secret, ask [`round::next`] what to do, and do it (hand the token
//! out, wait, claim, call Xero under the claim), until a usable token or an error. Every rule is
//! in [`round`] and [`decide`](super::super::decide); this file only carries them out.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{AccessToken, Inner, is_conflict};
use crate::protocol::Error;
use crate::protocol::backoff::XERO_RETRY;
use crate::protocol::decide::Role;
use crate::protocol::format::{TokenRecord, claim_patch};
use crate::protocol::round::{self, Action, Facts};

/// A consumer whose follower is open waits before it claims, listening for another party's
/// claim: when many processes find the token expired in the same instant, they wait for one
/// claim's store instead of each sending a claim that can only conflict (each on a connection
/// of its own to the API server, opened for it: the follower's watch holds the pooled one).
/// The wait is a random part of `CLAIM_SPREAD`, after `PRODUCER_HEAD_START` when the Secret
/// is a connection's (labelled): its controller claims just before expiry and calls Xero at
/// expiry, so its claim is usually there already; if it is not, the consumers take over a
/// moment later.
const CLAIM_SPREAD: Duration = Duration::from_millis(50);
const PRODUCER_HEAD_START: Duration = Duration::from_millis(50);

impl Inner {
    /// The token endpoint for `rec`: its annotation, else the default.
    pub(super) fn token_url<'a>(&'a self, rec: &'a TokenRecord) -> &'a str {
        rec.settings
            .token_url
            .as_deref()
            .unwrap_or(&self.default_endpoints.token_url)
    }

    pub(super) fn check_endpoint(&self, rec: &TokenRecord) -> Result<(), Error> {
        self.allowlist
            .check(self.token_url(rec))
            .map_err(|why| Error::EndpointNotAllowed(format!("token endpoint: {why}")))
    }

    /// The rounds of one `get` (run in a task of its own, so that a caller that stops waiting
    /// never cuts a refresh between Xero's rotation and the store).
    pub(super) async fn run(&self) -> Result<AccessToken, Error> {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        // Refreshes that ended without a usable token (a lost race, an unusable or already
        // expired answer): each makes the next round wait a little longer, so a Xero that keeps
        // answering unusable tokens is not hammered.
        let mut fruitless = 0;
        // Whether this round sequence already spread its claim ([`CLAIM_SPREAD`]).
        let mut spread = false;
        // Whether the budget already let this `get` call: a claim lost to another party (409)
        // and made again is the same refresh, not another.
        let mut budgeted = false;
        loop {
            if fruitless > 0 {
                tokio::time::sleep(XERO_RETRY.delay(fruitless - 1)).await;
            }
            let (rec, followed) = self.read().await?;
            let facts = Facts {
                rec: &rec,
                now: SystemTime::now(),
                me: &self.identity,
                role: self.role,
                followed,
                left: deadline.saturating_duration_since(tokio::time::Instant::now()),
                max_wait: self.max_wait,
            };
            let action = round::next(&facts);
            tracing::debug!(secret = %self.name, ?action, followed, "protocol step");
            let waited = matches!(action, Action::Wait(_));
            match action {
                Action::Hand => {
                    if let Some(token) = AccessToken::from_record(&rec) {
                        return Ok(token);
                    }
                }
                Action::AskServer => {
                    self.ask_server_next.store(true, Ordering::Relaxed);
                    continue;
                }
                Action::Fail(e) => return Err(e),
                Action::Wait(wait) => {
                    self.wait_for_change(rec.resource_version.as_deref(), wait)
                        .await;
                }
                Action::Claim { replacing, .. } => {
                    self.check_endpoint(&rec)?;
                    if !spread && let Some(pause) = self.spread_pause(&rec) {
                        spread = true;
                        let from = super::version_number_of(&rec).unwrap_or_default();
                        if self.follower_saw_newer(from, pause).await {
                            // Another party wrote first (its claim, say): decide on that.
                            continue;
                        }
                    }
                    // The budget is asked before claiming, so a wait for it never eats into a
                    // claim, and nobody waits for it here: the caller comes back.
                    if !budgeted && let Some(budget) = &self.budget {
                        budget.ask(&rec).map_err(Error::Throttled)?;
                        budgeted = true;
                    }
                    // The claim's end counts from when it is sent (a spread took time).
                    let lease_end = SystemTime::now() + rec.settings.lease_duration;
                    let rv = rec.resource_version.clone().unwrap_or_default();
                    match self
                        .patch(&claim_patch(&rv, &self.identity, lease_end))
                        .await
                    {
                        Ok(secret) => {
                            if let Some(previous) = replacing {
                                let previous = crate::text::sanitize(
                                    &previous,
                                    crate::text::MAX_IDENTITY_CHARS,
                                );
                                tracing::info!(secret = %self.name, previous, "took over an expired refresh claim");
                            }
                            let claimed = self.record(&secret);
                            if let Some(token) = self.hold_and_call(claimed, lease_end).await? {
                                return Ok(token);
                            }
                            fruitless += 1;
                        }
                        Err(e) if is_conflict(&e) => {
                            tracing::debug!(secret = %self.name, "claim lost to another party; re-reading");
                            // The version claimed on is not the latest: the next read takes a
                            // later one from the follower, or asks the API server.
                            if let Ok(n) = rv.parse::<u64>() {
                                self.follower_behind.fetch_max(n, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            return Err(Error::Kube {
                                action: "claiming the refresh",
                                source: e,
                            });
                        }
                    }
                }
                Action::Call { lease_end } => {
                    if let Err(e) = self.check_endpoint(&rec) {
                        self.release(&rec, &[]).await;
                        return Err(e);
                    }
                    // A claim in this party's name that this `get` did not make (one a consumer
                    // wrote, say) is spent from the budget like any other.
                    if !budgeted && let Some(budget) = &self.budget {
                        if let Err(wait) = budget.ask(&rec) {
                            self.release(&rec, &[]).await;
                            return Err(Error::Throttled(wait));
                        }
                        budgeted = true;
                    }
                    if let Some(token) = self.hold_and_call(rec, lease_end).await? {
                        return Ok(token);
                    }
                    fruitless += 1;
                }
            }
            // After a wait, the next round says why it gives up; otherwise claims kept failing.
            if !waited && tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout(
                    self.max_wait,
                    "the token kept changing".to_owned(),
                ));
            }
        }
    }

    /// Holding the claim on `rec` until `lease_end`: waits until the refresh is due, then calls
    /// Xero. `Ok(None)`: start over from a fresh read (the claim was given back, or the call
    /// brought no usable token).
    async fn hold_and_call(
        &self,
        rec: TokenRecord,
        lease_end: SystemTime,
    ) -> Result<Option<AccessToken>, Error> {
        if !super::wait::until_due(&rec, self.role).await {
            // The wall clock stepped back: not due after all.
            self.release(&rec, &[]).await;
            return Ok(None);
        }
        self.refresh(rec, lease_end).await
    }

    /// How long a consumer listens for another party's claim before it claims itself
    /// ([`CLAIM_SPREAD`]): only while its follower is open (it is what would hear the claim)
    /// and the version read is known.
    fn spread_pause(&self, rec: &TokenRecord) -> Option<Duration> {
        if self.role != Role::Consumer
            || !self.follow_live.load(Ordering::Relaxed)
            || super::version_number_of(rec).is_none()
        {
            return None;
        }
        let head_start = if self.managed.load(Ordering::Relaxed) {
            PRODUCER_HEAD_START
        } else {
            Duration::ZERO
        };
        Some(head_start + CLAIM_SPREAD.mul_f64(fastrand::f64()))
    }
}
