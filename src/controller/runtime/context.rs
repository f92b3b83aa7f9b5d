//! What reconciles share ([`Context`]: the client, the identity, the operator's policy, the
//! HTTP client and the per-app gate) and what the controller remembers per connection between
//! reconciles: the backoff of transient failures, the rotation last counted, the generation
//! whose consumer RBAC is in line, the version of its last status write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};

use crate::controller::MANAGER;
use crate::controller::checks::Policy;
use crate::controller::metrics::Metrics;
use crate::controller::wake::{OwnWrites, SecretOwners};
use crate::crd::XeroConnection;

/// Recheck interval for states that only a person or another object can change (re-authorisation,
/// a consumer not allowed): the token and the opted-in client Secrets are watched, so most fixes
/// are seen at once; this catches the rest (a client Secret not opted in yet carries no label to
/// watch by).
const RECHECK: Duration = Duration::from_secs(30);
/// Reconciles running at once by default.
pub const DEFAULT_CONCURRENCY: u16 = 32;
/// Backoff of transient failures per connection: 1 s doubling to 5 minutes.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What reconciles share.
pub struct Context {
    pub client: Client,
    /// Who publishes the controller's Events ([`Context::publish`]).
    reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// The controller's identity in the refresh protocol.
    pub identity: String,
    /// The operator-wide limits on specs: endpoint allowlist, consumer namespaces, default
    /// endpoints (Xero's).
    pub policy: Policy,
    /// Recheck interval for states only a person can fix (default [`RECHECK`]).
    pub recheck: Duration,
    /// The per-app cap of this controller's calls to Xero, shared between namespaces.
    pub gate: Option<crate::protocol::gate::AppGate>,
    /// The longest minimum interval between this controller's calls for one connection
    /// ([`crate::controller::budget::MIN_CALL_INTERVAL`]).
    pub min_call_interval: Duration,
    /// What it spent per connection.
    pub spending: Arc<crate::controller::budget::Spending>,
    /// One HTTP client (and connection pool) for every call to Xero.
    pub http: reqwest::Client,
    /// Reconciles running at once (0: no limit). Bounds memory and the burst of API requests
    /// when thousands of connections become due together.
    pub concurrency: u16,
    /// The token Secret versions this controller wrote itself: their events do not wake it.
    pub own_writes: Arc<OwnWrites>,
    /// Which connections name which token Secret (a Secret's events wake those).
    pub secret_owners: SecretOwners,
    /// Consecutive transient failures per connection uid (for the backoff).
    failures: Mutex<HashMap<String, u32>>,
    /// The rotation last seen per connection uid (to count refreshes by actor).
    rotations: Mutex<HashMap<String, u64>>,
    /// Per connection uid, the generation whose consumer Role/RoleBinding were last brought in
    /// line: a steady-state reconcile makes no RBAC call.
    rbac_synced: Mutex<HashMap<String, i64>>,
    /// Per connection uid, the resourceVersion this controller's last status write produced:
    /// a reconcile that sees an older object (the watch lags behind the write) reads the
    /// connection again, so a transition is judged against what was really written, once.
    status_written: Mutex<HashMap<String, u64>>,
    /// Per connection uid, failed tenant listings in a row and when the last one failed.
    tenants_failed: Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

impl Context {
    /// Remembers `rotation` as the last seen for connection `uid`; returns the one before.
    pub(crate) fn note_rotation(&self, uid: &str, rotation: u64) -> Option<u64> {
        lock(&self.rotations).insert(uid.to_owned(), rotation)
    }

    /// Publishes `event` about `regarding`. Each Event is created on its own, without kube's
    /// in-memory series cache: that cache keeps every Event for 6 minutes and scans all of them
    /// on each publish, which with 100,000 connections turning Ready at start is 100,000 cached
    /// Events and a quadratic scan. The controller's Events are transitions of Ready (rate-bound
    /// by the backoff), not repeats to fold into series.
    pub async fn publish(
        &self,
        event: &kube::runtime::events::Event,
        regarding: &k8s_openapi::api::core::v1::ObjectReference,
    ) -> Result<(), kube::Error> {
        Recorder::new(self.client.clone(), self.reporter.clone())
            .publish(event, regarding)
            .await
    }

    /// Forgets everything held for a connection that is gone (or going): its per-uid state and
    /// its metric series, so deleted connections cost no memory and leave no stale gauge.
    pub(crate) fn forget(&self, conn: &XeroConnection) {
        let uid = conn.uid().unwrap_or_default();
        lock(&self.status_written).remove(&uid);
        lock(&self.rotations).remove(&uid);
        lock(&self.rbac_synced).remove(&uid);
        lock(&self.failures).remove(&uid);
        lock(&self.tenants_failed).remove(&uid);
        self.spending.forget(&uid);
        self.metrics
            .forget_connection(&conn.namespace().unwrap_or_default(), &conn.name_any());
    }

    pub fn new(client: Client, identity: String, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(identity.clone()),
        };
        Self {
            reporter,
            client,
            metrics,
            identity,
            policy: Policy::default(),
            recheck: RECHECK,
            gate: None,
            min_call_interval: crate::controller::budget::MIN_CALL_INTERVAL,
            spending: Arc::default(),
            http: crate::xero::new_http(),
            concurrency: DEFAULT_CONCURRENCY,
            own_writes: Arc::new(OwnWrites::default()),
            secret_owners: SecretOwners::default(),
            failures: Mutex::new(HashMap::new()),
            rotations: Mutex::new(HashMap::new()),
            rbac_synced: Mutex::new(HashMap::new()),
            status_written: Mutex::new(HashMap::new()),
            tenants_failed: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `conn` is older than this controller's last status write to it. Compares
    /// resourceVersions as numbers, which the API calls opaque: they are etcd revisions on
    /// every real API server, and a value that is not a number counts as not stale (the
    /// object is used as it is, as before this check existed).
    pub(crate) fn status_is_stale(&self, conn: &XeroConnection) -> bool {
        let seen = conn
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse::<u64>().ok());
        let written = lock(&self.status_written)
            .get(&conn.uid().unwrap_or_default())
            .copied();
        matches!((seen, written), (Some(seen), Some(written)) if seen < written)
    }

    pub(crate) fn mark_status_written(&self, conn: &XeroConnection) {
        if let Some(rv) = conn
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse::<u64>().ok())
        {
            lock(&self.status_written).insert(conn.uid().unwrap_or_default(), rv);
        }
    }

    /// Whether a tenant listing for connection `uid` failed too recently to try again.
    pub(crate) fn tenants_listing_held_back(&self, uid: &str) -> bool {
        lock(&self.tenants_failed)
            .get(uid)
            .is_some_and(|(n, at)| at.elapsed() < crate::controller::tenants::listing_retry(*n))
    }

    /// Notes a failed tenant listing; returns how long until the next is tried.
    pub(crate) fn tenants_listing_failed(&self, uid: &str) -> Duration {
        let mut failed = lock(&self.tenants_failed);
        let entry = failed
            .entry(uid.to_owned())
            .or_insert((0, std::time::Instant::now()));
        *entry = (entry.0.saturating_add(1), std::time::Instant::now());
        crate::controller::tenants::listing_retry(entry.0)
    }

    pub(crate) fn tenants_listing_succeeded(&self, uid: &str) {
        lock(&self.tenants_failed).remove(uid);
    }

    pub(crate) fn rbac_synced_at(&self, uid: &str) -> Option<i64> {
        lock(&self.rbac_synced).get(uid).copied()
    }

    pub(crate) fn mark_rbac_synced(&self, uid: &str, generation: i64) {
        lock(&self.rbac_synced).insert(uid.to_owned(), generation);
    }

    pub(crate) fn forget_rbac(&self, uid: &str) {
        lock(&self.rbac_synced).remove(uid);
    }

    pub(crate) fn backoff(&self, uid: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(uid.to_owned()).or_default();
        *n = n.saturating_add(1);
        let factor = 1u32.checked_shl((*n - 1).min(16)).unwrap_or(u32::MAX);
        BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
    }

    pub(crate) fn clear_backoff(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}
