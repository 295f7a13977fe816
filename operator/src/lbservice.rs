//! `Service` type LoadBalancer with `spec.loadBalancerClass: kubedsr.io/dsr`
//! (or without a class, when kube-dsr is configured as the default): each
//! served Service gets one DsrService of the same name that the operator
//! owns (owner reference, label [`SERVICE_LABEL`]); the DsrService does the
//! rest, and its state comes back as the Service's
//! `status.loadBalancer.ingress` (`ipMode: VIP`) and `kubedsr.io/*`
//! conditions.
//!
//! Services of any other class, and class-less ones unless configured, are
//! never written to: the reconcile returns before any write unless this
//! field manager already owns fields in the Service (a Service that was
//! served and no longer is, whose status it then clears).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kube_dsr_crds::dsrservice::conditions as svc_conditions;
use kube_dsr_crds::validation::{parse_ip, vip_errors};
use kube_dsr_crds::{
    ADDRESS_POOL_ANNOTATION, ALLOW_SHARED_IP_ANNOTATION, BackendSetup, DsrService, DsrServiceSpec,
    Hashing, Ingress, IpFamily, LOAD_BALANCER_CLASS, LOAD_BALANCER_IPS_ANNOTATION, Protocol,
    ServicePort,
};
use tracing::{debug, info, warn};

use crate::error::Error;

/// Field manager of the owned DsrServices and of the Services' status.
pub const LB_MANAGER: &str = "dsr-operator-lb";
/// Label on an owned DsrService: the Service's name.
pub const SERVICE_LABEL: &str = "kubedsr.io/service";
/// Condition types on a served Service (`metav1.Condition`, prefixed as
/// conditions not defined by Kubernetes must be).
pub const ACCEPTED: &str = "kubedsr.io/Accepted";
/// Copied from the DsrService, prefixed.
const MIRRORED: [&str; 3] =
    [svc_conditions::PROGRAMMED, svc_conditions::CONFLICT, crate::pool::VIP_ALLOCATED];

const RESYNC: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

/// Whether kube-dsr serves this Service.
pub fn served(svc: &Service, default_class: bool) -> bool {
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) => c == LOAD_BALANCER_CLASS,
        None => default_class,
    }
}

/// Why a served Service is not programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { reason, message: message.into() }
}

/// Requested VIPs: the annotation, else the deprecated `spec.loadBalancerIP`.
fn requested_vips(svc: &Service) -> Result<Vec<String>, Refusal> {
    let annotated = svc.annotations().get(LOAD_BALANCER_IPS_ANNOTATION);
    let raw: Vec<String> = match annotated {
        Some(a) => a.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_ip.clone())
            .filter(|s| !s.is_empty())
            .into_iter()
            .collect(),
    };
    let mut out: Vec<String> = Vec::new();
    let mut families = Vec::new();
    for r in raw {
        let Some(ip) = parse_ip(&r) else {
            return Err(refuse("InvalidLoadBalancerIP", format!("{r:?} is not an IP address")));
        };
        if let Some(e) = vip_errors(&ip.to_string()).first() {
            return Err(refuse("InvalidLoadBalancerIP", format!("{r}: {e}")));
        }
        let fam = IpFamily::of(&ip);
        if families.contains(&fam) {
            return Err(refuse(
                "InvalidLoadBalancerIP",
                format!("{LOAD_BALANCER_IPS_ANNOTATION}: at most one address per family"),
            ));
        }
        families.push(fam);
        out.push(ip.to_string());
    }
    Ok(out)
}

/// The DsrService that serves `svc`, or why there is none. `pods` are the
/// pods the Service selects (only needed to resolve named target ports).
pub fn translate(svc: &Service, pods: &[Pod]) -> Result<DsrService, Refusal> {
    let spec = svc.spec.as_ref().ok_or_else(|| refuse("NoSpec", "the Service has no spec"))?;
    let selector = spec.selector.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
        refuse(
            "NoSelector",
            "kube-dsr serves the pods spec.selector chooses; a Service without a selector (hand-made EndpointSlices) is not supported",
        )
    })?;
    let svc_ports = spec.ports.clone().unwrap_or_default();
    if svc_ports.is_empty() {
        return Err(refuse("NoPorts", "the Service has no ports"));
    }
    let mut ports = Vec::new();
    for p in &svc_ports {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                return Err(refuse(
                    "UnsupportedProtocol",
                    format!("port {}/{other}: the DSR dataplane forwards TCP and UDP only", p.port),
                ));
            }
        };
        let mismatch = |target: String| {
            refuse(
                "TargetPortMismatch",
                format!(
                    "port {}/{protocol} has targetPort {target}: Direct Server Return delivers packets with the port the client used, so the pods must listen on {} itself (leave targetPort out or set it equal to port)",
                    p.port, p.port
                ),
            )
        };
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(n)) if *n == p.port => {}
            Some(IntOrString::Int(n)) => return Err(mismatch(n.to_string())),
            Some(IntOrString::String(name)) => {
                // A named port resolves per pod; any pod where it names
                // another number would get packets on the wrong port.
                for pod in pods {
                    let named = pod.spec.iter().flat_map(|s| s.containers.iter()).flat_map(|c| {
                        c.ports.iter().flatten().filter(|cp| {
                            cp.name.as_deref() == Some(name.as_str())
                                && cp.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
                        })
                    });
                    for cp in named {
                        if cp.container_port != p.port {
                            return Err(mismatch(format!(
                                "{name:?} (container port {} in pod {})",
                                cp.container_port,
                                pod.name_any()
                            )));
                        }
                    }
                }
            }
        }
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: p.port,
            protocol,
        });
    }
    let vips = requested_vips(svc)?;
    let ip_families = if vips.is_empty() {
        let listed: Vec<IpFamily> = spec
            .ip_families
            .iter()
            .flatten()
            .filter_map(|f| match f.as_str() {
                "IPv4" => Some(IpFamily::IPv4),
                "IPv6" => Some(IpFamily::IPv6),
                _ => None,
            })
            .collect();
        let dual = matches!(
            spec.ip_family_policy.as_deref(),
            Some("PreferDualStack") | Some("RequireDualStack")
        );
        match (listed.first(), dual) {
            (None, _) => Vec::new(),
            (Some(first), false) => vec![*first],
            (Some(_), true) => listed,
        }
    } else {
        Vec::new()
    };

    let name = svc.name_any();
    let mut labels = svc.labels().clone();
    labels.insert(SERVICE_LABEL.into(), name.clone());
    let annotations: BTreeMap<String, String> =
        [ALLOW_SHARED_IP_ANNOTATION, ADDRESS_POOL_ANNOTATION]
            .into_iter()
            .filter_map(|k| svc.annotations().get(k).map(|v| (k.to_string(), v.clone())))
            .collect();
    let mut out = DsrService::new(
        &name,
        DsrServiceSpec {
            vips,
            ip_families,
            ports,
            selector: Some(selector),
            backends: None,
            ingress: Ingress::default(),
            hashing: Hashing::default(),
            backend_setup: BackendSetup::default(),
        },
    );
    out.metadata.namespace = svc.namespace();
    out.metadata.labels = Some(labels);
    out.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    out.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name,
        uid: svc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    Ok(out)
}

fn owned_by(d: &DsrService, svc: &Service) -> bool {
    d.owner_references().iter().any(|o| Some(&o.uid) == svc.uid().as_ref() && o.kind == "Service")
}

/// What the Service's status should say (our parts only).
#[derive(Clone, Debug, PartialEq)]
pub struct LbStatus {
    pub ingress: Vec<String>,
    pub conditions: Vec<Condition>,
}

/// A condition observed now.
fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    crate::status::condition(type_, ok, reason, message, generation, &Time(Timestamp::now()))
}

/// The Service status from the refusal or the DsrService serving it: its
/// VIPs are published only while that DsrService is Programmed (and not
/// in Conflict), so clients are never sent to an address nothing serves.
pub fn lb_status(svc: &Service, outcome: Result<&DsrService, &Refusal>) -> LbStatus {
    let g = svc.metadata.generation;
    match outcome {
        Err(r) => LbStatus {
            ingress: Vec::new(),
            conditions: vec![
                condition(ACCEPTED, false, r.reason, r.message.clone(), g),
                condition(
                    "kubedsr.io/Programmed",
                    false,
                    "NotAccepted",
                    "nothing is programmed for a refused Service".into(),
                    g,
                ),
            ],
        },
        Ok(d) => {
            let conds = d.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
            let find = |t: &str| conds.iter().find(|c| c.type_ == t);
            let mut out = vec![match find(svc_conditions::ACCEPTED) {
                Some(c) => {
                    Condition { type_: ACCEPTED.into(), observed_generation: g, ..c.clone() }
                }
                None => condition(
                    ACCEPTED,
                    true,
                    "Accepted",
                    format!("served by DsrService {}", d.name_any()),
                    g,
                ),
            }];
            let allocated = d.status.as_ref().and_then(|s| s.vip_allocated.clone());
            for t in MIRRORED {
                let c = if t == crate::pool::VIP_ALLOCATED { allocated.as_ref() } else { find(t) };
                if let Some(c) = c {
                    out.push(Condition {
                        type_: format!("kubedsr.io/{t}"),
                        observed_generation: g,
                        ..c.clone()
                    });
                }
            }
            let programmed = find(svc_conditions::PROGRAMMED).is_some_and(|c| c.status == "True")
                && find(svc_conditions::CONFLICT).is_none_or(|c| c.status != "True");
            let ingress = if programmed {
                d.effective_vips().into_iter().map(str::to_string).collect()
            } else {
                Vec::new()
            };
            LbStatus { ingress, conditions: out }
        }
    }
}

fn current_lb_status(svc: &Service) -> LbStatus {
    let st = svc.status.as_ref();
    LbStatus {
        ingress: st
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
            .unwrap_or_default(),
        conditions: st
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_.starts_with("kubedsr.io/"))
            .collect(),
    }
}

fn same(a: &LbStatus, b: &LbStatus) -> bool {
    let key = |s: &LbStatus| {
        let mut c: Vec<_> = s
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone()))
            .collect();
        c.sort();
        (s.ingress.clone(), c)
    };
    key(a) == key(b)
}

struct Ctx {
    client: Client,
    services: Store<Service>,
    owned: Store<DsrService>,
    recorder: Recorder,
    default_class: bool,
}

impl Ctx {
    async fn event(&self, svc: &Service, warning: bool, reason: &str, note: String) {
        crate::events::record(&self.recorder, svc, warning, reason, note, "Reconcile").await;
    }
}

/// Whether this manager owns fields of the Service (it served it before).
fn wrote_before(svc: &Service) -> bool {
    svc.managed_fields().iter().any(|m| m.manager.as_deref() == Some(LB_MANAGER))
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ours = served(&svc, ctx.default_class);
    if !ours && !wrote_before(&svc) {
        // Not ours and never was: no write of any kind. (An owned
        // DsrService cannot exist without a write to the status as well.)
        return Ok(Action::await_change());
    }
    let ready = async {
        ctx.services.wait_until_ready().await.is_ok() && ctx.owned.wait_until_ready().await.is_ok()
    };
    if !tokio::time::timeout(Duration::from_secs(30), ready).await.unwrap_or(false) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let ns = svc
        .namespace()
        .ok_or(Error::MissingField { kind: "Service", field: "metadata.namespace" })?;
    let name = svc.name_any();
    let dsr_api: Api<DsrService> = Api::namespaced(ctx.client.clone(), &ns);
    let owned = ctx.owned.get(&ObjectRef::new(&name).within(&ns)).filter(|d| owned_by(d, &svc));

    if !ours {
        if owned.is_some() {
            delete(&dsr_api, &name).await?;
        }
        write_status(&ctx, &svc, &LbStatus { ingress: Vec::new(), conditions: Vec::new() }).await?;
        info!(service = %format!("{ns}/{name}"), "no longer served: DsrService removed, status cleared");
        return Ok(Action::await_change());
    }

    let named_ports = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .any(|p| matches!(p.target_port, Some(IntOrString::String(_))));
    let pods = match svc.spec.as_ref().and_then(|s| s.selector.as_ref()) {
        Some(sel) if named_ports && !sel.is_empty() => {
            let selector: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
            Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                .list(&ListParams::default().labels(&selector.join(",")))
                .await
                .map_err(|source| Error::Kube {
                    action: "list pods for named target ports",
                    source,
                })?
                .items
        }
        _ => Vec::new(),
    };
    let outcome = match translate(&svc, &pods) {
        Err(r) => {
            if owned.is_some() {
                delete(&dsr_api, &name).await?;
            }
            Err(r)
        }
        Ok(desired) => ensure(&dsr_api, &svc, owned.as_deref(), desired).await?,
    };
    let wanted = lb_status(&svc, outcome.as_ref());
    let before = current_lb_status(&svc);
    if same(&wanted, &before) {
        return Ok(Action::requeue(RESYNC));
    }
    let mut wanted = wanted;
    for c in &mut wanted.conditions {
        if let Some(o) =
            before.conditions.iter().find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
    write_status(&ctx, &svc, &wanted).await?;

    // Events on transitions only.
    let find = |s: &LbStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned();
    if let Some(a) = find(&wanted, ACCEPTED).filter(|c| c.status == "False")
        && find(&before, ACCEPTED).is_none_or(|b| b.status != "False" || b.reason != a.reason)
    {
        ctx.event(&svc, true, &a.reason, a.message.clone()).await;
    }
    let conflict = "kubedsr.io/Conflict";
    if let Some(c) = find(&wanted, conflict).filter(|c| c.status == "True")
        && find(&before, conflict).is_none_or(|b| b.status != "True")
    {
        ctx.event(&svc, true, "Conflict", c.message.clone()).await;
    }
    if !wanted.ingress.is_empty() && wanted.ingress != before.ingress {
        ctx.event(
            &svc,
            false,
            "LoadBalancerReady",
            format!("serving on {} (ipMode VIP, Direct Server Return)", wanted.ingress.join(", ")),
        )
        .await;
    }
    Ok(Action::requeue(RESYNC))
}

async fn delete(api: &Api<DsrService>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube { action: "delete owned DsrService", source }),
    }
}

/// Creates the owned DsrService or puts edits back; a DsrService of that
/// name that this Service does not own is left alone and refuses the
/// Service.
async fn ensure(
    api: &Api<DsrService>,
    svc: &Service,
    owned: Option<&DsrService>,
    desired: DsrService,
) -> Result<Result<DsrService, Refusal>, Error> {
    let name = desired.name_any();
    let current = match owned {
        Some(c) => c.clone(),
        None => match api.create(&PostParams::default(), &desired).await {
            Ok(created) => {
                debug!(dsrservice = %name, "created");
                return Ok(Ok(created));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = api
                    .get(&name)
                    .await
                    .map_err(|source| Error::Kube { action: "get DsrService", source })?;
                if !owned_by(&existing, svc) {
                    return Ok(Err(refuse(
                        "NameTaken",
                        format!(
                            "a DsrService named {name} already exists and is not this Service's; rename one of them"
                        ),
                    )));
                }
                existing
            }
            Err(source) => return Err(Error::Kube { action: "create DsrService", source }),
        },
    };
    let ann_ok = [ALLOW_SHARED_IP_ANNOTATION, ADDRESS_POOL_ANNOTATION]
        .iter()
        .all(|k| current.annotations().get(*k) == desired.annotations().get(*k));
    if current.spec == desired.spec
        && current.labels() == desired.labels()
        && ann_ok
        && current.owner_references() == desired.owner_references()
    {
        return Ok(Ok(current));
    }
    let mut next = current.clone();
    next.spec = desired.spec.clone();
    next.metadata.labels = desired.metadata.labels.clone();
    next.metadata.owner_references = desired.metadata.owner_references.clone();
    let ann = next.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for k in [ALLOW_SHARED_IP_ANNOTATION, ADDRESS_POOL_ANNOTATION] {
        match desired.annotations().get(k) {
            Some(v) => {
                ann.insert(k.into(), v.clone());
            }
            None => {
                ann.remove(k);
            }
        }
    }
    next.metadata.managed_fields = None;
    let replaced = api
        .replace(
            &name,
            &PostParams { field_manager: Some(LB_MANAGER.into()), ..Default::default() },
            &next,
        )
        .await
        .map_err(|source| Error::Kube { action: "replace owned DsrService", source })?;
    info!(dsrservice = %name, "owned DsrService put back to what its Service says");
    Ok(Ok(replaced))
}

async fn write_status(ctx: &Ctx, svc: &Service, st: &LbStatus) -> Result<(), Error> {
    let ns = svc.namespace().unwrap_or_default();
    let ingress: Vec<serde_json::Value> =
        st.ingress.iter().map(|ip| serde_json::json!({"ip": ip, "ipMode": "VIP"})).collect();
    let mut lb = serde_json::json!({});
    if !ingress.is_empty() {
        lb["ingress"] = serde_json::json!(ingress);
    }
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "status": {"loadBalancer": lb, "conditions": st.conditions},
    });
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &svc.name_any(),
            &PatchParams::apply(LB_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Kube { action: "apply Service status", source })?;
    Ok(())
}

fn on_error(svc: Arc<Service>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(service = %svc.name_any(), error = %error, source = ?std::error::Error::source(error), "Service reconcile failed");
    Action::requeue(RETRY)
}

/// Runs the Service controller until `shutdown` resolves. Call it only
/// while leading.
pub async fn run(
    client: Client,
    default_class: bool,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let services = controller.store();
    let (owned, owned_writer) = reflector::store();
    let owned_stream = reflector::reflector(
        owned_writer,
        watcher(
            Api::<DsrService>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_LABEL),
        )
        .default_backoff()
        .modify(|d: &mut DsrService| d.managed_fields_mut().clear()),
    )
    .touched_objects();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        services,
        owned,
        recorder: Recorder::new(client.clone(), Reporter::from(LB_MANAGER)),
        default_class,
    });
    controller
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)),
        )
        .owns_stream(owned_stream)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, on_error, ctx)
        .for_each(|_| async {})
        .await;
    info!("Service controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Container;
    use k8s_openapi::api::core::v1::{ContainerPort, PodSpec, ServicePort as SvcPort, ServiceSpec};

    fn lb(class: Option<&str>, ports: Vec<SvcPort>) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("web".into());
        s.metadata.namespace = Some("shop".into());
        s.metadata.uid = Some("uid-web".into());
        s.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: class.map(str::to_string),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: Some(ports),
            ..Default::default()
        });
        s
    }

    fn port(p: i32, proto: &str, target: Option<IntOrString>) -> SvcPort {
        SvcPort { port: p, protocol: Some(proto.into()), target_port: target, ..Default::default() }
    }

    #[test]
    fn only_our_class_or_the_configured_default_is_served() {
        let ours = lb(Some(LOAD_BALANCER_CLASS), vec![port(80, "TCP", None)]);
        assert!(served(&ours, false));
        assert!(!served(&lb(Some("example.com/other"), vec![]), true));
        assert!(!served(&lb(None, vec![]), false));
        assert!(served(&lb(None, vec![]), true));
        let mut cluster_ip = ours.clone();
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(!served(&cluster_ip, true));
    }

    #[test]
    fn ports_translate_and_port_translation_is_refused() {
        let s = lb(
            Some(LOAD_BALANCER_CLASS),
            vec![port(80, "TCP", Some(IntOrString::Int(80))), port(53, "UDP", None)],
        );
        let d = translate(&s, &[]).unwrap();
        assert_eq!(d.spec.ports.len(), 2);
        assert_eq!(d.spec.ports[1].protocol, Protocol::Udp);
        assert!(d.spec.vips.is_empty());
        assert_eq!(d.owner_references()[0].uid, "uid-web");
        assert_eq!(d.labels().get(SERVICE_LABEL).map(String::as_str), Some("web"));

        let bad =
            lb(Some(LOAD_BALANCER_CLASS), vec![port(80, "TCP", Some(IntOrString::Int(8080)))]);
        let r = translate(&bad, &[]).unwrap_err();
        assert_eq!(r.reason, "TargetPortMismatch");
        assert!(r.message.contains("targetPort 8080"), "{}", r.message);

        let sctp = lb(Some(LOAD_BALANCER_CLASS), vec![port(80, "SCTP", None)]);
        assert_eq!(translate(&sctp, &[]).unwrap_err().reason, "UnsupportedProtocol");
    }

    #[test]
    fn a_named_target_port_must_name_the_same_number_in_every_pod() {
        let s = lb(
            Some(LOAD_BALANCER_CLASS),
            vec![port(80, "TCP", Some(IntOrString::String("http".into())))],
        );
        let pod = |n: i32| Pod {
            metadata: kube::api::ObjectMeta { name: Some(format!("p{n}")), ..Default::default() },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: n,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(translate(&s, &[pod(80)]).is_ok());
        let r = translate(&s, &[pod(80), pod(8080)]).unwrap_err();
        assert!(r.message.contains("pod p8080"), "{}", r.message);
    }

    #[test]
    fn requested_ips_and_families() {
        let mut s = lb(Some(LOAD_BALANCER_CLASS), vec![port(80, "TCP", None)]);
        s.spec.as_mut().unwrap().load_balancer_ip = Some("192.0.2.9".into());
        assert_eq!(translate(&s, &[]).unwrap().spec.vips, vec!["192.0.2.9"]);
        s.metadata.annotations = Some(
            [(LOAD_BALANCER_IPS_ANNOTATION.to_string(), "192.0.2.7, 2001:db8::7".to_string())]
                .into(),
        );
        assert_eq!(
            translate(&s, &[]).unwrap().spec.vips,
            vec!["192.0.2.7", "2001:db8::7"],
            "the annotation wins"
        );
        s.metadata.annotations = Some(
            [(LOAD_BALANCER_IPS_ANNOTATION.to_string(), "192.0.2.7,192.0.2.8".to_string())].into(),
        );
        assert_eq!(translate(&s, &[]).unwrap_err().reason, "InvalidLoadBalancerIP");
        s.metadata.annotations =
            Some([(LOAD_BALANCER_IPS_ANNOTATION.to_string(), "127.0.0.1".to_string())].into());
        assert_eq!(translate(&s, &[]).unwrap_err().reason, "InvalidLoadBalancerIP");

        let mut dual = lb(Some(LOAD_BALANCER_CLASS), vec![port(80, "TCP", None)]);
        let spec = dual.spec.as_mut().unwrap();
        spec.ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        spec.ip_family_policy = Some("SingleStack".into());
        assert_eq!(translate(&dual, &[]).unwrap().spec.ip_families, vec![IpFamily::IPv6]);
        dual.spec.as_mut().unwrap().ip_family_policy = Some("RequireDualStack".into());
        assert_eq!(
            translate(&dual, &[]).unwrap().spec.ip_families,
            vec![IpFamily::IPv6, IpFamily::IPv4]
        );
    }

    #[test]
    fn the_address_is_published_only_while_programmed() {
        let s = lb(Some(LOAD_BALANCER_CLASS), vec![port(80, "TCP", None)]);
        let mut d = translate(&s, &[]).unwrap();
        d.status = Some(kube_dsr_crds::DsrServiceStatus {
            allocated_vips: vec![kube_dsr_crds::AllocatedVip {
                address: "192.0.2.50".into(),
                pool: "p".into(),
            }],
            conditions: vec![condition(
                svc_conditions::PROGRAMMED,
                false,
                "Pending",
                String::new(),
                None,
            )],
            ..Default::default()
        });
        assert!(lb_status(&s, Ok(&d)).ingress.is_empty());
        d.status.as_mut().unwrap().conditions[0].status = "True".into();
        let st = lb_status(&s, Ok(&d));
        assert_eq!(st.ingress, vec!["192.0.2.50"]);
        assert!(
            st.conditions.iter().any(|c| c.type_ == "kubedsr.io/Programmed" && c.status == "True")
        );
        d.status.as_mut().unwrap().conditions.push(condition(
            svc_conditions::CONFLICT,
            true,
            "InConflict",
            String::new(),
            None,
        ));
        assert!(lb_status(&s, Ok(&d)).ingress.is_empty(), "a VIP in conflict is not published");
        let r = refuse("TargetPortMismatch", "x");
        let st = lb_status(&s, Err(&r));
        assert!(st.ingress.is_empty());
        assert_eq!(st.conditions[0].reason, "TargetPortMismatch");
    }
}
