//! `tezzeret bench`: one table, each row measured side by
//! side in one run, with the Python prototype's figures where they exist.
//! Nothing here asserts: the machines are shared and noisy; read ratios.
use std::path::Path;
use std::time::Instant;

use tch::Device;

use tezzeret::base::leyline::KernelPrefetchRequest;
use tezzeret::build::blueprints::{self, ResolvedParams};
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::{self, percentile};
use tezzeret::ffi::{
    tezzeret_guard_check, tezzeret_guard_table, tezzeret_guard_table_close, tezzeret_guard_table_open, tezzeret_status_free,
    tezzeret_tensor_meta, TEZZERET_DTYPE_FLOAT32,
};
use tezzeret::forge::{DefaultHost, DevicePreference, Forge, ForgeConfig};
use tezzeret::state::layout::StateLayout;
use tezzeret::state::wal::journal::{Journal, Record};
use tezzeret::{Error, Result};

mod bus;
mod fleet;
mod host_process;
pub mod measure;
mod redis_server;
mod runtime;
mod scale;
mod seaweed_server;
mod server_process;

use measure::{fdatasync_us, p50, sample_job, sample_us};

/// Runs as one of the fleet rows' host processes when started as one
/// (`None` otherwise): see [`host_process`].
pub fn serve_fleet_host_if_asked() -> Option<Result<()>> {
    host_process::serve_if_asked()
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Our figure.
    pub ours: f64,
    /// The reference measured beside it, or the prototype's figure (text).
    pub reference: Option<String>,
    /// Unit.
    pub unit: String,
}

fn row(name: impl Into<String>, ours: f64, reference: Option<String>, unit: &str) -> Row {
    Row { name: name.into(), ours, reference, unit: unit.into() }
}

/// Runs every section whose name contains `filter` (all when None).
pub fn run(work: &Path, filter: Option<&str>, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let wants = |s: &str| filter.is_none_or(|f| s.contains(f));
    let mut rows = Vec::new();
    let state = work.join("state");
    if wants("compile") || wants("serve") || wants("forward") {
        progress("compile");
        rows.extend(compile_rows(&state)?);
    }
    if wants("serve") {
        progress("serve");
        rows.extend(serve_rows(&state)?);
    }
    if wants("forward") {
        progress("forward");
        rows.extend(forward_rows()?);
    }
    if wants("wal") {
        progress("wal");
        rows.extend(wal_rows(work)?);
    }
    if wants("runtime") {
        progress("runtime");
        rows.extend(runtime::rows(work)?);
    }
    if wants("bus") {
        progress("bus");
        rows.extend(bus::rows(work)?);
    }
    if wants("fleet") {
        progress("fleet");
        rows.extend(fleet::rows(work)?);
    }
    if wants("scale") {
        progress("scale");
        rows.extend(scale::rows(work)?);
    }
    Ok(rows)
}

fn forge_at(state: &Path) -> Result<Forge> {
    let mut config = ForgeConfig::new(state);
    config.device = DevicePreference::Cpu;
    Forge::open(config, Box::new(DefaultHost))
}

fn compile_rows(state: &Path) -> Result<Vec<Row>> {
    let _ = std::fs::remove_dir_all(state);
    let t = Instant::now();
    let mut forge = forge_at(state)?;
    let reports = forge.run(&mut |_| {});
    let cold = t.elapsed().as_secs_f64();
    let compiled = reports.iter().filter(|r| r.record.is_some()).count();
    drop(forge);
    let t = Instant::now();
    let mut forge = forge_at(state)?;
    forge.run(&mut |_| {});
    let warm = t.elapsed().as_secs_f64();
    Ok(vec![
        row(format!("cold compile of the default catalog ({compiled} distinct modules, Standard, durable)"), cold, Some("21.9 (prototype, 2 distinct modules)".into()), "s"),
        row("warm run of the compiled catalog (open + all cached)", warm, Some("4.3 + 1.5 torch import (prototype)".into()), "s"),
    ])
}

fn serve_rows(state: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Warm reopen: open, recover, verify the guard table, answer the first prefetch.
    let t = Instant::now();
    let forge = forge_at(state)?;
    let first = KernelPrefetchRequest { request_id: "r".into(), blueprint_id: "BP016".into(), ..Default::default() };
    let _ = forge.prefetch(&first);
    rows.push(row("warm reopen of the compiled catalog, ready to serve (open + first prefetch)", t.elapsed().as_secs_f64() * 1e3, Some("4300 + 1500 (prototype)".into()), "ms"));

    // Guard checks through the C ABI (what a C host calls).
    let path = std::ffi::CString::new(StateLayout::new(state).guards().display().to_string()).expect("no NUL in a path");
    let mut handle: *mut tezzeret_guard_table = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path and a writable out-parameter.
    let status = unsafe { tezzeret_guard_table_open(path.as_ptr(), &mut handle) };
    if !status.is_null() {
        tezzeret_status_free(status);
        return Err(Error::invalid(format!("bench: guard table {} does not open", path.to_string_lossy())));
    }
    let (shape, stride) = ([8i64, 32, 16, 16], [8192i64, 256, 16, 1]);
    let meta = tezzeret_tensor_meta { dtype: TEZZERET_DTYPE_FLOAT32, rank: 4, shape: shape.as_ptr(), stride: stride.as_ptr() };
    let id = c"BP016";
    // Timed in batches of 100 calls: two clock reads per call would cost as much as the call.
    const BATCH: u32 = 100;
    let ns: Vec<f64> = (0..5_000)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..BATCH {
                // SAFETY: valid handle, id and metadata for the call.
                let r = unsafe { tezzeret_guard_check(handle, id.as_ptr(), &meta, 1, std::ptr::null_mut()) };
                std::hint::black_box(r);
            }
            t.elapsed().as_nanos() as f64 / f64::from(BATCH)
        })
        .collect();
    rows.push(row("guard check p50 (C ABI, lock-free, no allocation; per call, batches of 100)", p50(&ns), Some("goal < 100".into()), "ns"));
    rows.push(row("guard check p99 (per call, batches of 100)", percentile(&ns, 99.0).unwrap_or(f64::NAN), Some("goal < 1000".into()), "ns"));

    // SAFETY: the handle opened above, closed once.
    unsafe { tezzeret_guard_table_close(handle) };

    let request = KernelPrefetchRequest { request_id: "r".into(), blueprint_id: "BP016".into(), ..Default::default() };
    let samples = sample_us(20_000, || drop(forge.prefetch(&request)));
    rows.push(row("prefetch p50 (verified file, one stat)", p50(&samples), Some("309–418 (prototype fetch)".into()), "µs"));

    let loads = sample_us(50, || drop(forge.load_kernel("BP016")));
    rows.push(row("kernel load p50 (read, sha256, deserialize)", p50(&loads) / 1e3, None, "ms"));
    Ok(rows)
}

fn forward_rows() -> Result<Vec<Row>> {
    let catalog = Catalog::default_catalog();
    let mut rows = Vec::new();
    for d in catalog.descriptors().iter().filter(|d| !d.is_quarantined()) {
        let params = ResolvedParams::resolve(d, &Default::default())?;
        let block = blueprints::build(d, &params, blueprints::DEFAULT_BATCH, Device::Cpu, Default::default())?;
        let inputs = blueprints::example_inputs(&block.input_shapes, 1, Device::Cpu);
        let reference = tch::no_grad(|| (block.forward)(&inputs));
        let (bytes, _) = compile::build_artifact(
            &d.blueprint_id,
            &block,
            &inputs,
            &reference,
            compile::Strategy::Standard,
            Device::Cpu,
            &compile::JobLimits::new(None),
        )?;
        let module = compile::ScriptModule::load(&bytes, Device::Cpu)?;
        let eager = tch::no_grad(|| p50(&sample_us(300, || drop((block.forward)(&inputs)))));
        let ours = tch::no_grad(|| p50(&sample_us(300, || drop(module.forward(&inputs)))));
        rows.push(row(format!("forward {} {} (Standard vs tch eager)", d.blueprint_id, d.name), ours, Some(format!("{eager:.1}")), "µs"));
    }
    Ok(rows)
}

fn wal_rows(work: &Path) -> Result<Vec<Row>> {
    let dir = work.join("wal");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("bench dir", e))?;
    let mut rows = Vec::new();
    let mut journal = Journal::open(&dir.join("commit.log"))?;
    journal.set_checkpoint_every(u64::MAX);
    let record = serde_json::to_vec(&Record::Enqueue { job: sample_job(0) }).expect("serialises").len();
    let bytes = 3 * 256 + record + 32;
    let mut i = 0;
    let ours = sample_us(300, || {
        i += 1;
        let _ = journal.submit(vec![sample_job(i)]);
    });
    let bare = fdatasync_us(&dir, bytes, 330)?;
    rows.push(row(format!("durable submit (WAL commit, {bytes} B) vs write+fdatasync of as many bytes"), p50(&ours), Some(format!("{:.1}", p50(&bare))), "µs"));
    rows.push(row("durable submit vs prototype JSON rewrite per job (no fsync)", p50(&ours), Some("182–227 (prototype)".into()), "µs"));
    let t = Instant::now();
    journal.submit((0..1000).map(sample_job).collect())?;
    rows.push(row("1000 submits, group commit (one sync)", t.elapsed().as_secs_f64() * 1e3, None, "ms"));
    drop(journal);
    for n in [1_000u64, 10_000, 50_000] {
        let path = dir.join(format!("recover-{n}.log"));
        {
            let mut journal = Journal::open(&path)?;
            journal.set_checkpoint_every(u64::MAX);
            for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
                journal.submit(chunk.iter().map(|i| sample_job(*i)).collect())?;
            }
        }
        let times: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                let _ = Journal::open(&path);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let reference = if n == 10_000 { Some("goal < 50; design ceiling 12000".into()) } else { None };
        rows.push(row(format!("recovery of a WAL of {n} transactions"), p50(&times), reference, "ms"));
    }
    Ok(rows)
}
