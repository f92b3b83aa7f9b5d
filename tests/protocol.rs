//! The refresh protocol against the real API server and the Xero emulator: single flight, many
//! parties, lost answers, crashed holders, two claimers reaching Xero, Xero's errors and garbage
//! in the Secret.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Timings, token_fixture, token_fixture_with};
use serde_json::json;
use xero_operator::protocol::format as f;
use xero_operator::protocol::{Error, Refresher};
use xero_operator::redact::Sensitive;
use xero_proving_ground::emulator::{FaultKind, Faults, GraceReuse, RateLimits};

async fn set_script(fx: &common::TokenFixture, script: &[FaultKind]) {
    fx.set_faults(Faults::scripted(script)).await;
}

/// P70: a consumer whose request Xero refused reports the token; once it has been in use a
/// quarter of its life, the next get refreshes it instead of handing it out, and many reports of
/// one token make one refresh. A report of a token already replaced, or of a fresh one, forces
/// nothing.
#[tokio::test]
async fn a_refused_token_is_refreshed_once_however_many_report_it() {
    let timings = Timings {
        access_token: Duration::from_secs(40),
        ..Timings::default()
    };
    let fx = token_fixture("proto-refused", timings).await;
    let (a, b) = (fx.refresher("consumer-a"), fx.refresher("consumer-b"));
    let first = a.get().await.expect("a gets a token");
    assert_eq!(b.get().await.expect("b").token, first.token);
    let calls = fx.report().await.counters.token_calls;
    // Refused at once: the token is younger than a quarter of its 40 s life, so it is still
    // handed out and nothing is called.
    b.refused(&first.token).await.expect("reported");
    let rec = fx.record().await;
    assert_eq!(
        rec.refused_access_token,
        Some(first.token.fingerprint()),
        "the refusal is in the Secret"
    );
    assert_eq!(b.get().await.expect("b").token, first.token);
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "nothing forced"
    );
    // Once it has been in use 10 s: refreshed by whoever asks first, once.
    let stored = rec.refreshed_at.expect("refreshed-at");
    let old_enough = stored + Duration::from_secs(10) + Duration::from_millis(200);
    if let Ok(wait) = old_enough.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let second = b.get().await.expect("b refreshes");
    assert_ne!(second.token, first.token);
    assert!(fx.accepted_by_xero(second.token.expose()).await);
    // A reports the same (now replaced) token late: nothing is written or called.
    a.refused(&first.token).await.expect("reported");
    assert_eq!(a.get().await.expect("a").token, second.token);
    let rec = fx.record().await;
    assert_eq!(rec.refused_access_token, None, "a store clears the refusal");
    assert_eq!(fx.report().await.counters.token_calls, calls + 1);
    // Reporting the fresh token at once forces nothing either.
    a.refused(&second.token).await.expect("reported");
    assert_eq!(a.get().await.expect("a").token, second.token);
    assert_eq!(fx.report().await.counters.token_calls, calls + 1);
}

#[tokio::test]
async fn the_first_get_refreshes_and_everyone_else_uses_the_stored_token() {
    let fx = token_fixture("proto-basic", Timings::default()).await;
    let a = fx
        .refresher("consumer-a")
        .get()
        .await
        .expect("a gets a token");
    assert!(fx.accepted_by_xero(a.token.expose()).await);
    assert_eq!(a.tenant_ids, [fx.user.connections[0].tenant_id.clone()]);
    let b = fx
        .refresher("consumer-b")
        .get()
        .await
        .expect("b gets a token");
    assert_eq!(a.token, b.token);
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, 1);
    // P42, P43: the refresh grant, the client authenticated by HTTP Basic.
    assert_eq!(
        report.counters.token_calls_by_grant,
        [("refresh_token".to_owned(), 1)].into()
    );
    assert_eq!(
        report.counters.token_calls_by_client_auth,
        [("basic".to_owned(), 1)].into()
    );
    let rec = fx.record().await;
    assert_eq!(rec.refreshed_by.as_deref(), Some("consumer-a"));
    assert_eq!(rec.rotation, 1);
    assert_eq!(
        rec.lease,
        f::Lease::None,
        "the claim is released with the write"
    );
    assert_ne!(
        rec.refresh_token.as_ref().map(Sensitive::expose),
        fx.user.refresh_token.as_deref()
    );
}

#[tokio::test]
async fn client_credentials_with_scopes_end_to_end() {
    let fx = token_fixture("proto-cc", Timings::default()).await;
    fx.emulator
        .admin()
        .add_user(&xero_proving_ground::emulator::NewUser {
            custom_connection: true,
            ..Default::default()
        })
        .await
        .expect("custom connection");
    let scopes = "accounting.transactions accounting.contacts";
    fx.patch(
        json!({f::REFRESH_TOKEN: ""}),
        json!({f::ANN_GRANT: "ClientCredentials", f::ANN_SCOPES: scopes}),
    )
    .await;
    let t = fx
        .refresher("cc")
        .get()
        .await
        .expect("a client-credentials token");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(
        report.counters.token_calls_by_grant,
        [("client_credentials".to_owned(), 1)].into()
    );
    assert_eq!(
        report.counters.client_credentials_scopes,
        [(scopes.to_owned(), 1)].into(),
        "the scopes were sent"
    );
    assert_eq!(
        report.counters.token_calls_by_client_auth,
        [("basic".to_owned(), 1)].into()
    );
    let rec = fx.record().await;
    assert_eq!((rec.rotation, rec.lease.clone()), (1, f::Lease::None));
    // Used by everyone until it expires: no second call.
    fx.refresher("cc-2").get().await.expect("the stored token");
    assert_eq!(fx.report().await.counters.token_calls, 1);
    // Without scopes, no scope parameter is sent.
    fx.patch(
        json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}),
        json!({f::ANN_SCOPES: null}),
    )
    .await;
    fx.refresher("cc-3")
        .get()
        .await
        .expect("a token without scopes");
    assert_eq!(
        fx.report().await.counters.client_credentials_scopes,
        [(scopes.to_owned(), 1), ("(none)".to_owned(), 1)].into()
    );
}

/// A consumer in use follows its Secret: a token another party stores before the cached one
/// runs out (the controller under AheadOfExpiry) is handed out at once, with no request to the
/// API server at the moment of rotation. Without the follower the consumer would hand out its
/// cached token until that expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_in_use_gets_a_token_stored_ahead_of_expiry_at_once() {
    let timings = Timings {
        access_token: Duration::from_secs(600),
        ..Timings::default()
    };
    let fx = token_fixture("proto-follow", timings).await;
    let consumer = fx.refresher("consumer");
    let first = consumer.get().await.expect("token");
    // In use: the second get starts following the Secret.
    assert_eq!(consumer.get().await.expect("token").token, first.token);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = consumer.api_requests();

    // Another party stores a new pair while the first token is valid for minutes yet.
    let stored_at = fx.record().await.refreshed_at;
    let other = Refresher::new(
        fx.client.clone(),
        &fx.namespace,
        &fx.secret,
        "producer",
        xero_operator::protocol::Role::Renew { seen: stored_at },
    )
    .with_allowlist(fx.emulator.allowlist());
    let second = other.get().await.expect("renewed");
    assert_ne!(second.token, first.token);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = consumer.get().await.expect("token");
        if got.token == second.token {
            break;
        }
        assert_eq!(got.token, first.token);
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer kept its cached token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        consumer.api_requests(),
        requests,
        "the new token came over the watch already open"
    );
    assert_eq!(fx.report().await.counters.token_calls, 2);
}

/// P35: a rotation costs two writes to the Secret, the claim and the store, seen on a watch
/// of the Secret (every write is a new resourceVersion).
#[tokio::test]
async fn a_rotation_is_two_writes_the_claim_and_the_store() {
    use futures_util::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let fx = token_fixture("proto-writes", Timings::default()).await;
    let start = fx.record().await.resource_version.expect("rv");
    let params = WatchParams::default()
        .fields(&format!("metadata.name={}", fx.secret))
        .timeout(60);
    let mut events = std::pin::pin!(fx.secrets().watch(&params, &start).await.expect("watch"));
    fx.refresher("a").get().await.expect("token");
    let end = fx.record().await.resource_version.expect("rv");
    let mut writes = Vec::new();
    while writes.last() != Some(&end) {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("the watch delivers the writes")
            .expect("the watch goes on")
            .expect("an event");
        if let WatchEvent::Modified(secret) = event {
            let rec = xero_operator::protocol::TokenRecord::from_secret(&secret);
            writes.push(rec.resource_version.clone().expect("rv"));
            match writes.len() {
                1 => assert!(
                    matches!(&rec.lease, f::Lease::Held { holder, .. } if holder == "a"),
                    "first the claim: {:?}",
                    rec.lease
                ),
                2 => assert_eq!(
                    (rec.lease, rec.rotation),
                    (f::Lease::None, 1),
                    "then the store, which releases the claim"
                ),
                n => panic!("write {n} for one rotation"),
            }
        }
    }
    assert_eq!(writes.len(), 2);
}

#[tokio::test]
async fn concurrent_gets_in_one_process_share_one_refresh() {
    let fx = token_fixture("proto-flight", Timings::default()).await;
    let r = Arc::new(fx.refresher("one-process"));
    let gets = (0..50).map(|_| {
        let r = r.clone();
        tokio::spawn(async move { r.get().await })
    });
    let tokens: Vec<_> = futures_util::future::join_all(gets).await;
    let first = tokens[0]
        .as_ref()
        .expect("joined")
        .as_ref()
        .expect("token")
        .token
        .clone();
    for t in &tokens {
        assert_eq!(
            t.as_ref().expect("joined").as_ref().expect("token").token,
            first
        );
    }
    assert_eq!(fx.report().await.counters.token_calls, 1);
}

#[tokio::test]
async fn many_parties_at_one_expiry_make_one_call_per_expiry() {
    let fx = token_fixture("proto-many", Timings::default()).await;
    let parties: Vec<Arc<Refresher>> = (0..10)
        .map(|i| Arc::new(fx.refresher(&format!("party-{i}"))))
        .collect();
    for round in 1..=3u64 {
        let gets = parties.iter().map(|p| {
            let p = p.clone();
            tokio::spawn(async move { p.get().await })
        });
        for t in futures_util::future::join_all(gets).await {
            let t = t.expect("joined").expect("token");
            assert!(
                fx.accepted_by_xero(t.token.expose()).await,
                "round {round}: handed an expired token"
            );
        }
        let report = fx.report().await;
        assert_eq!(report.counters.token_calls, round, "one call per expiry");
        // Wait for this token to expire (3 s lifetime, 1 s skew).
        tokio::time::sleep(Duration::from_millis(2100)).await;
    }
    let chain = &fx.report().await.chains[0];
    assert_eq!(
        (chain.rotations, chain.grace_reuses, chain.broken),
        (3, 0, false)
    );
}

/// Consumers in use meet an expiry with their Secret already watched: the first read, the
/// re-read after a lost claim and the wait for the holder's store all come from that one watch.
/// The holder makes its claim and its store; every other process at most a claim that lost.
/// Without the follower standing in, each loser reads, claims, reads again and opens a watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_in_use_meet_an_expiry_with_no_request_but_their_claim() {
    let fx = token_fixture(
        "proto-at-expiry",
        Timings {
            access_token: Duration::from_secs(4),
            ..Timings::default()
        },
    )
    .await;
    let parties: Vec<Arc<Refresher>> = (0..5)
        .map(|i| Arc::new(fx.refresher(&format!("party-{i}"))))
        .collect();
    let all_get = || {
        futures_util::future::join_all(parties.iter().map(|p| {
            let p = p.clone();
            tokio::spawn(async move { p.get().await })
        }))
    };
    // In use: two gets each (the second starts following).
    for _ in 0..2 {
        for p in &parties {
            p.get().await.expect("token");
        }
    }
    // A first expiry with the watches open: from here on each follower has seen the Secret.
    // (4 s lifetime, 1 s skew: usable for 3 s.)
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for t in all_get().await {
        t.expect("joined").expect("token");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<u64> = parties.iter().map(|p| p.api_requests()).collect();
    // The expiry measured.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let tokens: Vec<String> = all_get()
        .await
        .into_iter()
        .map(|t| t.expect("joined").expect("token").token.expose().to_owned())
        .collect();
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one new token");
    assert!(fx.accepted_by_xero(&tokens[0]).await, "a valid token");
    assert_eq!(
        fx.report().await.counters.token_calls,
        3,
        "one call per expiry"
    );
    let made: Vec<u64> = parties
        .iter()
        .zip(&before)
        .map(|(p, b)| p.api_requests() - b)
        .collect();
    // The holder: claim and store; everyone else: at most the claim that lost, no read.
    assert!(
        made.iter().all(|m| *m <= 2) && made.iter().sum::<u64>() <= parties.len() as u64 + 1,
        "requests per party at the expiry: {made:?}"
    );
}

#[tokio::test]
async fn a_lost_answer_is_recovered_by_retrying_within_the_grace_period() {
    let fx = token_fixture("proto-lost", Timings::default()).await;
    set_script(&fx, &[FaultKind::DropResponse]).await;
    let t = fx.refresher("consumer").get().await.expect("recovered");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    let chain = &report.chains[0];
    assert_eq!(report.counters.token_calls, 2);
    assert_eq!(
        (chain.rotations, chain.grace_reuses, chain.broken),
        (1, 1, false)
    );
    // The stored refresh token is the one Xero rotated to: the next refresh works.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    fx.refresher("consumer-2")
        .get()
        .await
        .expect("next rotation");
    assert!(!fx.report().await.chains[0].broken);
}

#[tokio::test]
async fn a_holder_killed_after_xero_answered_is_replaced_and_the_rotation_recovered() {
    let fx = token_fixture(
        "proto-kill",
        Timings {
            lease_secs: 5,
            ..Timings::default()
        },
    )
    .await;
    // Xero processes the refresh at once but answers only after 3 s: the holder is killed in
    // between, so the rotated pair never reaches the Secret.
    fx.set_faults(Faults {
        latency: Duration::from_secs(3),
        ..Faults::default()
    })
    .await;
    let env = common::env();
    let mut holder = common::Procs(vec![
        std::process::Command::new(env!("CARGO_BIN_EXE_xero-token"))
            .args([
                "get",
                "--secret",
                &fx.secret,
                "--namespace",
                &fx.namespace,
                "--identity",
                "doomed-holder",
            ])
            .env("KUBECONFIG", &env.admin_kubeconfig)
            .env(
                xero_operator::cli::ALLOW_HOSTS_ENV,
                fx.emulator.allowed_host(),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start xero-token"),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fx.report().await.chains[0].rotations == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never reached Xero"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.0[0].kill().expect("SIGKILL the holder");
    let _ = holder.0[0].wait();
    let rec = fx.record().await;
    // `--identity` is a prefix: the claim names this very process.
    assert!(
        matches!(&rec.lease, f::Lease::Held { holder, .. }
            if holder.starts_with("doomed-holder/") && holder.len() > "doomed-holder/".len()),
        "{:?}",
        rec.lease
    );
    assert_eq!(
        rec.refresh_token.as_ref().map(Sensitive::expose),
        fx.user.refresh_token.as_deref()
    );

    // Recovery without human action: the next party waits out the dead claim, claims, and
    // presents the old refresh token inside Xero's grace period.
    fx.set_faults(Faults::default()).await;
    let t = fx.refresher("rescuer").get().await.expect("recovered");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    let chain = &report.chains[0];
    // The replay recovered the lost rotation (grace reuse); its access token, issued before the
    // kill, had already expired with this test's 3 s lifetime, so the rescuer refreshed once
    // more with the recovered refresh token. With Xero's 30 minutes the replay would be used.
    assert_eq!(
        (chain.grace_reuses, chain.rotations, chain.broken),
        (1, 2, false),
        "{chain:?}"
    );
    assert_eq!(fx.record().await.refreshed_by.as_deref(), Some("rescuer"));
}

/// Xero answers slower than a claim lasts. The holder's call is cut 2 s before its claim ends
/// (Xero has processed it: the rotation is lost on the way back), and the claim released with a
/// backoff; the next party presents the same refresh token inside the grace period and stores
/// the rotation. Two parties never wait on Xero with the same refresh token at once, and the
/// chain stays whole whether Xero's grace period returns the same pair or a sibling.
async fn a_slow_answer_is_cut_at_the_claim_and_recovered(grace_reuse: GraceReuse) {
    let fx = token_fixture_with(
        "proto-slow",
        Timings {
            access_token: Duration::from_secs(20),
            // The shortest claim the protocol allows (5 s): Xero's 7 s delay outlasts it.
            lease_secs: 5,
            clock_skew_secs: 0,
            ..Timings::default()
        },
        grace_reuse,
    )
    .await;
    fx.set_faults(Faults {
        latency: Duration::from_secs(7),
        ..Faults::default()
    })
    .await;
    let started = std::time::Instant::now();
    let cut = fx.refresher("slow-a").get().await;
    assert!(
        matches!(
            cut,
            Err(Error::Xero(xero_operator::xero::XeroError::Transport(_)))
        ),
        "{cut:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the call ended before the claim did: {:?}",
        started.elapsed()
    );
    let rec = fx.record().await;
    assert_eq!(rec.lease, f::Lease::None, "released");
    assert_eq!(rec.failed_attempts, 1, "with a backoff for everyone");
    assert_eq!(
        rec.refresh_token.as_ref().map(Sensitive::expose),
        fx.user.refresh_token.as_deref(),
        "the Secret still holds the presented token"
    );
    assert_eq!(fx.report().await.chains[0].rotations, 1, "Xero did rotate");
    fx.set_faults(Faults::default()).await;
    let t = fx
        .refresher("late-b")
        .get()
        .await
        .expect("the next party recovers the rotation");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, 2);
    // The stored refresh token works: the chain goes on (a producer refreshing well ahead).
    Refresher::new(
        fx.client.clone(),
        &fx.namespace,
        &fx.secret,
        "next",
        xero_operator::protocol::Role::Producer {
            ahead: Duration::from_secs(3600),
        },
    )
    .with_allowlist(fx.emulator.allowlist())
    .get()
    .await
    .expect("the stored refresh token still works");
    let chain = &fx.report().await.chains[0];
    assert!(!chain.broken, "{chain:?}");
    assert_eq!(chain.grace_reuses, 1);
}

#[tokio::test]
async fn a_slow_answer_is_recovered_when_grace_returns_the_same_pair() {
    a_slow_answer_is_cut_at_the_claim_and_recovered(GraceReuse::SamePair).await;
}

#[tokio::test]
async fn a_slow_answer_is_recovered_when_grace_forks_the_chain() {
    a_slow_answer_is_cut_at_the_claim_and_recovered(GraceReuse::Fork).await;
}

/// Holds Xero's answers for `hold` after processing: a refresh is then done at Xero while its
/// answer is still on the way back.
async fn hold_answers(fx: &common::TokenFixture, hold: Duration) {
    fx.set_faults(Faults {
        latency: hold,
        ..Faults::default()
    })
    .await;
}

/// Starts a refresh by party `a` whose answer Xero holds for 6 s, and returns once Xero has
/// rotated: the test then acts while the answer is on its way.
async fn refresh_with_the_answer_held(
    fx: &common::TokenFixture,
) -> tokio::task::JoinHandle<Result<xero_operator::protocol::AccessToken, Error>> {
    hold_answers(fx, Duration::from_secs(6)).await;
    let pending = tokio::spawn({
        let r = fx.refresher("a");
        async move { r.get().await }
    });
    wait_until_xero_rotated(fx, 1).await;
    pending
}

/// Waits until Xero has processed `rotations` refreshes, then clears the faults (answers in
/// flight keep the latency they arrived with).
async fn wait_until_xero_rotated(fx: &common::TokenFixture, rotations: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fx.report().await.chains[0].rotations < rotations {
        assert!(
            std::time::Instant::now() < deadline,
            "Xero never processed the refresh"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.set_faults(Faults::default()).await;
}

/// Merge-patches the token Secret while the holder `a` waits for Xero's answer, and checks from
/// the patch's own answer that it came first (the claim still held, nothing stored yet).
async fn patch_before_the_store(
    fx: &common::TokenFixture,
    string_data: serde_json::Value,
    annotations: serde_json::Value,
) {
    let patched = fx
        .secrets()
        .patch(
            &fx.secret,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({
                "stringData": string_data,
                "metadata": {"annotations": annotations},
            })),
        )
        .await
        .expect("patch");
    let rec = xero_operator::protocol::TokenRecord::from_secret(&patched);
    assert!(
        matches!(&rec.lease, f::Lease::Held { holder, .. } if holder == "a")
            && rec.refreshed_by.as_deref() != Some("a"),
        "precondition: the patch came before the holder's store ({:?})",
        rec.lease
    );
}

/// Slow enough for the test to act while Xero's answer is on its way; long claims and tokens so
/// that neither the call is cut nor the answer expired when it lands.
fn slow_store_timings() -> Timings {
    Timings {
        access_token: Duration::from_secs(60),
        lease_secs: 20,
        ..Timings::default()
    }
}

#[tokio::test]
async fn a_409_on_the_store_with_the_presented_token_still_stored_is_retried() {
    let fx = token_fixture("proto-409-same", slow_store_timings()).await;
    let pending = refresh_with_the_answer_held(&fx).await;
    // Someone else changes the Secret (not its tokens) while the answer is on its way: the
    // holder's store, conditional on the version it claimed, meets a 409.
    patch_before_the_store(&fx, json!({}), json!({"example.com/touched": "yes"})).await;
    let t = pending.await.expect("join").expect("stored after the 409");
    let rec = fx.record().await;
    assert_eq!(
        rec.access_token.as_ref().map(Sensitive::expose),
        Some(t.token.expose()),
        "the holder's answer is what the Secret holds"
    );
    assert_eq!(rec.refreshed_by.as_deref(), Some("a"));
    assert_eq!(rec.rotation, 1);
    assert_eq!(rec.lease, f::Lease::None);
    let s = fx.secrets().get(&fx.secret).await.expect("secret");
    assert_eq!(
        s.metadata
            .annotations
            .unwrap_or_default()
            .get("example.com/touched")
            .map(String::as_str),
        Some("yes"),
        "the other change is kept"
    );
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, 1, "no second call for it");
    assert!(!report.chains[0].broken);
}

#[tokio::test]
async fn a_409_on_the_store_with_a_newer_token_stored_drops_the_answer() {
    let fx = token_fixture_with("proto-409-newer", slow_store_timings(), GraceReuse::Fork).await;
    let pending = refresh_with_the_answer_held(&fx).await;
    // A second claimer (clocks far apart) presented the same refresh token inside the grace
    // period, got a sibling and stored it first.
    let sibling: serde_json::Value = reqwest::Client::new()
        .post(fx.emulator.token_url())
        .basic_auth(
            xero_proving_ground::emulator::DEFAULT_CLIENT_ID,
            Some(xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET),
        )
        .form(&[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                fx.user.refresh_token.as_deref().expect("rt"),
            ),
        ])
        .send()
        .await
        .expect("sibling call")
        .json()
        .await
        .expect("sibling answer");
    let (sibling_at, sibling_rt) = (
        sibling["access_token"].as_str().expect("at").to_owned(),
        sibling["refresh_token"].as_str().expect("rt").to_owned(),
    );
    patch_before_the_store(
        &fx,
        json!({
            f::ACCESS_TOKEN: sibling_at,
            f::REFRESH_TOKEN: sibling_rt,
            f::EXPIRES_AT: f::format_time(std::time::SystemTime::now() + Duration::from_secs(50)),
        }),
        json!({f::ANN_REFRESHED_BY: "b", f::ANN_ROTATION: "1"}),
    )
    .await;
    let t = pending.await.expect("join").expect("the stored sibling");
    assert_eq!(
        t.token.expose(),
        sibling_at,
        "the stored token is handed out"
    );
    let rec = fx.record().await;
    assert_eq!(rec.refreshed_by.as_deref(), Some("b"), "not overwritten");
    assert_eq!(
        rec.refresh_token.as_ref().map(Sensitive::expose),
        Some(sibling_rt.as_str())
    );
    assert_eq!(rec.rotation, 1);
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, 2);
    let chain = &report.chains[0];
    assert_eq!((chain.forks, chain.broken), (1, false), "{chain:?}");
}

/// P34: only a 404 (the Secret was deleted) stops the store of a rotated pair.
#[tokio::test]
async fn a_store_into_a_deleted_secret_stops_with_not_found() {
    let fx = token_fixture("proto-store-404", slow_store_timings()).await;
    let pending = refresh_with_the_answer_held(&fx).await;
    fx.secrets()
        .delete(&fx.secret, &Default::default())
        .await
        .expect("delete the Secret");
    let result = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("the store gave up")
        .expect("join");
    assert!(
        matches!(result, Err(Error::SecretNotFound { .. })),
        "{result:?}"
    );
    assert_eq!(fx.report().await.counters.token_calls, 1);
}

#[tokio::test]
async fn invalid_grant_records_reauthorization_and_stops_all_calls_until_a_new_token() {
    let fx = token_fixture("proto-reauth", Timings::default()).await;
    fx.patch(json!({f::REFRESH_TOKEN: "revoked-or-garbage"}), json!({}))
        .await;
    let err = fx.refresher("a").get().await.expect_err("refused");
    assert!(matches!(err, Error::ReauthorizationRequired(_)), "{err}");
    assert_eq!(err.exit_code(), 3);
    let rec = fx.record().await;
    assert_eq!(
        rec.refresh_token.as_ref().map(Sensitive::expose),
        Some("revoked-or-garbage"),
        "Secret intact"
    );
    assert_eq!(
        rec.reauthorization_required_for,
        Some(Sensitive::new("revoked-or-garbage").fingerprint())
    );
    assert_eq!(rec.lease, f::Lease::None);
    // Nobody calls Xero again for that token.
    let calls = fx.report().await.counters.token_calls;
    assert!(matches!(
        fx.refresher("b").get().await,
        Err(Error::ReauthorizationRequired(_))
    ));
    assert_eq!(fx.report().await.counters.token_calls, calls);
    // A person authorises again: the new refresh token lifts it.
    fx.patch(
        json!({f::REFRESH_TOKEN: fx.user.refresh_token.clone().expect("rt")}),
        json!({}),
    )
    .await;
    fx.refresher("c").get().await.expect("works again");
    assert_eq!(fx.record().await.reauthorization_required_for, None);
}

#[tokio::test]
async fn invalid_grant_after_the_token_changed_meanwhile_is_a_lost_race_not_a_revocation() {
    let fx = token_fixture(
        "proto-race",
        Timings {
            lease_secs: 20,
            ..Timings::default()
        },
    )
    .await;
    // Xero answers invalid_grant after 5 s; meanwhile a person re-authorises and a new refresh
    // token lands in the Secret.
    fx.set_faults(Faults {
        latency: Duration::from_secs(5),
        script: [FaultKind::InvalidGrant].into(),
        ..Faults::default()
    })
    .await;
    let pending = tokio::spawn({
        let r = fx.refresher("a");
        async move { r.get().await }
    });
    // The refresh has reached Xero (its fate and latency are fixed on arrival).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fx.report().await.counters.token_calls == 0 {
        assert!(std::time::Instant::now() < deadline, "no call reached Xero");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.set_faults(Faults::default()).await;
    let family = fx
        .emulator
        .admin()
        .add_user(&xero_proving_ground::emulator::NewUser::default())
        .await
        .expect("second authorisation");
    fx.patch(
        json!({f::REFRESH_TOKEN: family.refresh_token.clone().expect("rt")}),
        json!({}),
    )
    .await;
    let t = pending.await.expect("join").expect("the new token is used");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(
        report.counters.token_outcomes.get("fault"),
        Some(&1),
        "the invalid_grant was served"
    );
    assert_eq!(
        report.counters.token_calls, 2,
        "then one call with the new token"
    );
    let rec = fx.record().await;
    assert_eq!(rec.reauthorization_required_for, None);
    assert_eq!(rec.lease, f::Lease::None, "no claim left behind");
    assert_eq!((rec.refreshed_by.as_deref(), rec.rotation), (Some("a"), 1));
}

#[tokio::test]
async fn rate_limits_are_waited_out_or_shared_with_everyone() {
    // A claim that leaves room to wait out a 1 s Retry-After on a busy machine.
    let fx = token_fixture(
        "proto-429",
        Timings {
            lease_secs: 15,
            ..Timings::default()
        },
    )
    .await;
    // A short Retry-After inside the claim: waited out, then success.
    set_script(&fx, &[FaultKind::RateLimit]).await;
    fx.refresher("a").get().await.expect("after the 429");
    assert_eq!(fx.report().await.counters.token_calls, 2);
    // A Retry-After longer than the claim: the claim is released with a retry-not-before that
    // keeps everyone from calling Xero.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    fx.emulator
        .admin()
        .set_limits(&RateLimits {
            app_per_minute: 1,
            ..RateLimits::default()
        })
        .await
        .expect("limits");
    let err = fx.refresher("b").get().await.expect_err("rate limited");
    assert!(
        matches!(
            err,
            Error::Xero(xero_operator::xero::XeroError::RateLimited { .. })
        ),
        "{err}"
    );
    let rec = fx.record().await;
    assert!(rec.retry_not_before.is_some());
    let calls = fx.report().await.counters.token_calls;
    let waiting = fx
        .refresher("c")
        .with_max_wait(Duration::from_secs(1))
        .get()
        .await;
    assert!(
        matches!(waiting, Err(Error::RateLimited { .. })),
        "{waiting:?}"
    );
    assert_eq!(waiting.as_ref().err().map(Error::exit_code), Some(9));
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "no call while told to wait"
    );
}

#[tokio::test]
async fn server_errors_and_timeouts_are_retried_within_the_claim() {
    // A claim long enough for its three calls with their backoff on a busy machine.
    let fx = token_fixture(
        "proto-5xx",
        Timings {
            lease_secs: 15,
            ..Timings::default()
        },
    )
    .await;
    set_script(&fx, &[FaultKind::Error, FaultKind::Timeout]).await;
    let t = fx
        .refresher("a")
        .with_xero_timeout(Duration::from_secs(2))
        .get()
        .await
        .expect("after retries");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(report.counters.token_calls, 3);
    assert!(!report.chains[0].broken);
    // Three failures: the claim's three calls are spent (however long it is), and everyone
    // backs off.
    fx.patch(json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}), json!({}))
        .await;
    set_script(
        &fx,
        &[FaultKind::Error, FaultKind::Unavailable, FaultKind::Timeout],
    )
    .await;
    let err = fx
        .refresher("b")
        .with_xero_timeout(Duration::from_secs(2))
        .get()
        .await
        .expect_err("three calls, then the backoff");
    assert!(matches!(err, Error::Xero(_)), "{err}");
    assert_eq!(fx.report().await.counters.token_calls, 3 + 3);
    let rec = fx.record().await;
    assert_eq!(rec.failed_attempts, 1);
    assert!(rec.retry_not_before.is_some());
}

#[tokio::test]
async fn xero_down_for_longer_than_the_claim_is_an_error_with_the_secret_intact() {
    let fx = token_fixture(
        "proto-down",
        Timings {
            lease_secs: 5,
            ..Timings::default()
        },
    )
    .await;
    fx.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let err = fx.refresher("a").get().await.expect_err("Xero down");
    assert!(
        matches!(
            err,
            Error::Xero(xero_operator::xero::XeroError::Unavailable(500))
        ),
        "{err}"
    );
    let rec = fx.record().await;
    assert_eq!(
        rec.refresh_token.as_ref().map(Sensitive::expose),
        fx.user.refresh_token.as_deref()
    );
    assert_eq!(rec.lease, f::Lease::None, "the claim was released");
}

#[tokio::test]
async fn an_unusable_answer_keeps_the_rotated_refresh_token() {
    let fx = token_fixture("proto-salvage", Timings::default()).await;
    // Xero rotates, then answers 200 with the new refresh token but no access token.
    set_script(&fx, &[FaultKind::RotatedWithoutAccessToken]).await;
    let t = fx
        .refresher("a")
        .get()
        .await
        .expect("after the unusable answer");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(report.counters.faults_injected, 1, "the fault was served");
    let chain = &report.chains[0];
    // The second call presented the salvaged token: two rotations, no grace reuse of the old
    // one (which a party that dropped the unusable answer would have made).
    assert_eq!(report.counters.token_calls, 2);
    assert_eq!(
        (chain.rotations, chain.grace_reuses, chain.broken),
        (2, 0, false)
    );
    let rec = fx.record().await;
    assert_eq!(rec.rotation, 2, "the salvage and the refresh each count");
    assert_eq!(rec.lease, f::Lease::None);
}

#[tokio::test]
async fn an_unprocessed_unusable_answer_is_retried_with_the_same_token() {
    let fx = token_fixture("proto-html", Timings::default()).await;
    set_script(&fx, &[FaultKind::Html, FaultKind::TruncatedJson]).await;
    let t = fx
        .refresher("a")
        .get()
        .await
        .expect("after unusable answers");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(report.counters.faults_injected, 2);
    assert_eq!(report.counters.token_calls, 3);
    let chain = &report.chains[0];
    assert_eq!(
        (chain.rotations, chain.grace_reuses, chain.broken),
        (1, 0, false)
    );
    assert_eq!(fx.record().await.rotation, 1);
}

#[tokio::test]
async fn garbage_in_the_secret_gives_clear_errors_or_safe_recovery() {
    // No refresh token at all: a clear state, no call.
    let fx = token_fixture("proto-garbage", Timings::default()).await;
    fx.patch(json!({f::REFRESH_TOKEN: ""}), json!({})).await;
    assert!(matches!(
        fx.refresher("a").get().await,
        Err(Error::NoRefreshToken)
    ));
    assert_eq!(fx.report().await.counters.token_calls, 0);

    // Unparsable expiry and a lease "from the future": refreshed and repaired.
    let fx = token_fixture("proto-garbage", Timings::default()).await;
    fx.patch(
        json!({f::ACCESS_TOKEN: "stale", f::EXPIRES_AT: "next tuesday"}),
        json!({f::ANN_HOLDER: "time-traveller", f::ANN_LEASE_EXPIRES: "2999-01-01T00:00:00Z"}),
    )
    .await;
    let t = fx.refresher("a").get().await.expect("recovered");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let rec = fx.record().await;
    assert!(matches!(rec.expiry, f::Expiry::At(_)));
    assert_eq!(rec.lease, f::Lease::None);

    // Missing client credentials: a clear error, refresh token untouched.
    let fx = token_fixture("proto-garbage", Timings::default()).await;
    fx.secrets()
        .patch(
            &fx.secret,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {f::CLIENT_SECRET: null}})),
        )
        .await
        .expect("patch");
    assert!(matches!(
        fx.refresher("a").get().await,
        Err(Error::MissingClientCredentials)
    ));
    assert_eq!(
        fx.record()
            .await
            .refresh_token
            .as_ref()
            .map(Sensitive::expose),
        fx.user.refresh_token.as_deref()
    );

    // Binary garbage in the refresh token is told apart from none: a person must authorise
    // again, and nobody calls Xero with it (never a panic).
    let fx = token_fixture("proto-garbage", Timings::default()).await;
    fx.secrets()
        .patch(
            &fx.secret,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {f::REFRESH_TOKEN: "//79"}})),
        )
        .await
        .expect("patch");
    let calls = fx.report().await.counters.token_calls;
    assert!(matches!(
        fx.refresher("a").get().await,
        Err(Error::UnreadableRefreshToken)
    ));
    assert_eq!(fx.report().await.counters.token_calls, calls, "no call");

    // A missing Secret.
    let gone = Refresher::new(
        fx.client.clone(),
        &fx.namespace,
        "no-such-secret",
        "a",
        xero_operator::protocol::Role::Consumer,
    );
    assert!(matches!(
        gone.get().await,
        Err(Error::SecretNotFound { .. })
    ));
}

/// Waits until the token Secret's record satisfies `done`.
async fn wait_for_record(
    fx: &common::TokenFixture,
    what: &str,
    done: impl Fn(&xero_operator::protocol::TokenRecord) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !done(&fx.record().await) {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_waiting_never_loses_the_rotated_pair() {
    // Tokens that outlive the held answer (a 3 s token held 2 s may arrive expired on a busy
    // machine and be refreshed again, which is right but not what this test is about).
    let fx = token_fixture(
        "proto-cancel",
        Timings {
            access_token: Duration::from_secs(60),
            ..Timings::default()
        },
    )
    .await;
    // Xero rotates at once but answers after 2 s; the caller gives up after half a second (a
    // timeout around get(), or the HTTP client of `xero-token serve` hanging up).
    fx.set_faults(Faults {
        latency: Duration::from_secs(2),
        ..Faults::default()
    })
    .await;
    let r = fx.refresher("impatient");
    let gave_up = tokio::time::timeout(Duration::from_millis(500), r.get()).await;
    assert!(gave_up.is_err(), "the caller stopped waiting");
    // The refresh goes on without it: the rotated pair is stored and the claim released.
    wait_for_record(&fx, "the rotated pair stored", |rec| {
        rec.rotation == 1 && rec.lease == f::Lease::None
    })
    .await;
    fx.set_faults(Faults::default()).await;
    let t = r.get().await.expect("the stored token");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    let report = fx.report().await;
    assert_eq!(
        report.counters.token_calls, 1,
        "nothing was refreshed twice"
    );
    assert_eq!(
        report.chains[0].grace_reuses, 0,
        "no grace-period recovery needed"
    );
    assert!(!report.chains[0].broken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_watches_until_its_own_deadline_when_the_claim_lasts_longer() {
    let fx = token_fixture(
        "proto-deadline",
        Timings {
            access_token: Duration::from_secs(60),
            lease_secs: 30,
            ..Timings::default()
        },
    )
    .await;
    // The holder's claim lasts 5 s at least (Xero's delay): long enough to be seen held.
    fx.set_faults(Faults {
        latency: Duration::from_secs(5),
        ..Faults::default()
    })
    .await;
    let holder = Arc::new(fx.refresher("holder"));
    let holding = tokio::spawn({
        let holder = holder.clone();
        async move { holder.get().await }
    });
    wait_for_record(
        &fx,
        "the holder's claim",
        |rec| matches!(&rec.lease, f::Lease::Held { holder, .. } if holder == "holder"),
    )
    .await;
    // The claim may last 30 s; this caller waits at most 15 s, and the holder stores in 5: a
    // watching waiter returns soon after the store, long before its own deadline.
    let asked = std::time::Instant::now();
    let t = fx
        .refresher("waiter")
        .with_max_wait(Duration::from_secs(15))
        .get()
        .await
        .expect("the waiter gets the holder's token within its own deadline");
    assert!(
        asked.elapsed() < Duration::from_secs(11),
        "woken by the store, not by its deadline: {:?}",
        asked.elapsed()
    );
    holding.await.expect("join").expect("the holder's token");
    assert!(fx.accepted_by_xero(t.token.expose()).await);
    assert_eq!(fx.report().await.counters.token_calls, 1);
}

/// Serves `app` on 127.0.0.1 as a stand-in for the API server (for behaviour a real one cannot
/// be made to show on cue); returns a client for it and the server's task.
async fn stub_api(
    app: axum::Router,
) -> (kube::Client, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client =
        kube::Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client");
    (client, server)
}

/// A handler for a stand-in API server that counts its requests in `count` and answers what
/// `answer` makes of the request's number (0 for the first).
fn counted<R, F>(
    count: &Arc<std::sync::atomic::AtomicU64>,
    answer: F,
) -> impl FnOnce() -> std::future::Ready<R> + Clone + Send + Sync + 'static
where
    F: FnOnce(u64) -> R + Clone + Send + Sync + 'static,
{
    let count = count.clone();
    move || {
        std::future::ready(answer(
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        ))
    }
}

/// A consumer `identity` of Secret `t` in namespace `n`, through a stand-in API server.
fn stand_in_consumer(client: kube::Client, identity: &str) -> Refresher {
    Refresher::new(
        client,
        "n",
        "t",
        identity,
        xero_operator::protocol::Role::Consumer,
    )
    // The stand-in Secrets' token URL: never called (no test here gets that far).
    .with_allowlist(xero_operator::allowlist::EndpointAllowlist::default().with("127.0.0.1", 1))
}

/// A GET route that answers `secret` and counts the reads.
fn serve_counted(
    reads: &Arc<std::sync::atomic::AtomicU64>,
    secret: serde_json::Value,
) -> axum::routing::MethodRouter {
    axum::routing::get(counted(reads, move |_| axum::Json(secret)))
}

/// The API server's answer for a failed request: status `code` with a `Status` body.
fn api_status(
    code: u16,
    reason: &str,
    message: &str,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    (
        axum::http::StatusCode::from_u16(code).expect("a status code"),
        axum::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": reason, "code": code, "message": message}),
        ),
    )
}

/// P21: a claim answered 409 (someone moved first) is followed by a fresh read and a new
/// decision; here the other party has stored a fresh token meanwhile, which is used without
/// calling Xero. A stand-in API server answers the claim 409 on cue.
#[tokio::test]
async fn a_claim_answered_409_reads_again_and_uses_what_was_stored() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (reads, patches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let creds =
        json!({f::REFRESH_TOKEN: "cnQ=", f::CLIENT_ID: "aWQ=", f::CLIENT_SECRET: "c2VjcmV0"});
    let secret = |rv: &str, access_token: &str, expires_at: String| {
        let mut data = creds.clone();
        data[f::ACCESS_TOKEN] = json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            access_token
        ));
        data[f::EXPIRES_AT] = json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            expires_at
        ));
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "t", "namespace": "n", "resourceVersion": rv,
                // Xero is not reachable from here: a call would end in an error, not a token.
                "annotations": {f::ANN_TOKEN_URL: "https://127.0.0.1:1/connect/token"}},
            "data": data})
    };
    let expired = secret("1", "old", "2000-01-01T00:00:00.000Z".into());
    let stored = secret(
        "2",
        "stored-by-another-party",
        f::format_time(std::time::SystemTime::now() + Duration::from_secs(600)),
    );
    let app = axum::Router::new().route(
        "/api/v1/namespaces/n/secrets/t",
        // The first read sees the expired token; after the 409, the stored one.
        axum::routing::get(counted(&reads, move |n| {
            axum::Json(if n == 0 { expired } else { stored })
        }))
        .patch(counted(&patches, |_| {
            api_status(409, "Conflict", "the object has been modified")
        })),
    );
    let (client, server) = stub_api(app).await;
    let got = stand_in_consumer(client, "claimer")
        .with_max_wait(Duration::from_secs(10))
        .get()
        .await;
    server.abort();
    let t = got.expect("the token the other party stored");
    assert_eq!(t.token.expose(), "stored-by-another-party");
    assert_eq!(
        patches.load(Ordering::Relaxed),
        1,
        "one claim, answered 409"
    );
    assert_eq!(reads.load(Ordering::Relaxed), 2, "then one fresh read");
}

/// P39: a watch that simply ends makes the waiter read again, but a proxy that ends every
/// watch at once must not turn that into a loop of reads. The real API server does not end
/// watches early, so a stand-in for such a proxy serves the Secret (with another party's live
/// claim) and answers every watch with an empty stream.
#[tokio::test]
async fn a_watch_that_ends_at_once_does_not_make_a_loop_of_reads() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (reads, watches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let claim_ends = f::format_time(std::time::SystemTime::now() + Duration::from_secs(25));
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "t", "namespace": "n", "resourceVersion": "7",
            "annotations": {f::ANN_HOLDER: "another-party", f::ANN_LEASE_EXPIRES: claim_ends,
                f::ANN_LEASE_DURATION: "30"}},
        "data": {f::REFRESH_TOKEN: "cnQ=", f::CLIENT_ID: "aWQ=", f::CLIENT_SECRET: "c2VjcmV0"},
    });
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/n/secrets/t",
            serve_counted(&reads, secret),
        )
        .route(
            "/api/v1/namespaces/n/secrets",
            axum::routing::get(counted(&watches, |_| {
                ([("content-type", "application/json")], "")
            })),
        );
    let (client, server) = stub_api(app).await;
    let waited = stand_in_consumer(client, "waiter")
        .with_max_wait(Duration::from_secs(3))
        .get()
        .await;
    server.abort();
    assert!(matches!(waited, Err(Error::Timeout(..))), "{waited:?}");
    let (reads, watches) = (
        reads.load(Ordering::Relaxed),
        watches.load(Ordering::Relaxed),
    );
    assert!(watches >= 1, "the waiter watched");
    // Each ended watch is followed by a read (at most one a second): a waiter that slept out
    // its wait instead would read once.
    assert!(
        reads >= 2,
        "{reads} reads: the waiter did not read again after a watch ended"
    );
    assert!(
        reads + watches <= 10,
        "{reads} reads and {watches} watches in a 3 s wait: a loop"
    );
}

/// The follower never loops against the API server: a watch that ends at once is renewed only
/// after a backoff (1 s, then 2 s, …), and a Deleted event moves it on from that version
/// instead of replaying it. A stand-in API server answers every watch with one Deleted event.
#[tokio::test]
async fn the_follower_backs_off_and_moves_past_a_deleted_secret() {
    use xero_operator::protocol::follow::{self, Keep};
    let queries = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let app = axum::Router::new().route(
        "/api/v1/namespaces/n/secrets",
        axum::routing::get({
            let queries = queries.clone();
            move |axum::extract::RawQuery(query): axum::extract::RawQuery| async move {
                queries
                    .lock()
                    .expect("lock")
                    .push(query.unwrap_or_default());
                json!({"type": "DELETED", "object": {"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "t", "namespace": "n", "resourceVersion": "7"}}})
                .to_string()
                    + "\n"
            }
        }),
    );
    let (client, server) = stub_api(app).await;
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, "n");
    let following = tokio::spawn(follow::run(
        api,
        "t".into(),
        "5".into(),
        || Keep::Watching,
        |_| Keep::Watching,
        || {},
        |_| {},
        follow::SILENCE_MAX,
    ));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    following.abort();
    server.abort();
    let queries = queries.lock().expect("lock").clone();
    assert!(
        (2..=4).contains(&queries.len()),
        "watches in 3.5 s: {queries:?}"
    );
    assert!(queries[0].contains("resourceVersion=5"), "{queries:?}");
    assert!(
        queries[1..].iter().all(|q| q.contains("resourceVersion=7")),
        "{queries:?}"
    );
}

/// One watch of a stand-in API server: the lines it sends, then whether it ends (`false`: it
/// never does and sends nothing more, like a connection that died without a reset).
type WatchScript = (Vec<String>, bool);

/// A stand-in API server whose n-th watch of `/api/v1/namespaces/n/secrets` plays
/// `scripts[n]` (the last one for all later watches). Counts the watches.
async fn stub_watches(
    scripts: Vec<WatchScript>,
) -> (
    kube::Client,
    tokio::task::JoinHandle<std::io::Result<()>>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use futures_util::StreamExt;
    let watches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let scripts = Arc::new(scripts);
    let app = axum::Router::new().route(
        "/api/v1/namespaces/n/secrets",
        axum::routing::get({
            let watches = watches.clone();
            move || async move {
                let n = watches.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize;
                let (lines, ends) = scripts[n.min(scripts.len() - 1)].clone();
                let sent =
                    futures_util::stream::iter(lines.into_iter().map(Ok::<_, std::io::Error>));
                if ends {
                    axum::body::Body::from_stream(sent)
                } else {
                    axum::body::Body::from_stream(sent.chain(futures_util::stream::pending()))
                }
            }
        }),
    );
    let (client, server) = stub_api(app).await;
    (client, server, watches)
}

/// A watch event line for Secret `t` at version `rv`.
fn watch_line(kind: &str, rv: &str) -> String {
    json!({"type": kind, "object": {"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "t", "namespace": "n", "resourceVersion": rv}}})
    .to_string()
        + "\n"
}

/// Follows Secret `t` through `client` with `silence` as the longest quiet watch; records what
/// `live` was told.
fn follow_recording(
    client: kube::Client,
    silence: Duration,
) -> (
    tokio::task::JoinHandle<xero_operator::protocol::follow::Ended>,
    Arc<std::sync::Mutex<Vec<bool>>>,
) {
    use xero_operator::protocol::follow::{self, Keep};
    let live = Arc::new(std::sync::Mutex::new(Vec::new()));
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, "n");
    let following = tokio::spawn(follow::run(
        api,
        "t".into(),
        "5".into(),
        || Keep::Watching,
        |_| Keep::Watching,
        || {},
        {
            let live = live.clone();
            move |open| live.lock().expect("lock").push(open)
        },
        silence,
    ));
    (following, live)
}

/// A follower watch whose connection went silent (broken without a reset: it never ends on its
/// own) is renewed once nothing came for the silence limit, on a server that has shown it sends
/// bookmarks; meanwhile the follower says it is not live, so its last version no longer stands
/// in for a read. On a server that sent no bookmark, a quiet watch is kept: the limit would cut
/// every quiet Secret's watch.
#[tokio::test]
async fn a_silent_follower_watch_is_renewed_once_the_server_has_shown_bookmarks() {
    let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Secret",
        "metadata": {"resourceVersion": "6"}}})
    .to_string()
        + "\n";
    for (first, renewed) in [(vec![bookmark], true), (vec![], false)] {
        let (client, server, watches) = stub_watches(vec![(first, false)]).await;
        let started = std::time::Instant::now();
        let (following, live) = follow_recording(client, Duration::from_millis(300));
        let count = || watches.load(std::sync::atomic::Ordering::Relaxed);
        if renewed {
            // 300 ms of silence, the 1 s wait after a watch that lasted under a second, the
            // second watch.
            wait_until(Duration::from_secs(20), || count() >= 2).await;
            let took = started.elapsed();
            following.abort();
            server.abort();
            assert_eq!(count(), 2, "the silent watch was renewed once");
            assert!(
                took >= Duration::from_millis(1300),
                "renewed after {took:?}"
            );
            assert_eq!(live.lock().expect("lock")[..2], [true, false]);
        } else {
            // Several silence limits pass without a bookmark ever coming: the watch is kept.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            following.abort();
            server.abort();
            assert_eq!(count(), 1, "a quiet watch without bookmarks was cut");
            assert_eq!(*live.lock().expect("lock"), [true]);
        }
    }
}

/// Waits until `done` holds, checking every 20 ms; gives up after `within` (the caller's
/// assertions then say what was missing).
async fn wait_until(within: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Deleted event ends what the follower stands in for: it tells its owner it is not live (so
/// reads ask the API server, which says the Secret is gone), also across a renewed watch, until
/// a watch delivers the Secret again.
#[tokio::test]
async fn a_deleted_secret_is_no_longer_stood_in_for_until_it_is_back() {
    let (client, server, watches) = stub_watches(vec![
        (vec![watch_line("DELETED", "7")], true),
        (vec![watch_line("ADDED", "9")], false),
    ])
    .await;
    let (following, live) = follow_recording(client, xero_operator::protocol::follow::SILENCE_MAX);
    // The first watch ends at once after the Deleted: the second comes after 1 s.
    wait_until(Duration::from_secs(20), || {
        live.lock().expect("lock").len() >= 5
    })
    .await;
    let finished = following.is_finished();
    following.abort();
    server.abort();
    assert!(!finished, "the follower goes on watching");
    assert_eq!(watches.load(std::sync::atomic::Ordering::Relaxed), 2);
    // Open, deleted, ended; the renewed watch opens not live, and is live once the Secret is back.
    assert_eq!(
        *live.lock().expect("lock"),
        [true, false, false, false, true]
    );
}

/// A consumer whose RBAC refuses the watch (a Role without `watch`) uses its tokens as before,
/// and does not ask for the refused watch again on every get: one refusal pauses following.
#[tokio::test]
async fn a_refused_follower_watch_is_not_asked_for_on_every_get() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (reads, watches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let expires = f::format_time(std::time::SystemTime::now() + Duration::from_secs(600));
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "t", "namespace": "n", "resourceVersion": "3"},
        "data": {
            f::ACCESS_TOKEN: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "usable"),
            f::EXPIRES_AT: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, expires),
            f::REFRESH_TOKEN: "cnQ=", f::CLIENT_ID: "aWQ=", f::CLIENT_SECRET: "c2VjcmV0"}});
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/n/secrets/t",
            serve_counted(&reads, secret),
        )
        .route(
            "/api/v1/namespaces/n/secrets",
            axum::routing::get(counted(&watches, |_| {
                api_status(403, "Forbidden", "secrets is forbidden: cannot watch")
            })),
        );
    let (client, server) = stub_api(app).await;
    let consumer = stand_in_consumer(client, "consumer");
    for _ in 0..30 {
        let t = consumer.get().await.expect("the stored token");
        assert_eq!(t.token.expose(), "usable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.abort();
    assert_eq!(reads.load(Ordering::Relaxed), 1, "one read, then the cache");
    assert_eq!(
        watches.load(Ordering::Relaxed),
        1,
        "the refused watch was asked for again"
    );
}

/// A token Secret `t` for a stand-in API server: version `rv`, access token `token` usable
/// until `expires` (no clock skew), and `annotations` besides.
fn stand_in_secret(
    rv: &str,
    token: &str,
    expires: std::time::SystemTime,
    annotations: serde_json::Value,
) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut annotations = annotations;
    annotations[f::ANN_CLOCK_SKEW] = "0".into();
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "t", "namespace": "n", "resourceVersion": rv,
            "annotations": annotations},
        "data": {
            f::ACCESS_TOKEN: b64(token),
            f::EXPIRES_AT: b64(&f::format_time(expires)),
            f::REFRESH_TOKEN: b64("rt"), f::CLIENT_ID: b64("id"), f::CLIENT_SECRET: b64("secret")}})
}

/// A wait that would end in an error is decided on the API server's answer, not on the
/// follower's version, which may lag behind a write: here the follower last delivered a backoff
/// longer than the caller's deadline (retrying cannot end in time), while the API server already
/// holds a new token, which the caller gets.
#[tokio::test]
async fn a_give_up_seen_on_the_follower_is_checked_with_the_api_server_first() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;
    let started = SystemTime::now();
    let first = stand_in_secret(
        "3",
        "first",
        started + Duration::from_millis(1500),
        json!({}),
    );
    // What the follower delivers: the first token, now with a backoff a minute long.
    let backoff = json!({
        f::ANN_RETRY_NOT_BEFORE: f::format_time(started + Duration::from_secs(60)),
    });
    let stale = stand_in_secret("4", "first", started + Duration::from_millis(1500), backoff);
    // What the API server holds by then: a new token.
    let stored = stand_in_secret("5", "second", started + Duration::from_secs(600), json!({}));
    let (reads, watches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/n/secrets/t",
            axum::routing::get(counted(&reads, move |n| {
                axum::Json(if n == 0 { first } else { stored })
            })),
        )
        .route(
            "/api/v1/namespaces/n/secrets",
            axum::routing::get(counted(&watches, move |_| {
                use futures_util::StreamExt;
                let line = json!({"type": "MODIFIED", "object": stale}).to_string() + "\n";
                axum::body::Body::from_stream(
                    futures_util::stream::iter([Ok::<_, std::io::Error>(line)])
                        .chain(futures_util::stream::pending()),
                )
            })),
        );
    let (client, server) = stub_api(app).await;
    let consumer = stand_in_consumer(client, "consumer").with_max_wait(Duration::from_secs(2));
    // The first get reads the Secret; the second, from the cache, starts following it.
    for _ in 0..2 {
        let t = consumer.get().await.expect("the first token");
        assert_eq!(t.token.expose(), "first");
    }
    // The follower's watch delivers the backoff (without it, the last get would read the API
    // server anyway and prove nothing) …
    wait_until(Duration::from_secs(1), || {
        watches.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert_eq!(watches.load(Ordering::Relaxed), 1, "the follower watched");
    // … and the first token runs out.
    let run_out = started + Duration::from_millis(1600);
    tokio::time::sleep(
        run_out
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let got = consumer.get().await;
    server.abort();
    let got = got.expect("the token the API server holds, not a give-up on the follower's word");
    assert_eq!(got.token.expose(), "second");
    assert_eq!(
        reads.load(Ordering::Relaxed),
        2,
        "one read, then one to check"
    );
}

/// A refusal that arrives inside an open watch (an ERROR event with 403, as when the consumer's
/// Role loses `watch` while it follows) ends following as a refused request does: not live, no
/// new watch.
#[tokio::test]
async fn a_refusal_inside_the_watch_stream_ends_following() {
    use xero_operator::protocol::follow::{Ended, SILENCE_MAX};
    let refused = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": "secrets \"t\" is forbidden: cannot watch"}})
    .to_string()
        + "\n";
    let (client, server, watches) =
        stub_watches(vec![(vec![watch_line("MODIFIED", "6"), refused], false)]).await;
    let (following, live) = follow_recording(client, SILENCE_MAX);
    let ended = tokio::time::timeout(Duration::from_secs(10), following).await;
    server.abort();
    let ended = ended
        .expect("following ended")
        .expect("the follower's task");
    assert_eq!(ended, Ended::Refused);
    assert_eq!(watches.load(std::sync::atomic::Ordering::Relaxed), 1);
    let live = live.lock().expect("lock").clone();
    assert_eq!(
        (live.first(), live.last()),
        (Some(&true), Some(&false)),
        "{live:?}"
    );
}
