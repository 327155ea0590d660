//! The example in parallel mode (`chain: false`): independent first-last-frame
//! segments by the tiny Wan, crossfaded by the stitch. The keyframes go
//! there and back (01 → 02 → 01 → 02) under one prompt, so segments 0 and 2
//! have the same inputs: with one seed for every segment (`spec.seed`) they
//! must come out the same, frame for frame, while segment 1 does not.

mod common;

use common::*;
use kubewan_crds::Plan;
use kubewan_crds::status::JobPhase;
use kubewan_e2e::pipeline::{check_vlm_prompts, check_wan_segment, full_report};

#[test]
fn parallel_segments_by_wan_with_one_seed_for_all() {
    let work = tempfile::tempdir().unwrap();
    let mut job = kubewan_e2e::example();
    job.metadata.name = Some("there-and-back".into());
    job.spec.chain = false;
    job.spec.parallelism = 3;
    job.spec.keyframes = [
        "keyframes/01-sunrise.png",
        "keyframes/02-hills.png",
        "keyframes/01-sunrise.png",
        "keyframes/02-hills.png",
    ]
    .map(String::from)
    .to_vec();
    job.spec.prompts.clear();
    let run = run_job(work.path(), &job, &examples());
    assert!(run.output.status.success(), "{}", text(&run.output));
    let status = &run.status;
    assert_eq!(status.phase, JobPhase::Succeeded);
    assert_eq!(status.progress.as_deref(), Some("3/3"));
    let plan = Plan::validated(&job.spec).unwrap();
    let out = work.path().join("out");
    check_vlm_prompts(status, &plan, &out);
    for seg in &status.segments {
        check_wan_segment(seg, &plan, &out);
        let report = full_report(&out, &seg.step);
        assert_eq!(report.generation.as_ref().unwrap().seed, job.spec.seed);
        assert!(report.chain.is_none(), "independent segments have no seams");
    }

    let frames = |i: u32| {
        ffmpeg_frames(
            &run.job_dir.join(format!("segment-{i}.mp4")),
            plan.width,
            plan.height,
        )
    };
    let (s0, s1, s2) = (frames(0), frames(1), frames(2));
    assert_eq!(s0.len(), 17);
    assert!(
        s0 == s2,
        "the same inputs and the same seed make the same segment"
    );
    // Segment 1 travels the other way: other inputs, other frames (close, as
    // the random weights mostly draw the seed's noise).
    let apart = mean_abs_diff(&s0[8], &s1[8]);
    assert!(s0 != s1 && apart > 1.0, "segment 1 differs: {apart:.1}");

    // 3 segments of 17 frames, 2 crossfaded overlaps of 4: 43 frames.
    assert_eq!(plan.total_frames, 43);
    let (ff_frames, w, h, codec) = ffprobe(&run.job_dir.join("travel.mp4"));
    assert_eq!((ff_frames, w, h, codec.as_str()), (43, 160, 96, "h264"));
}
