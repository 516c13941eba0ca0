//! Integrity of what the forge trusts: a damaged artifact file is never
//! reused or announced as good, a verification is trusted only for files
//! whose timestamps settled before it, keys come from the OS generator or
//! not at all, one batch rule for guard checks and kernel runs, and
//! contained panics stay off the host's stderr.
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::ptr::null_mut;

use tezzeret::base::leyline::KernelPrefetchRequest;
use tezzeret::build::catalog::Catalog;
use tezzeret::ffi::*;
use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, PrefetchAnswer};
use tezzeret::state::verify::verify_state;

use crate::cabi::{host_callbacks, open_forge, take};
use crate::{FixedCatalog, TempDir};

const CATALOG: &str = r#"[
 {"blueprint_id": "BP003", "name": "layer_norm_basic", "tier": "SAFE", "allowed_parameters": {"epsilon": [1e-06, 0.001]}},
 {"blueprint_id": "BP016", "name": "squeeze_excitation", "tier": "SAFE", "allowed_parameters": {"reduction": [4.0, 16.0]}}
]"#;

fn tezzeret(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tezzeret")).args(args).output().expect("runs")
}

/// `tezzeret forge --json` over the small catalog; the parsed document.
fn forge_json(dir: &Path) -> serde_json::Value {
    let catalog = dir.join("catalog.json");
    std::fs::write(&catalog, CATALOG).unwrap();
    let state = dir.join("s");
    let args = ["forge", "--state", state.to_str().unwrap(), "--catalog", catalog.to_str().unwrap(), "--device", "cpu", "--strategy", "fast", "--json"];
    let out = tezzeret(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Flips one byte in the middle of a file, in place (same size, same inode).
fn flip_middle_byte(path: &Path) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let middle = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, middle).unwrap();
    byte[0] ^= 0x20;
    file.write_all_at(&byte, middle).unwrap();
}

#[test]
fn a_damaged_artifact_is_recompiled_repaired_and_verifies() {
    let work = TempDir::new("integrity-repair");
    let first = forge_json(work.path());
    let entry = &first["artifacts"][0];
    let path = Path::new(entry["artifact_path"].as_str().unwrap()).to_path_buf();
    let good = std::fs::read(&path).unwrap();
    flip_middle_byte(&path);
    assert!(!verify_state(&work.path().join("s")).unwrap().problems.is_empty(), "the damage is seen");

    let second = forge_json(work.path());
    let again = &second["artifacts"][0];
    assert_eq!(again["status"], "ok", "recompiled, not reused: {again}");
    assert_eq!(again["checksum"], entry["checksum"], "the same deterministic bytes");
    assert_eq!(std::fs::read(&path).unwrap(), good, "the file on disk is repaired, not left damaged");
    let verification = verify_state(&work.path().join("s")).unwrap();
    assert!(verification.problems.is_empty(), "{:?}", verification.problems);
    let out = tezzeret(&["verify", "--state", work.path().join("s").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // And a third run reuses it: nothing is compiled again.
    assert_eq!(forge_json(work.path())["artifacts"][0]["status"], "cached");
}

fn ctime_ns(path: &Path) -> i128 {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec())
}

/// Sets a file's mtime to `mtime` (its ctime becomes "now").
fn set_mtime(path: &Path, mtime: std::time::SystemTime) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(mtime).unwrap();
}

#[test]
fn an_in_place_edit_right_after_verification_is_never_answered_ready() {
    let work = TempDir::new("integrity-racy");
    racy_edits_are_caught(&work.path().join("s"));
}

#[test]
fn an_in_place_edit_in_the_same_second_on_a_coarse_file_system_is_caught() {
    // Whole-second timestamps: an edit in the second of the verification,
    // with its mtime put back, leaves every timestamp as it was.
    let work = TempDir::new("integrity-coarse");
    let Some(mounted) = crate::Mounted::coarse_timestamps(&work.path().join("mnt")) else {
        assert!(
            std::env::var_os("TEZZERET_SKIP_MOUNTS").is_some(),
            "cannot loop-mount an ext2 image here (not root?): run as root, or set TEZZERET_SKIP_MOUNTS=1 to skip this test knowingly"
        );
        return;
    };
    let same_tick = racy_edits_are_caught(&mounted.dir.join("s"));
    assert!(same_tick > 0, "no edit fell in the verification's second: the case was not exercised");
}

/// Verifies an artifact by prefetch, edits it in place with its mtime put
/// back, and requires the next prefetch to refuse it, 50 times; returns how
/// many edits left the ctime unchanged (fell in the verification's tick).
fn racy_edits_are_caught(state: &Path) -> usize {
    let mut config = ForgeConfig::new(state);
    config.device = DevicePreference::Cpu;
    config.strategy = tezzeret::build::compile::Strategy::Fast;
    let mut forge = Forge::open(config, Box::new(FixedCatalog(Catalog::from_json(CATALOG).unwrap()))).unwrap();
    forge.compile_one("BP003").unwrap();
    let path = forge.store().artifact_path(&forge.artifacts()["BP003"]);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let request = KernelPrefetchRequest { request_id: "r".into(), blueprint_id: "BP003".into(), ..Default::default() };
    let mut same_tick = 0;
    for _ in 0..50 {
        // A verification, then an in-place edit with its mtime put back: only
        // the ctime can tell them apart, and within one timestamp tick not even that.
        set_mtime(&path, mtime);
        assert!(matches!(forge.prefetch(&request), PrefetchAnswer::Ready(_)));
        let before = ctime_ns(&path);
        flip_middle_byte(&path);
        set_mtime(&path, mtime);
        same_tick += usize::from(ctime_ns(&path) == before);
        match forge.prefetch(&request) {
            PrefetchAnswer::Error(e) => assert_eq!(e.reason, "checksum_mismatch"),
            PrefetchAnswer::Ready(_) => panic!("a changed file was answered ready"),
        }
        flip_middle_byte(&path);
    }
    // How often the edit fell in the verification's tick depends on the
    // file system's timestamps (coarse, or fine-grained once queried); the
    // answer must not.
    eprintln!("in-place edits within the verification's timestamp tick: {same_tick} of 50");
    same_tick
}

#[test]
fn keygen_fails_loudly_when_the_os_generator_fails() {
    let work = TempDir::new("integrity-keygen");
    let key = work.path().join("forge.key");
    let out = Command::new(env!("CARGO_BIN_EXE_tezzeret"))
        .args(["keygen", "--out", key.to_str().unwrap()])
        .env("TEZZERET_FAILPOINTS", "sys.random=error@1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OS random generator"), "{stderr}");
    assert!(!key.exists() && !work.path().join("forge.key.pub").exists(), "no key written from non-secret randomness");
    // Without the failure, a key pair.
    let out = tezzeret(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(key.exists());
}

/// Runs one test of this binary in a child process; returns its stderr.
fn child_stderr(test: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("TEZZERET_PANIC_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn contained_panics_stay_off_the_hosts_stderr() {
    if std::env::var_os("TEZZERET_PANIC_CHILD").is_some() {
        // The child: a host that triggers a contained panic.
        let work = TempDir::new("integrity-panic");
        let callbacks = host_callbacks(null_mut(), None, None, None, None);
        let forge = open_forge(work.path(), &callbacks, |config| config.telemetry_interval_ms = 0);
        let (code, message) = take(unsafe { tezzeret_forge_selftest_panic(forge) });
        assert_eq!(code, TEZZERET_CODE_INTERNAL);
        assert!(message.contains("tezzeret_forge_selftest_panic"), "the message is kept in the status: {message}");
        unsafe { tezzeret_forge_close(forge) };
        eprintln!("child done");
        return;
    }
    let stderr = child_stderr("integrity::contained_panics_stay_off_the_hosts_stderr");
    assert!(stderr.contains("child done"), "{stderr}");
    assert!(!stderr.contains("panicked at") && !stderr.contains("tezzeret_forge_selftest_panic"), "{stderr}");
}
