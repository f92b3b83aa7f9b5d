//! The XeroConnection CRD against a real API server: installation with kubectl, `kubectl explain`,
//! printer columns, defaults, and rejection of invalid specs by the server itself.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Resource};
use serde_json::{Value, json};
use xero_operator::crd::{Grant, RefreshPolicy, XeroConnection};

fn connection(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "xero-operator.io/v1alpha1",
        "kind": "XeroConnection",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("connection json")
}

async fn dynamic_api(ns: &str) -> Api<DynamicObject> {
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let ar = ApiResource::erase::<XeroConnection>(&());
    Api::namespaced_with(client, ns, &ar)
}

async fn fresh_namespace(hint: &str) -> String {
    let client = common::admin_client().await;
    common::namespace(&client, hint).await
}

#[tokio::test]
async fn kubectl_apply_of_crds_dir_succeeds_and_explain_shows_field_docs() {
    // Make sure the control plane is up before shelling out.
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let crds_dir = common::repo_path("crds");
    let out = common::kubectl(&["apply", "-f", crds_dir.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "kubectl apply -f crds/: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The OpenAPI document is republished a moment after the CRD changes: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let explained = loop {
        let out = common::kubectl(&["explain", "xeroconnection.spec"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("clientSecretRef") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl explain never succeeded: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // kubectl wraps descriptions at its terminal width; compare word by word.
    let explained = explained.split_whitespace().collect::<Vec<_>>().join(" ");
    for doc in [
        "The Secret (in this namespace) holding the Xero app's client id and client secret.",
        "How access tokens are obtained.",
        "ServiceAccounts allowed to read the token Secret",
    ] {
        assert!(
            explained.contains(doc),
            "explain lacks {doc:?}:\n{explained}"
        );
    }
}

#[tokio::test]
async fn a_minimal_connection_is_accepted_and_defaulted_by_the_server() {
    let ns = fresh_namespace("crd-defaults").await;
    let api = dynamic_api(&ns).await;
    api.create(
        &PostParams::default(),
        &connection("acme", json!({"clientSecretRef": {"name": "xero-app"}})),
    )
    .await
    .expect("minimal connection accepted");

    let typed: Api<XeroConnection> = Api::namespaced(common::admin_client().await, &ns);
    let stored = typed.get("acme").await.expect("read back");
    // These defaults were filled in by the API server from the schema, not by serde here: the
    // raw object must carry them too.
    let raw = api.get("acme").await.expect("raw read back");
    assert_eq!(raw.data["spec"]["grant"], "RefreshToken");
    assert_eq!(raw.data["spec"]["refresh"]["clockSkewSeconds"], 5);
    assert_eq!(
        raw.data["spec"]["clientSecretRef"]["clientIdKey"],
        "client_id"
    );
    assert_eq!(stored.spec.grant, Grant::RefreshToken);
    assert_eq!(stored.spec.refresh.policy, RefreshPolicy::OnExpiry);
    assert_eq!(stored.token_secret_name(), "acme-xero-token");
}

/// Each case: a name, a spec, and a piece of the message the API server must answer with.
fn invalid_specs() -> Vec<(&'static str, Value, &'static str)> {
    let secret = json!({"name": "xero-app"});
    vec![
        (
            "wrong-enum",
            json!({"clientSecretRef": secret, "grant": "Password"}),
            "supported values: \"RefreshToken\", \"ClientCredentials\"",
        ),
        (
            "negative-duration",
            json!({"clientSecretRef": secret, "refresh": {"clockSkewSeconds": -5}}),
            "should be greater than or equal to 0",
        ),
        (
            "lease-too-short",
            json!({"clientSecretRef": secret, "refresh": {"leaseDurationSeconds": 1}}),
            "should be greater than or equal to 5",
        ),
        (
            "missing-client-secret-ref",
            json!({"grant": "RefreshToken"}),
            "spec.clientSecretRef: Required value",
        ),
        (
            "client-secret-ref-without-name",
            json!({"clientSecretRef": {"clientIdKey": "id"}}),
            "spec.clientSecretRef.name: Required value",
        ),
        (
            "bad-endpoint-url",
            json!({"clientSecretRef": secret, "endpoints": {"tokenUrl": "not a url"}}),
            "must be an absolute http:// or https:// URL with a host",
        ),
        (
            "ftp-endpoint-url",
            json!({"clientSecretRef": secret, "endpoints": {"connectionsUrl": "ftp://example.com/x"}}),
            "must be an absolute http:// or https:// URL with a host",
        ),
        (
            "ahead-of-expiry-without-margin",
            json!({"clientSecretRef": secret, "refresh": {"policy": "AheadOfExpiry"}}),
            "policy AheadOfExpiry needs aheadOfExpirySeconds",
        ),
        (
            "margin-without-ahead-of-expiry",
            json!({"clientSecretRef": secret, "refresh": {"aheadOfExpirySeconds": 60}}),
            "aheadOfExpirySeconds is only allowed with policy AheadOfExpiry",
        ),
        (
            "margin-longer-than-token-lifetime",
            json!({"clientSecretRef": secret, "refresh": {"policy": "AheadOfExpiry", "aheadOfExpirySeconds": 1800}}),
            "should be less than or equal to 1500",
        ),
        (
            "skew-plus-margin-longer-than-token-lifetime",
            json!({"clientSecretRef": secret, "refresh": {"policy": "AheadOfExpiry", "aheadOfExpirySeconds": 1400, "clockSkewSeconds": 200}}),
            "clockSkewSeconds + aheadOfExpirySeconds is at most 1500",
        ),
        (
            "revoke-without-refresh-token",
            json!({"clientSecretRef": secret, "grant": "ClientCredentials", "revokeOnDelete": true}),
            "revokeOnDelete needs a refresh token",
        ),
        (
            "scope-with-space",
            json!({"clientSecretRef": secret, "grant": "ClientCredentials", "scopes": ["accounting.invoices openid"]}),
            "each scope is one word",
        ),
        (
            "bad-token-secret-name",
            json!({"clientSecretRef": secret, "tokenSecretName": "Not_A_Name"}),
            "spec.tokenSecretName: Invalid value",
        ),
        (
            "unknown-field-type",
            json!({"clientSecretRef": secret, "consumers": [{"serviceAccount": 7}]}),
            "spec.consumers[0].serviceAccount: Invalid value: \"integer\"",
        ),
    ]
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server_with_a_readable_message() {
    let ns = fresh_namespace("crd-invalid").await;
    let api = dynamic_api(&ns).await;
    let mut failures = Vec::new();
    for (name, spec, want) in invalid_specs() {
        match api
            .create(&PostParams::default(), &connection(name, spec))
            .await
        {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(want) {
                    failures.push(format!(
                        "{name}: got {} {:?}, want 422 containing {want:?}",
                        status.code, status.message
                    ));
                }
            }
            Err(other) => failures.push(format!("{name}: unexpected error {other}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn token_secret_name_cannot_change_after_creation() {
    let ns = fresh_namespace("crd-immutable").await;
    let api = dynamic_api(&ns).await;
    api.create(
        &PostParams::default(),
        &connection(
            "acme",
            json!({"clientSecretRef": {"name": "xero-app"}, "tokenSecretName": "acme-token"}),
        ),
    )
    .await
    .expect("create");
    let patch = |spec: Value| Patch::Merge(json!({"spec": spec}));
    let changed = api
        .patch(
            "acme",
            &PatchParams::default(),
            &patch(json!({"tokenSecretName": "other"})),
        )
        .await;
    assert!(
        matches!(&changed, Err(kube::Error::Api(s)) if s.message.contains("tokenSecretName is immutable")),
        "{changed:?}"
    );
    let removed = api
        .patch(
            "acme",
            &PatchParams::default(),
            &patch(json!({"tokenSecretName": null})),
        )
        .await;
    assert!(
        matches!(&removed, Err(kube::Error::Api(s)) if s.message.contains("cannot be added or removed")),
        "{removed:?}"
    );
    // Other fields still change freely.
    api.patch(
        "acme",
        &PatchParams::default(),
        &patch(json!({"refresh": {"clockSkewSeconds": 10}})),
    )
    .await
    .expect("unrelated change accepted");
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let ns = fresh_namespace("crd-columns").await;
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let api: Api<XeroConnection> = Api::namespaced(client, &ns);
    let conn: XeroConnection = serde_json::from_value(json!({
        "apiVersion": "xero-operator.io/v1alpha1",
        "kind": "XeroConnection",
        "metadata": {"name": "acme"},
        "spec": {"clientSecretRef": {"name": "xero-app"}},
    }))
    .expect("connection");
    api.create(&PostParams::default(), &conn)
        .await
        .expect("create");
    let status = json!({
        "apiVersion": XeroConnection::api_version(&()),
        "kind": XeroConnection::kind(&()),
        "status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "TokenValid",
                "message": "access token valid", "lastTransitionTime": "2026-01-01T00:00:00Z",
            }],
            "accessTokenExpiresAt": "2099-01-01T00:00:00Z",
            "lastRefreshedBy": "controller",
        }
    });
    api.patch_status(
        "acme",
        &PatchParams::apply("xero-operator-tests").force(),
        &Patch::Apply(&status),
    )
    .await
    .expect("status subresource accepts a status");

    let out = common::kubectl(&["get", "xc", "-n", &ns]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "REASON", "EXPIRES", "REFRESHED-BY", "AGE"]
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["acme", "True", "TokenValid"], "{table}");
    assert_eq!(row[4], "controller", "{table}");
}

/// The Kubernetes releases the proving ground pins (`proving-ground/controlplane/v*/go.mod`).
fn pinned_releases() -> Vec<String> {
    let dir = common::repo_path("proving-ground/controlplane");
    let mut releases = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("read the control plane modules") {
        let go_mod = entry.expect("entry").path().join("go.mod");
        let Ok(text) = std::fs::read_to_string(&go_mod) else {
            continue;
        };
        releases.extend(text.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("k8s.io/kubernetes")).then(|| words.next().map(str::to_owned))?
        }));
    }
    assert!(
        releases.len() >= 2,
        "an oldest and a newest release: {releases:?}"
    );
    releases
}

#[tokio::test]
async fn kubectl_version_reports_the_real_server_version() {
    let _ = common::admin_client().await;
    let out = common::kubectl(&["version", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version: Value = serde_json::from_slice(&out.stdout).expect("version json");
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .expect("server version");
    assert!(
        pinned_releases().iter().any(|r| r == server),
        "the server is one of the pinned releases {:?}: {server}",
        pinned_releases()
    );
    // The control plane's binaries are that release's, kubectl included (no version skew).
    assert_eq!(version["clientVersion"]["gitVersion"], server);
    let bin_dir = common::env().bin_dir.file_name().expect("bin dir name");
    assert!(
        bin_dir.to_string_lossy().starts_with(&format!("{server}-")),
        "{bin_dir:?}"
    );
}

#[tokio::test]
async fn the_controller_starts_on_supported_releases_and_refuses_older_ones() {
    use xero_operator::controller::kubernetes_version::{
        MinorVersion, OLDEST_SUPPORTED, require_supported,
    };
    let client = common::admin_client().await;
    // Every release the suites run on is supported: the check passes on this server.
    let info = require_supported(&client, OLDEST_SUPPORTED)
        .await
        .expect("/version")
        .expect("the server under test is a supported release");
    // The oldest release the suites run on is the floor the controller and the chart declare.
    let oldest_pinned = pinned_releases()
        .iter()
        .filter_map(|r| {
            r.strip_prefix("v1.")?
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .min();
    assert_eq!(oldest_pinned, Some(OLDEST_SUPPORTED.minor));
    // The same server read as too old when the floor is above it: the refusal names the
    // release the server reported and what to do.
    let minor: u32 = info
        .minor
        .parse()
        .expect("a plain minor from the test server");
    let above = MinorVersion {
        major: 1,
        minor: minor + 1,
    };
    let message = require_supported(&client, above)
        .await
        .expect("/version")
        .expect_err("a floor above the server refuses it")
        .to_string();
    assert!(
        message.contains(&format!("is 1.{minor} ({})", info.git_version)),
        "{message}"
    );
    assert!(
        message.contains(&format!("supports {above} and later")),
        "{message}"
    );
    assert!(
        message.contains("--allow-unsupported-kubernetes"),
        "{message}"
    );
}

#[tokio::test]
async fn rbac_is_enforced_for_the_non_admin_user() {
    let ns = fresh_namespace("crd-rbac").await;
    let user = common::user_client().await;
    let secrets: Api<Secret> = Api::namespaced(user, &ns);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("the non-admin user must be forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn the_controller_manager_garbage_collects_owned_objects() {
    let ns = fresh_namespace("crd-gc").await;
    let client = common::admin_client().await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    let owner = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).expect("cm"),
        )
        .await
        .expect("owner");
    let owner_ref = owner.controller_owner_ref(&()).expect("owner ref");
    let child: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "child", "ownerReferences": [owner_ref]}
    }))
    .expect("child");
    api.create(&PostParams::default(), &child)
        .await
        .expect("child");
    api.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get_opt("child").await.expect("get child").is_some() {
        assert!(
            Instant::now() < deadline,
            "the owned ConfigMap was never garbage-collected"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A stand-in API server that answers only `/version`, as a managed 1.31 cluster does, and a
/// kubeconfig pointing at it: what the operator's binary sees at start on an older cluster.
async fn old_cluster(dir: &std::path::Path) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        "/version",
        axum::routing::get(|| async {
            axum::Json(json!({
                "major": "1", "minor": "31+", "gitVersion": "v1.31.4-eks-1",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
                "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let kubeconfig = dir.join("kubeconfig");
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "old",
        "clusters": [{"name": "old", "cluster": {"server": server}}],
        "users": [{"name": "old", "user": {}}],
        "contexts": [{"name": "old", "context": {"cluster": "old", "user": "old"}}]
    });
    std::fs::write(&kubeconfig, config.to_string()).expect("write kubeconfig");
    (kubeconfig, task)
}

/// The operator's binary on `kubeconfig`'s cluster with `args`, its metrics on a free port.
fn operator(kubeconfig: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_xero-operator"));
    cmd.args(["--metrics-addr", "127.0.0.1:0"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("XERO_OPERATOR_ALLOW_UNSUPPORTED_KUBERNETES")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn the_operator_binary_refuses_an_older_cluster_unless_told_to_run_anyway() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dir = tempfile::tempdir().expect("temp dir");
    let (kubeconfig, stub) = old_cluster(dir.path()).await;

    // Refused: exit 1 and a message naming the release found, the range and the override.
    let out = tokio::time::timeout(Duration::from_secs(60), operator(&kubeconfig, &[]).output())
        .await
        .expect("the operator stops by itself")
        .expect("run xero-operator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is 1.31 (v1.31.4-eks-1); xero-operator supports 1.32 and later"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--allow-unsupported-kubernetes"),
        "{stderr}"
    );

    // Told to run anyway: it warns and goes on (it is stopped here once it has said so).
    let mut child = operator(&kubeconfig, &["--allow-unsupported-kubernetes"])
        .spawn()
        .expect("start xero-operator");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let warned = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.contains("WARN") && line.contains("running anyway") {
                return line;
            }
        }
        panic!("the operator exited without the warning");
    })
    .await
    .expect("the warning within a minute");
    assert!(warned.contains("is 1.31 (v1.31.4-eks-1)"), "{warned}");
    assert!(
        child.try_wait().expect("poll").is_none(),
        "still running after the warning"
    );
    child.kill().await.expect("stop it");
    stub.abort();
}
