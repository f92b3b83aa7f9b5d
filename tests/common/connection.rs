//! XeroConnections and an in-process controller for the integration tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::controller::{self, Context, metrics::Metrics};
use xero_operator::crd::XeroConnection;

use super::{Timings, TokenFixture, install_crds};

/// The controller identity of [`start_controller`].
pub const CONTROLLER_ID: &str = "controller/test";

/// Creates the client Secret `xero-app` (once) and the XeroConnection `name` using
/// `token_secret`, pointed at the fixture's emulator; `extra` is merged into the spec.
pub async fn create(
    fx: &TokenFixture,
    name: &str,
    token_secret: &str,
    timings: Timings,
    extra: serde_json::Value,
) {
    install_crds(&fx.client).await;
    let secrets: Api<Secret> = Api::namespaced(fx.client.clone(), &fx.namespace);
    let app: Secret = serde_json::from_value(json!({
        "metadata": {"name": "xero-app", "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
        "stringData": {
            "client_id": xero_proving_ground::emulator::DEFAULT_CLIENT_ID,
            "client_secret": xero_proving_ground::emulator::DEFAULT_CLIENT_SECRET,
        },
    }))
    .expect("secret");
    match secrets.create(&PostParams::default(), &app).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("client Secret: {e}"),
    }
    let mut spec = json!({
        "clientSecretRef": {"name": "xero-app"},
        "tokenSecretName": token_secret,
        "refresh": {"clockSkewSeconds": timings.clock_skew_secs, "leaseDurationSeconds": timings.lease_secs.max(5)},
        "endpoints": {
            "tokenUrl": fx.emulator.token_url(),
            "connectionsUrl": fx.emulator.connections_url(),
            "revocationUrl": fx.emulator.revocation_url(),
        },
    });
    for (k, v) in extra.as_object().expect("extra spec is an object") {
        spec[k] = v.clone();
    }
    let conn: XeroConnection = serde_json::from_value(json!({
        "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("connection");
    api(fx)
        .create(&PostParams::default(), &conn)
        .await
        .expect("create connection");
}

pub fn api(fx: &TokenFixture) -> Api<XeroConnection> {
    Api::namespaced(fx.client.clone(), &fx.namespace)
}

/// The reason of `name`'s Ready condition, if any.
pub async fn ready_reason(fx: &TokenFixture, name: &str) -> Option<String> {
    let conn = api(fx).get(name).await.ok()?;
    conn.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason)
}

/// Waits until `name`'s Ready condition has `reason`; returns the connection then.
pub async fn wait_for_reason(
    fx: &TokenFixture,
    name: &str,
    reason: &str,
    within: Duration,
) -> XeroConnection {
    let deadline = Instant::now() + within;
    loop {
        let conn = api(fx).get(name).await.expect("get connection");
        let current = conn
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.reason.clone());
        if current.as_deref() == Some(reason) {
            return conn;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: Ready never became {reason}; last {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A controller running in this test process, watching one namespace; stops when dropped.
pub struct Running {
    /// The controller's metrics (its reconcile counter shows that it looked again).
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Starts a controller for the fixture's namespace in this process, allowed to call the
/// fixture's emulator (rechecking person-fixable states every second).
pub fn start_controller(fx: &TokenFixture, configure: impl FnOnce(&mut Context)) -> Running {
    start_controller_as(
        &fx.client,
        &fx.namespace,
        fx.emulator.allowlist(),
        configure,
    )
}

/// Starts a controller for `ns` in this process with `client`'s rights, allowed to call the
/// hosts of `allowlist`.
pub fn start_controller_as(
    client: &Client,
    ns: &str,
    allowlist: xero_operator::allowlist::EndpointAllowlist,
    configure: impl FnOnce(&mut Context),
) -> Running {
    start_controller_for(client, &[ns], allowlist, configure)
}

/// Starts a controller for the namespaces `namespaces` in this process with `client`'s rights,
/// allowed to call the hosts of `allowlist`.
pub fn start_controller_for(
    client: &Client,
    namespaces: &[&str],
    allowlist: xero_operator::allowlist::EndpointAllowlist,
    configure: impl FnOnce(&mut Context),
) -> Running {
    let metrics = Arc::new(Metrics::default());
    let mut ctx = Context::new(client.clone(), CONTROLLER_ID.to_owned(), metrics.clone());
    ctx.recheck = Duration::from_secs(1);
    ctx.policy.allowlist = allowlist;
    configure(&mut ctx);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(
        Arc::new(ctx),
        namespaces.iter().map(|ns| (*ns).to_owned()).collect(),
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        metrics,
        stop: Some(stop),
        task,
    }
}

impl Running {
    /// Stops the controller and waits until it has stopped (its reconciles in flight finished).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .is_err()
        {
            abort.abort();
            panic!("the controller did not stop within 60 s");
        }
    }

    /// Reconciles run so far.
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }

    /// Makes the controller look at the connection `times` more times (by touching its token
    /// Secret, which it watches) and waits until each reconcile has run.
    pub async fn reconcile_again(&self, fx: &TokenFixture, times: u32) {
        for i in 0..times {
            let before = self.reconciles();
            fx.patch(json!({}), json!({"example.com/nudge": i.to_string()}))
                .await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.reconciles() == before {
                assert!(Instant::now() < deadline, "the controller never reconciled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
