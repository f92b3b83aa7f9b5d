//! No retry storms: an error that retrying cannot fix stops the calls, and a Xero that
//! keeps failing is called a bounded number of times, by the controller alone, over minutes.
//!
//! Three connections, each with its own emulator failing permanently in one way, run under one
//! in-process controller each for `WINDOW`; the token calls each emulator received are held to
//! the documented bounds (`docs/operating.md`, "Failures and retries"), and `Ready` is never True meanwhile.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::{Timings, connection, token_fixture};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::protocol::format as f;
use xero_proving_ground::emulator::{Endpoint, FaultKind, Faults};

/// How long each failing connection runs: three minutes, the window the bounds are stated for.
const WINDOW: Duration = Duration::from_secs(180);
/// At most this many token calls in `WINDOW` for an error only a configuration change can fix.
const MAX_CALLS_PERMANENT: u64 = 3;
/// At most this many for a Xero that answers 503 all along (retries within each claim, then a
/// backoff across claims of 10 s doubling to 5 minutes).
const MAX_CALLS_UNAVAILABLE: u64 = 40;

/// Always the same fault on the token endpoint.
fn always(kind: FaultKind) -> Faults {
    Faults {
        script: VecDeque::from(vec![kind; 10_000]),
        endpoints: vec![Endpoint::Token],
        ..Faults::default()
    }
}

/// Runs one failing connection for `WINDOW` with a claim of `lease_secs`; returns the token
/// calls and the Ready reasons seen.
async fn run_failing(hint: &str, setup: Setup, lease_secs: u64) -> (u64, Vec<String>) {
    let timings = Timings {
        lease_secs,
        ..Timings::default()
    };
    let fx = token_fixture(hint, timings).await;
    common::install_crds(&fx.client).await;
    if let Setup::WrongClientSecret = setup {
        let wrong: Secret = serde_json::from_value(json!({
            "metadata": {"name": "xero-app", "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
            "stringData": {"client_id": xero_proving_ground::emulator::DEFAULT_CLIENT_ID,
                "client_secret": "not-the-secret"},
        }))
        .expect("secret");
        fx.secrets()
            .create(&PostParams::default(), &wrong)
            .await
            .expect("wrong client Secret");
    }
    if let Setup::Fault(kind) = setup {
        fx.set_faults(always(kind)).await;
    }
    // A port where nothing listens: the connection is refused, nothing ever reaches Xero.
    let refused_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let extra = match setup {
        Setup::Refused => json!({"endpoints": {
            "tokenUrl": format!("http://127.0.0.1:{refused_port}/connect/token"),
            "connectionsUrl": fx.emulator.connections_url(),
            "revocationUrl": fx.emulator.revocation_url()}}),
        _ => json!({}),
    };
    connection::create(&fx, "acme", &fx.secret, timings, extra).await;
    let allowlist = fx.emulator.allowlist().with("127.0.0.1", refused_port);
    let controller = connection::start_controller_as(&fx.client, &fx.namespace, allowlist, |_| {});
    let started = Instant::now();
    let mut reasons = Vec::new();
    while started.elapsed() < WINDOW {
        if let Ok(conn) = connection::api(&fx).get("acme").await
            && let Some(ready) = conn
                .status
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        {
            assert_eq!(
                ready.status, "False",
                "{hint}: Ready was True ({}) while Xero failed",
                ready.reason
            );
            // A first Refreshing is the controller saying it is getting the first token
            // (while the failing calls are retried); the reasons after it are the outcome.
            let announcing = reasons.is_empty() && ready.reason == "Refreshing";
            if !announcing && reasons.last() != Some(&ready.reason) {
                reasons.push(ready.reason);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let calls = match setup {
        // Nothing reaches the emulator: the calls the controller made.
        Setup::Refused => controller.metrics.token_calls.get(),
        _ => fx.report().await.counters.token_calls,
    };
    if let Setup::WrongClientSecret = setup {
        // The fix: the right secret. The controller copies it, which lifts the stop marker.
        fx.secrets()
            .patch(
                "xero-app",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {
                    "client_secret": xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET}})),
            )
            .await
            .expect("fix the client Secret");
        connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
        let rec = fx.record().await;
        assert!(
            rec.stopped_for.is_none(),
            "a stored refresh clears the stop"
        );
    }
    (calls, reasons)
}

#[derive(Clone, Copy)]
enum Setup {
    WrongClientSecret,
    Fault(FaultKind),
    /// The token endpoint refuses connections.
    Refused,
}

/// The production default lease, and the CRD's longest.
const LEASES: [u64; 2] = [30, 600];
/// At most this many calls in `WINDOW` when Xero cannot be reached at all (one call per claim).
const MAX_CALLS_REFUSED: u64 = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_retrying_cannot_fix_stops_the_calls_and_failures_back_off() {
    let (invalid_client, invalid_request, unavailable, leases) = tokio::join!(
        run_failing("retry-client", Setup::WrongClientSecret, 5),
        run_failing("retry-request", Setup::Fault(FaultKind::InvalidRequest), 5),
        run_failing("retry-503", Setup::Fault(FaultKind::Unavailable), 5),
        // At the production default lease and the CRD's longest: the bound is per claim's
        // calls, not per claim's length.
        futures_util::future::join_all(LEASES.iter().flat_map(|&lease| {
            [
                run_failing(
                    "retry-503-lease",
                    Setup::Fault(FaultKind::Unavailable),
                    lease,
                ),
                run_failing("retry-refused", Setup::Refused, lease),
            ]
        })),
    );
    for (i, &lease) in LEASES.iter().enumerate() {
        let (unavailable, refused) = (&leases[2 * i], &leases[2 * i + 1]);
        println!("lease {lease} s: 503 {unavailable:?}, refused {refused:?}");
        assert!(
            (2..=MAX_CALLS_UNAVAILABLE).contains(&unavailable.0),
            "503 with a {lease} s lease: {} token calls in {WINDOW:?}",
            unavailable.0
        );
        assert_eq!(unavailable.1, ["XeroUnavailable"], "lease {lease} s");
        assert!(
            (2..=MAX_CALLS_REFUSED).contains(&refused.0),
            "refused with a {lease} s lease: {} calls in {WINDOW:?}",
            refused.0
        );
        assert_eq!(refused.1, ["XeroUnavailable"], "lease {lease} s");
    }
    println!("invalid_client: {invalid_client:?}");
    println!("invalid_request: {invalid_request:?}");
    println!("503: {unavailable:?}");
    assert!(
        (1..=MAX_CALLS_PERMANENT).contains(&invalid_client.0),
        "invalid_client: {} token calls in {WINDOW:?}",
        invalid_client.0
    );
    assert_eq!(invalid_client.1, ["InvalidClientCredentials"]);
    assert!(
        (1..=MAX_CALLS_PERMANENT).contains(&invalid_request.0),
        "invalid_request: {} token calls in {WINDOW:?}",
        invalid_request.0
    );
    assert_eq!(invalid_request.1, ["RequestRefused"]);
    assert!(
        (2..=MAX_CALLS_UNAVAILABLE).contains(&unavailable.0),
        "503: {} token calls in {WINDOW:?}",
        unavailable.0
    );
    assert_eq!(unavailable.1, ["XeroUnavailable"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_honours_the_stop_and_the_backoff_in_the_secret() {
    let timings = Timings::default();
    let fx = token_fixture("retry-consumer", timings).await;
    // unauthorized_client: stopped for these credentials; the consumer makes no call.
    fx.set_faults(always(FaultKind::UnauthorizedClient)).await;
    let worker = fx
        .refresher("worker-1")
        .with_max_wait(Duration::from_secs(2));
    let first = worker.get().await;
    assert!(
        matches!(&first, Err(xero_operator::protocol::Error::Stopped { code, .. }) if code == "unauthorized_client"),
        "{first:?}"
    );
    assert_eq!(first.as_ref().err().map(|e| e.exit_code()), Some(8));
    let calls = fx.report().await.counters.token_calls;
    for n in 2..6 {
        let again = fx.refresher(&format!("worker-{n}")).get().await;
        assert!(matches!(
            again,
            Err(xero_operator::protocol::Error::Stopped { .. })
        ));
    }
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "no call after the stop"
    );
    // A new refresh token (a person authorised again) lifts it.
    fx.set_faults(Faults::default()).await;
    let user = fx
        .emulator
        .admin()
        .add_user(&Default::default())
        .await
        .expect("user");
    fx.patch(
        json!({f::REFRESH_TOKEN: user.refresh_token.expect("rt")}),
        json!({}),
    )
    .await;
    fx.refresher("worker-7")
        .get()
        .await
        .expect("a new refresh token lifts the stop");

    // 503 through a whole claim: the release carries a backoff every party honours.
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    fx.set_faults(always(FaultKind::Unavailable)).await;
    let failed = fx.refresher("worker-8").get().await;
    assert!(
        matches!(failed, Err(xero_operator::protocol::Error::Xero(_))),
        "{failed:?}"
    );
    let rec = fx.record().await;
    assert_eq!(rec.failed_attempts, 1);
    let not_before = rec.retry_not_before.expect("a backoff is stored");
    assert!(not_before > std::time::SystemTime::now() + Duration::from_secs(3));
    let calls = fx.report().await.counters.token_calls;
    let waiting = fx
        .refresher("worker-9")
        .with_max_wait(Duration::from_secs(1))
        .get()
        .await;
    assert!(
        matches!(
            waiting,
            Err(xero_operator::protocol::Error::BackingOff { failures: 1, .. })
        ),
        "{waiting:?}"
    );
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "no call before retry-not-before"
    );
}
