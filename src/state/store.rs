//! The artifact store: content-addressed artifact files and their manifests,
//! each written durably (temp file, fsync, rename, directory fsync).
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::artifact::{checksum_of, ArtifactRecord};
use super::layout::StateLayout;
use crate::base::error::{Error, ErrorCode, FailureReason, Result};
use crate::sys::fs::{durable_write_all, remove_temp_files, sync_dir, touch};

/// Artifact files and their manifests under a state directory:
/// `artifacts/<sha256>.pt` (content-addressed) and
/// `manifests/<cache key>.json` (the [`ArtifactRecord`]). Which artifact is
/// current for each blueprint is the journal's business, not the store's.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    layout: StateLayout,
}

impl ArtifactStore {
    /// Opens (creating if needed) the store of a state directory and
    /// removes leftovers of interrupted writes.
    pub fn open(layout: &StateLayout) -> Result<Self> {
        for dir in [layout.artifacts_dir(), layout.manifests_dir()] {
            fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            remove_temp_files(&dir)?;
            // Renames a killed process made but never synced are made
            // durable before anything is adopted from them.
            sync_dir(&dir)?;
        }
        sync_dir(layout.root())?;
        Ok(ArtifactStore { layout: layout.clone() })
    }

    /// Opens an existing store without creating or cleaning anything.
    pub fn open_existing(layout: &StateLayout) -> Result<Self> {
        if !layout.artifacts_dir().is_dir() {
            return Err(Error::new(ErrorCode::NotFound, format!("{} holds no artifact store", layout.root().display())));
        }
        Ok(ArtifactStore { layout: layout.clone() })
    }

    /// Stores an artifact file and its manifest, `record` — already complete
    /// (checksum, file name, size, signature) and describing `bytes`. Both
    /// are durable when this returns: the artifact first, then the manifest
    /// that points at it. An artifact file already present under the same
    /// name is reused only if its content hashes to the checksum; a damaged
    /// one is replaced.
    pub fn put(&self, record: &ArtifactRecord, bytes: &[u8]) -> Result<()> {
        self.put_all(&[(record, bytes)])
    }

    /// Stores several artifacts as [`Self::put`] does each, in one durable
    /// write: what they share (the directories' syncs) is done once.
    pub fn put_all(&self, artifacts: &[(&ArtifactRecord, &[u8])]) -> Result<()> {
        /// One record's files, planned before anything is written.
        struct Planned<'a> {
            artifact_path: PathBuf,
            manifest_path: PathBuf,
            manifest: Vec<u8>,
            bytes: &'a [u8],
            /// False when the artifact file is already intact (on disk, or
            /// written by an earlier record of the batch).
            write_artifact: bool,
        }
        let mut planned: Vec<Planned> = Vec::with_capacity(artifacts.len());
        for &(record, bytes) in artifacts {
            let checksum = checksum_of(bytes);
            if checksum != record.checksum || record.artifact_file != StateLayout::artifact_file_name(&checksum) {
                return Err(Error::new(
                    ErrorCode::Internal,
                    format!("record of {} does not describe the bytes to store (sha256 {checksum})", record.blueprint_id),
                ));
            }
            let (path, manifest_path) = (self.artifact_path(record), self.layout.manifest(&record.cache_key));
            // One write per file: a cache key given twice is stored once
            // (its first record), an artifact two cache keys share once.
            if planned.iter().any(|p| p.manifest_path == manifest_path) {
                continue;
            }
            let written = planned.iter().any(|p| p.artifact_path == path);
            let intact = written || fs::read(&path).is_ok_and(|existing| checksum_of(&existing) == checksum);
            let manifest = serde_json::to_vec_pretty(record).expect("records serialise");
            planned.push(Planned { artifact_path: path, manifest_path, manifest, bytes, write_artifact: !intact });
        }
        // The artifacts are durable (renamed, their directory synced)
        // before any manifest is written: a manifest never names an
        // artifact that is not there, even after a power loss.
        let artifacts: Vec<(&Path, &[u8])> = planned.iter().filter(|p| p.write_artifact).map(|p| (p.artifact_path.as_path(), p.bytes)).collect();
        let manifests: Vec<(&Path, &[u8])> = planned.iter().map(|p| (p.manifest_path.as_path(), p.manifest.as_slice())).collect();
        durable_write_all(&artifacts)?;
        durable_write_all(&manifests)
    }

    /// The manifest stored for a cache key, if any (and readable).
    pub fn manifest(&self, cache_key: &str) -> Option<ArtifactRecord> {
        let bytes = fs::read(self.layout.manifest(cache_key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every readable manifest.
    pub fn manifests(&self) -> Vec<ArtifactRecord> {
        let Ok(entries) = fs::read_dir(self.layout.manifests_dir()) else { return Vec::new() };
        let mut out: Vec<ArtifactRecord> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.cache_key.cmp(&b.cache_key));
        out
    }

    /// Every readable manifest with its last use (the manifest's mtime,
    /// refreshed by [`Self::touch`]).
    pub fn cache_entries(&self) -> Vec<(ArtifactRecord, std::time::SystemTime)> {
        self.manifests()
            .into_iter()
            .filter_map(|r| {
                let used = fs::metadata(self.layout.manifest(&r.cache_key)).and_then(|m| m.modified()).ok()?;
                Some((r, used))
            })
            .collect()
    }

    /// Marks a cache entry as used now (sets its manifest's mtime; best
    /// effort, not synced: last-use times only steer eviction).
    pub fn touch(&self, cache_key: &str) {
        touch(&self.layout.manifest(cache_key));
    }

    /// Removes a cached artifact: its manifest, and its file unless another
    /// manifest still points at it.
    pub fn remove(&self, record: &ArtifactRecord) -> Result<()> {
        let manifest = self.layout.manifest(&record.cache_key);
        match fs::remove_file(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", manifest.display()), e)),
        }
        if !self.manifests().iter().any(|m| m.checksum == record.checksum) {
            let _ = fs::remove_file(self.artifact_path(record));
        }
        sync_dir(&self.layout.manifests_dir())
    }

    /// Removes what interrupted writes left behind: temp files, and
    /// artifact files named by no manifest and not in `referenced` (an
    /// artifact stored just before a crash whose manifest never landed; a
    /// job needing it compiles the same bytes again). Call it only while no
    /// write is in progress (the forge holds the state lock and is between
    /// jobs). Returns how many files went.
    pub fn remove_debris(&self, referenced: &BTreeSet<String>) -> Result<usize> {
        let mut removed = 0;
        for dir in [self.layout.artifacts_dir(), self.layout.manifests_dir()] {
            removed += remove_temp_files(&dir)?;
        }
        let named: BTreeSet<String> = self.manifests().into_iter().map(|m| m.artifact_file).collect();
        let dir = self.layout.artifacts_dir();
        let entries = fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pt") && !named.contains(&name) && !referenced.contains(&name) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&dir)?;
            sync_dir(&self.layout.manifests_dir())?;
        }
        Ok(removed)
    }

    /// Absolute path of a record's artifact file.
    pub fn artifact_path(&self, record: &ArtifactRecord) -> PathBuf {
        self.layout.artifact(&record.artifact_file)
    }

    /// Reads a record's artifact file and checks its sha256; returns the bytes.
    pub fn read_verified(&self, record: &ArtifactRecord) -> Result<Vec<u8>> {
        let path = self.artifact_path(record);
        let bytes = fs::read(&path).map_err(|e| {
            Error::failure(
                ErrorCode::NotFound,
                FailureReason::ArtifactNotFound,
                format!("artifact of {} ({}) unreadable: {e}", record.blueprint_id, path.display()),
            )
        })?;
        let actual = checksum_of(&bytes);
        if actual != record.checksum {
            return Err(Error::failure(
                ErrorCode::Corrupt,
                FailureReason::ChecksumMismatch,
                format!("artifact of {} ({}) has sha256 {actual}, expected {}", record.blueprint_id, path.display(), record.checksum),
            ));
        }
        Ok(bytes)
    }

    /// Re-reads a record's artifact and checks its sha256.
    pub fn verify(&self, record: &ArtifactRecord) -> Result<()> {
        self.read_verified(record).map(drop)
    }
}
