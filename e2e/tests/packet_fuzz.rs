//! Differential fuzzing of the real XDP object against an independent
//! parser (`etherparse`), under `BPF_PROG_TEST_RUN`.
//!
//! Frames are mutations of well-formed VIP and non-VIP frames (every length
//! field, header size, flag, tag, address, truncation point) plus random
//! bytes. For each, the verdict must agree with what etherparse makes of it:
//!
//! - the program transmits (`XDP_TX` or `XDP_REDIRECT`) only a frame that
//!   etherparse accepts as a well-formed, unfragmented, option-free TCP or
//!   UDP packet, or an ICMP error quoting one, to a configured VIP:port,
//!   sent to our MAC; and the frame out differs from the frame in only in
//!   the Ethernet addresses (a backend's MAC, the egress MAC);
//! - every such frame for a service with backends is transmitted, for one
//!   without backends dropped, and every well-formed frame that is no VIP's
//!   passes byte for byte;
//! - anything else passes unchanged or is dropped, never transmitted.
//!
//! Seeded and reproducible: `KDSR_FUZZ_SEED` picks the seed (default fixed),
//! `KDSR_FUZZ_FRAMES` the number of frames (default 1 000 000, about a
//! minute here); run longer by hand with a larger count. A disagreement
//! prints the seed, the frame's index and the frame in hex.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::{
    Ipv4HeaderSlice, Ipv6HeaderSlice, LinkExtSlice, LinkSlice, NetSlice, SlicedPacket,
    TransportSlice,
};
use kube_dsr_agent::dataplane::{
    BackendSpec, Config, Dataplane, Egress, PortSpec, Protocol, ServiceSpec, Stage,
};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    packet::*,
    require_root,
};

/// SplitMix64: small, seedable, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// Where a service's frames may go: destination MACs and the source MAC
/// they leave with; empty `to` means no backend (the frame is dropped).
#[derive(Clone)]
struct Dest {
    to: Vec<Mac>,
    src: Mac,
    redirect: bool,
}

/// What the independent parser makes of a frame.
#[derive(Debug, PartialEq)]
enum Class {
    /// Not a well-formed frame of the kind the program forwards.
    Other,
    /// Well formed, to our MAC, but to no VIP:port: must pass unchanged.
    NotVip,
    /// Well formed, to this VIP:port (address, port, protocol).
    Vip(IpAddr, u16, u8),
}

/// The oracle. Policy on top of etherparse's own checks: destination MAC
/// ours; no tag or one 802.1Q/802.1ad tag; IPv4 without options, not a
/// fragment, protocol TCP, UDP or ICMP directly; IPv6 without extension
/// headers and with a non-zero payload length (a zero one is a jumbogram,
/// which needs a hop-by-hop header); UDP length at least 8 (etherparse takes
/// 0 as "to the end", the jumbogram reading); ICMP destination-unreachable
/// (v6 also packet-too-big) quoting, inside the packet, an option-free
/// first-fragment IPv4 (or IPv6) TCP/UDP header whose source is the ICMP's
/// destination, plus 8 bytes of its L4 header.
fn classify(frame: &[u8], ours: Mac, vips: &HashMap<(IpAddr, u16, u8), Dest>) -> Class {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else { return Class::Other };
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else { return Class::Other };
    if eth.destination() != ours {
        return Class::Other;
    }
    match p.link_exts.as_slice() {
        [] => {}
        [LinkExtSlice::Vlan(_)] if matches!(eth.ether_type().0, ETH_P_8021Q | ETH_P_8021AD) => {}
        _ => return Class::Other,
    }
    let (Some(net), Some(transport)) = (&p.net, &p.transport) else { return Class::Other };
    let key = match net {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            if h.ihl() != 5 || h.is_fragmenting_payload() {
                return Class::Other;
            }
            let dst = IpAddr::V4(h.destination_addr());
            match (h.protocol().0, transport) {
                (PROTO_TCP, TransportSlice::Tcp(t)) => (dst, t.destination_port(), PROTO_TCP),
                (PROTO_UDP, TransportSlice::Udp(u)) if u.length() >= 8 => {
                    (dst, u.destination_port(), PROTO_UDP)
                }
                (PROTO_ICMP, TransportSlice::Icmpv4(m)) if m.type_u8() == 3 => {
                    match quote4(m.payload(), dst) {
                        Some(k) => k,
                        None => return Class::Other,
                    }
                }
                _ => return Class::Other,
            }
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            if !ip.extensions().is_empty() || h.payload_length() == 0 {
                return Class::Other;
            }
            let dst = IpAddr::V6(h.destination_addr());
            match (h.next_header().0, transport) {
                (PROTO_TCP, TransportSlice::Tcp(t)) => (dst, t.destination_port(), PROTO_TCP),
                (PROTO_UDP, TransportSlice::Udp(u)) if u.length() >= 8 => {
                    (dst, u.destination_port(), PROTO_UDP)
                }
                (PROTO_ICMPV6, TransportSlice::Icmpv6(m)) if matches!(m.type_u8(), 1 | 2) => {
                    match quote6(&m.slice()[8..], dst) {
                        Some(k) => k,
                        None => return Class::Other,
                    }
                }
                _ => return Class::Other,
            }
        }
        _ => return Class::Other,
    };
    if vips.contains_key(&key) { Class::Vip(key.0, key.1, key.2) } else { Class::NotVip }
}

/// The flow an ICMPv4 error's quote names (VIP, VIP port, protocol).
fn quote4(quote: &[u8], outer_dst: IpAddr) -> Option<(IpAddr, u16, u8)> {
    let inner = Ipv4HeaderSlice::from_slice(quote).ok()?;
    let proto = inner.protocol().0;
    let ok = inner.ihl() == 5
        && inner.fragments_offset().value() == 0
        && inner.total_len() >= 28
        && quote.len() >= 28
        && IpAddr::V4(inner.source_addr()) == outer_dst
        && matches!(proto, PROTO_TCP | PROTO_UDP);
    ok.then(|| (outer_dst, u16::from_be_bytes([quote[20], quote[21]]), proto))
}

fn quote6(quote: &[u8], outer_dst: IpAddr) -> Option<(IpAddr, u16, u8)> {
    let inner = Ipv6HeaderSlice::from_slice(quote).ok()?;
    let proto = inner.next_header().0;
    let ok = inner.payload_length() >= 8
        && quote.len() >= 48
        && IpAddr::V6(inner.source_addr()) == outer_dst
        && matches!(proto, PROTO_TCP | PROTO_UDP);
    ok.then(|| (outer_dst, u16::from_be_bytes([quote[40], quote[41]]), proto))
}

/// A well-formed frame and where its fields are.
#[derive(Clone)]
struct Template {
    frame: Vec<u8>,
    l3: usize,
    v6: bool,
    l4: usize,
    proto: u8,
    /// Offset of the quoted IP header of an ICMP error.
    inner: Option<usize>,
}

fn templates(ours: Mac) -> Vec<Template> {
    let c4: IpAddr = "198.51.100.7".parse().unwrap();
    let c6: IpAddr = "2001:db8:ff::7".parse().unwrap();
    let targets: Vec<(IpAddr, IpAddr, u16, u8)> = vec![
        (c4, "192.0.2.10".parse().unwrap(), 80, PROTO_TCP),
        (c4, "192.0.2.10".parse().unwrap(), 53, PROTO_UDP),
        (c4, "192.0.2.10".parse().unwrap(), 81, PROTO_TCP),
        (c4, "192.0.2.99".parse().unwrap(), 80, PROTO_TCP),
        (c4, "192.0.2.20".parse().unwrap(), 80, PROTO_TCP),
        (c4, "192.0.2.40".parse().unwrap(), 8080, PROTO_UDP),
        (c6, "2001:db8::10".parse().unwrap(), 443, PROTO_TCP),
        (c6, "2001:db8::10".parse().unwrap(), 443, PROTO_UDP),
        (c6, "2001:db8::99".parse().unwrap(), 443, PROTO_UDP),
    ];
    let mut out = Vec::new();
    for tags in [vec![], vec![(ETH_P_8021Q, 100)], vec![(ETH_P_8021AD, 7)]] {
        let l3 = 14 + 4 * tags.len();
        for &(client, vip, port, proto) in &targets {
            let v6 = vip.is_ipv6();
            let l4 = l3 + if v6 { 40 } else { 20 };
            for variant in 0..3 {
                let seg = match (proto, variant) {
                    (PROTO_TCP, 0) => tcp(client, vip, 40000, port, 0x02, b""),
                    (PROTO_TCP, 1) => tcp(client, vip, 40001, port, 0x18, b"GET / HTTP/1.1\r\n"),
                    (PROTO_TCP, _) => {
                        // A SYN with 12 bytes of options (MSS, SACK-permitted,
                        // window scale, NOPs): data offset 8.
                        let opts = [2, 4, 5, 0xb4, 4, 2, 1, 3, 3, 7, 1, 1];
                        let mut t = tcp(client, vip, 40002, port, 0x02, &opts);
                        t[12] = 8 << 4;
                        t
                    }
                    (_, 0) => udp(client, vip, 40003, port, b""),
                    (_, 1) => udp(client, vip, 40004, port, b"query"),
                    _ => udp(client, vip, 40005, port, &[0x5a; 300]),
                };
                let mut frame = l3_frame(ours, CLIENT_MAC, &tags, client, vip, proto, &seg);
                if variant == 0 && frame.len() < 60 {
                    // Ethernet pads short frames: bytes past the IP packet.
                    frame.resize(60, 0);
                }
                out.push(Template { frame, l3, v6, l4, proto, inner: None });
            }
            // ICMP errors about the reply this flow would get (VIP -> client).
            let reply = match proto {
                PROTO_TCP => tcp(vip, client, port, 40000, 0x12, b""),
                _ => udp(vip, client, port, 40003, b"answer"),
            };
            let router4: Ipv4Addr = "203.0.113.1".parse().unwrap();
            let router6: Ipv6Addr = "2001:db8::1".parse().unwrap();
            let (frame, inner) = match (vip, client) {
                (IpAddr::V4(v), IpAddr::V4(c)) => {
                    let inner = ipv4(v, c, proto, &reply, &V4Opts::default());
                    let quote = &inner[..inner.len().min(28 + 8)];
                    let m = icmp4(3, 4, [0, 0, 0x05, 0x78], quote);
                    let mut f = eth(ours, CLIENT_MAC, &tags, ETH_P_IP);
                    f.extend(ipv4(router4, v, PROTO_ICMP, &m, &V4Opts::default()));
                    (f, l4 + 8)
                }
                (IpAddr::V6(v), IpAddr::V6(c)) => {
                    let inner = ipv6(v, c, proto, &reply);
                    let m = icmp6(router6, v, 2, 0, 1280u32.to_be_bytes(), &inner);
                    let mut f = eth(ours, CLIENT_MAC, &tags, ETH_P_IPV6);
                    f.extend(ipv6(router6, v, PROTO_ICMPV6, &m));
                    (f, l4 + 8)
                }
                _ => unreachable!(),
            };
            let icmp = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
            out.push(Template { frame, l3, v6, l4, proto: icmp, inner: Some(inner) });
        }
    }
    // Not IP at all.
    let arp =
        arp_request(CLIENT_MAC, "198.51.100.7".parse().unwrap(), "192.0.2.10".parse().unwrap());
    out.push(Template { frame: arp, l3: 14, v6: false, l4: 34, proto: 0, inner: None });
    out
}

fn set16(f: &mut [u8], at: usize, v: u16) {
    if at + 2 <= f.len() {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

fn get16(f: &[u8], at: usize) -> u16 {
    if at + 2 <= f.len() { u16::from_be_bytes([f[at], f[at + 1]]) } else { 0 }
}

/// A value near the interesting edges of a length field whose right value
/// is `right` in a frame with `room` bytes past the field's origin.
fn length_value(rng: &mut Rng, right: u16, room: usize) -> u16 {
    let room = room.min(0xffff) as i64;
    let right = i64::from(right);
    let v = match rng.below(8) {
        0 => rng.pick(&[0, 1, 4, 7, 8, 19, 20, 27, 28, 39, 40, 47, 48, 56]),
        1 => right + rng.pick(&[-8, -4, -2, -1, 1, 2, 4, 8]),
        2 => room + rng.pick(&[-4, -1, 0, 1, 4]),
        3 => rng.pick(&[0x7fff, 0x8000, 0xfffe, 0xffff]),
        4 => right,
        _ => (rng.next() & 0xffff) as i64,
    };
    v.clamp(0, 0xffff) as u16
}

/// One mutation of a field of the template's frame (offsets still valid).
fn mutate_field(rng: &mut Rng, t: &Template, f: &mut [u8], ours: Mac) {
    let (l3, l4) = (t.l3, t.l4);
    match rng.below(14) {
        // The IP length field.
        0 | 1 => {
            let at = if t.v6 { l3 + 4 } else { l3 + 2 };
            let origin = if t.v6 { l3 + 40 } else { l3 };
            let v = length_value(rng, get16(f, at), f.len().saturating_sub(origin));
            set16(f, at, v);
        }
        // L4 lengths: UDP length or TCP data offset.
        2 | 3 => match t.proto {
            PROTO_UDP => {
                let v = length_value(rng, get16(f, l4 + 4), f.len().saturating_sub(l4));
                set16(f, l4 + 4, v);
            }
            PROTO_TCP if l4 + 12 < f.len() => {
                f[l4 + 12] = (rng.below(16) as u8) << 4 | (f[l4 + 12] & 0x0f);
            }
            _ => {}
        },
        // The quoted packet of an ICMP error: its length, header size,
        // fragment bits, protocol, source, ports.
        4 => {
            if let Some(inner) = t.inner {
                match rng.below(6) {
                    0 => {
                        let at = if t.v6 { inner + 4 } else { inner + 2 };
                        let v = length_value(rng, get16(f, at), f.len().saturating_sub(inner));
                        set16(f, at, v);
                    }
                    1 if !t.v6 && inner < f.len() => f[inner] = rng.next() as u8,
                    2 if !t.v6 => set16(f, inner + 6, rng.next() as u16),
                    3 => {
                        let at = inner + if t.v6 { 6 } else { 9 };
                        if at < f.len() {
                            f[at] = rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, 44, 0]);
                        }
                    }
                    4 => {
                        let at = inner + if t.v6 { 8 } else { 12 } + rng.below(4);
                        if at < f.len() {
                            f[at] ^= 1;
                        }
                    }
                    _ => set16(f, inner + if t.v6 { 40 } else { 20 }, rng.pick(&[80, 53, 443, 1])),
                }
            }
        }
        // IPv4 version / header length; IPv6 version.
        5 => {
            if l3 < f.len() {
                f[l3] = match rng.below(3) {
                    0 => (f[l3] & 0xf0) | rng.below(16) as u8,
                    1 => (rng.below(16) as u8) << 4 | (f[l3] & 0x0f),
                    _ => rng.next() as u8,
                };
            }
        }
        // IPv4 fragment bits.
        6 if !t.v6 => {
            let v = match rng.below(4) {
                0 => 0x2000,
                1 => 0x4000,
                2 => 0x8000,
                _ => rng.next() as u16,
            };
            set16(f, l3 + 6, v);
        }
        // Protocol / next header.
        7 => {
            let at = if t.v6 { l3 + 6 } else { l3 + 9 };
            if at < f.len() {
                let any = rng.next() as u8;
                f[at] = rng.pick(&[0, 1, 6, 17, 43, 44, 50, 51, 58, 60, 135, any]);
            }
        }
        // Destination MAC.
        8 => {
            let mac: Mac = match rng.below(5) {
                0 => [0xff; 6],
                1 => [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01],
                2 => [0x33, 0x33, 0x00, 0x00, 0x00, 0x01],
                3 => [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
                _ => {
                    let mut m = ours;
                    m[rng.below(6)] ^= 1 << rng.below(8);
                    m
                }
            };
            f[..6].copy_from_slice(&mac);
        }
        // The ethertype (or TPID) in place.
        9 => {
            let at = if rng.chance(2) { 12 } else { l3 - 2 };
            let v = rng.pick(&[
                ETH_P_IP,
                ETH_P_IPV6,
                ETH_P_8021Q,
                ETH_P_8021AD,
                0x9100,
                ETH_P_ARP,
                0x0005,
            ]);
            set16(f, at, v);
        }
        // Addresses and ports: to other VIPs, ports and families.
        10 => {
            let (dst, len) = if t.v6 { (l3 + 24, 16) } else { (l3 + 16, 4) };
            if dst + len <= f.len() {
                f[dst + len - 1] = rng.pick(&[0x10, 0x14, 0x28, 0x99, 0x01]);
            }
        }
        11 => set16(f, l4 + 2, rng.pick(&[80, 53, 443, 8080, 81, 0])),
        // TCP flags, ICMP type and code.
        12 => {
            if l4 + 13 < f.len() && t.proto == PROTO_TCP {
                f[l4 + 13] = rng.next() as u8;
            } else if t.inner.is_some() && l4 + 1 < f.len() {
                let any = rng.next() as u8;
                f[l4] = rng.pick(&[1, 2, 3, 4, 8, 11, 128, any]);
                f[l4 + 1] = rng.below(16) as u8;
            }
        }
        // Any byte of the headers.
        _ => {
            let at = rng.below(f.len().min(l4 + 60));
            f[at] = if rng.chance(2) { rng.next() as u8 } else { f[at] ^ (1 << rng.below(8)) };
        }
    }
}

/// Changes that move offsets: tags in and out, truncation, trailing bytes.
fn mutate_shape(rng: &mut Rng, f: &mut Vec<u8>) {
    match rng.below(4) {
        0 => {
            let tpid = rng.pick(&[ETH_P_8021Q, ETH_P_8021AD, 0x9100]);
            let tag = [(tpid >> 8) as u8, tpid as u8, 0, rng.below(4095) as u8];
            f.splice(12..12, tag);
        }
        1 if f.len() >= 18 => {
            f.drain(12..16);
        }
        2 => {
            let at = 14 + rng.below(f.len() - 13);
            f.truncate(at);
        }
        _ => {
            let n = 1 + rng.below(64);
            f.extend((0..n).map(|_| rng.next() as u8));
        }
    }
}

fn frame(rng: &mut Rng, templates: &[Template], ours: Mac) -> Vec<u8> {
    if rng.chance(50) {
        // Random bytes, half of them addressed to us.
        let mut f: Vec<u8> = (0..14 + rng.below(120)).map(|_| rng.next() as u8).collect();
        if rng.chance(2) {
            f[..6].copy_from_slice(&ours);
            f[12..14].copy_from_slice(&rng.pick(&[ETH_P_IP, ETH_P_IPV6]).to_be_bytes());
        }
        return f;
    }
    let t = &templates[rng.below(templates.len())];
    let mut f = t.frame.clone();
    // A fifth go through untouched: the well-formed ones must be forwarded.
    let fields = if rng.chance(5) { 0 } else { 1 + rng.below(3) };
    for _ in 0..fields {
        mutate_field(rng, t, &mut f, ours);
    }
    if rng.chance(4) {
        mutate_shape(rng, &mut f);
    }
    f
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
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
        table_size: 251,
        backends: backends
            .iter()
            .map(|&(a, m)| BackendSpec::new(a.parse().unwrap(), [0x02, 0xbb, 0, 0, 0, m]))
            .collect(),
        pin_all_flows: false,
        stage: Stage::Ingress,
    }
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn xdp_agrees_with_etherparse() {
    require_root();
    let seed: u64 = std::env::var("KDSR_FUZZ_SEED").map_or(0x6b64_7372, |s| s.parse().unwrap());
    let frames: u64 = std::env::var("KDSR_FUZZ_FRAMES").map_or(1_000_000, |s| s.parse().unwrap());

    let ns = NetNs::new("kdsrfz").unwrap();
    ns.exec("ip link add dsr0 type veth peer name dsr1 && ip link add dsr2 type veth peer name dsr3 && for i in 0 1 2 3; do ip link set dsr$i up; done").unwrap();
    let pins = PinDir::new().unwrap();
    let mut cfg = Config::new("dsr0");
    cfg.pin_dir = pins.path.clone();
    cfg.capacity =
        kube_dsr_agent::dataplane::Capacity { services: 8, backends: 64, ring_chunks: 16 };
    cfg.conn_entries = 4096;
    let mut dp = ns.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
    let ours = ns.mac("dsr0").unwrap();
    let egress = Egress {
        ifindex: ns.exec("cat /sys/class/net/dsr2/ifindex").unwrap().trim().parse().unwrap(),
        mac: ns.mac("dsr2").unwrap(),
    };

    let mut far =
        service("default/far/v4", "192.0.2.40", &[(8080, Protocol::Udp)], &[("10.0.2.1", 0x31)]);
    far.backends[0].egress = Some(egress);
    let specs = [
        service(
            "default/web/v4",
            "192.0.2.10",
            &[(80, Protocol::Tcp), (53, Protocol::Udp)],
            &[("10.0.0.11", 0x11), ("10.0.0.12", 0x12), ("10.0.0.13", 0x13)],
        ),
        service(
            "default/web/v6",
            "2001:db8::10",
            &[(443, Protocol::Tcp), (443, Protocol::Udp)],
            &[("fd00::11", 0x61), ("fd00::12", 0x62)],
        ),
        service("default/empty/v4", "192.0.2.20", &[(80, Protocol::Tcp)], &[]),
        far,
    ];
    let mut vips = HashMap::new();
    for s in &specs {
        dp.upsert_service(s).unwrap();
        let dest = Dest {
            to: s.backends.iter().map(|b| b.mac).collect(),
            src: s.backends.first().and_then(|b| b.egress).map_or(ours, |e| e.mac),
            redirect: s.backends.iter().any(|b| b.egress.is_some()),
        };
        for p in &s.ports {
            let proto = match p.protocol {
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
            };
            vips.insert((s.vip, p.port, proto), dest.clone());
        }
    }

    let mut prog = EbpfLoader::new()
        .default_map_pin_directory(&pins.path)
        .load(kube_dsr_agent::dataplane::object())
        .unwrap();
    let xdp: &mut Xdp = prog.program_mut("kube_dsr").unwrap().try_into().unwrap();
    xdp.load().unwrap();
    let xdp: &Xdp = prog.program("kube_dsr").unwrap().try_into().unwrap();

    let templates = templates(ours);
    let mut rng = Rng(seed);
    let mut out = vec![0u8; 4096];
    // (class, verdict) -> frames
    let mut seen: HashMap<(&str, u32), u64> = HashMap::new();
    let started = Instant::now();
    for i in 0..frames {
        let f = frame(&mut rng, &templates, ours);
        let class = classify(&f, ours, &vips);
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap();
        let got = &out[..r.data_size_out as usize];
        let verdict = r.return_value;
        let fail = |why: &str| -> ! {
            panic!(
                "disagreement at frame {i} (KDSR_FUZZ_SEED={seed}): {why}\n\
                 etherparse: {class:?}; XDP verdict {verdict}\nframe in ({} bytes):\n{}\n\
                 frame out ({} bytes):\n{}",
                f.len(),
                hex(&f),
                got.len(),
                hex(got)
            )
        };
        let transmitted = verdict == XDP_TX || verdict == XDP_REDIRECT;
        let label = match &class {
            Class::Vip(addr, port, proto) => {
                let dest = &vips[&(*addr, *port, *proto)];
                if dest.to.is_empty() {
                    if verdict != XDP_DROP {
                        fail("a frame for a service without backends must be dropped");
                    }
                } else {
                    let want = if dest.redirect { XDP_REDIRECT } else { XDP_TX };
                    if verdict != want {
                        fail(
                            "a well-formed VIP frame for a service with backends was not forwarded",
                        );
                    }
                    if got.len() != f.len()
                        || got[12..] != f[12..]
                        || got[6..12] != dest.src
                        || !dest.to.iter().any(|m| got[..6] == m[..])
                    {
                        fail("the forwarded frame differs in more than the Ethernet addresses");
                    }
                }
                "vip"
            }
            Class::NotVip => {
                if verdict != XDP_PASS || got != &f[..] {
                    fail("a well-formed frame to no VIP must pass unchanged");
                }
                "not_vip"
            }
            Class::Other => {
                if transmitted {
                    fail("transmitted a frame etherparse does not accept as a VIP flow");
                }
                if verdict == XDP_PASS && got != &f[..] {
                    fail("a passed frame was modified");
                }
                if verdict != XDP_PASS && verdict != XDP_DROP {
                    fail("unexpected verdict");
                }
                "other"
            }
        };
        *seen.entry((label, verdict)).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let mut summary: Vec<_> = seen.iter().collect();
    summary.sort();
    eprintln!(
        "{frames} frames (seed {seed}) in {:.1} s: {summary:?}; reasons: {:?}",
        elapsed.as_secs_f64(),
        dp.reason_counts().unwrap().into_iter().filter(|r| r.1 > 0).collect::<Vec<_>>()
    );
    // Both directions must have been exercised in earnest.
    let count =
        |label: &str| seen.iter().filter(|(k, _)| k.0 == label).map(|(_, n)| *n).sum::<u64>();
    assert!(count("vip") * 10 > frames, "too few well-formed VIP frames: {summary:?}");
    assert!(count("other") * 2 > frames, "too few malformed frames: {summary:?}");
    assert!(count("not_vip") > frames / 100, "too few non-VIP frames: {summary:?}");
}
