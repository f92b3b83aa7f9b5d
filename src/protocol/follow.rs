//! Keeping one token Secret watched for a consumer in use, so a token another party stores
//! (the controller, ahead of expiry) reaches the consumer's cache when it is stored, not when
//! the cached one runs out: the get at the moment of rotation waits on nothing.
//!
//! One long watch (`metadata.name=<secret>`: what a consumer's RBAC allows) is held at a time;
//! it is resumed from the last version seen when it times out, and restarted from the current
//! state when that version is gone (410). Failures back off (1 s doubling to 30 s): never a
//! loop of instant retries. The watch ends when the consumer goes away or stops asking.

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

/// What the owner says about each version of the Secret: go on watching or stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Watching,
    Stop,
}

/// Watches Secret `name` from `resource_version` until `keep` says stop; hands each new version
/// of the Secret to `seen`. `keep` is asked before each watch request; `on_request` is told of
/// each request made (for the caller's count).
pub async fn run(
    api: Api<Secret>,
    name: String,
    mut resource_version: String,
    keep: impl Fn() -> Keep,
    seen: impl Fn(Secret) -> Keep,
    on_request: impl Fn(),
) {
    let mut retry = RETRY_FIRST;
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_SECONDS);
    while keep() == Keep::Watching {
        on_request();
        let started = tokio::time::Instant::now();
        let failed = match api.watch(&params, &resource_version).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                let mut failed = false;
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(WatchEvent::Added(s) | WatchEvent::Modified(s)) => {
                            if let Some(rv) = s.metadata.resource_version.clone() {
                                resource_version = rv;
                            }
                            retry = RETRY_FIRST;
                            if seen(s) == Keep::Stop {
                                return;
                            }
                        }
                        Ok(WatchEvent::Bookmark(b)) => {
                            resource_version = b.metadata.resource_version;
                        }
                        // Gone: the version is compacted away; start from the current state
                        // (replayed as Added).
                        Ok(WatchEvent::Error(status)) if status.code == 410 => {
                            resource_version = "0".to_owned();
                            break;
                        }
                        Ok(WatchEvent::Deleted(_) | WatchEvent::Error(_)) | Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                failed
            }
            Err(_) => true,
        };
        // A watch that failed, or ended at once (a proxy that cuts watches), waits before the
        // next request.
        if failed || started.elapsed() < RETRY_FIRST {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }
}
