//! Resource readings (SPEC R10): process RSS and host memory from /proc.
//! Readings that cannot be taken are `None`, never an error.

/// Resident set size of this process in bytes.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| resident_pages * page as u64)
}

/// Host memory: (total, available) in bytes, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<(u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn readings_are_plausible() {
        let rss = super::process_rss_bytes().expect("linux has /proc/self/statm");
        assert!(rss > 1 << 20, "rss {rss}");
        let (total, available) = super::host_memory_bytes().unwrap();
        assert!(total >= available && available > 0);
    }
}
