//! The default dataplane capacity holds one ingress node's share of a big
//! cluster: 1,000 services × 100 backends at tableSize 16381, in one
//! dataplane, read back whole by a restarted owner; beyond that, services
//! are refused whole while the programmed ones stay as they are. Prints
//! what it took (not timed: the figures are for humans).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use kube_dsr_agent::dataplane::{
    BackendSpec, Capacity, Config, Dataplane, PortSpec, Protocol, ServiceSpec, Stage, Start,
};
use kube_dsr_e2e::netns::{NetNs, PinDir};

const SERVICES: u32 = 1000;
const BACKENDS: u32 = 100;
const TABLE: u32 = 16381;

fn service(i: u32) -> ServiceSpec {
    // VIPs 10.200.0.0/16, backends 100.64.0.0/10: all distinct.
    let vip = Ipv4Addr::from(0x0ac8_0000 + i);
    let backends = (0..BACKENDS)
        .map(|j| {
            let n = i * BACKENDS + j;
            let mac = [2, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8, 1];
            BackendSpec::new(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + n)), mac)
        })
        .collect();
    ServiceSpec {
        name: format!("ns-{}/svc-{i}/v4", i % 10),
        vip: vip.into(),
        ports: vec![PortSpec { port: 80, protocol: Protocol::Tcp }],
        table_size: TABLE,
        backends,
        pin_all_flows: false,
        stage: Stage::Ingress,
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn default_capacity_holds_a_thousand_services_of_a_hundred_backends() {
    let ns = NetNs::new("kdsrcap").unwrap();
    ns.exec("ip link add c0 type veth peer name c1 && ip link set c0 up && ip link set c1 up")
        .unwrap();
    let pins = PinDir::new().unwrap();
    let mut cfg = Config::new("c0");
    cfg.pin_dir = pins.path.clone();
    assert_eq!(cfg.capacity, Capacity::default());
    let rss_before = rss_kib();
    let c = cfg.clone();
    let mut dp = ns.run(move || Dataplane::open(&c)).unwrap().unwrap();

    let started = Instant::now();
    for i in 0..SERVICES {
        dp.upsert_service(&service(i)).unwrap_or_else(|e| panic!("service {i}: {e}"));
    }
    let took = started.elapsed();
    let usage = dp.usage();
    assert_eq!(usage.capacity.services - usage.free_services, SERVICES);
    assert_eq!(usage.capacity.backends - usage.free_backends, SERVICES * BACKENDS);
    // Four tables of 16381 per chunk, two per service.
    assert_eq!(usage.capacity.ring_chunks - usage.free_ring_chunks, SERVICES / 2);
    let rss_after = rss_kib();

    // Re-applying changes nothing; one backend less rewrites one service.
    let again = Instant::now();
    for i in 0..SERVICES {
        dp.upsert_service(&service(i)).unwrap();
    }
    let reapply = again.elapsed();
    let mut fewer = service(7);
    fewer.backends.pop();
    let one = Instant::now();
    dp.upsert_service(&fewer).unwrap();
    let one_change = one.elapsed();
    drop(dp);

    // A restarted owner reads all of it back.
    let reopen = Instant::now();
    let c = cfg.clone();
    let mut dp = ns.run(move || Dataplane::open(&c)).unwrap().unwrap();
    let reopened = reopen.elapsed();
    assert_eq!(dp.start(), Start::Adopted);
    assert_eq!(dp.services().count(), SERVICES as usize);
    assert_eq!(dp.usage(), {
        let mut u = usage;
        u.free_backends += 1;
        u
    });

    // The ring fills first: 511 chunks hold 1,022 services at this size.
    let mut extra = SERVICES;
    let refused = loop {
        match dp.upsert_service(&service(extra)) {
            Ok(()) => extra += 1,
            Err(e) => break e,
        }
    };
    assert!(refused.is_capacity(), "{refused}");
    assert!(refused.to_string().contains("--ring-mib"), "{refused}");
    assert_eq!(extra, 1022, "{refused}");
    let before: Vec<ServiceSpec> = dp.services().cloned().collect();
    assert!(dp.upsert_service(&service(extra)).is_err());
    assert_eq!(dp.services().cloned().collect::<Vec<_>>(), before);
    eprintln!(
        "{SERVICES} services x {BACKENDS} backends at tableSize {TABLE}: programmed in {took:?} \
         ({:?} each), re-applied unchanged in {reapply:?}, one backend less in {one_change:?}, \
         read back by a restarted owner in {reopened:?}; process RSS {rss_before} -> {rss_after} \
         KiB; {} services fit in the default ring; then: {refused}",
        took / SERVICES,
        extra
    );
}
