//! Frames in memory, and `[F,H,W,3]` f32 (0..1) safetensors files of frames:
//! the chained mode's tail hand-off and `video generate --out-frames`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::fsutil::partial_path;

/// One RGB8 frame, row-major `[H,W,3]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Frame {
    pub fn new(width: u32, height: u32) -> Frame {
        Frame {
            width,
            height,
            rgb: vec![0; width as usize * height as usize * 3],
        }
    }

    /// Bytes of one frame of this size.
    pub fn byte_len(width: u32, height: u32) -> usize {
        width as usize * height as usize * 3
    }

    /// `(1 − alpha)·a + alpha·b`, pixel by pixel.
    pub fn blend(a: &Frame, b: &Frame, alpha: f32) -> Result<Frame> {
        if (a.width, a.height) != (b.width, b.height) {
            bail!(
                "cannot blend a {}x{} frame with a {}x{} frame",
                a.width,
                a.height,
                b.width,
                b.height
            );
        }
        // Fixed point (1/65536 steps): exact at alpha 0 and 1, fast without optimisation.
        let w = (alpha.clamp(0.0, 1.0) * 65536.0).round() as u32;
        let rgb = a
            .rgb
            .iter()
            .zip(&b.rgb)
            .map(|(&x, &y)| ((x as u32 * (65536 - w) + y as u32 * w + 32768) >> 16) as u8)
            .collect();
        Ok(Frame {
            width: a.width,
            height: a.height,
            rgb,
        })
    }

    pub fn to_image(&self) -> Option<image::RgbImage> {
        image::RgbImage::from_raw(self.width, self.height, self.rgb.clone())
    }
}

/// The name of the tensor inside a frames file.
pub const FRAMES_TENSOR: &str = "frames";

/// Writes frames as safetensors tensor `frames`, f32 `[F,H,W,3]` in 0..1
/// (temporary name, then renamed).
pub fn write_frames_safetensors(path: &Path, frames: &[Frame]) -> Result<()> {
    let Some(first) = frames.first() else {
        bail!("no frames to write to {}", path.display());
    };
    let (w, h) = (first.width, first.height);
    let mut data = Vec::with_capacity(frames.len() * Frame::byte_len(w, h));
    for f in frames {
        if (f.width, f.height) != (w, h) {
            bail!("frames of different sizes cannot share {}", path.display());
        }
        data.extend(f.rgb.iter().map(|&v| v as f32 / 255.0));
    }
    let tensor = Tensor::from_vec(
        data,
        (frames.len(), h as usize, w as usize, 3),
        &Device::Cpu,
    )?;
    let tmp = partial_path(path);
    let result = tensor
        .save_safetensors(FRAMES_TENSOR, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write frames to {}", path.display()))
}

/// Reads a frames file written by [`write_frames_safetensors`] (or by a model):
/// tensor `frames`, `[F,H,W,3]`, float values in 0..1.
pub fn read_frames_safetensors(path: &Path) -> Result<Vec<Frame>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    let tensor = tensors.get(FRAMES_TENSOR).with_context(|| {
        format!(
            "{} has no tensor named {FRAMES_TENSOR:?} (found: {})",
            path.display(),
            tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let dims = tensor.dims().to_vec();
    let [f, h, w, c] = dims[..] else {
        bail!(
            "{}: tensor {FRAMES_TENSOR:?} has shape {dims:?}, expected [F,H,W,3]",
            path.display()
        );
    };
    if c != 3 || f == 0 {
        bail!(
            "{}: tensor {FRAMES_TENSOR:?} has shape {dims:?}, expected [F,H,W,3] with F > 0",
            path.display()
        );
    }
    let values: Vec<f32> = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
        .with_context(|| format!("{}: cannot read the frames", path.display()))?;
    let per = h * w * 3;
    Ok(values
        .chunks(per)
        .map(|chunk| Frame {
            width: w as u32,
            height: h as u32,
            rgb: chunk
                .iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        })
        .collect())
}
