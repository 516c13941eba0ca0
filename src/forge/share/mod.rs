//! The forge in its fleet (behaviour of `Forge`): before compiling, take
//! what another host already compiled from the shared bucket (verified,
//! then stored and journaled here like a local compile); compile a cache
//! key only under its lease, waiting a bounded time while another host
//! holds it; publish every local compile, and whatever an outage left
//! unpublished once the bucket is back.
//!
//! Split by job: `fetch` takes what the bucket holds before a drain,
//! `placement` decides where this host starts and steers it away from
//! where others work, `admission` decides whether a job starts (under
//! its lease), `wait` watches the keys other hosts hold, and
//! `publication` publishes what this host compiled.
use std::time::Instant;

use super::engine::Forge;
use super::host::LogLevel;
use crate::fleet::claims::PendingClaim;
use crate::fleet::lease::Lease;
use crate::fleet::FleetEvent;
use crate::state::artifact::ArtifactRecord;
use crate::state::wal::journal::Job;

mod admission;
mod fetch;
mod placement;
mod publication;
mod wait;

pub use publication::{PendingShares, SharedOutcome};

/// Whether a queued job may start now.
pub(super) enum Admission {
    /// Not decided yet: ask the fleet.
    Ask,
    /// Its claim was sent ahead (while earlier jobs compile): decided by
    /// its answer.
    Claiming(PendingClaim),
    /// Start it (holding this lease, when it compiles under one).
    Go(Option<Lease>),
}

/// A job set aside because another host holds its lease.
pub(super) struct Waiting {
    /// Its index in the drained queue.
    pub position: usize,
    /// Since when it waits for the other host (from the first look, once
    /// this host has nothing else to do).
    pub since: Option<Instant>,
    /// The generation of the lease it waits on.
    pub generation: u64,
    /// When its lease was last read (or, before the first read, since
    /// when it waits): the lease is read again after [`wait::LEASE_RECHECK`].
    pub lease_read: Option<Instant>,
}

/// What the opening probe found of a cache key the bucket did not give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probed {
    /// The bucket does not hold it.
    Missing,
    /// The bucket's copy was refused (the job compiles here).
    Refused,
}

/// What the fleet decided for a job about to start.
pub(super) enum Admitted {
    /// Start it (holding this lease, when it compiles under one).
    Go(Option<Lease>),
    /// Another host holds this generation of its lease: wait.
    Wait(u64),
}

/// Jobs looked up together before a drain; also how many of the first
/// to start a cold listing lets a reader (a member that never claims)
/// take as missing without asking the bucket again (later ones are asked
/// as they start: another host may have published them by then).
const LOOKUP_BATCH: usize = 16;

/// The most manifests an opening listing reads; a bucket holding more is
/// asked key by key.
const LISTING_LIMIT: usize = 1000;

impl Forge {
    /// The reference a remote consumer fetches a current artifact by, when
    /// the fleet's bucket holds it.
    pub(in crate::forge) fn remote_ref(&self, record: &ArtifactRecord) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        self.ledger.is_shared(record).then(|| fleet.artifact_url(record))
    }

    /// Says that the bucket could not be asked (about `blueprint_id`, if
    /// given: unreachable, or refusing the credentials or the bucket's
    /// name) and that the work goes on locally.
    pub(super) fn log_outage(&mut self, blueprint_id: &str, error: &crate::base::error::Error) {
        let about = if blueprint_id.is_empty() { String::new() } else { format!("{blueprint_id}: ") };
        self.host.log(LogLevel::Warn, &format!("{about}could not use the fleet store, compiling locally: {error}"));
    }

    /// Logs the first failure of the fleet's Redis that was passed over
    /// (the bucket answered instead), once; later ones are only counted.
    pub(super) fn log_passed_over(&mut self) {
        if let Some(error) = self.fleet.as_ref().and_then(|fleet| fleet.take_passed_over()) {
            let message = format!("{error}; the bucket answers instead (later failures are only counted in store_errors)");
            self.host.log(LogLevel::Warn, &message);
        }
    }

    /// Says that the bucket could not be asked about `job`, which thus
    /// compiles here (counted as a miss: no artifact could be had).
    pub(super) fn compile_here_after_outage(&mut self, job: &Job, error: &crate::base::error::Error) {
        self.log_outage(&job.blueprint_id, error);
        if let Some(fleet) = &self.fleet {
            fleet.count(FleetEvent::Miss);
        }
    }

    pub(super) fn log_refusal(&mut self, job: &Job, reason: &str, why: &str) {
        self.host.log(LogLevel::Warn, &format!("{}: the fleet store's copy is refused ({reason}: {why}); compiling locally", job.blueprint_id));
    }
}
