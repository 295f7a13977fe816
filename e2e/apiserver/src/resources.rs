//! The kinds the stand-in serves, their URLs and discovery documents.

use serde_json::{Value, json};

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: the main resource ignores status
    /// changes, `/status` changes only status.
    pub status: bool,
    pub short_names: &'static [&'static str],
    /// Categories (`kubectl get all` lists the `all` category).
    pub categories: &'static [&'static str],
    /// The CRD file whose schema (and CEL rules) objects must pass.
    pub crd: Option<&'static str>,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `dsrservices.kubedsr.io`, as the apiserver names a
    /// resource in its messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Pod` or `DsrService.kubedsr.io`, as validation messages name a kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

const fn r(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> Resource {
    Resource {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        status,
        short_names: &[],
        categories: &[],
        crd: None,
    }
}

pub const DSRSERVICE_CRD: &str = include_str!("../../../crds/dsrservice.yaml");
pub const DSRNODEREPORT_CRD: &str = include_str!("../../../crds/dsrnodereport.yaml");
pub const DSRVIPPOOL_CRD: &str = include_str!("../../../crds/dsrvippool.yaml");

pub static RESOURCES: &[Resource] = &[
    // Short names and categories as the apiserver's discovery gives them.
    Resource {
        short_names: &["ns"],
        ..r("", "v1", "namespaces", "namespace", "Namespace", false, true)
    },
    Resource { short_names: &["no"], ..r("", "v1", "nodes", "node", "Node", false, true) },
    Resource {
        short_names: &["po"],
        categories: &["all"],
        ..r("", "v1", "pods", "pod", "Pod", true, true)
    },
    Resource {
        short_names: &["svc"],
        categories: &["all"],
        ..r("", "v1", "services", "service", "Service", true, true)
    },
    Resource { short_names: &["ev"], ..r("", "v1", "events", "event", "Event", true, false) },
    Resource {
        short_names: &["cm"],
        ..r("", "v1", "configmaps", "configmap", "ConfigMap", true, false)
    },
    Resource {
        short_names: &["ev"],
        ..r("events.k8s.io", "v1", "events", "event", "Event", true, false)
    },
    r("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, false),
    r("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, false),
    Resource {
        short_names: &["dsrsvc"],
        categories: &["kubedsr"],
        crd: Some(DSRSERVICE_CRD),
        ..r("kubedsr.io", "v1alpha1", "dsrservices", "dsrservice", "DsrService", true, true)
    },
    Resource {
        short_names: &["dsrnode"],
        categories: &["kubedsr"],
        crd: Some(DSRNODEREPORT_CRD),
        ..r(
            "kubedsr.io",
            "v1alpha1",
            "dsrnodereports",
            "dsrnodereport",
            "DsrNodeReport",
            false,
            false,
        )
    },
    Resource {
        short_names: &["dsrpool"],
        categories: &["kubedsr"],
        crd: Some(DSRVIPPOOL_CRD),
        ..r("kubedsr.io", "v1alpha1", "dsrvippools", "dsrvippool", "DsrVipPool", false, true)
    },
];

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The OpenAPI v3 schema of a CRD file's first version.
pub fn crd_schema(crd: &str) -> Value {
    let doc: Value = serde_yaml::from_str(crd).expect("checked-in CRD is YAML");
    doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// A CRD file's `additionalPrinterColumns` (first version).
pub fn crd_columns(crd: &str) -> Vec<Value> {
    let doc: Value = serde_yaml::from_str(crd).expect("checked-in CRD is YAML");
    doc["spec"]["versions"][0]["additionalPrinterColumns"].as_array().cloned().unwrap_or_default()
}

fn resource_list(group_version: &str, group: &str, version: &str) -> Value {
    let mut list = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let verbs =
            ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
        list.push(json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": verbs,
            "shortNames": r.short_names,
            "categories": r.categories,
        }));
        if r.status {
            list.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
}

/// `/api/v1` or `/apis/<group>/<version>`; `None` for a group/version not served.
pub fn discovery_resources(group: &str, version: &str) -> Option<Value> {
    if !RESOURCES.iter().any(|r| r.group == group && r.version == version) {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(resource_list(&gv, group, version))
}

pub fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
}

fn groups() -> Vec<(&'static str, &'static str)> {
    let mut gs: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !gs.contains(&(r.group, r.version)) {
            gs.push((r.group, r.version));
        }
    }
    gs
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    let (g, v) = groups().into_iter().find(|(g, _)| *g == group)?;
    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv}),
    )
}
