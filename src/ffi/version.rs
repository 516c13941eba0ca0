//! Library and ABI versions.
use std::ffi::c_char;

use super::status::{ffi_status, tezzeret_status};
use crate::base::version;

/// The C ABI major this header speaks; must equal the library's.
pub const TEZZERET_ABI_MAJOR: u32 = 0;
/// The C ABI minor this header speaks; must not exceed the library's.
pub const TEZZERET_ABI_MINOR: u32 = 11;

const _: () = assert!(TEZZERET_ABI_MAJOR == version::ABI_MAJOR && TEZZERET_ABI_MINOR == version::ABI_MINOR);

static VERSION_C: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();

/// The library's semantic version, e.g. "0.1.0" (static string).
#[no_mangle]
pub extern "C" fn tezzeret_version() -> *const c_char {
    VERSION_C.as_ptr() as *const c_char
}

/// The library's C ABI major version.
#[no_mangle]
pub extern "C" fn tezzeret_abi_major() -> u32 {
    version::ABI_MAJOR
}

/// The library's C ABI minor version.
#[no_mangle]
pub extern "C" fn tezzeret_abi_minor() -> u32 {
    version::ABI_MINOR
}

/// Checks that a caller built against ABI `major.minor` can use this
/// library: the major must match and the minor must not be newer.
/// Returns NULL when compatible, else a `TEZZERET_CODE_ABI_MISMATCH` status
/// whose message says which versions disagree.
#[no_mangle]
pub extern "C" fn tezzeret_check_abi(major: u32, minor: u32) -> *mut tezzeret_status {
    ffi_status(|| version::check_abi(major, minor))
}
