//! `kubectl-xero`: the `kubectl xero` plugin (status, renew, authorize) — see `src/plugin/`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    xero_operator::plugin::main().await
}
