//! Telemetry: events and metrics as Leyline `TelemetryPacket`s.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::base::leyline::{MetricPoint, TelemetryEvent, TelemetryLevel, TelemetryPacket, Timestamp};

/// Name of the subsystem in every packet.
pub const SOURCE_SUBSYSTEM: &str = "tezzeret";

/// Event names (TelemetryEvent.description).
pub mod events {
    /// A compile job started.
    pub const COMPILE_STARTED: &str = "tezzeret.compile_started";
    /// A compile job produced a durable artifact.
    pub const COMPILE_SUCCEEDED: &str = "tezzeret.compile_succeeded";
    /// A compile job failed (attribute `reason`).
    pub const COMPILE_FAILED: &str = "tezzeret.compile_failed";
    /// Pre-warm of an artifact finished.
    pub const PREWARM_COMPLETED: &str = "tezzeret.prewarm_completed";
    /// A circuit breaker opened.
    pub const BREAKER_OPEN: &str = "tezzeret.breaker_open";
    /// Conservative mode was entered.
    pub const CONSERVATIVE_MODE_ENABLED: &str = "tezzeret.conservative_mode_enabled";
    /// Conservative mode was left.
    pub const CONSERVATIVE_MODE_DISABLED: &str = "tezzeret.conservative_mode_disabled";
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique id: pid, wall time and a counter.
fn unique_id(prefix: &str) -> String {
    let ts = Timestamp::now();
    format!(
        "{prefix}-{:x}-{:x}{:08x}-{:x}",
        std::process::id(),
        ts.seconds,
        ts.nanos,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Builds an event.
pub fn event(name: &str, level: TelemetryLevel, attributes: &[(&str, String)]) -> TelemetryEvent {
    TelemetryEvent {
        event_id: unique_id("evt"),
        description: name.to_string(),
        level: level as i32,
        attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

/// Builds a metric sample.
pub fn metric(name: &str, value: f64, unit: &str, attributes: &[(&str, &str)]) -> MetricPoint {
    MetricPoint::new(name, value, unit, attributes)
}

/// Builds a packet. Its level is ERROR if any event is an error, WARNING
/// while degraded (a breaker open or conservative mode), else INFO.
pub fn packet(metrics: Vec<MetricPoint>, events: Vec<TelemetryEvent>, degraded: bool) -> TelemetryPacket {
    let has_error = events.iter().any(|e| e.level >= TelemetryLevel::Error as i32);
    let level = if has_error {
        TelemetryLevel::Error
    } else if degraded {
        TelemetryLevel::Warning
    } else {
        TelemetryLevel::Info
    };
    TelemetryPacket {
        packet_id: unique_id("pkt"),
        timestamp: Some(Timestamp::now()),
        source_subsystem: SOURCE_SUBSYSTEM.to_string(),
        level: level as i32,
        metrics,
        events,
        spans: Vec::new(),
        system_health: None,
    }
}

/// Job counters of a forge (`tezzeret.jobs.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounters {
    /// Jobs considered.
    pub total: u64,
    /// Jobs that started compiling.
    pub started: u64,
    /// Jobs that produced an artifact.
    pub completed: u64,
    /// Jobs that failed.
    pub failed: u64,
    /// Jobs retried.
    pub retried: u64,
    /// Jobs abandoned over their time or memory budget (also failed).
    pub abandoned: u64,
    /// Queued jobs that expired unrun (descriptor removed or changed).
    pub expired: u64,
    /// Wall time spent compiling, validating and pre-warming on workers, µs
    /// (with the forge's wall time, it shows what the forge adds).
    pub compile_us_total: u64,
}

impl JobCounters {
    /// The counters as metric points.
    pub fn metrics(&self) -> Vec<MetricPoint> {
        [
            ("tezzeret.jobs.total", self.total),
            ("tezzeret.jobs.started", self.started),
            ("tezzeret.jobs.completed", self.completed),
            ("tezzeret.jobs.failed", self.failed),
            ("tezzeret.jobs.retried", self.retried),
            ("tezzeret.jobs.abandoned", self.abandoned),
            ("tezzeret.jobs.expired", self.expired),
        ]
        .into_iter()
        .map(|(name, v)| metric(name, v as f64, "count", &[]))
        .chain([metric("tezzeret.jobs.compile_ms_total", self.compile_us_total as f64 / 1e3, "ms", &[])])
        .collect()
    }
}

/// Metrics counted in units (`count`) that are levels, going down as well
/// as up: every other `count` metric only grows while the forge is open.
const LEVELS: &[&str] = &["tezzeret.queue.depth", "tezzeret.bus.outbox_depth", "tezzeret.fleet.unshared", "tezzeret.wal.transactions_total"];

/// Whether a metric is a running total (a Prometheus counter, starting at
/// 0 when the forge opens) rather than a level or a reading (a gauge).
fn is_running_total(metric: &MetricPoint) -> bool {
    (metric.unit == "count" && !LEVELS.contains(&metric.name.as_str())) || metric.name == "tezzeret.jobs.compile_ms_total"
}

/// Metrics in Prometheus text exposition format: names with `.` turned into
/// `_`, one `# TYPE` line per name (counter for running totals, else
/// gauge), labels kept and escaped.
pub fn prometheus(metrics: &[MetricPoint]) -> String {
    let mut out = String::new();
    let mut typed = std::collections::BTreeSet::new();
    for m in metrics {
        let name: String = m.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        if typed.insert(name.clone()) {
            let kind = if is_running_total(m) { "counter" } else { "gauge" };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        }
        out.push_str(&name);
        if !m.attributes.is_empty() {
            let labels: Vec<String> = m
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
                .collect();
            out.push_str(&format!("{{{}}}", labels.join(",")));
        }
        out.push_str(&format!(" {}\n", m.value));
    }
    out
}
