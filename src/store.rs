//! The artifact store: content-addressed artifact files and their manifests,
//! each written durably (temp file, fsync, rename, directory fsync).
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::failpoint;
use crate::signing::{KeyRing, Manifest};
use crate::guard::{hex, GuardSpec};
use crate::{Error, ErrorCode, Result};

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
    /// Per-blueprint revision: increases each time a changed input is recompiled.
    #[serde(default)]
    pub revision: u64,
    /// ed25519 signature of the artifact's manifest, when signing is configured.
    #[serde(default)]
    pub signature: Option<crate::signing::ManifestSignature>,
}

/// Artifact files and their manifests under a state directory:
/// `artifacts/<sha256>.pt` (content-addressed) and
/// `manifests/<cache key>.json` (the [`ArtifactRecord`]). Which artifact is
/// current for each blueprint is the journal's business, not the store's.
#[derive(Debug)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating if needed) the store under `state_dir` and removes
    /// leftovers of interrupted writes.
    pub fn open(state_dir: &Path) -> Result<Self> {
        for sub in ["artifacts", "manifests"] {
            let dir = state_dir.join(sub);
            fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            remove_temp_files(&dir)?;
        }
        sync_dir(state_dir)?;
        Ok(ArtifactStore { root: state_dir.to_path_buf() })
    }

    /// Opens an existing store without creating or cleaning anything.
    pub fn open_existing(state_dir: &Path) -> Result<Self> {
        if !state_dir.join("artifacts").is_dir() {
            return Err(Error::new(ErrorCode::NotFound, format!("{} holds no artifact store", state_dir.display())));
        }
        Ok(ArtifactStore { root: state_dir.to_path_buf() })
    }

    /// Stores an artifact file and its manifest (`record`, whose file
    /// fields — and signature, when `keys` can sign — are filled in here).
    /// Both are durable when this returns: the artifact first, then the
    /// manifest that points at it.
    pub fn put(&self, mut record: ArtifactRecord, bytes: &[u8], keys: &KeyRing) -> Result<ArtifactRecord> {
        let checksum = hex(&Sha256::digest(bytes));
        let file_name = format!("{checksum}.pt");
        let path = self.root.join("artifacts").join(&file_name);
        let stored = path.exists() && fs::metadata(&path).map(|m| m.len()).ok() == Some(bytes.len() as u64);
        record.artifact_file = file_name;
        record.checksum = checksum;
        record.size_bytes = bytes.len() as u64;
        record.signature = keys.sign(&Manifest::of(&record));
        let manifest = serde_json::to_vec_pretty(&record).expect("records serialise");
        let manifest_path = self.manifest_path(&record.cache_key);
        // The artifact is renamed into place before its manifest: a manifest
        // never names an artifact that is not there.
        let mut files: Vec<(&Path, &[u8])> = Vec::with_capacity(2);
        if !stored {
            files.push((&path, bytes));
        }
        files.push((&manifest_path, &manifest));
        durable_write_all(&files)?;
        Ok(record)
    }

    fn manifest_path(&self, cache_key: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{cache_key}.json"))
    }

    /// The manifest stored for a cache key, if any (and readable).
    pub fn manifest(&self, cache_key: &str) -> Option<ArtifactRecord> {
        let bytes = fs::read(self.manifest_path(cache_key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every readable manifest.
    pub fn manifests(&self) -> Vec<ArtifactRecord> {
        let Ok(entries) = fs::read_dir(self.root.join("manifests")) else { return Vec::new() };
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
                let used = fs::metadata(self.manifest_path(&r.cache_key)).and_then(|m| m.modified()).ok()?;
                Some((r, used))
            })
            .collect()
    }

    /// Marks a cache entry as used now (sets its manifest's mtime; best
    /// effort, not synced: last-use times only steer eviction).
    pub fn touch(&self, cache_key: &str) {
        if let Ok(path) = std::ffi::CString::new(self.manifest_path(cache_key).as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid path; NULL times means "now".
            unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), std::ptr::null(), 0) };
        }
    }

    /// Removes a cached artifact: its manifest, and its file unless another
    /// manifest still points at it.
    pub fn remove(&self, record: &ArtifactRecord) -> Result<()> {
        let manifest = self.manifest_path(&record.cache_key);
        match fs::remove_file(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", manifest.display()), e)),
        }
        if !self.manifests().iter().any(|m| m.checksum == record.checksum) {
            let _ = fs::remove_file(self.artifact_path(record));
        }
        sync_dir(&self.root.join("manifests"))
    }

    /// Removes what interrupted writes left behind (SPEC R10): temp files,
    /// and artifact files named by no manifest and not in `referenced` (an
    /// artifact stored just before a crash whose manifest never landed; a
    /// job needing it compiles the same bytes again). Call it only while no
    /// write is in progress (the forge holds the state lock and is between
    /// jobs). Returns how many files went.
    pub fn remove_debris(&self, referenced: &std::collections::BTreeSet<String>) -> Result<usize> {
        let mut removed = 0;
        for sub in ["artifacts", "manifests"] {
            removed += remove_temp_files(&self.root.join(sub))?;
        }
        let named: std::collections::BTreeSet<String> = self.manifests().into_iter().map(|m| m.artifact_file).collect();
        let dir = self.root.join("artifacts");
        let entries = fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pt") && !named.contains(&name) && !referenced.contains(&name) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&dir)?;
            sync_dir(&self.root.join("manifests"))?;
        }
        Ok(removed)
    }

    /// Absolute path of a record's artifact file.
    pub fn artifact_path(&self, record: &ArtifactRecord) -> PathBuf {
        self.root.join("artifacts").join(&record.artifact_file)
    }

    /// Re-reads a record's artifact and checks its sha256.
    pub fn verify(&self, record: &ArtifactRecord) -> Result<()> {
        let path = self.artifact_path(record);
        let bytes = fs::read(&path).map_err(|e| {
            Error::new(ErrorCode::NotFound, format!("artifact_not_found: artifact of {} ({}) unreadable: {e}", record.blueprint_id, path.display()))
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
    durable_write_all(&[(path, bytes)])
}

/// Writes several files durably, in their order, sharing the syncs a
/// journaling file system can share: every temp file is written and
/// fsynced first, then all are renamed, then each directory is fsynced
/// once (the first directory fsync usually commits every rename). When it
/// returns Ok, every file is durable under its name; on error no temp file
/// is left and no target is partly written.
pub fn durable_write_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut temps = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, bytes) in files {
            let dir = path.parent().ok_or_else(|| Error::invalid(format!("{} has no parent directory", path.display())))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            let temp = dir.join(format!(".tmp-{}-{name}", std::process::id()));
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(|e| Error::io(format!("create {}", temp.display()), e))?;
            temps.push(temp.clone());
            failpoint::hit("store.write")
                .and_then(|_| file.write_all(bytes))
                .map_err(|e| Error::io(format!("write {}", temp.display()), e))?;
            failpoint::hit("store.fsync")
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::io(format!("fsync {}", temp.display()), e))?;
        }
        for ((path, _), temp) in files.iter().zip(&temps) {
            failpoint::hit("store.rename")
                .and_then(|_| fs::rename(temp, path))
                .map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
        }
        let mut synced: Vec<&Path> = Vec::new();
        for (path, _) in files {
            let dir = path.parent().expect("checked above");
            if !synced.contains(&dir) {
                failpoint::hit("store.fsync_dir").map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))?;
                sync_dir(dir)?;
                synced.push(dir);
            }
        }
        Ok(())
    })();
    if result.is_err() {
        for temp in &temps {
            let _ = fs::remove_file(temp);
        }
    }
    result
}

/// fsyncs a directory so a create/rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Removes the temp files of interrupted writes in `dir`; returns how many.
fn remove_temp_files(dir: &Path) -> Result<usize> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
