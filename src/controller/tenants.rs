//! The tenants step: the tenants (`/connections`), fetched when the token changed since the
//! status last listed them, go into the status (sanitised) and into the token Secret's
//! `tenant_id`/`tenant_ids` (pinned to the Secret version the token came from).

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::checks;
use super::context::Context;
use crate::crd::{Tenant, XeroConnection};
use crate::protocol::format::{self as f, TokenRecord};
use crate::text::{MAX_IDENTITY_CHARS, sanitize};
use crate::xero::XeroClient;

/// Fetches the tenants when the token changed since the status last listed them, and publishes
/// them in the token Secret. `None`: keep what the status has.
pub(super) async fn refresh(
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
