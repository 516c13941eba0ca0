//! A forge's membership in a fleet: its connection to the bucket (and
//! the fleet's Redis, if any), its identity in leases and its counters.
//! What it does with them lives beside: finding what other hosts published
//! ([`super::lookup`]), publishing ([`super::publish`]), claiming cache keys
//! ([`super::claims`]) and surveying the bucket ([`super::survey`]).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::config::FleetConfig;
use super::lease_objects::LeaseObjects;
use super::objects::ObjectNames;
use super::redis_hash::FleetRedis;
use super::remote::RemoteStore;
use super::stats::{FleetEvent, FleetMetrics, FleetStats};
use crate::base::error::{Error, Result};
use crate::state::artifact::ArtifactRecord;
use crate::state::signing::KeyRing;

/// How many requests a batch keeps in flight at once.
pub(super) const CONCURRENT_REQUESTS: usize = 16;

/// A forge's connection to its fleet.
pub struct Fleet {
    pub(super) remote: RemoteStore,
    /// The fleet's Redis, when it has one: its leases, and copies of the
    /// manifests published (announcements read before the bucket).
    pub(super) redis: Option<FleetRedis>,
    pub(super) names: ObjectNames,
    pub(super) keys: KeyRing,
    pub(super) config: FleetConfig,
    pub(super) holder: String,
    pub(super) stats: FleetStats,
    /// Leases being ended (kept or released) or claims given up, in the
    /// background.
    pub(super) releasing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set once a watch found more announcements than it lists: they are
    /// never removed, so later watches look their keys up one by one
    /// without listing again.
    pub(super) too_many_to_watch_by_listing: AtomicBool,
    /// The first failure of the fleet's Redis that was passed over (the
    /// bucket answered instead), until the forge reports it; set once.
    pub(super) passed_over: Mutex<Option<Error>>,
    /// Whether a passed-over failure was noted (later ones are only counted).
    pub(super) passed_over_noted: AtomicBool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("config", &self.config).field("holder", &self.holder).finish_non_exhaustive()
    }
}

impl Fleet {
    /// Joins a fleet: artifacts are verified with `keys`' trusted keys
    /// (required: the store is untrusted) and published signed with its
    /// signing key (required unless publishing is off). `holder` names
    /// this forge in its leases.
    pub fn connect(config: FleetConfig, keys: KeyRing, holder: String) -> Result<Fleet> {
        config.validate()?;
        if config.leases_on_bus {
            // Only a forge knows its bus: connected alone, the leases would
            // silently stay in the bucket while the fleet's are on Redis.
            return Err(Error::invalid(
                "fleet leases_on_bus is resolved by a forge with a bus (FleetConfig::lease_redis_beside); \
                 a fleet connected on its own names its lease Redis",
            ));
        }
        if !keys.verifies() {
            return Err(Error::invalid("a fleet store needs trusted keys: nothing from the shared bucket is used unverified"));
        }
        if config.publish && !keys.signs() {
            return Err(Error::invalid(
                "publishing to the fleet store needs a signing key; to only read, turn publishing off \
                 (the CLI's --fleet-read-only, TEZZERET_FLEET_READ_ONLY in C, read_only=True in Python)",
            ));
        }
        let remote = RemoteStore::connect(&config)?;
        let names = ObjectNames::new(&config.bucket, &config.prefix);
        let redis = match &config.lease_redis {
            // The connection manager lives on the store's runtime.
            Some(url) => Some(remote.run(async { FleetRedis::connect(url, &names, config.request_timeout) })?),
            None => None,
        };
        Ok(Fleet {
            remote,
            redis,
            names,
            keys,
            config,
            holder,
            stats: FleetStats::default(),
            releasing: Mutex::new(Vec::new()),
            too_many_to_watch_by_listing: AtomicBool::new(false),
            passed_over: Mutex::new(None),
            passed_over_noted: AtomicBool::new(false),
        })
    }

    /// The fleet's Redis server (keeping the leases and announcing the
    /// publications), if it has one.
    pub fn lease_redis(&self) -> Option<&str> {
        self.redis.as_ref().map(FleetRedis::server)
    }

    /// Where the fleet's lease objects are kept.
    pub(super) fn lease_objects(&self) -> LeaseObjects<'_> {
        match &self.redis {
            Some(redis) => LeaseObjects::Redis(redis),
            None => LeaseObjects::Bucket(&self.remote),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// The bucket's object names.
    pub fn names(&self) -> &ObjectNames {
        &self.names
    }

    /// The connection to the bucket.
    pub fn remote(&self) -> &RemoteStore {
        &self.remote
    }

    /// Which store and place in it this fleet shares through: the
    /// endpoint (`aws` for AWS itself), the bucket and the prefix. A state
    /// directory records what it published under this, so that reopened on
    /// another bucket or prefix it publishes there again.
    pub fn root(&self) -> String {
        format!("{} s3://{}", self.remote.endpoint(), self.names.root())
    }

    /// The reference a remote consumer fetches a published artifact by.
    pub fn artifact_url(&self, record: &ArtifactRecord) -> String {
        self.names.artifact_url(&record.checksum)
    }

    /// Counts an event.
    pub fn count(&self, event: FleetEvent) {
        self.stats.count(event);
    }

    /// Counts a failure of the fleet's Redis that is passed over (the
    /// bucket answers instead, or a best-effort write is skipped) and, if
    /// it is the first, keeps it for [`Self::take_passed_over`].
    pub(super) fn pass_over(&self, error: Error) {
        self.count(FleetEvent::StoreError);
        if !self.passed_over_noted.swap(true, Ordering::Relaxed) {
            // Its message names the server already.
            *self.passed_over.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        }
    }

    /// The first failure of the fleet's Redis that was passed over without
    /// failing anything, once, for the forge to log (later ones are only
    /// counted in the store errors).
    pub fn take_passed_over(&self) -> Option<Error> {
        self.passed_over.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The counters.
    pub fn metrics(&self) -> FleetMetrics {
        FleetMetrics {
            requests: self.remote.operations(),
            redis_requests: self.redis.as_ref().map_or(0, FleetRedis::operations),
            ..self.stats.snapshot()
        }
    }
}
