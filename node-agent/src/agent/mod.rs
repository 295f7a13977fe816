//! The running agent: watches, the worker thread, announcement Leases, the
//! node report and the HTTP endpoints.
//!
//! Data flow: DsrService and EndpointSlice reflectors → [`desired::desired`]
//! (pure) → the worker thread converges the kernel and publishes an
//! [`worker::Outcome`] → [`report::build`] → server-side apply of this
//! node's `DsrNodeReport` when it changed. Beside it, the Lease task decides
//! which VIPs this node announces and tells the announcer.

pub mod desired;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod report;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
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
use desired::Desired;
use metrics::Metrics;
use worker::{Outcome, WorkerConfig};

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "dsr-agent";

/// Answers ARP / neighbour discovery for VIPs this node holds the Lease of.
pub trait Announce: Send {
    /// Starts answering for `vip` on `interface` and sends gratuitous ARP
    /// (IPv4) or unsolicited neighbour advertisements (IPv6).
    fn announce(&mut self, interface: &str, vip: IpAddr) -> Result<(), String>;
    /// Stops answering for `vip`; no answer leaves after it returns.
    fn withdraw(&mut self, vip: IpAddr);
    /// Called every Lease round: re-opens what failed (an interface that
    /// was re-created); returns what could not be.
    fn maintain(&mut self) -> Vec<String>;
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

/// Resolves once `rx` turns true (or its sender is gone).
async fn when_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    error!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = term => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        }
        let _ = tx.send(true);
    });
    rx
}

/// Runs a reflector for `api` into a store, poking `changed` on every event.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
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
    reflect_modified(api, config, changed, metrics, |_| {})
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

/// [`reflect`], with every object passed through `modify` before it is
/// cached (to keep only the fields read).
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
                    metrics.error("kube_api");
                    warn!(error = %e, "watch failed; retrying");
                }
            }
        }
    });
    store
}

/// Runs the agent until SIGTERM. The dataplane and everything configured
/// in pods stay as they are when it stops: an agent restart or upgrade
/// never interrupts forwarding. `announcer` answers ARP/ND.
pub async fn run(cfg: Config, mut announcer: Box<dyn Announce>) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(http::Health { metrics: Arc::clone(&metrics), ready: false.into() });
    let server =
        http::serve(cfg.http_addr, Arc::clone(&health), when_true(shutdown.clone())).await?;
    let server = tokio::spawn(server);
    info!(addr = %cfg.http_addr, "serving /metrics, /healthz, /readyz");

    let client = Client::try_default()
        .await
        .context("building a client from kubeconfig or the service account")?;
    let version = client.apiserver_version().await.context("reaching the API server")?;
    info!(version = %version.git_version, node = %cfg.node_name, "connected to the API server");

    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .get(&cfg.node_name)
        .await
        .with_context(|| format!("reading my Node {}", cfg.node_name))?;
    let node_uid = node.metadata.uid.clone().context("my Node has no uid")?;
    let reports: Api<DsrNodeReport> = Api::all(client.clone());
    let previous = reports.get_opt(&cfg.node_name).await.context("reading my DsrNodeReport")?;
    let known_pods: BTreeSet<String> = previous
        .iter()
        .flat_map(|r| r.spec.backends.iter().map(|b| b.pod_uid.to_ascii_lowercase()))
        .collect();

    // Watches.
    let changed = Arc::new(tokio::sync::Notify::new());
    let services = reflect(
        Api::<DsrService>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        metrics.clone(),
    );
    let slices = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            desired::MANAGED_BY_LABEL,
            desired::MANAGED_BY
        )),
        changed.clone(),
        metrics.clone(),
    );
    // Node addresses: where other nodes' pods are reached, and peers.
    let node_cache = reflect_modified(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        metrics.clone(),
        strip_node,
    );
    // Nothing is converged before the caches have listed once: an empty
    // cache would read as "remove everything".
    services.wait_until_ready().await.context("listing DsrServices")?;
    slices.wait_until_ready().await.context("listing EndpointSlices")?;
    node_cache.wait_until_ready().await.context("listing Nodes")?;
    info!("caches synced");

    // The worker thread.
    let (to_worker, inputs) = std::sync::mpsc::channel::<Arc<Desired>>();
    let (outcome_tx, mut outcome_rx) = watch::channel::<Option<Outcome>>(None);
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
    let wmetrics = Arc::clone(&metrics);
    let worker = std::thread::Builder::new()
        .name("kdsr-worker".into())
        .spawn(move || {
            worker::run(wcfg, wmetrics, inputs, |o| {
                let _ = outcome_tx.send(Some(o));
            })
        })
        .context("starting the worker thread")?;

    let latest: Arc<Mutex<Arc<Desired>>> = Arc::new(Mutex::new(Arc::new(Desired::default())));
    let mut leases = Leases::new(
        Api::namespaced(client.clone(), &cfg.lease_namespace),
        cfg.node_name.clone(),
        cfg.lease_duration,
        cfg.lease_retry,
    );
    let mut announced: BTreeSet<IpAddr> = BTreeSet::new();
    let (announced_tx, mut announced_rx) = watch::channel(BTreeSet::<IpAddr>::new());
    let mut lease_tick = tokio::time::interval(cfg.lease_retry);
    let mut last_report: Option<DsrNodeReportSpec> = None;
    let mut stop = shutdown.clone();
    let mut compute = true;
    loop {
        if compute {
            compute = false;
            let mut d = desired::desired(
                &cfg.node_name,
                &services.state().iter().map(|s| (**s).clone()).collect::<Vec<_>>(),
                &slices.state().iter().map(|s| (**s).clone()).collect::<Vec<_>>(),
            );
            d.nodes = node_cache
                .state()
                .iter()
                .map(|n| (n.metadata.name.clone().unwrap_or_default(), desired::node_addresses(n)))
                .collect();
            let d = Arc::new(d);
            let same = **latest.lock().unwrap_or_else(|e| e.into_inner()) == *d;
            if !same || last_report.is_none() {
                *latest.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&d);
                if to_worker.send(d).is_err() {
                    anyhow::bail!("the worker thread ended");
                }
                // A VIP that is no longer wanted stops being announced now,
                // not at the next Lease renewal.
                lease_tick.reset_immediately();
            }
        }
        tokio::select! {
            _ = changed.notified() => {
                // Let a burst of events settle into one desired state.
                tokio::time::sleep(Duration::from_millis(100)).await;
                compute = true;
            }
            r = outcome_rx.changed() => {
                if r.is_err() { anyhow::bail!("the worker thread ended"); }
                let outcome = outcome_rx.borrow_and_update().clone();
                if let Some(o) = outcome {
                    health.ready.store(true, Ordering::Relaxed);
                    let d = latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let spec = report::build(&cfg.node_name, env!("CARGO_PKG_VERSION"), &d, &o, &announced_rx.borrow());
                    apply_report(&reports, &cfg.node_name, &node_uid, spec, &mut last_report, &metrics).await;
                }
            }
            r = announced_rx.changed() => {
                if r.is_err() { continue; }
                // Republish the report with the new announcements, from the
                // last outcome.
                let outcome = outcome_rx.borrow().clone();
                if let Some(o) = outcome {
                    let d = latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let spec = report::build(&cfg.node_name, env!("CARGO_PKG_VERSION"), &d, &o, &announced_rx.borrow_and_update());
                    apply_report(&reports, &cfg.node_name, &node_uid, spec, &mut last_report, &metrics).await;
                }
            }
            _ = lease_tick.tick() => {
                let d = latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let wanted = lease::candidates(&cfg.node_name, &d);
                // A slow API must not keep this node answering past a
                // held Lease's limit: the round stops there, and what is
                // held is re-read below.
                let deadline = leases
                    .earliest_expiry()
                    .unwrap_or_else(|| std::time::Instant::now() + 4 * cfg.lease_retry);
                match tokio::time::timeout_at(deadline.into(), leases.round(&wanted)).await {
                    Ok(errors) => {
                        for (vip, e) in errors {
                            metrics.error("lease");
                            warn!(%vip, error = %e, "announcement lease");
                        }
                    }
                    Err(_) => {
                        metrics.error("lease");
                        warn!("the Lease round reached a held Lease's limit; re-checking what is held");
                    }
                }
                let interfaces = outcome_rx.borrow().as_ref().map(|o| o.interfaces.clone()).unwrap_or_default();
                for e in announcer.maintain() {
                    metrics.error("announce");
                    warn!(error = %e, "announcer could not be re-opened");
                }
                let held = leases.held();
                let now = reconcile_announcements(announcer.as_mut(), &d, &interfaces, &held, &announced, &metrics);
                if now != announced {
                    announced = now;
                    metrics.set_announced(announced.len());
                    let _ = announced_tx.send(announced.clone());
                }
            }
            _ = stop.wait_for(|v| *v) => break,
        }
    }

    info!("shutting down; the dataplane and pod configuration stay in place");
    health.ready.store(false, Ordering::Relaxed);
    for vip in &announced {
        announcer.withdraw(*vip);
    }
    leases.release_all().await;
    drop(to_worker);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "HTTP server failed"),
        Err(e) => error!(error = %e, "HTTP server task failed"),
    }
    Ok(())
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
                metrics.error("announce");
                warn!(%vip, interface = %iface, error = %e, "cannot announce");
            }
        }
    }
    now
}

/// Applies this node's report when its content differs from the last one
/// applied.
async fn apply_report(
    api: &Api<DsrNodeReport>,
    node: &str,
    node_uid: &str,
    spec: DsrNodeReportSpec,
    last: &mut Option<DsrNodeReportSpec>,
    metrics: &Metrics,
) {
    if last.as_ref() == Some(&spec) {
        return;
    }
    let mut report = DsrNodeReport::for_node(node, node_uid);
    report.spec = spec.clone();
    report.spec.update_time = Some(Time(Timestamp::now()));
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(node, &params, &Patch::Apply(&report)).await {
        Ok(_) => *last = Some(spec),
        Err(e) => {
            metrics.error("kube_api");
            warn!(error = %e, "applying the node report failed; retried on the next change or resync");
        }
    }
}

impl Announce for crate::announce::Announcers {
    fn announce(&mut self, interface: &str, vip: IpAddr) -> Result<(), String> {
        crate::announce::Announcers::announce(self, interface, vip)
            .map(|_| ())
            .map_err(|e| worker::chain(&e))
    }

    fn withdraw(&mut self, vip: IpAddr) {
        crate::announce::Announcers::withdraw(self, vip);
    }

    fn maintain(&mut self) -> Vec<String> {
        self.reopen_failed()
            .into_iter()
            .map(|(i, e)| format!("{i}: {}", worker::chain(&e)))
            .collect()
    }
}

/// The production announcer.
pub fn announcer() -> Box<dyn Announce> {
    Box::new(crate::announce::Announcers::new(crate::announce::Options::default()))
}
