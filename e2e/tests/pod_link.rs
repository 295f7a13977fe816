//! A pod behind a routed veth, as kindnet / flannel host-gw / Calico lay it
//! out: the agent finds the pod's interface from inside the pod, turns GRO
//! on there (XDP redirect into the veth delivers only with it) and reads it
//! back, and tells a pod behind its own veth from a pod on the segment by
//! both veth ends naming each other.

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use kube_dsr_agent::agent::plan::{LocalPath, local_path};
use kube_dsr_agent::neigh::{Resolver, Route};
use kube_dsr_agent::netns::{Netns, prepare_pod_link};
use kube_dsr_e2e::{
    netns::{NetNs, sh},
    require_root,
};

fn gro(ns: &NetNs, ifname: &str) -> Result<String> {
    let out = ns.exec(&format!("ethtool -k {ifname}"))?;
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix("generic-receive-offload: "))
        .unwrap_or("?")
        .trim()
        .to_string())
}

fn ifindex(ns: &NetNs, ifname: &str) -> Result<u32> {
    Ok(ns.exec(&format!("cat /sys/class/net/{ifname}/ifindex"))?.trim().parse()?)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn routed_pod_gets_gro_on_and_is_paired_with_its_host_veth() -> Result<()> {
    require_root();
    let node = NetNs::new("kpn")?;
    let pod = NetNs::new("kpp")?;
    let other = NetNs::new("kpo")?;
    let pod_ip: IpAddr = "10.244.0.2".parse()?;
    sh(&format!(
        "ip -n {n} link add vh0 type veth peer name eth0 netns {p}",
        n = node.name,
        p = pod.name
    ))?;
    pod.exec(
        "ip link set lo up && ip link set eth0 up && ip addr add 10.244.0.2/32 dev eth0 && \
         ip route add 169.254.1.1 dev eth0 && ip route add default via 169.254.1.1 && \
         ethtool -K eth0 gro off",
    )?;
    node.exec("ip link set vh0 up && ip route add 10.244.0.2/32 dev vh0")?;
    // A second veth whose peer sits in a third namespace: on-link from the
    // node, but not the pod's own veth (like a bridge port).
    sh(&format!(
        "ip -n {n} link add seg0 type veth peer name p0 netns {o}",
        n = node.name,
        o = other.name
    ))?;
    node.exec("ip link set seg0 up && ip addr add 10.10.0.2/24 dev seg0")?;
    other.exec("ip link set p0 up")?;
    assert_eq!(gro(&pod, "eth0")?, "off");

    let handle = Netns::open(Path::new(&format!("/var/run/netns/{}", pod.name)), pod.name.clone())?;
    let link = prepare_pod_link(&handle, pod_ip)?;
    assert_eq!(link.iface.name, "eth0");
    assert_eq!(link.gro, Some(true), "read back after ETHTOOL_SGRO");
    assert_eq!(gro(&pod, "eth0")?, "on", "ethtool agrees");
    let vh0 = ifindex(&node, "vh0")?;
    assert_eq!(link.peer, Some(vh0), "the pod's eth0 names the node's vh0 as its peer");
    // Idempotent: a second round finds it on and changes nothing.
    assert_eq!(prepare_pod_link(&handle, pod_ip)?.gro, Some(true));

    let pod_index = link.iface.index;
    let pod_peer = link.peer;
    let (route, host, seg, seg_route) = node.run(move || -> Result<_> {
        let mut r = Resolver::new()?;
        let route = r.route(pod_ip)?;
        let Route::Unicast { oif, .. } = &route else {
            anyhow::bail!("no unicast route: {route:?}")
        };
        let host = r.link_info(oif.index)?;
        let seg = r.interface("seg0")?;
        let seg_route = r.route("10.10.0.9".parse()?)?;
        Ok((route, host, seg, seg_route))
    })??;
    assert_eq!(host.iface.name, "vh0");
    assert_eq!(host.peer, Some(pod_index), "vh0 names the pod's eth0 as its peer");
    assert_eq!(host.mac.map(|m| m != [0; 6]), Some(true));
    assert_eq!(
        local_path(pod_ip, &Ok(route.clone()), pod_peer, host.peer, Some(pod_index), Some(&seg)),
        LocalPath::NodeStage { host: host.iface.clone() }
    );
    // The same pod seen through the segment interface (its route on-link
    // there, e.g. bridged): not behind its veth, on the segment.
    assert_eq!(
        local_path(pod_ip, &Ok(seg_route), pod_peer, None, Some(pod_index), Some(&seg)),
        LocalPath::Segment
    );
    Ok(())
}
