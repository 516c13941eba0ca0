//! The host interface: what the forge asks of the process that embeds it
//! (descriptors) and tells it (catalog updates, telemetry, log lines).
use crate::base::error::Result;
use crate::build::catalog::Catalog;

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

/// What the forge needs from its host. Every method has a do-nothing
/// default, and `enumerate` defaults to the embedded catalog.
pub trait Host: Send {
    /// The host's descriptors; `None` means "use the embedded default catalog".
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(None)
    }
    /// Receives `KernelCatalogUpdate` bytes after an artifact is durable;
    /// in a fleet, once more for an artifact first announced with its local
    /// path, when the bucket holds it (same checksum, its `s3://` reference).
    /// Told in this process only (the bus's outbox is what outlives a
    /// crash): a host restarted after one asks what is current (a prefetch,
    /// or its guard table).
    fn catalog_update(&mut self, _bytes: &[u8]) {}
    /// Receives `TelemetryPacket` bytes.
    fn telemetry(&mut self, _bytes: &[u8]) {}
    /// Receives a log line.
    fn log(&mut self, _level: LogLevel, _message: &str) {}
}

/// A host that uses the default catalog and ignores what the forge reports.
pub struct DefaultHost;
impl Host for DefaultHost {}

