//! Finding what other hosts published: a cache key's manifest, verified,
//! and its artifact, checked — from the fleet's Redis (announcements and
//! relayed artifacts) when it has one, else, or when that gives nothing
//! usable, from the bucket; and watching keys other hosts hold the lease of.
use std::collections::HashSet;
use std::sync::atomic::Ordering;

use futures::StreamExt;

use super::lease::{self, LeaseState};
use super::manifest::{check_artifact, Refusal, SharedManifest};
use super::member::{Fleet, CONCURRENT_REQUESTS};
use super::objects::ObjectNames;
use super::publish::RELAY_LIMIT;
use super::remote::{Got, SMALL_OBJECT_LIMIT};
use super::stats::FleetEvent;
use crate::base::error::{Error, Result};
use crate::state::artifact::ArtifactRecord;

/// From how many watched keys on one listing of the manifests is cheaper
/// than a lookup per key (a listing costs a store about two reads).
const WATCH_BY_LISTING: usize = 3;

/// The most manifests a watch lists; a larger bucket is watched key by key.
const WATCH_LISTING_LIMIT: usize = 1000;

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

impl Fleet {
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
    pub(super) fn announced_listing(&self, limit: usize) -> (Result<Option<HashSet<String>>>, bool) {
        let Some(redis) = &self.redis else { return (self.published_keys(limit), true) };
        match self.remote.run(redis.list_up_to(&self.names.manifests(), limit)) {
            Ok(listed) => (Ok(listed.map(|copies| ObjectNames::manifest_keys(&copies).map(str::to_string).collect())), true),
            Err(error) => {
                self.pass_over(error);
                (self.published_keys(limit), false)
            }
        }
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
        // A copy found counts as a hit once the forge adopted it.
        match &found {
            Lookup::Refused(refusal, _) => self.count(FleetEvent::Refused(*refusal)),
            Lookup::Unavailable(_) => self.count(FleetEvent::StoreError),
            Lookup::Found(..) | Lookup::Missing => {}
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
}
