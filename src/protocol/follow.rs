//! Keeping one token Secret watched for a consumer in use, so a token another party stores
//! (the controller, ahead of expiry) reaches the consumer's cache when it is stored, not when
//! the cached one runs out: the get at the moment of rotation waits on nothing.
//!
//! One long watch (`metadata.name=<secret>`: what a consumer's RBAC allows) is held at a time;
//! it is resumed from the last version seen when it times out, and restarted from the current
//! state when that version is gone (410). The watch asks for bookmarks (kube's default); once
//! the API server has sent one (a server with a watch cache sends one about once a minute), a
//! watch silent for 150 s is taken for a dead connection (one that broke without a reset never
//! ends on its own) and renewed. Failures back off (1 s doubling to 30 s): never a loop of
//! instant retries. Following ends when the consumer goes away, when it has not asked for a
//! token for a while (checked each time the watch is renewed), or when its RBAC refuses the
//! watch ([`Ended::Refused`]: the owner decides when to try again).

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{WatchEvent, WatchParams};

/// How long one watch request is held: about one token lifetime (Xero's access tokens live
/// 30 minutes), so a consumer makes about one request per rotation in the steady state.
pub const WATCH_SECONDS: u32 = 1800;
/// The first and the longest wait after a failed watch.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a watch may go without any event (a bookmark counts) before it is taken for a
/// dead connection, once the API server has shown that it sends bookmarks (a server with a
/// watch cache sends one about once a minute): over twice that period.
pub const SILENCE_MAX: Duration = Duration::from_secs(150);
/// The same limit before any bookmark came (a server that sends none, or only one just before
/// the watch's end): the watch's own length and a minute. A quiet Secret's watch is not cut
/// more often than the server ends it anyway.
const SILENCE_WITHOUT_BOOKMARKS: Duration = Duration::from_secs(WATCH_SECONDS as u64 + 60);

/// The status codes that end following: retrying cannot fix them (the consumer's RBAC).
const REFUSED: [u16; 2] = [401, 403];

/// Why following ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The owner said stop.
    Stopped,
    /// The API server refused the watch (401/403): retrying at once cannot fix that.
    Refused,
}

/// What the owner says about each version of the Secret: go on watching or stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Watching,
    Stop,
}

/// Watches Secret `name` from `resource_version` until `keep` says stop; hands each new version
/// of the Secret to `seen`. `keep` is asked before each watch request; `on_request` is told of
/// each request made (for the caller's count); `live` is told when a watch is open (`true`:
/// versions arrive as they are written) and when it ended or the Secret was deleted (`false`:
/// what the owner last saw is not the Secret's current state, until a watch delivers the
/// Secret again). A watch silent for `silence` ([`SILENCE_MAX`]) once a bookmark has come is
/// renewed.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    api: Api<Secret>,
    name: String,
    mut resource_version: String,
    keep: impl Fn() -> Keep,
    seen: impl Fn(Secret) -> Keep,
    on_request: impl Fn(),
    live: impl Fn(bool),
    silence: Duration,
) -> Ended {
    let mut retry = RETRY_FIRST;
    // Whether the Secret is known to be deleted (or unknown after a restart from "0"): a
    // renewed watch is not live until it delivers the Secret again.
    let mut gone = false;
    // Whether this API server sends bookmarks (then a long silence means a dead connection).
    let mut bookmarks = false;
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_SECONDS);
    while keep() == Keep::Watching {
        on_request();
        let started = tokio::time::Instant::now();
        let failed = match api.watch(&params, &resource_version).await {
            Ok(stream) => {
                live(!gone);
                let mut stream = std::pin::pin!(stream);
                let mut failed = false;
                loop {
                    let limit = if bookmarks {
                        silence
                    } else {
                        SILENCE_WITHOUT_BOOKMARKS
                    };
                    let event = match tokio::time::timeout(limit, stream.next()).await {
                        Ok(Some(event)) => event,
                        Ok(None) => break,
                        // A renewal like the server's own end of a watch (it lasted: no backoff).
                        Err(_) => {
                            tracing::debug!(
                                "the watch of the token Secret went silent; renewing it"
                            );
                            break;
                        }
                    };
                    match event {
                        Ok(WatchEvent::Added(s) | WatchEvent::Modified(s)) => {
                            if let Some(rv) = s.metadata.resource_version.clone() {
                                resource_version = rv;
                            }
                            // After a Deleted: the Secret exists again.
                            gone = false;
                            live(true);
                            if seen(s) == Keep::Stop {
                                live(false);
                                return Ended::Stopped;
                            }
                        }
                        // Deleted: what was seen last is gone (reads ask the API server); go
                        // on from there (a Secret created again is followed).
                        Ok(WatchEvent::Deleted(s)) => {
                            gone = true;
                            live(false);
                            if let Some(rv) = s.metadata.resource_version {
                                resource_version = rv;
                            }
                        }
                        Ok(WatchEvent::Bookmark(b)) => {
                            bookmarks = true;
                            resource_version = b.metadata.resource_version;
                        }
                        // Gone: the version is compacted away; start from the current state
                        // (replayed as Added if the Secret exists).
                        Ok(WatchEvent::Error(status)) if status.code == 410 => {
                            resource_version = "0".to_owned();
                            gone = true;
                            break;
                        }
                        Ok(WatchEvent::Error(status)) if REFUSED.contains(&status.code) => {
                            tracing::debug!(
                                code = status.code,
                                "not allowed to watch the token Secret; not following it"
                            );
                            live(false);
                            return Ended::Refused;
                        }
                        Ok(WatchEvent::Error(_)) | Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                live(false);
                failed
            }
            Err(kube::Error::Api(status)) if status.code == 410 => {
                resource_version = "0".to_owned();
                gone = true;
                false
            }
            Err(kube::Error::Api(status)) if REFUSED.contains(&status.code) => {
                tracing::debug!(
                    code = status.code,
                    "not allowed to watch the token Secret; not following it"
                );
                return Ended::Refused;
            }
            Err(_) => true,
        };
        // A watch that failed, or ended at once (a proxy that cuts watches), waits before the
        // next request.
        if failed || started.elapsed() < RETRY_FIRST {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        } else {
            // A watch that lasted: the next failure starts the backoff afresh.
            retry = RETRY_FIRST;
        }
    }
    Ended::Stopped
}
