//! Claims to compile: a blueprint is compiled once for the fleet because a
//! forge compiles a cache key only while it holds that key's lease.
//!
//! A lease is an object `leases/<cache key>/<generation>.json` holding its
//! holder and expiry, written with conditional create, so exactly one
//! forge wins each generation. A live lease makes the others wait for the
//! holder's manifest; an expired one (its holder crashed or hung) is taken
//! over by creating the next generation — again exactly one winner. The
//! holder removes its lease after publishing. Expiry is judged by each
//! forge's clock: the fleet's clocks must agree to well within the TTL.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::objects::ObjectNames;
use super::remote::{Create, RemoteStore};
use crate::base::error::Result;

/// A lease object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBody {
    /// Who holds it (host, process and a random part).
    pub holder: String,
    /// When it expires, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// A lease this forge holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The cache key it is for.
    pub cache_key: String,
    /// Its generation.
    pub generation: u64,
    /// Older generations seen when it was won (expired; removed with it).
    stale: Vec<u64>,
}

/// What trying to claim a cache key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This forge holds the lease: compile, publish, release.
    Won {
        /// The lease.
        lease: Lease,
        /// Whether it took over an expired lease of another holder.
        took_over: bool,
    },
    /// Another forge holds a live lease.
    Held {
        /// Its holder.
        holder: String,
        /// How long it stays live.
        expires_in: Duration,
    },
}

/// Milliseconds since the Unix epoch, by this host's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Tries to claim `cache_key` for `holder` for `ttl`.
pub async fn claim(remote: &RemoteStore, names: &ObjectNames, cache_key: &str, holder: &str, ttl: Duration) -> Result<Claim> {
    let body = |generation: u64| {
        let body = LeaseBody { holder: holder.to_string(), expires_at_ms: now_ms() + ttl.as_millis() as u64 };
        (names.lease(cache_key, generation), serde_json::to_vec(&body).expect("leases serialise"))
    };
    // Uncontended, the first generation is free: one request.
    let (name, bytes) = body(0);
    if remote.create(&name, bytes).await? == Create::Created {
        return Ok(Claim::Won { lease: Lease { cache_key: cache_key.to_string(), generation: 0, stale: Vec::new() }, took_over: false });
    }
    // A few rounds: each lost create means another forge moved first.
    for _ in 0..4 {
        let mut generations: Vec<u64> = remote
            .list(&names.lease_folder(cache_key))
            .await?
            .iter()
            .filter_map(|o| ObjectNames::lease_generation(&o.name))
            .collect();
        generations.sort_unstable();
        let next = match generations.last() {
            None => 0,
            Some(&newest) => {
                match remote.get(&names.lease(cache_key, newest)).await? {
                    Some(bytes) => match serde_json::from_slice::<LeaseBody>(&bytes) {
                        Ok(lease) if lease.expires_at_ms > now_ms() => {
                            let expires_in = Duration::from_millis(lease.expires_at_ms - now_ms());
                            return Ok(Claim::Held { holder: lease.holder, expires_in });
                        }
                        // Expired, or unreadable (a torn or foreign write): taken over.
                        _ => newest + 1,
                    },
                    // Released between the listing and the read.
                    None => newest + 1,
                }
            }
        };
        let (name, bytes) = body(next);
        if remote.create(&name, bytes).await? == Create::Created {
            let stale = generations.into_iter().filter(|&g| g < next).collect::<Vec<_>>();
            let took_over = !stale.is_empty();
            return Ok(Claim::Won { lease: Lease { cache_key: cache_key.to_string(), generation: next, stale }, took_over });
        }
    }
    // Still contended after several rounds: someone else is making progress.
    Ok(Claim::Held { holder: "another forge".into(), expires_in: ttl })
}

/// Removes a lease (and the expired generations it replaced) once its
/// holder's manifest is published or its compile failed.
pub async fn release(remote: &RemoteStore, names: &ObjectNames, lease: &Lease) -> Result<()> {
    remote.delete(&names.lease(&lease.cache_key, lease.generation)).await?;
    for &generation in &lease.stale {
        remote.delete(&names.lease(&lease.cache_key, generation)).await?;
    }
    Ok(())
}
