//! The backend set of a service: which addresses get traffic, and whether
//! each is ready, computed from plain inputs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube_dsr_crds::validation::{Family, parse_ip};
use kube_dsr_crds::{DsrNodeReportSpec, DsrService};

/// Node label giving a node's zone (copied onto endpoints for topology-aware consumers).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The pod behind a backend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One backend address for one VIP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Where the ingress node sends the frame (its MAC is resolved from this).
    pub address: IpAddr,
    /// The VIP of the same family this backend serves.
    pub vip: IpAddr,
    /// Node the pod runs on; `None` for static backends.
    pub node: Option<String>,
    /// Zone of that node, when labelled.
    pub zone: Option<String>,
    /// `None` for static backends.
    pub pod: Option<PodRef>,
    /// Gets new flows: serving and not terminating.
    pub ready: bool,
    /// Would answer: pod Ready and VIP configured inside it.
    pub serving: bool,
    /// Pod is being deleted; existing flows drain, no new ones.
    pub terminating: bool,
    /// Why it is not serving, for status messages (`None` when serving).
    pub not_serving: Option<String>,
}

impl Backend {
    pub fn family(&self) -> Family {
        Family::of(&self.address)
    }
}

/// Why a matching pod is not a backend (yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// Not scheduled or no IP yet.
    NoAddress,
    /// Finished (Succeeded or Failed).
    Finished,
    /// Shares the node's network namespace: setting the VIP on its loopback
    /// would put it on the node itself.
    HostNetwork,
}

/// Label lookup, for selectors over both API label maps and [`PodLabels`].
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A pod's labels, sorted by key in one allocation: a one-entry BTreeMap
/// allocates a whole node (eleven slots, over 500 bytes), which for
/// 100,000 cached pods is most of their memory. Keys and values are shared
/// strings, so the operator's cache holds one copy of each distinct one
/// (see [`PodFacts::share`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodLabels(Box<[(Arc<str>, Arc<str>)]>);

impl PodLabels {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl Labels for PodLabels {
    fn label(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[i].1)
    }
}

impl From<&BTreeMap<String, String>> for PodLabels {
    fn from(labels: &BTreeMap<String, String>) -> Self {
        PodLabels(
            labels.iter().map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str()))).collect(),
        )
    }
}

/// Whether `labels` carry every key/value of `selector` (a Service-style
/// equality selector). An empty selector matches nothing here: the API
/// refuses it, and selecting every pod by accident is worse than none.
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &impl Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.label(k) == Some(v.as_str()))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let mut out: Vec<IpAddr> =
        status.pod_ips.iter().flatten().filter_map(|p| parse_ip(&p.ip)).collect();
    if out.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(parse_ip)
    {
        out.push(ip);
    }
    out
}

/// The part of a Pod the backend set is computed from. The operator caches
/// this instead of the Pod: a decoded Pod is kilobytes (most of it spec the
/// operator never reads), this is a few hundred bytes, which is what keeps
/// 100,000 pods in bounded memory.
///
/// Strings are shared (`Arc<str>`): the index's maps hold the same name
/// and UID rather than copies, and [`PodFacts::share`] makes the strings
/// many pods have in common (namespace, node, label keys and values) one
/// copy each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
    pub labels: PodLabels,
    /// `spec.nodeName`; `None` until scheduled.
    pub node: Option<Arc<str>>,
    pub host_network: bool,
    /// Phase Succeeded or Failed.
    pub finished: bool,
    /// `status.podIPs` (or `podIP`), parsed.
    pub addresses: Vec<IpAddr>,
    /// Condition Ready is True.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

impl From<&Pod> for PodFacts {
    fn from(pod: &Pod) -> Self {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let spec = pod.spec.as_ref();
        PodFacts {
            namespace: pod.metadata.namespace.as_deref().unwrap_or_default().into(),
            name: pod.name_any().into(),
            uid: pod.metadata.uid.as_deref().unwrap_or_default().into(),
            labels: pod.labels().into(),
            node: spec.and_then(|s| s.node_name.as_deref()).map(Arc::from),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            addresses: pod_addresses(pod),
            ready: pod_ready(pod),
            terminating: pod.metadata.deletion_timestamp.is_some(),
        }
    }
}

impl PodFacts {
    /// The same facts with the strings pods have in common (namespace,
    /// node, label keys and values) taken from `share`, which returns one
    /// shared copy per distinct string.
    pub fn share(self, mut share: impl FnMut(&str) -> Arc<str>) -> Self {
        PodFacts {
            namespace: share(&self.namespace),
            labels: PodLabels(self.labels.0.iter().map(|(k, v)| (share(k), share(v))).collect()),
            node: self.node.as_deref().map(&mut share),
            ..self
        }
    }
}

/// Classifies a pod the selector matched: its node and addresses, or why
/// it has none.
fn usable(pod: &PodFacts) -> Result<(&str, &[IpAddr]), Skipped> {
    if pod.host_network {
        return Err(Skipped::HostNetwork);
    }
    if pod.finished {
        return Err(Skipped::Finished);
    }
    let node = pod.node.as_deref().ok_or(Skipped::NoAddress)?;
    if pod.addresses.is_empty() {
        return Err(Skipped::NoAddress);
    }
    Ok((node, &pod.addresses))
}

/// Everything the backend set depends on, by reference.
pub struct Inputs<'a> {
    pub service: &'a DsrService,
    /// Candidate pods (the controller passes those its label index found);
    /// only those in the service's namespace whose labels match the
    /// selector count.
    pub pods: &'a [&'a PodFacts],
    /// Nodes by name (for zones).
    pub nodes: &'a BTreeMap<String, &'a Node>,
    /// Agent reports by node name.
    pub reports: &'a BTreeMap<String, &'a DsrNodeReportSpec>,
}

/// The desired backend set: one entry per (backend, VIP family), sorted by
/// address. A pod backend is ready only when the pod is Ready, the agent on
/// its node reports delivering that VIP to it (its node stage holds the pod,
/// or the pod is on the node's segment) and, unless the service opted out of
/// loopback management, that VIP configured inside the pod. A pod on a node
/// without dsr-agent is therefore never ready. Static backends are ready as
/// listed: no agent runs on them.
pub fn desired_backends(inputs: &Inputs<'_>) -> Vec<Backend> {
    let svc = inputs.service;
    let vips: BTreeMap<Family, IpAddr> =
        svc.spec.vips.iter().filter_map(|v| parse_ip(v)).map(|a| (Family::of(&a), a)).collect();
    let mut out = Vec::new();

    if let Some(statics) = &svc.spec.backends {
        for b in statics {
            let Some(address) = parse_ip(&b.address) else { continue };
            let Some(vip) = vips.get(&Family::of(&address)) else { continue };
            out.push(Backend {
                address,
                vip: *vip,
                node: None,
                zone: None,
                pod: None,
                ready: true,
                serving: true,
                terminating: false,
                not_serving: None,
            });
        }
    }

    if let Some(selector) = &svc.spec.selector {
        let namespace = svc.namespace().unwrap_or_default();
        for pod in inputs.pods {
            if *pod.namespace != *namespace || !selector_matches(selector, &pod.labels) {
                continue;
            }
            let Ok((node, addrs)) = usable(pod) else { continue };
            if pod.uid.is_empty() {
                continue;
            }
            let uid = &pod.uid;
            let terminating = pod.terminating;
            let ready_pod = pod.ready;
            let report = inputs.reports.get(node);
            let zone = inputs.nodes.get(node).and_then(|n| n.labels().get(ZONE_LABEL).cloned());
            for &address in addrs {
                let Some(vip) = vips.get(&Family::of(&address)) else { continue };
                let v = vip.to_string();
                let vip_ok = !svc.spec.backend_setup.manage_loopback
                    || report.is_some_and(|r| r.vip_configured(uid, &v));
                // The readiness chain: a pod gets traffic only through its
                // node's agent (its node stage, or the segment it sits on).
                let delivered = report.is_some_and(|r| r.vip_delivered(uid, &v));
                let not_serving = if report.is_none() {
                    Some(format!("node {node} runs no dsr-agent"))
                } else if !delivered {
                    let why = report
                        .and_then(|r| r.backend(uid))
                        .and_then(|b| b.delivery_error.clone().or_else(|| b.error.clone()));
                    Some(match why {
                        Some(w) => format!("node {node} does not deliver it: {w}"),
                        None => format!("node {node} does not deliver it yet"),
                    })
                } else if !vip_ok {
                    Some(format!("VIP {v} not yet configured in it by dsr-agent"))
                } else if !ready_pod {
                    Some("pod not Ready".into())
                } else {
                    None
                };
                let serving = ready_pod && vip_ok && delivered;
                out.push(Backend {
                    address,
                    vip: *vip,
                    node: Some(node.to_string()),
                    zone: zone.clone(),
                    pod: Some(PodRef {
                        namespace: namespace.clone(),
                        name: pod.name.to_string(),
                        uid: uid.to_string(),
                    }),
                    ready: serving && !terminating,
                    serving,
                    terminating,
                    not_serving,
                });
            }
        }
    }

    out.sort_by_key(|b| b.address);
    // Two pods cannot hold one address at once, except briefly when a pod
    // IP is reused; keep the ready (or first) one so slices stay valid.
    out.dedup_by(|later, kept| {
        if later.address != kept.address {
            return false;
        }
        if later.ready && !kept.ready {
            std::mem::swap(later, kept);
        }
        true
    });
    out
}

/// Ready and total backends, counting a pod (or static address) once even
/// when it serves both families; a dual-stack pod is ready when all its
/// addresses are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ready: i32,
    pub total: i32,
}

pub fn counts(backends: &[Backend]) -> Counts {
    let mut by_backend: BTreeMap<String, bool> = BTreeMap::new();
    for b in backends {
        let key = match &b.pod {
            Some(p) => format!("pod/{}", p.uid),
            None => format!("addr/{}", b.address),
        };
        let e = by_backend.entry(key).or_insert(true);
        *e &= b.ready;
    }
    let total = by_backend.len() as i32;
    let ready = by_backend.values().filter(|r| **r).count() as i32;
    Counts { ready, total }
}

/// Why each backend that is not serving is not, once per pod and reason
/// (`pod web-1: node n3 runs no dsr-agent`), for status messages.
pub fn not_serving(backends: &[Backend]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for b in backends {
        let Some(why) = &b.not_serving else { continue };
        let who = match &b.pod {
            Some(p) => format!("pod {}", p.name),
            None => b.address.to_string(),
        };
        let line = format!("{who}: {why}");
        if !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::*;
    use kube_dsr_crds::StaticBackend;

    fn run(svc: &DsrService, pods: &[Pod], reports: &[DsrNodeReportSpec]) -> Vec<Backend> {
        let facts: Vec<PodFacts> = pods.iter().map(PodFacts::from).collect();
        let pods: Vec<&PodFacts> = facts.iter().collect();
        let nodes_owned = [node("n1", true, &[(ZONE_LABEL, "z1")]), node("n2", true, &[])];
        let nodes = nodes_owned.iter().map(|n| (n.name_any(), n)).collect();
        let reports = reports.iter().map(|r| (r.node_name.clone(), r)).collect();
        desired_backends(&Inputs { service: svc, pods: &pods, nodes: &nodes, reports: &reports })
    }

    #[test]
    fn ready_needs_pod_ready_and_vip_configured_by_the_agent() {
        let svc = service("web", &["192.0.2.10"], 1);
        let pods = [
            pod("a", "n1", &["10.0.0.1"], true),
            pod("b", "n1", &["10.0.0.2"], true),
            pod("c", "n2", &["10.0.0.3"], false),
        ];
        // Agent on n1 configured only pod a; n2 has configured c although c is not Ready.
        let reports = [
            report("n1", &[("uid-a", &["192.0.2.10"]), ("uid-b", &[])]),
            report("n2", &[("uid-c", &["192.0.2.10"])]),
        ];
        let got = run(&svc, &pods, &reports);
        let view: Vec<(String, bool, bool, bool)> = got
            .iter()
            .map(|b| (b.address.to_string(), b.ready, b.serving, b.terminating))
            .collect();
        assert_eq!(
            view,
            [
                ("10.0.0.1".to_string(), true, true, false),
                ("10.0.0.2".to_string(), false, false, false),
                ("10.0.0.3".to_string(), false, false, false),
            ]
        );
        assert_eq!(got[0].node.as_deref(), Some("n1"));
        assert_eq!(got[0].zone.as_deref(), Some("z1"));
        assert_eq!(got[0].pod.as_ref().unwrap().uid, "uid-a");
        assert_eq!(counts(&got), Counts { ready: 1, total: 3 });
    }

    #[test]
    fn without_a_report_nothing_is_ready_even_when_loopback_is_unmanaged() {
        let mut svc = service("web", &["192.0.2.10"], 1);
        let pods = [pod("a", "n1", &["10.0.0.1"], true)];
        let got = run(&svc, &pods, &[]);
        assert!(!got[0].ready);
        assert_eq!(got[0].not_serving.as_deref(), Some("node n1 runs no dsr-agent"));
        svc.spec.backend_setup.manage_loopback = false;
        let got = run(&svc, &pods, &[]);
        assert!(!got[0].ready, "no agent, no node stage: the pod would get no traffic");
        assert_eq!(got[0].not_serving.as_deref(), Some("node n1 runs no dsr-agent"));
        // With an agent delivering it, loopback management is not needed.
        let mut r = report("n1", &[("uid-a", &[])]);
        r.backends[0].delivered_vips = vec!["192.0.2.10".into()];
        let got = run(&svc, &pods, &[r]);
        assert!(got[0].ready);
        assert_eq!(got[0].not_serving, None);
    }

    #[test]
    fn not_serving_names_each_pod_once() {
        let svc = service("web", &["192.0.2.10", "2001:db8::10"], 1);
        let pods =
            [pod("a", "n1", &["10.0.0.1", "fd00::1"], true), pod("b", "n2", &["10.0.0.2"], true)];
        let got = run(&svc, &pods, &[report("n2", &[("uid-b", &["192.0.2.10"])])]);
        assert_eq!(not_serving(&got), ["pod a: node n1 runs no dsr-agent"]);
    }

    #[test]
    fn configured_but_not_delivered_is_not_ready_and_says_why() {
        let svc = service("web", &["192.0.2.10"], 1);
        let pods = [pod("a", "n1", &["10.0.0.1"], true), pod("b", "n1", &["10.0.0.2"], true)];
        let mut r = report("n1", &[("uid-a", &["192.0.2.10"]), ("uid-b", &["192.0.2.10"])]);
        r.backends[0].delivered_vips.clear();
        r.backends[0].delivery_error = Some("192.0.2.10: GRO is not on inside the pod".into());
        r.backends[1].delivered_vips.clear();
        let got = run(&svc, &pods, &[r]);
        assert!(!got[0].ready && !got[1].ready);
        assert_eq!(
            got[0].not_serving.as_deref(),
            Some("node n1 does not deliver it: 192.0.2.10: GRO is not on inside the pod")
        );
        assert_eq!(got[1].not_serving.as_deref(), Some("node n1 does not deliver it yet"));
    }

    #[test]
    fn terminating_pods_keep_serving_but_are_not_ready() {
        let svc = service("web", &["192.0.2.10"], 1);
        let mut p = pod("a", "n1", &["10.0.0.1"], true);
        p.metadata.deletion_timestamp = Some(time(100));
        let got = run(&svc, &[p], &[report("n1", &[("uid-a", &["192.0.2.10"])])]);
        assert_eq!((got[0].ready, got[0].serving, got[0].terminating), (false, true, true));
    }

    #[test]
    fn selector_namespace_phase_and_host_network_filter_pods() {
        let svc = service("web", &["192.0.2.10"], 1);
        let mut other_ns = pod("x", "n1", &["10.0.0.9"], true);
        other_ns.metadata.namespace = Some("other".into());
        let mut other_app = pod("y", "n1", &["10.0.0.8"], true);
        other_app.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
        let mut done = pod("z", "n1", &["10.0.0.7"], false);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut host = pod("h", "n1", &["172.16.0.1"], true);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let pending = pod("p", "n1", &[], false);
        let mut unscheduled = pod("u", "n1", &["10.0.0.6"], false);
        unscheduled.spec.as_mut().unwrap().node_name = None;
        let got = run(
            &svc,
            &[
                other_ns,
                other_app,
                done,
                host,
                pending,
                unscheduled,
                pod("a", "n1", &["10.0.0.1"], true),
            ],
            &[],
        );
        assert_eq!(got.iter().map(|b| b.address.to_string()).collect::<Vec<_>>(), ["10.0.0.1"]);
        assert_eq!(usable(&(&pod("p", "n1", &[], false)).into()), Err(Skipped::NoAddress));
    }

    #[test]
    fn dual_stack_pods_give_one_backend_per_family_and_count_once() {
        let svc = service("web", &["192.0.2.10", "2001:db8::10"], 1);
        let pods = [pod("a", "n1", &["10.0.0.1", "fd00::1"], true)];
        let reports = [report("n1", &[("uid-a", &["192.0.2.10"])])];
        let got = run(&svc, &pods, &reports);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].vip.to_string(), "192.0.2.10");
        assert!(got[0].ready);
        assert_eq!(got[1].vip.to_string(), "2001:db8::10");
        assert!(!got[1].ready, "IPv6 VIP not configured yet");
        assert_eq!(counts(&got), Counts { ready: 0, total: 1 });
    }

    #[test]
    fn single_stack_service_ignores_other_family_pod_addresses() {
        let svc = service("web", &["2001:db8::10"], 1);
        let got = run(&svc, &[pod("a", "n1", &["10.0.0.1", "fd00::1"], true)], &[]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].address.to_string(), "fd00::1");
    }

    #[test]
    fn static_backends_are_ready_as_listed() {
        let mut svc = service("ext", &["192.0.2.10"], 1);
        svc.spec.selector = None;
        svc.spec.backends = Some(vec![
            StaticBackend { address: "192.0.2.22".into() },
            StaticBackend { address: "192.0.2.21".into() },
        ]);
        let got = run(&svc, &[pod("a", "n1", &["10.0.0.1"], true)], &[]);
        let view: Vec<(String, bool, Option<String>)> =
            got.iter().map(|b| (b.address.to_string(), b.ready, b.node.clone())).collect();
        assert_eq!(
            view,
            [("192.0.2.21".to_string(), true, None), ("192.0.2.22".to_string(), true, None)]
        );
        assert_eq!(counts(&got), Counts { ready: 2, total: 2 });
    }

    #[test]
    fn a_reused_address_keeps_the_ready_pod() {
        let svc = service("web", &["192.0.2.10"], 1);
        let pods = [pod("old", "n1", &["10.0.0.1"], false), pod("new", "n1", &["10.0.0.1"], true)];
        let got = run(&svc, &pods, &[report("n1", &[("uid-new", &["192.0.2.10"])])]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].pod.as_ref().unwrap().name, "new");
    }

    #[test]
    fn empty_selector_matches_nothing() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert!(!selector_matches(&BTreeMap::new(), &labels));
        assert!(selector_matches(&labels, &labels));
        let compact = PodLabels::from(&BTreeMap::from([
            ("tier".to_string(), "front".to_string()),
            ("app".to_string(), "web".to_string()),
        ]));
        assert!(selector_matches(&labels, &compact));
        assert_eq!(compact.label("tier"), Some("front"));
        assert_eq!(compact.label("zone"), None);
    }
}
