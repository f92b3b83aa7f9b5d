//! `xero-token serve`: a sidecar on 127.0.0.1 answering `GET /token` for apps that cannot speak
//! to the Kubernetes API. Each request goes through the in-process cache and single flight, so
//! any number of requests costs one refresh per expiry.

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
    let code = match e {
        SourceError::Protocol(
            crate::protocol::Error::ReauthorizationRequired(_)
            | crate::protocol::Error::UnreadableRefreshToken,
        ) => "reauthorization_required",
        SourceError::Protocol(crate::protocol::Error::NoRefreshToken) => "no_refresh_token",
        SourceError::Protocol(crate::protocol::Error::Xero(_)) => "xero_unavailable",
        SourceError::Protocol(crate::protocol::Error::Timeout(..)) => "timeout",
        _ => "unavailable",
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

/// Serves until the process is stopped.
pub async fn serve(listen: SocketAddr, source: Arc<Source>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/token", get(token))
        .route("/token/raw", get(raw_token))
        .route("/healthz", get(|| async { "ok" }))
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
