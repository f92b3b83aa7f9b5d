//! Waiting: for the Secret to change (on the follower when its watch is open, else a watch of
//! its own), and, holding a claim made ahead of the due time, for the due time itself.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use kube::api::{WatchEvent, WatchParams};

use super::Inner;
use crate::protocol::decide::Role;
use crate::protocol::format::TokenRecord;
use crate::protocol::round::{self, Hold};

/// Longest single watch (the API server caps watches at a few minutes anyway).
const MAX_WATCH: Duration = Duration::from_secs(60);
/// A watch that ends without an event sooner than this is followed by a read only once this
/// long has passed since it started: a proxy that ends watches at once makes one read a second,
/// not a loop.
const MIN_WATCH: Duration = Duration::from_secs(1);
/// The longest wait on the follower before a read from the API server, and how often the wait
/// checks that the follower's watch is still open.
const FOLLOWER_WAIT_MAX: Duration = Duration::from_secs(5);
const FOLLOWER_WAIT_SLICE: Duration = Duration::from_secs(1);

impl Inner {
    /// Waits until the Secret changes from `resource_version` or `wait` passes.
    pub(super) async fn wait_for_change(&self, resource_version: Option<&str>, wait: Duration) {
        let wait = wait.min(MAX_WATCH);
        let Some(rv) = resource_version else {
            tokio::time::sleep(wait).await;
            return;
        };
        if self.follow_live.load(Ordering::Relaxed)
            && let Ok(from) = rv.parse::<u64>()
        {
            self.wait_on_follower(from, wait).await;
            return;
        }
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(u32::try_from(wait.as_secs() + 1).unwrap_or(60));
        let started = tokio::time::Instant::now();
        let watched = async {
            // From the version read; if that is too old for the API server (410 Gone: a Secret
            // unchanged for long, its version compacted away), once more from the current
            // state ("0": it is replayed first, and skipped if it is still the one read). Any
            // other failure sleeps out the wait: never a loop of instant retries.
            for from in [rv, "0"] {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let gone = match self.api.watch(&params, from).await {
                    Ok(stream) => {
                        let mut stream = std::pin::pin!(stream);
                        // How the watch ended: None = it simply ended (its timeout, a restarted
                        // API server): read again at once.
                        let mut failure: Option<bool> = None;
                        while let Some(event) = stream.next().await {
                            match event {
                                Ok(WatchEvent::Bookmark(_)) => continue,
                                Ok(WatchEvent::Added(s))
                                    if s.metadata.resource_version.as_deref() == Some(rv) =>
                                {
                                    continue;
                                }
                                // The changed Secret itself: the next round starts from it
                                // instead of reading it again.
                                Ok(WatchEvent::Modified(secret) | WatchEvent::Added(secret)) => {
                                    self.keep_snapshot(secret);
                                    return;
                                }
                                Ok(WatchEvent::Deleted(_)) => return,
                                Ok(WatchEvent::Error(status)) if status.code == 410 => {
                                    failure = Some(true);
                                    break;
                                }
                                Ok(WatchEvent::Error(status)) => {
                                    tracing::debug!(code = status.code, reason = %status.reason, "watch answered an error; sleeping instead");
                                    failure = Some(false);
                                    break;
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "watch failed; sleeping instead");
                                    failure = Some(false);
                                    break;
                                }
                            }
                        }
                        match failure {
                            // Read again at once, unless the watch was cut short (a proxy
                            // ending watches at once must not make a loop of reads).
                            None => {
                                tokio::time::sleep_until(started + MIN_WATCH).await;
                                return;
                            }
                            Some(gone) => gone,
                        }
                    }
                    // 410 as the watch request's own answer, not as an event: the same.
                    Err(kube::Error::Api(s)) if s.code == 410 => true,
                    Err(e) => {
                        tracing::debug!(error = %e, "watch failed; sleeping instead");
                        false
                    }
                };
                if !gone {
                    break;
                }
            }
            tokio::time::sleep(wait).await;
        };
        let _ = tokio::time::timeout(wait, watched).await;
    }

    /// Waits for the follower (whose watch is open) to see a version after `from`, or `wait` to
    /// pass: no watch of its own, no extra request. The version seen stands in for the next
    /// read. If none came, the follower may have missed it: the next read asks the API server.
    async fn wait_on_follower(&self, from: u64, wait: Duration) {
        // In slices, so that a follower whose watch ended is noticed; and no longer than
        // FOLLOWER_WAIT_MAX in all, so that a watch gone silent costs a read now and then,
        // not the whole claim.
        let until = tokio::time::Instant::now() + wait.min(FOLLOWER_WAIT_MAX);
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if self
                .follower_saw_newer(from, left.min(FOLLOWER_WAIT_SLICE))
                .await
            {
                return;
            }
            if left <= FOLLOWER_WAIT_SLICE || !self.follow_live.load(Ordering::Relaxed) {
                self.ask_server_next.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Holding a claim made ahead of the due time ([`crate::protocol::decide::PRODUCER_CLAIM_LEAD`]):
/// waits for the due time itself, and no longer (every consumer at expiry waits on this call);
/// true once it is due. False only when a wall clock stepped back meanwhile leaves it not due
/// after the lead ([`round::hold`]): the caller releases its claim and decides again rather than
/// call Xero early.
pub(super) async fn until_due(rec: &TokenRecord, role: Role) -> bool {
    let started = tokio::time::Instant::now();
    loop {
        match round::hold(rec, SystemTime::now(), role, started.elapsed()) {
            Hold::CallNow => return true,
            Hold::GiveBack => return false,
            Hold::Sleep(wait) => tokio::time::sleep(wait).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{Role, TokenRecord, until_due as wait_until_due};
    use crate::protocol::decide::PRODUCER_CLAIM_LEAD;

    /// A token Secret whose access token stops being usable at `usable_end` (no skew).
    fn expiring_at(usable_end: SystemTime) -> TokenRecord {
        use crate::protocol::format as f;
        let secret: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "t", "annotations": {f::ANN_CLOCK_SKEW: "0"}},
                "data": {
                    f::ACCESS_TOKEN: "YQ==",
                    f::EXPIRES_AT: base64_text(&f::format_time(usable_end)),
                },
            }))
            .expect("a Secret");
        TokenRecord::from_secret(&secret)
    }

    fn base64_text(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[tokio::test]
    async fn a_claim_made_ahead_calls_xero_no_sooner_than_the_token_is_due() {
        let producer = Role::Producer {
            ahead: Duration::ZERO,
        };
        let ms = Duration::from_millis(1);
        for ahead in [2 * ms, 7 * ms, PRODUCER_CLAIM_LEAD - ms] {
            // The due time as stored (whole milliseconds), which is what the wait is for.
            let rec = expiring_at(SystemTime::now() + ahead);
            let due = rec.usable_until().expect("a usable token");
            assert!(wait_until_due(&rec, producer).await, "due within the lead");
            let now = SystemTime::now();
            assert!(now >= due, "called {:?} early", due.duration_since(now));
        }
        // Only the producer waits: a consumer holding a claim calls at once.
        let rec = expiring_at(SystemTime::now() + PRODUCER_CLAIM_LEAD);
        let at_once = futures_util::FutureExt::now_or_never(wait_until_due(&rec, Role::Consumer));
        assert_eq!(at_once, Some(true));
    }
}
