//! The layers both models are built from: RMS normalisation, linear layers
//! and the one attention entry point. Dtype handling follows the references
//! (transformers, diffusers): statistics and softmax in f32, products in the
//! weights' dtype.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::tiled_attention::{self, Output, tiled_attention};
use crate::{bias_gemm, rows, small_batch};

/// A linear layer as transformers and diffusers save it (`weight` `[out, in]`,
/// optional `bias` `[out]`): candle's, except on the CPU where a few rows of
/// bf16 or f32 (a VLM decoding a token, a timestep embedding) run
/// [`small_batch`]'s kernel (candle's bf16 gemm is several times slower than
/// PyTorch, and its f32 gemm packs the whole weight matrix for one row), and
/// more rows of f32 with a bias run [`bias_gemm`] (the bias added within the
/// product, not in a second pass). Every model builds its linear layers from
/// here.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.0.weight();
        if small_batch::applies(x, weight) {
            // The bias is added after the product's rounding, as candle's Linear does.
            let y = small_batch::matmul_t(x, weight)?;
            return match self.0.bias() {
                Some(bias) => y.broadcast_add(bias),
                None => Ok(y),
            };
        }
        match self.0.bias() {
            Some(bias) if bias_gemm::applies(x, weight, bias) => bias_gemm::linear(x, weight, bias),
            _ => self.0.forward(x),
        }
    }
}

/// A [`Linear`] with a bias, from `weight` and `bias` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear)
}

/// A [`Linear`] without bias, from `weight` under `vb`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear)
}

/// The axis an [`RmsNorm`] normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// The last axis (hidden states `[…, C]`).
    Last,
    /// Axis 1 of `[N, C, H, W]` (feature maps).
    Channels,
}

/// RMS normalisation with a weight and no bias:
/// `x · rsqrt(mean(x²) + eps) · weight`.
///
/// The statistics are computed in f32 and the normalised values cast back to
/// the input's dtype before the weight (in the input's dtype) is applied, as
/// transformers' Qwen2RMSNorm and T5LayerNorm and torch's RMSNorm in
/// diffusers' Wan attention do. Over the last axis of contiguous f32 CPU
/// inputs it runs as one pass ([`rows::rms_norm`]).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Shaped to broadcast against the input.
    weight: Tensor,
    eps: f64,
    axis: Axis,
}

impl RmsNorm {
    /// Over the last axis of size `size`, with the checkpoint's `weight`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
            axis: Axis::Last,
        })
    }

    /// Over the channels (axis 1) of `[N, C, H, W]` inputs, with a weight of
    /// `C` values in any shape (diffusers stores the Wan VAE's as `[C, 1, 1]`).
    pub fn over_channels(weight: Tensor, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        Ok(Self {
            weight: weight.reshape((1, channels, 1, 1))?,
            eps,
            axis: Axis::Channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.axis == Axis::Last && rows::applies(x) && self.weight.dtype() == DType::F32 {
            return rows::rms_norm(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let axis = match self.axis {
            Axis::Last => x.rank().saturating_sub(1),
            Axis::Channels => 1,
        };
        let xf = x.to_dtype(DType::F32)?;
        let mean_square = xf.sqr()?.mean_keepdim(axis)?;
        let inv_rms = (mean_square + self.eps)?.sqrt()?.recip()?;
        xf.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }

    /// The norm of `x` `[B, N, H·D]` over its last axis, split into `heads`
    /// as attention takes them, `[B, H, N, D]` contiguous, and rotated by
    /// RoPE on interleaved pairs when `rope` (`cos`, `sin` `[N, D/2]`, f32)
    /// is given — in f32, cast back to `x`'s dtype (diffusers rotates in
    /// f64 and casts back). f32 on the CPU runs as one pass
    /// ([`rows::rms_norm_heads`]).
    pub fn forward_heads(
        &self,
        x: &Tensor,
        heads: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        if self.axis == Axis::Last && rows::applies(x) && self.weight.dtype() == DType::F32 {
            return rows::rms_norm_heads(x, &self.weight, self.eps, heads, rope);
        }
        let (b, n, c) = x.dims3()?;
        let split = self
            .forward(x)?
            .reshape((b, n, heads, c / heads.max(1)))?
            .transpose(1, 2)?
            .contiguous()?;
        match rope {
            Some((cos, sin)) => {
                let dtype = split.dtype();
                candle_nn::rotary_emb::rope_i(&split.to_dtype(DType::F32)?, cos, sin)?
                    .to_dtype(dtype)
            }
            None => Ok(split),
        }
    }
}

/// Which keys each query of an [`attention`] may see.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// Every key.
    None,
    /// Key `j` for query `i` when `j ≤ i + L_k − L_q`: causal self-attention
    /// over a KV cache of `L_k − L_q` earlier positions (transformers' causal
    /// mask for a prefill after a cache).
    Causal,
    /// Added to the f32 scores; broadcasts to `[…, L_q, L_k]` (a relative
    /// position bias, a padding mask).
    Additive(&'a Tensor),
}

/// Elements of one chunk of attention scores: 64 Mi on the CPU (256 MiB in
/// f32); on a GPU 256 Mi, where fewer, larger chunks matter more than the
/// transient memory.
fn score_budget(device: &Device) -> usize {
    if device.is_cpu() { 64 << 20 } else { 256 << 20 }
}

/// Queries per chunk when `batch` (batch × heads) rows of `queries` attend to
/// `keys` with a score budget of `budget_elems`: at least one, at most all.
fn chunk_queries(budget_elems: usize, batch: usize, queries: usize, keys: usize) -> usize {
    (budget_elems / (batch * keys).max(1)).clamp(1, queries.max(1))
}

/// Elements of the largest score block [`attention`] holds at once on
/// `device` for `batch` (batch × heads) rows of `queries` attending to `keys`
/// of `head_dim`. Memory estimates size attention with it. On the CPU without
/// an additive mask that is the tiled path's f32 tiles of every worker (no
/// score matrix: independent of the lengths once they exceed a tile);
/// otherwise one chunk of queries of the chunked path. Where
/// [`flash_attention`] runs (CUDA, bf16) no score block exists, so the
/// estimate is an upper bound there.
pub fn attention_score_elems(
    device: &Device,
    batch: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    additive_mask: bool,
) -> usize {
    if device.is_cpu() && !additive_mask {
        tiled_attention::scratch_elems(batch, queries, keys, head_dim)
    } else {
        batch * chunk_queries(score_budget(device), batch, queries, keys) * keys
    }
}

/// Scaled dot-product attention `softmax(q·kᵀ·scale + mask)·v` over
/// `[B, H, L, D]` queries and `[B, H_k, L_k, D]` keys and values, `H_k`
/// dividing `H` (grouped-query attention); rank-3 `[H, L, D]` inputs work
/// alike. Returns `[B, H, L, D]` (possibly a strided view).
///
/// Every model's attention goes through here. On a CUDA device, bf16 inputs
/// with a head dim FlashAttention has kernels for and no additive mask run
/// [`flash_attention`]; on the CPU, inputs without an additive mask run the
/// tiled online softmax ([`crate::tiled_attention`], f32 throughout); neither
/// materialises the score matrix. Everything else (additive biases, f32 on a
/// GPU) runs [`chunked_attention`], the straightforward reference the tiled
/// path is tested against.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask, scale: f64) -> Result<Tensor> {
    if flash_applies(q, k, v, mask) {
        flash_attention(q, k, v, mask, scale)
    } else if tiled_attention::applies(q, k, v, mask) {
        tiled_attention(Output::HeadMajor, q, k, v, mask, scale)?.reshape(q.shape())
    } else {
        chunked_attention(q, k, v, mask, scale)
    }
}

/// [`attention`] of `[B, H, L, D]` inputs with the heads merged: `[B, L,
/// H·D]`, as an output projection reads them. The tiled CPU path writes
/// that layout directly, and reads keys and values where they lie, so a
/// transposed `[B, L, H, D]` projection goes in and the merged heads come
/// out without a copy on either side.
pub fn attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> Result<Tensor> {
    let (batch, heads, queries, head_dim) = q.dims4()?;
    let merged = if tiled_attention::applies(q, k, v, mask) {
        tiled_attention(Output::TokenMajor, q, k, v, mask, scale)?
    } else {
        attention(q, k, v, mask, scale)?.transpose(1, 2)?
    };
    merged.reshape((batch, queries, heads * head_dim))
}

#[cfg(feature = "cuda")]
fn flash_applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> bool {
    q.device().is_cuda()
        && [q, k, v].iter().all(|t| t.dtype() == DType::BF16)
        && matches!(q.rank(), 3 | 4)
        && kubewan_flash_attn::supports_head_dim(q.dim(candle_core::D::Minus1).unwrap_or(0))
        && !matches!(mask, Mask::Additive(_))
}

#[cfg(not(feature = "cuda"))]
fn flash_applies(_: &Tensor, _: &Tensor, _: &Tensor, _: Mask) -> bool {
    false
}

/// [`attention`] through FlashAttention-2 (CUDA, bf16, no additive mask).
#[cfg(feature = "cuda")]
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> Result<Tensor> {
    if let Mask::Additive(_) = mask {
        candle_core::bail!("flash attention takes no additive mask");
    }
    let unbatched = q.rank() == 3;
    let as_blhd = |t: &Tensor| -> Result<Tensor> {
        let t = if unbatched {
            t.unsqueeze(0)?
        } else {
            t.clone()
        };
        // [B, H, L, D] -> a [B, L, H, D] view: the kernel takes strides.
        t.transpose(1, 2)
    };
    let out = kubewan_flash_attn::flash_attn(
        &as_blhd(q)?,
        &as_blhd(k)?,
        &as_blhd(v)?,
        scale as f32,
        matches!(mask, Mask::Causal),
    )?
    .transpose(1, 2)?;
    if unbatched { out.squeeze(0) } else { Ok(out) }
}

/// Without CUDA there is no flash attention; [`attention`] never calls this.
#[cfg(not(feature = "cuda"))]
pub fn flash_attention(_: &Tensor, _: &Tensor, _: &Tensor, _: Mask, _: f64) -> Result<Tensor> {
    candle_core::bail!("flash attention needs a build with the `cuda` feature")
}

/// [`attention`] with the queries processed in chunks, so the f32 score
/// matrix stays bounded for long videos. The products run in the inputs'
/// dtype and the softmax in f32 (transformers' eager attention, diffusers'
/// Wan attention).
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> Result<Tensor> {
    attention_in_chunks(q, k, v, mask, scale, score_budget(q.device()))
}

fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
    budget_elems: usize,
) -> Result<Tensor> {
    let rank = q.rank();
    if rank < 2 || k.rank() != rank || v.rank() != rank {
        candle_core::bail!(
            "attention needs [.., L, D] tensors of one rank, got q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let seq_axis = rank - 2;
    let k = repeat_kv_heads(k, q)?;
    // (candle's matmul takes no value heads that are a transposed view)
    let v = repeat_kv_heads(v, q)?.contiguous()?;
    let queries = q.dim(seq_axis)?;
    let keys = k.dim(seq_axis)?;
    let batch: usize = q.dims()[..seq_axis].iter().product();
    let kt = k.transpose(seq_axis, seq_axis + 1)?.contiguous()?;
    let chunk = chunk_queries(budget_elems, batch, queries, keys);
    let mut outs = Vec::with_capacity(queries.div_ceil(chunk));
    let mut start = 0;
    while start < queries {
        let len = chunk.min(queries - start);
        let mut scores = q.narrow(seq_axis, start, len)?.contiguous()?.matmul(&kt)?;
        if scale != 1.0 {
            scores = (scores * scale)?;
        }
        let mut scores = scores.to_dtype(DType::F32)?;
        match mask {
            Mask::None => {}
            Mask::Causal => {
                let rows = causal_rows(start, len, queries, keys, q.device())?;
                scores = scores.broadcast_add(&rows)?;
            }
            Mask::Additive(mask) => {
                let rows = mask_rows(mask, start, len, queries)?;
                scores = scores.broadcast_add(&rows.to_dtype(DType::F32)?)?;
            }
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    match outs.len() {
        1 => Ok(outs.remove(0)),
        _ => Tensor::cat(&outs, seq_axis),
    }
}

/// `kv` with each of its heads repeated so it has as many as `q` (axis
/// rank−3; grouped-query attention), or as it is when they already match.
fn repeat_kv_heads(kv: &Tensor, q: &Tensor) -> Result<Tensor> {
    let rank = q.rank();
    if rank < 3 || kv.dims()[..rank - 2] == q.dims()[..rank - 2] {
        return Ok(kv.clone());
    }
    let heads_axis = rank - 3;
    let (heads, kv_heads) = (q.dim(heads_axis)?, kv.dim(heads_axis)?);
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!(
            "attention: k/v {:?} do not fit q {:?} ({kv_heads} k/v heads for {heads} query heads)",
            kv.shape(),
            q.shape()
        );
    }
    let mut repeated = kv.dims().to_vec();
    repeated.insert(heads_axis + 1, heads / kv_heads);
    let mut grouped = kv.dims().to_vec();
    grouped[heads_axis] = heads;
    kv.unsqueeze(heads_axis + 1)?
        .broadcast_as(repeated)?
        .reshape(grouped)
}

/// The additive causal mask rows for queries `start..start + len` of
/// `queries`, over `keys` keys (`-inf` where `j > i + keys − queries`): `[len, keys]` f32.
fn causal_rows(
    start: usize,
    len: usize,
    queries: usize,
    keys: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let past = keys.saturating_sub(queries);
    let rows: Vec<f32> = (start..start + len)
        .flat_map(|i| (0..keys).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(rows, (len, keys), device)
}

/// The rows of `mask` for queries `start..start + len` of `queries` (a mask
/// with a single row applies to every query as it is).
fn mask_rows(mask: &Tensor, start: usize, len: usize, queries: usize) -> Result<Tensor> {
    let rank = mask.rank();
    if rank >= 2 && len < queries && mask.dim(rank - 2)? == queries {
        mask.narrow(rank - 2, start, len)
    } else {
        Ok(mask.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    /// Standard normal values of `shape` on the CPU.
    fn randn<S: Into<candle_core::Shape>>(shape: S) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn score_blocks_are_one_chunk_of_queries_with_an_additive_mask() {
        let cpu = Device::Cpu;
        // Small enough for one chunk: every score at once.
        assert_eq!(
            attention_score_elems(&cpu, 2, 100, 50, 64, true),
            2 * 100 * 50
        );
        // 12 heads x 32760 tokens: 170 queries a chunk within the 64 Mi budget.
        let wan_480p = attention_score_elems(&cpu, 12, 32_760, 32_760, 128, true);
        assert_eq!(wan_480p, 12 * 170 * 32_760);
        assert!(wan_480p <= 64 << 20);
        // Without one the CPU holds tiles only: the same at 3120 and 32 760 tokens.
        let tiles = attention_score_elems(&cpu, 12, 32_760, 32_760, 128, false);
        assert_eq!(
            tiles,
            attention_score_elems(&cpu, 12, 3120, 3120, 128, false)
        );
        assert!(tiles < wan_480p / 100);
    }

    #[test]
    fn chunked_attention_matches_one_chunk() {
        let q = randn((1, 2, 37, 8));
        let k = randn((1, 2, 23, 8));
        let v = randn((1, 2, 23, 8));
        // a causal-style mask with one row per query, and a padding mask with one row
        let rows = randn((37, 23));
        let padding = randn((1, 1, 1, 23));
        for mask in [
            Mask::None,
            Mask::Causal,
            Mask::Additive(&rows),
            Mask::Additive(&padding),
        ] {
            let whole = attention_in_chunks(&q, &k, &v, mask, 0.3, usize::MAX / 2).unwrap();
            // 2 heads x 23 keys x 5 queries per chunk: 8 chunks, the last one short
            let parts = attention_in_chunks(&q, &k, &v, mask, 0.3, 2 * 23 * 5).unwrap();
            let err = max_abs_diff(&whole, &parts);
            assert!(err < 1e-6, "{err}");
        }
    }

    #[test]
    fn causal_mask_hides_later_keys_behind_a_cache() {
        let dev = Device::Cpu;
        // 3 queries after 2 cached positions: query i sees keys 0..=2+i.
        let q = randn((1, 2, 3, 8));
        let k = randn((1, 2, 5, 8));
        let v = randn((1, 2, 5, 8));
        let explicit: Vec<f32> = (0..3)
            .flat_map(|i| (0..5).map(move |j| if j > 2 + i { f32::NEG_INFINITY } else { 0. }))
            .collect();
        let explicit = Tensor::from_vec(explicit, (3, 5), &dev).unwrap();
        let causal = attention(&q, &k, &v, Mask::Causal, 0.3).unwrap();
        let additive = attention(&q, &k, &v, Mask::Additive(&explicit), 0.3).unwrap();
        assert!(max_abs_diff(&causal, &additive) < 1e-6);
        // the last query sees every key: unmasked attention for that row
        let open = attention(&q, &k, &v, Mask::None, 0.3).unwrap();
        let last = |t: &Tensor| t.narrow(2, 2, 1).unwrap();
        assert!(max_abs_diff(&last(&causal), &last(&open)) < 1e-6);
    }

    #[test]
    fn grouped_kv_heads_equal_repeated_heads() {
        let q = randn((1, 6, 4, 8));
        let k = randn((1, 2, 7, 8));
        let v = randn((1, 2, 7, 8));
        // query heads 0..3 use k/v head 0, heads 3..6 k/v head 1
        let repeat = |t: &Tensor| {
            let heads: Vec<Tensor> = (0..6).map(|h| t.narrow(1, h / 3, 1).unwrap()).collect();
            Tensor::cat(&heads, 1).unwrap()
        };
        let grouped = attention(&q, &k, &v, Mask::Causal, 0.5).unwrap();
        let full = attention(&q, &repeat(&k), &repeat(&v), Mask::Causal, 0.5).unwrap();
        assert!(max_abs_diff(&grouped, &full) < 1e-6);
        let bad = randn((1, 4, 7, 8));
        assert!(attention(&q, &bad, &bad, Mask::None, 0.5).is_err());
    }

    #[test]
    fn merged_heads_are_the_same_on_the_tiled_and_chunked_paths() {
        // Value heads as the DiT passes them: a [B, L, H, D] projection
        // viewed as [B, H, L, D]. No mask runs the tiled path (merged as it
        // writes), an all-zero additive one the chunked path (merged after).
        let q = randn((2, 3, 37, 8));
        let k = randn((2, 3, 23, 8));
        let v = randn((2, 23, 3, 8)).transpose(1, 2).unwrap();
        let zeros = Tensor::zeros((37, 23), DType::F32, &Device::Cpu).unwrap();
        let tiled = attention_merged(&q, &k, &v, Mask::None, 0.3).unwrap();
        let chunked = attention_merged(&q, &k, &v, Mask::Additive(&zeros), 0.3).unwrap();
        assert_eq!(tiled.dims(), [2, 37, 24]);
        assert!(max_abs_diff(&tiled, &chunked) < 1e-5);
        // rank 3 has no heads to merge
        let first = |t: &Tensor| t.get(0).unwrap();
        assert!(attention_merged(&first(&q), &first(&k), &first(&v), Mask::None, 0.3).is_err());
    }

    #[test]
    fn attention_is_softmax_of_scaled_scores_plus_mask() {
        let dev = Device::Cpu;
        // one query, two keys: scores 0.5 * [1, 3] = [0.5, 1.5]; the mask removes key 0
        let q = Tensor::new(&[[1f32]], &dev).unwrap();
        let k = Tensor::new(&[[1f32], [3.]], &dev).unwrap();
        let v = Tensor::new(&[[10f32], [20.]], &dev).unwrap();
        let out = attention(&q, &k, &v, Mask::None, 0.5).unwrap();
        let p1 = 1.0 / (1.0 + (-1f32).exp());
        let want = 10.0 * (1.0 - p1) + 20.0 * p1;
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let mask = Tensor::new(&[[f32::NEG_INFINITY, 0.]], &dev).unwrap();
        let out = attention(&q, &k, &v, Mask::Additive(&mask), 0.5).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [20.]);
    }

    #[test]
    fn rms_norm_over_channels_equals_rms_norm_over_the_last_axis() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2f32, (2, 6, 3, 4), &dev).unwrap();
        let weight = Tensor::randn(1f32, 0.1f32, 6, &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            std::collections::HashMap::from([("weight".to_owned(), weight.clone())]),
            DType::F32,
            &dev,
        );
        let last = RmsNorm::new(6, 1e-6, vb).unwrap();
        let channels = RmsNorm::over_channels(weight.reshape((6, 1, 1)).unwrap(), 1e-6).unwrap();
        let via_last = last
            .forward(&x.permute((0, 2, 3, 1)).unwrap())
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        let err = max_abs_diff(&channels.forward(&x).unwrap(), &via_last);
        assert!(err < 1e-6, "{err}");
        // x / rms(x) * w at one position
        let channels_at_origin = |t: &Tensor| -> Vec<f32> {
            t.get(0)
                .unwrap()
                .permute((1, 2, 0))
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let col = channels_at_origin(&x);
        let got = channels_at_origin(&channels.forward(&x).unwrap());
        let rms = (col.iter().map(|v| v * v).sum::<f32>() / 6.0 + 1e-6).sqrt();
        let w = weight.to_vec1::<f32>().unwrap();
        for c in 0..6 {
            assert!((got[c] - col[c] / rms * w[c]).abs() < 1e-5);
        }
    }

    #[test]
    fn linear_runs_small_bf16_batches_on_the_kernel_and_the_rest_on_candle() {
        let dev = Device::Cpu;
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let weight = bf16(randn((37, 70)));
        let bias = bf16(randn(37));
        let ours = Linear::new(weight.clone(), Some(bias.clone()));
        let candle = candle_nn::Linear::new(weight, Some(bias));
        let rows = |n: usize| bf16(Tensor::randn(0f32, 1f32, (1, n, 70), &dev).unwrap());
        // A decode step: the kernel, within a bf16 rounding of candle's result.
        let x = rows(1);
        let (got, want) = (ours.forward(&x).unwrap(), candle.forward(&x).unwrap());
        assert_eq!(got.dims(), [1, 1, 37]);
        let to_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let err = max_abs_diff(&to_f32(&got), &to_f32(&want));
        let scale = to_f32(&want).abs().unwrap().max_keepdim(2).unwrap();
        assert!(err <= scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] / 64.0);
        // A prefill: candle's own matmul, bit for bit.
        let x = rows(small_batch::MAX_ROWS + 1);
        let (got, want) = (ours.forward(&x).unwrap(), candle.forward(&x).unwrap());
        assert_eq!(
            to_f32(&got).to_vec3::<f32>().unwrap(),
            to_f32(&want).to_vec3::<f32>().unwrap()
        );
    }

    #[test]
    fn rms_norm_returns_the_input_dtype() {
        let dev = Device::Cpu;
        let weight = Tensor::ones(4, DType::F32, &dev).unwrap();
        let norm = RmsNorm::over_channels(weight, 1e-6).unwrap();
        let x = Tensor::new(&[300f32, -300., 300., -300.], &dev)
            .unwrap()
            .reshape((1, 4, 1, 1))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = norm.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let y: Vec<f32> = y
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, [1., -1., 1., -1.]);
    }
}
