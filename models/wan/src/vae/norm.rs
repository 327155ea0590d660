//! diffusers' `WanRMS_norm` over the channels of `[T, C, H, W]`, and the SiLU that follows it
//! in every residual block. On the CPU in f32 the two run as one kernel: candle's ops make
//! eight passes over the tensor (square, a strided channel mean, sqrt, recip, two broadcast
//! products, silu's exp and division) where this one reads the input twice and writes once.
//! The arithmetic is candle's, in the same order: `x · (Σ_c x² / C + eps)^-½ · γ`, then
//! `v / (1 + e^-v)`.

use candle_core::{DType, Device, Result, Storage, Tensor};
use kubewan_model_common::nn::RmsNorm;
use kubewan_model_common::parallel::for_each_block;

/// Elements below which a pass stays on one thread.
const MIN_BLOCK: usize = 1 << 15;

#[derive(Debug, Clone)]
pub(super) struct ChannelRmsNorm {
    norm: RmsNorm,
    /// γ when it lives on the CPU in f32: inputs there take the fused kernel.
    cpu_gamma: Option<Vec<f32>>,
    eps: f64,
}

impl ChannelRmsNorm {
    /// `gamma`: `C` values in any shape.
    pub fn new(gamma: Tensor, eps: f64) -> Result<Self> {
        let cpu_gamma = if gamma.device().is_cpu() && gamma.dtype() == DType::F32 {
            Some(gamma.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self {
            norm: RmsNorm::over_channels(gamma, eps)?,
            cpu_gamma,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, false)? {
            Some(y) => Ok(y),
            None => self.norm.forward(x),
        }
    }

    /// `silu(norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, true)? {
            Some(y) => Ok(y),
            None => self.norm.forward(x)?.silu(),
        }
    }

    /// The fused kernel, or `None` where it does not apply (not CPU f32).
    fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        let Some(gamma) = &self.cpu_gamma else {
            return Ok(None);
        };
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let (t, c, h, w) = x.dims4()?;
        if c != gamma.len() {
            candle_core::bail!("rms norm: {c} channels, γ has {}", gamma.len());
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            unreachable!("checked is_cpu above");
        };
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        let src = &cpu.as_slice::<f32>()?[start..end];
        let plane = h * w;
        let inv_rms = inv_rms(src, c, plane, self.eps as f32);
        let mut out = vec![0f32; src.len()];
        for_each_block(&mut out, MIN_BLOCK, plane, |first, rows| {
            for (i, row) in rows.chunks_exact_mut(plane).enumerate() {
                let r = first / plane + i;
                let (frame, channel) = (r / c, r % c);
                let x_row = &src[r * plane..(r + 1) * plane];
                let inv = &inv_rms[frame * plane..(frame + 1) * plane];
                let g = gamma[channel];
                for ((o, &v), &s) in row.iter_mut().zip(x_row).zip(inv) {
                    let y = v * s * g;
                    *o = if silu { y / (1.0 + (-y).exp()) } else { y };
                }
            }
        });
        drop(storage);
        Ok(Some(Tensor::from_vec(out, (t, c, h, w), &Device::Cpu)?))
    }
}

/// `(Σ_c x² / C + eps)^-½` for every pixel of every frame: `[T, plane]`.
fn inv_rms(src: &[f32], c: usize, plane: usize, eps: f32) -> Vec<f32> {
    let mut inv = vec![0f32; src.len() / c];
    for_each_block(&mut inv, MIN_BLOCK / c.max(1), 1, |first, part| {
        // `part` may span frames: walk it frame by frame, channel rows in the inner loop.
        let mut done = 0;
        while done < part.len() {
            let p = first + done;
            let (frame, pixel) = (p / plane, p % plane);
            let n = (plane - pixel).min(part.len() - done);
            let acc = &mut part[done..done + n];
            for ch in 0..c {
                let at = (frame * c + ch) * plane + pixel;
                for (a, &v) in acc.iter_mut().zip(&src[at..at + n]) {
                    *a += v * v;
                }
            }
            for a in acc.iter_mut() {
                *a = (*a / c as f32 + eps).sqrt().recip();
            }
            done += n;
        }
    });
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel against candle's ops (`RmsNorm::over_channels` then `silu`) on random
    /// inputs with odd sizes. Same operations in the same order on every element, so the
    /// results differ only where the channel sum is rounded differently: a few ulps of
    /// outputs below ~10, under 1e-5.
    #[test]
    fn fused_norm_silu_equals_candle_ops() {
        let dev = Device::Cpu;
        for (t, c, h, w) in [(1, 3, 5, 7), (3, 16, 9, 11), (2, 33, 1, 13)] {
            let x = Tensor::randn(0f32, 2f32, (t, c, h, w), &dev).unwrap();
            let gamma = Tensor::randn(1f32, 0.3f32, (c, 1, 1, 1), &dev).unwrap();
            let eps = 1e-24 / c as f64;
            let norm = ChannelRmsNorm::new(gamma.clone(), eps).unwrap();
            let reference = RmsNorm::over_channels(gamma, eps).unwrap();
            let want = reference.forward(&x).unwrap();
            for (got, want) in [
                (norm.forward(&x).unwrap(), want.clone()),
                (norm.forward_silu(&x).unwrap(), want.silu().unwrap()),
            ] {
                let err = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(err < 1e-5, "{t}x{c}x{h}x{w}: {err}");
            }
        }
    }
}
