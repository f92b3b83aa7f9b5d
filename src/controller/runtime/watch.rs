//! Running the controller: the CRD checked first, one controller per namespace scope (or one
//! for all), what wakes a reconcile (a connection's spec or finalizers, not its status; a token
//! Secret's metadata, filtered by [`crate::controller::wake`]), and the backoff of a failed reconcile.

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{
    Controller, Predicate, PredicateConfig, WatchStreamExt, controller, predicates, watcher,
};
use kube::{Api, Client, ResourceExt};

use crate::controller::context::Context;
use crate::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use crate::controller::{Error, wake};
use crate::crd::XeroConnection;
use crate::protocol::format as f;

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
    let client_secret_api = secrets.clone();
    // The connections, cached with only what reconciles read (memory: bounded by the spec's
    // schema, not by what an author puts in the metadata), and passed on only when
    // the spec (generation: also bumped when deletion starts) or the finalizers change: the
    // controller's own status writes do not wake it again.
    let (store, writer) = reflector::store();
    let forget_ctx = ctx.clone();
    let connections = watcher(conns, watcher::Config::default())
        .default_backoff()
        // A deleted connection is never reconciled again: what was held for it goes now.
        .inspect_ok(move |event| {
            forget_ctx.secret_owners.note(event);
            if let watcher::Event::Delete(conn) = event {
                forget_ctx.forget(conn);
            }
        })
        // What reconciles never read is not kept: managed fields, labels, annotations and owner
        // references (an author's 250 KB annotation would otherwise cost the operator 250 KB
        // per connection). The finalizers stay: kube's finalizer helper removes its own by
        // index.
        .modify(|c: &mut XeroConnection| {
            c.metadata.managed_fields = None;
            c.metadata.annotations = None;
            c.metadata.labels = None;
            c.metadata.owner_references = None;
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            PredicateConfig::default(),
        );
    // Token Secrets only, by label, and only their metadata: the data (tokens) of every Secret
    // is neither sent to nor held by the controller until a reconcile reads one. Every change
    // but the controller's own writes wakes the connection naming the Secret ([`wake`]); a
    // Secret that loses its label leaves the watch with a deletion, which wakes it too.
    let wake_filter = wake::WakeFilter::new(ctx.own_writes.clone());
    let owners_ctx = ctx.clone();
    let events = watcher(
        secrets,
        watcher::Config::default().labels(f::LABEL_CONNECTION),
    )
    .default_backoff();
    // An event that came while a write of the controller's to that Secret was in flight is
    // judged once the write has ended (its answer names the version it produced), off the
    // stream, so no other Secret's event waits for it.
    let (later_tx, later_rx) = tokio::sync::mpsc::unbounded_channel();
    let judged = events.filter_map(move |event| {
        std::future::ready(match event {
            Ok(event) => match wake_filter.judge(event) {
                wake::Judged::Wake(s) => Some(Ok(s)),
                wake::Judged::Skip => None,
                wake::Judged::Later(s) => {
                    let settle = wake_filter.settle(s);
                    let tx = later_tx.clone();
                    tokio::spawn(async move {
                        if let Some(s) = settle.await {
                            let _ = tx.send(s);
                        }
                    });
                    None
                }
            },
            Err(e) => Some(Err(e)),
        })
    });
    let settled = futures_util::stream::unfold(later_rx, |mut rx| async move {
        rx.recv().await.map(|s| (Ok(s), rx))
    });
    let token_secrets = futures_util::stream::select(judged, settled);
    // Client Secrets (opted in by label; metadata only): a fixed client secret is used at once,
    // not at the next recheck. Only changes: every connection is reconciled at start anyway.
    let client_secrets = watcher(
        client_secret_api,
        watcher::Config::default().labels(&format!("{LABEL_CLIENT_CREDENTIALS}=true")),
    )
    .default_backoff()
    .filter_map(|event| {
        std::future::ready(match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => Some(Ok(s)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    });
    let connections_store = store.clone();
    Controller::for_stream(connections, store)
        .with_config(controller::Config::default().concurrency(ctx.concurrency))
        // By the Secret's namespace and name, never by its label, which consumers may write.
        .watches_stream(token_secrets, move |s: PartialObjectMeta<Secret>| {
            owners_ctx
                .secret_owners
                .of(&s.namespace().unwrap_or_default(), &s.name_any())
        })
        // The connections in the Secret's namespace that name it as their client Secret (a
        // scan of the cache: client Secrets change rarely).
        .watches_stream(client_secrets, move |s: PartialObjectMeta<Secret>| {
            let (ns, name) = (s.namespace(), s.name_any());
            connections_store
                .state()
                .into_iter()
                .filter(|c| c.namespace() == ns && c.spec.client_secret_ref.name == name)
                .map(|c| ObjectRef::from_obj(&*c))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(crate::controller::reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile ended with an error");
            }
        })
        .await;
}

/// A reconcile that ended with an error (the API server failed it): looked at again after the
/// connection's backoff, decided like every requeue ([`crate::controller::requeue`]).
fn error_policy(conn: Arc<XeroConnection>, err: &Error, ctx: Arc<Context>) -> Action {
    let backoff = ctx.backoff(&conn.uid().unwrap_or_default());
    let delay = crate::controller::requeue::after(
        crate::controller::requeue::Next::After(std::time::Duration::ZERO),
        Some(backoff),
        std::time::SystemTime::now(),
    );
    tracing::warn!(connection = %conn.name_any(), error = %err, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
