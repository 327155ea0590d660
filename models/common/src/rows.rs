//! Kernels over the last axis of contiguous f32 CPU tensors: RMS norm (also
//! written split into attention heads and rotated by RoPE), layer norm
//! followed by a per-channel product and sum (an affine norm, or a DiT's
//! shift/scale modulation), and the gated residual `x + d · gate`.
//!
//! candle's ops run each of these as four to ten passes over the tensor
//! (squares, row means, broadcast products and sums), each allocating and
//! faulting in a fresh tensor; here each is one pass that reads a row while
//! it is in the cache, the threads taking contiguous blocks of whole rows.
//! The arithmetic is candle's, in the same order per element; only the row
//! sums are accumulated in 16 lanes (a few ulps of the statistics).

use candle_core::{DType, Device, Result, Tensor};

use crate::parallel::{f32_slice, for_each_block, widest_simd};

/// Elements below which a pass stays on one thread.
const MIN_BLOCK: usize = 1 << 15;
/// Lanes of the row sums (one AVX-512 or two AVX2 registers).
const LANES: usize = 16;

/// Whether the kernels here take `x`: a contiguous f32 tensor on the CPU
/// with a last axis.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() && x.rank() >= 1
}

/// `x · (mean(x²) + eps)^-½ · weight` over the last axis (candle's order:
/// the normalised row, then the weight); `weight` has one value per column.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = last_dim(x)?;
    let weight = Params::of(weight, cols, 1)?;
    let eps = eps as f32;
    map_rows(x, None, |_, row, _, out| {
        let inv = (sum_lanes(row, |v| v * v) / cols as f32 + eps)
            .sqrt()
            .recip();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight.row(0)) {
            *o = v * inv * w;
        }
    })
}

/// [`rms_norm`] of `x` `[B, N, H·D]` written head-major, `[B, H, N, D]` (the
/// layout attention takes), each head's interleaved pairs rotated by `rope`
/// (`cos`, `sin` `[≥ N, D/2]`) as candle's `rope_i` does when given: the
/// norm, the heads' transposing copy and the rotation in one pass that
/// writes one tensor, instead of three passes each writing a fresh one. The
/// same arithmetic in the same order as the three.
pub fn rms_norm_heads(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let cols = last_dim(x)?;
    let (batch, tokens, _) = x.dims3()?;
    if heads == 0 || !cols.is_multiple_of(heads) {
        candle_core::bail!("{cols} columns do not split into {heads} heads");
    }
    let d = cols / heads;
    let weight = Params::of(weight, cols, 1)?;
    let rope = rope
        .map(|tables| Rotation::of(tables, tokens, d))
        .transpose()?;
    let eps = eps as f32;
    let mut out = vec![0f32; x.elem_count()];
    f32_slice(x, |xs| {
        let mut inv_rms = vec![0f32; batch * tokens];
        for_each_block(&mut inv_rms, MIN_BLOCK / cols.max(1), 1, |first, block| {
            widest_simd(
                #[inline(always)]
                || {
                    for (i, inv) in block.iter_mut().enumerate() {
                        let row = &xs[(first + i) * cols..][..cols];
                        *inv = (sum_lanes(row, |v| v * v) / cols as f32 + eps)
                            .sqrt()
                            .recip();
                    }
                },
            )
        });
        for_each_block(&mut out, MIN_BLOCK, d.max(1), |first, block| {
            widest_simd(
                #[inline(always)]
                || {
                    for (i, out_row) in block.chunks_exact_mut(d).enumerate() {
                        // Output row (b, h, n) from columns h·D.. of input row (b, n).
                        let r = first / d + i;
                        let (b, h, n) = (r / tokens / heads, r / tokens % heads, r % tokens);
                        let x_row = b * tokens + n;
                        let src = &xs[x_row * cols + h * d..][..d];
                        let w = &weight.row(0)[h * d..][..d];
                        let inv = inv_rms[x_row];
                        for ((o, &v), &w) in out_row.iter_mut().zip(src).zip(w) {
                            *o = v * inv * w;
                        }
                        if let Some(rope) = &rope {
                            rope.rotate(n, out_row);
                        }
                    }
                },
            )
        });
    })?;
    Tensor::from_vec(out, (batch, heads, tokens, d), &Device::Cpu)
}

/// RoPE's angles per token, `[tokens, D/2]` cos and sin.
struct Rotation {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rotation {
    fn of((cos, sin): (&Tensor, &Tensor), tokens: usize, d: usize) -> Result<Self> {
        let half = d / 2;
        let fits = |t: &Tensor| {
            t.rank() == 2 && t.dims()[0] >= tokens && t.dims()[1] == half && d.is_multiple_of(2)
        };
        if !fits(cos) || !fits(sin) {
            candle_core::bail!(
                "RoPE tables {:?} and {:?} do not fit {tokens} tokens of head dim {d}",
                cos.shape(),
                sin.shape()
            );
        }
        let table = |t: &Tensor| -> Result<Vec<f32>> {
            t.narrow(0, 0, tokens)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
            half,
        })
    }

    /// Rotates the pairs `(row[2i], row[2i+1])` of token `n` by its angles.
    #[inline(always)]
    fn rotate(&self, n: usize, row: &mut [f32]) {
        let cos = &self.cos[n * self.half..][..self.half];
        let sin = &self.sin[n * self.half..][..self.half];
        for ((pair, &c), &s) in row.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// `(x − mean) · (var + eps)^-½ · mul + add` over the last axis (mean and
/// variance of each row; candle's order: the normalised row, then the product,
/// then the sum). `mul` and `add` hold either one value per column, shared by
/// every row, or one row of columns per leading-axis entry of `x` (a `[B, N,
/// C]` input with `[B, 1, C]` modulation); `None` multiplies by 1 or adds 0.
pub fn layer_norm(
    x: &Tensor,
    mul: Option<&Tensor>,
    add: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let cols = last_dim(x)?;
    let groups = x.dims().first().copied().unwrap_or(1);
    let mul = mul.map(|m| Params::of(m, cols, groups)).transpose()?;
    let add = add.map(|a| Params::of(a, cols, groups)).transpose()?;
    let rows_per_group = x.elem_count() / cols.max(1) / groups.max(1);
    let eps = eps as f32;
    map_rows(x, None, |r, row, _, out| {
        let group = r / rows_per_group.max(1);
        let mean = sum_lanes(row, |v| v) / cols as f32;
        let var = sum_lanes(row, |v| (v - mean) * (v - mean)) / cols as f32;
        let inv = (var + eps).sqrt().recip();
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (v - mean) * inv;
        }
        if let Some(mul) = &mul {
            for (o, &m) in out.iter_mut().zip(mul.row(group)) {
                *o *= m;
            }
        }
        if let Some(add) = &add {
            for (o, &a) in out.iter_mut().zip(add.row(group)) {
                *o += a;
            }
        }
    })
}

/// `x + d · gate` (or `x + d` without a gate) for `x` and `d` of one shape;
/// `gate` holds one value per column or one row of columns per leading-axis
/// entry, as [`layer_norm`]'s `mul`.
pub fn residual(x: &Tensor, d: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    if d.shape() != x.shape() || !applies(d) {
        candle_core::bail!(
            "residual: a contiguous f32 CPU update of {:?} expected, got {:?}",
            x.shape(),
            d.shape()
        );
    }
    let cols = last_dim(x)?;
    let groups = x.dims().first().copied().unwrap_or(1);
    let gate = gate.map(|g| Params::of(g, cols, groups)).transpose()?;
    let rows_per_group = x.elem_count() / cols.max(1) / groups.max(1);
    map_rows(x, Some(d), |r, row, update, out| match &gate {
        Some(gate) => {
            let g = gate.row(r / rows_per_group.max(1));
            for (((o, &v), &u), &g) in out.iter_mut().zip(row).zip(update).zip(g) {
                *o = v + u * g;
            }
        }
        None => {
            for ((o, &v), &u) in out.iter_mut().zip(row).zip(update) {
                *o = v + u;
            }
        }
    })
}

fn last_dim(x: &Tensor) -> Result<usize> {
    if !applies(x) {
        candle_core::bail!("row kernels take contiguous f32 CPU tensors");
    }
    x.dim(candle_core::D::Minus1)
}

/// Per-column parameters: one row shared by every group, or one per group.
struct Params {
    values: Vec<f32>,
    cols: usize,
}

impl Params {
    fn of(t: &Tensor, cols: usize, groups: usize) -> Result<Self> {
        let n = t.elem_count();
        if n != cols && n != cols * groups {
            candle_core::bail!(
                "row kernel parameters {:?} fit neither {cols} columns nor {groups} rows of them",
                t.shape()
            );
        }
        Ok(Self {
            values: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            cols,
        })
    }

    fn row(&self, group: usize) -> &[f32] {
        let start = if self.values.len() == self.cols {
            0
        } else {
            group * self.cols
        };
        &self.values[start..start + self.cols]
    }
}

/// The sum of `f(v)` over `row`, accumulated in [`LANES`] lanes so it
/// vectorises.
#[inline(always)]
fn sum_lanes(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

/// A tensor shaped like `x` whose row `r` is `kernel(r, x_row, d_row, out)`,
/// `d_row` being row `r` of `d` (a tensor of `x`'s shape; empty without one),
/// on the threads in blocks of whole rows.
fn map_rows(
    x: &Tensor,
    d: Option<&Tensor>,
    kernel: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync,
) -> Result<Tensor> {
    let cols = last_dim(x)?;
    let mut out = vec![0f32; x.elem_count()];
    if out.is_empty() {
        return Tensor::from_vec(out, x.shape(), &Device::Cpu);
    }
    f32_slice(x, |xs| {
        let mut run = |ds: &[f32]| {
            for_each_block(&mut out, MIN_BLOCK, cols, |first, block| {
                widest_simd(
                    #[inline(always)]
                    || {
                        for (i, out_row) in block.chunks_exact_mut(cols).enumerate() {
                            let r = first / cols + i;
                            let span = r * cols..(r + 1) * cols;
                            let d_row = ds.get(span.clone()).unwrap_or(&[]);
                            kernel(r, &xs[span], d_row, out_row);
                        }
                    },
                )
            })
        };
        match d {
            Some(d) => f32_slice(d, run),
            None => {
                run(&[]);
                Ok(())
            }
        }
    })??;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use candle_core::D;

    use super::*;
    use crate::test_support::max_abs_diff;

    fn randn(dims: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, dims, &Device::Cpu).unwrap()
    }

    /// Shapes with rows shorter than, equal to and longer than the lanes
    /// with tails, one and several rows per thread block, and batches.
    const SHAPES: [&[usize]; 5] = [
        &[1, 7],
        &[3, 16],
        &[2, 5, 33],
        &[2, 300, 129],
        &[1, 40, 1536],
    ];

    /// The kernels compute candle's operations in candle's order on every
    /// element; only the row sums are accumulated in another order, a
    /// relative error of a few ulps in the statistics. The outputs are of
    /// order 1 (normalised values times parameters of order 1; inputs of
    /// std 3 plus an offset for the layer norm's mean), so 1e-5 absolute
    /// bounds the difference with a margin of ~10 ulps.
    const TOL: f32 = 1e-5;

    #[test]
    fn rms_norm_equals_candle_ops() {
        for dims in SHAPES {
            let cols = *dims.last().unwrap();
            let x = randn(dims, 3.0);
            let w = (randn(&[cols], 0.3) + 1.0).unwrap();
            let want = x
                .broadcast_mul(
                    &(x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6)
                        .unwrap()
                        .sqrt()
                        .unwrap()
                        .recip()
                        .unwrap(),
                )
                .unwrap()
                .broadcast_mul(&w)
                .unwrap();
            let got = rms_norm(&x, &w, 1e-6).unwrap();
            assert!(max_abs_diff(&got, &want) < TOL, "{dims:?}");
        }
    }

    /// Exactly the three passes it replaces: [`rms_norm`], the heads'
    /// transposing copy and candle's `rope_i` (longer tables than tokens, as
    /// a RoPE cache holds); heads of 2 and 128 values, one and several thread
    /// blocks.
    #[test]
    fn rms_norm_heads_equals_norm_split_rotate() {
        for (batch, tokens, heads, d) in [(1, 3, 2, 2), (2, 5, 3, 8), (1, 300, 12, 128)] {
            let cols = heads * d;
            let x = randn(&[batch, tokens, cols], 3.0);
            let w = (randn(&[cols], 0.3) + 1.0).unwrap();
            let cos = randn(&[tokens + 4, d / 2], 1.0);
            let sin = randn(&[tokens + 4, d / 2], 1.0);
            let split = rms_norm(&x, &w, 1e-6)
                .unwrap()
                .reshape((batch, tokens, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let rotated = candle_nn::rotary_emb::rope_i(
                &split,
                &cos.narrow(0, 0, tokens).unwrap(),
                &sin.narrow(0, 0, tokens).unwrap(),
            )
            .unwrap();
            let plain = rms_norm_heads(&x, &w, 1e-6, heads, None).unwrap();
            assert_eq!(plain.dims(), &[batch, heads, tokens, d]);
            assert_eq!(max_abs_diff(&plain, &split), 0.0);
            let got = rms_norm_heads(&x, &w, 1e-6, heads, Some((&cos, &sin))).unwrap();
            assert_eq!(max_abs_diff(&got, &rotated), 0.0);
        }
        let x = randn(&[1, 2, 12], 1.0);
        let w = randn(&[12], 1.0);
        let err = rms_norm_heads(&x, &w, 1e-6, 5, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("12 columns do not split into 5 heads")
        );
        let short = randn(&[1, 3], 1.0);
        let err = rms_norm_heads(&x, &w, 1e-6, 2, Some((&short, &short))).unwrap_err();
        assert!(
            err.to_string()
                .contains("do not fit 2 tokens of head dim 6")
        );
    }

    #[test]
    fn layer_norm_with_shared_and_per_batch_parameters_equals_candle_ops() {
        for dims in SHAPES {
            let cols = *dims.last().unwrap();
            let batch = dims[0];
            let x = (randn(dims, 3.0) + 2.0).unwrap();
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let normed = xc
                .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                .unwrap();
            let plain = layer_norm(&x, None, None, 1e-6).unwrap();
            assert!(max_abs_diff(&plain, &normed) < TOL, "{dims:?}");
            // an affine norm's weight and bias, one value per column
            let (w, b) = (randn(&[cols], 1.0), randn(&[cols], 1.0));
            let want = normed.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap();
            let got = layer_norm(&x, Some(&w), Some(&b), 1e-6).unwrap();
            assert!(max_abs_diff(&got, &want) < TOL, "{dims:?}");
            // a DiT's modulation, one row of columns per batch entry
            let mut param = vec![1; dims.len()];
            param[0] = batch;
            *param.last_mut().unwrap() = cols;
            let (scale, shift) = (randn(&param, 1.0), randn(&param, 1.0));
            let want = normed
                .broadcast_mul(&scale)
                .unwrap()
                .broadcast_add(&shift)
                .unwrap();
            let got = layer_norm(&x, Some(&scale), Some(&shift), 1e-6).unwrap();
            assert!(max_abs_diff(&got, &want) < TOL, "{dims:?}");
        }
    }

    /// One multiplication and one addition per element, as candle does
    /// them: equal bit for bit.
    #[test]
    fn residual_equals_candle_ops() {
        for dims in SHAPES {
            let cols = *dims.last().unwrap();
            let mut param = vec![1; dims.len()];
            param[0] = dims[0];
            *param.last_mut().unwrap() = cols;
            let (x, d, gate) = (randn(dims, 1.0), randn(dims, 1.0), randn(&param, 1.0));
            let want = (&x + d.broadcast_mul(&gate).unwrap()).unwrap();
            assert_eq!(
                max_abs_diff(&residual(&x, &d, Some(&gate)).unwrap(), &want),
                0.0
            );
            let want = (&x + &d).unwrap();
            assert_eq!(max_abs_diff(&residual(&x, &d, None).unwrap(), &want), 0.0);
        }
        let x = randn(&[2, 3], 1.0);
        assert!(residual(&x, &randn(&[3, 2], 1.0), None).is_err());
    }
}
