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

use super::context::Context;
use super::inputs::TokenSecretLookup;
use super::{Error, checks, inputs, kube_err, ownership};
use crate::crd::{XeroConnection, XeroConnectionSpec};
use crate::protocol::format::{self as f, TokenRecord};
use crate::xero::XeroClient;

/// Whether deleting a connection with this spec needs the controller (and so the finalizer):
/// to revoke at Xero, or to release a token Secret that must outlive it.
pub(super) fn needs_finalizer(spec: &XeroConnectionSpec) -> bool {
    spec.revoke_on_delete || spec.keep_token_secret_on_delete
}

/// Removes [`super::FINALIZER`] from `conn` (a spec that no longer needs it, or a connection
/// being deleted that needs nothing done). Conditional on the resourceVersion, so a concurrent
/// change of the finalizers fails with a conflict and is retried, never overwritten.
pub(super) async fn remove_finalizer(
    api: &kube::Api<XeroConnection>,
    conn: &XeroConnection,
) -> Result<(), Error> {
    let rest: Vec<&String> = conn
        .finalizers()
        .iter()
        .filter(|f| *f != super::FINALIZER)
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
pub(super) async fn run(conn: Arc<XeroConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
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
    let Some(conn) = current
        .filter(|c| c.uid() == conn.uid() && c.finalizers().iter().any(|f| f == super::FINALIZER))
    else {
        return Ok(Action::await_change());
    };
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
