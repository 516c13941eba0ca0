//! `tezzeret`: the operator CLI (SPEC §13), built on the library's public API.
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use tezzeret::catalog::Catalog;
use tezzeret::compile::Strategy;
use tezzeret::forge::{DevicePreference, Forge, ForgeConfig, Host, JobReport, JobStatus, Progress};
use tezzeret::signing::{read_key_file, KeyRing};
use tezzeret::store::ArtifactStore;
use tezzeret::{report, Error, Result};

const USAGE: &str = "\
usage:
  tezzeret forge --state DIR [--catalog FILE.json|default] [--strategy emergency|fast|standard|aggressive]
                 [--jobs N] [--device auto|cpu|cuda] [--batch N] [--budget SECONDS]
                 [--memory-budget MIB] [--signing-key FILE] [--trusted-key FILE]...
                 [--allow-quarantine] [--json] [--trace-events]
  tezzeret inspect --state DIR [--json]
  tezzeret wal --state DIR
  tezzeret verify --state DIR [--trusted-key FILE]...
  tezzeret keygen --out FILE
  tezzeret bench [--only compile|serve|forward|wal|runtime] [--json]
  tezzeret version
";

fn main() -> ExitCode {
    // Behave like a Unix tool when the reader of stdout goes away (`| head`).
    // SAFETY: restoring the default disposition of SIGPIPE at start-up.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("forge") => forge(&args[1..]),
        Some("inspect") => inspect(&args[1..]),
        Some("wal") => wal(&args[1..]),
        Some("verify") => verify(&args[1..]),
        Some("keygen") => keygen(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("version") | Some("--version") => {
            println!(
                "tezzeret {} (ABI {}.{}, torch {})",
                tezzeret::version::LIBRARY_VERSION,
                tezzeret::version::ABI_MAJOR,
                tezzeret::version::ABI_MINOR,
                tezzeret::version::TORCH_VERSION
            );
            Ok(true)
        }
        Some("help") | Some("--help") | Some("-h") => {
            print!("{USAGE}");
            Ok(true)
        }
        Some(other) => Err(Error::invalid(format!("unknown command {other:?}\n{USAGE}"))),
        None => Err(Error::invalid(format!("missing command\n{USAGE}"))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tezzeret: {e}");
            ExitCode::from(2)
        }
    }
}

/// Minimal `--flag value` / `--switch` parsing with clear errors.
struct Args<'a> {
    rest: &'a [String],
}

impl<'a> Args<'a> {
    fn parse(args: &'a [String], switches: &[&str], options: &[&str]) -> Result<Vec<(&'a str, Option<&'a str>)>> {
        let mut parsed = Vec::new();
        let mut it = Args { rest: args };
        while let Some((head, tail)) = it.rest.split_first() {
            it.rest = tail;
            let name = head.as_str();
            if switches.contains(&name) {
                parsed.push((name, None));
            } else if options.contains(&name) {
                let (value, tail) =
                    it.rest.split_first().ok_or_else(|| Error::invalid(format!("{name} needs a value\n{USAGE}")))?;
                it.rest = tail;
                parsed.push((name, Some(value.as_str())));
            } else {
                return Err(Error::invalid(format!("unknown argument {name:?}\n{USAGE}")));
            }
        }
        Ok(parsed)
    }
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| Error::invalid(format!("{flag} expects a number, got {value:?}")))
}

/// The CLI's host: a fixed catalog; with `--trace-events`, catalog updates
/// are printed to stderr as `announced <id> <checksum>` lines.
struct CliHost {
    catalog: Option<Catalog>,
    trace: bool,
}

impl Host for CliHost {
    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(self.catalog.take())
    }

    fn catalog_update(&mut self, bytes: &[u8]) {
        if self.trace {
            if let Ok(update) = tezzeret::leyline::decode::<tezzeret::leyline::KernelCatalogUpdate>(bytes) {
                trace_line(&format!("announced {} {}", update.blueprint_id, update.checksum));
            }
        }
    }
}

/// One machine-readable event line on stderr, written at once.
fn trace_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "event {line}");
    let _ = err.flush();
}

fn forge(args: &[String]) -> Result<bool> {
    let parsed = Args::parse(
        args,
        &["--allow-quarantine", "--json", "--trace-events"],
        &[
            "--state",
            "--catalog",
            "--strategy",
            "--jobs",
            "--device",
            "--batch",
            "--budget",
            "--memory-budget",
            "--signing-key",
            "--trusted-key",
        ],
    )?;
    let mut state = None;
    let mut catalog = None;
    let mut json = false;
    let mut trace = false;
    let mut signing = None;
    let mut trusted = Vec::new();
    let mut config = ForgeConfig::new("");
    for (flag, value) in parsed {
        let value = value.unwrap_or_default();
        match flag {
            "--state" => state = Some(PathBuf::from(value)),
            "--catalog" if value == "default" => catalog = None,
            "--catalog" => {
                let text = std::fs::read_to_string(value).map_err(|e| Error::io(format!("read catalog {value}"), e))?;
                catalog = Some(Catalog::from_json(&text).map_err(|e| e.context(format!("catalog {value}")))?);
            }
            "--strategy" => config.strategy = value.parse::<Strategy>()?,
            "--jobs" => config.max_concurrency = number("--jobs", value)?,
            "--batch" => config.batch = number("--batch", value)?,
            "--budget" => {
                let seconds: f64 = number("--budget", value)?;
                if !(seconds.is_finite() && seconds > 0.0) {
                    return Err(Error::invalid(format!("--budget expects a positive number of seconds, got {value:?}")));
                }
                config.budgets = [std::time::Duration::from_secs_f64(seconds); 4];
            }
            "--memory-budget" => {
                let mib: u64 = number("--memory-budget", value)?;
                config.memory_budget_bytes = Some(mib << 20);
            }
            "--device" => {
                config.device = match value {
                    "auto" => DevicePreference::Auto,
                    "cpu" => DevicePreference::Cpu,
                    "cuda" => DevicePreference::Cuda,
                    _ => return Err(Error::invalid(format!("--device expects auto, cpu or cuda, got {value:?}"))),
                }
            }
            "--allow-quarantine" => config.allow_quarantine = true,
            "--json" => json = true,
            "--trace-events" => trace = true,
            "--signing-key" => signing = Some(read_key_file(std::path::Path::new(value))?),
            "--trusted-key" => trusted.push(read_key_file(std::path::Path::new(value))?),
            _ => unreachable!("parser only yields known flags"),
        }
    }
    config.state_dir = state.ok_or_else(|| Error::invalid(format!("forge needs --state DIR\n{USAGE}")))?;
    config.keys = KeyRing::new(signing, &trusted)?;
    let allow_quarantine = config.allow_quarantine;

    let started = Instant::now();
    let mut forge = Forge::open(config, Box::new(CliHost { catalog, trace }))?;
    let mut progress = ProgressView::new(trace);
    let reports = forge.run(&mut |event| progress.show(event));
    progress.finish();
    let elapsed = started.elapsed();

    if json {
        println!("{}", serde_json::to_string_pretty(&report::run_document(&reports, forge.store())).expect("json"));
    } else {
        print_table(&reports);
        let count = |s: JobStatus| reports.iter().filter(|r| r.status == s).count();
        println!(
            "{} ok, {} cached, {} failed, {} refused in {:.2} s ({} on {})",
            count(JobStatus::Ok),
            count(JobStatus::Cached),
            count(JobStatus::Failed),
            count(JobStatus::Refused),
            elapsed.as_secs_f64(),
            forge.config().strategy,
            tezzeret::compile::device_name(forge.device()),
        );
    }
    // Refusals are "as asked" only while quarantine compilation is off.
    Ok(reports.iter().all(|r| match r.status {
        JobStatus::Ok | JobStatus::Cached => true,
        JobStatus::Refused => !allow_quarantine,
        JobStatus::Failed => false,
    }))
}

fn state_arg(args: &[String], switches: &[&str], command: &str) -> Result<(PathBuf, Vec<String>)> {
    let parsed = Args::parse(args, switches, &["--state"])?;
    let state = parsed.iter().find(|(f, _)| *f == "--state").and_then(|(_, v)| *v);
    let state = state.ok_or_else(|| Error::invalid(format!("{command} needs --state DIR\n{USAGE}")))?;
    if !std::path::Path::new(state).is_dir() {
        return Err(Error::invalid(format!("state directory {state} does not exist")));
    }
    let flags = parsed.iter().filter(|(_, v)| v.is_none()).map(|(f, _)| f.to_string()).collect();
    Ok((PathBuf::from(state), flags))
}

fn inspect(args: &[String]) -> Result<bool> {
    let (state, flags) = state_arg(args, &["--json"], "inspect")?;
    let store = ArtifactStore::open_existing(&state)?;
    let (_, journal) = tezzeret::verify::read_journal(&state)?;
    if flags.iter().any(|f| f == "--json") {
        println!("{}", serde_json::to_string_pretty(&report::stored_document(&journal.artifacts, &store)).expect("json"));
        return Ok(true);
    }
    println!("{:<7} {:<24} {:<10} {:<8} {:>10} {:>9} {:>9}  {}", "ID", "NAME", "STRATEGY", "DEVICE", "COMPILE ms", "P50 ms", "P95 ms", "CHECKSUM");
    for r in journal.artifacts.values() {
        println!(
            "{:<7} {:<24} {:<10} {:<8} {:>10.1} {:>9.3} {:>9.3}  {}",
            r.blueprint_id, r.name, r.strategy, r.device, r.compile_ms, r.prewarm_p50_ms, r.prewarm_p95_ms, &r.checksum[..16]
        );
    }
    println!("{} stored artifacts, {} jobs queued", journal.artifacts.len(), journal.pending.len());
    Ok(true)
}

fn wal(args: &[String]) -> Result<bool> {
    let (state, _) = state_arg(args, &[], "wal")?;
    let (recovery, journal) = tezzeret::verify::read_journal(&state)?;
    println!("{:>10} {:>8} {:>6} {:>6} {:<7} {:<16} {:>8}  {}", "OFFSET", "SEQ", "EPOCH", "BATCH", "TYPE", "TXID", "BYTES", "RECORD");
    let mut payloads = recovery.transactions.iter().flat_map(|t| t.records.iter());
    for e in &recovery.entries {
        let h = &e.header;
        let record = if h.entry_type == tezzeret::wal::format::EntryType::Data {
            payloads.next().map(|p| describe_record(p)).unwrap_or_else(|| "(uncommitted)".into())
        } else {
            String::new()
        };
        println!(
            "{:>10} {:>8} {:>6} {:>6} {:<7} {:<16} {:>8}  {}",
            e.offset,
            h.sequence,
            h.epoch,
            h.batch,
            h.entry_type.name(),
            tezzeret::guard::hex(&h.txid[..8]),
            h.payload_size,
            record
        );
    }
    println!(
        "{} entries, {} committed transactions, {} incomplete, {} bytes; {} artifacts current, {} jobs queued",
        recovery.entries.len(),
        recovery.transactions.len(),
        recovery.incomplete,
        recovery.end,
        journal.artifacts.len(),
        journal.pending.len()
    );
    if let Some(reason) = &recovery.torn_reason {
        println!("torn tail of {} bytes would be dropped at the next open: {reason}", recovery.torn_bytes);
    }
    Ok(true)
}

/// One line about a journal record.
fn describe_record(payload: &[u8]) -> String {
    use tezzeret::wal::Record;
    match serde_json::from_slice::<Record>(payload) {
        Ok(Record::Enqueue { job }) => format!("enqueue #{} {} ({}, priority {})", job.seq, job.blueprint_id, job.strategy, job.priority),
        Ok(Record::Start { seq }) => format!("start #{seq}"),
        Ok(Record::Commit { seq, artifact }) => format!("commit #{seq} {} {}", artifact.blueprint_id, &artifact.checksum[..16]),
        Ok(Record::Fail { seq, reason, .. }) => format!("fail #{seq} {reason}"),
        Ok(Record::Reprioritize { seq, priority }) => format!("reprioritize #{seq} priority {priority}"),
        Ok(Record::Expire { seq, reason }) => format!("expire #{seq} {reason}"),
        Ok(Record::Evict { blueprint_id, cache_key }) => format!("evict {} {}", blueprint_id.unwrap_or_default(), &cache_key[..16.min(cache_key.len())]),
        Ok(Record::Checkpoint { state }) => {
            format!("checkpoint: {} artifacts, {} jobs queued, next #{}", state.artifacts.len(), state.pending.len(), state.next_seq)
        }
        Err(e) => format!("(unreadable record: {e})"),
    }
}

fn verify(args: &[String]) -> Result<bool> {
    let parsed = Args::parse(args, &[], &["--state", "--trusted-key"])?;
    let (state, _) = state_arg(&strip_option(args, "--trusted-key"), &[], "verify")?;
    let trusted = parsed
        .iter()
        .filter(|(f, _)| *f == "--trusted-key")
        .map(|(_, v)| read_key_file(std::path::Path::new(v.unwrap_or_default())))
        .collect::<Result<Vec<_>>>()?;
    let keys = KeyRing::new(None, &trusted)?;
    let verification = tezzeret::verify::verify_state_with_keys(&state, &keys)?;
    for problem in &verification.problems {
        println!("FAIL {problem}");
    }
    println!(
        "{} artifacts checked{}, {} problems",
        verification.checked,
        if keys.verifies() { " (signatures included)" } else { "" },
        verification.problems.len()
    );
    Ok(verification.problems.is_empty())
}

/// `args` without every `option VALUE` pair.
fn strip_option(args: &[String], option: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == option {
            skip = true;
        } else {
            out.push(a.clone());
        }
    }
    out
}

fn bench(args: &[String]) -> Result<bool> {
    let parsed = Args::parse(args, &["--json"], &["--only"])?;
    let json = parsed.iter().any(|(f, _)| *f == "--json");
    let only = parsed.iter().find(|(f, _)| *f == "--only").and_then(|(_, v)| *v);
    let work = std::env::temp_dir().join(format!("tezzeret-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(format!("create {}", work.display()), e))?;
    let rows = tezzeret::bench::run(&work, only, &mut |section| eprintln!("measuring {section}…"));
    let _ = std::fs::remove_dir_all(&work);
    let rows = rows?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
    } else {
        println!("| what | ours | reference | unit |\n| --- | ---: | ---: | --- |");
        for r in &rows {
            println!("| {} | {:.2} | {} | {} |", r.name, r.ours, r.reference.as_deref().unwrap_or("—"), r.unit);
        }
    }
    Ok(true)
}

fn keygen(args: &[String]) -> Result<bool> {
    let parsed = Args::parse(args, &[], &["--out"])?;
    let out = parsed.first().and_then(|(_, v)| *v).ok_or_else(|| Error::invalid(format!("keygen needs --out FILE\n{USAGE}")))?;
    let public = tezzeret::signing::keygen(std::path::Path::new(out))?;
    println!("secret key: {out} (keep it private)\npublic key: {out}.pub {}", tezzeret::guard::hex(&public));
    Ok(true)
}

fn print_table(reports: &[JobReport]) {
    println!(
        "{:<7} {:<24} {:<8} {:<28} {:>10} {:>9} {:>9}  {}",
        "ID", "NAME", "STATUS", "VARIANT", "COMPILE ms", "P50 ms", "P95 ms", "CHECKSUM / ERROR"
    );
    for r in reports {
        let detail = match (&r.record, &r.error) {
            (_, Some(e)) => e.to_string(),
            (Some(rec), None) => rec.checksum[..16].to_string(),
            (None, None) => String::new(),
        };
        let (variant, compile, p50, p95) = match &r.record {
            Some(rec) => (
                rec.variant.as_str(),
                format!("{:.1}", rec.compile_ms),
                format!("{:.3}", rec.prewarm_p50_ms),
                format!("{:.3}", rec.prewarm_p95_ms),
            ),
            None => ("-", "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<7} {:<24} {:<8} {:<28} {:>10} {:>9} {:>9}  {}",
            r.blueprint_id,
            r.name,
            r.status.name(),
            variant,
            compile,
            p50,
            p95,
            detail
        );
    }
}

/// Progress on stderr: a bar on a terminal, plain lines otherwise; with
/// `--trace-events` also `event queued|compiling …` lines for tooling.
struct ProgressView {
    terminal: bool,
    trace: bool,
}

impl ProgressView {
    fn new(trace: bool) -> Self {
        ProgressView { terminal: std::io::stderr().is_terminal() && !trace, trace }
    }

    fn show(&mut self, event: Progress<'_>) {
        if self.trace {
            match &event {
                Progress::Queued(jobs) => jobs.iter().for_each(|(id, seq)| trace_line(&format!("queued {id} {seq}"))),
                Progress::Compiling(id, key) => trace_line(&format!("compiling {id} {key}")),
                _ => {}
            }
        }
        let mut err = std::io::stderr().lock();
        match event {
            Progress::Queued(..) | Progress::Compiling(..) => {}
            Progress::Started(i, total, id) if self.terminal => {
                let width = 30;
                let filled = i * width / total.max(1);
                let _ = write!(err, "\r[{}{}] {:>3}/{} {:<8}", "#".repeat(filled), ".".repeat(width - filled), i, total, id);
                let _ = err.flush();
            }
            Progress::Started(..) => {}
            Progress::Finished(i, total, report) if !self.terminal => {
                let _ = writeln!(err, "[{:>3}/{}] {} {}", i + 1, total, report.blueprint_id, report.status.name());
            }
            Progress::Finished(..) => {}
        }
    }

    fn finish(&mut self) {
        if self.terminal {
            eprintln!("\r{:<60}", "");
        }
    }
}
