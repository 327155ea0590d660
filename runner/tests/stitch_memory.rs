//! The stitch streams: a video 10× longer must not raise its peak memory by
//! more than 10 %. Each stitch runs as its own `run-task` process; the peak is
//! the stitch phase's kernel high-water mark (reset at the phase start) and the
//! sampled maximum, as reported in `report-stitch.json`.

mod common;

use std::path::Path;

use common::*;
use kubewan_crds::RunReport;
use kubewan_crds::StepId;
use kubewan_runner::video::{Frame, Mp4Writer};

const W: u32 = 320;
const H: u32 = 192;
/// 31 segments (the most a job may have) of 81 frames hold 10× the frames of 3.
const FRAMES: u32 = 81;
const OVERLAP: u32 = 8;

fn segment_video(path: &Path, seed: u32) {
    let mut w = Mp4Writer::create(path, W, H, 16).unwrap();
    for t in 0..FRAMES {
        let mut f = Frame::new(W, H);
        for y in 0..H {
            for x in 0..W {
                let i = ((y * W + x) * 3) as usize;
                f.rgb[i] = ((x + t * 4 + seed) % 256) as u8;
                f.rgb[i + 1] = ((y + t * 2) % 256) as u8;
                f.rgb[i + 2] = ((x ^ y) % 256) as u8;
            }
        }
        w.write(&f).unwrap();
    }
    w.finish().unwrap();
}

/// Stitches `segments` copies of a segment in a child process; returns the stitch report.
fn stitch(segments: u32, source: &Path) -> RunReport {
    let keyframes: Vec<String> = (0..=segments).map(|i| format!("k{i}.png")).collect();
    let plan = plan(&format!(
        "keyframes: [{}]\nframes: {FRAMES}\noverlap: {OVERLAP}\nresolution: {W}x{H}\nmodel: {{name: preview}}\nenhancePrompt: {{enabled: false}}",
        keyframes.join(", ")
    ));
    let v = Volumes::new();
    std::fs::create_dir_all(v.job_dir()).unwrap();
    for i in 0..segments {
        std::fs::copy(source, v.job_dir().join(format!("segment-{i}.mp4"))).unwrap();
    }
    let out = v.run_task(&serde_json::to_string(&task(&plan, StepId::Stitch)).unwrap());
    assert!(out.status.success(), "{}", text(&out));
    let report: RunReport = serde_json::from_str(
        &std::fs::read_to_string(v.job_dir().join("report-stitch.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report.frames, Some(plan.total_frames), "{report:?}");
    let (n, w, h) =
        kubewan_runner::video::mp4::probe_video(&v.job_dir().join("travel.mp4")).unwrap();
    assert_eq!((n as u32, w, h), (plan.total_frames, W, H));
    report
}

#[test]
fn stitch_peak_memory_stays_flat_when_the_video_is_10x_longer() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("segment.mp4");
    segment_video(&source, 0);
    let short = stitch(3, &source);
    let long = stitch(31, &source);
    let peak = |r: &RunReport| {
        let p = r
            .phases
            .iter()
            .find(|p| p.name == "stitch")
            .expect("a stitch phase");
        (p.peak_rss_bytes, p.start.rss_bytes)
    };
    let (short_peak, short_start) = peak(&short);
    let (long_peak, long_start) = peak(&long);
    let (short_frames, long_frames) = (short.frames.unwrap(), long.frames.unwrap());
    let frame_bytes = (W * H * 3) as u64;
    eprintln!(
        "short: {short_frames} frames, stitch peak {} KiB (start {} KiB); long: {long_frames} frames, peak {} KiB (start {} KiB); one frame is {} KiB, all long frames would be {} MiB",
        short_peak >> 10,
        short_start >> 10,
        long_peak >> 10,
        long_start >> 10,
        frame_bytes >> 10,
        (frame_bytes * long_frames as u64) >> 20
    );
    assert!(
        long_frames >= 10 * short_frames,
        "{long_frames} vs {short_frames}"
    );
    assert!(
        long_peak as f64 <= short_peak as f64 * 1.10,
        "peak RSS grew from {short_peak} to {long_peak} bytes for a 10x longer video"
    );
}
