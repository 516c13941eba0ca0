//! Byte buffers handed out by the library.
use super::args::{free_handle, into_handle};
use super::status::ffi_value;

/// Bytes owned by the library (e.g. a JSON document); read them with
/// `tezzeret_buffer_data`/`tezzeret_buffer_len`, free with `tezzeret_buffer_free`.
pub struct tezzeret_buffer {
    bytes: Vec<u8>,
}

impl tezzeret_buffer {
    pub(crate) fn boxed(bytes: Vec<u8>) -> *mut tezzeret_buffer {
        into_handle(tezzeret_buffer { bytes })
    }
}

/// Pointer to the buffer's bytes (valid until the buffer is freed); NULL for NULL.
#[no_mangle]
pub extern "C" fn tezzeret_buffer_data(buffer: *const tezzeret_buffer) -> *const u8 {
    // SAFETY: NULL or a live buffer made by this library.
    ffi_value(std::ptr::null(), || unsafe { buffer.as_ref() }.map_or(std::ptr::null(), |b| b.bytes.as_ptr()))
}

/// Number of bytes in the buffer; 0 for NULL.
#[no_mangle]
pub extern "C" fn tezzeret_buffer_len(buffer: *const tezzeret_buffer) -> usize {
    // SAFETY: NULL or a live buffer made by this library.
    ffi_value(0, || unsafe { buffer.as_ref() }.map_or(0, |b| b.bytes.len()))
}

/// Frees a buffer. NULL is accepted and ignored.
#[no_mangle]
pub extern "C" fn tezzeret_buffer_free(buffer: *mut tezzeret_buffer) {
    // SAFETY: NULL or a buffer made by `boxed`, freed once by contract.
    unsafe { free_handle(buffer) }
}
