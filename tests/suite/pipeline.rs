//! The compilation pipeline through the Rust API: every default blueprint
//! under every strategy, determinism, parameters, quarantine, the cache.
use std::collections::BTreeMap;

use tch::Device;
use tezzeret::build::blueprints::ParameterOverrides;
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::{self, CompileJob, JobLimits, Strategy};
use tezzeret::forge::{DefaultHost, DevicePreference, Forge, ForgeConfig, JobStatus};
use tezzeret::ErrorCode;

use crate::TempDir;

fn compile_job(d: &tezzeret::build::catalog::Descriptor, o: &ParameterOverrides, s: Strategy) -> tezzeret::Result<compile::CompiledArtifact> {
    let mut job = CompileJob::new(d.clone(), s);
    job.overrides = o.clone();
    compile::compile(&job, &mut JobLimits::new(None))
}

fn forge_all(strategy: Strategy) {
    let dir = TempDir::new(&format!("pipeline-{strategy}"));
    let mut config = ForgeConfig::new(dir.path());
    config.strategy = strategy;
    config.device = DevicePreference::Cpu;
    let mut forge = Forge::open(config, Box::new(DefaultHost)).unwrap();
    let reports = forge.run(&mut |_| {});
    assert_eq!(reports.len(), 50);
    for r in &reports {
        let quarantined = forge.catalog().get(&r.blueprint_id).unwrap().is_quarantined();
        let expected = if quarantined { JobStatus::Refused } else { JobStatus::Ok };
        assert_eq!(r.status, expected, "{} under {strategy}: {:?}", r.blueprint_id, r.error);
        if let Some(record) = &r.record {
            forge.store().verify(record).unwrap();
            assert_eq!(record.strategy, strategy.name());
            assert!(record.prewarm_p50_ms > 0.0 && record.prewarm_p95_ms >= record.prewarm_p50_ms);
            assert_eq!(record.guard_digest, record.guard_spec.digest());
            assert!(!record.guard_spec.inputs().is_empty());
        }
    }
    let distinct: std::collections::BTreeSet<&str> =
        reports.iter().filter_map(|r| r.record.as_ref()).map(|r| r.checksum.as_str()).collect();
    assert_eq!(distinct.len(), 42, "every blueprint is a distinct module");
}

#[test]
fn every_default_blueprint_compiles_under_emergency() {
    forge_all(Strategy::Emergency);
}

#[test]
fn every_default_blueprint_compiles_under_fast() {
    forge_all(Strategy::Fast);
}

#[test]
fn every_default_blueprint_compiles_under_standard() {
    forge_all(Strategy::Standard);
}

#[test]
fn every_default_blueprint_compiles_under_aggressive() {
    forge_all(Strategy::Aggressive);
}

#[test]
fn compiled_artifact_reproduces_the_eager_block() {
    let catalog = Catalog::default_catalog();
    let d = catalog.get("BP016").unwrap();
    let none = ParameterOverrides::new();
    let artifact = compile_job(d, &none, Strategy::Standard).unwrap();
    assert_eq!(artifact.variant, "trace+freeze");
    assert_eq!(artifact.params.values()["reduction"], 10.0, "midpoint of [4, 16]");
    // Load the stored bytes independently (tch's own loader) and compare
    // with the eager block on fresh inputs of the guarded shape.
    let module = tch::CModule::load_data(&mut artifact.bytes.as_slice()).unwrap();
    let params = tezzeret::build::blueprints::ResolvedParams::resolve(d, &none).unwrap();
    let block = tezzeret::build::blueprints::build(d, &params, 8, Device::Cpu, Default::default()).unwrap();
    let shape = &artifact.guard_spec.inputs()[0].shape;
    assert_eq!(shape, &vec![8, 32, 16, 16]);
    let x = tch::Tensor::randn(shape.as_slice(), (tch::Kind::Float, Device::Cpu));
    let compiled = tch::no_grad(|| module.forward_ts(&[&x])).unwrap();
    let eager = tch::no_grad(|| (block.forward)(&[x]));
    assert!(compiled.allclose(&eager, compile::RTOL, compile::ATOL, false));
}

#[test]
fn same_job_gives_byte_identical_artifacts() {
    let catalog = Catalog::default_catalog();
    let none = ParameterOverrides::new();
    for id in ["BP001", "BP023", "BP033", "BP036"] {
        let d = catalog.get(id).unwrap();
        for strategy in Strategy::ALL {
            let a = compile_job(d, &none, strategy).unwrap();
            let b = compile_job(d, &none, strategy).unwrap();
            // Aggressive picks its variant by timing; each variant's bytes
            // are deterministic.
            if a.variant == b.variant {
                assert!(a.bytes == b.bytes, "{id} under {strategy} ({}) is not deterministic", a.variant);
            } else {
                assert_eq!(strategy, Strategy::Aggressive, "{id}: only Aggressive chooses between variants");
            }
            assert_eq!(a.cache_key, b.cache_key);
        }
    }
}

#[test]
fn parameters_are_validated_against_their_bounds() {
    let catalog = Catalog::default_catalog();
    let d = catalog.get("BP013").unwrap();
    let mut o = BTreeMap::new();
    o.insert("groups".to_string(), 9.0);
    let err = compile_job(d, &o, Strategy::Fast).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(err.message().contains("\"groups\" = 9") && err.message().contains("[2, 8]"), "{err}");
    let mut o = BTreeMap::new();
    o.insert("width".to_string(), 3.0);
    let err = compile_job(d, &o, Strategy::Fast).unwrap_err();
    assert!(err.message().contains("unknown parameter \"width\"") && err.message().contains("allowed: groups"), "{err}");
    let mut o = BTreeMap::new();
    o.insert("groups".to_string(), f64::NAN);
    assert!(compile_job(d, &o, Strategy::Fast).is_err());
    // A host value inside the bounds shapes the module.
    let mut o = BTreeMap::new();
    o.insert("groups".to_string(), 2.0);
    let two = compile_job(d, &o, Strategy::Fast).unwrap();
    assert_eq!(two.guard_spec.inputs()[0].shape, vec![8, 8, 16, 16]);
    let default = compile_job(d, &ParameterOverrides::new(), Strategy::Fast).unwrap();
    assert_eq!(default.guard_spec.inputs()[0].shape, vec![8, 20, 16, 16], "groups = midpoint 5, channels 4·5");
    assert_ne!(two.cache_key, default.cache_key);
}

#[test]
fn forge_refuses_unknown_blueprints_in_overrides() {
    let dir = TempDir::new("pipeline-overrides");
    let mut config = ForgeConfig::new(dir.path());
    config.device = DevicePreference::Cpu;
    config.parameter_overrides.insert("BP999".into(), BTreeMap::new());
    let err = Forge::open(config.clone(), Box::new(DefaultHost)).err().unwrap();
    assert_eq!(err.code(), ErrorCode::NotFound);
    config.parameter_overrides.clear();
    config.parameter_overrides.insert("BP002".into(), [("scale".to_string(), 5.0)].into());
    let err = Forge::open(config, Box::new(DefaultHost)).err().unwrap();
    assert!(err.message().contains("[0.5, 2]"), "{err}");
}

#[test]
fn store_reuses_artifacts_and_recompiles_changed_descriptors() {
    let dir = TempDir::new("pipeline-cache");
    let json = |max: f64| {
        format!(
            r#"[{{"blueprint_id": "BP002", "name": "linear_projection", "tier": "BLUEPRINT_TIER_SAFE",
                 "allowed_parameters": {{"scale": [0.5, {max}]}}}},
                {{"blueprint_id": "BP005", "name": "relu_activation", "tier": "BLUEPRINT_TIER_SAFE"}}]"#
        )
    };
    struct Fixed(Option<Catalog>);
    impl tezzeret::forge::Host for Fixed {
        fn enumerate(&mut self) -> tezzeret::Result<Option<Catalog>> {
            Ok(self.0.take())
        }
    }
    let run = |catalog: Catalog| {
        let mut config = ForgeConfig::new(dir.path());
        config.device = DevicePreference::Cpu;
        let mut forge = Forge::open(config, Box::new(Fixed(Some(catalog)))).unwrap();
        forge.run(&mut |_| {}).into_iter().map(|r| (r.blueprint_id, r.status)).collect::<Vec<_>>()
    };
    let first = run(Catalog::from_json(&json(2.0)).unwrap());
    assert_eq!(first, [("BP002".into(), JobStatus::Ok), ("BP005".into(), JobStatus::Ok)]);
    let second = run(Catalog::from_json(&json(2.0)).unwrap());
    assert_eq!(second, [("BP002".into(), JobStatus::Cached), ("BP005".into(), JobStatus::Cached)]);
    // Changing BP002's bounds changes its content hash (and midpoint): recompiled.
    let third = run(Catalog::from_json(&json(4.0)).unwrap());
    assert_eq!(third, [("BP002".into(), JobStatus::Ok), ("BP005".into(), JobStatus::Cached)]);
    // A damaged artifact is not reused.
    let store = tezzeret::state::store::ArtifactStore::open_existing(&tezzeret::state::layout::StateLayout::new(dir.path())).unwrap();
    let (_, journal) = tezzeret::state::verify::read_journal(dir.path()).unwrap();
    let record = journal.artifacts["BP005"].clone();
    std::fs::write(store.artifact_path(&record), b"not a torchscript archive").unwrap();
    let err = store.verify(&record).unwrap_err();
    assert!(err.message().starts_with("checksum_mismatch") && err.message().contains("BP005"), "{err}");
    let fourth = run(Catalog::from_json(&json(4.0)).unwrap());
    assert_eq!(fourth[1], ("BP005".into(), JobStatus::Ok));
}

#[test]
fn a_batch_of_artifacts_is_stored_in_one_write_or_not_at_all() {
    use tezzeret::state::layout::StateLayout;
    use tezzeret::state::store::ArtifactStore;
    let source = TempDir::new("pipeline-batch-source");
    let mut config = ForgeConfig::new(source.path());
    config.device = DevicePreference::Cpu;
    let mut forge = Forge::open(config, Box::new(DefaultHost)).unwrap();
    for id in ["BP001", "BP005"] {
        assert_eq!(forge.compile_one(id).unwrap().status, JobStatus::Ok);
    }
    drop(forge);
    let from = ArtifactStore::open_existing(&StateLayout::new(source.path())).unwrap();
    let (_, journal) = tezzeret::state::verify::read_journal(source.path()).unwrap();
    let (a, b) = (journal.artifacts["BP001"].clone(), journal.artifacts["BP005"].clone());
    let (bytes_a, bytes_b) = (std::fs::read(from.artifact_path(&a)).unwrap(), std::fs::read(from.artifact_path(&b)).unwrap());

    let target = TempDir::new("pipeline-batch-target");
    let store = ArtifactStore::open(&StateLayout::new(target.path())).unwrap();
    // One record whose bytes do not match refuses the whole batch, before anything is written.
    let err = store.put_all(&[(&a, &bytes_a), (&b, &bytes_a)]).unwrap_err();
    assert!(err.message().contains("BP005") && err.message().contains("does not describe"), "{err}");
    assert!(store.manifest(&a.cache_key).is_none(), "nothing of a refused batch is stored");
    // A cache key given twice is stored once; both artifacts verify.
    store.put_all(&[(&a, &bytes_a), (&b, &bytes_b), (&a, &bytes_a)]).unwrap();
    for record in [&a, &b] {
        store.verify(record).unwrap();
        assert_eq!(store.manifest(&record.cache_key).as_ref(), Some(record));
    }
}

#[test]
fn quarantined_blueprints_are_refused_with_a_clear_error() {
    let dir = TempDir::new("pipeline-quarantine");
    let mut config = ForgeConfig::new(dir.path());
    config.device = DevicePreference::Cpu;
    let mut forge = Forge::open(config, Box::new(DefaultHost)).unwrap();
    let report = forge.compile_one("BP046").unwrap();
    assert_eq!(report.status, JobStatus::Refused);
    let err = report.error.unwrap();
    assert_eq!(err.code(), ErrorCode::Quarantined);
    assert!(err.message().contains("BP046 (infinite_loop) is quarantine-only"), "{err}");
    assert!(forge.compile_one("BP404").is_err());
}

#[test]
fn any_blueprint_id_gives_a_loadable_artifact() {
    // The id names the TorchScript class; ids that are not identifiers
    // must still give archives that load.
    let json = r#"[{"blueprint_id": "bp-7 x.ünï", "name": "gelu_activation", "tier": "SAFE"}]"#;
    let d = Catalog::from_json(json).unwrap().descriptors()[0].clone();
    let artifact = compile_job(&d, &ParameterOverrides::new(), Strategy::Standard).unwrap();
    tch::CModule::load_data(&mut artifact.bytes.as_slice()).unwrap();
}

#[test]
fn artifacts_are_dynamic_in_the_batch_only_when_validated() {
    let catalog = Catalog::default_catalog();
    let none = ParameterOverrides::new();
    let se = compile_job(catalog.get("BP016").unwrap(), &none, Strategy::Standard).unwrap();
    assert!(se.dynamic_batch);
    let module = tch::CModule::load_data(&mut se.bytes.as_slice()).unwrap();
    let out = tch::no_grad(|| module.forward_ts(&[tch::Tensor::ones([3, 32, 16, 16], (tch::Kind::Float, Device::Cpu))]));
    assert_eq!(out.unwrap().size(), vec![3, 32, 16, 16]);
    // The meta-learning layer's adaptation step depends on the batch size
    // through a traced constant: not dynamic.
    let meta = compile_job(catalog.get("BP041").unwrap(), &none, Strategy::Standard).unwrap();
    assert!(!meta.dynamic_batch);
}

#[test]
fn host_input_shapes_replace_the_representative_ones() {
    let catalog = Catalog::default_catalog();
    let d = catalog.get("BP022").unwrap(); // MHA, width 8·heads = 40
    let mut job = CompileJob::new(d.clone(), Strategy::Fast);
    job.input_shapes = Some(vec![vec![2, 30, 40]]);
    let artifact = compile::compile(&job, &mut JobLimits::new(None)).unwrap();
    assert_eq!(artifact.guard_spec.inputs()[0].shape, vec![2, 30, 40]);
    assert_eq!(artifact.guard_spec.inputs()[0].stride, vec![1200, 40, 1]);
    let default_key = compile_job(d, &ParameterOverrides::new(), Strategy::Fast).unwrap().cache_key;
    assert_ne!(artifact.cache_key, default_key, "shapes are part of the cache key");
    // Wrong rank or count: refused naming the shape.
    job.input_shapes = Some(vec![vec![2, 30]]);
    let err = compile::compile(&job, &mut JobLimits::new(None)).unwrap_err();
    assert!(err.message().contains("input_shapes[0] = [2, 30]: expected rank 3"), "{err}");
    job.input_shapes = Some(vec![vec![2, 30, 40], vec![1]]);
    assert!(compile::compile(&job, &mut JobLimits::new(None)).unwrap_err().message().contains("1 input(s)"));
    // A width the block cannot take: the eager run fails, clearly, no crash.
    job.input_shapes = Some(vec![vec![2, 30, 41]]);
    let err = compile::compile(&job, &mut JobLimits::new(None)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::CompileFailed);
    assert!(err.message().contains("eager forward failed"), "{err}");
}

#[test]
fn cache_evicts_by_ttl_and_least_recent_use_within_its_cap() {
    struct Fixed(Option<Catalog>);
    impl tezzeret::forge::Host for Fixed {
        fn enumerate(&mut self) -> tezzeret::Result<Option<Catalog>> {
            Ok(self.0.take())
        }
    }
    let dir = TempDir::new("cache");
    let entry = |id: &str, name: &str| format!(r#"{{"blueprint_id": "{id}", "name": "{name}", "tier": "SAFE"}}"#);
    let abc = format!("[{}, {}, {}]", entry("A", "relu_activation"), entry("B", "gelu_activation"), entry("C", "skip_connection"));
    let only_a = format!("[{}]", entry("A", "relu_activation"));
    let open = |catalog: &str, capacity: u64, ttl: std::time::Duration| {
        let mut config = ForgeConfig::new(dir.path());
        config.device = DevicePreference::Cpu;
        config.cache_capacity_bytes = capacity;
        config.cache_ttl = ttl;
        Forge::open(config, Box::new(Fixed(Some(Catalog::from_json(catalog).unwrap())))).unwrap()
    };
    let day = std::time::Duration::from_secs(86_400);
    let mut forge = open(&abc, u64::MAX, day);
    forge.run(&mut |_| {});
    let sizes: BTreeMap<String, u64> = forge.artifacts().iter().map(|(k, r)| (k.clone(), r.size_bytes)).collect();
    assert_eq!(forge.cache_stats().misses, 3);
    drop(forge);
    std::thread::sleep(std::time::Duration::from_millis(20));
    // A is used again (a hit, now the most recent); the cap then fits A and C: B, least recently used, goes.
    let mut forge = open(&only_a, sizes["A"] + sizes["C"], day);
    let reports = forge.run(&mut |_| {});
    assert_eq!(reports[0].status, JobStatus::Cached);
    let stats = forge.cache_stats();
    assert_eq!((stats.hits, stats.evictions, stats.entries), (1, 1, 2));
    assert!(stats.bytes <= sizes["A"] + sizes["C"]);
    assert_eq!(forge.artifacts().keys().cloned().collect::<Vec<_>>(), ["A", "C"]);
    assert_eq!(forge.guards().lookup("B").unwrap(), tezzeret::state::guard_table::Lookup::Missing);
    drop(forge);
    // A TTL of zero expires everything; the evicted artifacts compile again when next needed.
    let mut forge = open(&abc, u64::MAX, std::time::Duration::ZERO);
    let reports = forge.run(&mut |_| {});
    assert_eq!(reports.iter().filter(|r| r.status == JobStatus::Ok).count(), 1, "only B had to compile");
    assert_eq!(forge.cache_stats().evictions, 3);
    assert!(forge.artifacts().is_empty());
    assert!(tezzeret::state::verify::verify_state(dir.path()).unwrap().problems.is_empty());
}
