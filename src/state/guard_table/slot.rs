//! The layout of the guard table file and of one slot: named byte offsets,
//! the entry a slot holds, its encoding, and the CRC that makes a torn slot
//! detectable.
use crate::base::dtype::Dtype;
use crate::base::error::{Error, ErrorCode, Result};
use crate::base::hex;
use crate::build::guard_spec::{GuardSpec, InputGuard};

/// Magic at the start of the file.
pub const MAGIC: &[u8; 8] = b"TZGUARDS";
/// Version of this layout (2: tables grow, and a replaced table is marked
/// superseded in its header).
pub const LAYOUT_VERSION: u32 = 2;
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

/// Byte offsets of the file header's fields.
pub mod header {
    /// Magic `TZGUARDS` (8 bytes).
    pub const MAGIC: usize = 0;
    /// Layout version (u32).
    pub const VERSION: usize = 8;
    /// Slot size (u32).
    pub const SLOT_SIZE: usize = 12;
    /// Slot count (u32).
    pub const SLOTS: usize = 16;
    /// Superseded (u64): non-zero once a newer table file replaced this one.
    pub const SUPERSEDED: usize = 24;
}

/// Byte offsets inside a slot.
pub mod offset {
    use super::MAX_RANK;

    /// Generation (u64): odd while a writer is inside the slot.
    pub const GENERATION: usize = 0;
    /// CRC32 of the content (u32).
    pub const CRC: usize = 8;
    /// Slot state (u32): empty, used, deleted.
    pub const STATE: usize = 12;
    /// Blueprint id, NUL padded (128 bytes).
    pub const ID: usize = 16;
    /// sha256 of the artifact file (32 bytes).
    pub const CHECKSUM: usize = 144;
    /// Guard digest (32 bytes).
    pub const DIGEST: usize = 176;
    /// Device name, NUL padded (16 bytes).
    pub const DEVICE: usize = 208;
    /// Number of inputs (u32).
    pub const INPUT_COUNT: usize = 224;
    /// Flags (u32).
    pub const FLAGS: usize = 228;
    /// The first input; inputs follow each other every `INPUT_SIZE` bytes.
    pub const INPUTS: usize = 232;
    /// Within an input: dtype code (u16).
    pub const INPUT_DTYPE: usize = 0;
    /// Within an input: rank (u8).
    pub const INPUT_RANK: usize = 2;
    /// Within an input: requires_grad (u8).
    pub const INPUT_REQUIRES_GRAD: usize = 3;
    /// Within an input: `MAX_RANK` sizes (i64).
    pub const INPUT_SHAPE: usize = 8;
    /// Within an input: `MAX_RANK` strides (i64).
    pub const INPUT_STRIDE: usize = 8 + 8 * MAX_RANK;
}

/// Size of one input's description.
pub const INPUT_SIZE: usize = 8 + 16 * MAX_RANK;
/// 8-byte words in a slot.
pub const WORDS: usize = SLOT_SIZE / 8;
/// Slot state: never written.
pub const STATE_EMPTY: u32 = 0;
/// Slot state: holds an entry.
pub const STATE_USED: u32 = 1;
/// Slot state: tombstone of a removed entry.
pub const STATE_DELETED: u32 = 2;
/// Flag: the artifact accepts any size in dim 0.
pub const FLAG_DYNAMIC_BATCH: u32 = 1;

const ID_FIELD: usize = MAX_ID_LEN + 1;
const DEVICE_FIELD: usize = 16;

/// A slot's bytes.
pub type SlotBytes = [u8; SLOT_SIZE];

fn u32_at(b: &SlotBytes, at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn i64_at(b: &SlotBytes, at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put(b: &mut SlotBytes, at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The offset of input `i`.
pub fn input_at(i: usize) -> usize {
    offset::INPUTS + i * INPUT_SIZE
}

/// A slot's state word.
pub fn state(b: &SlotBytes) -> u32 {
    u32_at(b, offset::STATE)
}

/// Inputs a slot declares (unchecked; a bad count fails the CRC).
pub fn declared_inputs(b: &SlotBytes) -> usize {
    u32_at(b, offset::INPUT_COUNT) as usize
}

/// Whether the slot's artifact accepts any batch size.
pub fn dynamic_batch(b: &SlotBytes) -> bool {
    u32_at(b, offset::FLAGS) & FLAG_DYNAMIC_BATCH != 0
}

/// Input `i`'s dtype code, rank, and size and stride of dimension `d`.
pub fn input_dtype(b: &SlotBytes, i: usize) -> u32 {
    let at = input_at(i) + offset::INPUT_DTYPE;
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Input `i`'s rank.
pub fn input_rank(b: &SlotBytes, i: usize) -> usize {
    b[input_at(i) + offset::INPUT_RANK] as usize
}

/// Input `i`'s size in dimension `d`.
pub fn input_size(b: &SlotBytes, i: usize, d: usize) -> i64 {
    i64_at(b, input_at(i) + offset::INPUT_SHAPE + 8 * d)
}

/// Input `i`'s stride in dimension `d`.
pub fn input_stride(b: &SlotBytes, i: usize, d: usize) -> i64 {
    i64_at(b, input_at(i) + offset::INPUT_STRIDE + 8 * d)
}

/// The artifact sha256 a slot holds.
pub fn checksum(b: &SlotBytes) -> [u8; 32] {
    b[offset::CHECKSUM..offset::CHECKSUM + 32].try_into().expect("32 bytes")
}

/// Whether the slot's id is exactly `id`.
pub fn id_is(b: &SlotBytes, id: &[u8]) -> bool {
    let field = &b[offset::ID..offset::ID + ID_FIELD];
    id.len() < ID_FIELD && field.starts_with(id) && field[id.len()] == 0
}

/// The CRC stored in a slot.
pub fn stored_crc(b: &SlotBytes) -> u32 {
    u32_at(b, offset::CRC)
}

/// Bytes of a slot that carry content for `inputs` inputs (the rest is zero).
pub fn content_len(inputs: usize) -> usize {
    input_at(inputs.min(MAX_INPUTS))
}

/// CRC over a slot's content: from the state word to the end of the last
/// declared input (kept short: it is on every guard check's path).
pub fn slot_crc(b: &SlotBytes) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[offset::STATE..content_len(declared_inputs(b))]);
    h.update(&(declared_inputs(b) as u64).to_le_bytes());
    h.finalize()
}

/// Stores the content's CRC in the slot.
pub fn seal(b: &mut SlotBytes) {
    let crc = slot_crc(b);
    put(b, offset::CRC, &crc.to_le_bytes());
}

/// The content of a tombstone.
pub fn tombstone() -> SlotBytes {
    let mut b = [0u8; SLOT_SIZE];
    put(&mut b, offset::STATE, &STATE_DELETED.to_le_bytes());
    b
}

/// FNV-1a: a fast, stable hash for slot placement.
pub fn slot_hash(id: &[u8]) -> u64 {
    id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A decoded slot: the guards of one blueprint's current artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardEntry {
    /// The blueprint.
    pub blueprint_id: String,
    /// sha256 of the artifact file.
    pub checksum: [u8; 32],
    /// Guard digest.
    pub guard_digest: [u8; 32],
    /// Device the artifact runs on.
    pub device: String,
    /// Accepts any size in dim 0.
    pub dynamic_batch: bool,
    /// Per-input guards.
    pub spec: GuardSpec,
}

impl GuardEntry {
    /// Builds an entry from stored metadata (hex checksum and digest).
    pub fn new(blueprint_id: &str, checksum_hex: &str, digest_hex: &str, device: &str, dynamic_batch: bool, spec: &GuardSpec) -> Result<Self> {
        Ok(GuardEntry {
            blueprint_id: blueprint_id.to_string(),
            checksum: hex::decode_array(checksum_hex, "artifact checksum")?,
            guard_digest: hex::decode_array(digest_hex, "guard digest")?,
            device: device.to_string(),
            dynamic_batch,
            spec: spec.clone(),
        })
    }

    /// Encodes the entry into slot bytes (generation and CRC left zero).
    pub fn encode(&self) -> Result<SlotBytes> {
        let id = self.blueprint_id.as_bytes();
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(Error::invalid(format!("blueprint id {:?} does not fit a guard slot (1..={MAX_ID_LEN} bytes)", self.blueprint_id)));
        }
        let inputs = self.spec.inputs();
        if inputs.len() > MAX_INPUTS {
            return Err(Error::invalid(format!("{} has {} inputs; a guard slot holds {MAX_INPUTS}", self.blueprint_id, inputs.len())));
        }
        if self.device.len() >= DEVICE_FIELD {
            return Err(Error::invalid(format!("device name {:?} too long for a guard slot", self.device)));
        }
        let mut b = [0u8; SLOT_SIZE];
        put(&mut b, offset::STATE, &STATE_USED.to_le_bytes());
        put(&mut b, offset::ID, id);
        put(&mut b, offset::CHECKSUM, &self.checksum);
        put(&mut b, offset::DIGEST, &self.guard_digest);
        put(&mut b, offset::DEVICE, self.device.as_bytes());
        put(&mut b, offset::INPUT_COUNT, &(inputs.len() as u32).to_le_bytes());
        let flags = if self.dynamic_batch { FLAG_DYNAMIC_BATCH } else { 0 };
        put(&mut b, offset::FLAGS, &flags.to_le_bytes());
        for (i, g) in inputs.iter().enumerate() {
            if g.shape.len() > MAX_RANK || g.stride.len() != g.shape.len() || g.index != i {
                return Err(Error::invalid(format!("input {i} of {} does not fit a guard slot", self.blueprint_id)));
            }
            let at = input_at(i);
            put(&mut b, at + offset::INPUT_DTYPE, &(g.dtype.code() as u16).to_le_bytes());
            b[at + offset::INPUT_RANK] = g.shape.len() as u8;
            b[at + offset::INPUT_REQUIRES_GRAD] = u8::from(g.requires_grad);
            for (d, v) in g.shape.iter().enumerate() {
                put(&mut b, at + offset::INPUT_SHAPE + 8 * d, &v.to_le_bytes());
            }
            for (d, v) in g.stride.iter().enumerate() {
                put(&mut b, at + offset::INPUT_STRIDE + 8 * d, &v.to_le_bytes());
            }
        }
        Ok(b)
    }

    /// Decodes slot bytes (already checked for CRC and state).
    pub fn decode(b: &SlotBytes) -> Result<Self> {
        let bad = |what: &str| Error::new(ErrorCode::Corrupt, format!("guard slot: {what}"));
        let text = |at: usize, len: usize, what: &str| {
            let field = &b[at..at + len];
            let end = field.iter().position(|x| *x == 0).unwrap_or(len);
            std::str::from_utf8(&field[..end]).map(str::to_string).map_err(|_| bad(what))
        };
        let blueprint_id = text(offset::ID, ID_FIELD, "id is not UTF-8")?;
        let device = text(offset::DEVICE, DEVICE_FIELD, "device is not UTF-8")?;
        let n = declared_inputs(b);
        if n > MAX_INPUTS {
            return Err(bad("too many inputs"));
        }
        let mut inputs = Vec::with_capacity(n);
        for i in 0..n {
            let rank = input_rank(b, i);
            let dtype = Dtype::from_code(input_dtype(b, i));
            let (Some(dtype), true) = (dtype, rank <= MAX_RANK) else { return Err(bad("bad input dtype or rank")) };
            inputs.push(InputGuard {
                index: i,
                dtype,
                requires_grad: b[input_at(i) + offset::INPUT_REQUIRES_GRAD] != 0,
                shape: (0..rank).map(|d| input_size(b, i, d)).collect(),
                stride: (0..rank).map(|d| input_stride(b, i, d)).collect(),
            });
        }
        Ok(GuardEntry {
            blueprint_id,
            checksum: checksum(b),
            guard_digest: b[offset::DIGEST..offset::DIGEST + 32].try_into().expect("32 bytes"),
            device,
            dynamic_batch: dynamic_batch(b),
            spec: GuardSpec(inputs),
        })
    }

    /// Whether the stored digest is the digest of the stored spec.
    pub fn digest_matches(&self) -> bool {
        self.spec.digest() == hex::encode(&self.guard_digest)
    }
}
