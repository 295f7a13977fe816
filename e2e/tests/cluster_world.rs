//! The one-host cluster's world itself (`kube_dsr_e2e::topology::World`),
//! before any kube-dsr component runs: nodes shaped like real Kubernetes
//! nodes, so that a scenario passing on them means something.

use anyhow::{Result, ensure};
use kube_dsr_e2e::{
    netns::sh,
    require_root,
    topology::{World, WorldOptions},
};

/// Pods answer by pod IP from their own node and from every other node
/// (routes to the other nodes' pod CIDRs), from pod to pod across nodes,
/// over IPv4 and IPv6; every node forwards, has systemd's rp_filter
/// defaults and kube-proxy's INVALID drop in KUBE-FORWARD.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn nodes_route_pods_like_kindnet_with_kube_proxy_rules() -> Result<()> {
    require_root();
    let opts = WorldOptions { pods: 4, strict_rp_filter: true, ..WorldOptions::default() };
    let world = World::new(opts)?;
    let nodes: Vec<&str> = world.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(nodes, ["ingress-1", "worker-1", "worker-2"]);
    let pod_nodes: Vec<&str> = world.pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(pod_nodes, ["worker-1", "worker-2", "ingress-1", "worker-1"]);
    for n in &world.nodes {
        let get = |k: &str| -> Result<String> {
            Ok(sh(&format!("ip netns exec {} sysctl -n {k}", n.ns))?.trim().to_string())
        };
        assert_eq!(get("net.ipv4.ip_forward")?, "1");
        assert_eq!(get("net.ipv6.conf.all.forwarding")?, "1");
        assert_eq!(get("net.ipv4.conf.all.rp_filter")?, "0");
        assert_eq!(get("net.ipv4.conf.default.rp_filter")?, "2");
        assert_eq!(get("net.ipv4.conf.eth0.rp_filter")?, "2");
        for fam in ["iptables", "ip6tables"] {
            let rules = sh(&format!("ip netns exec {} {fam}-save -t filter", n.ns))?;
            ensure!(
                rules.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
                    && rules.contains("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
                "{} {fam}: {rules}",
                n.name
            );
        }
        // Routes to every other node's pod CIDR via that node.
        let routes = sh(&format!("ip -n {} route", n.ns))?;
        for m in world.nodes.iter().filter(|m| m.name != n.name) {
            let want = format!("{} via {}", m.pod_cidr(), m.addr);
            ensure!(routes.contains(&want), "{}: no `{want}` in\n{routes}", n.name);
        }
    }
    for p in &world.pods {
        let node = world.node(&p.node).unwrap();
        let host_if = p.host_if.as_deref().unwrap();
        let rp =
            sh(&format!("ip netns exec {} sysctl -n net.ipv4.conf.{host_if}.rp_filter", node.ns))?;
        assert_eq!(rp.trim(), "1", "strict rp_filter on {host_if}");
        ensure!(
            node.pod_cidr().starts_with(&format!("10.244.{}.", p.addr.octets()[2])),
            "{} has {} outside {}",
            p.name,
            p.addr,
            node.pod_cidr()
        );
        // Every node reaches every pod by pod IP (own node: host route;
        // others: via the pod's node), TCP included (through FORWARD,
        // conntrack and the masquerade rules).
        for n in &world.nodes {
            // Reachable: a reply within 5 s (a ping a second; the first
            // may wait for neighbour resolution on three links).
            sh(&format!("ip netns exec {} ping -c1 -w5 {} >/dev/null", n.ns, p.addr))?;
            sh(&format!("ip netns exec {} ping -6 -c1 -w5 {} >/dev/null", n.ns, p.addr6))?;
            let out =
                sh(&format!("ip netns exec {} curl -s -m 3 http://{}/ || true", n.ns, p.addr))?;
            ensure!(
                out.trim() == format!("served by {}", p.name),
                "{} → {}: {out:?}",
                n.name,
                p.name
            );
        }
    }
    // Pod to pod across nodes, both families.
    let (a, b) = (&world.pods[0], &world.pods[1]);
    ensure!(a.node != b.node);
    a.ns.exec(&format!(
        "ping -c1 -W2 {} >/dev/null && ping -6 -c1 -W2 {} >/dev/null",
        b.addr, b.addr6
    ))?;
    let out = a.ns.exec(&format!("curl -s -m 3 http://[{}]/", b.addr6))?;
    assert_eq!(out.trim(), format!("served by {}", b.name));
    // The client reaches nothing in the pod network (no route to it:
    // only the VIP path exists from outside).
    let out = sh(&format!(
        "ip netns exec {} curl -s -m 2 http://{}/ || echo unreachable",
        world.client.name, a.addr
    ))?;
    ensure!(out.contains("unreachable"), "client reached a pod directly: {out}");
    Ok(())
}
