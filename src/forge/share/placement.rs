//! Where this host works in a queue other hosts drain too: the order a
//! drain starts its jobs in, the first claim it seeks from its own phase,
//! and, after a lost claim, what it sets aside and where it steers next.
use std::collections::{HashMap, VecDeque};

use super::{Admission, Probed, Waiting, LISTING_LIMIT};
use crate::fleet::{Claim, FleetEvent};
use crate::forge::engine::Forge;
use crate::forge::host::LogLevel;
use crate::state::wal::journal::Job;

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

impl Forge {
    /// The order a drain starts its jobs in: the queue's, except that in
    /// a fleet each run of equal priority starts at this forge's own
    /// offset, so that hosts starting together claim different blueprints
    /// first instead of queueing behind one another's leases.
    pub(in crate::forge) fn start_order(&self, queue: &[Job]) -> VecDeque<(usize, Admission)> {
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
    pub(in crate::forge) fn seek_start(
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
                // The store cannot be asked: the queue starts where it is,
                // and this job's admission, asking again, says so once.
                Err(_) => break,
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

    /// After a claim was lost (other hosts work on this queue too): lists
    /// the announced publications once (see [`Fleet::announced_keys`]),
    /// fetches in batches what was published of the jobs not started yet
    /// and of those waiting (so that they adopt it instead of each
    /// claiming, losing and waiting in turn), and
    /// steers this host away from where the others work. Waiting jobs
    /// whose artifact arrived are ready again, first. Only the next
    /// [`LISTING_LIMIT`] jobs are looked at.
    pub(in crate::forge) fn look_again(
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
    pub(in crate::forge) fn set_aside_claimed(
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
    pub(super) fn steer(&self, queue: &[Job], ready: &mut VecDeque<(usize, Admission)>) {
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
