//! Out-parameters are untouched when a call fails: every C ABI function
//! with one is made to fail with its out-parameter holding a sentinel, and
//! the sentinel must still be there afterwards.
use std::ffi::CString;
use std::ptr::{null, null_mut};

use tezzeret::ffi::*;

use crate::cabi::{host_callbacks, ok, open_forge, take};
use crate::TempDir;

/// A pointer value no call may write (never dereferenced).
fn sentinel<T>() -> *mut T {
    0x5eed_usize as *mut T
}

/// Asserts that a call failed with `code` and left `out` as it was.
#[track_caller]
fn refused_untouched<T: PartialEq + std::fmt::Debug>(status: *mut tezzeret_status, code: u32, out: &T, before: &T) {
    let (got, message) = take(status);
    assert_eq!(got, code, "{message}");
    assert_eq!(out, before, "out-parameter written by a failing call ({message})");
}

#[test]
fn out_parameters_are_untouched_when_a_call_fails() {
    let dir = TempDir::new("outparams");
    let callbacks = host_callbacks(null_mut(), None, None, None, None);
    let forge = open_forge(&dir.path().join("s"), &callbacks, |c| c.telemetry_interval_ms = 0);
    let unknown = CString::new("BP404").unwrap();
    let bp003 = CString::new("BP003").unwrap();
    unsafe {
        // open: a config without a state directory.
        let mut config: tezzeret_config = std::mem::zeroed();
        ok(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()));
        let mut out_forge: *mut tezzeret_forge = sentinel();
        refused_untouched(tezzeret_forge_open(&config, null(), &mut out_forge), TEZZERET_CODE_NULL_ARGUMENT, &out_forge, &sentinel());

        // run: a NULL forge; the summary keeps every byte.
        let mut summary = tezzeret_run_summary { struct_size: std::mem::size_of::<tezzeret_run_summary>(), total: 7, ok: 7, cached: 7, failed: 7, refused: 7 };
        let before = (summary.total, summary.ok, summary.cached, summary.failed, summary.refused);
        let (code, _) = take(tezzeret_forge_run(null_mut(), &mut summary));
        assert_eq!(code, TEZZERET_CODE_NULL_ARGUMENT);
        assert_eq!((summary.total, summary.ok, summary.cached, summary.failed, summary.refused), before);

        // Buffers out: NULL forge.
        let mut buffer: *mut tezzeret_buffer = sentinel();
        refused_untouched(tezzeret_forge_catalog_json(null_mut(), &mut buffer), TEZZERET_CODE_NULL_ARGUMENT, &buffer, &sentinel());
        refused_untouched(tezzeret_forge_metrics_prometheus(null_mut(), &mut buffer), TEZZERET_CODE_NULL_ARGUMENT, &buffer, &sentinel());
        refused_untouched(tezzeret_forge_health(null_mut(), &mut buffer), TEZZERET_CODE_NULL_ARGUMENT, &buffer, &sentinel());
        refused_untouched(tezzeret_forge_metrics(null_mut(), &mut buffer), TEZZERET_CODE_NULL_ARGUMENT, &buffer, &sentinel());

        // keygen: a NULL public-key buffer; the secret's buffer keeps every byte.
        let mut secret = [0x5au8; 32];
        let (code, _) = take(tezzeret_keygen(secret.as_mut_ptr(), null_mut()));
        assert_eq!((code, secret), (TEZZERET_CODE_NULL_ARGUMENT, [0x5a; 32]));

        // into_dlpack: a NULL tensor.
        let mut managed: *mut tezzeret_dlmanaged_tensor = sentinel();
        refused_untouched(tezzeret_tensor_into_dlpack(null_mut(), &mut managed), TEZZERET_CODE_NULL_ARGUMENT, &managed, &sentinel());
        refused_untouched(tezzeret_kernel_run_dlpack(null(), null(), 0, &mut managed), TEZZERET_CODE_NULL_ARGUMENT, &managed, &sentinel());

        // prefetch: malformed request bytes.
        let garbage = [0xffu8, 0xff, 0xff];
        let mut kind = 0xabcd_u32;
        refused_untouched(
            tezzeret_forge_prefetch(forge, garbage.as_ptr(), garbage.len(), &mut kind, &mut buffer),
            TEZZERET_CODE_MALFORMED,
            &(kind, buffer),
            &(0xabcd, sentinel()),
        );

        // Guard tables: a path that is not one; an unknown blueprint.
        let mut table: *mut tezzeret_guard_table = sentinel();
        let missing = CString::new(dir.path().join("nothing.tbl").to_str().unwrap()).unwrap();
        refused_untouched(tezzeret_guard_table_open(missing.as_ptr(), &mut table), TEZZERET_CODE_IO, &table, &sentinel());
        refused_untouched(tezzeret_forge_guard_table(null_mut(), &mut table), TEZZERET_CODE_NULL_ARGUMENT, &table, &sentinel());
        let mut table = null_mut();
        ok(tezzeret_forge_guard_table(forge, &mut table));
        let mut entry: tezzeret_guard_entry = std::mem::zeroed();
        entry.struct_size = std::mem::size_of::<tezzeret_guard_entry>();
        entry.input_count = 0x77;
        entry.blueprint_id[0] = b'Z' as std::ffi::c_char;
        let (code, _) = take(tezzeret_guard_table_lookup(table, unknown.as_ptr(), &mut entry));
        assert_eq!(code, TEZZERET_CODE_NOT_FOUND);
        assert_eq!((entry.input_count, entry.blueprint_id[0]), (0x77, b'Z' as std::ffi::c_char), "entry untouched");
        tezzeret_guard_table_close(table);

        // Queue calls: an unknown blueprint; a NULL forge.
        let mut seq = 0x1234_u64;
        refused_untouched(tezzeret_forge_submit(forge, unknown.as_ptr(), TEZZERET_PRIORITY_HIGH, &mut seq), TEZZERET_CODE_NOT_FOUND, &seq, &0x1234);
        let (mut a, mut b) = (0x11_u32, 0x22_u32);
        refused_untouched(tezzeret_forge_drain(null_mut(), &mut a, &mut b), TEZZERET_CODE_NULL_ARGUMENT, &(a, b), &(0x11, 0x22));
        refused_untouched(tezzeret_forge_refresh(null_mut(), &mut a, &mut b), TEZZERET_CODE_NULL_ARGUMENT, &(a, b), &(0x11, 0x22));

        // Kernels: an unknown blueprint; a run whose input fails its guard.
        let mut kernel: *mut tezzeret_kernel = sentinel();
        refused_untouched(tezzeret_forge_load_kernel(forge, unknown.as_ptr(), &mut kernel), TEZZERET_CODE_NOT_FOUND, &kernel, &sentinel());
        ok(tezzeret_forge_compile_now(forge, bp003.as_ptr()));
        let mut kernel = null_mut();
        ok(tezzeret_forge_load_kernel(forge, bp003.as_ptr(), &mut kernel));
        let mut data = vec![0f32; 64];
        let mut shape = [1i64, 64];
        let input = tezzeret_dltensor {
            data: data.as_mut_ptr().cast(),
            device: tezzeret_dl_device { device_type: TEZZERET_DL_CPU, device_id: 0 },
            ndim: 2,
            dtype: tezzeret_dl_datatype { code: TEZZERET_DL_FLOAT, bits: 32, lanes: 1 },
            shape: shape.as_mut_ptr(),
            strides: null_mut(),
            byte_offset: 0,
        };
        let mut tensor: *mut tezzeret_tensor = sentinel();
        refused_untouched(tezzeret_kernel_run(kernel, &input, 1, &mut tensor), TEZZERET_CODE_INVALID_ARGUMENT, &tensor, &sentinel());
        tezzeret_kernel_free(kernel);
        tezzeret_forge_close(forge);
    }
}
