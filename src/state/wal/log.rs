//! The write-ahead log: a memory-mapped, pre-allocated file of CRC'd,
//! chained entries grouped into transactions.
//!
//! Durability discipline (after SQLite, LMDB, RocksDB):
//! - file space is reserved with `fallocate` before it is mapped, and the
//!   mapping never extends past EOF: a full disk is an error, never SIGBUS;
//! - a transaction is acknowledged only after `msync(MS_SYNC)` of every byte
//!   it wrote; a failed sync poisons the log until it is reopened;
//! - each header carries the CRC of its predecessor, a per-file salt, and
//!   the number of the sync batch it was written in (batches are written
//!   one after the other, each synced before the next starts);
//! - recovery reads until the first bad or zero header. Damage confined to
//!   the last (unsynced) batch is a torn tail: dropped, then zeroed before
//!   appending again. A valid entry of a *later* batch after a bad entry
//!   means synced data was damaged: an explicit error, never skipped.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use sha2::{Digest, Sha256};

use super::format::{next_offset, EntryType, Header, HEADER_SIZE, MAX_PAYLOAD};
pub use super::recovery::{read_only, scan, EntryInfo, Recovery, Transaction};
use crate::base::error::{Error, ErrorCode, Result};
use crate::state::layout::replacement_of;
use crate::sys::fs::{fallocate, sync_dir};
use crate::sys::{failpoint, random};

/// Space reserved at a time.
const GROW_BY: u64 = 1 << 20;

/// An open, writable log.
pub struct Wal {
    path: PathBuf,
    file: File,
    map: Option<MmapMut>,
    capacity: u64,
    tail: u64,
    next_sequence: u64,
    epoch: u64,
    batch: u64,
    salt: [u8; 16],
    prev_crc: u32,
    poisoned: Option<String>,
    entries: u64,
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::new(ErrorCode::Io, format!("{what}: no space left on device"))
    } else {
        Error::io(what, e)
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// 16 random bytes (salts, transaction ids), or the error that prevents them.
fn random_id() -> Result<[u8; 16]> {
    random::bytes().map_err(|e| io_err("draw a WAL id from the OS random generator", e))
}

impl Wal {
    /// Opens (creating if needed) the log at `path`, recovers it, zeroes any
    /// torn tail, and starts a new epoch. Returns the log and what recovery found.
    pub fn open(path: &Path) -> Result<(Wal, Recovery)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(format!("open WAL {}", path.display()), e))?;
        let len = file.metadata().map_err(|e| io_err(format!("stat WAL {}", path.display()), e))?.len();
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        let mut wal = Wal {
            path: path.to_path_buf(),
            file,
            map: None,
            capacity: len,
            tail: 0,
            next_sequence: 1,
            epoch: 1,
            batch: 1,
            salt: random_id()?,
            prev_crc: 0,
            poisoned: None,
            entries: 0,
        };
        wal.remap()?;
        let recovery = match &wal.map {
            Some(map) => scan(map)?,
            None => Recovery::default(),
        };
        if let Some(last) = recovery.entries.last() {
            wal.salt = last.header.salt;
            wal.prev_crc = last.crc;
            wal.next_sequence = recovery.last_sequence + 1;
            wal.epoch = recovery.epoch + 1;
            wal.batch = recovery.last_batch + 1;
        }
        wal.tail = recovery.end;
        wal.entries = recovery.entries.len() as u64;
        if recovery.torn_bytes > 0 {
            wal.zero_range(recovery.end, recovery.end + recovery.torn_bytes)?;
        }
        wal.sync_recovered(recovery.end)?;
        Ok((wal, recovery))
    }

    /// Makes the recovered entries durable before anything is appended
    /// after them: a process killed between writing a batch and syncing
    /// it leaves the batch in the page cache, where recovery reads it as
    /// valid, and a batch acknowledged after it must not outlive it.
    fn sync_recovered(&self, end: u64) -> Result<()> {
        let Some(map) = &self.map else { return Ok(()) };
        if end == 0 {
            return Ok(());
        }
        failpoint::hit("wal.recovered_sync")
            .and_then(|_| map.flush_range(0, end as usize))
            .map_err(|e| io_err("msync the recovered WAL", e))
    }

    fn remap(&mut self) -> Result<()> {
        self.map = None;
        if self.capacity == 0 {
            return Ok(());
        }
        // SAFETY: the file is ours (the state directory is locked) and is
        // never truncated while mapped; the map covers exactly its length.
        let map = unsafe { MmapMut::map_mut(&self.file) }.map_err(|e| io_err(format!("map WAL {}", self.path.display()), e))?;
        self.map = Some(map);
        Ok(())
    }

    /// Reserves file space (fallocate) up to at least `needed` bytes.
    fn reserve(&mut self, needed: u64) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_capacity = needed.div_ceil(GROW_BY) * GROW_BY;
        failpoint::hit("wal.fallocate").map_err(|e| io_err("reserve WAL space", e))?;
        fallocate(&self.file, new_capacity)
            .map_err(|e| io_err(format!("reserve {} bytes for WAL {}", new_capacity, self.path.display()), e))?;
        self.file.sync_all().map_err(|e| io_err("fsync WAL after growing", e))?;
        self.capacity = new_capacity;
        self.remap()
    }

    fn zero_range(&mut self, from: u64, to: u64) -> Result<()> {
        let to = to.min(self.capacity);
        if from >= to {
            return Ok(());
        }
        let map = self.map.as_mut().expect("mapped");
        map[from as usize..to as usize].fill(0);
        map.flush_range(from as usize, (to - from) as usize).map_err(|e| io_err("msync zeroed WAL tail", e))
    }

    /// Appends `transactions` (each a list of DATA payloads) as
    /// BEGIN/DATA…/COMMIT groups in one sync batch, and returns once all of
    /// it is on stable storage (group commit).
    pub fn commit(&mut self, transactions: &[Vec<Vec<u8>>]) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(Error::new(ErrorCode::Io, format!("WAL is poisoned by an earlier sync failure ({why}); reopen to recover")));
        }
        if transactions.is_empty() {
            return Ok(());
        }
        // What recovery would refuse is never written.
        if let Some(big) = transactions.iter().flatten().find(|r| r.len() as u64 > MAX_PAYLOAD) {
            return Err(Error::invalid(format!("WAL record of {} bytes exceeds the {MAX_PAYLOAD}-byte bound", big.len())));
        }
        let mut needed = self.tail;
        for tx in transactions {
            needed = next_offset(needed, 0);
            for r in tx {
                needed = next_offset(needed, r.len() as u64);
            }
            needed = next_offset(needed, 32);
        }
        self.reserve(needed)?;
        let start = self.tail;
        let saved = (self.next_sequence, self.prev_crc, self.entries);
        let mut entries: Vec<(EntryType, [u8; 16], Vec<u8>)> = Vec::new();
        for tx in transactions {
            let txid = random_id()?;
            let mut hash = Sha256::new();
            entries.push((EntryType::Begin, txid, Vec::new()));
            for r in tx {
                hash.update(Sha256::digest(r));
                entries.push((EntryType::Data, txid, r.clone()));
            }
            entries.push((EntryType::Commit, txid, hash.finalize().to_vec()));
        }
        let count = entries.len();
        for (i, (entry_type, txid, payload)) in entries.into_iter().enumerate() {
            if let Err(e) = failpoint::hit("wal.write") {
                // Nothing of this batch was synced: forget it.
                let end = self.tail;
                self.map.as_mut().expect("mapped")[start as usize..end as usize].fill(0);
                (self.next_sequence, self.prev_crc, self.entries) = saved;
                self.tail = start;
                return Err(io_err("write WAL entry", e));
            }
            self.write_entry(entry_type, txid, &payload, i + 1 == count);
        }
        let map = self.map.as_ref().expect("reserved space is mapped");
        let synced = failpoint::hit("wal.msync").and_then(|_| map.flush_range(start as usize, (self.tail - start) as usize));
        if let Err(e) = synced {
            self.poisoned = Some(e.to_string());
            return Err(io_err("msync WAL (log poisoned until reopened)", e));
        }
        self.batch += 1;
        Ok(())
    }

    fn write_entry(&mut self, entry_type: EntryType, txid: [u8; 16], payload: &[u8], batch_end: bool) {
        let offset = self.tail;
        let header = Header {
            txid,
            sequence: self.next_sequence,
            epoch: self.epoch,
            timestamp_ns: now_ns(),
            entry_type,
            payload_size: payload.len() as u64,
            payload_sha256: Sha256::digest(payload).into(),
            next_offset: next_offset(offset, payload.len() as u64),
            payload_crc: crc32fast::hash(payload),
            prev_header_crc: self.prev_crc,
            salt: self.salt,
            batch: self.batch,
            batch_end,
        };
        let (bytes, crc) = header.encode();
        let map = self.map.as_mut().expect("reserved space is mapped");
        let at = offset as usize;
        // Payload first, header last: a header on disk never precedes its payload in our own order.
        map[at + HEADER_SIZE..at + HEADER_SIZE + payload.len()].copy_from_slice(payload);
        map[at..at + HEADER_SIZE].copy_from_slice(&bytes);
        self.prev_crc = crc;
        self.next_sequence += 1;
        self.tail = header.next_offset;
        self.entries += 1;
    }

    /// Replaces the whole log with `transactions` (compaction/checkpoint):
    /// written to a temporary file, synced, renamed over the log, and the
    /// directory synced, so a crash leaves either the old or the new log.
    pub fn rewrite(&mut self, transactions: &[Vec<Vec<u8>>]) -> Result<()> {
        let temp = replacement_of(&self.path);
        let _ = std::fs::remove_file(&temp);
        let (mut fresh, _) = Wal::open(&temp)?;
        fresh.epoch = self.epoch;
        fresh.commit(transactions)?;
        failpoint::hit("wal.rename").map_err(|e| io_err("rename compacted WAL", e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| io_err(format!("rename compacted WAL to {}", self.path.display()), e))?;
        // Renamed: the fresh log is the log from now on, whatever follows
        // (appends to the old file would be lost with its name).
        fresh.path = self.path.clone();
        let synced = match self.path.parent() {
            Some(dir) => failpoint::hit("wal.fsync_dir").map_err(|e| io_err("fsync WAL directory", e)).and_then(|_| sync_dir(dir)),
            None => Ok(()),
        };
        if let Err(error) = &synced {
            // The rename may not be durable: the old log could come back
            // after a power loss, so nothing more is acknowledged until a
            // reopen (which syncs the directory again).
            fresh.poisoned = Some(error.to_string());
        }
        *self = fresh;
        synced
    }

    /// Bytes of the valid log.
    pub fn len(&self) -> u64 {
        self.tail
    }

    /// Whether the log has no entries.
    pub fn is_empty(&self) -> bool {
        self.tail == 0
    }

    /// Number of entries in the log.
    pub fn entry_count(&self) -> u64 {
        self.entries
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a sync failed (nothing more is acknowledged until reopen).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
