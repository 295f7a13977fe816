//! A restarted dataplane owner reads back exactly what was programmed, and
//! re-applying the same specs changes nothing (no table flip, no lost pin).

use std::net::IpAddr;

use kube_dsr_agent::dataplane::{
    BackendSpec, Config, Dataplane, Egress, PortSpec, Protocol, ServiceSpec, Stage, Start,
};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    require_root,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn specs(egress: Egress) -> Vec<ServiceSpec> {
    let mut drained = BackendSpec::new(ip("10.0.0.3"), [2, 0, 0, 0, 0, 3]);
    drained.draining = true;
    let mut heavy = BackendSpec::new(ip("10.0.0.2"), [2, 0, 0, 0, 0, 2]);
    heavy.weight = 5;
    let mut far = BackendSpec::new(ip("10.0.0.4"), [2, 0, 0, 0, 0, 4]);
    far.egress = Some(egress);
    vec![
        ServiceSpec {
            name: "a/web/v4".into(),
            vip: ip("192.0.2.10"),
            ports: vec![
                PortSpec { port: 80, protocol: Protocol::Tcp },
                PortSpec { port: 443, protocol: Protocol::Tcp },
                PortSpec { port: 443, protocol: Protocol::Udp },
            ],
            table_size: 4093,
            backends: vec![
                BackendSpec::new(ip("10.0.0.1"), [2, 0, 0, 0, 0, 1]),
                heavy,
                drained,
                far,
            ],
            pin_all_flows: false,
            stage: Stage::Ingress,
        },
        ServiceSpec {
            name: "a/web/v6".into(),
            vip: ip("2001:db8::10"),
            ports: vec![PortSpec { port: 443, protocol: Protocol::Udp }],
            table_size: 251,
            backends: vec![BackendSpec::new(ip("fd00::1"), [2, 0, 0, 0, 0, 0x61])],
            pin_all_flows: true,
            stage: Stage::Ingress,
        },
        ServiceSpec {
            name: "a/empty/v4".into(),
            vip: ip("192.0.2.20"),
            ports: vec![PortSpec { port: 8080, protocol: Protocol::Tcp }],
            table_size: 65537,
            backends: vec![],
            pin_all_flows: false,
            stage: Stage::Ingress,
        },
    ]
}

/// What `services()` returns: ports and backends sorted.
fn normalized(mut s: ServiceSpec) -> ServiceSpec {
    s.ports.sort();
    s.backends.sort_by_key(|b| b.addr);
    s
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn restart_reads_back_every_service_and_reapplying_is_a_no_op() {
    require_root();
    let ns = NetNs::new("kdsrad").unwrap();
    ns.exec("ip link add a0 type veth peer name a1 && ip link add e0 type veth peer name e1 && ip link set a0 up && ip link set a1 up && ip link set e0 up").unwrap();
    let egress = Egress {
        ifindex: ns.exec("cat /sys/class/net/e0/ifindex").unwrap().trim().parse().unwrap(),
        mac: ns.mac("e0").unwrap(),
    };
    let pins = PinDir::new().unwrap();
    let mut cfg = Config::new("a0");
    cfg.pin_dir = pins.path.clone();
    let want: Vec<ServiceSpec> = specs(egress).into_iter().map(normalized).collect();

    let c = cfg.clone();
    let mut dp = ns.run(move || Dataplane::open(&c)).unwrap().unwrap();
    assert_eq!(dp.start(), Start::Fresh);
    for s in &want {
        dp.upsert_service(s).unwrap();
    }
    // A change after which a previous table exists: it must survive too.
    let mut moved = want[0].clone();
    moved.backends.retain(|b| b.addr != ip("10.0.0.1"));
    dp.upsert_service(&moved).unwrap();
    drop(dp);

    let c = cfg.clone();
    let mut dp = ns.run(move || Dataplane::open(&c)).unwrap().unwrap();
    assert_eq!(dp.start(), Start::Adopted);
    let mut got: Vec<ServiceSpec> = dp.services().cloned().collect();
    got.sort_by(|a, b| a.name.cmp(&b.name));
    let mut expect = vec![moved.clone(), want[1].clone(), want[2].clone()];
    expect.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(got, expect, "read back what was programmed");
    // Reapplying the same spec flips nothing; a real change does.
    let rows = dp.service_rows("a/web/v4").unwrap();
    assert!(rows.1.is_some(), "the previous table survived the restart: {rows:?}");
    dp.upsert_service(&moved).unwrap();
    assert_eq!(dp.service_rows("a/web/v4").unwrap(), rows, "an unchanged table is not rewritten");
    dp.upsert_service(&want[0]).unwrap();
    let after = dp.service_rows("a/web/v4").unwrap();
    assert_eq!(after.1, Some(rows.0), "the replaced table becomes the previous one");
    assert_ne!(after.0, rows.0);
    assert_ne!(Some(after.0), rows.1, "the new table is written into the idle row");
    assert_eq!(dp.settle(std::time::Duration::ZERO).unwrap().previous_dropped, 1);
    assert_eq!(dp.service_rows("a/web/v4").unwrap().1, None);
    dp.remove_service("a/empty/v4").unwrap();
    drop(dp);

    let mut dp = ns.run(move || Dataplane::open(&cfg)).unwrap().unwrap();
    let names: Vec<String> = dp.services().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["a/web/v4", "a/web/v6"]);
    // Slots freed by removals are reused.
    let mut big = want[2].clone();
    big.backends = (0..50)
        .map(|i| BackendSpec::new(ip(&format!("10.1.0.{i}")), [2, 1, 0, 0, 0, i as u8]))
        .collect();
    dp.upsert_service(&big).unwrap();
    assert_eq!(dp.services().count(), 3);
}
