//! `tezzeret_config`: how a forge is opened.
use std::ffi::c_char;
use std::mem::{offset_of, size_of};

use super::args::{bytes_arg, init_sized, read_sized, str_arg};
use super::bus::tezzeret_bus_config;
use super::fleet::tezzeret_fleet_config;
use super::status::{ffi_status, tezzeret_status};
use crate::build::compile::Strategy;
use crate::forge::{DevicePreference, ForgeConfig};
use crate::state::signing::KeyRing;
use crate::base::error::{Error, Result};

/// Emergency strategy: CPU only, no optimisation passes, one validation run.
pub const TEZZERET_STRATEGY_EMERGENCY: u32 = 0;
/// Fast strategy: trace on the target device, no freezing, short pre-warm.
pub const TEZZERET_STRATEGY_FAST: u32 = 1;
/// Standard strategy (default): trace + freeze, full pre-warm.
pub const TEZZERET_STRATEGY_STANDARD: u32 = 2;
/// Aggressive strategy: Standard plus timed optimisation variants.
pub const TEZZERET_STRATEGY_AGGRESSIVE: u32 = 3;

/// Device: CUDA device 0 when available, else CPU (default).
pub const TEZZERET_DEVICE_AUTO: u32 = 0;
/// Device: always the CPU.
pub const TEZZERET_DEVICE_CPU: u32 = 1;
/// Device: CUDA device 0; opening fails without one.
pub const TEZZERET_DEVICE_CUDA: u32 = 2;

/// Flag: compile quarantine-only (HIGH_RISK) blueprints instead of refusing them.
pub const TEZZERET_FLAG_ALLOW_QUARANTINE: u32 = 1;
const KNOWN_FLAGS: u32 = TEZZERET_FLAG_ALLOW_QUARANTINE;

/// How to open a forge. Initialise with `tezzeret_config_init`, then set
/// `state_dir` (required) and whatever else differs from the defaults.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_config {
    /// Size of this struct as the caller knows it (`sizeof(tezzeret_config)`).
    pub struct_size: usize,
    /// State directory (UTF-8 path, created if missing); borrowed for the call.
    pub state_dir: *const c_char,
    /// `TEZZERET_STRATEGY_*`; default STANDARD.
    pub strategy: u32,
    /// `TEZZERET_DEVICE_*`; default AUTO.
    pub device: u32,
    /// Bitwise OR of `TEZZERET_FLAG_*`; default 0.
    pub flags: u32,
    /// Maximum concurrent compile jobs; default 2.
    pub max_concurrency: u32,
    /// Re-enumeration interval in ms; 0 (default) = only at open and on refresh.
    pub refresh_interval_ms: u64,
    /// Periodic telemetry interval in ms; default 10000; 0 = off.
    pub telemetry_interval_ms: u64,
    /// Batch size of the representative inputs artifacts are built for; default 8.
    pub batch_size: u32,
    /// ed25519 secret key (32-byte seed) artifacts are signed with; NULL
    /// (default) = unsigned. Borrowed for the call; the library keeps a copy.
    pub signing_key: *const u8,
    /// `trusted_key_count` ed25519 public keys (32 bytes each, contiguous);
    /// when any are given, every artifact's signature is verified on use,
    /// and a `signing_key` must be one of theirs (else the open fails with
    /// `TEZZERET_CODE_INVALID_ARGUMENT`: everything it signed would be refused).
    pub trusted_keys: *const u8,
    /// Number of keys at `trusted_keys`; default 0.
    pub trusted_key_count: usize,
    /// Time budget of every job in ms; 0 (default) = the design budgets per
    /// strategy (10 s, 65 s, 250 s, 960 s).
    pub budget_ms: u64,
    /// The Oona bus to join (answer prefetch requests, publish catalog
    /// updates and telemetry); NULL (default) = none. Borrowed for the call.
    /// Since ABI 0.4.
    pub bus: *const tezzeret_bus_config,
    /// The fleet's S3-compatible bucket to fetch artifacts from and publish
    /// them to; NULL (default) = none. Borrowed for the call. Since ABI 0.7.
    pub fleet: *const tezzeret_fleet_config,
}

/// The oldest layout accepted: up to and including `state_dir`.
const MIN_CONFIG_SIZE: usize = offset_of!(tezzeret_config, state_dir) + size_of::<*const c_char>();

impl tezzeret_config {
    fn defaults() -> Self {
        tezzeret_config {
            struct_size: size_of::<tezzeret_config>(),
            state_dir: std::ptr::null(),
            strategy: TEZZERET_STRATEGY_STANDARD,
            device: TEZZERET_DEVICE_AUTO,
            flags: 0,
            max_concurrency: 2,
            refresh_interval_ms: 0,
            telemetry_interval_ms: 10_000,
            batch_size: 8,
            signing_key: std::ptr::null(),
            trusted_keys: std::ptr::null(),
            trusted_key_count: 0,
            budget_ms: 0,
            bus: std::ptr::null(),
            fleet: std::ptr::null(),
        }
    }

    /// Reads a caller's config (of any supported size) into a [`ForgeConfig`].
    ///
    /// # Safety
    /// `ptr` is NULL or a readable config of at least its `struct_size` bytes.
    pub(crate) unsafe fn read(ptr: *const tezzeret_config) -> Result<ForgeConfig> {
        // SAFETY: NULL or a readable config of its struct_size, by contract.
        let raw = unsafe { read_sized(ptr, Self::defaults(), MIN_CONFIG_SIZE, "config") }?;
        // SAFETY: NULL or a NUL-terminated string valid for the call.
        let state_dir = unsafe { str_arg(raw.state_dir, "config.state_dir") }?;
        if state_dir.is_empty() {
            return Err(Error::invalid("config.state_dir is empty"));
        }
        if raw.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::invalid(format!("config.flags has unknown bits {:#x}", raw.flags & !KNOWN_FLAGS)));
        }
        if raw.max_concurrency == 0 {
            return Err(Error::invalid("config.max_concurrency must be >= 1"));
        }
        if raw.batch_size == 0 {
            return Err(Error::invalid("config.batch_size must be >= 1"));
        }
        let mut config = ForgeConfig::new(state_dir);
        config.strategy = Strategy::from_u32(raw.strategy).map_err(|e| e.context("config.strategy"))?;
        config.device = DevicePreference::from_u32(raw.device).map_err(|e| e.context("config.device"))?;
        config.allow_quarantine = raw.flags & TEZZERET_FLAG_ALLOW_QUARANTINE != 0;
        config.max_concurrency = raw.max_concurrency;
        config.refresh_interval_ms = raw.refresh_interval_ms;
        config.telemetry_interval_ms = raw.telemetry_interval_ms;
        config.batch = i64::from(raw.batch_size);
        let signing = (!raw.signing_key.is_null()).then(|| {
            let mut seed = [0u8; 32];
            // SAFETY: the caller provides 32 readable bytes at signing_key.
            seed.copy_from_slice(unsafe { std::slice::from_raw_parts(raw.signing_key, 32) });
            seed
        });
        if raw.trusted_key_count > 4096 {
            return Err(Error::invalid(format!("config.trusted_key_count {} is implausibly large", raw.trusted_key_count)));
        }
        // SAFETY: the caller provides trusted_key_count * 32 readable bytes.
        let trusted_bytes = unsafe { bytes_arg(raw.trusted_keys, raw.trusted_key_count * 32, "config.trusted_keys") }?;
        let trusted: Vec<[u8; 32]> = trusted_bytes.chunks(32).map(|c| c.try_into().expect("32-byte chunks")).collect();
        config.keys = KeyRing::new(signing, &trusted).map_err(|e| e.context("config.trusted_keys"))?;
        if raw.budget_ms > 0 {
            config.budgets = [std::time::Duration::from_millis(raw.budget_ms); 4];
        }
        if !raw.bus.is_null() {
            // SAFETY: non-NULL: a readable bus config valid for the call, by contract.
            config.bus = Some(unsafe { tezzeret_bus_config::read(raw.bus) }?);
        }
        if !raw.fleet.is_null() {
            // SAFETY: non-NULL: a readable fleet config valid for the call, by contract.
            config.fleet = Some(unsafe { tezzeret_fleet_config::read(raw.fleet, "config.fleet", None) }?);
        }
        Ok(config)
    }
}

/// Fills `config` with defaults for a struct of `struct_size` bytes (pass
/// `sizeof(tezzeret_config)`); never writes past `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_config_init(config: *mut tezzeret_config, struct_size: usize) -> *mut tezzeret_status {
    // SAFETY: NULL or struct_size writable bytes, by contract.
    ffi_status(|| unsafe { init_sized(config, tezzeret_config::defaults(), struct_size, MIN_CONFIG_SIZE, "tezzeret_config") })
}
