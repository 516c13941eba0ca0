//! What the forge reports: the outcome of each job, progress while it
//! runs, what refresh and maintenance did, and the JSON shape of a catalog
//! entry shared by the CLI (`forge --json`, `inspect --json`) and the C ABI
//! (`tezzeret_forge_catalog_json`).
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::observe::CacheStats;
use crate::base::error::Error;
use crate::state::artifact::ArtifactRecord;
use crate::state::store::ArtifactStore;

/// Outcome of one blueprint in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Compiled and stored in this run.
    Ok,
    /// A stored artifact with the same cache key was reused.
    Cached,
    /// Compilation or storage failed.
    Failed,
    /// Refused (quarantine-only blueprint with quarantine compilation off).
    Refused,
}

impl JobStatus {
    /// Lowercase name (`ok`, `cached`, `failed`, `refused`).
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Ok => "ok",
            JobStatus::Cached => "cached",
            JobStatus::Failed => "failed",
            JobStatus::Refused => "refused",
        }
    }
}

/// The report of one blueprint in a run.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The blueprint.
    pub blueprint_id: String,
    /// Its name.
    pub name: String,
    /// Outcome.
    pub status: JobStatus,
    /// The stored record (for `Ok` and `Cached`).
    pub record: Option<ArtifactRecord>,
    /// Absolute path of the artifact (for `Ok` and `Cached`).
    pub artifact_path: Option<PathBuf>,
    /// Why it failed or was refused.
    pub error: Option<Error>,
    /// When its compile ran on its worker (start, end), if it compiled.
    pub compiled_during: Option<(std::time::Instant, std::time::Instant)>,
}

/// Progress notifications of [`Forge::run`](crate::forge::Forge::run).
#[derive(Debug)]
pub enum Progress<'a> {
    /// Jobs are durably enqueued (acknowledged): (blueprint id, sequence number).
    Queued(&'a [(String, u64)]),
    /// A job is about to be processed: (position, total, blueprint id).
    Started(usize, usize, &'a str),
    /// A job starts compiling (no durable artifact of its cache key exists):
    /// (blueprint id, cache key).
    Compiling(&'a str, &'a str),
    /// A job finished.
    Finished(usize, usize, &'a JobReport),
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaintenanceReport {
    /// The cache after expiry and eviction.
    pub cache: CacheStats,
    /// Queued jobs that left the queue as stale.
    pub expired_jobs: usize,
    /// Files of interrupted writes removed.
    pub debris_removed: usize,
}

/// What a refresh found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshReport {
    /// New or changed descriptors, now durably queued.
    pub queued: Vec<String>,
    /// Descriptors no longer enumerated (their artifacts stay; reported, not dropped).
    pub removed: Vec<String>,
}


/// One entry: the fields `forge --json` and `inspect --json` print.
/// `error` is the error's text and `reason` its machine-readable reason
/// (`budget_exceeded`, `checksum_mismatch`, …), both null without an error.
pub fn entry(blueprint_id: &str, status: JobStatus, record: Option<&ArtifactRecord>, store: &ArtifactStore, error: Option<&Error>) -> Value {
    json!({
        "blueprint_id": blueprint_id,
        "status": status.name(),
        "artifact_path": record.map(|r| store.artifact_path(r).display().to_string()),
        "checksum": record.map(|r| r.checksum.clone()),
        "guard_spec": record.map(|r| serde_json::to_value(&r.guard_spec).expect("guard spec serialises")),
        "guard_digest": record.map(|r| r.guard_digest.clone()),
        "dynamic_batch": record.map(|r| r.dynamic_batch),
        "strategy": record.map(|r| r.strategy.clone()),
        "variant": record.map(|r| r.variant.clone()),
        "compile_ms": record.map(|r| r.compile_ms),
        "prewarm_p50_ms": record.map(|r| r.prewarm_p50_ms),
        "prewarm_p95_ms": record.map(|r| r.prewarm_p95_ms),
        "error": error.map(|e| e.to_string()),
        "reason": error.map(|e| e.reason_name()),
    })
}

/// The document of a forge run.
pub fn run_document(reports: &[JobReport], store: &ArtifactStore) -> Value {
    let artifacts: Vec<Value> = reports
        .iter()
        .map(|r| entry(&r.blueprint_id, r.status, r.record.as_ref(), store, r.error.as_ref()))
        .collect();
    json!({ "artifacts": artifacts })
}

/// The document of the stored catalog (every current artifact is `ok`).
pub fn stored_document(artifacts: &BTreeMap<String, ArtifactRecord>, store: &ArtifactStore) -> Value {
    let artifacts: Vec<Value> =
        artifacts.values().map(|r| entry(&r.blueprint_id, JobStatus::Ok, Some(r), store, None)).collect();
    json!({ "artifacts": artifacts })
}
