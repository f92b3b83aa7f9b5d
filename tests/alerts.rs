//! The chart's alerts and dashboard against the real tools and the real metrics: promtool (built
//! from its Go module by scripts/promtool.sh) checks the rule file and runs its unit tests
//! (tests/alerts/alerts_test.yaml), parses every dashboard query, and every metric the alerts or
//! the dashboard name must be one the controller exports.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use xero_operator::controller::metrics::Metrics;

fn promtool() -> PathBuf {
    common::go_tool("scripts/promtool.sh")
}

fn promtool_ok(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(common::repo_path("."))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

const ALERTS: &str = "charts/xero-operator/files/alerts.yaml";
const DASHBOARD: &str = "charts/xero-operator/files/dashboard.json";

/// The sample names the controller exposes: each registered metric with the suffixes its type
/// gives it in the text format.
fn exported_names() -> BTreeSet<String> {
    let text = Metrics::with_every_series().encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

/// Every `xero_operator_…` name in `text`.
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("xero_operator_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

fn dashboard_queries() -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_path(DASHBOARD)).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries: Vec<String> = json["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(queries.len() >= 8, "{queries:?}");
    queries
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let checked = promtool_ok(&["check", "rules", ALERTS]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    promtool_ok(&["test", "rules", "tests/alerts/alerts_test.yaml"]);
}

#[test]
fn every_dashboard_query_parses() {
    // promtool parses PromQL in rule files: each query becomes a recording rule.
    let rules = serde_json::json!({"groups": [{
        "name": "dashboard",
        "rules": dashboard_queries().iter().enumerate().map(|(i, q)| {
            serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": q})
        }).collect::<Vec<_>>(),
    }]});
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.json");
    std::fs::write(&file, rules.to_string()).expect("write");
    promtool_ok(&["check", "rules", file.to_str().expect("utf-8 path")]);
}

#[test]
fn alerts_and_dashboard_name_only_metrics_the_controller_exports() {
    let exported = exported_names();
    assert!(
        exported.contains("xero_operator_refreshes_total")
            && exported.contains("xero_operator_token_endpoint_seconds_bucket"),
        "{exported:?}"
    );
    let alerts = std::fs::read_to_string(common::repo_path(ALERTS)).expect("read the alerts");
    let mut named = named_metrics(&alerts);
    named.extend(dashboard_queries().iter().flat_map(|q| named_metrics(q)));
    assert!(named.len() >= 7, "{named:?}");
    let unknown: Vec<_> = named.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "alerts or dashboard name metrics the controller does not export: {unknown:?} (exported: {exported:?})"
    );
}
