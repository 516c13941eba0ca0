//! Byte buffers handed out by the library.
use super::ffi_value;

/// Bytes owned by the library (e.g. a JSON document); read them with
/// `tezzeret_buffer_data`/`tezzeret_buffer_len`, free with `tezzeret_buffer_free`.
pub struct tezzeret_buffer {
    bytes: Vec<u8>,
}

impl tezzeret_buffer {
    pub(crate) fn boxed(bytes: Vec<u8>) -> *mut tezzeret_buffer {
        Box::into_raw(Box::new(tezzeret_buffer { bytes }))
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
    if !buffer.is_null() {
        // SAFETY: made by Box::into_raw in `boxed`, freed once by contract.
        ffi_value((), || drop(unsafe { Box::from_raw(buffer) }));
    }
}
