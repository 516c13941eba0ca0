//! `tezzeret_fleet_config`: how a forge shares artifacts with its fleet
//! through an S3-compatible bucket; and `tezzeret_fleet_fetch_artifact`,
//! how a consumer without a forge fetches one by its reference.
use std::ffi::c_char;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::time::Duration;

use super::args::{init_sized, read_sized, str_arg};
use super::status::{ffi_status, tezzeret_status};
use crate::base::error::{Error, Result};
use crate::fleet::{fetch_artifact, ArtifactReference, Credentials, FleetConfig};

/// Fleet flag: only fetch from the bucket, never publish (no signing key
/// needed; without one, a job the bucket lacks fails rather than compile
/// an unsigned artifact the forge's trusted keys would refuse).
pub const TEZZERET_FLEET_READ_ONLY: u32 = 1;
/// Fleet flag: keep the leases (and announcements) on the forge's bus's
/// Redis, as `lease_redis_url` would with its URL, for a fleet whose hosts
/// all share that bus; needs `tezzeret_config.bus`, not with
/// `lease_redis_url`. Since ABI 0.11.
pub const TEZZERET_FLEET_LEASES_ON_BUS: u32 = 2;
const KNOWN_FLEET_FLAGS: u32 = TEZZERET_FLEET_READ_ONLY | TEZZERET_FLEET_LEASES_ON_BUS;

/// How a forge joins a fleet (and how `tezzeret_fleet_fetch_artifact`
/// reaches its store). Initialise with `tezzeret_fleet_config_init`, set
/// `bucket` (a forge requires it) and point `tezzeret_config.fleet` at it;
/// the forge's config must carry trusted keys (nothing from the bucket is used
/// unverified) and, to publish, a signing key. Every string is borrowed for
/// the `tezzeret_forge_open` call; NULL ones keep their defaults. Settings
/// left NULL are read from the usual `AWS_*` environment variables. While
/// the bucket is unreachable every job compiles locally and what was not
/// published is published once it is back.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_fleet_config {
    /// Size of this struct as the caller knows it (`sizeof(tezzeret_fleet_config)`).
    pub struct_size: usize,
    /// The bucket (UTF-8, required; it must exist).
    pub bucket: *const c_char,
    /// S3 endpoint, e.g. `http://127.0.0.1:8333`; NULL = AWS (or `AWS_ENDPOINT_URL`).
    pub endpoint: *const c_char,
    /// Object names start with this prefix (ASCII letters, digits, `-`,
    /// `_`, `.` and `/`); NULL = the bucket's root.
    pub prefix: *const c_char,
    /// Region requests are signed for; NULL = `AWS_REGION` or `us-east-1`.
    pub region: *const c_char,
    /// Access key id; NULL = `AWS_ACCESS_KEY_ID` (set both or neither).
    pub access_key_id: *const c_char,
    /// Secret access key; NULL = `AWS_SECRET_ACCESS_KEY`. Copied.
    pub secret_access_key: *const c_char,
    /// How long a claim to compile a blueprint holds, ms; default 30000.
    pub lease_ttl_ms: u64,
    /// How long to wait for another host's compile before compiling, ms; default 60000.
    pub lease_wait_ms: u64,
    /// The longest one request may take, ms; default 5000. Keep it under a
    /// third of `lease_ttl_ms` (a lease is renewed only while it outlives one request).
    pub request_timeout_ms: u64,
    /// How often unpublished artifacts are offered again during an outage, ms; default 2000.
    pub retry_interval_ms: u64,
    /// Bitwise OR of `TEZZERET_FLEET_*`; default 0 (fetch and publish).
    pub flags: u32,
    /// This host's index in its fleet (0, 1, 2…, e.g. a scheduler's rank),
    /// so that hosts starting together begin in evenly spread places of
    /// their queues; default -1: none (each host starts at a random
    /// place). Since ABI 0.8.
    pub member_index: i64,
    /// A Redis keeping the fleet's leases instead of the bucket
    /// (`redis://host:port/db` or `unix://path`, often the bus's): a claim
    /// then costs one Redis round trip instead of a conditional create in
    /// the bucket, and publications are announced there, so that waiting
    /// hosts ask the bucket only for artifacts. Every host of the fleet
    /// must use the same one. NULL (the default): leases live in the
    /// bucket, or with `TEZZERET_FLEET_LEASES_ON_BUS` on the bus's Redis.
    /// Since ABI 0.9.
    pub lease_redis_url: *const c_char,
}

/// The oldest layout accepted: up to and including `bucket`.
const MIN_FLEET_CONFIG_SIZE: usize = offset_of!(tezzeret_fleet_config, bucket) + size_of::<*const c_char>();

impl tezzeret_fleet_config {
    fn defaults() -> Self {
        let null = std::ptr::null();
        let defaults = FleetConfig::new("");
        let ms = |d: Duration| d.as_millis() as u64;
        tezzeret_fleet_config {
            struct_size: size_of::<tezzeret_fleet_config>(),
            bucket: null,
            endpoint: null,
            prefix: null,
            region: null,
            access_key_id: null,
            secret_access_key: null,
            lease_ttl_ms: ms(defaults.lease_ttl),
            lease_wait_ms: ms(defaults.lease_wait),
            request_timeout_ms: ms(defaults.request_timeout),
            retry_interval_ms: ms(defaults.retry_interval),
            flags: 0,
            member_index: -1,
            lease_redis_url: null,
        }
    }

    /// Reads a caller's fleet config (of any supported size), named `name`
    /// in errors; a NULL `bucket` is refused, or stands for
    /// `bucket_if_null` when given.
    ///
    /// # Safety
    /// `ptr` is a readable fleet config of at least its `struct_size` bytes
    /// whose non-NULL strings are NUL-terminated.
    pub(crate) unsafe fn read(ptr: *const tezzeret_fleet_config, name: &str, bucket_if_null: Option<&str>) -> Result<FleetConfig> {
        // SAFETY: a readable config of its struct_size, by contract.
        let raw = unsafe { read_sized(ptr, Self::defaults(), MIN_FLEET_CONFIG_SIZE, name) }?;
        let text = |ptr: *const c_char, field: &str| -> Result<Option<String>> {
            if ptr.is_null() {
                return Ok(None);
            }
            // SAFETY: non-NULL: a NUL-terminated string valid for the call.
            Ok(Some(unsafe { str_arg(ptr, &format!("{name}.{field}")) }?.to_string()))
        };
        let bucket = text(raw.bucket, "bucket")?
            .or_else(|| bucket_if_null.map(str::to_string))
            .ok_or_else(|| Error::invalid(format!("{name}.bucket is NULL")))?;
        let mut config = FleetConfig::new(bucket);
        config.endpoint = text(raw.endpoint, "endpoint")?;
        config.prefix = text(raw.prefix, "prefix")?.unwrap_or_default();
        config.region = text(raw.region, "region")?;
        config.credentials = match (text(raw.access_key_id, "access_key_id")?, text(raw.secret_access_key, "secret_access_key")?) {
            (Some(access_key_id), Some(secret_access_key)) => Some(Credentials { access_key_id, secret_access_key }),
            (None, None) => None,
            _ => return Err(Error::invalid(format!("{name}: set both access_key_id and secret_access_key, or neither"))),
        };
        if raw.flags & !KNOWN_FLEET_FLAGS != 0 {
            return Err(Error::invalid(format!("{name}.flags has unknown bits {:#x}", raw.flags & !KNOWN_FLEET_FLAGS)));
        }
        config.publish = raw.flags & TEZZERET_FLEET_READ_ONLY == 0;
        config.leases_on_bus = raw.flags & TEZZERET_FLEET_LEASES_ON_BUS != 0;
        config.lease_ttl = Duration::from_millis(raw.lease_ttl_ms);
        config.lease_wait = Duration::from_millis(raw.lease_wait_ms);
        config.request_timeout = Duration::from_millis(raw.request_timeout_ms);
        config.retry_interval = Duration::from_millis(raw.retry_interval_ms);
        config.member_index = match raw.member_index {
            -1 => None,
            index => Some(u32::try_from(index).map_err(|_| {
                Error::invalid(format!("{name}.member_index {index} is neither -1 nor an index from 0 to {}", u32::MAX))
            })?),
        };
        config.lease_redis = text(raw.lease_redis_url, "lease_redis_url")?;
        config.validate().map_err(|e| e.context(name))?;
        Ok(config)
    }
}

/// Fills `config` with defaults for a struct of `struct_size` bytes (pass
/// `sizeof(tezzeret_fleet_config)`); never writes past `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_fleet_config_init(config: *mut tezzeret_fleet_config, struct_size: usize) -> *mut tezzeret_status {
    // SAFETY: NULL or struct_size writable bytes, by contract.
    ffi_status(|| unsafe {
        init_sized(config, tezzeret_fleet_config::defaults(), struct_size, MIN_FLEET_CONFIG_SIZE, "tezzeret_fleet_config")
    })
}

/// Fetches the artifact an `s3://` reference names — as catalog updates and
/// prefetch answers carry once it is published — and writes it durably at
/// `path`, replacing any file there: for a consumer on any host (a Kasmina
/// process, a loader) with no forge of its own. Its bytes must hash to the
/// sha256 in the reference and, when `expected_sha256` is not NULL (the
/// announcement's `checksum`), to that too; nothing is written otherwise.
/// `config` says how to reach the store: its endpoint, region,
/// credentials and request timeout (its other fields are checked as for a
/// forge, but not used; NULL: all from the `AWS_*` environment
/// variables); its `bucket` may be NULL, and otherwise must be the
/// reference's. `path` must be a regular file or not exist (a symbolic
/// link, device or FIFO there is refused, not replaced). Errors:
/// `NULL_ARGUMENT` (`artifact_ref` or `path`), `INVALID_UTF8`,
/// `INVALID_ARGUMENT` (a malformed reference or checksum, another bucket,
/// such a path), `NOT_FOUND` (the bucket lacks it; a bucket that does not
/// exist is an `IO` error naming it), `CORRUPT` (its bytes do not hash
/// right), `BUDGET_EXCEEDED` (over 1 GiB, not read further), `IO` (the
/// store or the file system failed). Since ABI 0.10.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_fleet_fetch_artifact(
    config: *const tezzeret_fleet_config,
    artifact_ref: *const c_char,
    expected_sha256: *const c_char,
    path: *const c_char,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: each a NUL-terminated string valid for the call, by contract.
        let (reference, path) = unsafe { (str_arg(artifact_ref, "artifact_ref")?, str_arg(path, "path")?) };
        let expected = match expected_sha256.is_null() {
            true => None,
            // SAFETY: non-NULL: a NUL-terminated string valid for the call.
            false => Some(unsafe { str_arg(expected_sha256, "expected_sha256") }?),
        };
        let bucket = ArtifactReference::parse(reference)?.bucket;
        let config = match config.is_null() {
            true => FleetConfig::new(bucket),
            // SAFETY: a readable fleet config, by contract.
            false => unsafe { tezzeret_fleet_config::read(config, "config", Some(&bucket)) }?,
        };
        fetch_artifact(&config, reference, expected, Path::new(path)).map(|_| ())
    })
}
