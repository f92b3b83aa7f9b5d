//! The producer's step of the refresh protocol (`docs/protocol.md`): refresh only when due (on
//! expiry, or `aheadOfExpirySeconds` before), starting from the token Secret the earlier steps
//! saw; a failure becomes a state and a time to look again ([`crate::controller::classify`]); rotations are
//! counted by who made them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use crate::controller::conditions::State;
use crate::controller::context::Context;
use crate::controller::metrics::RefreshLabels;
use crate::controller::requeue::Next;
use crate::controller::{Error, checks, classify, resources};
use crate::crd::XeroConnection;
use crate::protocol::decide::call_delay;
use crate::protocol::format::{TokenRecord, Trusted};
use crate::protocol::{Refresher, Role as ProtocolRole};
use crate::xero::ClientCredentials;

/// How long the controller waits for a consumer that holds the refresh claim before it
/// requeues: the Secret watch wakes it when the consumer stores the new token anyway.
const PRODUCER_MAX_WAIT: Duration = Duration::from_secs(2);
/// Most rotations one reconcile counts in the metrics (they happen once per token lifetime; a
/// larger jump is a hand edit of the `rotation` annotation).
const MAX_ROTATIONS_COUNTED: u64 = 100;

/// The outcome of the token step.
pub(crate) struct TokenOutcome {
    pub(crate) state: State,
    /// What the reconcile waits for next ([`crate::controller::requeue::after`] turns it into the requeue).
    pub(crate) next: Next,
    pub(crate) record: Option<TokenRecord>,
}

/// The producer's part in the protocol, starting from the token Secret `prepare` saw.
/// What the controller trusts over the token Secret's copies: the spec's settings and the client
/// Secret's `app`.
fn trusted(conn: &XeroConnection, ctx: &Context, app: ClientCredentials) -> Trusted {
    let token_url = checks::endpoints(conn, &ctx.policy.default_endpoints).token_url;
    Trusted {
        settings: Some(resources::protocol_settings(conn, &token_url)),
        client: Some(app),
    }
}

/// When the access token in `secret` stops being usable, as the controller judges it.
pub(crate) fn usable_until(
    conn: &XeroConnection,
    ctx: &Context,
    app: &ClientCredentials,
    secret: &Secret,
) -> Option<SystemTime> {
    TokenRecord::from_secret(secret)
        .trusting(&trusted(conn, ctx, app.clone()))
        .usable_until()
}

/// The controller decides and calls with what it trusts, `app` and the spec's settings, never
/// with what the token Secret says of them (every consumer may write it).
pub(crate) async fn step(
    conn: &XeroConnection,
    ctx: &Context,
    token_secret: Option<Secret>,
    app: ClientCredentials,
) -> Result<TokenOutcome, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let ahead = resources::ahead_of_expiry(conn);
    let trusted = trusted(conn, ctx, app);
    let refresher = Refresher::new(
        ctx.client.clone(),
        &ns,
        &conn.token_secret_name(),
        &ctx.identity,
        ProtocolRole::Producer { ahead },
    )
    .with_default_endpoints(ctx.policy.default_endpoints.clone())
    .with_allowlist(ctx.policy.allowlist.clone())
    .with_trusted(trusted.clone())
    .with_write_watch(ctx.own_writes.clone())
    .with_max_wait(PRODUCER_MAX_WAIT)
    .with_http(ctx.http.clone());
    let uid = conn.uid().unwrap_or_default();
    let refresher = refresher.with_budget(Arc::new(ctx.spending.budget(
        &uid,
        &ns,
        ctx.gate.clone(),
        ctx.min_call_interval,
    )));
    // A refresh claimed ahead is timed from the due time, when its call goes out.
    let until_due = token_secret.as_ref().map_or(Duration::ZERO, |s| {
        call_delay(
            &TokenRecord::from_secret(s).trusting(&trusted),
            SystemTime::now(),
            ProtocolRole::Producer { ahead },
        )
    });
    let refresher = match token_secret {
        Some(secret) => refresher.with_snapshot(secret),
        None => refresher,
    };
    let started = std::time::Instant::now() + until_due;
    let result = refresher.get().await;
    ctx.metrics.token_calls.inc_by(refresher.xero_calls());
    // What the protocol ended on: the Secret as last read or written (no second read).
    let record = refresher.last_record();
    if let Some(rec) = &record {
        count_refreshes(conn, ctx, rec, started.elapsed());
    }
    let outcome = match result {
        Ok(token) => {
            let now = SystemTime::now();
            // A pair the controller just got from Xero itself: the connection's minimum
            // interval before it refreshes that pair again.
            if refresher.xero_calls() > 0
                && let Some(r) = record
                    .as_ref()
                    .filter(|r| r.refreshed_by.as_deref() == Some(ctx.identity.as_str()))
            {
                ctx.spending.note_refresh(
                    &uid,
                    token.expires_at.duration_since(now).unwrap_or_default(),
                    crate::controller::budget::refreshed_what(r),
                );
            }
            // When the next refresh is due: the expiry, or a consumer's report that Xero
            // refused the token (P70) once it is old enough to count.
            let due = record
                .as_ref()
                .map(|r| {
                    crate::protocol::decide::due_time(r, now, ProtocolRole::Producer { ahead })
                        .unwrap_or(now)
                })
                .or_else(|| token.usable_until.checked_sub(ahead))
                .unwrap_or(now);
            ctx.metrics.set_seconds_until_expiry(
                &ns,
                &conn.name_any(),
                token
                    .expires_at
                    .duration_since(now)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
            // A token that lives less than twice the clock skew is not due for refresh until
            // half its life is left, but stops being usable a whole skew before its expiry:
            // between the two, it is not Ready.
            let state = if now < token.usable_until {
                State::TokenValid
            } else {
                State::TokenExpired(format!(
                    "the stored access token lives less than twice the clock skew; it stopped being usable at {} and its refresh is due at {}",
                    crate::protocol::format::format_time(token.usable_until),
                    crate::protocol::format::format_time(due)
                ))
            };
            TokenOutcome {
                state,
                next: Next::Due(due),
                record,
            }
        }
        Err(e) => {
            let (state, requeue) =
                classify::classify(&e, record.as_ref(), ctx.recheck, SystemTime::now());
            let hint = || {
                crate::controller::conditions::authorize_hint(
                    &ns,
                    &conn.name_any(),
                    &conn.token_secret_name(),
                )
            };
            let state = match state {
                State::WaitingForAuthorization(_) => State::WaitingForAuthorization(hint()),
                State::ReauthorizationRequired(what, _) => {
                    State::ReauthorizationRequired(what, hint())
                }
                other => other,
            };
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
                next: Next::After(requeue),
                record,
            }
        }
    };
    Ok(outcome)
}

/// Counts the rotations that happened since the last reconcile, by who made them.
fn count_refreshes(conn: &XeroConnection, ctx: &Context, rec: &TokenRecord, elapsed: Duration) {
    let Some(last) = ctx.note_rotation(&conn.uid().unwrap_or_default(), rec.rotation) else {
        return;
    };
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
