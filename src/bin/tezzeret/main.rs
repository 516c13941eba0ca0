//! `tezzeret`: the operator CLI, built on the library's public API (the
//! same forge service the C ABI uses).
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use tezzeret::base::hex;
use tezzeret::base::leyline::{self, KernelCatalogUpdate};
use tezzeret::base::version::{ABI_MAJOR, ABI_MINOR, LIBRARY_VERSION, TORCH_VERSION};
use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile;
use tezzeret::forge::report;
use tezzeret::forge::{ForgeService, Host, JobReport, JobStatus, LogLevel, Progress};
use tezzeret::state::layout::StateLayout;
use tezzeret::state::signing::keygen;
use tezzeret::state::store::ArtifactStore;
use tezzeret::state::verify::{read_journal, verify_state_with_keys};
use tezzeret::state::wal::format::EntryType;
use tezzeret::state::wal::journal::Record;
use tezzeret::{Error, Result};

mod bench;
mod fetch;
mod fleet_status;
mod options;
mod serve;

/// The compilation forge of Esper: compiles blueprint descriptors into
/// guarded, signed TorchScript artifacts in a crash-safe state directory.
#[derive(Parser)]
#[command(name = "tezzeret", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a catalog into a state directory, resuming whatever it holds.
    Forge(ForgeArgs),
    /// Run as a long-lived service on the Oona bus: compile the catalog,
    /// keep it fresh, answer prefetch requests, publish catalog updates and
    /// telemetry; stop cleanly on SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Print the stored catalog of a state directory.
    Inspect {
        #[command(flatten)]
        state: StateArg,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Dump the write-ahead log's entries and the records they carry.
    Wal {
        #[command(flatten)]
        state: StateArg,
    },
    /// Re-check every artifact (file sha256, manifest, signature, guard slot);
    /// exits 1 naming each failure.
    Verify {
        #[command(flatten)]
        state: StateArg,
        /// Also verify manifest signatures against this public key (repeatable).
        #[arg(long = "trusted-key", value_name = "FILE")]
        trusted_keys: Vec<PathBuf>,
    },
    /// What the fleet's S3 bucket holds, verified: manifests, artifacts,
    /// leases (and, with --state, how much of a catalog it holds); exits 1
    /// when a manifest is refused.
    FleetStatus(fleet_status::FleetStatusArgs),
    /// Fetch an announced artifact by its s3:// reference, check its
    /// sha256 and write it durably (what a consumer on another host does).
    Fetch(fetch::FetchArgs),
    /// Create an ed25519 key pair: FILE (secret, mode 0600) and FILE.pub.
    Keygen {
        /// Where the secret key goes.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the benchmark table, every row measured side by side in one run.
    Bench {
        /// Only sections whose name contains this (compile, serve, forward, wal, runtime, bus, fleet, scale).
        #[arg(long, value_name = "SECTION")]
        only: Option<String>,
        /// One JSON array of rows instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the library, ABI and torch versions.
    Version,
}

#[derive(Args)]
struct StateArg {
    /// The state directory.
    #[arg(long = "state", value_name = "DIR")]
    dir: PathBuf,
}

#[derive(Args)]
struct ForgeArgs {
    #[command(flatten)]
    open: options::OpenArgs,
    #[command(flatten)]
    bus: options::BusArgs,
    #[command(flatten)]
    fleet: options::FleetArgs,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Machine-readable `event queued|compiling|announced …` lines on stderr.
    #[arg(long)]
    trace_events: bool,
}

fn main() -> ExitCode {
    // Behave like a Unix tool when the reader of stdout goes away (`| head`).
    // SAFETY: restoring the default disposition of SIGPIPE at start-up.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Usage errors exit 2 (clap's convention), --help and --version 0.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forge(args) => forge(args),
        Command::Serve(args) => serve::serve(args),
        Command::Inspect { state, json } => inspect(&state.dir, json),
        Command::Wal { state } => wal(&state.dir),
        Command::Verify { state, trusted_keys } => verify(&state.dir, &trusted_keys),
        Command::FleetStatus(args) => fleet_status::fleet_status(args),
        Command::Fetch(args) => fetch::fetch(args),
        Command::Keygen { out } => keygen_command(&out),
        Command::Bench { only, json } => bench_command(only.as_deref(), json),
        Command::Version => {
            println!("tezzeret {LIBRARY_VERSION} (ABI {ABI_MAJOR}.{ABI_MINOR}, torch {TORCH_VERSION})");
            Ok(true)
        }
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

/// The CLI's host: a fixed catalog; with `--trace-events`, catalog updates
/// are printed to stderr as `announced <id> <checksum>` lines; the forge's
/// log lines as `log` says.
struct CliHost {
    catalog: Option<Catalog>,
    trace: bool,
    log: CliLog,
}

/// What the CLI does with the forge's log lines.
enum CliLog {
    /// Info and above printed to stderr as they come (a long-running service).
    Printed,
    /// Warnings and errors kept, to be shown after the run's progress
    /// ([`KeptWarnings::show`]): why a fleet store or a job misbehaved.
    Kept(std::sync::Arc<std::sync::Mutex<KeptWarnings>>),
}

/// The first [`WARNINGS_SHOWN`] warnings of a run, and how many more came.
#[derive(Default)]
struct KeptWarnings {
    first: Vec<String>,
    more: usize,
}

impl KeptWarnings {
    fn keep(&mut self, line: String) {
        if self.first.len() < WARNINGS_SHOWN {
            self.first.push(line);
        } else {
            self.more += 1;
        }
    }

    /// Prints them to stderr, and how many more there were.
    fn show(&self) {
        for line in &self.first {
            eprintln!("tezzeret: {line}");
        }
        if self.more > 0 {
            eprintln!("tezzeret: … and {} more warnings", self.more);
        }
    }
}

impl Host for CliHost {
    fn log(&mut self, level: LogLevel, message: &str) {
        match &self.log {
            CliLog::Printed if level >= LogLevel::Info => eprintln!("tezzeret: {level:?}: {message}"),
            CliLog::Kept(kept) if level >= LogLevel::Warn => {
                kept.lock().unwrap_or_else(|p| p.into_inner()).keep(format!("{level:?}: {message}"));
            }
            _ => {}
        }
    }

    fn enumerate(&mut self) -> Result<Option<Catalog>> {
        Ok(self.catalog.take())
    }

    fn catalog_update(&mut self, bytes: &[u8]) {
        if self.trace {
            if let Ok(update) = leyline::decode::<KernelCatalogUpdate>(bytes) {
                trace_line(&format!("announced {} {}", update.blueprint_id, update.checksum));
            }
        }
    }
}

/// The most warnings a run shows; the rest are counted.
const WARNINGS_SHOWN: usize = 5;

/// One machine-readable event line on stderr, written at once.
fn trace_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "event {line}");
    let _ = err.flush();
}

fn forge(args: ForgeArgs) -> Result<bool> {
    let catalog = args.open.catalog()?;
    let mut config = args.open.config()?;
    config.bus = args.bus.config()?;
    config.fleet = args.fleet.config()?;
    // Nobody listens to periodic telemetry here: no background thread.
    config.telemetry_interval_ms = 0;
    let allow_quarantine = config.allow_quarantine;

    let started = Instant::now();
    let warnings: std::sync::Arc<std::sync::Mutex<KeptWarnings>> = std::sync::Arc::default();
    let host = CliHost { catalog, trace: args.trace_events, log: CliLog::Kept(std::sync::Arc::clone(&warnings)) };
    // Shown whatever the outcome: they say why a run failed, too.
    let show_warnings = || warnings.lock().unwrap_or_else(|p| p.into_inner()).show();
    let service = ForgeService::open(config, Box::new(host)).inspect_err(|_| show_warnings())?;
    let mut progress = ProgressView::new(args.trace_events);
    let reports = service.with(|forge| Ok(forge.run(&mut |event| progress.show(event))));
    progress.finish();
    show_warnings();
    let reports = reports?;
    let elapsed = started.elapsed();

    if args.json {
        let document = service.with(|forge| {
            let mut document = report::run_document(&reports, forge.store());
            if let Some(metrics) = forge.fleet_metrics() {
                document["fleet"] = fleet_status::metrics_document(&metrics, forge.unshared());
            }
            Ok(document)
        })?;
        println!("{}", serde_json::to_string_pretty(&document).expect("json"));
    } else {
        print_table(&reports);
        if let Some(metrics) = service.with(|forge| Ok(forge.fleet_metrics().map(|m| (m, forge.unshared()))))? {
            println!("{}", fleet_status::metrics_line(&metrics.0, metrics.1));
        }
        let count = |s: JobStatus| reports.iter().filter(|r| r.status == s).count();
        let (strategy, device) = service.with(|forge| Ok((forge.config().strategy, compile::device_name(forge.device()))))?;
        println!(
            "{} ok, {} cached, {} failed, {} refused in {:.2} s ({strategy} on {device})",
            count(JobStatus::Ok),
            count(JobStatus::Cached),
            count(JobStatus::Failed),
            count(JobStatus::Refused),
            elapsed.as_secs_f64(),
        );
    }
    service.close();
    // Refusals are "as asked" only while quarantine compilation is off.
    Ok(reports.iter().all(|r| match r.status {
        JobStatus::Ok | JobStatus::Cached => true,
        JobStatus::Refused => !allow_quarantine,
        JobStatus::Failed => false,
    }))
}

fn existing_state(dir: &Path) -> Result<StateLayout> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!("state directory {} does not exist", dir.display())));
    }
    Ok(StateLayout::new(dir))
}

fn inspect(dir: &Path, json: bool) -> Result<bool> {
    let layout = existing_state(dir)?;
    let store = ArtifactStore::open_existing(&layout)?;
    let (_, journal) = read_journal(dir)?;
    if json {
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

fn wal(dir: &Path) -> Result<bool> {
    existing_state(dir)?;
    let (recovery, journal) = read_journal(dir)?;
    println!("{:>10} {:>8} {:>6} {:>6} {:<7} {:<16} {:>8}  {}", "OFFSET", "SEQ", "EPOCH", "BATCH", "TYPE", "TXID", "BYTES", "RECORD");
    let mut payloads = recovery.transactions.iter().flat_map(|t| t.records.iter());
    for e in &recovery.entries {
        let h = &e.header;
        let record = if h.entry_type == EntryType::Data {
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
            hex::encode(&h.txid[..8]),
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
    let short = |key: &str| key[..16.min(key.len())].to_string();
    match serde_json::from_slice::<Record>(payload) {
        Ok(Record::Enqueue { job }) => {
            format!("enqueue #{} {} ({}, priority {})", job.seq, job.blueprint_id, job.strategy, job.priority as i32)
        }
        Ok(Record::Start { seq }) => format!("start #{seq}"),
        Ok(Record::Commit { seq, artifact }) => format!("commit #{seq} {} {}", artifact.blueprint_id, short(&artifact.checksum)),
        Ok(Record::Fail { seq, reason, .. }) => format!("fail #{seq} {reason}"),
        Ok(Record::Reprioritize { seq, priority }) => format!("reprioritize #{seq} priority {}", priority as i32),
        Ok(Record::Expire { seq, reason }) => format!("expire #{seq} {reason}"),
        Ok(Record::Evict { blueprint_id, cache_key }) => format!("evict {} {}", blueprint_id.unwrap_or_default(), short(&cache_key)),
        Ok(Record::Announce { announcement: a }) => {
            format!("announce {} {} ({})", a.update.blueprint_id, short(&a.update.checksum), a.message_id)
        }
        Ok(Record::Published { seqs }) => format!("published {} catalog updates", seqs.len()),
        Ok(Record::Checkpoint { state }) => format!(
            "checkpoint: {} artifacts, {} jobs queued, {} unpublished, next #{}",
            state.artifacts.len(),
            state.pending.len(),
            state.outbox.len(),
            state.next_seq
        ),
        Ok(Record::Shared { artifacts, root }) => {
            format!("shared {} artifacts with the fleet at {}", artifacts.len(), root.as_deref().unwrap_or("(not recorded)"))
        }
        Ok(Record::CheckpointPart { jobs, artifacts, announcements, shared }) => format!(
            "checkpoint part: {} jobs, {} artifacts, {} unpublished, {} shared",
            jobs.len(),
            artifacts.len(),
            announcements.len(),
            shared.len()
        ),
        Err(e) => format!("(unreadable record: {e})"),
    }
}

fn verify(dir: &Path, trusted: &[PathBuf]) -> Result<bool> {
    existing_state(dir)?;
    let keys = options::keys(None, trusted)?;
    let verification = verify_state_with_keys(dir, &keys)?;
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

fn bench_command(only: Option<&str>, json: bool) -> Result<bool> {
    if let Some(served) = bench::serve_fleet_host_if_asked() {
        return served.map(|()| true);
    }
    let work = std::env::temp_dir().join(format!("tezzeret-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(format!("create {}", work.display()), e))?;
    let rows = bench::run(&work, only, &mut |section| eprintln!("measuring {section}…"));
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

fn keygen_command(out: &Path) -> Result<bool> {
    let public = keygen(out)?;
    println!("secret key: {} (keep it private)\npublic key: {}.pub {}", out.display(), out.display(), hex::encode(&public));
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
    bar: Option<ProgressBar>,
    trace: bool,
    /// Jobs finished so far (a fleet member starts its queue part-way
    /// through, so a job's queue position says nothing of progress).
    finished: usize,
}

impl ProgressView {
    fn new(trace: bool) -> Self {
        let bar = (std::io::stderr().is_terminal() && !trace).then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template("[{bar:30}] {pos:>3}/{len} {msg}").expect("a valid template");
            bar.set_style(style.progress_chars("#>."));
            bar
        });
        ProgressView { bar, trace, finished: 0 }
    }

    fn show(&mut self, event: Progress<'_>) {
        if self.trace {
            match &event {
                Progress::Queued(jobs) => jobs.iter().for_each(|(id, seq)| trace_line(&format!("queued {id} {seq}"))),
                Progress::Compiling(id, key) => trace_line(&format!("compiling {id} {key}")),
                _ => {}
            }
        }
        match (&self.bar, event) {
            (Some(bar), Progress::Started(_, total, id)) => {
                bar.set_length(total as u64);
                bar.set_message(id.to_string());
            }
            (Some(bar), Progress::Finished(..)) => {
                self.finished += 1;
                bar.set_position(self.finished as u64);
            }
            (None, Progress::Finished(_, total, report)) => {
                self.finished += 1;
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "[{:>3}/{}] {} {}", self.finished, total, report.blueprint_id, report.status.name());
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
