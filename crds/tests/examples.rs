//! Every example TravelJob in `examples/` parses, validates and plans; the distilled and the
//! Wan2.2 ones carry the settings their comments promise.

use std::path::Path;

use kubewan_crds::spec::{Expert, Scheduler};
use kubewan_crds::{Plan, TravelJob};

fn example(name: &str) -> Plan {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let job: TravelJob =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    kubewan_crds::validate::validate(&job.spec)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Plan::from_spec(&job.spec)
}

#[test]
fn every_example_is_a_valid_job() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("traveljob") && name.ends_with(".yaml") {
            example(&name);
            count += 1;
        }
    }
    assert!(count >= 3, "{count} examples");
}

#[test]
fn the_distilled_example_runs_euler_at_4_steps_and_guidance_1() {
    let plan = example("traveljob-distilled.yaml");
    assert_eq!(
        (plan.scheduler, plan.steps, plan.guidance_scale),
        (Scheduler::Euler, 4, 1.0)
    );
    assert_eq!(plan.loras.len(), 1);
    assert_eq!(
        (plan.loras[0].scale, plan.loras[0].expert),
        (1.0, Expert::High)
    );
}

#[test]
fn the_wan22_example_gives_each_expert_its_lora_and_guidance() {
    let plan = example("traveljob-wan22.yaml");
    assert!(plan.video_model.starts_with("Wan2.2-I2V-A14B"));
    assert_eq!(plan.guidance_scale_2, Some(1.0));
    let experts: Vec<Expert> = plan.loras.iter().map(|l| l.expert).collect();
    assert_eq!(experts, [Expert::High, Expert::Low]);
}
