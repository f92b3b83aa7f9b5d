//! Controller scale: many `XeroConnection`s in one controller process — peak and steady RSS, the
//! bytes each connection adds, CPU while idle, time until all are Ready, and a refresh storm
//! (every token due in the same second) under the per-app token bucket: how long it took and
//! the most calls any minute saw.
//!
//! The per-app cap of a row is raised to at least one call per connection per minute (the
//! emulator's app limit is off), so a large row measures the controller, not the cap: the
//! storm's budget stays at a minute or less.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::{round1, round2};
use xero_operator::crd::XeroConnection;
use xero_operator::protocol::format::{self as f, format_time};

/// Inputs of the scale benchmark.
#[derive(Clone, Debug)]
pub struct ScaleBench {
    pub counts: Vec<usize>,
    /// The controller's per-app cap (`--app-calls-per-minute`); a row with more connections
    /// than this runs with one call per connection per minute instead.
    pub app_calls_per_minute: u32,
    /// How long to measure CPU while nothing is due.
    pub idle: Duration,
    /// Whether each row ends with a refresh storm (off: memory, CPU and time to Ready only).
    pub storm: bool,
    /// More arguments for the controller (`--connection-metrics=false`, say).
    pub controller_args: Vec<String>,
    /// The `xero-operator` executable.
    pub operator: PathBuf,
    pub kubeconfig: PathBuf,
}

/// Concurrent API requests while creating objects.
const CREATE_CONCURRENCY: usize = 32;

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// The most token calls in any 60-second window of a per-second histogram.
pub fn max_per_minute(by_second: &std::collections::BTreeMap<u64, u64>) -> u64 {
    let seconds: Vec<(u64, u64)> = by_second.iter().map(|(s, n)| (*s, *n)).collect();
    let mut best = 0;
    let mut start = 0;
    let mut sum = 0;
    for end in 0..seconds.len() {
        sum += seconds[end].1;
        while seconds[end].0 - seconds[start].0 >= 60 {
            sum -= seconds[start].1;
            start += 1;
        }
        best = best.max(sum);
    }
    best
}

/// Runs every count and returns the JSON document.
pub async fn scale(cfg: &ScaleBench, client: &Client) -> anyhow::Result<Value> {
    xero_operator::crd::install(client).await?;
    let baseline_kib = baseline_rss_kib(cfg, client).await?;
    eprintln!(
        "scale: the controller with no connection: {:.1} MiB",
        baseline_kib as f64 / 1024.0
    );
    let mut rows = Vec::new();
    for &n in &cfg.counts {
        let row = run_one(cfg, client, n, baseline_kib).await?;
        eprintln!("scale n={n:<6} {row}");
        rows.push(row);
    }
    Ok(json!({
        "inputs": {
            "counts": cfg.counts,
            "app_calls_per_minute": cfg.app_calls_per_minute,
            "cap_per_row": "max(app_calls_per_minute, connections)",
            "emulator_app_limit": "off",
            "controller_concurrency": xero_operator::controller::context::DEFAULT_CONCURRENCY,
            "baseline_rss_mib": round1(baseline_kib as f64 / 1024.0),
            "idle_seconds": cfg.idle.as_secs(),
            "storm": cfg.storm,
            "controller_args": cfg.controller_args,
            "xero_operator_version": env!("CARGO_PKG_VERSION"),
            "kubernetes_version": client.apiserver_version().await.map(|v| v.git_version).unwrap_or_default(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "rows": rows,
    }))
}

/// The per-app cap a row runs with: the configured one, raised to a call per connection per
/// minute.
fn row_cap(cfg: &ScaleBench, n: usize) -> u32 {
    cfg.app_calls_per_minute
        .max(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The controller, watching namespace `ns`, calling the emulator under the per-app `cap`.
fn spawn_controller(
    cfg: &ScaleBench,
    ns: &str,
    emu: &super::Emulator,
    cap: u32,
) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(&cfg.operator)
        .args([
            "--namespace",
            ns,
            "--metrics-addr",
            "127.0.0.1:0",
            "--identity",
            "controller/scale",
        ])
        .arg(format!("--app-calls-per-minute={cap}"))
        .arg(format!("--allowed-endpoint-hosts={}", emu.allowed_host()))
        .args(&cfg.controller_args)
        .env("KUBECONFIG", &cfg.kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// The controller's resident memory with nothing to do (an empty namespace), after it settled:
/// what each row's bytes per connection are counted from.
async fn baseline_rss_kib(cfg: &ScaleBench, client: &Client) -> anyhow::Result<u64> {
    let hour = Duration::from_secs(3600);
    let emu = super::start_emulator(hour, hour).await?;
    let ns = super::create_namespace(client, "scale-empty").await?;
    let mut controller = spawn_controller(cfg, &ns, &emu, cfg.app_calls_per_minute)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = proc_status_kib(controller.id().unwrap_or_default(), "VmRSS:");
    let _ = controller.start_kill();
    let _ = controller.wait().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &Default::default())
        .await;
    rss.ok_or_else(|| anyhow::anyhow!("the controller ended before its memory was read"))
}

async fn run_one(
    cfg: &ScaleBench,
    client: &Client,
    n: usize,
    baseline_kib: u64,
) -> anyhow::Result<Value> {
    let hour = Duration::from_secs(3600);
    let emu = super::start_emulator(hour, hour).await?;
    let ns = super::create_namespace(client, "scale").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let conns: Api<XeroConnection> = Api::namespaced(client.clone(), &ns);
    let factory = super::Connections::new(client, &ns, &emu).await?;
    futures_util::stream::iter(0..n)
        .map(|i| {
            let factory = factory.clone();
            async move {
                factory
                    .user_connection(
                        &format!("c{i}"),
                        &format!("c{i}-xero-token"),
                        json!({"clockSkewSeconds": 0}),
                    )
                    .await
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;

    let cap = row_cap(cfg, n);
    let mut controller = spawn_controller(cfg, &ns, &emu, cap)?;
    let pid = controller.id().unwrap_or_default();
    let peak_kib = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak_kib.clone();
        tokio::spawn(async move {
            loop {
                if let Some(hwm) = proc_status_kib(pid, "VmHWM:") {
                    peak.fetch_max(hwm, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let started = Instant::now();
    wait_all_ready(&conns, n, ready_within(n)).await?;
    let time_to_ready = started.elapsed();

    // Idle: nothing is due for an hour.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_seconds(pid).unwrap_or_default();
    tokio::time::sleep(cfg.idle).await;
    let cpu_idle =
        (cpu_seconds(pid).unwrap_or_default() - cpu_before) / cfg.idle.as_secs_f64() * 100.0;
    let steady_kib = proc_status_kib(pid, "VmRSS:").unwrap_or_default();

    let storm = if cfg.storm {
        Some(storm(&secrets, &emu, n, cap).await?)
    } else {
        None
    };
    sampler.abort();
    let _ = controller.start_kill();
    let _ = controller.wait().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &Default::default())
        .await;
    let mut row = json!({
        "connections": n,
        "time_until_all_ready_s": round1(time_to_ready.as_secs_f64()),
        "peak_rss_mib": round1(peak_kib.load(Ordering::Relaxed) as f64 / 1024.0),
        "steady_rss_mib": round1(steady_kib as f64 / 1024.0),
        "bytes_per_connection": (steady_kib.saturating_sub(baseline_kib) * 1024) / (n.max(1) as u64),
        "idle_cpu_percent_of_a_core": round2(cpu_idle),
        "cap_per_minute": cap,
    });
    if let (Some(storm), Some(row)) = (storm, row.as_object_mut()) {
        row.extend(storm.as_object().cloned().unwrap_or_default());
    }
    Ok(row)
}

/// The storm: every token of the row's `n` connections expires in the same second; how long
/// until all were refreshed, against the budget the per-app `cap` allows, the most calls any
/// minute saw, and the other calls to Xero meanwhile (tenant listings: none are due, since a
/// refresh is no new authorisation).
async fn storm(
    secrets: &Api<Secret>,
    emu: &super::Emulator,
    n: usize,
    cap: u32,
) -> anyhow::Result<Value> {
    let before = emu.admin().report().await?.counters;
    let calls_before = before.token_calls;
    let due = SystemTime::now() + Duration::from_secs(10) + Duration::from_millis((n as u64) * 2);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let secrets = secrets.clone();
            async move {
                let patch = json!({"stringData": {f::EXPIRES_AT: format_time(due)}});
                secrets
                    .patch(
                        &format!("c{i}-xero-token"),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(drop)
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    while SystemTime::now() < due {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let storm_started = Instant::now();
    let deadline = storm_started + Duration::from_secs(3600);
    let report = loop {
        let report = emu.admin().report().await?;
        if report.counters.token_calls >= calls_before + n as u64 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let storm = storm_started.elapsed();
    let storm_seconds: std::collections::BTreeMap<u64, u64> = report
        .counters
        .token_calls_by_second
        .range(due.duration_since(SystemTime::UNIX_EPOCH)?.as_secs()..)
        .map(|(s, c)| (*s, *c))
        .collect();
    let budget = Duration::from_secs_f64(n as f64 * 60.0 / f64::from(cap));
    Ok(json!({
        "storm_refreshed": report.counters.token_calls - calls_before,
        "storm_duration_s": round1(storm.as_secs_f64()),
        "storm_budget_s": round1(budget.as_secs_f64()),
        "storm_max_calls_per_minute": max_per_minute(&storm_seconds),
        "storm_tenant_listings": report.counters.connections_calls - before.connections_calls,
        "broken_chains": report.broken_chains(),
    }))
}

/// How long a row waits for all its connections to be Ready: on 2 cores the API server takes
/// each new connection's first token at 50-80 a second (measured at 100,000: all Ready after
/// 1,479 s), so 40 ms a connection, and never less than half an hour.
fn ready_within(n: usize) -> Duration {
    Duration::from_secs(1800).max(Duration::from_millis(40) * u32::try_from(n).unwrap_or(u32::MAX))
}

/// Waits until `n` connections show `Ready` (`TokenValid`), counted from one watch: polling
/// lists of 100,000 objects would load the API server more than the controller does.
async fn wait_all_ready(
    conns: &Api<XeroConnection>,
    n: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let mut ready = std::collections::HashSet::new();
    let counted = async {
        let events = watcher(conns.clone(), watcher::Config::default());
        let mut events = std::pin::pin!(events);
        while ready.len() < n {
            match events.try_next().await? {
                Some(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => {
                    let is_ready = c.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|x| x.type_ == "Ready" && x.reason == "TokenValid")
                    });
                    if is_ready {
                        ready.insert(c.name_any());
                    } else {
                        ready.remove(&c.name_any());
                    }
                }
                Some(watcher::Event::Delete(c)) => {
                    ready.remove(&c.name_any());
                }
                Some(_) => {}
                None => anyhow::bail!("the watch of connections ended"),
            }
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(within, counted).await {
        Ok(done) => done,
        Err(_) => anyhow::bail!("not all {n} connections Ready in {within:?}"),
    }
}

/// Prints the scale table.
pub fn print_table(doc: &Value) {
    println!(
        "{:>11} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13} {:>9}",
        "connections",
        "ready (s)",
        "peak MiB",
        "steady MiB",
        "B/conn",
        "idle CPU%",
        "storm (s)",
        "budget s",
        "max/min",
        "cap/min",
        "listings"
    );
    for row in doc["rows"].as_array().into_iter().flatten() {
        let cell = |k: &str| row[k].to_string();
        println!(
            "{:>11} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13} {:>9}",
            cell("connections"),
            cell("time_until_all_ready_s"),
            cell("peak_rss_mib"),
            cell("steady_rss_mib"),
            cell("bytes_per_connection"),
            cell("idle_cpu_percent_of_a_core"),
            cell("storm_duration_s"),
            cell("storm_budget_s"),
            cell("storm_max_calls_per_minute"),
            cell("cap_per_minute"),
            cell("storm_tenant_listings"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_minute_is_found() {
        let h: std::collections::BTreeMap<u64, u64> =
            [(0, 10), (30, 10), (59, 10), (60, 10), (200, 5)].into();
        assert_eq!(max_per_minute(&h), 30);
        assert_eq!(max_per_minute(&Default::default()), 0);
    }
}
