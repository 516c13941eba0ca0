//! The forge: owns a state directory, learns descriptors from its host,
//! compiles what is not compiled yet, stores artifacts durably and tells
//! the host (catalog updates, telemetry, log lines).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::Device;

use crate::blueprints::{ParameterOverrides, ResolvedParams, DEFAULT_BATCH};
use crate::catalog::{Catalog, Descriptor};
use crate::compile::{self, CompileJob, Strategy};
use crate::guard::hex;
use crate::leyline::{self, KernelCatalogUpdate, TelemetryLevel};
use crate::lock::StateLock;
use crate::store::{ArtifactRecord, ArtifactStore};
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
}

impl ForgeConfig {
    /// Defaults for a state directory: Standard, auto device, quarantine off,
    /// concurrency 2, no refresh, telemetry every 10 s, batch 8, the design's
    /// budgets per strategy, 1 GiB memory budget per job.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ForgeConfig {
            state_dir: state_dir.into(),
            strategy: Strategy::Standard,
            device: DevicePreference::Auto,
            allow_quarantine: false,
            max_concurrency: 2,
            refresh_interval_ms: 0,
            telemetry_interval_ms: 10_000,
            batch: DEFAULT_BATCH,
            parameter_overrides: BTreeMap::new(),
            input_shapes: BTreeMap::new(),
            budgets: Strategy::ALL.map(Strategy::budget),
            memory_budget_bytes: Some(DEFAULT_MEMORY_BUDGET_BYTES),
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
    /// A job is about to be processed: (position, total, blueprint id).
    Started(usize, usize, &'a str),
    /// A job finished.
    Finished(usize, usize, &'a JobReport),
}

/// An open forge over a state directory (exclusively locked).
pub struct Forge {
    config: ForgeConfig,
    device: Device,
    store: ArtifactStore,
    catalog: Catalog,
    host: Box<dyn Host>,
    counters: JobCounters,
    _lock: StateLock,
}

impl Forge {
    /// Opens the state directory (refusing one held by another forge),
    /// loads the store and enumerates descriptors from the host.
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
        let catalog = host.enumerate()?.unwrap_or_else(Catalog::default_catalog);
        for (id, overrides) in &config.parameter_overrides {
            let descriptor = catalog
                .get(id)
                .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("parameter values given for unknown blueprint {id:?}")))?;
            ResolvedParams::resolve(descriptor, overrides)?;
        }
        host.log(
            LogLevel::Info,
            &format!(
                "tezzeret {LIBRARY_VERSION}: opened {} with {} descriptors, {} stored artifacts, device {}",
                config.state_dir.display(),
                catalog.len(),
                store.records().count(),
                compile::device_name(device)
            ),
        );
        Ok(Forge { config, device, store, catalog, host, counters: JobCounters::default(), _lock: lock })
    }

    /// The descriptors the forge works on.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The artifact store.
    pub fn store(&self) -> &ArtifactStore {
        &self.store
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

    /// Processes every descriptor of the catalog in order: reuses a stored
    /// artifact with the same cache key, refuses quarantined blueprints
    /// (unless allowed), and compiles the rest.
    pub fn run(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Vec<JobReport> {
        let descriptors = self.catalog.descriptors().to_vec();
        let total = descriptors.len();
        let mut reports = Vec::with_capacity(total);
        for (i, descriptor) in descriptors.iter().enumerate() {
            progress(Progress::Started(i, total, &descriptor.blueprint_id));
            let report = self.process(descriptor);
            progress(Progress::Finished(i, total, &report));
            reports.push(report);
        }
        let mut metrics = self.counters.metrics();
        metrics.push(telemetry::metric("tezzeret.queue.depth", 0.0, "count", &[]));
        self.emit_telemetry(metrics, Vec::new());
        reports
    }

    /// Compiles (or reuses) one descriptor of the catalog by id.
    pub fn compile_one(&mut self, blueprint_id: &str) -> Result<JobReport> {
        let descriptor = self
            .catalog
            .get(blueprint_id)
            .cloned()
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("unknown blueprint {blueprint_id:?}")))?;
        Ok(self.process(&descriptor))
    }

    fn process(&mut self, descriptor: &Descriptor) -> JobReport {
        self.counters.total += 1;
        let mut report = JobReport {
            blueprint_id: descriptor.blueprint_id.clone(),
            name: descriptor.name.clone(),
            status: JobStatus::Failed,
            record: None,
            artifact_path: None,
            error: None,
        };
        if descriptor.is_quarantined() && !self.config.allow_quarantine {
            report.status = JobStatus::Refused;
            report.error = Some(Error::new(
                ErrorCode::Quarantined,
                format!(
                    "{} ({}) is quarantine-only (tier {:?}): refused; enable quarantine compilation to build it",
                    descriptor.blueprint_id, descriptor.name, descriptor.tier
                ),
            ));
            return report;
        }
        match self.compile_and_store(descriptor) {
            Ok((status, record)) => {
                report.status = status;
                report.artifact_path = Some(self.store.artifact_path(&record));
                report.record = Some(record);
            }
            Err(error) => {
                self.counters.failed += 1;
                self.host.log(LogLevel::Error, &format!("{} failed: {error}", descriptor.blueprint_id));
                let failed = telemetry::event(
                    events::COMPILE_FAILED,
                    TelemetryLevel::Error,
                    &[("blueprint_id", descriptor.blueprint_id.clone()), ("reason", compile::failure_reason(&error))],
                );
                self.emit_telemetry(self.counters.metrics(), vec![failed]);
                report.error = Some(error);
            }
        }
        report
    }

    fn compile_and_store(&mut self, descriptor: &Descriptor) -> Result<(JobStatus, ArtifactRecord)> {
        let id = &descriptor.blueprint_id;
        let mut job = CompileJob::new(descriptor.clone(), self.config.strategy);
        job.overrides = self.config.parameter_overrides.get(id).cloned().unwrap_or_default();
        job.input_shapes = self.config.input_shapes.get(id).cloned();
        job.device = self.device;
        job.batch = self.config.batch;
        let params = ResolvedParams::resolve(descriptor, &job.overrides)?;
        let key = compile::cache_key(&job, &params);
        if let Some(record) = self.store.get(id) {
            if record.cache_key == key && self.store.verify(record).is_ok() {
                return Ok((JobStatus::Cached, record.clone()));
            }
        }
        self.counters.started += 1;
        let started = telemetry::event(
            events::COMPILE_STARTED,
            TelemetryLevel::Info,
            &[("blueprint_id", id.clone()), ("strategy", self.config.strategy.name().to_string())],
        );
        let begun = Instant::now();
        let budget = self.config.budget(job.strategy);
        let artifact = compile::compile_within(job, budget, self.config.memory_budget_bytes)
            .map_err(|e| e.context(format!("{id} ({})", descriptor.name)))?;
        let record = ArtifactRecord {
            blueprint_id: descriptor.blueprint_id.clone(),
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
        };
        let record = self.store.put(record, &artifact.bytes)?;
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

        let strategy = self.config.strategy.name();
        let mut metrics = self.counters.metrics();
        metrics.push(telemetry::metric("tezzeret.compilation.duration_ms", record.compile_ms, "ms", &[("strategy", strategy)]));
        metrics.push(telemetry::metric(
            "tezzeret.prewarm.ms",
            record.prewarm_p50_ms,
            "ms",
            &[("strategy", strategy), ("quantile", "p50")],
        ));
        metrics.push(telemetry::metric(
            "tezzeret.prewarm.ms",
            record.prewarm_p95_ms,
            "ms",
            &[("strategy", strategy), ("quantile", "p95")],
        ));
        let id = record.blueprint_id.clone();
        let finished = vec![
            started,
            telemetry::event(events::PREWARM_COMPLETED, TelemetryLevel::Info, &[("blueprint_id", id.clone())]),
            telemetry::event(
                events::COMPILE_SUCCEEDED,
                TelemetryLevel::Info,
                &[("blueprint_id", id.clone()), ("job_ms", format!("{:.3}", begun.elapsed().as_secs_f64() * 1e3))],
            ),
        ];
        self.emit_telemetry(metrics, finished);
        self.host.log(LogLevel::Debug, &format!("{id} compiled in {:.1} ms", record.compile_ms));
        Ok((JobStatus::Ok, record))
    }

    fn emit_telemetry(&mut self, metrics: Vec<leyline::MetricPoint>, events: Vec<leyline::TelemetryEvent>) {
        let packet = telemetry::packet(metrics, events, false);
        self.host.telemetry(&leyline::encode(&packet));
    }
}
