//! The emulator's Xero-facing HTTP endpoints: token, revocation, authorize, JWKS, connections and
//! one tenant API call. Parsing and formatting only; the rules live in `state.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as Axum};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde_json::json;

use super::faults::{Endpoint, Fate, FaultKind, Faults};
use super::limits::{Limited, Limiter, Remaining};
use super::state::{BearerError, Millis, OAuthError, State, rfc3339};

/// Everything the handlers share.
pub struct Inner {
    pub state: State,
    pub limiter: Limiter,
    pub faults: Faults,
}

/// The shared handle the router carries.
#[derive(Clone)]
pub struct Shared {
    pub inner: Arc<Mutex<Inner>>,
    /// How long a `Timeout` fault keeps a request hanging.
    pub hang: Duration,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving with the state as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A short, non-reversible fingerprint of a token for logs: never log a token itself.
pub fn fingerprint(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn oauth_error(err: &OAuthError, basic_auth: bool) -> Response {
    // RFC 6749 §5.2: invalid_client is 401 when the client authenticated with the header.
    let status = match err {
        OAuthError::InvalidClient if basic_auth => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut body = json!({"error": err.code()});
    if let Some(d) = err.description() {
        body["error_description"] = json!(d);
    }
    (status, Json(body)).into_response()
}

fn rate_limited(limited: Limited) -> Response {
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded").into_response();
    let h = resp.headers_mut();
    h.insert(
        header::RETRY_AFTER,
        HeaderValue::from(limited.retry_after_secs),
    );
    h.insert(
        "x-rate-limit-problem",
        HeaderValue::from_static(limited.problem.header_value()),
    );
    resp
}

fn remaining_headers(resp: &mut Response, r: Remaining) {
    let h = resp.headers_mut();
    h.insert("x-appminlimit-remaining", HeaderValue::from(r.app_minute));
    if let Some(m) = r.minute {
        h.insert("x-minlimit-remaining", HeaderValue::from(m));
    }
    if let Some(d) = r.day {
        h.insert("x-daylimit-remaining", HeaderValue::from(d));
    }
}

/// Faults applied after the request was processed: the answer is lost or made unusable.
fn after_processing(kind: FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::DropResponse | FaultKind::RotatedWithoutAccessToken
    )
}

/// The answer for an injected fault that replaces processing, or `None` to process the request
/// (the faults of [`after_processing`] are applied to the processed answer).
async fn pre_fault(shared: &Shared, fate: Fate) -> Option<Response> {
    let kind = fate.kind.filter(|k| !after_processing(*k))?;
    if !fate.latency.is_zero() {
        tokio::time::sleep(fate.latency).await;
    }
    let resp = match kind {
        FaultKind::Error => {
            (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response()
        }
        FaultKind::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response()
        }
        FaultKind::RateLimit => rate_limited(Limited {
            problem: super::limits::Problem::AppMinute,
            retry_after_secs: 1,
        }),
        FaultKind::Html => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>Down for maintenance</h1></body></html>",
        )
            .into_response(),
        FaultKind::TruncatedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"access_token":"eyJhbGciOi"#,
        )
            .into_response(),
        FaultKind::InvalidGrant => oauth_error(&OAuthError::InvalidGrant("injected"), false),
        FaultKind::InvalidRequest => oauth_error(&OAuthError::InvalidRequest("injected"), false),
        FaultKind::UnauthorizedClient => {
            oauth_error(&OAuthError::UnauthorizedClient("injected"), false)
        }
        FaultKind::NoAccessToken => {
            Json(json!({"token_type": "Bearer", "expires_in": 1800})).into_response()
        }
        FaultKind::ExpiresInZero => {
            Json(json!({"access_token": "injected", "token_type": "Bearer", "expires_in": 0}))
                .into_response()
        }
        FaultKind::ExpiresInYear => Json(
            json!({"access_token": "injected", "token_type": "Bearer", "expires_in": 31_536_000}),
        )
        .into_response(),
        FaultKind::Timeout => {
            tokio::time::sleep(shared.hang).await;
            (StatusCode::GATEWAY_TIMEOUT, "timed out").into_response()
        }
        FaultKind::DropResponse | FaultKind::RotatedWithoutAccessToken => {
            unreachable!("applied after processing")
        }
    };
    Some(resp)
}

/// Applies latency and a dropped response to a processed answer.
async fn finish(fate: Fate, resp: Response) -> Response {
    if !fate.latency.is_zero() {
        tokio::time::sleep(fate.latency).await;
    }
    if fate.kind == Some(FaultKind::DropResponse) {
        // The request was processed; now cut the connection mid-answer so the client never gets
        // it. A body stream that fails makes hyper abort the connection.
        let failing = futures_util::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other(
                "response dropped by fault injection",
            ))
        });
        let (parts, _) = resp.into_parts();
        let mut cut = Response::from_parts(parts, Body::from_stream(failing));
        cut.headers_mut().remove(header::CONTENT_LENGTH);
        return cut;
    }
    resp
}

/// Client authentication: HTTP Basic, or `client_id`/`client_secret` in the form.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Option<(String, String, bool)> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(b64) = value.strip_prefix("Basic ")
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (id, secret) = text.split_once(':')?;
        return Some((id.to_owned(), secret.to_owned(), true));
    }
    Some((
        form.get("client_id")?.clone(),
        form.get("client_secret")?.clone(),
        false,
    ))
}

fn bump(map: &mut std::collections::BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_owned()).or_default() += 1;
}

/// `POST /connect/token`.
pub async fn token(Axum(shared): Axum<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    let creds = client_credentials(&headers, &form);
    let fault = {
        let mut inner = shared.lock();
        let c = &mut inner.state.counters;
        c.token_calls += 1;
        let received = now_ms();
        *c.token_calls_by_second.entry(received / 1000).or_default() += 1;
        if c.recent_token_calls_ms.len() == super::state::RECENT_TOKEN_CALLS {
            c.recent_token_calls_ms.pop_front();
        }
        c.recent_token_calls_ms.push_back(received);
        bump(
            &mut c.token_calls_by_grant,
            if grant.is_empty() { "none" } else { &grant },
        );
        bump(
            &mut c.token_calls_by_client,
            creds.as_ref().map_or("unknown", |(id, _, _)| id.as_str()),
        );
        bump(
            &mut c.token_calls_by_client_auth,
            match &creds {
                Some((_, _, true)) => "basic",
                Some((_, _, false)) => "form",
                None => "none",
            },
        );
        if grant == "client_credentials" {
            bump(
                &mut c.client_credentials_scopes,
                form.get("scope").map_or("(none)", String::as_str),
            );
        }
        let fault = inner.faults.fate(Endpoint::Token);
        if fault.kind.is_some() {
            inner.state.counters.faults_injected += 1;
        }
        fault
    };
    if let Some(resp) = pre_fault(&shared, fault).await {
        bump(&mut shared.lock().state.counters.token_outcomes, "fault");
        tracing::info!(grant, fault = ?fault.kind, "token request answered by an injected fault");
        return resp;
    }
    let resp = {
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let now = now_ms();
        let basic = creds.as_ref().is_some_and(|c| c.2);
        let result = match &creds {
            None => Err(OAuthError::InvalidClient),
            Some((id, secret, _)) => inner.state.authenticate_client(id, secret),
        };
        let client_id = creds.as_ref().map(|c| c.0.clone()).unwrap_or_default();
        let admitted = match result {
            Ok(()) => inner.limiter.admit_app(&client_id, now).map(|_| ()),
            Err(_) => Ok(()),
        };
        match (result, admitted) {
            (_, Err(limited)) => {
                inner.state.counters.rate_limited += 1;
                bump(&mut inner.state.counters.token_outcomes, "rate_limited");
                tracing::info!(grant, client_id, "token request rate limited");
                rate_limited(limited)
            }
            (Err(e), _) => {
                bump(&mut inner.state.counters.token_outcomes, e.code());
                tracing::info!(grant, client_id, error = e.code(), "token request refused");
                oauth_error(&e, basic)
            }
            (Ok(()), Ok(())) => {
                let presented = form
                    .get("refresh_token")
                    .map(String::as_str)
                    .unwrap_or_default();
                let answer = match grant.as_str() {
                    "refresh_token" if presented.is_empty() => {
                        Err(OAuthError::InvalidRequest("refresh_token is required"))
                    }
                    "refresh_token" => inner.state.refresh(&client_id, presented, now),
                    "client_credentials" => inner.state.client_credentials(&client_id, now),
                    "authorization_code" => inner.state.exchange_code(
                        &client_id,
                        form.get("code").map(String::as_str).unwrap_or_default(),
                        form.get("redirect_uri")
                            .map(String::as_str)
                            .unwrap_or_default(),
                        form.get("code_verifier")
                            .map(String::as_str)
                            .unwrap_or_default(),
                        now,
                    ),
                    _ => Err(OAuthError::UnsupportedGrantType),
                };
                let outcome = answer.as_ref().map_or_else(|e| e.code(), |_| "ok");
                bump(&mut inner.state.counters.token_outcomes, outcome);
                tracing::info!(
                    grant,
                    client_id,
                    outcome,
                    family = inner.state.family_of(presented).unwrap_or_default(),
                    presented = (!presented.is_empty()).then(|| fingerprint(presented)),
                    dropped = fault.kind == Some(FaultKind::DropResponse),
                    "token request"
                );
                match answer {
                    Ok(t) if fault.kind == Some(FaultKind::RotatedWithoutAccessToken) => {
                        Json(json!({
                            "refresh_token": t.refresh_token,
                            "expires_in": t.expires_in,
                            "token_type": t.token_type,
                        }))
                        .into_response()
                    }
                    Ok(t) => Json(t).into_response(),
                    Err(e) => oauth_error(&e, basic),
                }
            }
        }
    };
    finish(fault, resp).await
}

/// `POST /connect/revocation`.
pub async fn revocation(Axum(shared): Axum<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let fault = {
        let mut inner = shared.lock();
        inner.state.counters.revocation_calls += 1;
        inner.faults.fate(Endpoint::Revocation)
    };
    if let Some(resp) = pre_fault(&shared, fault).await {
        return resp;
    }
    let creds = client_credentials(&headers, &form);
    let resp = {
        let mut inner = shared.lock();
        let basic = creds.as_ref().is_some_and(|c| c.2);
        let result = match &creds {
            None => Err(OAuthError::InvalidClient),
            Some((id, secret, _)) => {
                inner
                    .state
                    .authenticate_client(id, secret)
                    .and_then(|()| match form.get("token") {
                        Some(token) => inner.state.revoke(id, token),
                        None => Err(OAuthError::InvalidRequest("token is required")),
                    })
            }
        };
        tracing::info!(ok = result.is_ok(), "revocation request");
        match result {
            Ok(()) => StatusCode::OK.into_response(),
            Err(e) => oauth_error(&e, basic),
        }
    };
    finish(fault, resp).await
}

/// `GET /identity/connect/authorize`: approves at once for a registered user and redirects back.
pub async fn authorize(
    Axum(shared): Axum<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    if get("response_type") != "code" {
        return (StatusCode::BAD_REQUEST, "response_type must be code").into_response();
    }
    let method = get("code_challenge_method");
    if !get("code_challenge").is_empty() && method != "S256" {
        return (
            StatusCode::BAD_REQUEST,
            "code_challenge_method must be S256",
        )
            .into_response();
    }
    let redirect_uri = get("redirect_uri");
    if !(redirect_uri.starts_with("http://") || redirect_uri.starts_with("https://")) {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri must be an absolute URL",
        )
            .into_response();
    }
    let mut inner = shared.lock();
    let client_id = get("client_id");
    let user = match q.get("login_hint") {
        Some(u) => Some(u.clone()),
        None => inner.state.default_user(client_id),
    };
    let Some(user) = user else {
        return (
            StatusCode::BAD_REQUEST,
            "no registered user for this client",
        )
            .into_response();
    };
    match inner.state.authorize(
        client_id,
        redirect_uri,
        get("code_challenge"),
        &user,
        get("scope"),
        now_ms(),
    ) {
        Ok(code) => {
            let query = serde_urlencoded::to_string([
                ("code", code.as_str()),
                ("state", get("state")),
                ("scope", get("scope")),
            ])
            .unwrap_or_default();
            let sep = if redirect_uri.contains('?') { '&' } else { '?' };
            tracing::info!(client_id, "authorization approved");
            Redirect::to(&format!("{redirect_uri}{sep}{query}")).into_response()
        }
        // RFC 6749 §4.1.2.1: with a valid redirect URI, the error goes back to the client.
        Err(e) => {
            let description = e.description().unwrap_or_default();
            let query = serde_urlencoded::to_string([
                ("error", e.code()),
                ("error_description", description),
                ("state", get("state")),
            ])
            .unwrap_or_default();
            let sep = if redirect_uri.contains('?') { '&' } else { '?' };
            tracing::info!(client_id, error = e.code(), "authorization refused");
            Redirect::to(&format!("{redirect_uri}{sep}{query}")).into_response()
        }
    }
}

/// `GET /.well-known/openid-configuration/jwks`.
pub async fn jwks(Axum(shared): Axum<Shared>) -> Response {
    Json(shared.lock().state.jwks()).into_response()
}

fn unauthorized(err: BearerError) -> Response {
    let detail = match err {
        BearerError::Expired(at) => format!("TokenExpired: token expired at {}", rfc3339(at)),
        BearerError::Unknown => "AuthenticationUnsuccessful".to_owned(),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"Title": "Unauthorized", "Status": 401, "Detail": detail})),
    )
        .into_response()
}

fn bearer_token(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// `GET /connections` (optionally `?authEventId=`).
pub async fn connections(
    Axum(shared): Axum<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let fault = {
        let mut inner = shared.lock();
        inner.state.counters.connections_calls += 1;
        inner.faults.fate(Endpoint::Connections)
    };
    if let Some(resp) = pre_fault(&shared, fault).await {
        return resp;
    }
    let resp = {
        let mut inner = shared.lock();
        let now = now_ms();
        match inner.state.bearer_counted(bearer_token(&headers), now) {
            Err(e) => unauthorized(e),
            Ok(who) => match inner.limiter.admit_app(&who.client_id, now) {
                Err(limited) => {
                    inner.state.counters.rate_limited += 1;
                    rate_limited(limited)
                }
                Ok(remaining) => {
                    let mut list = inner.state.connections(&who.user_id);
                    if let Some(event) = q.get("authEventId") {
                        list.retain(|c| &c.auth_event_id == event);
                    }
                    let mut resp = Json(list).into_response();
                    remaining_headers(&mut resp, remaining);
                    resp
                }
            },
        }
    };
    finish(fault, resp).await
}

/// `DELETE /connections/{id}`: 204, or 404 if unknown.
pub async fn disconnect(
    Axum(shared): Axum<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let mut inner = shared.lock();
    match inner.state.bearer_counted(bearer_token(&headers), now_ms()) {
        Err(e) => unauthorized(e),
        Ok(who) if inner.state.disconnect(&who.user_id, &id) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /api.xro/2.0/Organisation`: one tenant API call, with Xero's per-tenant rate limits.
pub async fn organisation(Axum(shared): Axum<Shared>, headers: HeaderMap) -> Response {
    let fault = {
        let mut inner = shared.lock();
        inner.state.counters.api_calls += 1;
        inner.faults.fate(Endpoint::Api)
    };
    if let Some(resp) = pre_fault(&shared, fault).await {
        return resp;
    }
    let tenant = headers
        .get("xero-tenant-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let admitted = {
        let mut inner = shared.lock();
        let now = now_ms();
        match inner.state.bearer_counted(bearer_token(&headers), now) {
            Err(e) => Err(unauthorized(e)),
            Ok(_) if tenant.is_empty() => Err((
                StatusCode::BAD_REQUEST,
                Json(json!({"Title": "Bad Request", "Status": 400, "Detail": "xero-tenant-id header is required"})),
            )
                .into_response()),
            Ok(who) if !inner.state.has_tenant(&who.user_id, &tenant) => Err((
                StatusCode::FORBIDDEN,
                Json(json!({"Title": "Forbidden", "Status": 403, "Detail": "AuthenticationUnsuccessful"})),
            )
                .into_response()),
            Ok(who) => match inner.limiter.admit_tenant(&who.client_id, &tenant, now) {
                Err(limited) => {
                    inner.state.counters.rate_limited += 1;
                    Err(rate_limited(limited))
                }
                Ok(remaining) => Ok((who, remaining)),
            },
        }
    };
    let (who, remaining) = match admitted {
        Ok(ok) => ok,
        Err(resp) => return finish(fault, resp).await,
    };
    let name = shared
        .lock()
        .state
        .connections(&who.user_id)
        .into_iter()
        .find(|c| c.tenant_id == tenant)
        .map(|c| c.tenant_name)
        .unwrap_or_default();
    let mut resp =
        Json(json!({"Organisations": [{"OrganisationID": tenant, "Name": name}]})).into_response();
    remaining_headers(&mut resp, remaining);
    // Latency applies while the call is in flight, so the concurrency limit can bite.
    let resp = finish(fault, resp).await;
    shared.lock().limiter.leave(&who.client_id, &tenant);
    resp
}

/// `GET /.well-known/openid-configuration`, pointing at this emulator.
pub async fn discovery(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    let base = format!("http://{host}");
    Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/identity/connect/authorize"),
        "token_endpoint": format!("{base}/connect/token"),
        "revocation_endpoint": format!("{base}/connect/revocation"),
        "jwks_uri": format!("{base}/.well-known/openid-configuration/jwks"),
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_short_stable_and_do_not_contain_the_token() {
        let token = "0123456789abcdef0123456789abcdef";
        let fp = fingerprint(token);
        assert_eq!(fp.len(), 8);
        assert_eq!(fp, fingerprint(token));
        assert!(!token.contains(&fp));
    }

    #[test]
    fn client_auth_from_basic_header_or_form() {
        let mut headers = HeaderMap::new();
        let form: HashMap<String, String> = [
            ("client_id".to_owned(), "id".to_owned()),
            ("client_secret".to_owned(), "s".to_owned()),
        ]
        .into();
        assert_eq!(
            client_credentials(&headers, &form),
            Some(("id".into(), "s".into(), false))
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("app:secret:with:colons");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {basic}")).expect("hv"),
        );
        assert_eq!(
            client_credentials(&headers, &HashMap::new()),
            Some(("app".into(), "secret:with:colons".into(), true))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(client_credentials(&headers, &form), None);
    }
}
