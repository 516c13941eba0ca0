//! Small functional layers over deterministic weights, shared by blueprints.
use tch::{Device, Kind, Tensor};

use super::rng::WeightRng;

/// Fully connected layer `y = x Wᵀ + b`.
pub struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    /// A layer mapping `input` features to `output` features.
    pub fn new(rng: &mut WeightRng, device: Device, input: i64, output: i64) -> Self {
        Linear {
            w: rng.weight(&[output, input], input).to_device(device),
            b: rng.weight(&[output], input).to_device(device),
        }
    }

    /// Applies the layer over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, Some(&self.b))
    }
}

/// 2-D convolution with "same"-style padding for odd kernels.
pub struct Conv2d {
    w: Tensor,
    b: Tensor,
    padding: i64,
    dilation: i64,
    groups: i64,
}

impl Conv2d {
    /// A `kernel`×`kernel` convolution, padded by `dilation * (kernel / 2)`.
    pub fn new(
        rng: &mut WeightRng,
        device: Device,
        input: i64,
        output: i64,
        kernel: i64,
        dilation: i64,
        groups: i64,
    ) -> Self {
        let fan_in = input / groups * kernel * kernel;
        Conv2d {
            w: rng.weight(&[output, input / groups, kernel, kernel], fan_in).to_device(device),
            b: rng.weight(&[output], fan_in).to_device(device),
            padding: dilation * (kernel / 2),
            dilation,
            groups,
        }
    }

    /// Applies the convolution (stride 1).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.w,
            Some(&self.b),
            [1, 1],
            [self.padding, self.padding],
            [self.dilation, self.dilation],
            self.groups,
        )
    }
}

/// 1-D convolution over `[B, C, T]`, optionally causal (left padding only).
pub struct Conv1d {
    w: Tensor,
    b: Tensor,
    kernel: i64,
    dilation: i64,
    groups: i64,
    causal: bool,
}

impl Conv1d {
    /// A convolution of width `kernel`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rng: &mut WeightRng,
        device: Device,
        input: i64,
        output: i64,
        kernel: i64,
        dilation: i64,
        groups: i64,
        causal: bool,
    ) -> Self {
        let fan_in = input / groups * kernel;
        Conv1d {
            w: rng.weight(&[output, input / groups, kernel], fan_in).to_device(device),
            b: rng.weight(&[output], fan_in).to_device(device),
            kernel,
            dilation,
            groups,
            causal,
        }
    }

    /// Applies the convolution, keeping the length for odd kernels (or always when causal).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let reach = self.dilation * (self.kernel - 1);
        if self.causal {
            let padded = x.constant_pad_nd([reach, 0]);
            padded.conv1d(&self.w, Some(&self.b), [1], [0], [self.dilation], self.groups)
        } else {
            x.conv1d(&self.w, Some(&self.b), [1], [reach / 2], [self.dilation], self.groups)
        }
    }
}

/// Layer normalisation over the last dimension with affine parameters.
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm over `dim` features.
    pub fn new(rng: &mut WeightRng, device: Device, dim: i64, eps: f64) -> Self {
        LayerNorm {
            gamma: (rng.uniform(&[dim], 0.1) + 1.0).to_device(device),
            beta: rng.uniform(&[dim], 0.1).to_device(device),
            dim,
            eps,
        }
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.gamma), Some(&self.beta), self.eps, false)
    }
}

/// Multi-head scaled dot-product attention with projections.
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: i64,
    dim: i64,
}

impl Attention {
    /// Attention over `dim` features split into `heads` heads (`dim % heads == 0`).
    pub fn new(rng: &mut WeightRng, device: Device, dim: i64, heads: i64) -> Self {
        Attention {
            q: Linear::new(rng, device, dim, dim),
            k: Linear::new(rng, device, dim, dim),
            v: Linear::new(rng, device, dim, dim),
            o: Linear::new(rng, device, dim, dim),
            heads,
            dim,
        }
    }

    /// Queries from `query` `[B, Tq, D]` attend over `context` `[B, Tk, D]`.
    pub fn forward(&self, query: &Tensor, context: &Tensor) -> Tensor {
        self.forward_masked(query, context, None)
    }

    /// As [`Self::forward`], with an optional additive mask `[B or 1, Tq, Tk]`.
    pub fn forward_masked(&self, query: &Tensor, context: &Tensor, mask: Option<&Tensor>) -> Tensor {
        // Batch dims stay -1 so traced graphs accept other batch sizes (and
        // a context of batch 1 broadcasts over the queries' batch).
        let tq = query.size()[1];
        let tk = context.size()[1];
        let head_dim = self.dim / self.heads;
        let split = |t: Tensor, len: i64| t.view([-1, len, self.heads, head_dim]).transpose(1, 2);
        let q = split(self.q.forward(query), tq);
        let k = split(self.k.forward(context), tk);
        let v = split(self.v.forward(context), tk);
        let mut scores = q.matmul(&k.transpose(-2, -1)) / (head_dim as f64).sqrt();
        if let Some(mask) = mask {
            scores = scores + mask.unsqueeze(1);
        }
        let attended = scores.softmax(-1, Kind::Float).matmul(&v);
        self.o.forward(&attended.transpose(1, 2).contiguous().view([-1, tq, self.dim]))
    }
}

/// A two-layer GELU feed-forward network `D → hidden → D`.
pub struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    /// A feed-forward network with `hidden` units.
    pub fn new(rng: &mut WeightRng, device: Device, dim: i64, hidden: i64) -> Self {
        FeedForward { up: Linear::new(rng, device, dim, hidden), down: Linear::new(rng, device, hidden, dim) }
    }

    /// Applies the network over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down.forward(&self.up.forward(x).gelu("none"))
    }
}

/// Batch normalisation in inference mode with non-trivial running statistics.
pub struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: f64,
}

impl BatchNorm {
    /// Batch norm over `channels` (dim 1).
    pub fn new(rng: &mut WeightRng, device: Device, channels: i64, momentum: f64) -> Self {
        BatchNorm {
            gamma: (rng.uniform(&[channels], 0.1) + 1.0).to_device(device),
            beta: rng.uniform(&[channels], 0.1).to_device(device),
            mean: rng.uniform(&[channels], 0.2).to_device(device),
            var: (rng.uniform(&[channels], 0.2) + 1.0).to_device(device),
            momentum,
        }
    }

    /// Normalises with the running statistics (inference mode).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(
            Some(&self.gamma),
            Some(&self.beta),
            Some(&self.mean),
            Some(&self.var),
            false,
            self.momentum,
            1e-5,
            false,
        )
    }
}
