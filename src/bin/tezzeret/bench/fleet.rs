//! Fleet rows, on one real SeaweedFS started for the run: a new host
//! joining a warm bucket (open → every artifact fetched, verified and
//! durable) against compiling them, and three hosts on a cold bucket
//! (without member indices, given indices 0 to 2, and with their leases
//! on a real Redis) against one host compiling everything alone and
//! against three hosts each given a third with no bucket — alternating
//! rounds, each measured side by side. The hosts are forges in this
//! process, except in the rounds of host processes (leases on Redis),
//! where each host, and the host alone, is a process of its own; and a
//! consumer without a forge fetching the warm bucket's artifacts one by
//! one by their references. Beside
//! their wall times: their CPU, their requests, and how many of the
//! machine's cores were busy (a round keeping every core busy is bound by
//! CPU: its wall is its CPU over the cores).
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::host_process::{self, FleetSpec, Hosts};
use super::redis_server::RedisServer;
use super::runtime::compilable;
use super::seaweed_server::SeaweedServer;
use super::{row, Row};
use tezzeret::build::catalog::Catalog;
use tezzeret::fleet::objects::ObjectNames;
use tezzeret::fleet::remote::RemoteStore;
use tezzeret::fleet::{fetch_artifact, FleetConfig};
use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, JobStatus};
use tezzeret::state::signing::{generate_keypair, KeyRing};
use tezzeret::{Error, Result};

/// Alternating rounds of each comparison (the median is shown: a shared
/// machine's noise moves single rounds by a third).
const ROUNDS: usize = 5;

struct Fixed(Catalog);

impl tezzeret::forge::Host for Fixed {
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(Some(self.0.clone()))
    }
}

/// What one forge's run took.
pub(super) struct Run {
    /// Wall time from open to the last job's end, s.
    pub seconds: f64,
    /// Jobs it compiled.
    pub compiled: usize,
    /// Requests it made to the fleet's store.
    pub requests: u64,
    /// Commands it sent to the Redis keeping the leases, if any.
    pub redis_requests: u64,
}

/// Opens a forge on a fresh state directory and runs its catalog.
pub(super) fn open_and_run(state: &Path, keys: &KeyRing, fleet: Option<FleetConfig>) -> Result<Run> {
    open_and_run_share(state, keys, fleet, (0, 1))
}

/// The same for the `share.0`-th of `share.1` equal shares of the catalog
/// (every `share.1`-th blueprint).
fn open_and_run_share(state: &Path, keys: &KeyRing, fleet: Option<FleetConfig>, share: (usize, usize)) -> Result<Run> {
    let _ = std::fs::remove_dir_all(state);
    let mut config = ForgeConfig::new(state);
    config.device = DevicePreference::Cpu;
    config.telemetry_interval_ms = 0;
    config.keys = keys.clone();
    config.fleet = fleet;
    let (nth, of) = share;
    let catalog = Catalog::new(compilable().into_iter().skip(nth).step_by(of).collect())?;
    let expected = catalog.len();
    let started = Instant::now();
    let mut forge = Forge::open(config, Box::new(Fixed(catalog)))?;
    let reports = forge.run(&mut |_| {});
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(error) = reports.iter().find_map(|r| r.error.clone()) {
        return Err(error.context("fleet bench run"));
    }
    let ready = reports.iter().filter(|r| matches!(r.status, JobStatus::Ok | JobStatus::Cached)).count();
    if ready != expected {
        return Err(Error::invalid(format!("fleet bench run: {ready} of {expected} ready")));
    }
    let compiled = reports.iter().filter(|r| r.status == JobStatus::Ok).count();
    let metrics = forge.fleet().map(|f| f.metrics()).unwrap_or_default();
    Ok(Run { seconds: elapsed, compiled, requests: metrics.requests, redis_requests: metrics.redis_requests })
}

/// Runs three hosts at once, each on its own thread (`host` gives the
/// index, 0 to 2, to `run`); their runs, and the wall time until the last
/// ended, s.
fn three_hosts(run: impl Fn(usize) -> Result<Run> + Send + Sync + Clone + 'static) -> Result<(Vec<Run>, f64)> {
    let started = Instant::now();
    let hosts: Vec<_> = (0..3)
        .map(|host| {
            let run = run.clone();
            std::thread::spawn(move || run(host))
        })
        .collect();
    let runs = hosts
        .into_iter()
        .map(|host| host.join().map_err(|_| Error::invalid("a fleet bench host panicked"))?)
        .collect::<Result<Vec<Run>>>()?;
    Ok((runs, started.elapsed().as_secs_f64()))
}

/// Three hosts on a cold bucket (a fresh prefix in `config`), each on its
/// own state directory under `dir`, given member indices 0 to 2 when
/// `indexed`; their runs and the wall time until the last ended, s.
fn three_on_cold_bucket(dir: PathBuf, keys: &KeyRing, config: FleetConfig, indexed: bool) -> Result<(Vec<Run>, f64)> {
    let keys = keys.clone();
    three_hosts(move |host| {
        let config = FleetConfig { member_index: indexed.then_some(host as u32), ..config.clone() };
        open_and_run(&dir.join(host.to_string()), &keys, Some(config))
    })
}

/// A consumer with no forge fetching every artifact of the bucket under
/// `config`'s prefix, one call per reference (each its own connection):
/// the median over [`ROUNDS`] rounds of the time per artifact, s.
fn consumer_fetches(config: &FleetConfig, dir: &Path) -> Result<f64> {
    let names = ObjectNames::new(&config.bucket, &config.prefix);
    let store = RemoteStore::connect(config)?;
    let listed = store.run(store.list(&names.artifacts()))?;
    let references: Vec<String> = listed
        .iter()
        .filter_map(|object| object.name.rsplit('/').next()?.strip_suffix(".pt").map(|sha| names.artifact_url(sha)))
        .collect();
    if references.is_empty() {
        return Err(Error::invalid("the warm bucket holds no artifact to fetch"));
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut per_artifact = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for (i, reference) in references.iter().enumerate() {
            fetch_artifact(config, reference, None, &dir.join(format!("{i}.pt")))?;
        }
        per_artifact.push(started.elapsed().as_secs_f64() / references.len() as f64);
    }
    Ok(median(per_artifact))
}

/// CPU time (user + system) a process has used so far, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / per_second
}

/// The whole machine's CPU time so far, in clock ticks: (busy, all). Busy
/// is user, nice, system and interrupt time; all adds idle, I/O wait and
/// time stolen by the hypervisor.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return (0, 0) };
    let line = stat.lines().next().unwrap_or("");
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|t| t.parse().unwrap_or(0)).collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    (busy, busy + at(3) + at(4) + at(7))
}

/// How many cores were busy on average between two [`machine_ticks`]
/// readings (NaN when none could be read).
fn busy_cores(before: (u64, u64), after: (u64, u64), cores: usize) -> f64 {
    let (busy, all) = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
    if all == 0 {
        return f64::NAN;
    }
    cores as f64 * busy as f64 / all as f64
}

/// The median (NaN when nothing was measured).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The lowest and highest of the ratios of paired rounds (`a[i] / b[i]`),
/// for a row to show how far single rounds spread around its median.
fn spread(a: &[f64], b: &[f64]) -> (f64, f64) {
    a.iter().zip(b).map(|(x, y)| x / y).fold((f64::NAN, f64::NAN), |(lo, hi), r| (lo.min(r), hi.max(r)))
}

/// The fleet rows, or one row saying why they could not run.
pub fn rows(work: &Path) -> Result<Vec<Row>> {
    let server = match SeaweedServer::try_start("bench") {
        Ok(server) => server,
        Err(why) => return Ok(vec![row(format!("fleet: not measured ({why})"), f64::NAN, None, "")]),
    };
    let (seed, public) = generate_keypair()?;
    let keys = KeyRing::new(Some(seed), &[public])?;
    let fleet = |prefix: String| {
        let mut config = server.fleet_config();
        config.prefix = prefix;
        config
    };
    let n = compilable().len();
    // A warm bucket, then new hosts joining it against hosts compiling alone.
    open_and_run(&work.join("fleet-seed"), &keys, Some(fleet("warm".into())))?;
    let (mut joins, mut compiles) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let joined = open_and_run(&work.join(format!("fleet-join-{round}")), &keys, Some(fleet("warm".into())))?;
        if joined.compiled != 0 {
            return Err(Error::invalid(format!("a host joining a warm bucket compiled {} jobs", joined.compiled)));
        }
        joins.push(joined.seconds);
        compiles.push(open_and_run(&work.join(format!("fleet-alone-{round}")), &keys, None)?.seconds);
    }
    let (join, alone) = (median(joins), median(compiles));
    let per_reference = consumer_fetches(&fleet("warm".into()), &work.join("consumer"))?;

    // Three hosts on a cold bucket (a fresh prefix each round) against one
    // host alone, without a fleet and as a fleet of one (it publishes all).
    let (mut fleets, mut singles, mut total_compiles) = (Vec::new(), Vec::new(), Vec::new());
    let (mut splits, mut split_cpu, mut indexed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lone_members, mut fleet_requests, mut lone_requests) = (Vec::new(), Vec::new(), Vec::new());
    let (mut store_cpu, mut fleet_cpu, mut single_cpu) = (Vec::new(), Vec::new(), Vec::new());
    // How busy the whole machine kept its cores during each round.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut fleet_busy, mut single_busy) = (Vec::new(), Vec::new());
    // Leases on a Redis (as a fleet on the bus would keep them), when one starts.
    let redis = RedisServer::try_start(false);
    let (mut on_redis, mut on_redis_requests, mut on_redis_commands) = (Vec::new(), Vec::new(), Vec::new());
    let (mut on_redis_cpu, mut on_redis_store_cpu) = (Vec::new(), Vec::new());
    let mut on_redis_busy = Vec::new();
    let me = std::process::id();
    for round in 0..ROUNDS {
        let (w0, m0, t0) = (cpu_seconds(server.pid()), cpu_seconds(me), machine_ticks());
        let (runs, seconds) = three_on_cold_bucket(work.join(format!("fleet-cold-{round}")), &keys, fleet(format!("cold-{round}")), false)?;
        let t1 = machine_ticks();
        fleet_busy.push(busy_cores(t0, t1, cores));
        let (compiled, requests) = (runs.iter().map(|r| r.compiled).sum::<usize>(), runs.iter().map(|r| r.requests).sum::<u64>());
        fleets.push(seconds);
        let (w1, m1) = (cpu_seconds(server.pid()), cpu_seconds(me));
        total_compiles.push(compiled as f64);
        fleet_requests.push(requests as f64);
        singles.push(open_and_run(&work.join(format!("fleet-single-{round}")), &keys, None)?.seconds);
        single_busy.push(busy_cores(t1, machine_ticks(), cores));
        store_cpu.push(w1 - w0);
        fleet_cpu.push(m1 - m0);
        single_cpu.push(cpu_seconds(me) - m1);
        let lone = open_and_run(&work.join(format!("fleet-lone-{round}")), &keys, Some(fleet(format!("lone-{round}"))))?;
        lone_members.push(lone.seconds);
        lone_requests.push(lone.requests as f64);
        // The same three hosts, each given a third to compile and no
        // bucket: what the round costs with nothing to coordinate.
        let (split_dir, keys_of_round) = (work.join(format!("fleet-split-{round}")), keys.clone());
        let m0 = cpu_seconds(me);
        let (_, seconds) = three_hosts(move |host| open_and_run_share(&split_dir.join(host.to_string()), &keys_of_round, None, (host, 3)))?;
        splits.push(seconds);
        split_cpu.push(cpu_seconds(me) - m0);
        // The three on a cold bucket again, each given its member index.
        let (runs, seconds) =
            three_on_cold_bucket(work.join(format!("fleet-indexed-{round}")), &keys, fleet(format!("indexed-{round}")), true)?;
        indexed.push(seconds);
        total_compiles.push(runs.iter().map(|r| r.compiled).sum::<usize>() as f64);
        // The three on a cold bucket again, their leases on Redis.
        if let Ok(redis) = &redis {
            let config = FleetConfig { lease_redis: Some(redis.url()), ..fleet(format!("redis-{round}")) };
            let servers = || cpu_seconds(server.pid()) + cpu_seconds(redis.pid());
            let (s0, m0, t0) = (servers(), cpu_seconds(me), machine_ticks());
            let (runs, seconds) = three_on_cold_bucket(work.join(format!("fleet-redis-{round}")), &keys, config, false)?;
            let (s1, m1) = (servers(), cpu_seconds(me));
            on_redis_busy.push(busy_cores(t0, machine_ticks(), cores));
            on_redis_cpu.push(s1 - s0 + m1 - m0);
            on_redis_store_cpu.push(s1 - s0);
            on_redis.push(seconds);
            on_redis_requests.push(runs.iter().map(|r| r.requests).sum::<u64>() as f64);
            on_redis_commands.push(runs.iter().map(|r| r.redis_requests).sum::<u64>() as f64);
            total_compiles.push(runs.iter().map(|r| r.compiled).sum::<usize>() as f64);
        }
    }
    // The three with their leases on Redis again, as processes of their
    // own (real hosts share no libtorch, allocator or runtime), against one
    // host alone in a process of its own.
    let (mut processes, mut processes_alone) = (Vec::new(), Vec::new());
    if let Ok(redis) = &redis {
        for round in 0..ROUNDS {
            let fleet = FleetSpec {
                endpoint: server.endpoint(),
                bucket: server.bucket.clone(),
                prefix: format!("processes-{round}"),
                lease_redis: Some(redis.url()),
            };
            let state = |name: String| work.join(format!("fleet-{name}-{round}"));
            let hosts: Vec<_> =
                (0..3).map(|host| host_process::spec(&state(format!("process-{host}")), Some(fleet.clone()), &seed, &public)).collect();
            let (seconds, compiled) = Hosts::start(&hosts)?.go()?;
            processes.push(seconds);
            total_compiles.push(compiled as f64);
            let (seconds, _) = Hosts::start(&[host_process::spec(&state("process-alone".into()), None, &seed, &public)])?.go()?;
            processes_alone.push(seconds);
        }
    }
    let lone = median(lone_members);
    // Each round's three hosts against that round's host alone.
    let (three_spread, on_redis_spread) = (spread(&fleets, &singles), spread(&on_redis, &singles));
    let processes_spread = spread(&processes, &processes_alone);
    let on_redis = median(on_redis);
    let (on_redis_cpu, on_redis_store_cpu) = (median(on_redis_cpu), median(on_redis_store_cpu));
    let (processes, processes_alone) = (median(processes), median(processes_alone));
    let (three, single, split, indexed) = (median(fleets), median(singles), median(splits), median(indexed));

    let (store_cpu, fleet_cpu, single_cpu) = (median(store_cpu), median(fleet_cpu), median(single_cpu));
    // A round's wall floor: its CPU spread over every core.
    let floor = |cpu: f64| cpu / cores as f64;
    let most_compiles = total_compiles.iter().copied().fold(0.0, f64::max);
    Ok(vec![
        row(
            format!("fleet: new host joins a warm bucket, open → {n} artifacts fetched, verified, durable"),
            join * 1e3,
            Some(format!("compiling them here: {:.0} ms (goal ≤ 300 ms)", alone * 1e3)),
            "ms",
        ),
        row(
            "fleet: a consumer without a forge fetches one artifact by its s3:// reference (checked, durable)",
            per_reference * 1e3,
            Some(format!("a joining host, per artifact: {:.2} ms", join * 1e3 / n as f64)),
            "ms",
        ),
        row(
            "fleet: three hosts on a cold bucket, open → all ready (wall)",
            three * 1e3,
            Some(format!(
                "one host alone: {:.0} ms; ratio {:.2}× (goal ≤ 1.2×; single rounds {:.2}–{:.2}×)",
                single * 1e3,
                three / single,
                three_spread.0,
                three_spread.1
            )),
            "ms",
        ),
        row(
            "fleet: three hosts on a cold bucket given member indices 0-2 (wall)",
            indexed * 1e3,
            Some(format!("ratio to one host alone {:.2}×; / three without indices: {:.2}×", indexed / single, indexed / three)),
            "ms",
        ),
        match &redis {
            Ok(_) => row(
                "fleet: three hosts on a cold bucket, leases on Redis (wall)",
                on_redis * 1e3,
                Some(format!(
                    "ratio to one host alone {:.2}× (goal ≤ 1.2×; single rounds {:.2}–{:.2}×); {:.0} store requests and {:.0} Redis commands",
                    on_redis / single,
                    on_redis_spread.0,
                    on_redis_spread.1,
                    median(on_redis_requests),
                    median(on_redis_commands)
                )),
                "ms",
            ),
            Err(why) => row(format!("fleet: three hosts, leases on Redis: not measured ({why})"), f64::NAN, None, ""),
        },
        row(
            "fleet: CPU of the three hosts' round with leases on Redis, forges + the servers",
            on_redis_cpu * 1e3,
            Some(format!(
                "store and Redis servers {:.0} ms of it; one host alone {:.0} ms; wall floor on {cores} cores: {:.0} ms ({:.2}× one host alone's wall); cores busy: {:.2}",
                on_redis_store_cpu * 1e3,
                single_cpu * 1e3,
                floor(on_redis_cpu) * 1e3,
                floor(on_redis_cpu) / single,
                median(on_redis_busy)
            )),
            "ms",
        ),
        match &redis {
            Ok(_) => {
                let (three, alone, (lowest, highest)) = (processes, processes_alone, processes_spread);
                row(
                    "fleet: three hosts as processes of their own on a cold bucket, leases on Redis (wall)",
                    three * 1e3,
                    Some(format!(
                        "one host alone in a process of its own: {:.0} ms; ratio {:.2}× (goal ≤ 1.2×; single rounds {lowest:.2}–{highest:.2}×)",
                        alone * 1e3,
                        three / alone
                    )),
                    "ms",
                )
            }
            Err(why) => row(format!("fleet: three host processes, leases on Redis: not measured ({why})"), f64::NAN, None, ""),
        },
        row(
            "fleet: one host alone on a cold bucket, a fleet of one (compiles and publishes all)",
            lone * 1e3,
            Some(format!("three hosts / this: {:.2}×", three / lone)),
            "ms",
        ),
        row(
            "fleet: three hosts each given a third to compile, no bucket (nothing to coordinate)",
            split * 1e3,
            Some(format!("three hosts sharing a bucket / this: {:.2}×; / one host alone: {:.2}×", three / split, split / single)),
            "ms",
        ),
        row(format!("fleet: compiles in total by the three hosts, most of any round (of {n})"), most_compiles, Some(format!("{n} expected")), "jobs"),
        row(
            "fleet: store requests of the three hosts' round",
            median(fleet_requests),
            Some(format!("a fleet of one: {:.0}", median(lone_requests))),
            "requests",
        ),
        row(
            "fleet: CPU of the three hosts' round, forges + the store server on these cores",
            (fleet_cpu + store_cpu) * 1e3,
            Some(format!(
                "store server {:.0} ms of it; one host alone {:.0} ms; three given a third, no bucket {:.0} ms; the round's wall floor on {cores} cores: {:.0} ms ({:.2}× one host alone's wall)",
                store_cpu * 1e3,
                single_cpu * 1e3,
                median(split_cpu) * 1e3,
                floor(fleet_cpu + store_cpu) * 1e3,
                floor(fleet_cpu + store_cpu) / single
            )),
            "ms",
        ),
        row(
            "fleet: cores busy during the three hosts' round on a cold bucket (whole machine, mean)",
            median(fleet_busy),
            Some(format!(
                "one host alone: {:.2} of {cores}; a round keeping every core busy takes its CPU time over {cores} cores",
                median(single_busy)
            )),
            "cores",
        ),
    ])
}
