//! The names of everything inside a state directory, in one place.
//!
//! | path | what |
//! | --- | --- |
//! | `LOCK` | the exclusive lock (`flock`) of the forge that owns the directory |
//! | `wal.log` | the write-ahead log |
//! | `wal.compact` | a checkpoint being written (renamed over `wal.log`) |
//! | `guards.tbl` | the guard table hosts read |
//! | `guards.new` | a guard table being created (renamed over `guards.tbl`) |
//! | `artifacts/<sha256>.pt` | artifact files, content-addressed |
//! | `manifests/<cache key>.json` | one signed manifest per cached artifact |
use std::path::{Path, PathBuf};

/// The files of one state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    /// The layout of the state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateLayout { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock file.
    pub fn lock(&self) -> PathBuf {
        self.root.join("LOCK")
    }

    /// The write-ahead log.
    pub fn wal(&self) -> PathBuf {
        self.root.join("wal.log")
    }

    /// The guard table.
    pub fn guards(&self) -> PathBuf {
        self.root.join("guards.tbl")
    }

    /// The directory of artifact files.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// The directory of manifests.
    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// The file name of an artifact with this sha256 (hex).
    pub fn artifact_file_name(checksum: &str) -> String {
        format!("{checksum}.pt")
    }

    /// An artifact file by its file name.
    pub fn artifact(&self, file_name: &str) -> PathBuf {
        self.artifacts_dir().join(file_name)
    }

    /// The manifest of a cache key.
    pub fn manifest(&self, cache_key: &str) -> PathBuf {
        self.manifests_dir().join(format!("{cache_key}.json"))
    }
}

/// A second name a guard table keeps while it is being replaced
/// (`guards.old`): a writer killed before marking it superseded leaves the
/// name, and the next writer marks it then, so readers still on it move on.
pub fn retired_of(path: &Path) -> PathBuf {
    path.with_extension("old")
}

/// Where a file that replaces `path` by rename is written first: the WAL's
/// checkpoint (`wal.compact`) and a new guard table (`guards.new`).
pub fn replacement_of(path: &Path) -> PathBuf {
    match path.extension().and_then(|e| e.to_str()) {
        Some("log") => path.with_extension("compact"),
        _ => path.with_extension("new"),
    }
}
