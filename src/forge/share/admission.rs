//! Whether a job starts now: in a fleet, a job compiles only under its
//! cache key's lease (claimed at once, or sent ahead while earlier jobs
//! compile), adopts what the bucket holds, or waits for another host.
use std::collections::{HashMap, VecDeque};

use super::{Admission, Admitted, Probed};
use crate::fleet::claims::PendingClaim;
use crate::fleet::lease::Lease;
use crate::fleet::{Claim, FleetEvent, Lookup};
use crate::forge::engine::Forge;
use crate::state::wal::journal::Job;

impl Forge {
    /// Decides whether a job starts now. Without a fleet, or with a local
    /// artifact to adopt, it does. Otherwise it compiles only under its
    /// cache key's lease: won at generation 0, nobody published the key
    /// (a holder that publishes keeps its lease), so the job compiles;
    /// held by another host, or kept by one that published, the job waits
    /// (and its first look finds the published artifact);
    /// the store unreachable, it compiles locally; the bucket's copy
    /// refused by the probe, it compiles locally at once. A reader, which
    /// never claims, asks the bucket (unless the probe just found the key
    /// missing) and waits only for a live lease.
    ///
    /// `claim`: the claim [`Self::claim_ahead`] sent for it, if any.
    pub(in crate::forge) fn admit(&mut self, job: &Job, probed: Option<Probed>, claim: Option<PendingClaim>) -> Admitted {
        let Some(fleet) = &self.fleet else { return Admitted::Go(None) };
        if self.ledger.holds_manifest(job) {
            if let Some(claim) = claim {
                fleet.abandon_claim(claim);
            }
            return Admitted::Go(None);
        }
        if probed == Some(Probed::Refused) {
            fleet.count(FleetEvent::Miss);
            return Admitted::Go(None);
        }
        let publishes = fleet.config().publish;
        if !publishes && probed.is_none() {
            match self.for_job(job, fleet.lookup(&job.cache_key)) {
                Lookup::Found(record, bytes) => {
                    self.keep_fetched(job, &record, &bytes);
                    return Admitted::Go(None);
                }
                Lookup::Refused(refusal, why) => self.log_refusal(job, refusal.as_str(), &why),
                Lookup::Unavailable(error) => {
                    self.compile_here_after_outage(job, &error);
                    return Admitted::Go(None);
                }
                Lookup::Missing => {}
            }
        }
        let fleet = self.fleet.as_ref().expect("a fleet");
        if !publishes {
            // A reader never claims (it could not publish what it compiles):
            // it waits for a live holder, else compiles for itself.
            return match fleet.live_generation(&job.cache_key) {
                Ok(Some(generation)) => {
                    fleet.count(FleetEvent::LeaseWait);
                    Admitted::Wait(generation)
                }
                _ => {
                    fleet.count(FleetEvent::Miss);
                    Admitted::Go(None)
                }
            };
        }
        let claimed = match claim {
            Some(claim) => fleet.finish_claim(claim),
            None => fleet.claim_unclaimed(&job.cache_key),
        };
        match claimed {
            Ok(Claim::Won { lease, .. }) => {
                fleet.count(FleetEvent::Miss);
                Admitted::Go(Some(lease))
            }
            Ok(Claim::Held { generation, .. }) => {
                fleet.count(FleetEvent::LeaseWait);
                Admitted::Wait(generation)
            }
            Err(error) => {
                self.compile_here_after_outage(job, &error);
                Admitted::Go(None)
            }
        }
    }

    /// Sends the claims of the first `ahead` jobs not started yet that
    /// will claim their cache key (a publishing fleet, nothing to adopt
    /// locally, no copy refused by the probe), so that each is answered by
    /// the time the job starts instead of delaying it by a request.
    pub(in crate::forge) fn claim_ahead(
        &self,
        queue: &[Job],
        ready: &mut VecDeque<(usize, Admission)>,
        probed: &HashMap<String, Probed>,
        ahead: usize,
    ) {
        let Some(fleet) = self.fleet.as_ref().filter(|f| f.config().publish) else { return };
        for (position, admission) in ready.iter_mut().take(ahead) {
            let job = &queue[*position];
            if !matches!(admission, Admission::Ask) || probed.get(&job.cache_key) == Some(&Probed::Refused) {
                continue;
            }
            // One holding a local artifact adopts (or compiles past) it, unclaimed.
            *admission = if self.ledger.holds_manifest(job) {
                Admission::Go(None)
            } else {
                Admission::Claiming(fleet.start_claim(&job.cache_key))
            };
        }
    }

    /// Gives up the leases of jobs that will not start (shutting down):
    /// those won, and those whose claim is still under way.
    pub(in crate::forge) fn give_up_admissions(&mut self, admissions: impl Iterator<Item = Admission>) {
        for admission in admissions {
            match admission {
                Admission::Go(Some(lease)) => self.end_lease(lease, false),
                Admission::Claiming(claim) => {
                    if let Some(fleet) = &self.fleet {
                        fleet.abandon_claim(claim);
                    }
                }
                Admission::Go(None) | Admission::Ask => {}
            }
        }
    }

    /// With a lease won by a full claim (after its previous holder gave
    /// up or expired, when a late publication is possible): the bucket's
    /// artifact if it appeared meanwhile (the lease is kept, as its
    /// publisher's would be), else the lease to compile under.
    pub(super) fn under_lease(&mut self, job: &Job, lease: Lease) -> Option<Lease> {
        let fleet = self.fleet.clone().expect("a fleet");
        match self.for_job(job, fleet.lookup(&job.cache_key)) {
            Lookup::Found(record, bytes) => {
                self.keep_fetched(job, &record, &bytes);
                self.end_lease(lease, true);
                None
            }
            Lookup::Refused(refusal, why) => {
                fleet.count(FleetEvent::Miss);
                self.log_refusal(job, refusal.as_str(), &why);
                Some(lease)
            }
            Lookup::Missing | Lookup::Unavailable(_) => {
                fleet.count(FleetEvent::Miss);
                Some(lease)
            }
        }
    }

    /// Ends a lease in the background: kept when the bucket holds its key
    /// (`published`), else given back (a failure only delays others until
    /// it expires); the drain settles them before it returns.
    pub(in crate::forge) fn end_lease(&mut self, lease: Lease, published: bool) {
        if let Some(fleet) = &self.fleet {
            fleet.end_later(lease, published);
        }
    }
}
