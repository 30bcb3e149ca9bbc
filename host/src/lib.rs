//! What the host machine gives this process, read from Linux's own files:
//! the server checks a model's weights against it before loading, the
//! trainer its memory plan before a run, and a run's report names the
//! machine its times were measured on.

use serde::Serialize;

/// The machine a run's times belong to: the project's default run has
/// taken 38.5 minutes on one host and 61 on another without AVX-512 (the
/// gemm crate picks its widest kernels at run time), so a report's seconds
/// are read against this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo's first processor.
    pub cpu: String,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// The vector and matrix extensions the products can use: AVX2, AVX-512, AMX.
    pub simd: Vec<&'static str>,
    /// `MemTotal`, bytes.
    pub memory_bytes: Option<u64>,
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let simd = if self.simd.is_empty() { "no AVX".to_string() } else { self.simd.join(", ") };
        write!(f, "{}, {} CPUs ({simd})", self.cpu, self.cpus)?;
        if let Some(b) = self.memory_bytes {
            write!(f, ", {:.1} GiB", b as f64 / (1u64 << 30) as f64)?;
        }
        Ok(())
    }
}

/// This machine, as far as Linux's files tell; `cpu` is `unknown` where
/// /proc/cpuinfo is unreadable (not Linux).
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (cpu, simd) = cpu_of(&cpuinfo);
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        simd,
        memory_bytes: meminfo_kb(&meminfo, "MemTotal:").map(|kb| kb * 1024),
    }
}

/// The first processor's model name and which of AVX2, AVX-512 and AMX its
/// flags list.
fn cpu_of(cpuinfo: &str) -> (String, Vec<&'static str>) {
    let field = |name: &str| {
        cpuinfo
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let cpu = field("model name").filter(|m| !m.is_empty()).unwrap_or_else(|| "unknown".into());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let simd = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")]
        .into_iter()
        .filter(|(flag, _)| has(flag))
        .map(|(_, name)| name)
        .collect();
    (cpu, simd)
}

/// Bytes the operating system can give this process now: `MemAvailable`,
/// or the cgroup's limit minus its usage when that is lower (a container,
/// where MemAvailable is the whole node's). `None` where /proc/meminfo is
/// unreadable (not Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = mem_available(&meminfo)?;
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = cgroup_available(
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory.current").as_deref(),
        read("/sys/fs/cgroup/memory.stat").as_deref(),
    );
    Some(cgroup.map_or(available, |c| c.min(available)))
}

/// What a cgroup v2 still allows: its limit less its usage, where the page
/// cache the kernel would drop first (`inactive_file`) counts as free, as
/// MemAvailable counts it (reading a model's weights fills that cache just
/// before its size is checked). `None` without a limit (`max`).
fn cgroup_available(max: Option<&str>, current: Option<&str>, stat: Option<&str>) -> Option<u64> {
    let max = max?.trim().parse::<u64>().ok()?;
    let current = current?.trim().parse::<u64>().ok()?;
    let inactive_file = stat
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("inactive_file ")))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current.saturating_sub(inactive_file)))
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    Some(meminfo_kb(meminfo, "MemAvailable:")? * 1024)
}

/// One /proc/meminfo field (`"MemTotal:"`), in kB as the file gives it.
fn meminfo_kb(meminfo: &str, field: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(mem_available(text), Some(12_345_678 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_cgroup_limit_counts_inactive_page_cache_as_free() {
        let stat = "anon 1000\nfile 5000\ninactive_file 3000\nactive_file 2000\n";
        assert_eq!(cgroup_available(Some("10000\n"), Some("6000\n"), Some(stat)), Some(7000));
        assert_eq!(cgroup_available(Some("10000"), Some("6000"), None), Some(4000));
        assert_eq!(cgroup_available(Some("max\n"), Some("6000"), Some(stat)), None);
        assert_eq!(cgroup_available(Some("1000"), Some("6000"), None), Some(0));
    }

    #[test]
    fn the_cpu_and_its_vector_extensions_are_read_from_cpuinfo() {
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx avx2 fma avx512f avx512bw amx_tile amx_bf16\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_of(intel), ("Intel(R) Xeon(R) Processor".into(), vec!["AVX2", "AVX-512", "AMX"]));
        let amd = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma f16c\n";
        assert_eq!(cpu_of(amd), ("AMD EPYC".into(), vec!["AVX2"]));
        assert_eq!(cpu_of(""), ("unknown".into(), vec![]));
        let m = Machine { cpu: "AMD EPYC".into(), cpus: 2, simd: vec!["AVX2"], memory_bytes: Some(24 << 30) };
        assert_eq!(m.to_string(), "AMD EPYC, 2 CPUs (AVX2), 24.0 GiB");
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if cfg!(target_os = "linux") {
            let m = machine();
            assert_ne!(m.cpu, "unknown");
            assert!(m.cpus >= 1 && m.memory_bytes.unwrap() > 16 << 20, "{m}");
            let bytes = available_memory().expect("/proc/meminfo is readable on Linux");
            assert!(bytes > 16 << 20, "{bytes}");
        }
    }
}
