//! An emulator of Xero's identity and connections endpoints, for tests, benchmarks, `make run`
//! and users' own local development. It behaves like Xero in every way the operator depends on
//! (`docs/xero-facts.md`): rotating refresh tokens with a grace period, expiring tokens,
//! client credentials, authorization code with PKCE, revocation, `/connections`, rate limits —
//! and it counts, fails and reports on demand through an admin API under `/_admin`.
//!
//! Start it in-process with [`Emulator::start`] or as the `xero-emulator` binary. It listens on
//! 127.0.0.1 only.

pub mod admin;
pub mod faults;
pub mod jwt;
pub mod limits;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{delete, get, post};

pub use admin::{AdminClient, NewUser, Report, SeededUser};
pub use faults::{Endpoint, Fate, FaultKind, Faults};
pub use limits::RateLimits;
pub use state::{Behaviour, ChainReport, GraceReuse, Lifetimes, ReuseDetection, TokenResponse};

use routes::{Inner, Shared};
use state::State;

/// The client id the emulator registers when none is configured.
pub const DEFAULT_CLIENT_ID: &str = "emulator-client";
/// Its secret. Not a secret: the emulator is a local test tool.
pub const DEFAULT_CLIENT_SECRET: &str = "emulator-secret";

/// Everything the emulator starts with; all of it can be changed at run time via `/_admin`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on: 127.0.0.1, or the real node's IP inside its network namespace.
    pub ip: std::net::IpAddr,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// Registered apps: (client id, client secret).
    pub clients: Vec<(String, String)>,
    pub behaviour: Behaviour,
    pub limits: RateLimits,
    pub faults: Faults,
    /// How long a `Timeout` fault keeps a request hanging.
    pub hang: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            clients: vec![(
                DEFAULT_CLIENT_ID.to_owned(),
                DEFAULT_CLIENT_SECRET.to_owned(),
            )],
            behaviour: Behaviour::default(),
            limits: RateLimits::default(),
            faults: Faults::default(),
            hang: Duration::from_secs(300),
        }
    }
}

/// A running emulator. Stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Binds `ip`:`port` and serves in a background task.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        config.faults.validate().map_err(std::io::Error::other)?;
        let mut state = State::new(config.behaviour);
        for (id, secret) in &config.clients {
            state.add_client(id, secret);
        }
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                state,
                limiter: limits::Limiter::new(config.limits),
                faults: config.faults,
            })),
            hang: config.hang,
        };
        let listener = tokio::net::TcpListener::bind((config.ip, config.port)).await?;
        let addr = listener.local_addr()?;
        let app = router(shared);
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%err, "emulator server stopped");
            }
        });
        tracing::info!(%addr, "xero emulator listening");
        Ok(Self { addr, server })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its `host:port`, for the controller's `--allowed-endpoint-hosts`.
    pub fn allowed_host(&self) -> String {
        self.addr.to_string()
    }

    /// Xero's hosts plus this emulator: the allowlist of a controller that talks to it.
    pub fn allowlist(&self) -> xero_operator::allowlist::EndpointAllowlist {
        xero_operator::allowlist::EndpointAllowlist::default()
            .with(&self.addr.ip().to_string(), self.addr.port())
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint URL.
    pub fn token_url(&self) -> String {
        format!("{}/connect/token", self.base_url())
    }

    /// The connections endpoint URL.
    pub fn connections_url(&self) -> String {
        format!("{}/connections", self.base_url())
    }

    /// The revocation endpoint URL.
    pub fn revocation_url(&self) -> String {
        format!("{}/connect/revocation", self.base_url())
    }

    /// A client of the admin API.
    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&self.base_url())
    }

    /// Waits until the server task ends (it ends only on an I/O error).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // Not graceful on purpose: a request hanging in a Timeout fault must not hold it open.
        self.server.abort();
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/connect/token", post(routes::token))
        .route("/connect/revocation", post(routes::revocation))
        .route("/identity/connect/authorize", get(routes::authorize))
        .route("/.well-known/openid-configuration", get(routes::discovery))
        .route("/.well-known/openid-configuration/jwks", get(routes::jwks))
        .route("/connections", get(routes::connections))
        .route("/connections/{id}", delete(routes::disconnect))
        .route("/api.xro/2.0/Organisation", get(routes::organisation))
        .route("/_admin/health", get(|| async { "ok" }))
        .route("/_admin/clients", post(admin::add_client))
        .route("/_admin/users", post(admin::add_user))
        .route("/_admin/users/{id}/families", post(admin::new_family))
        .route("/_admin/report", get(admin::report))
        .route("/_admin/reset", post(admin::reset))
        .route(
            "/_admin/faults",
            get(admin::get_faults).put(admin::put_faults),
        )
        .route(
            "/_admin/behaviour",
            get(admin::get_behaviour).put(admin::put_behaviour),
        )
        .route(
            "/_admin/limits",
            get(admin::get_limits).put(admin::put_limits),
        )
        .with_state(shared)
}
