//! Running kernels through the C ABI, tensors as DLPack views:
//! for hosts that do not link libtorch themselves.
use std::ffi::{c_char, c_void};

use tch::{Device, Kind, Tensor};

use super::args::{free_handle, handle_ref, into_handle, out_arg, str_arg};
use super::forge::tezzeret_forge;
use super::status::{ffi_status, ffi_value, tezzeret_status};
use crate::forge::kernel::Kernel;
use crate::base::error::{Error, ErrorCode, Result};

/// DLPack device type: CPU (`kDLCPU`).
pub const TEZZERET_DL_CPU: i32 = 1;
/// DLPack device type: CUDA (`kDLCUDA`).
pub const TEZZERET_DL_CUDA: i32 = 2;
/// DLPack dtype code: signed integer (`kDLInt`).
pub const TEZZERET_DL_INT: u8 = 0;
/// DLPack dtype code: unsigned integer (`kDLUInt`).
pub const TEZZERET_DL_UINT: u8 = 1;
/// DLPack dtype code: IEEE float (`kDLFloat`).
pub const TEZZERET_DL_FLOAT: u8 = 2;
/// DLPack dtype code: bfloat16 (`kDLBfloat`).
pub const TEZZERET_DL_BFLOAT: u8 = 4;
/// DLPack dtype code: bool (`kDLBool`).
pub const TEZZERET_DL_BOOL: u8 = 6;

/// `DLDevice`, layout-identical to DLPack's.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_dl_device {
    /// `TEZZERET_DL_CPU` or `TEZZERET_DL_CUDA`.
    pub device_type: i32,
    /// Device ordinal.
    pub device_id: i32,
}

/// `DLDataType`, layout-identical to DLPack's.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_dl_datatype {
    /// `TEZZERET_DL_FLOAT`, `..._INT`, ...
    pub code: u8,
    /// Bits per element.
    pub bits: u8,
    /// Vector lanes (1).
    pub lanes: u16,
}

/// `DLTensor`, layout-identical to DLPack's: a host may pass a `DLTensor*`
/// cast to `tezzeret_dltensor*`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_dltensor {
    /// Start of the data (plus `byte_offset`).
    pub data: *mut c_void,
    /// Where the data lives.
    pub device: tezzeret_dl_device,
    /// Number of dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: tezzeret_dl_datatype,
    /// `ndim` sizes.
    pub shape: *mut i64,
    /// `ndim` strides in elements; NULL = compact row-major.
    pub strides: *mut i64,
    /// Offset of the first element from `data`, in bytes.
    pub byte_offset: u64,
}

/// A loaded kernel. Runs may come from several threads (serialised).
pub struct tezzeret_kernel {
    kernel: Kernel,
}

/// A tensor produced by a kernel run, owned by the library; read it through
/// `tezzeret_tensor_dlpack`, free it with `tezzeret_tensor_free`.
pub struct tezzeret_tensor {
    _tensor: Tensor,
    _shape: Vec<i64>,
    _strides: Vec<i64>,
    view: tezzeret_dltensor,
}

fn kind_of(dtype: tezzeret_dl_datatype) -> Result<Kind> {
    if dtype.lanes != 1 {
        return Err(Error::invalid(format!("dtype with {} lanes is not supported", dtype.lanes)));
    }
    Ok(match (dtype.code, dtype.bits) {
        (TEZZERET_DL_FLOAT, 32) => Kind::Float,
        (TEZZERET_DL_FLOAT, 64) => Kind::Double,
        (TEZZERET_DL_FLOAT, 16) => Kind::Half,
        (TEZZERET_DL_BFLOAT, 16) => Kind::BFloat16,
        (TEZZERET_DL_INT, 64) => Kind::Int64,
        (TEZZERET_DL_INT, 32) => Kind::Int,
        (TEZZERET_DL_INT, 16) => Kind::Int16,
        (TEZZERET_DL_INT, 8) => Kind::Int8,
        (TEZZERET_DL_UINT, 8) => Kind::Uint8,
        (TEZZERET_DL_BOOL, 8) => Kind::Bool,
        (code, bits) => return Err(Error::invalid(format!("DLPack dtype code {code} with {bits} bits is not supported"))),
    })
}

fn datatype_of(kind: Kind) -> tezzeret_dl_datatype {
    let (code, bits) = match kind {
        Kind::Double => (TEZZERET_DL_FLOAT, 64),
        Kind::Half => (TEZZERET_DL_FLOAT, 16),
        Kind::BFloat16 => (TEZZERET_DL_BFLOAT, 16),
        Kind::Int64 => (TEZZERET_DL_INT, 64),
        Kind::Int => (TEZZERET_DL_INT, 32),
        Kind::Int16 => (TEZZERET_DL_INT, 16),
        Kind::Int8 => (TEZZERET_DL_INT, 8),
        Kind::Uint8 => (TEZZERET_DL_UINT, 8),
        Kind::Bool => (TEZZERET_DL_BOOL, 8),
        _ => (TEZZERET_DL_FLOAT, 32),
    };
    tezzeret_dl_datatype { code, bits, lanes: 1 }
}

/// A tensor viewing (not copying) a caller's DLPack tensor.
///
/// # Safety
/// The view's data, shape and strides must be valid for the call.
unsafe fn view_of(t: &tezzeret_dltensor, index: usize) -> Result<Tensor> {
    let what = |m: &str| Error::invalid(format!("inputs[{index}]: {m}"));
    if t.ndim < 0 || t.ndim > 8 {
        return Err(what(&format!("ndim {} is out of range (0..=8)", t.ndim)));
    }
    if t.data.is_null() || (t.ndim > 0 && t.shape.is_null()) {
        return Err(Error::new(ErrorCode::NullArgument, format!("inputs[{index}]: data or shape is NULL")));
    }
    let device = match t.device.device_type {
        TEZZERET_DL_CPU => Device::Cpu,
        TEZZERET_DL_CUDA => Device::Cuda(t.device.device_id.max(0) as usize),
        other => return Err(what(&format!("device type {other} is not supported"))),
    };
    let kind = kind_of(t.dtype).map_err(|e| e.context(format!("inputs[{index}]")))?;
    let ndim = t.ndim as usize;
    // SAFETY: ndim sizes at a non-NULL shape (checked), valid for the call.
    let shape = if ndim == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(t.shape, ndim) } };
    if shape.iter().any(|d| *d < 0) {
        return Err(what(&format!("negative size in shape {shape:?}")));
    }
    let strides = if t.strides.is_null() {
        crate::build::guard_spec::contiguous_strides(shape)
    } else {
        // SAFETY: ndim strides at a non-NULL strides pointer, valid for the call.
        unsafe { std::slice::from_raw_parts(t.strides, ndim) }.to_vec()
    };
    // SAFETY: data + byte_offset is the tensor's first element, inside the
    // caller's allocation, valid for the call; the view does not outlive it.
    let data = unsafe { (t.data as *const u8).add(t.byte_offset as usize) };
    // SAFETY: shape and strides describe memory the caller owns for the call.
    unsafe { Tensor::f_from_blob(data, shape, &strides, kind, device) }.map_err(|e| what(&e.to_string()))
}

/// The bytes a tensor's elements span, as an address range.
fn span(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    let last: i64 = t.size().iter().zip(t.stride()).map(|(n, s)| (n - 1).max(0) * s.abs()).sum();
    let element = t.kind().elt_size_in_bytes();
    (start, start + (last as usize + 1) * element)
}

/// Whether two tensors' memory overlaps.
fn overlaps(a: &Tensor, b: &Tensor) -> bool {
    if a.numel() == 0 || b.numel() == 0 {
        return false;
    }
    let ((a0, a1), (b0, b1)) = (span(a), span(b));
    a0 < b1 && b0 < a1
}

/// Loads a blueprint's current artifact as a kernel: the file is hashed and,
/// with trusted keys configured, its signature verified. Free the kernel
/// with `tezzeret_kernel_free` (it may outlive the forge).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_forge_load_kernel(
    forge: *mut tezzeret_forge,
    blueprint_id: *const c_char,
    out_kernel: *mut *mut tezzeret_kernel,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_kernel, "out_kernel")?;
        // SAFETY: NULL or a NUL-terminated string valid for the call.
        let id = unsafe { str_arg(blueprint_id, "blueprint_id") }?;
        // SAFETY: NULL or a live forge handle.
        let kernel = unsafe { tezzeret_forge::with(forge, |f| f.load_kernel(id)) }?;
        // SAFETY: out_kernel is non-NULL (checked) and writable by contract.
        unsafe { *out_kernel = into_handle(tezzeret_kernel { kernel }) };
        Ok(())
    })
}

/// Runs a kernel on DLPack inputs (borrowed for the call, not copied),
/// after checking them against its guards (a mismatch is
/// `TEZZERET_CODE_INVALID_ARGUMENT` naming the input and dimension). The
/// result is a new library-owned tensor in `*out_tensor`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_kernel_run(
    kernel: *const tezzeret_kernel,
    inputs: *const tezzeret_dltensor,
    input_count: usize,
    out_tensor: *mut *mut tezzeret_tensor,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_tensor, "out_tensor")?;
        // SAFETY: the arguments as this function's contract states them.
        let result = unsafe { run_kernel(kernel, inputs, input_count, Layout::Compact) }?;
        // SAFETY: out_tensor is non-NULL (checked) and writable by contract.
        unsafe { *out_tensor = into_handle(result) };
        Ok(())
    })
}

/// As `tezzeret_kernel_run`, handing the result over at once as a DLPack
/// `DLManagedTensor` (see `tezzeret_tensor_into_dlpack`): one call for
/// hosts that pass results on to a DLPack consumer (PyTorch, numpy). The
/// result keeps the layout the module computed it in (its `strides` say
/// which), where `tezzeret_kernel_run` makes it compact row-major.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_kernel_run_dlpack(
    kernel: *const tezzeret_kernel,
    inputs: *const tezzeret_dltensor,
    input_count: usize,
    out_managed: *mut *mut tezzeret_dlmanaged_tensor,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_managed, "out_managed")?;
        // SAFETY: the arguments as this function's contract states them.
        let result = unsafe { run_kernel(kernel, inputs, input_count, Layout::AsComputed) }?;
        // SAFETY: out_managed is non-NULL (checked) and writable by contract;
        // the handle is a fresh one from into_handle.
        unsafe { *out_managed = managed(into_handle(result)) };
        Ok(())
    })
}

/// The memory layout of a kernel's result.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Compact row-major (copied if the module computed another).
    Compact,
    /// As the module computed it (the strides describe it).
    AsComputed,
}

/// Checks and runs a kernel on borrowed DLPack inputs; the result owns its memory.
///
/// # Safety
/// `kernel` is NULL or live; `inputs` holds `input_count` views valid for the call.
unsafe fn run_kernel(
    kernel: *const tezzeret_kernel,
    inputs: *const tezzeret_dltensor,
    input_count: usize,
    layout: Layout,
) -> Result<tezzeret_tensor> {
    // SAFETY: NULL or a live kernel handle.
    let kernel = unsafe { handle_ref(kernel, "kernel") }?;
    if inputs.is_null() && input_count > 0 {
        return Err(Error::new(ErrorCode::NullArgument, "inputs is NULL"));
    }
    // SAFETY: input_count readable tensors at inputs (non-NULL when input_count > 0).
    let given = if input_count == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(inputs, input_count) } };
    let views = given
        .iter()
        .enumerate()
        // SAFETY: each DLTensor's pointers are valid for the call, by contract.
        .map(|(i, t)| unsafe { view_of(t, i) })
        .collect::<Result<Vec<Tensor>>>()?;
    let output = kernel.kernel.run(&views)?;
    let output = if layout == Layout::Compact { output.contiguous() } else { output };
    // The inputs are borrowed for this call only: a result that is (or
    // views) one of them — an identity block, an in-place op — is copied
    // into memory of its own.
    let output = if views.iter().any(|v| overlaps(v, &output)) { output.copy() } else { output };
    let mut shape = output.size();
    let mut strides = output.stride();
    let view = tezzeret_dltensor {
        data: output.data_ptr(),
        device: match output.device() {
            Device::Cuda(i) => tezzeret_dl_device { device_type: TEZZERET_DL_CUDA, device_id: i as i32 },
            _ => tezzeret_dl_device { device_type: TEZZERET_DL_CPU, device_id: 0 },
        },
        ndim: shape.len() as i32,
        dtype: datatype_of(output.kind()),
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    };
    // The view's shape and strides point into these vectors' heap buffers, which move with them.
    Ok(tezzeret_tensor { _tensor: output, _shape: shape, _strides: strides, view })
}

/// The DLPack view of a result tensor (valid until `tezzeret_tensor_free`); NULL for NULL.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_tensor_dlpack(tensor: *const tezzeret_tensor) -> *const tezzeret_dltensor {
    // SAFETY: NULL or a live tensor handle.
    ffi_value(std::ptr::null(), || unsafe { tensor.as_ref() }.map_or(std::ptr::null(), |t| &t.view as *const tezzeret_dltensor))
}

/// `DLManagedTensor`, layout-identical to DLPack's: a tensor handed over
/// with its owner and the function that frees it.
#[repr(C)]
pub struct tezzeret_dlmanaged_tensor {
    /// The tensor.
    pub dl_tensor: tezzeret_dltensor,
    /// The owner (the library's tensor).
    pub manager_ctx: *mut c_void,
    /// Frees the tensor and this struct; call it exactly once.
    pub deleter: Option<unsafe extern "C" fn(*mut tezzeret_dlmanaged_tensor)>,
}

/// Wraps a live tensor handle (which it then owns) as a `DLManagedTensor`.
///
/// # Safety
/// `tensor` is a live handle from `into_handle`, not freed by anyone else afterwards.
unsafe fn managed(tensor: *mut tezzeret_tensor) -> *mut tezzeret_dlmanaged_tensor {
    // SAFETY: live, by this function's contract.
    let dl_tensor = unsafe { (*tensor).view };
    Box::into_raw(Box::new(tezzeret_dlmanaged_tensor { dl_tensor, manager_ctx: tensor.cast(), deleter: Some(free_managed) }))
}

unsafe extern "C" fn free_managed(managed: *mut tezzeret_dlmanaged_tensor) {
    // SAFETY: made by tezzeret_tensor_into_dlpack and freed once, by DLPack's contract.
    let managed = unsafe { Box::from_raw(managed) };
    // SAFETY: the tensor handle it owns, freed with it.
    unsafe { free_handle(managed.manager_ctx.cast::<tezzeret_tensor>()) };
}

/// Hands a result tensor over as a DLPack `DLManagedTensor` (for
/// `torch.from_dlpack`, numpy, JAX, …) without copying it: on success the
/// tensor handle belongs to `*out_managed`, which its consumer frees by
/// calling its `deleter` once; do not free the tensor yourself. On failure
/// the tensor is left as it was.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_tensor_into_dlpack(
    tensor: *mut tezzeret_tensor,
    out_managed: *mut *mut tezzeret_dlmanaged_tensor,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_managed, "out_managed")?;
        // SAFETY: NULL or a live tensor handle (checked before it is handed over).
        unsafe { handle_ref(tensor, "tensor") }?;
        // SAFETY: non-NULL (checked) and writable by contract; the live handle passes to the wrapper.
        unsafe { *out_managed = managed(tensor) };
        Ok(())
    })
}

/// Frees a result tensor. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_tensor_free(tensor: *mut tezzeret_tensor) {
    // SAFETY: NULL or a tensor made by a run, freed once by contract.
    unsafe { free_handle(tensor) }
}

/// Frees a kernel. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_kernel_free(kernel: *mut tezzeret_kernel) {
    // SAFETY: NULL or a kernel made by load, freed once by contract.
    unsafe { free_handle(kernel) }
}
