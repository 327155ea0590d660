//! What the CPU kernels of `activation`, `small_batch`, `rows`, `bias_gemm`
//! and the Wan VAE's norm share: contiguous blocks of an output slice spread
//! over the threads (one block per thread keeps each thread on its own cache
//! lines and costs one spawn per thread per call), the widest vector
//! instructions the CPU has, the elements of a CPU tensor, and the threads
//! `gemm` runs on.

/// Runs `work(first, block)` over `out` split into contiguous blocks, one per
/// thread (candle's thread count, which follows `RAYON_NUM_THREADS`), each of
/// at least `min_len` items so small outputs stay on the calling thread, and
/// each a multiple of `granule` items (whole output rows); `first` is the
/// block's index in `out`. The last block runs on the calling thread.
pub fn for_each_block<T: Send>(
    out: &mut [T],
    min_len: usize,
    granule: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    let threads = (out.len() / min_len.max(1)).clamp(1, candle_core::utils::get_num_threads());
    let block = out
        .len()
        .div_ceil(threads)
        .next_multiple_of(granule.max(1))
        .max(1);
    std::thread::scope(|scope| {
        let mut blocks = out.chunks_mut(block).enumerate().peekable();
        while let Some((i, chunk)) = blocks.next() {
            let work = &work;
            if blocks.peek().is_some() {
                scope.spawn(move || work(i * block, chunk));
            } else {
                work(i * block, chunk);
            }
        }
    });
}

/// `gemm`'s parallelism for kernels that call it directly: candle's thread
/// count (so `RAYON_NUM_THREADS` holds for them as for candle's matmuls).
pub fn gemm_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        threads if threads > 1 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor (the kernels'
/// view of candle's storage, without a copy).
pub(crate) fn f32_slice<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a CPU tensor expected");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a contiguous tensor expected");
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// Runs `kernel` compiled for AVX2 where the CPU has it (8 f32 lanes; the
/// default x86-64 target vectorises to SSE2's 4). `kernel` must be an
/// `#[inline(always)]` closure so that it is compiled inside the AVX2
/// function.
pub(crate) fn widest_simd<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (detected just above).
        return unsafe { with_avx2(kernel) };
    }
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_visited_once_with_its_index() {
        for (len, min_len, granule) in [
            (0, 4, 1),
            (1, 4, 1),
            (7, 1, 1),
            (1000, 3, 1),
            (1001, 500, 1),
            (999, 1, 3),
        ] {
            let mut out = vec![usize::MAX; len];
            for_each_block(&mut out, min_len, granule, |first, block| {
                assert_eq!(first % granule, 0);
                for (k, v) in block.iter_mut().enumerate() {
                    *v = first + k;
                }
            });
            assert!(
                out.iter().enumerate().all(|(i, &v)| i == v),
                "{len}/{min_len}"
            );
        }
    }
}
