//! The OpenAPI documents kubectl reads: `/openapi/v3` (a discovery map of
//! group-versions, each at `/openapi/v3/<api|apis/g>/<v>`) and
//! `/openapi/v2` (one Swagger 2.0 document, JSON only). Shaped as the
//! apiserver publishes them: per kind a schema named after its reversed
//! group (`io.kubedsr.v1alpha1.DsrService`) carrying
//! `x-kubernetes-group-version-kind`, and per path the operations with
//! their query parameters and, on PATCH, the accepted patch types. kubectl
//! uses them to decide that the server validates fields itself
//! (`fieldValidation` on PATCH), to pick the patch type for client-side
//! apply, and for `kubectl explain`. Built-in kinds' schemas come from
//! k8s-openapi, custom resources' from the checked-in CRD files.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::api::{coordination, core, discovery, events};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta};
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::resources::{RESOURCES, Resource, crd_schema};

const REF: &str = "#/components/schemas/";

/// `kubedsr.io` → `io.kubedsr`; the core group is `io.k8s.api.core`.
fn schema_prefix(res: &Resource) -> String {
    match res.group {
        "" => format!("io.k8s.api.core.{}", res.version),
        g if g.ends_with(".k8s.io") => {
            format!("io.k8s.api.{}.{}", g.trim_end_matches(".k8s.io"), res.version)
        }
        g => {
            let mut parts: Vec<&str> = g.split('.').collect();
            parts.reverse();
            format!("{}.{}", parts.join("."), res.version)
        }
    }
}

fn gvk(res: &Resource, kind: &str) -> Value {
    json!({"group": res.group, "version": res.version, "kind": kind})
}

/// Component schemas of built-in kinds (k8s-openapi's), ObjectMeta and
/// ListMeta and everything they refer to.
fn builtin_schemas() -> Map<String, Value> {
    let mut generator = SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<ObjectMeta>();
    generator.subschema_for::<ListMeta>();
    generator.subschema_for::<core::v1::Namespace>();
    generator.subschema_for::<core::v1::Node>();
    generator.subschema_for::<core::v1::Pod>();
    generator.subschema_for::<core::v1::Service>();
    generator.subschema_for::<core::v1::Event>();
    generator.subschema_for::<core::v1::ConfigMap>();
    generator.subschema_for::<events::v1::Event>();
    generator.subschema_for::<coordination::v1::Lease>();
    generator.subschema_for::<discovery::v1::EndpointSlice>();
    let mut defs = generator.take_definitions(true);
    defs.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(),
        json!({"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."}),
    );
    defs
}

/// A custom resource's schema as the apiextensions apiserver publishes it:
/// the CRD's schema with `apiVersion`, `kind` and `metadata` filled in.
fn crd_resource_schema(res: &Resource, crd: &str) -> Value {
    let mut s = crd_schema(crd);
    s["properties"]["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"});
    s["properties"]["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"});
    s["properties"]["metadata"] = json!({"allOf": [{"$ref": format!("{REF}io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")}], "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"});
    s["type"] = json!("object");
    s["x-kubernetes-group-version-kind"] = json!([gvk(res, res.kind)]);
    s
}

fn param(name: &str, location: &str, description: &str) -> Value {
    json!({"name": name, "in": location, "description": description,
        "required": location == "path", "schema": {"type": "string", "uniqueItems": true}})
}

fn operation(res: &Resource, action: &str, verb: &str, kind_ref: &str, params: &[Value]) -> Value {
    let id = format!("{verb}{}", res.kind);
    let mut op = json!({
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": kind_ref}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(res, res.kind),
    });
    if matches!(action, "post" | "put" | "patch") {
        let body_ref = if action == "patch" {
            format!("{REF}io.k8s.apimachinery.pkg.apis.meta.v1.Patch")
        } else {
            kind_ref.to_string()
        };
        let mut types: Vec<&str> = if action == "patch" {
            vec![
                "application/apply-patch+yaml",
                "application/json-patch+json",
                "application/merge-patch+json",
            ]
        } else {
            vec!["*/*"]
        };
        // Strategic merge patch: built-in kinds only, as on the apiserver.
        if action == "patch" && res.crd.is_none() {
            types.push("application/strategic-merge-patch+json");
        }
        let content: Map<String, Value> = types
            .into_iter()
            .map(|t| (t.to_string(), json!({"schema": {"$ref": body_ref}})))
            .collect();
        op["requestBody"] = json!({"content": content, "required": true});
    }
    op
}

/// The paths of one resource: collection, item and (if any) status.
fn resource_paths(res: &Resource, kind_ref: &str, list_ref: &str, paths: &mut Map<String, Value>) {
    let prefix = if res.group.is_empty() {
        format!("/api/{}", res.version)
    } else {
        format!("/apis/{}/{}", res.group, res.version)
    };
    let ns = if res.namespaced { "/namespaces/{namespace}" } else { "" };
    let collection = format!("{prefix}{ns}/{}", res.plural);
    let mut common =
        vec![param("pretty", "query", "If 'true', then the output is pretty printed.")];
    if res.namespaced {
        common.push(param(
            "namespace",
            "path",
            "object name and auth scope, such as for teams and projects",
        ));
    }
    let dry_run = param(
        "dryRun",
        "query",
        "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed",
    );
    let manager = param(
        "fieldManager",
        "query",
        "fieldManager is a name associated with the actor or entity that is making these changes.",
    );
    let validation = param(
        "fieldValidation",
        "query",
        "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict",
    );
    let force = param(
        "force",
        "query",
        "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people.",
    );
    let write = [dry_run.clone(), manager.clone(), validation.clone()];
    let mut patch = write.to_vec();
    patch.push(force);
    paths.insert(
        collection.clone(),
        json!({
            "get": operation(res, "list", "list", list_ref, &[param("labelSelector", "query", "A selector to restrict the list of returned objects by their labels."), param("fieldSelector", "query", "A selector to restrict the list of returned objects by their fields."), param("watch", "query", "Watch for changes to the described resources.")]),
            "post": operation(res, "post", "create", kind_ref, &write),
            "delete": operation(res, "deletecollection", "deletecollection", list_ref, std::slice::from_ref(&dry_run)),
            "parameters": common.clone(),
        }),
    );
    let mut item_params = common;
    item_params.push(param("name", "path", &format!("name of the {}", res.kind)));
    paths.insert(
        format!("{collection}/{{name}}"),
        json!({
            "get": operation(res, "get", "read", kind_ref, &[]),
            "put": operation(res, "put", "replace", kind_ref, &write),
            "patch": operation(res, "patch", "patch", kind_ref, &patch),
            "delete": operation(res, "delete", "delete", kind_ref, std::slice::from_ref(&dry_run)),
            "parameters": item_params.clone(),
        }),
    );
    if res.status {
        paths.insert(
            format!("{collection}/{{name}}/status"),
            json!({
                "get": operation(res, "get", "readStatus", kind_ref, &[]),
                "put": operation(res, "put", "replaceStatus", kind_ref, &write),
                "patch": operation(res, "patch", "patchStatus", kind_ref, &patch),
                "parameters": item_params,
            }),
        );
    }
}

/// The OpenAPI v3 document of one group-version (`None` if not served).
pub fn v3_group_version(group: &str, version: &str) -> Option<Value> {
    let served: Vec<&Resource> =
        RESOURCES.iter().filter(|r| r.group == group && r.version == version).collect();
    if served.is_empty() {
        return None;
    }
    let builtin = builtin_schemas();
    let mut schemas = Map::new();
    let mut paths = Map::new();
    // Meta schemas every document carries, with what they refer to.
    let mut wanted: Vec<String> = vec![
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into(),
        "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta".into(),
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(),
    ];
    for res in served {
        let name = format!("{}.{}", schema_prefix(res), res.kind);
        let list = format!("{name}List");
        let schema = match res.crd {
            Some(crd) => crd_resource_schema(res, crd),
            None => {
                let mut s =
                    builtin.get(&name).cloned().unwrap_or_else(|| json!({"type": "object"}));
                s["x-kubernetes-group-version-kind"] = json!([gvk(res, res.kind)]);
                s
            }
        };
        collect_refs(&schema, &mut wanted);
        schemas.insert(name.clone(), schema);
        schemas.insert(
            list.clone(),
            json!({
                "type": "object", "required": ["items"],
                "description": format!("{}List is a list of {}", res.kind, res.kind),
                "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "items": {"type": "array", "items": {"$ref": format!("{REF}{name}")}},
                    "metadata": {"allOf": [{"$ref": format!("{REF}io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta")}]},
                },
                "x-kubernetes-group-version-kind": [gvk(res, &format!("{}List", res.kind))],
            }),
        );
        resource_paths(res, &format!("{REF}{name}"), &format!("{REF}{list}"), &mut paths);
    }
    while let Some(name) = wanted.pop() {
        if schemas.contains_key(&name) {
            continue;
        }
        if let Some(s) = builtin.get(&name) {
            collect_refs(s, &mut wanted);
            schemas.insert(name, s.clone());
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str)
                && let Some(name) = r.strip_prefix(REF)
            {
                out.push(name.to_string());
            }
            m.values().for_each(|c| collect_refs(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| collect_refs(c, out)),
        _ => {}
    }
}

fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut gvs = Vec::new();
    for r in RESOURCES {
        if !gvs.contains(&(r.group, r.version)) {
            gvs.push((r.group, r.version));
        }
    }
    gvs
}

fn path_of(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// `/openapi/v3`: where each group-version's document is, with a hash of
/// its content (clients cache documents by it).
pub fn v3_root() -> Value {
    let mut paths = BTreeMap::new();
    for (g, v) in group_versions() {
        let doc = v3_group_version(g, v).expect("served");
        let mut h = DefaultHasher::new();
        doc.to_string().hash(&mut h);
        let p = path_of(g, v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={:016X}", h.finish())}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v2`: every served kind in one Swagger 2.0 document.
pub fn v2() -> Value {
    let mut definitions = Map::new();
    let mut paths = Map::new();
    for (g, v) in group_versions() {
        let doc = v3_group_version(g, v).expect("served");
        let text = doc.to_string().replace(REF, "#/definitions/");
        let doc: Value = serde_json::from_str(&text).expect("re-parses");
        if let Some(s) = doc["components"]["schemas"].as_object() {
            definitions.extend(s.clone());
        }
        if let Some(p) = doc["paths"].as_object() {
            for (path, item) in p {
                let mut item = item.clone();
                // Swagger 2.0 parameters carry their type inline, bodies
                // are `in: body` parameters, PATCH types are `consumes`.
                for op in item.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
                    let Some(o) = op.as_object_mut() else { continue };
                    if let Some(body) = o.remove("requestBody") {
                        let types: Vec<&String> = body["content"]
                            .as_object()
                            .map(|c| c.keys().collect())
                            .unwrap_or_default();
                        o.insert("consumes".into(), json!(types));
                    }
                    if let Some(r) = o.get_mut("responses") {
                        let schema = r["200"]["content"]["application/json"]["schema"].clone();
                        *r = json!({"200": {"description": "OK", "schema": schema}});
                    }
                }
                paths.insert(path.clone(), item);
            }
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "definitions": definitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_documents_name_the_kind_and_accept_field_validation() {
        let doc = v3_group_version("kubedsr.io", "v1alpha1").unwrap();
        let svc = &doc["components"]["schemas"]["io.kubedsr.v1alpha1.DsrService"];
        assert_eq!(svc["x-kubernetes-group-version-kind"][0]["kind"], "DsrService");
        assert!(svc["properties"]["spec"]["properties"]["ports"]["items"].is_object());
        let patch = &doc["paths"]["/apis/kubedsr.io/v1alpha1/namespaces/{namespace}/dsrservices/{name}"]
            ["patch"];
        let params = patch["parameters"].as_array().unwrap();
        assert!(params.iter().any(|p| p["name"] == "fieldValidation" && p["in"] == "query"));
        assert!(
            patch["requestBody"]["content"].get("application/strategic-merge-patch+json").is_none()
        );
        assert!(
            doc["components"]["schemas"]["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]
                .is_object()
        );
        let core = v3_group_version("", "v1").unwrap();
        let ns = &core["components"]["schemas"]["io.k8s.api.core.v1.Namespace"];
        assert_eq!(ns["x-kubernetes-group-version-kind"][0]["kind"], "Namespace");
        assert!(v3_root()["paths"]["apis/kubedsr.io/v1alpha1"]["serverRelativeURL"].is_string());
    }
}
