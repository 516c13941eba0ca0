//! The guard table (SPEC §8): a memory-mapped file of fixed-layout slots,
//! one per blueprint's current artifact, that other processes (Kasmina)
//! read without locks and without a forge.
//!
//! Layout (little-endian), format version [`LAYOUT_VERSION`] (distinct from
//! the ABI version):
//! - file header, 256 bytes: magic `TZGUARDS`, layout version (u32), slot
//!   size (u32), slot count (u32);
//! - `slot count` slots of [`SLOT_SIZE`] bytes, found by open addressing on
//!   a hash of the blueprint id.
//!
//! A slot is a seqlock: the writer makes its generation odd, writes the
//! words, stores a CRC32 of the content, then makes the generation even.
//! Readers copy the slot between two reads of the generation and accept it
//! only if both are equal and even and the CRC matches, so a torn slot (a
//! writer killed mid-update included) is never accepted. The table is
//! derived data: the forge verifies it against the store at open and
//! rewrites whatever does not match.
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::{GuardSpec, InputGuard};
use crate::failpoint;
use crate::{Error, ErrorCode, Result};

/// Magic at the start of the file.
pub const MAGIC: &[u8; 8] = b"TZGUARDS";
/// Version of this layout.
pub const LAYOUT_VERSION: u32 = 1;
/// Size of the file header.
pub const HEADER_SIZE: usize = 256;
/// Size of one slot.
pub const SLOT_SIZE: usize = 1024;
/// Slots in a new table.
pub const DEFAULT_SLOTS: u32 = 4096;
/// Longest blueprint id a slot holds.
pub const MAX_ID_LEN: usize = 127;
/// Most inputs a slot describes.
pub const MAX_INPUTS: usize = 4;
/// Highest rank of an input a slot describes.
pub const MAX_RANK: usize = 8;

const WORDS: usize = SLOT_SIZE / 8;
// Byte offsets inside a slot.
// Word 0 of a slot is its generation.
const CRC: usize = 8; // u32 CRC + u32 state
const ID: usize = 16; // 128 bytes, NUL padded
const CHECKSUM: usize = 144; // 32 bytes
const DIGEST: usize = 176; // 32 bytes
const DEVICE: usize = 208; // 16 bytes
const COUNTS: usize = 224; // u32 inputs, u32 flags
const INPUTS: usize = 232; // MAX_INPUTS × 136 bytes
const INPUT_SIZE: usize = 8 + 16 * MAX_RANK;
const STATE_EMPTY: u32 = 0;
const STATE_USED: u32 = 1;
const STATE_DELETED: u32 = 2;
const FLAG_DYNAMIC_BATCH: u32 = 1;
/// Retries of a reader racing a writer before it reports the slot busy.
const READ_RETRIES: usize = 1000;

/// dtype names and their codes in a slot.
const DTYPES: &[&str] = &["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"];

/// The slot code of a dtype name (`TEZZERET_DTYPE_*` in the C ABI).
pub fn dtype_code(name: &str) -> Option<u32> {
    DTYPES.iter().position(|d| *d == name).map(|i| i as u32)
}

/// A decoded slot: the guards of one blueprint's current artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardEntry {
    /// The blueprint.
    pub blueprint_id: String,
    /// sha256 of the artifact file.
    pub checksum: [u8; 32],
    /// Guard digest (SPEC §7).
    pub guard_digest: [u8; 32],
    /// Device the artifact runs on.
    pub device: String,
    /// Accepts any size in dim 0.
    pub dynamic_batch: bool,
    /// Per-input guards.
    pub spec: GuardSpec,
}

fn hex_to_bytes(hex: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return Err(Error::invalid(format!("expected 64 hex digits, got {hex:?}")));
    }
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| Error::invalid("hex is not ASCII"))?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| Error::invalid(format!("bad hex {hex:?}")))?;
    }
    Ok(out)
}

impl GuardEntry {
    /// Builds an entry from stored metadata (hex checksum and digest).
    pub fn new(blueprint_id: &str, checksum_hex: &str, digest_hex: &str, device: &str, dynamic_batch: bool, spec: &GuardSpec) -> Result<Self> {
        Ok(GuardEntry {
            blueprint_id: blueprint_id.to_string(),
            checksum: hex_to_bytes(checksum_hex)?,
            guard_digest: hex_to_bytes(digest_hex)?,
            device: device.to_string(),
            dynamic_batch,
            spec: spec.clone(),
        })
    }

    /// Encodes the entry into slot bytes (generation and CRC left zero).
    fn encode(&self) -> Result<[u8; SLOT_SIZE]> {
        let id = self.blueprint_id.as_bytes();
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(Error::invalid(format!("blueprint id {:?} does not fit a guard slot (1..={MAX_ID_LEN} bytes)", self.blueprint_id)));
        }
        let inputs = self.spec.inputs();
        if inputs.len() > MAX_INPUTS {
            return Err(Error::invalid(format!("{} has {} inputs; a guard slot holds {MAX_INPUTS}", self.blueprint_id, inputs.len())));
        }
        if self.device.len() > 15 {
            return Err(Error::invalid(format!("device name {:?} too long for a guard slot", self.device)));
        }
        let mut b = [0u8; SLOT_SIZE];
        b[CRC + 4..CRC + 8].copy_from_slice(&STATE_USED.to_le_bytes());
        b[ID..ID + id.len()].copy_from_slice(id);
        b[CHECKSUM..CHECKSUM + 32].copy_from_slice(&self.checksum);
        b[DIGEST..DIGEST + 32].copy_from_slice(&self.guard_digest);
        b[DEVICE..DEVICE + self.device.len()].copy_from_slice(self.device.as_bytes());
        b[COUNTS..COUNTS + 4].copy_from_slice(&(inputs.len() as u32).to_le_bytes());
        let flags = if self.dynamic_batch { FLAG_DYNAMIC_BATCH } else { 0 };
        b[COUNTS + 4..COUNTS + 8].copy_from_slice(&flags.to_le_bytes());
        for (i, g) in inputs.iter().enumerate() {
            let at = INPUTS + i * INPUT_SIZE;
            let dtype = DTYPES.iter().position(|d| *d == g.dtype).ok_or_else(|| {
                Error::invalid(format!("dtype {:?} of {} has no guard-table code", g.dtype, self.blueprint_id))
            })?;
            if g.shape.len() > MAX_RANK || g.stride.len() != g.shape.len() || g.index != i {
                return Err(Error::invalid(format!("input {i} of {} does not fit a guard slot", self.blueprint_id)));
            }
            b[at..at + 2].copy_from_slice(&(dtype as u16).to_le_bytes());
            b[at + 2] = g.shape.len() as u8;
            b[at + 3] = u8::from(g.requires_grad);
            for (d, v) in g.shape.iter().enumerate() {
                b[at + 8 + d * 8..at + 16 + d * 8].copy_from_slice(&v.to_le_bytes());
            }
            for (d, v) in g.stride.iter().enumerate() {
                let s = at + 8 + MAX_RANK * 8 + d * 8;
                b[s..s + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(b)
    }

    /// Decodes slot bytes (already checked for CRC and state).
    fn decode(b: &[u8; SLOT_SIZE]) -> Result<Self> {
        let bad = |what: &str| Error::new(ErrorCode::Corrupt, format!("guard slot: {what}"));
        let id_len = b[ID..ID + 128].iter().position(|x| *x == 0).unwrap_or(128);
        let blueprint_id = std::str::from_utf8(&b[ID..ID + id_len]).map_err(|_| bad("id is not UTF-8"))?.to_string();
        let dev_len = b[DEVICE..DEVICE + 16].iter().position(|x| *x == 0).unwrap_or(16);
        let device = std::str::from_utf8(&b[DEVICE..DEVICE + dev_len]).map_err(|_| bad("device is not UTF-8"))?.to_string();
        let n = u32::from_le_bytes(b[COUNTS..COUNTS + 4].try_into().expect("4")) as usize;
        let flags = u32::from_le_bytes(b[COUNTS + 4..COUNTS + 8].try_into().expect("4"));
        if n > MAX_INPUTS {
            return Err(bad("too many inputs"));
        }
        let mut inputs = Vec::with_capacity(n);
        for i in 0..n {
            let at = INPUTS + i * INPUT_SIZE;
            let dtype = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
            let rank = b[at + 2] as usize;
            if dtype >= DTYPES.len() || rank > MAX_RANK {
                return Err(bad("bad input dtype or rank"));
            }
            let word = |o: usize| i64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
            inputs.push(InputGuard {
                index: i,
                dtype: DTYPES[dtype].to_string(),
                requires_grad: b[at + 3] != 0,
                shape: (0..rank).map(|d| word(at + 8 + d * 8)).collect(),
                stride: (0..rank).map(|d| word(at + 8 + MAX_RANK * 8 + d * 8)).collect(),
            });
        }
        Ok(GuardEntry {
            blueprint_id,
            checksum: b[CHECKSUM..CHECKSUM + 32].try_into().expect("32"),
            guard_digest: b[DIGEST..DIGEST + 32].try_into().expect("32"),
            device,
            dynamic_batch: flags & FLAG_DYNAMIC_BATCH != 0,
            spec: GuardSpec(inputs),
        })
    }

    /// Whether the stored digest is the digest of the stored spec.
    pub fn digest_matches(&self) -> bool {
        self.spec.digest() == super::hex(&self.guard_digest)
    }
}

/// FNV-1a: a fast, stable hash for slot placement.
fn slot_hash(id: &[u8]) -> u64 {
    id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Bytes of a slot that carry content for `inputs` inputs (the rest is zero).
fn content_len(inputs: usize) -> usize {
    INPUTS + inputs.min(MAX_INPUTS) * INPUT_SIZE
}

/// Inputs a slot declares (clamped; a bad count fails the CRC).
fn declared_inputs(b: &[u8; SLOT_SIZE]) -> usize {
    u32::from_le_bytes(b[COUNTS..COUNTS + 4].try_into().expect("4")) as usize
}

/// CRC over a slot's content: from the state word to the end of the last
/// declared input (kept short: it is on every guard check's path).
fn slot_crc(b: &[u8; SLOT_SIZE]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[CRC + 4..content_len(declared_inputs(b))]);
    h.update(&(declared_inputs(b) as u64).to_le_bytes());
    h.finalize()
}

/// Why a slot could not be read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotFault {
    /// The CRC does not match (damaged or torn on disk).
    Torn,
    /// The generation stayed odd (a writer busy, or dead mid-update).
    Busy,
}

/// Metadata of one input tensor, as a caller presents it for a guard check.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    /// dtype code (see [`dtype_code`]).
    pub dtype: u32,
    /// Sizes.
    pub shape: &'a [i64],
    /// Strides in elements.
    pub stride: &'a [i64],
}

/// The outcome of a guard check: a match, or the first precise reason it
/// does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The inputs match; the artifact's sha256.
    Match {
        /// sha256 of the matching artifact.
        checksum: [u8; 32],
    },
    /// No guard entry for the blueprint.
    UnknownBlueprint,
    /// The slot could not be read consistently (torn or mid-update).
    Unreadable,
    /// Wrong number of inputs.
    InputCount {
        /// Inputs the artifact takes.
        expected: usize,
        /// Inputs given.
        actual: usize,
    },
    /// An input has the wrong dtype (codes as [`dtype_code`]).
    Dtype {
        /// Which input.
        input: usize,
        /// Expected dtype code.
        expected: u32,
        /// Given dtype code.
        actual: u32,
    },
    /// An input has the wrong number of dimensions.
    Rank {
        /// Which input.
        input: usize,
        /// Expected rank.
        expected: usize,
        /// Given rank.
        actual: usize,
    },
    /// A dimension has the wrong size.
    Shape {
        /// Which input.
        input: usize,
        /// Which dimension.
        dim: usize,
        /// Expected size.
        expected: i64,
        /// Given size.
        actual: i64,
    },
    /// A dimension has the wrong stride (the artifact wants this layout).
    Stride {
        /// Which input.
        input: usize,
        /// Which dimension.
        dim: usize,
        /// Expected stride.
        expected: i64,
        /// Given stride.
        actual: i64,
    },
}

/// Checks inputs against a consistent slot's guards.
fn check_inputs(b: &[u8; SLOT_SIZE], inputs: &[TensorMeta<'_>]) -> Verdict {
    let n = u32::from_le_bytes(b[COUNTS..COUNTS + 4].try_into().expect("4")) as usize;
    let dynamic = u32::from_le_bytes(b[COUNTS + 4..COUNTS + 8].try_into().expect("4")) & FLAG_DYNAMIC_BATCH != 0;
    if n != inputs.len() || n > MAX_INPUTS {
        return Verdict::InputCount { expected: n, actual: inputs.len() };
    }
    let batch = inputs.first().and_then(|t| t.shape.first().copied());
    for (i, t) in inputs.iter().enumerate() {
        let at = INPUTS + i * INPUT_SIZE;
        let dtype = u32::from(u16::from_le_bytes([b[at], b[at + 1]]));
        if dtype != t.dtype {
            return Verdict::Dtype { input: i, expected: dtype, actual: t.dtype };
        }
        let rank = b[at + 2] as usize;
        if rank != t.shape.len() || rank != t.stride.len() || rank > MAX_RANK {
            return Verdict::Rank { input: i, expected: rank, actual: t.shape.len() };
        }
        let word = |o: usize| i64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        // Sizes first: a wrong size is the more basic reason.
        for d in 0..rank {
            let expected = word(at + 8 + d * 8);
            let actual = t.shape[d];
            let free = dynamic && d == 0 && actual >= 1 && Some(actual) == batch;
            if actual != expected && !free {
                return Verdict::Shape { input: i, dim: d, expected, actual };
            }
        }
        for d in 0..rank {
            let (expected, actual) = (word(at + 8 + MAX_RANK * 8 + d * 8), t.stride[d]);
            // A dimension of size 1 has no meaningful stride.
            if actual != expected && t.shape[d] != 1 {
                return Verdict::Stride { input: i, dim: d, expected, actual };
            }
        }
    }
    let mut checksum = [0u8; 32];
    checksum.copy_from_slice(&b[CHECKSUM..CHECKSUM + 32]);
    Verdict::Match { checksum }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A consistent slot for the blueprint.
    Found(GuardEntry),
    /// No slot for the blueprint.
    Missing,
}

/// A mapped guard table (read-only or writable).
pub struct GuardTable {
    path: PathBuf,
    map: MmapRaw,
    slots: u32,
    _file: File,
}

// SAFETY: all access to the mapping goes through atomic word operations.
unsafe impl Send for GuardTable {}
unsafe impl Sync for GuardTable {}

impl GuardTable {
    /// Opens the table at `path` read-only (no forge needed). Checks its header.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(format!("open guard table {}", path.display()), e))?;
        Self::map(path, file, false)
    }

    /// Opens (creating with `slots` slots if missing or unreadable) the
    /// table for writing. Space is reserved with `fallocate` before mapping.
    pub fn open_writable(path: &Path, slots: u32) -> Result<Self> {
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
            if let Ok(table) = Self::map(path, file, true) {
                return Ok(table);
            }
        }
        Self::create(path, slots)
    }

    /// Creates a fresh, empty table (replacing any file at `path`).
    pub fn create(path: &Path, slots: u32) -> Result<Self> {
        let len = (HEADER_SIZE + slots as usize * SLOT_SIZE) as u64;
        let temp = path.with_extension("new");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(|e| Error::io(format!("create guard table {}", temp.display()), e))?;
        // SAFETY: fallocate on our descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&temp);
            return Err(Error::io(format!("reserve {len} bytes for guard table {}", temp.display()), err));
        }
        let mut header = [0u8; HEADER_SIZE];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(SLOT_SIZE as u32).to_le_bytes());
        header[16..20].copy_from_slice(&slots.to_le_bytes());
        use std::os::unix::fs::FileExt;
        file.write_all_at(&header, 0).map_err(|e| Error::io("write guard table header", e))?;
        file.sync_all().map_err(|e| Error::io("fsync guard table", e))?;
        std::fs::rename(&temp, path).map_err(|e| Error::io(format!("rename guard table to {}", path.display()), e))?;
        if let Some(dir) = path.parent() {
            crate::store::sync_dir(dir)?;
        }
        Self::map(path, file, true)
    }

    fn map(path: &Path, file: File, writable: bool) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io(format!("stat guard table {}", path.display()), e))?.len();
        let corrupt = |what: String| Error::new(ErrorCode::Corrupt, format!("guard table {}: {what}", path.display()));
        if len < HEADER_SIZE as u64 {
            return Err(corrupt(format!("file of {len} bytes has no header")));
        }
        let options = MmapOptions::new();
        // SAFETY: the mapping covers the file's current length, checked
        // against the header below; the table never shrinks while mapped.
        let map = if writable { options.map_raw(&file) } else { options.map_raw_read_only(&file) }
            .map_err(|e| Error::io(format!("map guard table {}", path.display()), e))?;
        // SAFETY: the header lies within the mapping (len >= HEADER_SIZE).
        let header = unsafe { std::slice::from_raw_parts(map.as_ptr(), HEADER_SIZE) };
        if &header[0..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4"));
        let slot_size = u32::from_le_bytes(header[12..16].try_into().expect("4"));
        let slots = u32::from_le_bytes(header[16..20].try_into().expect("4"));
        if version != LAYOUT_VERSION || slot_size as usize != SLOT_SIZE {
            return Err(corrupt(format!("layout version {version}, slot size {slot_size} (this library: {LAYOUT_VERSION}, {SLOT_SIZE})")));
        }
        if slots == 0 || len < (HEADER_SIZE + slots as usize * SLOT_SIZE) as u64 {
            return Err(corrupt(format!("{slots} slots do not fit a file of {len} bytes")));
        }
        Ok(GuardTable { path: path.to_path_buf(), map, slots, _file: file })
    }

    fn word(&self, slot: u32, word: usize) -> &AtomicU64 {
        debug_assert!(slot < self.slots && word < WORDS);
        // SAFETY: in bounds (checked at map time), 8-byte aligned (header and
        // slot sizes are multiples of 8, mmap is page aligned); all access to
        // table words is atomic.
        unsafe { &*(self.map.as_ptr().add(HEADER_SIZE + slot as usize * SLOT_SIZE + word * 8) as *const AtomicU64) }
    }

    /// Copies a slot consistently: `Ok(None)` for an empty slot, an error
    /// when it stays torn or busy.
    fn read_slot(&self, slot: u32) -> Result<Option<[u8; SLOT_SIZE]>> {
        let mut bytes = [0u8; SLOT_SIZE];
        match self.copy_slot(slot, &mut bytes) {
            Ok(true) => Ok(Some(bytes)),
            Ok(false) => Ok(None),
            Err(SlotFault::Torn) => Err(Error::new(ErrorCode::Corrupt, format!("guard slot {slot} is torn (CRC mismatch)"))),
            Err(SlotFault::Busy) => {
                Err(Error::new(ErrorCode::Corrupt, format!("guard slot {slot} stays mid-update (writer busy or died)")))
            }
        }
    }

    /// The allocation-free core of a read: copies the slot into `bytes`
    /// between two equal, even generations and checks its CRC. `Ok(false)`
    /// for a never-written slot.
    fn copy_slot(&self, slot: u32, bytes: &mut [u8; SLOT_SIZE]) -> std::result::Result<bool, SlotFault> {
        for _ in 0..READ_RETRIES {
            let before = self.word(slot, 0).load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            // The fixed part first, then only the declared inputs.
            let copy = |bytes: &mut [u8; SLOT_SIZE], words: std::ops::Range<usize>| {
                for w in words {
                    let v = self.word(slot, w).load(Ordering::Relaxed);
                    bytes[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            };
            bytes.fill(0);
            copy(bytes, 1..INPUTS / 8);
            let end = content_len(declared_inputs(bytes)).div_ceil(8);
            copy(bytes, INPUTS / 8..end);
            fence(Ordering::Acquire);
            if self.word(slot, 0).load(Ordering::Relaxed) != before {
                continue;
            }
            let state = u32::from_le_bytes(bytes[CRC + 4..CRC + 8].try_into().expect("4"));
            if before == 0 && state == STATE_EMPTY {
                return Ok(false);
            }
            if declared_inputs(bytes) > MAX_INPUTS {
                return Err(SlotFault::Torn);
            }
            let stored = u32::from_le_bytes(bytes[CRC..CRC + 4].try_into().expect("4"));
            if stored != slot_crc(bytes) {
                return Err(SlotFault::Torn);
            }
            return Ok(true);
        }
        Err(SlotFault::Busy)
    }

    /// Checks input tensors against a blueprint's guards, without locks or
    /// heap allocation (the hot path, SPEC R13). With the dynamic-batch flag,
    /// dim 0 may take any size, the same for every input.
    pub fn check(&self, blueprint_id: &[u8], inputs: &[TensorMeta<'_>]) -> Verdict {
        if blueprint_id.is_empty() || blueprint_id.len() > MAX_ID_LEN {
            return Verdict::UnknownBlueprint;
        }
        let mut bytes = [0u8; SLOT_SIZE];
        let start = (slot_hash(blueprint_id) % u64::from(self.slots)) as u32;
        for i in 0..self.slots {
            let slot = (start + i) % self.slots;
            match self.copy_slot(slot, &mut bytes) {
                Ok(false) => return Verdict::UnknownBlueprint,
                Err(_) => return Verdict::Unreadable,
                Ok(true) => {
                    let state = u32::from_le_bytes(bytes[CRC + 4..CRC + 8].try_into().expect("4"));
                    let id = &bytes[ID..ID + 128];
                    if state == STATE_USED && id.starts_with(blueprint_id) && id[blueprint_id.len()] == 0 {
                        return check_inputs(&bytes, inputs);
                    }
                }
            }
        }
        Verdict::UnknownBlueprint
    }

    /// Finds a blueprint's slot: (slot index, decoded entry if present).
    fn probe(&self, blueprint_id: &str) -> Result<(Option<u32>, Option<(u32, GuardEntry)>)> {
        let start = (slot_hash(blueprint_id.as_bytes()) % u64::from(self.slots)) as u32;
        let mut free = None;
        for i in 0..self.slots {
            let slot = (start + i) % self.slots;
            match self.read_slot(slot) {
                Ok(None) => return Ok((free.or(Some(slot)), None)),
                Ok(Some(bytes)) => {
                    let state = u32::from_le_bytes(bytes[CRC + 4..CRC + 8].try_into().expect("4"));
                    if state == STATE_DELETED {
                        free.get_or_insert(slot);
                        continue;
                    }
                    let entry = GuardEntry::decode(&bytes)?;
                    if entry.blueprint_id == blueprint_id {
                        return Ok((Some(slot), Some((slot, entry))));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok((free, None))
    }

    /// Looks a blueprint up without locks. A torn or busy slot on its probe
    /// path is an error, never a wrong answer.
    pub fn lookup(&self, blueprint_id: &str) -> Result<Lookup> {
        Ok(match self.probe(blueprint_id)?.1 {
            Some((_, entry)) => Lookup::Found(entry),
            None => Lookup::Missing,
        })
    }

    /// Writes (or replaces) a blueprint's slot and syncs it to disk.
    pub fn put(&self, entry: &GuardEntry) -> Result<()> {
        let bytes = entry.encode()?;
        let slot = match self.probe(&entry.blueprint_id) {
            Ok((Some(slot), _)) => slot,
            Ok((None, _)) => return Err(Error::new(ErrorCode::Io, format!("guard table {} is full", self.path.display()))),
            Err(_) => self.repair_target(&entry.blueprint_id),
        };
        self.write_slot(slot, &bytes)
    }

    /// Marks a blueprint's slot deleted (tombstone), if it has one.
    pub fn remove(&self, blueprint_id: &str) -> Result<()> {
        if let (_, Some((slot, _))) = self.probe(blueprint_id)? {
            let mut bytes = [0u8; SLOT_SIZE];
            bytes[CRC + 4..CRC + 8].copy_from_slice(&STATE_DELETED.to_le_bytes());
            self.write_slot(slot, &bytes)?;
        }
        Ok(())
    }

    /// The first slot on a blueprint's probe path that does not read
    /// cleanly (it will be overwritten).
    fn repair_target(&self, blueprint_id: &str) -> u32 {
        let start = (slot_hash(blueprint_id.as_bytes()) % u64::from(self.slots)) as u32;
        (0..self.slots).map(|i| (start + i) % self.slots).find(|s| self.read_slot(*s).is_err()).unwrap_or(start)
    }

    fn write_slot(&self, slot: u32, content: &[u8; SLOT_SIZE]) -> Result<()> {
        let mut bytes = *content;
        let crc = slot_crc(&bytes);
        bytes[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let generation = self.word(slot, 0).load(Ordering::Relaxed);
        let odd = generation | 1;
        let next = odd + 1;
        self.word(slot, 0).store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        failpoint::hit("guard.write").map_err(|e| Error::io("write guard slot", e))?;
        for w in 1..WORDS {
            let v = u64::from_le_bytes(bytes[w * 8..w * 8 + 8].try_into().expect("8"));
            self.word(slot, w).store(v, Ordering::Relaxed);
        }
        self.word(slot, 0).store(next, Ordering::Release);
        let offset = HEADER_SIZE + slot as usize * SLOT_SIZE;
        failpoint::hit("guard.msync")
            .and_then(|_| self.map.flush_range(offset, SLOT_SIZE))
            .map_err(|e| Error::io(format!("msync guard table {}", self.path.display()), e))
    }

    /// Every readable entry, and the number of slots that do not read cleanly.
    pub fn entries(&self) -> (Vec<GuardEntry>, usize) {
        let mut entries = Vec::new();
        let mut damaged = 0;
        for slot in 0..self.slots {
            match self.read_slot(slot) {
                Ok(Some(bytes)) => {
                    let state = u32::from_le_bytes(bytes[CRC + 4..CRC + 8].try_into().expect("4"));
                    if state == STATE_USED {
                        match GuardEntry::decode(&bytes) {
                            Ok(e) => entries.push(e),
                            Err(_) => damaged += 1,
                        }
                    }
                }
                Ok(None) => {}
                Err(_) => damaged += 1,
            }
        }
        (entries, damaged)
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Path of the table file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
