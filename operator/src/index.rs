//! The operator's caches and the reverse indexes that map one change to the
//! services it can affect.
//!
//! Every watch event goes through [`Index`]: it stores the trimmed object,
//! compares it with the version it replaces, and answers which DsrServices
//! the difference can change. A reconcile then reads only its own part
//! (the pods its selector picks through the label index, its own report
//! entries, its own slices), so one change costs work in proportion to
//! what it touches, not to the size of the cluster.
//!
//! What a service's result depends on, and so what re-queues it:
//! - pods its selector matches, before or after the change (labels, node,
//!   addresses, readiness, phase, deletion);
//! - its own entry in a node's report (ingress), and the report entries of
//!   the pods it selects (backends); a node gaining or losing its report
//!   (it becomes or stops being an ingress candidate, and its pods stop or
//!   start being "on a node without dsr-agent");
//! - a reported node's readiness, deletion or labels when the service's
//!   ingress node selector matches it (before or after), and the zone label
//!   of nodes its pods run on;
//! - services sharing one of its VIPs (conflicts), when they are created,
//!   deleted or their spec changes;
//! - its own EndpointSlices.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use kube_dsr_crds::validation::parse_ip;
use kube_dsr_crds::{DsrNodeReport, DsrNodeReportSpec, DsrService};

use crate::backends::{PodFacts, PodLabels, ZONE_LABEL, selector_matches};
use crate::slices::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL, SliceSummary};

/// `(namespace, name)` of a namespaced object.
pub type Key = (String, String);
/// `(namespace, label key, label value)`: one equality term of a selector.
type Term = (String, String, String);
/// `(namespace, name)` of a cached pod, sharing the strings of its facts.
type PodKey = (Arc<str>, Arc<str>);

/// What the index keeps of a DsrService: what decides which pods, nodes
/// and sibling services concern it.
#[derive(Clone, Debug, PartialEq)]
struct ServiceFacts {
    /// Empty for a service without a selector (static backends only).
    selector: BTreeMap<String, String>,
    node_selector: BTreeMap<String, String>,
    vips: BTreeSet<IpAddr>,
    generation: Option<i64>,
}

impl From<&DsrService> for ServiceFacts {
    fn from(svc: &DsrService) -> Self {
        ServiceFacts {
            selector: svc.spec.selector.clone().unwrap_or_default(),
            node_selector: svc.spec.ingress.node_selector.clone(),
            // Pool-allocated VIPs (status) count like written ones.
            vips: svc.effective_vips().into_iter().filter_map(parse_ip).collect(),
            generation: svc.metadata.generation,
        }
    }
}

/// One node's report, its backend entries sorted by pod UID and its ingress
/// entries by service, so both are found by binary search without a map
/// beside them (a map keyed by UID held another copy of every UID).
struct ReportEntry {
    report: Arc<DsrNodeReport>,
}

impl ReportEntry {
    fn new(mut report: DsrNodeReport) -> Self {
        report.metadata.managed_fields = None;
        for b in &mut report.spec.backends {
            // For humans reading the report; the operator finds a pod by
            // UID. At 100,000 pods they were 8 MiB of the cache.
            b.namespace = String::new();
            b.name = String::new();
        }
        report.spec.backends.sort_by(|a, b| a.pod_uid.cmp(&b.pod_uid));
        report.spec.ingress.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        ReportEntry { report: Arc::new(report) }
    }

    fn backend(&self, uid: &str) -> Option<&kube_dsr_crds::BackendReport> {
        let backends = &self.report.spec.backends;
        backends.binary_search_by(|b| b.pod_uid.as_str().cmp(uid)).ok().map(|i| &backends[i])
    }

    fn ingress(&self, key: &Key) -> Option<&kube_dsr_crds::IngressReport> {
        let ingress = &self.report.spec.ingress;
        ingress
            .binary_search_by(|i| (i.namespace.as_str(), i.name.as_str()).cmp(&(&key.0, &key.1)))
            .ok()
            .map(|i| &ingress[i])
    }

    fn uids(&self) -> impl Iterator<Item = &str> {
        self.report.spec.backends.iter().map(|b| b.pod_uid.as_str())
    }

    fn services(&self) -> impl Iterator<Item = Key> {
        self.report.spec.ingress.iter().map(|i| (i.namespace.clone(), i.name.clone()))
    }
}

/// The node fields that matter to any service: eligibility and zone.
fn node_facts(node: &Node) -> (bool, bool, BTreeMap<String, String>) {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    (ready, node.metadata.deletion_timestamp.is_some(), node.labels().clone())
}

/// A Node with only what the operator reads (name, labels, deletion,
/// conditions): heartbeats aside, node objects are mostly images and
/// addresses nobody here needs.
pub fn trim_node(node: Node) -> Node {
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name,
            uid: node.metadata.uid,
            labels: node.metadata.labels,
            deletion_timestamp: node.metadata.deletion_timestamp,
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: node.status.and_then(|s| s.conditions),
            ..Default::default()
        }),
    }
}

/// Buffers a relist (`Init` .. `InitDone`) so the cache is replaced at once.
enum Step<K> {
    Nothing,
    Upsert(K),
    Delete(K),
    Relisted(Vec<K>),
}

fn step<K>(buffer: &mut Option<Vec<K>>, ev: Event<K>) -> Step<K> {
    match ev {
        Event::Apply(o) => Step::Upsert(o),
        Event::Delete(o) => Step::Delete(o),
        Event::Init => {
            *buffer = Some(Vec::new());
            Step::Nothing
        }
        Event::InitApply(o) => {
            buffer.get_or_insert_with(Vec::new).push(o);
            Step::Nothing
        }
        Event::InitDone => Step::Relisted(buffer.take().unwrap_or_default()),
    }
}

/// Which kinds have listed once. Before that an empty cache would look like
/// "no pods" and empty every backend set.
#[derive(Clone, Copy, Debug, Default)]
struct Synced {
    services: bool,
    pods: bool,
    nodes: bool,
    reports: bool,
    slices: bool,
}

impl Synced {
    fn all(&self) -> bool {
        self.services && self.pods && self.nodes && self.reports && self.slices
    }
}

/// Services (as keys) that a change re-queues.
pub type Triggers = BTreeSet<Key>;

/// The caches and reverse indexes; see the module documentation.
#[derive(Default)]
pub struct Index {
    pods: HashMap<PodKey, Arc<PodFacts>>,
    /// Pod names by term.
    pods_by_term: HashMap<Term, HashSet<Arc<str>>>,
    pods_by_uid: HashMap<Arc<str>, PodKey>,
    pods_by_node: HashMap<Arc<str>, HashSet<PodKey>>,
    /// One copy of each string many pods share (namespaces, nodes, label
    /// keys and values); see [`Index::share`].
    shared: HashSet<Arc<str>>,
    /// Size of `shared` after its last pruning.
    shared_pruned_at: usize,
    services: HashMap<Key, ServiceFacts>,
    services_by_term: HashMap<Term, HashSet<String>>,
    services_by_vip: HashMap<IpAddr, HashSet<Key>>,
    nodes: BTreeMap<String, Arc<Node>>,
    reports: BTreeMap<String, ReportEntry>,
    /// Our EndpointSlices by service, then by name, summarized.
    slices: HashMap<Key, BTreeMap<String, SliceSummary>>,
    synced: Synced,
    relist_services: Option<Vec<DsrService>>,
    relist_pods: Option<Vec<PodFacts>>,
    relist_nodes: Option<Vec<Node>>,
    relist_reports: Option<Vec<DsrNodeReport>>,
    relist_slices: Option<Vec<EndpointSlice>>,
}

fn terms<'a>(
    ns: &'a str,
    labels: impl IntoIterator<Item = (&'a str, &'a str)> + 'a,
) -> impl Iterator<Item = Term> + 'a {
    labels.into_iter().map(move |(k, v)| (ns.to_string(), k.to_string(), v.to_string()))
}

fn pairs(map: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
    map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

fn unlink<K: std::hash::Hash + Eq, V: std::hash::Hash + Eq>(
    map: &mut HashMap<K, HashSet<V>>,
    key: K,
    value: &V,
) {
    if let Some(set) = map.get_mut(&key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

impl Index {
    /// Every kind has listed once.
    pub fn synced(&self) -> bool {
        self.synced.all()
    }

    /// Marks `set` synced; the first time all kinds are, every known
    /// service is re-queued (reconciles that ran earlier only waited).
    fn mark_synced(&mut self, set: impl FnOnce(&mut Synced), out: &mut Triggers) {
        let before = self.synced.all();
        set(&mut self.synced);
        if !before && self.synced.all() {
            out.extend(self.services.keys().cloned());
        }
    }

    // ---- services -------------------------------------------------------

    /// Services whose selector matches a pod in `ns` with `labels`.
    fn services_selecting(&self, ns: &str, labels: &PodLabels, out: &mut Triggers) {
        for term in terms(ns, labels.iter()) {
            for name in self.services_by_term.get(&term).into_iter().flatten() {
                let key = (ns.to_string(), name.clone());
                if out.contains(&key) {
                    continue;
                }
                if self.services.get(&key).is_some_and(|s| selector_matches(&s.selector, labels)) {
                    out.insert(key);
                }
            }
        }
    }

    /// Services whose ingress node selector matches `labels`: those a
    /// reported node with these labels is (or was) a candidate for.
    fn services_with_ingress_on(&self, labels: &BTreeMap<String, String>, out: &mut Triggers) {
        for (key, s) in &self.services {
            if s.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                out.insert(key.clone());
            }
        }
    }

    fn services_sharing(&self, vips: &BTreeSet<IpAddr>, out: &mut Triggers) {
        for vip in vips {
            out.extend(self.services_by_vip.get(vip).into_iter().flatten().cloned());
        }
    }

    fn unindex_service(&mut self, key: &Key, facts: &ServiceFacts) {
        for term in terms(&key.0, pairs(&facts.selector)) {
            unlink(&mut self.services_by_term, term, &key.1);
        }
        for vip in &facts.vips {
            unlink(&mut self.services_by_vip, *vip, key);
        }
    }

    fn upsert_service(&mut self, svc: &DsrService, out: &mut Triggers) {
        let key = (svc.namespace().unwrap_or_default(), svc.name_any());
        let facts = ServiceFacts::from(svc);
        let old = self.services.remove(&key);
        if old.as_ref() == Some(&facts) {
            self.services.insert(key, facts);
            return;
        }
        if let Some(old) = &old {
            self.unindex_service(&key, old);
            self.services_sharing(&old.vips, out);
        }
        // A reconcile may have read the index before this version was in
        // it; it runs again.
        out.insert(key.clone());
        self.services_sharing(&facts.vips, out);
        for term in terms(&key.0, pairs(&facts.selector)) {
            self.services_by_term.entry(term).or_default().insert(key.1.clone());
        }
        for vip in &facts.vips {
            self.services_by_vip.entry(*vip).or_default().insert(key.clone());
        }
        self.services.insert(key, facts);
    }

    fn remove_service(&mut self, key: &Key, out: &mut Triggers) {
        if let Some(old) = self.services.remove(key) {
            self.unindex_service(key, &old);
            // Its VIP ports are free: the next claimant may get them.
            self.services_sharing(&old.vips, out);
        }
    }

    /// One DsrService watch event; returns the services to re-queue
    /// besides the one the controller already queues for itself.
    pub fn apply_service(&mut self, ev: Event<DsrService>) -> Triggers {
        let mut out = Triggers::new();
        match step(&mut self.relist_services, ev) {
            Step::Nothing => {}
            Step::Upsert(s) => self.upsert_service(&s, &mut out),
            Step::Delete(s) => {
                self.remove_service(&(s.namespace().unwrap_or_default(), s.name_any()), &mut out)
            }
            Step::Relisted(all) => {
                let seen: HashSet<Key> =
                    all.iter().map(|s| (s.namespace().unwrap_or_default(), s.name_any())).collect();
                let gone: Vec<Key> =
                    self.services.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                for k in gone {
                    self.remove_service(&k, &mut out);
                }
                for s in &all {
                    self.upsert_service(s, &mut out);
                }
                self.mark_synced(|s| s.services = true, &mut out);
            }
        }
        out
    }

    // ---- pods -----------------------------------------------------------

    /// The shared copy of `s`, made on first use. Strings no cached pod
    /// holds any more (a deleted namespace, a rollout's old
    /// `pod-template-hash`) are dropped whenever the set has doubled since
    /// it was last pruned, so it stays in proportion to what is cached.
    fn share(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.shared.get(s) {
            return Arc::clone(shared);
        }
        if self.shared.len() >= 2 * self.shared_pruned_at.max(1024) {
            self.shared.retain(|s| Arc::strong_count(s) > 1);
            self.shared_pruned_at = self.shared.len();
        }
        let shared: Arc<str> = Arc::from(s);
        self.shared.insert(Arc::clone(&shared));
        shared
    }

    fn unindex_pod(&mut self, key: &PodKey, pod: &PodFacts) {
        for term in terms(&key.0, pod.labels.iter()) {
            unlink(&mut self.pods_by_term, term, &key.1);
        }
        if self.pods_by_uid.get(&pod.uid) == Some(key) {
            self.pods_by_uid.remove(&pod.uid);
        }
        if let Some(node) = &pod.node {
            unlink(&mut self.pods_by_node, Arc::clone(node), key);
        }
    }

    fn upsert_pod(&mut self, pod: PodFacts, out: &mut Triggers) {
        let key = (Arc::clone(&pod.namespace), Arc::clone(&pod.name));
        if let Some(old) = self.pods.get(&key).cloned() {
            if *old == pod {
                // Nothing the operator reads changed (a status heartbeat).
                return;
            }
            self.services_selecting(&key.0, &old.labels, out);
            self.unindex_pod(&key, &old);
        }
        self.services_selecting(&key.0, &pod.labels, out);
        for term in terms(&key.0, pod.labels.iter()) {
            self.pods_by_term.entry(term).or_default().insert(Arc::clone(&key.1));
        }
        if !pod.uid.is_empty() {
            self.pods_by_uid.insert(Arc::clone(&pod.uid), key.clone());
        }
        if let Some(node) = &pod.node {
            self.pods_by_node.entry(Arc::clone(node)).or_default().insert(key.clone());
        }
        self.pods.insert(key, Arc::new(pod));
    }

    fn remove_pod(&mut self, key: &PodKey, out: &mut Triggers) {
        if let Some(old) = self.pods.remove(key) {
            self.services_selecting(&key.0, &old.labels, out);
            self.unindex_pod(key, &old);
        }
    }

    /// One Pod watch event (already reduced to [`PodFacts`]).
    pub fn apply_pod(&mut self, ev: Event<PodFacts>) -> Triggers {
        let mut out = Triggers::new();
        // Shared before a relist buffers them, so the buffer holds no
        // copies either.
        let ev = match ev {
            Event::Apply(p) => Event::Apply(p.share(|s| self.share(s))),
            Event::InitApply(p) => Event::InitApply(p.share(|s| self.share(s))),
            ev => ev,
        };
        match step(&mut self.relist_pods, ev) {
            Step::Nothing => {}
            Step::Upsert(p) => self.upsert_pod(p, &mut out),
            Step::Delete(p) => self.remove_pod(&(p.namespace, p.name), &mut out),
            Step::Relisted(all) => {
                let gone: Vec<PodKey> = {
                    let seen: HashSet<(&str, &str)> =
                        all.iter().map(|p| (&*p.namespace, &*p.name)).collect();
                    self.pods.keys().filter(|k| !seen.contains(&(&*k.0, &*k.1))).cloned().collect()
                };
                for k in gone {
                    self.remove_pod(&k, &mut out);
                }
                for p in all {
                    self.upsert_pod(p, &mut out);
                }
                self.mark_synced(|s| s.pods = true, &mut out);
            }
        }
        out
    }

    /// Services selecting any pod on `node`.
    fn services_of_pods_on(&self, node: &str, out: &mut Triggers) {
        for key in self.pods_by_node.get(node).into_iter().flatten() {
            if let Some(p) = self.pods.get(key) {
                self.services_selecting(&key.0, &p.labels, out);
            }
        }
    }

    // ---- nodes ----------------------------------------------------------

    fn node_changed(&self, name: &str, old: Option<&Node>, new: Option<&Node>, out: &mut Triggers) {
        let (o, n) = (old.map(node_facts), new.map(node_facts));
        if o == n {
            return;
        }
        // Only a node that runs an agent is an ingress candidate.
        if self.reports.contains_key(name) {
            for facts in [&o, &n].into_iter().flatten() {
                self.services_with_ingress_on(&facts.2, out);
            }
        }
        let zone = |f: &Option<(bool, bool, BTreeMap<String, String>)>| {
            f.as_ref().and_then(|f| f.2.get(ZONE_LABEL).cloned())
        };
        if zone(&o) != zone(&n) {
            self.services_of_pods_on(name, out);
        }
    }

    fn upsert_node(&mut self, node: Node, out: &mut Triggers) {
        let node = trim_node(node);
        let name = node.name_any();
        let old = self.nodes.get(&name).cloned();
        self.node_changed(&name, old.as_deref(), Some(&node), out);
        self.nodes.insert(name, Arc::new(node));
    }

    fn remove_node(&mut self, name: &str, out: &mut Triggers) {
        if let Some(old) = self.nodes.remove(name) {
            self.node_changed(name, Some(&old), None, out);
        }
    }

    /// One Node watch event.
    pub fn apply_node(&mut self, ev: Event<Node>) -> Triggers {
        let mut out = Triggers::new();
        match step(&mut self.relist_nodes, ev) {
            Step::Nothing => {}
            Step::Upsert(n) => self.upsert_node(n, &mut out),
            Step::Delete(n) => self.remove_node(&n.name_any(), &mut out),
            Step::Relisted(all) => {
                let seen: HashSet<String> = all.iter().map(|n| n.name_any()).collect();
                let gone: Vec<String> =
                    self.nodes.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                for k in gone {
                    self.remove_node(&k, &mut out);
                }
                for n in all {
                    self.upsert_node(n, &mut out);
                }
                self.mark_synced(|s| s.nodes = true, &mut out);
            }
        }
        out
    }

    // ---- reports --------------------------------------------------------

    /// The services whose view of `node`'s report differs between `old`
    /// and `new`: those whose ingress entry changed, those selecting a pod
    /// whose backend entry changed, and, when the report appears or goes,
    /// those the node is an ingress candidate for and those with pods on it.
    fn report_changed(
        &self,
        node: &str,
        old: Option<&ReportEntry>,
        new: Option<&ReportEntry>,
        out: &mut Triggers,
    ) {
        if old.is_none() != new.is_none() {
            if let Some(n) = self.nodes.get(node) {
                self.services_with_ingress_on(n.labels(), out);
            }
            self.services_of_pods_on(node, out);
        }
        let ingress_keys: HashSet<Key> =
            old.into_iter().chain(new).flat_map(ReportEntry::services).collect();
        for key in ingress_keys {
            if old.and_then(|e| e.ingress(&key)) != new.and_then(|e| e.ingress(&key))
                && self.services.contains_key(&key)
            {
                out.insert(key);
            }
        }
        let uids: HashSet<&str> = old.into_iter().chain(new).flat_map(ReportEntry::uids).collect();
        for uid in uids {
            if old.and_then(|e| e.backend(uid)) == new.and_then(|e| e.backend(uid)) {
                continue;
            }
            if let Some(p) = self.pods_by_uid.get(uid).and_then(|k| self.pods.get(k)) {
                self.services_selecting(&p.namespace, &p.labels, out);
            }
        }
    }

    fn upsert_report(&mut self, report: DsrNodeReport, out: &mut Triggers) {
        let node = report.name_any();
        let entry = ReportEntry::new(report);
        self.report_changed(&node, self.reports.get(&node), Some(&entry), out);
        self.reports.insert(node, entry);
    }

    fn remove_report(&mut self, node: &str, out: &mut Triggers) {
        if let Some(old) = self.reports.remove(node) {
            self.report_changed(node, Some(&old), None, out);
        }
    }

    /// One DsrNodeReport watch event.
    pub fn apply_report(&mut self, ev: Event<DsrNodeReport>) -> Triggers {
        let mut out = Triggers::new();
        match step(&mut self.relist_reports, ev) {
            Step::Nothing => {}
            Step::Upsert(r) => self.upsert_report(r, &mut out),
            Step::Delete(r) => self.remove_report(&r.name_any(), &mut out),
            Step::Relisted(all) => {
                let seen: HashSet<String> = all.iter().map(|r| r.name_any()).collect();
                let gone: Vec<String> =
                    self.reports.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                for k in gone {
                    self.remove_report(&k, &mut out);
                }
                for r in all {
                    self.upsert_report(r, &mut out);
                }
                self.mark_synced(|s| s.reports = true, &mut out);
            }
        }
        out
    }

    // ---- slices ---------------------------------------------------------

    /// `(namespace, service)` a slice of ours belongs to.
    fn slice_owner(slice: &EndpointSlice) -> Option<Key> {
        let labels = slice.labels();
        if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
            return None;
        }
        Some((slice.namespace()?, labels.get(SERVICE_NAME_LABEL)?.clone()))
    }

    fn upsert_slice(&mut self, slice: EndpointSlice, out: &mut Triggers) {
        let Some(owner) = Self::slice_owner(&slice) else { return };
        let summary = SliceSummary::from(&slice);
        self.slices.entry(owner.clone()).or_default().insert(summary.name.clone(), summary);
        out.insert(owner);
    }

    fn remove_slice(&mut self, owner: Option<Key>, name: &str, out: &mut Triggers) {
        let Some(owner) = owner else { return };
        if let Some(of) = self.slices.get_mut(&owner) {
            of.remove(name);
            if of.is_empty() {
                self.slices.remove(&owner);
            }
        }
        out.insert(owner);
    }

    /// One EndpointSlice watch event (our slices only).
    pub fn apply_slice(&mut self, ev: Event<EndpointSlice>) -> Triggers {
        let mut out = Triggers::new();
        match step(&mut self.relist_slices, ev) {
            Step::Nothing => {}
            Step::Upsert(s) => self.upsert_slice(s, &mut out),
            Step::Delete(s) => self.remove_slice(Self::slice_owner(&s), &s.name_any(), &mut out),
            Step::Relisted(all) => {
                let seen: HashSet<(Key, String)> = all
                    .iter()
                    .filter_map(|s| Some((Self::slice_owner(s)?, s.name_any())))
                    .collect();
                let gone: Vec<(Key, String)> = self
                    .slices
                    .iter()
                    .flat_map(|(owner, of)| of.keys().map(move |n| (owner.clone(), n.clone())))
                    .filter(|gone| !seen.contains(gone))
                    .collect();
                for (owner, name) in gone {
                    self.remove_slice(Some(owner), &name, &mut out);
                }
                for s in all {
                    self.upsert_slice(s, &mut out);
                }
                self.mark_synced(|s| s.slices = true, &mut out);
            }
        }
        out
    }

    // ---- what one reconcile reads ---------------------------------------

    /// Pods in `ns` that `selector` matches, found through the label index
    /// (the term with the fewest pods, then the whole selector).
    pub fn pods_selected(
        &self,
        ns: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<Arc<PodFacts>> {
        let Some(smallest) = terms(ns, pairs(selector))
            .map(|t| self.pods_by_term.get(&t).map_or(0, HashSet::len))
            .zip(terms(ns, pairs(selector)))
            .min_by_key(|(n, _)| *n)
            .map(|(_, t)| t)
        else {
            return Vec::new();
        };
        // Pods in `ns` share its string; none there, no pods.
        let Some(ns) = self.shared.get(ns) else { return Vec::new() };
        let mut out: Vec<Arc<PodFacts>> = self
            .pods_by_term
            .get(&smallest)
            .into_iter()
            .flatten()
            .filter_map(|name| self.pods.get(&(Arc::clone(ns), Arc::clone(name))))
            .filter(|p| selector_matches(selector, &p.labels))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every node (trimmed), for ingress planning and zones.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.values().cloned().collect()
    }

    /// Every report as it concerns one service: per reporting node, only
    /// the service's own ingress entry and the backend entries of `pods`.
    /// Which nodes report at all is kept (it decides ingress candidates).
    pub fn reports_for(
        &self,
        service: &Key,
        pods: &[Arc<PodFacts>],
    ) -> BTreeMap<String, DsrNodeReportSpec> {
        let mut by_node: HashMap<&str, Vec<&str>> = HashMap::new();
        for p in pods {
            if let Some(node) = &p.node {
                by_node.entry(node).or_default().push(&p.uid);
            }
        }
        self.reports
            .iter()
            .map(|(node, entry)| {
                let spec = &entry.report.spec;
                let backends = by_node
                    .get(node.as_str())
                    .into_iter()
                    .flatten()
                    .filter_map(|uid| entry.backend(uid).cloned())
                    .collect();
                let view = DsrNodeReportSpec {
                    node_name: spec.node_name.clone(),
                    agent_version: spec.agent_version.clone(),
                    update_time: spec.update_time.clone(),
                    ingress: entry.ingress(service).cloned().into_iter().collect(),
                    backends,
                };
                (node.clone(), view)
            })
            .collect()
    }

    /// The service's own EndpointSlices as last seen.
    pub fn slices_of(&self, service: &Key) -> Vec<SliceSummary> {
        self.slices.get(service).into_iter().flat_map(|of| of.values().cloned()).collect()
    }

    /// Services (other than `service`) sharing one of `vips`.
    pub fn sharing_vips(&self, service: &Key, vips: &BTreeSet<IpAddr>) -> Vec<Key> {
        let mut out = Triggers::new();
        self.services_sharing(vips, &mut out);
        out.remove(service);
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kube_dsr_crds::IngressReport;

    fn key(name: &str) -> Key {
        ("default".to_string(), name.to_string())
    }

    fn keys(names: &[&str]) -> Triggers {
        names.iter().map(|n| key(n)).collect()
    }

    fn selecting(name: &str, app: &str, vip: &str) -> DsrService {
        let mut s = service(name, &[vip], 1);
        s.spec.selector = Some(BTreeMap::from([("app".into(), app.into())]));
        s
    }

    fn labelled(name: &str, node: &str, app: &str, ready: bool) -> PodFacts {
        let mut p = PodFacts::from(&pod(name, node, &["10.0.0.1"], ready));
        p.labels = (&BTreeMap::from([("app".to_string(), app.to_string())])).into();
        p
    }

    fn entry(name: &str, generation: i64) -> IngressReport {
        IngressReport {
            namespace: "default".into(),
            name: name.into(),
            observed_generation: generation,
            programmed_vips: vec![],
            announced_vips: vec![],
            backends: 0,
            error: None,
            error_reason: None,
            reach: Default::default(),
            unreached: vec![],
        }
    }

    /// web, db and cache in `default`, web2 (also app=web) in `other`;
    /// pods a (web) and b (db) on n1, whose agent reports both.
    fn world() -> Index {
        let mut ix = Index::default();
        let mut web2 = selecting("web2", "web", "192.0.2.4");
        web2.metadata.namespace = Some("other".into());
        for s in [
            selecting("web", "web", "192.0.2.1"),
            selecting("db", "db", "192.0.2.2"),
            selecting("cache", "cache", "192.0.2.3"),
            web2,
        ] {
            ix.apply_service(Event::Apply(s));
        }
        ix.apply_node(Event::Apply(node("n1", true, &[])));
        ix.apply_pod(Event::Apply(labelled("a", "n1", "web", true)));
        ix.apply_pod(Event::Apply(labelled("b", "n1", "db", true)));
        ix.apply_report(Event::Apply(n1_report()));
        ix
    }

    /// n1's report as its agent writes it (entries in the agent's order).
    fn n1_report() -> DsrNodeReport {
        let mut spec = report("n1", &[("uid-a", &["192.0.2.1"]), ("uid-b", &["192.0.2.2"])]);
        spec.ingress = vec![entry("web", 1), entry("db", 1), entry("cache", 1)];
        DsrNodeReport::new("n1", spec)
    }

    #[test]
    fn a_pod_event_queues_only_the_services_that_select_it() {
        let mut ix = world();
        // Pod a turns NotReady: only web (not db, cache, nor web2 in
        // another namespace with the same selector).
        assert_eq!(ix.apply_pod(Event::Apply(labelled("a", "n1", "web", false))), keys(&["web"]));
        // Same facts again (a status heartbeat): nothing.
        assert_eq!(ix.apply_pod(Event::Apply(labelled("a", "n1", "web", false))), keys(&[]));
        // Relabelled web -> db: the service that had it and the one that gets it.
        assert_eq!(
            ix.apply_pod(Event::Apply(labelled("a", "n1", "db", false))),
            keys(&["web", "db"])
        );
        // A new pod nobody selects, then a deleted one.
        assert_eq!(ix.apply_pod(Event::Apply(labelled("c", "n1", "none", true))), keys(&[]));
        assert_eq!(ix.apply_pod(Event::Delete(labelled("b", "n1", "db", true))), keys(&["db"]));
        // The index answers the reconcile: db now selects only a.
        let got: Vec<String> = ix
            .pods_selected("default", &BTreeMap::from([("app".into(), "db".into())]))
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        assert_eq!(got, ["a"]);
    }

    #[test]
    fn a_report_event_queues_only_the_services_whose_entries_changed() {
        let mut ix = world();
        let base = n1_report();

        // db's ingress entry changes (new generation programmed): only db.
        let mut r = base.clone();
        r.spec.ingress[1].observed_generation = 2;
        assert_eq!(ix.apply_report(Event::Apply(r.clone())), keys(&["db"]));

        // Pod a's backend entry changes (VIP no longer delivered): only
        // web, the service selecting a.
        r.spec.backends[0].delivered_vips.clear();
        assert_eq!(ix.apply_report(Event::Apply(r.clone())), keys(&["web"]));

        // Only the update time moves: nothing.
        r.spec.update_time = Some(time(500));
        assert_eq!(ix.apply_report(Event::Apply(r.clone())), keys(&[]));

        // cache's entry goes away: only cache.
        r.spec.ingress.remove(2);
        assert_eq!(ix.apply_report(Event::Apply(r.clone())), keys(&["cache"]));

        // The report goes: the node stops being an ingress candidate for
        // every service whose node selector matches it (all, here: empty
        // selectors), in both namespaces.
        assert_eq!(
            ix.apply_report(Event::Delete(r)),
            [key("web"), key("db"), key("cache"), ("other".into(), "web2".into())]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn a_node_heartbeat_queues_nothing_and_readiness_queues_its_candidates() {
        let mut ix = world();
        let mut n = node("n1", true, &[]);
        n.status.as_mut().unwrap().images = Some(vec![]);
        assert_eq!(ix.apply_node(Event::Apply(n)), keys(&[]));
        let all: Triggers = [key("web"), key("db"), key("cache"), ("other".into(), "web2".into())]
            .into_iter()
            .collect();
        assert_eq!(ix.apply_node(Event::Apply(node("n1", false, &[]))), all);
        // A node without an agent is nobody's ingress candidate.
        assert_eq!(ix.apply_node(Event::Apply(node("n9", true, &[]))), keys(&[]));
    }

    #[test]
    fn report_view_holds_only_the_services_own_entries() {
        let ix = world();
        let pods = ix.pods_selected("default", &BTreeMap::from([("app".into(), "web".into())]));
        let view = ix.reports_for(&key("web"), &pods);
        let n1 = &view["n1"];
        assert_eq!(n1.ingress.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["web"]);
        assert_eq!(n1.backends.iter().map(|b| b.pod_uid.as_str()).collect::<Vec<_>>(), ["uid-a"]);
    }

    #[test]
    fn a_service_change_queues_it_and_the_services_sharing_its_vips() {
        let mut ix = world();
        let mut clash = selecting("clash", "web", "192.0.2.1");
        assert_eq!(ix.apply_service(Event::Apply(clash.clone())), keys(&["clash", "web"]));
        // A status-only update: same facts, nothing.
        assert_eq!(ix.apply_service(Event::Apply(clash.clone())), keys(&[]));
        clash.metadata.generation = Some(2);
        clash.spec.vips = vec!["192.0.2.2".into()];
        assert_eq!(ix.apply_service(Event::Apply(clash.clone())), keys(&["clash", "web", "db"]));
        assert_eq!(ix.apply_service(Event::Delete(clash)), keys(&["db"]));
    }

    #[test]
    fn pods_share_common_strings_and_unused_ones_are_pruned() {
        let mut ix = world();
        ix.apply_pod(Event::Apply(labelled("c", "n1", "web", true)));
        let (a, c) = (&ix.pods[&key_of("a")], &ix.pods[&key_of("c")]);
        assert!(Arc::ptr_eq(&a.namespace, &c.namespace));
        assert!(Arc::ptr_eq(a.node.as_ref().unwrap(), c.node.as_ref().unwrap()));
        let app = |p: &PodFacts| crate::backends::Labels::label(&p.labels, "app").unwrap().as_ptr();
        assert_eq!(app(a), app(c));
        // A rollout after another: each gives its pods a new label value.
        // Values no pod holds any more do not pile up.
        for round in 0..3000 {
            let pod = labelled("r", "n1", &format!("hash-{round}"), true);
            ix.apply_pod(Event::Apply(pod.clone()));
            ix.apply_pod(Event::Delete(pod));
        }
        assert!(ix.shared.len() <= 2048, "{} shared strings", ix.shared.len());
        // The strings cached pods hold are still shared.
        assert!(ix.shared.contains("web") && ix.shared.contains("n1"));
    }

    fn key_of(name: &str) -> PodKey {
        (Arc::from("default"), Arc::from(name))
    }

    #[test]
    fn a_relist_replaces_the_cache_and_syncs_once() {
        let mut ix = Index::default();
        ix.apply_service(Event::Init);
        ix.apply_service(Event::InitApply(selecting("web", "web", "192.0.2.1")));
        ix.apply_service(Event::InitDone);
        for ev in [Event::Init, Event::InitDone] {
            ix.apply_node(ev);
        }
        for ev in [Event::Init, Event::InitDone] {
            ix.apply_report(ev);
        }
        for ev in [Event::Init, Event::InitDone] {
            ix.apply_slice(ev);
        }
        assert!(!ix.synced());
        ix.apply_pod(Event::Init);
        ix.apply_pod(Event::InitApply(labelled("a", "n1", "web", true)));
        assert_eq!(ix.apply_pod(Event::InitDone), keys(&["web"]));
        assert!(ix.synced());
        // A relist without pod a removes it.
        ix.apply_pod(Event::Init);
        assert_eq!(ix.apply_pod(Event::InitDone), keys(&["web"]));
        assert!(
            ix.pods_selected("default", &BTreeMap::from([("app".into(), "web".into())])).is_empty()
        );
    }
}
