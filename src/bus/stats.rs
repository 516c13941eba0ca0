//! What the bus did, counted: read by the forge's metrics and health.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::envelope::Refusal;
use crate::base::leyline::MetricPoint;

/// The most notes kept until the forge takes them, and the most distinct
/// server errors noted.
const NOTES_KEPT: usize = 32;

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
    /// Why Redis refused the catalog updates of the publisher's last batch
    /// that had any (out of memory, a stream of the wrong type): they wait
    /// in the outbox while Redis answers. Cleared once a batch's updates
    /// all went in.
    pub updates_refused: Mutex<Option<String>>,
    /// What the host's log should hear, taken by the forge (see
    /// [`BusStats::take_notes`]): the first failure of each outage, the
    /// return of Redis, and the first dropped request of each reason.
    notes: Mutex<Vec<String>>,
    /// Whether the current outage was noted.
    outage_noted: AtomicBool,
    /// Which links (publisher, request reader) have reported their state:
    /// Redis is back once each of them is up.
    reporting: [AtomicBool; 2],
    /// Server errors (other than a lost connection) already noted.
    errors_noted: Mutex<Vec<String>>,
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

    /// Records a link's state (`reader`: the request reader's, else the
    /// publisher's) and notes Redis's return once every link that reported
    /// is up after a noted outage.
    pub fn link_state(&self, reader: bool, up: bool) {
        let flags = [&self.publisher_up, &self.reader_up];
        flags[usize::from(reader)].store(up, Ordering::Relaxed);
        self.reporting[usize::from(reader)].store(true, Ordering::Relaxed);
        let every_link_up = self.reporting.iter().zip(flags).all(|(reported, up)| !reported.load(Ordering::Relaxed) || up.load(Ordering::Relaxed));
        if up && every_link_up && self.outage_noted.swap(false, Ordering::Relaxed) {
            self.note("bus: Redis is reachable again".to_string());
        }
    }

    /// Notes a failed command or connection: a lost or refused connection
    /// once per outage (until every link is up again), any other error
    /// once per distinct message.
    pub fn note_link_failure(&self, error: &str, connection_lost: bool) {
        if connection_lost {
            if !self.outage_noted.swap(true, Ordering::Relaxed) {
                self.note(format!(
                    "bus: Redis cannot be reached ({error}); retrying: catalog updates wait in the durable outbox, and \
                     prefetch requests wait in their stream"
                ));
            }
            return;
        }
        let mut noted = self.errors_noted.lock().unwrap_or_else(|p| p.into_inner());
        if noted.len() < NOTES_KEPT && !noted.iter().any(|e| e == error) {
            noted.push(error.to_string());
            drop(noted);
            self.note(format!("bus: Redis refused a command ({error}); retrying (said once per error)"));
        }
    }

    fn note(&self, message: String) {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        if notes.len() < NOTES_KEPT {
            notes.push(message);
        }
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

    /// Why Redis refuses catalog updates, while it does (see
    /// [`BusStats::updates_refused`]).
    pub fn updates_refused(&self) -> Option<String> {
        self.updates_refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records Redis's answer refusing catalog updates (None: it took a
    /// batch's updates all), noting each distinct answer once in the
    /// host's log.
    pub fn refusing_updates(&self, why: Option<String>) {
        if let Some(why) = &why {
            self.note_link_failure(why, false);
        }
        let why = why.map(|why| format!("bus publisher: Redis refused catalog updates: {why}"));
        *self.updates_refused.lock().unwrap_or_else(|p| p.into_inner()) = why;
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
