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
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kube_dsr_crds::nodereport::{BackendReport, IngressReport};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::dataplane::{
    AttachMode, BackendSpec, Config as DpConfig, Dataplane, Egress, Reach, ServiceSpec, Stage,
};
use crate::neigh::{self, Iface, Lookup, Resolver, Route};
use crate::netns::{self, Target};

use super::desired::{Desired, IngressService, SvcKey};
use super::metrics::{Metrics, TrafficSample};

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
    /// Pod UIDs prepared by an earlier run (from this node's last report),
    /// so that what was added to them is removed if they are no longer
    /// backends.
    pub known_pods: BTreeSet<String>,
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

/// Both names a service may hold (so an erroring service keeps its state).
fn names_of(key: &SvcKey) -> [String; 2] {
    [
        dataplane_name(key, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        dataplane_name(key, IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
    ]
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

/// A service's plan for this round.
struct Planned {
    /// `None`: no backend and no interface known yet; nothing to program.
    iface: Option<Iface>,
    specs: Vec<ServiceSpec>,
    /// Backends that cannot be programmed, with the reason.
    unprogrammed: Vec<String>,
    /// Some of them are being resolved.
    resolving: bool,
}

/// The worker's state between rounds.
pub struct Worker {
    cfg: WorkerConfig,
    dataplanes: BTreeMap<String, Dataplane>,
    resolver: Option<Resolver>,
    known_pods: BTreeSet<String>,
    metrics: Arc<Metrics>,
}

impl Worker {
    pub fn new(cfg: WorkerConfig, metrics: Arc<Metrics>) -> Self {
        let known_pods = cfg.known_pods.clone();
        let mut w =
            Worker { cfg, dataplanes: BTreeMap::new(), resolver: None, known_pods, metrics };
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

    /// Which interface serves `s`: the one the spec names, else the one the
    /// route toward its first backend leaves through, else the one whose
    /// dataplane holds it already, else the route toward its VIP. `None`:
    /// it has no backend yet and no interface is known — nothing to program.
    fn interface_of(&mut self, s: &IngressService) -> Result<Option<Iface>, String> {
        let held = self
            .dataplanes
            .iter()
            .find(|(_, dp)| {
                let names = names_of(&s.key);
                dp.services().any(|x| names.contains(&x.name))
            })
            .map(|(name, dp)| Iface { index: dp.ifindex(), name: name.clone() });
        let r = self.resolver().map_err(|e| chain(&e))?;
        if let Some(name) = &s.interface {
            return r
                .interface(name)
                .map(Some)
                .map_err(|e| format!("interface {name}: {}", chain(&e)));
        }
        let backends: Vec<IpAddr> =
            s.vips.iter().flat_map(|v| v.backends.iter().map(|b| b.addr)).collect();
        for &addr in &backends {
            match r.route(addr) {
                Ok(Route::Unicast { oif, .. }) => return Ok(Some(oif)),
                Ok(_) => continue,
                Err(e) => return Err(format!("route lookup for {addr}: {}", chain(&e))),
            }
        }
        if held.is_some() {
            return Ok(held);
        }
        for vip in s.vips.iter().map(|v| v.vip) {
            if let Ok(Route::Unicast { oif, .. }) = r.route(vip) {
                return Ok(Some(oif));
            }
        }
        if backends.is_empty() {
            return Ok(None);
        }
        Err("no route toward the backends or the VIP to choose an interface from; \
             set spec.ingress.interface"
            .into())
    }

    fn plan_service(&mut self, s: &IngressService, periodic: bool) -> Result<Planned, String> {
        let Some(iface) = self.interface_of(s)? else {
            return Ok(Planned {
                iface: None,
                specs: Vec::new(),
                unprogrammed: Vec::new(),
                resolving: false,
            });
        };
        let addrs: Vec<IpAddr> =
            s.vips.iter().flat_map(|v| v.backends.iter().map(|b| b.addr)).collect();
        let r = self.resolver().map_err(|e| chain(&e))?;
        let lookups = r.lookup_all(&iface, &[], addrs.iter().copied()).map_err(|e| chain(&e))?;
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
        let plan = neigh::plan(&addrs, &lookups);
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
                        Some(BackendSpec {
                            addr: b.addr,
                            mac: t.mac,
                            weight: 1,
                            draining: b.draining,
                            egress: (t.egress.index != iface.index)
                                .then_some(Egress { ifindex: t.egress.index, mac: t.mac }),
                            reach: Reach::Direct,
                        })
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
        Ok(Planned { iface: Some(iface), specs, unprogrammed, resolving })
    }

    /// One round: the dataplanes, then the backend pods.
    pub fn round(&mut self, d: &Desired, periodic: bool) -> Outcome {
        let started = Instant::now();
        let mut out = Outcome::default();
        let mut wanted: BTreeMap<String, Vec<ServiceSpec>> = BTreeMap::new();
        // Names kept untouched because their service could not be planned.
        let mut keep: BTreeSet<String> = BTreeSet::new();
        let mut reports: BTreeMap<SvcKey, IngressReport> = BTreeMap::new();
        let mut plans: BTreeMap<SvcKey, (String, Vec<String>)> = BTreeMap::new();
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
            match self.plan_service(s, periodic) {
                Ok(Planned { iface: None, .. }) => {
                    report.error = Some(
                        "no backends yet, and no route toward the VIP to choose an interface \
                         (set spec.ingress.interface to program it before backends exist)"
                            .into(),
                    );
                    plans.insert(s.key.clone(), (String::new(), Vec::new()));
                }
                Ok(Planned { iface: Some(iface), specs, unprogrammed, resolving }) => {
                    out.interfaces.insert(s.key.clone(), iface.name.clone());
                    out.resolving |= resolving;
                    let names = specs.iter().map(|s| s.name.clone()).collect();
                    wanted.entry(iface.name.clone()).or_default().extend(specs);
                    if !unprogrammed.is_empty() {
                        report.error = Some(format!(
                            "{} backend(s) not programmed: {}",
                            unprogrammed.len(),
                            unprogrammed.join("; ")
                        ));
                    }
                    plans.insert(s.key.clone(), (iface.name, names));
                }
                Err(e) => {
                    self.metrics.error("neighbour");
                    warn!(service = %s.key, error = %e, "cannot plan the service; leaving it as it is");
                    keep.extend(names_of(&s.key));
                    report.error = Some(e);
                }
            }
            reports.insert(s.key.clone(), report);
        }

        // Removals first, on every dataplane (a service may have moved to
        // another interface, or released a port another one now claims).
        for ifname in wanted.keys().cloned().collect::<Vec<_>>() {
            if let Err(e) = self.dataplane(&ifname) {
                self.metrics.error("dataplane");
                warn!(interface = %ifname, error = %chain(&e), "cannot open the dataplane");
            }
        }
        for (ifname, dp) in &mut self.dataplanes {
            let want: BTreeSet<&str> = wanted
                .get(ifname)
                .into_iter()
                .flatten()
                .map(|s| s.name.as_str())
                .chain(keep.iter().map(String::as_str))
                .collect();
            let stale: Vec<String> = dp
                .services()
                .map(|s| s.name.clone())
                .filter(|n| !want.contains(n.as_str()))
                .collect();
            for name in stale {
                match dp.remove_service(&name) {
                    Ok(()) => {
                        info!(interface = %ifname, service = %name, "removed from the dataplane")
                    }
                    Err(e) => {
                        self.metrics.error("dataplane");
                        warn!(interface = %ifname, service = %name, error = %chain(&e), "remove failed");
                    }
                }
            }
        }
        // Then upserts of what differs.
        let mut programmed: BTreeMap<String, Result<usize, String>> = BTreeMap::new();
        for (ifname, specs) in &wanted {
            let Some(dp) = self.dataplanes.get_mut(ifname) else {
                for s in specs {
                    programmed.insert(s.name.clone(), Err(format!("no dataplane on {ifname}")));
                }
                continue;
            };
            for spec in specs {
                let active = spec.backends.iter().filter(|b| b.takes_new_flows()).count();
                let current = dp.services().find(|s| s.name == spec.name);
                let same = current.is_some_and(|c| {
                    let mut b = spec.backends.clone();
                    b.sort_by_key(|b| b.addr);
                    c.vip == spec.vip
                        && c.ports == spec.ports
                        && c.table_size == spec.table_size
                        && c.backends == b
                        && c.pin_all_flows == spec.pin_all_flows
                });
                if same {
                    programmed.insert(spec.name.clone(), Ok(active));
                    continue;
                }
                let t = Instant::now();
                match dp.upsert_service(spec) {
                    Ok(()) => {
                        self.metrics.programmed(t.elapsed());
                        info!(interface = %ifname, service = %spec.name, backends = spec.backends.len(), "programmed");
                        programmed.insert(spec.name.clone(), Ok(active));
                    }
                    Err(e) => {
                        self.metrics.error("dataplane");
                        warn!(interface = %ifname, service = %spec.name, error = %chain(&e), "programming failed");
                        programmed.insert(spec.name.clone(), Err(chain(&e)));
                    }
                }
            }
        }
        let vip_of = |name: &str| wanted.values().flatten().find(|s| s.name == name).map(|s| s.vip);
        for s in &d.ingress {
            let Some(report) = reports.get_mut(&s.key) else { continue };
            let Some((_, names)) = plans.get(&s.key) else { continue };
            let mut all_ok = true;
            for name in names {
                match programmed.get(name) {
                    Some(Ok(n)) => {
                        report.backends += i32::try_from(*n).unwrap_or(i32::MAX);
                        if let Some(vip) = vip_of(name) {
                            report.programmed_vips.push(vip.to_string());
                        }
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
        out.ingress = reports.into_values().collect();

        if periodic {
            let age = self.cfg.resync;
            for (ifname, dp) in &mut self.dataplanes {
                match dp.settle(age) {
                    Ok(s) if s != Default::default() => {
                        debug!(interface = %ifname, settled = ?s, "settled")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.metrics.error("dataplane");
                        warn!(interface = %ifname, error = %chain(&e), "settle failed");
                    }
                }
            }
        }

        out.backends = self.backends(d);
        self.metrics.round(started.elapsed());
        self.sample_counters();
        out
    }

    /// Backend pods on this node: VIPs on their loopback and the ARP
    /// sysctls; what kube-dsr added to pods that stopped being backends is
    /// removed.
    fn backends(&mut self, d: &Desired) -> Vec<BackendReport> {
        let current: BTreeSet<String> = d.pods.iter().map(|p| p.uid.to_ascii_lowercase()).collect();
        let others: Vec<String> = self.known_pods.difference(&current).cloned().collect();
        if d.pods.is_empty() && others.is_empty() {
            return Vec::new();
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
        let round = netns::converge(&self.cfg.proc_dir, &backends, &others);
        if let Some(e) = &round.scan {
            self.metrics.error("netns");
            warn!(error = %chain(&e), "scanning /proc for pod namespaces failed");
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
            self.metrics.error("netns");
            warn!(namespace = ?t, error = %chain(&e), "backend preparation failed");
        }
        self.known_pods = current
            .iter()
            .cloned()
            .chain(others.into_iter().filter(|u| failed.contains(u)))
            .collect();
        d.pods
            .iter()
            .map(|p| {
                let uid = p.uid.to_ascii_lowercase();
                let configured: Vec<String> = round
                    .reports
                    .iter()
                    .filter(|r| r.uid == p.uid && r.configured)
                    .map(|r| r.vip.to_string())
                    .collect();
                let error = round.errors.get(&Target::Pod(uid)).map(|e| chain(e)).or_else(|| {
                    round.scan.as_ref().map(|e| format!("scanning /proc: {}", chain(e)))
                });
                BackendReport {
                    pod_uid: p.uid.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    configured_vips: configured,
                    error,
                }
            })
            .collect()
    }

    /// Reads the per-CPU counters of every programmed service and backend.
    pub fn sample_counters(&mut self) {
        let mut samples = Vec::new();
        for dp in self.dataplanes.values() {
            for spec in dp.services() {
                if let Ok(t) = dp.service_traffic(&spec.name) {
                    samples.push(TrafficSample {
                        service: spec.name.clone(),
                        vip: spec.vip.to_string(),
                        backend: None,
                        packets: t.packets,
                        bytes: t.bytes,
                    });
                }
                for b in &spec.backends {
                    if let Ok(t) = dp.backend_traffic(&spec.name, b.addr) {
                        samples.push(TrafficSample {
                            service: spec.name.clone(),
                            vip: spec.vip.to_string(),
                            backend: Some(b.addr.to_string()),
                            packets: t.packets,
                            bytes: t.bytes,
                        });
                    }
                }
            }
        }
        self.metrics.set_traffic(samples);
    }
}

/// First delay before looking again at backends whose MAC is resolving.
const RESOLVE_RETRY: Duration = Duration::from_millis(100);

/// Runs rounds until `inputs` closes: a round whenever a new desired state
/// arrives (the latest one wins), a periodic round every `resync`, and a
/// counter sample every `counters_every`. Each outcome is published.
pub fn run(
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    inputs: Receiver<Arc<Desired>>,
    publish: impl Fn(Outcome),
) {
    let resync = cfg.resync;
    let counters_every = cfg.counters_every;
    let mut w = Worker::new(cfg, metrics);
    let mut desired: Option<Arc<Desired>> = None;
    let mut next_resync = Instant::now() + resync;
    let mut next_counters = Instant::now() + counters_every;
    // A quick extra round while backend MACs are being resolved, backing
    // off to the resync period.
    let mut retry: Option<(Instant, Duration)> = None;
    loop {
        let now = Instant::now();
        let due = retry.map_or(next_resync, |(at, _)| at.min(next_resync));
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
                let retry_due = retry.is_some_and(|(at, _)| Instant::now() >= at);
                (retry_due, Instant::now() >= next_resync)
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if periodic {
            next_resync = Instant::now() + resync;
        }
        match (&desired, changed || periodic) {
            (Some(d), true) => {
                let d = Arc::clone(d);
                let outcome = w.round(&d, periodic);
                retry = match (outcome.resolving, retry) {
                    (false, _) => None,
                    (true, None) => Some((Instant::now() + RESOLVE_RETRY, RESOLVE_RETRY)),
                    (true, Some((_, last))) => {
                        let next = (last * 2).min(resync);
                        Some((Instant::now() + next, next))
                    }
                };
                publish(outcome);
                next_counters = Instant::now() + counters_every;
            }
            _ => {
                if Instant::now() >= next_counters {
                    w.sample_counters();
                    next_counters = Instant::now() + counters_every;
                }
            }
        }
    }
}

/// `dsr-agent cleanup`: detaches and unpins every dataplane under
/// `bpffs_dir` and removes what kube-dsr added to the node's namespace and
/// to the pods in `pods` (UIDs; `None`: every pod with a process on the
/// node — only addresses carrying kube-dsr's mark are removed, so pods it
/// never touched are left as they are). Returns what failed.
pub fn cleanup(bpffs_dir: &Path, proc_dir: &Path, pods: Option<&[String]>) -> Vec<String> {
    let mut failed = Vec::new();
    if let Ok(dir) = std::fs::read_dir(bpffs_dir) {
        for entry in dir.flatten() {
            let path = entry.path();
            if path.is_dir() {
                match Dataplane::remove_pins(&path) {
                    Ok(()) => info!(path = %path.display(), "dataplane removed"),
                    Err(e) => failed.push(format!("{}: {}", path.display(), chain(&e))),
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(bpffs_dir) {
            failed.push(format!("{}: {e}", bpffs_dir.display()));
        }
    }
    let pods: Vec<String> = match pods {
        Some(p) => p.to_vec(),
        None => match netns::all_pod_uids(proc_dir) {
            Ok(u) => u.into_iter().collect(),
            Err(e) => {
                failed.push(format!("scanning {}: {}", proc_dir.display(), chain(&e)));
                Vec::new()
            }
        },
    };
    let round = netns::converge(proc_dir, &[], &pods);
    if let Some(e) = round.scan {
        failed.push(format!("scanning {}: {}", proc_dir.display(), chain(&e)));
    }
    for (t, e) in round.errors {
        failed.push(format!("{t:?}: {}", chain(&e)));
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataplane_names_fit_and_are_stable() {
        let short = SvcKey { namespace: "default".into(), name: "web".into() };
        assert_eq!(dataplane_name(&short, "192.0.2.1".parse().unwrap()), "default/web/v4");
        assert_eq!(dataplane_name(&short, "2001:db8::1".parse().unwrap()), "default/web/v6");
        let long = SvcKey { namespace: "n".repeat(63), name: "s".repeat(63) };
        let a = dataplane_name(&long, "192.0.2.1".parse().unwrap());
        assert!(a.len() <= crate::dataplane::spec::MAX_NAME_LEN, "{a}");
        assert!(a.ends_with("/v4"));
        assert_eq!(a, dataplane_name(&long, "192.0.2.9".parse().unwrap()), "family, not address");
        let other = SvcKey { namespace: "n".repeat(63), name: "t".repeat(63) };
        assert_ne!(a, dataplane_name(&other, "192.0.2.1".parse().unwrap()));
        assert_eq!(names_of(&short), ["default/web/v4".to_string(), "default/web/v6".to_string()]);
    }
}
