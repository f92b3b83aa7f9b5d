//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and (optionally)
//! kube-controller-manager, built from Go modules by `proving-ground/controlplane/build.sh`.
//!
//! Used by the integration tests, `make controlplane` and `make run`. Everything binds 127.0.0.1,
//! lives in one temporary directory, and is torn down by [`ControlPlane::stop`] (also on drop).
//! The child processes are started with `PR_SET_PDEATHSIG`, so they die with this process even
//! when it is killed; state directories left by a killed launcher are removed by the next one.

mod kubeconfig;
pub mod node;
mod pki;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the API server may take to report `/readyz` ok. A cold start on 2 cores takes
/// 5–15 s (RBAC bootstrap, CRD informers); a minute means something is wrong.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a component may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Prefix of state directories in the system temp dir; lets a later launcher find stale ones.
const STATE_DIR_PREFIX: &str = "xero-cp-";
/// File in the state directory holding the launcher's pid.
const OWNER_FILE: &str = "owner.pid";
/// The non-admin user the token file defines, for RBAC tests.
pub const NON_ADMIN_USER: &str = "alice";

/// Errors starting or running the local control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "control plane binaries not found in {dir}: {missing} (run proving-ground/controlplane/build.sh; the node's are built for the newest release only)"
    )]
    MissingBinary { dir: PathBuf, missing: String },
    #[error("building the control plane failed: {0}")]
    Build(String),
    #[error("I/O error while {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating certificates failed: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("{component} exited during start-up ({status}); last log lines:\n{log_tail}")]
    Exited {
        component: &'static str,
        status: String,
        log_tail: String,
    },
    #[error("the real node: {0}")]
    Node(String),
    #[error("the API server was not ready after {0:?}; last log lines:\n{1}")]
    NotReady(Duration, String),
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// Where the control plane binaries are, and what to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory holding `etcd`, `kube-apiserver` and `kube-controller-manager`.
    pub bin_dir: PathBuf,
    /// Also start kube-controller-manager (garbage collection, namespace deletion).
    pub controller_manager: bool,
    /// Also run a real node (see [`node`]); the process must already be in the network
    /// namespace of [`node::enter_network_namespace`].
    pub node: Option<node::NodeOptions>,
}

impl Options {
    /// Builds (or reuses from the cache) the binaries with the repo's build script.
    pub fn from_build_script(script: &Path) -> Result<Self, Error> {
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(io(format!("running {}", script.display())))?;
        if !out.status.success() {
            return Err(Error::Build(format!(
                "{} exited with {}",
                script.display(),
                out.status
            )));
        }
        let dir = String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            bin_dir: PathBuf::from(dir),
            controller_manager: true,
            node: None,
        })
    }
}

impl Options {
    /// The binaries in `bin_dir` if given, else the repo's cached build (built if missing).
    pub fn from_bin_dir_or_build(bin_dir: Option<PathBuf>) -> Result<Self, Error> {
        match bin_dir {
            Some(bin_dir) => Ok(Self {
                bin_dir,
                controller_manager: true,
                node: None,
            }),
            None => Self::from_build_script(
                // The Go module of the control plane stays in the product's tests/.
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/build.sh"),
            ),
        }
    }
}

/// One running component.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// How it was started (to start it again).
    program: PathBuf,
    args: Vec<String>,
}

/// A running local control plane. Stops when dropped.
pub struct ControlPlane {
    state_dir: Option<tempfile::TempDir>,
    components: Vec<Component>,
    /// `https://127.0.0.1:<port>` of the API server.
    pub server: String,
    /// Kubeconfig of the admin user (group `system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of [`NON_ADMIN_USER`], who has no permissions until RBAC grants some.
    pub user_kubeconfig: PathBuf,
    /// The real node, when [`Options::node`] asked for one.
    pub node: Option<node::Node>,
}

impl ControlPlane {
    /// Starts etcd, the API server and, if asked, the controller manager; returns once the API
    /// server answers `/readyz`.
    pub async fn start(opts: &Options) -> Result<Self, Error> {
        let mut bins = vec!["etcd", "kube-apiserver", "kube-controller-manager"];
        if opts.node.is_some() {
            // Built for the newest release only (proving-ground/controlplane/build.sh).
            bins.extend(["kubelet", "kube-scheduler", "kube-proxy"]);
        }
        let missing: Vec<_> = bins
            .into_iter()
            .filter(|b| !opts.bin_dir.join(b).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingBinary {
                dir: opts.bin_dir.clone(),
                missing: missing.join(", "),
            });
        }
        remove_stale_state_dirs();
        let state_dir = tempfile::Builder::new()
            .prefix(STATE_DIR_PREFIX)
            .tempdir()
            .map_err(io("creating the state dir"))?;
        let dir = state_dir.path().to_path_buf();
        std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
            .map_err(io("writing the owner file"))?;

        let mut cp = ControlPlane {
            state_dir: Some(state_dir),
            components: Vec::new(),
            server: String::new(),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            user_kubeconfig: dir.join("user.kubeconfig"),
            node: None,
        };
        // On any error below, `cp` is dropped and stops what was started.
        cp.launch(opts, &dir).await?;
        Ok(cp)
    }

    async fn launch(&mut self, opts: &Options, dir: &Path) -> Result<(), Error> {
        // With a node, the API server serves the node IP (pods reach it through the
        // `kubernetes` Service) and everything else stays on the namespace's loopback.
        let api_ip = match opts.node {
            Some(_) => node::NODE_IP.to_string(),
            None => "127.0.0.1".to_owned(),
        };
        let extra_sans = match opts.node {
            Some(_) => vec![
                node::NODE_IP.to_string(),
                node::KUBERNETES_SERVICE_IP.to_string(),
            ],
            None => vec![],
        };
        let pki = pki::Pki::generate(&extra_sans)?;
        let write = |name: &str, content: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(io(format!("writing {name}")))?;
            Ok::<_, Error>(path)
        };
        let ca_file = write("ca.crt", &pki.ca_pem)?;
        let serving_cert = write("apiserver.crt", &pki.serving_cert_pem)?;
        let serving_key = write("apiserver.key", &pki.serving_key_pem)?;
        let kubelet_client_cert = write("kubelet-client.crt", &pki.kubelet_client_cert_pem)?;
        let kubelet_client_key = write("kubelet-client.key", &pki.kubelet_client_key_pem)?;
        let sa_key = write("sa.key", &pki.service_account_key_pem)?;
        let sa_pub = write("sa.pub", &pki.service_account_pub_pem)?;
        let admin_token = pki::random_token().map_err(io("reading /dev/urandom"))?;
        let user_token = pki::random_token().map_err(io("reading /dev/urandom"))?;
        let node_token = pki::random_token().map_err(io("reading /dev/urandom"))?;
        let node_names = opts.node.as_ref().map(|_| node::Node::new(dir));
        let mut token_lines = format!(
            "{admin_token},admin,admin,\"system:masters\"\n{user_token},{NON_ADMIN_USER},{NON_ADMIN_USER}\n"
        );
        if let Some(n) = &node_names {
            // The kubelet's identity, for the Node authorizer and NodeRestriction.
            token_lines.push_str(&format!(
                "{node_token},system:node:{0},system:node:{0},\"system:nodes\"\n",
                n.name
            ));
        }
        let tokens = write("tokens.csv", &token_lines)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        self.server = format!("https://{api_ip}:{api_port}");
        write(
            "admin.kubeconfig",
            &kubeconfig::render(&self.server, &pki.ca_pem, "admin", &admin_token),
        )?;
        write(
            "user.kubeconfig",
            &kubeconfig::render(&self.server, &pki.ca_pem, NON_ADMIN_USER, &user_token),
        )?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        self.spawn(
            opts,
            dir,
            "etcd",
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                // Test data: durability is not worth the fsync latency.
                "--unsafe-no-fsync=true".into(),
                // Room for the scale benchmark's 100,000 connections and Secrets and their
                // history until the API server compacts it (etcd's default is 2 GiB).
                "--quota-backend-bytes=8589934592".into(),
                "--log-level=warn".into(),
            ],
        )?;

        let path = |p: &Path| p.display().to_string();
        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--tls-cert-file={}", path(&serving_cert)),
            format!("--tls-private-key-file={}", path(&serving_key)),
            format!("--secure-port={api_port}"),
            format!("--bind-address={api_ip}"),
            format!("--advertise-address={api_ip}"),
            format!("--service-cluster-ip-range={}", node::SERVICE_CIDR),
            format!("--service-account-issuer={}", self.server),
            format!("--service-account-key-file={}", path(&sa_pub)),
            format!("--service-account-signing-key-file={}", path(&sa_key)),
            format!("--token-auth-file={}", path(&tokens)),
            format!("--client-ca-file={}", path(&ca_file)),
            "--allow-privileged=true".into(),
            "--v=0".into(),
        ];
        if opts.node.is_some() {
            api_args.extend([
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    path(&kubelet_client_cert)
                ),
                format!("--kubelet-client-key={}", path(&kubelet_client_key)),
            ]);
        } else {
            api_args.extend([
                "--authorization-mode=RBAC".into(),
                // No pods run here: no endpoints for the `kubernetes` Service, and nothing for
                // the ServiceAccount admission plugin to do.
                "--endpoint-reconciler-type=none".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
            ]);
        }
        self.spawn(opts, dir, "kube-apiserver", &api_args)?;
        self.wait_ready().await?;

        if opts.controller_manager || opts.node.is_some() {
            let kcm_port = free_port()?;
            let mut controllers = vec![
                "garbage-collector-controller",
                "namespace-controller",
                "serviceaccount-controller",
            ];
            let mut kcm_args = self.loopback_component_args(kcm_port);
            kcm_args.push(format!("--cert-dir={}", dir.join("kcm-certs").display()));
            if opts.node.is_some() {
                controllers.extend([
                    "deployment-controller",
                    "replicaset-controller",
                    "node-lifecycle-controller",
                    "endpointslice-controller",
                    "endpoints-controller",
                    "pod-garbage-collector-controller",
                    "root-ca-certificate-publisher-controller",
                    "clusterrole-aggregation-controller",
                    "disruption-controller",
                ]);
                kcm_args.push(format!("--root-ca-file={}", path(&ca_file)));
            }
            kcm_args.push(format!("--controllers={}", controllers.join(",")));
            self.spawn(opts, dir, "kube-controller-manager", &kcm_args)?;
        }

        if let (Some(node_opts), Some(node)) = (&opts.node, node_names) {
            let node_kubeconfig = write(
                "node.kubeconfig",
                &kubeconfig::render(&self.server, &pki.ca_pem, &node.name, &node_token),
            )?;
            self.node = Some(node);
            self.start_node(opts, node_opts, dir, &ca_file, &node_kubeconfig)
                .await?;
        }
        Ok(())
    }

    /// Starts containerd, imports the images, then kube-scheduler, the kubelet and kube-proxy,
    /// and waits for the node to turn Ready.
    async fn start_node(
        &mut self,
        opts: &Options,
        node_opts: &node::NodeOptions,
        dir: &Path,
        ca_file: &Path,
        node_kubeconfig: &Path,
    ) -> Result<(), Error> {
        let node = self.node.as_mut().expect("set by launch");
        let containerd_dir = dir.join("containerd");
        std::fs::create_dir_all(containerd_dir.join("net.d")).map_err(io("creating net.d"))?;
        let write = |path: PathBuf, content: String| {
            std::fs::write(&path, content).map_err(io(format!("writing {}", path.display())))?;
            Ok::<_, Error>(path)
        };
        let containerd_config =
            write(containerd_dir.join("config.toml"), node.containerd_config())?;
        write(
            containerd_dir.join("net.d/10-xero-node.conflist"),
            node.cni_config(),
        )?;
        let socket = node.containerd_socket.clone();
        node.save_host_state()?;
        node.create_cgroups()?;
        let node_name = node.name.clone();
        let kubelet_port = free_port()?;
        let kubelet_healthz = free_port()?;
        let kubelet_config = write(
            dir.join("kubelet.yaml"),
            node.kubelet_config(node_opts, ca_file, kubelet_port, kubelet_healthz),
        )?;
        let proxy_config = write(
            dir.join("kube-proxy.yaml"),
            node.kube_proxy_config(&self.admin_kubeconfig, free_port()?, free_port()?),
        )?;

        self.spawn_program(
            dir,
            "containerd",
            Path::new("/usr/bin/containerd"),
            &[format!("--config={}", containerd_config.display())],
        )?;
        let started = Instant::now();
        while !socket.exists() {
            self.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::Node(format!(
                    "containerd did not open {} within 30 s",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.node
            .as_ref()
            .expect("set")
            .import_images(&node_opts.images)?;

        let path = |p: &Path| p.display().to_string();
        let sched_port = free_port()?;
        self.spawn(
            opts,
            dir,
            "kube-scheduler",
            &self.loopback_component_args(sched_port),
        )?;
        self.spawn(
            opts,
            dir,
            "kubelet",
            &[
                format!("--config={}", path(&kubelet_config)),
                format!("--kubeconfig={}", path(node_kubeconfig)),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--cert-dir={}", dir.join("kubelet-certs").display()),
                format!("--hostname-override={node_name}"),
                format!("--node-ip={}", node::NODE_IP),
                "--v=0".into(),
            ],
        )?;
        self.spawn(
            opts,
            dir,
            "kube-proxy",
            &[format!("--config={}", path(&proxy_config)), "--v=0".into()],
        )?;
        let client = self.admin_client().await?;
        let node = self.node.take().expect("set");
        let result = node.wait_ready(&client, || self.check_alive()).await;
        self.node = Some(node);
        result
    }

    fn spawn(
        &mut self,
        opts: &Options,
        dir: &Path,
        name: &'static str,
        args: &[String],
    ) -> Result<(), Error> {
        self.spawn_program(dir, name, &opts.bin_dir.join(name), args)
    }

    fn spawn_program(
        &mut self,
        dir: &Path,
        name: &'static str,
        program: &Path,
        args: &[String],
    ) -> Result<(), Error> {
        let log = dir.join(format!("{name}.log"));
        let program = program.to_path_buf();
        let child = start_component(name, &program, args, &log)?;
        self.components.push(Component {
            name,
            child,
            log,
            program,
            args: args.to_vec(),
        });
        Ok(())
    }

    /// Kills the API server (SIGKILL, as a crash would) and starts it again on the same port and
    /// state; returns once it answers `/readyz` again. Clients see it down for a few seconds.
    pub async fn restart_apiserver(&mut self) -> Result<(), Error> {
        self.kill_apiserver()?;
        self.start_apiserver().await
    }

    /// Kills the API server (SIGKILL, as a crash would); [`Self::start_apiserver`] brings it
    /// back. Until then clients get connection errors.
    pub fn kill_apiserver(&mut self) -> Result<(), Error> {
        let c = self.apiserver()?;
        let _ = c.child.kill();
        let _ = c.child.wait();
        Ok(())
    }

    /// Starts the API server killed by [`Self::kill_apiserver`] again on the same port and
    /// state; returns once it answers `/readyz`.
    pub async fn start_apiserver(&mut self) -> Result<(), Error> {
        let c = self.apiserver()?;
        if c.child.try_wait().ok().flatten().is_none() {
            // Still running: replaced, not leaked.
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        c.child = start_component(c.name, &c.program, &c.args, &c.log)?;
        self.wait_ready().await
    }

    fn apiserver(&mut self) -> Result<&mut Component, Error> {
        self.components
            .iter_mut()
            .find(|c| c.name == "kube-apiserver")
            .ok_or(Error::Build("no API server is running".into()))
    }

    /// Flags of kube-controller-manager and kube-scheduler: the admin's kubeconfig for
    /// everything, no leader election, their own serving port on loopback.
    fn loopback_component_args(&self, port: u16) -> Vec<String> {
        let kubeconfig = self.admin_kubeconfig.display();
        vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--v=0".into(),
        ]
    }

    async fn admin_client(&self) -> Result<kube::Client, Error> {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&self.admin_kubeconfig)
                .map_err(|e| Error::Build(e.to_string()))?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| Error::Build(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| Error::Build(e.to_string()))
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        let client = self.admin_client().await?;
        loop {
            self.check_alive()?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let tail = self
                    .components
                    .iter()
                    .find(|c| c.name == "kube-apiserver")
                    .map(|c| log_tail(&c.log))
                    .unwrap_or_default();
                return Err(Error::NotReady(READY_TIMEOUT, tail));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Fails if any component has exited.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        for c in &mut self.components {
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(Error::Exited {
                    component: c.name,
                    status: status.to_string(),
                    log_tail: log_tail(&c.log),
                });
            }
        }
        Ok(())
    }

    /// Stops every component (SIGTERM, then SIGKILL after a grace period), newest first, and
    /// removes the state directory.
    pub fn stop(&mut self) {
        while let Some(mut c) = self.components.pop() {
            if c.name == "kube-proxy"
                && let Some(node) = &self.node
            {
                // While the kubelet still runs: it tears the pods down, networks included.
                let kubectl = c.program.with_file_name("kubectl");
                node.drain(&kubectl, &self.admin_kubeconfig);
            }
            if c.name == "containerd"
                && let Some(node) = &self.node
            {
                // The kubelet is gone; what is left would outlive containerd.
                node.kill_workloads();
            }
            if let Ok(pid) = i32::try_from(c.child.id()) {
                // SAFETY: plain syscall on a pid we started and have not reaped yet.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        if let Some(node) = self.node.take() {
            node.cleanup();
        }
        if let Some(dir) = self.state_dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts one component with its output appended to `log`; the kernel kills it if the launcher
/// dies.
fn start_component(
    name: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<Child, Error> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("opening {name}.log")))?;
    let log_err = log_file.try_clone().map_err(io("cloning a log handle"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("PATH", node::system_path())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; this makes the
    // kernel kill the component if the launcher dies, so nothing outlives a killed test run.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A process group of its own: Ctrl-C on the terminal reaches the launcher only,
            // which then stops the components in order (the node's pods drained first).
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(io(format!("starting {name}")))
}

/// A free TCP port on 127.0.0.1 (the OS picks it; the listener is closed before use).
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

/// The last lines of a component's log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Removes state directories whose launcher is gone (killed with SIGKILL, say).
fn remove_stale_state_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = entry
            .file_name()
            .to_string_lossy()
            .starts_with(STATE_DIR_PREFIX);
        if !is_ours {
            continue;
        }
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = owner
            && !process_alive(pid)
        {
            if path.join("containerd").exists() {
                node::reap_stale(&path, pid.unsigned_abs());
            }
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_on_loopback_and_nonzero() {
        let port = free_port().expect("port");
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free again");
    }

    #[test]
    fn stale_state_dirs_of_dead_owners_are_removed() {
        let dead = tempfile::Builder::new()
            .prefix(STATE_DIR_PREFIX)
            .tempdir()
            .expect("dir");
        // Pid numbers near i32::MAX are never handed out (pid_max is at most 4194304).
        std::fs::write(dead.path().join(OWNER_FILE), (i32::MAX - 1).to_string()).expect("write");
        let alive = tempfile::Builder::new()
            .prefix(STATE_DIR_PREFIX)
            .tempdir()
            .expect("dir");
        std::fs::write(
            alive.path().join(OWNER_FILE),
            std::process::id().to_string(),
        )
        .expect("write");
        remove_stale_state_dirs();
        assert!(!dead.path().exists(), "dead owner's dir removed");
        assert!(alive.path().exists(), "live owner's dir kept");
    }

    #[test]
    fn missing_binaries_are_named() {
        let empty = tempfile::tempdir().expect("dir");
        let opts = Options {
            bin_dir: empty.path().to_path_buf(),
            controller_manager: false,
            node: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let err = rt
            .block_on(ControlPlane::start(&opts))
            .err()
            .expect("fails");
        assert!(
            err.to_string()
                .contains("etcd, kube-apiserver, kube-controller-manager"),
            "{err}"
        );
    }
}
