//! Argument handling shared by every entry point: strings, byte buffers,
//! out-parameters, `struct_size`-prefixed structs and opaque handles.
use std::ffi::{c_char, CStr};

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::base::error::{Error, ErrorCode, Result};
use crate::base::panic::quiet_panics;

/// Moves a value behind an opaque handle for the caller.
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Frees a handle made by [`into_handle`]; NULL is ignored. What the
/// value's drop does runs with panics contained.
///
/// # Safety
/// `ptr` is NULL or came from [`into_handle`] for the same `T` and has not
/// been freed.
pub(crate) unsafe fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: by this function's contract the box is ours to drop, once.
        let boxed = unsafe { Box::from_raw(ptr) };
        let _ = quiet_panics(|| catch_unwind(AssertUnwindSafe(|| drop(boxed))));
    }
}

/// Borrows the value behind a handle, refusing NULL with an error naming it.
///
/// # Safety
/// `ptr` is NULL or a live handle from [`into_handle`] for the same `T`,
/// not freed while the borrow lasts.
pub(crate) unsafe fn handle_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: by this function's contract ptr is NULL or valid for 'a.
    unsafe { ptr.as_ref() }.ok_or_else(|| Error::new(ErrorCode::NullArgument, format!("{name} is NULL")))
}

/// Borrows a required NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::new(ErrorCode::NullArgument, format!("{name} is NULL")));
    }
    // SAFETY: non-NULL, and NUL-terminated and valid for 'a by contract.
    unsafe { CStr::from_ptr(ptr) }
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
    // SAFETY: non-NULL and `len` readable bytes for 'a by contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Checks a required out-parameter pointer.
pub(crate) fn out_arg<T>(ptr: *mut T, name: &str) -> Result<()> {
    if ptr.is_null() {
        Err(Error::new(ErrorCode::NullArgument, format!("{name} is NULL")))
    } else {
        Ok(())
    }
}

/// Refuses a `struct_size` that no version of the struct has: every
/// layout's size is a multiple of its alignment, and any other size would
/// end inside a field (read or written half, from the caller's bytes and
/// a default's).
fn check_layout_size<T>(struct_size: usize, name: &str) -> Result<()> {
    let align = std::mem::align_of::<T>();
    if struct_size % align == 0 {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{name}.struct_size is {struct_size}, not the size of any of its layouts (each a multiple of {align} bytes); \
         initialise it with its *_init function"
    )))
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
    // SAFETY: non-NULL and starting with a readable size_t by contract.
    let caller_size = unsafe { std::ptr::read_unaligned(ptr as *const usize) };
    if caller_size < min_size {
        return Err(Error::invalid(format!(
            "{name}.struct_size is {caller_size}, smaller than the oldest supported layout ({min_size} bytes); \
             initialise it with its *_init function"
        )));
    }
    check_layout_size::<T>(caller_size, name)?;
    let mut value = defaults;
    let len = caller_size.min(std::mem::size_of::<T>());
    // SAFETY: the caller's struct has `caller_size >= len` readable bytes and
    // `value` has size_of::<T>() >= len writable ones; they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, &mut value as *mut T as *mut u8, len) };
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
    check_layout_size::<T>(struct_size, name)?;
    let len = struct_size.min(std::mem::size_of::<T>());
    // SAFETY: the caller gives `struct_size >= len` writable bytes (checked
    // non-NULL above, at least min_size >= size_of::<usize>()); `defaults`
    // has size_of::<T>() >= len readable ones.
    unsafe {
        std::ptr::copy_nonoverlapping(&defaults as *const T as *const u8, ptr as *mut u8, len);
        std::ptr::write_unaligned(ptr as *mut usize, struct_size);
    }
    Ok(())
}

/// Writes a struct into a caller's `struct_size`-prefixed memory without
/// writing past the caller's size (the caller's `struct_size` is kept).
///
/// # Safety
/// `ptr` points to at least `struct_size` writable bytes.
pub(crate) unsafe fn write_sized<T: Copy>(ptr: *mut T, value: &T, min_size: usize, name: &str) -> Result<()> {
    out_arg(ptr, name)?;
    // SAFETY: non-NULL (checked) and starting with a readable size_t by contract.
    let caller_size = unsafe { std::ptr::read_unaligned(ptr as *const usize) };
    if caller_size < min_size.max(std::mem::size_of::<usize>()) {
        return Err(Error::invalid(format!(
            "{name}.struct_size is {caller_size}, smaller than the oldest supported layout ({min_size} bytes)"
        )));
    }
    let len = caller_size.min(std::mem::size_of::<T>());
    let size_field = std::mem::size_of::<usize>();
    // SAFETY: the caller's struct has `caller_size >= len` writable bytes,
    // `value` has size_of::<T>() >= len readable ones; both skip the size field.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (value as *const T as *const u8).add(size_field),
            (ptr as *mut u8).add(size_field),
            len - size_field,
        );
    }
    Ok(())
}
