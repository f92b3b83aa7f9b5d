//! `xero-token`: the refresh protocol for any workload, in any language. `get` prints a usable
//! access token (taking over the refresh if needed), `exec` runs a command with it in the
//! environment, `serve` answers `GET /token` on 127.0.0.1 for apps that cannot reach the
//! Kubernetes API, and `authorize` runs the authorization-code flow once to store the first pair.
//!
//! Exit codes, one per state ([`crate::protocol::Kind`]): 0 ok; 1 other error; 2 bad usage;
//! 3 re-authorisation required; 4 no refresh token yet; 5 Xero unavailable (every party backs
//! off); 6 Kubernetes API unavailable (the Secret missing, RBAC, an outage) or an endpoint not
//! allowed; 7 another party held the refresh for longer than `--timeout`; 8 stopped (Xero
//! refused the app's credentials or the request for good: a person must fix them); 9 rate
//! limited (Xero's 429).

pub mod authorize;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::protocol::format::{TokenRecord, format_time};
use crate::protocol::refresher::{default_identity, process_identity};
use crate::protocol::{AccessToken, Error, Refresher, Role};
use crate::redact::Sensitive;

/// Exit code for errors outside the protocol (bad configuration, I/O).
pub const EXIT_OTHER: u8 = 1;

/// The environment variable of `--allow-endpoint-host` (comma-separated), shared by both CLIs.
pub const ALLOW_HOSTS_ENV: &str = "XERO_ALLOW_ENDPOINT_HOSTS";

/// Xero's own hosts and the `extra` ones a person or a pod spec added: where a CLI may send
/// credentials.
pub fn allowlist(extra: &[String]) -> anyhow::Result<crate::allowlist::EndpointAllowlist> {
    crate::allowlist::EndpointAllowlist::for_callers(extra)
        .map_err(|e| anyhow::anyhow!("--allow-endpoint-host: {e}"))
}

/// Get a valid Xero access token from the token Secret an xero-operator connection manages,
/// taking over the refresh when it has expired.
#[derive(Parser, Debug)]
#[command(version, name = "xero-token")]
pub struct Args {
    /// Name of the token Secret (default of a XeroConnection `acme`: `acme-xero-token`).
    #[arg(long, global = true, env = "XERO_TOKEN_SECRET")]
    secret: Option<String>,

    /// Namespace of the token Secret. Default: $POD_NAMESPACE, the pod's own namespace, or the
    /// kubeconfig's.
    #[arg(long, global = true, env = "XERO_TOKEN_NAMESPACE")]
    namespace: Option<String>,

    /// Read the token from this mounted copy of the Secret first; fall back to the API when the
    /// mounted copy is expired (the kubelet updates mounts a minute or more late).
    #[arg(long, global = true, env = "XERO_TOKEN_FROM_DIR")]
    from_dir: Option<PathBuf>,

    /// Clock skew for a mounted copy without the connection's own (`clock_skew_seconds`, which
    /// the controller writes); the API copy carries its setting in an annotation.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    clock_skew: Duration,

    /// Who this party is in the protocol (shown as the refresh holder and in "refreshed by"): a
    /// prefix, such as the pod name, to which `/<pid>-<random>` is always added so that every
    /// process is a party of its own. Default prefix: the hostname.
    #[arg(long, global = true, env = "XERO_TOKEN_IDENTITY")]
    identity: Option<String>,

    /// How long to wait at most for another party's refresh or a rate limit.
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// A host besides Xero's own (identity.xero.com, api.xero.com) that this process may send
    /// the refresh token and the app's credentials to: `host` (HTTPS on 443) or `host:port`
    /// (an emulator, an egress proxy). The token Secret's `token-url` annotation is never
    /// followed to any other host: every consumer of the Secret may write it.
    #[arg(
        long = "allow-endpoint-host",
        value_name = "HOST",
        global = true,
        env = ALLOW_HOSTS_ENV,
        value_delimiter = ','
    )]
    pub allow_endpoint_hosts: Vec<String>,

    /// How long one call to Xero may take before it counts as lost (and is retried).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    xero_timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a valid access token (or, with --json, the token, tenant ids and expiry).
    Get {
        /// Print JSON: access_token, token_type, expires_at, tenant_id, tenant_ids, scope.
        #[arg(long)]
        json: bool,
        /// The access token Xero refused before its expiry (a file holding it, or - for
        /// standard input): reported in the Secret so that it is refreshed rather than handed
        /// out again, then a token is got as usual (a refreshed one once the refused token has
        /// been in use a quarter of its life, at most a minute).
        #[arg(long, value_name = "FILE")]
        refused: Option<PathBuf>,
    },
    /// Run a command with XERO_ACCESS_TOKEN, XERO_TENANT_ID and XERO_TOKEN_EXPIRES_AT set; exit
    /// with its exit code.
    Exec {
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Serve GET /token (JSON), GET /token/raw (the token alone) and GET /healthz on 127.0.0.1.
    Serve {
        /// Address to listen on (loopback only).
        #[arg(long, default_value = "127.0.0.1:8481")]
        listen: std::net::SocketAddr,
    },
    /// Authorise the app once (authorization code + PKCE) and store the first token pair.
    Authorize(authorize::AuthorizeArgs),
}

/// The token Secret named on the command line: its name, a client, and its namespace.
async fn secret_target(args: &Args) -> anyhow::Result<(String, kube::Client, String)> {
    let secret = args
        .secret
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--secret (or XERO_TOKEN_SECRET) is required"))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    let namespace = namespace(args, &client);
    Ok((secret, client, namespace))
}

/// Builds the API-backed refresher for the Secret named on the command line.
async fn refresher(args: &Args) -> anyhow::Result<Refresher> {
    let (secret, client, namespace) = secret_target(args).await?;
    let identity = args
        .identity
        .as_deref()
        .map_or_else(default_identity, process_identity);
    Ok(
        Refresher::new(client, &namespace, &secret, &identity, Role::Consumer)
            .with_allowlist(allowlist(&args.allow_endpoint_hosts)?)
            .with_max_wait(args.timeout)
            .with_xero_timeout(args.xero_timeout),
    )
}

fn namespace(args: &Args, client: &kube::Client) -> String {
    if let Some(ns) = &args.namespace {
        return ns.clone();
    }
    if let Ok(ns) = std::env::var("POD_NAMESPACE") {
        return ns;
    }
    if let Ok(ns) =
        std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    {
        return ns.trim().to_owned();
    }
    client.default_namespace().to_owned()
}

/// Where tokens come from: the mounted copy first (if any), then the API.
pub struct Source {
    from_dir: Option<PathBuf>,
    clock_skew: Duration,
    api: Option<Refresher>,
    /// The fingerprint of the last token reported refused: a mounted copy of it is not handed
    /// out again.
    refused: std::sync::Mutex<Option<String>>,
}

impl Source {
    /// Reports that Xero refused `token` (P70): marked in the Secret through the API, and never
    /// handed out again from the mounted copy.
    pub async fn refused(&self, token: &Sensitive) -> Result<(), SourceError> {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.fingerprint());
        match &self.api {
            Some(api) => api.refused(token).await.map_err(SourceError::Protocol),
            None => Err(SourceError::Config(
                "a refused token is reported through the API: give --secret".into(),
            )),
        }
    }

    /// A usable token, or why there is none.
    pub async fn get(&self) -> Result<AccessToken, SourceError> {
        if let Some(dir) = &self.from_dir {
            let refused = self
                .refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match TokenRecord::from_dir(dir, self.clock_skew) {
                Ok(rec) => {
                    if rec.is_usable(SystemTime::now())
                        && let Some(token) = mounted_token(&rec)
                        && refused != Some(token.token.fingerprint())
                    {
                        return Ok(token);
                    }
                    tracing::debug!(dir = %dir.display(), "mounted token expired; asking the API");
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the mounted token")
                }
            }
        }
        match &self.api {
            Some(api) => api.get().await.map_err(SourceError::Protocol),
            None => Err(SourceError::Config(
                "the mounted token is expired or unreadable and no --secret is given to fall back to the API".into(),
            )),
        }
    }
}

fn mounted_token(rec: &TokenRecord) -> Option<AccessToken> {
    let crate::protocol::format::Expiry::At(expires_at) = rec.expiry else {
        return None;
    };
    Some(AccessToken {
        token: rec.access_token.clone()?,
        token_type: rec.token_type.clone(),
        expires_at,
        usable_until: rec.usable_until()?,
        scope: rec.scope.clone(),
        tenant_ids: rec.tenant_ids.clone(),
        refreshed_by: None,
    })
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Protocol(#[from] Error),
    #[error("{0}")]
    Config(String),
}

impl SourceError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Protocol(e) => e.exit_code(),
            Self::Config(_) => EXIT_OTHER,
        }
    }
}

/// The JSON shape of a token for `get --json` and `serve`.
pub fn token_json(t: &AccessToken) -> serde_json::Value {
    json!({
        "access_token": t.token.expose(),
        "token_type": t.token_type,
        "expires_at": format_time(t.expires_at),
        "tenant_id": t.tenant_ids.first(),
        "tenant_ids": t.tenant_ids,
        "scope": t.scope,
    })
}

async fn source(args: &Args) -> anyhow::Result<Source> {
    let api = match (&args.secret, &args.from_dir) {
        (None, Some(_)) => None,
        _ => Some(refresher(args).await?),
    };
    Ok(Source {
        from_dir: args.from_dir.clone(),
        clock_skew: args.clock_skew,
        api,
        refused: std::sync::Mutex::new(None),
    })
}

fn fail(e: &SourceError) -> ExitCode {
    eprintln!("xero-token: {e}");
    ExitCode::from(e.exit_code())
}

/// The entry point of the `xero-token` binary.
pub async fn main() -> ExitCode {
    crate::process::run_cli("xero-token", EXIT_OTHER, run(Args::parse())).await
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Get { json, refused } => {
            let source = source(&args).await?;
            if let Some(path) = refused {
                let text = if path.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())
                } else {
                    std::fs::read_to_string(path)
                }
                .map_err(|e| anyhow::anyhow!("cannot read the refused token: {e}"))?;
                if let Err(e) = source.refused(&Sensitive::new(text.trim())).await {
                    return Ok(fail(&e));
                }
            }
            Ok(match source.get().await {
                Ok(t) if *json => {
                    println!("{}", token_json(&t));
                    ExitCode::SUCCESS
                }
                Ok(t) => {
                    println!("{}", t.token.expose());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            })
        }
        Command::Exec { command } => {
            let source = source(&args).await?;
            let t = match source.get().await {
                Ok(t) => t,
                Err(e) => return Ok(fail(&e)),
            };
            let (program, rest) = command.split_first().expect("clap requires a command");
            let status = tokio::process::Command::new(program)
                .args(rest)
                .env("XERO_ACCESS_TOKEN", t.token.expose())
                .env(
                    "XERO_TENANT_ID",
                    t.tenant_ids.first().cloned().unwrap_or_default(),
                )
                .env("XERO_TENANT_IDS", t.tenant_ids.join(","))
                .env("XERO_TOKEN_EXPIRES_AT", format_time(t.expires_at))
                .status()
                .await
                .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
            Ok(ExitCode::from(
                status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(EXIT_OTHER),
            ))
        }
        Command::Serve { listen } => {
            if !listen.ip().is_loopback() {
                anyhow::bail!(
                    "--listen must be a loopback address (the token must not leave the pod)"
                );
            }
            let source = Arc::new(source(&args).await?);
            serve::serve(*listen, source).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Authorize(a) => authorize::run(&args, a).await,
    }
}
