//! The proving ground of xero-operator: what exercises the product and never ships with it.
//! It depends on `xero-operator`; the product depends on it only for its integration tests.
//! - [`emulator`]: Xero's identity and connections endpoints on 127.0.0.1 (`xero-emulator`);
//! - [`controlplane`]: a real etcd + kube-apiserver (+ kube-controller-manager) on loopback,
//!   built from `proving-ground/controlplane/` (`xero-controlplane`);
//! - [`bench`]: `make bench` and the chaos soak of `make soak` (`xero-bench`);
//! - [`model`]: the refresh protocol model-checked with the product's own rules (`make model`);
//! - [`devrun`]: `make run`, the whole product narrated on this machine (`xero-run`);
//! - [`procs`]: child processes that never outlive a test.

pub mod bench;
pub mod controlplane;
pub mod devrun;
pub mod emulator;
pub mod model;
pub mod procs;
