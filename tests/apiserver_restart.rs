//! The API server goes away and comes back (a crash, a control-plane upgrade): the controller's
//! watches recover, nobody calls Xero while the Secret cannot be claimed, and afterwards exactly
//! one call per expiry goes on. Runs on a control plane of its own, since it kills the API server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{Timings, connection};
use xero_proving_ground::controlplane::{ControlPlane, Options};
use xero_proving_ground::emulator::GraceReuse;

/// A control plane of this test's own (it kills its API server).
async fn own_control_plane() -> ControlPlane {
    ControlPlane::start(&Options {
        bin_dir: common::env().bin_dir.clone(),
        controller_manager: false,
        node: None,
    })
    .await
    .expect("own control plane")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_goes_on_after_the_api_server_restarts_with_one_call_per_expiry() {
    let mut cp = own_control_plane().await;
    let client = common::client_from(&cp.admin_kubeconfig).await;
    let timings = Timings {
        access_token: Duration::from_secs(3),
        grace: Duration::from_secs(60),
        clock_skew_secs: 1,
        lease_secs: 5,
    };
    let fx =
        common::token_fixture_on(client.clone(), "restart", timings, GraceReuse::SamePair).await;
    connection::create(&fx, "acme", &fx.secret, timings, serde_json::json!({})).await;
    let _controller = connection::start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;

    // A consumer asking for a token all along; it must never be handed an expired one.
    // After the restart: gets that succeeded, and errors after the first success (once the API
    // server answers again, every get must succeed).
    let (expired, errors, gets) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let back = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok_after, errors_after) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let consumer = {
        let refresher = fx
            .refresher("consumer-pod")
            .with_max_wait(Duration::from_secs(5));
        let (expired, errors, gets) = (expired.clone(), errors.clone(), gets.clone());
        let (back, ok_after, errors_after) = (back.clone(), ok_after.clone(), errors_after.clone());
        tokio::spawn(async move {
            loop {
                let result = refresher.get().await;
                let after = back.load(Ordering::Relaxed);
                match result {
                    Ok(t) if SystemTime::now() >= t.expires_at => {
                        expired.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) if after => {
                        ok_after.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if after && ok_after.load(Ordering::Relaxed) > 0 {
                            eprintln!("a get failed with the API server up: {e}");
                            errors_after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                gets.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = fx.record().await.rotation;
    let t = Instant::now();
    cp.restart_apiserver()
        .await
        .expect("the API server comes back");
    eprintln!("API server back after {:?}", t.elapsed());
    back.store(true, Ordering::Relaxed);

    // Three more expiries after the restart, with the watches re-established.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = fx.record().await.rotation;
        if now >= before + 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refreshing stopped after the restart: rotation {now}, was {before}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.abort();
    let report = fx.report().await;
    let chain = &report.chains[0];
    assert_eq!(report.broken_chains(), 0, "{report:?}");
    // One call per rotation; the one extra allowed is the protocol's recovery when a holder's
    // store waited out the restart past its claim and another party presented the same token
    // inside the grace period (a grace reuse, whose answer is then dropped).
    assert!(chain.grace_reuses <= 1, "{chain:?}");
    assert_eq!(
        report.counters.token_calls,
        chain.rotations + chain.grace_reuses,
        "one token call per rotation, the restart included: {report:?}"
    );
    assert_eq!(
        fx.record().await.rotation,
        chain.rotations,
        "every rotation stored once"
    );
    assert!(
        ok_after.load(Ordering::Relaxed) >= 10,
        "the consumer got tokens after the restart"
    );
    assert_eq!(
        errors_after.load(Ordering::Relaxed),
        0,
        "gets failed with the API server up"
    );
    assert_eq!(
        expired.load(Ordering::Relaxed),
        0,
        "expired tokens handed out"
    );
    assert!(gets.load(Ordering::Relaxed) > 0);
    let rec = fx.record().await;
    let token = rec.access_token.expect("an access token");
    assert!(
        fx.accepted_by_xero(token.expose()).await,
        "the stored token works"
    );
    eprintln!(
        "gets {} errors {} (errors are expected only while the API server was down)",
        gets.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
}

/// Secret requests (GET and WATCH) the API server has answered so far, from its metrics.
async fn secret_requests(client: &kube::Client) -> u64 {
    let text = client
        .request_text(
            http::Request::get("/metrics")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("the API server's metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"secrets\"")
                && (l.contains("verb=\"GET\"") || l.contains("verb=\"WATCH\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_watch_version_is_gone_does_not_spin() {
    use serde_json::json;
    use xero_operator::protocol::format as f;
    let mut cp = own_control_plane().await;
    let client = common::client_from(&cp.admin_kubeconfig).await;
    let fx = common::token_fixture_on(
        client.clone(),
        "gone",
        Timings::default(),
        GraceReuse::SamePair,
    )
    .await;
    // A holder that crashed with a long claim, on a Secret that then stays unchanged.
    let until = SystemTime::now() + Duration::from_secs(300);
    fx.patch(
        json!({}),
        json!({f::ANN_LEASE_DURATION: "600", f::ANN_HOLDER: "crashed",
            f::ANN_LEASE_EXPIRES: f::format_time(until)}),
    )
    .await;
    // Other writes move the cluster's revision on; a restarted API server's watch cache then
    // starts after the Secret's version, and a watch from it answers 410 Gone.
    for i in 0..5 {
        let other: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(json!({"metadata": {"name": format!("other-{i}")}}))
                .expect("secret");
        fx.secrets()
            .create(&Default::default(), &other)
            .await
            .expect("another write");
    }
    cp.restart_apiserver()
        .await
        .expect("the API server comes back");
    let client = common::client_from(&cp.admin_kubeconfig).await;
    // Precondition: a watch from the version the waiter will read is answered 410 Gone.
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), &fx.namespace);
    let gone = match common::first_watch_answer(&secrets, &fx.secret, async {}).await {
        Ok(kube::api::WatchEvent::Error(s)) | Err(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    };
    assert!(
        gone,
        "precondition: the Secret's version is gone from the watch cache"
    );
    let before = secret_requests(&client).await;
    let waited = xero_operator::protocol::Refresher::new(
        client.clone(),
        &fx.namespace,
        &fx.secret,
        "waiter",
        xero_operator::protocol::Role::Consumer,
    )
    .with_allowlist(fx.emulator.allowlist())
    .with_max_wait(Duration::from_secs(5))
    .get()
    .await;
    assert!(
        matches!(waited, Err(xero_operator::protocol::Error::Timeout(..))),
        "{waited:?}"
    );
    // The last watch is counted once it is closed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests = secret_requests(&client).await - before;
    eprintln!("Secret GET + WATCH requests of a 5 s wait: {requests}");
    assert!(
        requests <= 6,
        "{requests} Secret requests in a 5 s wait: the waiter spun on 410 Gone"
    );
    assert_eq!(fx.report().await.counters.token_calls, 0);
}

/// P34: the holder's store of a rotated pair meets an API server that is down; it is retried
/// until it lands, and the pair is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_meets_an_api_outage_is_retried_until_it_lands() {
    use xero_operator::redact::Sensitive;
    use xero_proving_ground::emulator::Faults;
    let mut cp = own_control_plane().await;
    let client = common::client_from(&cp.admin_kubeconfig).await;
    let timings = Timings {
        access_token: Duration::from_secs(60),
        lease_secs: 20,
        ..Timings::default()
    };
    let fx = common::token_fixture_on(client, "outage", timings, GraceReuse::SamePair).await;
    // Xero answers 4 s after it rotated.
    fx.set_faults(Faults {
        latency: Duration::from_secs(4),
        ..Faults::default()
    })
    .await;
    let pending = tokio::spawn({
        let r = fx.refresher("holder");
        async move { r.get().await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while fx.report().await.chains[0].rotations == 0 {
        assert!(Instant::now() < deadline, "Xero never rotated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.set_faults(Faults::default()).await;
    cp.kill_apiserver().expect("kill the API server");
    let killed_at = SystemTime::now();
    assert!(
        !pending.is_finished(),
        "precondition: the API server went down before the holder stored"
    );
    // Down until well after the answer reached the holder: its store fails and is retried.
    tokio::time::sleep(Duration::from_secs(7)).await;
    cp.start_apiserver()
        .await
        .expect("the API server comes back");
    let t = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the store landed")
        .expect("join")
        .expect("the rotated pair");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let rec = fx.record().await;
    assert_eq!(
        rec.access_token.as_ref().map(Sensitive::expose),
        Some(t.token.expose())
    );
    assert_eq!(
        (rec.rotation, rec.refreshed_by.as_deref(), rec.lease),
        (
            1,
            Some("holder"),
            xero_operator::protocol::format::Lease::None
        )
    );
    // The request was sent (refreshed-at) less than Xero's 4 s latency before the API server
    // went down, so the answer reached the holder while it was down: the store that landed was
    // a retry.
    let sent = rec.refreshed_at.expect("refreshed-at");
    assert!(
        killed_at.duration_since(sent).unwrap_or_default() < Duration::from_secs(4),
        "sent {:?} before the outage",
        killed_at.duration_since(sent)
    );
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, 1);
    assert!(!report.chains[0].broken);
}
