//! 802.1Q tags and native XDP on veth: what the agent reports
//! and why. A tag that crossed a Linux bridge is held out of band by the
//! kernel; the bridge port's veth passes it on out of band unless its
//! `tx-vlan-offload` is off, and native XDP on the other end then sees the
//! frame without that tag (and `XDP_TX` would send it without). The
//! receiving veth cannot change that, so the dataplane reports
//! `PeerDecides` on veth in native mode; test worlds that send tagged
//! frames turn `tx-vlan-offload` off on the ports facing a dataplane.
//! Generic XDP keeps such a tag with the packet and sends it back out with
//! it (`KeptWithPacket`).

use kube_dsr_agent::dataplane::{
    AttachMode, BackendSpec, Config, Dataplane, PortSpec, Protocol, ServiceSpec, Stage, VlanTags,
};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    require_root,
};

/// Sends, from `dev`, a frame to `dst` carrying two 802.1Q tags (100 outside,
/// 200 inside) around an IPv4/UDP packet to no VIP.
fn send_double_tagged(ns: &NetNs, dev: &str, dst: [u8; 6]) {
    let d = dst.iter().map(|b| format!("{b}")).collect::<Vec<_>>().join(",");
    let py = format!(
        "import socket; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('{dev}',0)); \
         s.send(bytes([{d}, 2,0xcc,0,0,0,1, 0x81,0,0,100, 0x81,0,0,200, 8,0, \
         0x45,0,0,28,0,0,0,0,64,17,0,0, 198,51,100,7, 192,0,2,99, 0x9c,0x40,0,53,0,8,0,0]))"
    );
    ns.exec(&format!("python3 -c \"{py}\"")).unwrap();
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn tags_through_a_bridge_reach_native_xdp_only_if_the_port_keeps_them_inline() {
    require_root();
    for port_txvlan in ["on", "off"] {
        let ns = NetNs::new("kdsrvl").unwrap();
        ns.exec(&format!(
            "ip link add br0 type bridge && ip link add dsr0 type veth peer name dsr1 && \
             ip link add cl0 type veth peer name cl1 && ip link set dsr1 master br0 && \
             ip link set cl1 master br0 && ethtool -K dsr1 txvlan {port_txvlan} && \
             for d in br0 dsr0 dsr1 cl0 cl1; do ip link set $d up; done"
        ))
        .unwrap();
        let pins = PinDir::new().unwrap();
        let mut cfg = Config::new("dsr0");
        cfg.pin_dir = pins.path.clone();
        let dp = ns.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
        assert_eq!(dp.vlan_tags(), &VlanTags::PeerDecides);
        let count =
            |name: &str| dp.reason_counts().unwrap().into_iter().find(|r| r.0 == name).unwrap().1;
        let (stacked, single) = (count("pass_vlan_stack"), count("pass_not_vip"));
        // The bridge learns cl0's MAC from this frame and forwards to dsr0's
        // MAC by flooding: the frame reaches dsr0 either way.
        send_double_tagged(&ns, "cl0", ns.mac("dsr0").unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while count("pass_vlan_stack") == stacked && count("pass_not_vip") == single {
            assert!(std::time::Instant::now() < deadline, "the frame never reached XDP");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let seen_both = count("pass_vlan_stack") > stacked;
        assert_eq!(
            seen_both,
            port_txvlan == "off",
            "port tx-vlan-offload {port_txvlan}: XDP saw both tags: {seen_both}"
        );
    }
}

fn bytes(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b}")).collect::<Vec<_>>().join(",")
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn generic_xdp_sends_a_stripped_tag_back_out() {
    require_root();
    let ns = NetNs::new("kdsrvg").unwrap();
    // The bridge port keeps tags out of band (tx-vlan-offload on, the
    // default), and does not hand IP to netfilter.
    ns.exec(
        "ip link add br0 type bridge && ip link add dsr0 type veth peer name dsr1 && \
         ip link add cl0 type veth peer name cl1 && ip link set dsr1 master br0 && \
         ip link set cl1 master br0 && for d in br0 dsr0 dsr1 cl0 cl1; do ip link set $d up; done; \
         for k in iptables ip6tables; do f=/proc/sys/net/bridge/bridge-nf-call-$k; \
         [ ! -e $f ] || echo 0 > $f; done",
    )
    .unwrap();
    let pins = PinDir::new().unwrap();
    let mut cfg = Config::new("dsr0");
    cfg.pin_dir = pins.path.clone();
    cfg.attach = AttachMode::Generic;
    let mut dp = ns.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
    assert_eq!(dp.vlan_tags(), &VlanTags::KeptWithPacket);
    let (cl0, dsr0) = (ns.mac("cl0").unwrap(), ns.mac("dsr0").unwrap());
    // The backend is cl0 itself: the forwarded frame comes back to it.
    dp.upsert_service(&ServiceSpec {
        name: "default/dns/v4".into(),
        vip: "192.0.2.10".parse().unwrap(),
        ports: vec![PortSpec { port: 53, protocol: Protocol::Udp }],
        table_size: 251,
        backends: vec![BackendSpec::new("10.0.0.11".parse().unwrap(), cl0)],
        pin_all_flows: false,
        stage: Stage::Ingress,
    })
    .unwrap();
    // A capture on cl0 prints the VLAN tag the kernel recorded for the
    // forwarded frame (PACKET_AUXDATA; TP_STATUS_VLAN_VALID = 0x10).
    let rx = format!(
        "import socket,struct\n\
         s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind(('cl0',0))\n\
         s.setsockopt(263, 8, 1); s.settimeout(5)\n\
         while True:\n\
         \x20 data, anc, fl, ad = s.recvmsg(2048, 1024)\n\
         \x20 if data[0:6]==bytes([{c}]) and data[6:12]==bytes([{d}]):\n\
         \x20   for l,t,x in anc:\n\
         \x20     if l==263 and t==8:\n\
         \x20       st,_,_,_,_,tci,_=struct.unpack('IIIHHHH',x[:20]); print(tci if st & 0x10 else 'untagged')\n\
         \x20   break\n",
        c = bytes(cl0),
        d = bytes(dsr0)
    );
    let script = std::env::temp_dir().join(format!("{}-rx.py", ns.name));
    std::fs::write(&script, rx).unwrap();
    let child =
        ns.command("python3").arg(&script).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let py = format!(
        "import socket; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('cl0',0)); \
         s.send(bytes([{d}, {c}, 0x81,0,0,100, 8,0, 0x45,0,0,28,0,0,0,0,64,17,0,0, \
         198,51,100,7, 192,0,2,10, 0x9c,0x40,0,53,0,8,0,0]))",
        d = bytes(dsr0),
        c = bytes(cl0)
    );
    ns.exec(&format!("python3 -c \"{py}\"")).unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&script);
    let forwarded =
        dp.reason_counts().unwrap().into_iter().find(|r| r.0 == "fwd_maglev").unwrap().1;
    assert_eq!(forwarded, 1, "the tagged VIP frame was forwarded once");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100", "the frame left with its tag");
}
