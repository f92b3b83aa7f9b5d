//! The `xero-token` CLI as workloads use it: many consumer processes on one connection, `get`,
//! `exec`, `serve`, `--from-dir`, `authorize`, and its exit codes. The tests run on a multi-thread
//! runtime: they wait for CLI processes that talk to the in-process emulator.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Timings, token_fixture};
use serde_json::{Value, json};
use xero_operator::protocol::format as f;
use xero_proving_ground::emulator::Faults;

fn xero_token(fx: &common::TokenFixture, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xero-token"));
    cmd.args(["--secret", &fx.secret, "--namespace", &fx.namespace])
        .args(args)
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .env(
            xero_operator::cli::ALLOW_HOSTS_ENV,
            fx.emulator.allowed_host(),
        )
        .env_remove("XERO_TOKEN_SECRET");
    cmd
}

/// Starts `xero-token serve` on a free port; returns the process and its base URL.
fn serve(fx: &common::TokenFixture, identity: &str) -> (Child, String) {
    let mut child = common::Procs(vec![
        xero_token(
            fx,
            &["serve", "--listen", "127.0.0.1:0", "--identity", identity],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("start xero-token serve"),
    ]);
    let stdout = child.0[0].stdout.take().expect("stdout");
    let line = common::first_line(stdout, Duration::from_secs(30), |l| {
        l.starts_with("serving on ")
    })
    .expect("xero-token serve printed its address");
    let url = line["serving on ".len()..].to_owned();
    (child.0.pop().expect("the child"), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_consumer_processes_make_exactly_one_token_call_per_expiry() {
    // 3 s tokens, 1 s skew: a new token is due every 2 s. The consumers run until Xero has
    // rotated 10 times. The controller takes part too: it is one more party of the protocol.
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
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handed = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let (fx, handed, rejected, stop) =
                (fx.clone(), handed.clone(), rejected.clone(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    let resp = http
                        .get(format!("{url}/token"))
                        .send()
                        .await
                        .expect("sidecar answers");
                    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
                    let body: Value = resp.json().await.expect("json");
                    let token = body["access_token"].as_str().expect("token");
                    // The independent check: does Xero itself accept what the consumer was
                    // handed?
                    if !fx.accepted_by_xero(token).await {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    handed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    while fx.report().await.chains[0].rotations < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "fewer than 10 expiries in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in futures_util::future::join_all(tasks).await {
        t.expect("consumer loop");
    }
    drop(procs);
    controller.stop().await;
    let report = fx.report().await;
    let chain = &report.chains[0];
    eprintln!(
        "handed {} tokens in {:?}: {} token calls, {} rotations, chain {chain:?}",
        handed.load(Ordering::Relaxed),
        started.elapsed(),
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
    // Never early, by Xero's clock: a token issued in second s expires (JWT `exp`, whole
    // seconds) at s + 3 and is due at s + 2, so calls are at least 2 whole seconds apart.
    let seconds: Vec<u64> = report
        .counters
        .token_calls_by_second
        .keys()
        .copied()
        .collect();
    assert!(
        report
            .counters
            .token_calls_by_second
            .values()
            .all(|n| *n == 1),
        "two calls in one second: {:?}",
        report.counters.token_calls_by_second
    );
    for pair in seconds.windows(2) {
        assert!(
            pair[1] - pair[0] >= 2,
            "a refresh before its token was due: {seconds:?}"
        );
    }
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

    // Xero failing for the whole claim: 5, and a backoff published for everyone.
    fx.patch(
        json!({f::REFRESH_TOKEN: fx.user.refresh_token.clone().expect("rt")}),
        json!({}),
    )
    .await;
    fx.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let out = xero_token(&fx, &["get"]).output().expect("run");
    assert_eq!(out.status.code(), Some(5), "Xero unavailable");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Xero answered HTTP 500"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = fx.record().await;
    assert!(rec.retry_not_before.is_some() && rec.failed_attempts == 1);
    // Told to wait past its own deadline (the backoff after the failure): 5 at once, without
    // calling Xero; a 429's wait (no failure counted): 9.
    fx.set_faults(Faults::default()).await;
    fx.patch(
        json!({}),
        json!({f::ANN_RETRY_NOT_BEFORE: f::format_time(
            std::time::SystemTime::now() + Duration::from_secs(120)
        )}),
    )
    .await;
    let calls = fx.report().await.counters.token_calls;
    let asked = Instant::now();
    let out = xero_token(&fx, &["get", "--timeout", "30s"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5), "Xero unavailable: backing off");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "gave up at once, not at its deadline: {:?}",
        asked.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Xero unavailable: 1 refreshes in a row failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fx.patch(json!({}), json!({f::ANN_FAILED_ATTEMPTS: null}))
        .await;
    let out = xero_token(&fx, &["get", "--timeout", "30s"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(9), "rate limited");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rate limited"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fx.report().await.counters.token_calls, calls);

    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .args(["get", "--secret", "missing", "--namespace", &fx.namespace])
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(6), "Secret not found");

    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .arg("get")
        .env_remove("XERO_TOKEN_SECRET")
        .env("KUBECONFIG", common::NO_CLUSTER)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret"));

    let out = Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .arg("frobnicate")
        .env("KUBECONFIG", common::NO_CLUSTER)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "usage error");
}

/// `xero-token authorize` against the fixture's emulator, as the user `login_hint`, on a free
/// callback port, naming the app by flags (the person's own input: the token Secret's copy is
/// never used). The returned file holds the client secret; keep it until the command ends.
fn authorize(fx: &common::TokenFixture, login_hint: &str) -> (Command, tempfile::TempPath) {
    let secret = tempfile::NamedTempFile::new().expect("client secret file");
    std::fs::write(
        secret.path(),
        xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET,
    )
    .expect("write the client secret");
    let secret = secret.into_temp_path();
    let cmd = xero_token(
        fx,
        &[
            "authorize",
            "--authorize-url",
            &format!("{}/identity/connect/authorize", fx.emulator.base_url()),
            "--token-url",
            &fx.emulator.token_url(),
            "--client-id",
            xero_proving_ground::emulator::DEFAULT_CLIENT_ID,
            "--client-secret-file",
            secret.to_str().expect("utf-8"),
            "--port",
            "0",
            "--login-hint",
            login_hint,
        ],
    );
    (cmd, secret)
}

/// `xero-token get --from-dir DIR` with no way to reach any cluster.
fn get_from_mount_only(dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .args(["get", "--from-dir", dir.to_str().expect("utf-8")])
        .env_remove("XERO_TOKEN_SECRET")
        .env("KUBECONFIG", common::NO_CLUSTER)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_dir_uses_a_fresh_mounted_copy_and_falls_back_to_the_api_when_it_is_stale() {
    let fx = token_fixture("cli-dir", Timings::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let far = f::format_time(std::time::SystemTime::now() + Duration::from_secs(3600));
    std::fs::write(dir.path().join(f::ACCESS_TOKEN), "mounted-token").expect("write");
    std::fs::write(dir.path().join(f::EXPIRES_AT), &far).expect("write");
    // A fresh mounted copy needs no API at all (no --secret).
    let out = get_from_mount_only(dir.path());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mounted-token");
    // Judged with the connection's skew from the mount's data copy, not the CLI's default: a
    // token with 100 s left is stale for a connection whose skew is 300 s.
    let soon = f::format_time(std::time::SystemTime::now() + Duration::from_secs(100));
    std::fs::write(dir.path().join(f::EXPIRES_AT), &soon).expect("write");
    std::fs::write(dir.path().join(f::CLOCK_SKEW_SECONDS), "300").expect("write");
    let out = get_from_mount_only(dir.path());
    assert_eq!(
        out.status.code(),
        Some(1),
        "stale, and no API to fall back to"
    );
    std::fs::remove_file(dir.path().join(f::CLOCK_SKEW_SECONDS)).expect("rm");
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
    // Each state by its own name: a caller tells "a person must fix it" from "later".
    let state = |annotations: Value| {
        let (fx, url) = (&fx, &url);
        async move {
            fx.patch(
                json!({f::REFRESH_TOKEN: fx.user.refresh_token.clone()}),
                annotations,
            )
            .await;
            let resp = reqwest::get(format!("{url}/token")).await.expect("send");
            assert_eq!(resp.status(), 503);
            resp.json::<Value>().await.expect("json")["error"].clone()
        }
    };
    let an_hour = f::format_time(std::time::SystemTime::now() + Duration::from_secs(3600));
    assert_eq!(
        state(json!({f::ANN_RETRY_NOT_BEFORE: &an_hour})).await,
        "rate_limited"
    );
    assert_eq!(
        state(json!({f::ANN_RETRY_NOT_BEFORE: &an_hour, f::ANN_FAILED_ATTEMPTS: "2"})).await,
        "xero_unavailable"
    );
    let fingerprint = fx.record().await.credentials_fingerprint();
    assert_eq!(
        state(
            json!({f::ANN_RETRY_NOT_BEFORE: null, f::ANN_FAILED_ATTEMPTS: null,
            f::ANN_STOPPED_FOR: fingerprint, f::ANN_STOP_REASON: "invalid_client"})
        )
        .await,
        "stopped"
    );
    // Only for loopback names: a page that rebinds its own name to 127.0.0.1 gets nothing.
    let port = url.rsplit(':').next().expect("port");
    let rebound = reqwest::Client::new()
        .get(format!("{url}/token/raw"))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .expect("send");
    assert_eq!(rebound.status(), 421);
    let text = rebound.text().await.expect("body");
    assert!(text.contains("host_not_allowed"), "{text}");

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

    let (mut authorize, _client_secret) = authorize(&fx, &fx.user.user_id);
    let mut child = common::Procs(vec![
        authorize
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start authorize"),
    ]);
    let stderr = child.0[0].stderr.take().expect("stderr");
    let stdout = child.0[0].stdout.take().expect("stdout");
    let url = common::first_line(stderr, Duration::from_secs(30), |l| l.starts_with("http"))
        .expect("authorize printed the URL to open");
    let said = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut all);
        all
    });
    // The "browser": follow the emulator's redirect back to the CLI's callback.
    let page = reqwest::get(&url)
        .await
        .expect("approve")
        .text()
        .await
        .expect("page");
    assert!(page.contains("authorised"), "{page}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0[0].try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "authorize never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let said = said.join().expect("stdout");
    assert!(status.success(), "{said}");
    assert!(said.contains("stored a new token pair"), "{said}");
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

/// A refused authorisation comes back on the redirect (RFC 6749 §4.1.2.1): `authorize` says
/// what was refused, with the server's description, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_authorisation_says_why() {
    let fx = token_fixture("cli-refused", Timings::default()).await;
    let before = fx.record().await;
    let log = tempfile::NamedTempFile::new().expect("log");
    let (mut authorize, _client_secret) = authorize(&fx, "nobody-of-this-app");
    let mut child = common::Procs(vec![
        authorize
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("start authorize"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        let text = std::fs::read_to_string(log.path()).expect("read log");
        if let Some(url) = text.lines().map(str::trim).find(|l| l.starts_with("http")) {
            break url.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "authorize printed no URL: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The "browser": the emulator refuses and redirects the error back to the CLI.
    let _ = reqwest::get(&url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0[0].try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "authorize never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let said = std::fs::read_to_string(log.path()).expect("read log");
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("authorisation refused: invalid_request: no such user for this client"),
        "{said}"
    );
    assert_eq!(
        fx.record().await.refresh_token,
        before.refresh_token,
        "nothing stored"
    );
}
