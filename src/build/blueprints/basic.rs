//! Feature blocks over `[B, D]` inputs.
use tch::Tensor;

use super::layers::{BatchNorm, LayerNorm, Linear};
use super::{Block, BuildContext};
use crate::base::error::Result;

/// Feature width of `[B, D]` blocks.
pub const FEATURES: i64 = 32;

fn features(ctx: &BuildContext<'_>) -> Vec<Vec<i64>> {
    vec![vec![ctx.batch, FEATURES]]
}

/// BP001: returns its input unchanged.
pub fn identity_passthrough(ctx: &mut BuildContext<'_>) -> Result<Block> {
    Ok(Block { input_shapes: features(ctx), forward: Box::new(|xs: &[Tensor]| xs[0].shallow_clone()) })
}

/// BP002: a linear projection `D → D` scaled by `scale`.
pub fn linear_projection(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let scale = ctx.params.float("scale", 1.0);
    let fc = Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES);
    Ok(Block { input_shapes: features(ctx), forward: Box::new(move |xs| fc.forward(&xs[0]) * scale) })
}

/// BP003: layer normalisation with `epsilon`.
pub fn layer_norm_basic(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let eps = ctx.params.float("epsilon", 1e-5);
    let norm = LayerNorm::new(&mut ctx.rng, ctx.device, FEATURES, eps);
    Ok(Block { input_shapes: features(ctx), forward: Box::new(move |xs| norm.forward(&xs[0])) })
}

/// BP004: linear layer followed by dropout with probability `dropout`
/// (inference mode: dropout is the identity, as in a deployed kernel).
pub fn dropout_light(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let p = ctx.params.float("dropout", 0.1);
    let fc = Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES);
    Ok(Block { input_shapes: features(ctx), forward: Box::new(move |xs| fc.forward(&xs[0]).dropout(p, false)) })
}

/// BP005: ReLU.
pub fn relu_activation(ctx: &mut BuildContext<'_>) -> Result<Block> {
    Ok(Block { input_shapes: features(ctx), forward: Box::new(|xs| xs[0].relu()) })
}

/// BP006: 1-D batch normalisation (inference mode) with `momentum`.
pub fn batch_norm_1d(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let momentum = ctx.params.float("momentum", 0.9);
    let norm = BatchNorm::new(&mut ctx.rng, ctx.device, FEATURES, momentum);
    Ok(Block { input_shapes: features(ctx), forward: Box::new(move |xs| norm.forward(&xs[0])) })
}

/// BP008: `x + Linear(x)`.
pub fn skip_connection(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let fc = Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES);
    Ok(Block { input_shapes: features(ctx), forward: Box::new(move |xs| &xs[0] + fc.forward(&xs[0])) })
}

/// BP009: `depth` residual units `x + W₂ ReLU(W₁ x)`.
pub fn residual_block(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let depth = ctx.params.int("depth", 2, 1);
    let units: Vec<(Linear, Linear)> = (0..depth)
        .map(|_| {
            (
                Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES),
                Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES),
            )
        })
        .collect();
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            units.iter().fold(xs[0].shallow_clone(), |x, (a, b)| &x + b.forward(&a.forward(&x).relu()))
        }),
    })
}

/// BP010: `branches` parallel projections, concatenated and fused back to D.
pub fn concat_fusion(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let branches = ctx.params.int("branches", 2, 1);
    let width = FEATURES / 2;
    let heads: Vec<Linear> =
        (0..branches).map(|_| Linear::new(&mut ctx.rng, ctx.device, FEATURES, width)).collect();
    let fuse = Linear::new(&mut ctx.rng, ctx.device, width * branches, FEATURES);
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let parts: Vec<Tensor> = heads.iter().map(|h| h.forward(&xs[0]).relu()).collect();
            fuse.forward(&Tensor::cat(&parts, 1))
        }),
    })
}

/// BP011: GELU (exact).
pub fn gelu_activation(ctx: &mut BuildContext<'_>) -> Result<Block> {
    Ok(Block { input_shapes: features(ctx), forward: Box::new(|xs| xs[0].gelu("none")) })
}

/// BP012: per-channel learned scale initialised around `scale` (LayerScale).
pub fn layer_scaling(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let scale = ctx.params.float("scale", 1.0);
    let gamma = (ctx.rng.uniform(&[FEATURES], 0.05) + scale).to_device(ctx.device);
    Ok(Block { input_shapes: features(ctx), forward: Box::new(move |xs| &xs[0] * &gamma) })
}

/// BP014: highway gate `t·H(x) + (1−t)·x` with `t = σ(W_t x + gate_bias)`.
pub fn highway_gate(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let gate_bias = ctx.params.float("gate_bias", 0.0);
    let transform = Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES);
    let gate = Linear::new(&mut ctx.rng, ctx.device, FEATURES, FEATURES);
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let t = (gate.forward(x) + gate_bias).sigmoid();
            let h = transform.forward(x).relu();
            &t * h + (1.0 - &t) * x
        }),
    })
}
