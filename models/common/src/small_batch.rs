//! `x · Wᵀ` for a few rows of bf16 `x` against bf16 weights on the CPU (a
//! VLM decoding one token at a time), where candle's bf16 gemm is slow.
//!
//! The weights stay bf16 as stored (`[out, in]`); the rows of `x` are widened
//! to f32 once, and each output is the dot product of a weight row widened to
//! f32 (a shift into the high half: exact) with f32 accumulation, the threads
//! taking contiguous blocks of output features, rounded to bf16 (nearest
//! even) at the end. Larger batches, other dtypes and devices keep candle's
//! matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use crate::activation::contiguous;
use crate::parallel::{for_each_block, widest_simd};

/// Rows up to which the kernel here runs (measured against candle's gemm on
/// the 2-core dev VM, `examples/cpu_kernels.rs`).
pub const MAX_ROWS: usize = 16;

/// Output values per thread below which the work is not split further.
const MIN_BLOCK: usize = 1 << 10;

/// Whether [`matmul_t`] takes `x` (`[…, in]`) and `weight` (`[out, in]`).
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    let in_features = weight.dims().get(1).copied();
    x.device().is_cpu()
        && weight.device().is_cpu()
        && x.dtype() == DType::BF16
        && weight.dtype() == DType::BF16
        && weight.rank() == 2
        && weight.is_contiguous()
        && x.dims().last().copied() == in_features
        && x.elem_count() <= MAX_ROWS * in_features.unwrap_or(0)
}

/// `x · weightᵀ` for the inputs [`applies`] accepts: `[…, out]` in bf16.
pub fn matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let rows = x.elem_count() / in_features.max(1);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_features;
    }
    x.contiguous()?
        .reshape((rows, in_features))?
        .apply_op2_no_bwd(weight, &SmallBatchMatmul)?
        .reshape(dims)
}

struct SmallBatchMatmul;

impl CustomOp2 for SmallBatchMatmul {
    fn name(&self) -> &'static str {
        "kubewan-small-batch-bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(x), CpuStorage::BF16(weight)) = (x, weight) else {
            candle_core::bail!("small-batch matmul: bf16 inputs expected");
        };
        let (rows, in_features) = x_layout.shape().dims2()?;
        let (out_features, weight_in) = weight_layout.shape().dims2()?;
        if weight_in != in_features {
            candle_core::bail!(
                "small-batch matmul: {in_features} inputs against weights [{out_features}, {weight_in}]"
            );
        }
        let x: Vec<f32> = contiguous(x, x_layout)?
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let weight = contiguous(weight, weight_layout)?;
        // Feature-major [out, rows], so each thread's block of features is contiguous.
        let mut sums = vec![0f32; out_features * rows];
        for_each_block(&mut sums, MIN_BLOCK, rows.max(1), |first, block| {
            widest_simd(
                #[inline(always)]
                || {
                    let features = block.chunks_mut(rows.max(1));
                    for (feature, sums) in (first / rows.max(1)..).zip(features) {
                        let w = &weight[feature * in_features..(feature + 1) * in_features];
                        for (sum, x) in sums.iter_mut().zip(x.chunks_exact(in_features)) {
                            *sum = dot(w, x);
                        }
                    }
                },
            )
        });
        let out = (0..rows)
            .flat_map(|row| {
                sums.iter()
                    .skip(row)
                    .step_by(rows)
                    .map(|&v| bf16::from_f32(v))
            })
            .collect();
        Ok((CpuStorage::BF16(out), Shape::from((rows, out_features))))
    }
}

/// Independent accumulators: enough for the dot product's additions to
/// pipeline in two 8-lane vectors.
const LANES: usize = 16;

/// `Σ w·x` with the bf16 `w` widened exactly to f32 and f32 accumulation.
#[inline(always)]
fn dot(w: &[bf16], x: &[f32]) -> f32 {
    let widen = |w: bf16| f32::from_bits(u32::from(w.to_bits()) << 16);
    let (w_lanes, w_tail) = w.as_chunks::<LANES>();
    let (x_lanes, x_tail) = x.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (w, x) in w_lanes.iter().zip(x_lanes) {
        for lane in 0..LANES {
            acc[lane] += widen(w[lane]) * x[lane];
        }
    }
    let tail: f32 = w_tail.iter().zip(x_tail).map(|(&w, &x)| widen(w) * x).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn random(shape: (usize, usize), std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// Against the product of the same bf16 values in f64: within the bf16
    /// rounding of the result (2⁻⁹ relative; 2⁻⁸ allowed) plus f32
    /// accumulation in another order (`in`·2⁻²⁴ of `Σ|w·x|`).
    #[test]
    fn matches_the_product_in_f64() {
        // Odd sizes: vector tails, one feature, features split over threads.
        for (rows, in_features, out_features) in [
            (1, 1, 1),
            (1, 17, 7),
            (3, 70, 5),
            (MAX_ROWS, 517, 300),
            (2, 1029, 2 * MIN_BLOCK + 1),
        ] {
            let x = random((rows, in_features), 1.0);
            let w = random((out_features, in_features), 0.05);
            assert!(applies(&x, &w));
            let got = matmul_t(&x, &w).unwrap();
            assert_eq!(got.dims(), [rows, out_features]);
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = f64s(&x).matmul(&f64s(&w).t().unwrap()).unwrap();
            let magnitude = f64s(&x)
                .abs()
                .unwrap()
                .matmul(&f64s(&w).abs().unwrap().t().unwrap())
                .unwrap();
            let (got, want, magnitude) = (
                f64s(&got).to_vec2::<f64>().unwrap(),
                want.to_vec2::<f64>().unwrap(),
                magnitude.to_vec2::<f64>().unwrap(),
            );
            for ((got, want), magnitude) in got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .zip(magnitude.iter().flatten())
            {
                let tolerance =
                    want.abs() / 256.0 + in_features as f64 * 2f64.powi(-24) * magnitude;
                assert!(
                    (got - want).abs() <= tolerance,
                    "{rows}x{in_features}x{out_features}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn takes_only_few_bf16_rows_on_the_cpu() {
        let w = random((8, 16), 1.0);
        assert!(applies(&random((MAX_ROWS, 16), 1.0), &w));
        assert!(!applies(&random((MAX_ROWS + 1, 16), 1.0), &w));
        assert!(!applies(&random((1, 15), 1.0), &w));
        let f32_row = random((1, 16), 1.0).to_dtype(DType::F32).unwrap();
        assert!(!applies(&f32_row, &w.to_dtype(DType::F32).unwrap()));
        assert!(!applies(&random((1, 8), 1.0), &w.t().unwrap()));
    }
}
