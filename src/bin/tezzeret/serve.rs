//! `tezzeret serve`: the forge as a standalone service on the Oona bus,
//! for deployments that do not embed it. It compiles the catalog, keeps it
//! fresh, answers prefetch requests and publishes catalog updates and
//! telemetry until SIGTERM or SIGINT; then it abandons a running compile
//! (queued jobs stay queued), publishes what is queued and exits 0.
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;

use super::options::{parse_seconds, BusArgs, FleetArgs, OpenArgs};
use super::{trace_line, CliHost, CliLog};
use tezzeret::forge::ForgeService;
use tezzeret::{Error, Result};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    fleet: FleetArgs,
    /// Re-enumerate and compile what changed every this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    refresh: Duration,
    /// Publish a telemetry packet every this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    telemetry: Duration,
    /// Machine-readable `event …` lines on stderr (`event serving` once the
    /// first compile pass is done).
    #[arg(long)]
    trace_events: bool,
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts
/// later) and returns a receiver that gets the signal number once one
/// comes; a second one ends the process at once (exit status 130).
fn termination_signals() -> Result<std::sync::mpsc::Receiver<i32>> {
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the mask change affects this thread only.
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        return Err(Error::io("block SIGTERM and SIGINT", std::io::Error::from_raw_os_error(blocked)));
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tezzeret-signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: set holds the blocked signals; sigwait stores one in signal.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                let _ = sender.send(signal);
            }
            // SAFETY: as above.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                eprintln!("tezzeret: second signal {signal}: exiting without a clean shutdown");
                std::process::exit(130);
            }
        })
        .map_err(|e| Error::io("start the signal thread", e))?;
    Ok(receiver)
}

pub fn serve(args: ServeArgs) -> Result<bool> {
    let mut config = args.open.config()?;
    config.bus = Some(args.bus.config()?.ok_or_else(|| Error::invalid("serve needs --redis URL"))?);
    config.fleet = args.fleet.config()?;
    config.refresh_interval_ms = args.refresh.as_millis().max(1) as u64;
    config.telemetry_interval_ms = args.telemetry.as_millis().max(1) as u64;
    let catalog = args.open.catalog()?;
    let signals = termination_signals()?;
    let host = CliHost { catalog, trace: args.trace_events, log: CliLog::Printed };
    let service = ForgeService::open(config, Box::new(host))?;
    let shutdown = service.with(|forge| Ok(forge.shutdown_flag()))?;
    // A signal during the first pass abandons its running compile.
    let watcher = std::thread::spawn(move || {
        let signal = signals.recv().ok();
        shutdown.store(true, Ordering::Release);
        signal
    });
    let reports = service.with(|forge| Ok(forge.run(&mut |_| {})))?;
    let count = |status| reports.iter().filter(|r| r.status == status).count();
    use tezzeret::forge::JobStatus::{Cached, Failed, Ok as Compiled, Refused};
    eprintln!(
        "tezzeret: serving: first pass: {} compiled, {} already stored or fetched, {} refused (quarantine-only), {} failed",
        count(Compiled),
        count(Cached),
        count(Refused),
        count(Failed)
    );
    if args.trace_events {
        trace_line("serving");
    }
    let signal = watcher.join().ok().flatten();
    eprintln!("tezzeret: signal {} received, shutting down", signal.unwrap_or(0));
    service.close();
    Ok(true)
}
