//! The `xero-token` CLI as workloads use it: many consumer processes on one connection, `get`,
//! `exec`, `serve`, `--from-dir`, `authorize`, and its exit codes. The tests run on a multi-thread
//! runtime: they wait for CLI processes that talk to the in-process emulator.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Timings, token_fixture};
use serde_json::{Value, json};
use xero_operator::protocol::format as f;

fn xero_token(fx: &common::TokenFixture, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xero-token"));
    cmd.args(["--secret", &fx.secret, "--namespace", &fx.namespace])
        .args(args)
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .env_remove("XERO_TOKEN_SECRET");
    cmd
}

/// Starts `xero-token serve` on a free port; returns the process and its base URL.
fn serve(fx: &common::TokenFixture, identity: &str) -> (Child, String) {
    let mut child = xero_token(
        fx,
        &["serve", "--listen", "127.0.0.1:0", "--identity", identity],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("start xero-token serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the address line");
    let url = line
        .trim()
        .strip_prefix("serving on ")
        .expect("address line")
        .to_owned();
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_consumer_processes_make_exactly_one_token_call_per_expiry() {
    // 3 s tokens, 1 s skew: a new token is due every 2 s; 24 s cover about 12 expiries. The
    // controller takes part too: it is one more party of the protocol.
    let fx = Arc::new(token_fixture("cli-hammer", Timings::default()).await);
    common::connection::create(&fx, "acme", &fx.secret, Timings::default(), json!({})).await;
    let controller = common::connection::start_controller(&fx, |_| {});
    let mut procs = common::Procs(Vec::new());
    let mut urls = Vec::new();
    for i in 0..20 {
        let (child, url) = serve(&fx, &format!("consumer-{i}"));
        procs.0.push(child);
        urls.push(url);
    }
    let started = Instant::now();
    let run_for = Duration::from_secs(24);
    let handed = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let tasks = urls.into_iter().map(|url| {
        let (fx, handed, rejected) = (fx.clone(), handed.clone(), rejected.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while started.elapsed() < run_for {
                let resp = http
                    .get(format!("{url}/token"))
                    .send()
                    .await
                    .expect("sidecar answers");
                assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
                let body: Value = resp.json().await.expect("json");
                let token = body["access_token"].as_str().expect("token");
                // The independent check: does Xero itself accept what the consumer was handed?
                if !fx.accepted_by_xero(token).await {
                    rejected.fetch_add(1, Ordering::Relaxed);
                }
                handed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        t.expect("consumer loop");
    }
    let elapsed = started.elapsed();
    drop(procs);
    drop(controller);
    let report = fx.report().await;
    let chain = &report.chains[0];
    eprintln!(
        "handed {} tokens in {elapsed:?}: {} token calls, {} rotations, chain {chain:?}",
        handed.load(Ordering::Relaxed),
        report.counters.token_calls,
        chain.rotations
    );
    assert_eq!(
        rejected.load(Ordering::Relaxed),
        0,
        "a consumer was handed a token Xero refused"
    );
    assert_eq!(
        report.counters.token_calls, chain.rotations,
        "every call was a needed rotation"
    );
    assert_eq!(
        (chain.grace_reuses, chain.dead_token_uses, chain.broken),
        (0, 0, false)
    );
    assert!(
        chain.rotations >= 10,
        "lived through at least 10 expiries: {}",
        chain.rotations
    );
    // Never early: at most one rotation per 2 s usable window (+1 for the first token).
    let windows = elapsed.as_secs_f64() / 2.0;
    assert!(
        (chain.rotations as f64) <= windows + 1.0,
        "{} rotations in {windows} windows",
        chain.rotations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_prints_the_token_or_json_and_exec_passes_it_on() {
    let fx = token_fixture("cli-get", Timings::default()).await;
    let out = xero_token(&fx, &["get"]).output().expect("run get");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8");
    assert!(fx.accepted_by_xero(token.trim()).await);

    let out = xero_token(&fx, &["get", "--json"])
        .output()
        .expect("run get --json");
    let body: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(body["access_token"], token.trim());
    assert_eq!(body["tenant_id"], fx.user.connections[0].tenant_id.as_str());
    assert!(body["expires_at"].as_str().expect("expiry").ends_with('Z'));

    let out = xero_token(
        &fx,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "test -n \"$XERO_ACCESS_TOKEN\" && echo \"$XERO_TENANT_ID\"; exit 7",
        ],
    )
    .output()
    .expect("run exec");
    assert_eq!(out.status.code(), Some(7), "exec passes the exit code on");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        fx.user.connections[0].tenant_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_what_went_wrong() {
    let fx = token_fixture("cli-exit", Timings::default()).await;
    fx.patch(json!({f::REFRESH_TOKEN: "refused-by-xero"}), json!({}))
        .await;
    let out = xero_token(&fx, &["get"]).output().expect("run");
    assert_eq!(out.status.code(), Some(3), "re-authorisation required");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("re-authorisation required"), "{stderr}");
    assert!(
        !stderr.contains("refused-by-xero"),
        "no token in messages: {stderr}"
    );

    fx.patch(json!({f::REFRESH_TOKEN: ""}), json!({})).await;
    let out = xero_token(&fx, &["get"]).output().expect("run");
    assert_eq!(out.status.code(), Some(4), "no refresh token yet");

    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .args(["get", "--secret", "missing", "--namespace", &fx.namespace])
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(6), "Secret not found");

    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .arg("get")
        .env_remove("XERO_TOKEN_SECRET")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret"));

    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .arg("frobnicate")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_dir_uses_a_fresh_mounted_copy_and_falls_back_to_the_api_when_it_is_stale() {
    let fx = token_fixture("cli-dir", Timings::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let far = f::format_time(std::time::SystemTime::now() + Duration::from_secs(3600));
    std::fs::write(dir.path().join(f::ACCESS_TOKEN), "mounted-token").expect("write");
    std::fs::write(dir.path().join(f::EXPIRES_AT), &far).expect("write");
    // A fresh mounted copy needs no API at all (no --secret).
    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .args(["get", "--from-dir", dir.path().to_str().expect("utf-8")])
        .env_remove("XERO_TOKEN_SECRET")
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mounted-token");
    // A stale mounted copy (the kubelet lags): the API copy is used and refreshed.
    std::fs::write(dir.path().join(f::EXPIRES_AT), "2000-01-01T00:00:00Z").expect("write");
    let out = xero_token(
        &fx,
        &["get", "--from-dir", dir.path().to_str().expect("utf-8")],
    )
    .output()
    .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8");
    assert_ne!(token.trim(), "mounted-token");
    assert!(fx.accepted_by_xero(token.trim()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_errors_as_json_and_only_listens_on_loopback() {
    let fx = token_fixture("cli-serve", Timings::default()).await;
    fx.patch(json!({f::REFRESH_TOKEN: ""}), json!({})).await;
    let (child, url) = serve(&fx, "sidecar");
    let _procs = common::Procs(vec![child]);
    let resp = reqwest::get(format!("{url}/token")).await.expect("send");
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "no_refresh_token"
    );
    assert_eq!(
        reqwest::get(format!("{url}/healthz"))
            .await
            .expect("send")
            .status(),
        200
    );

    let out = xero_token(&fx, &["serve", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_runs_the_pkce_flow_and_stores_the_first_pair() {
    let fx = token_fixture("cli-authorize", Timings::default()).await;
    // The connection needs re-authorisation: its refresh token was refused.
    fx.patch(json!({f::REFRESH_TOKEN: "dead"}), json!({})).await;
    assert_eq!(
        xero_token(&fx, &["get"])
            .output()
            .expect("run")
            .status
            .code(),
        Some(3)
    );

    let mut child = xero_token(
        &fx,
        &[
            "authorize",
            "--authorize-url",
            &format!("{}/identity/connect/authorize", fx.emulator.base_url()),
            "--port",
            "0",
            "--login-hint",
            &fx.user.user_id,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start authorize");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut url = String::new();
    while !url.starts_with("http") {
        url.clear();
        stderr.read_line(&mut url).expect("read the URL line");
        url = url.trim().to_owned();
        assert!(
            !url.is_empty() || child.try_wait().expect("wait").is_none(),
            "authorize exited early"
        );
    }
    // The "browser": follow the emulator's redirect back to the CLI's callback.
    let page = reqwest::get(&url)
        .await
        .expect("approve")
        .text()
        .await
        .expect("page");
    assert!(page.contains("authorised"), "{page}");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("stored a new token pair"));
    let rec = fx.record().await;
    assert_eq!(rec.reauthorization_required_for, None);
    assert!(
        rec.refreshed_by
            .as_deref()
            .is_some_and(|b| b.starts_with("authorize/"))
    );
    // The stored pair works and is a family of its own at Xero.
    let out = xero_token(&fx, &["get"]).output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fx.report().await.chains.len(), 2);
}
