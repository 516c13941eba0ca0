//! Observation: the counters a forge keeps, and the metrics, health
//! snapshot and telemetry packets made from them.
use std::collections::BTreeMap;

use super::governor::Governor;
use super::telemetry::{self, JobCounters};
use crate::base::leyline::{self, HealthStatus, MetricPoint, SystemHealth};
use crate::build::compile::Strategy;
use crate::state::wal::journal::JournalState;
use crate::state::wal::log::Wal;
use crate::sys::resources;

/// Cache metrics: hits, misses, evictions, bytes.
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


/// What a forge counts since it was opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observer {
    /// Job counters (`tezzeret.jobs.*`).
    pub counters: JobCounters,
    /// Cache counters (`tezzeret.cache.*`).
    pub cache: CacheStats,
}

/// What the forge is doing now, for the health snapshot.
pub struct Situation<'a> {
    /// The replayed journal.
    pub state: &'a JournalState,
    /// The log (poisoned or not, its size).
    pub wal: &'a Wal,
    /// Concurrent jobs allowed now.
    pub concurrency: u32,
    /// Strategy jobs get now.
    pub strategy: Strategy,
}

impl Observer {
    /// Every metric, now: jobs, cache, breakers, mode, queue, WAL, GPU, memory.
    pub fn metrics(&self, governor: &mut Governor, state: &JournalState) -> Vec<MetricPoint> {
        let mut m = self.counters.metrics();
        m.extend(self.cache.metrics());
        for (kind, breaker) in governor.states() {
            m.push(telemetry::metric("tezzeret.breaker.state", breaker.metric(), "state", &[("breaker", kind.name())]));
        }
        m.push(telemetry::metric("tezzeret.breaker.open_total", governor.opened_total() as f64, "count", &[]));
        m.push(telemetry::metric("tezzeret.mode.conservative", f64::from(u8::from(governor.conservative())), "flag", &[]));
        m.push(telemetry::metric("tezzeret.queue.depth", state.pending.len() as f64, "count", &[]));
        m.push(telemetry::metric("tezzeret.wal.transactions_total", state.transactions_since_checkpoint as f64, "count", &[]));
        if let Some(u) = governor.last_reading().gpu_utilisation_percent {
            m.push(telemetry::metric("tezzeret.gpu.utilisation_percent", u, "percent", &[]));
        }
        if let Some(rss) = resources::process_rss_bytes() {
            m.push(telemetry::metric("tezzeret.memory.rss_bytes", rss as f64, "bytes", &[]));
        }
        m
    }

    /// A Leyline `SystemHealth` snapshot: HEALTHY, DEGRADED in conservative
    /// mode, UNHEALTHY while the WAL is poisoned.
    pub fn health(&self, governor: &mut Governor, now: Situation<'_>) -> SystemHealth {
        let status = if now.wal.is_poisoned() {
            HealthStatus::Unhealthy
        } else if governor.conservative() {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        let mut indicators = BTreeMap::new();
        indicators.insert("concurrency".to_string(), now.concurrency.to_string());
        indicators.insert("queue_depth".to_string(), now.state.pending.len().to_string());
        indicators.insert("conservative".to_string(), governor.conservative().to_string());
        indicators.insert("strategy".to_string(), now.strategy.name().to_string());
        indicators.insert("wal_bytes".to_string(), now.wal.len().to_string());
        indicators.insert("wal_transactions_since_checkpoint".to_string(), now.state.transactions_since_checkpoint.to_string());
        indicators.insert("artifacts".to_string(), now.state.artifacts.len().to_string());
        for (kind, breaker) in governor.states() {
            indicators.insert(format!("breaker.{}", kind.name()), format!("{:?}", breaker.leyline()).to_lowercase());
        }
        let summary = match status {
            HealthStatus::Unhealthy => "WAL poisoned by a sync failure; reopen the forge",
            HealthStatus::Degraded => "conservative mode: a circuit breaker is open or half-open",
            _ => "healthy",
        };
        SystemHealth { status: status as i32, summary: summary.to_string(), indicators }
    }
}
