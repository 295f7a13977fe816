//! A round's decisions, pure: from the desired state and what the kernel
//! was seen to hold (routes, neighbour lookups, the services each dataplane
//! holds), what each dataplane must get and what the report says. The
//! worker ([`super::worker`]) only gathers the observations and applies
//! the plan; everything here is tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use kube_dsr_crds::nodereport::{
    BackendReport, Delivery, IngressErrorReason, IngressReport, MAX_UNREACHED, ReachCounts,
    UnreachedBackend,
};
use sha2::{Digest, Sha256};

use crate::dataplane::{BackendSpec, Egress, Reach, ServiceSpec, Stage};
use crate::neigh::{Iface, Lookup, Route};

use super::backoff::Failure;
use super::desired::{Desired, IngressService, SvcKey};
use super::worker::chain;
use crate::error::ErrorKind;

/// Why a service could not be planned this round (its dataplane keeps what
/// it holds). It reads, causes included, as the report shows it. The
/// causes are shared ([`Arc`]) because a plan is kept between rounds.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PlanError {
    /// The interface `spec.ingress.interface` names could not be looked up.
    #[error("interface {name}: {}", chain(.cause.as_ref()))]
    Interface { name: String, cause: Arc<crate::Error> },
    /// The route lookup toward a backend failed.
    #[error("route lookup for {addr}: {}", chain(.cause.as_ref()))]
    Route { addr: IpAddr, cause: Arc<crate::Error> },
    /// Backends, none of them routable, and nothing else to go by.
    #[error(
        "no route toward the backends or the VIP to choose an interface from; \
         set spec.ingress.interface"
    )]
    NoRoute,
    /// The resolver could not be opened, or a lookup round failed.
    #[error("{}", chain(.0.as_ref()))]
    Neighbour(Arc<crate::Error>),
}

impl PlanError {
    /// Planning fails on routes and neighbour lookups.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Neighbour
    }
}

impl From<crate::Error> for PlanError {
    fn from(e: crate::Error) -> Self {
        Self::Neighbour(Arc::new(e))
    }
}

/// Why a local pod's interface is not known this round; reads in full.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PodLinkError {
    /// Finding or reading the pod's interface failed.
    #[error("{}", chain(.0.as_ref()))]
    Link(Arc<crate::Error>),
    /// The scan of `/proc` for pod namespaces failed.
    #[error("scanning /proc: {}", chain(.0.as_ref()))]
    Scan(Arc<crate::Error>),
}

/// Why the reply program is not on a host-side interface; reads in full.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("no dataplane on the node interface")]
    NoDataplane,
    #[error("{}", chain(.0))]
    Attach(crate::Error),
}

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

/// The dataplane's name for the node stage of one VIP of a service:
/// `<ns>/<name>/<v4|v6>/node`, or a digest when too long.
pub fn node_stage_name(key: &SvcKey, vip: IpAddr) -> String {
    let family = if vip.is_ipv4() { "v4" } else { "v6" };
    let name = format!("{key}/{family}/node");
    if name.len() <= crate::dataplane::spec::MAX_NAME_LEN {
        return name;
    }
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}/{family}/node")
}

/// Both ingress-stage names a service may hold (so an erroring service
/// keeps its state).
pub fn names_of(key: &SvcKey) -> [String; 2] {
    [
        dataplane_name(key, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        dataplane_name(key, IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
    ]
}

/// What was seen of one ingress service's surroundings, to choose its
/// interface.
#[derive(Clone, Debug, Default)]
pub struct InterfaceObs {
    /// `spec.ingress.interface` looked up (`None` when the spec names none).
    pub named: Option<Result<Iface, PlanError>>,
    /// Route toward each backend, in the service's backend order (an
    /// `Err` is a failed lookup, not an unroutable address).
    pub backend_routes: Vec<(IpAddr, Result<Route, Arc<crate::Error>>)>,
    /// The dataplane already holding the service, if any.
    pub held: Option<Iface>,
    /// The node interface (facing the other nodes), if known.
    pub node: Option<Iface>,
    /// Route toward each VIP.
    pub vip_routes: Vec<Route>,
}

/// Which interface serves a service: the one the spec names, else the one
/// the route toward its first routable backend on another node leaves
/// through, else the one whose dataplane holds it already (so a service that
/// lost every backend is reprogrammed empty, not left forwarding to gone
/// pods), else the node interface, else the route toward its VIP. `Ok(None)`: no backend and no interface known — nothing
/// to program yet.
pub fn choose_interface(obs: &InterfaceObs) -> Result<Option<Iface>, PlanError> {
    if let Some(named) = &obs.named {
        return named.clone().map(Some);
    }
    for (addr, route) in &obs.backend_routes {
        match route {
            Ok(Route::Unicast { oif, .. }) => return Ok(Some(oif.clone())),
            Ok(_) => continue,
            Err(e) => return Err(PlanError::Route { addr: *addr, cause: Arc::clone(e) }),
        }
    }
    if obs.held.is_some() {
        return Ok(obs.held.clone());
    }
    if obs.node.is_some() {
        return Ok(obs.node.clone());
    }
    for r in &obs.vip_routes {
        if let Route::Unicast { oif, .. } = r {
            return Ok(Some(oif.clone()));
        }
    }
    if obs.backend_routes.is_empty() {
        return Ok(None);
    }
    Err(PlanError::NoRoute)
}

/// One ingress service's plan for this round.
#[derive(Clone, Debug)]
pub enum ServicePlan {
    /// No backend and no interface known yet; nothing to program.
    NoInterface,
    /// It could not be planned (the error); the dataplane keeps what it has.
    Keep(PlanError),
    Program {
        iface: Iface,
        specs: Vec<ServiceSpec>,
        /// Backends that cannot be reached, with the reason.
        unreached: Vec<UnreachedBackend>,
        /// How the reached ones are reached.
        reach: ReachCounts,
        /// Some are being resolved: look again soon.
        resolving: bool,
    },
}

/// How this node delivers one of its local pod addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalPath {
    /// Behind its host-side interface (a veth whose peer is the pod's
    /// interface): the node stage delivers it.
    NodeStage { host: Iface },
    /// On the node's segment (bridged, macvlan): ingress nodes reach its
    /// MAC directly.
    Segment,
    /// Neither; why.
    Unreachable(String),
}

/// Classifies a local pod address from the node's route toward it and the
/// pod interface's veth peer (`IFLA_LINK` read inside the pod; `None` when
/// unknown or not a veth): behind the route's output interface when that is
/// the pod's own peer; on the segment when the route is on-link through the
/// node interface (or no node interface is known).
pub fn local_path(
    addr: IpAddr,
    route: &crate::Result<Route>,
    pod_peer: Option<u32>,
    host_peer: Option<u32>,
    pod_ifindex: Option<u32>,
    node_iface: Option<&Iface>,
) -> LocalPath {
    match route {
        Err(e) => LocalPath::Unreachable(format!("route lookup for {addr}: {}", chain(e))),
        Ok(Route::Unicast { oif, gateway: None }) => {
            // Both ends name each other: the pod's interface is the peer of
            // the route's output interface. (Indexes are per namespace, so
            // one direction alone could match by chance.)
            let paired =
                pod_peer == Some(oif.index) && host_peer.is_some() && host_peer == pod_ifindex;
            if paired {
                LocalPath::NodeStage { host: oif.clone() }
            } else if node_iface.is_none_or(|n| n.index == oif.index) {
                LocalPath::Segment
            } else {
                LocalPath::Unreachable(format!(
                    "route to {addr} leaves through {oif}, which is neither the pod's host-side \
                     interface nor the node interface {}",
                    node_iface.map(|n| n.name.as_str()).unwrap_or_default()
                ))
            }
        }
        Ok(Route::Unicast { oif, gateway: Some(gw) }) => LocalPath::Unreachable(format!(
            "route to {addr} goes via gateway {gw} on {oif}, not to a local pod"
        )),
        Ok(Route::Other { kind }) => {
            LocalPath::Unreachable(format!("the route to {addr} is of type {kind}"))
        }
        Ok(Route::Unroutable { why }) => {
            LocalPath::Unreachable(format!("no route to {addr}: {why}"))
        }
    }
}

/// What was observed of this node's local pods for its node stage.
#[derive(Clone, Debug, Default)]
pub struct LocalObs {
    /// Per local pod address, how it can be delivered.
    pub paths: BTreeMap<IpAddr, LocalPath>,
    /// Neighbour lookups of `NodeStage` addresses on their host-side
    /// interfaces.
    pub lookups: BTreeMap<IpAddr, Lookup>,
    /// MACs of the host-side interfaces, by index.
    pub host_macs: BTreeMap<u32, [u8; 6]>,
    /// GRO inside each pod (by UID, lowercase) as read back, or why not.
    pub gro: BTreeMap<String, Result<Option<bool>, PodLinkError>>,
}

/// How one local pod address is delivered, after planning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Held by the node-stage specs, behind `host`.
    NodeStage {
        host: Iface,
    },
    Segment,
    /// Its MAC is being resolved.
    Pending(String),
    No(String),
}

/// The node stage of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStagePlan {
    /// Where the node-stage specs go: the node interface.
    pub iface: Option<Iface>,
    pub specs: Vec<ServiceSpec>,
    /// Per local pod address.
    pub delivered: BTreeMap<IpAddr, Delivered>,
    /// Host-side interfaces that need the reply program.
    pub replies: BTreeSet<u32>,
    pub resolving: bool,
}

/// Every service with endpoints here gets, per VIP with a pod behind a
/// host-side interface, a node-stage spec on the node interface holding
/// those pods (ready ones take new flows, the others drain). A pod is
/// left out, with the reason, while its MAC is unresolved or GRO is not on
/// inside it (XDP redirect into its veth would drop every frame).
pub fn plan_node_stage(d: &Desired, node_iface: Option<&Iface>, obs: &LocalObs) -> NodeStagePlan {
    let mut out = NodeStagePlan { iface: node_iface.cloned(), ..Default::default() };
    for svc in &d.node_stage {
        for v in &svc.vips {
            let mut backends = Vec::new();
            let mut any_node_stage = false;
            for p in &v.pods {
                let verdict = match obs.paths.get(&p.addr) {
                    None => Delivered::No(format!("{}: not looked at", p.addr)),
                    Some(LocalPath::Segment) => Delivered::Segment,
                    Some(LocalPath::Unreachable(why)) => Delivered::No(why.clone()),
                    Some(LocalPath::NodeStage { host }) => {
                        any_node_stage = true;
                        out.replies.insert(host.index);
                        let gro = obs.gro.get(&p.uid.to_ascii_lowercase());
                        match (node_iface, obs.lookups.get(&p.addr), gro) {
                            (None, ..) => Delivered::No(
                                "no node interface for the node stage (set --node-interface)"
                                    .into(),
                            ),
                            (_, _, Some(Err(e))) => Delivered::No(format!("pod interface: {e}")),
                            (_, _, None) => Delivered::No("pod interface not looked at".into()),
                            (_, _, Some(Ok(g))) if *g != Some(true) => Delivered::No(format!(
                                "GRO is not on inside the pod (read back {g:?}); XDP redirect into \
                                 its veth would drop frames"
                            )),
                            (Some(_), Some(Lookup::Resolved { mac, .. }), _) => {
                                match obs.host_macs.get(&host.index) {
                                    Some(src) => {
                                        let mut b = BackendSpec::pod(
                                            p.addr,
                                            *mac,
                                            Egress { ifindex: host.index, mac: *src },
                                        );
                                        b.draining = !p.active;
                                        backends.push(b);
                                        Delivered::NodeStage { host: host.clone() }
                                    }
                                    None => Delivered::No(format!("{host} has no MAC")),
                                }
                            }
                            (_, Some(Lookup::Pending { .. }), _) | (_, None, _) => {
                                out.resolving = true;
                                Delivered::Pending(format!(
                                    "{}: resolving its MAC on {host}",
                                    p.addr
                                ))
                            }
                            (_, Some(Lookup::Unreachable { why, .. }), _) => {
                                Delivered::No(why.clone())
                            }
                            (_, Some(Lookup::NotAdjacent { reason }), _) => {
                                Delivered::No(reason.to_string())
                            }
                        }
                    }
                };
                out.delivered.insert(p.addr, verdict);
            }
            if any_node_stage && node_iface.is_some() {
                let mut ports = v.ports.clone();
                ports.sort();
                out.specs.push(ServiceSpec {
                    name: node_stage_name(&svc.key, v.vip),
                    vip: v.vip,
                    ports,
                    table_size: node_stage_table_size(svc.table_size, v.pods.len()),
                    backends,
                    pin_all_flows: false,
                    stage: Stage::Node,
                });
            }
        }
    }
    out
}

/// The Maglev table size of a node stage with `pods` local pods: at least
/// 100 slots per pod (shares within about 1 %), never above the service's
/// own size. Only this node reads it, so it need not match other nodes'; a
/// node hosting pods of a thousand services keeps a thousand small tables
/// (2 KiB each for a pod or two), not a thousand of the ingress size.
pub fn node_stage_table_size(service: u32, pods: usize) -> u32 {
    let want = 100 * pods.max(1);
    let fits = crate::maglev::TABLE_SIZES.iter().copied().find(|m| *m as usize >= want);
    fits.unwrap_or(u32::MAX).min(service)
}

/// What an ingress service's plan looks at besides its own backends.
pub struct IngressCtx<'a> {
    /// This node's name.
    pub me: &'a str,
    /// Every node's addresses.
    pub nodes: &'a BTreeMap<String, Vec<IpAddr>>,
    /// Lookups on the ingress interface: backend addresses and the
    /// addresses of their nodes.
    pub lookups: &'a BTreeMap<IpAddr, Lookup>,
    /// This node's own pods, from the node-stage plan.
    pub local: &'a BTreeMap<IpAddr, Delivered>,
}

/// A node's address of `vip`'s family on the ingress segment with its
/// MAC, or why it cannot be used.
enum NodeTarget {
    Via { addr: IpAddr, mac: [u8; 6] },
    Pending(String),
    No(String),
}

fn node_target(node: &str, vip: IpAddr, ctx: &IngressCtx<'_>) -> NodeTarget {
    let Some(addrs) = ctx.nodes.get(node) else {
        return NodeTarget::No(format!("node {node} is unknown (no Node object)"));
    };
    let family: Vec<IpAddr> =
        addrs.iter().copied().filter(|a| a.is_ipv4() == vip.is_ipv4()).collect();
    let Some(first) = family.first() else {
        let fam = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
        return NodeTarget::No(format!("node {node} has no {fam} address in its status"));
    };
    let mut not_adjacent = None;
    for a in &family {
        match ctx.lookups.get(a) {
            Some(Lookup::Resolved { mac, .. }) => return NodeTarget::Via { addr: *a, mac: *mac },
            Some(Lookup::Pending { .. }) => {
                return NodeTarget::Pending(format!("node {node}: resolving the MAC of {a}"));
            }
            Some(Lookup::Unreachable { why, .. }) => {
                return NodeTarget::No(format!("node {node} MAC unresolved: {why}"));
            }
            Some(Lookup::NotAdjacent { reason }) => {
                not_adjacent.get_or_insert(reason);
            }
            None => {}
        }
    }
    match not_adjacent {
        Some(r) => NodeTarget::No(format!("node {node} is not on the ingress segment: {r}")),
        None => NodeTarget::No(format!("node {node}: {first} not looked up")),
    }
}

/// The specs of service `s` on `iface`: each backend is reached directly
/// (its own MAC on the segment), as a pod of this node (`Local`, through the
/// node stage), or through its node (`ViaNode`: one entry per node,
/// weighted by its ready pods, draining when it has only draining ones);
/// the rest are listed with the reason.
pub fn plan_service(s: &IngressService, iface: &Iface, ctx: &IngressCtx<'_>) -> ServicePlan {
    let mut unreached = Vec::new();
    let mut reach = ReachCounts::default();
    let mut resolving = false;
    let mut specs = Vec::new();
    for v in &s.vips {
        let mut backends = Vec::new();
        // Per node: (address, MAC, active, draining).
        let mut via: BTreeMap<String, (IpAddr, [u8; 6], u32, u32)> = BTreeMap::new();
        let (mut local_active, mut local_draining) = (0u32, 0u32);
        let mut not = |b: &super::desired::DesiredBackend, reason: String| {
            unreached.push(UnreachedBackend {
                address: b.addr.to_string(),
                node: b.node.as_deref().map(String::from),
                reason,
            })
        };
        for b in &v.backends {
            let direct_miss = match ctx.lookups.get(&b.addr) {
                Some(Lookup::Resolved { mac, .. }) => {
                    backends.push(BackendSpec {
                        draining: b.draining,
                        ..BackendSpec::new(b.addr, *mac)
                    });
                    reach.direct += 1;
                    continue;
                }
                Some(Lookup::Pending { .. }) => {
                    resolving = true;
                    not(b, format!("{}: resolving its MAC", b.addr));
                    continue;
                }
                Some(Lookup::Unreachable { why, .. }) => {
                    not(b, why.clone());
                    continue;
                }
                Some(Lookup::NotAdjacent { reason }) => reason.to_string(),
                None => format!("{}: not looked up", b.addr),
            };
            match b.node.as_deref() {
                None => not(b, direct_miss),
                Some(n) if n == ctx.me => match ctx.local.get(&b.addr) {
                    Some(Delivered::NodeStage { .. }) => {
                        reach.local += 1;
                        if b.active { local_active += 1 } else { local_draining += 1 }
                    }
                    Some(Delivered::Pending(why)) => {
                        resolving = true;
                        not(b, why.clone())
                    }
                    Some(Delivered::No(why)) => {
                        not(b, format!("this node's stage does not deliver it: {why}"))
                    }
                    Some(Delivered::Segment) | None => not(b, direct_miss),
                },
                Some(n) => match node_target(n, v.vip, ctx) {
                    NodeTarget::Via { addr, mac } => {
                        reach.via_node += 1;
                        let e = via.entry(n.to_owned()).or_insert((addr, mac, 0, 0));
                        if b.active { e.2 += 1 } else { e.3 += 1 }
                    }
                    NodeTarget::Pending(why) => {
                        resolving = true;
                        not(b, why)
                    }
                    NodeTarget::No(why) => not(b, why),
                },
            }
        }
        for (addr, mac, active, _) in via.into_values() {
            let mut b = BackendSpec::via_node(addr, mac, active.max(1));
            b.draining = active == 0;
            backends.push(b);
        }
        if local_active + local_draining > 0 {
            let own = ctx
                .nodes
                .get(ctx.me)
                .and_then(|a| a.iter().copied().find(|a| a.is_ipv4() == v.vip.is_ipv4()));
            match own {
                Some(addr) => {
                    let mut b = BackendSpec::local(addr, local_active.max(1));
                    b.draining = local_active == 0;
                    backends.push(b);
                }
                None => {
                    reach.local = 0;
                    let fam = if v.vip.is_ipv4() { "IPv4" } else { "IPv6" };
                    unreached.push(UnreachedBackend {
                        address: format!("{} local pod(s)", local_active + local_draining),
                        node: Some(ctx.me.to_owned()),
                        reason: format!(
                            "this node has no {fam} address in its Node status to key them by"
                        ),
                    });
                }
            }
        }
        // Two entries must not share an address (a pod IP equal to a node
        // IP would be a broken cluster); the dataplane refuses duplicates.
        let mut ports = v.ports.clone();
        ports.sort();
        specs.push(ServiceSpec {
            name: dataplane_name(&s.key, v.vip),
            vip: v.vip,
            ports,
            table_size: s.table_size,
            backends,
            pin_all_flows: false,
            stage: Stage::Ingress,
        });
    }
    ServicePlan::Program { iface: iface.clone(), specs, unreached, reach, resolving }
}

/// Peers of one dataplane: the MACs of the other ingress nodes (of every
/// service this node serves in either role), from lookups on that
/// dataplane's interface. Unresolved ones are left out (a frame from an
/// unknown peer is balanced by the ingress stage as any client's).
pub fn peers(d: &Desired, me: &str, lookups: &BTreeMap<IpAddr, Lookup>) -> Vec<[u8; 6]> {
    let mut out = BTreeSet::new();
    for n in peer_nodes(d, me) {
        for a in d.nodes.get(&n).into_iter().flatten() {
            if let Some(Lookup::Resolved { mac, .. }) = lookups.get(a) {
                out.insert(*mac);
                break;
            }
        }
    }
    out.into_iter().collect()
}

/// The other ingress nodes of every service this node serves.
pub fn peer_nodes(d: &Desired, me: &str) -> BTreeSet<String> {
    d.ingress
        .iter()
        .flat_map(|s| s.ingress_nodes.iter())
        .chain(d.node_stage.iter().flat_map(|s| s.ingress_nodes.iter()))
        .filter(|n| *n != me)
        .cloned()
        .collect()
}

/// Ready backends a spec sends new flows to: a direct entry is one, an
/// entry through a node (or this node's own stage) stands for as many ready
/// pods as its weight.
pub fn ready_reached(spec: &ServiceSpec) -> usize {
    spec.backends
        .iter()
        .filter(|b| b.takes_new_flows())
        .map(|b| if b.reach == Reach::Direct { 1 } else { b.weight as usize })
        .sum()
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
        let held: BTreeMap<&str, &ServiceSpec> =
            held.get(ifname).into_iter().flatten().map(|h| (h.name.as_str(), h)).collect();
        for spec in specs {
            match held.get(spec.name.as_str()) {
                Some(h) if same_spec(h, spec) => c.unchanged.push(spec.name.clone()),
                _ => c.upsert.push(spec.clone()),
            }
        }
    }
    out
}

/// The round's plan for every dataplane.
pub struct RoundPlan {
    pub services: BTreeMap<SvcKey, ServicePlan>,
    /// Per interface, every spec wanted there.
    pub wanted: BTreeMap<String, Vec<ServiceSpec>>,
    /// Names left as they are (their service could not be planned).
    pub keep: BTreeSet<String>,
}

/// Gathers the per-service plans and the node stage into what each
/// dataplane must hold.
pub fn round_plan(services: BTreeMap<SvcKey, ServicePlan>, node: &NodeStagePlan) -> RoundPlan {
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
    if let Some(iface) = &node.iface
        && !node.specs.is_empty()
    {
        wanted.entry(iface.name.clone()).or_default().extend(node.specs.iter().cloned());
    }
    RoundPlan { services, wanted, keep }
}

/// Per ingress service, its report: `programmed` holds, per spec name,
/// the number of backends taking new flows once programmed, or why
/// programming failed.
pub fn ingress_reports(
    d: &Desired,
    plan: &RoundPlan,
    programmed: &BTreeMap<String, Result<usize, Failure>>,
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
            error_reason: None,
            reach: ReachCounts::default(),
            unreached: Vec::new(),
        };
        match plan.services.get(&s.key) {
            None => {}
            Some(ServicePlan::NoInterface) => {
                report.error_reason = Some(IngressErrorReason::NoInterface);
                report.error = Some(
                    "no backends yet, and no route toward the VIP to choose an interface \
                     (set spec.ingress.interface to program it before backends exist)"
                        .into(),
                );
            }
            Some(ServicePlan::Keep(e)) => {
                report.error_reason = Some(IngressErrorReason::ProgrammingFailed);
                report.error = Some(e.to_string());
            }
            Some(ServicePlan::Program { specs, unreached, reach, .. }) => {
                if !unreached.is_empty() {
                    let reasons: Vec<String> = unreached
                        .iter()
                        .take(5)
                        .map(|u| format!("{}: {}", u.address, u.reason))
                        .collect();
                    report.error = Some(format!(
                        "{} backend(s) not reached: {}{}",
                        unreached.len(),
                        reasons.join("; "),
                        if unreached.len() > 5 { "; ..." } else { "" }
                    ));
                }
                report.reach = reach.clone();
                report.unreached = unreached.iter().take(MAX_UNREACHED).cloned().collect();
                let mut all_ok = true;
                for spec in specs {
                    match programmed.get(&spec.name) {
                        Some(Ok(n)) => {
                            report.backends += i32::try_from(*n).unwrap_or(i32::MAX);
                            report.programmed_vips.push(spec.vip.to_string());
                        }
                        Some(Err(f)) => {
                            all_ok = false;
                            report.error = Some(f.message.clone());
                            report.error_reason = Some(f.reason);
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

/// What the pod namespaces gave for one local pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// VIPs on its loopback with the ARP sysctls right.
    pub configured: Vec<String>,
    /// Why preparing it failed.
    pub error: Option<String>,
    /// GRO inside it, as read back.
    pub gro: Option<bool>,
}

/// Per local pod, its report: loopback VIPs, and per VIP whether this node
/// delivers it (a node-stage spec holding it was programmed and the reply
/// program is attached on its host-side interface, or it is on the
/// segment).
pub fn backend_reports(
    d: &Desired,
    facts: &BTreeMap<String, PodFacts>,
    node: &NodeStagePlan,
    programmed: &BTreeMap<String, Result<usize, Failure>>,
    replies: &BTreeMap<u32, Result<(), ReplyError>>,
) -> Vec<BackendReport> {
    let mut out = Vec::new();
    for p in &d.pods {
        let uid = p.uid.to_ascii_lowercase();
        let f = facts.get(&uid).cloned().unwrap_or_default();
        let mut r = BackendReport {
            pod_uid: p.uid.clone(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            configured_vips: f.configured,
            error: f.error,
            delivered_vips: Vec::new(),
            delivery: None,
            interface: None,
            gro: f.gro,
            delivery_error: None,
        };
        let mut errors = Vec::new();
        for svc in &d.node_stage {
            for v in &svc.vips {
                let Some(e) = v.pods.iter().find(|e| e.uid == p.uid) else { continue };
                let vip = v.vip.to_string();
                match node.delivered.get(&e.addr) {
                    Some(Delivered::Segment) => {
                        r.delivery = Some(Delivery::Segment);
                        r.delivered_vips.push(vip);
                    }
                    Some(Delivered::NodeStage { host }) => {
                        r.delivery = Some(Delivery::NodeStage);
                        r.interface = Some(host.name.clone());
                        let name = node_stage_name(&svc.key, v.vip);
                        match (programmed.get(&name), replies.get(&host.index)) {
                            (Some(Ok(_)), Some(Ok(()))) => r.delivered_vips.push(vip),
                            (Some(Err(e)), _) => {
                                errors.push(format!("{vip}: node stage: {}", e.message))
                            }
                            (_, Some(Err(e))) => {
                                errors.push(format!("{vip}: reply program on {host}: {e}"))
                            }
                            _ => errors.push(format!("{vip}: node stage not programmed")),
                        }
                    }
                    Some(Delivered::Pending(why) | Delivered::No(why)) => {
                        errors.push(format!("{vip}: {why}"))
                    }
                    None => errors.push(format!("{vip}: not planned")),
                }
            }
        }
        r.delivered_vips.sort();
        r.delivered_vips.dedup();
        errors.dedup();
        if !errors.is_empty() {
            r.delivery_error = Some(errors.join("; "));
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::desired::{
        DesiredBackend, LocalEndpoint, LocalPod, NodeService, NodeVip, VipService,
    };
    use crate::dataplane::{PortSpec, Protocol};
    use crate::neigh::NotAdjacent;

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
        let b: Vec<(&str, Option<&str>, bool)> =
            backends.iter().map(|(a, d)| (*a, None, *d)).collect();
        service_on(name, &b)
    }

    /// A service whose backends are `(address, node, draining)`.
    fn service_on(name: &str, backends: &[(&str, Option<&str>, bool)]) -> IngressService {
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
                    .map(|(a, node, draining)| DesiredBackend {
                        addr: ip(a),
                        node: node.map(Arc::from),
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
        // The verdicts as the report reads them.
        let chosen = |obs: &InterfaceObs| choose_interface(obs).map_err(|e| e.to_string());
        // The spec's name wins over everything.
        let obs = InterfaceObs {
            named: Some(Ok(eth1.clone())),
            backend_routes: vec![(b, Ok(uni(&eth0)))],
            ..Default::default()
        };
        assert_eq!(chosen(&obs), Ok(Some(eth1.clone())));
        let missing = crate::Error::UnknownInterface {
            name: "eth9".into(),
            source: std::io::Error::other("No such device"),
        };
        let named = PlanError::Interface { name: "eth9".into(), cause: Arc::new(missing) };
        let obs = InterfaceObs { named: Some(Err(named)), ..Default::default() };
        assert_eq!(
            chosen(&obs),
            Err("interface eth9: interface \"eth9\" not found in this network namespace: \
                 No such device"
                .into())
        );
        // First backend with a unicast route; local ones are skipped.
        let obs = InterfaceObs {
            backend_routes: vec![
                (ip("10.0.0.1"), Ok(Route::Other { kind: "local" })),
                (b, Ok(uni(&eth0))),
            ],
            held: Some(eth1.clone()),
            ..Default::default()
        };
        assert_eq!(chosen(&obs), Ok(Some(eth0.clone())));
        // A failed lookup is an error, not a reason to guess.
        let eperm = crate::Error::Netlink {
            what: "route lookup",
            source: std::io::Error::other("Operation not permitted"),
        };
        let obs =
            InterfaceObs { backend_routes: vec![(b, Err(Arc::new(eperm)))], ..Default::default() };
        assert_eq!(
            chosen(&obs),
            Err("route lookup for 10.0.0.5: netlink: route lookup: Operation not permitted".into())
        );
        // No backend: where it is held, else toward the VIP, else nothing.
        let obs = InterfaceObs {
            held: Some(eth1.clone()),
            vip_routes: vec![uni(&eth0)],
            ..Default::default()
        };
        assert_eq!(chosen(&obs), Ok(Some(eth1.clone())));
        let obs = InterfaceObs { vip_routes: vec![uni(&eth0)], ..Default::default() };
        assert_eq!(chosen(&obs), Ok(Some(eth0.clone())));
        assert_eq!(chosen(&InterfaceObs::default()), Ok(None));
        // Backends none of which is routable, nothing else known.
        let obs = InterfaceObs {
            backend_routes: vec![(b, Ok(Route::Unroutable { why: "unreachable".into() }))],
            ..Default::default()
        };
        assert!(chosen(&obs).unwrap_err().contains("set spec.ingress.interface"));
    }

    fn no_local() -> BTreeMap<IpAddr, Delivered> {
        BTreeMap::new()
    }

    fn ctx<'a>(
        nodes: &'a BTreeMap<String, Vec<IpAddr>>,
        lookups: &'a BTreeMap<IpAddr, Lookup>,
        local: &'a BTreeMap<IpAddr, Delivered>,
    ) -> IngressCtx<'a> {
        IngressCtx { me: "ing", nodes, lookups, local }
    }

    fn not_adjacent(addr: &str) -> Lookup {
        Lookup::NotAdjacent {
            reason: NotAdjacent::Gateway {
                backend: ip(addr),
                gateway: ip("10.10.0.3"),
                oif: iface(2, "eth0"),
            },
        }
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
            (ip("10.0.0.4"), not_adjacent("10.0.0.4")),
        ]);
        let nodes = BTreeMap::new();
        let local = no_local();
        let ServicePlan::Program { iface, specs, unreached, reach, resolving } =
            plan_service(&s, &eth0, &ctx(&nodes, &lookups, &local))
        else {
            panic!("not programmed")
        };
        assert_eq!(iface, eth0);
        assert!(resolving);
        assert_eq!(reach, ReachCounts { direct: 2, via_node: 0, local: 0 });
        let why: Vec<(&str, &str)> =
            unreached.iter().map(|u| (u.address.as_str(), u.reason.as_str())).collect();
        assert_eq!(
            why,
            [
                ("10.0.0.3", "10.0.0.3: resolving its MAC"),
                ("10.0.0.4", "route to 10.0.0.4 goes via gateway 10.10.0.3 on eth0")
            ]
        );
        assert_eq!(specs.len(), 1);
        let spec = &specs[0];
        assert_eq!(spec.name, "default/web/v4");
        assert_eq!(spec.stage, Stage::Ingress);
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp, "ports sorted");
        let got: Vec<(IpAddr, [u8; 6], bool, Option<_>, Reach)> =
            spec.backends.iter().map(|b| (b.addr, b.mac, b.draining, b.egress, b.reach)).collect();
        assert_eq!(
            got,
            [
                (ip("10.0.0.1"), [2, 0, 0, 0, 0, 1], false, None, Reach::Direct),
                (ip("10.0.0.2"), [2, 0, 0, 0, 0, 2], true, None, Reach::Direct)
            ]
        );
    }

    /// The node-hop cluster: `ing` (10.10.0.2) is the ingress node,
    /// `w1` (10.10.0.11) and `w2` (10.10.0.12) are worker nodes on its
    /// segment, `far` (10.99.0.5) is behind a router, `ghost` has no
    /// address.
    fn cluster() -> BTreeMap<String, Vec<IpAddr>> {
        BTreeMap::from([
            ("ing".to_string(), vec![ip("10.10.0.2"), ip("fd10::2")]),
            ("w1".to_string(), vec![ip("10.10.0.11")]),
            ("w2".to_string(), vec![ip("10.10.0.12")]),
            ("far".to_string(), vec![ip("10.99.0.5")]),
            ("ghost".to_string(), vec![]),
            ("dead".to_string(), vec![ip("10.10.0.13")]),
        ])
    }

    #[test]
    fn each_backend_is_reached_direct_local_or_via_its_node() {
        let eth0 = iface(2, "eth0");
        let w1_mac = [2, 0, 0, 0, 1, 1];
        let w2_mac = [2, 0, 0, 0, 1, 2];
        let s = service_on(
            "web",
            &[
                // Bridged pod on w1: its own MAC is on the segment.
                ("10.10.0.50", Some("w1"), false),
                // Two pods on the ingress node itself.
                ("10.244.0.2", Some("ing"), false),
                ("10.244.0.3", Some("ing"), false),
                // Two ready and one draining pod on w1, routed.
                ("10.244.1.2", Some("w1"), false),
                ("10.244.1.3", Some("w1"), false),
                ("10.244.1.4", Some("w1"), true),
                // Only a draining pod on w2.
                ("10.244.2.2", Some("w2"), true),
                // Nodes the ingress cannot reach at L2, or whose MAC is unknown.
                ("10.244.3.2", Some("far"), false),
                ("10.244.4.2", Some("ghost"), false),
                ("10.244.5.2", Some("dead"), false),
                ("10.244.6.2", Some("nobody"), false),
            ],
        );
        let mut lookups: BTreeMap<IpAddr, Lookup> = [
            "10.244.0.2",
            "10.244.0.3",
            "10.244.1.2",
            "10.244.1.3",
            "10.244.1.4",
            "10.244.2.2",
            "10.244.3.2",
            "10.244.4.2",
            "10.244.5.2",
            "10.244.6.2",
        ]
        .into_iter()
        .map(|a| (ip(a), not_adjacent(a)))
        .collect();
        lookups.insert(
            ip("10.10.0.50"),
            Lookup::Resolved { mac: [2, 0, 0, 0, 0, 0x50], egress: eth0.clone() },
        );
        lookups.insert(ip("10.10.0.11"), Lookup::Resolved { mac: w1_mac, egress: eth0.clone() });
        lookups.insert(ip("10.10.0.12"), Lookup::Resolved { mac: w2_mac, egress: eth0.clone() });
        lookups.insert(ip("10.99.0.5"), not_adjacent("10.99.0.5"));
        lookups.insert(
            ip("10.10.0.13"),
            Lookup::Unreachable { egress: eth0.clone(), why: "10.10.0.13 does not answer".into() },
        );
        let local = BTreeMap::from([
            (ip("10.244.0.2"), Delivered::NodeStage { host: iface(7, "veth-a") }),
            (ip("10.244.0.3"), Delivered::NodeStage { host: iface(8, "veth-b") }),
        ]);
        let nodes = cluster();
        let ServicePlan::Program { specs, unreached, reach, resolving, .. } =
            plan_service(&s, &eth0, &ctx(&nodes, &lookups, &local))
        else {
            panic!("not programmed")
        };
        assert!(!resolving);
        assert_eq!(reach, ReachCounts { direct: 1, via_node: 4, local: 2 });
        let mut got: Vec<(Reach, IpAddr, [u8; 6], u32, bool)> = specs[0]
            .backends
            .iter()
            .map(|b| (b.reach, b.addr, b.mac, b.weight, b.draining))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (Reach::Direct, ip("10.10.0.50"), [2, 0, 0, 0, 0, 0x50], 1, false),
                // One entry per node, weighted by its ready pods.
                (Reach::ViaNode, ip("10.10.0.11"), w1_mac, 2, false),
                // A node with only draining pods keeps its flows, takes no new ones.
                (Reach::ViaNode, ip("10.10.0.12"), w2_mac, 1, true),
                // This node: keyed by its own address, weight = local ready pods.
                (Reach::Local, ip("10.10.0.2"), [0; 6], 2, false),
            ]
        );
        specs[0].validate().expect("the dataplane accepts the plan");
        // The report counts ready pods reached: 1 direct + 2 on w1 + 2 local
        // (w2's only pod drains).
        assert_eq!(ready_reached(&specs[0]), 5);
        let why: BTreeMap<&str, &str> =
            unreached.iter().map(|u| (u.address.as_str(), u.reason.as_str())).collect();
        assert_eq!(
            why,
            BTreeMap::from([
                (
                    "10.244.3.2",
                    "node far is not on the ingress segment: route to 10.99.0.5 goes via gateway \
                     10.10.0.3 on eth0"
                ),
                ("10.244.4.2", "node ghost has no IPv4 address in its status"),
                ("10.244.5.2", "node dead MAC unresolved: 10.10.0.13 does not answer"),
                ("10.244.6.2", "node nobody is unknown (no Node object)"),
            ])
        );
        assert_eq!(unreached[0].node.as_deref(), Some("far"));
    }

    #[test]
    fn local_pods_the_node_stage_does_not_deliver_are_not_reached() {
        let eth0 = iface(2, "eth0");
        let s = service_on(
            "web",
            &[("10.244.0.2", Some("ing"), false), ("10.244.0.3", Some("ing"), false)],
        );
        let lookups: BTreeMap<IpAddr, Lookup> = ["10.244.0.2", "10.244.0.3"]
            .into_iter()
            .map(|a| {
                let reason = NotAdjacent::Elsewhere {
                    backend: ip(a),
                    oif: iface(9, "veth-a"),
                    ingress: eth0.clone(),
                    allowed: Vec::new(),
                };
                (ip(a), Lookup::NotAdjacent { reason })
            })
            .collect();
        let local = BTreeMap::from([
            (
                ip("10.244.0.2"),
                Delivered::Pending("10.244.0.2: resolving its MAC on veth-a".into()),
            ),
            (ip("10.244.0.3"), Delivered::No("GRO is not on inside the pod".into())),
        ]);
        let nodes = cluster();
        let ServicePlan::Program { specs, unreached, reach, resolving, .. } =
            plan_service(&s, &eth0, &ctx(&nodes, &lookups, &local))
        else {
            panic!("not programmed")
        };
        assert!(resolving);
        assert_eq!(reach, ReachCounts::default());
        assert!(specs[0].backends.is_empty(), "no Local entry without a delivered pod");
        assert_eq!(
            unreached[1].reason,
            "this node's stage does not deliver it: GRO is not on inside the pod"
        );
    }

    #[test]
    fn only_draining_local_pods_give_a_draining_local_entry() {
        let eth0 = iface(2, "eth0");
        let s = service_on("web", &[("10.244.0.2", Some("ing"), true)]);
        let lookups = BTreeMap::from([(ip("10.244.0.2"), not_adjacent("10.244.0.2"))]);
        let local =
            BTreeMap::from([(ip("10.244.0.2"), Delivered::NodeStage { host: iface(7, "veth-a") })]);
        let nodes = cluster();
        let ServicePlan::Program { specs, .. } =
            plan_service(&s, &eth0, &ctx(&nodes, &lookups, &local))
        else {
            panic!("not programmed")
        };
        let b = &specs[0].backends[0];
        assert_eq!((b.reach, b.draining, b.takes_new_flows()), (Reach::Local, true, false));
    }

    fn pod_link(index: u32, peer: u32) -> (Option<u32>, Option<u32>) {
        (Some(peer), Some(index))
    }

    #[test]
    fn local_path_needs_both_veth_ends_to_name_each_other() {
        let eth0 = iface(2, "eth0");
        let veth = iface(9, "veth-a");
        let a = ip("10.244.0.2");
        let on = |i: &Iface| Ok(Route::Unicast { oif: i.clone(), gateway: None });
        // Pod eth0 (index 3 in the pod) is the peer of veth-a (9), and veth-a's peer is 3.
        let (pod_peer, pod_index) = pod_link(3, 9);
        assert_eq!(
            local_path(a, &on(&veth), pod_peer, Some(3), pod_index, Some(&eth0)),
            LocalPath::NodeStage { host: veth.clone() }
        );
        // Only one direction matches (indexes are per namespace): not this pod's veth.
        assert!(matches!(
            local_path(a, &on(&veth), pod_peer, Some(4), pod_index, Some(&eth0)),
            LocalPath::Unreachable(_)
        ));
        // Bridged onto the segment: the route is on-link through the node interface.
        assert_eq!(
            local_path(a, &on(&eth0), Some(17), Some(5), pod_index, Some(&eth0)),
            LocalPath::Segment
        );
        // No node interface known (the one-host cluster's worker): on-link means the segment.
        assert_eq!(local_path(a, &on(&eth0), None, None, None, None), LocalPath::Segment);
        let gw = Ok(Route::Unicast { oif: eth0.clone(), gateway: Some(ip("10.10.0.3")) });
        assert_eq!(
            local_path(a, &gw, pod_peer, None, pod_index, Some(&eth0)),
            LocalPath::Unreachable(
                "route to 10.244.0.2 goes via gateway 10.10.0.3 on eth0, not to a local pod".into()
            )
        );
        let eperm = crate::Error::Netlink {
            what: "route lookup",
            source: std::io::Error::other("Operation not permitted"),
        };
        assert_eq!(
            local_path(a, &Err(eperm), None, None, None, None),
            LocalPath::Unreachable(
                "route lookup for 10.244.0.2: netlink: route lookup: Operation not permitted"
                    .into()
            )
        );
    }

    fn node_desired() -> Desired {
        let ep =
            |a: &str, uid: &str, active| LocalEndpoint { addr: ip(a), uid: uid.into(), active };
        Desired {
            node_stage: vec![NodeService {
                key: key("web"),
                table_size: 251,
                vips: vec![NodeVip {
                    vip: ip("192.0.2.10"),
                    ports: vec![PortSpec { port: 80, protocol: Protocol::Tcp }],
                    pods: vec![
                        ep("10.244.1.2", "a", true),
                        ep("10.244.1.3", "b", false),
                        ep("10.244.1.4", "c", true),
                        ep("10.244.1.5", "d", true),
                        ep("10.10.0.60", "e", true),
                    ],
                }],
                ingress_nodes: vec!["ing".into(), "w1".into(), "ing2".into()],
            }],
            pods: ["a", "b", "c", "d", "e"]
                .iter()
                .map(|u| LocalPod {
                    uid: u.to_string(),
                    namespace: "default".into(),
                    name: format!("pod-{u}"),
                    vips: BTreeSet::new(),
                    addresses: BTreeSet::new(),
                })
                .collect(),
            nodes: BTreeMap::from([
                ("ing".to_string(), vec![ip("10.10.0.2")]),
                ("ing2".to_string(), vec![ip("10.10.0.3")]),
                ("w1".to_string(), vec![ip("10.10.0.11")]),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn node_stage_holds_local_pods_behind_their_veths() {
        let eth0 = iface(2, "eth0");
        let va = iface(7, "veth-a");
        let vb = iface(8, "veth-b");
        let vc = iface(9, "veth-c");
        let vd = iface(10, "veth-d");
        let d = node_desired();
        let obs = LocalObs {
            paths: BTreeMap::from([
                (ip("10.244.1.2"), LocalPath::NodeStage { host: va.clone() }),
                (ip("10.244.1.3"), LocalPath::NodeStage { host: vb.clone() }),
                (ip("10.244.1.4"), LocalPath::NodeStage { host: vc.clone() }),
                (ip("10.244.1.5"), LocalPath::NodeStage { host: vd.clone() }),
                (ip("10.10.0.60"), LocalPath::Segment),
            ]),
            lookups: BTreeMap::from([
                (
                    ip("10.244.1.2"),
                    Lookup::Resolved { mac: [2, 0, 0, 0, 2, 2], egress: va.clone() },
                ),
                (
                    ip("10.244.1.3"),
                    Lookup::Resolved { mac: [2, 0, 0, 0, 2, 3], egress: vb.clone() },
                ),
                (ip("10.244.1.4"), Lookup::Pending { egress: vc.clone() }),
                (
                    ip("10.244.1.5"),
                    Lookup::Resolved { mac: [2, 0, 0, 0, 2, 5], egress: vd.clone() },
                ),
            ]),
            host_macs: BTreeMap::from([
                (7, [2, 0, 0, 0, 7, 7]),
                (8, [2, 0, 0, 0, 8, 8]),
                (10, [2, 0, 0, 0, 10, 10]),
            ]),
            gro: BTreeMap::from([
                ("a".to_string(), Ok(Some(true))),
                ("b".to_string(), Ok(Some(true))),
                ("c".to_string(), Ok(Some(true))),
                ("d".to_string(), Ok(Some(false))),
            ]),
        };
        let p = plan_node_stage(&d, Some(&eth0), &obs);
        assert!(p.resolving);
        assert_eq!(p.iface, Some(eth0.clone()));
        assert_eq!(p.replies, BTreeSet::from([7, 8, 9, 10]));
        assert_eq!(p.specs.len(), 1);
        let spec = &p.specs[0];
        assert_eq!((spec.name.as_str(), spec.stage), ("default/web/v4/node", Stage::Node));
        let got: Vec<(IpAddr, [u8; 6], bool, Option<Egress>)> =
            spec.backends.iter().map(|b| (b.addr, b.mac, b.draining, b.egress)).collect();
        assert_eq!(
            got,
            [
                (
                    ip("10.244.1.2"),
                    [2, 0, 0, 0, 2, 2],
                    false,
                    Some(Egress { ifindex: 7, mac: [2, 0, 0, 0, 7, 7] })
                ),
                // Not ready: held, draining, so the operator can see it delivered.
                (
                    ip("10.244.1.3"),
                    [2, 0, 0, 0, 2, 3],
                    true,
                    Some(Egress { ifindex: 8, mac: [2, 0, 0, 0, 8, 8] })
                ),
            ]
        );
        spec.validate().expect("the dataplane accepts the node stage");
        assert_eq!(p.delivered[&ip("10.10.0.60")], Delivered::Segment);
        assert!(matches!(p.delivered[&ip("10.244.1.4")], Delivered::Pending(_)));
        assert!(
            matches!(&p.delivered[&ip("10.244.1.5")], Delivered::No(w) if w.starts_with("GRO is not on"))
        );

        // Without a node interface nothing can be delivered through a node stage.
        let p = plan_node_stage(&d, None, &obs);
        assert!(p.specs.is_empty());
        assert!(
            matches!(&p.delivered[&ip("10.244.1.2")], Delivered::No(w) if w.contains("--node-interface"))
        );
        assert_eq!(p.delivered[&ip("10.10.0.60")], Delivered::Segment);

        // Reports: delivered once programmed and the reply program is on.
        let programmed = BTreeMap::from([(spec.name.clone(), Ok(1))]);
        let p = plan_node_stage(&d, Some(&eth0), &obs);
        let replies = BTreeMap::from([
            (7, Ok(())),
            (
                8,
                Err(ReplyError::Attach(crate::Error::Io {
                    what: "tcx attach failed",
                    source: std::io::Error::other("File exists"),
                })),
            ),
            (9, Ok(())),
            (10, Ok(())),
        ]);
        let facts = BTreeMap::from([(
            "a".to_string(),
            PodFacts { configured: vec!["192.0.2.10".into()], error: None, gro: Some(true) },
        )]);
        let r = backend_reports(&d, &facts, &p, &programmed, &replies);
        let by: BTreeMap<&str, &BackendReport> =
            r.iter().map(|b| (b.pod_uid.as_str(), b)).collect();
        assert_eq!(by["a"].delivered_vips, ["192.0.2.10"]);
        assert_eq!(by["a"].delivery, Some(Delivery::NodeStage));
        assert_eq!(by["a"].interface.as_deref(), Some("veth-a"));
        assert_eq!(by["a"].configured_vips, ["192.0.2.10"]);
        assert!(by["b"].delivered_vips.is_empty());
        assert_eq!(
            by["b"].delivery_error.as_deref(),
            Some("192.0.2.10: reply program on veth-b: tcx attach failed: File exists")
        );
        assert!(by["c"].delivered_vips.is_empty());
        assert_eq!(by["e"].delivered_vips, ["192.0.2.10"]);
        assert_eq!(by["e"].delivery, Some(Delivery::Segment));
        // A failed node-stage upsert delivers nothing.
        let full = Failure {
            message: "VIP table full".into(),
            reason: IngressErrorReason::CapacityExceeded,
        };
        let failed = BTreeMap::from([(spec.name.clone(), Err(full))]);
        let r = backend_reports(&d, &facts, &p, &failed, &replies);
        assert!(r[0].delivered_vips.is_empty());
        assert_eq!(r[0].delivery_error.as_deref(), Some("192.0.2.10: node stage: VIP table full"));
    }

    #[test]
    fn a_node_stage_table_grows_with_its_pods_up_to_the_service_size() {
        assert_eq!(node_stage_table_size(65537, 1), 251);
        assert_eq!(node_stage_table_size(65537, 2), 251);
        assert_eq!(node_stage_table_size(65537, 3), 1021);
        assert_eq!(node_stage_table_size(65537, 40), 4093);
        assert_eq!(node_stage_table_size(65537, 41), 16381);
        assert_eq!(node_stage_table_size(65537, 5000), 65537);
        assert_eq!(node_stage_table_size(1021, 50), 1021, "never above the service's");
        assert_eq!(node_stage_table_size(251, 0), 251);
    }

    #[test]
    fn peers_are_the_other_ingress_nodes_resolved() {
        let eth0 = iface(2, "eth0");
        let d = node_desired();
        assert_eq!(peer_nodes(&d, "w1"), BTreeSet::from(["ing".to_string(), "ing2".to_string()]));
        let lookups = BTreeMap::from([
            (ip("10.10.0.2"), Lookup::Resolved { mac: [2, 0, 0, 0, 0, 2], egress: eth0.clone() }),
            (ip("10.10.0.3"), Lookup::Pending { egress: eth0.clone() }),
            (ip("10.10.0.11"), Lookup::Resolved { mac: [2, 0, 0, 0, 0, 11], egress: eth0.clone() }),
        ]);
        // w1 itself is never its own peer; ing2 is not resolved yet.
        assert_eq!(peers(&d, "w1", &lookups), vec![[2, 0, 0, 0, 0, 2]]);
        assert_eq!(peers(&d, "ing", &lookups), vec![[2, 0, 0, 0, 0, 11]]);
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
            ..Default::default()
        };
        let spec_a = spec(&dataplane_name(&key("a"), ip("192.0.2.10")), &["10.0.0.1"]);
        let spec_d = spec(&dataplane_name(&key("d"), ip("192.0.2.10")), &[]);
        let services = BTreeMap::from([
            (
                key("a"),
                ServicePlan::Program {
                    iface: eth0.clone(),
                    specs: vec![spec_a.clone()],
                    unreached: vec![UnreachedBackend {
                        address: "x".into(),
                        node: None,
                        reason: "resolving its MAC".into(),
                    }],
                    reach: ReachCounts { direct: 1, via_node: 0, local: 0 },
                    resolving: true,
                },
            ),
            (key("b"), ServicePlan::NoInterface),
            (key("c"), ServicePlan::Keep(PlanError::NoRoute)),
            (
                key("d"),
                ServicePlan::Program {
                    iface: eth0.clone(),
                    specs: vec![spec_d.clone()],
                    unreached: vec![],
                    reach: ReachCounts::default(),
                    resolving: false,
                },
            ),
        ]);
        let plan = round_plan(services, &NodeStagePlan::default());
        assert_eq!(plan.wanted["eth0"].len(), 2);
        assert_eq!(plan.keep, BTreeSet::from(names_of(&key("c"))));
        let programmed = BTreeMap::from([
            (spec_a.name.clone(), Ok(1)),
            (
                spec_d.name.clone(),
                Err(Failure {
                    message: "VIP table full".into(),
                    reason: IngressErrorReason::CapacityExceeded,
                }),
            ),
        ]);
        let r = ingress_reports(&d, &plan, &programmed);
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].observed_generation, r[0].backends), (7, 1));
        assert_eq!(r[0].programmed_vips, ["192.0.2.10"]);
        assert_eq!(r[0].error.as_deref(), Some("1 backend(s) not reached: x: resolving its MAC"));
        assert!(r[1].error.as_deref().unwrap().starts_with("no backends yet"));
        assert_eq!(r[1].observed_generation, 0);
        assert_eq!(
            r[2].error.as_deref(),
            Some(
                "no route toward the backends or the VIP to choose an interface from; \
                 set spec.ingress.interface"
            )
        );
        assert_eq!(r[3].observed_generation, 0, "a failed upsert is not observed");
        assert_eq!(r[3].error.as_deref(), Some("VIP table full"));
        assert_eq!(r[3].error_reason, Some(IngressErrorReason::CapacityExceeded));
        assert_eq!(r[0].error_reason, None, "programmed, though some backends are unreached");
        assert_eq!(r[1].error_reason, Some(IngressErrorReason::NoInterface));
        assert_eq!(r[2].error_reason, Some(IngressErrorReason::ProgrammingFailed));
    }
}
