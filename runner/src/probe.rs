//! The memory probe: per-phase start/end/peak RSS (the kernel's high-water mark,
//! reset at each phase start, plus a sampling thread), memory available to the
//! process (system and cgroup limit), optional VRAM, and seconds. It also
//! measures whether a dropped model gave its memory back ([`Probe::release`]).
//! Whether a model may be loaded at all is [`crate::admission`]'s call.
//!
//! VRAM comes from a [`VramSource`]: [`Probe::new`] installs NVML's readings
//! when a GPU is visible, and [`Probe::watch_device`] adds the CUDA device the
//! models run on ([`crate::vram`]); without a GPU the VRAM fields stay empty.
//! Phase peaks and releases use this process's own GPU memory; the device-wide
//! figure (all processes) is kept beside it, labelled as such.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kubewan_crds::report::{MemorySample, PhaseReport, ReleaseReport};
use kubewan_crds::status::human_bytes;

/// The phase names the pipeline uses.
pub mod phases {
    use kubewan_wan::checkpoint::Expert;

    pub const VLM_LOAD: &str = "vlm_load";
    pub const VLM_GENERATE: &str = "vlm_generate";
    pub const VLM_RELEASE: &str = "vlm_release";
    pub const VIDEO_LOAD: &str = "video_load";
    pub const TEXT_ENCODE: &str = "text_encode";
    pub const DENOISE: &str = "denoise";
    pub const VAE_DECODE: &str = "vae_decode";
    pub const ENCODE: &str = "encode";
    pub const STITCH: &str = "stitch";

    /// A two-expert (Wan2.2) model loading one expert: `expert_high_load`, `expert_low_load`.
    pub fn expert_load(expert: Expert) -> &'static str {
        match expert {
            Expert::High => "expert_high_load",
            Expert::Low => "expert_low_load",
        }
    }

    /// A two-expert model's denoising steps by one expert: `expert_high_denoise`, ...
    pub fn expert_denoise(expert: Expert) -> &'static str {
        match expert {
            Expert::High => "expert_high_denoise",
            Expert::Low => "expert_low_denoise",
        }
    }
}

/// Below this share of the loaded memory coming back, a release is reported with a warning.
pub const RELEASE_WARN_RATIO: f64 = 0.95;
/// Memory that did not come back is only a leak worth a warning when it is also
/// larger than this: allocator bookkeeping and thread arenas keep a few MiB
/// whatever was loaded, which would flag every tiny model.
pub const RELEASE_NOISE_BYTES: u64 = 8 << 20;

/// GPU memory readings ([`crate::vram::GpuMemory`]: NVML and the CUDA device).
pub trait VramSource: Send + Sync {
    /// GPU memory this process holds, bytes.
    fn process_bytes(&self) -> Option<u64>;
    /// GPU memory in use on the device(s), every process counted, bytes.
    fn device_used_bytes(&self) -> Option<u64>;
    /// Hands memory the allocator caches back to the device (after a model is dropped).
    fn release_cached(&self) {}
}

/// Current resident set size of this process, bytes.
pub fn rss_bytes() -> u64 {
    let page = page_size();
    fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .unwrap_or(0)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

fn status_field_kib(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The kernel's RSS high-water mark (VmHWM), bytes.
pub fn hwm_bytes() -> u64 {
    status_field_kib("VmHWM:").unwrap_or_else(rss_bytes)
}

/// Resets the kernel's RSS high-water mark to the current RSS. False when the
/// kernel refuses (then the sampler alone gives the peak).
pub fn reset_hwm() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Gives freed heap back to the operating system (glibc keeps it otherwise).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The system's MemAvailable, bytes.
pub fn meminfo_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line["MemAvailable:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The cgroup's memory limit and working set, bytes (v2, then v1); None when
/// unlimited. The working set is the usage minus the inactive page cache, as
/// the kubelet counts it: reading checkpoints fills the cache, which the
/// kernel reclaims before it would OOM-kill.
pub fn cgroup_memory() -> Option<(u64, u64)> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_memory_in(Path::new("/sys/fs/cgroup"), &own)
}

/// `key`'s value in a cgroup `memory.stat` file.
fn stat_field(stat: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(stat).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// [`cgroup_memory`] against a cgroup filesystem at `root` and the content of
/// `/proc/self/cgroup`.
pub fn cgroup_memory_in(root: &Path, self_cgroup: &str) -> Option<(u64, u64)> {
    // cgroup v2: this process's group ("0::/path"), then the root (a container's
    // own group is usually mounted as the root).
    let mut candidates = Vec::new();
    if let Some(path) = self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::trim))
    {
        let rel = path.trim_matches('/');
        if !rel.is_empty() {
            candidates.push(root.join(rel));
        }
    }
    candidates.push(root.to_owned());
    for dir in candidates {
        if let Ok(max) = fs::read_to_string(dir.join("memory.max")) {
            let max = max.trim();
            if max == "max" {
                return None;
            }
            let limit: u64 = max.parse().ok()?;
            let usage = read_u64(&dir.join("memory.current")).unwrap_or(0);
            let inactive = stat_field(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
            return Some((limit, usage.saturating_sub(inactive)));
        }
    }
    // cgroup v1.
    let v1 = root.join("memory");
    let limit = read_u64(&v1.join("memory.limit_in_bytes"))?;
    if limit >= (1u64 << 60) {
        return None;
    }
    let usage = read_u64(&v1.join("memory.usage_in_bytes")).unwrap_or(0);
    let inactive = stat_field(&v1.join("memory.stat"), "total_inactive_file").unwrap_or(0);
    Some((limit, usage.saturating_sub(inactive)))
}

/// Memory this process can still get: the system's MemAvailable, or what is
/// left under the cgroup limit when that is smaller.
pub fn available_bytes() -> Option<u64> {
    let system = meminfo_available();
    let cgroup = cgroup_memory().map(|(limit, usage)| limit.saturating_sub(usage));
    match (system, cgroup) {
        (Some(s), Some(c)) => Some(s.min(c)),
        (s, c) => s.or(c),
    }
}

/// One point of the memory timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimelinePoint {
    pub seconds: f64,
    pub rss_bytes: u64,
    /// This process's GPU memory.
    pub vram_bytes: Option<u64>,
}

/// A named phase on the timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseSpan {
    pub name: String,
    pub start: f64,
    pub end: f64,
}

/// What a finished probe recorded.
#[derive(Clone, Debug, Default)]
pub struct ProbeRecord {
    pub seconds: f64,
    pub phases: Vec<PhaseReport>,
    pub spans: Vec<PhaseSpan>,
    pub timeline: Vec<TimelinePoint>,
    pub peak_rss_bytes: u64,
    /// This process's GPU memory peak.
    pub peak_vram_bytes: Option<u64>,
    /// The device-wide GPU memory peak (every process on the device).
    pub peak_vram_device_bytes: Option<u64>,
    pub warnings: Vec<String>,
}

struct OpenPhase {
    name: String,
    start: MemorySample,
    started: Instant,
}

struct Shared {
    t0: Instant,
    stop: AtomicBool,
    phase_peak_rss: AtomicU64,
    phase_peak_vram: AtomicU64,
    /// Device-wide GPU memory peak of the whole run (0 before any reading).
    peak_vram_device: AtomicU64,
    timeline: Mutex<Vec<TimelinePoint>>,
    vram: Mutex<Option<Arc<dyn VramSource>>>,
}

impl Shared {
    fn vram_source(&self) -> Option<Arc<dyn VramSource>> {
        self.vram.lock().ok()?.clone()
    }

    /// (this process's, device-wide) GPU memory.
    fn vram_now(&self) -> (Option<u64>, Option<u64>) {
        match self.vram_source() {
            Some(source) => (source.process_bytes(), source.device_used_bytes()),
            None => (None, None),
        }
    }

    fn sample_point(&self) {
        let rss = rss_bytes();
        let (vram, device) = self.vram_now();
        self.phase_peak_rss.fetch_max(rss, Ordering::Relaxed);
        if let Some(v) = vram {
            self.phase_peak_vram.fetch_max(v, Ordering::Relaxed);
        }
        if let Some(d) = device {
            self.peak_vram_device.fetch_max(d, Ordering::Relaxed);
        }
        if let Ok(mut t) = self.timeline.lock() {
            t.push(TimelinePoint {
                seconds: self.t0.elapsed().as_secs_f64(),
                rss_bytes: rss,
                vram_bytes: vram,
            });
        }
    }
}

/// Records phases of one run. Start it at the beginning of a stage, wrap each
/// phase in [`Probe::begin`]/[`Probe::end`], and [`Probe::finish`] it.
pub struct Probe {
    shared: Arc<Shared>,
    sampler: Option<JoinHandle<()>>,
    open: Option<OpenPhase>,
    phases: Vec<PhaseReport>,
    spans: Vec<PhaseSpan>,
    hwm_resettable: bool,
    warnings: Vec<String>,
}

impl Probe {
    /// Starts a probe whose sampler reads RSS every `interval`.
    pub fn start(interval: Duration) -> Probe {
        let shared = Arc::new(Shared {
            t0: Instant::now(),
            stop: AtomicBool::new(false),
            phase_peak_rss: AtomicU64::new(0),
            phase_peak_vram: AtomicU64::new(0),
            peak_vram_device: AtomicU64::new(0),
            timeline: Mutex::new(Vec::new()),
            vram: Mutex::new(None),
        });
        shared.sample_point();
        let thread_shared = shared.clone();
        let sampler = std::thread::Builder::new()
            .name("kubewan-memprobe".into())
            .spawn(move || {
                while !thread_shared.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    thread_shared.sample_point();
                }
            })
            .ok();
        let hwm_resettable = reset_hwm();
        let mut warnings = Vec::new();
        if !hwm_resettable {
            warnings.push(
                "the kernel refused to reset the RSS high-water mark; phase peaks are sampled"
                    .into(),
            );
        }
        Probe {
            shared,
            sampler,
            open: None,
            phases: Vec::new(),
            spans: Vec::new(),
            hwm_resettable,
            warnings,
        }
    }

    /// A probe sampling every 50 ms, with VRAM from NVML when a GPU is visible
    /// (`KUBEWAN_NO_NVML=1` turns that off).
    pub fn new() -> Probe {
        let mut probe = Probe::start(Duration::from_millis(50));
        if let Some(nvml) = crate::vram::GpuMemory::nvml() {
            probe.set_vram_source(Arc::new(nvml));
        }
        probe
    }

    /// Adds the device the models compute on to the VRAM readings (the CUDA
    /// driver's figures and allocator; nothing for the CPU).
    pub fn watch_device(&mut self, device: &candle_core::Device) {
        if let Some(source) = crate::vram::GpuMemory::for_device(device) {
            self.set_vram_source(Arc::new(source));
        }
    }

    pub fn set_vram_source(&mut self, source: Arc<dyn VramSource>) {
        if let Ok(mut v) = self.shared.vram.lock() {
            *v = Some(source);
        }
    }

    /// Seconds since the probe started.
    pub fn elapsed(&self) -> f64 {
        self.shared.t0.elapsed().as_secs_f64()
    }

    /// A reading now.
    pub fn sample(&self) -> MemorySample {
        let (vram_process_bytes, vram_used_bytes) = self.shared.vram_now();
        MemorySample {
            rss_bytes: rss_bytes(),
            available_bytes: available_bytes(),
            vram_process_bytes,
            vram_used_bytes,
        }
    }

    /// Starts phase `name` (ending any open phase first).
    pub fn begin(&mut self, name: &str) {
        self.end();
        if self.hwm_resettable {
            reset_hwm();
        }
        let start = self.sample();
        self.shared
            .phase_peak_rss
            .store(start.rss_bytes, Ordering::Relaxed);
        self.shared
            .phase_peak_vram
            .store(start.vram_process_bytes.unwrap_or(0), Ordering::Relaxed);
        self.shared.sample_point();
        self.open = Some(OpenPhase {
            name: name.to_owned(),
            start,
            started: Instant::now(),
        });
    }

    /// Ends the open phase, if any, and returns its report.
    pub fn end(&mut self) -> Option<PhaseReport> {
        let open = self.open.take()?;
        self.shared.sample_point();
        let end = self.sample();
        let sampled = self.shared.phase_peak_rss.load(Ordering::Relaxed);
        let hwm = if self.hwm_resettable { hwm_bytes() } else { 0 };
        let peak_rss = sampled
            .max(hwm)
            .max(end.rss_bytes)
            .max(open.start.rss_bytes);
        let peak_vram = end.vram_process_bytes.map(|at_end| {
            self.shared
                .phase_peak_vram
                .load(Ordering::Relaxed)
                .max(at_end)
        });
        let t_end = self.elapsed();
        let seconds = open.started.elapsed().as_secs_f64();
        self.spans.push(PhaseSpan {
            name: open.name.clone(),
            start: t_end - seconds,
            end: t_end,
        });
        let report = PhaseReport {
            name: open.name,
            seconds,
            start: open.start,
            end,
            peak_rss_bytes: peak_rss,
            peak_vram_bytes: peak_vram,
        };
        self.phases.push(report.clone());
        Some(report)
    }

    /// Runs `f` as phase `name`.
    pub fn phase<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        self.begin(name);
        let out = f();
        self.end();
        out
    }

    /// Returns freed heap to the OS and freed GPU memory the allocator caches
    /// to the device (after a model was dropped).
    pub fn give_back_memory(&self) {
        trim_heap();
        if let Some(source) = self.shared.vram_source() {
            source.release_cached();
        }
    }

    /// Drops `value` (a loaded model) as phase `phase`, returns the heap to the
    /// OS and cached GPU memory to the device, and reports how much of what
    /// loading added (`loaded` minus `baseline`, both taken with
    /// [`Probe::sample`]) came back.
    pub fn release<T>(
        &mut self,
        phase: &str,
        what: &str,
        value: T,
        baseline: &MemorySample,
        loaded: &MemorySample,
    ) -> ReleaseReport {
        self.begin(phase);
        drop(value);
        self.give_back_memory();
        let after = self.sample();
        self.end();
        let report = release_report(what, baseline, loaded, &after);
        if let Some(w) = &report.warning {
            self.warnings.push(w.clone());
        }
        report
    }

    /// Stops the sampler and returns everything recorded.
    pub fn finish(mut self) -> ProbeRecord {
        self.end();
        self.shared.sample_point();
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.sampler.take() {
            let _ = handle.join();
        }
        let timeline = self
            .shared
            .timeline
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let peak_rss_bytes = self
            .phases
            .iter()
            .map(|p| p.peak_rss_bytes)
            .chain(timeline.iter().map(|p| p.rss_bytes))
            .max()
            .unwrap_or(0);
        let peak_vram_bytes = self
            .phases
            .iter()
            .filter_map(|p| p.peak_vram_bytes)
            .chain(timeline.iter().filter_map(|p| p.vram_bytes))
            .max();
        let peak_vram_device_bytes = self
            .shared
            .vram_source()
            .map(|_| self.shared.peak_vram_device.load(Ordering::Relaxed));
        ProbeRecord {
            seconds: self.elapsed(),
            phases: std::mem::take(&mut self.phases),
            spans: std::mem::take(&mut self.spans),
            timeline,
            peak_rss_bytes,
            peak_vram_bytes,
            peak_vram_device_bytes,
            warnings: std::mem::take(&mut self.warnings),
        }
    }
}

impl Default for Probe {
    fn default() -> Self {
        Probe::new()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// How much of what loading added came back after the release.
pub fn release_report(
    what: &str,
    baseline: &MemorySample,
    loaded: &MemorySample,
    after: &MemorySample,
) -> ReleaseReport {
    let loaded_bytes = loaded.rss_bytes.saturating_sub(baseline.rss_bytes);
    let freed_bytes = loaded
        .rss_bytes
        .saturating_sub(after.rss_bytes)
        .min(loaded_bytes);
    let freed_ratio = if loaded_bytes == 0 {
        1.0
    } else {
        freed_bytes as f64 / loaded_bytes as f64
    };
    // This process's GPU memory (the device-wide figure would count others).
    let vram_loaded_bytes = match (baseline.vram_process_bytes, loaded.vram_process_bytes) {
        (Some(b), Some(l)) => Some(l.saturating_sub(b)),
        _ => None,
    };
    let vram_freed_bytes = match (loaded.vram_process_bytes, after.vram_process_bytes) {
        (Some(l), Some(a)) => Some(
            l.saturating_sub(a)
                .min(vram_loaded_bytes.unwrap_or(u64::MAX)),
        ),
        _ => None,
    };
    let mut problems = Vec::new();
    if freed_ratio < RELEASE_WARN_RATIO && loaded_bytes - freed_bytes > RELEASE_NOISE_BYTES {
        problems.push(format!(
            "RAM: only {} of {} came back ({:.0}%)",
            human_bytes(freed_bytes),
            human_bytes(loaded_bytes),
            100.0 * freed_ratio
        ));
    }
    if let (Some(l), Some(f)) = (vram_loaded_bytes, vram_freed_bytes)
        && l > 0
        && (f as f64) < RELEASE_WARN_RATIO * l as f64
        && l - f > RELEASE_NOISE_BYTES
    {
        problems.push(format!(
            "VRAM: only {} of {} came back",
            human_bytes(f),
            human_bytes(l)
        ));
    }
    ReleaseReport {
        what: what.to_owned(),
        loaded_bytes,
        freed_bytes,
        freed_ratio,
        vram_loaded_bytes,
        vram_freed_bytes,
        warning: (!problems.is_empty())
            .then(|| format!("{what} was not released: {}", problems.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss: u64) -> MemorySample {
        MemorySample {
            rss_bytes: rss,
            ..Default::default()
        }
    }

    #[test]
    fn release_report_warns_below_95_percent() {
        const GIB: u64 = 1 << 30;
        let ok = release_report(
            "vlm",
            &sample(GIB),
            &sample(11 * GIB),
            &sample(GIB + GIB / 5),
        );
        assert_eq!(ok.loaded_bytes, 10 * GIB);
        assert_eq!(ok.freed_bytes, 10 * GIB - GIB / 5);
        assert!(ok.warning.is_none(), "{ok:?}");
        let leak = release_report("vlm", &sample(GIB), &sample(11 * GIB), &sample(6 * GIB));
        assert!((leak.freed_ratio - 0.5).abs() < 1e-9);
        assert!(leak.warning.unwrap().contains("50%"));
    }

    #[test]
    fn allocator_noise_of_a_tiny_model_is_no_leak() {
        let tiny = release_report(
            "vlm",
            &sample(10 << 20),
            &sample(11 << 20),
            &sample(10 << 20 | 512 << 10),
        );
        assert!(tiny.freed_ratio < RELEASE_WARN_RATIO);
        assert!(tiny.warning.is_none(), "{tiny:?}");
    }

    #[test]
    fn cgroup_limits_are_read_from_v2_and_v1() {
        let root = tempfile::tempdir().unwrap();
        let group = root.path().join("kubepods/pod1");
        fs::create_dir_all(&group).unwrap();
        fs::write(group.join("memory.max"), "1073741824\n").unwrap();
        fs::write(group.join("memory.current"), "104857600\n").unwrap();
        assert_eq!(
            cgroup_memory_in(root.path(), "0::/kubepods/pod1\n"),
            Some((1 << 30, 100 << 20))
        );
        // The inactive page cache is not part of the working set.
        fs::write(
            group.join("memory.stat"),
            "anon 52428800\ninactive_file 41943040\nactive_file 1048576\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_memory_in(root.path(), "0::/kubepods/pod1\n"),
            Some((1 << 30, 60 << 20))
        );
        fs::write(group.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_in(root.path(), "0::/kubepods/pod1\n"), None);
        let v1 = tempfile::tempdir().unwrap();
        fs::create_dir_all(v1.path().join("memory")).unwrap();
        fs::write(v1.path().join("memory/memory.limit_in_bytes"), "2147483648").unwrap();
        fs::write(v1.path().join("memory/memory.usage_in_bytes"), "1024").unwrap();
        assert_eq!(
            cgroup_memory_in(v1.path(), "4:memory:/x\n"),
            Some((2 << 30, 1024))
        );
        fs::write(
            v1.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712",
        )
        .unwrap();
        assert_eq!(cgroup_memory_in(v1.path(), ""), None);
    }

    #[test]
    fn phases_record_peaks_above_their_start() {
        let mut probe = Probe::start(Duration::from_millis(5));
        probe.begin("alloc");
        let block = vec![7u8; 64 << 20];
        std::hint::black_box(&block);
        drop(block);
        trim_heap();
        let report = probe.end().unwrap();
        assert!(
            report.peak_rss_bytes >= report.start.rss_bytes + (60 << 20),
            "{report:?}"
        );
        let record = probe.finish();
        assert_eq!(record.phases.len(), 1);
        assert_eq!(record.spans[0].name, "alloc");
        assert!(record.timeline.len() >= 2);
        assert!(available_bytes().unwrap_or(0) > 0);
    }
}
