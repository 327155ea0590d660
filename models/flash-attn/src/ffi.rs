//! The C entry point of `kernels/flash_api.cu`.

use core::ffi::{c_int, c_void};

unsafe extern "C" {
    /// 0 on success, a `cudaError_t` after a failed launch, -1 when the build
    /// has no kernel for `d` / `is_causal`. Strides are in elements.
    pub(crate) fn kubewan_flash_attn_fwd(
        q_ptr: *const c_void,
        k_ptr: *const c_void,
        v_ptr: *const c_void,
        o_ptr: *const c_void,
        softmax_lse_ptr: *const c_void,
        q_batch_stride: u32,
        k_batch_stride: u32,
        v_batch_stride: u32,
        o_batch_stride: u32,
        q_row_stride: u32,
        k_row_stride: u32,
        v_row_stride: u32,
        o_row_stride: u32,
        q_head_stride: u32,
        k_head_stride: u32,
        v_head_stride: u32,
        o_head_stride: u32,
        b: u32,
        h: u32,
        h_k: u32,
        d: u32,
        d_rounded: u32,
        softmax_scale: f32,
        seqlen_q: u32,
        seqlen_k: u32,
        seqlen_q_rounded: u32,
        seqlen_k_rounded: u32,
        is_causal: c_int,
        stream_ptr: *mut c_void,
    ) -> c_int;
}
