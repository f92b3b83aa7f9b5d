//! The controller against the real API server and the emulator: Ready and refresh on expiry only,
//! consumers refreshing first, error conditions and recovery, consumer RBAC checked as the
//! ServiceAccount itself, and no secret in any log, Event or status.

mod common;

use std::time::{Duration, Instant};

use common::{Timings, token_fixture};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::protocol::format as f;
use xero_proving_ground::emulator::{FaultKind, Faults};

use common::connection::{self, CONTROLLER_ID, start_controller};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_alone_refreshes_once_per_expiry_and_never_early() {
    // 10 s tokens, 1 s skew: due every 9 s; about 95 s cover 10 expiries.
    let timings = Timings {
        access_token: Duration::from_secs(10),
        ..Timings::default()
    };
    let fx = token_fixture("ctl-producer", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let controller = start_controller(&fx, |_| {});
    let conn =
        connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    let started = Instant::now();
    let (reconciles_before, rotations_before) =
        (controller.reconciles(), fx.record().await.rotation);
    let status = conn.status.expect("status");
    assert_eq!(status.last_refreshed_by.as_deref(), Some(CONTROLLER_ID));
    assert_eq!(
        status.tenants[0].tenant_name.as_deref(),
        Some("Demo Company")
    );
    let rec = fx.record().await;
    assert_eq!(
        rec.tenant_ids,
        [fx.user.connections[0].tenant_id.clone()],
        "tenants published in the Secret"
    );
    while fx.report().await.chains[0].rotations < 11 {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "fewer than 10 refreshes in 150 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // One reconcile per refresh, woken by its requeue: not again by its own claim and store.
    let reconciles = controller.reconciles() - reconciles_before;
    let rotations = fx.record().await.rotation - rotations_before;
    eprintln!("{reconciles} reconciles for {rotations} refreshes");
    assert!(
        reconciles <= rotations + 2,
        "{reconciles} reconciles for {rotations} refreshes: woken by its own writes"
    );
    let report = fx.report().await;
    let chain = &report.chains[0];
    assert_eq!(
        report.counters.token_calls, chain.rotations,
        "one call per expiry"
    );
    assert_eq!((chain.grace_reuses, chain.broken), (0, false));
    // Never early, by Xero's clock: a token issued in second s expires (JWT `exp`, whole
    // seconds) at s + 10 and is due at s + 9, so consecutive calls are at least 9 whole
    // seconds apart, one per second at most.
    let seconds: Vec<(u64, u64)> = report
        .counters
        .token_calls_by_second
        .iter()
        .map(|(s, n)| (*s, *n))
        .collect();
    assert!(seconds.iter().all(|(_, n)| *n == 1), "{seconds:?}");
    for pair in seconds.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= 9,
            "a refresh before its token was due: {seconds:?}"
        );
    }
    // To the millisecond: the controller claims a moment ahead but calls only when due, never
    // before the usable end of the token the previous call issued (second s + 9).
    let calls = report.counters.token_call_times_ms();
    assert!(calls.len() >= 10, "{calls:?}");
    for pair in calls.windows(2) {
        let usable_end = pair[0] / 1000 * 1000 + 9000;
        assert!(
            pair[1] >= usable_end,
            "a call {} ms before its token was due: {calls:?}",
            usable_end - pair[1]
        );
    }
    // The tenants were listed once, with the first token: refreshes of one authorisation do
    // not list them again (that would double the calls to Xero).
    assert_eq!(
        report.counters.connections_calls, 1,
        "tenants listed per refresh"
    );
    let rec = fx.record().await;
    assert_eq!(rec.refreshed_by.as_deref(), Some(CONTROLLER_ID));
    assert!(
        fx.accepted_by_xero(rec.access_token.as_ref().expect("token").expose())
            .await
    );
    // The same user authorises again (a new refresh-token family under a new authentication
    // event; stored just after a refresh): the tenants are listed once more, with the first
    // token it gives, and not again with the next.
    let calls_before = fx.report().await.counters.connections_calls;
    let status_now = || async {
        let conn = connection::api(&fx)
            .get("acme")
            .await
            .expect("get connection");
        conn.status.unwrap_or_default()
    };
    let event_before = status_now().await.tenants_authentication_event;
    assert!(
        event_before.is_some(),
        "the listing's authorisation recorded"
    );
    let rt = fx
        .emulator
        .admin()
        .new_family(&fx.user.user_id)
        .await
        .expect("a new authorisation");
    fx.patch(json!({f::REFRESH_TOKEN: rt}), json!({})).await;
    let waited = Instant::now();
    let relisted_at = loop {
        let status = status_now().await;
        if status.tenants_authentication_event != event_before {
            break status.refresh_count;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the new authorisation's tenants never listed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    while status_now().await.refresh_count < relisted_at + 1 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "no refresh after it"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        fx.report().await.counters.connections_calls,
        calls_before + 1,
        "listed once for the new authorisation"
    );
    // A `tenant_id` changed in the Secret is put back from the status, without asking Xero.
    let tenant = fx.user.connections[0].tenant_id.clone();
    fx.patch(
        json!({f::TENANT_ID: "not-a-tenant", f::TENANT_IDS: "not-a-tenant"}),
        json!({}),
    )
    .await;
    while fx.record().await.tenant_ids != [tenant.clone()] {
        assert!(
            waited.elapsed() < Duration::from_secs(90),
            "the edited tenant_id was not put back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        fx.report().await.counters.connections_calls,
        calls_before + 1,
        "no listing to put it back"
    );
}

/// The `AheadOfExpiry` policy through the controller: each refresh comes `aheadOfExpirySeconds`
/// (plus the skew) before the stored token expires, not on expiry and not earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ahead_of_expiry_refreshes_while_the_token_is_still_valid() {
    // 30 s tokens, 1 s skew, 10 s ahead: due 11 s before expiry (under the cap of half the
    // token's life), every 19 s or so.
    let timings = Timings {
        access_token: Duration::from_secs(30),
        ..Timings::default()
    };
    let fx = token_fixture("ctl-ahead", timings).await;
    connection::create(
        &fx,
        "acme",
        &fx.secret,
        timings,
        json!({"refresh": {"policy": "AheadOfExpiry", "aheadOfExpirySeconds": 10,
            "clockSkewSeconds": 1, "leaseDurationSeconds": 5}}),
    )
    .await;
    let _controller = start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    let mut last = fx.record().await;
    let mut margins = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while margins.len() < 3 {
        assert!(Instant::now() < deadline, "fewer than 3 refreshes in 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rec = fx.record().await;
        if rec.rotation == last.rotation {
            continue;
        }
        assert_eq!(rec.rotation, last.rotation + 1, "one rotation at a time");
        let f::Expiry::At(expired_at) = last.expiry else {
            panic!("the replaced token had an expiry")
        };
        let refreshed_at = rec.refreshed_at.expect("refreshed-at");
        let margin = expired_at
            .duration_since(refreshed_at)
            .expect("refreshed before the old token expired");
        margins.push(margin);
        last = rec;
    }
    eprintln!("time left on the replaced token at each refresh: {margins:?}");
    for m in &margins {
        // Due 11 s before expiry (10 ahead + 1 skew): never earlier; a busy machine may be a
        // few seconds late, never as late as the expiry itself.
        assert!(
            *m <= Duration::from_secs(11) && *m >= Duration::from_secs(5),
            "{margins:?}"
        );
    }
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, report.chains[0].rotations);
    assert!(!report.chains[0].broken);
}

/// A new connection whose first call to Xero takes long is not left blank meanwhile: Ready is
/// False with reason Refreshing, naming the host called; no Event says so (the first Event is
/// the outcome), and the connection then becomes Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_shows_it_is_getting_its_first_token() {
    let timings = Timings::default();
    let fx = token_fixture("ctl-first", timings).await;
    fx.set_faults(Faults {
        latency: Duration::from_secs(8),
        ..Faults::default()
    })
    .await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let _controller = start_controller(&fx, |_| {});
    let conn = connection::wait_for_reason(&fx, "acme", "Refreshing", Duration::from_secs(6)).await;
    let ready = &conn.status.expect("status").conditions[0];
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("getting one from 127.0.0.1"),
        "{}",
        ready.message
    );
    fx.set_faults(Faults::default()).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(40)).await;
    let events: Api<Event> = Api::namespaced(fx.client.clone(), &fx.namespace);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "TokenValid") && !reasons.iter().any(|r| r == "Refreshing"),
        "{reasons:?}"
    );
}

/// While another party holds the claim, the controller calls nobody and says `Refreshing`, not
/// Ready once the stored token has expired; when the claim ends without a store, the controller
/// takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partys_claim_shows_refreshing_and_then_is_taken_over() {
    // 6 s tokens, 1 s skew: the controller looks again 5 s after each refresh.
    let timings = Timings {
        access_token: Duration::from_secs(6),
        lease_secs: 10,
        ..Timings::default()
    };
    let fx = token_fixture("ctl-refreshing", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let _controller = start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    // A consumer claims (conditionally, so never over the controller's own claim) and then
    // goes silent.
    let claim_ends = loop {
        let rec = fx.record().await;
        if rec.lease != f::Lease::None {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let ends = std::time::SystemTime::now() + Duration::from_secs(10);
        let claimed = fx
            .secrets()
            .patch(
                &fx.secret,
                &PatchParams::default(),
                &Patch::Merge(f::claim_patch(
                    rec.resource_version.as_deref().expect("rv"),
                    "consumer/silent",
                    ends,
                )),
            )
            .await;
        match claimed {
            Ok(_) => break ends,
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => panic!("claim: {e}"),
        }
    };
    let calls = fx.report().await.counters.token_calls;
    // At the token's due time the controller finds the claim: Refreshing, not Ready.
    let conn =
        connection::wait_for_reason(&fx, "acme", "Refreshing", Duration::from_secs(30)).await;
    let ready = &conn.status.expect("status").conditions[0];
    assert_eq!(
        ready.status, "False",
        "an expired token is not Ready: {ready:?}"
    );
    assert!(
        ready.message.contains("consumer/silent"),
        "{}",
        ready.message
    );
    // The claim ends (plus the skew) without a store: the controller refreshes, once, then.
    let conn =
        connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(40)).await;
    assert!(
        std::time::SystemTime::now() >= claim_ends,
        "the controller refreshed while the claim lasted"
    );
    assert_eq!(
        conn.status.expect("status").last_refreshed_by.as_deref(),
        Some(CONTROLLER_ID)
    );
    assert_eq!(fx.report().await.counters.token_calls, calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_consumer_refreshed_first_the_controller_only_records_it() {
    // Long-lived tokens: the restarted controller has all the time it needs to see the
    // consumer's token as fresh.
    let timings = Timings {
        access_token: Duration::from_secs(120),
        ..Timings::default()
    };
    let fx = token_fixture("ctl-consumer", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let controller = start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    controller.stop().await;
    // The token expires while the controller is away; a consumer takes over.
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    fx.refresher("consumer-pod")
        .get()
        .await
        .expect("consumer refreshes");
    assert_eq!(
        fx.record().await.refreshed_by.as_deref(),
        Some("consumer-pod")
    );
    let calls = fx.report().await.counters.token_calls;
    let _controller = start_controller(&fx, |_| {});
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = connection::api(&fx)
            .get("acme")
            .await
            .expect("get")
            .status
            .expect("status");
        if status.last_refreshed_by.as_deref() == Some("consumer-pod") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never recorded the consumer: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "no call for a token a consumer refreshed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_conditions_are_named_and_clear_when_the_cause_goes() {
    let timings = Timings::default();
    let fx = token_fixture("ctl-errors", timings).await;
    // Start with no client Secret at all.
    common::install_crds(&fx.client).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let secrets: Api<Secret> = Api::namespaced(fx.client.clone(), &fx.namespace);
    secrets
        .delete("xero-app", &Default::default())
        .await
        .expect("remove client Secret");
    // The test expires the token right after a refresh to make the next error happen; the
    // interval that holds such refreshes back is tests/isolation.rs's.
    let controller = start_controller(&fx, |ctx| ctx.min_call_interval = Duration::ZERO);
    let conn =
        connection::wait_for_reason(&fx, "acme", "MissingClientSecret", Duration::from_secs(30))
            .await;
    let message = &conn.status.expect("status").conditions[0].message;
    assert!(message.contains("xero-app"), "{message}");
    // A client Secret without the secret key.
    let partial: Secret = serde_json::from_value(
        json!({"metadata": {"name": "xero-app", "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
            "stringData": {"client_id": "emulator-client"}}),
    )
    .expect("s");
    secrets
        .create(&PostParams::default(), &partial)
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn =
            connection::wait_for_reason(&fx, "acme", "MissingClientSecret", Duration::from_secs(5))
                .await;
        if conn.status.expect("status").conditions[0]
            .message
            .contains("\"client_secret\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the message never named the missing key"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    secrets
        .patch(
            "xero-app",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"client_secret": "emulator-secret"}})),
        )
        .await
        .expect("fix");
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;

    // Xero failing: XeroUnavailable, then recovery.
    fx.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    connection::wait_for_reason(&fx, "acme", "XeroUnavailable", Duration::from_secs(30)).await;
    fx.set_faults(Faults::default()).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;

    // Xero refusing the refresh token: ReauthorizationRequired, then a person authorises again.
    fx.patch(
        json!({f::REFRESH_TOKEN: "revoked", f::EXPIRES_AT: "2000-01-01T00:00:00Z"}),
        json!({}),
    )
    .await;
    connection::wait_for_reason(
        &fx,
        "acme",
        "ReauthorizationRequired",
        Duration::from_secs(30),
    )
    .await;
    let calls = fx.report().await.counters.token_calls;
    // Three more looks at the connection (its recheck is 10 s here): none calls Xero.
    controller.reconcile_again(&fx, 3).await;
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "no call until the refresh token changes"
    );
    let again = fx
        .emulator
        .admin()
        .add_user(&Default::default())
        .await
        .expect("re-authorise");
    fx.patch(
        json!({f::REFRESH_TOKEN: again.refresh_token.expect("rt")}),
        json!({}),
    )
    .await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;

    // Rate limited: named, then recovered.
    fx.set_faults(Faults {
        script: [FaultKind::RateLimit; 30].into_iter().collect(),
        ..Faults::default()
    })
    .await;
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    connection::wait_for_reason(&fx, "acme", "RateLimited", Duration::from_secs(30)).await;
    fx.set_faults(Faults::default()).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;

    // A wrong client secret: InvalidClientCredentials, then fixed.
    secrets
        .patch(
            "xero-app",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"client_secret": "wrong"}})),
        )
        .await
        .expect("break the client secret");
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    connection::wait_for_reason(
        &fx,
        "acme",
        "InvalidClientCredentials",
        Duration::from_secs(30),
    )
    .await;
    secrets
        .patch(
            "xero-app",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"client_secret": "emulator-secret"}})),
        )
        .await
        .expect("fix the client secret");
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;

    // No refresh token at all: WaitingForAuthorization until one is stored.
    fx.patch(
        json!({f::REFRESH_TOKEN: "", f::EXPIRES_AT: "2000-01-01T00:00:00Z"}),
        json!({}),
    )
    .await;
    let waiting = connection::wait_for_reason(
        &fx,
        "acme",
        "WaitingForAuthorization",
        Duration::from_secs(30),
    )
    .await;
    // The message is the command to run, with the real Secret (not a placeholder).
    let message = waiting
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready")
        .message;
    assert!(
        message.contains(&format!(
            "xero-token --namespace {} --secret {} authorize",
            fx.namespace, fx.secret
        )),
        "{message}"
    );
    let third = fx
        .emulator
        .admin()
        .add_user(&Default::default())
        .await
        .expect("authorise");
    fx.patch(
        json!({f::REFRESH_TOKEN: third.refresh_token.expect("rt")}),
        json!({}),
    )
    .await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;

    // One Event per transition, none on steady state. The recorder merges repeats of a reason
    // into one Event object and counts them, so the counts are what is compared.
    let events: Api<Event> = Api::namespaced(fx.client.clone(), &fx.namespace);
    let mut counts = std::collections::BTreeMap::<String, i32>::new();
    let mut seen = Vec::new();
    for e in events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
    {
        if let Some(reason) = e.reason {
            let count = e.series.map(|s| s.count).or(e.deprecated_count);
            *counts.entry(reason.clone()).or_default() += count.unwrap_or(1).max(1);
            seen.push((reason, count, e.note));
        }
    }
    // A refresh still failing a moment past the token's usable end shows TokenExpired first:
    // the 5xx phase (the claim's three calls may or may not take that long) and the 429 phase
    // (waiting out Retry-After in the claim).
    let expired = counts.remove("TokenExpired").unwrap_or(0);
    assert!(expired <= 2, "Events per reason: {seen:#?}");
    let want: std::collections::BTreeMap<String, i32> = [
        ("MissingClientSecret", 1),
        ("TokenValid", 6),
        ("XeroUnavailable", 1),
        ("ReauthorizationRequired", 1),
        ("RateLimited", 1),
        ("InvalidClientCredentials", 1),
        ("WaitingForAuthorization", 1),
    ]
    .into_iter()
    .map(|(r, n)| (r.to_owned(), n))
    .collect();
    assert_eq!(counts, want, "Events per reason: {seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_schema_cannot_catch_is_invalid_spec() {
    let timings = Timings::default();
    let fx = token_fixture("ctl-invalid", timings).await;
    // The token Secret would be the client Secret itself.
    connection::create(&fx, "acme", "xero-app", timings, json!({})).await;
    let _controller = start_controller(&fx, |_| {});
    let conn =
        connection::wait_for_reason(&fx, "acme", "InvalidSpec", Duration::from_secs(30)).await;
    assert!(
        conn.status.expect("status").conditions[0]
            .message
            .contains("must differ")
    );
    assert_eq!(fx.report().await.counters.token_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_service_account_can_use_exactly_its_token_secret() {
    let timings = Timings::default();
    let fx = token_fixture("ctl-rbac", timings).await;
    let sas: Api<ServiceAccount> = Api::namespaced(fx.client.clone(), &fx.namespace);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "worker"}})).expect("sa"),
    )
    .await
    .expect("create SA");
    connection::create(
        &fx,
        "acme",
        &fx.secret,
        timings,
        json!({"consumers": [{"serviceAccount": "worker"}]}),
    )
    .await;
    let _controller = start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;

    // A client that is the ServiceAccount (impersonated by the admin), checked by the real RBAC.
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&common::env().admin_kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{}:worker", fx.namespace));
    let as_worker = Client::try_from(config).expect("client");
    let worker_secrets: Api<Secret> = Api::namespaced(as_worker.clone(), &fx.namespace);
    worker_secrets
        .get(&fx.secret)
        .await
        .expect("can get its token Secret");
    worker_secrets
        .patch(
            &fx.secret,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"probe": "1"}}})),
        )
        .await
        .expect("can patch its token Secret");
    let forbidden =
        |r: Result<Secret, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(
        forbidden(worker_secrets.get("xero-app").await),
        "must not read the client Secret"
    );
    assert!(
        forbidden(
            worker_secrets
                .patch(
                    "xero-app",
                    &PatchParams::default(),
                    &Patch::Merge(json!({}))
                )
                .await
        ),
        "must not patch another Secret"
    );
    assert!(
        matches!(worker_secrets.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 403)
    );
    // A waiter's watch (by name, from a version read) is allowed too: under these rights it
    // delivers the next change instead of failing into a sleep.
    let event = common::first_watch_answer(
        &worker_secrets,
        &fx.secret,
        fx.patch(json!({}), json!({"probe": "2"})),
    )
    .await
    .expect("the ServiceAccount may watch its token Secret");
    assert!(
        matches!(event, kube::api::WatchEvent::Modified(_)),
        "{event:?}"
    );
    // And the protocol works with exactly these rights.
    let t = xero_operator::protocol::Refresher::new(
        as_worker,
        &fx.namespace,
        &fx.secret,
        "worker-pod",
        xero_operator::protocol::Role::Consumer,
    )
    .with_allowlist(fx.emulator.allowlist())
    .get()
    .await
    .expect("the ServiceAccount gets a token");
    assert!(fx.accepted_by_xero(t.token.expose()).await);

    // Emptying the consumer list removes the grant.
    connection::api(&fx)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"consumers": null}})),
        )
        .await
        .expect("remove consumers");
    let roles: Api<k8s_openapi::api::rbac::v1::Role> =
        Api::namespaced(fx.client.clone(), &fx.namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    while roles
        .get_opt("acme-xero-token-consumer")
        .await
        .expect("get role")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the consumer Role was never removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_client_secret_appears_in_logs_events_or_status() {
    let timings = Timings::default();
    let fx = token_fixture("ctl-secrets", timings).await;
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let env = common::env();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let controller = common::Procs(vec![
        std::process::Command::new(env!("CARGO_BIN_EXE_xero-operator"))
            .args([
                "--namespace",
                &fx.namespace,
                "--metrics-addr",
                "127.0.0.1:0",
                "--identity",
                CONTROLLER_ID,
            ])
            .arg(format!(
                "--allowed-endpoint-hosts={}",
                fx.emulator.allowed_host()
            ))
            .env("KUBECONFIG", &env.admin_kubeconfig)
            .env("RUST_LOG", "trace")
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("start xero-operator"),
    ]);
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    // A consumer at trace level too, through an expiry, a lost answer and an invalid_grant.
    fx.set_faults(Faults {
        script: [FaultKind::DropResponse].into(),
        ..Faults::default()
    })
    .await;
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    let consumer = tokio::process::Command::new(env!("CARGO_BIN_EXE_xero-token"))
        .args([
            "--secret",
            &fx.secret,
            "--namespace",
            &fx.namespace,
            "get",
            "--json",
        ])
        .env("KUBECONFIG", &env.admin_kubeconfig)
        .env(
            xero_operator::cli::ALLOW_HOSTS_ENV,
            fx.emulator.allowed_host(),
        )
        .env("RUST_LOG", "trace")
        .kill_on_drop(true)
        .output();
    let consumer = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("the consumer ended")
        .expect("consumer");
    assert!(consumer.status.success(), "consumer: {:?}", consumer.status);
    assert_eq!(
        fx.report().await.counters.faults_injected,
        1,
        "the lost answer happened"
    );
    let handed_out: serde_json::Value =
        serde_json::from_slice(&consumer.stdout).expect("the consumer printed JSON");
    let rec = fx.record().await;
    fx.patch(
        json!({f::REFRESH_TOKEN: "refused-token-value", f::EXPIRES_AT: "2000-01-01T00:00:00Z"}),
        json!({}),
    )
    .await;
    connection::wait_for_reason(
        &fx,
        "acme",
        "ReauthorizationRequired",
        Duration::from_secs(30),
    )
    .await;
    drop(controller);

    let mut secrets: Vec<String> = vec![
        xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET.to_owned(),
        "refused-token-value".to_owned(),
        fx.user.refresh_token.clone().expect("rt"),
    ];
    secrets.extend(rec.access_token.map(|t| t.expose().to_owned()));
    secrets.extend(rec.refresh_token.map(|t| t.expose().to_owned()));
    secrets.push(
        handed_out["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned(),
    );
    // Their base64 forms too (Secret data as the API returns it).
    use base64::Engine;
    let encoded: Vec<String> = secrets
        .iter()
        .map(|v| base64::engine::general_purpose::STANDARD.encode(v))
        .collect();
    secrets.extend(encoded);
    let controller_log = std::fs::read_to_string(log.path()).expect("read log");
    let consumer_log = String::from_utf8_lossy(&consumer.stderr).into_owned();
    // The scan below means something only over logs that say a lot.
    for (name, log) in [("controller", &controller_log), ("consumer", &consumer_log)] {
        assert!(
            log.contains("TRACE") || log.contains("DEBUG"),
            "{name}: trace logging was on"
        );
        assert!(log.len() > 2_000, "{name} logged {} bytes", log.len());
    }
    let status =
        serde_json::to_string(&connection::api(&fx).get("acme").await.expect("get").status)
            .expect("json");
    let events = serde_json::to_string(
        &Api::<Event>::namespaced(fx.client.clone(), &fx.namespace)
            .list(&ListParams::default())
            .await
            .expect("events")
            .items,
    )
    .expect("json");
    for (place, text) in [
        ("controller log", &controller_log),
        ("consumer log", &consumer_log),
        ("status", &status),
        ("events", &events),
    ] {
        for value in &secrets {
            assert!(
                !text.contains(value.as_str()),
                "a secret value appears in the {place}"
            );
        }
    }
}
