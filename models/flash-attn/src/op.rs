//! [`flash_attn`]: the candle op around `kubewan_flash_attn_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor, bail};
use half::bf16;

use crate::{MAX_HEAD_DIM, ffi, supports_head_dim};

struct FlashAttn {
    softmax_scale: f32,
    causal: bool,
}

fn round_multiple(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// A stride or size as the kernel's 32-bit parameter, refusing what does not fit.
fn u32_of(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        candle_core::Error::Msg(format!(
            "flash-attn: {what} {value} does not fit the kernel's 32-bit index"
        ))
    })
}

impl FlashAttn {
    fn forward(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let (b, seqlen_q, heads, head_dim) = q_l.shape().dims4()?;
        let (bk, seqlen_k, heads_k, head_dim_k) = k_l.shape().dims4()?;
        if (bk, head_dim_k) != (b, head_dim) || v_l.shape() != k_l.shape() {
            bail!(
                "flash-attn: q {:?}, k {:?} and v {:?} do not fit ([B, L, H, D] with one B and D, k and v alike)",
                q_l.shape(),
                k_l.shape(),
                v_l.shape()
            );
        }
        if !supports_head_dim(head_dim) {
            bail!(
                "flash-attn: head dim {head_dim} has no kernel (multiples of 8 up to {MAX_HEAD_DIM})"
            );
        }
        if heads_k == 0 || !heads.is_multiple_of(heads_k) {
            bail!("flash-attn: {heads_k} k/v heads do not divide {heads} query heads");
        }
        let (q_s, k_s, v_s) = (q_l.stride(), k_l.stride(), v_l.stride());
        if q_s[3] != 1 || k_s[3] != 1 || v_s[3] != 1 {
            bail!("flash-attn: the head dim of q, k and v must be contiguous");
        }

        let out_shape = q_l.shape().clone();
        let out_l = Layout::contiguous(&out_shape);
        let o_s = out_l.stride();
        let q = q.as_cuda_slice::<bf16>()?.slice(q_l.start_offset()..);
        let k = k.as_cuda_slice::<bf16>()?.slice(k_l.start_offset()..);
        let v = v.as_cuda_slice::<bf16>()?.slice(v_l.start_offset()..);
        // SAFETY: the kernel writes every element of `dst` before anyone reads it.
        let mut dst = unsafe { dev.alloc::<bf16>(out_shape.elem_count())? };
        let mut softmax_lse = dev.alloc_zeros::<f32>(b * heads * seqlen_q)?;
        let stream = dev.cuda_stream();
        let strides = |s: &[usize], what: &str| -> Result<[u32; 3]> {
            Ok([
                u32_of(s[0], what)?,
                u32_of(s[1], what)?,
                u32_of(s[2], what)?,
            ])
        };
        let ([qb, qr, qh], [kb, kr, kh], [vb, vr, vh], [ob, or, oh]) = (
            strides(q_s, "q stride")?,
            strides(k_s, "k stride")?,
            strides(v_s, "v stride")?,
            strides(o_s, "output stride")?,
        );
        let code = {
            let (q_ptr, _q_guard) = q.device_ptr(&stream);
            let (k_ptr, _k_guard) = k.device_ptr(&stream);
            let (v_ptr, _v_guard) = v.device_ptr(&stream);
            let (o_ptr, _o_guard) = dst.device_ptr_mut(&stream);
            let (lse_ptr, _lse_guard) = softmax_lse.device_ptr_mut(&stream);
            // SAFETY: the pointers are live device buffers of the sizes the
            // shapes and strides describe, on `stream`; the guards keep them
            // ordered on it until the launch is queued.
            unsafe {
                ffi::kubewan_flash_attn_fwd(
                    q_ptr as *const _,
                    k_ptr as *const _,
                    v_ptr as *const _,
                    o_ptr as *const _,
                    lse_ptr as *const _,
                    qb,
                    kb,
                    vb,
                    ob,
                    qr,
                    kr,
                    vr,
                    or,
                    qh,
                    kh,
                    vh,
                    oh,
                    u32_of(b, "batch")?,
                    u32_of(heads, "heads")?,
                    u32_of(heads_k, "k/v heads")?,
                    head_dim as u32,
                    round_multiple(head_dim, 32) as u32,
                    self.softmax_scale,
                    u32_of(seqlen_q, "query length")?,
                    u32_of(seqlen_k, "key length")?,
                    u32_of(round_multiple(seqlen_q, 128), "query length")?,
                    u32_of(round_multiple(seqlen_k, 128), "key length")?,
                    i32::from(self.causal),
                    stream.cu_stream() as *mut _,
                )
            }
        };
        if code != 0 {
            bail!(
                "flash-attn: the kernel launch failed (CUDA error {code}) for q {:?}, k {:?}",
                q_l.shape(),
                k_l.shape()
            );
        }
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), out_shape))
    }
}

impl candle_core::CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "kubewan-flash-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash-attn runs on CUDA only; the CPU uses the chunked attention")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match (q.dtype(), k.dtype(), v.dtype()) {
            (DType::BF16, DType::BF16, DType::BF16) => self.forward(q, q_l, k, k_l, v, v_l),
            dtypes => bail!("flash-attn runs in bf16 only, got {dtypes:?}"),
        }
    }
}

/// `softmax(q·kᵀ·softmax_scale)·v` for `q` `[B, L_q, H, D]` and `k`, `v`
/// `[B, L_k, H_k, D]` (H_k dividing H), bf16 on a CUDA device: `[B, L_q, H, D]`
/// contiguous. `causal` masks key j for query i when `j > i + L_k − L_q`.
/// The last axis must be contiguous; the others may be strided views (e.g. a
/// transposed `[B, H, L, D]` tensor).
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttn {
            softmax_scale,
            causal,
        },
    )
}
