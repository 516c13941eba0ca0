//! Validation of a compile: the eager reference (finite, deterministic,
//! sane magnitude), the compiled artifact against it on every pre-warm
//! call, other batch sizes, and the guard spec of the validated inputs.
use std::time::Instant;

use tch::{Device, Tensor};

use super::script::{set_graph_executor_optimize, ScriptModule};
use super::strategy::Strategy;
use super::control::JobLimits;
use crate::base::dtype::Dtype;
use crate::base::error::{panic_message, Error, ErrorCode, FailureReason, Result};
use crate::build::blueprints;
use crate::build::guard_spec::{contiguous_strides, GuardSpec, InputGuard};

/// Relative tolerance of numeric validation.
pub const RTOL: f64 = 1e-4;
/// Absolute tolerance of numeric validation.
pub const ATOL: f64 = 1e-5;
/// Calls made before pre-warm samples are taken.
pub const WARMUP_CALLS: usize = 3;

/// Runs the eager block twice on the inputs: both runs must succeed, be
/// finite, agree with each other, and keep a sane magnitude.
pub(super) fn eager_reference(block: &blueprints::Block, inputs: &[Tensor], limits: &JobLimits) -> Result<Tensor> {
    let reference = tch::no_grad(|| catch_forward(&block.forward, inputs))?;
    limits.check("eager reference")?;
    let again = tch::no_grad(|| catch_forward(&block.forward, inputs))?;
    limits.check("eager determinism check")?;
    check_finite(&reference, "eager reference")?;
    check_finite(&again, "eager reference (second run)")?;
    if reference.size() != again.size() || !again.allclose(&reference, RTOL, ATOL, false) {
        return Err(Error::failure(
            ErrorCode::CompileFailed,
            FailureReason::NondeterministicOutput,
            "two eager runs on the same inputs disagree",
        ));
    }
    check_magnitude(&reference, inputs)?;
    Ok(reference)
}

/// Largest absolute output value accepted (exploding activations).
pub const MAGNITUDE_LIMIT: f64 = 1e6;
/// Smallest output RMS accepted for a non-vanishing input (vanishing activations).
pub const VANISHING_LIMIT: f64 = 1e-6;

fn check_magnitude(output: &Tensor, inputs: &[Tensor]) -> Result<()> {
    let max_abs = output.abs().max().double_value(&[]);
    if max_abs > MAGNITUDE_LIMIT {
        return Err(Error::failure(
            ErrorCode::CompileFailed,
            FailureReason::MagnitudeExceeded,
            format!("output magnitude {max_abs:e} exceeds {MAGNITUDE_LIMIT:e} (exploding activations)"),
        ));
    }
    let rms = |t: &Tensor| t.square().mean(tch::Kind::Double).sqrt().double_value(&[]);
    let input_rms = inputs.iter().map(rms).fold(0.0, f64::max);
    let output_rms = rms(output);
    if input_rms > 1e-3 && output_rms < VANISHING_LIMIT {
        return Err(Error::failure(
            ErrorCode::CompileFailed,
            FailureReason::VanishingOutput,
            format!("output RMS {output_rms:e} below {VANISHING_LIMIT:e} for input RMS {input_rms:.3} (vanishing activations)"),
        ));
    }
    Ok(())
}

/// Whether the compiled module also matches the eager block at two other
/// batch sizes (half and double the guarded one), i.e. is dynamic in dim 0.
pub(super) fn validates_other_batches(
    module: &ScriptModule,
    block: &blueprints::Block,
    inputs: &[Tensor],
    seed: u64,
    limits: &JobLimits,
) -> bool {
    let batch = match inputs.first() {
        Some(first) if !first.size().is_empty() => first.size()[0],
        _ => return false,
    };
    if inputs.iter().any(|t| t.size().first() != Some(&batch)) {
        return false;
    }
    let others = [if batch > 1 { batch / 2 } else { 3 }, batch * 2];
    others.iter().all(|&other| {
        let shapes: Vec<Vec<i64>> = inputs
            .iter()
            .map(|t| {
                let mut s = t.size();
                s[0] = other;
                s
            })
            .collect();
        let probe = blueprints::example_inputs(&shapes, seed ^ other as u64, inputs[0].device());
        let Ok(expected) = catch_forward(&block.forward, &probe) else { return false };
        let Ok(output) = module.forward(&probe) else { return false };
        limits.check("dynamic batch check").is_ok() && validate(&output, &expected).is_ok()
    })
}

/// Warm-up calls, then timed samples; every output is validated.
pub(super) fn prewarm(
    module: &ScriptModule,
    inputs: &[Tensor],
    reference: &Tensor,
    strategy: Strategy,
    limits: &JobLimits,
) -> Result<Vec<f64>> {
    let (warmup, samples) = match strategy {
        Strategy::Emergency => (0, 1),
        Strategy::Fast => (WARMUP_CALLS, 5),
        Strategy::Standard | Strategy::Aggressive => (WARMUP_CALLS, 20),
    };
    if strategy == Strategy::Emergency {
        set_graph_executor_optimize(false)?;
    }
    let result = (|| {
        for _ in 0..warmup {
            validate(&module.forward(inputs)?, reference)?;
            limits.check("pre-warm")?;
        }
        let mut timings = Vec::with_capacity(samples);
        for _ in 0..samples {
            let start = Instant::now();
            let output = module.forward(inputs)?;
            synchronize(&output);
            timings.push(start.elapsed().as_secs_f64() * 1e3);
            validate(&output, reference)?;
            limits.check("pre-warm")?;
        }
        Ok(timings)
    })();
    if strategy == Strategy::Emergency {
        set_graph_executor_optimize(true)?;
    }
    result
}

/// Waits for queued device work so timings are real.
fn synchronize(output: &Tensor) {
    if let Device::Cuda(index) = output.device() {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Runs the eager forward, turning a libtorch panic into an error.
pub(super) fn catch_forward(forward: &blueprints::ForwardFn, inputs: &[Tensor]) -> Result<Tensor> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(inputs))).map_err(|panic| {
        Error::new(ErrorCode::CompileFailed, format!("eager forward failed: {}", panic_message(&*panic)))
    })
}

fn check_finite(output: &Tensor, what: &str) -> Result<()> {
    let finite = output.isfinite().all().int64_value(&[]) != 0;
    if finite {
        Ok(())
    } else {
        Err(Error::failure(ErrorCode::CompileFailed, FailureReason::NonFiniteOutput, format!("{what} contains NaN or infinity")))
    }
}

/// Numeric validation: finite, same shape, and within rtol/atol of the reference.
pub fn validate(output: &Tensor, reference: &Tensor) -> Result<()> {
    check_finite(output, "compiled output")?;
    if output.size() != reference.size() {
        return Err(Error::failure(
            ErrorCode::CompileFailed,
            FailureReason::NumericMismatch,
            format!("output shape {:?} differs from eager {:?}", output.size(), reference.size()),
        ));
    }
    let output = output.to_device(reference.device());
    if !output.allclose(reference, RTOL, ATOL, false) {
        let max_diff = (&output - reference).abs().max().double_value(&[]);
        return Err(Error::failure(
            ErrorCode::CompileFailed,
            FailureReason::NumericMismatch,
            format!("max |compiled - eager| = {max_diff:e} exceeds rtol {RTOL:e}, atol {ATOL:e}"),
        ));
    }
    Ok(())
}

/// The guard spec of the validated inputs.
pub(super) fn guard_spec_of(inputs: &[Tensor]) -> Result<GuardSpec> {
    let guards = inputs
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let shape = t.size();
            let dtype = dtype_of(t.kind())
                .ok_or_else(|| Error::invalid(format!("input {index} has kind {:?}, which no guard describes", t.kind())))?;
            Ok(InputGuard { index, stride: contiguous_strides(&shape), shape, dtype, requires_grad: t.requires_grad() })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GuardSpec(guards))
}

/// The dtype of a libtorch kind, if a guard can describe it.
pub fn dtype_of(kind: tch::Kind) -> Option<Dtype> {
    use tch::Kind::*;
    Some(match kind {
        Float => Dtype::Float32,
        Double => Dtype::Float64,
        Half => Dtype::Float16,
        BFloat16 => Dtype::BFloat16,
        Int => Dtype::Int32,
        Int64 => Dtype::Int64,
        Int16 => Dtype::Int16,
        Int8 => Dtype::Int8,
        Uint8 => Dtype::Uint8,
        Bool => Dtype::Bool,
        _ => return None,
    })
}
