//! The controller: the producer role of the refresh protocol for every `XeroConnection`.
//!
//! Reconcile, per connection, as a pipeline:
//! 1. [`checks`]: the spec against what the schema cannot check and the operator's limits
//!    (endpoint allowlist, consumer namespaces) — pure, before any call;
//! 2. [`inputs`]: the token Secret and the client Secret, used only if they are the operator's
//!    own or opted in ([`ownership`]);
//! 3. the token Secret's controller-owned fields brought in line ([`resources`]: labels,
//!    settings, the app's credentials), then [`consumers`]: the consumers' Role and RoleBinding;
//! 4. the protocol as the producer (refresh only when due: on expiry by default); a failure
//!    becomes a state and a time to look again in [`classify`];
//! 5. the tenants when the token changed, status, an Event per transition ([`conditions`]), and
//!    a requeue at the instant the token is due.

pub mod checks;
pub mod classify;
pub mod conditions;
pub mod consumers;
pub mod inputs;
pub mod leader;
pub mod metrics;
pub mod ownership;
pub mod resources;
pub mod server;
pub mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{
    Controller, Predicate, PredicateConfig, WatchStreamExt, controller, predicates, watcher,
};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{Tenant, XeroConnection};
use crate::protocol::format::{self as f, TokenRecord};
use crate::protocol::{Refresher, Role as ProtocolRole};
use crate::text::{MAX_IDENTITY_CHARS, sanitize};
use crate::xero::XeroClient;
use checks::Policy;
use conditions::State;
use inputs::TokenSecretLookup;
use metrics::{ConnectionLabels, Metrics, ReasonLabels, RefreshLabels};

/// Field manager and Event reporter name.
pub const MANAGER: &str = "xero-operator";
/// Finalizer on every connection (revocation and keeping the token Secret need a say on delete).
pub const FINALIZER: &str = "xero-operator.io/cleanup";
/// How long the controller waits for a consumer that holds the refresh claim before it
/// requeues: the Secret watch wakes it when the consumer stores the new token anyway.
const PRODUCER_MAX_WAIT: Duration = Duration::from_secs(2);
/// Recheck interval for states that only a person or another object can change (missing client
/// Secret, re-authorisation): the token Secret is watched, the client Secret is not (it carries
/// no label of ours, and caching every Secret is not an option).
const RECHECK: Duration = Duration::from_secs(30);
/// Most rotations one reconcile counts in the metrics (they happen once per token lifetime; a
/// larger jump is a hand edit of the `rotation` annotation).
const MAX_ROTATIONS_COUNTED: u64 = 100;
/// Reconciles running at once by default.
pub const DEFAULT_CONCURRENCY: u16 = 32;
/// Backoff of transient failures per connection: 1 s doubling to 5 minutes.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// Errors that end a reconcile and go to `error_policy`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// What reconciles share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The controller's identity in the refresh protocol.
    pub identity: String,
    /// The operator-wide limits on specs: endpoint allowlist, consumer namespaces, default
    /// endpoints (Xero's).
    pub policy: Policy,
    /// Recheck interval for states only a person can fix (default [`RECHECK`]).
    pub recheck: Duration,
    /// The per-app token bucket of this controller's calls to Xero.
    pub gate: Option<crate::protocol::gate::AppGate>,
    /// One HTTP client (and connection pool) for every call to Xero.
    pub http: reqwest::Client,
    /// Reconciles running at once (0: no limit). Bounds memory and the burst of API requests
    /// when thousands of connections become due together.
    pub concurrency: u16,
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
}

impl Context {
    pub fn new(client: Client, identity: String, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(identity.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            identity,
            policy: Policy::default(),
            recheck: RECHECK,
            gate: None,
            http: crate::xero::new_http(),
            concurrency: DEFAULT_CONCURRENCY,
            failures: Mutex::new(HashMap::new()),
            rotations: Mutex::new(HashMap::new()),
            rbac_synced: Mutex::new(HashMap::new()),
            status_written: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `conn` is older than this controller's last status write to it. Compares
    /// resourceVersions as numbers, which the API calls opaque: they are etcd revisions on
    /// every real API server, and a value that is not a number counts as not stale (the
    /// object is used as it is, as before this check existed).
    fn status_is_stale(&self, conn: &XeroConnection) -> bool {
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

    fn mark_status_written(&self, conn: &XeroConnection) {
        if let Some(rv) = conn
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse::<u64>().ok())
        {
            lock(&self.status_written).insert(conn.uid().unwrap_or_default(), rv);
        }
    }

    fn rbac_synced_at(&self, uid: &str) -> Option<i64> {
        lock(&self.rbac_synced).get(uid).copied()
    }

    fn mark_rbac_synced(&self, uid: &str, generation: i64) {
        lock(&self.rbac_synced).insert(uid.to_owned(), generation);
    }

    fn forget_rbac(&self, uid: &str) {
        lock(&self.rbac_synced).remove(uid);
    }

    fn backoff(&self, uid: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(uid.to_owned()).or_default();
        *n = n.saturating_add(1);
        let factor = 1u32.checked_shl((*n - 1).min(16)).unwrap_or(u32::MAX);
        BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
    }

    fn clear_backoff(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}

/// Runs the controller until `shutdown` resolves: over all namespaces (`namespaces` empty) or
/// over each listed one. Fails at once, with a clear message, when the CRD is not installed.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    for scope in &scopes {
        check_crd(&ctx.client, scope.as_deref()).await?;
    }
    // One shutdown signal fanned out to a controller per scope.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let controllers = scopes.into_iter().map(|scope| {
        let mut stop = stop_rx.clone();
        run_scope(ctx.clone(), scope, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
    });
    futures_util::future::join_all(controllers).await;
    signal.abort();
    Ok(())
}

async fn check_crd(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    let conns: Api<XeroConnection> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match conns.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "the XeroConnection CRD is not installed: run `kubectl apply -f crds/` (or install the Helm chart with CRDs)"
        ),
        Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
            "not allowed to list XeroConnections ({}): check the controller's RBAC",
            s.message
        ),
        Err(e) => anyhow::bail!("cannot list XeroConnections: {e}"),
    }
}

async fn run_scope(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // `Api<PartialObjectMeta<_>>` lists and watches metadata only.
    let (conns, secrets): (Api<XeroConnection>, Api<PartialObjectMeta<Secret>>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // The connections, cached without their managedFields (memory), and passed on only when
    // the spec (generation: also bumped when deletion starts) or the finalizers change: the
    // controller's own status writes do not wake it again.
    let (store, writer) = reflector::store();
    let connections = watcher(conns, watcher::Config::default())
        .default_backoff()
        .modify(|c: &mut XeroConnection| c.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            PredicateConfig::default(),
        );
    // Token Secrets only, by label, and only their metadata: the data (tokens) of every Secret
    // is neither sent to nor held by the controller until a reconcile reads one. A change that
    // only moves the refresh claim (the controller's own claim and release among them) does
    // not wake it ([`wake`]).
    let mut wake_filter = wake::WakeFilter::new(&ctx.identity);
    let token_secrets = watcher(
        secrets,
        watcher::Config::default().labels(f::LABEL_CONNECTION),
    )
    .default_backoff()
    .filter_map(move |event| {
        std::future::ready(match event {
            Ok(event) => wake_filter.pass(event).map(Ok),
            Err(e) => Some(Err(e)),
        })
    });
    Controller::for_stream(connections, store)
        .with_config(controller::Config::default().concurrency(ctx.concurrency))
        .watches_stream(token_secrets, |s: PartialObjectMeta<Secret>| {
            let ns = s.namespace();
            s.labels().get(f::LABEL_CONNECTION).map(|name| {
                ObjectRef::<XeroConnection>::new(name).within(ns.as_deref().unwrap_or_default())
            })
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile ended with an error");
            }
        })
        .await;
}

fn error_policy(conn: Arc<XeroConnection>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&conn.uid().unwrap_or_default());
    tracing::warn!(connection = %conn.name_any(), error = %err, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

async fn reconcile(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = conn.namespace().unwrap_or_default();
    let api: Api<XeroConnection> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, conn, |event| async {
        match event {
            Finalizer::Apply(conn) => apply(conn, ctx.clone()).await,
            Finalizer::Cleanup(conn) => cleanup(conn, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

/// The outcome of the token step.
struct TokenOutcome {
    state: State,
    requeue: Duration,
    record: Option<TokenRecord>,
}

async fn apply(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let uid = conn.uid().unwrap_or_default();
    let outcome = match prepare(&conn, &ctx).await? {
        Err(state) => TokenOutcome {
            state,
            requeue: ctx.recheck,
            record: None,
        },
        Ok(token_secret) => token_step(&conn, &ctx, token_secret).await?,
    };
    if !matches!(
        outcome.state,
        State::XeroUnavailable(_) | State::ApiError(_)
    ) {
        ctx.clear_backoff(&uid);
    }
    let requeue = match outcome.state {
        // The in-process backoff, or the one every party shares in the Secret if longer.
        State::XeroUnavailable(_) | State::ApiError(_) => ctx.backoff(&uid).max(outcome.requeue),
        _ => outcome.requeue,
    };
    let tenants = match (&outcome.state, &outcome.record) {
        (State::TokenValid, Some(rec)) => refresh_tenants(&conn, &ctx, rec).await,
        _ => None,
    };
    write_status(&conn, &ctx, &outcome, tenants).await?;
    if !outcome.state.is_ready() {
        ctx.metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: outcome.state.reason().to_owned(),
            })
            .inc();
    }
    tracing::debug!(connection = %conn.name_any(), namespace = %ns, reason = outcome.state.reason(), ?requeue, "reconciled");
    Ok(Action::requeue(requeue))
}

/// Steps 1–3 of the pipeline: spec checks, the token and client Secrets, the token Secret's
/// controller-owned fields, consumer RBAC. `Ok(Err(state))` is a state a person must fix (nothing
/// was read, written or granted for an object that is not the operator's); `Ok(Ok(secret))`
/// carries the token Secret as just read or written (`None` if another party created it
/// meanwhile), so the token step need not read it again.
async fn prepare(
    conn: &XeroConnection,
    ctx: &Context,
) -> Result<Result<Option<Secret>, State>, Error> {
    if let Err(state) = checks::validate(conn, &ctx.policy) {
        if matches!(state, State::ConsumerNotAllowed(_)) {
            consumers::withdraw(conn, ctx).await?;
        }
        return Ok(Err(state));
    }
    let ns = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = match inputs::find_token_secret(conn, &secrets).await? {
        TokenSecretLookup::Refused(state) => {
            consumers::withdraw(conn, ctx).await?;
            return Ok(Err(state));
        }
        TokenSecretLookup::Ours(secret) => Some(*secret),
        TokenSecretLookup::Absent => None,
    };
    let app = match inputs::read_client_secret(conn, &secrets).await? {
        Ok(app) => app,
        Err(state) => return Ok(Err(state)),
    };
    let token_url = checks::endpoints(conn, &ctx.policy.default_endpoints).token_url;
    let owner = (!conn.spec.keep_token_secret_on_delete).then(|| {
        conn.controller_owner_ref(&())
            .expect("a stored object has a name and uid")
    });
    let name = conn.token_secret_name();
    let token_secret = match existing {
        Some(current) => {
            match resources::token_secret_patch(&current, conn, &token_url, &app, owner) {
                Some(patch) => Some(
                    secrets
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(kube_err("updating the token Secret"))?,
                ),
                None => Some(current),
            }
        }
        // Created only under the name derived from the connection: a chosen tokenSecretName
        // must already exist and be opted in, so no spec makes the controller take a name that
        // someone else's Secret is meant to have (and grant it to the spec's consumers).
        None if name != conn.default_token_secret_name() => {
            consumers::withdraw(conn, ctx).await?;
            return Ok(Err(State::TokenSecretNotOwned(format!(
                "token Secret {name:?} does not exist; the controller creates only \
                 {:?} itself: create {name:?} and label it {}={} (xero-token authorize \
                 --connection does both), or leave tokenSecretName unset",
                conn.default_token_secret_name(),
                f::LABEL_CONNECTION,
                conn.name_any()
            ))));
        }
        None => {
            let mut secret = Secret::default();
            secret.metadata.name = Some(name.clone());
            secret.metadata.namespace = Some(ns.clone());
            secret.type_ = Some("Opaque".to_owned());
            let patch = resources::token_secret_patch(&secret, conn, &token_url, &app, owner)
                .expect("an empty Secret always needs the controller's fields");
            let mut body: serde_json::Value = serde_json::to_value(&secret).expect("serializable");
            json_merge(&mut body, patch);
            let secret: Secret =
                serde_json::from_value(body).expect("a merged Secret deserializes");
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(connection = %conn.name_any(), secret = %name, "created the token Secret");
                    Some(created)
                }
                // 409: a Secret of that name appeared since the lookup; it is judged afresh by
                // the next reconcile (after the backoff), never used unjudged.
                Err(e) => return Err(kube_err("creating the token Secret")(e)),
            }
        }
    };
    if let Err(state) = consumers::sync(conn, ctx).await? {
        return Ok(Err(state));
    }
    Ok(Ok(token_secret))
}

fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                json_merge(t.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

/// The producer's part in the protocol, starting from the token Secret `prepare` saw.
async fn token_step(
    conn: &XeroConnection,
    ctx: &Context,
    token_secret: Option<Secret>,
) -> Result<TokenOutcome, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let ahead = resources::ahead_of_expiry(conn);
    let refresher = Refresher::new(
        ctx.client.clone(),
        &ns,
        &conn.token_secret_name(),
        &ctx.identity,
        ProtocolRole::Producer { ahead },
    )
    .with_default_endpoints(ctx.policy.default_endpoints.clone())
    .with_allowlist(ctx.policy.allowlist.clone())
    .with_max_wait(PRODUCER_MAX_WAIT)
    .with_http(ctx.http.clone());
    let refresher = match &ctx.gate {
        Some(gate) => refresher.with_gate(gate.clone()),
        None => refresher,
    };
    let refresher = match token_secret {
        Some(secret) => refresher.with_snapshot(secret),
        None => refresher,
    };
    let started = std::time::Instant::now();
    let result = refresher.get().await;
    // What the protocol ended on: the Secret as last read or written (no second read).
    let record = refresher.last_record();
    if let Some(rec) = &record {
        count_refreshes(conn, ctx, rec, started.elapsed());
    }
    let outcome = match result {
        Ok(token) => {
            let now = SystemTime::now();
            let due = token.usable_until.checked_sub(ahead).unwrap_or(now);
            ctx.metrics
                .seconds_until_expiry
                .get_or_create(&ConnectionLabels {
                    namespace: ns.clone(),
                    name: conn.name_any(),
                })
                .set(
                    token
                        .expires_at
                        .duration_since(now)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
            TokenOutcome {
                state: State::TokenValid,
                requeue: due
                    .duration_since(now)
                    .unwrap_or_default()
                    .max(Duration::from_millis(200)),
                record,
            }
        }
        Err(e) => {
            let (state, requeue) =
                classify::classify(&e, record.as_ref(), ctx.recheck, SystemTime::now());
            if !matches!(state, State::Refreshing(_) | State::RefreshingExpired(_)) {
                ctx.metrics
                    .refreshes
                    .get_or_create(&RefreshLabels {
                        actor: "controller".into(),
                        result: state.reason().to_owned(),
                    })
                    .inc();
            }
            TokenOutcome {
                state,
                requeue,
                record,
            }
        }
    };
    Ok(outcome)
}

/// Counts the rotations that happened since the last reconcile, by who made them.
fn count_refreshes(conn: &XeroConnection, ctx: &Context, rec: &TokenRecord, elapsed: Duration) {
    let uid = conn.uid().unwrap_or_default();
    let mut seen = ctx.rotations.lock().unwrap_or_else(|e| e.into_inner());
    let last = seen.insert(uid, rec.rotation);
    let Some(last) = last else { return };
    if rec.rotation <= last {
        return;
    }
    let by_me = rec.refreshed_by.as_deref() == Some(ctx.identity.as_str());
    let actor = if by_me { "controller" } else { "consumer" };
    ctx.metrics
        .refreshes
        .get_or_create(&RefreshLabels {
            actor: actor.into(),
            result: "ok".into(),
        })
        // The counter is consumer-writable: a hand edit must not inflate the metric.
        .inc_by((rec.rotation - last).min(MAX_ROTATIONS_COUNTED));
    if by_me {
        ctx.metrics
            .token_endpoint_seconds
            .observe(elapsed.as_secs_f64());
    }
}

/// Fetches the tenants when the token changed since the status last listed them, and publishes
/// them in the token Secret. `None`: keep what the status has.
async fn refresh_tenants(
    conn: &XeroConnection,
    ctx: &Context,
    rec: &TokenRecord,
) -> Option<Vec<Tenant>> {
    let status = conn.status.as_ref();
    let known = status.is_some_and(|s| !s.tenants.is_empty() && s.refresh_count == rec.rotation);
    if known {
        return None;
    }
    let access_token = rec.access_token.clone()?;
    // checks::validate has allowed this endpoint before the reconcile got here.
    let endpoints = checks::endpoints(conn, &ctx.policy.default_endpoints);
    let xero = XeroClient::with_http(ctx.http.clone(), endpoints, crate::xero::REQUEST_TIMEOUT);
    let list = match xero.connections(&access_token).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(connection = %conn.name_any(), error = %e, "could not list the tenants");
            return None;
        }
    };
    let ids: Vec<String> = list.iter().map(|t| t.tenant_id.clone()).collect();
    if ids != rec.tenant_ids {
        let secrets: Api<Secret> =
            Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        // Pinned to the Secret version the token came from; on a conflict the next reconcile
        // (woken by that other write) tries again.
        let patch = json!({
            "metadata": {"resourceVersion": rec.resource_version},
            "data": {
                f::TENANT_ID: b64(ids.first().map(String::as_str).unwrap_or_default()),
                f::TENANT_IDS: b64(&ids.join(",")),
            },
        });
        if let Err(e) = secrets
            .patch(
                &conn.token_secret_name(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(connection = %conn.name_any(), error = %e, "could not publish the tenants in the token Secret");
            return None;
        }
    }
    Some(
        list.into_iter()
            // What an endpoint answered reaches `kubectl get -o yaml`: shown sanitised.
            .map(|t| Tenant {
                tenant_id: t.tenant_id,
                tenant_type: t.tenant_type.map(|v| sanitize(&v, MAX_IDENTITY_CHARS)),
                tenant_name: t.tenant_name.map(|v| sanitize(&v, MAX_IDENTITY_CHARS)),
                connection_id: Some(t.id),
            })
            .collect(),
    )
}

fn to_time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

async fn write_status(
    conn: &XeroConnection,
    ctx: &Context,
    outcome: &TokenOutcome,
    tenants: Option<Vec<Tenant>>,
) -> Result<(), Error> {
    let api: Api<XeroConnection> =
        Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
    // The status as last written: the object reconciled may predate this controller's own last
    // status write (the watch lags behind it); then only its status is read again. The spec and
    // generation stay those of the object reconciled.
    let previous = if ctx.status_is_stale(conn) {
        api.get(&conn.name_any())
            .await
            .map_err(kube_err("reading the connection"))?
            .status
            .unwrap_or_default()
    } else {
        conn.status.clone().unwrap_or_default()
    };
    let prev_ready = previous.conditions.iter().find(|c| c.type_ == "Ready");
    let now = SystemTime::now();
    let ready =
        conditions::ready_condition(&outcome.state, prev_ready, conn.metadata.generation, now);
    if conditions::is_transition(prev_ready, &outcome.state) {
        let event = KubeEvent {
            type_: if outcome.state.is_ready() {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: outcome.state.reason().to_owned(),
            note: Some(outcome.state.message()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &conn.object_ref(&())).await {
            tracing::warn!(connection = %conn.name_any(), error = %e, "could not publish an Event");
        }
        tracing::info!(connection = %conn.name_any(), reason = outcome.state.reason(), message = %outcome.state.message(), "Ready changed");
    }
    let mut status = previous.clone();
    status.conditions = vec![ready];
    status.observed_generation = conn.metadata.generation;
    status.token_secret_name = Some(conn.token_secret_name());
    if let Some(rec) = &outcome.record {
        if let f::Expiry::At(at) = rec.expiry {
            status.access_token_expires_at = to_time(at);
        }
        status.last_refresh_time = rec.refreshed_at.and_then(to_time);
        status.last_refreshed_by = rec.refreshed_by.clone();
        status.refresh_count = rec.rotation;
    }
    if let Some(t) = tenants {
        status.tenants = t;
    }
    if status == previous {
        return Ok(());
    }
    let body = json!({
        "apiVersion": XeroConnection::api_version(&()),
        "kind": XeroConnection::kind(&()),
        "status": status,
    });
    let written = api
        .patch_status(
            &conn.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(kube_err("writing status"))?;
    ctx.mark_status_written(&written);
    Ok(())
}

/// On delete: revoke at Xero if asked, and let the token Secret go (owner reference) or stay.
/// A token Secret that is not this connection's is left alone: nothing is read from it, sent,
/// or changed.
async fn cleanup(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    lock(&ctx.status_written).remove(&conn.uid().unwrap_or_default());
    let ns = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = conn.token_secret_name();
    let TokenSecretLookup::Ours(secret) = inputs::find_token_secret(&conn, &secrets).await? else {
        return Ok(Action::await_change());
    };
    if conn.spec.revoke_on_delete {
        revoke(&conn, &ctx, &secret).await;
    }
    if conn.spec.keep_token_secret_on_delete {
        // Released, not handed on: without our owner reference, label and uid mark, no other
        // connection can take the kept Secret until someone who may write it labels it again.
        let uid = conn.uid().unwrap_or_default();
        let owners: Vec<_> = secret
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|o| o.uid != uid)
            .collect();
        let patch = json!({"metadata": {
            "uid": secret.metadata.uid,
            "ownerReferences": owners,
            "labels": {f::LABEL_CONNECTION: null},
            "annotations": {ownership::ANN_CONNECTION_UID: null},
        }});
        secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_err("keeping the token Secret"))?;
        tracing::info!(connection = %conn.name_any(), secret = %name, "kept and released the token Secret");
    }
    Ok(Action::await_change())
}

/// Revokes the refresh token of `secret` at Xero (best effort: deletion must not hang on Xero).
async fn revoke(conn: &XeroConnection, ctx: &Context, secret: &Secret) {
    let rec = TokenRecord::from_secret(secret);
    let (Some(app), Some(rt)) = (rec.client.clone(), rec.refresh_token.clone()) else {
        return;
    };
    let endpoints = checks::endpoints(conn, &ctx.policy.default_endpoints);
    if let Err(why) = ctx.policy.allowlist.check(&endpoints.revocation_url) {
        tracing::warn!(connection = %conn.name_any(), why, "not revoking: the revocation endpoint is not allowed");
        return;
    }
    let xero = XeroClient::with_http(ctx.http.clone(), endpoints, crate::xero::REQUEST_TIMEOUT);
    match xero.revoke(&app, &rt).await {
        Ok(()) => {
            tracing::info!(connection = %conn.name_any(), "revoked the refresh token at Xero")
        }
        Err(e) => {
            tracing::warn!(connection = %conn.name_any(), error = %e, "revoking the refresh token failed")
        }
    }
}
