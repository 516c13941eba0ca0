//! `tezzeret_bus_config`: how a forge joins the Oona bus (Redis Streams).
use std::ffi::c_char;
use std::mem::{offset_of, size_of};
use std::time::Duration;

use super::args::{bytes_arg, init_sized, read_sized, str_arg};
use super::status::{ffi_status, tezzeret_status};
use crate::base::error::{Error, Result};
use crate::bus::BusConfig;

/// Bus flag: do not answer prefetch requests (publish only).
pub const TEZZERET_BUS_NO_PREFETCH: u32 = 1;
/// Bus flag: do not publish catalog updates and telemetry (answer only).
pub const TEZZERET_BUS_NO_PUBLISH: u32 = 2;
const KNOWN_BUS_FLAGS: u32 = TEZZERET_BUS_NO_PREFETCH | TEZZERET_BUS_NO_PUBLISH;

/// How a forge joins the bus. Initialise with `tezzeret_bus_config_init`,
/// set `redis_url` (required), and point `tezzeret_config.bus` at it. Every
/// string is borrowed for the `tezzeret_forge_open` call; NULL stream,
/// group and consumer names keep their defaults. While Redis is
/// unreachable the forge keeps compiling and serving its host; catalog
/// updates wait in its durable outbox and are published once it is back.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_bus_config {
    /// Size of this struct as the caller knows it (`sizeof(tezzeret_bus_config)`).
    pub struct_size: usize,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0` (UTF-8, required).
    pub redis_url: *const c_char,
    /// Prefetch requests stream; default `oona.kernels.requests`.
    pub requests_stream: *const c_char,
    /// Ready answers and catalog updates; default `oona.kernels.ready`.
    pub ready_stream: *const c_char,
    /// Error answers; default `oona.kernels.errors`.
    pub errors_stream: *const c_char,
    /// Telemetry packets; default `oona.telemetry`.
    pub telemetry_stream: *const c_char,
    /// Telemetry of priority HIGH or CRITICAL; default `oona.emergency`.
    pub emergency_stream: *const c_char,
    /// Requests that kept failing; default `oona.kernels.requests.dead_letter`.
    pub dead_letter_stream: *const c_char,
    /// Consumer group shared by the forges that answer requests; default `tezzeret`.
    pub group: *const c_char,
    /// This forge's consumer name; default `tezzeret-<hostname>-<pid>`.
    pub consumer: *const c_char,
    /// Shared secret entries are signed (HMAC-SHA256) and checked with;
    /// NULL (default) = unsigned. Copied.
    pub secret: *const u8,
    /// Bytes at `secret`.
    pub secret_len: usize,
    /// Requests issued longer ago than this are dropped as stale, ms; default 60000.
    pub freshness_ms: u64,
    /// Entries older than this are trimmed from the streams written, ms; default 900000.
    pub message_ttl_ms: u64,
    /// Pending requests of a consumer idle this long are taken over, ms; default 30000.
    pub claim_idle_ms: u64,
    /// Bitwise OR of `TEZZERET_BUS_*`; default 0 (answer and publish).
    pub flags: u32,
}

/// The oldest layout accepted: up to and including `redis_url`.
const MIN_BUS_CONFIG_SIZE: usize = offset_of!(tezzeret_bus_config, redis_url) + size_of::<*const c_char>();

impl tezzeret_bus_config {
    fn defaults() -> Self {
        let null = std::ptr::null();
        tezzeret_bus_config {
            struct_size: size_of::<tezzeret_bus_config>(),
            redis_url: null,
            requests_stream: null,
            ready_stream: null,
            errors_stream: null,
            telemetry_stream: null,
            emergency_stream: null,
            dead_letter_stream: null,
            group: null,
            consumer: null,
            secret: std::ptr::null(),
            secret_len: 0,
            freshness_ms: 60_000,
            message_ttl_ms: 900_000,
            claim_idle_ms: 30_000,
            flags: 0,
        }
    }

    /// Reads a caller's bus config (of any supported size).
    ///
    /// # Safety
    /// `ptr` is a readable bus config of at least its `struct_size` bytes
    /// whose non-NULL strings are NUL-terminated and `secret` has `secret_len` bytes.
    pub(crate) unsafe fn read(ptr: *const tezzeret_bus_config) -> Result<BusConfig> {
        // SAFETY: a readable config of its struct_size, by contract.
        let raw = unsafe { read_sized(ptr, Self::defaults(), MIN_BUS_CONFIG_SIZE, "config.bus") }?;
        // SAFETY: NULL or a NUL-terminated string valid for the call.
        let url = unsafe { str_arg(raw.redis_url, "config.bus.redis_url") }?;
        let mut config = BusConfig::new(url);
        let names = [
            (raw.requests_stream, "requests_stream", &mut config.streams.requests),
            (raw.ready_stream, "ready_stream", &mut config.streams.ready),
            (raw.errors_stream, "errors_stream", &mut config.streams.errors),
            (raw.telemetry_stream, "telemetry_stream", &mut config.streams.telemetry),
            (raw.emergency_stream, "emergency_stream", &mut config.streams.emergency),
            (raw.dead_letter_stream, "dead_letter_stream", &mut config.streams.dead_letter),
            (raw.group, "group", &mut config.group),
            (raw.consumer, "consumer", &mut config.consumer),
        ];
        for (ptr, field, target) in names {
            if !ptr.is_null() {
                // SAFETY: non-NULL: a NUL-terminated string valid for the call.
                *target = unsafe { str_arg(ptr, &format!("config.bus.{field}")) }?.to_string();
            }
        }
        if raw.secret.is_null() && raw.secret_len != 0 {
            return Err(Error::invalid(format!("config.bus.secret is NULL but secret_len is {}", raw.secret_len)));
        }
        if !raw.secret.is_null() {
            // SAFETY: the caller provides secret_len readable bytes at secret.
            config.secret = Some(unsafe { bytes_arg(raw.secret, raw.secret_len, "config.bus.secret") }?.to_vec());
        }
        if raw.flags & !KNOWN_BUS_FLAGS != 0 {
            return Err(Error::invalid(format!("config.bus.flags has unknown bits {:#x}", raw.flags & !KNOWN_BUS_FLAGS)));
        }
        for (value, field) in [(raw.freshness_ms, "freshness_ms"), (raw.message_ttl_ms, "message_ttl_ms"), (raw.claim_idle_ms, "claim_idle_ms")] {
            if value == 0 {
                return Err(Error::invalid(format!("config.bus.{field} must be > 0")));
            }
        }
        if raw.flags & KNOWN_BUS_FLAGS == KNOWN_BUS_FLAGS {
            return Err(Error::invalid("config.bus.flags turn off both prefetch and publishing: leave config.bus NULL instead"));
        }
        config.freshness = Duration::from_millis(raw.freshness_ms);
        config.message_ttl = Duration::from_millis(raw.message_ttl_ms);
        config.claim_idle = Duration::from_millis(raw.claim_idle_ms);
        config.serve_prefetch = raw.flags & TEZZERET_BUS_NO_PREFETCH == 0;
        config.publish = raw.flags & TEZZERET_BUS_NO_PUBLISH == 0;
        config.validate().map_err(|e| e.context("config.bus"))?;
        Ok(config)
    }
}

/// Fills `config` with defaults for a struct of `struct_size` bytes (pass
/// `sizeof(tezzeret_bus_config)`); never writes past `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_bus_config_init(config: *mut tezzeret_bus_config, struct_size: usize) -> *mut tezzeret_status {
    // SAFETY: NULL or struct_size writable bytes, by contract.
    ffi_status(|| unsafe {
        init_sized(config, tezzeret_bus_config::defaults(), struct_size, MIN_BUS_CONFIG_SIZE, "tezzeret_bus_config")
    })
}
