//! `x · Wᵀ` for a few rows of `x` against bf16 or f32 weights of the same
//! dtype on the CPU (a VLM decoding one token at a time), where candle's bf16
//! gemm is slow and its f32 gemm packs the whole weight matrix for one row.
//!
//! The weights stay bf16 as stored (`[out, in]`) and each output is a dot
//! product of a weight row and a row of `x` with f32 accumulation, the
//! threads taking contiguous blocks of output features, rounded to bf16
//! (nearest even) at the end. Decoding reads every weight once per token, so
//! the kernel is bound by memory bandwidth once it issues few enough
//! instructions per weight: where the CPU has AVX512-BF16, `vdpbf16ps`
//! multiplies 32 bf16 pairs exactly into f32 sums per instruction, `x` kept
//! bf16 and each thread's weights read as one stream; elsewhere the weights
//! and `x` are widened to f32 (a shift into the high half: exact) for f32
//! FMAs. f32 weights take the widening kernel as they are (and the sums stay
//! f32). Larger batches, other dtypes and devices keep candle's matmul.

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
        && matches!(x.dtype(), DType::BF16 | DType::F32)
        && weight.dtype() == x.dtype()
        && weight.rank() == 2
        && weight.is_contiguous()
        && x.dims().last().copied() == in_features
        && x.elem_count() <= MAX_ROWS * in_features.unwrap_or(0)
}

/// `x · weightᵀ` for the inputs [`applies`] accepts: `[…, out]` in their dtype.
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
        let (rows, in_features) = x_layout.shape().dims2()?;
        let (out_features, weight_in) = weight_layout.shape().dims2()?;
        if weight_in != in_features {
            candle_core::bail!(
                "small-batch matmul: {in_features} inputs against weights [{out_features}, {weight_in}]"
            );
        }
        let dims = Dims {
            rows,
            in_features,
            out_features,
        };
        let out = match (x, weight) {
            (CpuStorage::BF16(x), CpuStorage::BF16(weight)) => {
                let (x, weight) = (contiguous(x, x_layout)?, contiguous(weight, weight_layout)?);
                let sums = products(Kernel::detect(), weight, x, dims);
                CpuStorage::BF16(row_major(&sums, rows, bf16::from_f32))
            }
            (CpuStorage::F32(x), CpuStorage::F32(weight)) => {
                let (x, weight) = (contiguous(x, x_layout)?, contiguous(weight, weight_layout)?);
                CpuStorage::F32(row_major(&widened_products(weight, x, dims), rows, |v| v))
            }
            _ => candle_core::bail!("small-batch matmul: bf16 or f32 inputs of one dtype expected"),
        };
        Ok((out, Shape::from((rows, out_features))))
    }
}

/// The feature-major sums (`[out, rows]`) as `[rows, out]` values.
fn row_major<T>(sums: &[f32], rows: usize, value: impl Fn(f32) -> T) -> Vec<T> {
    if rows == 1 {
        // Decoding's one row: the sums are in order already.
        return sums.iter().map(|&v| value(v)).collect();
    }
    (0..rows)
        .flat_map(|row| sums.iter().skip(row).step_by(rows).map(|&v| value(v)))
        .collect()
}

/// The sizes of one product: `rows` of `x` against `out_features` weight rows
/// of `in_features` each.
#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    in_features: usize,
    out_features: usize,
}

/// How the dot products are computed on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// `vdpbf16ps` on bf16 pairs (AVX512-BF16).
    #[cfg(target_arch = "x86_64")]
    Bf16Pairs,
    /// Weights and `x` widened to f32, f32 FMAs in the widest vectors there are.
    Widened,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if bf16_pairs::available() {
            return Self::Bf16Pairs;
        }
        Self::Widened
    }
}

/// `Σ w·x` of every weight row against every row of `x`, feature-major
/// (`[out, rows]`), so that each thread's block of features is contiguous.
fn products(kernel: Kernel, weight: &[bf16], x: &[bf16], dims: Dims) -> Vec<f32> {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Bf16Pairs => {
            let rows = dims.rows;
            let mut sums = vec![0f32; dims.out_features * rows];
            if dims.in_features == 0 || rows == 0 {
                return sums;
            }
            for_each_block(&mut sums, MIN_BLOCK, rows, |first, block| {
                let features = first / rows..(first + block.len()) / rows;
                let weight =
                    &weight[features.start * dims.in_features..features.end * dims.in_features];
                // SAFETY: `Kernel::detect` chose this kernel because the CPU has its features.
                unsafe { bf16_pairs::products(weight, x, dims.in_features, block) }
            });
            sums
        }
        Kernel::Widened => {
            let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            widened_products(weight, &x, dims)
        }
    }
}

/// [`products`] with the weights widened to f32 (f32 ones as they are) and
/// f32 FMAs in the widest vectors there are.
fn widened_products<W: Weight>(weight: &[W], x: &[f32], dims: Dims) -> Vec<f32> {
    let rows = dims.rows;
    let mut sums = vec![0f32; dims.out_features * rows];
    if dims.in_features == 0 || rows == 0 {
        return sums;
    }
    for_each_block(&mut sums, MIN_BLOCK, rows, |first, block| {
        widest_simd(
            #[inline(always)]
            || {
                let features = block.chunks_mut(rows);
                for (feature, sums) in (first / rows..).zip(features) {
                    let w = &weight[feature * dims.in_features..][..dims.in_features];
                    for (sum, x) in sums.iter_mut().zip(x.chunks_exact(dims.in_features)) {
                        *sum = dot(w, x);
                    }
                }
            },
        )
    });
    sums
}

/// A weight element the widening kernel reads: its exact f32 value.
trait Weight: Copy + Sync {
    fn widen(self) -> f32;
}

impl Weight for bf16 {
    /// A shift into the high half: exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// Independent accumulators: enough for the dot product's additions to
/// pipeline in two 8-lane vectors.
const LANES: usize = 16;

/// `Σ w·x` with `w` widened exactly to f32 and f32 accumulation.
#[inline(always)]
fn dot<W: Weight>(w: &[W], x: &[f32]) -> f32 {
    let widen = W::widen;
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

/// The AVX512-BF16 kernel: `vdpbf16ps` adds the two exact f32 products of a
/// pair of bf16 lanes to an f32 lane, each addition rounded to nearest even
/// as an FMA's is (denormals flushed to zero, far below bf16 weights'
/// products).
#[cfg(target_arch = "x86_64")]
mod bf16_pairs {
    use std::arch::x86_64::{
        __m512bh, _MM_HINT_T0, _mm_prefetch, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_si512,
        _mm512_maskz_loadu_epi16, _mm512_reduce_add_ps, _mm512_setzero_ps,
    };

    use half::bf16;

    /// bf16 lanes of a 512-bit vector.
    const LANES: usize = 32;

    /// How far ahead of the weights being read [`dot`] asks for them (8 KiB):
    /// past the 4 KiB page the hardware prefetcher stops at, near enough to
    /// arrive in time (on an AMD EPYC, 4–16 KiB measured alike and no
    /// prefetch 15–25 % slower: docs/benchmarks.md).
    const PREFETCH_AHEAD: usize = 4096;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }

    /// The dot products of the weight rows `weight` (`in_features` each)
    /// against each row of `x`, into `sums` (`[weight rows, x rows]`). Weight
    /// rows are taken one after the other, so that each thread reads its block
    /// of weights as one sequential stream (a row stays in L1 for the other
    /// rows of `x`): interleaving several rows to share each load of `x` was
    /// 20–30 % slower on an AMD EPYC, where decoding is bound by memory.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn products(weight: &[bf16], x: &[bf16], in_features: usize, sums: &mut [f32]) {
        let rows = x.len() / in_features;
        for (weight, sums) in weight.chunks(in_features).zip(sums.chunks_mut(rows)) {
            for (x, sum) in x.chunks_exact(in_features).zip(sums) {
                *sum = dot(weight, x);
            }
        }
    }

    /// `Σ w·x` over two accumulators (each `vdpbf16ps` waits on its own
    /// accumulator's last one).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn dot(w: &[bf16], x: &[bf16]) -> f32 {
        let (w_vectors, w_tail) = w.as_chunks::<LANES>();
        let (x_vectors, x_tail) = x.as_chunks::<LANES>();
        let (w_pairs, w_last) = w_vectors.as_chunks::<2>();
        let (x_pairs, x_last) = x_vectors.as_chunks::<2>();
        let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (w, x) in w_pairs.iter().zip(x_pairs) {
            prefetch(w[0].as_ptr().wrapping_add(PREFETCH_AHEAD));
            prefetch(w[1].as_ptr().wrapping_add(PREFETCH_AHEAD));
            even = _mm512_dpbf16_ps(even, load_vector(&w[0]), load_vector(&x[0]));
            odd = _mm512_dpbf16_ps(odd, load_vector(&w[1]), load_vector(&x[1]));
        }
        for (w, x) in w_last.iter().zip(x_last) {
            even = _mm512_dpbf16_ps(even, load_vector(w), load_vector(x));
        }
        if !x_tail.is_empty() {
            odd = _mm512_dpbf16_ps(odd, load(w_tail), load(x_tail));
        }
        _mm512_reduce_add_ps(_mm512_add_ps(even, odd))
    }

    /// Asks for the cache line at `at` in L1 ahead of its use. A prefetch past
    /// the weights' end is dropped without a fault.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn prefetch(at: *const bf16) {
        _mm_prefetch::<_MM_HINT_T0>(at.cast());
    }

    /// [`LANES`] values in a vector (a plain load: [`load`]'s mask costs
    /// bandwidth in the loop over whole vectors).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn load_vector(values: &[bf16; LANES]) -> __m512bh {
        // SAFETY: 64 bytes read from a 64-byte array; the 512 loaded bits are 32
        // bf16 lanes, which is what `__m512bh` holds.
        unsafe { std::mem::transmute(_mm512_loadu_si512(values.as_ptr().cast())) }
    }

    /// Up to [`LANES`] values in a vector, the lanes past them zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn load(values: &[bf16]) -> __m512bh {
        let mask = (1u64 << values.len().min(LANES)) - 1;
        // SAFETY: the masked load reads only the lanes set in `mask`, the
        // first `values.len()` (at most 64 bytes), all inside `values`; the
        // 512 loaded bits are 32 bf16 lanes, which is what `__m512bh` holds.
        unsafe {
            std::mem::transmute(_mm512_maskz_loadu_epi16(
                mask as u32,
                values.as_ptr().cast(),
            ))
        }
    }
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

    /// Odd sizes: vector tails, one feature, a remainder after the last
    /// full tile of features, features split over threads.
    const SIZES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (1, 17, 7),
        (3, 70, 5),
        (1, 33, 4099),
        (MAX_ROWS, 517, 300),
        (2, 1029, 2 * MIN_BLOCK + 1),
    ];

    /// `got` (`[rows, out]`) against `x · wᵀ` of the same bf16 values in
    /// f64: within f32 accumulation in another order (`in`·2⁻²⁴ of
    /// `Σ|w·x|`; every product of two bf16 is exact in f32) plus `rounding`
    /// relative to the result.
    fn assert_matches_f64(x: &Tensor, w: &Tensor, got: &Tensor, rounding: f64) {
        let in_features = x.dim(1).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let want = f64s(x).matmul(&f64s(w).t().unwrap()).unwrap();
        let magnitude = f64s(x)
            .abs()
            .unwrap()
            .matmul(&f64s(w).abs().unwrap().t().unwrap())
            .unwrap();
        assert_eq!(got.dims(), want.dims());
        let (got, want, magnitude) = (
            f64s(got).to_vec2::<f64>().unwrap(),
            want.to_vec2::<f64>().unwrap(),
            magnitude.to_vec2::<f64>().unwrap(),
        );
        for ((got, want), magnitude) in got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .zip(magnitude.iter().flatten())
        {
            let tolerance = want.abs() * rounding + in_features as f64 * 2f64.powi(-24) * magnitude;
            assert!(
                (got - want).abs() <= tolerance,
                "{:?} x {:?}: {got} vs {want}",
                x.dims(),
                w.dims()
            );
        }
    }

    /// The layer's bf16 result: the f32 sums rounded to bf16 (2⁻⁹ relative;
    /// 2⁻⁸ allowed).
    #[test]
    fn matches_the_product_in_f64() {
        for (rows, in_features, out_features) in SIZES {
            let x = random((rows, in_features), 1.0);
            let w = random((out_features, in_features), 0.05);
            assert!(applies(&x, &w));
            let got = matmul_t(&x, &w).unwrap();
            assert_matches_f64(&x, &w, &got, 1.0 / 256.0);
            // f32: the widening kernel, sums not rounded further.
            let (x, w) = (
                x.to_dtype(DType::F32).unwrap(),
                w.to_dtype(DType::F32).unwrap(),
            );
            let got = matmul_t(&x, &w).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_matches_f64(&x, &w, &got, 0.0);
        }
    }

    /// Each kernel this CPU can run, on its f32 sums before the rounding.
    #[test]
    fn every_kernel_matches_the_product_in_f64() {
        let mut kernels = vec![Kernel::Widened];
        #[cfg(target_arch = "x86_64")]
        if bf16_pairs::available() {
            kernels.push(Kernel::Bf16Pairs);
        }
        for kernel in kernels {
            for (rows, in_features, out_features) in SIZES {
                let x = random((rows, in_features), 1.0);
                let w = random((out_features, in_features), 0.05);
                let as_vec = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
                let dims = Dims {
                    rows,
                    in_features,
                    out_features,
                };
                let sums = products(kernel, &as_vec(&w), &as_vec(&x), dims);
                let got = Tensor::from_vec(sums, (out_features, rows), &Device::Cpu)
                    .unwrap()
                    .t()
                    .unwrap();
                assert_matches_f64(&x, &w, &got, 0.0);
            }
        }
    }

    #[test]
    fn takes_only_few_rows_of_one_dtype_on_the_cpu() {
        let w = random((8, 16), 1.0);
        assert!(applies(&random((MAX_ROWS, 16), 1.0), &w));
        assert!(!applies(&random((MAX_ROWS + 1, 16), 1.0), &w));
        assert!(!applies(&random((1, 15), 1.0), &w));
        let f32_row = random((1, 16), 1.0).to_dtype(DType::F32).unwrap();
        assert!(applies(&f32_row, &w.to_dtype(DType::F32).unwrap()));
        assert!(!applies(&f32_row, &w));
        assert!(!applies(
            &f32_row.to_dtype(DType::F16).unwrap(),
            &w.to_dtype(DType::F16).unwrap()
        ));
        assert!(!applies(&random((1, 8), 1.0), &w.t().unwrap()));
    }
}
