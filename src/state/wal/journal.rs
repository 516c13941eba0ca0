//! The job journal: what the WAL's records mean, and the state they replay
//! into (the job queue and the stored catalog).
//!
//! Each WAL transaction carries JSON records. Submitting jobs, committing an
//! artifact and recording a failure are each one durable transaction; a
//! checkpoint replaces the whole log with one snapshot transaction.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::log::{Recovery, Wal};
use crate::base::device::ComputeDevice;
use crate::base::error::{Error, ErrorCode, Result};
use crate::base::leyline::{KernelCatalogUpdate, MessagePriority};
use crate::build::catalog::Descriptor;
use crate::build::compile::strategy::Strategy;
use crate::state::artifact::ArtifactRecord;

/// A compile job as submitted: everything needed to run it again, typed.
/// In the log the descriptor is its Leyline bytes in hex (`descriptor_hex`),
/// the priority a Leyline `MessagePriority` number, strategy and device
/// their names; decoding any of them wrongly is corruption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Submission sequence number (FIFO order within a priority).
    pub seq: u64,
    /// Priority (higher first).
    #[serde(with = "priority_number")]
    pub priority: MessagePriority,
    /// The blueprint.
    pub blueprint_id: String,
    /// The descriptor as submitted.
    #[serde(rename = "descriptor_hex", with = "descriptor_hex")]
    pub descriptor: Descriptor,
    /// Host parameter values.
    pub overrides: BTreeMap<String, f64>,
    /// Host input shapes.
    pub input_shapes: Option<Vec<Vec<i64>>>,
    /// Strategy.
    pub strategy: Strategy,
    /// Target device.
    pub device: ComputeDevice,
    /// Batch size of the representative inputs.
    pub batch: i64,
    /// Cache key the job will produce.
    pub cache_key: String,
}

/// A descriptor as the hex of its Leyline bytes.
mod descriptor_hex {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::base::{hex, leyline};
    use crate::build::catalog::Descriptor;

    /// Descriptors decoded lately on this thread, by their text: a log
    /// holds the same few descriptors in many records, and recovery should
    /// not validate each of them again (decoding is pure, so this is safe).
    const RECENT: usize = 512;
    thread_local! {
        static DECODED: RefCell<HashMap<String, Descriptor>> = RefCell::new(HashMap::new());
    }

    pub fn serialize<S: Serializer>(descriptor: &Descriptor, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&leyline::encode(&descriptor.to_leyline())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Descriptor, D::Error> {
        let text = String::deserialize(d)?;
        if let Some(known) = DECODED.with(|c| c.borrow().get(&text).cloned()) {
            return Ok(known);
        }
        let bytes = hex::decode(&text, "descriptor_hex").map_err(serde::de::Error::custom)?;
        let descriptor = Descriptor::decode(&bytes).map_err(serde::de::Error::custom)?;
        DECODED.with(|c| {
            let mut cache = c.borrow_mut();
            if cache.len() >= RECENT {
                cache.clear();
            }
            cache.insert(text, descriptor.clone());
        });
        Ok(descriptor)
    }
}

/// An artifact the fleet's bucket holds: its cache key (the manifest) and
/// checksum (the artifact object), so that a later artifact of the same
/// cache key with other bytes is not taken for shared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SharedArtifact {
    /// The cache key.
    pub cache_key: String,
    /// The artifact's sha256 (hex).
    pub checksum: String,
}

impl SharedArtifact {
    /// The entry of a stored artifact.
    pub fn of(record: &ArtifactRecord) -> Self {
        SharedArtifact { cache_key: record.cache_key.clone(), checksum: record.checksum.clone() }
    }
}

/// A catalog update waiting in the outbox to be published on the bus: it
/// enters in the same transaction as the commit it announces (or, for an
/// update naming the bucket's copy of an artifact announced earlier with
/// its local path, as the record that the bucket holds it) and leaves once
/// the bus has it, so that a crash or an outage in between loses none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// Outbox sequence number (publication order).
    pub seq: u64,
    /// Stable id, carried in the envelope's attributes: a consumer that
    /// sees it twice knows the second is a duplicate.
    pub message_id: String,
    /// The update, as the Leyline bytes in hex (`update_hex`).
    #[serde(rename = "update_hex", with = "leyline_hex")]
    pub update: KernelCatalogUpdate,
}

/// A Leyline message as the hex of its bytes.
mod leyline_hex {
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::base::{hex, leyline};

    pub fn serialize<S: Serializer, M: Message>(message: &M, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&leyline::encode(message)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, M: Message + Default>(d: D) -> Result<M, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text, "update_hex").map_err(serde::de::Error::custom)?;
        leyline::decode(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A priority as its Leyline number.
mod priority_number {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::base::leyline::MessagePriority;

    pub fn serialize<S: Serializer>(priority: &MessagePriority, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(*priority as i32)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MessagePriority, D::Error> {
        let value = i32::deserialize(d)?;
        MessagePriority::try_from(value).map_err(|_| serde::de::Error::custom(format!("unknown priority {value}")))
    }
}

/// One journal record (a DATA payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// A job was accepted.
    Enqueue {
        /// The job.
        job: Job,
    },
    /// A job started running (compiling or adopting).
    Start {
        /// The job's sequence number.
        seq: u64,
    },
    /// A job produced a durable artifact, now current for its blueprint.
    Commit {
        /// The job's sequence number (0: adopted or not from a job).
        seq: u64,
        /// The stored artifact.
        artifact: ArtifactRecord,
    },
    /// A job failed and left the queue.
    Fail {
        /// The job's sequence number.
        seq: u64,
        /// Machine-readable reason.
        reason: String,
        /// Message.
        message: String,
    },
    /// A queued job's priority changed (a host submitted it again).
    Reprioritize {
        /// The job's sequence number.
        seq: u64,
        /// The new priority.
        #[serde(with = "priority_number")]
        priority: MessagePriority,
    },
    /// A queued job left the queue unrun because it can no longer be useful
    /// (its descriptor was removed or changed): not a failure.
    Expire {
        /// The job's sequence number.
        seq: u64,
        /// Why (`descriptor_removed`, `descriptor_changed`).
        reason: String,
    },
    /// A cached artifact was evicted (it is no longer current).
    Evict {
        /// The blueprint whose current artifact it was, if it was current.
        blueprint_id: Option<String>,
        /// The evicted cache key.
        cache_key: String,
    },
    /// A catalog update entered the outbox.
    Announce {
        /// The update and its id.
        announcement: Announcement,
    },
    /// Outbox entries the bus has: they leave the outbox.
    Published {
        /// Their outbox sequence numbers.
        seqs: Vec<u64>,
    },
    /// Artifacts the fleet's bucket holds (artifact and manifest): a
    /// remote consumer can fetch them.
    Shared {
        /// Their cache keys and checksums.
        artifacts: Vec<SharedArtifact>,
        /// Which store and place in it holds them (see
        /// [`JournalState::shared_root`]); a record naming another than the
        /// state's replaces what the state held shared. `None` in journals
        /// written before the root was recorded.
        #[serde(default)]
        root: Option<String>,
    },
    /// The whole state, replacing everything before it. Large states are
    /// split: the first record of a checkpoint transaction carries the
    /// state without its bulk, the `CheckpointPart`s after it the rest, so
    /// that no payload exceeds the WAL's bound.
    Checkpoint {
        /// The snapshot.
        state: JournalState,
    },
    /// More of the state of the checkpoint this transaction began with.
    CheckpointPart {
        /// Queued jobs.
        #[serde(default)]
        jobs: Vec<Job>,
        /// Current artifacts.
        #[serde(default)]
        artifacts: Vec<ArtifactRecord>,
        /// Unpublished catalog updates.
        #[serde(default)]
        announcements: Vec<Announcement>,
        /// Artifacts the fleet's bucket holds.
        #[serde(default)]
        shared: Vec<SharedArtifact>,
    },
}

/// The state the journal replays into.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JournalState {
    /// Next submission sequence number.
    pub next_seq: u64,
    /// Jobs accepted and not finished, by sequence number.
    #[serde(with = "jobs_as_list")]
    pub pending: BTreeMap<u64, Job>,
    /// Pending jobs that had started (at recovery: in flight at the crash).
    #[serde(default)]
    pub started: BTreeSet<u64>,
    /// The current artifact of each blueprint.
    pub artifacts: BTreeMap<String, ArtifactRecord>,
    /// The last failure of each blueprint (reason, message).
    pub failures: BTreeMap<String, (String, String)>,
    /// The highest revision committed per blueprint (revisions only grow,
    /// eviction included).
    #[serde(default)]
    pub revisions: BTreeMap<String, u64>,
    /// Transactions applied since the last checkpoint.
    #[serde(default)]
    pub transactions_since_checkpoint: u64,
    /// Catalog updates not yet published on the bus, by outbox sequence.
    #[serde(default, with = "outbox_as_list")]
    pub outbox: BTreeMap<u64, Announcement>,
    /// Next outbox sequence number.
    #[serde(default)]
    pub next_announcement: u64,
    /// Stored artifacts the fleet's bucket holds too.
    #[serde(default)]
    pub shared: BTreeSet<SharedArtifact>,
    /// The fleet store `shared` is about (its endpoint, bucket and
    /// prefix): a forge reopened on another bucket or prefix holds nothing
    /// shared there.
    #[serde(default)]
    pub shared_root: Option<String>,
    /// Queued jobs by cache key (derived from `pending`; not stored).
    #[serde(skip)]
    queued_by_key: HashMap<String, u64>,
}

impl JournalState {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Enqueue { job } => {
                self.next_seq = self.next_seq.max(job.seq + 1);
                self.queued_by_key.insert(job.cache_key.clone(), job.seq);
                self.pending.insert(job.seq, job);
            }
            Record::Start { seq } => {
                if self.pending.contains_key(&seq) {
                    self.started.insert(seq);
                }
            }
            Record::Commit { seq, artifact } => {
                self.dequeue(seq);
                self.started.remove(&seq);
                self.failures.remove(&artifact.blueprint_id);
                let revision = self.revisions.entry(artifact.blueprint_id.clone()).or_default();
                *revision = (*revision).max(artifact.revision);
                self.artifacts.insert(artifact.blueprint_id.clone(), artifact);
            }
            Record::Fail { seq, reason, message } => {
                self.started.remove(&seq);
                if let Some(job) = self.dequeue(seq) {
                    self.failures.insert(job.blueprint_id, (reason, message));
                }
            }
            Record::Reprioritize { seq, priority } => {
                if let Some(job) = self.pending.get_mut(&seq) {
                    job.priority = priority;
                }
            }
            Record::Expire { seq, .. } => {
                self.started.remove(&seq);
                self.dequeue(seq);
            }
            Record::Evict { blueprint_id, cache_key } => {
                if let Some(id) = blueprint_id {
                    if self.artifacts.get(&id).is_some_and(|a| a.cache_key == cache_key) {
                        self.artifacts.remove(&id);
                    }
                }
                self.shared.retain(|s| s.cache_key != cache_key);
            }
            Record::Shared { artifacts, root } => {
                if root != self.shared_root {
                    self.shared.clear();
                    self.shared_root = root;
                }
                self.shared.extend(artifacts);
            }
            Record::Announce { announcement } => {
                self.next_announcement = self.next_announcement.max(announcement.seq + 1);
                self.outbox.insert(announcement.seq, announcement);
            }
            Record::Published { seqs } => {
                for seq in seqs {
                    self.outbox.remove(&seq);
                }
            }
            Record::Checkpoint { state } => {
                *self = state;
                self.reindex();
            }
            Record::CheckpointPart { jobs, artifacts, announcements, shared } => {
                self.shared.extend(shared);
                for announcement in announcements {
                    self.outbox.insert(announcement.seq, announcement);
                }
                for job in jobs {
                    self.queued_by_key.insert(job.cache_key.clone(), job.seq);
                    self.pending.insert(job.seq, job);
                }
                for artifact in artifacts {
                    self.artifacts.insert(artifact.blueprint_id.clone(), artifact);
                }
            }
        }
    }

    /// Rebuilds the queue's index from the queued jobs.
    fn reindex(&mut self) {
        self.queued_by_key = self.pending.values().map(|j| (j.cache_key.clone(), j.seq)).collect();
    }

    /// Takes a job out of the queue.
    fn dequeue(&mut self, seq: u64) -> Option<Job> {
        let job = self.pending.remove(&seq)?;
        if self.queued_by_key.get(&job.cache_key) == Some(&seq) {
            self.queued_by_key.remove(&job.cache_key);
        }
        Some(job)
    }

    /// The queued job that will produce `cache_key`, if any.
    pub fn queued_with_key(&self, cache_key: &str) -> Option<u64> {
        self.queued_by_key.get(cache_key).copied().filter(|seq| self.pending.contains_key(seq))
    }

    /// Records a checkpoint would hold: queued jobs, artifacts, failures.
    pub fn live_records(&self) -> u64 {
        (self.pending.len() + self.artifacts.len() + self.failures.len() + self.outbox.len() + self.shared.len()) as u64
    }

    /// Pending jobs in service order: priority descending, then FIFO.
    pub fn queue(&self) -> Vec<&Job> {
        let mut jobs: Vec<&Job> = self.pending.values().collect();
        jobs.sort_by_key(|j| (std::cmp::Reverse(j.priority as i32), j.seq));
        jobs
    }

    /// Whether the fleet store at `root` holds this artifact.
    pub fn is_shared_at(&self, root: &str, artifact: &SharedArtifact) -> bool {
        self.shared_root.as_deref() == Some(root) && self.shared.contains(artifact)
    }

    /// Sequence numbers of pending jobs (for tests and dumps).
    pub fn pending_seqs(&self) -> BTreeSet<u64> {
        self.pending.keys().copied().collect()
    }
}

/// Serialises the pending map as a list (each job carries its own
/// sequence number): JSON maps inside tagged enums cannot have integer keys.
mod jobs_as_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Job;

    pub fn serialize<S: Serializer>(jobs: &BTreeMap<u64, Job>, s: S) -> Result<S::Ok, S::Error> {
        jobs.values().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, Job>, D::Error> {
        Ok(Vec::<Job>::deserialize(d)?.into_iter().map(|j| (j.seq, j)).collect())
    }
}

/// Serialises the outbox as a list (each entry carries its sequence number).
mod outbox_as_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Announcement;

    pub fn serialize<S: Serializer>(outbox: &BTreeMap<u64, Announcement>, s: S) -> Result<S::Ok, S::Error> {
        outbox.values().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, Announcement>, D::Error> {
        Ok(Vec::<Announcement>::deserialize(d)?.into_iter().map(|a| (a.seq, a)).collect())
    }
}

/// Decodes a recovered log into records.
pub fn records(recovery: &Recovery) -> Result<Vec<(u64, Vec<Record>)>> {
    recovery
        .transactions
        .iter()
        .map(|tx| {
            let records = tx
                .records
                .iter()
                .map(|bytes| {
                    serde_json::from_slice::<Record>(bytes).map_err(|e| {
                        Error::new(ErrorCode::Corrupt, format!("WAL transaction {} has an unreadable record: {e}", tx.sequence))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((tx.sequence, records))
        })
        .collect()
}

/// Replays a recovered log.
pub fn replay(recovery: &Recovery) -> Result<JournalState> {
    let mut state = JournalState { next_seq: 1, ..Default::default() };
    for (_, tx) in records(recovery)? {
        for record in tx {
            state.apply(record);
        }
        state.transactions_since_checkpoint += 1;
    }
    Ok(state)
}

/// Jobs or artifacts per checkpoint part: a few MiB of JSON, far below the
/// WAL's payload bound.
const CHECKPOINT_PART_RECORDS: usize = 2048;

/// Checkpoint once this many transactions accumulated.
pub const CHECKPOINT_TRANSACTIONS: u64 = 4096;

/// The WAL plus the state it replays into.
pub struct Journal {
    wal: Wal,
    state: JournalState,
    recovery: Recovery,
    checkpoint_every: u64,
    /// Why the last checkpoint failed, until taken (see
    /// [`Journal::take_checkpoint_failure`]).
    checkpoint_failure: Option<Error>,
}

impl Journal {
    /// Opens and recovers the journal at `path`.
    pub fn open(path: &Path) -> Result<Journal> {
        let (wal, recovery) = Wal::open(path)?;
        let state = replay(&recovery)?;
        Ok(Journal { wal, state, recovery, checkpoint_every: CHECKPOINT_TRANSACTIONS, checkpoint_failure: None })
    }

    /// Sets how many transactions trigger a checkpoint.
    pub fn set_checkpoint_every(&mut self, transactions: u64) {
        self.checkpoint_every = transactions.max(1);
    }

    /// The replayed state.
    pub fn state(&self) -> &JournalState {
        &self.state
    }

    /// What recovery found at open.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The log.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Durably appends transactions (each a list of records) in one sync
    /// batch, then applies them. Nothing is applied if the write fails.
    /// A checkpoint due afterwards that fails does not fail the append
    /// (its transactions are durable either way): it is kept for
    /// [`Self::take_checkpoint_failure`] and tried again at the next append.
    pub fn append(&mut self, transactions: Vec<Vec<Record>>) -> Result<()> {
        let encoded: Vec<Vec<Vec<u8>>> = transactions
            .iter()
            .map(|tx| tx.iter().map(|r| serde_json::to_vec(r).expect("records serialise")).collect())
            .collect();
        self.wal.commit(&encoded)?;
        for tx in transactions {
            for record in tx {
                self.state.apply(record);
            }
            self.state.transactions_since_checkpoint += 1;
        }
        // The log is rewritten once it holds more transactions than the
        // configured interval, and than a quarter of the records a
        // checkpoint writes: the cost of checkpoints per transaction stays
        // bounded however large the state grows.
        let due = self.checkpoint_every.max(self.state.live_records() / 4);
        if self.state.transactions_since_checkpoint >= due {
            if let Err(error) = self.checkpoint() {
                self.checkpoint_failure = Some(error);
            }
        }
        Ok(())
    }

    /// Why the last checkpoint failed, if one did since the last call (the
    /// log then keeps growing until one succeeds; a disk that is full, say).
    pub fn take_checkpoint_failure(&mut self) -> Option<Error> {
        self.checkpoint_failure.take()
    }

    /// Accepts jobs (assigning sequence numbers) in one durable batch;
    /// returns their sequence numbers once they are on stable storage.
    pub fn submit(&mut self, jobs: Vec<Job>) -> Result<Vec<u64>> {
        let mut seq = self.state.next_seq;
        let mut seqs = Vec::with_capacity(jobs.len());
        let transactions = jobs
            .into_iter()
            .map(|mut job| {
                job.seq = seq;
                seqs.push(seq);
                seq += 1;
                vec![Record::Enqueue { job }]
            })
            .collect();
        self.append(transactions)?;
        Ok(seqs)
    }

    /// Replaces the log with a single snapshot of the state.
    pub fn checkpoint(&mut self) -> Result<()> {
        let mut snapshot = self.state.clone();
        snapshot.transactions_since_checkpoint = 0;
        // The bulk (jobs, artifacts) goes in parts of bounded size.
        let mut head = snapshot.clone();
        let jobs: Vec<Job> = std::mem::take(&mut head.pending).into_values().collect();
        let artifacts: Vec<ArtifactRecord> = std::mem::take(&mut head.artifacts).into_values().collect();
        let announcements: Vec<Announcement> = std::mem::take(&mut head.outbox).into_values().collect();
        let shared: Vec<SharedArtifact> = std::mem::take(&mut head.shared).into_iter().collect();
        let encode = |record: &Record| serde_json::to_vec(record).expect("records serialise");
        let mut payloads = vec![encode(&Record::Checkpoint { state: head })];
        let part = |jobs: &[Job], artifacts: &[ArtifactRecord], announcements: &[Announcement], shared: &[SharedArtifact]| {
            encode(&Record::CheckpointPart {
                jobs: jobs.to_vec(),
                artifacts: artifacts.to_vec(),
                announcements: announcements.to_vec(),
                shared: shared.to_vec(),
            })
        };
        for chunk in jobs.chunks(CHECKPOINT_PART_RECORDS) {
            payloads.push(part(chunk, &[], &[], &[]));
        }
        for chunk in artifacts.chunks(CHECKPOINT_PART_RECORDS) {
            payloads.push(part(&[], chunk, &[], &[]));
        }
        for chunk in announcements.chunks(CHECKPOINT_PART_RECORDS) {
            payloads.push(part(&[], &[], chunk, &[]));
        }
        for chunk in shared.chunks(CHECKPOINT_PART_RECORDS) {
            payloads.push(part(&[], &[], &[], chunk));
        }
        self.wal.rewrite(&[payloads])?;
        self.state = snapshot;
        self.state.reindex();
        self.state.transactions_since_checkpoint = 1;
        Ok(())
    }
}
