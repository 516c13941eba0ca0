//! The JSON shape of a catalog entry shared by the CLI (`forge --json`,
//! `inspect --json`) and the C ABI (`tezzeret_forge_catalog_json`).
use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::forge::{JobReport, JobStatus};
use crate::store::{ArtifactRecord, ArtifactStore};

/// One entry with the fields of SPEC §13.
pub fn entry(blueprint_id: &str, status: JobStatus, record: Option<&ArtifactRecord>, store: &ArtifactStore, error: Option<String>) -> Value {
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
        "error": error,
    })
}

/// The document of a forge run.
pub fn run_document(reports: &[JobReport], store: &ArtifactStore) -> Value {
    let artifacts: Vec<Value> = reports
        .iter()
        .map(|r| entry(&r.blueprint_id, r.status, r.record.as_ref(), store, r.error.as_ref().map(|e| e.to_string())))
        .collect();
    json!({ "artifacts": artifacts })
}

/// The document of the stored catalog (every current artifact is `ok`).
pub fn stored_document(artifacts: &BTreeMap<String, ArtifactRecord>, store: &ArtifactStore) -> Value {
    let artifacts: Vec<Value> =
        artifacts.values().map(|r| entry(&r.blueprint_id, JobStatus::Ok, Some(r), store, None)).collect();
    json!({ "artifacts": artifacts })
}
