//! Where a fleet's lease objects live: in its bucket beside the artifacts
//! (the default), or in the fleet's Redis ([`super::redis_hash`]) when it is
//! given one. Either way a lease object is created with exactly one
//! winner, read, rewritten, removed and listed under the same name, so the
//! lease logic ([`super::lease`]) is one.
use std::collections::HashSet;
use std::time::Duration;

use super::lease::renewable;
use super::objects::ObjectNames;
use super::redis_hash::FleetRedis;
use super::remote::{Create, Got, Listed, RemoteStore, Rewrites};
use crate::base::error::Result;

/// The place a fleet's lease objects are kept, for the lease logic.
#[derive(Debug, Clone, Copy)]
pub enum LeaseObjects<'a> {
    /// In the bucket, under `leases/`.
    Bucket(&'a RemoteStore),
    /// In the fleet's Redis.
    Redis(&'a FleetRedis),
}

impl LeaseObjects<'_> {
    /// Stores an object only if none exists under its name (one winner).
    pub async fn create(&self, name: &str, bytes: Vec<u8>) -> Result<Create> {
        match self {
            LeaseObjects::Bucket(remote) => remote.create(name, bytes).await,
            LeaseObjects::Redis(redis) => redis.create(name, bytes).await,
        }
    }

    /// An object's bytes (see [`RemoteStore::get`]).
    pub async fn get(&self, name: &str, limit: u64) -> Result<Got> {
        match self {
            LeaseObjects::Bucket(remote) => remote.get(name, limit).await,
            LeaseObjects::Redis(redis) => redis.get(name, limit).await,
        }
    }

    /// Removes an object (one already gone is not an error).
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self {
            LeaseObjects::Bucket(remote) => remote.delete(name).await,
            LeaseObjects::Redis(redis) => redis.delete(name).await,
        }
    }

    /// Every object under `folder` (ending in `/`).
    pub async fn list(&self, folder: &str) -> Result<Vec<Listed>> {
        Ok(self.list_up_to(folder, usize::MAX).await?.unwrap_or_default())
    }

    /// The objects under `folder` if there are at most `limit` of them.
    pub async fn list_up_to(&self, folder: &str, limit: usize) -> Result<Option<Vec<Listed>>> {
        match self {
            LeaseObjects::Bucket(remote) => remote.list_up_to(folder, limit).await,
            LeaseObjects::Redis(redis) => redis.list_up_to(folder, limit).await,
        }
    }

    /// The cache keys that have lease objects, from one listing, if there
    /// are at most `limit` (None when more): in the bucket one level of
    /// its `leases/` folder (the key folders, not the objects in each,
    /// which would make the store read every folder), in Redis the lease
    /// objects' names (where `limit` bounds the objects, one or more a key).
    pub async fn claimed_keys(&self, names: &ObjectNames, limit: usize) -> Result<Option<HashSet<String>>> {
        Ok(match self {
            LeaseObjects::Bucket(remote) => remote
                .list_folders_up_to(&names.leases(), limit)
                .await?
                .map(|folders| folders.iter().filter_map(|folder| names.lease_folder_key(folder)).map(str::to_string).collect()),
            LeaseObjects::Redis(redis) => redis
                .list_up_to(&names.leases(), limit)
                .await?
                .map(|leases| leases.iter().filter_map(|lease| names.lease_key(&lease.name)).map(str::to_string).collect()),
        })
    }

    /// The generations of a cache key's lease objects, if there are at
    /// most `max` (None: more). In the bucket one listing of the key's
    /// folder; in Redis a lookup by name of generations 0 to `max` (a
    /// scan would read the whole fleet's hash), None when generation `max`
    /// exists — which takes `max` takeovers, leaving more than `max`
    /// objects.
    pub async fn generations(&self, names: &ObjectNames, cache_key: &str, max: usize) -> Result<Option<Vec<u64>>> {
        let folder = names.lease_folder(cache_key);
        match self {
            LeaseObjects::Bucket(remote) => Ok(remote
                .list_up_to(&folder, max)
                .await?
                .map(|listed| listed.iter().filter_map(|o| ObjectNames::lease_generation(&o.name)).collect())),
            LeaseObjects::Redis(redis) => redis.lease_generations(&folder, max).await,
        }
    }

    /// Renews a lease object every `every` with the bytes `make` returns,
    /// until the returned value is stopped or dropped (see [`Rewrites`]) —
    /// only while it still holds a live lease of the same holder, so that a
    /// renewal reaching the store late never brings back a released or
    /// expired lease nor overwrites another holder's (in the bucket each
    /// write is conditional on the object's ETag, on Redis a script checks).
    /// A renewal is sent only while the lease lives `margin` longer.
    pub fn renew_every(
        &self,
        name: &str,
        every: Duration,
        margin: Duration,
        make: impl Fn() -> Vec<u8> + Send + Sync + 'static,
    ) -> Rewrites {
        match self {
            LeaseObjects::Bucket(remote) => {
                remote.renew_every(name, every, make, move |current, new| renewable(current, new, margin))
            }
            LeaseObjects::Redis(redis) => redis.renew_every(name, every, margin, make),
        }
    }

    /// The longest one request may take.
    pub fn request_timeout(&self) -> Duration {
        match self {
            LeaseObjects::Bucket(remote) => remote.request_timeout(),
            LeaseObjects::Redis(redis) => redis.request_timeout(),
        }
    }
}
