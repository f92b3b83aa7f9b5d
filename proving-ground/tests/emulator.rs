//! The Xero emulator over real HTTP: every rule the operator depends on, each fault kind, the
//! chain report, and the binary's command line.

use std::time::{Duration, Instant};

use xero_proving_ground::procs::{Procs, first_line};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::Value;
use xero_operator::xero::pkce_challenge;
use xero_proving_ground::emulator::{
    Behaviour, Config, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator, FaultKind, Faults,
    GraceReuse, Lifetimes, NewUser, RateLimits, SeededUser,
};

fn short_lifetimes() -> Lifetimes {
    Lifetimes {
        access_token: Duration::from_secs(1),
        refresh_token: Duration::from_secs(3),
        grace: Duration::from_millis(1500),
        auth_code: Duration::from_secs(60),
    }
}

async fn emulator_with(behaviour: Behaviour) -> (Emulator, SeededUser) {
    let emu = Emulator::start(Config {
        behaviour,
        hang: Duration::from_secs(30),
        ..Config::default()
    })
    .await
    .expect("emulator starts");
    let user = emu
        .admin()
        .add_user(&NewUser::default())
        .await
        .expect("seed user");
    (emu, user)
}

async fn emulator() -> (Emulator, SeededUser) {
    emulator_with(Behaviour {
        lifetimes: short_lifetimes(),
        ..Behaviour::default()
    })
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

/// A refresh with HTTP Basic client authentication (xero-node style).
async fn refresh(emu: &Emulator, token: &str) -> reqwest::Result<reqwest::Response> {
    http()
        .post(emu.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
        .send()
        .await
}

async fn refresh_ok(emu: &Emulator, token: &str) -> Value {
    let resp = refresh(emu, token).await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.expect("json")
}

async fn refresh_err(emu: &Emulator, token: &str) -> (StatusCode, Value) {
    let resp = refresh(emu, token).await.expect("send");
    let status = resp.status();
    (status, resp.json().await.expect("error json"))
}

fn rt(v: &Value) -> String {
    v["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned()
}

async fn chain(emu: &Emulator) -> xero_proving_ground::emulator::ChainReport {
    let report = emu.admin().report().await.expect("report");
    assert_eq!(report.chains.len(), 1, "{:?}", report.chains);
    report.chains[0].clone()
}

#[tokio::test]
async fn refresh_rotates_with_basic_or_form_client_auth() {
    let (emu, user) = emulator().await;
    let first = refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 1);
    assert_eq!(first["scope"], "offline_access accounting.transactions");
    // xero-python style: credentials in the form body.
    let second: Value = http()
        .post(emu.token_url())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt(&first)),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
        ])
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_ne!(rt(&second), rt(&first));
    assert_ne!(second["access_token"], first["access_token"]);
    let c = chain(&emu).await;
    assert_eq!((c.rotations, c.issued, c.broken), (2, 3, false));
}

#[tokio::test]
async fn wrong_client_credentials_are_invalid_client() {
    let (emu, user) = emulator().await;
    let resp = http()
        .post(emu.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some("wrong"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", user.refresh_token.as_deref().expect("rt")),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "invalid_client"
    );
    let resp = http()
        .post(emu.token_url())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "x"),
            ("client_id", "nobody"),
            ("client_secret", "x"),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "invalid_client"
    );
    let resp = http()
        .post(emu.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.json::<Value>().await.expect("json")["error"],
        "unsupported_grant_type"
    );
}

#[tokio::test]
async fn grace_period_same_pair_mode_replays_the_first_answer() {
    let (emu, user) = emulator().await;
    let t0 = user.refresh_token.expect("rt");
    let first = refresh_ok(&emu, &t0).await;
    let again = refresh_ok(&emu, &t0).await;
    assert_eq!(first, again);
    let c = chain(&emu).await;
    assert_eq!((c.grace_reuses, c.forks, c.broken), (1, 0, false));
}

#[tokio::test]
async fn grace_period_fork_mode_issues_a_second_valid_successor() {
    let (emu, user) = emulator_with(Behaviour {
        lifetimes: short_lifetimes(),
        grace_reuse: GraceReuse::Fork,
        ..Behaviour::default()
    })
    .await;
    let t0 = user.refresh_token.expect("rt");
    let a = refresh_ok(&emu, &t0).await;
    let b = refresh_ok(&emu, &t0).await;
    assert_ne!(rt(&a), rt(&b));
    refresh_ok(&emu, &rt(&a)).await;
    refresh_ok(&emu, &rt(&b)).await;
    let c = chain(&emu).await;
    assert_eq!((c.forks, c.unused_heads, c.broken), (1, 2, false));
}

#[tokio::test]
async fn reuse_after_grace_is_invalid_grant_and_the_report_shows_a_broken_chain() {
    let (emu, user) = emulator().await;
    let t0 = user.refresh_token.expect("rt");
    // Party A refreshes; party B still holds t0 and uses it after the grace period.
    let a = refresh_ok(&emu, &t0).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (status, body) = refresh_err(&emu, &t0).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    // Reuse detection revoked the family: A's newest token is dead too.
    let (_, body) = refresh_err(&emu, &rt(&a)).await;
    assert_eq!(body["error"], "invalid_grant");
    let c = chain(&emu).await;
    assert_eq!(c.dead_token_uses, 1);
    assert!(c.broken, "{c:?}");
    assert_eq!(
        emu.admin().report().await.expect("report").broken_chains(),
        1
    );
}

#[tokio::test]
async fn a_well_behaved_sequence_reports_a_clean_chain() {
    let (emu, user) = emulator().await;
    let mut token = user.refresh_token.expect("rt");
    for _ in 0..5 {
        token = rt(&refresh_ok(&emu, &token).await);
    }
    let c = chain(&emu).await;
    assert_eq!(
        (
            c.rotations,
            c.grace_reuses,
            c.dead_token_uses,
            c.unused_heads
        ),
        (5, 0, 0, 1)
    );
    assert!(!c.broken);
}

#[tokio::test]
async fn access_tokens_expire_with_xeros_401_body() {
    let (emu, user) = emulator().await;
    let pair = refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    let access = pair["access_token"].as_str().expect("at");
    let ok = http()
        .get(emu.connections_url())
        .bearer_auth(access)
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(ok.headers().contains_key("x-appminlimit-remaining"));
    let list: Vec<Value> = ok.json().await.expect("json");
    assert_eq!(list[0]["tenantName"], "Demo Company");
    assert_eq!(list[0]["tenantType"], "ORGANISATION");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = http()
        .get(emu.connections_url())
        .bearer_auth(access)
        .send()
        .await
        .expect("send");
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    let body: Value = expired.json().await.expect("json");
    assert_eq!(body["Status"], 401);
    assert!(
        body["Detail"]
            .as_str()
            .expect("detail")
            .starts_with("TokenExpired: token expired at ")
    );
}

#[tokio::test]
async fn an_unused_refresh_token_expires() {
    let (emu, user) = emulator().await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, body) = refresh_err(&emu, user.refresh_token.as_deref().expect("rt")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn revocation_kills_the_token_and_disconnects_every_tenant() {
    let (emu, user) = emulator().await;
    let pair = refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    let resp = http()
        .post(emu.revocation_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("token", rt(&pair).as_str())])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, body) = refresh_err(&emu, &rt(&pair)).await;
    assert_eq!(body["error"], "invalid_grant");
    let c = chain(&emu).await;
    assert!(!c.broken, "a deliberate revocation is not a broken chain");
}

#[tokio::test]
async fn connections_filter_by_auth_event_and_delete() {
    let (emu, user) = emulator().await;
    let pair = refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    let access = pair["access_token"].as_str().expect("at");
    let event = user.connections[0].auth_event_id.clone();
    let get = |q: &str| {
        let url = format!("{}{q}", emu.connections_url());
        async move {
            http()
                .get(url)
                .bearer_auth(access)
                .send()
                .await
                .expect("send")
                .json::<Vec<Value>>()
                .await
                .expect("json")
        }
    };
    assert_eq!(get(&format!("?authEventId={event}")).await.len(), 1);
    assert_eq!(get("?authEventId=other").await.len(), 0);
    let url = format!("{}/{}", emu.connections_url(), user.connections[0].id);
    let deleted = http()
        .delete(&url)
        .bearer_auth(access)
        .send()
        .await
        .expect("send");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let again = http()
        .delete(&url)
        .bearer_auth(access)
        .send()
        .await
        .expect("send");
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    // The token is still valid while no tenant is connected: 200 [].
    assert!(get("").await.is_empty());
}

#[tokio::test]
async fn client_credentials_for_a_custom_connection() {
    let emu = Emulator::start(Config::default()).await.expect("start");
    emu.admin()
        .add_user(&NewUser {
            custom_connection: true,
            ..NewUser::default()
        })
        .await
        .expect("seed");
    let resp: Value = http()
        .post(emu.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(resp["access_token"].is_string());
    assert!(resp.get("refresh_token").is_none());
    assert_eq!(resp["expires_in"], 1800);
}

#[tokio::test]
async fn authorization_code_with_pkce_end_to_end() {
    let (emu, _) = emulator().await;
    let verifier = "0123456789abcdefghijklmnopqrstuvwxyz-0123456789";
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let authorize = |challenge: String| {
        let client = no_redirects.clone();
        let url = format!("{}/identity/connect/authorize", emu.base_url());
        async move {
            let resp = client
                .get(url)
                .query(&[
                    ("response_type", "code"),
                    ("client_id", DEFAULT_CLIENT_ID),
                    ("redirect_uri", "http://127.0.0.1:1/callback"),
                    ("scope", "openid offline_access accounting.transactions"),
                    ("state", "xyz"),
                    ("code_challenge", challenge.as_str()),
                    ("code_challenge_method", "S256"),
                ])
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::SEE_OTHER);
            let location = reqwest::Url::parse(resp.headers()["location"].to_str().expect("ascii"))
                .expect("url");
            assert_eq!(location.path(), "/callback");
            let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
            assert_eq!(q["state"], "xyz");
            q["code"].clone()
        }
    };
    let exchange = |code: String, verifier: &'static str| {
        let url = emu.token_url();
        async move {
            http()
                .post(url)
                .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("redirect_uri", "http://127.0.0.1:1/callback"),
                    ("code_verifier", verifier),
                ])
                .send()
                .await
                .expect("send")
        }
    };
    let code = authorize(pkce_challenge(verifier)).await;
    let wrong = exchange(code.clone(), "not-the-verifier").await;
    assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        wrong.json::<Value>().await.expect("json")["error"],
        "invalid_grant"
    );
    let code = authorize(pkce_challenge(verifier)).await;
    let ok: Value = exchange(code.clone(), verifier)
        .await
        .json()
        .await
        .expect("json");
    assert!(ok["refresh_token"].is_string(), "{ok}");
    assert_eq!(ok["scope"], "openid offline_access accounting.transactions");
    let reused = exchange(code, verifier).await;
    assert_eq!(
        reused.json::<Value>().await.expect("json")["error"],
        "invalid_grant"
    );
}

#[tokio::test]
async fn access_tokens_are_jwts_verifiable_with_the_published_jwks() {
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let (emu, user) = emulator().await;
    let pair = refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    let token = pair["access_token"].as_str().expect("at");
    let jwks: Value = http()
        .get(format!(
            "{}/.well-known/openid-configuration/jwks",
            emu.base_url()
        ))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key = &jwks["keys"][0];
    let mut point = vec![4u8];
    point.extend(b64.decode(key["x"].as_str().expect("x")).expect("x"));
    point.extend(b64.decode(key["y"].as_str().expect("y")).expect("y"));
    let (input, sig) = token.rsplit_once('.').expect("jwt");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(input.as_bytes(), &b64.decode(sig).expect("sig"))
        .expect("verifies");
    let claims: Value = serde_json::from_slice(
        &b64.decode(input.split('.').nth(1).expect("claims"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(claims["sub"], user.user_id.as_str());
    assert_eq!(claims["client_id"], DEFAULT_CLIENT_ID);
    assert!(claims["authentication_event_id"].is_string());
    assert_eq!(
        claims["exp"].as_u64().expect("exp") - claims["nbf"].as_u64().expect("nbf"),
        1
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_xeros_headers() {
    let (emu, user) = emulator().await;
    emu.admin()
        .set_limits(&RateLimits {
            app_per_minute: 3,
            tenant_per_minute: 1,
            ..RateLimits::default()
        })
        .await
        .expect("limits");
    let pair = refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await; // 1 app call
    let access = pair["access_token"].as_str().expect("at");
    let tenant = user.connections[0].tenant_id.as_str();
    let api = || {
        http()
            .get(format!("{}/api.xro/2.0/Organisation", emu.base_url()))
            .bearer_auth(access)
            .header("xero-tenant-id", tenant)
            .send()
    };
    let first = api().await.expect("send"); // 2 app calls
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-minlimit-remaining"], "0");
    assert_eq!(first.headers()["x-daylimit-remaining"], "4999");
    assert_eq!(first.headers()["x-appminlimit-remaining"], "1");
    let second = api().await.expect("send");
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.headers()["x-rate-limit-problem"], "minute");
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!((1..=60).contains(&retry), "{retry}");
    let conn = http()
        .get(emu.connections_url())
        .bearer_auth(access)
        .send()
        .await
        .expect("send"); // 3
    assert_eq!(conn.status(), StatusCode::OK);
    let over = http()
        .get(emu.connections_url())
        .bearer_auth(access)
        .send()
        .await
        .expect("send");
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        over.headers()["x-rate-limit-problem"]
            .to_str()
            .expect("ascii")
            .eq_ignore_ascii_case("AppMinute")
    );
    // Token calls count against the app limit too.
    let (status, _) = (refresh(&emu, &rt(&pair)).await.expect("send").status(), ());
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let unknown_tenant = http()
        .get(format!("{}/api.xro/2.0/Organisation", emu.base_url()))
        .bearer_auth(access)
        .header("xero-tenant-id", "not-connected")
        .send()
        .await
        .expect("send");
    assert_eq!(unknown_tenant.status(), StatusCode::FORBIDDEN);
}

async fn set_script(emu: &Emulator, script: &[FaultKind]) {
    emu.admin()
        .set_faults(&Faults::scripted(script))
        .await
        .expect("faults");
}

#[tokio::test]
async fn fault_server_errors_do_not_process_the_request() {
    let (emu, user) = emulator().await;
    let t0 = user.refresh_token.expect("rt");
    set_script(&emu, &[FaultKind::Error, FaultKind::Unavailable]).await;
    assert_eq!(
        refresh(&emu, &t0).await.expect("send").status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        refresh(&emu, &t0).await.expect("send").status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(chain(&emu).await.rotations, 0);
    refresh_ok(&emu, &t0).await;
    let report = emu.admin().report().await.expect("report");
    assert_eq!(report.counters.token_calls, 3);
    assert_eq!(report.counters.token_outcomes["fault"], 2);
}

#[tokio::test]
async fn fault_timeout_leaves_the_client_waiting() {
    let (emu, user) = emulator().await;
    set_script(&emu, &[FaultKind::Timeout]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let err = client
        .post(emu.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", user.refresh_token.as_deref().expect("rt")),
        ])
        .send()
        .await
        .expect_err("times out");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(chain(&emu).await.rotations, 0);
}

#[tokio::test]
async fn fault_drop_response_processes_the_refresh_and_loses_the_answer() {
    let (emu, user) = emulator().await;
    let t0 = user.refresh_token.expect("rt");
    set_script(&emu, &[FaultKind::DropResponse]).await;
    let lost = match refresh(&emu, &t0).await {
        Err(e) => e,
        Ok(resp) => resp
            .json::<Value>()
            .await
            .expect_err("the body never arrives"),
    };
    assert!(!lost.is_status(), "{lost}");
    // Xero rotated the token although nobody got the answer...
    assert_eq!(chain(&emu).await.rotations, 1);
    // ...and the grace period is how the caller recovers it.
    let recovered = refresh_ok(&emu, &t0).await;
    refresh_ok(&emu, &rt(&recovered)).await;
    let c = chain(&emu).await;
    assert_eq!((c.grace_reuses, c.broken), (1, false));
}

#[tokio::test]
async fn fault_rate_limit_html_and_truncated_json() {
    let (emu, user) = emulator().await;
    let t0 = user.refresh_token.expect("rt");
    set_script(
        &emu,
        &[
            FaultKind::RateLimit,
            FaultKind::Html,
            FaultKind::TruncatedJson,
        ],
    )
    .await;
    let limited = refresh(&emu, &t0).await.expect("send");
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers().contains_key("retry-after"));
    let html = refresh(&emu, &t0).await.expect("send");
    assert!(html.json::<Value>().await.is_err());
    let cut = refresh(&emu, &t0).await.expect("send");
    assert!(cut.json::<Value>().await.is_err());
    assert_eq!(chain(&emu).await.rotations, 0);
}

#[tokio::test]
async fn fault_latency_delays_answers_and_rates_are_validated() {
    let (emu, user) = emulator().await;
    emu.admin()
        .set_faults(&Faults {
            latency: Duration::from_millis(300),
            ..Faults::default()
        })
        .await
        .expect("faults");
    let started = Instant::now();
    refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "latency was injected"
    );
    let bad = emu
        .admin()
        .set_faults(&Faults {
            error_rate: 2.0,
            ..Faults::default()
        })
        .await;
    assert!(
        bad.expect_err("refused")
            .to_string()
            .contains("error_rate must be between 0 and 1")
    );
}

#[tokio::test]
async fn reset_forgets_users_counters_and_faults() {
    let (emu, user) = emulator().await;
    refresh_ok(&emu, user.refresh_token.as_deref().expect("rt")).await;
    emu.admin().reset().await.expect("reset");
    let report = emu.admin().report().await.expect("report");
    assert_eq!(report.counters.token_calls, 0);
    assert!(report.chains.is_empty());
}

#[test]
fn the_binary_documents_every_flag_and_serves_on_a_free_port() {
    let bin = env!("CARGO_BIN_EXE_xero-emulator");
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--port",
        "--client",
        "--access-token-ttl",
        "--refresh-token-ttl",
        "--grace ",
        "--auth-code-ttl",
        "--grace-reuse",
        "--reuse-detection",
        "--app-per-minute",
        "--tenant-per-minute",
        "--tenant-per-day",
        "--tenant-concurrent",
        "--error-rate",
        "--timeout-rate",
        "--drop-response-rate",
        "--rate-limit-rate",
        "--latency",
        "--fault-endpoint",
        "--hang",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    let bad = std::process::Command::new(bin)
        .args(["--client", "no-colon"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("CLIENT_ID:CLIENT_SECRET"));

    let mut child = Procs(vec![
        std::process::Command::new(bin)
            .args(["--port", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start"),
    ]);
    let stdout = child.0[0].stdout.take().expect("stdout");
    let line = first_line(stdout, Duration::from_secs(30), |l| {
        l.starts_with("listening on ")
    })
    .expect("the emulator printed its address");
    let port: u16 = line
        .strip_prefix("listening on http://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("address line, got {line:?}"));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    std::io::Write::write_all(&mut conn, b"GET /_admin/health HTTP/1.0\r\n\r\n").expect("write");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).expect("read");
    drop(child);
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.ends_with("ok"),
        "{answer}"
    );
}
