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
