//! Test fixtures shared by the unit tests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeCondition, NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube_dsr_crds::{
    BackendReport, BackendSetup, Delivery, DsrNodeReportSpec, DsrService, DsrServiceSpec, Hashing,
    Ingress, Protocol, ServicePort,
};

pub fn time(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

/// A valid DsrService `default/<name>` selecting `app=web`, port 80/TCP,
/// created at `created` seconds.
pub fn service(name: &str, vips: &[&str], created: i64) -> DsrService {
    let mut svc = DsrService::new(
        name,
        DsrServiceSpec {
            vips: vips.iter().map(|v| v.to_string()).collect(),
            ip_families: Vec::new(),
            ports: vec![ServicePort { name: None, port: 80, protocol: Protocol::Tcp }],
            selector: Some(BTreeMap::from([("app".into(), "web".into())])),
            backends: None,
            ingress: Ingress::default(),
            hashing: Hashing::default(),
            backend_setup: BackendSetup::default(),
        },
    );
    svc.metadata.namespace = Some("default".into());
    svc.metadata.uid = Some(format!("svc-uid-{name}"));
    svc.metadata.generation = Some(1);
    svc.metadata.creation_timestamp = Some(time(created));
    svc
}

/// Pod `default/<name>` (uid `uid-<name>`, label app=web) on `node`.
pub fn pod(name: &str, node: &str, ips: &[&str], ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec { node_name: Some(node.into()), ..Default::default() }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ips.first().map(|s| s.to_string()),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

pub fn node(name: &str, ready: bool, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Report of `node` with the given (pod uid, configured VIPs).
pub fn report(node: &str, pods: &[(&str, &[&str])]) -> DsrNodeReportSpec {
    DsrNodeReportSpec {
        node_name: node.into(),
        agent_version: None,
        update_time: None,
        ingress: Vec::new(),
        backends: pods
            .iter()
            .map(|(uid, vips)| BackendReport {
                pod_uid: uid.to_string(),
                namespace: "default".into(),
                name: uid.trim_start_matches("uid-").into(),
                configured_vips: vips.iter().map(|v| v.to_string()).collect(),
                error: None,
                // The agent delivers what it configured (a pod on the
                // node's segment, or held by its node stage).
                delivered_vips: vips.iter().map(|v| v.to_string()).collect(),
                delivery: Some(Delivery::Segment),
                interface: None,
                gro: None,
                delivery_error: None,
            })
            .collect(),
    }
}
