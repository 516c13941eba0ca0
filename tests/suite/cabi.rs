//! Helpers for driving the C ABI from the suite, as a C host would.
use std::ffi::{c_void, CStr, CString};
use std::path::Path;
use std::ptr::null_mut;

use tezzeret::ffi::*;

/// Takes a status: returns (code, message) and frees it.
pub fn take(status: *mut tezzeret_status) -> (u32, String) {
    let code = tezzeret_status_code(status);
    // SAFETY: the message lives as long as the status.
    let message = unsafe { CStr::from_ptr(tezzeret_status_message(status)) }.to_string_lossy().into_owned();
    tezzeret_status_free(status);
    (code, message)
}

/// Asserts a call succeeded (NULL status), naming the caller's line if not.
#[track_caller]
pub fn ok(status: *mut tezzeret_status) {
    let (code, message) = take(status);
    assert_eq!(code, TEZZERET_CODE_OK, "{message}");
}

/// Callbacks with every function of a host given (`None` = not given).
pub fn host_callbacks(
    user_data: *mut c_void,
    enumerate: tezzeret_enumerate_fn,
    catalog_update: tezzeret_bytes_fn,
    telemetry: tezzeret_bytes_fn,
    release: tezzeret_release_fn,
) -> tezzeret_host_callbacks {
    // SAFETY: a plain C struct; init fills it.
    let mut cb: tezzeret_host_callbacks = unsafe { std::mem::zeroed() };
    ok(unsafe { tezzeret_host_callbacks_init(&mut cb, std::mem::size_of::<tezzeret_host_callbacks>()) });
    cb.user_data = user_data;
    cb.enumerate = enumerate;
    cb.catalog_update = catalog_update;
    cb.telemetry = telemetry;
    cb.release = release;
    cb
}

/// Opens a forge on `dir` through the C ABI (CPU, Fast strategy, the
/// config then adjusted by `tune`) and asserts it opened.
pub fn open_forge(dir: &Path, callbacks: &tezzeret_host_callbacks, tune: impl FnOnce(&mut tezzeret_config)) -> *mut tezzeret_forge {
    let path = CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: config and callbacks are initialised; the path outlives the call.
    unsafe {
        let mut config: tezzeret_config = std::mem::zeroed();
        ok(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()));
        config.state_dir = path.as_ptr();
        config.device = TEZZERET_DEVICE_CPU;
        config.strategy = TEZZERET_STRATEGY_FAST;
        tune(&mut config);
        let mut forge = null_mut();
        ok(tezzeret_forge_open(&config, callbacks, &mut forge));
        forge
    }
}

/// A raw forge handle shared with scoped threads (the forge is thread-safe).
#[derive(Clone, Copy)]
pub struct Handle(pub *mut tezzeret_forge);
// SAFETY: the C ABI allows a forge handle to be used from any thread.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    /// The pointer (a method, so that closures capture the whole handle).
    pub fn ptr(self) -> *mut tezzeret_forge {
        self.0
    }
}
