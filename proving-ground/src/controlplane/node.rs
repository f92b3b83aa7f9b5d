//! A real one-node cluster beside the local control plane: containerd + runc + the CNI bridge
//! (Debian's packages, installed by `scripts/node-deps.sh`), and kubelet, kube-scheduler and
//! kube-proxy built from the same Go module as the control plane.
//!
//! Everything runs in one network namespace made for the run ([`enter_network_namespace`]): it
//! has only `lo` (with the node IP on it) and the pods' bridge, and no route out, so nothing a
//! test starts can send anything off this machine, and kube-proxy's iptables rules stay inside.
//! Per-run names keep two runs apart: the state directory, the kubelet's cgroup root, the CNI
//! IPAM directory, the containerd socket. [`Node::cleanup`] undoes what the host keeps after the
//! processes are gone: container processes, mounts, cgroups and the kernel settings the kubelet
//! changes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Error, io};

/// The service network (the `kubernetes` Service is its first address).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The `kubernetes` Service's cluster IP (must be in the API server's serving certificate).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The node's address, on `lo` inside the run's network namespace.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The pods' network, on a bridge inside the namespace.
pub const POD_CIDR: &str = "10.88.0.0/24";
/// The sandbox ("pause") image every pod starts with; imported from [`NodeOptions::images`].
pub const SANDBOX_IMAGE: &str = "xero.local/pause:1";
/// Kernel settings the kubelet changes at start; restored by [`Node::cleanup`].
const KUBELET_SYSCTLS: [&str; 6] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// The host state to restore, written before the kubelet starts so that the cleanup after a
/// killed launcher restores it too.
const HOST_STATE_FILE: &str = "host-state.json";
/// How long the node may take to turn Ready (measured: 6–8 s).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Where Debian's packages put the container runtime; the node needs these on `PATH`.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Where the CNI library caches each sandbox's result (fixed: not configurable in containerd
/// 1.6); files are named after the sandbox id.
const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";
/// Host paths the kubelet and containerd use whatever their flags; removed after the run when
/// it created them and they are empty (sockets aside).
const FIXED_HOST_DIRS: [&str; 8] = [
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet",
    "/var/lib/cni/results",
    "/var/lib/cni",
    "/var/log/containers",
    "/run/containerd/s",
    "/run/containerd",
    "/run/netns",
];
/// How long stopping waits for the kubelet to tear the pods down (their network included).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the node needs.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// OCI image tarballs imported into containerd before the kubelet starts; one of them must be
    /// [`SANDBOX_IMAGE`].
    pub images: Vec<PathBuf>,
    /// The kubelet's `syncFrequency`: how often it re-reads the Secrets that pods mount (its
    /// default is 1 minute).
    pub sync_frequency: Duration,
}

/// Moves this process into a new network namespace with `lo` up, [`NODE_IP`] on it and the
/// service network routed to it. Must run before any other thread starts (every thread and
/// child started later is in the namespace). The namespace goes away with the last process in
/// it.
pub fn enter_network_namespace() -> Result<(), Error> {
    // SAFETY: a plain syscall; called while the process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Node(format!(
            "cannot make a network namespace for the node ({}); the real node needs root",
            std::io::Error::last_os_error()
        )));
    }
    let node_ip = format!("{NODE_IP}/32");
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", &node_ip, "dev", "lo"],
        // hostNetwork clients (the tests, the kubelet) reach Services through kube-proxy's rules.
        &["route", "add", SERVICE_CIDR, "dev", "lo"],
    ] {
        run("ip", args)?;
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io("enabling ip_forward"))?;
    Ok(())
}

/// The per-run names and paths of one node.
pub struct Node {
    /// The node's name (`xero-node-<pid>`).
    pub name: String,
    /// containerd's socket.
    pub containerd_socket: PathBuf,
    dir: PathBuf,
    cgroup_root: String,
    saved: HostState,
}

/// What the node changes on the host, to undo afterwards.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct HostState {
    /// The kernel settings the kubelet changes, with their values before it started.
    sysctls: Vec<(String, String)>,
    /// The [`FIXED_HOST_DIRS`] that did not exist before the node started.
    created_dirs: Vec<String>,
}

impl Node {
    /// Names for a node whose state lives in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self::for_owner(dir, std::process::id())
    }

    /// Names of the node a launcher with pid `id` ran in `dir`.
    fn for_owner(dir: &Path, id: u32) -> Self {
        Self {
            name: format!("xero-node-{id}"),
            containerd_socket: dir.join("containerd/containerd.sock"),
            dir: dir.to_path_buf(),
            cgroup_root: format!("/xero-node-{id}"),
            saved: HostState::default(),
        }
    }

    /// containerd's configuration: its own root, state and socket, runc's state under the run's
    /// directory, the CNI bridge, and the settings this machine kind needs.
    pub fn containerd_config(&self) -> String {
        let d = self.dir.join("containerd");
        let d = d.display();
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.opt"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # Pod network namespaces under the run's state directory, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/net.d"
"#
        )
    }

    /// The pods' network: a bridge with host-local addresses kept in the run's directory.
    pub fn cni_config(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "xero-node",
            "plugins": [{
                "type": "bridge",
                "bridge": "xnode0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.dir.join("containerd/ipam").display().to_string(),
                },
            }, {"type": "portmap", "capabilities": {"portMappings": true}}],
        })
        .to_string()
    }

    /// The kubelet's configuration (JSON is valid YAML).
    pub fn kubelet_config(
        &self,
        opts: &NodeOptions,
        ca_file: &Path,
        port: u16,
        healthz_port: u16,
    ) -> String {
        serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This machine kind has cgroup v1; kubelets from 1.35 on refuse it unless told.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": format!("unix://{}", self.containerd_socket.display()),
            "address": NODE_IP.to_string(),
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": ca_file.display().to_string()},
            },
            "authorization": {"mode": "Webhook"},
            "syncFrequency": format!("{}s", opts.sync_frequency.as_secs()),
            "failSwapOn": false,
            "resolvConf": "",
            "podLogsDir": self.dir.join("pod-logs").display().to_string(),
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "rotateCertificates": false,
            "serverTLSBootstrap": false,
        })
        .to_string()
    }

    /// kube-proxy's configuration: iptables rules inside the namespace, and no global conntrack
    /// settings (those are the host's).
    pub fn kube_proxy_config(&self, kubeconfig: &Path, healthz: u16, metrics: u16) -> String {
        serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": kubeconfig.display().to_string()},
            "hostnameOverride": self.name,
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": format!("127.0.0.1:{healthz}"),
            "metricsBindAddress": format!("127.0.0.1:{metrics}"),
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        })
        .to_string()
    }

    /// Remembers the kernel settings the kubelet is about to change, and which fixed host
    /// directories do not exist yet.
    pub fn save_host_state(&mut self) -> Result<(), Error> {
        self.saved = HostState {
            created_dirs: FIXED_HOST_DIRS
                .into_iter()
                .filter(|d| !Path::new(d).exists())
                .map(str::to_owned)
                .collect(),
            sysctls: KUBELET_SYSCTLS
                .iter()
                .filter_map(|k| {
                    let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?;
                    Some(((*k).to_owned(), v.trim().to_owned()))
                })
                .collect(),
        };
        let json = serde_json::to_string(&self.saved).expect("plain data serializes");
        std::fs::write(self.dir.join(HOST_STATE_FILE), json).map_err(io("writing the host state"))
    }

    /// Creates the kubelet's cgroup root in every hierarchy (the kubelet requires it to exist);
    /// a cpuset gets its parent's CPUs and memory nodes, as a new v1 cpuset starts empty.
    pub fn create_cgroups(&self) -> Result<(), Error> {
        for h in cgroup_hierarchies() {
            let dir = h.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&dir)
                .map_err(io(format!("creating the cgroup {}", dir.display())))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(h.join(file)) {
                    std::fs::write(dir.join(file), value.trim())
                        .map_err(io(format!("writing {file} of {}", dir.display())))?;
                }
            }
        }
        Ok(())
    }

    /// Imports OCI image tarballs into containerd's `k8s.io` namespace (the kubelet's).
    pub fn import_images(&self, images: &[PathBuf]) -> Result<(), Error> {
        for image in images {
            let socket = self.containerd_socket.display().to_string();
            let path = image.display().to_string();
            run(
                "ctr",
                &[
                    "--address",
                    &socket,
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    &path,
                ],
            )?;
        }
        Ok(())
    }

    /// Waits until the Node object reports Ready.
    pub async fn wait_ready(
        &self,
        client: &kube::Client,
        mut alive: impl FnMut() -> Result<(), Error>,
    ) -> Result<(), Error> {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        let started = Instant::now();
        loop {
            alive()?;
            if let Ok(Some(node)) = nodes.get_opt(&self.name).await {
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if ready {
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(Error::Node(format!(
                    "node {} was not Ready after {READY_TIMEOUT:?}; see kubelet.log and containerd.log in {}",
                    self.name,
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops every pod the way a node drain does, so that the kubelet tears down their
    /// containers and networks: cordons the node (no replacement pods), deletes all pods, and
    /// waits until containerd runs no task. Best effort: [`Self::kill_workloads`] follows.
    pub fn drain(&self, kubectl: &Path, kubeconfig: &Path) {
        let kubectl = |args: &[&str]| {
            let _ = Command::new(kubectl)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg("--request-timeout=10s")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        kubectl(&["cordon", &self.name]);
        kubectl(&[
            "delete",
            "pods",
            "--all",
            "-A",
            "--force",
            "--grace-period=0",
            "--wait=false",
        ]);
        let socket = self.containerd_socket.display().to_string();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while Instant::now() < deadline {
            let out = Command::new("ctr")
                .args(["--address", &socket, "-n", "k8s.io", "tasks", "ls"])
                .env("PATH", SYSTEM_PATH)
                .stdin(Stdio::null())
                .output();
            let running = match out {
                Ok(o) if o.status.success() => {
                    String::from_utf8_lossy(&o.stdout).contains("RUNNING")
                }
                _ => false,
            };
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kills every container process of the node (they live in the kubelet's cgroup root) and
    /// the containerd shims of this run. Called after the kubelet stopped, before containerd.
    pub fn kill_workloads(&self) {
        for _ in 0..3 {
            let pids = cgroup_pids(&self.cgroup_root);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: SIGKILL to processes in this run's own cgroups.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let socket = self.containerd_socket.display().to_string();
        for (pid, args) in processes_with_arg(&socket, "containerd-shim") {
            // SAFETY: SIGKILL to a shim started for this run's containerd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if let Some(id) = args
                .iter()
                .position(|a| a == "-id")
                .and_then(|i| args.get(i + 1))
            {
                let _ = std::fs::remove_file(shim_socket(&socket, id));
            }
        }
        // A shim that died with its task (not torn down by containerd) leaves its socket in the
        // fixed /run/containerd/s: the tasks' ids are in the run's state directory.
        let tasks = self
            .dir
            .join("containerd/state/io.containerd.runtime.v2.task/k8s.io");
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let id = task.file_name().to_string_lossy().into_owned();
            let _ = std::fs::remove_file(shim_socket(&socket, &id));
        }
    }

    /// Undoes what outlives the node's processes: mounts under the run's directory and the pods'
    /// network namespaces, the kubelet's cgroups, its kernel settings, and its log links.
    pub fn cleanup(&self) {
        self.remove_cni_results();
        unmount_under(&self.dir);
        remove_cgroups(&self.cgroup_root);
        for (key, value) in &self.saved.sysctls {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
        }
        remove_links_into("/var/log/containers", &self.dir);
        for dir in &self.saved.created_dirs {
            // The kubelet's device-plugin socket is the one file it leaves there.
            let _ = std::fs::remove_file(Path::new(dir).join("kubelet.sock"));
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes the CNI library's cached results of this run's sandboxes (left behind when a
    /// sandbox was killed rather than torn down).
    fn remove_cni_results(&self) {
        let sandboxes = self
            .dir
            .join("containerd/root/io.containerd.grpc.v1.cri/sandboxes");
        let Ok(ids) = std::fs::read_dir(sandboxes) else {
            return;
        };
        let ids: Vec<String> = ids
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let Ok(results) = std::fs::read_dir(CNI_RESULTS_DIR) else {
            return;
        };
        for e in results.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| name.contains(id.as_str())) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Cleans up after a launcher that was killed (its pid was `owner`): kills what is left in its
/// node's cgroups, and undoes its mounts, cgroups and log links.
pub fn reap_stale(dir: &Path, owner: u32) {
    let mut node = Node::for_owner(dir, owner);
    if let Some(saved) = std::fs::read_to_string(dir.join(HOST_STATE_FILE))
        .ok()
        .and_then(|json| serde_json::from_str(&json).ok())
    {
        node.saved = saved;
    }
    node.kill_workloads();
    node.cleanup();
}

/// Runs a short system command; its stderr goes into the error.
fn run(program: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(program)
        .args(args)
        .env("PATH", SYSTEM_PATH)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error::Node(format!(
                "cannot run {program} ({e}); the real node needs it: run scripts/node-deps.sh"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Node(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `PATH` for the node's components (containerd finds runc and its shim on it).
pub fn system_path() -> &'static str {
    SYSTEM_PATH
}

/// The mount points of the cgroup hierarchies (v1 and v2), from this process's mount table.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            // Fields: … mount point (5th) … " - " fstype source options.
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let point = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(unescape_mount_path(point)))
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Every process in any cgroup under `root` in any hierarchy.
fn cgroup_pids(root: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for h in cgroup_hierarchies() {
        walk_dirs(&h.join(root.trim_start_matches('/')), &mut |d| {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        });
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the cgroups under `root` in every hierarchy, deepest first.
fn remove_cgroups(root: &str) {
    for h in cgroup_hierarchies() {
        let mut dirs = Vec::new();
        walk_dirs(&h.join(root.trim_start_matches('/')), &mut |d| {
            dirs.push(d.to_path_buf())
        });
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

fn walk_dirs(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk_dirs(&e.path(), f);
            }
        }
    }
}

/// Where containerd 1.6's runc shim for task `id` of `containerd_socket`'s `k8s.io` namespace
/// listens: `/run/containerd/s/<sha256 of "<socket>/k8s.io/<id>">`, whatever containerd's
/// configured directories.
fn shim_socket(containerd_socket: &str, id: &str) -> PathBuf {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{containerd_socket}/k8s.io/{id}").as_bytes(),
    );
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Path::new("/run/containerd/s").join(hex)
}

/// Processes (pid and arguments) whose command line contains `needle` and whose program name
/// contains `program`.
fn processes_with_arg(needle: &str, program: &str) -> Vec<(i32, Vec<String>)> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_program = args.first().is_some_and(|a| a.contains(program));
        if is_program && args.iter().any(|a| a.contains(needle)) {
            pids.push((pid, args));
        }
    }
    pids
}

/// Unmounts (lazily, deepest first) every mount point under `dir`, and the network namespaces
/// of pods whose mounts point there.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: unmounting a path under this run's own state directory.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes symbolic links in `dir` that point under `target`.
fn remove_links_into(dir: &str, target: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if let Ok(to) = std::fs::read_link(e.path())
            && to.starts_with(target)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_sockets_are_where_containerd_puts_them() {
        // Seen on this machine: a killed shim's socket, for this socket and task id.
        let socket = "/tmp/xero-cp-TXo9UJ/containerd/containerd.sock";
        let id = "581cdfad75cae0e17b6daf73245b0b49ac404fb98efda374371cae5fad175056";
        assert_eq!(
            shim_socket(socket, id),
            Path::new(
                "/run/containerd/s/27130a702d1c7146989b9795df4b1eac8ef5762a3dad3924b17f97e5cb4218d0"
            )
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn configs_name_the_run_and_parse() {
        let node = Node::new(Path::new("/tmp/xero-cp-test"));
        let opts = NodeOptions {
            images: vec![],
            sync_frequency: Duration::from_secs(10),
        };
        let kubelet: serde_json::Value =
            serde_json::from_str(&node.kubelet_config(&opts, Path::new("/ca"), 1, 2))
                .expect("json");
        assert_eq!(kubelet["cgroupRoot"], node.cgroup_root);
        assert_eq!(kubelet["syncFrequency"], "10s");
        let cni: serde_json::Value = serde_json::from_str(&node.cni_config()).expect("json");
        assert!(
            cni["plugins"][0]["ipam"]["dataDir"]
                .as_str()
                .expect("dir")
                .starts_with("/tmp/xero-cp-test/")
        );
        assert!(
            node.containerd_config()
                .contains("restrict_oom_score_adj = true")
        );
    }
}
