//! Resource readings: process RSS and host memory from /proc.
//! Readings that cannot be taken are `None`, never an error.

/// Resident set size of this process in bytes. Cheap enough to call
/// between compile stages: `/proc/self/statm` stays open and is re-read in
/// place (a few µs, no allocation).
pub fn process_rss_bytes() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    static STATM: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let file = STATM.get_or_init(|| std::fs::File::open("/proc/self/statm").ok()).as_ref()?;
    let mut buf = [0u8; 128];
    let len = file.read_at(&mut buf, 0).ok()?;
    let statm = std::str::from_utf8(&buf[..len]).ok()?;
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

/// A GPU reading from NVML.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuReading {
    /// Utilisation of device 0, percent.
    pub utilisation_percent: f64,
    /// Memory in use on device 0, bytes.
    pub memory_used_bytes: u64,
    /// Memory of device 0, bytes.
    pub memory_total_bytes: u64,
}

/// Reads GPU 0 through NVML, loaded at run time: `None` when there is no
/// driver, no library or no GPU (reported as unavailable, never an error).
pub fn gpu_reading() -> Option<GpuReading> {
    use std::sync::OnceLock;
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    let nvml = NVML.get_or_init(|| nvml_wrapper::Nvml::init().ok()).as_ref()?;
    let device = nvml.device_by_index(0).ok()?;
    let utilisation = device.utilization_rates().ok()?;
    let memory = device.memory_info().ok()?;
    Some(GpuReading {
        utilisation_percent: f64::from(utilisation.gpu),
        memory_used_bytes: memory.used,
        memory_total_bytes: memory.total,
    })
}
