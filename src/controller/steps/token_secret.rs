//! The third step: the token Secret's controller-owned fields (labels, the uid mark, the
//! settings annotations and their data copy, the app's `client_id`/`client_secret`, the owner
//! reference), computed by [`crate::controller::resources`], brought in line: patched only when something
//! differs, created only under the name derived from the connection.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};

use crate::controller::conditions::State;
use crate::controller::context::Context;
use crate::controller::{StepResult, checks, consumers, kube_err, resources};
use crate::crd::XeroConnection;
use crate::protocol::format as f;

/// Brings the token Secret `existing` (or its absence) in line with `conn`. `Ok(Err(state))`:
/// a state a person must fix; `Ok(Ok(secret))`: the Secret as now stored.
pub(crate) async fn bring_in_line(
    conn: &XeroConnection,
    ctx: &Context,
    secrets: &Api<Secret>,
    existing: Option<Secret>,
    app: &crate::xero::ClientCredentials,
) -> StepResult<Option<Secret>> {
    let ns = conn.namespace().unwrap_or_default();
    let token_url = checks::endpoints(conn, &ctx.policy.default_endpoints).token_url;
    let owner = (!conn.spec.keep_token_secret_on_delete).then(|| {
        conn.controller_owner_ref(&())
            .expect("a stored object has a name and uid")
    });
    let name = conn.token_secret_name();
    let token_secret = match existing {
        Some(current) => {
            match resources::token_secret_patch(&current, conn, &token_url, app, owner) {
                Some(patch) => Some(
                    ctx.own_writes
                        .write(
                            &ns,
                            &name,
                            secrets.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
                        )
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
            let patch = resources::token_secret_patch(&secret, conn, &token_url, app, owner)
                .expect("an empty Secret always needs the controller's fields");
            let mut body: serde_json::Value = serde_json::to_value(&secret).expect("serializable");
            json_merge(&mut body, patch);
            let secret: Secret =
                serde_json::from_value(body).expect("a merged Secret deserializes");
            match ctx
                .own_writes
                .write(&ns, &name, secrets.create(&PostParams::default(), &secret))
                .await
            {
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
