//! Trust boundaries (docs/security.md), tried as an attacker on the real API server.
//!
//! The controller runs with exactly the Helm chart's RBAC, as the chart's ServiceAccount (not as
//! admin). The attacker is the static-token user `alice`, who may only create XeroConnections,
//! ServiceAccounts and ServiceAccount tokens in one namespace; she may not read its Secrets. Her
//! ServiceAccount `spy`, listed as a consumer, is her way to read whatever the controller would
//! grant. Each attack must end refused at apply time, or in a named condition with an Event,
//! with the victim object unchanged (same resourceVersion), the attacker's listener unreached and
//! `spy` still unable to read what it could not read before.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Timings, TokenFixture, chart, token_fixture};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use xero_operator::controller::ownership::{ANN_CONNECTION_UID, LABEL_CLIENT_CREDENTIALS};
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format as f;

/// How long a controller gets to reach a condition.
const SETTLE: Duration = Duration::from_secs(30);

/// Everything one attack scenario needs.
struct Scene {
    fx: TokenFixture,
    /// The attacker.
    alice: Client,
    /// The attacker's ServiceAccount, as itself.
    spy: Client,
    _controller: common::connection::Running,
}

impl Scene {
    fn ns(&self) -> &str {
        &self.fx.namespace
    }

    fn admin_secrets(&self) -> Api<Secret> {
        Api::namespaced(self.fx.client.clone(), self.ns())
    }

    fn alice_connections(&self) -> Api<XeroConnection> {
        Api::namespaced(self.alice.clone(), self.ns())
    }

    /// Alice creates a connection pointed at the emulator (unless `spec` says otherwise).
    async fn alice_creates(&self, name: &str, spec: serde_json::Value) {
        let mut full = json!({
            "clientSecretRef": {"name": "xero-app"},
            "refresh": {"clockSkewSeconds": 1, "leaseDurationSeconds": 5},
            "endpoints": {
                "tokenUrl": self.fx.emulator.token_url(),
                "connectionsUrl": self.fx.emulator.connections_url(),
                "revocationUrl": self.fx.emulator.revocation_url(),
            },
        });
        for (k, v) in spec.as_object().expect("spec object") {
            full[k] = v.clone();
        }
        let conn: XeroConnection = serde_json::from_value(json!({
            "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
            "metadata": {"name": name}, "spec": full,
        }))
        .expect("connection");
        self.alice_connections()
            .create(&PostParams::default(), &conn)
            .await
            .unwrap_or_else(|e| panic!("alice may create XeroConnection {name}: {e}"));
    }

    /// Waits until `name` is Ready=False with `reason`; returns its Ready message.
    async fn refused_with(&self, name: &str, reason: &str) -> String {
        let api: Api<XeroConnection> = Api::namespaced(self.fx.client.clone(), self.ns());
        let deadline = Instant::now() + SETTLE;
        loop {
            let conn = api.get(name).await.expect("get connection");
            let ready = conn
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
            if let Some(c) = &ready
                && c.reason == reason
            {
                assert_eq!(c.status, "False", "{name}: {reason} must not be Ready");
                return c.message.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{name}: Ready never became {reason}; last {ready:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the Warning Event `reason` about connection `name`.
    async fn event(&self, name: &str, reason: &str) -> Event {
        let events: Api<Event> = Api::namespaced(self.fx.client.clone(), self.ns());
        let deadline = Instant::now() + SETTLE;
        loop {
            let found = events
                .list(&ListParams::default())
                .await
                .expect("list events")
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                });
            if let Some(e) = found {
                return e;
            }
            assert!(Instant::now() < deadline, "no {reason} Event for {name}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The resourceVersion of Secret `name` (as admin).
    async fn secret_rv(&self, name: &str) -> String {
        self.admin_secrets()
            .get(name)
            .await
            .expect("victim Secret")
            .metadata
            .resource_version
            .expect("rv")
    }

    /// Asserts `spy` is refused reading Secret `name`.
    async fn spy_cannot_read(&self, name: &str) {
        let got = Api::<Secret>::namespaced(self.spy.clone(), self.ns())
            .get(name)
            .await;
        assert!(
            matches!(&got, Err(kube::Error::Api(s)) if s.code == 403),
            "spy must not read Secret {name}: {:?}",
            got.map(|s| s.metadata.name)
        );
    }

    async fn role_exists(&self, name: &str) -> bool {
        Api::<Role>::namespaced(self.fx.client.clone(), self.ns())
            .get_opt(name)
            .await
            .expect("get role")
            .is_some()
    }

    /// Alice deletes `name` and waits until it is gone (the finalizer ran).
    async fn alice_deletes(&self, name: &str) {
        self.alice_connections()
            .delete(name, &DeleteParams::default())
            .await
            .expect("alice deletes her connection");
        let api: Api<XeroConnection> = Api::namespaced(self.fx.client.clone(), self.ns());
        let deadline = Instant::now() + SETTLE;
        while api.get_opt(name).await.expect("get").is_some() {
            assert!(Instant::now() < deadline, "{name} was never deleted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Alice's rights in `ns`: XeroConnections, ServiceAccounts and their tokens; no Secrets.
async fn grant_alice(admin: &Client, ns: &str) {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "connection-author"},
        "rules": [
            {"apiGroups": ["xero-operator.io"], "resources": ["xeroconnections"], "verbs": ["*"]},
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create", "get", "list"]},
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        ],
    }))
    .expect("role");
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("alice's role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "connection-author"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "connection-author"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
    }))
    .expect("binding");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("alice's binding");
}

/// A scene: a namespace with the emulator, an opted-in client Secret `xero-app`, the token
/// Secret `acme-xero-token` (labelled for `acme`), the controller running as the chart's
/// ServiceAccount (with the chart's RBAC only), alice and her `spy`.
async fn scene(hint: &str, timings: Timings) -> Scene {
    let fx = token_fixture(hint, timings).await;
    common::install_crds(&fx.client).await;
    let ns = fx.namespace.clone();
    let app: Secret = serde_json::from_value(json!({
        "metadata": {"name": "xero-app", "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
        "stringData": {
            "client_id": xero_proving_ground::emulator::DEFAULT_CLIENT_ID,
            "client_secret": xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET,
        },
    }))
    .expect("app secret");
    Api::<Secret>::namespaced(fx.client.clone(), &ns)
        .create(&PostParams::default(), &app)
        .await
        .expect("client Secret");
    let release = format!("xo-{}", &ns[ns.len() - 5..]);
    let operator = chart::operator_client(&fx.client, &ns, &release, chart::Policies::Off).await;
    grant_alice(&fx.client, &ns).await;
    let alice = common::user_client().await;
    // Alice cannot read Secrets herself: the baseline every attack is measured against.
    assert!(matches!(
        Api::<Secret>::namespaced(alice.clone(), &ns).get("xero-app").await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "spy"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(alice.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("alice creates her ServiceAccount");
    let spy = chart::client_with_token(&chart::sa_token(&alice, &ns, "spy").await).await;
    let controller =
        common::connection::start_controller_as(&operator, &ns, fx.emulator.allowlist(), |_| {});
    Scene {
        fx,
        alice,
        spy,
        _controller: controller,
    }
}

/// A Secret as the admin makes it.
async fn admin_secret(s: &Scene, body: serde_json::Value) {
    let secret: Secret = serde_json::from_value(body).expect("secret");
    s.admin_secrets()
        .create(&PostParams::default(), &secret)
        .await
        .expect("victim Secret");
}

/// A token Secret `name` outside any connection: a new emulator user's refresh token, the app's
/// credentials, and `annotations`.
async fn seeded_secret(s: &Scene, name: &str, annotations: serde_json::Value) {
    let user =
        s.fx.emulator
            .admin()
            .add_user(&Default::default())
            .await
            .expect("user");
    admin_secret(
        s,
        json!({"metadata": {"name": name, "annotations": annotations},
            "stringData": {f::REFRESH_TOKEN: user.refresh_token,
                f::CLIENT_ID: xero_proving_ground::emulator::DEFAULT_CLIENT_ID,
                f::CLIENT_SECRET: xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_secret_is_never_adopted_read_or_granted() {
    let s = scene("trust-adopt", Timings::default()).await;
    // Victims: an application's password, a cluster-admin ServiceAccount's token Secret, and a
    // TLS Secret that even carries the connection label (the type alone refuses it).
    admin_secret(
        &s,
        json!({"metadata": {"name": "db-credentials"}, "type": "Opaque",
            "stringData": {"username": "app", "password": "hunter2"}}),
    )
    .await;
    let admin_sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "root"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(s.fx.client.clone(), s.ns())
        .create(&PostParams::default(), &admin_sa)
        .await
        .expect("sa");
    admin_secret(
        &s,
        json!({"metadata": {"name": "root-token",
                "annotations": {"kubernetes.io/service-account.name": "root"}},
            "type": "kubernetes.io/service-account-token"}),
    )
    .await;
    admin_secret(
        &s,
        json!({"metadata": {"name": "web-tls", "labels": {f::LABEL_CONNECTION: "grab-tls"}},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": "CERT", "tls.key": "KEY"}}),
    )
    .await;
    let victims = ["db-credentials", "root-token", "web-tls"];
    let mut before = Vec::new();
    for v in victims {
        before.push(s.secret_rv(v).await);
    }
    let consumers = json!([{"serviceAccount": "spy"}]);
    for (conn, victim) in [
        ("grab-db", "db-credentials"),
        ("grab-sa", "root-token"),
        ("grab-tls", "web-tls"),
    ] {
        s.alice_creates(
            conn,
            json!({"tokenSecretName": victim, "consumers": consumers}),
        )
        .await;
    }
    // A chosen name that nobody has made yet is not made by the controller (squatting).
    s.alice_creates(
        "squat",
        json!({"tokenSecretName": "app-config", "consumers": consumers}),
    )
    .await;
    s.refused_with("squat", "TokenSecretNotOwned").await;
    assert!(
        s.admin_secrets()
            .get_opt("app-config")
            .await
            .expect("get")
            .is_none(),
        "the controller created a Secret under a name of the attacker's choosing"
    );
    assert!(!s.role_exists("squat-xero-token-consumer").await);
    let m = s.refused_with("grab-db", "TokenSecretNotOwned").await;
    assert!(m.contains("kubectl label secret db-credentials"), "{m}");
    s.refused_with("grab-sa", "TokenSecretNotOwned").await;
    let m = s.refused_with("grab-tls", "TokenSecretNotOwned").await;
    assert!(
        !m.contains("kubernetes.io/tls"),
        "the condition must not describe the Secret: {m}"
    );
    s.event("grab-db", "TokenSecretNotOwned").await;
    for (v, rv) in victims.iter().zip(&before) {
        assert_eq!(&s.secret_rv(v).await, rv, "{v} was written");
        s.spy_cannot_read(v).await;
    }
    for conn in ["grab-db", "grab-sa", "grab-tls"] {
        assert!(
            !s.role_exists(&format!("{conn}-xero-token-consumer")).await,
            "{conn}: a Role was granted"
        );
    }
    // Deleting her connections deletes nothing of theirs.
    for conn in ["grab-db", "grab-sa", "grab-tls"] {
        s.alice_deletes(conn).await;
    }
    for (v, rv) in victims.iter().zip(&before) {
        assert_eq!(&s.secret_rv(v).await, rv, "{v} changed after the delete");
        let owners = s
            .admin_secrets()
            .get(v)
            .await
            .expect("still there")
            .metadata
            .owner_references;
        assert!(owners.unwrap_or_default().is_empty(), "{v} got an owner");
    }
    assert_eq!(s.fx.report().await.counters.token_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_come_only_from_opted_in_secrets() {
    let s = scene("trust-client", Timings::default()).await;
    admin_secret(
        &s,
        json!({"metadata": {"name": "db-credentials"},
            "stringData": {"username": "app", "password": "hunter2"}}),
    )
    .await;
    let rv = s.secret_rv("db-credentials").await;
    for (conn, grant) in [("steal", "RefreshToken"), ("steal-cc", "ClientCredentials")] {
        s.alice_creates(
            conn,
            json!({"grant": grant, "consumers": [{"serviceAccount": "spy"}],
                "clientSecretRef": {"name": "db-credentials", "clientIdKey": "username",
                    "clientSecretKey": "password"}}),
        )
        .await;
        let m = s.refused_with(conn, "ClientSecretNotOptedIn").await;
        assert!(m.contains(LABEL_CLIENT_CREDENTIALS), "{m}");
        assert!(!m.contains("hunter2"), "{m}");
        s.event(conn, "ClientSecretNotOptedIn").await;
        // Nothing was copied anywhere: no token Secret was even created, no grant was made.
        assert!(
            s.admin_secrets()
                .get_opt(&format!("{conn}-xero-token"))
                .await
                .expect("get")
                .is_none(),
            "{conn}: a token Secret was created"
        );
        assert!(!s.role_exists(&format!("{conn}-xero-token-consumer")).await);
    }
    assert_eq!(s.secret_rv("db-credentials").await, rv);
    s.spy_cannot_read("db-credentials").await;

    // An opted-in Secret shares its credential keys, not every key it holds.
    admin_secret(
        &s,
        json!({"metadata": {"name": "shared-app", "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
            "stringData": {"client_id": "id", "client_secret": "secret", "db_password": "hunter2"}}),
    )
    .await;
    s.alice_creates(
        "keys",
        json!({"consumers": [{"serviceAccount": "spy"}],
            "clientSecretRef": {"name": "shared-app", "clientSecretKey": "db_password"}}),
    )
    .await;
    let m = s.refused_with("keys", "ClientSecretNotOptedIn").await;
    assert!(m.contains("db_password"), "{m}");
    assert!(
        s.admin_secrets()
            .get_opt("keys-xero-token")
            .await
            .expect("get")
            .is_none()
    );
    assert_eq!(s.fx.report().await.counters.token_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_to_allowed_endpoints() {
    let s = scene("trust-endpoints", Timings::default()).await;
    let (listener, hits) = common::attacker_listener().await;
    let evil = format!("{listener}/connect/token");
    for (conn, spec) in [
        ("exfil-token", json!({"endpoints": {"tokenUrl": evil}})),
        (
            "exfil-tenants",
            json!({"endpoints": {"tokenUrl": s.fx.emulator.token_url(), "connectionsUrl": evil}}),
        ),
        (
            "exfil-cc",
            json!({"grant": "ClientCredentials", "endpoints": {"tokenUrl": evil}}),
        ),
        (
            "ssrf-metadata",
            json!({"endpoints": {"tokenUrl": "http://169.254.169.254/latest/meta-data/"}}),
        ),
        (
            "exfil-revoke",
            json!({"revokeOnDelete": true, "endpoints": {
                "tokenUrl": s.fx.emulator.token_url(), "revocationUrl": evil}}),
        ),
    ] {
        s.alice_creates(conn, spec).await;
        let m = s.refused_with(conn, "EndpointNotAllowed").await;
        assert!(m.contains("--allowed-endpoint-hosts"), "{m}");
        s.event(conn, "EndpointNotAllowed").await;
    }
    s.alice_deletes("exfil-revoke").await;

    // A consumer points the shared token-url annotation at the listener and expires the token:
    // the controller (the producer) still calls only the allowed emulator.
    s.alice_creates(
        "acme",
        json!({"tokenSecretName": s.fx.secret, "consumers": [{"serviceAccount": "spy"}]}),
    )
    .await;
    common::connection::wait_for_reason(&s.fx, "acme", "TokenValid", SETTLE).await;
    let rotation = s.fx.record().await.rotation;
    Api::<Secret>::namespaced(s.spy.clone(), s.ns())
        .patch(
            &s.fx.secret,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {f::ANN_TOKEN_URL: evil}},
                "stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00Z"},
            })),
        )
        .await
        .expect("a consumer may patch its token Secret");
    let deadline = Instant::now() + SETTLE;
    loop {
        let rec = s.fx.record().await;
        if rec.rotation > rotation && rec.settings.token_url.as_deref() != Some(evil.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "the controller never refreshed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::connection::wait_for_reason(&s.fx, "acme", "TokenValid", SETTLE).await;

    // The refresher itself refuses a token URL outside the allowlist, before any claim: a
    // producer on a Secret whose annotation names the listener.
    seeded_secret(&s, "direct", json!({f::ANN_TOKEN_URL: evil})).await;
    let producer = xero_operator::protocol::Refresher::new(
        s.fx.client.clone(),
        s.ns(),
        "direct",
        "controller/direct",
        xero_operator::protocol::Role::Producer {
            ahead: Duration::ZERO,
        },
    )
    .with_allowlist(s.fx.emulator.allowlist())
    .with_max_wait(Duration::from_secs(5));
    let refused = producer.get().await;
    assert!(
        matches!(
            &refused,
            Err(xero_operator::protocol::Error::EndpointNotAllowed(_))
        ),
        "{refused:?}"
    );
    let direct = s.admin_secrets().get("direct").await.expect("direct");
    assert!(
        !direct
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(f::ANN_HOLDER),
        "no claim was written"
    );

    // revokeOnDelete towards the listener: refused, and deleting sends nothing.
    s.alice_connections()
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revokeOnDelete": true,
                "endpoints": {"revocationUrl": format!("{listener}/connect/revocation")}}})),
        )
        .await
        .expect("alice edits her connection");
    s.refused_with("acme", "EndpointNotAllowed").await;
    s.alice_deletes("acme").await;
    assert_eq!(s.fx.report().await.counters.revocation_calls, 0);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the attacker's endpoint was called"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_connections_token_secret_stays_its_own() {
    // Long-lived tokens: the victim's Secret must not change for reasons of its own meanwhile.
    let timings = Timings {
        access_token: Duration::from_secs(600),
        ..Timings::default()
    };
    let s = scene("trust-steal", timings).await;
    // The victim: an admin's connection keeping its Secret on delete (no owner reference).
    common::connection::create(
        &s.fx,
        "acme",
        &s.fx.secret,
        timings,
        json!({"keepTokenSecretOnDelete": true}),
    )
    .await;
    common::connection::wait_for_reason(&s.fx, "acme", "TokenValid", SETTLE).await;
    let secret = s.admin_secrets().get(&s.fx.secret).await.expect("victim");
    assert!(
        secret
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ANN_CONNECTION_UID)),
        "the controller marks the Secret as the victim's"
    );
    let rv = secret.metadata.resource_version.clone().expect("rv");
    // With her own token endpoint (the attack): refused before anything is looked at.
    let (listener, hits) = common::attacker_listener().await;
    s.alice_creates(
        "thief-exfil",
        json!({"tokenSecretName": s.fx.secret, "keepTokenSecretOnDelete": true,
            "consumers": [{"serviceAccount": "spy"}],
            "endpoints": {"tokenUrl": format!("{listener}/connect/token")}}),
    )
    .await;
    s.refused_with("thief-exfil", "EndpointNotAllowed").await;
    for (conn, keep) in [("thief", true), ("thief-owned", false)] {
        s.alice_creates(
            conn,
            json!({"tokenSecretName": s.fx.secret, "keepTokenSecretOnDelete": keep,
                "consumers": [{"serviceAccount": "spy"}]}),
        )
        .await;
        let m = s.refused_with(conn, "TokenSecretInUse").await;
        assert!(m.contains("another XeroConnection"), "{m}");
        assert!(
            !m.contains("uid"),
            "the condition must not describe the Secret: {m}"
        );
        s.event(conn, "TokenSecretInUse").await;
        assert!(!s.role_exists(&format!("{conn}-xero-token-consumer")).await);
    }
    s.spy_cannot_read(&s.fx.secret).await;
    for conn in ["thief", "thief-owned", "thief-exfil"] {
        s.alice_deletes(conn).await;
    }
    let after = s.admin_secrets().get(&s.fx.secret).await.expect("victim");
    assert_eq!(
        after.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    common::connection::wait_for_reason(&s.fx, "acme", "TokenValid", SETTLE).await;

    // The victim's owner deletes the connection, keeping the Secret: it is released, so alice
    // cannot take it by re-creating a connection of the same name.
    common::connection::api(&s.fx)
        .delete("acme", &DeleteParams::default())
        .await
        .expect("delete the victim connection");
    let deadline = Instant::now() + SETTLE;
    while common::connection::api(&s.fx)
        .get_opt("acme")
        .await
        .expect("get")
        .is_some()
    {
        assert!(Instant::now() < deadline, "acme was never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = s.admin_secrets().get(&s.fx.secret).await.expect("kept");
    let labels = kept.metadata.labels.clone().unwrap_or_default();
    assert!(!labels.contains_key(f::LABEL_CONNECTION), "{labels:?}");
    assert!(kept.data.is_some_and(|d| d.contains_key(f::REFRESH_TOKEN)));
    s.alice_creates(
        "acme",
        json!({"tokenSecretName": s.fx.secret, "consumers": [{"serviceAccount": "spy"}]}),
    )
    .await;
    s.refused_with("acme", "TokenSecretNotOwned").await;
    s.spy_cannot_read(&s.fx.secret).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the attacker's endpoint was called"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_objects_of_the_same_name_are_never_taken_over() {
    let s = scene("trust-rbac", Timings::default()).await;
    let roles: Api<Role> = Api::namespaced(s.fx.client.clone(), s.ns());
    let bindings: Api<RoleBinding> = Api::namespaced(s.fx.client.clone(), s.ns());
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "evil-xero-token-consumer"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
    }))
    .expect("role");
    roles
        .create(&PostParams::default(), &role)
        .await
        .expect("admin role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "evil-xero-token-consumer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "evil-xero-token-consumer"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": s.ns()}],
    }))
    .expect("binding");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("admin binding");
    let rvs = |r: &Role, b: &RoleBinding| {
        (
            r.metadata.resource_version.clone(),
            b.metadata.resource_version.clone(),
        )
    };
    let before = rvs(
        &roles.get("evil-xero-token-consumer").await.expect("role"),
        &bindings.get("evil-xero-token-consumer").await.expect("rb"),
    );
    s.alice_creates("evil", json!({"consumers": [{"serviceAccount": "spy"}]}))
        .await;
    let m = s.refused_with("evil", "ConsumerRbacConflict").await;
    assert!(m.contains("not this connection's"), "{m}");
    s.event("evil", "ConsumerRbacConflict").await;
    // Emptying the consumer list must not delete them either.
    s.alice_connections()
        .patch(
            "evil",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"consumers": null}})),
        )
        .await
        .expect("alice edits her connection");
    s.refused_with("evil", "ConsumerRbacConflict").await;
    s.alice_deletes("evil").await;
    let after = rvs(
        &roles
            .get("evil-xero-token-consumer")
            .await
            .expect("role kept"),
        &bindings
            .get("evil-xero-token-consumer")
            .await
            .expect("binding kept"),
    );
    assert_eq!(before, after, "the admin's Role or RoleBinding was written");

    // Consumers of other (even nonexistent) namespaces: refused, no RoleBinding.
    s.alice_creates(
        "wide",
        json!({"consumers": [{"serviceAccount": "spy"},
            {"serviceAccount": "default", "namespace": "kube-system"},
            {"serviceAccount": "ghost", "namespace": "does-not-exist"}]}),
    )
    .await;
    s.refused_with("wide", "ConsumerNotAllowed").await;
    assert!(
        bindings
            .get_opt("wide-xero-token-consumer")
            .await
            .expect("get")
            .is_none()
    );

    // The legitimate path with the chart's RBAC: the controller creates the Secret and the
    // grant, later changes the grant in place, and spy reads exactly that one Secret.
    s.alice_creates("fine", json!({"consumers": [{"serviceAccount": "spy"}]}))
        .await;
    s.refused_with("fine", "WaitingForAuthorization").await;
    let spy_secrets: Api<Secret> = Api::namespaced(s.spy.clone(), s.ns());
    let deadline = Instant::now() + SETTLE;
    while spy_secrets.get("fine-xero-token").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "spy was never granted its Secret"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.spy_cannot_read("xero-app").await;
    s.spy_cannot_read(&s.fx.secret).await;
    s.alice_connections()
        .patch(
            "fine",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"consumers": [
                {"serviceAccount": "spy"}, {"serviceAccount": "default"}]}})),
        )
        .await
        .expect("add a consumer");
    let deadline = Instant::now() + SETTLE;
    loop {
        let b = bindings
            .get("fine-xero-token-consumer")
            .await
            .expect("binding");
        if b.subjects.map(|s| s.len()) == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "the binding was never updated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A refused consumer list withdraws the grants the controller made: none outlives a refusal.
    s.alice_connections()
        .patch(
            "fine",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"consumers": [
                {"serviceAccount": "spy"}, {"serviceAccount": "default", "namespace": "kube-system"}]}})),
        )
        .await
        .expect("a cross-namespace consumer");
    s.refused_with("fine", "ConsumerNotAllowed").await;
    let deadline = Instant::now() + SETTLE;
    while s.role_exists("fine-xero-token-consumer").await
        || bindings
            .get_opt("fine-xero-token-consumer")
            .await
            .expect("get")
            .is_some()
    {
        assert!(Instant::now() < deadline, "the grant outlived the refusal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.spy_cannot_read("fine-xero-token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_consumer_text_cannot_break_the_operator_s_output() {
    let s = scene("trust-text", Timings::default()).await;
    // A name too long for the derived label value is refused at apply time.
    let long = "a".repeat(64);
    let conn: XeroConnection = serde_json::from_value(json!({
        "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
        "metadata": {"name": long}, "spec": {"clientSecretRef": {"name": "xero-app"}},
    }))
    .expect("connection");
    let refused = s
        .alice_connections()
        .create(&PostParams::default(), &conn)
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.message.contains("at most 63 characters")),
        "{refused:?}"
    );

    // A consumer writes escape sequences and forged lines into the annotations that reach
    // status, Events and `kubectl get`.
    s.alice_creates(
        "acme",
        json!({"tokenSecretName": s.fx.secret, "consumers": [{"serviceAccount": "spy"}]}),
    )
    .await;
    common::connection::wait_for_reason(&s.fx, "acme", "TokenValid", SETTLE).await;
    let rec = s.fx.record().await;
    let fingerprint = rec
        .refresh_token
        .as_ref()
        .map(xero_operator::redact::Sensitive::fingerprint)
        .expect("refresh token");
    Api::<Secret>::namespaced(s.spy.clone(), s.ns())
        .patch(
            &s.fx.secret,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {
                    f::ANN_REFRESHED_BY: "\u{1b}[2J\u{1b}[31mroot\nREADY   True",
                    f::ANN_REAUTH_FOR: fingerprint,
                    f::ANN_REAUTH_REASON: format!("\u{1b}]0;pwned\u{7}\r\n{}", "x".repeat(5000)),
                }},
                "stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00Z"},
            })),
        )
        .await
        .expect("spy patches its Secret");
    let message = s.refused_with("acme", "ReauthorizationRequired").await;
    let event = s.event("acme", "ReauthorizationRequired").await;
    let status = Api::<XeroConnection>::namespaced(s.fx.client.clone(), s.ns())
        .get("acme")
        .await
        .expect("get")
        .status
        .expect("status");
    let shown = [
        message,
        event.note.unwrap_or_default(),
        status.last_refreshed_by.unwrap_or_default(),
    ];
    for text in &shown {
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(
            text.chars().count() <= xero_operator::text::MAX_REASON_CHARS,
            "uncapped: {}",
            text.len()
        );
    }
    assert_eq!(
        s.fx.report().await.counters.token_calls,
        1,
        "only the first refresh"
    );

    // Settings and counters at the edge of u64 do not crash the controller (it panicked before
    // the settings were clamped): it goes on refreshing.
    s.fx.patch(
        json!({f::EXPIRES_AT: "2000-01-01T00:00:00Z"}),
        json!({f::ANN_REAUTH_FOR: null, f::ANN_REAUTH_REASON: null,
            f::ANN_CLOCK_SKEW: "18446744073709551615",
            f::ANN_LEASE_DURATION: "18446744073709551615",
            f::ANN_ROTATION: "18446744073709551614"}),
    )
    .await;
    let deadline = Instant::now() + SETTLE;
    while s.fx.record().await.rotation != u64::MAX {
        assert!(
            Instant::now() < deadline,
            "the controller stopped refreshing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.fx.patch(
        json!({}),
        json!({f::ANN_CLOCK_SKEW: "1", f::ANN_LEASE_DURATION: "5", f::ANN_ROTATION: "1"}),
    )
    .await;
    // The same values read straight by a refresher (as when the controller's watch delivers a
    // consumer's edit while it waits, or by `xero-token`): no arithmetic overflows.
    seeded_secret(
        &s,
        "edge",
        json!({
                f::ANN_TOKEN_URL: s.fx.emulator.token_url(),
                f::ANN_CLOCK_SKEW: "18446744073709551615",
                f::ANN_LEASE_DURATION: "18446744073709551615",
                f::ANN_ROTATION: "18446744073709551615"}),
    )
    .await;
    let edge = xero_operator::protocol::Refresher::new(
        s.fx.client.clone(),
        s.ns(),
        "edge",
        "worker/edge",
        xero_operator::protocol::Role::Consumer,
    )
    .with_allowlist(s.fx.emulator.allowlist())
    .with_max_wait(Duration::from_secs(3));
    let outcome = tokio::spawn(async move { edge.get().await.map(drop) }).await;
    assert!(outcome.is_ok(), "the refresher panicked: {outcome:?}");
    let edge = s.admin_secrets().get("edge").await.expect("edge");
    assert_eq!(
        xero_operator::protocol::TokenRecord::from_secret(&edge).rotation,
        u64::MAX,
        "stored, the counter saturated"
    );

    // An `expires_at` of the year 9999 does not keep a token in use.
    s.fx.patch(
        json!({f::EXPIRES_AT: "9999-12-31T23:59:59Z", f::ACCESS_TOKEN: "not-a-jwt"}),
        json!({}),
    )
    .await;
    let deadline = Instant::now() + SETTLE;
    loop {
        let rec = s.fx.record().await;
        if rec.rotation > 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the year-9999 token was never replaced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::connection::wait_for_reason(&s.fx, "acme", "TokenValid", SETTLE).await;
}
