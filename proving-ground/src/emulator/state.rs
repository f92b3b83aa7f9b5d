//! The emulated Xero identity state: apps, users, tenants, refresh-token families, access tokens
//! and authorization codes, with the rules Xero applies to them (`docs/xero-facts.md`).
//!
//! Pure logic: every operation takes the current time (`now`, Unix milliseconds) and touches no
//! I/O, so each rule is unit-tested here. The HTTP layer (`routes.rs`) only parses and formats.
//!
//! A *family* is the chain of refresh tokens that descends from one authorisation: each use
//! rotates the token. The family's report says whether the chain stayed whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::jwt::Signer;
use xero_operator::xero::pkce_challenge;

/// Unix time in milliseconds.
pub type Millis = u64;

/// Token lifetimes. Xero's defaults; tests shorten them to live through many expiries quickly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetimes {
    /// Access tokens: 30 minutes at Xero.
    #[serde(with = "humantime_serde_compat")]
    pub access_token: Duration,
    /// An unused refresh token expires after 60 days at Xero.
    #[serde(with = "humantime_serde_compat")]
    pub refresh_token: Duration,
    /// A used refresh token stays usable this long (30 minutes at Xero), for lost responses.
    #[serde(with = "humantime_serde_compat")]
    pub grace: Duration,
    /// Authorization codes (Xero: 5 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub auth_code: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            access_token: Duration::from_secs(30 * 60),
            refresh_token: Duration::from_secs(60 * 24 * 3600),
            grace: Duration::from_secs(30 * 60),
            auth_code: Duration::from_secs(5 * 60),
        }
    }
}

/// Durations in JSON as humantime strings ("2s", "30m", "60days").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// What a second use of a refresh token inside its grace period returns. Xero does not document
/// it, so both are emulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GraceReuse {
    /// The same new pair as the first use.
    #[default]
    SamePair,
    /// A new pair: the chain forks, both successors stay valid.
    Fork,
}

/// What happens when a superseded refresh token is used after its grace period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReuseDetection {
    /// The whole family is revoked (OAuth 2.0 security BCP reuse detection): the chain breaks.
    #[default]
    RevokeFamily,
    /// Only that request is refused; the newest token keeps working.
    RejectOnly,
}

/// How the emulated identity server behaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behaviour {
    pub lifetimes: Lifetimes,
    pub grace_reuse: GraceReuse,
    pub reuse_detection: ReuseDetection,
}

/// An OAuth error, as Xero answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthError {
    /// 400 `invalid_grant`: refresh token or code unknown, expired, revoked or reused too late.
    InvalidGrant(&'static str),
    /// `invalid_client`: unknown client id or wrong secret.
    InvalidClient,
    /// 400 `unsupported_grant_type`.
    UnsupportedGrantType,
    /// 400 `unauthorized_client`: the client may not use this grant.
    UnauthorizedClient(&'static str),
    /// 400 `invalid_request`: a parameter is missing or malformed.
    InvalidRequest(&'static str),
}

impl OAuthError {
    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidGrant(_) => "invalid_grant",
            Self::InvalidClient => "invalid_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::UnauthorizedClient(_) => "unauthorized_client",
            Self::InvalidRequest(_) => "invalid_request",
        }
    }

    /// The `error_description`, if any.
    pub fn description(&self) -> Option<&'static str> {
        match self {
            Self::InvalidGrant(d) | Self::UnauthorizedClient(d) | Self::InvalidRequest(d) => {
                Some(d)
            }
            Self::InvalidClient | Self::UnsupportedGrantType => None,
        }
    }
}

/// A successful token response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    pub expires_in: u64,
    pub token_type: String,
    pub scope: String,
}

/// A tenant (organisation) connected for a user, as `/connections` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub id: String,
    pub auth_event_id: String,
    pub tenant_id: String,
    pub tenant_type: String,
    pub tenant_name: String,
    pub created_date_utc: String,
    pub updated_date_utc: String,
}

/// A tenant to seed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantSeed {
    pub tenant_name: String,
    #[serde(default = "organisation")]
    pub tenant_type: String,
}

fn organisation() -> String {
    "ORGANISATION".to_owned()
}

/// Why a family ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FamilyEnd {
    /// Revoked on purpose at the revocation endpoint.
    Revoked,
    /// Revoked because a superseded token was used after its grace period.
    ReuseDetected,
}

/// The chain report of one refresh-token family.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReport {
    pub family: String,
    pub user_id: String,
    pub client_id: String,
    /// Tokens issued in this family, the first one included.
    pub issued: u64,
    /// First uses of a token (each issues its successor).
    pub rotations: u64,
    /// Second or later uses of a token inside its grace period.
    pub grace_reuses: u64,
    /// Grace reuses that issued a second successor (only with `GraceReuse::Fork`).
    pub forks: u64,
    /// Uses of a superseded token after its grace period.
    pub dead_token_uses: u64,
    /// `invalid_grant` answers for a token that was one of the family's newest (unused) tokens.
    pub head_rejections: u64,
    /// Tokens issued and never used (1 for a healthy chain; more after forks).
    pub unused_heads: u64,
    /// How the family ended, if it did.
    pub ended: Option<FamilyEnd>,
    /// True when the chain broke: reuse detection revoked it, or its newest token was refused.
    pub broken: bool,
}

/// How many token-call times [`Counters::recent_token_calls_ms`] keeps.
pub const RECENT_TOKEN_CALLS: usize = 1024;

/// Counters of calls, for the admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Every request to the token endpoint, answered or not.
    pub token_calls: u64,
    pub token_calls_by_grant: BTreeMap<String, u64>,
    pub token_calls_by_client: BTreeMap<String, u64>,
    /// Refresh-grant calls by the family of the refresh token presented.
    pub token_calls_by_family: BTreeMap<String, u64>,
    /// Token-endpoint answers by outcome: `ok`, an OAuth error code, `rate_limited`, `fault`.
    pub token_outcomes: BTreeMap<String, u64>,
    pub connections_calls: u64,
    pub api_calls: u64,
    pub revocation_calls: u64,
    pub rate_limited: u64,
    pub faults_injected: u64,
    /// Token-endpoint requests per Unix second (to check calls per minute against a cap).
    pub token_calls_by_second: BTreeMap<u64, u64>,
    /// When the latest token-endpoint requests came (Unix ms; the last
    /// [`RECENT_TOKEN_CALLS`]): the benchmark's critical path of a rotation.
    #[serde(default)]
    pub recent_token_calls_ms: std::collections::VecDeque<u64>,
    /// Token-endpoint requests by how the client authenticated: `basic` (HTTP Basic), `form`
    /// (client_id/client_secret in the body) or `none`.
    pub token_calls_by_client_auth: BTreeMap<String, u64>,
    /// Client-credentials requests by the `scope` parameter sent (`(none)` when absent).
    pub client_credentials_scopes: BTreeMap<String, u64>,
    /// Access tokens presented to the API endpoints, by outcome: `ok`, `expired` (a consumer
    /// used a token past its expiry) or `unknown`.
    #[serde(default)]
    pub bearer_outcomes: BTreeMap<String, u64>,
}

impl Counters {
    /// The latest token-endpoint request times (Unix ms), oldest first.
    pub fn token_call_times_ms(&self) -> Vec<u64> {
        self.recent_token_calls_ms.iter().copied().collect()
    }
}

struct Client {
    secret: String,
    /// For Custom Connections: the user whose tenants a client-credentials token reaches.
    custom_connection_user: Option<String>,
}

struct User {
    client_id: String,
    scopes: Vec<String>,
    connections: Vec<Connection>,
    auth_event_id: String,
}

struct RefreshToken {
    family: String,
    client_id: String,
    issued: Millis,
    used: Option<Millis>,
    /// The response of the first use, replayed by `GraceReuse::SamePair`.
    first_answer: Option<TokenResponse>,
}

struct Family {
    user_id: String,
    client_id: String,
    report: ChainReport,
    heads: BTreeSet<String>,
}

struct AccessToken {
    user_id: String,
    client_id: String,
    expires: Millis,
}

struct AuthCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    user_id: String,
    scope: String,
    expires: Millis,
    used: bool,
}

/// Who a valid access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bearer {
    pub user_id: String,
    pub client_id: String,
}

/// Why an access token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BearerError {
    /// Expired at this instant: Xero's `TokenExpired` 401.
    Expired(Millis),
    /// Not a token this server issued.
    Unknown,
}

/// The whole emulated identity state.
pub struct State {
    pub behaviour: Behaviour,
    pub counters: Counters,
    signer: Signer,
    clients: HashMap<String, Client>,
    users: BTreeMap<String, User>,
    refresh_tokens: HashMap<String, RefreshToken>,
    families: BTreeMap<String, Family>,
    access_tokens: HashMap<String, AccessToken>,
    codes: HashMap<String, AuthCode>,
    /// The first client registered: the default for seeding users.
    first_client: Option<String>,
    next_id: u64,
}

/// A random opaque token: 256 bits, hex. The emulator is a test tool, so `fastrand` is enough.
fn random_token() -> String {
    (0..4)
        .map(|_| format!("{:016x}", fastrand::u64(..)))
        .collect()
}

/// A random UUID-shaped id (version 4 layout), like Xero's ids.
fn random_uuid() -> String {
    let a = fastrand::u128(..);
    let h = format!("{a:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// RFC 3339 UTC of a Unix-millisecond instant.
pub fn rfc3339(ms: Millis) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ms(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            counters: Counters::default(),
            signer: Signer::generate(),
            clients: HashMap::new(),
            users: BTreeMap::new(),
            refresh_tokens: HashMap::new(),
            families: BTreeMap::new(),
            access_tokens: HashMap::new(),
            codes: HashMap::new(),
            first_client: None,
            next_id: 1,
        }
    }

    /// The JWKS of the access-token signing key.
    pub fn jwks(&self) -> serde_json::Value {
        self.signer.jwks()
    }

    /// Forgets every token, user, family and counter; keeps clients, behaviour and the key.
    pub fn reset(&mut self) {
        self.counters = Counters::default();
        self.users.clear();
        self.refresh_tokens.clear();
        self.families.clear();
        self.access_tokens.clear();
        self.codes.clear();
        for client in self.clients.values_mut() {
            client.custom_connection_user = None;
        }
    }

    /// Registers (or replaces) an app's client credentials.
    pub fn add_client(&mut self, client_id: &str, secret: &str) {
        self.first_client
            .get_or_insert_with(|| client_id.to_owned());
        self.clients.insert(
            client_id.to_owned(),
            Client {
                secret: secret.to_owned(),
                custom_connection_user: None,
            },
        );
    }

    /// The first client registered.
    pub fn first_client(&self) -> Option<String> {
        self.first_client.clone()
    }

    /// Whether `client_id` is registered.
    pub fn has_client(&self, client_id: &str) -> bool {
        self.clients.contains_key(client_id)
    }

    /// Checks client credentials.
    pub fn authenticate_client(&self, client_id: &str, secret: &str) -> Result<(), OAuthError> {
        match self.clients.get(client_id) {
            Some(c) if c.secret == secret => Ok(()),
            _ => Err(OAuthError::InvalidClient),
        }
    }

    /// Adds a user of `client_id` with tenants. Returns the user id.
    pub fn add_user(
        &mut self,
        client_id: &str,
        user_id: Option<String>,
        scopes: Vec<String>,
        tenants: &[TenantSeed],
        now: Millis,
    ) -> String {
        let user_id = user_id.unwrap_or_else(random_uuid);
        let auth_event_id = random_uuid();
        let connections = tenants
            .iter()
            .map(|t| Connection {
                id: random_uuid(),
                auth_event_id: auth_event_id.clone(),
                tenant_id: random_uuid(),
                tenant_type: t.tenant_type.clone(),
                tenant_name: t.tenant_name.clone(),
                created_date_utc: rfc3339(now),
                updated_date_utc: rfc3339(now),
            })
            .collect();
        self.users.insert(
            user_id.clone(),
            User {
                client_id: client_id.to_owned(),
                scopes,
                connections,
                auth_event_id,
            },
        );
        user_id
    }

    /// Makes `client_id` a Custom Connection to `user_id`'s tenants (client-credentials grant).
    pub fn make_custom_connection(&mut self, client_id: &str, user_id: &str) -> bool {
        match self.clients.get_mut(client_id) {
            Some(c) if self.users.contains_key(user_id) => {
                c.custom_connection_user = Some(user_id.to_owned());
                true
            }
            _ => false,
        }
    }

    /// The user's tenants.
    pub fn connections(&self, user_id: &str) -> Vec<Connection> {
        self.users
            .get(user_id)
            .map(|u| u.connections.clone())
            .unwrap_or_default()
    }

    /// Whether `user_id` has `tenant_id` connected.
    pub fn has_tenant(&self, user_id: &str, tenant_id: &str) -> bool {
        self.users
            .get(user_id)
            .is_some_and(|u| u.connections.iter().any(|c| c.tenant_id == tenant_id))
    }

    /// `DELETE /connections/{id}`: true if it existed.
    pub fn disconnect(&mut self, user_id: &str, connection_id: &str) -> bool {
        let Some(user) = self.users.get_mut(user_id) else {
            return false;
        };
        let before = user.connections.len();
        user.connections.retain(|c| c.id != connection_id);
        before != user.connections.len()
    }

    /// Starts a new refresh-token family for a user (what a person authorising the app does).
    /// Returns the first refresh token.
    pub fn start_family(&mut self, user_id: &str, now: Millis) -> Option<String> {
        let user = self.users.get_mut(user_id)?;
        let client_id = user.client_id.clone();
        // Each authorisation is an authentication event of its own: the access tokens issued
        // from then on and the connections it (re)authorised carry its id. (Simplified: an
        // older family's later tokens carry the new id too.)
        let event = random_uuid();
        for c in &mut user.connections {
            c.auth_event_id = event.clone();
            c.updated_date_utc = rfc3339(now);
        }
        user.auth_event_id = event;
        let family = format!("family-{}", self.next_id);
        self.next_id += 1;
        self.families.insert(
            family.clone(),
            Family {
                user_id: user_id.to_owned(),
                client_id: client_id.clone(),
                report: ChainReport {
                    family: family.clone(),
                    user_id: user_id.to_owned(),
                    client_id,
                    ..ChainReport::default()
                },
                heads: BTreeSet::new(),
            },
        );
        Some(self.issue_refresh_token(&family, now))
    }

    fn issue_refresh_token(&mut self, family: &str, now: Millis) -> String {
        let token = random_token();
        let fam = self.families.get_mut(family).expect("family exists");
        fam.report.issued += 1;
        fam.heads.insert(token.clone());
        self.refresh_tokens.insert(
            token.clone(),
            RefreshToken {
                family: family.to_owned(),
                client_id: fam.client_id.clone(),
                issued: now,
                used: None,
                first_answer: None,
            },
        );
        token
    }

    fn issue_access_token(&mut self, user_id: &str, client_id: &str, now: Millis) -> (String, u64) {
        let lifetime = self.behaviour.lifetimes.access_token;
        let expires = now + ms(lifetime);
        let (scopes, auth_event_id) = self
            .users
            .get(user_id)
            .map(|u| (u.scopes.clone(), u.auth_event_id.clone()))
            .unwrap_or_default();
        let claims = json!({
            "nbf": now / 1000,
            "exp": expires / 1000,
            "iss": "https://identity.xero.com",
            "aud": "https://identity.xero.com/resources",
            "client_id": client_id,
            "sub": user_id,
            "auth_time": now / 1000,
            "xero_userid": user_id,
            "global_session_id": auth_event_id,
            "authentication_event_id": auth_event_id,
            "jti": random_token(),
            "scope": scopes,
        });
        let token = self.signer.sign(&claims);
        self.access_tokens.insert(
            token.clone(),
            AccessToken {
                user_id: user_id.to_owned(),
                client_id: client_id.to_owned(),
                expires,
            },
        );
        // Whole seconds, rounded up so a sub-second test lifetime is not reported as 0.
        (token, lifetime.as_millis().div_ceil(1000) as u64)
    }

    fn scope_of(&self, user_id: &str) -> String {
        self.users
            .get(user_id)
            .map(|u| u.scopes.join(" "))
            .unwrap_or_default()
    }

    /// The `refresh_token` grant.
    pub fn refresh(
        &mut self,
        client_id: &str,
        token: &str,
        now: Millis,
    ) -> Result<TokenResponse, OAuthError> {
        let Some(rt) = self.refresh_tokens.get(token) else {
            return Err(OAuthError::InvalidGrant("unknown refresh token"));
        };
        let family_id = rt.family.clone();
        *self
            .counters
            .token_calls_by_family
            .entry(family_id.clone())
            .or_default() += 1;
        if rt.client_id != client_id {
            return Err(OAuthError::InvalidGrant(
                "refresh token issued to another client",
            ));
        }
        let lifetimes = self.behaviour.lifetimes;
        let fam = self.families.get_mut(&family_id).expect("family exists");
        let is_head = fam.heads.contains(token);
        if fam.report.ended.is_some() {
            if is_head {
                fam.report.head_rejections += 1;
                fam.report.broken |= fam.report.ended == Some(FamilyEnd::ReuseDetected);
            }
            return Err(OAuthError::InvalidGrant("refresh token revoked"));
        }
        let user_id = fam.user_id.clone();
        match rt.used {
            None if now >= rt.issued + ms(lifetimes.refresh_token) => {
                fam.report.head_rejections += 1;
                fam.report.broken = true;
                Err(OAuthError::InvalidGrant("refresh token expired"))
            }
            None => {
                fam.report.rotations += 1;
                fam.heads.remove(token);
                let answer = self.rotate(&family_id, &user_id, client_id, now);
                let rt = self.refresh_tokens.get_mut(token).expect("present");
                rt.used = Some(now);
                rt.first_answer = Some(answer.clone());
                Ok(answer)
            }
            Some(used) if now < used + ms(lifetimes.grace) => {
                fam.report.grace_reuses += 1;
                match self.behaviour.grace_reuse {
                    GraceReuse::SamePair => Ok(rt.first_answer.clone().expect("set on first use")),
                    GraceReuse::Fork => {
                        fam.report.forks += 1;
                        Ok(self.rotate(&family_id, &user_id, client_id, now))
                    }
                }
            }
            Some(_) => {
                fam.report.dead_token_uses += 1;
                if self.behaviour.reuse_detection == ReuseDetection::RevokeFamily {
                    fam.report.ended = Some(FamilyEnd::ReuseDetected);
                    fam.report.broken = true;
                }
                Err(OAuthError::InvalidGrant("refresh token already used"))
            }
        }
    }

    fn rotate(
        &mut self,
        family: &str,
        user_id: &str,
        client_id: &str,
        now: Millis,
    ) -> TokenResponse {
        let refresh_token = self.issue_refresh_token(family, now);
        self.answer(Some(refresh_token), user_id, client_id, now)
    }

    /// A token response with a new access token for `user_id`.
    fn answer(
        &mut self,
        refresh_token: Option<String>,
        user_id: &str,
        client_id: &str,
        now: Millis,
    ) -> TokenResponse {
        let (access_token, expires_in) = self.issue_access_token(user_id, client_id, now);
        TokenResponse {
            access_token,
            refresh_token,
            expires_in,
            token_type: "Bearer".to_owned(),
            scope: self.scope_of(user_id),
        }
    }

    /// The `client_credentials` grant (Xero Custom Connections): an access token, no refresh token.
    pub fn client_credentials(
        &mut self,
        client_id: &str,
        now: Millis,
    ) -> Result<TokenResponse, OAuthError> {
        let user_id = self
            .clients
            .get(client_id)
            .and_then(|c| c.custom_connection_user.clone())
            .ok_or(OAuthError::UnauthorizedClient(
                "client is not a Custom Connection",
            ))?;
        Ok(self.answer(None, &user_id, client_id, now))
    }

    /// The authorize endpoint for a registered user: records a code bound to the PKCE challenge.
    pub fn authorize(
        &mut self,
        client_id: &str,
        redirect_uri: &str,
        challenge: &str,
        user_id: &str,
        scope: &str,
        now: Millis,
    ) -> Result<String, OAuthError> {
        if !self.clients.contains_key(client_id) {
            return Err(OAuthError::InvalidClient);
        }
        match self.users.get(user_id) {
            Some(u) if u.client_id == client_id => {}
            _ => return Err(OAuthError::InvalidRequest("no such user for this client")),
        }
        let code = random_token();
        self.codes.insert(
            code.clone(),
            AuthCode {
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                challenge: challenge.to_owned(),
                user_id: user_id.to_owned(),
                scope: scope.to_owned(),
                expires: now + ms(self.behaviour.lifetimes.auth_code),
                used: false,
            },
        );
        Ok(code)
    }

    /// The first user registered for a client (whom `authorize` approves without a login hint).
    pub fn default_user(&self, client_id: &str) -> Option<String> {
        self.users
            .iter()
            .find(|(_, u)| u.client_id == client_id)
            .map(|(id, _)| id.clone())
    }

    /// The `authorization_code` grant with PKCE (S256).
    pub fn exchange_code(
        &mut self,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
        now: Millis,
    ) -> Result<TokenResponse, OAuthError> {
        let Some(record) = self.codes.get_mut(code) else {
            return Err(OAuthError::InvalidGrant("unknown authorization code"));
        };
        if record.used {
            return Err(OAuthError::InvalidGrant("authorization code already used"));
        }
        if now >= record.expires {
            return Err(OAuthError::InvalidGrant("authorization code expired"));
        }
        if record.client_id != client_id || record.redirect_uri != redirect_uri {
            return Err(OAuthError::InvalidGrant(
                "client or redirect_uri does not match the code",
            ));
        }
        // PKCE is optional at Xero for confidential clients; once a challenge was sent it is checked.
        if !record.challenge.is_empty() && pkce_challenge(verifier) != record.challenge {
            return Err(OAuthError::InvalidGrant(
                "code_verifier does not match code_challenge",
            ));
        }
        record.used = true;
        let user_id = record.user_id.clone();
        let scope = record.scope.clone();
        if let Some(user) = self.users.get_mut(&user_id)
            && !scope.is_empty()
        {
            user.scopes = scope.split_whitespace().map(str::to_owned).collect();
        }
        let refresh_token = self.start_family(&user_id, now).expect("user exists");
        Ok(self.answer(Some(refresh_token), &user_id, client_id, now))
    }

    /// `POST /connect/revocation`: revokes the refresh token's family and disconnects every tenant
    /// of that user from the app, as Xero does. Unknown tokens are ignored (RFC 7009).
    pub fn revoke(&mut self, client_id: &str, token: &str) -> Result<(), OAuthError> {
        let Some(rt) = self.refresh_tokens.get(token) else {
            return Ok(());
        };
        if rt.client_id != client_id {
            return Err(OAuthError::InvalidClient);
        }
        let fam = self.families.get_mut(&rt.family).expect("family exists");
        fam.report.ended.get_or_insert(FamilyEnd::Revoked);
        let user_id = fam.user_id.clone();
        if let Some(user) = self.users.get_mut(&user_id) {
            user.connections.clear();
        }
        self.access_tokens.retain(|_, a| a.user_id != user_id);
        Ok(())
    }

    /// Checks a bearer access token.
    pub fn bearer(&self, token: &str, now: Millis) -> Result<Bearer, BearerError> {
        let at = self.access_tokens.get(token).ok_or(BearerError::Unknown)?;
        if now >= at.expires {
            return Err(BearerError::Expired(at.expires));
        }
        Ok(Bearer {
            user_id: at.user_id.clone(),
            client_id: at.client_id.clone(),
        })
    }

    /// [`Self::bearer`], counted in [`Counters::bearer_outcomes`].
    pub fn bearer_counted(&mut self, token: &str, now: Millis) -> Result<Bearer, BearerError> {
        let result = self.bearer(token, now);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(BearerError::Expired(_)) => "expired",
            Err(BearerError::Unknown) => "unknown",
        };
        *self
            .counters
            .bearer_outcomes
            .entry(outcome.to_owned())
            .or_default() += 1;
        result
    }

    /// The chain report of every family.
    pub fn chains(&self) -> Vec<ChainReport> {
        self.families
            .values()
            .map(|f| ChainReport {
                unused_heads: f.heads.len() as u64,
                ..f.report.clone()
            })
            .collect()
    }

    /// The family a refresh token belongs to.
    pub fn family_of(&self, token: &str) -> Option<String> {
        self.refresh_tokens.get(token).map(|t| t.family.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "app";
    const SEC: Millis = 1000;

    fn short() -> Behaviour {
        Behaviour {
            lifetimes: Lifetimes {
                access_token: Duration::from_secs(2),
                refresh_token: Duration::from_secs(100),
                grace: Duration::from_secs(4),
                auth_code: Duration::from_secs(5),
            },
            ..Behaviour::default()
        }
    }

    fn seeded(behaviour: Behaviour) -> (State, String, String) {
        let mut s = State::new(behaviour);
        s.add_client(CLIENT, "secret");
        let user = s.add_user(
            CLIENT,
            None,
            vec!["offline_access".into(), "accounting.invoices".into()],
            &[TenantSeed {
                tenant_name: "Demo Co".into(),
                tenant_type: "ORGANISATION".into(),
            }],
            0,
        );
        let rt = s.start_family(&user, 0).expect("user");
        (s, user, rt)
    }

    fn report(s: &State) -> ChainReport {
        s.chains().pop().expect("one family")
    }

    #[test]
    fn each_refresh_rotates_the_refresh_token_and_issues_a_new_access_token() {
        let (mut s, user, rt0) = seeded(short());
        let a = s.refresh(CLIENT, &rt0, 10).expect("first refresh");
        let rt1 = a.refresh_token.clone().expect("rotated");
        assert_ne!(rt1, rt0);
        assert_eq!(a.expires_in, 2);
        assert_eq!(a.token_type, "Bearer");
        assert_eq!(a.scope, "offline_access accounting.invoices");
        let b = s.refresh(CLIENT, &rt1, 20).expect("second refresh");
        assert_ne!(b.access_token, a.access_token);
        assert_eq!(s.bearer(&b.access_token, 20).expect("valid").user_id, user);
        let r = report(&s);
        assert_eq!(
            (r.issued, r.rotations, r.unused_heads, r.broken),
            (3, 2, 1, false)
        );
    }

    #[test]
    fn a_used_token_inside_the_grace_period_returns_the_same_pair() {
        let (mut s, _, rt0) = seeded(short());
        let first = s.refresh(CLIENT, &rt0, 0).expect("first");
        let again = s.refresh(CLIENT, &rt0, 3 * SEC).expect("inside grace");
        assert_eq!(first, again);
        let r = report(&s);
        assert_eq!((r.grace_reuses, r.forks, r.broken), (1, 0, false));
    }

    #[test]
    fn fork_mode_issues_a_second_successor_and_both_stay_valid() {
        let (mut s, _, rt0) = seeded(Behaviour {
            grace_reuse: GraceReuse::Fork,
            ..short()
        });
        let a = s.refresh(CLIENT, &rt0, 0).expect("first");
        let b = s.refresh(CLIENT, &rt0, SEC).expect("fork");
        assert_ne!(a.refresh_token, b.refresh_token);
        s.refresh(CLIENT, a.refresh_token.as_deref().expect("a"), 2 * SEC)
            .expect("branch a");
        s.refresh(CLIENT, b.refresh_token.as_deref().expect("b"), 2 * SEC)
            .expect("branch b");
        let r = report(&s);
        assert_eq!((r.forks, r.unused_heads, r.broken), (1, 2, false));
    }

    #[test]
    fn reuse_after_grace_is_invalid_grant_and_revokes_the_family() {
        let (mut s, _, rt0) = seeded(short());
        let a = s.refresh(CLIENT, &rt0, 0).expect("first");
        let late = s.refresh(CLIENT, &rt0, 4 * SEC);
        assert_eq!(
            late,
            Err(OAuthError::InvalidGrant("refresh token already used"))
        );
        // The newest token is dead too: the chain is broken.
        let head = s.refresh(CLIENT, a.refresh_token.as_deref().expect("rt1"), 5 * SEC);
        assert!(matches!(head, Err(OAuthError::InvalidGrant(_))));
        let r = report(&s);
        assert_eq!(r.dead_token_uses, 1);
        assert_eq!(r.head_rejections, 1);
        assert_eq!(r.ended, Some(FamilyEnd::ReuseDetected));
        assert!(r.broken);
    }

    #[test]
    fn reject_only_mode_keeps_the_newest_token_working() {
        let (mut s, _, rt0) = seeded(Behaviour {
            reuse_detection: ReuseDetection::RejectOnly,
            ..short()
        });
        let a = s.refresh(CLIENT, &rt0, 0).expect("first");
        assert!(s.refresh(CLIENT, &rt0, 10 * SEC).is_err());
        s.refresh(CLIENT, a.refresh_token.as_deref().expect("rt1"), 10 * SEC)
            .expect("head still valid");
        let r = report(&s);
        assert_eq!((r.dead_token_uses, r.broken), (1, false));
    }

    #[test]
    fn an_unused_refresh_token_expires_and_breaks_the_chain() {
        let (mut s, _, rt0) = seeded(short());
        let expired = s.refresh(CLIENT, &rt0, 100 * SEC);
        assert_eq!(
            expired,
            Err(OAuthError::InvalidGrant("refresh token expired"))
        );
        assert!(report(&s).broken);
    }

    #[test]
    fn a_refresh_just_before_expiry_resets_the_sliding_window() {
        let (mut s, _, rt0) = seeded(short());
        let a = s.refresh(CLIENT, &rt0, 99 * SEC).expect("just in time");
        s.refresh(CLIENT, a.refresh_token.as_deref().expect("rt1"), 198 * SEC)
            .expect("new token has its own 100 s");
    }

    #[test]
    fn access_tokens_expire() {
        let (mut s, _, rt0) = seeded(short());
        let a = s.refresh(CLIENT, &rt0, 0).expect("refresh");
        assert!(s.bearer(&a.access_token, 1999).is_ok());
        assert_eq!(
            s.bearer(&a.access_token, 2000),
            Err(BearerError::Expired(2000))
        );
        assert_eq!(s.bearer("junk", 0), Err(BearerError::Unknown));
    }

    #[test]
    fn tokens_are_bound_to_their_client() {
        let (mut s, _, rt0) = seeded(short());
        s.add_client("other", "secret");
        assert!(matches!(
            s.refresh("other", &rt0, 0),
            Err(OAuthError::InvalidGrant(_))
        ));
        assert_eq!(
            s.authenticate_client(CLIENT, "wrong"),
            Err(OAuthError::InvalidClient)
        );
        assert_eq!(
            s.authenticate_client("nobody", "secret"),
            Err(OAuthError::InvalidClient)
        );
        s.authenticate_client(CLIENT, "secret")
            .expect("right secret");
    }

    #[test]
    fn revocation_ends_the_family_without_breaking_it_and_disconnects_tenants() {
        let (mut s, user, rt0) = seeded(short());
        let a = s.refresh(CLIENT, &rt0, 0).expect("refresh");
        let rt1 = a.refresh_token.expect("rt1");
        s.revoke(CLIENT, &rt1).expect("revoked");
        assert!(s.connections(&user).is_empty());
        assert_eq!(s.bearer(&a.access_token, 1), Err(BearerError::Unknown));
        assert!(matches!(
            s.refresh(CLIENT, &rt1, 1),
            Err(OAuthError::InvalidGrant(_))
        ));
        let r = report(&s);
        assert_eq!((r.ended, r.broken), (Some(FamilyEnd::Revoked), false));
        s.revoke(CLIENT, "unknown token")
            .expect("unknown tokens are ignored");
    }

    #[test]
    fn client_credentials_gives_an_access_token_only_to_custom_connections() {
        let (mut s, user, _) = seeded(short());
        assert!(matches!(
            s.client_credentials(CLIENT, 0),
            Err(OAuthError::UnauthorizedClient(_))
        ));
        assert!(s.make_custom_connection(CLIENT, &user));
        let t = s.client_credentials(CLIENT, 0).expect("token");
        assert!(t.refresh_token.is_none());
        assert_eq!(s.bearer(&t.access_token, 1).expect("valid").user_id, user);
    }

    #[test]
    fn authorization_code_with_pkce() {
        let (mut s, user, _) = seeded(short());
        let verifier = "a-long-random-verifier-of-at-least-43-characters-xxxxxxxx";
        let code = s
            .authorize(
                CLIENT,
                "http://127.0.0.1:9/cb",
                &pkce_challenge(verifier),
                &user,
                "offline_access openid",
                0,
            )
            .expect("code");
        assert!(matches!(
            s.exchange_code(CLIENT, &code, "http://127.0.0.1:9/cb", "wrong-verifier", 1),
            Err(OAuthError::InvalidGrant(
                "code_verifier does not match code_challenge"
            ))
        ));
        let t = s
            .exchange_code(CLIENT, &code, "http://127.0.0.1:9/cb", verifier, 1)
            .expect("exchange");
        assert!(t.refresh_token.is_some());
        assert_eq!(t.scope, "offline_access openid");
        assert!(matches!(
            s.exchange_code(CLIENT, &code, "http://127.0.0.1:9/cb", verifier, 2),
            Err(OAuthError::InvalidGrant("authorization code already used"))
        ));
        // The exchange starts a family of its own.
        assert_eq!(s.chains().len(), 2);
    }

    #[test]
    fn authorization_codes_expire_and_check_the_redirect() {
        let (mut s, user, _) = seeded(short());
        let v = "verifier";
        let code = s
            .authorize(CLIENT, "http://a/cb", &pkce_challenge(v), &user, "", 0)
            .expect("code");
        assert!(s.exchange_code(CLIENT, &code, "http://b/cb", v, 1).is_err());
        assert!(matches!(
            s.exchange_code(CLIENT, &code, "http://a/cb", v, 5 * SEC),
            Err(OAuthError::InvalidGrant("authorization code expired"))
        ));
    }

    #[test]
    fn disconnecting_a_tenant() {
        let (mut s, user, _) = seeded(short());
        let id = s.connections(&user)[0].id.clone();
        let tenant = s.connections(&user)[0].tenant_id.clone();
        assert!(s.has_tenant(&user, &tenant));
        assert!(s.disconnect(&user, &id));
        assert!(!s.disconnect(&user, &id));
        assert!(!s.has_tenant(&user, &tenant));
    }

    #[test]
    fn access_token_claims_look_like_xero() {
        let (mut s, user, rt0) = seeded(short());
        let t = s.refresh(CLIENT, &rt0, 5 * SEC).expect("refresh");
        let claims = super::super::jwt::decode_claims(&t.access_token).expect("jwt");
        assert_eq!(claims["sub"], user.as_str());
        assert_eq!(claims["client_id"], CLIENT);
        assert_eq!(claims["exp"], 7);
        assert_eq!(claims["nbf"], 5);
        assert!(claims["scope"].is_array());
        assert!(claims["authentication_event_id"].is_string());
        assert_eq!(
            claims["authentication_event_id"],
            s.connections(&user)[0].auth_event_id.as_str()
        );
    }

    #[test]
    fn each_authorisation_is_an_authentication_event_of_its_own() {
        let (mut s, user, rt0) = seeded(short());
        let event = |s: &State, token: &str| {
            let claims = super::super::jwt::decode_claims(token).expect("jwt");
            assert_eq!(
                claims["authentication_event_id"],
                s.connections(&user)[0].auth_event_id.as_str(),
                "the connections carry the latest authorisation's event"
            );
            claims["authentication_event_id"].clone()
        };
        let first = s.refresh(CLIENT, &rt0, SEC).expect("refresh");
        let before = event(&s, &first.access_token);
        // Refreshing keeps the event; authorising again makes a new one.
        let again = s
            .refresh(CLIENT, first.refresh_token.as_deref().expect("rt"), 2 * SEC)
            .expect("refresh");
        assert_eq!(event(&s, &again.access_token), before);
        let rt1 = s.start_family(&user, 3 * SEC).expect("a new family");
        let after = s.refresh(CLIENT, &rt1, 4 * SEC).expect("refresh");
        assert_ne!(event(&s, &after.access_token), before);
    }
}
