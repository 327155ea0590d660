//! The CPU f32 path of [`super::CausalConv3d`]: an implicit GEMM.
//!
//! Why: candle's CPU conv2d gathers a 512-pixel im2col tile element by element and runs one
//! small matmul per tile, and the causal conv3d on top of it costs one conv2d per temporal tap
//! plus full-size sums, the concatenation with the cache and the zero frames; PyTorch runs the
//! whole convolution as blocked GEMMs (issue 15: 0.84 s vs 0.28 s for 192 channels at 60×104;
//! this path is 9× faster than candle's on the same machine, docs/benchmarks.md).
//!
//! How: the frames (cached ones first) are copied once into a zero-padded buffer
//! `[T, C_in, Hp, Wp]` with `P = Hp·Wp` elements per channel. Output pixel `(y, x)` of spatial
//! tap `(dy, dx)`, temporal tap `dt` and input channel `ci` reads the flat index
//! `((f + dt)·C_in + ci)·P + y·Wp + x + dy·Wp + dx`. Computed on the padded width (column
//! `j = y·Wp + x`), that is a plain matrix: rows `(dt, ci)` at stride `P`, columns at stride 1,
//! offset `dy·Wp + dx`. So each spatial tap is one GEMM `[C_out, kt·C_in] × [kt·C_in, H_out·Wp]`
//! accumulated into one buffer; gemm's packing does the im2col in cache-sized blocks, and no
//! im2col matrix is materialised. The `Wp − W_out` columns past each row are junk and dropped
//! when the bias is added. The causal zero frames are never stored: their temporal taps are
//! left out of the GEMM (`K` shrinks), which is exact.

use candle_core::{Device, Result, Storage, Tensor};
use kubewan_model_common::parallel::gemm_parallelism;

/// Convolution weights regrouped per spatial tap: `[kh·kw][C_out][kt][C_in]`.
#[derive(Debug, Clone)]
pub(super) struct TapMajorWeights {
    data: Vec<f32>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    kt: usize,
    kh: usize,
    kw: usize,
}

/// The spatial and temporal layout of one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub stride_t: usize,
    pub pad_h: usize,
    pub pad_w: usize,
    /// Zero frames in front of the stored ones.
    pub lead_zeros: usize,
}

impl TapMajorWeights {
    /// `weight`: `[C_out, C_in, kt, kh, kw]`, `bias`: `[C_out]`, both f32.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (c_out, c_in, kt, kh, kw) = weight.dims5()?;
        let data = weight
            .permute((3, 4, 0, 2, 1))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            data,
            bias: bias.to_vec1::<f32>()?,
            c_in,
            c_out,
            kt,
            kh,
            kw,
        })
    }

    /// `frames`: the stored input frames `[T, C_in, H, W]` (cache then chunk), contiguous f32
    /// on the CPU. Returns `[T_out, C_out, H_out, W_out]`.
    pub fn conv(&self, frames: &[&Tensor], geo: Geometry) -> Result<Tensor> {
        let (_, c, h, w) = frames[0].dims4()?;
        if c != self.c_in {
            candle_core::bail!(
                "causal conv3d: {c} input channels, weights for {}",
                self.c_in
            );
        }
        let stored: usize = frames.iter().map(|f| f.dim(0)).sum::<Result<usize>>()?;
        let t_in = geo.lead_zeros + stored;
        if t_in < self.kt {
            candle_core::bail!(
                "causal conv3d: {t_in} frames for a temporal kernel of {}",
                self.kt
            );
        }
        let t_out = (t_in - self.kt) / geo.stride_t + 1;
        let (hp, wp) = (h + 2 * geo.pad_h, w + 2 * geo.pad_w);
        let (h_out, w_out) = (hp + 1 - self.kh, wp + 1 - self.kw);
        let padded = self.pad(frames, h, w, geo)?;
        let plane = hp * wp;
        let cols = h_out * wp;
        let mut acc = vec![0f32; self.c_out * cols];
        let mut out = Vec::with_capacity(t_out * self.c_out * h_out * w_out);
        for o in 0..t_out {
            let first = o * geo.stride_t;
            // Temporal taps that fall on causal zero frames contribute nothing.
            let d0 = geo.lead_zeros.saturating_sub(first);
            let rows = (first + d0 - geo.lead_zeros) * c * plane;
            for (s, (dy, dx)) in self.spatial_taps().enumerate() {
                let rhs = &padded[rows + dy * wp + dx..];
                self.accumulate_tap(&mut acc, cols, s, d0, rhs, plane, s > 0);
            }
            for (co, row) in acc.chunks_exact(cols).enumerate() {
                let b = self.bias[co];
                for y in 0..h_out {
                    out.extend(row[y * wp..y * wp + w_out].iter().map(|v| v + b));
                }
            }
        }
        Tensor::from_vec(out, (t_out, self.c_out, h_out, w_out), &Device::Cpu)
    }

    fn spatial_taps(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let kw = self.kw;
        (0..self.kh * kw).map(move |s| (s / kw, s % kw))
    }

    /// The frames, spatially zero-padded, one after the other, plus `kw − 1` zeros at the end
    /// that the last row's junk columns read.
    fn pad(&self, frames: &[&Tensor], h: usize, w: usize, geo: Geometry) -> Result<Vec<f32>> {
        let (hp, wp) = (h + 2 * geo.pad_h, w + 2 * geo.pad_w);
        let stored: usize = frames.iter().map(|f| f.elem_count()).sum();
        let channels = stored / (h * w);
        let mut padded = vec![0f32; channels * hp * wp + self.kw - 1];
        let mut dst_planes = padded.chunks_exact_mut(hp * wp);
        for f in frames {
            with_cpu_f32(f, |src| {
                for (src_plane, dst_plane) in src.chunks_exact(h * w).zip(&mut dst_planes) {
                    for (y, src_row) in src_plane.chunks_exact(w).enumerate() {
                        let at = (y + geo.pad_h) * wp + geo.pad_w;
                        dst_plane[at..at + w].copy_from_slice(src_row);
                    }
                }
            })?;
        }
        Ok(padded)
    }

    /// `acc (+)= W[s][:, d0·C_in..] × rhs` with `rhs` rows at stride `plane`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_tap(
        &self,
        acc: &mut [f32],
        cols: usize,
        s: usize,
        d0: usize,
        rhs: &[f32],
        plane: usize,
        read_acc: bool,
    ) {
        let k_row = self.kt * self.c_in;
        let k = (self.kt - d0) * self.c_in;
        let lhs = &self.data[s * self.c_out * k_row + d0 * self.c_in..];
        // The last element the GEMM reads; `pad` sized the buffer for it.
        assert!(lhs.len() > (self.c_out - 1) * k_row + k - 1);
        assert!(rhs.len() > (k - 1) * plane + cols - 1);
        assert_eq!(acc.len(), self.c_out * cols);
        let parallelism = gemm_parallelism();
        // SAFETY: the asserts above keep every read of lhs ([C_out, k] at row stride k_row) and
        // rhs ([k, cols] at row stride plane) and every write of acc ([C_out, cols]) in bounds.
        unsafe {
            gemm::gemm(
                self.c_out,
                cols,
                k,
                acc.as_mut_ptr(),
                1,
                cols as isize,
                read_acc,
                lhs.as_ptr(),
                1,
                k_row as isize,
                rhs.as_ptr(),
                1,
                plane as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("causal conv3d: CPU path given a {:?} tensor", t.device());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("causal conv3d: CPU path given a strided tensor");
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}
