//! Process plumbing the binaries share: logging to stderr, and the shutdown signal.

use std::io::IsTerminal;

/// Logs to stderr (stdout stays for the program's output), filtered by `RUST_LOG` or else by
/// `default_filter`; colours only on a terminal (not in files or pod logs).
/// Runs a command-line tool: logging at `warn` unless `RUST_LOG` says otherwise, then `run`;
/// an error it returns is printed after `name: ` and exits with `exit_other`.
pub async fn run_cli<F>(name: &str, exit_other: u8, run: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    init_logging("warn");
    match run.await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::from(exit_other)
        }
    }
}

pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works on Unix");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
