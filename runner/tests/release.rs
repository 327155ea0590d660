//! The release check on a model-sized allocation: 1 GiB loaded the way a model
//! loads (many tensors from the heap, with a small long-lived allocation
//! after them so the heap cannot simply shrink from its top), then dropped
//! through `Probe::release`. RSS must come back within 5 % of the baseline
//! (or 4 MiB, the kernel counters' own error, whichever is larger)
//! and the report must say so (freed ratio ≥ 95 %, no warning).
//!
//! It runs without the test harness (`harness = false`): alone in its own
//! process, on the main thread, like the runner's stages.

use std::time::Duration;

use kubewan_runner::probe::{Probe, phases, rss_bytes};

const GIB: usize = 1 << 30;
/// Below glibc's mmap threshold (128 KiB), so the memory comes from the heap
/// arenas and only comes back if the runner trims them.
const TENSOR: usize = 64 << 10;
/// The kernel's RSS counters are per-CPU approximations (proc(5): "some of
/// these values are inaccurate"), so two readings microseconds apart can
/// differ by a few pages either way. Comparisons between readings allow this.
const COUNTER_SLACK: u64 = 4 << 20;

fn main() {
    a_released_model_sized_allocation_gives_its_memory_back();
    println!("test a_released_model_sized_allocation_gives_its_memory_back ... ok");
}

fn a_released_model_sized_allocation_gives_its_memory_back() {
    let mut probe = Probe::start(Duration::from_millis(20));
    // Warm-up: one small load and release first, so the code of these paths is
    // paged in (file-backed pages count in RSS) before the baseline is taken.
    let warm = probe.sample();
    let small: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; TENSOR]).collect();
    let warm_loaded = probe.sample();
    probe.release("warm_up", "warm-up", small, &warm, &warm_loaded);
    let baseline = probe.sample();
    let status_before = rss_breakdown();

    probe.begin(phases::VLM_LOAD);
    let count = GIB / TENSOR;
    let mut model: Vec<Vec<u8>> = Vec::with_capacity(count);
    let mut metadata: Vec<Vec<u8>> = Vec::new();
    for i in 0..count {
        let mut tensor = vec![0u8; TENSOR];
        // Touch every page, as loading weights does.
        tensor
            .iter_mut()
            .step_by(4096)
            .for_each(|b| *b = (i % 251) as u8 + 1);
        model.push(tensor);
    }
    // A small allocation that outlives the model, after its last tensor: it
    // pins the heap's top, so free() alone cannot shrink the heap.
    metadata.push(vec![1u8; 48]);
    let load = probe.end().unwrap();
    let loaded = probe.sample();
    assert!(
        loaded.rss_bytes >= baseline.rss_bytes + (GIB as u64 * 95 / 100),
        "loading 1 GiB raised RSS only from {} to {}",
        baseline.rss_bytes,
        loaded.rss_bytes
    );
    // The peak covers the load within the counters' error, which grows with
    // the number of CPUs the process ran on: up to 1 % of the load is allowed.
    let slack = COUNTER_SLACK.max(loaded.rss_bytes / 100);
    assert!(
        load.peak_rss_bytes + slack >= loaded.rss_bytes,
        "the load's peak {} is below the RSS {} read just after it",
        load.peak_rss_bytes,
        loaded.rss_bytes
    );

    let release = probe.release(phases::VLM_RELEASE, "test model", model, &baseline, &loaded);
    let after = rss_bytes();
    eprintln!("before: {status_before}\nafter:  {}", rss_breakdown());
    let record = probe.finish();
    std::hint::black_box(&metadata);

    eprintln!(
        "baseline {} MiB, loaded {} MiB, after release {} MiB; report: {release:?}",
        baseline.rss_bytes >> 20,
        loaded.rss_bytes >> 20,
        after >> 20
    );
    let tolerance = (baseline.rss_bytes / 20).max(COUNTER_SLACK);
    assert!(
        after <= baseline.rss_bytes + tolerance,
        "RSS after the release is {after} bytes, more than {tolerance} bytes above the baseline {}",
        baseline.rss_bytes
    );
    assert!(release.loaded_bytes >= GIB as u64 * 95 / 100, "{release:?}");
    assert!(release.freed_ratio >= 0.95, "{release:?}");
    assert!(release.warning.is_none(), "{release:?}");
    assert!(record.phases.iter().any(|p| p.name == "vlm_release"));
}

fn rss_breakdown() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Rss"))
        .collect::<Vec<_>>()
        .join(" ")
}
