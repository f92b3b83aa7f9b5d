//! `xero-token authorize`: the one-time authorization-code flow with PKCE that bootstraps a
//! connection. It prints the authorize URL, receives the redirect on 127.0.0.1, exchanges the code
//! and stores the first token pair in the token Secret (creating it if needed), so nobody copies
//! refresh tokens by hand. Also the way back from `ReauthorizationRequired`.
//!
//! The app's identity (client id and secret) and the token endpoint come from the person's own
//! flags, else from the XeroConnection and its client Secret (read with the person's rights),
//! else Xero's endpoint: never from the token Secret, which every consumer may write (a consumer
//! could otherwise have the code, the verifier and the credentials posted to its own listener,
//! or the person approve another app). The token endpoint must be on Xero's hosts or one the
//! person allowed (`--allow-endpoint-host`), and both are shown before the browser opens.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use axum::extract::Query;
use axum::routing::get;
use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use ring::rand::SecureRandom;

use super::{Args, EXIT_OTHER, secret_target};
use crate::crd::XeroConnection;
use crate::protocol::format::{self, TokenRecord, format_time, token_patch};
use crate::protocol::refresher::{default_identity, process_identity};
use crate::redact::Sensitive;
use crate::xero::{ClientCredentials, Endpoints, XeroClient};

/// How long to wait for the person to approve in the browser.
const APPROVAL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Clone, Debug)]
pub struct AuthorizeArgs {
    /// Xero's authorize endpoint (or the emulator's).
    #[arg(
        long,
        default_value = "https://login.xero.com/identity/connect/authorize"
    )]
    authorize_url: String,

    /// Token endpoint. Default: the XeroConnection's (`--connection`, or the one `kubectl xero
    /// authorize` names), else Xero's. Its host must be Xero's or one `--allow-endpoint-host`
    /// names.
    #[arg(long)]
    token_url: Option<String>,

    /// The app's client id. Default: the XeroConnection's client Secret.
    #[arg(long, env = "XERO_CLIENT_ID")]
    client_id: Option<String>,

    /// A file holding the app's client secret. Default: the XeroConnection's client Secret.
    #[arg(long)]
    client_secret_file: Option<PathBuf>,

    /// Scopes to request; `offline_access` is needed for a refresh token.
    #[arg(
        long,
        default_value = "offline_access accounting.transactions openid profile email"
    )]
    scopes: String,

    /// Local port of the redirect: register http://localhost:PORT/callback with the app.
    #[arg(long, default_value_t = 5000)]
    port: u16,

    /// Passed to the authorize endpoint as login_hint (the emulator takes a user id).
    #[arg(long)]
    login_hint: Option<String>,

    /// The XeroConnection NAME this authorisation is for: the app's client id and secret come
    /// from its client Secret and the token endpoint from its spec (unless the flags above give
    /// them). When the token Secret does not exist yet and this command creates it, it is
    /// labelled `xero-operator.io/connection=<NAME>`, which opts it in for that connection.
    #[arg(long, value_name = "NAME")]
    pub connection: Option<String>,
}

fn random_urlsafe(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

pub async fn run(args: &Args, a: &AuthorizeArgs) -> anyhow::Result<ExitCode> {
    let (secret, client, namespace) = secret_target(args).await?;
    // The connection named, if it exists and the person may read it.
    let connection = match &a.connection {
        Some(name) => {
            let api: Api<XeroConnection> = Api::namespaced(client.clone(), &namespace);
            match api.get_opt(name).await {
                Ok(found) => found,
                Err(e) => {
                    eprintln!("xero-token: cannot read XeroConnection {namespace}/{name}: {e}");
                    None
                }
            }
        }
        None => None,
    };
    let target = Target {
        secret,
        client,
        namespace,
        identity: args.identity.clone(),
        connection,
        allowlist: super::allowlist(&args.allow_endpoint_hosts)?,
    };
    run_for(target, a).await
}

/// The token Secret an authorisation stores its pair in, who stores it, and for what.
pub struct Target {
    pub secret: String,
    pub client: kube::Client,
    pub namespace: String,
    /// Identity prefix (`--identity`); default: the hostname.
    pub identity: Option<String>,
    /// The connection authorised: its client Secret and token endpoint are used unless the
    /// flags give them.
    pub connection: Option<XeroConnection>,
    /// Where the code, the verifier and the credentials may be sent.
    pub allowlist: crate::allowlist::EndpointAllowlist,
}

/// The app's credentials from `conn`'s client Secret, read with the caller's own rights.
pub async fn client_credentials_of(
    client: &kube::Client,
    conn: &XeroConnection,
) -> anyhow::Result<ClientCredentials> {
    let ns = conn.metadata.namespace.clone().unwrap_or_default();
    let r = &conn.spec.client_secret_ref;
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = api.get(&r.name).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read the client Secret {ns}/{} of XeroConnection {:?} ({e}): pass \
             --client-id and --client-secret-file (the token Secret's copy is not used: every \
             consumer of the connection may write it)",
            r.name,
            conn.metadata.name.as_deref().unwrap_or_default()
        )
    })?;
    let value = |key: &str| {
        crate::controller::inputs::secret_text(&secret, key).ok_or_else(|| {
            anyhow::anyhow!(
                "the client Secret {ns}/{} has no non-empty key {key:?}",
                r.name
            )
        })
    };
    Ok(ClientCredentials {
        client_id: value(&r.client_id_key)?,
        client_secret: Sensitive::new(value(&r.client_secret_key)?),
    })
}

/// The token endpoint `conn` names, else Xero's.
pub fn token_url_of(conn: Option<&XeroConnection>) -> String {
    conn.and_then(|c| c.spec.endpoints.as_ref())
        .and_then(|e| e.token_url.clone())
        .unwrap_or_else(|| crate::crd::XERO_TOKEN_URL.to_owned())
}

/// Authorises the app and stores the first pair in `target` (`xero-token authorize` and
/// `kubectl xero authorize`).
pub async fn run_for(target: Target, a: &AuthorizeArgs) -> anyhow::Result<ExitCode> {
    let Target {
        secret: secret_name,
        client,
        namespace: ns,
        identity,
        connection,
        allowlist,
    } = target;
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    // The person's flags, else the connection and its client Secret: never the token Secret.
    let from_connection = match (&a.client_id, &a.client_secret_file, &connection) {
        (Some(_), Some(_), _) => None,
        (_, _, Some(conn)) => Some(client_credentials_of(&client, conn).await?),
        _ => anyhow::bail!(
            "name the app: --connection NAME (its client Secret, read with your rights), or \
             --client-id and --client-secret-file; the token Secret's copy is not used, since \
             every consumer of the connection may write it"
        ),
    };
    let client_id = match (&a.client_id, &from_connection) {
        (Some(id), _) => id.clone(),
        (None, Some(app)) => app.client_id.clone(),
        (None, None) => unreachable!("checked above"),
    };
    let client_secret = match (&a.client_secret_file, &from_connection) {
        (Some(path), _) => Sensitive::new(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                .trim(),
        ),
        (None, Some(app)) => app.client_secret.clone(),
        (None, None) => unreachable!("checked above"),
    };
    let app = ClientCredentials {
        client_id: client_id.clone(),
        client_secret,
    };
    let token_url = a
        .token_url
        .clone()
        .unwrap_or_else(|| token_url_of(connection.as_ref()));
    if let Err(why) = allowlist.check(&token_url) {
        anyhow::bail!("the token endpoint {why}");
    }
    // Scheme, host and port: where the code, the verifier and the credentials will go.
    let token_origin = reqwest::Url::parse(&token_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    eprintln!(
        "Authorising the Xero app with client id {client_id} for {ns}/{secret_name}; the code \
         goes to the token endpoint at {token_origin}."
    );
    let endpoints = Endpoints {
        token_url: token_url.clone(),
        ..Endpoints::default()
    };

    let verifier = random_urlsafe(48)?;
    let challenge = crate::xero::pkce_challenge(&verifier);
    let state = random_urlsafe(16)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port)).await?;
    let redirect_uri = format!(
        "http://localhost:{}/callback",
        listener.local_addr()?.port()
    );
    let mut query = vec![
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", redirect_uri.as_str()),
        ("scope", a.scopes.as_str()),
        ("state", state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    if let Some(hint) = &a.login_hint {
        query.push(("login_hint", hint));
    }
    let url = format!(
        "{}?{}",
        a.authorize_url,
        serde_urlencoded::to_string(&query)?
    );
    eprintln!("Open this URL in a browser and approve access:\n  {url}");

    let (tx, rx) = tokio::sync::mpsc::channel::<HashMap<String, String>>(1);
    let app_router = axum::Router::new().route(
        "/callback",
        get(move |Query(q): Query<HashMap<String, String>>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(q).await;
                axum::response::Html("<p>xero-token: authorised. You can close this window.</p>")
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app_router).await });
    let mut rx = rx;
    let callback = tokio::time::timeout(APPROVAL_TIMEOUT, rx.recv()).await;
    server.abort();
    let params = match callback {
        Ok(Some(p)) => p,
        _ => {
            eprintln!("xero-token: no approval within {APPROVAL_TIMEOUT:?}");
            return Ok(ExitCode::from(EXIT_OTHER));
        }
    };
    if params.contains_key("error") {
        // Text from the redirect (RFC 6749 §4.1.2.1): shown sanitised; the description names
        // what was refused (a scope, say).
        let said = |k: &str| {
            params
                .get(k)
                .map(|v| crate::text::sanitize(v, crate::text::MAX_REASON_CHARS))
        };
        let error = said("error").unwrap_or_default();
        match said("error_description") {
            Some(description) => {
                eprintln!("xero-token: authorisation refused: {error}: {description}")
            }
            None => eprintln!("xero-token: authorisation refused: {error}"),
        }
        return Ok(ExitCode::from(EXIT_OTHER));
    }
    if params.get("state") != Some(&state) {
        eprintln!("xero-token: the redirect's state does not match: ignoring it (possible CSRF)");
        return Ok(ExitCode::from(EXIT_OTHER));
    }
    let code = params
        .get("code")
        .ok_or_else(|| anyhow::anyhow!("the redirect carried no code"))?;
    let set = XeroClient::new(endpoints)
        .exchange_code(&app, code, &redirect_uri, &verifier)
        .await
        .map_err(|e| anyhow::anyhow!("exchanging the code failed: {e}"))?;
    if set.refresh_token.is_none() {
        anyhow::bail!("Xero issued no refresh token: request the offline_access scope");
    }

    let now = SystemTime::now();
    let expires_at = now + Duration::from_secs(set.expires_in);
    let actor = format!(
        "authorize/{}",
        identity
            .as_deref()
            .map_or_else(default_identity, process_identity)
    );
    // The exchanged pair exists nowhere else: store it with a write retried until it lands,
    // whether the Secret appeared meanwhile (a 409 on create), changed (a 409 on the patch), or
    // the API server failed for a while. Only a refusal (401/403) ends it: say so loudly.
    let mut attempt = 0u32;
    loop {
        match store_pair(
            &api,
            &secret_name,
            &set,
            expires_at,
            &actor,
            now,
            &app,
            &token_url,
            a,
        )
        .await
        {
            Ok(Stored::Landed) => break,
            Ok(Stored::Conflict) => continue,
            Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
                anyhow::bail!(
                    "not allowed to write {ns}/{secret_name} ({}): the new token pair is lost; \
                     fix the RBAC and authorise again",
                    s.message
                );
            }
            Err(e) => {
                eprintln!("xero-token: storing the new token pair failed ({e}); retrying");
                tokio::time::sleep(crate::protocol::backoff::WRITE_RETRY.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
    println!(
        "stored a new token pair in {ns}/{secret_name} (access token expires at {})",
        format_time(expires_at)
    );
    Ok(ExitCode::SUCCESS)
}

/// The outcome of one attempt to store the pair.
enum Stored {
    Landed,
    /// The Secret changed or appeared meanwhile: try again at once with what it is now.
    Conflict,
}

/// One attempt to store the freshly exchanged pair: over whatever the Secret holds (a new
/// authorisation supersedes it), or in a new Secret labelled for `--connection`.
#[allow(clippy::too_many_arguments)]
async fn store_pair(
    api: &Api<Secret>,
    secret_name: &str,
    set: &crate::xero::TokenSet,
    expires_at: SystemTime,
    actor: &str,
    now: SystemTime,
    app: &ClientCredentials,
    token_url: &str,
    a: &AuthorizeArgs,
) -> Result<Stored, kube::Error> {
    let conflict = |e: kube::Error| match e {
        kube::Error::Api(s) if s.code == 409 => Ok(Stored::Conflict),
        e => Err(e),
    };
    if let Some(current) = api.get_opt(secret_name).await? {
        let current = TokenRecord::from_secret(&current);
        let rv = current.resource_version.clone().unwrap_or_default();
        let rotation = current.rotation.saturating_add(1);
        let patch = token_patch(&rv, set, expires_at, actor, now, rotation);
        return match api
            .patch(secret_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(Stored::Landed),
            Err(e) => conflict(e),
        };
    }
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec()));
    };
    put(format::ACCESS_TOKEN, set.access_token.expose());
    if let Some(rt) = &set.refresh_token {
        put(format::REFRESH_TOKEN, rt.expose());
    }
    put(format::EXPIRES_AT, &format_time(expires_at));
    put(format::TOKEN_TYPE, &set.token_type);
    put(format::SCOPE, &set.scope);
    put(format::CLIENT_ID, &app.client_id);
    put(format::CLIENT_SECRET, app.client_secret.expose());
    let mut secret = Secret {
        data: Some(data),
        ..Secret::default()
    };
    secret.metadata.name = Some(secret_name.to_owned());
    if let Some(conn) = &a.connection {
        secret.metadata.labels = Some(BTreeMap::from([(
            format::LABEL_CONNECTION.to_owned(),
            conn.clone(),
        )]));
    }
    secret.metadata.annotations = Some(BTreeMap::from([
        (format::ANN_REFRESHED_BY.to_owned(), actor.to_owned()),
        (format::ANN_REFRESHED_AT.to_owned(), format_time(now)),
        (format::ANN_TOKEN_URL.to_owned(), token_url.to_owned()),
    ]));
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            if a.connection.is_none() {
                eprintln!(
                    "note: created {secret_name}; the operator uses an existing Secret only once it is \
                     opted in: kubectl label secret {secret_name} {}=<connection name> \
                     (or pass --connection next time)",
                    format::LABEL_CONNECTION
                );
            }
            Ok(Stored::Landed)
        }
        Err(e) => conflict(e),
    }
}
