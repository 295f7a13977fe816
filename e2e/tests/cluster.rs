//! The one-host cluster, scenario by scenario (see `kube_dsr_e2e::cluster`
//! for the topology): a TCP web service from `examples/` end to end.

use std::time::Duration;

use anyhow::{Result, ensure};
use kube::api::DeleteParams;
use kube_dsr_e2e::{
    cluster::{self, Cluster, INGRESS, Options, counter, lo_addrs, sysctl, wait_for},
    netns::sh,
    require_root,
    topology::VIP,
};

/// Apply the example web service → every request answered by every pod,
/// replies bypass the ingress node; delete it → pods, dataplane and ARP
/// are clean.
async fn web_service(c: &mut Cluster) -> Result<()> {
    for i in 0..c.n.backends.len() {
        c.add_pod(&format!("web-{}", i + 1), "web", i).await?;
    }
    let started = std::time::Instant::now();
    c.apply_example("web-tcp.yaml").await?;
    // Programmed with every backend ready (each pod's node's agent
    // reported the VIP in it), announced by the ingress node.
    let status = c.wait_programmed("web", 3).await?;
    eprintln!("programmed in {:?}: {:?}", started.elapsed(), status.summary);
    assert_eq!(status.total_backends, 3);
    assert_eq!(status.ingress_nodes, vec![INGRESS.to_string()]);
    assert_eq!(status.vips[0].announcing_node.as_deref(), Some(INGRESS));
    let n = c.n.clone();
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
        let f = cluster::ingress_forwarded(&m);
        Ok((f >= (requests as u64) * 4).then_some(f))
    })
    .await?;
    eprintln!("ingress eth0 rx {rx} packets, forwarded {forwarded} to backends");
    ensure!(
        rx < forwarded + forwarded / 5 + 20,
        "replies crossed the ingress node: rx {rx}, forwarded {forwarded}"
    );

    // The operator counts readiness from the agents' reports: each pod's
    // own node reports it with the VIP configured.
    for (i, node) in n.backend_nodes.iter().enumerate() {
        let report = c.reports.get(node).await?;
        let b = report.spec.backends.iter().find(|b| b.name == format!("web-{}", i + 1));
        ensure!(
            b.is_some_and(|b| b.configured_vips == vec![VIP.to_string()]),
            "{node} does not report web-{} configured: {:?}",
            i + 1,
            report.spec.backends
        );
    }

    // SIGKILL the operator leader: the other replica takes the Lease over
    // and programs a change made afterwards (web-3 turns NotReady → 2/3,
    // its endpoint no longer ready, no new requests reach it).
    let leader = c.operator_leader().await?;
    c.kill_operator(&leader);
    let killed_at = std::time::Instant::now();
    c.set_pod_ready("web-3", false).await?;
    c.wait_programmed("web", 2).await?;
    let successor = c.operator_leader().await?;
    assert_ne!(successor, leader, "the Lease still names the killed replica");
    eprintln!("{leader} killed; {successor} programmed the change in {:?}", killed_at.elapsed());
    let out = sh(&format!(
        "ip netns exec {} sh -c 'for i in $(seq 30); do curl -s -m 3 http://{VIP}/; done'",
        n.client
    ))?;
    assert_eq!(out.lines().filter(|l| l.starts_with("served by ")).count(), 30, "{out}");
    ensure!(!out.contains("served by backend-3"), "a NotReady pod got new connections:\n{out}");

    // Delete the service: every VIP the agent added is gone from the pods,
    // the ingress node forwards nothing and stops answering ARP for it.
    c.services.delete("web", &DeleteParams::default()).await?;
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
        Ok(c.reports.get(INGRESS).await?.spec.ingress.is_empty().then_some(()))
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

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_web_service_end_to_end() -> Result<()> {
    require_root();
    cluster::run(3, async |c: &mut Cluster| web_service(c).await)
}

/// The same on the bridged layout: pods on the segment itself (a CNI like
/// macvlan), all on worker-1, reached directly by their own MAC.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_bridged_pods_web_service() -> Result<()> {
    require_root();
    let opts = Options { pods: 3, bridged: true, ..Options::default() };
    cluster::run_opts(opts, async |c: &mut Cluster| web_service(c).await)
}
