//! The forge handle.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    shared: Arc<Shared>,
    /// The background thread of periodic work (refresh, telemetry,
    /// maintenance), when any interval is configured.
    service: Option<JoinHandle<()>>,
}

/// What the handle and its background thread share.
struct Shared {
    forge: Mutex<Option<Forge>>,
    poisoned: AtomicBool,
    /// Token of the thread currently inside a call (0 = none); detects
    /// re-entrant calls from callbacks, which would otherwise deadlock.
    owner: AtomicU64,
    /// Set at close; wakes the background thread.
    stop: Mutex<bool>,
    wake: Condvar,
    /// The forge's shutdown flag, reachable without its lock.
    shutdown: Arc<AtomicBool>,
}

thread_local! {
    static THREAD_TOKEN: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// The calling thread's token (never 0).
fn thread_token() -> u64 {
    THREAD_TOKEN.with(|t| *t)
}

impl Shared {
    /// Runs `body` with exclusive access to the forge; a panic inside it
    /// poisons the handle and becomes an internal-error status.
    fn with<T>(&self, body: impl FnOnce(&mut Forge) -> Result<T>) -> Result<T> {
        let token = thread_token();
        if self.owner.load(Ordering::Acquire) == token {
            return Err(Error::invalid("re-entrant call on a forge from inside one of its own callbacks"));
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::new(ErrorCode::Poisoned, "forge handle is poisoned by an earlier internal error; close it"));
        }
        let mut guard = self.forge.lock().unwrap_or_else(|p| p.into_inner());
        self.owner.store(token, Ordering::Release);
        let outcome = match guard.as_mut() {
            Some(forge) => catch_unwind(AssertUnwindSafe(|| body(forge))),
            None => Ok(Err(Error::new(ErrorCode::Internal, "forge is closed"))),
        };
        self.owner.store(0, Ordering::Release);
        match outcome {
            Ok(result) => result,
            Err(panic) => {
                self.poisoned.store(true, Ordering::Release);
                Err(panic_error(&panic))
            }
        }
    }
}

impl tezzeret_forge {
    /// Runs `body` with exclusive access to the forge behind a handle.
    ///
    /// # Safety
    /// `handle` is NULL or a live handle from `tezzeret_forge_open`.
    pub(crate) unsafe fn with<T>(handle: *mut tezzeret_forge, body: impl FnOnce(&mut Forge) -> Result<T>) -> Result<T> {
        let handle = handle.as_ref().ok_or_else(|| Error::new(ErrorCode::NullArgument, "forge is NULL"))?;
        // Our own reference: a close on another thread waits for this call
        // (it needs the forge's lock) and cannot free what it still uses.
        let shared = Arc::clone(&handle.shared);
        shared.with(body)
    }
}

/// How often the background thread runs TTL maintenance (SPEC R10).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(300);

/// The background thread: re-enumerates and runs the queue every refresh
/// interval, sends telemetry (with fresh resource readings) every telemetry
/// interval, maintains the cache every 5 minutes — until close.
fn service(shared: Arc<Shared>, refresh: Option<Duration>, telemetry: Option<Duration>) {
    let start = Instant::now();
    let mut next_refresh = refresh.map(|d| start + d);
    let mut next_telemetry = telemetry.map(|d| start + d);
    let mut next_maintenance = start + MAINTENANCE_EVERY;
    loop {
        let deadline = [next_refresh, next_telemetry, Some(next_maintenance)].into_iter().flatten().min().expect("one deadline");
        {
            let stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
            let wait = deadline.saturating_duration_since(Instant::now());
            let (stop, _) = shared.wake.wait_timeout_while(stop, wait, |s| !*s).unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
        let now = Instant::now();
        if let (Some(due), Some(every)) = (next_refresh, refresh) {
            if now >= due {
                let _ = shared.with(|f| {
                    if let Err(e) = f.refresh() {
                        f.log_error("periodic refresh", &e);
                    }
                    f.drain(&mut |_| {});
                    Ok(())
                });
                next_refresh = Some(Instant::now() + every);
            }
        }
        if let (Some(due), Some(every)) = (next_telemetry, telemetry) {
            if now >= due {
                let _ = shared.with(|f| {
                    f.sample_resources();
                    f.emit_periodic_telemetry();
                    Ok(())
                });
                next_telemetry = Some(due + every);
            }
        }
        if now >= next_maintenance {
            let _ = shared.with(|f| {
                if let Err(e) = f.maintain() {
                    f.log_error("maintenance", &e);
                }
                Ok(())
            });
            next_maintenance = now + MAINTENANCE_EVERY;
        }
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
        let host = CallbackHost::read(callbacks)?;
        out_arg(out_forge, "out_forge")?;
        let config = tezzeret_config::read(config)?;
        let every = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        let (refresh, telemetry) = (every(config.refresh_interval_ms), every(config.telemetry_interval_ms));
        let forge = Forge::open(config, Box::new(host))?;
        let shutdown = forge.shutdown_flag();
        let shared = Arc::new(Shared {
            forge: Mutex::new(Some(forge)),
            poisoned: AtomicBool::new(false),
            owner: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            shutdown,
        });
        let service = if refresh.is_some() || telemetry.is_some() {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name("tezzeret-service".into())
                .spawn(move || service(shared, refresh, telemetry))
                .map_err(|e| Error::io("start the forge's background thread", e))?;
            Some(thread)
        } else {
            None
        };
        *out_forge = Box::into_raw(Box::new(tezzeret_forge { shared, service }));
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
    if forge.is_null() {
        return;
    }
    let handle: &tezzeret_forge = &*forge;
    if handle.shared.owner.load(Ordering::Acquire) == thread_token() {
        return; // re-entrant: freeing the handle here would pull it from under the running call
    }
    // SAFETY: made by Box::into_raw in open, closed once by contract.
    let mut handle = Box::from_raw(forge);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // Abandon work in progress without taking the forge's lock (a job may hold it).
        handle.shared.shutdown.store(true, Ordering::Release);
        *handle.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        handle.shared.wake.notify_all();
        if let Some(thread) = handle.service.take() {
            let _ = thread.join();
        }
        let mut inner = handle.shared.forge.lock().unwrap_or_else(|p| p.into_inner()).take();
        // The last packet (final metrics, health marked closing), unless a
        // panic poisoned the handle.
        // Calls back in from the callbacks below (close included) are
        // re-entrant ones, refused like any other.
        handle.shared.owner.store(thread_token(), Ordering::Release);
        if !handle.shared.poisoned.load(Ordering::Acquire) {
            if let Some(forge) = inner.as_mut() {
                let _ = catch_unwind(AssertUnwindSafe(|| forge.emit_closing_telemetry()));
            }
        }
        // Dropping may run the host's release callback.
        drop(inner);
        handle.shared.owner.store(0, Ordering::Release);
    }));
}
