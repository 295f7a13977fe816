//! The node hop at the dataplane level, with real TCP: client → router →
//! ingress node (XDP ingress stage: via node, destination MAC = the node's)
//! → backend node's uplink (XDP node stage: destination MAC = the pod's,
//! redirected into the pod's host-side veth) → a pod behind a routed veth
//! (kindnet/flannel host-gw style) holding the VIP on lo, GRO on its eth0.
//! The pod's reply leaves through the reply program on the host-side veth,
//! past the node's `FORWARD -m conntrack --ctstate INVALID -j DROP` (the
//! rule kube-proxy installs) and a strict rp_filter on that veth.
//!
//! ```text
//!  client ── router ── bridge ─┬─ ingress 10.10.0.2 (XDP ingress stage)
//!                              └─ node 10.10.0.3 (XDP node stage, eth0)
//!                                   └─ vp0 ══ pod 10.244.1.2 (VIP on lo)
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use kube_dsr_agent::dataplane::{
    BackendSpec, Config, Dataplane, Egress, PortSpec, Protocol, ServiceSpec, Stage, Start,
};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir, sh},
    require_root,
    topology::{Lab, TCP_PORT, VIP},
};

const NODE: &str = "10.10.0.3";
const POD: &str = "10.244.1.2";

fn spec(name: &str, stage: Stage, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: VIP.into(),
        ports: vec![PortSpec { port: TCP_PORT, protocol: Protocol::Tcp }],
        table_size: 251,
        backends,
        pin_all_flows: false,
        stage,
    }
}

/// Connects to the VIP from the client and asks one line.
fn ask(lab: &Lab, timeout: Duration) -> std::io::Result<String> {
    lab.client
        .run(move || {
            let addr = SocketAddr::from((VIP, TCP_PORT));
            let s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let mut out = s.try_clone()?;
            out.write_all(b"who\n")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim().to_string())
        })
        .map_err(std::io::Error::other)?
}

fn count(dp: &Dataplane, reason: &str) -> u64 {
    dp.reason_counts().unwrap().into_iter().find(|(r, _)| *r == reason).unwrap().1
}

fn ifindex(ns: &NetNs, iface: &str) -> u32 {
    ns.exec(&format!("cat /sys/class/net/{iface}/ifindex")).unwrap().trim().parse().unwrap()
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn tcp_through_the_node_stage_and_the_reply_program() {
    require_root();
    let lab = Lab::new(0).unwrap();

    // The backend node: uplink on the segment, ip_forward, kube-proxy's
    // INVALID drop in FORWARD.
    let node = NetNs::new("kdn").unwrap();
    sh(&format!(
        "ip -n {n} link add eth0 type veth peer name p-node netns {lan}",
        n = node.name,
        lan = lab.lan.name
    ))
    .unwrap();
    lab.lan.exec("ip link set p-node master br0 && ip link set p-node up").unwrap();
    node.exec(&format!(
        "ip addr add {NODE}/24 dev eth0 && ip link set eth0 up && \
         ip route add default via 10.10.0.1 && sysctl -qw net.ipv4.ip_forward=1 && \
         iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP"
    ))
    .unwrap();

    // The pod behind a routed veth (ptp style: the host side holds the
    // pod's gateway address, a /32 route points at the pod), strict
    // rp_filter on the host side, the VIP on lo, GRO on eth0 (an XDP
    // redirect into a veth is delivered only with GRO or XDP on the peer).
    let pod = NetNs::new("kdp").unwrap();
    sh(&format!(
        "ip -n {n} link add vp0 type veth peer name eth0 netns {p}",
        n = node.name,
        p = pod.name
    ))
    .unwrap();
    node.exec(&format!(
        "ip addr add 10.244.1.1/32 dev vp0 && ip link set vp0 up && \
         ip route add {POD}/32 dev vp0 && \
         sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.vp0.rp_filter=1"
    ))
    .unwrap();
    pod.exec(&format!(
        "ip addr add {POD}/24 dev eth0 && ip link set eth0 up && \
         ip route add default via 10.244.1.1 && ip addr add {VIP}/32 dev lo && \
         sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 && \
         ethtool -K eth0 gro on >/dev/null"
    ))
    .unwrap();
    // The router reaches the pod CIDR through its node (routed pods).
    lab.router.exec(&format!("ip route add 10.244.1.0/24 via {NODE}")).unwrap();

    // The pod's server: one line in, its name out.
    let listener = pod.run(|| TcpListener::bind(("0.0.0.0", TCP_PORT))).unwrap().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut out = stream.try_clone().unwrap();
                let mut lines = BufReader::new(stream);
                let mut line = String::new();
                while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
                    if writeln!(out, "pod-1").is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });

    // Non-VIP traffic of the pod is routed by the node as usual (warms the
    // neighbour tables and teaches the bridge the MACs).
    pod.exec("ping -c1 -W2 10.10.0.1 >/dev/null").unwrap();
    node.exec("ping -c1 -W2 10.10.0.2 >/dev/null").unwrap();

    // Ingress stage: the pod's node, via its MAC.
    let (_ingress_pins, mut ingress) = lab.open_dataplane().unwrap();
    let node_mac = node.mac("eth0").unwrap();
    let node_addr: IpAddr = NODE.parse().unwrap();
    ingress
        .upsert_service(&spec(
            "default/web/v4",
            Stage::Ingress,
            vec![BackendSpec::via_node(node_addr, node_mac, 1)],
        ))
        .unwrap();

    // Node stage on the node's uplink: the pod behind vp0; the ingress
    // node is a peer.
    let node_pins = PinDir::new().unwrap();
    let mut cfg = Config::new("eth0");
    cfg.pin_dir = node_pins.path.clone();
    let mut dp = node.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
    let vp0 = Egress { ifindex: ifindex(&node, "vp0"), mac: node.mac("vp0").unwrap() };
    let pod_mac = pod.mac("eth0").unwrap();
    dp.upsert_service(&spec(
        "default/web/v4/node",
        Stage::Node,
        vec![BackendSpec::pod(POD.parse().unwrap(), pod_mac, vp0)],
    ))
    .unwrap();
    dp.set_peers(&[lab.ingress.mac("eth0").unwrap()]).unwrap();

    // Without the reply program the node's forwarding path drops the
    // pod's SYN-ACK (strict rp_filter on vp0, conntrack INVALID): no
    // connection opens, although the SYN is delivered.
    let refused = ask(&lab, Duration::from_secs(2));
    assert!(refused.is_err(), "a connection opened without the reply program: {refused:?}");
    assert!(
        count(&dp, "fwd_node_local") > 0,
        "the node stage never delivered the SYN; node: {:?}; ingress: {:?}",
        dp.reason_counts().unwrap().into_iter().filter(|r| r.1 > 0).collect::<Vec<_>>(),
        ingress.reason_counts().unwrap().into_iter().filter(|r| r.1 > 0).collect::<Vec<_>>()
    );

    // With it, replies leave through the uplink directly.
    let ifx = vp0.ifindex;
    let dp = node
        .run(move || {
            dp.attach_reply(ifx).unwrap();
            dp.attach_reply(ifx).unwrap(); // idempotent
            dp
        })
        .unwrap();
    assert_eq!(dp.replies(), vec![vp0.ifindex]);
    let delivered_before = count(&dp, "fwd_node_local");
    let replies_before = count(&dp, "fwd_reply");
    let node_rx_before: u64 =
        node.exec("cat /sys/class/net/eth0/statistics/rx_packets").unwrap().trim().parse().unwrap();
    for i in 0..30 {
        let answer = ask(&lab, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i} through the node stage failed: {e}"));
        assert_eq!(answer, "pod-1");
    }
    let delivered = count(&dp, "fwd_node_local") - delivered_before;
    let replied = count(&dp, "fwd_reply") - replies_before;
    // Each connection: SYN, ACK, data, FIN, ACK at least.
    assert!(delivered >= 30 * 4, "node stage delivered only {delivered} frames");
    assert!(replied >= 30 * 3, "reply program sent only {replied} replies");
    let node_rx: u64 =
        node.exec("cat /sys/class/net/eth0/statistics/rx_packets").unwrap().trim().parse().unwrap();
    assert!(node_rx - node_rx_before >= delivered, "frames reached the pod some other way");
    // The ingress stage balanced them (to the node), and never saw a reply.
    assert!(count(&ingress, "fwd_maglev") >= delivered);

    // An agent restart that upgrades the program (force_reload): the node
    // stage is read back from the pins, the pinned reply link is adopted
    // and gets the new program in place, and replies keep flowing.
    let node_spec = spec(
        "default/web/v4/node",
        Stage::Node,
        vec![BackendSpec::pod(POD.parse().unwrap(), pod_mac, vp0)],
    );
    drop(dp);
    let mut cfg = Config::new("eth0");
    cfg.pin_dir = node_pins.path.clone();
    cfg.force_reload = true;
    let dp = node.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
    assert_eq!(dp.start(), Start::Upgraded);
    assert_eq!(dp.replies(), vec![vp0.ifindex]);
    assert_eq!(dp.services().cloned().collect::<Vec<_>>(), vec![node_spec]);
    assert_eq!(dp.peers(), vec![lab.ingress.mac("eth0").unwrap()]);
    for i in 0..5 {
        let answer = ask(&lab, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i} after the upgrade failed: {e}"));
        assert_eq!(answer, "pod-1");
    }

    // The reply program leaves other traffic alone: the pod still reaches
    // the router from its own address through the node's forwarding path.
    // (The last connections' closing segments settle first.)
    std::thread::sleep(Duration::from_secs(1));
    let replies_settled = count(&dp, "fwd_reply");
    pod.exec("ping -c2 -W2 10.10.0.1 >/dev/null").unwrap();
    assert_eq!(count(&dp, "fwd_reply"), replies_settled, "a ping was redirected");

    // Detached: the pin and the link are gone; replies drop again.
    let dp = node
        .run(move || {
            let mut dp = dp;
            dp.detach_reply(ifx).unwrap();
            dp
        })
        .unwrap();
    assert!(dp.replies().is_empty());
    assert!(ask(&lab, Duration::from_secs(2)).is_err());

    // `dsr-agent cleanup` (Dataplane::remove_pins) takes reply links with
    // everything else.
    let dp = node
        .run(move || {
            let mut dp = dp;
            dp.attach_reply(ifx).unwrap();
            dp
        })
        .unwrap();
    let tcx = |node: &NetNs| {
        node.run(|| SchedClassifier::query_tcx("vp0", TcAttachType::Ingress).unwrap().1.len())
            .unwrap()
    };
    assert_eq!(tcx(&node), 1);
    drop(dp);
    Dataplane::remove_pins(&node_pins.path).unwrap();
    assert_eq!(tcx(&node), 0, "a reply program stayed attached after cleanup");
    drop(ingress);
}
