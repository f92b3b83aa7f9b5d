//! The API server goes away and comes back (a crash, a control-plane upgrade): the controller's
//! watches recover, nobody calls Xero while the Secret cannot be claimed, and afterwards exactly
//! one call per expiry goes on. Runs on a control plane of its own, since it kills the API server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{Timings, connection};
use xero_operator::controlplane::{ControlPlane, Options};
use xero_operator::emulator::GraceReuse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_goes_on_after_the_api_server_restarts_with_one_call_per_expiry() {
    let mut cp = ControlPlane::start(&Options {
        bin_dir: common::env().bin_dir.clone(),
        controller_manager: false,
    })
    .await
    .expect("own control plane");
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
    let (expired, errors, gets) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let consumer = {
        let refresher = fx
            .refresher("consumer-pod")
            .with_max_wait(Duration::from_secs(5));
        let (expired, errors, gets) = (expired.clone(), errors.clone(), gets.clone());
        tokio::spawn(async move {
            loop {
                match refresher.get().await {
                    Ok(t) if SystemTime::now() >= t.expires_at => {
                        expired.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
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
    let rotations: u64 = report.chains.iter().map(|c| c.rotations).sum();
    assert_eq!(report.broken_chains(), 0, "{report:?}");
    assert_eq!(
        report.counters.token_calls, rotations,
        "one token call per rotation, the restart included: {report:?}"
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
