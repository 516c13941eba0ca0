//! The forge: owns a state directory, learns descriptors from its host,
//! compiles what is not compiled yet, stores artifacts durably and tells
//! the host (catalog updates, telemetry, log lines).
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::Device;

use crate::blueprints::{ParameterOverrides, ResolvedParams, DEFAULT_BATCH};
use crate::catalog::{Catalog, Descriptor};
use crate::compile::{self, CompileJob, CompiledArtifact, Strategy, WorkerPool};
use crate::guard::table::{GuardEntry, GuardTable, Lookup};
use crate::guard::{self, hex};
use crate::breakers::{BreakerConfig, BreakerKind, Breakers};
use crate::kernel::Kernel;
use crate::leyline::{self, KernelCatalogUpdate, MessagePriority, TelemetryLevel};
use crate::lock::StateLock;
use crate::signing::KeyRing;
use crate::store::{ArtifactRecord, ArtifactStore};
use crate::wal::{Job, Journal, Record};
use crate::telemetry::{self, events, JobCounters};
use crate::version::{ARTIFACT_FORMAT_VERSION, LIBRARY_VERSION, TORCH_VERSION};
use crate::{Error, ErrorCode, Result};

/// Where compiled artifacts should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u32)]
pub enum DevicePreference {
    /// CUDA device 0 when libtorch sees one, else the CPU.
    #[default]
    Auto = 0,
    /// Always the CPU.
    Cpu = 1,
    /// CUDA device 0; opening fails when none is available.
    Cuda = 2,
}

impl DevicePreference {
    /// Converts the C ABI's `uint32_t`, refusing unknown values.
    pub fn from_u32(value: u32) -> Result<Self> {
        match value {
            0 => Ok(Self::Auto),
            1 => Ok(Self::Cpu),
            2 => Ok(Self::Cuda),
            _ => Err(Error::invalid(format!("unknown device {value} (expected 0 auto, 1 cpu, 2 cuda)"))),
        }
    }

    fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
            Self::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Self::Cuda => Err(Error::new(ErrorCode::Unsupported, "device cuda requested but libtorch sees no CUDA device")),
        }
    }
}

/// Severity of a log line sent to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    /// Fine-grained progress.
    Debug = 0,
    /// Normal operation.
    Info = 1,
    /// Something was refused or degraded.
    Warn = 2,
    /// Something failed.
    Error = 3,
}

/// How a forge is configured.
#[derive(Debug, Clone)]
pub struct ForgeConfig {
    /// The state directory (created if missing).
    pub state_dir: PathBuf,
    /// Compilation strategy.
    pub strategy: Strategy,
    /// Target device.
    pub device: DevicePreference,
    /// Compile quarantine-only (HIGH_RISK) blueprints instead of refusing them.
    pub allow_quarantine: bool,
    /// Maximum concurrent compile jobs.
    pub max_concurrency: u32,
    /// Whether opening queues the catalog's descriptors that are not
    /// compiled yet (SPEC R1; default true). Off, jobs are only queued by
    /// submit, refresh and run (e.g. to time single jobs).
    pub queue_at_open: bool,
    /// Re-enumeration interval (0 = off).
    pub refresh_interval_ms: u64,
    /// Periodic telemetry interval (0 = off).
    pub telemetry_interval_ms: u64,
    /// Batch size of representative inputs.
    pub batch: i64,
    /// Host parameter values per blueprint id.
    pub parameter_overrides: BTreeMap<String, ParameterOverrides>,
    /// Host input shapes per blueprint id (replacing the representative ones).
    pub input_shapes: BTreeMap<String, Vec<Vec<i64>>>,
    /// Time budget per strategy, indexed by `Strategy as usize`; a job over
    /// its budget is abandoned and fails with `budget_exceeded`.
    pub budgets: [Duration; 4],
    /// Largest process-memory growth one job may cause (None = unchecked).
    pub memory_budget_bytes: Option<u64>,
    /// Cache size cap (artifacts and manifests); beyond it the least
    /// recently used entries are evicted.
    pub cache_capacity_bytes: u64,
    /// Cache entries unused for this long are evicted.
    pub cache_ttl: Duration,
    /// Signing key and trusted public keys (SPEC R11); empty = unsigned, unverified.
    pub keys: KeyRing,
    /// Thresholds of the timeout, memory and gpu breakers (in that order).
    pub breakers: [BreakerConfig; 3],
    /// GPU utilisation (percent) above which, sustained for `gpu_window`,
    /// the gpu breaker counts a failure (15 in conservative mode).
    pub gpu_limit_percent: f64,
    /// How long GPU utilisation must stay above the limit.
    pub gpu_window: Duration,
    /// Process memory (RSS) above which the memory breaker counts a failure.
    pub rss_budget_bytes: Option<u64>,
}

impl ForgeConfig {
    /// Defaults for a state directory: Standard, auto device, quarantine off,
    /// concurrency 2, no refresh, telemetry every 10 s, batch 8, the design's
    /// budgets per strategy, 1 GiB memory budget per job, a 4 GiB cache
    /// whose entries expire after 30 days unused.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ForgeConfig {
            state_dir: state_dir.into(),
            strategy: Strategy::Standard,
            device: DevicePreference::Auto,
            allow_quarantine: false,
            max_concurrency: 2,
            queue_at_open: true,
            refresh_interval_ms: 0,
            telemetry_interval_ms: 10_000,
            batch: DEFAULT_BATCH,
            parameter_overrides: BTreeMap::new(),
            input_shapes: BTreeMap::new(),
            budgets: Strategy::ALL.map(Strategy::budget),
            memory_budget_bytes: Some(DEFAULT_MEMORY_BUDGET_BYTES),
            cache_capacity_bytes: 4 << 30,
            cache_ttl: Duration::from_secs(30 * 24 * 3600),
            keys: KeyRing::default(),
            breakers: BreakerKind::ALL.map(BreakerConfig::default_for),
            gpu_limit_percent: 25.0,
            gpu_window: Duration::from_secs(30),
            rss_budget_bytes: None,
        }
    }

    /// The time budget of a strategy.
    pub fn budget(&self, strategy: Strategy) -> Duration {
        self.budgets[strategy as usize]
    }
}

/// Default per-job memory budget: 1 GiB of process-memory growth.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 1 << 30;

/// What the forge needs from its host. Every method has a do-nothing
/// default, and `enumerate` defaults to the embedded catalog.
pub trait Host: Send {
    /// The host's descriptors; `None` means "use the embedded default catalog".
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(None)
    }
    /// Receives `KernelCatalogUpdate` bytes after an artifact is durable.
    fn catalog_update(&mut self, _bytes: &[u8]) {}
    /// Receives `TelemetryPacket` bytes.
    fn telemetry(&mut self, _bytes: &[u8]) {}
    /// Receives a log line.
    fn log(&mut self, _level: LogLevel, _message: &str) {}
}

/// A host that uses the default catalog and ignores what the forge reports.
pub struct DefaultHost;
impl Host for DefaultHost {}

/// Outcome of one blueprint in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Compiled and stored in this run.
    Ok,
    /// A stored artifact with the same cache key was reused.
    Cached,
    /// Compilation or storage failed.
    Failed,
    /// Refused (quarantine-only blueprint with quarantine compilation off).
    Refused,
}

impl JobStatus {
    /// Lowercase name (`ok`, `cached`, `failed`, `refused`).
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Ok => "ok",
            JobStatus::Cached => "cached",
            JobStatus::Failed => "failed",
            JobStatus::Refused => "refused",
        }
    }
}

/// The report of one blueprint in a run.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The blueprint.
    pub blueprint_id: String,
    /// Its name.
    pub name: String,
    /// Outcome.
    pub status: JobStatus,
    /// The stored record (for `Ok` and `Cached`).
    pub record: Option<ArtifactRecord>,
    /// Absolute path of the artifact (for `Ok` and `Cached`).
    pub artifact_path: Option<PathBuf>,
    /// Why it failed or was refused.
    pub error: Option<Error>,
}

/// Progress notifications of [`Forge::run`].
#[derive(Debug)]
pub enum Progress<'a> {
    /// Jobs are durably enqueued (acknowledged): (blueprint id, sequence number).
    Queued(&'a [(String, u64)]),
    /// A job is about to be processed: (position, total, blueprint id).
    Started(usize, usize, &'a str),
    /// A job starts compiling (no durable artifact of its cache key exists):
    /// (blueprint id, cache key).
    Compiling(&'a str, &'a str),
    /// A job finished.
    Finished(usize, usize, &'a JobReport),
}

/// An open forge over a state directory (exclusively locked).
pub struct Forge {
    config: ForgeConfig,
    device: Device,
    store: ArtifactStore,
    journal: Journal,
    guards: GuardTable,
    catalog: Catalog,
    host: Box<dyn Host>,
    counters: JobCounters,
    cache: CacheStats,
    verified: HashMap<String, VerifiedFile>,
    breakers: Breakers,
    conservative: bool,
    reported_open: Vec<BreakerKind>,
    gpu_high_since: Option<Instant>,
    last_reading: ResourceReading,
    shutdown: Arc<AtomicBool>,
    /// Compile threads kept from job to job (the process's, shared).
    workers: Arc<WorkerPool>,
    /// Jobs queued by `open` not yet reported through `run`'s progress.
    queued_at_open: Vec<(String, u64)>,
    _lock: StateLock,
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaintenanceReport {
    /// The cache after expiry and eviction.
    pub cache: CacheStats,
    /// Queued jobs that left the queue as stale.
    pub expired_jobs: usize,
    /// Files of interrupted writes removed.
    pub debris_removed: usize,
}

/// Resource readings (SPEC R10), taken by the forge or reported by its host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceReading {
    /// GPU utilisation percent (None: no GPU / unavailable).
    pub gpu_utilisation_percent: Option<f64>,
    /// Process resident memory in bytes (None: unknown).
    pub rss_bytes: Option<u64>,
}

/// What a refresh found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshReport {
    /// New or changed descriptors, now durably queued.
    pub queued: Vec<String>,
    /// Descriptors no longer enumerated (their artifacts stay; reported, not dropped).
    pub removed: Vec<String>,
}

/// What was true of an artifact file when it was last hashed (and its
/// signature checked): a prefetch answers from this while the file's
/// identity is unchanged, and hashes again otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VerifiedFile {
    checksum: String,
    identity: FileIdentity,
}

/// Identity of a file's content as the kernel reports it: any write to it
/// changes its mtime and ctime (ctime cannot be set from user space) and a
/// replacement by rename changes its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// The answer to a prefetch request.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefetchAnswer {
    /// The kernel is ready.
    Ready(leyline::KernelArtifactReady),
    /// It is not (reason: `missing_artifact`, `artifact_not_found`,
    /// `checksum_mismatch`, `signature_invalid`).
    Error(leyline::KernelArtifactError),
}

/// Cache metrics (SPEC R4): hits, misses, evictions, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Jobs answered by a stored artifact (current or adopted).
    pub hits: u64,
    /// Jobs that had to compile.
    pub misses: u64,
    /// Entries evicted (TTL or size cap).
    pub evictions: u64,
    /// Bytes held by the cache after the last maintenance.
    pub bytes: u64,
    /// Entries held after the last maintenance.
    pub entries: u64,
}

impl CacheStats {
    /// Hits over lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// The `tezzeret.cache.*` metrics.
    pub fn metrics(&self) -> Vec<leyline::MetricPoint> {
        vec![
            telemetry::metric("tezzeret.cache.hit_rate", self.hit_rate(), "ratio", &[]),
            telemetry::metric("tezzeret.cache.hits", self.hits as f64, "count", &[]),
            telemetry::metric("tezzeret.cache.misses", self.misses as f64, "count", &[]),
            telemetry::metric("tezzeret.cache.evictions", self.evictions as f64, "count", &[]),
            telemetry::metric("tezzeret.cache.bytes", self.bytes as f64, "bytes", &[]),
        ]
    }
}

/// File names inside a state directory.
pub mod layout {
    /// The write-ahead log.
    pub const WAL: &str = "wal.log";
    /// The guard table.
    pub const GUARDS: &str = "guards.tbl";
}

fn parse_device(name: &str) -> Device {
    match name.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
        Some(index) => Device::Cuda(index),
        None => Device::Cpu,
    }
}

impl Forge {
    /// Opens the state directory (refusing one held by another forge),
    /// recovers the journal, verifies (or rebuilds) the guard table against
    /// the stored catalog, and enumerates descriptors from the host.
    pub fn open(config: ForgeConfig, mut host: Box<dyn Host>) -> Result<Forge> {
        if config.batch < 1 {
            return Err(Error::invalid(format!("batch size must be >= 1, got {}", config.batch)));
        }
        if config.max_concurrency < 1 {
            return Err(Error::invalid("max_concurrency must be >= 1"));
        }
        let device = config.device.resolve()?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| Error::io(format!("create state directory {}", config.state_dir.display()), e))?;
        let lock = StateLock::acquire(&config.state_dir)?;
        let store = ArtifactStore::open(&config.state_dir)?;
        let journal = Journal::open(&config.state_dir.join(layout::WAL))?;
        let guards = GuardTable::open_writable(&config.state_dir.join(layout::GUARDS), guard::table::DEFAULT_SLOTS)?;
        let catalog = host.enumerate()?.unwrap_or_else(Catalog::default_catalog);
        for (id, overrides) in &config.parameter_overrides {
            let descriptor = catalog
                .get(id)
                .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("parameter values given for unknown blueprint {id:?}")))?;
            ResolvedParams::resolve(descriptor, overrides)?;
        }
        let config_breakers = config.breakers;
        let keep_workers = config.max_concurrency.max(1) as usize;
        let mut forge = Forge {
            config,
            device,
            store,
            journal,
            guards,
            catalog,
            host,
            counters: JobCounters::default(),
            cache: CacheStats::default(),
            verified: HashMap::new(),
            breakers: Breakers::new(config_breakers),
            conservative: false,
            reported_open: Vec::new(),
            gpu_high_since: None,
            last_reading: ResourceReading::default(),
            shutdown: Arc::new(AtomicBool::new(false)),
            workers: {
                let pool = compile::shared_pool();
                pool.keep_at_least(keep_workers);
                pool
            },
            queued_at_open: Vec::new(),
            _lock: lock,
        };
        forge.retire_unverified()?;
        let repaired = forge.sync_guard_table()?;
        // SPEC R1: what the host enumerates and is not compiled yet is queued
        // now (jobs whose descriptor went away or changed leave the queue).
        // A forge that cannot write (disk full) still opens and serves what
        // it has; run and refresh queue again and report their own errors.
        let queue_at_open = forge.config.queue_at_open;
        match forge.expire_stale_jobs().and_then(|_| if queue_at_open { forge.enqueue_catalog() } else { Ok(Vec::new()) }) {
            Ok(queued) => forge.queued_at_open = queued,
            Err(error) => forge.log_error("queueing the catalog at open (run or refresh will try again)", &error),
        }
        let recovery = forge.journal.recovery();
        let message = format!(
            "tezzeret {LIBRARY_VERSION}: opened {} with {} descriptors; WAL: {} transactions{}, {} stored artifacts, \
             {} jobs to resume; {repaired} guard slots repaired; device {}",
            forge.config.state_dir.display(),
            forge.catalog.len(),
            recovery.transactions.len(),
            if recovery.torn_bytes > 0 { format!(" ({} torn bytes dropped)", recovery.torn_bytes) } else { String::new() },
            forge.journal.state().artifacts.len(),
            forge.journal.state().pending.len(),
            compile::device_name(device)
        );
        forge.host.log(LogLevel::Info, &message);
        Ok(forge)
    }

    /// With trusted keys configured, takes every current artifact whose
    /// signature does not verify out of the catalog (it will be compiled and
    /// signed again when needed) and says so.
    fn retire_unverified(&mut self) -> Result<()> {
        if !self.config.keys.verifies() {
            return Ok(());
        }
        let failing: Vec<(ArtifactRecord, Error)> = self
            .journal
            .state()
            .artifacts
            .values()
            .filter_map(|r| self.config.keys.verify(r).err().map(|e| (r.clone(), e)))
            .collect();
        for (record, error) in failing {
            self.host.log(LogLevel::Error, &format!("{error}; removed from the catalog"));
            let evict = Record::Evict { blueprint_id: Some(record.blueprint_id.clone()), cache_key: record.cache_key.clone() };
            self.journal.append(vec![vec![evict]])?;
        }
        Ok(())
    }

    /// Whether a stored artifact may be used: its file verifies and, with
    /// trusted keys configured, its signature does.
    fn usable(&self, record: &ArtifactRecord) -> bool {
        self.store.verify(record).is_ok() && self.config.keys.verify(record).is_ok()
    }

    /// Makes the guard table agree with the stored catalog; returns how
    /// many slots were rewritten or removed.
    fn sync_guard_table(&mut self) -> Result<usize> {
        let (entries, damaged) = self.guards.entries();
        if damaged > 0 {
            self.guards = GuardTable::create(self.guards.path(), self.guards.slots())?;
        }
        let mut repaired = damaged;
        let expected: BTreeMap<&str, &ArtifactRecord> =
            self.journal.state().artifacts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        for entry in &entries {
            if !expected.contains_key(entry.blueprint_id.as_str()) {
                self.guards.remove(&entry.blueprint_id)?;
                repaired += 1;
            }
        }
        for record in expected.values() {
            let wanted = guard_entry(record)?;
            if self.guards.lookup(&record.blueprint_id).ok() != Some(Lookup::Found(wanted.clone())) {
                self.guards.put(&wanted)?;
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    /// The descriptors the forge works on.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The artifact store.
    pub fn store(&self) -> &ArtifactStore {
        &self.store
    }

    /// The journal (WAL and replayed state).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The current artifact of every blueprint, by id.
    pub fn artifacts(&self) -> &BTreeMap<String, ArtifactRecord> {
        &self.journal.state().artifacts
    }

    /// The guard table.
    pub fn guards(&self) -> &GuardTable {
        &self.guards
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
        self.counters
    }

    /// Cache metrics since open.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache
    }

    /// Cache lifecycle (SPEC R4): evicts entries unused for longer than the
    /// TTL, then the least recently used until the cache fits its cap. An
    /// evicted current artifact leaves the stored catalog (journal record,
    /// guard slot removed) and is compiled again when next needed.
    pub fn maintain_cache(&mut self) -> Result<CacheStats> {
        let now = std::time::SystemTime::now();
        let mut entries = self.store.cache_entries();
        entries.sort_by_key(|(_, used)| *used);
        let mut bytes: u64 = entries.iter().map(|(r, _)| r.size_bytes).sum();
        for (record, used) in &entries {
            let expired = now.duration_since(*used).unwrap_or_default() > self.config.cache_ttl;
            if !expired && bytes <= self.config.cache_capacity_bytes {
                continue;
            }
            self.evict(record)?;
            bytes = bytes.saturating_sub(record.size_bytes);
        }
        let remaining = self.store.cache_entries();
        self.cache.bytes = remaining.iter().map(|(r, _)| r.size_bytes).sum();
        self.cache.entries = remaining.len() as u64;
        Ok(self.cache)
    }

    /// A flag that, once set, makes running and queued work stop at once
    /// (jobs running are abandoned, queued ones stay queued): for shutdown.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
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
        let mut packet = telemetry::packet(self.metrics(), Vec::new(), self.conservative);
        let mut health = self.health();
        if closing {
            health.indicators.insert("closing".to_string(), "true".to_string());
        }
        packet.system_health = Some(health);
        self.host.telemetry(&leyline::encode(&packet));
    }

    /// Tells the host about an error of background work.
    pub fn log_error(&mut self, context: &str, error: &Error) {
        self.host.log(LogLevel::Error, &format!("{context}: {error}"));
    }

    /// The strategy jobs get now: one level lower in conservative mode.
    pub fn effective_strategy(&self) -> Strategy {
        if self.conservative {
            self.config.strategy.reduced()
        } else {
            self.config.strategy
        }
    }

    /// A strategy's budget now: ×1.5 in conservative mode.
    pub fn effective_budget(&self, strategy: Strategy) -> Duration {
        let budget = self.config.budget(strategy);
        if self.conservative {
            budget.mul_f64(1.5)
        } else {
            budget
        }
    }

    /// Maximum concurrent jobs now: 1 in conservative mode.
    pub fn effective_concurrency(&self) -> u32 {
        if self.conservative {
            1
        } else {
            self.config.max_concurrency
        }
    }

    /// Whether conservative mode is on.
    pub fn conservative(&self) -> bool {
        self.conservative
    }

    /// Enters or leaves conservative mode after breaker changes, telling
    /// the host at once (events `breaker_open`, `conservative_mode_*`).
    fn update_mode(&mut self) {
        let now = Instant::now();
        let was = self.conservative;
        let opened_before = self.reported_open.clone();
        let states = self.breakers.states(now);
        let mut events_out = Vec::new();
        self.reported_open.clear();
        for (kind, state) in &states {
            if matches!(state, crate::breakers::BreakerState::Open(_)) {
                self.reported_open.push(*kind);
                if !opened_before.contains(kind) {
                    events_out.push(telemetry::event(events::BREAKER_OPEN, TelemetryLevel::Warning, &[("breaker", kind.name().to_string())]));
                }
            }
        }
        self.conservative = self.breakers.conservative(now);
        if self.conservative != was {
            let (name, verb) = if self.conservative {
                (events::CONSERVATIVE_MODE_ENABLED, "entered")
            } else {
                (events::CONSERVATIVE_MODE_DISABLED, "left")
            };
            events_out.push(telemetry::event(name, TelemetryLevel::Warning, &[]));
            self.host.log(LogLevel::Warn, &format!("conservative mode {verb}"));
        }
        if !events_out.is_empty() {
            let metrics = self.metrics();
            self.emit_telemetry(metrics, events_out);
        }
    }

    /// Applies resource readings (SPEC R10): GPU utilisation above the limit
    /// (15 % in conservative mode) for the whole window counts a gpu-breaker
    /// failure (one per window); RSS above its budget a memory-breaker failure.
    pub fn report_resources(&mut self, reading: ResourceReading) {
        let now = Instant::now();
        let limit = if self.conservative { 15.0 } else { self.config.gpu_limit_percent };
        match reading.gpu_utilisation_percent {
            Some(u) if u > limit => {
                let since = *self.gpu_high_since.get_or_insert(now);
                if now.duration_since(since) >= self.config.gpu_window {
                    self.breakers.get(BreakerKind::Gpu).failure(now);
                    self.gpu_high_since = Some(now);
                }
            }
            Some(_) => {
                self.gpu_high_since = None;
                self.breakers.get(BreakerKind::Gpu).success(now);
            }
            None => self.gpu_high_since = None,
        }
        if let (Some(rss), Some(budget)) = (reading.rss_bytes, self.config.rss_budget_bytes) {
            if rss > budget {
                self.breakers.get(BreakerKind::Memory).failure(now);
            }
        }
        self.last_reading = reading;
        self.update_mode();
    }

    /// Takes readings itself (NVML for the GPU, /proc for memory) and applies them.
    pub fn sample_resources(&mut self) -> ResourceReading {
        let reading = ResourceReading {
            gpu_utilisation_percent: crate::resources::gpu_reading().map(|g| g.utilisation_percent),
            rss_bytes: crate::resources::process_rss_bytes(),
        };
        self.report_resources(reading);
        reading
    }

    /// Every metric of SPEC §9, now.
    pub fn metrics(&mut self) -> Vec<leyline::MetricPoint> {
        let now = Instant::now();
        let mut m = self.counters.metrics();
        m.extend(self.cache.metrics());
        for (kind, state) in self.breakers.states(now) {
            m.push(telemetry::metric("tezzeret.breaker.state", state.metric(), "state", &[("breaker", kind.name())]));
        }
        m.push(telemetry::metric("tezzeret.breaker.open_total", self.breakers.opened_total() as f64, "count", &[]));
        m.push(telemetry::metric("tezzeret.mode.conservative", f64::from(u8::from(self.conservative)), "flag", &[]));
        m.push(telemetry::metric("tezzeret.queue.depth", self.journal.state().pending.len() as f64, "count", &[]));
        m.push(telemetry::metric("tezzeret.wal.transactions_total", self.journal.state().transactions_since_checkpoint as f64, "count", &[]));
        if let Some(u) = self.last_reading.gpu_utilisation_percent {
            m.push(telemetry::metric("tezzeret.gpu.utilisation_percent", u, "percent", &[]));
        }
        if let Some(rss) = crate::resources::process_rss_bytes() {
            m.push(telemetry::metric("tezzeret.memory.rss_bytes", rss as f64, "bytes", &[]));
        }
        m
    }

    /// The metrics in Prometheus text exposition format (dots become
    /// underscores; labels kept).
    pub fn prometheus(&mut self) -> String {
        telemetry::prometheus(&self.metrics())
    }

    /// A Leyline `SystemHealth` snapshot: HEALTHY, DEGRADED in conservative
    /// mode, UNHEALTHY while the WAL is poisoned.
    pub fn health(&mut self) -> leyline::SystemHealth {
        let now = Instant::now();
        let poisoned = self.journal.wal().is_poisoned();
        let status = if poisoned {
            leyline::HealthStatus::Unhealthy
        } else if self.conservative {
            leyline::HealthStatus::Degraded
        } else {
            leyline::HealthStatus::Healthy
        };
        let mut indicators = BTreeMap::new();
        indicators.insert("concurrency".to_string(), self.effective_concurrency().to_string());
        indicators.insert("queue_depth".to_string(), self.journal.state().pending.len().to_string());
        indicators.insert("conservative".to_string(), self.conservative.to_string());
        indicators.insert("strategy".to_string(), self.effective_strategy().name().to_string());
        indicators.insert("wal_bytes".to_string(), self.journal.wal().len().to_string());
        indicators.insert("wal_transactions_since_checkpoint".to_string(), self.journal.state().transactions_since_checkpoint.to_string());
        indicators.insert("artifacts".to_string(), self.journal.state().artifacts.len().to_string());
        for (kind, state) in self.breakers.states(now) {
            indicators.insert(format!("breaker.{}", kind.name()), format!("{:?}", state.leyline()).to_lowercase());
        }
        let summary = match status {
            leyline::HealthStatus::Unhealthy => "WAL poisoned by a sync failure; reopen the forge".to_string(),
            leyline::HealthStatus::Degraded => "conservative mode: a circuit breaker is open or half-open".to_string(),
            _ => "healthy".to_string(),
        };
        leyline::SystemHealth { status: status as i32, summary, indicators }
    }

    /// A descriptor of the catalog by id, or a NotFound error naming it.
    fn catalog_descriptor(&self, blueprint_id: &str) -> Result<Descriptor> {
        self.catalog
            .get(blueprint_id)
            .cloned()
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("unknown blueprint {blueprint_id:?}")))
    }

    /// Durably queues a job for a catalog descriptor at a priority (Leyline
    /// `MessagePriority`, 1..=4); returns its sequence number once
    /// acknowledged, or None when a current artifact already serves it.
    pub fn submit(&mut self, blueprint_id: &str, priority: MessagePriority) -> Result<Option<u64>> {
        let descriptor = self.catalog_descriptor(blueprint_id)?;
        match self.plan(&descriptor) {
            Planned::Done(report) => match report.error {
                Some(error) => Err(error),
                None => Ok(None),
            },
            Planned::AlreadyQueued(seq) => {
                // Submitted again: the job keeps its place in submission order
                // and takes the priority asked now.
                if self.journal.state().pending[&seq].priority != priority as i32 {
                    self.journal.append(vec![vec![Record::Reprioritize { seq, priority: priority as i32 }]])?;
                }
                Ok(Some(seq))
            }
            Planned::Submit(mut job) => {
                job.priority = priority as i32;
                Ok(Some(self.journal.submit(vec![job])?[0]))
            }
        }
    }

    /// How a compile runs when `concurrent` compile at once: on the forge's
    /// workers, abandoned at shutdown, sharing the caller's libtorch
    /// intra-op threads among them so that they do not oversubscribe the cores.
    fn execution(&self, concurrent: usize) -> compile::Execution {
        let threads = tch::get_num_threads().max(1);
        compile::Execution {
            abort: Some(self.shutdown.clone()),
            workers: Some(self.workers.clone()),
            intra_op_threads: Some((threads / concurrent.max(1) as i32).max(1)),
        }
    }

    /// Runs every queued job (priority, then FIFO) and returns their reports.
    ///
    /// Up to `effective_concurrency` jobs compile at once, started and
    /// committed in queue order. The queue is pipelined: as soon as a
    /// job's compile ends the next one starts, and the finished job is
    /// stored, committed and announced while it compiles — the forge's
    /// durable work hides behind the next compile instead of adding to it.
    pub fn drain(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Vec<JobReport> {
        let queue: Vec<Job> = self.journal.state().queue().into_iter().cloned().collect();
        let total = queue.len();
        let mut reports = Vec::with_capacity(total);
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut next = 0;
        loop {
            self.start_jobs(&queue, &mut next, &mut in_flight, progress);
            let Some(front) = in_flight.pop_front() else { break };
            let compiled = front.compile.map(|c| {
                c.and_then(|h| h.join().unwrap_or_else(|_| Err(Error::new(ErrorCode::Internal, "compile thread panicked"))))
            });
            // The next job starts compiling before this one is stored.
            self.start_jobs(&queue, &mut next, &mut in_flight, progress);
            let report = self.finish(&queue[front.position], front.prepared, compiled);
            progress(Progress::Finished(front.position, total, &report));
            reports.push(report);
        }
        reports
    }

    /// Starts queued jobs, in order, while fewer than `effective_concurrency`
    /// compile (none once shutting down).
    fn start_jobs(&mut self, queue: &[Job], next: &mut usize, in_flight: &mut VecDeque<InFlight>, progress: &mut dyn FnMut(Progress<'_>)) {
        let total = queue.len();
        while *next < total && !self.shutdown.load(Ordering::Acquire) {
            let width = (self.effective_concurrency() as usize).max(1);
            if in_flight.iter().filter(|f| matches!(f.compile, Some(Ok(_)))).count() >= width {
                return;
            }
            let job = &queue[*next];
            progress(Progress::Started(*next, total, &job.blueprint_id));
            let prepared = self.prepare(job, progress);
            let compile = match &prepared {
                Ok(Prepared::Compile(c)) => {
                    let execution = self.execution(width.min(total - *next));
                    let (job, budget, memory) = (c.job.clone(), c.budget, self.config.memory_budget_bytes);
                    let spawned = std::thread::Builder::new()
                        .name("tz-wait".into())
                        .spawn(move || compile::compile_under(job, budget, memory, execution));
                    Some(spawned.map_err(|e| Error::io("start a compile", e)))
                }
                _ => None,
            };
            // Recorded once the compile is under way, so that the msync
            // overlaps it rather than delaying it.
            let prepared = match (prepared, self.record_start(job)) {
                (Ok(prepared), Ok(())) => Ok(prepared),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
            in_flight.push_back(InFlight { position: *next, prepared, compile });
            *next += 1;
        }
    }

    /// Enumerates the host's descriptors again (SPEC R1): new or changed
    /// ones (by content hash) are durably queued; ones no longer enumerated
    /// are reported (their artifacts stay).
    pub fn refresh(&mut self) -> Result<RefreshReport> {
        let Some(catalog) = self.host.enumerate()? else { return Ok(RefreshReport::default()) };
        let removed: Vec<String> = self
            .catalog
            .descriptors()
            .iter()
            .filter(|d| catalog.get(&d.blueprint_id).is_none())
            .map(|d| d.blueprint_id.clone())
            .collect();
        self.catalog = catalog;
        self.expire_stale_jobs()?;
        let queued = self.enqueue_catalog()?.into_iter().map(|(id, _)| id).collect();
        for id in &removed {
            self.host.log(LogLevel::Warn, &format!("{id} is no longer enumerated by the host; its artifact is kept"));
        }
        Ok(RefreshReport { queued, removed })
    }

    /// Answers a Leyline `KernelPrefetchRequest` (SPEC R13) with
    /// `KernelArtifactReady` or `KernelArtifactError`. The artifact file is
    /// hashed (and its signature checked) the first time and whenever its
    /// identity changed since; otherwise one `stat` proves it is the file
    /// that was verified.
    pub fn prefetch(&mut self, request: &leyline::KernelPrefetchRequest) -> PrefetchAnswer {
        let id = &request.blueprint_id;
        let error = |reason: &str| {
            PrefetchAnswer::Error(leyline::KernelArtifactError {
                request_id: request.request_id.clone(),
                blueprint_id: id.clone(),
                reason: reason.to_string(),
            })
        };
        let Some(record) = self.journal.state().artifacts.get(id).cloned() else { return error("missing_artifact") };
        let path = self.store.artifact_path(&record);
        let Ok(identity) = FileIdentity::of(&path) else { return error("artifact_not_found") };
        let known = self.verified.get(id).is_some_and(|v| v.checksum == record.checksum && v.identity == identity);
        if !known {
            self.verified.remove(id);
            if let Err(e) = self.store.verify(&record) {
                return error(if e.code() == ErrorCode::NotFound { "artifact_not_found" } else { "checksum_mismatch" });
            }
            if self.config.keys.verify(&record).is_err() {
                return error("signature_invalid");
            }
            // The identity is taken again after hashing: a change during the hash shows next time.
            match FileIdentity::of(&path) {
                Ok(after) if after == identity => {
                    self.verified.insert(id.clone(), VerifiedFile { checksum: record.checksum.clone(), identity });
                }
                _ => return error("checksum_mismatch"),
            }
        }
        self.store.touch(&record.cache_key);
        PrefetchAnswer::Ready(leyline::KernelArtifactReady {
            request_id: request.request_id.clone(),
            blueprint_id: id.clone(),
            artifact_ref: path.display().to_string(),
            checksum: record.checksum.clone(),
            guard_digest: record.guard_digest.clone(),
            prewarm_p50_ms: record.prewarm_p50_ms as f32,
            prewarm_p95_ms: record.prewarm_p95_ms as f32,
        })
    }

    /// Loads a blueprint's current artifact for running in-process (hashed
    /// and signature-checked on load).
    pub fn load_kernel(&self, blueprint_id: &str) -> Result<Kernel> {
        let record = self.journal.state().artifacts.get(blueprint_id).ok_or_else(|| {
            Error::new(ErrorCode::NotFound, format!("missing_artifact: no current artifact for blueprint {blueprint_id:?}"))
        })?;
        self.store.touch(&record.cache_key);
        Kernel::load(&self.store, record, &self.config.keys)
    }

    fn evict(&mut self, record: &ArtifactRecord) -> Result<()> {
        let current = self.journal.state().artifacts.get(&record.blueprint_id).is_some_and(|a| a.cache_key == record.cache_key);
        if current {
            let evict = Record::Evict { blueprint_id: Some(record.blueprint_id.clone()), cache_key: record.cache_key.clone() };
            self.journal.append(vec![vec![evict]])?;
            self.guards.remove(&record.blueprint_id)?;
        }
        self.store.remove(record)?;
        self.cache.evictions += 1;
        self.host.log(LogLevel::Info, &format!("evicted {} ({}) from the cache", record.blueprint_id, &record.cache_key[..16]));
        Ok(())
    }

    /// The job a descriptor of the catalog makes under this configuration.
    fn job_for(&self, descriptor: &Descriptor) -> Result<(Job, CompileJob)> {
        let id = &descriptor.blueprint_id;
        let mut compile_job = CompileJob::new(descriptor.clone(), self.effective_strategy());
        compile_job.overrides = self.config.parameter_overrides.get(id).cloned().unwrap_or_default();
        compile_job.input_shapes = self.config.input_shapes.get(id).cloned();
        compile_job.device = self.device;
        compile_job.batch = self.config.batch;
        let params = ResolvedParams::resolve(descriptor, &compile_job.overrides)?;
        let job = Job {
            seq: 0,
            priority: MessagePriority::Normal as i32,
            blueprint_id: id.clone(),
            descriptor_hex: hex(&leyline::encode(&descriptor.to_leyline())),
            overrides: compile_job.overrides.clone(),
            input_shapes: compile_job.input_shapes.clone(),
            strategy: compile_job.strategy.name().to_string(),
            device: compile::device_name(compile_job.device),
            batch: compile_job.batch,
            cache_key: compile::cache_key(&compile_job, &params),
        };
        Ok((job, compile_job))
    }

    /// Processes every descriptor of the catalog: reuses a current artifact
    /// with the same cache key, refuses quarantined blueprints (unless
    /// allowed), durably enqueues the rest in one group commit, then runs
    /// the queue — jobs resumed from before a crash included — in priority
    /// and submission order.
    pub fn run(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Vec<JobReport> {
        let queued_at_open = std::mem::take(&mut self.queued_at_open);
        if !queued_at_open.is_empty() {
            progress(Progress::Queued(&queued_at_open));
        }
        let descriptors = self.catalog.descriptors().to_vec();
        let mut reports: BTreeMap<String, JobReport> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut submissions = Vec::new();
        for descriptor in &descriptors {
            order.push(descriptor.blueprint_id.clone());
            match self.plan(descriptor) {
                Planned::Done(report) => {
                    reports.insert(descriptor.blueprint_id.clone(), report);
                }
                Planned::Submit(job) => submissions.push(job),
                Planned::AlreadyQueued(_) => {}
            }
        }
        if !submissions.is_empty() {
            let ids: Vec<String> = submissions.iter().map(|j| j.blueprint_id.clone()).collect();
            match self.journal.submit(submissions) {
                Ok(seqs) => progress(Progress::Queued(&ids.into_iter().zip(seqs).collect::<Vec<_>>())),
                Err(error) => {
                    // Not acknowledged: every one of them is reported failed, none silently dropped.
                    self.host.log(LogLevel::Error, &format!("could not enqueue {} jobs: {error}", ids.len()));
                    for id in ids {
                        self.counters.failed += 1;
                        let name = self.catalog.get(&id).map(|d| d.name.clone()).unwrap_or_default();
                        let error = error.clone().context("enqueue");
                        reports.insert(id.clone(), self.report(&id, &name, JobStatus::Failed, None, Some(error)));
                    }
                }
            }
        }
        for report in self.drain(progress) {
            if !order.contains(&report.blueprint_id) {
                order.push(report.blueprint_id.clone());
            }
            reports.insert(report.blueprint_id.clone(), report);
        }
        if let Err(error) = self.maintain() {
            self.host.log(LogLevel::Error, &format!("maintenance failed: {error}"));
        }
        let metrics = self.metrics();
        self.emit_telemetry(metrics, Vec::new());
        let mut reports: Vec<JobReport> = order.into_iter().filter_map(|id| reports.remove(&id)).collect();
        // An artifact evicted right away (cap too small) is no longer current.
        for report in &mut reports {
            if report.record.as_ref().is_some_and(|r| self.journal.state().artifacts.get(&r.blueprint_id) != Some(r)) {
                report.artifact_path = None;
            }
        }
        reports
    }

    /// Compiles (or reuses) one descriptor of the catalog by id, now,
    /// bypassing the queue order.
    pub fn compile_one(&mut self, blueprint_id: &str) -> Result<JobReport> {
        let descriptor = self.catalog_descriptor(blueprint_id)?;
        match self.plan(&descriptor) {
            Planned::Done(report) => Ok(report),
            Planned::Submit(job) => {
                let seq = self.journal.submit(vec![job])?[0];
                let job = self.journal.state().pending[&seq].clone();
                Ok(self.execute(&job, &mut |_| {}))
            }
            Planned::AlreadyQueued(seq) => {
                let job = self.journal.state().pending[&seq].clone();
                Ok(self.execute(&job, &mut |_| {}))
            }
        }
    }

    fn report(&self, descriptor_id: &str, name: &str, status: JobStatus, record: Option<ArtifactRecord>, error: Option<Error>) -> JobReport {
        JobReport {
            blueprint_id: descriptor_id.to_string(),
            name: name.to_string(),
            status,
            artifact_path: record.as_ref().map(|r| self.store.artifact_path(r)),
            record,
            error,
        }
    }

    /// Durably queues, in one group commit at priority NORMAL, every
    /// descriptor of the catalog that has no current artifact of its cache
    /// key and no queued job (quarantined ones only when allowed). Returns
    /// the jobs queued. Touches no counter: nothing ran yet.
    fn enqueue_catalog(&mut self) -> Result<Vec<(String, u64)>> {
        let mut jobs = Vec::new();
        for descriptor in self.catalog.descriptors() {
            if descriptor.is_quarantined() && !self.config.allow_quarantine {
                continue;
            }
            let Ok((job, _)) = self.job_for(descriptor) else { continue }; // reported when planned
            let current = self.journal.state().artifacts.get(&job.blueprint_id).is_some_and(|a| a.cache_key == job.cache_key);
            if !current && self.queued_seq(&job).is_none() {
                jobs.push(job);
            }
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.blueprint_id.clone()).collect();
        let seqs = self.journal.submit(jobs)?;
        Ok(ids.into_iter().zip(seqs).collect())
    }

    /// Takes out of the queue (SPEC R10) the jobs that can no longer be
    /// useful: their descriptor is no longer enumerated, or changed since
    /// they were queued (the new content gets its own job). Returns how many.
    fn expire_stale_jobs(&mut self) -> Result<usize> {
        let stale: Vec<(u64, String, &'static str)> = self
            .journal
            .state()
            .pending
            .values()
            .filter_map(|job| {
                let reason = match self.catalog.get(&job.blueprint_id) {
                    None => "descriptor_removed",
                    Some(d) if hex(&leyline::encode(&d.to_leyline())) != job.descriptor_hex => "descriptor_changed",
                    Some(_) => return None,
                };
                Some((job.seq, job.blueprint_id.clone(), reason))
            })
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let records = stale.iter().map(|(seq, _, reason)| Record::Expire { seq: *seq, reason: reason.to_string() }).collect();
        self.journal.append(vec![records])?;
        self.counters.expired += stale.len() as u64;
        for (seq, id, reason) in &stale {
            self.host.log(LogLevel::Info, &format!("queued job #{seq} for {id} expired: {reason}"));
        }
        Ok(stale.len())
    }

    /// One pass of TTL maintenance (SPEC R10, every 5 minutes on the
    /// background thread and after each run): stale queue entries leave
    /// the queue, debris of interrupted writes is removed, cache entries
    /// expire and the cache is brought under its cap.
    pub fn maintain(&mut self) -> Result<MaintenanceReport> {
        let expired_jobs = self.expire_stale_jobs()?;
        let referenced = self.journal.state().artifacts.values().map(|r| r.artifact_file.clone()).collect();
        let debris_removed = self.store.remove_debris(&referenced)?;
        if debris_removed > 0 {
            self.host.log(LogLevel::Info, &format!("removed {debris_removed} files left by interrupted writes"));
        }
        let cache = self.maintain_cache()?;
        Ok(MaintenanceReport { cache, expired_jobs, debris_removed })
    }

    /// The queued job identical to `job` (same blueprint and cache key), if any.
    fn queued_seq(&self, job: &Job) -> Option<u64> {
        self.journal.state().pending.values().find(|p| p.blueprint_id == job.blueprint_id && p.cache_key == job.cache_key).map(|p| p.seq)
    }

    fn plan(&mut self, descriptor: &Descriptor) -> Planned {
        let id = &descriptor.blueprint_id;
        self.counters.total += 1;
        if descriptor.is_quarantined() && !self.config.allow_quarantine {
            let error = Error::new(
                ErrorCode::Quarantined,
                format!(
                    "{id} ({}) is quarantine-only (tier {:?}): refused; enable quarantine compilation to build it",
                    descriptor.name, descriptor.tier
                ),
            );
            return Planned::Done(self.report(id, &descriptor.name, JobStatus::Refused, None, Some(error)));
        }
        let (job, _) = match self.job_for(descriptor) {
            Ok(job) => job,
            Err(error) => {
                self.counters.failed += 1;
                return Planned::Done(self.report(id, &descriptor.name, JobStatus::Failed, None, Some(error)));
            }
        };
        if let Some(record) = self.journal.state().artifacts.get(id) {
            if record.cache_key == job.cache_key && self.usable(record) {
                let record = record.clone();
                self.cache.hits += 1;
                self.store.touch(&record.cache_key);
                return Planned::Done(self.report(id, &descriptor.name, JobStatus::Cached, Some(record), None));
            }
        }
        match self.queued_seq(&job) {
            Some(seq) => Planned::AlreadyQueued(seq),
            None => Planned::Submit(job),
        }
    }

    /// Runs one queued job to its end: adopts a durable artifact of the same
    /// cache key if one exists (a crash came between storing it and
    /// committing it), else compiles; then commits, updates the guard table
    /// and announces — or records the failure.
    fn execute(&mut self, job: &Job, progress: &mut dyn FnMut(Progress<'_>)) -> JobReport {
        let prepared = self.record_start(job).and_then(|_| self.prepare(job, progress));
        let compiled = match &prepared {
            Ok(Prepared::Compile(c)) => Some(compile::compile_under(
                c.job.clone(),
                c.budget,
                self.config.memory_budget_bytes,
                self.execution(1),
            )),
            _ => None,
        };
        self.finish(job, prepared, compiled)
    }

    /// Ends a job whose compile (if it needed one) is done: stores and
    /// commits, feeds the breakers, records a failure, reports.
    fn finish(&mut self, job: &Job, prepared: Result<Prepared>, compiled: Option<Result<CompiledArtifact>>) -> JobReport {
        let name = Descriptor::decode(&unhex(&job.descriptor_hex)).map(|d| d.name).unwrap_or_default();
        let outcome = match prepared {
            Err(e) => Err(e),
            Ok(Prepared::Adopted(record)) => self.commit(job, record.clone(), None).map(|_| (JobStatus::Cached, record)),
            Ok(Prepared::Compile(c)) => match compiled.expect("a compile result for a compile job") {
                Err(e) => Err(e.context(format!("{} ({})", job.blueprint_id, c.job.descriptor.name))),
                Ok(artifact) => {
                    self.counters.compile_us_total += (artifact.job_ms * 1e3) as u64;
                    self.store_compiled(job, &c, artifact)
                }
            },
        };
        if self.shutdown.load(Ordering::Acquire) {
            if let Err(error) = outcome {
                // Abandoned by shutdown: not a failure of the job, which stays
                // queued (durably) and resumes at the next open.
                return self.report(&job.blueprint_id, &name, JobStatus::Failed, None, Some(error));
            }
        }
        let now = Instant::now();
        match &outcome {
            Ok((JobStatus::Ok, _)) => {
                self.breakers.get(BreakerKind::Timeout).success(now);
                self.breakers.get(BreakerKind::Memory).success(now);
            }
            Err(e) if e.message().contains("memory_budget_exceeded") => {
                self.breakers.get(BreakerKind::Memory).failure(now);
            }
            Err(e) if e.message().contains("budget_exceeded") => {
                self.breakers.get(BreakerKind::Timeout).failure(now);
            }
            _ => {}
        }
        self.update_mode();
        match outcome {
            Ok((status, record)) => self.report(&job.blueprint_id, &name, status, Some(record), None),
            Err(error) => {
                self.counters.failed += 1;
                if error.code() == ErrorCode::BudgetExceeded {
                    self.counters.abandoned += 1;
                }
                let reason = compile::failure_reason(&error);
                self.host.log(LogLevel::Error, &format!("{} failed: {error}", job.blueprint_id));
                let fail = Record::Fail { seq: job.seq, reason: reason.clone(), message: error.message().to_string() };
                if let Err(e) = self.journal.append(vec![vec![fail]]) {
                    self.host.log(LogLevel::Error, &format!("could not record the failure of {}: {e}", job.blueprint_id));
                }
                let failed = telemetry::event(
                    events::COMPILE_FAILED,
                    TelemetryLevel::Error,
                    &[("blueprint_id", job.blueprint_id.clone()), ("reason", reason)],
                );
                self.emit_telemetry(self.counters.metrics(), vec![failed]);
                self.report(&job.blueprint_id, &name, JobStatus::Failed, None, Some(error))
            }
        }
    }

    /// Records durably that a job started (a crash from here on makes its
    /// next run a retry).
    fn record_start(&mut self, job: &Job) -> Result<()> {
        if self.journal.state().started.contains(&job.seq) {
            // In flight when the last forge stopped: this is a retry.
            self.counters.retried += 1;
        }
        self.journal.append(vec![vec![Record::Start { seq: job.seq }]])
    }

    /// Sets a job up: either adopts a durable artifact of its cache key (a
    /// crash came between storing and committing it) or prepares its
    /// compile. The caller records the start ([`Self::record_start`]).
    fn prepare(&mut self, job: &Job, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Prepared> {
        let descriptor = Descriptor::decode(&unhex(&job.descriptor_hex))?;
        let id = job.blueprint_id.clone();
        if let Some(record) = self.store.manifest(&job.cache_key) {
            if record.blueprint_id == id && self.usable(&record) {
                self.cache.hits += 1;
                self.store.touch(&record.cache_key);
                return Ok(Prepared::Adopted(record));
            }
        }
        let strategy: Strategy = job.strategy.parse()?;
        let compile_job = CompileJob {
            descriptor,
            overrides: job.overrides.clone(),
            strategy,
            device: parse_device(&job.device),
            batch: job.batch,
            input_shapes: job.input_shapes.clone(),
        };
        self.counters.started += 1;
        self.cache.misses += 1;
        progress(Progress::Compiling(&id, &job.cache_key));
        let started = telemetry::event(
            events::COMPILE_STARTED,
            TelemetryLevel::Info,
            &[("blueprint_id", id), ("strategy", strategy.name().to_string())],
        );
        Ok(Prepared::Compile(PendingCompile { job: compile_job, budget: self.effective_budget(strategy), started, begun: Instant::now() }))
    }

    /// Stores a compiled artifact durably and commits it.
    fn store_compiled(&mut self, job: &Job, c: &PendingCompile, artifact: CompiledArtifact) -> Result<(JobStatus, ArtifactRecord)> {
        let id = job.blueprint_id.clone();
        let descriptor = &c.job.descriptor;
        let record = ArtifactRecord {
            blueprint_id: id.clone(),
            name: descriptor.name.clone(),
            descriptor_hash: hex(&descriptor.content_hash()),
            params: artifact.params.values().clone(),
            strategy: artifact.strategy.name().to_string(),
            variant: artifact.variant.clone(),
            device: artifact.device.clone(),
            cache_key: artifact.cache_key.clone(),
            artifact_file: String::new(),
            checksum: String::new(),
            size_bytes: 0,
            guard_digest: artifact.guard_digest.clone(),
            guard_spec: artifact.guard_spec.clone(),
            dynamic_batch: artifact.dynamic_batch,
            compile_ms: artifact.compile_ms,
            prewarm_p50_ms: artifact.prewarm_p50_ms,
            prewarm_p95_ms: artifact.prewarm_p95_ms,
            tezzeret_version: LIBRARY_VERSION.to_string(),
            torch_version: TORCH_VERSION.to_string(),
            format_version: ARTIFACT_FORMAT_VERSION,
            revision: self.journal.state().revisions.get(&id).copied().unwrap_or(0) + 1,
            signature: None,
        };
        let record = self.store.put(record, &artifact.bytes, &self.config.keys)?;
        self.commit(job, record.clone(), Some((c.started.clone(), c.begun)))?;
        Ok((JobStatus::Ok, record))
    }

    /// Makes a stored artifact current: journal commit, guard slot, then the
    /// catalog callback (so an announced artifact is durable everywhere).
    fn commit(&mut self, job: &Job, record: ArtifactRecord, compiled: Option<(leyline::TelemetryEvent, Instant)>) -> Result<()> {
        self.journal.append(vec![vec![Record::Commit { seq: job.seq, artifact: record.clone() }]])?;
        self.verified.remove(&record.blueprint_id);
        self.guards.put(&guard_entry(&record)?)?;
        self.counters.completed += 1;
        let update = KernelCatalogUpdate {
            blueprint_id: record.blueprint_id.clone(),
            artifact_ref: self.store.artifact_path(&record).display().to_string(),
            checksum: record.checksum.clone(),
            guard_digest: record.guard_digest.clone(),
            compile_ms: record.compile_ms as f32,
            prewarm_ms: record.prewarm_p50_ms as f32,
        };
        self.host.catalog_update(&leyline::encode(&update));

        let strategy = record.strategy.clone();
        let mut metrics = self.counters.metrics();
        metrics.push(telemetry::metric("tezzeret.compilation.duration_ms", record.compile_ms, "ms", &[("strategy", &strategy)]));
        for (quantile, value) in [("p50", record.prewarm_p50_ms), ("p95", record.prewarm_p95_ms)] {
            metrics.push(telemetry::metric("tezzeret.prewarm.ms", value, "ms", &[("strategy", &strategy), ("quantile", quantile)]));
        }
        let id = record.blueprint_id.clone();
        let mut events_out = Vec::new();
        if let Some((started, begun)) = compiled {
            events_out.push(started);
            events_out.push(telemetry::event(events::PREWARM_COMPLETED, TelemetryLevel::Info, &[("blueprint_id", id.clone())]));
            events_out.push(telemetry::event(
                events::COMPILE_SUCCEEDED,
                TelemetryLevel::Info,
                &[("blueprint_id", id.clone()), ("job_ms", format!("{:.3}", begun.elapsed().as_secs_f64() * 1e3))],
            ));
        }
        self.emit_telemetry(metrics, events_out);
        self.host.log(LogLevel::Debug, &format!("{id} committed ({:.1} ms compile)", record.compile_ms));
        Ok(())
    }

    fn emit_telemetry(&mut self, metrics: Vec<leyline::MetricPoint>, events: Vec<leyline::TelemetryEvent>) {
        let packet = telemetry::packet(metrics, events, self.conservative);
        self.host.telemetry(&leyline::encode(&packet));
    }
}

/// A queued job started by `drain` and not finished yet.
struct InFlight {
    /// Its index in the drained queue.
    position: usize,
    prepared: Result<Prepared>,
    /// Its compile, when it needs one (or why it could not start).
    compile: Option<Result<std::thread::JoinHandle<Result<CompiledArtifact>>>>,
}

/// A job ready to compile.
struct PendingCompile {
    job: CompileJob,
    budget: Duration,
    started: leyline::TelemetryEvent,
    begun: Instant,
}

/// What starting a job decided.
enum Prepared {
    /// A durable artifact of its cache key exists: commit it, no compile.
    Adopted(ArtifactRecord),
    /// It must compile.
    Compile(PendingCompile),
}

/// What planning a descriptor decided.
enum Planned {
    /// Nothing to run (cached, refused, or invalid).
    Done(JobReport),
    /// A new job to enqueue.
    Submit(Job),
    /// An identical job is already queued: its sequence number.
    AlreadyQueued(u64),
}

/// The guard-table entry of a stored artifact.
pub fn guard_entry(record: &ArtifactRecord) -> Result<GuardEntry> {
    GuardEntry::new(&record.blueprint_id, &record.checksum, &record.guard_digest, &record.device, record.dynamic_batch, &record.guard_spec)
}

/// Decodes lowercase hex (invalid digits decode as zero bytes, which then
/// fail descriptor validation with a clear message).
fn unhex(text: &str) -> Vec<u8> {
    text.as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).ok().and_then(|s| u8::from_str_radix(s, 16).ok()).unwrap_or(0))
        .collect()
}
