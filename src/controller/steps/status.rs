//! The last step: the status a person sees (the `Ready` condition from [`crate::controller::conditions`],
//! an Event per transition, the token's expiry, the last refresh and the tenants), written only
//! when it changed and judged against this controller's own last write. Also the one status
//! written before a step: a new connection's first call to Xero.

use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::controller::conditions::State;
use crate::controller::context::Context;
use crate::controller::requeue::Next;
use crate::controller::tenants::Listing;
use crate::controller::token::TokenOutcome;
use crate::controller::{Error, MANAGER, conditions, kube_err};
use crate::crd::XeroConnection;
use crate::protocol::decide::{Role as ProtocolRole, Step, decide};
use crate::protocol::format as f;

fn to_time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

pub(crate) async fn write(
    conn: &XeroConnection,
    ctx: &Context,
    outcome: &TokenOutcome,
    tenants: Option<Listing>,
) -> Result<(), Error> {
    write_with(conn, ctx, outcome, tenants, true).await
}

/// Before the first call to Xero for a connection that shows no `Ready` condition yet, says
/// so (`Ready=False`, reason `Refreshing`, naming the host), without an Event: a call that
/// takes long (an unreachable endpoint is retried for up to half a minute) no longer leaves
/// the connection blank. The usual first Event follows with the outcome.
pub(crate) async fn announce_first_call(
    conn: &XeroConnection,
    ctx: &Context,
    token_secret: Option<&k8s_openapi::api::core::v1::Secret>,
) -> Result<(), Error> {
    let shown = conn
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready"));
    let Some(secret) = token_secret else {
        return Ok(());
    };
    if shown || ctx.status_is_stale(conn) {
        return Ok(());
    }
    let rec = f::TokenRecord::from_secret(secret);
    let role = ProtocolRole::Producer {
        ahead: crate::controller::resources::ahead_of_expiry(conn),
    };
    let now = SystemTime::now();
    // A usable token due for a refresh (ahead of expiry, or claimed a moment early) is not
    // "no usable access token yet".
    if rec.is_usable(now)
        || !matches!(
            decide(&rec, now, &ctx.identity, role),
            Step::Claim { .. } | Step::Refresh
        )
    {
        return Ok(());
    }
    let endpoints = crate::controller::checks::endpoints(conn, &ctx.policy.default_endpoints);
    let host = url::Url::parse(&endpoints.token_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let outcome = TokenOutcome {
        state: State::RefreshingExpired(format!(
            "no usable access token yet: getting one from {host}"
        )),
        next: Next::After(std::time::Duration::ZERO),
        record: None,
    };
    write_with(conn, ctx, &outcome, None, false).await
}

/// How long after the token stops being usable a step still running says so (the status write
/// itself takes a moment more: within a second in all).
const UNUSABLE_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Runs the token `step`. If it is still running when the access token stops being usable
/// (`usable_until`, from the Secret the step started from) and the connection shows Ready, the
/// status says at once that it no longer is (`TokenExpired`), whatever the claim's length: a
/// refresh that keeps failing is retried within its claim, and the status follows the token,
/// not the end of the retries.
pub(crate) async fn follow_token<F>(
    conn: &XeroConnection,
    ctx: &Context,
    step: F,
    usable_until: Option<SystemTime>,
) -> Result<TokenOutcome, Error>
where
    F: std::future::Future<Output = Result<TokenOutcome, Error>>,
{
    let shows_ready = conn.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    let Some(until) = usable_until.filter(|_| shows_ready) else {
        return step.await;
    };
    let wait = until.duration_since(SystemTime::now()).unwrap_or_default() + UNUSABLE_GRACE;
    let mut step = std::pin::pin!(step);
    tokio::select! {
        outcome = &mut step => return outcome,
        () = tokio::time::sleep(wait) => {}
    }
    let outcome = TokenOutcome {
        state: State::TokenExpired(format!(
            "the access token stopped being usable at {}; its refresh is under way and has not \
             succeeded yet",
            f::format_time(until)
        )),
        next: Next::After(std::time::Duration::ZERO),
        record: None,
    };
    // The step goes on while the status is written: its calls are cut before its claim ends,
    // whatever the API server's latency.
    let write = async {
        if let Err(e) = write_with(conn, ctx, &outcome, None, true).await {
            tracing::warn!(connection = %conn.name_any(), error = %e, "could not write the expired token's status");
        }
    };
    let ((), outcome) = tokio::join!(write, step);
    outcome
}

async fn write_with(
    conn: &XeroConnection,
    ctx: &Context,
    outcome: &TokenOutcome,
    tenants: Option<Listing>,
    events: bool,
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
    ctx.metrics.set_reason(
        &conn.namespace().unwrap_or_default(),
        &conn.name_any(),
        Some(outcome.state.reason()),
    );
    let now = SystemTime::now();
    let conditions = conditions::conditions(
        &outcome.state,
        &previous.conditions,
        conn.metadata.generation,
        now,
    );
    // Published once the status that records the transition is written: a failed write is
    // retried (with backoff) and would otherwise publish the same transition again each time.
    let transition = events && conditions::is_transition(prev_ready, &outcome.state);
    let mut status = previous.clone();
    status.conditions = conditions;
    status.observed_generation = conn.metadata.generation;
    status.token_secret_name = Some(conn.token_secret_name());
    if let Some(rec) = &outcome.record {
        if let f::Expiry::At(at) = rec.expiry {
            status.access_token_expires_at = to_time(at);
        }
        status.last_refresh_time = rec.refreshed_at_as_of(now).and_then(to_time);
        status.last_refreshed_by = rec.refreshed_by.clone();
        status.refresh_count = rec.rotation;
    }
    if let Some(listing) = tenants {
        status.tenants = listing.tenants;
        status.tenants_listed_at = to_time(now);
        status.tenants_authentication_event = listing.authentication_event;
    }
    if status == previous {
        // No status change, so no transition to announce (the condition would have changed).
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
    if transition {
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
        if let Err(e) = ctx.publish(&event, &conn.object_ref(&())).await {
            tracing::warn!(connection = %conn.name_any(), error = %e, "could not publish an Event");
        }
        tracing::info!(connection = %conn.name_any(), reason = outcome.state.reason(), message = %outcome.state.message(), "Ready changed");
    }
    Ok(())
}
