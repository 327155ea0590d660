// kubewan's entry point into the vendored FlashAttention-2 forward kernels:
// bf16 only, head dims up to 96 (non-causal: CLIP and the Qwen2.5-VL vision
// tower, head dim 80) and 128 (causal and not: the Wan DiT, the Qwen2.5-VL
// decoder). Trimmed from candle-flash-attn 0.11.1's flash_api.cu (no fp16, no
// paged KV, no split-KV, no ALiBi/softcap/local windows, see build.rs), and
// it returns the CUDA error of the launch instead of swallowing it.

#include <cstring>

#include "flash_fwd_launch_template.h"

// 0 on success; a cudaError_t after a failed launch; -1 for a head dim / causal
// combination this build has no kernel for (the Rust side checks first).
extern "C" int kubewan_flash_attn_fwd(
    void *q_ptr, void *k_ptr, void *v_ptr, void *o_ptr, void *softmax_lse_ptr,
    uint32_t q_batch_stride, uint32_t k_batch_stride, uint32_t v_batch_stride, uint32_t o_batch_stride,
    uint32_t q_row_stride, uint32_t k_row_stride, uint32_t v_row_stride, uint32_t o_row_stride,
    uint32_t q_head_stride, uint32_t k_head_stride, uint32_t v_head_stride, uint32_t o_head_stride,
    uint32_t b, uint32_t h, uint32_t h_k, uint32_t d, uint32_t d_rounded,
    float softmax_scale,
    uint32_t seqlen_q, uint32_t seqlen_k, uint32_t seqlen_q_rounded, uint32_t seqlen_k_rounded,
    int is_causal,
    void *stream_ptr) {
    Flash_fwd_params params;
    memset(&params, 0, sizeof(params));

    params.q_ptr = q_ptr;
    params.k_ptr = k_ptr;
    params.v_ptr = v_ptr;
    params.o_ptr = o_ptr;
    params.softmax_lse_ptr = softmax_lse_ptr;

    // Strides are in elements.
    params.q_batch_stride = q_batch_stride;
    params.k_batch_stride = k_batch_stride;
    params.v_batch_stride = v_batch_stride;
    params.o_batch_stride = o_batch_stride;
    params.q_row_stride = q_row_stride;
    params.k_row_stride = k_row_stride;
    params.v_row_stride = v_row_stride;
    params.o_row_stride = o_row_stride;
    params.q_head_stride = q_head_stride;
    params.k_head_stride = k_head_stride;
    params.v_head_stride = v_head_stride;
    params.o_head_stride = o_head_stride;

    params.b = b;
    params.h = h;
    params.h_k = h_k;
    params.h_h_k_ratio = h / h_k;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    params.seqlen_q_rounded = seqlen_q_rounded;
    params.seqlen_k_rounded = seqlen_k_rounded;
    params.total_q = b * seqlen_q;
    params.d = d;
    params.d_rounded = d_rounded;

    params.scale_softmax = softmax_scale;
    params.scale_softmax_log2 = softmax_scale * M_LOG2E;
    params.softcap = 0.0;

    // No dropout: keep probability 1.
    params.p_dropout = 1.;
    params.p_dropout_in_uint8_t = uint8_t(std::floor(params.p_dropout * 255.0));
    params.rp_dropout = 1.f / params.p_dropout;
    params.scale_softmax_rp_dropout = params.rp_dropout * params.scale_softmax;

    params.is_bf16 = 1;
    params.is_causal = is_causal;
    // Causal is FlashAttention's window (left: everything, right: 0), aligned
    // bottom-right when seqlen_q < seqlen_k (a KV cache in front of the queries).
    params.window_size_left = is_causal ? int(seqlen_k) : -1;
    params.window_size_right = is_causal ? 0 : -1;
    params.is_seqlens_k_cumulative = true;
    params.num_splits = 1;

    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
    using T = cutlass::bfloat16_t;
    if (d <= 96 && !is_causal) {
        run_mha_fwd_<T, 96, false>(params, stream);
    } else if (d <= 128) {
        if (is_causal) {
            run_mha_fwd_<T, 128, true>(params, stream);
        } else {
            run_mha_fwd_<T, 128, false>(params, stream);
        }
    } else {
        return -1;
    }
    return int(cudaGetLastError());
}
