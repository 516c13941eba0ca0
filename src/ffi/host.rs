//! Host callbacks: how the library asks the host for descriptors and tells
//! it about catalog updates, telemetry and log lines.
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void, CString};
use std::mem::{offset_of, size_of};

use super::args::{bytes_arg, init_sized, out_arg, read_sized};
use super::status::{ffi_status, tezzeret_status};
use crate::build::catalog::{Catalog, Descriptor};
use crate::forge::{Host, LogLevel};
use crate::base::error::{Error, ErrorCode, Result};

/// Log level: fine-grained progress.
pub const TEZZERET_LOG_DEBUG: u32 = 0;
/// Log level: normal operation.
pub const TEZZERET_LOG_INFO: u32 = 1;
/// Log level: something was refused or degraded.
pub const TEZZERET_LOG_WARN: u32 = 2;
/// Log level: something failed.
pub const TEZZERET_LOG_ERROR: u32 = 3;

const _: () = assert!(
    TEZZERET_LOG_DEBUG == LogLevel::Debug as u32
        && TEZZERET_LOG_INFO == LogLevel::Info as u32
        && TEZZERET_LOG_WARN == LogLevel::Warn as u32
        && TEZZERET_LOG_ERROR == LogLevel::Error as u32
);

/// Where `enumerate` hands descriptors to the library; valid only during
/// that callback.
pub struct tezzeret_descriptor_sink {
    descriptors: Vec<Descriptor>,
    ids: BTreeSet<String>,
}

/// Enumerates the host's descriptors: call `tezzeret_descriptor_sink_push`
/// once per descriptor, then return 0 (non-zero = the host failed).
pub type tezzeret_enumerate_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, sink: *mut tezzeret_descriptor_sink) -> i32>;
/// Receives Leyline bytes (`KernelCatalogUpdate` or `TelemetryPacket`),
/// borrowed for the duration of the call.
pub type tezzeret_bytes_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, bytes: *const u8, len: usize)>;
/// Receives a log line (`TEZZERET_LOG_*`, NUL-terminated UTF-8, borrowed for the call).
pub type tezzeret_log_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, level: u32, message: *const c_char)>;
/// Releases `user_data`; called exactly once, when the library no longer
/// needs the callbacks (at close, or when open fails).
pub type tezzeret_release_fn = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// The host's callbacks. Initialise with `tezzeret_host_callbacks_init`;
/// every callback is optional. Callbacks run on the thread that called
/// into the library or on the forge's background thread (when refresh or
/// telemetry intervals are set, or with a bus or a publishing fleet) — for
/// one forge, one callback at a time.
/// They must not throw or longjmp across the library.
///
/// From inside a callback, a host may call every function that does not
/// take this forge: guard tables (`tezzeret_guard_table_*`,
/// `tezzeret_guard_check`), kernels already loaded, other forges,
/// `tezzeret_descriptor_validate`, status, buffer and version functions.
/// Functions on this same forge return `TEZZERET_CODE_INVALID_ARGUMENT`
/// ("re-entrant call") instead of deadlocking, and `tezzeret_forge_close`
/// on it does nothing; make such calls after the callback returns (e.g.
/// from a host thread the callback signals). A callback that blocks delays
/// the forge: other threads' calls on it wait, and so does
/// `tezzeret_forge_close`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_host_callbacks {
    /// Size of this struct as the caller knows it.
    pub struct_size: usize,
    /// Passed to every callback.
    pub user_data: *mut c_void,
    /// Descriptor enumeration; NULL = use the embedded default catalog.
    pub enumerate: tezzeret_enumerate_fn,
    /// `KernelCatalogUpdate` after an artifact is durable; in a fleet, once
    /// more for an artifact first announced with its local path, when the
    /// bucket holds it (same checksum, its `s3://` reference). Not told
    /// again after a crash: a restarted host asks what is current (a
    /// prefetch, or its guard table).
    pub catalog_update: tezzeret_bytes_fn,
    /// `TelemetryPacket` bytes.
    pub telemetry: tezzeret_bytes_fn,
    /// Log lines.
    pub log: tezzeret_log_fn,
    /// Releases `user_data`, exactly once.
    pub release: tezzeret_release_fn,
}

const MIN_CALLBACKS_SIZE: usize = offset_of!(tezzeret_host_callbacks, user_data) + size_of::<*mut c_void>();

impl tezzeret_host_callbacks {
    fn defaults() -> Self {
        tezzeret_host_callbacks {
            struct_size: size_of::<tezzeret_host_callbacks>(),
            user_data: std::ptr::null_mut(),
            enumerate: None,
            catalog_update: None,
            telemetry: None,
            log: None,
            release: None,
        }
    }
}

/// Fills `callbacks` with NULLs for a struct of `struct_size` bytes (pass
/// `sizeof(tezzeret_host_callbacks)`); never writes past `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_host_callbacks_init(
    callbacks: *mut tezzeret_host_callbacks,
    struct_size: usize,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: NULL or struct_size writable bytes, by contract.
        unsafe { init_sized(callbacks, tezzeret_host_callbacks::defaults(), struct_size, MIN_CALLBACKS_SIZE, "tezzeret_host_callbacks") }
    })
}

/// Validates Leyline `BlueprintDescriptor` bytes and adds the descriptor to
/// the enumeration. Refused (with a status naming the problem, the
/// descriptor not added): malformed bytes, an empty or duplicate id, an
/// unknown tier, non-finite bounds or min > max.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_descriptor_sink_push(
    sink: *mut tezzeret_descriptor_sink,
    bytes: *const u8,
    len: usize,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(sink, "sink")?;
        // SAFETY: non-NULL (checked); a sink is only handed out during
        // `enumerate`, which is when the host may push into it.
        let sink = unsafe { &mut *sink };
        // SAFETY: NULL with length 0, or len readable bytes for the call.
        let descriptor = Descriptor::decode(unsafe { bytes_arg(bytes, len, "bytes") }?)?;
        if !sink.ids.insert(descriptor.blueprint_id.clone()) {
            return Err(Error::invalid(format!("duplicate blueprint_id {:?} in enumeration", descriptor.blueprint_id)));
        }
        sink.descriptors.push(descriptor);
        Ok(())
    })
}

/// Validates Leyline `BlueprintDescriptor` bytes without a forge: NULL when
/// valid, else a status naming the problem.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_descriptor_validate(bytes: *const u8, len: usize) -> *mut tezzeret_status {
    // SAFETY: NULL with length 0, or len readable bytes for the call.
    ffi_status(|| Descriptor::decode(unsafe { bytes_arg(bytes, len, "bytes") }?).map(|_| ()))
}

/// The forge's [`Host`] over C callbacks; releases `user_data` once on drop.
pub(crate) struct CallbackHost {
    callbacks: tezzeret_host_callbacks,
}

// SAFETY: the host promises (see tezzeret_host_callbacks) that its callbacks
// and user_data may be used from library threads.
unsafe impl Send for CallbackHost {}

impl CallbackHost {
    /// Copies the caller's callbacks (NULL = none).
    ///
    /// # Safety
    /// `ptr` is NULL or a readable struct of at least its `struct_size`.
    pub(crate) unsafe fn read(ptr: *const tezzeret_host_callbacks) -> Result<Self> {
        let callbacks = if ptr.is_null() {
            tezzeret_host_callbacks::defaults()
        } else {
            // SAFETY: non-NULL and readable for its struct_size by this function's contract.
            unsafe { read_sized(ptr, tezzeret_host_callbacks::defaults(), MIN_CALLBACKS_SIZE, "callbacks") }?
        };
        Ok(CallbackHost { callbacks })
    }
}

impl Host for CallbackHost {
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        let Some(enumerate) = self.callbacks.enumerate else { return Ok(None) };
        let mut sink = tezzeret_descriptor_sink { descriptors: Vec::new(), ids: BTreeSet::new() };
        // SAFETY: host callback with its own user_data and a sink valid for the call.
        let rc = unsafe { enumerate(self.callbacks.user_data, &mut sink) };
        if rc != 0 {
            return Err(Error::new(ErrorCode::InvalidArgument, format!("host enumerate callback failed with code {rc}")));
        }
        Catalog::new(sink.descriptors).map(Some)
    }

    fn catalog_update(&mut self, bytes: &[u8]) {
        if let Some(f) = self.callbacks.catalog_update {
            // SAFETY: host callback; bytes borrowed for the call.
            unsafe { f(self.callbacks.user_data, bytes.as_ptr(), bytes.len()) }
        }
    }

    fn telemetry(&mut self, bytes: &[u8]) {
        if let Some(f) = self.callbacks.telemetry {
            // SAFETY: host callback; bytes borrowed for the call.
            unsafe { f(self.callbacks.user_data, bytes.as_ptr(), bytes.len()) }
        }
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        if let Some(f) = self.callbacks.log {
            let text = CString::new(message.replace('\0', "?")).expect("NULs replaced");
            // SAFETY: host callback; message borrowed for the call.
            unsafe { f(self.callbacks.user_data, level as u32, text.as_ptr()) }
        }
    }
}

impl Drop for CallbackHost {
    fn drop(&mut self) {
        if let Some(release) = self.callbacks.release.take() {
            // SAFETY: called exactly once (take()), after the last use.
            unsafe { release(self.callbacks.user_data) }
        }
    }
}
