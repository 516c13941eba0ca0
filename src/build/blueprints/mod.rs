//! Blueprints: a real libtorch module for every descriptor name of the
//! default catalog, shaped by its resolved parameters.
//!
//! A [`Block`] is a forward function over deterministic weights plus the
//! representative input shapes it is compiled and validated at.
// `a = a + b` on purpose: tch's `+=` is an in-place add, which would write
// through shallow clones into the caller's input tensors.
#![allow(clippy::assign_op_pattern)]
mod basic;
mod experimental;
mod hazards;
mod layers;
mod params;
pub(crate) mod rng;
mod sequence;
mod vision;

use tch::{Device, Kind, Tensor};

use crate::build::catalog::Descriptor;
use crate::base::cancel::CancelToken;
use crate::base::error::{Error, ErrorCode, Result};

pub use params::{ParameterOverrides, ResolvedParams};
pub use rng::WeightRng;

/// The forward function of a block. Inputs are in guard-spec order.
pub type ForwardFn = Box<dyn Fn(&[Tensor]) -> Tensor>;

/// A buildable network block: deterministic weights, inputs, forward.
pub struct Block {
    /// Representative input shapes (dim 0 is the batch).
    pub input_shapes: Vec<Vec<i64>>,
    /// The eager forward function (also what gets traced).
    pub forward: ForwardFn,
}

/// Everything a builder needs: resolved parameters, a weight generator
/// seeded from the descriptor and parameters, the batch size and device.
pub struct BuildContext<'a> {
    /// Resolved parameter values.
    pub params: &'a ResolvedParams,
    /// Deterministic weight source.
    pub rng: WeightRng,
    /// Batch size of the representative inputs.
    pub batch: i64,
    /// Device the weights live on.
    pub device: Device,
    /// Set when the job is abandoned; long-running forwards poll it.
    pub cancel: CancelToken,
}

type Builder = fn(&mut BuildContext<'_>) -> Result<Block>;

/// Builders by descriptor name. Names not here cannot be compiled.
const BUILDERS: &[(&str, Builder)] = &[
    ("identity_passthrough", basic::identity_passthrough),
    ("linear_projection", basic::linear_projection),
    ("layer_norm_basic", basic::layer_norm_basic),
    ("dropout_light", basic::dropout_light),
    ("relu_activation", basic::relu_activation),
    ("batch_norm_1d", basic::batch_norm_1d),
    ("pooling_max", vision::pooling_max),
    ("skip_connection", basic::skip_connection),
    ("residual_block", basic::residual_block),
    ("concat_fusion", basic::concat_fusion),
    ("gelu_activation", basic::gelu_activation),
    ("layer_scaling", basic::layer_scaling),
    ("grouped_conv", vision::grouped_conv),
    ("highway_gate", basic::highway_gate),
    ("depthwise_separable", vision::depthwise_separable),
    ("squeeze_excitation", vision::squeeze_excitation),
    ("channel_attention", vision::channel_attention),
    ("spatial_attention", vision::spatial_attention),
    ("cross_attention", sequence::cross_attention),
    ("attention_single_head", sequence::attention_single_head),
    ("feedforward_gated", sequence::feedforward_gated),
    ("multi_head_attention_4", sequence::multi_head_attention),
    ("transformer_block", sequence::transformer_block),
    ("conv_transformer", sequence::conv_transformer),
    ("dynamic_conv", vision::dynamic_conv),
    ("adaptive_pooling", vision::adaptive_pooling),
    ("feature_pyramid", vision::feature_pyramid),
    ("dense_connection", vision::dense_connection),
    ("multi_head_attention_8", sequence::multi_head_attention),
    ("graph_attention", sequence::graph_attention),
    ("temporal_conv", sequence::temporal_conv),
    ("dilated_conv", vision::dilated_conv),
    ("deformable_conv", vision::deformable_conv),
    ("non_local_block", vision::non_local_block),
    ("learned_positional", sequence::learned_positional),
    ("mixture_of_experts_4", experimental::mixture_of_experts),
    ("hierarchical_attention", experimental::hierarchical_attention),
    ("memory_augmented", experimental::memory_augmented),
    ("neural_ode_block", experimental::neural_ode_block),
    ("differentiable_nas", experimental::differentiable_nas),
    ("meta_learning_layer", experimental::meta_learning_layer),
    ("recursive_processing", experimental::recursive_processing),
    ("exploding_gradient", hazards::exploding_gradient),
    ("vanishing_gradient", hazards::vanishing_gradient),
    ("nan_injection", hazards::nan_injection),
    ("infinite_loop", hazards::infinite_loop),
    ("memory_leak", hazards::memory_leak),
    ("deadlock_pattern", hazards::deadlock_pattern),
    ("race_condition", hazards::race_condition),
    ("adversarial_noise", hazards::adversarial_noise),
];

/// Whether a builder exists for a descriptor name.
pub fn is_known(name: &str) -> bool {
    BUILDERS.iter().any(|(n, _)| *n == name)
}

/// Default batch size of representative inputs.
pub const DEFAULT_BATCH: i64 = 8;

/// Builds the block a descriptor names, with the given resolved parameters.
/// Weights are seeded from the descriptor's content hash and the parameters,
/// so the same inputs always give the same block.
pub fn build(
    descriptor: &Descriptor,
    params: &ResolvedParams,
    batch: i64,
    device: Device,
    cancel: CancelToken,
) -> Result<Block> {
    let builder = BUILDERS
        .iter()
        .find(|(n, _)| *n == descriptor.name)
        .map(|(_, b)| *b)
        .ok_or_else(|| {
            Error::new(
                ErrorCode::Unsupported,
                format!("no blueprint builder for name {:?} ({})", descriptor.name, descriptor.blueprint_id),
            )
        })?;
    if batch < 1 {
        return Err(Error::invalid(format!("batch size must be >= 1, got {batch}")));
    }
    let mut ctx = BuildContext { params, rng: WeightRng::for_job(descriptor, params), batch, device, cancel };
    let block = tch::no_grad(|| builder(&mut ctx))?;
    Ok(block)
}

/// Deterministic example inputs for a block's input shapes.
pub fn example_inputs(shapes: &[Vec<i64>], seed: u64, device: Device) -> Vec<Tensor> {
    let mut rng = WeightRng::new(seed ^ 0x5eed_1257_u64);
    shapes.iter().map(|s| rng.uniform(s, 1.0).to_device(device)).collect()
}

/// The element kind of every input and weight.
pub const KIND: Kind = Kind::Float;
