//! The Helm chart and the examples against the real API server: lint, templates with default and
//! non-default values applied with `--dry-run=server`, a real `helm install`, the values schema
//! refusing a wrong type, every example applied, and the install without Helm (`deploy/`).

mod common;

use std::process::Output;

use common::helm;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use serde_json::{Value, json};

fn chart() -> String {
    common::repo_path("charts/xero-operator")
        .display()
        .to_string()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Applies rendered YAML with a server-side dry run in `ns`.
fn dry_run_apply(yaml: &str, ns: &str) {
    let out = common::kubectl_with_input(&["apply", "--dry-run=server", "-n", ns, "-f", "-"], yaml);
    ok(&out, "kubectl apply --dry-run=server");
}

#[test]
fn the_chart_lints() {
    ok(&helm(&["lint", &chart(), "--strict"]), "helm lint");
}

#[test]
fn the_chart_declares_the_supported_range_and_plain_helm_template_renders() {
    use xero_operator::controller::kubernetes_version::OLDEST_SUPPORTED;
    // The range the chart declares is the one the controller checks at start.
    let chart_yaml = std::fs::read_to_string(common::repo_path("charts/xero-operator/Chart.yaml"))
        .expect("read Chart.yaml");
    let declared = chart_yaml
        .lines()
        .find_map(|l| l.strip_prefix("kubeVersion: "));
    assert_eq!(
        declared,
        Some(format!("\">={OLDEST_SUPPORTED}.0-0\"").as_str())
    );
    // No cluster asked: `helm template` renders as it comes (Helm's own release assumption),
    // and on the oldest release, plain or as managed clusters report it.
    for kube_version in [
        None,
        Some("1.32.0"),
        Some("v1.32.9-eks-113cf36"),
        Some("1.37.2"),
    ] {
        let mut args = vec!["template", "r", "--kubeconfig", common::NO_CLUSTER];
        let chart = chart();
        args.push(&chart);
        args.extend(kube_version.iter().flat_map(|v| ["--kube-version", v]));
        let rendered = ok(&helm(&args), &format!("helm template ({kube_version:?})"));
        assert!(rendered.contains("kind: Deployment"), "{kube_version:?}");
    }
    // Older: refused before anything renders, naming the range.
    let out = helm(&["template", "r", &chart(), "--kube-version", "1.31.14"]);
    assert!(!out.status.success(), "1.31 is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "requires kubeVersion: >=1.32.0-0 which is incompatible with Kubernetes v1.31.14"
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_and_custom_templates_are_accepted_by_the_api_server() {
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let ns = common::namespace(&client, "helm-template").await;
    // Rendered for the release under test (the oldest or the newest supported).
    let server = common::server_version(&client).await;
    let defaults = ok(
        &helm(&[
            "template",
            "t1",
            &chart(),
            "-n",
            &ns,
            "--kube-version",
            &server,
        ]),
        "helm template (defaults)",
    );
    assert!(defaults.contains("kind: CustomResourceDefinition"));
    assert!(defaults.contains("helm.sh/resource-policy: keep"));
    assert!(defaults.contains("kind: ClusterRole"));
    dry_run_apply(&defaults, &ns);
    // Values from a file: Helm reads large YAML numbers as floats, which must still render as
    // integers the binary accepts (not `1e+06`).
    let values = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(
        values.path(),
        "appCallsPerMinute: 1000000\nallowCrossNamespaceConsumers: true\n\
         allowedEndpointHosts: [identity.xero.com, api.xero.com, \"127.0.0.1:8480\"]\n",
    )
    .expect("write values");
    let values_path = values.path().display().to_string();
    let custom = ok(
        &helm(&[
            "template",
            "t2",
            &chart(),
            "-n",
            &ns,
            "--kube-version",
            &server,
            "-f",
            &values_path,
            "--set",
            "replicaCount=3",
            "--set",
            &format!("watchNamespaces={{{ns}}}"),
            "--set",
            "crds.install=false",
            "--set",
            "podDisruptionBudget.enabled=true",
            "--set",
            "logJson=true",
            "--set",
            "metrics.perConnection=false",
            "--set",
            "logLevel=debug",
            "--set",
            "nodeSelector.kubernetes\\.io/os=linux",
            "--set",
            "extraEnv[0].name=HTTPS_PROXY,extraEnv[0].value=http://proxy:3128",
            "--set",
            "admissionPolicies.enabled=false",
            "--set-json",
            r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.egressCIDRs={10.0.0.0/8}",
        ]),
        "helm template (custom)",
    );
    assert!(!custom.contains("kind: CustomResourceDefinition"));
    assert!(
        custom.contains("- --leader-election"),
        "leader election on with 3 replicas"
    );
    assert!(custom.contains(&format!("- --namespace={ns}")));
    assert!(
        custom.contains("- --app-calls-per-minute=1000000"),
        "an integer, not a float"
    );
    assert!(
        custom.contains("- --allowed-endpoint-hosts=identity.xero.com,api.xero.com,127.0.0.1:8480")
    );
    assert!(custom.contains("- --allow-cross-namespace-consumers"));
    assert!(
        custom.contains("- --connection-metrics=false")
            && defaults.contains("- --connection-metrics=true"),
        "per-connection series on by default, off when asked"
    );
    assert!(
        defaults.contains("- --allowed-endpoint-hosts=identity.xero.com,api.xero.com")
            && !defaults.contains("- --allow-cross-namespace-consumers"),
        "Xero's hosts only, own-namespace consumers only, by default"
    );
    assert!(
        !defaults.contains("\"update\""),
        "no verb the controller does not use"
    );
    assert!(custom.contains("kind: PodDisruptionBudget"));
    assert!(
        defaults.contains("kind: ValidatingAdmissionPolicy\n")
            && defaults.contains("kind: ValidatingAdmissionPolicyBinding")
            && !custom.contains("kind: ValidatingAdmissionPolicy"),
        "admission policies on by default, off when asked"
    );
    assert!(
        !defaults.contains("kind: NetworkPolicy") && custom.contains("kind: NetworkPolicy"),
        "a NetworkPolicy when asked (the chart cannot guess the API server's address)"
    );
    assert!(
        custom.contains("kubernetes.io/metadata.name: monitoring")
            && custom.contains("cidr: \"10.0.0.0/8\""),
        "{custom}"
    );
    assert!(
        !custom.contains("kind: ClusterRole\n"),
        "a Role per watched namespace instead"
    );
    dry_run_apply(&custom, &ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_creates_the_expected_objects() {
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let ns = common::namespace(&client, "helm-install").await;
    let release = format!("xo-{}", &ns[ns.len() - 5..]);
    // The CRD is already installed by the test suite, as `kubectl apply -f crds/` does: the
    // chart's default (crds.install) leaves it alone instead of failing on Helm's ownership
    // check, as the README's install block needs. The admission policies stay off: with the
    // defaults they would bind cluster-wide and refuse the writes of the other test binaries
    // running beside this one (they are tested in tests/consumer_trust.rs, bound to one
    // namespace).
    ok(
        &helm(&[
            "install",
            &release,
            &chart(),
            "-n",
            &ns,
            "--set",
            "admissionPolicies.enabled=false",
        ]),
        "helm install",
    );
    assert!(
        !release_manifest(&release, &ns).contains("kind: CustomResourceDefinition"),
        "a CRD this release did not install is not taken over"
    );
    let name = format!("{release}-xero-operator");
    let deploy = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .expect("Deployment");
    let pod = deploy.spec.expect("spec").template.spec.expect("pod spec");
    let container = &pod.containers[0];
    let sc = container
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());
    assert!(
        container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some()
    );
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .expect("ServiceAccount");
    Api::<Service>::namespaced(client.clone(), &ns)
        .get(&format!("{name}-metrics"))
        .await
        .expect("metrics Service");
    let role = Api::<ClusterRole>::all(client.clone())
        .get(&name)
        .await
        .expect("ClusterRole");
    assert!(
        role.rules
            .unwrap_or_default()
            .iter()
            .all(|r| !r.verbs.iter().any(|v| v == "*"
                || v == "delete"
                    && r.resources
                        .as_ref()
                        .is_some_and(|x| x.contains(&"secrets".to_owned())))),
        "least privilege: no wildcard verbs, no deleting Secrets"
    );
    Api::<ClusterRoleBinding>::all(client.clone())
        .get(&name)
        .await
        .expect("ClusterRoleBinding");
    ok(&helm(&["uninstall", &release, "-n", &ns]), "helm uninstall");
}

const CRD: &str = "xeroconnections.xero-operator.io";

/// What `helm get manifest` says the release installed.
fn release_manifest(release: &str, ns: &str) -> String {
    ok(
        &helm(&["get", "manifest", release, "-n", ns]),
        "helm get manifest",
    )
}

/// Marks the CRD as Helm leaves it when `release` in `ns` installed it (`None`: as `kubectl
/// apply -f crds/` leaves it).
fn mark_crd_owner(owner: Option<(&str, &str)>) {
    let (release, ns, managed) = match owner {
        Some((r, n)) => (json!(r), json!(n), json!("Helm")),
        None => (Value::Null, Value::Null, Value::Null),
    };
    let patch = json!({"metadata": {
        "labels": {"app.kubernetes.io/managed-by": managed},
        "annotations": {
            "meta.helm.sh/release-name": release,
            "meta.helm.sh/release-namespace": ns,
        },
    }});
    ok(
        &common::kubectl(&[
            "patch",
            "crd",
            CRD,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]),
        "kubectl patch crd",
    );
}

/// Leaves the CRD as the test suite installed it, also when a test fails.
struct RestoreCrdOwner;

impl Drop for RestoreCrdOwner {
    fn drop(&mut self) {
        mark_crd_owner(None);
    }
}

fn crd_owner() -> String {
    ok(
        &common::kubectl(&[
            "get",
            "crd",
            CRD,
            "-o",
            "jsonpath={.metadata.annotations.meta\\.helm\\.sh/release-name}",
        ]),
        "kubectl get crd",
    )
}

/// A CRD kept by a release that was uninstalled (`crds.keep`, the default) does not stop an
/// install under another release name and namespace; the release that installed it still owns
/// and upgrades it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_crd_neither_blocks_another_release_nor_is_lost_by_its_own() {
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let first = common::namespace(&client, "helm-crd-a").await;
    let second = common::namespace(&client, "helm-crd-b").await;
    let (a, b) = ("xo-crd-a", "xo-crd-b");
    let scoped = |ns: &str| format!("watchNamespaces={{{ns}}}");

    // As if release `a` had installed the CRD: it adopts and renders it.
    mark_crd_owner(Some((a, &first)));
    let _restore = RestoreCrdOwner;
    ok(
        &helm(&[
            "install",
            a,
            &chart(),
            "-n",
            &first,
            "--set",
            &scoped(&first),
        ]),
        "helm install a",
    );
    assert!(release_manifest(a, &first).contains("kind: CustomResourceDefinition"));
    ok(&helm(&["uninstall", a, "-n", &first]), "helm uninstall a");
    assert_eq!(crd_owner(), a, "kept, still marked as a's");

    // Another release in another namespace installs without touching it.
    let notes = ok(
        &helm(&[
            "install",
            b,
            &chart(),
            "-n",
            &second,
            "--set",
            &scoped(&second),
        ]),
        "helm install b after a was uninstalled",
    );
    assert_eq!(crd_owner(), a, "b leaves the CRD as it was");
    assert!(!release_manifest(b, &second).contains("kind: CustomResourceDefinition"));
    for want in [
        "is not this release's: it is left as".to_owned(),
        format!("It belongs to release {a} in namespace {first}."),
        format!("kubectl delete xc --all -n {second}"),
    ] {
        assert!(notes.contains(&want), "NOTES lack {want:?}: {notes}");
    }
    assert!(
        !notes.contains("WARNING") && !notes.contains("--all -A"),
        "a kept CRD needs no warning; a namespaced release deletes only its own: {notes}"
    );
    ok(&helm(&["uninstall", b, "-n", &second]), "helm uninstall b");
}

/// `helm template` of the chart with one `--set` value, as a user types it (no
/// `--kube-version`: Helm assumes the release it was built with).
fn template_setting(value: &str) -> Output {
    helm(&["template", "t", &chart(), "--set", value])
}

#[test]
fn the_values_schema_refuses_wrong_types_and_typos() {
    let wrong_type = template_setting("replicaCount=two");
    assert!(!wrong_type.status.success());
    assert!(String::from_utf8_lossy(&wrong_type.stderr).contains("replicaCount"));
    let typo = template_setting("replicaCont=2");
    assert!(!typo.status.success(), "an unknown key is refused");
    let bad_enum = template_setting("image.pullPolicy=Sometimes");
    assert!(!bad_enum.status.success());
    // The log level reaches RUST_LOG: a word that is no level is refused, filters pass.
    assert!(
        !template_setting("logLevel=verbose").status.success(),
        "logLevel=verbose"
    );
    for good in ["info", "debug", "info\\,kube=warn"] {
        let out = template_setting(&format!("logLevel={good}"));
        assert!(
            out.status.success(),
            "logLevel={good}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_applies() {
    let client = common::admin_client().await;
    common::install_crds(&client).await;
    let ns = common::namespace(&client, "examples").await;
    let out = common::kubectl(&[
        "apply",
        "-n",
        &ns,
        "-f",
        &common::repo_path("examples").display().to_string(),
    ]);
    let text = ok(&out, "kubectl apply -f examples/");
    for object in [
        "secret/xero-app",
        "xeroconnection.xero-operator.io/acme",
        "xeroconnection.xero-operator.io/acme-custom",
        "deployment.apps/billing-worker",
        "serviceaccount/billing-worker",
    ] {
        assert!(text.contains(object), "{object} not applied:\n{text}");
    }
}

/// The install without Helm: `deploy/xero-operator.yaml` (kept equal to the chart's defaults by
/// `make manifest-drift`) is accepted object by object by the API server as `kubectl apply -f`
/// sends it, and `deploy/` builds as a kustomize base into the same objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_manifest_applies_with_kubectl_and_kustomize() {
    let manifest = std::fs::read_to_string(common::repo_path("deploy/xero-operator.yaml"))
        .expect("deploy/xero-operator.yaml");
    let kinds = |yaml: &str| {
        let mut kinds: Vec<String> = yaml
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .map(str::to_owned)
            .collect();
        kinds.sort();
        kinds
    };
    let expected = kinds(&manifest);
    // Not a Helm release: no Helm ownership labels, no `helm test` hooks.
    for helm_only in ["managed-by: Helm", "helm.sh/chart:", "helm.sh/hook"] {
        assert!(!manifest.contains(helm_only), "{helm_only} in the manifest");
    }
    assert!(manifest.contains("app.kubernetes.io/managed-by: kubectl"));
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(expected.iter().any(|k| k == kind), "{kind} missing");
    }
    // A server-side dry run needs the namespace to exist (it is created for real, empty).
    let _ = common::kubectl(&["create", "namespace", "xero-operator"]);
    let out = common::kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        &common::repo_path("deploy/xero-operator.yaml")
            .display()
            .to_string(),
    ]);
    let applied = ok(
        &out,
        "kubectl apply --dry-run=server -f deploy/xero-operator.yaml",
    );
    assert_eq!(
        applied.lines().count(),
        expected.len(),
        "one line per object:\n{applied}"
    );
    let built = ok(
        &common::kubectl(&[
            "kustomize",
            &common::repo_path("deploy").display().to_string(),
        ]),
        "kubectl kustomize deploy/",
    );
    assert_eq!(kinds(&built), expected);
}

/// Runs `xero-operator check` (what the chart's `helm test` pod runs) with `kubeconfig`.
fn run_check(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xero-operator"))
        .arg("check")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("XERO_OPERATOR_NAMESPACES")
        .output()
        .expect("run xero-operator check");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_tests_check_asks_the_operator_and_reads_statuses_with_the_test_rights_only() {
    use common::connection::{self, start_controller};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    let timings = common::Timings {
        access_token: Duration::from_secs(600),
        ..common::Timings::default()
    };
    let fx = common::token_fixture("helm-check", timings).await;
    let ns = fx.namespace.clone();
    let release = format!("hc-{}", &ns[ns.len() - 5..]);
    // The test's own ServiceAccount and rights, as the chart renders them (not its pod: this
    // API server has no node to run it; the end-to-end tests run it with `helm test`).
    let rendered = common::chart::helm_template(&[
        "template",
        &release,
        &chart(),
        "--namespace",
        &ns,
        "--set",
        &format!("watchNamespaces={{{ns}}}"),
        "--show-only",
        "templates/tests/check.yaml",
    ]);
    let rights: Vec<&str> = rendered
        .split("\n---\n")
        .filter(|doc| !doc.contains("\nkind: Pod\n"))
        .collect();
    assert_eq!(
        rights.len(),
        3,
        "ServiceAccount, Role, RoleBinding:\n{rendered}"
    );
    common::chart::kubectl_apply(&rights.join("\n---\n"));
    let token =
        common::chart::sa_token(&fx.client, &ns, &format!("{release}-xero-operator-test")).await;
    let kubeconfig = common::chart::kubeconfig_with_token(&token);
    let dir = tempfile::tempdir().expect("temp dir");
    let test_kubeconfig = dir.path().join("kubeconfig");
    // JSON is YAML: the kubeconfig as kubectl and kube read it.
    std::fs::write(
        &test_kubeconfig,
        serde_json::to_vec(&kubeconfig).expect("json"),
    )
    .expect("write kubeconfig");

    // A connection no controller has seen: the check waits, then names it.
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let (passed, printed) = run_check(&test_kubeconfig, &["--namespace", &ns, "--timeout", "2s"]);
    assert!(!passed, "{printed}");
    assert!(printed.contains("operator: not asked"), "{printed}");
    assert!(
        printed.contains(&format!("{ns}/acme: no status\n")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("{ns}/acme: no status from the controller yet")),
        "{printed}"
    );

    // The operator's endpoint not ready: the check says so.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let port = listener.local_addr().expect("addr").port();
    let controller = start_controller(&fx, |_| {});
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(xero_operator::controller::server::serve_on(
        listener,
        controller.metrics.clone(),
        ready.clone(),
    ));
    let operator = [
        "--operator-host",
        "127.0.0.1",
        "--operator-port",
        &port.to_string(),
    ];
    let with = |extra: &[&str]| {
        let mut args = vec!["--namespace", ns.as_str(), "--timeout", "3s"];
        args.extend_from_slice(&operator);
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let args = with(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (passed, printed) = run_check(&test_kubeconfig, &args);
    assert!(!passed, "{printed}");
    assert!(printed.contains("the operator is not ready"), "{printed}");
    assert!(printed.contains("503"), "{printed}");

    // Ready, and the controller wrote the connection's status: the check passes and prints it.
    ready.store(true, Ordering::Relaxed);
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    let (passed, printed) = run_check(&test_kubeconfig, &args);
    assert!(passed, "{printed}");
    assert!(
        printed.contains(&format!("operator: ready (http://127.0.0.1:{port}/readyz)")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("{ns}/acme: Ready=True TokenValid")),
        "{printed}"
    );

    // A connection waiting for its authorisation passes, unless every one must be Ready.
    connection::create(&fx, "new", "new-xero-token", timings, json!({})).await;
    connection::wait_for_reason(
        &fx,
        "new",
        "WaitingForAuthorization",
        Duration::from_secs(30),
    )
    .await;
    let (passed, printed) = run_check(&test_kubeconfig, &args);
    assert!(passed, "{printed}");
    assert!(printed.contains("2 connection(s) checked"), "{printed}");
    let strict = with(&["--require-ready"]);
    let strict: Vec<&str> = strict.iter().map(String::as_str).collect();
    let (passed, printed) = run_check(&test_kubeconfig, &strict);
    assert!(!passed, "{printed}");
    assert!(
        printed.contains(&format!("{ns}/new: not Ready (WaitingForAuthorization)")),
        "{printed}"
    );
    assert!(
        !printed.contains(&format!("{ns}/acme: not Ready")),
        "{printed}"
    );
    server.abort();
}
