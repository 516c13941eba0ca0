//! Publishing what this host compiled: the artifact, then its signed
//! manifest, each created only if absent (a race lost to another host's
//! intact copy is fine), then, with a Redis, announced there and a small
//! artifact relayed for the hosts waiting on it.
use std::sync::Arc;
use std::time::Duration;

use super::lease;
use super::manifest::{check_artifact, Refusal, SharedManifest};
use super::member::Fleet;
use super::remote::{Create, Got, SMALL_OBJECT_LIMIT};
use super::stats::FleetEvent;
use crate::base::error::{Error, ErrorCode, Result};
use crate::state::artifact::ArtifactRecord;

/// Artifacts up to this size are relayed through the fleet's Redis when
/// they are published, so that waiting hosts fetch them without asking
/// the bucket (larger ones come from the bucket only).
pub const RELAY_LIMIT: u64 = 256 << 10;

/// How long Redis keeps a relayed artifact: enough for the hosts waiting
/// on its publication; later ones fetch it from the bucket. Redis thus
/// holds at most what was published in the last five minutes, each copy
/// no larger than [`RELAY_LIMIT`].
pub const RELAY_TTL: Duration = Duration::from_secs(300);

/// What publishing an artifact did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publication {
    /// Artifact and manifest are ours.
    Published,
    /// Another forge's verified manifest was there first (our artifact is
    /// stored too, so its reference resolves).
    LostRace,
    /// A manifest this forge refused was there (damaged, or signed by a
    /// key it does not trust): ours replaced it. Hosts that trust its
    /// signer but not this forge's key will refuse ours in turn.
    Replaced(Refusal, String),
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

impl Fleet {
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
            Ok(Publication::Published | Publication::Replaced(..)) => self.count(FleetEvent::Published),
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
        if matches!(published, Publication::Published | Publication::Replaced(..)) {
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
            // Of another blueprint (sharing the cache key): no use to ours.
            Ok(winner) if winner.blueprint_id != record.blueprint_id => {
                Err((Refusal::WrongManifest, format!("the bucket's manifest is of {}", winner.blueprint_id)))
            }
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
            Err((refusal, why)) => {
                self.count(FleetEvent::Refused(refusal));
                self.remote.overwrite(&name, manifest.to_vec()).await?;
                Ok(Publication::Replaced(refusal, why))
            }
        }
    }
}
