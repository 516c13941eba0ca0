//! Leyline: the `esper.leyline.v1` protobuf contracts Tezzeret speaks.
//!
//! Hand-written prost messages, wire-compatible with
//! `proto/esper/leyline/v1/leyline.proto` (the subset Tezzeret exchanges).
//! Maps use `BTreeMap` so encodings are deterministic.
use std::collections::BTreeMap;

use prost::Message;

use crate::base::error::{Error, Result};

/// Risk tier of a blueprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum BlueprintTier {
    /// BLUEPRINT_TIER_UNSPECIFIED
    Unspecified = 0,
    /// BLUEPRINT_TIER_SAFE
    Safe = 1,
    /// BLUEPRINT_TIER_EXPERIMENTAL
    Experimental = 2,
    /// BLUEPRINT_TIER_HIGH_RISK
    HighRisk = 3,
}

/// Severity of a telemetry packet or event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TelemetryLevel {
    /// TELEMETRY_LEVEL_UNSPECIFIED
    Unspecified = 0,
    /// TELEMETRY_LEVEL_INFO
    Info = 1,
    /// TELEMETRY_LEVEL_WARNING
    Warning = 2,
    /// TELEMETRY_LEVEL_ERROR
    Error = 3,
    /// TELEMETRY_LEVEL_CRITICAL
    Critical = 4,
}

/// Overall health of a subsystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum HealthStatus {
    /// HEALTH_STATUS_UNSPECIFIED
    Unspecified = 0,
    /// HEALTH_STATUS_HEALTHY
    Healthy = 1,
    /// HEALTH_STATUS_DEGRADED
    Degraded = 2,
    /// HEALTH_STATUS_UNHEALTHY
    Unhealthy = 3,
    /// HEALTH_STATUS_CRITICAL
    Critical = 4,
}

/// Wire names of circuit-breaker states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CircuitBreakerState {
    /// CIRCUIT_BREAKER_STATE_UNKNOWN
    Unknown = 0,
    /// CIRCUIT_BREAKER_STATE_CLOSED
    Closed = 1,
    /// CIRCUIT_BREAKER_STATE_OPEN
    Open = 2,
    /// CIRCUIT_BREAKER_STATE_HALF_OPEN
    HalfOpen = 3,
}

/// Priority of a message or job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessagePriority {
    /// MESSAGE_PRIORITY_UNSPECIFIED
    Unspecified = 0,
    /// MESSAGE_PRIORITY_LOW
    Low = 1,
    /// MESSAGE_PRIORITY_NORMAL
    Normal = 2,
    /// MESSAGE_PRIORITY_HIGH
    High = 3,
    /// MESSAGE_PRIORITY_CRITICAL
    Critical = 4,
}

/// Type tag of a bus envelope's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum BusMessageType {
    /// BUS_MESSAGE_TYPE_UNSPECIFIED
    Unspecified = 0,
    /// BUS_MESSAGE_TYPE_TELEMETRY
    Telemetry = 4,
    /// BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST
    KernelPrefetchRequest = 6,
    /// BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
    KernelPrefetchReady = 7,
    /// BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR
    KernelPrefetchError = 8,
    /// BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE
    KernelCatalogUpdate = 9,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 }
    }
}

/// Inclusive bounds of one blueprint parameter.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct BlueprintParameterBounds {
    /// Lower bound.
    #[prost(double, tag = "1")]
    pub min_value: f64,
    /// Upper bound.
    #[prost(double, tag = "2")]
    pub max_value: f64,
}

/// A blueprint descriptor as Karn publishes it.
#[derive(Clone, PartialEq, Message)]
pub struct BlueprintDescriptor {
    /// Unique id, e.g. `BP001`.
    #[prost(string, tag = "1")]
    pub blueprint_id: String,
    /// Name saying what to build, e.g. `squeeze_excitation`.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Risk tier.
    #[prost(enumeration = "BlueprintTier", tag = "3")]
    pub tier: i32,
    /// Parameters the blueprint accepts, with their bounds.
    #[prost(btree_map = "string, message", tag = "4")]
    pub allowed_parameters: BTreeMap<String, BlueprintParameterBounds>,
    /// Risk score in [0, 1].
    #[prost(float, tag = "5")]
    pub risk: f32,
    /// Curriculum stage.
    #[prost(uint32, tag = "6")]
    pub stage: u32,
    /// Only compiled when quarantine compilation is enabled.
    #[prost(bool, tag = "7")]
    pub quarantine_only: bool,
    /// Needs an approval before use.
    #[prost(bool, tag = "8")]
    pub approval_required: bool,
    /// Human description.
    #[prost(string, tag = "9")]
    pub description: String,
}

/// A request to make a kernel ready for a training run.
#[derive(Clone, PartialEq, Message)]
pub struct KernelPrefetchRequest {
    /// Correlates the answer.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// Which blueprint's kernel.
    #[prost(string, tag = "2")]
    pub blueprint_id: String,
    /// The training run asking.
    #[prost(string, tag = "3")]
    pub training_run_id: String,
    /// When it was issued.
    #[prost(message, optional, tag = "4")]
    pub issued_at: Option<Timestamp>,
}

/// A positive prefetch answer.
#[derive(Clone, PartialEq, Message)]
pub struct KernelArtifactReady {
    /// Echo of the request id.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// The blueprint.
    #[prost(string, tag = "2")]
    pub blueprint_id: String,
    /// Reference (path) to the artifact.
    #[prost(string, tag = "3")]
    pub artifact_ref: String,
    /// sha256 hex of the artifact file.
    #[prost(string, tag = "4")]
    pub checksum: String,
    /// Guard digest.
    #[prost(string, tag = "5")]
    pub guard_digest: String,
    /// Pre-warm median latency.
    #[prost(float, tag = "6")]
    pub prewarm_p50_ms: f32,
    /// Pre-warm 95th percentile latency.
    #[prost(float, tag = "7")]
    pub prewarm_p95_ms: f32,
}

/// A negative prefetch answer.
#[derive(Clone, PartialEq, Message)]
pub struct KernelArtifactError {
    /// Echo of the request id.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// The blueprint.
    #[prost(string, tag = "2")]
    pub blueprint_id: String,
    /// Why (`missing_artifact`, `artifact_not_found`, `checksum_mismatch`, `signature_invalid`).
    #[prost(string, tag = "3")]
    pub reason: String,
}

/// Announces a durably stored artifact.
#[derive(Clone, PartialEq, Message)]
pub struct KernelCatalogUpdate {
    /// The blueprint.
    #[prost(string, tag = "1")]
    pub blueprint_id: String,
    /// Reference (path) to the artifact.
    #[prost(string, tag = "2")]
    pub artifact_ref: String,
    /// sha256 hex of the artifact file.
    #[prost(string, tag = "3")]
    pub checksum: String,
    /// Guard digest.
    #[prost(string, tag = "4")]
    pub guard_digest: String,
    /// Compile wall time.
    #[prost(float, tag = "5")]
    pub compile_ms: f32,
    /// Pre-warm median latency.
    #[prost(float, tag = "6")]
    pub prewarm_ms: f32,
}

/// One metric sample.
#[derive(Clone, PartialEq, Message)]
pub struct MetricPoint {
    /// Metric name, e.g. `tezzeret.jobs.completed`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Value.
    #[prost(double, tag = "2")]
    pub value: f64,
    /// Unit, e.g. `ms`.
    #[prost(string, tag = "3")]
    pub unit: String,
    /// Labels.
    #[prost(btree_map = "string, string", tag = "4")]
    pub attributes: BTreeMap<String, String>,
}

impl MetricPoint {
    /// A sample with labels.
    pub fn new(name: &str, value: f64, unit: &str, attributes: &[(&str, &str)]) -> Self {
        MetricPoint {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
            attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }
}

/// One event.
#[derive(Clone, PartialEq, Message)]
pub struct TelemetryEvent {
    /// Unique id.
    #[prost(string, tag = "1")]
    pub event_id: String,
    /// Event name, e.g. `tezzeret.compile_failed`.
    #[prost(string, tag = "2")]
    pub description: String,
    /// Severity.
    #[prost(enumeration = "TelemetryLevel", tag = "3")]
    pub level: i32,
    /// Attributes, e.g. `reason`.
    #[prost(btree_map = "string, string", tag = "4")]
    pub attributes: BTreeMap<String, String>,
}

/// A trace span (carried for compatibility; Tezzeret does not emit spans yet).
#[derive(Clone, PartialEq, Message)]
pub struct TraceSpan {
    /// Span id.
    #[prost(string, tag = "1")]
    pub span_id: String,
    /// Parent span id.
    #[prost(string, tag = "2")]
    pub parent_span_id: String,
    /// Operation name.
    #[prost(string, tag = "3")]
    pub name: String,
}

/// A health snapshot.
#[derive(Clone, PartialEq, Message)]
pub struct SystemHealth {
    /// Overall status.
    #[prost(enumeration = "HealthStatus", tag = "1")]
    pub status: i32,
    /// One-line summary.
    #[prost(string, tag = "2")]
    pub summary: String,
    /// Named indicators (queue depth, concurrency, ...).
    #[prost(btree_map = "string, string", tag = "3")]
    pub indicators: BTreeMap<String, String>,
}

/// A telemetry packet for Oona/Nissa.
#[derive(Clone, PartialEq, Message)]
pub struct TelemetryPacket {
    /// Unique id.
    #[prost(string, tag = "1")]
    pub packet_id: String,
    /// When it was built.
    #[prost(message, optional, tag = "2")]
    pub timestamp: Option<Timestamp>,
    /// Always `tezzeret` for ours.
    #[prost(string, tag = "3")]
    pub source_subsystem: String,
    /// Packet severity.
    #[prost(enumeration = "TelemetryLevel", tag = "4")]
    pub level: i32,
    /// Metrics.
    #[prost(message, repeated, tag = "10")]
    pub metrics: Vec<MetricPoint>,
    /// Events.
    #[prost(message, repeated, tag = "20")]
    pub events: Vec<TelemetryEvent>,
    /// Spans.
    #[prost(message, repeated, tag = "30")]
    pub spans: Vec<TraceSpan>,
    /// Health snapshot.
    #[prost(message, optional, tag = "40")]
    pub system_health: Option<SystemHealth>,
}

/// A message on the Oona bus.
#[derive(Clone, PartialEq, Message)]
pub struct BusEnvelope {
    /// Payload type.
    #[prost(enumeration = "BusMessageType", tag = "1")]
    pub message_type: i32,
    /// Encoded payload.
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    /// Routing attributes.
    #[prost(btree_map = "string, string", tag = "3")]
    pub attributes: BTreeMap<String, String>,
}

/// The answer to a prefetch request: one of two Leyline messages.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefetchAnswer {
    /// The kernel is ready.
    Ready(KernelArtifactReady),
    /// It is not (reason: `missing_artifact`, `artifact_not_found`,
    /// `checksum_mismatch`, `signature_invalid`).
    Error(KernelArtifactError),
}

/// Decodes a Leyline message, turning prost's error (which names the message
/// and field path) into a [`Error`] that also names the expected type.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|err| {
        let type_name = std::any::type_name::<M>().rsplit("::").next().unwrap_or("message");
        Error::malformed(format!("malformed esper.leyline.v1.{type_name} bytes: {err}"))
    })
}

/// Encodes a Leyline message into a fresh buffer.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}
