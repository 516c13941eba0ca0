//! Before a drain: what the bucket already holds of the jobs to start is
//! fetched (verified), stored durably here and adopted instead of compiled.
use std::collections::HashMap;

use super::{Probed, LISTING_LIMIT, LOOKUP_BATCH};
use crate::fleet::{Fleet, FleetEvent, Lookup, Refusal};
use crate::forge::engine::Forge;
use crate::state::artifact::ArtifactRecord;
use crate::state::wal::journal::Job;

impl Forge {
    /// Before a drain: finds which of the jobs to start (`order`: queue
    /// positions, in start order) have no local artifact but one in the
    /// bucket, and stores what verifies locally (each such job then adopts
    /// it instead of compiling). Many jobs are probed with one listing of
    /// the bucket's manifests, a few (or a bucket too large to list) by
    /// looking up a batch at a time until a batch finds nothing. Returns
    /// the cache keys whose copy was refused, and those found missing that
    /// start first (a reader takes them as missing without asking again).
    pub(in crate::forge) fn fetch_from_fleet(&mut self, queue: &[Job], order: impl Iterator<Item = usize>) -> HashMap<String, Probed> {
        let mut probed = HashMap::new();
        let Some(fleet) = self.fleet.clone() else { return probed };
        let wanted: Vec<&Job> = order.map(|i| &queue[i]).filter(|j| !self.ledger.holds_manifest(j)).collect();
        let listed = if wanted.len() > LOOKUP_BATCH { fleet.published_keys(LISTING_LIMIT) } else { Ok(None) };
        match listed {
            Err(error) => self.log_outage("", &error),
            Ok(Some(published)) => {
                let (present, absent): (Vec<&Job>, Vec<&Job>) = wanted.into_iter().partition(|j| published.contains(&j.cache_key));
                probed.extend(absent.iter().take(LOOKUP_BATCH).map(|j| (j.cache_key.clone(), Probed::Missing)));
                self.fetch_batches(&fleet, &present, &mut probed);
            }
            Ok(None) => {
                for batch in wanted.chunks(LOOKUP_BATCH) {
                    if self.fetch_batch(&fleet, batch, &mut probed).unwrap_or(0) == 0 {
                        break;
                    }
                }
            }
        }
        self.log_passed_over();
        probed
    }

    /// Looks up jobs the bucket holds, [`LOOKUP_BATCH`] at a time, as
    /// [`Self::fetch_batch`] does; stops once the store cannot be asked.
    pub(super) fn fetch_batches(&mut self, fleet: &Fleet, jobs: &[&Job], probed: &mut HashMap<String, Probed>) {
        for batch in jobs.chunks(LOOKUP_BATCH) {
            if self.fetch_batch(fleet, batch, probed).is_none() {
                break;
            }
        }
    }

    /// Looks up one batch of jobs in the bucket, keeping what verifies and
    /// noting in `probed` the cache keys it lacks or whose copy is refused;
    /// returns how many were found, or None if the store could not be asked.
    pub(super) fn fetch_batch(&mut self, fleet: &Fleet, batch: &[&Job], probed: &mut HashMap<String, Probed>) -> Option<usize> {
        let keys: Vec<String> = batch.iter().map(|j| j.cache_key.clone()).collect();
        let mut found = Vec::new();
        for (job, lookup) in batch.iter().zip(fleet.lookup_many(&keys)) {
            match self.for_job(job, lookup) {
                Lookup::Found(record, bytes) => found.push((*job, *record, bytes)),
                Lookup::Refused(refusal, why) => {
                    self.log_refusal(job, refusal.as_str(), &why);
                    probed.insert(job.cache_key.clone(), Probed::Refused);
                }
                Lookup::Unavailable(error) => {
                    self.log_outage("", &error);
                    return None;
                }
                Lookup::Missing => {
                    probed.insert(job.cache_key.clone(), Probed::Missing);
                }
            }
        }
        let hits = found.len();
        self.keep_all_fetched(found.iter().map(|(job, record, bytes)| (*job, record, bytes.as_slice())));
        Some(hits)
    }

    /// A lookup's answer for `job`: a manifest that verifies but is of
    /// another blueprint (two blueprints sharing a cache key) is refused,
    /// as the wrong manifest, and counted.
    pub(super) fn for_job(&self, job: &Job, lookup: Lookup) -> Lookup {
        match lookup {
            Lookup::Found(record, _) if record.blueprint_id != job.blueprint_id => {
                if let Some(fleet) = &self.fleet {
                    fleet.count(FleetEvent::Refused(Refusal::WrongManifest));
                }
                Lookup::Refused(Refusal::WrongManifest, format!("the bucket's artifact is of {}", record.blueprint_id))
            }
            other => other,
        }
    }

    /// Stores a verified artifact from the bucket durably here.
    pub(super) fn keep_fetched(&mut self, job: &Job, record: &ArtifactRecord, bytes: &[u8]) {
        self.keep_all_fetched(std::iter::once((job, record, bytes)));
    }

    /// Stores verified artifacts from the bucket durably here, all at once
    /// (each job then adopts its own; one whose storing failed compiles).
    pub(super) fn keep_all_fetched<'a>(&mut self, fetched: impl Iterator<Item = (&'a Job, &'a ArtifactRecord, &'a [u8])>) {
        let Some(fleet) = self.fleet.clone() else { return };
        // Each was checked to be of its job's blueprint (see [`Self::for_job`]).
        let kept: Vec<(&ArtifactRecord, &[u8])> = fetched.map(|(_, record, bytes)| (record, bytes)).collect();
        if kept.is_empty() {
            return;
        }
        match self.ledger.store_fetched(&kept) {
            Ok(()) => (0..kept.len()).for_each(|_| fleet.count(FleetEvent::Hit)),
            Err(error) => {
                let ids: Vec<&str> = kept.iter().map(|(record, _)| record.blueprint_id.as_str()).collect();
                let context = format!("storing the artifacts of {} from the fleet (a job whose copy is not stored compiles it)", ids.join(", "));
                self.log_error(&context, &error);
            }
        }
    }
}
