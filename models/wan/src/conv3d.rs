//! Causal 3-D convolution (diffusers' `WanCausalConv3d`) on candle, which has no conv3d: the
//! kernel is split into its temporal taps and each tap is one conv2d over all output frames
//! at once (frames as the batch); the taps are summed.
//!
//! Tensors here are videos of ONE sample laid out frames-first, `[T, C, H, W]`, so that a
//! time slice is a plain narrow on dimension 0 and a per-frame 2-D operation needs no permute.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct CausalConv3d {
    /// One `[out, in, kh, kw]` kernel per temporal tap.
    taps: Vec<Tensor>,
    bias: Tensor, // [1, out, 1, 1]
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
        let taps = (0..kt)
            .map(|k| w.narrow(2, k, 1)?.squeeze(2)?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let bias = vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?;
        if stride.1 != stride.2 {
            candle_core::bail!("causal conv3d: unequal spatial strides {stride:?}");
        }
        Ok(Self {
            taps,
            bias,
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
        let kt = self.taps.len();
        let t_in = x.dim(0)?;
        if t_in < kt {
            candle_core::bail!("causal conv3d: {t_in} frames for a temporal kernel of {kt}");
        }
        let t_out = (t_in - kt) / self.stride_t + 1;
        let mut acc: Option<Tensor> = None;
        for (k, w) in self.taps.iter().enumerate() {
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
            .broadcast_add(&self.bias)
    }
}

impl Module for CausalConv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        CausalConv3d::forward(self, x, None)
    }
}
