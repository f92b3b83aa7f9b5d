//! `xero-operator`: the controller. Keeps every XeroConnection's token Secret valid (the
//! producer role of the refresh protocol), with metrics and health endpoints.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use xero_operator::controller::{self, Context, kubernetes_version, metrics::Metrics};

/// The xero-operator controller.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Without a command: run the controller.
    #[command(subcommand)]
    command: Option<Command>,

    /// Watch only these namespaces (repeatable or comma-separated; default: all namespaces).
    #[arg(
        long = "namespace",
        env = "XERO_OPERATOR_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "XERO_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,

    /// This replica's identity in the refresh protocol and the leader Lease, used as given: it
    /// must be unique per process. Default: controller/<hostname>/<pid>-<random>, so that a
    /// restarted container is a party of its own.
    #[arg(long, env = "XERO_OPERATOR_IDENTITY")]
    identity: Option<String>,

    /// Elect a leader with a Lease so that only one replica reconciles (set it when running more
    /// than one replica).
    #[arg(long, env = "XERO_OPERATOR_LEADER_ELECTION")]
    leader_election: bool,

    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "XERO_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(
        long,
        env = "XERO_OPERATOR_LEASE_NAME",
        default_value = "xero-operator"
    )]
    lease_name: String,

    /// Seconds a leader's lease lasts after its last renewal (how long a dead leader blocks).
    #[arg(long, env = "XERO_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,

    /// At most this many token calls per Xero app (client id) per minute from this controller,
    /// counted over any 60-second window (bursts of a hundredth of it).
    #[arg(
        long,
        env = "XERO_OPERATOR_APP_CALLS_PER_MINUTE",
        default_value_t = 1000
    )]
    app_calls_per_minute: u32,

    /// Reconciles running at once (0: no limit). Bounds memory and the burst of API requests
    /// when many connections become due together.
    #[arg(
        long,
        env = "XERO_OPERATOR_MAX_CONCURRENT_RECONCILES",
        default_value_t = controller::DEFAULT_CONCURRENCY
    )]
    max_concurrent_reconciles: u16,

    /// Hosts the controller may send credentials to (`host` = HTTPS on 443, or `host:port`),
    /// repeatable or comma-separated. A connection whose endpoints name another host gets the
    /// condition EndpointNotAllowed and no request. Default: Xero's own hosts.
    #[arg(
        long = "allowed-endpoint-hosts",
        env = "XERO_OPERATOR_ALLOWED_ENDPOINT_HOSTS",
        value_delimiter = ',',
        default_values_t = xero_operator::allowlist::XERO_HOSTS.map(str::to_owned)
    )]
    allowed_endpoint_hosts: Vec<String>,

    /// Let connections name consumer ServiceAccounts of other namespaces (RoleBindings in the
    /// connection's namespace then grant them its token Secret). Off: consumers of the
    /// connection's own namespace only.
    #[arg(long, env = "XERO_OPERATOR_ALLOW_CROSS_NAMESPACE_CONSUMERS")]
    allow_cross_namespace_consumers: bool,

    /// Export a series per connection (its Ready reason, token expiry, last refresh): about a
    /// kilobyte of memory and four series each. `false` for fleets of tens of thousands of
    /// connections; the totals stay, and the chart's per-connection alerts then see nothing.
    #[arg(
        long,
        env = "XERO_OPERATOR_CONNECTION_METRICS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    connection_metrics: bool,

    /// Start even on a Kubernetes release older than the oldest supported one (1.32), where
    /// nothing has been tested; the version found is logged as a warning.
    #[arg(long, env = "XERO_OPERATOR_ALLOW_UNSUPPORTED_KUBERNETES")]
    allow_unsupported_kubernetes: bool,

    /// Log as JSON lines.
    #[arg(long, env = "XERO_OPERATOR_LOG_JSON")]
    log_json: bool,
}

/// What else the binary does.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Check an installed operator: it answers, and every connection it watches has a status for
    /// its current spec (what the chart's `helm test` runs). Exit 0 when all is well.
    Check(xero_operator::check::CheckArgs),
}

/// How often freed memory is handed back to the system ([`return_freed_memory`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Hands memory freed since the last call back to the system, every [`TRIM_EVERY`]. The C
/// library's allocator keeps freed memory inside its heaps; after a burst (thousands of
/// connections reconciled at start, a refresh storm) that would stay part of the resident size
/// for good. `malloc_trim` walks the free lists (milliseconds, even with 100,000 connections).
/// glibc only (the image links it statically); musl's allocator has no such call.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn return_freed_memory() {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        // SAFETY: malloc_trim only reorganises the allocator's own free memory; it is safe to
        // call at any time from any thread (glibc; the image links glibc statically).
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Allocations from this size up are mapped on their own and handed back when freed. glibc
/// raises its threshold after the first such free, and large buffers (an object of a few
/// hundred kilobytes in a watch event or an API answer: an author's big annotation) would then
/// be carved from the heap and fragment it for good; fixed, they cost nothing once dropped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

#[tokio::main]
async fn main() -> ExitCode {
    // SAFETY: mallopt only sets an allocator parameter; called first, before other threads
    // allocate much (it is thread-safe in glibc anyway).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colours only on a terminal: pod logs and files get plain text.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }
    let result = match args.command {
        Some(Command::Check(check)) => xero_operator::check::run(check).await,
        None => run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xero-operator: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let allowlist =
        xero_operator::allowlist::EndpointAllowlist::parse(&args.allowed_endpoint_hosts)
            .map_err(|e| anyhow::anyhow!("--allowed-endpoint-hosts: {e}"))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    let oldest = kubernetes_version::OLDEST_SUPPORTED;
    match kubernetes_version::require_supported(&client, oldest).await? {
        Ok(_) => {}
        Err(too_old) if args.allow_unsupported_kubernetes => {
            tracing::warn!("{too_old}; running anyway (--allow-unsupported-kubernetes)");
        }
        Err(too_old) => return Err(too_old.into()),
    }
    if let Some(id) = &args.identity
        && (id.is_empty()
            || xero_operator::text::sanitize(id, xero_operator::text::MAX_IDENTITY_CHARS) != *id)
    {
        anyhow::bail!(
            "--identity must be printable text of 1 to {} characters",
            xero_operator::text::MAX_IDENTITY_CHARS
        );
    }
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        xero_operator::protocol::process_identity(&format!("controller/{}", host.trim()))
    });
    let metrics = Arc::new(if args.connection_metrics {
        Metrics::default()
    } else {
        Metrics::without_connection_series()
    });
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(return_freed_memory());
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(controller::server::serve(
        args.metrics_addr,
        metrics.clone(),
        ready.clone(),
    ));
    let mut ctx = Context::new(client, identity, metrics);
    ctx.concurrency = args.max_concurrent_reconciles;
    ctx.policy.allowlist = allowlist;
    ctx.policy.allow_cross_namespace_consumers = args.allow_cross_namespace_consumers;
    tracing::info!(allowed_endpoint_hosts = %ctx.policy.allowlist, allow_cross_namespace_consumers = args.allow_cross_namespace_consumers, "limits on connections");
    let per_minute = std::num::NonZeroU32::new(args.app_calls_per_minute)
        .ok_or_else(|| anyhow::anyhow!("--app-calls-per-minute must be at least 1"))?;
    ctx.metrics
        .app_calls_limit_per_minute
        .set(i64::from(per_minute.get()));
    let permits = ctx.metrics.app_permits.clone();
    ctx.gate = Some(
        xero_operator::protocol::gate::AppGate::per_minute(per_minute).with_on_permit(
            // The gate knows each app by the fingerprint of its client id already.
            move |app| {
                permits
                    .get_or_create(&xero_operator::controller::metrics::AppLabels {
                        app: app.to_owned(),
                    })
                    .inc();
            },
        ),
    );
    let ctx = Arc::new(ctx);
    let shutdown = async {
        xero_operator::process::shutdown_signal().await;
        tracing::info!("shutting down: finishing the reconciles in flight");
    };
    ready.store(true, Ordering::Relaxed);
    let result = if args.leader_election {
        let lease = controller::leader::LeaseSettings {
            namespace: args
                .lease_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".to_owned()),
            name: args.lease_name,
            duration_secs: args.lease_seconds.max(2),
            grace_secs: (args.lease_seconds / 3).max(1),
        };
        controller::leader::run_as_leader(ctx, args.namespaces, lease, shutdown).await
    } else {
        controller::run(ctx, args.namespaces, shutdown).await
    };
    server.abort();
    result
}
