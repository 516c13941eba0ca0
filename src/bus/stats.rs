//! What the bus did, counted: read by the forge's metrics and health.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::envelope::Refusal;
use crate::base::leyline::MetricPoint;

/// Counters and link state of a bus connection, shared by its threads.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Catalog updates added to the ready stream.
    pub catalog_updates_published: AtomicU64,
    /// Telemetry packets added to the telemetry or emergency stream.
    pub telemetry_published: AtomicU64,
    /// Telemetry packets dropped because too many waited (Redis down).
    pub telemetry_dropped: AtomicU64,
    /// Prefetch requests answered with `KernelArtifactReady`.
    pub answered_ready: AtomicU64,
    /// Prefetch requests answered with `KernelArtifactError`.
    pub answered_error: AtomicU64,
    /// Request entries dropped, by [`Refusal`] (index in `Refusal::ALL`).
    pub dropped: [AtomicU64; Refusal::ALL.len()],
    /// Answers Redis refused (their requests stay pending, to come again).
    pub answer_failures: AtomicU64,
    /// Entries Redis refused to add (a catalog update is retried; a
    /// telemetry packet is dropped).
    pub publish_failures: AtomicU64,
    /// Pending requests of other (dead) consumers taken over.
    pub reclaimed: AtomicU64,
    /// Request entries moved to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Catalog updates waiting to be published.
    pub outbox_depth: AtomicU64,
    /// Times a connection to Redis was lost or could not be made.
    pub link_failures: AtomicU64,
    /// Whether the publisher is connected.
    pub publisher_up: AtomicBool,
    /// Whether the request reader is connected.
    pub reader_up: AtomicBool,
    /// The last Redis error seen.
    pub last_error: Mutex<Option<String>>,
    /// What the host's log should hear, taken by the forge (see
    /// [`BusStats::take_notes`]): the first failure of each outage, the
    /// return of Redis, and the first dropped request of each reason.
    notes: Mutex<Vec<String>>,
    /// Whether the current outage was noted.
    outage_noted: AtomicBool,
    /// The reasons (bits by index in `Refusal::ALL`) whose first drop was noted.
    drops_noted: AtomicU64,
}

impl BusStats {
    /// Counts a dropped request entry; the first of its reason is noted.
    pub fn drop_entry(&self, refusal: Refusal) {
        let index = Refusal::ALL.iter().position(|r| *r == refusal).expect("every refusal is listed");
        self.dropped[index].fetch_add(1, Ordering::Relaxed);
        if self.drops_noted.fetch_or(1 << index, Ordering::Relaxed) & (1 << index) == 0 {
            self.note(format!(
                "bus: dropped a prefetch request unanswered ({}); later ones dropped for this reason are only counted \
                 (tezzeret.bus.requests_dropped)",
                refusal.as_str()
            ));
        }
    }

    /// Notes a connection failure, once per outage.
    pub fn note_link_down(&self, error: &str) {
        if !self.outage_noted.swap(true, Ordering::Relaxed) {
            self.note(format!(
                "bus: Redis cannot be reached ({error}); retrying: catalog updates wait in the durable outbox, and \
                 prefetch requests wait in their stream"
            ));
        }
    }

    /// Notes that a connection is up again after a noted outage.
    pub fn note_link_up(&self) {
        if self.outage_noted.swap(false, Ordering::Relaxed) {
            self.note("bus: Redis is reachable again".to_string());
        }
    }

    fn note(&self, message: String) {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).push(message);
    }

    /// What happened worth a line in the host's log since the last call.
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Dropped request entries of one reason.
    pub fn dropped_of(&self, refusal: Refusal) -> u64 {
        let index = Refusal::ALL.iter().position(|r| *r == refusal).expect("every refusal is listed");
        self.dropped[index].load(Ordering::Relaxed)
    }

    /// Whether every connection the configuration needs is up.
    pub fn connected(&self, publishes: bool, serves: bool) -> bool {
        (!publishes || self.publisher_up.load(Ordering::Relaxed)) && (!serves || self.reader_up.load(Ordering::Relaxed))
    }

    /// The last Redis error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The counters as metric points (`tezzeret.bus.*`).
    pub fn metrics(&self, publishes: bool, serves: bool) -> Vec<MetricPoint> {
        let metric = MetricPoint::new;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let mut points = vec![
            metric("tezzeret.bus.connected", f64::from(u8::from(self.connected(publishes, serves))), "bool", &[]),
            metric("tezzeret.bus.published", load(&self.catalog_updates_published), "count", &[("kind", "catalog_update")]),
            metric("tezzeret.bus.published", load(&self.telemetry_published), "count", &[("kind", "telemetry")]),
            metric("tezzeret.bus.telemetry_dropped", load(&self.telemetry_dropped), "count", &[]),
            metric("tezzeret.bus.outbox_depth", load(&self.outbox_depth), "count", &[]),
            metric("tezzeret.bus.answered", load(&self.answered_ready), "count", &[("answer", "ready")]),
            metric("tezzeret.bus.answered", load(&self.answered_error), "count", &[("answer", "error")]),
            metric("tezzeret.bus.answer_failures", load(&self.answer_failures), "count", &[]),
            metric("tezzeret.bus.publish_failures", load(&self.publish_failures), "count", &[]),
            metric("tezzeret.bus.reclaimed", load(&self.reclaimed), "count", &[]),
            metric("tezzeret.bus.dead_lettered", load(&self.dead_lettered), "count", &[]),
            metric("tezzeret.bus.link_failures", load(&self.link_failures), "count", &[]),
        ];
        for (refusal, count) in Refusal::ALL.iter().zip(&self.dropped) {
            points.push(metric("tezzeret.bus.requests_dropped", load(count), "count", &[("reason", refusal.as_str())]));
        }
        points
    }
}
