//! The controller: the producer role of the refresh protocol for every `XeroConnection`.
//!
//! The tree shows the pipeline: [`rules`] are pure (checks, ownership, the objects written,
//! error classification, conditions, the requeue, what wakes a reconcile); [`steps`] do the
//! reads and writes, one file per step; [`runtime`] runs it all (watches, shared state, leader
//! election, metrics). A reconcile (`apply` below) calls the steps in this order:
//! 1. [`checks`]: the spec against what the schema cannot check and the operator's limits
//!    (endpoint allowlist, consumer namespaces); pure, before any call;
//! 2. [`inputs`]: the token Secret and the client Secret, used only if they are the operator's
//!    own or opted in ([`ownership`]);
//! 3. [`token_secret`]: the token Secret's controller-owned fields brought in line
//!    ([`resources`]);
//! 4. [`consumers`]: the consumers' Role and RoleBinding;
//! 5. [`token`]: the protocol as the producer, refreshing only when due; a failure becomes a
//!    state and a time to look again ([`classify`]);
//! 6. [`tenants`]: the tenants, with the first token, after a new authorisation and every 5-6 h;
//! 7. [`status`]: status, the `Ready` condition and an Event per transition ([`conditions`]);
//!    then the requeue ([`requeue`]): just before the token is due ([`token`] claims then, and
//!    calls Xero at the instant itself).
//!
//! On delete: [`cleanup`]. Around the pipeline: [`watch`] (what wakes a reconcile; [`wake`]),
//! [`context`] (what reconciles share and remember), [`leader`], [`metrics`], [`server`].

pub mod rules;
pub mod runtime;
pub mod steps;

pub use rules::{checks, classify, conditions, ownership, requeue, resources, wake};
pub use runtime::{budget, context, kubernetes_version, leader, metrics, server, watch};
pub use steps::{cleanup, consumers, inputs, status, tenants, token, token_secret};

pub use context::{Context, DEFAULT_CONCURRENCY};
pub use watch::run;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};

use crate::crd::XeroConnection;
use crate::xero::ClientCredentials;
use conditions::State;
use inputs::TokenSecretLookup;
use metrics::ReasonLabels;

/// Field manager and Event reporter name.
pub const MANAGER: &str = "xero-operator";
/// Finalizer on every connection (revocation and keeping the token Secret need a say on delete).
pub const FINALIZER: &str = "xero-operator.io/cleanup";

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
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The token Secret changed under every attempt to keep and release it on delete.
    #[error("the token Secret {0:?} kept changing while it was being released; retrying")]
    KeptChanging(String),
}

/// What a step that may refuse ends on: `Ok(Ok(value))`; `Ok(Err(state))`, refused, with the
/// state a person must fix (nothing read, written or granted for an object not the operator's);
/// or `Err`, the API server failed it.
pub type StepResult<T> = Result<Result<T, State>, Error>;

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

async fn reconcile(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = conn.namespace().unwrap_or_default();
    let api: Api<XeroConnection> = Api::namespaced(ctx.client.clone(), &ns);
    if cleanup::needs_finalizer(&conn.spec) {
        return finalizer(&api, FINALIZER, conn, |event| async {
            match event {
                Finalizer::Apply(conn) => apply(conn, ctx.clone()).await,
                Finalizer::Cleanup(conn) => cleanup::run(conn, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
    }
    // Nothing to do on delete: owner references take the token Secret and the consumer RBAC,
    // and a connection is deleted at once, with or without a running operator. A finalizer
    // left by an earlier spec (or version) is removed.
    if conn.finalizers().iter().any(|f| f == FINALIZER) {
        cleanup::remove_finalizer(&api, &conn).await?;
    }
    if conn.metadata.deletion_timestamp.is_some() {
        ctx.forget(&conn);
        return Ok(Action::await_change());
    }
    apply(conn, ctx).await
}

async fn apply(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let outcome = match prepare(&conn, &ctx).await? {
        Prepared::Refused(state) => token::TokenOutcome {
            state,
            next: requeue::Next::After(ctx.recheck),
            record: None,
        },
        Prepared::Ready { token_secret, app } => refresh(&conn, &ctx, token_secret, app).await?,
    };
    let backoff = backoff_after(&conn, &ctx, &outcome.state);
    let tenants = match (&outcome.state, &outcome.record) {
        (State::TokenValid, Some(rec)) => tenants::refresh(&conn, &ctx, rec).await,
        _ => None,
    };
    status::write(&conn, &ctx, &outcome, tenants).await?;
    observe(&conn, &ctx, &outcome);
    let requeue = requeue::after(outcome.next, backoff, SystemTime::now());
    tracing::debug!(connection = %conn.name_any(), namespace = %conn.namespace().unwrap_or_default(), reason = outcome.state.reason(), ?requeue, "reconciled");
    Ok(Action::requeue(requeue))
}

/// Step 5, the token: the status says so first if this will be the connection's first call,
/// and follows the token while the step runs (`Ready` turns False when the token stops being
/// usable, whatever the step is still doing).
async fn refresh(
    conn: &XeroConnection,
    ctx: &Context,
    token_secret: Option<Box<Secret>>,
    app: ClientCredentials,
) -> Result<token::TokenOutcome, Error> {
    status::announce_first_call(conn, ctx, token_secret.as_deref()).await?;
    let usable_until = token_secret
        .as_deref()
        .and_then(|s| token::usable_until(conn, ctx, &app, s));
    let step = token::step(conn, ctx, token_secret.map(|s| *s), app);
    status::follow_token(conn, ctx, step, usable_until).await
}

/// The backoff after failures this reconcile ends on (`None`: it ended on something else,
/// and the backoff starts over).
fn backoff_after(conn: &XeroConnection, ctx: &Context, state: &State) -> Option<Duration> {
    let uid = conn.uid().unwrap_or_default();
    if matches!(state, State::XeroUnavailable(_) | State::ApiError(_)) {
        Some(ctx.backoff(&uid))
    } else {
        ctx.clear_backoff(&uid);
        None
    }
}

/// The metrics a reconcile's outcome sets: the token's expiry, the last refresh, the errors.
fn observe(conn: &XeroConnection, ctx: &Context, outcome: &token::TokenOutcome) {
    let (ns, name) = (conn.namespace().unwrap_or_default(), conn.name_any());
    if let Some(rec) = &outcome.record {
        if let crate::protocol::format::Expiry::At(at) = rec.expiry {
            ctx.metrics
                .set_time(&ctx.metrics.access_token_expiry, &ns, &name, at);
        }
        // A `refreshed-at` in the future (a hand edit) is no refresh: no metric from it.
        if let Some(at) = rec.refreshed_at_as_of(SystemTime::now()) {
            ctx.metrics
                .set_time(&ctx.metrics.last_refresh, &ns, &name, at);
        }
    }
    if !outcome.state.is_ready() {
        ctx.metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: outcome.state.reason().to_owned(),
            })
            .inc();
    }
}

/// What steps 1–4 of the pipeline end on.
enum Prepared {
    /// Ready for the token step: the token Secret as just read or written (`None` if another
    /// party created it meanwhile, so the token step reads it), and the app's credentials from
    /// the client Secret (the controller calls Xero with these, never with the token Secret's
    /// copy, which consumers may write).
    Ready {
        token_secret: Option<Box<Secret>>,
        app: ClientCredentials,
    },
    /// A state a person must fix: nothing was read, written or granted for an object that is
    /// not the operator's.
    Refused(State),
}

/// Steps 1–4 of the pipeline: spec checks, the token and client Secrets, the token Secret's
/// controller-owned fields, consumer RBAC.
async fn prepare(conn: &XeroConnection, ctx: &Context) -> Result<Prepared, Error> {
    if let Err(state) = checks::validate(conn, &ctx.policy) {
        if matches!(state, State::ConsumerNotAllowed(_)) {
            consumers::withdraw(conn, ctx).await?;
        }
        return Ok(Prepared::Refused(state));
    }
    let ns = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = match inputs::find_token_secret(conn, &secrets).await? {
        TokenSecretLookup::Refused(state) => {
            consumers::withdraw(conn, ctx).await?;
            return Ok(Prepared::Refused(state));
        }
        TokenSecretLookup::Ours(secret) => Some(*secret),
        TokenSecretLookup::Absent => None,
    };
    let app = match inputs::read_client_secret(conn, &secrets).await? {
        Ok(app) => app,
        Err(state) => return Ok(Prepared::Refused(state)),
    };
    // 3. the token Secret's controller-owned fields
    let token_secret =
        match token_secret::bring_in_line(conn, ctx, &secrets, existing, &app).await? {
            Ok(secret) => secret,
            Err(state) => return Ok(Prepared::Refused(state)),
        };
    // 4. the consumers' RBAC
    if let Err(state) = consumers::sync(conn, ctx).await? {
        return Ok(Prepared::Refused(state));
    }
    Ok(Prepared::Ready {
        token_secret: token_secret.map(Box::new),
        app,
    })
}
