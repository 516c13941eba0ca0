//! The `tezzeret` CLI.
use std::process::{Command, Output};

use crate::TempDir;

fn tezzeret(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tezzeret")).args(args).output().expect("runs")
}

const SMALL_CATALOG: &str = r#"[
 {"blueprint_id": "BP003", "name": "layer_norm_basic", "tier": "BLUEPRINT_TIER_SAFE", "allowed_parameters": {"epsilon": [1e-06, 0.001]}},
 {"blueprint_id": "BP031", "name": "temporal_conv", "tier": "BLUEPRINT_TIER_SAFE", "allowed_parameters": {"dilation": [1.0, 5.0]}},
 {"blueprint_id": "BP047", "name": "memory_leak", "tier": "BLUEPRINT_TIER_HIGH_RISK", "quarantine_only": true}
]"#;

#[test]
fn forge_json_reports_every_field_and_is_deterministic_across_processes() {
    let work = TempDir::new("cli");
    let catalog = work.path().join("catalog.json");
    std::fs::write(&catalog, SMALL_CATALOG).unwrap();
    let run = |state: &str| {
        let dir = work.path().join(state);
        let out = tezzeret(&["forge", "--state", dir.to_str().unwrap(), "--catalog", catalog.to_str().unwrap(), "--device", "cpu", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
        doc
    };
    let a = run("a");
    let entries = a["artifacts"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    for field in ["blueprint_id", "status", "artifact_path", "checksum", "guard_spec", "guard_digest", "strategy", "compile_ms", "prewarm_p50_ms", "prewarm_p95_ms", "error"] {
        assert!(entries.iter().all(|e| e.get(field).is_some()), "field {field} missing");
    }
    assert_eq!(entries[0]["status"], "ok");
    assert_eq!(entries[0]["strategy"], "standard");
    assert_eq!(entries[0]["guard_spec"][0]["dtype"], "float32");
    assert_eq!(entries[2]["status"], "refused");
    assert!(entries[2]["error"].as_str().unwrap().contains("quarantine-only"));
    // A second process in another directory writes byte-identical artifacts.
    let b = run("b");
    for i in 0..2 {
        assert_eq!(a["artifacts"][i]["checksum"], b["artifacts"][i]["checksum"]);
        let bytes = std::fs::read(a["artifacts"][i]["artifact_path"].as_str().unwrap()).unwrap();
        assert_eq!(bytes, std::fs::read(b["artifacts"][i]["artifact_path"].as_str().unwrap()).unwrap());
    }
    // A relative state directory: the paths reported (and announced) are
    // absolute, readable from any working directory.
    let args = ["forge", "--state", "relative", "--catalog", catalog.to_str().unwrap(), "--device", "cpu", "--json"];
    let out = Command::new(env!("CARGO_BIN_EXE_tezzeret")).current_dir(work.path()).args(args).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let path = doc["artifacts"][0]["artifact_path"].as_str().unwrap();
    let expected = work.path().canonicalize().unwrap().join("relative");
    assert!(std::path::Path::new(path).starts_with(&expected), "{path}");
    assert_eq!(std::fs::read(path).unwrap(), std::fs::read(a["artifacts"][0]["artifact_path"].as_str().unwrap()).unwrap());
    // Resuming the same directory reuses everything.
    let again = run("a");
    assert_eq!(again["artifacts"][0]["status"], "cached");
    assert_eq!(again["artifacts"][1]["status"], "cached");

    let out = tezzeret(&["inspect", "--state", work.path().join("a").to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["artifacts"].as_array().unwrap().len(), 2);
    let out = tezzeret(&["inspect", "--state", work.path().join("a").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 stored artifacts"));
}

#[test]
fn forge_table_and_exit_status() {
    let work = TempDir::new("cli-table");
    let catalog = work.path().join("catalog.json");
    std::fs::write(&catalog, SMALL_CATALOG).unwrap();
    let state = work.path().join("s");
    let out = tezzeret(&["forge", "--state", state.to_str().unwrap(), "--catalog", catalog.to_str().unwrap(), "--strategy", "fast"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("BP031") && stdout.contains("2 ok, 0 cached, 0 failed, 1 refused"), "{stdout}");
    // Progress lines (one per queued job) go to stderr when it is not a terminal.
    assert!(String::from_utf8_lossy(&out.stderr).contains("[  1/2] BP003 ok"));
    // With quarantine compilation asked for, a blueprint without a builder
    // fails and the exit status says so.
    let out = tezzeret(&["forge", "--state", state.to_str().unwrap(), "--catalog", catalog.to_str().unwrap(), "--allow-quarantine"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bad_arguments_are_refused_clearly() {
    for (args, needle) in [
        (vec!["forge"], "--state <DIR>"),
        (vec!["forge", "--state", "/tmp/x", "--strategy", "ludicrous"], "unknown strategy \"ludicrous\""),
        (vec!["forge", "--state", "/tmp/x", "--jobs", "many"], "invalid value 'many' for '--jobs <N>'"),
        (vec!["forge", "--state", "/tmp/x", "--jobs", "0"], "invalid value '0' for '--jobs <N>'"),
        (vec!["forge", "--state", "/tmp/x", "--budget", "-1"], "positive number of seconds"),
        (vec!["forge", "--state", "/tmp/x", "--catalog", "/nonexistent.json"], "read catalog /nonexistent.json"),
        (vec!["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (vec!["inspect", "--state", "/nonexistent-state"], "does not exist"),
    ] {
        let out = tezzeret(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn every_subcommand_prints_its_help_and_exits_zero() {
    for command in ["forge", "serve", "inspect", "wal", "verify", "fleet-status", "fetch", "keygen", "bench", "version"] {
        let out = tezzeret(&[command, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{command} --help");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Usage: tezzeret") && stdout.contains(command), "{command}: {stdout}");
    }
    let out = tezzeret(&["forge", "--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for option in ["--state <DIR>", "--strategy", "--trusted-key", "--allow-quarantine", "--trace-events"] {
        assert!(stdout.contains(option), "forge --help lacks {option}: {stdout}");
    }
    let out = tezzeret(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verify"));
}

#[test]
fn bad_bus_options_are_usage_errors_naming_the_problem() {
    let dir = crate::TempDir::new("cli-bus");
    let state = dir.path().join("s");
    let state = state.to_str().unwrap();
    for (args, expected) in [
        (vec!["serve", "--state", state], "serve needs --redis URL"),
        (vec!["forge", "--state", state, "--redis", "http://127.0.0.1:1/"], "redis_url"),
        (vec!["forge", "--state", state, "--redis", "redis://127.0.0.1:1/", "--freshness", "1e300"], "at most a year"),
        (vec!["forge", "--state", state, "--redis", "redis://127.0.0.1:1/", "--claim-idle", "0.0001"], "claim idle time"),
    ] {
        let out = tezzeret(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?} should name {expected:?}: {stderr}");
    }
}

#[test]
fn fleet_times_out_of_range_are_usage_errors_naming_the_flag_and_its_range() {
    let dir = crate::TempDir::new("cli-fleet-times");
    let state = dir.path().join("s");
    let state = state.to_str().unwrap();
    for (flag, value, range) in [
        ("--lease-ttl", "0.05", "expected 0.1 to 86400 seconds"),
        ("--lease-wait", "-1", "expected 0 to 86400 seconds"),
        ("--s3-timeout", "100000", "expected 0.01 to 86400 seconds"),
        ("--s3-retry", "nan", "expected 0.01 to 86400 seconds"),
    ] {
        let out = tezzeret(&["forge", "--state", state, "--s3-bucket", "fleet", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(range), "{flag} {value}: {stderr}");
    }
    // A lease wait of 0 (compile at once rather than wait) is a valid choice:
    // the run goes on to the next check, the missing trusted keys.
    let out = tezzeret(&["forge", "--state", state, "--s3-bucket", "fleet", "--lease-wait", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs trusted keys"), "{}", String::from_utf8_lossy(&out.stderr));
    // Leases go to one place: the bus's Redis or a Redis of their own.
    let both = ["--fleet-leases-on-bus", "--fleet-lease-redis", "redis://127.0.0.1:1/0"];
    let out = tezzeret(&[&["forge", "--state", state, "--s3-bucket", "fleet"][..], &both[..]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn fleet_settings_the_s3_client_cannot_use_are_refused_before_any_request() {
    let dir = crate::TempDir::new("cli-fleet-settings");
    let key = dir.path().join("k");
    tezzeret::state::signing::keygen(&key).unwrap();
    let public = format!("{}.pub", key.display());
    let base = ["fleet-status", "--s3-bucket", "fleet", "--trusted-key", public.as_str()];
    for (extra, env, expected) in [
        (vec!["--s3-endpoint", "http://127.0.0.1:99999"], None, "is not a valid URL: invalid port number"),
        (vec!["--s3-endpoint", "http://:80"], None, "is not a valid URL: empty host"),
        (vec!["--s3-region", "not a region!"], None, "is not a region name"),
        (vec![], Some(("AWS_REGION", "x y")), "AWS_REGION \"x y\" is not a region name"),
        (vec![], Some(("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:99999")), "AWS_ENDPOINT_URL_S3 \"http://127.0.0.1:99999\" is not a valid URL"),
        (vec![], Some(("AWS_ACCESS_KEY_ID", "a\nb")), "AWS_ACCESS_KEY_ID has a character that is not visible ASCII"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tezzeret"));
        command.args(base).args(&extra).env("AWS_ACCESS_KEY_ID", "id").env("AWS_SECRET_ACCESS_KEY", "secret");
        if let Some((variable, value)) = env {
            command.env(variable, value);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?} {env:?}: {stderr}");
        assert!(stderr.contains(expected) && !stderr.contains("panicked"), "{extra:?} {env:?}: {stderr}");
    }
    // A consumer's fetch is checked alike.
    let reference = format!("s3://fleet/artifacts/{:0>64}.pt", "a");
    let out = dir.path().join("a.pt");
    let fetch = ["fetch", reference.as_str(), "--out", out.to_str().unwrap(), "--s3-endpoint", "http://127.0.0.1:99999"];
    let output = Command::new(env!("CARGO_BIN_EXE_tezzeret")).args(fetch).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid port number") && !out.exists(), "{stderr}");
}

#[test]
fn bench_prints_one_row_object_per_measurement() {
    let out = tezzeret(&["bench", "--only", "wal", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(rows.len() >= 5);
    for r in rows {
        assert!(r["name"].is_string() && r["ours"].as_f64().unwrap() > 0.0 && r["unit"].is_string(), "{r}");
        assert!(r.get("reference").is_some());
    }
    assert!(rows.iter().any(|r| r["name"].as_str().unwrap().contains("recovery of a WAL of 10000")));
}

#[test]
fn a_bus_secret_variable_named_but_unset_is_refused_and_an_unsigned_bus_is_warned_of() {
    let work = TempDir::new("cli-secret");
    let (state, catalog) = (work.path().join("state"), work.path().join("catalog.json"));
    std::fs::write(&catalog, SMALL_CATALOG).unwrap();
    let forge = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tezzeret"));
        command.args(["forge", "--state", state.to_str().unwrap(), "--catalog", catalog.to_str().unwrap()]);
        command.args(["--strategy", "emergency", "--device", "cpu", "--redis", "redis://127.0.0.1:1/"]).args(extra);
        command.env_remove("ESPER_LEYLINE_SECRET").env_remove("ESPER_SECRT").output().unwrap()
    };
    let out = forge(&["--secret-env", "ESPER_SECRT"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--secret-env ESPER_SECRT: the variable is unset or empty"), "{stderr}");
    assert!(!state.exists(), "refused before the forge opens");
    let out = forge(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: bus entries are unsigned") && stderr.contains("ESPER_LEYLINE_SECRET is not set"), "{stderr}");
}
