//! Server-side printing: the `meta.k8s.io/v1` `Table` a client gets when
//! it asks for `application/json;as=Table;g=meta.k8s.io;v=v1` (what
//! `kubectl get` does). Custom resources get a Name column and the CRD's
//! `additionalPrinterColumns` (JSONPath cells, `date` columns as ages),
//! built-in kinds the apiserver's own columns (wide ones with priority 1).

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::resources::{Resource, crd_columns};
use crate::util;

/// `includeObject`: what each row carries besides its cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(v: Option<&str>) -> Include {
        match v {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

fn column(name: &str, ty: &str, format: &str, priority: i64, description: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESCRIPTION: &str =
    "CreationTimestamp is a timestamp representing the server time when this object was created.";

/// Go's `duration.HumanDuration`, as `kubectl get` shows ages.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{days}d") } else { format!("{days}d{h}h") };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let d = days % 365;
        return if d == 0 { format!("{years}y") } else { format!("{years}y{d}d") };
    }
    format!("{years}y")
}

/// The age of an RFC 3339 timestamp; `<unknown>` when absent, as kubectl
/// prints a zero time.
fn age(t: &Value) -> String {
    match t.as_str().and_then(util::parse_rfc3339) {
        Some(at) => {
            let now = SystemTime::now();
            let secs = match now.duration_since(at) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            };
            human_duration(secs)
        }
        None => "<unknown>".into(),
    }
}

/// A JSONPath of the subset CRD printer columns use: `.a.b`, `[n]`, `[*]`
/// and `[?(@.x.y=="v")]` filters. Returns every match.
pub fn jsonpath<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![obj];
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    rest = rest.strip_prefix('$').unwrap_or(rest);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            current = current.into_iter().filter_map(|v| v.get(key)).collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { return Vec::new() };
            // A filter's quoted value may hold ']' in theory; printer
            // columns do not use that.
            let inner = &r[..end];
            rest = &r[end + 1..];
            current = if inner == "*" {
                current.into_iter().flat_map(|v| v.as_array().into_iter().flatten()).collect()
            } else if let Some(f) = inner.strip_prefix("?(@").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = f.split_once("==").unwrap_or((f, ""));
                let want: Value = serde_json::from_str(want.trim())
                    .unwrap_or_else(|_| Value::String(want.trim().trim_matches('\'').to_string()));
                current
                    .into_iter()
                    .flat_map(|v| v.as_array().into_iter().flatten())
                    .filter(|item| jsonpath(item, field.trim()).first() == Some(&&want))
                    .collect()
            } else if let Ok(i) = inner.parse::<usize>() {
                current.into_iter().filter_map(|v| v.get(i)).collect()
            } else {
                return Vec::new();
            };
        } else {
            return Vec::new();
        }
    }
    current
}

/// A JSONPath result as `kubectl`'s JSONPath printer writes it: strings
/// bare, lists and maps as JSON.
fn printed(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn crd_table(columns: &[Value], objs: &[Value]) -> (Vec<Value>, Vec<Vec<Value>>) {
    let mut defs = vec![column("Name", "string", "name", 0, NAME_DESCRIPTION)];
    for c in columns {
        defs.push(column(
            c["name"].as_str().unwrap_or(""),
            c["type"].as_str().unwrap_or("string"),
            c["format"].as_str().unwrap_or(""),
            c["priority"].as_i64().unwrap_or(0),
            c["description"].as_str().unwrap_or(""),
        ));
    }
    let rows = objs
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in columns {
                let found = jsonpath(o, c["jsonPath"].as_str().unwrap_or(""));
                let cell = match (found.first(), c["type"].as_str()) {
                    (None, _) => Value::Null,
                    (Some(v), Some("date")) => json!(age(v)),
                    (Some(v), Some("string")) => json!(printed(v)),
                    (Some(v), _) => (*v).clone(),
                };
                cells.push(cell);
            }
            cells
        })
        .collect();
    (defs, rows)
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

/// Cells of one row from an object.
type RowFn = Box<dyn Fn(&Value) -> Vec<Value>>;

fn builtin_table(res: &Resource, objs: &[Value]) -> (Vec<Value>, Vec<Vec<Value>>) {
    let name = column("Name", "string", "name", 0, NAME_DESCRIPTION);
    let age_col = column("Age", "string", "", 0, AGE_DESCRIPTION);
    let created = |o: &Value| json!(age(&o["metadata"]["creationTimestamp"]));
    let (defs, row): (Vec<Value>, RowFn) = match (res.group, res.plural) {
        ("", "pods") => (
            vec![
                name,
                column(
                    "Ready",
                    "string",
                    "",
                    0,
                    "The aggregate readiness state of this pod for accepting traffic.",
                ),
                column(
                    "Status",
                    "string",
                    "",
                    0,
                    "The aggregate status of the containers in this pod.",
                ),
                column(
                    "Restarts",
                    "string",
                    "",
                    0,
                    "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                ),
                age_col,
                column("IP", "string", "", 1, "The IP address assigned to the pod"),
                column("Node", "string", "", 1, "The name of the node where the pod is scheduled"),
                column(
                    "Nominated Node",
                    "string",
                    "",
                    1,
                    "The name of the node where the pod is nominated",
                ),
                column("Readiness Gates", "string", "", 1, "The readiness gates of the pod"),
            ],
            Box::new(move |o| {
                let statuses =
                    o["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let ready = statuses.iter().filter(|s| s["ready"] == json!(true)).count();
                let restarts: i64 =
                    statuses.iter().filter_map(|s| s["restartCount"].as_i64()).sum();
                let status = if o["metadata"].get("deletionTimestamp").is_some() {
                    "Terminating".to_string()
                } else {
                    none_if_empty(str_of(&o["status"]["phase"]))
                };
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{ready}/{total}")),
                    json!(status),
                    json!(restarts.to_string()),
                    created(o),
                    json!(none_if_empty(str_of(&o["status"]["podIP"]))),
                    json!(none_if_empty(str_of(&o["spec"]["nodeName"]))),
                    json!("<none>"),
                    json!("<none>"),
                ]
            }),
        ),
        ("", "namespaces") => (
            vec![name, column("Status", "string", "", 0, "The status of the namespace"), age_col],
            Box::new(move |o| {
                let phase = o["status"]["phase"].as_str().unwrap_or("Active").to_string();
                vec![o["metadata"]["name"].clone(), json!(phase), created(o)]
            }),
        ),
        ("", "services") => (
            vec![
                name,
                column("Type", "string", "", 0, "The type of the service"),
                column("Cluster-IP", "string", "", 0, "The cluster IP of the service"),
                column("External-IP", "string", "", 0, "The external IP of the service"),
                column("Port(s)", "string", "", 0, "The ports of the service"),
                age_col,
                column("Selector", "string", "", 1, "The selector of the service"),
            ],
            Box::new(move |o| {
                let spec = &o["spec"];
                let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
                let external: Vec<String> = spec["externalIPs"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                // As kubectl's service printer: load-balancer ingress
                // addresses (or hostnames), then external IPs; a
                // LoadBalancer without any is <pending>.
                let external_ip = if ty == "LoadBalancer" {
                    let mut lb: Vec<String> = o["status"]["loadBalancer"]["ingress"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()))
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    let mut joined = lb.join(",");
                    if joined.len() > 16 {
                        joined = format!("{}...", &joined[..13]);
                    }
                    lb = if joined.is_empty() { Vec::new() } else { vec![joined] };
                    lb.extend(external);
                    if lb.is_empty() { "<pending>".to_string() } else { lb.join(",") }
                } else if external.is_empty() {
                    "<none>".to_string()
                } else {
                    external.join(",")
                };
                let ports: Vec<String> = spec["ports"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| {
                                let proto = p["protocol"].as_str().unwrap_or("TCP");
                                match p["nodePort"].as_i64() {
                                    Some(np) if np != 0 => format!("{}:{np}/{proto}", p["port"]),
                                    _ => format!("{}/{proto}", p["port"]),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let selector: Vec<String> = spec["selector"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| format!("{k}={}", str_of(v))).collect())
                    .unwrap_or_default();
                vec![
                    o["metadata"]["name"].clone(),
                    json!(ty),
                    json!(none_if_empty(str_of(&spec["clusterIP"]))),
                    json!(external_ip),
                    json!(if ports.is_empty() { "<none>".to_string() } else { ports.join(",") }),
                    created(o),
                    json!(if selector.is_empty() {
                        "<none>".to_string()
                    } else {
                        selector.join(",")
                    }),
                ]
            }),
        ),
        ("", "nodes") => (
            vec![
                name,
                column("Status", "string", "", 0, "The status of the node"),
                column("Roles", "string", "", 0, "The roles of the node"),
                age_col,
                column("Version", "string", "", 0, "Kubelet Version reported by the node."),
                column(
                    "Internal-IP",
                    "string",
                    "",
                    1,
                    "List of addresses reachable to the node. Queried from cloud provider, if available.",
                ),
            ],
            Box::new(move |o| {
                let conds = o["status"]["conditions"].as_array().cloned().unwrap_or_default();
                let ready = conds.iter().find(|c| c["type"] == "Ready");
                let mut status = match ready {
                    Some(c) if c["status"] == "True" => "Ready".to_string(),
                    Some(_) => "NotReady".to_string(),
                    None => "Unknown".to_string(),
                };
                if o["spec"]["unschedulable"] == json!(true) {
                    status.push_str(",SchedulingDisabled");
                }
                let mut roles: Vec<String> = o["metadata"]["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| {
                        k.strip_prefix("node-role.kubernetes.io/").map(String::from)
                    })
                    .collect();
                roles.sort();
                let internal = o["status"]["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["type"] == "InternalIP")
                    .map(|a| str_of(&a["address"]))
                    .unwrap_or_default();
                vec![
                    o["metadata"]["name"].clone(),
                    json!(status),
                    json!(none_if_empty(roles.join(","))),
                    created(o),
                    json!(str_of(&o["status"]["nodeInfo"]["kubeletVersion"])),
                    json!(none_if_empty(internal)),
                ]
            }),
        ),
        (_, "events") => (
            vec![
                column("Last Seen", "string", "", 0, "Time of the last occurrence"),
                column("Type", "string", "", 0, "Type of this event (Normal, Warning)"),
                column(
                    "Reason",
                    "string",
                    "",
                    0,
                    "Short, machine understandable string that gives the reason for the transition into the object's current status.",
                ),
                column("Object", "string", "", 0, "The object this event is about."),
                column("Subobject", "string", "", 1, "The field of the object the event is about."),
                column("Source", "string", "", 1, "The component reporting this event."),
                column(
                    "Message",
                    "string",
                    "",
                    0,
                    "A human-readable description of the status of this operation.",
                ),
                column("First Seen", "string", "", 1, "Time of the first occurrence"),
                column("Count", "integer", "", 1, "The number of times this event has occurred."),
                column("Name", "string", "name", 1, NAME_DESCRIPTION),
            ],
            // Rows from the stored (core) form, as the apiserver prints
            // events of either API.
            Box::new(move |o| {
                let first = if o["firstTimestamp"].is_string() {
                    age(&o["firstTimestamp"])
                } else {
                    age(&o["eventTime"])
                };
                let mut last = if o["lastTimestamp"].is_string() {
                    age(&o["lastTimestamp"])
                } else {
                    first.clone()
                };
                let mut count = o["count"].as_i64().unwrap_or(0);
                if o["series"].is_object() {
                    last = age(&o["series"]["lastObservedTime"]);
                    count = o["series"]["count"].as_i64().unwrap_or(count);
                } else if count == 0 {
                    count = 1;
                }
                let inv = &o["involvedObject"];
                let kind = str_of(&inv["kind"]).to_lowercase();
                let target = match inv["name"].as_str() {
                    Some(n) if !n.is_empty() => format!("{kind}/{n}"),
                    _ => kind,
                };
                let mut source = str_of(&o["source"]["component"]);
                if source.is_empty() {
                    source = str_of(&o["reportingComponent"]);
                }
                let host = {
                    let h = str_of(&o["source"]["host"]);
                    if h.is_empty() { str_of(&o["reportingInstance"]) } else { h }
                };
                if !host.is_empty() {
                    source = format!("{source}, {host}");
                }
                vec![
                    json!(last),
                    o["type"].clone(),
                    o["reason"].clone(),
                    json!(target),
                    json!(str_of(&inv["fieldPath"])),
                    json!(source),
                    json!(str_of(&o["message"]).trim()),
                    json!(first),
                    json!(count),
                    o["metadata"]["name"].clone(),
                ]
            }),
        ),
        ("", "configmaps") => (
            vec![
                name,
                column("Data", "integer", "", 0, "Data contains the configuration data."),
                age_col,
            ],
            Box::new(move |o| {
                let n = o["data"].as_object().map_or(0, |m| m.len())
                    + o["binaryData"].as_object().map_or(0, |m| m.len());
                vec![o["metadata"]["name"].clone(), json!(n), created(o)]
            }),
        ),
        ("coordination.k8s.io", "leases") => (
            vec![name, column("Holder", "string", "", 0, "The holder of the lease"), age_col],
            Box::new(move |o| {
                vec![
                    o["metadata"]["name"].clone(),
                    json!(str_of(&o["spec"]["holderIdentity"])),
                    created(o),
                ]
            }),
        ),
        ("discovery.k8s.io", "endpointslices") => (
            vec![
                name,
                column("AddressType", "string", "", 0, "The IP protocol for this slice"),
                column("Ports", "string", "", 0, "The ports for this slice"),
                column("Endpoints", "string", "", 0, "First set of endpoints for this slice"),
                age_col,
            ],
            Box::new(move |o| {
                let ports: Vec<String> = o["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["port"].as_i64().map(|n| n.to_string()))
                    .collect();
                let addrs: Vec<String> = o["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                    .map(|a| str_of(&a))
                    .collect();
                vec![
                    o["metadata"]["name"].clone(),
                    o["addressType"].clone(),
                    json!(if ports.is_empty() { "<unset>".into() } else { ports.join(",") }),
                    json!(none_if_empty(addrs.join(","))),
                    created(o),
                ]
            }),
        ),
        _ => (
            vec![name, age_col],
            Box::new(move |o| vec![o["metadata"]["name"].clone(), created(o)]),
        ),
    };
    let rows = objs.iter().map(row).collect();
    (defs, rows)
}

/// The Table for `objs` of `res`. `stored` are the objects in their
/// stored form (events print from core fields), `shown` as the client
/// addressed them (what `includeObject=Object` returns).
pub fn table(
    res: &Resource,
    stored: &[Value],
    shown: &[Value],
    resource_version: Option<String>,
    include: Include,
) -> Value {
    let (defs, cells) = match res.crd.map(crd_columns) {
        Some(columns) => crd_table(&columns, stored),
        None => builtin_table(res, stored),
    };
    let rows: Vec<Value> = cells
        .into_iter()
        .zip(shown)
        .map(|(cells, o)| {
            let mut row = json!({"cells": cells});
            match include {
                Include::None => {}
                Include::Metadata => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]});
                }
                Include::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    let mut metadata = json!({});
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata,
        "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_filters_and_indexes() {
        let o = json!({"spec": {"vips": ["192.0.2.10"]}, "status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "Programmed", "status": "True"}]}});
        assert_eq!(jsonpath(&o, ".spec.vips"), vec![&json!(["192.0.2.10"])]);
        assert_eq!(printed(jsonpath(&o, ".spec.vips")[0]), "[\"192.0.2.10\"]");
        assert_eq!(jsonpath(&o, ".spec.vips[0]"), vec![&json!("192.0.2.10")]);
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Programmed\")].status"),
            vec![&json!("True")]
        );
        assert!(jsonpath(&o, ".status.summary.ports").is_empty());
    }

    #[test]
    fn ages_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(50 * 3600), "2d2h");
    }
}
