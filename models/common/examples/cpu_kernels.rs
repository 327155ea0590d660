//! The CPU kernels of `activation`, `rows` and `nn::Linear`'s two paths
//! (small-batch bf16, f32 with the bias in the GEMM) against candle's own ops, alternating in one process (3+ rounds,
//! minimum kept) so machine load affects both alike:
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p kubewan-model-common --example cpu_kernels
//!
//! Prints one line per case: candle's time, ours, and the ratio.

use std::time::Instant;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use kubewan_model_common::{activation, nn, rows, small_batch};

const ROUNDS: usize = 5;

/// The minimum over `ROUNDS` alternating runs of `old` and `new`, in ms.
fn compare(
    label: &str,
    old: impl Fn() -> Result<Tensor>,
    new: impl Fn() -> Result<Tensor>,
) -> Result<()> {
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let start = Instant::now();
        drop(f()?);
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let (mut best_old, mut best_new) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..ROUNDS {
        best_old = best_old.min(time(&old)?);
        best_new = best_new.min(time(&new)?);
    }
    println!(
        "{label:<44} candle {best_old:>9.3} ms   kubewan {best_new:>9.3} ms   {:>5.2}x",
        best_old / best_new
    );
    Ok(())
}

fn main() -> Result<()> {
    let cpu = Device::Cpu;
    println!("threads: {}", candle_core::utils::get_num_threads());
    for dtype in [DType::F32, DType::BF16] {
        // The Wan 1.3B FFN at 780 tokens.
        let x = Tensor::randn(0f32, 2f32, (780, 8960), &cpu)?.to_dtype(dtype)?;
        let u = Tensor::randn(0f32, 1f32, (780, 8960), &cpu)?.to_dtype(dtype)?;
        let shape = format!("780x8960 {dtype:?}");
        compare(
            &format!("gelu tanh {shape}"),
            || x.gelu(),
            || activation::gelu_tanh(&x),
        )?;
        compare(
            &format!("gelu erf {shape}"),
            || x.gelu_erf(),
            || activation::gelu_erf(&x),
        )?;
        compare(
            &format!("silu {shape}"),
            || x.silu(),
            || activation::silu(&x),
        )?;
        compare(
            &format!("silu(a)*b {shape}"),
            || x.silu()? * &u,
            || activation::swiglu(&x, &u),
        )?;
    }
    // The Wan 1.3B DiT's block at 780 and 3120 tokens in f32: its norms, the
    // modulation and gated residuals, and its linears with a bias.
    for tokens in [780, 3120] {
        let x = Tensor::randn(0f32, 1f32, (1, tokens, 1536), &cpu)?;
        let d = Tensor::randn(0f32, 1f32, (1, tokens, 1536), &cpu)?;
        let scale = Tensor::randn(0f32, 1f32, (1, 1, 1536), &cpu)?;
        let shift = Tensor::randn(0f32, 1f32, (1, 1, 1536), &cpu)?;
        let shape = format!("[{tokens}, 1536]");
        compare(
            &format!("layer norm, modulated {shape}"),
            || {
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + 1e-6)?.sqrt()?)?
                    .broadcast_mul(&scale)?
                    .broadcast_add(&shift)
            },
            || rows::layer_norm(&x, Some(&scale), Some(&shift), 1e-6),
        )?;
        compare(
            &format!("gated residual {shape}"),
            || &x + d.broadcast_mul(&scale)?,
            || rows::residual(&x, &d, Some(&scale)),
        )?;
        let weight = scale.flatten_all()?;
        compare(
            &format!("rms norm {shape}"),
            || {
                let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
                    .sqrt()?
                    .recip()?;
                x.broadcast_mul(&inv)?.broadcast_mul(&weight)
            },
            || rows::rms_norm(&x, &weight, 1e-6),
        )?;
        for (out_features, in_features) in [(1536, 1536), (8960, 1536), (1536, 8960)] {
            let x = Tensor::randn(0f32, 1f32, (1, tokens, in_features), &cpu)?;
            let w = Tensor::randn(0f32, 0.02f32, (out_features, in_features), &cpu)?;
            let b = Tensor::randn(0f32, 1f32, out_features, &cpu)?;
            let candle = candle_nn::Linear::new(w.clone(), Some(b.clone()));
            let ours = nn::Linear::new(w, Some(b));
            compare(
                &format!("f32 linear [{tokens}, {in_features}] -> {out_features}"),
                || candle.forward(&x),
                || ours.forward(&x),
            )?;
        }
    }
    // The 3B VLM's decoder linears (and its tied head) in bf16, a few rows.
    for (out_features, in_features) in [(2048, 2048), (11008, 2048), (2048, 11008), (151_936, 2048)]
    {
        let w = Tensor::randn(0f32, 0.02f32, (out_features, in_features), &cpu)?
            .to_dtype(DType::BF16)?;
        for rows in [1, 4, 16, 32] {
            let x =
                Tensor::randn(0f32, 1f32, (1, rows, in_features), &cpu)?.to_dtype(DType::BF16)?;
            compare(
                &format!("bf16 [{rows}, {in_features}] x [{out_features}, {in_features}]^T"),
                || x.broadcast_matmul(&w.t()?),
                || small_batch::matmul_t(&x, &w),
            )?;
        }
    }
    Ok(())
}
