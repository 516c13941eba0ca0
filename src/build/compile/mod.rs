//! The compilation pipeline: build the block, trace it
//! to TorchScript, apply the strategy's passes, serialise, then load the
//! serialised artifact back, validate it against the eager reference and
//! pre-warm it.
pub mod control;
pub mod script;
pub mod stats;
pub mod strategy;
pub mod validate;
pub mod workers;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

pub use control::{run_with_budget, JobLimits};
pub use script::{set_graph_executor_optimize, shim_exception_self_test, ScriptModule};
pub use stats::percentile;
pub use strategy::Strategy;
pub use validate::{dtype_of, validate, ATOL, RTOL, WARMUP_CALLS};
pub use workers::{shared_pool, WorkerPool};

use validate::{eager_reference, guard_spec_of, prewarm, validates_other_batches};

use crate::base::device::ComputeDevice;
use crate::base::error::{Error, ErrorCode, FailureReason, Result};
use crate::base::hex;
use crate::base::version::{LIBRARY_VERSION, TORCH_VERSION};
use crate::build::blueprints::{self, ParameterOverrides, ResolvedParams};
use crate::build::catalog::Descriptor;
use crate::build::guard_spec::GuardSpec;

/// A later Aggressive variant must have a p50 below this fraction of the
/// current best to replace it.
pub const AGGRESSIVE_WIN_MARGIN: f64 = 0.9;

/// What to compile and how. Owns its inputs so it can run on a worker
/// thread under a watchdog.
#[derive(Debug, Clone)]
pub struct CompileJob {
    /// The blueprint.
    pub descriptor: Descriptor,
    /// Host-supplied parameter values (validated against the bounds).
    pub overrides: ParameterOverrides,
    /// The strategy.
    pub strategy: Strategy,
    /// Target device (Emergency always compiles for the CPU).
    pub device: Device,
    /// Batch size of the representative inputs.
    pub batch: i64,
    /// Host-chosen input shapes (replacing the blueprint's representative
    /// ones); they must fit the block or the job fails naming them.
    pub input_shapes: Option<Vec<Vec<i64>>>,
}

impl CompileJob {
    /// A job with default settings: CPU, batch 8, no overrides.
    pub fn new(descriptor: Descriptor, strategy: Strategy) -> Self {
        CompileJob {
            descriptor,
            overrides: ParameterOverrides::new(),
            strategy,
            device: Device::Cpu,
            batch: blueprints::DEFAULT_BATCH,
            input_shapes: None,
        }
    }
}

/// A compiled, validated artifact, not yet stored.
#[derive(Debug, Clone)]
pub struct CompiledArtifact {
    /// The TorchScript archive.
    pub bytes: Vec<u8>,
    /// Parameter values compiled with.
    pub params: ResolvedParams,
    /// Input guards.
    pub guard_spec: GuardSpec,
    /// Digest of the guard spec.
    pub guard_digest: String,
    /// Whether the artifact was validated at other batch sizes too and so
    /// accepts any size in dim 0.
    pub dynamic_batch: bool,
    /// Strategy used.
    pub strategy: Strategy,
    /// Which pipeline variant produced the bytes (e.g. `trace+freeze`).
    pub variant: String,
    /// Device the artifact runs on (`cpu`, `cuda:0`).
    pub device: String,
    /// Wall time from start to a serialised artifact, ms.
    pub compile_ms: f64,
    /// Wall time of the whole job (compile, validation, pre-warm), ms.
    pub job_ms: f64,
    /// When the job began and ended on the thread that ran it.
    pub ran: (Instant, Instant),
    /// Pre-warm forward latencies of the stored artifact, ms.
    pub prewarm_samples_ms: Vec<f64>,
    /// Median pre-warm latency, ms.
    pub prewarm_p50_ms: f64,
    /// 95th-percentile pre-warm latency, ms.
    pub prewarm_p95_ms: f64,
    /// Cache key.
    pub cache_key: String,
}

/// The device a strategy compiles for.
pub fn effective_device(strategy: Strategy, device: Device) -> Device {
    if strategy == Strategy::Emergency {
        Device::Cpu
    } else {
        device
    }
}

/// Name of a device as stored in metadata and guards.
pub fn device_name(device: Device) -> String {
    ComputeDevice::from_tch(device).name()
}

/// The content-addressed cache key of a job: sha256 over the
/// descriptor, resolved parameters, strategy, device, torch and library
/// versions and the guard shapes' inputs (batch size and any host shapes,
/// which with the descriptor and parameters determine every guard shape).
pub fn cache_key(job: &CompileJob, params: &ResolvedParams) -> String {
    let mut h = Sha256::new();
    h.update(job.descriptor.content_hash());
    for part in [
        params.canonical_string(),
        job.strategy.name().to_string(),
        device_name(effective_device(job.strategy, job.device)),
        TORCH_VERSION.to_string(),
        LIBRARY_VERSION.to_string(),
        format!("batch={}", job.batch),
        format!("shapes={:?}", job.input_shapes),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize())
}

/// Compiles a job on a new thread under a time budget and a memory
/// budget. An overrun abandons the job (see [`run_with_budget`]).
pub fn compile_within(job: CompileJob, budget: Duration, memory_budget_bytes: Option<u64>) -> Result<CompiledArtifact> {
    compile_under(job, budget, memory_budget_bytes, Execution::default())
}

/// How a forge runs a compile: on which threads, with how many libtorch
/// intra-op threads, and what abandons it early. Owns what it shares, so a
/// compile can be waited for on a thread of its own.
#[derive(Clone, Default)]
pub struct Execution {
    /// Set at shutdown: the job is abandoned at once.
    pub abort: Option<Arc<AtomicBool>>,
    /// Reusable worker threads (None: a new thread per job).
    pub workers: Option<Arc<WorkerPool>>,
    /// libtorch intra-op threads for this job (None: leave as is).
    pub intra_op_threads: Option<i32>,
}

/// As [`compile_within`], run as `execution` says.
pub fn compile_under(
    job: CompileJob,
    budget: Duration,
    memory_budget_bytes: Option<u64>,
    execution: Execution,
) -> Result<CompiledArtifact> {
    let mut limits = JobLimits::new(memory_budget_bytes);
    let cancel = limits.cancel.clone();
    let what = job.descriptor.blueprint_id.clone();
    let threads = execution.intra_op_threads;
    control::run_with_budget_or_abort(&what, budget, cancel, execution.abort.as_deref(), execution.workers.as_deref(), move || {
        if let Some(threads) = threads {
            // Per thread in libtorch (OpenMP, MKL): set where the job runs.
            tch::set_num_threads(threads.max(1));
        }
        compile(&job, &mut limits)
    })
}

/// Compiles, validates and pre-warms one blueprint on the calling thread.
/// `limits` is checked between stages (cancellation, memory growth).
pub fn compile(job: &CompileJob, limits: &mut JobLimits) -> Result<CompiledArtifact> {
    limits.start();
    let descriptor = &job.descriptor;
    let params = ResolvedParams::resolve(descriptor, &job.overrides)?;
    let device = effective_device(job.strategy, job.device);
    let started = Instant::now();

    let block = blueprints::build(descriptor, &params, job.batch, device, limits.cancel.clone())?;
    let shapes = match &job.input_shapes {
        Some(shapes) => check_input_shapes(shapes, &block.input_shapes)?,
        None => block.input_shapes.clone(),
    };
    let seed = blueprints::rng::job_seed(descriptor, &params);
    let inputs = blueprints::example_inputs(&shapes, seed, device);
    let reference = eager_reference(&block, &inputs, limits)?;

    let (bytes, variant) = build_artifact(&descriptor.blueprint_id, &block, &inputs, &reference, job.strategy, device, limits)?;
    limits.check("tracing")?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;

    let loaded = ScriptModule::load(&bytes, device)?;
    let samples = tch::no_grad(|| prewarm(&loaded, &inputs, &reference, job.strategy, limits))?;
    let dynamic_batch = tch::no_grad(|| validates_other_batches(&loaded, &block, &inputs, seed, limits));
    limits.check("pre-warm")?;
    let guard_spec = guard_spec_of(&inputs)?;
    Ok(CompiledArtifact {
        guard_digest: guard_spec.digest(),
        guard_spec,
        dynamic_batch,
        cache_key: cache_key(job, &params),
        params,
        strategy: job.strategy,
        variant,
        device: device_name(device),
        compile_ms,
        job_ms: started.elapsed().as_secs_f64() * 1e3,
        ran: (started, Instant::now()),
        prewarm_p50_ms: percentile(&samples, 50.0).unwrap_or(0.0),
        prewarm_p95_ms: percentile(&samples, 95.0).unwrap_or(0.0),
        prewarm_samples_ms: samples,
        bytes,
    })
}

/// Host shapes must match the block's inputs in number and rank and have
/// positive dimensions; whether they fit the block is shown by running it.
fn check_input_shapes(shapes: &[Vec<i64>], expected: &[Vec<i64>]) -> Result<Vec<Vec<i64>>> {
    if shapes.len() != expected.len() {
        return Err(Error::invalid(format!(
            "input_shapes: the block takes {} input(s) ({expected:?}), {} shape(s) given",
            expected.len(),
            shapes.len()
        )));
    }
    for (i, (shape, want)) in shapes.iter().zip(expected).enumerate() {
        if shape.len() != want.len() || shape.iter().any(|d| *d < 1) {
            return Err(Error::invalid(format!(
                "input_shapes[{i}] = {shape:?}: expected rank {} with positive dimensions (like {want:?})",
                want.len()
            )));
        }
    }
    Ok(shapes.to_vec())
}

/// Traces `block` on `inputs` and applies `strategy`'s passes (Aggressive:
/// the fastest variant that matches `reference`, the eager output).
/// Returns the serialised artifact and the variant's name.
pub fn build_artifact(
    name: &str,
    block: &blueprints::Block,
    inputs: &[Tensor],
    reference: &Tensor,
    strategy: Strategy,
    device: Device,
    limits: &JobLimits,
) -> Result<(Vec<u8>, String)> {
    let _no_grad = tch::no_grad_guard();
    let mut traced = ScriptModule::trace(name, inputs, &*block.forward)?;
    traced.eval()?;
    match strategy {
        Strategy::Emergency => Ok((traced.save_to_vec()?, "trace-unoptimised".into())),
        Strategy::Fast => Ok((traced.save_to_vec()?, "trace".into())),
        Strategy::Standard => Ok((traced.freeze()?.save_to_vec()?, "trace+freeze".into())),
        Strategy::Aggressive => aggressive(&traced, inputs, reference, device, limits),
    }
}

/// Builds the optimisation variants, checks each against the eager
/// reference, times each, and keeps the fastest correct one.
fn aggressive(
    traced: &ScriptModule,
    inputs: &[Tensor],
    reference: &Tensor,
    device: Device,
    limits: &JobLimits,
) -> Result<(Vec<u8>, String)> {
    // The Standard result first: the others must beat it to be chosen.
    let mut candidates: Vec<(&str, Vec<u8>)> =
        vec![("trace+freeze", traced.freeze()?.save_to_vec()?), ("trace", traced.save_to_vec()?)];
    // A pass that cannot handle the graph is simply not a candidate.
    if let Ok(bytes) = traced.optimize_for_inference().and_then(|m| m.save_to_vec()) {
        candidates.push(("trace+optimize_for_inference", bytes));
    }
    let mut best: Option<(f64, &str, Vec<u8>)> = None;
    for (name, bytes) in candidates {
        // A variant whose archive does not load back (e.g. MKLDNN-prepacked
        // convolution weights do not serialise) or does not match is dropped.
        let Ok(module) = ScriptModule::load(&bytes, device) else { continue };
        let Ok(samples) = prewarm(&module, inputs, reference, Strategy::Standard, limits) else { continue };
        let p50 = percentile(&samples, 50.0).unwrap_or(f64::MAX);
        // Candidates are listed simplest first; a later one must be clearly
        // faster (beyond timing noise) to win, so choices are stable.
        if best.as_ref().is_none_or(|(t, _, _)| p50 < *t * AGGRESSIVE_WIN_MARGIN) {
            best = Some((p50, name, bytes));
        }
    }
    let (_, name, bytes) = best.ok_or_else(|| {
        Error::failure(ErrorCode::CompileFailed, FailureReason::NumericMismatch, "no aggressive variant matched the eager reference")
    })?;
    Ok((bytes, name.to_string()))
}

