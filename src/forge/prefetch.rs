//! Prefetch answers: whether a blueprint's current artifact is ready, and
//! proof that the file is the one that was verified, without re-hashing it
//! on every request.
//!
//! When an artifact is hashed (and its signature checked) the file's
//! identity — device, inode, size, mtime and ctime — is recorded with the
//! time of the check. Later answers trust that record only while a `stat`
//! returns the same identity *and* the file's timestamps are older than the
//! check by more than the file system's timestamp granularity. The second
//! condition is git's rule for "racily clean" index entries: timestamps
//! advance in ticks, so a write in the same tick as the check could leave
//! every timestamp unchanged; such a file is hashed again on its next use.
//!
//! The prefetcher keeps its own copy of the current catalog, which the
//! forge updates as artifacts become current or leave, so that answers
//! need no lock on the forge: a host's or the bus's prefetch is answered
//! while a compile holds the forge.
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::base::error::{ErrorCode, FailureReason};
pub use crate::base::leyline::PrefetchAnswer;
use crate::base::leyline::{KernelArtifactError, KernelArtifactReady, KernelPrefetchRequest};
use crate::state::artifact::ArtifactRecord;
use crate::state::signing::KeyRing;
use crate::state::store::ArtifactStore;

/// How much older than its verification a file's timestamps must be for
/// the verification to be trusted later, on a file system that keeps
/// sub-second timestamps: above the kernel's coarse clock tick (at most
/// 10 ms, at HZ=100), which ext4, xfs, btrfs and tmpfs stamp files with.
pub const FINE_TIMESTAMP_GRANULARITY: Duration = Duration::from_millis(20);
/// The same on a file system that keeps whole seconds (ext3, FAT's 2 s),
/// recognised by timestamps without a fraction.
pub const TIMESTAMP_GRANULARITY: Duration = Duration::from_secs(2);

/// Identity of a file's content as the kernel reports it: any write to it
/// changes its mtime and ctime (ctime cannot be set from user space) and a
/// replacement by rename changes its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }

    /// The timestamp granularity this file's file system shows: whole
    /// seconds when neither timestamp has a fraction (a fine-grained file
    /// system shows that too, rarely: it then waits longer, never less).
    fn granularity(&self) -> Duration {
        let whole = |ns: i128| ns % 1_000_000_000 == 0;
        if whole(self.mtime_ns) && whole(self.ctime_ns) {
            TIMESTAMP_GRANULARITY
        } else {
            FINE_TIMESTAMP_GRANULARITY
        }
    }

    /// Whether both timestamps are older than `checked_ns` by more than the
    /// granularity: only then can no later write hide behind them.
    fn settled_before(&self, checked_ns: i128) -> bool {
        let margin = self.granularity().as_nanos() as i128;
        self.mtime_ns + margin < checked_ns && self.ctime_ns + margin < checked_ns
    }
}

/// What was true of an artifact file when it was last hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VerifiedFile {
    checksum: String,
    identity: FileIdentity,
    checked_ns: i128,
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

/// What the prefetcher answers from: the current artifact of each
/// blueprint and what was verified of their files.
#[derive(Debug)]
struct Desk {
    current: HashMap<String, ArtifactRecord>,
    verified: HashMap<String, VerifiedFile>,
    /// The fleet's reference of current artifacts its bucket holds.
    remote: HashMap<String, String>,
}

/// Answers prefetch requests from the forge's current catalog. Cloning
/// gives another handle on the same catalog and verifications: handles are
/// shared with the threads that answer without the forge's lock.
#[derive(Debug, Clone)]
pub struct Prefetcher {
    desk: Arc<Mutex<Desk>>,
    store: ArtifactStore,
    keys: KeyRing,
}

impl Prefetcher {
    /// A prefetcher over a store's artifacts, verified with `keys`, starting
    /// from the catalog `current`.
    pub fn new<'a>(store: ArtifactStore, keys: KeyRing, current: impl IntoIterator<Item = &'a ArtifactRecord>) -> Self {
        let current = current.into_iter().map(|r| (r.blueprint_id.clone(), r.clone())).collect();
        Prefetcher { desk: Arc::new(Mutex::new(Desk { current, verified: HashMap::new(), remote: HashMap::new() })), store, keys }
    }

    fn desk(&self) -> std::sync::MutexGuard<'_, Desk> {
        self.desk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A blueprint's artifact became current (committed); `remote_ref` is
    /// its reference in the fleet's bucket when the bucket holds it.
    pub fn set_current(&self, record: &ArtifactRecord, remote_ref: Option<String>) {
        let mut desk = self.desk();
        desk.verified.remove(&record.blueprint_id);
        desk.current.insert(record.blueprint_id.clone(), record.clone());
        match remote_ref {
            Some(url) => desk.remote.insert(record.blueprint_id.clone(), url),
            None => desk.remote.remove(&record.blueprint_id),
        };
    }

    /// A current artifact reached the fleet's bucket: answers carry its
    /// remote reference from now on (if it is still current).
    pub fn set_remote(&self, record: &ArtifactRecord, url: String) {
        let mut desk = self.desk();
        if desk.current.get(&record.blueprint_id).is_some_and(|r| r.cache_key == record.cache_key) {
            desk.remote.insert(record.blueprint_id.clone(), url);
        }
    }

    /// A blueprint's artifact is leaving the catalog: requests are answered
    /// `missing_artifact` from now on.
    pub fn withdraw(&self, blueprint_id: &str) {
        let mut desk = self.desk();
        desk.verified.remove(blueprint_id);
        desk.current.remove(blueprint_id);
        desk.remote.remove(blueprint_id);
    }

    /// Answers a request from the current catalog. The file is hashed (and
    /// its signature checked) unless a settled verification of the same
    /// file identity exists.
    pub fn answer(&self, request: &KernelPrefetchRequest) -> PrefetchAnswer {
        let id = &request.blueprint_id;
        let error = |reason: FailureReason| {
            PrefetchAnswer::Error(KernelArtifactError {
                request_id: request.request_id.clone(),
                blueprint_id: id.clone(),
                reason: reason.as_str().to_string(),
            })
        };
        let (record, known, remote) = {
            let desk = self.desk();
            let Some(record) = desk.current.get(id).cloned() else { return error(FailureReason::MissingArtifact) };
            (record, desk.verified.get(id).cloned(), desk.remote.get(id).cloned())
        };
        let path = self.store.artifact_path(&record);
        let Ok(identity) = FileIdentity::of(&path) else { return error(FailureReason::ArtifactNotFound) };
        let settled = known.is_some_and(|v| {
            v.checksum == record.checksum && v.identity == identity && identity.settled_before(v.checked_ns)
        });
        if !settled {
            // Hashed without the desk's lock: answers for other blueprints,
            // and the forge's commits, do not wait for it.
            let checked_ns = now_ns();
            if let Err(e) = self.store.verify(&record) {
                let not_found = e.code() == ErrorCode::NotFound;
                return error(if not_found { FailureReason::ArtifactNotFound } else { FailureReason::ChecksumMismatch });
            }
            if self.keys.verify(&record).is_err() {
                return error(FailureReason::SignatureInvalid);
            }
            // The identity is taken again after hashing: a change during the hash shows next time.
            match FileIdentity::of(&path) {
                Ok(after) if after == identity => {
                    let mut desk = self.desk();
                    // Recorded only if the artifact is still the current one.
                    if desk.current.get(id) == Some(&record) {
                        desk.verified.insert(id.clone(), VerifiedFile { checksum: record.checksum.clone(), identity, checked_ns });
                    }
                }
                _ => return error(FailureReason::ChecksumMismatch),
            }
        }
        self.store.touch(&record.cache_key);
        PrefetchAnswer::Ready(KernelArtifactReady {
            request_id: request.request_id.clone(),
            blueprint_id: id.clone(),
            artifact_ref: remote.unwrap_or_else(|| path.display().to_string()),
            checksum: record.checksum,
            guard_digest: record.guard_digest,
            prewarm_p50_ms: record.prewarm_p50_ms as f32,
            prewarm_p95_ms: record.prewarm_p95_ms as f32,
        })
    }
}

impl crate::bus::Answerer for Prefetcher {
    fn answer(&self, request: &KernelPrefetchRequest) -> PrefetchAnswer {
        Prefetcher::answer(self, request)
    }
}

#[cfg(test)]
mod tests {
    use super::FileIdentity;

    #[test]
    fn a_verification_in_the_files_own_tick_is_not_trusted() {
        let path = std::env::temp_dir().join(format!("tezzeret-racy-{}", std::process::id()));
        std::fs::write(&path, b"artifact").unwrap();
        let identity = FileIdentity::of(&path).unwrap();
        let newest = identity.mtime_ns.max(identity.ctime_ns);
        // Checked in the same tick as the last change (or a little later, but
        // within the granularity): a later write could hide behind the same
        // timestamps, so the file must be hashed again.
        let tick = identity.granularity().as_nanos() as i128;
        assert!(!identity.settled_before(newest));
        assert!(!identity.settled_before(newest + tick));
        // Checked well after the last change: the identity proves the content.
        assert!(identity.settled_before(newest + 2 * tick));
        // Whole-second timestamps (a coarse file system): two seconds of margin.
        let coarse = FileIdentity { mtime_ns: 5_000_000_000, ctime_ns: 5_000_000_000, ..identity };
        assert!(!coarse.settled_before(6_900_000_000) && coarse.settled_before(7_100_000_000));
        std::fs::remove_file(&path).unwrap();
    }
}
