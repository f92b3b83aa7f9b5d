//! The client of Xero's identity endpoints (token, revocation) and `/connections`, and the
//! classification of every answer into something a caller can act on: a usable token set, or an
//! error that says whether to retry, wait, or ask a person to authorise again.
//!
//! Classification is pure ([`classify_token_answer`]) and unit-tested; the HTTP calls wrap it.

use std::time::Duration;

use serde::Deserialize;

use crate::redact::Sensitive;

/// Time allowed for one call to Xero: a refresh normally answers in well under a second; ten
/// seconds rides out a slow network without holding a refresh lease for long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest access-token lifetime believed, in an answer or in a stored `expires_at`: Xero's
/// is 30 minutes; four times that leaves room for change while refusing nonsense such as a year.
pub const MAX_EXPIRES_IN: u64 = 2 * 3600;

/// What Xero's endpoints are, and the app's credentials.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub token_url: String,
    pub connections_url: String,
    pub revocation_url: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            token_url: crate::crd::XERO_TOKEN_URL.to_owned(),
            connections_url: crate::crd::XERO_CONNECTIONS_URL.to_owned(),
            revocation_url: crate::crd::XERO_REVOCATION_URL.to_owned(),
        }
    }
}

/// An app's OAuth client credentials.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: Sensitive,
}

/// A token set Xero issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSet {
    pub access_token: Sensitive,
    /// Absent for the client-credentials grant.
    pub refresh_token: Option<Sensitive>,
    /// Seconds the access token lives, as Xero said.
    pub expires_in: u64,
    pub token_type: String,
    pub scope: String,
}

impl TokenSet {
    /// When the access token expires: `expires_in` from `now`, or the JWT's own `exp` if that is
    /// earlier (a grace-period replay may hand back an access token issued minutes ago).
    pub fn expires_at(&self, now: std::time::SystemTime) -> std::time::SystemTime {
        let by_expires_in = now + Duration::from_secs(self.expires_in);
        match jwt_expiry(self.access_token.expose()) {
            Some(exp) if exp < by_expires_in => exp,
            _ => by_expires_in,
        }
    }
}

/// `BASE64URL(SHA256(verifier))`, the S256 PKCE challenge of the authorization-code flow
/// (RFC 7636).
pub fn pkce_challenge(verifier: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The claims of a JWT (Xero's access tokens are JWTs), unverified: only for deciding when to
/// look again, never for trust. `None` for anything else.
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `authentication_event_id` claim of a Xero access token: the same for every refresh of
/// one authorisation, new with each authorisation. `None` when the token has none (a Custom
/// Connection's may not have one) or is not a JWT.
pub fn jwt_authentication_event(token: &str) -> Option<String> {
    let event = jwt_claims(token)?
        .get("authentication_event_id")?
        .as_str()?
        .to_owned();
    // Text from the token, kept in the status: bounded and printable.
    Some(crate::text::sanitize(
        &event,
        crate::text::MAX_IDENTITY_CHARS,
    ))
}

/// The `exp` claim of a JWT (Xero's access tokens are JWTs); `None` for anything else.
pub fn jwt_expiry(token: &str) -> Option<std::time::SystemTime> {
    let exp = jwt_claims(token)?.get("exp")?.as_u64()?;
    // A crafted `exp` must not overflow the clock arithmetic.
    std::time::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// Why a call to Xero did not produce a usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XeroError {
    /// `invalid_grant`: the refresh token (or code) is expired, revoked, or was used after its
    /// grace period. Not retryable with the same token.
    #[error("Xero refused the grant (invalid_grant){}", describe(.0))]
    InvalidGrant(Option<String>),
    /// `invalid_client`: the client id or secret is wrong. Not retryable until the app's
    /// credentials change.
    #[error("Xero refused the client credentials (invalid_client)")]
    InvalidClient,
    /// Another OAuth error code (`unauthorized_client`, `unsupported_grant_type`, …).
    #[error("Xero refused the request ({code}){}", describe(.description))]
    OAuth {
        code: String,
        description: Option<String>,
    },
    /// 429: wait `retry_after` before the next call.
    #[error("Xero rate limit hit ({problem}); retry after {retry_after:?}")]
    RateLimited {
        retry_after: Duration,
        problem: String,
    },
    /// 5xx: Xero is failing; retry with backoff.
    #[error("Xero answered HTTP {0}")]
    Unavailable(u16),
    /// No answer: a timeout or a cut connection. Xero may have processed the request.
    #[error("no answer from Xero: {0}")]
    Transport(String),
    /// Xero could not be reached at all (the connection was refused, the name did not
    /// resolve): the request never left, so it cannot have been processed, and trying again at
    /// once is pointless.
    #[error("Xero could not be reached: {0}")]
    Unreachable(String),
    /// An answer that is not a usable token response (HTML, truncated JSON, missing fields,
    /// nonsense expiry). Xero may have processed the request. `refresh_token` is whatever new
    /// refresh token the answer did carry, so it is never lost.
    #[error("Xero's answer was unusable: {reason}")]
    Malformed {
        reason: String,
        refresh_token: Option<Sensitive>,
    },
}

fn describe(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl XeroError {
    /// Whether the same request may be sent again (after a backoff).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::RateLimited { .. }
            | Self::Unavailable(_)
            | Self::Transport(_)
            | Self::Unreachable(_)
            | Self::Malformed { .. } => true,
            // The two OAuth codes that say "later" (RFC 6749 §4.1.2.1, RFC 8628 §3.5).
            Self::OAuth { code, .. } => {
                code.eq_ignore_ascii_case("temporarily_unavailable")
                    || code.eq_ignore_ascii_case("slow_down")
            }
            Self::InvalidGrant(_) | Self::InvalidClient => false,
        }
    }

    /// Whether Xero may have acted on the request although no usable answer came back: the case
    /// Xero's refresh-token grace period exists for.
    pub fn may_have_been_processed(&self) -> bool {
        matches!(self, Self::Transport(_) | Self::Malformed { .. })
    }
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    token_type: Option<String>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Turns a token-endpoint answer into a token set or a classified error.
pub fn classify_token_answer(
    status: u16,
    retry_after: Option<&str>,
    rate_limit_problem: Option<&str>,
    body: &[u8],
) -> Result<TokenSet, XeroError> {
    match status {
        200 => parse_token(body),
        429 => Err(XeroError::RateLimited {
            retry_after: parse_retry_after(retry_after),
            problem: rate_limit_problem
                .unwrap_or("unspecified")
                .to_ascii_lowercase(),
        }),
        500..=599 => Err(XeroError::Unavailable(status)),
        _ => {
            let raw: Option<RawError> = serde_json::from_slice(body).ok();
            let (code, description) = raw
                .map(|r| (r.error, r.error_description))
                .unwrap_or_default();
            match code.as_deref() {
                Some("invalid_grant") => Err(XeroError::InvalidGrant(description)),
                Some("invalid_client") => Err(XeroError::InvalidClient),
                Some(code) => Err(XeroError::OAuth {
                    code: code.to_owned(),
                    description,
                }),
                None if status == 401 => Err(XeroError::InvalidClient),
                None => Err(XeroError::Malformed {
                    reason: format!("HTTP {status} without an OAuth error code"),
                    refresh_token: None,
                }),
            }
        }
    }
}

/// `Retry-After` in seconds (Xero sends seconds); a missing or odd value waits a minute, the
/// length of Xero's shortest window.
fn parse_retry_after(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(60), |s| {
            Duration::from_secs(s.clamp(1, 24 * 3600))
        })
}

fn parse_token(body: &[u8]) -> Result<TokenSet, XeroError> {
    let raw: RawToken = serde_json::from_slice(body).map_err(|e| XeroError::Malformed {
        // Only the category and position: serde_json's message may quote the value.
        reason: format!(
            "not a JSON token response ({:?} error at column {})",
            e.classify(),
            e.column()
        ),
        refresh_token: None,
    })?;
    let refresh_token = raw
        .refresh_token
        .filter(|t| !t.is_empty())
        .map(Sensitive::from);
    let malformed = |reason: String| XeroError::Malformed {
        reason,
        refresh_token: refresh_token.clone(),
    };
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| malformed("no access_token".into()))?;
    let expires_in = match &raw.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| malformed("no numeric expires_in".into()))?;
    if !(1..=MAX_EXPIRES_IN).contains(&expires_in) {
        return Err(malformed(format!(
            "expires_in of {expires_in} s is outside 1..={MAX_EXPIRES_IN}"
        )));
    }
    let token_type = raw.token_type.unwrap_or_else(|| "Bearer".to_owned());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(malformed(format!(
            "token_type {token_type:?} is not Bearer"
        )));
    }
    Ok(TokenSet {
        access_token: Sensitive::from(access_token),
        refresh_token,
        expires_in,
        token_type: "Bearer".to_owned(),
        scope: raw.scope.unwrap_or_default(),
    })
}

/// A tenant from `/connections`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct XeroTenant {
    pub id: String,
    pub tenant_id: String,
    #[serde(default)]
    pub tenant_type: Option<String>,
    #[serde(default)]
    pub tenant_name: Option<String>,
    #[serde(default)]
    pub auth_event_id: Option<String>,
}

/// A new HTTP client for Xero's endpoints. Building one loads the TLS roots and starts a
/// connection pool, so a process builds it once and shares it (it is cheap to clone).
/// Resolves a host name with dots as an absolute name (a trailing dot), so the resolver's search
/// domains never apply: in a pod (`ndots:5`) `identity.xero.com` would first be tried as
/// `identity.xero.com.<namespace>.svc.cluster.local` and so on — names that whoever controls
/// those namespaces can answer — before the real one. The allowlist names hosts; this makes the
/// name looked up the name allowed. `localhost` and single-label names (which only mean
/// something through the search domains, as an admin who allows one intends) resolve as given.
struct AbsoluteNames;

/// The name to look up for `host`.
fn lookup_name(host: &str) -> String {
    let host = host.trim_end_matches('.');
    if !host.contains('.') || host.eq_ignore_ascii_case("localhost") {
        host.to_owned()
    } else {
        format!("{host}.")
    }
}

impl reqwest::dns::Resolve for AbsoluteNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let lookup = lookup_name(name.as_str());
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((lookup.as_str(), 0)).await?;
            let addrs: Vec<std::net::SocketAddr> = addrs.collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub fn new_http() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(concat!("xero-operator/", env!("CARGO_PKG_VERSION")))
        // Never follow a redirect: a 307/308 would send the form (refresh token, client
        // secret) again to a host the endpoint allowlist never checked. Xero's token endpoint
        // does not redirect; an answer that does counts as unusable.
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(std::sync::Arc::new(AbsoluteNames))
        .build()
        .expect("a client with rustls always builds")
}

/// The HTTP client of Xero's endpoints.
#[derive(Clone)]
pub struct XeroClient {
    http: reqwest::Client,
    /// Every request gives up after this long.
    timeout: Duration,
    pub endpoints: Endpoints,
}

impl XeroClient {
    /// A client with its own HTTP connection pool (one-off calls).
    pub fn new(endpoints: Endpoints) -> Self {
        Self::with_http(new_http(), endpoints, REQUEST_TIMEOUT)
    }

    /// A client on a shared HTTP client (see [`new_http`]) whose every request gives up after
    /// `timeout`.
    pub fn with_http(http: reqwest::Client, endpoints: Endpoints, timeout: Duration) -> Self {
        Self {
            http,
            timeout,
            endpoints,
        }
    }

    async fn token_request(
        &self,
        app: &ClientCredentials,
        form: &[(&str, &str)],
    ) -> Result<TokenSet, XeroError> {
        let resp = self
            .http
            .post(&self.endpoints.token_url)
            .timeout(self.timeout)
            .basic_auth(&app.client_id, Some(app.client_secret.expose()))
            .form(form)
            .send()
            .await
            .map_err(|e| no_answer(&e))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (retry_after, problem) = (header("retry-after"), header("x-rate-limit-problem"));
        let body = resp
            .bytes()
            .await
            .map_err(|e| XeroError::Transport(transport_reason(&e)))?;
        classify_token_answer(status, retry_after.as_deref(), problem.as_deref(), &body)
    }

    /// The `refresh_token` grant.
    pub async fn refresh(
        &self,
        app: &ClientCredentials,
        refresh_token: &Sensitive,
    ) -> Result<TokenSet, XeroError> {
        self.token_request(
            app,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose()),
            ],
        )
        .await
    }

    /// The `client_credentials` grant (Xero Custom Connections).
    pub async fn client_credentials(
        &self,
        app: &ClientCredentials,
        scopes: &[String],
    ) -> Result<TokenSet, XeroError> {
        let scope = scopes.join(" ");
        let mut form = vec![("grant_type", "client_credentials")];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        self.token_request(app, &form).await
    }

    /// The `authorization_code` grant with a PKCE verifier.
    pub async fn exchange_code(
        &self,
        app: &ClientCredentials,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<TokenSet, XeroError> {
        self.token_request(
            app,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", verifier),
            ],
        )
        .await
    }

    /// `GET /connections`: the tenants the access token reaches.
    pub async fn connections(
        &self,
        access_token: &Sensitive,
    ) -> Result<Vec<XeroTenant>, XeroError> {
        let resp = self
            .http
            .get(&self.endpoints.connections_url)
            .timeout(self.timeout)
            .bearer_auth(access_token.expose())
            .send()
            .await
            .map_err(|e| no_answer(&e))?;
        let status = resp.status().as_u16();
        match status {
            200 => resp.json().await.map_err(|e| XeroError::Malformed {
                reason: format!("connections answer: {}", transport_reason(&e)),
                refresh_token: None,
            }),
            429 => Err(XeroError::RateLimited {
                retry_after: parse_retry_after(
                    resp.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()),
                ),
                problem: "connections".into(),
            }),
            500..=599 => Err(XeroError::Unavailable(status)),
            _ => Err(XeroError::OAuth {
                code: format!("http_{status}"),
                description: None,
            }),
        }
    }

    /// `POST /connect/revocation` of a refresh token.
    pub async fn revoke(
        &self,
        app: &ClientCredentials,
        refresh_token: &Sensitive,
    ) -> Result<(), XeroError> {
        let resp = self
            .http
            .post(&self.endpoints.revocation_url)
            .timeout(self.timeout)
            .basic_auth(&app.client_id, Some(app.client_secret.expose()))
            .form(&[("token", refresh_token.expose())])
            .send()
            .await
            .map_err(|e| no_answer(&e))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
        classify_token_answer(status, None, None, &body).map(drop)
    }
}

/// A request that got no answer: [`XeroError::Unreachable`] when it never left (no connection
/// could be made), else [`XeroError::Transport`].
fn no_answer(e: &reqwest::Error) -> XeroError {
    if e.is_connect() && !e.is_timeout() {
        XeroError::Unreachable(transport_reason(e))
    } else {
        XeroError::Transport(transport_reason(e))
    }
}

/// A description of a transport failure that never includes the request (whose form carries the
/// refresh token): reqwest's own messages may include the URL, which carries no secret here.
fn transport_reason(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "answer cut off or unreadable"
    } else {
        "request failed"
    };
    match e.url() {
        Some(url) => format!("{kind} ({})", url.as_str()),
        None => kind.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pkce_matches_the_rfc7636_example() {
        // RFC 7636, appendix B.
        assert_eq!(
            super::pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    use super::*;

    fn ok(body: &str) -> Result<TokenSet, XeroError> {
        classify_token_answer(200, None, None, body.as_bytes())
    }

    #[test]
    fn host_names_with_dots_are_looked_up_as_absolute_names() {
        assert_eq!(lookup_name("identity.xero.com"), "identity.xero.com.");
        assert_eq!(lookup_name("identity.xero.com."), "identity.xero.com.");
        assert_eq!(lookup_name("localhost"), "localhost");
        assert_eq!(lookup_name("egress-proxy"), "egress-proxy");
    }

    #[test]
    fn a_full_answer_is_a_token_set() {
        let t = ok(r#"{"access_token":"at","refresh_token":"rt","expires_in":1800,"token_type":"Bearer","scope":"offline_access"}"#)
            .expect("token set");
        assert_eq!(t.access_token.expose(), "at");
        assert_eq!(t.refresh_token.as_ref().map(Sensitive::expose), Some("rt"));
        assert_eq!(t.expires_in, 1800);
    }

    #[test]
    fn client_credentials_answers_have_no_refresh_token() {
        let t =
            ok(r#"{"access_token":"at","expires_in":"1800","token_type":"bearer"}"#).expect("ok");
        assert!(t.refresh_token.is_none());
        assert_eq!(t.token_type, "Bearer");
    }

    #[test]
    fn unusable_answers_are_malformed_and_keep_any_new_refresh_token() {
        for (body, why) in [
            ("<html>maintenance</html>", "not a JSON token response"),
            (r#"{"access_token":"eyJ"#, "not a JSON token response"),
            (
                r#"{"refresh_token":"rt2","expires_in":1800}"#,
                "no access_token",
            ),
            (
                r#"{"access_token":"at","refresh_token":"rt2"}"#,
                "no numeric expires_in",
            ),
            (
                r#"{"access_token":"at","refresh_token":"rt2","expires_in":0}"#,
                "expires_in of 0 s",
            ),
            (
                r#"{"access_token":"at","refresh_token":"rt2","expires_in":31536000}"#,
                "expires_in of 31536000 s",
            ),
            (
                r#"{"access_token":"at","refresh_token":"rt2","expires_in":60,"token_type":"MAC"}"#,
                "not Bearer",
            ),
        ] {
            match ok(body) {
                Err(XeroError::Malformed {
                    reason,
                    refresh_token,
                }) => {
                    assert!(reason.contains(why), "{body}: {reason}");
                    if body.contains("rt2") {
                        assert_eq!(
                            refresh_token.as_ref().map(Sensitive::expose),
                            Some("rt2"),
                            "{body}"
                        );
                    }
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn oauth_errors_are_classified() {
        let err = |status, body: &str| {
            classify_token_answer(status, None, None, body.as_bytes()).expect_err("error")
        };
        assert_eq!(
            err(400, r#"{"error":"invalid_grant"}"#),
            XeroError::InvalidGrant(None)
        );
        assert_eq!(
            err(
                400,
                r#"{"error":"invalid_grant","error_description":"expired"}"#
            ),
            XeroError::InvalidGrant(Some("expired".into()))
        );
        assert_eq!(
            err(401, r#"{"error":"invalid_client"}"#),
            XeroError::InvalidClient
        );
        assert_eq!(
            err(400, r#"{"error":"invalid_client"}"#),
            XeroError::InvalidClient
        );
        assert_eq!(err(401, "Unauthorized"), XeroError::InvalidClient);
        assert!(
            matches!(err(400, r#"{"error":"unsupported_grant_type"}"#), XeroError::OAuth { code, .. } if code == "unsupported_grant_type")
        );
        assert!(matches!(err(404, "<html>"), XeroError::Malformed { .. }));
        assert_eq!(err(503, ""), XeroError::Unavailable(503));
        // Statuses section 5 does not name (P63): a redirect or a 4xx without an OAuth code is
        // an unusable answer (retried, then backed off), never a stop; a code decides
        // whatever the status, exactly as written.
        assert!(matches!(err(302, ""), XeroError::Malformed { .. }));
        assert!(matches!(err(403, "Forbidden"), XeroError::Malformed { .. }));
        assert!(matches!(err(204, ""), XeroError::Malformed { .. }));
        assert!(
            matches!(err(400, r#"{"error":"INVALID_GRANT"}"#), XeroError::OAuth { code, .. } if code == "INVALID_GRANT")
        );
        assert!(err(400, r#"{"error":"Temporarily_Unavailable"}"#).is_retryable());
    }

    #[test]
    fn a_refresh_answer_without_a_refresh_token_keeps_the_stored_one() {
        // P62: the server did not rotate it; the token set carries none, and the store leaves
        // the stored one as it is (`format::token_patch` writes no `refresh_token` then).
        let set = classify_token_answer(
            200,
            None,
            None,
            br#"{"access_token":"at","expires_in":1800,"token_type":"Bearer"}"#,
        )
        .expect("a usable answer");
        assert_eq!(set.refresh_token, None);
        let patch = crate::protocol::format::token_patch(
            "7",
            &set,
            std::time::SystemTime::UNIX_EPOCH,
            "me",
            std::time::SystemTime::UNIX_EPOCH,
            1,
        );
        assert!(patch["data"].get("refresh_token").is_none(), "{patch}");
    }

    #[test]
    fn rate_limits_carry_retry_after() {
        let e = classify_token_answer(429, Some("17"), Some("AppMinute"), b"").expect_err("429");
        assert_eq!(
            e,
            XeroError::RateLimited {
                retry_after: Duration::from_secs(17),
                problem: "appminute".into()
            }
        );
        let e = classify_token_answer(429, Some("soon"), None, b"").expect_err("429");
        assert!(
            matches!(e, XeroError::RateLimited { retry_after, .. } if retry_after == Duration::from_secs(60))
        );
    }

    #[test]
    fn retryability_follows_the_error_kind() {
        let oauth = |code: &str| XeroError::OAuth {
            code: code.into(),
            description: None,
        };
        let malformed = || XeroError::Malformed {
            reason: "html".into(),
            refresh_token: None,
        };
        let rate_limited = || XeroError::RateLimited {
            retry_after: Duration::from_secs(1),
            problem: "minute".into(),
        };
        // (error, retrying may help, Xero may have acted on it)
        let table = [
            (XeroError::InvalidGrant(None), false, false),
            (XeroError::InvalidClient, false, false),
            (oauth("invalid_request"), false, false),
            (oauth("unauthorized_client"), false, false),
            (oauth("unsupported_grant_type"), false, false),
            (oauth("invalid_scope"), false, false),
            (oauth("some_new_code"), false, false),
            (oauth("temporarily_unavailable"), true, false),
            (oauth("SLOW_DOWN"), true, false),
            (rate_limited(), true, false),
            (XeroError::Unavailable(500), true, false),
            (XeroError::Unavailable(503), true, false),
            (XeroError::Transport("reset".into()), true, true),
            (XeroError::Unreachable("refused".into()), true, false),
            (malformed(), true, true),
        ];
        for (e, retryable, processed) in table {
            assert_eq!(
                (e.is_retryable(), e.may_have_been_processed()),
                (retryable, processed),
                "{e:?}"
            );
        }
    }

    #[test]
    fn expiry_is_the_earlier_of_expires_in_and_the_jwt_exp() {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000);
        let jwt = |exp: u64| {
            format!(
                "{}.{}.sig",
                b64(serde_json::json!({"alg":"RS256"})),
                b64(serde_json::json!({"exp": exp}))
            )
        };
        let set = |token: String| TokenSet {
            access_token: Sensitive::new(token),
            refresh_token: None,
            expires_in: 1800,
            token_type: "Bearer".into(),
            scope: String::new(),
        };
        // A replayed token issued 20 minutes ago: its own exp wins.
        assert_eq!(
            set(jwt(1_600)).expires_at(now),
            std::time::UNIX_EPOCH + Duration::from_secs(1_600)
        );
        // A fresh one: expires_in (the exp is later only by rounding).
        assert_eq!(
            set(jwt(5_000)).expires_at(now),
            now + Duration::from_secs(1800)
        );
        // Not a JWT: expires_in.
        assert_eq!(
            set("opaque".into()).expires_at(now),
            now + Duration::from_secs(1800)
        );
        assert_eq!(jwt_expiry("a.!!.c"), None);
    }

    #[test]
    fn errors_never_print_tokens() {
        let e = XeroError::Malformed {
            reason: "no access_token".into(),
            refresh_token: Some(Sensitive::new("rt-secret-value")),
        };
        assert!(!format!("{e} {e:?}").contains("rt-secret-value"));
    }
}
