//! Command-line options shared by `forge` and `serve`: how a forge is
//! opened, how it joins the Oona bus, and how it shares artifacts with its
//! fleet through an S3-compatible bucket.
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use tezzeret::build::catalog::Catalog;
use tezzeret::build::compile::Strategy;
use tezzeret::bus::{BusConfig, SECRET_VARIABLE};
use tezzeret::fleet::FleetConfig;
use tezzeret::forge::{DevicePreference, ForgeConfig};
use tezzeret::state::signing::{read_key_file, KeyRing};
use tezzeret::{Error, Result};

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

/// How the forge is opened.
#[derive(Args)]
pub struct OpenArgs {
    /// The state directory (created if missing).
    #[arg(long = "state", value_name = "DIR")]
    pub state: PathBuf,
    /// A catalog file in the format of data/karn-default-catalog.json, or `default`.
    #[arg(long, value_name = "FILE.json|default", default_value = "default")]
    pub catalog: String,
    /// Compilation strategy: emergency, fast, standard or aggressive.
    #[arg(long, value_name = "STRATEGY", default_value = "standard", value_parser = parse_strategy)]
    pub strategy: Strategy,
    /// Jobs compiling at once.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: u32,
    /// Where artifacts run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Batch size of the representative inputs.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(i64).range(1..))]
    pub batch: i64,
    /// Time budget of every job, seconds (default: the strategy's).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub budget: Option<Duration>,
    /// Largest process-memory growth of one job, MiB (default 1024).
    #[arg(long = "memory-budget", value_name = "MIB")]
    pub memory_budget: Option<u64>,
    /// Sign artifacts with this secret key.
    #[arg(long = "signing-key", value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// Trust this public key (repeatable): artifacts are verified before use.
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,
    /// Compile quarantine-only (HIGH_RISK) blueprints instead of refusing them.
    #[arg(long)]
    pub allow_quarantine: bool,
    /// Checkpoint the WAL every N journal transactions (default 4096).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
}

impl OpenArgs {
    /// The catalog to compile (`None`: the embedded default).
    pub fn catalog(&self) -> Result<Option<Catalog>> {
        match self.catalog.as_str() {
            "default" => Ok(None),
            file => {
                let text = std::fs::read_to_string(file).map_err(|e| Error::io(format!("read catalog {file}"), e))?;
                Ok(Some(Catalog::from_json(&text).map_err(|e| e.context(format!("catalog {file}")))?))
            }
        }
    }

    /// The forge configuration these options describe.
    pub fn config(&self) -> Result<ForgeConfig> {
        let mut config = ForgeConfig::new(&self.state);
        config.strategy = self.strategy;
        config.max_concurrency = self.jobs;
        config.batch = self.batch;
        config.device = match self.device {
            DeviceArg::Auto => DevicePreference::Auto,
            DeviceArg::Cpu => DevicePreference::Cpu,
            DeviceArg::Cuda => DevicePreference::Cuda,
        };
        if let Some(budget) = self.budget {
            config.budgets = [budget; 4];
        }
        if let Some(mib) = self.memory_budget {
            config.memory_budget_bytes = Some(mib << 20);
        }
        config.allow_quarantine = self.allow_quarantine;
        if let Some(n) = self.checkpoint_every {
            config.checkpoint_every = n;
        }
        config.keys = keys(self.signing_key.as_deref(), &self.trusted_keys)?;
        Ok(config)
    }
}

/// How the forge joins the Oona bus (Redis Streams).
#[derive(Args)]
pub struct BusArgs {
    /// Redis URL of the bus, e.g. redis://127.0.0.1:6379 (off without it).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Consumer group sharing the prefetch requests.
    #[arg(long, value_name = "NAME", default_value = "tezzeret")]
    pub group: String,
    /// This process's consumer name (default tezzeret-<host>-<pid>).
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
    /// Environment variable holding the shared secret entries are signed
    /// with (default ESPER_LEYLINE_SECRET; unset: entries go unsigned, and
    /// a warning says so). A variable named here must be set.
    #[arg(long = "secret-env", value_name = "VAR")]
    pub secret_env: Option<String>,
    /// Requests issued longer ago than this are dropped as stale, seconds.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub freshness: Duration,
    /// Entries older than this are trimmed from the streams written, seconds.
    #[arg(long = "message-ttl", value_name = "SECONDS", default_value = "900", value_parser = parse_seconds)]
    pub message_ttl: Duration,
    /// Pending requests of a consumer idle this long are taken over, seconds.
    #[arg(long = "claim-idle", value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub claim_idle: Duration,
    /// Prefix of every stream name instead of `oona` (e.g. for a test bus).
    #[arg(long = "stream-prefix", value_name = "PREFIX", default_value = "oona")]
    pub stream_prefix: String,
    /// Do not answer prefetch requests (publish only).
    #[arg(long)]
    pub no_prefetch: bool,
}

impl BusArgs {
    /// The bus configuration, or `None` without `--redis`.
    pub fn config(&self) -> Result<Option<BusConfig>> {
        let Some(url) = &self.redis else { return Ok(None) };
        let mut config = BusConfig::new(url);
        config.group = self.group.clone();
        if let Some(consumer) = &self.consumer {
            config.consumer = consumer.clone();
        }
        let variable = self.secret_env.as_deref().unwrap_or(SECRET_VARIABLE);
        config.secret = std::env::var_os(variable).filter(|v| !v.is_empty()).map(|v| v.into_encoded_bytes());
        match (&config.secret, &self.secret_env) {
            (None, Some(named)) => return Err(Error::invalid(format!("--secret-env {named}: the variable is unset or empty"))),
            (None, None) => eprintln!("tezzeret: warning: bus entries are unsigned and unsigned requests are answered ({variable} is not set)"),
            _ => {}
        }
        config.freshness = self.freshness;
        config.message_ttl = self.message_ttl;
        config.claim_idle = self.claim_idle;
        config.serve_prefetch = !self.no_prefetch;
        if self.stream_prefix != "oona" {
            let rename = |name: &mut String| *name = name.replacen("oona", &self.stream_prefix, 1);
            let s = &mut config.streams;
            for name in [&mut s.requests, &mut s.ready, &mut s.errors, &mut s.telemetry, &mut s.emergency, &mut s.dead_letter] {
                rename(name);
            }
        }
        config.validate()?;
        Ok(Some(config))
    }
}

/// Where a fleet's artifacts are: its S3-compatible bucket (and the Redis
/// keeping its leases, if any). Credentials come from `AWS_ACCESS_KEY_ID`
/// and `AWS_SECRET_ACCESS_KEY`.
#[derive(Args)]
pub struct FleetStoreArgs {
    /// The fleet's bucket (no fleet without it); needs --trusted-key.
    #[arg(long = "s3-bucket", value_name = "NAME")]
    pub bucket: Option<String>,
    /// The S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long = "s3-endpoint", value_name = "URL", requires = "bucket")]
    pub endpoint: Option<String>,
    /// Object names start with this prefix (ASCII letters, digits, '-', '_', '.', '/').
    #[arg(long = "s3-prefix", value_name = "PREFIX", default_value = "", requires = "bucket")]
    pub prefix: String,
    /// Region requests are signed for (default AWS_REGION or us-east-1).
    #[arg(long = "s3-region", value_name = "REGION", requires = "bucket")]
    pub region: Option<String>,
    /// The longest one request to the bucket may take, seconds (keep it
    /// under a third of the lease TTL).
    #[arg(long = "s3-timeout", value_name = "SECONDS", default_value = "5", value_parser = parse_request_timeout, requires = "bucket", allow_negative_numbers = true)]
    pub timeout: Duration,
    /// Keep the fleet's leases in this Redis (redis://host:port/db, often
    /// the bus's) instead of the bucket, and announce publications there;
    /// every host of the fleet must use the same one.
    #[arg(long = "fleet-lease-redis", value_name = "URL", requires = "bucket")]
    pub lease_redis: Option<String>,
}

impl FleetStoreArgs {
    /// The fleet configuration these name (not validated), or `None`
    /// without `--s3-bucket`.
    fn config(&self) -> Option<FleetConfig> {
        let bucket = self.bucket.as_ref()?;
        let mut config = FleetConfig::new(bucket);
        config.endpoint = self.endpoint.clone();
        config.prefix = self.prefix.clone();
        config.region = self.region.clone();
        config.request_timeout = self.timeout;
        config.lease_redis = self.lease_redis.clone();
        Some(config)
    }

    /// The validated fleet configuration, or `None` without `--s3-bucket`.
    pub fn validated(&self) -> Result<Option<FleetConfig>> {
        let config = self.config();
        if let Some(config) = &config {
            config.validate()?;
        }
        Ok(config)
    }
}

/// How the forge shares artifacts with its fleet: where they are, and how
/// this host takes part.
#[derive(Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub store: FleetStoreArgs,
    /// Only fetch from the bucket, never publish (no signing key needed;
    /// without one, a blueprint the bucket lacks fails instead of compiling).
    #[arg(long = "fleet-read-only", requires = "bucket")]
    pub read_only: bool,
    /// How long a claim to compile a blueprint holds, seconds.
    #[arg(long = "lease-ttl", value_name = "SECONDS", default_value = "30", value_parser = parse_lease_ttl, requires = "bucket", allow_negative_numbers = true)]
    pub lease_ttl: Duration,
    /// How long to wait for another host's compile before compiling, seconds.
    #[arg(long = "lease-wait", value_name = "SECONDS", default_value = "60", value_parser = parse_lease_wait, requires = "bucket", allow_negative_numbers = true)]
    pub lease_wait: Duration,
    /// How often publication is retried while the bucket is unreachable, seconds.
    #[arg(long = "s3-retry", value_name = "SECONDS", default_value = "2", value_parser = parse_retry_interval, requires = "bucket", allow_negative_numbers = true)]
    pub retry: Duration,
    /// This host's index in its fleet (0, 1, 2…, e.g. a scheduler's rank):
    /// hosts starting together begin in evenly spread places (default:
    /// none, each starts at a random place).
    #[arg(long = "fleet-index", value_name = "N", requires = "bucket", allow_negative_numbers = true)]
    pub member_index: Option<u32>,
    /// Keep the fleet's leases on the bus's Redis (--redis), as
    /// --fleet-lease-redis with its URL would, for a fleet whose hosts all
    /// share that bus.
    #[arg(long = "fleet-leases-on-bus", requires = "bucket", conflicts_with = "lease_redis")]
    pub leases_on_bus: bool,
}

impl FleetArgs {
    /// The fleet configuration, or `None` without `--s3-bucket`.
    pub fn config(&self) -> Result<Option<FleetConfig>> {
        let Some(mut config) = self.store.config() else { return Ok(None) };
        config.publish = !self.read_only;
        config.lease_ttl = self.lease_ttl;
        config.lease_wait = self.lease_wait;
        config.retry_interval = self.retry;
        config.member_index = self.member_index;
        config.leases_on_bus = self.leases_on_bus;
        config.validate()?;
        Ok(Some(config))
    }
}

/// A key ring from key files.
pub fn keys(signing: Option<&Path>, trusted: &[PathBuf]) -> Result<KeyRing> {
    let signing = signing.map(read_key_file).transpose()?;
    let trusted = trusted.iter().map(|p| read_key_file(p)).collect::<Result<Vec<_>>>()?;
    KeyRing::new(signing, &trusted)
}

fn parse_strategy(value: &str) -> std::result::Result<Strategy, String> {
    value.parse().map_err(|e: Error| e.message().to_string())
}

/// Seconds from `least` to a day, the range the fleet accepts.
fn fleet_seconds(value: &str, least: Duration) -> std::result::Result<Duration, String> {
    use tezzeret::fleet::config::MAX_TIME;
    match value.parse::<f64>().ok().filter(|s| *s >= 0.0).and_then(|s| Duration::try_from_secs_f64(s).ok()) {
        Some(duration) if (least..=MAX_TIME).contains(&duration) => Ok(duration),
        _ => Err(format!("expected {} to {} seconds, got {value:?}", least.as_secs_f64(), MAX_TIME.as_secs_f64())),
    }
}

pub fn parse_request_timeout(value: &str) -> std::result::Result<Duration, String> {
    fleet_seconds(value, tezzeret::fleet::config::LEAST_REQUEST_TIMEOUT)
}

fn parse_lease_ttl(value: &str) -> std::result::Result<Duration, String> {
    fleet_seconds(value, tezzeret::fleet::config::LEAST_LEASE_TTL)
}

fn parse_lease_wait(value: &str) -> std::result::Result<Duration, String> {
    fleet_seconds(value, tezzeret::fleet::config::LEAST_LEASE_WAIT)
}

fn parse_retry_interval(value: &str) -> std::result::Result<Duration, String> {
    fleet_seconds(value, tezzeret::fleet::config::LEAST_RETRY_INTERVAL)
}

/// A positive number of seconds.
pub fn parse_seconds(value: &str) -> std::result::Result<Duration, String> {
    match value.parse::<f64>().ok().filter(|s| *s > 0.0).and_then(|s| Duration::try_from_secs_f64(s).ok()) {
        Some(duration) if duration <= Duration::from_secs(365 * 24 * 3600) => Ok(duration),
        _ => Err(format!("expected a positive number of seconds (at most a year), got {value:?}")),
    }
}
