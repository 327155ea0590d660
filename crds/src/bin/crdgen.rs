//! Prints the TravelJob CustomResourceDefinition as YAML (checked in at
//! `crds/traveljob.yaml` and in the Helm chart).

use kube::CustomResourceExt;

fn main() {
    let crd = kubewan_crds::TravelJob::crd();
    print!(
        "{}",
        serde_saphyr::to_string(&crd).expect("the CRD serialises")
    );
}
