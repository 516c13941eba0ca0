//! What the bucket holds, checked (for `tezzeret fleet-status`): every
//! manifest verified, its artifact's presence and size checked against a
//! listing (or the artifact downloaded and hashed), and the claims not
//! fulfilled yet.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;

use super::lease::{self, LeaseBody};
use super::manifest::{check_artifact, Refusal, SharedManifest};
use super::member::{Fleet, CONCURRENT_REQUESTS};
use super::objects::ObjectNames;
use super::remote::{Got, SMALL_OBJECT_LIMIT};
use crate::base::error::{Error, Result};
use crate::state::artifact::ArtifactRecord;

/// How a survey checks the artifact a verified manifest names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactCheck {
    /// Its presence and size, from a listing of the bucket: cheap, but
    /// blind to bytes changed in place.
    Listed,
    /// Downloaded and its sha256 compared with the manifest's, as a
    /// forge does before it adopts it.
    Downloaded,
}

/// What the bucket holds (see [`Fleet::survey`]).
#[derive(Debug, Clone)]
pub struct Survey {
    /// How its artifacts were checked.
    pub check: ArtifactCheck,
    /// Manifests read.
    pub manifests: usize,
    /// Blueprints whose manifest verifies and whose artifact passed the
    /// check, sorted.
    pub verified: Vec<String>,
    /// The same, as cache key → the artifact's sha256.
    pub verified_artifacts: BTreeMap<String, String>,
    /// Manifests refused, by reason.
    pub refused: BTreeMap<Refusal, usize>,
    /// Each refused manifest: its cache key, the reason, and what was wrong.
    pub refused_keys: Vec<(String, Refusal, String)>,
    /// Artifact objects.
    pub artifacts: usize,
    /// Their bytes.
    pub artifact_bytes: u64,
    /// Leases: cache key, content, time left (zero once expired).
    pub leases: Vec<(String, LeaseBody, Duration)>,
}

impl Survey {
    fn refuse(&mut self, key: &str, refusal: Refusal, why: String) {
        *self.refused.entry(refusal).or_default() += 1;
        self.refused_keys.push((key.to_string(), refusal, why));
    }
}

impl Fleet {
    /// What the bucket holds, checked: every manifest read and verified
    /// against the trusted keys, and its artifact checked as `check` says.
    pub fn survey(&self, check: ArtifactCheck) -> Result<Survey> {
        let (manifests, artifacts) = self.remote.run(async {
            let manifests = self.remote.list(&self.names.manifests()).await?;
            let artifacts = self.remote.list(&self.names.artifacts()).await?;
            Ok::<_, Error>((manifests, artifacts))
        })?;
        let sizes: HashMap<String, u64> = artifacts.iter().map(|a| (a.name.clone(), a.size)).collect();
        let mut survey = Survey {
            check,
            manifests: 0,
            verified: Vec::new(),
            verified_artifacts: BTreeMap::new(),
            refused: BTreeMap::new(),
            refused_keys: Vec::new(),
            artifacts: artifacts.len(),
            artifact_bytes: artifacts.iter().map(|a| a.size).sum(),
            leases: self.leases()?,
        };
        let keys: Vec<String> = ObjectNames::manifest_keys(&manifests).map(str::to_string).collect();
        let reads = futures::stream::iter(keys.iter().map(|key| async move {
            (key, self.remote.get(&self.names.manifest(key), SMALL_OBJECT_LIMIT).await)
        }))
        .buffered(CONCURRENT_REQUESTS);
        let read: Vec<_> = self.remote.run(reads.collect());
        let mut listed_ok: Vec<(&String, ArtifactRecord)> = Vec::new();
        for (key, bytes) in read {
            let bytes = match bytes? {
                Got::Bytes(bytes) => bytes,
                Got::TooLarge => {
                    survey.manifests += 1;
                    survey.refuse(key, Refusal::Malformed, format!("manifest of {key} is over {SMALL_OBJECT_LIMIT} bytes"));
                    continue;
                }
                // Removed since the listing.
                Got::Missing => continue,
            };
            survey.manifests += 1;
            let checked = SharedManifest::verify(&bytes, key, &self.keys).and_then(|record| {
                let id = &record.blueprint_id;
                match sizes.get(&self.names.artifact(&record.checksum)) {
                    None => Err((Refusal::MissingArtifact, format!("artifact of {id} is not in the bucket"))),
                    Some(&size) if size != record.size_bytes => {
                        // Short: cut off; long: other bytes (so another sha256).
                        let refusal = if size < record.size_bytes { Refusal::Truncated } else { Refusal::ChecksumMismatch };
                        Err((refusal, format!("artifact of {id} is {size} bytes, its manifest says {}", record.size_bytes)))
                    }
                    Some(_) => Ok(record),
                }
            });
            match checked {
                Ok(record) => listed_ok.push((key, record)),
                Err((refusal, why)) => survey.refuse(key, refusal, why),
            }
        }
        let checked: Vec<(&String, ArtifactRecord, std::result::Result<(), (Refusal, String)>)> = match check {
            ArtifactCheck::Listed => listed_ok.into_iter().map(|(key, record)| (key, record, Ok(()))).collect(),
            ArtifactCheck::Downloaded => {
                let downloads = futures::stream::iter(listed_ok.into_iter().map(|(key, record)| async move {
                    let got = self.remote.get(&self.names.artifact(&record.checksum), record.size_bytes.saturating_add(1)).await;
                    let outcome = got.map(|got| match got {
                        Got::Bytes(bytes) => check_artifact(&record, &bytes),
                        Got::Missing => Err((Refusal::MissingArtifact, format!("artifact of {} is not in the bucket", record.blueprint_id))),
                        Got::TooLarge => Err((
                            Refusal::ChecksumMismatch,
                            format!("artifact of {} is over the {} bytes its manifest says", record.blueprint_id, record.size_bytes),
                        )),
                    });
                    (key, record, outcome)
                }))
                .buffered(CONCURRENT_REQUESTS);
                let downloaded: Vec<_> = self.remote.run(downloads.collect());
                let mut out = Vec::with_capacity(downloaded.len());
                for (key, record, outcome) in downloaded {
                    out.push((key, record, outcome?));
                }
                out
            }
        };
        for (key, record, outcome) in checked {
            match outcome {
                Ok(()) => {
                    survey.verified_artifacts.insert(key.clone(), record.checksum);
                    survey.verified.push(record.blueprint_id);
                }
                Err((refusal, why)) => survey.refuse(key, refusal, why),
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
