//! The C ABI (SPEC §11): a thin layer that validates and converts
//! arguments, delegates to the Rust core, and contains every panic.
//!
//! Conventions: fallible functions return `tezzeret_status*` (NULL = OK);
//! out-parameters are written only on success; structs start with
//! `struct_size`; enums cross as `uint32_t`; handles are opaque and their
//! free functions accept NULL.
#![allow(non_camel_case_types)]
// Every entry point's safety contract is its C documentation (pointers valid
// for the stated sizes and lifetimes, handles from this library); functions
// that only accept NULL or library-made pointers stay callable as safe
// `extern "C"` functions, as in rustls-ffi.
#![allow(clippy::missing_safety_doc, clippy::not_unsafe_ptr_arg_deref)]

mod buffer;
mod config;
mod forge;
mod guards;
mod host;
mod kernel;
mod runtime;
mod status;
mod version;

pub use buffer::*;
pub use config::*;
pub use forge::*;
pub use guards::*;
pub use host::*;
pub use kernel::*;
pub use runtime::*;
pub use status::*;
pub use version::*;

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{Error, ErrorCode, Result};

/// Runs a C ABI body: errors become a status, a panic becomes an
/// internal-error status (never unwinding into the host).
pub(crate) fn ffi_status(body: impl FnOnce() -> Result<()>) -> *mut tezzeret_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(error)) => tezzeret_status::boxed(&error),
        Err(panic) => tezzeret_status::boxed(&panic_error(&panic)),
    }
}

/// Runs an infallible C ABI body, returning `fallback` if it panics.
pub(crate) fn ffi_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The error a contained panic turns into.
pub(crate) fn panic_error(panic: &Box<dyn std::any::Any + Send>) -> Error {
    Error::new(ErrorCode::Internal, format!("internal error (contained panic): {}", crate::panic_message(panic)))
}

/// Borrows a required NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::new(ErrorCode::NullArgument, format!("{name} is NULL")));
    }
    CStr::from_ptr(ptr)
        .to_str()
        .map_err(|e| Error::new(ErrorCode::InvalidUtf8, format!("{name} is not valid UTF-8: {e}")))
}

/// Borrows a byte buffer argument; NULL is allowed only with length 0.
///
/// # Safety
/// `ptr` is NULL or points to `len` readable bytes valid for `'a`.
pub(crate) unsafe fn bytes_arg<'a>(ptr: *const u8, len: usize, name: &str) -> Result<&'a [u8]> {
    if ptr.is_null() {
        if len == 0 {
            return Ok(&[]);
        }
        return Err(Error::new(ErrorCode::NullArgument, format!("{name} is NULL with length {len}")));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// Checks a required out-parameter pointer.
pub(crate) fn out_arg<T>(ptr: *mut T, name: &str) -> Result<()> {
    if ptr.is_null() {
        Err(Error::new(ErrorCode::NullArgument, format!("{name} is NULL")))
    } else {
        Ok(())
    }
}

/// Copies a caller's `struct_size`-prefixed struct into a defaulted one:
/// fields beyond the caller's size keep their defaults, and nothing past
/// the caller's size is read.
///
/// # Safety
/// `ptr` is NULL or points to at least `struct_size` readable bytes, the
/// first field being a `size_t struct_size`.
pub(crate) unsafe fn read_sized<T: Copy>(ptr: *const T, defaults: T, min_size: usize, name: &str) -> Result<T> {
    if ptr.is_null() {
        return Err(Error::new(ErrorCode::NullArgument, format!("{name} is NULL")));
    }
    let caller_size = std::ptr::read_unaligned(ptr as *const usize);
    if caller_size < min_size {
        return Err(Error::invalid(format!(
            "{name}.struct_size is {caller_size}, smaller than the oldest supported layout ({min_size} bytes); \
             initialise it with its *_init function"
        )));
    }
    let mut value = defaults;
    let len = caller_size.min(std::mem::size_of::<T>());
    std::ptr::copy_nonoverlapping(ptr as *const u8, &mut value as *mut T as *mut u8, len);
    Ok(value)
}

/// Fills a caller's `struct_size`-prefixed struct with `defaults` (whose
/// `struct_size` becomes the caller's), never writing past `struct_size`.
///
/// # Safety
/// `ptr` is NULL or points to `struct_size` writable bytes.
pub(crate) unsafe fn init_sized<T: Copy>(ptr: *mut T, defaults: T, struct_size: usize, min_size: usize, name: &str) -> Result<()> {
    out_arg(ptr, name)?;
    if struct_size < min_size {
        return Err(Error::invalid(format!(
            "struct_size {struct_size} is smaller than the oldest {name} layout ({min_size} bytes)"
        )));
    }
    let len = struct_size.min(std::mem::size_of::<T>());
    std::ptr::copy_nonoverlapping(&defaults as *const T as *const u8, ptr as *mut u8, len);
    std::ptr::write_unaligned(ptr as *mut usize, struct_size);
    Ok(())
}

/// Writes a struct into a caller's `struct_size`-prefixed memory without
/// writing past the caller's size (the caller's `struct_size` is kept).
///
/// # Safety
/// `ptr` points to at least `struct_size` writable bytes.
pub(crate) unsafe fn write_sized<T: Copy>(ptr: *mut T, value: &T, min_size: usize, name: &str) -> Result<()> {
    out_arg(ptr, name)?;
    let caller_size = std::ptr::read_unaligned(ptr as *const usize);
    if caller_size < min_size {
        return Err(Error::invalid(format!(
            "{name}.struct_size is {caller_size}, smaller than the oldest supported layout ({min_size} bytes)"
        )));
    }
    let len = caller_size.min(std::mem::size_of::<T>());
    let size_field = std::mem::size_of::<usize>();
    std::ptr::copy_nonoverlapping(
        (value as *const T as *const u8).add(size_field),
        (ptr as *mut u8).add(size_field),
        len - size_field,
    );
    Ok(())
}
