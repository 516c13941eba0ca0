//! Deterministic weights: a splitmix64 stream seeded from the job, so weights
//! never depend on libtorch's global generator or on thread scheduling.
use sha2::{Digest, Sha256};
use tch::Tensor;

use super::params::ResolvedParams;
use crate::build::catalog::Descriptor;

/// A deterministic source of weight tensors.
pub struct WeightRng {
    state: u64,
}

impl WeightRng {
    /// A stream starting at `seed`.
    pub fn new(seed: u64) -> Self {
        WeightRng { state: seed }
    }

    /// The stream for a job: seeded from sha256(descriptor hash, parameters).
    pub fn for_job(descriptor: &Descriptor, params: &ResolvedParams) -> Self {
        Self::new(job_seed(descriptor, params))
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A float32 CPU tensor of `shape`, uniform in [-bound, bound].
    pub fn uniform(&mut self, shape: &[i64], bound: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((unit * 2.0 - 1.0) * bound) as f32
            })
            .collect();
        Tensor::from_slice(&values).reshape(shape)
    }

    /// Kaiming-uniform-like weights for a layer with `fan_in` inputs.
    pub fn weight(&mut self, shape: &[i64], fan_in: i64) -> Tensor {
        self.uniform(shape, 1.0 / (fan_in.max(1) as f64).sqrt())
    }
}

/// The seed of a job's weights and example inputs.
pub fn job_seed(descriptor: &Descriptor, params: &ResolvedParams) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(descriptor.content_hash());
    hasher.update(params.canonical_string().as_bytes());
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}
