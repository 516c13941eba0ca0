//! Promises of the README that no other test exercises: a failed sync
//! poisons the log until reopen, struct sizes are honoured for every
//! struct that crosses the C ABI, the memory budget feeds the memory
//! breaker, conservative mode's GPU limit and "Aggressive off", the breaker
//! defaults, `wal` and `verify` beside a running forge, a job abandoned at
//! close resumes at the next open, and CUDA without a GPU is UNSUPPORTED.
use std::path::Path;
use std::process::Command;
use std::ptr::null_mut;
use std::time::Duration;

use tezzeret::base::leyline::{HealthStatus, MessagePriority};
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::Strategy;
use tezzeret::ffi::*;
use tezzeret::forge::breakers::{BreakerConfig, BreakerKind};
use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, ForgeService, JobStatus, ResourceReading};
use tezzeret::{ErrorCode, FailureReason};

use crate::cabi::{host_callbacks, ok, open_forge, take, Handle};
use crate::{wait_for, FixedCatalog, TempDir};

const CATALOG: &str = r#"[
 {"blueprint_id": "P1", "name": "relu_activation", "tier": "SAFE"},
 {"blueprint_id": "P2", "name": "gelu_activation", "tier": "SAFE"},
 {"blueprint_id": "LEAK", "name": "memory_leak", "tier": "HIGH_RISK", "quarantine_only": true, "allowed_parameters": {"growth_rate": [0.1, 1.0]}}
]"#;

/// The host of these tests: the small catalog above.
fn host() -> FixedCatalog {
    FixedCatalog(Catalog::from_json(CATALOG).unwrap())
}

fn config(dir: &Path) -> ForgeConfig {
    let mut c = ForgeConfig::new(dir);
    c.device = DevicePreference::Cpu;
    c.strategy = Strategy::Fast;
    c.queue_at_open = false;
    c
}

/// Runs one test of this binary in a child process with `env` set.
fn in_child(test: &str, env: &[(&str, &str)]) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("TEZZERET_PROMISE_CHILD", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("child checks passed"), "{text}");
}

/// A journal in a fresh directory that checkpoints after every append.
fn checkpointing_journal(name: &str) -> (TempDir, std::path::PathBuf, tezzeret::state::wal::journal::Journal) {
    let dir = TempDir::new(name);
    let path = dir.path().join("journal.wal");
    let mut journal = tezzeret::state::wal::journal::Journal::open(&path).unwrap();
    journal.set_checkpoint_every(1);
    (dir, path, journal)
}

/// A one-record transaction to append.
fn published(seq: u64) -> Vec<Vec<tezzeret::state::wal::journal::Record>> {
    vec![vec![tezzeret::state::wal::journal::Record::Published { seqs: vec![seq] }]]
}

#[test]
fn a_failed_checkpoint_fails_no_append() {
    if std::env::var_os("TEZZERET_PROMISE_CHILD").is_none() {
        in_child("promises::a_failed_checkpoint_fails_no_append", &[("TEZZERET_FAILPOINTS", "wal.rename=error@1")]);
        return;
    }
    let (_dir, path, mut journal) = checkpointing_journal("promise-checkpoint");
    // The checkpoint after this append fails (its rename): the append's
    // transaction is durable, so the append succeeds; the failure is kept.
    journal.append(published(1)).expect("a durable append is not failed by its checkpoint");
    let failure = journal.take_checkpoint_failure().expect("the checkpoint's failure is kept");
    assert!(failure.message().contains("rename compacted WAL"), "{failure}");
    assert!(journal.take_checkpoint_failure().is_none(), "said once");
    // The next append checkpoints again, and that one works.
    journal.append(published(2)).unwrap();
    assert!(journal.take_checkpoint_failure().is_none());
    drop(journal);
    let reopened = tezzeret::state::wal::journal::Journal::open(&path).unwrap();
    assert_eq!(reopened.state().transactions_since_checkpoint, 1, "the retried checkpoint replaced the log");
    println!("child checks passed");
}

#[test]
fn a_checkpoint_whose_rename_may_not_be_durable_takes_nothing_more_until_reopen() {
    if std::env::var_os("TEZZERET_PROMISE_CHILD").is_none() {
        let test = "promises::a_checkpoint_whose_rename_may_not_be_durable_takes_nothing_more_until_reopen";
        in_child(test, &[("TEZZERET_FAILPOINTS", "wal.fsync_dir=error@1")]);
        return;
    }
    let (_dir, path, mut journal) = checkpointing_journal("promise-checkpoint-rename");
    // The checkpoint is renamed into place, but its directory's sync
    // fails: a power loss could bring the old log back, so whatever came
    // after would be lost with it. Nothing more is acknowledged.
    journal.append(published(1)).unwrap();
    assert!(journal.take_checkpoint_failure().is_some_and(|e| e.message().contains("fsync WAL directory")));
    let refused = journal.append(published(2)).expect_err("nothing is acknowledged on a log whose name may not be durable");
    assert!(refused.message().contains("poisoned"), "{refused}");
    drop(journal);
    // Reopened (which syncs the directory): it takes work again.
    let mut journal = tezzeret::state::wal::journal::Journal::open(&path).unwrap();
    journal.append(published(3)).unwrap();
    println!("child checks passed");
}

#[test]
fn a_reopened_log_syncs_what_it_recovered_before_taking_more() {
    if std::env::var_os("TEZZERET_PROMISE_CHILD").is_none() {
        in_child("promises::a_reopened_log_syncs_what_it_recovered_before_taking_more", &[("TEZZERET_FAILPOINTS", "wal.recovered_sync=error@1")]);
        return;
    }
    // Entries recovered from the page cache (written, never synced, by a
    // process killed in between) are made durable before new ones follow
    // them: a failed sync fails the open, it is not skipped.
    let dir = TempDir::new("promise-recovered-sync");
    let path = dir.path().join("wal.log");
    let (empty, _) = tezzeret::state::wal::Wal::open(&path).expect("an empty log has nothing to sync");
    drop(empty);
    let (mut wal, _) = tezzeret::state::wal::Wal::open(&path).unwrap();
    wal.commit(&[vec![b"acknowledged".to_vec()]]).unwrap();
    drop(wal);
    let failed = tezzeret::state::wal::Wal::open(&path).err().expect("the recovered entries' sync failed");
    assert_eq!(failed.code(), ErrorCode::Io, "{failed}");
    assert!(failed.message().contains("msync the recovered WAL"), "{failed}");
    let (_, recovery) = tezzeret::state::wal::Wal::open(&path).unwrap();
    assert_eq!(recovery.transactions.len(), 1, "nothing was lost");
    println!("child checks passed");
}

#[test]
fn a_failed_sync_poisons_the_log_until_reopen_and_health_says_unhealthy() {
    if std::env::var_os("TEZZERET_PROMISE_CHILD").is_none() {
        // The child's second WAL sync fails (the first is its first submit).
        in_child("promises::a_failed_sync_poisons_the_log_until_reopen_and_health_says_unhealthy", &[("TEZZERET_FAILPOINTS", "wal.msync=error@2")]);
        return;
    }
    let dir = TempDir::new("promise-poison");
    let mut forge = Forge::open(config(dir.path()), Box::new(host())).unwrap();
    assert!(forge.submit("P1", MessagePriority::Normal).is_ok(), "the first sync succeeds");
    let failed = forge.submit("P2", MessagePriority::Normal).unwrap_err();
    assert_eq!(failed.code(), ErrorCode::Io, "{failed}");
    // Poisoned: nothing more is acknowledged, though the failpoint is spent.
    let refused = forge.submit("P2", MessagePriority::High).unwrap_err();
    assert!(refused.message().contains("poisoned"), "{refused}");
    let health = forge.health();
    assert_eq!(health.status, HealthStatus::Unhealthy as i32, "{health:?}");
    drop(forge);
    // Reopened: the log recovers, what was acknowledged is there, and it accepts work again.
    let mut forge = Forge::open(config(dir.path()), Box::new(host())).unwrap();
    let pending: Vec<&str> = forge.journal().state().pending.values().map(|j| j.blueprint_id.as_str()).collect();
    assert!(pending.contains(&"P1"), "the acknowledged submit survived: {pending:?}");
    assert!(forge.submit("P2", MessagePriority::Normal).unwrap().is_some());
    assert_eq!(forge.health().status, HealthStatus::Healthy as i32);
    println!("child checks passed");
}

/// A struct of `T` inside a larger buffer of canary bytes.
#[repr(C)]
struct Padded<T> {
    value: T,
    canary: [u8; 64],
}

#[test]
fn no_struct_is_read_or_written_past_its_struct_size() {
    let dir = TempDir::new("promise-sizes");
    let callbacks = host_callbacks(null_mut(), None, None, None, None);
    let forge = open_forge(&dir.path().join("s"), &callbacks, |c| c.telemetry_interval_ms = 0);
    let id = std::ffi::CString::new("BP003").unwrap();
    unsafe {
        ok(tezzeret_forge_compile_now(forge, id.as_ptr()));
        let mut table = null_mut();
        ok(tezzeret_forge_guard_table(forge, &mut table));

        // Written structs with a struct_size smaller than ours: nothing past it changes.
        let size = std::mem::size_of::<usize>() + 8;
        let mut entry: Padded<tezzeret_guard_entry> = std::mem::zeroed();
        std::ptr::write_bytes(&mut entry as *mut _ as *mut u8, 0xa5, std::mem::size_of_val(&entry));
        entry.value.struct_size = size;
        ok(tezzeret_guard_table_lookup(table, id.as_ptr(), &mut entry.value));
        let bytes = std::slice::from_raw_parts(&entry as *const _ as *const u8, std::mem::size_of_val(&entry));
        assert!(bytes[size..].iter().all(|b| *b == 0xa5), "guard entry written past struct_size");
        assert!(bytes[std::mem::size_of::<usize>()..size].iter().any(|b| *b != 0xa5), "the fields within it were written");

        let mut verdict: Padded<tezzeret_guard_verdict> = std::mem::zeroed();
        std::ptr::write_bytes(&mut verdict as *mut _ as *mut u8, 0x5a, std::mem::size_of_val(&verdict));
        verdict.value.struct_size = std::mem::size_of::<usize>() + 4; // just `result`
        let (shape, stride) = ([8i64, 32], [32i64, 1]);
        let input = tezzeret_tensor_meta { dtype: TEZZERET_DTYPE_FLOAT32, rank: 2, shape: shape.as_ptr(), stride: stride.as_ptr() };
        let result = tezzeret_guard_check(table, id.as_ptr(), &input, 1, &mut verdict.value);
        assert_eq!(verdict.value.result, result);
        let bytes = std::slice::from_raw_parts(&verdict as *const _ as *const u8, std::mem::size_of_val(&verdict));
        assert!(bytes[std::mem::size_of::<usize>() + 4..].iter().all(|b| *b == 0x5a), "verdict written past struct_size");
        tezzeret_guard_table_close(table);

        // Read structs: fields past struct_size are not read (garbage there
        // would be refused if it were).
        let mut reading: tezzeret_resource_reading = std::mem::zeroed();
        std::ptr::write_bytes(&mut reading as *mut _ as *mut u8, 0xff, std::mem::size_of_val(&reading));
        reading.struct_size = std::mem::size_of::<usize>(); // nothing but the size: defaults for the rest
        ok(tezzeret_forge_report_resources(forge, &reading));
        let mut full = reading;
        full.struct_size = std::mem::size_of::<tezzeret_resource_reading>();
        assert_eq!(take(tezzeret_forge_report_resources(forge, &full)).0, TEZZERET_CODE_INVALID_ARGUMENT, "the garbage is refused when in range");

        let mut cb: tezzeret_host_callbacks = std::mem::zeroed();
        std::ptr::write_bytes(&mut cb as *mut _ as *mut u8, 0xff, std::mem::size_of_val(&cb));
        cb.struct_size = std::mem::offset_of!(tezzeret_host_callbacks, enumerate); // user_data only
        cb.user_data = null_mut();
        let other = std::ffi::CString::new(dir.path().join("other").to_str().unwrap()).unwrap();
        let mut config: tezzeret_config = std::mem::zeroed();
        ok(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()));
        config.state_dir = other.as_ptr();
        config.device = TEZZERET_DEVICE_CPU;
        config.telemetry_interval_ms = 0;
        let mut second = null_mut();
        // Were the garbage callbacks past struct_size read, this would call through them.
        ok(tezzeret_forge_open(&config, &cb, &mut second));
        tezzeret_forge_close(second);
        tezzeret_forge_close(forge);
    }
}

#[test]
fn a_job_over_its_memory_budget_feeds_the_memory_breaker() {
    let dir = TempDir::new("promise-memory");
    let mut c = config(dir.path());
    c.allow_quarantine = true;
    c.memory_budget_bytes = Some(64 << 20);
    let mut forge = Forge::open(c, Box::new(host())).unwrap();
    for attempt in 1..=3 {
        let report = forge.compile_one("LEAK").unwrap();
        assert_eq!(report.error.unwrap().reason(), Some(FailureReason::MemoryBudgetExceeded), "attempt {attempt}");
        assert_eq!(forge.conservative(), attempt == 3, "the memory breaker opens at its third consecutive failure");
    }
    assert_eq!(forge.health().indicators["breaker.memory"], "open");
    assert_eq!(forge.health().indicators["breaker.timeout"], "closed", "not the timeout breaker");
}

#[test]
fn conservative_mode_lowers_the_gpu_limit_and_turns_aggressive_off() {
    let dir = TempDir::new("promise-conservative");
    let mut c = config(dir.path());
    c.strategy = Strategy::Aggressive;
    c.breakers[1] = BreakerConfig { failure_threshold: 1, reset_after: Duration::from_secs(600), successes_to_close: 3 };
    c.rss_budget_bytes = Some(1);
    let mut forge = Forge::open(c, Box::new(host())).unwrap();
    assert_eq!((forge.effective_strategy(), forge.effective_gpu_limit_percent()), (Strategy::Aggressive, 25.0));
    forge.report_resources(ResourceReading { gpu_utilisation_percent: None, rss_bytes: Some(2) });
    assert!(forge.conservative());
    assert_eq!(forge.effective_strategy(), Strategy::Standard, "Aggressive is off");
    assert_eq!(forge.effective_gpu_limit_percent(), 15.0);
    assert_eq!(forge.effective_concurrency(), 1);
}

#[test]
fn every_breaker_default_is_the_designs() {
    let c = ForgeConfig::new("/nonexistent");
    let expected = [(BreakerKind::Timeout, 2, 300), (BreakerKind::Memory, 3, 30), (BreakerKind::Gpu, 5, 60)];
    for (kind, failures, reset) in expected {
        let b = c.breakers[kind as usize];
        assert_eq!((b.failure_threshold, b.reset_after, b.successes_to_close), (failures, Duration::from_secs(reset), 3), "{kind:?}");
        assert_eq!(BreakerConfig::default_for(kind), b);
    }
    assert_eq!((c.max_concurrency, c.gpu_limit_percent), (2, 25.0));
}

#[test]
fn wal_and_verify_run_beside_a_running_forge() {
    let dir = TempDir::new("promise-beside");
    let state = dir.path().join("s");
    let service = ForgeService::open(config(&state), Box::new(host())).unwrap();
    service.with(|f| f.compile_one("P1").map(drop)).unwrap();
    let wal_before = std::fs::read(state.join("wal.log")).unwrap();
    for args in [["wal", "--state"], ["verify", "--state"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_tezzeret")).args(args).arg(&state).output().unwrap();
        assert!(out.status.success(), "{args:?} beside a running forge: {}", String::from_utf8_lossy(&out.stdout));
    }
    assert_eq!(std::fs::read(state.join("wal.log")).unwrap(), wal_before, "they only read");
    // The forge is unaffected: it still holds its lock and works.
    service.with(|f| f.compile_one("P2").map(drop)).unwrap();
    service.close();
}

/// Opens a forge on the default catalog (queued at open), closes it while
/// a drain runs, and returns the jobs that were in flight at the close.
fn close_mid_drain(state: &Path) -> Vec<String> {
    let callbacks = host_callbacks(null_mut(), None, None, None, None);
    let forge = Handle(open_forge(state, &callbacks, |c| {
        c.telemetry_interval_ms = 0;
        c.strategy = TEZZERET_STRATEGY_STANDARD;
    }));
    // A heavy block first (a transformer: hundreds of ms even here), so that
    // a compile is in progress when close comes.
    let heavy = std::ffi::CString::new("BP023").unwrap();
    unsafe { ok(tezzeret_forge_submit(forge.ptr(), heavy.as_ptr(), TEZZERET_PRIORITY_CRITICAL, null_mut())) };
    std::thread::scope(|scope| {
        let drain = scope.spawn(move || unsafe { take(tezzeret_forge_drain(forge.ptr(), null_mut(), null_mut())).0 });
        wait_for("a job to start", || tezzeret::state::verify::read_journal(state).is_ok_and(|(_, j)| !j.started.is_empty()));
        // Close while the drain runs: the compile in progress is abandoned.
        unsafe { tezzeret_forge_close(forge.ptr()) };
        assert_eq!(drain.join().unwrap(), TEZZERET_CODE_OK, "the drain returns");
    });
    let (_, journal) = tezzeret::state::verify::read_journal(state).unwrap();
    assert!(journal.started.iter().all(|s| journal.pending.contains_key(s)), "started jobs stay queued, durably");
    journal.started.iter().map(|s| journal.pending[s].blueprint_id.clone()).collect()
}

#[test]
fn a_job_abandoned_at_close_resumes_at_the_next_open() {
    let dir = TempDir::new("promise-resume");
    // A close that fell between two jobs abandons nothing: try again.
    let (state, ids) = (0..5)
        .map(|round| {
            let state = dir.path().join(format!("s{round}"));
            let ids = close_mid_drain(&state);
            (state, ids)
        })
        .find(|(_, ids)| !ids.is_empty())
        .expect("five closes during a drain, and none abandoned a compile");
    eprintln!("abandoned at close: {ids:?}");
    // The next open resumes them: they compile, as retries.
    let mut c = ForgeConfig::new(&state);
    c.device = DevicePreference::Cpu;
    c.queue_at_open = false;
    let mut reopened = Forge::open(c, Box::new(tezzeret::forge::DefaultHost)).unwrap();
    for id in &ids {
        let report = reopened.compile_one(id).unwrap();
        assert_eq!(report.status, JobStatus::Ok, "{id}: {:?}", report.error);
        assert!(!reopened.journal().state().pending.values().any(|j| &j.blueprint_id == id), "{id} left the queue");
    }
    assert_eq!(reopened.counters().retried, ids.len() as u64, "each abandoned start is retried once");
}

#[test]
fn cuda_without_a_gpu_is_unsupported() {
    if tch::Cuda::is_available() {
        eprintln!("a CUDA device is present: nothing to refuse here");
        return;
    }
    let dir = TempDir::new("promise-cuda");
    let mut c = config(dir.path());
    c.device = DevicePreference::Cuda;
    let err = Forge::open(c, Box::new(host())).err().expect("refused");
    assert_eq!(err.code(), ErrorCode::Unsupported, "{err}");
    let callbacks = host_callbacks(null_mut(), None, None, None, None);
    let path = std::ffi::CString::new(dir.path().join("c").to_str().unwrap()).unwrap();
    unsafe {
        let mut config: tezzeret_config = std::mem::zeroed();
        ok(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()));
        config.state_dir = path.as_ptr();
        config.device = TEZZERET_DEVICE_CUDA;
        let mut forge = null_mut();
        assert_eq!(take(tezzeret_forge_open(&config, &callbacks, &mut forge)).0, TEZZERET_CODE_UNSUPPORTED);
    }
}
