//! What this machine is: hostname, CPU, memory and CUDA devices.
//!
//! Read from `/proc` and, for GPUs, from the CUDA driver loaded at run time
//! (see `gpu.rs`), so that one build runs on CPU-only and GPU machines alike:
//! no driver simply means a CPU-only node, never an error.

use crate::gpu;
use helexa_protocol::{CpuInfo, DeviceHealth, DeviceInfo, MemoryMb};

/// The machine's hostname (`gethostname`), or `localhost` if it has none.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits, and we cap at the first NUL or the buffer's end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
        if !name.is_empty() {
            return name;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// CPU model from `/proc/cpuinfo` and the number of logical cores.
pub fn cpu() -> CpuInfo {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_cpuinfo(&text)
}

pub(crate) fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut model = String::new();
    let mut processors = 0u32;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        if key == "processor" {
            processors += 1;
        }
        // x86: "model name"; arm64: "Model" or "CPU part"; POWER: "cpu".
        if model.is_empty() && matches!(key, "model name" | "Model" | "cpu" | "Hardware") {
            model = value.trim().to_string();
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(processors.max(1));
    CpuInfo {
        model: if model.is_empty() {
            std::env::consts::ARCH.to_string()
        } else {
            model
        },
        cores: if processors > 0 {
            processors.max(cores)
        } else {
            cores
        },
    }
}

/// Total and available memory from `/proc/meminfo`, MiB.
pub fn memory() -> MemoryMb {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

pub(crate) fn parse_meminfo(text: &str) -> MemoryMb {
    let kib = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    let total = kib("MemTotal").unwrap_or(0);
    let available = kib("MemAvailable")
        .or_else(|| Some(kib("MemFree")? + kib("Cached").unwrap_or(0)))
        .unwrap_or(0);
    MemoryMb {
        total: total / 1024,
        available: available / 1024,
    }
}

/// CUDA devices (empty when there is no driver or no device).
pub fn devices() -> Vec<DeviceInfo> {
    gpu::devices()
}

/// Per-device memory and utilisation for `/health` (empty without NVML).
pub fn device_health() -> Vec<DeviceHealth> {
    gpu::device_health()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_x86() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        let c = parse_cpuinfo(text);
        assert_eq!(c.model, "AMD EPYC 7B13");
        assert!(c.cores >= 2);
    }

    #[test]
    fn meminfo() {
        let text =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12288000 kB\n";
        let m = parse_meminfo(text);
        assert_eq!(m.total, 24000);
        assert_eq!(m.available, 12000);
    }

    #[test]
    fn this_machine() {
        assert!(!hostname().is_empty());
        let c = cpu();
        assert!(c.cores >= 1);
        assert!(!c.model.is_empty());
        assert!(memory().total > 0);
        // No GPU here, or one: either way this must not panic.
        let _ = devices();
    }
}
