//! The forge handle.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::host::CallbackHost;
use super::{
    ffi_status, out_arg, panic_error, tezzeret_buffer, tezzeret_config, tezzeret_host_callbacks, tezzeret_status,
    write_sized,
};
use crate::forge::{Forge, JobStatus, PrefetchAnswer};
use crate::leyline;
use crate::{report, Error, ErrorCode, Result};

/// An open forge over a state directory. Thread-safe: calls from several
/// host threads are serialised.
pub struct tezzeret_forge {
    forge: Mutex<Option<Forge>>,
    poisoned: AtomicBool,
    /// Token of the thread currently inside a call (0 = none); detects
    /// re-entrant calls from callbacks, which would otherwise deadlock.
    owner: AtomicU64,
}

thread_local! {
    static THREAD_TOKEN: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

impl tezzeret_forge {
    /// Runs `body` with exclusive access to the forge; a panic inside it
    /// poisons the handle and becomes an internal-error status.
    ///
    /// # Safety
    /// `handle` is NULL or a live handle from `tezzeret_forge_open`.
    pub(crate) unsafe fn with<T>(handle: *mut tezzeret_forge, body: impl FnOnce(&mut Forge) -> Result<T>) -> Result<T> {
        let handle = handle.as_ref().ok_or_else(|| Error::new(ErrorCode::NullArgument, "forge is NULL"))?;
        let token = THREAD_TOKEN.with(|t| *t);
        if handle.owner.load(Ordering::Acquire) == token {
            return Err(Error::invalid("re-entrant call on a forge from inside one of its own callbacks"));
        }
        if handle.poisoned.load(Ordering::Acquire) {
            return Err(Error::new(ErrorCode::Poisoned, "forge handle is poisoned by an earlier internal error; close it"));
        }
        let mut guard = handle.forge.lock().unwrap_or_else(|p| p.into_inner());
        handle.owner.store(token, Ordering::Release);
        let outcome = match guard.as_mut() {
            Some(forge) => catch_unwind(AssertUnwindSafe(|| body(forge))),
            None => Ok(Err(Error::new(ErrorCode::Internal, "forge is closed"))),
        };
        handle.owner.store(0, Ordering::Release);
        match outcome {
            Ok(result) => result,
            Err(panic) => {
                handle.poisoned.store(true, Ordering::Release);
                Err(panic_error(&panic))
            }
        }
    }
}

/// Opens a forge on `config->state_dir`: takes its exclusive lock (a
/// directory open in this or another process is refused with
/// `TEZZERET_CODE_STATE_LOCKED`), loads stored artifacts, and enumerates
/// descriptors through `callbacks->enumerate` (NULL callbacks or enumerate:
/// the embedded default catalog). `callbacks` may be NULL; its `release`
/// runs exactly once — at close, or before this returns if opening fails.
/// On success `*out_forge` receives the handle; close it with `tezzeret_forge_close`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_open(
    config: *const tezzeret_config,
    callbacks: *const tezzeret_host_callbacks,
    out_forge: *mut *mut tezzeret_forge,
) -> *mut tezzeret_status {
    ffi_status(|| {
        let host = CallbackHost::read(callbacks)?;
        out_arg(out_forge, "out_forge")?;
        let config = tezzeret_config::read(config)?;
        let forge = Forge::open(config, Box::new(host))?;
        let handle = Box::new(tezzeret_forge {
            forge: Mutex::new(Some(forge)),
            poisoned: AtomicBool::new(false),
            owner: AtomicU64::new(0),
        });
        *out_forge = Box::into_raw(handle);
        Ok(())
    })
}

/// Counts of a run, by outcome.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct tezzeret_run_summary {
    /// Size of this struct as the caller knows it.
    pub struct_size: usize,
    /// Blueprints processed.
    pub total: u32,
    /// Compiled and stored in this run.
    pub ok: u32,
    /// Reused from the store.
    pub cached: u32,
    /// Failed.
    pub failed: u32,
    /// Refused (quarantine-only).
    pub refused: u32,
}

/// Compiles every descriptor that has no current artifact (synchronously,
/// on the calling thread), storing each durably and announcing it through
/// `catalog_update`. Individual failures are counted in `out_summary`
/// (nullable; set its `struct_size`) and reported through `log` and
/// telemetry; the call itself fails only when the forge cannot run.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_run(
    forge: *mut tezzeret_forge,
    out_summary: *mut tezzeret_run_summary,
) -> *mut tezzeret_status {
    ffi_status(|| {
        if !out_summary.is_null() {
            // Validate before doing work, so a bad struct_size changes nothing.
            let size = std::ptr::read_unaligned(out_summary as *const usize);
            if size < std::mem::size_of::<usize>() {
                return Err(Error::invalid(format!("out_summary.struct_size is {size}")));
            }
        }
        let reports = tezzeret_forge::with(forge, |f| Ok(f.run(&mut |_| {})))?;
        let mut summary = tezzeret_run_summary { total: reports.len() as u32, ..Default::default() };
        for r in &reports {
            match r.status {
                JobStatus::Ok => summary.ok += 1,
                JobStatus::Cached => summary.cached += 1,
                JobStatus::Failed => summary.failed += 1,
                JobStatus::Refused => summary.refused += 1,
            }
        }
        if !out_summary.is_null() {
            write_sized(out_summary, &summary, std::mem::size_of::<usize>(), "out_summary")?;
        }
        Ok(())
    })
}

/// The stored catalog as a JSON document (`{"artifacts": [...]}` with the
/// fields of `tezzeret inspect --json`). Free `*out_json` with `tezzeret_buffer_free`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_catalog_json(
    forge: *mut tezzeret_forge,
    out_json: *mut *mut tezzeret_buffer,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_json, "out_json")?;
        let json = tezzeret_forge::with(forge, |f| Ok(report::stored_document(f.artifacts(), f.store()).to_string()))?;
        *out_json = tezzeret_buffer::boxed(json.into_bytes());
        Ok(())
    })
}

/// Answer type of a prefetch: `KernelArtifactReady` bytes (Leyline
/// `BusMessageType` KERNEL_PREFETCH_READY).
pub const TEZZERET_PREFETCH_READY: u32 = 7;
/// Answer type of a prefetch: `KernelArtifactError` bytes (KERNEL_PREFETCH_ERROR).
pub const TEZZERET_PREFETCH_ERROR: u32 = 8;

/// Answers Leyline `KernelPrefetchRequest` bytes: `*out_type` is
/// `TEZZERET_PREFETCH_READY` (`KernelArtifactReady` bytes, with pre-warm
/// p50/p95) or `TEZZERET_PREFETCH_ERROR` (`KernelArtifactError` bytes, reason
/// `missing_artifact`, `artifact_not_found`, `checksum_mismatch` or
/// `signature_invalid`); free `*out_answer` with `tezzeret_buffer_free`. The
/// artifact is re-hashed only when its file changed since it was verified.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_prefetch(
    forge: *mut tezzeret_forge,
    request: *const u8,
    request_len: usize,
    out_type: *mut u32,
    out_answer: *mut *mut tezzeret_buffer,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_type, "out_type")?;
        out_arg(out_answer, "out_answer")?;
        let request = leyline::decode::<leyline::KernelPrefetchRequest>(super::bytes_arg(request, request_len, "request")?)?;
        let (kind, bytes) = match tezzeret_forge::with(forge, |f| Ok(f.prefetch(&request)))? {
            PrefetchAnswer::Ready(ready) => (TEZZERET_PREFETCH_READY, leyline::encode(&ready)),
            PrefetchAnswer::Error(error) => (TEZZERET_PREFETCH_ERROR, leyline::encode(&error)),
        };
        *out_type = kind;
        *out_answer = tezzeret_buffer::boxed(bytes);
        Ok(())
    })
}

/// Opens the forge's guard table read-only (the same as
/// `tezzeret_guard_table_open` on `<state_dir>/guards.tbl`).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_guard_table(
    forge: *mut tezzeret_forge,
    out_table: *mut *mut super::tezzeret_guard_table,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_table, "out_table")?;
        let path = tezzeret_forge::with(forge, |f| Ok(f.guards().path().to_path_buf()))?;
        let table = crate::guard::table::GuardTable::open_read_only(&path)?;
        *out_table = Box::into_raw(Box::new(super::tezzeret_guard_table { table }));
        Ok(())
    })
}

/// Diagnostic: deliberately panics inside the library so a host can check
/// that panics are contained. Always returns a `TEZZERET_CODE_INTERNAL`
/// status and poisons the handle (later calls return
/// `TEZZERET_CODE_POISONED`; close still works).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_selftest_panic(forge: *mut tezzeret_forge) -> *mut tezzeret_status {
    ffi_status(|| tezzeret_forge::with(forge, |_| -> Result<()> { panic!("tezzeret_forge_selftest_panic") }))
}

/// Closes a forge: releases the state directory's lock and calls the
/// host's `release` once. No callback runs after this returns. NULL is
/// accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_close(forge: *mut tezzeret_forge) {
    if forge.is_null() {
        return;
    }
    // SAFETY: made by Box::into_raw in open, closed once by contract.
    let handle = Box::from_raw(forge);
    let inner = handle.forge.into_inner().unwrap_or_else(|p| p.into_inner());
    // Dropping may run the host's release callback; never unwind from here.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(inner)));
}
