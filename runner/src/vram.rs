//! GPU memory as the runner measures it:
//!
//! - this process's own use: NVML's per-process figure (the entry of our PID in
//!   each device's running compute processes: tensors, CUDA context, cuBLAS
//!   workspaces), read through the nvml-wrapper crate, which loads
//!   `libnvidia-ml.so.1` at run time (a machine without the NVIDIA driver simply
//!   has no NVML, and a CPU build runs there unchanged);
//! - the device-wide use (all processes), from NVML too, kept in reports and
//!   status as such;
//! - in the CUDA build, the CUDA driver's free/total of the device the models
//!   compute on (what the memory admission, [`crate::admission`], holds GPU
//!   phases to: [`GpuMemory::free_bytes`]), and the
//!   default memory pool from which candle allocates (stream-ordered): its
//!   reserved bytes stand in for the process figure where NVML cannot list our
//!   PID (a container in its own PID namespace sees host PIDs in NVML), and it
//!   is trimmed after a model is dropped so the memory really goes back.

use std::sync::Arc;

use candle_core::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

use crate::probe::VramSource;

/// NVML's readings of every GPU the container sees.
pub struct NvmlVram {
    nvml: Nvml,
    devices: u32,
    pid: u32,
}

/// What NVML lists of the processes on the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcessUse {
    /// Our PID's bytes over all devices.
    Ours(u64),
    /// No process at all: nobody, us included, holds GPU memory.
    Nobody,
    /// Others are listed, not our PID (another process, or a PID namespace).
    NotListed,
}

impl NvmlVram {
    /// NVML with at least one device, or None (no driver, no GPU).
    pub fn open() -> Option<NvmlVram> {
        let nvml = Nvml::init().ok()?;
        let devices = nvml.device_count().ok().filter(|&n| n > 0)?;
        Some(NvmlVram {
            nvml,
            devices,
            pid: std::process::id(),
        })
    }

    /// (used, total) bytes over all devices, every process counted.
    pub fn device_used_and_total(&self) -> Option<(u64, u64)> {
        let mut used = 0;
        let mut total = 0;
        for i in 0..self.devices {
            let memory = self.nvml.device_by_index(i).ok()?.memory_info().ok()?;
            used += memory.used;
            total += memory.total;
        }
        Some((used, total))
    }

    fn process_use(&self) -> Option<ProcessUse> {
        let mut ours = None;
        let mut anyone = false;
        for i in 0..self.devices {
            let device = self.nvml.device_by_index(i).ok()?;
            for process in device.running_compute_processes().ok()? {
                anyone = true;
                if process.pid == self.pid {
                    let bytes = match process.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes,
                        UsedGpuMemory::Unavailable => 0,
                    };
                    *ours.get_or_insert(0) += bytes;
                }
            }
        }
        Some(match (ours, anyone) {
            (Some(bytes), _) => ProcessUse::Ours(bytes),
            (None, false) => ProcessUse::Nobody,
            (None, true) => ProcessUse::NotListed,
        })
    }
}

/// The GPU memory source the probe samples: NVML, plus the CUDA device the
/// models run on once it is known ([`GpuMemory::with_cuda`]).
#[derive(Clone)]
pub struct GpuMemory {
    nvml: Option<Arc<NvmlVram>>,
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::CudaMemory>,
}

impl GpuMemory {
    /// NVML alone; None without a driver (`KUBEWAN_NO_NVML=1` also turns it off).
    pub fn nvml() -> Option<GpuMemory> {
        if std::env::var_os("KUBEWAN_NO_NVML").is_some() {
            return None;
        }
        Some(GpuMemory {
            nvml: Some(Arc::new(NvmlVram::open()?)),
            #[cfg(feature = "cuda")]
            cuda: None,
        })
    }

    /// This source with the CUDA device `device` added (no change for a CPU device).
    pub fn with_cuda(self, device: &Device) -> GpuMemory {
        #[cfg(feature = "cuda")]
        {
            let mut this = self;
            if let Ok(cuda) = device.as_cuda_device() {
                this.cuda = Some(cuda::CudaMemory::new(cuda.clone()));
            }
            this
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            self
        }
    }

    /// A source for `device` when there is anything to read (NVML or a CUDA device).
    pub fn for_device(device: &Device) -> Option<GpuMemory> {
        let base = GpuMemory::nvml().unwrap_or(GpuMemory {
            nvml: None,
            #[cfg(feature = "cuda")]
            cuda: None,
        });
        let source = base.with_cuda(device);
        source.has_readings().then_some(source)
    }

    fn has_readings(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            return true;
        }
        self.nvml.is_some()
    }

    /// Device memory a new allocation of this process can still get: the
    /// CUDA driver's free figure of the device the models run on, or, before
    /// that device is known, NVML's total − used over the visible devices.
    pub fn free_bytes(&self) -> Option<u64> {
        if let Some((free, _)) = self.free_and_total() {
            return Some(free);
        }
        let (used, total) = self.nvml.as_ref()?.device_used_and_total()?;
        Some(total.saturating_sub(used))
    }

    /// Where [`GpuMemory::free_bytes`] comes from, for a refusal message.
    pub fn free_source(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            return "free memory of the GPU the models run on (CUDA driver)";
        }
        "free memory of the visible GPUs (NVML)"
    }

    fn free_and_total(&self) -> Option<(u64, u64)> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return cuda.free_and_total();
        }
        None
    }

    fn pool_bytes(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return cuda.pool_reserved_bytes();
        }
        None
    }
}

impl VramSource for GpuMemory {
    fn process_bytes(&self) -> Option<u64> {
        match self.nvml.as_ref().and_then(|n| n.process_use()) {
            Some(ProcessUse::Ours(bytes)) => Some(bytes),
            Some(ProcessUse::Nobody) => Some(self.pool_bytes().unwrap_or(0)),
            Some(ProcessUse::NotListed) | None => self.pool_bytes(),
        }
    }

    fn device_used_bytes(&self) -> Option<u64> {
        if let Some((used, _)) = self.nvml.as_ref().and_then(|n| n.device_used_and_total()) {
            return Some(used);
        }
        self.free_and_total().map(|(free, total)| total - free)
    }

    fn release_cached(&self) {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            cuda.release_cached();
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    /// The CUDA device the models compute on.
    #[derive(Clone)]
    pub struct CudaMemory {
        device: CudaDevice,
    }

    impl CudaMemory {
        pub fn new(device: CudaDevice) -> CudaMemory {
            CudaMemory { device }
        }

        /// cuMemGetInfo: (free, total) bytes of the device.
        pub fn free_and_total(&self) -> Option<(u64, u64)> {
            let context = self.device.cuda_stream().context().clone();
            let (free, total) = context.mem_get_info().ok()?;
            Some((free as u64, total as u64))
        }

        fn default_pool(&self) -> Option<sys::CUmemoryPool> {
            let context = self.device.cuda_stream().context().clone();
            context.bind_to_thread().ok()?;
            // SAFETY: a valid device of a live context.
            unsafe { result::device::get_default_mem_pool(context.cu_device()).ok() }
        }

        /// Bytes the default memory pool holds from the device (in use or cached).
        pub fn pool_reserved_bytes(&self) -> Option<u64> {
            let pool = self.default_pool()?;
            let mut bytes: u64 = 0;
            // SAFETY: RESERVED_MEM_CURRENT is a cuuint64_t attribute of a valid pool.
            unsafe {
                result::mem_pool::get_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                    (&mut bytes as *mut u64).cast(),
                )
                .ok()?;
            }
            Some(bytes)
        }

        /// Waits for queued work, then hands the pool's unused memory back to the device.
        pub fn release_cached(&self) {
            let stream = self.device.cuda_stream();
            if stream.synchronize().is_err() {
                return;
            }
            if let Some(pool) = self.default_pool() {
                // SAFETY: a valid pool; trimming only frees unused blocks.
                let _ = unsafe { result::mem_pool::trim_to(pool, 0) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_present_nvml_never_fails() {
        // Without a driver there is no source; with one the figures are plausible.
        if let Some(nvml) = NvmlVram::open() {
            let (used, total) = nvml.device_used_and_total().unwrap();
            assert!(total > 0 && used <= total);
            assert!(nvml.process_use().is_some());
        } else {
            assert!(GpuMemory::nvml().is_none());
            assert!(GpuMemory::for_device(&Device::Cpu).is_none());
        }
    }
}
