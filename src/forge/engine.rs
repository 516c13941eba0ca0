//! The forge: ties the parts together. It owns the state directory's lock,
//! the [`Ledger`] (journal, store, guard table), the [`Governor`] (breakers,
//! conservative mode), the [`Observer`] (counters), the [`Prefetcher`] and
//! the host, and is what callers hold. Queueing lives in `queue.rs`, the
//! compile pipeline in `pipeline.rs`, cache maintenance in `cache.rs`.
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Device;

use super::config::ForgeConfig;
use super::governor::{Governor, ModeChange, ResourceReading};
use super::host::{Host, LogLevel};
use super::kernel::Kernel;
use super::ledger::Ledger;
use super::observe::{CacheStats, Observer, Situation};
use super::prefetch::{PrefetchAnswer, Prefetcher};
use super::telemetry::{self, events, JobCounters};
use crate::base::error::{Error, ErrorCode, FailureReason, Result};
use crate::base::leyline::{
    self, HealthStatus, KernelCatalogUpdate, KernelPrefetchRequest, MetricPoint, SystemHealth, TelemetryEvent, TelemetryLevel,
    TelemetryPacket,
};
use crate::base::version::LIBRARY_VERSION;
use crate::build::blueprints::ResolvedParams;
use crate::build::catalog::Catalog;
use crate::build::compile::{self, Strategy, WorkerPool};
use crate::bus::Bus;
use crate::fleet::{Fleet, FleetMetrics};
use crate::state::artifact::ArtifactRecord;
use crate::state::guard_table::GuardTable;
use crate::state::layout::StateLayout;
use crate::state::store::ArtifactStore;
use crate::state::wal::journal::{Announcement, Journal};
use crate::sys::lock::StateLock;
use crate::sys::resources;

/// An open forge over a state directory (exclusively locked).
pub struct Forge {
    pub(super) config: ForgeConfig,
    pub(super) device: Device,
    pub(super) catalog: Catalog,
    pub(super) host: Box<dyn Host>,
    pub(super) ledger: Ledger,
    pub(super) governor: Governor,
    pub(super) observer: Observer,
    pub(super) prefetcher: Prefetcher,
    /// Set at shutdown: running compiles are abandoned, queued jobs stay queued.
    pub(super) shutdown: Arc<AtomicBool>,
    /// Compile threads kept from job to job (the process's, shared).
    pub(super) workers: Arc<WorkerPool>,
    /// Jobs queued by `open` not yet reported through `run`'s progress.
    pub(super) queued_at_open: Vec<(String, u64)>,
    /// The Oona bus, when configured.
    pub(super) bus: Option<Bus>,
    /// The fleet's shared bucket, when configured.
    pub(super) fleet: Option<Arc<Fleet>>,
    /// While the bucket is unreachable: when unpublished artifacts are
    /// offered to it again.
    pub(super) fleet_retry_at: Option<Instant>,
    /// The blueprint whose publication failed last: the next attempt
    /// starts after it, so that one the store keeps refusing holds back
    /// none of the others.
    pub(super) fleet_failed_last: Option<String>,
    /// Where this forge starts each run of equal priority in a fleet, and
    /// its seek's phase without a member index (random: hosts starting
    /// together begin at different blueprints).
    pub(super) fleet_offset: usize,
    _lock: StateLock,
}

impl Drop for Forge {
    /// Stops the bus (without waiting for Redis) and records what it
    /// published; waits for fleet lease releases still under way (so that
    /// the fleet's runtime is never left to its own tasks).
    fn drop(&mut self) {
        let _ = self.close_bus(Duration::ZERO);
        if let Some(fleet) = &self.fleet {
            fleet.settle();
        }
    }
}

impl Forge {
    /// Opens the state directory (refusing one held by another forge),
    /// recovers the journal, verifies (or rebuilds) the guard table against
    /// the stored catalog, enumerates descriptors from the host and durably
    /// queues those not compiled yet.
    pub fn open(mut config: ForgeConfig, mut host: Box<dyn Host>) -> Result<Forge> {
        // Absolute, so that the paths it announces mean the same to a
        // consumer in another working directory.
        config.state_dir = std::path::absolute(&config.state_dir)
            .map_err(|e| Error::io(format!("resolve state directory {}", config.state_dir.display()), e))?;
        if config.batch < 1 {
            return Err(Error::invalid(format!("batch size must be >= 1, got {}", config.batch)));
        }
        if config.max_concurrency < 1 {
            return Err(Error::invalid("max_concurrency must be >= 1"));
        }
        let bus_redis = config.bus.as_ref().map(|bus| bus.redis_url.clone());
        if let Some(fleet) = config.fleet.as_mut() {
            // Leases on the bus's Redis when asked to: from here on, its URL
            // is the fleet's lease Redis.
            fleet.lease_redis = fleet.lease_redis_beside(bus_redis.as_deref())?;
            fleet.leases_on_bus = false;
        }
        let device = config.device.resolve()?;
        if !config.state_dir.is_dir() {
            std::fs::create_dir_all(&config.state_dir)
                .map_err(|e| Error::io(format!("create state directory {}", config.state_dir.display()), e))?;
            // The new directory's name is durable before anything in it is
            // acknowledged.
            crate::sys::fs::sync_dir(crate::sys::fs::directory_of(&config.state_dir))?;
        }
        let layout = StateLayout::new(&config.state_dir);
        let lock = StateLock::acquire(&layout.lock())?;
        let ledger = Ledger::open(&layout, &config)?;
        let catalog = host.enumerate()?.unwrap_or_else(Catalog::default_catalog);
        for (id, overrides) in &config.parameter_overrides {
            let descriptor = catalog
                .get(id)
                .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("parameter values given for unknown blueprint {id:?}")))?;
            ResolvedParams::resolve(descriptor, overrides)?;
        }
        let workers = compile::shared_pool();
        workers.keep_at_least(config.max_concurrency.max(1) as usize);
        let prefetcher = Prefetcher::new(ledger.store().clone(), ledger.keys().clone(), ledger.artifacts().values());
        let mut forge = Forge {
            governor: Governor::new(&config),
            config,
            device,
            catalog,
            host,
            ledger,
            observer: Observer::default(),
            prefetcher,
            shutdown: Arc::new(AtomicBool::new(false)),
            workers,
            queued_at_open: Vec::new(),
            bus: None,
            fleet: None,
            fleet_retry_at: None,
            fleet_failed_last: None,
            fleet_offset: 0,
            _lock: lock,
        };
        for (record, error) in forge.ledger.retire_unverified()? {
            forge.prefetcher.withdraw(&record.blueprint_id);
            // A key taken out of the trusted set retires its artifacts on
            // purpose; anything else is damage.
            if forge.ledger.keys().signed_by_untrusted_key(&record) {
                forge.host.log(LogLevel::Warn, &format!("{error}; retired (its key is no longer trusted), it compiles again"));
            } else {
                forge.host.log(LogLevel::Error, &format!("{error}; removed from the catalog"));
            }
        }
        let repaired = forge.ledger.sync_guard_table()?;
        if let Some(bus_config) = forge.config.bus.clone() {
            forge.bus = Some(Bus::start(bus_config, Arc::new(forge.prefetcher.clone()))?);
            // What a crash or an outage left unpublished goes first.
            forge.announce_outbox();
        }
        if let Some(fleet_config) = forge.config.fleet.clone() {
            let nonce = crate::sys::random::bytes::<4>().map_err(|e| Error::io("draw a fleet lease holder id", e))?;
            let holder = format!("{}-{}-{}", crate::sys::host::hostname(), std::process::id(), crate::base::hex::encode(&nonce));
            forge.fleet_offset = u32::from_le_bytes(nonce) as usize;
            let fleet = Fleet::connect(fleet_config, forge.config.keys.clone(), holder)?;
            forge.ledger.set_fleet_root(fleet.root());
            // Answers name the bucket's copy of what it holds.
            for record in forge.ledger.artifacts().values().filter(|r| forge.ledger.is_shared(r)) {
                forge.prefetcher.set_remote(record, fleet.artifact_url(record));
            }
            forge.fleet = Some(Arc::new(fleet));
        }
        // What the host enumerates and is not compiled yet is queued now
        // (jobs whose descriptor went away or changed leave the queue). A
        // forge that cannot write (disk full) still opens and serves what it
        // has; run and refresh queue again and report their own errors.
        let queue_at_open = forge.config.queue_at_open;
        match forge.expire_stale_jobs().and_then(|_| if queue_at_open { forge.enqueue_catalog() } else { Ok(Vec::new()) }) {
            Ok(queued) => forge.queued_at_open = queued,
            Err(error) => forge.log_error("queueing the catalog at open (run or refresh will try again)", &error),
        }
        let recovery = forge.ledger.journal().recovery();
        let message = format!(
            "tezzeret {LIBRARY_VERSION}: opened {} with {} descriptors; WAL: {} transactions{}, {} stored artifacts, \
             {} jobs to resume; {repaired} guard slots repaired; device {}",
            forge.config.state_dir.display(),
            forge.catalog.len(),
            recovery.transactions.len(),
            if recovery.torn_bytes > 0 { format!(" ({} torn bytes dropped)", recovery.torn_bytes) } else { String::new() },
            forge.ledger.artifacts().len(),
            forge.ledger.state().pending.len(),
            compile::device_name(device)
        );
        forge.host.log(LogLevel::Info, &message);
        Ok(forge)
    }

    /// The descriptors the forge works on.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The artifact store.
    pub fn store(&self) -> &ArtifactStore {
        self.ledger.store()
    }

    /// The journal (WAL and replayed state).
    pub fn journal(&self) -> &Journal {
        self.ledger.journal()
    }

    /// The current artifact of every blueprint, by id.
    pub fn artifacts(&self) -> &std::collections::BTreeMap<String, ArtifactRecord> {
        self.ledger.artifacts()
    }

    /// The guard table.
    pub fn guards(&self) -> &GuardTable {
        self.ledger.guards()
    }

    /// The configuration.
    pub fn config(&self) -> &ForgeConfig {
        &self.config
    }

    /// The device artifacts are compiled for.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Job counters since open.
    pub fn counters(&self) -> JobCounters {
        self.observer.counters
    }

    /// Cache metrics since open.
    pub fn cache_stats(&self) -> CacheStats {
        self.observer.cache
    }

    /// A flag that, once set, makes running and queued work stop at once
    /// (jobs running are abandoned, queued ones stay queued): for shutdown.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// The strategy jobs get now: one level lower in conservative mode.
    pub fn effective_strategy(&self) -> Strategy {
        self.governor.strategy(self.config.strategy)
    }

    /// A strategy's budget now: ×1.5 in conservative mode.
    pub fn effective_budget(&self, strategy: Strategy) -> Duration {
        self.governor.budget(self.config.budget(strategy))
    }

    /// Maximum concurrent jobs now: 1 in conservative mode.
    pub fn effective_concurrency(&self) -> u32 {
        self.governor.concurrency(self.config.max_concurrency)
    }

    /// Whether conservative mode is on.
    pub fn conservative(&self) -> bool {
        self.governor.conservative()
    }

    /// The GPU utilisation limit now (15 % in conservative mode).
    pub fn effective_gpu_limit_percent(&self) -> f64 {
        self.governor.gpu_limit_percent()
    }

    /// Applies resource readings: GPU utilisation above the limit (15 % in
    /// conservative mode) for the whole window counts a gpu-breaker
    /// failure (one per window); RSS above its budget a memory-breaker failure.
    pub fn report_resources(&mut self, reading: ResourceReading) {
        let changes = self.governor.report_resources(reading);
        self.announce(changes);
    }

    /// Takes readings itself (NVML for the GPU, /proc for memory) and applies them.
    pub fn sample_resources(&mut self) -> ResourceReading {
        let reading = ResourceReading {
            gpu_utilisation_percent: resources::gpu_reading().map(|g| g.utilisation_percent),
            rss_bytes: resources::process_rss_bytes(),
        };
        self.report_resources(reading);
        reading
    }

    /// Every metric, now (with a bus, `tezzeret.bus.*` too; in a fleet,
    /// `tezzeret.fleet.*`).
    pub fn metrics(&mut self) -> Vec<MetricPoint> {
        let mut metrics = self.observer.metrics(&mut self.governor, self.ledger.state());
        if let Some(bus) = &self.bus {
            metrics.extend(bus.stats().metrics(bus.config().publish, bus.config().serve_prefetch));
        }
        if let Some(fleet) = &self.fleet {
            metrics.extend(fleet.metrics().points(self.unshared()));
        }
        metrics
    }

    /// The fleet's counters, when in a fleet.
    pub fn fleet_metrics(&self) -> Option<FleetMetrics> {
        self.fleet.as_deref().map(Fleet::metrics)
    }

    /// The fleet's bucket, when in a fleet.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_deref()
    }

    /// Current artifacts waiting to be published to the fleet's bucket
    /// (once it is reachable); 0 for a member that does not publish.
    pub fn unshared(&self) -> usize {
        match &self.fleet {
            Some(fleet) if fleet.config().publish => self.ledger.unshared_count(),
            _ => 0,
        }
    }

    /// Every metric, as a `TelemetryPacket` without events.
    pub fn metrics_packet(&mut self) -> TelemetryPacket {
        let metrics = self.metrics();
        telemetry::packet(metrics, Vec::new(), self.conservative())
    }

    /// The metrics in Prometheus text exposition format (dots become
    /// underscores; labels kept).
    pub fn prometheus(&mut self) -> String {
        telemetry::prometheus(&self.metrics())
    }

    /// A Leyline `SystemHealth` snapshot: HEALTHY, DEGRADED in conservative
    /// mode or while a configured bus is unreachable, UNHEALTHY while the
    /// WAL is poisoned.
    pub fn health(&mut self) -> SystemHealth {
        let situation = Situation {
            state: self.ledger.state(),
            wal: self.ledger.journal().wal(),
            concurrency: self.effective_concurrency(),
            strategy: self.effective_strategy(),
        };
        let mut health = self.observer.health(&mut self.governor, situation);
        if let Some(bus) = &self.bus {
            let connected = bus.connected();
            // Redis answers but refuses catalog updates (out of memory, say).
            let refused = bus.stats().updates_refused().filter(|_| connected);
            let (state, summary) = match (connected, &refused) {
                (false, _) => ("unreachable", Some("bus unreachable: compiling and serving the host go on; catalog updates wait in the outbox")),
                (true, Some(_)) => (
                    "refusing",
                    Some(
                        "Redis refuses the bus's catalog updates: compiling and serving the host go on; the updates wait in \
                         the outbox and are sent again every half second",
                    ),
                ),
                (true, None) => ("connected", None),
            };
            health.indicators.insert("bus".into(), state.into());
            health.indicators.insert("bus.outbox".into(), self.ledger.state().outbox.len().to_string());
            let error = if connected { refused } else { bus.stats().last_error() };
            if let Some(error) = error {
                health.indicators.insert("bus.last_error".into(), error);
            }
            if let Some(summary) = summary.filter(|_| health.status == HealthStatus::Healthy as i32) {
                health.status = HealthStatus::Degraded as i32;
                health.summary = summary.into();
            }
        }
        health
    }

    /// The bus, when configured.
    pub fn bus(&self) -> Option<&Bus> {
        self.bus.as_ref()
    }

    /// Durably takes the catalog updates the bus has published out of the
    /// outbox (also done, for free, with every commit).
    pub fn record_published(&mut self) -> Result<()> {
        self.log_bus_notes();
        match &self.bus {
            Some(bus) => {
                let published = bus.take_published();
                self.ledger.record_published(published.clone()).inspect_err(|_| bus.untake_published(published))
            }
            None => Ok(()),
        }
    }

    /// Hands the bus every catalog update still in the outbox (one it
    /// already has is not doubled).
    pub(super) fn announce_outbox(&mut self) {
        if self.bus.is_none() {
            return;
        }
        // Updates that no longer name their blueprint's current artifact
        // (a newer one was committed without the bus, or it was evicted)
        // would point consumers at a superseded artifact: they leave.
        let superseded = self.ledger.superseded_announcements();
        if let Err(error) = self.ledger.record_published(superseded) {
            self.log_error("dropping superseded catalog updates from the outbox", &error);
        }
        if let Some(bus) = &self.bus {
            for a in self.ledger.outbox().filter(|a| self.ledger.announces_current(a)) {
                bus.announce(a.seq, &a.message_id, &a.update);
            }
        }
    }

    /// Sends a catalog update to the host and, with its outbox entry, to
    /// the bus.
    pub(super) fn send_catalog_update(&mut self, update: &KernelCatalogUpdate, announcement: Option<&Announcement>) {
        self.host.catalog_update(&leyline::encode(update));
        if let (Some(bus), Some(a)) = (&self.bus, announcement) {
            bus.announce(a.seq, &a.message_id, &a.update);
        }
    }

    /// Tells the host's log that the journal could not be checkpointed
    /// (it keeps growing, and every commit stays durable, until one works).
    pub(super) fn log_checkpoint_failure(&mut self) {
        if let Some(error) = self.ledger.take_checkpoint_failure() {
            self.host.log(LogLevel::Warn, &format!("checkpointing the journal failed (retried at the next commit): {error}"));
        }
    }

    /// Tells the host's log what the bus noted since (an outage, its end,
    /// the first request dropped for each reason), as warnings.
    pub(super) fn log_bus_notes(&mut self) {
        let notes = self.bus.as_ref().map(|bus| bus.stats().take_notes()).unwrap_or_default();
        self.warn_each(notes);
    }

    fn warn_each(&mut self, notes: Vec<String>) {
        for note in notes {
            self.host.log(LogLevel::Warn, &note);
        }
    }

    /// Stops the bus: for up to `flush`, while Redis is reachable, what is
    /// queued is still published; what was published leaves the outbox and
    /// the rest waits in it for the next open.
    pub fn close_bus(&mut self, flush: Duration) -> Result<()> {
        match self.bus.take() {
            Some(mut bus) => {
                let published = bus.stop(flush);
                self.warn_each(bus.stats().take_notes());
                self.ledger.record_published(published)
            }
            None => Ok(()),
        }
    }

    /// Sends a packet to the host and, with a bus, to the bus.
    fn send_telemetry(&mut self, packet: &TelemetryPacket) {
        self.host.telemetry(&leyline::encode(packet));
        if let Some(bus) = &self.bus {
            bus.telemetry(packet);
        }
    }

    /// Sends the periodic `TelemetryPacket`: every metric and a
    /// `SystemHealth` snapshot.
    pub fn emit_periodic_telemetry(&mut self) {
        self.emit_health_packet(false);
    }

    /// Sends the last `TelemetryPacket` of a forge being closed: every
    /// metric and a `SystemHealth` whose indicator `closing` is `true`.
    pub fn emit_closing_telemetry(&mut self) {
        self.emit_health_packet(true);
    }

    fn emit_health_packet(&mut self, closing: bool) {
        let mut packet = telemetry::packet(self.metrics(), Vec::new(), self.conservative());
        let mut health = self.health();
        if closing {
            health.indicators.insert("closing".to_string(), "true".to_string());
        }
        packet.system_health = Some(health);
        self.send_telemetry(&packet);
    }

    /// Sends a packet of metrics and events to the host (and the bus).
    pub(super) fn emit_telemetry(&mut self, metrics: Vec<MetricPoint>, events: Vec<TelemetryEvent>) {
        let packet = telemetry::packet(metrics, events, self.conservative());
        self.send_telemetry(&packet);
    }

    /// Tells the host, at once, about mode changes (events `breaker_open`,
    /// `conservative_mode_*`, and a log line).
    pub(super) fn announce(&mut self, changes: Vec<ModeChange>) {
        if changes.is_empty() {
            return;
        }
        let mut events_out = Vec::new();
        for change in changes {
            match change {
                ModeChange::BreakerOpened(kind) => events_out.push(telemetry::event(
                    events::BREAKER_OPEN,
                    TelemetryLevel::Warning,
                    &[("breaker", kind.name().to_string())],
                )),
                ModeChange::ConservativeEntered | ModeChange::ConservativeLeft => {
                    let entered = change == ModeChange::ConservativeEntered;
                    let name = if entered { events::CONSERVATIVE_MODE_ENABLED } else { events::CONSERVATIVE_MODE_DISABLED };
                    events_out.push(telemetry::event(name, TelemetryLevel::Warning, &[]));
                    self.host.log(LogLevel::Warn, &format!("conservative mode {}", if entered { "entered" } else { "left" }));
                }
            }
        }
        let metrics = self.metrics();
        self.emit_telemetry(metrics, events_out);
    }

    /// Tells the host about an error of background work.
    pub fn log_error(&mut self, context: &str, error: &Error) {
        self.host.log(LogLevel::Error, &format!("{context}: {error}"));
    }

    /// Answers a Leyline `KernelPrefetchRequest` with `KernelArtifactReady`
    /// or `KernelArtifactError`. The artifact file is hashed (and its
    /// signature checked) the first time and whenever it may have changed
    /// since; otherwise one `stat` proves it is the file that was verified.
    pub fn prefetch(&self, request: &KernelPrefetchRequest) -> PrefetchAnswer {
        self.prefetcher.answer(request)
    }

    /// A handle that answers prefetch requests like [`Self::prefetch`]
    /// without this forge's lock (for threads that serve requests while
    /// the forge compiles).
    pub fn prefetcher(&self) -> Prefetcher {
        self.prefetcher.clone()
    }

    /// Loads a blueprint's current artifact for running in-process (hashed
    /// and signature-checked on load).
    pub fn load_kernel(&self, blueprint_id: &str) -> Result<Kernel> {
        let record = self.ledger.artifacts().get(blueprint_id).ok_or_else(|| {
            Error::failure(
                ErrorCode::NotFound,
                FailureReason::MissingArtifact,
                format!("no current artifact for blueprint {blueprint_id:?}"),
            )
        })?;
        self.ledger.store().touch(&record.cache_key);
        Kernel::load(self.ledger.store(), record, self.ledger.keys())
    }
}
