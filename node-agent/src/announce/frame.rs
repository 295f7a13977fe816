//! Pure frame handling: parsing ARP requests and neighbour solicitations,
//! building ARP replies, gratuitous ARP and neighbour advertisements, and
//! the ICMPv6 checksum. Nothing here touches a socket; every function takes
//! and returns bytes, and no input can make one panic.
//!
//! Frames are Ethernet II without a VLAN tag: the packet socket is bound to
//! one interface, and a VLAN's frames reach the VLAN's own interface
//! untagged.

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethernet header + the 28-byte ARP payload for IPv4 over Ethernet.
pub const ARP_FRAME_LEN: usize = ETH_HLEN + 28;
pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMPV6_NS: u8 = 135;
pub const ICMPV6_NA: u8 = 136;
/// Neighbour discovery messages are only valid with this hop limit: it
/// proves they were not forwarded by a router (RFC 4861 §7.1).
pub const ND_HOP_LIMIT: u8 = 255;
/// NS and NA bodies: type, code, checksum, 4 bytes, the target (24 bytes).
const ND_BODY_LEN: usize = 24;
const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;
/// A neighbour advertisement with one target link-layer address option.
pub const NA_FRAME_LEN: usize = ETH_HLEN + IPV6_HLEN + ND_BODY_LEN + 8;

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// Neighbour advertisement flags (first byte after the checksum).
pub const NA_ROUTER: u8 = 0x80;
pub const NA_SOLICITED: u8 = 0x40;
pub const NA_OVERRIDE: u8 = 0x20;

/// Why a frame was not taken. `Malformed` frames are counted as such;
/// `NotRequest` ones are valid traffic the announcer has no business with
/// (the socket filters keep them out, so seeing one is unusual, not bad).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Malformed(&'static str),
    NotRequest(&'static str),
}

/// An ARP request for an IPv4 address, over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRequest {
    pub sender_mac: Mac,
    /// `0.0.0.0` for an RFC 5227 probe.
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

impl ArpRequest {
    /// A gratuitous request: someone announcing `target_ip` for itself.
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    b.get(at..at + 6)?.try_into().ok()
}

fn v4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

fn v6_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(o))
}

/// A MAC that can be a frame's unicast destination.
fn is_unicast(mac: &Mac) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

/// Parses an Ethernet frame carrying an ARP request (IPv4 over Ethernet).
pub fn parse_arp_request(frame: &[u8]) -> Result<ArpRequest, Reject> {
    use Reject::*;
    if frame.len() < ARP_FRAME_LEN {
        return Err(Malformed("ARP frame shorter than 42 bytes"));
    }
    let field = |at| be16(frame, at).ok_or(Malformed("truncated"));
    if field(12)? != ETHERTYPE_ARP {
        return Err(NotRequest("not ARP"));
    }
    if field(14)? != 1 || field(16)? != ETHERTYPE_IPV4 || frame[18] != 6 || frame[19] != 4 {
        return Err(Malformed("ARP not for IPv4 over Ethernet"));
    }
    if field(20)? != ARP_REQUEST {
        return Err(NotRequest("ARP operation is not a request"));
    }
    let sender_mac = mac_at(frame, 22).ok_or(Malformed("truncated"))?;
    if !is_unicast(&sender_mac) {
        return Err(Malformed("ARP sender hardware address is not unicast"));
    }
    let sender_ip = v4_at(frame, 28).ok_or(Malformed("truncated"))?;
    let target_ip = v4_at(frame, 38).ok_or(Malformed("truncated"))?;
    Ok(ArpRequest { sender_mac, sender_ip, target_ip })
}

fn arp_frame(
    eth_dst: Mac,
    op: u16,
    sha: Mac,
    spa: Ipv4Addr,
    tha: Mac,
    tpa: Ipv4Addr,
) -> [u8; ARP_FRAME_LEN] {
    let mut f = [0u8; ARP_FRAME_LEN];
    f[0..6].copy_from_slice(&eth_dst);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa.octets());
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa.octets());
    f
}

/// The reply to `req` saying `req.target_ip` is at `mac`, sent to the
/// requester's hardware address (as the kernel does).
pub fn arp_reply(mac: Mac, req: &ArpRequest) -> [u8; ARP_FRAME_LEN] {
    arp_frame(req.sender_mac, ARP_REPLY, mac, req.target_ip, req.sender_mac, req.sender_ip)
}

/// A broadcast gratuitous ARP request for `vip` at `mac` (sender and
/// target protocol address both `vip`, target hardware address zero, as
/// RFC 5227 §3 describes an announcement).
pub fn gratuitous_request(mac: Mac, vip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    arp_frame(BROADCAST, ARP_REQUEST, mac, vip, [0; 6], vip)
}

/// A broadcast gratuitous ARP reply for `vip` at `mac`. The target hardware
/// address repeats the sender's: Linux takes a reply as gratuitous (and
/// lets it override an entry within `locktime`) only then.
pub fn gratuitous_reply(mac: Mac, vip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    arp_frame(BROADCAST, ARP_REPLY, mac, vip, mac, vip)
}

/// The internet checksum of an ICMPv6 message with its pseudo-header
/// (RFC 8200 §8.1). Over a message whose checksum field holds the right
/// value, the result is 0.
pub fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u64::from);
            sum += hi | lo;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The solicited-node multicast group of `addr` (RFC 4291 §2.7.1):
/// `ff02::1:ff` and its low 24 bits.
pub fn solicited_node(addr: &Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet address an IPv6 multicast group maps to (RFC 2464 §7).
pub fn multicast_mac(group: &Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// A neighbour solicitation, validated as RFC 4861 §7.1.1 requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighborSolicitation {
    pub eth_src: Mac,
    /// `::` for duplicate address detection.
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub target: Ipv6Addr,
    pub source_lladdr: Option<Mac>,
}

impl NeighborSolicitation {
    /// Duplicate address detection: the sender has no address yet.
    pub fn is_dad(&self) -> bool {
        self.src.is_unspecified()
    }
}

/// Parses an Ethernet frame carrying an ICMPv6 neighbour solicitation
/// directly after the IPv6 header (no extension headers: neighbour
/// discovery never needs them, and the socket filter only lets through
/// frames without them).
pub fn parse_neighbor_solicitation(frame: &[u8]) -> Result<NeighborSolicitation, Reject> {
    use Reject::*;
    let ip = ETH_HLEN;
    let icmp = ip + IPV6_HLEN;
    if frame.len() < icmp + ND_BODY_LEN {
        return Err(Malformed("frame too short for a neighbour solicitation"));
    }
    if be16(frame, 12) != Some(ETHERTYPE_IPV6) {
        return Err(NotRequest("not IPv6"));
    }
    if frame[ip] >> 4 != 6 {
        return Err(Malformed("IP version is not 6"));
    }
    if frame[ip + 6] != IPPROTO_ICMPV6 {
        return Err(NotRequest("not ICMPv6 (or behind an extension header)"));
    }
    if frame[icmp] != ICMPV6_NS {
        return Err(NotRequest("not a neighbour solicitation"));
    }
    if frame[ip + 7] != ND_HOP_LIMIT {
        return Err(Malformed("hop limit is not 255"));
    }
    let payload_len = usize::from(be16(frame, ip + 4).ok_or(Malformed("truncated"))?);
    // Ethernet pads short frames, so the frame may be longer than the
    // packet, never shorter.
    let message = frame.get(icmp..icmp + payload_len).ok_or(Malformed("truncated IPv6 payload"))?;
    if message.len() < ND_BODY_LEN {
        return Err(Malformed("ICMPv6 length below 24"));
    }
    if message[1] != 0 {
        return Err(Malformed("ICMPv6 code is not 0"));
    }
    let src = v6_at(frame, ip + 8).ok_or(Malformed("truncated"))?;
    let dst = v6_at(frame, ip + 24).ok_or(Malformed("truncated"))?;
    if icmpv6_checksum(&src, &dst, message) != 0 {
        return Err(Malformed("bad ICMPv6 checksum"));
    }
    let target = v6_at(message, 8).ok_or(Malformed("truncated"))?;
    if target.is_multicast() {
        return Err(Malformed("target is a multicast address"));
    }
    if src.is_multicast() {
        return Err(Malformed("source is a multicast address"));
    }
    let mut source_lladdr = None;
    let mut opts = &message[ND_BODY_LEN..];
    while !opts.is_empty() {
        let (kind, units) = match opts {
            [kind, units, ..] => (*kind, usize::from(*units)),
            _ => return Err(Malformed("truncated option")),
        };
        if units == 0 {
            return Err(Malformed("option with length 0"));
        }
        let opt = opts.get(..units * 8).ok_or(Malformed("option longer than the message"))?;
        if kind == OPT_SOURCE_LLADDR {
            // Ethernet: exactly one unit (RFC 2464 §6).
            if units != 1 {
                return Err(Malformed("source link-layer address option is not 8 bytes"));
            }
            source_lladdr = mac_at(opt, 2);
        }
        opts = &opts[opt.len()..];
    }
    let eth_src = mac_at(frame, 6).ok_or(Malformed("truncated"))?;
    if src.is_unspecified() {
        if dst != solicited_node(&target) {
            return Err(Malformed("DAD solicitation not sent to the solicited-node group"));
        }
        if source_lladdr.is_some() {
            return Err(Malformed("DAD solicitation with a source link-layer address"));
        }
    }
    if let Some(lladdr) = source_lladdr
        && !is_unicast(&lladdr)
    {
        return Err(Malformed("source link-layer address is not unicast"));
    }
    if !is_unicast(&eth_src) {
        return Err(Malformed("Ethernet source is not unicast"));
    }
    Ok(NeighborSolicitation { eth_src, src, dst, target, source_lladdr })
}

/// A neighbour advertisement from `mac` for `target`, sent from the target
/// address itself (the VIP is no address of the interface, so there is no
/// better one to use; RFC 4861 §7.1.2 puts no condition on the source).
fn advertisement(
    mac: Mac,
    target: Ipv6Addr,
    eth_dst: Mac,
    dst: Ipv6Addr,
    flags: u8,
) -> [u8; NA_FRAME_LEN] {
    let mut f = [0u8; NA_FRAME_LEN];
    f[0..6].copy_from_slice(&eth_dst);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    let ip = ETH_HLEN;
    f[ip] = 0x60;
    let payload_len = (ND_BODY_LEN + 8) as u16;
    f[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
    f[ip + 6] = IPPROTO_ICMPV6;
    f[ip + 7] = ND_HOP_LIMIT;
    f[ip + 8..ip + 24].copy_from_slice(&target.octets());
    f[ip + 24..ip + 40].copy_from_slice(&dst.octets());
    let icmp = ip + IPV6_HLEN;
    f[icmp] = ICMPV6_NA;
    f[icmp + 4] = flags;
    f[icmp + 8..icmp + 24].copy_from_slice(&target.octets());
    f[icmp + 24] = OPT_TARGET_LLADDR;
    f[icmp + 25] = 1;
    f[icmp + 26..icmp + 32].copy_from_slice(&mac);
    let sum = icmpv6_checksum(&target, &dst, &f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The answer to `ns` saying its target is at `mac` (RFC 4861 §7.2.4):
/// to the solicitor with S and O set; for duplicate address detection
/// (source `::`) to all nodes (`ff02::1`) with S clear.
pub fn neighbor_advertisement(mac: Mac, ns: &NeighborSolicitation) -> [u8; NA_FRAME_LEN] {
    if ns.is_dad() {
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        advertisement(mac, ns.target, multicast_mac(&all_nodes), all_nodes, NA_OVERRIDE)
    } else {
        // Without a source link-layer address option (a unicast probe
        // from a neighbour that already has our MAC) the frame's source
        // is the solicitor.
        let eth_dst = ns.source_lladdr.unwrap_or(ns.eth_src);
        advertisement(mac, ns.target, eth_dst, ns.src, NA_SOLICITED | NA_OVERRIDE)
    }
}

/// An unsolicited advertisement of `vip` at `mac` to all nodes, with O set
/// so neighbours replace the address they hold (RFC 4861 §7.2.6).
pub fn unsolicited_advertisement(mac: Mac, vip: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    advertisement(mac, vip, multicast_mac(&all_nodes), all_nodes, NA_OVERRIDE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: Mac = [0x02, 0, 0, 0, 0, 0xaa];
    const PEER: Mac = [0x02, 0, 0, 0, 0, 0xbb];

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn request(sha: Mac, spa: &str, tpa: &str) -> Vec<u8> {
        arp_frame(BROADCAST, ARP_REQUEST, sha, v4(spa), [0; 6], v4(tpa)).to_vec()
    }

    /// An NS as a Linux host sends it, built field by field (independently
    /// of `advertisement`), with the checksum from `icmpv6_checksum`.
    fn solicitation(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, opts: &[u8]) -> Vec<u8> {
        let mut icmp = vec![ICMPV6_NS, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        icmp.extend_from_slice(opts);
        let sum = icmpv6_checksum(&src, &dst, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut f = Vec::new();
        f.extend_from_slice(&multicast_mac(&dst));
        f.extend_from_slice(&PEER);
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&icmp);
        f
    }

    fn slla(mac: Mac) -> Vec<u8> {
        let mut o = vec![OPT_SOURCE_LLADDR, 1];
        o.extend_from_slice(&mac);
        o
    }

    #[test]
    fn checksum_of_a_known_packet() {
        // An NS for fd88::100 from fd88::1 (SLLA 02:00:00:00:00:bb). The
        // expected value was computed separately with a few lines of
        // Python (16-bit ones' complement sum over pseudo-header and
        // message); the e2e tests check the same function against the
        // solicitations a real kernel sends.
        let src = v6("fd88::1");
        let dst = v6("ff02::1:ff00:100");
        let mut msg = vec![ICMPV6_NS, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&v6("fd88::100").octets());
        msg.extend_from_slice(&slla(PEER));
        let sum = icmpv6_checksum(&src, &dst, &msg);
        assert_eq!(sum, 0x79d1);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(icmpv6_checksum(&src, &dst, &msg), 0);
        // An odd length is padded with a zero byte (the pseudo-header's
        // length differs by one, hence the + 1).
        assert_eq!(icmpv6_checksum(&src, &dst, &[1]), icmpv6_checksum(&src, &dst, &[1, 0]) + 1);
    }

    #[test]
    fn solicited_node_groups() {
        for (addr, group, mac) in [
            ("fd88::100", "ff02::1:ff00:100", [0x33, 0x33, 0xff, 0, 1, 0]),
            ("2001:db8::12:3456:789a", "ff02::1:ff56:789a", [0x33, 0x33, 0xff, 0x56, 0x78, 0x9a]),
            ("fe80::1", "ff02::1:ff00:1", [0x33, 0x33, 0xff, 0, 0, 1]),
        ] {
            assert_eq!(solicited_node(&v6(addr)), v6(group), "{addr}");
            assert_eq!(multicast_mac(&v6(group)), mac, "{addr}");
        }
    }

    #[test]
    fn parses_arp_requests() {
        let req = parse_arp_request(&request(PEER, "10.0.0.1", "10.0.0.100")).unwrap();
        assert_eq!(
            req,
            ArpRequest { sender_mac: PEER, sender_ip: v4("10.0.0.1"), target_ip: v4("10.0.0.100") }
        );
        assert!(!req.is_gratuitous());
        // Ethernet padding to 60 bytes is fine.
        let mut padded = request(PEER, "0.0.0.0", "10.0.0.100");
        padded.resize(60, 0);
        let probe = parse_arp_request(&padded).unwrap();
        assert_eq!(probe.sender_ip, Ipv4Addr::UNSPECIFIED);
        assert!(parse_arp_request(&request(PEER, "10.0.0.9", "10.0.0.9")).unwrap().is_gratuitous());
    }

    #[test]
    fn rejects_bad_arp() {
        let good = request(PEER, "10.0.0.1", "10.0.0.100");
        let with = |at: usize, bytes: &[u8]| {
            let mut f = good.clone();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            f
        };
        use Reject::*;
        for (frame, want) in [
            (good[..41].to_vec(), Malformed("ARP frame shorter than 42 bytes")),
            (vec![], Malformed("ARP frame shorter than 42 bytes")),
            (with(12, &[0x08, 0x00]), NotRequest("not ARP")),
            (with(14, &[0, 6]), Malformed("ARP not for IPv4 over Ethernet")),
            (with(16, &[0x86, 0xdd]), Malformed("ARP not for IPv4 over Ethernet")),
            (with(18, &[8]), Malformed("ARP not for IPv4 over Ethernet")),
            (with(19, &[16]), Malformed("ARP not for IPv4 over Ethernet")),
            (with(20, &[0, 2]), NotRequest("ARP operation is not a request")),
            (with(20, &[0, 3]), NotRequest("ARP operation is not a request")),
            (
                with(22, &[1, 0, 0x5e, 0, 0, 1]),
                Malformed("ARP sender hardware address is not unicast"),
            ),
            (with(22, &[0; 6]), Malformed("ARP sender hardware address is not unicast")),
            (with(22, &BROADCAST), Malformed("ARP sender hardware address is not unicast")),
        ] {
            assert_eq!(parse_arp_request(&frame), Err(want));
        }
    }

    #[test]
    fn arp_reply_answers_the_requester() {
        let req = parse_arp_request(&request(PEER, "10.0.0.1", "10.0.0.100")).unwrap();
        let r = arp_reply(OURS, &req);
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0x02, 0, 0, 0, 0, 0xbb, // to the requester
            0x02, 0, 0, 0, 0, 0xaa, // from us
            0x08, 0x06,
            0, 1, 0x08, 0x00, 6, 4, 0, 2, // Ethernet, IPv4, reply
            0x02, 0, 0, 0, 0, 0xaa, 10, 0, 0, 100, // VIP is at our MAC
            0x02, 0, 0, 0, 0, 0xbb, 10, 0, 0, 1, // to the requester
        ];
        assert_eq!(r, want);
    }

    #[test]
    fn gratuitous_forms() {
        let vip = v4("192.0.2.10");
        let req = gratuitous_request(OURS, vip);
        let rep = gratuitous_reply(OURS, vip);
        // Both broadcast, both from us, sender and target IP the VIP.
        for (f, op, tha) in [(&req, ARP_REQUEST, [0; 6]), (&rep, ARP_REPLY, OURS)] {
            assert_eq!(f[0..6], BROADCAST);
            assert_eq!(f[6..12], OURS);
            assert_eq!(be16(f, 20), Some(op));
            assert_eq!(f[22..28], OURS);
            assert_eq!(v4_at(f, 28), Some(vip));
            assert_eq!(f[32..38], tha);
            assert_eq!(v4_at(f, 38), Some(vip));
        }
        // A receiver parsing our own request sees a gratuitous one.
        assert!(parse_arp_request(&req).unwrap().is_gratuitous());
    }

    #[test]
    fn parses_solicitations() {
        let target = v6("fd88::100");
        let group = solicited_node(&target);
        let mut nonce = vec![14, 1];
        nonce.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        for (src, opts, lladdr) in [
            (v6("fd88::1"), slla(PEER), Some(PEER)),
            (v6("fe80::1"), [slla(PEER), nonce.clone()].concat(), Some(PEER)),
            // Linux's DAD carries a nonce option (RFC 7527) and no SLLA.
            (Ipv6Addr::UNSPECIFIED, nonce.clone(), None),
            (v6("fd88::1"), vec![], None),
        ] {
            let f = solicitation(src, group, target, &opts);
            let ns = parse_neighbor_solicitation(&f).unwrap();
            assert_eq!(
                ns,
                NeighborSolicitation {
                    eth_src: PEER,
                    src,
                    dst: group,
                    target,
                    source_lladdr: lladdr
                }
            );
            assert_eq!(ns.is_dad(), src.is_unspecified());
            // Ethernet padding after the packet is ignored.
            let mut padded = f.clone();
            padded.extend_from_slice(&[0; 10]);
            assert_eq!(parse_neighbor_solicitation(&padded), Ok(ns));
        }
    }

    #[test]
    fn rejects_bad_solicitations() {
        let target = v6("fd88::100");
        let group = solicited_node(&target);
        let src = v6("fd88::1");
        let good = solicitation(src, group, target, &slla(PEER));
        assert!(parse_neighbor_solicitation(&good).is_ok());
        let with = |at: usize, bytes: &[u8]| {
            let mut f = good.clone();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            f
        };
        // Changes that keep the checksum right, so the check under test
        // is the one that fails.
        let resum = |mut f: Vec<u8>| {
            let (s, d) = (v6_at(&f, 22).unwrap(), v6_at(&f, 38).unwrap());
            f[56..58].copy_from_slice(&[0, 0]);
            let sum = icmpv6_checksum(&s, &d, &f[54..]);
            f[56..58].copy_from_slice(&sum.to_be_bytes());
            f
        };
        use Reject::*;
        for (frame, want) in [
            (good[..77].to_vec(), Malformed("frame too short for a neighbour solicitation")),
            (good[..85].to_vec(), Malformed("truncated IPv6 payload")),
            (with(12, &[0x08, 0x00]), NotRequest("not IPv6")),
            (with(14, &[0x40]), Malformed("IP version is not 6")),
            (with(20, &[6]), NotRequest("not ICMPv6 (or behind an extension header)")),
            (with(20, &[0]), NotRequest("not ICMPv6 (or behind an extension header)")),
            (resum(with(54, &[ICMPV6_NA])), NotRequest("not a neighbour solicitation")),
            (with(21, &[64]), Malformed("hop limit is not 255")),
            (with(18, &[0, 20]), Malformed("ICMPv6 length below 24")),
            (resum(with(55, &[1])), Malformed("ICMPv6 code is not 0")),
            (with(56, &[0, 0]), Malformed("bad ICMPv6 checksum")),
            (with(60, &[9]), Malformed("bad ICMPv6 checksum")),
            (
                solicitation(src, group, v6("ff02::1"), &[]),
                Malformed("target is a multicast address"),
            ),
            (
                solicitation(v6("ff02::2"), group, target, &[]),
                Malformed("source is a multicast address"),
            ),
            (
                solicitation(src, group, target, &[1, 0, 0, 0, 0, 0, 0, 0]),
                Malformed("option with length 0"),
            ),
            (
                solicitation(src, group, target, &[1, 2, 0, 0, 0, 0, 0, 0]),
                Malformed("option longer than the message"),
            ),
            (
                solicitation(src, group, target, &[1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                Malformed("source link-layer address option is not 8 bytes"),
            ),
            (solicitation(src, group, target, &[14]), Malformed("truncated option")),
            (
                solicitation(Ipv6Addr::UNSPECIFIED, v6("ff02::1"), target, &[]),
                Malformed("DAD solicitation not sent to the solicited-node group"),
            ),
            (
                solicitation(Ipv6Addr::UNSPECIFIED, group, target, &slla(PEER)),
                Malformed("DAD solicitation with a source link-layer address"),
            ),
            (
                solicitation(src, group, target, &slla(BROADCAST)),
                Malformed("source link-layer address is not unicast"),
            ),
            (with(6, &[0x33, 0x33, 0, 0, 0, 1]), Malformed("Ethernet source is not unicast")),
        ] {
            assert_eq!(parse_neighbor_solicitation(&frame), Err(want));
        }
    }

    /// Checks an advertisement field by field: addresses, hop limit,
    /// flags, target, the option, and that the checksum verifies.
    fn check_na(f: &[u8; NA_FRAME_LEN], eth_dst: Mac, dst: Ipv6Addr, target: Ipv6Addr, flags: u8) {
        assert_eq!(f[0..6], eth_dst);
        assert_eq!(f[6..12], OURS);
        assert_eq!(be16(f, 12), Some(ETHERTYPE_IPV6));
        assert_eq!(f[14], 0x60);
        assert_eq!(be16(f, 18), Some(32), "payload length");
        assert_eq!(f[20], IPPROTO_ICMPV6);
        assert_eq!(f[21], 255, "hop limit");
        assert_eq!(v6_at(f, 22), Some(target), "sent from the VIP");
        assert_eq!(v6_at(f, 38), Some(dst));
        assert_eq!(&f[54..58], &[ICMPV6_NA, 0, f[56], f[57]]);
        assert_eq!(&f[58..62], &[flags, 0, 0, 0]);
        assert_eq!(v6_at(f, 62), Some(target));
        assert_eq!(&f[78..80], &[OPT_TARGET_LLADDR, 1]);
        assert_eq!(f[80..86], OURS);
        assert_eq!(icmpv6_checksum(&target, &dst, &f[54..]), 0, "checksum");
    }

    #[test]
    fn advertisements() {
        let target = v6("fd88::100");
        let group = solicited_node(&target);
        let all_nodes = v6("ff02::1");
        let all_nodes_mac = [0x33, 0x33, 0, 0, 0, 1];
        let other: Mac = [0x02, 0, 0, 0, 0, 0xcc];
        let ns = |src, lladdr| NeighborSolicitation {
            eth_src: PEER,
            src,
            dst: group,
            target,
            source_lladdr: lladdr,
        };
        // (solicitation, Ethernet destination, IPv6 destination, flags)
        for (what, sol, eth_dst, dst, flags) in [
            ("with SLLA", ns(v6("fd88::1"), Some(other)), other, v6("fd88::1"), 0x60),
            ("unicast probe", ns(v6("fd88::1"), None), PEER, v6("fd88::1"), 0x60),
            ("link-local", ns(v6("fe80::1"), Some(PEER)), PEER, v6("fe80::1"), 0x60),
            ("DAD", ns(Ipv6Addr::UNSPECIFIED, None), all_nodes_mac, all_nodes, 0x20),
        ] {
            eprintln!("{what}");
            check_na(&neighbor_advertisement(OURS, &sol), eth_dst, dst, target, flags);
        }
        check_na(&unsolicited_advertisement(OURS, target), all_nodes_mac, all_nodes, target, 0x20);
    }

    /// Every prefix and every single-byte change of valid frames: parsing
    /// never panics, and a truncated frame is never taken.
    #[test]
    fn survives_truncation_and_corruption() {
        let arp = request(PEER, "10.0.0.1", "10.0.0.100");
        let target = v6("fd88::100");
        let ns = solicitation(v6("fd88::1"), solicited_node(&target), target, &slla(PEER));
        for len in 0..arp.len() {
            assert!(parse_arp_request(&arp[..len]).is_err(), "{len}");
        }
        for len in 0..ns.len() {
            assert!(parse_neighbor_solicitation(&ns[..len]).is_err(), "{len}");
        }
        for frame in [&arp, &ns] {
            for at in 0..frame.len() {
                for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                    let mut f = frame.clone();
                    f[at] = v;
                    let _ = parse_arp_request(&f);
                    let _ = parse_neighbor_solicitation(&f);
                }
            }
        }
    }
}
