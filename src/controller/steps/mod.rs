//! The reconcile's steps, in the order the pipeline calls them (`apply` in the parent module);
//! each reads or writes through the API server or Xero and decides with [`super::rules`].
//!
//! 1. [`inputs`]: the token Secret and the client Secret, if the operator's own or opted in;
//! 2. [`token_secret`]: the token Secret's controller-owned fields brought in line;
//! 3. [`consumers`]: the consumers' Role and RoleBinding;
//! 4. [`token`]: the protocol as the producer, refreshing only when due;
//! 5. [`tenants`]: the tenants, with the first token and every 5-6 h;
//! 6. [`status`]: status, the `Ready` condition and an Event per transition.
//!
//! On delete: [`cleanup`].

pub mod cleanup;
pub mod consumers;
pub mod inputs;
pub mod status;
pub mod tenants;
pub mod token;
pub mod token_secret;
