//! The one-host cluster: the API server stand-in, the real `dsr-operator`
//! and one real `dsr-agent` per node, the lab's namespaces as nodes and
//! pods, and real clients.
//!
//! Nodes: `ingress-1` is the lab's ingress namespace; `worker-1` hosts the
//! backend pods (each lab backend namespace is one pod, with a process in
//! a kubelet-shaped cgroup carrying the pod's UID) and its agent runs in
//! the router namespace, where the stand-in and the operator run too
//! (10.10.0.1:6443 on the L2 segment). The router reaches the VIP on-link,
//! so it must learn the VIP's MAC from the node that answers ARP for it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kube_dsr_crds::DsrService;
use kube_dsr_crds::nodereport::DsrNodeReport;
use kube_dsr_e2e::{
    netns::{PinDir, sh},
    pods::{FakePod, Layout, v2_root},
    privileged,
    topology::{Lab, ROUTER_LAN, VIP},
};
use serde_json::json;

const API_PORT: u16 = 6443;
const WORKER: &str = "worker-1";
const INGRESS: &str = "ingress-1";

/// A child process killed on drop (also when the test fails), its output
/// in a log file shown when asked.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Runs `program` in namespace `ns` with only the capabilities `caps`
    /// (as the chart grants them: everything else dropped).
    fn spawn(
        name: &str,
        ns: &str,
        caps: &[String],
        program: &Path,
        args: &[&str],
        kubeconfig: &Path,
    ) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("kdsr-{name}-{}.log", std::process::id()));
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
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.into(), child, log })
    }

    fn tail(&self) -> String {
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
fn binary(package: &str, name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable layout")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        let target = profile_dir.parent().context("target dir")?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, "--bin", name, "--target-dir"]).arg(target);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build")?;
        ensure!(status.success() && path.exists(), "building {name} failed");
    }
    Ok(path)
}

/// Polls `check` every 200 ms until it yields a value or `limit` passes.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
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

/// What the scenario needs from the lab, as plain data (the lab itself
/// stays on the test's thread).
#[derive(Clone)]
struct Names {
    router: String,
    ingress: String,
    client: String,
    /// Backend namespace, its IPv4 and IPv6 addresses.
    backends: Vec<(String, String, String)>,
    pins: PathBuf,
    agent: PathBuf,
    /// The capabilities README.md documents for the agent (and the chart
    /// grants): the agents run with these and no others.
    agent_caps: Vec<String>,
    operator: PathBuf,
}

/// The capability table of README.md's "Privileges" section.
fn documented_capabilities() -> Result<Vec<String>> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let table = readme
        .split("<!-- chart-check: capabilities -->")
        .nth(1)
        .context("README.md has no capability table")?;
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

fn lo_addrs(ns: &str) -> Result<String> {
    sh(&format!("ip -n {ns} -o addr show dev lo"))
}

fn sysctl(ns: &str, key: &str) -> Result<String> {
    Ok(sh(&format!("ip netns exec {ns} sysctl -n {key}"))?.trim().to_string())
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn ready_node(name: &str, labels: serde_json::Value) -> Result<Node> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    }))?)
}

async fn set_ready(nodes: &Api<Node>, name: &str) -> Result<()> {
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

async fn scenario(n: Names) -> Result<()> {
    // The API server stand-in, on the segment.
    let server =
        kube_dsr_apiserver::Server::start((std::net::Ipv4Addr::UNSPECIFIED, API_PORT).into())
            .await
            .context("starting the API server stand-in")?;
    let url = format!("http://{ROUTER_LAN}:{API_PORT}");
    let kubeconfig = std::env::temp_dir().join(format!("kdsr-kubeconfig-{}", std::process::id()));
    fs::write(&kubeconfig, kube_dsr_apiserver::kubeconfig(&url))?;
    let client = Client::try_from(kube::Config::new(url.parse()?))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let services: Api<DsrService> = Api::namespaced(client.clone(), "default");
    let reports: Api<DsrNodeReport> = Api::all(client.clone());

    // Nodes, as kubelet registers them. The worker is excluded from load
    // balancing the standard way, so only ingress-1 is an ingress node.
    nodes
        .create(
            &PostParams::default(),
            &ready_node(INGRESS, json!({"kubedsr.io/ingress": "true"}))?,
        )
        .await?;
    nodes
        .create(
            &PostParams::default(),
            &ready_node(
                WORKER,
                json!({"node.kubernetes.io/exclude-from-external-load-balancers": "true"}),
            )?,
        )
        .await?;
    set_ready(&nodes, INGRESS).await?;
    set_ready(&nodes, WORKER).await?;

    let mut procs = Vec::new();
    let lease = ["--lease-namespace", "kube-dsr", "--lease-duration", "6", "--lease-retry", "1"];
    let ingress_pins = n.pins.join("ingress");
    let worker_pins = n.pins.join("worker");
    let mut args =
        vec!["--node-name", INGRESS, "--http-addr", "127.0.0.1:9477", "--resync-seconds", "5"];
    args.extend(["--bpffs-dir", ingress_pins.to_str().unwrap()]);
    args.extend(lease);
    procs.push(Proc::spawn(
        "agent-ingress",
        &n.ingress,
        &n.agent_caps,
        &n.agent,
        &args,
        &kubeconfig,
    )?);
    let mut args =
        vec!["--node-name", WORKER, "--http-addr", "127.0.0.1:9478", "--resync-seconds", "5"];
    args.extend(["--bpffs-dir", worker_pins.to_str().unwrap()]);
    args.extend(lease);
    procs.push(Proc::spawn(
        "agent-worker",
        &n.router,
        &n.agent_caps,
        &n.agent,
        &args,
        &kubeconfig,
    )?);
    procs.push(Proc::spawn(
        "operator",
        &n.router,
        &[],
        &n.operator,
        &["--no-leader-election", "--http-addr", "127.0.0.1:18080"],
        &kubeconfig,
    )?);
    let result = run_steps(&n, &nodes, &pods, &services, &reports).await;
    if result.is_err() {
        for p in &procs {
            eprintln!("{}", p.tail());
        }
    }
    drop(procs);
    server.shutdown().await;
    let _ = fs::remove_file(&kubeconfig);
    result
}

async fn run_steps(
    n: &Names,
    _nodes: &Api<Node>,
    pods: &Api<Pod>,
    services: &Api<DsrService>,
    reports: &Api<DsrNodeReport>,
) -> Result<()> {
    // Both agents report in.
    for node in [INGRESS, WORKER] {
        wait_for(&format!("{node}'s DsrNodeReport"), Duration::from_secs(60), || async {
            Ok(reports.get_opt(node).await?.map(|_| ()))
        })
        .await?;
    }

    // Backend pods on worker-1: a Pod object as kubelet would report it,
    // and a process in a cgroup carrying its UID inside the namespace.
    let mut fake = Vec::new();
    for (i, (ns, v4, v6)) in n.backends.iter().enumerate() {
        let name = format!("web-{}", i + 1);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": WORKER, "containers": [{"name": "web", "image": "example/web"}]},
        }))?;
        let pod = pods.create(&PostParams::default(), &pod).await?;
        let uid = pod.metadata.uid.clone().context("pod uid")?;
        let layout = if i % 2 == 0 { Layout::Systemd } else { Layout::Cgroupfs };
        fake.push(FakePod::start_in(ns, &uid, layout, &v2_root())?);
        let status = json!({"status": {
            "phase": "Running", "podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    }

    // The example web service, as a user would apply it.
    let manifest =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/web-tcp.yaml"))?;
    let svc: DsrService = serde_yaml::from_str(&manifest)?;
    services.create(&PostParams::default(), &svc).await?;

    // Programmed with every backend ready (the worker's agent reported the
    // VIP in each pod), announced by the ingress node.
    let started = Instant::now();
    let status = wait_for("web Programmed with 3/3 ready", Duration::from_secs(60), || async {
        let s = services.get("web").await?;
        let st = s.status.clone().unwrap_or_default();
        let programmed =
            st.conditions.iter().any(|c| c.type_ == "Programmed" && c.status == "True");
        Ok((programmed && st.ready_backends == 3 && st.vips.iter().all(|v| v.announced))
            .then_some(st))
    })
    .await?;
    eprintln!("programmed in {:?}: {:?}", started.elapsed(), status.summary);
    assert_eq!(status.total_backends, 3);
    assert_eq!(status.ingress_nodes, vec![INGRESS.to_string()]);
    assert_eq!(status.vips[0].announcing_node.as_deref(), Some(INGRESS));

    // Inside every pod: the VIP on lo with kube-dsr's label, ARP sysctls.
    for (ns, _, _) in &n.backends {
        let lo = lo_addrs(ns)?;
        ensure!(lo.contains(&format!("{VIP}/32")) && lo.contains("lo:kdsr"), "{ns} lo: {lo}");
        assert_eq!(sysctl(ns, "net.ipv4.conf.all.arp_ignore")?, "1");
        assert_eq!(sysctl(ns, "net.ipv4.conf.all.arp_announce")?, "2");
    }

    // Real HTTP from the client: every request answered, every pod serves.
    let rx_before = counter(&n.ingress, "rx_packets")?;
    let requests = 60;
    let out = sh(&format!(
        "ip netns exec {} sh -c 'for i in $(seq {requests}); do curl -s -m 3 http://{VIP}/ || echo \"failed $i: $?\"; done'",
        n.client
    ))?;
    let answers: Vec<&str> = out.lines().filter(|l| l.starts_with("served by ")).collect();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("failed")).collect();
    assert_eq!(answers.len(), requests, "every request answered; failed: {failed:?}");
    for i in 1..=n.backends.len() {
        let who = format!("served by backend-{i}");
        ensure!(answers.iter().any(|a| *a == who), "backend-{i} served nothing:\n{out}");
    }
    // DSR: the ingress node received the requests only. Each curl sends
    // ~5 packets and receives ~5; if replies crossed the ingress node it
    // would see about twice what it forwards.
    let rx = counter(&n.ingress, "rx_packets")? - rx_before;
    // The agent samples the per-CPU counters every 2 s: wait for a sample
    // taken after the traffic.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let forwarded = wait_for("the VIP's packet counter", Duration::from_secs(10), || async {
        let m = sh(&format!("ip netns exec {} curl -s http://127.0.0.1:9477/metrics", n.ingress))?;
        let f = metric(&m, "kubedsr_agent_vip_packets_total{");
        Ok((f >= (requests as u64) * 4).then_some(f))
    })
    .await?;
    eprintln!("ingress eth0 rx {rx} packets, forwarded {forwarded} to backends");
    ensure!(
        rx < forwarded + forwarded / 5 + 20,
        "replies crossed the ingress node: rx {rx}, forwarded {forwarded}"
    );

    // The operator counts readiness from the agent's report: a pod the
    // agent has not configured is not ready.
    let report = reports.get(WORKER).await?;
    assert_eq!(report.spec.backends.len(), 3, "{:?}", report.spec.backends);
    ensure!(report.spec.backends.iter().all(|b| b.configured_vips == vec![VIP.to_string()]));

    // Delete the service: every VIP the agent added is gone from the pods,
    // the ingress node forwards nothing and stops answering ARP for it.
    services.delete("web", &DeleteParams::default()).await?;
    wait_for("VIPs removed from every pod", Duration::from_secs(30), || async {
        for (ns, _, _) in &n.backends {
            if lo_addrs(ns)?.contains("lo:kdsr") {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    wait_for("ingress report empty", Duration::from_secs(30), || async {
        Ok(reports.get(INGRESS).await?.spec.ingress.is_empty().then_some(()))
    })
    .await?;
    let metrics =
        sh(&format!("ip netns exec {} curl -s http://127.0.0.1:9477/metrics", n.ingress))?;
    ensure!(
        !metrics.contains("kubedsr_agent_vip_packets_total{"),
        "dataplane still holds a VIP:\n{metrics}"
    );
    // Nobody answers ARP for the VIP any more (the Lease was released and
    // the announcer withdrew), so the router cannot reach it.
    wait_for("nobody answering ARP for the VIP", Duration::from_secs(10), || async {
        sh(&format!("ip -n {} neigh flush to {VIP}", n.router))?;
        sh(&format!("ip netns exec {} ping -c1 -W1 {VIP} >/dev/null || true", n.router))?;
        let neigh = sh(&format!("ip -n {} neigh show {VIP}", n.router))?;
        Ok((!neigh.contains("lladdr")).then_some(()))
    })
    .await?;
    let out = sh(&format!(
        "ip netns exec {} curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{VIP}/ || true",
        n.client
    ))?;
    assert_eq!(out.trim(), "000", "the VIP still answers after deletion");
    Ok(())
}

fn counter(ns: &str, name: &str) -> Result<u64> {
    Ok(sh(&format!("ip netns exec {ns} cat /sys/class/net/eth0/statistics/{name}"))?
        .trim()
        .parse()?)
}

#[test]
fn one_host_cluster_web_service_end_to_end() -> Result<()> {
    if !privileged("one_host_cluster_web_service_end_to_end") {
        return Ok(());
    }
    let agent = binary("kube-dsr-agent", "dsr-agent")?;
    let operator = binary("kube-dsr-operator", "dsr-operator")?;
    let lab = Lab::bare(3)?;
    // ARP mode: the router resolves the VIP on the segment instead of
    // routing it to a fixed node.
    lab.router.exec(&format!("ip route replace {VIP}/32 dev eth0"))?;
    let pins = PinDir::new()?;
    fs::create_dir_all(&pins.path)?;
    let names = Names {
        router: lab.router.name.clone(),
        ingress: lab.ingress.name.clone(),
        client: lab.client.name.clone(),
        backends: lab
            .backends
            .iter()
            .map(|b| (b.ns.name.clone(), b.addr.to_string(), b.addr6.to_string()))
            .collect(),
        pins: pins.path.clone(),
        agent: agent.clone(),
        agent_caps: documented_capabilities()?,
        operator,
    };
    // The scenario's sockets (stand-in, client) live in the router's
    // namespace: a current-thread runtime on a thread that entered it.
    let result = lab.router.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(scenario(names))
    })?;
    // `dsr-agent cleanup` removes the dataplane the ingress agent left.
    let out = Command::new(&agent)
        .args(["cleanup", "--bpffs-dir"])
        .arg(pins.path.join("ingress"))
        .output()?;
    result?;
    ensure!(out.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(!pins.path.join("ingress").exists(), "cleanup left pins behind");
    Ok(())
}
