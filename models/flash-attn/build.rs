//! Compiles the vendored FlashAttention-2 kernels into `libkubewan_fa2_kernels.a`
//! (only with the `cuda` feature; without it the crate is empty).
//!
//! Only what kubewan runs is built, to keep the cold CUDA build short: bf16,
//! head dim 96 non-causal (CLIP and the Qwen2.5-VL vision tower, head dim 80)
//! and head dim 128 causal and non-causal (Wan DiT, Qwen2.5-VL decoder), for the
//! one compute capability in `CUDA_COMPUTE_CAP` (cudaforge: 90 → sm_90a). Dropout,
//! ALiBi, softcapping and local windows are compiled out: each one doubles the
//! kernel variants nvcc instantiates.
//!
//! The CUTLASS 3.5.0 headers come from `KUBEWAN_CUTLASS_INCLUDE` (scripts/build-cuda.sh
//! installs the `nvidia-cutlass==3.5.0.0` wheel, whose headers are those of the
//! CUTLASS commit candle-flash-attn 0.11.1 pins): no git checkout at build time.

fn main() {
    #[cfg(feature = "cuda")]
    kernels::build();
}

#[cfg(feature = "cuda")]
mod kernels {
    use std::path::PathBuf;

    const SOURCES: [&str; 4] = [
        "kernels/flash_api.cu",
        "kernels/flash_fwd_hdim96_bf16_sm80.cu",
        "kernels/flash_fwd_hdim128_bf16_sm80.cu",
        "kernels/flash_fwd_hdim128_bf16_causal_sm80.cu",
    ];
    const CUTLASS_ENV: &str = "KUBEWAN_CUTLASS_INCLUDE";

    pub fn build() {
        println!("cargo::rerun-if-changed=build.rs");
        println!("cargo::rerun-if-changed=kernels");
        println!("cargo::rerun-if-env-changed={CUTLASS_ENV}");
        println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
        let cutlass = std::env::var(CUTLASS_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                panic!(
                    "{CUTLASS_ENV} is not set: it must name the CUTLASS 3.5.0 include folder \
                 (scripts/build-cuda.sh sets it)"
                )
            });
        if !cutlass.join("cute/tensor.hpp").is_file() {
            panic!(
                "{CUTLASS_ENV}={} has no cute/tensor.hpp: not a CUTLASS include folder",
                cutlass.display()
            );
        }
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let builder = cudaforge::KernelBuilder::new()
            .source_files(SOURCES)
            .watch(["kernels"])
            .out_dir(&out_dir)
            .include_path("kernels")
            .include_path(&cutlass)
            .args([
                "-std=c++17",
                "-O3",
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_HALF2_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "--expt-relaxed-constexpr",
                "--expt-extended-lambda",
                "--use_fast_math",
                "-DFLASHATTENTION_DISABLE_DROPOUT",
                "-DFLASHATTENTION_DISABLE_ALIBI",
                "-DFLASHATTENTION_DISABLE_SOFTCAP",
                "-DFLASHATTENTION_DISABLE_LOCAL",
                "-Xcompiler",
                "-fPIC",
            ]);
        let lib = out_dir.join("libkubewan_fa2_kernels.a");
        if let Err(e) = builder.build_lib(&lib) {
            panic!("building the FlashAttention kernels failed: {e}");
        }
        println!("cargo::rustc-link-search={}", out_dir.display());
        println!("cargo::rustc-link-lib=static=kubewan_fa2_kernels");
        println!("cargo::rustc-link-lib=dylib=cudart");
        println!("cargo::rustc-link-lib=dylib=stdc++");
    }
}
