//! The guard table: a memory-mapped file of fixed-layout slots, one per
//! blueprint's current artifact, that other processes (Kasmina) read
//! without locks and without a forge.
//!
//! Layout (little-endian), format version [`LAYOUT_VERSION`] (distinct from
//! the ABI version):
//! - file header, 256 bytes: magic `TZGUARDS`, layout version (u32), slot
//!   size (u32), slot count (u32), superseded flag (u64);
//! - `slot count` slots of [`SLOT_SIZE`] bytes, found by open addressing on
//!   a hash of the blueprint id.
//!
//! A slot is a seqlock: the writer makes its generation odd, writes the
//! words, stores a CRC32 of the content, then makes the generation even.
//! Readers copy the slot between two reads of the generation and accept it
//! only if both are equal and even and the CRC matches, so a torn slot (a
//! writer killed mid-update included) is never accepted.
//!
//! The table grows: when three quarters of its slots are taken (or a probe
//! finds none free) the writer builds a table of twice the slots holding
//! every entry, renames it over the old file and only then marks the old
//! one superseded. Readers — in this process or any other — check that
//! flag after each read: a read of a table not yet superseded is valid
//! (until the flag is set, the old and new tables hold the same entries),
//! and a read of a superseded one is retried on the new file. Old mappings
//! are kept until the handle is dropped, so no reader ever touches an
//! unmapped page. The table is derived data: the forge verifies it against
//! the store at open and rewrites whatever does not match.
pub mod check;
pub mod mapping;
pub mod slot;

use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicPtr, AtomicU32, Ordering};
use std::sync::Mutex;

pub use check::{TensorMeta, Verdict};
pub use mapping::{Lookup, Mapping, Put};
pub use slot::{GuardEntry, DEFAULT_SLOTS, HEADER_SIZE, LAYOUT_VERSION, MAGIC, MAX_ID_LEN, MAX_INPUTS, MAX_RANK, SLOT_SIZE};

use crate::base::error::{Error, ErrorCode, Result};
use crate::state::layout::{replacement_of, retired_of};
use crate::sys::failpoint;

/// Marks superseded a table a writer was replacing when it died (still
/// named `guards.old`), so that readers still on it move to the table in
/// place, and removes the name.
fn supersede_retired(path: &Path) -> Result<()> {
    let retired = retired_of(path);
    if !retired.exists() {
        return Ok(());
    }
    if let Ok(old) = Mapping::open(&retired, true) {
        old.mark_superseded()?;
    }
    std::fs::remove_file(&retired).map_err(|e| Error::io(format!("remove {}", retired.display()), e))
}

/// How many replacements a read follows before it reports the table unreadable.
const FOLLOW_LIMIT: usize = 16;

/// A guard table at a path, following its replacements (read-only or the
/// writer's).
pub struct GuardTable {
    path: PathBuf,
    writable: bool,
    /// The mapping reads and writes go to.
    current: AtomicPtr<Mapping>,
    /// Earlier mappings, kept alive for readers still inside them.
    retired: Mutex<Vec<*mut Mapping>>,
    /// Slots in use (the writer's count, for growth); `UNCOUNTED` until the
    /// first `entries` or `put` counts them.
    used: AtomicU32,
}

/// `used` before the slots were counted.
const UNCOUNTED: u32 = u32::MAX;

// SAFETY: mappings are reached through atomic pointers and freed only on
// drop (which has exclusive access); their words are accessed atomically.
unsafe impl Send for GuardTable {}
unsafe impl Sync for GuardTable {}

impl GuardTable {
    fn over(path: &Path, writable: bool, mapping: Mapping) -> Self {
        // A writer counts its entries when it first needs the count (the
        // forge's open reads every entry anyway, to check them).
        let used = if writable { UNCOUNTED } else { 0 };
        GuardTable {
            path: path.to_path_buf(),
            writable,
            current: AtomicPtr::new(Box::into_raw(Box::new(mapping))),
            retired: Mutex::new(Vec::new()),
            used: AtomicU32::new(used),
        }
    }

    /// Opens the table at `path` read-only (no forge needed). Checks its header.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        Ok(Self::over(path, false, Mapping::open(path, false)?))
    }

    /// Opens (creating with `slots` slots if missing or unreadable) the
    /// table for writing. Space is reserved with `fallocate` before mapping.
    pub fn open_writable(path: &Path, slots: u32) -> Result<Self> {
        supersede_retired(path)?;
        match Mapping::open(path, true) {
            Ok(mapping) if !mapping.superseded() => Ok(Self::over(path, true, mapping)),
            _ => Self::create(path, slots),
        }
    }

    /// Creates a fresh, empty table (replacing any file at `path`, which is
    /// marked superseded so that its readers move to the new one).
    pub fn create(path: &Path, slots: u32) -> Result<Self> {
        supersede_retired(path)?;
        let previous = Mapping::open(path, true).ok();
        let mut mapping = Mapping::create(&replacement_of(path), slots.max(1))?;
        mapping.publish(path)?;
        if let Some(previous) = previous {
            previous.mark_superseded()?;
        }
        Ok(Self::over(path, true, mapping))
    }

    /// Moves to the file now at the path (readers only: the writer makes
    /// the replacements itself); None when a replacement cannot be opened.
    #[cold]
    fn follow(&self) -> Option<&Mapping> {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..FOLLOW_LIMIT {
            let current = self.current.load(Ordering::Acquire);
            // SAFETY: `current` always points to a live mapping, freed only on drop.
            let mapping = unsafe { &*current };
            if !mapping.superseded() {
                return Some(mapping);
            }
            let next = Mapping::open(&self.path, self.writable).ok()?;
            self.current.store(Box::into_raw(Box::new(next)), Ordering::Release);
            retired.push(current);
        }
        None
    }

    /// Runs a read on the mapping in force: a read that ends before the
    /// mapping is marked superseded is valid; one that ends after is retried
    /// on the replacement.
    #[inline]
    fn read<T>(&self, unreadable: impl FnOnce() -> T, read: impl Fn(&Mapping) -> T) -> T {
        // SAFETY: `current` always points to a live mapping, freed only on drop.
        let mut mapping = unsafe { &*self.current.load(Ordering::Acquire) };
        for _ in 0..FOLLOW_LIMIT {
            let value = read(mapping);
            fence(Ordering::Acquire);
            if !mapping.superseded() {
                return value;
            }
            match self.follow() {
                Some(next) => mapping = next,
                None => break,
            }
        }
        unreadable()
    }

    /// Checks input tensors against a blueprint's guards, without locks or
    /// heap allocation (the hot path). With the dynamic-batch flag, dim 0
    /// may take any size of at least 1, the same for every input.
    #[inline]
    pub fn check(&self, blueprint_id: &[u8], inputs: &[TensorMeta<'_>]) -> Verdict {
        self.read(|| Verdict::Unreadable, |m| m.check(blueprint_id, inputs))
    }

    /// Looks a blueprint up without locks. A torn or busy slot on its probe
    /// path is an error, never a wrong answer.
    pub fn lookup(&self, blueprint_id: &str) -> Result<Lookup> {
        let unreadable = || Err(Error::new(ErrorCode::Corrupt, format!("guard table {} was replaced by one that cannot be read", self.path.display())));
        self.read(unreadable, |m| m.lookup(blueprint_id))
    }

    /// Every readable entry, and the number of slots that do not read cleanly.
    pub fn entries(&self) -> (Vec<GuardEntry>, usize) {
        let entries = self.read(|| (Vec::new(), 0), |m| m.entries());
        if self.writable {
            self.used.store(entries.0.len() as u32, Ordering::Relaxed);
        }
        entries
    }

    /// The writer's mapping (the writer never follows: it replaces).
    fn own(&self) -> Result<&Mapping> {
        if !self.writable {
            return Err(Error::invalid(format!("guard table {} is open read-only", self.path.display())));
        }
        // SAFETY: `current` always points to a live mapping, freed only on drop.
        Ok(unsafe { &*self.current.load(Ordering::Acquire) })
    }

    /// Writes (or replaces) a blueprint's slot and syncs it to disk,
    /// growing the table first when it is three quarters full.
    pub fn put(&self, entry: &GuardEntry) -> Result<()> {
        self.put_all(std::slice::from_ref(entry))
    }

    /// Writes (or replaces) the slots of several blueprints and syncs them
    /// to disk together, growing the table as it fills.
    pub fn put_all(&self, entries: &[GuardEntry]) -> Result<()> {
        if self.used.load(Ordering::Relaxed) == UNCOUNTED {
            self.own()?;
            self.entries();
        }
        // The slots written to the current mapping and not synced yet (a
        // growth publishes all of them: the span starts again).
        let mut unsynced: Option<(u32, u32)> = None;
        for entry in entries {
            if u64::from(self.used.load(Ordering::Relaxed)) * 4 >= u64::from(self.own()?.slots()) * 3 {
                self.grow()?;
                unsynced = None;
            }
            let slot = loop {
                match self.own()?.write(entry)? {
                    Some((put, slot)) => {
                        if put == Put::Inserted {
                            self.used.fetch_add(1, Ordering::Relaxed);
                        }
                        break slot;
                    }
                    None => {
                        self.grow()?;
                        unsynced = None;
                    }
                }
            };
            unsynced = Some(unsynced.map_or((slot, slot), |(first, last)| (first.min(slot), last.max(slot))));
        }
        match unsynced {
            Some((first, last)) => self.own()?.sync_slots(first, last),
            None => Ok(()),
        }
    }

    /// Marks a blueprint's slot deleted (tombstone), if it has one.
    pub fn remove(&self, blueprint_id: &str) -> Result<()> {
        if self.own()?.remove(blueprint_id)? {
            // Uncounted stays uncounted: the first count will see the removal.
            let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n != UNCOUNTED).then(|| n.saturating_sub(1)));
        }
        Ok(())
    }

    /// Replaces the table by one of twice the slots holding every entry.
    pub fn grow(&self) -> Result<()> {
        let old = self.own()?;
        let slots = old.slots().checked_mul(2).ok_or_else(|| Error::invalid("guard table cannot grow past 2^32 slots"))?;
        let (entries, _) = old.entries();
        self.replace(Mapping::create(&replacement_of(&self.path), slots)?, &entries)
    }

    /// Replaces the table with a fresh one holding exactly `entries`
    /// (repairing a damaged table): readers move to it whole, never to an
    /// empty table being filled.
    pub fn reset_with(&self, entries: &[GuardEntry]) -> Result<()> {
        let needed = u32::try_from(entries.len() as u64 * 4 / 3 + 1).unwrap_or(u32::MAX);
        let slots = self.own()?.slots().max(needed);
        self.replace(Mapping::create(&replacement_of(&self.path), slots)?, entries)
    }

    /// Fills `fresh` with `entries`, renames it into place, then marks the
    /// old table superseded and makes `fresh` current.
    fn replace(&self, mut fresh: Mapping, entries: &[GuardEntry]) -> Result<()> {
        for entry in entries {
            if fresh.write(entry)?.is_none() {
                return Err(Error::new(ErrorCode::Internal, "a grown guard table cannot hold the old one's entries"));
            }
        }
        // The old table keeps a name until it is marked superseded: if
        // this process dies in between, the next writer marks it.
        let retired = retired_of(&self.path);
        let _ = std::fs::remove_file(&retired);
        match std::fs::hard_link(&self.path, &retired) {
            // Gone from under us (removed by hand): nothing to keep a name for.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.map_err(|e| Error::io(format!("link guard table as {}", retired.display()), e))?,
        }
        fresh.publish(&self.path)?;
        // In place: the fresh table is this writer's from now on.
        let old = self.current.load(Ordering::Acquire);
        self.current.store(Box::into_raw(Box::new(fresh)), Ordering::Release);
        self.retired.lock().unwrap_or_else(|p| p.into_inner()).push(old);
        self.used.store(entries.len() as u32, Ordering::Relaxed);
        failpoint::hit("guard.supersede").map_err(|e| Error::io("mark guard table superseded", e))?;
        // SAFETY: `old` stays mapped (retired) until this table is dropped.
        unsafe { &*old }.mark_superseded()?;
        let _ = std::fs::remove_file(&retired);
        Ok(())
    }

    /// Number of slots of the table in force.
    pub fn slots(&self) -> u32 {
        self.read(|| 0, |m| m.slots())
    }

    /// Path of the table file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for GuardTable {
    fn drop(&mut self) {
        let retired = std::mem::take(self.retired.get_mut().unwrap_or_else(|p| p.into_inner()));
        for mapping in retired.into_iter().chain([*self.current.get_mut()]) {
            // SAFETY: every pointer came from Box::into_raw and is freed once,
            // here, with exclusive access.
            drop(unsafe { Box::from_raw(mapping) });
        }
    }
}
