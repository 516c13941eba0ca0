//! The forge handle: a [`ForgeService`] behind an opaque pointer.
use super::args::{bytes_arg, free_handle, handle_ref, into_handle, out_arg, write_sized};
use super::host::CallbackHost;
use super::status::ffi_status;
use super::buffer::tezzeret_buffer;
use super::config::tezzeret_config;
use super::guards::tezzeret_guard_table;
use super::host::tezzeret_host_callbacks;
use super::status::tezzeret_status;
use crate::base::error::Result;
use crate::base::leyline;
use crate::forge::report;
use crate::forge::{Forge, ForgeService, JobStatus, PrefetchAnswer};

/// An open forge over a state directory. Thread-safe: calls from several
/// host threads are serialised.
pub struct tezzeret_forge {
    service: ForgeService,
}

impl tezzeret_forge {
    /// Runs `body` with exclusive access to the forge behind a handle.
    ///
    /// # Safety
    /// `handle` is NULL or a live handle from `tezzeret_forge_open`.
    pub(crate) unsafe fn with<T>(handle: *mut tezzeret_forge, body: impl FnOnce(&mut Forge) -> Result<T>) -> Result<T> {
        // SAFETY: NULL or live by this function's contract; close waits for
        // calls in progress (it needs the forge's lock) before freeing.
        let handle = unsafe { handle_ref(handle, "forge") }?;
        handle.service.with(body)
    }
}

/// Opens a forge on `config->state_dir`: takes its exclusive lock (a
/// directory open in this or another process is refused with
/// `TEZZERET_CODE_STATE_LOCKED`), loads stored artifacts, enumerates
/// descriptors through `callbacks->enumerate` (NULL callbacks or enumerate:
/// the embedded default catalog) and durably queues, at NORMAL priority,
/// those not compiled yet (queued jobs whose descriptor went away or
/// changed leave the queue). Jobs run on `tezzeret_forge_run` or
/// `tezzeret_forge_drain`, or on the background thread when
/// `refresh_interval_ms` is set. `callbacks` may be NULL; its `release`
/// runs exactly once — at close, or before this returns if opening fails.
/// On success `*out_forge` receives the handle; close it with `tezzeret_forge_close`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_open(
    config: *const tezzeret_config,
    callbacks: *const tezzeret_host_callbacks,
    out_forge: *mut *mut tezzeret_forge,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: NULL or a readable callbacks struct of its struct_size.
        let host = unsafe { CallbackHost::read(callbacks) }?;
        out_arg(out_forge, "out_forge")?;
        // SAFETY: NULL or a readable config struct of its struct_size.
        let config = unsafe { tezzeret_config::read(config) }?;
        let service = ForgeService::open(config, Box::new(host))?;
        // SAFETY: out_forge is non-NULL (checked) and writable by contract.
        unsafe { *out_forge = into_handle(tezzeret_forge { service }) };
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
            // SAFETY: non-NULL, and starting with a readable size_t by contract.
            let size = unsafe { std::ptr::read_unaligned(out_summary as *const usize) };
            if size < std::mem::size_of::<usize>() {
                return Err(crate::base::error::Error::invalid(format!("out_summary.struct_size is {size}")));
            }
        }
        // SAFETY: NULL or a live forge handle.
        let reports = unsafe { tezzeret_forge::with(forge, |f| Ok(f.run(&mut |_| {}))) }?;
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
            // SAFETY: non-NULL, writable for its struct_size by contract.
            unsafe { write_sized(out_summary, &summary, std::mem::size_of::<usize>(), "out_summary") }?;
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
        // SAFETY: NULL or a live forge handle.
        let json = unsafe { tezzeret_forge::with(forge, |f| Ok(report::stored_document(f.artifacts(), f.store()).to_string())) }?;
        // SAFETY: out_json is non-NULL (checked) and writable by contract.
        unsafe { *out_json = tezzeret_buffer::boxed(json.into_bytes()) };
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
/// Answered at once, also while another thread's call (a compile) holds
/// the forge.
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
        // SAFETY: NULL with length 0, or request_len readable bytes.
        let request = leyline::decode::<leyline::KernelPrefetchRequest>(unsafe { bytes_arg(request, request_len, "request") }?)?;
        // SAFETY: NULL or a live forge handle (close waits for no prefetch:
        // the host must not close a handle another of its threads uses).
        let answer = unsafe { handle_ref(forge, "forge") }?.service.prefetch(&request)?;
        let (kind, bytes) = match answer {
            PrefetchAnswer::Ready(ready) => (TEZZERET_PREFETCH_READY, leyline::encode(&ready)),
            PrefetchAnswer::Error(error) => (TEZZERET_PREFETCH_ERROR, leyline::encode(&error)),
        };
        // SAFETY: both out-parameters are non-NULL (checked) and writable.
        unsafe {
            *out_type = kind;
            *out_answer = tezzeret_buffer::boxed(bytes);
        }
        Ok(())
    })
}

/// Opens the forge's guard table read-only (the same as
/// `tezzeret_guard_table_open` on `<state_dir>/guards.tbl`).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_guard_table(
    forge: *mut tezzeret_forge,
    out_table: *mut *mut tezzeret_guard_table,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_table, "out_table")?;
        // SAFETY: NULL or a live forge handle.
        let path = unsafe { tezzeret_forge::with(forge, |f| Ok(f.guards().path().to_path_buf())) }?;
        let table = crate::state::guard_table::GuardTable::open_read_only(&path)?;
        // SAFETY: out_table is non-NULL (checked) and writable by contract.
        unsafe { *out_table = into_handle(tezzeret_guard_table { table }) };
        Ok(())
    })
}

/// Diagnostic: deliberately panics inside the library so a host can check
/// that panics are contained. Always returns a `TEZZERET_CODE_INTERNAL`
/// status and poisons the handle (later calls return
/// `TEZZERET_CODE_POISONED`; close still works).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_selftest_panic(forge: *mut tezzeret_forge) -> *mut tezzeret_status {
    // SAFETY: NULL or a live forge handle.
    ffi_status(|| unsafe { tezzeret_forge::with(forge, |_| -> Result<()> { panic!("tezzeret_forge_selftest_panic") }) })
}

/// Closes a forge: abandons a running compile (queued jobs stay queued,
/// durably), waits for calls in progress on other threads to return,
/// stops the background thread (waiting for a callback it is in, if any),
/// sends a last `TelemetryPacket` (final metrics; `SystemHealth` indicator
/// `closing` = `true`), releases the state directory's lock and calls the
/// host's `release` once. No callback runs after this returns. NULL is
/// accepted and ignored. No call on the handle may start once close has
/// begun. Called from inside one of the forge's own callbacks it does
/// nothing (the handle is in use by the call that runs the callback):
/// close it afterwards.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_close(forge: *mut tezzeret_forge) {
    // SAFETY: NULL or a live handle from open, closed once by contract.
    let Ok(handle) = (unsafe { handle_ref(forge, "forge") }) else { return };
    if handle.service.called_from_inside() {
        return; // re-entrant: freeing the handle here would pull it from under the running call
    }
    // SAFETY: made by into_handle in open; this is its one close. Dropping
    // the service shuts the forge down (see ForgeService::close).
    unsafe { free_handle(forge) }
}
