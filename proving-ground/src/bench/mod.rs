//! `make bench`: figures, printed and written as JSON, never asserted as timings in tests.
//!
//! Controller scale ([`scale`]): many connections in one controller, and a refresh storm.
//! The chaos soak of `make soak` ([`soak`]): faults, kills and an API-server restart.
//!
//! The refresh economy: the same workload — N consumer processes, each asking for a token in a
//! loop over K access-token lifetimes — run three ways (naive, per-process cache, this project's
//! protocol with the controller running) against the real API server and the emulator, and a
//! fourth for comparison: the protocol with the controller's `AheadOfExpiry` policy.

pub mod consumer;
pub mod isolation;
pub mod scale;
pub mod soak;
pub mod timeline;
pub mod writes;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::emulator::{self, Emulator, Lifetimes, NewUser, RateLimits};
use consumer::{ConsumerReport, Mode};
use xero_operator::controller::ownership::LABEL_CLIENT_CREDENTIALS;
use xero_operator::controller::{self, Context, metrics::Metrics};
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format as f;

/// Inputs of the refresh-economy benchmark.
#[derive(Clone, Debug)]
pub struct RefreshBench {
    pub n_values: Vec<usize>,
    /// Access-token lifetimes to run through.
    pub lifetimes: u32,
    pub token_lifetime: Duration,
    pub clock_skew: Duration,
    /// Workers (threads) per consumer process.
    pub threads: usize,
    /// How far ahead of expiry the controller refreshes in the `protocol_ahead` way.
    pub ahead: Duration,
    /// The `xero-bench` executable (it runs the consumer processes).
    pub exe: PathBuf,
    /// Which ways to run (JSON keys: naive, per_process, protocol, protocol_ahead); empty: all.
    pub ways: Vec<String>,
    pub kubeconfig: PathBuf,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Runs every (way, N) and returns the JSON document.
pub async fn refresh_economy(cfg: &RefreshBench, client: &Client) -> anyhow::Result<Value> {
    if let Some(unknown) = cfg
        .ways
        .iter()
        .find(|w| !WAYS.iter().any(|(_, k, _)| k == w))
    {
        anyhow::bail!(
            "unknown way {unknown:?}: the ways are {}",
            WAYS.map(|(_, k, _)| k).join(", ")
        );
    }
    let mut doc = json!({
        "inputs": {
            "n": cfg.n_values,
            "lifetimes": cfg.lifetimes,
            "token_lifetime_s": cfg.token_lifetime.as_secs_f64(),
            "clock_skew_s": cfg.clock_skew.as_secs_f64(),
            "threads_per_process": cfg.threads,
            "protocol_ahead_of_expiry_s": cfg.ahead.as_secs(),
            "xero_operator_version": env!("CARGO_PKG_VERSION"),
            "kubernetes_version": kubernetes_version(client).await,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "naive": [], "per_process": [], "protocol": [], "protocol_ahead": [],
    });
    for (mode, key, ahead) in WAYS {
        if !cfg.ways.is_empty() && !cfg.ways.iter().any(|w| w == key) {
            continue;
        }
        let ahead = ahead.then_some(cfg.ahead);
        for &n in &cfg.n_values {
            let row = run_one(cfg, client, mode, ahead, n).await?;
            eprintln!("{key:>14} n={n:<3} {row}");
            doc[key].as_array_mut().expect("array").push(row);
        }
    }
    Ok(doc)
}

/// The ways the workload runs: (consumer mode, JSON key, whether the controller refreshes
/// ahead of expiry).
const WAYS: [(Mode, &str, bool); 4] = [
    (Mode::Naive, "naive", false),
    (Mode::PerProcess, "per_process", false),
    (Mode::Protocol, "protocol", false),
    (Mode::Protocol, "protocol_ahead", true),
];

async fn kubernetes_version(client: &Client) -> String {
    client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_else(|_| "unknown".into())
}

async fn run_one(
    cfg: &RefreshBench,
    client: &Client,
    mode: Mode,
    ahead: Option<Duration>,
    n: usize,
) -> anyhow::Result<Value> {
    // Xero's grace period equals its access-token lifetime (30 minutes each).
    let emu = start_emulator(cfg.token_lifetime, cfg.token_lifetime).await?;
    let user = emu.admin().add_user(&NewUser::default()).await?;
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let ns = create_namespace(client, "bench").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = "bench-xero-token";
    let seed: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret_name, "labels": {f::LABEL_CONNECTION: "bench"},
            "annotations": {f::ANN_TOKEN_URL: emu.token_url(), f::ANN_CLOCK_SKEW: cfg.clock_skew.as_secs().to_string(), f::ANN_LEASE_DURATION: "5"}},
        "stringData": {f::REFRESH_TOKEN: user.refresh_token.clone().unwrap_or_default(),
            f::CLIENT_ID: emulator::DEFAULT_CLIENT_ID, f::CLIENT_SECRET: emulator::DEFAULT_CLIENT_SECRET},
    }))?;
    secrets.create(&PostParams::default(), &seed).await?;

    // Count the Secret's writes while the run lasts, and time each rotation's parts.
    let writes = Arc::new(std::sync::Mutex::new(writes::WriteCounter::default()));
    let timeline = Arc::new(std::sync::Mutex::new(timeline::Timeline::default()));
    let rv = secrets
        .get(secret_name)
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let watcher = {
        let (secrets, writes, timeline) = (secrets.clone(), writes.clone(), timeline.clone());
        tokio::spawn(async move {
            let params = WatchParams::default()
                .fields(&format!("metadata.name={secret_name}"))
                .timeout(290);
            if let Ok(stream) = secrets.watch(&params, &rv).await {
                let mut stream = std::pin::pin!(stream);
                while let Some(Ok(event)) = stream.next().await {
                    if let WatchEvent::Modified(secret) = event {
                        timeline
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .observe(&f::TokenRecord::from_secret(&secret), SystemTime::now());
                        writes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .observe(&secret);
                    }
                }
            }
        })
    };

    let controller = if mode == Mode::Protocol {
        xero_operator::crd::install(client).await?;
        let mut refresh =
            json!({"clockSkewSeconds": cfg.clock_skew.as_secs(), "leaseDurationSeconds": 5});
        if let Some(ahead) = ahead {
            refresh["policy"] = json!("AheadOfExpiry");
            refresh["aheadOfExpirySeconds"] = json!(ahead.as_secs());
        }
        Connections::new(client, &ns, &emu)
            .await?
            .connection("bench", secret_name, refresh)
            .await?;
        let mut ctx = Context::new(
            client.clone(),
            "controller/bench".into(),
            Arc::new(Metrics::default()),
        );
        ctx.policy.allowlist = emu.allowlist();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(
            Arc::new(ctx),
            vec![ns.clone()],
            async move {
                let _ = stopped.await;
            },
        ));
        Some((stop, task))
    } else {
        None
    };

    let window = cfg.token_lifetime.saturating_sub(cfg.clock_skew);
    let duration = window * cfg.lifetimes;
    let mode_arg = match mode {
        Mode::Naive => "naive",
        Mode::PerProcess => "per-process",
        Mode::Protocol => "protocol",
    };
    let started = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            tokio::process::Command::new(&cfg.exe)
                .args([
                    "consumer",
                    "--namespace",
                    &ns,
                    "--secret",
                    secret_name,
                    "--mode",
                    mode_arg,
                ])
                .args([
                    "--threads",
                    &cfg.threads.to_string(),
                    "--duration",
                    &format!("{}ms", duration.as_millis()),
                ])
                .env("KUBECONFIG", &cfg.kubeconfig)
                .env(xero_operator::cli::ALLOW_HOSTS_ENV, emu.allowed_host())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut total = ConsumerReport::default();
    for child in children {
        let out = child.wait_with_output().await?;
        if let Ok(r) = serde_json::from_slice::<ConsumerReport>(&out.stdout) {
            total.merge(r);
        } else {
            total.errors += 1;
        }
    }
    let elapsed = started.elapsed();
    if let Some((stop, task)) = controller {
        let _ = stop.send(());
        let _ = task.await;
    }
    watcher.abort();
    let writes = std::mem::take(&mut *writes.lock().unwrap_or_else(|e| e.into_inner()));
    let report = emu.admin().report().await?;
    let rotations: u64 = report.chains.iter().map(|c| c.rotations).sum();
    // The tokens this run lived through: the first, then one per usable window (shortened by
    // the controller's head start when it refreshes ahead of expiry).
    let cycle = window.saturating_sub(ahead.unwrap_or_default());
    let lifetimes = (elapsed.as_secs_f64() / cycle.as_secs_f64()).floor() as u64 + 1;
    total.warm_us.sort_unstable();
    total.at_expiry_us.sort_unstable();
    total.first_us.sort_unstable();
    let critical_path = (mode == Mode::Protocol).then(|| {
        let calls = report.counters.token_call_times_ms();
        let timeline = timeline.lock().unwrap_or_else(|e| e.into_inner());
        timeline::critical_path(timeline.rotations(), &calls, &total.at_expiry_gets)
    });
    let _ = ns_api.delete(&ns, &Default::default()).await;
    Ok(json!({
        "n": n,
        "lifetimes": lifetimes,
        "token_calls": report.counters.token_calls,
        "rotations": rotations,
        "calls_per_lifetime": round2(report.counters.token_calls as f64 / lifetimes as f64),
        "broken_chains": report.broken_chains(),
        "expired_handed_out": total.expired_handed_out,
        "api_writes_per_rotation": round2(writes.writes() as f64 / rotations.max(1) as f64),
        "api_writes_per_steady_rotation": writes.steady_per_rotation().map(round2),
        "gets": total.gets,
        "errors": total.errors,
        "get_token_p50_ms": round3(percentile(&total.warm_us, 0.50)),
        "get_token_p99_ms": round3(percentile(&total.warm_us, 0.99)),
        "get_token_at_expiry_p99_ms": round3(percentile(&total.at_expiry_us, 0.99)),
        "get_token_at_expiry_p50_ms": round3(percentile(&total.at_expiry_us, 0.50)),
        "get_token_first_max_ms": round3(percentile(&total.first_us, 1.0)),
        // Each consumer process's requests to the API server per rotation: reads, claims,
        // stores and watches (the follower's long watch among them), all of them and in the
        // steady state (after the process first saw a new token).
        "consumer_requests_per_rotation": (mode == Mode::Protocol).then(|| {
            round2(total.api_requests as f64 / n.max(1) as f64 / rotations.max(1) as f64)
        }),
        // The parts of a rotation at expiry (medians over the rotations; none ahead of expiry).
        "critical_path": critical_path,
        "consumer_requests_per_steady_rotation": (mode == Mode::Protocol
            && total.steady_rotations > 0)
            .then(|| round2(total.steady_api_requests as f64 / total.steady_rotations as f64)),
    }))
}

/// An emulator with these lifetimes and Xero's app-wide rate limit out of the way (the benches
/// measure the callers, not the limit).
pub async fn start_emulator(access_token: Duration, grace: Duration) -> std::io::Result<Emulator> {
    Emulator::start(emulator::Config {
        behaviour: emulator::Behaviour {
            lifetimes: Lifetimes {
                access_token,
                grace,
                ..Lifetimes::default()
            },
            ..emulator::Behaviour::default()
        },
        limits: RateLimits {
            app_per_minute: u32::MAX,
            ..RateLimits::default()
        },
        ..emulator::Config::default()
    })
    .await
}

/// A new namespace `<prefix>-<random>`.
pub async fn create_namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
    Ok(Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"generateName": format!("{prefix}-")}}))?,
        )
        .await?
        .metadata
        .name
        .unwrap_or_default())
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Creates bench connections against one emulator in one namespace, all of the app Secret
/// `xero-app` (the emulator's default client).
#[derive(Clone)]
pub struct Connections {
    secrets: Api<Secret>,
    conns: Api<XeroConnection>,
    admin: emulator::AdminClient,
    token_url: String,
    connections_url: String,
}

impl Connections {
    /// Creates the app Secret `xero-app` in `ns`.
    pub async fn new(client: &Client, ns: &str, emu: &Emulator) -> anyhow::Result<Self> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "xero-app",
                        "labels": {LABEL_CLIENT_CREDENTIALS: "true"}},
                    "stringData": {"client_id": emulator::DEFAULT_CLIENT_ID, "client_secret": emulator::DEFAULT_CLIENT_SECRET}}))?,
            )
            .await?;
        Ok(Self {
            secrets,
            conns: Api::namespaced(client.clone(), ns),
            admin: emu.admin(),
            token_url: emu.token_url(),
            connections_url: emu.connections_url(),
        })
    }

    /// The `XeroConnection` `name`, its tokens in `token_secret`, with these `refresh` settings.
    pub async fn connection(
        &self,
        name: &str,
        token_secret: &str,
        refresh: Value,
    ) -> anyhow::Result<()> {
        let conn: XeroConnection = serde_json::from_value(json!({
            "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
            "metadata": {"name": name},
            "spec": {
                "clientSecretRef": {"name": "xero-app"},
                "tokenSecretName": token_secret,
                "refresh": refresh,
                "endpoints": {"tokenUrl": self.token_url, "connectionsUrl": self.connections_url},
            },
        }))?;
        self.conns.create(&PostParams::default(), &conn).await?;
        Ok(())
    }

    /// A new emulator user's connection: its token Secret holding only the refresh token (as
    /// right after authorising), then the connection.
    pub async fn user_connection(
        &self,
        name: &str,
        token_secret: &str,
        refresh: Value,
    ) -> anyhow::Result<()> {
        let user = self.admin.add_user(&NewUser::default()).await?;
        self.secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": token_secret,
                        "labels": {f::LABEL_CONNECTION: name}},
                    "stringData": {f::REFRESH_TOKEN: user.refresh_token}}))?,
            )
            .await?;
        self.connection(name, token_secret, refresh).await
    }
}

/// Prints the refresh-economy table.
pub fn print_table(doc: &Value) {
    println!(
        "{:<14} {:>3} {:>9} {:>11} {:>7} {:>8} {:>13} {:>12} {:>9} {:>9} {:>13} {:>12}",
        "way",
        "N",
        "lifetimes",
        "calls/life",
        "broken",
        "expired",
        "writes/rotate",
        "steady w/r",
        "p50 ms",
        "p99 ms",
        "expiry p99 ms",
        "steady req/rot"
    );
    for (_, key, _) in WAYS {
        for row in doc[key].as_array().into_iter().flatten() {
            let cell = |k: &str| row[k].to_string();
            println!(
                "{:<14} {:>3} {:>9} {:>11} {:>7} {:>8} {:>13} {:>12} {:>9} {:>9} {:>13} {:>12}",
                key,
                cell("n"),
                cell("lifetimes"),
                cell("calls_per_lifetime"),
                cell("broken_chains"),
                cell("expired_handed_out"),
                cell("api_writes_per_rotation"),
                cell("api_writes_per_steady_rotation"),
                cell("get_token_p50_ms"),
                cell("get_token_p99_ms"),
                cell("get_token_at_expiry_p99_ms"),
                cell("consumer_requests_per_steady_rotation"),
            );
        }
    }
    println!("\ncritical path of a rotation at expiry (protocol; medians over the rotations, ms;");
    println!(
        " claim sent: after the usable end, negative when claimed ahead; claim write: to delivery):"
    );
    println!(
        "{:<14} {:>3} {:>9} {:>11} {:>11} {:>12} {:>9} {:>15} {:>12} {:>12}",
        "way",
        "N",
        "rotations",
        "claim sent",
        "claim write",
        "expiry->call",
        "Xero call",
        "store+delivery",
        "wake-up p50",
        "wake-up p99"
    );
    for row in doc["protocol"].as_array().into_iter().flatten() {
        let path = &row["critical_path"];
        let cell = |k: &str| path[k].to_string();
        println!(
            "{:<14} {:>3} {:>9} {:>11} {:>11} {:>12} {:>9} {:>15} {:>12} {:>12}",
            "protocol",
            row["n"].to_string(),
            cell("rotations"),
            cell("claim_sent_after_usable_end_ms"),
            cell("claim_write_and_delivery_ms"),
            cell("expiry_to_xero_call_ms"),
            cell("xero_call_ms"),
            cell("store_write_and_delivery_ms"),
            cell("wake_up_p50_ms"),
            cell("wake_up_p99_ms"),
        );
    }
}

/// Writes `doc` to `path`, creating the directory.
pub fn write_json(path: &Path, doc: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(doc).expect("JSON values serialize"),
    )
}
