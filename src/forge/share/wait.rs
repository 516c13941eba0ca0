//! While nothing else can run: watching the keys other hosts hold the
//! lease of, until an artifact arrives, a lease is given up or expires,
//! or the wait reaches its bound.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Admission, Waiting};
use crate::fleet::{Claim, FleetEvent, Lookup, Watched};
use crate::forge::engine::Forge;
use crate::forge::host::LogLevel;
use crate::state::wal::journal::Job;

/// The longest pause between two looks at the bucket while waiting.
pub(super) const MAX_POLL: Duration = Duration::from_millis(100);

/// How often a waiting job reads the lease it waits on (besides looking
/// the bucket up at every poll): bounds how long a holder that gave up,
/// or died, goes unnoticed beyond its lease's expiry.
pub(super) const LEASE_RECHECK: Duration = Duration::from_millis(500);

impl Forge {
    /// While nothing else can run: waits for jobs whose lease another host
    /// holds, looking the bucket up with a growing pause (and reading the
    /// lease now and then), until at least one can start — its artifact
    /// arrived (stored here, to adopt), its lease was given up or expired
    /// (claimed), or it waited the longest allowed (compiled here anyway).
    /// Returns them, admitted.
    pub(in crate::forge) fn wait_for_fleet(&mut self, queue: &[Job], waiting: &mut Vec<Waiting>) -> VecDeque<(usize, Admission)> {
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
                let watch = match watch {
                    Watched::Lookup(lookup) => Watched::Lookup(self.for_job(job, lookup)),
                    other => other,
                };
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
}
