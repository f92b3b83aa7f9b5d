//! The fourth step of a reconcile: the consumers' Role and RoleBinding, which let the listed
//! ServiceAccounts read, watch and refresh exactly the token Secret.
//!
//! The controller touches only the Role and RoleBinding it created for this connection (a
//! controller owner reference to it): a Role or RoleBinding of the same name made by anyone
//! else is a `ConsumerRbacConflict`, never overwritten or deleted. Every write is pinned to the
//! object that was checked (its uid), so an object replaced in between is not written either.
//! What was brought in line is remembered per connection generation: a steady-state reconcile
//! makes no RBAC call at all.

use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::controller::conditions::State;
use crate::controller::ownership::is_controlled_by;
use crate::controller::resources::{consumer_role, consumer_role_binding, consumer_role_name};
use crate::controller::{Context, Error, MANAGER, StepResult, kube_err};
use crate::crd::XeroConnection;

/// The consumers' Role and RoleBinding of a connection as they are now.
struct Current {
    roles: Api<Role>,
    bindings: Api<RoleBinding>,
    name: String,
    role: Option<Role>,
    binding: Option<RoleBinding>,
}

async fn current(conn: &XeroConnection, ctx: &Context) -> Result<Current, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), &ns);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &ns);
    let name = consumer_role_name(conn);
    let role = roles
        .get_opt(&name)
        .await
        .map_err(kube_err("reading the consumer Role"))?;
    let binding = bindings
        .get_opt(&name)
        .await
        .map_err(kube_err("reading the consumer RoleBinding"))?;
    Ok(Current {
        roles,
        bindings,
        name,
        role,
        binding,
    })
}

/// Deletes the consumers' RoleBinding and Role of `conn` if (and only if) the controller made
/// them: no grant outlives a refusal of the connection's token Secret or consumer list.
pub async fn withdraw(conn: &XeroConnection, ctx: &Context) -> Result<(), Error> {
    let uid = conn.uid().unwrap_or_default();
    ctx.forget_rbac(&uid);
    let c = current(conn, ctx).await?;
    let ours = |meta: Option<&kube::core::ObjectMeta>| {
        meta.filter(|m| is_controlled_by(m, &uid))
            .and_then(|m| m.uid.clone())
    };
    let binding_uid = ours(c.binding.as_ref().map(|b| &b.metadata));
    let role_uid = ours(c.role.as_ref().map(|r| &r.metadata));
    delete_pinned(
        &c.bindings,
        &c.name,
        binding_uid,
        "removing the consumer RoleBinding",
    )
    .await?;
    delete_pinned(&c.roles, &c.name, role_uid, "removing the consumer Role").await
}

/// Brings the consumers' Role and RoleBinding in line with the spec: `Ok(Err(state))` when a
/// Role or RoleBinding of that name is not this connection's.
pub async fn sync(conn: &XeroConnection, ctx: &Context) -> StepResult<()> {
    let uid = conn.uid().unwrap_or_default();
    let generation = conn.metadata.generation.unwrap_or_default();
    if ctx.rbac_synced_at(&uid) == Some(generation) {
        return Ok(Ok(()));
    }
    let Current {
        roles,
        bindings,
        name,
        role,
        binding,
    } = current(conn, ctx).await?;
    for (kind, meta) in [
        ("Role", role.as_ref().map(|r| &r.metadata)),
        ("RoleBinding", binding.as_ref().map(|b| &b.metadata)),
    ] {
        if let Some(meta) = meta
            && !is_controlled_by(meta, &uid)
        {
            return Ok(Err(State::ConsumerRbacConflict(format!(
                "{kind} {name:?} exists and is not this connection's: the controller neither \
                 changes nor deletes it; remove or rename that {kind}, or give the connection \
                 another name"
            ))));
        }
    }
    let existing_uid = |meta: Option<&kube::core::ObjectMeta>| meta.and_then(|m| m.uid.clone());
    let role_uid = existing_uid(role.as_ref().map(|r| &r.metadata));
    let binding_uid = existing_uid(binding.as_ref().map(|b| &b.metadata));
    if conn.spec.consumers.is_empty() {
        // The binding first: a Role without a binding grants nothing.
        delete_pinned(
            &bindings,
            &name,
            binding_uid,
            "removing the consumer RoleBinding",
        )
        .await?;
        delete_pinned(&roles, &name, role_uid, "removing the consumer Role").await?;
    } else {
        let owner = conn
            .controller_owner_ref(&())
            .expect("a stored object has a name and uid");
        let written = async {
            write_pinned(
                &roles,
                consumer_role(conn, owner.clone()),
                role_uid,
                "writing the consumer Role",
            )
            .await?;
            write_pinned(
                &bindings,
                consumer_role_binding(conn, owner),
                binding_uid,
                "writing the consumer RoleBinding",
            )
            .await
        };
        match written.await {
            Ok(()) => {}
            // The chart's admission policy (or another) refused the grant: a state a person
            // sees, with the policy's reason, not a retried error.
            Err(Error::Kube {
                source: kube::Error::Api(s),
                action,
            }) if s.code == 403 => {
                return Ok(Err(State::ConsumerNotAllowed(format!(
                    "the API server refused {action}: {}",
                    s.message
                ))));
            }
            Err(e) => return Err(e),
        }
    }
    ctx.mark_rbac_synced(&uid, generation);
    Ok(Ok(()))
}

/// Deletes `name` only if it is still the object of `uid` that was checked.
async fn delete_pinned<K>(
    api: &Api<K>,
    name: &str,
    uid: Option<String>,
    action: &'static str,
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(uid) = uid else { return Ok(()) };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(kube_err(action)(e)),
    }
}

/// Creates `object`, or (when it exists as `uid`) applies it with that uid, so a write never
/// lands on an object that was replaced after the ownership check.
async fn write_pinned<K>(
    api: &Api<K>,
    mut object: K,
    uid: Option<String>,
    action: &'static str,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.name_any();
    match uid {
        None => api
            .create(
                &PostParams {
                    field_manager: Some(MANAGER.to_owned()),
                    ..PostParams::default()
                },
                &object,
            )
            .await
            .map(drop)
            .map_err(kube_err(action)),
        Some(uid) => {
            object.meta_mut().uid = Some(uid);
            let mut body = serde_json::to_value(&object).expect("serializable");
            body["apiVersion"] = json!(K::api_version(&()));
            body["kind"] = json!(K::kind(&()));
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(drop)
            .map_err(kube_err(action))
        }
    }
}
