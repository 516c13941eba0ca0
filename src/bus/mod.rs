//! The bus layer: the forge as a participant of Oona, Esper's bus on Redis
//! Streams. A [`Bus`] owns two threads — a publisher ([`publisher`]) that
//! adds catalog updates and telemetry to their streams, and a reader
//! ([`requests`]) that answers prefetch requests in a consumer group — and
//! the counters they keep ([`stats`]). Entries are Leyline envelopes,
//! signed when a secret is set ([`envelope`]); each thread's connection
//! survives Redis outages with a backoff ([`link`]).
//!
//! The bus never blocks the forge: handing it a message only queues it,
//! and while Redis is down the forge compiles and serves its host as
//! before. Catalog updates come from the forge's durable outbox, so that
//! none is lost to an outage or a crash; the bus reports which it
//! published and the forge takes those out of the outbox.
pub mod config;
pub mod envelope;
pub mod link;
pub mod publisher;
pub mod requests;
pub mod stats;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{BusConfig, StreamNames, SECRET_VARIABLE};
use publisher::Queue;
pub use stats::BusStats;

use crate::base::error::{Error, Result};
use crate::base::redact::redacted_url;
use crate::base::leyline::{KernelCatalogUpdate, KernelPrefetchRequest, PrefetchAnswer, TelemetryPacket};

/// Answers prefetch requests (the forge's prefetcher): called on the
/// reader thread, without the forge's lock.
pub trait Answerer: Send + Sync {
    /// The answer to one request.
    fn answer(&self, request: &KernelPrefetchRequest) -> PrefetchAnswer;
}

/// What the bus's threads and its handle share.
pub struct Shared {
    config: BusConfig,
    client: redis::Client,
    queue: Mutex<Queue>,
    /// Wakes the publisher (work or stop) and sleepers (stop).
    wake: Condvar,
    stats: BusStats,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Sleeps for `duration`, waking early only when the bus stops (not
    /// for new work).
    fn sleep(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut queue = self.lock();
        while !queue.stop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            queue = self.wake.wait_timeout(queue, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A forge's connection to the bus and its threads.
pub struct Bus {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Bus {
    /// Starts the bus's threads (they connect in the background: an
    /// unreachable Redis is not an error, only a bad configuration is).
    pub fn start(config: BusConfig, answerer: Arc<dyn Answerer>) -> Result<Bus> {
        config.validate()?;
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| Error::invalid(format!("bus redis_url {:?}: {e}", redacted_url(&config.redis_url))))?;
        let shared = Arc::new(Shared { config, client, queue: Mutex::default(), wake: Condvar::new(), stats: BusStats::default() });
        let mut bus = Bus { shared: shared.clone(), threads: Vec::new() };
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            let body = move || {
                // A Redis that drops the connection must not end the host.
                crate::sys::signals::hold_broken_pipe_signal_for_this_thread();
                body()
            };
            std::thread::Builder::new().name(name.into()).spawn(body).map_err(|e| Error::io("start a bus thread", e))
        };
        if shared.config.publish {
            let (s, link) = (shared.clone(), publisher::link(&shared));
            bus.threads.push(spawn("tezzeret-bus-publish", Box::new(move || publisher::run(s, link)))?);
        }
        if shared.config.serve_prefetch {
            let s = shared.clone();
            bus.threads.push(spawn("tezzeret-bus-requests", Box::new(move || requests::run(s, answerer)))?);
        }
        Ok(bus)
    }

    /// The configuration.
    pub fn config(&self) -> &BusConfig {
        &self.shared.config
    }

    /// The counters.
    pub fn stats(&self) -> &BusStats {
        &self.shared.stats
    }

    /// Whether the connections the configuration needs are up.
    pub fn connected(&self) -> bool {
        let config = &self.shared.config;
        self.shared.stats.connected(config.publish, config.serve_prefetch)
    }

    /// Queues a catalog update of the outbox for publication.
    pub fn announce(&self, outbox_seq: u64, message_id: &str, update: &KernelCatalogUpdate) {
        if !self.shared.config.publish {
            return;
        }
        if self.shared.lock().known.contains(&outbox_seq) {
            return;
        }
        let sealed = publisher::seal_update(message_id, update, self.shared.config.secret.as_deref());
        let mut queue = self.shared.lock();
        if !queue.known.insert(outbox_seq) {
            return;
        }
        queue.updates.push_back((outbox_seq, sealed));
        self.shared.stats.outbox_depth.store(queue.updates.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_all();
    }

    /// Queues a telemetry packet: to the emergency stream at priority HIGH
    /// or CRITICAL, else to the telemetry stream. While Redis is down only
    /// the newest packets wait; older ones are dropped (counted).
    pub fn telemetry(&self, packet: &TelemetryPacket) {
        let config = &self.shared.config;
        if !config.publish {
            return;
        }
        let urgent = publisher::telemetry_priority(packet) >= crate::base::leyline::MessagePriority::High;
        let stream = if urgent { &config.streams.emergency } else { &config.streams.telemetry };
        let sealed = publisher::seal_telemetry(packet, config.secret.as_deref());
        let mut queue = self.shared.lock();
        if queue.telemetry.len() >= publisher::TELEMETRY_BACKLOG {
            queue.telemetry.pop_front();
            self.shared.stats.telemetry_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        queue.telemetry.push_back((stream.clone(), sealed));
        self.shared.wake.notify_all();
    }

    /// Outbox sequences published since the last call (the caller records
    /// them durably, or hands them back with [`Self::untake_published`]).
    pub fn take_published(&self) -> Vec<u64> {
        let mut queue = self.shared.lock();
        let taken = std::mem::take(&mut queue.published);
        for seq in &taken {
            queue.known.remove(seq);
        }
        taken
    }

    /// Hands back published sequences the caller could not record.
    pub fn untake_published(&self, seqs: Vec<u64>) {
        let mut queue = self.shared.lock();
        queue.known.extend(&seqs);
        queue.published.extend(seqs);
    }

    /// Stops the threads. The publisher first tries, for up to `flush`
    /// and while Redis is reachable, to publish what is queued. Returns
    /// the outbox sequences published and not yet taken.
    pub fn stop(&mut self, flush: Duration) -> Vec<u64> {
        {
            let mut queue = self.shared.lock();
            queue.stop = true;
            queue.flush_until = Some(Instant::now() + flush);
            self.shared.wake.notify_all();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.take_published()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}
