//! The on-disk layout of a WAL entry: a 256-byte little-endian
//! header followed by the payload, the next entry starting at the next
//! 8-byte boundary.
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | magic `ESPERWAL` |
//! | 8 | format version (u32) |
//! | 12 | endian marker 0x12345678 (u32) |
//! | 16 | transaction id (16 bytes) |
//! | 32 | sequence number (u64) |
//! | 40 | epoch (u64) |
//! | 48 | timestamp ns (u64) |
//! | 56 | entry type (u32): BEGIN 1, DATA 2, COMMIT 3, ABORT 4 |
//! | 60 | payload size (u64) |
//! | 68 | sha256 of payload (32 bytes) |
//! | 100 | next offset (u64) |
//! | 108 | header CRC32 over the header with this field zero (u32) |
//! | 112 | reserved: payload CRC32 (u32) |
//! | 116 | reserved: CRC32 of the previous header (chain; 0 for the first) (u32) |
//! | 120 | reserved: per-file salt (16 bytes) |
//! | 136 | reserved: sync batch number (u64) |
//! | 144 | reserved: flags (u8); bit 0 = last entry of its sync batch |
//! | 145..256 | reserved, zero |
use sha2::{Digest, Sha256};

/// Byte offsets of the header fields.
pub mod offset {
    /// Magic `ESPERWAL` (8 bytes).
    pub const MAGIC: usize = 0;
    /// Format version (u32).
    pub const VERSION: usize = 8;
    /// Endian marker (u32).
    pub const ENDIAN: usize = 12;
    /// Transaction id (16 bytes).
    pub const TXID: usize = 16;
    /// Sequence number (u64).
    pub const SEQUENCE: usize = 32;
    /// Epoch (u64).
    pub const EPOCH: usize = 40;
    /// Timestamp, ns (u64).
    pub const TIMESTAMP: usize = 48;
    /// Entry type (u32).
    pub const ENTRY_TYPE: usize = 56;
    /// Payload size (u64).
    pub const PAYLOAD_SIZE: usize = 60;
    /// sha256 of the payload (32 bytes).
    pub const PAYLOAD_SHA256: usize = 68;
    /// Next offset (u64).
    pub const NEXT_OFFSET: usize = 100;
    /// Header CRC32 (u32).
    pub const HEADER_CRC: usize = 108;
    /// Payload CRC32 (u32).
    pub const PAYLOAD_CRC: usize = 112;
    /// CRC32 of the previous header (u32).
    pub const PREV_HEADER_CRC: usize = 116;
    /// Per-file salt (16 bytes).
    pub const SALT: usize = 120;
    /// Sync batch number (u64).
    pub const BATCH: usize = 136;
    /// Flags (u8).
    pub const FLAGS: usize = 144;
}

/// Flag bit: the entry is the last of its sync batch.
pub const FLAG_BATCH_END: u8 = 1;

/// Header size in bytes.
pub const HEADER_SIZE: usize = 256;
/// Magic at the start of every header.
pub const MAGIC: &[u8; 8] = b"ESPERWAL";
/// Version of this layout.
pub const FORMAT_VERSION: u32 = 1;
/// Written as a u32; reads back differently on a foreign-endian machine.
pub const ENDIAN_MARKER: u32 = 0x1234_5678;
/// Largest payload accepted (bounded before use during recovery).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum EntryType {
    /// Starts a transaction.
    Begin = 1,
    /// Carries one record of a transaction.
    Data = 2,
    /// Ends a transaction; its payload is the sha256 of the DATA payloads.
    Commit = 3,
    /// Abandons a transaction.
    Abort = 4,
}

impl EntryType {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Begin),
            2 => Some(Self::Data),
            3 => Some(Self::Commit),
            4 => Some(Self::Abort),
            _ => None,
        }
    }

    /// Upper-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Begin => "BEGIN",
            Self::Data => "DATA",
            Self::Commit => "COMMIT",
            Self::Abort => "ABORT",
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Transaction the entry belongs to.
    pub txid: [u8; 16],
    /// Entry sequence number (strictly increasing along the log).
    pub sequence: u64,
    /// Epoch (incremented each time the log is opened).
    pub epoch: u64,
    /// Wall-clock time of the write, ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// Entry type.
    pub entry_type: EntryType,
    /// Payload length.
    pub payload_size: u64,
    /// sha256 of the payload.
    pub payload_sha256: [u8; 32],
    /// Offset of the next entry.
    pub next_offset: u64,
    /// CRC32 of the payload.
    pub payload_crc: u32,
    /// CRC32 of the previous entry's header (0 for the first entry).
    pub prev_header_crc: u32,
    /// Per-file salt.
    pub salt: [u8; 16],
    /// Sync batch the entry was written in.
    pub batch: u64,
    /// Whether the entry is the last of its sync batch.
    pub batch_end: bool,
}

/// Why a header does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// All zero: the end of the written log.
    Zero,
    /// Damaged or not a header; the text says which check failed.
    Bad(String),
}

/// Offset of the next entry after an entry with `payload_size` at `offset`.
pub fn next_offset(offset: u64, payload_size: u64) -> u64 {
    (offset + HEADER_SIZE as u64 + payload_size + 7) & !7
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Encodes the header, computing its CRC; returns the bytes and the CRC.
    pub fn encode(&self) -> ([u8; HEADER_SIZE], u32) {
        use self::offset as at;
        let mut b = [0u8; HEADER_SIZE];
        put(&mut b, at::MAGIC, MAGIC);
        put(&mut b, at::VERSION, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, at::ENDIAN, &ENDIAN_MARKER.to_le_bytes());
        put(&mut b, at::TXID, &self.txid);
        put(&mut b, at::SEQUENCE, &self.sequence.to_le_bytes());
        put(&mut b, at::EPOCH, &self.epoch.to_le_bytes());
        put(&mut b, at::TIMESTAMP, &self.timestamp_ns.to_le_bytes());
        put(&mut b, at::ENTRY_TYPE, &(self.entry_type as u32).to_le_bytes());
        put(&mut b, at::PAYLOAD_SIZE, &self.payload_size.to_le_bytes());
        put(&mut b, at::PAYLOAD_SHA256, &self.payload_sha256);
        put(&mut b, at::NEXT_OFFSET, &self.next_offset.to_le_bytes());
        put(&mut b, at::PAYLOAD_CRC, &self.payload_crc.to_le_bytes());
        put(&mut b, at::PREV_HEADER_CRC, &self.prev_header_crc.to_le_bytes());
        put(&mut b, at::SALT, &self.salt);
        put(&mut b, at::BATCH, &self.batch.to_le_bytes());
        b[at::FLAGS] = if self.batch_end { FLAG_BATCH_END } else { 0 };
        let crc = crc32fast::hash(&b);
        put(&mut b, at::HEADER_CRC, &crc.to_le_bytes());
        (b, crc)
    }

    /// Decodes and checks a header at `offset` (its CRC, constants, type,
    /// payload bound and next offset). Returns the header and its CRC.
    pub fn decode(b: &[u8], offset: u64) -> Result<(Header, u32), HeaderError> {
        use self::offset as at;
        if b.len() < HEADER_SIZE {
            return Err(HeaderError::Bad(format!("header at {offset} is truncated ({} bytes)", b.len())));
        }
        let b = &b[..HEADER_SIZE];
        if b.iter().all(|x| *x == 0) {
            return Err(HeaderError::Zero);
        }
        let stored_crc = u32_at(b, at::HEADER_CRC);
        let mut zeroed = [0u8; HEADER_SIZE];
        zeroed.copy_from_slice(b);
        zeroed[at::HEADER_CRC..at::HEADER_CRC + 4].fill(0);
        if crc32fast::hash(&zeroed) != stored_crc {
            return Err(HeaderError::Bad(format!("header CRC mismatch at offset {offset}")));
        }
        if &b[at::MAGIC..at::MAGIC + 8] != MAGIC {
            return Err(HeaderError::Bad(format!("bad magic at offset {offset}")));
        }
        let version = u32_at(b, at::VERSION);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Bad(format!("unsupported WAL format version {version} at offset {offset}")));
        }
        if u32_at(b, at::ENDIAN) != ENDIAN_MARKER {
            return Err(HeaderError::Bad(format!("foreign endianness at offset {offset}")));
        }
        let raw_type = u32_at(b, at::ENTRY_TYPE);
        let entry_type = EntryType::from_u32(raw_type)
            .ok_or_else(|| HeaderError::Bad(format!("unknown entry type {raw_type} at offset {offset}")))?;
        let payload_size = u64_at(b, at::PAYLOAD_SIZE);
        if payload_size > MAX_PAYLOAD {
            return Err(HeaderError::Bad(format!("payload size {payload_size} at offset {offset} exceeds {MAX_PAYLOAD}")));
        }
        let next = u64_at(b, at::NEXT_OFFSET);
        if next != next_offset(offset, payload_size) {
            return Err(HeaderError::Bad(format!("next offset {next} at offset {offset} is inconsistent")));
        }
        let header = Header {
            txid: b[at::TXID..at::TXID + 16].try_into().expect("16"),
            sequence: u64_at(b, at::SEQUENCE),
            epoch: u64_at(b, at::EPOCH),
            timestamp_ns: u64_at(b, at::TIMESTAMP),
            entry_type,
            payload_size,
            payload_sha256: b[at::PAYLOAD_SHA256..at::PAYLOAD_SHA256 + 32].try_into().expect("32"),
            next_offset: next,
            payload_crc: u32_at(b, at::PAYLOAD_CRC),
            prev_header_crc: u32_at(b, at::PREV_HEADER_CRC),
            salt: b[at::SALT..at::SALT + 16].try_into().expect("16"),
            batch: u64_at(b, at::BATCH),
            batch_end: b[at::FLAGS] & FLAG_BATCH_END != 0,
        };
        Ok((header, stored_crc))
    }

    /// Whether `payload` is the one this header describes.
    pub fn payload_matches(&self, payload: &[u8]) -> bool {
        payload.len() as u64 == self.payload_size
            && crc32fast::hash(payload) == self.payload_crc
            && Sha256::digest(payload).as_slice() == self.payload_sha256
    }
}
