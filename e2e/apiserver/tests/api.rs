//! The stand-in against a real kube client: CRUD, selectors, watches,
//! patches, subresources, deletion and validation.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, ValidationDirective, WatchEvent,
    WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use kube_dsr_apiserver::Config;
use serde_json::json;

fn pod(name: &str, labels: &[(&str, &str)], node: &str) -> Pod {
    let labels: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap()
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_discovery() {
    let (_server, client) = start().await;
    let v = client.apiserver_version().await.unwrap();
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "33"));
    let discovery = kube::discovery::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("kubedsr.io", "v1alpha1", "DsrService"))
        .expect("DsrService discovered");
    assert_eq!(ar.plural, "dsrservices");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(caps.subresources.iter().any(|(s, _)| s.plural == "status"));
    let (_, caps) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("kubedsr.io", "v1alpha1", "DsrNodeReport"))
        .expect("DsrNodeReport discovered");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    for (g, k) in [
        ("coordination.k8s.io", "Lease"),
        ("discovery.k8s.io", "EndpointSlice"),
        ("events.k8s.io", "Event"),
    ] {
        assert!(
            discovery.resolve_gvk(&kube::api::GroupVersionKind::gvk(g, "v1", k)).is_some(),
            "{k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_replace_delete() {
    let (_server, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created =
        pods.create(&PostParams::default(), &pod("a", &[("app", "web")], "n1")).await.unwrap();
    assert!(created.uid().is_some_and(|u| u.len() == 36));
    assert!(created.creation_timestamp().is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.namespace().as_deref(), Some("default"));
    let again = pods.create(&PostParams::default(), &pod("a", &[], "n1")).await.unwrap_err();
    let again = api_err(again);
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    // A uid the client chose is kept (harness convenience).
    let mut chosen = pod("chosen", &[], "n1");
    chosen.metadata.uid = Some("11111111-2222-4333-8444-555555555555".into());
    let chosen = pods.create(&PostParams::default(), &chosen).await.unwrap();
    assert_eq!(chosen.uid().as_deref(), Some("11111111-2222-4333-8444-555555555555"));

    let mut gen_pod = pod("", &[], "n1");
    gen_pod.metadata.name = None;
    gen_pod.metadata.generate_name = Some("web-".into());
    let generated = pods.create(&PostParams::default(), &gen_pod).await.unwrap();
    assert!(generated.name_any().starts_with("web-") && generated.name_any().len() == 9);

    let got = pods.get("a").await.unwrap();
    assert_eq!(got.labels().get("app").map(String::as_str), Some("web"));
    let mut newer = got.clone();
    newer.labels_mut().insert("tier".into(), "fe".into());
    let replaced = pods.replace("a", &PostParams::default(), &newer).await.unwrap();
    assert!(
        replaced.resource_version().unwrap().parse::<u64>().unwrap()
            > got.resource_version().unwrap().parse::<u64>().unwrap()
    );
    // Replacing with the stale version is refused (optimistic concurrency).
    let mut stale = got.clone();
    stale.labels_mut().insert("tier".into(), "be".into());
    let conflict = api_err(pods.replace("a", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(pods.get("a").await.unwrap().labels()["tier"], "fe");

    // A pod bound to a node waits for its kubelet; grace period 0 removes it.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    cms.delete("c", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_err(cms.get("c").await.unwrap_err()).code, 404);
    pods.delete("a", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("a").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    pods.delete("a", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(api_err(pods.get("a").await.unwrap_err()).code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_with_label_and_field_selectors() {
    let (_server, client) = start().await;
    for (ns, name, labels, node) in [
        ("default", "a", vec![("app", "web"), ("tier", "fe")], "n1"),
        ("default", "b", vec![("app", "web"), ("tier", "be")], "n2"),
        ("default", "c", vec![("app", "db")], "n1"),
        ("other", "d", vec![("app", "web")], "n2"),
    ] {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        api.create(&PostParams::default(), &pod(name, &labels, node)).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
        let mut v: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
        v.sort();
        v
    };
    let all: Api<Pod> = Api::all(client.clone());
    let default: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = all.list(&ListParams::default()).await.unwrap();
    assert!(
        list.metadata.resource_version.as_deref().is_some_and(|rv| rv.parse::<u64>().unwrap() > 1)
    );
    assert_eq!(names(list), ["a", "b", "c", "d"]);
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(default.list(&q("app=web")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(default.list(&q("app==web,tier!=fe")).await.unwrap()), ["b"]);
    assert_eq!(names(default.list(&q("tier in (fe,be)")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(default.list(&q("app notin (web)")).await.unwrap()), ["c"]);
    assert_eq!(names(default.list(&q("tier")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(default.list(&q("!tier")).await.unwrap()), ["c"]);
    let f = |s: &str| ListParams::default().fields(s);
    assert_eq!(names(all.list(&f("spec.nodeName=n2")).await.unwrap()), ["b", "d"]);
    assert_eq!(names(all.list(&f("metadata.namespace=other")).await.unwrap()), ["d"]);
    assert_eq!(names(all.list(&f("metadata.name=a,spec.nodeName=n1")).await.unwrap()), ["a"]);
    assert_eq!(api_err(all.list(&q("app in web")).await.unwrap_err()).code, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_resource_version_is_ordered_and_filtered() {
    let (_server, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("before", &[("app", "web")], "n1")).await.unwrap();
    let rv = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    pods.create(&PostParams::default(), &pod("a", &[("app", "web")], "n1")).await.unwrap();
    pods.create(&PostParams::default(), &pod("other", &[("app", "db")], "n1")).await.unwrap();
    let label = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"app": v}}}));
    pods.patch("a", &PatchParams::default(), &label("web2")).await.unwrap();
    pods.patch("a", &PatchParams::default(), &label("web")).await.unwrap();
    pods.delete("a", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .unwrap();

    let wp = WatchParams::default().labels("app=web").timeout(5);
    let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(match ev {
            WatchEvent::Added(p) => format!("ADDED {}", p.name_any()),
            WatchEvent::Modified(p) => format!("MODIFIED {}", p.name_any()),
            WatchEvent::Deleted(p) => format!("DELETED {}", p.name_any()),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("{e:?}"),
        });
    }
    // Leaving the selector is a DELETED, coming back an ADDED; "before" is
    // older than the version and "other" never matches.
    assert_eq!(seen, ["ADDED a", "DELETED a", "ADDED a", "DELETED a"]);

    // A live event arrives on an open watch.
    let now = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut live = pods.watch(&WatchParams::default().timeout(5), &now).await.unwrap().boxed();
    pods.create(&PostParams::default(), &pod("late", &[], "n1")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), live.try_next()).await.unwrap().unwrap() {
        Some(WatchEvent::Added(p)) => assert_eq!(p.name_any(), "late"),
        other => panic!("expected ADDED late, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_carry_the_current_version() {
    let config = Config { bookmark_interval: Duration::from_millis(200), ..Config::default() };
    let (server, client) = start_with(config).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let rv = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    // A change this watch does not select still moves the bookmark.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
        )
        .await
        .unwrap();
    let mut stream = pods
        .watch(&WatchParams { bookmarks: true, ..WatchParams::default() }.timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    let bm =
        tokio::time::timeout(Duration::from_secs(3), stream.try_next()).await.unwrap().unwrap();
    match bm {
        Some(WatchEvent::Bookmark(b)) => {
            assert_eq!(b.metadata.resource_version, server.resource_version().to_string());
            assert_ne!(b.metadata.resource_version, rv);
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // Without allowWatchBookmarks there are none.
    let mut quiet = pods
        .watch(&WatchParams { bookmarks: false, ..WatchParams::default() }.timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), quiet.try_next())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_version_is_gone_and_the_watcher_relists() {
    let (server, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("a", &[], "n1")).await.unwrap();
    let old = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    pods.create(&PostParams::default(), &pod("b", &[], "n1")).await.unwrap();
    server.compact();
    let mut stream = pods.watch(&WatchParams::default().timeout(5), &old).await.unwrap().boxed();
    match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await.unwrap().unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    // kube-runtime's watcher: short watches, so it resumes from its last
    // version; after compaction the resume gets 410 and it relists.
    let mut events =
        watcher(pods.clone(), watcher::Config::default().timeout(1).disable_bookmarks()).boxed();
    let mut saw = Vec::new();
    let mut compacted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("watcher progress")
            .unwrap();
        match ev {
            Ok(watcher::Event::InitDone) if !compacted => {
                // Listed once; forget history and change something, so the
                // next resume is from an expired version.
                saw.push("init-done".to_string());
                server.compact();
                pods.create(&PostParams::default(), &pod("c", &[], "n1")).await.unwrap();
                server.compact();
                compacted = true;
            }
            Ok(watcher::Event::InitApply(p)) if compacted && p.name_any() == "c" => {
                saw.push("relisted c".into());
                break;
            }
            Ok(watcher::Event::Apply(p)) if p.name_any() == "c" => {
                panic!("c arrived without a relist")
            }
            Err(watcher::Error::WatchError(e)) => saw.push(format!("error {}", e.code)),
            _ => {}
        }
    }
    assert_eq!(saw, ["init-done", "error 410", "relisted c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_json_and_apply_patches() {
    let (_server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}}))
            .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let merged = cms
        .patch("c", &PatchParams::default(), &Patch::Merge(json!({"data": {"a": null, "c": "3"}})))
        .await
        .unwrap();
    assert_eq!(
        merged.data.unwrap(),
        BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
    );
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/b", "value": "2"},
        {"op": "replace", "path": "/data/b", "value": "20"},
        {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}},
    ]))
    .unwrap();
    let patched = cms.patch("c", &PatchParams::default(), &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(patched.data.as_ref().unwrap()["b"], "20");
    assert_eq!(patched.labels()["x"], "y");
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/b", "value": "2"}])).unwrap();
    assert_eq!(
        api_err(
            cms.patch("c", &PatchParams::default(), &Patch::<()>::Json(failing)).await.unwrap_err()
        )
        .code,
        422
    );
    // A merge patch carrying a stale resourceVersion is a conflict.
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"z": "1"}}));
    assert_eq!(
        api_err(cms.patch("c", &PatchParams::default(), &stale).await.unwrap_err()).code,
        409
    );

    // Server-side apply: create on apply, ownership, conflicts, force, and
    // fields a manager stops applying are removed.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let cfg = |holder: &str, extra: serde_json::Value| {
        let mut v = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}});
        kube_dsr_apiserver::patch::merge_patch(&mut v, &extra);
        v
    };
    let a = PatchParams::apply("a");
    let created = leases
        .patch("l", &a, &Patch::Apply(cfg("a", json!({"metadata": {"labels": {"k": "v"}}}))))
        .await
        .unwrap();
    assert_eq!(created.spec.as_ref().unwrap().holder_identity.as_deref(), Some("a"));
    assert_eq!(created.labels()["k"], "v");
    let conflict = api_err(
        leases
            .patch("l", &PatchParams::apply("b"), &Patch::Apply(cfg("b", json!({}))))
            .await
            .unwrap_err(),
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert!(conflict.message.contains("conflict with \"a\""), "{}", conflict.message);
    // Same value: shared ownership, no conflict.
    leases.patch("l", &PatchParams::apply("b"), &Patch::Apply(cfg("a", json!({})))).await.unwrap();
    let forced = leases
        .patch("l", &PatchParams::apply("b").force(), &Patch::Apply(cfg("b", json!({}))))
        .await
        .unwrap();
    assert_eq!(forced.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));
    // "a" stops applying the label: it goes; it keeps applying the duration.
    let dropped = leases
        .patch("l", &a, &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"leaseDurationSeconds": 15}})))
        .await
        .unwrap();
    assert!(!dropped.labels().contains_key("k"));
    assert_eq!(dropped.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));
    // Strategic merge on a built-in kind merges lists by key.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut p = pod("p", &[], "n1");
    p.status = Some(serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]})).unwrap());
    pods.create(&PostParams::default(), &p).await.unwrap();
    let ready =
        Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
    let p = pods.patch_status("p", &PatchParams::default(), &ready).await.unwrap();
    let conds = p.status.unwrap().conditions.unwrap();
    assert_eq!(conds.len(), 2);
    assert!(conds.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
}

fn valid_spec() -> serde_json::Value {
    json!({"vips": ["192.0.2.10"], "ports": [{"port": 80}], "selector": {"app": "web"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_subresource_and_generation() {
    let (_server, client) = start().await;
    let svcs = dsr_services(&client, "default");
    let created =
        svcs.create(&PostParams::default(), &dsr_service("web", valid_spec())).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    // Schema defaults are filled in, as by the apiserver.
    assert_eq!(created.data["spec"]["ports"][0]["protocol"], "TCP");
    let status = json!({"apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrService", "status": {"observedGeneration": 1, "readyBackends": 2}});
    let s = svcs
        .patch_status("web", &PatchParams::apply("op").force(), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(s.data["status"]["readyBackends"], 2);
    assert_eq!(s.metadata.generation, Some(1));
    // The status subresource ignores spec; the main resource ignores status.
    let sneaky =
        Patch::Merge(json!({"spec": {"vips": ["192.0.2.99"]}, "status": {"readyBackends": 7}}));
    let s = svcs.patch_status("web", &PatchParams::default(), &sneaky).await.unwrap();
    assert_eq!(s.data["spec"]["vips"][0], "192.0.2.10");
    assert_eq!(s.data["status"]["readyBackends"], 7);
    let s = svcs.patch("web", &PatchParams::default(), &sneaky).await.unwrap();
    assert_eq!(s.data["spec"]["vips"][0], "192.0.2.99");
    assert_eq!(s.data["status"]["readyBackends"], 7);
    assert_eq!(s.metadata.generation, Some(2));
    // Metadata changes do not move the generation.
    let s = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(s.metadata.generation, Some(2));
    // A no-op write does not move the resourceVersion.
    let again = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(again.resource_version(), s.resource_version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_hold_deletion_and_owners_take_dependents() {
    let (_server, client) = start().await;
    let svcs = dsr_services(&client, "default");
    let mut svc = dsr_service("web", valid_spec());
    svc.metadata.finalizers = Some(vec!["kubedsr.io/test".into()]);
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-v4-0", "ownerReferences": [svc.controller_owner_ref(&kube::api::ApiResource::erase::<EndpointSlice>(&())).map(|mut r| { r.api_version = "kubedsr.io/v1alpha1".into(); r.kind = "DsrService".into(); r }).unwrap()]},
        "addressType": "IPv4", "endpoints": [],
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();
    let unrelated: EndpointSlice = serde_json::from_value(
        json!({"metadata": {"name": "other"}, "addressType": "IPv4", "endpoints": []}),
    )
    .unwrap();
    slices.create(&PostParams::default(), &unrelated).await.unwrap();

    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    let held = svcs.get("web").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(slices.get("web-v4-0").await.is_ok(), "dependent kept while the owner is held");
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_err(svcs.get("web").await.unwrap_err()).code, 404);
    assert_eq!(api_err(slices.get("web-v4-0").await.unwrap_err()).code, 404);
    assert!(slices.get("other").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_refused_with_the_rule_message() {
    let (_server, client) = start().await;
    let svcs = dsr_services(&client, "default");
    let loopback = dsr_service(
        "web",
        json!({"vips": ["127.0.0.1"], "ports": [{"port": 80}], "selector": {"app": "web"}}),
    );
    let e = api_err(svcs.create(&PostParams::default(), &loopback).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    let want = crd_message("VIP_LOOPBACK");
    assert!(e.message.contains(&want), "{} lacks {want:?}", e.message);
    assert!(e.message.starts_with("DsrService.kubedsr.io \"web\" is invalid: "), "{}", e.message);
    assert_eq!(api_err(svcs.get("web").await.unwrap_err()).code, 404, "nothing stored");

    // targetPort: refused under Strict, pruned otherwise.
    let with_target = json!({"apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrService", "metadata": {"name": "web"},
        "spec": {"vips": ["192.0.2.10"], "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "web"}}});
    let strict = PatchParams::apply("kubectl").validation(ValidationDirective::Strict);
    let e = api_err(svcs.patch("web", &strict, &Patch::Apply(&with_target)).await.unwrap_err());
    assert_eq!(e.code, 400);
    assert!(e.message.contains("unknown field \"spec.ports[0].targetPort\""), "{}", e.message);
    let lax = PatchParams::apply("kubectl");
    let stored = svcs.patch("web", &lax, &Patch::Apply(&with_target)).await.unwrap();
    assert!(stored.data["spec"]["ports"][0].get("targetPort").is_none());

    // Updates are validated too, transition rules included.
    let bad_update = Patch::Merge(json!({"spec": {"hashing": {"tableSize": 65536}}}));
    let e = api_err(svcs.patch("web", &PatchParams::default(), &bad_update).await.unwrap_err());
    assert!(e.message.contains(&crd_message("TABLE_SIZE")), "{}", e.message);
    let reports = node_reports(&client);
    let report = |node: &str| -> kube::api::DynamicObject {
        serde_json::from_value(json!({"apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrNodeReport",
            "metadata": {"name": "n1"}, "spec": {"nodeName": node}}))
        .unwrap()
    };
    let e = api_err(reports.create(&PostParams::default(), &report("n2")).await.unwrap_err());
    assert!(e.message.contains("metadata.name must equal spec.nodeName"), "{}", e.message);
    reports.create(&PostParams::default(), &report("n1")).await.unwrap();
    let e = api_err(
        reports
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"name": "n1"}, "spec": {"nodeName": "n2"}})),
            )
            .await
            .unwrap_err(),
    );
    assert!(e.message.contains("nodeName is immutable"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_sends_initial_events_then_the_end_bookmark() {
    let (_server, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("a", &[], "n1")).await.unwrap();
    let mut events = watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(&"done".to_string()) {
        let ev = tokio::time::timeout_at(deadline, events.next()).await.expect("progress").unwrap();
        match ev.unwrap() {
            watcher::Event::Init => seen.push("init".into()),
            watcher::Event::InitApply(p) => seen.push(p.name_any()),
            watcher::Event::InitDone => seen.push("done".into()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["init", "a", "done"]);
    pods.create(&PostParams::default(), &pod("b", &[], "n1")).await.unwrap();
    let ev = tokio::time::timeout_at(deadline, events.next()).await.expect("progress").unwrap();
    assert!(matches!(ev, Ok(watcher::Event::Apply(p)) if p.name_any() == "b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_store_under_both_event_apis() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event;
    let (_server, client) = start().await;
    let new_api: Api<Event> = Api::namespaced(client.clone(), "default");
    let core_api: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"name": "web.1"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrService", "name": "web", "namespace": "default", "uid": "u1"},
        "reason": "Programmed", "note": "programmed on ingress-1", "type": "Normal",
        "action": "Programming", "reportingController": "kubedsr.io/operator", "reportingInstance": "op-1",
    }))
    .unwrap();
    new_api.create(&PostParams::default(), &ev).await.unwrap();
    // What kubectl describe asks for: core events about the object.
    let lp = ListParams::default()
        .fields("involvedObject.name=web,involvedObject.namespace=default,involvedObject.uid=u1");
    let core = core_api.list(&lp).await.unwrap();
    assert_eq!(core.items.len(), 1);
    let c = &core.items[0];
    assert_eq!(c.message.as_deref(), Some("programmed on ingress-1"));
    assert_eq!(c.involved_object.kind.as_deref(), Some("DsrService"));
    assert_eq!(c.reporting_component.as_deref(), Some("kubedsr.io/operator"));
    // A series update through events.k8s.io shows under core too.
    let series = json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}});
    new_api.patch("web.1", &PatchParams::default(), &Patch::Merge(&series)).await.unwrap();
    let c = core_api.get("web.1").await.unwrap();
    assert_eq!(c.series.as_ref().and_then(|s| s.count), Some(2));
    // And back: a core write is read through events.k8s.io.
    let mut c = c;
    c.message = Some("reprogrammed".into());
    core_api.replace("web.1", &PostParams::default(), &c).await.unwrap();
    assert_eq!(new_api.get("web.1").await.unwrap().note.as_deref(), Some("reprogrammed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_store_nothing() {
    let (_server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).unwrap();
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    let answered = cms.create(&dry, &cm).await.unwrap();
    assert_eq!(answered.data.unwrap()["k"], "v");
    assert!(answered.metadata.resource_version.is_none(), "a dry-run create has no version");
    assert_eq!(api_err(cms.get("c").await.unwrap_err()).code, 404);
    let stored = cms.create(&PostParams::default(), &cm).await.unwrap();
    let rv = stored.metadata.resource_version.clone();
    let patch = Patch::Merge(json!({"data": {"k": "w"}}));
    let answered = cms
        .patch("c", &PatchParams { dry_run: true, ..PatchParams::default() }, &patch)
        .await
        .unwrap();
    assert_eq!(answered.data.unwrap()["k"], "w");
    assert_eq!(answered.metadata.resource_version, rv, "the stored version");
    let dp = DeleteParams { dry_run: true, ..DeleteParams::default() };
    cms.delete("c", &dp).await.unwrap();
    let after = cms.get("c").await.unwrap();
    assert_eq!((after.data.unwrap()["k"].as_str(), after.metadata.resource_version), ("v", rv));
}
