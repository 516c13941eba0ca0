//! One forge used from several host threads at once, callbacks that block,
//! and callbacks that call back into the library — all through the C ABI.
use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message;
use tezzeret::ffi::*;
use tezzeret::base::leyline::{self, KernelCatalogUpdate, SystemHealth, TelemetryPacket};

use crate::cabi::{host_callbacks, ok, open_forge, take, Handle};
use crate::{wait_for, TempDir};

const BLOCKS: [(&str, &str); 4] =
    [("C0", "relu_activation"), ("C1", "gelu_activation"), ("C2", "layer_scaling"), ("C3", "skip_connection")];

/// What the host's callbacks see and do.
#[derive(Default)]
struct Host {
    /// Set while a callback runs; a second one entering meanwhile is an overlap.
    inside: AtomicBool,
    overlaps: AtomicUsize,
    updates: Mutex<Vec<KernelCatalogUpdate>>,
    packets: AtomicUsize,
    releases: AtomicUsize,
    /// While set, the telemetry callback blocks (after raising `blocked`).
    hold: AtomicBool,
    blocked: AtomicBool,
    /// When set, the catalog callback calls back into this forge and others.
    forge: AtomicPtr<tezzeret_forge>,
    other: AtomicPtr<tezzeret_forge>,
    guards_path: Mutex<Option<CString>>,
    /// When set, the release callback tries to close this forge (again).
    close_on_release: AtomicPtr<tezzeret_forge>,
    from_callback: Mutex<Vec<String>>,
}

impl Host {
    fn enter(&self) {
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn leave(&self) {
        self.inside.store(false, Ordering::SeqCst);
    }
    fn callbacks_seen(&self) -> usize {
        self.updates.lock().unwrap().len() + self.packets.load(Ordering::SeqCst)
    }
}

unsafe extern "C" fn enumerate(user: *mut c_void, sink: *mut tezzeret_descriptor_sink) -> i32 {
    let host = &*(user as *const Host);
    host.enter();
    for (id, name) in BLOCKS {
        let d = leyline::BlueprintDescriptor { blueprint_id: id.into(), name: name.into(), tier: 1, ..Default::default() };
        let bytes = d.encode_to_vec();
        tezzeret_status_free(tezzeret_descriptor_sink_push(sink, bytes.as_ptr(), bytes.len()));
    }
    host.leave();
    0
}

unsafe extern "C" fn on_update(user: *mut c_void, bytes: *const u8, len: usize) {
    let host = &*(user as *const Host);
    host.enter();
    let update = KernelCatalogUpdate::decode(std::slice::from_raw_parts(bytes, len)).unwrap();
    let forge = host.forge.load(Ordering::SeqCst);
    if !forge.is_null() {
        call_back_in(host, forge, &update);
    }
    host.updates.lock().unwrap().push(update);
    host.leave();
}

/// Calls made from inside a catalog callback, each result recorded.
unsafe fn call_back_in(host: &Host, forge: *mut tezzeret_forge, update: &KernelCatalogUpdate) {
    let mut seen = host.from_callback.lock().unwrap();
    let mut health = null_mut();
    let (code, message) = take(tezzeret_forge_health(forge, &mut health));
    seen.push(format!("same forge health: {code} {message}"));
    let id = CString::new("C0").unwrap();
    let (code, message) = take(tezzeret_forge_submit(forge, id.as_ptr(), 2, null_mut()));
    seen.push(format!("same forge submit: {code} {message}"));
    tezzeret_forge_close(forge); // does nothing from inside a callback
    let other = host.other.load(Ordering::SeqCst);
    let (code, _) = take(tezzeret_forge_health(other, &mut health));
    tezzeret_buffer_free(health);
    seen.push(format!("other forge health: {code}"));
    // The guard slot of the announced artifact is already durable and readable.
    let path = host.guards_path.lock().unwrap().clone().unwrap();
    let mut table = null_mut();
    let (code, _) = take(tezzeret_guard_table_open(path.as_ptr(), &mut table));
    let mut entry: tezzeret_guard_entry = std::mem::zeroed();
    entry.struct_size = std::mem::size_of::<tezzeret_guard_entry>();
    let id = CString::new(update.blueprint_id.clone()).unwrap();
    let (lookup, _) = take(tezzeret_guard_table_lookup(table, id.as_ptr(), &mut entry));
    tezzeret_guard_table_close(table);
    let checksum = CStr::from_ptr(entry.checksum.as_ptr()).to_string_lossy().into_owned();
    seen.push(format!("guard table: {code} {lookup} {}", checksum == update.checksum));
    let descriptor = leyline::BlueprintDescriptor { blueprint_id: "X".into(), name: "relu_activation".into(), tier: 1, ..Default::default() };
    let bytes = descriptor.encode_to_vec();
    seen.push(format!("validate: {}", take(tezzeret_descriptor_validate(bytes.as_ptr(), bytes.len())).0));
}

unsafe extern "C" fn on_telemetry(user: *mut c_void, bytes: *const u8, len: usize) {
    let host = &*(user as *const Host);
    host.enter();
    TelemetryPacket::decode(std::slice::from_raw_parts(bytes, len)).expect("telemetry decodes");
    host.packets.fetch_add(1, Ordering::SeqCst);
    if host.hold.load(Ordering::SeqCst) {
        host.blocked.store(true, Ordering::SeqCst);
        while host.hold.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        host.blocked.store(false, Ordering::SeqCst);
    }
    host.leave();
}

unsafe extern "C" fn on_release(user: *mut c_void) {
    let host = &*(user as *const Host);
    host.releases.fetch_add(1, Ordering::SeqCst);
    let forge = host.close_on_release.load(Ordering::SeqCst);
    if !forge.is_null() {
        tezzeret_forge_close(forge); // inside close's own callback: does nothing
    }
}

fn open(dir: &std::path::Path, host: &Host, refresh_ms: u64, telemetry_ms: u64) -> *mut tezzeret_forge {
    let user = host as *const Host as *mut c_void;
    let callbacks = host_callbacks(user, Some(enumerate), Some(on_update), Some(on_telemetry), Some(on_release));
    open_forge(dir, &callbacks, |config| {
        config.refresh_interval_ms = refresh_ms;
        config.telemetry_interval_ms = telemetry_ms;
    })
}

#[test]
fn host_threads_share_one_forge_while_its_background_thread_runs() {
    let dir = TempDir::new("cc-threads");
    let host = Box::new(Host::default());
    let forge = Handle(open(dir.path(), &host, 20, 5));
    let ids: Vec<CString> = BLOCKS.iter().map(|(id, _)| CString::new(*id).unwrap()).collect();
    std::thread::scope(|scope| {
        let ids = &ids;
        // Submits at every priority, then drains.
        scope.spawn(move || unsafe {
            for round in 0..3 {
                for (i, id) in ids.iter().enumerate() {
                    ok(tezzeret_forge_submit(forge.ptr(), id.as_ptr(), 1 + ((i + round) % 4) as u32, null_mut()));
                }
                ok(tezzeret_forge_drain(forge.ptr(), null_mut(), null_mut()));
            }
        });
        // Compiles urgently.
        scope.spawn(move || unsafe {
            for id in ids.iter().rev().take(2) {
                ok(tezzeret_forge_compile_now(forge.ptr(), id.as_ptr()));
            }
        });
        // Reads health, metrics and the catalog.
        scope.spawn(move || unsafe {
            for _ in 0..100 {
                let mut buffer = null_mut();
                ok(tezzeret_forge_health(forge.ptr(), &mut buffer));
                SystemHealth::decode(std::slice::from_raw_parts(tezzeret_buffer_data(buffer), tezzeret_buffer_len(buffer))).unwrap();
                tezzeret_buffer_free(buffer);
                ok(tezzeret_forge_metrics_prometheus(forge.ptr(), &mut buffer));
                let text = std::str::from_utf8(std::slice::from_raw_parts(tezzeret_buffer_data(buffer), tezzeret_buffer_len(buffer))).unwrap();
                assert!(text.contains("tezzeret_queue_depth"), "{text}");
                tezzeret_buffer_free(buffer);
                ok(tezzeret_forge_catalog_json(forge.ptr(), &mut buffer));
                tezzeret_buffer_free(buffer);
            }
        });
        // Prefetches, refreshes and reports resources.
        scope.spawn(move || unsafe {
            for n in 0..200 {
                let id = &BLOCKS[n % BLOCKS.len()].0;
                let request = leyline::KernelPrefetchRequest { request_id: format!("r{n}"), blueprint_id: id.to_string(), ..Default::default() };
                let bytes = request.encode_to_vec();
                let (mut kind, mut answer) = (0u32, null_mut());
                ok(tezzeret_forge_prefetch(forge.ptr(), bytes.as_ptr(), bytes.len(), &mut kind, &mut answer));
                assert!(kind == TEZZERET_PREFETCH_READY || kind == TEZZERET_PREFETCH_ERROR);
                tezzeret_buffer_free(answer);
                if n % 50 == 0 {
                    ok(tezzeret_forge_refresh(forge.ptr(), null_mut(), null_mut()));
                    ok(tezzeret_forge_report_resources(forge.ptr(), null()));
                }
            }
        });
    });
    unsafe { ok(tezzeret_forge_drain(forge.ptr(), null_mut(), null_mut())) };
    let mut announced: Vec<String> = host.updates.lock().unwrap().iter().map(|u| u.blueprint_id.clone()).collect();
    announced.sort();
    announced.dedup();
    assert_eq!(announced, ["C0", "C1", "C2", "C3"], "every block compiled and announced");
    assert_eq!(host.overlaps.load(Ordering::SeqCst), 0, "callbacks of one forge never overlap");
    unsafe { tezzeret_forge_close(forge.ptr()) };
    let seen = host.callbacks_seen();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(host.callbacks_seen(), seen, "no callback after close returned");
    assert_eq!(host.releases.load(Ordering::SeqCst), 1);
}

#[test]
fn a_blocking_callback_delays_other_calls_and_close_but_deadlocks_nothing() {
    let dir = TempDir::new("cc-blocking");
    let host = Box::new(Host::default());
    host.hold.store(true, Ordering::SeqCst);
    let forge = Handle(open(dir.path(), &host, 0, 5));
    wait_for("the telemetry callback to block", || host.blocked.load(Ordering::SeqCst));
    let returned = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let call = scope.spawn(|| unsafe {
            let mut buffer = null_mut();
            let status = take(tezzeret_forge_health(forge.ptr(), &mut buffer));
            tezzeret_buffer_free(buffer);
            returned.store(true, Ordering::SeqCst);
            status
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!returned.load(Ordering::SeqCst), "a call waits while a callback of its forge blocks");
        host.hold.store(false, Ordering::SeqCst);
        assert_eq!(call.join().unwrap().0, TEZZERET_CODE_OK, "and completes once it returns");
    });
    // Close while the background thread is inside a blocked callback.
    host.hold.store(true, Ordering::SeqCst);
    wait_for("the telemetry callback to block again", || host.blocked.load(Ordering::SeqCst));
    let closed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let close = scope.spawn(|| {
            unsafe { tezzeret_forge_close(forge.ptr()) };
            closed.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!closed.load(Ordering::SeqCst), "close waits for the callback in progress");
        let released = Instant::now();
        host.hold.store(false, Ordering::SeqCst);
        close.join().unwrap();
        assert!(released.elapsed() < Duration::from_secs(5), "close returns promptly after it: {:?}", released.elapsed());
    });
    let seen = host.callbacks_seen();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(host.callbacks_seen(), seen, "no callback after close returned");
    assert_eq!(host.releases.load(Ordering::SeqCst), 1);
}

#[test]
fn callbacks_may_call_other_forges_and_guard_tables_but_not_their_own_forge() {
    let (dir, other_dir) = (TempDir::new("cc-reentry"), TempDir::new("cc-reentry-other"));
    let host = Box::new(Host::default());
    let other_host = Box::new(Host::default());
    let forge = open(dir.path(), &host, 0, 0);
    let other = open(other_dir.path(), &other_host, 0, 0);
    host.forge.store(forge, Ordering::SeqCst);
    host.other.store(other, Ordering::SeqCst);
    *host.guards_path.lock().unwrap() = Some(CString::new(dir.path().join("guards.tbl").to_str().unwrap()).unwrap());
    let id = CString::new("C1").unwrap();
    unsafe { ok(tezzeret_forge_compile_now(forge, id.as_ptr())) };
    let seen = host.from_callback.lock().unwrap().clone();
    let expect = |prefix: &str, check: &dyn Fn(&str) -> bool| {
        let line = seen.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} not called: {seen:?}"));
        assert!(check(line), "{line}");
    };
    let refused = |l: &str| l.contains(&format!(": {TEZZERET_CODE_INVALID_ARGUMENT} ")) && l.contains("re-entrant");
    expect("same forge health", &refused);
    expect("same forge submit", &refused);
    expect("other forge health", &|l| l.ends_with(&format!(": {TEZZERET_CODE_OK}")));
    expect("guard table", &|l| l.ends_with(&format!(": {TEZZERET_CODE_OK} {TEZZERET_CODE_OK} true")));
    expect("validate", &|l| l.ends_with(&format!(": {TEZZERET_CODE_OK}")));
    // The close attempted from the callback did nothing: the forge still works.
    host.forge.store(null_mut(), Ordering::SeqCst);
    let mut buffer = null_mut();
    unsafe {
        ok(tezzeret_forge_health(forge, &mut buffer));
        tezzeret_buffer_free(buffer);
        // Close's own callbacks (the last telemetry packet, release) may not
        // close the handle a second time either.
        host.close_on_release.store(forge, Ordering::SeqCst);
        tezzeret_forge_close(forge);
        tezzeret_forge_close(other);
    }
    assert_eq!(host.releases.load(Ordering::SeqCst), 1);
    assert_eq!(other_host.releases.load(Ordering::SeqCst), 1);
}
