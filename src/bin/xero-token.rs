//! `xero-token`: get, exec, serve and authorize — see `xero-token --help` and `src/cli/`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    xero_operator::cli::main().await
}
