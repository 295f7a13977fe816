//! Packet fixtures: the real XDP object under `BPF_PROG_TEST_RUN`, packet in,
//! expected verdict, reason and packet out. Services are programmed through
//! the real `Dataplane` API, so these also prove that user space and the
//! kernel agree on every map layout and on the flow hash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use kube_dsr_agent::{
    dataplane::{BackendSpec, Config, Dataplane, Egress, PortSpec, Protocol, ServiceSpec, Stage},
    maglev,
};
use kube_dsr_common::{flow_hash, port_word, v4_words, v6_words};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    packet::*,
    require_root,
};

const TABLE: u32 = 251;

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Env {
    _ns: NetNs,
    _pins: PinDir,
    dp: Dataplane,
    /// A second load of the same object sharing the pinned maps; the one
    /// attached to the interface cannot be test-run through its link.
    prog: aya::Ebpf,
    if_mac: Mac,
    egress: Egress,
}

impl Env {
    fn new() -> Self {
        let ns = NetNs::new("kdsrfx").unwrap();
        // No IPv6 on these links: the kernel's own neighbour discovery and
        // MLD frames would reach the program while a fixture runs and be
        // counted with it.
        ns.exec("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
            .unwrap();
        ns.exec("ip link add dsr0 type veth peer name dsr1 && ip link add dsr2 type veth peer name dsr3 && ip link set dsr0 up && ip link set dsr1 up && ip link set dsr2 up && ip link set dsr3 up").unwrap();
        let pins = PinDir::new().unwrap();
        let mut cfg = Config::new("dsr0");
        cfg.pin_dir = pins.path.clone();
        cfg.capacity =
            kube_dsr_agent::dataplane::Capacity { services: 8, backends: 64, ring_chunks: 16 };
        cfg.conn_entries = 4096;
        let dp = ns.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
        let if_mac = ns.mac("dsr0").unwrap();
        let egress_mac = ns.mac("dsr2").unwrap();
        let egress_idx: u32 =
            ns.exec("cat /sys/class/net/dsr2/ifindex").unwrap().trim().parse().unwrap();
        let mut prog = EbpfLoader::new()
            .default_map_pin_directory(&pins.path)
            .load(kube_dsr_agent::dataplane::object())
            .unwrap();
        let xdp: &mut Xdp = prog.program_mut("kube_dsr").unwrap().try_into().unwrap();
        xdp.load().unwrap();
        Self {
            _ns: ns,
            _pins: pins,
            dp,
            prog,
            if_mac,
            egress: Egress { ifindex: egress_idx, mac: egress_mac },
        }
    }

    /// Runs one frame: (verdict, frame out, reason that was counted).
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>, &'static str) {
        let before = self.dp.reason_counts().unwrap();
        let xdp: &Xdp = self.prog.program("kube_dsr").unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap();
        out.truncate(r.data_size_out as usize);
        let after = self.dp.reason_counts().unwrap();
        let changed: Vec<_> =
            before.iter().zip(&after).filter(|(b, a)| a.1 != b.1).map(|(_, a)| a.0).collect();
        assert_eq!(changed.len(), 1, "exactly one reason per packet, got {changed:?}");
        (r.return_value, out, changed[0])
    }
}

fn mac_of(last: u8) -> Mac {
    [0x02, 0xbb, 0, 0, 0, last]
}

fn service(
    name: &str,
    vip: &str,
    ports: &[(u16, Protocol)],
    backends: &[(&str, u8)],
) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: vip.parse().unwrap(),
        ports: ports.iter().map(|&(port, protocol)| PortSpec { port, protocol }).collect(),
        table_size: TABLE,
        backends: backends
            .iter()
            .map(|&(a, m)| BackendSpec::new(a.parse().unwrap(), mac_of(m)))
            .collect(),
        pin_all_flows: false,
        stage: Stage::Ingress,
    }
}

/// The backend MAC user space predicts for a new flow: the same Maglev
/// table and flow hash the kernel uses.
fn predict(spec: &ServiceSpec, client: IpAddr, sport: u16, dport: u16, proto: u8) -> Mac {
    let entries: Vec<_> = spec
        .backends
        .iter()
        .filter(|b| b.takes_new_flows())
        .map(|b| maglev::Entry { key: key(b.addr), weight: b.weight, value: b.mac })
        .collect();
    let table = maglev::build(spec.table_size, &entries).unwrap().unwrap();
    let words = match client {
        IpAddr::V4(a) => v4_words(a.octets()),
        IpAddr::V6(a) => v6_words(a.octets()),
    };
    let h = flow_hash(&words, port_word(sport), port_word(dport), proto);
    table[(h % spec.table_size) as usize]
}

fn key(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The input with its two MAC addresses replaced.
fn rewritten(frame: &[u8], dst: Mac, src: Mac) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

enum Out {
    Unchanged,
    /// To this MAC from the attach interface's.
    To(Mac),
    /// To the first MAC from the second (a redirect).
    Via(Mac, Mac),
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    reason: &'static str,
    out: Out,
}

fn check(env: &Env, cases: Vec<Case>) -> usize {
    let n = cases.len();
    for c in cases {
        let (verdict, out, reason) = env.run(&c.frame);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.name);
        assert_eq!(reason, c.reason, "{}: reason", c.name);
        match c.out {
            Out::Unchanged => {
                assert_eq!(out, c.frame, "{}: frame must pass byte-identical", c.name)
            }
            Out::To(mac) => {
                assert_eq!(
                    out,
                    rewritten(&c.frame, mac, env.if_mac),
                    "{}: only the MACs change",
                    c.name
                )
            }
            Out::Via(dst, src) => {
                assert_eq!(out, rewritten(&c.frame, dst, src), "{}: only the MACs change", c.name)
            }
        }
    }
    n
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn packet_fixtures() {
    require_root();
    let mut env = Env::new();
    let dut = env.if_mac;
    let web = service(
        "default/web/v4",
        "192.0.2.10",
        &[(80, Protocol::Tcp), (53, Protocol::Udp)],
        &[("10.0.0.11", 0x11), ("10.0.0.12", 0x12), ("10.0.0.13", 0x13)],
    );
    let web6 = service(
        "default/web/v6",
        "2001:db8::10",
        &[(443, Protocol::Tcp), (443, Protocol::Udp)],
        &[("fd00::11", 0x61), ("fd00::12", 0x62)],
    );
    let empty = service("default/empty/v4", "192.0.2.20", &[(80, Protocol::Tcp)], &[]);
    for s in [&web, &web6, &empty] {
        env.dp.upsert_service(s).unwrap();
    }

    let vip = v4("192.0.2.10");
    let vip6: IpAddr = "2001:db8::10".parse().unwrap();
    let client = v4("198.51.100.7");
    let client6: IpAddr = "2001:db8:ff::7".parse().unwrap();
    let other = v4("192.0.2.99");
    let syn = 0x02;

    let tcp4 = tcp_frame(dut, CLIENT_MAC, (client, 40000), (vip, 80), syn);
    let tcp4_to = predict(&web, client, 40000, 80, PROTO_TCP);
    let udp4 = udp_frame(dut, CLIENT_MAC, (client, 40001), (vip, 53), b"query");
    let tcp6 = tcp_frame(dut, CLIENT_MAC, (client6, 40002), (vip6, 443), syn);
    let tcp6_to = predict(&web6, client6, 40002, 443, PROTO_TCP);
    let udp6 = udp_frame(dut, CLIENT_MAC, (client6, 40003), (vip6, 443), b"quic");

    let c4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let c6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let tcp_seg = tcp(client, vip, 40004, 80, syn, b"");
    let with = |o: V4Opts| {
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IP);
        f.extend(ipv4(c4("198.51.100.7"), c4("192.0.2.10"), PROTO_TCP, &tcp_seg, &o));
        f
    };

    // ICMP errors quote a packet the backend sent: VIP -> client.
    let reply4 = {
        let seg = tcp(vip, client, 80, 40000, 0x12, b"");
        ipv4(c4("192.0.2.10"), c4("198.51.100.7"), PROTO_TCP, &seg, &V4Opts::default())
    };
    let frag_needed = {
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IP);
        let body = &reply4[..28];
        f.extend(ipv4(
            c4("203.0.113.1"),
            c4("192.0.2.10"),
            PROTO_ICMP,
            &icmp4(3, 4, [0, 0, 0x05, 0x78], body),
            &V4Opts::default(),
        ));
        f
    };
    let reply6 = {
        let seg = tcp(vip6, client6, 443, 40002, 0x12, b"");
        ipv6(c6("2001:db8::10"), c6("2001:db8:ff::7"), PROTO_TCP, &seg)
    };
    let too_big = {
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IPV6);
        let m = icmp6(c6("2001:db8::1"), c6("2001:db8::10"), 2, 0, 1280u32.to_be_bytes(), &reply6);
        f.extend(ipv6(c6("2001:db8::1"), c6("2001:db8::10"), PROTO_ICMPV6, &m));
        f
    };
    let not_vip_icmp = {
        let seg = tcp(other, client, 80, 40000, 0x12, b"");
        let inner = ipv4(c4("192.0.2.99"), c4("198.51.100.7"), PROTO_TCP, &seg, &V4Opts::default());
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IP);
        f.extend(ipv4(
            c4("203.0.113.1"),
            c4("192.0.2.99"),
            PROTO_ICMP,
            &icmp4(3, 4, [0, 0, 5, 0x78], &inner[..28]),
            &V4Opts::default(),
        ));
        f
    };
    let ext6 = |next: u8| {
        // An 8-byte extension header carrying TCP.
        let mut p = vec![PROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
        p.extend(tcp(client6, vip6, 40005, 443, syn, b""));
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IPV6);
        f.extend(ipv6(c6("2001:db8:ff::7"), c6("2001:db8::10"), next, &p));
        f
    };
    let tagged = {
        let seg = tcp(client, vip, 40000, 80, 0x10, b"");
        l3_frame(dut, CLIENT_MAC, &[(ETH_P_8021Q, 100)], client, vip, PROTO_TCP, &seg)
    };
    let qinq = {
        let seg = tcp(client, vip, 40000, 80, 0x10, b"");
        l3_frame(
            dut,
            CLIENT_MAC,
            &[(ETH_P_8021AD, 10), (ETH_P_8021Q, 100)],
            client,
            vip,
            PROTO_TCP,
            &seg,
        )
    };
    let echo4 = {
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IP);
        f.extend(ipv4(
            c4("198.51.100.7"),
            c4("192.0.2.10"),
            PROTO_ICMP,
            &icmp4(8, 0, [0, 1, 0, 1], b"ping"),
            &V4Opts::default(),
        ));
        f
    };
    let echo6 = {
        let m = icmp6(c6("2001:db8:ff::7"), c6("2001:db8::10"), 128, 0, [0, 1, 0, 1], b"ping");
        let mut f = eth(dut, CLIENT_MAC, &[], ETH_P_IPV6);
        f.extend(ipv6(c6("2001:db8:ff::7"), c6("2001:db8::10"), PROTO_ICMPV6, &m));
        f
    };
    let bad_version = with(V4Opts { version: Some(6), ..Default::default() });
    let short_tcp = {
        let mut f = tcp_frame(dut, CLIENT_MAC, (client, 40006), (vip, 80), syn);
        f.truncate(14 + 20 + 12);
        f
    };
    let short_udp = {
        let mut f = udp_frame(dut, CLIENT_MAC, (client, 40007), (vip, 53), b"");
        f.truncate(14 + 20 + 6);
        f
    };

    let pass = |name, frame: Vec<u8>, reason| Case {
        name,
        frame,
        verdict: XDP_PASS,
        reason,
        out: Out::Unchanged,
    };
    let drop = |name, frame: Vec<u8>, reason| Case {
        name,
        frame,
        verdict: XDP_DROP,
        reason,
        out: Out::Unchanged,
    };
    let tx = |name, frame: Vec<u8>, reason, to: Mac| Case {
        name,
        frame,
        verdict: XDP_TX,
        reason,
        out: Out::To(to),
    };

    // Hostile and malformed frames: every class is passed or
    // dropped under its own reason, never forwarded.
    let malformed = {
        let set16 = |mut f: Vec<u8>, at: usize, v: u16| {
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            f
        };
        let (l3, l4_4, l4_6) = (14, 14 + 20, 14 + 40);
        let tcp4_at = |sport| tcp_frame(dut, CLIENT_MAC, (client, sport), (vip, 80), syn);
        let udp4_at =
            |payload: &[u8]| udp_frame(dut, CLIENT_MAC, (client, 40001), (vip, 53), payload);
        let to_mac = |mac: Mac| {
            let mut f = tcp4.clone();
            f[..6].copy_from_slice(&mac);
            f
        };
        let mut with_opts = tcp(client, vip, 40000, 80, syn, &[2, 4, 5, 0xb4, 1, 1, 4, 2]);
        with_opts[12] = 7 << 4;
        let tcp4_opts = l3_frame(dut, CLIENT_MAC, &[], client, vip, PROTO_TCP, &with_opts);
        let mut padded = tcp4.clone();
        padded.resize(60, 0);
        // A UDP length shorter than the IP payload: the rest is trailer.
        let udp_trailer = set16(udp4_at(b"query"), l4_4 + 4, 8 + 2);
        let inner4 = l4_4 + 8;
        let too_big_inner = l4_6 + 8;
        vec![
            pass(
                "IPv4 total length 1400 > frame",
                set16(tcp4.clone(), l3 + 2, 1400),
                "pass_ip_len",
            ),
            pass("IPv4 total length 65535", set16(tcp4.clone(), l3 + 2, 65535), "pass_ip_len"),
            pass("IPv4 total length 0", set16(tcp4.clone(), l3 + 2, 0), "pass_ip_len"),
            pass("IPv4 total length 19", set16(tcp4.clone(), l3 + 2, 19), "pass_ip_len"),
            drop(
                "IPv4 total length 20: no room for TCP",
                set16(tcp4.clone(), l3 + 2, 20),
                "drop_tcp_len",
            ),
            drop("IPv4 total length 30: TCP cut", set16(tcp4.clone(), l3 + 2, 30), "drop_tcp_len"),
            drop(
                "IPv4 total length 20: no room for UDP",
                set16(udp4_at(b"q"), l3 + 2, 20),
                "drop_udp_len",
            ),
            pass("IPv6 payload length > frame", set16(tcp6.clone(), 14 + 4, 21), "pass_ip_len"),
            pass("IPv6 payload length 65535", set16(tcp6.clone(), 14 + 4, 65535), "pass_ip_len"),
            drop(
                "IPv6 payload length 0 (no jumbo header)",
                set16(tcp6.clone(), 14 + 4, 0),
                "drop_tcp_len",
            ),
            drop(
                "IPv6 payload length 12: TCP cut",
                set16(tcp6.clone(), 14 + 4, 12),
                "drop_tcp_len",
            ),
            drop(
                "TCP data offset 4",
                {
                    let mut f = tcp4_at(40010);
                    f[l4_4 + 12] = 4 << 4;
                    f
                },
                "drop_tcp_len",
            ),
            drop(
                "TCP data offset 0",
                {
                    let mut f = tcp4_at(40011);
                    f[l4_4 + 12] = 0;
                    f
                },
                "drop_tcp_len",
            ),
            drop(
                "TCP data offset 15, past the packet",
                {
                    let mut f = tcp4_at(40012);
                    f[l4_4 + 12] = 15 << 4;
                    f
                },
                "drop_tcp_len",
            ),
            drop(
                "TCPv6 data offset 6, past the packet",
                {
                    let mut f = tcp6.clone();
                    f[l4_6 + 12] = 6 << 4;
                    f
                },
                "drop_tcp_len",
            ),
            drop("UDP length 0", set16(udp4_at(b"query"), l4_4 + 4, 0), "drop_udp_len"),
            drop("UDP length 4", set16(udp4_at(b"query"), l4_4 + 4, 4), "drop_udp_len"),
            drop(
                "UDP length past the packet",
                set16(udp4_at(b"query"), l4_4 + 4, 200),
                "drop_udp_len",
            ),
            drop(
                "UDPv6 length past the packet",
                set16(
                    udp_frame(dut, CLIENT_MAC, (client6, 40003), (vip6, 443), b"quic"),
                    l4_6 + 4,
                    13,
                ),
                "drop_udp_len",
            ),
            pass(
                "malformed TCP to no VIP is the kernel's",
                {
                    let mut f = tcp_frame(dut, CLIENT_MAC, (client, 40000), (other, 80), syn);
                    f[l4_4 + 12] = 0;
                    f
                },
                "pass_not_vip",
            ),
            pass(
                "TCP header cut by the frame, lengths consistent",
                set16(tcp4[..l4_4 + 12].to_vec(), l3 + 2, 32),
                "pass_truncated",
            ),
            tx("TCP with options (data offset 7)", tcp4_opts, "fwd_maglev", tcp4_to),
            tx("Ethernet padding past the IP packet", padded, "fwd_maglev", tcp4_to),
            tx(
                "UDP length shorter than the IP payload",
                udp_trailer,
                "fwd_maglev",
                predict(&web, client, 40001, 53, PROTO_UDP),
            ),
            pass("VIP frame to broadcast MAC", to_mac([0xff; 6]), "pass_not_our_mac"),
            pass(
                "VIP frame to IPv4 multicast MAC",
                to_mac([1, 0, 0x5e, 0, 0, 1]),
                "pass_not_our_mac",
            ),
            pass(
                "VIP frame to IPv6 multicast MAC",
                to_mac([0x33, 0x33, 0, 0, 0, 1]),
                "pass_not_our_mac",
            ),
            pass(
                "VIP frame to another host's MAC",
                to_mac([0x02, 0xaa, 0, 0, 0, 9]),
                "pass_not_our_mac",
            ),
            pass(
                "ICMP error whose quote ends past the outer packet",
                set16(frag_needed.clone(), l3 + 2, 20 + 8 + 20 + 4),
                "pass_icmp_quote",
            ),
            pass(
                "ICMP error quoting a non-first fragment",
                set16(frag_needed.clone(), inner4 + 6, 0x2000 | 185),
                "pass_icmp_quote",
            ),
            pass(
                "ICMP error quoting a packet shorter than its ports",
                set16(frag_needed.clone(), inner4 + 2, 24),
                "pass_icmp_quote",
            ),
            pass(
                "ICMPv6 error quoting a payload shorter than its ports",
                set16(too_big.clone(), too_big_inner + 4, 4),
                "pass_icmp_quote",
            ),
        ]
    };
    let mut cases = vec![
        tx("tcp4 SYN to VIP: Maglev slot", tcp4.clone(), "fwd_maglev", tcp4_to),
        tx("tcp4 same flow again: same backend", tcp4.clone(), "fwd_maglev", tcp4_to),
        tx("udp4 to VIP", udp4, "fwd_maglev", predict(&web, client, 40001, 53, PROTO_UDP)),
        tx("tcp6 to VIP", tcp6.clone(), "fwd_maglev", tcp6_to),
        tx("udp6 to VIP", udp6, "fwd_maglev", predict(&web6, client6, 40003, 443, PROTO_UDP)),
        tx("802.1Q-tagged VIP packet keeps its tag", tagged, "fwd_maglev", tcp4_to),
        pass("QinQ (two tags) passes", qinq, "pass_vlan_stack"),
        pass(
            "VIP address, port not in the service",
            tcp_frame(dut, CLIENT_MAC, (client, 40000), (vip, 81), syn),
            "pass_not_vip",
        ),
        pass(
            "VIP address and port, wrong protocol",
            udp_frame(dut, CLIENT_MAC, (client, 40000), (vip, 80), b"x"),
            "pass_not_vip",
        ),
        pass(
            "non-VIP IPv4",
            tcp_frame(dut, CLIENT_MAC, (client, 40000), (other, 80), syn),
            "pass_not_vip",
        ),
        pass(
            "non-VIP IPv6",
            tcp_frame(
                dut,
                CLIENT_MAC,
                (client6, 40000),
                ("2001:db8::99".parse().unwrap(), 443),
                syn,
            ),
            "pass_not_vip",
        ),
        pass(
            "ARP request for the VIP",
            arp_request(CLIENT_MAC, c4("198.51.100.7"), c4("192.0.2.10")),
            "pass_not_ip",
        ),
        pass("ICMP echo to the VIP", echo4, "pass_other_l4"),
        pass("ICMPv6 echo to the VIP", echo6, "pass_other_l4"),
        pass(
            "IPv4 with options",
            with(V4Opts { options: vec![1, 1, 1, 0], ..Default::default() }),
            "pass_ip_options",
        ),
        pass(
            "IPv4 first fragment (MF)",
            with(V4Opts { more_fragments: true, ..Default::default() }),
            "pass_fragment",
        ),
        pass(
            "IPv4 later fragment (offset)",
            with(V4Opts { frag_offset: 185, ..Default::default() }),
            "pass_fragment",
        ),
        pass("IPv6 fragment header", ext6(44), "pass_fragment"),
        pass("IPv6 hop-by-hop header", ext6(0), "pass_ipv6_ext"),
        pass("IPv6 destination options header", ext6(60), "pass_ipv6_ext"),
        pass("IPv4 header with version 6", bad_version, "pass_truncated"),
        // The kernel refuses test frames shorter than an Ethernet header (as
        // no NIC delivers one); the shortest is a bare header.
        pass("bare Ethernet header, IPv4 ethertype", tcp4[..14].to_vec(), "pass_truncated"),
        pass(
            "truncated VLAN tag",
            eth(dut, CLIENT_MAC, &[], ETH_P_8021Q).into_iter().chain([0u8]).collect(),
            "pass_truncated",
        ),
        pass("truncated IPv4 header", tcp4[..14 + 12].to_vec(), "pass_truncated"),
        pass("truncated IPv6 header", tcp6[..14 + 30].to_vec(), "pass_truncated"),
        // Cut frames whose IP header still claims the whole packet: the IP
        // length check sees them first.
        pass("truncated TCP header", short_tcp, "pass_ip_len"),
        pass("truncated UDP header", short_udp, "pass_ip_len"),
        pass(
            "truncated ICMP error (inner header cut)",
            frag_needed[..14 + 20 + 8 + 10].to_vec(),
            "pass_ip_len",
        ),
        tx(
            "ICMP fragmentation-needed for a VIP flow goes to its backend",
            frag_needed,
            "fwd_icmp",
            tcp4_to,
        ),
        tx(
            "ICMPv6 packet-too-big for a VIP flow goes to its backend",
            too_big,
            "fwd_icmp",
            tcp6_to,
        ),
        pass("ICMP error about a non-VIP flow", not_vip_icmp, "pass_icmp_not_vip"),
        Case {
            name: "VIP with no backend is dropped",
            frame: tcp_frame(dut, CLIENT_MAC, (client, 40000), (v4("192.0.2.20"), 80), syn),
            verdict: XDP_DROP,
            reason: "drop_no_backend",
            out: Out::Unchanged,
        },
    ];
    cases.extend(malformed);
    let mut total = check(&env, std::mem::take(&mut cases));

    // Pin-all mode (Katran's behaviour): every new flow gets an entry.
    let mut pinned = service(
        "default/pinned/v4",
        "192.0.2.50",
        &[(53, Protocol::Udp)],
        &[("10.0.3.1", 0x41), ("10.0.3.2", 0x42)],
    );
    pinned.pin_all_flows = true;
    env.dp.upsert_service(&pinned).unwrap();
    let q = udp_frame(dut, CLIENT_MAC, (client, 5353), (v4("192.0.2.50"), 53), b"q");
    let q_to = predict(&pinned, client, 5353, 53, PROTO_UDP);
    total += check(
        &env,
        vec![
            tx("pin-all: first packet creates an entry", q.clone(), "fwd_pinned_current", q_to),
            tx("pin-all: next packet hits it", q, "fwd_conn_hit", q_to),
        ],
    );

    // Draining: an established flow keeps its backend; new connections
    // avoid it.
    let mut drain = service(
        "default/drain/v4",
        "192.0.2.30",
        &[(8080, Protocol::Tcp)],
        &[("10.0.1.1", 0x21), ("10.0.1.2", 0x22), ("10.0.1.3", 0x23)],
    );
    env.dp.upsert_service(&drain).unwrap();
    let dvip = v4("192.0.2.30");
    let first = tcp_frame(dut, CLIENT_MAC, (client, 41000), (dvip, 8080), syn);
    let established = tcp_frame(dut, CLIENT_MAC, (client, 41000), (dvip, 8080), 0x10);
    let pinned_to = predict(&drain, client, 41000, 8080, PROTO_TCP);
    total += check(&env, vec![tx("flow before draining", first.clone(), "fwd_maglev", pinned_to)]);
    let before_drain = drain.clone();
    let drained = drain.backends.iter().find(|b| b.mac == pinned_to).unwrap().addr;
    env.dp.set_draining("default/drain/v4", drained, true).unwrap();
    for b in &mut drain.backends {
        b.draining = b.addr == drained;
    }
    total += check(
        &env,
        vec![
            tx(
                "draining backend keeps its established flow",
                established.clone(),
                "fwd_pinned_previous",
                pinned_to,
            ),
            tx("the kept flow is now pinned", established.clone(), "fwd_conn_hit", pinned_to),
        ],
    );
    let mut new_flows = Vec::new();
    for port in 42000..42040 {
        let f = tcp_frame(dut, CLIENT_MAC, (client, port), (dvip, 8080), syn);
        let to = predict(&drain, client, port, 8080, PROTO_TCP);
        assert_ne!(to, pinned_to, "the prediction itself must avoid the draining backend");
        let moved = predict(&before_drain, client, port, 8080, PROTO_TCP) != to;
        let why = if moved { "fwd_pinned_current" } else { "fwd_maglev" };
        new_flows.push(tx("new connection while a backend drains", f, why, to));
    }
    total += check(&env, new_flows);

    // Removing the backend: its pinned flow is stale (the slot's generation
    // moved on) and goes where the current table says.
    drain.backends.retain(|b| b.addr != drained);
    env.dp.upsert_service(&drain).unwrap();
    let now_to = predict(&drain, client, 41000, 8080, PROTO_TCP);
    total += check(
        &env,
        vec![
            tx(
                "flow of a removed backend is re-balanced",
                established.clone(),
                "fwd_pinned_current",
                now_to,
            ),
            tx("and pinned there", established.clone(), "fwd_conn_hit", now_to),
        ],
    );
    // Settling drops the previous table and collects pins that are stale or
    // redundant (the current table gives the same backend); the service is
    // then unpinned and its packets skip the connection table.
    let settled = env.dp.settle(std::time::Duration::ZERO).unwrap();
    assert_eq!(settled.previous_dropped, 1, "{settled:?}");
    assert_eq!(settled.unpinned_services, 1, "{settled:?}");
    assert!(settled.pins_removed >= 2, "{settled:?}");
    let late = tcp_frame(dut, CLIENT_MAC, (client, 43000), (dvip, 8080), 0x10);
    total += check(
        &env,
        vec![
            tx(
                "settled: a new flow follows Maglev",
                late,
                "fwd_maglev",
                predict(&drain, client, 43000, 8080, PROTO_TCP),
            ),
            tx(
                "settled: the collected pin's flow stays put",
                established.clone(),
                "fwd_maglev",
                now_to,
            ),
        ],
    );
    // The pin-all service keeps its pins through a settle.
    let q = udp_frame(dut, CLIENT_MAC, (client, 5353), (v4("192.0.2.50"), 53), b"q");
    total += check(&env, vec![tx("pin-all pins survive settling", q, "fwd_conn_hit", q_to)]);

    // A slot released by one service and reused by another: the first
    // service's previous table still names it, but its established flows
    // must not follow it into the other service.
    let mut reuse_a = service(
        "default/reuse-a/v4",
        "192.0.2.60",
        &[(80, Protocol::Tcp)],
        &[("10.0.4.1", 0x51), ("10.0.4.2", 0x52)],
    );
    env.dp.upsert_service(&reuse_a).unwrap();
    let avip = v4("192.0.2.60");
    let port = (44000..45000)
        .find(|&p| predict(&reuse_a, client, p, 80, PROTO_TCP) == mac_of(0x52))
        .unwrap();
    reuse_a.backends.retain(|b| b.mac != mac_of(0x52));
    env.dp.upsert_service(&reuse_a).unwrap();
    // Enough backends to take every free slot, the released one included.
    let many: Vec<(String, u8)> =
        (0..40).map(|i| (format!("10.0.5.{i}"), 0x80 + i as u8)).collect();
    let many: Vec<(&str, u8)> = many.iter().map(|(a, m)| (a.as_str(), *m)).collect();
    env.dp
        .upsert_service(&service("default/reuse-b/v4", "192.0.2.61", &[(80, Protocol::Tcp)], &many))
        .unwrap();
    let est = tcp_frame(dut, CLIENT_MAC, (client, port), (avip, 80), 0x10);
    total += check(
        &env,
        vec![tx(
            "previous backend's slot now belongs to another service",
            est,
            "fwd_pinned_current",
            mac_of(0x51),
        )],
    );
    env.dp.remove_service("default/reuse-b/v4").unwrap();

    // A backend behind another interface is redirected there, with that
    // interface's MAC as the source.
    let mut far =
        service("default/far/v4", "192.0.2.40", &[(80, Protocol::Tcp)], &[("10.0.2.1", 0x31)]);
    far.backends[0].egress = Some(env.egress);
    env.dp.upsert_service(&far).unwrap();
    let f = tcp_frame(dut, CLIENT_MAC, (client, 40000), (v4("192.0.2.40"), 80), syn);
    let (verdict, out, reason) = env.run(&f);
    assert_eq!((verdict, reason), (XDP_REDIRECT, "fwd_maglev"), "backend behind another interface");
    assert_eq!(out, rewritten(&f, mac_of(0x31), env.egress.mac));
    total += 1;

    // Removing a service hands its packets back to the kernel untouched.
    env.dp.remove_service("default/far/v4").unwrap();
    total += check(&env, vec![pass("removed service passes", f, "pass_not_vip")]);

    // Counters: per VIP and per backend, packets and bytes.
    let t = env.dp.service_traffic("default/web/v4").unwrap();
    assert!(t.packets >= 5 && t.bytes > 0, "{t:?}");
    let b = web.backends.iter().find(|b| b.mac == tcp4_to).unwrap().addr;
    // Two SYNs, the tagged packet and the ICMP error went to this backend.
    assert!(env.dp.backend_traffic("default/web/v4", b).unwrap().packets >= 4);
    assert!(total >= 25, "only {total} fixtures ran");
    eprintln!("{total} packet fixtures passed");
}

const PEER_MAC: Mac = [0x02, 0xee, 0, 0, 0, 0x02];
const OTHER_NODE_MAC: Mac = [0x02, 0xee, 0, 0, 0, 0x03];

/// The node stage: a VIP frame an ingress stage sent to this node goes to
/// one of this node's local pods (dst = the pod's MAC, src = its host-side
/// interface's MAC, redirected into that interface), never back onto the
/// segment.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn node_stage_fixtures() {
    require_root();
    let mut env = Env::new();
    let dut = env.if_mac;
    let host_side = env.egress;
    let client = v4("198.51.100.7");
    let syn = 0x02;
    let pods = |addrs: &[(&str, u8)]| -> Vec<BackendSpec> {
        addrs.iter().map(|&(a, m)| BackendSpec::pod(v4(a), mac_of(m), host_side)).collect()
    };
    let node_stage = |name: &str, vip: &str, port: u16, backends: Vec<BackendSpec>| ServiceSpec {
        stage: Stage::Node,
        backends,
        ..service(name, vip, &[(port, Protocol::Tcp)], &[])
    };
    let to_pod = |name, frame: Vec<u8>, pod: Mac| Case {
        name,
        frame,
        verdict: XDP_REDIRECT,
        reason: "fwd_node_local",
        out: Out::Via(pod, host_side.mac),
    };
    let dropped = |name, frame: Vec<u8>, reason| Case {
        name,
        frame,
        verdict: XDP_DROP,
        reason,
        out: Out::Unchanged,
    };
    let passed = |name, frame: Vec<u8>, reason| Case {
        name,
        frame,
        verdict: XDP_PASS,
        reason,
        out: Out::Unchanged,
    };

    // An ingress node that also runs pods: its ingress stage holds itself
    // (Local, two ready pods) and another node (ViaNode, one pod); its node
    // stage holds the two local pods.
    let vip = v4("192.0.2.70");
    let mut ingress = service("default/mixed/v4", "192.0.2.70", &[(80, Protocol::Tcp)], &[]);
    ingress.backends = vec![
        BackendSpec::local(v4("10.10.0.1"), 2),
        BackendSpec::via_node(v4("10.10.0.3"), OTHER_NODE_MAC, 1),
    ];
    let local = node_stage(
        "default/mixed/v4/node",
        "192.0.2.70",
        80,
        pods(&[("10.244.1.2", 0x71), ("10.244.1.3", 0x72)]),
    );
    env.dp.upsert_service(&ingress).unwrap();
    env.dp.upsert_service(&local).unwrap();
    env.dp.set_peers(&[PEER_MAC]).unwrap();
    assert_eq!(env.dp.peers(), vec![PEER_MAC]);

    let mut cases = Vec::new();
    let (mut locals, mut remotes) = (0, 0);
    for port in 50000..50060 {
        let f = tcp_frame(dut, CLIENT_MAC, (client, port), (vip, 80), syn);
        let picked = predict(&ingress, client, port, 80, PROTO_TCP);
        if picked == [0; 6] {
            locals += 1;
            let pod = predict(&local, client, port, 80, PROTO_TCP);
            cases.push(to_pod("ingress picks Local: delivered to a local pod", f, pod));
        } else {
            remotes += 1;
            assert_eq!(picked, OTHER_NODE_MAC);
            cases.push(Case {
                name: "ingress picks ViaNode: to the node's MAC, XDP_TX",
                frame: f,
                verdict: XDP_TX,
                reason: "fwd_maglev",
                out: Out::To(OTHER_NODE_MAC),
            });
        }
    }
    // Weight 2 against 1: about two thirds local.
    assert!(locals > 25 && remotes > 10, "{locals} local, {remotes} via node");
    let mut total = check(&env, cases);

    // A flow the ingress table gives to the other node arrives from a
    // peer instead (the peer's table disagrees with ours, as during a
    // change): it is delivered here, not balanced again and not sent back
    // onto the segment.
    let port = (50000..51000)
        .find(|&p| predict(&ingress, client, p, 80, PROTO_TCP) == OTHER_NODE_MAC)
        .unwrap();
    let from_client = tcp_frame(dut, CLIENT_MAC, (client, port), (vip, 80), 0x10);
    let from_peer = tcp_frame(dut, PEER_MAC, (client, port), (vip, 80), 0x10);
    total += check(
        &env,
        vec![
            Case {
                name: "from a client: our ingress table says the other node",
                frame: from_client,
                verdict: XDP_TX,
                reason: "fwd_maglev",
                out: Out::To(OTHER_NODE_MAC),
            },
            to_pod(
                "from a peer: node stage, whatever our ingress table says",
                from_peer.clone(),
                predict(&local, client, port, 80, PROTO_TCP),
            ),
            passed(
                "from a peer but to another host's MAC: not delivered",
                rewritten(&from_peer, OTHER_NODE_MAC, PEER_MAC),
                "pass_not_our_mac",
            ),
            passed(
                "from a peer, broadcast destination: not delivered",
                rewritten(&from_peer, [0xff; 6], PEER_MAC),
                "pass_not_our_mac",
            ),
        ],
    );

    // A node that is no ingress for the VIP: only its node stage, found
    // through the VIP_NODE_ONLY entry the dataplane writes for it.
    let only_vip = v4("192.0.2.71");
    let only = node_stage(
        "default/only/v4/node",
        "192.0.2.71",
        80,
        pods(&[("10.244.1.4", 0x73), ("10.244.1.5", 0x74)]),
    );
    env.dp.upsert_service(&only).unwrap();
    let only_to = predict(&only, client, 40000, 80, PROTO_TCP);
    let to_only = |src: Mac, dst: Mac| tcp_frame(dst, src, (client, 40000), (only_vip, 80), syn);
    // The ICMP error about that flow follows it to its pod.
    let frag_needed = {
        let c4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let seg = tcp(only_vip, client, 80, 40000, 0x12, b"");
        let inner = ipv4(c4("192.0.2.71"), c4("198.51.100.7"), PROTO_TCP, &seg, &V4Opts::default());
        let mut f = eth(dut, PEER_MAC, &[], ETH_P_IP);
        f.extend(ipv4(
            c4("203.0.113.1"),
            c4("192.0.2.71"),
            PROTO_ICMP,
            &icmp4(3, 4, [0, 0, 5, 0x78], &inner[..28]),
            &V4Opts::default(),
        ));
        f
    };
    // IPv6 as well.
    let vip6: IpAddr = "2001:db8::71".parse().unwrap();
    let client6: IpAddr = "2001:db8:ff::7".parse().unwrap();
    let only6 = ServiceSpec {
        name: "default/only/v6/node".into(),
        vip: vip6,
        backends: vec![BackendSpec::pod("fd00:244:1::4".parse().unwrap(), mac_of(0x75), host_side)],
        ..only.clone()
    };
    env.dp.upsert_service(&only6).unwrap();
    total += check(
        &env,
        vec![
            to_pod("node-only VIP from a peer", to_only(PEER_MAC, dut), only_to),
            to_pod("node-only VIP from a non-peer", to_only(CLIENT_MAC, dut), only_to),
            passed(
                "node-only VIP to another host's MAC",
                to_only(PEER_MAC, OTHER_NODE_MAC),
                "pass_not_our_mac",
            ),
            passed(
                "node-only VIP, multicast destination",
                to_only(PEER_MAC, [0x01, 0, 0x5e, 0, 0, 1]),
                "pass_not_our_mac",
            ),
            passed(
                "node-only VIP, other port",
                tcp_frame(dut, PEER_MAC, (client, 40000), (only_vip, 81), syn),
                "pass_not_vip",
            ),
            to_pod("ICMP error about a node-stage flow", frag_needed, only_to),
            to_pod(
                "IPv6 node-only VIP from a peer",
                tcp_frame(dut, PEER_MAC, (client6, 40000), (vip6, 80), syn),
                mac_of(0x75),
            ),
        ],
    );

    // No usable local pod: dropped and counted, never sent on.
    let mut none = only.clone();
    for b in &mut none.backends {
        b.draining = true;
    }
    env.dp.upsert_service(&none).unwrap();
    env.dp.settle(std::time::Duration::ZERO).unwrap();
    let new_flow = tcp_frame(dut, PEER_MAC, (client, 40100), (only_vip, 80), syn);
    total += check(
        &env,
        vec![dropped("node stage without a ready pod", new_flow, "drop_node_no_backend")],
    );
    // A VIP we are ingress for but hold no node stage of: a frame from a
    // peer is dropped, not balanced again.
    let lone =
        service("default/lone/v4", "192.0.2.72", &[(80, Protocol::Tcp)], &[("10.0.9.1", 0x79)]);
    env.dp.upsert_service(&lone).unwrap();
    let lone_frame = |src| tcp_frame(dut, src, (client, 40000), (v4("192.0.2.72"), 80), syn);
    total += check(
        &env,
        vec![
            Case {
                name: "ingress-only VIP from a client is balanced",
                frame: lone_frame(CLIENT_MAC),
                verdict: XDP_TX,
                reason: "fwd_maglev",
                out: Out::To(mac_of(0x79)),
            },
            dropped(
                "ingress-only VIP from a peer: no second balancing",
                lone_frame(PEER_MAC),
                "drop_node_no_backend",
            ),
        ],
    );

    // The node stage's VIP_NODE_ONLY entry steps aside for an ingress
    // service on the same VIP:port and comes back when it leaves; removing
    // the node stage hands the VIP back to the kernel.
    let over =
        service("default/over/v4", "192.0.2.71", &[(80, Protocol::Tcp)], &[("10.0.9.2", 0x7a)]);
    env.dp.upsert_service(&only).unwrap();
    env.dp.upsert_service(&over).unwrap();
    total += check(
        &env,
        vec![Case {
            name: "ingress service on a node-only VIP balances client frames",
            frame: to_only(CLIENT_MAC, dut),
            verdict: XDP_TX,
            reason: "fwd_maglev",
            out: Out::To(mac_of(0x7a)),
        }],
    );
    env.dp.remove_service("default/over/v4").unwrap();
    total += check(
        &env,
        vec![to_pod(
            "node-only again after the ingress service left",
            to_only(CLIENT_MAC, dut),
            only_to,
        )],
    );
    env.dp.remove_service("default/only/v4/node").unwrap();
    total +=
        check(&env, vec![passed("node stage removed", to_only(PEER_MAC, dut), "pass_not_vip")]);

    // The API refuses a node-stage pod behind the attach interface (the
    // frame would go back onto the segment) and remote reach kinds.
    let attach = Egress { ifindex: env.dp.ifindex(), mac: dut };
    let mut back_out = local.clone();
    back_out.backends[0].egress = Some(attach);
    let err = env.dp.upsert_service(&back_out).unwrap_err().to_string();
    assert!(err.contains("back onto the segment"), "{err}");
    let mut remote = local.clone();
    remote.backends[0] = BackendSpec::via_node(v4("10.10.0.3"), OTHER_NODE_MAC, 1);
    assert!(env.dp.upsert_service(&remote).is_err());

    // Counters of the node stage.
    let t = env.dp.service_traffic("default/mixed/v4/node").unwrap();
    assert!(t.packets > locals as u64, "{t:?}");
    assert!(total >= 75, "only {total} node-stage fixtures ran");
    eprintln!("{total} node-stage fixtures passed");
}
