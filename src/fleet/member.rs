//! A forge's membership in a fleet: finding an artifact another host
//! compiled (verified before anything is trusted), publishing what this
//! host compiled, and the leases that keep two hosts from compiling the
//! same cache key.
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use super::config::FleetConfig;
use super::lease::{self, Claim, Lease, LeaseBody, LeaseState};
use super::lease_objects::LeaseObjects;
use super::redis_hash::FleetRedis;
use super::manifest::{check_artifact, Refusal, SharedManifest};
use super::objects::ObjectNames;
use super::remote::{Create, Got, RemoteStore, SMALL_OBJECT_LIMIT};
use super::stats::{FleetEvent, FleetMetrics, FleetStats};
use crate::base::error::{Error, ErrorCode, Result};
use crate::state::artifact::ArtifactRecord;
use crate::state::signing::KeyRing;

/// How many requests a batch keeps in flight at once.
const CONCURRENT_REQUESTS: usize = 16;

/// From how many watched keys on one listing of the manifests is cheaper
/// than a lookup per key (a listing costs a store about two reads).
const WATCH_BY_LISTING: usize = 3;

/// The most manifests a watch lists; a larger bucket is watched key by key.
const WATCH_LISTING_LIMIT: usize = 1000;

/// Artifacts up to this size are relayed through the fleet's Redis when
/// they are published, so that waiting hosts fetch them without asking
/// the bucket (larger ones come from the bucket only).
pub const RELAY_LIMIT: u64 = 256 << 10;

/// How long Redis keeps a relayed artifact: enough for the hosts waiting
/// on its publication; later ones fetch it from the bucket. Redis thus
/// holds at most what was published in the last five minutes, each copy
/// no larger than [`RELAY_LIMIT`].
pub const RELAY_TTL: Duration = Duration::from_secs(300);

/// Where a lookup reads a cache key's manifest.
#[derive(Debug, Clone, Copy)]
struct Sources {
    /// The copy announcing its publication in the fleet's Redis.
    announcement: bool,
    /// The bucket's own manifest, when the announcement gives nothing usable.
    bucket: bool,
}

impl Sources {
    const BOTH: Sources = Sources { announcement: true, bucket: true };
}

/// What the store holds for a cache key.
#[derive(Debug)]
pub enum Lookup {
    /// A manifest that verifies and the artifact it names, intact.
    Found(Box<ArtifactRecord>, Vec<u8>),
    /// No manifest (nobody published this cache key yet).
    Missing,
    /// Something that does not verify: not used.
    Refused(Refusal, String),
    /// The store could not be asked.
    Unavailable(Error),
}

/// What watching a cache key another forge holds the lease of found.
#[derive(Debug)]
pub enum Watched {
    /// What the bucket holds: the holder's artifact, or `Missing` when
    /// the lease is gone (the holder gave up: its compile failed).
    Lookup(Lookup),
    /// Nothing published and the lease expired: its holder is presumed
    /// dead; claim it.
    Expired,
    /// Nothing published yet, and the lease live (or not read this time).
    Held,
}

/// What publishing an artifact did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publication {
    /// Artifact and manifest are ours.
    Published,
    /// Another forge's verified manifest was there first (our artifact is
    /// stored too, so its reference resolves).
    LostRace,
}

/// What the bucket holds (see [`Fleet::survey`]).
#[derive(Debug, Clone, Default)]
pub struct Survey {
    /// Manifests read.
    pub manifests: usize,
    /// Blueprints whose manifest verifies and whose artifact is there, sorted.
    pub verified: Vec<String>,
    /// Manifests refused, by reason.
    pub refused: std::collections::BTreeMap<Refusal, usize>,
    /// Artifact objects.
    pub artifacts: usize,
    /// Their bytes.
    pub artifact_bytes: u64,
    /// Leases: cache key, content, time left (zero once expired).
    pub leases: Vec<(String, LeaseBody, Duration)>,
}

/// A forge's connection to its fleet.
pub struct Fleet {
    remote: RemoteStore,
    /// The fleet's Redis, when it has one: its leases, and copies of the
    /// manifests published (announcements read before the bucket).
    redis: Option<FleetRedis>,
    names: ObjectNames,
    keys: KeyRing,
    config: FleetConfig,
    holder: String,
    stats: FleetStats,
    /// Leases being ended (kept or released) or claims given up, in the
    /// background.
    releasing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set once a watch found more announcements than it lists: they are
    /// never removed, so later watches look their keys up one by one
    /// without listing again.
    too_many_to_watch_by_listing: AtomicBool,
    /// The first failure of the fleet's Redis that was passed over (the
    /// bucket answered instead), until the forge reports it; set once.
    passed_over: Mutex<Option<Error>>,
    /// Whether a passed-over failure was noted (later ones are only counted).
    passed_over_noted: AtomicBool,
}

/// A publication under way (see [`Fleet::start_publish`]).
pub struct PendingPublication {
    fleet: Arc<Fleet>,
    task: tokio::task::JoinHandle<Result<Publication>>,
}

impl PendingPublication {
    /// Whether it has ended ([`Self::wait`] then returns at once).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the publication's outcome.
    pub fn wait(self) -> Result<Publication> {
        match self.fleet.remote.run(self.task) {
            Ok(published) => published,
            Err(e) => Err(Error::new(ErrorCode::Internal, format!("fleet publication task failed: {e}"))),
        }
    }
}

/// A claim of an unclaimed cache key under way (see [`Fleet::start_claim`]).
pub struct PendingClaim {
    task: tokio::task::JoinHandle<Result<Option<Lease>>>,
}

impl std::fmt::Debug for PendingClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingClaim").field("finished", &self.task.is_finished()).finish()
    }
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
        if !keys.verifies() {
            return Err(Error::invalid("a fleet store needs trusted keys: nothing from the shared bucket is used unverified"));
        }
        if config.publish && !keys.signs() {
            return Err(Error::invalid("publishing to the fleet store needs a signing key (or turn publishing off to only read)"));
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
    fn lease_objects(&self) -> LeaseObjects<'_> {
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
    fn pass_over(&self, error: Error) {
        self.count(FleetEvent::StoreError);
        if !self.passed_over_noted.swap(true, Ordering::Relaxed) {
            let server = self.lease_redis().unwrap_or_default().to_string();
            *self.passed_over.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.context(format!("fleet Redis {server}")));
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

    /// The cache keys the bucket holds a manifest of, from one listing,
    /// when it holds at most `limit` (None when it holds more: ask key by
    /// key instead). Only a hint: a listed manifest is still read and
    /// verified before anything is used.
    pub fn published_keys(&self, limit: usize) -> Result<Option<HashSet<String>>> {
        let listed = self.remote.run(self.remote.list_up_to(&self.names.manifests(), limit));
        if listed.is_err() {
            self.count(FleetEvent::StoreError);
        }
        Ok(listed?.map(|manifests| {
            ObjectNames::manifest_keys(&manifests).map(str::to_string).collect()
        }))
    }

    /// The cache keys whose publication was announced, from one listing
    /// (see [`Self::published_keys`]): the manifest copies in the fleet's
    /// Redis, which cost the bucket nothing; without a Redis (or with one
    /// that cannot be asked), the bucket's manifests. A publication whose
    /// announcement was lost is missing here: watchers still find it by
    /// asking the bucket now and then.
    pub fn announced_keys(&self, limit: usize) -> Result<Option<HashSet<String>>> {
        self.announced_listing(limit).0
    }

    /// [`Self::announced_keys`], and whether the announcements themselves
    /// answered (false: the bucket, for a Redis that could not be asked).
    fn announced_listing(&self, limit: usize) -> (Result<Option<HashSet<String>>>, bool) {
        let Some(redis) = &self.redis else { return (self.published_keys(limit), true) };
        match self.remote.run(redis.list_up_to(&self.names.manifests(), limit)) {
            Ok(listed) => (Ok(listed.map(|copies| ObjectNames::manifest_keys(&copies).map(str::to_string).collect())), true),
            Err(error) => {
                self.pass_over(error);
                (self.published_keys(limit), false)
            }
        }
    }

    /// The cache keys any forge claimed and did not give back (lease
    /// objects of theirs exist: held, kept by a holder that published,
    /// expired or taken over), from one listing, when there are at most
    /// `limit` lease objects (None when more). Only a hint for where to
    /// claim next.
    pub fn claimed_keys(&self, limit: usize) -> Result<Option<HashSet<String>>> {
        let listed = self.remote.run(self.lease_objects().list_up_to(&self.names.leases(), limit));
        if listed.is_err() {
            self.count(FleetEvent::StoreError);
        }
        Ok(listed?.map(|leases| leases.iter().filter_map(|l| self.names.lease_key(&l.name)).map(str::to_string).collect()))
    }

    /// Looks up several cache keys at once (requests overlap); answers in
    /// the same order. Hits and refusals are counted.
    pub fn lookup_many(&self, cache_keys: &[String]) -> Vec<Lookup> {
        let lookups = futures::stream::iter(cache_keys.iter().map(|key| self.lookup_one(key))).buffered(CONCURRENT_REQUESTS);
        self.remote.run(lookups.collect())
    }

    /// Watches cache keys whose leases other forges hold (`(cache key,
    /// lease generation, read the lease)`), all at once: the announcements
    /// are looked up, and only then, when asked to, the lease read — a
    /// holder that published keeps its lease, so only a publication says
    /// when the wait is over; the lease says whether its holder died or
    /// gave up. With a Redis the announcements are its manifest copies and
    /// the bucket is asked only with the lease (for a publication whose
    /// announcement was lost); without one, they are the bucket's
    /// manifests. While nothing is announced that costs one request per
    /// key, or, for three keys or more (`WATCH_BY_LISTING`), one listing
    /// in all (only those listed are then read) — until a listing finds
    /// more than `WATCH_LISTING_LIMIT`: the announcements only grow, so
    /// from then on this fleet looks keys up one by one. Hits and refusals
    /// are counted.
    pub fn watch_many(&self, held: &[(String, u64, bool)]) -> Vec<Watched> {
        let by_listing = held.len() >= WATCH_BY_LISTING && !self.too_many_to_watch_by_listing.load(Ordering::Relaxed);
        let listed = match by_listing.then(|| self.announced_listing(WATCH_LISTING_LIMIT)) {
            Some((Ok(Some(listed)), _)) => Some(listed),
            Some((Ok(None), first_hand)) => {
                // Only the announcements' own count says so for good.
                if first_hand {
                    self.too_many_to_watch_by_listing.store(true, Ordering::Relaxed);
                }
                None
            }
            Some((Err(_), _)) | None => None,
        };
        let announced_by_redis = self.redis.is_some();
        let watches = futures::stream::iter(held.iter().map(|(key, generation, read_lease)| {
            let unlisted = listed.as_ref().is_some_and(|published| !published.contains(key));
            // The announcement unless the listing just showed there is none;
            // the bucket without a Redis, or with one when the lease is read.
            let sources = Sources { announcement: !unlisted, bucket: !announced_by_redis || *read_lease };
            let skip = unlisted && !(announced_by_redis && *read_lease);
            async move {
                match if skip { Lookup::Missing } else { self.lookup_in(key, sources).await } {
                    Lookup::Missing if *read_lease => {}
                    Lookup::Missing => return Watched::Held,
                    found => return Watched::Lookup(found),
                }
                match lease::state(self.lease_objects(), &self.names, key, *generation).await {
                    Ok(LeaseState::Live { .. }) => Watched::Held,
                    Ok(LeaseState::Expired) => Watched::Expired,
                    // Just looked up: missing (a claim re-checks under the lease).
                    Ok(LeaseState::Gone) => Watched::Lookup(Lookup::Missing),
                    Err(error) => {
                        self.count(FleetEvent::StoreError);
                        Watched::Lookup(Lookup::Unavailable(error))
                    }
                }
            }
        }))
        .buffered(CONCURRENT_REQUESTS);
        self.remote.run(watches.collect())
    }

    /// Looks up one cache key.
    pub fn lookup(&self, cache_key: &str) -> Lookup {
        self.remote.run(self.lookup_one(cache_key))
    }

    async fn lookup_one(&self, cache_key: &str) -> Lookup {
        self.lookup_in(cache_key, Sources::BOTH).await
    }

    /// Looks a cache key up in the `sources` given: its announcement (the
    /// manifest copy in the fleet's Redis), then, if that finds nothing
    /// usable, the bucket's manifest (the fleet's record). The artifact
    /// comes from the relay when it is there, else from the bucket.
    async fn lookup_in(&self, cache_key: &str, sources: Sources) -> Lookup {
        let found = self.find(cache_key, sources).await;
        match &found {
            Lookup::Found(..) => self.count(FleetEvent::Hit),
            Lookup::Refused(refusal, _) => self.count(FleetEvent::Refused(*refusal)),
            Lookup::Unavailable(_) => self.count(FleetEvent::StoreError),
            Lookup::Missing => {}
        }
        found
    }

    async fn find(&self, cache_key: &str, sources: Sources) -> Lookup {
        // What the announcement's artifact gave, if it was not usable: the
        // bucket's manifest naming the same artifact gives the same.
        let mut announced: Option<(String, Lookup)> = None;
        if sources.announcement {
            // A copy that does not verify is only counted when the bucket
            // is asked instead (a watch between lease reads sees it again).
            let counted = |refusal| {
                if sources.bucket {
                    self.count(FleetEvent::Refused(refusal));
                }
            };
            match self.announcement(cache_key).await {
                Got::Bytes(copy) => match SharedManifest::verify(&copy, cache_key, &self.keys) {
                    Ok(record) => {
                        let checksum = record.checksum.clone();
                        let found = self.fetch_artifact(record).await;
                        // Otherwise the bucket, the record, decides (when it
                        // is asked): its manifest may name another artifact
                        // (an operator replaced the entry).
                        if matches!(found, Lookup::Found(..)) {
                            return found;
                        }
                        announced = Some((checksum, found));
                    }
                    Err((refusal, _)) => counted(refusal),
                },
                Got::TooLarge => counted(Refusal::Malformed),
                Got::Missing => {}
            }
        }
        if !sources.bucket {
            return Lookup::Missing;
        }
        let manifest = match self.remote.get(&self.names.manifest(cache_key), SMALL_OBJECT_LIMIT).await {
            Ok(Got::Bytes(bytes)) => bytes,
            Ok(Got::Missing) => return Lookup::Missing,
            Ok(Got::TooLarge) => {
                return Lookup::Refused(Refusal::Malformed, format!("manifest of {cache_key} is larger than {SMALL_OBJECT_LIMIT} bytes"))
            }
            Err(e) => return Lookup::Unavailable(e),
        };
        match SharedManifest::verify(&manifest, cache_key, &self.keys) {
            Ok(record) => match announced {
                Some((checksum, found)) if checksum == record.checksum => found,
                _ => self.fetch_artifact(record).await,
            },
            Err((refusal, why)) => Lookup::Refused(refusal, why),
        }
    }

    /// The manifest copy announcing the publication of a cache key in the
    /// fleet's Redis (`Missing` without one; a Redis that cannot be asked
    /// is counted and passed over: the bucket answers instead).
    async fn announcement(&self, cache_key: &str) -> Got {
        let Some(redis) = self.redis.as_ref() else { return Got::Missing };
        match redis.get(&self.names.manifest(cache_key), SMALL_OBJECT_LIMIT).await {
            Ok(got) => got,
            Err(error) => {
                self.pass_over(error);
                Got::Missing
            }
        }
    }

    /// The relayed copy of a small artifact, if the fleet's Redis holds it
    /// (a Redis that cannot be asked is counted and passed over).
    async fn relayed(&self, record: &ArtifactRecord) -> Option<Vec<u8>> {
        let redis = self.redis.as_ref().filter(|_| record.size_bytes <= RELAY_LIMIT)?;
        match redis.relayed(&self.names.artifact(&record.checksum), record.size_bytes).await {
            Ok(Got::TooLarge) => {
                // Larger than its manifest says, as the bucket's copy would be refused.
                self.count(FleetEvent::Refused(Refusal::ChecksumMismatch));
                None
            }
            Ok(got) => got.bytes(),
            Err(error) => {
                self.pass_over(error);
                None
            }
        }
    }

    /// The artifact a verified manifest names, checked: relayed by the
    /// fleet's Redis if it is small and fresh, else from the bucket.
    async fn fetch_artifact(&self, record: ArtifactRecord) -> Lookup {
        if let Some(bytes) = self.relayed(&record).await {
            match check_artifact(&record, &bytes) {
                Ok(()) => return Lookup::Found(Box::new(record), bytes),
                // Only a hint: the bucket's own copy is read instead.
                Err((refusal, _)) => self.count(FleetEvent::Refused(refusal)),
            }
        }
        // Never read past the size the (verified) manifest gives.
        let bytes = match self.remote.get(&self.names.artifact(&record.checksum), record.size_bytes).await {
            Ok(Got::Bytes(bytes)) => bytes,
            Ok(Got::Missing) => {
                let why = format!("artifact {} of {} is not in the store", record.checksum, record.blueprint_id);
                return Lookup::Refused(Refusal::MissingArtifact, why);
            }
            Ok(Got::TooLarge) => {
                let why = format!("artifact of {} is larger than the {} bytes its manifest says", record.blueprint_id, record.size_bytes);
                return Lookup::Refused(Refusal::ChecksumMismatch, why);
            }
            Err(e) => return Lookup::Unavailable(e),
        };
        match check_artifact(&record, &bytes) {
            Ok(()) => Lookup::Found(Box::new(record), bytes),
            Err((refusal, why)) => Lookup::Refused(refusal, why),
        }
    }

    /// Publishes a stored artifact: its bytes, then its signed manifest,
    /// each created only if absent. An artifact already there is kept only
    /// if it hashes right (else replaced: its name says what it must
    /// hold); a manifest already there that verifies means another forge
    /// won the race (fine), one that does not is replaced by ours.
    ///
    /// For an artifact compiled without a lease (an outage postponed its
    /// publication, or it was compiled before the fleet was configured):
    /// its key is marked as claimed first (see [`lease::mark_claimed`]).
    /// A compile under a lease publishes with [`Self::start_publish`].
    pub fn publish(&self, record: &ArtifactRecord, bytes: &[u8]) -> Result<Publication> {
        let published = self.remote.run(async {
            // Best effort: a lease store that cannot be reached (a Redis
            // down while the bucket is up) holds no publication back.
            let marked = lease::mark_claimed(self.lease_objects(), &self.names, &record.cache_key, &self.holder, self.config.lease_ttl);
            if marked.await.is_err() {
                self.count(FleetEvent::StoreError);
            }
            self.publish_async(record, bytes).await
        });
        self.count_publication(&published);
        published
    }

    /// Starts publishing on the store's runtime and returns at once, so
    /// that the caller's own work (the local durable store) overlaps the
    /// uploads; [`PendingPublication::wait`] gives the outcome.
    pub fn start_publish(self: &Arc<Self>, record: ArtifactRecord, bytes: Arc<Vec<u8>>) -> PendingPublication {
        let fleet = Arc::clone(self);
        let task = self.remote.spawn(async move {
            let published = fleet.publish_async(&record, &bytes).await;
            fleet.count_publication(&published);
            published
        });
        PendingPublication { fleet: Arc::clone(self), task }
    }

    fn count_publication(&self, published: &Result<Publication>) {
        match published {
            Ok(Publication::Published) => self.count(FleetEvent::Published),
            Ok(Publication::LostRace) => self.count(FleetEvent::LostRace),
            Err(_) => self.count(FleetEvent::StoreError),
        }
    }

    /// Publishes, then announces a manifest of ours (see [`Self::announce`]).
    async fn publish_async(&self, record: &ArtifactRecord, bytes: &[u8]) -> Result<Publication> {
        let manifest = SharedManifest::sign(record, &self.keys)
            .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "publishing to the fleet store needs a signing key"))?
            .encode();
        let published = self.publish_objects(record, bytes, &manifest).await?;
        if published == Publication::Published {
            self.announce(record, bytes, manifest).await;
        }
        Ok(published)
    }

    /// Copies a manifest the bucket now holds into the fleet's Redis, if it
    /// has one, so that waiting hosts learn of it without asking the
    /// bucket — relaying its artifact first if it is small, so that they
    /// fetch that without asking the bucket either. Best effort: a lost
    /// announcement costs watchers only time, a lost relay a bucket read.
    async fn announce(&self, record: &ArtifactRecord, bytes: &[u8], manifest: Vec<u8>) {
        let Some(redis) = &self.redis else { return };
        if bytes.len() as u64 <= RELAY_LIMIT {
            if let Err(error) = redis.relay(&self.names.artifact(&record.checksum), bytes, RELAY_TTL).await {
                self.pass_over(error);
            }
        }
        if let Err(error) = redis.put(&self.names.manifest(&record.cache_key), manifest).await {
            self.pass_over(error);
        }
    }

    /// Creates the artifact, then the manifest (encoded, signed), in the bucket.
    async fn publish_objects(&self, record: &ArtifactRecord, bytes: &[u8], manifest: &[u8]) -> Result<Publication> {
        let artifact = self.names.artifact(&record.checksum);
        if self.remote.create(&artifact, bytes.to_vec()).await? == Create::Exists {
            let intact = self.remote.get(&artifact, record.size_bytes).await?.bytes().is_some_and(|there| check_artifact(record, &there).is_ok());
            if !intact {
                self.count(FleetEvent::Refused(Refusal::ChecksumMismatch));
                self.remote.overwrite(&artifact, bytes.to_vec()).await?;
            }
        }
        let name = self.names.manifest(&record.cache_key);
        if self.remote.create(&name, manifest.to_vec()).await? == Create::Created {
            return Ok(Publication::Published);
        }
        // Another forge was first: its manifest stands if it verifies and
        // its artifact is intact; otherwise ours replaces it.
        let there = match self.remote.get(&name, SMALL_OBJECT_LIMIT).await? {
            Got::Bytes(bytes) => SharedManifest::verify(&bytes, &record.cache_key, &self.keys),
            Got::TooLarge => Err((Refusal::Malformed, String::new())),
            // Removed since (by an operator): ours goes in its place.
            Got::Missing => {
                return Ok(match self.remote.create(&name, manifest.to_vec()).await? {
                    Create::Created => Publication::Published,
                    Create::Exists => Publication::LostRace,
                })
            }
        };
        let winner = match there {
            Ok(winner) if winner.checksum == record.checksum => Ok(()),
            Ok(winner) => match self.remote.get(&self.names.artifact(&winner.checksum), winner.size_bytes).await? {
                Got::Bytes(bytes) => check_artifact(&winner, &bytes),
                Got::TooLarge => Err((Refusal::ChecksumMismatch, String::new())),
                Got::Missing => Err((Refusal::MissingArtifact, String::new())),
            },
            Err(refused) => Err(refused),
        };
        match winner {
            Ok(()) => Ok(Publication::LostRace),
            Err((refusal, _)) => {
                self.count(FleetEvent::Refused(refusal));
                self.remote.overwrite(&name, manifest.to_vec()).await?;
                Ok(Publication::Published)
            }
        }
    }

    /// Tries to claim a cache key for this forge's compile.
    pub fn claim(&self, cache_key: &str) -> Result<Claim> {
        let claimed = self.remote.run(lease::claim(self.lease_objects(), &self.names, cache_key, &self.holder, self.config.lease_ttl));
        self.claimed(claimed)
    }

    /// Claims a cache key only if its lease is unclaimed (one request);
    /// otherwise answers `Held` at generation 0 without reading it — the
    /// first watch finds out whether it is live (see [`Self::watch_many`]).
    pub fn claim_unclaimed(&self, cache_key: &str) -> Result<Claim> {
        let ttl = self.config.lease_ttl;
        let won = self.remote.run(lease::claim_unclaimed(self.lease_objects(), &self.names, cache_key, &self.holder, ttl));
        self.unclaimed_outcome(won)
    }

    /// Starts [`Self::claim_unclaimed`] in the background and returns at
    /// once, so that the request overlaps the caller's work (a forge
    /// claims its next jobs while the current ones compile);
    /// [`Self::finish_claim`] gives the outcome, [`Self::abandon_claim`]
    /// gives up a claim no longer wanted.
    pub fn start_claim(self: &Arc<Self>, cache_key: &str) -> PendingClaim {
        let (fleet, cache_key) = (Arc::clone(self), cache_key.to_string());
        let task = self.remote.spawn(async move {
            let ttl = fleet.config.lease_ttl;
            lease::claim_unclaimed(fleet.lease_objects(), &fleet.names, &cache_key, &fleet.holder, ttl).await
        });
        PendingClaim { task }
    }

    /// Waits for a claim started with [`Self::start_claim`]; answers as
    /// [`Self::claim_unclaimed`] does.
    pub fn finish_claim(&self, pending: PendingClaim) -> Result<Claim> {
        let won = self.remote.run(pending.task);
        let won = won.unwrap_or_else(|e| Err(Error::new(ErrorCode::Internal, format!("fleet claim task failed: {e}"))));
        self.unclaimed_outcome(won)
    }

    /// Gives up a claim started with [`Self::start_claim`], in the
    /// background (see [`Self::settle`]): a lease it won is removed.
    pub fn abandon_claim(self: &Arc<Self>, pending: PendingClaim) {
        let fleet = Arc::clone(self);
        self.in_background(async move {
            if let Ok(Ok(Some(lease))) = pending.task.await {
                fleet.release_counted(lease).await;
            }
        });
    }

    /// A claim of generation 0 as a [`Claim`], counted.
    fn unclaimed_outcome(&self, won: Result<Option<Lease>>) -> Result<Claim> {
        let ttl = self.config.lease_ttl;
        self.claimed(won.map(|won| match won {
            Some(lease) => Claim::Won { lease, took_over: false },
            None => Claim::Held { holder: String::new(), generation: 0, expires_in: ttl },
        }))
    }

    /// Counts a claim's outcome (and lets tests kill a forge that won one).
    fn claimed(&self, claimed: Result<Claim>) -> Result<Claim> {
        if matches!(claimed, Ok(Claim::Won { .. })) {
            // Tests kill a holder here: its lease must only delay the others.
            crate::sys::failpoint::hit("fleet.leased").map_err(|e| Error::io("fleet lease failpoint", e))?;
        }
        match &claimed {
            Ok(Claim::Won { took_over: true, .. }) => self.count(FleetEvent::LeaseTakeover),
            Ok(_) => {}
            Err(_) => self.count(FleetEvent::StoreError),
        }
        claimed
    }

    /// One generation of a cache key's lease, as it is now.
    pub fn lease_state(&self, cache_key: &str, generation: u64) -> Result<LeaseState> {
        let state = self.remote.run(lease::state(self.lease_objects(), &self.names, cache_key, generation));
        if state.is_err() {
            self.count(FleetEvent::StoreError);
        }
        state
    }

    /// Ends a lease in the background (see [`Self::settle`]): kept when
    /// the bucket holds its key (`published`), else given up — a failure
    /// to remove it is counted and only delays others until it expires.
    pub fn end_later(self: &Arc<Self>, lease: Lease, published: bool) {
        let fleet = Arc::clone(self);
        self.in_background(async move {
            if published {
                lease::keep(lease).await;
            } else {
                fleet.release_counted(lease).await;
            }
        });
    }

    /// Removes a lease; a failure is counted (it only delays others until
    /// the lease expires).
    async fn release_counted(&self, lease: Lease) {
        if lease::release(self.lease_objects(), &self.names, lease).await.is_err() {
            self.count(FleetEvent::StoreError);
        }
    }

    /// Runs lease work on the store's runtime, for [`Self::settle`] to wait on.
    fn in_background(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let task = self.remote.spawn(work);
        let mut releasing = self.releasing.lock().unwrap_or_else(|p| p.into_inner());
        releasing.retain(|t| !t.is_finished());
        releasing.push(task);
    }

    /// Waits until every lease ended with [`Self::end_later`] is kept or
    /// gone, and every claim given up with [`Self::abandon_claim`] undone.
    pub fn settle(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.releasing.lock().unwrap_or_else(|p| p.into_inner()));
        self.remote.run(async {
            for task in tasks {
                let _ = task.await;
            }
        });
    }

    /// Gives a lease up (best effort: an unreleased lease only delays
    /// others until it expires).
    pub fn release(&self, lease: Lease) -> Result<()> {
        let released = self.remote.run(lease::release(self.lease_objects(), &self.names, lease));
        if released.is_err() {
            self.count(FleetEvent::StoreError);
        }
        released
    }

    /// What the bucket holds, checked: every manifest read and verified
    /// against the trusted keys, and its artifact's presence and size
    /// checked against the listing (artifacts are not downloaded).
    pub fn survey(&self) -> Result<Survey> {
        let (manifests, artifacts) = self.remote.run(async {
            let manifests = self.remote.list(&self.names.manifests()).await?;
            let artifacts = self.remote.list(&self.names.artifacts()).await?;
            Ok::<_, Error>((manifests, artifacts))
        })?;
        let sizes: std::collections::HashMap<String, u64> = artifacts.iter().map(|a| (a.name.clone(), a.size)).collect();
        let mut survey = Survey {
            artifacts: artifacts.len(),
            artifact_bytes: artifacts.iter().map(|a| a.size).sum(),
            leases: self.leases()?,
            ..Survey::default()
        };
        let keys: Vec<String> = ObjectNames::manifest_keys(&manifests).map(str::to_string).collect();
        let reads = futures::stream::iter(keys.iter().map(|key| async move {
            (key, self.remote.get(&self.names.manifest(key), SMALL_OBJECT_LIMIT).await)
        }))
        .buffered(CONCURRENT_REQUESTS);
        let read: Vec<_> = self.remote.run(reads.collect());
        for (key, bytes) in read {
            survey.manifests += 1;
            let bytes = match bytes? {
                Got::Bytes(bytes) => bytes,
                Got::TooLarge => {
                    *survey.refused.entry(Refusal::Malformed).or_default() += 1;
                    continue;
                }
                Got::Missing => {
                    survey.manifests -= 1;
                    continue;
                }
            };
            let checked = SharedManifest::verify(&bytes, key, &self.keys).and_then(|record| {
                match sizes.get(&self.names.artifact(&record.checksum)) {
                    None => Err((Refusal::MissingArtifact, String::new())),
                    Some(&size) if size < record.size_bytes => Err((Refusal::Truncated, String::new())),
                    Some(&size) if size != record.size_bytes => Err((Refusal::ChecksumMismatch, String::new())),
                    Some(_) => Ok(record),
                }
            });
            match checked {
                Ok(record) => survey.verified.push(record.blueprint_id),
                Err((refusal, _)) => *survey.refused.entry(refusal).or_default() += 1,
            }
        }
        survey.verified.sort();
        Ok(survey)
    }

    /// The leases of keys the bucket holds no manifest of (claims not
    /// fulfilled yet: a holder that published keeps its lease): cache key,
    /// holder, time left (zero once expired).
    pub fn leases(&self) -> Result<Vec<(String, LeaseBody, Duration)>> {
        self.remote.run(async {
            let listed = self.lease_objects().list(&self.names.leases()).await?;
            let manifests = self.remote.list(&self.names.manifests()).await?;
            let published: HashSet<&str> = ObjectNames::manifest_keys(&manifests).collect();
            let mut out = Vec::new();
            for object in listed {
                let Some(rest) = object.name.strip_prefix(&self.names.leases()) else { continue };
                let Some((key, _)) = rest.split_once('/') else { continue };
                if published.contains(key) {
                    continue;
                }
                if let Got::Bytes(bytes) = self.lease_objects().get(&object.name, SMALL_OBJECT_LIMIT).await? {
                    if let Ok(body) = serde_json::from_slice::<LeaseBody>(&bytes) {
                        let left = Duration::from_millis(body.expires_at_ms.saturating_sub(lease::now_ms()));
                        out.push((key.to_string(), body, left));
                    }
                }
            }
            Ok(out)
        })
    }
}
