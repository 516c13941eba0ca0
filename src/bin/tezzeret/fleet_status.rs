//! `tezzeret fleet-status`: what the fleet's bucket holds, verified with
//! the trusted keys (manifests, artifacts, leases), and, given a state
//! directory, how much of its catalog the bucket holds, verified; plus the
//! lines and documents the other commands print about a forge's fleet
//! counters.
use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use super::options::{keys, FleetStoreArgs};
use tezzeret::fleet::{ArtifactCheck, Fleet, FleetMetrics};
use tezzeret::state::verify::read_journal;
use tezzeret::state::wal::journal::SharedArtifact;
use tezzeret::state::layout::StateLayout;
use tezzeret::{Error, ErrorCode, Result};

#[derive(Args)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    fleet: FleetStoreArgs,
    /// Trust this public key (repeatable): manifests are verified with it.
    #[arg(long = "trusted-key", value_name = "FILE", required = true)]
    trusted_keys: Vec<PathBuf>,
    /// Also say how much of this state directory's catalog the bucket
    /// holds (verified), and how much its forge has yet to publish.
    #[arg(long = "state", value_name = "DIR")]
    state: Option<PathBuf>,
    /// Download every artifact a verified manifest names and check its
    /// sha256 (by default only its presence and size, from a listing).
    #[arg(long)]
    download: bool,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the bucket's survey; exits 1 when a manifest is refused.
pub fn fleet_status(args: FleetStatusArgs) -> Result<bool> {
    let mut config = args.fleet.validated()?.ok_or_else(|| Error::invalid("fleet-status needs --s3-bucket NAME"))?;
    config.publish = false;
    let fleet = Fleet::connect(config, keys(None, &args.trusted_keys)?, "fleet-status".into())?;
    if let Some(dir) = args.state.as_ref().filter(|dir| !StateLayout::new(dir).wal().exists()) {
        return Err(Error::new(ErrorCode::NotFound, format!("{} holds no forge state (no journal)", dir.display())));
    }
    let check = if args.download { ArtifactCheck::Downloaded } else { ArtifactCheck::Listed };
    let survey = fleet.survey(check)?;
    let local = match &args.state {
        Some(dir) => {
            let (_, journal) = read_journal(dir)?;
            let current = journal.artifacts.values();
            let in_bucket = current.clone().filter(|r| survey.verified_artifacts.contains_key(&r.cache_key)).count();
            let root = fleet.root();
            let unpublished = current.filter(|r| !journal.is_shared_at(&root, &SharedArtifact::of(r))).count();
            Some(LocalCatalog { current: journal.artifacts.len(), in_bucket, unpublished })
        }
        None => None,
    };
    let checked = match check {
        ArtifactCheck::Listed => "signature and artifact size",
        ArtifactCheck::Downloaded => "signature and artifact sha256",
    };
    let refused: usize = survey.refused.values().sum();
    if args.json {
        let document = json!({
            "manifests": survey.manifests,
            "checked": checked,
            "verified": survey.verified,
            "refused": survey.refused.iter().map(|(r, n)| (r.as_str().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "refused_manifests": survey.refused_keys.iter().map(|(key, refusal, why)| json!({
                "cache_key": key, "reason": refusal.as_str(), "detail": why,
            })).collect::<Vec<_>>(),
            "artifacts": survey.artifacts,
            "artifact_bytes": survey.artifact_bytes,
            "lease_redis": fleet.lease_redis(),
            "leases": survey.leases.iter().map(|(key, body, left)| json!({
                "cache_key": key, "holder": body.holder, "expires_in_ms": left.as_millis() as u64,
            })).collect::<Vec<_>>(),
            "local": local.map(|l| json!({ "current": l.current, "in_bucket": l.in_bucket, "unpublished": l.unpublished })),
        });
        println!("{}", serde_json::to_string_pretty(&document).expect("json"));
    } else {
        println!("bucket {} at {}", fleet.config().bucket, fleet.remote().endpoint());
        println!("{} manifests: {} verified ({checked}), {refused} refused", survey.manifests, survey.verified.len());
        for (refusal, n) in &survey.refused {
            println!("  refused {n}: {}", refusal.as_str());
        }
        // What the bucket holds is untrusted: its text is printed with
        // control characters escaped.
        for (key, refusal, why) in &survey.refused_keys {
            println!("    {}: {}: {}", key.escape_debug(), refusal.as_str(), why.escape_debug());
        }
        println!("{} artifacts, {:.1} MiB", survey.artifacts, survey.artifact_bytes as f64 / f64::from(1 << 20));
        let live = survey.leases.iter().filter(|(_, _, left)| !left.is_zero()).count();
        let place = fleet.lease_redis().map_or_else(|| "the bucket".to_string(), |server| format!("Redis at {server}"));
        let pending = survey.leases.len();
        println!("{pending} claims not published yet, leases in {place} ({live} live, {} expired)", pending - live);
        for (key, body, left) in &survey.leases {
            if left.is_zero() {
                println!("  {}: expired, was held by {}", key.escape_debug(), body.holder.escape_debug());
            } else {
                println!("  {}: held by {} for {:.1} s more", key.escape_debug(), body.holder.escape_debug(), left.as_secs_f64());
            }
        }
        if let Some(l) = local {
            println!(
                "local catalog: {} artifacts, {} of their cache keys in the bucket (verified), {} not; {} not published by its forge yet",
                l.current,
                l.in_bucket,
                l.current - l.in_bucket,
                l.unpublished
            );
        }
    }
    Ok(refused == 0)
}

/// A state directory's current artifacts against the bucket.
struct LocalCatalog {
    /// Its current artifacts.
    current: usize,
    /// Those whose cache key the bucket holds, its manifest and artifact
    /// verified.
    in_bucket: usize,
    /// Those its forge has not recorded as published (it publishes them
    /// when it next runs with the fleet).
    unpublished: usize,
}

/// A forge's fleet counters as one line of text.
pub fn metrics_line(m: &FleetMetrics, unshared: usize) -> String {
    format!(
        "fleet: {} fetched, {} compiled here, {} published ({} races lost), {} refused, {} lease waits, {} taken over, {} store errors, {unshared} unpublished",
        m.hits,
        m.misses,
        m.published,
        m.lost_races,
        m.refused(),
        m.lease_waits,
        m.lease_takeovers,
        m.store_errors
    )
}

/// A forge's fleet counters as JSON.
pub fn metrics_document(m: &FleetMetrics, unshared: usize) -> Value {
    json!({
        "hits": m.hits,
        "misses": m.misses,
        "published": m.published,
        "lost_races": m.lost_races,
        "refused": m.refusals.iter().map(|(r, n)| (r.as_str().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "lease_waits": m.lease_waits,
        "lease_takeovers": m.lease_takeovers,
        "wait_timeouts": m.wait_timeouts,
        "store_errors": m.store_errors,
        "requests": m.requests,
        "redis_requests": m.redis_requests,
        "unshared": unshared,
    })
}
