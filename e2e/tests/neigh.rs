//! Backend MAC resolution against real neighbours: an "ingress" namespace
//! joined to a "backend" namespace by one veth pair (10.77.0.0/24,
//! fd77::/64) and to an "other" namespace by a second one (10.79.0.0/24),
//! with routes to 10.78.0.0/24 and fd78::/64 through the backend as a
//! gateway.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use kube_dsr_agent::neigh::{self, Iface, Lookup, Resolver, Status};
use kube_dsr_e2e::{
    netns::{NetNs, sh},
    require_root,
};

/// How long resolution may take on a veth (the brief's bound).
const RESOLVE_WITHIN: Duration = Duration::from_secs(3);

struct Topo {
    ing: NetNs,
    be: NetNs,
    other: NetNs,
}

fn topo() -> Result<Topo> {
    let ing = NetNs::new("kni")?;
    let be = NetNs::new("knb")?;
    let other = NetNs::new("kno")?;
    // No DAD anywhere, so the link-local addresses that source neighbour
    // solicitations are usable at once; interfaces copy `default`.
    for ns in [&ing, &be, &other] {
        ns.exec("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0")?;
    }
    sh(&format!("ip link add i0 netns {} type veth peer name b0 netns {}", ing.name, be.name))?;
    sh(&format!("ip link add i1 netns {} type veth peer name c0 netns {}", ing.name, other.name))?;
    ing.exec(
        "ip addr add 10.77.0.1/24 dev i0 && ip -6 addr add fd77::1/64 dev i0 nodad \
         && ip addr add 10.79.0.1/24 dev i1 \
         && ip link set i0 up && ip link set i1 up \
         && ip route add 10.78.0.0/24 via 10.77.0.2 dev i0 \
         && ip -6 route add fd78::/64 via fd77::2 dev i0 \
         && sysctl -qw net.ipv4.neigh.i0.retrans_time_ms=100 net.ipv6.neigh.i0.retrans_time_ms=100",
    )?;
    be.exec(
        "ip addr add 10.77.0.2/24 dev b0 && ip -6 addr add fd77::2/64 dev b0 nodad \
         && ip link set b0 up",
    )?;
    other.exec("ip addr add 10.79.0.2/24 dev c0 && ip link set c0 up")?;
    for (ns, dev) in [(&ing, "i0"), (&ing, "i1"), (&be, "b0"), (&other, "c0")] {
        wait_ready(ns, dev)?;
    }
    Ok(Topo { ing, be, other })
}

/// Until the kernel's link watch has seen the carrier, a veth drops what
/// it sends and IPv6 has no link-local address to solicit from: wait for
/// operstate `up` and a link-local address (bounded).
fn wait_ready(ns: &NetNs, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = ns.exec(&format!("cat /sys/class/net/{dev}/operstate"))?;
        let ll = ns.exec(&format!("ip -6 addr show dev {dev} scope link"))?;
        if state.trim() == "up" && ll.contains("fe80::") && !ll.contains("tentative") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{dev} in {} not ready: {} {ll}", ns.name, state.trim());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `f` with a resolver and the ingress interface `i0`, on a thread
/// inside the ingress namespace.
fn in_ns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce(&mut Resolver, &Iface) -> kube_dsr_agent::Result<T> + Send + 'static,
) -> Result<T> {
    ns.run(move || {
        let mut r = Resolver::new()?;
        let i0 = r.interface("i0")?;
        f(&mut r, &i0)
    })?
    .map_err(|e| anyhow!(e))
}

/// Looks `addr` up until `done` holds or `within` passes: the first lookup,
/// the last, and how long it took.
fn poll(
    ns: &NetNs,
    addr: IpAddr,
    allowed: &'static [&'static str],
    within: Duration,
    done: fn(&Lookup) -> bool,
) -> Result<(Lookup, Lookup, Duration)> {
    in_ns(ns, move |r, i0| {
        let allowed: Vec<Iface> =
            allowed.iter().map(|n| r.interface(n)).collect::<kube_dsr_agent::Result<_>>()?;
        let start = Instant::now();
        let first = r.lookup(i0, &allowed, addr)?;
        let mut last = first.clone();
        while !done(&last) && start.elapsed() < within {
            std::thread::sleep(Duration::from_millis(50));
            last = r.lookup(i0, &allowed, addr)?;
        }
        Ok((first, last, start.elapsed()))
    })
}

fn resolved(l: &Lookup) -> bool {
    matches!(l, Lookup::Resolved { .. })
}

/// The kernel's entry for `addr` in the ingress namespace (`ip neigh`).
/// The reason of a `NotAdjacent` lookup, as the reports show it.
fn not_adjacent(l: &Lookup) -> Option<String> {
    match l {
        Lookup::NotAdjacent { reason } => Some(reason.to_string()),
        _ => None,
    }
}

fn kernel_entry(ns: &NetNs, addr: &str) -> Result<String> {
    Ok(ns.exec(&format!("ip neigh show {addr} dev i0"))?.trim().to_owned())
}

fn check_resolves(addr: &str, peer_mac: [u8; 6], t: &Topo) -> Result<()> {
    let (first, last, took) = poll(&t.ing, ip(addr), &[], RESOLVE_WITHIN, resolved)?;
    // Nothing was in the table: the first round starts resolution.
    assert!(matches!(&first, Lookup::Pending { egress } if egress.name == "i0"), "{first:?}");
    match &last {
        Lookup::Resolved { mac, egress } => {
            assert_eq!(*mac, peer_mac, "{addr}: the backend's MAC");
            assert_eq!(egress.name, "i0");
        }
        other => panic!("{addr} not resolved within {RESOLVE_WITHIN:?}: {other:?}"),
    }
    assert!(took <= RESOLVE_WITHIN + Duration::from_millis(200), "{took:?}");
    let entry = kernel_entry(&t.ing, addr)?;
    assert!(entry.contains("REACHABLE"), "{entry}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn resolves_an_adjacent_backend_v4() -> Result<()> {
    require_root();
    let t = topo()?;
    check_resolves("10.77.0.2", t.be.mac("b0")?, &t)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn resolves_an_adjacent_backend_v6() -> Result<()> {
    require_root();
    let t = topo()?;
    check_resolves("fd77::2", t.be.mac("b0")?, &t)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn a_stale_entry_is_used_and_probed() -> Result<()> {
    require_root();
    let t = topo()?;
    let mac = t.be.mac("b0")?;
    let mac_s = t.be.exec("cat /sys/class/net/b0/address")?;
    t.ing.exec(&format!("ip neigh replace 10.77.0.2 dev i0 lladdr {} nud stale", mac_s.trim()))?;
    assert!(kernel_entry(&t.ing, "10.77.0.2")?.contains("STALE"));
    let l = in_ns(&t.ing, |r, i0| r.lookup(i0, &[], ip("10.77.0.2")))?;
    assert!(matches!(&l, Lookup::Resolved { mac: m, .. } if *m == mac), "{l:?}");
    // The lookup had the kernel confirm it: STALE moves on (DELAY, then a
    // unicast probe), where it would otherwise stay forever.
    let entry = kernel_entry(&t.ing, "10.77.0.2")?;
    assert!(!entry.contains("STALE"), "{entry}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn a_backend_behind_a_gateway_is_not_adjacent() -> Result<()> {
    require_root();
    let t = topo()?;
    for (addr, reason) in [
        ("10.78.0.5", "route to 10.78.0.5 goes via gateway 10.77.0.2 on i0"),
        ("fd78::5", "route to fd78::5 goes via gateway fd77::2 on i0"),
    ] {
        let l = in_ns(&t.ing, move |r, i0| r.lookup(i0, &[], ip(addr)))?;
        assert_eq!(not_adjacent(&l).as_deref(), Some(reason), "{l:?}");
        // Nothing was resolved for it.
        assert_eq!(kernel_entry(&t.ing, addr)?, "", "{addr}");
    }
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn a_backend_on_another_interface_is_not_adjacent_unless_allowed() -> Result<()> {
    require_root();
    let t = topo()?;
    let l = in_ns(&t.ing, |r, i0| r.lookup(i0, &[], ip("10.79.0.2")))?;
    assert_eq!(
        not_adjacent(&l).as_deref(),
        Some("route to 10.79.0.2 leaves through i1, not the ingress interface i0"),
        "{l:?}"
    );
    // Allowed as an egress, it resolves there.
    let (_, last, _) = poll(&t.ing, ip("10.79.0.2"), &["i1"], RESOLVE_WITHIN, resolved)?;
    match last {
        Lookup::Resolved { mac, egress } => {
            assert_eq!(mac, t.other.mac("c0")?);
            assert_eq!(egress.name, "i1");
        }
        other => panic!("10.79.0.2 via i1: {other:?}"),
    }
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn no_route_and_own_address_are_not_adjacent() -> Result<()> {
    require_root();
    let t = topo()?;
    let (none, local) = in_ns(&t.ing, |r, i0| {
        Ok((r.lookup(i0, &[], ip("192.0.2.1"))?, r.lookup(i0, &[], ip("10.77.0.1"))?))
    })?;
    assert!(
        not_adjacent(&none).is_some_and(|r| r.starts_with("no route to 192.0.2.1: ")),
        "{none:?}"
    );
    assert_eq!(
        not_adjacent(&local).as_deref(),
        Some("the route to 10.77.0.1 is of type local"),
        "{local:?}"
    );
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn an_address_nobody_owns_is_unreachable() -> Result<()> {
    require_root();
    let t = topo()?;
    let unreachable = |l: &Lookup| matches!(l, Lookup::Unreachable { .. });
    for addr in ["10.77.0.99", "fd77::99"] {
        let (first, last, _) = poll(&t.ing, ip(addr), &[], RESOLVE_WITHIN, unreachable)?;
        assert!(matches!(first, Lookup::Pending { .. }), "{addr}: {first:?}");
        match &last {
            Lookup::Unreachable { egress, why } => {
                assert_eq!(egress.name, "i0");
                assert_eq!(why, &format!("{addr} does not answer on i0 (neighbour entry FAILED)"));
            }
            other => panic!("{addr} not unreachable within {RESOLVE_WITHIN:?}: {other:?}"),
        }
        // Looking again does not restart resolution (no flapping between
        // Unreachable and Pending)...
        let again = in_ns(&t.ing, move |r, i0| r.lookup(i0, &[], ip(addr)))?;
        assert!(unreachable(&again), "{again:?}");
        assert!(kernel_entry(&t.ing, addr)?.contains("FAILED"));
        // ... an explicit probe does.
        let after = in_ns(&t.ing, move |r, i0| {
            r.probe(i0.index, ip(addr))?;
            r.lookup(i0, &[], ip(addr))
        })?;
        assert!(matches!(after, Lookup::Pending { .. }), "{addr}: {after:?}");
        assert!(kernel_entry(&t.ing, addr)?.contains("INCOMPLETE"));
    }
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn a_round_programs_only_resolved_backends() -> Result<()> {
    require_root();
    let t = topo()?;
    let desired: Vec<IpAddr> =
        ["10.77.0.2", "fd77::2", "10.78.0.5", "10.79.0.2", "10.77.0.99"].map(ip).to_vec();
    let want = desired.clone();
    let rounds = in_ns(&t.ing, move |r, i0| {
        let mut rounds = Vec::new();
        let start = Instant::now();
        loop {
            let lookups = r.lookup_all(i0, &[], want.iter().copied())?;
            let p = neigh::plan(&want, &lookups);
            let settled = !p.status.values().any(|s| *s == Status::Pending);
            rounds.push(p);
            if settled || start.elapsed() > RESOLVE_WITHIN {
                return Ok(rounds);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })?;
    let first = &rounds[0];
    assert!(first.program.is_empty(), "nothing was resolved yet: {first:?}");
    let last = rounds.last().unwrap();
    let mac = t.be.mac("b0")?;
    let programmed: BTreeMap<IpAddr, [u8; 6]> =
        last.program.iter().map(|(a, t)| (*a, t.mac)).collect();
    assert_eq!(programmed, BTreeMap::from([(ip("10.77.0.2"), mac), (ip("fd77::2"), mac)]));
    let kinds: BTreeSet<(IpAddr, &str)> = last
        .status
        .iter()
        .map(|(a, s)| {
            let k = match s {
                Status::Resolved => "resolved",
                Status::Pending => "pending",
                Status::Unreachable(_) => "unreachable",
                Status::NotAdjacent(_) => "not adjacent",
                Status::Unknown => "unknown",
            };
            (*a, k)
        })
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            (ip("10.77.0.2"), "resolved"),
            (ip("fd77::2"), "resolved"),
            (ip("10.78.0.5"), "not adjacent"),
            (ip("10.79.0.2"), "not adjacent"),
            (ip("10.77.0.99"), "unreachable"),
        ])
    );
    Ok(())
}

/// A round reads a few entries one by one and, past
/// [`neigh::SINGLE_READS`] on one interface, dumps its table once for the
/// rest of the round; both ways give the same verdicts. (A node of a large
/// cluster holds an entry per pod on the segment: a change to one service
/// must not read them all.)
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn a_round_reads_entries_alone_then_dumps_the_table_once() -> Result<()> {
    require_root();
    let t = topo()?;
    // 400 permanent entries on an on-link prefix of i0, and one address
    // without an entry.
    t.ing.exec("ip route add 10.80.0.0/16 dev i0")?;
    let addrs: Vec<IpAddr> =
        (0..400u32).map(|i| ip(&format!("10.80.{}.{}", i / 200, 1 + i % 200))).collect();
    let mac_of = |a: &IpAddr| -> [u8; 6] {
        let IpAddr::V4(v4) = a else { unreachable!() };
        let o = v4.octets();
        [0x02, 0, 0, 0, o[2], o[3]]
    };
    let batch: String = addrs
        .iter()
        .map(|a| {
            let m = mac_of(a);
            format!(
                "neigh add {a} lladdr {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} nud permanent dev i0\n",
                m[0], m[1], m[2], m[3], m[4], m[5]
            )
        })
        .collect();
    let file = std::env::temp_dir().join(format!("kdsr-neigh-batch-{}", std::process::id()));
    std::fs::write(&file, batch)?;
    let added = t.ing.exec(&format!("ip -batch {}", file.display()));
    std::fs::remove_file(&file)?;
    added?;
    let absent = ip("10.80.5.5");

    let want = addrs.clone();
    let (small, first, second, reads) = in_ns(&t.ing, move |r, i0| {
        // Outside a round, a few addresses: read one by one.
        let small = r.lookup_all(i0, &[], want[..10].iter().copied())?;
        let after_small = r.neighbour_reads();
        // One round, two calls of 200 (another service's backends in the
        // second): the round's count crosses the limit in the second.
        r.begin_round();
        let first = r.lookup_all(i0, &[], want[..200].iter().copied())?;
        let mut rest: Vec<IpAddr> = want[200..].to_vec();
        rest.push(absent);
        let second = r.lookup_all(i0, &[], rest)?;
        Ok((small, first, second, (after_small, r.neighbour_reads())))
    })?;
    let (after_small, after_round) = reads;
    assert_eq!(after_small, neigh::NeighbourReads { single: 10, dumps: 0 });
    assert_eq!(
        after_round,
        neigh::NeighbourReads { single: 10 + neigh::SINGLE_READS, dumps: 1 },
        "one entry at a time up to the limit, then one dump for the rest of the round"
    );
    for (a, l) in small.iter().chain(&first).chain(&second).filter(|(a, _)| **a != absent) {
        assert!(
            matches!(l, Lookup::Resolved { mac, egress } if *mac == mac_of(a) && egress.name == "i0"),
            "{a}: {l:?}"
        );
    }
    assert_eq!(small.len() + first.len() + second.len(), 10 + 400 + 1);
    // No entry: resolution is started, as with a single read.
    assert!(
        matches!(second.get(&absent), Some(Lookup::Pending { .. })),
        "{:?}",
        second.get(&absent)
    );
    Ok(())
}
