//! The controller's rules: pure functions from what a reconcile read to what it does (no I/O),
//! unit-tested on their own.
//!
//! - [`checks`]: the spec against what the schema cannot check and the operator's limits;
//! - [`ownership`]: whose a Secret is, and what the controller may do with it;
//! - [`resources`]: the objects the controller writes (the token Secret's fields, RBAC);
//! - [`classify`]: a protocol error as a state and a time to look again;
//! - [`conditions`]: the states, their `Ready` condition and Event;
//! - [`requeue`]: when a reconcile looks again;
//! - [`wake`]: which watch events wake a reconcile.

pub mod checks;
pub mod classify;
pub mod conditions;
pub mod ownership;
pub mod requeue;
pub mod resources;
pub mod wake;

/// What the rules' unit tests share.
#[cfg(test)]
pub(crate) mod fixtures {
    use serde_json::{Value, json};

    use crate::crd::XeroConnection;

    /// The connection `ns/acme` (uid `u1`) with `spec`.
    pub(crate) fn conn(spec: Value) -> XeroConnection {
        serde_json::from_value(json!({
            "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
            "metadata": {"name": "acme", "namespace": "ns", "uid": "u1"},
            "spec": spec,
        }))
        .expect("connection")
    }
}
