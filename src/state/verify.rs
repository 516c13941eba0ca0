//! Offline inspection and verification of a state directory (what
//! `tezzeret inspect`, `wal` and `verify` show). Reads only: safe beside a
//! running forge, never modifies anything.
use std::path::Path;

use super::artifact::ArtifactRecord;
use super::guard_table::{GuardEntry, GuardTable, Lookup};
use super::layout::StateLayout;
use super::signing::KeyRing;
use super::store::ArtifactStore;
use super::wal::journal::{replay, JournalState};
use super::wal::log::{read_only, Recovery};
use crate::base::error::Result;

/// The guard-table entry of a stored artifact.
pub fn guard_entry(record: &ArtifactRecord) -> Result<GuardEntry> {
    GuardEntry::new(&record.blueprint_id, &record.checksum, &record.guard_digest, &record.device, record.dynamic_batch, &record.guard_spec)
}

/// The recovered journal of a state directory, read-only.
pub fn read_journal(state_dir: &Path) -> Result<(Recovery, JournalState)> {
    let path = StateLayout::new(state_dir).wal();
    if !path.exists() {
        return Ok((Recovery::default(), JournalState::default()));
    }
    let recovery = read_only(&path)?;
    let state = replay(&recovery)?;
    Ok((recovery, state))
}

/// The outcome of verifying a state directory.
#[derive(Debug, Default)]
pub struct Verification {
    /// Artifacts checked.
    pub checked: usize,
    /// One line per problem, naming the artifact and what is wrong.
    pub problems: Vec<String>,
}

/// Re-checks every current artifact: its file's sha256, its manifest, its
/// guard slot (present, equal to the stored metadata, digest consistent),
/// and that the guard table holds nothing else.
pub fn verify_state(state_dir: &Path) -> Result<Verification> {
    verify_state_with_keys(state_dir, &KeyRing::default())
}

/// As [`verify_state`], also checking each artifact's manifest signature
/// against `keys`' trusted keys (when it has any).
pub fn verify_state_with_keys(state_dir: &Path, keys: &KeyRing) -> Result<Verification> {
    let (_, state) = read_journal(state_dir)?;
    let layout = StateLayout::new(state_dir);
    let store = ArtifactStore::open_existing(&layout)?;
    let guards = GuardTable::open_read_only(&layout.guards());
    let mut out = Verification::default();
    for (id, record) in &state.artifacts {
        out.checked += 1;
        if let Err(e) = store.verify(record) {
            out.problems.push(format!("{id}: {}", e.message()));
        }
        match store.manifest(&record.cache_key) {
            Some(manifest) if manifest == *record => {}
            Some(_) => out.problems.push(format!("{id}: manifest {} differs from the journal", record.cache_key)),
            None => out.problems.push(format!("{id}: manifest {} missing", record.cache_key)),
        }
        if let Err(e) = keys.verify(record) {
            out.problems.push(format!("{id}: {}", e.message()));
        }
        if record.guard_spec.digest() != record.guard_digest {
            out.problems.push(format!("{id}: guard digest does not match its guard spec"));
        }
        match &guards {
            Ok(table) => match table.lookup(id) {
                Ok(Lookup::Found(entry)) => match guard_entry(record) {
                    Ok(expected) if expected == entry && entry.digest_matches() => {}
                    _ => out.problems.push(format!("{id}: guard slot differs from the stored artifact")),
                },
                Ok(Lookup::Missing) => out.problems.push(format!("{id}: no guard slot")),
                Err(e) => out.problems.push(format!("{id}: guard slot unreadable: {}", e.message())),
            },
            Err(e) => out.problems.push(format!("{id}: guard table unreadable: {}", e.message())),
        }
    }
    if let Ok(table) = &guards {
        let (entries, damaged) = table.entries();
        for entry in entries.iter().filter(|e| !state.artifacts.contains_key(&e.blueprint_id)) {
            out.problems.push(format!("{}: guard slot without a stored artifact", entry.blueprint_id));
        }
        if damaged > 0 {
            out.problems.push(format!("guard table: {damaged} damaged slot(s)"));
        }
    }
    Ok(out)
}
