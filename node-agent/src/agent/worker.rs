//! The kernel side of the agent: one thread that owns the dataplanes, the
//! netlink sockets and the namespace work, and converges them on the latest
//! [`Desired`] — level-triggered, so a round after a restart is the same as
//! any other round.
//!
//! It runs on a plain thread because everything it calls blocks (netlink,
//! `setns`, BPF syscalls) and because `setns` threads must never be tokio's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kube_dsr_crds::nodereport::{BackendReport, IngressErrorReason, IngressReport};
use tracing::{debug, info, warn};

use crate::dataplane::{AttachMode, Config as DpConfig, Dataplane, ServiceSpec};
use crate::error::ErrorKind;
use crate::neigh::{Iface, Lookup, Resolver, Route};
use crate::netns::{self, Target};

use super::backoff::{Backoff, Failure};
use super::desired::{Desired, IngressService, SvcKey};
use super::metrics::{Metrics, TrafficSample};
use super::plan::{
    self, InterfaceObs, PlanError, PodLinkError, ReplyError, RoundPlan, ServicePlan, names_of,
};

/// How the worker is set up.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// bpffs directory; each attached interface pins under `<dir>/<ifname>`.
    pub bpffs_dir: PathBuf,
    /// procfs (the host's, with `hostPID`).
    pub proc_dir: PathBuf,
    pub attach: AttachMode,
    /// Settling, re-probing unreachable backends and re-reading namespaces.
    pub resync: Duration,
    /// Counters are read this often for `/metrics`.
    pub counters_every: Duration,
    /// This node's name.
    pub node_name: String,
    /// `--node-interface`: where the node stage attaches (else found).
    pub node_interface: Option<String>,
    /// Pod UIDs prepared by an earlier run (from this node's last report),
    /// so that what was added to them is removed if they are no longer
    /// backends.
    pub known_pods: BTreeSet<String>,
    /// Capacity of each dataplane's maps.
    pub capacity: crate::dataplane::Capacity,
}

/// What one round achieved: the material of the node report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Per ingress service, sorted by key (announcements filled in later).
    pub ingress: Vec<IngressReport>,
    /// Per local backend pod, sorted by UID.
    pub backends: Vec<BackendReport>,
    /// Interface each ingress service is attached to.
    pub interfaces: BTreeMap<SvcKey, String>,
    /// Some backend's MAC is being resolved: look again soon rather than
    /// at the next resync (a backend joins within milliseconds, not
    /// seconds).
    pub resolving: bool,
    /// Some spec failed: when the first may be tried again.
    pub backing_off: Option<Instant>,
}

/// An error with its causes, `a: b: c`, for logs and reports.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// The worker's state between rounds.
pub struct Worker {
    cfg: WorkerConfig,
    dataplanes: BTreeMap<String, Dataplane>,
    /// Peers last written, per dataplane.
    peers: BTreeMap<String, Vec<[u8; 6]>>,
    resolver: Option<Resolver>,
    known_pods: BTreeSet<String>,
    metrics: Arc<Metrics>,
    /// Failed specs and when to try them again.
    backoff: Backoff,
    /// Set on shutdown: a round stops between two services.
    cancel: Arc<AtomicBool>,
    /// The last plan of each ingress service, with what it was planned
    /// from: a round plans again only the services whose input changed
    /// (or that were still resolving or failed), and those due for their
    /// resync.
    planned: BTreeMap<SvcKey, Planned>,
    /// When the dataplanes were last settled.
    settled_at: Instant,
    /// The round-wide inputs of those plans.
    planned_with: Option<PlanInputs>,
    /// Services whose counters `/metrics` shows.
    sampled: BTreeSet<String>,
}

/// One service's last plan.
struct Planned {
    /// What it was planned from.
    input: IngressService,
    plan: ServicePlan,
    /// When: a plan older than the resync period is made again, so that a
    /// route or neighbour change no event announces is followed.
    at: Instant,
}

/// The periodic resync is spread over the period in this many steps: each
/// step re-plans the services whose plan is oldest, at most this share of
/// them. A step stays short at any scale, so a change waits for at most
/// one step, never for a re-plan of every service.
pub const RESYNC_STEPS: u32 = 8;

/// What every service's plan depends on besides the service itself.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PlanInputs {
    node_iface: Option<Iface>,
    delivered: BTreeMap<IpAddr, plan::Delivered>,
    nodes: BTreeMap<String, Vec<IpAddr>>,
}

impl Worker {
    pub fn new(cfg: WorkerConfig, metrics: Arc<Metrics>, cancel: Arc<AtomicBool>) -> Self {
        let known_pods = cfg.known_pods.clone();
        let mut w = Worker {
            cfg,
            dataplanes: BTreeMap::new(),
            peers: BTreeMap::new(),
            resolver: None,
            known_pods,
            metrics,
            backoff: Backoff::default(),
            cancel,
            planned: BTreeMap::new(),
            settled_at: Instant::now(),
            planned_with: None,
            sampled: BTreeSet::new(),
        };
        w.adopt_pinned();
        w
    }

    /// Opens (adopts) every dataplane an earlier run pinned, so services it
    /// holds that are no longer wanted get removed.
    fn adopt_pinned(&mut self) {
        let Ok(dir) = std::fs::read_dir(&self.cfg.bpffs_dir) else { return };
        for entry in dir.flatten() {
            if !entry.path().join("xdp_link").exists() {
                continue;
            }
            let Some(ifname) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if let Err(e) = self.dataplane(&ifname) {
                warn!(interface = %ifname, error = %chain(&e), "cannot adopt a pinned dataplane");
            }
        }
    }

    fn dataplane(&mut self, ifname: &str) -> crate::Result<&mut Dataplane> {
        if !self.dataplanes.contains_key(ifname) {
            let mut cfg = DpConfig::new(ifname);
            cfg.pin_dir = self.cfg.bpffs_dir.join(ifname);
            cfg.attach = self.cfg.attach;
            cfg.capacity = self.cfg.capacity;
            let dp = Dataplane::open(&cfg)?;
            info!(interface = %ifname, start = ?dp.start(), mode = dp.attached().as_str(), "dataplane open");
            self.metrics.set_attached(ifname, dp.attached());
            self.dataplanes.insert(ifname.to_owned(), dp);
        }
        Ok(self.dataplanes.get_mut(ifname).expect("inserted above"))
    }

    fn resolver(&mut self) -> crate::Result<&mut Resolver> {
        if self.resolver.is_none() {
            self.resolver = Some(Resolver::new()?);
        }
        Ok(self.resolver.as_mut().expect("set above"))
    }

    /// What is seen of `s`'s surroundings to choose its interface.
    fn observe_interface(
        &mut self,
        s: &IngressService,
        node_iface: Option<&Iface>,
    ) -> Result<InterfaceObs, PlanError> {
        let names = names_of(&s.key);
        let held = self
            .dataplanes
            .iter()
            .find(|(_, dp)| dp.services().any(|x| names.contains(&x.name)))
            .map(|(name, dp)| Iface { index: dp.ifindex(), name: name.clone() });
        let me = self.cfg.node_name.clone();
        let r = self.resolver()?;
        let mut obs = InterfaceObs { held, node: node_iface.cloned(), ..Default::default() };
        if let Some(name) = &s.interface {
            obs.named = Some(
                r.interface(name)
                    .map_err(|e| PlanError::Interface { name: name.clone(), cause: Arc::new(e) }),
            );
            return Ok(obs);
        }
        // Pods of this node are behind their own interfaces: the route
        // toward them says nothing about where clients come in.
        let remote = s
            .vips
            .iter()
            .flat_map(|v| v.backends.iter())
            .filter(|b| b.node.as_deref() != Some(me.as_str()))
            .map(|b| b.addr);
        for addr in remote {
            let route = r.route(addr).map_err(Arc::new);
            let decisive = !matches!(route, Ok(Route::Other { .. } | Route::Unroutable { .. }));
            obs.backend_routes.push((addr, route));
            if decisive {
                // The choice takes the first decisive route; the rest is
                // not needed.
                return Ok(obs);
            }
        }
        for vip in s.vips.iter().map(|v| v.vip) {
            if let Ok(route) = r.route(vip) {
                obs.vip_routes.push(route);
            }
        }
        Ok(obs)
    }

    /// Observes what `s` needs (interface, neighbour lookups of its
    /// backends and of their nodes) and plans it.
    fn plan_service(
        &mut self,
        s: &IngressService,
        d: &Desired,
        node_iface: Option<&Iface>,
        local: &BTreeMap<IpAddr, plan::Delivered>,
        periodic: bool,
    ) -> ServicePlan {
        let obs = match self.observe_interface(s, node_iface) {
            Ok(o) => o,
            Err(e) => return ServicePlan::Keep(e),
        };
        let iface = match plan::choose_interface(&obs) {
            Ok(Some(i)) => i,
            Ok(None) => return ServicePlan::NoInterface,
            Err(e) => return ServicePlan::Keep(e),
        };
        let me = self.cfg.node_name.clone();
        let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
        for b in s.vips.iter().flat_map(|v| v.backends.iter()) {
            addrs.insert(b.addr);
            if let Some(n) = b.node.as_deref().filter(|n| *n != me) {
                addrs.extend(d.nodes.get(n).into_iter().flatten().copied());
            }
        }
        let lookups = match self.lookup(&iface, &[], &addrs, periodic) {
            Ok(l) => l,
            Err(e) => return ServicePlan::Keep(e),
        };
        let ctx = plan::IngressCtx { me: &me, nodes: &d.nodes, lookups: &lookups, local };
        plan::plan_service(s, &iface, &ctx)
    }

    /// Neighbour lookups of `addrs` on `iface` (and `allowed`); on periodic
    /// rounds unreachable ones are probed again.
    fn lookup(
        &mut self,
        iface: &Iface,
        allowed: &[Iface],
        addrs: &BTreeSet<IpAddr>,
        periodic: bool,
    ) -> Result<BTreeMap<IpAddr, Lookup>, PlanError> {
        let r = self.resolver()?;
        let lookups = r.lookup_all(iface, allowed, addrs.iter().copied())?;
        if periodic {
            // FAILED entries are not re-probed every round (they linger);
            // the resync cadence gives unreachable backends another chance.
            for (addr, l) in &lookups {
                if let Lookup::Unreachable { egress, .. } = l
                    && let Err(e) = r.probe(egress.index, *addr)
                {
                    debug!(%addr, error = %e, "re-probing an unreachable backend failed");
                }
            }
        }
        Ok(lookups)
    }

    /// The node interface: `--node-interface`, else the one holding the
    /// node's first address (its InternalIP), else the one the on-link route
    /// toward another node leaves through. `None` when none is known.
    fn node_interface(&mut self, d: &Desired) -> Option<Iface> {
        let me = self.cfg.node_name.clone();
        let named = self.cfg.node_interface.clone();
        let r = match self.resolver() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %chain(&e), "cannot open the resolver");
                return None;
            }
        };
        if let Some(name) = named {
            return match r.interface(&name) {
                Ok(i) => Some(i),
                Err(e) => {
                    warn!(interface = %name, error = %chain(&e), "--node-interface not found");
                    None
                }
            };
        }
        for a in d.nodes.get(&me).into_iter().flatten() {
            match r.interface_with_address(*a) {
                Ok(Some(i)) => return Some(i),
                Ok(None) => {}
                Err(e) => debug!(addr = %a, error = %chain(&e), "address lookup failed"),
            }
        }
        for (_, addrs) in d.nodes.iter().filter(|(n, _)| **n != me) {
            for a in addrs {
                if let Ok(Route::Unicast { oif, gateway: None }) = r.route(*a) {
                    return Some(oif);
                }
            }
        }
        None
    }

    /// Observes the local pods of the node stage: the node's route toward
    /// each, both ends of its veth, and its MAC behind the host side.
    fn observe_local(
        &mut self,
        d: &Desired,
        node_iface: Option<&Iface>,
        links: &BTreeMap<String, Result<netns::PodLink, PodLinkError>>,
        periodic: bool,
    ) -> plan::LocalObs {
        let mut obs = plan::LocalObs::default();
        let mut hosts: BTreeMap<u32, Iface> = BTreeMap::new();
        let mut behind: BTreeSet<IpAddr> = BTreeSet::new();
        for (uid, l) in links {
            obs.gro.insert(uid.clone(), l.as_ref().map(|l| l.gro).map_err(Clone::clone));
        }
        let pods: Vec<(IpAddr, String)> = d
            .node_stage
            .iter()
            .flat_map(|s| s.vips.iter().flat_map(|v| v.pods.iter()))
            .map(|p| (p.addr, p.uid.to_ascii_lowercase()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let r = match self.resolver() {
            Ok(r) => r,
            Err(e) => {
                let why = chain(&e);
                for (addr, _) in pods {
                    obs.paths.insert(addr, plan::LocalPath::Unreachable(why.clone()));
                }
                return obs;
            }
        };
        for (addr, uid) in pods {
            let route = r.route(addr);
            let pod = links.get(&uid).and_then(|l| l.as_ref().ok());
            let (host_peer, host_mac) = match &route {
                Ok(Route::Unicast { oif, gateway: None }) => match r.link_info(oif.index) {
                    Ok(info) => (info.peer, info.mac),
                    Err(_) => (None, None),
                },
                _ => (None, None),
            };
            let path = plan::local_path(
                addr,
                &route,
                pod.and_then(|p| p.peer),
                host_peer,
                pod.map(|p| p.iface.index),
                node_iface,
            );
            if let plan::LocalPath::NodeStage { host } = &path {
                if let Some(m) = host_mac {
                    obs.host_macs.insert(host.index, m);
                }
                hosts.insert(host.index, host.clone());
                behind.insert(addr);
            }
            obs.paths.insert(addr, path);
        }
        if !behind.is_empty() {
            let allowed: Vec<Iface> = hosts.into_values().collect();
            let ingress = node_iface.cloned().unwrap_or(Iface { index: 0, name: String::new() });
            match self.lookup(&ingress, &allowed, &behind, periodic) {
                Ok(l) => obs.lookups = l,
                Err(e) => {
                    for addr in behind {
                        obs.paths.insert(addr, plan::LocalPath::Unreachable(e.to_string()));
                    }
                }
            }
        }
        obs
    }

    /// Applies the plan: removals first, on every dataplane (a service may
    /// have moved to another interface, or released a port another one now
    /// claims), then upserts of what differs. A spec that failed waits for
    /// its back-off (its last failure stands meanwhile). Returns per spec
    /// name the number of backends taking new flows, or why it is not
    /// programmed; `None` when cancelled.
    fn apply(&mut self, plan: &RoundPlan) -> Option<BTreeMap<String, Result<usize, Failure>>> {
        for ifname in plan.wanted.keys() {
            if let Err(e) = self.dataplane(ifname) {
                self.metrics.error(ErrorKind::Dataplane);
                warn!(interface = %ifname, error = %chain(&e), "cannot open the dataplane");
            }
        }
        let held: BTreeMap<String, Vec<ServiceSpec>> = self
            .dataplanes
            .iter()
            .map(|(name, dp)| (name.clone(), dp.services().cloned().collect()))
            .collect();
        let changes = plan::diff(&plan.wanted, &plan.keep, &held);
        let mut freed: BTreeSet<String> = BTreeSet::new();
        for (ifname, c) in &changes {
            let Some(dp) = self.dataplanes.get_mut(ifname) else { continue };
            for name in &c.remove {
                match dp.remove_service(name) {
                    Ok(()) => {
                        freed.insert(ifname.clone());
                        info!(interface = %ifname, service = %name, "removed from the dataplane")
                    }
                    Err(e) => {
                        self.metrics.error(ErrorKind::Dataplane);
                        warn!(interface = %ifname, service = %name, error = %chain(&e), "remove failed");
                    }
                }
            }
        }
        let wanted: BTreeSet<&str> =
            plan.wanted.values().flatten().map(|s| s.name.as_str()).collect();
        self.backoff.retain(|n| wanted.contains(n));
        let mut programmed: BTreeMap<String, Result<usize, Failure>> = BTreeMap::new();
        let active = plan::ready_reached;
        for (ifname, specs) in &plan.wanted {
            let c = changes.get(ifname).cloned().unwrap_or_default();
            let Some(dp) = self.dataplanes.get_mut(ifname) else {
                for s in specs {
                    let f = Failure {
                        message: format!("no dataplane on {ifname}"),
                        reason: IngressErrorReason::ProgrammingFailed,
                    };
                    programmed.insert(s.name.clone(), Err(f));
                }
                continue;
            };
            for spec in specs.iter().filter(|s| c.unchanged.contains(&s.name)) {
                programmed.insert(spec.name.clone(), Ok(active(spec)));
            }
            let mut held_back = 0usize;
            for spec in &c.upsert {
                if self.cancel.load(Ordering::Relaxed) {
                    return None;
                }
                let now = Instant::now();
                if let Some(f) = self.backoff.hold(ifname, spec, now, freed.contains(ifname)) {
                    held_back += 1;
                    programmed.insert(spec.name.clone(), Err(f.clone()));
                    continue;
                }
                match dp.upsert_service(spec) {
                    Ok(()) => {
                        self.backoff.succeeded(&spec.name);
                        self.metrics.programmed(now.elapsed());
                        info!(interface = %ifname, service = %spec.name, backends = spec.backends.len(), "programmed");
                        programmed.insert(spec.name.clone(), Ok(active(spec)));
                    }
                    Err(e) => {
                        let f = Failure::of(&e);
                        let retry = self.backoff.failed(ifname, spec, f.clone(), now);
                        self.metrics.error(e.kind());
                        warn!(interface = %ifname, service = %spec.name, error = %f.message, retry_in = ?retry, "programming failed");
                        programmed.insert(spec.name.clone(), Err(f));
                    }
                }
            }
            if held_back > 0 {
                debug!(interface = %ifname, held_back, "specs waiting for their back-off");
            }
        }
        Some(programmed)
    }

    /// The reply program on each host-side interface of a node-stage pod
    /// (on the node interface's dataplane, whose interface is the uplink),
    /// and off every other interface. Returns per wanted ifindex whether it
    /// is attached.
    fn apply_replies(
        &mut self,
        node_iface: Option<&Iface>,
        want: &BTreeSet<u32>,
    ) -> BTreeMap<u32, Result<(), ReplyError>> {
        let mut out = BTreeMap::new();
        let node_name = node_iface.map(|i| i.name.clone());
        for (ifname, dp) in &mut self.dataplanes {
            let mine = node_name.as_deref() == Some(ifname.as_str());
            for ifindex in dp.replies() {
                if mine && want.contains(&ifindex) {
                    continue;
                }
                match dp.detach_reply(ifindex) {
                    Ok(()) => info!(interface = %ifname, ifindex, "reply program detached"),
                    Err(e) => {
                        self.metrics.error(ErrorKind::Dataplane);
                        warn!(interface = %ifname, ifindex, error = %chain(&e), "detaching the reply program failed");
                    }
                }
            }
        }
        let Some(dp) = node_name.as_deref().and_then(|n| self.dataplanes.get_mut(n)) else {
            for i in want {
                out.insert(*i, Err(ReplyError::NoDataplane));
            }
            return out;
        };
        let attached: BTreeSet<u32> = dp.replies().into_iter().collect();
        for &ifindex in want {
            if attached.contains(&ifindex) {
                out.insert(ifindex, Ok(()));
                continue;
            }
            let r = dp.attach_reply(ifindex).map_err(ReplyError::Attach);
            match &r {
                Ok(()) => info!(ifindex, "reply program attached"),
                Err(e) => {
                    self.metrics.error(ErrorKind::Dataplane);
                    warn!(ifindex, error = %e, "attaching the reply program failed");
                }
            }
            out.insert(ifindex, r);
        }
        out
    }

    /// Each dataplane's peers: the other ingress nodes' MACs on its
    /// interface. Written only when they change.
    fn apply_peers(&mut self, d: &Desired, periodic: bool) {
        let me = self.cfg.node_name.clone();
        let addrs: BTreeSet<IpAddr> = plan::peer_nodes(d, &me)
            .iter()
            .flat_map(|n| d.nodes.get(n).into_iter().flatten().copied())
            .collect();
        let ifaces: Vec<Iface> = self
            .dataplanes
            .iter()
            .map(|(name, dp)| Iface { index: dp.ifindex(), name: name.clone() })
            .collect();
        for iface in ifaces {
            let lookups = match self.lookup(&iface, &[], &addrs, periodic) {
                Ok(l) => l,
                Err(e) => {
                    self.metrics.error(ErrorKind::Neighbour);
                    warn!(interface = %iface, error = %e, "looking peers up failed");
                    continue;
                }
            };
            let want = plan::peers(d, &me, &lookups);
            // Nothing written before and nothing wanted: leave the
            // dataplane's set as it is (empty unless a peer set pinned by
            // an earlier run, which the first non-empty set replaces).
            if self.peers.get(&iface.name).map_or(want.is_empty(), |p| *p == want) {
                continue;
            }
            let Some(dp) = self.dataplanes.get_mut(&iface.name) else { continue };
            match dp.set_peers(&want) {
                Ok(()) => {
                    info!(interface = %iface, peers = want.len(), "peers set");
                    self.peers.insert(iface.name.clone(), want);
                }
                Err(e) => {
                    self.metrics.error(ErrorKind::Dataplane);
                    warn!(interface = %iface, error = %chain(&e), "setting peers failed");
                }
            }
        }
    }

    /// The services whose plan is due for its resync (older than the
    /// period), oldest first, at most one step's share of them.
    fn due_for_resync(&self) -> BTreeSet<SvcKey> {
        let period = self.cfg.resync;
        let mut old: Vec<(Instant, &SvcKey)> = self
            .planned
            .iter()
            .filter(|(_, p)| p.at.elapsed() >= period)
            .map(|(k, p)| (p.at, k))
            .collect();
        old.sort();
        let step = self.planned.len().div_ceil(RESYNC_STEPS as usize).max(1);
        old.into_iter().take(step).map(|(_, k)| k.clone()).collect()
    }

    /// One round: the pod namespaces, the node stage, the ingress
    /// services, then the dataplanes. `periodic`: a resync step (see
    /// [`RESYNC_STEPS`]). `None` when cancelled (shutdown): a round stops
    /// between two services, never inside one.
    pub fn round(&mut self, d: &Desired, periodic: bool) -> Option<Outcome> {
        let started = Instant::now();
        let mut out = Outcome::default();
        if let Ok(r) = self.resolver() {
            r.begin_round();
        }
        // Once per period (not every step): the node stage's and the
        // peers' unreachable neighbours are probed again, and the
        // dataplanes settled.
        let full = periodic && self.settled_at.elapsed() >= self.cfg.resync;
        let (facts, links) = self.pods(d);
        let node_iface = self.node_interface(d);
        let local = self.observe_local(d, node_iface.as_ref(), &links, full);
        let node_plan = plan::plan_node_stage(d, node_iface.as_ref(), &local);
        out.resolving |= node_plan.resolving;
        let inputs = PlanInputs {
            node_iface: node_iface.clone(),
            delivered: node_plan.delivered.clone(),
            nodes: d.nodes.clone(),
        };
        // Every plan depends on these: when they change, all are made
        // again.
        let reuse = self.planned_with.as_ref() == Some(&inputs);
        let due = if periodic && reuse { self.due_for_resync() } else { BTreeSet::new() };
        let mut services = BTreeMap::new();
        let mut replanned = 0usize;
        for s in &d.ingress {
            if self.cancel.load(Ordering::Relaxed) {
                return None;
            }
            let resync = due.contains(&s.key);
            let cached = self.planned.get(&s.key).filter(|p| {
                reuse
                    && !resync
                    && p.input == *s
                    && matches!(p.plan, ServicePlan::Program { resolving: false, .. })
            });
            let p = match cached {
                Some(p) => p.plan.clone(),
                None => {
                    replanned += 1;
                    let p = self.plan_service(
                        s,
                        d,
                        node_iface.as_ref(),
                        &node_plan.delivered,
                        resync || !reuse,
                    );
                    let at = Instant::now();
                    let entry = Planned { input: s.clone(), plan: p.clone(), at };
                    self.planned.insert(s.key.clone(), entry);
                    p
                }
            };
            match &p {
                ServicePlan::Keep(e) => {
                    self.metrics.error(ErrorKind::Neighbour);
                    warn!(service = %s.key, error = %e, "cannot plan the service; leaving it as it is");
                }
                ServicePlan::Program { iface, resolving, .. } => {
                    out.interfaces.insert(s.key.clone(), iface.name.clone());
                    out.resolving |= resolving;
                }
                ServicePlan::NoInterface => {}
            }
            services.insert(s.key.clone(), p);
        }
        let keys: BTreeSet<&SvcKey> = d.ingress.iter().map(|s| &s.key).collect();
        self.planned.retain(|k, _| keys.contains(k));
        self.planned_with = Some(inputs);
        let plan = plan::round_plan(services, &node_plan);
        let programmed = self.apply(&plan)?;
        out.backing_off = self.backoff.next_due();
        let replies = self.apply_replies(node_iface.as_ref(), &node_plan.replies);
        self.apply_peers(d, full);
        out.ingress = plan::ingress_reports(d, &plan, &programmed);
        out.backends = plan::backend_reports(d, &facts, &node_plan, &programmed, &replies);

        if full {
            self.settled_at = Instant::now();
            let age = self.cfg.resync;
            for (ifname, dp) in &mut self.dataplanes {
                match dp.settle(age) {
                    Ok(s) if s != Default::default() => {
                        debug!(interface = %ifname, settled = ?s, "settled")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.metrics.error(ErrorKind::Dataplane);
                        warn!(interface = %ifname, error = %chain(&e), "settle failed");
                    }
                }
            }
        }
        let took = started.elapsed();
        self.metrics.round(took);
        // A service that came or went shows in /metrics at once; traffic of
        // the others follows on the counters' own clock.
        let names: BTreeSet<String> =
            self.dataplanes.values().flat_map(|dp| dp.services().map(|s| s.name.clone())).collect();
        if names != self.sampled {
            self.sample_counters();
        }
        debug!(?took, services = d.ingress.len(), replanned, periodic, "round done");
        Some(out)
    }

    /// Backend pods on this node: VIPs on their loopback and the ARP
    /// sysctls, GRO on the interface of each pod with a node stage; what
    /// kube-dsr added to pods that stopped being backends is removed.
    /// Returns per pod UID (lowercase) what was found, and its interface.
    #[allow(clippy::type_complexity)]
    fn pods(
        &mut self,
        d: &Desired,
    ) -> (BTreeMap<String, plan::PodFacts>, BTreeMap<String, Result<netns::PodLink, PodLinkError>>)
    {
        let current: BTreeSet<String> = d.pods.iter().map(|p| p.uid.to_ascii_lowercase()).collect();
        let others: Vec<String> = self.known_pods.difference(&current).cloned().collect();
        if d.pods.is_empty() && others.is_empty() {
            return Default::default();
        }
        let backends: Vec<netns::Backend> = d
            .pods
            .iter()
            .map(|p| netns::Backend {
                uid: p.uid.clone(),
                host_network: false,
                vips: p.vips.clone(),
            })
            .collect();
        // One address per pod finds its interface (both families sit on
        // the same one).
        let links: BTreeMap<String, IpAddr> = d
            .node_stage
            .iter()
            .flat_map(|s| s.vips.iter().flat_map(|v| v.pods.iter()))
            .map(|p| (p.uid.to_ascii_lowercase(), p.addr))
            .collect();
        let mut round = netns::converge_with_links(&self.cfg.proc_dir, &backends, &others, &links);
        let scan = round.scan.take().map(Arc::new);
        if let Some(e) = &scan {
            self.metrics.error(ErrorKind::Netns);
            warn!(error = %chain(e.as_ref()), "scanning /proc for pod namespaces failed");
        }
        // A pod whose undo failed stays known, to be tried again.
        let failed: BTreeSet<String> = round
            .errors
            .keys()
            .filter_map(|t| match t {
                Target::Pod(u) => Some(u.clone()),
                Target::Host => None,
            })
            .collect();
        for (t, e) in &round.errors {
            self.metrics.error(ErrorKind::Netns);
            warn!(namespace = ?t, error = %chain(&e), "backend preparation failed");
        }
        self.known_pods = current
            .iter()
            .cloned()
            .chain(others.into_iter().filter(|u| failed.contains(u)))
            .collect();
        let mut pod_links: BTreeMap<String, Result<netns::PodLink, PodLinkError>> =
            std::mem::take(&mut round.links)
                .into_iter()
                .map(|(u, l)| (u, l.map_err(|e| PodLinkError::Link(Arc::new(e)))))
                .collect();
        if let Some(e) = &scan {
            for uid in links.keys() {
                pod_links.entry(uid.clone()).or_insert_with(|| Err(PodLinkError::Scan(e.clone())));
            }
        }
        let facts = d
            .pods
            .iter()
            .map(|p| {
                let uid = p.uid.to_ascii_lowercase();
                let configured: Vec<String> = round
                    .reports
                    .iter()
                    .filter(|r| r.uid == p.uid && r.configured)
                    .map(|r| r.vip.to_string())
                    .collect();
                let error =
                    round.errors.get(&Target::Pod(uid.clone())).map(|e| chain(e)).or_else(|| {
                        scan.as_ref().map(|e| PodLinkError::Scan(e.clone()).to_string())
                    });
                let gro = pod_links.get(&uid).and_then(|l| l.as_ref().ok()).and_then(|l| l.gro);
                (uid, plan::PodFacts { configured, error, gro })
            })
            .collect();
        (facts, pod_links)
    }

    /// Reads the per-CPU counters of every programmed service and backend.
    pub fn sample_counters(&mut self) {
        self.sampled =
            self.dataplanes.values().flat_map(|dp| dp.services().map(|s| s.name.clone())).collect();
        let mut samples = Vec::new();
        for (ifname, dp) in &self.dataplanes {
            let traffic = match dp.all_traffic() {
                Ok(t) => t,
                Err(e) => {
                    debug!(interface = %ifname, error = %chain(&e), "reading traffic counters failed");
                    continue;
                }
            };
            for (spec, total, backends) in traffic {
                let service: Arc<str> = spec.name.as_str().into();
                let vip: Arc<str> = spec.vip.to_string().into();
                let sample = |backend, t: kube_dsr_common::Traffic| TrafficSample {
                    service: Arc::clone(&service),
                    vip: Arc::clone(&vip),
                    backend,
                    packets: t.packets,
                    bytes: t.bytes,
                };
                samples.push(sample(None, total));
                samples.extend(backends.into_iter().map(|(addr, t)| sample(Some(addr), t)));
            }
        }
        self.metrics.set_traffic(samples);
    }
}

/// First delay before looking again at backends whose MAC is resolving.
const RESOLVE_RETRY: Duration = Duration::from_millis(100);

/// Runs rounds until `inputs` closes: a round whenever a new desired state
/// arrives (the latest one wins), a resync step every `resync /`
/// [`RESYNC_STEPS`], and a counter sample every `counters_every`. Each
/// outcome is published.
pub fn run(
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    cancel: Arc<AtomicBool>,
    inputs: Receiver<Arc<Desired>>,
    publish: impl Fn(Outcome),
) {
    let resync = cfg.resync;
    let step = resync / RESYNC_STEPS;
    let counters_every = cfg.counters_every;
    let mut w = Worker::new(cfg, metrics, Arc::clone(&cancel));
    let mut desired: Option<Arc<Desired>> = None;
    let mut next_resync = Instant::now() + step;
    let mut next_counters = Instant::now() + counters_every;
    // A quick extra round while backend MACs are being resolved, backing
    // off to the resync period.
    let mut retry: Option<(Instant, Duration)> = None;
    // A round when the first failed spec's back-off is over.
    let mut backoff_due: Option<Instant> = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let due = [retry.map(|(at, _)| at), backoff_due, Some(next_resync)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_resync);
        let wait = due.min(next_counters).saturating_duration_since(now);
        let (changed, periodic) = match inputs.recv_timeout(wait) {
            Ok(mut d) => {
                // Only the latest state matters.
                while let Ok(newer) = inputs.try_recv() {
                    d = newer;
                }
                desired = Some(d);
                (true, false)
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let retry_due = retry.is_some_and(|(at, _)| now >= at)
                    || backoff_due.is_some_and(|at| now >= at);
                (retry_due, now >= next_resync)
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if periodic {
            next_resync = Instant::now() + step;
        }
        if let (Some(d), true) = (&desired, changed || periodic) {
            let d = Arc::clone(d);
            let Some(outcome) = w.round(&d, periodic) else { return };
            retry = match (outcome.resolving, retry) {
                (false, _) => None,
                (true, None) => Some((Instant::now() + RESOLVE_RETRY, RESOLVE_RETRY)),
                (true, Some((_, last))) => {
                    let next = (last * 2).min(resync);
                    Some((Instant::now() + next, next))
                }
            };
            backoff_due = outcome.backing_off;
            publish(outcome);
        }
        // Counters on their own clock: a busy node still gets them.
        if Instant::now() >= next_counters {
            w.sample_counters();
            next_counters = Instant::now() + counters_every;
        }
    }
}

/// One step of `dsr-agent cleanup` that failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A pinned dataplane could not be detached and unpinned.
    #[error("{}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: crate::Error,
    },
    /// The emptied bpffs directory could not be removed.
    #[error("{}", path.display())]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pods could not be found in procfs.
    #[error("scanning {}", proc.display())]
    Scan {
        proc: PathBuf,
        #[source]
        source: crate::Error,
    },
    /// A namespace could not be cleaned.
    #[error("{target:?}")]
    Namespace {
        target: Target,
        #[source]
        source: crate::Error,
    },
}

/// `dsr-agent cleanup`: detaches and unpins every dataplane under
/// `bpffs_dir` and removes what kube-dsr added to the node's namespace and
/// to the pods in `pods` (UIDs; `None`: every pod with a process on the
/// node — only addresses carrying kube-dsr's mark are removed, so pods it
/// never touched are left as they are). Returns what failed.
pub fn cleanup(bpffs_dir: &Path, proc_dir: &Path, pods: Option<&[String]>) -> Vec<CleanupError> {
    let mut failed = Vec::new();
    if let Ok(dir) = std::fs::read_dir(bpffs_dir) {
        for entry in dir.flatten() {
            let path = entry.path();
            if path.is_dir() {
                match Dataplane::remove_pins(&path) {
                    Ok(()) => info!(path = %path.display(), "dataplane removed"),
                    Err(source) => failed.push(CleanupError::Unpin { path, source }),
                }
            }
        }
        if let Err(source) = std::fs::remove_dir(bpffs_dir) {
            failed.push(CleanupError::RemoveDir { path: bpffs_dir.to_owned(), source });
        }
    }
    let scan_failed = |source| CleanupError::Scan { proc: proc_dir.to_owned(), source };
    let pods: Vec<String> = match pods {
        Some(p) => p.to_vec(),
        None => match netns::all_pod_uids(proc_dir) {
            Ok(u) => u.into_iter().collect(),
            Err(e) => {
                failed.push(scan_failed(e));
                Vec::new()
            }
        },
    };
    let round = netns::converge(proc_dir, &[], &pods);
    if let Some(e) = round.scan {
        failed.push(scan_failed(e));
    }
    for (target, source) in round.errors {
        failed.push(CleanupError::Namespace { target, source });
    }
    failed
}
