//! What this node must hold, from the API objects alone: a pure function,
//! tested on its own. The agent diffs it against the kernel.
//!
//! The operator owns every cluster-wide decision. The agent follows it:
//! - a service is served here when the node is in `status.ingressNodes`
//!   and the operator has written its backend set (EndpointSlices owned by
//!   the service; a service in conflict has none, so it is not served);
//! - backends come from those slices with their conditions: `ready` ones
//!   take new flows, `serving` + `terminating` ones keep their flows
//!   (draining), the rest are left out;
//! - backend pods on this node (endpoints with this `nodeName`) get the
//!   service's VIP of their family on their loopback whatever their
//!   readiness, since the operator counts them ready only once this node
//!   reports the VIP configured;
//! - every service with endpoints on this node gets a node stage here
//!   holding those pods whatever their readiness (ready ones take new
//!   flows, the others drain), since the operator counts a pod ready only
//!   once its node reports delivering it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::ResourceExt;
use kube_dsr_crds::DsrService;
use kube_dsr_crds::dsrservice::{Announcement, Protocol as ApiProtocol};
use kube_dsr_crds::validation::{Family, parse_ip, validate_spec};

use crate::dataplane::{PortSpec, Protocol};

pub use kube_dsr_crds::contract::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};

/// A DsrService's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for SvcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One backend of a VIP, from an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: IpAddr,
    /// The node the endpoint is on (`None`: a static backend); shared with
    /// the slice view it came from.
    pub node: Option<Arc<str>>,
    /// Takes new flows.
    pub active: bool,
    /// Keeps its existing flows but takes no new ones.
    pub draining: bool,
}

/// One VIP of a service with its ports and backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipService {
    pub vip: IpAddr,
    pub ports: Vec<PortSpec>,
    /// Sorted by address; only active and draining backends.
    pub backends: Vec<DesiredBackend>,
}

/// A service this node forwards as an ingress node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressService {
    pub key: SvcKey,
    pub generation: i64,
    /// `spec.ingress.interface`; `None`: the route toward the backends.
    pub interface: Option<String>,
    /// `ARP` announcement: one ingress node per VIP answers ARP/ND.
    pub announce: bool,
    pub table_size: u32,
    /// Only VIPs whose family has a backend set written by the operator.
    pub vips: Vec<VipService>,
    /// The ingress nodes, as the operator lists them (lease candidates).
    pub ingress_nodes: Vec<String>,
    /// The operator's preferred announcer per VIP (it tries first).
    pub preferred_announcer: BTreeMap<IpAddr, String>,
}

/// A backend pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// VIPs its loopback must hold (services with `manageLoopback`).
    pub vips: BTreeSet<IpAddr>,
    /// Its addresses as endpoints of any service.
    pub addresses: BTreeSet<IpAddr>,
}

/// A local endpoint of a node stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub addr: IpAddr,
    pub uid: String,
    /// Takes new flows (ready); otherwise it drains.
    pub active: bool,
}

/// One VIP of a node stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeVip {
    pub vip: IpAddr,
    pub ports: Vec<PortSpec>,
    /// Sorted by address.
    pub pods: Vec<LocalEndpoint>,
}

/// A service with endpoints on this node: its node stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeService {
    pub key: SvcKey,
    pub table_size: u32,
    pub vips: Vec<NodeVip>,
    /// Its ingress nodes (their MACs are this node's peers).
    pub ingress_nodes: Vec<String>,
}

/// Everything this node must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Sorted by key.
    pub ingress: Vec<IngressService>,
    /// Sorted by key.
    pub node_stage: Vec<NodeService>,
    /// Sorted by UID.
    pub pods: Vec<LocalPod>,
    /// Addresses of every node (`status.addresses`: InternalIP first, then
    /// ExternalIP), by node name.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
}

/// Node addresses as the agent uses them: InternalIP first, then
/// ExternalIP; hostnames and unparsable entries are dropped.
pub fn node_addresses(node: &k8s_openapi::api::core::v1::Node) -> Vec<IpAddr> {
    let all: &[k8s_openapi::api::core::v1::NodeAddress] =
        node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
    let mut out: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in all.iter().filter(|a| a.type_ == kind) {
            if let Some(ip) = parse_ip(&a.address)
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    out
}

fn protocol(p: ApiProtocol) -> Protocol {
    match p {
        ApiProtocol::Tcp => Protocol::Tcp,
        ApiProtocol::Udp => Protocol::Udp,
    }
}

/// What the agent keeps of an EndpointSlice: a node of a cluster with
/// 100,000 pods caches every slice of the operator's, so each endpoint is
/// kept in a few dozen bytes instead of the API object's several hundred,
/// with its address parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub namespace: String,
    /// The `kubedsr.io/service-name` label of a slice that carries the
    /// operator's `managed-by` label; `None` for any other slice.
    pub service: Option<String>,
    /// UIDs of its owner references.
    pub owners: Vec<String>,
    pub family: Option<Family>,
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint of a [`SliceView`]: its first address, and its conditions
/// as Kubernetes reads them (a missing `ready` means ready, a missing
/// `serving` means `ready`, a missing `terminating` false).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    /// `None`: no parseable address.
    pub addr: Option<IpAddr>,
    pub node: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Its pod, kept only for pods of the agent's own node (the only ones
    /// it prepares).
    pub pod: Option<Box<PodRef>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl SliceView {
    /// The view of `slice` for the agent of node `node`.
    pub fn of(slice: &EndpointSlice, node: &str) -> Self {
        let labels = slice.labels();
        let managed = labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
        let family = match slice.address_type.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        };
        let endpoints = slice.endpoints.iter().map(|e| EndpointView::of(e, node)).collect();
        SliceView {
            namespace: slice.namespace().unwrap_or_default(),
            service: labels.get(SERVICE_NAME_LABEL).filter(|_| managed).cloned(),
            owners: slice.owner_references().iter().map(|o| o.uid.clone()).collect(),
            family,
            endpoints,
        }
    }

    /// Whether this is a backend set the operator wrote for `svc`: our
    /// labels, and an owner reference to this very object (a slice left
    /// over from a deleted service of the same name is not).
    fn belongs_to(&self, svc: &DsrService) -> bool {
        let uid = svc.metadata.uid.as_deref();
        self.service.as_deref() == Some(svc.name_any().as_str())
            && Some(self.namespace.as_str()) == svc.metadata.namespace.as_deref()
            && uid.is_some()
            && self.owners.iter().any(|o| Some(o.as_str()) == uid)
    }
}

impl EndpointView {
    fn of(e: &Endpoint, node: &str) -> Self {
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let on_me = e.node_name.as_deref() == Some(node);
        let pod = e.target_ref.as_ref().filter(|_| on_me).and_then(|t| {
            Some(Box::new(PodRef {
                uid: t.uid.clone()?,
                namespace: t.namespace.clone().unwrap_or_default(),
                name: t.name.clone().unwrap_or_default(),
            }))
        });
        EndpointView {
            addr: e.addresses.first().and_then(|a| parse_ip(a)),
            node: e.node_name.as_deref().map(Arc::from),
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            pod,
        }
    }
}

/// Keeps only what the agent reads of a DsrService: metadata it matches on
/// (name, namespace, UID, generation, deletion) and the status fields it
/// follows (ingress nodes, preferred announcers).
pub fn strip_service(s: &mut DsrService) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
    s.metadata.labels = None;
    s.metadata.owner_references = None;
    s.metadata.finalizers = None;
    if let Some(st) = s.status.as_mut() {
        st.conditions = Vec::new();
        st.reach = Vec::new();
        st.summary = None;
    }
}

/// The desired state of node `node` from every DsrService and every slice
/// the agent watches.
pub fn desired(node: &str, services: &[DsrService], slices: &[EndpointSlice]) -> Desired {
    let views: Vec<SliceView> = slices.iter().map(|s| SliceView::of(s, node)).collect();
    desired_of(node, services.iter(), views.iter())
}

/// [`desired`], straight from the watch caches.
pub fn desired_from(
    node: &str,
    services: &[Arc<DsrService>],
    slices: &[Arc<SliceView>],
) -> Desired {
    desired_of(node, services.iter().map(|s| &**s), slices.iter().map(|s| &**s))
}

fn desired_of<'a>(
    node: &str,
    services: impl Iterator<Item = &'a DsrService>,
    slices: impl Iterator<Item = &'a SliceView>,
) -> Desired {
    // Slices by (namespace, service name): each service looks at its own,
    // not at every slice of the cluster.
    let mut by_service: BTreeMap<(&str, &str), Vec<&SliceView>> = BTreeMap::new();
    for s in slices {
        if let Some(name) = &s.service {
            by_service.entry((s.namespace.as_str(), name.as_str())).or_default().push(s);
        }
    }
    let mut ingress = Vec::new();
    let mut node_stage = Vec::new();
    let mut pods: BTreeMap<String, LocalPod> = BTreeMap::new();
    for svc in services {
        // Being deleted, or invalid (the CRD's rules were not enforced):
        // nothing of it reaches the kernel.
        if svc.metadata.deletion_timestamp.is_some() || !validate_spec(&svc.spec).is_empty() {
            continue;
        }
        let key = SvcKey { namespace: svc.namespace().unwrap_or_default(), name: svc.name_any() };
        let own: Vec<&SliceView> = by_service
            .get(&(key.namespace.as_str(), key.name.as_str()))
            .into_iter()
            .flatten()
            .copied()
            .filter(|s| s.belongs_to(svc))
            .collect();
        if own.is_empty() {
            continue;
        }
        let status = svc.status.as_ref();
        let ingress_nodes = status.map(|s| s.ingress_nodes.clone()).unwrap_or_default();
        let ports: Vec<PortSpec> = svc
            .spec
            .ports
            .iter()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
                Some(PortSpec { port, protocol: protocol(p.protocol) })
            })
            .collect();
        let mut vips = Vec::new();
        let mut node_vips = Vec::new();
        // Written VIPs, or the addresses a pool gave (status.allocatedVips).
        for vip in svc.effective_vips().into_iter().filter_map(parse_ip) {
            let family = Family::of(&vip);
            let of_family: Vec<&&SliceView> =
                own.iter().filter(|s| s.family == Some(family)).collect();
            if of_family.is_empty() {
                continue;
            }
            let mut backends: BTreeMap<IpAddr, DesiredBackend> = BTreeMap::new();
            let mut local: BTreeMap<IpAddr, LocalEndpoint> = BTreeMap::new();
            for e in of_family.iter().flat_map(|s| s.endpoints.iter()) {
                let Some(addr) = e.addr else { continue };
                if Family::of(&addr) != family {
                    continue;
                }
                let (ready, serving, terminating) = (e.ready, e.serving, e.terminating);
                if e.node.as_deref() == Some(node)
                    && let Some(t) = &e.pod
                {
                    let uid = t.uid.clone();
                    let pod = pods.entry(uid.clone()).or_insert_with(|| LocalPod {
                        uid: uid.clone(),
                        namespace: t.namespace.clone(),
                        name: t.name.clone(),
                        vips: BTreeSet::new(),
                        addresses: BTreeSet::new(),
                    });
                    pod.addresses.insert(addr);
                    if svc.spec.backend_setup.manage_loopback {
                        pod.vips.insert(vip);
                    }
                    let active = ready && !terminating;
                    let slot = local.entry(addr).or_insert(LocalEndpoint { addr, uid, active });
                    slot.active |= active;
                }
                let node_name = e.node.clone();
                let b = if ready && !terminating {
                    DesiredBackend { addr, node: node_name, active: true, draining: false }
                } else if serving && terminating {
                    DesiredBackend { addr, node: node_name, active: false, draining: true }
                } else {
                    continue;
                };
                // One address in two slices: the active reading wins.
                let slot = backends.entry(addr).or_insert(b.clone());
                if b.active {
                    *slot = b;
                }
            }
            vips.push(VipService {
                vip,
                ports: ports.clone(),
                backends: backends.into_values().collect(),
            });
            if !local.is_empty() {
                node_vips.push(NodeVip {
                    vip,
                    ports: ports.clone(),
                    pods: local.into_values().collect(),
                });
            }
        }
        if !node_vips.is_empty() {
            node_stage.push(NodeService {
                key: key.clone(),
                table_size: svc.spec.table_size(),
                vips: node_vips,
                ingress_nodes: ingress_nodes.clone(),
            });
        }
        if vips.is_empty() || !ingress_nodes.iter().any(|n| n == node) {
            continue;
        }
        let preferred_announcer = status
            .map(|s| {
                s.vips
                    .iter()
                    .filter_map(|v| Some((parse_ip(&v.address)?, v.announcing_node.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        ingress.push(IngressService {
            key,
            generation: svc.metadata.generation.unwrap_or(0),
            interface: svc.spec.ingress.interface.clone(),
            announce: svc.spec.ingress.announcement == Announcement::Arp,
            table_size: svc.spec.table_size(),
            vips,
            ingress_nodes,
            preferred_announcer,
        });
    }
    ingress.sort_by(|a, b| a.key.cmp(&b.key));
    node_stage.sort_by(|a, b| a.key.cmp(&b.key));
    Desired { ingress, node_stage, pods: pods.into_values().collect(), nodes: BTreeMap::new() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::EndpointConditions;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
    use kube_dsr_crds::DsrServiceSpec;
    use kube_dsr_crds::dsrservice::{DsrServiceStatus, ServicePort, VipStatus};

    fn svc(name: &str, vips: &[&str], ingress: &[&str]) -> DsrService {
        let spec: DsrServiceSpec = serde_json::from_value(serde_json::json!({
            "vips": vips,
            "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}],
            "selector": {"app": name},
        }))
        .unwrap();
        let mut s = DsrService::new(name, spec);
        s.metadata.namespace = Some("default".into());
        s.metadata.uid = Some(format!("uid-{name}"));
        s.metadata.generation = Some(4);
        s.status = Some(DsrServiceStatus {
            ingress_nodes: ingress.iter().map(|n| n.to_string()).collect(),
            vips: vec![VipStatus {
                address: vips[0].into(),
                announcing_node: ingress.first().map(|n| n.to_string()),
                announced: false,
            }],
            ..Default::default()
        });
        s
    }

    fn ep(addr: &str, node: &str, uid: &str, ready: bool, serving: bool, term: bool) -> Endpoint {
        Endpoint {
            addresses: vec![addr.into()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(term),
            }),
            node_name: Some(node.into()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("default".into()),
                name: Some(format!("pod-{uid}")),
                uid: Some(uid.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(owner: &DsrService, name: &str, family: &str, eps: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some(
                    [
                        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                        (SERVICE_NAME_LABEL.to_string(), owner.name_any()),
                    ]
                    .into(),
                ),
                owner_references: Some(vec![OwnerReference {
                    api_version: "kubedsr.io/v1alpha1".into(),
                    kind: "DsrService".into(),
                    name: owner.name_any(),
                    uid: owner.metadata.uid.clone().unwrap(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            address_type: family.into(),
            endpoints: eps,
            ports: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ingress_node_gets_active_and_draining_backends() {
        let web = svc("web", &["192.0.2.10"], &["ing-a", "ing-b"]);
        let s = slice(
            &web,
            "web-v4-0",
            "IPv4",
            vec![
                ep("10.0.0.3", "n1", "c", true, true, false),
                ep("10.0.0.1", "n1", "a", true, true, false),
                ep("10.0.0.2", "n2", "b", false, true, true), // terminating: drains
                ep("10.0.0.4", "n2", "d", false, false, false), // not ready: left out
            ],
        );
        let d = desired("ing-a", &[web], &[s]);
        assert_eq!(d.ingress.len(), 1);
        let i = &d.ingress[0];
        assert_eq!(i.key.to_string(), "default/web");
        assert_eq!((i.generation, i.announce, i.table_size), (4, true, 65537));
        assert_eq!(i.preferred_announcer.get(&ip("192.0.2.10")).map(String::as_str), Some("ing-a"));
        let v = &i.vips[0];
        assert_eq!(v.vip, ip("192.0.2.10"));
        assert_eq!(
            v.ports,
            vec![
                PortSpec { port: 80, protocol: Protocol::Tcp },
                PortSpec { port: 53, protocol: Protocol::Udp }
            ]
        );
        let got: Vec<(IpAddr, bool, bool)> =
            v.backends.iter().map(|b| (b.addr, b.active, b.draining)).collect();
        assert_eq!(
            got,
            vec![
                (ip("10.0.0.1"), true, false),
                (ip("10.0.0.2"), false, true),
                (ip("10.0.0.3"), true, false)
            ]
        );
        // Not an ingress node, no backend here: nothing to do.
        assert_eq!(
            desired("n9", &[svc("web", &["192.0.2.10"], &["ing-a"])], &[]),
            Desired::default()
        );
    }

    #[test]
    fn stripped_services_and_slice_views_give_the_same_desired_state() {
        let web = svc("web", &["192.0.2.10"], &["n1"]);
        let mut s = slice(
            &web,
            "web-v4-0",
            "IPv4",
            vec![
                ep("10.0.0.1", "n1", "a", true, true, false),
                ep("10.0.0.2", "n2", "b", false, true, true),
            ],
        );
        s.endpoints[0].zone = Some("z1".into());
        s.endpoints[0].hostname = Some("h".into());
        // Missing conditions read as Kubernetes reads them: ready, serving.
        let mut bare = ep("10.0.0.3", "n2", "c", true, true, false);
        bare.conditions = None;
        s.endpoints.push(bare);
        let mut web2 = web.clone();
        web2.metadata.managed_fields = Some(vec![Default::default()]);
        web2.metadata.annotations = Some([("a".to_string(), "b".repeat(1000))].into());
        let mut ws = web2.clone();
        strip_service(&mut ws);
        assert!(ws.metadata.managed_fields.is_none() && ws.metadata.annotations.is_none());
        for node in ["n1", "n2"] {
            // The view keeps a pod only on its own node.
            let v = SliceView::of(&s, node);
            let pods: Vec<&str> =
                v.endpoints.iter().filter_map(|e| e.pod.as_ref()).map(|p| p.uid.as_str()).collect();
            assert_eq!(pods, if node == "n1" { vec!["a"] } else { vec!["b", "c"] }, "{node}");
            assert!(v.endpoints[2].ready && v.endpoints[2].serving && !v.endpoints[2].terminating);
            assert_eq!(
                desired_from(node, &[Arc::new(ws.clone())], &[Arc::new(v)]),
                desired(node, std::slice::from_ref(&web2), std::slice::from_ref(&s)),
                "{node}"
            );
        }
        let d = desired("n1", &[ws], &[s]);
        let backends: Vec<IpAddr> = d.ingress[0].vips[0].backends.iter().map(|b| b.addr).collect();
        assert_eq!(backends, [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]);
    }

    #[test]
    fn backend_node_prepares_its_pods_whatever_their_readiness() {
        let web = svc("web", &["192.0.2.10", "2001:db8::10"], &["ing-a"]);
        let v4 = slice(
            &web,
            "web-v4-0",
            "IPv4",
            vec![
                ep("10.0.0.1", "n1", "a", false, false, false),
                ep("10.0.0.2", "n2", "b", true, true, false),
            ],
        );
        let v6 = slice(&web, "web-v6-0", "IPv6", vec![ep("fd00::1", "n1", "a", true, true, false)]);
        let d = desired("n1", std::slice::from_ref(&web), &[v4.clone(), v6.clone()]);
        assert!(d.ingress.is_empty(), "n1 is not an ingress node");
        assert_eq!(d.pods.len(), 1);
        assert_eq!(d.pods[0].uid, "a");
        assert_eq!(d.pods[0].name, "pod-a");
        assert_eq!(d.pods[0].vips, BTreeSet::from([ip("192.0.2.10"), ip("2001:db8::10")]));

        assert_eq!(d.pods[0].addresses, BTreeSet::from([ip("10.0.0.1"), ip("fd00::1")]));
        // Its node stage holds it whatever its readiness: not ready drains.
        assert_eq!(d.node_stage.len(), 1);
        let ns = &d.node_stage[0];
        assert_eq!(ns.ingress_nodes, ["ing-a"]);
        let held: Vec<(IpAddr, IpAddr, &str, bool)> = ns
            .vips
            .iter()
            .flat_map(|v| v.pods.iter().map(move |p| (v.vip, p.addr, p.uid.as_str(), p.active)))
            .collect();
        assert_eq!(
            held,
            [
                (ip("192.0.2.10"), ip("10.0.0.1"), "a", false),
                (ip("2001:db8::10"), ip("fd00::1"), "a", true)
            ]
        );

        // manageLoopback: false puts nothing on the pod's loopback, but the
        // pod is still delivered by this node.
        let mut unmanaged = web.clone();
        unmanaged.spec.backend_setup.manage_loopback = false;
        let d = desired("n1", &[unmanaged], &[v4.clone(), v6.clone()]);
        assert_eq!(d.pods.len(), 1);
        assert!(d.pods[0].vips.is_empty());
        assert_eq!(d.node_stage.len(), 1);

        // The ingress side of a dual-stack service: a VIP without a slice of
        // its family is not programmed yet.
        let d = desired("ing-a", &[web], &[v4]);
        assert_eq!(
            d.ingress[0].vips.iter().map(|v| v.vip).collect::<Vec<_>>(),
            vec![ip("192.0.2.10")]
        );
    }

    #[test]
    fn services_without_their_own_slices_are_not_served() {
        let web = svc("web", &["192.0.2.10"], &["ing-a"]);
        let mut foreign =
            slice(&web, "web-v4-0", "IPv4", vec![ep("10.0.0.1", "n1", "a", true, true, false)]);
        // A slice left behind by an earlier service of the same name.
        foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-old".into();
        assert_eq!(
            desired("ing-a", std::slice::from_ref(&web), std::slice::from_ref(&foreign)),
            Desired::default()
        );
        // A slice without our managed-by label.
        let mut unlabelled =
            slice(&web, "web-v4-0", "IPv4", vec![ep("10.0.0.1", "n1", "a", true, true, false)]);
        unlabelled.metadata.labels.as_mut().unwrap().remove(MANAGED_BY_LABEL);
        assert_eq!(desired("n1", std::slice::from_ref(&web), &[unlabelled]), Desired::default());
        // Being deleted.
        let mut going = web.clone();
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let ok =
            slice(&web, "web-v4-0", "IPv4", vec![ep("10.0.0.1", "n1", "a", true, true, false)]);
        assert_eq!(desired("ing-a", &[going], std::slice::from_ref(&ok)), Desired::default());
        // Invalid spec (an older CRD let it in).
        let mut bad = web.clone();
        bad.spec.ports.push(ServicePort { name: None, port: 80, protocol: ApiProtocol::Tcp });
        assert_eq!(desired("ing-a", &[bad], std::slice::from_ref(&ok)), Desired::default());
        // And the same service with its slice is served.
        assert_eq!(desired("ing-a", &[web], &[ok]).ingress.len(), 1);
    }

    #[test]
    fn ingress_backends_carry_their_node() {
        let web = svc("web", &["192.0.2.10"], &["ing-a"]);
        let s = slice(&web, "web-v4-0", "IPv4", vec![ep("10.0.0.1", "n1", "a", true, true, false)]);
        let d = desired("ing-a", &[web], &[s]);
        assert_eq!(d.ingress[0].vips[0].backends[0].node.as_deref(), Some("n1"));
        assert!(d.node_stage.is_empty(), "no endpoint on ing-a");
    }

    #[test]
    fn node_addresses_internal_first_without_duplicates_or_hostnames() {
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "10.10.0.11"},
                {"type": "InternalIP", "address": "fd10::11"},
                {"type": "ExternalIP", "address": "10.10.0.11"},
            ]},
        }))
        .unwrap();
        assert_eq!(node_addresses(&node), [ip("10.10.0.11"), ip("fd10::11"), ip("203.0.113.5")]);
        assert!(node_addresses(&Default::default()).is_empty());
    }

    #[test]
    fn a_pod_backing_two_services_gets_both_vips() {
        let a = svc("a", &["192.0.2.10"], &["ing"]);
        let b = svc("b", &["192.0.2.11"], &["ing"]);
        let sa = slice(&a, "a-v4-0", "IPv4", vec![ep("10.0.0.1", "n1", "p", true, true, false)]);
        let sb = slice(&b, "b-v4-0", "IPv4", vec![ep("10.0.0.1", "n1", "p", true, true, false)]);
        let d = desired("n1", &[a, b], &[sa, sb]);
        assert_eq!(d.pods.len(), 1);
        assert_eq!(d.pods[0].vips, BTreeSet::from([ip("192.0.2.10"), ip("192.0.2.11")]));
    }
}
