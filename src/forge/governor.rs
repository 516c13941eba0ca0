//! The governor: the circuit breakers and conservative mode. It is fed job
//! outcomes and resource readings and answers with the mode changes they
//! caused; telling the host about them is the forge's business.
use std::time::{Duration, Instant};

use super::breakers::{BreakerKind, BreakerState, Breakers};
use super::config::ForgeConfig;
use crate::base::error::FailureReason;
use crate::build::compile::Strategy;

/// GPU utilisation limit in conservative mode, percent.
pub const CONSERVATIVE_GPU_LIMIT_PERCENT: f64 = 15.0;
/// Budgets are multiplied by this in conservative mode.
pub const CONSERVATIVE_BUDGET_FACTOR: f64 = 1.5;

/// Resource readings, taken by the forge or reported by its host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceReading {
    /// GPU utilisation percent (None: no GPU / unavailable).
    pub gpu_utilisation_percent: Option<f64>,
    /// Process resident memory in bytes (None: unknown).
    pub rss_bytes: Option<u64>,
}

/// A change of mode the host should hear about at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeChange {
    /// A breaker opened.
    BreakerOpened(BreakerKind),
    /// Conservative mode was entered.
    ConservativeEntered,
    /// Conservative mode was left.
    ConservativeLeft,
}

/// Breakers, conservative mode and the readings that feed them.
#[derive(Debug)]
pub struct Governor {
    breakers: Breakers,
    conservative: bool,
    reported_open: Vec<BreakerKind>,
    gpu_limit_percent: f64,
    gpu_window: Duration,
    rss_budget_bytes: Option<u64>,
    gpu_high_since: Option<Instant>,
    last_reading: ResourceReading,
}

impl Governor {
    /// A governor with the configuration's thresholds, every breaker closed.
    pub fn new(config: &ForgeConfig) -> Self {
        Governor {
            breakers: Breakers::new(config.breakers),
            conservative: false,
            reported_open: Vec::new(),
            gpu_limit_percent: config.gpu_limit_percent,
            gpu_window: config.gpu_window,
            rss_budget_bytes: config.rss_budget_bytes,
            gpu_high_since: None,
            last_reading: ResourceReading::default(),
        }
    }

    /// Whether conservative mode is on.
    pub fn conservative(&self) -> bool {
        self.conservative
    }

    /// The strategy jobs get now: one level lower in conservative mode.
    pub fn strategy(&self, configured: Strategy) -> Strategy {
        if self.conservative {
            configured.reduced()
        } else {
            configured
        }
    }

    /// A budget now: ×1.5 in conservative mode.
    pub fn budget(&self, configured: Duration) -> Duration {
        if self.conservative {
            configured.mul_f64(CONSERVATIVE_BUDGET_FACTOR)
        } else {
            configured
        }
    }

    /// Concurrent jobs now: 1 in conservative mode.
    pub fn concurrency(&self, configured: u32) -> u32 {
        if self.conservative {
            1
        } else {
            configured
        }
    }

    /// The GPU utilisation limit now.
    pub fn gpu_limit_percent(&self) -> f64 {
        if self.conservative {
            CONSERVATIVE_GPU_LIMIT_PERCENT
        } else {
            self.gpu_limit_percent
        }
    }

    /// A job produced an artifact: a success for the timeout and memory breakers.
    pub fn job_succeeded(&mut self) -> Vec<ModeChange> {
        let now = Instant::now();
        self.breakers.get(BreakerKind::Timeout).success(now);
        self.breakers.get(BreakerKind::Memory).success(now);
        self.update(now)
    }

    /// A job failed: a budget overrun feeds its breaker; other failures
    /// say nothing about resources.
    pub fn job_failed(&mut self, reason: Option<FailureReason>) -> Vec<ModeChange> {
        let now = Instant::now();
        match reason {
            Some(FailureReason::BudgetExceeded) => {
                self.breakers.get(BreakerKind::Timeout).failure(now);
            }
            Some(FailureReason::MemoryBudgetExceeded) => {
                self.breakers.get(BreakerKind::Memory).failure(now);
            }
            _ => {}
        }
        self.update(now)
    }

    /// Applies resource readings: GPU utilisation above the limit for the
    /// whole window counts a gpu-breaker failure (one per window); RSS above
    /// its budget a memory-breaker failure.
    pub fn report_resources(&mut self, reading: ResourceReading) -> Vec<ModeChange> {
        let now = Instant::now();
        let limit = self.gpu_limit_percent();
        match reading.gpu_utilisation_percent {
            Some(u) if u > limit => {
                let since = *self.gpu_high_since.get_or_insert(now);
                if now.duration_since(since) >= self.gpu_window {
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
        if let (Some(rss), Some(budget)) = (reading.rss_bytes, self.rss_budget_bytes) {
            if rss > budget {
                self.breakers.get(BreakerKind::Memory).failure(now);
            }
        }
        self.last_reading = reading;
        self.update(now)
    }

    /// The last reading applied.
    pub fn last_reading(&self) -> ResourceReading {
        self.last_reading
    }

    /// Every breaker's state now.
    pub fn states(&mut self) -> Vec<(BreakerKind, BreakerState)> {
        self.breakers.states(Instant::now())
    }

    /// Times any breaker opened.
    pub fn opened_total(&self) -> u64 {
        self.breakers.opened_total()
    }

    /// Re-derives conservative mode (a breaker may have turned half-open
    /// with time) and returns what changed since the last call.
    pub fn refresh(&mut self) -> Vec<ModeChange> {
        self.update(Instant::now())
    }

    fn update(&mut self, now: Instant) -> Vec<ModeChange> {
        let mut changes = Vec::new();
        let opened_before = std::mem::take(&mut self.reported_open);
        for (kind, state) in self.breakers.states(now) {
            if matches!(state, BreakerState::Open(_)) {
                self.reported_open.push(kind);
                if !opened_before.contains(&kind) {
                    changes.push(ModeChange::BreakerOpened(kind));
                }
            }
        }
        let was = self.conservative;
        self.conservative = self.breakers.conservative(now);
        match (was, self.conservative) {
            (false, true) => changes.push(ModeChange::ConservativeEntered),
            (true, false) => changes.push(ModeChange::ConservativeLeft),
            _ => {}
        }
        changes
    }
}
