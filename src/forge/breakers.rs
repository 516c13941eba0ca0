//! Circuit breakers and conservative mode.
//!
//! Three breakers — `timeout`, `memory`, `gpu` — each closed → open after a
//! threshold of consecutive failures → half-open after its reset delay →
//! closed after 3 successes, or open again on any half-open failure. While
//! any breaker is not closed the forge runs in conservative mode:
//! concurrency 1, GPU limit 15 %, budgets ×1.5, strategy one level lower,
//! Aggressive off.
use std::time::{Duration, Instant};

use crate::base::leyline::CircuitBreakerState;

/// Which breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BreakerKind {
    /// Jobs over their time budget.
    Timeout,
    /// Jobs over their memory budget, or host memory over budget.
    Memory,
    /// Sustained GPU utilisation above the limit.
    Gpu,
}

impl BreakerKind {
    /// All breakers.
    pub const ALL: [BreakerKind; 3] = [BreakerKind::Timeout, BreakerKind::Memory, BreakerKind::Gpu];

    /// Lowercase name (metric label).
    pub fn name(self) -> &'static str {
        match self {
            BreakerKind::Timeout => "timeout",
            BreakerKind::Memory => "memory",
            BreakerKind::Gpu => "gpu",
        }
    }
}

/// Thresholds of one breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open it.
    pub failure_threshold: u32,
    /// Time open before it turns half-open.
    pub reset_after: Duration,
    /// Half-open successes that close it.
    pub successes_to_close: u32,
}

impl BreakerConfig {
    /// The design's thresholds: memory 3 / 30 s, gpu 5 / 60 s, timeout 2 / 300 s.
    pub fn default_for(kind: BreakerKind) -> Self {
        let (failure_threshold, secs) = match kind {
            BreakerKind::Memory => (3, 30),
            BreakerKind::Gpu => (5, 60),
            BreakerKind::Timeout => (2, 300),
        };
        BreakerConfig { failure_threshold, reset_after: Duration::from_secs(secs), successes_to_close: 3 }
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Normal operation.
    Closed,
    /// Tripped at the instant given.
    Open(Instant),
    /// Probing: successes counted so far.
    HalfOpen(u32),
}

impl BreakerState {
    /// `tezzeret.breaker.state` value: 0 closed, 1 half-open, 2 open.
    pub fn metric(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen(_) => 1.0,
            BreakerState::Open(_) => 2.0,
        }
    }

    /// The Leyline wire value.
    pub fn leyline(self) -> CircuitBreakerState {
        match self {
            BreakerState::Closed => CircuitBreakerState::Closed,
            BreakerState::HalfOpen(_) => CircuitBreakerState::HalfOpen,
            BreakerState::Open(_) => CircuitBreakerState::Open,
        }
    }
}

/// One circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    /// Which one.
    pub kind: BreakerKind,
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    opened_total: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(kind: BreakerKind, config: BreakerConfig) -> Self {
        Breaker { kind, config, state: BreakerState::Closed, consecutive_failures: 0, opened_total: 0 }
    }

    /// Current state (after applying the reset delay at `now`).
    pub fn state(&mut self, now: Instant) -> BreakerState {
        if let BreakerState::Open(since) = self.state {
            if now.duration_since(since) >= self.config.reset_after {
                self.state = BreakerState::HalfOpen(0);
            }
        }
        self.state
    }

    /// Times it opened.
    pub fn opened_total(&self) -> u64 {
        self.opened_total
    }

    /// Records a failure; returns true if this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.config.failure_threshold {
                    self.open(now);
                    return true;
                }
                false
            }
            BreakerState::HalfOpen(_) => {
                self.open(now);
                true
            }
            BreakerState::Open(_) => false,
        }
    }

    /// Records a success.
    pub fn success(&mut self, now: Instant) {
        match self.state(now) {
            BreakerState::Closed => self.consecutive_failures = 0,
            BreakerState::HalfOpen(n) if n + 1 >= self.config.successes_to_close => {
                self.state = BreakerState::Closed;
                self.consecutive_failures = 0;
            }
            BreakerState::HalfOpen(n) => self.state = BreakerState::HalfOpen(n + 1),
            BreakerState::Open(_) => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open(now);
        self.consecutive_failures = 0;
        self.opened_total += 1;
    }
}

/// The three breakers.
#[derive(Debug, Clone)]
pub struct Breakers {
    breakers: Vec<Breaker>,
}

impl Breakers {
    /// Breakers with the given configurations (indexed like [`BreakerKind::ALL`]).
    pub fn new(configs: [BreakerConfig; 3]) -> Self {
        Breakers { breakers: BreakerKind::ALL.iter().zip(configs).map(|(k, c)| Breaker::new(*k, c)).collect() }
    }

    /// One breaker.
    pub fn get(&mut self, kind: BreakerKind) -> &mut Breaker {
        &mut self.breakers[kind as usize]
    }

    /// Whether conservative mode applies: some breaker is not closed.
    pub fn conservative(&mut self, now: Instant) -> bool {
        self.breakers.iter_mut().any(|b| b.state(now) != BreakerState::Closed)
    }

    /// Every breaker's (name, state) at `now`.
    pub fn states(&mut self, now: Instant) -> Vec<(BreakerKind, BreakerState)> {
        self.breakers.iter_mut().map(|b| (b.kind, b.state(now))).collect()
    }

    /// Times any breaker opened.
    pub fn opened_total(&self) -> u64 {
        self.breakers.iter().map(Breaker::opened_total).sum()
    }
}

impl Default for Breakers {
    fn default() -> Self {
        Breakers::new(BreakerKind::ALL.map(BreakerConfig::default_for))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_open_half_open_closed_and_reopen() {
        let config = BreakerConfig { failure_threshold: 2, reset_after: Duration::from_secs(30), successes_to_close: 3 };
        let mut b = Breaker::new(BreakerKind::Timeout, config);
        let t0 = Instant::now();
        assert!(!b.failure(t0));
        b.success(t0); // a success resets the count
        assert!(!b.failure(t0));
        assert!(b.failure(t0), "the second consecutive failure opens it");
        assert_eq!(b.state(t0), BreakerState::Open(t0));
        assert_eq!(b.state(t0 + Duration::from_secs(29)).metric(), 2.0);
        assert_eq!(b.state(t0 + Duration::from_secs(30)), BreakerState::HalfOpen(0));
        let t1 = t0 + Duration::from_secs(31);
        b.success(t1);
        b.success(t1);
        assert!(b.failure(t1), "any half-open failure reopens");
        assert_eq!(b.opened_total(), 2);
        let t2 = t1 + Duration::from_secs(30);
        for _ in 0..3 {
            b.success(t2);
        }
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.state(t2).leyline(), CircuitBreakerState::Closed);
    }

    #[test]
    fn design_thresholds() {
        assert_eq!(BreakerConfig::default_for(BreakerKind::Memory).failure_threshold, 3);
        assert_eq!(BreakerConfig::default_for(BreakerKind::Gpu).reset_after, Duration::from_secs(60));
        assert_eq!(BreakerConfig::default_for(BreakerKind::Timeout).failure_threshold, 2);
    }
}
