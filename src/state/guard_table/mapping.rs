//! One mapped guard-table file: its header, its slots read as seqlocks and
//! written by the one writer, open addressing by a hash of the blueprint
//! id. A table that grew is replaced by a larger file; the old one is then
//! marked superseded (a header word) so that readers move to the new one.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::check::{check_inputs, TensorMeta, Verdict};
use super::slot::{
    self, content_len, declared_inputs, offset, slot_hash, GuardEntry, SlotBytes, HEADER_SIZE, LAYOUT_VERSION, MAGIC, MAX_ID_LEN,
    MAX_INPUTS, SLOT_SIZE, STATE_DELETED, STATE_EMPTY, STATE_USED, WORDS,
};
use crate::base::error::{Error, ErrorCode, Result};
use crate::sys::failpoint;
use crate::sys::fs::{fallocate, sync_dir};

/// Retries of a reader racing a writer before it reports the slot busy.
const READ_RETRIES: usize = 1000;

/// Why a slot could not be read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotFault {
    /// The CRC does not match (damaged or torn on disk).
    Torn,
    /// The generation stayed odd (a writer busy, or dead mid-update).
    Busy,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A consistent slot for the blueprint.
    Found(GuardEntry),
    /// No slot for the blueprint.
    Missing,
}

/// What a probe found: the slot to write (the blueprint's, or the first
/// free one on its path), and the blueprint's entry with its slot if it has one.
type Probe = (Option<u32>, Option<(u32, GuardEntry)>);

/// What writing a slot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The blueprint had no slot: one was taken.
    Inserted,
    /// The blueprint's slot was rewritten.
    Replaced,
}

/// One mapped table file (read-only or writable).
pub struct Mapping {
    path: PathBuf,
    map: MmapRaw,
    slots: u32,
    _file: File,
}

// SAFETY: all access to the mapping goes through atomic word operations.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the table at `path` (read-only or writable). Checks its header.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("open guard table {}", path.display()), e))?;
        Self::map(path, file, writable)
    }

    /// Creates a fresh, empty table file of `slots` slots at `path`, durably
    /// (space reserved with `fallocate`, header written and fsynced). The
    /// caller renames it into place.
    pub fn create(temp: &Path, slots: u32) -> Result<Self> {
        let len = (HEADER_SIZE + slots as usize * SLOT_SIZE) as u64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)
            .map_err(|e| Error::io(format!("create guard table {}", temp.display()), e))?;
        if let Err(err) = fallocate(&file, len) {
            let _ = std::fs::remove_file(temp);
            return Err(Error::io(format!("reserve {len} bytes for guard table {}", temp.display()), err));
        }
        let mut header = [0u8; HEADER_SIZE];
        header[slot::header::MAGIC..slot::header::MAGIC + 8].copy_from_slice(MAGIC);
        header[slot::header::VERSION..slot::header::VERSION + 4].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        header[slot::header::SLOT_SIZE..slot::header::SLOT_SIZE + 4].copy_from_slice(&(SLOT_SIZE as u32).to_le_bytes());
        header[slot::header::SLOTS..slot::header::SLOTS + 4].copy_from_slice(&slots.to_le_bytes());
        use std::os::unix::fs::FileExt;
        file.write_all_at(&header, 0).map_err(|e| Error::io("write guard table header", e))?;
        file.sync_all().map_err(|e| Error::io("fsync guard table", e))?;
        Self::map(temp, file, true)
    }

    /// Renames this (freshly created) file over `target`, durably; the
    /// mapping then answers for `target`.
    pub fn publish(&mut self, target: &Path) -> Result<()> {
        self.sync()?;
        std::fs::rename(&self.path, target).map_err(|e| Error::io(format!("rename guard table to {}", target.display()), e))?;
        if let Some(dir) = target.parent() {
            sync_dir(dir)?;
        }
        self.path = target.to_path_buf();
        Ok(())
    }

    /// Flushes every slot to the file.
    pub fn sync(&self) -> Result<()> {
        self.map.flush().map_err(|e| Error::io(format!("msync guard table {}", self.path.display()), e))
    }

    #[inline]
    fn superseded_word(&self) -> &AtomicU64 {
        // SAFETY: the header lies within the mapping and the word is 8-byte
        // aligned (mmap is page aligned); all access to it is atomic.
        unsafe { &*(self.map.as_ptr().add(slot::header::SUPERSEDED) as *const AtomicU64) }
    }

    /// Whether a newer table file has replaced this one at its path.
    #[inline]
    pub fn superseded(&self) -> bool {
        self.superseded_word().load(Ordering::Acquire) != 0
    }

    /// Marks this table superseded (after its replacement is in place) and
    /// flushes the header: readers, in any process, move to the new file.
    pub fn mark_superseded(&self) -> Result<()> {
        self.superseded_word().store(1, Ordering::Release);
        self.map.flush_range(0, HEADER_SIZE).map_err(|e| Error::io(format!("msync guard table {}", self.path.display()), e))
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
        if &header[slot::header::MAGIC..slot::header::MAGIC + 8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let field = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let version = field(slot::header::VERSION);
        let slot_size = field(slot::header::SLOT_SIZE);
        let slots = field(slot::header::SLOTS);
        if version != LAYOUT_VERSION || slot_size as usize != SLOT_SIZE {
            return Err(corrupt(format!("layout version {version}, slot size {slot_size} (this library: {LAYOUT_VERSION}, {SLOT_SIZE})")));
        }
        if slots == 0 || len < (HEADER_SIZE + slots as usize * SLOT_SIZE) as u64 {
            return Err(corrupt(format!("{slots} slots do not fit a file of {len} bytes")));
        }
        Ok(Mapping { path: path.to_path_buf(), map, slots, _file: file })
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
    fn read_slot(&self, slot: u32) -> Result<Option<SlotBytes>> {
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
    fn copy_slot(&self, slot: u32, bytes: &mut SlotBytes) -> std::result::Result<bool, SlotFault> {
        for _ in 0..READ_RETRIES {
            let before = self.word(slot, 0).load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            // The fixed part first, then only the declared inputs.
            let copy = |bytes: &mut SlotBytes, words: std::ops::Range<usize>| {
                for w in words {
                    let v = self.word(slot, w).load(Ordering::Relaxed);
                    bytes[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            };
            bytes.fill(0);
            copy(bytes, 1..offset::INPUTS / 8);
            let end = content_len(declared_inputs(bytes)).div_ceil(8);
            copy(bytes, offset::INPUTS / 8..end);
            fence(Ordering::Acquire);
            if self.word(slot, 0).load(Ordering::Relaxed) != before {
                continue;
            }
            if before == 0 && slot::state(bytes) == STATE_EMPTY {
                return Ok(false);
            }
            if declared_inputs(bytes) > MAX_INPUTS {
                return Err(SlotFault::Torn);
            }
            if slot::stored_crc(bytes) != slot::slot_crc(bytes) {
                return Err(SlotFault::Torn);
            }
            return Ok(true);
        }
        Err(SlotFault::Busy)
    }

    /// Checks input tensors against a blueprint's guards, without locks or
    /// heap allocation (the hot path). With the dynamic-batch flag,
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
                    if slot::state(&bytes) == STATE_USED && slot::id_is(&bytes, blueprint_id) {
                        return check_inputs(&bytes, inputs);
                    }
                }
            }
        }
        Verdict::UnknownBlueprint
    }

    /// Finds a blueprint's slot: (slot index, decoded entry if present).
    fn probe(&self, blueprint_id: &str) -> Result<Probe> {
        let start = (slot_hash(blueprint_id.as_bytes()) % u64::from(self.slots)) as u32;
        let mut free = None;
        for i in 0..self.slots {
            let slot = (start + i) % self.slots;
            match self.read_slot(slot) {
                Ok(None) => return Ok((free.or(Some(slot)), None)),
                Ok(Some(bytes)) => {
                    if slot::state(&bytes) == STATE_DELETED {
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

    /// Writes (or replaces) a blueprint's slot without syncing it (readers
    /// see it at once; [`Self::sync_slots`] makes it durable). Returns what
    /// it did and the slot written, or None when no slot is free on the
    /// blueprint's probe path.
    pub fn write(&self, entry: &GuardEntry) -> Result<Option<(Put, u32)>> {
        let bytes = entry.encode()?;
        let (slot, outcome) = match self.probe(&entry.blueprint_id) {
            Ok((Some(slot), Some(_))) => (slot, Put::Replaced),
            Ok((Some(slot), None)) => (slot, Put::Inserted),
            Ok((None, _)) => return Ok(None),
            Err(_) => (self.repair_target(&entry.blueprint_id), Put::Inserted),
        };
        self.write_slot(slot, &bytes)?;
        Ok(Some((outcome, slot)))
    }

    /// Marks a blueprint's slot deleted (tombstone), if it has one, and
    /// syncs it; returns whether it had one.
    pub fn remove(&self, blueprint_id: &str) -> Result<bool> {
        if let (_, Some((slot, _))) = self.probe(blueprint_id)? {
            self.write_slot(slot, &slot::tombstone())?;
            self.sync_slots(slot, slot)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The first slot on a blueprint's probe path that does not read
    /// cleanly (it will be overwritten).
    fn repair_target(&self, blueprint_id: &str) -> u32 {
        let start = (slot_hash(blueprint_id.as_bytes()) % u64::from(self.slots)) as u32;
        (0..self.slots).map(|i| (start + i) % self.slots).find(|s| self.read_slot(*s).is_err()).unwrap_or(start)
    }

    fn write_slot(&self, slot: u32, content: &SlotBytes) -> Result<()> {
        let mut bytes = *content;
        slot::seal(&mut bytes);
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
        Ok(())
    }

    /// Syncs the slots `first..=last` to the file, in one msync.
    pub fn sync_slots(&self, first: u32, last: u32) -> Result<()> {
        let offset = HEADER_SIZE + first as usize * SLOT_SIZE;
        let len = (last.saturating_sub(first) as usize + 1) * SLOT_SIZE;
        failpoint::hit("guard.msync")
            .and_then(|_| self.map.flush_range(offset, len))
            .map_err(|e| Error::io(format!("msync guard table {}", self.path.display()), e))
    }

    /// Every readable entry, and the number of slots that do not read cleanly.
    pub fn entries(&self) -> (Vec<GuardEntry>, usize) {
        let mut entries = Vec::new();
        let mut damaged = 0;
        for slot in 0..self.slots {
            match self.read_slot(slot) {
                Ok(Some(bytes)) => {
                    if slot::state(&bytes) == STATE_USED {
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
}
