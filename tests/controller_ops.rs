//! The controller in operation: two replicas with leader election, the per-app token bucket,
//! deletion (revoke, keep), a missing CRD, the metrics and health endpoints, and bad inputs that
//! must end in a named condition, never a panic or a hot loop.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Timings, connection, token_fixture};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format as f;
use xero_proving_ground::emulator::{FaultKind, Faults};

/// The operator for the fixture's namespace, allowed to call its emulator, metrics on a port of
/// its own choosing.
fn operator_command(fx: &common::TokenFixture, identity: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xero-operator"));
    cmd.args([
        "--namespace",
        &fx.namespace,
        "--metrics-addr",
        "127.0.0.1:0",
        "--identity",
        identity,
    ])
    .arg(format!(
        "--allowed-endpoint-hosts={}",
        fx.emulator.allowed_host()
    ))
    .args(extra)
    .env("KUBECONFIG", &common::env().admin_kubeconfig)
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn operator(fx: &common::TokenFixture, identity: &str, extra: &[&str]) -> Child {
    operator_command(fx, identity, extra)
        .spawn()
        .expect("start xero-operator")
}

/// The emulator's report once no token call is in flight (every call counted has an outcome).
async fn settled_report(fx: &common::TokenFixture) -> xero_proving_ground::emulator::Report {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = fx.report().await;
        let answered: u64 = report.counters.token_outcomes.values().sum();
        if answered == report.counters.token_calls {
            return report;
        }
        assert!(Instant::now() < deadline, "a token call never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops an operator as Kubernetes does (SIGTERM) and waits for it to exit, at most 30 s (then
/// it is killed and the test fails).
async fn terminate(child: &mut Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: signalling our own child, which has not been waited for yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the operator did not stop within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_leader_calls_xero_and_the_other_takes_over() {
    let timings = Timings::default();
    let fx = token_fixture("ops-leader", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    // A 12 s lease renewed 4 s before it ends: a busy machine does not make it change hands.
    let lease = [
        "--leader-election",
        "--lease-namespace",
        &fx.namespace,
        "--lease-name",
        "xo-test",
        "--lease-seconds",
        "12",
    ];
    let mut a = common::Procs(vec![operator(&fx, "controller/a", &lease)]);
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    let mut b = common::Procs(vec![operator(&fx, "controller/b", &lease)]);
    // Three rotations with both replicas up: every one the leader's, one call each.
    let start_rotation = fx.record().await.rotation;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rec = fx.record().await;
        if rec.rotation > start_rotation {
            assert_eq!(rec.refreshed_by.as_deref(), Some("controller/a"));
        }
        if rec.rotation >= start_rotation + 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the leader stopped refreshing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = settled_report(&fx).await;
    let chain = &report.chains[0];
    assert_eq!(
        (report.counters.token_calls, chain.grace_reuses),
        (chain.rotations, 0),
        "one call per rotation while both run"
    );
    // Kill the leader, possibly between Xero's answer and the store: the follower takes over
    // once the lease runs out.
    let _ = a.0[0].kill();
    let _ = a.0[0].wait();
    a.0.clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fx.record().await.refreshed_by.as_deref() != Some("controller/b") {
        assert!(Instant::now() < deadline, "the follower never took over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    terminate(&mut b.0[0]).await;
    b.0.clear();
    let report = settled_report(&fx).await;
    let chain = &report.chains[0];
    // The only extra call allowed is the protocol's recovery of a rotation the killed leader
    // got from Xero but never stored: the same refresh token presented once more, inside the
    // grace period (a grace reuse). Nothing else: no second caller, no fork, no dead token.
    assert!(chain.grace_reuses <= 1, "{chain:?}");
    assert_eq!(
        report.counters.token_calls,
        chain.rotations + chain.grace_reuses,
        "{chain:?}"
    );
    assert_eq!(
        (
            chain.forks,
            chain.dead_token_uses,
            chain.head_rejections,
            chain.broken
        ),
        (0, 0, 0, false),
        "{chain:?}"
    );
    assert_eq!(
        fx.record().await.rotation,
        chain.rotations,
        "every rotation stored once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_app_token_bucket_holds_back_a_storm() {
    let timings = Timings::default();
    let fx = token_fixture("ops-gate", timings).await;
    // Three connections of one app; a bucket of one call a minute lets exactly one through.
    for (name, secret) in [
        ("one", "one-token"),
        ("two", "two-token"),
        ("three", "three-token"),
    ] {
        // Made by a person before the connection: the label opts it in for that connection.
        opted_in_token_secret(&fx, secret, name).await;
        connection::create(&fx, name, secret, timings, json!({})).await;
    }
    let _controller = connection::start_controller(&fx, |ctx| {
        ctx.gate = Some(xero_operator::protocol::gate::AppGate::per_minute(
            std::num::NonZeroU32::new(1).expect("1"),
        ));
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ready = 0;
        for name in ["one", "two", "three"] {
            if connection::ready_reason(&fx, name).await.as_deref() == Some("TokenValid") {
                ready += 1;
            }
        }
        if ready >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no connection became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fx.report().await.counters.token_calls,
        1,
        "the bucket let only one call through"
    );
}

/// A token Secret `name` holding the refresh token of a new emulator user, opted in for the
/// connection `connection` by its label (as a person hands a Secret to the operator).
async fn opted_in_token_secret(fx: &common::TokenFixture, name: &str, connection: &str) {
    let user = fx
        .emulator
        .admin()
        .add_user(&Default::default())
        .await
        .expect("user");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {f::LABEL_CONNECTION: connection}},
        "stringData": {f::REFRESH_TOKEN: user.refresh_token}}))
    .expect("s");
    fx.secrets()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create");
}

/// Waits (up to a minute) until the garbage collector has deleted the Secret `name`.
async fn wait_until_collected(fx: &common::TokenFixture, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while fx.secrets().get_opt(name).await.expect("get").is_some() {
        assert!(
            Instant::now() < deadline,
            "token Secret {name} was never garbage-collected"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether the connection `name` carries the operator's finalizer.
async fn has_finalizer(conns: &Api<XeroConnection>, name: &str) -> bool {
    conns
        .get(name)
        .await
        .expect("get")
        .finalizers()
        .contains(&xero_operator::controller::FINALIZER.to_owned())
}

/// A connection with nothing to do on delete carries no finalizer (one left by an earlier
/// version is removed), so it is deleted at once even with no operator running, and its token
/// Secret goes with it (owner reference); one with `revokeOnDelete` waits for the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_connection_with_work_on_delete_waits_for_the_operator() {
    let timings = Timings::default();
    let fx = token_fixture("ops-finalizer", timings).await;
    opted_in_token_secret(&fx, "revoking-token", "revoking").await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    connection::create(
        &fx,
        "revoking",
        "revoking-token",
        timings,
        json!({"revokeOnDelete": true}),
    )
    .await;
    let conns: Api<XeroConnection> = Api::namespaced(fx.client.clone(), &fx.namespace);
    // As an earlier version left every connection.
    conns
        .patch(
            "acme",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"finalizers": [xero_operator::controller::FINALIZER]}}),
            ),
        )
        .await
        .expect("add the old finalizer");
    let controller = common::Procs(vec![operator(&fx, "controller/fin", &[])]);
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    connection::wait_for_reason(&fx, "revoking", "TokenValid", Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while has_finalizer(&conns, "acme").await || !has_finalizer(&conns, "revoking").await {
        assert!(
            Instant::now() < deadline,
            "acme keeps, or revoking lacks, the finalizer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(controller);

    // No operator now.
    for name in ["acme", "revoking"] {
        conns
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while conns.get_opt("acme").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "acme was not deleted at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until_collected(&fx, &fx.secret).await;
    let revoking = conns.get("revoking").await.expect("still there");
    assert!(
        revoking.metadata.deletion_timestamp.is_some(),
        "revoking waits for the operator to revoke"
    );
    assert_eq!(fx.report().await.counters.revocation_calls, 0);
    // The operator back: it revokes, and the connection goes.
    let _controller = common::Procs(vec![operator(&fx, "controller/fin2", &[])]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while conns.get_opt("revoking").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "revoking was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second revocation would come from a trigger queued meanwhile: give it time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fx.report().await.counters.revocation_calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_connection_revokes_if_asked_and_keeps_the_secret_if_asked() {
    let timings = Timings::default();
    let fx = token_fixture("ops-delete", timings).await;
    connection::create(
        &fx,
        "acme",
        &fx.secret,
        timings,
        json!({"revokeOnDelete": true}),
    )
    .await;
    opted_in_token_secret(&fx, "kept-token", "keeper").await;
    // Owned at first (so that it carries our owner reference), kept when asked later.
    connection::create(&fx, "keeper", "kept-token", timings, json!({})).await;
    let _controller = common::Procs(vec![operator(&fx, "controller/del", &[])]);
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    connection::wait_for_reason(&fx, "keeper", "TokenValid", Duration::from_secs(30)).await;
    let conns: Api<XeroConnection> = Api::namespaced(fx.client.clone(), &fx.namespace);
    let keeper_uid = conns.get("keeper").await.expect("keeper").metadata.uid;
    let owned = fx.secrets().get("kept-token").await.expect("kept");
    assert!(
        owned
            .metadata
            .owner_references
            .unwrap_or_default()
            .iter()
            .any(|o| Some(&o.uid) == keeper_uid.as_ref()),
        "precondition: the Secret carries the connection's owner reference"
    );
    conns
        .patch(
            "keeper",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"keepTokenSecretOnDelete": true}})),
        )
        .await
        .expect("ask to keep the Secret");
    // Kept from the moment the connection carries the finalizer (as the field's docs say).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !conns
        .get("keeper")
        .await
        .expect("keeper")
        .finalizers()
        .contains(&xero_operator::controller::FINALIZER.to_owned())
    {
        assert!(Instant::now() < deadline, "the finalizer was never added");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    conns
        .delete("acme", &DeleteParams::default())
        .await
        .expect("delete");
    conns
        .delete("keeper", &DeleteParams::default())
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(60);
    while conns.get_opt("acme").await.expect("get").is_some()
        || conns.get_opt("keeper").await.expect("get").is_some()
    {
        assert!(Instant::now() < deadline, "the finalizer never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = fx.report().await;
    assert_eq!(report.counters.revocation_calls, 1, "revoked exactly once");
    assert!(
        report
            .chains
            .iter()
            .any(|c| c.ended == Some(xero_proving_ground::emulator::state::FamilyEnd::Revoked))
    );
    // The owned Secret is garbage-collected; the kept one stays, without our owner reference.
    wait_until_collected(&fx, &fx.secret).await;
    // The kept Secret is released: no owner reference, no label, no uid mark; its tokens stay.
    let kept = fx.secrets().get("kept-token").await.expect("kept");
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
    assert!(
        !kept
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key(f::LABEL_CONNECTION)
    );
    assert!(
        !kept
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(xero_operator::controller::ownership::ANN_CONNECTION_UID)
    );
    assert!(kept.data.is_some_and(|d| d.contains_key(f::REFRESH_TOKEN)));
}

#[test]
fn without_the_crd_the_controller_exits_with_a_clear_message() {
    // A control plane of its own, where the CRD was never installed.
    let out = Command::new(common::proving_ground_bin("xero-controlplane"))
        .args([
            "--no-controller-manager",
            "--",
            env!("CARGO_BIN_EXE_xero-operator"),
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("XERO_CONTROLPLANE_BIN_DIR", &common::env().bin_dir)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the XeroConnection CRD is not installed: run `kubectl apply -f crds/`"),
        "{stderr}"
    );
}

/// The value of the sample `series` (name and labels exactly as exposed) in a scrape.
fn sample_opt(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn sample(metrics: &str, series: &str) -> f64 {
    sample_opt(metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

/// Like [`sample`], but a series not exposed yet counts as 0.
fn sample_or_zero(metrics: &str, series: &str) -> f64 {
    sample_opt(metrics, series).unwrap_or(0.0)
}

/// Forces one refresh by the controller and waits until its status records it.
async fn force_refresh(fx: &common::TokenFixture, conns: &Api<XeroConnection>) {
    let before = fx.record().await.rotation;
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = conns.get("acme").await.expect("get").status;
        if status.is_some_and(|s| s.refresh_count > before) {
            return;
        }
        assert!(Instant::now() < deadline, "the controller never refreshed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints_answer() {
    // Long tokens: nothing refreshes unless the test forces it.
    let timings = Timings {
        access_token: Duration::from_secs(60),
        ..Timings::default()
    };
    let fx = token_fixture("ops-metrics", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    // Port 0: the operator binds a free port itself and logs it (no port handed over).
    let mut child = operator_command(&fx, "controller/m", &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start");
    // The operator logs to stdout.
    let log = child.stdout.take().expect("stdout");
    let _controller = common::Procs(vec![child]);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(log).lines() {
            let Ok(line) = line else { break };
            if line.contains("serving /metrics")
                && let Some(addr) = line.split("addr=").nth(1)
            {
                let _ = addr_tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .expect("join")
        .expect("the operator logged its metrics address");
    let base = format!("http://{addr}");
    let scrape = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            reqwest::get(format!("{base}{path}"))
                .await
                .expect(path)
                .status(),
            200,
            "{path}"
        );
    }
    // Two refreshes forced between two scrapes move the counters by exactly two.
    let refreshes = "xero_operator_refreshes_total{actor=\"controller\",result=\"ok\"}";
    let durations = "xero_operator_token_endpoint_seconds_count";
    let reconciles = "xero_operator_reconciles_total";
    let before = scrape().await;
    let conns = connection::api(&fx);
    force_refresh(&fx, &conns).await;
    force_refresh(&fx, &conns).await;
    let after = scrape().await;
    for (series, moved) in [(refreshes, 2.0), (durations, 2.0)] {
        assert_eq!(
            sample(&after, series) - sample_or_zero(&before, series),
            moved,
            "{series}"
        );
    }
    assert!(sample(&after, reconciles) >= sample(&before, reconciles) + 2.0);
    let until_expiry = sample(
        &after,
        &format!(
            "xero_operator_seconds_until_expiry{{namespace=\"{}\",name=\"acme\"}}",
            fx.namespace
        ),
    );
    assert!(
        (40.0..=60.0).contains(&until_expiry),
        "seconds until expiry: {until_expiry}"
    );
    // What the chart's alerts read: the Ready reason, both timestamps, the app's budget.
    let ns = &fx.namespace;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert_eq!(
        sample(
            &after,
            &format!(
                "xero_operator_connection_condition{{namespace=\"{ns}\",name=\"acme\",reason=\"TokenValid\"}}"
            )
        ),
        1.0
    );
    let expiry = sample(
        &after,
        &format!(
            "xero_operator_access_token_expiry_timestamp_seconds{{namespace=\"{ns}\",name=\"acme\"}}"
        ),
    );
    assert!(
        (now + 30.0..=now + 70.0).contains(&expiry),
        "{expiry} vs {now}"
    );
    let refreshed = sample(
        &after,
        &format!(
            "xero_operator_last_refresh_timestamp_seconds{{namespace=\"{ns}\",name=\"acme\"}}"
        ),
    );
    assert!(
        (now - 30.0..=now + 1.0).contains(&refreshed),
        "{refreshed} vs {now}"
    );
    assert_eq!(
        sample(&after, "xero_operator_app_calls_limit_per_minute"),
        1000.0
    );
    assert!(
        after.contains("xero_operator_app_permits_total{app=\""),
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_answers_from_xero_end_in_a_named_condition_without_a_hot_loop() {
    let timings = Timings::default();
    let fx = token_fixture("ops-bad", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let _controller = common::Procs(vec![operator(&fx, "controller/bad", &[])]);
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    for kind in [
        FaultKind::Html,
        FaultKind::TruncatedJson,
        FaultKind::NoAccessToken,
        FaultKind::ExpiresInZero,
        FaultKind::ExpiresInYear,
    ] {
        let rt_before = fx.record().await.refresh_token;
        fx.set_faults(Faults {
            script: std::iter::repeat_n(kind, 500).collect(),
            ..Faults::default()
        })
        .await;
        fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
            .await;
        connection::wait_for_reason(&fx, "acme", "XeroUnavailable", Duration::from_secs(30)).await;
        let calls = fx.report().await.counters.token_calls;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let more = fx.report().await.counters.token_calls - calls;
        assert!(more <= 15, "{kind:?}: {more} calls in 5 s is a hot loop");
        assert_eq!(
            fx.record().await.refresh_token,
            rt_before,
            "{kind:?}: the refresh token is intact"
        );
        fx.set_faults(Faults::default()).await;
        connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
    }
    assert!(!fx.report().await.chains[0].broken);
}
