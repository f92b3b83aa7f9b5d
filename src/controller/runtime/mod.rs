//! What runs the pipeline: the watches that wake reconciles ([`watch`]), what reconciles
//! share and remember ([`context`], [`budget`]), leader election ([`leader`]), the metrics
//! ([`metrics`]) and their HTTP server ([`server`]).

pub mod budget;
pub mod context;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod watch;
