//! Which objects the controller may act on for a connection (`docs/security.md`). Pure.
//!
//! The controller holds Secret and RBAC rights across the cluster; a connection's author may
//! hold far less. So it uses its rights only on objects that are provably its own, or that were
//! opted in by someone who could already write them:
//! - a **token Secret** it created (owner reference or [`ANN_CONNECTION_UID`] naming this
//!   connection), or one labelled `xero-operator.io/connection: <this connection>` and owned by
//!   no other controller; never a Secret of a built-in type other than `Opaque`;
//! - a **client-credentials Secret** labelled [`LABEL_CLIENT_CREDENTIALS`]` = "true"`;
//! - a **consumer Role/RoleBinding** it created (controller owner reference to this connection).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::protocol::format::LABEL_CONNECTION;
use crate::text::{MAX_IDENTITY_CHARS, sanitize};

/// Label that opts a Secret in as a client-credentials Secret: every connection in its
/// namespace may use the credentials, and those connections' consumers can read them.
pub const LABEL_CLIENT_CREDENTIALS: &str = "xero-operator.io/client-credentials";
/// Annotation on an opted-in client Secret listing further keys (comma-separated) that
/// connections may name as `clientIdKey`/`clientSecretKey`; `client_id` and `client_secret` are
/// always allowed. Keys not listed are never read, so opting a Secret in does not expose the
/// rest of its data.
pub const ANN_CLIENT_CREDENTIAL_KEYS: &str = "xero-operator.io/client-credential-keys";
/// Keys of an opted-in client Secret that any connection may read.
pub const DEFAULT_CLIENT_CREDENTIAL_KEYS: [&str; 2] = ["client_id", "client_secret"];

/// Annotation on a token Secret naming the uid of the connection it belongs to. Set by the
/// controller on the Secrets it creates or adopts; it marks them as its own even without an owner
/// reference (`keepTokenSecretOnDelete`), and keeps every other connection off them.
pub const ANN_CONNECTION_UID: &str = "xero-operator.io/connection-uid";

/// Secret types that may hold a token pair: Opaque (an unset type is Opaque).
const TOKEN_SECRET_TYPES: [&str; 2] = ["", "Opaque"];

/// May the controller use this Secret as a connection's token Secret?
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSecretVerdict {
    /// Created or adopted by this connection, or opted in for it.
    Ours,
    /// Not the operator's and not opted in (or of a type that never holds tokens).
    NotOwned(String),
    /// Belongs to another connection or another controller.
    InUse(String),
}

/// Judges the Secret `secret_name` (its metadata and, when known, its `type`) for the connection
/// `conn_name`/`conn_uid`. The type is checked whenever it is given; a caller that judged
/// metadata alone judges again once it has read the whole Secret.
pub fn token_secret_verdict(
    meta: &ObjectMeta,
    secret_type: Option<&str>,
    conn: &ObjectMeta,
) -> TokenSecretVerdict {
    let conn_name = conn.name.as_deref().unwrap_or_default();
    let conn_uid = conn.uid.as_deref().unwrap_or_default();
    let secret = meta.name.as_deref().unwrap_or_default();
    if let Some(t) = secret_type
        && !TOKEN_SECRET_TYPES.contains(&t)
    {
        return TokenSecretVerdict::NotOwned(format!(
            "Secret {secret:?} is of type {:?}: only Opaque Secrets hold tokens; name another \
             tokenSecretName (the connection cannot be changed: create a new one)",
            shown(t)
        ));
    }
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    if let Some(other) = owners
        .iter()
        .find(|o| o.controller == Some(true) && o.uid != conn_uid)
    {
        return TokenSecretVerdict::InUse(format!(
            "Secret {secret:?} is controlled by {} {:?}: a token Secret serves one connection",
            shown(&other.kind),
            shown(&other.name)
        ));
    }
    if owners.iter().any(|o| o.uid == conn_uid) {
        return TokenSecretVerdict::Ours;
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    match annotations.get(ANN_CONNECTION_UID) {
        Some(uid) if uid == conn_uid => return TokenSecretVerdict::Ours,
        Some(uid) => {
            return TokenSecretVerdict::InUse(format!(
                "Secret {secret:?} belongs to another XeroConnection (uid {}); if that connection \
                 is gone, someone who may write the Secret hands it over by removing the \
                 annotation {ANN_CONNECTION_UID} and labelling it {LABEL_CONNECTION}={conn_name}",
                shown(uid)
            ));
        }
        None => {}
    }
    let labels = meta.labels.clone().unwrap_or_default();
    match labels.get(LABEL_CONNECTION) {
        // Versions before the uid mark left the label on a Secret kept on delete: one the
        // operator made, older than this connection, belongs to an earlier connection of the
        // same name and is not handed on without a person's say.
        Some(label)
            if label == conn_name
                && labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
                && is_older(meta, conn) =>
        {
            TokenSecretVerdict::InUse(format!(
                "Secret {secret:?} was made by the operator for an earlier XeroConnection of \
                 this name and kept when it was deleted; someone who may write it hands it over \
                 by removing its label {MANAGED_BY_LABEL}"
            ))
        }
        Some(label) if label == conn_name => TokenSecretVerdict::Ours,
        Some(label) => TokenSecretVerdict::InUse(format!(
            "Secret {secret:?} is labelled for XeroConnection {:?}: a token Secret serves one \
             connection",
            shown(label)
        )),
        None => TokenSecretVerdict::NotOwned(format!(
            "Secret {secret:?} exists and is not this operator's; to let this connection use it, \
             someone who may write it labels it: kubectl label secret {secret} \
             {LABEL_CONNECTION}={conn_name}"
        )),
    }
}

/// The label the controller sets on what it creates, and its value.
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
use crate::controller::resources::MANAGED_BY;

/// Whether `secret` was created in an earlier second than `conn`.
fn is_older(secret: &ObjectMeta, conn: &ObjectMeta) -> bool {
    match (&secret.creation_timestamp, &conn.creation_timestamp) {
        (Some(s), Some(c)) => s.0 < c.0,
        _ => false,
    }
}

/// Whether `meta` names `conn_uid` as its controlling owner (the consumer Role/RoleBinding the
/// controller created for that connection).
pub fn is_controlled_by(meta: &ObjectMeta, conn_uid: &str) -> bool {
    meta.owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == conn_uid)
}

/// Whether a client Secret's labels opt it in.
pub fn is_client_secret_opted_in(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CLIENT_CREDENTIALS))
        .is_some_and(|v| v == "true")
}

/// Whether an opted-in client Secret lets connections read `key`.
pub fn is_client_key_opted_in(meta: &ObjectMeta, key: &str) -> bool {
    DEFAULT_CLIENT_CREDENTIAL_KEYS.contains(&key)
        || meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_CLIENT_CREDENTIAL_KEYS))
            .is_some_and(|list| list.split(',').any(|k| k.trim() == key))
}

fn shown(text: &str) -> String {
    sanitize(text, MAX_IDENTITY_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    fn meta(
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        owners: Vec<OwnerReference>,
    ) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        ObjectMeta {
            name: Some("tok".into()),
            labels: map(labels),
            annotations: map(annotations),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        }
    }

    fn owner(kind: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: "o".into(),
            uid: uid.into(),
            controller: Some(controller),
            ..OwnerReference::default()
        }
    }

    fn verdict(m: &ObjectMeta, t: Option<&str>) -> TokenSecretVerdict {
        token_secret_verdict(m, t, &conn_meta(1000))
    }

    fn conn_meta(created: i64) -> ObjectMeta {
        ObjectMeta {
            name: Some("acme".into()),
            uid: Some("u1".into()),
            creation_timestamp: Some(time(created)),
            ..ObjectMeta::default()
        }
    }

    fn time(secs: i64) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"),
        )
    }

    #[test]
    fn secrets_the_controller_made_are_ours() {
        let owned = meta(
            &[(LABEL_CONNECTION, "acme")],
            &[],
            vec![owner("XeroConnection", "u1", true)],
        );
        assert_eq!(verdict(&owned, Some("Opaque")), TokenSecretVerdict::Ours);
        // keepTokenSecretOnDelete: no owner reference, the uid annotation says whose it is.
        let kept = meta(&[], &[(ANN_CONNECTION_UID, "u1")], vec![]);
        assert_eq!(verdict(&kept, None), TokenSecretVerdict::Ours);
    }

    #[test]
    fn a_label_opts_a_secret_in_and_upgrades_keep_working() {
        // Made by a person (or by this controller before the uid annotation existed).
        let labelled = meta(&[(LABEL_CONNECTION, "acme")], &[], vec![]);
        assert_eq!(verdict(&labelled, Some("")), TokenSecretVerdict::Ours);
        // Owned by something that is not a controller (a Helm release, say) is still fine.
        let helm = meta(
            &[(LABEL_CONNECTION, "acme")],
            &[],
            vec![owner("ConfigMap", "x", false)],
        );
        assert_eq!(verdict(&helm, Some("Opaque")), TokenSecretVerdict::Ours);
    }

    #[test]
    fn someone_elses_secret_is_never_ours() {
        let plain = meta(&[], &[], vec![]);
        assert!(
            matches!(verdict(&plain, Some("Opaque")), TokenSecretVerdict::NotOwned(m) if m.contains("kubectl label secret tok xero-operator.io/connection=acme"))
        );
        for t in [
            "kubernetes.io/service-account-token",
            "kubernetes.io/tls",
            "kubernetes.io/dockerconfigjson",
            "bootstrap.kubernetes.io/token",
        ] {
            let labelled = meta(&[(LABEL_CONNECTION, "acme")], &[], vec![]);
            assert!(
                matches!(verdict(&labelled, Some(t)), TokenSecretVerdict::NotOwned(m) if m.contains("only Opaque")),
                "{t} must never be used"
            );
        }
    }

    #[test]
    fn a_secret_an_earlier_version_kept_is_not_handed_to_a_newcomer() {
        let mut kept = meta(
            &[(LABEL_CONNECTION, "acme"), (MANAGED_BY_LABEL, MANAGED_BY)],
            &[],
            vec![],
        );
        // Made before this connection existed: an earlier `acme`'s, kept on its deletion.
        kept.creation_timestamp = Some(time(500));
        assert!(matches!(
            verdict(&kept, Some("Opaque")),
            TokenSecretVerdict::InUse(m) if m.contains(MANAGED_BY_LABEL)
        ));
        // Made after it (the controller made it for this very connection): still ours.
        kept.creation_timestamp = Some(time(1000));
        assert_eq!(verdict(&kept, Some("Opaque")), TokenSecretVerdict::Ours);
        // A person's opt-in carries no managed-by label: ours whatever its age.
        let mut person = meta(&[(LABEL_CONNECTION, "acme")], &[], vec![]);
        person.creation_timestamp = Some(time(1));
        assert_eq!(verdict(&person, Some("Opaque")), TokenSecretVerdict::Ours);
    }

    #[test]
    fn another_connection_or_controller_keeps_its_secret() {
        let other_conn = meta(
            &[(LABEL_CONNECTION, "payroll")],
            &[],
            vec![owner("XeroConnection", "u2", true)],
        );
        assert!(matches!(
            verdict(&other_conn, Some("Opaque")),
            TokenSecretVerdict::InUse(_)
        ));
        // Kept on delete by its connection: label and uid annotation, no owner.
        let kept = meta(
            &[(LABEL_CONNECTION, "acme")],
            &[(ANN_CONNECTION_UID, "u2")],
            vec![],
        );
        assert!(
            matches!(verdict(&kept, Some("Opaque")), TokenSecretVerdict::InUse(m) if m.contains("uid u2"))
        );
        // Labelled for us, but another controller (External Secrets, say) owns it.
        let external = meta(
            &[(LABEL_CONNECTION, "acme")],
            &[],
            vec![owner("ExternalSecret", "e1", true)],
        );
        assert!(
            matches!(verdict(&external, Some("Opaque")), TokenSecretVerdict::InUse(m) if m.contains("ExternalSecret"))
        );
        let labelled_other = meta(&[(LABEL_CONNECTION, "payroll")], &[], vec![]);
        assert!(matches!(
            verdict(&labelled_other, None),
            TokenSecretVerdict::InUse(_)
        ));
    }

    #[test]
    fn messages_cannot_carry_escape_sequences() {
        let evil = meta(
            &[(LABEL_CONNECTION, "\u{1b}[2Jx\ny")],
            &[],
            vec![owner("Evil\u{1b}[31m", "e", true)],
        );
        let TokenSecretVerdict::InUse(m) = verdict(&evil, None) else {
            panic!("in use")
        };
        assert!(!m.chars().any(char::is_control), "{m:?}");
    }

    #[test]
    fn rbac_is_ours_only_with_our_controller_reference() {
        assert!(is_controlled_by(
            &meta(&[], &[], vec![owner("XeroConnection", "u1", true)]),
            "u1"
        ));
        assert!(!is_controlled_by(
            &meta(&[], &[], vec![owner("XeroConnection", "u1", false)]),
            "u1"
        ));
        assert!(!is_controlled_by(
            &meta(&[], &[], vec![owner("XeroConnection", "u2", true)]),
            "u1"
        ));
        assert!(!is_controlled_by(&meta(&[], &[], vec![]), "u1"));
    }

    #[test]
    fn only_the_credential_keys_of_a_client_secret_may_be_read() {
        let plain = meta(&[(LABEL_CLIENT_CREDENTIALS, "true")], &[], vec![]);
        assert!(is_client_key_opted_in(&plain, "client_id"));
        assert!(is_client_key_opted_in(&plain, "client_secret"));
        assert!(!is_client_key_opted_in(&plain, "db_password"));
        let listed = meta(
            &[(LABEL_CLIENT_CREDENTIALS, "true")],
            &[(ANN_CLIENT_CREDENTIAL_KEYS, "id, secret")],
            vec![],
        );
        assert!(is_client_key_opted_in(&listed, "secret"));
        assert!(!is_client_key_opted_in(&listed, "db_password"));
    }

    #[test]
    fn client_secrets_need_the_label_set_to_true() {
        assert!(is_client_secret_opted_in(&meta(
            &[(LABEL_CLIENT_CREDENTIALS, "true")],
            &[],
            vec![]
        )));
        assert!(!is_client_secret_opted_in(&meta(
            &[(LABEL_CLIENT_CREDENTIALS, "false")],
            &[],
            vec![]
        )));
        assert!(!is_client_secret_opted_in(&meta(&[], &[], vec![])));
    }
}
