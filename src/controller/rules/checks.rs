//! The first step of a reconcile: checks of a spec that the schema cannot make, before the
//! controller reads or writes anything for it. Pure.
//!
//! Besides specs that cannot work (the token Secret is the client Secret), these are the
//! operator-wide limits of `docs/security.md`: every endpoint a connection would call must be in
//! the operator's endpoint allowlist, and consumers must live in the connection's namespace
//! unless the operator allows more.

use crate::allowlist::EndpointAllowlist;
use crate::crd::XeroConnection;
use crate::xero::Endpoints;

use crate::controller::conditions::State;

/// The operator-wide limits a spec is checked against (from the controller's flags). The
/// default: Xero's hosts and endpoints, consumers of the connection's namespace only.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Hosts the controller may send credentials to.
    pub allowlist: EndpointAllowlist,
    /// Whether consumers may be ServiceAccounts of other namespaces.
    pub allow_cross_namespace_consumers: bool,
    /// Endpoints of connections that name none (Xero's).
    pub default_endpoints: Endpoints,
}

/// The endpoints `conn` uses: its overrides, else the defaults.
pub fn endpoints(conn: &XeroConnection, defaults: &Endpoints) -> Endpoints {
    let mut e = defaults.clone();
    if let Some(o) = &conn.spec.endpoints {
        if let Some(u) = &o.token_url {
            e.token_url = u.clone();
        }
        if let Some(u) = &o.connections_url {
            e.connections_url = u.clone();
        }
        if let Some(u) = &o.revocation_url {
            e.revocation_url = u.clone();
        }
    }
    e
}

/// `Err(state)` when `conn` cannot or may not be served; nothing is read or sent for it then.
pub fn validate(conn: &XeroConnection, policy: &Policy) -> Result<(), State> {
    let r = &conn.spec.client_secret_ref;
    if conn.token_secret_name() == r.name {
        return Err(State::InvalidSpec(format!(
            "the token Secret and the client Secret are both {:?}: they must differ",
            r.name
        )));
    }
    if r.client_id_key == r.client_secret_key {
        return Err(State::InvalidSpec(
            "clientIdKey and clientSecretKey name the same key".to_owned(),
        ));
    }
    let own_ns = conn.metadata.namespace.as_deref().unwrap_or_default();
    if !policy.allow_cross_namespace_consumers
        && let Some(c) = conn
            .spec
            .consumers
            .iter()
            .find(|c| c.namespace.as_deref().is_some_and(|ns| ns != own_ns))
    {
        return Err(State::ConsumerNotAllowed(format!(
            "consumer {}/{} is outside the connection's namespace {own_ns:?}; this operator \
             allows consumers of the connection's own namespace only \
             (--allow-cross-namespace-consumers, chart value allowCrossNamespaceConsumers)",
            c.namespace.as_deref().unwrap_or_default(),
            c.service_account
        )));
    }
    let e = endpoints(conn, &policy.default_endpoints);
    let mut called = vec![
        ("tokenUrl", &e.token_url),
        ("connectionsUrl", &e.connections_url),
    ];
    if conn.spec.revoke_on_delete {
        called.push(("revocationUrl", &e.revocation_url));
    }
    for (field, url) in called {
        policy
            .allowlist
            .check(url)
            .map_err(|why| State::EndpointNotAllowed(format!("endpoints.{field}: {why}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::rules::fixtures::conn;
    use serde_json::json;

    #[test]
    fn specs_that_cannot_work_are_refused() {
        let p = Policy::default();
        let same = conn(json!({"clientSecretRef": {"name": "acme-xero-token"}}));
        assert!(
            matches!(validate(&same, &p), Err(State::InvalidSpec(m)) if m.contains("must differ"))
        );
        let keys = conn(
            json!({"clientSecretRef": {"name": "app", "clientIdKey": "k", "clientSecretKey": "k"}}),
        );
        assert!(matches!(validate(&keys, &p), Err(State::InvalidSpec(_))));
        assert_eq!(
            validate(&conn(json!({"clientSecretRef": {"name": "app"}})), &p),
            Ok(())
        );
    }

    #[test]
    fn consumers_of_other_namespaces_need_the_operator_s_consent() {
        let c = conn(json!({"clientSecretRef": {"name": "app"}, "consumers": [
            {"serviceAccount": "worker"}, {"serviceAccount": "worker", "namespace": "ns"},
            {"serviceAccount": "spy", "namespace": "kube-system"}]}));
        let mut p = Policy::default();
        assert!(
            matches!(validate(&c, &p), Err(State::ConsumerNotAllowed(m)) if m.contains("kube-system/spy"))
        );
        p.allow_cross_namespace_consumers = true;
        assert_eq!(validate(&c, &p), Ok(()));
    }

    #[test]
    fn every_endpoint_called_must_be_allowed() {
        let p = Policy::default();
        for (field, url) in [
            ("tokenUrl", "http://169.254.169.254/latest"),
            ("connectionsUrl", "https://evil.example/connections"),
        ] {
            let c = conn(json!({"clientSecretRef": {"name": "app"}, "endpoints": {field: url}}));
            assert!(
                matches!(validate(&c, &p), Err(State::EndpointNotAllowed(m)) if m.contains(field)),
                "{field}"
            );
        }
        // The revocation endpoint is called only with revokeOnDelete.
        let revoke = json!({"revocationUrl": "https://evil.example/revoke"});
        let quiet = conn(json!({"clientSecretRef": {"name": "app"}, "endpoints": revoke}));
        assert_eq!(validate(&quiet, &p), Ok(()));
        let loud = conn(
            json!({"clientSecretRef": {"name": "app"}, "endpoints": revoke, "revokeOnDelete": true}),
        );
        assert!(matches!(
            validate(&loud, &p),
            Err(State::EndpointNotAllowed(_))
        ));
        // An emulator the operator allows.
        let p = Policy {
            allowlist: EndpointAllowlist::default().with("127.0.0.1", 8480),
            ..Policy::default()
        };
        let emu = conn(json!({"clientSecretRef": {"name": "app"}, "endpoints": {
            "tokenUrl": "http://127.0.0.1:8480/connect/token",
            "connectionsUrl": "http://127.0.0.1:8480/connections"}}));
        assert_eq!(validate(&emu, &p), Ok(()));
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let c = conn(
            json!({"clientSecretRef": {"name": "app"}, "endpoints": {"tokenUrl": "http://t/"}}),
        );
        let e = endpoints(&c, &Endpoints::default());
        assert_eq!(e.token_url, "http://t/");
        assert_eq!(e.connections_url, crate::crd::XERO_CONNECTIONS_URL);
    }
}
