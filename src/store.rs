//! The artifact store: content-addressed artifact files written durably
//! (temp file, fsync, rename, directory fsync) and an index of the stored
//! catalog, rewritten the same way.
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guard::{hex, GuardSpec};
use crate::{Error, ErrorCode, Result};

/// Version of the index file's layout.
pub const INDEX_FORMAT_VERSION: u32 = 1;

/// What the store knows about one blueprint's current artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The blueprint.
    pub blueprint_id: String,
    /// The blueprint's name.
    pub name: String,
    /// sha256 hex of the descriptor's canonical encoding.
    pub descriptor_hash: String,
    /// Parameter values compiled with.
    pub params: BTreeMap<String, f64>,
    /// Strategy name.
    pub strategy: String,
    /// Pipeline variant that produced the bytes.
    pub variant: String,
    /// Device name.
    pub device: String,
    /// Cache key (SPEC R4).
    pub cache_key: String,
    /// File name inside the store's `artifacts/` directory.
    pub artifact_file: String,
    /// sha256 hex of the artifact file.
    pub checksum: String,
    /// Artifact size in bytes.
    pub size_bytes: u64,
    /// Input guards.
    pub guard_spec: GuardSpec,
    /// Digest of the guard spec.
    pub guard_digest: String,
    /// Validated at several batch sizes: accepts any size in dim 0.
    #[serde(default)]
    pub dynamic_batch: bool,
    /// Compile wall time, ms.
    pub compile_ms: f64,
    /// Pre-warm median, ms.
    pub prewarm_p50_ms: f64,
    /// Pre-warm 95th percentile, ms.
    pub prewarm_p95_ms: f64,
    /// Library version that compiled it.
    pub tezzeret_version: String,
    /// Torch version it was compiled with.
    pub torch_version: String,
    /// Artifact format version.
    pub format_version: u32,
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    format_version: u32,
    records: Vec<ArtifactRecord>,
}

/// Artifact files and their index under a state directory.
#[derive(Debug)]
pub struct ArtifactStore {
    root: PathBuf,
    records: BTreeMap<String, ArtifactRecord>,
}

impl ArtifactStore {
    /// Opens (creating if needed) the store under `state_dir`, removing
    /// leftovers of interrupted writes and loading the index.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let artifacts = state_dir.join("artifacts");
        fs::create_dir_all(&artifacts).map_err(|e| Error::io(format!("create {}", artifacts.display()), e))?;
        sync_dir(state_dir)?;
        for dir in [state_dir, artifacts.as_path()] {
            remove_temp_files(dir)?;
        }
        let index_path = state_dir.join("index.json");
        let records = match fs::read(&index_path) {
            Ok(bytes) => {
                let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::new(ErrorCode::Corrupt, format!("artifact index {} is corrupt: {e}", index_path.display()))
                })?;
                if index.format_version != INDEX_FORMAT_VERSION {
                    return Err(Error::new(
                        ErrorCode::Corrupt,
                        format!(
                            "artifact index {} has format version {}, this library reads {INDEX_FORMAT_VERSION}",
                            index_path.display(),
                            index.format_version
                        ),
                    ));
                }
                index.records.into_iter().map(|r| (r.blueprint_id.clone(), r)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(format!("read {}", index_path.display()), e)),
        };
        Ok(ArtifactStore { root: state_dir.to_path_buf(), records })
    }

    /// Stores an artifact file (content-addressed by its sha256) and makes
    /// `record` (whose file fields are filled in here) current for its
    /// blueprint. Both are durable when this returns.
    pub fn put(&mut self, mut record: ArtifactRecord, bytes: &[u8]) -> Result<ArtifactRecord> {
        let checksum = hex(&Sha256::digest(bytes));
        let file_name = format!("{checksum}.pt");
        let path = self.root.join("artifacts").join(&file_name);
        if !path.exists() {
            durable_write(&path, bytes)?;
        }
        record.artifact_file = file_name;
        record.checksum = checksum;
        record.size_bytes = bytes.len() as u64;
        let previous = self.records.insert(record.blueprint_id.clone(), record.clone());
        if let Err(e) = self.write_index() {
            match previous {
                Some(p) => self.records.insert(p.blueprint_id.clone(), p),
                None => self.records.remove(&record.blueprint_id),
            };
            return Err(e);
        }
        Ok(record)
    }

    fn write_index(&self) -> Result<()> {
        let index = IndexFile { format_version: INDEX_FORMAT_VERSION, records: self.records.values().cloned().collect() };
        let bytes = serde_json::to_vec_pretty(&index).expect("index serialises");
        durable_write(&self.root.join("index.json"), &bytes)
    }

    /// The current record of a blueprint.
    pub fn get(&self, blueprint_id: &str) -> Option<&ArtifactRecord> {
        self.records.get(blueprint_id)
    }

    /// All current records, sorted by blueprint id.
    pub fn records(&self) -> impl Iterator<Item = &ArtifactRecord> {
        self.records.values()
    }

    /// Absolute path of a record's artifact file.
    pub fn artifact_path(&self, record: &ArtifactRecord) -> PathBuf {
        self.root.join("artifacts").join(&record.artifact_file)
    }

    /// Re-reads a record's artifact and checks its sha256.
    pub fn verify(&self, record: &ArtifactRecord) -> Result<()> {
        let path = self.artifact_path(record);
        let bytes = fs::read(&path).map_err(|e| {
            Error::new(ErrorCode::NotFound, format!("artifact of {} ({}) unreadable: {e}", record.blueprint_id, path.display()))
        })?;
        let actual = hex(&Sha256::digest(&bytes));
        if actual != record.checksum {
            return Err(Error::new(
                ErrorCode::Corrupt,
                format!(
                    "checksum_mismatch: artifact of {} ({}) has sha256 {actual}, expected {}",
                    record.blueprint_id,
                    path.display(),
                    record.checksum
                ),
            ));
        }
        Ok(())
    }
}

/// Writes a file durably: temp file in the same directory, fsync, rename
/// over the target, fsync of the directory.
pub fn durable_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| Error::invalid(format!("{} has no parent directory", path.display())))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dir.join(format!(".tmp-{}-{name}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(|e| Error::io(format!("create {}", temp.display()), e))?;
        file.write_all(bytes).map_err(|e| Error::io(format!("write {}", temp.display()), e))?;
        file.sync_all().map_err(|e| Error::io(format!("fsync {}", temp.display()), e))?;
        fs::rename(&temp, path).map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// fsyncs a directory so a create/rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

fn remove_temp_files(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}
