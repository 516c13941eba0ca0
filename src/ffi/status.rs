//! Status objects: the result of every fallible C ABI call.
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::args::{free_handle, into_handle};
use crate::base::error::{Error, ErrorCode, Result};
use crate::base::panic::quiet_panics;
use crate::forge::service::panic_error;

/// Runs a C ABI body: errors become a status, a panic becomes an
/// internal-error status (never unwinding into the host, never printed on
/// the host's stderr: the message is in the status).
pub(crate) fn ffi_status(body: impl FnOnce() -> Result<()>) -> *mut tezzeret_status {
    match quiet_panics(|| catch_unwind(AssertUnwindSafe(body))) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(error)) => tezzeret_status::boxed(&error),
        Err(panic) => tezzeret_status::boxed(&panic_error(&*panic)),
    }
}

/// Runs an infallible C ABI body, returning `fallback` if it panics.
pub(crate) fn ffi_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    quiet_panics(|| catch_unwind(AssertUnwindSafe(body))).unwrap_or(fallback)
}

/// Success (never carried by a status object: success is NULL).
pub const TEZZERET_CODE_OK: u32 = 0;
/// An argument is invalid (wrong value, out of range, wrong size).
pub const TEZZERET_CODE_INVALID_ARGUMENT: u32 = 1;
/// A required pointer argument was NULL.
pub const TEZZERET_CODE_NULL_ARGUMENT: u32 = 2;
/// A string argument was not valid UTF-8.
pub const TEZZERET_CODE_INVALID_UTF8: u32 = 3;
/// Bytes could not be decoded (protobuf, JSON, on-disk format).
pub const TEZZERET_CODE_MALFORMED: u32 = 4;
/// The caller's header speaks an incompatible ABI.
pub const TEZZERET_CODE_ABI_MISMATCH: u32 = 5;
/// The state directory is held by another forge.
pub const TEZZERET_CODE_STATE_LOCKED: u32 = 6;
/// A named thing (blueprint, artifact, parameter) does not exist.
pub const TEZZERET_CODE_NOT_FOUND: u32 = 7;
/// The blueprint is quarantine-only and quarantine compilation is off.
pub const TEZZERET_CODE_QUARANTINED: u32 = 8;
/// Compilation or validation failed.
pub const TEZZERET_CODE_COMPILE_FAILED: u32 = 9;
/// An operating-system I/O operation failed.
pub const TEZZERET_CODE_IO: u32 = 10;
/// Persistent state is corrupt.
pub const TEZZERET_CODE_CORRUPT: u32 = 11;
/// The handle was poisoned by an earlier internal error; close it.
pub const TEZZERET_CODE_POISONED: u32 = 12;
/// Internal error (a contained panic or broken invariant).
pub const TEZZERET_CODE_INTERNAL: u32 = 13;
/// A time or memory budget was exceeded.
pub const TEZZERET_CODE_BUDGET_EXCEEDED: u32 = 14;
/// Not supported in this build or on this machine.
pub const TEZZERET_CODE_UNSUPPORTED: u32 = 15;

// The codes are the numeric values of ErrorCode; keep them in step.
const _: () = assert!(
    TEZZERET_CODE_INVALID_ARGUMENT == ErrorCode::InvalidArgument as u32 &&
    TEZZERET_CODE_NULL_ARGUMENT == ErrorCode::NullArgument as u32 &&
    TEZZERET_CODE_INVALID_UTF8 == ErrorCode::InvalidUtf8 as u32 &&
    TEZZERET_CODE_MALFORMED == ErrorCode::Malformed as u32 &&
    TEZZERET_CODE_ABI_MISMATCH == ErrorCode::AbiMismatch as u32 &&
    TEZZERET_CODE_STATE_LOCKED == ErrorCode::StateLocked as u32 &&
    TEZZERET_CODE_NOT_FOUND == ErrorCode::NotFound as u32 &&
    TEZZERET_CODE_QUARANTINED == ErrorCode::Quarantined as u32 &&
    TEZZERET_CODE_COMPILE_FAILED == ErrorCode::CompileFailed as u32 &&
    TEZZERET_CODE_IO == ErrorCode::Io as u32 &&
    TEZZERET_CODE_CORRUPT == ErrorCode::Corrupt as u32 &&
    TEZZERET_CODE_POISONED == ErrorCode::Poisoned as u32 &&
    TEZZERET_CODE_INTERNAL == ErrorCode::Internal as u32 &&
    TEZZERET_CODE_BUDGET_EXCEEDED == ErrorCode::BudgetExceeded as u32 &&
    TEZZERET_CODE_UNSUPPORTED == ErrorCode::Unsupported as u32
);

/// The outcome of a failed call: a code (`TEZZERET_CODE_*`) and a UTF-8
/// message naming the problem. Owned by the caller; free it with
/// `tezzeret_status_free`.
pub struct tezzeret_status {
    code: u32,
    message: CString,
}

impl tezzeret_status {
    /// Boxes an error into a status pointer for the caller.
    pub(crate) fn boxed(error: &Error) -> *mut tezzeret_status {
        let message = CString::new(error.message().replace('\0', "?")).expect("NULs replaced");
        into_handle(tezzeret_status { code: error.code() as u32, message })
    }
}

/// The status's code; `TEZZERET_CODE_OK` for NULL.
#[no_mangle]
pub extern "C" fn tezzeret_status_code(status: *const tezzeret_status) -> u32 {
    // SAFETY: NULL or a status made by this library and not yet freed.
    ffi_value(TEZZERET_CODE_INTERNAL, || unsafe { status.as_ref() }.map_or(TEZZERET_CODE_OK, |s| s.code))
}

/// The status's message ("ok" for NULL). The string lives as long as the status.
#[no_mangle]
pub extern "C" fn tezzeret_status_message(status: *const tezzeret_status) -> *const c_char {
    const OK: &[u8] = b"ok\0";
    ffi_value(OK.as_ptr() as *const c_char, || {
        // SAFETY: NULL or a live status made by this library.
        unsafe { status.as_ref() }.map_or(OK.as_ptr() as *const c_char, |s| s.message.as_ptr())
    })
}

/// Frees a status. NULL is accepted and ignored.
#[no_mangle]
pub extern "C" fn tezzeret_status_free(status: *mut tezzeret_status) {
    // SAFETY: NULL or a status made by `boxed`, freed once by contract.
    unsafe { free_handle(status) }
}
