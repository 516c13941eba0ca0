//! What a forge's fleet membership counted: remote hits, refusals by
//! reason, publications, lease waits and takeovers, store outages.
use std::sync::atomic::{AtomicU64, Ordering};

use super::manifest::Refusal;

/// Counters kept as the forge uses the fleet's store (shared, lock-free).
#[derive(Debug, Default)]
pub struct FleetStats {
    hits: AtomicU64,
    misses: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    published: AtomicU64,
    lost_races: AtomicU64,
    lease_waits: AtomicU64,
    lease_takeovers: AtomicU64,
    wait_timeouts: AtomicU64,
    store_errors: AtomicU64,
}

/// A snapshot of [`FleetStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetMetrics {
    /// Artifacts fetched from the store, verified and stored durably here
    /// (their jobs adopt them).
    pub hits: u64,
    /// Jobs compiled locally because no artifact could be had from the
    /// store: none there, the one there refused, or the store unreachable.
    pub misses: u64,
    /// Objects refused, by reason (in [`Refusal::ALL`]'s order).
    pub refusals: Vec<(Refusal, u64)>,
    /// Artifacts this forge published (artifact and manifest created).
    pub published: u64,
    /// Publications that found another forge's manifest already there.
    pub lost_races: u64,
    /// Jobs that waited for another forge's lease.
    pub lease_waits: u64,
    /// Expired leases of other forges taken over.
    pub lease_takeovers: u64,
    /// Jobs compiled locally after waiting the longest allowed for a lease.
    pub wait_timeouts: u64,
    /// Requests to the store, or to the fleet's Redis, that failed
    /// (unreachable, timed out, refused).
    pub store_errors: u64,
    /// Requests made to the store.
    pub requests: u64,
    /// Commands sent to the fleet's Redis, for its leases and announcements
    /// (0 without one: the leases' requests then count in [`Self::requests`]).
    pub redis_requests: u64,
}

impl FleetMetrics {
    /// All refusals together.
    pub fn refused(&self) -> u64 {
        self.refusals.iter().map(|(_, n)| n).sum()
    }
}

/// Which counter an event bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetEvent {
    /// See [`FleetMetrics::hits`].
    Hit,
    /// See [`FleetMetrics::misses`].
    Miss,
    /// See [`FleetMetrics::refusals`].
    Refused(Refusal),
    /// See [`FleetMetrics::published`].
    Published,
    /// See [`FleetMetrics::lost_races`].
    LostRace,
    /// See [`FleetMetrics::lease_waits`].
    LeaseWait,
    /// See [`FleetMetrics::lease_takeovers`].
    LeaseTakeover,
    /// See [`FleetMetrics::wait_timeouts`].
    WaitTimeout,
    /// See [`FleetMetrics::store_errors`].
    StoreError,
}

impl FleetStats {
    /// Counts one event.
    pub fn count(&self, event: FleetEvent) {
        let counter = match event {
            FleetEvent::Hit => &self.hits,
            FleetEvent::Miss => &self.misses,
            FleetEvent::Refused(r) => &self.refusals[Refusal::ALL.iter().position(|&x| x == r).expect("every refusal is listed")],
            FleetEvent::Published => &self.published,
            FleetEvent::LostRace => &self.lost_races,
            FleetEvent::LeaseWait => &self.lease_waits,
            FleetEvent::LeaseTakeover => &self.lease_takeovers,
            FleetEvent::WaitTimeout => &self.wait_timeouts,
            FleetEvent::StoreError => &self.store_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> FleetMetrics {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FleetMetrics {
            hits: load(&self.hits),
            misses: load(&self.misses),
            refusals: Refusal::ALL.iter().zip(&self.refusals).map(|(&r, c)| (r, load(c))).collect(),
            published: load(&self.published),
            lost_races: load(&self.lost_races),
            lease_waits: load(&self.lease_waits),
            lease_takeovers: load(&self.lease_takeovers),
            wait_timeouts: load(&self.wait_timeouts),
            store_errors: load(&self.store_errors),
            requests: 0,
            redis_requests: 0,
        }
    }
}

impl FleetMetrics {
    /// The counters as metric points (`tezzeret.fleet.*`); `unshared` is
    /// how many current artifacts the bucket does not hold yet.
    pub fn points(&self, unshared: usize) -> Vec<crate::base::leyline::MetricPoint> {
        use crate::base::leyline::MetricPoint as Point;
        let count = |name: &str, value: u64| Point::new(name, value as f64, "count", &[]);
        let mut points = vec![
            count("tezzeret.fleet.hits", self.hits),
            count("tezzeret.fleet.misses", self.misses),
            count("tezzeret.fleet.published", self.published),
            count("tezzeret.fleet.lost_races", self.lost_races),
            count("tezzeret.fleet.lease_waits", self.lease_waits),
            count("tezzeret.fleet.lease_takeovers", self.lease_takeovers),
            count("tezzeret.fleet.wait_timeouts", self.wait_timeouts),
            count("tezzeret.fleet.store_errors", self.store_errors),
            count("tezzeret.fleet.requests", self.requests),
            count("tezzeret.fleet.redis_requests", self.redis_requests),
            count("tezzeret.fleet.unshared", unshared as u64),
        ];
        for (refusal, n) in &self.refusals {
            points.push(Point::new("tezzeret.fleet.refused", *n as f64, "count", &[("reason", refusal.as_str())]));
        }
        points
    }
}
