//! The forge in its fleet (behaviour of `Forge`): before compiling, take
//! what another host already compiled from the shared bucket (verified,
//! then stored and journaled here like a local compile); compile a cache
//! key only under its lease, waiting a bounded time while another host
//! holds it; publish every local compile, and whatever an outage left
//! unpublished once the bucket is back.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::Forge;
use super::host::LogLevel;
use crate::fleet::lease::{Lease, LeaseState};
use crate::fleet::claims::PendingClaim;
use crate::fleet::publish::PendingPublication;
use crate::fleet::{Claim, Fleet, FleetEvent, Lookup, Publication, Watched};
use crate::state::artifact::ArtifactRecord;
use crate::state::wal::journal::Job;

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
    /// when it waits): the lease is read again after [`LEASE_RECHECK`].
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

/// Unpublished artifacts read and published per retry (bounds the memory
/// and the time a retry takes).
const SHARE_BATCH: usize = 64;

/// The longest pause between two looks at the bucket while waiting.
const MAX_POLL: Duration = Duration::from_millis(100);

/// How many places of its series a drain looks at for its first claim
/// (see [`Forge::seek_start`]) before it keeps its random start instead:
/// eight, so that the places cover every sixth of the queue.
const SEEK_TRIES: usize = 8;

/// The golden ratio's fractional part: its multiples, however many are
/// taken, spread over [0, 1) about evenly, so hosts of consecutive member
/// indices start about evenly apart whatever their number.
const GOLDEN_FRACTION: f64 = 0.618_033_988_749_894_9;

/// The places (indices into `len` jobs, each once) a drain starting at
/// `phase` tries for its first claim, in order: the golden ratio's
/// multiples from the `phase`-th on, as fractions of the way through.
/// Hosts of different phases try different places first; any
/// [`SEEK_TRIES`] consecutive multiples leave no gap wider than a sixth.
fn seek_places(phase: u32, len: usize) -> Vec<usize> {
    let mut places = Vec::with_capacity(SEEK_TRIES.min(len));
    if len == 0 {
        return places;
    }
    for nth in 0..SEEK_TRIES as u64 {
        let fraction = ((u64::from(phase) + nth) as f64 * GOLDEN_FRACTION).fract();
        let place = ((fraction * len as f64) as usize).min(len - 1);
        if !places.contains(&place) {
            places.push(place);
        }
    }
    places
}

/// How often a waiting job reads the lease it waits on (besides looking
/// the bucket up at every poll): bounds how long a holder that gave up,
/// or died, goes unnoticed beyond its lease's expiry.
const LEASE_RECHECK: Duration = Duration::from_millis(500);

impl Forge {
    /// The reference a remote consumer fetches a current artifact by, when
    /// the fleet's bucket holds it.
    pub(super) fn remote_ref(&self, record: &ArtifactRecord) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        self.ledger.is_shared(record).then(|| fleet.artifact_url(record))
    }

    /// Before a drain: finds which of the jobs to start (`order`: queue
    /// positions, in start order) have no local artifact but one in the
    /// bucket, and stores what verifies locally (each such job then adopts
    /// it instead of compiling). Many jobs are probed with one listing of
    /// the bucket's manifests, a few (or a bucket too large to list) by
    /// looking up a batch at a time until a batch finds nothing. Returns
    /// the cache keys whose copy was refused, and those found missing that
    /// start first (a reader takes them as missing without asking again).
    pub(super) fn fetch_from_fleet(&mut self, queue: &[Job], order: impl Iterator<Item = usize>) -> HashMap<String, Probed> {
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
    fn fetch_batches(&mut self, fleet: &Fleet, jobs: &[&Job], probed: &mut HashMap<String, Probed>) {
        for batch in jobs.chunks(LOOKUP_BATCH) {
            if self.fetch_batch(fleet, batch, probed).is_none() {
                break;
            }
        }
    }

    /// Looks up one batch of jobs in the bucket, keeping what verifies and
    /// noting in `probed` the cache keys it lacks or whose copy is refused;
    /// returns how many were found, or None if the store could not be asked.
    fn fetch_batch(&mut self, fleet: &Fleet, batch: &[&Job], probed: &mut HashMap<String, Probed>) -> Option<usize> {
        let keys: Vec<String> = batch.iter().map(|j| j.cache_key.clone()).collect();
        let mut found = Vec::new();
        for (job, lookup) in batch.iter().zip(fleet.lookup_many(&keys)) {
            match lookup {
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

    /// Stores a verified artifact from the bucket durably here.
    fn keep_fetched(&mut self, job: &Job, record: &ArtifactRecord, bytes: &[u8]) {
        self.keep_all_fetched(std::iter::once((job, record, bytes)));
    }

    /// Stores verified artifacts from the bucket durably here, all at once
    /// (each job then adopts its own; one whose storing failed compiles).
    fn keep_all_fetched<'a>(&mut self, fetched: impl Iterator<Item = (&'a Job, &'a ArtifactRecord, &'a [u8])>) {
        let mut kept = Vec::new();
        for (job, record, bytes) in fetched {
            if record.blueprint_id == job.blueprint_id {
                kept.push((record, bytes));
            } else {
                self.log_refusal(job, "wrong_manifest", &format!("the bucket's artifact is of {}", record.blueprint_id));
            }
        }
        if kept.is_empty() {
            return;
        }
        if let Err(error) = self.ledger.store_fetched(&kept) {
            let ids: Vec<&str> = kept.iter().map(|(record, _)| record.blueprint_id.as_str()).collect();
            self.log_error(&format!("storing the artifacts of {} from the fleet (compiling them instead)", ids.join(", ")), &error);
        }
    }

    /// Says that the bucket could not be asked (about `blueprint_id`, if
    /// given) and that the work goes on locally.
    fn log_outage(&mut self, blueprint_id: &str, error: &crate::base::error::Error) {
        let about = if blueprint_id.is_empty() { String::new() } else { format!("{blueprint_id}: ") };
        self.host.log(LogLevel::Warn, &format!("{about}fleet store unavailable, compiling locally: {error}"));
    }

    /// Logs the first failure of the fleet's Redis that was passed over
    /// (the bucket answered instead), once; later ones are only counted.
    fn log_passed_over(&mut self) {
        if let Some(error) = self.fleet.as_ref().and_then(|fleet| fleet.take_passed_over()) {
            let message = format!("{error}; the bucket answers instead (later failures are only counted in store_errors)");
            self.host.log(LogLevel::Warn, &message);
        }
    }

    /// Says that the bucket could not be asked about `job`, which thus
    /// compiles here (counted as a miss: no artifact could be had).
    fn compile_here_after_outage(&mut self, job: &Job, error: &crate::base::error::Error) {
        self.log_outage(&job.blueprint_id, error);
        if let Some(fleet) = &self.fleet {
            fleet.count(FleetEvent::Miss);
        }
    }

    fn log_refusal(&mut self, job: &Job, reason: &str, why: &str) {
        self.host.log(LogLevel::Warn, &format!("{}: the fleet store's copy is refused ({reason}: {why}); compiling locally", job.blueprint_id));
    }

    /// The order a drain starts its jobs in: the queue's, except that in
    /// a fleet each run of equal priority starts at this forge's own
    /// offset, so that hosts starting together claim different blueprints
    /// first instead of queueing behind one another's leases.
    pub(super) fn start_order(&self, queue: &[Job]) -> VecDeque<(usize, Admission)> {
        let mut order: VecDeque<(usize, Admission)> = VecDeque::with_capacity(queue.len());
        let mut start = 0;
        while start < queue.len() {
            let end = start + queue[start..].iter().take_while(|j| j.priority == queue[start].priority).count();
            let run = end - start;
            let offset = if self.fleet.is_some() { self.fleet_offset % run } else { 0 };
            order.extend((0..run).map(|i| (start + (i + offset) % run, Admission::Ask)));
            start = end;
        }
        order
    }

    /// Before a drain's first compile in a publishing fleet: finds where
    /// this host starts. It tries the places of its series (see
    /// [`seek_places`]; its phase is its member index, else this forge's
    /// random offset) among the jobs left to claim, claiming each, and
    /// starts at the first it wins: hosts starting together spread over
    /// the queue instead of meeting at one another's leases all along.
    /// Hosts of indices 0, 1, 2… start in different places and race for no
    /// claim; hosts without one start at random places and rarely race —
    /// which matters, as a store may make the loser of a race wait
    /// (SeaweedFS retries it a second later). A job whose claim it lost
    /// waits, as after any lost claim.
    /// Only the first run of equal priority is reordered; without a win
    /// the drain keeps its order.
    pub(super) fn seek_start(
        &mut self,
        queue: &[Job],
        ready: &mut VecDeque<(usize, Admission)>,
        waiting: &mut Vec<Waiting>,
        probed: &HashMap<String, Probed>,
    ) {
        let Some(fleet) = self.fleet.clone().filter(|f| f.config().publish) else { return };
        let Some(&(first, _)) = ready.front() else { return };
        let band_len = ready.iter().take_while(|(position, _)| queue[*position].priority == queue[first].priority).count();
        let mut band: Vec<(usize, Admission)> = ready.drain(..band_len).collect();
        let mut open: Vec<usize> = band
            .iter()
            .filter(|(position, admission)| {
                let job = &queue[*position];
                matches!(admission, Admission::Ask)
                    && !self.ledger.holds_manifest(job)
                    && probed.get(&job.cache_key) != Some(&Probed::Refused)
            })
            .map(|(position, _)| *position)
            .collect();
        open.sort_unstable();
        let (mut lost, mut start) = (Vec::new(), None);
        let phase = fleet.config().member_index.unwrap_or(self.fleet_offset as u32);
        for place in seek_places(phase, open.len()) {
            let position = open[place];
            let job = &queue[position];
            match fleet.claim_unclaimed(&job.cache_key) {
                Ok(Claim::Won { lease, .. }) => {
                    fleet.count(FleetEvent::Miss);
                    start = Some((position, lease));
                    break;
                }
                Ok(Claim::Held { generation, .. }) => {
                    fleet.count(FleetEvent::LeaseWait);
                    lost.push(position);
                    waiting.push(Waiting { position, since: None, generation, lease_read: None });
                }
                Err(error) => {
                    self.log_outage(&job.blueprint_id, &error);
                    break;
                }
            }
        }
        band.retain(|(position, _)| !lost.contains(position));
        if let Some((position, _)) = start.as_ref().filter(|_| !lost.is_empty()) {
            let id = &queue[*position].blueprint_id;
            let message = format!("{id}: other hosts claimed {} of the places tried first; the queue starts here", lost.len());
            self.host.log(LogLevel::Debug, &message);
        }
        if let Some((position, lease)) = start {
            // The band runs in queue order from its offset: turned, it runs from here.
            let at = band.iter().position(|(p, _)| *p == position).expect("a seeking place is in its band");
            band.rotate_left(at);
            band[0].1 = Admission::Go(Some(lease));
        }
        for entry in band.into_iter().rev() {
            ready.push_front(entry);
        }
    }

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
    pub(super) fn admit(&mut self, job: &Job, probed: Option<Probed>, claim: Option<PendingClaim>) -> Admitted {
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
            match fleet.lookup(&job.cache_key) {
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
            return match fleet.lease_state(&job.cache_key, 0) {
                Ok(LeaseState::Live { .. }) => {
                    fleet.count(FleetEvent::LeaseWait);
                    Admitted::Wait(0)
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

    /// After a claim was lost (other hosts work on this queue too): lists
    /// the announced publications once (see [`Fleet::announced_keys`]),
    /// fetches in batches what was published of the jobs not started yet
    /// and of those waiting (so that they adopt it instead of each
    /// claiming, losing and waiting in turn), and
    /// steers this host away from where the others work. Waiting jobs
    /// whose artifact arrived are ready again, first. Only the next
    /// [`LISTING_LIMIT`] jobs are looked at.
    pub(super) fn look_again(
        &mut self,
        queue: &[Job],
        ready: &mut VecDeque<(usize, Admission)>,
        waiting: &mut Vec<Waiting>,
        probed: &mut HashMap<String, Probed>,
    ) {
        let Some(fleet) = self.fleet.clone() else { return };
        let published = match fleet.announced_keys(LISTING_LIMIT) {
            Ok(Some(published)) => published,
            // Too large to list: each job asks as it starts.
            Ok(None) => return,
            Err(error) => return self.log_outage("", &error),
        };
        let positions = ready.iter().take(LISTING_LIMIT).map(|(position, _)| *position).chain(waiting.iter().map(|w| w.position));
        let wanted: Vec<&Job> = positions
            .map(|position| &queue[position])
            .filter(|job| published.contains(&job.cache_key) && !self.ledger.holds_manifest(job))
            .collect();
        self.fetch_batches(&fleet, &wanted, probed);
        self.log_passed_over();
        self.steer(queue, ready);
        let (arrived, still): (Vec<Waiting>, Vec<Waiting>) =
            waiting.drain(..).partition(|w| self.ledger.holds_manifest(&queue[w.position]));
        *waiting = still;
        for w in arrived.into_iter().rev() {
            ready.push_front((w.position, Admission::Go(None)));
        }
    }

    /// After a lost claim (this host trails another through the queue):
    /// lists the bucket's claims once and sets aside to wait every job
    /// among the next [`LISTING_LIMIT`] not started whose cache key another
    /// host claimed (working on it, or done), instead of losing a claim on
    /// each; then steers the others as [`Self::look_again`] does, now
    /// knowing every claimed job. A job whose copy the probe refused is
    /// not set aside (it compiles here at once). Returns false when the
    /// bucket holds too many claims to list (not worth trying again this
    /// drain).
    pub(super) fn set_aside_claimed(
        &mut self,
        queue: &[Job],
        ready: &mut VecDeque<(usize, Admission)>,
        waiting: &mut Vec<Waiting>,
        probed: &HashMap<String, Probed>,
    ) -> bool {
        let Some(fleet) = self.fleet.clone() else { return false };
        let claimed = match fleet.claimed_keys(LISTING_LIMIT) {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return false,
            Err(error) => {
                self.log_outage("", &error);
                return true;
            }
        };
        let window = ready.len().min(LISTING_LIMIT);
        let (mut kept, waited) = (Vec::with_capacity(window), waiting.len());
        for (position, admission) in ready.drain(..window) {
            let job = &queue[position];
            let refused = probed.get(&job.cache_key) == Some(&Probed::Refused);
            if matches!(admission, Admission::Ask) && claimed.contains(&job.cache_key) && !refused && !self.ledger.holds_manifest(job) {
                fleet.count(FleetEvent::LeaseWait);
                waiting.push(Waiting { position, since: None, generation: 0, lease_read: None });
            } else {
                kept.push((position, admission));
            }
        }
        for entry in kept.into_iter().rev() {
            ready.push_front(entry);
        }
        if waiting.len() > waited {
            let set_aside = waiting.len() - waited;
            let message = format!("other hosts claimed {set_aside} of the jobs not started: they wait for their artifacts (no claim sent)");
            self.host.log(LogLevel::Debug, &message);
        }
        self.steer(queue, ready);
        true
    }

    /// Reorders the next [`LISTING_LIMIT`] jobs not started: those already
    /// decided (claimed by this host, or adopting) stay first; then, of
    /// each priority in turn, the others from the middle of the longest
    /// run of them in queue order. Jobs started here and jobs waiting for
    /// a claim another host won are not among them, so the longest run is
    /// as far as this host knows from where every host works.
    fn steer(&self, queue: &[Job], ready: &mut VecDeque<(usize, Admission)>) {
        let window = ready.len().min(LISTING_LIMIT);
        let (mut decided, mut free) = (Vec::new(), Vec::new());
        for (position, admission) in ready.drain(..window) {
            match admission {
                Admission::Ask if !self.ledger.holds_manifest(&queue[position]) => free.push(position),
                _ => decided.push((position, admission)),
            }
        }
        free.sort_unstable();
        let mut steered = decided;
        let mut band_start = 0;
        while band_start < free.len() {
            let priority = queue[free[band_start]].priority;
            let band_len = free[band_start..].iter().take_while(|&&p| queue[p].priority == priority).count();
            let band = &free[band_start..band_start + band_len];
            let start = middle_of_longest_run(band);
            steered.extend(band[start..].iter().chain(&band[..start]).map(|&p| (p, Admission::Ask)));
            band_start += band_len;
        }
        for entry in steered.into_iter().rev() {
            ready.push_front(entry);
        }
    }

    /// Sends the claims of the first `ahead` jobs not started yet that
    /// will claim their cache key (a publishing fleet, nothing to adopt
    /// locally, no copy refused by the probe), so that each is answered by
    /// the time the job starts instead of delaying it by a request.
    pub(super) fn claim_ahead(
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
    pub(super) fn give_up_admissions(&mut self, admissions: impl Iterator<Item = Admission>) {
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
    fn under_lease(&mut self, job: &Job, lease: Lease) -> Option<Lease> {
        let fleet = self.fleet.as_ref().expect("a fleet");
        match fleet.lookup(&job.cache_key) {
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
    pub(super) fn end_lease(&mut self, lease: Lease, published: bool) {
        if let Some(fleet) = &self.fleet {
            fleet.end_later(lease, published);
        }
    }

    /// While nothing else can run: waits for jobs whose lease another host
    /// holds, looking the bucket up with a growing pause (and reading the
    /// lease now and then), until at least one can start — its artifact
    /// arrived (stored here, to adopt), its lease was given up or expired
    /// (claimed), or it waited the longest allowed (compiled here anyway).
    /// Returns them, admitted.
    pub(super) fn wait_for_fleet(&mut self, queue: &[Job], waiting: &mut Vec<Waiting>) -> VecDeque<(usize, Admission)> {
        let mut admitted = VecDeque::new();
        let mut pause = Duration::from_millis(2);
        let Some(fleet) = self.fleet.clone() else {
            return waiting.drain(..).map(|w| (w.position, Admission::Go(None))).collect();
        };
        let (wait_bound, publishes) = (fleet.config().lease_wait, fleet.config().publish);
        while admitted.is_empty() && !waiting.is_empty() && !self.shutdown.load(Ordering::Acquire) {
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL);
            let now = Instant::now();
            let held: Vec<(String, u64, bool)> = waiting
                .iter_mut()
                .map(|w| {
                    let read_lease = w.lease_read.get_or_insert(now).elapsed() >= LEASE_RECHECK;
                    if read_lease {
                        w.lease_read = Some(now);
                    }
                    (queue[w.position].cache_key.clone(), w.generation, read_lease)
                })
                .collect();
            let watched = fleet.watch_many(&held);
            let (mut still, mut fetched) = (Vec::new(), Vec::new());
            for (mut w, watch) in std::mem::take(waiting).into_iter().zip(watched) {
                let job = &queue[w.position];
                let timed_out = w.since.get_or_insert(now).elapsed() >= wait_bound;
                let go = match watch {
                    Watched::Lookup(Lookup::Found(record, bytes)) => {
                        fetched.push((job, record, bytes));
                        Some(None)
                    }
                    Watched::Lookup(Lookup::Refused(refusal, why)) => {
                        fleet.count(FleetEvent::Miss);
                        self.log_refusal(job, refusal.as_str(), &why);
                        Some(None)
                    }
                    Watched::Lookup(Lookup::Unavailable(error)) => {
                        self.compile_here_after_outage(job, &error);
                        Some(None)
                    }
                    Watched::Held | Watched::Lookup(Lookup::Missing) | Watched::Expired if timed_out => {
                        fleet.count(FleetEvent::WaitTimeout);
                        fleet.count(FleetEvent::Miss);
                        let message = format!("{}: waited {wait_bound:?} for another host's compile; compiling locally", job.blueprint_id);
                        self.host.log(LogLevel::Warn, &message);
                        Some(None)
                    }
                    Watched::Held => None,
                    // Given up or expired: a reader compiles for itself, ...
                    Watched::Lookup(Lookup::Missing) | Watched::Expired if !publishes => {
                        fleet.count(FleetEvent::Miss);
                        Some(None)
                    }
                    // ... a publisher claims it (one waiting host wins).
                    Watched::Lookup(Lookup::Missing) | Watched::Expired => match fleet.claim(&job.cache_key) {
                        Ok(Claim::Won { lease, .. }) => Some(self.under_lease(job, lease)),
                        Ok(Claim::Held { generation, .. }) => {
                            w.generation = generation;
                            None
                        }
                        Err(error) => {
                            self.compile_here_after_outage(job, &error);
                            Some(None)
                        }
                    },
                };
                match go {
                    Some(lease) => admitted.push_back((w.position, Admission::Go(lease))),
                    None => still.push(w),
                }
            }
            // What arrived this round is stored in one durable write.
            self.keep_all_fetched(fetched.iter().map(|(job, record, bytes)| (*job, &**record, bytes.as_slice())));
            *waiting = still;
            self.log_passed_over();
        }
        admitted
    }

    /// Starts publishing a compiled artifact (its record complete) while
    /// the caller stores it locally; None without a publishing fleet.
    pub(super) fn start_publish(&self, record: &ArtifactRecord, bytes: &Arc<Vec<u8>>) -> Option<PendingPublication> {
        let fleet = self.fleet.as_ref().filter(|f| f.config().publish)?;
        Some(fleet.start_publish(record.clone(), Arc::clone(bytes)))
    }

    /// Waits for a publication started with [`Self::start_publish`];
    /// returns whether the bucket now holds the artifact (false: an outage
    /// — it is published later, see [`Forge::share_pending`]).
    pub(super) fn finish_publish(&mut self, record: &ArtifactRecord, pending: Option<PendingPublication>) -> bool {
        let Some(pending) = pending else { return false };
        let retry = self.fleet.as_ref().map(|f| f.config().retry_interval).unwrap_or_default();
        let outcome = pending.wait();
        self.log_passed_over();
        match outcome {
            Ok(Publication::Published | Publication::LostRace) => true,
            Err(error) => {
                let message = format!("{}: publishing to the fleet store failed (retried later): {error}", record.blueprint_id);
                self.host.log(LogLevel::Warn, &message);
                self.fleet_retry_at = Some(Instant::now() + retry);
                false
            }
        }
    }

    /// Publishes every current artifact the bucket does not hold yet (an
    /// outage left them, or they were compiled before the fleet was
    /// configured); stops at the first failure and tries again after the
    /// retry interval. Returns how many were published.
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
        for record in self.ledger.unshared(SHARE_BATCH) {
            match self.ledger.store().read_verified(&record) {
                Ok(bytes) => artifacts.push((record, bytes)),
                Err(error) => self.log_error(&format!("reading {}'s artifact to publish it", record.blueprint_id), &error),
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
        let published: Vec<&ArtifactRecord> = outcome.published.iter().collect();
        let shared = match self.ledger.record_shared(&published) {
            Ok(()) => {
                for &record in &published {
                    self.prefetcher.set_remote(record, fleet.artifact_url(record));
                }
                published.len()
            }
            Err(error) => {
                self.log_error("recording a publication to the fleet", &error);
                0
            }
        };
        if shared > 0 {
            self.host.log(LogLevel::Info, &format!("published {shared} artifacts to the fleet store"));
        }
        match outcome.failed {
            Some(error) => {
                if self.fleet_retry_at.is_none() {
                    self.host.log(LogLevel::Warn, &format!("fleet store unavailable; publication retried every {retry:?}: {error}"));
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
    failed: Option<crate::base::error::Error>,
}

impl PendingShares {
    /// Publishes them in order, stopping at the first failure.
    pub fn publish(self) -> SharedOutcome {
        let mut published = Vec::new();
        for (record, bytes) in self.artifacts {
            if let Err(error) = self.fleet.publish(&record, &bytes) {
                return SharedOutcome { published, failed: Some(error) };
            }
            published.push(record);
        }
        SharedOutcome { published, failed: None }
    }
}

/// Where, in sorted queue positions, the longest run of consecutive ones
/// has its middle (0 when there are none).
fn middle_of_longest_run(positions: &[usize]) -> usize {
    let (mut best, mut best_len, mut run_start) = (0, 0, 0);
    for i in 0..positions.len() {
        if i > 0 && positions[i] != positions[i - 1] + 1 {
            run_start = i;
        }
        if i + 1 - run_start > best_len {
            (best, best_len) = (run_start, i + 1 - run_start);
        }
    }
    best + best_len / 2
}

#[cfg(test)]
mod tests {
    use super::{middle_of_longest_run, seek_places, SEEK_TRIES};

    #[test]
    fn seek_places_spread_from_each_phase_and_cover_small_queues() {
        // Phase 0 starts at the first job, then goes 0.618, 0.236, … of the way.
        assert_eq!(seek_places(0, 5), [0, 3, 1, 4, 2]);
        // Members 0, 1 and 2 of a fleet start far apart in a long queue.
        let firsts: Vec<usize> = (0..3).map(|index| seek_places(index, 42)[0]).collect();
        assert_eq!(firsts, [0, 25, 9]);
        assert_eq!(seek_places(7, 1), [0]);
        assert_eq!(seek_places(7, 0), Vec::<usize>::new());
        // From any phase, a queue of up to six jobs is covered whole.
        for phase in [1, 2, 3, 99, 12_345, u32::MAX] {
            for len in 1..=6 {
                let mut places = seek_places(phase, len);
                places.sort_unstable();
                assert_eq!(places, (0..len).collect::<Vec<_>>(), "phase {phase}, {len} jobs");
            }
            assert!(seek_places(phase, 1000).len() == SEEK_TRIES);
        }
    }

    #[test]
    fn the_middle_of_the_longest_run_of_positions() {
        assert_eq!(middle_of_longest_run(&[]), 0);
        assert_eq!(middle_of_longest_run(&[7]), 0);
        // Runs 1-2, 5-9 (the longest, middle 7 at index 4), 12.
        assert_eq!(middle_of_longest_run(&[1, 2, 5, 6, 7, 8, 9, 12]), 4);
        assert_eq!(middle_of_longest_run(&[0, 1, 2, 3]), 2);
        // Equal runs: the first wins.
        assert_eq!(middle_of_longest_run(&[0, 1, 5, 6]), 1);
    }
}
