//! Claims to compile: a forge's side of the leases ([`super::lease`]) —
//! claiming a cache key (at once, or sent ahead while other jobs compile),
//! reading a lease, and ending leases in the background (kept after a
//! publication, else released so that another host may claim the key).
use std::collections::HashSet;
use std::sync::Arc;

use super::lease::{self, Claim, Lease, LeaseState};
use super::member::Fleet;
use super::stats::FleetEvent;
use crate::base::error::{Error, ErrorCode, Result};

/// A claim of an unclaimed cache key under way (see [`Fleet::start_claim`]).
pub struct PendingClaim {
    task: tokio::task::JoinHandle<Result<Option<Lease>>>,
}

impl std::fmt::Debug for PendingClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingClaim").field("finished", &self.task.is_finished()).finish()
    }
}

impl Fleet {
    /// The cache keys any forge claimed and did not give back (lease
    /// objects of theirs exist: held, kept by a holder that published,
    /// expired or taken over), from one listing, when there are at most
    /// `limit` (see [`super::lease_objects::LeaseObjects::claimed_keys`];
    /// None when more). Only a hint for where to claim next: a store that
    /// keeps emptied folders also lists a key whose lease was given back
    /// (its compile or publication failed, or its holder gave up a claim
    /// sent ahead or stopped), and a host that set that key aside finds
    /// the lease gone when it next reads it while waiting, and claims it.
    pub fn claimed_keys(&self, limit: usize) -> Result<Option<HashSet<String>>> {
        let listed = self.remote.run(self.lease_objects().claimed_keys(&self.names, limit));
        if listed.is_err() {
            self.count(FleetEvent::StoreError);
        }
        listed
    }

    /// Tries to claim a cache key for this forge's compile.
    pub fn claim(&self, cache_key: &str) -> Result<Claim> {
        let claimed = self.remote.run(lease::claim(self.lease_objects(), &self.names, cache_key, &self.holder, self.config.lease_ttl));
        self.claimed(claimed)
    }

    /// Claims a cache key only if its lease is unclaimed (one request);
    /// otherwise answers `Held` at generation 0 without reading it — the
    /// first watch finds out whether it is live (see [`Self::watch_many`]).
    pub fn claim_unclaimed(&self, cache_key: &str) -> Result<Claim> {
        let ttl = self.config.lease_ttl;
        let won = self.remote.run(lease::claim_unclaimed(self.lease_objects(), &self.names, cache_key, &self.holder, ttl));
        self.unclaimed_outcome(won)
    }

    /// Starts [`Self::claim_unclaimed`] in the background and returns at
    /// once, so that the request overlaps the caller's work (a forge
    /// claims its next jobs while the current ones compile);
    /// [`Self::finish_claim`] gives the outcome, [`Self::abandon_claim`]
    /// gives up a claim no longer wanted.
    pub fn start_claim(self: &Arc<Self>, cache_key: &str) -> PendingClaim {
        let (fleet, cache_key) = (Arc::clone(self), cache_key.to_string());
        let task = self.remote.spawn(async move {
            let ttl = fleet.config.lease_ttl;
            lease::claim_unclaimed(fleet.lease_objects(), &fleet.names, &cache_key, &fleet.holder, ttl).await
        });
        PendingClaim { task }
    }

    /// Waits for a claim started with [`Self::start_claim`]; answers as
    /// [`Self::claim_unclaimed`] does.
    pub fn finish_claim(&self, pending: PendingClaim) -> Result<Claim> {
        let won = self.remote.run(pending.task);
        let won = won.unwrap_or_else(|e| Err(Error::new(ErrorCode::Internal, format!("fleet claim task failed: {e}"))));
        self.unclaimed_outcome(won)
    }

    /// Gives up a claim started with [`Self::start_claim`], in the
    /// background (see [`Self::settle`]): a lease it won is removed.
    pub fn abandon_claim(self: &Arc<Self>, pending: PendingClaim) {
        let fleet = Arc::clone(self);
        self.in_background(async move {
            if let Ok(Ok(Some(lease))) = pending.task.await {
                fleet.release_counted(lease).await;
            }
        });
    }

    /// A claim of generation 0 as a [`Claim`], counted.
    fn unclaimed_outcome(&self, won: Result<Option<Lease>>) -> Result<Claim> {
        let ttl = self.config.lease_ttl;
        self.claimed(won.map(|won| match won {
            Some(lease) => Claim::Won { lease, took_over: false },
            None => Claim::Held { holder: String::new(), generation: 0, expires_in: ttl },
        }))
    }

    /// Counts a claim's outcome (and lets tests kill a forge that won one).
    fn claimed(&self, claimed: Result<Claim>) -> Result<Claim> {
        if matches!(claimed, Ok(Claim::Won { .. })) {
            // Tests kill a holder here: its lease must only delay the others.
            crate::sys::failpoint::hit("fleet.leased").map_err(|e| Error::io("fleet lease failpoint", e))?;
        }
        match &claimed {
            Ok(Claim::Won { took_over: true, .. }) => self.count(FleetEvent::LeaseTakeover),
            Ok(_) => {}
            Err(_) => self.count(FleetEvent::StoreError),
        }
        claimed
    }

    /// One generation of a cache key's lease, as it is now.
    pub fn lease_state(&self, cache_key: &str, generation: u64) -> Result<LeaseState> {
        let state = self.remote.run(lease::state(self.lease_objects(), &self.names, cache_key, generation));
        if state.is_err() {
            self.count(FleetEvent::StoreError);
        }
        state
    }

    /// The generation of a cache key's lease that is live now, if any
    /// (see [`lease::live_generation`]).
    pub fn live_generation(&self, cache_key: &str) -> Result<Option<u64>> {
        let live = self.remote.run(lease::live_generation(self.lease_objects(), &self.names, cache_key));
        if live.is_err() {
            self.count(FleetEvent::StoreError);
        }
        live
    }

    /// Ends a lease in the background (see [`Self::settle`]): kept when
    /// the bucket holds its key (`published`), else given up — a failure
    /// to remove it is counted and only delays others until it expires.
    pub fn end_later(self: &Arc<Self>, lease: Lease, published: bool) {
        let fleet = Arc::clone(self);
        self.in_background(async move {
            if published {
                lease::keep(lease).await;
            } else {
                fleet.release_counted(lease).await;
            }
        });
    }

    /// Removes a lease; a failure is counted (it only delays others until
    /// the lease expires).
    async fn release_counted(&self, lease: Lease) {
        if lease::release(self.lease_objects(), &self.names, lease).await.is_err() {
            self.count(FleetEvent::StoreError);
        }
    }

    /// Runs lease work on the store's runtime, for [`Self::settle`] to wait on.
    fn in_background(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let task = self.remote.spawn(work);
        let mut releasing = self.releasing.lock().unwrap_or_else(|p| p.into_inner());
        releasing.retain(|t| !t.is_finished());
        releasing.push(task);
    }

    /// Waits until every lease ended with [`Self::end_later`] is kept or
    /// gone, and every claim given up with [`Self::abandon_claim`] undone.
    pub fn settle(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.releasing.lock().unwrap_or_else(|p| p.into_inner()));
        self.remote.run(async {
            for task in tasks {
                let _ = task.await;
            }
        });
    }

    /// Gives a lease up (best effort: an unreleased lease only delays
    /// others until it expires).
    pub fn release(&self, lease: Lease) -> Result<()> {
        let released = self.remote.run(lease::release(self.lease_objects(), &self.names, lease));
        if released.is_err() {
            self.count(FleetEvent::StoreError);
        }
        released
    }
}
