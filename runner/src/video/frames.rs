//! Frames in memory, `[F,H,W,3]` f32 (0..1) frame tensors (a video model's
//! output) converted to them, and safetensors files of frames: the chained
//! mode's tail hand-off (read defensively: it comes from a shared volume)
//! and `video generate --out-frames`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use kubewan_model_common::safetensors::{SafetensorsHeader, TensorInfo, parse_header};

use crate::fsutil::{PartialFile, open_bounded, open_regular};

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

/// A digest of frames' RGB bytes ([`kubewan_crds::hash::fnv1a`], hex): equal
/// digests mean the same pixels, exactly.
pub fn frames_digest(frames: &[Frame]) -> String {
    let bytes: Vec<u8> = frames.iter().flat_map(|f| f.rgb.iter().copied()).collect();
    format!("{:016x}", kubewan_crds::hash::fnv1a(&bytes))
}

/// The name of the tensor inside a frames file.
pub const FRAMES_TENSOR: &str = "frames";

/// Writes frames as safetensors tensor `frames`, f32 `[F,H,W,3]` in 0..1,
/// one frame at a time.
pub fn write_frames_safetensors(path: &Path, frames: &[Frame]) -> Result<()> {
    let Some(first) = frames.first() else {
        bail!("no frames to write to {}", path.display());
    };
    let (w, h) = (first.width, first.height);
    if frames.iter().any(|f| (f.width, f.height) != (w, h)) {
        bail!("frames of different sizes cannot share {}", path.display());
    }
    let shape = [frames.len(), h as usize, w as usize, 3];
    write_f32_safetensors(path, &shape, |out| {
        for frame in frames {
            for &v in &frame.rgb {
                out.write_all(&(f32::from(v) / 255.0).to_le_bytes())?;
            }
        }
        Ok(())
    })
}

/// Writes `[F,H,W,3]` float frames (a model's output) as safetensors tensor
/// `frames`, f32, values unrounded.
pub fn write_frames_tensor(path: &Path, frames: &Tensor) -> Result<()> {
    let values: Vec<f32> = frames
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    write_f32_safetensors(path, frames.dims(), |out| {
        for v in &values {
            out.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    })
}

/// Writes one f32 tensor named [`FRAMES_TENSOR`] of `shape`, its data
/// written by `data`, under a temporary name renamed when complete (removed
/// on any error).
fn write_f32_safetensors(
    path: &Path,
    shape: &[usize],
    data: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let data_bytes = shape.iter().product::<usize>() * 4;
    let mut header = serde_json::json!({
        FRAMES_TENSOR: {"dtype": "F32", "shape": shape, "data_offsets": [0, data_bytes]}
    })
    .to_string();
    // The format pads the header with spaces to a multiple of 8 bytes.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let cannot_write = || format!("cannot write frames to {}", path.display());
    let mut out = BufWriter::new(PartialFile::create(path)?);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(header.as_bytes()))
        .and_then(|()| data(&mut out))
        .with_context(cannot_write)?;
    out.into_inner()
        .map_err(|e| anyhow::anyhow!("{}: {}", cannot_write(), e.error()))?
        .commit()
}

/// The frames a frames file must hold: how many, and their size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramesShape {
    pub count: u32,
    pub width: u32,
    pub height: u32,
}

/// Reads a frames file written by [`write_frames_safetensors`]: the regular
/// file `path` (a FIFO or device is refused), see [`read_frames_from`].
pub fn read_frames_safetensors(path: &Path, expect: FramesShape) -> Result<Vec<Frame>> {
    read_frames_from(&open_regular(path)?, path, expect)
}

/// Reads tensor `frames` (f32 `[F,H,W,3]` in 0..1) of the open safetensors
/// file `file` (named `path` in errors). The header is validated and the
/// shape must be `expect` before any frame is read, so a file that claims
/// another size allocates nothing; then frames are read one at a time.
pub fn read_frames_from(file: &File, path: &Path, expect: FramesShape) -> Result<Vec<Frame>> {
    let header = parse_header(file, path)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    let info = tensor_info(&header, path, FRAMES_TENSOR)?;
    let want = [
        expect.count as usize,
        expect.height as usize,
        expect.width as usize,
        3,
    ];
    if info.dtype != DType::F32 || info.shape != want {
        bail!(
            "{} holds {:?} frames {:?}, expected F32 {want:?} ([frames, height, width, 3])",
            path.display(),
            info.dtype,
            info.shape
        );
    }
    let frame_bytes = Frame::byte_len(expect.width, expect.height) * 4;
    let mut buf = vec![0u8; frame_bytes];
    let mut frames = Vec::with_capacity(expect.count as usize);
    for i in 0..u64::from(expect.count) {
        file.read_exact_at(&mut buf, info.offset + i * frame_bytes as u64)
            .with_context(|| format!("cannot read frame {i} of {}", path.display()))?;
        let rgb = buf
            .chunks_exact(4)
            .map(|b| {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (v * 255.0).round().clamp(0.0, 255.0) as u8
            })
            .collect();
        frames.push(Frame {
            width: expect.width,
            height: expect.height,
            rgb,
        });
    }
    Ok(frames)
}

/// The header entry of tensor `name`, or an error listing the tensors there are.
fn tensor_info<'h>(
    header: &'h SafetensorsHeader,
    path: &Path,
    name: &str,
) -> Result<&'h TensorInfo> {
    header.tensors.get(name).with_context(|| {
        format!(
            "{} has no tensor named {name:?} (found: {})",
            path.display(),
            header
                .tensors
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The largest file [`read_tensor`] reads: initial noise for the longest
/// segment at the largest size is about 130 MB.
const MAX_TENSOR_FILE_BYTES: u64 = 1 << 30;

/// The tensor `name` of the safetensors file `path` (a regular file of at
/// most 1 GiB whose header is validated first).
pub fn read_tensor(path: &Path, name: &str) -> Result<Tensor> {
    let (file, _) = open_bounded(path, MAX_TENSOR_FILE_BYTES)?;
    let header = parse_header(&file, path)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    tensor_info(&header, path, name)?;
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    tensors
        .remove(name)
        .with_context(|| format!("{} lost its tensor {name:?}", path.display()))
}

/// `[F,H,W,3]` float frames in 0..1 (a video model's output, a frames file)
/// as RGB8 frames: `(x * 255).round()`, as diffusers' `numpy_to_pil`.
pub fn tensor_to_frames(frames: &Tensor) -> Result<Vec<Frame>> {
    let dims = frames.dims();
    let [count, height, width, 3] = dims[..] else {
        bail!("frames tensor has shape {dims:?}, expected [F,H,W,3]");
    };
    if count == 0 || height == 0 || width == 0 {
        bail!("frames tensor has shape {dims:?}: no pixels");
    }
    let values: Vec<f32> = frames
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()
        .context("cannot read the frames")?;
    Ok(values
        .chunks(height * width * 3)
        .map(|chunk| Frame {
            width: width as u32,
            height: height as u32,
            rgb: chunk
                .iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        })
        .collect())
}
