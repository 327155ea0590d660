//! Small building blocks shared by the vision tower and the decoder.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

/// RMSNorm as Qwen2.5-VL computes it: statistics in f32, then `weight * x.to(input_dtype)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let y = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
        y.broadcast_mul(&self.weight)
    }
}

/// `cat(-x2, x1)` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x * cos + rotate_half(x) * sin` with broadcasting.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)
}

/// Scaled dot-product attention over `(..., L, D)` tensors; softmax in f32 like transformers' eager path.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let mut w = (q.matmul(&k.t()?)? * scale)?;
    if let Some(m) = mask {
        w = w.broadcast_add(&m.to_dtype(w.dtype())?)?;
    }
    let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    w.matmul(v)
}

/// Inverse frequencies `1 / theta^(2i/dim)` for `i < dim/2`, in f32 as torch computes them.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}
