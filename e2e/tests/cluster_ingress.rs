//! The one-host cluster with two ingress nodes (`kube_dsr_e2e::cluster`,
//! `run_with(.., true, ..)`): ARP failover when the announcing node fails,
//! and routed (ECMP) mode where a connection's packets move between the
//! ingress nodes mid-flow.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use kube::api::{Patch, PatchParams, PostParams};
use kube_dsr_crds::DsrService;
use kube_dsr_e2e::{
    cluster::{self, Cluster, INGRESS, INGRESS2, Options, WORKER, WORKER2, metric, wait_for},
    netns::sh,
    require_root,
    topology::{INGRESS as INGRESS_IP, INGRESS2 as INGRESS2_IP, VIP},
};
use serde_json::json;

fn ns_of(c: &Cluster, node: &str) -> Result<String> {
    Ok(if node == INGRESS {
        c.n.ingress.clone()
    } else {
        c.n.ingress2.clone().context("ingress-2")?
    })
}

fn mac_of(ns: &str) -> Result<String> {
    Ok(sh(&format!("ip netns exec {ns} cat /sys/class/net/eth0/address"))?.trim().to_string())
}

/// Pods web-1..3 on worker-1, worker-2, worker-1: behind nodes that are
/// not ingress nodes, so every flow takes the node hop, and failing an
/// ingress node takes no pod with it.
async fn web_pods_on_workers(c: &mut Cluster) -> Result<()> {
    for (i, node) in [WORKER, WORKER2, WORKER].iter().enumerate() {
        c.add_pod_on(&format!("web-{}", i + 1), "web", node).await?;
    }
    Ok(())
}

/// One HTTP request from the client; `Ok(true)` when a pod answered.
fn request(c: &Cluster, timeout_s: u32) -> Result<bool> {
    let out =
        sh(&format!("ip netns exec {} curl -s -m {timeout_s} http://{VIP}/ || true", c.n.client))?;
    Ok(out.starts_with("served by "))
}

/// The announcing ingress node fails (agent SIGKILLed, its link down): the
/// other one takes the VIP's Lease over, answers ARP and sends gratuitous
/// ARP, which moves the router's existing neighbour entry at once.
async fn arp_failover(c: &mut Cluster) -> Result<()> {
    web_pods_on_workers(c).await?;
    c.apply_example("web-tcp.yaml").await?;
    let st = c.wait_programmed("web", 3).await?;
    assert_eq!(st.ingress_nodes, vec![INGRESS.to_string(), INGRESS2.to_string()]);
    let holder = st.vips[0].announcing_node.clone().context("announcer")?;
    let other = if holder == INGRESS { INGRESS2 } else { INGRESS };
    let (holder_ns, other_ns) = (ns_of(c, &holder)?, ns_of(c, other)?);
    // A switch does not flood frames for a dead node's MAC to the other
    // ingress node (a Linux bridge does when the port goes down, and XDP
    // there would forward them, hiding whether the takeover worked).
    sh(&format!(
        "ip netns exec {} sh -c 'bridge link set dev p-ingress-1 flood off && \
         bridge link set dev p-ingress-2 flood off'",
        c.n.lan
    ))?;
    for _ in 0..10 {
        ensure!(request(c, 3)?, "request through {holder} failed");
    }
    let neigh = sh(&format!("ip -n {} neigh show {VIP}", c.n.router))?;
    ensure!(neigh.contains(&mac_of(&holder_ns)?), "router resolves the VIP to {holder}: {neigh}");

    // The holder fails: no agent (no Lease renewal, no ARP answers), no link.
    c.kill_agent(&holder);
    sh(&format!("ip -n {holder_ns} link set eth0 down"))?;
    let failed_at = Instant::now();
    // Without gratuitous ARP the router would keep sending to the dead MAC
    // until its entry went stale and re-probing failed (tens of seconds);
    // the Lease duration is 6 s in the harness.
    let bound = Duration::from_secs(15);
    wait_for("a request answered through the other ingress node", bound, || async {
        Ok(request(c, 1)?.then_some(()))
    })
    .await?;
    let recovered = failed_at.elapsed();
    eprintln!("recovered {recovered:?} after {holder} failed (bound {bound:?})");
    let neigh = sh(&format!("ip -n {} neigh show {VIP}", c.n.router))?;
    let (old, new) = (mac_of(&holder_ns)?, mac_of(&other_ns)?);
    ensure!(
        neigh.contains(&new),
        "router resolves the VIP to {neigh}, not {other} ({new}; {holder} is {old})"
    );
    for _ in 0..10 {
        ensure!(request(c, 3)?, "request through {other} failed");
    }
    // Status follows once the node controller marks the dead node
    // NotReady (until then its last report still claims the VIP): the
    // survivor is the announcer, its report says so.
    let not_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    c.nodes.patch_status(&holder, &PatchParams::default(), &Patch::Merge(&not_ready)).await?;
    let services = c.services.clone();
    wait_for("status names the new announcer", Duration::from_secs(15), || {
        let services = services.clone();
        async move {
            let st = services.get("web").await?.status.unwrap_or_default();
            Ok(st
                .vips
                .iter()
                .all(|v| v.announcing_node.as_deref() == Some(other) && v.announced)
                .then_some(()))
        }
    })
    .await?;
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` (sockets made there
/// stay in it), and waits for it.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let file = File::open(format!("/var/run/netns/{ns}"))?;
    std::thread::spawn(move || {
        // SAFETY: changes only this thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// One line in, the backend's name out, on an open connection.
fn exchange(conn: &mut (TcpStream, BufReader<TcpStream>)) -> Result<String> {
    conn.0.write_all(b"ping\n")?;
    let mut line = String::new();
    conn.1.read_line(&mut line)?;
    ensure!(!line.is_empty(), "connection closed");
    Ok(line.trim().to_string())
}

/// Routed mode: the router spreads the VIP over both ingress nodes (ECMP,
/// then one path, then the other). Every ingress node builds the same
/// Maglev table over the pods' nodes, so a connection keeps its pod (on a
/// worker, behind its node) whichever ingress node its packets cross.
async fn ecmp_flows_move_between_ingress_nodes(c: &mut Cluster) -> Result<()> {
    web_pods_on_workers(c).await?;
    let svc: DsrService = serde_json::from_value(json!({
        "apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrService",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "vips": [VIP.to_string()],
            "ports": [{"name": "http", "port": 80}],
            "selector": {"app": "web"},
            "ingress": {"announcement": "None"},
        },
    }))?;
    c.services.create(&PostParams::default(), &svc).await?;
    let services = c.services.clone();
    wait_for("routed web Programmed on both ingress nodes", Duration::from_secs(60), || {
        let services = services.clone();
        async move {
            let st = services.get("web").await?.status.unwrap_or_default();
            let programmed =
                st.conditions.iter().any(|c| c.type_ == "Programmed" && c.status == "True");
            Ok((programmed && st.ready_backends == 3 && st.ingress_nodes.len() == 2).then_some(()))
        }
    })
    .await?;
    // Programmed says each ingress node holds this generation; the pods'
    // nodes come into its Maglev table as their agents deliver, so wait
    // until both ingress nodes report all three pods behind their entries.
    let reports = c.reports.clone();
    wait_for("both ingress nodes send to all three pods", Duration::from_secs(30), || {
        let reports = reports.clone();
        async move {
            for node in [INGRESS, INGRESS2] {
                let r = reports.get(node).await?;
                let i = r.spec.ingress.iter().find(|i| i.name == "web");
                if i.is_none_or(|i| i.backends != 3 || i.error.is_some()) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;
    // The steps that brought the pods in changed both nodes' tables: a
    // flow opened while a node still keeps a previous table, and moved to
    // the other node, would follow that node's previous table there.
    c.wait_tables_settled().await;
    let router = c.n.router.clone();
    let route = |how: &str| sh(&format!("ip -n {router} route replace {VIP}/32 {how}"));
    route(&format!("nexthop via {INGRESS_IP} nexthop via {INGRESS2_IP}"))?;

    // Long-lived connections from the client.
    let client = c.n.client.clone();
    let mut conns = in_ns(&client, || {
        let mut out = Vec::new();
        for _ in 0..12 {
            let s = TcpStream::connect_timeout(
                &SocketAddr::new(VIP.into(), 80),
                Duration::from_secs(3),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let r = BufReader::new(s.try_clone()?);
            out.push((s, r));
        }
        Ok(out)
    })?;
    let first: Vec<String> = conns.iter_mut().map(exchange).collect::<Result<_>>()?;
    let pods: std::collections::BTreeSet<&String> = first.iter().collect();
    eprintln!("12 connections on pods {pods:?}");
    ensure!(pods.len() >= 2, "the connections landed on one pod only: {first:?}");
    for who in &first {
        let node = c.node_of(who).with_context(|| format!("who is {who}?"))?;
        ensure!(node == WORKER || node == WORKER2, "{who} is on {node}");
    }
    // All packets through ingress-1, then all through ingress-2: every
    // connection keeps working and keeps its backend.
    for via in [INGRESS_IP, INGRESS2_IP, INGRESS_IP] {
        route(&format!("via {via}"))?;
        for (i, conn) in conns.iter_mut().enumerate() {
            let who = exchange(conn).with_context(|| format!("connection {i} via {via}"))?;
            assert_eq!(who, first[i], "connection {i} changed backend via {via}");
        }
    }
    // Both ingress nodes forwarded them.
    for ns in [c.n.ingress.clone(), c.n.ingress2.clone().context("ingress-2")?] {
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let m = sh(&format!("ip netns exec {ns} curl -s {}", cluster::INGRESS_METRICS))?;
        let fwd = metric(&m, "kubedsr_agent_vip_packets_total{");
        ensure!(fwd >= 12, "{ns} forwarded {fwd} packets");
    }
    drop(conns);
    // Nobody answers ARP for a routed VIP.
    sh(&format!("ip -n {router} route replace {VIP}/32 dev eth0"))?;
    sh(&format!("ip netns exec {router} ping -c1 -W1 {VIP} >/dev/null || true"))?;
    let neigh = sh(&format!("ip -n {router} neigh show {VIP}"))?;
    ensure!(!neigh.contains("lladdr"), "a routed VIP was answered by ARP: {neigh}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn announcing_ingress_node_fails_over_with_gratuitous_arp() -> Result<()> {
    require_root();
    let opts = Options { two_ingress: true, ..Options::default() };
    cluster::run_opts(opts, async |c: &mut Cluster| arp_failover(c).await)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn routed_mode_flows_survive_moving_between_ingress_nodes() -> Result<()> {
    require_root();
    let opts = Options { two_ingress: true, ..Options::default() };
    cluster::run_opts(opts, async |c: &mut Cluster| ecmp_flows_move_between_ingress_nodes(c).await)
}
