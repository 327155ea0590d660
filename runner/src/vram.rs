//! Device memory through NVML (`libnvidia-ml.so.1`, which the NVIDIA driver
//! and device plugin put in every GPU container), loaded at run time: no build
//! dependency, nothing on machines without a GPU. It reads device-wide used
//! memory (all processes on the visible GPUs), so the probe's VRAM figures do
//! not depend on which library did the allocating.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

use crate::probe::VramSource;

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

type InitFn = unsafe extern "C" fn() -> c_int;
type CountFn = unsafe extern "C" fn(*mut c_uint) -> c_int;
type HandleFn = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type MemoryFn = unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int;
type ShutdownFn = unsafe extern "C" fn() -> c_int;

/// NVML's device memory readings of every visible GPU.
pub struct NvmlVram {
    devices: Vec<usize>,
    memory: MemoryFn,
    shutdown: ShutdownFn,
}

// SAFETY: NVML is thread-safe; the handles are opaque pointers NVML owns.
unsafe impl Send for NvmlVram {}
unsafe impl Sync for NvmlVram {}

unsafe fn symbol(lib: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `lib` is a handle from dlopen; `name` is NUL-terminated.
    let ptr = unsafe { libc::dlsym(lib, name.as_ptr() as *const c_char) };
    (!ptr.is_null()).then_some(ptr)
}

impl NvmlVram {
    /// NVML with at least one device, or None (no driver, no GPU).
    pub fn open() -> Option<NvmlVram> {
        // SAFETY: dlopen/dlsym with valid C strings; the function types match
        // NVML's documented C API (nvml.h); NVML stays loaded for the process.
        unsafe {
            let lib = libc::dlopen(
                c"libnvidia-ml.so.1".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_LOCAL,
            );
            if lib.is_null() {
                return None;
            }
            let init: InitFn = std::mem::transmute(symbol(lib, c"nvmlInit_v2")?);
            let count: CountFn = std::mem::transmute(symbol(lib, c"nvmlDeviceGetCount_v2")?);
            let handle: HandleFn =
                std::mem::transmute(symbol(lib, c"nvmlDeviceGetHandleByIndex_v2")?);
            let memory: MemoryFn = std::mem::transmute(symbol(lib, c"nvmlDeviceGetMemoryInfo")?);
            let shutdown: ShutdownFn = std::mem::transmute(symbol(lib, c"nvmlShutdown")?);
            if init() != 0 {
                return None;
            }
            let mut n: c_uint = 0;
            if count(&mut n) != 0 || n == 0 {
                shutdown();
                return None;
            }
            let mut devices = Vec::new();
            for i in 0..n {
                let mut h: *mut c_void = std::ptr::null_mut();
                if handle(i, &mut h) == 0 && !h.is_null() {
                    devices.push(h as usize);
                }
            }
            if devices.is_empty() {
                shutdown();
                return None;
            }
            Some(NvmlVram {
                devices,
                memory,
                shutdown,
            })
        }
    }

    /// (used, total) bytes over all visible devices.
    pub fn used_and_total(&self) -> Option<(u64, u64)> {
        let mut used = 0;
        let mut total = 0;
        for &d in &self.devices {
            let mut m = NvmlMemory::default();
            // SAFETY: a device handle from nvmlDeviceGetHandleByIndex_v2 and a
            // properly laid out nvmlMemory_t.
            if unsafe { (self.memory)(d as *mut c_void, &mut m) } != 0 {
                return None;
            }
            used += m.used;
            total += m.total;
        }
        Some((used, total))
    }
}

impl VramSource for NvmlVram {
    fn used_bytes(&self) -> Option<u64> {
        self.used_and_total().map(|(used, _)| used)
    }
}

impl Drop for NvmlVram {
    fn drop(&mut self) {
        // SAFETY: balanced with the successful nvmlInit_v2 in open().
        unsafe {
            (self.shutdown)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_present_nvml_never_fails() {
        // Without a driver this is None; with one it reads plausible figures.
        if let Some(nvml) = NvmlVram::open() {
            let (used, total) = nvml.used_and_total().unwrap();
            assert!(total > 0 && used <= total);
        }
    }
}
