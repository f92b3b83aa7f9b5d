//! One party of the refresh protocol for one token Secret: the handle workloads and the
//! controller call ([`Refresher::get`]), with single flight inside one process (concurrent
//! callers share one cached token and one refresh in progress); across processes the Secret
//! decides. The rules are pure ([`super::decide`], [`super::round`], [`super::retry`]); the files
//! here carry them out:
//!
//! - [`builder`]: a handle's construction and options;
//! - [`view`]: what this party knows of the Secret (cache, snapshot, follower, reads);
//! - [`run`]: a `get`'s rounds;
//! - [`call`]: the refresh under a claim;
//! - [`store`]: the writes (store, release);
//! - [`wait`]: waiting for a change, and for the due time;
//! - [`identity`]: the name a party claims under.

mod builder;
mod call;
mod identity;
mod run;
mod store;
mod view;
mod wait;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

pub use identity::{default_identity, process_identity};

use super::Error;
use super::decide::Role;
use super::format::TokenRecord;
use crate::redact::Sensitive;
use crate::xero::Endpoints;

/// A usable access token, handed to a workload.
#[derive(Clone, Debug)]
pub struct AccessToken {
    pub token: Sensitive,
    pub token_type: String,
    /// When Xero said it expires.
    pub expires_at: SystemTime,
    /// When this party stops handing it out (expiry minus clock skew).
    pub usable_until: SystemTime,
    pub scope: String,
    pub tenant_ids: Vec<String>,
    /// Who made the refresh that produced it (from the Secret).
    pub refreshed_by: Option<String>,
}

impl AccessToken {
    fn from_record(rec: &TokenRecord) -> Option<Self> {
        let usable_until = rec.usable_until()?;
        let super::format::Expiry::At(expires_at) = rec.expiry else {
            return None;
        };
        Some(Self {
            token: rec.access_token.clone()?,
            token_type: rec.token_type.clone(),
            expires_at,
            usable_until,
            scope: rec.scope.clone(),
            tenant_ids: rec.tenant_ids.clone(),
            refreshed_by: rec.refreshed_by.clone(),
        })
    }
}

/// One party of the protocol for one token Secret: the handle callers use. The state lives in
/// [`Inner`], shared with the task that runs a refresh.
pub struct Refresher {
    inner: Arc<Inner>,
    /// Single flight: one caller at a time drives the protocol in this process.
    flight: tokio::sync::Mutex<()>,
    /// The refresh in progress. It runs in a task of its own, so a caller that stops waiting
    /// (a timeout around `get`, an HTTP client that hung up) never stops it between Xero's
    /// rotation and the store; the next caller waits for it instead of starting another.
    pending: Mutex<Option<tokio::task::JoinHandle<Result<AccessToken, Error>>>>,
    /// The watch that keeps a consumer's cache up to date ([`super::follow`]), once in use.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        if let Some(f) = lock(&self.follower).take() {
            f.abort();
            // A refresh task that outlives this handle must not count on the follower.
            self.inner.follow_live.store(false, Ordering::Relaxed);
        }
    }
}

impl std::ops::Deref for Refresher {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// The state and the protocol steps of a [`Refresher`], shared with its refresh task.
pub struct Inner {
    api: Api<Secret>,
    namespace: String,
    name: String,
    identity: String,
    role: Role,
    /// Used when the Secret has no token-url annotation (Xero's real endpoint by default).
    default_endpoints: Endpoints,
    /// How long one `get` may wait for another party or a rate limit.
    max_wait: Duration,
    /// How long one call to Xero may take.
    xero_timeout: Duration,
    /// What the caller allows this party to spend on calls to Xero, if anything limits it (the
    /// controller: the per-app cap and the connection's minimum interval).
    budget: Option<Arc<dyn CallBudget>>,
    /// Hosts this party may send credentials to (the controller's `--allowed-endpoint-hosts`;
    /// by default Xero's own): every consumer may write the Secret's `token-url`, so no party
    /// sends the refresh token and the client credentials wherever it says.
    allowlist: crate::allowlist::EndpointAllowlist,
    /// What this party knows better than the Secret (the controller: its settings and the
    /// app's credentials, from the connection and its client Secret).
    trusted: super::format::Trusted,
    /// Told of each write this party makes (the controller: so that their events do not wake
    /// it).
    write_watch: Option<Arc<dyn WriteWatch>>,
    cache: Mutex<Option<AccessToken>>,
    /// The HTTP client for Xero: given by the owner (a controller shares one) or built on first use.
    http: std::sync::OnceLock<reqwest::Client>,
    /// A copy of the Secret just seen (by the owner, or in a watch event) and when, used
    /// instead of the next read while it is younger than [`SNAPSHOT_MAX_AGE`].
    snapshot: Mutex<Option<(Secret, std::time::Instant)>>,
    /// The token state last read or written.
    last: Mutex<Option<TokenRecord>>,
    /// Calls to `get` (a consumer asking a second time is in use: it follows the Secret).
    gets: AtomicU64,
    /// When `get` was last called.
    last_use: Mutex<std::time::Instant>,
    /// Requests this party made to the API server (reads, writes, watches).
    requests: AtomicU64,
    /// Calls this party made to the token endpoint.
    xero_calls: AtomicU64,
    /// The last version of the Secret the follower saw (it resumes from there).
    followed: Mutex<Option<String>>,
    /// The last version the follower saw, whole: while its watch is open it stands in for a
    /// read, and a waiter waits on it instead of opening a watch of its own.
    followed_latest: tokio::sync::watch::Sender<Option<Secret>>,
    /// Whether the follower's watch is open (and has not seen the Secret deleted).
    follow_live: std::sync::atomic::AtomicBool,
    /// The follower is known to be behind this version (a claim made on it conflicted, or a
    /// wait on it saw nothing): only a later one stands in for a read.
    follower_behind: AtomicU64,
    /// A wait on the follower saw nothing: the next read asks the API server.
    ask_server_next: std::sync::atomic::AtomicBool,
    /// Whether the Secret last seen is a connection's (its controller is the producer).
    managed: std::sync::atomic::AtomicBool,
    /// When the API server last refused the follower's watch ([`FOLLOW_REFUSED_PAUSE`]).
    follow_refused: Mutex<Option<std::time::Instant>>,
    /// The access token this party reported refused ([`Refresher::refused`]): never cached or
    /// handed out from the cache again.
    refused: Mutex<Option<Sensitive>>,
}

/// What a party may spend on calls to Xero: asked before each claim, with the Secret as the
/// claim would be made on (its app is the one that would call).
pub trait CallBudget: Send + Sync {
    /// `Ok` if a call for `rec` may go out now; else how long until one may.
    fn ask(&self, rec: &TokenRecord) -> Result<(), Duration>;

    /// This party ended a claim publishing a backoff until `until` (P26, P27).
    fn backed_off(&self, _until: SystemTime) {}
}

/// Told of every write a party makes to its Secret (the controller: so that the events of its
/// own writes do not wake it).
pub trait WriteWatch: Send + Sync {
    /// A write of the Secret `namespace/name` is about to be sent.
    fn sending(&self, namespace: &str, name: &str);
    /// That write ended: the Secret as the API server stored it, or `None` (it failed, or its
    /// answer was lost).
    fn ended(&self, namespace: &str, name: &str, written: Option<&Secret>);
}

/// A Secret's `resourceVersion` as a number (what the API server gives: etcd's revision), to
/// tell which of two versions is later.
fn version_number(secret: &Secret) -> Option<u64> {
    secret.metadata.resource_version.as_deref()?.parse().ok()
}

/// The version of the Secret `rec` was read from, as a number ([`version_number`]).
fn version_number_of(rec: &TokenRecord) -> Option<u64> {
    rec.resource_version.as_deref()?.parse().ok()
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

impl Refresher {
    /// The token state as last read or written by this party (what [`Refresher::get`] ended on).
    pub fn last_record(&self) -> Option<TokenRecord> {
        lock(&self.last).clone()
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn cached(&self, now: SystemTime) -> Option<AccessToken> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let refused = lock(&self.refused);
        cache
            .as_ref()
            .filter(|t| now < t.usable_until && refused.as_ref() != Some(&t.token))
            .cloned()
    }

    /// A usable access token: from the in-process cache, from the Secret, or by taking over the
    /// refresh. Concurrent callers in this process share one refresh.
    pub async fn get(&self) -> Result<AccessToken, Error> {
        if self.role == Role::Consumer {
            self.note_use();
        }
        if self.role == Role::Consumer
            && let Some(t) = self.cached(SystemTime::now())
        {
            return Ok(t);
        }
        let _flight = self.flight.lock().await;
        if self.role == Role::Consumer
            && let Some(t) = self.cached(SystemTime::now())
        {
            return Ok(t);
        }
        // A refresh still running for a caller that stopped waiting is waited for; one that
        // ended meanwhile has stored what it got, which a new run reads.
        let handle = match lock(&self.pending).take() {
            Some(h) if !h.is_finished() => h,
            _ => {
                let inner = self.inner.clone();
                tokio::spawn(async move { inner.run().await })
            }
        };
        let mut waiting = PendingGuard {
            slot: &self.pending,
            handle: Some(handle),
        };
        let joined = waiting.handle.as_mut().expect("just set").await;
        waiting.handle = None;
        let token = joined.map_err(|e| {
            Error::Timeout(
                self.max_wait,
                format!("the refresh task ended abnormally: {e}"),
            )
        })??;
        self.cache_if_newer(token.clone());
        Ok(token)
    }

    /// Requests made to the API server so far (reads, writes, watches).
    pub fn api_requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Calls made to the token endpoint so far, answered or not.
    pub fn xero_calls(&self) -> u64 {
        self.xero_calls.load(Ordering::Relaxed)
    }

    /// Reports that Xero refused `token` before its expiry (the API answered 401 with it):
    /// drops it from this party's cache and marks it in the Secret as refused (P70), if the
    /// Secret still holds it. The token is then due for refresh, for every party, once it has
    /// been stored [`super::decide::refusal_min_age`]; until then it is still handed out (a
    /// report of a token just stored is not trusted yet). Many parties reporting one token
    /// cause one refresh.
    pub async fn refused(&self, token: &Sensitive) -> Result<(), Error> {
        *lock(&self.refused) = Some(token.clone());
        self.invalidate();
        self.inner.report_refused(token).await
    }

    /// Drops the cached token (after the API answered 401 with it, say).
    pub fn invalidate(&self) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Puts a refresh task back for the next caller when the caller awaiting it goes away.
struct PendingGuard<'a> {
    slot: &'a Mutex<Option<tokio::task::JoinHandle<Result<AccessToken, Error>>>>,
    handle: Option<tokio::task::JoinHandle<Result<AccessToken, Error>>>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            *lock(self.slot) = Some(handle);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
