//! What the state directory records about one artifact: its record (the
//! manifest file's content and the journal's commit) and the manifest
//! facts that are signed.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::layout::StateLayout;
use crate::base::hex;
use crate::build::guard_spec::GuardSpec;

/// The sha256 (hex) of artifact bytes: their checksum and content address.
pub fn checksum_of(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes))
}

/// What the store knows about one blueprint's current artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The blueprint.
    pub blueprint_id: String,
    /// The blueprint's name.
    pub name: String,
    /// sha256 hex of the descriptor's canonical encoding.
    pub descriptor_hash: String,
    /// Parameter values compiled with.
    pub params: BTreeMap<String, f64>,
    /// Strategy name.
    pub strategy: String,
    /// Pipeline variant that produced the bytes.
    pub variant: String,
    /// Device name.
    pub device: String,
    /// Cache key.
    pub cache_key: String,
    /// File name inside the store's `artifacts/` directory.
    pub artifact_file: String,
    /// sha256 hex of the artifact file.
    pub checksum: String,
    /// Artifact size in bytes.
    pub size_bytes: u64,
    /// Input guards.
    pub guard_spec: GuardSpec,
    /// Digest of the guard spec.
    pub guard_digest: String,
    /// Validated at several batch sizes: accepts any size in dim 0.
    #[serde(default)]
    pub dynamic_batch: bool,
    /// Compile wall time, ms.
    pub compile_ms: f64,
    /// Pre-warm median, ms.
    pub prewarm_p50_ms: f64,
    /// Pre-warm 95th percentile, ms.
    pub prewarm_p95_ms: f64,
    /// Library version that compiled it.
    pub tezzeret_version: String,
    /// Torch version it was compiled with.
    pub torch_version: String,
    /// Artifact format version.
    pub format_version: u32,
    /// Per-blueprint revision: increases each time a changed input is recompiled.
    #[serde(default)]
    pub revision: u64,
    /// ed25519 signature of the artifact's manifest, when signing is configured.
    #[serde(default)]
    pub signature: Option<ManifestSignature>,
}

impl ArtifactRecord {
    /// Fills in what the artifact's bytes determine: checksum, content-addressed
    /// file name and size (the signature, over these, comes after).
    pub fn describe_bytes(&mut self, bytes: &[u8]) {
        self.checksum = checksum_of(bytes);
        self.artifact_file = StateLayout::artifact_file_name(&self.checksum);
        self.size_bytes = bytes.len() as u64;
    }
}

/// The signed facts about an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Artifact format version.
    pub artifact_format_version: u32,
    /// sha256 hex of the artifact file.
    pub artifact_sha256: String,
    /// The blueprint.
    pub blueprint_id: String,
    /// Device it runs on.
    pub device: String,
    /// Guard digest.
    pub guard_digest: String,
    /// Per-blueprint revision: increases each time a changed input is recompiled.
    pub revision: u64,
    /// Strategy.
    pub strategy: String,
    /// Library version that compiled it.
    pub tezzeret_version: String,
    /// Torch version it was compiled with.
    pub torch_version: String,
    /// Winning pipeline variant.
    pub variant: String,
}

impl Manifest {
    /// The manifest of a stored artifact.
    pub fn of(record: &ArtifactRecord) -> Self {
        Manifest {
            artifact_format_version: record.format_version,
            artifact_sha256: record.checksum.clone(),
            blueprint_id: record.blueprint_id.clone(),
            device: record.device.clone(),
            guard_digest: record.guard_digest.clone(),
            revision: record.revision,
            strategy: record.strategy.clone(),
            tezzeret_version: record.tezzeret_version.clone(),
            torch_version: record.torch_version.clone(),
            variant: record.variant.clone(),
        }
    }

    /// The bytes that are signed: compact JSON, keys in sorted order (the
    /// struct's fields are declared sorted; a unit test holds them so).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifests serialise")
    }
}

/// A signature over a manifest, with the public key that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSignature {
    /// Hex of the signer's ed25519 public key (32 bytes).
    pub public_key: String,
    /// Hex of the ed25519 signature (64 bytes).
    pub signature: String,
}


#[cfg(test)]
mod tests {
    use super::Manifest;

    #[test]
    fn canonical_bytes_are_compact_json_with_sorted_keys() {
        let m = Manifest {
            artifact_format_version: 1,
            artifact_sha256: "a".into(),
            blueprint_id: "b".into(),
            device: "cpu".into(),
            guard_digest: "d".into(),
            revision: 2,
            strategy: "s".into(),
            tezzeret_version: "t".into(),
            torch_version: "u".into(),
            variant: "v".into(),
        };
        // json.dumps(m, sort_keys=True, separators=(",", ":")) of the same dict.
        let expected = concat!(
            r#"{"artifact_format_version":1,"artifact_sha256":"a","blueprint_id":"b","device":"cpu","#,
            r#""guard_digest":"d","revision":2,"strategy":"s","tezzeret_version":"t","torch_version":"u","variant":"v"}"#
        );
        assert_eq!(String::from_utf8(m.canonical_bytes()).unwrap(), expected);
    }
}
