//! The manifest as the fleet shares it, and the checks a reader makes
//! before trusting anything the bucket holds.
//!
//! The bucket is untrusted storage (as a Nix binary cache is): a shared
//! manifest is the artifact's complete record plus one ed25519 signature
//! over all of it — cache key, parameters and guard spec included, so that
//! a valid manifest cannot be replayed under another cache key — and the
//! artifact is accepted only if its bytes hash to the record's sha256.
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::base::version::ARTIFACT_FORMAT_VERSION;
use crate::state::artifact::{checksum_of, ArtifactRecord, ManifestSignature};
use crate::state::signing::{KeyRing, SignatureProblem};

/// What the signature of a shared manifest covers, before the record's JSON.
const SIGNED_PREFIX: &[u8] = b"tezzeret shared manifest v1\n";

/// A manifest in the fleet's bucket. The record stays the exact JSON
/// bytes that were signed (no re-encoding can change what is checked).
#[derive(Debug, Serialize, Deserialize)]
pub struct SharedManifest {
    /// The artifact's record, as the publishing forge stored it.
    record: Box<RawValue>,
    /// The publisher's signature over [`SIGNED_PREFIX`] and the record's bytes.
    signature: ManifestSignature,
}

/// Why something the bucket holds was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// The manifest is not a readable shared manifest.
    Malformed,
    /// Its signature is by a key this forge does not trust.
    UntrustedKey,
    /// Its signature does not match its content (it was changed).
    BadSignature,
    /// It describes another cache key, blueprint or artifact format.
    WrongManifest,
    /// The manifest names an artifact the bucket does not hold.
    MissingArtifact,
    /// The artifact is shorter than the manifest says.
    Truncated,
    /// The artifact's bytes do not hash to the manifest's sha256.
    ChecksumMismatch,
}

impl Refusal {
    /// Every refusal, in the order metrics list them.
    pub const ALL: [Refusal; 7] = [
        Refusal::Malformed,
        Refusal::UntrustedKey,
        Refusal::BadSignature,
        Refusal::WrongManifest,
        Refusal::MissingArtifact,
        Refusal::Truncated,
        Refusal::ChecksumMismatch,
    ];

    /// The reason's name in logs, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UntrustedKey => "untrusted_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::WrongManifest => "wrong_manifest",
            Refusal::MissingArtifact => "missing_artifact",
            Refusal::Truncated => "truncated",
            Refusal::ChecksumMismatch => "checksum_mismatch",
        }
    }
}

impl SharedManifest {
    /// Signs a stored record for the fleet (None without a signing key).
    pub fn sign(record: &ArtifactRecord, keys: &KeyRing) -> Option<Self> {
        let record = serde_json::value::to_raw_value(record).expect("records serialise");
        let signature = keys.sign_bytes(&signed_bytes(&record))?;
        Some(SharedManifest { record, signature })
    }

    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifests serialise")
    }

    /// Reads a manifest and checks it: readable, signed by a trusted key
    /// over exactly this content (the record's own artifact signature too),
    /// and describing `cache_key` in this library's artifact format.
    /// Returns the record, and a sentence saying what was wrong otherwise.
    pub fn verify(bytes: &[u8], cache_key: &str, keys: &KeyRing) -> Result<ArtifactRecord, (Refusal, String)> {
        let manifest: SharedManifest =
            serde_json::from_slice(bytes).map_err(|e| (Refusal::Malformed, format!("manifest of {cache_key} is unreadable: {e}")))?;
        keys.check(&manifest.signature, &signed_bytes(&manifest.record)).map_err(|problem| {
            let refusal = match problem {
                SignatureProblem::UntrustedKey => Refusal::UntrustedKey,
                SignatureProblem::MalformedKey | SignatureProblem::MalformedSignature => Refusal::Malformed,
                SignatureProblem::Mismatch => Refusal::BadSignature,
            };
            (refusal, format!("manifest of {cache_key} signed by key {}: {problem:?}", manifest.signature.public_key))
        })?;
        let record: ArtifactRecord = serde_json::from_str(manifest.record.get())
            .map_err(|e| (Refusal::Malformed, format!("record in the manifest of {cache_key} is unreadable: {e}")))?;
        keys.verify(&record).map_err(|e| (Refusal::BadSignature, e.message().to_string()))?;
        if record.cache_key != cache_key || record.format_version != ARTIFACT_FORMAT_VERSION {
            return Err((
                Refusal::WrongManifest,
                format!(
                    "manifest under {cache_key} describes cache key {} in artifact format {} (expected {ARTIFACT_FORMAT_VERSION})",
                    record.cache_key, record.format_version
                ),
            ));
        }
        Ok(record)
    }
}

/// Checks downloaded artifact bytes against their verified record.
pub fn check_artifact(record: &ArtifactRecord, bytes: &[u8]) -> Result<(), (Refusal, String)> {
    let id = &record.blueprint_id;
    if (bytes.len() as u64) < record.size_bytes {
        return Err((Refusal::Truncated, format!("artifact of {id} is {} bytes, its manifest says {}", bytes.len(), record.size_bytes)));
    }
    let actual = checksum_of(bytes);
    if actual != record.checksum || bytes.len() as u64 != record.size_bytes {
        return Err((Refusal::ChecksumMismatch, format!("artifact of {id} has sha256 {actual}, its manifest says {}", record.checksum)));
    }
    Ok(())
}

/// The bytes a shared manifest's signature covers.
fn signed_bytes(record: &RawValue) -> Vec<u8> {
    let mut bytes = SIGNED_PREFIX.to_vec();
    bytes.extend(record.get().as_bytes());
    bytes
}
