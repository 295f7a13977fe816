//! A round's decisions, pure: from the desired state and what the kernel
//! was seen to hold (routes, neighbour lookups, the services each dataplane
//! holds), what each dataplane must get and what the report says. The
//! worker ([`super::worker`]) only gathers the observations and applies
//! the plan; everything here is tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kube_dsr_crds::nodereport::IngressReport;
use sha2::{Digest, Sha256};

use crate::dataplane::{BackendSpec, ServiceSpec, Stage};
use crate::neigh::{self, Iface, Lookup, Route};

use super::desired::{Desired, IngressService, SvcKey};

/// The dataplane's name for one VIP of a service: `<ns>/<name>/<v4|v6>`, or
/// a digest of it when that is longer than the dataplane allows.
pub fn dataplane_name(key: &SvcKey, vip: IpAddr) -> String {
    let family = if vip.is_ipv4() { "v4" } else { "v6" };
    let name = format!("{key}/{family}");
    if name.len() <= crate::dataplane::spec::MAX_NAME_LEN {
        return name;
    }
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}/{family}")
}

/// Both names a service may hold (so an erroring service keeps its state).
pub fn names_of(key: &SvcKey) -> [String; 2] {
    [
        dataplane_name(key, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        dataplane_name(key, IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
    ]
}

/// What was seen of one ingress service's surroundings, to choose its
/// interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceObs {
    /// `spec.ingress.interface` looked up (`None` when the spec names none).
    pub named: Option<Result<Iface, String>>,
    /// Route toward each backend, in the service's backend order (an
    /// `Err` is a failed lookup, not an unroutable address).
    pub backend_routes: Vec<(IpAddr, Result<Route, String>)>,
    /// The dataplane already holding the service, if any.
    pub held: Option<Iface>,
    /// Route toward each VIP.
    pub vip_routes: Vec<Route>,
}

/// Which interface serves a service: the one the spec names, else the one
/// the route toward its first routable backend leaves through, else the one
/// whose dataplane holds it already (so a service that lost every backend
/// is reprogrammed empty, not left forwarding to gone pods), else the route
/// toward its VIP. `Ok(None)`: no backend and no interface known — nothing
/// to program yet.
pub fn choose_interface(obs: &InterfaceObs) -> Result<Option<Iface>, String> {
    if let Some(named) = &obs.named {
        return named.clone().map(Some);
    }
    for (addr, route) in &obs.backend_routes {
        match route {
            Ok(Route::Unicast { oif, .. }) => return Ok(Some(oif.clone())),
            Ok(_) => continue,
            Err(e) => return Err(format!("route lookup for {addr}: {e}")),
        }
    }
    if obs.held.is_some() {
        return Ok(obs.held.clone());
    }
    for r in &obs.vip_routes {
        if let Route::Unicast { oif, .. } = r {
            return Ok(Some(oif.clone()));
        }
    }
    if obs.backend_routes.is_empty() {
        return Ok(None);
    }
    Err("no route toward the backends or the VIP to choose an interface from; \
         set spec.ingress.interface"
        .into())
}

/// One ingress service's plan for this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicePlan {
    /// No backend and no interface known yet; nothing to program.
    NoInterface,
    /// It could not be planned (the error); the dataplane keeps what it has.
    Keep(String),
    Program {
        iface: Iface,
        specs: Vec<ServiceSpec>,
        /// Backends that cannot be programmed, with the reason.
        unprogrammed: Vec<String>,
        /// Some of them are being resolved: look again soon.
        resolving: bool,
    },
}

/// The specs of service `s` on `iface`, given every backend's neighbour
/// lookup on it.
pub fn plan_service(
    s: &IngressService,
    iface: &Iface,
    lookups: &BTreeMap<IpAddr, Lookup>,
) -> ServicePlan {
    let addrs: Vec<IpAddr> =
        s.vips.iter().flat_map(|v| v.backends.iter().map(|b| b.addr)).collect();
    let plan = neigh::plan(&addrs, lookups);
    let mut unprogrammed = Vec::new();
    let mut resolving = false;
    for (addr, status) in &plan.status {
        match status {
            neigh::Status::Resolved => {}
            neigh::Status::Pending => {
                resolving = true;
                unprogrammed.push(format!("{addr}: resolving its MAC"))
            }
            neigh::Status::Unknown => unprogrammed.push(format!("{addr}: not looked up")),
            neigh::Status::Unreachable(why) | neigh::Status::NotAdjacent(why) => {
                unprogrammed.push(why.clone())
            }
        }
    }
    let specs = s
        .vips
        .iter()
        .map(|v| {
            let mut ports = v.ports.clone();
            ports.sort();
            let backends = v
                .backends
                .iter()
                .filter_map(|b| {
                    let t = plan.program.get(&b.addr)?;
                    // Backends are looked up on the ingress interface only,
                    // so every frame leaves where it came in (`XDP_TX`).
                    debug_assert_eq!(t.egress.index, iface.index);
                    Some(BackendSpec { draining: b.draining, ..BackendSpec::new(b.addr, t.mac) })
                })
                .collect();
            ServiceSpec {
                name: dataplane_name(&s.key, v.vip),
                vip: v.vip,
                ports,
                table_size: s.table_size,
                backends,
                pin_all_flows: false,
                stage: Stage::Ingress,
            }
        })
        .collect();
    ServicePlan::Program { iface: iface.clone(), specs, unprogrammed, resolving }
}

/// Whether the dataplane's copy `held` already equals `want` (backends are
/// held sorted by address).
pub fn same_spec(held: &ServiceSpec, want: &ServiceSpec) -> bool {
    let mut b = want.backends.clone();
    b.sort_by_key(|b| b.addr);
    held.vip == want.vip
        && held.ports == want.ports
        && held.table_size == want.table_size
        && held.backends == b
        && held.pin_all_flows == want.pin_all_flows
        && held.stage == want.stage
}

/// What to change on one dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneChanges {
    /// Held and no longer wanted here: removed first (a service may have
    /// moved to another interface, or released a port another one claims).
    pub remove: Vec<String>,
    /// Wanted and different from what is held (or not held).
    pub upsert: Vec<ServiceSpec>,
    /// Wanted and already held as wanted.
    pub unchanged: Vec<String>,
}

/// Per dataplane (interface name), the changes that turn `held` into
/// `wanted`; names in `keep` are left alone wherever they are.
pub fn diff(
    wanted: &BTreeMap<String, Vec<ServiceSpec>>,
    keep: &BTreeSet<String>,
    held: &BTreeMap<String, Vec<ServiceSpec>>,
) -> BTreeMap<String, DataplaneChanges> {
    let mut out: BTreeMap<String, DataplaneChanges> = BTreeMap::new();
    for (ifname, specs) in held {
        let want: BTreeSet<&str> = wanted
            .get(ifname)
            .into_iter()
            .flatten()
            .map(|s| s.name.as_str())
            .chain(keep.iter().map(String::as_str))
            .collect();
        let c = out.entry(ifname.clone()).or_default();
        c.remove =
            specs.iter().map(|s| s.name.clone()).filter(|n| !want.contains(n.as_str())).collect();
    }
    for (ifname, specs) in wanted {
        let c = out.entry(ifname.clone()).or_default();
        let held = held.get(ifname);
        for spec in specs {
            match held.and_then(|h| h.iter().find(|h| h.name == spec.name)) {
                Some(h) if same_spec(h, spec) => c.unchanged.push(spec.name.clone()),
                _ => c.upsert.push(spec.clone()),
            }
        }
    }
    out
}

/// What came of the plan of one service, for its report.
pub struct RoundPlan {
    pub services: BTreeMap<SvcKey, ServicePlan>,
    /// Per interface, every spec wanted there.
    pub wanted: BTreeMap<String, Vec<ServiceSpec>>,
    /// Names left as they are (their service could not be planned).
    pub keep: BTreeSet<String>,
}

/// Gathers the per-service plans into what each dataplane must hold.
pub fn round_plan(services: BTreeMap<SvcKey, ServicePlan>) -> RoundPlan {
    let mut wanted: BTreeMap<String, Vec<ServiceSpec>> = BTreeMap::new();
    let mut keep = BTreeSet::new();
    for (key, p) in &services {
        match p {
            ServicePlan::NoInterface => {}
            ServicePlan::Keep(_) => keep.extend(names_of(key)),
            ServicePlan::Program { iface, specs, .. } => {
                wanted.entry(iface.name.clone()).or_default().extend(specs.iter().cloned())
            }
        }
    }
    RoundPlan { services, wanted, keep }
}

/// Per ingress service, its report: `programmed` holds, per spec name,
/// the number of backends taking new flows once programmed, or why
/// programming failed.
pub fn ingress_reports(
    d: &Desired,
    plan: &RoundPlan,
    programmed: &BTreeMap<String, Result<usize, String>>,
) -> Vec<IngressReport> {
    let mut out = Vec::new();
    for s in &d.ingress {
        let mut report = IngressReport {
            namespace: s.key.namespace.clone(),
            name: s.key.name.clone(),
            observed_generation: 0,
            programmed_vips: Vec::new(),
            announced_vips: Vec::new(),
            backends: 0,
            error: None,
        };
        match plan.services.get(&s.key) {
            None => {}
            Some(ServicePlan::NoInterface) => {
                report.error = Some(
                    "no backends yet, and no route toward the VIP to choose an interface \
                     (set spec.ingress.interface to program it before backends exist)"
                        .into(),
                );
            }
            Some(ServicePlan::Keep(e)) => report.error = Some(e.clone()),
            Some(ServicePlan::Program { specs, unprogrammed, .. }) => {
                if !unprogrammed.is_empty() {
                    report.error = Some(format!(
                        "{} backend(s) not programmed: {}",
                        unprogrammed.len(),
                        unprogrammed.join("; ")
                    ));
                }
                let mut all_ok = true;
                for spec in specs {
                    match programmed.get(&spec.name) {
                        Some(Ok(n)) => {
                            report.backends += i32::try_from(*n).unwrap_or(i32::MAX);
                            report.programmed_vips.push(spec.vip.to_string());
                        }
                        Some(Err(e)) => {
                            all_ok = false;
                            report.error = Some(e.clone());
                        }
                        None => all_ok = false,
                    }
                }
                if all_ok {
                    report.observed_generation = s.generation;
                }
            }
        }
        out.push(report);
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::desired::{DesiredBackend, VipService};
    use crate::dataplane::{PortSpec, Protocol};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn iface(index: u32, name: &str) -> Iface {
        Iface { index, name: name.into() }
    }

    fn key(name: &str) -> SvcKey {
        SvcKey { namespace: "default".into(), name: name.into() }
    }

    fn service(name: &str, backends: &[(&str, bool)]) -> IngressService {
        IngressService {
            key: key(name),
            generation: 7,
            interface: None,
            announce: true,
            table_size: 251,
            vips: vec![VipService {
                vip: ip("192.0.2.10"),
                ports: vec![
                    PortSpec { port: 80, protocol: Protocol::Udp },
                    PortSpec { port: 80, protocol: Protocol::Tcp },
                ],
                backends: backends
                    .iter()
                    .map(|(a, draining)| DesiredBackend {
                        addr: ip(a),
                        active: !draining,
                        draining: *draining,
                    })
                    .collect(),
            }],
            ingress_nodes: vec!["n1".into()],
            preferred_announcer: Default::default(),
        }
    }

    #[test]
    fn dataplane_names_fit_and_are_stable() {
        let short = key("web");
        assert_eq!(dataplane_name(&short, ip("192.0.2.1")), "default/web/v4");
        assert_eq!(dataplane_name(&short, ip("2001:db8::1")), "default/web/v6");
        let long = SvcKey { namespace: "n".repeat(63), name: "s".repeat(63) };
        let a = dataplane_name(&long, ip("192.0.2.1"));
        assert!(a.len() <= crate::dataplane::spec::MAX_NAME_LEN, "{a}");
        assert!(a.ends_with("/v4"));
        assert_eq!(a, dataplane_name(&long, ip("192.0.2.9")), "family, not address");
        let other = SvcKey { namespace: "n".repeat(63), name: "t".repeat(63) };
        assert_ne!(a, dataplane_name(&other, ip("192.0.2.1")));
        assert_eq!(names_of(&short), ["default/web/v4".to_string(), "default/web/v6".to_string()]);
    }

    #[test]
    fn interface_choice_order() {
        let eth0 = iface(2, "eth0");
        let eth1 = iface(3, "eth1");
        let uni = |i: &Iface| Route::Unicast { oif: i.clone(), gateway: None };
        let b = ip("10.0.0.5");
        // The spec's name wins over everything.
        let obs = InterfaceObs {
            named: Some(Ok(eth1.clone())),
            backend_routes: vec![(b, Ok(uni(&eth0)))],
            ..Default::default()
        };
        assert_eq!(choose_interface(&obs), Ok(Some(eth1.clone())));
        let obs =
            InterfaceObs { named: Some(Err("no such interface".into())), ..Default::default() };
        assert_eq!(choose_interface(&obs), Err("no such interface".into()));
        // First backend with a unicast route; local ones are skipped.
        let obs = InterfaceObs {
            backend_routes: vec![
                (ip("10.0.0.1"), Ok(Route::Other { kind: "local" })),
                (b, Ok(uni(&eth0))),
            ],
            held: Some(eth1.clone()),
            ..Default::default()
        };
        assert_eq!(choose_interface(&obs), Ok(Some(eth0.clone())));
        // A failed lookup is an error, not a reason to guess.
        let obs =
            InterfaceObs { backend_routes: vec![(b, Err("EPERM".into()))], ..Default::default() };
        assert_eq!(choose_interface(&obs), Err("route lookup for 10.0.0.5: EPERM".into()));
        // No backend: where it is held, else toward the VIP, else nothing.
        let obs = InterfaceObs {
            held: Some(eth1.clone()),
            vip_routes: vec![uni(&eth0)],
            ..Default::default()
        };
        assert_eq!(choose_interface(&obs), Ok(Some(eth1.clone())));
        let obs = InterfaceObs { vip_routes: vec![uni(&eth0)], ..Default::default() };
        assert_eq!(choose_interface(&obs), Ok(Some(eth0.clone())));
        assert_eq!(choose_interface(&InterfaceObs::default()), Ok(None));
        // Backends none of which is routable, nothing else known.
        let obs = InterfaceObs {
            backend_routes: vec![(b, Ok(Route::Unroutable { why: "unreachable".into() }))],
            ..Default::default()
        };
        assert!(choose_interface(&obs).unwrap_err().contains("set spec.ingress.interface"));
    }

    #[test]
    fn service_plan_programs_resolved_backends_and_says_why_not_the_rest() {
        let eth0 = iface(2, "eth0");
        let s = service(
            "web",
            &[("10.0.0.1", false), ("10.0.0.2", true), ("10.0.0.3", false), ("10.0.0.4", false)],
        );
        let lookups = BTreeMap::from([
            (ip("10.0.0.1"), Lookup::Resolved { mac: [2, 0, 0, 0, 0, 1], egress: eth0.clone() }),
            (ip("10.0.0.2"), Lookup::Resolved { mac: [2, 0, 0, 0, 0, 2], egress: eth0.clone() }),
            (ip("10.0.0.3"), Lookup::Pending { egress: eth0.clone() }),
            (
                ip("10.0.0.4"),
                Lookup::NotAdjacent { reason: "route to 10.0.0.4 goes via gateway".into() },
            ),
        ]);
        let ServicePlan::Program { iface, specs, unprogrammed, resolving } =
            plan_service(&s, &eth0, &lookups)
        else {
            panic!("not programmed")
        };
        assert_eq!(iface, eth0);
        assert!(resolving);
        assert_eq!(
            unprogrammed,
            ["10.0.0.3: resolving its MAC", "route to 10.0.0.4 goes via gateway"]
        );
        assert_eq!(specs.len(), 1);
        let spec = &specs[0];
        assert_eq!(spec.name, "default/web/v4");
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp, "ports sorted");
        let got: Vec<(IpAddr, [u8; 6], bool, Option<_>)> =
            spec.backends.iter().map(|b| (b.addr, b.mac, b.draining, b.egress)).collect();
        assert_eq!(
            got,
            [
                (ip("10.0.0.1"), [2, 0, 0, 0, 0, 1], false, None),
                (ip("10.0.0.2"), [2, 0, 0, 0, 0, 2], true, None)
            ]
        );
    }

    fn spec(name: &str, backends: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: ip("192.0.2.10"),
            ports: vec![PortSpec { port: 80, protocol: Protocol::Tcp }],
            table_size: 251,
            backends: backends
                .iter()
                .map(|a| BackendSpec::new(ip(a), [2, 0, 0, 0, 0, 9]))
                .collect(),
            pin_all_flows: false,
            stage: Stage::Ingress,
        }
    }

    #[test]
    fn diff_removes_moves_keeps_and_upserts_only_what_differs() {
        let held = BTreeMap::from([
            (
                "eth0".to_string(),
                vec![
                    spec("a", &["10.0.0.1", "10.0.0.2"]),
                    spec("b", &["10.0.0.1"]),
                    spec("gone", &[]),
                    spec("kept", &[]),
                ],
            ),
            ("eth1".to_string(), vec![spec("moved", &[])]),
        ]);
        let wanted = BTreeMap::from([
            // `a` wanted with the same backends in another order (the
            // dataplane holds them sorted): unchanged.
            (
                "eth0".to_string(),
                vec![
                    spec("a", &["10.0.0.2", "10.0.0.1"]),
                    spec("b", &["10.0.0.3"]),
                    spec("moved", &[]),
                ],
            ),
            ("eth2".to_string(), vec![spec("new", &["10.0.0.1"])]),
        ]);
        let keep = BTreeSet::from(["kept".to_string()]);
        let d = diff(&wanted, &keep, &held);
        assert_eq!(d["eth0"].remove, ["gone"]);
        assert_eq!(d["eth0"].unchanged, ["a"]);
        assert_eq!(
            d["eth0"].upsert.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["b", "moved"]
        );
        assert_eq!(d["eth1"].remove, ["moved"]);
        assert!(d["eth1"].upsert.is_empty());
        assert_eq!(d["eth2"].upsert.len(), 1);
        assert!(d["eth2"].remove.is_empty());
    }

    #[test]
    fn reports_follow_the_plan_and_what_was_programmed() {
        let eth0 = iface(2, "eth0");
        let d = Desired {
            ingress: vec![
                service("a", &[]),
                service("b", &[]),
                service("c", &[]),
                service("d", &[]),
            ],
            pods: vec![],
        };
        let spec_a = spec(&dataplane_name(&key("a"), ip("192.0.2.10")), &["10.0.0.1"]);
        let spec_d = spec(&dataplane_name(&key("d"), ip("192.0.2.10")), &[]);
        let services = BTreeMap::from([
            (
                key("a"),
                ServicePlan::Program {
                    iface: eth0.clone(),
                    specs: vec![spec_a.clone()],
                    unprogrammed: vec!["x: resolving its MAC".into()],
                    resolving: true,
                },
            ),
            (key("b"), ServicePlan::NoInterface),
            (key("c"), ServicePlan::Keep("route lookup failed".into())),
            (
                key("d"),
                ServicePlan::Program {
                    iface: eth0.clone(),
                    specs: vec![spec_d.clone()],
                    unprogrammed: vec![],
                    resolving: false,
                },
            ),
        ]);
        let plan = round_plan(services);
        assert_eq!(plan.wanted["eth0"].len(), 2);
        assert_eq!(plan.keep, BTreeSet::from(names_of(&key("c"))));
        let programmed = BTreeMap::from([
            (spec_a.name.clone(), Ok(1)),
            (spec_d.name.clone(), Err("VIP table full".to_string())),
        ]);
        let r = ingress_reports(&d, &plan, &programmed);
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].observed_generation, r[0].backends), (7, 1));
        assert_eq!(r[0].programmed_vips, ["192.0.2.10"]);
        assert_eq!(
            r[0].error.as_deref(),
            Some("1 backend(s) not programmed: x: resolving its MAC")
        );
        assert!(r[1].error.as_deref().unwrap().starts_with("no backends yet"));
        assert_eq!(r[1].observed_generation, 0);
        assert_eq!(r[2].error.as_deref(), Some("route lookup failed"));
        assert_eq!(r[3].observed_generation, 0, "a failed upsert is not observed");
        assert_eq!(r[3].error.as_deref(), Some("VIP table full"));
    }
}
