//! What runs the pipeline: the watches that wake reconciles ([`watch`]), what reconciles
//! share and remember ([`context`], [`budget`]), the Kubernetes releases it runs on
//! ([`kubernetes_version`]), leader election ([`leader`]), the metrics ([`metrics`]) and their
//! HTTP server ([`server`]).

pub mod budget;
pub mod context;
pub mod kubernetes_version;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod watch;
