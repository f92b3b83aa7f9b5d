//! `make run`: the whole product on an embedded default — a local control plane, the Xero
//! emulator, the CRD, the controller, an example connection and a consumer — narrated in plain
//! lines a person can follow: the controller refreshing on expiry, a consumer taking over while
//! the controller is away, and the status changing.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use crate::controlplane::{ControlPlane, Options};
use crate::emulator::{self, Emulator, Lifetimes, NewUser};
use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::controller::{self, Context, metrics::Metrics};
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format::{self as f, TokenRecord, format_time};
use xero_operator::protocol::{Refresher, Role};

/// Settings of a demo run.
pub struct RunOptions {
    pub controlplane: Options,
    /// Access-token lifetime in the emulator (short, to see several refreshes).
    pub token_lifetime: Duration,
    /// Stop after this long (`RUN_FOR`); `None` runs until Ctrl-C.
    pub run_for: Option<Duration>,
}

const NS: &str = "xero-demo";

fn say(line: impl AsRef<str>) {
    println!(
        "[{}] {}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        line.as_ref()
    );
}

fn describe(rec: &TokenRecord) -> String {
    let expires = match rec.expiry {
        f::Expiry::At(t) => format_time(t),
        _ => "unknown".to_owned(),
    };
    format!(
        "rotation {} by {}, access token fingerprint {} expires {expires}",
        rec.rotation,
        rec.refreshed_by.as_deref().unwrap_or("nobody yet"),
        rec.access_token
            .as_ref()
            .map(|t| t.fingerprint())
            .unwrap_or_else(|| "-".into()),
    )
}

/// Runs the demo. Returns when `run_for` has passed or on Ctrl-C.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    say("starting a local control plane (etcd, kube-apiserver, kube-controller-manager)…");
    let cp = ControlPlane::start(&opts.controlplane).await?;
    say(format!(
        "control plane ready at {} — kubectl: export KUBECONFIG={}",
        cp.server,
        cp.admin_kubeconfig.display()
    ));
    let emu = Emulator::start(emulator::Config {
        behaviour: emulator::Behaviour {
            lifetimes: Lifetimes {
                access_token: opts.token_lifetime,
                grace: opts.token_lifetime * 3,
                ..Lifetimes::default()
            },
            ..emulator::Behaviour::default()
        },
        ..emulator::Config::default()
    })
    .await?;
    say(format!(
        "Xero emulator at {} (access tokens live {:?})",
        emu.base_url(),
        opts.token_lifetime
    ));

    let kubeconfig = kube::config::Kubeconfig::read_from(&cp.admin_kubeconfig)?;
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?,
    )?;
    xero_operator::crd::install(&client).await?;
    say("installed the XeroConnection CRD");
    let user = emu.admin().add_user(&NewUser::default()).await?;
    seed(&client, &emu, &user).await?;
    say(format!(
        "created namespace {NS}: Secret xero-app (client id/secret), XeroConnection demo, and the first refresh token in demo-xero-token (as `xero-token authorize` would)"
    ));

    let mut ctx = Context::new(
        client.clone(),
        "controller/make-run".into(),
        Arc::new(Metrics::default()),
    );
    // The emulator is the one host besides Xero's that this controller may send credentials to.
    ctx.policy.allowlist = emu.allowlist();
    let ctx = Arc::new(ctx);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut controller_task = Some((
        stop_tx,
        tokio::spawn(controller::run(ctx.clone(), vec![NS.into()], async move {
            let _ = stop_rx.await;
        })),
    ));
    say("controller started (producer: refreshes only when the access token has expired)");

    let consumer = Refresher::new(
        client.clone(),
        NS,
        "demo-xero-token",
        "consumer/demo-worker",
        Role::Consumer,
    )
    .with_allowlist(emu.allowlist());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let conns: Api<XeroConnection> = Api::namespaced(client.clone(), NS);
    // The consumer starts once the controller has set the token Secret up (its first read
    // would otherwise report the missing app credentials as a failure).
    say("consumer: waiting for the controller to set up the token Secret…");
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < setup_deadline {
        let ready = secrets
            .get_opt("demo-xero-token")
            .await?
            .map(|s| TokenRecord::from_secret(&s))
            .is_some_and(|rec| rec.client.is_some() && rec.access_token.is_some());
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let mut last_rotation = u64::MAX;
    let mut last_status = String::new();
    let outage_at = opts.token_lifetime * 3;
    let mut outage_until: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { say("Ctrl-C: stopping"); break; }
            _ = ticker.tick() => {}
        }
        if opts.run_for.is_some_and(|d| started.elapsed() >= d) {
            say("RUN_FOR reached: stopping");
            break;
        }
        // One token lifetime without the controller, to show a consumer taking over.
        if outage_until.is_none() && started.elapsed() >= outage_at {
            if let Some((stop, task)) = controller_task.take() {
                let _ = stop.send(());
                let _ = task.await;
            }
            outage_until = Some(Instant::now() + opts.token_lifetime + Duration::from_secs(2));
            say(
                "stopping the controller for one token lifetime: the consumer will find the token expired and take over",
            );
        }
        if let Some(until) = outage_until
            && controller_task.is_none()
            && Instant::now() >= until
        {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            controller_task = Some((
                stop_tx,
                tokio::spawn(controller::run(ctx.clone(), vec![NS.into()], async move {
                    let _ = stop_rx.await;
                })),
            ));
            say("controller back: it sees a fresh token and only records who refreshed it");
        }
        match consumer.get().await {
            Ok(_) => {}
            Err(e) => say(format!("consumer: no token: {e}")),
        }
        if let Some(secret) = secrets.get_opt("demo-xero-token").await? {
            let rec = TokenRecord::from_secret(&secret);
            if rec.rotation != last_rotation && rec.refreshed_by.is_some() {
                last_rotation = rec.rotation;
                let who = rec.refreshed_by.clone().unwrap_or_default();
                let role = if who.starts_with("controller") {
                    "the controller"
                } else {
                    "a consumer"
                };
                say(format!("token refreshed by {role}: {}", describe(&rec)));
            }
        }
        if let Some(status) = conns.get_opt("demo").await?.and_then(|c| c.status) {
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
            let line = format!(
                "status: Ready={} reason={} lastRefreshedBy={} refreshCount={} tenants={}",
                ready.map(|c| c.status.as_str()).unwrap_or("?"),
                ready.map(|c| c.reason.as_str()).unwrap_or("?"),
                status.last_refreshed_by.as_deref().unwrap_or("-"),
                status.refresh_count,
                status
                    .tenants
                    .iter()
                    .filter_map(|t| t.tenant_name.clone())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            if line != last_status {
                say(&line);
                last_status = line;
            }
        }
    }
    if let Some((stop, task)) = controller_task.take() {
        let _ = stop.send(());
        let _ = task.await;
    }
    let report = emu.admin().report().await?;
    say(format!(
        "Xero saw {} token calls for {} rotations; broken chains: {}",
        report.counters.token_calls,
        report.chains.iter().map(|c| c.rotations).sum::<u64>(),
        report.broken_chains()
    ));
    // Every connection to the API server closes before it stops (the consumer's follower holds
    // a watch): none meets the server going away mid-stream, so nothing is logged after this.
    drop((consumer, secrets, conns, ctx, client));
    tokio::task::yield_now().await;
    drop(cp);
    say("stopped the control plane and removed its state");
    Ok(())
}

async fn seed(client: &Client, emu: &Emulator, user: &emulator::SeededUser) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    // Opted in as client credentials: every connection in the namespace may use them.
    let app: Secret = serde_json::from_value(json!({
        "metadata": {"name": "xero-app", "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
        "stringData": {"client_id": emulator::DEFAULT_CLIENT_ID, "client_secret": emulator::DEFAULT_CLIENT_SECRET},
    }))?;
    secrets.create(&PostParams::default(), &app).await?;
    let token: Secret = serde_json::from_value(json!({
        // Made by a person before the connection: the label hands it to connection `demo`.
        "metadata": {"name": "demo-xero-token", "labels": {f::LABEL_CONNECTION: "demo"}},
        "stringData": {f::REFRESH_TOKEN: user.refresh_token.clone().unwrap_or_default()},
    }))?;
    secrets.create(&PostParams::default(), &token).await?;
    let conn: XeroConnection = serde_json::from_value(json!({
        "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
        "metadata": {"name": "demo"},
        "spec": {
            "clientSecretRef": {"name": "xero-app"},
            "refresh": {"clockSkewSeconds": 2, "leaseDurationSeconds": 10},
            "endpoints": {"tokenUrl": emu.token_url(), "connectionsUrl": emu.connections_url(), "revocationUrl": emu.revocation_url()},
            "consumers": [{"serviceAccount": "demo-worker"}],
        },
    }))?;
    Api::<XeroConnection>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &conn)
        .await?;
    Ok(())
}
