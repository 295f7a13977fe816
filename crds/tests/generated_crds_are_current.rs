//! The checked-in CRD files must be exactly what `crdgen` prints, so that a
//! change to the Rust types cannot ship without its YAML (and vice versa).

use kube_dsr_crds::Crd;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for crd in Crd::ALL {
        let path = dir.join(crd.file_name());
        let checked_in = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let generated = crd.yaml().expect("CRD renders");
        assert!(
            checked_in == generated,
            "{} is stale: regenerate with `cargo run -p kube-dsr-crds --bin crdgen -- --write crds`",
            path.display()
        );
    }
}

#[test]
fn dsrservice_crd_is_structural_with_rules_and_columns() {
    let yaml = Crd::DsrService.yaml().unwrap();
    let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let version = &crd["spec"]["versions"][0];
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["VIPs", "Allocated", "Ports", "Backends", "Programmed", "Age"]);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(spec["properties"]["ports"]["items"]["properties"].get("targetPort").is_none());
    assert!(spec["x-kubernetes-validations"].as_array().unwrap().len() >= 2);
    assert!(!yaml.contains("x-kubernetes-preserve-unknown-fields"), "schema must stay structural");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "dsrsvc");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
}
