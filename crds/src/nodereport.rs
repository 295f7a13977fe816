//! `DsrNodeReport`: what one node's agent has actually programmed.
//!
//! One object per node, cluster-scoped, named after the node, written only by
//! the `dsr-agent` on that node (server-side apply, field manager
//! `dsr-agent`) and read by `dsr-operator`. The whole object is the report, so
//! it lives in `spec` and is written in one apply, the way `CSINode` and
//! `Lease` work; there is no separate desired state to keep apart from it.
//! The agent sets an owner reference to its `Node`, so the report goes away
//! with the node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Report of one node's agent.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubedsr.io",
    version = "v1alpha1",
    kind = "DsrNodeReport",
    plural = "dsrnodereports",
    shortname = "dsrnode",
    category = "kubedsr",
    derive = "PartialEq",
    doc = "What the dsr-agent on one node has programmed: ingress services, VIP announcements and backend pods.",
    validation = Rule::new("self.metadata.name == self.spec.nodeName").message("a DsrNodeReport is named after its node: metadata.name must equal spec.nodeName"),
    printcolumn(json_path = ".spec.updateTime", name = "Updated", type_ = "date"),
    printcolumn(json_path = ".metadata.creationTimestamp", name = "Age", type_ = "date")
)]
#[serde(rename_all = "camelCase")]
pub struct DsrNodeReportSpec {
    /// The node this report describes (equal to `metadata.name`).
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,

    /// Version of the agent that wrote the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,

    /// When the agent last changed the report. For humans; the operator does
    /// not time reports out (node readiness covers a dead node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,

    /// Services this node serves as an ingress node.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["namespace".into(), "name".into()]))]
    pub ingress: Vec<IngressReport>,

    /// Backend pods on this node and the VIPs configured inside them.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["podUID".into()]))]
    pub backends: Vec<BackendReport>,
}

/// One DsrService as programmed into this node's dataplane.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IngressReport {
    /// DsrService namespace.
    pub namespace: String,
    /// DsrService name.
    pub name: String,
    /// The DsrService `metadata.generation` whose spec is in the dataplane.
    pub observed_generation: i64,
    /// VIPs whose (VIP, port, protocol) entries are in the dataplane.
    #[serde(default)]
    pub programmed_vips: Vec<String>,
    /// VIPs this node currently answers ARP / neighbour discovery for.
    #[serde(default)]
    pub announced_vips: Vec<String>,
    /// Ready backends this node sends new flows to: one per direct entry
    /// of the Maglev table, and for an entry through a node (or this
    /// node's own stage) as many as that node's ready pods (its weight).
    #[serde(default)]
    pub backends: i32,
    /// Why programming failed, when it did (the last error, for humans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why this generation is not programmed, for machines: set with
    /// `error` when the service is not (fully) in the dataplane; absent
    /// while it is programmed (`error` may then still name unreached
    /// backends) or not tried yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<IngressErrorReason>,
    /// How this node's ingress stage reaches the backends it programs
    /// (ready and draining, per VIP family).
    #[serde(default)]
    pub reach: ReachCounts,
    /// Backends this node's ingress stage cannot reach, and why (at most
    /// [`MAX_UNREACHED`] listed); they get no traffic from this node.
    #[serde(default)]
    pub unreached: Vec<UnreachedBackend>,
}

/// Why an ingress node has not programmed a service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressErrorReason {
    /// The node's dataplane is full (service ids, backend slots, Maglev
    /// ring memory or VIP table slots): the service was refused whole, the
    /// services already programmed there are untouched. Retried with
    /// back-off, at once when something is removed.
    CapacityExceeded,
    /// Programming or planning failed on the node (retried with back-off).
    ProgrammingFailed,
    /// No backend yet and no route toward the VIP to choose an interface.
    NoInterface,
}

/// At most this many unreached backends are listed per service.
pub const MAX_UNREACHED: usize = 32;

/// Backends of one service by how an ingress node reaches them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReachCounts {
    /// Own MAC on the ingress interface's segment (bridged or macvlan pods,
    /// static backends).
    #[serde(default)]
    pub direct: i32,
    /// Through their node's MAC on the segment; that node's stage delivers.
    #[serde(default)]
    pub via_node: i32,
    /// Pods on the ingress node itself, through its own node stage.
    #[serde(default)]
    pub local: i32,
}

/// A backend an ingress node does not send traffic to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UnreachedBackend {
    /// The backend's address.
    pub address: String,
    /// Its node, for pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why, for humans (e.g. `node worker-2 is not on the ingress
    /// segment: ...`, `node worker-2 MAC unresolved: ...`).
    pub reason: String,
}

/// How a node delivers VIP traffic to one of its pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The node stage redirects the frame into the pod's host-side
    /// interface (routed pods behind their own veth: kindnet, Calico, Cilium).
    NodeStage,
    /// The pod sits on the node's segment; ingress nodes reach its MAC
    /// directly (bridged or macvlan pods).
    Segment,
}

/// One backend pod on this node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendReport {
    /// Pod UID: a pod re-created under the same name is a different backend.
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    /// Pod namespace (for humans).
    pub namespace: String,
    /// Pod name (for humans).
    pub name: String,
    /// VIPs present on the pod's loopback with the ARP sysctls in place.
    #[serde(default)]
    pub configured_vips: Vec<String>,
    /// Why configuring failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// VIPs whose traffic this node delivers to the pod: its node stage
    /// holds the pod (reply program attached, GRO on inside the pod), or
    /// the pod is on the node's segment. The operator counts a pod ready
    /// only for VIPs listed here.
    #[serde(default)]
    pub delivered_vips: Vec<String>,
    /// How the node delivers to it; absent while it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// The pod's host-side interface on this node (node stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// GRO on the pod's interface, as read back from inside the pod (XDP
    /// redirect into a veth delivers only with it on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gro: Option<bool>,
    /// Why a VIP is not delivered, when one is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_error: Option<String>,
}

impl DsrNodeReport {
    /// An empty report for the node `node_name` (uid `node_uid`), owned by
    /// that Node so it is garbage-collected with it. The agent fills in
    /// `spec` and applies it.
    pub fn for_node(node_name: &str, node_uid: &str) -> Self {
        let mut report = DsrNodeReport::new(
            node_name,
            DsrNodeReportSpec {
                node_name: node_name.to_string(),
                agent_version: None,
                update_time: None,
                ingress: Vec::new(),
                backends: Vec::new(),
            },
        );
        report.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node_name.to_string(),
            uid: node_uid.to_string(),
            ..Default::default()
        }]);
        report
    }
}

impl DsrNodeReportSpec {
    /// Whether the pod with `pod_uid` has `vip` configured, per this report.
    pub fn vip_configured(&self, pod_uid: &str, vip: &str) -> bool {
        self.backends
            .iter()
            .any(|b| b.pod_uid == pod_uid && b.configured_vips.iter().any(|v| v == vip))
    }

    /// Whether this node delivers `vip` traffic to the pod with `pod_uid`.
    pub fn vip_delivered(&self, pod_uid: &str, vip: &str) -> bool {
        self.backends
            .iter()
            .any(|b| b.pod_uid == pod_uid && b.delivered_vips.iter().any(|v| v == vip))
    }

    /// This node's report of the pod with `pod_uid`, if it lists it.
    pub fn backend(&self, pod_uid: &str) -> Option<&BackendReport> {
        self.backends.iter().find(|b| b.pod_uid == pod_uid)
    }

    /// This node's report for one service, if it programs it.
    pub fn ingress_for(&self, namespace: &str, name: &str) -> Option<&IngressReport> {
        self.ingress.iter().find(|i| i.namespace == namespace && i.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_for_a_node_is_named_and_owned_by_it() {
        let r = DsrNodeReport::for_node("node-a", "uid-1");
        assert_eq!(r.metadata.name.as_deref(), Some("node-a"));
        assert_eq!(r.spec.node_name, "node-a");
        let owner = &r.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Node", "node-a", "uid-1")
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["apiVersion"], "kubedsr.io/v1alpha1");
        assert_eq!(json["kind"], "DsrNodeReport");
    }
}
