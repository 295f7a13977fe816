//! VIP announcement against real kernels: a client namespace holding a
//! bridge `br0` (10.88.0.1/24, fd88::1/64) with two ingress namespaces on
//! it, A (`a0`: 10.88.0.2, fd88::2) and B (`b0`: 10.88.0.3, fd88::3). The
//! VIPs 10.88.0.100 and fd88::100 are no address of anyone; only an
//! announcer answers for them.
//!
//! Everything the tests create lives in namespaces deleted on drop (the
//! veths and the bridge with them), announcers are dropped before their
//! namespaces, and every wait is bounded.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kube_dsr_agent::announce::{
    Announcer, Announcers, Counters, Error, Link, Options, Stop, frame,
};
use kube_dsr_e2e::{
    netns::{NetNs, parse_mac, sh},
    require_root,
};

const VIP4: &str = "10.88.0.100";
const VIP6: &str = "fd88::100";

struct Lan {
    client: NetNs,
    a: NetNs,
    b: NetNs,
}

fn lan() -> Result<Lan> {
    let client = NetNs::new("kac")?;
    let a = NetNs::new("kaa")?;
    let b = NetNs::new("kab")?;
    // No DAD (link-local addresses usable at once; the DAD test turns it
    // on for its one address); interfaces copy `default`.
    for ns in [&client, &a, &b] {
        ns.exec("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0")?;
    }
    // Snooping off: the bridge floods multicast like a plain switch.
    client.exec("ip link add br0 type bridge mcast_snooping 0 && ip link set br0 up")?;
    sh(&format!("ip link add ca netns {} type veth peer name a0 netns {}", client.name, a.name))?;
    sh(&format!("ip link add cb netns {} type veth peer name b0 netns {}", client.name, b.name))?;
    client.exec(
        "ip link set ca master br0 && ip link set cb master br0 \
         && ip link set ca up && ip link set cb up \
         && ip addr add 10.88.0.1/24 dev br0 && ip -6 addr add fd88::1/64 dev br0 nodad \
         && sysctl -qw net.ipv4.neigh.br0.retrans_time_ms=100 net.ipv6.neigh.br0.retrans_time_ms=100",
    )?;
    a.exec(
        "ip addr add 10.88.0.2/24 dev a0 && ip -6 addr add fd88::2/64 dev a0 nodad \
         && ip link set a0 up",
    )?;
    b.exec(
        "ip addr add 10.88.0.3/24 dev b0 && ip -6 addr add fd88::3/64 dev b0 nodad \
         && ip link set b0 up",
    )?;
    for (ns, dev) in [(&client, "br0"), (&a, "a0"), (&b, "b0")] {
        wait_ready(ns, dev)?;
    }
    Ok(Lan { client, a, b })
}

/// Until link watch has seen the carrier, a veth drops what it sends:
/// wait for operstate `up` and a usable link-local address (bounded).
fn wait_ready(ns: &NetNs, dev: &str) -> Result<()> {
    wait(Duration::from_secs(5), &format!("{dev} in {} ready", ns.name), || {
        let state = ns.exec(&format!("cat /sys/class/net/{dev}/operstate"))?;
        let ll = ns.exec(&format!("ip -6 addr show dev {dev} scope link"))?;
        Ok((state.trim() == "up" && ll.contains("fe80::") && !ll.contains("tentative"))
            .then_some(()))
    })
}

/// Polls `f` every 20 ms until it gives a value, for at most `within`.
fn wait<T>(within: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("not within {within:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Opens an announcer on `dev`, on a thread inside `ns`.
fn open(ns: &NetNs, dev: &'static str, options: Options) -> Result<Announcer> {
    Ok(ns.run(move || Announcer::open(Link::by_name(dev)?, options))??)
}

/// The client's neighbour entry for `addr` on br0: MAC (if any) and state.
#[derive(Debug, PartialEq)]
struct Entry {
    mac: Option<[u8; 6]>,
    state: String,
}

fn entry(client: &NetNs, addr: &str) -> Result<Option<Entry>> {
    // `ip neigh show ADDR dev br0`: "ADDR [lladdr MAC] [router] STATE".
    let line = client.exec(&format!("ip neigh show {addr} dev br0"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.is_empty() {
        return Ok(None);
    }
    let mac = match words.iter().position(|w| *w == "lladdr") {
        Some(i) => Some(parse_mac(words.get(i + 1).context("lladdr without a MAC")?)?),
        None => None,
    };
    let state = words.last().unwrap_or(&"").to_string();
    Ok(Some(Entry { mac, state }))
}

/// One ping from the client (its outcome does not matter: nothing answers
/// ICMP for a VIP here; the point is the neighbour resolution it starts).
fn ping(client: &NetNs, addr: &str) -> Result<()> {
    client.exec(&format!("ping -c1 -W1 {addr} >/dev/null 2>&1; true")).map(drop)
}

/// Resolves `addr` from the client and returns the entry once it has left
/// INCOMPLETE (bounded by the ping's 1 s and the 100 ms retransmits).
fn resolve(client: &NetNs, addr: &str) -> Result<Option<Entry>> {
    ping(client, addr)?;
    wait(Duration::from_secs(2), &format!("{addr} resolution to settle"), || {
        Ok(match entry(client, addr)? {
            Some(e) if e.state == "INCOMPLETE" => None,
            e => Some(e),
        })
    })
}

/// No answer: the entry is INCOMPLETE or FAILED, without an address.
fn assert_unanswered(e: &Option<Entry>, what: &str) {
    match e {
        Some(Entry { mac: None, state }) if state == "INCOMPLETE" || state == "FAILED" => {}
        other => panic!("{what}: expected no answer, got {other:?}"),
    }
}

fn assert_resolved_to(e: &Option<Entry>, mac: [u8; 6], what: &str) {
    match e {
        Some(Entry { mac: Some(m), state }) if *m == mac && state != "FAILED" => {}
        other => panic!("{what}: expected {mac:02x?}, got {other:?}"),
    }
}

/// The link-layer multicast memberships of `dev` (`ip maddr`).
fn maddr(ns: &NetNs, dev: &str) -> Result<String> {
    ns.exec(&format!("ip maddr show dev {dev}"))
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn announced_v4_vip_is_answered_with_the_ingress_mac() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let a_mac = lan.a.mac("a0")?;
    assert_eq!(a.link().mac, a_mac);
    assert!(a.announce(ip(VIP4))?);
    assert!(!a.announce(ip(VIP4))?, "announcing twice is a no-op");
    assert_eq!(a.announced(), [ip(VIP4)].into());
    // The first gratuitous round went out before announce returned.
    assert_eq!(a.counters().gratuitous_arp, 2);
    // All three rounds (request + reply each), 200 ms apart, and no more.
    wait(Duration::from_secs(2), "three gratuitous rounds", || {
        Ok((a.counters().gratuitous_arp >= 6).then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.counters().gratuitous_arp, 6, "{:?}", a.counters());
    // With the default arp_accept=0 a client creates no entry from them.
    assert_eq!(lan.client.exec("sysctl -n net.ipv4.conf.br0.arp_accept")?.trim(), "0");
    assert_eq!(entry(&lan.client, VIP4)?, None);

    let e = resolve(&lan.client, VIP4)?;
    assert_resolved_to(&e, a_mac, "announced VIP");
    // A unicast reply to the requester: REACHABLE at once.
    assert_eq!(e.unwrap().state, "REACHABLE");
    let c = a.counters();
    assert_eq!(c.arp_replies, 1, "{c:?}");
    assert_eq!((c.malformed, c.send_errors, c.receive_errors), (0, 0, 0), "{c:?}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn withdrawn_vip_is_not_answered() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    assert!(a.announce(ip(VIP4))?);
    assert!(a.announce(ip(VIP6))?);
    assert!(a.withdraw(ip(VIP4)));
    assert!(a.withdraw(ip(VIP6)));
    assert!(!a.withdraw(ip(VIP4)), "withdrawing twice");
    assert!(a.announced().is_empty());
    let before = a.counters();
    assert_unanswered(&resolve(&lan.client, VIP4)?, "withdrawn IPv4 VIP");
    assert_unanswered(&resolve(&lan.client, VIP6)?, "withdrawn IPv6 VIP");
    let after = a.counters();
    // The requests did reach the announcer, which did not answer them.
    assert_eq!((after.arp_replies, after.na_replies), (0, 0), "{after:?}");
    assert!(after.not_announced >= before.not_announced + 2, "{before:?} {after:?}");
    // Withdrawing stopped the remaining gratuitous rounds too.
    assert_eq!((after.gratuitous_arp, after.unsolicited_na), (2, 1), "{after:?}");
    Ok(())
}

/// Takeover by gratuitous announcements: the client's existing entry
/// moves from A's MAC to B's with no request from the client.
///
/// `arp_accept` stays at its default 0 on the client: it decides whether
/// unsolicited ARP may *create* an entry, while an existing entry is
/// updated by a gratuitous ARP (sender IP = target IP; for the reply form
/// also target MAC = sender MAC) even within `locktime`. Likewise Linux
/// applies an unsolicited NA with the O flag to an existing entry only.
fn takeover(vip: &'static str) -> Result<()> {
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let b = open(&lan.b, "b0", Options::default())?;
    let (a_mac, b_mac) = (lan.a.mac("a0")?, lan.b.mac("b0")?);
    assert!(a.announce(ip(vip))?);
    let e = resolve(&lan.client, vip)?;
    assert_resolved_to(&e, a_mac, "holder A");
    // B listens on the same segment and saw the request, but does not
    // hold the VIP and did not answer.
    let bc = b.counters();
    assert_eq!((bc.arp_replies, bc.na_replies), (0, 0), "{bc:?}");
    assert!(bc.not_announced >= 1, "{bc:?}");

    assert!(a.withdraw(ip(vip)));
    let a_seen = a.counters().not_announced;
    let start = Instant::now();
    assert!(b.announce(ip(vip))?);
    let e = wait(Duration::from_secs(2), "the client's entry to move to B", || {
        Ok(entry(&lan.client, vip)?.filter(|e| e.mac == Some(b_mac)))
    })?;
    let took = start.elapsed();
    eprintln!("{vip}: client moved to B after {took:?}, entry {e:?}");
    // The client did not ask: neither A (which would see a broadcast
    // request or a unicast probe to its MAC) nor B saw a request.
    let (ac, bc) = (a.counters(), b.counters());
    assert_eq!(ac.not_announced, a_seen, "the client sent a request: {ac:?}");
    assert_eq!((bc.arp_replies, bc.na_replies), (0, 0), "{bc:?}");
    assert!(bc.gratuitous_arp + bc.unsolicited_na >= 1, "{bc:?}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn gratuitous_arp_moves_the_client_to_the_new_holder() -> Result<()> {
    require_root();
    takeover(VIP4)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn unsolicited_na_moves_the_client_to_the_new_holder() -> Result<()> {
    require_root();
    takeover(VIP6)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn announced_v6_vip_is_answered_and_the_group_joined() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let a_mac = lan.a.mac("a0")?;
    // fd99::100 shares fd88::100's solicited-node group.
    let (group, group_mac) = ("ff02::1:ff00:100", "33:33:ff:00:01:00");
    assert!(!maddr(&lan.a, "a0")?.contains(group));
    assert!(a.announce(ip(VIP6))?);
    assert!(a.announce(ip("fd99::100"))?);
    let m = maddr(&lan.a, "a0")?;
    assert!(m.contains(group) && m.contains(group_mac), "{m}");
    assert_eq!(a.counters().unsolicited_na, 2);

    let e = resolve(&lan.client, VIP6)?;
    assert_resolved_to(&e, a_mac, "announced IPv6 VIP");
    assert_eq!(e.unwrap().state, "REACHABLE", "a solicited NA confirms reachability");
    let c = a.counters();
    assert!(c.na_replies >= 1, "{c:?}");
    assert_eq!((c.malformed, c.send_errors, c.receive_errors), (0, 0, 0), "{c:?}");

    // The group is left with the last VIP that needs it.
    assert!(a.withdraw(ip(VIP6)));
    assert!(maddr(&lan.a, "a0")?.contains(group));
    assert!(a.withdraw(ip("fd99::100")));
    let m = maddr(&lan.a, "a0")?;
    assert!(!m.contains(group) && !m.contains(group_mac), "{m}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn dad_for_an_announced_v6_vip_is_defended() -> Result<()> {
    require_root();
    let lan = lan()?;
    // One gratuitous round only, sent before announce returns: a later
    // unsolicited NA would fail the client's DAD on its own (an NA for a
    // tentative address does) before its solicitation is even sent.
    let a = open(&lan.a, "a0", Options { count: 1, ..Options::default() })?;
    assert!(a.announce(ip(VIP6))?);
    let before = a.counters().na_replies;
    // The client tries to take the VIP as an address of its own: its DAD
    // solicitation (source ::) gets our NA to ff02::1 and the address
    // fails DAD.
    lan.client.exec(
        "sysctl -qw net.ipv6.conf.br0.accept_dad=1 net.ipv6.conf.br0.dad_transmits=1 \
         && ip -6 addr add fd88::100/64 dev br0",
    )?;
    let addr = wait(Duration::from_secs(3), "DAD to fail", || {
        let s = lan.client.exec("ip -6 addr show dev br0 to fd88::100/128")?;
        Ok(s.contains("dadfailed").then_some(s))
    })?;
    eprintln!("{}", addr.trim());
    assert!(a.counters().na_replies > before, "{:?}", a.counters());
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn only_vips_are_answered() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let a_mac = lan.a.mac("a0")?;
    assert!(a.announce(ip(VIP4))?);
    assert!(a.announce(ip(VIP6))?);
    // A's own addresses: the kernel answers, the announcer does not.
    for addr in ["10.88.0.2", "fd88::2"] {
        assert_resolved_to(&resolve(&lan.client, addr)?, a_mac, addr);
    }
    // Addresses nobody holds: nobody answers.
    for addr in ["10.88.0.99", "fd88::99"] {
        assert_unanswered(&resolve(&lan.client, addr)?, addr);
    }
    let c = a.counters();
    assert_eq!((c.arp_replies, c.na_replies), (0, 0), "{c:?}");
    assert!(c.not_announced >= 4, "{c:?}");
    Ok(())
}

/// A raw socket in the client namespace, for frames `ping` cannot make.
struct Raw(OwnedFd);

impl Raw {
    /// Bound to `dev`, receiving `protocol` frames (0: none).
    fn open(dev: &str, protocol: u16) -> std::io::Result<Self> {
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: plain libc calls on values owned here.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            if index == 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol.to_be()));
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = protocol.to_be();
            sll.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            if libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), len) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            let tvlen = std::mem::size_of::<libc::timeval>() as u32;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                tvlen,
            );
            Ok(Self(fd))
        }
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: frame is valid for its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// The next frame `keep` accepts within `within` (100 ms reads).
    fn recv_matching(&self, within: Duration, keep: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && keep(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// An ARP request frame from `sha`/`spa` for `tpa`, built here by hand.
fn arp_request(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

/// A neighbour solicitation for `target` from `src`, with an SLLA option
/// unless it is a DAD one (source `::`).
fn solicitation(mac: [u8; 6], src: std::net::Ipv6Addr, target: std::net::Ipv6Addr) -> Vec<u8> {
    let dst = frame::solicited_node(&target);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    if !src.is_unspecified() {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&mac);
    }
    let sum = frame::icmpv6_checksum(&src, &dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = frame::multicast_mac(&dst).to_vec();
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn probes_and_malformed_frames() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let a_mac = lan.a.mac("a0")?;
    let me = lan.client.mac("br0")?;
    assert!(a.announce(ip(VIP4))?);
    assert!(a.announce(ip(VIP6))?);
    let vip6: std::net::Ipv6Addr = VIP6.parse()?;
    let good_ns = solicitation(me, "fd88::1".parse()?, vip6);
    let good_arp = arp_request(me, [10, 88, 0, 1], [10, 88, 0, 100]);
    let mut bad_sum = good_ns.clone();
    bad_sum[56] ^= 0xff;
    let mut multicast_sender = good_arp.clone();
    multicast_sender[22] = 0x01;
    let mut long_payload = good_ns.clone();
    long_payload[18..20].copy_from_slice(&200u16.to_be_bytes());
    // Each passes the socket filter and fails validation.
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("ARP cut after the operation", good_arp[..22].to_vec()),
        ("ARP cut in the target address", good_arp[..40].to_vec()),
        ("ARP from a multicast MAC", multicast_sender),
        ("NS with a bad checksum", bad_sum),
        ("NS claiming more payload than sent", long_payload),
        ("NS cut after the type", good_ns[..60].to_vec()),
    ];
    let n = malformed.len() as u64;

    // An RFC 5227 probe (sender IP 0.0.0.0) for the VIP, and the reply
    // read back raw: unicast to the prober, VIP at A's MAC.
    let reply = lan.client.run(move || -> Result<Vec<u8>> {
        let raw = Raw::open("br0", 0x0806)?;
        let tx = Raw::open("br0", 0)?;
        for (what, f) in &malformed {
            tx.send(f).with_context(|| what.to_string())?;
        }
        tx.send(&arp_request(me, [0; 4], [10, 88, 0, 100]))?;
        raw.recv_matching(Duration::from_secs(1), |f| f.len() >= 42 && f[20..22] == [0, 2])
            .context("no ARP reply to the probe")
    })??;
    let mut want = me.to_vec();
    want.extend_from_slice(&a_mac);
    want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    want.extend_from_slice(&a_mac);
    want.extend_from_slice(&[10, 88, 0, 100]);
    want.extend_from_slice(&me);
    want.extend_from_slice(&[0; 4]);
    assert_eq!(reply[..42], want[..]);

    let c = wait(Duration::from_secs(1), "the malformed frames counted", || {
        let c = a.counters();
        Ok((c.malformed >= n).then_some(c))
    })?;
    assert_eq!(c.malformed, n, "{c:?}");
    assert_eq!(c.arp_replies, 1, "only the probe was answered: {c:?}");
    // Still answering, and a well-formed NS built here gets a solicited
    // NA back with the right fields.
    let na = lan.client.run(move || -> Result<Vec<u8>> {
        let raw = Raw::open("br0", 0x86dd)?;
        raw.send(&good_ns)?;
        raw.recv_matching(Duration::from_secs(1), |f| f.len() >= 86 && f[54] == 136)
            .context("no NA")
    })??;
    assert_eq!(na[0..6], me, "to the solicitor's MAC");
    assert_eq!(na[6..12], a_mac);
    assert_eq!(na[21], 255, "hop limit");
    assert_eq!(na[38..54], "fd88::1".parse::<std::net::Ipv6Addr>()?.octets());
    assert_eq!(na[58], 0x60, "S and O");
    assert_eq!(na[62..78], vip6.octets());
    assert_eq!(na[78..86], [&[2u8, 1][..], &a_mac[..]].concat()[..]);
    assert_eq!(frame::icmpv6_checksum(&vip6, &"fd88::1".parse()?, &na[54..86]), 0);
    assert_eq!(a.counters().na_replies, 1);

    // A DAD solicitation (source ::) is answered to all nodes, S clear.
    let dad = solicitation(me, std::net::Ipv6Addr::UNSPECIFIED, vip6);
    let na = lan.client.run(move || -> Result<Vec<u8>> {
        let raw = Raw::open("br0", 0x86dd)?;
        raw.send(&dad)?;
        raw.recv_matching(Duration::from_secs(1), |f| f.len() >= 86 && f[54] == 136)
            .context("no NA to the DAD solicitation")
    })??;
    let all_nodes: std::net::Ipv6Addr = "ff02::1".parse()?;
    assert_eq!(na[0..6], [0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(na[38..54], all_nodes.octets());
    assert_eq!(na[58], 0x20, "O only");
    assert_eq!(frame::icmpv6_checksum(&vip6, &all_nodes, &na[54..86]), 0);
    assert_eq!(a.counters().na_replies, 2);
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn link_down_up_and_deletion() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let a_mac = lan.a.mac("a0")?;
    assert!(a.announce(ip(VIP4))?);
    wait(Duration::from_secs(2), "the first burst", || {
        Ok((a.counters().gratuitous_arp == 6).then_some(()))
    })?;
    lan.a.exec("ip link set a0 down")?;
    std::thread::sleep(Duration::from_millis(200));
    lan.a.exec("ip link set a0 up")?;
    wait_ready(&lan.a, "a0")?;
    // The packet sockets survive a down/up: still answering, and the
    // whole burst went out again once the link was back.
    assert_resolved_to(&resolve(&lan.client, VIP4)?, a_mac, "after down/up");
    let c = wait(Duration::from_secs(2), "a second burst", || {
        let c = a.counters();
        Ok((c.gratuitous_arp >= 12).then_some(c))
    })?;
    assert_eq!(c.gratuitous_arp, 12, "{c:?}");
    assert!(c.receive_errors >= 1, "ENETDOWN seen: {c:?}");
    assert!(a.failure().is_none(), "{:?}", a.failure());
    // Carrier loss without a0 going down (its peer does), for longer than
    // the 1 s link poll: no socket hears of it, the poll does.
    lan.client.exec("ip link set ca down")?;
    std::thread::sleep(Duration::from_millis(1300));
    lan.client.exec("ip link set ca up")?;
    wait_ready(&lan.a, "a0")?;
    let c = wait(Duration::from_secs(3), "a third burst", || {
        let c = a.counters();
        Ok((c.gratuitous_arp >= 18).then_some(c))
    })?;
    assert_eq!(c.gratuitous_arp, 18, "{c:?}");
    // Deleting the interface stops the worker, and says so.
    lan.a.exec("ip link del a0")?;
    let why = wait(Duration::from_secs(2), "the announcer to notice", || Ok(a.failure()))?;
    assert!(matches!(why, Stop::Deleted(_)), "{why:?}");
    assert!(why.to_string().contains("was deleted"), "{why}");
    assert!(a.announced().is_empty());
    match a.announce(ip(VIP4)) {
        Err(Error::Stopped { .. }) => {}
        other => panic!("announce on a stopped announcer: {other:?}"),
    }
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn drop_stops_answering_at_once() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    assert!(a.announce(ip(VIP4))?);
    assert!(a.announce(ip(VIP6))?);
    let start = Instant::now();
    let c: Counters = a.counters();
    let why = a.shutdown();
    assert!(why.is_none(), "{why:?}");
    let took = start.elapsed();
    eprintln!("shutdown took {took:?} ({c:?})");
    assert!(took < Duration::from_millis(100), "{took:?}");
    // The worker is gone with its sockets and group memberships.
    assert!(!maddr(&lan.a, "a0")?.contains("ff02::1:ff00:100"));
    assert_unanswered(&resolve(&lan.client, VIP4)?, "after shutdown");
    assert_unanswered(&resolve(&lan.client, VIP6)?, "after shutdown");
    Ok(())
}

/// A switch that forwards multicast only where MLD reports asked for it:
/// the bridge snoops, is the querier, and floods no multicast to the
/// ingress ports. The solicitation for the VIP reaches A only because A's
/// membership was reported. The solicitor is a host behind a third port
/// (`cc`, namespace C): frames the bridge device itself sends are
/// flooded to every port regardless of `mcast_flood`.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn solicited_node_membership_is_reported_by_mld() -> Result<()> {
    require_root();
    let lan = lan()?;
    let c = NetNs::new("kah")?;
    c.exec("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0")?;
    sh(&format!(
        "ip link add cc netns {} type veth peer name c0 netns {}",
        lan.client.name, c.name
    ))?;
    lan.client.exec(
        "ip link set cc master br0 && ip link set cc up \
         && ip link set br0 type bridge mcast_query_response_interval 50 mcast_query_interval 200 \
         && ip link set br0 type bridge mcast_snooping 1 mcast_querier 1 \
         && bridge link set dev ca mcast_flood off && bridge link set dev cb mcast_flood off",
    )?;
    c.exec(
        "ip -6 addr add fd88::9/64 dev c0 nodad && ip link set c0 up \
         && sysctl -qw net.ipv6.neigh.c0.retrans_time_ms=100",
    )?;
    wait_ready(&c, "c0")?;
    let a = open(&lan.a, "a0", Options::default())?;
    let b = open(&lan.b, "b0", Options::default())?;
    let mdb = || lan.client.exec("bridge mdb show dev br0");
    assert!(!mdb()?.contains("ff02::1:ff00:100"));
    assert!(a.announce(ip(VIP6))?);
    let learnt = wait(Duration::from_secs(3), "the bridge to learn the group", || {
        let m = mdb()?;
        Ok(m.lines()
            .find(|l| l.contains("port ca") && l.contains("ff02::1:ff00:100"))
            .map(str::to_owned))
    })?;
    eprintln!("{learnt}");
    // The unsolicited NAs are over (one arriving while C's entry is
    // INCOMPLETE would resolve it without any solicitation).
    wait(Duration::from_secs(2), "the burst to end", || {
        Ok((a.counters().unsolicited_na == 3).then_some(()))
    })?;
    // Until its first query's response interval (shortened to 0.5 s
    // above; 10 s by default) has passed, the bridge does not trust its
    // table and floods, which reaches no ingress port here: ask again
    // until answered.
    let start = Instant::now();
    let e = wait(Duration::from_secs(15), "C's entry for the VIP", || {
        c.exec(&format!("ping -c1 -W1 {VIP6} >/dev/null 2>&1; true"))?;
        let line = c.exec(&format!("ip neigh show {VIP6} dev c0"))?;
        Ok(line.contains("REACHABLE").then_some(line))
    })?;
    eprintln!("answered after {:?}", start.elapsed());
    let a_mac = lan.a.exec("cat /sys/class/net/a0/address")?;
    assert!(e.contains(a_mac.trim()) && e.contains("REACHABLE"), "{e}");
    // B, not a member, never saw the solicitation: the bridge really
    // forwards by membership here.
    let bc = b.counters();
    assert_eq!(bc.not_announced, 0, "{bc:?}");
    assert!(a.counters().na_replies >= 1);
    drop((a, b));
    drop(c);
    Ok(())
}

/// Runs `f` with the announcer set on a thread inside `ns`, and hands the
/// set back.
fn with_set<T: Send + 'static>(
    ns: &NetNs,
    set: Announcers,
    f: impl FnOnce(&mut Announcers) -> T + Send + 'static,
) -> Result<(Announcers, T)> {
    ns.run(move || {
        let mut set = set;
        let r = f(&mut set);
        (set, r)
    })
}

/// A second port of A on the bridge: `a1` in A, `ca1` in the client.
fn add_a1(lan: &Lan) -> Result<()> {
    sh(&format!(
        "ip link add ca1 netns {} type veth peer name a1 netns {}",
        lan.client.name, lan.a.name
    ))?;
    lan.client.exec("ip link set ca1 master br0 && ip link set ca1 up")?;
    lan.a.exec("ip link set a1 up")?;
    wait_ready(&lan.a, "a1")
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn announcers_by_interface_name() -> Result<()> {
    require_root();
    let lan = lan()?;
    add_a1(&lan)?;
    let (a0_mac, a1_mac) = (lan.a.mac("a0")?, lan.a.mac("a1")?);
    let set = Announcers::new(Options::default());
    let (set, r) = with_set(&lan.a, set, |s| s.announce("a0", ip(VIP4)))?;
    assert!(r?);
    assert_resolved_to(&resolve(&lan.client, VIP4)?, a0_mac, "on a0");
    // Moving the VIP to a1 withdraws it from a0; the gratuitous ARP moves
    // the client's entry.
    let (set, r) = with_set(&lan.a, set, |s| s.announce("a1", ip(VIP4)))?;
    assert!(r?);
    assert_eq!(set.announced(), [(ip(VIP4), "a1".to_string())].into());
    wait(Duration::from_secs(2), "the client to follow to a1", || {
        Ok(entry(&lan.client, VIP4)?.filter(|e| e.mac == Some(a1_mac)))
    })?;
    let (set, r) = with_set(&lan.a, set, |s| s.announce("nope0", ip(VIP6)))?;
    assert!(matches!(r, Err(Error::Interface { .. })), "{r:?}");

    // a1 is deleted and comes back (with another MAC): the next round
    // re-opens its announcer and announces the VIP again.
    lan.a.exec("ip link del a1")?;
    wait(Duration::from_secs(2), "the a1 announcer to stop", || {
        Ok(set.announced().is_empty().then_some(()))
    })?;
    add_a1(&lan)?;
    let new_mac = lan.a.mac("a1")?;
    let (set, errors) = with_set(&lan.a, set, |s| s.reopen_failed())?;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(set.announced(), [(ip(VIP4), "a1".to_string())].into());
    lan.client.exec("ip neigh flush dev br0")?;
    assert_resolved_to(&resolve(&lan.client, VIP4)?, new_mac, "on the new a1");
    let mut set = set;
    assert!(set.withdraw(ip(VIP4)));
    assert!(set.announced().is_empty());
    let c = set.counters();
    assert_eq!(c.keys().collect::<Vec<_>>(), ["a0", "a1"], "{c:?}");
    Ok(())
}

/// Two holders at once (a Lease handover that overlapped): each sees the
/// other's gratuitous ARP for its VIP, counts a conflict and answers it
/// with nothing.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn two_holders_count_conflicts() -> Result<()> {
    require_root();
    let lan = lan()?;
    let a = open(&lan.a, "a0", Options::default())?;
    let b = open(&lan.b, "b0", Options::default())?;
    assert!(a.announce(ip(VIP4))?);
    assert!(b.announce(ip(VIP4))?);
    let (ac, bc) = wait(Duration::from_secs(2), "both to see a conflict", || {
        let (ac, bc) = (a.counters(), b.counters());
        Ok((ac.conflicts >= 1 && bc.conflicts >= 1).then_some((ac, bc)))
    })?;
    eprintln!("A {ac:?}\nB {bc:?}");
    assert_eq!((ac.arp_replies, bc.arp_replies), (0, 0));
    Ok(())
}
