//! The second step of a reconcile: reading what a spec points to — the client-credentials Secret
//! and the token Secret — under the rules of [`crate::controller::ownership`].
//!
//! Both are looked up by name *and* by their opt-in label in one list call, so the API server
//! sends the data of a Secret only when it carries the label; a Secret without it is looked at
//! by its metadata alone, to say in the condition what is missing. Nothing of a Secret that is
//! neither the operator's own nor opted in is read, copied, granted or deleted.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::ListParams;

use crate::controller::conditions::State;
use crate::controller::ownership::{
    ANN_CLIENT_CREDENTIAL_KEYS, LABEL_CLIENT_CREDENTIALS, TokenSecretVerdict,
    is_client_key_opted_in, is_client_secret_opted_in, token_secret_verdict,
};
use crate::controller::{Error, StepResult, kube_err};
use crate::crd::XeroConnection;
use crate::protocol::format::LABEL_CONNECTION;
use crate::redact::Sensitive;
use crate::xero::ClientCredentials;

/// What stands at a connection's token Secret name.
pub enum TokenSecretLookup {
    /// No Secret of that name: the controller may create it.
    Absent,
    /// The operator's own (or opted in), read whole.
    Ours(Box<Secret>),
    /// Someone else's: the state says whose and what to do.
    Refused(State),
}

/// The Secret `name` if it carries `label_selector`, read whole; `Err(meta)` with its metadata
/// alone if it exists without the label; `Ok(None)` if there is no such Secret.
async fn get_if_labelled(
    secrets: &Api<Secret>,
    name: &str,
    label_selector: &str,
    action: &'static str,
) -> Result<Result<Option<Secret>, Box<kube::core::PartialObjectMeta<Secret>>>, Error> {
    let params = ListParams::default()
        .fields(&format!("metadata.name={name}"))
        .labels(label_selector);
    let listed = secrets.list(&params).await.map_err(kube_err(action))?;
    if let Some(secret) = listed.items.into_iter().next() {
        return Ok(Ok(Some(secret)));
    }
    match secrets
        .get_metadata_opt(name)
        .await
        .map_err(kube_err(action))?
    {
        Some(meta) => Ok(Err(Box::new(meta))),
        None => Ok(Ok(None)),
    }
}

/// Finds the token Secret and judges whether this connection may use it.
pub async fn find_token_secret(
    conn: &XeroConnection,
    secrets: &Api<Secret>,
) -> Result<TokenSecretLookup, Error> {
    let name = conn.token_secret_name();
    let conn_name = conn.metadata.name.as_deref().unwrap_or_default();
    let action = "reading the token Secret";
    let judge = |secret: Secret| match token_secret_verdict(
        &secret.metadata,
        Some(secret.type_.as_deref().unwrap_or_default()),
        &conn.metadata,
    ) {
        TokenSecretVerdict::Ours => TokenSecretLookup::Ours(Box::new(secret)),
        refused => TokenSecretLookup::Refused(refusal(conn, &name, refused)),
    };
    let selector = format!("{LABEL_CONNECTION}={conn_name}");
    match get_if_labelled(secrets, &name, &selector, action).await? {
        Ok(None) => Ok(TokenSecretLookup::Absent),
        Ok(Some(secret)) => Ok(judge(secret)),
        // Unlabelled: ours only if we created it (a consumer may have dropped the label).
        Err(meta) => match token_secret_verdict(&meta.metadata, None, &conn.metadata) {
            TokenSecretVerdict::Ours => {
                match secrets.get_opt(&name).await.map_err(kube_err(action))? {
                    Some(secret) => Ok(judge(secret)),
                    None => Ok(TokenSecretLookup::Absent),
                }
            }
            refused => Ok(TokenSecretLookup::Refused(refusal(conn, &name, refused))),
        },
    }
}

/// The condition for a refused token Secret. Its author may not be able to read that Secret, so
/// the condition states the rule, not what the Secret is (its type, owner or labels); the
/// operator's log, which only its admins read, has the details.
fn refusal(conn: &XeroConnection, secret: &str, verdict: TokenSecretVerdict) -> State {
    let conn_name = conn.metadata.name.as_deref().unwrap_or_default();
    let (TokenSecretVerdict::InUse(detail) | TokenSecretVerdict::NotOwned(detail)) = &verdict
    else {
        unreachable!("only refusals are turned into a state")
    };
    tracing::info!(connection = conn_name, namespace = ?conn.metadata.namespace, secret, detail, "token Secret refused");
    match verdict {
        TokenSecretVerdict::InUse(_) => State::TokenSecretInUse(format!(
            "Secret {secret:?} belongs to another XeroConnection or controller: a token Secret \
             serves one connection; name another tokenSecretName (a Secret kept from a deleted \
             connection is handed over by someone who may write it: docs/security.md)"
        )),
        _ => State::TokenSecretNotOwned(format!(
            "Secret {secret:?} is not available to this connection: an existing Secret is used \
             only if it is Opaque, has no other controlling owner and is opted in by someone who \
             may write it: kubectl label secret {secret} {LABEL_CONNECTION}={conn_name}"
        )),
    }
}

/// The text of `key` in `secret`, trimmed; `None` when missing, empty or not UTF-8.
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Reads the app's client id and secret from the client Secret, if it is opted in.
pub async fn read_client_secret(
    conn: &XeroConnection,
    secrets: &Api<Secret>,
) -> StepResult<ClientCredentials> {
    let r = &conn.spec.client_secret_ref;
    let selector = format!("{LABEL_CLIENT_CREDENTIALS}=true");
    let secret =
        match get_if_labelled(secrets, &r.name, &selector, "reading the client Secret").await? {
            Ok(Some(secret)) if is_client_secret_opted_in(&secret.metadata) => secret,
            Ok(None) => {
                return Ok(Err(State::MissingClientSecret(format!(
                    "client Secret {:?} not found",
                    r.name
                ))));
            }
            Ok(Some(_)) | Err(_) => {
                return Ok(Err(State::ClientSecretNotOptedIn(format!(
                    "client Secret {name:?} is not opted in: someone who may write it labels it \
                 (kubectl label secret {name} {LABEL_CLIENT_CREDENTIALS}=true); then every \
                 connection in this namespace may use it and their consumers can read it",
                    name = r.name
                ))));
            }
        };
    if let Some(key) = [&r.client_id_key, &r.client_secret_key]
        .into_iter()
        .find(|k| !is_client_key_opted_in(&secret.metadata, k))
    {
        return Ok(Err(State::ClientSecretNotOptedIn(format!(
            "key {key:?} of client Secret {:?} is not opted in: only client_id, client_secret \
             and the keys its annotation {ANN_CLIENT_CREDENTIAL_KEYS} lists may be read",
            r.name
        ))));
    }
    let value = |key: &str| secret_text(&secret, key);
    match (value(&r.client_id_key), value(&r.client_secret_key)) {
        (Some(client_id), Some(secret)) => Ok(Ok(ClientCredentials {
            client_id,
            client_secret: Sensitive::new(secret),
        })),
        (id, _) => {
            let missing = if id.is_none() {
                &r.client_id_key
            } else {
                &r.client_secret_key
            };
            Ok(Err(State::MissingClientSecret(format!(
                "client Secret {:?} has no non-empty key {missing:?}",
                r.name
            ))))
        }
    }
}
