//! The kube-runtime controller: caches, triggers, and the reconcile shell
//! that feeds the pure functions and writes their results.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_dsr_crds::validation::{validate_name, validate_spec};
use kube_dsr_crds::{DsrNodeReport, DsrNodeReportSpec, DsrService};
use tracing::{debug, info, instrument, warn};

use crate::backends::{self, Inputs, counts};
use crate::conflicts::{conflicts_of, sharing_a_vip};
use crate::error::Error;
use crate::ingress;
use crate::metrics::Metrics;
use crate::slices::{
    MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL, desired_slices, same_content, stale_slices,
};
use crate::status::{EventKind, Observation, desired_status, events};

/// Field manager for every apply, and the events' reporting controller.
pub const FIELD_MANAGER: &str = "dsr-operator";

/// How often a service is reconciled without any trigger, as a safety net.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);

/// What a reconcile reads and writes through.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub services: Store<DsrService>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub reports: Store<DsrNodeReport>,
    pub slices: Store<EndpointSlice>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Context {
    /// Every cache has listed once. Before that an empty cache would look
    /// like "no pods" and delete every backend set.
    async fn caches_ready(&self) -> bool {
        let all = async {
            self.services.wait_until_ready().await.is_ok()
                && self.pods.wait_until_ready().await.is_ok()
                && self.nodes.wait_until_ready().await.is_ok()
                && self.reports.wait_until_ready().await.is_ok()
                && self.slices.wait_until_ready().await.is_ok()
        };
        tokio::time::timeout(Duration::from_secs(30), all).await.unwrap_or(false)
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

async fn apply(svc: &DsrService, ctx: &Context) -> Result<Action, Error> {
    // From here on an address a pool gave the service is a VIP like any
    // written one (`spec.vips` empty: status.allocatedVips).
    let effective = svc.with_effective_vips();
    let svc = &effective;
    let namespace = svc
        .namespace()
        .ok_or(Error::MissingField { kind: "DsrService", field: "metadata.namespace" })?;
    let name = svc.name_any();

    let mut invalid = validate_name(&name);
    invalid.extend(validate_spec(&svc.spec));
    let all_services = ctx.services.state();
    let all_refs: Vec<&DsrService> = all_services.iter().map(|s| s.as_ref()).collect();
    let conflicts = if invalid.is_empty() { conflicts_of(svc, &all_refs) } else { Vec::new() };
    let active = invalid.is_empty() && conflicts.is_empty();

    let report_objs = ctx.reports.state();
    let reports: BTreeMap<String, &DsrNodeReportSpec> =
        report_objs.iter().map(|r| (r.name_any(), &r.spec)).collect();
    let node_objs = ctx.nodes.state();
    let nodes: Vec<&Node> = node_objs.iter().map(|n| n.as_ref()).collect();
    let nodes_by_name: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), *n)).collect();

    let backend_set = if active {
        let pod_objs = ctx.pods.state();
        let pods: Vec<&Pod> = pod_objs.iter().map(|p| p.as_ref()).collect();
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
    let existing: Vec<EndpointSlice> = ctx
        .slices
        .state()
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace.as_str())
                && s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                && s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
        })
        .map(|s| s.as_ref().clone())
        .collect();
    let slice_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let apply_params = PatchParams::apply(FIELD_MANAGER).force();
    for slice in &desired {
        let slice_name = slice.name_any();
        let current = existing.iter().find(|e| e.name_any() == slice_name);
        if current.is_some_and(|c| same_content(c, slice)) {
            continue;
        }
        slice_api
            .patch(&slice_name, &apply_params, &Patch::Apply(slice))
            .await
            .map_err(|source| Error::Kube { action: "apply EndpointSlice", source })?;
        debug!(slice = %slice_name, endpoints = slice.endpoints.len(), "applied EndpointSlice");
    }
    for stale in stale_slices(&existing, &desired) {
        match slice_api.delete(stale, &DeleteParams::default()).await {
            Ok(_) => debug!(slice = %stale, "deleted EndpointSlice"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(Error::Kube { action: "delete EndpointSlice", source }),
        }
    }

    // Status, written only when it differs.
    let obs = Observation {
        namespace: &namespace,
        name: &name,
        generation: svc.metadata.generation,
        spec: &svc.spec,
        invalid: &invalid,
        conflicts: &conflicts,
        counts: counts(&backend_set),
        not_serving: &backends::not_serving(&backend_set),
        plan: &plan,
        reports: &reports,
    };
    let status = desired_status(&obs, svc.status.as_ref(), &now());
    // The address manager's fields are not this writer's to compare.
    if svc.status.clone().map(crate::pool::without_ipam_fields).as_ref() != Some(&status) {
        let api: Api<DsrService> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": DsrService::api_version(&()),
            "kind": DsrService::kind(&()),
            "status": status,
        });
        api.patch_status(&name, &apply_params, &Patch::Apply(&patch))
            .await
            .map_err(|source| Error::Kube { action: "apply DsrService status", source })?;
        info!(ready = status.ready_backends, total = status.total_backends, "status updated");
    }

    // Events are best effort: a failure to record one must not fail (and
    // retry) a reconcile whose real work is done.
    let reference = svc.object_ref(&());
    for ev in events(svc.status.as_ref(), &status) {
        let event = Event {
            type_: match ev.kind {
                EventKind::Normal => EventType::Normal,
                EventKind::Warning => EventType::Warning,
            },
            reason: ev.reason.into(),
            note: Some(ev.note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, reason = ev.reason, "could not record event");
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// Services a pod may concern: those with a selector in its namespace. A
/// pod whose labels stopped matching still concerns the service that had it.
fn services_for_pod(services: &Store<DsrService>, pod: &Pod) -> Vec<ObjectRef<DsrService>> {
    let ns = pod.namespace();
    services
        .state()
        .iter()
        .filter(|s| s.namespace() == ns && s.spec.selector.is_some())
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

fn all_services(services: &Store<DsrService>) -> Vec<ObjectRef<DsrService>> {
    services.state().iter().map(|s| ObjectRef::from_obj(s.as_ref())).collect()
}

/// Builds and runs the controller until `shutdown` resolves; in-flight
/// reconciles finish first.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let services_api: Api<DsrService> = Api::all(client.clone());
    let controller =
        Controller::new(services_api.clone(), watcher::Config::default().any_semantic());
    let services = controller.store();
    metrics.watch_services(services.clone());

    // One reflector per kind: its cache is what reconcile reads, its
    // stream is what triggers reconciles.
    let (pods, pod_writer) = reflector::store();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff()
            // Managed fields are most of a pod's bytes and none of our business.
            .modify(|p: &mut Pod| p.managed_fields_mut().clear()),
    )
    .touched_objects();
    let (nodes, node_writer) = reflector::store();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|n: &mut Node| {
                n.managed_fields_mut().clear();
                // Images lists are large and irrelevant.
                if let Some(st) = n.status.as_mut() {
                    st.images = None;
                }
            }),
    )
    .touched_objects();
    let (reports, report_writer) = reflector::store();
    let report_stream = reflector::reflector(
        report_writer,
        watcher(Api::<DsrNodeReport>::all(client.clone()), watcher::Config::default())
            .default_backoff(),
    )
    .touched_objects();
    let (slices, slice_writer) = reflector::store();
    let slice_stream = reflector::reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        )
        .default_backoff(),
    )
    .touched_objects();

    let ctx = Arc::new(Context {
        client: client.clone(),
        services: services.clone(),
        pods: pods.clone(),
        nodes,
        reports,
        slices,
        recorder: Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER)),
        metrics,
    });

    let for_pods = services.clone();
    let for_nodes = services.clone();
    let for_reports = services.clone();
    let for_siblings = services.clone();
    controller
        // Pod churn (a rollout) fires many triggers per service; let them
        // settle into one reconcile.
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)),
        )
        .owns_stream(slice_stream)
        .watches_stream(pod_stream, move |pod| services_for_pod(&for_pods, &pod))
        // Node readiness and labels move ingress nodes, announcers and zones.
        .watches_stream(node_stream, move |_| all_services(&for_nodes))
        .watches_stream(report_stream, move |_| all_services(&for_reports))
        // A change to (or deletion of) one service can start or end a
        // conflict for the others on its VIPs.
        .watches(services_api, watcher::Config::default(), move |svc| {
            let all = for_siblings.state();
            let refs: Vec<&DsrService> = all.iter().map(|s| s.as_ref()).collect();
            sharing_a_vip(&svc, &refs).into_iter().map(ObjectRef::from_obj).collect::<Vec<_>>()
        })
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
