//! The checked-in CRD YAML (crds/traveljob.yaml and the Helm chart's copy)
//! must equal what the types generate: regenerate with
//! `cargo run -q -p kubewan-crds --bin crdgen > crds/traveljob.yaml` and copy it
//! to `charts/kubewan/crds/traveljob.yaml`.

use std::path::Path;

use kube::CustomResourceExt;

fn generated() -> String {
    serde_saphyr::to_string(&kubewan_crds::TravelJob::crd()).expect("the CRD serialises")
}

fn check(relative: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        on_disk == generated(),
        "{} drifted from TravelJob::crd(); regenerate it with \
         `cargo run -q -p kubewan-crds --bin crdgen > crds/traveljob.yaml && \
         cp crds/traveljob.yaml charts/kubewan/crds/traveljob.yaml`",
        path.display()
    );
}

#[test]
fn crds_traveljob_yaml_matches_the_types() {
    check("traveljob.yaml");
}

#[test]
fn the_chart_crd_matches_the_types() {
    check("../charts/kubewan/crds/traveljob.yaml");
}
