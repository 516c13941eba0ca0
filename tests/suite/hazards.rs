//! The quarantine hazards (BP043–BP050): each is refused by default and,
//! with quarantine compilation enabled, caught by its named mechanism
//! without crashing or hanging the process. Each runs in a child process
//! (the CLI) so memory and threads are isolated; two are also run in this
//! process to show the abandoned job's threads end.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::{self, CompileJob, Strategy};
use tezzeret::ErrorCode;

use crate::TempDir;

/// Runs the CLI on one default-catalog hazard; returns its JSON entry.
/// `budget`: seconds; short for the hazards only a budget stops, generous
/// for the others so a loaded machine does not turn them into timeouts.
fn forge_hazard(id: &str, allow: bool, budget: &str) -> serde_json::Value {
    let work = TempDir::new(&format!("hazard-{id}"));
    let descriptor = Catalog::default_catalog().get(id).unwrap().clone();
    let mut params = serde_json::Map::new();
    for (name, b) in &descriptor.allowed_parameters {
        params.insert(name.clone(), serde_json::json!([b.min, b.max]));
    }
    let catalog = serde_json::json!([{
        "blueprint_id": id, "name": descriptor.name, "tier": "BLUEPRINT_TIER_HIGH_RISK",
        "quarantine_only": true, "allowed_parameters": params,
    }]);
    let catalog_path = work.path().join("catalog.json");
    std::fs::write(&catalog_path, catalog.to_string()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tezzeret"));
    cmd.args(["forge", "--json", "--device", "cpu", "--budget", budget, "--state"])
        .arg(work.path().join("state"))
        .arg("--catalog")
        .arg(&catalog_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if allow {
        cmd.arg("--allow-quarantine");
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    // The process must end by itself, well within two minutes.
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{id}: the forge hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let expected_exit = if allow { 1 } else { 0 };
    assert_eq!(out.status.code(), Some(expected_exit), "{id}: {}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["artifacts"][0].clone()
}

fn caught(id: &str, reason: &str) {
    caught_by(id, &[reason]);
}

/// As [`caught`], for a hazard that either of `reasons` may catch.
fn caught_by(id: &str, reasons: &[&str]) {
    let budget = if reasons.contains(&"budget_exceeded") { "2" } else { "60" };
    let entry = forge_hazard(id, true, budget);
    assert_eq!(entry["status"], "failed", "{id}: {entry}");
    // The typed reason, matched exactly: `budget_exceeded` is not
    // `memory_budget_exceeded`, though one name contains the other.
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reasons.contains(&reason), "{id} should fail with one of {reasons:?}: {entry}");
}

#[test]
fn hazards_are_refused_by_default() {
    let entry = forge_hazard("BP045", false, "60");
    assert_eq!(entry["status"], "refused");
    assert!(entry["error"].as_str().unwrap().contains("quarantine-only"));
}

#[test]
fn exploding_gradient_fails_the_magnitude_check() {
    caught("BP043", "magnitude_exceeded");
}

#[test]
fn vanishing_gradient_fails_the_magnitude_check() {
    caught("BP044", "vanishing_output");
}

#[test]
fn nan_injection_fails_numeric_validation() {
    caught("BP045", "non_finite_output");
}

#[test]
fn infinite_loop_exceeds_its_budget() {
    caught("BP046", "budget_exceeded");
}

#[test]
fn memory_leak_exceeds_the_memory_budget() {
    caught("BP047", "memory_budget_exceeded");
}

#[test]
fn deadlock_pattern_exceeds_its_budget() {
    caught("BP048", "budget_exceeded");
}

#[test]
fn race_condition_fails_the_determinism_check() {
    // The race usually makes the two eager runs disagree; when they happen
    // to agree, the compiled run disagrees with them instead.
    caught_by("BP049", &["nondeterministic_output", "numeric_mismatch"]);
}

#[test]
fn adversarial_noise_fails_the_determinism_check() {
    caught("BP050", "nondeterministic_output");
}

/// This process's threads named after jobs of `id` (threads a job starts
/// inherit its name).
fn job_threads(id: &str) -> usize {
    let name = format!("tz-{id}");
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

#[test]
fn abandoned_jobs_end_their_threads_in_process() {
    let catalog = Catalog::default_catalog();
    for id in ["BP046", "BP048"] {
        let job = CompileJob::new(catalog.get(id).unwrap().clone(), Strategy::Fast);
        let started = Instant::now();
        let err = compile::compile_within(job, Duration::from_millis(500), None).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BudgetExceeded, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "the caller is answered at the budget");
        // The worker (and the hazard's own threads) notice and end.
        let deadline = Instant::now() + Duration::from_secs(20);
        while job_threads(id) > 0 {
            assert!(Instant::now() < deadline, "{id}: abandoned job thread still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
