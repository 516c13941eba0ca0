//! Publishing what this host compiled: each compile's upload overlaps its
//! local durable store, and whatever an outage left unpublished is
//! published once the bucket is back (from the durable record).
use std::sync::Arc;
use std::time::Instant;

use crate::fleet::publish::PendingPublication;
use crate::fleet::{Fleet, Publication, Refusal};
use crate::forge::engine::Forge;
use crate::forge::host::LogLevel;
use crate::state::artifact::ArtifactRecord;

/// Unpublished artifacts read and published per retry (bounds the memory
/// and the time a retry takes).
const SHARE_BATCH: usize = 64;

impl Forge {
    /// Starts publishing a compiled artifact (its record complete) while
    /// the caller stores it locally; None without a publishing fleet.
    pub(in crate::forge) fn start_publish(&self, record: &ArtifactRecord, bytes: &Arc<Vec<u8>>) -> Option<PendingPublication> {
        let fleet = self.fleet.as_ref().filter(|f| f.config().publish)?;
        Some(fleet.start_publish(record.clone(), Arc::clone(bytes)))
    }

    /// Waits for a publication started with [`Self::start_publish`];
    /// returns whether the bucket now holds the artifact (false: an outage
    /// — it is published later, see [`Forge::share_pending`]).
    pub(in crate::forge) fn finish_publish(&mut self, record: &ArtifactRecord, pending: Option<PendingPublication>) -> bool {
        let Some(pending) = pending else { return false };
        let retry = self.fleet.as_ref().map(|f| f.config().retry_interval).unwrap_or_default();
        let outcome = pending.wait();
        self.log_passed_over();
        match outcome {
            Ok(Publication::Replaced(refusal, why)) => {
                self.log_replaced(&record.blueprint_id, refusal, &why);
                true
            }
            Ok(Publication::Published | Publication::LostRace) => true,
            Err(error) => {
                let message = format!("{}: publishing to the fleet store failed (retried later): {error}", record.blueprint_id);
                self.host.log(LogLevel::Warn, &message);
                self.fleet_retry_at = Some(Instant::now() + retry);
                false
            }
        }
    }

    /// Says that a publication replaced a manifest this forge refused: a
    /// damaged one is healed, but one signed by a key this forge does not
    /// trust means hosts of two trust sets share the bucket, and will
    /// replace each other's manifests (each compiling what the other
    /// published) until every host trusts every signer.
    fn log_replaced(&mut self, blueprint_id: &str, refusal: Refusal, why: &str) {
        let detail = if why.is_empty() { String::new() } else { format!(": {why}") };
        let mut message = format!("{blueprint_id}: replaced the fleet store's manifest, which this forge refused ({}{detail})", refusal.as_str());
        if refusal == Refusal::UntrustedKey {
            message.push_str(
                "; hosts that trust its signer but not this forge's key will refuse this one and may replace it back: \
                 every host of a fleet must trust every host's signing key",
            );
        }
        self.host.log(LogLevel::Warn, &message);
    }

    /// Publishes every current artifact the bucket does not hold yet (an
    /// outage left them, or they were compiled before the fleet was
    /// configured); stops at the first failure and tries again after the
    /// retry interval, starting after the one that failed. Returns how
    /// many were published.
    pub fn share_pending(&mut self) -> usize {
        let Some(pending) = self.unshared_work() else { return 0 };
        let outcome = pending.publish();
        self.record_shared_work(outcome)
    }

    /// What [`Self::share_pending`] would publish now, read from the local
    /// store, to publish without the forge's lock (`None`: nothing to do,
    /// or not yet time to retry).
    pub fn unshared_work(&mut self) -> Option<PendingShares> {
        let fleet = self.fleet.as_ref().filter(|f| f.config().publish)?.clone();
        if self.fleet_retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let mut artifacts = Vec::new();
        for record in self.ledger.unshared(self.fleet_failed_last.as_deref(), SHARE_BATCH) {
            match self.ledger.store().read_verified(&record) {
                Ok(bytes) => artifacts.push((record, bytes)),
                Err(error) => {
                    // Set aside (not offered again; its next job repairs it).
                    self.ledger.set_aside(&record.cache_key);
                    self.log_error(&format!("reading {}'s artifact to publish it (left unpublished)", record.blueprint_id), &error);
                }
            }
        }
        (!artifacts.is_empty()).then_some(PendingShares { fleet, artifacts })
    }

    /// Records what a publication of [`PendingShares`] achieved; returns
    /// how many artifacts the bucket now holds that it did not.
    pub fn record_shared_work(&mut self, outcome: SharedOutcome) -> usize {
        let Some(fleet) = self.fleet.clone() else { return 0 };
        let retry = fleet.config().retry_interval;
        // The bucket holds them even if they stopped being current meanwhile
        // (answers only name the bucket's copy of current artifacts).
        for (blueprint_id, refusal, why) in &outcome.replaced {
            self.log_replaced(blueprint_id, *refusal, why);
        }
        let published: Vec<&ArtifactRecord> = outcome.published.iter().collect();
        // Current ones were announced with their local path: announced
        // again, now with the bucket's reference.
        let shared = match self.ledger.record_shared_and_announce(&published, |record| Some(fleet.artifact_url(record))) {
            Ok(announced) => {
                for &record in &published {
                    self.prefetcher.set_remote(record, fleet.artifact_url(record));
                }
                for (update, announcement) in announced {
                    self.send_catalog_update(&update, announcement.as_ref());
                }
                published.len()
            }
            Err(error) => {
                // The record may have become durable before the failure (a
                // checkpoint): what it made true is acted on all the same.
                self.log_error("recording a publication to the fleet", &error);
                for &record in published.iter().filter(|r| self.ledger.is_shared(r)) {
                    self.prefetcher.set_remote(record, fleet.artifact_url(record));
                }
                self.announce_outbox();
                0
            }
        };
        if shared > 0 {
            self.host.log(LogLevel::Info, &format!("published {shared} artifacts to the fleet store"));
        }
        self.fleet_failed_last = outcome.failed.as_ref().map(|(blueprint_id, _)| blueprint_id.clone());
        match outcome.failed {
            Some((_, error)) => {
                if self.fleet_retry_at.is_none() {
                    self.host.log(LogLevel::Warn, &format!("could not use the fleet store; publication retried every {retry:?}: {error}"));
                }
                self.fleet_retry_at = Some(Instant::now() + retry);
            }
            None => self.fleet_retry_at = None,
        }
        shared
    }
}

/// Artifacts waiting to be published, with the fleet to publish them to:
/// publishing needs no forge lock.
pub struct PendingShares {
    fleet: Arc<Fleet>,
    artifacts: Vec<(ArtifactRecord, Vec<u8>)>,
}

/// What publishing [`PendingShares`] achieved.
pub struct SharedOutcome {
    published: Vec<ArtifactRecord>,
    /// Manifests this forge refused that its publications replaced.
    replaced: Vec<(String, Refusal, String)>,
    /// The blueprint whose publication failed, and why (the rest were not tried).
    failed: Option<(String, crate::base::error::Error)>,
}

impl PendingShares {
    /// Publishes them in order, stopping at the first failure.
    pub fn publish(self) -> SharedOutcome {
        let mut published = Vec::new();
        let mut replaced = Vec::new();
        for (record, bytes) in self.artifacts {
            match self.fleet.publish(&record, &bytes) {
                Err(error) => return SharedOutcome { published, replaced, failed: Some((record.blueprint_id, error)) },
                Ok(Publication::Replaced(refusal, why)) => replaced.push((record.blueprint_id.clone(), refusal, why)),
                Ok(_) => {}
            }
            published.push(record);
        }
        SharedOutcome { published, replaced, failed: None }
    }
}
