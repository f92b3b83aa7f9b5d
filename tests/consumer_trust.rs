//! The token Secret is a trust root (docs/security.md): every consumer may patch it, and may
//! move the refresh along (claim, release, store, the protocol's markers), nothing else.
//!
//! Each attack is made by a real consumer — the ServiceAccount `worker`, with exactly the
//! `get, watch, patch` on its one token Secret that the controller grants — against a real API
//! server with the garbage collector running, while the controller runs as the chart's
//! ServiceAccount with the chart's RBAC. Each runs twice:
//! - **with the chart's admission policies**: the API server refuses the write (403, naming the
//!   policy), and the real consumers, the person's CLIs and the controller keep working;
//! - **without them**: the write lands, and the code holds (the controller puts the Secret
//!   back and never acts on what the consumer wrote; the CLIs read nothing that matters from
//!   the Secret). What only admission can stop (an owner reference that has the garbage
//!   collector delete the Secret) is tested with the policies alone and listed in
//!   docs/security.md.

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::chart::{self, Policies};
use common::connection::{self, CONTROLLER_ID, Running};
use common::{Timings, TokenFixture, token_fixture};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format as f;
use xero_proving_ground::emulator::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET};

/// How long the controller gets to notice a change and put the Secret back: far less than a
/// token's life (the tests' tokens live 10 minutes), so only a wake-up, not a timed reconcile,
/// can do it in time.
const NOTICE: Duration = Duration::from_secs(15);

/// Long-lived tokens: nothing is due unless a test makes it so.
fn timings() -> Timings {
    Timings {
        access_token: Duration::from_secs(600),
        ..Timings::default()
    }
}

/// One connection `acme` with the consumer `worker`, its controller running as the chart's
/// ServiceAccount, with or without the chart's admission policies.
struct Scene {
    fx: TokenFixture,
    policies: Policies,
    /// The chart's ServiceAccount, as itself.
    operator: Client,
    /// The consumer `worker`, as itself.
    consumer: Client,
    controller: Option<Running>,
    /// The client ids the controller's per-app gate gave permits to (its metrics' series).
    permitted_apps: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Scene {
    async fn new(hint: &str, policies: Policies, extra_spec: Value) -> Self {
        let fx = token_fixture(hint, timings()).await;
        common::install_crds(&fx.client).await;
        let ns = fx.namespace.clone();
        let release = format!("xo-{}", &ns[ns.len() - 5..]);
        let operator = chart::operator_client(&fx.client, &ns, &release, policies).await;
        let mut spec = json!({"consumers": [{"serviceAccount": "worker"}]});
        for (k, v) in extra_spec.as_object().expect("spec object") {
            spec[k] = v.clone();
        }
        connection::create(&fx, "acme", &fx.secret, timings(), spec).await;
        let permitted_apps = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let seen = permitted_apps.clone();
        let gate = xero_operator::protocol::gate::AppGate::per_minute(
            std::num::NonZeroU32::new(1000).expect("nonzero"),
        )
        .with_on_permit(move |app| {
            seen.lock().expect("apps").insert(app.to_owned());
        });
        let controller =
            connection::start_controller_as(&operator, &ns, fx.emulator.allowlist(), |ctx| {
                ctx.gate = Some(gate);
                // These attacks expire the token right after a refresh and expect the
                // controller at once; the minute-long interval is proven in tests/isolation.rs.
                ctx.min_call_interval = Duration::from_secs(1);
            });
        connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
        let consumer = chart::service_account_client(&fx.client, &ns, "worker").await;
        let scene = Self {
            fx,
            policies,
            operator,
            consumer,
            controller: Some(controller),
            permitted_apps,
        };
        // The grant is the controller's: wait until the consumer can read its Secret.
        scene
            .until("the consumer can read its Secret", || async {
                scene.consumer_secrets().get(&scene.fx.secret).await.is_ok()
            })
            .await;
        scene
    }

    fn ns(&self) -> &str {
        &self.fx.namespace
    }

    fn consumer_secrets(&self) -> Api<Secret> {
        Api::namespaced(self.consumer.clone(), self.ns())
    }

    /// The token Secret as the admin reads it.
    async fn secret(&self) -> Secret {
        self.fx
            .secrets()
            .get(&self.fx.secret)
            .await
            .expect("token Secret")
    }

    /// The consumer's merge patch of its token Secret.
    async fn consumer_patch(&self, body: Value) -> Result<Secret, kube::Error> {
        self.consumer_secrets()
            .patch(
                &self.fx.secret,
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
    }

    /// A consumer write that is no part of the protocol: refused by the API server with the
    /// policies, landed without them.
    async fn consumer_forges(&self, what: &str, body: Value) {
        let attempt = self.consumer_patch(body).await;
        match self.policies {
            Policies::On => assert_refused_by_policy(&attempt, what),
            Policies::Off => {
                attempt.unwrap_or_else(|e| panic!("{what}: lands without the policies: {e}"));
            }
        }
    }

    /// Waits up to [`NOTICE`] for `check`.
    async fn until<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + NOTICE;
        while !check().await {
            assert!(Instant::now() < deadline, "{what}: not within {NOTICE:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the controller (for what a person or a consumer does on its own).
    async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.stop().await;
        }
    }
}

fn assert_refused_by_policy<T: std::fmt::Debug>(attempt: &Result<T, kube::Error>, what: &str) {
    match attempt {
        Err(kube::Error::Api(s))
            if s.code == 403 && s.message.contains("ValidatingAdmissionPolicy") => {}
        Err(e) => panic!("{what}: must be refused by the chart's admission policy, got {e}"),
        Ok(_) => panic!("{what}: must be refused by the chart's admission policy, but it landed"),
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn data_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

fn annotation(secret: &Secret, key: &str) -> Option<String> {
    secret.metadata.annotations.as_ref()?.get(key).cloned()
}

/// A listener standing in for an attacker's token endpoint; counts every connection to it.
async fn attacker_listener() -> (String, Arc<AtomicUsize>) {
    let (base, hits) = common::attacker_listener().await;
    (format!("{base}/connect/token"), hits)
}

/// Runs the kubectl plugin as the admin (a person with full rights), with `allow` as the one
/// extra endpoint host.
fn kubectl_xero(args: &[&str], allow: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubectl-xero"));
    cmd.args(args)
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .env(xero_operator::cli::ALLOW_HOSTS_ENV, allow);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The whole-Secret edits a consumer makes to steer refreshes: the token endpoint to its
/// listener, another app's credentials.
async fn steer(s: &Scene, listener: &str) {
    s.consumer_forges(
        "the token-url annotation",
        json!({"metadata": {"annotations": {f::ANN_TOKEN_URL: listener}}}),
    )
    .await;
    s.consumer_forges(
        "another app's client id",
        json!({"data": {f::CLIENT_ID: b64("rogue-app-1"), f::CLIENT_SECRET: b64("rogue")}}),
    )
    .await;
}

/// A consumer that expires the token (the protocol lets it: a store of an `expires_at`).
async fn expire(s: &Scene) {
    s.consumer_patch(json!({"data": {f::EXPIRES_AT: b64("2000-01-01T00:00:00.000Z")}}))
        .await
        .expect("expires_at is a protocol field");
}

/// Attacks 1, 2 and 5 of the token Secret: the endpoint and the app the controller, a person's
/// `renew` and `authorize`, and another consumer would call with.
async fn endpoints_and_the_app_come_from_the_connection(policies: Policies) {
    let mut s = Scene::new("ct-steer", policies, json!({})).await;
    let (listener, hits) = attacker_listener().await;
    let rotation = s.fx.record().await.rotation;
    steer(&s, &listener).await;
    expire(&s).await;
    // The controller refreshes at once, through the connection's endpoint with the client
    // Secret's app, and puts the Secret's copies back.
    s.until("the controller refreshed the expired token", || async {
        s.fx.record().await.rotation > rotation
    })
    .await;
    if policies == Policies::Off {
        // A consumer that keeps writing another app and its endpoint with an expired token, so
        // that some reconcile reads the Secret between its own write-back and its call.
        let storm = Instant::now();
        let mut n = 0;
        while storm.elapsed() < Duration::from_secs(4) {
            n += 1;
            let _ = s
                .consumer_patch(json!({
                    "metadata": {"annotations": {f::ANN_TOKEN_URL: &listener}},
                    "data": {f::CLIENT_ID: b64(&format!("rogue-app-{n}")), f::CLIENT_SECRET: b64("rogue"),
                        f::EXPIRES_AT: b64("2000-01-01T00:00:00.000Z")}}))
                .await;
        }
    }
    s.until(
        "the controller put the endpoint and the app back",
        || async {
            let secret = s.secret().await;
            annotation(&secret, f::ANN_TOKEN_URL) == Some(s.fx.emulator.token_url())
                && data_text(&secret, f::CLIENT_ID).as_deref() == Some(DEFAULT_CLIENT_ID)
                && data_text(&secret, f::CLIENT_SECRET).as_deref() == Some(DEFAULT_CLIENT_SECRET)
        },
    )
    .await;
    let counters = s.fx.report().await.counters;
    assert_eq!(
        counters.token_calls_by_client.keys().collect::<Vec<_>>(),
        [DEFAULT_CLIENT_ID],
        "only the client Secret's app calls Xero: {counters:?}"
    );
    // (The gate keys apps by the client id's fingerprint.)
    let app = xero_operator::redact::Sensitive::new(DEFAULT_CLIENT_ID).fingerprint();
    assert_eq!(
        s.permitted_apps
            .lock()
            .expect("apps")
            .iter()
            .collect::<Vec<_>>(),
        [&app],
        "the per-app gate (and its metric series) is keyed by the client Secret's app alone"
    );

    // What a person runs, and another consumer, while nobody puts the Secret back.
    s.stop_controller().await;
    steer(&s, &listener).await;
    let allow = s.fx.emulator.allowed_host();
    let before = s.fx.report().await.counters.token_calls;
    let renewed = kubectl_xero(&["renew", "acme", "-n", s.ns()], &allow)
        .output()
        .expect("run kubectl xero renew");
    assert!(renewed.status.success(), "{}", text(&renewed));
    assert_eq!(s.fx.report().await.counters.token_calls, before + 1);

    // Another consumer (a workload with more network access, say) refuses the forged endpoint.
    expire(&s).await;
    if policies == Policies::Off {
        let refused =
            s.fx.refresher("worker/other")
                .with_max_wait(Duration::from_secs(5))
                .get()
                .await;
        assert!(
            matches!(
                &refused,
                Err(xero_operator::protocol::Error::EndpointNotAllowed(_))
            ),
            "{refused:?}"
        );
    }

    // A person authorises again: the app and the endpoint come from the connection, shown
    // before the browser opens, and the code goes to the emulator alone.
    let mut authorize = kubectl_xero(
        &[
            "authorize",
            "acme",
            "-n",
            s.ns(),
            "--authorize-url",
            &format!("{}/identity/connect/authorize", s.fx.emulator.base_url()),
            "--port",
            "0",
            "--login-hint",
            &s.fx.user.user_id,
        ],
        &allow,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start kubectl xero authorize");
    let stderr = authorize.stderr.take().expect("stderr");
    let (shown, url) = {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = lines.clone();
        let url = common::first_line(stderr, Duration::from_secs(30), move |l| {
            seen.lock().expect("lines").push(l.to_owned());
            l.trim_start().starts_with("http")
        })
        .expect("authorize printed the URL to open");
        let shown = lines.lock().expect("lines").join("\n");
        (shown, url)
    };
    assert!(
        shown.contains(&format!("client id {DEFAULT_CLIENT_ID}"))
            && shown.contains(&format!("token endpoint at {}.", s.fx.emulator.base_url())),
        "the app and the token endpoint (scheme, host, port) are shown first: {shown}"
    );
    assert!(
        url.contains(&format!("client_id={DEFAULT_CLIENT_ID}")),
        "{url}"
    );
    let page = reqwest::get(url.trim())
        .await
        .expect("approve")
        .text()
        .await
        .expect("page");
    assert!(page.contains("authorised"), "{page}");
    let status = tokio::task::spawn_blocking(move || authorize.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the listener was never reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_the_app_come_from_the_connection_with_policies() {
    endpoints_and_the_app_come_from_the_connection(Policies::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_the_app_come_from_the_connection_without_policies() {
    endpoints_and_the_app_come_from_the_connection(Policies::Off).await;
}

/// Attacks 3 and 6: relabelling the Secret, a claim that edits the data in the same write,
/// and forged tenant ids must neither blind the controller nor stay.
async fn the_controller_sees_every_change_and_puts_its_fields_back(policies: Policies) {
    let s = Scene::new("ct-blind", policies, json!({})).await;
    let tenant = s.fx.user.connections[0].tenant_id.clone();
    s.consumer_forges(
        "a relabel",
        json!({"metadata": {"labels": {f::LABEL_CONNECTION: "other"}}}),
    )
    .await;
    s.until("the label is the connection's again", || async {
        let secret = s.secret().await;
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(f::LABEL_CONNECTION))
            .map(String::as_str)
            == Some("acme")
    })
    .await;
    // Both tenant keys as the controller writes them, then a claim (the protocol's) that also
    // forges `tenant_id` alone (a reader of one tenant reads that key alone): one write.
    s.fx.patch(
        json!({f::TENANT_ID: &tenant, f::TENANT_IDS: &tenant}),
        json!({}),
    )
    .await;
    let lease = f::format_time(std::time::SystemTime::now() + Duration::from_secs(30));
    s.consumer_forges(
        "a claim with a forged tenant",
        json!({"metadata": {"annotations": {f::ANN_HOLDER: "worker/1", f::ANN_LEASE_EXPIRES: lease}},
            "data": {f::TENANT_ID: b64("evil-tenant")}}),
    )
    .await;
    s.until("the tenant key is the real tenant's", || async {
        data_text(&s.secret().await, f::TENANT_ID).as_deref() == Some(tenant.as_str())
    })
    .await;
    s.consumer_forges(
        "a forged tenant list",
        json!({"data": {f::TENANT_IDS: b64("evil-tenant")}}),
    )
    .await;
    s.until("both tenant keys are the real tenant's", || async {
        let secret = s.secret().await;
        data_text(&secret, f::TENANT_ID).as_deref() == Some(tenant.as_str())
            && data_text(&secret, f::TENANT_IDS).as_deref() == Some(tenant.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_sees_every_change_and_puts_its_fields_back_with_policies() {
    the_controller_sees_every_change_and_puts_its_fields_back(Policies::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_sees_every_change_and_puts_its_fields_back_without_policies() {
    the_controller_sees_every_change_and_puts_its_fields_back(Policies::Off).await;
}

/// Attack 4: an owner reference or a finalizer a consumer adds. Beside the connection's owner
/// reference (the garbage collector keeps a Secret while one owner lives) and as a finalizer,
/// the controller removes it; in place of the connection's, only admission stops it: the
/// garbage collector deletes the Secret within a second, before any controller could look.
async fn owners_and_finalizers_are_the_connections(policies: Policies) {
    let s = Scene::new("ct-owner", policies, json!({})).await;
    let ours = s
        .secret()
        .await
        .metadata
        .owner_references
        .expect("the controller owns the Secret");
    // An owner that exists (the client Secret, say): while it lives, the garbage collector
    // would keep the Secret, and its tokens, after the connection is gone.
    let app = s.fx.secrets().get("xero-app").await.expect("client Secret");
    let foreign = json!({"apiVersion": "v1", "kind": "Secret", "name": "xero-app",
        "uid": app.metadata.uid.expect("uid")});
    let dangling = json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "gone",
        "uid": "00000000-0000-0000-0000-000000000000"});
    let mut both = serde_json::to_value(&ours).expect("json");
    both.as_array_mut().expect("list").push(foreign);
    s.consumer_forges(
        "another owner beside the connection",
        json!({"metadata": {"ownerReferences": both}}),
    )
    .await;
    s.consumer_forges(
        "a finalizer",
        json!({"metadata": {"finalizers": ["example.com/hold"]}}),
    )
    .await;
    s.until(
        "the owners and finalizers are the connection's alone",
        || async {
            let secret = s.secret().await;
            secret.metadata.owner_references.as_ref() == Some(&ours)
                && secret
                    .metadata
                    .finalizers
                    .as_ref()
                    .is_none_or(Vec::is_empty)
        },
    )
    .await;
    if policies == Policies::On {
        let replaced = s
            .consumer_patch(json!({"metadata": {"ownerReferences": [dangling]}}))
            .await;
        assert_refused_by_policy(&replaced, "a dangling owner in place of the connection");
        // A requester who may delete the Secret but not update it (RBAC lets the delete
        // through; the policy stops it).
        let deleter = chart::service_account_client(&s.fx.client, s.ns(), "deleter").await;
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": "deleter"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["delete", "patch"],
                "resourceNames": [&s.fx.secret]}]}))
        .expect("role");
        Api::<Role>::namespaced(s.fx.client.clone(), s.ns())
            .create(&PostParams::default(), &role)
            .await
            .expect("role");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "deleter"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deleter"},
            "subjects": [{"kind": "ServiceAccount", "name": "deleter", "namespace": s.ns()}]}))
        .expect("binding");
        Api::<RoleBinding>::namespaced(s.fx.client.clone(), s.ns())
            .create(&PostParams::default(), &binding)
            .await
            .expect("binding");
        let as_deleter: Api<Secret> = Api::namespaced(deleter, s.ns());
        let deadline = Instant::now() + NOTICE;
        let delete = loop {
            // RBAC reaches the authorizer's cache a moment after the binding is made.
            let d = as_deleter
                .delete(&s.fx.secret, &DeleteParams::default())
                .await
                .map(|_| ());
            match &d {
                Err(kube::Error::Api(st))
                    if st.code == 403
                        && !st.message.contains("ValidatingAdmissionPolicy")
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => break d,
            }
        };
        assert_refused_by_policy(&delete, "a delete by a requester without update rights");
        // Long enough for the garbage collector to have acted on a dangling owner.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            s.fx.secrets()
                .get_opt(&s.fx.secret)
                .await
                .expect("get")
                .is_some()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_and_finalizers_are_the_connections_with_policies() {
    owners_and_finalizers_are_the_connections(Policies::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_and_finalizers_are_the_connections_without_policies() {
    owners_and_finalizers_are_the_connections(Policies::Off).await;
}

/// P68, P69: a consumer written before the stop marker existed ignores it and claims. With the
/// chart's policies, the API server refuses that claim (so it never calls Xero); without them,
/// only parties that implement the marker honour it. Current parties honour it either way, and
/// the controller keeps the marker while it names what is stored.
async fn a_claim_under_a_stop_marker_is_refused(policies: Policies) {
    let s = Scene::new("ct-stopclaim", policies, json!({})).await;
    let secret = s.secret().await;
    assert_eq!(
        annotation(&secret, f::ANN_PROTOCOL_VERSION).as_deref(),
        Some(f::PROTOCOL_VERSION.to_string().as_str()),
        "the controller says which revision the Secret follows"
    );
    let mut rec = f::TokenRecord::from_secret(&secret);
    rec.settings.grant = xero_operator::crd::Grant::RefreshToken;
    let stopped_for = rec.credentials_fingerprint().expect("credentials");
    s.consumer_patch(json!({"metadata": {"annotations": {
        f::ANN_STOPPED_FOR: stopped_for,
        f::ANN_STOP_REASON: "invalid_client",
    }}}))
    .await
    .expect("a stop marker is the protocol's to write");
    let rv = s.secret().await.metadata.resource_version.expect("version");
    let expires = std::time::SystemTime::now() + Duration::from_secs(30);
    let claim = f::claim_patch(&rv, "old-consumer/1-0000", expires);
    let attempt = s.consumer_patch(claim.clone()).await;
    match policies {
        Policies::On => assert_refused_by_policy(&attempt, "a claim under a stop marker"),
        Policies::Off => {
            attempt.expect("without the policies, only the parties that know the marker honour it");
        }
    }
    if policies == Policies::Off {
        return;
    }
    // The same claim once the marker is gone is the protocol's, and lands.
    let cleared = s
        .consumer_patch(json!({"metadata": {"annotations": {
            f::ANN_STOPPED_FOR: null, f::ANN_STOP_REASON: null,
        }}}))
        .await
        .expect("markers are the protocol's to clear");
    let rv = cleared.metadata.resource_version.expect("version");
    s.consumer_patch(f::claim_patch(&rv, "old-consumer/1-0000", expires))
        .await
        .expect("a claim with no marker lands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_a_stop_marker_is_refused_with_policies() {
    a_claim_under_a_stop_marker_is_refused(Policies::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_a_stop_marker_lands_without_policies() {
    a_claim_under_a_stop_marker_is_refused(Policies::Off).await;
}

/// Attacks 7 and 9: the protocol's own markers, with values no party writes. They are the
/// consumer's to write under the policies too, so the code alone must hold: a far
/// `retry-not-before` freezes nobody, a `refreshed-at` in the future is not shown, and text
/// with invisible characters reaches no person.
async fn markers_no_party_writes_are_ignored(policies: Policies) {
    let s = Scene::new("ct-marker", policies, json!({})).await;
    let hidden = "worker\u{200F}\u{061C}/1\u{200B}\u{FEFF}\u{2060}x";
    s.consumer_patch(json!({"metadata": {"annotations": {
        f::ANN_REFRESHED_BY: hidden,
        f::ANN_REFRESHED_AT: "2099-01-01T00:00:00.000Z",
        f::ANN_RETRY_NOT_BEFORE: "2099-01-01T00:00:00.000Z",
    }}}))
    .await
    .expect("the protocol's annotations are the consumer's to write");
    let conns: Api<XeroConnection> = Api::namespaced(s.fx.client.clone(), s.ns());
    s.until(
        "the status shows the refresher without invisible characters",
        || async {
            let status = conns
                .get("acme")
                .await
                .expect("get")
                .status
                .unwrap_or_default();
            status.last_refreshed_by.as_deref() == Some("worker/1x")
        },
    )
    .await;
    let status = conns
        .get("acme")
        .await
        .expect("get")
        .status
        .expect("status");
    let shown_at = status.last_refresh_time.map(|t| t.0.as_second());
    assert!(
        shown_at.is_none_or(|at| at < 4_000_000_000),
        "a refresh time in 2099 is shown: {shown_at:?}"
    );
    let plugin = kubectl_xero(&["status", "acme", "-n", s.ns()], "")
        .output()
        .expect("kubectl xero status");
    let shown = text(&plugin);
    assert!(plugin.status.success(), "{shown}");
    assert!(
        !shown.chars().any(|c| matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{061C}' | '\u{FEFF}' | '\u{2060}'
        )),
        "{shown:?}"
    );
    assert!(!shown.contains("2099"), "{shown}");
    // Expired, behind a retry-not-before of 2099: refreshed at once all the same.
    let rotation = s.fx.record().await.rotation;
    expire(&s).await;
    s.until("the expired token is refreshed", || async {
        s.fx.record().await.rotation > rotation
    })
    .await;
    connection::wait_for_reason(&s.fx, "acme", "TokenValid", NOTICE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_no_party_writes_are_ignored_with_policies() {
    markers_no_party_writes_are_ignored(Policies::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_no_party_writes_are_ignored_without_policies() {
    markers_no_party_writes_are_ignored(Policies::Off).await;
}

/// Attack 8: a Secret kept on delete is released only after its consumers lost their grant, so
/// no consumer can relabel it for the next connection of the same name.
async fn a_kept_secret_is_released_after_the_grant_goes(policies: Policies) {
    let s = Scene::new(
        "ct-keep",
        policies,
        json!({"keepTokenSecretOnDelete": true}),
    )
    .await;
    let relabel = json!({"metadata": {"labels": {f::LABEL_CONNECTION: "acme"}}});
    // The consumer keeps relabelling the Secret for `acme` while the connection goes.
    let spam_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spammer = {
        let (secrets, name, stop) = (s.consumer_secrets(), s.fx.secret.clone(), spam_stop.clone());
        let body = relabel.clone();
        tokio::spawn(async move {
            let mut landed_after_release = 0;
            while !stop.load(Ordering::SeqCst) {
                let before = secrets.get(&name).await;
                let released = before.as_ref().is_ok_and(|b| {
                    b.metadata
                        .labels
                        .as_ref()
                        .is_none_or(|l| !l.contains_key(f::LABEL_CONNECTION))
                });
                let patched = secrets
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await;
                if released && patched.is_ok() {
                    landed_after_release += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            landed_after_release
        })
    };
    let conns: Api<XeroConnection> = Api::namespaced(s.fx.client.clone(), s.ns());
    conns
        .delete("acme", &DeleteParams::default())
        .await
        .expect("delete the connection");
    s.until("the connection is gone", || async {
        conns.get_opt("acme").await.expect("get").is_none()
    })
    .await;
    spam_stop.store(true, Ordering::SeqCst);
    let landed = spammer.await.expect("the consumer's loop");
    assert_eq!(landed, 0, "a consumer relabelled the released Secret");
    let kept = s.secret().await;
    assert!(
        kept.metadata
            .labels
            .as_ref()
            .is_none_or(|l| !l.contains_key(f::LABEL_CONNECTION)),
        "{:?}",
        kept.metadata.labels
    );
    assert!(matches!(
        s.consumer_patch(relabel).await,
        Err(kube::Error::Api(st)) if st.code == 403
    ));
    // A new connection of the same name does not take the kept Secret (and its tokens).
    connection::create(&s.fx, "acme", &s.fx.secret, timings(), json!({})).await;
    connection::wait_for_reason(&s.fx, "acme", "TokenSecretNotOwned", NOTICE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_secret_is_released_after_the_grant_goes_with_policies() {
    a_kept_secret_is_released_after_the_grant_goes(Policies::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_secret_is_released_after_the_grant_goes_without_policies() {
    a_kept_secret_is_released_after_the_grant_goes(Policies::Off).await;
}

/// The operator's own blast radius: with its ServiceAccount's token (a compromised pod), the
/// chart's policy lets it write only its own kinds of objects. (Reads cannot be refused by
/// admission; without the policies these writes land: docs/security.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_operator_token_writes_only_the_operators_objects() {
    let s = Scene::new("ct-stolen", Policies::On, json!({})).await;
    let admin_secrets = s.fx.secrets();
    let victim: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db-credentials"}, "stringData": {"password": "hunter2"}}))
    .expect("secret");
    admin_secrets
        .create(&PostParams::default(), &victim)
        .await
        .expect("victim");
    let op_secrets: Api<Secret> = Api::namespaced(s.operator.clone(), s.ns());
    assert_refused_by_policy(
        &op_secrets
            .patch(
                "db-credentials",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        "a write to another Secret",
    );
    let plain: Secret =
        serde_json::from_value(json!({"metadata": {"name": "planted"}, "stringData": {"a": "b"}}))
            .expect("secret");
    assert_refused_by_policy(
        &op_secrets.create(&PostParams::default(), &plain).await,
        "a Secret that is no token Secret",
    );
    let roles: Api<Role> = Api::namespaced(s.operator.clone(), s.ns());
    let escalation: Role = serde_json::from_value(json!({
        "metadata": {"name": "reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]}))
    .expect("role");
    assert_refused_by_policy(
        &roles.create(&PostParams::default(), &escalation).await,
        "a Role granting list on Secrets",
    );
    // Named like a consumer Role, but granting more than the protocol needs.
    let wide: Role = serde_json::from_value(json!({
        "metadata": {"name": "acme-xero-token-consumer"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "patch"],
            "resourceNames": ["acme-xero-token"]}]}))
    .expect("role");
    assert_refused_by_policy(
        &roles
            .patch(
                "acme-xero-token-consumer",
                &PatchParams::default(),
                &Patch::Merge(serde_json::to_value(&wide).expect("json")),
            )
            .await,
        "a consumer Role that grants list",
    );
    let bindings: Api<RoleBinding> = Api::namespaced(s.fx.client.clone(), s.ns());
    let other: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "another-app"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": s.ns()}]}))
    .expect("binding");
    bindings
        .create(&PostParams::default(), &other)
        .await
        .expect("another app's RoleBinding");
    let op_bindings: Api<RoleBinding> = Api::namespaced(s.operator.clone(), s.ns());
    assert_refused_by_policy(
        &op_bindings
            .delete("another-app", &DeleteParams::default())
            .await
            .map(|_| ()),
        "deleting another app's RoleBinding",
    );
    // A consumer Role for another Secret, owned by a real connection: patch on it for any
    // ServiceAccount the thief controls.
    let conn_uid = Api::<XeroConnection>::namespaced(s.fx.client.clone(), s.ns())
        .get("acme")
        .await
        .expect("acme")
        .metadata
        .uid
        .expect("uid");
    let owner = json!({"apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
        "name": "acme", "uid": conn_uid, "controller": true});
    let other_role: Role = serde_json::from_value(json!({
        "metadata": {"name": "other-xero-token-consumer", "ownerReferences": [owner]},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "patch"],
            "resourceNames": ["db-credentials"]}]}))
    .expect("role");
    assert_refused_by_policy(
        &roles.create(&PostParams::default(), &other_role).await,
        "a consumer Role on another Secret",
    );
    let elsewhere: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "acme-xero-token-consumer", "ownerReferences": [owner]},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "acme-xero-token-consumer"},
        "subjects": [{"kind": "ServiceAccount", "name": "thief", "namespace": "kube-system"}]}))
    .expect("binding");
    assert_refused_by_policy(
        &op_bindings
            .patch(
                "acme-xero-token-consumer",
                &PatchParams::apply("thief").force(),
                &Patch::Apply(json!({"apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding", "metadata": elsewhere.metadata,
                    "roleRef": elsewhere.role_ref, "subjects": elsewhere.subjects})),
            )
            .await,
        "a consumer RoleBinding to another namespace's ServiceAccount",
    );
    // Labels another controller acts on, and an owner that has the garbage collector delete the
    // token Secret: not the operator's to write either.
    assert_refused_by_policy(
        &op_secrets
            .patch(
                &s.fx.secret,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"argocd.argoproj.io/secret-type": "repository"}}})),
            )
            .await,
        "a foreign label on a token Secret",
    );
    assert_refused_by_policy(
        &op_secrets
            .patch(
                &s.fx.secret,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"ownerReferences": [{"apiVersion": "v1",
                    "kind": "ConfigMap", "name": "gone", "uid": "00000000-0000-0000-0000-000000000000"}]}})),
            )
            .await,
        "a dangling owner on a token Secret",
    );
    // And the controller itself still works under the policy: it refreshes an expired token.
    let rotation = s.fx.record().await.rotation;
    expire(&s).await;
    s.until("the controller refreshed under the policy", || async {
        s.fx.record().await.rotation > rotation
    })
    .await;
    let rec = s.fx.record().await;
    assert_eq!(rec.refreshed_by.as_deref(), Some(CONTROLLER_ID));
}

/// Real consumers keep working under the policies: a consumer takes over the refresh (claim,
/// call, store) when the controller is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_takes_over_the_refresh_under_the_policies() {
    let mut s = Scene::new("ct-takeover", Policies::On, json!({})).await;
    s.stop_controller().await;
    let rotation = s.fx.record().await.rotation;
    expire(&s).await;
    let token = xero_operator::protocol::Refresher::new(
        s.consumer.clone(),
        s.ns(),
        &s.fx.secret,
        "worker/takeover",
        xero_operator::protocol::Role::Consumer,
    )
    .with_allowlist(s.fx.emulator.allowlist())
    .get()
    .await
    .expect("the consumer refreshes under the policies");
    assert!(s.fx.accepted_by_xero(token.token.expose()).await);
    let rec = s.fx.record().await;
    assert_eq!(rec.rotation, rotation + 1);
    assert_eq!(rec.refreshed_by.as_deref(), Some("worker/takeover"));
}

/// A budget that is the per-app gate alone.
struct Gated(xero_operator::protocol::gate::AppGate);

impl xero_operator::protocol::refresher::CallBudget for Gated {
    fn ask(&self, rec: &f::TokenRecord) -> Result<(), Duration> {
        let client_id = rec.client.as_ref().map_or("", |c| c.client_id.as_str());
        if self.0.try_now(client_id, "ns") {
            Ok(())
        } else {
            Err(Duration::from_secs(1))
        }
    }
}

/// The controller's refresher itself, on a Secret a consumer forged and nobody put back: it
/// decides and calls with what it trusts (the spec's endpoint, the client Secret's app), and
/// the per-app gate counts that app alone. (In the controller, a reconcile puts the Secret back
/// before its token step; this is the hold for a write that lands in between.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_calls_with_what_it_trusts_whatever_the_secret_says() {
    let fx = token_fixture("ct-trusted", timings()).await;
    let (listener, hits) = attacker_listener().await;
    fx.patch(
        json!({f::CLIENT_ID: "rogue-app", f::CLIENT_SECRET: "rogue",
            f::EXPIRES_AT: "2000-01-01T00:00:00.000Z"}),
        json!({f::ANN_TOKEN_URL: listener, f::ANN_CLOCK_SKEW: "300", f::ANN_LEASE_DURATION: "600"}),
    )
    .await;
    let permitted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = permitted.clone();
    let gate = xero_operator::protocol::gate::AppGate::per_minute(
        std::num::NonZeroU32::new(1000).expect("nonzero"),
    )
    .with_on_permit(move |app| seen.lock().expect("apps").push(app.to_owned()));
    let trusted = f::Trusted {
        settings: Some(f::Settings {
            token_url: Some(fx.emulator.token_url()),
            clock_skew: Duration::from_secs(1),
            lease_duration: Duration::from_secs(30),
            ..f::Settings::default()
        }),
        client: Some(xero_operator::xero::ClientCredentials {
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: xero_operator::redact::Sensitive::new(DEFAULT_CLIENT_SECRET),
        }),
    };
    let producer = xero_operator::protocol::Refresher::new(
        fx.client.clone(),
        &fx.namespace,
        &fx.secret,
        "controller/trusting",
        xero_operator::protocol::Role::Producer {
            ahead: Duration::ZERO,
        },
    )
    .with_allowlist(fx.emulator.allowlist())
    .with_trusted(trusted)
    .with_budget(Arc::new(Gated(gate)))
    .with_max_wait(Duration::from_secs(10));
    let token = producer
        .get()
        .await
        .expect("refreshed with the trusted app");
    assert!(fx.accepted_by_xero(token.token.expose()).await);
    let counters = fx.report().await.counters;
    assert_eq!(
        counters.token_calls_by_client.keys().collect::<Vec<_>>(),
        [DEFAULT_CLIENT_ID]
    );
    assert_eq!(*permitted.lock().expect("apps"), [DEFAULT_CLIENT_ID]);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // The claim it wrote lasted the trusted lease, not the Secret's 600 s (the store released
    // it, so look at what the last record says of the settings instead).
    let rec = producer.last_record().expect("a record");
    assert_eq!(rec.settings.lease_duration, Duration::from_secs(30));
}
