//! The C ABI, called exactly as a C host calls it.
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::ptr::{null, null_mut};

use tezzeret::ffi::*;
use tezzeret::base::leyline::{self, BlueprintDescriptor, BlueprintParameterBounds, BlueprintTier};

use crate::cabi::{ok, take};
use crate::TempDir;

fn config_for(dir: &CString) -> tezzeret_config {
    let mut config = std::mem::MaybeUninit::<tezzeret_config>::uninit();
    // SAFETY: init fills all of sizeof(tezzeret_config).
    ok(unsafe { tezzeret_config_init(config.as_mut_ptr(), size_of::<tezzeret_config>()) });
    let mut config = unsafe { config.assume_init() };
    config.state_dir = dir.as_ptr();
    config.device = TEZZERET_DEVICE_CPU;
    config
}

fn cstring(path: &std::path::Path) -> CString {
    CString::new(path.to_str().unwrap()).unwrap()
}

#[derive(Default)]
struct Recorder {
    descriptors: Vec<Vec<u8>>,
    push_results: Vec<(u32, String)>,
    updates: Vec<leyline::KernelCatalogUpdate>,
    telemetry: Vec<leyline::TelemetryPacket>,
    logs: Vec<(u32, String)>,
    releases: u32,
    enumerate_rc: i32,
    forge: Option<*mut tezzeret_forge>,
    reentrant: Vec<(u32, String)>,
}

unsafe extern "C" fn enumerate(user: *mut c_void, sink: *mut tezzeret_descriptor_sink) -> i32 {
    let rec = &mut *(user as *mut Recorder);
    for bytes in rec.descriptors.clone() {
        let result = take(tezzeret_descriptor_sink_push(sink, bytes.as_ptr(), bytes.len()));
        rec.push_results.push(result);
    }
    rec.enumerate_rc
}

unsafe extern "C" fn on_update(user: *mut c_void, bytes: *const u8, len: usize) {
    let rec = &mut *(user as *mut Recorder);
    rec.updates.push(leyline::decode(std::slice::from_raw_parts(bytes, len)).expect("update decodes"));
    if let Some(forge) = rec.forge {
        // Re-entering the same forge from its callback must fail, not deadlock.
        rec.reentrant.push(take(tezzeret_forge_run(forge, null_mut())));
    }
}

unsafe extern "C" fn on_telemetry(user: *mut c_void, bytes: *const u8, len: usize) {
    let rec = &mut *(user as *mut Recorder);
    rec.telemetry.push(leyline::decode(std::slice::from_raw_parts(bytes, len)).expect("packet decodes"));
}

unsafe extern "C" fn on_log(user: *mut c_void, level: u32, message: *const c_char) {
    let rec = &mut *(user as *mut Recorder);
    rec.logs.push((level, CStr::from_ptr(message).to_string_lossy().into_owned()));
}

unsafe extern "C" fn on_release(user: *mut c_void) {
    (*(user as *mut Recorder)).releases += 1;
}

fn callbacks_for(rec: &mut Recorder) -> tezzeret_host_callbacks {
    let mut cb = std::mem::MaybeUninit::<tezzeret_host_callbacks>::uninit();
    ok(unsafe { tezzeret_host_callbacks_init(cb.as_mut_ptr(), size_of::<tezzeret_host_callbacks>()) });
    let mut cb = unsafe { cb.assume_init() };
    cb.user_data = rec as *mut Recorder as *mut c_void;
    cb.enumerate = Some(enumerate);
    cb.catalog_update = Some(on_update);
    cb.telemetry = Some(on_telemetry);
    cb.log = Some(on_log);
    cb.release = Some(on_release);
    cb
}

fn descriptor(id: &str, name: &str, tier: BlueprintTier, param: Option<(&str, f64, f64)>) -> Vec<u8> {
    let mut d = BlueprintDescriptor {
        blueprint_id: id.into(),
        name: name.into(),
        tier: tier as i32,
        quarantine_only: tier == BlueprintTier::HighRisk,
        ..Default::default()
    };
    if let Some((p, min, max)) = param {
        d.allowed_parameters.insert(p.into(), BlueprintParameterBounds { min_value: min, max_value: max });
    }
    leyline::encode(&d)
}

#[test]
fn version_and_abi_check() {
    let version = unsafe { CStr::from_ptr(tezzeret_version()) }.to_str().unwrap();
    assert_eq!(version, tezzeret::base::version::LIBRARY_VERSION);
    assert_eq!((tezzeret_abi_major(), tezzeret_abi_minor()), (TEZZERET_ABI_MAJOR, TEZZERET_ABI_MINOR));
    ok(tezzeret_check_abi(TEZZERET_ABI_MAJOR, TEZZERET_ABI_MINOR));
    ok(tezzeret_check_abi(TEZZERET_ABI_MAJOR, 0)); // an older minor is fine
    let (code, message) = take(tezzeret_check_abi(TEZZERET_ABI_MAJOR + 1, 0));
    assert_eq!(code, TEZZERET_CODE_ABI_MISMATCH);
    assert!(message.contains(&format!("header ABI {}.0", TEZZERET_ABI_MAJOR + 1)) && message.contains("must match"), "{message}");
    let (code, message) = take(tezzeret_check_abi(TEZZERET_ABI_MAJOR, TEZZERET_ABI_MINOR + 1));
    assert_eq!(code, TEZZERET_CODE_ABI_MISMATCH);
    assert!(message.contains("newer than library"), "{message}");
}

#[test]
fn status_and_buffer_functions_accept_null() {
    assert_eq!(tezzeret_status_code(null()), TEZZERET_CODE_OK);
    assert_eq!(unsafe { CStr::from_ptr(tezzeret_status_message(null())) }.to_str().unwrap(), "ok");
    tezzeret_status_free(null_mut());
    assert_eq!(tezzeret_buffer_len(null()), 0);
    assert!(tezzeret_buffer_data(null()).is_null());
    tezzeret_buffer_free(null_mut());
    unsafe { tezzeret_forge_close(null_mut()) };
}

#[test]
fn null_and_invalid_arguments_get_a_status_naming_them() {
    let dir = TempDir::new("abi-null");
    let path = cstring(dir.path());
    let config = config_for(&path);
    let mut forge: *mut tezzeret_forge = null_mut();
    unsafe {
        let (code, msg) = take(tezzeret_forge_open(null(), null(), &mut forge));
        assert_eq!((code, msg.as_str()), (TEZZERET_CODE_NULL_ARGUMENT, "config is NULL"));
        let (code, msg) = take(tezzeret_forge_open(&config, null(), null_mut()));
        assert_eq!((code, msg.as_str()), (TEZZERET_CODE_NULL_ARGUMENT, "out_forge is NULL"));
        let mut no_dir = config;
        no_dir.state_dir = null();
        assert_eq!(take(tezzeret_forge_open(&no_dir, null(), &mut forge)).1, "config.state_dir is NULL");
        let bad_utf8 = CString::new(vec![b'/', b't', 0xff, 0xfe]).unwrap();
        let mut bad = config;
        bad.state_dir = bad_utf8.as_ptr();
        let (code, msg) = take(tezzeret_forge_open(&bad, null(), &mut forge));
        assert_eq!(code, TEZZERET_CODE_INVALID_UTF8, "{msg}");
        assert!(msg.contains("config.state_dir"), "{msg}");
        for (field, value) in [("strategy", 7u32), ("device", 9), ("flags", 0x80)] {
            let mut bad = config;
            match field {
                "strategy" => bad.strategy = value,
                "device" => bad.device = value,
                _ => bad.flags = value,
            }
            let (code, msg) = take(tezzeret_forge_open(&bad, null(), &mut forge));
            assert_eq!(code, TEZZERET_CODE_INVALID_ARGUMENT, "{msg}");
            assert!(msg.contains(&format!("config.{field}")), "{msg}");
        }
        let mut bad = config;
        bad.struct_size = 4;
        let (code, msg) = take(tezzeret_forge_open(&bad, null(), &mut forge));
        assert_eq!(code, TEZZERET_CODE_INVALID_ARGUMENT);
        assert!(msg.contains("struct_size is 4"), "{msg}");
        assert!(forge.is_null(), "out-param untouched on failure");

        assert_eq!(take(tezzeret_forge_run(null_mut(), null_mut())).0, TEZZERET_CODE_NULL_ARGUMENT);
        assert_eq!(take(tezzeret_forge_catalog_json(null_mut(), null_mut())).0, TEZZERET_CODE_NULL_ARGUMENT);
        assert_eq!(take(tezzeret_config_init(null_mut(), 64)).0, TEZZERET_CODE_NULL_ARGUMENT);
        assert_eq!(take(tezzeret_host_callbacks_init(null_mut(), 64)).0, TEZZERET_CODE_NULL_ARGUMENT);
        assert_eq!(take(tezzeret_descriptor_sink_push(null_mut(), null(), 0)).0, TEZZERET_CODE_NULL_ARGUMENT);
        assert_eq!(take(tezzeret_descriptor_validate(null(), 3)).0, TEZZERET_CODE_NULL_ARGUMENT);
        let (code, msg) = take(tezzeret_descriptor_validate([0x0a, 0x09, 0x01].as_ptr(), 3));
        assert_eq!(code, TEZZERET_CODE_MALFORMED, "{msg}");
        assert!(msg.contains("BlueprintDescriptor"), "{msg}");
        let (code, msg) = take(tezzeret_descriptor_validate(null(), 0));
        assert_eq!(code, TEZZERET_CODE_INVALID_ARGUMENT, "empty bytes decode to an empty id: {msg}");
        let valid = descriptor("BP005", "relu_activation", BlueprintTier::Safe, None);
        ok(tezzeret_descriptor_validate(valid.as_ptr(), valid.len()));
    }
}

#[test]
fn config_init_never_writes_past_the_callers_size() {
    let mut bytes = [0xAAu8; 128];
    // The size of an older layout ending with `strategy` (its padding included).
    let ending = offset_of!(tezzeret_config, strategy) + size_of::<u32>();
    let small = ending.next_multiple_of(std::mem::align_of::<tezzeret_config>());
    let (code, msg) = take(unsafe { tezzeret_config_init(bytes.as_mut_ptr() as *mut tezzeret_config, ending + 1) });
    assert!(code == TEZZERET_CODE_INVALID_ARGUMENT && msg.contains("not the size of any of its layouts"), "{msg}");
    assert!(bytes.iter().all(|b| *b == 0xAA), "nothing written for a size no layout has");
    ok(unsafe { tezzeret_config_init(bytes.as_mut_ptr() as *mut tezzeret_config, small) });
    assert!(bytes[small..].iter().all(|b| *b == 0xAA), "wrote past struct_size");
    assert_eq!(usize::from_ne_bytes(bytes[..8].try_into().unwrap()), small);
    let too_small = unsafe { tezzeret_config_init(bytes.as_mut_ptr() as *mut tezzeret_config, 8) };
    assert_eq!(take(too_small).0, TEZZERET_CODE_INVALID_ARGUMENT);
}

#[test]
fn older_smaller_config_is_accepted_with_defaults() {
    let dir = TempDir::new("abi-old-config");
    let path = cstring(dir.path());
    // The oldest layout: struct_size + state_dir only, followed by garbage
    // the library must not read.
    #[repr(C)]
    struct OldConfig {
        struct_size: usize,
        state_dir: *const c_char,
        garbage: [u32; 16],
    }
    let old = OldConfig {
        struct_size: offset_of!(tezzeret_config, strategy),
        state_dir: path.as_ptr(),
        garbage: [0xFFFF_FFFF; 16],
    };
    let mut forge = null_mut();
    ok(unsafe { tezzeret_forge_open(&old as *const OldConfig as *const tezzeret_config, null(), &mut forge) });
    unsafe { tezzeret_forge_close(forge) };
}

#[test]
fn second_open_is_refused_in_process_and_across_processes() {
    let dir = TempDir::new("abi-lock");
    let path = cstring(dir.path());
    let config = config_for(&path);
    let mut first = null_mut();
    ok(unsafe { tezzeret_forge_open(&config, null(), &mut first) });
    let mut second = null_mut();
    let (code, msg) = take(unsafe { tezzeret_forge_open(&config, null(), &mut second) });
    assert_eq!(code, TEZZERET_CODE_STATE_LOCKED, "{msg}");
    assert!(msg.contains("already open") && msg.contains(&format!("pid {}", std::process::id())), "{msg}");
    assert!(second.is_null());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tezzeret"))
        .args(["forge", "--state", dir.path().to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already open by another forge") && stderr.contains("state_locked"), "{stderr}");

    unsafe { tezzeret_forge_close(first) };
    ok(unsafe { tezzeret_forge_open(&config, null(), &mut second) });
    unsafe { tezzeret_forge_close(second) };
}

#[test]
fn host_descriptors_updates_telemetry_and_release() {
    let dir = TempDir::new("abi-host");
    let path = cstring(dir.path());
    let mut config = config_for(&path);
    config.strategy = TEZZERET_STRATEGY_FAST;
    let mut rec = Recorder::default();
    rec.descriptors = vec![
        descriptor("BP002", "linear_projection", BlueprintTier::Safe, Some(("scale", 0.5, 2.0))),
        descriptor("BP028", "dense_connection", BlueprintTier::Safe, Some(("growth_rate", 8.0, 48.0))),
        descriptor("BP045", "nan_injection", BlueprintTier::HighRisk, Some(("frequency", 0.01, 0.1))),
        descriptor("BP002", "linear_projection", BlueprintTier::Safe, None), // duplicate id
        descriptor("BP009", "residual_block", BlueprintTier::Safe, Some(("depth", 4.0, 1.0))), // min > max
        vec![0x0a, 0x40, b'x'],                                              // truncated
        descriptor("BP777", "unheard_of_block", BlueprintTier::Safe, None),  // no builder
    ];
    let callbacks = callbacks_for(&mut rec);
    let mut forge = null_mut();
    ok(unsafe { tezzeret_forge_open(&config, &callbacks, &mut forge) });
    let codes: Vec<u32> = rec.push_results.iter().map(|r| r.0).collect();
    assert_eq!(
        codes,
        [0, 0, 0, TEZZERET_CODE_INVALID_ARGUMENT, TEZZERET_CODE_INVALID_ARGUMENT, TEZZERET_CODE_MALFORMED, 0]
    );
    assert!(rec.push_results[3].1.contains("duplicate blueprint_id \"BP002\""));
    assert!(rec.push_results[4].1.contains("min 4 > max 1"));

    rec.forge = Some(forge);
    let mut summary = tezzeret_run_summary { struct_size: size_of::<tezzeret_run_summary>(), ..Default::default() };
    ok(unsafe { tezzeret_forge_run(forge, &mut summary) });
    assert_eq!((summary.total, summary.ok, summary.refused, summary.failed), (4, 2, 1, 1));
    let ids: Vec<&str> = rec.updates.iter().map(|u| u.blueprint_id.as_str()).collect();
    assert_eq!(ids, ["BP002", "BP028"]);
    for update in &rec.updates {
        let bytes = std::fs::read(&update.artifact_ref).expect("announced artifact exists");
        assert_eq!(tezzeret::base::hex::encode(&sha2_digest(&bytes)), update.checksum);
        assert_eq!(update.guard_digest.len(), 64);
        assert!(update.compile_ms > 0.0);
    }
    // A callback calling back into its own forge gets an error, not a deadlock.
    assert_eq!(rec.reentrant.len(), 2);
    assert!(rec.reentrant[0].1.contains("re-entrant"), "{:?}", rec.reentrant);
    // Telemetry: events named tezzeret.*; the failure carries a reason and makes the packet ERROR.
    let events: Vec<&str> = rec.telemetry.iter().flat_map(|p| p.events.iter().map(|e| e.description.as_str())).collect();
    assert!(events.contains(&"tezzeret.compile_started") && events.contains(&"tezzeret.compile_succeeded"));
    let failed = rec
        .telemetry
        .iter()
        .find(|p| p.events.iter().any(|e| e.description == "tezzeret.compile_failed"))
        .expect("a failure event");
    assert_eq!(failed.level, leyline::TelemetryLevel::Error as i32);
    assert_eq!(failed.events[0].attributes["reason"], "unsupported");
    assert!(rec.telemetry.iter().all(|p| p.source_subsystem == "tezzeret"));
    assert!(rec.logs.iter().any(|(level, line)| *level == TEZZERET_LOG_ERROR && line.contains("BP777")));

    // The stored catalog as JSON.
    let mut json = null_mut();
    ok(unsafe { tezzeret_forge_catalog_json(forge, &mut json) });
    let text = unsafe { std::slice::from_raw_parts(tezzeret_buffer_data(json), tezzeret_buffer_len(json)) };
    let doc: serde_json::Value = serde_json::from_slice(text).unwrap();
    assert_eq!(doc["artifacts"].as_array().unwrap().len(), 2);
    tezzeret_buffer_free(json);

    assert_eq!(rec.releases, 0);
    unsafe { tezzeret_forge_close(forge) };
    assert_eq!(rec.releases, 1, "release runs exactly once, at close");
}

fn sha2_digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[test]
fn failed_open_releases_the_callbacks_once() {
    let dir = TempDir::new("abi-enum-fail");
    let path = cstring(dir.path());
    let config = config_for(&path);
    let mut rec = Recorder { enumerate_rc: 7, ..Default::default() };
    let callbacks = callbacks_for(&mut rec);
    let mut forge = null_mut();
    let (code, msg) = take(unsafe { tezzeret_forge_open(&config, &callbacks, &mut forge) });
    assert_eq!(code, TEZZERET_CODE_INVALID_ARGUMENT);
    assert!(msg.contains("enumerate callback failed with code 7"), "{msg}");
    assert!(forge.is_null());
    assert_eq!(rec.releases, 1);
    // The directory is not left locked.
    ok(unsafe { tezzeret_forge_open(&config, null(), &mut forge) });
    unsafe { tezzeret_forge_close(forge) };
}

#[test]
fn a_panic_is_contained_and_poisons_only_its_handle() {
    let dir = TempDir::new("abi-panic");
    let path = cstring(dir.path());
    let config = config_for(&path);
    let mut rec = Recorder::default();
    let mut callbacks = callbacks_for(&mut rec);
    callbacks.enumerate = None; // the default catalog
    let mut forge = null_mut();
    ok(unsafe { tezzeret_forge_open(&config, &callbacks, &mut forge) });
    let (code, msg) = take(unsafe { tezzeret_forge_selftest_panic(forge) });
    assert_eq!(code, TEZZERET_CODE_INTERNAL);
    assert!(msg.contains("contained panic"), "{msg}");
    let (code, _) = take(unsafe { tezzeret_forge_run(forge, null_mut()) });
    assert_eq!(code, TEZZERET_CODE_POISONED);
    // The process and the rest of the library keep working.
    ok(tezzeret_check_abi(TEZZERET_ABI_MAJOR, TEZZERET_ABI_MINOR));
    unsafe { tezzeret_forge_close(forge) };
    assert_eq!(rec.releases, 1);
    let mut again = null_mut();
    ok(unsafe { tezzeret_forge_open(&config, null(), &mut again) });
    unsafe { tezzeret_forge_close(again) };
}

#[test]
fn cpp_exceptions_in_the_shim_never_reach_rust() {
    let err = tezzeret::build::compile::shim_exception_self_test().unwrap_err();
    assert!(err.message().contains("tezzeret shim self-test exception"), "{err}");
}

#[test]
fn run_summary_of_an_older_smaller_size() {
    let dir = TempDir::new("abi-summary");
    let path = cstring(dir.path());
    let mut config = config_for(&path);
    config.strategy = TEZZERET_STRATEGY_EMERGENCY;
    let mut rec = Recorder::default();
    rec.descriptors = vec![descriptor("BP005", "relu_activation", BlueprintTier::Safe, None)];
    let callbacks = callbacks_for(&mut rec);
    let mut forge = null_mut();
    ok(unsafe { tezzeret_forge_open(&config, &callbacks, &mut forge) });
    // An older caller knows only struct_size + total + ok.
    #[repr(C)]
    struct OldSummary {
        struct_size: usize,
        total: u32,
        ok: u32,
        sentinel: [u32; 3],
    }
    let mut old = OldSummary { struct_size: offset_of!(tezzeret_run_summary, cached), total: 0, ok: 0, sentinel: [0xDEAD; 3] };
    ok(unsafe { tezzeret_forge_run(forge, &mut old as *mut OldSummary as *mut tezzeret_run_summary) });
    assert_eq!((old.total, old.ok), (1, 1));
    assert_eq!(old.sentinel, [0xDEAD; 3], "nothing written past struct_size");
    unsafe { tezzeret_forge_close(forge) };
}
