//! `kubectl xero` as a person uses it: found by kubectl as a plugin on the PATH, `status` of one
//! connection (without any token in its output), and `renew` forcing one early refresh through
//! the refresh protocol while the controller runs (one call to Xero, not two), and shell
//! completion through kubectl.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::connection::{self, start_controller};
use common::{Timings, token_fixture};
use serde_json::json;
use xero_operator::redact::Sensitive;

/// `kubectl xero ARGS` through the control plane's kubectl, with the plugin's directory first
/// on the PATH (as a user installs it), allowed to call the fixture's emulator.
fn kubectl_xero(fx: &common::TokenFixture, args: &[&str]) -> Output {
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-xero"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(common::env().bin_dir.join("kubectl"))
        .arg("xero")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .env(
            xero_operator::cli::ALLOW_HOSTS_ENV,
            fx.emulator.allowed_host(),
        )
        .output()
        .expect("run kubectl xero")
}

/// `kubectl __complete xero WORDS` (what kubectl runs for `kubectl xero <TAB>`), with the plugin
/// and its completion helper `deploy/krew/kubectl_complete-xero` on the PATH as installed.
fn complete(words: &[&str]) -> Vec<String> {
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-xero"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = format!(
        "{}:{}:{}",
        plugin_dir.display(),
        common::repo_path("deploy/krew").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(common::env().bin_dir.join("kubectl"))
        .args(["__complete", "xero"])
        .args(words)
        .env("PATH", path)
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .output()
        .expect("run kubectl __complete");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_renew_work_by_connection_name_as_a_kubectl_plugin() {
    let timings = Timings {
        access_token: Duration::from_secs(600),
        ..Timings::default()
    };
    let fx = token_fixture("plugin", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let _controller = start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    let before = fx.record().await;

    let out = kubectl_xero(&fx, &["status", "acme", "-n", &fx.namespace]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    for want in [
        "Ready:          True (TokenValid)",
        "Access token:   expires",
        "Refresh token:  unused, Xero drops it",
        &format!("Rotation:       {}", before.rotation),
        "Claim:          none",
        "Demo Company",
        "TokenValid",
    ] {
        assert!(shown.contains(want), "{want:?} missing from:\n{shown}");
    }
    for secret in [&before.access_token, &before.refresh_token] {
        let secret = secret.as_ref().map(Sensitive::expose).expect("token");
        assert!(!shown.contains(secret), "a token in the status output");
    }

    // Completion through kubectl: subcommands, then the namespace's connections by name.
    assert_eq!(complete(&[""]), ["authorize", "renew", "status", ":4"]);
    assert_eq!(
        complete(&["renew", "-n", &fx.namespace, ""]),
        ["acme", ":4"]
    );
    assert_eq!(
        complete(&["status", "--ti"]),
        [":4"],
        "status has no --timeout"
    );
    assert_eq!(complete(&["renew", "--ti"]), ["--timeout", ":4"]);

    // Renew: one call, one rotation, while the token was valid; the controller sees a fresh
    // token and calls nobody.
    let calls = fx.report().await.counters.token_calls;
    let out = kubectl_xero(&fx, &["renew", "acme", "-n", &fx.namespace]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("renewed"), "{said}");
    let after = fx.record().await;
    assert_eq!(after.rotation, before.rotation + 1, "{said}");
    assert!(
        after
            .refreshed_by
            .as_deref()
            .is_some_and(|b| b.starts_with("kubectl-xero/")),
        "{:?}",
        after.refreshed_by
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fx.report().await.counters.token_calls, calls + 1);

    // Under a newer protocol revision the plugin only reads (P68): it cannot renew, and says
    // so rather than call the stored token renewed.
    let newer = (xero_operator::protocol::format::PROTOCOL_VERSION + 1).to_string();
    fx.patch(
        json!({}),
        json!({xero_operator::protocol::format::ANN_PROTOCOL_VERSION: newer}),
    )
    .await;
    let out = kubectl_xero(
        &fx,
        &["renew", "acme", "-n", &fx.namespace, "--timeout", "2s"],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(10), "{said}");
    assert!(
        said.contains(&format!("protocol revision {newer}")),
        "{said}"
    );
    assert!(!said.contains("renewed"), "{said}");
    assert_eq!(fx.record().await.rotation, after.rotation, "{said}");
    assert_eq!(fx.report().await.counters.token_calls, calls + 1);

    // A connection that does not exist: a clear message, not a panic.
    let out = kubectl_xero(&fx, &["status", "nope", "-n", &fx.namespace]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no XeroConnection \"nope\""),
        "{}",
        text(&out)
    );
}
