//! Signing and versioning: every manifest field and the artifact
//! bytes are covered, unknown keys are refused, keys rotate, revisions grow,
//! and an independent ed25519 implementation (Python `cryptography`) agrees.
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

use tezzeret::ffi::*;
use tezzeret::state::artifact::ManifestSignature;
use tezzeret::state::signing::{read_key_file, KeyRing};
use tezzeret::state::artifact::ArtifactRecord;

use crate::{repo_root, TempDir};

const CATALOG: &str = r#"[
 {"blueprint_id": "BP002", "name": "linear_projection", "tier": "SAFE", "allowed_parameters": {"scale": [0.5, 2.0]}},
 {"blueprint_id": "BP016", "name": "squeeze_excitation", "tier": "SAFE", "allowed_parameters": {"reduction": [4.0, 16.0]}}
]"#;

fn tezzeret(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tezzeret")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(name);
    let (code, text) = tezzeret(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    (key.clone(), PathBuf::from(format!("{}.pub", key.display())))
}

fn records(state: &Path) -> Vec<ArtifactRecord> {
    tezzeret::state::verify::read_journal(state).unwrap().1.artifacts.into_values().collect()
}

#[test]
fn every_manifest_field_and_the_artifact_are_covered() {
    let work = TempDir::new("sign-fields");
    let (secret, public) = keygen(work.path(), "k.key");
    let catalog = work.path().join("c.json");
    std::fs::write(&catalog, CATALOG).unwrap();
    let state = work.path().join("s");
    let s = state.to_str().unwrap();
    let (code, text) = tezzeret(&["forge", "--state", s, "--catalog", catalog.to_str().unwrap(), "--signing-key", secret.to_str().unwrap(), "--trusted-key", public.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let keys = KeyRing::new(None, &[read_key_file(&public).unwrap()]).unwrap();
    let record = records(&state).remove(0);
    assert_eq!(record.revision, 1);
    keys.verify(&record).unwrap();
    let tamper: Vec<(&str, Box<dyn Fn(&mut ArtifactRecord)>)> = vec![
        ("blueprint_id", Box::new(|r| r.blueprint_id.push('x'))),
        ("checksum", Box::new(|r| r.checksum = "0".repeat(64))),
        ("guard_digest", Box::new(|r| r.guard_digest = "1".repeat(64))),
        ("strategy", Box::new(|r| r.strategy = "fast".into())),
        ("variant", Box::new(|r| r.variant = "trace".into())),
        ("tezzeret_version", Box::new(|r| r.tezzeret_version = "9.9.9".into())),
        ("torch_version", Box::new(|r| r.torch_version = "1.0.0".into())),
        ("format_version", Box::new(|r| r.format_version += 1)),
        ("device", Box::new(|r| r.device = "cuda:0".into())),
        ("revision", Box::new(|r| r.revision += 1)),
        ("signature", Box::new(|r| {
            let s = r.signature.as_mut().unwrap();
            let flipped = if s.signature.starts_with('0') { "1" } else { "0" };
            s.signature.replace_range(0..1, flipped);
        })),
    ];
    for (field, change) in tamper {
        let mut changed = record.clone();
        change(&mut changed);
        let err = keys.verify(&changed).unwrap_err();
        assert!(err.message().starts_with("signature_invalid"), "{field}: {err}");
    }
    let mut unsigned = record.clone();
    unsigned.signature = None;
    assert!(keys.verify(&unsigned).unwrap_err().message().contains("is unsigned"));
    // A key nobody trusts.
    let (_, stranger) = keygen(work.path(), "stranger.key");
    let strangers = KeyRing::new(None, &[read_key_file(&stranger).unwrap()]).unwrap();
    assert!(strangers.verify(&record).unwrap_err().message().contains("untrusted key"));
    // The artifact bytes: verify names the artifact; the forge refuses to reuse it.
    let path = state.join("artifacts").join(&record.artifact_file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (code, text) = tezzeret(&["verify", "--state", s, "--trusted-key", public.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(text.contains(&format!("FAIL {}: checksum_mismatch", record.blueprint_id)), "{text}");
}

/// A host that records log lines.
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
impl tezzeret::forge::Host for Logs {
    fn enumerate(&mut self) -> tezzeret::Result<Option<tezzeret::build::catalog::Catalog>> {
        Ok(Some(tezzeret::build::catalog::Catalog::from_json(CATALOG).unwrap()))
    }
    fn log(&mut self, _level: tezzeret::forge::LogLevel, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

#[test]
fn a_forge_that_verifies_but_cannot_sign_fails_a_compile_instead_of_storing_what_it_would_refuse() {
    use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, JobStatus};
    let work = TempDir::new("sign-verify-only");
    let (_, public) = keygen(work.path(), "k.key");
    let mut config = ForgeConfig::new(work.path().join("s"));
    config.device = DevicePreference::Cpu;
    config.strategy = tezzeret::build::compile::Strategy::Fast;
    config.keys = KeyRing::new(None, &[read_key_file(&public).unwrap()]).unwrap();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut forge = Forge::open(config, Box::new(Logs(logs))).unwrap();
    let report = forge.compile_one("BP002").unwrap();
    assert_eq!(report.status, JobStatus::Failed);
    let error = report.error.expect("why");
    assert_eq!(error.reason_name(), "signature_invalid");
    assert!(error.message().contains("BP002 is not compiled: this forge accepts only artifacts signed by a trusted key"), "{error}");
    assert!(forge.artifacts().is_empty(), "nothing stored or made current");
}

#[test]
fn a_durable_manifest_tampered_alone_is_refused_and_not_adopted() {
    use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, JobStatus};
    let work = TempDir::new("sign-adopt");
    let (secret, public) = keygen(work.path(), "k.key");
    let state = work.path().join("s");
    let config = || {
        let mut c = ForgeConfig::new(&state);
        c.device = DevicePreference::Cpu;
        c.strategy = tezzeret::build::compile::Strategy::Fast;
        c.keys = KeyRing::new(Some(read_key_file(&secret).unwrap()), &[read_key_file(&public).unwrap()]).unwrap();
        c
    };
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut forge = Forge::open(config(), Box::new(Logs(logs.clone()))).unwrap();
    assert_eq!(forge.compile_one("BP002").unwrap().status, JobStatus::Ok);
    let record = forge.artifacts()["BP002"].clone();
    drop(forge);
    // Fresh state: only the store is left (no journal, no guard table), as if
    // a crash came between storing the artifact and committing it; the
    // manifest alone is changed (one signed field), the artifact file is intact.
    std::fs::remove_file(state.join("wal.log")).unwrap();
    std::fs::remove_file(state.join("guards.tbl")).unwrap();
    let manifest = state.join("manifests").join(format!("{}.json", record.cache_key));
    let tampered = std::fs::read_to_string(&manifest).unwrap().replace(&format!("\"variant\": \"{}\"", record.variant), &format!("\"variant\": \"{}-edited\"", record.variant));
    assert_ne!(tampered, std::fs::read_to_string(&manifest).unwrap(), "the manifest is changed");
    std::fs::write(&manifest, tampered).unwrap();
    let path = state.join("artifacts").join(&record.artifact_file);
    assert_eq!(tezzeret::state::artifact::checksum_of(&std::fs::read(&path).unwrap()), record.checksum, "the artifact is intact");

    let mut forge = Forge::open(config(), Box::new(Logs(logs.clone()))).unwrap();
    let report = forge.compile_one("BP002").unwrap();
    assert_eq!(report.status, JobStatus::Ok, "compiled again, not adopted (cached): {report:?}");
    let refused: Vec<String> = logs.lock().unwrap().iter().filter(|l| l.contains("not adopted")).cloned().collect();
    assert_eq!(refused.len(), 1, "{:?}", logs.lock().unwrap());
    assert!(refused[0].contains("signature_invalid") && refused[0].contains("does not match its manifest"), "{refused:?}");
    // What is current now verifies, signature included.
    let keys = KeyRing::new(None, &[read_key_file(&public).unwrap()]).unwrap();
    keys.verify(&forge.artifacts()["BP002"]).unwrap();
    drop(forge);
    let (code, text) = tezzeret(&["verify", "--state", state.to_str().unwrap(), "--trusted-key", public.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn keys_rotate_and_a_removed_key_retires_its_artifacts() {
    let work = TempDir::new("sign-rotate");
    let (old_secret, old_public) = keygen(work.path(), "old.key");
    let (new_secret, new_public) = keygen(work.path(), "new.key");
    let catalog = work.path().join("c.json");
    std::fs::write(&catalog, CATALOG).unwrap();
    let state = work.path().join("s");
    let (s, c) = (state.to_str().unwrap().to_string(), catalog.to_str().unwrap().to_string());
    let (op, np) = (old_public.to_str().unwrap().to_string(), new_public.to_str().unwrap().to_string());
    let forge = |secret: &Path, trusted: &[&str]| {
        let mut args = vec!["forge", "--state", &s, "--catalog", &c, "--json", "--signing-key", secret.to_str().unwrap()];
        for t in trusted {
            args.extend(["--trusted-key", t]);
        }
        let (code, text) = tezzeret(&args);
        assert_eq!(code, 0, "{text}");
        let doc: serde_json::Value = serde_json::from_str(&text[..text.rfind('}').unwrap() + 1]).unwrap();
        let statuses = doc["artifacts"].as_array().unwrap().iter().map(|a| a["status"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        (statuses, text)
    };
    assert_eq!(forge(&old_secret, &[&op]).0, ["ok", "ok"]);
    // Rotation: sign with the new key, trust both: old artifacts still verify (reused).
    assert_eq!(forge(&new_secret, &[&op, &np]).0, ["cached", "cached"]);
    let (code, _) = tezzeret(&["verify", "--state", &s, "--trusted-key", &op, "--trusted-key", &np]);
    assert_eq!(code, 0);
    // The old key removed from the trusted set: its artifacts fail…
    let (code, text) = tezzeret(&["verify", "--state", &s, "--trusted-key", &np]);
    assert_eq!(code, 1);
    assert!(text.contains("signature_invalid") && text.contains("untrusted key"), "{text}");
    // …and the forge retires them at open (a warning: retiring them is
    // the point of removing the key) and signs new ones, at a higher revision.
    let (statuses, text) = forge(&new_secret, &[&np]);
    assert_eq!(statuses, ["ok", "ok"]);
    let retired: Vec<&str> = text.lines().filter(|l| l.contains("retired (its key is no longer trusted)")).collect();
    assert!(retired.len() == 2 && retired.iter().all(|l| l.starts_with("tezzeret: Warn: ")), "{text}");
    assert!(!text.contains("Error: "), "{text}");
    let new_key = read_key_file(&new_public).unwrap();
    for r in records(&state) {
        assert_eq!(r.signature.as_ref().unwrap().public_key, tezzeret::base::hex::encode(&new_key));
        assert_eq!(r.revision, 2, "{}", r.blueprint_id);
    }
    let (code, _) = tezzeret(&["verify", "--state", &s, "--trusted-key", &np]);
    assert_eq!(code, 0);
}

#[test]
fn python_cryptography_verifies_our_signatures() {
    let work = TempDir::new("sign-python");
    let (secret, public) = keygen(work.path(), "k.key");
    let state = work.path().join("s");
    let (code, text) = tezzeret(&["forge", "--state", state.to_str().unwrap(), "--signing-key", secret.to_str().unwrap(), "--trusted-key", public.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let all = records(&state);
    assert_eq!(all.len(), 42);
    let file = work.path().join("records.json");
    std::fs::write(&file, serde_json::to_vec(&all).unwrap()).unwrap();
    let python = std::env::var("TEZZERET_PYTHON").expect("TEZZERET_PYTHON is set by scripts/env.sh");
    let out = Command::new(python).arg(repo_root().join("tests/python/verify_signatures.py")).arg(&file).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("42 passed, 0 failed"), "{text}");
    // And it refuses a tampered one (the check can fail).
    let mut tampered = all.clone();
    tampered[0].guard_digest = "0".repeat(64);
    std::fs::write(&file, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let python = std::env::var("TEZZERET_PYTHON").unwrap();
    let out = Command::new(python).arg(repo_root().join("tests/python/verify_signatures.py")).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let _: Option<ManifestSignature> = None;
}

#[test]
fn keys_through_the_c_abi() {
    let work = TempDir::new("sign-abi");
    let dir = CString::new(work.path().join("s").to_str().unwrap()).unwrap();
    let (secret, public) = keygen(work.path(), "k.key");
    let seed = read_key_file(&secret).unwrap();
    let trusted = read_key_file(&public).unwrap();
    unsafe {
        let mut config: tezzeret_config = std::mem::zeroed();
        assert!(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()).is_null());
        config.state_dir = dir.as_ptr();
        config.device = TEZZERET_DEVICE_CPU;
        config.strategy = TEZZERET_STRATEGY_EMERGENCY;
        config.signing_key = seed.as_ptr();
        config.trusted_keys = trusted.as_ptr();
        config.trusted_key_count = 1;
        let mut forge = std::ptr::null_mut();
        assert!(tezzeret_forge_open(&config, std::ptr::null(), &mut forge).is_null());
        let mut summary = tezzeret_run_summary { struct_size: std::mem::size_of::<tezzeret_run_summary>(), ..Default::default() };
        assert!(tezzeret_forge_run(forge, &mut summary).is_null());
        assert_eq!(summary.ok, 42);
        tezzeret_forge_close(forge);
        let keys = KeyRing::new(None, &[trusted]).unwrap();
        assert!(records(&work.path().join("s")).iter().all(|r| keys.verify(r).is_ok()));
        // NULL keys with a count, and a point that is not a public key: refused, named.
        config.trusted_keys = std::ptr::null();
        let st = tezzeret_forge_open(&config, std::ptr::null(), &mut forge);
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_NULL_ARGUMENT);
        tezzeret_status_free(st);
        let mut bad = [0u8; 32];
        bad[0] = 2; // not on the curve
        bad[31] = 0x80;
        config.trusted_keys = bad.as_ptr();
        let st = tezzeret_forge_open(&config, std::ptr::null(), &mut forge);
        let message = std::ffi::CStr::from_ptr(tezzeret_status_message(st)).to_string_lossy().into_owned();
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_INVALID_ARGUMENT, "{message}");
        assert!(message.contains("trusted key 0"), "{message}");
        tezzeret_status_free(st);
    }
}

#[test]
fn keygen_through_the_c_abi_makes_a_fresh_pair_whose_public_key_is_the_secrets() {
    use tezzeret::ffi::tezzeret_keygen;
    let (mut secret, mut public) = ([0u8; 32], [0u8; 32]);
    // SAFETY: two writable 32-byte buffers.
    crate::cabi::ok(unsafe { tezzeret_keygen(secret.as_mut_ptr(), public.as_mut_ptr()) });
    let (mut secret2, mut public2) = ([0u8; 32], [0u8; 32]);
    // SAFETY: as above.
    crate::cabi::ok(unsafe { tezzeret_keygen(secret2.as_mut_ptr(), public2.as_mut_ptr()) });
    assert_ne!(secret, secret2, "each pair is new");
    assert_eq!(ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key().to_bytes(), public);
    assert_eq!(ed25519_dalek::SigningKey::from_bytes(&secret2).verifying_key().to_bytes(), public2);
    tezzeret::state::signing::KeyRing::new(Some(secret), &[public]).expect("a usable key ring");
}

#[test]
fn a_signing_key_must_be_among_the_trusted_keys_when_there_are_any() {
    let work = TempDir::new("sign-untrusted-signer");
    let (secret, public) = keygen(work.path(), "signer");
    let (_, other) = keygen(work.path(), "other");
    let seed = read_key_file(&secret).unwrap();
    let (public, other) = (read_key_file(&public).unwrap(), read_key_file(&other).unwrap());
    let error = KeyRing::new(Some(seed), &[other]).unwrap_err().to_string();
    assert!(error.contains("signing key") && error.contains("not among the trusted keys"), "{error}");
    KeyRing::new(Some(seed), &[other, public]).unwrap();
    KeyRing::new(Some(seed), &[]).unwrap();
    // The usual slip: the public file given as the signing key.
    let state = work.path().join("s");
    let pub_file = format!("{}.pub", work.path().join("signer").display());
    let (code, text) = tezzeret(&["forge", "--state", state.to_str().unwrap(), "--signing-key", &pub_file, "--trusted-key", &pub_file]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not among the trusted keys"), "{text}");
}
