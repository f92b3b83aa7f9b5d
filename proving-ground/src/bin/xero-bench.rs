//! `xero-bench`: the benchmarks of `make bench` (see `src/bench/`). Figures are printed and
//! written to `target/bench/*.json`; nothing here asserts a timing.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use xero_proving_ground::bench::{self, RefreshBench, consumer};
use xero_proving_ground::controlplane::{ControlPlane, Options};

#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Refresh economy: naive vs per-process cache vs the protocol (and the protocol with the
    /// controller refreshing ahead of expiry), for each N.
    Refresh {
        /// Consumer process counts.
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        n: Vec<usize>,
        /// Access-token lifetimes to live through per run.
        #[arg(long, default_value_t = 5)]
        lifetimes: u32,
        /// Access-token lifetime in the emulator.
        #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
        /// Workers per consumer process.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// How far ahead of expiry the controller refreshes in the `protocol_ahead` way (whole
        /// seconds, as `aheadOfExpirySeconds`).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        ahead: Duration,
        /// Only these ways (naive, per_process, protocol, protocol_ahead); default: all.
        #[arg(long, value_delimiter = ',')]
        ways: Vec<String>,
        /// Where to write the JSON.
        #[arg(long, default_value = "target/bench/refresh.json")]
        out: PathBuf,
        /// Control plane binaries (default: proving-ground/controlplane/build.sh).
        #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Controller scale: connections per controller, RSS, idle CPU, time to Ready, a storm.
    Scale {
        /// Connection counts (10,000 takes about 9 minutes on 2 cores; 100,000 about 45 minutes
        /// with its storm, 29 without: `--no-storm` for memory and CPU alone).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        counts: Vec<usize>,
        /// The controller's per-app cap of token calls per minute.
        #[arg(long, default_value_t = 3000)]
        app_calls_per_minute: u32,
        /// How long CPU is measured while nothing is due; the steady RSS is read at its end
        /// (over a minute: the controller hands freed memory back once a minute).
        #[arg(long, default_value = "65s", value_parser = humantime::parse_duration)]
        idle: Duration,
        /// No refresh storm at the end of each row (memory, CPU and time to Ready only).
        #[arg(long)]
        no_storm: bool,
        /// One more argument for the controller (repeatable), e.g.
        /// `--controller-arg=--connection-metrics=false`.
        #[arg(long = "controller-arg", allow_hyphen_values = true)]
        controller_args: Vec<String>,
        /// Where to write the JSON.
        #[arg(long, default_value = "target/bench/scale.json")]
        out: PathBuf,
        /// Control plane binaries (default: proving-ground/controlplane/build.sh).
        #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Isolation between tenants: one namespace's connections of an app re-expired without
    /// pause under a tight per-app cap, against another app's and another namespace's
    /// connection; and the controller's memory with plain and hostile (250 KB annotation) specs.
    Isolation {
        /// Connections of app X in the storming namespace.
        #[arg(long, default_value_t = 40)]
        storm_connections: usize,
        /// The controller's per-app cap of token calls per minute.
        #[arg(long, default_value_t = 60)]
        app_calls_per_minute: u32,
        /// Access-token lifetime in the emulator.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
        /// Refreshes of each observed connection to measure.
        #[arg(long, default_value_t = 5)]
        lifetimes: u32,
        /// Connections of each kind for the memory figure (0: skip it).
        #[arg(long, default_value_t = 300)]
        memory_connections: usize,
        /// Where to write the JSON.
        #[arg(long, default_value = "target/bench/isolation.json")]
        out: PathBuf,
        /// Control plane binaries (default: proving-ground/controlplane/build.sh).
        #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Chaos soak: consumers and two controller replicas under Xero faults, SIGKILLs and an
    /// API-server restart. Exits 1 if a chain broke, an expired token was handed out, a
    /// refresh token was lost or anything panicked.
    Soak {
        /// How long the chaos lasts (settling and checks come after).
        #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// XeroConnections.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        /// Consumer processes per connection.
        #[arg(long, default_value_t = 3)]
        consumers: usize,
        /// Access-token lifetime in the emulator.
        #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
        /// Seed of the chaos schedule.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Where to write the JSON.
        #[arg(long, default_value = "target/bench/soak.json")]
        out: PathBuf,
        /// Control plane binaries (default: proving-ground/controlplane/build.sh).
        #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// One consumer process (run by `refresh`; prints its report as JSON).
    #[command(hide = true)]
    Consumer {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        secret: String,
        #[arg(long, value_enum)]
        mode: consumer::Mode,
        #[arg(long)]
        threads: usize,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Print running totals this often (and at once on an expired token) instead of the
        /// full report at the end (used by `soak`, which kills consumers).
        #[arg(long, value_parser = humantime::parse_duration)]
        progress: Option<Duration>,
        /// Hosts besides Xero's this consumer may call (the emulator), as `xero-token` takes them.
        #[arg(long = "allow-endpoint-host", env = xero_operator::cli::ALLOW_HOSTS_ENV, value_delimiter = ',')]
        allow_endpoint_hosts: Vec<String>,
    },
}

/// Starts a control plane and an admin client of it.
async fn control_plane(bin_dir: Option<PathBuf>) -> anyhow::Result<(ControlPlane, kube::Client)> {
    let cp = ControlPlane::start(&Options::from_bin_dir_or_build(bin_dir)?).await?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&cp.admin_kubeconfig)?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?,
    )?;
    Ok((cp, client))
}

/// The `xero-operator` binary next to this one.
fn operator_exe() -> anyhow::Result<PathBuf> {
    let operator = std::env::current_exe()?.with_file_name("xero-operator");
    anyhow::ensure!(
        operator.is_file(),
        "{} not found: build it first (make bench / make soak do)",
        operator.display()
    );
    Ok(operator)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    xero_operator::process::init_logging("error,kube_client::client::builder=off");
    match Args::parse().command {
        Command::Consumer {
            namespace,
            secret,
            mode,
            threads,
            duration,
            progress,
            allow_endpoint_hosts,
        } => {
            let client = kube::Client::try_default().await?;
            let allowlist = xero_operator::cli::allowlist(&allow_endpoint_hosts)?;
            let report = consumer::run(
                client,
                consumer::Target {
                    namespace: &namespace,
                    secret: &secret,
                    allowlist,
                },
                mode,
                threads,
                duration,
                progress,
            )
            .await;
            if progress.is_none() {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Command::Scale {
            counts,
            app_calls_per_minute,
            idle,
            no_storm,
            controller_args,
            out,
            bin_dir,
        } => {
            let (cp, client) = control_plane(bin_dir).await?;
            let cfg = bench::scale::ScaleBench {
                counts,
                app_calls_per_minute,
                idle,
                storm: !no_storm,
                controller_args,
                operator: operator_exe()?,
                kubeconfig: cp.admin_kubeconfig.clone(),
            };
            let doc = bench::scale::scale(&cfg, &client).await?;
            bench::scale::print_table(&doc);
            bench::write_json(&out, &doc)?;
            println!("wrote {}", out.display());
        }
        Command::Refresh {
            n,
            lifetimes,
            token_lifetime,
            threads,
            ahead,
            ways,
            out,
            bin_dir,
        } => {
            let (cp, client) = control_plane(bin_dir).await?;
            let cfg = RefreshBench {
                ahead,
                n_values: n,
                lifetimes,
                token_lifetime,
                clock_skew: Duration::from_secs(1),
                threads,
                exe: std::env::current_exe()?,
                kubeconfig: cp.admin_kubeconfig.clone(),
                ways,
            };
            let doc = bench::refresh_economy(&cfg, &client).await?;
            bench::print_table(&doc);
            bench::write_json(&out, &doc)?;
            println!("wrote {}", out.display());
        }
        Command::Isolation {
            storm_connections,
            app_calls_per_minute,
            token_lifetime,
            lifetimes,
            memory_connections,
            out,
            bin_dir,
        } => {
            let (cp, client) = control_plane(bin_dir).await?;
            let cfg = bench::isolation::IsolationBench {
                storm_connections,
                app_calls_per_minute,
                token_lifetime,
                lifetimes,
                memory_connections,
                operator: operator_exe()?,
                kubeconfig: cp.admin_kubeconfig.clone(),
            };
            let doc = bench::isolation::isolation(&cfg, &client).await?;
            bench::isolation::print_table(&doc);
            bench::write_json(&out, &doc)?;
            println!("wrote {}", out.display());
            drop(cp);
        }
        Command::Soak {
            duration,
            connections,
            consumers,
            token_lifetime,
            seed,
            out,
            bin_dir,
        } => {
            let (mut cp, client) = control_plane(bin_dir).await?;
            let cfg = bench::soak::SoakConfig {
                duration,
                connections,
                consumers_per_connection: consumers,
                token_lifetime,
                grace: Duration::from_secs(60),
                lease: Duration::from_secs(15),
                faults: bench::soak::SoakConfig::default_faults(),
                consumer_kill_every: Duration::from_secs(6),
                leader_kill_every: Duration::from_secs(40),
                seed,
                operator: operator_exe()?,
                exe: std::env::current_exe()?,
                kubeconfig: cp.admin_kubeconfig.clone(),
                logs_out: out.with_file_name("soak-logs"),
            };
            let doc = bench::soak::soak(&cfg, &mut cp, &client).await?;
            bench::soak::print_table(&doc);
            bench::write_json(&out, &doc)?;
            println!(
                "wrote {} (logs in {})",
                out.display(),
                cfg.logs_out.display()
            );
            let failures = bench::soak::failures(&doc);
            drop(cp);
            if !failures.is_empty() {
                eprintln!(
                    "xero-bench soak: these must be zero: {} — a bug to fix",
                    failures.join(", ")
                );
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
