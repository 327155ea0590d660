//! FlashAttention-2's forward pass as a candle op on CUDA: `softmax(q·kᵀ·scale)·v`
//! computed tile by tile in on-chip memory, so the `[L_q, L_k]` score matrix is
//! never written to device memory (Wan at 720p × 81 frames attends over ~75 600
//! tokens per sequence).
//!
//! Trimmed to what kubewan's models need, to keep the CUDA build short (see
//! build.rs): bf16, head dims that are multiples of 8 up to 128, optional causal
//! masking (aligned bottom-right, for a KV cache), grouped-query attention
//! (fewer K/V heads than query heads). Everything else (f32 models, additive
//! masks, CPU) goes through kubewan-model-common's chunked attention.
//!
//! The glue is adapted from candle-flash-attn 0.11.1 (MIT OR Apache-2.0); the
//! kernels in `kernels/` are FlashAttention's (Tri Dao, BSD-3-Clause).
//! Without the `cuda` feature this crate is empty.

/// The largest head dimension this build has kernels for.
pub const MAX_HEAD_DIM: usize = 128;

/// Whether [`flash_attn`] handles this head dimension (any multiple of 8 up to
/// [`MAX_HEAD_DIM`]: head dims up to 96 use the 96 kernel, others the 128 one).
pub fn supports_head_dim(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(8) && head_dim <= MAX_HEAD_DIM
}

#[cfg(feature = "cuda")]
mod ffi;
#[cfg(feature = "cuda")]
mod op;

#[cfg(feature = "cuda")]
pub use op::flash_attn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_of_the_models_are_supported() {
        // Wan DiT and Qwen2.5-VL text: 128; Qwen2.5-VL vision and CLIP ViT-H: 80.
        assert!(supports_head_dim(128) && supports_head_dim(80));
        assert!(!supports_head_dim(384) && !supports_head_dim(100) && !supports_head_dim(0));
    }
}
