//! Compile and forward benchmarks . Prints tables;
//! asserts nothing (these machines are shared and noisy: read the ratios).
//!
//! 1. Cold Standard compile of the default catalog through the forge:
//!    total wall time and per-blueprint compile_ms.
//! 2. Forward p50 of every blueprint: tch eager vs each strategy's artifact.
//! 3. The five reference modules the Python prototype was measured on, at batch 8 with 1 thread,
//!    side by side with the Python prototype's figures.
#[path = "../src/bin/tezzeret/bench/measure.rs"]
#[allow(dead_code)]
mod measure;

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tezzeret::build::blueprints::{self, Block, ResolvedParams};
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::{self, JobLimits, ScriptModule, Strategy};
use tezzeret::forge::{DefaultHost, DevicePreference, Forge, ForgeConfig};

/// p50 latency in µs of `f` (200 samples after warm-up).
fn p50_us(f: impl FnMut()) -> f64 {
    measure::p50(&measure::sample_us(200, f))
}

/// (eager p50, per-strategy p50 and variant) for a block.
fn forward_row(name: &str, block: &Block, inputs: &[Tensor]) -> (f64, Vec<(f64, String)>) {
    let eager = tch::no_grad(|| p50_us(|| drop((block.forward)(inputs))));
    let reference = tch::no_grad(|| (block.forward)(inputs));
    let strategies = Strategy::ALL
        .iter()
        .map(|&s| {
            let (bytes, variant) =
                compile::build_artifact(name, block, inputs, &reference, s, Device::Cpu, &JobLimits::new(None)).unwrap();
            let module = ScriptModule::load(&bytes, Device::Cpu).unwrap();
            if s == Strategy::Emergency {
                compile::set_graph_executor_optimize(false).unwrap();
            }
            let p50 = tch::no_grad(|| p50_us(|| drop(module.forward(inputs).unwrap())));
            compile::set_graph_executor_optimize(true).unwrap();
            (p50, variant)
        })
        .collect();
    (eager, strategies)
}

fn cold_compile() {
    let dir = std::env::temp_dir().join(format!("tezzeret-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = ForgeConfig::new(&dir);
    config.device = DevicePreference::Cpu;
    let started = Instant::now();
    let mut forge = Forge::open(config, Box::new(DefaultHost)).unwrap();
    let reports = forge.run(&mut |_| {});
    let total = started.elapsed().as_secs_f64();
    println!("## Cold Standard compile of the default catalog (forge, CPU, {} threads)\n", tch::get_num_threads());
    println!("| blueprint | name | compile_ms | prewarm p50 ms |\n| --- | --- | ---: | ---: |");
    let mut sum = 0.0;
    for r in &reports {
        if let Some(rec) = &r.record {
            sum += rec.compile_ms;
            println!("| {} | {} | {:.1} | {:.4} |", r.blueprint_id, r.name, rec.compile_ms, rec.prewarm_p50_ms);
        }
    }
    let ok = reports.iter().filter(|r| r.record.is_some()).count();
    println!("\n{ok} artifacts; sum of compile_ms {sum:.0} ms; total wall (open + run, incl. pre-warm and durable writes) {total:.2} s; prototype 21.9 s for 2 distinct modules\n");
    let _ = std::fs::remove_dir_all(&dir);
}

fn catalog_forward() {
    println!("## Forward p50 (µs) per blueprint, batch 8, {} threads\n", tch::get_num_threads());
    println!("| blueprint | eager | emergency | fast | standard | aggressive | aggressive variant | aggressive/eager |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    let catalog = Catalog::default_catalog();
    for d in catalog.descriptors().iter().filter(|d| !d.is_quarantined()) {
        let params = ResolvedParams::resolve(d, &Default::default()).unwrap();
        let block = blueprints::build(d, &params, 8, Device::Cpu, Default::default()).unwrap();
        let inputs = blueprints::example_inputs(&block.input_shapes, 1, Device::Cpu);
        let (eager, s) = forward_row(&d.blueprint_id, &block, &inputs);
        println!(
            "| {} {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} |",
            d.blueprint_id, d.name, eager, s[0].0, s[1].0, s[2].0, s[3].0, s[3].1, s[3].0 / eager
        );
    }
    println!();
}

/// The prototype's reference modules as blocks with fixed weights.
fn reference_modules() -> Vec<(&'static str, Block, [f64; 3])> {
    let w = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.1;
    let (l_w, l_b) = (w(&[32, 32]), w(&[32]));
    let (g, b) = (w(&[32]) + 1.0, w(&[32]));
    let (c1_w, c1_b, c2_w, c2_b) = (w(&[8, 8, 3, 3]), w(&[8]), w(&[8, 8, 1, 1]), w(&[8]));
    let mha: Vec<Tensor> = (0..4).map(|_| w(&[32, 32])).collect();
    let (m1_w, m1_b, m2_w, m2_b) = (w(&[32, 32]), w(&[32]), w(&[32, 32]), w(&[32]));
    let feat = vec![vec![8, 32]];
    vec![
        (
            "linear 8x32 + SiLU",
            Block { input_shapes: feat.clone(), forward: Box::new(move |x| x[0].linear(&l_w, Some(&l_b)).silu()) },
            [9.3, 68.3, 6.0],
        ),
        (
            "LayerNorm(32)",
            Block {
                input_shapes: feat.clone(),
                forward: Box::new(move |x| x[0].layer_norm([32], Some(&g), Some(&b), 1e-5, false)),
            },
            [4.5, 53.4, 4.7],
        ),
        (
            "conv 8ch 3x3 + ReLU + 1x1, 8x8x16x16",
            Block {
                input_shapes: vec![vec![8, 8, 16, 16]],
                forward: Box::new(move |x| {
                    x[0].conv2d(&c1_w, Some(&c1_b), [1, 1], [1, 1], [1, 1], 1)
                        .relu()
                        .conv2d(&c2_w, Some(&c2_b), [1, 1], [0, 0], [1, 1], 1)
                }),
            },
            [161.8, 261.6, 182.6],
        ),
        (
            "MHA 2 heads, embed 32, seq 12",
            Block {
                input_shapes: vec![vec![8, 12, 32]],
                forward: Box::new(move |x| {
                    let split = |t: Tensor| t.view([-1, 12, 2, 16]).transpose(1, 2);
                    let (q, k, v) = (split(x[0].matmul(&mha[0])), split(x[0].matmul(&mha[1])), split(x[0].matmul(&mha[2])));
                    let att = (q.matmul(&k.transpose(-2, -1)) / 4.0).softmax(-1, Kind::Float).matmul(&v);
                    att.transpose(1, 2).contiguous().view([-1, 12, 32]).matmul(&mha[3])
                }),
            },
            [173.2, 168.7, 132.5],
        ),
        (
            "MLP 32-GELU-32",
            Block {
                input_shapes: feat,
                forward: Box::new(move |x| x[0].linear(&m1_w, Some(&m1_b)).gelu("none").linear(&m2_w, Some(&m2_b))),
            },
            [37.2, 73.8, 21.2],
        ),
    ]
}

fn reference_table() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    println!("## Prototype reference modules, batch 8, 1 thread, forward p50 µs\n");
    println!("| module | tch eager | standard | aggressive (variant) | python eager | torch.compile | python trace+freeze+ofi | ours best / best python |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, block, python) in reference_modules() {
        let inputs: Vec<Tensor> =
            block.input_shapes.iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu))).collect();
        let (eager, s) = forward_row(name, &block, &inputs);
        let ours = s[2].0.min(s[3].0);
        let best_python = python.iter().cloned().fold(f64::MAX, f64::min);
        println!(
            "| {name} | {eager:.1} | {:.1} | {:.1} ({}) | {} | {} | {} | {:.2} |",
            s[2].0, s[3].0, s[3].1, python[0], python[1], python[2], ours / best_python
        );
    }
    println!();
}

fn main() {
    // `cargo bench` passes --bench; a name filter may follow.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wants = |section: &str| filter.as_deref().is_none_or(|f| section.contains(f));
    if wants("compile") {
        cold_compile();
    }
    if wants("forward") {
        catalog_forward();
    }
    if wants("reference") {
        reference_table();
    }
}
