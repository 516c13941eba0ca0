//! Image blocks over `[B, C, H, W]` inputs.
use tch::{Kind, Tensor};

use super::layers::{BatchNorm, Conv2d, Linear};
use super::{Block, BuildContext};
use crate::base::error::Result;

/// Default channels of image blocks.
const CHANNELS: i64 = 16;
/// Default spatial size of image blocks.
const SIZE: i64 = 16;

fn image(ctx: &BuildContext<'_>, channels: i64, size: i64) -> Vec<Vec<i64>> {
    vec![vec![ctx.batch, channels, size, size]]
}

/// Mean over the spatial dims: `[B, C, H, W] → [B, C]`.
fn global_avg(x: &Tensor) -> Tensor {
    x.mean_dim([2i64, 3].as_slice(), false, Kind::Float)
}

/// BP007: max pooling with a `kernel`×`kernel` window and stride.
pub fn pooling_max(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let k = ctx.params.int("kernel", 2, 1);
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| xs[0].max_pool2d([k, k], [k, k], [0, 0], [1, 1], true)),
    })
}

/// BP013: 3×3 convolution with `groups` groups (channels = 4·groups) + ReLU.
pub fn grouped_conv(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let groups = ctx.params.int("groups", 4, 1);
    let channels = 4 * groups;
    let conv = Conv2d::new(&mut ctx.rng, ctx.device, channels, channels, 3, 1, groups);
    Ok(Block { input_shapes: image(ctx, channels, SIZE), forward: Box::new(move |xs| conv.forward(&xs[0]).relu()) })
}

/// BP015: depthwise `kernel`×`kernel` conv, pointwise 1×1 conv, ReLU.
pub fn depthwise_separable(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let k = ctx.params.int("kernel", 3, 1);
    let depthwise = Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, k, 1, CHANNELS);
    let pointwise = Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, 1, 1, 1);
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| pointwise.forward(&depthwise.forward(&xs[0])).relu()),
    })
}

/// BP016: squeeze-and-excitation: pool → FC(C→C/r) → ReLU → FC → sigmoid → scale.
pub fn squeeze_excitation(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let channels = 32;
    let r = ctx.params.int("reduction", 8, 1);
    let hidden = (channels / r).max(1);
    let squeeze = Linear::new(&mut ctx.rng, ctx.device, channels, hidden);
    let excite = Linear::new(&mut ctx.rng, ctx.device, hidden, channels);
    Ok(Block {
        input_shapes: image(ctx, channels, SIZE),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let weights = excite.forward(&squeeze.forward(&global_avg(x)).relu()).sigmoid();
            x * weights.unsqueeze(-1).unsqueeze(-1)
        }),
    })
}

/// BP017: channel attention (CBAM) with `heads` independent channel groups,
/// each gated by a shared MLP over its average- and max-pooled descriptors.
pub fn channel_attention(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let heads = ctx.params.int("heads", 2, 1);
    let group = 8;
    let channels = heads * group;
    let mlps: Vec<(Linear, Linear)> = (0..heads)
        .map(|_| {
            (Linear::new(&mut ctx.rng, ctx.device, group, group / 2), Linear::new(&mut ctx.rng, ctx.device, group / 2, group))
        })
        .collect();
    Ok(Block {
        input_shapes: image(ctx, channels, SIZE),
        forward: Box::new(move |xs| {
            let parts: Vec<Tensor> = xs[0]
                .chunk(heads, 1)
                .iter()
                .zip(&mlps)
                .map(|(part, (a, b))| {
                    let avg = b.forward(&a.forward(&global_avg(part)).relu());
                    let max = b.forward(&a.forward(&part.amax([2i64, 3].as_slice(), false)).relu());
                    part * (avg + max).sigmoid().unsqueeze(-1).unsqueeze(-1)
                })
                .collect();
            Tensor::cat(&parts, 1)
        }),
    })
}

/// BP018: spatial attention (CBAM): channel mean and max → conv of radius
/// `radius` → sigmoid mask.
pub fn spatial_attention(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let radius = ctx.params.int("radius", 2, 0);
    let conv = Conv2d::new(&mut ctx.rng, ctx.device, 2, 1, 2 * radius + 1, 1, 1);
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let avg = x.mean_dim([1i64].as_slice(), true, Kind::Float);
            let max = x.amax([1i64].as_slice(), true);
            x * conv.forward(&Tensor::cat(&[avg, max], 1)).sigmoid()
        }),
    })
}

/// BP025: dynamic convolution: `experts` 3×3 kernels mixed per sample by a
/// softmax attention over pooled features (CondConv; mixing outputs equals
/// mixing kernels for linear convolutions).
pub fn dynamic_conv(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let experts = ctx.params.int("experts", 4, 1);
    let kernels: Vec<Conv2d> =
        (0..experts).map(|_| Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, 3, 1, 1)).collect();
    let router = Linear::new(&mut ctx.rng, ctx.device, CHANNELS, experts);
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let attention = router.forward(&global_avg(x)).softmax(-1, Kind::Float);
            let outputs: Vec<Tensor> = kernels.iter().map(|k| k.forward(x)).collect();
            let stacked = Tensor::stack(&outputs, 1); // [B, E, C, H, W]
            let weights = attention.view([-1, experts, 1, 1, 1]);
            (stacked * weights).sum_dim_intlist([1i64].as_slice(), false, Kind::Float).relu()
        }),
    })
}

/// BP026: adaptive average pooling to `output_size`² and a 1×1 conv head.
pub fn adaptive_pooling(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let size = ctx.params.int("output_size", 8, 1);
    let head = Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, 1, 1, 1);
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| head.forward(&xs[0].adaptive_avg_pool2d([size, size]))),
    })
}

/// BP027: feature pyramid with `levels` levels: bottom-up 2× downsampling
/// convs, top-down nearest upsampling with lateral 1×1 convs, summed.
pub fn feature_pyramid(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let levels = ctx.params.int("levels", 3, 1);
    let size = 1i64 << levels.max(4);
    let down: Vec<Conv2d> =
        (0..levels).map(|_| Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, 3, 1, 1)).collect();
    let lateral: Vec<Conv2d> =
        (0..levels).map(|_| Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, 1, 1, 1)).collect();
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, size),
        forward: Box::new(move |xs| {
            let mut features = Vec::new();
            let mut x = xs[0].shallow_clone();
            for (i, conv) in down.iter().enumerate() {
                if i > 0 {
                    x = x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
                }
                x = conv.forward(&x).relu();
                features.push(x.shallow_clone());
            }
            let mut top = lateral[features.len() - 1].forward(&features[features.len() - 1]);
            for i in (0..features.len() - 1).rev() {
                let target = features[i].size();
                let up = top.upsample_nearest2d([target[2], target[3]], None, None);
                top = up + lateral[i].forward(&features[i]);
            }
            top
        }),
    })
}

/// BP028: dense block of 3 layers, each BN → ReLU → 3×3 conv adding
/// `growth_rate` channels, concatenated with everything before it.
pub fn dense_connection(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let growth = ctx.params.int("growth_rate", 16, 1);
    let layers: Vec<(BatchNorm, Conv2d)> = (0..3)
        .map(|i| {
            let input = CHANNELS + i * growth;
            (BatchNorm::new(&mut ctx.rng, ctx.device, input, 0.9), Conv2d::new(&mut ctx.rng, ctx.device, input, growth, 3, 1, 1))
        })
        .collect();
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| {
            let mut x = xs[0].shallow_clone();
            for (norm, conv) in &layers {
                let new = conv.forward(&norm.forward(&x).relu());
                x = Tensor::cat(&[x, new], 1);
            }
            x
        }),
    })
}

/// BP032: three 3×3 convolutions with dilation `dilation`, ReLU between.
pub fn dilated_conv(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let dilation = ctx.params.int("dilation", 2, 1);
    let convs: Vec<Conv2d> =
        (0..3).map(|_| Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, CHANNELS, 3, dilation, 1)).collect();
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, SIZE),
        forward: Box::new(move |xs| convs.iter().fold(xs[0].shallow_clone(), |x, c| c.forward(&x).relu())),
    })
}

/// BP033: deformable sampling: a conv predicts a (dx, dy) offset field per
/// each of `offset_groups` channel groups, features are resampled bilinearly
/// at the offset positions, then convolved.
pub fn deformable_conv(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let groups = ctx.params.int("offset_groups", 2, 1);
    let channels = 4 * groups;
    let offsets = Conv2d::new(&mut ctx.rng, ctx.device, channels, 2 * groups, 3, 1, 1);
    let conv = Conv2d::new(&mut ctx.rng, ctx.device, channels, channels, 3, 1, 1);
    let axis = Tensor::linspace(-1.0, 1.0, SIZE, (Kind::Float, ctx.device));
    let grids = Tensor::meshgrid_indexing(&[&axis, &axis], "ij");
    let base = Tensor::stack(&[&grids[1], &grids[0]], -1).unsqueeze(0); // [1, H, W, 2] as (x, y)
    Ok(Block {
        input_shapes: image(ctx, channels, SIZE),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let field = offsets.forward(x).tanh() * (2.0 / SIZE as f64); // at most ±1 pixel
            let parts: Vec<Tensor> = x
                .chunk(groups, 1)
                .iter()
                .enumerate()
                .map(|(g, part)| {
                    let delta = field.narrow(1, 2 * g as i64, 2).permute([0, 2, 3, 1]);
                    let grid = &base + delta; // broadcasts over the batch
                    part.grid_sampler(&grid, 0, 1, true)
                })
                .collect();
            conv.forward(&Tensor::cat(&parts, 1)).relu()
        }),
    })
}

/// BP034: non-local (embedded Gaussian) attention within `window`×`window`
/// windows of a `2·window`-sized feature map, with a residual connection.
pub fn non_local_block(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let window = ctx.params.int("window", 8, 1);
    let size = 2 * window;
    let inner = CHANNELS / 2;
    let theta = Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, inner, 1, 1, 1);
    let phi = Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, inner, 1, 1, 1);
    let g = Conv2d::new(&mut ctx.rng, ctx.device, CHANNELS, inner, 1, 1, 1);
    let out = Conv2d::new(&mut ctx.rng, ctx.device, inner, CHANNELS, 1, 1, 1);
    Ok(Block {
        input_shapes: image(ctx, CHANNELS, size),
        forward: Box::new(move |xs| {
            let x = &xs[0];
            let n = size / window;
            // [B, C', H, W] → [B·n·n, window², C'] (batch left as -1: dynamic)
            let windows = |t: Tensor| {
                t.view([-1, inner, n, window, n, window])
                    .permute([0, 2, 4, 3, 5, 1])
                    .contiguous()
                    .view([-1, window * window, inner])
            };
            let (q, k, v) = (windows(theta.forward(x)), windows(phi.forward(x)), windows(g.forward(x)));
            let attended = q.matmul(&k.transpose(1, 2)).softmax(-1, Kind::Float).matmul(&v);
            let restored = attended
                .view([-1, n, n, window, window, inner])
                .permute([0, 5, 1, 3, 2, 4])
                .contiguous()
                .view([-1, inner, size, size]);
            x + out.forward(&restored)
        }),
    })
}
