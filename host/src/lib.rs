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
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    // cgroup v2; `memory.max` is "max" (unparsed, so no limit) when unset.
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .zip(read("/sys/fs/cgroup/memory.current"))
        .map(|(max, used)| max.saturating_sub(used));
    Some(cgroup.map_or(available, |c| c.min(available)))
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
    fn this_machine_reports_some_memory() {
        if cfg!(target_os = "linux") {
            let bytes = available_memory().expect("/proc/meminfo is readable on Linux");
            assert!(bytes > 16 << 20, "{bytes}");
        }
    }
}
