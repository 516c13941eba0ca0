//! Queueing, refresh, urgent compiles, resource readings, metrics and
//! health through the C ABI.
use std::ffi::c_char;

use super::args::{out_arg, read_sized, str_arg};
use super::buffer::tezzeret_buffer;
use super::forge::tezzeret_forge;
use super::status::{ffi_status, tezzeret_status};
use crate::forge::{JobStatus, ResourceReading};
use crate::base::leyline::{self, MessagePriority};
use crate::base::error::{Error, Result};

/// Job priority (Leyline `MessagePriority`): runs after every higher one.
pub const TEZZERET_PRIORITY_LOW: u32 = 1;
/// Job priority: the default of queued work.
pub const TEZZERET_PRIORITY_NORMAL: u32 = 2;
/// Job priority: ahead of normal work.
pub const TEZZERET_PRIORITY_HIGH: u32 = 3;
/// Job priority: ahead of everything else in the queue.
pub const TEZZERET_PRIORITY_CRITICAL: u32 = 4;

/// Durably queues a compile job for a descriptor of the forge's catalog at
/// `priority` (`TEZZERET_PRIORITY_*`, Leyline `MessagePriority`; equal
/// priorities run in submission order, kept across restarts). A job
/// already queued for it (e.g. by open) keeps its place in submission
/// order and takes this priority. When OK is returned the job survives a
/// crash. `*out_seq` (nullable) receives its sequence number, or 0 when a
/// current artifact already serves it.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_submit(
    forge: *mut tezzeret_forge,
    blueprint_id: *const c_char,
    priority: u32,
    out_seq: *mut u64,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: NULL or a NUL-terminated string valid for the call.
        let id = unsafe { str_arg(blueprint_id, "blueprint_id") }?;
        let priority = match MessagePriority::try_from(priority as i32) {
            Ok(MessagePriority::Unspecified) | Err(_) => {
                return Err(Error::invalid(format!("priority {priority} is not a MessagePriority (1..=4)")))
            }
            Ok(p) => p,
        };
        // SAFETY: NULL or a live forge handle.
        let seq = unsafe { tezzeret_forge::with(forge, |f| f.submit(id, priority)) }?;
        if !out_seq.is_null() {
            // SAFETY: non-NULL (checked) and writable by contract.
            unsafe { *out_seq = seq.unwrap_or(0) };
        }
        Ok(())
    })
}

/// Runs every queued job now (priority, then FIFO), on the calling thread.
/// `*out_completed` / `*out_failed` (nullable) receive the counts.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_drain(
    forge: *mut tezzeret_forge,
    out_completed: *mut u32,
    out_failed: *mut u32,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: NULL or a live forge handle.
        let reports = unsafe { tezzeret_forge::with(forge, |f| Ok(f.drain(&mut |_| {}))) }?;
        let failed = reports.iter().filter(|r| r.status == JobStatus::Failed).count() as u32;
        if !out_completed.is_null() {
            // SAFETY: non-NULL (checked) and writable by contract.
            unsafe { *out_completed = reports.len() as u32 - failed };
        }
        if !out_failed.is_null() {
            // SAFETY: non-NULL (checked) and writable by contract.
            unsafe { *out_failed = failed };
        }
        Ok(())
    })
}

/// Compiles one descriptor now, bypassing the queue order (an urgent need,
/// e.g. Tamiyo's), and returns when its artifact is durable and announced.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_compile_now(forge: *mut tezzeret_forge, blueprint_id: *const c_char) -> *mut tezzeret_status {
    // SAFETY: the arguments as this function's contract states them.
    ffi_status(|| unsafe { compile_now(forge, blueprint_id, None) })
}

/// As `tezzeret_forge_compile_now`, abandoning the compile if it runs longer
/// than `budget_ms` (a caller's deadline for this call, in place of the
/// strategy's budget; conservative mode does not stretch it). An overrun
/// returns `TEZZERET_CODE_BUDGET_EXCEEDED` and feeds the timeout breaker;
/// `budget_ms` 0 is refused.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_compile_now_within(
    forge: *mut tezzeret_forge,
    blueprint_id: *const c_char,
    budget_ms: u64,
) -> *mut tezzeret_status {
    // SAFETY: the arguments as this function's contract states them.
    ffi_status(|| unsafe { compile_now(forge, blueprint_id, Some(budget_ms)) })
}

/// An urgent compile under a budget of `budget_ms` (None: the strategy's);
/// its failure is the call's.
///
/// # Safety
/// `forge` is NULL or a live handle; `blueprint_id` NULL or a NUL-terminated string.
unsafe fn compile_now(forge: *mut tezzeret_forge, blueprint_id: *const c_char, budget_ms: Option<u64>) -> Result<()> {
    // SAFETY: NULL or a NUL-terminated string valid for the call.
    let id = unsafe { str_arg(blueprint_id, "blueprint_id") }?;
    if budget_ms == Some(0) {
        return Err(Error::invalid("budget_ms must be > 0"));
    }
    let budget = budget_ms.map(std::time::Duration::from_millis);
    // SAFETY: NULL or a live forge handle.
    let report = unsafe {
        tezzeret_forge::with(forge, |f| match budget {
            Some(budget) => f.compile_one_within(id, budget),
            None => f.compile_one(id),
        })
    }?;
    match report.error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Enumerates the host's descriptors again: new or changed ones are queued
/// durably; ones no longer enumerated are logged (their artifacts stay).
/// `*out_queued` / `*out_removed` (nullable) receive the counts.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_refresh(
    forge: *mut tezzeret_forge,
    out_queued: *mut u32,
    out_removed: *mut u32,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: NULL or a live forge handle.
        let report = unsafe { tezzeret_forge::with(forge, |f| f.refresh()) }?;
        if !out_queued.is_null() {
            // SAFETY: non-NULL (checked) and writable by contract.
            unsafe { *out_queued = report.queued.len() as u32 };
        }
        if !out_removed.is_null() {
            // SAFETY: non-NULL (checked) and writable by contract.
            unsafe { *out_removed = report.removed.len() as u32 };
        }
        Ok(())
    })
}

/// A resource reading a host reports (e.g. from its own GPU monitoring).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_resource_reading {
    /// Size of this struct as the caller knows it.
    pub struct_size: usize,
    /// GPU utilisation percent; negative = unavailable.
    pub gpu_utilisation_percent: f64,
    /// Process resident memory in bytes; 0 = unknown.
    pub rss_bytes: u64,
}

/// Applies a resource reading (NULL: the forge takes its own, through NVML
/// and /proc): GPU utilisation above the limit for the configured window
/// feeds the gpu breaker, memory above budget the memory breaker; an opened
/// breaker enters conservative mode and is announced by telemetry at once.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_report_resources(
    forge: *mut tezzeret_forge,
    reading: *const tezzeret_resource_reading,
) -> *mut tezzeret_status {
    ffi_status(|| {
        if reading.is_null() {
            // SAFETY: NULL or a live forge handle.
            unsafe {
                tezzeret_forge::with(forge, |f| {
                    f.sample_resources();
                    Ok(())
                })
            }
        } else {
            let defaults = tezzeret_resource_reading { struct_size: 0, gpu_utilisation_percent: -1.0, rss_bytes: 0 };
            // SAFETY: non-NULL and readable for its struct_size by contract.
            let raw = unsafe { read_sized(reading, defaults, std::mem::size_of::<usize>(), "reading") }?;
            if raw.gpu_utilisation_percent.is_nan() || raw.gpu_utilisation_percent > 100.0 {
                return Err(Error::invalid(format!("reading.gpu_utilisation_percent {} is not a percentage", raw.gpu_utilisation_percent)));
            }
            let reading = ResourceReading {
                gpu_utilisation_percent: (raw.gpu_utilisation_percent >= 0.0).then_some(raw.gpu_utilisation_percent),
                rss_bytes: (raw.rss_bytes > 0).then_some(raw.rss_bytes),
            };
            // SAFETY: NULL or a live forge handle.
            unsafe {
                tezzeret_forge::with(forge, |f| {
                    f.report_resources(reading);
                    Ok(())
                })
            }
        }
    })
}

/// The forge's metrics in Prometheus text exposition format.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_metrics_prometheus(
    forge: *mut tezzeret_forge,
    out_text: *mut *mut tezzeret_buffer,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_text, "out_text")?;
        // SAFETY: NULL or a live forge handle.
        let text = unsafe { tezzeret_forge::with(forge, |f| Ok(f.prometheus())) }?;
        // SAFETY: non-NULL (checked) and writable by contract.
        unsafe { *out_text = tezzeret_buffer::boxed(text.into_bytes()) };
        Ok(())
    })
}

/// Every metric as a Leyline `TelemetryPacket` (its `metrics`, no events;
/// the same points as the periodic packet and the Prometheus text).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_metrics(forge: *mut tezzeret_forge, out_packet: *mut *mut tezzeret_buffer) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_packet, "out_packet")?;
        // SAFETY: NULL or a live forge handle.
        let packet = unsafe { tezzeret_forge::with(forge, |f| Ok(f.metrics_packet())) }?;
        // SAFETY: non-NULL (checked) and writable by contract.
        unsafe { *out_packet = tezzeret_buffer::boxed(leyline::encode(&packet)) };
        Ok(())
    })
}

/// A Leyline `SystemHealth` snapshot (status, summary, indicators:
/// concurrency, queue depth, WAL, conservative mode, breakers).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_health(
    forge: *mut tezzeret_forge,
    out_health: *mut *mut tezzeret_buffer,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_health, "out_health")?;
        // SAFETY: NULL or a live forge handle.
        let health = unsafe { tezzeret_forge::with(forge, |f| Ok(f.health())) }?;
        // SAFETY: non-NULL (checked) and writable by contract.
        unsafe { *out_health = tezzeret_buffer::boxed(leyline::encode(&health)) };
        Ok(())
    })
}
