//! Ingress nodes of a service and the node that announces each VIP.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube_dsr_crds::validation::parse_ip;
use kube_dsr_crds::{Announcement, DsrNodeReportSpec, DsrServiceSpec};

/// Nodes with this label never receive load-balancer traffic (the label the
/// Kubernetes service controller honours too).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Where a service's VIP traffic enters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressPlan {
    /// Eligible nodes that run an agent, sorted.
    pub nodes: Vec<String>,
    /// Per VIP (spec order), the node that answers ARP/ND for it. `None`
    /// with `announcement: None` or without eligible nodes.
    pub announcers: Vec<(IpAddr, Option<String>)>,
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `node` may receive this service's traffic: Ready, not being
/// deleted, not excluded, and matching the ingress node selector (an empty
/// selector matches every node).
pub fn eligible(spec: &DsrServiceSpec, node: &Node) -> bool {
    let labels = node.labels();
    node_ready(node)
        && node.metadata.deletion_timestamp.is_none()
        && !labels.contains_key(EXCLUDE_LABEL)
        && spec.ingress.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// 64-bit FNV-1a: stable across releases and platforms, which the announcer
/// choice needs (every operator version must pick the same node).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rendezvous (highest random weight) choice of the node announcing `vip`:
/// depends only on the VIP and the candidate set, so every service sharing
/// a VIP picks the same node, and a node joining or leaving moves only the
/// VIPs it wins or held.
pub fn announcer<'a>(
    vip: &IpAddr,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let v = vip.to_string();
    candidates
        .into_iter()
        .max_by_key(|n| (fnv1a(&[v.as_bytes(), n.as_bytes()]), std::cmp::Reverse(*n)))
}

/// Ingress nodes and announcers for one service.
pub fn plan(
    spec: &DsrServiceSpec,
    nodes: &[&Node],
    reports: &BTreeMap<String, &DsrNodeReportSpec>,
) -> IngressPlan {
    // Only nodes whose agent reports can program the dataplane; an
    // announcer without an agent would attract traffic and drop it.
    let mut names: Vec<String> = nodes
        .iter()
        .filter(|n| eligible(spec, n))
        .map(|n| n.name_any())
        .filter(|n| reports.contains_key(n))
        .collect();
    names.sort();
    let announcers = spec
        .vips
        .iter()
        .filter_map(|v| parse_ip(v))
        .map(|vip| {
            let who = match spec.ingress.announcement {
                Announcement::Arp => {
                    announcer(&vip, names.iter().map(String::as_str)).map(str::to_string)
                }
                Announcement::None => None,
            };
            (vip, who)
        })
        .collect();
    IngressPlan { nodes: names, announcers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn names(plan: &IngressPlan) -> Vec<&str> {
        plan.nodes.iter().map(String::as_str).collect()
    }

    #[test]
    fn ingress_nodes_are_ready_selected_not_excluded_and_run_an_agent() {
        let mut svc = service("web", &["192.0.2.10"], 1);
        svc.spec.ingress.node_selector = BTreeMap::from([("role".into(), "lb".into())]);
        let nodes = [
            node("a", true, &[("role", "lb")]),
            node("b", false, &[("role", "lb")]),
            node("c", true, &[("role", "worker")]),
            node("d", true, &[("role", "lb"), (EXCLUDE_LABEL, "")]),
            node("e", true, &[("role", "lb")]),
            node("f", true, &[("role", "lb")]),
        ];
        let nodes: Vec<&Node> = nodes.iter().collect();
        let reports_owned: Vec<_> =
            ["a", "b", "c", "d", "e"].iter().map(|n| report(n, &[])).collect();
        let reports = reports_owned.iter().map(|r| (r.node_name.clone(), r)).collect();
        let plan = plan(&svc.spec, &nodes, &reports);
        assert_eq!(names(&plan), ["a", "e"], "f has no agent");
        assert!(matches!(plan.announcers[0].1.as_deref(), Some("a" | "e")));
    }

    #[test]
    fn routed_mode_elects_no_announcer() {
        let mut svc = service("web", &["192.0.2.10", "2001:db8::10"], 1);
        svc.spec.ingress.announcement = Announcement::None;
        let nodes = [node("a", true, &[])];
        let r = report("a", &[]);
        let reports = BTreeMap::from([("a".to_string(), &r)]);
        let plan = plan(&svc.spec, &nodes.iter().collect::<Vec<_>>(), &reports);
        assert_eq!(names(&plan), ["a"]);
        assert_eq!(plan.announcers.len(), 2);
        assert!(plan.announcers.iter().all(|(_, n)| n.is_none()));
    }

    #[test]
    fn no_eligible_node_means_no_announcer() {
        let svc = service("web", &["192.0.2.10"], 1);
        let plan = plan(&svc.spec, &[], &BTreeMap::new());
        assert!(plan.nodes.is_empty());
        assert_eq!(plan.announcers, [("192.0.2.10".parse().unwrap(), None)]);
    }

    #[test]
    fn announcer_is_stable_and_moves_only_when_its_node_leaves() {
        let nodes: Vec<String> = (0..8).map(|i| format!("node-{i}")).collect();
        let vips: Vec<IpAddr> = (1..=50).map(|i| format!("192.0.2.{i}").parse().unwrap()).collect();
        let before: Vec<&str> =
            vips.iter().map(|v| announcer(v, nodes.iter().map(String::as_str)).unwrap()).collect();
        // Order of candidates does not matter.
        let reversed: Vec<&str> = vips
            .iter()
            .map(|v| announcer(v, nodes.iter().rev().map(String::as_str)).unwrap())
            .collect();
        assert_eq!(before, reversed);
        // VIPs spread over more than one node.
        let distinct: std::collections::BTreeSet<_> = before.iter().collect();
        assert!(distinct.len() > 3, "{distinct:?}");
        // Removing node-3 moves exactly the VIPs it held.
        let after: Vec<&str> = vips
            .iter()
            .map(|v| {
                announcer(v, nodes.iter().map(String::as_str).filter(|n| *n != "node-3")).unwrap()
            })
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b == "node-3" {
                assert_ne!(*a, "node-3");
            } else {
                assert_eq!(a, b);
            }
        }
    }
}
