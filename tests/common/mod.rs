//! The one shared helper of the integration tests: a client to a real API server.
//!
//! Under `make test` the control plane is started once by `xero-controlplane -- cargo test`, which
//! sets `XERO_TEST_KUBECONFIG`. A plain `cargo test` starts one per test binary instead
//! (`xero-controlplane --exit-with-parent`, which tears down when the test binary exits). Each test
//! works in a namespace of its own, so tests run in parallel.
#![allow(dead_code)] // each test binary uses a different part of this helper

pub mod chart;
pub mod connection;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

/// Where the shared control plane is.
pub struct TestEnv {
    pub admin_kubeconfig: PathBuf,
    pub user_kubeconfig: PathBuf,
    pub bin_dir: PathBuf,
}

static ENV: OnceLock<TestEnv> = OnceLock::new();

/// The shared control plane, started on first use if `make test` did not start one.
pub fn env() -> &'static TestEnv {
    ENV.get_or_init(|| {
        if let (Ok(kubeconfig), Ok(bin_dir)) = (
            std::env::var("XERO_TEST_KUBECONFIG"),
            std::env::var("XERO_CONTROLPLANE_BIN_DIR"),
        ) {
            let admin = PathBuf::from(kubeconfig);
            return TestEnv {
                user_kubeconfig: admin.with_file_name("user.kubeconfig"),
                admin_kubeconfig: admin,
                bin_dir: PathBuf::from(bin_dir),
            };
        }
        start_own_control_plane()
    })
}

fn start_own_control_plane() -> TestEnv {
    let mut child = Command::new(proving_ground_bin("xero-controlplane"))
        .arg("--exit-with-parent")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start xero-controlplane");
    let stdout = child.stdout.take().expect("piped stdout");
    let (mut kubeconfig, mut bin_dir) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read xero-controlplane output");
        if let Some(v) = line.strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(PathBuf::from(v));
        } else if let Some(v) = line.strip_prefix("export XERO_CONTROLPLANE_BIN_DIR=") {
            bin_dir = Some(PathBuf::from(v));
        }
        if kubeconfig.is_some() && bin_dir.is_some() {
            break;
        }
    }
    let admin = kubeconfig.expect("xero-controlplane exited before it was ready (see its stderr)");
    // The launcher watches this process and tears down when it exits.
    std::mem::forget(child);
    TestEnv {
        user_kubeconfig: admin.with_file_name("user.kubeconfig"),
        admin_kubeconfig: admin,
        bin_dir: bin_dir.expect("bin dir line"),
    }
}

/// The API server's release as it reports it (`v1.37.2`).
pub async fn server_version(client: &Client) -> String {
    client
        .apiserver_version()
        .await
        .expect("the API server's /version")
        .git_version
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is valid");
    Client::try_from(config).expect("client")
}

/// A client authenticated as the admin (`system:masters`).
pub async fn admin_client() -> Client {
    client_from(&env().admin_kubeconfig).await
}

/// A client authenticated as the non-admin test user, who has only what RBAC grants.
pub async fn user_client() -> Client {
    client_from(&env().user_kubeconfig).await
}

/// Creates a namespace of this test's own: `<hint>-<random suffix>`.
pub async fn namespace(client: &Client, hint: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": format!("{hint}-")}
    }))
    .expect("namespace json");
    let created = api
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    created.metadata.name.expect("generated name")
}

/// Installs the XeroConnection CRD generated from the Rust types and waits until it is served.
pub async fn install_crds(client: &Client) {
    xero_operator::crd::install(client)
        .await
        .expect("install the CRD");
}

/// A Go tool installed once by the repo's own script (`scripts/helm.sh`, `scripts/promtool.sh`:
/// from the Go module proxy), which prints the binary's path.
pub fn go_tool(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_path(script))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// Helm from the Go module proxy (`scripts/helm.sh`).
pub fn helm_path() -> PathBuf {
    go_tool("scripts/helm.sh")
}

/// Runs helm as the admin of the shared control plane.
pub fn helm(args: &[&str]) -> std::process::Output {
    Command::new(helm_path())
        .args(args)
        .env("KUBECONFIG", &env().admin_kubeconfig)
        .output()
        .expect("run helm")
}

/// A kubeconfig that does not exist: commands that must not reach any cluster get it, so they
/// never fall back to the user's own `~/.kube/config` or `KUBECONFIG`.
pub const NO_CLUSTER: &str = "/nonexistent/xero-operator-tests/kubeconfig";

/// Per-request timeout of the tests' kubectl: a hung API server fails the test, not the run.
const KUBECTL_TIMEOUT: &str = "--request-timeout=60s";

/// Runs the control plane's own kubectl (same release as the server) as the admin.
pub fn kubectl(args: &[&str]) -> std::process::Output {
    let env = env();
    Command::new(env.bin_dir.join("kubectl"))
        .arg(KUBECTL_TIMEOUT)
        .args(args)
        .env("KUBECONFIG", &env.admin_kubeconfig)
        .output()
        .expect("run kubectl")
}

/// Runs the control plane's kubectl as the admin with `input` on its standard input.
pub fn kubectl_with_input(args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let env = env();
    let mut child = Command::new(env.bin_dir.join("kubectl"))
        .arg(KUBECTL_TIMEOUT)
        .args(args)
        .env("KUBECONFIG", &env.admin_kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write kubectl's input");
    child.wait_with_output().expect("wait for kubectl")
}

#[allow(unused_imports)] // each test binary uses a different part of this helper
pub use xero_proving_ground::procs::{Procs, first_line};

/// A binary of the proving ground (`proving-ground/src/bin/`). `CARGO_BIN_EXE_*` names only this
/// package's binaries, so it is looked up where Cargo puts every binary of the workspace: next to
/// `deps/`, which holds this test binary. `make test`, `cargo build` and `cargo test` at the
/// workspace root build it (the proving ground is a default member with integration tests of its
/// own).
pub fn proving_ground_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps/")
        .join(name);
    assert!(
        bin.is_file(),
        "{} not found: build the workspace first (`cargo build`, as `make test` does)",
        bin.display()
    );
    bin
}

/// Watches the Secret `name` as a waiter of the protocol does: by name, from the version it
/// has now (read first). Returns the watch's first answer within 30 s: an event, or the error
/// opening it.
pub async fn first_watch_answer(
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
    meanwhile: impl std::future::Future<Output = ()>,
) -> Result<kube::api::WatchEvent<k8s_openapi::api::core::v1::Secret>, kube::Error> {
    use futures_util::StreamExt;
    let rv = secrets
        .get(name)
        .await?
        .metadata
        .resource_version
        .expect("a stored object has a version");
    let params = kube::api::WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(30);
    let events = secrets.watch(&params, &rv).await?;
    let mut events = std::pin::pin!(events);
    meanwhile.await;
    tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the watch answered within 30 s")
        .expect("the watch went on")
}

/// Path of a file in the repo.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A token Secret wired to an emulator user, as the controller writes it: the client
/// credentials, the settings annotations and the seeded refresh token (no access token yet, so
/// the first `get` refreshes).
pub struct TokenFixture {
    pub client: Client,
    pub namespace: String,
    pub secret: String,
    pub emulator: xero_proving_ground::emulator::Emulator,
    pub user: xero_proving_ground::emulator::SeededUser,
}

/// Protocol timings for a fixture.
#[derive(Clone, Copy)]
pub struct Timings {
    pub access_token: Duration,
    pub grace: Duration,
    pub clock_skew_secs: u64,
    pub lease_secs: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            access_token: Duration::from_secs(3),
            grace: Duration::from_secs(120),
            clock_skew_secs: 1,
            lease_secs: 5,
        }
    }
}

pub async fn token_fixture(hint: &str, timings: Timings) -> TokenFixture {
    token_fixture_with(
        hint,
        timings,
        xero_proving_ground::emulator::GraceReuse::SamePair,
    )
    .await
}

pub async fn token_fixture_with(
    hint: &str,
    timings: Timings,
    grace_reuse: xero_proving_ground::emulator::GraceReuse,
) -> TokenFixture {
    token_fixture_on(admin_client().await, hint, timings, grace_reuse).await
}

/// A fixture on the API server `client` talks to (a test's own control plane, say).
pub async fn token_fixture_on(
    client: Client,
    hint: &str,
    timings: Timings,
    grace_reuse: xero_proving_ground::emulator::GraceReuse,
) -> TokenFixture {
    token_fixture_at(
        client,
        hint,
        timings,
        grace_reuse,
        std::net::Ipv4Addr::LOCALHOST.into(),
    )
    .await
}

/// A fixture whose emulator listens on `ip` (the real node's IP, for pods to reach it).
pub async fn token_fixture_at(
    client: Client,
    hint: &str,
    timings: Timings,
    grace_reuse: xero_proving_ground::emulator::GraceReuse,
    ip: std::net::IpAddr,
) -> TokenFixture {
    use xero_operator::protocol::format as f;
    use xero_proving_ground::emulator::{
        Behaviour, Config, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator, Lifetimes, NewUser,
        RateLimits,
    };
    let namespace = namespace(&client, hint).await;
    let emulator = Emulator::start(Config {
        behaviour: Behaviour {
            lifetimes: Lifetimes {
                access_token: timings.access_token,
                grace: timings.grace,
                ..Lifetimes::default()
            },
            grace_reuse,
            ..Behaviour::default()
        },
        // Tests check tokens against /connections often; keep Xero's limits out of the way.
        limits: RateLimits {
            app_per_minute: 1_000_000,
            ..RateLimits::default()
        },
        hang: Duration::from_secs(60),
        ip,
        ..Config::default()
    })
    .await
    .expect("emulator");
    let user = emulator
        .admin()
        .add_user(&NewUser::default())
        .await
        .expect("seed user");
    let secret = "acme-xero-token".to_owned();
    let data = serde_json::json!({
        f::REFRESH_TOKEN: user.refresh_token.clone().expect("refresh token"),
        f::CLIENT_ID: DEFAULT_CLIENT_ID,
        f::CLIENT_SECRET: DEFAULT_CLIENT_SECRET,
        f::TENANT_ID: user.connections[0].tenant_id,
    });
    let body: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": secret,
            "labels": {f::LABEL_CONNECTION: "acme"},
            "annotations": {
                f::ANN_TOKEN_URL: emulator.token_url(),
                f::ANN_CLOCK_SKEW: timings.clock_skew_secs.to_string(),
                f::ANN_LEASE_DURATION: timings.lease_secs.to_string(),
            },
        },
        "stringData": data,
    }))
    .expect("secret json");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &body)
        .await
        .expect("create token Secret");
    TokenFixture {
        client,
        namespace,
        secret,
        emulator,
        user,
    }
}

impl TokenFixture {
    /// A consumer-role refresher with the given identity.
    pub fn refresher(&self, identity: &str) -> xero_operator::protocol::Refresher {
        xero_operator::protocol::Refresher::new(
            self.client.clone(),
            &self.namespace,
            &self.secret,
            identity,
            xero_operator::protocol::Role::Consumer,
        )
        .with_allowlist(self.emulator.allowlist())
        .with_max_wait(Duration::from_secs(60))
    }

    pub fn secrets(&self) -> Api<k8s_openapi::api::core::v1::Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The token Secret as it is now.
    pub async fn record(&self) -> xero_operator::protocol::TokenRecord {
        let s = self.secrets().get(&self.secret).await.expect("read Secret");
        xero_operator::protocol::TokenRecord::from_secret(&s)
    }

    /// Merge-patches the token Secret (data values as plain strings).
    pub async fn patch(&self, string_data: serde_json::Value, annotations: serde_json::Value) {
        self.secrets()
            .patch(
                &self.secret,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "stringData": string_data,
                    "metadata": {"annotations": annotations},
                })),
            )
            .await
            .expect("patch Secret");
    }

    /// Sets the emulator's faults (`Faults::default()` turns them off).
    pub async fn set_faults(&self, faults: xero_proving_ground::emulator::Faults) {
        self.emulator
            .admin()
            .set_faults(&faults)
            .await
            .expect("set faults");
    }

    pub async fn report(&self) -> xero_proving_ground::emulator::Report {
        self.emulator.admin().report().await.expect("report")
    }

    /// Whether Xero (the emulator) accepts this access token right now.
    pub async fn accepted_by_xero(&self, access_token: &str) -> bool {
        reqwest::Client::new()
            .get(self.emulator.connections_url())
            .bearer_auth(access_token)
            .send()
            .await
            .expect("connections call")
            .status()
            .is_success()
    }
}

/// A listener standing in for an attacker's endpoint on 127.0.0.1: its base URL, and a count of
/// every connection made to it.
pub async fn attacker_listener() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    (format!("http://{addr}"), hits)
}
