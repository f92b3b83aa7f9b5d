//! `xero-token serve`: a sidecar on 127.0.0.1 answering `GET /token` for apps that cannot speak
//! to the Kubernetes API. Each request goes through the in-process cache and single flight, so
//! any number of requests costs one refresh per expiry.
//!
//! Only requests whose `Host` is a loopback name are answered: a web page that rebinds its own
//! DNS name to 127.0.0.1 (DNS rebinding, on a laptop) or a request forged to reach loopback by
//! another name gets 421, never a token.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::{Source, SourceError, token_json};

fn error_response(e: &SourceError) -> Response {
    // Which state the token is in, one name each (`docs/operating.md`, "Exit codes"): a caller tells "a person must fix
    // the app" from "try again later" from "the Kubernetes API failed".
    let code = match e {
        SourceError::Protocol(p) => p.kind().as_str(),
        SourceError::Config(_) => "not_configured",
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"error": code, "message": e.to_string()})),
    )
        .into_response()
}

async fn token(State(source): State<Arc<Source>>) -> Response {
    match source.get().await {
        Ok(t) => axum::Json(token_json(&t)).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn raw_token(State(source): State<Arc<Source>>) -> Response {
    match source.get().await {
        Ok(t) => t.token.expose().to_owned().into_response(),
        Err(e) => error_response(&e),
    }
}

/// `POST /token/refused` with the refused access token as the body: reported (P70), then a
/// token as `GET /token` answers.
async fn refused(State(source): State<Arc<Source>>, body: String) -> Response {
    if let Err(e) = source
        .refused(&crate::redact::Sensitive::new(body.trim()))
        .await
    {
        return error_response(&e);
    }
    token(State(source)).await
}

/// Whether a `Host` header names this loopback server: `localhost`, `127.0.0.1` (any of
/// 127/8) or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn loopback_hosts_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    match host {
        Some(h) if is_loopback_host(h) => next.run(request).await,
        _ => (
            StatusCode::MISDIRECTED_REQUEST,
            axum::Json(json!({"error": "host_not_allowed",
                "message": "xero-token serve answers only requests to localhost, 127.0.0.1 or [::1]"})),
        )
            .into_response(),
    }
}

/// Serves until the process is stopped.
pub async fn serve(listen: SocketAddr, source: Arc<Source>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/token", get(token))
        .route("/token/raw", get(raw_token))
        .route("/token/refused", axum::routing::post(refused))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::middleware::from_fn(loopback_hosts_only))
        .with_state(source);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    // The address goes to stdout so a supervisor (or a test) can find a port chosen by the OS.
    println!("serving on http://{}", listener.local_addr()?);
    let shutdown = crate::process::shutdown_signal();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_names_are_answered() {
        for ok in [
            "localhost",
            "LOCALHOST:8481",
            "127.0.0.1",
            "127.0.0.1:8481",
            "127.9.9.9:1",
            "[::1]",
            "[::1]:8481",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8481",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8481",
            "[::2]:8481",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
