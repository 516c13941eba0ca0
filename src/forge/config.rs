//! How a forge is configured: state directory, strategy, device, budgets,
//! cache limits, keys and breaker thresholds, with the design's defaults.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tch::Device;

use super::breakers::{BreakerConfig, BreakerKind};
use crate::bus::BusConfig;
use crate::fleet::FleetConfig;
use crate::base::error::{Error, ErrorCode, Result};
use crate::build::blueprints::{ParameterOverrides, DEFAULT_BATCH};
use crate::build::compile::Strategy;
use crate::state::signing::KeyRing;

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

    /// The libtorch device this preference means on this machine.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
            Self::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Self::Cuda => Err(Error::new(ErrorCode::Unsupported, "device cuda requested but libtorch sees no CUDA device")),
        }
    }
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
    /// compiled yet (default true). Off, jobs are only queued by
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
    /// Signing key and trusted public keys; empty = unsigned, unverified.
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
    /// Journal transactions after which the WAL is checkpointed (rewritten
    /// as one snapshot); the default keeps it bounded while jobs flow.
    pub checkpoint_every: u64,
    /// Slots of a new guard table; it grows (doubling) as blueprints come.
    pub guard_slots: u32,
    /// The Oona bus to answer prefetch requests on and publish catalog
    /// updates and telemetry to; `None` (default): the host only.
    pub bus: Option<BusConfig>,
    /// The fleet's shared bucket to fetch artifacts from and publish them
    /// to; `None` (default): this host compiles everything itself. The
    /// forge drives its own tokio runtime for it: do not call a fleet
    /// member's forge from inside a tokio runtime's worker thread.
    pub fleet: Option<FleetConfig>,
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
            checkpoint_every: crate::state::wal::journal::CHECKPOINT_TRANSACTIONS,
            guard_slots: crate::state::guard_table::DEFAULT_SLOTS,
            bus: None,
            fleet: None,
        }
    }

    /// The time budget of a strategy.
    pub fn budget(&self, strategy: Strategy) -> Duration {
        self.budgets[strategy as usize]
    }
}

/// Default per-job memory budget: 1 GiB of process-memory growth.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 1 << 30;
