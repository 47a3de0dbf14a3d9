//! The CRD YAML checked in under crds/ (and shipped in the helm chart's files/) must be
//! exactly what the Rust types generate: change the types, then run
//! `cargo run -- crd > crds/replicatedservices.tandem.dev.yaml` and copy it to
//! charts/tandem/files/.

use tandem_operator::crd::crd_yaml;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let generated = crd_yaml();
    for path in
        ["crds/replicatedservices.tandem.dev.yaml", "charts/tandem/files/replicatedservices.tandem.dev.yaml"]
    {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{path} is stale: regenerate it with `cargo run -- crd > {path}` (see tests/crd.rs)"
        );
    }
}

#[test]
fn the_crd_enforces_the_documented_limits() {
    let yaml = crd_yaml();
    for expected in [
        "shortNames:\n    - rsvc",
        "enum:\n                - passive\n                - active",
        "maximum: 9.0",
        "minimum: 1.0",
        "x-kubernetes-validations",
        "subresources:\n      scale:\n        labelSelectorPath: .status.selector\n        specReplicasPath: .spec.replicas\n        statusReplicasPath: .status.replicas\n      status: {}",
        "jsonPath: .status.primary",
        "jsonPath: .status.epoch",
    ] {
        assert!(yaml.contains(expected), "the CRD lacks {expected:?}");
    }
}
