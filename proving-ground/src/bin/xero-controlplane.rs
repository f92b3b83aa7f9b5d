//! Starts a real local control plane (etcd, kube-apiserver, kube-controller-manager) on loopback.
//!
//! - `xero-controlplane` runs until Ctrl-C/SIGTERM and prints `export` lines for `KUBECONFIG` and
//!   the directory with the matching `kubectl`.
//! - `xero-controlplane -- CMD ARGS…` runs CMD with `KUBECONFIG` and `XERO_TEST_KUBECONFIG` set
//!   and the control plane's `kubectl` first on `PATH`,
//!   then tears down and exits with CMD's exit code (how `make test` shares one control plane).
//! - `--exit-with-parent` tears down when the parent process goes away (how a test binary that
//!   started its own control plane makes sure nothing outlives it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use xero_proving_ground::controlplane::{ControlPlane, Options};

/// Start etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1 with a temporary state dir.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory with etcd, kube-apiserver and kube-controller-manager. Default: build them (or
    /// reuse the cached build) with tests/controlplane/build.sh.
    #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    /// Do not start kube-controller-manager (no garbage collection, no namespace deletion).
    #[arg(long)]
    no_controller_manager: bool,

    /// Stop when the parent process exits.
    #[arg(long)]
    exit_with_parent: bool,

    /// Command to run against the control plane; the launcher exits with its exit code.
    #[arg(last = true)]
    command: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xero-controlplane: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut opts = Options::from_bin_dir_or_build(args.bin_dir)?;
    opts.controller_manager = !args.no_controller_manager;
    let parent = std::os::unix::process::parent_id();
    let mut cp = ControlPlane::start(&opts).await?;
    let kubeconfig = cp.admin_kubeconfig.display().to_string();
    eprintln!("control plane ready at {}", cp.server);
    eprintln!("non-admin kubeconfig: {}", cp.user_kubeconfig.display());
    let bin_dir = opts.bin_dir.display().to_string();
    // The same-release kubectl goes first on PATH, so commands see no version skew.
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    println!("export XERO_CONTROLPLANE_BIN_DIR={bin_dir}");
    println!("export KUBECONFIG={kubeconfig}");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut child = match args.command.split_first() {
        Some((program, rest)) => Some(
            tokio::process::Command::new(program)
                .args(rest)
                .env("KUBECONFIG", &kubeconfig)
                .env("XERO_TEST_KUBECONFIG", &kubeconfig)
                .env("XERO_CONTROLPLANE_BIN_DIR", &bin_dir)
                .env("PATH", &path)
                .spawn()?,
        ),
        None => None,
    };
    let mut watchdog = tokio::time::interval(Duration::from_millis(500));
    let code = loop {
        tokio::select! {
            _ = sigterm.recv() => break ExitCode::from(143),
            _ = sigint.recv() => break ExitCode::from(130),
            status = async { child.as_mut().expect("guarded").wait().await }, if child.is_some() => {
                let code = status?.code().unwrap_or(1);
                break ExitCode::from(u8::try_from(code).unwrap_or(1));
            }
            _ = watchdog.tick() => {
                if args.exit_with_parent && std::os::unix::process::parent_id() != parent {
                    break ExitCode::SUCCESS;
                }
                if let Err(err) = cp.check_alive() {
                    eprintln!("xero-controlplane: {err}");
                    break ExitCode::from(2);
                }
            }
        }
    };
    if let Some(child) = child.as_mut() {
        let _ = child.kill().await;
    }
    cp.stop();
    Ok(code)
}
