//! `make run`: the controller on a local control plane with the Xero emulator, an example
//! connection and a consumer, narrated. `RUN_FOR=60s` stops it by itself (exit 0); otherwise it
//! runs until Ctrl-C. See `src/devrun.rs`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use xero_proving_ground::controlplane::Options;
use xero_proving_ground::devrun::{RunOptions, run};

/// Run xero-operator end to end on this machine: local control plane, Xero emulator, controller.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory with etcd, kube-apiserver, kube-controller-manager (default: build or reuse
    /// them with proving-ground/controlplane/build.sh).
    #[arg(long, env = "XERO_CONTROLPLANE_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    /// Stop after this long, e.g. "60s" (default: run until Ctrl-C).
    #[arg(long, env = "RUN_FOR", value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,

    /// Access-token lifetime in the emulator.
    #[arg(long, env = "XERO_RUN_TOKEN_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    xero_operator::process::init_logging("warn,kube_client::client::builder=off");
    let args = Args::parse();
    let controlplane = match Options::from_bin_dir_or_build(args.bin_dir) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xero-run: {e}");
            return ExitCode::from(1);
        }
    };
    match run(RunOptions {
        controlplane,
        token_lifetime: args.token_lifetime,
        run_for: args.run_for,
    })
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xero-run: {e:#}");
            ExitCode::from(1)
        }
    }
}
