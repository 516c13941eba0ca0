//! Forge runtime rows: the forge's own cost per job against the pure
//! compile it wraps, and queue throughput with the cheapest blueprint.
use std::path::Path;
use std::time::Instant;

use super::measure::p50;
use super::{row, Row};
use tezzeret::base::leyline::MessagePriority;
use tezzeret::build::catalog::{Catalog, Descriptor};
use tezzeret::build::compile::{self, CompileJob, JobLimits, Strategy};
use tezzeret::bus::BusConfig;
use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, Host};
use tezzeret::{Error, Result};

/// Rounds of the job-alone measurement.
const ROUNDS: usize = 3;
/// Rounds of the whole-queue comparison.
const QUEUE_ROUNDS: usize = 6;
/// Jobs in the throughput run.
const THROUGHPUT_JOBS: usize = 200;

/// A host that enumerates a fixed catalog and ignores what it is told.
struct FixedCatalog(Catalog);
impl Host for FixedCatalog {
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(Some(self.0.clone()))
    }
}

/// A forge over a fresh state directory whose host enumerates `catalog`.
fn forge_with(state: &Path, catalog: Catalog, max_concurrency: u32, queue_at_open: bool) -> Result<Forge> {
    forge_on_bus(state, catalog, max_concurrency, queue_at_open, None)
}

/// The same, joined to a bus when one is given.
pub fn forge_on_bus(state: &Path, catalog: Catalog, max_concurrency: u32, queue_at_open: bool, bus: Option<BusConfig>) -> Result<Forge> {
    let _ = std::fs::remove_dir_all(state);
    let mut config = ForgeConfig::new(state);
    config.device = DevicePreference::Cpu;
    config.max_concurrency = max_concurrency;
    config.queue_at_open = queue_at_open;
    config.bus = bus;
    Forge::open(config, Box::new(FixedCatalog(catalog)))
}

/// One drain of the whole catalog queued at open: the forge's own overhead
/// relative to the compiles its worker timed (percent), and per job (ms).
pub fn queue_overhead(state: &Path, catalog: &Catalog, bus: Option<BusConfig>) -> Result<(f64, f64)> {
    let mut forge = forge_on_bus(state, catalog.clone(), 1, true, bus)?;
    let t = Instant::now();
    let reports = forge.drain(&mut |_| {});
    let wall = t.elapsed().as_secs_f64() * 1e3;
    if let Some(error) = reports.iter().find_map(|r| r.error.clone()) {
        return Err(error.context("queue run"));
    }
    if reports.len() != catalog.len() {
        return Err(Error::invalid(format!("queue run: {} jobs ran, {} expected", reports.len(), catalog.len())));
    }
    let worker = worker_ms(&forge);
    Ok(((wall / worker - 1.0) * 100.0, (wall - worker) / catalog.len() as f64))
}

/// The default catalog's compilable blueprints.
pub fn compilable() -> Vec<Descriptor> {
    Catalog::default_catalog().descriptors().iter().filter(|d| !d.is_quarantined()).cloned().collect()
}

/// One job compiled, validated and pre-warmed on the calling thread, as the
/// forge's worker does it, with nothing of the forge around it; seconds.
fn pure_compile_s(descriptor: &Descriptor) -> Result<f64> {
    let mut job = CompileJob::new(descriptor.clone(), Strategy::Standard);
    job.device = tch::Device::Cpu;
    let t = Instant::now();
    compile::compile(&job, &mut JobLimits::new(None))?;
    Ok(t.elapsed().as_secs_f64())
}

/// One job through the forge: durable submit, then drain (worker, start
/// record, compile, artifact + manifest fsyncs, commit, guard slot,
/// catalog update); seconds.
fn forge_job_s(forge: &mut Forge, id: &str) -> Result<f64> {
    let t = Instant::now();
    forge.submit(id, MessagePriority::Normal)?;
    let reports = forge.drain(&mut |_| {});
    let elapsed = t.elapsed().as_secs_f64();
    if reports.len() != 1 {
        return Err(Error::invalid(format!("bench: expected one job for {id}, ran {}", reports.len())));
    }
    match reports.into_iter().find_map(|r| r.error) {
        Some(error) => Err(error.context(format!("bench job {id}"))),
        None => Ok(elapsed),
    }
}

/// Wall time the forge's workers spent on jobs so far, ms.
fn worker_ms(forge: &Forge) -> f64 {
    forge.counters().compile_us_total as f64 / 1e3
}

/// Overhead and throughput rows.
///
/// The forge's own cost is what a job takes through the forge beyond the
/// compile itself (compile, validation, pre-warm), the compile being timed
/// on the worker that ran it: the same compile on both sides of the
/// subtraction, so the noise of libtorch's compile times does not enter.
pub fn rows(work: &Path) -> Result<Vec<Row>> {
    let descriptors = compilable();
    let catalog = Catalog::new(descriptors.clone())?;
    let jobs = descriptors.len() as f64;
    let mut pure = vec![Vec::new(); descriptors.len()];

    // A job alone: submit, drain, nothing else queued — nothing to hide the
    // durable work behind.
    let (mut alone_wall, mut alone_worker) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // A fresh state directory per round: every job compiles.
        let mut forge = forge_with(&work.join(format!("alone-{round}")), catalog.clone(), 1, false)?;
        for (i, d) in descriptors.iter().enumerate() {
            pure[i].push(pure_compile_s(d)? * 1e3);
            let before = worker_ms(&forge);
            alone_wall.push(forge_job_s(&mut forge, &d.blueprint_id)? * 1e3);
            alone_worker.push(worker_ms(&forge) - before);
        }
    }
    let (wall, worker): (f64, f64) = (alone_wall.iter().sum(), alone_worker.iter().sum());
    let per_job: Vec<f64> = alone_wall.iter().zip(&alone_worker).map(|(w, c)| w - c).collect();
    let pure_ms = pure.iter().map(|s| p50(s)).sum::<f64>() / jobs;
    let mut rows = vec![
        row(
            format!("pure compile + validate + pre-warm per job on the calling thread ({} blueprints, median of {ROUNDS})", descriptors.len()),
            pure_ms,
            None,
            "ms",
        ),
        row("the same, timed on the forge's worker (mean)", worker / alone_worker.len() as f64, None, "ms"),
        row(
            "forge's own time per job alone (durable submit, start, artifact + manifest, commit, guard, announce)",
            p50(&per_job),
            Some(format!("p95 {:.2}", compile::percentile(&per_job, 95.0).unwrap_or(f64::NAN))),
            "ms",
        ),
        row("forge's own overhead of a job alone, relative to its compile", (wall / worker - 1.0) * 100.0, None, "%"),
    ];

    // The queue: the catalog queued at open (one group commit) and drained,
    // pipelined: a job's durable work runs while the next one compiles.
    let mut queue_overhead = Vec::new();
    let (mut pure_runs, mut forge_runs, mut opens) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..QUEUE_ROUNDS {
        // Side by side: the same compiles back to back on the calling thread.
        pure_runs.push(descriptors.iter().map(pure_compile_s).sum::<Result<f64>>()? * 1e3);
        let t = Instant::now();
        let mut forge = forge_with(&work.join(format!("queue-{round}")), catalog.clone(), 1, true)?;
        opens.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let reports = forge.drain(&mut |_| {});
        let wall = t.elapsed().as_secs_f64() * 1e3;
        if let Some(error) = reports.iter().find_map(|r| r.error.clone()) {
            return Err(error.context("queue run"));
        }
        let worker = worker_ms(&forge);
        queue_overhead.push(((wall / worker - 1.0) * 100.0, (wall - worker) / jobs));
        forge_runs.push(opens[round] + wall);
    }
    queue_overhead.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (percent, ms) = queue_overhead[queue_overhead.len() / 2];
    rows.push(row(
        format!("forge's own overhead per job in the queue (drain of {} jobs, pipelined; median of {QUEUE_ROUNDS})", descriptors.len()),
        percent,
        Some(format!("goal < 5; {ms:.2} ms per job")),
        "%",
    ));
    rows.push(row(
        format!("opening a forge on a new state directory, queueing the {} jobs (one group commit)", descriptors.len()),
        p50(&opens),
        None,
        "ms",
    ));
    let (pure_s, forge_s) = (p50(&pure_runs), p50(&forge_runs));
    rows.push(row(
        format!("side by side: the {} compiles back to back on the calling thread vs open + drain through the forge (medians)", descriptors.len()),
        forge_s,
        Some(format!("{pure_s:.1} ({:+.1} %)", (forge_s / pure_s - 1.0) * 100.0)),
        "ms",
    ));

    // Throughput: many distinct jobs of the cheapest blueprint, enqueued in
    // one group commit and run by the queue.
    let cheapest = pure
        .iter()
        .map(|s| p50(s))
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| descriptors[i].clone())
        .ok_or_else(|| Error::invalid("no compilable blueprint"))?;
    let copies: Vec<Descriptor> = (0..THROUGHPUT_JOBS)
        .map(|i| Descriptor { blueprint_id: format!("TP{i:04}"), ..cheapest.clone() })
        .collect();
    let copies = Catalog::new(copies)?;
    for concurrency in [1, 2] {
        let state = work.join(format!("throughput-{concurrency}"));
        // Open queues all the jobs (one group commit); `run` runs them.
        let t = Instant::now();
        let mut forge = forge_with(&state, copies.clone(), concurrency, true)?;
        let reports = forge.run(&mut |_| {});
        let elapsed = t.elapsed().as_secs_f64();
        if let Some(error) = reports.iter().find_map(|r| r.error.clone()) {
            return Err(error.context("throughput run"));
        }
        rows.push(row(
            format!("queue throughput, {THROUGHPUT_JOBS} jobs of {} {} (open + run, max concurrency {concurrency})", cheapest.blueprint_id, cheapest.name),
            THROUGHPUT_JOBS as f64 / elapsed,
            None,
            "jobs/s",
        ));
    }
    Ok(rows)
}
