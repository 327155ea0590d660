//! The models' activations — GELU (tanh approximation and erf), SiLU and the
//! SwiGLU product `silu(gate) · up` — with CPU kernels as fast as PyTorch's.
//!
//! candle's CPU ops call libm's `tanh`/`exp` per element (and compute bf16
//! GELU in bf16 arithmetic); here contiguous f32 and bf16 tensors on the CPU
//! run branch-free approximations that the compiler vectorises, in one
//! contiguous block per thread, bf16 computed in f32 and rounded once (as
//! PyTorch does). Other devices, dtypes and non-contiguous inputs run
//! candle's own ops.
//!
//! Accuracy (f32, against the functions in f64; tested below): within 1e-6
//! relative (measured: 2 ulp for SiLU, 3 for GELU-tanh, 7 for GELU-erf)
//! plus 4 ulp of the exponential's argument: the f32 rounding of `x`, `x²`
//! and `x³` in that argument is amplified by its size in any f32
//! implementation, candle's and PyTorch's included, and matters only in the
//! tails, where the results are tiny.

use std::f32::consts::FRAC_1_SQRT_2;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp1, Layout, Result, Shape, Tensor,
};
use half::bf16;

use crate::parallel::{for_each_block, widest_simd};

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`,
/// candle's `Tensor::gelu`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if runs_here(&[x]) {
        x.apply_op1_no_bwd(&Unary::GeluTanh)
    } else {
        x.gelu()
    }
}

/// [`gelu_tanh`] of a tensor the caller owns alone (a layer's fresh output),
/// computed in its own buffer on the CPU: an FFN's hidden states are its
/// largest activation (3120 × 8960 f32 is 112 MB), and a second buffer of
/// that size is new memory the kernel must hand out page by page.
pub fn gelu_tanh_owned(x: Tensor) -> Result<Tensor> {
    if runs_here(&[&x]) {
        x.inplace_op1(&Unary::GeluTanh)?;
        Ok(x)
    } else {
        x.gelu()
    }
}

/// Exact GELU `x · Φ(x)` (PyTorch's `gelu`, candle's `Tensor::gelu_erf`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if runs_here(&[x]) {
        x.apply_op1_no_bwd(&Unary::GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// SiLU `x · σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if runs_here(&[x]) {
        x.apply_op1_no_bwd(&Unary::Silu)
    } else {
        x.silu()
    }
}

/// `silu(gate) · up` (the SwiGLU MLPs), in one pass on the CPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if runs_here(&[gate, up]) && gate.shape() == up.shape() && gate.dtype() == up.dtype() {
        gate.apply_op2_no_bwd(up, &SwiGlu)
    } else {
        gate.silu()? * up
    }
}

/// Whether the kernels here take these inputs: contiguous f32 or bf16 on the CPU.
fn runs_here(xs: &[&Tensor]) -> bool {
    xs.iter().all(|x| {
        x.device().is_cpu() && x.is_contiguous() && matches!(x.dtype(), DType::F32 | DType::BF16)
    })
}

/// Elements per thread below which a tensor is not split further (a thread
/// start costs about what this many elements do).
const MIN_BLOCK: usize = 1 << 15;

#[derive(Debug, Clone, Copy)]
enum Unary {
    GeluTanh,
    GeluErf,
    Silu,
}

impl CustomOp1 for Unary {
    fn name(&self) -> &'static str {
        match self {
            Unary::GeluTanh => "kubewan-gelu-tanh",
            Unary::GeluErf => "kubewan-gelu-erf",
            Unary::Silu => "kubewan-silu",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // Each arm names its function so the element loop is compiled (and
        // vectorised) for it.
        let out = match self {
            Unary::GeluTanh => map_storage(storage, layout, gelu_tanh_f32)?,
            Unary::GeluErf => map_storage(storage, layout, gelu_erf_f32)?,
            Unary::Silu => map_storage(storage, layout, silu_f32)?,
        };
        Ok((out, layout.shape().clone()))
    }
}

impl InplaceOp1 for Unary {
    fn name(&self) -> &'static str {
        CustomOp1::name(self)
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match self {
            Unary::GeluTanh => map_storage_in_place(storage, layout, gelu_tanh_f32),
            Unary::GeluErf => map_storage_in_place(storage, layout, gelu_erf_f32),
            Unary::Silu => map_storage_in_place(storage, layout, silu_f32),
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "kubewan-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let swiglu = |g: f32, u: f32| silu_f32(g) * u;
        let out = match (gate, up) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(zip_map(
                contiguous(g, gate_layout)?,
                contiguous(u, up_layout)?,
                swiglu,
            )),
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(zip_map(
                contiguous(g, gate_layout)?,
                contiguous(u, up_layout)?,
                swiglu,
            )),
            _ => candle_core::bail!("swiglu: f32 or bf16 inputs of one dtype expected"),
        };
        Ok((out, gate_layout.shape().clone()))
    }
}

/// The elements a contiguous layout covers.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("a contiguous tensor expected"),
    }
}

fn contiguous_mut<'a, T>(data: &'a mut [T], layout: &Layout) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("a contiguous tensor expected"),
    }
}

/// A float element the kernels read and write; they compute in f32.
trait Element: Copy + Send + Sync + Default {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    /// Round to nearest even, as candle and PyTorch store bf16 results.
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

fn map_storage(
    storage: &CpuStorage,
    layout: &Layout,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<CpuStorage> {
    Ok(match storage {
        CpuStorage::F32(x) => CpuStorage::F32(map(contiguous(x, layout)?, f)),
        CpuStorage::BF16(x) => CpuStorage::BF16(map(contiguous(x, layout)?, f)),
        _ => candle_core::bail!("activation: f32 or bf16 input expected"),
    })
}

fn map_storage_in_place(
    storage: &mut CpuStorage,
    layout: &Layout,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    match storage {
        CpuStorage::F32(x) => map_in_place(contiguous_mut(x, layout)?, f),
        CpuStorage::BF16(x) => map_in_place(contiguous_mut(x, layout)?, f),
        _ => candle_core::bail!("activation: f32 or bf16 input expected"),
    }
    Ok(())
}

/// `f` over every element, in one block per thread.
fn map<E: Element>(x: &[E], f: impl Fn(f32) -> f32 + Sync) -> Vec<E> {
    let mut out = vec![E::default(); x.len()];
    for_each_block(&mut out, MIN_BLOCK, 1, |first, block| {
        widest_simd(
            #[inline(always)]
            || {
                for (y, &x) in block.iter_mut().zip(&x[first..]) {
                    *y = E::from_f32(f(x.to_f32()));
                }
            },
        )
    });
    out
}

/// `f` over every element in place, in one block per thread.
fn map_in_place<E: Element>(x: &mut [E], f: impl Fn(f32) -> f32 + Sync) {
    for_each_block(x, MIN_BLOCK, 1, |_, block| {
        widest_simd(
            #[inline(always)]
            || {
                for y in block.iter_mut() {
                    *y = E::from_f32(f(y.to_f32()));
                }
            },
        )
    });
}

/// `f` over every pair of elements, in one block per thread.
fn zip_map<E: Element>(a: &[E], b: &[E], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<E> {
    let mut out = vec![E::default(); a.len()];
    for_each_block(&mut out, MIN_BLOCK, 1, |first, block| {
        widest_simd(
            #[inline(always)]
            || {
                for ((y, &a), &b) in block.iter_mut().zip(&a[first..]).zip(&b[first..]) {
                    *y = E::from_f32(f(a.to_f32(), b.to_f32()));
                }
            },
        )
    });
    out
}

/// `−2·√(2/π)`: GELU-tanh's `0.5·(1 + tanh(u))` is `1 / (1 + e^(−2u))`.
const GELU_TANH_A: f32 = MINUS_2_SQRT_2_OVER_PI as f32;
/// `−2·√(2/π) · 0.044715`.
const GELU_TANH_B: f32 = (MINUS_2_SQRT_2_OVER_PI * 0.044_715) as f32;
const MINUS_2_SQRT_2_OVER_PI: f64 = -1.595_769_121_605_730_8;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` as `x / (1 + e^(−2u))`, which
/// has no cancellation for negative `x`.
#[inline(always)]
fn gelu_tanh_f32(x: f32) -> f32 {
    x / (1.0 + exp(x * (GELU_TANH_A + GELU_TANH_B * x * x)))
}

/// `x · σ(x)`.
#[inline(always)]
fn silu_f32(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `x · Φ(x)` through `erfc`, without cancellation on either side:
/// `½·x·erfc(|x|/√2)` for negative `x`, `x − ½·x·erfc(x/√2)` otherwise.
#[inline(always)]
fn gelu_erf_f32(x: f32) -> f32 {
    // Beyond ±13 the tail is below f32's normal range; clamping keeps ±∞ finite there.
    let xc = x.clamp(-13.0, 13.0);
    let tail = 0.5 * xc * erfc(xc.abs() * FRAC_1_SQRT_2);
    if x < 0.0 { tail } else { x - tail }
}

/// `erfc(z)` for `z ≥ 0`: the Chebyshev fit of Numerical Recipes' `erfcc`,
/// fractional error below 1.2e-7 for every `z ≥ 0`.
#[inline(always)]
fn erfc(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(poly - z * z)
}

/// `e^x`, branch-free so loops over it vectorise: Cephes' `expf` (rounding to
/// a multiple of ln 2 in two parts, a degree-7 polynomial on
/// [−ln 2/2, ln 2/2], 2^n from the exponent bits; within 2 ulp). Inputs below
/// −87 give e^−87 (callers only add it to 1), inputs above 88 give +∞.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer n without a libm call, and leaves n
    // in the low bits, from which 2^n is built without a float-to-int cast
    // (which does not vectorise).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = (((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r
        * r
        + r
        + 1.0;
    // n + 127, the biased exponent of 2^n (n is within [−126, 127]).
    let biased = shifted.to_bits() - (ROUND.to_bits() - 127);
    let scaled = p * f32::from_bits(biased << 23);
    if x > 88.0 { f32::INFINITY } else { scaled }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_core::cpu::erf::erfc_f64;

    use super::*;

    /// Every f32 step of 1/64 over [−20, 20] (both exponential tails, zero,
    /// the steep part), then `len` random normal values: odd lengths exercise
    /// the vector loops' tails and large ones the split into blocks.
    fn inputs(len: usize) -> Vec<f32> {
        let grid = (-1280..=1280).map(|i| i as f32 / 64.0);
        let normal = Tensor::randn(0f32, 3f32, len, &Device::Cpu).unwrap();
        grid.chain(normal.to_vec1::<f32>().unwrap()).collect()
    }

    /// A kernel, its function in f64 (written without the cancellation that
    /// candle's f64 formulas `0.5·x·(1 + tanh …)` and `0.5·x·(1 + erf …)`
    /// suffer for x ≲ −6), and the argument of its exponential: the f32
    /// rounding of `x`, `x²`, `x³` in that argument is amplified by its size
    /// in the result, for any f32 implementation.
    type Case = (&'static str, Op, fn(f64) -> f64, fn(f64) -> f64);
    type Op = fn(&Tensor) -> Result<Tensor>;

    const A: f64 = MINUS_2_SQRT_2_OVER_PI;

    fn cases() -> [Case; 3] {
        [
            (
                "gelu_tanh",
                gelu_tanh,
                |x| x / (1.0 + (x * (A + A * 0.044_715 * x * x)).exp()),
                |x| x * (A + A * 0.044_715 * x * x),
            ),
            (
                "gelu_erf",
                gelu_erf,
                |x| 0.5 * x * erfc_f64(-x * std::f64::consts::FRAC_1_SQRT_2),
                |x| x * x / 2.0,
            ),
            ("silu", silu, |x| x / (1.0 + (-x).exp()), |x| x),
        ]
    }

    /// Allowed error: 1e-6 relative for the approximations and roundings
    /// (measured at most 2 ulp for SiLU, 3 for GELU-tanh, 7 = 4.2e-7 for
    /// GELU-erf near |x| = 0.25, where erfc's fit is least exact), plus 4 ulp
    /// of the exponential's argument, plus 1e-37 absolute where results leave
    /// f32's normal range.
    fn tolerance(reference: f64, argument: f64) -> f64 {
        reference.abs() * (1e-6 + 4.0 * 2f64.powi(-24) * argument.abs()) + 1e-37
    }

    #[test]
    fn f32_results_match_the_functions_in_f64() {
        for len in [1, 7, 1000, 3 * MIN_BLOCK + 5] {
            let x = inputs(len);
            let tensor = Tensor::new(x.as_slice(), &Device::Cpu).unwrap();
            for (name, op, exact, argument) in cases() {
                let got = op(&tensor).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                for (&x, got) in x.iter().zip(got.to_vec1::<f32>().unwrap()) {
                    let (x, got) = (x as f64, got as f64);
                    let err = (got - exact(x)).abs();
                    let tolerance = tolerance(exact(x), argument(x));
                    assert!(err <= tolerance, "{name}({x}) = {got}, not {}", exact(x));
                }
            }
        }
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        for len in [5, 3 * MIN_BLOCK + 1] {
            let gate = Tensor::new(inputs(len).as_slice(), &Device::Cpu).unwrap();
            let up = Tensor::randn(0f32, 1f32, gate.shape(), &Device::Cpu).unwrap();
            let want = (silu(&gate).unwrap() * &up).unwrap();
            let got = swiglu(&gate, &up).unwrap();
            // One more rounding than the product of the two ops' results: 1 ulp.
            let (got, want) = (
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap(),
            );
            for (got, want) in got.into_iter().zip(want) {
                assert!((got - want).abs() <= want.abs() * f32::EPSILON + 1e-37);
            }
        }
    }

    #[test]
    fn bf16_is_the_f32_result_rounded_once() {
        let x = Tensor::new(inputs(3 * MIN_BLOCK + 3).as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let up = (&x * 0.5).unwrap();
        let widened = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let ops: [(Op, Op); 3] = [(gelu_tanh, gelu_tanh), (gelu_erf, gelu_erf), (silu, silu)];
        for (bf16_op, f32_op) in ops {
            let got = bf16_op(&x).unwrap();
            let want = f32_op(&widened(&x)).unwrap().to_dtype(DType::BF16).unwrap();
            assert_eq!(
                got.to_vec1::<bf16>().unwrap(),
                want.to_vec1::<bf16>().unwrap()
            );
        }
        let got = swiglu(&x, &up).unwrap();
        let want = swiglu(&widened(&x), &widened(&up))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            got.to_vec1::<bf16>().unwrap(),
            want.to_vec1::<bf16>().unwrap()
        );
    }

    #[test]
    fn gelu_in_place_is_gelu() {
        let x = Tensor::new(inputs(3 * MIN_BLOCK + 3).as_slice(), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let x = x.to_dtype(dtype).unwrap();
            let want = gelu_tanh(&x).unwrap().to_dtype(DType::F64).unwrap();
            let got = gelu_tanh_owned(x.copy().unwrap()).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_eq!(
                got.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                want.to_vec1::<f64>().unwrap(),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn other_dtypes_and_strided_inputs_run_candles_ops() {
        let x = Tensor::randn(0f32, 2f32, (6, 5), &Device::Cpu).unwrap();
        let f64s = x.to_dtype(DType::F64).unwrap();
        assert_eq!(
            gelu_tanh(&f64s).unwrap().to_vec2::<f64>().unwrap(),
            f64s.gelu().unwrap().to_vec2::<f64>().unwrap()
        );
        let strided = x.t().unwrap();
        assert!(!strided.is_contiguous());
        assert_eq!(
            silu(&strided).unwrap().to_vec2::<f32>().unwrap(),
            strided.silu().unwrap().to_vec2::<f32>().unwrap()
        );
        let want = (strided.silu().unwrap() * &strided).unwrap();
        assert_eq!(
            swiglu(&strided, &strided)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }
}
