//! The I/O around [`decide`]: read the token Secret, claim with a `resourceVersion`-conditional
//! write, call Xero, write the new pair back (retried until it lands), or wait by watching the
//! Secret. Inside one process, concurrent callers share one cached token and one in-flight
//! refresh (single flight); across processes the Secret decides.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};

use super::Error;
use super::backoff::{ACROSS_CLAIMS, WRITE_RETRY, XERO_RETRY};
use super::decide::{PRODUCER_CLAIM_LEAD, Role, Step, WaitReason, call_delay, decide};
use super::format::{
    ANN_FAILED_ATTEMPTS, ANN_REAUTH_FOR, ANN_REAUTH_REASON, ANN_RETRY_NOT_BEFORE, ANN_STOP_REASON,
    ANN_STOPPED_FOR, Lease, TokenRecord, claim_patch, format_time, release_patch, salvage_patch,
    token_patch,
};
use super::retry::{Failure, LEASE_MARGIN, MIN_CALL, Next, after_failed_call};
use crate::crd::Grant;
use crate::redact::Sensitive;
use crate::xero::{Endpoints, TokenSet, XeroClient, XeroError};

/// How long a copy of the Secret may stand in for reading it. Every write is conditional on the
/// `resourceVersion`, so a stale copy costs a conflict and a re-read, never a lost token; the
/// limit keeps a copy left from an earlier call from being used much later.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// Longest single watch (the API server caps watches at a few minutes anyway).
const MAX_WATCH: Duration = Duration::from_secs(60);
/// A watch that ends without an event sooner than this is followed by a read only once this
/// long has passed since it started: a proxy that ends watches at once makes one read a second,
/// not a loop.
const MIN_WATCH: Duration = Duration::from_secs(1);
/// How long a read waits for the follower to deliver a version it is known to be behind (after
/// a claim made on its latest conflicted) before asking the API server instead.
const FOLLOW_CATCH_UP: Duration = Duration::from_millis(500);
/// A consumer whose follower is open waits before it claims, listening for another party's
/// claim: when many processes find the token expired in the same instant, they wait for one
/// claim's store instead of each sending a claim that can only conflict (each on a connection
/// of its own to the API server, opened for it: the follower's watch holds the pooled one).
/// The wait is a random part of `CLAIM_SPREAD`, after `PRODUCER_HEAD_START` when the Secret
/// is a connection's (labelled): its controller claims just before expiry and calls Xero at
/// expiry, so its claim is usually there already; if it is not, the consumers take over a
/// moment later.
const CLAIM_SPREAD: Duration = Duration::from_millis(50);
/// The longest wait on the follower before a read from the API server, and how often the wait
/// checks that the follower's watch is still open.
const FOLLOWER_WAIT_MAX: Duration = Duration::from_secs(5);
const FOLLOWER_WAIT_SLICE: Duration = Duration::from_secs(1);
const PRODUCER_HEAD_START: Duration = Duration::from_millis(50);
/// How much longer than [`PRODUCER_CLAIM_LEAD`] a holder waits for its due time before it
/// concludes the wall clock stepped back: room for the timer's and the clocks' granularity.
const HOLD_SLACK: Duration = Duration::from_millis(5);

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

/// A consumer that has not asked for a token for this long stops following its Secret.
const FOLLOW_IDLE: Duration = Duration::from_secs(super::follow::WATCH_SECONDS as u64);
/// After the API server refused the follower's watch (the consumer's RBAC), following is not
/// tried again for this long: not a watch request on every `get`.
const FOLLOW_REFUSED_PAUSE: Duration = Duration::from_secs(300);

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

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

impl Refresher {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        role: Role,
    ) -> Self {
        let inner = Inner {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            role,
            default_endpoints: Endpoints::default(),
            max_wait: Duration::from_secs(60),
            xero_timeout: crate::xero::REQUEST_TIMEOUT,
            budget: None,
            allowlist: crate::allowlist::EndpointAllowlist::for_callers::<&str>(&[])
                .expect("Xero's hosts are valid entries"),
            trusted: super::format::Trusted::default(),
            write_watch: None,
            cache: Mutex::new(None),
            http: std::sync::OnceLock::new(),
            snapshot: Mutex::new(None),
            last: Mutex::new(None),
            gets: AtomicU64::new(0),
            last_use: Mutex::new(std::time::Instant::now()),
            requests: AtomicU64::new(0),
            xero_calls: AtomicU64::new(0),
            followed: Mutex::new(None),
            followed_latest: tokio::sync::watch::Sender::new(None),
            follow_live: std::sync::atomic::AtomicBool::new(false),
            follower_behind: AtomicU64::new(0),
            ask_server_next: std::sync::atomic::AtomicBool::new(false),
            managed: std::sync::atomic::AtomicBool::new(false),
            follow_refused: Mutex::new(None),
        };
        Self {
            inner: Arc::new(inner),
            flight: tokio::sync::Mutex::new(()),
            pending: Mutex::new(None),
            follower: Mutex::new(None),
        }
    }

    /// The state, while it is still this handle's alone (the builder methods run before the
    /// first `get`).
    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("a Refresher is configured before its first get")
    }

    /// Calls Xero through `http` (a shared client and connection pool) instead of its own.
    pub fn with_http(self, http: reqwest::Client) -> Self {
        let _ = self.http.set(http);
        self
    }

    /// Starts from `secret`, which the owner has just read, instead of reading it again. Every
    /// write is conditional on its `resourceVersion`, so a copy a moment old is safe.
    pub fn with_snapshot(self, secret: Secret) -> Self {
        self.keep_snapshot(secret);
        self
    }

    /// The token state as last read or written by this party (what [`Refresher::get`] ended on).
    pub fn last_record(&self) -> Option<TokenRecord> {
        lock(&self.last).clone()
    }

    /// Endpoints used when the Secret names none.
    pub fn with_default_endpoints(mut self, endpoints: Endpoints) -> Self {
        self.inner_mut().default_endpoints = endpoints;
        self
    }

    /// How long one [`Refresher::get`] may wait for another party or a rate limit.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.inner_mut().max_wait = max_wait;
        self
    }

    /// How long one call to Xero may take before it counts as lost.
    pub fn with_xero_timeout(mut self, timeout: Duration) -> Self {
        self.inner_mut().xero_timeout = timeout;
        self
    }

    /// Asks `budget` before each claim; a refusal ends the `get` with [`Error::Throttled`]
    /// (nothing claimed, nothing called) rather than a wait.
    pub fn with_budget(mut self, budget: Arc<dyn CallBudget>) -> Self {
        self.inner_mut().budget = Some(budget);
        self
    }

    /// Calls Xero only at hosts `allowlist` holds (by default Xero's own): a token URL from the
    /// Secret's annotation (a consumer can edit it) that names another host ends the `get` with
    /// [`Error::EndpointNotAllowed`] before any claim or request.
    pub fn with_allowlist(mut self, allowlist: crate::allowlist::EndpointAllowlist) -> Self {
        self.inner_mut().allowlist = allowlist;
        self
    }

    /// Tells `watch` of each write this party makes to the Secret.
    pub fn with_write_watch(mut self, watch: Arc<dyn WriteWatch>) -> Self {
        self.inner_mut().write_watch = Some(watch);
        self
    }

    /// Uses `trusted` settings and credentials instead of what the Secret says (the controller:
    /// the connection's spec and its client Secret), in every decision and every call.
    pub fn with_trusted(mut self, trusted: super::format::Trusted) -> Self {
        self.inner_mut().trusted = trusted;
        self
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn cached(&self, now: SystemTime) -> Option<AccessToken> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.as_ref().filter(|t| now < t.usable_until).cloned()
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

    /// A consumer asking: from its second `get` on it is in use, and follows its Secret (one
    /// long watch) so that a token stored by another party is in its cache at once.
    fn note_use(&self) {
        *lock(&self.last_use) = std::time::Instant::now();
        if self.gets.fetch_add(1, Ordering::Relaxed) < 1 {
            return;
        }
        let mut follower = lock(&self.follower);
        if follower.as_ref().is_some_and(|f| !f.is_finished()) {
            return;
        }
        // Outside a tokio runtime there is nothing to follow with (a get from the cache alone).
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if lock(&self.follow_refused).is_some_and(|at| at.elapsed() < FOLLOW_REFUSED_PAUSE) {
            return;
        }
        let followed = lock(&self.followed).clone();
        let Some(rv) = followed.or_else(|| {
            lock(&self.last)
                .as_ref()
                .and_then(|r| r.resource_version.clone())
        }) else {
            return;
        };
        let (keep, seen, counted, live, ended) = (
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
        );
        let following = super::follow::run(
            self.api.clone(),
            self.name.clone(),
            rv,
            move || match keep.upgrade() {
                Some(inner) if lock(&inner.last_use).elapsed() < FOLLOW_IDLE => {
                    super::follow::Keep::Watching
                }
                _ => super::follow::Keep::Stop,
            },
            move |secret| match seen.upgrade() {
                Some(inner) => {
                    inner.adopt(secret);
                    super::follow::Keep::Watching
                }
                None => super::follow::Keep::Stop,
            },
            move || {
                if let Some(inner) = counted.upgrade() {
                    inner.requests.fetch_add(1, Ordering::Relaxed);
                }
            },
            move |open| {
                if let Some(inner) = live.upgrade() {
                    inner.follow_live.store(open, Ordering::Relaxed);
                }
            },
            super::follow::SILENCE_MAX,
        );
        *follower = Some(tokio::spawn(async move {
            if following.await == super::follow::Ended::Refused
                && let Some(inner) = ended.upgrade()
            {
                *lock(&inner.follow_refused) = Some(std::time::Instant::now());
            }
        }));
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

impl Inner {
    /// A version of the Secret the follower saw: its token goes into the cache if a read would
    /// hand it out ([`decide`] says Use: a usable, plausible token of a valid record) and it
    /// expires no earlier than the cached one.
    fn adopt(&self, secret: Secret) {
        // Only the cache: not the snapshot a refresh round reads, which must never be older
        // than this party's own last write (a watch event can arrive after it).
        let rec = self.record(&secret);
        if let Some(rv) = &rec.resource_version {
            *lock(&self.followed) = Some(rv.clone());
        }
        // Never backwards (a restart from "0" after a 410 may replay an older cached state).
        let number = version_number(&secret);
        self.followed_latest.send_if_modified(|latest| {
            let newer = latest.as_ref().and_then(version_number) <= number;
            if newer {
                *latest = Some(secret);
            }
            newer
        });
        if decide(&rec, SystemTime::now(), &self.identity, self.role) != Step::Use {
            return;
        }
        if let Some(token) = AccessToken::from_record(&rec) {
            self.cache_if_newer(token);
        }
    }

    /// Caches `token` unless the cache holds a usable one that expires later (the follower may
    /// have put a newer one there meanwhile).
    fn cache_if_newer(&self, token: AccessToken) {
        let mut cache = lock(&self.cache);
        let keep = cache
            .as_ref()
            .is_some_and(|c| c.expires_at > token.expires_at && SystemTime::now() < c.usable_until);
        if !keep {
            *cache = Some(token);
        }
    }

    /// Keeps `secret`, seen just now, to stand in for the next read.
    fn keep_snapshot(&self, secret: Secret) {
        *lock(&self.snapshot) = Some((secret, std::time::Instant::now()));
    }

    /// The follower's latest version, if it may stand in for a read: its watch is open, and the
    /// version is no older than anything this party read or wrote itself and newer than what
    /// the follower is known to be behind. Waits up to `catch_up` for such a version when the
    /// follower is known to be behind. Versions are compared as the numbers the API server
    /// gives (etcd revisions); one that is not a number is never used.
    async fn followed_version(&self, catch_up: Duration) -> Option<Secret> {
        if !self.follow_live.load(Ordering::Relaxed)
            || self.ask_server_next.swap(false, Ordering::Relaxed)
        {
            return None;
        }
        let known = match lock(&self.last)
            .as_ref()
            .and_then(|r| r.resource_version.clone())
        {
            Some(rv) => rv.parse::<u64>().ok()?,
            None => 0,
        };
        let floor = known.max(
            self.follower_behind
                .load(Ordering::Relaxed)
                .saturating_add(1),
        );
        let mut latest = self.followed_latest.subscribe();
        // Nothing seen yet: the follower's watch started after the last read and nothing was
        // written since; only the API server has the current version.
        latest.borrow_and_update().as_ref()?;
        // Otherwise a version at or after `floor` exists (this party saw it, or its claim
        // conflicted with it) and the open watch is delivering it.
        let found = tokio::time::timeout(
            catch_up,
            latest.wait_for(|s| s.as_ref().and_then(version_number) >= Some(floor)),
        )
        .await;
        match found {
            Ok(Ok(secret)) => secret.clone(),
            _ => None,
        }
    }

    /// Notes `secret` as the latest state seen.
    fn remember(&self, secret: &Secret) -> TokenRecord {
        let rec = self.record(secret);
        let labelled = secret
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(super::format::LABEL_CONNECTION));
        self.managed.store(labelled, Ordering::Relaxed);
        *lock(&self.last) = Some(rec.clone());
        rec
    }

    /// Reads the Secret, noting it as the latest state seen.
    async fn fetch(&self) -> Result<Secret, kube::Error> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let secret = self.api.get(&self.name).await?;
        self.remember(&secret);
        // The server's answer replaces what the follower was known to be behind (versions
        // that went backwards, after an etcd restore, must not leave every read waiting).
        self.follower_behind.store(0, Ordering::Relaxed);
        Ok(secret)
    }

    /// The token endpoint for `rec`: its annotation, else the default.
    fn token_url<'a>(&'a self, rec: &'a TokenRecord) -> &'a str {
        rec.settings
            .token_url
            .as_deref()
            .unwrap_or(&self.default_endpoints.token_url)
    }

    fn check_endpoint(&self, rec: &TokenRecord) -> Result<(), Error> {
        self.allowlist
            .check(self.token_url(rec))
            .map_err(|why| Error::EndpointNotAllowed(format!("token endpoint: {why}")))
    }

    /// The Secret as this party reads it: parsed, with what it trusts more put in place.
    fn record(&self, secret: &Secret) -> TokenRecord {
        TokenRecord::from_secret(secret).trusting(&self.trusted)
    }

    /// The Secret's current state: a copy just seen, the follower's latest version, or a read
    /// from the API server; says whether it came from the follower.
    async fn read(&self) -> Result<(TokenRecord, bool), Error> {
        let snapshot = lock(&self.snapshot).take();
        if let Some((secret, seen)) = snapshot
            && seen.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Ok((self.remember(&secret), false));
        }
        if let Some(secret) = self.followed_version(FOLLOW_CATCH_UP).await {
            return Ok((self.remember(&secret), true));
        }
        Ok((self.read_from_server().await?, false))
    }

    /// Reads the Secret from the API server (retrying transient failures a few times).
    async fn read_from_server(&self) -> Result<TokenRecord, Error> {
        let mut attempt = 0;
        loop {
            match self.fetch().await {
                Ok(secret) => return Ok(self.record(&secret)),
                Err(e) if is_not_found(&e) => {
                    return Err(Error::SecretNotFound {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                    });
                }
                Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
                    return Err(Error::Kube {
                        action: "reading the token Secret",
                        source: kube::Error::Api(s),
                    });
                }
                Err(e) if attempt >= 5 => {
                    return Err(Error::Kube {
                        action: "reading the token Secret",
                        source: e,
                    });
                }
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, "reading the token Secret failed; retrying");
                    tokio::time::sleep(WRITE_RETRY.delay(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn patch(&self, body: &serde_json::Value) -> Result<Secret, kube::Error> {
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

    async fn run(&self) -> Result<AccessToken, Error> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.max_wait;
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
            let now = SystemTime::now();
            let step = decide(&rec, now, &self.identity, self.role);
            let waited = matches!(step, Step::Wait { .. });
            tracing::debug!(secret = %self.name, ?step, followed, "protocol step");
            // Only using, claiming (a conditional write) and waiting are decided on the
            // follower's version; calling Xero under a claim and ending in an error are
            // decided on the API server's answer (the follower may lag behind a write).
            if followed && !matches!(step, Step::Use | Step::Claim { .. } | Step::Wait { .. }) {
                self.ask_server_next.store(true, Ordering::Relaxed);
                continue;
            }
            match step {
                Step::Use => {
                    if let Some(token) = AccessToken::from_record(&rec) {
                        return Ok(token);
                    }
                }
                Step::ReauthorizationRequired => {
                    return Err(Error::ReauthorizationRequired(
                        rec.reauthorization_reason
                            .unwrap_or_else(|| "invalid_grant".to_owned()),
                    ));
                }
                Step::NoRefreshToken => return Err(Error::NoRefreshToken),
                Step::UnreadableRefreshToken => return Err(Error::UnreadableRefreshToken),
                Step::MissingClientCredentials => return Err(Error::MissingClientCredentials),
                Step::Stopped => {
                    let reason = rec.stop_reason.clone().unwrap_or_default();
                    let (code, description) = match reason.split_once(": ") {
                        Some((c, d)) => (c.to_owned(), Some(d.to_owned())),
                        None => (reason, None),
                    };
                    return Err(Error::Stopped { code, description });
                }
                Step::Wait { until, reason } => {
                    let wait = until.duration_since(now).unwrap_or_default();
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    // A holder usually stores well before its claim runs out: watch for that
                    // until our own deadline. A rate limit or a backoff that ends after the
                    // deadline cannot end sooner: say so at once.
                    let give_up = match reason {
                        WaitReason::HeldBy(_) => left.is_zero(),
                        WaitReason::RateLimited => wait > left,
                    };
                    // Giving up is decided on the API server's answer, like every error.
                    if give_up && followed {
                        self.ask_server_next.store(true, Ordering::Relaxed);
                        continue;
                    }
                    if give_up {
                        return Err(match reason {
                            WaitReason::HeldBy(h) => Error::Timeout(
                                self.max_wait,
                                format!(
                                    "the refresh is held by {}",
                                    crate::text::sanitize(&h, crate::text::MAX_IDENTITY_CHARS)
                                ),
                            ),
                            // retry-not-before: a 429's, or the backoff after failures.
                            WaitReason::RateLimited if rec.failed_attempts > 0 => {
                                Error::BackingOff {
                                    until,
                                    failures: rec.failed_attempts,
                                }
                            }
                            WaitReason::RateLimited => Error::RateLimited { until },
                        });
                    }
                    self.wait_for_change(rec.resource_version.as_deref(), wait.min(left))
                        .await;
                }
                Step::Claim { replacing } => {
                    self.check_endpoint(&rec)?;
                    if !spread
                        && self.role == Role::Consumer
                        && self.follow_live.load(Ordering::Relaxed)
                        && let Some(from) = rec
                            .resource_version
                            .as_deref()
                            .and_then(|rv| rv.parse::<u64>().ok())
                    {
                        spread = true;
                        let head_start = if self.managed.load(Ordering::Relaxed) {
                            PRODUCER_HEAD_START
                        } else {
                            Duration::ZERO
                        };
                        let pause = head_start + CLAIM_SPREAD.mul_f64(fastrand::f64());
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
                    let now = SystemTime::now();
                    let lease_end = now + rec.settings.lease_duration;
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
                            if wait_until_due(&claimed, self.role).await {
                                if let Some(token) = self.refresh(claimed, lease_end).await? {
                                    return Ok(token);
                                }
                            } else {
                                // The wall clock stepped back: not due after all.
                                self.release(&claimed, &[]).await;
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
                Step::Refresh => {
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
                    let lease_end = match rec.lease {
                        Lease::Held { expires, .. } => expires,
                        _ => now + rec.settings.lease_duration,
                    };
                    if wait_until_due(&rec, self.role).await {
                        if let Some(token) = self.refresh(rec, lease_end).await? {
                            return Ok(token);
                        }
                    } else {
                        // The wall clock stepped back: not due after all.
                        self.release(&rec, &[]).await;
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

    /// Waits until the Secret changes from `resource_version` or `wait` passes.
    async fn wait_for_change(&self, resource_version: Option<&str>, wait: Duration) {
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

    /// Whether the follower saw a version after `from` within `wait`; if so, that version
    /// stands in for the next read.
    async fn follower_saw_newer(&self, from: u64, wait: Duration) -> bool {
        let mut latest = self.followed_latest.subscribe();
        let newer = tokio::time::timeout(
            wait,
            latest.wait_for(|s| s.as_ref().and_then(version_number) > Some(from)),
        )
        .await;
        match newer {
            Ok(Ok(secret)) => match secret.clone() {
                Some(secret) => {
                    self.keep_snapshot(secret);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// Calls Xero while holding the claim. `Ok(None)` means: start over from a fresh read.
    async fn refresh(
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
            // No call outlives the claim: each is cut LEASE_MARGIN before the claim ends, so the
            // holder can still store or release before another party may claim — two parties
            // never wait on Xero with the same refresh token at once. An answer cut off this
            // way may have been processed: the next party recovers it through the grace period.
            let left = lease_end
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .saturating_sub(LEASE_MARGIN);
            if left < MIN_CALL {
                // Only before the first call (a claim taken over late): retries stop earlier.
                self.release(&rec, &[]).await;
                return Ok(None);
            }
            let xero =
                XeroClient::with_http(http.clone(), endpoints.clone(), self.xero_timeout.min(left));
            self.xero_calls.fetch_add(1, Ordering::Relaxed);
            let answer = match (rec.settings.grant, &presented) {
                (Grant::RefreshToken, Some(rt)) => xero.refresh(&app, rt).await,
                (Grant::RefreshToken, None) => return Err(Error::NoRefreshToken),
                (Grant::ClientCredentials, _) => {
                    xero.client_credentials(&app, &rec.settings.scopes).await
                }
            };
            let err = match answer {
                Ok(set) => return self.persist(&rec, set).await,
                Err(e) => e,
            };
            tracing::info!(secret = %self.name, error = %err, attempt, "refresh attempt failed");
            match err {
                XeroError::InvalidGrant(description) => {
                    return self.on_invalid_grant(&rec, description).await;
                }
                XeroError::Malformed {
                    refresh_token: Some(new_rt),
                    ref reason,
                } if Some(&new_rt) != presented.as_ref() => {
                    // Xero rotated the token but the answer is unusable: keep the new refresh
                    // token (never lose it) and start over with it after a pause.
                    tracing::warn!(secret = %self.name, reason, "storing the rotated refresh token from an unusable answer");
                    let rotation = rec.rotation.saturating_add(1);
                    self.write_until_landed(&rec, |rv| {
                        salvage_patch(rv, &new_rt, &self.identity, SystemTime::now(), rotation)
                    })
                    .await?;
                    return Ok(None);
                }
                e if e.is_retryable() => {
                    let failure = match &e {
                        XeroError::RateLimited { retry_after, .. } => Failure::RateLimited {
                            retry_after: *retry_after,
                        },
                        XeroError::Unreachable(_) => Failure::Unreached,
                        _ => Failure::Transient,
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
                            // Out of calls or of claim: everyone waits, longer after each
                            // claim that ended this way.
                            let mut markers =
                                vec![(ANN_RETRY_NOT_BEFORE, Some(format_time(not_before)))];
                            if let Some(n) = failed_attempts {
                                markers.push((ANN_FAILED_ATTEMPTS, Some(n.to_string())));
                            }
                            tracing::warn!(secret = %self.name, error = %e, calls = attempt + 1, not_before = %format_time(not_before), "refresh failed; backing off");
                            if let Some(budget) = &self.budget {
                                budget.backed_off(not_before);
                            }
                            self.release(&rec, &markers).await;
                            return Err(Error::Xero(e));
                        }
                    }
                }
                e => return Err(self.stop(&rec, e).await),
            }
            attempt += 1;
        }
    }

    /// An error only a configuration change can fix: release the claim with a stop marker for
    /// exactly these credentials, so no party calls Xero with them again.
    async fn stop(&self, rec: &TokenRecord, e: XeroError) -> Error {
        let (code, description) = match e {
            XeroError::InvalidClient => ("invalid_client".to_owned(), None),
            XeroError::OAuth { code, description } => (code, description),
            other => return Error::Xero(other),
        };
        let reason = match &description {
            Some(d) => format!("{code}: {d}"),
            None => code.clone(),
        };
        tracing::error!(secret = %self.name, reason, "Xero refused the request for good: stopping until the credentials change");
        self.release(
            rec,
            &[
                (ANN_STOPPED_FOR, rec.credentials_fingerprint()),
                (ANN_STOP_REASON, Some(reason)),
            ],
        )
        .await;
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
        if fresh.refresh_token != rec.refresh_token {
            tracing::info!(secret = %self.name, "invalid_grant, but the refresh token changed meanwhile: using the new one");
            if matches!(&fresh.lease, Lease::Held { holder, .. } if *holder == self.identity) {
                self.release(&fresh, &[]).await;
            }
            return Ok(None);
        }
        let reason = match description {
            Some(d) => format!("invalid_grant: {d}"),
            None => "invalid_grant".to_owned(),
        };
        let fingerprint = rec.refresh_token.as_ref().map(Sensitive::fingerprint);
        tracing::error!(secret = %self.name, reason, "Xero refused the refresh token: re-authorisation required");
        self.release(
            &fresh,
            &[
                (ANN_REAUTH_FOR, fingerprint),
                (ANN_REAUTH_REASON, Some(reason.clone())),
            ],
        )
        .await;
        Err(Error::ReauthorizationRequired(reason))
    }

    /// Writes the new token set. Xero has already rotated the refresh token, so this write is
    /// retried until it lands: on a conflict with the freshest resourceVersion as long as the
    /// Secret still holds the token we presented (our answer is its successor); if another party
    /// already stored a successor, ours is not needed.
    async fn persist(
        &self,
        rec: &TokenRecord,
        set: TokenSet,
    ) -> Result<Option<AccessToken>, Error> {
        let now = SystemTime::now();
        let expires_at = set.expires_at(now);
        let rotation = rec.rotation.saturating_add(1);
        let identity = self.identity.clone();
        let written = self
            .write_until_landed(rec, |rv| {
                token_patch(rv, &set, expires_at, &identity, now, rotation)
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
    async fn write_until_landed(
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
                    Ok(secret) => {
                        let fresh = self.record(&secret);
                        if fresh.refresh_token != rec.refresh_token
                            || fresh.access_token != rec.access_token
                        {
                            tracing::info!(secret = %self.name, "another party already stored a newer token; ours is not needed");
                            return Ok(secret);
                        }
                        rv = fresh.resource_version.unwrap_or_default();
                        continue;
                    }
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

    /// Releases this party's claim (best effort: an expired claim is taken over anyway).
    /// After a conflict, the claim is released only if it is still this party's: another
    /// party's claim is never removed, only the `extra` markers are written then.
    async fn release(&self, rec: &TokenRecord, extra: &[(&str, Option<String>)]) {
        let mut rv = rec.resource_version.clone().unwrap_or_default();
        let mut mine = true;
        for _ in 0..5 {
            let body = if mine {
                release_patch(&rv, extra)
            } else {
                super::format::annotations_patch(&rv, extra)
            };
            match self.patch(&body).await {
                Ok(_) => return,
                Err(e) if is_conflict(&e) => match self.fetch().await {
                    Ok(secret) => {
                        let fresh = self.record(&secret);
                        mine = matches!(&fresh.lease, Lease::Held { holder, .. } if *holder == self.identity);
                        if !mine && extra.is_empty() {
                            return;
                        }
                        rv = fresh.resource_version.unwrap_or_default();
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A default identity for this process: `<hostname>/<pid>-<random>`, unique per process so a
/// restarted pod never mistakes its predecessor's claim for its own.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    process_identity(&host)
}

/// `<prefix>/<pid>-<random>`: an identity unique to this process whatever prefix it is given
/// (a pod name is shared by a restarted container and by two sidecars of one pod, which must
/// never take each other's live claim for their own).
pub fn process_identity(prefix: &str) -> String {
    // The suffix takes at most 16 characters ("/" + a 32-bit pid + "-" + 4 hex digits); the
    // prefix is cut so that the whole stays printable and within MAX_IDENTITY_CHARS.
    let prefix = crate::text::sanitize(prefix, crate::text::MAX_IDENTITY_CHARS - 16);
    format!("{prefix}/{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Holding a claim made ahead of the due time ([`PRODUCER_CLAIM_LEAD`]): waits for the
/// due time itself, and no longer (every consumer at expiry waits on this call); true once it
/// is due. A timer never fires early, so one sleep is the rule. Only a wall clock stepped back
/// meanwhile can leave it not due after the lead (plus a little for a slewed clock): false, and
/// the caller releases its claim and decides again rather than call Xero early.
async fn wait_until_due(rec: &TokenRecord, role: Role) -> bool {
    let deadline = tokio::time::Instant::now() + PRODUCER_CLAIM_LEAD + HOLD_SLACK;
    loop {
        let wait = call_delay(rec, SystemTime::now(), role);
        if wait.is_zero() {
            return true;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(wait.max(Duration::from_micros(100)).min(left)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{PRODUCER_CLAIM_LEAD, Role, TokenRecord, wait_until_due};

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

    #[test]
    fn process_identities_are_printable_bounded_and_per_process() {
        let a = super::process_identity("pod-1");
        assert!(
            a.starts_with(&format!("pod-1/{}-", std::process::id())),
            "{a}"
        );
        let long = super::process_identity(&format!("x\u{1b}[31m{}", "y".repeat(500)));
        assert!(
            long.chars().count() <= crate::text::MAX_IDENTITY_CHARS,
            "{long}"
        );
        assert!(!long.chars().any(char::is_control), "{long:?}");
    }
}
