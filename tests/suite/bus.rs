//! The forge on the Oona bus, against a real `redis-server`: a client
//! plays Kasmina (requests, answers, signatures) and a subscriber reads the
//! catalog updates and telemetry; bad entries, replays, stale requests,
//! two forges in one group, Redis killed and restarted, a forge killed
//! between commit and publish.
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::redis_server::RedisServer;
use super::{catalog_file, wait_for, FixedCatalog, TempDir};
use tezzeret::base::leyline::{
    self, BusEnvelope, BusMessageType, KernelArtifactError, KernelArtifactReady, KernelCatalogUpdate, KernelPrefetchRequest,
    TelemetryPacket, Timestamp,
};
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::Strategy;
use tezzeret::bus::{BusConfig, StreamNames};
use tezzeret::forge::{DevicePreference, ForgeConfig, ForgeService, Host};

const SECRET: &[u8] = b"kasmina-and-tezzeret";

/// The first `n` blueprints of the default catalog that compile fastest.
pub fn tiny_catalog(ids: &[&str]) -> Catalog {
    let all = Catalog::default_catalog();
    Catalog::new(ids.iter().map(|id| all.get(id).expect("known id").clone()).collect()).unwrap()
}

const CHEAP: &[&str] = &["BP001", "BP002", "BP005"];

fn sign(secret: &[u8], bytes: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(bytes);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// One entry read back from a stream.
#[derive(Debug, Clone)]
struct Message {
    envelope: BusEnvelope,
    /// Whether its signature verifies with the test secret (None: unsigned).
    signed: Option<bool>,
}

impl Message {
    fn kind(&self) -> i32 {
        self.envelope.message_type
    }
    fn attribute(&self, name: &str) -> &str {
        self.envelope.attributes.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Plays Kasmina and the subscribers: adds requests, reads streams.
struct Kasmina {
    con: redis::Connection,
    streams: StreamNames,
    secret: Option<Vec<u8>>,
}

impl Kasmina {
    fn new(redis: &RedisServer, secret: Option<&[u8]>) -> Self {
        Kasmina { con: redis.connection(), streams: StreamNames::default(), secret: secret.map(<[u8]>::to_vec) }
    }

    fn envelope(request: &KernelPrefetchRequest) -> Vec<u8> {
        leyline::encode(&BusEnvelope {
            message_type: BusMessageType::KernelPrefetchRequest as i32,
            payload: leyline::encode(request),
            attributes: BTreeMap::new(),
        })
    }

    fn fresh(request_id: &str, blueprint_id: &str) -> KernelPrefetchRequest {
        KernelPrefetchRequest {
            request_id: request_id.into(),
            blueprint_id: blueprint_id.into(),
            training_run_id: "run-1".into(),
            issued_at: Some(Timestamp::now()),
        }
    }

    /// Adds raw fields to the requests stream.
    fn add(&mut self, fields: &[(&str, &[u8])]) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.streams.requests).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query::<String>(&mut self.con).unwrap();
    }

    /// Adds a request signed as configured.
    fn request(&mut self, request: &KernelPrefetchRequest) {
        let payload = Self::envelope(request);
        match self.secret.clone() {
            Some(secret) => self.add(&[("payload", &payload), ("signature", sign(&secret, &payload).as_bytes())]),
            None => self.add(&[("payload", &payload)]),
        }
    }

    fn read(&mut self, stream: &str) -> Vec<Message> {
        let reply: redis::Value = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut self.con).unwrap();
        tezzeret::bus::link::entries(&reply)
            .into_iter()
            .map(|entry| {
                let payload = entry.field("payload").expect("payload field").to_vec();
                let signed = entry.field("signature").map(|s| self.secret.as_ref().is_some_and(|k| sign(k, &payload).as_bytes() == s));
                Message { envelope: leyline::decode(&payload).expect("a BusEnvelope"), signed }
            })
            .collect()
    }

    fn wait_read(&mut self, stream: &str, what: &str, mut done: impl FnMut(&[Message]) -> bool) -> Vec<Message> {
        let stream = stream.to_string();
        let mut last = Vec::new();
        wait_for(what, || {
            last = self.read(&stream);
            done(&last)
        });
        last
    }

    /// Waits until the answers (by request id) satisfy `done`; returns them.
    fn wait_answers(&mut self, what: &str, mut done: impl FnMut(&[(String, Message)]) -> bool) -> Vec<(String, Message)> {
        let mut last = Vec::new();
        wait_for(what, || {
            last = self.answers();
            done(&last)
        });
        last
    }

    fn ready(&mut self) -> String {
        self.streams.ready.clone()
    }

    /// The answers (ready and error) by request id.
    fn answers(&mut self) -> Vec<(String, Message)> {
        let (ready, errors) = (self.streams.ready.clone(), self.streams.errors.clone());
        let mut all: Vec<Message> = self.read(&ready);
        all.extend(self.read(&errors));
        all.into_iter()
            .filter(|m| m.kind() == BusMessageType::KernelPrefetchReady as i32 || m.kind() == BusMessageType::KernelPrefetchError as i32)
            .map(|m| (m.attribute("request_id").to_string(), m))
            .collect()
    }
}

fn bus_config(redis: &RedisServer, secret: Option<&[u8]>) -> BusConfig {
    let mut bus = BusConfig::new(redis.url());
    bus.secret = secret.map(<[u8]>::to_vec);
    bus.claim_idle = Duration::from_millis(300);
    bus
}

fn forge_config(state: &std::path::Path, bus: BusConfig) -> ForgeConfig {
    let mut config = ForgeConfig::new(state);
    config.strategy = Strategy::Emergency;
    config.device = DevicePreference::Cpu;
    config.max_concurrency = 1;
    config.telemetry_interval_ms = 0;
    config.bus = Some(bus);
    config
}

/// Waits until the forge's request reader has created its consumer group
/// (requests added before it would not be delivered to the group).
fn wait_group(k: &mut Kasmina) {
    let stream = k.streams.requests.clone();
    wait_for("the forge's consumer group", || {
        let reply: redis::RedisResult<redis::Value> = redis::cmd("XINFO").arg("GROUPS").arg(&stream).query(&mut k.con);
        matches!(reply, Ok(redis::Value::Array(v)) if !v.is_empty())
    });
}

/// Waits until no request is pending in the forge's group: a request is
/// acknowledged only after its answer is added, so a reader who saw the
/// answer may still see the request pending for a moment.
fn wait_acknowledged(k: &mut Kasmina) {
    let stream = k.streams.requests.clone();
    wait_for("every request acknowledged", || {
        let pending: redis::Value = redis::cmd("XPENDING").arg(&stream).arg("tezzeret").query(&mut k.con).unwrap();
        matches!(&pending, redis::Value::Array(v) if v.first() == Some(&redis::Value::Int(0)))
    });
}

fn metric(service: &ForgeService, name: &str, label: (&str, &str)) -> f64 {
    service
        .with(|f| Ok(f.metrics()))
        .unwrap()
        .into_iter()
        .find(|m| m.name == name && (label.0.is_empty() || m.attributes.get(label.0).map(String::as_str) == Some(label.1)))
        .map_or(f64::NAN, |m| m.value)
}

#[test]
fn catalog_updates_and_telemetry_are_published_signed_and_prefetch_is_answered() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-basic");
    let mut k = Kasmina::new(&redis, Some(SECRET));
    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, Some(SECRET))), Box::new(FixedCatalog(tiny_catalog(CHEAP)))).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    let ready = k.ready();
    let updates = k.wait_read(&ready, "three catalog updates", |m| m.len() >= 3);
    let artifacts = service.with(|f| Ok(f.artifacts().clone())).unwrap();
    let mut ids = BTreeSet::new();
    for m in &updates {
        assert_eq!(m.kind(), BusMessageType::KernelCatalogUpdate as i32);
        assert_eq!(m.signed, Some(true), "every entry is signed with the shared secret");
        let update: KernelCatalogUpdate = leyline::decode(&m.envelope.payload).unwrap();
        assert_eq!(update.checksum, artifacts[&update.blueprint_id].checksum);
        assert!(ids.insert(m.attribute("message_id").to_string()), "message ids are distinct");
    }
    assert_eq!(updates.iter().map(|m| leyline::decode::<KernelCatalogUpdate>(&m.envelope.payload).unwrap().blueprint_id).collect::<BTreeSet<_>>(),
        CHEAP.iter().map(|s| s.to_string()).collect());
    // Immediate telemetry of the compiles, signed, from the tezzeret subsystem.
    let telemetry = k.wait_read("oona.telemetry", "telemetry packets", |m| !m.is_empty());
    let packet: TelemetryPacket = leyline::decode(&telemetry[0].envelope.payload).unwrap();
    assert_eq!((packet.source_subsystem.as_str(), telemetry[0].signed), ("tezzeret", Some(true)));

    wait_group(&mut k);
    k.request(&Kasmina::fresh("r-ok", "BP002"));
    k.request(&Kasmina::fresh("r-missing", "BP999"));
    let answers = k.wait_answers("two answers", |a| a.len() >= 2);
    let by_id: BTreeMap<_, _> = answers.into_iter().collect();
    let ok: KernelArtifactReady = leyline::decode(&by_id["r-ok"].envelope.payload).unwrap();
    assert_eq!(by_id["r-ok"].signed, Some(true));
    assert_eq!(ok.checksum, artifacts["BP002"].checksum);
    assert_eq!(ok.guard_digest, artifacts["BP002"].guard_digest);
    // The same answer as the in-process prefetch.
    let local = service.prefetch(&Kasmina::fresh("r-ok", "BP002")).unwrap();
    assert_eq!(local, leyline::PrefetchAnswer::Ready(ok));
    let missing: KernelArtifactError = leyline::decode(&by_id["r-missing"].envelope.payload).unwrap();
    assert_eq!(missing.reason, "missing_artifact");
    assert_eq!(metric(&service, "tezzeret.bus.answered", ("answer", "ready")), 1.0);
    assert_eq!(metric(&service, "tezzeret.bus.connected", ("", "")), 1.0);
    let health = service.with(|f| Ok(f.health())).unwrap();
    assert_eq!(health.indicators["bus"], "connected");
    wait_acknowledged(&mut k);
    service.close();
}

#[test]
fn bad_stale_and_replayed_requests_are_dropped_counted_and_never_answered() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-bad");
    let mut k = Kasmina::new(&redis, Some(SECRET));
    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, Some(SECRET))), Box::new(FixedCatalog(tiny_catalog(&["BP001"])))).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    wait_group(&mut k);

    let good = Kasmina::envelope(&Kasmina::fresh("wrong-sig", "BP001"));
    k.add(&[("payload", &good), ("signature", sign(b"another secret", &good).as_bytes())]);
    let unsigned = Kasmina::envelope(&Kasmina::fresh("unsigned", "BP001"));
    k.add(&[("payload", &unsigned)]);
    let garbage = b"\xff\xfe not a protobuf".to_vec();
    k.add(&[("payload", &garbage), ("signature", sign(SECRET, &garbage).as_bytes())]);
    k.add(&[("something", b"else")]);
    let telemetry = leyline::encode(&BusEnvelope { message_type: BusMessageType::Telemetry as i32, payload: vec![], attributes: BTreeMap::new() });
    k.add(&[("payload", &telemetry), ("signature", sign(SECRET, &telemetry).as_bytes())]);
    let inner_garbage = leyline::encode(&BusEnvelope {
        message_type: BusMessageType::KernelPrefetchRequest as i32,
        payload: b"\xff\xff\xff".to_vec(),
        attributes: BTreeMap::new(),
    });
    k.add(&[("payload", &inner_garbage), ("signature", sign(SECRET, &inner_garbage).as_bytes())]);
    k.request(&KernelPrefetchRequest { issued_at: None, ..Kasmina::fresh("no-time", "BP001") });
    k.request(&Kasmina::fresh("", "BP001"));
    let mut stale = Kasmina::fresh("stale", "BP001");
    stale.issued_at.as_mut().unwrap().seconds -= 120;
    k.request(&stale);
    k.request(&Kasmina::fresh("twice", "BP001"));
    k.request(&Kasmina::fresh("twice", "BP001"));
    k.request(&Kasmina::fresh("last", "BP001"));

    let answers = k.wait_answers("the valid requests' answers", |a| a.iter().any(|(id, _)| id == "last"));
    let answered: Vec<&str> = answers.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(answered, ["twice", "last"], "only valid, fresh, first-seen requests are answered");
    for (reason, count) in [
        ("signature_invalid", 1.0),
        ("signature_missing", 1.0),
        ("malformed_envelope", 1.0),
        ("unexpected_type", 1.0),
        ("malformed_message", 1.0),
        ("missing_field", 2.0),
        ("stale", 1.0),
        ("replayed", 1.0),
    ] {
        assert_eq!(metric(&service, "tezzeret.bus.requests_dropped", ("reason", reason)), count, "{reason}");
    }
    assert_eq!(metric(&service, "tezzeret.bus.requests_dropped", ("reason", "missing_payload")), 1.0);
    service.close();
}

#[test]
fn a_dead_consumers_requests_are_taken_over_and_poison_goes_to_the_dead_letter_stream() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-claim");
    let mut k = Kasmina::new(&redis, None);
    // The group exists before the forge: a consumer "ghost" reads two
    // requests and dies without acknowledging them.
    redis::cmd("XGROUP").arg("CREATE").arg("oona.kernels.requests").arg("tezzeret").arg("$").arg("MKSTREAM").query::<()>(&mut k.con).unwrap();
    k.request(&Kasmina::fresh("orphan", "BP001"));
    k.request(&Kasmina::fresh("poison", "BP001"));
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP").arg("tezzeret").arg("ghost").arg("COUNT").arg(2).arg("STREAMS").arg("oona.kernels.requests").arg(">")
        .query(&mut k.con)
        .unwrap();
    let taken = tezzeret::bus::link::read_reply_entries(&read);
    assert_eq!(taken.len(), 2);
    // "poison" has failed many deliveries already.
    redis::cmd("XCLAIM")
        .arg("oona.kernels.requests").arg("tezzeret").arg("ghost").arg(0).arg(&taken[1].id).arg("RETRYCOUNT").arg(10)
        .query::<redis::Value>(&mut k.con)
        .unwrap();

    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, None)), Box::new(FixedCatalog(tiny_catalog(&["BP001"])))).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    let dead = k.wait_read("oona.kernels.requests.dead_letter", "the poison entry in the dead-letter stream", |m| !m.is_empty());
    let request: KernelPrefetchRequest = leyline::decode(&dead[0].envelope.payload).unwrap();
    assert_eq!(request.request_id, "poison");
    let answers = k.wait_answers("the orphan's answer", |a| !a.is_empty());
    assert_eq!(answers.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["orphan"]);
    assert_eq!(metric(&service, "tezzeret.bus.dead_lettered", ("", "")), 1.0);
    assert_eq!(metric(&service, "tezzeret.bus.reclaimed", ("", "")), 1.0);
    wait_acknowledged(&mut k);
    service.close();
}

/// A `tezzeret serve` child process, killed on drop if it still runs (a
/// failing test leaves no service behind).
struct Served {
    child: Child,
    log: Option<std::thread::JoinHandle<String>>,
}

fn serve(state: &std::path::Path, catalog: &std::path::Path, redis: &RedisServer, consumer: &str) -> Served {
    let child = Command::new(env!("CARGO_BIN_EXE_tezzeret"))
        .args(["serve", "--strategy", "emergency", "--device", "cpu", "--jobs", "1", "--claim-idle", "0.3", "--trace-events"])
        .arg("--state").arg(state)
        .arg("--catalog").arg(catalog)
        .args(["--redis", &redis.url(), "--consumer", consumer])
        .env("ESPER_LEYLINE_SECRET", std::str::from_utf8(SECRET).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Served { child, log: None }
}

impl Served {
    /// Waits for `event serving` on its stderr (the rest of which is kept).
    fn wait_serving(&mut self) {
        use std::io::BufRead;
        let stderr = self.child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        self.log = Some(std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line == "event serving" {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        }));
        rx.recv_timeout(Duration::from_secs(300)).expect("the service reports serving");
    }

    /// Sends SIGTERM and asserts a clean exit; returns its stderr.
    fn terminate(mut self) -> String {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let log = self.log.take().map(|l| l.join().unwrap()).unwrap_or_default();
        assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}\n{log}");
        log
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn two_serve_processes_in_one_group_answer_each_request_exactly_once() {
    let redis = RedisServer::start();
    let dir = TempDir::new("bus-group");
    let catalog = catalog_file(dir.path(), &["BP001"]);
    let mut a = serve(&dir.path().join("a"), &catalog, &redis, "forge-a");
    let mut b = serve(&dir.path().join("b"), &catalog, &redis, "forge-b");
    a.wait_serving();
    b.wait_serving();
    let mut k = Kasmina::new(&redis, Some(SECRET));
    wait_group(&mut k);
    // One request at a time: each goes to whichever reader is waiting first,
    // and the one that answered waits behind the other.
    let total = 60;
    for i in 0..total {
        k.request(&Kasmina::fresh(&format!("req-{i}"), "BP001"));
        wait_for("an answer", || k.answers().len() > i);
    }
    let answers = k.answers();
    let ids: BTreeSet<&str> = answers.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!((answers.len(), ids.len()), (total, total), "each request answered exactly once");
    let by_consumer: BTreeSet<&str> = answers.iter().map(|(_, m)| m.attribute("consumer")).collect();
    assert_eq!(by_consumer, BTreeSet::from(["forge-a", "forge-b"]), "both forges share the requests");
    assert!(answers.iter().all(|(_, m)| m.kind() == BusMessageType::KernelPrefetchReady as i32 && m.signed == Some(true)));
    a.terminate();
    b.terminate();
    let ready = k.ready();
    let updates: Vec<Message> = k.read(&ready).into_iter().filter(|m| m.kind() == BusMessageType::KernelCatalogUpdate as i32).collect();
    assert_eq!(updates.len(), 2, "each forge announced its one compile");
}

/// A host that kills Redis when the forge announces its `at`-th update.
struct KillsRedisAt {
    catalog: Catalog,
    at: usize,
    seen: usize,
    redis_pid: u32,
}

impl Host for KillsRedisAt {
    fn enumerate(&mut self) -> tezzeret::Result<Option<Catalog>> {
        Ok(Some(self.catalog.clone()))
    }
    fn catalog_update(&mut self, _bytes: &[u8]) {
        self.seen += 1;
        if self.seen == self.at {
            // SAFETY: signalling the test's own redis-server by its PID.
            unsafe { libc::kill(self.redis_pid as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn redis_killed_and_restarted_mid_run_loses_no_catalog_update() {
    let mut redis = RedisServer::start_persistent();
    let state = TempDir::new("bus-outage");
    let ids = ["BP001", "BP002", "BP003", "BP005", "BP006"];
    let host = KillsRedisAt { catalog: tiny_catalog(&ids), at: 2, seen: 0, redis_pid: redis.pid() };
    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, None)), Box::new(host)).unwrap();
    let reports = service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    assert!(reports.iter().all(|r| r.status == tezzeret::forge::JobStatus::Ok), "compiling goes on while Redis is down");
    // The forge notices the outage (its publisher fails on the next add) and says so.
    wait_for("health to show the bus unreachable", || {
        let health = service.with(|f| Ok(f.health())).unwrap();
        health.indicators.get("bus").map(String::as_str) == Some("unreachable")
            && health.status == tezzeret::base::leyline::HealthStatus::Degraded as i32
    });
    assert!(service.with(|f| Ok(f.journal().state().outbox.len())).unwrap() >= 1, "unpublished updates wait in the outbox");
    redis.restart();
    let mut k = Kasmina::new(&redis, None);
    let ready = k.ready();
    let updates = k.wait_read(&ready, "every catalog update after the restart", |m| {
        let ids: BTreeSet<String> = m.iter().map(|m| leyline::decode::<KernelCatalogUpdate>(&m.envelope.payload).unwrap().blueprint_id).collect();
        ids.len() == 5
    });
    // A duplicate (published, but not yet recorded as published) carries the same id.
    let mut id_of: BTreeMap<String, String> = BTreeMap::new();
    for m in &updates {
        let blueprint = leyline::decode::<KernelCatalogUpdate>(&m.envelope.payload).unwrap().blueprint_id;
        let id = m.attribute("message_id").to_string();
        assert_eq!(id_of.entry(blueprint.clone()).or_insert_with(|| id.clone()), &id, "{blueprint} announced twice under different ids");
    }
    wait_for("the outbox to empty", || service.with(|f| Ok(f.journal().state().outbox.is_empty())).unwrap());
    service.close();
}

#[test]
fn a_forge_killed_between_commit_and_publish_publishes_after_reopen() {
    let redis = RedisServer::start();
    let dir = TempDir::new("bus-crash");
    let catalog = catalog_file(dir.path(), CHEAP);
    let state = dir.path().join("state");
    let forge = |failpoints: &str| {
        Command::new(env!("CARGO_BIN_EXE_tezzeret"))
            .args(["forge", "--strategy", "emergency", "--device", "cpu", "--jobs", "1", "--redis", &redis.url()])
            .arg("--state").arg(&state)
            .arg("--catalog").arg(&catalog)
            .env("TEZZERET_FAILPOINTS", failpoints)
            .output()
            .unwrap()
    };
    // The first publication attempt kills the process: its commit is durable, its announcement is not out.
    let crashed = forge("bus.publish=crash@1");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(crashed.status.signal(), Some(libc::SIGKILL), "{}", String::from_utf8_lossy(&crashed.stderr));
    let mut k = Kasmina::new(&redis, None);
    let ready = k.ready();
    assert!(k.read(&ready).is_empty(), "nothing was published before the crash");
    let (_, journal) = tezzeret::state::verify::read_journal(&state).unwrap();
    let committed: BTreeSet<String> = journal.artifacts.keys().cloned().collect();
    assert!(!committed.is_empty() && journal.outbox.len() == committed.len(), "each commit left its announcement in the outbox");

    let reopened = forge("");
    assert!(reopened.status.success(), "{}", String::from_utf8_lossy(&reopened.stderr));
    let updates = k.read(&ready);
    let announced: BTreeSet<String> = updates.iter().map(|m| leyline::decode::<KernelCatalogUpdate>(&m.envelope.payload).unwrap().blueprint_id).collect();
    assert_eq!(announced, CHEAP.iter().map(|s| s.to_string()).collect(), "every blueprint announced, the crashed one's after reopen");
    assert_eq!(updates.len(), CHEAP.len(), "and each once");
    let (_, journal) = tezzeret::state::verify::read_journal(&state).unwrap();
    assert!(journal.outbox.is_empty(), "the outbox is empty after a clean close");
}

#[test]
fn without_redis_the_forge_compiles_and_publishes_once_redis_is_there() {
    let dir = TempDir::new("bus-absent");
    let state = dir.path().join("state");
    let catalog = catalog_file(dir.path(), CHEAP);
    // A port nobody listens on (taken and released: refused, not hanging).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let forge = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_tezzeret"))
            .args(["forge", "--strategy", "emergency", "--device", "cpu", "--json", "--redis", url])
            .arg("--state").arg(&state)
            .arg("--catalog").arg(&catalog)
            .output()
            .unwrap()
    };
    let first = forge(&format!("redis://127.0.0.1:{port}/"));
    assert!(first.status.success(), "an unreachable bus fails nothing: {}", String::from_utf8_lossy(&first.stderr));
    let (_, journal) = tezzeret::state::verify::read_journal(&state).unwrap();
    assert_eq!(journal.outbox.len(), CHEAP.len());
    let redis = RedisServer::start();
    let second = forge(&redis.url());
    assert!(second.status.success());
    let mut k = Kasmina::new(&redis, None);
    let ready = k.ready();
    assert_eq!(k.read(&ready).len(), CHEAP.len());
    assert!(tezzeret::state::verify::read_journal(&state).unwrap().1.outbox.is_empty());
}

#[test]
fn an_update_superseded_while_the_bus_was_away_is_never_announced() {
    let dir = TempDir::new("bus-superseded");
    let state = dir.path().join("state");
    // The blueprint as first described, and as described later: with a
    // narrower parameter range (another default reduction, another block).
    let first = tiny_catalog(&["BP016"]);
    let mut narrower = first.get("BP016").unwrap().clone();
    narrower.allowed_parameters.get_mut("reduction").unwrap().min = 8.0;
    let later = Catalog::new(vec![narrower]).unwrap();
    let open = |catalog: &Catalog, bus: Option<BusConfig>| {
        let mut config = forge_config(&state, BusConfig::new("redis://127.0.0.1:1/"));
        config.bus = bus;
        ForgeService::open(config, Box::new(FixedCatalog(catalog.clone()))).unwrap()
    };
    // Compiled while its Redis is away: the update waits in the outbox.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let away = open(&first, Some(BusConfig::new(format!("redis://127.0.0.1:{port}/"))));
    let superseded = away.with(|f| f.compile_one("BP016")).unwrap().record.unwrap().checksum;
    away.close();
    assert_eq!(tezzeret::state::verify::read_journal(&state).unwrap().1.outbox.len(), 1);
    // Compiled again without a bus, as described later: a newer artifact.
    let without = open(&later, None);
    let current = without.with(|f| f.compile_one("BP016")).unwrap().record.unwrap().checksum;
    without.close();
    assert_ne!(superseded, current, "two different artifacts");
    // Back on the bus: the superseded update is never sent, and leaves.
    let redis = RedisServer::start();
    let mut k = Kasmina::new(&redis, None);
    let ready = k.ready();
    open(&later, Some(bus_config(&redis, None))).close();
    let sent: Vec<String> =
        k.read(&ready).iter().map(|m| leyline::decode::<KernelCatalogUpdate>(&m.envelope.payload).unwrap().checksum).collect();
    assert!(!sent.contains(&superseded), "{sent:?}");
    assert!(tezzeret::state::verify::read_journal(&state).unwrap().1.outbox.is_empty());
}

/// A bus config through the C ABI, its strings kept alive by the caller.
fn c_bus_config(url: &std::ffi::CString) -> tezzeret::ffi::tezzeret_bus_config {
    use tezzeret::ffi::*;
    // SAFETY: a plain C struct; init fills it.
    let mut bus: tezzeret_bus_config = unsafe { std::mem::zeroed() };
    super::cabi::ok(unsafe { tezzeret_bus_config_init(&mut bus, std::mem::size_of::<tezzeret_bus_config>()) });
    bus.redis_url = url.as_ptr();
    bus
}

#[test]
fn a_c_host_joins_the_bus_through_its_config() {
    use super::cabi::{host_callbacks, ok, open_forge, take};
    use std::ffi::CString;
    use tezzeret::ffi::*;
    let redis = RedisServer::start();
    let state = TempDir::new("bus-cabi");
    let url = CString::new(redis.url()).unwrap();
    let (group, secret) = (CString::new("c-hosts").unwrap(), SECRET);
    let mut bus = c_bus_config(&url);
    bus.group = group.as_ptr();
    bus.secret = secret.as_ptr();
    bus.secret_len = secret.len();
    let callbacks = host_callbacks(std::ptr::null_mut(), None, None, None, None);
    let forge = open_forge(state.path(), &callbacks, |c| c.bus = &bus);
    let id = CString::new("BP001").unwrap();
    // SAFETY: a live forge and a NUL-terminated id.
    ok(unsafe { tezzeret_forge_compile_now(forge, id.as_ptr()) });
    let mut k = Kasmina::new(&redis, Some(SECRET));
    wait_group(&mut k);
    k.request(&Kasmina::fresh("from-c", "BP001"));
    let answers = k.wait_answers("the answer", |a| !a.is_empty());
    assert_eq!((answers[0].0.as_str(), answers[0].1.kind(), answers[0].1.signed), ("from-c", BusMessageType::KernelPrefetchReady as i32, Some(true)));
    // SAFETY: the live handle, closed once.
    unsafe { tezzeret_forge_close(forge) };

    // Bad bus configurations are refused at open, naming the field.
    let open = |tune: &dyn Fn(&mut tezzeret_bus_config)| {
        let mut bus = c_bus_config(&url);
        tune(&mut bus);
        let path = CString::new(state.path().to_str().unwrap()).unwrap();
        // SAFETY: initialised structs whose pointers outlive the call.
        unsafe {
            let mut config: tezzeret_config = std::mem::zeroed();
            ok(tezzeret_config_init(&mut config, std::mem::size_of::<tezzeret_config>()));
            config.state_dir = path.as_ptr();
            config.bus = &bus;
            let mut out = std::ptr::null_mut();
            let status = tezzeret_forge_open(&config, std::ptr::null(), &mut out);
            assert!(out.is_null(), "no handle on failure");
            take(status)
        }
    };
    let bad_url = CString::new("http://127.0.0.1/").unwrap();
    let empty = CString::new("").unwrap();
    let cases: [(&dyn Fn(&mut tezzeret_bus_config), &str); 8] = [
        (&|b| b.redis_url = bad_url.as_ptr(), "redis_url"),
        (&|b| b.redis_url = std::ptr::null(), "config.bus.redis_url is NULL"),
        (&|b| b.flags = 0x80, "config.bus.flags has unknown bits 0x80"),
        (&|b| b.freshness_ms = 0, "config.bus.freshness_ms must be > 0"),
        (&|b| b.group = empty.as_ptr(), "group name is empty"),
        (&|b| b.struct_size = 8, "config.bus.struct_size is 8"),
        (&|b| b.secret_len = 4, "config.bus.secret is NULL but secret_len is 4"),
        (&|b| b.flags = TEZZERET_BUS_NO_PREFETCH | TEZZERET_BUS_NO_PUBLISH, "turn off both prefetch and publishing"),
    ];
    for (tune, expected) in cases {
        let (code, message) = open(tune);
        assert_ne!(code, TEZZERET_CODE_OK, "{expected}");
        assert!(message.contains(expected), "{message:?} should name {expected:?}");
    }

    // init: NULL and too small a struct are refused; an older, shorter
    // struct (up to redis_url) is filled without a byte written past it.
    // SAFETY: NULL, then buffers of the stated sizes.
    unsafe {
        assert_eq!(take(tezzeret_bus_config_init(std::ptr::null_mut(), std::mem::size_of::<tezzeret_bus_config>())).0, TEZZERET_CODE_NULL_ARGUMENT);
        let mut bytes = [0xa5u8; std::mem::size_of::<tezzeret_bus_config>()];
        let short = 2 * std::mem::size_of::<usize>();
        let (code, message) = take(tezzeret_bus_config_init(bytes.as_mut_ptr().cast(), short - 1));
        assert!(code == TEZZERET_CODE_INVALID_ARGUMENT && message.contains("smaller than the oldest"), "{message}");
        ok(tezzeret_bus_config_init(bytes.as_mut_ptr().cast(), short));
        assert!(bytes[short..].iter().all(|&b| b == 0xa5), "nothing written past the caller's size");
    }
}

#[test]
fn answers_and_packets_redis_refuses_are_retried_or_dropped_and_no_request_is_lost() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-refused");
    let mut k = Kasmina::new(&redis, None);
    // Keys of the wrong type: every add to them is refused by Redis.
    for key in ["oona.kernels.errors", "oona.telemetry"] {
        redis::cmd("SET").arg(key).arg("not a stream").query::<()>(&mut k.con).unwrap();
    }
    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, None)), Box::new(FixedCatalog(tiny_catalog(&["BP001"])))).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    // Catalog updates are not held back by refused telemetry.
    let ready = k.ready();
    k.wait_read(&ready, "the catalog update", |m| m.iter().any(|m| m.kind() == BusMessageType::KernelCatalogUpdate as i32));
    wait_for("refused telemetry to be counted", || metric(&service, "tezzeret.bus.publish_failures", ("", "")) >= 1.0);
    wait_group(&mut k);
    k.request(&Kasmina::fresh("refused-at-first", "BP999"));
    wait_for("the refused answer to be counted", || metric(&service, "tezzeret.bus.answer_failures", ("", "")) >= 1.0);
    let pending: redis::Value = redis::cmd("XPENDING").arg("oona.kernels.requests").arg("tezzeret").query(&mut k.con).unwrap();
    assert!(matches!(&pending, redis::Value::Array(v) if v.first() == Some(&redis::Value::Int(1))), "the request stays pending: {pending:?}");
    // Once its stream can take it, the request is taken up again and answered.
    redis::cmd("DEL").arg("oona.kernels.errors").query::<()>(&mut k.con).unwrap();
    let errors = k.wait_read("oona.kernels.errors", "the answer once Redis takes it", |m| !m.is_empty());
    let answer: KernelArtifactError = leyline::decode(&errors[0].envelope.payload).unwrap();
    assert_eq!((answer.request_id.as_str(), answer.reason.as_str()), ("refused-at-first", "missing_artifact"));
    service.close();
}

/// The blueprints whose catalog updates [`forge_on_a_redis_out_of_memory`] makes.
const REFUSED_IDS: [&str; 3] = ["BP001", "BP002", "BP003"];

/// A forge on `redis` (with `k` playing Kasmina) that compiled
/// [`REFUSED_IDS`] after Redis went over its memory limit, evicting
/// nothing: Redis refuses every write, so their catalog updates are refused.
fn forge_on_a_redis_out_of_memory(redis: &RedisServer, state: &std::path::Path, k: &mut Kasmina) -> ForgeService {
    let catalog = Box::new(FixedCatalog(tiny_catalog(&REFUSED_IDS)));
    let service = ForgeService::open(forge_config(state, bus_config(redis, None)), catalog).unwrap();
    wait_group(k);
    for (setting, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        redis::cmd("CONFIG").arg("SET").arg(setting).arg(value).query::<()>(&mut k.con).unwrap();
    }
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    service
}

#[test]
fn catalog_updates_redis_refuses_for_want_of_memory_wait_and_go_out_in_their_order() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-oom");
    let mut k = Kasmina::new(&redis, None);
    let ids = REFUSED_IDS;
    let service = forge_on_a_redis_out_of_memory(&redis, state.path(), &mut k);
    // Health says Redis refuses (it answers: the connection is kept).
    let bus_health = || {
        let health = service.with(|f| Ok(f.health())).unwrap();
        let indicator = |name: &str| health.indicators.get(name).cloned();
        (indicator("bus"), indicator("bus.last_error"), health.status)
    };
    wait_for("the refusal to show in health", || {
        let (state, error, status) = bus_health();
        state.as_deref() == Some("refusing") && error.is_some_and(|e| e.contains("OOM")) && status == tezzeret::base::leyline::HealthStatus::Degraded as i32
    });
    assert_eq!(metric(&service, "tezzeret.bus.link_failures", ("", "")), 0.0, "no connection was dropped");
    let ready = k.ready();
    assert!(k.read(&ready).is_empty(), "nothing was added");
    let waiting: Vec<(u64, String)> = service
        .with(|f| Ok(f.journal().state().outbox.values().map(|a| (a.seq, a.update.blueprint_id.clone())).collect()))
        .unwrap();
    assert_eq!(waiting.len(), ids.len(), "every refused update waits in the outbox: {waiting:?}");
    // Memory again: every update goes out once, in the order of the outbox.
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query::<()>(&mut k.con).unwrap();
    let updates = k.wait_read(&ready, "the updates once Redis has memory", |m| m.len() >= ids.len());
    let order: Vec<String> = updates.iter().map(|m| leyline::decode::<KernelCatalogUpdate>(&m.envelope.payload).unwrap().blueprint_id).collect();
    let expected: Vec<String> = waiting.into_iter().map(|(_, id)| id).collect();
    assert_eq!(order, expected);
    wait_for("the outbox to empty", || service.with(|f| Ok(f.journal().state().outbox.is_empty())).unwrap());
    let (state, error, _) = bus_health();
    assert_eq!((state.as_deref(), error), (Some("connected"), None), "health is clear once Redis took them");
    assert_eq!(metric(&service, "tezzeret.bus.link_failures", ("", "")), 0.0);
    service.close();
}

/// XADD commands Redis refused before running them (out of memory, say).
fn rejected_xadds(connection: &mut redis::Connection) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(connection).unwrap();
    let line = stats.lines().find(|l| l.starts_with("cmdstat_xadd:")).unwrap_or("");
    let field = line.split(',').find_map(|f| f.strip_prefix("rejected_calls="));
    field.map_or(0, |n| n.parse().unwrap())
}

#[test]
fn closing_while_redis_refuses_for_want_of_memory_leaves_the_updates_in_the_outbox_at_once() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-oom-close");
    let mut k = Kasmina::new(&redis, None);
    let ids = REFUSED_IDS;
    let service = forge_on_a_redis_out_of_memory(&redis, state.path(), &mut k);
    wait_for("a refused batch", || rejected_xadds(&mut k.con) >= ids.len() as u64);
    let before = rejected_xadds(&mut k.con);
    service.close();
    // At most the batch under way when it closed (its updates and some
    // telemetry), not a batch sent again and again until the close's
    // flush time is over.
    let during_close = rejected_xadds(&mut k.con) - before;
    assert!(during_close <= 64, "{during_close} XADDs sent while closing");
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query::<()>(&mut k.con).unwrap();
    let reopened = ForgeService::open(forge_config(state.path(), bus_config(&redis, None)), Box::new(FixedCatalog(tiny_catalog(&ids)))).unwrap();
    let ready = k.ready();
    let updates = k.wait_read(&ready, "the updates the outbox kept, at the next open", |m| m.len() >= ids.len());
    assert_eq!(updates.len(), ids.len());
    reopened.close();
}

#[test]
fn a_forge_that_does_not_publish_keeps_no_outbox() {
    let redis = RedisServer::start();
    let state = TempDir::new("bus-nopublish");
    let mut bus = bus_config(&redis, None);
    bus.publish = false;
    let service = ForgeService::open(forge_config(state.path(), bus), Box::new(FixedCatalog(tiny_catalog(&["BP001"])))).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    assert_eq!(service.with(|f| Ok(f.journal().state().outbox.len())).unwrap(), 0);
    service.close();
}

#[test]
fn requests_added_to_a_redis_that_lost_its_data_are_still_answered() {
    let mut redis = RedisServer::start();
    let state = TempDir::new("bus-lost");
    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, None)), Box::new(FixedCatalog(tiny_catalog(&["BP001"])))).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    let mut k = Kasmina::new(&redis, None);
    wait_group(&mut k);
    // Redis restarts empty: no stream, no group. A request comes before the
    // forge has reconnected; the group it creates again must still see it.
    redis.restart();
    let mut k = Kasmina::new(&redis, None);
    k.request(&Kasmina::fresh("after-restart", "BP001"));
    let answers = k.wait_answers("the request added before the forge reconnected", |a| !a.is_empty());
    assert_eq!(answers[0].0, "after-restart");
    service.close();
}

/// A host that keeps its log lines.
struct LoggingHost(Catalog, std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Host for LoggingHost {
    fn enumerate(&mut self) -> tezzeret::Result<Option<Catalog>> {
        Ok(Some(self.0.clone()))
    }
    fn log(&mut self, _level: tezzeret::forge::LogLevel, message: &str) {
        self.1.lock().unwrap().push(message.to_string());
    }
}

#[test]
fn the_first_request_dropped_for_each_reason_and_each_outage_are_logged_once() {
    let mut redis = RedisServer::start();
    let state = TempDir::new("bus-notes");
    let logs = std::sync::Arc::default();
    let mut k = Kasmina::new(&redis, Some(SECRET));
    let host = LoggingHost(tiny_catalog(&["BP001"]), std::sync::Arc::clone(&logs));
    let service = ForgeService::open(forge_config(state.path(), bus_config(&redis, Some(SECRET))), Box::new(host)).unwrap();
    service.with(|f| Ok(f.run(&mut |_| {}))).unwrap();
    wait_group(&mut k);
    for id in ["unsigned-1", "unsigned-2"] {
        k.add(&[("payload", &Kasmina::envelope(&Kasmina::fresh(id, "BP001")))]);
    }
    k.request(&Kasmina::fresh("last", "BP001"));
    k.wait_answers("the signed request's answer", |a| a.iter().any(|(id, _)| id == "last"));
    service.with(|f| f.record_published()).unwrap();
    let said = |needle: &str| logs.lock().unwrap().iter().filter(|l| l.contains(needle)).count();
    assert_eq!(said("bus: dropped a prefetch request unanswered (signature_missing)"), 1, "{:?}", logs.lock().unwrap());
    // Redis goes away, then comes back: each is said once.
    redis.kill();
    wait_for("the outage to be said", || {
        service.with(|f| f.record_published()).unwrap();
        said("bus: Redis cannot be reached") == 1
    });
    redis.restart();
    wait_for("the return to be said", || {
        service.with(|f| f.record_published()).unwrap();
        said("bus: Redis is reachable again") == 1
    });
    assert_eq!(said("bus: Redis cannot be reached"), 1, "{:?}", logs.lock().unwrap());
    service.close();
}
