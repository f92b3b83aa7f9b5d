//! The Helm chart's security objects on the test API server, and clients that act as the
//! identities they govern: the operator's ServiceAccount, a consumer's, a namespace user.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

/// Whether the chart's ValidatingAdmissionPolicies are installed with its RBAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policies {
    On,
    Off,
}

/// `helm` (installed by scripts/helm.sh) with `args`, reaching no cluster; its stdout.
pub fn helm_template(args: &[&str]) -> String {
    let out = std::process::Command::new(super::helm_path())
        .args(args)
        .env("KUBECONFIG", super::NO_CLUSTER)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Applies YAML as the admin.
pub fn kubectl_apply(yaml: &str) {
    let out = super::kubectl_with_input(&["apply", "-f", "-"], yaml);
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The admin kubeconfig with a bearer `token` for its user instead of the admin's credentials.
pub fn kubeconfig_with_token(token: &str) -> kube::config::Kubeconfig {
    let mut kubeconfig = kube::config::Kubeconfig::read_from(&super::env().admin_kubeconfig)
        .expect("admin kubeconfig");
    for user in &mut kubeconfig.auth_infos {
        user.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.to_owned().into()),
            ..kube::config::AuthInfo::default()
        });
    }
    kubeconfig
}

/// A client authenticated with a bearer `token` against the test API server.
pub async fn client_with_token(token: &str) -> Client {
    let kubeconfig = kubeconfig_with_token(token);
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    Client::try_from(config).expect("client")
}

/// A token for ServiceAccount `ns/name`, requested through `client` (whose rights must allow
/// `serviceaccounts/token` create).
pub async fn sa_token(client: &Client, ns: &str, name: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .expect("token request");
    sas.create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token status")
        .token
}

/// A client that is ServiceAccount `ns/name` (created if missing).
pub async fn service_account_client(admin: &Client, ns: &str, name: &str) -> Client {
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("sa");
    match Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("ServiceAccount {ns}/{name}: {e}"),
    }
    client_with_token(&sa_token(admin, ns, name).await).await
}

/// The chart's ServiceAccount and RBAC (and, with [`Policies::On`], its admission policies),
/// rendered for release `release` in `ns` as `helm template` does and installed; returns a
/// client that is that ServiceAccount. The RBAC is the cluster-wide one; the policies bind in
/// `ns` alone (`watchNamespaces`), so each test's namespace has the policies it asked for.
pub async fn operator_client(
    admin: &Client,
    ns: &str,
    release: &str,
    policies: Policies,
) -> Client {
    let chart = super::repo_path("charts/xero-operator")
        .display()
        .to_string();
    // `helm template` of the chart's templates `shown` for release `release` in `ns`, for the
    // Kubernetes release under test.
    let server = super::server_version(admin).await;
    let template = |extra: &[&str], shown: &str| {
        let mut args = vec![
            "template",
            release,
            &chart,
            "--namespace",
            ns,
            "--kube-version",
            &server,
        ];
        args.extend_from_slice(extra);
        args.extend(["--show-only", shown]);
        helm_template(&args)
    };
    let rendered = template(
        &["--show-only", "templates/serviceaccount.yaml"],
        "templates/rbac.yaml",
    );
    assert!(rendered.contains("kind: ClusterRole"), "{rendered}");
    kubectl_apply(&rendered);
    if policies == Policies::On {
        let watched = format!("watchNamespaces={{{ns}}}");
        let rendered = template(&["--set", &watched], "templates/admission-policies.yaml");
        assert!(
            rendered.contains("kind: ValidatingAdmissionPolicyBinding"),
            "{rendered}"
        );
        kubectl_apply(&rendered);
    }
    let token = sa_token(admin, ns, &format!("{release}-xero-operator")).await;
    let operator = client_with_token(&token).await;
    if policies == Policies::On {
        wait_for_policies(admin, &operator, ns).await;
    }
    operator
}

/// Waits until the API server enforces both of the chart's policies in `ns` (a new policy takes
/// a moment to reach the admission plugin): dry-run writes that each must refuse.
async fn wait_for_policies(admin: &Client, operator: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{Patch, PatchParams};
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let probe: Secret = serde_json::from_value(json!({
        "metadata": {"name": "policy-probe",
            "labels": {"xero-operator.io/connection": "policy-probe"}}}))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &probe)
        .await
        .expect("the probe Secret");
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "policy-probe"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch"],
            "resourceNames": ["policy-probe"]}]}))
    .expect("role");
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("the probe Role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "policy-probe"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "policy-probe"},
        "subjects": [{"kind": "ServiceAccount", "name": "policy-probe", "namespace": ns}]}))
    .expect("binding");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("the probe RoleBinding");
    let patcher = service_account_client(admin, ns, "policy-probe").await;
    let as_patcher: Api<Secret> = Api::namespaced(patcher, ns);
    let as_operator: Api<Secret> = Api::namespaced(operator.clone(), ns);
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let relabel = json!({"metadata": {"labels": {"probe": "x"}}});
    let plain: Secret = serde_json::from_value(json!({"metadata": {"name": "policy-probe-plain"}}))
        .expect("secret");
    let refused = |r: &Result<Secret, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("ValidatingAdmissionPolicy"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let consumer_refused = refused(
            &as_patcher
                .patch("policy-probe", &dry, &Patch::Merge(&relabel))
                .await,
        );
        let operator_refused = refused(
            &as_operator
                .create(
                    &PostParams {
                        dry_run: true,
                        ..PostParams::default()
                    },
                    &plain,
                )
                .await,
        );
        if consumer_refused && operator_refused {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the chart's admission policies were not enforced within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
