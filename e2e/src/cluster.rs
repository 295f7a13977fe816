//! The one-host cluster: the API server stand-in, the real `dsr-operator`
//! and one real `dsr-agent` per node, in the world of
//! [`crate::topology::World`]: nodes are network namespaces on one segment,
//! pods are namespaces behind routed veths (or, in the bridged layout, on
//! the segment), each with a process in a kubelet-shaped cgroup carrying
//! the pod's UID. Each node's agent runs in that node's namespace, with
//! exactly the capabilities docs/install.md documents; the stand-in and the two
//! operator replicas run in the router namespace (10.10.0.1:6443 on the
//! segment, like a control plane the nodes reach). The router reaches the
//! VIP on-link (ARP mode) unless a scenario routes it.
//!
//! Nodes: `ingress-1` (ingress, hosts pods), `worker-1` and `worker-2`
//! (host pods, excluded from load balancing the standard way), and on
//! request `ingress-2` (a second ingress) and `worker-3` (no dsr-agent).

use std::{
    collections::BTreeMap,
    fs,
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kube_dsr_crds::nodereport::{DsrNodeReport, IngressReport};
use kube_dsr_crds::{DsrService, DsrServiceStatus};
use serde_json::json;

use crate::netns::{PinDir, sh};
use crate::pods::{FakePod, Layout, v2_root};
use crate::topology::{NodeInfo, PodNet, ROUTER_LAN, VIP, VIP6, World, WorldOptions};

pub const API_PORT: u16 = 6443;
pub const WORKER: &str = "worker-1";
pub const WORKER2: &str = "worker-2";
/// A node that runs no dsr-agent ([`Options::node_without_agent`]).
pub const WORKER3: &str = "worker-3";
pub const INGRESS: &str = "ingress-1";
/// The second ingress node ([`run_with`] with two ingress nodes).
pub const INGRESS2: &str = "ingress-2";
/// A pod UID no pod has (see the cleanup at the end of [`run_with`]).
const NO_POD: &str = "00000000-0000-4000-8000-000000000000";
/// The operator replicas: identity and HTTP address (router namespace).
pub const OPERATORS: [(&str, &str); 2] = [("op-1", "127.0.0.1:18080"), ("op-2", "127.0.0.1:18081")];
/// Every agent's /metrics, inside its node's namespace.
pub const INGRESS_METRICS: &str = "http://127.0.0.1:9477/metrics";
/// The agents' `--resync-seconds`.
pub const AGENT_RESYNC: Duration = Duration::from_secs(5);

/// A child process killed on drop (also when the test fails), its output
/// in a log file shown when asked.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Runs `program` in namespace `ns` with only the capabilities `caps`
    /// (as the chart grants them: everything else dropped).
    pub fn spawn(
        name: &str,
        ns: &str,
        caps: &[String],
        program: &Path,
        args: &[&str],
        kubeconfig: &Path,
    ) -> Result<Self> {
        // Unique per cluster: several may run at once in one test binary.
        let log = std::env::temp_dir().join(format!("kdsr-{name}-{ns}.log"));
        let out = fs::File::create(&log)?;
        // Not `ip netns exec`: it remounts /sys, hiding the host's bpffs.
        // Like a hostNetwork pod with /sys/fs/bpf mounted, the process
        // enters only the network namespace.
        let netns = fs::File::open(format!("/var/run/netns/{ns}"))?;
        let fd = netns.as_raw_fd();
        let bounding: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--bounding-set=-all{bounding}")).arg("--inh-caps=-all").arg(program);
        // SAFETY: setns is async-signal-safe; the fd stays open (owned by
        // `netns`) until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            // `kube=warn` would also silence `kube_dsr_*` (a prefix match).
            .env("RUST_LOG", "info,kube_client=warn,kube_runtime=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.into(), child, log })
    }

    /// The process id (setpriv executes the program in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} (last lines) ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(25)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

/// The workspace binaries next to this test's executable, built when
/// missing (`make test` builds them before the tests).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Tests live in `<target>/<profile>/deps/`, binaries in `<target>/<profile>/`.
    let dir = exe.parent().context("executable layout")?;
    let profile_dir =
        if dir.ends_with("deps") { dir.parent().context("deps layout")? } else { dir };
    let path = profile_dir.join(name);
    if !path.exists() {
        let target = profile_dir.parent().context("target dir")?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // `--workspace --bins`, as `make test` prebuilds: features are
        // unified over what is built, so one package alone would rebuild
        // its dependencies with other features.
        cmd.args(["build", "--quiet", "--locked", "--workspace", "--bins", "--target-dir"])
            .arg(target);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build")?;
        ensure!(status.success() && path.exists(), "building {name} failed");
    }
    Ok(path)
}

/// Polls `check` every 200 ms until it yields a value or `limit` passes.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a scenario needs from the world, as plain data (the world itself
/// stays on the test's thread).
#[derive(Clone, Debug)]
pub struct Names {
    /// The bridge's namespace (the L2 segment).
    pub lan: String,
    pub router: String,
    /// `ingress-1`'s namespace.
    pub ingress: String,
    /// `ingress-2`'s namespace, when there is one.
    pub ingress2: Option<String>,
    pub client: String,
    /// The pods made with the world (`backend-N`, answering as such):
    /// namespace, IPv4 and IPv6 addresses.
    pub backends: Vec<(String, String, String)>,
    /// The node of each of `backends`.
    pub backend_nodes: Vec<String>,
    /// Every node.
    pub nodes: Vec<NodeInfo>,
    /// The world's layout.
    pub opts: Options,
    pub pins: PathBuf,
    pub agent: PathBuf,
    /// The capabilities docs/install.md documents for the agent (and the chart
    /// grants): the agents run with these and no others.
    pub agent_caps: Vec<String>,
    pub operator: PathBuf,
}

impl Names {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| format!("no node {name}"))
    }
}

/// The world a scenario runs in (see [`WorldOptions`]).
pub type Options = WorldOptions;

/// The capability table of docs/install.md's "Privileges" section.
pub fn documented_capabilities() -> Result<Vec<String>> {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/install.md"))?;
    let table = doc
        .split("<!-- chart-check: capabilities -->")
        .nth(1)
        .context("docs/install.md has no capability table")?;
    let caps: Vec<String> = table
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .filter_map(|l| l.split('|').nth(1))
        .map(|c| c.trim().trim_matches('`').to_string())
        .collect();
    ensure!(!caps.is_empty(), "empty capability table");
    Ok(caps)
}

pub fn lo_addrs(ns: &str) -> Result<String> {
    sh(&format!("ip -n {ns} -o addr show dev lo"))
}

pub fn sysctl(ns: &str, key: &str) -> Result<String> {
    Ok(sh(&format!("ip netns exec {ns} sysctl -n {key}"))?.trim().to_string())
}

pub fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// What kubelet writes into a Node's status: its addresses.
fn node_addresses(n: &NodeInfo) -> serde_json::Value {
    json!({"status": {"addresses": [
        {"type": "InternalIP", "address": n.addr.to_string()},
        {"type": "InternalIP", "address": n.addr6.to_string()},
        {"type": "Hostname", "address": n.name},
    ]}})
}

/// Packets an agent's ingress stage forwarded (every VIP), from its
/// metrics: the `kubedsr_agent_vip_packets_total` series of the ingress
/// stage, not those of its node stage (`service="<ns>/<name>/v4/node"`),
/// which count a local pod's packets a second time.
pub fn ingress_forwarded(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("kubedsr_agent_vip_packets_total{") && !l.contains("/node\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub fn ready_node(name: &str, labels: serde_json::Value) -> Result<Node> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    }))?)
}

pub async fn set_ready(nodes: &Api<Node>, name: &str) -> Result<()> {
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

pub fn counter(ns: &str, name: &str) -> Result<u64> {
    Ok(sh(&format!("ip netns exec {ns} cat /sys/class/net/eth0/statistics/{name}"))?
        .trim()
        .parse()?)
}

/// A running cluster: the stand-in, the operator, an agent per node, and
/// the pods created so far.
pub struct Cluster {
    pub n: Names,
    pub client: Client,
    pub nodes: Api<Node>,
    pub pods: Api<Pod>,
    pub services: Api<DsrService>,
    pub reports: Api<DsrNodeReport>,
    server: Option<kube_dsr_apiserver::Handle>,
    kubeconfig: PathBuf,
    procs: BTreeMap<String, Proc>,
    fake_pods: BTreeMap<String, FakePod>,
    /// Pods made by [`Cluster::add_pod_on`]: their network and servers.
    pod_nets: BTreeMap<String, PodNet>,
    /// Node of every pod registered so far (pod name → node).
    pod_nodes: BTreeMap<String, String>,
    /// Next pod address number per node.
    next_host: BTreeMap<String, u8>,
}

impl Cluster {
    /// Starts the stand-in, registers both nodes Ready, starts the
    /// operator and both agents and waits until each agent has reported.
    pub async fn start(n: Names) -> Result<Self> {
        let server =
            kube_dsr_apiserver::Server::start((std::net::Ipv4Addr::UNSPECIFIED, API_PORT).into())
                .await
                .context("starting the API server stand-in")?;
        let url = format!("http://{ROUTER_LAN}:{API_PORT}");
        let kubeconfig = std::env::temp_dir().join(format!("kdsr-kubeconfig-{}", n.router));
        fs::write(&kubeconfig, kube_dsr_apiserver::kubeconfig(&url))?;
        let client = Client::try_from(kube::Config::new(url.parse()?))?;
        let mut c = Cluster {
            nodes: Api::all(client.clone()),
            pods: Api::namespaced(client.clone(), "default"),
            services: Api::namespaced(client.clone(), "default"),
            reports: Api::all(client.clone()),
            client,
            n,
            server: Some(server),
            kubeconfig,
            procs: BTreeMap::new(),
            fake_pods: BTreeMap::new(),
            pod_nets: BTreeMap::new(),
            pod_nodes: BTreeMap::new(),
            next_host: BTreeMap::new(),
        };
        // Nodes, as kubelet registers them (with their addresses). The
        // workers are excluded from load balancing the standard way, so
        // only the ingress nodes are ingress nodes.
        let pp = PostParams::default();
        let mut agents = Vec::new();
        for node in c.n.nodes.clone() {
            let labels = if node.ingress {
                json!({"kubedsr.io/ingress": "true"})
            } else {
                json!({"node.kubernetes.io/exclude-from-external-load-balancers": "true"})
            };
            let mut obj = ready_node(&node.name, labels)?;
            obj.spec = Some(serde_json::from_value(json!({
                "podCIDR": node.pod_cidr(), "podCIDRs": [node.pod_cidr(), node.pod_cidr6()],
            }))?);
            c.nodes.create(&pp, &obj).await?;
            let ps = PatchParams::default();
            c.nodes.patch_status(&node.name, &ps, &Patch::Merge(&node_addresses(&node))).await?;
            set_ready(&c.nodes, &node.name).await?;
            if node.agent {
                agents.push(node.name.clone());
            }
        }
        for node in &agents {
            c.start_agent(node)?;
        }
        // Two operator replicas with leader election, as the chart runs
        // them (shorter Lease timings, so a takeover fits in a test).
        let operator = c.n.operator.clone();
        for (identity, http) in OPERATORS {
            let args = [
                "--http-addr",
                http,
                "--lease-namespace",
                "kube-dsr",
                "--identity",
                identity,
                "--lease-duration",
                "4",
                "--lease-grace",
                "1",
            ];
            let name = format!("operator-{identity}");
            let p = Proc::spawn(&name, &c.n.router, &[], &operator, &args, &c.kubeconfig)?;
            c.procs.insert(name, p);
        }
        for node in &agents {
            let reports = c.reports.clone();
            wait_for(&format!("{node}'s DsrNodeReport"), Duration::from_secs(60), || {
                let reports = reports.clone();
                async move { Ok(reports.get_opt(node).await?.map(|_| ())) }
            })
            .await?;
        }
        Ok(c)
    }

    /// Starts (or restarts) the agent of `node`, in the node's namespace.
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let info = self.n.node(node)?;
        ensure!(info.agent, "{node} runs no dsr-agent");
        let (ns, http, pins) = (info.ns.clone(), "127.0.0.1:9477", self.n.pins.join(node));
        let pins = pins.to_str().context("pin path")?.to_string();
        let args = [
            "--node-name",
            node,
            "--http-addr",
            http,
            "--resync-seconds",
            &AGENT_RESYNC.as_secs().to_string(),
            "--bpffs-dir",
            &pins,
            "--lease-namespace",
            "kube-dsr",
            "--lease-duration",
            "6",
            "--lease-retry",
            "1",
        ];
        let name = format!("agent-{node}");
        let p =
            Proc::spawn(&name, &ns, &self.n.agent_caps, &self.n.agent, &args, &self.kubeconfig)?;
        // Replacing a running one kills it first (its Drop).
        self.procs.insert(name, p);
        Ok(())
    }

    /// The identity of the operator replica holding the leader Lease.
    pub async fn operator_leader(&self) -> Result<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-dsr");
        wait_for("an operator leader", Duration::from_secs(30), || {
            let leases = leases.clone();
            async move {
                let l = leases.get_opt("dsr-operator").await?;
                Ok(l.and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty()))
            }
        })
        .await
    }

    /// SIGKILLs operator replica `identity` (no Lease release).
    pub fn kill_operator(&mut self, identity: &str) {
        self.procs.remove(&format!("operator-{identity}"));
    }

    /// SIGKILLs the agent of `node`: no cleanup, no Lease release.
    pub fn kill_agent(&mut self, node: &str) {
        self.procs.remove(&format!("agent-{node}"));
    }

    /// Creates pod `name` in backend namespace `backend` (index into
    /// `n.backends`, on its node `n.backend_nodes[backend]`), labelled
    /// `app=<app>`, with a process in a cgroup carrying its UID, Running
    /// and Ready. Returns the UID.
    pub async fn add_pod(&mut self, name: &str, app: &str, backend: usize) -> Result<String> {
        let uid = self.add_pod_without_process(name, app, backend).await?;
        self.start_pod_process(name, backend, &uid)?;
        Ok(uid)
    }

    /// Registers pod `name` as [`Cluster::add_pod`] does (on backend
    /// `backend`'s node, labelled `app=<app>`, Running and Ready with its
    /// addresses) but starts no process: the node's agent cannot find its
    /// namespace until [`Cluster::start_pod_process`], like a pod whose
    /// sandbox is not visible on the node yet. Returns the UID.
    pub async fn add_pod_without_process(
        &mut self,
        name: &str,
        app: &str,
        backend: usize,
    ) -> Result<String> {
        let (_, v4, v6) = self.n.backends.get(backend).context("no such backend")?.clone();
        let node = self.n.backend_nodes[backend].clone();
        self.register_pod(name, app, &node, &v4, &v6).await
    }

    /// Creates pod `name` (labelled `app=<app>`) on `node`: a new pod
    /// network from the node's pod CIDR (or on the segment, bridged
    /// layout) whose servers answer as `name`, its process in a
    /// kubelet-shaped cgroup, Running and Ready. Returns the UID.
    pub async fn add_pod_on(&mut self, name: &str, app: &str, node: &str) -> Result<String> {
        let info = self.n.node(node)?.clone();
        let host = self.next_host.entry(node.to_string()).or_insert(100);
        *host += 1;
        let host = *host;
        let (lan, bridged, strict) =
            (self.n.lan.clone(), self.n.opts.bridged, self.n.opts.strict_rp_filter);
        let pod_name = name.to_string();
        let net = off_runtime(move || {
            if bridged {
                // Bridged pods take 10.10.0.(host+50): 151.. on the segment.
                PodNet::bridged(&lan, &info.name, &pod_name, host + 50)
            } else {
                PodNet::routed(&info, &pod_name, host, strict)
            }
        })
        .await?;
        let (v4, v6, ns) = (net.addr.to_string(), net.addr6.to_string(), net.ns.name.clone());
        self.pod_nets.insert(name.into(), net);
        let uid = self.register_pod(name, app, node, &v4, &v6).await?;
        let layout =
            if self.pod_nets.len().is_multiple_of(2) { Layout::Systemd } else { Layout::Cgroupfs };
        self.fake_pods.insert(name.into(), FakePod::start_in(&ns, &uid, layout, &v2_root())?);
        Ok(uid)
    }

    async fn register_pod(
        &mut self,
        name: &str,
        app: &str,
        node: &str,
        v4: &str,
        v6: &str,
    ) -> Result<String> {
        let host_ip = self.n.node(node)?.addr.to_string();
        let host_ip6 = self.n.node(node)?.addr6.to_string();
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "example/web"}]},
        }))?;
        let pod = self.pods.create(&PostParams::default(), &pod).await?;
        let uid = pod.metadata.uid.clone().context("pod uid")?;
        let status = json!({"status": {
            "phase": "Running", "podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}],
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}, {"ip": host_ip6}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        self.pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        self.pod_nodes.insert(name.into(), node.into());
        Ok(uid)
    }

    /// Starts the process of pod `name` (UID `uid`) in backend namespace
    /// `backend`, in a kubelet-shaped cgroup, as [`Cluster::add_pod`] does.
    pub fn start_pod_process(&mut self, name: &str, backend: usize, uid: &str) -> Result<()> {
        let (ns, _, _) = self.n.backends.get(backend).context("no such backend")?.clone();
        let layout = if backend.is_multiple_of(2) { Layout::Systemd } else { Layout::Cgroupfs };
        self.fake_pods.insert(name.into(), FakePod::start_in(&ns, uid, layout, &v2_root())?);
        Ok(())
    }

    /// The node of a pod (by pod name) or of a server (by the name it
    /// answers with: `backend-N`, or the pod name for
    /// [`Cluster::add_pod_on`]).
    pub fn node_of(&self, name: &str) -> Option<String> {
        if let Some(n) = self.pod_nodes.get(name) {
            return Some(n.clone());
        }
        let i: usize = name.strip_prefix("backend-")?.parse().ok()?;
        self.n.backend_nodes.get(i.checked_sub(1)?).cloned()
    }

    /// The network namespace of pod `name` made by [`Cluster::add_pod_on`].
    pub fn pod_ns(&self, name: &str) -> Option<String> {
        self.pod_nets.get(name).map(|p| p.ns.name.clone())
    }

    /// Counter `stat` (e.g. `rx_packets`) of `node`'s interface on the
    /// segment (`eth0`).
    pub fn node_counter(&self, node: &str, stat: &str) -> Result<u64> {
        counter(&self.n.node(node)?.ns, stat)
    }

    /// Counts the pods' replies (packets whose source is a VIP) with
    /// iptables rules in the raw table, which count and change nothing:
    /// on every node's `eth0` (a reply reaching a node's stack there), and
    /// on the router's segment interface per sending node (by source MAC).
    /// Read them with [`Cluster::replies`].
    pub fn count_replies(&self) -> Result<()> {
        self.count_replies_from(&[VIP.into(), VIP6.into()])
    }

    /// [`Cluster::count_replies`] for other VIPs (a pool's addresses).
    pub fn count_replies_from(&self, vips: &[std::net::IpAddr]) -> Result<()> {
        for n in &self.n.nodes {
            let mac = sh(&format!("ip netns exec {} cat /sys/class/net/eth0/address", n.ns))?;
            for vip in vips {
                let fam = if vip.is_ipv4() { "iptables" } else { "ip6tables" };
                sh(&format!(
                    "ip netns exec {ns} {fam} -t raw -A PREROUTING -i eth0 -s {vip} \
                     -m comment --comment kdsr-seen && \
                     ip netns exec {r} {fam} -t raw -A PREROUTING -i eth0 -s {vip} \
                     -m mac --mac-source {mac} -m comment --comment kdsr-from-{node}",
                    ns = n.ns,
                    r = self.n.router,
                    mac = mac.trim(),
                    node = n.name,
                ))?;
            }
        }
        Ok(())
    }

    /// Per node: replies its `eth0` received, and replies the router
    /// received from it (see [`Cluster::count_replies`]).
    pub fn replies(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        let count = |ns: &str, comment: &str| -> Result<u64> {
            let mut total = 0;
            for fam in ["iptables", "ip6tables"] {
                let out = sh(&format!("ip netns exec {ns} {fam} -t raw -L PREROUTING -v -x -n"))?;
                total += out
                    .lines()
                    .filter(|l| l.contains(&format!("/* {comment} */")))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            Ok(total)
        };
        let mut out = BTreeMap::new();
        for n in &self.n.nodes {
            let seen = count(&n.ns, "kdsr-seen")?;
            let from = count(&self.n.router, &format!("kdsr-from-{}", n.name))?;
            out.insert(n.name.clone(), (seen, from));
        }
        Ok(out)
    }

    /// `node`'s agent's metrics.
    pub fn node_metrics(&self, node: &str) -> Result<String> {
        sh(&format!("ip netns exec {} curl -s {INGRESS_METRICS}", self.n.node(node)?.ns))
    }

    /// Deletes pod `name`. `grace: None` is a user's delete: the pod gets
    /// its deletionTimestamp and stays Terminating, its process serving.
    /// `Some(0)` is kubelet finishing it: the process is killed, then the
    /// object removed.
    pub async fn delete_pod(&mut self, name: &str, grace: Option<u32>) -> Result<()> {
        if grace == Some(0) {
            self.fake_pods.remove(name);
            // Kubelet tears the sandbox down: its network goes too.
            if let Some(net) = self.pod_nets.remove(name) {
                off_runtime(move || {
                    drop(net);
                    Ok(())
                })
                .await?;
            }
        }
        let dp = DeleteParams { grace_period_seconds: grace, ..DeleteParams::default() };
        self.pods.delete(name, &dp).await?;
        Ok(())
    }

    /// Flips pod `name`'s Ready condition, as kubelet does when a
    /// readiness probe fails or recovers.
    pub async fn set_pod_ready(&self, name: &str, ready: bool) -> Result<()> {
        let status = json!({"status": {"conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}
        ]}});
        self.pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(())
    }

    /// Applies a DsrService manifest from `examples/`.
    pub async fn apply_example(&self, file: &str) -> Result<DsrService> {
        let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let svc: DsrService = serde_yaml::from_str(&fs::read_to_string(path)?)?;
        Ok(self.services.create(&PostParams::default(), &svc).await?)
    }

    /// Waits until `service` is Programmed with `ready` ready backends and
    /// every VIP announced (ARP mode).
    ///
    /// Status alone is not enough: a readiness change moves no generation,
    /// so `Programmed` stays true while the agents catch up. Every ingress
    /// node's report must also count `ready` backends (per VIP) reached by
    /// its dataplane (directly, through their node, or locally), with
    /// every MAC resolved.
    /// Waits until every agent has dropped the previous Maglev tables of
    /// the changes made so far. While a table change is fresh, a dataplane
    /// keeps the previous table, and a packet it has no pin for follows
    /// the previous table where the two differ: every UDP datagram of a
    /// new flow (it cannot be told from an established one), and a TCP
    /// flow that ECMP moves from another ingress node. A settle sweep runs
    /// once per resync period and drops tables at least a period old, so
    /// two periods after the last change none is left.
    pub async fn wait_tables_settled(&self) {
        tokio::time::sleep(2 * AGENT_RESYNC + Duration::from_secs(1)).await;
    }

    pub async fn wait_programmed(&self, service: &str, ready: i32) -> Result<DsrServiceStatus> {
        let services = self.services.clone();
        let reports = self.reports.clone();
        wait_for(
            &format!("{service} Programmed with {ready} ready"),
            Duration::from_secs(60),
            || {
                let (services, reports) = (services.clone(), reports.clone());
                async move {
                    let st = services.get(service).await?.status.unwrap_or_default();
                    let programmed =
                        st.conditions.iter().any(|c| c.type_ == "Programmed" && c.status == "True");
                    let announced = st.vips.iter().all(|v| v.announced);
                    if !(programmed && st.ready_backends == ready && announced) {
                        return Ok(None);
                    }
                    let per_node = ready * i32::try_from(st.vips.len()).unwrap_or(1);
                    for node in &st.ingress_nodes {
                        let r = reports.get(node).await?;
                        let i = r.spec.ingress.iter().find(|i| i.name == service);
                        if i.is_none_or(|i| i.backends != per_node || i.error.is_some()) {
                            return Ok(None);
                        }
                    }
                    Ok(Some(st))
                }
            },
        )
        .await
    }

    /// The ingress agent's metrics.
    pub fn ingress_metrics(&self) -> Result<String> {
        sh(&format!("ip netns exec {} curl -s {INGRESS_METRICS}", self.n.ingress))
    }

    /// What the ingress agent reports for `service` (namespace default).
    pub async fn ingress_report(&self, service: &str) -> Result<Option<IngressReport>> {
        let report = self.reports.get_opt(INGRESS).await?;
        Ok(report.and_then(|r| r.spec.ingress.into_iter().find(|i| i.name == service)))
    }

    /// The warnings and errors every agent logged so far (for a run's
    /// report; [`Cluster::logs`] shows only the last lines).
    pub fn agent_warnings(&self) -> String {
        let mut out = String::new();
        for (name, p) in self.procs.iter().filter(|(n, _)| n.starts_with("agent-")) {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            for l in text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
                out.push_str(&format!("{name}: {l}\n"));
            }
        }
        out
    }

    /// The last log lines of every process (for a failing test).
    pub fn logs(&self) -> String {
        self.procs.values().map(Proc::tail).collect::<Vec<_>>().join("\n")
    }

    async fn stop(mut self) {
        self.procs.clear();
        self.fake_pods.clear();
        let nets = std::mem::take(&mut self.pod_nets);
        let _ = off_runtime(move || {
            drop(nets);
            Ok(())
        })
        .await;
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        let _ = fs::remove_file(&self.kubeconfig);
    }
}

/// Runs `f` on its own thread and awaits it without blocking the runtime
/// (the API server stand-in runs on the scenario's runtime).
pub async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let handle = std::thread::spawn(f);
    while !handle.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))?
}

/// Builds the world with `backends` pods (`backend-N`, spread over
/// worker-1, worker-2 and ingress-1), runs `scenario` on a cluster in it,
/// and afterwards checks that `dsr-agent cleanup` removes every dataplane
/// the agents left. Logs are printed when the scenario fails. Everything
/// is torn down, also on failure.
pub fn run<F>(backends: usize, scenario: F) -> Result<()>
where
    F: AsyncFnOnce(&mut Cluster) -> Result<()> + Send + 'static,
{
    run_opts(Options { pods: backends, ..Options::default() }, scenario)
}

/// [`run`], with a second ingress node (`ingress-2`, 10.10.0.3) when
/// `two_ingress` is set.
pub fn run_with<F>(backends: usize, two_ingress: bool, scenario: F) -> Result<()>
where
    F: AsyncFnOnce(&mut Cluster) -> Result<()> + Send + 'static,
{
    run_opts(Options { pods: backends, two_ingress, ..Options::default() }, scenario)
}

/// [`run`] in the world `opts` describes.
pub fn run_opts<F>(opts: Options, scenario: F) -> Result<()>
where
    F: AsyncFnOnce(&mut Cluster) -> Result<()> + Send + 'static,
{
    let agent = binary("dsr-agent")?;
    let operator = binary("dsr-operator")?;
    let world = World::new(opts)?;
    let pins = PinDir::new()?;
    fs::create_dir_all(&pins.path)?;
    let node_ns = |name: &str| world.node(name).map(|n| n.ns.clone());
    let names = Names {
        lan: world.lan.name.clone(),
        router: world.router.name.clone(),
        ingress: node_ns(INGRESS).context("ingress-1")?,
        ingress2: node_ns(INGRESS2),
        client: world.client.name.clone(),
        backends: world
            .pods
            .iter()
            .map(|p| (p.ns.name.clone(), p.addr.to_string(), p.addr6.to_string()))
            .collect(),
        backend_nodes: world.pods.iter().map(|p| p.node.clone()).collect(),
        nodes: world.nodes.clone(),
        opts,
        pins: pins.path.clone(),
        agent: agent.clone(),
        agent_caps: documented_capabilities()?,
        operator,
    };
    let agents: Vec<String> =
        world.nodes.iter().filter(|n| n.agent).map(|n| n.name.clone()).collect();
    // The scenario's sockets (stand-in, client) live in the router's
    // namespace: a runtime on a thread that entered it. Its worker threads
    // are created from that thread, so they are in it too; the stand-in
    // runs on them, so a scenario's blocking calls (curl through `sh`) do
    // not stall the API server the agents depend on.
    let result = world.router.run(move || -> Result<()> {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let mut c = Cluster::start(names).await?;
            let result = scenario(&mut c).await;
            if result.is_err() {
                eprintln!("{}", c.logs());
            }
            c.stop().await;
            result
        })
    })?;
    // `dsr-agent cleanup` removes the dataplanes the agents left.
    // Pods: this cluster's processes are gone by now, and without
    // `--pod-uid` cleanup scans every pod process on the host, stripping
    // the VIPs of other clusters' pods (other tests running meanwhile):
    // it is narrowed to a UID no pod has.
    let mut outs = Vec::new();
    for node in &agents {
        outs.push(
            Command::new(&agent)
                .args(["cleanup", "--pod-uid", NO_POD, "--bpffs-dir"])
                .arg(pins.path.join(node))
                .output()?,
        );
    }
    drop(world);
    result?;
    for (node, out) in agents.iter().zip(outs) {
        ensure!(out.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        ensure!(!pins.path.join(node).exists(), "cleanup left pins behind for {node}");
    }
    Ok(())
}
