//! Forge runtime rows: the forge's own cost per job against the pure
//! compile it wraps, and queue throughput with the cheapest blueprint.
use std::path::Path;
use std::time::Instant;

use super::{row, Row};
use crate::catalog::{Catalog, Descriptor};
use crate::compile::{self, CompileJob, JobLimits, Strategy};
use crate::forge::{DevicePreference, Forge, ForgeConfig, Host};
use crate::leyline::MessagePriority;
use crate::{Error, Result};

/// Rounds of the overhead comparison; pure-first and forge-first alternate.
const ROUNDS: usize = 4;
/// Jobs in the throughput run.
const THROUGHPUT_JOBS: usize = 200;

/// A host that enumerates a fixed catalog and ignores what it is told.
struct FixedCatalog(Catalog);
impl Host for FixedCatalog {
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(Some(self.0.clone()))
    }
}

fn forge_with(state: &Path, catalog: Catalog, max_concurrency: u32) -> Result<Forge> {
    let _ = std::fs::remove_dir_all(state);
    let mut config = ForgeConfig::new(state);
    config.device = DevicePreference::Cpu;
    config.max_concurrency = max_concurrency;
    Forge::open(config, Box::new(FixedCatalog(catalog)))
}

/// The default catalog's compilable blueprints.
fn compilable() -> Vec<Descriptor> {
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

/// One job through the forge: durable submit, then drain (watchdog thread,
/// start record, compile, artifact + manifest fsyncs, commit, guard slot,
/// catalog update); seconds.
fn forge_job_s(forge: &mut Forge, id: &str) -> Result<f64> {
    let t = Instant::now();
    forge.submit(id, MessagePriority::Normal)?;
    let reports = forge.drain(&mut |_| {});
    let elapsed = t.elapsed().as_secs_f64();
    match reports.into_iter().find_map(|r| r.error) {
        Some(error) => Err(error.context(format!("bench job {id}"))),
        None => Ok(elapsed),
    }
}

/// Overhead and throughput rows.
pub fn rows(work: &Path) -> Result<Vec<Row>> {
    let descriptors = compilable();
    let catalog = Catalog::new(descriptors.clone())?;
    let (mut pure, mut forged) = (vec![0.0; descriptors.len()], vec![0.0; descriptors.len()]);
    for round in 0..ROUNDS {
        // A fresh state directory per round: every job compiles.
        let mut forge = forge_with(&work.join(format!("overhead-{round}")), catalog.clone(), 1)?;
        for (i, d) in descriptors.iter().enumerate() {
            if round % 2 == 0 {
                pure[i] += pure_compile_s(d)?;
                forged[i] += forge_job_s(&mut forge, &d.blueprint_id)?;
            } else {
                forged[i] += forge_job_s(&mut forge, &d.blueprint_id)?;
                pure[i] += pure_compile_s(d)?;
            }
        }
    }
    let jobs = (descriptors.len() * ROUNDS) as f64;
    let (pure_total, forge_total): (f64, f64) = (pure.iter().sum(), forged.iter().sum());
    let per_job_ms = (forge_total - pure_total) / jobs * 1e3;
    let mut rows = vec![
        row(
            format!("pure compile + validate + pre-warm per job (no forge; {} blueprints × {ROUNDS})", descriptors.len()),
            pure_total / jobs * 1e3,
            None,
            "ms",
        ),
        row("forge job per job (durable submit → compile → durable artifact, commit, guard, announce)", forge_total / jobs * 1e3, None, "ms"),
        row(
            "forge's own overhead per job, relative to the pure compile",
            (forge_total / pure_total - 1.0) * 100.0,
            Some(format!("goal < 5; {per_job_ms:.2} ms per job")),
            "%",
        ),
    ];

    // Throughput: many distinct jobs of the cheapest blueprint, enqueued in
    // one group commit and run by the queue.
    let cheapest = pure
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| descriptors[i].clone())
        .ok_or_else(|| Error::invalid("no compilable blueprint"))?;
    let copies: Vec<Descriptor> = (0..THROUGHPUT_JOBS)
        .map(|i| Descriptor { blueprint_id: format!("TP{i:04}"), ..cheapest.clone() })
        .collect();
    let copies = Catalog::new(copies)?;
    for concurrency in [1, 2] {
        let state = work.join(format!("throughput-{concurrency}"));
        let mut forge = forge_with(&state, copies.clone(), concurrency)?;
        // Opening enumerates but does not compile; `run` enqueues and drains.
        let t = Instant::now();
        let reports = forge.run(&mut |_| {});
        let elapsed = t.elapsed().as_secs_f64();
        if let Some(error) = reports.iter().find_map(|r| r.error.clone()) {
            return Err(error.context("throughput run"));
        }
        rows.push(row(
            format!("queue throughput, {THROUGHPUT_JOBS} jobs of {} {} (max concurrency {concurrency})", cheapest.blueprint_id, cheapest.name),
            THROUGHPUT_JOBS as f64 / elapsed,
            None,
            "jobs/s",
        ));
    }
    Ok(rows)
}
