//! Every manifest under the repository's `examples/` is a valid DsrService: it passes
//! the CRD's OpenAPI schema, its CEL rules and the Rust validation.

use kube_dsr_crds::DsrService;
use kube_dsr_crds::validation::{validate_name, validate_spec};
use serde_json::Value;

use kube_dsr_apiserver::schema as apiserver;

#[test]
fn examples_validate_against_the_crd() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let crd: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("dsrservice.yaml")).unwrap())
            .unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut names: Vec<_> = std::fs::read_dir(dir.join("../examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "expected the example set, found {names:?}");
    for path in names {
        let obj: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let what = path.display();
        assert_eq!(apiserver::messages(schema, &obj), Vec::<String>::new(), "{what}");
        let svc: DsrService = serde_json::from_value(obj).unwrap();
        let mut errs = validate_name(&svc.metadata.name.clone().unwrap());
        errs.extend(validate_spec(&svc.spec));
        assert!(errs.is_empty(), "{what}: Rust validation: {errs:?}");
    }
}
