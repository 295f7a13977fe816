//! Core `Service`: the defaults the apiserver fills in and the part of its
//! validation that matters to a load-balancer implementation, worded as the
//! apiserver words it (`pkg/apis/core/validation`). Cluster IPs and node
//! ports are allocated from the same ranges a default cluster uses
//! (10.96.0.0/12, 30000-32767), lowest free first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::resources::Resource;

/// The core v1 Service.
pub fn is_service(res: &Resource) -> bool {
    res.group.is_empty() && res.plural == "services"
}

/// Fills in what the apiserver defaults on a Service. `used_ips` and
/// `used_node_ports` are those of every other Service.
pub fn defaults(obj: &mut Value, used_ips: &BTreeSet<String>, used_node_ports: &BTreeSet<i64>) {
    if !obj["spec"].is_object() {
        obj["spec"] = json!({});
    }
    let spec = &mut obj["spec"];
    if spec["type"].as_str().is_none() {
        spec["type"] = json!("ClusterIP");
    }
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if spec["sessionAffinity"].as_str().is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    if spec["internalTrafficPolicy"].as_str().is_none() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    let external = ty == "LoadBalancer" || ty == "NodePort";
    if external && spec["externalTrafficPolicy"].as_str().is_none() {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    if ty == "LoadBalancer" && spec["allocateLoadBalancerNodePorts"].as_bool().is_none() {
        spec["allocateLoadBalancerNodePorts"] = json!(true);
    }
    let node_ports = ty == "NodePort"
        || (ty == "LoadBalancer" && spec["allocateLoadBalancerNodePorts"] != json!(false));
    let mut taken = used_node_ports.clone();
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports.iter_mut() {
            if p["protocol"].as_str().is_none() {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none_or(Value::is_null) {
                p["targetPort"] = p["port"].clone();
            }
            if node_ports
                && p["nodePort"].as_i64().is_none()
                && let Some(free) = (30000..=32767).find(|n| !taken.contains(n))
            {
                taken.insert(free);
                p["nodePort"] = json!(free);
            }
        }
    }
    if ty != "ExternalName" && spec["clusterIP"].as_str().is_none() {
        let free = (1u32..(1 << 20))
            .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i).to_string())
            .find(|ip| !used_ips.contains(ip));
        if let Some(ip) = free {
            spec["clusterIP"] = json!(ip);
            spec["clusterIPs"] = json!([ip]);
        }
    }
    if spec["clusterIP"].as_str().is_some_and(|c| c != "None") {
        if spec["ipFamilies"].as_array().is_none_or(Vec::is_empty) {
            spec["ipFamilies"] = json!(["IPv4"]);
        }
        if spec["ipFamilyPolicy"].as_str().is_none() {
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
    }
    if !obj["status"].is_object() {
        obj["status"] = json!({"loadBalancer": {}});
    }
}

/// The cluster IP and node ports a stored Service holds.
pub fn allocations(obj: &Value) -> (Option<String>, Vec<i64>) {
    let ip = obj["spec"]["clusterIP"].as_str().map(str::to_string);
    let ports = obj["spec"]["ports"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["nodePort"].as_i64()).collect())
        .unwrap_or_default();
    (ip, ports)
}

/// Field errors for creating `obj` (or updating `old` to it).
pub fn validate(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&ty) {
        errs.push(format!(
            "spec.type: Unsupported value: \"{ty}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
        ));
    }
    let class = spec["loadBalancerClass"].as_str();
    if let Some(c) = class {
        if ty != "LoadBalancer" {
            errs.push(
                "spec.loadBalancerClass: Forbidden: may only be used when `type` is 'LoadBalancer'"
                    .into(),
            );
        }
        if !is_qualified_name(c) {
            errs.push(format!(
                "spec.loadBalancerClass: Invalid value: \"{c}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            ));
        }
    }
    if let Some(old) = old {
        let old_spec = &old["spec"];
        let old_class = old_spec["loadBalancerClass"].as_str();
        // Immutable while the Service stays a LoadBalancer; it may only be
        // dropped together with the type.
        if old_spec["type"] == json!("LoadBalancer") && ty == "LoadBalancer" && old_class != class {
            errs.push(format!(
                "spec.loadBalancerClass: Invalid value: {}: may not change once set",
                class.map_or("null".to_string(), |c| format!("\"{c}\""))
            ));
        }
    }
    if spec.get("allocateLoadBalancerNodePorts").is_some_and(|v| !v.is_null())
        && ty != "LoadBalancer"
    {
        errs.push("spec.allocateLoadBalancerNodePorts: Forbidden: may only be used when `type` is 'LoadBalancer'".into());
    }
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && ty != "ExternalName" && spec["clusterIP"] != json!("None") {
        errs.push("spec.ports: Required value".into());
    }
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let port = p["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&port) {
            errs.push(format!(
                "spec.ports[{i}].port: Invalid value: {port}: must be between 1 and 65535, inclusive"
            ));
        }
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            errs.push(format!(
                "spec.ports[{i}].protocol: Unsupported value: \"{proto}\": supported values: \"SCTP\", \"TCP\", \"UDP\""
            ));
        }
        if !seen.insert((port, proto.to_string())) {
            errs.push(format!(
                "spec.ports[{i}]: Duplicate value: core.ServicePort{{Name:\"\", Protocol:\"{proto}\", Port:{port}}}"
            ));
        }
        match p["name"].as_str().filter(|n| !n.is_empty()) {
            None if ports.len() > 1 => errs.push(format!("spec.ports[{i}].name: Required value")),
            Some(n) if !names.insert(n.to_string()) => {
                errs.push(format!("spec.ports[{i}].name: Duplicate value: \"{n}\""))
            }
            _ => {}
        }
    }
    errs
}

/// `[prefix/]name` as Kubernetes label keys and classes are written.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(class: Option<&str>) -> Value {
        let mut v = json!({"metadata": {"name": "web"}, "spec": {
            "type": "LoadBalancer", "ports": [{"port": 80}], "selector": {"app": "web"}}});
        if let Some(c) = class {
            v["spec"]["loadBalancerClass"] = json!(c);
        }
        v
    }

    #[test]
    fn defaults_like_the_apiserver() {
        let mut v = lb(Some("kubedsr.io/dsr"));
        let used: BTreeSet<String> = ["10.96.0.1".to_string()].into();
        defaults(&mut v, &used, &[30000].into());
        let s = &v["spec"];
        assert_eq!(s["ports"][0]["protocol"], "TCP");
        assert_eq!(s["ports"][0]["targetPort"], 80);
        assert_eq!(s["ports"][0]["nodePort"], 30001);
        assert_eq!(s["clusterIP"], "10.96.0.2");
        assert_eq!(s["ipFamilies"], json!(["IPv4"]));
        assert_eq!(s["externalTrafficPolicy"], "Cluster");
        let mut no_np = lb(None);
        no_np["spec"]["allocateLoadBalancerNodePorts"] = json!(false);
        defaults(&mut no_np, &BTreeSet::new(), &BTreeSet::new());
        assert!(no_np["spec"]["ports"][0].get("nodePort").is_none());
    }

    #[test]
    fn load_balancer_class_rules() {
        assert!(validate(&lb(Some("kubedsr.io/dsr")), None).is_empty());
        let mut cip = lb(Some("kubedsr.io/dsr"));
        cip["spec"]["type"] = json!("ClusterIP");
        assert_eq!(
            validate(&cip, None),
            vec![
                "spec.loadBalancerClass: Forbidden: may only be used when `type` is 'LoadBalancer'"
            ]
        );
        let e = validate(&lb(Some("example.com/other")), Some(&lb(Some("kubedsr.io/dsr"))));
        assert!(e[0].contains("may not change once set"), "{e:?}");
        let e = validate(&lb(Some("kubedsr.io/dsr")), Some(&lb(None)));
        assert!(e[0].contains("may not change once set"), "setting it later is a change: {e:?}");
        assert!(!validate(&lb(Some("Bad Class!")), None).is_empty());
    }

    #[test]
    fn port_rules() {
        let mut v = lb(None);
        v["spec"]["ports"] =
            json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "UDP", "name": "b"}]);
        let e = validate(&v, None);
        assert!(e.iter().any(|m| m.starts_with("spec.ports[1]: Duplicate value")), "{e:?}");
        assert!(e.iter().any(|m| m == "spec.ports[0].name: Required value"), "{e:?}");
    }
}
