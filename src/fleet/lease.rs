//! Claims to compile: a blueprint is compiled once for the fleet because a
//! forge compiles a cache key only while it holds that key's lease.
//!
//! A lease is an object `leases/<cache key>/<generation>.json` holding its
//! holder and expiry, written with conditional create, so exactly one
//! forge wins each generation. It lives in the bucket, or in a Redis when
//! the fleet is given one ([`super::lease_objects`]): the same objects
//! under the same names, one round trip to Redis instead of a create in
//! the bucket. A live lease makes the others wait for the
//! holder's manifest; an expired one (its holder crashed or hung) is taken
//! over by creating the next generation — again exactly one winner.
//!
//! A holder that published keeps its lease objects in the bucket (it only
//! stops renewing them): generation 0 existing is the record that the key
//! was claimed, so a forge that wins generation 0 knows that nobody has
//! published the key and compiles without asking the bucket again, and a
//! later claim of a published key fails and sends its forge to the bucket.
//! A holder whose compile failed removes its lease, so that another forge
//! may try. Expiry is judged by each forge's clock: the fleet's clocks
//! must agree to well within the TTL.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::objects::ObjectNames;
use super::lease_objects::LeaseObjects;
use super::remote::{Create, Got, Rewrites, SMALL_OBJECT_LIMIT};
use crate::base::error::{Error, ErrorCode, Result};

/// The most lease objects a claim reads for one cache key: each takeover
/// of an expired lease leaves one more until a holder releases them, so a
/// key with more holds objects that are none of the fleet's.
const MAX_GENERATIONS: usize = 256;

/// A lease object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBody {
    /// Who holds it (host, process and a random part).
    pub holder: String,
    /// When it expires, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// A lease this forge holds. While it is held it is renewed in the
/// background (every third of the TTL), so a compile longer than the TTL
/// keeps it; dropping it stops the renewal (release it to remove it).
/// A renewal writes only over a live lease of the same holder: never after
/// the release's delete, never over another holder's lease, and never
/// bringing back one that expired (another forge may have taken it over):
/// it is sent only while the lease outlives the longest the write may take
/// to reach the store (the request timeout, or a third of the TTL when
/// that is shorter; see [`renewal_margin`]).
#[derive(Debug)]
pub struct Lease {
    /// The cache key it is for.
    pub cache_key: String,
    /// Its generation.
    pub generation: u64,
    /// Older generations seen when it was won (expired; removed with it).
    stale: Vec<u64>,
    /// The renewals, once started.
    renewal: Option<Rewrites>,
}

impl Lease {
    /// Keeps the lease live for as long as this value exists.
    pub fn keep_renewed(&mut self, objects: LeaseObjects<'_>, names: &ObjectNames, holder: &str, ttl: Duration) {
        let holder = holder.to_string();
        let make = move || body_bytes(&holder, ttl);
        let margin = renewal_margin(ttl, objects.request_timeout());
        self.renewal = Some(objects.renew_every(&names.lease(&self.cache_key, self.generation), ttl / 3, margin, make));
    }
}

/// How long a lease must still live for a renewal to be sent: the longest
/// the write may take to reach the store (`request_timeout`), so that it
/// never lands after the lease expired, but at most a third of the TTL, so
/// that a renewal every third of it still goes out after one that failed.
/// (A request timeout over a third of the TTL leaves a slow write room to
/// land late; keep it under that.)
pub fn renewal_margin(ttl: Duration, request_timeout: Duration) -> Duration {
    request_timeout.min(ttl / 3)
}

/// A lease object's bytes for `holder`, live for `ttl` from now.
fn body_bytes(holder: &str, ttl: Duration) -> Vec<u8> {
    let body = LeaseBody { holder: holder.to_string(), expires_at_ms: now_ms().saturating_add(ttl.as_millis() as u64) };
    serde_json::to_vec(&body).expect("leases serialise")
}

/// Whether a renewal writing the lease `new` may replace the lease
/// `current` (both must be leases): only its own holder's, still live
/// `margin` from now (see [`renewal_margin`]) — an expired one may have
/// been taken over (the next generation), and reviving it would make two
/// holders.
pub fn renewable(current: &[u8], new: &[u8], margin: Duration) -> bool {
    match (serde_json::from_slice::<LeaseBody>(current), serde_json::from_slice::<LeaseBody>(new)) {
        (Ok(current), Ok(new)) => current.holder == new.holder && current.expires_at_ms > now_ms().saturating_add(margin.as_millis() as u64),
        _ => false,
    }
}

/// What trying to claim a cache key found.
#[derive(Debug)]
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
        /// The generation of the lease it holds.
        generation: u64,
        /// How long it stays live.
        expires_in: Duration,
    },
}

/// Milliseconds since the Unix epoch, by this host's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What one generation of a lease is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Held by `holder` for `expires_in` more.
    Live {
        /// Who holds it.
        holder: String,
        /// How long it stays live.
        expires_in: Duration,
    },
    /// Past its expiry, or unreadable (a torn or foreign write): its holder
    /// is presumed dead and the next generation may be claimed.
    Expired,
    /// Not in the bucket: released (or never written).
    Gone,
}

/// Reads one generation of a cache key's lease.
pub async fn state(objects: LeaseObjects<'_>, names: &ObjectNames, cache_key: &str, generation: u64) -> Result<LeaseState> {
    let bytes = match objects.get(&names.lease(cache_key, generation), SMALL_OBJECT_LIMIT).await? {
        Got::Bytes(bytes) => bytes,
        Got::Missing => return Ok(LeaseState::Gone),
        Got::TooLarge => return Ok(LeaseState::Expired),
    };
    let now = now_ms();
    Ok(match serde_json::from_slice::<LeaseBody>(&bytes) {
        Ok(lease) if lease.expires_at_ms > now => {
            LeaseState::Live { holder: lease.holder, expires_in: Duration::from_millis(lease.expires_at_ms - now) }
        }
        _ => LeaseState::Expired,
    })
}

/// The generation of `cache_key`'s lease that is live now, if any:
/// generation 0 when it is (one request), else, when it expired, the
/// newest generation when that one is (a takeover's).
pub async fn live_generation(objects: LeaseObjects<'_>, names: &ObjectNames, cache_key: &str) -> Result<Option<u64>> {
    match state(objects, names, cache_key, 0).await? {
        LeaseState::Live { .. } => return Ok(Some(0)),
        LeaseState::Gone => return Ok(None),
        LeaseState::Expired => {}
    }
    let Some(newest) = objects.generations(names, cache_key, MAX_GENERATIONS).await?.and_then(|g| g.into_iter().max()) else {
        return Ok(None);
    };
    if newest == 0 {
        return Ok(None);
    }
    Ok(matches!(state(objects, names, cache_key, newest).await?, LeaseState::Live { .. }).then_some(newest))
}

/// Tries to claim `cache_key` for `holder` for `ttl`: one request when the
/// key is free, two when generation 0 is live (the usual contention).
pub async fn claim(objects: LeaseObjects<'_>, names: &ObjectNames, cache_key: &str, holder: &str, ttl: Duration) -> Result<Claim> {
    let body = |generation: u64| (names.lease(cache_key, generation), body_bytes(holder, ttl));
    let won = |generation: u64, stale: Vec<u64>, took_over: bool| Claim::Won {
        lease: renewed(objects, names, cache_key, holder, ttl, generation, stale),
        took_over,
    };
    if let Some(lease) = claim_unclaimed(objects, names, cache_key, holder, ttl).await? {
        return Ok(Claim::Won { lease, took_over: false });
    }
    if let LeaseState::Live { holder, expires_in } = state(objects, names, cache_key, 0).await? {
        return Ok(Claim::Held { holder, generation: 0, expires_in });
    }
    // Generation 0 expired or was released: the newest generation decides.
    // A few rounds: each lost create means another forge moved first.
    let mut newest_seen = 0;
    for _ in 0..4 {
        let Some(mut generations) = objects.generations(names, cache_key, MAX_GENERATIONS).await? else {
            // More than takeovers ever leave: not the fleet's doing. Waited
            // for as a live lease is (a bounded wait), never read whole.
            let holder = format!("unknown (more than {MAX_GENERATIONS} lease objects)");
            return Ok(Claim::Held { holder, generation: newest_seen, expires_in: ttl });
        };
        generations.sort_unstable();
        let exhausted = || Error::new(ErrorCode::Corrupt, format!("fleet lease generations of {cache_key} are exhausted"));
        let (next, took_over) = match generations.last() {
            None => (0, false),
            Some(&newest) => {
                newest_seen = newest;
                match state(objects, names, cache_key, newest).await? {
                    LeaseState::Live { holder, expires_in } => return Ok(Claim::Held { holder, generation: newest, expires_in }),
                    LeaseState::Expired => (newest.checked_add(1).ok_or_else(exhausted)?, true),
                    LeaseState::Gone => (newest.checked_add(1).ok_or_else(exhausted)?, false),
                }
            }
        };
        let (name, bytes) = body(next);
        if objects.create(&name, bytes).await? == Create::Created {
            return Ok(won(next, generations.into_iter().filter(|&g| g < next).collect(), took_over));
        }
    }
    // Still contended after several rounds: someone else is making progress.
    Ok(Claim::Held { holder: "another forge".into(), generation: newest_seen, expires_in: ttl })
}

/// Claims `cache_key` only if nobody holds or held it since its last
/// release (generation 0 absent: the key is not published, see the module
/// documentation): one request. `None`: generation 0 exists — live,
/// expired, kept by a holder that published, or about to be released;
/// look the key up, and make a full [`claim`] once its lease is not live.
pub async fn claim_unclaimed(
    objects: LeaseObjects<'_>,
    names: &ObjectNames,
    cache_key: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Lease>> {
    if objects.create(&names.lease(cache_key, 0), body_bytes(holder, ttl)).await? == Create::Exists {
        return Ok(None);
    }
    Ok(Some(renewed(objects, names, cache_key, holder, ttl, 0, Vec::new())))
}

/// A generation just won, kept renewed from now on.
fn renewed(
    objects: LeaseObjects<'_>,
    names: &ObjectNames,
    cache_key: &str,
    holder: &str,
    ttl: Duration,
    generation: u64,
    stale: Vec<u64>,
) -> Lease {
    let mut lease = Lease { cache_key: cache_key.to_string(), generation, stale, renewal: None };
    lease.keep_renewed(objects, names, holder, ttl);
    lease
}

/// Marks `cache_key` as claimed by `holder` for `ttl` before a publication
/// made without a lease (one that an outage postponed): a forge claiming
/// the key meanwhile waits for the manifest instead of compiling it.
/// An existing generation 0 is left as it is.
pub async fn mark_claimed(objects: LeaseObjects<'_>, names: &ObjectNames, cache_key: &str, holder: &str, ttl: Duration) -> Result<()> {
    objects.create(&names.lease(cache_key, 0), body_bytes(holder, ttl)).await.map(drop)
}

/// Ends a lease whose holder's manifest is in the bucket: its renewal
/// stops and its objects stay, recording that the key was claimed.
pub async fn keep(mut lease: Lease) {
    if let Some(renewal) = lease.renewal.take() {
        renewal.stop().await;
    }
}

/// Removes a lease (and the expired generations it replaced) when the
/// bucket does not hold its key after all (the compile failed, or its
/// publication did), so that another forge may claim it; its renewal stops.
/// A lease another forge took over meanwhile (a newer generation exists:
/// this holder stalled past its expiry) is left as it is: its objects are
/// the newer holder's record that the key is claimed, and removing
/// generation 0 would let a third forge claim the key as never claimed.
pub async fn release(objects: LeaseObjects<'_>, names: &ObjectNames, mut lease: Lease) -> Result<()> {
    if let Some(renewal) = lease.renewal.take() {
        renewal.stop().await;
    }
    let taken_over = match objects.generations(names, &lease.cache_key, MAX_GENERATIONS).await? {
        Some(generations) => generations.iter().any(|&g| g > lease.generation),
        None => true,
    };
    if taken_over {
        return Ok(());
    }
    objects.delete(&names.lease(&lease.cache_key, lease.generation)).await?;
    for &generation in &lease.stale {
        objects.delete(&names.lease(&lease.cache_key, generation)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_goes_out_only_while_its_lease_outlives_the_margin() {
        let lease = |holder: &str, live_ms: u64| {
            serde_json::to_vec(&LeaseBody { holder: holder.into(), expires_at_ms: now_ms() + live_ms }).unwrap()
        };
        let (renewal, margin) = (lease("a", 30_000), Duration::from_secs(5));
        assert!(renewable(&lease("a", 20_000), &renewal, margin));
        assert!(!renewable(&lease("a", 2_000), &renewal, margin), "live now, expired before the write could land");
        assert!(!renewable(&lease("b", 20_000), &renewal, margin), "another holder's");
        assert!(!renewable(b"{}", &renewal, Duration::ZERO), "not a lease");
        assert_eq!(renewal_margin(Duration::from_secs(30), Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(renewal_margin(Duration::from_millis(900), Duration::from_secs(60)), Duration::from_millis(300));
    }
}
