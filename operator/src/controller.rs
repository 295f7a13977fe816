//! The kube-runtime controller: caches, triggers, and the reconcile shell
//! that feeds the pure functions and writes their results.
//!
//! A reconcile is three steps: [`observe`] reads the service's own part of
//! the caches (through the reverse indexes of [`crate::index`]), [`decide`]
//! computes slices, status and events from it without I/O, and [`write`]
//! sends only what differs.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_dsr_crds::validation::{parse_ip, validate_name, validate_spec};
use kube_dsr_crds::{DsrNodeReport, DsrNodeReportSpec, DsrService, DsrServiceStatus};
use tracing::{debug, info, instrument, warn};

use crate::backends::{self, Inputs, PodFacts, counts};
use crate::conflicts::conflicts_of;
use crate::error::Error;
use crate::index::{Index, Key, Triggers};
use crate::ingress;
use crate::metrics::Metrics;
use crate::slices::{
    MANAGED_BY, MANAGED_BY_LABEL, SliceSummary, desired_slices, same_content, stale_slices,
};
use crate::status::{EventKind, EventSpec, Observation, desired_status, events};

/// Field manager for every apply, and the events' reporting controller.
pub use kube_dsr_crds::contract::OPERATOR_FIELD_MANAGER as FIELD_MANAGER;

/// How often a service is reconciled without any trigger, as a safety net.
/// Each service is re-queued on its own schedule, so the full resync is
/// spread out rather than one burst over every service.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);
/// Reconciles in flight at once. Unbounded, a start-up queues every
/// service at once and each holds its inputs and request bodies while it
/// waits on the API server (hundreds of MiB at 1,000 services × 100
/// pods); the API server, not the operator's CPU, is what they wait on.
const CONCURRENCY: u16 = 16;
/// Triggers for one service within this window make one reconcile (a
/// rollout moves many pods of one service at once). A reconcile costs only
/// the service's own backends, so the window stays well under the
/// one-second budget from a pod change to its slice.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// What a reconcile reads and writes through.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub services: Store<DsrService>,
    /// Pods, nodes, reports and slices, with the reverse indexes that map
    /// changes to services (see [`crate::index`]).
    pub index: Arc<RwLock<Index>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Context {
    /// Every cache has listed once. Before that an empty cache would look
    /// like "no pods" and delete every backend set. (The index re-queues
    /// every service once it has synced.)
    async fn caches_ready(&self) -> bool {
        let services =
            tokio::time::timeout(Duration::from_secs(30), self.services.wait_until_ready());
        matches!(services.await, Ok(Ok(()))) && self.index.read().expect("index lock").synced()
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Reconciles one DsrService: backend set (EndpointSlices), status, events.
#[instrument(skip_all, fields(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())))]
pub async fn reconcile(svc: Arc<DsrService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    if !ctx.caches_ready().await {
        debug!("caches not synced yet");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let result = apply(&svc, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    result
}

/// Logs and counts a failed reconcile, then retries it later.
pub fn error_policy(svc: Arc<DsrService>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(service = %svc.name_any(), error = %error, source = ?std::error::Error::source(error), "reconcile failed");
    ctx.metrics.failed(error);
    Action::requeue(RETRY)
}

/// One reconcile: read the service's part of the caches, decide what it
/// should look like (pure), write the difference.
async fn apply(svc: &DsrService, ctx: &Context) -> Result<Action, Error> {
    // From here on an address a pool gave the service is a VIP like any
    // written one (`spec.vips` empty: status.allocatedVips).
    let effective = svc.with_effective_vips();
    let svc = &effective;
    let namespace = svc
        .namespace()
        .ok_or(Error::MissingField { kind: "DsrService", field: "metadata.namespace" })?;
    let key = (namespace, svc.name_any());
    // What was read is dropped before the writes wait on the API server.
    let decision = decide(svc, &key, &observe(svc, &key, ctx), &now());
    write(svc, &key, decision, ctx).await?;
    Ok(Action::requeue(RESYNC))
}

/// The part of the caches one reconcile reads: the pods its selector
/// matches, every node (ingress candidates), every report reduced to this
/// service's entries, its own slices and the services sharing its VIPs.
/// Cost: its own backends plus the node count, not the cluster's pods.
struct Observed {
    pods: Vec<Arc<PodFacts>>,
    nodes: Vec<Arc<Node>>,
    reports: BTreeMap<String, DsrNodeReportSpec>,
    slices: Vec<SliceSummary>,
    rivals: Vec<Arc<DsrService>>,
}

fn observe(svc: &DsrService, key: &Key, ctx: &Context) -> Observed {
    let vips: BTreeSet<IpAddr> = svc.spec.vips.iter().filter_map(|v| parse_ip(v)).collect();
    let (pods, nodes, reports, slices, rivals) = {
        let index = ctx.index.read().expect("index lock");
        let pods = match &svc.spec.selector {
            Some(selector) => index.pods_selected(&key.0, selector),
            None => Vec::new(),
        };
        let reports = index.reports_for(key, &pods);
        (pods, index.nodes(), reports, index.slices_of(key), index.sharing_vips(key, &vips))
    };
    let rivals = rivals
        .iter()
        .filter_map(|(ns, name)| ctx.services.get(&ObjectRef::new(name).within(ns)))
        .collect();
    Observed { pods, nodes, reports, slices, rivals }
}

/// What a reconcile writes: slices whose content differs, stale slices,
/// the status when it differs, and the events the change deserves.
struct Decision {
    apply: Vec<EndpointSlice>,
    delete: Vec<String>,
    status: Option<DsrServiceStatus>,
    events: Vec<EventSpec>,
}

fn decide(svc: &DsrService, key: &Key, obs: &Observed, now: &Time) -> Decision {
    let (namespace, name) = key;
    let mut invalid = validate_name(name);
    invalid.extend(validate_spec(&svc.spec));
    // Only services sharing a VIP can hold one of its claims.
    let rivals: Vec<&DsrService> = obs.rivals.iter().map(AsRef::as_ref).collect();
    let conflicts = if invalid.is_empty() { conflicts_of(svc, &rivals) } else { Vec::new() };
    let active = invalid.is_empty() && conflicts.is_empty();

    let reports: BTreeMap<String, &DsrNodeReportSpec> =
        obs.reports.iter().map(|(n, r)| (n.clone(), r)).collect();
    let nodes: Vec<&Node> = obs.nodes.iter().map(AsRef::as_ref).collect();
    let nodes_by_name: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), *n)).collect();
    let backend_set = if active {
        let pods: Vec<&PodFacts> = obs.pods.iter().map(AsRef::as_ref).collect();
        backends::desired_backends(&Inputs {
            service: svc,
            pods: &pods,
            nodes: &nodes_by_name,
            reports: &reports,
        })
    } else {
        Vec::new()
    };
    let plan = ingress::plan(&svc.spec, &nodes, &reports);

    // Backend set: only an active service has one.
    let desired = if active { desired_slices(svc, &backend_set) } else { Vec::new() };
    let delete = stale_slices(&obs.slices, &desired).into_iter().map(String::from).collect();
    let apply =
        desired.into_iter().filter(|d| !obs.slices.iter().any(|e| same_content(e, d))).collect();

    let observation = Observation {
        namespace,
        name,
        generation: svc.metadata.generation,
        spec: &svc.spec,
        invalid: &invalid,
        conflicts: &conflicts,
        counts: counts(&backend_set),
        not_serving: &backends::not_serving(&backend_set),
        plan: &plan,
        reports: &reports,
    };
    let status = desired_status(&observation, svc.status.as_ref(), now);
    let events = events(svc.status.as_ref(), &status);
    // The address manager's fields are not this writer's to compare.
    let current = svc.status.clone().map(crate::pool::without_ipam_fields);
    let status = (current.as_ref() != Some(&status)).then_some(status);
    Decision { apply, delete, status, events }
}

async fn write(
    svc: &DsrService,
    key: &Key,
    decision: Decision,
    ctx: &Context,
) -> Result<(), Error> {
    let (namespace, name) = key;
    let slice_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), namespace);
    let apply_params = PatchParams::apply(FIELD_MANAGER).force();
    for slice in &decision.apply {
        let slice_name = slice.name_any();
        slice_api
            .patch(&slice_name, &apply_params, &Patch::Apply(slice))
            .await
            .map_err(|source| Error::Kube { action: "apply EndpointSlice", source })?;
        debug!(slice = %slice_name, endpoints = slice.endpoints.len(), "applied EndpointSlice");
    }
    for stale in &decision.delete {
        match slice_api.delete(stale, &DeleteParams::default()).await {
            Ok(_) => debug!(slice = %stale, "deleted EndpointSlice"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(Error::Kube { action: "delete EndpointSlice", source }),
        }
    }

    if let Some(status) = &decision.status {
        let api: Api<DsrService> = Api::namespaced(ctx.client.clone(), namespace);
        let patch = serde_json::json!({
            "apiVersion": DsrService::api_version(&()),
            "kind": DsrService::kind(&()),
            "status": status,
        });
        api.patch_status(name, &apply_params, &Patch::Apply(&patch))
            .await
            .map_err(|source| Error::Kube { action: "apply DsrService status", source })?;
        info!(ready = status.ready_backends, total = status.total_backends, "status updated");
    }

    // Events are best effort: a failure to record one must not fail (and
    // retry) a reconcile whose real work is done.
    for ev in decision.events {
        let warning = matches!(ev.kind, EventKind::Warning);
        crate::events::record(&ctx.recorder, svc, warning, ev.reason, ev.note, "Reconcile").await;
    }
    Ok(())
}

/// Feeds one kind's watch events into the index and yields the services
/// each change re-queues. Watch errors are retried by the watcher's
/// backoff; the relist that follows re-derives whatever was missed.
fn triggers<K: Send + 'static>(
    kind: &'static str,
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    index: Arc<RwLock<Index>>,
    apply: impl Fn(&mut Index, watcher::Event<K>) -> Triggers + Send + 'static,
) -> BoxStream<'static, ObjectRef<DsrService>> {
    events
        .map(move |ev| {
            let keys = match ev {
                Ok(ev) => apply(&mut index.write().expect("index lock"), ev),
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying");
                    Triggers::new()
                }
            };
            stream::iter(keys.into_iter().map(|(ns, name)| ObjectRef::new(&name).within(&ns)))
        })
        .flatten()
        .boxed()
}

fn map_event<A, B>(ev: watcher::Event<A>, f: impl Fn(A) -> B) -> watcher::Event<B> {
    match ev {
        watcher::Event::Apply(o) => watcher::Event::Apply(f(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(f(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(f(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Builds and runs the controller until `shutdown` resolves; in-flight
/// reconciles finish first.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let index = Arc::new(RwLock::new(Index::default()));

    // DsrServices: the controller's own store and the index's service
    // facts come from the same stream, so both move together. A service
    // change re-queues the services sharing its VIPs (conflicts).
    let (services, service_writer) = reflector::store();
    metrics.watch_services(services.clone());
    let (siblings_tx, siblings_rx) = futures::channel::mpsc::unbounded::<ObjectRef<DsrService>>();
    let service_stream = reflector::reflector(
        service_writer,
        watcher(Api::<DsrService>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|s: &mut DsrService| s.managed_fields_mut().clear()),
    )
    .inspect_ok({
        let index = Arc::clone(&index);
        move |ev| {
            let keys = index.write().expect("index lock").apply_service(ev.clone());
            for (ns, name) in keys {
                let _ = siblings_tx.unbounded_send(ObjectRef::new(&name).within(&ns));
            }
        }
    })
    .touched_objects();

    // Pods are reduced to the few fields the operator reads as they arrive
    // (`PodFacts`): no cache of whole Pods.
    let pods = triggers(
        "Pod",
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff(),
        Arc::clone(&index),
        |ix, ev| ix.apply_pod(map_event(ev, |p| PodFacts::from(&p))),
    );
    // Node readiness and labels move ingress nodes, announcers and zones.
    let nodes = triggers(
        "Node",
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff(),
        Arc::clone(&index),
        Index::apply_node,
    );
    let reports = triggers(
        "DsrNodeReport",
        watcher(Api::<DsrNodeReport>::all(client.clone()), watcher::Config::default())
            .default_backoff(),
        Arc::clone(&index),
        Index::apply_report,
    );
    let slices = triggers(
        "EndpointSlice",
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        )
        .default_backoff(),
        Arc::clone(&index),
        Index::apply_slice,
    );

    let ctx = Arc::new(Context {
        client: client.clone(),
        services: services.clone(),
        index,
        recorder: Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER)),
        metrics,
    });

    Controller::for_stream(service_stream, services)
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(DEBOUNCE)
                .concurrency(CONCURRENCY),
        )
        .reconcile_on(stream::select_all([pods, nodes, reports, slices, siblings_rx.boxed()]))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(service = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "controller event"),
            }
        })
        .await;
    info!("controller stopped");
}
