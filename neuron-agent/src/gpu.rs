//! CUDA devices through the driver libraries, opened at run time with
//! `dlopen`, so that the agent builds and runs without CUDA installed.
//!
//! Why not `cudarc`: candle (our engine) enables cudarc with
//! `dynamic-linking` and `cuda-version-from-build-system`; asking for
//! `dynamic-loading` and a fixed CUDA version here would be unified with those
//! features in a `--features cuda` build and cudarc's build script refuses
//! that combination. The handful of calls we need are stable C ABI, so they
//! are declared here and looked up with `dlsym`:
//! - `libcuda.so.1` (driver API): device count, name, total memory, compute
//!   capability, PCI bus id — no context is created, so no GPU memory is used;
//! - `libnvidia-ml.so.1` (NVML, ships with the driver): free/used memory and
//!   utilisation, matched to CUDA devices by PCI bus id.
//!
//! No driver, or no device, is a CPU-only node: every function here answers
//! an empty list rather than an error.

use helexa_protocol::{DeviceHealth, DeviceInfo};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

type CuResult = c_int;
type CuDevice = c_int;
const CU_ATTR_CC_MAJOR: c_int = 75;
const CU_ATTR_CC_MINOR: c_int = 76;

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Default)]
struct NvmlUtilization {
    gpu: c_uint,
    memory: c_uint,
}

struct Cuda {
    device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    device_total_mem: unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    device_get_pci_bus_id: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
}

struct Nvml {
    get_handle_by_pci_bus_id: unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> c_int,
    get_memory_info: unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int,
    get_utilization: unsafe extern "C" fn(*mut c_void, *mut NvmlUtilization) -> c_int,
}

/// Opens a shared library for the life of the process (never closed).
fn open(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is leaked
    // on purpose, so symbols stay valid for the life of the process.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    (!h.is_null()).then_some(h)
}

/// Looks up `name` and transmutes it to the function type `F`.
///
/// # Safety
/// `F` must be the symbol's true C signature.
unsafe fn sym<F: Copy>(lib: *mut c_void, name: &CStr) -> Option<F> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    Some(std::mem::transmute_copy::<*mut c_void, F>(&p))
}

fn cuda() -> Option<&'static Cuda> {
    static CUDA: OnceLock<Option<Cuda>> = OnceLock::new();
    CUDA.get_or_init(|| {
        let lib = open(c"libcuda.so.1").or_else(|| open(c"libcuda.so"))?;
        // SAFETY: signatures as declared in cuda.h (driver API, CUDA >= 3.2
        // for the `_v2` memory call).
        unsafe {
            let init: unsafe extern "C" fn(c_uint) -> CuResult = sym(lib, c"cuInit")?;
            let rc = init(0);
            if rc != 0 {
                tracing::info!(
                    code = rc,
                    "CUDA driver present but cuInit failed; CPU-only node"
                );
                return None;
            }
            Some(Cuda {
                device_get_count: sym(lib, c"cuDeviceGetCount")?,
                device_get: sym(lib, c"cuDeviceGet")?,
                device_get_name: sym(lib, c"cuDeviceGetName")?,
                device_total_mem: sym(lib, c"cuDeviceTotalMem_v2")?,
                device_get_attribute: sym(lib, c"cuDeviceGetAttribute")?,
                device_get_pci_bus_id: sym(lib, c"cuDeviceGetPCIBusId")?,
            })
        }
    })
    .as_ref()
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        let lib = open(c"libnvidia-ml.so.1").or_else(|| open(c"libnvidia-ml.so"))?;
        // SAFETY: signatures as declared in nvml.h.
        unsafe {
            let init: unsafe extern "C" fn() -> c_int = sym(lib, c"nvmlInit_v2")?;
            if init() != 0 {
                return None;
            }
            Some(Nvml {
                get_handle_by_pci_bus_id: sym(lib, c"nvmlDeviceGetHandleByPciBusId_v2")?,
                get_memory_info: sym(lib, c"nvmlDeviceGetMemoryInfo")?,
                get_utilization: sym(lib, c"nvmlDeviceGetUtilizationRates")?,
            })
        }
    })
    .as_ref()
}

/// One CUDA device as the driver reports it.
struct RawDevice {
    index: u32,
    name: String,
    total: u64,
    cc: (i32, i32),
    pci_bus_id: String,
}

fn raw_devices() -> Vec<RawDevice> {
    let Some(cu) = cuda() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // SAFETY: plain driver calls with valid out-pointers and buffer lengths.
    unsafe {
        let mut count: c_int = 0;
        if (cu.device_get_count)(&mut count) != 0 {
            return out;
        }
        for ordinal in 0..count {
            let mut dev: CuDevice = 0;
            if (cu.device_get)(&mut dev, ordinal) != 0 {
                continue;
            }
            let mut name = [0 as c_char; 256];
            let _ = (cu.device_get_name)(name.as_mut_ptr(), name.len() as c_int, dev);
            let mut total: usize = 0;
            let _ = (cu.device_total_mem)(&mut total, dev);
            let (mut major, mut minor) = (0, 0);
            let _ = (cu.device_get_attribute)(&mut major, CU_ATTR_CC_MAJOR, dev);
            let _ = (cu.device_get_attribute)(&mut minor, CU_ATTR_CC_MINOR, dev);
            let mut bus = [0 as c_char; 64];
            let _ = (cu.device_get_pci_bus_id)(bus.as_mut_ptr(), bus.len() as c_int, dev);
            name[255] = 0;
            bus[63] = 0;
            out.push(RawDevice {
                index: ordinal as u32,
                name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                total: total as u64,
                cc: (major, minor),
                pci_bus_id: CStr::from_ptr(bus.as_ptr()).to_string_lossy().into_owned(),
            });
        }
    }
    out
}

/// (free, used, utilisation %) from NVML for a PCI bus id.
fn nvml_usage(pci_bus_id: &str) -> Option<(u64, u64, u32)> {
    let nv = nvml()?;
    let bus = std::ffi::CString::new(pci_bus_id).ok()?;
    // SAFETY: valid C string and out-pointers; the handle is owned by NVML.
    unsafe {
        let mut handle: *mut c_void = std::ptr::null_mut();
        if (nv.get_handle_by_pci_bus_id)(bus.as_ptr(), &mut handle) != 0 {
            return None;
        }
        let mut mem = NvmlMemory::default();
        if (nv.get_memory_info)(handle, &mut mem) != 0 {
            return None;
        }
        let mut util = NvmlUtilization::default();
        let pct = if (nv.get_utilization)(handle, &mut util) == 0 {
            util.gpu
        } else {
            0
        };
        Some((mem.free, mem.used, pct))
    }
}

const MIB: u64 = 1024 * 1024;

/// CUDA devices for `/discovery`. Free memory comes from NVML; without NVML
/// it is reported as the total (nothing else is known without creating a
/// CUDA context, which would itself use device memory).
pub fn devices() -> Vec<DeviceInfo> {
    raw_devices()
        .into_iter()
        .map(|d| {
            let free = nvml_usage(&d.pci_bus_id)
                .map(|(free, _, _)| free)
                .unwrap_or(d.total);
            DeviceInfo {
                index: d.index,
                kind: "cuda".to_string(),
                name: d.name,
                memory_total_mb: d.total / MIB,
                memory_free_mb: free / MIB,
                compute_capability: format!("{}.{}", d.cc.0, d.cc.1),
            }
        })
        .collect()
}

/// Memory and utilisation per CUDA device for `/health`.
pub fn device_health() -> Vec<DeviceHealth> {
    raw_devices()
        .into_iter()
        .map(|d| {
            let (free, used, pct) = nvml_usage(&d.pci_bus_id).unwrap_or((d.total, 0, 0));
            DeviceHealth {
                index: d.index,
                memory_used_mb: used / MIB,
                memory_free_mb: free / MIB,
                utilization_pct: pct,
            }
        })
        .collect()
}
