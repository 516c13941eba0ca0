//! A TorchScript module owned by Rust: tracing, the shim's passes
//! (freeze, optimize_for_inference), serialisation, loading, forward.
//!
//! tch's `CModule` hides its raw pointer, which the shim needs, so this
//! wrapper drives libtch's C API (torch-sys) directly. Every libtch call is
//! followed by a check of its thread-local error slot.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Tensor};
use torch_sys::{CModule_, C_tensor};

use crate::base::error::{Error, ErrorCode, Result};

extern "C" {
    fn tz_shim_freeze(module: *const CModule_, err: *mut *mut c_char) -> *mut CModule_;
    fn tz_shim_optimize_for_inference(module: *const CModule_, err: *mut *mut c_char) -> *mut CModule_;
    fn tz_shim_save(
        module: *const CModule_,
        ctx: *mut c_void,
        write: extern "C" fn(*mut c_void, *const c_char, usize),
        err: *mut *mut c_char,
    );
    fn tz_shim_set_graph_executor_optimize(enabled: c_int, err: *mut *mut c_char);
    fn tz_shim_throw_for_test(err: *mut *mut c_char);
}

/// Takes a malloc'd error message (NULL = no error) and frees it.
fn take_message(raw: *mut c_char) -> Option<String> {
    if raw.is_null() {
        return None;
    }
    // SAFETY: non-NULL messages are NUL-terminated strings from malloc/strdup.
    let text = unsafe { CStr::from_ptr(raw) }.to_string_lossy().into_owned();
    unsafe { libc::free(raw.cast()) };
    Some(text)
}

/// Turns libtch's pending error (if any) into an `Err`.
fn libtch_result(what: &str) -> Result<()> {
    // SAFETY: reads and clears libtch's thread-local error slot.
    match take_message(unsafe { torch_sys::get_and_reset_last_err() }) {
        None => Ok(()),
        Some(message) => Err(Error::new(ErrorCode::CompileFailed, format!("{what}: {message}"))),
    }
}

/// Runs a shim call that reports failure through an `err` out-parameter.
fn shim_call<T>(what: &str, call: impl FnOnce(*mut *mut c_char) -> T) -> Result<T> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let value = call(&mut err);
    match take_message(err) {
        None => Ok(value),
        Some(message) => Err(Error::new(ErrorCode::CompileFailed, format!("{what}: {message}"))),
    }
}

/// An owned `torch::jit::Module`.
pub struct ScriptModule {
    raw: *mut CModule_,
}

// SAFETY: a torch::jit::Module may be moved between threads; callers do not
// share one module between threads without synchronisation (not Sync).
unsafe impl Send for ScriptModule {}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by libtch or the shim with `new`.
        unsafe { torch_sys::atm_free(self.raw) };
        let _ = libtch_result("free");
    }
}

impl ScriptModule {
    fn from_raw(raw: *mut CModule_, what: &str) -> Result<Self> {
        libtch_result(what)?;
        if raw.is_null() {
            return Err(Error::new(ErrorCode::CompileFailed, format!("{what}: libtorch returned no module")));
        }
        Ok(ScriptModule { raw })
    }

    /// Traces `forward` on `inputs` into a TorchScript module whose `forward`
    /// method replays the recorded graph. Captured tensors become constants.
    /// `name` becomes the TorchScript class name, made a valid identifier.
    pub fn trace(name: &str, inputs: &[Tensor], forward: &dyn Fn(&[Tensor]) -> Tensor) -> Result<Self> {
        let name = CString::new(class_name(name)).expect("identifier characters only");
        let method = CString::new("forward").expect("static");
        let raw_inputs: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        // SAFETY: the input pointers stay alive for the call.
        let raw = unsafe {
            torch_sys::atm_create_for_tracing(name.as_ptr(), raw_inputs.as_ptr(), raw_inputs.len() as c_int)
        };
        let module = Self::from_raw(raw, "start tracing")?;
        let traced = catch_unwind(AssertUnwindSafe(|| forward(inputs)));
        let outputs: Vec<*mut C_tensor> = match &traced {
            Ok(output) => vec![output.as_ptr() as *mut C_tensor],
            Err(_) => Vec::new(),
        };
        // SAFETY: always ends the trace (also after a panic, with no outputs),
        // so the thread-local tracing state is never left behind.
        unsafe {
            torch_sys::atm_end_tracing(module.raw, method.as_ptr(), outputs.as_ptr(), outputs.len() as c_int)
        };
        let ended = libtch_result("end tracing");
        match traced {
            Ok(_) => ended.map(|_| module),
            Err(panic) => Err(Error::new(
                ErrorCode::CompileFailed,
                format!("forward failed while tracing: {}", crate::base::error::panic_message(&panic)),
            )),
        }
    }

    /// Loads a serialised module onto `device`.
    pub fn load(bytes: &[u8], device: Device) -> Result<Self> {
        // SAFETY: the buffer outlives the call; libtch copies what it keeps.
        let raw = unsafe {
            torch_sys::atm_load_str_on_device(bytes.as_ptr() as *const c_char, bytes.len(), device_index(device))
        };
        Self::from_raw(raw, "load TorchScript archive")
    }

    /// Switches the module to inference mode.
    pub fn eval(&mut self) -> Result<()> {
        // SAFETY: valid module.
        unsafe { torch_sys::atm_eval(self.raw) };
        libtch_result("eval")
    }

    /// torch::jit::freeze: inlines weights and simplifies the graph.
    pub fn freeze(&self) -> Result<Self> {
        // SAFETY: valid module; the shim catches every C++ exception.
        let raw = shim_call("freeze", |err| unsafe { tz_shim_freeze(self.raw, err) })?;
        Self::from_raw(raw, "freeze")
    }

    /// torch::jit::optimize_for_inference (freezes, fuses, MKLDNN layouts).
    pub fn optimize_for_inference(&self) -> Result<Self> {
        // SAFETY: as in `freeze`.
        let raw = shim_call("optimize_for_inference", |err| unsafe { tz_shim_optimize_for_inference(self.raw, err) })?;
        Self::from_raw(raw, "optimize_for_inference")
    }

    /// Serialises the module as a TorchScript zip archive.
    pub fn save_to_vec(&self) -> Result<Vec<u8>> {
        extern "C" fn append(ctx: *mut c_void, data: *const c_char, len: usize) {
            // SAFETY: ctx is the &mut Vec<u8> passed below; data has len bytes.
            let out = unsafe { &mut *(ctx as *mut Vec<u8>) };
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(data as *const u8, len) });
        }
        let mut out = Vec::new();
        // SAFETY: `out` outlives the call.
        shim_call("save", |err| unsafe {
            tz_shim_save(self.raw, &mut out as *mut Vec<u8> as *mut c_void, append, err)
        })?;
        Ok(out)
    }

    /// Runs `forward` on tensor inputs, expecting one tensor out.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Tensor> {
        let raw_inputs: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        // SAFETY: valid module and inputs.
        let raw = unsafe { torch_sys::atm_forward(self.raw, raw_inputs.as_ptr(), raw_inputs.len() as c_int) };
        libtch_result("forward")?;
        if raw.is_null() {
            return Err(Error::new(ErrorCode::CompileFailed, "forward returned no tensor"));
        }
        // SAFETY: libtch returned a fresh owned tensor.
        Ok(unsafe { Tensor::from_ptr(raw) })
    }
}

/// A TorchScript class name for `name`: ASCII letters, digits and `_`,
/// not starting with a digit (an archive with any other name does not load).
fn class_name(name: &str) -> String {
    let cleaned: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("Blueprint_{cleaned}")
}

/// libtch's device encoding: -1 for the CPU, the ordinal for CUDA.
fn device_index(device: Device) -> c_int {
    match device {
        Device::Cuda(index) => index as c_int,
        _ => -1,
    }
}

/// Enables or disables graph-executor optimisation on this thread.
pub fn set_graph_executor_optimize(enabled: bool) -> Result<()> {
    // SAFETY: the shim catches every C++ exception.
    shim_call("set_graph_executor_optimize", |err| unsafe {
        tz_shim_set_graph_executor_optimize(c_int::from(enabled), err)
    })
}

/// Makes the shim throw a C++ exception; proves it never unwinds into Rust.
pub fn shim_exception_self_test() -> Result<()> {
    // SAFETY: the shim catches the exception it throws.
    shim_call("self-test", |err| unsafe { tz_shim_throw_for_test(err) })
}
