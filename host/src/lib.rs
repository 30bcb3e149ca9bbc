//! What the host machine gives this process, read from Linux's own files:
//! the server checks a model's weights against it before loading, the
//! trainer its memory plan before a run.

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
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
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
    fn this_machine_reports_some_memory() {
        if cfg!(target_os = "linux") {
            let bytes = available_memory().expect("/proc/meminfo is readable on Linux");
            assert!(bytes > 16 << 20, "{bytes}");
        }
    }
}
