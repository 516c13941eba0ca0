//! Sequence and graph blocks over `[B, T, D]` (or `[B, C, T]`) inputs.
use tch::{Kind, Tensor};

use super::layers::{Attention, Conv1d, FeedForward, LayerNorm, Linear};
use super::{Block, BuildContext};
use crate::base::error::Result;

/// Default sequence length.
const TOKENS: i64 = 12;
/// Default model width.
const WIDTH: i64 = 32;
/// Width per attention head where the width follows the head count.
const HEAD_DIM: i64 = 8;

fn sequence(ctx: &BuildContext<'_>, tokens: i64, width: i64) -> Vec<Vec<i64>> {
    vec![vec![ctx.batch, tokens, width]]
}

/// BP019: queries `[B, 12, D]` attend over a context `[B, 20, D]` with
/// `heads` heads (D = 8·heads), residual on the queries.
pub fn cross_attention(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let heads = ctx.params.int("heads", 2, 1);
    let width = heads * HEAD_DIM;
    let attention = Attention::new(&mut ctx.rng, ctx.device, width, heads);
    Ok(Block {
        input_shapes: vec![vec![ctx.batch, TOKENS, width], vec![ctx.batch, 20, width]],
        forward: Box::new(move |xs| &xs[0] + attention.forward(&xs[0], &xs[1])),
    })
}

/// BP020: single-head self-attention over `sequence_length` tokens.
pub fn attention_single_head(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let tokens = ctx.params.int("sequence_length", 64, 1);
    let attention = Attention::new(&mut ctx.rng, ctx.device, WIDTH, 1);
    Ok(Block {
        input_shapes: sequence(ctx, tokens, WIDTH),
        forward: Box::new(move |xs| attention.forward(&xs[0], &xs[0])),
    })
}

/// BP021: gated feed-forward (SwiGLU) with hidden width `hidden_multiple`·D.
pub fn feedforward_gated(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let hidden = ctx.params.int("hidden_multiple", 4, 1) * WIDTH;
    let gate = Linear::new(&mut ctx.rng, ctx.device, WIDTH, hidden);
    let up = Linear::new(&mut ctx.rng, ctx.device, WIDTH, hidden);
    let down = Linear::new(&mut ctx.rng, ctx.device, hidden, WIDTH);
    Ok(Block {
        input_shapes: sequence(ctx, TOKENS, WIDTH),
        forward: Box::new(move |xs| down.forward(&(gate.forward(&xs[0]).silu() * up.forward(&xs[0])))),
    })
}

/// BP022 / BP029: multi-head self-attention with `heads` heads (D = 8·heads).
pub fn multi_head_attention(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let heads = ctx.params.int("heads", 4, 1);
    let width = heads * HEAD_DIM;
    let attention = Attention::new(&mut ctx.rng, ctx.device, width, heads);
    Ok(Block {
        input_shapes: sequence(ctx, TOKENS, width),
        forward: Box::new(move |xs| attention.forward(&xs[0], &xs[0])),
    })
}

/// One pre-norm transformer encoder layer.
struct EncoderLayer {
    norm1: LayerNorm,
    attention: Attention,
    norm2: LayerNorm,
    ffn: FeedForward,
}

impl EncoderLayer {
    fn new(ctx: &mut BuildContext<'_>, width: i64, heads: i64) -> Self {
        EncoderLayer {
            norm1: LayerNorm::new(&mut ctx.rng, ctx.device, width, 1e-5),
            attention: Attention::new(&mut ctx.rng, ctx.device, width, heads),
            norm2: LayerNorm::new(&mut ctx.rng, ctx.device, width, 1e-5),
            ffn: FeedForward::new(&mut ctx.rng, ctx.device, width, 2 * width),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let normed = self.norm1.forward(x);
        let x = x + self.attention.forward(&normed, &normed);
        &x + self.ffn.forward(&self.norm2.forward(&x))
    }
}

/// BP023: `layers` stacked pre-norm transformer encoder layers (4 heads).
pub fn transformer_block(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let layers = ctx.params.int("layers", 2, 1);
    let stack: Vec<EncoderLayer> = (0..layers).map(|_| EncoderLayer::new(ctx, WIDTH, 4)).collect();
    Ok(Block {
        input_shapes: sequence(ctx, TOKENS, WIDTH),
        forward: Box::new(move |xs| stack.iter().fold(xs[0].shallow_clone(), |x, layer| layer.forward(&x))),
    })
}

/// BP024: depthwise temporal convolution of width `kernel` (local mixing)
/// followed by a transformer encoder layer (global mixing).
pub fn conv_transformer(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let kernel = ctx.params.int("kernel", 3, 1);
    let conv = Conv1d::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH, kernel, 1, WIDTH, false);
    let layer = EncoderLayer::new(ctx, WIDTH, 4);
    let tokens = 16;
    Ok(Block {
        input_shapes: sequence(ctx, tokens, WIDTH),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let local = conv.forward(&x.transpose(1, 2)).narrow(2, 0, tokens).transpose(1, 2).gelu("none");
            layer.forward(&(x + local))
        }),
    })
}

/// BP030: graph attention (GAT) over `hops` rounds on node features
/// `[B, 16, D]` and a dense adjacency `[B, 16, 16]` (edge where > 0; every
/// node attends to itself).
pub fn graph_attention(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let hops = ctx.params.int("hops", 2, 1);
    let nodes = 16;
    let rounds: Vec<(Linear, Tensor, Tensor)> = (0..hops)
        .map(|_| {
            (
                Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH),
                ctx.rng.weight(&[WIDTH, 1], WIDTH).to_device(ctx.device),
                ctx.rng.weight(&[WIDTH, 1], WIDTH).to_device(ctx.device),
            )
        })
        .collect();
    let self_loops = Tensor::eye(nodes, (Kind::Bool, ctx.device));
    Ok(Block {
        input_shapes: vec![vec![ctx.batch, nodes, WIDTH], vec![ctx.batch, nodes, nodes]],
        forward: Box::new(move |xs| {
            let blocked = xs[1].le(0.0).logical_and(&self_loops.logical_not());
            rounds.iter().fold(xs[0].shallow_clone(), |h, (w, a_src, a_dst)| {
                let wh = w.forward(&h);
                let scores = (wh.matmul(a_src) + wh.matmul(a_dst).transpose(1, 2)).leaky_relu();
                let attention = scores.masked_fill(&blocked, -1e9).softmax(-1, Kind::Float);
                attention.matmul(&wh).elu()
            })
        }),
    })
}

/// BP031: temporal convolution network block: two causal convolutions of
/// width 3 with dilation `dilation` over `[B, 32, 64]`, residual.
pub fn temporal_conv(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let dilation = ctx.params.int("dilation", 2, 1);
    let first = Conv1d::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH, 3, dilation, 1, true);
    let second = Conv1d::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH, 3, dilation, 1, true);
    Ok(Block {
        input_shapes: vec![vec![ctx.batch, WIDTH, 64]],
        forward: Box::new(move |xs| (&xs[0] + second.forward(&first.forward(&xs[0]).relu())).relu()),
    })
}

/// BP035: learned positional table initialised from sinusoids whose base
/// frequency is `frequency`, added to the tokens.
pub fn learned_positional(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let frequency = ctx.params.float("frequency", 0.5);
    let tokens = 16;
    let mut table = Vec::with_capacity((tokens * WIDTH) as usize);
    for pos in 0..tokens {
        for i in 0..WIDTH {
            let rate = frequency / 10000f64.powf((2 * (i / 2)) as f64 / WIDTH as f64);
            let angle = pos as f64 * rate;
            table.push(if i % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    let learned = (Tensor::from_slice(&table).view([1, tokens, WIDTH]) + ctx.rng.uniform(&[1, tokens, WIDTH], 0.02))
        .to_device(ctx.device);
    Ok(Block { input_shapes: sequence(ctx, tokens, WIDTH), forward: Box::new(move |xs| &xs[0] + &learned) })
}
