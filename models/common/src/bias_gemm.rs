//! `x · Wᵀ + b` in f32 on the CPU as one GEMM whose output starts as the
//! bias rows: candle's `Linear` runs the product and then a broadcast sum,
//! a second pass over the output that costs a tenth of the product for a
//! DiT's FFN (3120 × 8960 outputs). The product is the same `gemm` call
//! candle's CPU matmul makes (same kernels, strides and threads), so the
//! results differ from candle's only in where the bias joins the sum.

use candle_core::{DType, Device, Result, Tensor};

use crate::parallel::{f32_slice, for_each_block, gemm_parallelism};

/// Output elements below which the bias rows are written on one thread.
const MIN_BLOCK: usize = 1 << 15;

/// Whether [`linear`] takes `x` (`[…, in]`), `weight` (`[out, in]`) and
/// `bias` (`[out]`): contiguous f32 tensors on the CPU.
pub fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let in_features = weight.dims().get(1).copied();
    [x, weight, bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        && weight.rank() == 2
        && bias.dims() == &weight.dims()[..1]
        && x.rank() >= 1
        && x.dims().last().copied() == in_features
}

/// `x · weightᵀ + bias` for inputs [`applies`] accepts: `[…, out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    let m = x.elem_count() / k.max(1);
    // Written once, by the bias rows: no zeroing pass first.
    let mut out = Vec::with_capacity(m * n);
    f32_slice(bias, |b| {
        for_each_block(
            &mut out.spare_capacity_mut()[..m * n],
            MIN_BLOCK,
            n.max(1),
            |_, rows| {
                for row in rows.chunks_exact_mut(n) {
                    row.write_copy_of_slice(b);
                }
            },
        )
    })?;
    // SAFETY: every one of the m·n elements was just written (n > 0: the
    // blocks are whole rows; n = 0: there are none).
    unsafe { out.set_len(m * n) };
    if k > 0 && !out.is_empty() {
        f32_slice(x, |x| {
            f32_slice(weight, |w| accumulate(&mut out, x, w, m, n, k))
        })??;
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// `out[m, n] += x[m, k] · w[n, k]ᵀ`, all row-major.
fn accumulate(out: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
    assert!(out.len() == m * n && x.len() == m * k && w.len() == n * k);
    let parallelism = gemm_parallelism();
    // SAFETY: the assert above sizes every slice for the strides given: out is [m, n] (row
    // stride n), x is [m, k] (row stride k), and wᵀ is read as [k, n] with column stride k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    /// Against candle's `Linear` on random inputs with odd sizes (one row,
    /// tails of every kernel width, a batch axis, more inputs than the GEMM's
    /// depth blocks). Both sum the same products in f32; only the bias joins
    /// at another point and the sums' blocking may differ, so the results
    /// agree to a few ulps of the sum of |x·w| terms: 1e-5 of √k (the
    /// products' typical size for unit normal inputs) bounds that.
    #[test]
    fn equals_candle_linear() {
        use candle_core::Module;
        let dev = Device::Cpu;
        for dims in [
            vec![1, 7],
            vec![5, 33],
            vec![2, 19, 70],
            vec![3, 129],
            vec![2, 3, 1000],
        ] {
            let k = *dims.last().unwrap();
            for n in [1, 17, 64] {
                let x = Tensor::randn(0f32, 1f32, dims.as_slice(), &dev).unwrap();
                let w = Tensor::randn(0f32, 1f32, (n, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
                assert!(applies(&x, &w, &b));
                let got = linear(&x, &w, &b).unwrap();
                let want = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
                let err = max_abs_diff(&got, &want);
                assert!(err <= 1e-5 * (k as f32).sqrt(), "{dims:?} x {n}: {err}");
            }
        }
    }
}
