//! The HIGH_RISK blueprints (BP043–BP050): real hazards, compiled only with
//! quarantine compilation enabled, so the pipeline's safety machinery can
//! be shown to catch each one without harming the host process.
//!
//! Hazards that would otherwise never end (a loop, a deadlock) poll the
//! job's cancel token, so an abandoned job's threads do end.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use tch::{Kind, Tensor};

use super::layers::Linear;
use super::{Block, BuildContext};
use crate::base::error::Result;

const WIDTH: i64 = 32;
/// Depth of the exploding/vanishing stacks.
const DEPTH: i64 = 16;

fn features(ctx: &BuildContext<'_>) -> Vec<Vec<i64>> {
    vec![vec![ctx.batch, WIDTH]]
}

/// `DEPTH` bias-free linear layers, each output multiplied by `factor`.
fn scaled_stack(ctx: &mut BuildContext<'_>, factor: f64) -> Block {
    let weights: Vec<Tensor> =
        (0..DEPTH).map(|_| ctx.rng.weight(&[WIDTH, WIDTH], WIDTH).to_device(ctx.device)).collect();
    Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| weights.iter().fold(xs[0].shallow_clone(), |x, w| x.matmul(w) * factor)),
    }
}

/// BP043: 16 linear layers each amplified by `scale`: activations (and so
/// gradients) grow geometrically. Caught by the magnitude check.
pub fn exploding_gradient(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let scale = ctx.params.float("scale", 10.0);
    Ok(scaled_stack(ctx, scale))
}

/// BP044: 16 linear layers each damped by `decay`: the signal vanishes.
/// Caught by the magnitude check.
pub fn vanishing_gradient(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let decay = ctx.params.float("decay", 0.05);
    Ok(scaled_stack(ctx, decay))
}

/// BP045: a linear layer whose output has NaN injected into a `frequency`
/// fraction of its elements. Caught by the finite-output check.
pub fn nan_injection(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let frequency = ctx.params.float("frequency", 0.05);
    let fc = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    let n = (ctx.batch * WIDTH) as usize;
    // A fixed, evenly spread pattern (golden-ratio sequence) of poisoned slots.
    let pattern: Vec<bool> = (0..n).map(|i| ((i as f64 * 0.618_033_988_75).fract()) < frequency).collect();
    let mask = Tensor::from_slice(&pattern).view([ctx.batch, WIDTH]).to_device(ctx.device);
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| fc.forward(&xs[0]).masked_fill(&mask, f64::NAN)),
    })
}

/// BP046: a forward that never returns: rounds of `iterations` matmuls,
/// forever. Caught by the time budget (the job is abandoned, its thread
/// stops at the next round).
pub fn infinite_loop(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let iterations = ctx.params.int("iterations", 1000, 1);
    let weight = ctx.rng.weight(&[WIDTH, WIDTH], WIDTH).to_device(ctx.device);
    let cancel = ctx.cancel.clone();
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let mut x = xs[0].shallow_clone();
            loop {
                for _ in 0..iterations {
                    x = x.matmul(&weight).tanh();
                }
                if cancel.is_cancelled() {
                    return x;
                }
            }
        }),
    })
}

/// BP047: every forward call retains `growth_rate` × 256 MiB that is never
/// released while the block lives. Caught by the memory budget; the memory
/// is freed when the abandoned job drops the block.
pub fn memory_leak(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let growth = ctx.params.float("growth_rate", 3.0);
    let per_call = (growth * (256u64 << 20) as f64 / 4.0) as i64; // f32 elements
    let retained: Rc<RefCell<Vec<Tensor>>> = Rc::default();
    let fc = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    let device = ctx.device;
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            // ones(), not zeros(): the pages are touched, so they are resident.
            retained.borrow_mut().push(Tensor::ones([per_call], (Kind::Float, device)));
            fc.forward(&xs[0])
        }),
    })
}

/// BP048: `threads` threads in a ring, each holding its own lock and
/// waiting for its neighbour's: a circular wait that never resolves. Caught
/// by the time budget; the threads give up once the job is abandoned.
pub fn deadlock_pattern(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let threads = ctx.params.int("threads", 4, 2) as usize;
    let cancel = ctx.cancel.clone();
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let locks: Arc<Vec<Mutex<()>>> = Arc::new((0..threads).map(|_| Mutex::new(())).collect());
            let all_holding = Arc::new(Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let (locks, all_holding, cancel) = (locks.clone(), all_holding.clone(), cancel.clone());
                    std::thread::spawn(move || {
                        let _mine = locks[i].lock().unwrap_or_else(|p| p.into_inner());
                        all_holding.wait();
                        // Wait for the neighbour's lock, which it never releases.
                        while locks[(i + 1) % threads].try_lock().is_err() {
                            if cancel.is_cancelled() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                })
                .collect();
            for handle in handles {
                let _ = handle.join();
            }
            xs[0].shallow_clone()
        }),
    })
}

/// BP049: four threads increment a shared counter with an unsynchronised
/// read–wait(`window_ns`)–write, losing updates; the output is scaled by
/// the racy count, so it differs from call to call. Caught by the
/// determinism check (and the compiled-vs-eager comparison).
pub fn race_condition(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let window = Duration::from_nanos(ctx.params.int("window_ns", 500, 1) as u64);
    let fc = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            // Long enough (about 10 ms a thread) that the threads overlap
            // even on a busy machine, and started together by a barrier:
            // otherwise each may finish within one time slice, in turn,
            // and no update is lost.
            const THREADS: u64 = 4;
            const INCREMENTS: u64 = 20_000;
            let counter = Arc::new(AtomicU64::new(0));
            let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (counter, start) = (counter.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for _ in 0..INCREMENTS {
                            let seen = counter.load(Ordering::Relaxed);
                            let until = std::time::Instant::now() + window;
                            while std::time::Instant::now() < until {
                                std::hint::spin_loop();
                            }
                            counter.store(seen + 1, Ordering::Relaxed); // lost update window
                        }
                    })
                })
                .collect();
            for handle in handles {
                let _ = handle.join();
            }
            let ratio = counter.load(Ordering::Relaxed) as f64 / (THREADS * INCREMENTS) as f64;
            fc.forward(&xs[0]) * ratio
        }),
    })
}

/// BP050: adds sign noise of size `epsilon` drawn from libtorch's global
/// generator at every call: unseeded, so eager and compiled outputs differ.
/// Caught by the determinism check and the numeric comparison.
pub fn adversarial_noise(ctx: &mut BuildContext<'_>) -> Result<Block> {
    let epsilon = ctx.params.float("epsilon", 0.5);
    let fc = Linear::new(&mut ctx.rng, ctx.device, WIDTH, WIDTH);
    Ok(Block {
        input_shapes: features(ctx),
        forward: Box::new(move |xs| {
            let y = fc.forward(&xs[0]);
            let noise = y.randn_like().sign() * epsilon;
            y + noise
        }),
    })
}
