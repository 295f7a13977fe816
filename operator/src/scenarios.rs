//! Reconcile scenarios against a scripted fake API server.
//!
//! The fake speaks the REST calls reconcile makes (apply/delete
//! EndpointSlices, apply DsrService status, create events) over a
//! `tower-test` mock service, applies them to an in-memory world and
//! records them. Each step builds the caches from that world, as the
//! reflectors would after seeing the writes, and reconciles one service.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kube_dsr_crds::dsrservice::conditions::{self, reasons};
use kube_dsr_crds::{DsrNodeReport, DsrService, DsrServiceStatus, IngressReport};
use serde_json::Value;

use crate::backends::PodFacts;
use crate::controller::{Context, reconcile};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::testutil::*;

/// One call the fake API server received.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    body: Value,
}

/// The cluster as the fake API server holds it.
#[derive(Default)]
struct World {
    services: BTreeMap<String, DsrService>,
    pods: BTreeMap<String, Pod>,
    nodes: Vec<Node>,
    reports: Vec<DsrNodeReport>,
    slices: BTreeMap<String, EndpointSlice>,
    calls: Vec<Call>,
}

fn last_segment(path: &str) -> String {
    path.split('?').next().unwrap().rsplit('/').next().unwrap().to_string()
}

impl World {
    /// Applies one request the way the apiserver would and answers it.
    fn handle(&mut self, method: Method, path: String, body: Value) -> (u16, Value) {
        self.calls.push(Call { method: method.clone(), path: path.clone(), body: body.clone() });
        let p = path.split('?').next().unwrap();
        if method == Method::GET {
            let items: Vec<Value> = if p.ends_with("/dsrservices") {
                self.services.values().map(|o| serde_json::to_value(o).unwrap()).collect()
            } else if p.ends_with("/pods") {
                self.pods.values().map(|o| serde_json::to_value(o).unwrap()).collect()
            } else if p.ends_with("/nodes") {
                self.nodes.iter().map(|o| serde_json::to_value(o).unwrap()).collect()
            } else if p.ends_with("/dsrnodereports") {
                self.reports.iter().map(|o| serde_json::to_value(o).unwrap()).collect()
            } else if p.ends_with("/endpointslices") {
                self.slices.values().map(|o| serde_json::to_value(o).unwrap()).collect()
            } else {
                panic!("unexpected list {path}")
            };
            return (
                200,
                serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            );
        }
        match method {
            Method::PATCH if p.contains("/endpointslices/") => {
                let mut slice: EndpointSlice = serde_json::from_value(body).unwrap();
                slice.metadata.resource_version = Some(self.calls.len().to_string());
                self.slices.insert(last_segment(p), slice.clone());
                (200, serde_json::to_value(slice).unwrap())
            }
            Method::DELETE if p.contains("/endpointslices/") => {
                match self.slices.remove(&last_segment(p)) {
                    Some(s) => (200, serde_json::to_value(s).unwrap()),
                    None => (
                        404,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                }
            }
            Method::PATCH if p.ends_with("/status") => {
                let name = p.trim_end_matches("/status").rsplit('/').next().unwrap().to_string();
                let status: DsrServiceStatus =
                    serde_json::from_value(body["status"].clone()).unwrap();
                let svc = self.services.get_mut(&name).expect("status for a known service");
                svc.status = Some(status);
                (200, serde_json::to_value(&*svc).unwrap())
            }
            Method::POST if p.contains("/events") => (201, body),
            _ => panic!("unexpected call {method} {path}"),
        }
    }

    fn events(&self) -> Vec<(String, String)> {
        self.calls
            .iter()
            .filter(|c| c.method == Method::POST && c.path.contains("/events"))
            .map(|c| {
                (
                    c.body["type"].as_str().unwrap_or_default().to_string(),
                    c.body["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn writes(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| !c.path.contains("/events"))
            .map(|c| format!("{} {}", c.method, last_segment(&c.path)))
            .collect()
    }
}

fn ready_store<K>(objs: impl IntoIterator<Item = K>) -> (Store<K>, Writer<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

/// An index that has listed these objects, as the watches would build it.
fn listed(
    services: impl IntoIterator<Item = DsrService>,
    pods: impl IntoIterator<Item = PodFacts>,
    nodes: impl IntoIterator<Item = Node>,
    reports: impl IntoIterator<Item = DsrNodeReport>,
    slices: impl IntoIterator<Item = EndpointSlice>,
) -> Index {
    let mut ix = Index::default();
    ix.apply_service(watcher::Event::Init);
    services.into_iter().for_each(|o| drop(ix.apply_service(watcher::Event::InitApply(o))));
    ix.apply_service(watcher::Event::InitDone);
    ix.apply_pod(watcher::Event::Init);
    pods.into_iter().for_each(|o| drop(ix.apply_pod(watcher::Event::InitApply(o))));
    ix.apply_pod(watcher::Event::InitDone);
    ix.apply_node(watcher::Event::Init);
    nodes.into_iter().for_each(|o| drop(ix.apply_node(watcher::Event::InitApply(o))));
    ix.apply_node(watcher::Event::InitDone);
    ix.apply_report(watcher::Event::Init);
    reports.into_iter().for_each(|o| drop(ix.apply_report(watcher::Event::InitApply(o))));
    ix.apply_report(watcher::Event::InitDone);
    ix.apply_slice(watcher::Event::Init);
    slices.into_iter().for_each(|o| drop(ix.apply_slice(watcher::Event::InitApply(o))));
    ix.apply_slice(watcher::Event::InitDone);
    ix
}

struct Harness {
    world: Arc<Mutex<World>>,
}

impl Harness {
    fn new() -> Self {
        let world = World {
            nodes: vec![node("n1", true, &[]), node("n2", true, &[])],
            ..Default::default()
        };
        Harness { world: Arc::new(Mutex::new(world)) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut self.world.lock().unwrap())
    }

    fn add_service(&self, svc: DsrService) {
        self.with(|w| w.services.insert(svc.name_any(), svc));
    }

    fn add_pod(&self, p: Pod) {
        self.with(|w| w.pods.insert(p.name_any(), p));
    }

    /// Agents on both nodes: every pod configured with `vips`, every
    /// service programmed and (on n1 and n2) announced, as a healthy
    /// cluster would report after one round.
    fn agents_report_everything(&self) {
        self.with(|w| {
            let vips: Vec<String> = w.services.values().flat_map(|s| s.spec.vips.clone()).collect();
            let vip_refs: Vec<&str> = vips.iter().map(String::as_str).collect();
            w.reports = ["n1", "n2"]
                .iter()
                .map(|n| {
                    let pods: Vec<(String, Vec<&str>)> = w
                        .pods
                        .values()
                        .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(*n))
                        .map(|p| (p.uid().unwrap(), vip_refs.clone()))
                        .collect();
                    let pods: Vec<(&str, &[&str])> =
                        pods.iter().map(|(u, v)| (u.as_str(), v.as_slice())).collect();
                    let mut spec = report(n, &pods);
                    spec.ingress = w
                        .services
                        .values()
                        .map(|s| IngressReport {
                            namespace: "default".into(),
                            name: s.name_any(),
                            observed_generation: s.metadata.generation.unwrap(),
                            programmed_vips: s.spec.vips.clone(),
                            announced_vips: s.spec.vips.clone(),
                            backends: 0,
                            error: None,
                            error_reason: None,
                            reach: Default::default(),
                            unreached: vec![],
                        })
                        .collect();
                    DsrNodeReport::new(n, spec)
                })
                .collect();
        });
    }

    /// Runs one reconcile of `name` against the fake API server.
    async fn reconcile(&self, name: &str) {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let world = Arc::clone(&self.world);
        let server = tokio::spawn(async move {
            while let Some((req, respond)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let json: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let path = parts.uri.path_and_query().unwrap().to_string();
                let (code, answer) = world.lock().unwrap().handle(parts.method, path, json);
                let resp = Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                respond.send_response(resp);
            }
        });
        let client = Client::new(mock, "default");
        let (svc, writers) = {
            let w = self.world.lock().unwrap();
            let (services, ws) = ready_store(w.services.values().cloned());
            let index = listed(
                w.services.values().cloned(),
                w.pods.values().map(PodFacts::from),
                w.nodes.clone(),
                w.reports.clone(),
                w.slices.values().cloned(),
            );
            let ctx = Context {
                client: client.clone(),
                services,
                index: Arc::new(RwLock::new(index)),
                recorder: Recorder::new(client, Reporter::from("dsr-operator")),
                metrics: Arc::new(Metrics::default()),
            };
            (w.services.get(name).cloned().map(|s| (Arc::new(s), Arc::new(ctx))), ws)
        };
        let (svc, ctx) = svc.expect("service exists");
        reconcile(svc, ctx).await.expect("reconcile succeeds");
        drop(writers);
        server.abort();
    }

    fn status(&self, name: &str) -> DsrServiceStatus {
        self.with(|w| w.services[name].status.clone().expect("status written"))
    }

    fn condition(&self, name: &str, t: &str) -> (String, String) {
        let st = self.status(name);
        let c = st.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    /// Endpoint addresses with their ready flag, per slice name.
    fn slices(&self) -> BTreeMap<String, Vec<(String, bool)>> {
        self.with(|w| {
            w.slices
                .iter()
                .map(|(n, s)| {
                    let eps = s
                        .endpoints
                        .iter()
                        .map(|e| {
                            (e.addresses[0].clone(), e.conditions.as_ref().unwrap().ready.unwrap())
                        })
                        .collect();
                    (n.clone(), eps)
                })
                .collect()
        })
    }

    fn clear_calls(&self) {
        self.with(|w| w.calls.clear());
    }
}

fn s(v: &str) -> String {
    v.to_string()
}

/// The whole controller: it lists every kind, reconciles the service once
/// its caches are synced, and stops when told to.
#[tokio::test]
async fn controller_lists_reconciles_and_shuts_down() {
    let h = Harness::new();
    h.add_service(service("web", &["192.0.2.10"], 100));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.agents_report_everything();

    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let world = Arc::clone(&h.world);
    let server = tokio::spawn(async move {
        // Watches get no answer: they stay open and quiet, like a real
        // watch on an idle cluster.
        let mut open_watches = Vec::new();
        while let Some((req, respond)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let path = parts.uri.path_and_query().unwrap().to_string();
            if path.contains("watch=true") {
                open_watches.push(respond);
                continue;
            }
            let bytes = body.collect_bytes().await.unwrap();
            let json: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (code, answer) = world.lock().unwrap().handle(parts.method, path, json);
            respond.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = Client::new(mock, "default");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let run =
        tokio::spawn(crate::controller::run(client, Arc::new(Metrics::default()), async move {
            let _ = stop_rx.wait_for(|v| *v).await;
        }));

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.with(|w| w.services["web"].status.is_none()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status written; calls: {:?}",
            h.with(|w| w.writes())
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(h.slices()["web-v4-0"], [(s("10.0.0.1"), true)]);
    assert_eq!(h.condition("web", conditions::PROGRAMMED), (s("True"), s(reasons::PROGRAMMED)));
    let lists: Vec<String> = h.with(|w| {
        w.calls
            .iter()
            .filter(|c| c.method == Method::GET)
            .map(|c| c.path.split('?').next().unwrap().to_string())
            .collect()
    });
    for kind in ["/pods", "/nodes", "/dsrnodereports", "/endpointslices", "/dsrservices"] {
        assert!(lists.iter().any(|p| p.ends_with(kind)), "{kind} not listed: {lists:?}");
    }
    let slice_list = h.with(|w| {
        w.calls.iter().find(|c| c.path.contains("/endpointslices?")).unwrap().path.clone()
    });
    assert!(
        slice_list.contains("labelSelector=endpointslice.kubernetes.io%2Fmanaged-by%3Dkubedsr.io"),
        "{slice_list}"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), run)
        .await
        .expect("controller stops")
        .unwrap();
    server.abort();
}

#[tokio::test]
async fn create_gives_slices_status_and_an_event_then_stays_quiet() {
    let h = Harness::new();
    h.add_service(service("web", &["192.0.2.10"], 100));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.add_pod(pod("b", "n2", &["10.0.0.2"], true));
    h.agents_report_everything();

    h.reconcile("web").await;
    assert_eq!(
        h.slices(),
        BTreeMap::from([(s("web-v4-0"), vec![(s("10.0.0.1"), true), (s("10.0.0.2"), true)])])
    );
    let slice = h.with(|w| w.slices["web-v4-0"].clone());
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("DsrService", "svc-uid-web"));
    let st = h.status("web");
    assert_eq!((st.ready_backends, st.total_backends), (2, 2));
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.ingress_nodes, ["n1", "n2"]);
    assert!(st.vips[0].announcing_node.is_some() && st.vips[0].announced);
    assert_eq!(h.condition("web", conditions::PROGRAMMED), (s("True"), s(reasons::PROGRAMMED)));
    assert_eq!(h.condition("web", conditions::BACKENDS_READY), (s("True"), s(reasons::ALL_READY)));
    assert_eq!(h.with(|w| w.events()), [(s("Normal"), s("Programmed"))]);
    // The status apply goes to the status subresource, as our field manager.
    let status_call =
        h.with(|w| w.calls.iter().find(|c| c.path.contains("/status")).cloned().unwrap());
    assert!(status_call.path.contains("fieldManager=dsr-operator"), "{}", status_call.path);
    assert!(status_call.path.contains("force=true"));

    // Nothing changed: no writes, no events.
    h.clear_calls();
    h.reconcile("web").await;
    assert!(h.with(|w| w.calls.is_empty()), "{:?}", h.with(|w| w.writes()));
}

#[tokio::test]
async fn scale_up_and_down_rechunks_and_deletes_stale_slices() {
    let h = Harness::new();
    h.add_service(service("web", &["192.0.2.10"], 100));
    for i in 1..=150 {
        h.add_pod(pod(
            &format!("p{i}"),
            if i % 2 == 0 { "n1" } else { "n2" },
            &[&format!("10.0.{}.{}", i / 100, i % 100 + 1)],
            true,
        ));
    }
    h.agents_report_everything();
    h.reconcile("web").await;
    let sizes: Vec<(String, usize)> = h.slices().into_iter().map(|(n, e)| (n, e.len())).collect();
    assert_eq!(sizes, [(s("web-v4-0"), 100), (s("web-v4-1"), 50)]);
    assert_eq!(h.status("web").total_backends, 150);

    // Scale down to 3 pods.
    h.with(|w| w.pods.retain(|n, _| ["p1", "p2", "p3"].contains(&n.as_str())));
    h.agents_report_everything();
    h.clear_calls();
    h.reconcile("web").await;
    assert_eq!(h.slices().keys().collect::<Vec<_>>(), ["web-v4-0"]);
    assert_eq!(h.slices()["web-v4-0"].len(), 3);
    assert!(h.with(|w| w.writes()).contains(&s("DELETE web-v4-1")));
    assert_eq!(h.status("web").summary.unwrap().backends, "3/3");
}

#[tokio::test]
async fn pod_not_ready_or_vip_not_configured_is_not_ready() {
    let h = Harness::new();
    h.add_service(service("web", &["192.0.2.10"], 100));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.add_pod(pod("b", "n2", &["10.0.0.2"], false));
    h.agents_report_everything();
    // A third pod the agent has not configured yet.
    h.add_pod(pod("c", "n2", &["10.0.0.3"], true));
    h.reconcile("web").await;
    assert_eq!(
        h.slices()["web-v4-0"],
        [(s("10.0.0.1"), true), (s("10.0.0.2"), false), (s("10.0.0.3"), false)]
    );
    assert_eq!(h.condition("web", conditions::BACKENDS_READY), (s("True"), s(reasons::SOME_READY)));
    assert_eq!(h.status("web").summary.unwrap().backends, "1/3");

    // The only ready pod goes unready: a warning event.
    h.with(|w| {
        let p = w.pods.get_mut("a").unwrap();
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
    });
    h.clear_calls();
    h.reconcile("web").await;
    assert_eq!(
        h.condition("web", conditions::BACKENDS_READY),
        (s("False"), s(reasons::NONE_READY))
    );
    assert_eq!(h.with(|w| w.events()), [(s("Warning"), s("NoReadyBackends"))]);
}

#[tokio::test]
async fn terminating_pod_drains() {
    let h = Harness::new();
    h.add_service(service("web", &["192.0.2.10"], 100));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.add_pod(pod("b", "n2", &["10.0.0.2"], true));
    h.agents_report_everything();
    h.reconcile("web").await;
    h.with(|w| w.pods.get_mut("b").unwrap().metadata.deletion_timestamp = Some(time(500)));
    h.reconcile("web").await;
    let slice = h.with(|w| w.slices["web-v4-0"].clone());
    let b = slice.endpoints.iter().find(|e| e.addresses[0] == "10.0.0.2").unwrap();
    let c = b.conditions.as_ref().unwrap();
    assert_eq!((c.ready, c.serving, c.terminating), (Some(false), Some(true), Some(true)));
    assert_eq!(h.status("web").summary.unwrap().backends, "1/2");
}

#[tokio::test]
async fn conflict_blocks_the_later_service_until_the_earlier_is_deleted() {
    let h = Harness::new();
    h.add_service(service("first", &["192.0.2.10"], 100));
    h.add_service(service("second", &["192.0.2.10"], 200));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.agents_report_everything();

    h.reconcile("first").await;
    h.reconcile("second").await;
    assert_eq!(h.condition("second", conditions::CONFLICT), (s("True"), s(reasons::PORT_CONFLICT)));
    assert_eq!(h.condition("first", conditions::CONFLICT), (s("False"), s(reasons::NO_CONFLICT)));
    assert_eq!(
        h.slices().keys().collect::<Vec<_>>(),
        ["first-v4-0"],
        "no backend set for the later one"
    );
    assert!(h.with(|w| w.events()).contains(&(s("Warning"), s("PortConflict"))));
    let msg = h
        .status("second")
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::CONFLICT)
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("192.0.2.10:80/TCP is held by default/first"), "{msg}");

    // The earlier one is untouched by the later one's reconcile.
    h.clear_calls();
    h.reconcile("first").await;
    assert!(h.with(|w| w.calls.is_empty()));

    // Delete the earlier one (its slices go with it by owner reference).
    h.with(|w| {
        w.services.remove("first");
        w.slices.retain(|n, _| !n.starts_with("first-"));
    });
    h.clear_calls();
    h.reconcile("second").await;
    assert_eq!(h.condition("second", conditions::CONFLICT), (s("False"), s(reasons::NO_CONFLICT)));
    assert_eq!(h.slices().keys().collect::<Vec<_>>(), ["second-v4-0"]);
    let events = h.with(|w| w.events());
    assert!(events.contains(&(s("Normal"), s("ConflictResolved"))), "{events:?}");
}

#[tokio::test]
async fn a_service_that_becomes_conflicting_loses_its_slices() {
    // A spec change can move a service onto a taken VIP: its existing
    // backend set must go, so the agents stop programming it.
    let h = Harness::new();
    h.add_service(service("first", &["192.0.2.10"], 100));
    h.add_service(service("second", &["192.0.2.11"], 200));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.agents_report_everything();
    h.reconcile("second").await;
    assert!(h.slices().contains_key("second-v4-0"));
    h.with(|w| {
        let svc = w.services.get_mut("second").unwrap();
        svc.spec.vips = vec!["192.0.2.10".into()];
        svc.metadata.generation = Some(2);
    });
    h.reconcile("second").await;
    assert!(!h.slices().contains_key("second-v4-0"));
    assert_eq!(
        h.condition("second", conditions::PROGRAMMED),
        (s("False"), s(reasons::IN_CONFLICT))
    );
}

#[tokio::test]
async fn invalid_spec_is_refused_with_status_and_event() {
    let h = Harness::new();
    let mut svc = service("web", &["127.0.0.1"], 100);
    svc.spec.hashing.table_size = 1000;
    h.add_service(svc);
    h.reconcile("web").await;
    assert_eq!(h.condition("web", conditions::ACCEPTED), (s("False"), s(reasons::INVALID)));
    let msg = h.status("web").conditions[0].message.clone();
    assert!(msg.contains("loopback") && msg.contains("tableSize"), "{msg}");
    assert!(h.slices().is_empty());
    assert_eq!(h.with(|w| w.events()), [(s("Warning"), s("InvalidSpec"))]);
}

#[tokio::test]
async fn static_backends_need_no_agent() {
    let h = Harness::new();
    let mut svc = service("ext", &["192.0.2.10"], 100);
    svc.spec.selector = None;
    svc.spec.backends = Some(vec![kube_dsr_crds::StaticBackend { address: "192.0.2.21".into() }]);
    h.add_service(svc);
    h.reconcile("ext").await;
    assert_eq!(h.slices()["ext-v4-0"], [(s("192.0.2.21"), true)]);
    // No agent reports: no ingress node yet.
    assert_eq!(
        h.condition("ext", conditions::PROGRAMMED),
        (s("False"), s(reasons::NO_INGRESS_NODES))
    );
}

#[tokio::test]
async fn announcer_fails_over_when_its_node_goes_not_ready() {
    let h = Harness::new();
    h.add_service(service("web", &["192.0.2.10"], 100));
    h.add_pod(pod("a", "n1", &["10.0.0.1"], true));
    h.add_pod(pod("b", "n2", &["10.0.0.2"], true));
    h.agents_report_everything();
    h.reconcile("web").await;
    let first = h.status("web").vips[0].announcing_node.clone().unwrap();
    let other = if first == "n1" { "n2" } else { "n1" };

    // The announcing node fails; its agent's report still claims the VIP.
    h.with(|w| {
        for n in &mut w.nodes {
            if n.name_any() == first {
                n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
            }
        }
        // Only the announcer answers ARP: the survivor has not announced yet.
        for r in &mut w.reports {
            if r.name_any() == other {
                r.spec.ingress[0].announced_vips.clear();
            }
        }
    });
    h.reconcile("web").await;
    let st = h.status("web");
    assert_eq!(st.ingress_nodes, [other]);
    assert_eq!(st.vips[0].announcing_node.as_deref(), Some(other));
    assert!(!st.vips[0].announced);
    assert_eq!(h.condition("web", conditions::PROGRAMMED), (s("False"), s(reasons::PENDING)));

    // The survivor's agent announces: programmed again.
    h.agents_report_everything();
    h.reconcile("web").await;
    assert!(h.status("web").vips[0].announced);
    assert_eq!(h.condition("web", conditions::PROGRAMMED), (s("True"), s(reasons::PROGRAMMED)));
}
