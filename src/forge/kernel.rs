//! Kernels: stored artifacts loaded for running in-process, for hosts
//! without a libtorch of their own.
use std::sync::Mutex;

use tch::{Device, Tensor};

use crate::base::device::ComputeDevice;
use crate::base::error::{Error, Result};
use crate::build::compile::{dtype_of, ScriptModule};
use crate::build::guard_spec::GuardSpec;
use crate::state::artifact::ArtifactRecord;
use crate::state::signing::KeyRing;
use crate::state::store::ArtifactStore;

/// A loaded artifact, checked against its guards on every run. May be used
/// from several threads (runs are serialised per kernel).
pub struct Kernel {
    module: Mutex<ScriptModule>,
    record: ArtifactRecord,
    device: Device,
}

impl Kernel {
    /// Loads a stored artifact: its file is hashed and must match the
    /// record, and its signature must verify (with trusted keys configured).
    pub fn load(store: &ArtifactStore, record: &ArtifactRecord, keys: &KeyRing) -> Result<Kernel> {
        keys.verify(record)?;
        let bytes = store.read_verified(record)?;
        let device = ComputeDevice::parse(&record.device)?.to_tch();
        let mut module = ScriptModule::load(&bytes, device)?;
        module.eval()?;
        Ok(Kernel { module: Mutex::new(module), record: record.clone(), device })
    }

    /// The artifact's record.
    pub fn record(&self) -> &ArtifactRecord {
        &self.record
    }

    /// The guards inputs must satisfy.
    pub fn guard_spec(&self) -> &GuardSpec {
        &self.record.guard_spec
    }

    /// The device the kernel runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Checks inputs against the guards, naming the first mismatch (which
    /// input, which dimension). The rule is the guard table's: with a
    /// dynamic batch, dim 0 may take any size of at least 1, the same for
    /// every input; an empty batch is refused.
    pub fn check(&self, inputs: &[Tensor]) -> Result<()> {
        let guards = self.record.guard_spec.inputs();
        let id = &self.record.blueprint_id;
        let mismatch = |what: String| Err(Error::invalid(format!("guard mismatch for {id}: {what}")));
        if inputs.len() != guards.len() {
            return mismatch(format!("{} inputs given, the kernel takes {}", inputs.len(), guards.len()));
        }
        let batch = inputs.first().and_then(|t| t.size().first().copied());
        for (i, (t, g)) in inputs.iter().zip(guards).enumerate() {
            match dtype_of(t.kind()) {
                Some(dtype) if dtype == g.dtype => {}
                Some(dtype) => return mismatch(format!("input {i} has dtype {dtype}, expected {}", g.dtype)),
                None => return mismatch(format!("input {i} has kind {:?}, expected {}", t.kind(), g.dtype)),
            }
            if t.device() != self.device {
                return mismatch(format!("input {i} is on {:?}, the kernel runs on {:?}", t.device(), self.device));
            }
            let (shape, stride) = (t.size(), t.stride());
            if shape.len() != g.shape.len() {
                return mismatch(format!("input {i} has rank {}, expected {}", shape.len(), g.shape.len()));
            }
            for d in 0..shape.len() {
                let free = self.record.dynamic_batch && d == 0 && shape[0] >= 1 && Some(shape[0]) == batch;
                if shape[d] != g.shape[d] && !free {
                    return mismatch(format!("input {i} dimension {d} is {}, expected {}", shape[d], g.shape[d]));
                }
            }
            for d in 0..shape.len() {
                if stride[d] != g.stride[d] && shape[d] != 1 {
                    return mismatch(format!("input {i} dimension {d} has stride {}, expected {}", stride[d], g.stride[d]));
                }
            }
        }
        Ok(())
    }

    /// Runs the kernel after checking the inputs against its guards.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Tensor> {
        self.check(inputs)?;
        let module = self.module.lock().unwrap_or_else(|p| p.into_inner());
        tch::no_grad(|| module.forward(inputs))
    }
}
