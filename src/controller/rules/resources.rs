//! What the controller creates for a connection, built as plain values (pure): the token
//! Secret's controller-owned fields, and the Role/RoleBinding that let the listed ServiceAccounts
//! use and refresh that one Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::{Value, json};

use crate::controller::ownership::ANN_CONNECTION_UID;
use crate::crd::{Grant, RefreshPolicy, XeroConnection};
use crate::protocol::format as f;
use crate::xero::ClientCredentials;

/// `app.kubernetes.io/managed-by` value on everything the controller creates.
pub const MANAGED_BY: &str = "xero-operator";

/// The protocol settings the connection's spec gives: what the settings annotations say, and
/// what the controller itself uses whatever the annotations say meanwhile (a consumer may write
/// them; every reconcile writes them back).
pub fn protocol_settings(conn: &XeroConnection, token_url: &str) -> f::Settings {
    let refresh = &conn.spec.refresh;
    let seconds = |v: u32, range: std::ops::RangeInclusive<u64>| {
        std::time::Duration::from_secs(u64::from(v).clamp(*range.start(), *range.end()))
    };
    f::Settings {
        grant: conn.spec.grant,
        token_url: Some(token_url.to_owned()),
        scopes: conn.spec.scopes.clone(),
        clock_skew: seconds(refresh.clock_skew_seconds, f::CLOCK_SKEW_RANGE),
        lease_duration: seconds(refresh.lease_duration_seconds, f::LEASE_DURATION_RANGE),
    }
}

/// The annotations the controller owns on the token Secret (protocol settings).
pub fn settings_annotations(conn: &XeroConnection, token_url: &str) -> BTreeMap<String, String> {
    let spec = &conn.spec;
    let grant = match spec.grant {
        Grant::RefreshToken => "RefreshToken",
        Grant::ClientCredentials => "ClientCredentials",
    };
    let mut a = BTreeMap::from([
        (f::ANN_GRANT.to_owned(), grant.to_owned()),
        (f::ANN_TOKEN_URL.to_owned(), token_url.to_owned()),
        (
            f::ANN_CLOCK_SKEW.to_owned(),
            spec.refresh.clock_skew_seconds.to_string(),
        ),
        (
            f::ANN_LEASE_DURATION.to_owned(),
            spec.refresh.lease_duration_seconds.to_string(),
        ),
        (
            f::ANN_PROTOCOL_VERSION.to_owned(),
            f::PROTOCOL_VERSION.to_string(),
        ),
    ]);
    if !spec.scopes.is_empty() {
        a.insert(f::ANN_SCOPES.to_owned(), spec.scopes.join(" "));
    }
    a
}

/// The labels on the token Secret: the controller finds its Secrets by them.
pub fn token_secret_labels(conn: &XeroConnection) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            f::LABEL_CONNECTION.to_owned(),
            conn.metadata.name.clone().unwrap_or_default(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
    ])
}

/// How far ahead of expiry the controller refreshes.
pub fn ahead_of_expiry(conn: &XeroConnection) -> std::time::Duration {
    match conn.spec.refresh.policy {
        RefreshPolicy::OnExpiry => std::time::Duration::ZERO,
        RefreshPolicy::AheadOfExpiry => std::time::Duration::from_secs(
            conn.spec
                .refresh
                .ahead_of_expiry_seconds
                .unwrap_or(0)
                .into(),
        ),
    }
}

/// A merge patch bringing the token Secret's controller-owned fields to what the spec says:
/// labels, settings annotations, the connection-uid mark, the app's credentials, the owner
/// references (the connection's alone; none when kept on delete) and no finalizers. Returns `None` when nothing differs, so steady state costs no write
/// (every write would make concurrent claimers retry). The patch carries the Secret's uid, so it
/// fails rather than land on a Secret that was deleted and re-created after it was checked.
pub fn token_secret_patch(
    current: &k8s_openapi::api::core::v1::Secret,
    conn: &XeroConnection,
    token_url: &str,
    app: &ClientCredentials,
    owner: Option<OwnerReference>,
) -> Option<Value> {
    let mut patch = json!({"metadata": {}});
    let mut changed = false;
    let labels = token_secret_labels(conn);
    let have_labels = current.metadata.labels.clone().unwrap_or_default();
    if labels.iter().any(|(k, v)| have_labels.get(k) != Some(v)) {
        patch["metadata"]["labels"] = json!(labels);
        changed = true;
    }
    let mut annotations = settings_annotations(conn, token_url);
    let have = current.metadata.annotations.clone().unwrap_or_default();
    // A newer revision than this operator's (written by a newer operator before a rollback) is
    // left as it is: this operator then only reads (P68) rather than bring the Secret back.
    if have
        .get(f::ANN_PROTOCOL_VERSION)
        .and_then(|v| v.trim().parse::<u32>().ok())
        .is_some_and(|v| v > f::PROTOCOL_VERSION)
    {
        annotations.remove(f::ANN_PROTOCOL_VERSION);
    }
    let mut ann = serde_json::Map::new();
    for (k, v) in &annotations {
        if have.get(k) != Some(v) {
            ann.insert(k.clone(), json!(v));
        }
    }
    if conn.spec.scopes.is_empty() && have.contains_key(f::ANN_SCOPES) {
        ann.insert(f::ANN_SCOPES.to_owned(), Value::Null);
    }
    // A stop or re-authorisation marker for credentials or a refresh token no longer stored
    // (the client Secret was fixed; a token stored by hand) no longer stops anyone: removed, so
    // the admission rule that refuses claims under a marker (P69) refuses only what it should.
    let mut now_stored = f::TokenRecord::from_secret(current);
    now_stored.client = Some(app.clone());
    now_stored.settings.grant = conn.spec.grant;
    if let Some(marked) = have.get(f::ANN_STOPPED_FOR)
        && now_stored.credentials_fingerprint().as_ref() != Some(marked)
    {
        ann.insert(f::ANN_STOPPED_FOR.to_owned(), Value::Null);
        ann.insert(f::ANN_STOP_REASON.to_owned(), Value::Null);
    }
    if let Some(marked) = have.get(f::ANN_REAUTH_FOR)
        && now_stored
            .refresh_token
            .as_ref()
            .map(crate::redact::Sensitive::fingerprint)
            .as_ref()
            != Some(marked)
    {
        ann.insert(f::ANN_REAUTH_FOR.to_owned(), Value::Null);
        ann.insert(f::ANN_REAUTH_REASON.to_owned(), Value::Null);
    }
    let uid = conn.metadata.uid.clone().unwrap_or_default();
    if have.get(ANN_CONNECTION_UID) != Some(&uid) {
        ann.insert(ANN_CONNECTION_UID.to_owned(), json!(uid));
    }
    if !ann.is_empty() {
        patch["metadata"]["annotations"] = Value::Object(ann);
        changed = true;
    }
    let data = current.data.clone().unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let mut new_data = serde_json::Map::new();
    if text(f::CLIENT_ID).as_deref() != Some(app.client_id.as_str()) {
        new_data.insert(f::CLIENT_ID.into(), b64(&app.client_id));
    }
    if text(f::CLIENT_SECRET).as_deref() != Some(app.client_secret.expose()) {
        new_data.insert(f::CLIENT_SECRET.into(), b64(app.client_secret.expose()));
    }
    // For readers of the mounted Secret, which see no annotations.
    let skew = conn.spec.refresh.clock_skew_seconds.to_string();
    if text(f::CLOCK_SKEW_SECONDS).as_deref() != Some(skew.as_str()) {
        new_data.insert(f::CLOCK_SKEW_SECONDS.into(), b64(&skew));
    }
    if !new_data.is_empty() {
        patch["data"] = Value::Object(new_data);
        changed = true;
    }
    // The owner references are the connection's alone (none when the Secret is kept on
    // delete), and there are no finalizers: a consumer that adds an owner (a dangling one makes
    // the garbage collector delete the Secret) or a finalizer (the Secret could never go) is
    // undone here, and refused by the chart's admission policy before it lands.
    let owners = current
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    let wanted: Vec<OwnerReference> = owner.into_iter().collect();
    if owners != wanted {
        patch["metadata"]["ownerReferences"] = json!(wanted);
        changed = true;
    }
    if current
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| !f.is_empty())
    {
        patch["metadata"]["finalizers"] = json!([]);
        changed = true;
    }
    // Pinned to the version that was judged: a Secret replaced or changed since (a consumer's
    // owner-reference edit, say) fails the write with a conflict instead of being overwritten.
    if changed && let Some(current_uid) = &current.metadata.uid {
        patch["metadata"]["uid"] = json!(current_uid);
    }
    if changed && let Some(rv) = &current.metadata.resource_version {
        patch["metadata"]["resourceVersion"] = json!(rv);
    }
    changed.then_some(patch)
}

fn b64(s: &str) -> Value {
    use base64::Engine;
    Value::String(base64::engine::general_purpose::STANDARD.encode(s))
}

/// The name of the consumers' Role and RoleBinding.
pub fn consumer_role_name(conn: &XeroConnection) -> String {
    format!(
        "{}-xero-token-consumer",
        conn.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Metadata shared by the consumers' Role and RoleBinding: named after the connection, labelled
/// like its token Secret, owned by it.
fn consumer_rbac_meta(conn: &XeroConnection, owner: OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(consumer_role_name(conn)),
        namespace: conn.metadata.namespace.clone(),
        labels: Some(token_secret_labels(conn)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    }
}

/// The Role letting consumers read, watch and refresh exactly the token Secret.
pub fn consumer_role(conn: &XeroConnection, owner: OwnerReference) -> Role {
    Role {
        metadata: consumer_rbac_meta(conn, owner),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_owned()]),
            resource_names: Some(vec![conn.token_secret_name()]),
            // get to read, watch (by metadata.name) to wait, patch (a merge patch) to claim,
            // store and release: the refresh protocol (docs/protocol.md) needs no more.
            verbs: ["get", "watch", "patch"].map(str::to_owned).to_vec(),
            ..PolicyRule::default()
        }]),
    }
}

/// The RoleBinding of the listed ServiceAccounts to [`consumer_role`].
pub fn consumer_role_binding(conn: &XeroConnection, owner: OwnerReference) -> RoleBinding {
    let ns = conn.metadata.namespace.clone().unwrap_or_default();
    RoleBinding {
        metadata: consumer_rbac_meta(conn, owner),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: consumer_role_name(conn),
        },
        subjects: Some(
            conn.spec
                .consumers
                .iter()
                .map(|c| Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: c.service_account.clone(),
                    namespace: Some(c.namespace.clone().unwrap_or_else(|| ns.clone())),
                    ..Subject::default()
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::rules::fixtures::conn;
    use crate::redact::Sensitive;
    use k8s_openapi::api::core::v1::Secret;

    fn app() -> ClientCredentials {
        ClientCredentials {
            client_id: "id".into(),
            client_secret: Sensitive::new("s"),
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "xero-operator.io/v1alpha1".into(),
            kind: "XeroConnection".into(),
            name: "acme".into(),
            uid: "u1".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }
    }

    /// A token Secret the controller has nothing to change on (for `acme`, app `id`/`s`).
    fn steady_secret(c: &XeroConnection) -> Secret {
        let mut s = Secret::default();
        s.metadata.labels = Some(token_secret_labels(c));
        let mut annotations = settings_annotations(c, "http://x/token");
        annotations.insert(ANN_CONNECTION_UID.to_owned(), "u1".to_owned());
        s.metadata.annotations = Some(annotations);
        s.metadata.owner_references = Some(vec![owner()]);
        s.data = Some(BTreeMap::from([
            (f::CLIENT_ID.into(), k8s_openapi::ByteString(b"id".to_vec())),
            (
                f::CLIENT_SECRET.into(),
                k8s_openapi::ByteString(b"s".to_vec()),
            ),
            (
                f::CLOCK_SKEW_SECONDS.into(),
                k8s_openapi::ByteString(b"5".to_vec()),
            ),
        ]));
        s
    }

    #[test]
    fn a_bare_secret_gets_everything_and_a_complete_one_nothing() {
        let c = conn(json!({"clientSecretRef": {"name": "app"}}));
        let patch = token_secret_patch(
            &Secret::default(),
            &c,
            "http://x/token",
            &app(),
            Some(owner()),
        )
        .expect("needs a patch");
        assert_eq!(patch["metadata"]["labels"][f::LABEL_CONNECTION], "acme");
        assert_eq!(patch["metadata"]["annotations"][f::ANN_CLOCK_SKEW], "5");
        // The skew in the data too, for readers of the mounted Secret ("5" in base64).
        assert_eq!(patch["data"][f::CLOCK_SKEW_SECONDS], "NQ==");
        assert_eq!(patch["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(patch["metadata"]["annotations"][ANN_CONNECTION_UID], "u1");
        assert!(
            patch["metadata"].get("uid").is_none(),
            "a new Secret has no uid yet"
        );
        // Apply it by hand and ask again: nothing left to do.
        let mut s = steady_secret(&c);
        s.metadata.uid = Some("secret-uid".into());
        s.metadata.resource_version = Some("7".into());
        assert_eq!(
            token_secret_patch(&s, &c, "http://x/token", &app(), Some(owner())),
            None
        );
        // Keeping the Secret on delete drops our owner reference, pinned to this Secret's uid.
        let p = token_secret_patch(&s, &c, "http://x/token", &app(), None).expect("patch");
        assert_eq!(p["metadata"]["ownerReferences"], json!([]));
        assert_eq!(p["metadata"]["uid"], "secret-uid");
        assert_eq!(p["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn owner_references_and_finalizers_a_consumer_added_are_removed() {
        let c = conn(json!({"clientSecretRef": {"name": "app"}}));
        let mut s = steady_secret(&c);
        // A dangling owner beside ours (the garbage collector would delete the Secret once ours
        // goes), and ours replaced by it.
        let mut dangling = owner();
        dangling.uid = "gone".into();
        dangling.controller = Some(false);
        for owners in [vec![dangling.clone(), owner()], vec![dangling.clone()]] {
            s.metadata.owner_references = Some(owners);
            let p =
                token_secret_patch(&s, &c, "http://x/token", &app(), Some(owner())).expect("patch");
            assert_eq!(p["metadata"]["ownerReferences"], json!([owner()]));
        }
        // Kept on delete: no owner at all.
        s.metadata.owner_references = Some(vec![dangling]);
        let p = token_secret_patch(&s, &c, "http://x/token", &app(), None).expect("patch");
        assert_eq!(p["metadata"]["ownerReferences"], json!([]));
        // A finalizer that would keep the Secret from ever going.
        s.metadata.owner_references = None;
        s.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        let p = token_secret_patch(&s, &c, "http://x/token", &app(), None).expect("patch");
        assert_eq!(p["metadata"]["finalizers"], json!([]));
        assert!(p["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn markers_for_what_is_no_longer_stored_are_removed_and_current_ones_kept() {
        let c = conn(json!({"clientSecretRef": {"name": "app"}}));
        let mut s = steady_secret(&c);
        let mut annotations = s.metadata.annotations.clone().expect("annotations");
        assert_eq!(
            annotations[f::ANN_PROTOCOL_VERSION],
            f::PROTOCOL_VERSION.to_string()
        );
        s.data.as_mut().expect("data").insert(
            f::REFRESH_TOKEN.into(),
            k8s_openapi::ByteString(b"rt".to_vec()),
        );
        let mut current = f::TokenRecord::from_secret(&s);
        current.client = Some(app());
        let stopped_for = current.credentials_fingerprint().expect("credentials");
        let reauth_for = Sensitive::new("rt").fingerprint();
        // Markers for what is stored: kept (no patch at all).
        annotations.insert(f::ANN_STOPPED_FOR.to_owned(), stopped_for);
        annotations.insert(f::ANN_STOP_REASON.to_owned(), "invalid_client".to_owned());
        annotations.insert(f::ANN_REAUTH_FOR.to_owned(), reauth_for);
        s.metadata.annotations = Some(annotations.clone());
        assert_eq!(
            token_secret_patch(&s, &c, "http://x/token", &app(), Some(owner())),
            None
        );
        // The client Secret fixed: the stop marker goes with the old secret, the
        // re-authorisation marker (the same refresh token) stays.
        let fixed = ClientCredentials {
            client_id: "id".into(),
            client_secret: Sensitive::new("s2"),
        };
        let p = token_secret_patch(&s, &c, "http://x/token", &fixed, Some(owner())).expect("patch");
        assert_eq!(
            p["metadata"]["annotations"][f::ANN_STOPPED_FOR],
            Value::Null
        );
        assert_eq!(
            p["metadata"]["annotations"][f::ANN_STOP_REASON],
            Value::Null
        );
        assert!(
            p["metadata"]["annotations"]
                .get(f::ANN_REAUTH_FOR)
                .is_none()
        );
        // A newer revision (a rolled-back operator) is never brought back down.
        let mut newer = s.clone();
        newer
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(f::ANN_PROTOCOL_VERSION.to_owned(), "99".to_owned());
        assert_eq!(
            token_secret_patch(&newer, &c, "http://x/token", &app(), Some(owner())),
            None
        );
        // A refresh token stored by hand: the re-authorisation marker for the old one goes.
        annotations.insert(
            f::ANN_REAUTH_FOR.to_owned(),
            Sensitive::new("old").fingerprint(),
        );
        annotations.remove(f::ANN_STOPPED_FOR);
        annotations.remove(f::ANN_STOP_REASON);
        s.metadata.annotations = Some(annotations);
        let p = token_secret_patch(&s, &c, "http://x/token", &app(), Some(owner())).expect("patch");
        assert_eq!(p["metadata"]["annotations"][f::ANN_REAUTH_FOR], Value::Null);
    }

    #[test]
    fn the_consumer_role_covers_exactly_the_token_secret() {
        let c = conn(json!({"clientSecretRef": {"name": "app"}, "consumers": [
            {"serviceAccount": "worker"}, {"serviceAccount": "other", "namespace": "elsewhere"}]}));
        let role = consumer_role(&c, owner());
        let rule = &role.rules.expect("rules")[0];
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["acme-xero-token".to_owned()][..])
        );
        assert_eq!(rule.verbs, ["get", "watch", "patch"]);
        let binding = consumer_role_binding(&c, owner());
        let subjects = binding.subjects.expect("subjects");
        assert_eq!(subjects[0].namespace.as_deref(), Some("ns"));
        assert_eq!(subjects[1].namespace.as_deref(), Some("elsewhere"));
    }

    #[test]
    fn ahead_of_expiry_follows_the_policy() {
        let on = conn(json!({"clientSecretRef": {"name": "app"}}));
        assert_eq!(ahead_of_expiry(&on), std::time::Duration::ZERO);
        let ahead = conn(
            json!({"clientSecretRef": {"name": "app"}, "refresh": {"policy": "AheadOfExpiry", "aheadOfExpirySeconds": 90}}),
        );
        assert_eq!(ahead_of_expiry(&ahead), std::time::Duration::from_secs(90));
    }
}
