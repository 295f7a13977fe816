//! The running agent: watches, the worker thread, announcement Leases, the
//! node report and the HTTP endpoints.
//!
//! Data flow: DsrService and EndpointSlice reflectors → [`desired::desired`]
//! (pure) → the worker thread converges the kernel and publishes an
//! [`worker::Outcome`] → [`report::build`] → server-side apply of this
//! node's `DsrNodeReport` when it changed. Beside it, the Lease task decides
//! which VIPs this node announces and tells the announcer.

pub mod backoff;
pub mod desired;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod report;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_dsr_crds::DsrService;
use kube_dsr_crds::nodereport::{DsrNodeReport, DsrNodeReportSpec};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::dataplane::AttachMode;
use crate::error::ErrorKind;
use crate::{Error, Result};
use desired::{Desired, SliceView};
use kube_dsr_process::Shutdown;
use kube_dsr_process::http::{self, Health};
use metrics::Metrics;
use worker::{Outcome, WorkerConfig};

/// Field manager of everything the agent writes.
pub use kube_dsr_crds::contract::AGENT_FIELD_MANAGER as FIELD_MANAGER;

/// Answers ARP / neighbour discovery for VIPs this node holds the Lease of.
pub trait Announce: Send {
    /// Starts answering for `vip` on `interface` and sends gratuitous ARP
    /// (IPv4) or unsolicited neighbour advertisements (IPv6).
    fn announce(&mut self, interface: &str, vip: IpAddr) -> crate::announce::Result<()>;
    /// Stops answering for `vip`; no answer leaves after it returns.
    fn withdraw(&mut self, vip: IpAddr);
    /// Called every Lease round: re-opens what failed (an interface that
    /// was re-created); returns what could not be, by interface.
    fn maintain(&mut self) -> Vec<(String, crate::announce::Error)>;
}

/// Everything `dsr-agent` is told.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub http_addr: SocketAddr,
    pub bpffs_dir: PathBuf,
    pub proc_dir: PathBuf,
    pub attach: AttachMode,
    pub resync: Duration,
    /// Namespace of the per-VIP announcement Leases.
    pub lease_namespace: String,
    pub lease_duration: Duration,
    pub lease_retry: Duration,
    /// Where the node stage attaches; `None`: the interface holding the
    /// node's InternalIP, else the one facing the other nodes.
    pub node_interface: Option<String>,
    /// Capacity of each dataplane's maps.
    pub capacity: crate::dataplane::Capacity,
}

/// Keeps only what the agent reads of a Node: its name and addresses.
fn strip_node(n: &mut Node) {
    let addresses = n.status.as_mut().and_then(|s| s.addresses.take());
    *n = Node {
        metadata: kube::api::ObjectMeta {
            name: n.metadata.name.take(),
            resource_version: n.metadata.resource_version.take(),
            uid: n.metadata.uid.take(),
            ..Default::default()
        },
        spec: None,
        status: Some(k8s_openapi::api::core::v1::NodeStatus { addresses, ..Default::default() }),
    };
}

/// Runs a reflector for `api` into a store, poking `changed` on every
/// event; every object passes through `modify` before it is cached (to
/// keep only the fields read).
fn reflect_modified<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().modify(modify).reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    metrics.error(ErrorKind::KubeApi);
                    warn!(error = %e, "watch failed; retrying");
                }
            }
        }
    });
    store
}

/// The operator's EndpointSlices as [`SliceView`]s, kept by a watch task of
/// its own: a reflector would cache whole API objects (at 1,000 services ×
/// 100 pods, about 50 MiB more than the views).
struct SliceCache {
    slices: Arc<std::sync::RwLock<BTreeMap<String, Arc<SliceView>>>>,
    listed: watch::Receiver<bool>,
}

impl SliceCache {
    /// Starts the watch; every event pokes `changed`.
    fn watch(
        api: Api<EndpointSlice>,
        config: watcher::Config,
        node: String,
        changed: Arc<tokio::sync::Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slices: Arc<std::sync::RwLock<BTreeMap<String, Arc<SliceView>>>> = Arc::default();
        let (listed_tx, listed) = watch::channel(false);
        let store = Arc::clone(&slices);
        let stream = watcher(api, config).default_backoff();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            // A (re)list fills this, and replaces the cache when it is done.
            let mut relist: Option<BTreeMap<String, Arc<SliceView>>> = None;
            let key = |s: &EndpointSlice| {
                let ns = s.metadata.namespace.as_deref().unwrap_or_default();
                format!("{ns}/{}", s.metadata.name.as_deref().unwrap_or_default())
            };
            while let Some(ev) = stream.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        metrics.error(ErrorKind::KubeApi);
                        warn!(error = %e, "watch failed; retrying");
                        continue;
                    }
                };
                let view = |s: &EndpointSlice| Arc::new(SliceView::of(s, &node));
                let cache = || store.write().unwrap_or_else(|e| e.into_inner());
                match ev {
                    watcher::Event::Init => relist = Some(BTreeMap::new()),
                    watcher::Event::InitApply(s) => {
                        relist.get_or_insert_with(BTreeMap::new).insert(key(&s), view(&s));
                    }
                    watcher::Event::InitDone => {
                        *cache() = relist.take().unwrap_or_default();
                        let _ = listed_tx.send(true);
                    }
                    watcher::Event::Apply(s) => {
                        cache().insert(key(&s), view(&s));
                    }
                    watcher::Event::Delete(s) => {
                        cache().remove(&key(&s));
                    }
                }
                changed.notify_one();
            }
        });
        Self { slices, listed }
    }

    /// Resolves once the first list is in.
    async fn wait_until_ready(&self) -> Result<()> {
        let mut listed = self.listed.clone();
        listed
            .wait_for(|l| *l)
            .await
            .map(drop)
            .map_err(|_| Error::WatchEnded { what: "listing EndpointSlices" })
    }

    fn state(&self) -> Vec<Arc<SliceView>> {
        self.slices.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

/// Runs the agent until SIGTERM. The dataplane and everything configured
/// in pods stay as they are when it stops: an agent restart or upgrade
/// never interrupts forwarding. `announcer` answers ARP/ND.
pub async fn run(cfg: Config, announcer: Box<dyn Announce>) -> Result<()> {
    let shutdown = Shutdown::on_signals();
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(Arc::clone(&metrics)));
    let server = http::serve(cfg.http_addr, Arc::clone(&health), shutdown.requested()).await?;
    let server = tokio::spawn(server);
    info!(addr = %cfg.http_addr, "serving /metrics, /healthz, /readyz");

    let started = Agent::start(cfg, announcer, Arc::clone(&metrics), Arc::clone(&health));
    let result = tokio::select! {
        r = started => match r {
            Ok(agent) => agent.run(shutdown.receiver()).await,
            Err(e) => Err(e),
        },
        // SIGTERM while starting (waiting for the API server, the Node or
        // the caches): nothing to undo yet.
        _ = shutdown.requested() => {
            info!("shutting down before the agent started");
            Ok(())
        }
    };
    health.set_ready(false);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "HTTP server failed"),
        Err(e) => error!(error = %e, "HTTP server task failed"),
    }
    result
}

/// EndpointSlices listed per page.
const SLICE_PAGE: u32 = 50;
/// How often an agent whose Node does not exist yet looks again.
const NODE_RETRY: Duration = Duration::from_secs(2);
/// A burst of watch events settles for this long into one desired state.
const SETTLE: Duration = Duration::from_millis(100);
/// On SIGTERM, how long the worker gets to stop between two services, and
/// the Leases to be released; the process exits after that either way (the
/// pinned dataplane stays consistent, unreleased Leases expire).
const STOP_GRACE: Duration = Duration::from_millis(1500);

/// The running agent: one method per event source of [`Agent::run`].
struct Agent {
    cfg: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health<Metrics>>,
    caches: Caches,
    /// Poked by every watch event.
    changed: Arc<tokio::sync::Notify>,
    /// When to compute the desired state (a burst of events settles first).
    compute_at: Option<tokio::time::Instant>,
    /// The desired state last sent to the worker.
    desired: Arc<Desired>,
    worker: WorkerHandle,
    report: Reporter,
    announcing: Announcing,
}

/// The reflectors' stores.
struct Caches {
    services: Store<DsrService>,
    slices: SliceCache,
    nodes: Store<Node>,
}

/// The worker thread, its input and its outcomes.
struct WorkerHandle {
    input: std::sync::mpsc::Sender<Arc<Desired>>,
    outcomes: watch::Receiver<Option<Outcome>>,
    cancel: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// This node's DsrNodeReport: applied when its content changes.
struct Reporter {
    api: Api<DsrNodeReport>,
    node: String,
    node_uid: String,
    last: Option<DsrNodeReportSpec>,
}

/// Announcement Leases and the VIPs answered.
struct Announcing {
    leases: Leases,
    announcer: Box<dyn Announce>,
    announced: BTreeSet<IpAddr>,
    tick: tokio::time::Interval,
}

impl Agent {
    /// Connects, waits for this node's Node object and for the caches,
    /// and starts the worker.
    async fn start(
        cfg: Config,
        announcer: Box<dyn Announce>,
        metrics: Arc<Metrics>,
        health: Arc<Health<Metrics>>,
    ) -> Result<Self> {
        let (client, version) = kube_dsr_process::api::connect().await?;
        info!(%version, node = %cfg.node_name, "connected to the API server");

        let node_uid =
            wait_for_node(&Api::<Node>::all(client.clone()), &cfg.node_name, &metrics).await?;
        let reports: Api<DsrNodeReport> = Api::all(client.clone());
        let previous = reports
            .get_opt(&cfg.node_name)
            .await
            .map_err(|source| Error::Kube { what: "reading my DsrNodeReport", source })?;
        let known_pods: BTreeSet<String> = previous
            .iter()
            .flat_map(|r| r.spec.backends.iter().map(|b| b.pod_uid.to_ascii_lowercase()))
            .collect();

        let changed = Arc::new(tokio::sync::Notify::new());
        let caches = Caches::watch(&client, &cfg.node_name, &changed, &metrics);
        // Nothing is converged before the caches have listed once: an empty
        // cache would read as "remove everything".
        let listed = |what| move |source| Error::CacheSync { what, source };
        caches.services.wait_until_ready().await.map_err(listed("listing DsrServices"))?;
        caches.slices.wait_until_ready().await?;
        caches.nodes.wait_until_ready().await.map_err(listed("listing Nodes"))?;
        info!("caches synced");

        let worker = WorkerHandle::spawn(&cfg, known_pods, Arc::clone(&metrics))?;
        let announcing = Announcing {
            leases: Leases::new(
                Api::namespaced(client.clone(), &cfg.lease_namespace),
                cfg.node_name.clone(),
                cfg.lease_duration,
                cfg.lease_retry,
            ),
            announcer,
            announced: BTreeSet::new(),
            tick: tokio::time::interval(cfg.lease_retry),
        };
        let report = Reporter { api: reports, node: cfg.node_name.clone(), node_uid, last: None };
        Ok(Self {
            cfg,
            metrics,
            health,
            caches,
            changed,
            compute_at: Some(tokio::time::Instant::now()),
            desired: Arc::new(Desired::default()),
            worker,
            report,
            announcing,
        })
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let mut stop_leases = stop.clone();
        loop {
            let compute_at = self.compute_at;
            tokio::select! {
                _ = self.changed.notified() => self.on_watch_event(),
                _ = sleep_until_some(compute_at) => self.on_settled()?,
                r = self.worker.outcomes.changed() => {
                    r.map_err(|_| Error::WorkerGone)?;
                    self.on_outcome().await;
                }
                _ = self.announcing.tick.tick() => self.on_lease_tick(&mut stop_leases).await,
                _ = stop.wait_for(|v| *v) => break,
            }
        }
        self.stop().await;
        Ok(())
    }

    /// A watch event: compute once the burst settles.
    fn on_watch_event(&mut self) {
        if self.compute_at.is_none() {
            self.compute_at = Some(tokio::time::Instant::now() + SETTLE);
        }
    }

    /// Computes the desired state and hands it to the worker when it
    /// changed (or before the first outcome, so the first round runs).
    fn on_settled(&mut self) -> Result<()> {
        self.compute_at = None;
        let services = self.caches.services.state();
        let slices = self.caches.slices.state();
        let mut d = desired::desired_from(&self.cfg.node_name, &services, &slices);
        d.nodes = self
            .caches
            .nodes
            .state()
            .iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), desired::node_addresses(n)))
            .collect();
        if *self.desired == d && self.report.last.is_some() {
            return Ok(());
        }
        self.desired = Arc::new(d);
        self.worker.input.send(Arc::clone(&self.desired)).map_err(|_| Error::WorkerGone)?;
        // A VIP that is no longer wanted stops being announced now, not at
        // the next Lease renewal.
        self.announcing.tick.reset_immediately();
        Ok(())
    }

    /// The worker finished a round.
    async fn on_outcome(&mut self) {
        if self.worker.outcomes.borrow_and_update().is_some() {
            self.health.set_ready(true);
            self.publish_report().await;
        }
    }

    /// Renews and takes Leases, then brings the announcer in line with the
    /// Leases held. Stops at once on SIGTERM.
    async fn on_lease_tick(&mut self, stop: &mut watch::Receiver<bool>) {
        let d = Arc::clone(&self.desired);
        let wanted = lease::candidates(&self.cfg.node_name, &d);
        let a = &mut self.announcing;
        // A slow API must not keep this node answering past a held Lease's
        // limit: the round stops there, and what is held is re-read below.
        let deadline = a
            .leases
            .earliest_expiry()
            .unwrap_or_else(|| std::time::Instant::now() + 4 * self.cfg.lease_retry);
        tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), a.leases.round(&wanted)) => match r {
                Ok(errors) => {
                    for (vip, e) in errors {
                        self.metrics.error(e.kind());
                        warn!(%vip, error = %e, "announcement lease");
                    }
                }
                Err(_) => {
                    self.metrics.error(ErrorKind::Lease);
                    warn!("the Lease round reached a held Lease's limit; re-checking what is held");
                }
            },
            _ = stop.wait_for(|v| *v) => return,
        }
        let interfaces = self
            .worker
            .outcomes
            .borrow()
            .as_ref()
            .map(|o| o.interfaces.clone())
            .unwrap_or_default();
        for (interface, e) in a.announcer.maintain() {
            self.metrics.error(e.kind());
            warn!(%interface, error = %worker::chain(&e), "announcer could not be re-opened");
        }
        let held = a.leases.held();
        let now = reconcile_announcements(
            a.announcer.as_mut(),
            &d,
            &interfaces,
            &held,
            &a.announced,
            &self.metrics,
        );
        if now != a.announced {
            a.announced = now;
            self.metrics.set_announced(a.announced.len());
            // The report says which VIPs this node answers for.
            self.publish_report().await;
        }
    }

    /// Applies the report built from the last outcome and what is announced.
    async fn publish_report(&mut self) {
        let Some(outcome) = self.worker.outcomes.borrow().clone() else { return };
        let spec = report::build(
            &self.cfg.node_name,
            env!("CARGO_PKG_VERSION"),
            &self.desired,
            &outcome,
            &self.announcing.announced,
        );
        self.report.apply(spec, &self.metrics).await;
    }

    /// SIGTERM: stop answering, release the Leases, stop the worker between
    /// two services. Bounded by [`STOP_GRACE`] whatever the scale.
    async fn stop(self) {
        info!("shutting down; the dataplane and pod configuration stay in place");
        self.health.set_ready(false);
        let Self { worker, mut announcing, .. } = self;
        worker.cancel.store(true, Ordering::Relaxed);
        drop(worker.input);
        for vip in &announcing.announced {
            announcing.announcer.withdraw(*vip);
        }
        if tokio::time::timeout(STOP_GRACE, announcing.leases.release_all()).await.is_err() {
            warn!("releasing the announcement Leases took too long; the rest expire on their own");
        }
        let thread = worker.thread;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(STOP_GRACE, joined).await.is_err() {
            warn!("the worker is still inside a kernel call; exiting without it");
        }
    }
}

/// Resolves at `at`, never when `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// This node's Node object's UID. An agent may start before its Node is
/// registered (a DaemonSet pod on a node that is still joining): it waits,
/// not ready, and says so.
async fn wait_for_node(nodes: &Api<Node>, name: &str, metrics: &Metrics) -> Result<String> {
    let mut said = false;
    loop {
        match nodes.get_opt(name).await {
            Ok(Some(node)) => {
                if said {
                    info!(node = %name, "my Node exists now");
                }
                return node.metadata.uid.ok_or(Error::NodeWithoutUid);
            }
            Ok(None) => {
                if !said {
                    warn!(node = %name, "my Node does not exist yet; waiting for it (not ready meanwhile)");
                    said = true;
                }
            }
            Err(e) => {
                metrics.error(ErrorKind::KubeApi);
                warn!(node = %name, error = %e, "reading my Node failed; retrying");
            }
        }
        tokio::time::sleep(NODE_RETRY).await;
    }
}

impl Caches {
    /// Starts the watches (reflectors for DsrServices and Nodes, a
    /// [`SliceCache`] for EndpointSlices); every event pokes `changed`.
    /// Cached objects keep only the fields the agent reads.
    fn watch(
        client: &Client,
        node: &str,
        changed: &Arc<tokio::sync::Notify>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let services = reflect_modified(
            Api::<DsrService>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            metrics.clone(),
            desired::strip_service,
        );
        // Small pages: a slice holds up to 100 endpoints, so a page of the
        // default 500 would be a transient 50,000 whole endpoints.
        let slices = SliceCache::watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default()
                .labels(&format!("{}={}", desired::MANAGED_BY_LABEL, desired::MANAGED_BY))
                .page_size(SLICE_PAGE),
            node.to_owned(),
            changed.clone(),
            metrics.clone(),
        );
        // Node addresses: where other nodes' pods are reached, and peers.
        let nodes = reflect_modified(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            metrics.clone(),
            strip_node,
        );
        Self { services, slices, nodes }
    }
}

impl WorkerHandle {
    fn spawn(cfg: &Config, known_pods: BTreeSet<String>, metrics: Arc<Metrics>) -> Result<Self> {
        let (input, inputs) = std::sync::mpsc::channel::<Arc<Desired>>();
        let (outcome_tx, outcomes) = watch::channel::<Option<Outcome>>(None);
        let wcfg = WorkerConfig {
            bpffs_dir: cfg.bpffs_dir.clone(),
            proc_dir: cfg.proc_dir.clone(),
            attach: cfg.attach,
            resync: cfg.resync,
            counters_every: Duration::from_secs(2),
            node_name: cfg.node_name.clone(),
            node_interface: cfg.node_interface.clone(),
            known_pods,
            capacity: cfg.capacity,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let wcancel = Arc::clone(&cancel);
        let thread = std::thread::Builder::new()
            .name("kdsr-worker".into())
            .spawn(move || {
                worker::run(wcfg, metrics, wcancel, inputs, |o| {
                    let _ = outcome_tx.send(Some(o));
                })
            })
            .map_err(|source| Error::Io { what: "starting the worker thread", source })?;
        Ok(Self { input, outcomes, cancel, thread })
    }
}

impl Reporter {
    /// Applies the report when its content differs from the last one
    /// applied.
    async fn apply(&mut self, spec: DsrNodeReportSpec, metrics: &Metrics) {
        if self.last.as_ref() == Some(&spec) {
            return;
        }
        let mut report = DsrNodeReport::for_node(&self.node, &self.node_uid);
        report.spec = spec.clone();
        report.spec.update_time = Some(Time(Timestamp::now()));
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match self.api.patch(&self.node, &params, &Patch::Apply(&report)).await {
            Ok(_) => self.last = Some(spec),
            Err(e) => {
                metrics.error(ErrorKind::KubeApi);
                warn!(error = %e, "applying the node report failed; retried on the next change or resync");
            }
        }
    }
}

use lease::Leases;

/// Brings the announcer in line with the Leases held: withdraws first
/// (a lost Lease stops answers at once), then announces on the interface
/// the service is attached to. Returns what is announced now.
fn reconcile_announcements(
    announcer: &mut dyn Announce,
    d: &Desired,
    interfaces: &BTreeMap<desired::SvcKey, String>,
    held: &BTreeSet<IpAddr>,
    announced: &BTreeSet<IpAddr>,
    metrics: &Metrics,
) -> BTreeSet<IpAddr> {
    let mut now = announced.clone();
    for vip in announced.difference(held) {
        announcer.withdraw(*vip);
        now.remove(vip);
        info!(%vip, "stopped announcing");
    }
    for vip in held.difference(announced) {
        let iface = d
            .ingress
            .iter()
            .filter(|s| s.vips.iter().any(|v| v.vip == *vip))
            .find_map(|s| interfaces.get(&s.key));
        let Some(iface) = iface else { continue };
        match announcer.announce(iface, *vip) {
            Ok(()) => {
                info!(%vip, interface = %iface, "announcing");
                now.insert(*vip);
            }
            Err(e) => {
                metrics.error(e.kind());
                warn!(%vip, interface = %iface, error = %worker::chain(&e), "cannot announce");
            }
        }
    }
    now
}

impl Announce for crate::announce::Announcers {
    fn announce(&mut self, interface: &str, vip: IpAddr) -> crate::announce::Result<()> {
        crate::announce::Announcers::announce(self, interface, vip).map(|_| ())
    }

    fn withdraw(&mut self, vip: IpAddr) {
        crate::announce::Announcers::withdraw(self, vip);
    }

    fn maintain(&mut self) -> Vec<(String, crate::announce::Error)> {
        self.reopen_failed()
    }
}

/// The production announcer.
pub fn announcer() -> Box<dyn Announce> {
    Box::new(crate::announce::Announcers::new(crate::announce::Options::default()))
}
