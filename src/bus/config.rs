//! How a forge joins the bus: where Redis is, which streams and consumer
//! group it uses, the shared secret, and the time windows, with Esper's
//! defaults.
use std::time::Duration;

use crate::base::error::{Error, Result};
use crate::base::redact::redacted_url;

/// The streams a forge reads and writes (Esper's names by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    /// Prefetch requests (`KernelPrefetchRequest`).
    pub requests: String,
    /// Positive answers and catalog updates (`KernelArtifactReady`,
    /// `KernelCatalogUpdate`).
    pub ready: String,
    /// Negative answers (`KernelArtifactError`).
    pub errors: String,
    /// Telemetry packets of normal priority.
    pub telemetry: String,
    /// Telemetry packets of priority HIGH or CRITICAL.
    pub emergency: String,
    /// Request entries that kept failing, set aside with the reason.
    pub dead_letter: String,
}

impl Default for StreamNames {
    fn default() -> Self {
        StreamNames {
            requests: "oona.kernels.requests".into(),
            ready: "oona.kernels.ready".into(),
            errors: "oona.kernels.errors".into(),
            telemetry: "oona.telemetry".into(),
            emergency: "oona.emergency".into(),
            dead_letter: "oona.kernels.requests.dead_letter".into(),
        }
    }
}

/// The environment variable Esper keeps the bus's shared secret in.
pub const SECRET_VARIABLE: &str = "ESPER_LEYLINE_SECRET";

/// How a forge joins the bus.
#[derive(Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    pub redis_url: String,
    /// Stream names.
    pub streams: StreamNames,
    /// Consumer group that shares the prefetch requests among forges.
    pub group: String,
    /// This forge's name in the group (unique per process).
    pub consumer: String,
    /// Shared secret: entries are signed with HMAC-SHA256 and entries
    /// without a valid signature are dropped. `None`: unsigned.
    pub secret: Option<Vec<u8>>,
    /// Requests issued longer ago than this (or this far in the future)
    /// are dropped as stale.
    pub freshness: Duration,
    /// Entries older than this are trimmed from the streams written.
    pub message_ttl: Duration,
    /// Answer prefetch requests.
    pub serve_prefetch: bool,
    /// Publish catalog updates and telemetry.
    pub publish: bool,
    /// How long one read waits for requests (also the longest a close
    /// waits for the reader).
    pub block: Duration,
    /// Pending requests of a consumer idle this long are taken over.
    pub claim_idle: Duration,
    /// A request delivered this many times without being answered goes to
    /// the dead-letter stream.
    pub max_deliveries: u64,
    /// How many recent request ids are remembered to drop replays.
    pub replay_window: usize,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("streams", &self.streams)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("freshness", &self.freshness)
            .field("message_ttl", &self.message_ttl)
            .finish_non_exhaustive()
    }
}

impl BusConfig {
    /// Defaults for a Redis URL: Esper's stream names, group `tezzeret`, a
    /// consumer named after the host and process, no secret, 60 s
    /// freshness, 900 s message TTL, both prefetch and publishing on.
    pub fn new(redis_url: impl Into<String>) -> Self {
        BusConfig {
            redis_url: redis_url.into(),
            streams: StreamNames::default(),
            group: "tezzeret".into(),
            consumer: default_consumer(),
            secret: None,
            freshness: Duration::from_secs(60),
            message_ttl: Duration::from_secs(900),
            serve_prefetch: true,
            publish: true,
            block: Duration::from_millis(200),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            replay_window: 4096,
        }
    }

    /// Refuses configurations that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        let url = &self.redis_url;
        if url.starts_with("rediss://") {
            return Err(Error::invalid(format!(
                "bus redis_url {:?}: TLS (rediss://) is not built in; reach Redis by redis:// on a trusted network, \
                 by unix://, or through a TLS tunnel",
                redacted_url(url)
            )));
        }
        if !(url.starts_with("redis://") || url.starts_with("unix://")) {
            return Err(Error::invalid(format!("bus redis_url {:?} is not a redis:// or unix:// URL", redacted_url(url))));
        }
        redis::Client::open(url.as_str()).map_err(|e| Error::invalid(format!("bus redis_url {:?}: {e}", redacted_url(url))))?;
        let s = &self.streams;
        for (field, name) in [
            ("requests", &s.requests),
            ("ready", &s.ready),
            ("errors", &s.errors),
            ("telemetry", &s.telemetry),
            ("emergency", &s.emergency),
            ("dead_letter", &s.dead_letter),
            ("group", &self.group),
            ("consumer", &self.consumer),
        ] {
            if name.is_empty() {
                return Err(Error::invalid(format!("bus {field} name is empty")));
            }
        }
        if self.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(Error::invalid("bus secret is empty (leave it unset for unsigned entries)"));
        }
        if !self.serve_prefetch && !self.publish {
            return Err(Error::invalid("bus neither answers prefetch requests nor publishes: leave the bus unset instead"));
        }
        for (field, value, least) in [
            ("freshness", self.freshness, MIN_WINDOW),
            ("message TTL", self.message_ttl, MIN_WINDOW),
            ("claim idle time", self.claim_idle, MIN_WINDOW),
            ("block time", self.block, Duration::from_millis(1)),
        ] {
            if value < least || value > MAX_WINDOW {
                return Err(Error::invalid(format!("bus {field} {value:?} is outside {least:?}..={MAX_WINDOW:?}")));
            }
        }
        if self.max_deliveries == 0 || self.replay_window == 0 {
            return Err(Error::invalid("bus max deliveries and replay window must be > 0"));
        }
        Ok(())
    }
}

/// The shortest freshness window, message TTL and claim idle time: below
/// it, live consumers would lose their requests to one another.
const MIN_WINDOW: Duration = Duration::from_millis(10);
/// The longest of those (a year): Redis takes times in ms as 64-bit signed.
const MAX_WINDOW: Duration = Duration::from_secs(365 * 24 * 3600);

/// `tezzeret-<hostname>-<pid>`: unique among live processes of a fleet.
fn default_consumer() -> String {
    format!("tezzeret-{}-{}", crate::sys::host::hostname(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::BusConfig;

    #[test]
    fn redis_passwords_are_never_shown() {
        let config = BusConfig::new("redis://:hunter2@10.0.0.5:6379/0");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && shown.contains("redis://…@10.0.0.5:6379/0"), "{shown}");
        for url in ["http://:hunter2@10.0.0.5", "redis://:hunter2@10.0.0.5:notaport", "rediss://:hunter2@10.0.0.5"] {
            let error = BusConfig::new(url).validate().unwrap_err().to_string();
            assert!(!error.contains("hunter2") && error.contains("redis_url"), "{error}");
        }
    }

    #[test]
    fn a_tls_redis_is_refused_saying_so() {
        let error = BusConfig::new("rediss://cache.example:6380").validate().unwrap_err().to_string();
        assert!(error.contains("TLS (rediss://) is not built in"), "{error}");
        assert!(BusConfig::new("redis://cache.example:6379/0").validate().is_ok());
        assert!(BusConfig::new("unix:///run/redis.sock").validate().is_ok());
    }
}
