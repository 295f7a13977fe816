//! Frame builders for packet fixtures and traffic generators.
//!
//! Deliberately hand-written: fixtures need malformed frames (IP options,
//! fragments, truncation at every header) that packet libraries refuse to
//! build. Checksums are filled in where a receiver would check them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub type Mac = [u8; 6];

/// Ethernet header, with VLAN tags (outermost first) between the addresses
/// and the ethertype.
pub fn eth(dst: Mac, src: Mac, tags: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for &(tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// IPv4 header options.
#[derive(Clone, Debug, Default)]
pub struct V4Opts {
    /// Raw option bytes (padded to a multiple of 4).
    pub options: Vec<u8>,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub frag_offset: u16,
    pub version: Option<u8>,
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], o: &V4Opts) -> Vec<u8> {
    let mut opts = o.options.clone();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 5 + opts.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut h = vec![0u8; 20];
    h[0] = (o.version.unwrap_or(4) << 4) | ihl as u8;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    let frag = (u16::from(o.more_fragments) << 13) | o.frag_offset;
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend_from_slice(&opts);
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A TCP header (20 bytes, given flags) plus payload. Checksum over the
/// pseudo-header of `src`/`dst`.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = l4_checksum(src, dst, PROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    let c = l4_checksum(src, dst, PROTO_UDP, &u);
    u[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    u
}

/// ICMP (v4) message: type, code, the 4 "rest of header" bytes, body.
pub fn icmp4(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// ICMPv6 message with its pseudo-header checksum.
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = l4_checksum(src.into(), dst.into(), PROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ARP request for `target` from `sender`.
pub fn arp_request(src_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = eth([0xff; 6], src_mac, &[], ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A whole TCP/IP frame (IPv4 or IPv6 by address family).
pub fn tcp_frame(dst: Mac, src: Mac, from: (IpAddr, u16), to: (IpAddr, u16), flags: u8) -> Vec<u8> {
    let seg = tcp(from.0, to.0, from.1, to.1, flags, b"");
    l3_frame(dst, src, &[], from.0, to.0, PROTO_TCP, &seg)
}

/// A whole UDP/IP frame.
pub fn udp_frame(
    dst: Mac,
    src: Mac,
    from: (IpAddr, u16),
    to: (IpAddr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let dgram = udp(from.0, to.0, from.1, to.1, payload);
    l3_frame(dst, src, &[], from.0, to.0, PROTO_UDP, &dgram)
}

/// Ethernet + IP header around an L4 payload.
pub fn l3_frame(
    dst: Mac,
    src: Mac,
    tags: &[(u16, u16)],
    from: IpAddr,
    to: IpAddr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut f = eth(dst, src, tags, ETH_P_IP);
            f.extend(ipv4(s, d, proto, l4, &V4Opts::default()));
            f
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut f = eth(dst, src, tags, ETH_P_IPV6);
            f.extend(ipv6(s, d, proto, l4));
            f
        }
        _ => panic!("mixed address families"),
    }
}

/// The Internet checksum of the concatenated parts.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(len as u16).to_be_bytes());
            checksum(&[&pseudo, segment])
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&len.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
            checksum(&[&pseudo, segment])
        }
        _ => panic!("mixed address families"),
    }
}

/// XDP verdicts as `BPF_PROG_TEST_RUN` returns them (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The client's MAC in the packet tests.
pub const CLIENT_MAC: Mac = [0x02, 0xcc, 0, 0, 0, 0x01];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let h =
            ipv4([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), PROTO_UDP, b"", &V4Opts::default());
        assert_eq!(checksum(&[&h[..20]]), 0);
    }

    #[test]
    fn udp_checksum_verifies_with_pseudo_header() {
        let s: IpAddr = "2001:db8::1".parse().unwrap();
        let d: IpAddr = "2001:db8::2".parse().unwrap();
        let u = udp(s, d, 1000, 53, b"hello");
        assert_eq!(l4_checksum(s, d, PROTO_UDP, &u), 0);
    }
}
