//! Attention on the CPU without the score matrix: the flash-attention
//! recurrence (online softmax) over tiles of queries and keys.
//!
//! For one (batch·head, block of queries) at a time, each block of keys gives
//! the scores `S = Q·Kᵀ·scale` of the tile; a running row maximum `m` and sum
//! `l` rescale the f32 output accumulator `O` whenever the maximum grows, and
//! `O += exp(S − m)·V`; at the end `O / l` is the softmax-weighted sum. Memory
//! is a few tiles per worker instead of `L_q × L_k` scores, so it grows
//! linearly with the tokens.
//!
//! The tiles are laid out transposed, queries across the lanes of a vector
//! register: `Sᵀ = K·(scale·Q)ᵀ` and `Oᵀ += Vᵀ·exp(Sᵀ − m)` are then both one
//! product shape whose left operand is read element by element straight from
//! the row-major keys and values (broadcast across the lanes), so no key or
//! value tile is ever repacked (the general gemm repacked both operands of
//! every tile product: a quarter of the time), and the softmax's per-query
//! statistics are plain lane-wise vector operations. Only the queries are
//! transposed, once per block.
//!
//! Everything runs in f32: bf16 and f16 tiles are widened as they are read and
//! the output narrowed once per block, so half-precision inputs lose nothing
//! to rounded intermediate scores.

use std::ops::Range;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::nn::Mask;

/// f32 lanes of the widest vector register (AVX-512).
const LANES: usize = 16;
/// Vectors of queries in a panel.
const PANEL_VECTORS: usize = 3;
/// Queries in a panel, the unit the products work on: a block of
/// [`BLOCK_ROWS`] × `PANEL` accumulators takes 24 of AVX-512's 32 registers,
/// leaving room for a panel row and a broadcast.
const PANEL: usize = PANEL_VECTORS * LANES;
/// Rows of a product's register block.
const BLOCK_ROWS: usize = 8;
/// Most queries per task: the panels that share a key and value tile while
/// it sits in L2 (and 13 equal blocks of 3120 tokens).
const QUERY_TILE: usize = 5 * PANEL;
/// Keys per tile: one panel's scores (`KEY_TILE × PANEL`) stay in L1 while
/// the values' product reads them once per block of output rows.
const KEY_TILE: usize = 128;

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
/// busy worker the transposed query and output blocks, one panel's scores,
/// widened key and value tiles and the per-query statistics.
pub(crate) fn scratch_elems(rows: usize, queries: usize, keys: usize, head_dim: usize) -> usize {
    // Bounds whatever the group size: a task holds at most QUERY_TILE lanes
    // and the queries of at most all the rows, and no more tasks run than
    // if every head had its own keys.
    let lanes = QUERY_TILE.min(queries * rows).next_multiple_of(LANES);
    let width = key_tile(keys);
    let tasks = rows * queries.div_ceil(block_queries(queries, 1));
    // (the first five from a 64-byte boundary: up to LANES − 1 more each)
    let per_worker =
        2 * lanes * head_dim + width * PANEL + 2 * width * head_dim + 2 * lanes + 5 * (LANES - 1);
    workers().min(tasks) * per_worker
}

/// Queries per task with `group` heads in its lanes: the query axis split
/// into equal blocks of at most [`QUERY_TILE`] lanes (for groups of up to
/// that many heads), so no task is a short remainder; whole panels of lanes
/// where they fit in a block.
fn block_queries(queries: usize, group: usize) -> usize {
    // The fewest queries whose lanes fill whole panels (7 heads: 48 queries,
    // too many: then any number).
    let unit = Some(PANEL / gcd(PANEL, group))
        .filter(|unit| unit * group <= QUERY_TILE)
        .unwrap_or(1);
    let units = queries.div_ceil(unit).max(1);
    let units_per_block = (QUERY_TILE / (unit * group)).max(1);
    let blocks = units.div_ceil(units_per_block);
    units.div_ceil(blocks) * unit
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Workers [`tiled_attention`] runs on: candle's CPU thread count, which
/// honours `RAYON_NUM_THREADS` as candle's matmuls do.
fn workers() -> usize {
    candle_core::utils::get_num_threads()
}

/// How the output's rows lie: `[rows, L, D]` (rows = batch × heads, as the
/// queries), or `[B, L, H, D]` (the heads merged, as an output projection
/// reads them).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Output {
    HeadMajor,
    TokenMajor,
}

/// The elements of `softmax(q·kᵀ·scale + mask)·v` for inputs [`applies`]
/// accepts, in `layout`, typed like `q` (the caller shapes them). The inputs
/// are read where they lie, any strides but the head dim's (a transposed
/// `[B, L, H, D]` projection needs no copy into `[B, H, L, D]` first).
pub(crate) fn tiled_attention(
    layout: Output,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> Result<Tensor> {
    let shape = Shape::of(q, k, matches!(mask, Mask::Causal));
    let scale = scale as f32;
    match q.dtype() {
        DType::F32 => attend::<f32>(&shape, layout, [q, k, v], scale),
        DType::BF16 => attend::<bf16>(&shape, layout, [q, k, v], scale),
        DType::F16 => attend::<f16>(&shape, layout, [q, k, v], scale),
        other => candle_core::bail!("tiled attention: unsupported dtype {other:?}"),
    }
}

/// The sizes the kernel iterates over.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Query heads per batch (axis rank−3, 1 below rank 3).
    heads: usize,
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
            heads: if rank >= 3 { q.dims()[rank - 3] } else { 1 },
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
    /// The tokens `range` (not empty) of `src` as f32: read where they lie
    /// when already f32, else widened into `scratch`.
    fn widen<'a>(
        src: Tokens<'a, Self>,
        range: Range<usize>,
        head_dim: usize,
        scratch: &'a mut Vec<f32>,
    ) -> Tokens<'a, f32>;
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    fn widen<'a>(
        src: Tokens<'a, f32>,
        range: Range<usize>,
        head_dim: usize,
        _: &'a mut Vec<f32>,
    ) -> Tokens<'a, f32> {
        Tokens {
            data: src.span(range, head_dim),
            stride: src.stride,
        }
    }

    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

macro_rules! half_element {
    ($t:ty) => {
        impl Element for $t {
            fn widen<'a>(
                src: Tokens<'a, $t>,
                range: Range<usize>,
                head_dim: usize,
                scratch: &'a mut Vec<f32>,
            ) -> Tokens<'a, f32> {
                scratch.resize(range.len() * head_dim, 0.0);
                if src.stride == head_dim {
                    src.span(range, head_dim).convert_to_f32_slice(scratch);
                } else {
                    for (token, dst) in range.zip(scratch.chunks_exact_mut(head_dim)) {
                        src.token(token, head_dim).convert_to_f32_slice(dst);
                    }
                }
                Tokens {
                    data: scratch,
                    stride: head_dim,
                }
            }

            fn narrow(src: &[f32], dst: &mut [$t]) {
                dst.convert_from_f32_slice(src);
            }
        }
    };
}
half_element!(bf16);
half_element!(f16);

/// One head's tokens: token `i`'s head-dim values from `data[i·stride]` on.
#[derive(Clone, Copy)]
struct Tokens<'a, T> {
    data: &'a [T],
    stride: usize,
}

impl<'a, T> Tokens<'a, T> {
    fn token(&self, token: usize, head_dim: usize) -> &'a [T] {
        &self.data[token * self.stride..][..head_dim]
    }

    /// From the first value of `range`'s first token (it has one) to the
    /// last value of its last.
    fn span(&self, range: Range<usize>, head_dim: usize) -> &'a [T] {
        &self.data[range.start * self.stride..(range.end - 1) * self.stride + head_dim]
    }
}

/// An input of `[.., L, D]` as it lies in its storage: where each row's
/// (batch × head's) first token starts, and the step between tokens.
struct Rows<'a, T> {
    data: &'a [T],
    starts: Vec<usize>,
    stride: usize,
}

impl<'a, T> Rows<'a, T> {
    fn row(&self, row: usize) -> Tokens<'a, T> {
        Tokens {
            data: &self.data[self.starts[row]..],
            stride: self.stride,
        }
    }
}

/// `f` of `t`'s [`Rows`]: a CPU tensor's storage read in place when its
/// head-dim values are adjacent (as in every view the models take), else
/// a contiguous copy's.
fn with_rows<T: Element, R>(t: &Tensor, f: impl FnOnce(Rows<T>) -> Result<R>) -> Result<R> {
    let rank = t.rank();
    let t = if t.stride()[rank - 1] == 1 {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("tiled attention runs on the CPU");
    };
    f(Rows {
        data: CpuStorage::as_slice::<T>(cpu)?,
        starts: row_starts(layout),
        stride: layout.stride()[rank - 2],
    })
}

/// The storage offset of each `[L, D]` matrix of `layout` (rank ≥ 2), in
/// row-major order of the leading axes.
fn row_starts(layout: &Layout) -> Vec<usize> {
    let leading = layout.dims().len() - 2;
    let mut starts = vec![layout.start_offset()];
    for (&dim, &stride) in layout.dims()[..leading].iter().zip(layout.stride()) {
        starts = starts
            .iter()
            .flat_map(|&start| (0..dim).map(move |i| start + i * stride))
            .collect();
    }
    starts
}

/// Runs every (row, query tile) on the CPU workers; the output's elements
/// in `layout`.
fn attend<T: Element>(
    shape: &Shape,
    layout: Output,
    [q, k, v]: [&Tensor; 3],
    scale: f32,
) -> Result<Tensor> {
    let len = q.elem_count();
    with_rows::<T, _>(q, |q| {
        with_rows::<T, _>(k, |k| {
            with_rows::<T, _>(v, |v| {
                let mut out = vec![T::from_f64(0.0); len];
                if len > 0 {
                    let rows = output_rows(&mut out, shape, layout);
                    attend_rows(shape, [&q, &k, &v], scale, rows);
                }
                Tensor::from_vec(out, len, &Device::Cpu)
            })
        })
    })
}

/// `out`'s (not empty) `[D]` rows in `layout`, per batch × head the
/// queries' in order.
fn output_rows<'a, T>(out: &'a mut [T], shape: &Shape, layout: Output) -> Vec<Vec<&'a mut [T]>> {
    let (d, queries) = (shape.head_dim, shape.queries);
    match layout {
        Output::HeadMajor => out
            .chunks_mut(queries * d)
            .map(|head| head.chunks_mut(d).collect())
            .collect(),
        Output::TokenMajor => {
            let heads = shape.heads;
            let mut rows: Vec<Vec<&mut [T]>> = Vec::new();
            for batch in out.chunks_mut(queries * heads * d) {
                let first = rows.len();
                rows.extend((0..heads).map(|_| Vec::with_capacity(queries)));
                for (i, row) in batch.chunks_mut(d).enumerate() {
                    rows[first + i % heads].push(row);
                }
            }
            rows
        }
    }
}

fn attend_rows<T: Element>(
    shape: &Shape,
    [q, k, v]: [&Rows<T>; 3],
    scale: f32,
    out: Vec<Vec<&mut [T]>>,
) {
    let block = block_queries(shape.queries, shape.group);
    // One task per (k/v row, query block) with the block's queries of every
    // head in the group, their output rows in lane order; rayon's pool
    // (already running for candle) rather than spawned threads, since a
    // decoding step attends with a single query many times a second and
    // cannot pay for thread starts.
    let mut heads = out.into_iter().map(Vec::into_iter);
    let mut tasks = Vec::new();
    for kv_row in 0..k.starts.len() {
        let mut group: Vec<_> = heads.by_ref().take(shape.group).collect();
        for first in (0..shape.queries).step_by(block) {
            let n = block.min(shape.queries - first);
            let mut lanes = Vec::with_capacity(n * shape.group);
            for _ in 0..n {
                lanes.extend(group.iter_mut().filter_map(Iterator::next));
            }
            tasks.push((kv_row, first, lanes));
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, (kv_row, first, mut lanes)| {
            let tile = QueryTile {
                first,
                n: lanes.len() / shape.group,
                q,
                first_head: kv_row * shape.group,
                k: k.row(kv_row),
                v: v.row(kv_row),
            };
            attend_tile(shape, &tile, scale, scratch, &mut lanes);
        });
}

/// One block of queries of the heads of one k/v row, and the keys and values
/// they attend to. Lane `l` of the block holds query `first + l / group` of
/// head `l % group`: the heads sharing keys share the key and value tiles,
/// and a causal mask still hides a prefix of the lanes.
struct QueryTile<'a, T> {
    /// Index of the block's first query.
    first: usize,
    /// Queries in the block.
    n: usize,
    /// The queries, of which the group's heads are the rows from `first_head`.
    q: &'a Rows<'a, T>,
    first_head: usize,
    k: Tokens<'a, T>,
    v: Tokens<'a, T>,
}

/// A worker's buffers, reused across its tasks. The query-lane matrices are
/// stored panel after panel (`[D][panel width]` each), so that a panel's
/// rows lie together in the cache.
#[derive(Default)]
struct Scratch {
    /// `scale·Qᵀ`, zero in the lanes past the block's queries.
    queries: Vec<f32>,
    /// The unnormalised `Oᵀ`.
    outputs: Vec<f32>,
    /// Per query: the running maximum score and sum of weights.
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
    /// One panel's key tile of scores `[keys][panel width]`, then weights.
    scores: Vec<f32>,
    /// Widened key and value tiles (unused for f32).
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The online softmax over the key tiles for one block of queries, written
/// to its heads' `out` blocks, compiled for the widest vector unit the CPU has (the crate is
/// built for baseline x86-64, whose 4-lane SSE2 would leave most of an
/// AVX-512 unit idle).
fn attend_tile<T: Element>(
    shape: &Shape,
    tile: &QueryTile<T>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [&mut [T]],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the one feature the function enables.
            return unsafe { attend_tile_avx512(shape, tile, scale, s, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, the features the function enables.
            return unsafe { attend_tile_avx2(shape, tile, scale, s, out) };
        }
        // Baseline x86-64 has no fused multiply-add: `mul_add` would be a
        // library call per element.
        attend_tile_with::<T, false>(shape, tile, scale, s, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    attend_tile_with::<T, true>(shape, tile, scale, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attend_tile_avx512<T: Element>(
    shape: &Shape,
    tile: &QueryTile<T>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [&mut [T]],
) {
    attend_tile_with::<T, true>(shape, tile, scale, s, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_tile_avx2<T: Element>(
    shape: &Shape,
    tile: &QueryTile<T>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [&mut [T]],
) {
    attend_tile_with::<T, true>(shape, tile, scale, s, out);
}

/// [`attend_tile`]'s body, inlined into each feature-specific copy; `FMA`:
/// whether products fuse their multiply-adds.
#[inline(always)]
fn attend_tile_with<T: Element, const FMA: bool>(
    shape: &Shape,
    tile: &QueryTile<T>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [&mut [T]],
) {
    let (d, n, group) = (shape.head_dim, tile.n, shape.group);
    let lanes = (n * group).next_multiple_of(LANES);
    // Causal: keys past the last query's horizon are masked for the whole block.
    let keys = shape.visible_keys(tile.first + n - 1);
    let key_tile = key_tile(keys);
    let queries = aligned(&mut s.queries, d * lanes, 0.0);
    transpose_queries(shape, tile, lanes, scale, queries);
    let outputs = aligned(&mut s.outputs, d * lanes, 0.0);
    let row_max = aligned(&mut s.row_max, lanes, f32::NEG_INFINITY);
    let row_sum = aligned(&mut s.row_sum, lanes, 0.0);
    let all_scores = aligned(&mut s.scores, key_tile * PANEL, 0.0);
    for first_key in (0..keys).step_by(key_tile) {
        let tile_keys = first_key..keys.min(first_key + key_tile);
        let k = T::widen(tile.k, tile_keys.clone(), d, &mut s.k);
        let v = T::widen(tile.v, tile_keys.clone(), d, &mut s.v);
        for (first_lane, width) in panels(lanes) {
            // Keys this panel's last query sees in the tile (all but causal).
            let last_query = tile.first + ((first_lane + width).min(n * group) - 1) / group;
            let seen = shape.visible_keys(last_query).min(tile_keys.end);
            let Some(width_k) = seen.checked_sub(first_key).filter(|&w| w > 0) else {
                continue;
            };
            let panel = first_lane * d..(first_lane + width) * d;
            let lanes = first_lane..first_lane + width;
            let scores = &mut all_scores[..width_k * width];
            // Sᵀ = K·(scale·Q)ᵀ: [keys, D] × [D, width].
            product::<FMA>(
                scores,
                Broadcast::rows(k.data, k.stride),
                &queries[panel.clone()],
                (width_k, d, width),
                Start::Zero,
            );
            let stats = (&mut row_max[lanes.clone()], &mut row_sum[lanes]);
            let rescale = if shape.causal {
                // Query `first + i` sees key `key` from i = `key − past − first` on.
                let hidden = |key: usize| {
                    ((first_key + key).saturating_sub(shape.past + tile.first) * group)
                        .saturating_sub(first_lane)
                        .min(width)
                };
                online_softmax::<FMA>(scores, width, hidden, stats)
            } else {
                online_softmax::<FMA>(scores, width, |_| 0, stats)
            };
            // Oᵀ = Oᵀ·rescale + Vᵀ·P: [D, keys] × [keys, width].
            product::<FMA>(
                &mut outputs[panel],
                Broadcast::cols(v.data, v.stride),
                scores,
                (d, width_k, width),
                Start::Scaled(&rescale[..width]),
            );
        }
    }
    normalise_into((outputs, row_sum), d, n * group, out);
}

/// `buffer` holding `len` values `fill` from a 64-byte boundary on: the
/// part from there. Vector loads and stores that straddle two cache lines
/// cost two, and the allocator aligns to 16 bytes only: which offset a run
/// got changed the attention's time by a tenth from one binary to another.
fn aligned(buffer: &mut Vec<f32>, len: usize, fill: f32) -> &mut [f32] {
    buffer.clear();
    buffer.resize(len + LANES - 1, fill);
    let skip = buffer.as_ptr().align_offset(4 * LANES).min(LANES - 1);
    &mut buffer[skip..][..len]
}

/// Keys per tile for `keys` keys: equal tiles of at most [`KEY_TILE`], whole
/// register blocks where they fit, so that no tile is a short remainder
/// (780 keys: 6 × 112 + 108 rather than 6 × 128 + 12, whose products run
/// mostly in single-row blocks and reload the outputs for a few keys).
fn key_tile(keys: usize) -> usize {
    let tiles = keys.div_ceil(KEY_TILE).max(1);
    keys.div_ceil(tiles)
        .next_multiple_of(BLOCK_ROWS)
        .min(KEY_TILE)
}

/// The panels of `lanes` query lanes: `(first lane, width)`, whole panels
/// and a last one of whole vectors.
fn panels(lanes: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..lanes)
        .step_by(PANEL)
        .map(move |first| (first, PANEL.min(lanes - first)))
}

/// `scale·qᵀ` for the block's queries into `lanes` lanes of `dst` (zeroed:
/// the lanes past them stay zero), panel after panel.
#[inline(always)]
fn transpose_queries<T: Element>(
    shape: &Shape,
    tile: &QueryTile<T>,
    lanes: usize,
    scale: f32,
    dst: &mut [f32],
) {
    let (d, group) = (shape.head_dim, shape.group);
    let query_row = |lane: usize| {
        let (query, head) = (lane / group, lane % group);
        tile.q
            .row(tile.first_head + head)
            .token(tile.first + query, d)
    };
    for (first_lane, width) in panels(lanes) {
        let panel = &mut dst[first_lane * d..][..d * width];
        let real = (tile.n * group).saturating_sub(first_lane).min(width);
        for vector in (0..real).step_by(LANES) {
            let rows = (vector..real.min(vector + LANES)).map(|lane| query_row(first_lane + lane));
            let mut square = [[0f32; LANES]; LANES];
            for column in (0..d).step_by(LANES) {
                let columns = LANES.min(d - column);
                for (values, row) in square.iter_mut().zip(rows.clone()) {
                    for (x, q) in values.iter_mut().zip(&row[column..][..columns]) {
                        *x = q.to_f64() as f32 * scale;
                    }
                }
                for (c, values) in transpose(&square).iter().take(columns).enumerate() {
                    panel[(column + c) * width + vector..][..LANES].copy_from_slice(values);
                }
            }
        }
    }
}

/// `out[lane] = O / l` for the `real` lanes of the transposed accumulator,
/// narrowed.
#[inline(always)]
fn normalise_into<T: Element>(
    (outputs, row_sum): (&[f32], &[f32]),
    d: usize,
    real: usize,
    out: &mut [&mut [T]],
) {
    let lanes = row_sum.len();
    for (first_lane, width) in panels(lanes) {
        let panel = &outputs[first_lane * d..][..d * width];
        let real = real.saturating_sub(first_lane).min(width);
        for vector in (0..real).step_by(LANES) {
            let sums = &row_sum[first_lane + vector..][..LANES];
            let inverse: [f32; LANES] = std::array::from_fn(|lane| 1.0 / sums[lane]);
            let mut square = [[0f32; LANES]; LANES];
            for column in (0..d).step_by(LANES) {
                let columns = LANES.min(d - column);
                for (c, values) in square.iter_mut().take(columns).enumerate() {
                    let outputs = &panel[(column + c) * width + vector..][..LANES];
                    for ((x, o), inv) in values.iter_mut().zip(outputs).zip(&inverse) {
                        *x = o * inv;
                    }
                }
                let transposed = transpose(&square);
                for (lane, values) in (vector..real.min(vector + LANES)).zip(&transposed) {
                    let row = &mut out[first_lane + lane][column..][..columns];
                    T::narrow(&values[..columns], row);
                }
            }
        }
    }
}

/// A 16 × 16 tile of f32: the unit in which the query and output blocks turn
/// between rows of one query's head-dim values and rows of query lanes.
type Square = [[f32; LANES]; LANES];

/// `square`'s transpose: with AVX-512 in 64 register shuffles (element by
/// element, the strided stores took ~5 % of a 780-token attention).
#[inline(always)]
fn transpose(square: &Square) -> Square {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the one feature the function enables.
        return unsafe { transpose_avx512(square) };
    }
    let mut out = [[0f32; LANES]; LANES];
    for (r, row) in square.iter().enumerate() {
        for (c, x) in row.iter().enumerate() {
            out[c][r] = *x;
        }
    }
    out
}

/// [`transpose`] in AVX-512 registers: pairs of rows interleaved by 32 then
/// by 64 bits leave each 128-bit lane `L` of `u[4j + m]` holding column
/// `4L + m` of rows `4j..4j + 4`; two rounds of 128-bit lane shuffles then
/// gather those four pieces of each column.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_avx512(square: &Square) -> Square {
    use std::arch::x86_64::{
        __m512, _mm512_castpd_ps, _mm512_castps_pd, _mm512_loadu_ps, _mm512_shuffle_f32x4,
        _mm512_storeu_ps, _mm512_unpackhi_pd, _mm512_unpackhi_ps, _mm512_unpacklo_pd,
        _mm512_unpacklo_ps,
    };
    use std::array::from_fn;
    // SAFETY: each row is 16 f32, one full vector.
    let r: [__m512; LANES] = from_fn(|i| unsafe { _mm512_loadu_ps(square[i].as_ptr()) });
    let t: [__m512; LANES] = from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; LANES] = from_fn(|i| {
        let (j, m) = (i / 4 * 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(t[j + m / 2]),
            _mm512_castps_pd(t[j + m / 2 + 2]),
        );
        _mm512_castpd_ps(if m % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // w[h][j][m]: 128-bit lanes (0, 2) (h = 0) or (1, 3) (h = 1) of u[4j + m]
    // and u[4j + 4 + m], rows 8j..8j + 8.
    let w: [[[__m512; 4]; 2]; 2] = from_fn(|h| {
        from_fn(|j| {
            from_fn(|m| {
                let (a, b) = (u[8 * j + m], u[8 * j + 4 + m]);
                if h == 0 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xdd>(a, b)
                }
            })
        })
    });
    let mut out = [[0f32; LANES]; LANES];
    for (c, row) in out.iter_mut().enumerate() {
        // Column c = 4L + m sits in 128-bit lane L: L = 0, 2 in w[0], 1, 3 in w[1].
        let (lane, m) = (c / 4, c % 4);
        let (a, b) = (w[lane % 2][0][m], w[lane % 2][1][m]);
        let column = if lane < 2 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        };
        // SAFETY: `row` is 16 f32, one full vector.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), column) };
    }
    out
}

/// One step of the online softmax for a panel's key tile of scores
/// `[keys][width]` (queries across), whose first `hidden(key)` lanes in row
/// `key` are masked: updates each query's running maximum and sum
/// (`stats`), replaces the scores with their weights `exp(s − max)` (0 where
/// masked) and returns by how much each query's accumulated output shrinks
/// (`exp(old max − new max)`, 1 where its maximum stayed). `FMA`: whether
/// multiply-adds fuse.
///
/// One vector of lanes at a time, its statistics in fixed-size arrays the
/// compiler keeps in registers, the mask a lane-index comparison (a slice
/// starting at a varying lane compiled to half-width masked stores).
#[inline(always)]
fn online_softmax<const FMA: bool>(
    scores: &mut [f32],
    width: usize,
    hidden: impl Fn(usize) -> usize,
    (row_max, row_sum): (&mut [f32], &mut [f32]),
) -> [f32; PANEL] {
    let mut rescale = [1f32; PANEL];
    for first in (0..width).step_by(LANES) {
        let hidden = |key: usize| hidden(key).saturating_sub(first);
        let vector = |key: usize| key * width + first..key * width + first + LANES;
        let keys = 0..scores.len() / width;
        let old: [f32; LANES] = lanes(&row_max[first..]);
        // Four running maxima, every fourth key each: one would wait for the
        // previous key's comparison at every key.
        let mut maxima = [old; 4];
        let update = |max: &mut [f32; LANES], key: usize| {
            let (row, seen): ([f32; LANES], _) = (lanes(&scores[vector(key)]), hidden(key));
            for (lane, (m, x)) in max.iter_mut().zip(row).enumerate() {
                *m = if lane >= seen && x > *m { x } else { *m };
            }
        };
        let whole = keys.end - keys.end % 4;
        for key in (0..whole).step_by(4) {
            for (offset, max) in maxima.iter_mut().enumerate() {
                update(max, key + offset);
            }
        }
        for key in whole..keys.end {
            update(&mut maxima[0], key);
        }
        let max = maxima.into_iter().reduce(|a, b| {
            std::array::from_fn(|lane| if b[lane] > a[lane] { b[lane] } else { a[lane] })
        });
        let max = max.expect("four maxima");
        // A query that sees no key yet keeps −∞: its weights are 0 (below)
        // and exp(−∞ − 0) leaves its all-zero output and sum as they are.
        let reference = max.map(|m| if m == f32::NEG_INFINITY { 0.0 } else { m });
        for lane in 0..LANES {
            rescale[first + lane] = exp::<FMA>(old[lane] - reference[lane]);
        }
        row_max[first..first + LANES].copy_from_slice(&max);
        let mut sum = [0f32; LANES];
        for key in keys {
            let seen = hidden(key);
            let row = &mut scores[vector(key)];
            for (lane, (x, s)) in row.iter_mut().zip(&mut sum).enumerate() {
                let weight = exp::<FMA>(*x - reference[lane]);
                *x = if lane >= seen { weight } else { 0.0 };
                *s += *x;
            }
        }
        for (lane, s) in sum.iter().enumerate() {
            let l = &mut row_sum[first + lane];
            *l = *l * rescale[first + lane] + s;
        }
    }
    rescale
}

/// The first vector of lanes of `values`.
#[inline(always)]
fn lanes(values: &[f32]) -> [f32; LANES] {
    values[..LANES].try_into().expect("a whole vector")
}

/// `a·b + c`, rounded once where `FMA` (the CPU has the instruction),
/// twice otherwise (where `mul_add` would be a library call).
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `eˣ` for `x ≤ 0` (as the softmax needs), within 2 ulp, branch-free so the
/// loops over a row vectorise: `x = n·ln 2 + r`, `eˣ = 2ⁿ·eʳ` with Cephes'
/// expf polynomial for `eʳ` on `|r| ≤ ln 2 / 2`, in Horner form to the
/// constant term (one operation fewer than `1 + r + r²·p(r)`). Below the
/// smallest normal result it returns about 1e-38 rather than 0, `-inf`
/// included.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the mantissa's low bits.
    const ROUND: f32 = 12_582_912.0;
    let fma = mul_add::<FMA>;
    let x = x.max(-87.0);
    let shifted = fma(x, LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = fma(n, -LN2_LO, fma(n, -LN2_HI, x));
    let p = 1.987_569_1e-4_f32;
    let p = fma(p, r, 1.398_199_9e-3);
    let p = fma(p, r, 8.333_452e-3);
    let p = fma(p, r, 4.166_579_6e-2);
    let p = fma(p, r, 1.666_666_5e-1);
    let p = fma(p, r, 0.5);
    let p = fma(p, r, 1.0);
    let e_r = fma(p, r, 1.0);
    // 2ⁿ from n's bits: the integer sits in `shifted`'s mantissa.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// The left operand of [`product`]: a row-major matrix as it is stored or
/// transposed, read one element at a time and broadcast across the lanes.
#[derive(Clone, Copy)]
struct Broadcast<'a> {
    data: &'a [f32],
    /// Steps between consecutive rows and between consecutive depth indices
    /// (the columns) of the operand as used.
    row_stride: usize,
    depth_stride: usize,
}

impl<'a> Broadcast<'a> {
    /// `data` as a row-major matrix whose rows start `stride` elements apart.
    fn rows(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            row_stride: stride,
            depth_stride: 1,
        }
    }

    /// The transpose of `data` read as a row-major matrix whose rows start
    /// `stride` elements apart.
    fn cols(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            depth_stride: stride,
        }
    }

    /// The operand without its first `row` rows.
    fn skip_rows(self, row: usize) -> Self {
        Self {
            data: &self.data[row * self.row_stride..],
            ..self
        }
    }
}

/// Where a [`product`]'s accumulators start.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// `c = a·b`.
    Zero,
    /// `c = c·scale + a·b`, `scale` per lane: the online softmax's rescale
    /// of the outputs, applied as the register block loads them.
    Scaled(&'a [f32]),
}

/// `c = a·b` (or as [`Start`] says) for `c` `[rows][width]`, `a`
/// `[rows, depth]` and `b` `[depth][width]`, row-major with `width` (at most
/// a [`PANEL`], whole vectors) query lanes: register blocks of [`BLOCK_ROWS`]
/// rows × the panel, each running over the whole depth.
#[inline(always)]
fn product<const FMA: bool>(
    c: &mut [f32],
    a: Broadcast,
    b: &[f32],
    (rows, depth, width): (usize, usize, usize),
    start: Start,
) {
    if width == PANEL {
        product_strip::<PANEL_VECTORS, FMA>(c, a, b, (rows, depth, width), start, 0);
    } else {
        for first_lane in (0..width).step_by(LANES) {
            product_strip::<1, FMA>(c, a, b, (rows, depth, width), start, first_lane);
        }
    }
}

/// [`product`] for the `VECTORS` vectors of lanes from `first_lane` on.
#[inline(always)]
fn product_strip<const VECTORS: usize, const FMA: bool>(
    c: &mut [f32],
    a: Broadcast,
    b: &[f32],
    (rows, depth, width): (usize, usize, usize),
    start: Start,
    first_lane: usize,
) {
    let start = match start {
        Start::Scaled(scale) => Start::Scaled(&scale[first_lane..]),
        Start::Zero => Start::Zero,
    };
    let block = |row: usize| Block {
        ldc: width,
        b: &b[first_lane..],
        a: a.skip_rows(row),
        depth,
        start,
    };
    let c_from = |row: usize| row * width + first_lane;
    let full = rows - rows % BLOCK_ROWS;
    for row in (0..full).step_by(BLOCK_ROWS) {
        block(row).run::<BLOCK_ROWS, VECTORS, FMA>(&mut c[c_from(row)..]);
    }
    // The rest in blocks of 4, 2 and 1 rows (single rows are bound by their
    // loads: a broadcast and VECTORS loads of `b` for VECTORS multiply-adds).
    let mut row = full;
    if rows - row >= 4 {
        block(row).run::<4, VECTORS, FMA>(&mut c[c_from(row)..]);
        row += 4;
    }
    if rows - row >= 2 {
        block(row).run::<2, VECTORS, FMA>(&mut c[c_from(row)..]);
        row += 2;
    }
    if row < rows {
        block(row).run::<1, VECTORS, FMA>(&mut c[c_from(row)..]);
    }
}

/// A register block's operands: `a` from its first row, `b` `[depth][ldb]`
/// from its first lane; `c`'s rows are `ldc` apart (`ldb == ldc`).
struct Block<'a> {
    ldc: usize,
    a: Broadcast<'a>,
    b: &'a [f32],
    depth: usize,
    /// Its lanes' scales when [`Start::Scaled`].
    start: Start<'a>,
}

impl Block<'_> {
    /// `c[r][..VECTORS·LANES] (+)= Σₖ a(r, k)·b[k][..VECTORS·LANES]` for `r <
    /// ROWS`, the accumulators held in registers across the depth: AVX-512's
    /// where the CPU has it (the compiler keeps arrays of lanes this large in
    /// memory and gathers the broadcasts), else plain f32 arrays.
    #[inline(always)]
    fn run<const ROWS: usize, const VECTORS: usize, const FMA: bool>(&self, c: &mut [f32]) {
        if self.depth == 0 {
            return;
        }
        let lanes = VECTORS * LANES;
        let (ldc, a) = (self.ldc, self.a);
        assert!((ROWS - 1) * ldc + lanes <= c.len());
        assert!((self.depth - 1) * ldc + lanes <= self.b.len());
        assert!((ROWS - 1) * a.row_stride + (self.depth - 1) * a.depth_stride < a.data.len());
        if let Start::Scaled(scale) = self.start {
            assert!(lanes <= scale.len());
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, and the assertions are the bounds
            // the kernel requires.
            return unsafe { self.run_avx512::<ROWS, VECTORS>(c) };
        }
        self.run_portable::<ROWS, VECTORS, FMA>(c);
    }

    /// [`Block::run`] in AVX-512 registers, inlined into the caller (a
    /// separate function per block cost a call, the spill of the row offsets
    /// and the accumulators' set-up: 10 % of the products).
    ///
    /// # Safety
    /// The CPU has AVX-512F, and [`Block::run`]'s assertions hold: every
    /// offset read or written lies inside `c`, `b` and `a.data`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn run_avx512<const ROWS: usize, const VECTORS: usize>(&self, c: &mut [f32]) {
        use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps};
        use std::arch::x86_64::{_mm512_mul_ps, _mm512_setzero_ps, _mm512_storeu_ps};
        let (ldc, a) = (self.ldc, self.a);
        let (a_ptr, b_ptr, c_ptr) = (a.data.as_ptr(), self.b.as_ptr(), c.as_mut_ptr());
        // SAFETY: the caller guarantees AVX-512F, which every intrinsic here
        // needs, and the bounds each pointer access below relies on.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
            if let Start::Scaled(scale) = self.start {
                // (v + 1)·LANES ≤ scale.len()
                let scale: [__m512; VECTORS] =
                    std::array::from_fn(|v| _mm512_loadu_ps(scale.as_ptr().add(v * LANES)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    for (v, acc) in acc.iter_mut().enumerate() {
                        // r·ldc + (v + 1)·LANES ≤ c.len()
                        let c = _mm512_loadu_ps(c_ptr.add(r * ldc + v * LANES));
                        *acc = _mm512_mul_ps(c, scale[v]);
                    }
                }
            }
            // One pointer per operand moving along the depth, and the rows'
            // offsets from it fixed (kept in registers: address arithmetic per
            // step competes with the multiply-adds for their ports; opaque to
            // the compiler, which would otherwise step from one row's offset
            // to the next with an add per row and step).
            let rows: [usize; ROWS] =
                std::hint::black_box(std::array::from_fn(|r| r * a.row_stride));
            let (mut a_at, mut b_at) = (a_ptr, b_ptr);
            for _ in 0..self.depth {
                let mut b_row = [_mm512_setzero_ps(); VECTORS];
                for (v, b) in b_row.iter_mut().enumerate() {
                    // k·ldc + (v + 1)·LANES ≤ b.len() at step k
                    *b = _mm512_loadu_ps(b_at.add(v * LANES));
                }
                for (acc, row) in acc.iter_mut().zip(rows) {
                    // r·row_stride + k·depth_stride < a.data.len() at step k
                    let x: __m512 = _mm512_set1_ps(*a_at.add(row));
                    for (acc, b) in acc.iter_mut().zip(&b_row) {
                        *acc = _mm512_fmadd_ps(x, *b, *acc);
                    }
                }
                // Past the last step these point one step beyond the
                // operands, never read.
                a_at = a_at.wrapping_add(a.depth_stride);
                b_at = b_at.wrapping_add(ldc);
            }
            for (r, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    // r·ldc + (v + 1)·LANES ≤ c.len()
                    _mm512_storeu_ps(c_ptr.add(r * ldc + v * LANES), *acc);
                }
            }
        }
    }

    /// [`Block::run`] on f32 arrays, for CPUs without AVX-512.
    #[inline(always)]
    fn run_portable<const ROWS: usize, const VECTORS: usize, const FMA: bool>(
        &self,
        c: &mut [f32],
    ) {
        let (ldc, a) = (self.ldc, self.a);
        let mut acc = [[[0f32; LANES]; VECTORS]; ROWS];
        if let Start::Scaled(scale) = self.start {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    let c = &c[r * ldc + v * LANES..][..LANES];
                    let scale = &scale[v * LANES..][..LANES];
                    for ((o, c), scale) in acc.iter_mut().zip(c).zip(scale) {
                        *o = c * scale;
                    }
                }
            }
        }
        for k in 0..self.depth {
            let b_row = &self.b[k * ldc..][..VECTORS * LANES];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a.data[r * a.row_stride + k * a.depth_stride];
                for (acc, y) in acc.iter_mut().zip(b_row.chunks_exact(LANES)) {
                    for (o, y) in acc.iter_mut().zip(y) {
                        *o = mul_add::<FMA>(x, *y, *o);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                c[r * ldc + v * LANES..][..LANES].copy_from_slice(acc);
            }
        }
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

    /// The tiled attention shaped like `q`.
    fn head_major(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> Tensor {
        let out = tiled_attention(Output::HeadMajor, q, k, v, mask, 0.3).unwrap();
        out.reshape(q.shape()).unwrap()
    }

    /// max |tiled − chunked| / max |chunked|. Both compute in f32 and differ
    /// only in summation order (gemm's blocking over D and over the key tiles,
    /// the running rescale) and in exp's last bits: a few ulp of the largest
    /// output per term, so 1e-5 of the largest output (~80 ulp) is far above
    /// rounding yet far below any real error (a wrong mask or tile bound moves
    /// outputs by O(1/keys) of their size, ≥ 1e-3 here).
    fn relative_gap(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> f32 {
        assert!(applies(q, k, v, mask));
        let tiled = head_major(q, k, v, mask);
        let chunked = chunked_attention(q, k, v, mask, 0.3).unwrap();
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
        // A decoding step and a short causal chunk past a KV cache: the
        // group's heads share the lanes, the mask hides a prefix of them.
        for queries in [1, 3] {
            let q = randn((1, 8, queries, 32));
            assert!(relative_gap(&q, &k, &v, Mask::Causal) < 1e-5);
        }
        // Seven heads a group (lanes that do not fill whole panels).
        let q7 = randn((1, 14, 65, 16));
        let (k7, v7) = (randn((1, 2, 300, 16)), randn((1, 2, 300, 16)));
        assert!(relative_gap(&q7, &k7, &v7, Mask::Causal) < 1e-5);
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
    fn merged_output_is_the_head_major_output_transposed() {
        // Strided inputs (transposed [B, L, H, D] views), grouped heads and
        // a causal mask, in f32 and bf16: the same values, only laid out
        // token by token.
        for dtype in [DType::F32, DType::BF16] {
            let view = |l: usize, heads: usize| {
                let t = randn((2, l, heads, 16)).to_dtype(dtype).unwrap();
                t.transpose(1, 2).unwrap()
            };
            let (q, k, v) = (view(70, 6), view(90, 2), view(90, 2));
            for mask in [Mask::None, Mask::Causal] {
                let merged = tiled_attention(Output::TokenMajor, &q, &k, &v, mask, 0.3).unwrap();
                let merged = merged.reshape((2, 70, 96)).unwrap();
                let heads = head_major(&q, &k, &v, mask);
                let want = heads.transpose(1, 2).unwrap().reshape((2, 70, 96)).unwrap();
                assert_eq!(merged.dims(), want.dims());
                let flat = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>().unwrap()
                };
                assert_eq!(flat(&merged), flat(&want), "{dtype:?} {mask:?}");
            }
        }
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
        assert_eq!(at(3120), at(32_760));
        // (780 keys: tiles of 112)
        assert!(at(780) < at(3120));
        // one worker's tiles: far below the 3120² scores of one head
        assert!(at(3120) / workers() < 3120 * 3120 / 50);
        // a single short query: tiles no larger than the problem
        // (one query takes a vector of lanes)
        assert_eq!(
            scratch_elems(1, 1, 5, 8),
            2 * 16 * 8 + 8 * PANEL + 2 * 8 * 8 + 2 * 16 + 5 * 15
        );
    }

    #[test]
    fn query_blocks_are_whole_panels_of_at_most_a_query_tile() {
        for group in [1, 2, 3, 7, 8, 16] {
            for queries in [1, 5, 47, 48, 239, 240, 241, 780, 3120, 4001] {
                let block = block_queries(queries, group);
                assert!(block * group <= QUERY_TILE, "{queries} x {group}");
                let whole_panels = (block * group).is_multiple_of(PANEL);
                assert!(whole_panels || group == 7, "{queries} x {group}");
            }
        }
        // 3120 tokens: 13 blocks of 240, none short.
        assert_eq!(block_queries(3120, 1), 240);
    }

    #[test]
    fn head_dims_past_whole_vectors_and_key_tiles_past_whole_blocks() {
        // D = 20: a 16-column square and 4 columns on their own, in the
        // query and output transposes and the values' product; 300 keys:
        // tiles of 104, 104 and 92 = 11 blocks of 8 and one of 4 rows.
        let q = randn((1, 3, 70, 20));
        let (k, v) = (randn((1, 3, 300, 20)), randn((1, 3, 300, 20)));
        for mask in [Mask::None, Mask::Causal] {
            assert!(relative_gap(&q, &k, &v, mask) < 1e-5);
        }
    }

    #[test]
    fn key_tiles_are_equal_and_whole_blocks() {
        assert_eq!(key_tile(780), 112);
        assert_eq!(key_tile(3120), KEY_TILE);
        assert_eq!(key_tile(300), 104);
        for keys in [1, 7, 8, 127, 128, 129, 300, 780, 3120, 4001] {
            let tile = key_tile(keys);
            assert!(tile <= KEY_TILE && tile > 0, "{keys}");
            // as many tiles as KEY_TILE-wide ones would need, none empty
            assert_eq!(keys.div_ceil(tile), keys.div_ceil(KEY_TILE), "{keys}");
        }
    }

    #[test]
    fn squares_transpose() {
        let square: Square = std::array::from_fn(|r| std::array::from_fn(|c| (r * 16 + c) as f32));
        let transposed = transpose(&square);
        for (r, row) in square.iter().enumerate() {
            for (c, x) in row.iter().enumerate() {
                assert_eq!(transposed[c][r], *x, "({r}, {c})");
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_softmax_range() {
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let want = x.exp();
            for got in [exp::<false>(x), exp::<true>(x)] {
                assert!(
                    (got - want).abs() <= 2.0 * f32::EPSILON * want,
                    "{x}: {got} vs {want}"
                );
            }
        }
        assert!(exp::<false>(f32::NEG_INFINITY) < 1e-37);
        assert!(exp::<true>(f32::NEG_INFINITY) < 1e-37);
    }
}
