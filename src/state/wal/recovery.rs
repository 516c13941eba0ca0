//! Recovery of the write-ahead log: reading a log image back into its
//! committed transactions.
//!
//! Recovery reads until the first bad or zero header. Damage confined to the
//! last (unsynced) sync batch is a torn tail: dropped, then zeroed before
//! appending again. A valid entry of a *later* batch after a bad entry means
//! synced data was damaged: an explicit error, never skipped. Recovering
//! twice changes nothing.
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::format::{EntryType, Header, HeaderError, HEADER_SIZE, MAGIC};
use crate::base::error::{Error, ErrorCode, Result};

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
    /// Its CRC (the next entry chains to it).
    pub crc: u32,
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
    // Where the written bytes end (the rest is preallocated zeros).
    let content_end = last_nonzero(bytes);
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
                last_was_batch_end = header.batch_end;
                cursor.salt = Some(header.salt);
                cursor.prev_crc = crc;
                recovery.epoch = recovery.epoch.max(header.epoch);
                recovery.last_sequence = header.sequence;
                recovery.last_batch = header.batch;
                let next = header.next_offset;
                recovery.entries.push(EntryInfo { offset, header, crc });
                offset = next;
            }
            Err(error) => {
                // Zeros end the log, unless something follows them; then, as
                // after a garbled header, an entry of a later sync batch
                // means synced data was damaged: an error, never skipped.
                let (why, zeroed) = match error {
                    HeaderError::Zero => (format!("zeroed header at offset {offset}"), true),
                    HeaderError::Bad(why) => (why, false),
                };
                let torn_batch = if last_was_batch_end { recovery.last_batch + 1 } else { recovery.last_batch };
                let rest = &bytes[..(content_end + HEADER_SIZE).min(bytes.len())];
                if let Some((later, batch)) = find_later_entry(rest, offset + 8, cursor.salt, torn_batch) {
                    return Err(Error::new(
                        ErrorCode::Corrupt,
                        format!(
                            "WAL corrupt: {why}, yet a valid entry of later sync batch {batch} follows at offset {later}; \
                             refusing to skip committed data"
                        ),
                    ));
                }
                if !zeroed {
                    recovery.torn_reason = Some(why);
                }
                break;
            }
        }
    }
    recovery.end = offset;
    recovery.incomplete = usize::from(open.is_some());
    recovery.torn_bytes = (content_end as u64).saturating_sub(offset);
    Ok(recovery)
}

/// The length of `bytes` without its trailing zeros.
fn last_nonzero(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1)
}

/// The offset and batch of a structurally valid header (CRC, salt) of a
/// batch after `torn_batch`, searching 8-byte boundaries from `from`.
fn find_later_entry(bytes: &[u8], from: u64, salt: Option<[u8; 16]>, torn_batch: u64) -> Option<(u64, u64)> {
    let mut at = (from + 7) & !7;
    while at as usize + HEADER_SIZE <= bytes.len() {
        let window = &bytes[at as usize..];
        if window.starts_with(MAGIC) {
            if let Ok((header, _)) = Header::decode(window, at) {
                if salt.is_none_or(|s| s == header.salt) && header.batch > torn_batch {
                    return Some((at, header.batch));
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

