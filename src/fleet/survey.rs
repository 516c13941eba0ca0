//! What the bucket holds, checked (for `tezzeret fleet-status`): every
//! manifest verified, its artifact's presence and size checked against a
//! listing, and the claims not fulfilled yet.
use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;

use super::lease::{self, LeaseBody};
use super::manifest::{Refusal, SharedManifest};
use super::member::{Fleet, CONCURRENT_REQUESTS};
use super::objects::ObjectNames;
use super::remote::{Got, SMALL_OBJECT_LIMIT};
use crate::base::error::{Error, Result};

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

impl Fleet {
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
