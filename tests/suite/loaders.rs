//! Artifacts are usable by stock PyTorch: every artifact of the default
//! catalog, under every strategy, loaded by Python's `torch.jit.load` and
//! by C++ `torch::jit::load` (a program built with find_package(Torch)),
//! run on inputs matching its guard spec and compared with the eager block.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind, Tensor};
use tezzeret::build::blueprints::{self, ResolvedParams};
use tezzeret::build::compile::Strategy;
use tezzeret::forge::{DefaultHost, DevicePreference, Forge, ForgeConfig};

use crate::{repo_root, TempDir};

fn write_f32(path: &Path, t: &Tensor) {
    let values: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Forges the default catalog under every strategy and writes, per artifact,
/// fresh inputs of its guarded shapes and the eager block's outputs.
/// Returns (JSON manifest, text manifest).
fn fixtures(work: &Path) -> (PathBuf, PathBuf) {
    let mut json = Vec::new();
    let mut text = String::new();
    for strategy in Strategy::ALL {
        let mut config = ForgeConfig::new(work.join(strategy.name()));
        config.strategy = strategy;
        config.device = DevicePreference::Cpu;
        let mut forge = Forge::open(config, Box::new(DefaultHost)).unwrap();
        for report in forge.run(&mut |_| {}) {
            let Some(record) = report.record else { continue };
            let descriptor = forge.catalog().get(&record.blueprint_id).unwrap();
            let params = ResolvedParams::resolve(descriptor, &record.params).unwrap();
            let block = blueprints::build(descriptor, &params, 8, Device::Cpu, Default::default()).unwrap();
            let dir = work.join("fixtures").join(strategy.name()).join(&record.blueprint_id);
            std::fs::create_dir_all(&dir).unwrap();
            tch::manual_seed(7);
            let inputs: Vec<Tensor> = record
                .guard_spec
                .inputs()
                .iter()
                .map(|g| Tensor::randn(g.shape.as_slice(), (Kind::Float, Device::Cpu)))
                .collect();
            let expected = tch::no_grad(|| (block.forward)(&inputs));
            let artifact = forge.store().artifact_path(&record);
            let _ = writeln!(text, "artifact {} {}", record.blueprint_id, artifact.display());
            let mut input_entries = Vec::new();
            for (i, t) in inputs.iter().enumerate() {
                let path = dir.join(format!("input{i}.bin"));
                write_f32(&path, t);
                let shape: Vec<String> = t.size().iter().map(i64::to_string).collect();
                let _ = writeln!(text, "input {} {} {}", path.display(), shape.len(), shape.join(" "));
                input_entries.push(serde_json::json!({"path": path, "shape": t.size()}));
            }
            let path = dir.join("expected.bin");
            write_f32(&path, &expected);
            let shape: Vec<String> = expected.size().iter().map(i64::to_string).collect();
            let _ = writeln!(text, "expected {} {} {}\nend", path.display(), shape.len(), shape.join(" "));
            json.push(serde_json::json!({
                "blueprint_id": record.blueprint_id,
                "strategy": strategy.name(),
                "artifact_path": artifact,
                "guard_spec": record.guard_spec,
                "guard_digest": record.guard_digest,
                "inputs": input_entries,
                "expected": {"path": path, "shape": expected.size()},
            }));
        }
    }
    assert_eq!(json.len(), 4 * 42);
    let json_path = work.join("manifest.json");
    std::fs::write(&json_path, serde_json::to_vec(&json).unwrap()).unwrap();
    let text_path = work.join("manifest.txt");
    std::fs::write(&text_path, text).unwrap();
    (json_path, text_path)
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn python_and_cpp_libtorch_load_every_artifact() {
    let work = TempDir::new("loaders");
    let (json_manifest, text_manifest) = fixtures(work.path());

    let python = std::env::var("TEZZERET_PYTHON").expect("TEZZERET_PYTHON is set by scripts/env.sh");
    let out = run(
        Command::new(python).arg(repo_root().join("tests/python/check_artifacts.py")).arg(&json_manifest),
        "python torch.jit.load check",
    );
    assert!(out.contains("168 passed, 0 failed"), "{out}");

    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH is set by scripts/env.sh");
    let cuda_root = std::env::var("TEZZERET_CUDA_ROOT").expect("TEZZERET_CUDA_ROOT is set by scripts/env.sh");
    let build = work.path().join("build");
    run(
        Command::new("cmake")
            .arg("-S")
            .arg(repo_root().join("cpp-examples/torch_loader"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={libtorch}/share/cmake"))
            .arg(format!("-DCUDAToolkit_ROOT={cuda_root}"))
            .arg(format!("-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}"))
            .arg(format!("-DCMAKE_CUDA_COMPILER={cuda_root}/bin/nvcc")),
        "cmake configure (find_package(Torch))",
    );
    run(Command::new("cmake").arg("--build").arg(&build).arg("-j2"), "cmake build");
    let out = run(Command::new(build.join("load_artifacts")).arg(&text_manifest), "C++ torch::jit::load check");
    assert!(out.contains("168 passed, 0 failed"), "{out}");
}
