//! The ledger: the journal, the artifact store and the guard table of one
//! state directory, and the one rule that binds them — they agree. Every
//! change that touches more than one of them goes through here, in the
//! order that keeps the rule true across a crash at any instant:
//! artifact file, manifest, journal commit, guard slot.
use std::collections::{BTreeMap, HashSet};

use super::config::ForgeConfig;
use crate::base::error::{Error, Result};
use crate::base::leyline::{KernelCatalogUpdate, MessagePriority};
use crate::state::artifact::ArtifactRecord;
use crate::state::guard_table::{GuardTable, Lookup};
use crate::state::layout::StateLayout;
use crate::state::signing::KeyRing;
use crate::state::store::ArtifactStore;
use crate::state::verify::guard_entry;
use crate::state::wal::journal::{Announcement, Job, Journal, JournalState, Record, SharedArtifact};

/// What a durable artifact of a job's cache key allows.
#[derive(Debug)]
pub enum Adoption {
    /// It verifies: commit it instead of compiling.
    Adopt(Box<ArtifactRecord>),
    /// It exists but does not verify (damaged file, bad signature): compile.
    Refused(Error),
    /// There is none.
    Nothing,
}

/// One stored artifact to make current (see [`Ledger::commit_all`]).
pub struct Committing<'a> {
    /// The job it ends.
    pub seq: u64,
    /// The artifact, stored already.
    pub record: &'a ArtifactRecord,
    /// Its reference in the fleet's bucket, when the bucket holds it.
    pub remote_ref: Option<String>,
}

/// The durable state of a forge.
pub struct Ledger {
    layout: StateLayout,
    store: ArtifactStore,
    journal: Journal,
    guards: GuardTable,
    keys: KeyRing,
    /// With a bus: the prefix of this open's announcement ids (random, so
    /// that ids from different state directories and opens never collide).
    announcing: Option<String>,
    /// Cache keys whose stored artifact a drain refused in this open
    /// (damaged, or not signed by a trusted key): taken as holding none,
    /// so that a fleet asks its bucket for them, until an artifact is
    /// stored under the key again.
    refused: HashSet<String>,
    /// The fleet store this open shares through ([`crate::fleet::Fleet::root`]),
    /// if any: only what the journal recorded shared there counts as shared.
    fleet_root: Option<String>,
}

impl Ledger {
    /// Opens the store, recovers the journal and maps the guard table of a
    /// state directory the caller has locked.
    pub fn open(layout: &StateLayout, config: &ForgeConfig) -> Result<Ledger> {
        let store = ArtifactStore::open(layout)?;
        let mut journal = Journal::open(&layout.wal())?;
        journal.set_checkpoint_every(config.checkpoint_every);
        let guards = GuardTable::open_writable(&layout.guards(), config.guard_slots)?;
        let announcing = match &config.bus {
            Some(bus) if bus.publish => {
                let nonce = crate::sys::random::bytes::<8>().map_err(|e| Error::io("draw an announcement id prefix", e))?;
                Some(format!("kcu-{}", crate::base::hex::encode(&nonce)))
            }
            _ => None,
        };
        Ok(Ledger {
            layout: layout.clone(),
            store,
            journal,
            guards,
            keys: config.keys.clone(),
            announcing,
            fleet_root: None,
            refused: HashSet::new(),
        })
    }

    /// The replayed journal state.
    pub fn state(&self) -> &JournalState {
        self.journal.state()
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The artifact store.
    pub fn store(&self) -> &ArtifactStore {
        &self.store
    }

    /// The guard table.
    pub fn guards(&self) -> &GuardTable {
        &self.guards
    }

    /// The state directory's layout.
    pub fn layout(&self) -> &StateLayout {
        &self.layout
    }

    /// The keys artifacts are signed and verified with.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The current artifact of every blueprint, by id.
    pub fn artifacts(&self) -> &BTreeMap<String, ArtifactRecord> {
        &self.journal.state().artifacts
    }

    /// Whether a stored artifact may be used: its file verifies and, with
    /// trusted keys configured, its signature does.
    pub fn usable(&self, record: &ArtifactRecord) -> bool {
        self.check_usable(record).is_ok()
    }

    /// Why a stored artifact may not be used, if it may not.
    fn check_usable(&self, record: &ArtifactRecord) -> Result<()> {
        self.store.verify(record).and_then(|_| self.keys.verify(record))
    }

    /// With trusted keys configured, takes every current artifact whose
    /// signature does not verify out of the catalog (it will be compiled and
    /// signed again when needed); returns them with the reason.
    pub fn retire_unverified(&mut self) -> Result<Vec<(ArtifactRecord, Error)>> {
        if !self.keys.verifies() {
            return Ok(Vec::new());
        }
        let failing: Vec<(ArtifactRecord, Error)> =
            self.artifacts().values().filter_map(|r| self.keys.verify(r).err().map(|e| (r.clone(), e))).collect();
        for (record, _) in &failing {
            let evict = Record::Evict { blueprint_id: Some(record.blueprint_id.clone()), cache_key: record.cache_key.clone() };
            self.journal.append(vec![vec![evict]])?;
        }
        Ok(failing)
    }

    /// Makes the guard table agree with the journal's catalog; returns how
    /// many slots were rewritten or removed.
    pub fn sync_guard_table(&mut self) -> Result<usize> {
        let (entries, damaged) = self.guards.entries();
        let expected = &self.journal.state().artifacts;
        let strays = || entries.iter().filter(|entry| !expected.contains_key(&entry.blueprint_id));
        if damaged > 0 {
            // Rebuilt whole before readers move to it: the damaged slots and
            // the strays go, every expected entry is written again.
            let wanted = expected.values().map(guard_entry).collect::<Result<Vec<_>>>()?;
            self.guards.reset_with(&wanted)?;
            return Ok(damaged + strays().count() + wanted.len());
        }
        let mut repaired = 0;
        for entry in strays() {
            self.guards.remove(&entry.blueprint_id)?;
            repaired += 1;
        }
        for record in expected.values() {
            let wanted = guard_entry(record)?;
            if self.guards.lookup(&record.blueprint_id).ok() != Some(Lookup::Found(wanted.clone())) {
                self.guards.put(&wanted)?;
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    /// Whether a manifest of the job's cache key is stored here, verified
    /// or not: the job will not claim or fetch it, but decide at its start
    /// by [`Self::adoption`]. Cheap (no hashing, no signature check), for
    /// the many looks a drain takes at jobs not started yet.
    pub fn holds_manifest(&self, job: &Job) -> bool {
        self.manifest_of(job).is_some()
    }

    /// The stored manifest of the job's cache key, if it is of the job's
    /// blueprint and was not refused (unverified).
    fn manifest_of(&self, job: &Job) -> Option<ArtifactRecord> {
        if self.refused.contains(&job.cache_key) {
            return None;
        }
        self.store.manifest(&job.cache_key).filter(|record| record.blueprint_id == job.blueprint_id)
    }

    /// Takes the stored artifact of a cache key as absent from now on (it
    /// does not verify), until an artifact is stored under the key again:
    /// not published, and its next job looks for it elsewhere.
    pub fn set_aside(&mut self, cache_key: &str) {
        self.refused.insert(cache_key.to_string());
    }

    /// Checks once, before a drain schedules them, the stored artifacts
    /// of queued jobs: each that does not verify is taken as absent from
    /// now on, so that its job is scheduled as one with nothing stored
    /// here (in a fleet: looked for in the bucket before compiling).
    /// Returns those jobs with the reason.
    pub fn set_aside_unusable<'q>(&mut self, jobs: &'q [Job]) -> Vec<(&'q Job, Error)> {
        let mut refused = Vec::new();
        for job in jobs {
            if let Adoption::Refused(error) = self.adoption(job) {
                self.refused.insert(job.cache_key.clone());
                refused.push((job, error));
            }
        }
        refused
    }

    /// Whether a durable artifact of the job's cache key can be adopted
    /// instead of compiling (a crash came between storing and committing
    /// it): only if its file and signature verify.
    pub fn adoption(&self, job: &Job) -> Adoption {
        match self.manifest_of(job) {
            Some(record) => match self.check_usable(&record) {
                Ok(()) => Adoption::Adopt(Box::new(record)),
                Err(error) => Adoption::Refused(error),
            },
            None => Adoption::Nothing,
        }
    }

    /// Durably accepts jobs in one sync; returns their sequence numbers.
    pub fn submit(&mut self, jobs: Vec<Job>) -> Result<Vec<u64>> {
        self.journal.submit(jobs)
    }

    /// Durably changes a queued job's priority.
    pub fn reprioritize(&mut self, seq: u64, priority: MessagePriority) -> Result<()> {
        self.journal.append(vec![vec![Record::Reprioritize { seq, priority }]])
    }

    /// Durably takes queued jobs out of the queue unrun, with their reasons.
    pub fn expire(&mut self, stale: &[(u64, &str)]) -> Result<()> {
        let records = stale.iter().map(|(seq, reason)| Record::Expire { seq: *seq, reason: reason.to_string() }).collect();
        self.journal.append(vec![records])
    }

    /// Durably records that a job started; returns whether it had started
    /// before (it was in flight when the last forge stopped: a retry).
    pub fn record_start(&mut self, seq: u64) -> Result<bool> {
        Ok(self.record_starts(&[seq])?.contains(&seq))
    }

    /// Durably records, in one journal append, that jobs started; returns
    /// those that had started before (retries).
    pub fn record_starts(&mut self, seqs: &[u64]) -> Result<Vec<u64>> {
        let started = &self.journal.state().started;
        let retries = seqs.iter().copied().filter(|seq| started.contains(seq)).collect();
        self.journal.append(seqs.iter().map(|&seq| vec![Record::Start { seq }]).collect())?;
        Ok(retries)
    }

    /// Durably records that a job failed and left the queue.
    pub fn record_failure(&mut self, seq: u64, reason: &str, message: &str) -> Result<()> {
        self.journal.append(vec![vec![Record::Fail { seq, reason: reason.to_string(), message: message.to_string() }]])
    }

    /// The revision a new artifact of the blueprint gets.
    pub fn next_revision(&self, blueprint_id: &str) -> u64 {
        self.journal.state().revisions.get(blueprint_id).copied().unwrap_or(0) + 1
    }

    /// Stores a compiled artifact, its record complete (see
    /// [`Self::complete_record`]), durably: file, then signed manifest
    /// (not yet current: see [`Self::commit_all`]).
    pub fn store_compiled(&mut self, record: &ArtifactRecord, bytes: &[u8]) -> Result<()> {
        self.store.put(record, bytes)?;
        self.refused.remove(&record.cache_key);
        Ok(())
    }

    /// A compiled artifact's complete record — checksum, file name, size,
    /// signature — as [`Self::store_compiled`] stores it.
    pub fn complete_record(&self, mut record: ArtifactRecord, bytes: &[u8]) -> ArtifactRecord {
        record.describe_bytes(bytes);
        self.keys.sign_record(&mut record);
        record
    }

    /// Stores artifacts fetched from the fleet's bucket — their records
    /// complete and verified, their bytes checked — durably, as local
    /// compiles' would be (not yet current: jobs adopt them), and records
    /// that the bucket holds them; all in one durable write and one
    /// journal append.
    pub fn store_fetched(&mut self, fetched: &[(&ArtifactRecord, &[u8])]) -> Result<()> {
        self.store.put_all(fetched)?;
        for (record, _) in fetched {
            self.refused.remove(&record.cache_key);
        }
        let records: Vec<&ArtifactRecord> = fetched.iter().map(|&(record, _)| record).collect();
        self.record_shared(&records)
    }

    /// Durably records, in one journal append, that the fleet's bucket
    /// holds these stored artifacts.
    pub fn record_shared(&mut self, records: &[&ArtifactRecord]) -> Result<()> {
        self.record_shared_and_announce(records, |_| None).map(drop)
    }

    /// Records that the bucket now holds these artifacts, as
    /// [`Self::record_shared`] does, and announces again, in the same
    /// transaction, each that is current under the reference `remote_ref`
    /// gives it: they were announced with their local path, which a
    /// consumer on another host cannot read. Returns the catalog updates
    /// to send (with a bus, each with its outbox entry).
    pub fn record_shared_and_announce(
        &mut self,
        records: &[&ArtifactRecord],
        remote_ref: impl Fn(&ArtifactRecord) -> Option<String>,
    ) -> Result<Vec<(KernelCatalogUpdate, Option<Announcement>)>> {
        let mut artifacts: Vec<SharedArtifact> = Vec::with_capacity(records.len());
        let mut announced = Vec::new();
        let mut next_announcement = self.journal.state().next_announcement;
        for &record in records.iter().filter(|r| !self.is_shared(r)) {
            let shared = SharedArtifact::of(record);
            if artifacts.contains(&shared) {
                continue;
            }
            // Announced as the current record is (it may have been
            // recommitted meanwhile, with the same bytes and cache key).
            let current = self.artifacts().get(&record.blueprint_id).filter(|c| SharedArtifact::of(c) == shared).cloned();
            artifacts.push(shared);
            if let Some(current) = current {
                if let Some(reference) = remote_ref(&current) {
                    announced.push(self.catalog_update(&current, reference, &mut next_announcement));
                }
            }
        }
        if artifacts.is_empty() {
            return Ok(Vec::new());
        }
        let mut transaction = vec![self.shared_record(artifacts)];
        transaction.extend(announced.iter().filter_map(|(_, a)| a.clone()).map(|announcement| Record::Announce { announcement }));
        self.journal.append(vec![transaction])?;
        Ok(announced)
    }

    /// Why the journal's last checkpoint failed, if one did since the
    /// last call (see [`Journal::take_checkpoint_failure`]).
    pub fn take_checkpoint_failure(&mut self) -> Option<Error> {
        self.journal.take_checkpoint_failure()
    }

    /// Sets the fleet store this open shares through (see
    /// [`crate::fleet::Fleet::root`]): what the journal recorded shared in
    /// another store or place counts as unshared here.
    pub fn set_fleet_root(&mut self, root: String) {
        self.fleet_root = Some(root);
    }

    /// Whether the fleet's bucket holds this artifact (these bytes, under
    /// this cache key).
    pub fn is_shared(&self, record: &ArtifactRecord) -> bool {
        let Some(root) = &self.fleet_root else { return false };
        self.journal.state().is_shared_at(root, &SharedArtifact::of(record))
    }

    /// The record that the fleet's store holds these artifacts.
    fn shared_record(&self, artifacts: Vec<SharedArtifact>) -> Record {
        Record::Shared { artifacts, root: self.fleet_root.clone() }
    }

    /// Current artifacts the fleet's bucket does not hold yet, at most
    /// `limit`, in blueprint order from the first after `after` round to
    /// it (so that one whose publication keeps failing, tried last, holds
    /// back none of the others); those set aside as not verifying are left
    /// out (see [`Self::set_aside`]).
    pub fn unshared(&self, after: Option<&str>, limit: usize) -> Vec<ArtifactRecord> {
        let publishable = |r: &&ArtifactRecord| !self.is_shared(r) && !self.refused.contains(&r.cache_key);
        let unshared: Vec<&ArtifactRecord> = self.artifacts().values().filter(publishable).collect();
        let start = after.map_or(0, |id| unshared.partition_point(|r| r.blueprint_id.as_str() <= id));
        unshared[start..].iter().chain(&unshared[..start]).take(limit).map(|&r| r.clone()).collect()
    }

    /// How many current artifacts the fleet's bucket does not hold yet.
    pub fn unshared_count(&self) -> usize {
        self.artifacts().values().filter(|r| !self.is_shared(r)).count()
    }

    /// Makes stored artifacts current: journal commits (one transaction
    /// each, in one append), then guard slots (one sync). Returns the
    /// catalog updates to announce (only now are they durable everywhere)
    /// and, with a bus, their outbox entries — each written in its
    /// commit's own transaction. Outbox entries the bus has published
    /// (`published`) leave the outbox in the same sync. A commit's
    /// `remote_ref`, when the fleet's bucket holds the artifact, is its
    /// update's reference (else the local path) and is recorded shared in
    /// the same transaction.
    pub fn commit_all(
        &mut self,
        commits: &[Committing<'_>],
        published: Vec<u64>,
    ) -> Result<Vec<(KernelCatalogUpdate, Option<Announcement>)>> {
        let mut committed = Vec::with_capacity(commits.len());
        let mut transactions = Vec::with_capacity(commits.len() + 1);
        if !published.is_empty() {
            transactions.push(vec![Record::Published { seqs: published }]);
        }
        let mut next_announcement = self.journal.state().next_announcement;
        for commit in commits {
            let record = commit.record;
            let artifact_ref = commit.remote_ref.clone().unwrap_or_else(|| self.store.artifact_path(record).display().to_string());
            let (update, announcement) = self.catalog_update(record, artifact_ref, &mut next_announcement);
            let mut transaction = vec![Record::Commit { seq: commit.seq, artifact: record.clone() }];
            if commit.remote_ref.is_some() && !self.is_shared(record) {
                transaction.push(self.shared_record(vec![SharedArtifact::of(record)]));
            }
            if let Some(announcement) = &announcement {
                transaction.push(Record::Announce { announcement: announcement.clone() });
            }
            transactions.push(transaction);
            committed.push((update, announcement));
        }
        let entries = commits.iter().map(|c| guard_entry(c.record)).collect::<Result<Vec<_>>>()?;
        self.journal.append(transactions)?;
        self.guards.put_all(&entries)?;
        Ok(committed)
    }

    /// A current artifact's catalog update naming `artifact_ref`, and with
    /// a bus its outbox entry (numbered from `next_announcement`).
    fn catalog_update(
        &self,
        record: &ArtifactRecord,
        artifact_ref: String,
        next_announcement: &mut u64,
    ) -> (KernelCatalogUpdate, Option<Announcement>) {
        let update = KernelCatalogUpdate {
            blueprint_id: record.blueprint_id.clone(),
            artifact_ref,
            checksum: record.checksum.clone(),
            guard_digest: record.guard_digest.clone(),
            compile_ms: record.compile_ms as f32,
            prewarm_ms: record.prewarm_p50_ms as f32,
        };
        let announcement = self.announcing.as_ref().map(|prefix| {
            let seq = *next_announcement;
            *next_announcement += 1;
            Announcement { seq, message_id: format!("{prefix}-{seq}"), update: update.clone() }
        });
        (update, announcement)
    }

    /// Durably takes published announcements out of the outbox.
    pub fn record_published(&mut self, seqs: Vec<u64>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.journal.append(vec![vec![Record::Published { seqs }]])
    }

    /// Whether an outbox entry names its blueprint's current artifact.
    pub fn announces_current(&self, announcement: &Announcement) -> bool {
        let current = self.artifacts().get(&announcement.update.blueprint_id);
        current.is_some_and(|record| record.checksum == announcement.update.checksum)
    }

    /// The outbox entries that no longer name their blueprint's current
    /// artifact (see [`Self::announces_current`]).
    pub fn superseded_announcements(&self) -> Vec<u64> {
        self.outbox().filter(|a| !self.announces_current(a)).map(|a| a.seq).collect()
    }

    /// Catalog updates not yet published on the bus, oldest first.
    pub fn outbox(&self) -> impl Iterator<Item = &Announcement> {
        self.journal.state().outbox.values()
    }

    /// Evicts a cached artifact: if it is current, it leaves the catalog
    /// (journal record, guard slot) first; then its files go. Returns
    /// whether it was current.
    pub fn evict(&mut self, record: &ArtifactRecord) -> Result<bool> {
        let current = self.artifacts().get(&record.blueprint_id).is_some_and(|a| a.cache_key == record.cache_key);
        if current {
            let evict = Record::Evict { blueprint_id: Some(record.blueprint_id.clone()), cache_key: record.cache_key.clone() };
            self.journal.append(vec![vec![evict]])?;
            self.guards.remove(&record.blueprint_id)?;
        }
        self.store.remove(record)?;
        Ok(current)
    }

    /// Removes the files interrupted writes left (temp files, artifacts no
    /// manifest and no current record names); returns how many.
    pub fn remove_debris(&self) -> Result<usize> {
        let referenced = self.artifacts().values().map(|r| r.artifact_file.clone()).collect();
        self.store.remove_debris(&referenced)
    }
}
