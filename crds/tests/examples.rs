//! Every manifest under the repository's `examples/` is valid: a DsrService
//! or DsrVipPool passes its CRD's OpenAPI schema, its CEL rules and the Rust
//! validation; a Service passes the apiserver's Service validation (as the
//! stand-in words it) and is one kube-dsr serves.

use kube_dsr_crds::validation::{validate_name, validate_spec};
use kube_dsr_crds::{DsrService, DsrVipPool, LOAD_BALANCER_CLASS};
use serde::Deserialize;
use serde_json::Value;

use kube_dsr_apiserver::schema as apiserver;

fn schema(dir: &std::path::Path, file: &str) -> Value {
    let crd: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn examples_validate_against_the_crd() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let service_schema = schema(dir, "dsrservice.yaml");
    let pool_schema = schema(dir, "dsrvippool.yaml");
    let mut names: Vec<_> = std::fs::read_dir(dir.join("../examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 8, "expected the example set, found {names:?}");
    let mut kinds = Vec::new();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj = Value::deserialize(doc).unwrap();
            let what = path.display();
            let kind = obj["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "DsrService" => {
                    assert_eq!(
                        apiserver::messages(&service_schema, &obj),
                        Vec::<String>::new(),
                        "{what}"
                    );
                    let svc: DsrService = serde_json::from_value(obj).unwrap();
                    let mut errs = validate_name(&svc.metadata.name.clone().unwrap());
                    errs.extend(validate_spec(&svc.spec));
                    assert!(errs.is_empty(), "{what}: Rust validation: {errs:?}");
                }
                "DsrVipPool" => {
                    assert_eq!(
                        apiserver::messages(&pool_schema, &obj),
                        Vec::<String>::new(),
                        "{what}"
                    );
                    let pool: DsrVipPool = serde_json::from_value(obj).unwrap();
                    assert!(pool.spec.blocks().is_ok(), "{what}: {:?}", pool.spec.blocks());
                }
                "Service" => {
                    let mut obj = obj;
                    kube_dsr_apiserver::service::defaults(
                        &mut obj,
                        &Default::default(),
                        &Default::default(),
                    );
                    assert_eq!(
                        kube_dsr_apiserver::service::validate(&obj, None),
                        Vec::<String>::new(),
                        "{what}"
                    );
                    assert_eq!(obj["spec"]["loadBalancerClass"], LOAD_BALANCER_CLASS, "{what}");
                    for p in obj["spec"]["ports"].as_array().unwrap() {
                        assert_eq!(
                            p["targetPort"], p["port"],
                            "{what}: DSR cannot translate ports"
                        );
                    }
                }
                other => panic!("{what}: unexpected kind {other:?}"),
            }
            kinds.push(kind);
        }
    }
    for k in ["DsrService", "DsrVipPool", "Service"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} example");
    }
}
