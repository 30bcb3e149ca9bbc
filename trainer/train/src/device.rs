//! The one place the training device is chosen: CUDA when the crate is built
//! with the `cuda` feature and a GPU is there (unless `--cpu`), else the CPU.

/// The device training runs on, for callers that pick it with [`select`].
pub use candle_core::Device;

use crate::error::Result;

pub fn select(force_cpu: bool) -> Result<Device> {
    if force_cpu {
        crate::blas::install();
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        if candle_core::utils::cuda_is_available() {
            return Ok(Device::new_cuda(0)?);
        }
        tracing::warn!("built with cuda, but no CUDA device found: training on the CPU");
    }
    crate::blas::install();
    Ok(Device::Cpu)
}

pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!(
            "cpu ({} threads, matrix products: {})",
            candle_core::utils::get_num_threads(),
            crate::blas::install()
        ),
        other => format!("{other:?}"),
    }
}

/// Keeps freed memory in the process instead of returning it to the kernel:
/// a training step allocates and frees gigabytes of activations, and every
/// page the kernel hands out fresh is zeroed by it first. With glibc's
/// defaults every allocation over 32 MB is a fresh mapping and a heap top
/// over the trim threshold is given back after each step; perf on SmolLM2
/// (batch 4 x 512) put 12-15% of a step in the kernel's page clearing even
/// with the largest threshold `mallopt` accepts. So: no mappings for large
/// allocations, and no trimming (the process keeps its peak, which each step
/// reaches again anyway).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters; called
    // before the training allocations, it has no other effect.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1 is "never trim" (the value is read as an unsigned size).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}
