//! `make demo`: kube-dsr end to end on this machine, in network namespaces
//! (all removed again at the end, also on Ctrl-C).
//!
//! The one-host cluster of the tests (`kube_dsr_e2e::cluster`): an API
//! server stand-in, the real `dsr-operator`, and three nodes (ingress-1,
//! worker-1, worker-2) each running a real `dsr-agent` in its own network
//! namespace, with one pod routed behind each. The demo applies
//! `examples/web-tcp.yaml`, sends real HTTP requests with curl from a
//! client behind a router and prints a live table: requests answered per
//! pod and the node each pod is on, and the pods' reply packets counted
//! where they arrive (the router, per sending node) and where they must not
//! (any node's interface: replies never cross a node but their pod's own).
//! Then one pod turns NotReady and gets no new connections, and the
//! service is deleted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kube_dsr_e2e::{
    cluster::{self, Cluster, INGRESS, Options, WORKER, WORKER2, metric},
    netns::sh,
    topology::{ROUTER_LAN, VIP},
};

/// The pods and their nodes.
const PODS: [(&str, &str); 3] = [("web-1", WORKER), ("web-2", WORKER2), ("web-3", INGRESS)];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const ROUNDS: usize = 6;
const PER_ROUND: usize = 20;

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// One round of `n` curl requests from the client; answers per pod.
fn round(c: &Cluster, n: usize, served: &mut BTreeMap<String, usize>) -> Result<usize> {
    let out = sh(&format!(
        "ip netns exec {} sh -c 'for i in $(seq {n}); do curl -s -m 3 http://{VIP}/ || echo failed; done'",
        c.n.client
    ))?;
    let mut failed = 0;
    for line in out.lines() {
        match line.strip_prefix("served by ") {
            Some(b) => *served.entry(b.to_string()).or_insert(0) += 1,
            None => failed += 1,
        }
    }
    Ok(failed)
}

fn table(c: &Cluster, served: &BTreeMap<String, usize>, failed: usize) -> Result<()> {
    let m = c.ingress_metrics()?;
    let forwarded = metric(&m, "kubedsr_agent_vip_packets_total{");
    let total: usize = served.values().sum();
    let cells: Vec<String> = served
        .iter()
        .map(|(p, n)| format!("{p}@{} {n:>3}", c.node_of(p).unwrap_or_default()))
        .collect();
    let replies = c.replies()?;
    let from: Vec<String> = replies.iter().map(|(node, (_, f))| format!("{node} {f}")).collect();
    let seen: u64 = replies.values().map(|(s, _)| s).sum();
    println!(
        "  requests {total:>3} (failed {failed})  |  {}  |  ingress XDP forwarded {forwarded:>4}  |  replies at the router from {}  |  replies seen by any node: {seen}",
        cells.join("  "),
        from.join(", ")
    );
    Ok(())
}

/// Runs the real kubectl (`make setup` puts the pinned one in `.venv`)
/// against the cluster's API server and prints the command line and its
/// output. The scenario runs in the router's namespace, where the API
/// server listens (at the address the cluster's kubeconfig names).
fn kubectl(args: &[&str]) -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join(".venv/bin/kubectl");
    if !bin.exists() {
        bail!("{} is missing: run `make setup`", bin.display());
    }
    let config = std::env::temp_dir().join(format!("kdsr-demo-kubeconfig-{}", std::process::id()));
    let url = format!("http://{ROUTER_LAN}:{}", cluster::API_PORT);
    std::fs::write(&config, kube_dsr_apiserver::kubeconfig(&url))?;
    println!("$ kubectl {}", args.join(" "));
    let out = std::process::Command::new(&bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(&config)
        .current_dir(&root)
        .output()?;
    let _ = std::fs::remove_file(&config);
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("kubectl {} failed", args.join(" "));
    }
    Ok(())
}

async fn demo(c: &mut Cluster) -> Result<()> {
    for (pod, node) in PODS {
        c.add_pod_on(pod, "web", node).await?;
    }
    println!(
        "pods web-1 on worker-1, web-2 on worker-2, web-3 on ingress-1 (routed behind their \
         nodes, 10.244.N.0/24), Running and Ready"
    );
    let t = Instant::now();
    kubectl(&["apply", "-f", "examples/web-tcp.yaml"])?;
    let st = c.wait_programmed("web", 3).await?;
    println!("(programmed after {:.1} s)", t.elapsed().as_secs_f64());
    kubectl(&["get", "dsrsvc", "web"])?;
    println!(
        "announced by {}\n",
        st.vips.first().and_then(|v| v.announcing_node.clone()).unwrap_or_default()
    );
    println!(
        "curl from the client (10.20.0.2) to http://{VIP}/, {PER_ROUND} requests per line (Ctrl-C stops):"
    );
    let mut served = BTreeMap::new();
    let mut failed = 0;
    c.count_replies()?;
    for _ in 0..ROUNDS {
        if stopped() {
            return Ok(());
        }
        failed += round(c, PER_ROUND, &mut served)?;
        // The agent samples its counters every 2 s.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        table(c, &served, failed)?;
    }
    println!(
        "\nDirect Server Return: the ingress node rewrote only MAC addresses (to the pod's node, \
         which delivered to the pod);\neach pod's replies left its own node straight to the \
         router, and no node received any.\n"
    );
    if failed > 0 {
        bail!("{failed} requests failed");
    }

    if stopped() {
        return Ok(());
    }
    println!("web-3 turns NotReady (its readiness probe fails): no new connections reach it");
    c.set_pod_ready("web-3", false).await?;
    c.wait_programmed("web", 2).await?;
    let mut after = BTreeMap::new();
    let f = round(c, PER_ROUND * 2, &mut after)?;
    let cells: Vec<String> = after.iter().map(|(p, n)| format!("{p} {n:>3}")).collect();
    println!("  {} requests (failed {f}): {}", PER_ROUND * 2, cells.join("  "));
    if after.contains_key("web-3") {
        bail!("a NotReady pod received new connections");
    }

    kubectl(&["get", "dsrsvc", "web"])?;
    println!("\nthe agents remove the VIP from the pods, the dataplane and ARP:");
    kubectl(&["delete", "dsrsvc", "web"])?;
    cluster::wait_for("the pods' VIPs removed", Duration::from_secs(30), || async {
        for (pod, _) in PODS {
            let ns = c.pod_ns(pod).unwrap_or_default();
            if cluster::lo_addrs(&ns)?.contains("lo:kdsr") {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    println!("done: no pod holds {VIP} any more.");
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "kube-dsr demo: a client, a router and three nodes with a pod each, in network \
         namespaces;\nan API server stand-in, the real dsr-operator and a dsr-agent per node…"
    );
    let result = cluster::run_opts(Options::default(), async |c: &mut Cluster| demo(c).await);
    println!(
        "cleaned up: namespaces, processes, pins (dsr-agent cleanup). `make test` runs every scenario."
    );
    if stopped() {
        println!("(stopped early)");
    }
    result
}
