//! `make soak`: the refresh protocol under chaos, bounded in time. Consumer processes and two
//! controller replicas (leader election) live through many short token lifetimes while the
//! emulator answers with 5xx, 429, hangs and processed-but-lost responses; consumers and the
//! leader are killed with SIGKILL and the API server is killed and restarted once. At the end the
//! faults stop, the system gets a moment to settle, and the figures are taken. `broken_chains`,
//! `expired_handed_out`, `refresh_tokens_lost` and `panics` must be zero: anything else is a bug.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use super::round1;
use crate::controlplane::ControlPlane;
use crate::emulator::{self, Emulator, Faults};
use xero_operator::protocol::format::{Expiry, TokenRecord};
use xero_operator::xero::{ClientCredentials, Endpoints, XeroClient};

/// Inputs of the soak.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long the chaos lasts (settling comes after).
    pub duration: Duration,
    pub connections: usize,
    pub consumers_per_connection: usize,
    /// Access-token lifetime in the emulator (Xero: 30 minutes).
    pub token_lifetime: Duration,
    /// Grace period of a superseded refresh token (Xero: 30 minutes). Longer than any outage the
    /// soak causes, as Xero's is.
    pub grace: Duration,
    /// Refresh-claim lease of each connection (`spec.refresh.leaseDurationSeconds`).
    pub lease: Duration,
    pub faults: Faults,
    /// Mean seconds between two consumer kills.
    pub consumer_kill_every: Duration,
    /// Seconds between two leader kills.
    pub leader_kill_every: Duration,
    pub seed: u64,
    /// The `xero-operator` executable.
    pub operator: PathBuf,
    /// The `xero-bench` executable (it runs the consumers).
    pub exe: PathBuf,
    pub kubeconfig: PathBuf,
    /// Where the processes' logs are copied at the end (replaced each run).
    pub logs_out: PathBuf,
}

impl SoakConfig {
    /// The faults of a default soak: every endpoint, 5xx, 429, hangs and lost answers.
    pub fn default_faults() -> Faults {
        Faults {
            error_rate: 0.08,
            rate_limit_rate: 0.05,
            timeout_rate: 0.04,
            drop_response_rate: 0.08,
            ..Faults::default()
        }
    }
}

/// How often the token Secrets are sampled for a valid access token.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Lease of the controllers' leader election (short, so a killed leader is replaced quickly).
const LEADER_LEASE_SECONDS: &str = "4";
const LEADER_LEASE_NAME: &str = "xero-operator";

/// Running totals of one consumer process, as it prints them.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct Totals {
    gets: u64,
    errors: u64,
    expired_handed_out: u64,
}

enum Role {
    Consumer { connection: usize },
    Controller { identity: String },
}

struct Proc {
    role: Role,
    child: Child,
}

/// The processes of the soak, their logs and the consumers' running totals.
struct Fleet {
    cfg: SoakConfig,
    namespace: String,
    /// The emulator's `host:port`, the controllers' one allowed endpoint host besides Xero's.
    emulator_host: String,
    logs: tempfile::TempDir,
    procs: Vec<Proc>,
    started: usize,
    totals: Arc<Mutex<HashMap<usize, Totals>>>,
    /// When the consumers stop (each is started with the time left until then).
    consumers_until: Instant,
}

impl Fleet {
    fn log_file(&self, name: &str) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::File::create(self.logs.path().join(name))?)
    }

    fn spawn_consumer(&mut self, connection: usize) -> anyhow::Result<()> {
        let left = self
            .consumers_until
            .saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let id = self.started;
        self.started += 1;
        let mut child = Command::new(&self.cfg.exe)
            .args(["consumer", "--namespace", &self.namespace, "--secret"])
            .arg(secret_name(connection))
            .args(["--mode", "protocol", "--threads", "2", "--progress", "1s"])
            .arg(format!("--duration={}ms", left.as_millis()))
            .env("KUBECONFIG", &self.cfg.kubeconfig)
            .env(xero_operator::cli::ALLOW_HOSTS_ENV, &self.emulator_host)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log_file(&format!("consumer-{id}.log"))?)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let totals = self.totals.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(t) = serde_json::from_str::<Totals>(&line) {
                    totals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, t);
                }
            }
        });
        self.procs.push(Proc {
            role: Role::Consumer { connection },
            child,
        });
        Ok(())
    }

    fn spawn_controller(&mut self) -> anyhow::Result<()> {
        let id = self.started;
        self.started += 1;
        // A replacement is a new pod: a new identity, as a Deployment would give it.
        let identity = format!("controller/soak-{id}");
        let log = self.log_file(&format!("controller-{id}.log"))?;
        let child = Command::new(&self.cfg.operator)
            .args([
                "--namespace",
                &self.namespace,
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--identity", &identity, "--leader-election"])
            .arg(format!("--allowed-endpoint-hosts={}", self.emulator_host))
            .args(["--lease-namespace", &self.namespace])
            .args(["--lease-seconds", LEADER_LEASE_SECONDS])
            .env("KUBECONFIG", &self.cfg.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        self.procs.push(Proc {
            role: Role::Controller { identity },
            child,
        });
        Ok(())
    }

    /// SIGKILLs the process at `index` and forgets it.
    async fn kill(&mut self, index: usize) -> Role {
        let mut p = self.procs.remove(index);
        let _ = p.child.start_kill();
        let _ = p.child.wait().await;
        p.role
    }

    /// Reaps consumers that finished on their own.
    fn reap(&mut self) {
        self.procs
            .retain_mut(|p| !matches!(p.child.try_wait(), Ok(Some(_))));
    }

    fn consumers(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| matches!(self.procs[i].role, Role::Consumer { .. }))
            .collect()
    }

    fn controller_named(&self, identity: &str) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| matches!(&p.role, Role::Controller { identity: id } if id == identity))
    }

    /// Waits for the consumers to end on their own (they stop at `consumers_until`), killing
    /// those still busy after `grace`.
    async fn wait_consumers(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.consumers().is_empty() {
            self.reap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        while let Some(&i) = self.consumers().first() {
            self.kill(i).await;
        }
    }

    /// Stops the controllers as Kubernetes would (SIGTERM, then SIGKILL after 10 s).
    async fn stop_controllers(&mut self) {
        for p in &mut self.procs {
            if let Some(pid) = p.child.id().and_then(|id| i32::try_from(id).ok()) {
                // SAFETY: plain syscall on a child we started and have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        for mut p in self.procs.drain(..) {
            if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
    }

    /// Copies every log to `out` (emptied first).
    fn keep_logs(&self, out: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(out);
        std::fs::create_dir_all(out)?;
        for entry in std::fs::read_dir(self.logs.path())? {
            let entry = entry?;
            std::fs::copy(entry.path(), out.join(entry.file_name()))?;
        }
        Ok(())
    }

    /// Lines of every log that report a panic.
    fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(self.logs.path()).into_iter().flatten() {
            let Ok(entry) = entry else { continue };
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked at")) {
                found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
            }
        }
        found
    }

    fn consumer_totals(&self) -> Totals {
        let map = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        map.values().fold(Totals::default(), |a, t| Totals {
            gets: a.gets + t.gets,
            errors: a.errors + t.errors,
            expired_handed_out: a.expired_handed_out + t.expired_handed_out,
        })
    }
}

fn secret_name(connection: usize) -> String {
    format!("soak-{connection}-xero-token")
}

/// What the sampler saw of the token Secrets.
#[derive(Debug, Default)]
struct Availability {
    /// Sample-seconds, summed over connections, in which a Secret held no unexpired token.
    without_valid: f64,
    /// Sample-seconds in which the API server could not be asked.
    unobserved: f64,
}

/// Reads every token Secret each [`SAMPLE_EVERY`] and counts the time without a valid token.
fn sample_availability(
    secrets: Api<Secret>,
    connections: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Availability> {
    tokio::spawn(async move {
        let mut seen = Availability::default();
        let step = SAMPLE_EVERY.as_secs_f64();
        while !*stop.borrow() {
            let next = tokio::time::Instant::now() + SAMPLE_EVERY;
            for c in 0..connections {
                let read = tokio::time::timeout(SAMPLE_EVERY, secrets.get(&secret_name(c))).await;
                match read {
                    Ok(Ok(secret)) => {
                        let rec = TokenRecord::from_secret(&secret);
                        let valid = rec.access_token.as_ref().is_some_and(|t| {
                            xero_operator::xero::jwt_expiry(t.expose())
                                .is_some_and(|exp| SystemTime::now() < exp)
                        });
                        if !valid {
                            seen.without_valid += step;
                        }
                    }
                    _ => seen.unobserved += step,
                }
            }
            tokio::time::sleep_until(next).await;
        }
        seen
    })
}

/// Runs the soak against `cp` and returns the JSON document.
pub async fn soak(
    cfg: &SoakConfig,
    cp: &mut ControlPlane,
    client: &Client,
) -> anyhow::Result<Value> {
    xero_operator::crd::install(client).await?;
    let emu = super::start_emulator(cfg.token_lifetime, cfg.grace).await?;
    let namespace = super::create_namespace(client, "soak").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    create_connections(cfg, client, &namespace, &emu).await?;

    let mut fleet = Fleet {
        cfg: cfg.clone(),
        namespace: namespace.clone(),
        emulator_host: emu.allowed_host(),
        logs: tempfile::Builder::new().prefix("xero-soak-").tempdir()?,
        procs: Vec::new(),
        started: 0,
        totals: Arc::default(),
        consumers_until: Instant::now() + cfg.duration,
    };
    fleet.spawn_controller()?;
    fleet.spawn_controller()?;
    wait_for_tokens(&secrets, cfg.connections, Duration::from_secs(60)).await?;
    eprintln!("soak: connections ready; chaos for {:?}", cfg.duration);

    let chaos_started = Instant::now();
    fleet.consumers_until = chaos_started + cfg.duration;
    for c in 0..cfg.connections {
        for _ in 0..cfg.consumers_per_connection {
            fleet.spawn_consumer(c)?;
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = sample_availability(secrets.clone(), cfg.connections, stop_rx);
    emu.admin().set_faults(&cfg.faults).await?;

    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let jitter = |rng: &mut fastrand::Rng, mean: Duration| mean.mul_f64(0.5 + rng.f64());
    let mut next_consumer_kill = chaos_started + jitter(&mut rng, cfg.consumer_kill_every);
    let mut next_leader_kill = chaos_started + cfg.leader_kill_every / 2;
    let restart_at = chaos_started + cfg.duration / 2;
    let mut restarted = false;
    let (mut consumer_kills, mut leader_kills, mut api_down) = (0u32, 0u32, Duration::ZERO);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    while chaos_started.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fleet.reap();
        let now = Instant::now();
        if now >= next_consumer_kill {
            let consumers = fleet.consumers();
            if !consumers.is_empty() {
                let pick = consumers[rng.usize(..consumers.len())];
                if let Role::Consumer { connection } = fleet.kill(pick).await {
                    consumer_kills += 1;
                    fleet.spawn_consumer(connection)?;
                }
            }
            next_consumer_kill = now + jitter(&mut rng, cfg.consumer_kill_every);
        }
        if now >= next_leader_kill {
            let holder = leases
                .get_opt(LEADER_LEASE_NAME)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity);
            if let Some(i) = holder.as_deref().and_then(|h| fleet.controller_named(h)) {
                fleet.kill(i).await;
                leader_kills += 1;
                eprintln!("soak: killed the leader {}", holder.unwrap_or_default());
                fleet.spawn_controller()?;
            }
            next_leader_kill = now + cfg.leader_kill_every;
        }
        if !restarted && now >= restart_at {
            restarted = true;
            let t = Instant::now();
            cp.restart_apiserver().await?;
            api_down = t.elapsed();
            eprintln!("soak: restarted the API server ({api_down:.1?} until ready)");
        }
    }

    // Settle: no more faults or kills; consumers end on their own, the controllers go on.
    emu.admin().set_faults(&Faults::default()).await?;
    fleet.wait_consumers(Duration::from_secs(70)).await;
    let settled = settle(&secrets, cfg).await;
    let _ = stop_tx.send(true);
    let availability = sampler.await.unwrap_or_default();
    fleet.stop_controllers().await;

    let report = emu.admin().report().await?;
    let rotations: u64 = report.chains.iter().map(|c| c.rotations).sum();
    let lost = refresh_tokens_lost(&secrets, cfg.connections, &emu).await?;
    let totals = fleet.consumer_totals();
    let panics = fleet.panics();
    for p in &panics {
        eprintln!("soak: PANIC {p}");
    }
    if let Err(e) = fleet.keep_logs(&cfg.logs_out) {
        eprintln!(
            "soak: could not copy the logs to {}: {e}",
            cfg.logs_out.display()
        );
    }
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&namespace, &Default::default())
        .await;
    Ok(json!({
        "inputs": {
            "duration_s": cfg.duration.as_secs(),
            "connections": cfg.connections,
            "consumers_per_connection": cfg.consumers_per_connection,
            "controller_replicas": 2,
            "token_lifetime_s": cfg.token_lifetime.as_secs_f64(),
            "grace_s": cfg.grace.as_secs_f64(),
            "lease_s": cfg.lease.as_secs(),
            "faults": cfg.faults,
            "consumer_kill_every_s": cfg.consumer_kill_every.as_secs_f64(),
            "leader_kill_every_s": cfg.leader_kill_every.as_secs_f64(),
            "seed": cfg.seed,
            "xero_operator_version": env!("CARGO_PKG_VERSION"),
            "kubernetes_version": client.apiserver_version().await.map(|v| v.git_version).unwrap_or_default(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "rotations": rotations,
        "token_calls": report.counters.token_calls,
        "broken_chains": report.broken_chains(),
        "expired_handed_out": totals.expired_handed_out,
        "refresh_tokens_lost": lost,
        "seconds_without_valid_token": round1(availability.without_valid),
        "panics": panics.len(),
        "seconds_unobserved": round1(availability.unobserved),
        "consumer_gets": totals.gets,
        "consumer_errors": totals.errors,
        "consumer_kills": consumer_kills,
        "leader_kills": leader_kills,
        "apiserver_restarts": u32::from(restarted),
        "apiserver_down_s": round1(api_down.as_secs_f64()),
        "grace_reuses": report.chains.iter().map(|c| c.grace_reuses).sum::<u64>(),
        "settled": settled,
    }))
}

async fn create_connections(
    cfg: &SoakConfig,
    client: &Client,
    ns: &str,
    emu: &Emulator,
) -> anyhow::Result<()> {
    let factory = super::Connections::new(client, ns, emu).await?;
    for c in 0..cfg.connections {
        factory
            .user_connection(
                &format!("soak-{c}"),
                &secret_name(c),
                json!({"clockSkewSeconds": 1, "leaseDurationSeconds": cfg.lease.as_secs()}),
            )
            .await?;
    }
    Ok(())
}

fn unexpired(secret: &Secret) -> bool {
    let rec = TokenRecord::from_secret(secret);
    matches!(rec.expiry, Expiry::At(at) if SystemTime::now() < at) && rec.access_token.is_some()
}

async fn wait_for_tokens(secrets: &Api<Secret>, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut ready = 0;
        for c in 0..n {
            if let Ok(Some(s)) = secrets.get_opt(&secret_name(c)).await
                && unexpired(&s)
            {
                ready += 1;
            }
        }
        if ready == n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {ready} of {n} token Secrets got a token within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// After the chaos: waits until every connection has been refreshed at least once more, fault
/// free, and holds an unexpired token. False if that did not happen within a few lifetimes.
async fn settle(secrets: &Api<Secret>, cfg: &SoakConfig) -> bool {
    let rotation = |s: &Secret| TokenRecord::from_secret(s).rotation;
    let mut start = Vec::new();
    for c in 0..cfg.connections {
        start.push(
            secrets
                .get_opt(&secret_name(c))
                .await
                .ok()
                .flatten()
                .map(|s| rotation(&s))
                .unwrap_or_default(),
        );
    }
    let deadline = Instant::now() + cfg.token_lifetime * 3 + cfg.lease + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut done = 0;
        for (c, first) in start.iter().enumerate() {
            if let Ok(Some(s)) = secrets.get_opt(&secret_name(c)).await
                && rotation(&s) > *first
                && unexpired(&s)
            {
                done += 1;
            }
        }
        if done == cfg.connections {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Connections whose stored refresh token is not the newest of its chain: using it either
/// fails, or works only as a grace-period replay of a token already used — which means the
/// successor Xero issued was lost. Checked with everything stopped; it rotates each chain once.
async fn refresh_tokens_lost(
    secrets: &Api<Secret>,
    connections: usize,
    emu: &Emulator,
) -> anyhow::Result<usize> {
    let mut lost = 0;
    for c in 0..connections {
        let rec = TokenRecord::from_secret(&secrets.get(&secret_name(c)).await?);
        let Some(rt) = rec.refresh_token else {
            lost += 1;
            continue;
        };
        let before = emu.admin().report().await?;
        let app = ClientCredentials {
            client_id: emulator::DEFAULT_CLIENT_ID.to_owned(),
            client_secret: xero_operator::redact::Sensitive::new(
                emulator::DEFAULT_CLIENT_SECRET.to_owned(),
            ),
        };
        let xero = XeroClient::new(Endpoints {
            token_url: emu.token_url(),
            ..Endpoints::default()
        });
        let ok = xero.refresh(&app, &rt).await.is_ok();
        let after = emu.admin().report().await?;
        let rotated = |r: &emulator::Report| r.chains.iter().map(|c| c.rotations).sum::<u64>();
        if !ok || rotated(&after) != rotated(&before) + 1 {
            eprintln!("soak: connection {c}: the stored refresh token is not its chain's newest");
            lost += 1;
        }
    }
    Ok(lost)
}

/// Prints the soak's figures.
pub fn print_table(doc: &Value) {
    for key in [
        "rotations",
        "token_calls",
        "grace_reuses",
        "broken_chains",
        "expired_handed_out",
        "refresh_tokens_lost",
        "panics",
        "seconds_without_valid_token",
        "seconds_unobserved",
        "consumer_gets",
        "consumer_errors",
        "consumer_kills",
        "leader_kills",
        "apiserver_restarts",
        "apiserver_down_s",
        "settled",
    ] {
        println!("{key:<28} {}", doc[key]);
    }
}

/// The figures that must be zero, with their values, when any is not.
pub fn failures(doc: &Value) -> Vec<String> {
    [
        "broken_chains",
        "expired_handed_out",
        "refresh_tokens_lost",
        "panics",
    ]
    .iter()
    .filter(|k| doc[**k].as_u64() != Some(0))
    .map(|k| format!("{k} = {}", doc[*k]))
    .collect()
}
