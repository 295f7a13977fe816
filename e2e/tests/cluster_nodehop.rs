//! The node hop on the one-host cluster: pods
//! routed behind three nodes, reached through their node with only MAC
//! addresses rewritten; replies leave each pod's own node directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use kube_dsr_e2e::{
    cluster::{self, Cluster, INGRESS, Options, WORKER, WORKER2, WORKER3, off_runtime, wait_for},
    netns::sh,
    require_root,
    topology::{TCP_PORT, VIP},
};

/// Pods of app `web`: two on each of ingress-1, worker-1, worker-2.
const SIX: [(&str, &str); 6] = [
    ("web-i1a", INGRESS),
    ("web-i1b", INGRESS),
    ("web-w1a", WORKER),
    ("web-w1b", WORKER),
    ("web-w2a", WORKER2),
    ("web-w2b", WORKER2),
];

fn enter(ns: &str) -> Result<()> {
    let f = File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on a namespace fd affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// `requests` sequential HTTP requests (a new connection each, curl, at
/// most 3 s): pod name → answers, and the failures.
async fn curl_loop(
    client: &str,
    requests: usize,
) -> Result<(BTreeMap<String, usize>, Vec<String>)> {
    let cmd = format!(
        "ip netns exec {client} sh -c 'for i in $(seq {requests}); do curl -s -m 3 http://{VIP}/ || echo \"failed $i: $?\"; done'"
    );
    let out = off_runtime(move || sh(&cmd)).await?;
    let mut by = BTreeMap::new();
    for l in out.lines().filter_map(|l| l.strip_prefix("served by ")) {
        *by.entry(l.to_string()).or_insert(0) += 1;
    }
    let failed = out.lines().filter(|l| l.starts_with("failed")).map(String::from).collect();
    Ok((by, failed))
}

/// Six pods on three nodes (two on the ingress node, strict rp_filter on
/// every pod's host side, kube-proxy's INVALID drop in every node), and a
/// seventh on worker-3, which runs no dsr-agent: 300 requests, none
/// fails, each of the six answers, the seventh gets nothing and the
/// service's status says why; no node sees a reply (VIP-sourced packet)
/// arrive, and the router receives each pod's replies from that pod's
/// own node.
async fn six_pods_on_three_nodes(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    for (pod, node) in SIX {
        c.add_pod_on(pod, "web", node).await?;
    }
    c.add_pod_on("web-w3", "web", WORKER3).await?;
    let started = Instant::now();
    c.apply_example("web-tcp.yaml").await?;
    let st = c.wait_programmed("web", 6).await?;
    eprintln!("programmed in {:?}: {:?}", started.elapsed(), st.summary);
    ensure!(st.total_backends == 7, "total backends {} (7 pods)", st.total_backends);
    // Why web-w3 gets nothing, in the service's status.
    let services = c.services.clone();
    let why = wait_for("status naming worker-3's missing agent", Duration::from_secs(20), || {
        let services = services.clone();
        async move {
            let st = services.get("web").await?.status.unwrap_or_default();
            let text = serde_json::to_string(&st)?;
            Ok((text.contains(WORKER3) && text.contains("dsr-agent")).then_some(text))
        }
    })
    .await?;
    eprintln!("status: {why}");
    // How the ingress node reaches them: its own two through its node
    // stage, the other four through their nodes.
    let report = c.ingress_report("web").await?.context("ingress-1 reports web")?;
    eprintln!("ingress-1 reaches: {:?}, unreached {:?}", report.reach, report.unreached);
    ensure!(
        (report.reach.local, report.reach.via_node, report.reach.direct) == (2, 4, 0),
        "ingress-1 reach {:?}",
        report.reach
    );
    // web-w3 never becomes a backend (its node cannot deliver), so the
    // ingress node has nothing to report about it.
    ensure!(report.unreached.is_empty(), "unreached: {:?}", report.unreached);

    c.count_replies()?;
    let before = c.replies()?;
    let requests = 300;
    let t = Instant::now();
    let (by, failed) = curl_loop(&n.client, requests).await?;
    eprintln!("{requests} requests in {:?}: {by:?}", t.elapsed());
    ensure!(failed.is_empty(), "{} requests failed: {failed:?}", failed.len());
    ensure!(by.values().sum::<usize>() == requests, "answers {by:?}");
    for (pod, _) in SIX {
        ensure!(by.get(pod).copied().unwrap_or(0) > 0, "{pod} never answered: {by:?}");
    }
    ensure!(!by.contains_key("web-w3"), "the pod on a node without dsr-agent answered: {by:?}");

    let after = c.replies()?;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (pod, count) in &by {
        *per_node.entry(c.node_of(pod).context("pod's node")?).or_default() += count;
    }
    for (node, (seen, from)) in &after {
        let (seen0, from0) = before[node];
        let (seen, from) = (seen - seen0, from - from0);
        let answered = per_node.get(node).copied().unwrap_or(0) as u64;
        eprintln!(
            "{node}: answered {answered} requests, sent {from} reply packets to the router, \
             received {seen} reply packets on eth0"
        );
        ensure!(seen == 0, "{node} received {seen} reply packets (VIP-sourced) on eth0");
        // A curl exchange is at least SYN-ACK, response, FIN from the pod.
        ensure!(from >= 3 * answered, "{node}: {from} reply packets for {answered} answers");
        if answered == 0 {
            ensure!(from == 0, "{node} answered nothing but sent {from} replies");
        }
    }
    eprintln!("agent warnings:\n{}", c.agent_warnings());
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn node_hop_six_pods_on_three_nodes() -> Result<()> {
    require_root();
    let opts = Options { strict_rp_filter: true, node_without_agent: true, ..Options::default() };
    cluster::run_opts(opts, async |c: &mut Cluster| six_pods_on_three_nodes(c).await)
}

// ------------------------------------------------- long-lived connections

#[derive(Clone, Debug, Default)]
struct Held {
    pod: String,
    exchanges: u64,
    failures: Vec<String>,
}

/// `count` connections from the client, each asking "who" every 200 ms
/// on one client thread until stopped (at most 120 s).
struct HeldConns {
    state: Arc<Mutex<Vec<Held>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl HeldConns {
    async fn open(client: &str, count: usize) -> Result<Self> {
        let state = Arc::new(Mutex::new(vec![Held::default(); count]));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, client) = (state.clone(), stop.clone(), client.to_string());
        let thread = std::thread::spawn(move || hold(&client, &st, &sp));
        let held = Self { state, stop, thread: Some(thread) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = held.snapshot();
            if let Some(f) = s.iter().find(|h| !h.failures.is_empty()) {
                bail!("opening long-lived connections: {:?}", f.failures);
            }
            if s.iter().all(|h| h.exchanges > 0) {
                return Ok(held);
            }
            ensure!(Instant::now() < deadline, "long-lived connections not open within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn snapshot(&self) -> Vec<Held> {
        self.state.lock().unwrap().clone()
    }

    fn broken(&self) -> Vec<Held> {
        self.snapshot().into_iter().filter(|h| !h.failures.is_empty()).collect()
    }

    async fn stop(mut self) -> Result<Vec<Held>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            off_runtime(move || t.join().map_err(|_| anyhow::anyhow!("hold panicked"))?).await?;
        }
        Ok(self.snapshot())
    }
}

impl Drop for HeldConns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn ask(c: &mut (TcpStream, BufReader<TcpStream>)) -> Result<String> {
    c.0.write_all(b"who\n")?;
    let mut line = String::new();
    ensure!(c.1.read_line(&mut line)? > 0, "closed by the peer");
    Ok(line.trim().to_string())
}

fn hold(client: &str, state: &Mutex<Vec<Held>>, stop: &AtomicBool) -> Result<()> {
    enter(client)?;
    let count = state.lock().unwrap().len();
    let mut conns = Vec::new();
    for i in 0..count {
        let open = || -> Result<(TcpStream, BufReader<TcpStream>)> {
            let s = TcpStream::connect_timeout(
                &SocketAddr::from((VIP, TCP_PORT)),
                Duration::from_secs(3),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.set_nodelay(true)?;
            let r = BufReader::new(s.try_clone()?);
            Ok((s, r))
        };
        let first = open().and_then(|mut c| ask(&mut c).map(|who| (c, who)));
        let mut s = state.lock().unwrap();
        match first {
            Ok((c, who)) => {
                s[i].pod = who;
                s[i].exchanges = 1;
                conns.push(Some(c));
            }
            Err(e) => {
                s[i].failures.push(format!("open: {e:#}"));
                conns.push(None);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        for (i, slot) in conns.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            let answer = ask(c);
            let mut s = state.lock().unwrap();
            match answer {
                Ok(who) if who == s[i].pod => s[i].exchanges += 1,
                Ok(who) => {
                    let was = s[i].pod.clone();
                    s[i].failures.push(format!("answered by {who}, was {was}"));
                    *slot = None;
                }
                Err(e) => {
                    let done = s[i].exchanges;
                    s[i].failures.push(format!("{e:#} after {done} exchanges"));
                    *slot = None;
                }
            }
        }
    }
    Ok(())
}

/// 120 long-lived connections over six pods on three nodes keep their
/// pod while: a pod is added on every node, one pod turns NotReady, the
/// added pods are removed again, and worker-1's agent (a backend node's)
/// is SIGKILLed and restarted.
async fn long_lived_through_churn(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    for (pod, node) in SIX {
        c.add_pod_on(pod, "web", node).await?;
    }
    c.apply_example("web-tcp.yaml").await?;
    c.wait_programmed("web", 6).await?;
    let held = HeldConns::open(&n.client, 120).await?;
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for h in held.snapshot() {
        *spread.entry(h.pod.clone()).or_default() += 1;
    }
    let nodes: BTreeSet<String> = spread.keys().filter_map(|p| c.node_of(p)).collect();
    eprintln!("120 long-lived connections: {spread:?} on {nodes:?}");
    ensure!(nodes.len() == 3, "the connections do not span three nodes: {spread:?}");
    let check = |what: &str, held: &HeldConns| -> Result<()> {
        let broken = held.broken();
        ensure!(broken.is_empty(), "{} connections broke {what}: {broken:?}", broken.len());
        Ok(())
    };

    let t = Instant::now();
    for (pod, node) in [("web-i1c", INGRESS), ("web-w1c", WORKER), ("web-w2c", WORKER2)] {
        c.add_pod_on(pod, "web", node).await?;
    }
    c.wait_programmed("web", 9).await?;
    eprintln!("a pod added on every node: programmed in {:?}", t.elapsed());
    check("while pods were added", &held)?;

    let t = Instant::now();
    c.set_pod_ready("web-w2a", false).await?;
    c.wait_programmed("web", 8).await?;
    eprintln!("web-w2a NotReady: programmed in {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    check("while a pod turned NotReady", &held)?;

    let t = Instant::now();
    for pod in ["web-i1c", "web-w1c", "web-w2c"] {
        c.delete_pod(pod, Some(0)).await?;
    }
    c.wait_programmed("web", 5).await?;
    eprintln!("the added pods removed: programmed in {:?}", t.elapsed());
    check("while pods were removed", &held)?;

    let t = Instant::now();
    c.kill_agent(WORKER);
    tokio::time::sleep(Duration::from_secs(2)).await;
    check("while worker-1's agent was dead", &held)?;
    c.start_agent(WORKER)?;
    // A resync (5 s) and then some: the restarted agent reconciles what
    // its predecessor left.
    tokio::time::sleep(Duration::from_secs(7)).await;
    eprintln!("worker-1's agent killed and restarted {:?} ago", t.elapsed());
    c.wait_programmed("web", 5).await?;

    let held = held.stop().await?;
    let broken: Vec<&Held> = held.iter().filter(|h| !h.failures.is_empty()).collect();
    let exchanges: u64 = held.iter().map(|h| h.exchanges).sum();
    eprintln!("{} connections, {exchanges} exchanges, {} broken", held.len(), broken.len());
    ensure!(broken.is_empty(), "{} connections broke: {broken:?}", broken.len());
    ensure!(held.iter().all(|h| h.exchanges > 20), "a connection stalled");
    eprintln!("agent warnings:\n{}", c.agent_warnings());
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn node_hop_long_lived_connections_through_churn() -> Result<()> {
    require_root();
    cluster::run_opts(Options::default(), async |c: &mut Cluster| long_lived_through_churn(c).await)
}
