//! `xero-emulator`: an emulator of Xero's identity and connections endpoints on 127.0.0.1, for
//! tests, benchmarks and local development. See `xero-emulator --help` and `docs/development.md`.

use std::time::Duration;

use clap::Parser;
use xero_proving_ground::emulator::{
    Behaviour, Config, Emulator, Endpoint, Faults, GraceReuse, Lifetimes, RateLimits,
    ReuseDetection,
};

/// Emulates Xero's OAuth 2.0 endpoints (token, revocation, authorize, JWKS) and /connections on
/// 127.0.0.1, with an admin API under /_admin to seed users, inject faults and read reports.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on: 127.0.0.1, or the real node's IP (10.77.0.1) inside its network
    /// namespace so that pods reach it.
    #[arg(long, env = "XERO_EMULATOR_LISTEN_IP", default_value = "127.0.0.1")]
    listen_ip: std::net::IpAddr,

    /// Port (0 picks a free one; the address is printed on stdout).
    #[arg(long, env = "XERO_EMULATOR_PORT", default_value_t = 8480)]
    port: u16,

    /// A registered app as CLIENT_ID:CLIENT_SECRET (repeatable).
    #[arg(
        long = "client",
        env = "XERO_EMULATOR_CLIENTS",
        value_delimiter = ',',
        default_value = "emulator-client:emulator-secret"
    )]
    clients: Vec<String>,

    /// Access-token lifetime (Xero: 30 minutes), e.g. "2s", "30m".
    #[arg(long, env = "XERO_EMULATOR_ACCESS_TOKEN_TTL", default_value = "30m", value_parser = humantime::parse_duration)]
    access_token_ttl: Duration,

    /// Lifetime of an unused refresh token (Xero: 60 days).
    #[arg(long, env = "XERO_EMULATOR_REFRESH_TOKEN_TTL", default_value = "60days", value_parser = humantime::parse_duration)]
    refresh_token_ttl: Duration,

    /// How long a used refresh token stays usable (Xero: 30 minutes).
    #[arg(long, env = "XERO_EMULATOR_GRACE", default_value = "30m", value_parser = humantime::parse_duration)]
    grace: Duration,

    /// Lifetime of an authorization code.
    #[arg(long, env = "XERO_EMULATOR_AUTH_CODE_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    auth_code_ttl: Duration,

    /// What a second use of a refresh token inside its grace period returns.
    #[arg(long, env = "XERO_EMULATOR_GRACE_REUSE", value_enum, default_value_t = GraceReuse::SamePair)]
    grace_reuse: GraceReuse,

    /// What a use of a superseded refresh token after its grace period does.
    #[arg(long, env = "XERO_EMULATOR_REUSE_DETECTION", value_enum, default_value_t = ReuseDetection::RevokeFamily)]
    reuse_detection: ReuseDetection,

    /// Calls per minute per app (token-endpoint calls included).
    #[arg(long, env = "XERO_EMULATOR_APP_PER_MINUTE", default_value_t = RateLimits::default().app_per_minute)]
    app_per_minute: u32,

    /// API calls per minute per tenant.
    #[arg(long, env = "XERO_EMULATOR_TENANT_PER_MINUTE", default_value_t = RateLimits::default().tenant_per_minute)]
    tenant_per_minute: u32,

    /// API calls per day per tenant.
    #[arg(long, env = "XERO_EMULATOR_TENANT_PER_DAY", default_value_t = RateLimits::default().tenant_per_day)]
    tenant_per_day: u32,

    /// API calls in flight at once per tenant.
    #[arg(long, env = "XERO_EMULATOR_TENANT_CONCURRENT", default_value_t = RateLimits::default().tenant_concurrent)]
    tenant_concurrent: u32,

    /// Fraction (0..1) of requests answered 500.
    #[arg(long, env = "XERO_EMULATOR_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,

    /// Fraction of requests never answered.
    #[arg(long, env = "XERO_EMULATOR_TIMEOUT_RATE", default_value_t = 0.0)]
    timeout_rate: f64,

    /// Fraction of requests processed whose answer is then lost (connection cut).
    #[arg(long, env = "XERO_EMULATOR_DROP_RESPONSE_RATE", default_value_t = 0.0)]
    drop_response_rate: f64,

    /// Fraction of requests answered 429.
    #[arg(long, env = "XERO_EMULATOR_RATE_LIMIT_RATE", default_value_t = 0.0)]
    rate_limit_rate: f64,

    /// Delay added to every answer, e.g. "50ms".
    #[arg(long, env = "XERO_EMULATOR_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,

    /// Endpoints the faults apply to (repeatable; default all).
    #[arg(
        long = "fault-endpoint",
        env = "XERO_EMULATOR_FAULT_ENDPOINTS",
        value_enum,
        value_delimiter = ','
    )]
    fault_endpoints: Vec<Endpoint>,

    /// How long a timed-out request hangs before the emulator gives up on it.
    #[arg(long, env = "XERO_EMULATOR_HANG", default_value = "5m", value_parser = humantime::parse_duration)]
    hang: Duration,
}

fn parse_client(spec: &str) -> anyhow::Result<(String, String)> {
    match spec.split_once(':') {
        Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
            Ok((id.to_owned(), secret.to_owned()))
        }
        _ => anyhow::bail!("--client takes CLIENT_ID:CLIENT_SECRET, got {spec:?}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    xero_operator::process::init_logging("info");
    let args = Args::parse();
    let config = Config {
        ip: args.listen_ip,
        port: args.port,
        clients: args
            .clients
            .iter()
            .map(|c| parse_client(c))
            .collect::<anyhow::Result<_>>()?,
        behaviour: Behaviour {
            lifetimes: Lifetimes {
                access_token: args.access_token_ttl,
                refresh_token: args.refresh_token_ttl,
                grace: args.grace,
                auth_code: args.auth_code_ttl,
            },
            grace_reuse: args.grace_reuse,
            reuse_detection: args.reuse_detection,
        },
        limits: RateLimits {
            app_per_minute: args.app_per_minute,
            tenant_per_minute: args.tenant_per_minute,
            tenant_per_day: args.tenant_per_day,
            tenant_concurrent: args.tenant_concurrent,
        },
        faults: Faults {
            error_rate: args.error_rate,
            timeout_rate: args.timeout_rate,
            drop_response_rate: args.drop_response_rate,
            rate_limit_rate: args.rate_limit_rate,
            latency: args.latency,
            endpoints: args.fault_endpoints,
            ..Faults::default()
        },
        hang: args.hang,
    };
    let mut emulator = Emulator::start(config).await?;
    println!("listening on {}", emulator.base_url());
    tokio::select! {
        _ = emulator.wait() => anyhow::bail!("the emulator's server stopped"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
