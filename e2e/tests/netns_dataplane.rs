//! Real TCP through the real XDP dataplane in network namespaces: client →
//! router → ingress (XDP, MAC rewrite) → three backends that hold the VIP on
//! lo; replies go straight back through the router.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use kube_dsr_agent::dataplane::{BackendSpec, Capacity, PortSpec, Protocol, ServiceSpec, Stage};
use kube_dsr_e2e::{
    require_root,
    topology::{Lab, TCP_PORT, VIP, VIP6, forwarded},
};

const NAME: &str = "default/web/v4";

fn service(lab: &Lab, which: &[usize]) -> ServiceSpec {
    ServiceSpec {
        name: NAME.into(),
        vip: VIP.into(),
        ports: vec![PortSpec { port: TCP_PORT, protocol: Protocol::Tcp }],
        table_size: 65537,
        backends: which
            .iter()
            .map(|&i| BackendSpec::new(lab.backends[i].addr.into(), lab.backends[i].mac))
            .collect(),
        pin_all_flows: false,
        stage: Stage::Ingress,
    }
}

/// A connection that asks its backend for its name, line by line.
struct Conn {
    out: TcpStream,
    lines: BufReader<TcpStream>,
}

impl Conn {
    fn open() -> std::io::Result<Self> {
        Self::open_to(SocketAddr::from((VIP, TCP_PORT)))
    }

    fn open_to(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Self { out: s.try_clone()?, lines: BufReader::new(s) })
    }

    fn ask(&mut self) -> std::io::Result<String> {
        self.out.write_all(b"who\n")?;
        let mut line = String::new();
        self.lines.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim().to_string())
    }
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn tcp_through_xdp_reaches_every_backend_and_replies_bypass_the_ingress() {
    require_root();
    let lab = Lab::new(3).unwrap();
    let (_pins, mut dp) = lab.open_dataplane().unwrap();
    dp.upsert_service(&service(&lab, &[0, 1, 2])).unwrap();

    // Many short connections: every backend must serve some.
    let rx_before = lab.ingress_rx_packets().unwrap();
    let fwd_before: u64 = forwarded(&dp).unwrap();
    let answers = lab
        .client
        .run(|| {
            (0..90).map(|_| Conn::open().and_then(|mut c| c.ask())).collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("every request through the VIP succeeds");
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for a in &answers {
        *per_backend.entry(a.clone()).or_default() += 1;
    }
    for b in &lab.backends {
        assert!(
            per_backend.get(&b.name).copied().unwrap_or(0) > 0,
            "{} got no connection: {per_backend:?}",
            b.name
        );
    }

    // DSR: the ingress interface received the client's packets and nothing
    // else of note; each connection's replies (SYN-ACK, data, FIN: at least
    // 3 per connection) went straight to the router.
    let rx = lab.ingress_rx_packets().unwrap() - rx_before;
    let fwd = forwarded(&dp).unwrap() - fwd_before;
    assert!(fwd >= 90 * 4, "client packets forwarded by XDP: {fwd}");
    assert!(
        rx < fwd + 20,
        "the ingress interface saw {rx} packets for {fwd} forwarded ones: replies must bypass it"
    );
    let t = dp.service_traffic(NAME).unwrap();
    assert_eq!(t.packets, fwd, "per-VIP counter matches the forwarded packets");
    // The batched read of every counter (what /metrics shows) gives what
    // reading each one alone gives, and the backends' packets add up.
    let all = dp.all_traffic().unwrap();
    let (spec, total, backends) = all.iter().find(|(s, ..)| s.name == NAME).unwrap();
    assert_eq!(*total, t);
    for (addr, t) in backends {
        assert_eq!(*t, dp.backend_traffic(NAME, *addr).unwrap(), "{addr}");
    }
    assert_eq!(backends.len(), spec.backends.len());
    assert!(backends.iter().all(|(_, b)| b.packets > 0), "every backend got packets: {backends:?}");
    assert_eq!(backends.iter().map(|(_, b)| b.packets).sum::<u64>(), t.packets);

    // Long-lived connections to every backend, then remove backend 3: the
    // connections to the other two keep working, new ones avoid backend 3.
    let mut conns = lab
        .client
        .run(|| (0..30).map(|_| Conn::open()).collect::<Result<Vec<_>, _>>())
        .unwrap()
        .unwrap();
    let owners: Vec<String> = conns.iter_mut().map(|c| c.ask().unwrap()).collect();
    let removed = lab.backends[2].name.clone();
    dp.upsert_service(&service(&lab, &[0, 1])).unwrap();
    let mut kept = 0;
    for (c, owner) in conns.iter_mut().zip(&owners) {
        if *owner == removed {
            continue;
        }
        for _ in 0..3 {
            assert_eq!(&c.ask().expect("an established connection keeps working"), owner);
        }
        kept += 1;
    }
    assert!(kept >= 10, "only {kept} connections to remaining backends");
    let fresh = lab
        .client
        .run(|| {
            (0..30).map(|_| Conn::open().and_then(|mut c| c.ask())).collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap();
    assert!(fresh.iter().all(|n| *n != removed), "new connections avoid the removed backend");
    eprintln!(
        "per backend: {per_backend:?}; ingress rx {rx} for {fwd} forwarded; {kept} connections kept"
    );
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn tcp_over_ipv6_through_xdp_reaches_every_backend_and_replies_bypass_the_ingress() {
    require_root();
    let lab = Lab::new(3).unwrap();
    let (_pins, mut dp) = lab.open_dataplane().unwrap();
    let name = "default/web/v6";
    dp.upsert_service(&ServiceSpec {
        name: name.into(),
        vip: VIP6.into(),
        ports: vec![PortSpec { port: TCP_PORT, protocol: Protocol::Tcp }],
        table_size: 4093,
        backends: lab.backends.iter().map(|b| BackendSpec::new(b.addr6.into(), b.mac)).collect(),
        pin_all_flows: false,
        stage: Stage::Ingress,
    })
    .unwrap();

    let rx_before = lab.ingress_rx_packets().unwrap();
    let fwd_before = forwarded(&dp).unwrap();
    let to = SocketAddr::from((VIP6, TCP_PORT));
    let answers = lab
        .client
        .run(move || {
            (0..60)
                .map(|_| Conn::open_to(to).and_then(|mut c| c.ask()))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("every request to the IPv6 VIP succeeds");
    for b in &lab.backends {
        assert!(answers.contains(&b.name), "{} got no IPv6 connection: {answers:?}", b.name);
    }
    let rx = lab.ingress_rx_packets().unwrap() - rx_before;
    let fwd = forwarded(&dp).unwrap() - fwd_before;
    assert!(fwd >= 60 * 4, "client packets forwarded by XDP: {fwd}");
    assert!(rx < fwd + 20, "the ingress interface saw {rx} packets for {fwd} forwarded ones");
    assert_eq!(dp.service_traffic(name).unwrap().packets, fwd);
}

/// Every request of `n` connections through the VIP is answered, and the
/// answers come from `want` (backend names) only.
fn serves(lab: &Lab, n: usize, want: &[&str]) {
    let answers = lab
        .client
        .run(move || {
            (0..n).map(|_| Conn::open().and_then(|mut c| c.ask())).collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("every request through the VIP succeeds");
    assert!(answers.iter().all(|a| want.contains(&a.as_str())), "{answers:?} not all in {want:?}");
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn a_full_dataplane_refuses_a_service_whole_and_the_others_keep_forwarding() {
    require_root();
    let lab = Lab::new(3).unwrap();
    // Four service ids, eight backend slots, two ring chunks.
    let cap = Capacity { services: 4, backends: 8, ring_chunks: 2 };
    let (_pins, mut dp) = lab.open_dataplane_with(cap).unwrap();
    let mut web = service(&lab, &[0, 1, 2]);
    web.table_size = 16381;
    dp.upsert_service(&web).unwrap();
    let names: Vec<&str> = lab.backends.iter().map(|b| b.name.as_str()).collect();
    serves(&lab, 20, &names);

    // Three more services with one backend each, on other ports, in the
    // other chunk (tables of 251): every service id is taken.
    let small = |name: &str, port: u16, which: &[usize]| {
        let mut s = service(&lab, which);
        s.name = name.into();
        s.ports = vec![PortSpec { port, protocol: Protocol::Tcp }];
        s.table_size = 251;
        s
    };
    for (i, port) in [81, 82, 83].into_iter().enumerate() {
        dp.upsert_service(&small(&format!("default/fill-{i}/v4"), port, &[i])).unwrap();
    }
    let snapshot = |dp: &kube_dsr_agent::dataplane::Dataplane| {
        let mut s: Vec<ServiceSpec> = dp.services().cloned().collect();
        s.sort_by(|a, b| a.name.cmp(&b.name));
        (s, dp.usage())
    };
    let before = snapshot(&dp);
    assert_eq!(before.1.free_services, 0);
    assert_eq!(before.1.free_backends, 2);
    assert_eq!(before.1.free_ring_chunks, 0);

    // No service id left.
    let e = dp.upsert_service(&small("default/late/v4", 84, &[0])).unwrap_err();
    assert!(e.is_capacity(), "{e}");
    assert!(e.to_string().contains("--max-services"), "{e}");
    assert_eq!(snapshot(&dp), before, "a refused new service leaves no trace");

    // Not enough backend slots for a grown service: it keeps what it had.
    let grown = {
        let mut s = small("default/fill-0/v4", 81, &[0, 1, 2]);
        s.backends.push(BackendSpec::new("10.10.0.99".parse().unwrap(), [2, 0, 0, 0, 0, 0x99]));
        s
    };
    let e = dp.upsert_service(&grown).unwrap_err();
    assert!(e.is_capacity() && e.to_string().contains("--max-backends"), "{e}");
    assert_eq!(snapshot(&dp), before, "a refused change leaves the service as it was");

    // Free one id; a service wanting a 65537-slot table finds no ring
    // chunk (both hold smaller tables) and is refused.
    dp.remove_service("default/fill-2/v4").unwrap();
    let before = snapshot(&dp);
    let mut big = small("default/big/v4", 85, &[2]);
    big.table_size = 65537;
    let e = dp.upsert_service(&big).unwrap_err();
    assert!(e.is_capacity() && e.to_string().contains("--ring-mib"), "{e}");
    assert_eq!(snapshot(&dp), before);

    // Through all of it the first service forwarded; a refused port is
    // not a VIP (its packets go to the kernel, nothing answers there).
    serves(&lab, 20, &names);
    let refused = lab
        .client
        .run(|| Conn::open_to(SocketAddr::from((VIP, 85))).and_then(|mut c| c.ask()))
        .unwrap();
    assert!(refused.is_err(), "nothing serves the refused service: {refused:?}");
    // A service that fits still goes in.
    dp.upsert_service(&small("default/fits/v4", 86, &[1])).unwrap();
    serves(&lab, 10, &names);
}
