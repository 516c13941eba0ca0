//! Forges sharing artifacts through a real SeaweedFS bucket: three forge
//! processes on a cold bucket compile each blueprint once between them; a
//! tampered artifact, a manifest signed by an untrusted key and a
//! truncated artifact are refused and compiled locally (and the bucket
//! healed); a local artifact that does not verify is taken from the
//! bucket instead of compiled again; the store killed mid-run and restarted (jobs complete
//! locally, publication catches up; an update announced with its local
//! path in an outage is announced with its reference once the bucket's
//! copy is taken instead of a damaged local one); a lease holder killed (another forge
//! takes over once the lease expires); a forge that stops mid-run gives
//! back the claims it sent ahead; a drain starts where no other host
//! claimed (or at its member index's own place) and sets aside what
//! others claimed; a compiled job commits
//! once its upload ends while the next jobs go on; waiting on several keys
//! lists the bucket once (or, with a Redis, its announcements, and takes
//! small artifacts from its relay); conditional create with one winner; a
//! consumer without a forge fetches an announced artifact by its reference.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::holding_proxy::HoldingProxy;
use super::redis_server::RedisServer;
use super::seaweed_server::{SeaweedServer, ACCESS_KEY, SECRET_KEY};
use super::{wait_for, TempDir};
use tezzeret::base::leyline::{self, KernelCatalogUpdate, KernelPrefetchRequest, PrefetchAnswer};
use tezzeret::build::catalog::Catalog;
use tezzeret::fleet::manifest::SharedManifest;
use tezzeret::fleet::remote::{Create, Got, RemoteStore};
use tezzeret::fleet::lease::LeaseState;
use tezzeret::fleet::objects::ObjectNames;
use tezzeret::fleet::{ArtifactCheck, FleetConfig, FleetMetrics, Lookup, Refusal, Watched};
use tezzeret::forge::{DevicePreference, ForgeConfig, ForgeService, Host, JobReport, JobStatus, LogLevel, Progress};
use tezzeret::state::artifact::ArtifactRecord;
use tezzeret::state::signing::{generate_keypair, keygen, KeyRing};

/// Five quick blueprints of the default catalog.
const FIVE: &[&str] = &["BP001", "BP002", "BP005", "BP006", "BP011"];

fn catalog(ids: &[&str]) -> Catalog {
    let all = Catalog::default_catalog();
    Catalog::new(ids.iter().map(|id| all.get(id).expect("known id").clone()).collect()).unwrap()
}

/// A fleet's signing key, trusted by every member.
fn fleet_keys() -> KeyRing {
    fleet_key_pair().0
}

/// The same, with the public key.
fn fleet_key_pair() -> (KeyRing, [u8; 32]) {
    let (seed, public) = generate_keypair().unwrap();
    (KeyRing::new(Some(seed), &[public]).unwrap(), public)
}

/// What a test host saw: catalog updates and log lines.
#[derive(Default)]
struct Seen {
    updates: Vec<KernelCatalogUpdate>,
    logs: Vec<String>,
}

struct RecordingHost {
    catalog: Catalog,
    seen: Arc<Mutex<Seen>>,
}

impl Host for RecordingHost {
    fn enumerate(&mut self) -> tezzeret::Result<Option<Catalog>> {
        Ok(Some(self.catalog.clone()))
    }
    fn catalog_update(&mut self, bytes: &[u8]) {
        self.seen.lock().unwrap().updates.push(leyline::decode(bytes).unwrap());
    }
    fn log(&mut self, _level: LogLevel, message: &str) {
        self.seen.lock().unwrap().logs.push(message.to_string());
    }
}

/// A forge of the fleet in this process.
struct Member {
    service: ForgeService,
    seen: Arc<Mutex<Seen>>,
}

impl Member {
    fn open(state: &Path, ids: &[&str], keys: &KeyRing, fleet: FleetConfig) -> Member {
        let mut config = ForgeConfig::new(state);
        config.device = DevicePreference::Cpu;
        config.telemetry_interval_ms = 0;
        config.keys = keys.clone();
        config.fleet = Some(fleet);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let host = RecordingHost { catalog: catalog(ids), seen: seen.clone() };
        Member { service: ForgeService::open(config, Box::new(host)).expect("open a fleet member"), seen }
    }

    fn run(&self) -> BTreeMap<String, JobStatus> {
        let reports: Vec<JobReport> = self.service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
        reports.into_iter().map(|r| (r.blueprint_id, r.status)).collect()
    }

    fn metrics(&self) -> FleetMetrics {
        self.service.with(|f| Ok(f.fleet_metrics().expect("a fleet member"))).unwrap()
    }

    fn unshared(&self) -> usize {
        self.service.with(|f| Ok(f.unshared())).unwrap()
    }

    fn artifact_ref(&self, id: &str) -> String {
        let request = KernelPrefetchRequest { request_id: "r".into(), blueprint_id: id.into(), ..Default::default() };
        match self.service.prefetch(&request).unwrap() {
            PrefetchAnswer::Ready(ready) => ready.artifact_ref,
            PrefetchAnswer::Error(e) => panic!("{id} not ready: {}", e.reason),
        }
    }
}

fn refused(metrics: &FleetMetrics, reason: Refusal) -> u64 {
    metrics.refusals.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
}

fn with_prefix(server: &SeaweedServer, prefix: &str) -> FleetConfig {
    let mut config = server.fleet_config();
    config.prefix = prefix.to_string();
    config
}

/// A fresh bucket (under `prefix`) into which a first member compiled
/// and published [`FIVE`]; the server and directory live as long as it.
struct FivePublished {
    server: SeaweedServer,
    dir: TempDir,
    keys: KeyRing,
    fleet: FleetConfig,
    first: Member,
}

fn five_published(prefix: &str) -> FivePublished {
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new(&format!("fleet-{prefix}"));
    let keys = fleet_keys();
    let fleet = with_prefix(&server, prefix);
    let first = Member::open(&dir.path().join("a"), FIVE, &keys, fleet.clone());
    assert!(first.run().values().all(|s| *s == JobStatus::Ok));
    FivePublished { server, dir, keys, fleet, first }
}

/// The current record of a blueprint as a member stored it.
fn record_of(member: &Member, id: &str) -> ArtifactRecord {
    member.service.with(|f| Ok(f.artifacts()[id].clone())).unwrap()
}

fn tezzeret() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tezzeret"));
    command.env("AWS_ACCESS_KEY_ID", ACCESS_KEY).env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    command
}

fn fleet_args(server: &SeaweedServer, prefix: &str, key: &Path) -> Vec<String> {
    let public = PathBuf::from(format!("{}.pub", key.display()));
    [
        "--device",
        "cpu",
        "--s3-bucket",
        &server.bucket,
        "--s3-endpoint",
        &server.endpoint(),
        "--s3-prefix",
        prefix,
        "--signing-key",
        &key.display().to_string(),
        "--trusted-key",
        &public.display().to_string(),
        "--s3-timeout",
        &server.fleet_config().request_timeout.as_secs().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn three_hosts_on_a_cold_bucket_compile_each_blueprint_once() {
    let server = SeaweedServer::start("fleet");
    let survey = three_hosts_compile_each_blueprint_once(&server, &[]);
    assert_eq!(survey["lease_redis"], serde_json::Value::Null);
    let store = RemoteStore::connect(&server.fleet_config()).unwrap();
    let names = tezzeret::fleet::objects::ObjectNames::new(&server.bucket, "cold");
    assert_eq!(store.run(store.list(&names.leases())).unwrap().len(), 42, "a kept lease per key, in the bucket");
}

#[test]
fn three_hosts_with_leases_on_redis_compile_each_blueprint_once() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let survey = three_hosts_compile_each_blueprint_once(&server, &["--fleet-lease-redis".into(), redis.url()]);
    assert!(survey["lease_redis"].as_str().is_some_and(|s| redis.url().contains(s)), "{}", survey["lease_redis"]);
    // The leases went to Redis, none to the bucket.
    let store = RemoteStore::connect(&server.fleet_config()).unwrap();
    let names = tezzeret::fleet::objects::ObjectNames::new(&server.bucket, "cold");
    assert_eq!(store.run(store.list(&names.leases())).unwrap().len(), 0, "no lease object in the bucket");
    let hash = tezzeret::fleet::redis_hash::FleetRedis::hash_key(&names);
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&hash).query(&mut redis.connection()).unwrap();
    let count_under = |folder: String| fields.iter().filter(|f| f.starts_with(&folder)).count();
    assert_eq!(count_under(names.leases()), 42, "a kept lease per key, in Redis: {fields:?}");
    assert_eq!(count_under(names.manifests()), 42, "a publication announced per key: {fields:?}");
    assert_eq!(fields.len(), 84);
    let pattern = format!("tezzeret:fleet-relay:{}/cold/artifacts/*", server.bucket);
    let relayed: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut redis.connection()).unwrap();
    assert_eq!(relayed.len(), 42, "every (small) artifact relayed: {relayed:?}");
}

#[test]
fn a_forge_run_that_cannot_use_its_store_says_why_and_counts_what_it_compiled() {
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-wrong-secret");
    let key = dir.path().join("fleet.key");
    keygen(&key).unwrap();
    // A forge run with one AWS_* variable set to `value`.
    let forge_with = |variable: &str, value: &str, state: &str, extra: &[&str]| {
        let mut command = tezzeret();
        command.env(variable, value).arg("forge").arg("--state").arg(dir.path().join(state));
        command.args(fleet_args(&server, "wrong-secret", &key)).args(extra).output().unwrap()
    };
    let out = forge_with("AWS_SECRET_ACCESS_KEY", "not-the-secret", "host", &["--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The first warnings name the cause, on one line each; the rest are counted.
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("tezzeret: Warn:")).collect();
    assert_eq!(warnings.len(), 5, "{stderr}");
    assert!(warnings.iter().all(|w| w.contains("SignatureDoesNotMatch: ") && w.contains("(check the fleet's credentials)")), "{stderr}");
    assert!(warnings.iter().filter(|w| w.contains("could not use the fleet store, compiling locally")).count() >= 3, "{stderr}");
    assert!(!stderr.contains("<?xml") && stderr.contains("more warnings"), "{stderr}");
    let document: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let compiled = document["artifacts"].as_array().unwrap().iter().filter(|a| a["status"] == "ok").count();
    assert_eq!(compiled, 42);
    assert_eq!(document["fleet"]["misses"], 42, "every compile is counted as compiled here");
    assert_eq!(document["fleet"]["unshared"], 42);
    // The bucket, asked with the right secret, holds none of them.
    let public = format!("{}.pub", key.display());
    let status = |state: &Path| {
        let args = &fleet_args(&server, "wrong-secret", &key)[2..8];
        tezzeret().arg("fleet-status").args(args).args(["--trusted-key", &public, "--state"]).arg(state).output().unwrap()
    };
    let out = status(&dir.path().join("host"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("local catalog: 42 artifacts, 0 of their cache keys in the bucket (verified), 42 not; 42 not published"), "{text}");
    let out = status(&dir.path().join("nowhere"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("holds no forge state"));
    // Text from the bucket is untrusted: a lease holder's name with control
    // characters in it is shown escaped.
    let store = RemoteStore::connect(&with_prefix(&server, "wrong-secret")).unwrap();
    let lease = ObjectNames::new(&server.bucket, "wrong-secret").lease("planted", 0);
    let body = format!(r#"{{"holder":"evil\u001b[2J","expires_at_ms":{}}}"#, u64::MAX / 2);
    assert_eq!(store.run(store.create(&lease, body.into_bytes())).unwrap(), Create::Created);
    let text = String::from_utf8_lossy(&status(&dir.path().join("host")).stdout).into_owned();
    assert!(text.contains("planted: held by evil\\u{1b}[2J") && !text.contains('\x1b'), "{text}");

    // Half a key pair in the environment is refused, naming both variables.
    let out = forge_with("AWS_ACCESS_KEY_ID", "", "half", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is unset or empty"), "{stderr}");

    // Store options without a bucket are a mistake, not a run without a fleet.
    let out = tezzeret().arg("forge").arg("--state").arg(dir.path().join("other")).args(["--s3-endpoint", &server.endpoint()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--s3-bucket"));
}

/// Three `tezzeret forge` processes (member indices 0-2, `extra` options)
/// on the cold prefix `cold`: each blueprint compiled once between them,
/// every host ending with all 42 verified; returns `fleet-status --json`.
fn three_hosts_compile_each_blueprint_once(server: &SeaweedServer, extra: &[String]) -> serde_json::Value {
    let dir = TempDir::new("fleet-three");
    let key = dir.path().join("fleet.key");
    keygen(&key).unwrap();
    let hosts: Vec<_> = (0..3)
        .map(|i| {
            tezzeret()
                .arg("forge")
                .arg("--state")
                .arg(dir.path().join(format!("host{i}")))
                .args(fleet_args(server, "cold", &key))
                .args(extra)
                .args(["--fleet-index", &i.to_string()])
                .arg("--json")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut compiled_by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, host) in hosts.into_iter().enumerate() {
        let out = host.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "host {i}: {stderr}");
        // Progress counts finished jobs, wherever in the queue a host began.
        let counts: Vec<&str> = stderr.lines().filter_map(|l| l.strip_prefix('[')?.split(']').next()).collect();
        let expected: Vec<String> = (1..=42).map(|n| format!("{n:>3}/42")).collect();
        assert_eq!(counts, expected, "host {i}: {stderr}");
        let document: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ready = 0;
        for artifact in document["artifacts"].as_array().unwrap() {
            let id = artifact["blueprint_id"].as_str().unwrap().to_string();
            match artifact["status"].as_str().unwrap() {
                "ok" => {
                    compiled_by.entry(id).or_default().push(i);
                    ready += 1;
                }
                "cached" => ready += 1,
                _ => {}
            }
        }
        assert_eq!(ready, 42, "host {i} ends with every compilable blueprint");
        assert_eq!(document["fleet"]["hits"].as_u64().unwrap() + document["fleet"]["misses"].as_u64().unwrap(), 42, "host {i}");
    }
    assert_eq!(compiled_by.len(), 42, "every blueprint compiled somewhere");
    for (id, by) in &compiled_by {
        assert_eq!(by.len(), 1, "{id} compiled by hosts {by:?}: once for the fleet");
    }
    for i in 0..3 {
        let public = format!("{}.pub", key.display());
        let state = dir.path().join(format!("host{i}"));
        let out = tezzeret().arg("verify").arg("--state").arg(&state).args(["--trusted-key", &public]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("42 artifacts checked (signatures included), 0 problems"), "host {i}: {text}");
    }
    let status = tezzeret()
        .arg("fleet-status")
        .args(&fleet_args(server, "cold", &key)[2..8])
        .args(extra)
        .args(["--trusted-key", &format!("{}.pub", key.display()), "--json", "--download"])
        .arg("--state")
        .arg(dir.path().join("host0"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let survey: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(survey["verified"].as_array().unwrap().len(), 42);
    assert_eq!(survey["artifacts"], 42);
    assert_eq!(survey["leases"].as_array().unwrap().len(), 0, "every claim fulfilled");
    assert_eq!(survey["checked"], "signature and artifact sha256");
    assert_eq!((survey["local"]["in_bucket"].as_u64(), survey["local"]["unpublished"].as_u64()), (Some(42), Some(0)));
    survey
}

#[test]
fn tampered_untrusted_and_truncated_objects_are_refused_and_compiled_locally() {
    let FivePublished { server: _server, dir, keys, fleet, first } = five_published("refusals");
    assert_eq!(first.metrics().published, 5);

    // The bucket is untrusted: damage three of its entries.
    let store = RemoteStore::connect(&fleet).unwrap();
    let names = tezzeret::fleet::objects::ObjectNames::new(&fleet.bucket, &fleet.prefix);
    let (tampered, untrusted, truncated) = (record_of(&first, "BP001"), record_of(&first, "BP002"), record_of(&first, "BP005"));
    let mut bytes = store.run(store.get(&names.artifact(&tampered.checksum), u64::MAX)).unwrap().bytes().unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    store.run(store.overwrite(&names.artifact(&tampered.checksum), bytes)).unwrap();
    let stranger = fleet_keys();
    let forged = SharedManifest::sign(&untrusted, &stranger).unwrap();
    store.run(store.overwrite(&names.manifest(&untrusted.cache_key), forged.encode())).unwrap();
    let mut short = store.run(store.get(&names.artifact(&truncated.checksum), u64::MAX)).unwrap().bytes().unwrap();
    short.truncate(short.len() / 2);
    store.run(store.overwrite(&names.artifact(&truncated.checksum), short)).unwrap();

    // A survey from a listing sees the truncated artifact; only one that
    // downloads the artifacts sees the one changed in place.
    let reader = Member::open(&dir.path().join("reader"), &[], &keys, FleetConfig { publish: false, ..fleet.clone() });
    let survey = |check| reader.service.with(|f| Ok(f.fleet().unwrap().survey(check).unwrap())).unwrap();
    let (listed, downloaded) = (survey(ArtifactCheck::Listed), survey(ArtifactCheck::Downloaded));
    let refused_keys = |s: &tezzeret::fleet::Survey| s.refused_keys.iter().map(|(k, r, _)| (k.clone(), *r)).collect::<Vec<_>>();
    let (untrusted_refusal, truncated_refusal) =
        ((untrusted.cache_key.clone(), Refusal::UntrustedKey), (truncated.cache_key.clone(), Refusal::Truncated));
    assert_eq!(listed.verified, ["BP001", "BP006", "BP011"]);
    assert_eq!(refused_keys(&listed).len(), 2);
    assert!(refused_keys(&listed).contains(&untrusted_refusal) && refused_keys(&listed).contains(&truncated_refusal));
    assert_eq!(downloaded.verified, ["BP006", "BP011"]);
    assert!(refused_keys(&downloaded).contains(&(tampered.cache_key.clone(), Refusal::ChecksumMismatch)), "{downloaded:?}");
    assert_eq!(downloaded.refused.values().sum::<usize>(), 3);
    drop(reader);
    // A fourth entry verifies, but is another blueprint's (signed by a
    // trusted key under BP006's cache key): of no use to BP006.
    let mut other_blueprints = record_of(&first, "BP011");
    other_blueprints.cache_key = record_of(&first, "BP006").cache_key;
    keys.sign_record(&mut other_blueprints);
    let misleading = SharedManifest::sign(&other_blueprints, &keys).unwrap().encode();
    store.run(store.overwrite(&names.manifest(&other_blueprints.cache_key), misleading)).unwrap();

    let second = Member::open(&dir.path().join("b"), FIVE, &keys, fleet.clone());
    let statuses = second.run();
    for id in ["BP001", "BP002", "BP005", "BP006"] {
        assert_eq!(statuses[id], JobStatus::Ok, "{id} is compiled locally");
    }
    assert_eq!(statuses["BP011"], JobStatus::Cached, "BP011 comes from the bucket");
    let metrics = second.metrics();
    assert_eq!((metrics.hits, metrics.misses), (1, 4), "{metrics:?}");
    assert!(refused(&metrics, Refusal::ChecksumMismatch) >= 1, "{metrics:?}");
    assert!(refused(&metrics, Refusal::UntrustedKey) >= 1, "{metrics:?}");
    assert!(refused(&metrics, Refusal::Truncated) >= 1, "{metrics:?}");
    assert!(refused(&metrics, Refusal::WrongManifest) >= 1, "{metrics:?}");
    let logs = second.seen.lock().unwrap().logs.join("\n");
    for reason in ["checksum_mismatch", "untrusted_key", "truncated", "wrong_manifest"] {
        assert!(logs.contains(reason), "the refusal says why ({reason}): {logs}");
    }
    // Replacing a manifest signed by a key this host does not trust says so,
    // and what it means for a fleet whose hosts trust different keys.
    let replaced = logs.lines().find(|l| l.starts_with("BP002: replaced the fleet store's manifest")).unwrap_or_default();
    assert!(replaced.contains("untrusted_key") && replaced.contains("every host of a fleet must trust"), "{logs}");
    // Its own compiles replaced what was damaged: a third host takes everything.
    let third = Member::open(&dir.path().join("c"), FIVE, &keys, fleet);
    assert!(third.run().values().all(|s| *s == JobStatus::Cached));
    assert_eq!(third.metrics().refused(), 0);
}

#[test]
fn a_local_artifact_that_does_not_verify_is_taken_from_the_bucket_before_compiling() {
    let FivePublished { server: _server, dir, keys, fleet, first } = five_published("local-damage");
    let damaged: Vec<ArtifactRecord> = ["BP001", "BP002"].iter().map(|id| record_of(&first, id)).collect();
    drop(first);
    let state = dir.path().join("a");
    let paths: Vec<PathBuf> = damaged.iter().map(|r| state.join("artifacts").join(&r.artifact_file)).collect();
    for path in &paths {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }

    let reopened = Member::open(&state, FIVE, &keys, fleet);
    // One compiled now, on the caller's watch; the other by a run.
    let now = reopened.service.with(|f| f.compile_one("BP002")).unwrap();
    assert_eq!(now.status, JobStatus::Cached, "{now:?}");
    let statuses = reopened.run();
    assert!(statuses.values().all(|s| *s == JobStatus::Cached), "nothing compiled: {statuses:?}");
    let metrics = reopened.metrics();
    assert_eq!((metrics.hits, metrics.misses, metrics.lost_races), (2, 0, 0), "{metrics:?}");
    let logs = reopened.seen.lock().unwrap().logs.join("\n");
    for id in ["BP001", "BP002"] {
        assert!(logs.contains(&format!("{id}: the durable artifact of its cache key is not adopted")), "{logs}");
    }
    assert!(logs.contains("asking the fleet's bucket"), "{logs}");
    for (path, record) in paths.iter().zip(&damaged) {
        assert_eq!(tezzeret::state::artifact::checksum_of(&std::fs::read(path).unwrap()), record.checksum, "repaired");
    }
}

#[test]
fn a_state_directory_reopened_on_another_prefix_publishes_its_artifacts_there() {
    let FivePublished { server, dir, keys, first, .. } = five_published("run-41");
    wait_for("the first run's publications", || first.unshared() == 0);
    first.service.close();
    // Reopened on the next run's prefix: what run-41 holds is not taken
    // for held there; it is published again, and named there.
    let state = dir.path().join("a");
    let reopened = Member::open(&state, FIVE, &keys, with_prefix(&server, "run-42"));
    wait_for("publication under the new prefix", || reopened.unshared() == 0);
    for id in FIVE {
        let reference = reopened.artifact_ref(id);
        assert!(reference.starts_with("s3://fleet/run-42/artifacts/"), "{id}: {reference}");
    }
    assert_eq!(reopened.metrics().published, FIVE.len() as u64);
    let joiner = Member::open(&dir.path().join("b"), FIVE, &keys, with_prefix(&server, "run-42"));
    assert!(joiner.run().values().all(|s| *s == JobStatus::Cached), "run-42 holds everything");
    // And back on run-41, whose objects are still there: published again
    // (each found already there), nothing compiled.
    reopened.service.close();
    let back = Member::open(&state, FIVE, &keys, with_prefix(&server, "run-41"));
    wait_for("run-41 recorded again", || back.unshared() == 0);
    assert!(back.artifact_ref("BP001").starts_with("s3://fleet/run-41/artifacts/"));
}

#[test]
fn an_artifact_the_store_keeps_refusing_holds_back_none_of_the_others() {
    let FivePublished { server, dir, keys, first, .. } = five_published("before");
    wait_for("the first run's publications", || first.unshared() == 0);
    let (blocked, damaged) = (record_of(&first, FIVE[0]), record_of(&first, FIVE[1]));
    first.service.close();
    // And the second's local file no longer verifies.
    let damaged_path = dir.path().join("a").join("artifacts").join(&damaged.artifact_file);
    let mut bytes = std::fs::read(&damaged_path).unwrap();
    bytes[0] ^= 0x40;
    std::fs::write(&damaged_path, bytes).unwrap();
    // Reopened on another prefix, behind a proxy that never lets the first
    // artifact's upload through: it times out at every attempt.
    let hold: &'static str = Box::leak(format!("/after/artifacts/{}.pt", blocked.checksum).into_boxed_str());
    let proxy = HoldingProxy::start(server.endpoint().trim_start_matches("http://"), hold);
    let mut fleet = with_prefix(&server, "after");
    fleet.endpoint = Some(proxy.endpoint());
    fleet.retry_interval = Duration::from_millis(100);
    fleet.request_timeout = Duration::from_secs(1);
    let reopened = Member::open(&dir.path().join("a"), FIVE, &keys, fleet);
    wait_for("every other artifact published", || reopened.unshared() <= 2);
    assert_eq!(reopened.unshared(), 2, "{:?}", reopened.seen.lock().unwrap().logs);
    assert!(proxy.held() >= 1);
    for id in &FIVE[2..] {
        assert!(reopened.artifact_ref(id).starts_with("s3://fleet/after/artifacts/"), "{id}");
    }
    assert!(!reopened.artifact_ref(FIVE[0]).starts_with("s3://"), "the refused one names its local file");
    // Each is said once, not at every attempt: the store's refusal, and
    // the damaged file (set aside, not read again).
    wait_for("more attempts", || proxy.held() >= 3);
    let logs = reopened.seen.lock().unwrap().logs.clone();
    assert_eq!(logs.iter().filter(|l| l.contains("publication retried every")).count(), 1, "{logs:?}");
    let unreadable = format!("reading {}'s artifact to publish it", FIVE[1]);
    assert_eq!(logs.iter().filter(|l| l.contains(&unreadable)).count(), 1, "{logs:?}");
}

#[test]
fn a_store_outage_never_fails_a_job_and_publication_catches_up() {
    let mut server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-outage");
    let keys = fleet_keys();
    let mut fleet = with_prefix(&server, "outage");
    fleet.retry_interval = Duration::from_millis(100);
    fleet.request_timeout = Duration::from_secs(2);
    let member = Member::open(&dir.path().join("a"), FIVE, &keys, fleet.clone());
    // The store dies once the first job is finished.
    let reports: Vec<JobReport> = member
        .service
        .with(|f| {
            let mut finished = 0;
            Ok(f.run(&mut |event| {
                if let tezzeret::forge::Progress::Finished(..) = event {
                    finished += 1;
                    if finished == 1 {
                        server.kill();
                    }
                }
            }))
        })
        .unwrap();
    assert!(reports.iter().all(|r| r.status == JobStatus::Ok), "no job fails for the outage");
    let before = member.unshared();
    assert!(before >= 1, "what compiled during the outage waits to be published");
    assert!(member.metrics().store_errors >= 1);
    {
        let seen = member.seen.lock().unwrap();
        let local = seen.updates.iter().filter(|u| !u.artifact_ref.starts_with("s3://")).count();
        assert_eq!(local, before, "updates during the outage name the local file");
    }
    server.restart();
    wait_for("the background thread to publish what the outage left", || member.unshared() == 0);
    {
        // Each update that named the local file is sent again, naming the bucket's copy.
        let seen = member.seen.lock().unwrap();
        for local in seen.updates.iter().filter(|u| !u.artifact_ref.starts_with("s3://")) {
            let again = seen.updates.iter().find(|u| u.blueprint_id == local.blueprint_id && u.artifact_ref.starts_with("s3://"));
            let again = again.unwrap_or_else(|| panic!("{} is never announced with its reference: {:?}", local.blueprint_id, seen.updates));
            assert!(again.artifact_ref.starts_with("s3://fleet/outage/artifacts/") && again.checksum == local.checksum, "{again:?}");
        }
        assert_eq!(seen.updates.len(), FIVE.len() + before, "{:?}", seen.updates);
    }
    for id in FIVE {
        let reference = member.artifact_ref(id);
        assert!(reference.starts_with("s3://fleet/outage/artifacts/"), "{id}: {reference}");
    }
    // What was published is known after a restart (the journal says so).
    member.service.close();
    let reopened = Member::open(&dir.path().join("a"), FIVE, &keys, fleet.clone());
    assert_eq!(reopened.unshared(), 0);
    assert!(reopened.artifact_ref("BP011").starts_with("s3://fleet/outage/"));
    let joiner = Member::open(&dir.path().join("b"), FIVE, &keys, fleet);
    assert!(joiner.run().values().all(|s| *s == JobStatus::Cached), "the bucket holds everything");
}

#[test]
fn an_artifact_announced_in_an_outage_then_taken_from_the_bucket_is_announced_with_its_reference() {
    let mut server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-taken-back");
    let keys = fleet_keys();
    let mut fleet = with_prefix(&server, "taken-back");
    fleet.retry_interval = Duration::from_millis(100);
    // A killed store refuses connections at once; a live one on a busy
    // machine may be slow, and must not be taken for an outage here.
    fleet.request_timeout = Duration::from_secs(60);
    // Compiled while the store is down: announced with its local path.
    server.kill();
    let state = dir.path().join("a");
    let member = Member::open(&state, &["BP001"], &keys, fleet.clone());
    assert_eq!(member.run()["BP001"], JobStatus::Ok);
    assert_eq!(member.unshared(), 1);
    let record = record_of(&member, "BP001");
    member.service.close();
    // Meanwhile another host published the same bytes; then the local copy
    // is damaged, so it cannot be published from here and the bucket's is taken.
    server.restart();
    let path = state.join("artifacts").join(&record.artifact_file);
    let mut bytes = std::fs::read(&path).unwrap();
    let other = tezzeret::fleet::Fleet::connect(fleet.clone(), keys.clone(), "other-host".into()).unwrap();
    other.publish(&record, &bytes).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let reopened = Member::open(&state, &["BP001"], &keys, fleet);
    assert_eq!(reopened.run()["BP001"], JobStatus::Cached);
    assert_eq!(reopened.unshared(), 0);
    let seen = reopened.seen.lock().unwrap();
    let last = seen.updates.iter().rev().find(|u| u.blueprint_id == "BP001");
    let last = last.unwrap_or_else(|| panic!("BP001 is not announced again: {:?} {:?}", seen.updates, seen.logs));
    assert!(last.artifact_ref.starts_with("s3://fleet/taken-back/artifacts/"), "{last:?}");
    assert_eq!(last.checksum, record.checksum);
}

#[test]
fn a_store_down_from_the_start_is_said_once_per_job() {
    let dir = TempDir::new("fleet-down");
    // A port nothing listens on (just released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut fleet = FleetConfig::new("fleet");
    fleet.endpoint = Some(format!("http://127.0.0.1:{port}"));
    fleet.credentials = Some(tezzeret::fleet::Credentials { access_key_id: ACCESS_KEY.into(), secret_access_key: SECRET_KEY.into() });
    fleet.request_timeout = Duration::from_secs(2);
    let member = Member::open(&dir.path().join("a"), FIVE, &fleet_keys(), fleet);
    assert!(member.run().values().all(|s| *s == JobStatus::Ok), "every job compiles locally");
    let logs = member.seen.lock().unwrap().logs.clone();
    for id in FIVE {
        let said = logs.iter().filter(|l| l.starts_with(&format!("{id}: could not use the fleet store"))).count();
        assert_eq!(said, 1, "{id}: {logs:#?}");
    }
}

#[test]
fn leases_on_an_unreachable_redis_never_fail_a_job() {
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-no-redis");
    let keys = fleet_keys();
    // A port held here (so no other test's server can take it) whose
    // connections are closed at once: every claim fails at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || listener.incoming().for_each(drop));
    let fleet = FleetConfig { lease_redis: Some(format!("redis://127.0.0.1:{port}")), ..with_prefix(&server, "no-redis") };
    let member = Member::open(&dir.path().join("a"), FIVE, &keys, fleet.clone());
    assert!(member.run().values().all(|s| *s == JobStatus::Ok), "every job compiles without a lease");
    let metrics = member.metrics();
    assert_eq!(metrics.published, FIVE.len() as u64, "and is published to the bucket: {metrics:?}");
    assert!(metrics.store_errors >= 1 && metrics.redis_requests >= FIVE.len() as u64, "{metrics:?}");
    assert!(member.seen.lock().unwrap().logs.iter().any(|l| l.contains(&format!("127.0.0.1:{port}"))), "the outage is logged naming Redis");
    let joiner = Member::open(&dir.path().join("b"), FIVE, &keys, fleet.clone());
    assert!(joiner.run().values().all(|s| *s == JobStatus::Cached), "the bucket holds everything");
    // Its announcements were read from the bucket instead: said once, naming Redis.
    let logs = joiner.seen.lock().unwrap().logs.clone();
    let passed_over: Vec<&String> = logs.iter().filter(|l| l.contains("the bucket answers instead")).collect();
    assert_eq!(passed_over.len(), 1, "{logs:?}");
    assert_eq!(passed_over[0].matches(&format!("fleet Redis 127.0.0.1:{port}")).count(), 1, "named once: {logs:?}");
    assert!(joiner.metrics().store_errors > 1, "later failures are counted");
    // Watches list the bucket for a Redis that cannot be asked; the bucket
    // holding more manifests than a watch lists says nothing of the
    // announcements, so later watches still try to list them.
    use futures::StreamExt;
    let store = RemoteStore::connect(&fleet).unwrap();
    let names = ObjectNames::new(&fleet.bucket, &fleet.prefix);
    let manifests: Vec<String> = (0..1001).map(|i| names.manifest(&format!("filler-{i}"))).collect();
    let creates = futures::stream::iter(manifests.iter().map(|name| store.create(name, b"{}".to_vec()))).buffer_unordered(16);
    assert!(store.run(creates.collect::<Vec<_>>()).iter().all(|c| c.is_ok()));
    let watcher = tezzeret::fleet::Fleet::connect(fleet, keys, "watcher".into()).unwrap();
    let held: Vec<(String, u64, bool)> = (0..3).map(|i| (format!("waited-{i}"), 0, false)).collect();
    for round in 0..2 {
        let before = watcher.metrics().requests;
        assert!(watcher.watch_many(&held).iter().all(|w| matches!(w, Watched::Held)));
        // (Between lease reads the keys' manifests are not asked of the bucket.)
        assert_eq!(watcher.metrics().requests - before, 1, "watch {round}: a listing of the bucket");
    }
}

#[test]
fn a_held_lease_is_renewed_until_released_and_expires_once_dropped() {
    let server = SeaweedServer::start("fleet");
    a_held_lease_is_renewed_until_released(with_prefix(&server, "renewal"));
}

#[test]
fn a_held_lease_on_redis_is_renewed_until_released_and_one_racer_wins_it() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let config = FleetConfig { lease_redis: Some(redis.url()), ..with_prefix(&server, "renewal") };
    a_held_lease_is_renewed_until_released(config.clone());
    // Eight forges claiming one key at once: exactly one wins.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let fleet = tezzeret::fleet::Fleet::connect(config.clone(), fleet_keys(), format!("racer-{i}")).unwrap();
            std::thread::spawn(move || matches!(fleet.claim_unclaimed("raced").unwrap(), tezzeret::fleet::Claim::Won { .. }))
        })
        .collect();
    let won = racers.into_iter().map(|t| t.join().unwrap()).filter(|won| *won).count();
    assert_eq!(won, 1);
}

#[test]
fn a_renewal_in_the_bucket_never_brings_back_a_released_lease_nor_takes_another_holders() {
    let server = SeaweedServer::start("fleet");
    let config = with_prefix(&server, "late-renewal");
    let bucket = tezzeret::fleet::remote::RemoteStore::connect(&config).unwrap();
    a_renewal_writes_only_over_a_lease_of_its_holder(
        config,
        |name| bucket.run(bucket.delete(name)).unwrap(),
        |name, bytes| bucket.run(bucket.overwrite(name, bytes.as_bytes().to_vec())).unwrap(),
        |name| bucket.run(bucket.get(name, 1 << 20)).unwrap().bytes().map(|b| String::from_utf8(b).unwrap()),
    );
}

#[test]
fn a_renewal_on_redis_never_brings_back_a_released_lease_nor_takes_another_holders() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let config = FleetConfig { lease_redis: Some(redis.url()), ..with_prefix(&server, "late-renewal") };
    let hash = tezzeret::fleet::redis_hash::FleetRedis::hash_key(&ObjectNames::new(&server.bucket, "late-renewal"));
    let connection = std::cell::RefCell::new(redis.connection());
    let command = |name: &str, args: &[&str]| {
        let mut command = redis::cmd(name);
        command.arg(&hash).arg(args);
        command
    };
    a_renewal_writes_only_over_a_lease_of_its_holder(
        config,
        |name| command("HDEL", &[name]).query::<i64>(&mut *connection.borrow_mut()).map(drop).unwrap(),
        |name, bytes| command("HSET", &[name, bytes]).query::<i64>(&mut *connection.borrow_mut()).map(drop).unwrap(),
        |name| command("HGET", &[name]).query(&mut *connection.borrow_mut()).unwrap(),
    );
}

/// Leases renewed in the background, each at least once, while behind
/// their back (as another writer, or a late request, would: `remove`,
/// `put` and `read` reach where the fleet keeps its lease objects) one is
/// released, one replaced by another holder's, one rewritten by its own
/// holder (as a renewal whose answer was lost would be) and one made to
/// have expired: the released, replaced and expired ones are never
/// written again, the others are still renewed.
fn a_renewal_writes_only_over_a_lease_of_its_holder(
    mut config: FleetConfig,
    remove: impl Fn(&str),
    put: impl Fn(&str, &str),
    read: impl Fn(&str) -> Option<String>,
) {
    config.lease_ttl = Duration::from_millis(900);
    let names = ObjectNames::new(&config.bucket, &config.prefix);
    let fleet = tezzeret::fleet::Fleet::connect(config.clone(), fleet_keys(), "renewer".into()).unwrap();
    let won = |key: &str| match fleet.claim(key).unwrap() {
        tezzeret::fleet::Claim::Won { lease, .. } => lease,
        held => panic!("{key}: {held:?}"),
    };
    let keys = ["gone", "taken", "rewritten", "expired", "kept"];
    let leases = keys.map(won);
    let expiry = |key: &str| fleet.leases().unwrap().iter().find(|(k, ..)| k == key).map(|(_, body, _)| body.expires_at_ms);
    // Renewed once each: from now on each renewal is conditional on what
    // it last wrote (in the bucket, the ETag of its last write).
    for key in keys {
        let claimed = expiry(key).expect("the lease is there");
        wait_for(&format!("a first renewal of {key}"), || expiry(key).is_some_and(|at| at > claimed));
    }
    remove(&names.lease("gone", 0));
    let other = format!(r#"{{"holder":"another-forge","expires_at_ms":{}}}"#, u64::MAX / 2);
    put(&names.lease("taken", 0), &other);
    let rewritten_until = tezzeret::fleet::lease::now_ms() + 60_000;
    put(&names.lease("rewritten", 0), &format!(r#"{{"holder":"renewer","expires_at_ms":{rewritten_until}}}"#));
    let expired = r#"{"holder":"renewer","expires_at_ms":1}"#;
    put(&names.lease("expired", 0), expired);
    // Every lease renews on the same schedule: three renewals of the one
    // left alone mean the others' renewals have run since, at least once.
    for renewal in 0..3 {
        let before = expiry("kept").expect("the kept lease is there");
        wait_for(&format!("renewal {renewal} of the kept lease"), || expiry("kept").is_some_and(|at| at > before));
    }
    wait_for("a renewal of the lease its holder rewrote", || expiry("rewritten").is_some_and(|at| at != rewritten_until));
    assert_eq!(read(&names.lease("gone", 0)), None, "a released lease is not brought back by its renewal");
    assert_eq!(read(&names.lease("taken", 0)), Some(other), "another forge's lease is not overwritten");
    assert_eq!(read(&names.lease("expired", 0)).as_deref(), Some(expired), "an expired lease is not revived");
    for lease in leases {
        fleet.release(lease).unwrap();
    }
    // A holder that stalled past its lease's expiry and was taken over,
    // then gives its lease back: the newer holder's record stays.
    let stalled = won("stalled");
    put(&names.lease("stalled", 0), expired);
    let connect = |holder: &str| tezzeret::fleet::Fleet::connect(config.clone(), fleet_keys(), holder.into()).unwrap();
    let (taker, third) = (connect("taker"), connect("third"));
    let taken = match taker.claim("stalled").unwrap() {
        tezzeret::fleet::Claim::Won { lease, took_over: true } if lease.generation == 1 => lease,
        other => panic!("the expired lease is taken over: {other:?}"),
    };
    fleet.release(stalled).unwrap();
    assert_eq!(read(&names.lease("stalled", 0)).as_deref(), Some(expired), "a lease taken over is not removed by its old holder");
    assert!(read(&names.lease("stalled", 1)).is_some());
    assert!(
        matches!(third.claim_unclaimed("stalled").unwrap(), tezzeret::fleet::Claim::Held { .. }),
        "generation 0 still says the key is claimed"
    );
    // The newer holder gives it back: both go, and the key is free again.
    taker.release(taken).unwrap();
    assert_eq!((read(&names.lease("stalled", 0)), read(&names.lease("stalled", 1))), (None, None));
    assert!(matches!(third.claim_unclaimed("stalled").unwrap(), tezzeret::fleet::Claim::Won { .. }));
}

#[test]
fn leases_and_announcements_on_redis_are_listed_by_prefix_and_up_to_a_bound() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let on_redis = |prefix: &str| FleetConfig { lease_redis: Some(redis.url()), ..with_prefix(&server, prefix) };
    // A neighbour whose prefix starts with this one's is none of its objects.
    let fleet = tezzeret::fleet::Fleet::connect(on_redis("run1"), fleet_keys(), "lister".into()).unwrap();
    let neighbour = tezzeret::fleet::Fleet::connect(on_redis("run1x"), fleet_keys(), "neighbour".into()).unwrap();
    assert!(matches!(neighbour.claim_unclaimed("elsewhere").unwrap(), tezzeret::fleet::Claim::Won { .. }));
    // More leases than one scan step, so the listing pages through the hash.
    let keys: std::collections::HashSet<String> = (0..600).map(|i| format!("key-{i:04}")).collect();
    for key in &keys {
        let claimed = fleet.claim_unclaimed(key).unwrap();
        assert!(matches!(claimed, tezzeret::fleet::Claim::Won { .. }), "{key}: {claimed:?}");
    }
    assert_eq!(fleet.claimed_keys(1000).unwrap(), Some(keys.clone()), "this prefix's leases, each once");
    assert_eq!(fleet.claimed_keys(599).unwrap(), None, "more than the bound: not listed");
    assert_eq!(neighbour.claimed_keys(1000).unwrap().map(|k| k.len()), Some(1));

    // The Redis is untrusted: a field name longer than any object's is
    // passed over on the server, never sent.
    let names = tezzeret::fleet::objects::ObjectNames::new(&server.bucket, "run1");
    let hash = tezzeret::fleet::redis_hash::FleetRedis::hash_key(&names);
    let mut connection = redis.connection();
    let huge = names.lease(&"x".repeat(4 << 20), 0);
    let _: i64 = redis::cmd("HSET").arg(&hash).arg(&huge).arg("{}").query(&mut connection).unwrap();
    let sent_before = redis_bytes_sent(&mut connection);
    let listed = fleet.claimed_keys(1000).unwrap();
    assert!(listed.as_ref() == Some(&keys), "the long name is no key of the fleet's ({:?} keys)", listed.map(|k| k.len()));
    let sent = redis_bytes_sent(&mut connection) - sent_before;
    assert!(sent < 1 << 20, "the 4 MiB name was not sent: {sent} bytes");
    // Announcements are never removed: once a watch finds more than it
    // lists, later watches look their keys up one by one without listing.
    let mut announce = redis::pipe();
    for i in 0..1001 {
        announce.cmd("HSET").arg(&hash).arg(names.manifest(&format!("published-{i}"))).arg("{}").ignore();
    }
    let _: () = announce.query(&mut connection).unwrap();
    let held: Vec<(String, u64, bool)> = (0..3).map(|i| (format!("waited-{i}"), 0, false)).collect();
    let watch = || {
        let before = fleet.metrics().redis_requests;
        assert!(fleet.watch_many(&held).iter().all(|w| matches!(w, Watched::Held)));
        fleet.metrics().redis_requests - before
    };
    let first = watch();
    assert!(first > 3 + 3, "a listing of several steps, then a lookup per key: {first} commands");
    assert_eq!(watch(), 3, "a lookup per key, no listing");
}

#[test]
fn claims_in_the_bucket_are_listed_by_key_folder_by_prefix_and_up_to_a_bound() {
    use futures::StreamExt;
    let server = SeaweedServer::start("fleet");
    let config = with_prefix(&server, "run1");
    // A neighbour whose prefix starts with this one's is none of its claims.
    let fleet = tezzeret::fleet::Fleet::connect(config.clone(), fleet_keys(), "lister".into()).unwrap();
    let neighbour = tezzeret::fleet::Fleet::connect(with_prefix(&server, "run1x"), fleet_keys(), "neighbour".into()).unwrap();
    assert!(matches!(neighbour.claim_unclaimed("elsewhere").unwrap(), tezzeret::fleet::Claim::Won { .. }));
    // More keys than a listing's page holds (1,000), two with a second
    // generation (taken over), and an object right in the leases folder.
    let names = ObjectNames::new(&server.bucket, "run1");
    let keys: std::collections::HashSet<String> = (0..1003).map(|i| format!("key-{i:04}")).collect();
    let mut objects: Vec<String> = keys.iter().map(|key| names.lease(key, 0)).collect();
    objects.extend(["key-0000", "key-0001"].map(|key| names.lease(key, 1)));
    objects.push(format!("{}stray.json", names.leases()));
    let store = RemoteStore::connect(&config).unwrap();
    let creates = futures::stream::iter(objects.iter().map(|name| store.create(name, b"{}".to_vec()))).buffer_unordered(16);
    let created: Vec<_> = store.run(creates.collect());
    assert!(created.iter().all(|c| matches!(c, Ok(Create::Created))), "{:?}", created.iter().find(|c| !matches!(c, Ok(Create::Created))));
    assert_eq!(fleet.claimed_keys(1003).unwrap(), Some(keys.clone()), "each claimed key once, over two pages");
    assert_eq!(fleet.claimed_keys(1002).unwrap(), None, "more keys than the bound: not listed");
    let elsewhere = std::collections::HashSet::from(["elsewhere".to_string()]);
    assert_eq!(neighbour.claimed_keys(10).unwrap(), Some(elsewhere));
}

#[test]
fn a_claim_reads_at_most_256_lease_objects_of_a_key_in_the_bucket_or_on_redis() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let bucket = with_prefix(&server, "many-generations");
    let on_redis = FleetConfig { lease_redis: Some(redis.url()), ..bucket.clone() };
    let names = ObjectNames::new(&server.bucket, "many-generations");
    let store = RemoteStore::connect(&bucket).unwrap();
    let hash = tezzeret::fleet::redis_hash::FleetRedis::hash_key(&names);
    let mut connection = redis.connection();
    // Unreadable lease objects (a torn or foreign write reads as expired)
    // for generations 0 to `count` - 1 of `key`, in the bucket or on Redis.
    let mut plant = |key: &str, count: u64, in_redis: bool| {
        if in_redis {
            let mut pipe = redis::pipe();
            for generation in 0..count {
                pipe.cmd("HSET").arg(&hash).arg(names.lease(key, generation)).arg("{}").ignore();
            }
            let _: () = pipe.query(&mut connection).unwrap();
        } else {
            let leases: Vec<String> = (0..count).map(|generation| names.lease(key, generation)).collect();
            let created = store.run(futures::future::join_all(leases.iter().map(|name| store.create(name, b"{}".to_vec()))));
            assert!(created.iter().all(|c| matches!(c, Ok(Create::Created))), "{created:?}");
        }
    };
    for (config, in_redis) in [(bucket, false), (on_redis, true)] {
        let fleet = tezzeret::fleet::Fleet::connect(config, fleet_keys(), "many".into()).unwrap();
        // 256 expired generations: the next one is taken over.
        plant("at-the-bound", 256, in_redis);
        match fleet.claim("at-the-bound").unwrap() {
            tezzeret::fleet::Claim::Won { lease, took_over } => assert!(lease.generation == 256 && took_over, "{lease:?}"),
            held => panic!("256 lease objects are read (redis: {in_redis}): {held:?}"),
        }
        // One more: more than takeovers leave; waited for, not read whole.
        plant("past-the-bound", 257, in_redis);
        match fleet.claim("past-the-bound").unwrap() {
            tezzeret::fleet::Claim::Held { holder, .. } => assert!(holder.contains("more than 256"), "{holder}"),
            won => panic!("257 lease objects are not read (redis: {in_redis}): {won:?}"),
        }
    }
}

/// A lease won by a fleet of `config` is renewed in the background until
/// released; one dropped without release expires and is taken over.
fn a_held_lease_is_renewed_until_released(mut config: FleetConfig) {
    config.lease_ttl = Duration::from_millis(900);
    let fleet = tezzeret::fleet::Fleet::connect(config, fleet_keys(), "renewal-test".into()).unwrap();
    let Ok(tezzeret::fleet::Claim::Won { lease, .. }) = fleet.claim("k1") else { panic!("a free key is won") };
    // Renewed in the background: its expiry moves on, twice (no timing assumed).
    let expiry = || fleet.leases().unwrap().iter().find(|(key, ..)| key == "k1").map(|(_, body, _)| body.expires_at_ms);
    let first = expiry().expect("the lease is in the bucket");
    wait_for("a renewal", || expiry().is_some_and(|at| at > first));
    let second = expiry().unwrap();
    wait_for("another renewal", || expiry().is_some_and(|at| at > second));
    assert!(matches!(fleet.claim("k1").unwrap(), tezzeret::fleet::Claim::Held { .. }), "nobody else wins it");
    fleet.release(lease).unwrap();
    assert_eq!(fleet.lease_state("k1", 0).unwrap(), LeaseState::Gone, "released: removed");
    // A lease dropped without release (its holder went away) stops being renewed and expires.
    let Ok(tezzeret::fleet::Claim::Won { lease, .. }) = fleet.claim("k2") else { panic!("a free key is won") };
    drop(lease);
    wait_for("the dropped lease to expire", || fleet.lease_state("k2", 0).unwrap() == LeaseState::Expired);
    assert!(matches!(fleet.claim("k2").unwrap(), tezzeret::fleet::Claim::Won { took_over: true, .. }));
}

#[test]
fn a_job_that_fails_here_after_publishing_keeps_its_lease() {
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-published-failed");
    let key = dir.path().join("fleet.key");
    keygen(&key).unwrap();
    // The artifact is uploaded while it is stored here: storing it fails,
    // or (stored) its commit fails at the guard slot.
    for (failpoint, prefix) in [("store.write=error@1", "store-failed"), ("guard.write=error@1", "commit-failed")] {
        let run = tezzeret()
            .env("TEZZERET_FAILPOINTS", failpoint)
            .arg("forge")
            .arg("--state")
            .arg(dir.path().join(prefix))
            .arg("--catalog")
            .arg(super::catalog_file(dir.path(), &["BP001"]))
            .args(fleet_args(&server, prefix, &key))
            .output()
            .unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        assert!(log.contains("BP001 failed") && log.contains("injected"), "{failpoint}: the job failed here: {log}");
        let fleet = with_prefix(&server, prefix);
        let store = RemoteStore::connect(&fleet).unwrap();
        let names = tezzeret::fleet::objects::ObjectNames::new(&fleet.bucket, &fleet.prefix);
        let manifests = store.run(store.list(&names.manifests())).unwrap();
        assert_eq!(manifests.len(), 1, "{failpoint}: the bucket holds the publication: {log}");
        let leases = store.run(store.list(&names.leases())).unwrap();
        assert_eq!(leases.len(), 1, "{failpoint}: the published key's lease is kept: {leases:?}");
        // A host claiming the key later is sent to the bucket instead of
        // compiling it again.
        let cache_key = ObjectNames::manifest_key(&manifests[0].name).unwrap();
        let later = tezzeret::fleet::Fleet::connect(fleet.clone(), fleet_key_pair_of(&key), "later".into()).unwrap();
        let claimed = later.claim_unclaimed(cache_key).unwrap();
        assert!(matches!(claimed, tezzeret::fleet::Claim::Held { .. }), "{failpoint}: {claimed:?}");
    }
}

/// The key ring of a key pair written by `keygen` at `key`.
fn fleet_key_pair_of(key: &Path) -> KeyRing {
    let public = tezzeret::state::signing::read_key_file(&PathBuf::from(format!("{}.pub", key.display()))).unwrap();
    let seed = tezzeret::state::signing::read_key_file(key).unwrap();
    KeyRing::new(Some(seed), &[public]).unwrap()
}

#[test]
fn a_published_key_keeps_its_lease_so_a_later_claim_is_sent_to_the_bucket() {
    let FivePublished { server: _server, dir: _dir, keys, fleet, first } = five_published("kept");
    // Every published key's lease stays in the bucket (renewal stopped)...
    let store = RemoteStore::connect(&fleet).unwrap();
    let names = tezzeret::fleet::objects::ObjectNames::new(&fleet.bucket, &fleet.prefix);
    assert_eq!(store.run(store.list(&names.leases())).unwrap().len(), FIVE.len(), "one kept lease per published key");
    // ... but is no open claim: the keys are published.
    assert_eq!(first.service.with(|f| Ok(f.fleet().unwrap().leases().unwrap())).unwrap(), vec![]);
    // A host claiming a published key loses, and waits for the bucket
    // instead of compiling it again.
    let other = tezzeret::fleet::Fleet::connect(fleet, keys, "late-host".into()).unwrap();
    for id in FIVE {
        let claimed = other.claim_unclaimed(&record_of(&first, id).cache_key).unwrap();
        assert!(matches!(claimed, tezzeret::fleet::Claim::Held { .. }), "{id}: {claimed:?}");
    }
    assert!(matches!(other.claim_unclaimed("never-compiled").unwrap(), tezzeret::fleet::Claim::Won { .. }));
}

#[test]
fn watching_several_held_keys_lists_the_manifests_once_and_reads_only_those_listed() {
    let FivePublished { server: _server, dir: _dir, keys, fleet, first } = five_published("watch");
    let watcher = tezzeret::fleet::Fleet::connect(fleet, keys, "watcher".into()).unwrap();
    let published: Vec<String> = FIVE.iter().map(|id| record_of(&first, id).cache_key).collect();
    let mut held: Vec<(String, u64, bool)> = published.iter().map(|key| (key.clone(), 0, false)).collect();
    held.extend(["not-yet-1", "not-yet-2", "not-yet-3"].map(|key| (key.to_string(), 0, false)));
    let before = watcher.metrics().requests;
    let watched = watcher.watch_many(&held);
    for (key, watch) in published.iter().zip(&watched) {
        assert!(matches!(watch, Watched::Lookup(Lookup::Found(record, _)) if record.cache_key == *key), "{key}: {watch:?}");
    }
    assert!(watched[FIVE.len()..].iter().all(|w| matches!(w, Watched::Held)), "{watched:?}");
    // One listing, then a manifest and an artifact per published key; the
    // keys the listing lacks cost nothing.
    assert_eq!(watcher.metrics().requests - before, 1 + 2 * FIVE.len() as u64);
    // Two keys are cheaper looked up one by one than listed: a read each,
    // no listing.
    let before = watcher.metrics().requests;
    let watched = watcher.watch_many(&held[FIVE.len()..FIVE.len() + 2]);
    assert!(watched.iter().all(|w| matches!(w, Watched::Held)), "{watched:?}");
    assert_eq!(watcher.metrics().requests - before, 2);
}

#[test]
fn publications_are_announced_and_small_artifacts_relayed_in_redis_so_watchers_skip_the_bucket() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let dir = TempDir::new("fleet-announced");
    let keys = fleet_keys();
    let fleet = FleetConfig { lease_redis: Some(redis.url()), ..with_prefix(&server, "announced") };
    let first = Member::open(&dir.path().join("a"), FIVE, &keys, fleet.clone());
    assert!(first.run().values().all(|s| *s == JobStatus::Ok));
    // Each publication's manifest is copied into the fleet's Redis, byte
    // for byte, and its artifact relayed for a few minutes.
    let store = RemoteStore::connect(&fleet).unwrap();
    let names = tezzeret::fleet::objects::ObjectNames::new(&fleet.bucket, &fleet.prefix);
    let hash = tezzeret::fleet::redis_hash::FleetRedis::hash_key(&names);
    let bucket = fleet.bucket.clone();
    let relay_key = |name: String| format!("tezzeret:fleet-relay:{bucket}/{name}");
    let mut connection = redis.connection();
    let records: Vec<ArtifactRecord> = FIVE.iter().map(|id| record_of(&first, id)).collect();
    let published: Vec<String> = records.iter().map(|r| r.cache_key.clone()).collect();
    for record in &records {
        let (key, artifact) = (&record.cache_key, names.artifact(&record.checksum));
        let copy: Vec<u8> = redis::cmd("HGET").arg(&hash).arg(names.manifest(key)).query(&mut connection).unwrap();
        let there = store.run(store.get(&names.manifest(key), 1 << 20)).unwrap().bytes().unwrap();
        assert_eq!(copy, there, "{key}: the announcement is the bucket's manifest");
        let relayed: Vec<u8> = redis::cmd("GET").arg(relay_key(artifact.clone())).query(&mut connection).unwrap();
        let there = store.run(store.get(&artifact, 1 << 30)).unwrap().bytes().unwrap();
        assert_eq!(relayed, there, "{key}: the relayed artifact is the bucket's");
        let ttl_ms: i64 = redis::cmd("PTTL").arg(relay_key(artifact)).query(&mut connection).unwrap();
        let relay_ttl = tezzeret::fleet::publish::RELAY_TTL.as_millis() as i64;
        assert!(ttl_ms > 0 && ttl_ms <= relay_ttl, "{key}: relayed for {ttl_ms} ms");
    }
    // A watcher lists the announcements and fetches what they announce
    // from Redis alone; keys not announced cost it nothing.
    let watcher = tezzeret::fleet::Fleet::connect(fleet, keys.clone(), "watcher".into()).unwrap();
    let mut held: Vec<(String, u64, bool)> = published.iter().map(|key| (key.clone(), 0, false)).collect();
    held.extend(["not-yet-1", "not-yet-2"].map(|key| (key.to_string(), 0, false)));
    let (before, redis_before) = (watcher.metrics().requests, watcher.metrics().redis_requests);
    let watched = watcher.watch_many(&held);
    for (key, watch) in published.iter().zip(&watched) {
        assert!(matches!(watch, Watched::Lookup(Lookup::Found(record, _)) if record.cache_key == *key), "{key}: {watch:?}");
    }
    assert!(watched[FIVE.len()..].iter().all(|w| matches!(w, Watched::Held)), "{watched:?}");
    assert_eq!(watcher.metrics().requests, before, "nothing asked of the bucket");
    assert_eq!(watcher.metrics().redis_requests - redis_before, 1 + 2 * FIVE.len() as u64, "a listing, a copy and a relay per key");
    // A lost announcement: the bucket's manifest is read only when the
    // lease is read.
    let _: i64 = redis::cmd("HDEL").arg(&hash).arg(names.manifest(&published[0])).query(&mut connection).unwrap();
    let before = watcher.metrics().requests;
    let watched = watcher.watch_many(&[(published[0].clone(), 0, false)]);
    assert!(matches!(watched[..], [Watched::Held]), "{watched:?}");
    assert_eq!(watcher.metrics().requests, before, "nothing asked of the bucket between lease reads");
    let watched = watcher.watch_many(&[(published[0].clone(), 0, true)]);
    assert!(matches!(watched[..], [Watched::Lookup(Lookup::Found(..))]), "{watched:?}");
    assert_eq!(watcher.metrics().requests - before, 1, "the bucket's manifest (the artifact still relayed)");
    // An announcement that does not verify is passed over (and counted):
    // the bucket's manifest is used.
    let _: i64 = redis::cmd("HSET").arg(&hash).arg(names.manifest(&published[1])).arg("{not a manifest").query(&mut connection).unwrap();
    let (before, malformed) = (watcher.metrics().requests, refused(&watcher.metrics(), Refusal::Malformed));
    assert!(matches!(watcher.lookup(&published[1]), Lookup::Found(..)));
    assert_eq!(refused(&watcher.metrics(), Refusal::Malformed), malformed + 1);
    assert_eq!(watcher.metrics().requests - before, 1);
    // A relayed artifact that does not hash right is passed over (and
    // counted), as is one gone: the bucket's artifact is read.
    let tampered = relay_key(names.artifact(&records[2].checksum));
    let mut bytes: Vec<u8> = redis::cmd("GET").arg(&tampered).query(&mut connection).unwrap();
    bytes[0] ^= 1;
    let _: () = redis::cmd("SET").arg(&tampered).arg(bytes).query(&mut connection).unwrap();
    let (before, mismatched) = (watcher.metrics().requests, refused(&watcher.metrics(), Refusal::ChecksumMismatch));
    assert!(matches!(watcher.lookup(&published[2]), Lookup::Found(..)));
    assert_eq!(refused(&watcher.metrics(), Refusal::ChecksumMismatch), mismatched + 1);
    assert_eq!(watcher.metrics().requests - before, 1, "the bucket's artifact");
    let _: i64 = redis::cmd("DEL").arg(relay_key(names.artifact(&records[3].checksum))).query(&mut connection).unwrap();
    let before = watcher.metrics().requests;
    assert!(matches!(watcher.lookup(&published[3]), Lookup::Found(..)));
    assert_eq!(watcher.metrics().requests - before, 1, "the bucket's artifact");
    // A relayed artifact larger than its manifest says is not read past
    // that size: refused (counted), and the bucket's artifact is read.
    let mut bytes = store.run(store.get(&names.artifact(&records[2].checksum), 1 << 30)).unwrap().bytes().unwrap();
    bytes.extend(std::iter::repeat_n(0u8, 5 << 20));
    let _: () = redis::cmd("SET").arg(&tampered).arg(bytes).query(&mut connection).unwrap();
    let (before, mismatched) = (watcher.metrics().requests, refused(&watcher.metrics(), Refusal::ChecksumMismatch));
    let redis_bytes_before = redis_bytes_sent(&mut connection);
    assert!(matches!(watcher.lookup(&published[2]), Lookup::Found(..)));
    assert_eq!(refused(&watcher.metrics(), Refusal::ChecksumMismatch), mismatched + 1);
    assert_eq!(watcher.metrics().requests - before, 1, "the bucket's artifact");
    assert!(redis_bytes_sent(&mut connection) - redis_bytes_before < 1 << 20, "the oversized relay was not sent whole");
    // An announcement larger than any manifest is refused without being
    // sent (its size is read on the server): the bucket's manifest is used.
    let oversized = vec![b'{'; 5 << 20];
    let _: i64 = redis::cmd("HSET").arg(&hash).arg(names.manifest(&published[1])).arg(oversized).query(&mut connection).unwrap();
    let (before, malformed) = (watcher.metrics().requests, refused(&watcher.metrics(), Refusal::Malformed));
    let redis_bytes_before = redis_bytes_sent(&mut connection);
    assert!(matches!(watcher.lookup(&published[1]), Lookup::Found(..)));
    assert_eq!(refused(&watcher.metrics(), Refusal::Malformed), malformed + 1);
    assert_eq!(watcher.metrics().requests - before, 1);
    assert!(redis_bytes_sent(&mut connection) - redis_bytes_before < 1 << 20, "the oversized value was not sent");
    // The bucket stays the record: an announcement that verifies but whose
    // artifact the bucket no longer holds gives way to the bucket's
    // manifest, which (replaced by an operator) names another artifact.
    let mut replacement = records[4].clone();
    (replacement.checksum, replacement.size_bytes) = (records[0].checksum.clone(), records[0].size_bytes);
    replacement.artifact_file = records[0].artifact_file.clone();
    keys.sign_record(&mut replacement);
    let manifest = SharedManifest::sign(&replacement, &keys).unwrap().encode();
    store.run(store.overwrite(&names.manifest(&published[4]), manifest)).unwrap();
    store.run(store.delete(&names.artifact(&records[4].checksum))).unwrap();
    let _: i64 = redis::cmd("DEL").arg(relay_key(names.artifact(&records[4].checksum))).query(&mut connection).unwrap();
    match watcher.lookup(&published[4]) {
        Lookup::Found(record, _) => assert_eq!(record.checksum, records[0].checksum, "the bucket's manifest's artifact"),
        other => panic!("{other:?}"),
    }
}

/// Bytes the Redis server has sent to its clients so far.
fn redis_bytes_sent(connection: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(connection).unwrap();
    let line = info.lines().find_map(|l| l.strip_prefix("total_net_output_bytes:")).expect("INFO stats gives the bytes sent");
    line.trim().parse().unwrap()
}

#[test]
fn a_drain_claims_its_next_job_ahead_and_gives_such_claims_back_when_it_stops() {
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-ahead");
    let keys = fleet_keys();
    let fleet = with_prefix(&server, "ahead");
    let member = Member::open(&dir.path().join("a"), FIVE, &keys, fleet.clone());
    let store = RemoteStore::connect(&fleet).unwrap();
    let names = tezzeret::fleet::objects::ObjectNames::new(&fleet.bucket, &fleet.prefix);
    let lease_objects = || store.run(store.list(&names.leases())).unwrap().len();
    let reports = member
        .service
        .with(|f| {
            let stop = f.shutdown_flag();
            Ok(f.run(&mut |progress| {
                if matches!(progress, Progress::Started(..)) && !stop.load(Ordering::Acquire) {
                    // The first job starts with the next one's claim sent.
                    wait_for("the next job's claim", || lease_objects() >= 2);
                    stop.store(true, Ordering::Release);
                }
            }))
        })
        .unwrap();
    assert!(reports.len() < FIVE.len(), "stopped after the first job: {reports:?}");
    // Nothing it did not publish stays claimed: another host compiles the
    // rest without waiting for a lease.
    assert_eq!(member.service.with(|f| Ok(f.fleet().unwrap().leases().unwrap())).unwrap(), vec![]);
    let other = Member::open(&dir.path().join("b"), FIVE, &keys, fleet);
    assert!(other.run().values().all(|s| matches!(s, JobStatus::Ok | JobStatus::Cached)));
    let metrics = other.metrics();
    assert_eq!((metrics.lease_waits, metrics.hits + metrics.published), (0, FIVE.len() as u64), "{metrics:?}");
}

#[test]
fn a_compiled_job_commits_once_its_upload_ends_while_the_next_jobs_go_on() {
    let server = SeaweedServer::start("fleet");
    // Artifact uploads are held until every job has started compiling.
    let proxy = HoldingProxy::start(server.endpoint().trim_start_matches("http://"), "/artifacts/");
    let dir = TempDir::new("fleet-upload");
    let keys = fleet_keys();
    let mut fleet = with_prefix(&server, "upload");
    fleet.endpoint = Some(proxy.endpoint());
    let member = Member::open(&dir.path().join("a"), FIVE, &keys, fleet);
    let (mut compiling, mut finished, mut finished_while_held) = (Vec::new(), Vec::new(), Vec::new());
    let reports = member
        .service
        .with(|f| {
            Ok(f.run(&mut |progress| match progress {
                Progress::Compiling(id, _) => {
                    compiling.push(id.to_string());
                    if compiling.len() == FIVE.len() {
                        wait_for("the first upload to be held", || proxy.held() >= 1);
                        proxy.release();
                    }
                }
                Progress::Finished(_, _, report) => {
                    if compiling.len() < FIVE.len() {
                        finished_while_held.push(report.blueprint_id.clone());
                    }
                    finished.push(report.blueprint_id.clone());
                }
                _ => {}
            }))
        })
        .unwrap();
    assert!(reports.iter().all(|r| r.status == JobStatus::Ok), "{reports:?}");
    // While the first upload was held, no job was committed and every
    // other job compiled and was stored (before, the drain stopped at the
    // first upload until it timed out).
    assert_eq!(finished_while_held, Vec::<String>::new());
    // Committed in the order they started, each once its upload ended:
    // every catalog update names the bucket's copy.
    assert_eq!(finished, compiling);
    let updates = member.seen.lock().unwrap().updates.clone();
    assert_eq!(updates.len(), FIVE.len());
    assert!(updates.iter().all(|u| u.artifact_ref.starts_with("s3://")), "{updates:?}");
    assert_eq!(member.unshared(), 0);
}

#[test]
fn a_drain_starts_where_no_host_claimed_and_sets_aside_what_others_claimed() {
    let FivePublished { server, dir, keys, first, .. } = five_published("seek-keys");
    let key_of = |id: &str| record_of(&first, id).cache_key;
    // Another host holds the leases of `held`; the member (of index
    // `index`) runs FIVE and the other host gives its leases back once
    // `release_after` holds.
    let run_beside = |prefix: &str, index: u32, held: &[&str], release_after: fn(&Progress<'_>) -> bool| {
        let mut fleet = with_prefix(&server, prefix);
        fleet.member_index = Some(index);
        let other = tezzeret::fleet::Fleet::connect(fleet.clone(), keys.clone(), "other-host".into()).unwrap();
        let mut leases: Vec<_> = held
            .iter()
            .map(|id| match other.claim(&key_of(id)).unwrap() {
                tezzeret::fleet::Claim::Won { lease, .. } => lease,
                held => panic!("{id}: {held:?}"),
            })
            .collect();
        let member = Member::open(&dir.path().join(prefix), FIVE, &keys, fleet);
        let mut started = Vec::new();
        let reports = member
            .service
            .with(|f| {
                Ok(f.run(&mut |progress| {
                    if let Progress::Started(_, _, id) = progress {
                        started.push(id.to_string());
                    }
                    if release_after(&progress) {
                        leases.drain(..).for_each(|lease| other.release(lease).unwrap());
                    }
                }))
            })
            .unwrap();
        assert!(reports.iter().all(|r| r.status == JobStatus::Ok), "{reports:?}");
        let logs = member.seen.lock().unwrap().logs.clone();
        (started, logs)
    };
    // Member 0 starts at the first job. It is claimed: the member tries
    // the golden section of the five next (position 3), wins it and runs
    // the queue on from there.
    let (started, logs) = run_beside("seek", 0, &["BP001"], |p| matches!(p, Progress::Started(..)));
    assert_eq!(started, ["BP006", "BP011", "BP002", "BP005", "BP001"]);
    assert!(logs.iter().any(|l| l.starts_with("BP006: other hosts claimed 1 of the places tried first")), "{logs:?}");
    // The four after the first are claimed: the member starts at the first,
    // loses the claims it sent ahead, and its first lost claim lists the
    // bucket's claims: the jobs it sent no claim for yet wait without one
    // (the last, with two compiles at once).
    let (started, logs) = run_beside("aside", 0, &["BP002", "BP005", "BP006", "BP011"], |p| matches!(p, Progress::Finished(..)));
    assert_eq!(started[0], "BP001");
    let set_aside = |l: &String| l.starts_with("other hosts claimed ") && l.contains(" of the jobs not started");
    assert!(logs.iter().any(set_aside), "{logs:?}");
    // Member 1 starts at its own place, the golden section (nothing
    // claimed: no claim lost), so that it races member 0 for no claim.
    let (started, logs) = run_beside("index", 1, &[], |_| false);
    assert_eq!(started, ["BP006", "BP011", "BP001", "BP002", "BP005"]);
    assert!(!logs.iter().any(|l| l.contains("of the places tried first")), "{logs:?}");
}

#[test]
fn a_read_only_member_fetches_but_never_claims_or_publishes() {
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-reader");
    let (keys, public) = fleet_key_pair();
    let publisher = Member::open(&dir.path().join("a"), FIVE, &keys, with_prefix(&server, "warm"));
    publisher.run();
    let reader_keys = KeyRing::new(None, &[public]).unwrap();
    let mut read_only = with_prefix(&server, "warm");
    read_only.publish = false;
    let reader = Member::open(&dir.path().join("b"), FIVE, &reader_keys, read_only.clone());
    assert!(reader.run().values().all(|s| *s == JobStatus::Cached));
    assert_eq!(reader.metrics().hits, 5);
    // On a cold prefix a reader compiles for itself, leaving the bucket
    // untouched — signing with a key of its own, which it trusts.
    let (own_seed, own_public) = generate_keypair().unwrap();
    let signing_reader_keys = KeyRing::new(Some(own_seed), &[public, own_public]).unwrap();
    read_only.prefix = "cold".into();
    let cold = Member::open(&dir.path().join("c"), &["BP001"], &signing_reader_keys, read_only.clone());
    assert_eq!(cold.run()["BP001"], JobStatus::Ok);
    let fleet = cold.service.with(|f| Ok(f.fleet().unwrap().survey(ArtifactCheck::Listed).unwrap())).unwrap();
    assert_eq!((fleet.manifests, fleet.artifacts, fleet.leases.len()), (0, 0, 0), "no claim, no publication");
    assert_eq!(cold.unshared(), 0, "a reader has nothing to publish");
    // Without a signing key it cannot use what it would compile: the job
    // fails, naming why, instead of announcing a kernel it would refuse.
    let unsigned = Member::open(&dir.path().join("d"), &["BP002"], &reader_keys, read_only.clone());
    let report = unsigned.service.with(|f| Ok(f.run(&mut |_| {}))).unwrap().remove(0);
    assert_eq!(report.status, JobStatus::Failed);
    let error = report.error.expect("why it failed");
    assert_eq!(error.reason_name(), "signature_invalid");
    assert!(error.message().contains("BP002 has no usable copy from the fleet's bucket") && error.message().contains("no signing key"), "{error}");
    assert!(unsigned.seen.lock().unwrap().updates.is_empty(), "nothing announced");
    drop(unsigned);
    // Once a member that signs has published it, the next run fetches it.
    Member::open(&dir.path().join("e"), &["BP002"], &keys, with_prefix(&server, "cold")).run();
    let reopened = Member::open(&dir.path().join("d"), &["BP002"], &reader_keys, read_only);
    assert_eq!(reopened.run()["BP002"], JobStatus::Cached);
    assert_eq!(reopened.metrics().hits, 1);
}

#[test]
fn a_reader_waits_for_the_holder_that_took_over_an_expired_lease() {
    let FivePublished { server, dir, first, .. } = five_published("published");
    let cache_key = record_of(&first, "BP005").cache_key;
    // On another prefix: generation 0 of the key expired (its holder died),
    // generation 1 taken over and held live.
    let holding = with_prefix(&server, "taken-over");
    let store = RemoteStore::connect(&holding).unwrap();
    let names = ObjectNames::new(&server.bucket, "taken-over");
    let dead = br#"{"holder":"dead","expires_at_ms":1}"#.to_vec();
    assert_eq!(store.run(store.create(&names.lease(&cache_key, 0), dead)).unwrap(), Create::Created);
    let holder = tezzeret::fleet::Fleet::connect(holding.clone(), fleet_keys(), "holder".into()).unwrap();
    let lease = match holder.claim(&cache_key).unwrap() {
        tezzeret::fleet::Claim::Won { lease, took_over: true } if lease.generation == 1 => lease,
        other => panic!("{other:?}"),
    };
    // A reader (it signs what it compiles for itself) waits for the live
    // holder, up to its bound, instead of compiling at once.
    let (own_seed, own_public) = generate_keypair().unwrap();
    let reader_keys = KeyRing::new(Some(own_seed), &[own_public]).unwrap();
    let mut read_only = holding;
    read_only.publish = false;
    read_only.lease_wait = Duration::from_secs(1);
    let reader = Member::open(&dir.path().join("reader"), &["BP005"], &reader_keys, read_only);
    assert_eq!(reader.run()["BP005"], JobStatus::Ok);
    let metrics = reader.metrics();
    assert_eq!((metrics.lease_waits, metrics.wait_timeouts), (1, 1), "{metrics:?}");
    holder.release(lease).unwrap();
}

#[test]
fn a_killed_lease_holder_delays_the_others_only_until_its_lease_expires() {
    let server = SeaweedServer::start("fleet");
    a_killed_holder_delays_the_others_only_until_expiry(&server, None);
}

#[test]
fn a_killed_holder_of_a_lease_on_redis_delays_the_others_only_until_expiry() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    a_killed_holder_delays_the_others_only_until_expiry(&server, Some(redis.url()));
}

/// A `tezzeret forge` killed right after winning its lease (in the bucket,
/// or in the Redis at `lease_redis`): another forge waits for the lease
/// to expire, takes it over and compiles.
fn a_killed_holder_delays_the_others_only_until_expiry(server: &SeaweedServer, lease_redis: Option<String>) {
    let dir = TempDir::new("fleet-lease");
    let key = dir.path().join("fleet.key");
    keygen(&key).unwrap();
    let catalog_file = super::catalog_file(dir.path(), &["BP001"]);
    let holder = tezzeret()
        .env("TEZZERET_FAILPOINTS", "fleet.leased=crash@1")
        .arg("forge")
        .arg("--state")
        .arg(dir.path().join("holder"))
        .arg("--catalog")
        .arg(&catalog_file)
        .args(fleet_args(server, "lease", &key))
        .args(["--lease-ttl", "5"])
        .args(lease_redis.iter().flat_map(|url| ["--fleet-lease-redis".to_string(), url.clone()]))
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(holder.status.signal(), Some(libc::SIGKILL), "the holder dies holding its lease");

    let mut fleet = with_prefix(server, "lease");
    fleet.lease_ttl = Duration::from_secs(5);
    fleet.lease_redis = lease_redis;
    let keys = fleet_key_pair_of(&key);
    let taker = Member::open(&dir.path().join("taker"), &["BP001"], &keys, fleet.clone());
    let leases = taker.service.with(|f| Ok(f.fleet().unwrap().leases().unwrap())).unwrap();
    assert_eq!(leases.len(), 1, "the dead holder's lease is in the bucket");
    let live_at_start = !leases[0].2.is_zero();
    assert_eq!(taker.run()["BP001"], JobStatus::Ok);
    let metrics = taker.metrics();
    // (A machine slow enough to open the taker after the expiry takes over at once.)
    assert!(metrics.lease_waits >= 1 || !live_at_start, "{metrics:?}");
    assert_eq!((metrics.lease_takeovers, metrics.wait_timeouts, metrics.published), (1, 0, 1), "{metrics:?}");
    let left = taker.service.with(|f| Ok(f.fleet().unwrap().leases().unwrap())).unwrap();
    assert!(left.is_empty(), "the taker removed its lease and the expired one: {left:?}");
}

#[test]
fn conditional_create_has_exactly_one_winner() {
    let server = SeaweedServer::start("fleet");
    let store = Arc::new(RemoteStore::connect(&server.fleet_config()).unwrap());
    assert_eq!(store.run(store.create("race/solo", b"1".to_vec())).unwrap(), Create::Created);
    assert_eq!(store.run(store.create("race/solo", b"2".to_vec())).unwrap(), Create::Exists);
    assert_eq!(store.run(store.get("race/solo", 16)).unwrap(), Got::Bytes(b"1".to_vec()), "the loser changed nothing");
    assert_eq!(store.run(store.get("race/solo", 0)).unwrap(), Got::TooLarge, "a read stops at its limit");
    assert_eq!(store.run(store.get("race/none", 16)).unwrap(), Got::Missing);
    let racers: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || store.run(store.create("race/eight", vec![i])).unwrap())
        })
        .collect();
    let outcomes: Vec<Create> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == Create::Created).count(), 1, "{outcomes:?}");
}

#[test]
fn a_fleet_needs_trusted_keys_and_a_signing_key_to_publish() {
    let dir = TempDir::new("fleet-config");
    let mut fleet = FleetConfig::new("fleet");
    fleet.endpoint = Some("http://127.0.0.1:1".into());
    let open = |keys: KeyRing, fleet: FleetConfig| {
        let mut config = ForgeConfig::new(dir.path().join("state"));
        config.device = DevicePreference::Cpu;
        config.keys = keys;
        config.fleet = Some(fleet);
        ForgeService::open(config, Box::new(tezzeret::forge::DefaultHost)).err().map(|e| e.message().to_string())
    };
    let message = open(KeyRing::default(), fleet.clone()).expect("refused");
    assert!(message.contains("trusted keys"), "{message}");
    let (_, public) = generate_keypair().unwrap();
    let verify_only = KeyRing::new(None, &[public]).unwrap();
    let message = open(verify_only.clone(), fleet.clone()).expect("refused");
    assert!(message.contains("signing key") && message.contains("--fleet-read-only"), "{message}");
    fleet.publish = false;
    assert_eq!(open(verify_only, fleet.clone()), None, "a read-only member needs no signing key");
    fleet.bucket = "Not_A_Bucket".into();
    let message = open(fleet_keys(), fleet).expect("refused");
    assert!(message.contains("bucket"), "{message}");
}

#[test]
fn a_c_host_joins_the_fleet_through_its_config() {
    use super::cabi::{host_callbacks, ok, open_forge, take};
    use std::ffi::CString;
    use tezzeret::ffi::*;
    let server = SeaweedServer::start("fleet");
    let dir = TempDir::new("fleet-cabi");
    let (seed, public) = generate_keypair().unwrap();
    let strings: Vec<CString> =
        [server.bucket.as_str(), &server.endpoint(), "c-hosts", ACCESS_KEY, SECRET_KEY].iter().map(|s| CString::new(*s).unwrap()).collect();
    let fleet_config = || {
        // SAFETY: a plain C struct; init fills it.
        let mut fleet: tezzeret_fleet_config = unsafe { std::mem::zeroed() };
        ok(unsafe { tezzeret_fleet_config_init(&mut fleet, std::mem::size_of::<tezzeret_fleet_config>()) });
        fleet.bucket = strings[0].as_ptr();
        fleet.endpoint = strings[1].as_ptr();
        fleet.prefix = strings[2].as_ptr();
        fleet.access_key_id = strings[3].as_ptr();
        fleet.secret_access_key = strings[4].as_ptr();
        fleet.request_timeout_ms = server.fleet_config().request_timeout.as_millis() as u64;
        fleet
    };
    let id = CString::new("BP001").unwrap();
    let callbacks = host_callbacks(std::ptr::null_mut(), None, None, None, None);
    let mut statuses = Vec::new();
    for (index, host) in ["first", "second"].into_iter().enumerate() {
        let mut fleet = fleet_config();
        fleet.member_index = index as i64;
        let forge = open_forge(&dir.path().join(host), &callbacks, |c| {
            c.signing_key = seed.as_ptr();
            c.trusted_keys = public.as_ptr();
            c.trusted_key_count = 1;
            c.fleet = &fleet;
        });
        // SAFETY: a live forge and a NUL-terminated id; the packet is freed once.
        unsafe {
            ok(tezzeret_forge_compile_now(forge, id.as_ptr()));
            let mut packet = std::ptr::null_mut();
            ok(tezzeret_forge_metrics(forge, &mut packet));
            let decoded: tezzeret::base::leyline::TelemetryPacket =
                leyline::decode(std::slice::from_raw_parts(tezzeret_buffer_data(packet), tezzeret_buffer_len(packet))).unwrap();
            tezzeret_buffer_free(packet);
            let value = |name: &str| decoded.metrics.iter().find(|m| m.name == name).map_or(-1.0, |m| m.value);
            statuses.push((value("tezzeret.fleet.published"), value("tezzeret.fleet.hits")));
            tezzeret_forge_close(forge);
        }
    }
    assert_eq!(statuses, vec![(1.0, 0.0), (0.0, 1.0)], "the first publishes, the second fetches");

    // Bad fleet configurations are refused at open, naming the field.
    let open = |tune: &dyn Fn(&mut tezzeret_fleet_config)| {
        let mut fleet = fleet_config();
        tune(&mut fleet);
        let path = CString::new(dir.path().join("bad").to_str().unwrap()).unwrap();
        // SAFETY: initialised structs whose pointers outlive the call.
        unsafe {
            let mut config: tezzeret_config = std::mem::zeroed();
            ok(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()));
            config.state_dir = path.as_ptr();
            config.trusted_keys = public.as_ptr();
            config.trusted_key_count = 1;
            config.signing_key = seed.as_ptr();
            config.fleet = &fleet;
            let mut out = std::ptr::null_mut();
            let status = tezzeret_forge_open(&config, std::ptr::null(), &mut out);
            assert!(out.is_null(), "no handle on failure");
            take(status)
        }
    };
    let bad = CString::new("Bad_Bucket").unwrap();
    let not_url = CString::new("127.0.0.1:9000").unwrap();
    let not_redis = CString::new("http://:secret@127.0.0.1:6379").unwrap();
    let cases: [(&dyn Fn(&mut tezzeret_fleet_config), &str); 11] = [
        (&|f| f.bucket = std::ptr::null(), "config.fleet.bucket is NULL"),
        // Sizes that end inside a field (half the endpoint pointer, half
        // member_index): refused, never read.
        (&|f| f.struct_size = 20, "config.fleet.struct_size is 20, not the size of any of its layouts"),
        (&|f| f.struct_size = 100, "config.fleet.struct_size is 100, not the size of any of its layouts"),
        (&|f| f.member_index = -2, "config.fleet.member_index -2 is neither -1 nor an index"),
        (&|f| f.member_index = 1 << 32, "config.fleet.member_index 4294967296"),
        (&|f| f.bucket = bad.as_ptr(), "fleet bucket \"Bad_Bucket\""),
        (&|f| f.endpoint = not_url.as_ptr(), "not an http:// or https:// URL"),
        (&|f| f.secret_access_key = std::ptr::null(), "set both access_key_id and secret_access_key"),
        (&|f| f.flags = 0x10, "config.fleet.flags has unknown bits 0x10"),
        (&|f| f.lease_ttl_ms = 0, "fleet lease TTL"),
        (&|f| f.lease_redis_url = not_redis.as_ptr(), "config.fleet: fleet lease Redis \"http://…@127.0.0.1:6379\" is not a redis://"),
    ];
    for (tune, expected) in cases {
        let (code, message) = open(tune);
        assert_eq!(code, TEZZERET_CODE_INVALID_ARGUMENT, "{expected}: {message}");
        assert!(message.contains(expected), "{message:?} should name {expected:?}");
    }
    // init refuses such a size too, writing nothing.
    let mut bytes = [0xa5u8; std::mem::size_of::<tezzeret_fleet_config>()];
    // SAFETY: a buffer larger than the stated size.
    let (code, message) = take(unsafe { tezzeret_fleet_config_init(bytes.as_mut_ptr().cast(), 100) });
    assert!(code == TEZZERET_CODE_INVALID_ARGUMENT && message.contains("struct_size is 100"), "{message}");
    assert!(bytes.iter().all(|&b| b == 0xa5), "nothing written");
}

#[test]
fn a_consumer_without_a_forge_fetches_an_announced_artifact_by_its_reference() {
    use super::cabi::{ok, take};
    use sha2::{Digest, Sha256};
    use std::ffi::CString;
    use tezzeret::ffi::*;
    use tezzeret::fleet::fetch_artifact;
    use tezzeret::ErrorCode;
    let FivePublished { server, dir, fleet, first, .. } = five_published("consumer");
    let updates = first.seen.lock().unwrap().updates.clone();
    let update = updates.iter().find(|u| u.blueprint_id == "BP001").expect("BP001 announced").clone();
    assert!(update.artifact_ref.starts_with("s3://fleet/consumer/artifacts/"), "{update:?}");
    let sha_of = |path: &Path| tezzeret::base::hex::encode(&Sha256::digest(std::fs::read(path).unwrap()));
    // The consumer knows the store's address and credentials, not the bucket.
    let consumer = FleetConfig { bucket: String::new(), prefix: String::new(), ..fleet.clone() };

    // From Rust, checked against the announcement's checksum too; a temp
    // file a killed fetch of the same path left two days ago goes, a day-old
    // one (a fetch with a day's request timeout may still be under way) stays.
    let out = dir.path().join("from-rust.pt");
    let (stale, recent) = (dir.path().join(".tmp-999999-1-from-rust.pt"), dir.path().join(".tmp-999999-2-from-rust.pt"));
    std::fs::File::create(&stale).unwrap().set_modified(std::time::SystemTime::now() - Duration::from_secs(49 * 3600)).unwrap();
    std::fs::File::create(&recent).unwrap().set_modified(std::time::SystemTime::now() - Duration::from_secs(25 * 3600)).unwrap();
    let fetched = fetch_artifact(&consumer, &update.artifact_ref, Some(&update.checksum), &out).unwrap();
    assert_eq!((fetched.sha256.as_str(), sha_of(&out)), (update.checksum.as_str(), update.checksum.clone()));
    assert_eq!(fetched.size, std::fs::metadata(&out).unwrap().len());
    assert!(!stale.exists() && recent.exists(), "only the two-day-old temp file of the same path is removed");
    std::fs::remove_file(&recent).unwrap();

    // From C: the bucket may be left NULL, the reference names it.
    let c = |s: &str| CString::new(s).unwrap();
    let (endpoint, access, secret) = (c(&server.endpoint()), c(ACCESS_KEY), c(SECRET_KEY));
    // SAFETY: a plain C struct; init fills it, and its strings outlive the calls.
    let mut config: tezzeret_fleet_config = unsafe { std::mem::zeroed() };
    ok(unsafe { tezzeret_fleet_config_init(&mut config, std::mem::size_of::<tezzeret_fleet_config>()) });
    (config.endpoint, config.access_key_id, config.secret_access_key) = (endpoint.as_ptr(), access.as_ptr(), secret.as_ptr());
    let c_fetch = |config: &tezzeret_fleet_config, reference: &str, checksum: Option<&str>, out: &Path| {
        let (reference, out) = (c(reference), c(out.to_str().unwrap()));
        let checksum = checksum.map(c);
        let checksum_ptr = checksum.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: NUL-terminated strings and an initialised config, all live for the call.
        unsafe { tezzeret_fleet_fetch_artifact(config, reference.as_ptr(), checksum_ptr, out.as_ptr()) }
    };
    let out = dir.path().join("from-c.pt");
    ok(c_fetch(&config, &update.artifact_ref, None, &out));
    assert_eq!(sha_of(&out), update.checksum);

    // From the CLI, credentials from the environment.
    let out = dir.path().join("from-cli.pt");
    let cli = |reference: &str, out: &Path| {
        let args = ["fetch", reference, "--out", out.to_str().unwrap(), "--s3-endpoint", &server.endpoint()];
        tezzeret().args(args).output().unwrap()
    };
    let done = cli(&update.artifact_ref, &out);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(sha_of(&out), update.checksum);
    // A bare file name lands in the current directory.
    let args = ["fetch", update.artifact_ref.as_str(), "--out", "bare.pt", "--s3-endpoint", &server.endpoint()];
    let done = tezzeret().current_dir(dir.path()).args(args).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(sha_of(&dir.path().join("bare.pt")), update.checksum);

    // Refused before any request: another checksum, another bucket, a local path.
    let other_sha = format!("{:0>64}", "1");
    let error = fetch_artifact(&consumer, &update.artifact_ref, Some(&other_sha), &out).unwrap_err();
    assert!(error.code() == ErrorCode::InvalidArgument && error.message().contains("expected checksum"), "{error}");
    let error = fetch_artifact(&fleet.clone(), &update.artifact_ref.replace("s3://fleet/", "s3://other/"), None, &out).unwrap_err();
    assert!(error.code() == ErrorCode::InvalidArgument && error.message().contains("not in the configured bucket"), "{error}");
    let no_path = c(&update.artifact_ref);
    // SAFETY: a NUL-terminated reference; the NULL path is refused.
    let (code, message) = take(unsafe { tezzeret_fleet_fetch_artifact(&config, no_path.as_ptr(), std::ptr::null(), std::ptr::null()) });
    assert!(code == TEZZERET_CODE_NULL_ARGUMENT && message.contains("path is NULL"), "{message}");
    let (code, message) = take(c_fetch(&config, "/var/lib/state/artifacts/x.pt", None, &out));
    assert!(code == TEZZERET_CODE_INVALID_ARGUMENT && message.contains("local path"), "{message}");
    let error = fetch_artifact(&consumer, &update.artifact_ref, Some(&format!(" {}", &update.checksum[1..])), &out).unwrap_err();
    assert!(error.code() == ErrorCode::InvalidArgument && error.message().contains("is not 64 hexadecimal digits"), "{error}");
    let error = fetch_artifact(&consumer, &update.artifact_ref, None, &dir.path().join("no-such-dir/a.pt")).unwrap_err();
    assert!(error.code() == ErrorCode::InvalidArgument && error.message().contains("no directory"), "{error}");
    let error = fetch_artifact(&consumer, &update.artifact_ref, None, Path::new(&format!("{}/new/", dir.path().display()))).unwrap_err();
    assert!(error.code() == ErrorCode::InvalidArgument && error.message().contains("names no file"), "{error}");
    // Something other than a regular file at the destination is refused, not replaced.
    let link = dir.path().join("link.pt");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    let error = fetch_artifact(&consumer, &update.artifact_ref, None, &link).unwrap_err();
    assert!(error.code() == ErrorCode::InvalidArgument && error.message().contains("not a regular file"), "{error}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink() && !dir.path().join("elsewhere").exists());
    // An artifact the bucket lacks.
    let missing = update.artifact_ref.replace(&update.checksum, &other_sha);
    let (code, message) = take(c_fetch(&config, &missing, None, &out));
    assert!(code == TEZZERET_CODE_NOT_FOUND && message.contains("no such artifact"), "{message}");
    // A bucket that does not exist is not taken for a missing artifact.
    let (code, message) = take(c_fetch(&config, &update.artifact_ref.replace("s3://fleet/", "s3://no-such-bucket/"), None, &out));
    assert!(code == TEZZERET_CODE_IO && message.contains("NoSuchBucket"), "{message}");

    // The bucket is untrusted: damaged bytes are refused and nothing is
    // written, neither a new file nor over an old one.
    let store = RemoteStore::connect(&fleet).unwrap();
    let name = ObjectNames::new(&fleet.bucket, &fleet.prefix).artifact(&update.checksum);
    let mut bytes = store.run(store.get(&name, u64::MAX)).unwrap().bytes().unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    store.run(store.overwrite(&name, bytes)).unwrap();
    let error = fetch_artifact(&consumer, &update.artifact_ref, None, &dir.path().join("damaged.pt")).unwrap_err();
    assert!(error.code() == ErrorCode::Corrupt && error.message().contains("damaged"), "{error}");
    assert!(!dir.path().join("damaged.pt").exists());
    let (code, message) = take(c_fetch(&config, &update.artifact_ref, None, &out));
    assert!(code == TEZZERET_CODE_CORRUPT && message.contains("nothing was written"), "{message}");
    assert_eq!(sha_of(&out), update.checksum, "the file fetched before is left as it was");
    let refused = cli(&update.artifact_ref, &out);
    assert!(refused.status.code() == Some(1) && String::from_utf8_lossy(&refused.stderr).contains("damaged"));
    let refused = cli(&update.artifact_ref.replace(&update.checksum[..8], "x"), &out);
    assert_eq!(refused.status.code(), Some(2), "a malformed reference is a usage error");
}

#[test]
fn a_forge_with_a_bus_keeps_the_fleets_leases_in_the_bucket_unless_told_to_use_the_buss_redis() {
    let server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let dir = TempDir::new("fleet-bus-leases");
    let mut redis_connection = redis.connection();
    let config_for = |prefix: &str, on_bus: bool, bus: bool| {
        let mut fleet = with_prefix(&server, prefix);
        fleet.leases_on_bus = on_bus;
        // A slow answer on a busy machine must not be taken for an outage.
        fleet.request_timeout = Duration::from_secs(60);
        let mut config = ForgeConfig::new(dir.path().join(prefix));
        config.device = DevicePreference::Cpu;
        config.telemetry_interval_ms = 0;
        config.keys = fleet_keys();
        config.fleet = Some(fleet);
        config.bus = bus.then(|| tezzeret::bus::BusConfig::new(redis.url()));
        config
    };
    for (prefix, on_bus) in [("in-bucket", false), ("on-bus", true)] {
        let config = config_for(prefix, on_bus, true);
        let fleet = config.fleet.clone().unwrap();
        let host = RecordingHost { catalog: catalog(&["BP001"]), seen: Arc::default() };
        let service = ForgeService::open(config, Box::new(host)).unwrap();
        let place = service.with(|f| Ok(f.fleet().unwrap().lease_redis().map(str::to_string))).unwrap();
        assert_eq!(place.is_some(), on_bus, "{prefix}: {place:?}");
        assert!(service.with(|f| Ok(f.run(&mut |_| {}))).unwrap().iter().all(|r| r.status == JobStatus::Ok));
        service.close();
        // Where the claim of BP001 was made: the bucket or the bus's Redis.
        let names = ObjectNames::new(&fleet.bucket, &fleet.prefix);
        let store = RemoteStore::connect(&fleet).unwrap();
        let in_the_bucket = store.run(store.list(&names.leases())).unwrap().len();
        let hash: usize = redis::cmd("HLEN").arg(format!("tezzeret:fleet:{}", names.root())).query(&mut redis_connection).unwrap();
        let leases_in_redis = if on_bus { hash.saturating_sub(1) } else { hash }; // on the bus: its announcement too
        assert_eq!((in_the_bucket, leases_in_redis), if on_bus { (0, 1) } else { (1, 0) }, "{prefix}: bucket, Redis");
    }
    // Without a bus there is no Redis to keep them on.
    let error = ForgeService::open(config_for("no-bus", true, false), Box::new(tezzeret::forge::DefaultHost)).err().unwrap();
    assert!(error.message().contains("leases_on_bus") && error.message().contains("needs a bus"), "{error}");
    // A fleet connected without a forge has no bus to take the Redis of.
    let alone = FleetConfig { leases_on_bus: true, ..with_prefix(&server, "alone") };
    let error = tezzeret::fleet::Fleet::connect(alone, fleet_keys(), "alone".into()).err().unwrap();
    assert!(error.message().contains("resolved by a forge with a bus"), "{error}");
}

#[test]
fn an_update_announced_during_an_outage_goes_out_on_the_bus_again_with_the_reference() {
    use tezzeret::base::leyline::BusEnvelope;
    let mut server = SeaweedServer::start("fleet");
    let redis = RedisServer::start();
    let dir = TempDir::new("fleet-bus-again");
    let mut fleet = with_prefix(&server, "again");
    fleet.retry_interval = Duration::from_millis(100);
    fleet.request_timeout = Duration::from_secs(2);
    let mut config = ForgeConfig::new(dir.path().join("a"));
    config.device = DevicePreference::Cpu;
    config.telemetry_interval_ms = 0;
    config.keys = fleet_keys();
    config.fleet = Some(fleet);
    config.bus = Some(tezzeret::bus::BusConfig::new(redis.url()));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let host = RecordingHost { catalog: catalog(&["BP001"]), seen: seen.clone() };
    // The store is down from the start: the update names the local file.
    server.kill();
    let service = ForgeService::open(config, Box::new(host)).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    server.restart();
    wait_for("the background thread to publish", || service.with(|f| Ok(f.unshared())).unwrap() == 0);
    // Both updates reach the bus, each with its own message id, in order.
    let mut redis_connection = redis.connection();
    let mut ready = || -> Vec<(String, KernelCatalogUpdate)> {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE").arg("oona.kernels.ready").arg("-").arg("+").query(&mut redis_connection).unwrap();
        entries
            .ids
            .iter()
            .map(|entry| {
                let payload: Vec<u8> = entry.get("payload").unwrap();
                let id: String = entry.get("message_id").unwrap_or_default();
                let envelope: BusEnvelope = leyline::decode(&payload).unwrap();
                (envelope.attributes.get("message_id").cloned().unwrap_or(id), leyline::decode(&envelope.payload).unwrap())
            })
            .collect()
    };
    let mut published = Vec::new();
    wait_for("both updates on the bus", || {
        published = ready();
        published.len() == 2
    });
    let (first, again) = (&published[0], &published[1]);
    assert!(!first.1.artifact_ref.starts_with("s3://") && again.1.artifact_ref.starts_with("s3://fleet/again/artifacts/"), "{published:?}");
    assert_eq!((first.1.blueprint_id.as_str(), &first.1.checksum), (again.1.blueprint_id.as_str(), &again.1.checksum));
    assert_ne!(first.0, again.0, "a message id of its own");
    assert_eq!(seen.lock().unwrap().updates.len(), 2, "the host hears both too");
    service.close();
}
