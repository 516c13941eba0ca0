//! Fleet hosts as processes of their own, as real hosts are: the bench
//! starts `tezzeret bench` again with a host's description in
//! [`HOST_ENV`]; the child warms libtorch up (one compile, as a running
//! training process has done long before its forge opens), says `ready`,
//! waits for `go` on its stdin, opens its forge on its own state
//! directory, runs the catalog and answers with its run as one JSON line.
//! The parent releases every host of a round at once and times the round
//! from `go` to the last answer.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::fleet::{open_and_run, Run};
use super::runtime::compilable;
use super::seaweed_server::SeaweedServer;
use tezzeret::base::hex;
use tezzeret::build::compile::{self, CompileJob, JobLimits, Strategy};
use tezzeret::fleet::FleetConfig;
use tezzeret::state::signing::KeyRing;
use tezzeret::{Error, Result};

/// The environment variable that makes `tezzeret bench` a fleet host (its
/// value: a [`HostSpec`] in JSON).
pub const HOST_ENV: &str = "TEZZERET_BENCH_FLEET_HOST";

/// What a host process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostSpec {
    /// Its state directory (recreated).
    pub state: PathBuf,
    /// Its fleet, if any: None runs the catalog alone.
    pub fleet: Option<FleetSpec>,
    /// The signing seed, hex.
    pub seed: String,
    /// The trusted public key, hex.
    pub public: String,
}

/// The fleet of a host process (the bench's SeaweedFS, with its keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSpec {
    /// The store's endpoint URL.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// The prefix inside it.
    pub prefix: String,
    /// The Redis keeping the leases, if any.
    pub lease_redis: Option<String>,
}

impl FleetSpec {
    fn config(&self) -> FleetConfig {
        let mut config = SeaweedServer::fleet_config_at(&self.bucket, &self.endpoint);
        config.prefix = self.prefix.clone();
        config.lease_redis = self.lease_redis.clone();
        config
    }
}

/// What a host process answers: its run's wall time (open → last job) and
/// how many jobs it compiled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostRun {
    seconds: f64,
    compiled: usize,
}

/// Runs as a fleet host when [`HOST_ENV`] says so (`None` otherwise).
pub fn serve_if_asked() -> Option<Result<()>> {
    let spec = std::env::var(HOST_ENV).ok()?;
    Some(serde_json::from_str::<HostSpec>(&spec).map_err(|e| Error::invalid(format!("{HOST_ENV}: {e}"))).and_then(serve))
}

fn serve(spec: HostSpec) -> Result<()> {
    let keys = KeyRing::new(Some(hex::decode_array(&spec.seed, "seed")?), &[hex::decode_array(&spec.public, "public key")?])?;
    // Warm, as a training process is: libtorch loaded and used once.
    let mut warm_up = CompileJob::new(compilable()[0].clone(), Strategy::Standard);
    warm_up.device = tch::Device::Cpu;
    compile::compile(&warm_up, &mut JobLimits::new(None))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").and_then(|_| out.flush()).map_err(|e| Error::io("say ready", e))?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| Error::io("wait for go", e))?;
    let Run { seconds, compiled, .. } = open_and_run(&spec.state, &keys, spec.fleet.as_ref().map(FleetSpec::config))?;
    let answer = serde_json::to_string(&HostRun { seconds, compiled }).expect("serialises");
    writeln!(out, "{answer}").and_then(|_| out.flush()).map_err(|e| Error::io("answer", e))
}

/// Host processes started and ready, waiting for `go` (killed if dropped
/// before they answered).
pub struct Hosts {
    children: Vec<(Child, BufReader<ChildStdout>)>,
}

impl Hosts {
    /// Starts one process per spec and waits until each is ready.
    pub fn start(specs: &[HostSpec]) -> Result<Hosts> {
        let exe = std::env::current_exe().map_err(|e| Error::io("find the bench's executable", e))?;
        let mut hosts = Hosts { children: Vec::with_capacity(specs.len()) };
        for spec in specs {
            let mut child = Command::new(&exe)
                .args(["bench", "--only", "fleet"])
                .env(HOST_ENV, serde_json::to_string(spec).expect("serialises"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| Error::io("start a fleet host process", e))?;
            let stdout = BufReader::new(child.stdout.take().expect("piped"));
            hosts.children.push((child, stdout));
        }
        for (_, stdout) in &mut hosts.children {
            if read_line(stdout)?.trim() != "ready" {
                return Err(Error::invalid("a fleet host process did not get ready"));
            }
        }
        Ok(hosts)
    }

    /// Releases every host at once; the wall time until the last answered,
    /// s, and how many jobs they compiled in total.
    pub fn go(mut self) -> Result<(f64, usize)> {
        let started = Instant::now();
        for (child, _) in &mut self.children {
            let stdin = child.stdin.as_mut().expect("piped");
            stdin.write_all(b"go\n").and_then(|_| stdin.flush()).map_err(|e| Error::io("release a fleet host", e))?;
        }
        let mut compiled = 0;
        for (_, stdout) in &mut self.children {
            let line = read_line(stdout)?;
            let run: HostRun = serde_json::from_str(&line).map_err(|_| Error::invalid(format!("a fleet host process failed: {line:?}")))?;
            compiled += run.compiled;
        }
        let seconds = started.elapsed().as_secs_f64();
        for (child, _) in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
        Ok((seconds, compiled))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_line(stdout: &mut BufReader<ChildStdout>) -> Result<String> {
    let mut line = String::new();
    stdout.read_line(&mut line).map_err(|e| Error::io("read a fleet host's answer", e))?;
    Ok(line)
}

/// The spec of a host on `state`, in `fleet` (or alone), with the keys.
pub fn spec(state: &Path, fleet: Option<FleetSpec>, seed: &[u8; 32], public: &[u8; 32]) -> HostSpec {
    HostSpec { state: state.to_path_buf(), fleet, seed: hex::encode(seed), public: hex::encode(public) }
}
