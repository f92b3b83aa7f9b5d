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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub name: String,
    /// The `Ready` condition's reason (`TokenValid`, `ReauthorizationRequired`, …).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    /// The fingerprint of the app's client id (not the id itself).
    pub app: String,
}

type TimestampGauge = Family<ConnectionLabels, Gauge<f64, AtomicU64>>;

/// All metrics, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub token_endpoint_seconds: Histogram,
    pub seconds_until_expiry: Family<ConnectionLabels, Gauge<f64, AtomicU64>>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconciles: Counter,
    /// 1 for each connection's current `Ready` reason (one series per connection).
    pub connection_condition: Family<ConditionLabels, Gauge>,
    /// How many connections have each `Ready` reason (always exported, also without the
    /// per-connection series).
    pub connections: Family<ReasonLabels, Gauge>,
    /// When each connection's stored access token expires (Unix seconds).
    pub access_token_expiry: TimestampGauge,
    /// When each connection's token pair was last refreshed, by anyone (Unix seconds): Xero
    /// drops a refresh token unused for 60 days.
    pub last_refresh: TimestampGauge,
    /// Permits the per-app bucket gave: one per claim to call the token endpoint (a claim's
    /// retries of a lost call are not counted again).
    pub app_permits: Family<AppLabels, Counter>,
    /// The per-app cap on those calls (`--app-calls-per-minute`).
    pub app_calls_limit_per_minute: Gauge,
    /// Every call the controller made to the token endpoint, answered or not (retries too).
    pub token_calls: Counter,
    /// The reason last exported per connection, so a change removes the old series.
    current_reason: std::sync::Mutex<std::collections::HashMap<(String, String), String>>,
    /// Whether the per-connection series are exported (`--connection-metrics`): about a
    /// kilobyte of the controller's memory per connection, and four series per connection for
    /// Prometheus to scrape.
    per_connection: bool,
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
        let connection_condition = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "connection_condition",
            "1 for the current reason of each connection's Ready condition",
            connection_condition.clone(),
        );
        let connections = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "connections",
            "Connections by the reason of their Ready condition",
            connections.clone(),
        );
        let access_token_expiry = TimestampGauge::default();
        registry.register(
            "access_token_expiry_timestamp_seconds",
            "When the stored access token expires (Unix time), per connection",
            access_token_expiry.clone(),
        );
        let last_refresh = TimestampGauge::default();
        registry.register(
            "last_refresh_timestamp_seconds",
            "When the token pair was last refreshed by anyone (Unix time), per connection; Xero drops a refresh token unused for 60 days",
            last_refresh.clone(),
        );
        let app_permits = Family::<AppLabels, Counter>::default();
        registry.register(
            "app_permits",
            "Claims to call the token endpoint let through the per-app bucket, per Xero app (client id fingerprint)",
            app_permits.clone(),
        );
        let app_calls_limit_per_minute = Gauge::default();
        registry.register(
            "app_calls_limit_per_minute",
            "The controller's cap on token calls per Xero app per minute (--app-calls-per-minute)",
            app_calls_limit_per_minute.clone(),
        );
        let token_calls = Counter::default();
        registry.register(
            "token_calls",
            "Calls the controller made to the token endpoint, answered or not (retries within a claim too)",
            token_calls.clone(),
        );
        Self {
            registry,
            token_calls,
            refreshes,
            token_endpoint_seconds,
            seconds_until_expiry,
            reconcile_errors,
            reconciles,
            connection_condition,
            connections,
            access_token_expiry,
            last_refresh,
            app_permits,
            app_calls_limit_per_minute,
            current_reason: std::sync::Mutex::default(),
            per_connection: true,
        }
    }
}

impl Metrics {
    /// Metrics without the per-connection series (`seconds_until_expiry`,
    /// `connection_condition`, `access_token_expiry_timestamp_seconds`,
    /// `last_refresh_timestamp_seconds`): for fleets so large that a series per connection
    /// costs more than it tells. The totals (refreshes, errors by reason, permits) stay.
    pub fn without_connection_series() -> Self {
        Self {
            per_connection: false,
            ..Self::default()
        }
    }

    /// Sets the seconds until a connection's stored access token expires.
    pub fn set_seconds_until_expiry(&self, namespace: &str, name: &str, seconds: f64) {
        if self.per_connection {
            self.seconds_until_expiry
                .get_or_create(&ConnectionLabels {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
                .set(seconds);
        }
    }

    /// Drops the per-connection series of a connection that is gone.
    pub fn forget_connection(&self, namespace: &str, name: &str) {
        let labels = ConnectionLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.seconds_until_expiry.remove(&labels);
        self.access_token_expiry.remove(&labels);
        self.last_refresh.remove(&labels);
        self.set_reason(namespace, name, None);
    }

    /// Exports `reason` as the connection's current one (`None`: none): moves the connection
    /// from its previous reason's count to this one's and, with per-connection series, replaces
    /// the series of the previous reason.
    pub fn set_reason(&self, namespace: &str, name: &str, reason: Option<&str>) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut current = self
            .current_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let labels = |reason: String| ConditionLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason,
        };
        let previous = match reason {
            Some(r) => current.insert(key, r.to_owned()),
            None => current.remove(&key),
        };
        if previous.as_deref() != reason {
            let count = |r: &str| {
                self.connections.get_or_create(&ReasonLabels {
                    reason: r.to_owned(),
                })
            };
            if let Some(previous) = &previous {
                count(previous).dec();
            }
            if let Some(r) = reason {
                count(r).inc();
            }
        }
        if !self.per_connection {
            return;
        }
        if let Some(previous) = previous
            && Some(previous.as_str()) != reason
        {
            self.connection_condition.remove(&labels(previous));
        }
        if let Some(r) = reason {
            self.connection_condition
                .get_or_create(&labels(r.to_owned()))
                .set(1);
        }
    }

    /// Sets a per-connection timestamp gauge to `at` (Unix seconds).
    pub fn set_time(
        &self,
        family: &TimestampGauge,
        namespace: &str,
        name: &str,
        at: std::time::SystemTime,
    ) {
        if !self.per_connection {
            return;
        }
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        family
            .get_or_create(&ConnectionLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .set(secs);
    }

    /// Metrics with one series in every family (the text format omits a family without one):
    /// what `/metrics` shows once each metric has been touched. The tests check the chart's
    /// alerts and dashboard against it; a family added to the registry belongs here too.
    pub fn with_every_series() -> Self {
        let m = Self::default();
        let (ns, name) = ("ns", "acme");
        m.refreshes
            .get_or_create(&RefreshLabels {
                actor: "controller".into(),
                result: "ok".into(),
            })
            .inc();
        m.token_endpoint_seconds.observe(0.1);
        m.seconds_until_expiry
            .get_or_create(&ConnectionLabels {
                namespace: ns.into(),
                name: name.into(),
            })
            .set(1.0);
        m.reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: "XeroUnavailable".into(),
            })
            .inc();
        m.reconciles.inc();
        m.set_reason(ns, name, Some("TokenValid"));
        m.set_time(
            &m.access_token_expiry,
            ns,
            name,
            std::time::SystemTime::now(),
        );
        m.set_time(&m.last_refresh, ns, name, std::time::SystemTime::now());
        m.app_permits
            .get_or_create(&AppLabels { app: "app".into() })
            .inc();
        m.app_calls_limit_per_minute.set(1000);
        m
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
    fn with_every_series_shows_every_registered_metric() {
        let mut registered = 0;
        // Each `registry.register` call in `Default`: count them in the source, so a metric
        // added there and not here fails this test.
        for line in include_str!("metrics.rs").lines() {
            if line.trim_start().starts_with("registry.register(") {
                registered += 1;
            }
        }
        let shown = Metrics::with_every_series()
            .encode()
            .lines()
            .filter(|l| l.starts_with("# TYPE "))
            .count();
        assert_eq!(shown, registered);
    }

    #[test]
    fn a_new_reason_replaces_the_old_series_and_forgetting_removes_it() {
        let m = Metrics::default();
        m.set_reason("ns", "acme", Some("XeroUnavailable"));
        m.set_reason("ns", "acme", Some("TokenValid"));
        let text = m.encode();
        assert!(text.contains("reason=\"TokenValid\"} 1"), "{text}");
        assert!(
            !text.contains("name=\"acme\",reason=\"XeroUnavailable\""),
            "{text}"
        );
        assert!(
            text.contains("connections{reason=\"TokenValid\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("connections{reason=\"XeroUnavailable\"} 0"),
            "{text}"
        );
        m.set_reason("ns", "other", Some("TokenValid"));
        assert!(m.encode().contains("connections{reason=\"TokenValid\"} 2"));
        m.forget_connection("ns", "acme");
        let text = m.encode();
        assert!(!text.contains("acme"), "{text}");
        assert!(
            text.contains("connections{reason=\"TokenValid\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn without_connection_series_no_connection_appears_and_the_totals_stay() {
        let m = Metrics::without_connection_series();
        m.set_reason("ns", "acme", Some("TokenValid"));
        m.set_time(
            &m.access_token_expiry,
            "ns",
            "acme",
            std::time::SystemTime::now(),
        );
        m.set_time(&m.last_refresh, "ns", "acme", std::time::SystemTime::now());
        m.set_seconds_until_expiry("ns", "acme", 12.5);
        m.reconciles.inc();
        let text = m.encode();
        assert!(!text.contains("acme"), "{text}");
        assert!(text.contains("xero_operator_reconciles_total 1"), "{text}");
        assert!(
            text.contains("xero_operator_connections{reason=\"TokenValid\"} 1"),
            "{text}"
        );
        // The same calls on the default metrics do show the connection.
        let on = Metrics::default();
        on.set_seconds_until_expiry("ns", "acme", 12.5);
        assert!(on.encode().contains("name=\"acme\""));
    }

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
