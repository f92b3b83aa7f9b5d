//! `xero-operator`: the controller. Keeps every XeroConnection's token Secret valid (the
//! producer role of the refresh protocol), with metrics and health endpoints.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use xero_operator::controller::{self, Context, metrics::Metrics};

/// The xero-operator controller.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "XERO_OPERATOR_NAMESPACE")]
    namespace: Option<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "XERO_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,

    /// This replica's identity in the refresh protocol (default: controller/<hostname>).
    #[arg(long, env = "XERO_OPERATOR_IDENTITY")]
    identity: Option<String>,

    /// Log as JSON lines.
    #[arg(long, env = "XERO_OPERATOR_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xero-operator: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("controller/{}", host.trim())
    });
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(controller::server::serve(
        args.metrics_addr,
        metrics.clone(),
        ready.clone(),
    ));
    let ctx = Arc::new(Context::new(client, identity, metrics));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler works on Unix");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down: finishing the reconciles in flight");
    };
    ready.store(true, Ordering::Relaxed);
    let result = controller::run(ctx, args.namespace, shutdown).await;
    server.abort();
    result
}
