//! EXPERIMENTAL-tier blocks (BP036–BP042).
use tch::{Kind, Tensor};

use super::layers::{Attention, FeedForward, Linear};
use super::{Block, BuildContext};
use crate::base::error::Result;

const TOKENS: i64 = 16;
const WIDTH: i64 = 32;

fn sequence(ctx: &BuildContext<'_>) -> Vec<Vec<i64>> {
    vec![vec![ctx.batch, TOKENS, WIDTH]]
}

fn features(ctx: &BuildContext<'_>) -> Vec<Vec<i64>> {
    vec![vec![ctx.batch, WIDTH]]
}

/// BP036: top-1 mixture of `experts` feed-forward experts over tokens with
/// capacity factor `capacity`: each expert takes at most
/// ⌈capacity·N/E⌉ tokens in order; overflow tokens pass through unchanged.
pub fn mixture_of_experts(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let experts = ctx.params.int("experts", 4, 1);
    let capacity_factor = ctx.params.float("capacity", 1.25);
    let tokens = ctx.batch * TOKENS;
    let capacity = ((capacity_factor * tokens as f64) / experts as f64).ceil() as i64;
    let router = Linear::new(&mut ctx.rng, ctx.device, WIDTH, experts);
    let ffns: Vec<FeedForward> =
        (0..experts).map(|_| FeedForward::new(&mut ctx.rng, ctx.device, WIDTH, 2 * WIDTH)).collect();
    Ok(Block {
        input_shapes: sequence(ctx),
        forward: Box::new(move |xs| {
            let x = xs[0].reshape([-1, WIDTH]); // [N, D]
            let gates = router.forward(&x).softmax(-1, Kind::Float); // [N, E]
            let choice = gates.argmax(-1, false).one_hot(experts).to_kind(Kind::Float); // [N, E]
            let position = choice.cumsum(0, Kind::Float) * &choice; // 1-based slot per expert
            let kept = position.le(capacity as f64).to_kind(Kind::Float) * &choice;
            let weight = (&gates * &kept).sum_dim_intlist([1i64].as_slice(), true, Kind::Float); // [N, 1]
            let mut mixed = x.zeros_like();
            for (e, ffn) in ffns.iter().enumerate() {
                mixed = mixed + ffn.forward(&x) * kept.narrow(1, e as i64, 1);
            }
            // Tokens no expert took (over capacity) have mixed = 0: they pass through.
            (&x + mixed * weight).view([-1, TOKENS, WIDTH])
        }),
    })
}

/// BP037: attention at `levels` scales: tokens attend at full resolution,
/// then over 2×, 4×, … average-pooled segments; coarse results are
/// upsampled and summed.
pub fn hierarchical_attention(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let levels = ctx.params.int("levels", 2, 1).min(4);
    let stages: Vec<Attention> = (0..levels).map(|_| Attention::new(&mut ctx.rng, ctx.device, WIDTH, 4)).collect();
    Ok(Block {
        input_shapes: sequence(ctx),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let mut out = x.shallow_clone();
            for (level, attention) in stages.iter().enumerate() {
                let factor = 1i64 << level;
                let pooled = if factor == 1 {
                    x.shallow_clone()
                } else {
                    x.transpose(1, 2).avg_pool1d([factor], [factor], [0], false, true).transpose(1, 2)
                };
                let attended = attention.forward(&pooled, &pooled);
                let restored =
                    if factor == 1 { attended } else { attended.repeat_interleave_self_int(factor, 1, None) };
                out = out + restored;
            }
            out
        }),
    })
}

/// BP038: reads from a learned memory of `memory_slots` slots by attention
/// and mixes the read back through a sigmoid gate.
pub fn memory_augmented(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let slots = ctx.params.int("memory_slots", 64, 1);
    let memory = ctx.rng.uniform(&[1, slots, WIDTH], 1.0).to_device(ctx.device);
    let read = Attention::new(&mut ctx.rng, ctx.device, WIDTH, 4);
    let gate = Linear::new(&mut ctx.rng, ctx.device, 2 * WIDTH, WIDTH);
    Ok(Block {
        input_shapes: sequence(ctx),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let recalled = read.forward(x, &memory); // one memory bank, broadcast over the batch
            let g = gate.forward(&Tensor::cat(&[x, &recalled], -1)).sigmoid();
            x + g * recalled
        }),
    })
}

/// BP039: neural ODE `dx/dt = tanh(W x + b)` integrated over t∈[0,1] with
/// `steps` classic Runge–Kutta (RK4) steps.
pub fn neural_ode_block(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let steps = ctx.params.int("steps", 4, 1);
    let field = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    let dt = 1.0 / steps as f64;
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let f = |x: &Tensor| field.forward(x).tanh();
            (0..steps).fold(xs[0].shallow_clone(), |x, _| {
                let k1 = f(&x);
                let k2 = f(&(&x + &k1 * (dt / 2.0)));
                let k3 = f(&(&x + &k2 * (dt / 2.0)));
                let k4 = f(&(&x + &k3 * dt));
                &x + (k1 + k2 * 2.0 + k3 * 2.0 + k4) * (dt / 6.0)
            })
        }),
    })
}

/// BP040: DARTS-style mixed operation: candidate ops (identity, linear,
/// ReLU-linear, GELU-linear) weighted by softmax(α / `temperature`).
pub fn differentiable_nas(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let temperature = ctx.params.float("temperature", 1.0);
    let alpha = ctx.rng.uniform(&[4], 1.0);
    let weights: Vec<f64> = Vec::<f64>::try_from(&(alpha / temperature).softmax(0, Kind::Double))?;
    let candidates: Vec<Linear> = (0..3).map(|_| Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH)).collect();
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            x * weights[0]
                + candidates[0].forward(x) * weights[1]
                + candidates[1].forward(&x.relu()) * weights[2]
                + candidates[2].forward(&x.gelu("none")) * weights[3]
        }),
    })
}

/// BP041: MAML-style fast adaptation: `adapt_steps` gradient steps on a
/// self-reconstruction loss ‖xW − x‖² (analytic gradient 2xᵀ(xW − x)/n),
/// then the adapted layer is applied.
pub fn meta_learning_layer(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let steps = ctx.params.int("adapt_steps", 2, 0);
    let initial = ctx.rng.weight(&[WIDTH, WIDTH], WIDTH).to_device(ctx.device);
    let head = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    let lr = 0.05;
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let n = x.size()[0] as f64;
            let adapted = (0..steps).fold(initial.shallow_clone(), |w, _| {
                let residual = x.matmul(&w) - x;
                let grad = x.transpose(0, 1).matmul(&residual) * (2.0 / n);
                w - grad * lr
            });
            head.forward(&x.matmul(&adapted).relu())
        }),
    })
}

/// BP042: one shared cell applied `depth` times: `h ← tanh(W h + U x)`.
pub fn recursive_processing(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let depth = ctx.params.int("depth", 3, 1);
    let recurrent = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    let input = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let injected = input.forward(&xs[0]);
            (0..depth).fold(xs[0].shallow_clone(), |h, _| (recurrent.forward(&h) + &injected).tanh())
        }),
    })
}
