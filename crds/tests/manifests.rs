//! DsrService manifests, valid and invalid, checked against the checked-in
//! CRD the way the apiserver checks them: first the OpenAPI schema (types,
//! bounds, enums, required fields, unknown fields as under strict field
//! validation, list uniqueness), then the CEL rules, evaluated by a CEL
//! library with the Kubernetes extension functions. Each invalid manifest
//! must fail with the message the user will see; each manifest is also run
//! through the Rust validation, which must agree.

use kube_dsr_crds::validation::{validate_name, validate_spec};
use kube_dsr_crds::{DsrService, messages};
use serde_json::Value;

use kube_dsr_apiserver::schema as apiserver;

fn openapi_schema() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dsrservice.yaml");
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// A manifest from the table, with `SPEC` replaced by `spec`.
fn manifest(name: &str, spec: &str) -> Value {
    let yaml = format!(
        "apiVersion: kubedsr.io/v1alpha1\nkind: DsrService\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{}",
        indent(spec)
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("table YAML for {name}: {e}\n{yaml}"))
}

fn indent(s: &str) -> String {
    s.trim_matches('\n').lines().map(|l| format!("  {l}\n")).collect()
}

/// Messages from the Rust validation, for objects that deserialize.
fn rust_messages(obj: &Value) -> Option<Vec<String>> {
    let svc: DsrService = serde_json::from_value(obj.clone()).ok()?;
    let mut errs = validate_name(obj["metadata"]["name"].as_str().unwrap());
    errs.extend(validate_spec(&svc.spec));
    Some(errs.into_iter().map(|e| e.message).collect())
}

const BASE: &str = "
vips: [192.0.2.10]
ports: [{port: 80}]
selector: {app: web}
";

/// (case, metadata.name, spec, expected message fragment or None when valid)
fn table() -> Vec<(&'static str, String, String, Option<&'static str>)> {
    let n = |s: &str| s.to_string();
    let with = |extra: &str| format!("{BASE}{extra}");
    vec![
        // Valid
        ("minimal", n("web"), n(BASE), None),
        (
            "dual stack",
            n("web"),
            n(
                "vips: [192.0.2.10, '2001:db8::10']\nports: [{port: 443, name: https}]\nselector: {app: web}",
            ),
            None,
        ),
        (
            "ipv6 only",
            n("web"),
            n("vips: ['2001:db8::10']\nports: [{port: 80}]\nselector: {app: web}"),
            None,
        ),
        (
            "udp and tcp on one port",
            n("dns"),
            n(
                "vips: [192.0.2.53]\nports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\nselector: {app: dns}",
            ),
            None,
        ),
        (
            "static backends",
            n("ext"),
            n(
                "vips: [192.0.2.10]\nports: [{port: 80}]\nbackends: [{address: 192.0.2.21}, {address: 192.0.2.22}]",
            ),
            None,
        ),
        (
            "dual-stack static backends",
            n("ext"),
            n(
                "vips: [192.0.2.10, '2001:db8::10']\nports: [{port: 80}]\nbackends: [{address: 192.0.2.21}, {address: '2001:db8::21'}]",
            ),
            None,
        ),
        (
            "routed announcement",
            n("web"),
            with("ingress: {announcement: None, nodeSelector: {kubedsr.io/ingress: 'true'}}"),
            None,
        ),
        (
            "interface and table size",
            n("web"),
            with("ingress: {interface: eth1}\nhashing: {tableSize: 4093}"),
            None,
        ),
        ("unmanaged loopback", n("web"), with("backendSetup: {manageLoopback: false}"), None),
        (
            "port 65535",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 65535}]\nselector: {app: web}"),
            None,
        ),
        ("63-character name", "a".repeat(63), n(BASE), None),
        // Invalid: schema
        (
            "targetPort is not a field",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 80, targetPort: 8080}]\nselector: {app: web}"),
            Some("unknown field \"spec.ports[0].targetPort\""),
        ),
        (
            "port 0",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 0}]\nselector: {app: web}"),
            Some("should be greater than or equal to 1"),
        ),
        (
            "port 65536",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 65536}]\nselector: {app: web}"),
            Some("should be less than or equal to 65535"),
        ),
        (
            "protocol SCTP",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 80, protocol: SCTP}]\nselector: {app: web}"),
            Some("Unsupported value: \"SCTP\""),
        ),
        (
            "no ports",
            n("web"),
            n("vips: [192.0.2.10]\nports: []\nselector: {app: web}"),
            Some("should have at least 1 items"),
        ),
        (
            "no vips: a pool address is asked for",
            n("web"),
            n("vips: []\nports: [{port: 80}]\nselector: {app: web}"),
            None,
        ),
        (
            "pool families, dual-stack",
            n("web"),
            n("ipFamilies: [IPv6, IPv4]\nports: [{port: 80}]\nselector: {app: web}"),
            None,
        ),
        (
            "pool families next to written vips",
            n("web"),
            n("vips: [192.0.2.10]\nipFamilies: [IPv4]\nports: [{port: 80}]\nselector: {app: web}"),
            Some(messages::IP_FAMILIES_WITH_VIPS),
        ),
        (
            "a pool family twice",
            n("web"),
            n("ipFamilies: [IPv4, IPv4]\nports: [{port: 80}]\nselector: {app: web}"),
            Some(messages::IP_FAMILIES_DUPLICATE),
        ),
        (
            "three vips",
            n("web"),
            n(
                "vips: [192.0.2.10, '2001:db8::10', 192.0.2.11]\nports: [{port: 80}]\nselector: {app: web}",
            ),
            Some("must have at most 2 items"),
        ),
        (
            "vips missing: a pool address is asked for",
            n("web"),
            n("ports: [{port: 80}]\nselector: {app: web}"),
            None,
        ),
        (
            "announcement BGP",
            n("web"),
            with("ingress: {announcement: BGP}"),
            Some("Unsupported value: \"BGP\""),
        ),
        (
            "duplicate vip",
            n("web"),
            n("vips: [192.0.2.10, 192.0.2.10]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("Duplicate value"),
        ),
        (
            "port as string",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: http}]\nselector: {app: web}"),
            Some("must be of type integer"),
        ),
        // Invalid: CEL
        (
            "vip not an address",
            n("web"),
            n("vips: [web.example.com]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("each VIP must be a valid IPv4 or IPv6 address"),
        ),
        (
            "vip not canonical",
            n("web"),
            n("vips: ['2001:DB8::10']\nports: [{port: 80}]\nselector: {app: web}"),
            Some("canonical form"),
        ),
        (
            "vip unspecified",
            n("web"),
            n("vips: [0.0.0.0]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("must not be the unspecified address"),
        ),
        (
            "vip loopback",
            n("web"),
            n("vips: [127.0.0.1]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("must not be a loopback address"),
        ),
        (
            "vip ipv6 loopback",
            n("web"),
            n("vips: ['::1']\nports: [{port: 80}]\nselector: {app: web}"),
            Some("must not be a loopback address"),
        ),
        (
            "vip link-local",
            n("web"),
            n("vips: [169.254.10.1]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("must not be link-local"),
        ),
        (
            "vip ipv6 link-local",
            n("web"),
            n("vips: ['fe80::1']\nports: [{port: 80}]\nselector: {app: web}"),
            Some("must not be link-local"),
        ),
        (
            "vip multicast",
            n("web"),
            n("vips: [239.1.2.3]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("must not be a multicast or broadcast address"),
        ),
        (
            "two ipv4 vips",
            n("web"),
            n("vips: [192.0.2.10, 192.0.2.11]\nports: [{port: 80}]\nselector: {app: web}"),
            Some("at most one IPv4 and one IPv6 VIP"),
        ),
        (
            "duplicate port and protocol",
            n("web"),
            n(
                "vips: [192.0.2.10]\nports: [{port: 80, name: a}, {port: 80, name: b}]\nselector: {app: web}",
            ),
            Some("each (port, protocol) pair may appear only once"),
        ),
        (
            "duplicate port names",
            n("web"),
            n(
                "vips: [192.0.2.10]\nports: [{port: 80, name: web}, {port: 81, name: web}]\nselector: {app: web}",
            ),
            Some("port names must be unique"),
        ),
        (
            "bad port name",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 80, name: HTTP_1}]\nselector: {app: web}"),
            Some("port name must be a DNS label"),
        ),
        (
            "selector and backends",
            n("web"),
            n(
                "vips: [192.0.2.10]\nports: [{port: 80}]\nselector: {app: web}\nbackends: [{address: 192.0.2.21}]",
            ),
            Some("set exactly one of selector"),
        ),
        (
            "neither selector nor backends",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 80}]"),
            Some("set exactly one of selector"),
        ),
        (
            "empty selector",
            n("web"),
            n("vips: [192.0.2.10]\nports: [{port: 80}]\nselector: {}"),
            Some("an empty selector would select every pod"),
        ),
        (
            "backend not an address",
            n("ext"),
            n("vips: [192.0.2.10]\nports: [{port: 80}]\nbackends: [{address: db-1}]"),
            Some("backend address must be a valid IPv4 or IPv6 address"),
        ),
        (
            "backend loopback",
            n("ext"),
            n("vips: [192.0.2.10]\nports: [{port: 80}]\nbackends: [{address: 127.0.0.1}]"),
            Some("backend address must be a unicast address"),
        ),
        (
            "backend of other family",
            n("ext"),
            n("vips: [192.0.2.10]\nports: [{port: 80}]\nbackends: [{address: '2001:db8::21'}]"),
            Some("every static backend needs a VIP of the same address family"),
        ),
        (
            "table size not prime",
            n("web"),
            with("hashing: {tableSize: 65536}"),
            Some("tableSize must be one of 251, 1021"),
        ),
        (
            "interface with slash",
            n("web"),
            with("ingress: {interface: 'eth0/1'}"),
            Some("interface must be a Linux interface name"),
        ),
        (
            "name too long",
            "a".repeat(64),
            n(BASE),
            Some("metadata.name must be at most 63 characters"),
        ),
    ]
}

#[test]
fn manifest_table_against_generated_crd() {
    let schema = openapi_schema();
    let cases = table();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (case, name, spec, want) in &cases {
        let obj = manifest(name, spec);
        let got = apiserver::messages(&schema, &obj);
        match want {
            None if !got.is_empty() => failures.push(format!("{case}: refused: {got:?}")),
            Some(frag) if !got.iter().any(|m| m.contains(frag)) => {
                failures.push(format!("{case}: want {frag:?}, got {got:?}"))
            }
            _ => {}
        }
        // The Rust rules agree: same verdict, and for CEL-level failures the
        // same message (schema-level ones are worded by the apiserver).
        // Unknown fields are the schema's business alone: the Rust types
        // ignore them so that an older operator can read a newer object.
        let unknown_field = got.iter().any(|m| m.starts_with("unknown field"));
        if let Some(rust) = rust_messages(&obj).filter(|_| !unknown_field) {
            match want {
                None if !rust.is_empty() => {
                    failures.push(format!("{case}: Rust refused: {rust:?}"))
                }
                Some(_) if rust.is_empty() => failures.push(format!("{case}: Rust accepted")),
                Some(_) => {
                    let schema_errs = apiserver::validate(&schema, &obj);
                    for m in got.iter().filter(|m| !schema_errs.contains(m)) {
                        if !rust.contains(m) {
                            failures.push(format!("{case}: Rust lacks {m:?}, has {rust:?}"));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn node_reports_are_named_after_their_node() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dsrnodereport.yaml");
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let report = |name: &str, node: &str| -> Value {
        serde_yaml::from_str(&format!(
            "apiVersion: kubedsr.io/v1alpha1\nkind: DsrNodeReport\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  ingress:\n  - {{namespace: default, name: web, observedGeneration: 2, programmedVips: [192.0.2.10], announcedVips: [192.0.2.10], backends: 3}}\n  backends:\n  - {{podUID: u1, namespace: default, name: web-1, configuredVips: [192.0.2.10]}}\n"
        ))
        .unwrap()
    };
    assert_eq!(apiserver::messages(schema, &report("node-a", "node-a")), Vec::<String>::new());
    let wrong = apiserver::messages(schema, &report("node-a", "node-b"));
    assert!(
        wrong.iter().any(|m| m.contains("metadata.name must equal spec.nodeName")),
        "{wrong:?}"
    );
    let parsed: kube_dsr_crds::DsrNodeReport =
        serde_json::from_value(report("node-a", "node-a")).unwrap();
    assert!(parsed.spec.vip_configured("u1", "192.0.2.10"));
    assert!(!parsed.spec.vip_configured("u2", "192.0.2.10"));
    assert_eq!(parsed.spec.ingress_for("default", "web").unwrap().observed_generation, 2);
}
