//! Prometheus metrics of the controller (`/metrics`), with `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// `controller` or `consumer`.
    pub actor: String,
    /// `ok`, or the error kind of a failed controller refresh.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// All metrics, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub token_endpoint_seconds: Histogram,
    pub seconds_until_expiry: Family<ConnectionLabels, Gauge<f64, AtomicU64>>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconciles: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("xero_operator");
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Token refreshes seen, by who made them and the result",
            refreshes.clone(),
        );
        let token_endpoint_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "token_endpoint_seconds",
            "Duration of the controller's refreshes (token endpoint call and Secret write)",
            token_endpoint_seconds.clone(),
        );
        let seconds_until_expiry = Family::<ConnectionLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "seconds_until_expiry",
            "Seconds until the stored access token expires, per connection",
            seconds_until_expiry.clone(),
        );
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that ended in a non-ready state, by reason",
            reconcile_errors.clone(),
        );
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        Self {
            registry,
            refreshes,
            token_endpoint_seconds,
            seconds_until_expiry,
            reconcile_errors,
            reconciles,
        }
    }
}

impl Metrics {
    /// Drops the per-connection series of a connection that is gone.
    pub fn forget_connection(&self, namespace: &str, name: &str) {
        self.seconds_until_expiry.remove(&ConnectionLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_the_prefix() {
        let m = Metrics::default();
        m.refreshes
            .get_or_create(&RefreshLabels {
                actor: "controller".into(),
                result: "ok".into(),
            })
            .inc();
        m.seconds_until_expiry
            .get_or_create(&ConnectionLabels {
                namespace: "ns".into(),
                name: "acme".into(),
            })
            .set(12.5);
        let text = m.encode();
        assert!(
            text.contains("xero_operator_refreshes_total{actor=\"controller\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "xero_operator_seconds_until_expiry{namespace=\"ns\",name=\"acme\"} 12.5"
            ),
            "{text}"
        );
        assert!(text.contains("xero_operator_token_endpoint_seconds_bucket"));
    }
}
