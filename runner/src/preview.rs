//! The built-in `preview` video model: no checkpoints, no GPU. It crossfades
//! from the start keyframe (or, in chained mode, from the previous segment's
//! tail frames, which it repeats first like a real model's guide frames) to the
//! end keyframe. Everything it produces is labelled preview.

use anyhow::{Result, bail};

use crate::video::Frame;

/// Phase name of the preview's frame generation (a real model has text_encode,
/// denoise and vae_decode instead).
pub const PREVIEW_PHASE: &str = "preview_generate";

fn smoothstep(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The segment's `frames` frames. Without guide frames: frame 0 is `start`,
/// the last is `end`. With guide frames (the previous segment's last frames):
/// they come first unchanged, then the picture fades from the last of them to `end`.
pub fn generate(
    start: &Frame,
    end: &Frame,
    frames: u32,
    guide: Option<&[Frame]>,
    mut on_frame: impl FnMut(),
) -> Result<Vec<Frame>> {
    if frames < 2 {
        bail!("a segment needs at least 2 frames, got {frames}");
    }
    let guide = guide.unwrap_or(&[]);
    if guide.len() >= frames as usize {
        bail!(
            "{} guide frames leave no frames to generate in a {frames}-frame segment",
            guide.len()
        );
    }
    let mut out = Vec::with_capacity(frames as usize);
    for g in guide {
        if (g.width, g.height) != (end.width, end.height) {
            bail!(
                "guide frames are {}x{}, the segment is {}x{}",
                g.width,
                g.height,
                end.width,
                end.height
            );
        }
        out.push(g.clone());
        on_frame();
    }
    let from = guide.last().unwrap_or(start);
    // Without guides frame 0 is the start itself; with guides the fade starts
    // one step after the last guide frame.
    let (first, steps) = if guide.is_empty() {
        (0, frames - 1)
    } else {
        (1, frames - guide.len() as u32)
    };
    for k in 0..frames - guide.len() as u32 {
        let t = (k + first) as f32 / steps as f32;
        out.push(Frame::blend(from, end, smoothstep(t))?);
        on_frame();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: u8) -> Frame {
        Frame {
            width: 4,
            height: 2,
            rgb: vec![v; 24],
        }
    }

    #[test]
    fn fades_from_start_to_end() {
        let out = generate(&flat(0), &flat(200), 9, None, || {}).unwrap();
        assert_eq!(out.len(), 9);
        assert_eq!(out[0].rgb[0], 0);
        assert_eq!(out[8].rgb[0], 200);
        assert!(out.windows(2).all(|w| w[0].rgb[0] <= w[1].rgb[0]));
    }

    #[test]
    fn chained_segments_start_from_the_guide_frames() {
        let guide = [flat(50), flat(60)];
        let out = generate(&flat(0), &flat(200), 9, Some(&guide), || {}).unwrap();
        assert_eq!(out.len(), 9);
        assert_eq!((out[0].rgb[0], out[1].rgb[0]), (50, 60));
        assert!(out[2].rgb[0] > 60);
        assert_eq!(out[8].rgb[0], 200);
    }
}
