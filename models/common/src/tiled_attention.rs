//! Attention on the CPU without the score matrix: the flash-attention
//! recurrence (online softmax) over tiles of queries and keys.
//!
//! For one (batch·head, block of queries) at a time, each block of keys gives
//! the scores `S = Q·Kᵀ·scale` of the tile; a running row maximum `m` and sum
//! `l` rescale the f32 output accumulator `O` whenever the maximum grows, and
//! `O += exp(S − m)·V`; at the end `O / l` is the softmax-weighted sum. Memory
//! is a few tiles per worker instead of `L_q × L_k` scores, so it grows
//! linearly with the tokens, and the products run as `gemm`'s kernels (the
//! ones candle's CPU matmul uses) on tiles that stay in the cache.
//!
//! Everything runs in f32: bf16 and f16 tiles are widened as they are read and
//! the output narrowed once per block, so half-precision inputs lose nothing
//! to rounded intermediate scores.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::nn::Mask;

/// Queries per tile: enough rows that a key tile, once loaded, is reused
/// across many queries, few enough that the tiles of one worker stay in L2.
const QUERY_TILE: usize = 64;
/// Keys per tile.
const KEY_TILE: usize = 256;

/// Whether [`tiled_attention`] computes `attention(q, k, v, mask)`: CPU
/// tensors of one float dtype, no additive mask, `[.., L, D]` queries and
/// equally shaped keys and values of the same head dim, the leading axes
/// equal except the heads (axis rank−3), whose count in k/v divides q's, and
/// at least one key. Anything else stays on the chunked attention (which
/// also reports the shape errors).
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> bool {
    let rank = q.rank();
    let dtype = q.dtype();
    q.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && !matches!(mask, Mask::Additive(_))
        && rank >= 2
        && k.dims() == v.dims()
        && k.rank() == rank
        && k.dims()[rank - 1] == q.dims()[rank - 1]
        && k.dims()[rank - 2] > 0
        && heads_fit(q.dims(), k.dims())
}

/// Leading axes equal, except that k/v may have fewer heads (axis rank−3)
/// when their count divides the queries'.
fn heads_fit(q: &[usize], kv: &[usize]) -> bool {
    let rank = q.len();
    if rank < 3 {
        return true;
    }
    let (heads, kv_heads) = (q[rank - 3], kv[rank - 3]);
    q[..rank - 3] == kv[..rank - 3] && kv_heads > 0 && heads.is_multiple_of(kv_heads)
}

/// f32 elements [`tiled_attention`] holds besides its inputs and output for
/// `rows` (batch × heads) of `queries` attending to `keys` of `head_dim`: per
/// busy worker the score tile, the output accumulator, widened q/k/v tiles
/// and the row statistics.
pub(crate) fn scratch_elems(rows: usize, queries: usize, keys: usize, head_dim: usize) -> usize {
    let (n, width) = (QUERY_TILE.min(queries), KEY_TILE.min(keys));
    let tasks = rows * queries.div_ceil(QUERY_TILE);
    let per_worker = n * width + 2 * n * head_dim + 2 * width * head_dim + 2 * n;
    workers().min(tasks) * per_worker
}

/// Workers [`tiled_attention`] runs on: candle's CPU thread count, which
/// honours `RAYON_NUM_THREADS` as candle's matmuls do.
fn workers() -> usize {
    candle_core::utils::get_num_threads()
}

/// `softmax(q·kᵀ·scale + mask)·v` for inputs [`applies`] accepts; the result
/// is contiguous, shaped and typed like `q`.
pub(crate) fn tiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> Result<Tensor> {
    let shape = Shape::of(q, k, matches!(mask, Mask::Causal));
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = match q.dtype() {
        DType::F32 => attend::<f32>(&shape, &q, &k, &v, scale as f32)?,
        DType::BF16 => attend::<bf16>(&shape, &q, &k, &v, scale as f32)?,
        DType::F16 => attend::<f16>(&shape, &q, &k, &v, scale as f32)?,
        other => candle_core::bail!("tiled attention: unsupported dtype {other:?}"),
    };
    out.reshape(q.shape())
}

/// The sizes the kernel iterates over.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Query heads per k/v head (1 without grouped-query attention).
    group: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    /// Keys before the first query when causal (a KV cache), as the chunked
    /// path's causal mask aligns them: query `i` sees keys `0..=past + i`.
    past: usize,
    causal: bool,
}

impl Shape {
    fn of(q: &Tensor, k: &Tensor, causal: bool) -> Self {
        let rank = q.rank();
        let (queries, keys, head_dim) =
            (q.dims()[rank - 2], k.dims()[rank - 2], q.dims()[rank - 1]);
        let rows: usize = q.dims()[..rank - 2].iter().product();
        let kv_rows: usize = k.dims()[..rank - 2].iter().product();
        Self {
            group: rows / kv_rows,
            queries,
            keys,
            head_dim,
            past: keys.saturating_sub(queries),
            causal,
        }
    }

    /// Keys query `i` may see: `0..visible_keys(i)`.
    fn visible_keys(&self, query: usize) -> usize {
        if self.causal {
            (self.past + query + 1).min(self.keys)
        } else {
            self.keys
        }
    }
}

/// A float type attention reads and writes, computed in f32.
trait Element: candle_core::WithDType + Send + Sync {
    /// `src` as f32: itself when already f32, else widened into `scratch`.
    fn widen<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    fn widen<'a>(src: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }

    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

macro_rules! half_element {
    ($t:ty) => {
        impl Element for $t {
            fn widen<'a>(src: &'a [$t], scratch: &'a mut Vec<f32>) -> &'a [f32] {
                scratch.resize(src.len(), 0.0);
                src.convert_to_f32_slice(scratch);
                scratch
            }

            fn narrow(src: &[f32], dst: &mut [$t]) {
                dst.convert_from_f32_slice(src);
            }
        }
    };
}
half_element!(bf16);
half_element!(f16);

/// The contiguous elements of a contiguous CPU tensor.
fn cpu_slice<T: Element>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<Tensor>) -> Result<Tensor> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("tiled attention runs on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("tiled attention needs contiguous inputs");
    };
    f(&CpuStorage::as_slice::<T>(cpu)?[start..end])
}

/// Runs every (row, query tile) on the CPU workers and returns `[rows·L_q·D]`.
fn attend<T: Element>(
    shape: &Shape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    cpu_slice::<T>(q, |q| {
        cpu_slice::<T>(k, |k| {
            cpu_slice::<T>(v, |v| {
                let out = attend_slices(shape, q, k, v, scale);
                Tensor::from_vec(out, q.len(), &Device::Cpu)
            })
        })
    })
}

fn attend_slices<T: Element>(shape: &Shape, q: &[T], k: &[T], v: &[T], scale: f32) -> Vec<T> {
    let d = shape.head_dim;
    let mut out = vec![T::from_f64(0.0); q.len()];
    if out.is_empty() {
        return out;
    }
    let per_row = shape.queries * d;
    let per_kv_row = shape.keys * d;
    // One task per (row, query tile); rayon's pool (already running for
    // candle) rather than spawned threads, since a decoding step attends with
    // a single query many times a second and cannot pay for thread starts.
    let tasks: Vec<(usize, usize, &mut [T])> = out
        .chunks_mut(per_row)
        .enumerate()
        .flat_map(|(row, o)| {
            o.chunks_mut(QUERY_TILE * d)
                .enumerate()
                .map(move |(tile, o)| (row, tile * QUERY_TILE, o))
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, (row, first, o)| {
            let kv_row = row / shape.group;
            let tile = QueryTile {
                first,
                q: &q[row * per_row + first * d..][..o.len()],
                k: &k[kv_row * per_kv_row..][..per_kv_row],
                v: &v[kv_row * per_kv_row..][..per_kv_row],
            };
            attend_tile(shape, &tile, scale, scratch, o);
        });
    out
}

/// One block of queries of one row and the keys and values it attends to.
struct QueryTile<'a, T> {
    /// Index of the block's first query.
    first: usize,
    /// `[n, D]`.
    q: &'a [T],
    /// `[L_k, D]`.
    k: &'a [T],
    v: &'a [T],
}

/// A worker's buffers, reused across its tasks.
#[derive(Default)]
struct Scratch {
    rows: RowState,
    /// Widened tiles (unused for f32).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The online softmax's state for the rows of one query tile.
#[derive(Default)]
struct RowState {
    /// The current score tile, then its weights.
    scores: Vec<f32>,
    /// The unnormalised output.
    acc: Vec<f32>,
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
}

/// The online softmax over the key tiles for one query tile, written to `out`.
fn attend_tile<T: Element>(
    shape: &Shape,
    tile: &QueryTile<T>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [T],
) {
    let d = shape.head_dim;
    let n = tile.q.len() / d;
    let q = T::widen(tile.q, &mut s.q);
    s.rows.acc.clear();
    s.rows.acc.resize(n * d, 0.0);
    s.rows.row_max.clear();
    s.rows.row_max.resize(n, f32::NEG_INFINITY);
    s.rows.row_sum.clear();
    s.rows.row_sum.resize(n, 0.0);
    // Causal: keys past the last query's horizon are masked for the whole tile.
    let keys = shape.visible_keys(tile.first + n - 1);
    for first_key in (0..keys).step_by(KEY_TILE) {
        let width = KEY_TILE.min(keys - first_key);
        let kv = first_key * d..(first_key + width) * d;
        let k = T::widen(&tile.k[kv.clone()], &mut s.k);
        s.rows.scores.resize(n * width, 0.0);
        // S = scale·Q·Kᵀ: [n, D] × [D, width] with K's rows as Kᵀ's columns.
        matmul(
            &mut s.rows.scores,
            Operand::rows(q, d),
            Operand::cols(k, d),
            (n, width, d),
            scale,
            false,
        );
        let rows = ScoreRows {
            first_query: tile.first,
            first_key,
            width,
        };
        online_softmax(shape, &rows, &mut s.rows);
        // O += P·V: [n, width] × [width, D].
        let v = T::widen(&tile.v[kv], &mut s.v);
        matmul(
            &mut s.rows.acc,
            Operand::rows(&s.rows.scores, width),
            Operand::rows(v, d),
            (n, d, width),
            1.0,
            true,
        );
    }
    for (i, acc) in s.rows.acc.chunks_exact_mut(d).enumerate() {
        let inv = 1.0 / s.rows.row_sum[i];
        acc.iter_mut().for_each(|o| *o *= inv);
    }
    T::narrow(&s.rows.acc, out);
}

/// Where a tile of scores lies in the attention matrix.
struct ScoreRows {
    first_query: usize,
    first_key: usize,
    /// Keys in the tile (the scores' row length).
    width: usize,
}

/// One step of the online softmax for every row of the score tile in
/// `s.scores`, compiled for the widest vector unit the CPU has: the
/// exponentials cost as much as the tile products otherwise (the crate is
/// built for baseline x86-64, whose 4-lane SSE2 leaves most of an AVX-512
/// unit idle).
fn online_softmax(shape: &Shape, rows: &ScoreRows, s: &mut RowState) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the one feature the function enables.
            return unsafe { online_softmax_avx512(shape, rows, s) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the one feature the function enables.
            return unsafe { online_softmax_avx2(shape, rows, s) };
        }
    }
    online_softmax_rows(shape, rows, s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn online_softmax_avx512(shape: &Shape, rows: &ScoreRows, s: &mut RowState) {
    online_softmax_rows(shape, rows, s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn online_softmax_avx2(shape: &Shape, rows: &ScoreRows, s: &mut RowState) {
    online_softmax_rows(shape, rows, s);
}

/// [`online_softmax`]'s body, inlined into each feature-specific copy.
#[inline(always)]
fn online_softmax_rows(shape: &Shape, rows: &ScoreRows, s: &mut RowState) {
    let d = shape.head_dim;
    let scores = s.scores.chunks_exact_mut(rows.width);
    let outputs = s.acc.chunks_exact_mut(d);
    let stats = s.row_max.iter_mut().zip(s.row_sum.iter_mut());
    for (i, ((scores, out), (max, sum))) in scores.zip(outputs).zip(stats).enumerate() {
        let visible = shape.visible_keys(rows.first_query + i);
        let visible = visible.saturating_sub(rows.first_key).min(rows.width);
        let rescale = softmax_step(scores, visible, max, sum);
        if rescale != 1.0 {
            out.iter_mut().for_each(|o| *o *= rescale);
        }
    }
}

/// One step of the online softmax for a row of scores whose first `visible`
/// entries count: updates the running maximum and sum, replaces the scores
/// with their weights `exp(s − max)` (0 where masked) and returns the factor
/// the row's accumulated output must be scaled by for the new maximum.
#[inline(always)]
fn softmax_step(scores: &mut [f32], visible: usize, max: &mut f32, sum: &mut f32) -> f32 {
    let (seen, masked) = scores.split_at_mut(visible);
    masked.fill(0.0);
    let new_max = max_of(seen).max(*max);
    if new_max == f32::NEG_INFINITY {
        // Nothing visible yet: the weights are all 0 and nothing to rescale.
        seen.fill(0.0);
        return 1.0;
    }
    let rescale = exp(*max - new_max);
    *sum = *sum * rescale + exp_and_sum(seen, new_max);
    *max = new_max;
    rescale
}

/// Lanes of the reductions: independent accumulators the compiler turns into
/// vector registers (a float reduction is not reassociated otherwise).
const LANES: usize = 16;

#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, x) in lanes.iter_mut().zip(chunk) {
            *m = if *x > *m { *x } else { *m };
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// Replaces each `x` with `exp(x − max)` and returns their sum.
#[inline(always)]
fn exp_and_sum(xs: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in lanes.iter_mut().zip(chunk) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|x| {
            *x = exp(*x - max);
            *x
        })
        .sum();
    tail + lanes.iter().sum::<f32>()
}

/// `eˣ` for `x ≤ 0` (as the softmax needs), within 2 ulp, branch-free so the
/// loops over a row vectorise: `x = n·ln 2 + r`, `eˣ = 2ⁿ·eʳ` with a degree-6
/// polynomial for `eʳ` on `|r| ≤ ln 2 / 2` (Cephes' expf). Below the smallest
/// normal result it returns about 1e-38 rather than 0, `-inf` included.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the mantissa's low bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2ⁿ from n's bits: the integer sits in `shifted`'s mantissa.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// A row-major matrix operand of [`matmul`], read either as it is stored or
/// transposed.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    /// Steps between consecutive rows and columns of the operand as used.
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// `data` as a row-major matrix with rows of `width` elements.
    fn rows(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            row_stride: width,
            col_stride: 1,
        }
    }

    /// The transpose of `data` read as a row-major matrix with rows of
    /// `width` elements: its rows are this operand's columns.
    fn cols(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: width,
        }
    }

    /// Whether an `rows × cols` matrix fits in `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst = beta·lhs·rhs` (`accumulate`: `dst += beta·lhs·rhs`) for a row-major
/// `[m, n]` `dst`, `lhs` `[m, k]` and `rhs` `[k, n]`, on the calling thread.
fn matmul(
    dst: &mut [f32],
    lhs: Operand,
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
    beta: f32,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n && lhs.holds(m, k) && rhs.holds(k, n));
    // SAFETY: the assertion keeps every index gemm reads (row·row_stride +
    // col·col_stride of an m×k, k×n operand) or writes (i·n + j of m×n) inside
    // the slices; `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::chunked_attention;

    fn randn<S: Into<candle_core::Shape>>(shape: S) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        let t = t.to_dtype(DType::F32).unwrap();
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// max |tiled − chunked| / max |chunked|. Both compute in f32 and differ
    /// only in summation order (gemm's blocking over D and over the key tiles,
    /// the running rescale) and in exp's last bits: a few ulp of the largest
    /// output per term, so 1e-5 of the largest output (~80 ulp) is far above
    /// rounding yet far below any real error (a wrong mask or tile bound moves
    /// outputs by O(1/keys) of their size, ≥ 1e-3 here).
    fn relative_gap(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> f32 {
        assert!(applies(q, k, v, mask));
        let tiled = tiled_attention(q, k, v, mask, 0.3).unwrap();
        // (candle's matmul in the reference takes no strided v)
        let c = |t: &Tensor| t.contiguous().unwrap();
        let chunked = chunked_attention(&c(q), &c(k), &c(v), mask, 0.3).unwrap();
        assert_eq!(tiled.dims(), chunked.dims());
        assert_eq!(tiled.dtype(), q.dtype());
        max_abs(
            &(tiled.to_dtype(DType::F32).unwrap() - chunked.to_dtype(DType::F32).unwrap()).unwrap(),
        ) / max_abs(&chunked)
    }

    #[test]
    fn tiled_matches_chunked_on_odd_lengths_with_and_without_causal_mask() {
        // Below, at and past one query tile (64) and key tile (256), with
        // fewer, equal and more keys than queries (a KV cache).
        for (queries, keys) in [
            (1, 1),
            (7, 7),
            (65, 65),
            (300, 300),
            (7, 300),
            (65, 7),
            (1, 301),
            (300, 257),
        ] {
            let q = randn((2, 3, queries, 16));
            let k = randn((2, 3, keys, 16));
            let v = randn((2, 3, keys, 16));
            for mask in [Mask::None, Mask::Causal] {
                let gap = relative_gap(&q, &k, &v, mask);
                assert!(gap < 1e-5, "{queries}x{keys} {mask:?}: {gap}");
            }
        }
    }

    #[test]
    fn tiled_matches_chunked_with_grouped_heads_rank_3_and_strided_inputs() {
        // Grouped-query attention: 8 query heads over 2 k/v heads.
        let q = randn((1, 8, 65, 32));
        let (k, v) = (randn((1, 2, 300, 32)), randn((1, 2, 300, 32)));
        for mask in [Mask::None, Mask::Causal] {
            assert!(relative_gap(&q, &k, &v, mask) < 1e-5);
        }
        // [H, L, D] without a batch axis, and [L, D].
        let q3 = randn((4, 70, 8));
        let (k3, v3) = (randn((2, 90, 8)), randn((2, 90, 8)));
        assert!(relative_gap(&q3, &k3, &v3, Mask::Causal) < 1e-5);
        let first = |t: &Tensor| t.get(0).unwrap();
        assert!(relative_gap(&first(&q3), &first(&k3), &first(&v3), Mask::None) < 1e-5);
        // Transposed views of [B, L, H, D] as the models produce them.
        let view = |l: usize| randn((2, l, 4, 16)).transpose(1, 2).unwrap();
        let (q, k, v) = (view(65), view(300), view(300));
        assert!(!q.is_contiguous());
        assert!(relative_gap(&q, &k, &v, Mask::None) < 1e-5);
    }

    #[test]
    fn half_precision_inputs_attend_in_f32() {
        // The tiled path widens bf16/f16 and rounds once at the end; the
        // chunked reference rounds its products and probabilities to the
        // input dtype too, so they agree within a few of its ulp (2⁻⁸ for
        // bf16, 2⁻¹¹ for f16), relative to the largest output.
        let (q, k, v) = (
            randn((1, 4, 65, 64)),
            randn((1, 2, 300, 64)),
            randn((1, 2, 300, 64)),
        );
        for (dtype, tolerance) in [(DType::BF16, 3e-2), (DType::F16, 4e-3)] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let gap = relative_gap(&cast(&q), &cast(&k), &cast(&v), Mask::Causal);
            assert!(gap < tolerance, "{dtype:?}: {gap}");
        }
    }

    #[test]
    fn other_inputs_stay_on_the_chunked_path() {
        let (q, k) = (randn((1, 6, 4, 8)), randn((1, 4, 7, 8)));
        // 4 k/v heads do not divide 6 query heads: the chunked path reports it.
        assert!(!applies(&q, &k, &k, Mask::None));
        let bias = randn((4, 7));
        let k = randn((1, 6, 7, 8));
        assert!(!applies(&q, &k, &k, Mask::Additive(&bias)));
        let ints = k.to_dtype(DType::U32).unwrap();
        assert!(!applies(&q, &ints, &ints, Mask::None));
        let empty = randn((1, 6, 0, 8));
        assert!(!applies(&q, &empty, &empty, Mask::None));
    }

    #[test]
    fn scratch_grows_with_workers_not_tokens() {
        let at = |tokens| scratch_elems(12, tokens, tokens, 128);
        assert_eq!(at(780), at(3120));
        // one worker's tiles: far below the 3120² scores of one head
        assert!(at(3120) / workers() < 3120 * 3120 / 50);
        // a single short query: tiles no larger than the problem
        assert_eq!(scratch_elems(1, 1, 5, 8), 5 + 2 * 8 + 2 * 5 * 8 + 2);
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_softmax_range() {
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON * want,
                "{x}: {got} vs {want}"
            );
        }
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }
}
