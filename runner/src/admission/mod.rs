//! Memory admission: before a model is loaded, every phase it will run in is
//! checked. A phase needs the weights of the components resident in it, at
//! the dtype they are loaded in (read from the safetensors headers, nothing
//! else), plus an activation estimate for the job's shapes (derived per model
//! in [`qwen`] and [`wan`]); that need is compared with what the process may
//! still use:
//! - RAM: the least of the system's MemAvailable, the cgroup limit minus the
//!   cgroup's working set (the pod's memory limit, enforced by the kernel),
//!   and the task's declared memory limit minus this process's RSS (the same
//!   limit where no cgroup enforces it: local mode);
//! - VRAM, when the models run on a GPU: a [`VramBudget`]. The runner plugs in
//!   the GPU memory the probe reads ([`crate::vram::GpuMemory`], set by
//!   [`Admission::watch_device`]): the CUDA driver's free memory of the device
//!   the models run on, NVML's free memory of the visible devices before that.
//!
//! On a GPU the weights and activations live in VRAM and the RAM need is what
//! stays on the host (the loader's staging of the largest tensor, frames coming
//! back); on the CPU everything is RAM. Every check is reported (need vs
//! available per phase, [`AdmissionReport`]); a refusal ([`Refusal`]) names the
//! phase, the need and the limit, and nothing is loaded.

pub mod qwen;
pub mod wan;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::DType;
use kubewan_crds::report::AdmissionReport;
use kubewan_crds::status::human_bytes;
use kubewan_model_common::checkpoint::RequiredWeights;
use kubewan_model_common::safetensors::{read_header, weight_files};

use crate::probe::{cgroup_memory, meminfo_available, rss_bytes};

/// One component's weights as loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weights {
    pub component: String,
    pub dtype: DType,
    /// Bytes once loaded: float tensors at `dtype`, the others as stored.
    pub bytes: u64,
    /// The loader's transient host memory: it reads one tensor at a time
    /// (the stored bytes) and converts it (the loaded bytes); the largest one.
    pub staging_bytes: u64,
}

/// The weights of a catalogue entry of `model_dir`, loaded in `dtype`.
pub fn weights(model_dir: &Path, entry: &RequiredWeights, dtype: DType) -> Result<Weights> {
    let dir = if entry.component.is_empty() {
        model_dir.to_owned()
    } else {
        model_dir.join(entry.component)
    };
    let files = weight_files(&dir, entry.stem)?;
    let mut bytes = 0;
    let mut staging_bytes = 0;
    for shard in &files.shards {
        let header = read_header(shard)
            .with_context(|| format!("sizing the weights of {}", dir.display()))?;
        for tensor in header.tensors.values() {
            let loaded = tensor.loaded_bytes(dtype);
            bytes += loaded;
            staging_bytes = staging_bytes.max(tensor.len + loaded);
        }
    }
    Ok(Weights {
        component: if entry.component.is_empty() {
            entry.stem.to_owned()
        } else {
            entry.component.to_owned()
        },
        dtype,
        bytes,
        staging_bytes,
    })
}

/// A phase's transient tensors: on the compute device, and on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Activations {
    pub device_bytes: u64,
    pub host_bytes: u64,
    /// The shapes it was derived from, for people ("32760 tokens, ...").
    pub shapes: String,
}

/// What one phase needs: its resident weights and its activations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseNeed {
    pub phase: &'static str,
    pub weights: Vec<Weights>,
    /// The phase loads its weights (so the loader's staging counts).
    pub loads: bool,
    pub activations: Activations,
}

/// A need as bytes of RAM and (on a GPU) VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub ram: u64,
    pub vram: Option<u64>,
}

impl PhaseNeed {
    /// The need placed on the host only (`on_gpu` false) or on a GPU.
    pub fn need(&self, on_gpu: bool) -> Need {
        let weights: u64 = self.weights.iter().map(|w| w.bytes).sum();
        let staging = if self.loads {
            self.weights
                .iter()
                .map(|w| w.staging_bytes)
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        let host = staging + self.activations.host_bytes;
        let device = weights + self.activations.device_bytes;
        if on_gpu {
            Need {
                ram: host,
                vram: Some(device),
            }
        } else {
            Need {
                ram: host + device,
                vram: None,
            }
        }
    }

    /// "transformer 1.2GiB (bf16), vae 242.1MiB (f32); activations 3.1GiB (…)".
    fn describe(&self) -> String {
        let weights: Vec<String> = self
            .weights
            .iter()
            .map(|w| {
                format!(
                    "{} {} ({})",
                    w.component,
                    human_bytes(w.bytes),
                    w.dtype.as_str()
                )
            })
            .collect();
        format!(
            "weights {}; activations {} ({})",
            weights.join(", "),
            human_bytes(self.activations.device_bytes + self.activations.host_bytes),
            self.activations.shapes
        )
    }
}

/// Free device memory a process may still use; the runner's is
/// [`crate::vram::GpuMemory`]'s.
pub trait VramBudget: Send + Sync {
    /// Bytes of device memory still available.
    fn available_bytes(&self) -> Option<u64>;
    /// Where the figure comes from, for a refusal message.
    fn source(&self) -> String;
}

impl VramBudget for crate::vram::GpuMemory {
    fn available_bytes(&self) -> Option<u64> {
        self.free_bytes()
    }
    fn source(&self) -> String {
        self.free_source().into()
    }
}

/// RAM the process may still use, and the limit that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamAvailable {
    pub bytes: Option<u64>,
    /// e.g. "cgroup memory limit 256.0MiB, 40.1MiB in use".
    pub limit: String,
}

/// The least of the RAM figures, each with what it is (see the module docs).
pub fn ram_available(
    system: Option<u64>,
    cgroup: Option<(u64, u64)>,
    declared: Option<u64>,
    rss: u64,
) -> RamAvailable {
    let mut best = RamAvailable {
        bytes: system,
        limit: "the system's available memory".into(),
    };
    let mut consider = |bytes: u64, limit: String| {
        if best.bytes.is_none_or(|b| bytes < b) {
            best = RamAvailable {
                bytes: Some(bytes),
                limit,
            };
        }
    };
    if let Some((limit, used)) = cgroup {
        consider(
            limit.saturating_sub(used),
            format!(
                "cgroup memory limit {}, {} in use",
                human_bytes(limit),
                human_bytes(used)
            ),
        );
    }
    if let Some(limit) = declared {
        consider(
            limit.saturating_sub(rss),
            format!(
                "spec.runner.memoryLimit {}, {} in use by this process",
                human_bytes(limit),
                human_bytes(rss)
            ),
        );
    }
    best
}

/// A phase that would not fit: nothing was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The model that was about to be loaded.
    pub model: String,
    pub phase: &'static str,
    /// "RAM" or "VRAM".
    pub memory: &'static str,
    pub need: u64,
    pub available: u64,
    pub limit: String,
    pub breakdown: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing to load {} for phase {}: it needs {} of {} ({}) but only {} is available ({}); \
             give the pod more memory (spec.runner.memoryLimit) or use a smaller model, resolution or frame count",
            self.model,
            self.phase,
            human_bytes(self.need),
            self.memory,
            self.breakdown,
            human_bytes(self.available),
            self.limit
        )
    }
}

impl std::error::Error for Refusal {}

/// The limits one run is held to; checks phases and keeps their reports.
pub struct Admission {
    /// The task's declared memory limit, bytes.
    declared_limit: Option<u64>,
    vram: Option<Arc<dyn VramBudget>>,
    reports: Vec<AdmissionReport>,
}

impl Admission {
    /// Held to the cgroup, the system and `declared_limit`; GPU phases to the
    /// device [`Admission::watch_device`] names.
    pub fn new(declared_limit: Option<u64>) -> Admission {
        Admission {
            declared_limit,
            vram: None,
            reports: Vec::new(),
        }
    }

    /// Holds GPU phases to the free memory of `device`, the device the models
    /// run on (nothing changes for the CPU; `KUBEWAN_NO_NVML=1` leaves NVML
    /// out, as for the probe).
    pub fn watch_device(&mut self, device: &candle_core::Device) {
        if !device.is_cpu()
            && let Some(gpu) = crate::vram::GpuMemory::for_device(device)
        {
            self.vram = Some(Arc::new(gpu));
        }
    }

    /// The RAM this process may still use, now.
    pub fn ram(&self) -> RamAvailable {
        ram_available(
            meminfo_available(),
            cgroup_memory(),
            self.declared_limit,
            rss_bytes(),
        )
    }

    /// Checks the phases `model` is about to be loaded for (`on_gpu`: the
    /// models run on a GPU) and records each one's report; the first phase
    /// that does not fit is refused.
    pub fn check(
        &mut self,
        model: &str,
        phases: &[PhaseNeed],
        on_gpu: bool,
    ) -> std::result::Result<(), Refusal> {
        let (reports, refusal) = self.assess(model, phases, on_gpu);
        self.reports.extend(reports);
        refusal.map_or(Ok(()), Err)
    }

    /// Whether [`Admission::check`] would admit `phases` now, recording
    /// nothing: for choosing between ways to run (two experts resident
    /// together, or one at a time).
    pub fn fits(&self, phases: &[PhaseNeed], on_gpu: bool) -> bool {
        self.assess("", phases, on_gpu).1.is_none()
    }

    /// The reports of `phases` up to the first that does not fit, and its refusal.
    fn assess(
        &self,
        model: &str,
        phases: &[PhaseNeed],
        on_gpu: bool,
    ) -> (Vec<AdmissionReport>, Option<Refusal>) {
        let ram = self.ram();
        let vram = on_gpu
            .then(|| {
                self.vram
                    .as_ref()
                    .map(|v| (v.available_bytes(), v.source()))
            })
            .flatten();
        let mut reports = Vec::new();
        for phase in phases {
            let need = phase.need(on_gpu);
            let mut refusal = None;
            if let Some(available) = ram.bytes
                && need.ram > available
            {
                refusal = Some(("RAM", need.ram, available, ram.limit.clone()));
            }
            if let (Some(need_vram), Some((Some(available), source))) = (need.vram, &vram)
                && need_vram > *available
                && refusal.is_none()
            {
                refusal = Some(("VRAM", need_vram, *available, source.clone()));
            }
            reports.push(AdmissionReport {
                phase: phase.phase.into(),
                need_ram_bytes: need.ram,
                available_ram_bytes: ram.bytes,
                need_vram_bytes: need.vram,
                available_vram_bytes: vram.as_ref().and_then(|(a, _)| *a),
                admitted: refusal.is_none(),
            });
            if let Some((memory, need, available, limit)) = refusal {
                let refusal = Refusal {
                    model: model.into(),
                    phase: phase.phase,
                    memory,
                    need,
                    available,
                    limit,
                    breakdown: phase.describe(),
                };
                return (reports, Some(refusal));
            }
        }
        (reports, None)
    }

    /// Every phase checked so far.
    pub fn into_reports(self) -> Vec<AdmissionReport> {
        self.reports
    }
}

/// The tiled CPU attention's scratch in f32 elements, worked out by hand
/// for lengths of at least a block and more blocks than workers: per worker
/// the transposed query and output blocks (240 query lanes × head dim
/// each), one 48-query panel's 128-key scores, the key and value tiles (128
/// × head dim each) and two statistics per query, five of them from a
/// 64-byte boundary (15 more each).
#[cfg(test)]
fn tiled_scratch_by_hand(head_dim: u64) -> u64 {
    let workers = candle_core::utils::get_num_threads() as u64;
    workers * (2 * 240 * head_dim + 128 * 48 + 2 * 128 * head_dim + 2 * 240 + 5 * 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn phase(weights: u64, activations: u64) -> PhaseNeed {
        PhaseNeed {
            phase: "denoise",
            weights: vec![Weights {
                component: "transformer".into(),
                dtype: DType::BF16,
                bytes: weights,
                staging_bytes: 3 * MIB,
            }],
            loads: false,
            activations: Activations {
                device_bytes: activations,
                host_bytes: MIB,
                shapes: "2160 tokens".into(),
            },
        }
    }

    struct FixedVram(u64);
    impl VramBudget for FixedVram {
        fn available_bytes(&self) -> Option<u64> {
            Some(self.0)
        }
        fn source(&self) -> String {
            "a fixed budget".into()
        }
    }

    #[test]
    fn the_least_ram_figure_decides_and_names_its_limit() {
        let r = ram_available(Some(8 << 30), Some((1 << 30, 100 * MIB)), None, 0);
        assert_eq!(r.bytes, Some((1 << 30) - 100 * MIB));
        assert_eq!(r.limit, "cgroup memory limit 1.0GiB, 100.0MiB in use");
        let r = ram_available(Some(8 << 30), None, Some(256 * MIB), 40 * MIB);
        assert_eq!(r.bytes, Some(216 * MIB));
        assert!(
            r.limit.starts_with("spec.runner.memoryLimit 256.0MiB"),
            "{}",
            r.limit
        );
        let r = ram_available(Some(64 * MIB), None, Some(256 * MIB), 40 * MIB);
        assert_eq!(r.limit, "the system's available memory");
        assert_eq!(ram_available(None, None, None, 0).bytes, None);
    }

    #[test]
    fn on_the_cpu_everything_is_ram_on_a_gpu_the_host_keeps_staging() {
        let mut p = phase(100 * MIB, 50 * MIB);
        assert_eq!(
            p.need(false),
            Need {
                ram: 151 * MIB,
                vram: None
            }
        );
        assert_eq!(
            p.need(true),
            Need {
                ram: MIB,
                vram: Some(150 * MIB)
            }
        );
        p.loads = true;
        assert_eq!(p.need(false).ram, 154 * MIB);
        assert_eq!(p.need(true).ram, 4 * MIB);
    }

    #[test]
    fn a_refusal_names_the_phase_the_need_and_the_limit_and_is_reported() {
        let mut a = Admission {
            declared_limit: Some(128 * MIB),
            vram: None,
            reports: Vec::new(),
        };
        let small = PhaseNeed {
            phase: "video_load",
            ..phase(MIB, 0)
        };
        let big = phase(300 * MIB, 200 * MIB);
        let err = a.check("tiny/wan", &[small, big], false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "refusing to load tiny/wan for phase denoise: it needs 501.0MiB of RAM"
            ),
            "{text}"
        );
        assert!(
            text.contains("transformer 300.0MiB (bf16)") && text.contains("2160 tokens"),
            "{text}"
        );
        assert!(text.contains("spec.runner.memoryLimit 128.0MiB"), "{text}");
        let reports = a.into_reports();
        assert_eq!(reports.len(), 2);
        assert!(reports[0].admitted && !reports[1].admitted);
        assert_eq!(reports[1].need_ram_bytes, 501 * MIB);
        assert!(reports[1].available_ram_bytes.unwrap() < 128 * MIB);
    }

    #[test]
    fn fits_answers_without_recording() {
        let a = Admission {
            declared_limit: None,
            vram: Some(Arc::new(FixedVram(200 * MIB))),
            reports: Vec::new(),
        };
        // two experts of 120 MiB do not fit together in 200 MiB; one does
        let both = phase(240 * MIB, 0);
        let one = phase(120 * MIB, 0);
        assert!(!a.fits(std::slice::from_ref(&both), true));
        assert!(a.fits(std::slice::from_ref(&one), true));
        assert!(a.into_reports().is_empty());
    }

    #[test]
    fn on_a_gpu_the_vram_budget_decides() {
        let mut a = Admission {
            declared_limit: None,
            vram: Some(Arc::new(FixedVram(200 * MIB))),
            reports: Vec::new(),
        };
        a.check("m", &[phase(100 * MIB, 50 * MIB)], true).unwrap();
        let err = a.check("m", &[phase(300 * MIB, 0)], true).unwrap_err();
        assert_eq!(
            (err.memory, err.need, err.available),
            ("VRAM", 300 * MIB, 200 * MIB)
        );
        assert_eq!(err.limit, "a fixed budget");
        let reports = a.into_reports();
        assert_eq!(reports[0].available_vram_bytes, Some(200 * MIB));
        assert_eq!(reports[0].need_vram_bytes, Some(150 * MIB));
    }
}
