//! Scale rows: what a catalog of many blueprints costs — compiling it,
//! opening its warm state directory, guard checks and prefetch answers
//! against its grown guard table, WAL recovery, and the peak memory of a
//! process that opens it — so that the cost of growth is visible.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::measure::{p50, sample_us};
use super::{row, Row};
use tezzeret::base::leyline::KernelPrefetchRequest;
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::Strategy;
use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, Host};
use tezzeret::state::guard_table::TensorMeta;
use tezzeret::state::layout::StateLayout;
use tezzeret::state::wal::journal::Journal;
use tezzeret::{Error, Result};

/// Catalog sizes measured.
pub const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// Cheap blueprints the scaled catalogs cycle through (all take `[B, 32]`).
const CHEAP: [&str; 4] = ["relu_activation", "gelu_activation", "skip_connection", "layer_scaling"];

/// The catalog file of `n` distinct cheap blueprints.
fn catalog_json(n: usize) -> String {
    let entries: Vec<String> =
        (0..n).map(|i| format!(r#"{{"blueprint_id": "S{i:06}", "name": "{}", "tier": "SAFE"}}"#, CHEAP[i % CHEAP.len()])).collect();
    format!("[{}]", entries.join(","))
}

struct Fixed(Catalog);
impl Host for Fixed {
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(Some(self.0.clone()))
    }
}

fn config(state: &Path) -> ForgeConfig {
    let mut config = ForgeConfig::new(state);
    config.device = DevicePreference::Cpu;
    config.strategy = Strategy::Emergency;
    config.telemetry_interval_ms = 0;
    config
}

/// Peak RSS of `tezzeret forge` run on the warm directory (open, every
/// blueprint cached), MiB: the largest of the children so far, so sizes
/// are measured in increasing order.
fn peak_rss_mib(state: &Path, catalog_file: &Path) -> Result<f64> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find the tezzeret binary", e))?;
    let status = Command::new(exe)
        .args(["forge", "--strategy", "emergency", "--device", "cpu", "--json", "--state"])
        .arg(state)
        .arg("--catalog")
        .arg(catalog_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| Error::io("run tezzeret forge", e))?;
    if !status.success() {
        return Err(Error::invalid(format!("bench: the warm forge run failed ({status})")));
    }
    // SAFETY: rusage is plain integers, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage struct into `usage`.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    Ok(usage.ru_maxrss as f64 / 1024.0)
}

/// The rows for every size.
pub fn rows(work: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for n in SIZES {
        let dir = work.join(format!("scale-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("bench dir", e))?;
        let catalog_file = dir.join("catalog.json");
        std::fs::write(&catalog_file, catalog_json(n)).map_err(|e| Error::io("write the bench catalog", e))?;
        let catalog = Catalog::from_json(&catalog_json(n))?;
        let state = dir.join("state");

        let t = Instant::now();
        let mut forge = Forge::open(config(&state), Box::new(Fixed(catalog.clone())))?;
        let failed = forge.run(&mut |_| {}).iter().filter(|r| r.error.is_some()).count();
        if failed > 0 {
            return Err(Error::invalid(format!("bench: {failed} of {n} scale jobs failed")));
        }
        rows.push(row(format!("compile of {n} blueprints (Emergency, durable)"), t.elapsed().as_secs_f64(), None, "s"));
        let slots = forge.guards().slots();
        drop(forge);

        let t = Instant::now();
        let forge = Forge::open(config(&state), Box::new(Fixed(catalog)))?;
        rows.push(row(format!("open of a warm state directory of {n} blueprints"), t.elapsed().as_secs_f64() * 1e3, None, "ms"));

        let (shape, stride) = ([8i64, 32], [32i64, 1]);
        let input = [TensorMeta { dtype: 0, shape: &shape, stride: &stride }];
        let ids: Vec<Vec<u8>> = (0..n).step_by((n / 97).max(1)).map(|i| format!("S{i:06}").into_bytes()).collect();
        let mut k = 0;
        let guards = forge.guards();
        let ns = sample_us(20_000, || {
            k = (k + 1) % ids.len();
            std::hint::black_box(guards.check(&ids[k], &input));
        });
        rows.push(row(format!("guard check p50 with {n} blueprints ({slots} slots)"), p50(&ns) * 1e3, None, "ns"));

        let requests: Vec<KernelPrefetchRequest> = ids
            .iter()
            .map(|id| KernelPrefetchRequest { request_id: "r".into(), blueprint_id: String::from_utf8_lossy(id).into_owned(), ..Default::default() })
            .collect();
        for request in &requests {
            drop(forge.prefetch(request)); // each file verified once
        }
        let mut k = 0;
        let us = sample_us(5_000, || {
            k = (k + 1) % requests.len();
            drop(forge.prefetch(&requests[k]));
        });
        rows.push(row(format!("prefetch p50 with {n} blueprints"), p50(&us), None, "µs"));
        drop(forge);

        let wal = StateLayout::new(&state).wal();
        let t = Instant::now();
        drop(Journal::open(&wal)?);
        rows.push(row(format!("WAL recovery with {n} blueprints"), t.elapsed().as_secs_f64() * 1e3, None, "ms"));
        rows.push(row(format!("peak RSS of a process opening {n} blueprints (all cached)"), peak_rss_mib(&state, &catalog_file)?, None, "MiB"));
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(rows)
}
