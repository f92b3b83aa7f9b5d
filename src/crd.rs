//! The `XeroConnection` custom resource: one Xero OAuth 2.0 token set, kept valid in one Secret.
//!
//! These Rust types are the source of truth for the CRD. `make crds` prints them as YAML into
//! `crds/`; every `///` comment here becomes a description that `kubectl explain` shows, and every
//! `#[x_kube(validation)]` rule is enforced by the API server itself, so a bad spec is refused at
//! `kubectl apply` time instead of failing later in the controller.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every custom resource of this operator.
pub const GROUP: &str = "xero-operator.io";
/// API version of the `XeroConnection` resource.
pub const VERSION: &str = "v1alpha1";

/// Xero's token endpoint (refresh, client credentials and authorization-code grants).
pub const XERO_TOKEN_URL: &str = "https://identity.xero.com/connect/token";
/// Xero's endpoint listing the tenants a token can reach.
pub const XERO_CONNECTIONS_URL: &str = "https://api.xero.com/connections";
/// Xero's refresh-token revocation endpoint.
pub const XERO_REVOCATION_URL: &str = "https://identity.xero.com/connect/revocation";

/// Default clock skew: xero-node allows 5 s on `nbf`; the same margin absorbs small differences
/// between the clocks of the controller, the consumers and Xero.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u32 = 5;
/// Default refresh lease: a refresh is one HTTPS round trip plus one Secret write, normally well
/// under a second; 30 s leaves room for slow networks while keeping the wait after a crashed
/// holder short, and stays far inside Xero's 30-minute grace period for a used refresh token.
pub const DEFAULT_LEASE_DURATION_SECONDS: u32 = 30;
/// Xero access tokens live 30 minutes; a refresh margin must leave most of that lifetime in use,
/// so "ahead of expiry" is capped at 25 minutes.
pub const MAX_AHEAD_OF_EXPIRY_SECONDS: u32 = 1500;
/// Suffix of the default token Secret name: `<connection name>-xero-token`.
pub const TOKEN_SECRET_SUFFIX: &str = "-xero-token";

/// A connection to Xero: which app credentials to use, how tokens are obtained, and which Secret
/// holds the current token pair that the controller and the consumers share.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "xero-operator.io",
    version = "v1alpha1",
    kind = "XeroConnection",
    plural = "xeroconnections",
    shortname = "xc",
    namespaced,
    doc = "A Xero OAuth 2.0 connection whose token pair the operator keeps valid in one Secret.",
    status = "XeroConnectionStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    // A `date` column shows ages: `<invalid>` for a future time, and an expired token's age reads
    // like time left. The timestamp itself is what a person needs.
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.accessTokenExpiresAt","description":"When the current access token expires (UTC)"}"#,
    printcolumn = r#"{"name":"Refreshed-By","type":"string","jsonPath":".status.lastRefreshedBy","description":"Who made the last refresh: the controller or a consumer"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 63").message("the name of a XeroConnection is at most 63 characters: it is the value of the xero-operator.io/connection label on its token Secret and consumer Role")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.grant != 'ClientCredentials' || !has(self.revokeOnDelete) || !self.revokeOnDelete").message("revokeOnDelete needs a refresh token: it cannot be set with grant ClientCredentials"),
    validation = Rule::new("has(self.tokenSecretName) == has(oldSelf.tokenSecretName)").message("tokenSecretName cannot be added or removed after creation: consumers would lose track of the Secret"),
)]
pub struct XeroConnectionSpec {
    /// The Secret (in this namespace) holding the Xero app's client id and client secret. It must
    /// carry the label `xero-operator.io/client-credentials: "true"`, set by someone who may
    /// write it: every connection in the namespace may then use it, and their consumers can read
    /// the credentials (they need them to refresh).
    pub client_secret_ref: ClientSecretRef,

    /// How access tokens are obtained. `RefreshToken` (the default) is Xero's normal web app flow:
    /// a refresh token, rotated on every use, is stored in the token Secret. `ClientCredentials`
    /// is a Xero Custom Connection: a new access token is requested with the client credentials
    /// alone, and there is no refresh token.
    #[serde(default)]
    pub grant: Grant,

    /// Scopes to request with the `ClientCredentials` grant (space-free names such as
    /// `accounting.invoices`). Ignored by the `RefreshToken` grant, whose scopes were fixed when a
    /// person authorised the app. Empty means the scopes configured on the Custom Connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(s, s.matches('^[A-Za-z0-9._:/-]+$'))").message("each scope is one word: letters, digits and . _ : / -"))]
    pub scopes: Vec<String>,

    /// Name of the Secret (in this namespace) that holds the current token pair. Consumers mount
    /// or read it. Defaults to `<connection name>-xero-token`. Immutable once set, so consumers
    /// never lose track of it. The controller creates `<connection name>-xero-token` itself;
    /// any other name must already exist. An existing Secret is used only if it is Opaque, owned
    /// by no other controller, and labelled `xero-operator.io/connection: <this connection's
    /// name>` (or was created by the controller for this connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("tokenSecretName is immutable: consumers would lose track of the Secret"))]
    pub token_secret_name: Option<String>,

    /// When and how the token is refreshed.
    #[serde(default)]
    pub refresh: RefreshSettings,

    /// Overrides for Xero's endpoints, to talk to the Xero emulator or an egress proxy. Each
    /// defaults to Xero's real endpoint. The host of each must be in the operator's endpoint
    /// allowlist (`--allowed-endpoint-hosts`; Xero's own hosts by default), else the connection
    /// gets the condition `EndpointNotAllowed` and no request is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,

    /// ServiceAccounts allowed to read the token Secret and to take over its refresh when they find
    /// the access token expired. The controller grants each one a Role limited to this one Secret
    /// (`<name>-xero-token-consumer`; a Role of that name that the controller did not create is
    /// never changed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub consumers: Vec<ConsumerRef>,

    /// Revoke the refresh token at Xero when this connection is deleted. Revocation disconnects
    /// every tenant of that user from the app, so it is off by default. The connection then
    /// carries the finalizer `xero-operator.io/cleanup`: deleting it waits for the operator.
    #[serde(default, skip_serializing_if = "is_false")]
    pub revoke_on_delete: bool,

    /// Keep the token Secret when this connection is deleted (by default it is owned by the
    /// connection and deleted with it). Use it to move a connection without re-authorising: the
    /// kept Secret is released (no owner, label or uid mark), and a new connection uses it once
    /// someone who may write it labels it `xero-operator.io/connection: <new name>`. The
    /// connection then carries the finalizer `xero-operator.io/cleanup` (deleting it waits for
    /// the operator); set on an existing connection, it protects the Secret once that finalizer
    /// is there. Without either option a connection has no finalizer and is deleted at once.
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_token_secret_on_delete: bool,
}

/// Where the Xero app's client credentials are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of the Secret, in the connection's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Key of the client id in that Secret. Defaults to `client_id`.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub client_id_key: String,

    /// Key of the client secret in that Secret. Defaults to `client_secret`.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub client_secret_key: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_client_id_key() -> String {
    "client_id".to_owned()
}

fn default_client_secret_key() -> String {
    "client_secret".to_owned()
}

/// The OAuth 2.0 grant used to obtain access tokens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Grant {
    /// Xero's web app flow: a rotating refresh token, first obtained by a person authorising the
    /// app (`xero-token authorize`).
    #[default]
    RefreshToken,
    /// Xero Custom Connections: the client credentials alone obtain an access token.
    ClientCredentials,
}

/// When the token is refreshed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RefreshPolicy {
    /// Refresh only once the access token has expired (within the clock skew). The fewest calls
    /// to Xero; consumers that find it expired take over the refresh themselves.
    #[default]
    OnExpiry,
    /// Refresh `aheadOfExpirySeconds` before expiry, for pods that only read the mounted file
    /// (the kubelet updates mounted Secrets a minute or more late).
    AheadOfExpiry,
}

/// Refresh timing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.policy != 'AheadOfExpiry' || has(self.aheadOfExpirySeconds)").message("policy AheadOfExpiry needs aheadOfExpirySeconds"),
    validation = Rule::new("self.policy == 'AheadOfExpiry' || !has(self.aheadOfExpirySeconds)").message("aheadOfExpirySeconds is only allowed with policy AheadOfExpiry"),
    validation = Rule::new("self.clockSkewSeconds + (has(self.aheadOfExpirySeconds) ? self.aheadOfExpirySeconds : 0) <= 1500").message("clockSkewSeconds + aheadOfExpirySeconds is at most 1500: Xero's access tokens live 1800 s, and a larger margin would refresh without end"),
)]
pub struct RefreshSettings {
    /// `OnExpiry` (default): refresh only when the access token has expired. `AheadOfExpiry`:
    /// refresh `aheadOfExpirySeconds` before it expires.
    #[serde(default)]
    pub policy: RefreshPolicy,

    /// With policy `AheadOfExpiry`: how many seconds before expiry to refresh (1 to 1500; Xero's
    /// access tokens live 1800 s). Not allowed with `OnExpiry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_AHEAD_OF_EXPIRY_SECONDS))]
    pub ahead_of_expiry_seconds: Option<u32>,

    /// Seconds of clock difference tolerated between this cluster and Xero: a token is treated as
    /// expired this long before its `expires_at`. 0 to 300, default 5.
    #[serde(default = "default_clock_skew_seconds")]
    #[schemars(range(min = 0, max = 300))]
    pub clock_skew_seconds: u32,

    /// How long a party that claimed the refresh may hold it before another may take over (a
    /// holder that crashed is replaced after this). 5 to 600 seconds, default 30.
    #[serde(default = "default_lease_duration_seconds")]
    #[schemars(range(min = 5, max = 600))]
    pub lease_duration_seconds: u32,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            policy: RefreshPolicy::default(),
            ahead_of_expiry_seconds: None,
            clock_skew_seconds: DEFAULT_CLOCK_SKEW_SECONDS,
            lease_duration_seconds: DEFAULT_LEASE_DURATION_SECONDS,
        }
    }
}

fn default_clock_skew_seconds() -> u32 {
    DEFAULT_CLOCK_SKEW_SECONDS
}

fn default_lease_duration_seconds() -> u32 {
    DEFAULT_LEASE_DURATION_SECONDS
}

/// Endpoint overrides. Each must be an absolute `http` or `https` URL.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Token endpoint. Default `https://identity.xero.com/connect/token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(URL_RULE).message(URL_MESSAGE))]
    pub token_url: Option<String>,

    /// Connections (tenants) endpoint. Default `https://api.xero.com/connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(URL_RULE).message(URL_MESSAGE))]
    pub connections_url: Option<String>,

    /// Revocation endpoint. Default `https://identity.xero.com/connect/revocation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(URL_RULE).message(URL_MESSAGE))]
    pub revocation_url: Option<String>,
}

/// CEL rule for an endpoint override: an absolute http(s) URL with a host.
const URL_RULE: &str =
    "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''";
const URL_MESSAGE: &str = "must be an absolute http:// or https:// URL with a host";

/// A ServiceAccount allowed to use and refresh the token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerRef {
    /// Name of the ServiceAccount.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub service_account: String,

    /// Namespace of the ServiceAccount. Defaults to the connection's namespace; another
    /// namespace only if the operator allows it (`--allow-cross-namespace-consumers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
}

/// What the controller last observed of this connection. Never holds a token or a secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct XeroConnectionStatus {
    /// Standard conditions, `Ready` first. `Ready` is True while the token Secret holds a usable
    /// access token; its reason says why not otherwise (e.g. `ReauthorizationRequired`,
    /// `MissingClientSecret`). Exactly one of `Ready`, `Reconciling` (not ready, and the operator
    /// is getting there on its own: a refresh under way, Xero unavailable or rate limiting) and
    /// `Stalled` (not ready until a person acts: authorise, fix a Secret or the spec) is True,
    /// each with the same reason, as kstatus-aware tools expect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Name of the token Secret in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_name: Option<String>,

    /// When the current access token expires (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<Time>,

    /// When the token pair was last refreshed (RFC 3339, UTC), by anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,

    /// Who made the last refresh: the identity of the party that stored it, `controller/<host>/…`
    /// for the controller (or its `--identity`), the consumer's identity otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refreshed_by: Option<String>,

    /// How many refreshes the controller has seen since the connection was created.
    #[serde(default)]
    pub refresh_count: u64,

    /// The Xero tenants (organisations) the token can reach, from Xero's connections endpoint.
    /// Listed when the connection first has a token, after each new authorisation, and
    /// otherwise again after 5 to 6 hours (a time of its own per connection; a tenant
    /// disconnected in Xero shows then); not on every refresh, which would double the calls to
    /// Xero.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<Tenant>,

    /// When `tenants` was last listed from Xero (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants_listed_at: Option<Time>,

    /// The authorisation `tenants` was listed under: the `authentication_event_id` of the access
    /// token used (an identifier, not a credential). A token from a new authorisation has a new
    /// one, and the tenants are listed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants_authentication_event: Option<String>,
}

/// One Xero tenant reachable with the token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    /// The tenant id: the value of the `xero-tenant-id` header for API calls.
    pub tenant_id: String,
    /// `ORGANISATION`, `PRACTICE`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_type: Option<String>,
    /// The organisation's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_name: Option<String>,
    /// The connection id (used to disconnect the tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
}

/// The CRD as it is installed: generated from these types, with each description reflowed so
/// `kubectl explain` wraps it itself (rustdoc's hard line breaks would show as ragged lines).
pub fn definition() -> serde_json::Value {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(XeroConnection::crd()).expect("a CRD always serializes");
    reflow_descriptions(&mut crd);
    crd
}

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn definition_yaml() -> String {
    serde_saphyr::to_string(&definition()).expect("a JSON value always serializes as YAML")
}

/// Joins the lines of every `description` into one paragraph per blank-line-separated block.
fn reflow_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|para| para.split_whitespace().collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => reflow_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

/// Installs (server-side apply) the CRD and waits until the API server serves it.
pub async fn install(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = definition();
    let name = crd["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    api.patch(
        &name,
        &PatchParams::apply("xero-operator").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let established = kube::runtime::wait::await_condition(
        api,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    );
    // Establishing takes well under a second; give up after 30 s and let the caller's next call
    // report what is wrong.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), established).await;
    Ok(())
}

impl XeroConnection {
    /// The name of the token Secret: the spec's, or [`Self::default_token_secret_name`].
    pub fn token_secret_name(&self) -> String {
        match &self.spec.token_secret_name {
            Some(name) => name.clone(),
            None => self.default_token_secret_name(),
        }
    }

    /// `<connection name>-xero-token`: the one name under which the controller creates a token
    /// Secret itself.
    pub fn default_token_secret_name(&self) -> String {
        format!(
            "{}{TOKEN_SECRET_SUFFIX}",
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> XeroConnection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "xero-operator.io/v1alpha1",
            "kind": "XeroConnection",
            "metadata": {"name": "acme", "namespace": "default"},
            "spec": {"clientSecretRef": {"name": "xero-app"}}
        }))
        .expect("minimal connection parses")
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let conn = minimal();
        assert_eq!(conn.spec.grant, Grant::RefreshToken);
        assert_eq!(conn.spec.client_secret_ref.client_id_key, "client_id");
        assert_eq!(
            conn.spec.client_secret_ref.client_secret_key,
            "client_secret"
        );
        assert_eq!(conn.spec.refresh.policy, RefreshPolicy::OnExpiry);
        assert_eq!(
            conn.spec.refresh.clock_skew_seconds,
            DEFAULT_CLOCK_SKEW_SECONDS
        );
        assert_eq!(
            conn.spec.refresh.lease_duration_seconds,
            DEFAULT_LEASE_DURATION_SECONDS
        );
    }

    #[test]
    fn token_secret_name_defaults_to_connection_name() {
        let mut conn = minimal();
        assert_eq!(conn.token_secret_name(), "acme-xero-token");
        conn.spec.token_secret_name = Some("shared-token".into());
        assert_eq!(conn.token_secret_name(), "shared-token");
    }

    #[test]
    fn descriptions_are_reflowed_but_keep_paragraphs() {
        let mut v = serde_json::json!({"description": "one\ntwo  three\n\nfour\nfive", "properties": {"a": {"description": "x\ny"}}});
        reflow_descriptions(&mut v);
        assert_eq!(v["description"], "one two three\n\nfour five");
        assert_eq!(v["properties"]["a"]["description"], "x y");
    }

    #[test]
    fn crd_carries_docs_and_cel_rules() {
        let crd = definition().to_string();
        assert!(
            crd.contains("x-kubernetes-validations"),
            "CEL rules missing"
        );
        assert!(crd.contains("policy AheadOfExpiry needs aheadOfExpirySeconds"));
        assert!(crd.contains("The Secret (in this namespace) holding the Xero app"));
        assert!(crd.contains("\"shortNames\":[\"xc\"]"));
        assert!(
            !crd.contains("Xero app\\nholds"),
            "descriptions are reflowed"
        );
    }
}
