//! The in-process hot path through the C ABI: guard checks,
//! prefetch answers, kernel loads and DLPack runs, bad input included.
use std::ffi::CString;
use std::ptr::{null, null_mut};

use prost::Message;
use tezzeret::ffi::*;
use tezzeret::base::leyline::{KernelArtifactError, KernelArtifactReady, KernelPrefetchRequest};

use crate::cabi::{host_callbacks, open_forge, take};
use crate::TempDir;

const CATALOG: &str = r#"[
 {"blueprint_id": "BP016", "name": "squeeze_excitation", "tier": "SAFE", "allowed_parameters": {"reduction": [4.0, 16.0]}},
 {"blueprint_id": "BP019", "name": "cross_attention", "tier": "SAFE", "allowed_parameters": {"heads": [2.0, 4.0]}},
 {"blueprint_id": "BP041", "name": "meta_learning_layer", "tier": "EXPERIMENTAL", "allowed_parameters": {"adapt_steps": [1.0, 5.0]}},
 {"blueprint_id": "BP045", "name": "nan_injection", "tier": "HIGH_RISK", "quarantine_only": true}
]"#;

struct Forged {
    dir: TempDir,
    forge: *mut tezzeret_forge,
}

impl Drop for Forged {
    fn drop(&mut self) {
        unsafe { tezzeret_forge_close(self.forge) };
    }
}

/// A forge over the small catalog, compiled (through the CLI, to keep this
/// process's forge handle the only one), with optional trusted keys.
fn forged(tag: &str, trusted: Option<[u8; 32]>) -> Forged {
    let dir = TempDir::new(tag);
    let catalog = dir.path().join("catalog.json");
    std::fs::write(&catalog, CATALOG).unwrap();
    let state = dir.path().join("s");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tezzeret"))
        .args(["forge", "--device", "cpu", "--state"])
        .arg(&state)
        .arg("--catalog")
        .arg(&catalog)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let callbacks = host_callbacks(null_mut(), None, None, None, None);
    let forge = open_forge(&state, &callbacks, |config| {
        config.strategy = TEZZERET_STRATEGY_STANDARD; // the strategy the CLI compiled with
        if let Some(key) = &trusted {
            config.trusted_keys = key.as_ptr();
            config.trusted_key_count = 1;
        }
    });
    Forged { dir, forge }
}

fn meta(shape: &[i64], stride: &[i64]) -> tezzeret_tensor_meta {
    tezzeret_tensor_meta { dtype: TEZZERET_DTYPE_FLOAT32, rank: shape.len() as u32, shape: shape.as_ptr(), stride: stride.as_ptr() }
}

fn check(table: *const tezzeret_guard_table, id: &str, inputs: &[tezzeret_tensor_meta]) -> tezzeret_guard_verdict {
    let id = CString::new(id).unwrap();
    let mut verdict: tezzeret_guard_verdict = unsafe { std::mem::zeroed() };
    verdict.struct_size = std::mem::size_of::<tezzeret_guard_verdict>();
    let result = unsafe { tezzeret_guard_check(table, id.as_ptr(), inputs.as_ptr(), inputs.len(), &mut verdict) };
    assert_eq!(result, verdict.result);
    verdict
}

#[test]
fn guard_checks_name_the_mismatch_and_honour_dynamic_batch() {
    let f = forged("hot-guards", None);
    let mut table = null_mut();
    assert_eq!(take(unsafe { tezzeret_forge_guard_table(f.forge, &mut table) }).0, 0);
    let (s, st) = ([8i64, 32, 16, 16], [8192i64, 256, 16, 1]);
    let v = check(table, "BP016", &[meta(&s, &st)]);
    assert_eq!(v.result, TEZZERET_GUARD_MATCH);
    assert_ne!(v.checksum, [0u8; 32]);
    // Dynamic batch: another batch size matches; an empty batch never does
    // (the same rule as tezzeret_kernel_run's).
    assert_eq!(check(table, "BP016", &[meta(&[3, 32, 16, 16], &st)]).result, TEZZERET_GUARD_MATCH);
    let v = check(table, "BP016", &[meta(&[0, 32, 16, 16], &st)]);
    assert_eq!((v.result, v.dimension, v.expected, v.actual), (TEZZERET_GUARD_SHAPE, 0, 8, 0));
    // Wrong size in dimension 2.
    let v = check(table, "BP016", &[meta(&[8, 32, 15, 16], &[7680, 240, 16, 1])]);
    assert_eq!((v.result, v.input, v.dimension, v.expected, v.actual), (TEZZERET_GUARD_SHAPE, 0, 2, 16, 15));
    // Wrong stride (a transposed view).
    let v = check(table, "BP016", &[meta(&s, &[8192, 1, 512, 32])]);
    assert_eq!((v.result, v.dimension, v.expected, v.actual), (TEZZERET_GUARD_STRIDE, 1, 256, 1));
    // Wrong rank, dtype, input count, unknown blueprint.
    assert_eq!(check(table, "BP016", &[meta(&[8, 32], &[32, 1])]).result, TEZZERET_GUARD_RANK);
    let mut int_input = meta(&s, &st);
    int_input.dtype = TEZZERET_DTYPE_INT64;
    let v = check(table, "BP016", &[int_input]);
    assert_eq!((v.result, v.expected, v.actual), (TEZZERET_GUARD_DTYPE, i64::from(TEZZERET_DTYPE_FLOAT32), i64::from(TEZZERET_DTYPE_INT64)));
    let v = check(table, "BP016", &[meta(&s, &st), meta(&s, &st)]);
    assert_eq!((v.result, v.expected, v.actual), (TEZZERET_GUARD_INPUT_COUNT, 1, 2));
    assert_eq!(check(table, "BP404", &[meta(&s, &st)]).result, TEZZERET_GUARD_UNKNOWN_BLUEPRINT);
    assert_eq!(check(table, "BP045", &[meta(&s, &st)]).result, TEZZERET_GUARD_UNKNOWN_BLUEPRINT, "refused, never compiled");
    // Two inputs (heads = 3: width 24): the batch must agree between them under dynamic batch.
    let (q, k) = ([8i64, 12, 24], [8i64, 20, 24]);
    let (qs, ks) = ([288i64, 24, 1], [480i64, 24, 1]);
    assert_eq!(check(table, "BP019", &[meta(&q, &qs), meta(&k, &ks)]).result, TEZZERET_GUARD_MATCH);
    assert_eq!(check(table, "BP019", &[meta(&[2, 12, 24], &qs), meta(&[2, 20, 24], &ks)]).result, TEZZERET_GUARD_MATCH);
    let v = check(table, "BP019", &[meta(&[2, 12, 24], &qs), meta(&[3, 20, 24], &ks)]);
    assert_eq!((v.result, v.input, v.dimension), (TEZZERET_GUARD_SHAPE, 1, 0));
    // Not dynamic: only the validated batch.
    let v = check(table, "BP041", &[meta(&[4, 32], &[32, 1])]);
    assert_eq!((v.result, v.dimension, v.expected), (TEZZERET_GUARD_SHAPE, 0, 8));
    // Bad arguments: a verdict code, no crash.
    unsafe {
        let id = CString::new("BP016").unwrap();
        assert_eq!(tezzeret_guard_check(null(), id.as_ptr(), null(), 0, null_mut()), TEZZERET_GUARD_INVALID_ARGUMENT);
        assert_eq!(tezzeret_guard_check(table, null(), null(), 0, null_mut()), TEZZERET_GUARD_INVALID_ARGUMENT);
        assert_eq!(tezzeret_guard_check(table, id.as_ptr(), null(), 1, null_mut()), TEZZERET_GUARD_INVALID_ARGUMENT);
        let bad = tezzeret_tensor_meta { dtype: 0, rank: 4, shape: null(), stride: null() };
        assert_eq!(tezzeret_guard_check(table, id.as_ptr(), &bad, 1, null_mut()), TEZZERET_GUARD_INVALID_ARGUMENT);
        let deep = tezzeret_tensor_meta { dtype: 0, rank: 99, shape: s.as_ptr(), stride: st.as_ptr() };
        assert_eq!(tezzeret_guard_check(table, id.as_ptr(), &deep, 1, null_mut()), TEZZERET_GUARD_INVALID_ARGUMENT);
        tezzeret_guard_table_close(table);
    }
}

fn prefetch(forge: *mut tezzeret_forge, id: &str) -> Result<KernelArtifactReady, KernelArtifactError> {
    let request = KernelPrefetchRequest { request_id: "r-1".into(), blueprint_id: id.into(), training_run_id: "t".into(), issued_at: None };
    let bytes = request.encode_to_vec();
    let (mut kind, mut answer) = (0u32, null_mut());
    let (code, msg) = take(unsafe { tezzeret_forge_prefetch(forge, bytes.as_ptr(), bytes.len(), &mut kind, &mut answer) });
    assert_eq!(code, 0, "{msg}");
    let data = unsafe { std::slice::from_raw_parts(tezzeret_buffer_data(answer), tezzeret_buffer_len(answer)) }.to_vec();
    tezzeret_buffer_free(answer);
    match kind {
        TEZZERET_PREFETCH_READY => Ok(KernelArtifactReady::decode(data.as_slice()).unwrap()),
        TEZZERET_PREFETCH_ERROR => Err(KernelArtifactError::decode(data.as_slice()).unwrap()),
        other => panic!("answer type {other}"),
    }
}

#[test]
fn prefetch_answers_ready_or_a_named_reason_and_notices_changed_files() {
    let f = forged("hot-prefetch", None);
    let ready = prefetch(f.forge, "BP016").unwrap();
    assert_eq!(ready.request_id, "r-1");
    assert!(ready.prewarm_p50_ms > 0.0 && ready.prewarm_p95_ms >= ready.prewarm_p50_ms);
    assert_eq!(ready.checksum.len(), 64);
    assert_eq!(prefetch(f.forge, "BP045").unwrap_err().reason, "missing_artifact");
    assert_eq!(prefetch(f.forge, "BP404").unwrap_err().reason, "missing_artifact");
    // Changed in place, same size, mtime put back: ctime still tells.
    let path = std::path::PathBuf::from(&ready.artifact_ref);
    let original = std::fs::read(&path).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let mut changed = original.clone();
    changed[20] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    assert_eq!(prefetch(f.forge, "BP016").unwrap_err().reason, "checksum_mismatch");
    std::fs::write(&path, &original).unwrap();
    assert!(prefetch(f.forge, "BP016").is_ok(), "restored bytes verify again");
    std::fs::remove_file(&path).unwrap();
    assert_eq!(prefetch(f.forge, "BP016").unwrap_err().reason, "artifact_not_found");
    std::fs::write(&path, &original).unwrap();
    // Malformed request bytes: a status naming the message.
    let (mut kind, mut answer) = (0u32, null_mut());
    let (code, msg) = take(unsafe { tezzeret_forge_prefetch(f.forge, [0x12, 0x7f].as_ptr(), 2, &mut kind, &mut answer) });
    assert_eq!(code, TEZZERET_CODE_MALFORMED);
    assert!(msg.contains("KernelPrefetchRequest"), "{msg}");
    assert!(answer.is_null());
    let (code, _) = take(unsafe { tezzeret_forge_prefetch(f.forge, null(), 4, &mut kind, &mut answer) });
    assert_eq!(code, TEZZERET_CODE_NULL_ARGUMENT);
    let _ = &f.dir;
}

#[test]
fn unsigned_artifacts_are_refused_when_keys_are_trusted() {
    // Trusting a key without a signing key: unsigned artifacts are refused
    // on every use, and none is made.
    let key = [9u8; 32];
    let public = *ed25519_dalek::SigningKey::from_bytes(&key).verifying_key().as_bytes();
    let mut f = forged("hot-unsigned", None);
    unsafe { tezzeret_forge_close(f.forge) };
    f.forge = null_mut(); // closed (closing NULL on drop is a no-op)
    let callbacks = host_callbacks(null_mut(), None, None, None, None);
    let forge = open_forge(&f.dir.path().join("s"), &callbacks, |config| {
        config.strategy = TEZZERET_STRATEGY_STANDARD;
        config.trusted_keys = public.as_ptr();
        config.trusted_key_count = 1;
    });
    unsafe {
        // Retired at open: nothing unsigned is served.
        assert_eq!(prefetch(forge, "BP016").unwrap_err().reason, "missing_artifact");
        let id = CString::new("BP016").unwrap();
        let mut kernel = null_mut();
        let (code, msg) = take(tezzeret_forge_load_kernel(forge, id.as_ptr(), &mut kernel));
        assert_eq!(code, TEZZERET_CODE_NOT_FOUND, "{msg}");
        // Not compiled again: without a signing key it would be unsigned,
        // refused by this forge itself; the jobs fail instead, nothing is served.
        let mut summary = tezzeret_run_summary { struct_size: std::mem::size_of::<tezzeret_run_summary>(), ..Default::default() };
        assert_eq!(take(tezzeret_forge_run(forge, &mut summary)).0, 0);
        assert!(summary.failed >= 1 && summary.ok == 0, "{} failed, {} ok", summary.failed, summary.ok);
        assert_eq!(prefetch(forge, "BP016").unwrap_err().reason, "missing_artifact");
        let (code, msg) = take(tezzeret_forge_load_kernel(forge, id.as_ptr(), &mut kernel));
        assert_eq!(code, TEZZERET_CODE_NOT_FOUND, "{msg}");
        tezzeret_forge_close(forge);
    }
}

fn values_of(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn dl(data: &mut [f32], shape: &mut [i64]) -> tezzeret_dltensor {
    tezzeret_dltensor {
        data: data.as_mut_ptr().cast(),
        device: tezzeret_dl_device { device_type: TEZZERET_DL_CPU, device_id: 0 },
        ndim: shape.len() as i32,
        dtype: tezzeret_dl_datatype { code: TEZZERET_DL_FLOAT, bits: 32, lanes: 1 },
        shape: shape.as_mut_ptr(),
        strides: null_mut(),
        byte_offset: 0,
    }
}

#[test]
fn kernels_run_on_dlpack_views_after_their_guards() {
    let f = forged("hot-kernel", None);
    let id = CString::new("BP016").unwrap();
    let mut kernel = null_mut();
    assert_eq!(take(unsafe { tezzeret_forge_load_kernel(f.forge, id.as_ptr(), &mut kernel) }).0, 0);
    let mut data: Vec<f32> = (0..8 * 32 * 16 * 16).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
    let mut shape = [8i64, 32, 16, 16];
    let input = dl(&mut data, &mut shape);
    let mut out = null_mut();
    assert_eq!(take(unsafe { tezzeret_kernel_run(kernel, &input, 1, &mut out) }).0, 0);
    let view = unsafe { &*tezzeret_tensor_dlpack(out) };
    assert_eq!(view.ndim, 4);
    let out_shape = unsafe { std::slice::from_raw_parts(view.shape, 4) };
    assert_eq!(out_shape, [8, 32, 16, 16]);
    let values = unsafe { std::slice::from_raw_parts(view.data as *const f32, data.len()) };
    // The same as the eager block on the same input.
    let record = tezzeret::state::verify::read_journal(&f.dir.path().join("s")).unwrap().1.artifacts["BP016"].clone();
    let catalog = tezzeret::build::catalog::Catalog::from_json(CATALOG).unwrap();
    let d = catalog.get("BP016").unwrap();
    let params = tezzeret::build::blueprints::ResolvedParams::resolve(d, &record.params).unwrap();
    let block = tezzeret::build::blueprints::build(d, &params, 8, tch::Device::Cpu, Default::default()).unwrap();
    let x = tch::Tensor::from_slice(&data).view([8, 32, 16, 16]);
    let eager = tch::no_grad(|| (block.forward)(&[x]));
    let got = tch::Tensor::from_slice(values).view([8, 32, 16, 16]);
    assert!(got.allclose(&eager, 1e-4, 1e-5, false));
    unsafe { tezzeret_tensor_free(out) };
    // Handed over as a DLManagedTensor: the same data, no copy; its deleter frees it.
    assert_eq!(take(unsafe { tezzeret_kernel_run(kernel, &input, 1, &mut out) }).0, 0);
    let data_before = unsafe { (*tezzeret_tensor_dlpack(out)).data };
    let mut managed = null_mut();
    assert_eq!(take(unsafe { tezzeret_tensor_into_dlpack(out, &mut managed) }).0, 0);
    let handed = unsafe { &*managed };
    assert_eq!((handed.dl_tensor.data, handed.dl_tensor.ndim), (data_before, 4));
    let first = unsafe { std::slice::from_raw_parts(handed.dl_tensor.data as *const f32, 4) };
    assert_eq!(first, &values_of(&eager)[..4]);
    unsafe { (handed.deleter.expect("a deleter"))(managed) };
    // Or in one call: run and hand over.
    assert_eq!(take(unsafe { tezzeret_kernel_run_dlpack(kernel, &input, 1, &mut managed) }).0, 0);
    let handed = unsafe { &*managed };
    let first = unsafe { std::slice::from_raw_parts(handed.dl_tensor.data as *const f32, 4) };
    assert_eq!(first, &values_of(&eager)[..4]);
    unsafe { (handed.deleter.expect("a deleter"))(managed) };
    // Another batch size (dynamic) runs too.
    let mut shape3 = [3i64, 32, 16, 16];
    let input3 = dl(&mut data[..3 * 32 * 256], &mut shape3);
    assert_eq!(take(unsafe { tezzeret_kernel_run(kernel, &input3, 1, &mut out) }).0, 0);
    unsafe { tezzeret_tensor_free(out) };
    // An empty batch is refused, as the guard check refuses it.
    let mut shape0 = [0i64, 32, 16, 16];
    let input0 = dl(&mut data, &mut shape0);
    let (code, msg) = take(unsafe { tezzeret_kernel_run(kernel, &input0, 1, &mut out) });
    assert!(code == TEZZERET_CODE_INVALID_ARGUMENT && msg.contains("input 0 dimension 0 is 0, expected 8"), "{msg}");
    // Guard mismatches are named; bad views refused; nothing crashes, and
    // no failing run writes its out-parameter.
    out = null_mut();
    let mut wrong = [8i64, 32, 16, 15];
    let bad = dl(&mut data, &mut wrong);
    let (code, msg) = take(unsafe { tezzeret_kernel_run(kernel, &bad, 1, &mut out) });
    assert_eq!(code, TEZZERET_CODE_INVALID_ARGUMENT);
    assert!(msg.contains("input 0 dimension 3 is 15, expected 16"), "{msg}");
    let mut ints = dl(&mut data, &mut shape);
    ints.dtype = tezzeret_dl_datatype { code: TEZZERET_DL_INT, bits: 32, lanes: 1 };
    let (code, msg) = take(unsafe { tezzeret_kernel_run(kernel, &ints, 1, &mut out) });
    assert!(code == TEZZERET_CODE_INVALID_ARGUMENT && msg.contains("dtype int32, expected float32"), "{msg}");
    let mut nodata = dl(&mut data, &mut shape);
    nodata.data = null_mut();
    assert_eq!(take(unsafe { tezzeret_kernel_run(kernel, &nodata, 1, &mut out) }).0, TEZZERET_CODE_NULL_ARGUMENT);
    let mut weird = dl(&mut data, &mut shape);
    weird.dtype.lanes = 4;
    assert_eq!(take(unsafe { tezzeret_kernel_run(kernel, &weird, 1, &mut out) }).0, TEZZERET_CODE_INVALID_ARGUMENT);
    assert_eq!(take(unsafe { tezzeret_kernel_run(kernel, &input, 2, &mut out) }).0, TEZZERET_CODE_INVALID_ARGUMENT);
    assert_eq!(take(unsafe { tezzeret_kernel_run(null(), &input, 1, &mut out) }).0, TEZZERET_CODE_NULL_ARGUMENT);
    assert!(out.is_null(), "a failing run wrote *out_tensor");
    unsafe {
        tezzeret_kernel_free(kernel);
        tezzeret_kernel_free(null_mut());
        tezzeret_tensor_free(null_mut());
        assert!(tezzeret_tensor_dlpack(null()).is_null());
    }
    // Unknown id, and a tampered artifact: refused on load.
    let unknown = CString::new("BP404").unwrap();
    let (code, msg) = take(unsafe { tezzeret_forge_load_kernel(f.forge, unknown.as_ptr(), &mut kernel) });
    assert!(code == TEZZERET_CODE_NOT_FOUND && msg.contains("missing_artifact"), "{msg}");
    let path = f.dir.path().join("s/artifacts").join(&record.artifact_file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 4;
    std::fs::write(&path, bytes).unwrap();
    let (code, msg) = take(unsafe { tezzeret_forge_load_kernel(f.forge, id.as_ptr(), &mut kernel) });
    assert!(code == TEZZERET_CODE_CORRUPT && msg.contains("checksum_mismatch"), "{msg}");
}
