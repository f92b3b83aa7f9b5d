//! On delete: revoke the refresh token at Xero if asked (at an allowed host only), and let the
//! token Secret go with the connection, or keep it and release it. Only a connection that asks
//! for one of these carries the finalizer `xero-operator.io/cleanup`; any other is deleted at
//! once, operator or not, and owner references take what the controller made for it.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::controller::context::Context;
use crate::controller::inputs::TokenSecretLookup;
use crate::controller::{Error, checks, consumers, inputs, kube_err, ownership};

/// Attempts to release a kept token Secret that keeps changing before the cleanup fails (and is
/// retried with the reconcile's backoff).
const RELEASE_ATTEMPTS: usize = 5;
use crate::crd::{XeroConnection, XeroConnectionSpec};
use crate::protocol::format::{self as f, TokenRecord};
use crate::xero::{ClientCredentials, XeroClient};

/// Whether deleting a connection with this spec needs the controller (and so the finalizer):
/// to revoke at Xero, or to release a token Secret that must outlive it.
pub(crate) fn needs_finalizer(spec: &XeroConnectionSpec) -> bool {
    spec.revoke_on_delete || spec.keep_token_secret_on_delete
}

/// Removes [`crate::controller::FINALIZER`] from `conn` (a spec that no longer needs it, or a connection
/// being deleted that needs nothing done). Conditional on the resourceVersion, so a concurrent
/// change of the finalizers fails with a conflict and is retried, never overwritten.
pub(crate) async fn remove_finalizer(
    api: &kube::Api<XeroConnection>,
    conn: &XeroConnection,
) -> Result<(), Error> {
    let rest: Vec<&String> = conn
        .finalizers()
        .iter()
        .filter(|f| *f != crate::controller::FINALIZER)
        .collect();
    let patch = json!({"metadata": {
        "finalizers": rest,
        "resourceVersion": conn.resource_version(),
    }});
    match api
        .patch(
            &conn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: nothing left to remove.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kube_err("removing the finalizer")(e)),
    }
}

/// On delete: revoke at Xero if asked, and let the token Secret go (owner reference) or stay.
/// A token Secret that is not this connection's is left alone: nothing is read from it, sent,
/// or changed.
pub(crate) async fn run(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.forget(&conn);
    let ns = conn.namespace().unwrap_or_default();
    // The cached object can lag behind: a second trigger queued while this cleanup ran comes
    // back with the connection as it was before the finalizer went. Read it again, so the
    // cleanup (and a revocation at Xero) runs once.
    let conns: Api<XeroConnection> = Api::namespaced(ctx.client.clone(), &ns);
    let current = conns
        .get_opt(&conn.name_any())
        .await
        .map_err(kube_err("reading the connection"))?;
    // What to do is decided on the connection as it is now, not as cached: an option changed
    // just before the delete (revokeOnDelete off, keepTokenSecretOnDelete on) is honoured.
    let Some(conn) = current.filter(|c| {
        c.uid() == conn.uid()
            && c.finalizers()
                .iter()
                .any(|f| f == crate::controller::FINALIZER)
    }) else {
        return Ok(Action::await_change());
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let TokenSecretLookup::Ours(secret) = inputs::find_token_secret(&conn, &secrets).await? else {
        return Ok(Action::await_change());
    };
    if conn.spec.revoke_on_delete {
        // With the app's credentials from the client Secret, not the token Secret's copy.
        match inputs::read_client_secret(&conn, &secrets).await? {
            Ok(app) => revoke(&conn, &ctx, &app, &secret).await,
            Err(state) => {
                tracing::warn!(connection = %conn.name_any(), reason = state.reason(), "not revoking: the client Secret is not usable");
            }
        }
    }
    if conn.spec.keep_token_secret_on_delete {
        release(&conn, &ctx, &secrets, *secret).await?;
    }
    Ok(Action::await_change())
}

/// Releases a token Secret kept on delete: without our owner reference, label and uid mark, no
/// other connection can take it until someone who may write it labels it again. The consumers'
/// grant goes first (their Role and RoleBinding would otherwise outlive the release until the
/// garbage collector takes them with the connection): a consumer that relabels the Secret while
/// it is released must not hand it, and its tokens, to the next connection of that name. The
/// release is pinned to the version read after the grant went, so a write that slipped in before
/// (the API server's RBAC cache lags a moment) fails it with a conflict, and it is judged again.
async fn release(
    conn: &XeroConnection,
    ctx: &Context,
    secrets: &Api<Secret>,
    secret: Secret,
) -> Result<(), Error> {
    consumers::withdraw(conn, ctx).await?;
    // Read again now that nobody else may write it: a write that landed before the grant went
    // is judged too.
    let mut secret = match inputs::find_token_secret(conn, secrets).await? {
        TokenSecretLookup::Ours(current) => *current,
        _ => {
            tracing::info!(connection = %conn.name_any(), secret = ?secret.metadata.name, "the token Secret is no longer this connection's: nothing to release");
            return Ok(());
        }
    };
    let name = conn.token_secret_name();
    for _ in 0..RELEASE_ATTEMPTS {
        let patch = json!({"metadata": {
            "uid": secret.metadata.uid,
            "resourceVersion": secret.metadata.resource_version,
            // The Secret carries no other owner or finalizer (the reconcile removes those).
            "ownerReferences": [],
            "finalizers": [],
            "labels": {f::LABEL_CONNECTION: null},
            "annotations": {ownership::ANN_CONNECTION_UID: null},
        }});
        match secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(connection = %conn.name_any(), secret = %name, "kept and released the token Secret");
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Changed since it was read: judged again as it is now.
                match inputs::find_token_secret(conn, secrets).await? {
                    TokenSecretLookup::Ours(current) => secret = *current,
                    _ => return Ok(()),
                }
            }
            Err(e) => return Err(kube_err("keeping the token Secret")(e)),
        }
    }
    Err(Error::KeptChanging(name))
}

/// Revokes the refresh token of `secret` at Xero (best effort: deletion must not hang on Xero).
async fn revoke(conn: &XeroConnection, ctx: &Context, app: &ClientCredentials, secret: &Secret) {
    let rec = TokenRecord::from_secret(secret);
    let Some(rt) = rec.refresh_token.clone() else {
        return;
    };
    let endpoints = checks::endpoints(conn, &ctx.policy.default_endpoints);
    if let Err(why) = ctx.policy.allowlist.check(&endpoints.revocation_url) {
        tracing::warn!(connection = %conn.name_any(), why, "not revoking: the revocation endpoint is not allowed");
        return;
    }
    let xero = XeroClient::with_http(ctx.http.clone(), endpoints, crate::xero::REQUEST_TIMEOUT);
    match xero.revoke(app, &rt).await {
        Ok(()) => {
            tracing::info!(connection = %conn.name_any(), "revoked the refresh token at Xero")
        }
        Err(e) => {
            tracing::warn!(connection = %conn.name_any(), error = %e, "revoking the refresh token failed")
        }
    }
}
