//! This node's `DsrNodeReport`: built from what a round achieved and what
//! this node announces, applied only when its content changes.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kube_dsr_crds::nodereport::DsrNodeReportSpec;

use super::desired::Desired;
use super::worker::Outcome;

/// The report's content (without `updateTime`, which only moves when the
/// content does). `announced`: VIPs this node answers ARP/ND for now.
pub fn build(
    node: &str,
    version: &str,
    d: &Desired,
    outcome: &Outcome,
    announced: &BTreeSet<IpAddr>,
) -> DsrNodeReportSpec {
    let mut ingress = outcome.ingress.clone();
    for r in &mut ingress {
        let vips = d
            .ingress
            .iter()
            .find(|s| s.key.namespace == r.namespace && s.key.name == r.name)
            .map(|s| s.vips.iter().map(|v| v.vip).collect::<Vec<_>>())
            .unwrap_or_default();
        r.announced_vips =
            vips.iter().filter(|v| announced.contains(v)).map(|v| v.to_string()).collect();
    }
    DsrNodeReportSpec {
        node_name: node.to_owned(),
        agent_version: Some(version.to_owned()),
        update_time: None,
        ingress,
        backends: outcome.backends.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::desired::{IngressService, SvcKey, VipService};
    use kube_dsr_crds::nodereport::IngressReport;

    #[test]
    fn announced_vips_are_those_of_the_service_this_node_holds() {
        let key = SvcKey { namespace: "default".into(), name: "web".into() };
        let vip4: IpAddr = "192.0.2.10".parse().unwrap();
        let vip6: IpAddr = "2001:db8::10".parse().unwrap();
        let d = Desired {
            ingress: vec![IngressService {
                key,
                generation: 2,
                interface: None,
                announce: true,
                table_size: 251,
                vips: [vip4, vip6]
                    .into_iter()
                    .map(|vip| VipService { vip, ports: vec![], backends: vec![] })
                    .collect(),
                ingress_nodes: vec!["n1".into()],
                preferred_announcer: Default::default(),
            }],
            ..Default::default()
        };
        let outcome = Outcome {
            ingress: vec![IngressReport {
                namespace: "default".into(),
                name: "web".into(),
                observed_generation: 2,
                programmed_vips: vec![vip4.to_string(), vip6.to_string()],
                announced_vips: vec![],
                backends: 3,
                error: None,
                error_reason: None,
                reach: Default::default(),
                unreached: vec![],
            }],
            ..Default::default()
        };
        let other: IpAddr = "192.0.2.99".parse().unwrap();
        let spec = build("n1", "0.1.0", &d, &outcome, &BTreeSet::from([vip6, other]));
        assert_eq!(spec.node_name, "n1");
        assert_eq!(spec.ingress[0].announced_vips, vec!["2001:db8::10".to_string()]);
        assert_eq!(spec.ingress[0].backends, 3);
        let none = build("n1", "0.1.0", &d, &outcome, &BTreeSet::new());
        assert!(none.ingress[0].announced_vips.is_empty());
    }
}
