//! The streaming stitch: segments are decoded one frame at a time and each
//! overlap is blended with a cosine crossfade, so memory holds at most the next
//! overlap's frames, whatever the number or length of the segments.
//!
//! Over an overlap of n frames, output frame i = (1 − α)·prev[−n+i] + α·next[i]
//! with α = (1 − cos(π(i+1)/n)) / 2; total frames = Σ frames − Σ overlaps.

use std::collections::VecDeque;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::frames::Frame;
use super::mp4::{Mp4Reader, Mp4Writer};

/// The crossfade weight of the next segment for the i-th of n overlap frames.
pub fn crossfade_alpha(i: u32, n: u32) -> f32 {
    ((1.0 - (PI * (i + 1) as f64 / n as f64).cos()) / 2.0) as f32
}

/// One segment to stitch: its video and how many of its first frames overlap the previous one.
#[derive(Clone, Debug)]
pub struct StitchInput {
    pub path: PathBuf,
    pub overlap_before: u32,
}

/// Stitches `inputs` into `out` at `fps`; `on_frame` is called after each
/// written frame. Returns the number of frames written.
pub fn stitch(
    inputs: &[StitchInput],
    out: &Path,
    fps: u32,
    mut on_frame: impl FnMut(u32),
) -> Result<u32> {
    if inputs.is_empty() {
        bail!("nothing to stitch: no segments");
    }
    let mut writer: Option<Mp4Writer> = None;
    let mut pending: VecDeque<Frame> = VecDeque::new();
    let mut written = 0u32;
    let mut emit = |writer: &mut Mp4Writer, frame: &Frame| -> Result<()> {
        writer.write(frame)?;
        written += 1;
        on_frame(written);
        Ok(())
    };
    for (k, input) in inputs.iter().enumerate() {
        let mut reader =
            Mp4Reader::open(&input.path).with_context(|| format!("segment {k} cannot be read"))?;
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(Mp4Writer::create(out, reader.width, reader.height, fps)?),
        };
        let n = if k == 0 { 0 } else { input.overlap_before };
        let keep = inputs.get(k + 1).map(|s| s.overlap_before).unwrap_or(0) as usize;
        if pending.len() < n as usize {
            bail!(
                "segment {k} overlaps the previous one by {n} frames but only {} are left to blend",
                pending.len()
            );
        }
        let base = pending.len() - n as usize;
        for i in 0..n {
            let next = reader.next_frame()?.with_context(|| {
                format!(
                    "segment {k} ({}) ends inside its {n}-frame overlap",
                    input.path.display()
                )
            })?;
            let prev = &pending[base + i as usize];
            pending[base + i as usize] = Frame::blend(prev, &next, crossfade_alpha(i, n))
                .with_context(|| format!("segment {k} has another frame size"))?;
        }
        while let Some(frame) = reader.next_frame()? {
            pending.push_back(frame);
            while pending.len() > keep {
                let f = pending.pop_front().expect("non-empty");
                emit(w, &f)?;
            }
        }
        while pending.len() > keep {
            let f = pending.pop_front().expect("non-empty");
            emit(w, &f)?;
        }
        // The segment's decoder is gone: give its heap back before the next one.
        drop(reader);
        crate::probe::trim_heap();
    }
    let mut w = writer.context("no segment was opened")?;
    while let Some(f) = pending.pop_front() {
        emit(&mut w, &f)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_rises_from_near_zero_to_one() {
        let n = 8;
        let a: Vec<f32> = (0..n).map(|i| crossfade_alpha(i, n)).collect();
        assert!(a[0] > 0.0 && a[0] < 0.05, "{a:?}");
        assert!((a[n as usize - 1] - 1.0).abs() < 1e-6);
        assert!(a.windows(2).all(|p| p[0] < p[1]));
        assert!((crossfade_alpha(1, 4) - 0.5).abs() < 1e-6);
    }

    fn flat_segment(path: &Path, frames: u32, value: u8) {
        let mut w = Mp4Writer::create(path, 32, 32, 8).unwrap();
        for _ in 0..frames {
            w.write(&Frame {
                width: 32,
                height: 32,
                rgb: vec![value; 32 * 32 * 3],
            })
            .unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn total_is_sum_of_frames_minus_overlaps_and_the_overlap_is_blended() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.mp4");
        let b = dir.path().join("b.mp4");
        flat_segment(&a, 13, 30);
        flat_segment(&b, 13, 220);
        let out = dir.path().join("out.mp4");
        let inputs = [
            StitchInput {
                path: a,
                overlap_before: 0,
            },
            StitchInput {
                path: b,
                overlap_before: 4,
            },
        ];
        let n = stitch(&inputs, &out, 8, |_| {}).unwrap();
        assert_eq!(n, 22);
        let mut r = Mp4Reader::open(&out).unwrap();
        let mut means = Vec::new();
        while let Some(f) = r.next_frame().unwrap() {
            means.push(f.rgb.iter().map(|&v| v as f64).sum::<f64>() / f.rgb.len() as f64);
        }
        assert_eq!(means.len(), 22);
        assert!((means[0] - 30.0).abs() < 6.0, "{means:?}");
        assert!((means[21] - 220.0).abs() < 6.0, "{means:?}");
        // Frames 9..12 are the crossfade: strictly between, rising.
        let fade = &means[9..13];
        assert!(fade.windows(2).all(|p| p[0] < p[1]), "{means:?}");
        assert!(fade[0] > 35.0 && fade[3] > 200.0, "{means:?}");
    }
}
