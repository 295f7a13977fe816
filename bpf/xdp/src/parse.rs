//! Header parsing: from a frame to either a flow key or a reason to pass.
//!
//! Every read is bounds-checked against `data_end` before it happens (the
//! verifier insists, and a truncated frame must never be forwarded). Beyond
//! that, a flow is only produced for a frame that is addressed to this
//! interface's own MAC and whose length fields agree with each other and
//! with the frame: IPv4 total length and IPv6 payload length within the
//! frame, TCP data offset and UDP length within the IP payload, and the
//! quoted headers of ICMP errors as far as they are used. Checksums are not
//! verified: the backend's kernel does that, and the frame reaches it
//! unchanged.
//!
//! Malformed IP lengths are passed: the kernel's own IP input drops them
//! (and counts them) before routing. A malformed TCP or UDP header is not
//! the IP layer's business, so a node that routes would send it on towards
//! the VIP's route; such a flow is marked `bad` and the caller drops it once
//! the VIP lookup says it is ours (a non-VIP one is the kernel's, as ever).

use aya_ebpf::programs::XdpContext;
use kube_dsr_common::{ConnKey4, ConnKey6, PROTO_TCP, PROTO_UDP, VipKey4, VipKey6, reason};

use crate::META;

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_LEN: usize = 8;
/// What an ICMP error must quote of the inner L4 header (RFC 792's 64
/// bits); the ports are its first four bytes.
const QUOTE_L4_LEN: usize = 8;

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// What the rest of the program needs to know about a frame.
pub enum Parsed {
    Pass(u32),
    V4(Flow<V4>),
    V6(Flow<V6>),
}

/// A TCP/UDP flow towards a possible VIP, written the client's way round
/// (for an ICMP error the inner packet is turned around first).
pub struct Flow<K> {
    pub keys: K,
    pub icmp: bool,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub syn: bool,
    /// 0, or the reason this flow's TCP/UDP header is malformed: to be
    /// dropped if it is a VIP flow (see the module comment).
    pub bad: u32,
}

/// IPv4 lookup keys; the connection key's service is filled in once the VIP
/// is known.
pub struct V4 {
    pub vip: VipKey4,
    pub conn: ConnKey4,
}

pub struct V6 {
    pub vip: VipKey6,
    pub conn: ConnKey6,
}

// Header layouts. Multi-byte fields are words holding wire bytes; the
// object is built with misaligned access allowed (see .cargo/config.toml),
// so each field is one load even where the packet leaves it unaligned.

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    vtcfl: u32,
    payload_len: u16,
    nexthdr: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// Source and destination ports: the first four bytes of TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    src: u16,
    dst: u16,
}

/// The TCP fields up to the flags byte.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    ports: Ports,
    seq: u32,
    ack: u32,
    off: u8,
    flags: u8,
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    rest: u32,
}

/// A copy of the `T` at `off`, if the whole `T` lies inside the frame.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the `size_of::<T>()` bytes at `start + off` lie inside the
    // packet (checked above); `T` is plain data read without alignment.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

macro_rules! get {
    ($ctx:expr, $ty:ty, $off:expr) => {
        match read::<$ty>($ctx, $off) {
            Some(v) => v,
            None => return Parsed::Pass(reason::PASS_TRUNCATED),
        }
    };
}

const fn be16(v: u16) -> u16 {
    u16::from_be(v)
}

/// Parses a frame; a flow comes out only for a frame sent to this
/// interface's unicast MAC (a frame flooded by a bridge, seen in
/// promiscuous mode, or sent to broadcast or multicast belongs to someone
/// else, or to everyone: forwarding it would send the backend a copy).
/// The MAC is checked once the frame is known to be IP, so ARP and other
/// non-IP broadcasts still count as `PASS_NOT_IP`.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let mut ethertype = be16(get!(ctx, u16, 12));
    let mut l3 = ETH_LEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(get!(ctx, u16, ETH_LEN + 2));
        l3 += VLAN_LEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Parsed::Pass(reason::PASS_VLAN_STACK);
        }
    }
    match ethertype {
        ETH_P_IP | ETH_P_IPV6 if !to_us(ctx) => Parsed::Pass(reason::PASS_NOT_OUR_MAC),
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => Parsed::Pass(reason::PASS_NOT_IP),
    }
}

/// Whether the destination MAC is the attach interface's, recorded in META
/// by user space when it attached the program. A zero (unset) META matches
/// no frame a NIC would deliver as ours.
#[inline(always)]
fn to_us(ctx: &XdpContext) -> bool {
    let Some(meta) = META.get(0) else { return false };
    let Some(dst) = read::<[u32; 2]>(ctx, 0) else { return false };
    // SAFETY: `mac` is 8 bytes; the last two are zero padding.
    let ours = unsafe { core::ptr::read_unaligned(meta.mac.as_ptr() as *const [u32; 2]) };
    dst[0] == ours[0]
        && (dst[1] ^ ours[1]) & u32::from_ne_bytes([0xff, 0xff, 0, 0]) == 0
        && ours != [0, 0]
}

/// Bytes from `off` to the end of the frame.
#[inline(always)]
fn room(ctx: &XdpContext, off: usize) -> usize {
    (ctx.data_end() - ctx.data()).saturating_sub(off)
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Parsed {
    let ip = get!(ctx, Ipv4Hdr, l3);
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Parsed::Pass(reason::PASS_TRUNCATED);
    }
    if ip.vihl & 0x0f != 5 {
        return Parsed::Pass(reason::PASS_IP_OPTIONS);
    }
    // The frame may be longer than the packet (Ethernet pads short frames
    // to 60 bytes), never shorter; and the packet holds at least its header.
    let total = be16(ip.tot_len) as usize;
    if total < IPV4_LEN || total > room(ctx, l3) {
        return Parsed::Pass(reason::PASS_IP_LEN);
    }
    // More-fragments flag or a non-zero offset.
    if be16(ip.frag_off) & 0x3fff != 0 {
        return Parsed::Pass(reason::PASS_FRAGMENT);
    }
    let l4 = l3 + IPV4_LEN;
    match ip.proto {
        PROTO_TCP | PROTO_UDP => {
            let Some((ports, syn, bad)) = l4_ports(ctx, l4, total - IPV4_LEN, ip.proto) else {
                return Parsed::Pass(reason::PASS_TRUNCATED);
            };
            let mut flow = flow4(ip.daddr, ip.saddr, ports.dst, ports.src, ip.proto, false, syn);
            flow.bad = bad;
            Parsed::V4(flow)
        }
        PROTO_ICMP => icmp4(ctx, &ip, l4, total - IPV4_LEN),
        _ => Parsed::Pass(reason::PASS_OTHER_L4),
    }
}

/// ICMP destination-unreachable (fragmentation needed among them) about a
/// packet a backend sent from the VIP: route it to that flow's backend, so
/// path-MTU discovery works through the load balancer. `len` is the ICMP
/// message's length by the outer IP header.
#[inline(always)]
fn icmp4(ctx: &XdpContext, outer: &Ipv4Hdr, l4: usize, len: usize) -> Parsed {
    let icmp = get!(ctx, IcmpHdr, l4);
    if icmp.kind != ICMP_DEST_UNREACH {
        return Parsed::Pass(reason::PASS_OTHER_L4);
    }
    let inner_off = l4 + ICMP_LEN;
    let inner = get!(ctx, Ipv4Hdr, inner_off);
    if inner.vihl != 0x45
        || inner.saddr != outer.daddr
        || (inner.proto != PROTO_TCP && inner.proto != PROTO_UDP)
    {
        return Parsed::Pass(reason::PASS_ICMP_NOT_VIP);
    }
    // The quote lies inside the outer packet, and describes a packet that
    // carried the quoted L4 bytes: only a first fragment has ports.
    if len < ICMP_LEN + IPV4_LEN + QUOTE_L4_LEN
        || (be16(inner.tot_len) as usize) < IPV4_LEN + QUOTE_L4_LEN
        || be16(inner.frag_off) & 0x1fff != 0
    {
        return Parsed::Pass(reason::PASS_ICMP_QUOTE);
    }
    let ports = get!(ctx, Ports, inner_off + IPV4_LEN);
    // The inner packet went VIP -> client; the flow key is client -> VIP.
    Parsed::V4(flow4(inner.saddr, inner.daddr, ports.src, ports.dst, inner.proto, true, false))
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Parsed {
    let ip = get!(ctx, Ipv6Hdr, l3);
    if ip.vtcfl.to_ne_bytes()[0] >> 4 != 6 {
        return Parsed::Pass(reason::PASS_TRUNCATED);
    }
    let l4 = l3 + IPV6_LEN;
    let len = be16(ip.payload_len) as usize;
    if len > room(ctx, l4) {
        return Parsed::Pass(reason::PASS_IP_LEN);
    }
    match ip.nexthdr {
        PROTO_TCP | PROTO_UDP => {
            let Some((ports, syn, bad)) = l4_ports(ctx, l4, len, ip.nexthdr) else {
                return Parsed::Pass(reason::PASS_TRUNCATED);
            };
            let mut flow =
                flow6(&ip.daddr, &ip.saddr, ports.dst, ports.src, ip.nexthdr, false, syn);
            flow.bad = bad;
            Parsed::V6(flow)
        }
        PROTO_ICMPV6 => icmp6(ctx, &ip, l4, len),
        44 => Parsed::Pass(reason::PASS_FRAGMENT),
        // Hop-by-hop, routing, destination options, AH, mobility, HIP, shim6.
        0 | 43 | 60 | 51 | 135 | 139 | 140 => Parsed::Pass(reason::PASS_IPV6_EXT),
        _ => Parsed::Pass(reason::PASS_OTHER_L4),
    }
}

#[inline(always)]
fn icmp6(ctx: &XdpContext, outer: &Ipv6Hdr, l4: usize, len: usize) -> Parsed {
    let icmp = get!(ctx, IcmpHdr, l4);
    if icmp.kind != ICMPV6_PKT_TOOBIG && icmp.kind != ICMPV6_DEST_UNREACH {
        return Parsed::Pass(reason::PASS_OTHER_L4);
    }
    let inner_off = l4 + ICMP_LEN;
    let inner = get!(ctx, Ipv6Hdr, inner_off);
    if inner.saddr != outer.daddr || (inner.nexthdr != PROTO_TCP && inner.nexthdr != PROTO_UDP) {
        return Parsed::Pass(reason::PASS_ICMP_NOT_VIP);
    }
    if inner.vtcfl.to_ne_bytes()[0] >> 4 != 6
        || len < ICMP_LEN + IPV6_LEN + QUOTE_L4_LEN
        || (be16(inner.payload_len) as usize) < QUOTE_L4_LEN
    {
        return Parsed::Pass(reason::PASS_ICMP_QUOTE);
    }
    let ports = get!(ctx, Ports, inner_off + IPV6_LEN);
    Parsed::V6(flow6(&inner.saddr, &inner.daddr, ports.src, ports.dst, inner.nexthdr, true, false))
}

/// The ports of a TCP or UDP packet whose whole fixed header is in the
/// frame, whether it opens a TCP connection, and 0 or why its header does
/// not fit the `len` bytes the IP header gives it.
#[inline(always)]
fn l4_ports(ctx: &XdpContext, l4: usize, len: usize, proto: u8) -> Option<(Ports, bool, u32)> {
    if proto == PROTO_TCP {
        if ctx.data() + l4 + TCP_LEN > ctx.data_end() {
            return None;
        }
        let t = read::<TcpHead>(ctx, l4)?;
        let header = usize::from(t.off >> 4) * 4;
        let bad = if header < TCP_LEN || header > len { reason::DROP_TCP_LEN } else { 0 };
        Some((t.ports, t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN, bad))
    } else {
        if ctx.data() + l4 + UDP_LEN > ctx.data_end() {
            return None;
        }
        let u = read::<[u16; 4]>(ctx, l4)?;
        let ulen = be16(u[2]) as usize;
        let bad = if ulen < UDP_LEN || ulen > len { reason::DROP_UDP_LEN } else { 0 };
        Some((Ports { src: u[0], dst: u[1] }, false, bad))
    }
}

#[inline(always)]
fn flow4(
    vip: u32,
    client: u32,
    vport: u16,
    cport: u16,
    proto: u8,
    icmp: bool,
    syn: bool,
) -> Flow<V4> {
    Flow {
        keys: V4 {
            vip: VipKey4 { addr: vip, port: vport, proto, _pad: 0 },
            conn: ConnKey4 { saddr: client, sport: cport, dport: vport, svc_proto: proto as u32 },
        },
        icmp,
        syn,
        bad: 0,
    }
}

#[inline(always)]
fn flow6(
    vip: &[u32; 4],
    client: &[u32; 4],
    vport: u16,
    cport: u16,
    proto: u8,
    icmp: bool,
    syn: bool,
) -> Flow<V6> {
    Flow {
        keys: V6 {
            vip: VipKey6 { addr: *vip, port: vport, proto, _pad: 0 },
            conn: ConnKey6 { saddr: *client, sport: cport, dport: vport, svc_proto: proto as u32 },
        },
        icmp,
        syn,
        bad: 0,
    }
}
