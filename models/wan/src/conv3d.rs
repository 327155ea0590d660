//! Causal 3-D convolution (diffusers' `WanCausalConv3d`). Candle has no conv3d: on the CPU in
//! f32 it runs as an implicit GEMM ([`implicit_gemm`]); elsewhere the kernel is split into its
//! temporal taps and each tap is one candle conv2d over all output frames at once (frames as the
//! batch); the taps are summed.
//!
//! Tensors here are videos of ONE sample laid out frames-first, `[T, C, H, W]`, so that a
//! time slice is a plain narrow on dimension 0 and a per-frame 2-D operation needs no permute.

mod implicit_gemm;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use implicit_gemm::{Geometry, TapMajorWeights};

/// The weights in the layout of the path that runs them.
#[derive(Debug, Clone)]
enum Kernel {
    /// CPU, f32.
    Gemm(TapMajorWeights),
    /// Candle's conv2d: one `[out, in, kh, kw]` kernel per temporal tap, bias `[1, out, 1, 1]`.
    Taps { taps: Vec<Tensor>, bias: Tensor },
}

impl Kernel {
    fn taps(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Ok(Self::Taps {
            taps: (0..w.dim(2)?)
                .map(|k| w.narrow(2, k, 1)?.squeeze(2)?.contiguous())
                .collect::<Result<Vec<_>>>()?,
            bias: bias.reshape((1, bias.elem_count(), 1, 1))?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct CausalConv3d {
    kernel: Kernel,
    stride_t: usize,
    stride_s: usize,
    pad_h: usize,
    pad_w: usize,
    /// Zero frames put in front (2 × the temporal padding), fewer when cached frames are given.
    pad_t: usize,
}

impl CausalConv3d {
    /// `kernel`, `stride`, `padding` as `(t, h, w)`, weights at `vb` (`weight`, `bias`).
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: (usize, usize, usize),
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> Result<Self> {
        let (kt, kh, kw) = kernel;
        let w = vb.get((out_c, in_c, kt, kh, kw), "weight")?;
        Self::from_weights(w, vb.get(out_c, "bias")?, stride, padding)
    }

    /// A frame-by-frame 2-D convolution (a `nn.Conv2d` applied to every frame): square kernel
    /// `k`, spatial `stride` and `padding`, 4-D weights at `vb`.
    pub fn spatial(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let w = vb.get((out_c, in_c, k, k), "weight")?.unsqueeze(2)?;
        Self::from_weights(
            w,
            vb.get(out_c, "bias")?,
            (1, stride, stride),
            (0, padding, padding),
        )
    }

    fn from_weights(
        w: Tensor,
        bias: Tensor,
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> Result<Self> {
        if stride.1 != stride.2 {
            candle_core::bail!("causal conv3d: unequal spatial strides {stride:?}");
        }
        // The implicit GEMM reads neighbouring pixels as neighbouring columns: stride 1 only.
        let kernel = if w.device().is_cpu() && w.dtype() == DType::F32 && stride.1 == 1 {
            Kernel::Gemm(TapMajorWeights::new(&w, &bias)?)
        } else {
            Kernel::taps(&w, &bias)?
        };
        Ok(Self {
            kernel,
            stride_t: stride.0,
            stride_s: stride.1,
            pad_h: padding.1,
            pad_w: padding.2,
            pad_t: 2 * padding.0,
        })
    }

    /// Cubic kernel `k` with padding `p` on every axis, stride 1.
    pub fn cube(vb: VarBuilder, in_c: usize, out_c: usize, k: usize, p: usize) -> Result<Self> {
        Self::new(vb, in_c, out_c, (k, k, k), (1, 1, 1), (p, p, p))
    }

    /// `x`: `[T, C, H, W]`; `cache`: frames that precede `x` (the feature cache), which replace
    /// as many of the causal zero frames.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Gemm(weights) => self.forward_gemm(weights, x, cache),
            Kernel::Taps { taps, bias } => self.forward_taps(taps, bias, x, cache),
        }
    }

    fn forward_gemm(
        &self,
        weights: &TapMajorWeights,
        x: &Tensor,
        cache: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let cache = match cache {
            Some(c) if self.pad_t > 0 => Some(c.contiguous()?),
            _ => None,
        };
        let cached = cache.as_ref().map_or(Ok(0), |c| c.dim(0))?;
        let frames: Vec<&Tensor> = cache.iter().chain([&x]).collect();
        let geometry = Geometry {
            stride_t: self.stride_t,
            pad_h: self.pad_h,
            pad_w: self.pad_w,
            lead_zeros: self.pad_t.saturating_sub(cached),
        };
        weights.conv(&frames, geometry)
    }

    fn forward_taps(
        &self,
        taps: &[Tensor],
        bias: &Tensor,
        x: &Tensor,
        cache: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        let mut pad_t = self.pad_t;
        if let Some(c) = cache
            && pad_t > 0
        {
            x = Tensor::cat(&[c, &x], 0)?;
            pad_t = pad_t.saturating_sub(c.dim(0)?);
        }
        if pad_t > 0 {
            x = x.pad_with_zeros(0, pad_t, 0)?;
        }
        let (pad2d, x) = if self.pad_h == self.pad_w {
            (self.pad_h, x)
        } else {
            (
                0,
                x.pad_with_zeros(2, self.pad_h, self.pad_h)?
                    .pad_with_zeros(3, self.pad_w, self.pad_w)?,
            )
        };
        let kt = taps.len();
        let t_in = x.dim(0)?;
        if t_in < kt {
            candle_core::bail!("causal conv3d: {t_in} frames for a temporal kernel of {kt}");
        }
        let t_out = (t_in - kt) / self.stride_t + 1;
        let mut acc: Option<Tensor> = None;
        for (k, w) in taps.iter().enumerate() {
            let frames = if self.stride_t == 1 {
                x.narrow(0, k, t_out)?
            } else {
                let idx: Vec<u32> = (0..t_out).map(|o| (k + o * self.stride_t) as u32).collect();
                let idx = Tensor::new(idx.as_slice(), x.device())?;
                x.index_select(&idx, 0)?
            };
            let y = frames.contiguous()?.conv2d(w, pad2d, self.stride_s, 1, 1)?;
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        acc.expect("kernel has at least one tap")
            .broadcast_add(bias)
    }
}

impl Module for CausalConv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        CausalConv3d::forward(self, x, None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    /// The implicit GEMM and candle's conv2d-per-tap path on the same weights and frames.
    fn both_paths(
        (c_in, c_out): (usize, usize),
        kernel: (usize, usize, usize),
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> (CausalConv3d, CausalConv3d) {
        let (kt, kh, kw) = kernel;
        let w = randn(&[c_out, c_in, kt, kh, kw]);
        let b = randn(&[c_out]);
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_owned(), w.clone()),
                ("bias".to_owned(), b.clone()),
            ]),
            DType::F32,
            &Device::Cpu,
        );
        let gemm = CausalConv3d::new(vb, c_in, c_out, kernel, stride, padding).unwrap();
        assert!(matches!(gemm.kernel, Kernel::Gemm(_)));
        let taps = CausalConv3d {
            kernel: Kernel::taps(&w, &b).unwrap(),
            ..gemm.clone()
        };
        (gemm, taps)
    }

    /// Largest difference relative to the largest reference value. Both paths sum the same
    /// f32 products (at most 27 × 40 here) in different orders; rounding differs by a few
    /// ulps of the partial sums, far below 1e-5 of the output's scale.
    fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap();
        (diff / scale).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn implicit_gemm_equals_conv2d_per_tap() {
        // (channels, kernel, stride, padding, frames, cached frames, height, width)
        type Case = (
            (usize, usize),
            (usize, usize, usize),
            (usize, usize, usize),
            (usize, usize, usize),
            usize,
            usize,
            usize,
            usize,
        );
        let cases: [Case; 8] = [
            ((3, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), 1, 0, 7, 9),
            ((3, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), 3, 2, 7, 9),
            ((4, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), 2, 1, 5, 4),
            ((40, 33), (3, 3, 3), (1, 1, 1), (1, 1, 1), 4, 2, 11, 13),
            ((6, 7), (1, 1, 1), (1, 1, 1), (0, 0, 0), 3, 0, 5, 3),
            ((6, 12), (3, 1, 1), (1, 1, 1), (1, 0, 0), 2, 2, 4, 5),
            ((6, 6), (3, 1, 1), (2, 1, 1), (0, 0, 0), 5, 0, 4, 5),
            ((5, 4), (1, 3, 5), (1, 1, 1), (0, 1, 2), 2, 0, 6, 7),
        ];
        for (channels, kernel, stride, padding, t, cached, h, w) in cases {
            let (gemm, taps) = both_paths(channels, kernel, stride, padding);
            let x = randn(&[t, channels.0, h, w]);
            let cache = (cached > 0).then(|| randn(&[cached, channels.0, h, w]));
            let got = gemm.forward(&x, cache.as_ref()).unwrap();
            let want = taps.forward(&x, cache.as_ref()).unwrap();
            let err = rel_err(&got, &want);
            assert!(err < 1e-5, "{channels:?} {kernel:?} t={t}+{cached}: {err}");
        }
    }

    /// The conv3d row (192 → 192, k3, 2 frames at 60×104 after the causal zero frames),
    /// both paths alternately, best of 3. Timing, not a check:
    /// `RAYON_NUM_THREADS=2 cargo test --release -p kubewan-wan --lib conv3d_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing of both conv3d paths, run by hand (see the doc comment), not a check"]
    fn conv3d_speed() {
        let (gemm, taps) = both_paths((192, 192), (3, 3, 3), (1, 1, 1), (1, 1, 1));
        let x = randn(&[2, 192, 60, 104]);
        let time = |conv: &CausalConv3d| {
            let start = std::time::Instant::now();
            conv.forward(&x, None).unwrap();
            start.elapsed().as_secs_f64()
        };
        let (mut best_gemm, mut best_taps) = (f64::MAX, f64::MAX);
        for round in 0..3 {
            let (t_taps, t_gemm) = (time(&taps), time(&gemm));
            println!("round {round}: conv2d per tap {t_taps:.3} s, implicit GEMM {t_gemm:.3} s");
            best_taps = best_taps.min(t_taps);
            best_gemm = best_gemm.min(t_gemm);
        }
        println!("best: conv2d per tap {best_taps:.3} s, implicit GEMM {best_gemm:.3} s");
    }
}
