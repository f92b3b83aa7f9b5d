//! Starts a real local control plane (etcd, kube-apiserver, kube-controller-manager) on loopback.
//!
//! - `xero-controlplane` runs until Ctrl-C/SIGTERM and prints `export` lines for `KUBECONFIG` and
//!   the directory with the matching `kubectl`.
//! - `xero-controlplane -- CMD ARGS…` runs CMD with `KUBECONFIG` and `XERO_TEST_KUBECONFIG` set
//!   and the control plane's `kubectl` first on `PATH`,
//!   then tears down and exits with CMD's exit code (how `make test` shares one control plane).
//! - `--exit-with-parent` tears down when the parent process goes away (how a test binary that
//!   started its own control plane makes sure nothing outlives it).
//! - `--node --node-image pause.tar …` also runs a real node (containerd, kubelet,
//!   kube-scheduler, kube-proxy): the launcher, the control plane, the node and CMD all live in a
//!   network namespace made for the run, with no route out. CMD gets `XERO_NODE_NAME`,
//!   `XERO_NODE_IP` and `XERO_NODE_CONTAINERD` (containerd's socket, for `ctr`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use xero_proving_ground::controlplane::node::{self, NodeOptions};
use xero_proving_ground::controlplane::{ControlPlane, Options};

/// Start etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1 with a temporary state dir.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory with etcd, kube-apiserver and kube-controller-manager. Default: build them (or
    /// reuse the cached build) with proving-ground/controlplane/build.sh.
    #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    /// Do not start kube-controller-manager (no garbage collection, no namespace deletion).
    #[arg(long)]
    no_controller_manager: bool,

    /// Stop when the parent process exits.
    #[arg(long)]
    exit_with_parent: bool,

    /// Also run a real node in a network namespace made for the run (needs root and
    /// scripts/node-deps.sh).
    #[arg(long)]
    node: bool,

    /// OCI image tarball to load into the node's containerd (repeatable); one must be the
    /// sandbox image xero.local/pause:1 (proving-ground/node/images.sh builds it).
    #[arg(long = "node-image", requires = "node")]
    node_images: Vec<PathBuf>,

    /// How often the node's kubelet re-reads mounted Secrets (its default is 1m).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration, requires = "node")]
    secret_sync: Duration,

    /// Command to run against the control plane; the launcher exits with its exit code.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before the runtime starts any thread: every thread and child is then in the namespace.
    if args.node
        && let Err(err) = node::enter_network_namespace()
    {
        eprintln!("xero-controlplane: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("xero-controlplane: starting the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
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
    if args.node {
        opts.node = Some(NodeOptions {
            images: args.node_images.clone(),
            sync_frequency: args.secret_sync,
        });
    }
    let parent = std::os::unix::process::parent_id();
    let mut cp = ControlPlane::start(&opts).await?;
    let kubeconfig = cp.admin_kubeconfig.display().to_string();
    eprintln!("control plane ready at {}", cp.server);
    let node_env: Vec<(&str, String)> = match &cp.node {
        Some(n) => {
            eprintln!(
                "node {} Ready at {} (enter its network: nsenter --net=/proc/{}/ns/net)",
                n.name,
                node::NODE_IP,
                std::process::id()
            );
            vec![
                ("XERO_NODE_NAME", n.name.clone()),
                ("XERO_NODE_IP", node::NODE_IP.to_string()),
                (
                    "XERO_NODE_CONTAINERD",
                    n.containerd_socket.display().to_string(),
                ),
                (
                    "XERO_NODE_SECRET_SYNC",
                    humantime::format_duration(args.secret_sync).to_string(),
                ),
            ]
        }
        None => vec![],
    };
    eprintln!("non-admin kubeconfig: {}", cp.user_kubeconfig.display());
    let bin_dir = opts.bin_dir.display().to_string();
    // The same-release kubectl goes first on PATH, so commands see no version skew.
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    println!("export XERO_CONTROLPLANE_BIN_DIR={bin_dir}");
    println!("export KUBECONFIG={kubeconfig}");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut child = match args.command.split_first() {
        Some((program, rest)) => {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(rest)
                .env("KUBECONFIG", &kubeconfig)
                .env("XERO_TEST_KUBECONFIG", &kubeconfig)
                .env("XERO_CONTROLPLANE_BIN_DIR", &bin_dir)
                .env("PATH", &path)
                .envs(node_env.iter().map(|(k, v)| (k, v)));
            // SAFETY: prctl only; the command cannot go on without the control plane, so it dies
            // with the launcher.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(cmd.spawn()?)
        }
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
