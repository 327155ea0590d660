//! The Qwen2.5-VL vision tower (`visual.*` / `model.visual.*`): Conv3d patch
//! embedding (done as one matmul over flattened patches), 2-D rotary
//! embedding, window attention with full attention in `fullatt_block_indexes`,
//! per-image `cu_seqlens`, RMSNorm, SwiGLU MLP and the 2×2 patch merger.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use kubewan_model_common::activation::{gelu_erf, swiglu};
use kubewan_model_common::nn::{Linear, Mask, RmsNorm, attention, linear};

use crate::config::VisionConfig;
use crate::nn::{apply_rotary, inv_freq};

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(h, i, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, vb.pp("up_proj"))?,
            down_proj: linear(i, h, vb.pp("down_proj"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            qkv: linear(h, 3 * h, vb.pp("qkv"))?,
            proj: linear(h, h, vb.pp("proj"))?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: (N, hidden); `cos`/`sin`: (N, 1, head_dim) f32; `cu`: segment boundaries.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cu: &[usize]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let dtype = x.dtype();
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((n, 3, self.heads, self.head_dim))?;
        let rot = |t: Tensor| -> Result<Tensor> {
            apply_rotary(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)
        };
        let q = rot(qkv.narrow(1, 0, 1)?.squeeze(1)?)?;
        let k = rot(qkv.narrow(1, 1, 1)?.squeeze(1)?)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(cu.len());
        for w in cu.windows(2) {
            let (s, len) = (w[0], w[1] - w[0]);
            if len == 0 {
                continue;
            }
            let take = |t: &Tensor| t.narrow(0, s, len)?.transpose(0, 1)?.contiguous();
            let o = attention(&take(&q)?, &take(&k)?, &take(&v)?, Mask::None, scale)?;
            outs.push(
                o.transpose(0, 1)?
                    .reshape((len, self.heads * self.head_dim))?,
            );
        }
        let o = Tensor::cat(&outs, 0)?;
        self.proj.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    attn: Attention,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::new(cfg.hidden_size, 1e-6, vb.pp("norm1"))?,
            norm2: RmsNorm::new(cfg.hidden_size, 1e-6, vb.pp("norm2"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cu: &[usize]) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, cos, sin, cu)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: RmsNorm,
    fc1: Linear,
    fc2: Linear,
    merged: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let merged = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: RmsNorm::new(cfg.hidden_size, 1e-6, vb.pp("ln_q"))?,
            fc1: linear(merged, merged, vb.pp("mlp.0"))?,
            fc2: linear(merged, cfg.out_hidden_size, vb.pp("mlp.2"))?,
            merged,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_q.forward(x)?;
        let n = x.elem_count() / self.merged;
        let x = x.reshape((n, self.merged))?;
        self.fc2.forward(&gelu_erf(&self.fc1.forward(&x)?)?)
    }
}

/// Window ordering of the merged cells and the window boundaries in patches,
/// as transformers' `get_vision_window_index` computes them.
pub fn window_index(
    cfg: &VisionConfig,
    grids: &[(usize, usize, usize)],
) -> (Vec<usize>, Vec<usize>) {
    let m = cfg.spatial_merge_size;
    let unit = m * m;
    let ws = cfg.window_size / m / cfg.patch_size;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut base = 0;
    for &(t, h, w) in grids {
        let (lh, lw) = (h / m, w / m);
        let (nwh, nww) = (lh.div_ceil(ws), lw.div_ceil(ws));
        for ti in 0..t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut count = 0;
                    for r in 0..ws {
                        for c in 0..ws {
                            let (y, x) = (wy * ws + r, wx * ws + c);
                            if y < lh && x < lw {
                                index.push(base + ti * lh * lw + y * lw + x);
                                count += 1;
                            }
                        }
                    }
                    if count > 0 {
                        cu.push(cu.last().unwrap() + count * unit);
                    }
                }
            }
        }
        base += t * lh * lw;
    }
    (index, cu)
}

/// (h, w) position of every patch, in the 2×2-merge-block order of the processor.
pub fn patch_positions(cfg: &VisionConfig, grids: &[(usize, usize, usize)]) -> Vec<(usize, usize)> {
    let m = cfg.spatial_merge_size;
    let mut pos = Vec::new();
    for &(t, h, w) in grids {
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            pos.push((bh * m + mh, bw * m + mw));
                        }
                    }
                }
            }
        }
    }
    pos
}

#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger: PatchMerger,
    cfg: VisionConfig,
    device: Device,
}

impl VisionTower {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let k = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let w = vb.pp("patch_embed.proj").get(
            (
                cfg.hidden_size,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ),
            "weight",
        )?;
        let patch_embed = w.reshape((cfg.hidden_size, k))?.t()?.contiguous()?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            blocks,
            merger: PatchMerger::new(cfg, vb.pp("merger"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// Number of values per flattened patch (`C * T * P * P`).
    pub fn patch_len(&self) -> usize {
        self.patch_embed.dim(0).unwrap_or(0)
    }

    /// `pixels`: (N, C*T*P*P) f32 flattened patches of all images; `grids`: (t, h, w) per
    /// image in patches. Returns (N / merge², out_hidden_size) in image order.
    pub fn forward(&self, pixels: &Tensor, grids: &[(usize, usize, usize)]) -> Result<Tensor> {
        let dtype = self.patch_embed.dtype();
        let n = pixels.dim(0)?;
        let expected: usize = grids.iter().map(|(t, h, w)| t * h * w).sum();
        if n != expected {
            candle_core::bail!("{n} patches for grids {grids:?} ({expected} expected)");
        }
        let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let x = pixels.to_dtype(dtype)?.matmul(&self.patch_embed)?;

        let (widx, cu_window) = window_index(&self.cfg, grids);
        // rows in window order: patch j of merged cell widx[i]
        let perm: Vec<u32> = widx
            .iter()
            .flat_map(|&c| (0..unit).map(move |j| (c * unit + j) as u32))
            .collect();
        let perm_t = Tensor::from_vec(perm.clone(), n, &self.device)?;
        let mut x = x.index_select(&perm_t, 0)?;

        // rotary angles, in window order
        let hd = self.cfg.head_dim();
        let freqs = inv_freq(hd / 2, self.cfg.rope_theta);
        let pos = patch_positions(&self.cfg, grids);
        let q = freqs.len();
        let mut cos = vec![0f32; n * hd];
        let mut sin = vec![0f32; n * hd];
        for (row, &p) in perm.iter().enumerate() {
            let (ph, pw) = pos[p as usize];
            for (i, f) in freqs.iter().enumerate() {
                for (slot, posv) in [(i, ph), (q + i, pw)] {
                    let a = posv as f32 * f;
                    let (s, c) = a.sin_cos();
                    for half in [0, 2 * q] {
                        cos[row * hd + half + slot] = c;
                        sin[row * hd + half + slot] = s;
                    }
                }
            }
        }
        let cos = Tensor::from_vec(cos, (n, 1, hd), &self.device)?;
        let sin = Tensor::from_vec(sin, (n, 1, hd), &self.device)?;

        let mut cu_full = vec![0usize];
        for (t, h, w) in grids {
            for _ in 0..*t {
                cu_full.push(cu_full.last().unwrap() + h * w);
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let cu = if self.cfg.fullatt_block_indexes.contains(&i) {
                &cu_full
            } else {
                &cu_window
            };
            x = block.forward(&x, &cos, &sin, cu)?;
        }
        let merged = self.merger.forward(&x)?;
        // back to image order: output cell c is merged row i where widx[i] == c
        let mut inverse = vec![0u32; widx.len()];
        for (i, &c) in widx.iter().enumerate() {
            inverse[c] = i as u32;
        }
        let inv_t = Tensor::from_vec(inverse, widx.len(), &self.device)?;
        merged.index_select(&inv_t, 0)
    }
}
