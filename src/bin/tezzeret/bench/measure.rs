//! Measurement helpers shared by `tezzeret bench` and the `cargo bench`
//! targets (which include this file by path).
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use tezzeret::base::device::ComputeDevice;
use tezzeret::base::leyline::MessagePriority;
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::{percentile, Strategy};
use tezzeret::state::wal::journal::Job;
use tezzeret::{Error, Result};

/// Latencies of `n` calls of `f` (after `n / 10` warm-up calls), in µs.
pub fn sample_us(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..n / 10 {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

/// The median of samples.
pub fn p50(samples: &[f64]) -> f64 {
    percentile(samples, 50.0).unwrap_or(f64::NAN)
}

/// Write + fdatasync of `bytes` bytes, `n` times, in µs (space reserved ahead).
pub fn fdatasync_us(dir: &Path, bytes: usize, n: usize) -> Result<Vec<f64>> {
    let path = dir.join("bare.dat");
    let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(|e| Error::io("bench file", e))?;
    tezzeret::sys::fs::fallocate(&file, (bytes * n + 4096) as u64).map_err(|e| Error::io("reserve bench file", e))?;
    file.sync_all().map_err(|e| Error::io("fsync", e))?;
    let buf = vec![0x5au8; bytes];
    Ok((0..n)
        .map(|_| {
            let t = Instant::now();
            let _ = file.write_all(&buf);
            // SAFETY: fdatasync on a descriptor we own.
            unsafe { libc::fdatasync(file.as_raw_fd()) };
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect())
}

/// A job record of typical size for WAL benchmarks.
pub fn sample_job(i: u64) -> Job {
    static CATALOG: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
    let catalog = CATALOG.get_or_init(Catalog::default_catalog);
    let descriptor = catalog.descriptors()[(i % 50) as usize].clone();
    Job {
        seq: 0,
        priority: MessagePriority::Normal,
        blueprint_id: descriptor.blueprint_id.clone(),
        descriptor,
        overrides: Default::default(),
        input_shapes: None,
        strategy: Strategy::Standard,
        device: ComputeDevice::Cpu,
        batch: 8,
        cache_key: format!("{i:064x}"),
    }
}

