//! End to end on a real node, as a cluster runs the operator: the image `make image` built,
//! installed by Helm with the chart's own RBAC and securityContext, pods mounting the token
//! Secret, the Xero emulator on the node's IP.
//!
//! These tests need the node that `make e2e` (part of `make test`) starts:
//! `xero-controlplane --node … -- cargo test --test e2e -- --ignored`. Without it they fail
//! with a message saying so (they are never skipped by `make test`, which runs them in its own
//! step). Each test installs its own release into a namespace of its own, watching only that
//! namespace, so a test's operator never touches another test's connections.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::connection;
use common::{Timings, TokenFixture, helm};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use xero_operator::protocol::format as f;

/// The chart's image, as `make image` tags it (the chart's appVersion).
const IMAGE_REPOSITORY: &str = "ghcr.io/xero-operator/xero-operator";
const IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");

/// The node's IP (the emulator listens there so that pods reach it).
fn node_ip() -> IpAddr {
    std::env::var("XERO_NODE_IP")
        .expect(
            "these tests need the real node: run `make e2e` (it starts \
             `xero-controlplane --node` and runs them inside its network namespace)",
        )
        .parse()
        .expect("XERO_NODE_IP is an IP")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a failed install looks like from the cluster's side, for the assertion message.
fn diagnose(ns: &str) -> String {
    let mut out = String::new();
    for args in [
        &["get", "pods,events", "-n", ns, "-o", "wide"][..],
        &["describe", "pods", "-n", ns],
        &[
            "logs",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/name=xero-operator",
            "--tail=40",
        ],
    ] {
        let o = common::kubectl(args);
        out.push_str(&text(&o.stdout));
        out.push_str(&text(&o.stderr));
    }
    out
}

/// Which namespaces the installed operator watches.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// Only the test's namespace (a Role there).
    OwnNamespace,
    /// All namespaces (the chart's default: a ClusterRole).
    Cluster,
}

/// `helm install` (or `upgrade`) of the chart into the fixture's namespace, allowed to call the
/// fixture's emulator; waits until the operator's pods are Ready.
fn install(fx: &TokenFixture, release: &str, command: &str, scope: Scope, sets: &[String]) {
    let chart = common::repo_path("charts/xero-operator");
    let mut args: Vec<String> = vec![
        command.into(),
        release.into(),
        chart.display().to_string(),
        "-n".into(),
        fx.namespace.clone(),
        "--set".into(),
        "image.pullPolicy=Never".into(),
        "--set".into(),
        "crds.install=false".into(),
        "--set".into(),
        format!("allowedEndpointHosts={{{}}}", fx.emulator.allowed_host()),
        "--set".into(),
        "logLevel=debug".into(),
        "--wait".into(),
        "--timeout".into(),
        "180s".into(),
    ];
    if scope == Scope::OwnNamespace {
        args.push("--set".into());
        args.push(format!("watchNamespaces={{{}}}", fx.namespace));
    }
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm(&refs);
    assert!(
        out.status.success(),
        "helm {command} failed: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        diagnose(&fx.namespace)
    );
}

/// A token fixture whose emulator listens on the node's IP, with the CRD installed the way the
/// README says (`kubectl apply -f crds/`).
async fn fixture(hint: &str, timings: Timings) -> TokenFixture {
    let client = common::admin_client().await;
    let out = common::kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &common::repo_path("crds").display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    common::token_fixture_at(
        client,
        hint,
        timings,
        xero_proving_ground::emulator::GraceReuse::SamePair,
        node_ip(),
    )
    .await
}

/// Removes what a test installed when it ends (also when it fails), so that no operator or
/// consumer of an earlier test keeps running beside the next: its connections first (while the
/// operator still runs their finalizers), then the release, then the namespace.
struct Cleanup {
    namespace: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = self.namespace.as_str();
        let _ = common::kubectl(&["delete", "xc", "--all", "-n", ns, "--timeout=30s"]);
        let _ = helm(&["uninstall", "xo", "-n", ns, "--wait", "--timeout", "60s"]);
        let _ = common::kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }
}

/// The token Secret's `rotation` and `refreshed-by`.
async fn rotation(fx: &TokenFixture) -> (u64, String) {
    let secret = fx.secrets().get(&fx.secret).await.expect("token Secret");
    let ann = secret.metadata.annotations.unwrap_or_default();
    (
        ann.get(f::ANN_ROTATION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
        ann.get(f::ANN_REFRESHED_BY).cloned().unwrap_or_default(),
    )
}

/// Waits until the Secret's rotation reaches `target`; returns who made it.
async fn wait_for_rotation(fx: &TokenFixture, target: u64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (r, by) = rotation(fx).await;
        if r >= target {
            return by;
        }
        assert!(
            Instant::now() < deadline,
            "rotation stayed at {r} (wanted {target}) for {within:?}; refreshed-by {by}\n{}",
            diagnose(&fx.namespace)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every refresh reached Xero once: no fork, no grace reuse, no dead token, no broken chain, and
/// as many refresh-grant calls as stored rotations. Read between refreshes: a call that Xero has
/// counted but whose answer is not stored yet is waited out (a few hundred milliseconds).
async fn assert_one_call_per_rotation(fx: &TokenFixture) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let (before, _) = rotation(fx).await;
        let report = fx.report().await;
        let (after, _) = rotation(fx).await;
        let refresh_calls = report
            .counters
            .token_calls_by_grant
            .get("refresh_token")
            .copied()
            .unwrap_or(0);
        if before == after && refresh_calls == after {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "one token call per rotation: rotation {after}, calls {:?}",
            report.counters
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for chain in &report.chains {
        assert!(!chain.broken, "chain broken: {chain:?}");
        assert_eq!(chain.forks, 0, "{chain:?}");
        assert_eq!(chain.grace_reuses, 0, "{chain:?}");
        assert_eq!(chain.dead_token_uses, 0, "{chain:?}");
    }
}

fn operator_pods(ns: &str, pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/name"))
                .is_some_and(|n| n == "xero-operator")
                && p.metadata.namespace.as_deref() == Some(ns)
        })
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

async fn pods(fx: &TokenFixture, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(fx.client.clone(), &fx.namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods")
        .items
}

/// The node kubelet's `syncFrequency` (`E2E_SECRET_SYNC`).
fn secret_sync() -> Duration {
    let text = std::env::var("XERO_NODE_SECRET_SYNC").expect("the node's secret sync period");
    humantime::parse_duration(&text).expect("a duration")
}

fn timings(access_token_secs: u64) -> Timings {
    Timings {
        access_token: Duration::from_secs(access_token_secs),
        grace: Duration::from_secs(600),
        clock_skew_secs: 1,
        lease_secs: 10,
    }
}

#[tokio::test]
#[ignore = "needs the real node: make e2e"]
async fn the_operator_pod_keeps_a_connection_fresh_with_the_charts_rights() {
    let t = timings(15);
    let fx = fixture("e2e-refresh", t).await;
    let _cleanup = Cleanup {
        namespace: fx.namespace.clone(),
    };
    // The chart's default scope: every namespace, through a ClusterRole.
    install(&fx, "xo", "install", Scope::Cluster, &[]);
    let deployment = Api::<Deployment>::namespaced(fx.client.clone(), &fx.namespace)
        .get("xo-xero-operator")
        .await
        .expect("the chart's Deployment");
    let pod_spec = deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    let container = &pod_spec.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}").as_str())
    );
    let running = pods(&fx, "app.kubernetes.io/name=xero-operator").await;
    let pod = operator_pods(&fx.namespace, &running);
    assert_eq!(pod.len(), 1, "one operator pod: {pod:?}");
    // Ready (helm --wait) under the chart's securityContext: non-root 65532, read-only root.
    let spec = running[0].spec.as_ref().expect("pod spec");
    let pod_security = spec.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_security.run_as_user, Some(65532));
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let container_security = spec.containers[0]
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(container_security.read_only_root_filesystem, Some(true));
    assert_eq!(container_security.allow_privilege_escalation, Some(false));
    let ready = running[0]
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| c.iter().all(|c| c.ready));
    assert!(ready, "the operator container is Ready");

    connection::create(&fx, "acme", &fx.secret, t, json!({})).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
    // Two expiries after the first token: each refreshed by the operator pod, in-cluster.
    let (first, _) = rotation(&fx).await;
    let by = wait_for_rotation(&fx, first + 2, Duration::from_secs(60)).await;
    assert_eq!(by, format!("controller/{}", pod[0]), "refreshed by the pod");
    assert_one_call_per_rotation(&fx).await;
    let status = connection::api(&fx)
        .get("acme")
        .await
        .expect("connection")
        .status
        .expect("status");
    assert_eq!(
        status.last_refreshed_by.as_deref(),
        Some(format!("controller/{}", pod[0]).as_str())
    );
}

/// The app container of the consumer Deployment: once a second it reads the access token from
/// the mounted Secret and from the `xero-token` sidecar, presents each to Xero (the emulator
/// counts expired ones), and prints `<source> <unix seconds> <fingerprint> <ok|rejected>`.
const APP_SCRIPT: &str = r#"
while true; do
  now=$(date +%s)
  t=$(cat /var/run/xero/access_token 2>/dev/null)
  if [ -n "$t" ]; then
    if wget -q -O /dev/null --header "Authorization: Bearer $t" "$XERO_CONNECTIONS_URL"; then r=ok; else r=rejected; fi
    echo "file $now $(printf %s "$t" | sha256sum | cut -c1-16) $r"
  fi
  s=$(wget -q -O - http://127.0.0.1:8481/token/raw 2>/dev/null)
  if [ -n "$s" ]; then
    if wget -q -O /dev/null --header "Authorization: Bearer $s" "$XERO_CONNECTIONS_URL"; then r=ok; else r=rejected; fi
    echo "sidecar $now $(printf %s "$s" | sha256sum | cut -c1-16) $r"
  fi
  sleep 1
done
"#;

/// `examples/consumer-deployment.yaml` with a real app: the token Secret mounted, read by the
/// app container, and the `xero-token` sidecar serving it (and taking over the refresh if it
/// ever finds it expired).
fn consumer_manifest(fx: &TokenFixture, replicas: u32) -> serde_json::Value {
    let image = format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}");
    let hardened = json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    let mount = json!([{"name": "xero-token", "mountPath": "/var/run/xero", "readOnly": true}]);
    json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "billing-worker"}},
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "billing-worker"},
             "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "billing-worker"}},
                "template": {
                    "metadata": {"labels": {"app": "billing-worker"}},
                    "spec": {
                        "serviceAccountName": "billing-worker",
                        "terminationGracePeriodSeconds": 2,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [
                            {"name": "app", "image": "xero.local/busybox:1", "imagePullPolicy": "Never",
                             "command": ["/bin/sh", "-c", APP_SCRIPT],
                             "env": [{"name": "XERO_CONNECTIONS_URL", "value": fx.emulator.connections_url()}],
                             "volumeMounts": mount, "securityContext": hardened},
                            {"name": "xero-token", "image": image, "imagePullPolicy": "Never",
                             "command": ["/xero-token"],
                             "args": ["serve", "--listen", "127.0.0.1:8481", "--from-dir", "/var/run/xero"],
                             "env": [
                                {"name": "XERO_TOKEN_SECRET", "value": fx.secret},
                                {"name": "XERO_TOKEN_IDENTITY", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                // The emulator stands in for Xero's hosts, which consumers call by default.
                                {"name": xero_operator::cli::ALLOW_HOSTS_ENV, "value": fx.emulator.allowed_host()},
                             ],
                             "volumeMounts": mount, "securityContext": hardened},
                        ],
                        "volumes": [{"name": "xero-token", "secret": {"secretName": fx.secret, "optional": false}}],
                    },
                },
             }},
        ],
    })
}

/// Access-token fingerprints with the Unix time the test first saw each stored.
type StoredTokens = std::sync::Arc<std::sync::Mutex<Vec<(String, f64)>>>;

/// Polls the token Secret and notes when each access token (by fingerprint) was first stored.
fn watch_stored_tokens(fx: &TokenFixture) -> (tokio::task::JoinHandle<()>, StoredTokens) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, f64)>::new()));
    let secrets = fx.secrets();
    let name = fx.secret.clone();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Ok(secret) = secrets.get(&name).await
                && let Some(token) = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(f::ACCESS_TOKEN))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
            {
                let fp = xero_operator::redact::Sensitive::new(token).fingerprint();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs_f64();
                let mut seen = out.lock().expect("lock");
                if !seen.iter().any(|(f, _)| *f == fp) {
                    seen.push((fp, now));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (task, seen)
}

/// For each pod: when its app first read the mounted file, and the first second it saw each
/// token there.
fn first_seen_in_files(fx: &TokenFixture, pod: &str) -> (u64, Vec<(String, u64)>) {
    let out = common::kubectl(&["logs", "-n", &fx.namespace, pod, "-c", "app"]);
    assert!(out.status.success(), "logs of {pod}: {}", text(&out.stderr));
    let mut started = None;
    let mut firsts: Vec<(String, u64)> = Vec::new();
    for line in text(&out.stdout).lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        if let ["file", secs, fp, _] = parts[..]
            && let Ok(secs) = secs.parse::<u64>()
        {
            started.get_or_insert(secs);
            if !firsts.iter().any(|(f, _)| f == fp) {
                firsts.push((fp.to_owned(), secs));
            }
        }
    }
    (started.unwrap_or(u64::MAX), firsts)
}

#[tokio::test]
#[ignore = "needs the real node: make e2e"]
async fn pods_reading_the_mounted_secret_never_use_an_expired_token() {
    // The README's recommendation for file readers: refresh ahead of expiry by more than the
    // kubelet's delay in updating mounted Secrets, which its syncFrequency bounds (this node:
    // E2E_SECRET_SYNC): twice that plus 5 s. A rotation every sync + 4 s, so that each pod's
    // file can show every token.
    let sync = secret_sync().as_secs();
    let ahead = 2 * sync + 5;
    let lifetime = ahead + sync + 5;
    let t = timings(lifetime);
    let fx = fixture("e2e-consumers", t).await;
    let _cleanup = Cleanup {
        namespace: fx.namespace.clone(),
    };
    install(&fx, "xo", "install", Scope::OwnNamespace, &[]);
    connection::create(
        &fx,
        "acme",
        &fx.secret,
        t,
        json!({
            "refresh": {"policy": "AheadOfExpiry", "aheadOfExpirySeconds": ahead,
                        "clockSkewSeconds": t.clock_skew_secs, "leaseDurationSeconds": t.lease_secs},
            "consumers": [{"serviceAccount": "billing-worker"}],
        }),
    )
    .await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
    let (stored_task, stored) = watch_stored_tokens(&fx);
    let manifest = consumer_manifest(&fx, 2).to_string();
    let out = common::kubectl_with_input(&["apply", "-n", &fx.namespace, "-f", "-"], &manifest);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = common::kubectl(&[
        "rollout",
        "status",
        "-n",
        &fx.namespace,
        "deployment/billing-worker",
        "--timeout=120s",
    ]);
    assert!(
        out.status.success(),
        "consumers never became ready: {}\n{}",
        text(&out.stderr),
        diagnose(&fx.namespace)
    );
    // Several rotations while the consumers read: each a refresh by the operator pod ahead of
    // expiry, reaching the pods' files before the old token expires.
    let (first, _) = rotation(&fx).await;
    let rounds = 4;
    let by = wait_for_rotation(
        &fx,
        first + rounds,
        Duration::from_secs(lifetime * (rounds + 1)),
    )
    .await;
    assert!(by.starts_with("controller/xo-xero-operator-"), "{by}");
    // One more lifetime's worth of reads after the last rotation.
    tokio::time::sleep(Duration::from_secs(lifetime - ahead)).await;
    stored_task.abort();

    let report = fx.report().await;
    let outcomes = &report.counters.bearer_outcomes;
    assert_eq!(
        outcomes.get("expired").copied().unwrap_or(0),
        0,
        "a consumer presented an expired token: {outcomes:?}"
    );
    assert_eq!(
        outcomes.get("unknown").copied().unwrap_or(0),
        0,
        "{outcomes:?}"
    );
    let used = outcomes.get("ok").copied().unwrap_or(0);
    assert!(used >= 100, "the consumers kept using tokens: {outcomes:?}");
    assert_one_call_per_rotation(&fx).await;

    // How stale the mounted files got: first sight in a pod's file minus the time it was stored.
    let consumer_pods: Vec<String> = pods(&fx, "app=billing-worker")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(consumer_pods.len(), 2);
    let stored = stored.lock().expect("lock").clone();
    let mut lags = Vec::new();
    for pod in &consumer_pods {
        let (started, firsts) = first_seen_in_files(&fx, pod);
        for (fp, secs) in firsts {
            // Only tokens stored while the pod was reading are updates it waited for.
            if let Some((_, at)) = stored.iter().find(|(f, _)| *f == fp)
                && *at > started as f64
            {
                lags.push((pod.clone(), (secs as f64 - at).max(0.0)));
            }
        }
    }
    let rotations_seen = lags.len();
    assert!(
        rotations_seen >= 2 * (rounds as usize - 1),
        "each pod saw the rotations in its file: {lags:?} (stored: {stored:?})"
    );
    let max = lags.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    let mean = lags.iter().map(|(_, l)| *l).sum::<f64>() / lags.len() as f64;
    println!(
        "FIGURE mounted Secret staleness (kubelet syncFrequency {}): {} updates, mean {mean:.1} s, max {max:.1} s (1 s read loop); aheadOfExpirySeconds {ahead}",
        humantime::format_duration(secret_sync()),
        lags.len()
    );
    assert!(
        max < (ahead - t.clock_skew_secs) as f64,
        "a mounted token arrived later than the refresh margin: {lags:?}"
    );
}

/// Cordons the node while it lives (no new pod starts), uncordons it when dropped.
struct Cordon(String);

impl Cordon {
    fn new() -> Self {
        let node = std::env::var("XERO_NODE_NAME").expect("the node's name");
        let out = common::kubectl(&["cordon", &node]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        Self(node)
    }
}

impl Drop for Cordon {
    fn drop(&mut self) {
        let _ = common::kubectl(&["uncordon", &self.0]);
    }
}

/// The holder of the chart's leader Lease.
async fn leader(fx: &TokenFixture) -> Option<String> {
    Api::<Lease>::namespaced(fx.client.clone(), &fx.namespace)
        .get_opt("xo-xero-operator")
        .await
        .expect("get Lease")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test]
#[ignore = "needs the real node: make e2e"]
async fn a_second_replica_takes_over_when_the_leader_pod_is_deleted() {
    let t = timings(12);
    let fx = fixture("e2e-replicas", t).await;
    let _cleanup = Cleanup {
        namespace: fx.namespace.clone(),
    };
    install(
        &fx,
        "xo",
        "install",
        Scope::OwnNamespace,
        &[
            "replicaCount=2".into(),
            "leaderElection.leaseSeconds=10".into(),
        ],
    );
    connection::create(&fx, "acme", &fx.secret, t, json!({})).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
    let (first, _) = rotation(&fx).await;
    let by = wait_for_rotation(&fx, first + 1, Duration::from_secs(40)).await;
    let holder = leader(&fx).await.expect("a leader");
    assert_eq!(by, holder, "only the leader refreshes");
    let leader_pod = holder
        .strip_prefix("controller/")
        .expect("controller/<pod>");
    let running = operator_pods(
        &fx.namespace,
        &pods(&fx, "app.kubernetes.io/name=xero-operator").await,
    );
    assert_eq!(running.len(), 2, "{running:?}");
    let follower = running
        .iter()
        .find(|p| *p != leader_pod)
        .expect("a follower")
        .clone();

    // The node is cordoned, so the pod replacing the deleted leader stays Pending: the running
    // follower must take over (kube-lease-manager's follower waits for the Lease to expire or
    // be released).
    let _uncordon = Cordon::new();
    let deleted = Instant::now();
    Api::<Pod>::namespaced(fx.client.clone(), &fx.namespace)
        .delete(leader_pod, &DeleteParams::default())
        .await
        .expect("delete the leader pod");
    let new_holder = loop {
        match leader(&fx).await {
            Some(h) if h != holder => break h,
            _ => {}
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(90),
            "nobody took the Lease over\n{}",
            diagnose(&fx.namespace)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "FIGURE leader handover after deleting the leader pod: {:.1} s (lease 10 s)",
        deleted.elapsed().as_secs_f64()
    );
    assert_eq!(
        new_holder,
        format!("controller/{follower}"),
        "the other replica took over"
    );
    let (before, _) = rotation(&fx).await;
    let by = wait_for_rotation(&fx, before + 2, Duration::from_secs(90)).await;
    assert_eq!(by, new_holder, "only the new leader refreshes");
    assert_one_call_per_rotation(&fx).await;
}

#[tokio::test]
#[ignore = "needs the real node: make e2e"]
async fn upgrade_to_a_new_image_and_uninstall_keep_every_connection() {
    let t = timings(12);
    let fx = fixture("e2e-upgrade", t).await;
    let _cleanup = Cleanup {
        namespace: fx.namespace.clone(),
    };
    install(&fx, "xo", "install", Scope::OwnNamespace, &[]);
    connection::create(&fx, "acme", &fx.secret, t, json!({})).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;
    let (first, _) = rotation(&fx).await;
    wait_for_rotation(&fx, first + 1, Duration::from_secs(40)).await;

    // A new tag of the image, as a release would bring; `helm upgrade` rolls the pod.
    let socket = std::env::var("XERO_NODE_CONTAINERD").expect("the node's containerd socket");
    let next = format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}-next");
    let out = Command::new("ctr")
        .args([
            "--address",
            &socket,
            "-n",
            "k8s.io",
            "images",
            "tag",
            "--force",
        ])
        .arg(format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}"))
        .arg(&next)
        .output()
        .expect("run ctr");
    assert!(out.status.success(), "{}", text(&out.stderr));
    install(
        &fx,
        "xo",
        "upgrade",
        Scope::OwnNamespace,
        &[format!("image.tag={IMAGE_TAG}-next")],
    );
    let running: Vec<Pod> = pods(&fx, "app.kubernetes.io/name=xero-operator")
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let images: Vec<_> = running
        .iter()
        .filter_map(|p| p.spec.as_ref()?.containers[0].image.clone())
        .collect();
    assert!(
        images.len() == 1 && images[0] == next,
        "after the upgrade one pod runs {next}: {images:?}"
    );
    let upgraded = running[0].metadata.name.clone().expect("pod name");
    let (before, _) = rotation(&fx).await;
    let by = wait_for_rotation(&fx, before + 1, Duration::from_secs(40)).await;
    assert_eq!(
        by,
        format!("controller/{upgraded}"),
        "the upgraded pod refreshes"
    );

    // `helm uninstall` with the connection left: the connection and its token Secret stay
    // (nothing refreshes them meanwhile), and an install later takes them up again with the same
    // refresh-token chain.
    let out = helm(&[
        "uninstall",
        "xo",
        "-n",
        &fx.namespace,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deployments = Api::<Deployment>::namespaced(fx.client.clone(), &fx.namespace);
    assert!(
        deployments
            .get_opt("xo-xero-operator")
            .await
            .expect("get")
            .is_none()
    );
    let (kept, _) = rotation(&fx).await;
    assert!(
        connection::api(&fx)
            .get_opt("acme")
            .await
            .expect("get")
            .is_some(),
        "the connection stays"
    );
    // Two lifetimes without an operator: the token expires and nobody calls Xero.
    let calls = fx.report().await.counters.token_calls;
    tokio::time::sleep(t.access_token * 2).await;
    assert_eq!(
        fx.report().await.counters.token_calls,
        calls,
        "no operator, no calls"
    );
    assert_eq!(
        rotation(&fx).await.0,
        kept,
        "the token Secret stays as it was"
    );

    install(&fx, "xo", "install", Scope::OwnNamespace, &[]);
    let by = wait_for_rotation(&fx, kept + 1, Duration::from_secs(60)).await;
    assert!(by.starts_with("controller/xo-xero-operator-"), "{by}");
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    assert_one_call_per_rotation(&fx).await;
}

/// The fenced `sh` blocks of the README sections headed `headings` (each section runs to the
/// next heading of its level or above), in order.
fn readme_blocks(headings: &[&str]) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(common::repo_path("README.md")).expect("README.md");
    let mut blocks = Vec::new();
    let (mut section, mut level) = (None::<String>, 0);
    let (mut fence, mut block) = (None::<String>, String::new());
    for line in readme.lines() {
        if let Some(lang) = &fence {
            if line.trim_start().starts_with("```") {
                if let (Some(s), "sh") = (&section, lang.as_str()) {
                    blocks.push((s.clone(), std::mem::take(&mut block)));
                }
                block.clear();
                fence = None;
            } else {
                block.push_str(line);
                block.push('\n');
            }
            continue;
        }
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            fence = Some(lang.trim().to_owned());
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes > 0 && line[hashes..].starts_with(' ') {
            if headings.contains(&line) {
                section = Some(line.to_owned());
                level = hashes;
            } else if section.is_some() && hashes <= level {
                section = None;
            }
        }
    }
    blocks
}

/// Runs a README block as a user pastes it into a shell: bash, from the repository's root,
/// with kubectl and helm on the PATH. Returns what it printed (Helm prints a test pod's output
/// on stderr).
fn run_block(section: &str, block: &str) -> String {
    let kubectl_dir = common::env().bin_dir.clone();
    let helm_dir = common::helm_path()
        .parent()
        .expect("helm's directory")
        .to_owned();
    let path = format!(
        "{}:{}:{}",
        kubectl_dir.display(),
        helm_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(common::repo_path("."))
        .env("PATH", path)
        .env("KUBECONFIG", &common::env().admin_kubeconfig)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{section}: the block\n{block}failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    eprintln!("{section}: ran\n{block}{}", text(&out.stdout));
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// Leaves the cluster as it was if the README test fails half-way.
struct ReadmeCleanup;

impl Drop for ReadmeCleanup {
    fn drop(&mut self) {
        let _ = common::kubectl(&[
            "delete",
            "xc",
            "acme",
            "-n",
            "default",
            "--ignore-not-found",
        ]);
        let _ = common::kubectl(&[
            "delete",
            "secret",
            "xero-app",
            "acme-xero-token",
            "-n",
            "default",
            "--ignore-not-found",
        ]);
        let _ = helm(&[
            "uninstall",
            "xero-operator",
            "-n",
            "xero-operator",
            "--wait",
        ]);
        let _ = common::kubectl(&["delete", "namespace", "xero-operator", "--wait=false"]);
    }
}

#[tokio::test]
#[ignore = "needs the real node: make e2e"]
async fn the_readmes_install_first_connection_and_uninstall_blocks_run_as_written() {
    let install = "## Install";
    let first = "### The first connection, from zero";
    let uninstall = "### Uninstall";
    let blocks = readme_blocks(&[install, first, uninstall]);
    let sections: Vec<&str> = blocks.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sections, [install, first, uninstall], "{blocks:?}");
    let _cleanup = ReadmeCleanup;
    let client = common::admin_client().await;

    // Install: the operator's pod becomes available from the image on the node.
    run_block(&blocks[0].0, &blocks[0].1);
    let deployments = Api::<Deployment>::namespaced(client.clone(), "xero-operator");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let available = deployments
            .get_opt("xero-operator")
            .await
            .expect("get")
            .and_then(|d| d.status?.available_replicas)
            .unwrap_or(0);
        if available >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator never became available:\n{}",
            diagnose("xero-operator")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The first connection: it waits for authorisation, and says with which command. No
    // refresh token, so nothing is sent anywhere. `helm test` (in the block) found the operator
    // answering and the connection's status current.
    let printed = run_block(&blocks[1].0, &blocks[1].1);
    assert!(printed.contains("operator: ready (http://"), "{printed}");
    assert!(
        printed.contains("default/acme: Ready=False WaitingForAuthorization"),
        "{printed}"
    );
    let conns = Api::<xero_operator::crd::XeroConnection>::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    let message = loop {
        let ready = conns.get("acme").await.expect("acme").status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.reason == "WaitingForAuthorization")
        });
        if let Some(c) = ready {
            break c.message;
        }
        assert!(
            Instant::now() < deadline,
            "acme never showed WaitingForAuthorization:\n{}",
            diagnose("xero-operator")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        message.contains("xero-token --namespace default --secret acme-xero-token authorize"),
        "{message}"
    );

    // `helm test` that wants every connection Ready fails, naming the one that is not and why;
    // back to the default, it passes again (and removes the failed test pod).
    let chart = common::repo_path("charts/xero-operator")
        .display()
        .to_string();
    let upgrade = |require_ready: &str| {
        let out = helm(&[
            "upgrade",
            "xero-operator",
            &chart,
            "-n",
            "xero-operator",
            "--reuse-values",
            "--set",
            &format!("tests.requireReady={require_ready}"),
            "--set",
            "tests.timeoutSeconds=5",
        ]);
        assert!(out.status.success(), "helm upgrade: {}", text(&out.stderr));
    };
    upgrade("true");
    let out = helm(&["test", "xero-operator", "-n", "xero-operator"]);
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success(),
        "helm test passed with acme not Ready:\n{printed}"
    );
    assert!(
        printed.contains("default/acme: not Ready (WaitingForAuthorization)"),
        "{printed}"
    );
    upgrade("false");
    let out = helm(&["test", "xero-operator", "-n", "xero-operator"]);
    assert!(
        out.status.success(),
        "helm test: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Uninstall, in the README's order: the connection goes at once (no finalizer), then the
    // release; the CRD stays.
    run_block(&blocks[2].0, &blocks[2].1);
    assert!(conns.get_opt("acme").await.expect("get").is_none());
    assert!(
        deployments
            .get_opt("xero-operator")
            .await
            .expect("get")
            .is_none()
    );
    let crd = common::kubectl(&["get", "crd", "xeroconnections.xero-operator.io"]);
    assert!(crd.status.success(), "the CRD stays: {}", text(&crd.stderr));
}
