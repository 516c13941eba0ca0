//! Durability benchmarks . Prints a table; asserts
//! nothing. All files live in one directory (same disk), measured side by
//! side in one run.
use std::time::Instant;

#[path = "../src/bin/tezzeret/bench/measure.rs"]
#[allow(dead_code)]
mod measure;

use measure::{fdatasync_us, p50, sample_job};
use tezzeret::build::compile::percentile;
use tezzeret::state::guard_table::{GuardEntry, GuardTable};
use tezzeret::build::guard_spec::{GuardSpec, InputGuard};
use tezzeret::state::wal::journal::{Job, Journal};
use tezzeret::state::wal::Wal;

fn job(i: u64) -> Job {
    sample_job(i)
}

fn stats_us(samples: &mut [f64]) -> (f64, f64) {
    (p50(samples), percentile(samples, 99.0).unwrap())
}

fn main() {
    let dir = std::env::temp_dir().join(format!("tezzeret-durability-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    println!("## Durability (state directory on {})\n", dir.display());
    println!("| what | ours | reference | unit |\n| --- | ---: | ---: | --- |");

    // 1. One durable submit vs a bare fdatasync of the same number of bytes.
    let n = 300;
    let mut journal = Journal::open(&dir.join("wal.log")).unwrap();
    journal.set_checkpoint_every(u64::MAX);
    let record_bytes = serde_json::to_vec(&tezzeret::state::wal::Record::Enqueue { job: job(0) }).unwrap().len();
    let entry_bytes = 3 * 256 + record_bytes + 32;
    let mut ours: Vec<f64> = (0..n)
        .map(|i| {
            let t = Instant::now();
            journal.submit(vec![job(i)]).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let mut bare = fdatasync_us(&dir, entry_bytes, n as usize).unwrap();
    let (o50, o99) = stats_us(&mut ours);
    let (b50, b99) = stats_us(&mut bare);
    println!("| durable submit p50 ({entry_bytes} B: 3 headers + record), vs write+fdatasync of as many bytes | {o50:.1} | {b50:.1} | µs |");
    println!("| durable submit p99 | {o99:.1} | {b99:.1} | µs |");
    println!("| ratio p50 ours / fdatasync (goal ≤ 1.5) | {:.2} | 1.00 | × |", o50 / b50);
    println!("| prototype: JSON queue rewrite per job, no fsync | {o50:.1} | 182–227 | µs |");

    // 2. 1000 submits: one sync each vs one group commit.
    let t = Instant::now();
    for i in 0..1000 {
        journal.submit(vec![job(i)]).unwrap();
    }
    let one_by_one = t.elapsed().as_secs_f64();
    let t = Instant::now();
    journal.submit((0..1000).map(job).collect()).unwrap();
    let grouped = t.elapsed().as_secs_f64();
    println!("| 1000 submits, one sync each | {:.1} | — | ms |", one_by_one * 1e3);
    println!("| 1000 submits, group commit (one sync) | {:.1} | {:.1} | ms (ref: one by one) |", grouped * 1e3, one_by_one * 1e3);
    println!("| per submit with group commit | {:.2} | {:.1} | µs |", grouped * 1e6 / 1000.0, one_by_one * 1e6 / 1000.0);
    drop(journal);

    // 3. Recovery of a WAL holding 10,000 transactions.
    let path = dir.join("wal-10k.log");
    {
        let mut journal = Journal::open(&path).unwrap();
        journal.set_checkpoint_every(u64::MAX);
        for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(500) {
            journal.submit(chunk.iter().map(|i| job(*i)).collect()).unwrap();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len();
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let journal = Journal::open(&path).unwrap();
            assert_eq!(journal.state().pending.len(), 10_000);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let (r50, _) = stats_us(&mut times);
    println!("| recovery (open + replay) of 10,000 transactions, {} MiB | {r50:.1} | 12000 (design ceiling) | ms |", size >> 20);
    let t = Instant::now();
    let (_, recovery) = Wal::open(&path).unwrap();
    println!("| of which the WAL scan | {:.1} | — | ms |", t.elapsed().as_secs_f64() * 1e3);
    assert_eq!(recovery.transactions.len(), 10_000);

    // 4. Guard lookups (lock-free, from a read-only mapping).
    let table = GuardTable::create(&dir.join("guards.tbl"), 4096).unwrap();
    for i in 0..50 {
        let spec = GuardSpec(vec![InputGuard { index: 0, shape: vec![8, 32], dtype: tezzeret::base::dtype::Dtype::Float32, stride: vec![32, 1], requires_grad: false }]);
        table.put(&GuardEntry::new(&format!("BP{i:03}"), &"ab".repeat(32), &spec.digest(), "cpu", true, &spec).unwrap()).unwrap();
    }
    let reader = GuardTable::open_read_only(&dir.join("guards.tbl")).unwrap();
    let mut ns: Vec<f64> = (0..20_000)
        .map(|i| {
            let id = format!("BP{:03}", i % 50);
            let t = Instant::now();
            let found = reader.lookup(&id).unwrap();
            let e = t.elapsed().as_nanos() as f64;
            std::hint::black_box(found);
            e
        })
        .collect();
    let (g50, g99) = stats_us(&mut ns);
    println!("| guard table lookup (decoded entry) p50 / p99 | {g50:.0} / {g99:.0} | — | ns |");

    // 5. Signature verification per artifact load, beside the load itself.
    let catalog = tezzeret::build::catalog::Catalog::default_catalog();
    let job = tezzeret::build::compile::CompileJob::new(catalog.get("BP016").unwrap().clone(), tezzeret::build::compile::Strategy::Standard);
    let artifact = tezzeret::build::compile::compile(&job, &mut tezzeret::build::compile::JobLimits::new(None)).unwrap();
    let store = tezzeret::state::store::ArtifactStore::open(&tezzeret::state::layout::StateLayout::new(&dir)).unwrap();
    let keys = tezzeret::state::signing::KeyRing::new(Some([7u8; 32]), &[]).unwrap();
    let mut record = tezzeret::state::artifact::ArtifactRecord {
        blueprint_id: "BP016".into(),
        name: "squeeze_excitation".into(),
        descriptor_hash: String::new(),
        params: Default::default(),
        strategy: "standard".into(),
        variant: artifact.variant.clone(),
        device: "cpu".into(),
        cache_key: artifact.cache_key.clone(),
        artifact_file: String::new(),
        checksum: String::new(),
        size_bytes: 0,
        guard_spec: artifact.guard_spec.clone(),
        guard_digest: artifact.guard_digest.clone(),
        dynamic_batch: artifact.dynamic_batch,
        compile_ms: 0.0,
        prewarm_p50_ms: 0.0,
        prewarm_p95_ms: 0.0,
        tezzeret_version: String::new(),
        torch_version: String::new(),
        format_version: 1,
        revision: 1,
        signature: None,
    };
    record.describe_bytes(&artifact.bytes);
    keys.sign_record(&mut record);
    store.put(&record, &artifact.bytes).unwrap();
    let public = *ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key().as_bytes();
    let verifier = tezzeret::state::signing::KeyRing::new(None, &[public]).unwrap();
    let mut verify_us: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            verifier.verify(&record).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let path = store.artifact_path(&record);
    let mut load_us: Vec<f64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let bytes = std::fs::read(&path).unwrap();
            let module = tezzeret::build::compile::ScriptModule::load(&bytes, tch::Device::Cpu).unwrap();
            std::hint::black_box(module);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let (v50, _) = stats_us(&mut verify_us);
    let (l50, _) = stats_us(&mut load_us);
    println!("| manifest signature verification per load (ed25519) | {v50:.1} | {l50:.1} | µs (ref: reading + loading the artifact, {} B) |", record.size_bytes);
    println!("| share of the load time | {:.1} | 100 | % |", 100.0 * v50 / (v50 + l50));
    let _ = std::fs::remove_dir_all(&dir);
}
