//! The emulator's admin API under `/_admin` (same port), and [`AdminClient`], its Rust client for
//! tests and benchmarks: seed users, read counters and chain reports, set faults, lifetimes and
//! rate limits, reset.

use axum::Json;
use axum::extract::{Path, State as Axum};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::faults::Faults;
use super::limits::RateLimits;
use super::routes::{Shared, now_ms};
use super::state::{Behaviour, ChainReport, Connection, Counters, TenantSeed};

/// `POST /_admin/clients`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewClient {
    pub client_id: String,
    pub client_secret: String,
}

/// `POST /_admin/users`: a user of an app with tenants.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NewUser {
    /// The app (client id) the user authorised. Default: the first client configured.
    pub client_id: Option<String>,
    /// A fixed user id; random by default.
    pub user_id: Option<String>,
    /// Granted scopes. Default `offline_access accounting.transactions`.
    pub scopes: Vec<String>,
    /// Tenants. Default: one organisation, "Demo Company".
    pub tenants: Vec<TenantSeed>,
    /// Make the client a Custom Connection to this user (client-credentials grant); no refresh
    /// token is issued then.
    pub custom_connection: bool,
}

/// The answer to `POST /_admin/users`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeededUser {
    pub user_id: String,
    pub client_id: String,
    /// The first refresh token of a new family (absent for Custom Connections).
    pub refresh_token: Option<String>,
    pub family: Option<String>,
    pub connections: Vec<Connection>,
}

/// `GET /_admin/report`: counters and every chain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub counters: Counters,
    pub chains: Vec<ChainReport>,
}

impl Report {
    /// Chains that broke.
    pub fn broken_chains(&self) -> usize {
        self.chains.iter().filter(|c| c.broken).count()
    }
}

fn bad_request(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg.into()}))).into_response()
}

pub async fn add_client(Axum(shared): Axum<Shared>, Json(c): Json<NewClient>) -> Response {
    if c.client_id.is_empty() || c.client_secret.is_empty() {
        return bad_request("client_id and client_secret are required");
    }
    shared
        .lock()
        .state
        .add_client(&c.client_id, &c.client_secret);
    StatusCode::NO_CONTENT.into_response()
}

pub async fn add_user(Axum(shared): Axum<Shared>, Json(u): Json<NewUser>) -> Response {
    let mut inner = shared.lock();
    let Some(client_id) = u.client_id.clone().or_else(|| inner.state.first_client()) else {
        return bad_request("no client configured: POST /_admin/clients first");
    };
    if !inner.state.has_client(&client_id) {
        return bad_request(format!("unknown client {client_id}"));
    }
    let scopes = if u.scopes.is_empty() {
        vec![
            "offline_access".to_owned(),
            "accounting.transactions".to_owned(),
        ]
    } else {
        u.scopes
    };
    let tenants = if u.tenants.is_empty() {
        vec![TenantSeed {
            tenant_name: "Demo Company".to_owned(),
            tenant_type: "ORGANISATION".to_owned(),
        }]
    } else {
        u.tenants
    };
    let now = now_ms();
    let user_id = inner
        .state
        .add_user(&client_id, u.user_id, scopes, &tenants, now);
    let refresh_token = if u.custom_connection {
        inner.state.make_custom_connection(&client_id, &user_id);
        None
    } else {
        inner.state.start_family(&user_id, now)
    };
    let family = refresh_token
        .as_deref()
        .and_then(|t| inner.state.family_of(t));
    Json(SeededUser {
        connections: inner.state.connections(&user_id),
        user_id,
        client_id,
        refresh_token,
        family,
    })
    .into_response()
}

/// `POST /_admin/users/{id}/families`: the user authorises again; a new family starts.
pub async fn new_family(Axum(shared): Axum<Shared>, Path(user_id): Path<String>) -> Response {
    let mut inner = shared.lock();
    match inner.state.start_family(&user_id, now_ms()) {
        Some(token) => {
            Json(json!({"family": inner.state.family_of(&token), "refresh_token": token}))
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "unknown user").into_response(),
    }
}

pub async fn report(Axum(shared): Axum<Shared>) -> Json<Report> {
    let inner = shared.lock();
    Json(Report {
        counters: inner.state.counters.clone(),
        chains: inner.state.chains(),
    })
}

pub async fn reset(Axum(shared): Axum<Shared>) -> StatusCode {
    let mut inner = shared.lock();
    inner.state.reset();
    inner.limiter.reset();
    inner.faults = Faults::default();
    StatusCode::NO_CONTENT
}

pub async fn get_faults(Axum(shared): Axum<Shared>) -> Json<Faults> {
    Json(shared.lock().faults.clone())
}

pub async fn put_faults(Axum(shared): Axum<Shared>, Json(f): Json<Faults>) -> Response {
    if let Err(e) = f.validate() {
        return bad_request(e);
    }
    shared.lock().faults = f;
    StatusCode::NO_CONTENT.into_response()
}

pub async fn get_behaviour(Axum(shared): Axum<Shared>) -> Json<Behaviour> {
    Json(shared.lock().state.behaviour)
}

pub async fn put_behaviour(Axum(shared): Axum<Shared>, Json(b): Json<Behaviour>) -> StatusCode {
    shared.lock().state.behaviour = b;
    StatusCode::NO_CONTENT
}

pub async fn get_limits(Axum(shared): Axum<Shared>) -> Json<RateLimits> {
    Json(shared.lock().limiter.limits)
}

pub async fn put_limits(Axum(shared): Axum<Shared>, Json(l): Json<RateLimits>) -> StatusCode {
    shared.lock().limiter.limits = l;
    StatusCode::NO_CONTENT
}

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("emulator admin request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("emulator admin API answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// A client of the admin API, for tests, benchmarks and `make run`.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base_url` is the emulator's root, e.g. `http://127.0.0.1:8480`.
    pub fn new(base_url: &str) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<T>, AdminError> {
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(AdminError::Status {
                status: status.as_u16(),
                body: resp.text().await.unwrap_or_default(),
            });
        }
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(resp.json().await?))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/_admin/{path}", self.base)
    }

    pub async fn add_client(&self, client_id: &str, client_secret: &str) -> Result<(), AdminError> {
        let body = NewClient {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
        };
        self.send::<()>(self.http.post(self.url("clients")).json(&body))
            .await
            .map(drop)
    }

    pub async fn add_user(&self, user: &NewUser) -> Result<SeededUser, AdminError> {
        let seeded = self
            .send(self.http.post(self.url("users")).json(user))
            .await?;
        Ok(seeded.expect("POST /_admin/users answers with a body"))
    }

    /// The user authorises again: a new refresh-token family under a new authentication event.
    /// Returns its first refresh token.
    pub async fn new_family(&self, user_id: &str) -> Result<String, AdminError> {
        let answer: serde_json::Value = self
            .send(
                self.http
                    .post(self.url(&format!("users/{user_id}/families"))),
            )
            .await?
            .expect("POST /_admin/users/{id}/families answers with a body");
        Ok(answer["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned())
    }

    pub async fn report(&self) -> Result<Report, AdminError> {
        Ok(self
            .send(self.http.get(self.url("report")))
            .await?
            .expect("report body"))
    }

    pub async fn reset(&self) -> Result<(), AdminError> {
        self.send::<()>(self.http.post(self.url("reset")))
            .await
            .map(drop)
    }

    pub async fn set_faults(&self, faults: &Faults) -> Result<(), AdminError> {
        self.send::<()>(self.http.put(self.url("faults")).json(faults))
            .await
            .map(drop)
    }

    pub async fn set_behaviour(&self, behaviour: &Behaviour) -> Result<(), AdminError> {
        self.send::<()>(self.http.put(self.url("behaviour")).json(behaviour))
            .await
            .map(drop)
    }

    pub async fn set_limits(&self, limits: &RateLimits) -> Result<(), AdminError> {
        self.send::<()>(self.http.put(self.url("limits")).json(limits))
            .await
            .map(drop)
    }
}
