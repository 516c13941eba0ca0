//! Bus rows, on one real Redis started for the run: the prefetch round
//! trip over Redis Streams as a Kasmina client sees it, sustained answers
//! per second with one forge, and the compile queue's overhead with the
//! bus on against off (alternating rounds).
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use redis::Value;

use super::redis_server::RedisServer;
use super::runtime::{compilable, forge_on_bus, queue_overhead};
use super::{row, Row};
use tezzeret::base::leyline::{self, BusEnvelope, BusMessageType, KernelPrefetchRequest, Timestamp};
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::percentile;
use tezzeret::bus::link::read_reply_entries;
use tezzeret::bus::{BusConfig, StreamNames};
use tezzeret::{Error, Result};

/// Round trips timed.
const ROUND_TRIPS: usize = 2_000;
/// Requests in the throughput run.
const BURST: usize = 20_000;
/// Alternating rounds of the overhead comparison.
const OVERHEAD_ROUNDS: usize = 3;

fn redis_error(e: redis::RedisError) -> Error {
    Error::invalid(format!("bench redis: {e}"))
}

fn request_entry(i: usize) -> Vec<u8> {
    let request = KernelPrefetchRequest {
        request_id: format!("bench-{i}"),
        blueprint_id: "BP001".into(),
        training_run_id: "bench".into(),
        issued_at: Some(Timestamp::now()),
    };
    leyline::encode(&BusEnvelope {
        message_type: BusMessageType::KernelPrefetchRequest as i32,
        payload: leyline::encode(&request),
        attributes: BTreeMap::new(),
    })
}

/// The bus rows, or one row saying why they could not run.
pub fn rows(work: &Path) -> Result<Vec<Row>> {
    let redis = match RedisServer::try_start(false) {
        Ok(redis) => redis,
        Err(why) => return Ok(vec![row(format!("bus: not measured ({why})"), f64::NAN, None, "")]),
    };
    let streams = StreamNames::default();
    let catalog = Catalog::new(compilable().into_iter().filter(|d| d.blueprint_id == "BP001").collect())?;
    let mut forge = forge_on_bus(&work.join("bus-serve"), catalog, 1, true, Some(BusConfig::new(redis.url())))?;
    forge.run(&mut |_| {});
    let mut con = redis::Client::open(redis.url().as_str()).and_then(|c| c.get_connection()).map_err(redis_error)?;
    // The reader creates its group on connecting: wait for it.
    let started = Instant::now();
    while redis::cmd("XINFO").arg("GROUPS").arg(&streams.requests).query::<Value>(&mut con).map_or(true, |v| v == Value::Array(vec![])) {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(Error::invalid("bench: the forge's consumer group never appeared"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    // Round trips, one at a time: add a request, block on the ready stream
    // for its answer (read after the newest entry there before the request:
    // `$` would miss an answer that comes before the read starts).
    let newest: Value = redis::cmd("XREVRANGE").arg(&streams.ready).arg("+").arg("-").arg("COUNT").arg(1).query(&mut con).map_err(redis_error)?;
    let mut last = tezzeret::bus::link::entries(&newest).first().map_or_else(|| "0-0".to_string(), |e| e.id.clone());
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + ROUND_TRIPS / 10 {
        let payload = request_entry(i);
        let t = Instant::now();
        redis::cmd("XADD").arg(&streams.requests).arg("*").arg("payload").arg(&payload).query::<String>(&mut con).map_err(redis_error)?;
        let reply: Value = redis::cmd("XREAD").arg("BLOCK").arg(5_000).arg("STREAMS").arg(&streams.ready).arg(&last).query(&mut con).map_err(redis_error)?;
        let entries = read_reply_entries(&reply);
        let answer = entries.last().ok_or_else(|| Error::invalid("bench: no prefetch answer within 5 s"))?;
        last = answer.id.clone();
        if i >= ROUND_TRIPS / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let esper = "Esper prototype path on this machine: p50 103, p95 104 (100 ms block + 100 ms sleep per poll)";
    let mut rows = vec![
        row("prefetch round trip over Redis Streams p50 (request added → answer read, loopback)", percentile(&samples, 50.0).unwrap_or(f64::NAN), Some(format!("goal < 1; {esper}")), "ms"),
        row("prefetch round trip over Redis Streams p99", percentile(&samples, 99.0).unwrap_or(f64::NAN), None, "ms"),
    ];

    // Sustained answers: a burst of requests pipelined in, until every answer is out.
    let before: u64 = redis::cmd("XLEN").arg(&streams.ready).query(&mut con).map_err(redis_error)?;
    let t = Instant::now();
    for chunk in (0..BURST).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD").arg(&streams.requests).arg("*").arg("payload").arg(request_entry(ROUND_TRIPS * 2 + i));
        }
        pipe.query::<Vec<String>>(&mut con).map_err(redis_error)?;
    }
    loop {
        let len: u64 = redis::cmd("XLEN").arg(&streams.ready).query(&mut con).map_err(redis_error)?;
        if len >= before + BURST as u64 {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(Error::invalid(format!("bench: only {} of {BURST} answers after 300 s", len - before)));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let rate = BURST as f64 / t.elapsed().as_secs_f64();
    rows.push(row(format!("sustained prefetch answers per second, one forge ({BURST} requests pipelined in)"), rate, Some("goal ≥ 10000".into()), "1/s"));
    drop(forge);

    // The compile queue with the bus on (publishing updates and telemetry) against off.
    let catalog = Catalog::new(compilable())?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..OVERHEAD_ROUNDS {
        off.push(queue_overhead(&work.join(format!("bus-off-{round}")), &catalog, None)?);
        let mut bus = BusConfig::new(redis.url());
        bus.serve_prefetch = false;
        on.push(queue_overhead(&work.join(format!("bus-on-{round}")), &catalog, Some(bus))?);
    }
    let median = |v: &mut Vec<(f64, f64)>| {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let ((off_pct, off_ms), (on_pct, on_ms)) = (median(&mut off), median(&mut on));
    rows.push(row(
        format!("forge's own overhead per job in the queue with the bus publishing ({} jobs; median of {OVERHEAD_ROUNDS})", catalog.len()),
        on_pct,
        Some(format!("goal < 5; bus off {off_pct:.2} %; {on_ms:.2} vs {off_ms:.2} ms per job")),
        "%",
    ));
    Ok(rows)
}
