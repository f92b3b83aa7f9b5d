//! One tenant never hurts another, and the status follows the token (docs/security.md, "One
//! operator, many tenants"): against the real API server and the emulator, with an in-process
//! controller at the production defaults unless a test says otherwise.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{Timings, TokenFixture, connection, token_fixture};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format as f;
use xero_proving_ground::emulator::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Endpoint, FaultKind, Faults, NewUser,
};

/// A second Xero app of the emulator.
const APP_Y: (&str, &str) = ("app-y", "app-y-secret");

/// A client Secret `name` in `ns` holding `app`, opted in.
async fn client_secret(client: &Client, ns: &str, name: &str, app: (&str, &str)) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
        "stringData": {"client_id": app.0, "client_secret": app.1}}))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("client Secret");
}

/// Connection `name` in `ns` of the app in client Secret `app_secret`: its token Secret is
/// opted in and holds a new emulator user's refresh token of `client_id`.
async fn connection_of(
    fx: &TokenFixture,
    ns: &str,
    name: &str,
    app_secret: &str,
    client_id: &str,
    timings: Timings,
) {
    let user = fx
        .emulator
        .admin()
        .add_user(&NewUser {
            client_id: Some(client_id.to_owned()),
            ..NewUser::default()
        })
        .await
        .expect("user");
    let token: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-xero-token"), "labels": {f::LABEL_CONNECTION: name}},
        "stringData": {f::REFRESH_TOKEN: user.refresh_token}}))
    .expect("token Secret");
    Api::<Secret>::namespaced(fx.client.clone(), ns)
        .create(&PostParams::default(), &token)
        .await
        .expect("token Secret");
    let conn: XeroConnection = serde_json::from_value(json!({
        "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
        "metadata": {"name": name},
        "spec": {
            "clientSecretRef": {"name": app_secret},
            "refresh": {"clockSkewSeconds": timings.clock_skew_secs, "leaseDurationSeconds": timings.lease_secs},
            "endpoints": {"tokenUrl": fx.emulator.token_url(), "connectionsUrl": fx.emulator.connections_url()},
        }}))
    .expect("connection");
    Api::<XeroConnection>::namespaced(fx.client.clone(), ns)
        .create(&PostParams::default(), &conn)
        .await
        .expect("connection");
}

async fn record(client: &Client, ns: &str, secret: &str) -> f::TokenRecord {
    f::TokenRecord::from_secret(
        &Api::<Secret>::namespaced(client.clone(), ns)
            .get(secret)
            .await
            .expect("token Secret"),
    )
}

async fn ready_of(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let conn = Api::<XeroConnection>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?;
    conn.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status, c.reason))
}

async fn wait_ready(client: &Client, ns: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready_of(client, ns, name).await.map(|r| r.1).as_deref() != Some("TokenValid") {
        assert!(Instant::now() < deadline, "{ns}/{name} never became Ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Expires a connection's token, as a consumer may (a protocol field).
async fn expire(client: &Client, ns: &str, secret: &str) -> bool {
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            secret,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00.000Z"}})),
        )
        .await
        .is_ok()
}

/// A consumer that expires its token again and again spends at most one of the controller's
/// calls a minute (the production default), and the connection says so meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_expiring_its_token_costs_the_controller_one_call_a_minute() {
    let timings = Timings {
        access_token: Duration::from_secs(1800),
        ..Timings::default()
    };
    let fx = token_fixture("iso-interval", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    // The production default interval (start_controller changes only the recheck).
    let controller = connection::start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    let calls = controller.metrics.token_calls.get();
    assert_eq!(calls, 1, "the first token");
    // Three ways to make the controller refresh again: an expired token; a new access token
    // (the pair looks new); a claim in the controller's own name (a Refresh, not a Claim).
    let started = Instant::now();
    let mut expired = 0;
    let secrets: Api<Secret> = fx.secrets();
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(20) {
        round += 1;
        let lease = f::format_time(SystemTime::now() + Duration::from_secs(20));
        let patch = match round % 3 {
            0 => json!({"stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00.000Z"}}),
            1 => json!({"stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00.000Z",
                f::ACCESS_TOKEN: format!("forged-{round}")}}),
            _ => json!({"stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00.000Z"},
                "metadata": {"annotations": {f::ANN_HOLDER: connection::CONTROLLER_ID,
                    f::ANN_LEASE_EXPIRES: lease}}}),
        };
        if secrets
            .patch(&fx.secret, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .is_ok()
        {
            expired += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = controller.metrics.token_calls.get() - calls;
    println!("{expired} forced refreshes in 20 s cost the controller {during} token calls");
    assert!(expired > 20, "{expired}");
    assert!(
        during <= 1,
        "{during} controller calls for one connection within a minute"
    );
    // Not Ready meanwhile, and why.
    let (status, reason) = ready_of(&fx.client, &fx.namespace, "acme")
        .await
        .expect("Ready");
    assert_eq!(status, "False", "{reason}");
}

/// One namespace's connections of app X, re-expired continuously by their consumer under a
/// tight cap on app X, take neither the reconcile slots nor app Y's calls nor another
/// namespace's share of app X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_one_app_slows_neither_another_app_nor_another_namespace() {
    let timings = Timings {
        access_token: Duration::from_secs(20),
        ..Timings::default()
    };
    let fx = token_fixture("iso-storm", timings).await;
    common::install_crds(&fx.client).await;
    fx.emulator
        .admin()
        .add_client(APP_Y.0, APP_Y.1)
        .await
        .expect("app Y");
    let storm_ns = fx.namespace.clone();
    let other_ns = common::namespace(&fx.client, "iso-other").await;
    let app_x = (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET);
    client_secret(&fx.client, &storm_ns, "app-x", app_x).await;
    client_secret(&fx.client, &other_ns, "app-x", app_x).await;
    client_secret(&fx.client, &other_ns, "app-y", APP_Y).await;
    let storm: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    for name in &storm {
        connection_of(&fx, &storm_ns, name, "app-x", DEFAULT_CLIENT_ID, timings).await;
    }
    connection_of(&fx, &other_ns, "bx", "app-x", DEFAULT_CLIENT_ID, timings).await;
    connection_of(&fx, &other_ns, "by", "app-y", APP_Y.0, timings).await;
    // App X capped at 12 calls a minute (6 per namespace); four reconcile slots, fewer than
    // the storming connections, so that slots held waiting for permits would show; the per-connection interval out of the
    // way (a_consumer_expiring_its_token_costs_the_controller_one_call_a_minute has it).
    let _controller = connection::start_controller_for(
        &fx.client,
        &[&storm_ns, &other_ns],
        fx.emulator.allowlist(),
        |ctx| {
            ctx.gate = Some(xero_operator::protocol::gate::AppGate::per_minute(
                std::num::NonZeroU32::new(12).expect("12"),
            ));
            ctx.concurrency = 4;
            ctx.min_call_interval = Duration::from_secs(1);
        },
    );
    wait_ready(&fx.client, &other_ns, "bx").await;
    wait_ready(&fx.client, &other_ns, "by").await;
    // The storm: every connection of the storming namespace expired again and again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storming = {
        let (client, ns, stop) = (fx.client.clone(), storm_ns.clone(), stop.clone());
        let secrets: Vec<String> = storm.iter().map(|n| format!("{n}-xero-token")).collect();
        tokio::spawn(async move {
            let mut writes = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for s in &secrets {
                    writes += u32::from(expire(&client, &ns, s).await);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            writes
        })
    };
    // Through one expiry of each of the other namespace's tokens: the lag of each refresh
    // after its token stopped being usable.
    let lag_of = |name: &'static str| {
        let (client, ns) = (fx.client.clone(), other_ns.clone());
        async move {
            let secret = format!("{name}-xero-token");
            let before = record(&client, &ns, &secret).await;
            let usable_end = before.usable_until().expect("a usable token");
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let now = record(&client, &ns, &secret).await;
                if now.rotation > before.rotation {
                    let at = now.refreshed_at.expect("refreshed-at");
                    return at.duration_since(usable_end).unwrap_or_default();
                }
                assert!(Instant::now() < deadline, "{name} was never refreshed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (lag_y, lag_x) = tokio::join!(lag_of("by"), lag_of("bx"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = storming.await.expect("storm");
    println!(
        "storm: {writes} expiries; another app's connection refreshed {lag_y:?} after due, \
         another namespace's of the same app {lag_x:?}"
    );
    assert!(writes > 50, "{writes}");
    assert!(lag_y <= Duration::from_secs(1), "app Y waited {lag_y:?}");
    // Its namespace's share of app X (6 a minute): its turn comes at once (its only due
    // connection), then the app's next free call, which the storm can take at most once per
    // its own share's period (12 s): two of the app's periods (5.5 s each) at the worst. A
    // gate without shares queues it behind the storm's eight (about 44 s).
    assert!(
        lag_x <= Duration::from_secs(20),
        "the other namespace waited {lag_x:?}"
    );
}

/// While a refresh keeps failing (Xero never answers; each call is cut after 10 s, three per
/// claim), `Ready` turns False within a second of the token's usable end, at the CRD's longest
/// lease, not when the claim's retries end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_false_within_a_second_of_expiry_while_the_refresh_fails() {
    let timings = Timings {
        access_token: Duration::from_secs(10),
        lease_secs: 600,
        ..Timings::default()
    };
    let fx = token_fixture("iso-expiry", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let _controller = connection::start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    fx.set_faults(Faults {
        script: vec![FaultKind::Timeout; 100].into(),
        endpoints: vec![Endpoint::Token],
        ..Faults::default()
    })
    .await;
    let usable_end = fx.record().await.usable_until().expect("usable");
    let deadline = Instant::now() + Duration::from_secs(30);
    let turned = loop {
        let (status, reason) = ready_of(&fx.client, &fx.namespace, "acme")
            .await
            .expect("Ready");
        if status == "False" {
            break (SystemTime::now(), reason);
        }
        assert!(Instant::now() < deadline, "Ready stayed True");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lag = turned.0.duration_since(usable_end).unwrap_or_default();
    println!(
        "Ready turned False ({}) {lag:?} after the usable end",
        turned.1
    );
    assert_eq!(turned.1, "TokenExpired");
    assert!(lag <= Duration::from_secs(1), "{lag:?}");
    assert!(
        turned.0 >= usable_end,
        "False only once the token stopped being usable"
    );
}
