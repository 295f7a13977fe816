//! `DsrService`: one virtual IP (or a dual-stack pair) with its ports, its
//! backends and where it is served from.
//!
//! The CEL rules below are the first line of defence: the apiserver refuses a
//! bad manifest with the rule's message. [`crate::validation`] repeats every
//! rule in Rust so that the operator can refuse the same objects on clusters
//! where the rules were not enforced (an older CRD, validation disabled).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::messages;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Maglev lookup table sizes the dataplane supports. Each is prime, so every
/// backend's permutation visits every slot; larger tables spread load more
/// evenly and disrupt fewer flows when a backend changes, at a memory cost of
/// 4 bytes per slot per service (doubled while a new table is swapped in).
pub const TABLE_SIZES: [u32; 6] = [251, 1021, 4093, 16381, 32749, 65537];

/// Table size when `spec.hashing.tableSize` is not set (Maglev paper default).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Upper bound on `spec.ports`; keeps the quadratic uniqueness rule cheap.
pub const MAX_PORTS: usize = 64;

/// Upper bound on `spec.backends` (static backends).
pub const MAX_STATIC_BACKENDS: usize = 1024;

/// A DSR load-balanced service.
///
/// Direct Server Return only rewrites destination MAC addresses: the packet
/// reaches the backend with the VIP and port the client used, and the backend
/// answers straight from the VIP. There is therefore no `targetPort` — a
/// backend must listen on the service port itself — and the API refuses the
/// field rather than silently ignoring it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubedsr.io",
    version = "v1alpha1",
    kind = "DsrService",
    plural = "dsrservices",
    shortname = "dsrsvc",
    category = "kubedsr",
    namespaced,
    status = "DsrServiceStatus",
    derive = "PartialEq",
    doc = "A Direct Server Return load-balanced service: VIPs, ports, backends, ingress nodes.",
    validation = Rule::new("self.metadata.name.size() <= 63").message(messages::NAME_TOO_LONG),
    printcolumn(json_path = ".spec.vips", name = "VIPs", type_ = "string", description = "Virtual IP addresses"),
    printcolumn(json_path = ".status.summary.ports", name = "Ports", type_ = "string", description = "Ports and protocols"),
    printcolumn(json_path = ".status.summary.backends", name = "Backends", type_ = "string", description = "Ready/total backends"),
    printcolumn(json_path = ".status.conditions[?(@.type==\"Programmed\")].status", name = "Programmed", type_ = "string", description = "Whether the ingress nodes have programmed the service"),
    printcolumn(json_path = ".metadata.creationTimestamp", name = "Age", type_ = "date")
)]
#[x_kube(
    validation = Rule::new("has(self.selector) != has(self.backends)").message(messages::SELECTOR_XOR_BACKENDS),
    validation = Rule::new("!has(self.backends) || self.backends.all(b, !isIP(b.address) || self.vips.exists(v, isIP(v) && ip(v).family() == ip(b.address).family()))").message(messages::BACKEND_FAMILY),
)]
#[serde(rename_all = "camelCase")]
pub struct DsrServiceSpec {
    /// Virtual IPs clients connect to: one address, or one IPv4 and one IPv6
    /// address for a dual-stack service. Canonical form (`192.0.2.10`,
    /// `2001:db8::10`); not unspecified, loopback, multicast or link-local.
    #[schemars(length(min = 1, max = 2), inner(length(max = 39)))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(v, isIP(v))").message(messages::VIP_INVALID),
        validation = Rule::new("self.all(v, !isIP(v) || ip.isCanonical(v))").message(messages::VIP_NOT_CANONICAL),
        validation = Rule::new("self.all(v, !isIP(v) || !ip(v).isUnspecified())").message(messages::VIP_UNSPECIFIED),
        validation = Rule::new("self.all(v, !isIP(v) || !ip(v).isLoopback())").message(messages::VIP_LOOPBACK),
        validation = Rule::new("self.all(v, !isIP(v) || !(ip(v).isLinkLocalUnicast() || ip(v).isLinkLocalMulticast()))").message(messages::VIP_LINK_LOCAL),
        validation = Rule::new("self.all(v, !isIP(v) || ip(v).isGlobalUnicast() || ip(v).isUnspecified() || ip(v).isLoopback() || ip(v).isLinkLocalUnicast() || ip(v).isLinkLocalMulticast())").message(messages::VIP_MULTICAST),
        validation = Rule::new("self.size() < 2 || !isIP(self[0]) || !isIP(self[1]) || ip(self[0]).family() != ip(self[1]).family()").message(messages::VIP_FAMILIES),
    )]
    pub vips: Vec<String>,

    /// Ports served on every VIP. DSR delivers packets with the port the
    /// client used, so backends listen on these same ports (there is no
    /// target port).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["port".into(), "protocol".into()]),
        validation = Rule::new("self.all(p, self.exists_one(q, q.port == p.port && q.protocol == p.protocol))").message(messages::PORT_DUPLICATE),
        validation = Rule::new("self.all(p, !has(p.name) || self.exists_one(q, has(q.name) && q.name == p.name))").message(messages::PORT_NAME_DUPLICATE),
    )]
    pub ports: Vec<ServicePort>,

    /// Pods in this namespace whose labels match all of these become
    /// backends. Exactly one of `selector` and `backends` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message(messages::SELECTOR_EMPTY))]
    pub selector: Option<BTreeMap<String, String>>,

    /// Static backends outside the cluster (or not managed by it), by
    /// address. They must be on the ingress nodes' L2 segment and carry the
    /// VIP on a loopback with ARP for it suppressed; they count as ready as
    /// listed. Exactly one of `selector` and `backends` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["address".into()]))]
    pub backends: Option<Vec<StaticBackend>>,

    /// Which nodes receive traffic for the VIPs and how the VIPs are made
    /// reachable.
    #[serde(default)]
    pub ingress: Ingress,

    /// Consistent hashing parameters.
    #[serde(default)]
    pub hashing: Hashing,

    /// What the node agent configures inside backend pods.
    #[serde(default)]
    pub backend_setup: BackendSetup,
}

/// One port served on every VIP.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Optional name, unique within the service (DNS label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message(messages::PORT_NAME_INVALID))]
    pub name: Option<String>,

    /// Port number, 1-65535. Backends must listen on this port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a port.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The name used in the API and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend outside the cluster, addressed directly.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StaticBackend {
    /// The backend's IP address, on the ingress nodes' L2 segment.
    #[schemars(length(max = 39))]
    #[x_kube(
        validation = Rule::new("isIP(self)").message(messages::BACKEND_INVALID),
        validation = Rule::new("!isIP(self) || ip.isCanonical(self)").message(messages::BACKEND_NOT_CANONICAL),
        validation = Rule::new("!isIP(self) || ip(self).isGlobalUnicast()").message(messages::BACKEND_NOT_UNICAST),
    )]
    pub address: String,
}

/// Ingress nodes and VIP reachability.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ingress {
    /// Nodes whose labels match all of these receive VIP traffic. Empty or
    /// absent: every Ready node. Nodes labelled
    /// `node.kubernetes.io/exclude-from-external-load-balancers` never do.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Interface on which the ingress nodes receive VIP traffic and attach
    /// the XDP program. Absent: the interface of the node's default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..' && !self.matches('[/:\\\\s]')").message(messages::INTERFACE_INVALID))]
    pub interface: Option<String>,

    /// How the VIPs become reachable: `ARP` (one ingress node per VIP answers
    /// ARP / neighbour discovery, for flat L2 networks) or `None` (routed or
    /// BGP setups, where something else steers VIP traffic to the nodes).
    #[serde(default)]
    pub announcement: Announcement,
}

/// VIP announcement mode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Announcement {
    /// One elected ingress node per VIP answers ARP (IPv4) and neighbour
    /// solicitations (IPv6) for it.
    #[default]
    #[serde(rename = "ARP")]
    Arp,
    /// Nobody announces; routing (static routes, BGP, ECMP) delivers VIP
    /// traffic to the ingress nodes.
    None,
}

/// Consistent hashing parameters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Hashing {
    /// Maglev lookup table size: one of 251, 1021, 4093, 16381, 32749, 65537.
    /// Use at least 100 times the number of backends for even load.
    #[serde(default = "default_table_size")]
    #[x_kube(validation = Rule::new("self in [251, 1021, 4093, 16381, 32749, 65537]").message(messages::TABLE_SIZE))]
    pub table_size: u32,
}

impl Default for Hashing {
    fn default() -> Self {
        Hashing { table_size: DEFAULT_TABLE_SIZE }
    }
}

fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}

/// What the node agent does inside backend pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendSetup {
    /// When true (default), the agent on each backend's node adds the VIPs to
    /// the pod's loopback (`/32`, `/128 nodad`) and sets `arp_ignore=1`,
    /// `arp_announce=2`, so the pod accepts VIP traffic without answering ARP
    /// for it; a backend counts as ready only once the agent reports this
    /// done. Set false when the pods configure the VIP themselves; then pod
    /// readiness alone decides.
    #[serde(default = "default_true")]
    pub manage_loopback: bool,
}

impl Default for BackendSetup {
    fn default() -> Self {
        BackendSetup { manage_loopback: true }
    }
}

fn default_true() -> bool {
    true
}

/// Observed state, written by `dsr-operator` only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DsrServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted`, `Programmed`, `BackendsReady` and `Conflict`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Backends whose traffic path is complete (pod Ready and VIP configured).
    #[serde(default)]
    pub ready_backends: i32,

    /// All backends, ready or not (one per pod, or per static address).
    #[serde(default)]
    pub total_backends: i32,

    /// Nodes selected to receive VIP traffic, sorted.
    #[serde(default)]
    pub ingress_nodes: Vec<String>,

    /// Per VIP: the node elected to announce it.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["address".into()]))]
    pub vips: Vec<VipStatus>,

    /// Per ingress node, how it reaches the backends (from its
    /// DsrNodeReport).
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub reach: Vec<NodeReach>,

    /// Human-readable summaries for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<StatusSummary>,
}

/// Announcement state of one VIP.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VipStatus {
    /// The VIP.
    pub address: String,
    /// The ingress node elected to answer ARP / neighbour discovery for it;
    /// absent with `announcement: None` or when no ingress node is eligible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announcing_node: Option<String>,
    /// Whether that node's agent reports the announcement in place.
    #[serde(default)]
    pub announced: bool,
}

/// How one ingress node reaches the backends: counts per kind.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeReach {
    /// The ingress node.
    pub node: String,
    /// Backends reached by their own MAC on the segment.
    #[serde(default)]
    pub direct: i32,
    /// Backends reached through their node's MAC (that node's stage delivers).
    #[serde(default)]
    pub via_node: i32,
    /// Pods on the ingress node itself.
    #[serde(default)]
    pub local: i32,
    /// Backends it does not reach (its report says why).
    #[serde(default)]
    pub unreached: i32,
}

/// Columns for `kubectl get dsrsvc`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatusSummary {
    /// e.g. `80/TCP,53/UDP`.
    pub ports: String,
    /// Ready/total, e.g. `3/4`.
    pub backends: String,
}

/// Condition types and reasons on `DsrService.status.conditions`.
pub mod conditions {
    /// The spec passed validation.
    pub const ACCEPTED: &str = "Accepted";
    /// Ingress nodes program the service (and the VIPs are announced).
    pub const PROGRAMMED: &str = "Programmed";
    /// At least one backend is ready.
    pub const BACKENDS_READY: &str = "BackendsReady";
    /// Another, earlier DsrService claims one of this service's (VIP, port, protocol).
    pub const CONFLICT: &str = "Conflict";

    /// Reasons (CamelCase, fixed set, safe as metric labels).
    pub mod reasons {
        pub const VALID: &str = "Valid";
        pub const INVALID: &str = "Invalid";
        pub const PROGRAMMED: &str = "Programmed";
        pub const PENDING: &str = "Pending";
        /// An ingress node's dataplane is full; the service was refused
        /// there (the message names the node and the limit).
        pub const CAPACITY_EXCEEDED: &str = "CapacityExceeded";
        /// An ingress node failed to program the service (the message
        /// names the node and its error).
        pub const PROGRAMMING_FAILED: &str = "ProgrammingFailed";
        pub const NO_INGRESS_NODES: &str = "NoIngressNodes";
        pub const NOT_ACCEPTED: &str = "NotAccepted";
        pub const IN_CONFLICT: &str = "InConflict";
        pub const ALL_READY: &str = "AllReady";
        pub const SOME_READY: &str = "SomeReady";
        pub const NONE_READY: &str = "NoneReady";
        pub const NO_BACKENDS: &str = "NoBackends";
        pub const PORT_CONFLICT: &str = "PortConflict";
        pub const NO_CONFLICT: &str = "NoConflict";
    }
}

impl DsrServiceSpec {
    /// The Maglev table size, as the dataplane will use it.
    pub fn table_size(&self) -> u32 {
        self.hashing.table_size
    }
}
