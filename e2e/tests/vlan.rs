//! 802.1Q tags and native XDP on veth (issue 11): what the agent reports
//! and why. A tag that crossed a Linux bridge is held out of band by the
//! kernel; the bridge port's veth passes it on out of band unless its
//! `tx-vlan-offload` is off, and native XDP on the other end then sees the
//! frame without that tag (and `XDP_TX` would send it without). The
//! receiving veth cannot change that, so the dataplane reports
//! `PeerDecides` on veth; test worlds that send tagged frames turn
//! `tx-vlan-offload` off on the ports facing a dataplane.

use kube_dsr_agent::dataplane::{Config, Dataplane, VlanTags};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    privileged,
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
fn tags_through_a_bridge_reach_native_xdp_only_if_the_port_keeps_them_inline() {
    if !privileged("vlan") {
        return;
    }
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
