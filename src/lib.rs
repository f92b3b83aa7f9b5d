//! xero-operator: keeps Xero OAuth 2.0 credentials valid for every workload in a Kubernetes
//! cluster, with one token call per expiry.
//!
//! The library holds everything; the binaries in `src/bin/` only wire it up.
//! - [`crd`]: the `XeroConnection` custom resource (the CRD's source of truth).
//! - [`controlplane`]: a real etcd + kube-apiserver on loopback for tests and `make run`.
//! - [`emulator`]: an emulator of Xero's identity endpoints for tests, benchmarks and `make run`.

pub mod allowlist;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod controlplane;
pub mod crd;
pub mod devrun;
pub mod emulator;
pub mod process;
pub mod protocol;
pub mod redact;
pub mod text;
pub mod xero;
