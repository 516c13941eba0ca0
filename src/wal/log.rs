//! The write-ahead log: a memory-mapped, pre-allocated file of CRC'd,
//! chained entries grouped into transactions (SPEC §5).
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
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};
use sha2::{Digest, Sha256};

use super::format::{next_offset, EntryType, Header, HeaderError, HEADER_SIZE};
use crate::failpoint;
use crate::store::sync_dir;
use crate::{Error, ErrorCode, Result};

/// Space reserved at a time.
const GROW_BY: u64 = 1 << 20;
/// Flag in the last entry of each sync batch (reserved byte 144).
const BATCH_END: u8 = 1;

/// A committed transaction recovered from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Its id.
    pub txid: [u8; 16],
    /// Sequence number of its BEGIN entry.
    pub sequence: u64,
    /// Epoch it was written in.
    pub epoch: u64,
    /// Time of its BEGIN entry, ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// Its DATA payloads, in order.
    pub records: Vec<Vec<u8>>,
}

/// One entry as found by recovery (for dumps).
#[derive(Debug, Clone)]
pub struct EntryInfo {
    /// Offset in the file.
    pub offset: u64,
    /// The decoded header.
    pub header: Header,
}

/// What recovery found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Committed transactions, in log order.
    pub transactions: Vec<Transaction>,
    /// Every valid entry of the kept prefix.
    pub entries: Vec<EntryInfo>,
    /// Transactions begun but neither committed nor aborted.
    pub incomplete: usize,
    /// Bytes of torn tail dropped (0 for a clean log).
    pub torn_bytes: u64,
    /// Why the tail was dropped, if it was.
    pub torn_reason: Option<String>,
    /// End of the valid prefix: where the next entry goes.
    pub end: u64,
    /// Highest epoch seen.
    pub epoch: u64,
    /// Last sequence number seen.
    pub last_sequence: u64,
    /// Last sync batch seen.
    pub last_batch: u64,
}

/// State carried along the valid prefix during a scan.
struct Cursor {
    salt: Option<[u8; 16]>,
    prev_crc: u32,
}

/// Validates the entry at `offset` in `bytes` against the scan so far.
fn read_entry(bytes: &[u8], offset: u64, cursor: &Cursor, recovery: &Recovery) -> Result<(Header, u32), HeaderError> {
    let start = offset as usize;
    let header_bytes = bytes.get(start..).unwrap_or(&[]);
    let (header, crc) = Header::decode(header_bytes, offset)?;
    let bad = |why: String| Err(HeaderError::Bad(why));
    if header.next_offset > bytes.len() as u64 {
        return bad(format!("entry at {offset} runs past the end of the file"));
    }
    let payload = &bytes[start + HEADER_SIZE..start + HEADER_SIZE + header.payload_size as usize];
    if !header.payload_matches(payload) {
        return bad(format!("payload checksum mismatch at offset {offset}"));
    }
    if let Some(salt) = cursor.salt {
        if header.salt != salt {
            return bad(format!("salt mismatch at offset {offset} (stale entry)"));
        }
    }
    if header.prev_header_crc != cursor.prev_crc {
        return bad(format!("broken chain at offset {offset}"));
    }
    if !recovery.entries.is_empty() {
        if header.sequence != recovery.last_sequence + 1 {
            return bad(format!("sequence {} at offset {offset} does not follow {}", header.sequence, recovery.last_sequence));
        }
        if header.epoch < recovery.epoch {
            return bad(format!("entry at offset {offset} is from older epoch {} (log is at {})", header.epoch, recovery.epoch));
        }
        if header.batch < recovery.last_batch {
            return bad(format!("batch {} at offset {offset} goes backwards", header.batch));
        }
    }
    Ok((header, crc))
}

/// Scans a log image. Torn tails are reported in the result; damage before
/// data of a later sync batch is an error.
pub fn scan(bytes: &[u8]) -> Result<Recovery> {
    let mut recovery = Recovery::default();
    let mut cursor = Cursor { salt: None, prev_crc: 0 };
    let mut open: Option<Transaction> = None;
    let mut data_hash = Sha256::new();
    let mut last_was_batch_end = true;
    let mut offset = 0u64;
    loop {
        if offset as usize + HEADER_SIZE > bytes.len() {
            if bytes[offset as usize..].iter().any(|b| *b != 0) {
                recovery.torn_reason = Some(format!("partial header at offset {offset}"));
            }
            break;
        }
        match read_entry(bytes, offset, &cursor, &recovery) {
            Ok((header, crc)) => {
                let start = offset as usize + HEADER_SIZE;
                let payload = &bytes[start..start + header.payload_size as usize];
                apply(&mut recovery, &mut open, &mut data_hash, &header, payload, offset)?;
                last_was_batch_end = bytes[offset as usize + 144] & BATCH_END != 0;
                cursor.salt = Some(header.salt);
                cursor.prev_crc = crc;
                recovery.epoch = recovery.epoch.max(header.epoch);
                recovery.last_sequence = header.sequence;
                recovery.last_batch = header.batch;
                let next = header.next_offset;
                recovery.entries.push(EntryInfo { offset, header });
                offset = next;
            }
            Err(HeaderError::Zero) => break,
            Err(HeaderError::Bad(why)) => {
                // Later valid entries of a later sync batch mean synced data was damaged.
                let torn_batch = if last_was_batch_end { recovery.last_batch + 1 } else { recovery.last_batch };
                if let Some(later) = find_later_entry(bytes, offset + 8, cursor.salt, torn_batch) {
                    return Err(Error::new(
                        ErrorCode::Corrupt,
                        format!(
                            "WAL corrupt: {why}, yet a valid entry of later sync batch {} follows at offset {later}; \
                             refusing to skip committed data",
                            header_batch(bytes, later)
                        ),
                    ));
                }
                recovery.torn_reason = Some(why);
                break;
            }
        }
    }
    recovery.end = offset;
    recovery.incomplete = usize::from(open.is_some());
    let last_nonzero = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p as u64 + 1);
    recovery.torn_bytes = last_nonzero.saturating_sub(offset);
    Ok(recovery)
}

fn header_batch(bytes: &[u8], offset: u64) -> u64 {
    let at = offset as usize + 136;
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The offset of a structurally valid header (CRC, salt) of a batch after
/// `torn_batch`, searching 8-byte boundaries from `from`.
fn find_later_entry(bytes: &[u8], from: u64, salt: Option<[u8; 16]>, torn_batch: u64) -> Option<u64> {
    let mut at = (from + 7) & !7;
    while at as usize + HEADER_SIZE <= bytes.len() {
        let window = &bytes[at as usize..];
        if window.starts_with(super::format::MAGIC) {
            if let Ok((header, _)) = Header::decode(window, at) {
                if salt.is_none_or(|s| s == header.salt) && header.batch > torn_batch {
                    return Some(at);
                }
            }
        }
        at += 8;
    }
    None
}

/// Applies one valid entry to the transaction being assembled.
fn apply(
    recovery: &mut Recovery,
    open: &mut Option<Transaction>,
    data_hash: &mut Sha256,
    header: &Header,
    payload: &[u8],
    offset: u64,
) -> Result<()> {
    let structural = |what: &str| {
        Err(Error::new(ErrorCode::Corrupt, format!("WAL corrupt: {what} at offset {offset} ({})", header.entry_type.name())))
    };
    match header.entry_type {
        EntryType::Begin => {
            if open.is_some() {
                // A transaction never committed before the next began: abandoned (crash, then reopen).
                recovery.incomplete += 1;
            }
            *open = Some(Transaction {
                txid: header.txid,
                sequence: header.sequence,
                epoch: header.epoch,
                timestamp_ns: header.timestamp_ns,
                records: Vec::new(),
            });
            *data_hash = Sha256::new();
        }
        EntryType::Data => match open {
            Some(tx) if tx.txid == header.txid => {
                data_hash.update(Sha256::digest(payload));
                tx.records.push(payload.to_vec());
            }
            _ => return structural("DATA outside its transaction"),
        },
        EntryType::Commit => match open.take() {
            Some(tx) if tx.txid == header.txid => {
                if payload != std::mem::take(data_hash).finalize().as_slice() {
                    return structural("COMMIT does not vouch for its DATA");
                }
                recovery.transactions.push(tx);
            }
            _ => return structural("COMMIT outside its transaction"),
        },
        EntryType::Abort => match open.take() {
            Some(tx) if tx.txid == header.txid => {}
            _ => return structural("ABORT outside its transaction"),
        },
    }
    Ok(())
}

/// Reads a log file without modifying it (for dumps and verification).
pub fn read_only(path: &Path) -> Result<Recovery> {
    let file = File::open(path).map_err(|e| Error::io(format!("open WAL {}", path.display()), e))?;
    let len = file.metadata().map_err(|e| Error::io(format!("stat WAL {}", path.display()), e))?.len();
    if len == 0 {
        return Ok(Recovery::default());
    }
    // SAFETY: read-only map of a file no one truncates while we read (the
    // writer only grows it); bounds come from its length at map time.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(format!("map WAL {}", path.display()), e))?;
    scan(&map)
}

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

/// 16 bytes from the kernel's random source (salts, transaction ids).
pub fn random_bytes() -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: getrandom writes at most out.len() bytes into out.
    let n = unsafe { libc::getrandom(out.as_mut_ptr().cast(), out.len(), 0) };
    if n != out.len() as isize {
        // Fall back on time and pid: uniqueness, not secrecy, is needed.
        let fallback = Sha256::digest(format!("{}-{}", now_ns(), std::process::id()));
        out.copy_from_slice(&fallback[..16]);
    }
    out
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
            salt: random_bytes(),
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
            wal.prev_crc = {
                let map = wal.map.as_ref().expect("mapped when entries exist");
                let at = last.offset as usize + 108;
                u32::from_le_bytes(map[at..at + 4].try_into().expect("4 bytes"))
            };
            wal.next_sequence = recovery.last_sequence + 1;
            wal.epoch = recovery.epoch + 1;
            wal.batch = recovery.last_batch + 1;
        }
        wal.tail = recovery.end;
        wal.entries = recovery.entries.len() as u64;
        if recovery.torn_bytes > 0 {
            wal.zero_range(recovery.end, recovery.end + recovery.torn_bytes)?;
        }
        Ok((wal, recovery))
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
        // SAFETY: fallocate on our descriptor.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, new_capacity as libc::off_t) };
        if rc != 0 {
            return Err(io_err(
                format!("reserve {} bytes for WAL {}", new_capacity, self.path.display()),
                std::io::Error::last_os_error(),
            ));
        }
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
        let entries: Vec<(EntryType, [u8; 16], Vec<u8>)> = transactions
            .iter()
            .flat_map(|tx| {
                let txid = random_bytes();
                let mut hash = Sha256::new();
                let mut out = vec![(EntryType::Begin, txid, Vec::new())];
                for r in tx {
                    hash.update(Sha256::digest(r));
                    out.push((EntryType::Data, txid, r.clone()));
                }
                out.push((EntryType::Commit, txid, hash.finalize().to_vec()));
                out
            })
            .collect();
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
        };
        let (mut bytes, _) = header.encode();
        if batch_end {
            bytes[144] = BATCH_END;
            // The flag is covered by the header CRC: recompute it.
            bytes[108..112].fill(0);
            let crc = crc32fast::hash(&bytes);
            bytes[108..112].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = u32::from_le_bytes(bytes[108..112].try_into().expect("4 bytes"));
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
        let temp = self.path.with_extension("compact");
        let _ = std::fs::remove_file(&temp);
        {
            let (mut fresh, _) = Wal::open(&temp)?;
            fresh.epoch = self.epoch;
            fresh.commit(transactions)?;
        }
        failpoint::hit("wal.rename").map_err(|e| io_err("rename compacted WAL", e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| io_err(format!("rename compacted WAL to {}", self.path.display()), e))?;
        if let Some(dir) = self.path.parent() {
            failpoint::hit("wal.fsync_dir").map_err(|e| io_err("fsync WAL directory", e))?;
            sync_dir(dir)?;
        }
        let (reopened, _) = Wal::open(&self.path)?;
        *self = reopened;
        Ok(())
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
