//! Read-only access to a forge's guard table from any process, without a
//! forge: the file is `<state_dir>/guards.tbl`.
use std::ffi::c_char;

use super::args::{free_handle, handle_ref, into_handle, out_arg, str_arg, write_sized};
use super::status::{ffi_status, ffi_value, tezzeret_status};
use crate::state::guard_table::{GuardTable, Lookup, TensorMeta, Verdict, MAX_INPUTS, MAX_RANK};
use crate::base::hex;
use crate::base::error::{Error, ErrorCode};

/// dtype code: float32.
pub const TEZZERET_DTYPE_FLOAT32: u32 = 0;
/// dtype code: float64.
pub const TEZZERET_DTYPE_FLOAT64: u32 = 1;
/// dtype code: float16.
pub const TEZZERET_DTYPE_FLOAT16: u32 = 2;
/// dtype code: bfloat16.
pub const TEZZERET_DTYPE_BFLOAT16: u32 = 3;
/// dtype code: int64.
pub const TEZZERET_DTYPE_INT64: u32 = 4;
/// dtype code: int32.
pub const TEZZERET_DTYPE_INT32: u32 = 5;
/// dtype code: int16.
pub const TEZZERET_DTYPE_INT16: u32 = 6;
/// dtype code: int8.
pub const TEZZERET_DTYPE_INT8: u32 = 7;
/// dtype code: uint8.
pub const TEZZERET_DTYPE_UINT8: u32 = 8;
/// dtype code: bool.
pub const TEZZERET_DTYPE_BOOL: u32 = 9;
/// Most inputs a guard entry describes.
pub const TEZZERET_GUARD_MAX_INPUTS: usize = 4;
/// Highest input rank a guard entry describes.
pub const TEZZERET_GUARD_MAX_RANK: usize = 8;

const _: () = assert!(TEZZERET_GUARD_MAX_INPUTS == MAX_INPUTS && TEZZERET_GUARD_MAX_RANK == MAX_RANK);

/// A guard table opened read-only. Lookups and checks are lock-free and may run
/// concurrently from any number of threads.
pub struct tezzeret_guard_table {
    pub(crate) table: GuardTable,
}

/// The guard of one input tensor.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_guard_input {
    /// `TEZZERET_DTYPE_*`.
    pub dtype: u32,
    /// Number of dimensions.
    pub rank: u32,
    /// Sizes (first `rank` entries).
    pub shape: [i64; 8],
    /// Strides in elements (first `rank` entries).
    pub stride: [i64; 8],
    /// Whether the input requires grad.
    pub requires_grad: bool,
}

/// A blueprint's guard entry, as read from the table.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_guard_entry {
    /// Size of this struct as the caller knows it.
    pub struct_size: usize,
    /// NUL-terminated blueprint id.
    pub blueprint_id: [c_char; 128],
    /// NUL-terminated sha256 hex of the artifact file.
    pub checksum: [c_char; 65],
    /// NUL-terminated guard digest.
    pub guard_digest: [c_char; 65],
    /// NUL-terminated device name (`cpu`, `cuda:0`).
    pub device: [c_char; 16],
    /// The artifact accepts any size in dim 0.
    pub dynamic_batch: bool,
    /// Number of inputs described.
    pub input_count: u32,
    /// Per-input guards (first `input_count` entries).
    pub inputs: [tezzeret_guard_input; 4],
}

fn copy_str(dst: &mut [c_char], src: &str) {
    let room = dst.len() - 1; // keep the terminating NUL
    for (d, s) in dst.iter_mut().zip(src.bytes().take(room)) {
        *d = s as c_char;
    }
}

/// Opens a guard table file read-only (no forge needed; the forge may be
/// writing it at the same time). Close it with `tezzeret_guard_table_close`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_guard_table_open(
    path: *const c_char,
    out_table: *mut *mut tezzeret_guard_table,
) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_table, "out_table")?;
        // SAFETY: NULL or a NUL-terminated string valid for the call.
        let path = unsafe { str_arg(path, "path") }?;
        let table = GuardTable::open_read_only(std::path::Path::new(path))?;
        // SAFETY: out_table is non-NULL (checked) and writable by contract.
        unsafe { *out_table = into_handle(tezzeret_guard_table { table }) };
        Ok(())
    })
}

/// Reads a blueprint's entry without locks. `TEZZERET_CODE_NOT_FOUND` when
/// the blueprint has none; `TEZZERET_CODE_CORRUPT` when its slot is torn or
/// mid-update (never a wrong answer). `out_entry` needs its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_guard_table_lookup(
    table: *const tezzeret_guard_table,
    blueprint_id: *const c_char,
    out_entry: *mut tezzeret_guard_entry,
) -> *mut tezzeret_status {
    ffi_status(|| {
        // SAFETY: NULL or a live table handle.
        let table = unsafe { handle_ref(table, "table") }?;
        // SAFETY: NULL or a NUL-terminated string valid for the call.
        let id = unsafe { str_arg(blueprint_id, "blueprint_id") }?;
        out_arg(out_entry, "out_entry")?;
        let entry = match table.table.lookup(id)? {
            Lookup::Found(entry) => entry,
            Lookup::Missing => return Err(Error::new(ErrorCode::NotFound, format!("no guard entry for blueprint {id:?}"))),
        };
        // SAFETY: every field is an integer, bool, char array or such a struct: all-zero is valid.
        let mut out: tezzeret_guard_entry = unsafe { std::mem::zeroed() };
        out.struct_size = std::mem::size_of::<tezzeret_guard_entry>();
        copy_str(&mut out.blueprint_id, &entry.blueprint_id);
        copy_str(&mut out.checksum, &hex::encode(&entry.checksum));
        copy_str(&mut out.guard_digest, &hex::encode(&entry.guard_digest));
        copy_str(&mut out.device, &entry.device);
        out.dynamic_batch = entry.dynamic_batch;
        out.input_count = entry.spec.inputs().len() as u32;
        for (slot, g) in out.inputs.iter_mut().zip(entry.spec.inputs()) {
            slot.dtype = g.dtype.code();
            slot.rank = g.shape.len() as u32;
            slot.shape[..g.shape.len()].copy_from_slice(&g.shape);
            slot.stride[..g.stride.len()].copy_from_slice(&g.stride);
            slot.requires_grad = g.requires_grad;
        }
        // SAFETY: non-NULL (checked), writable for its struct_size by contract.
        unsafe { write_sized(out_entry, &out, std::mem::size_of::<usize>(), "out_entry") }
    })
}

/// Closes a guard table. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_guard_table_close(table: *mut tezzeret_guard_table) {
    // SAFETY: NULL or a table made by open, closed once by contract.
    unsafe { free_handle(table) }
}

/// Guard check result: the inputs match.
pub const TEZZERET_GUARD_MATCH: u32 = 0;
/// Guard check result: no guard entry for the blueprint.
pub const TEZZERET_GUARD_UNKNOWN_BLUEPRINT: u32 = 1;
/// Guard check result: the slot is torn or mid-update (retry or reload).
pub const TEZZERET_GUARD_UNREADABLE: u32 = 2;
/// Guard check result: wrong number of inputs (`expected`, `actual`).
pub const TEZZERET_GUARD_INPUT_COUNT: u32 = 3;
/// Guard check result: input `input` has the wrong dtype (`TEZZERET_DTYPE_*` codes).
pub const TEZZERET_GUARD_DTYPE: u32 = 4;
/// Guard check result: input `input` has the wrong rank.
pub const TEZZERET_GUARD_RANK: u32 = 5;
/// Guard check result: input `input`, dimension `dimension` has the wrong size.
pub const TEZZERET_GUARD_SHAPE: u32 = 6;
/// Guard check result: input `input`, dimension `dimension` has the wrong stride.
pub const TEZZERET_GUARD_STRIDE: u32 = 7;
/// Guard check result: an argument was NULL or inconsistent.
pub const TEZZERET_GUARD_INVALID_ARGUMENT: u32 = 8;

/// Metadata of one input tensor for a guard check (borrowed for the call).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_tensor_meta {
    /// `TEZZERET_DTYPE_*`.
    pub dtype: u32,
    /// Number of dimensions (at most `TEZZERET_GUARD_MAX_RANK`).
    pub rank: u32,
    /// `rank` sizes.
    pub shape: *const i64,
    /// `rank` strides, in elements.
    pub stride: *const i64,
}

/// The details of a guard check.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tezzeret_guard_verdict {
    /// Size of this struct as the caller knows it.
    pub struct_size: usize,
    /// `TEZZERET_GUARD_*` (also the function's return value).
    pub result: u32,
    /// The input a mismatch concerns.
    pub input: u32,
    /// The dimension a shape or stride mismatch concerns.
    pub dimension: u32,
    /// What the guard expects (count, dtype code, rank, size or stride).
    pub expected: i64,
    /// What was given.
    pub actual: i64,
    /// On a match: sha256 of the artifact that matches.
    pub checksum: [u8; 32],
}

fn verdict_of(verdict: Verdict) -> tezzeret_guard_verdict {
    let mut out = tezzeret_guard_verdict {
        struct_size: std::mem::size_of::<tezzeret_guard_verdict>(),
        result: TEZZERET_GUARD_MATCH,
        input: 0,
        dimension: 0,
        expected: 0,
        actual: 0,
        checksum: [0; 32],
    };
    match verdict {
        Verdict::Match { checksum } => out.checksum = checksum,
        Verdict::UnknownBlueprint => out.result = TEZZERET_GUARD_UNKNOWN_BLUEPRINT,
        Verdict::Unreadable => out.result = TEZZERET_GUARD_UNREADABLE,
        Verdict::InputCount { expected, actual } => {
            (out.result, out.expected, out.actual) = (TEZZERET_GUARD_INPUT_COUNT, expected as i64, actual as i64)
        }
        Verdict::Dtype { input, expected, actual } => {
            (out.result, out.input, out.expected, out.actual) = (TEZZERET_GUARD_DTYPE, input as u32, i64::from(expected), i64::from(actual))
        }
        Verdict::Rank { input, expected, actual } => {
            (out.result, out.input, out.expected, out.actual) = (TEZZERET_GUARD_RANK, input as u32, expected as i64, actual as i64)
        }
        Verdict::Shape { input, dim, expected, actual } => {
            (out.result, out.input, out.dimension, out.expected, out.actual) = (TEZZERET_GUARD_SHAPE, input as u32, dim as u32, expected, actual)
        }
        Verdict::Stride { input, dim, expected, actual } => {
            (out.result, out.input, out.dimension, out.expected, out.actual) = (TEZZERET_GUARD_STRIDE, input as u32, dim as u32, expected, actual)
        }
    }
    out
}

/// Checks input tensors against a blueprint's guards — the hot path: no
/// locks, no allocation. Returns `TEZZERET_GUARD_MATCH` or the first precise
/// mismatch (`TEZZERET_GUARD_*`); `out_verdict` (nullable; set its
/// `struct_size`) receives which input and dimension, expected and actual
/// values, and on a match the artifact's sha256. With the dynamic-batch
/// flag, dim 0 may take any size (the same for every input).
#[no_mangle]
pub unsafe extern "C" fn tezzeret_guard_check(
    table: *const tezzeret_guard_table,
    blueprint_id: *const c_char,
    inputs: *const tezzeret_tensor_meta,
    input_count: usize,
    out_verdict: *mut tezzeret_guard_verdict,
) -> u32 {
    ffi_value(TEZZERET_GUARD_INVALID_ARGUMENT, || {
        // SAFETY: NULL or a live table handle.
        let Some(table) = (unsafe { table.as_ref() }) else { return TEZZERET_GUARD_INVALID_ARGUMENT };
        if blueprint_id.is_null() || (inputs.is_null() && input_count > 0) {
            return TEZZERET_GUARD_INVALID_ARGUMENT;
        }
        // SAFETY: non-NULL (checked) and NUL-terminated by contract.
        let id = unsafe { std::ffi::CStr::from_ptr(blueprint_id) }.to_bytes();
        const MAX: usize = 8;
        let mut metas = [TensorMeta { dtype: 0, shape: &[], stride: &[] }; MAX];
        let verdict = if input_count > MAX {
            Verdict::InputCount { expected: MAX_INPUTS, actual: input_count }
        } else {
            // SAFETY: `input_count` readable metas at `inputs` (non-NULL when
            // input_count > 0, checked above; unused when 0).
            let given = if input_count == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(inputs, input_count) } };
            for (i, meta) in given.iter().enumerate() {
                let rank = meta.rank as usize;
                if rank > MAX_RANK {
                    return TEZZERET_GUARD_INVALID_ARGUMENT;
                }
                if rank > 0 && (meta.shape.is_null() || meta.stride.is_null()) {
                    return TEZZERET_GUARD_INVALID_ARGUMENT;
                }
                metas[i] = TensorMeta {
                    dtype: meta.dtype,
                    // SAFETY: rank > 0 sizes and strides at non-NULL pointers (checked), by contract.
                    shape: if rank == 0 { &[] } else { unsafe { std::slice::from_raw_parts(meta.shape, rank) } },
                    // SAFETY: as above.
                    stride: if rank == 0 { &[] } else { unsafe { std::slice::from_raw_parts(meta.stride, rank) } },
                };
            }
            table.table.check(id, &metas[..input_count])
        };
        let out = verdict_of(verdict);
        if !out_verdict.is_null() {
            // SAFETY: non-NULL, writable for its struct_size by contract.
            let _ = unsafe { write_sized(out_verdict, &out, std::mem::size_of::<usize>(), "out_verdict") };
        }
        out.result
    })
}
