//! Isolation between tenants, measured (docs/security.md, "One operator, many tenants").
//!
//! - **Fairness**: one namespace's `storm_connections` connections of app X are re-expired
//!   without pause by their consumer, under a tight cap on app X; meanwhile the refresh lag
//!   after due of (a) another app's connection and (b) another namespace's connection of app X,
//!   over several token lifetimes.
//! - **Memory**: the controller's resident memory with `memory_connections` plain connections,
//!   and with as many hostile ones (a 250 KB annotation each): bytes per connection of each.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format::{self as f, TokenRecord};

use crate::emulator::{self, Emulator, NewUser};

/// Inputs of the isolation benchmark.
#[derive(Clone, Debug)]
pub struct IsolationBench {
    /// Connections of app X in the storming namespace.
    pub storm_connections: usize,
    /// The controller's cap on app X (and Y): calls per minute.
    pub app_calls_per_minute: u32,
    /// The emulator's access-token lifetime.
    pub token_lifetime: Duration,
    /// Expiries of each observed connection to measure.
    pub lifetimes: u32,
    /// Connections of each kind in the memory part (0: skip it).
    pub memory_connections: usize,
    /// The `xero-operator` executable.
    pub operator: PathBuf,
    pub kubeconfig: PathBuf,
}

/// A second Xero app.
const APP_Y: (&str, &str) = ("bench-app-y", "bench-app-y-secret");
/// The hostile annotation's size.
const HOSTILE_BYTES: usize = 250 * 1024;
/// Concurrent API requests while creating objects.
const CREATE_CONCURRENCY: usize = 16;

/// The controller over `namespaces`, calling `emu` with a cap of `cap` calls a minute per app.
fn controller(
    cfg: &IsolationBench,
    namespaces: &[&str],
    emu: &Emulator,
    cap: u32,
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&cfg.operator);
    for ns in namespaces {
        cmd.arg(format!("--namespace={ns}"));
    }
    cmd.args([
        "--metrics-addr",
        "127.0.0.1:0",
        "--identity",
        "controller/isolation",
    ])
    .arg(format!("--app-calls-per-minute={cap}"))
    .arg(format!("--allowed-endpoint-hosts={}", emu.allowed_host()))
    .env("KUBECONFIG", &cfg.kubeconfig)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
}

async fn client_secret(
    client: &Client,
    ns: &str,
    name: &str,
    app: (&str, &str),
) -> anyhow::Result<()> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
                "stringData": {"client_id": app.0, "client_secret": app.1}}))?,
        )
        .await?;
    Ok(())
}

/// Connection `name` in `ns` of the app in `app_secret` (client `client_id`), its token Secret
/// seeded with a new user's refresh token; `annotations` on the connection.
async fn connection(
    client: &Client,
    emu: &Emulator,
    ns: &str,
    name: &str,
    (app_secret, client_id): (&str, &str),
    annotations: &Value,
) -> anyhow::Result<()> {
    let user = emu
        .admin()
        .add_user(&NewUser {
            client_id: Some(client_id.to_owned()),
            ..NewUser::default()
        })
        .await?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-xero-token"), "labels": {f::LABEL_CONNECTION: name}},
                "stringData": {f::REFRESH_TOKEN: user.refresh_token}}))?,
        )
        .await?;
    let conn: XeroConnection = serde_json::from_value(json!({
    "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
    "metadata": {"name": name, "annotations": annotations},
    "spec": {
        "clientSecretRef": {"name": app_secret},
        "refresh": {"clockSkewSeconds": 1},
        "endpoints": {"tokenUrl": emu.token_url(), "connectionsUrl": emu.connections_url()},
    }}))?;
    Api::<XeroConnection>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &conn)
        .await?;
    Ok(())
}

async fn ready(client: &Client, ns: &str) -> anyhow::Result<usize> {
    Ok(Api::<XeroConnection>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.reason == "TokenValid")
            })
        })
        .count())
}

async fn wait_ready(client: &Client, ns: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while ready(client, ns).await? < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{ns}: not all {n} Ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn lag_summary(mut lags: Vec<f64>) -> Value {
    lags.sort_by(f64::total_cmp);
    json!({
        "refreshes": lags.len(),
        "p50_ms": percentile(&lags, 0.5).round(),
        "p99_ms": percentile(&lags, 0.99).round(),
        "max_ms": lags.last().copied().unwrap_or_default().round(),
    })
}

/// The lag of each refresh of `secret` after its previous token stopped being usable, for
/// `lifetimes` refreshes.
async fn lags(
    client: Client,
    ns: String,
    secret: String,
    lifetimes: u32,
    stop: Arc<AtomicBool>,
) -> Vec<f64> {
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let mut lags = Vec::new();
    let mut last: Option<TokenRecord> = None;
    while lags.len() < lifetimes as usize && !stop.load(Ordering::Relaxed) {
        if let Ok(s) = secrets.get(&secret).await {
            let rec = TokenRecord::from_secret(&s);
            if let Some(prev) = &last
                && rec.rotation > prev.rotation
                && let (Some(due), Some(at)) = (prev.usable_until(), rec.refreshed_at)
            {
                let lag = at.duration_since(due).unwrap_or_default();
                lags.push(lag.as_secs_f64() * 1000.0);
            }
            if last.as_ref().is_none_or(|p| rec.rotation > p.rotation) {
                last = Some(rec);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lags
}

/// Runs both parts and returns the JSON document.
pub async fn isolation(cfg: &IsolationBench, client: &Client) -> anyhow::Result<Value> {
    xero_operator::crd::install(client).await?;
    let fairness = fairness(cfg, client).await?;
    eprintln!("isolation: fairness {fairness}");
    let memory = if cfg.memory_connections > 0 {
        let m = memory(cfg, client).await?;
        eprintln!("isolation: memory {m}");
        m
    } else {
        Value::Null
    };
    Ok(json!({
        "inputs": {
            "storm_connections": cfg.storm_connections,
            "app_calls_per_minute": cfg.app_calls_per_minute,
            "namespace_share": format!("1/{}", xero_operator::protocol::gate::NAMESPACE_SHARE),
            "token_lifetime_s": cfg.token_lifetime.as_secs(),
            "lifetimes": cfg.lifetimes,
            "memory_connections": cfg.memory_connections,
            "hostile_annotation_bytes": HOSTILE_BYTES,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "fairness": fairness,
        "memory": memory,
    }))
}

async fn fairness(cfg: &IsolationBench, client: &Client) -> anyhow::Result<Value> {
    let emu = super::start_emulator(cfg.token_lifetime, Duration::from_secs(3600)).await?;
    emu.admin().add_client(APP_Y.0, APP_Y.1).await?;
    let storm_ns = super::create_namespace(client, "iso-storm").await?;
    let other_ns = super::create_namespace(client, "iso-other").await?;
    let x = (emulator::DEFAULT_CLIENT_ID, emulator::DEFAULT_CLIENT_SECRET);
    client_secret(client, &storm_ns, "app-x", x).await?;
    client_secret(client, &other_ns, "app-x", x).await?;
    client_secret(client, &other_ns, "app-y", APP_Y).await?;
    let none = json!({});
    futures_util::stream::iter(0..cfg.storm_connections)
        .map(|i| {
            let (client, emu, ns, none) = (client.clone(), &emu, storm_ns.clone(), &none);
            async move { connection(&client, emu, &ns, &format!("s{i}"), ("app-x", x.0), none).await }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    connection(client, &emu, &other_ns, "bx", ("app-x", x.0), &none).await?;
    connection(client, &emu, &other_ns, "by", ("app-y", APP_Y.0), &none).await?;
    let mut controller = controller(cfg, &[&storm_ns, &other_ns], &emu, cfg.app_calls_per_minute)?;
    wait_ready(client, &other_ns, 2, Duration::from_secs(120)).await?;

    // The storm: the consumer of every storming connection expires its token without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let storm = {
        let (secrets, stop, writes) = (
            Api::<Secret>::namespaced(client.clone(), &storm_ns),
            stop.clone(),
            writes.clone(),
        );
        let names: Vec<String> = (0..cfg.storm_connections)
            .map(|i| format!("s{i}-xero-token"))
            .collect();
        tokio::spawn(async move {
            let patch = json!({"stringData": {f::EXPIRES_AT: "2000-01-01T00:00:00.000Z"}});
            while !stop.load(Ordering::Relaxed) {
                for name in &names {
                    if secrets
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .is_ok()
                    {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let before = emu.admin().report().await?.counters;
    let started = Instant::now();
    let (lag_y, lag_x) = tokio::join!(
        lags(
            client.clone(),
            other_ns.clone(),
            "by-xero-token".into(),
            cfg.lifetimes,
            stop.clone()
        ),
        lags(
            client.clone(),
            other_ns.clone(),
            "bx-xero-token".into(),
            cfg.lifetimes,
            stop.clone()
        ),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = storm.await;
    let elapsed = started.elapsed();
    let after = emu.admin().report().await?.counters;
    let _ = controller.start_kill();
    let _ = controller.wait().await;
    for ns in [&storm_ns, &other_ns] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &Default::default())
            .await;
    }
    let calls = |c: &crate::emulator::state::Counters, id: &str| {
        c.token_calls_by_client.get(id).copied().unwrap_or(0)
    };
    let x_calls = calls(&after, x.0) - calls(&before, x.0);
    Ok(json!({
        "seconds": super::round1(elapsed.as_secs_f64()),
        "storm_expiries_written": writes.load(Ordering::Relaxed),
        "app_x_calls_per_minute": super::round1(x_calls as f64 * 60.0 / elapsed.as_secs_f64()),
        "other_app_lag": lag_summary(lag_y),
        "other_namespace_same_app_lag": lag_summary(lag_x),
    }))
}

/// Resident memory with `n` connections of the given annotations, after a minute idle (the
/// controller hands freed memory back once a minute); and without any.
async fn rss_with(
    cfg: &IsolationBench,
    client: &Client,
    n: usize,
    annotations: &Value,
) -> anyhow::Result<(u64, u64)> {
    let hour = Duration::from_secs(3600);
    let emu = super::start_emulator(hour, hour).await?;
    let ns = super::create_namespace(client, "iso-memory").await?;
    // A cap that lets every first token through within a minute: memory, not the cap.
    let cap = u32::try_from(n.max(1) * 4).unwrap_or(u32::MAX);
    let mut controller = controller(cfg, &[&ns], &emu, cap)?;
    let pid = controller.id().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let empty = super::scale::proc_status_kib(pid, "VmRSS:").unwrap_or_default();
    let x = (emulator::DEFAULT_CLIENT_ID, emulator::DEFAULT_CLIENT_SECRET);
    client_secret(client, &ns, "app-x", x).await?;
    futures_util::stream::iter(0..n)
        .map(|i| {
            let (client, emu, ns) = (client.clone(), &emu, ns.clone());
            async move {
                connection(
                    &client,
                    emu,
                    &ns,
                    &format!("m{i}"),
                    ("app-x", x.0),
                    annotations,
                )
                .await
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    wait_ready(client, &ns, n, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(65)).await;
    let full = super::scale::proc_status_kib(pid, "VmRSS:").unwrap_or_default();
    let _ = controller.start_kill();
    let _ = controller.wait().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &Default::default())
        .await;
    Ok((empty, full))
}

async fn memory(cfg: &IsolationBench, client: &Client) -> anyhow::Result<Value> {
    let n = cfg.memory_connections;
    let plain = rss_with(cfg, client, n, &json!({})).await?;
    let hostile = rss_with(
        cfg,
        client,
        n,
        &json!({"example.com/junk": "x".repeat(HOSTILE_BYTES)}),
    )
    .await?;
    let per = |(empty, full): (u64, u64)| full.saturating_sub(empty) * 1024 / n.max(1) as u64;
    let (plain_per, hostile_per) = (per(plain), per(hostile));
    Ok(json!({
        "connections": n,
        "plain_rss_mib": super::round1(plain.1 as f64 / 1024.0),
        "hostile_rss_mib": super::round1(hostile.1 as f64 / 1024.0),
        "plain_bytes_per_connection": plain_per,
        "hostile_bytes_per_connection": hostile_per,
        "hostile_over_plain_percent": if plain_per > 0 {
            super::round1((hostile_per as f64 / plain_per as f64 - 1.0) * 100.0)
        } else { 0.0 },
    }))
}

/// Prints the isolation table.
pub fn print_table(doc: &Value) {
    let f = &doc["fairness"];
    println!(
        "isolation: {} storming connections of app X, {} calls/min per app ({} per namespace share)",
        doc["inputs"]["storm_connections"],
        doc["inputs"]["app_calls_per_minute"],
        doc["inputs"]["namespace_share"]
    );
    println!(
        "  storm: {} expiries written in {} s; app X called {}/min",
        f["storm_expiries_written"], f["seconds"], f["app_x_calls_per_minute"]
    );
    for (what, key) in [
        ("another app", "other_app_lag"),
        (
            "another namespace, same app",
            "other_namespace_same_app_lag",
        ),
    ] {
        let l = &f[key];
        println!(
            "  refresh lag after due, {what:<28} p50 {:>6} ms  p99 {:>6} ms  max {:>6} ms  ({} refreshes)",
            l["p50_ms"], l["p99_ms"], l["max_ms"], l["refreshes"]
        );
    }
    let m = &doc["memory"];
    if !m.is_null() {
        println!(
            "  memory, {} connections: plain {} MiB ({} B each), with a 250 KB annotation each {} MiB ({} B each, {}%)",
            m["connections"],
            m["plain_rss_mib"],
            m["plain_bytes_per_connection"],
            m["hostile_rss_mib"],
            m["hostile_bytes_per_connection"],
            m["hostile_over_plain_percent"]
        );
    }
}
