//! xero-operator: keeps Xero OAuth 2.0 credentials valid for every workload in a Kubernetes
//! cluster, with one token call per expiry.
//!
//! This crate is the product: the library and the shipped binaries in `src/bin/`
//! (`xero-operator`, `xero-token`, `crdgen`), which only wire it up. What proves it (the Xero
//! emulator, the local control plane, the benchmarks and soak, the `make run` demo) is the
//! workspace member `xero-proving-ground` (`proving-ground/`). That member depends on this crate;
//! this crate needs it only for `tests/` (never in a `#[cfg(test)]` module here: unit tests build
//! a second copy of this crate, whose types the proving ground does not share).
//!
//! A connection's data goes through the product as
//! **spec → inputs → decision → token Secret → status**:
//! - spec: [`crd`], the `XeroConnection` a person writes (the CRD's source of truth);
//! - inputs: [`controller::checks`] and [`controller::inputs`], the spec against the operator's
//!   limits ([`allowlist`]) and the client and token Secrets read under [`controller::ownership`];
//! - decision: [`protocol::decide`], from the token Secret as [`protocol::format`] reads it and
//!   the clock: use the token, wait, claim and refresh at Xero ([`xero`]), or stop;
//! - token Secret: [`protocol::refresher`], the claim, the call and the store, made by the
//!   [`controller`] or by any workload ([`cli`], `xero-token`);
//! - status: [`controller::conditions`], the `Ready` condition, Events and tenants a person sees.
//!
//! Around them: [`redact`] and [`text`] (what may be shown), [`process`] (logging, shutdown),
//! [`check`] (what `helm test` asks of an installed operator).

pub mod allowlist;
pub mod check;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod plugin;
pub mod process;
pub mod protocol;
pub mod redact;
pub mod text;
pub mod xero;
