//! Where a model runs and in which float type: the one place that turns the
//! user's device choice (`auto`, `cpu`, `cuda[:N]`) into a candle device, with
//! one clear error when a GPU was asked for and cannot be used (never a silent
//! CPU run), and picks the compute dtype for that device.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// Above this many bytes of weights a CPU load computes in bf16 too: a
/// released 3B/7B model then fits in memory as it does on a GPU.
const CPU_F32_MAX_WEIGHT_BYTES: u64 = 2 << 30;

/// The CUDA version the CUDA build's kernels are compiled for (scripts/build-cuda.sh
/// pins the 13.0 toolkit): an older driver cannot load their PTX.
pub const CUDA_BUILD_VERSION: i32 = 13000;

/// The device a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when the build has CUDA and a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device N (0 for `cuda`); an error when it cannot be used.
    Cuda(usize),
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected auto, cpu, cuda or cuda:N")]
    Unknown(String),
    #[error(
        "a GPU was asked for but this kubewan-runner was built without CUDA (no `cuda` feature): \
         run the CUDA build (scripts/build-cuda.sh, the -cuda image), or ask for the CPU on \
         purpose (spec.runner.device: cpu, --device cpu)"
    )]
    NotBuilt,
    #[error(
        "a GPU was asked for but no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible}): \
         check that the pod got a GPU (its resource limit and the NVIDIA device plugin)"
    )]
    NoDevice { visible: String },
    #[error("CUDA device {ordinal} was asked for but only {count} are visible")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error(
        "the NVIDIA driver is too old: it supports CUDA {}.{}, this runner is built for CUDA {}.{} \
         (driver 580 or newer)",
        driver / 1000, driver % 1000 / 10, CUDA_BUILD_VERSION / 1000, CUDA_BUILD_VERSION % 1000 / 10
    )]
    DriverTooOld { driver: i32 },
    #[error("cannot use CUDA device {ordinal}: {reason}")]
    Cuda { ordinal: usize, reason: String },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(other.to_owned())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The candle device, or why the asked-for GPU cannot be used.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => cuda::open(ordinal),
            Self::Auto => match cuda::visible_count() {
                Some(n) if n > 0 => cuda::open(0),
                _ => Ok(Device::Cpu),
            },
        }
    }
}

/// A short name of a resolved device for reports and logs: `cpu`, `cuda:0`.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    use super::{CUDA_BUILD_VERSION, DeviceError};

    fn visible() -> String {
        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into())
    }

    /// Visible CUDA devices; None when the driver does not initialise.
    pub fn visible_count() -> Option<usize> {
        result::init().ok()?;
        result::device::get_count().ok().map(|n| n.max(0) as usize)
    }

    pub fn open(ordinal: usize) -> Result<Device, DeviceError> {
        let cuda_error = |e: result::DriverError| DeviceError::Cuda {
            ordinal,
            reason: e.to_string(),
        };
        match result::init() {
            Ok(()) => {}
            Err(result::DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
                return Err(DeviceError::NoDevice { visible: visible() });
            }
            Err(e) => return Err(cuda_error(e)),
        }
        let mut driver = 0;
        // SAFETY: cuDriverGetVersion writes one int; the driver is initialised.
        let status = unsafe { sys::cuDriverGetVersion(&mut driver) };
        if status == sys::CUresult::CUDA_SUCCESS && driver < CUDA_BUILD_VERSION {
            return Err(DeviceError::DriverTooOld { driver });
        }
        let count = result::device::get_count().map_err(cuda_error)?.max(0) as usize;
        if count == 0 {
            return Err(DeviceError::NoDevice { visible: visible() });
        }
        if ordinal >= count {
            return Err(DeviceError::NoSuchDevice { ordinal, count });
        }
        Device::new_cuda(ordinal).map_err(|e| DeviceError::Cuda {
            ordinal,
            reason: e.to_string(),
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    use super::DeviceError;

    pub fn visible_count() -> Option<usize> {
        None
    }

    pub fn open(_ordinal: usize) -> Result<Device, DeviceError> {
        Err(DeviceError::NotBuilt)
    }
}

/// The dtype to compute in on `device` for weights of `weight_bytes`: bf16
/// on a GPU (the released weights' dtype); on a CPU f32 for small (tiny,
/// test) checkpoints, whose results then match the f32 references, and bf16
/// for real ones.
pub fn compute_dtype(device: &Device, weight_bytes: u64) -> DType {
    if device.is_cuda() || weight_bytes > CPU_F32_MAX_WEIGHT_BYTES {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_keeps_f32_for_small_checkpoints_only() {
        assert_eq!(compute_dtype(&Device::Cpu, 10 << 20), DType::F32);
        assert_eq!(compute_dtype(&Device::Cpu, 7 << 30), DType::BF16);
    }

    #[test]
    fn device_choices_parse_and_print() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice);
        }
        assert_eq!(DeviceChoice::Cuda(0).to_string(), "cuda:0");
        let err = "gpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("\"gpu\"") && err.contains("cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_cpu_build_refuses_a_gpu_and_auto_is_the_cpu() {
        let err = DeviceChoice::Cuda(0).resolve().unwrap_err();
        assert!(matches!(err, DeviceError::NotBuilt));
        assert!(err.to_string().contains("built without CUDA"), "{err}");
        assert!(DeviceChoice::Auto.resolve().unwrap().is_cpu());
        assert_eq!(device_label(&DeviceChoice::Cpu.resolve().unwrap()), "cpu");
    }

    #[test]
    fn an_old_driver_is_named_with_both_versions() {
        let text = DeviceError::DriverTooOld { driver: 12040 }.to_string();
        assert!(
            text.contains("CUDA 12.4") && text.contains("CUDA 13.0"),
            "{text}"
        );
    }
}
