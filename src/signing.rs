//! Signing and versioning of artifacts (SPEC R11).
//!
//! Each artifact has a [`Manifest`] (what it is, from which versions, at
//! which per-blueprint revision) signed with ed25519 over its canonical
//! bytes: JSON with keys sorted and no spaces — exactly what Python's
//! `json.dumps(manifest, sort_keys=True, separators=(",", ":"))` writes, so
//! any ed25519 implementation can check it. When trusted public keys are
//! configured, every use of an artifact is verified; rotation is adding the
//! new key to the trusted set (older artifacts keep verifying) and removing
//! the old one retires its artifacts.
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::guard::hex;
use crate::store::ArtifactRecord;
use crate::{Error, ErrorCode, Result};

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
    /// Guard digest (SPEC §7).
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

fn unhex<const N: usize>(text: &str, what: &str) -> Result<[u8; N]> {
    let bytes: Option<Vec<u8>> = (text.len() == 2 * N)
        .then(|| text.as_bytes().chunks(2).map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()).collect())
        .flatten();
    bytes.and_then(|b| b.try_into().ok()).ok_or_else(|| Error::invalid(format!("{what} is not {N} bytes of hex")))
}

/// The keys a forge signs and verifies with.
#[derive(Clone, Default)]
pub struct KeyRing {
    signing: Option<SigningKey>,
    trusted: Vec<VerifyingKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret key.
        f.debug_struct("KeyRing")
            .field("signing", &self.signing.as_ref().map(|k| hex(k.verifying_key().as_bytes())))
            .field("trusted", &self.trusted.iter().map(|k| hex(k.as_bytes())).collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// A key ring from a 32-byte secret seed (optional) and trusted public keys.
    pub fn new(signing_seed: Option<[u8; 32]>, trusted: &[[u8; 32]]) -> Result<Self> {
        let trusted = trusted
            .iter()
            .enumerate()
            .map(|(i, k)| VerifyingKey::from_bytes(k).map_err(|e| Error::invalid(format!("trusted key {i} is not an ed25519 public key: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyRing { signing: signing_seed.map(|s| SigningKey::from_bytes(&s)), trusted })
    }

    /// Whether artifacts are verified (trusted keys are configured).
    pub fn verifies(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Whether artifacts are signed.
    pub fn signs(&self) -> bool {
        self.signing.is_some()
    }

    /// Signs a manifest (None without a signing key).
    pub fn sign(&self, manifest: &Manifest) -> Option<ManifestSignature> {
        let key = self.signing.as_ref()?;
        let signature = key.sign(&manifest.canonical_bytes());
        Some(ManifestSignature { public_key: hex(key.verifying_key().as_bytes()), signature: hex(&signature.to_bytes()) })
    }

    /// Verifies a record's signature against the trusted keys (a no-op when
    /// none are configured). Errors start with `signature_invalid:` and say
    /// why: unsigned, unknown key, or a signature that does not match (a
    /// changed manifest field or artifact).
    pub fn verify(&self, record: &ArtifactRecord) -> Result<()> {
        if !self.verifies() {
            return Ok(());
        }
        let id = &record.blueprint_id;
        let refuse = |why: String| Err(Error::new(ErrorCode::Corrupt, format!("signature_invalid: artifact of {id} {why}")));
        let Some(signed) = &record.signature else { return refuse("is unsigned".into()) };
        let public: [u8; 32] = match unhex(&signed.public_key, "public key") {
            Ok(k) => k,
            Err(_) => return refuse("carries a malformed public key".into()),
        };
        let Some(key) = self.trusted.iter().find(|k| k.as_bytes() == &public) else {
            return refuse(format!("is signed by an untrusted key {}", &signed.public_key));
        };
        let signature: [u8; 64] = match unhex(&signed.signature, "signature") {
            Ok(s) => s,
            Err(_) => return refuse("carries a malformed signature".into()),
        };
        match key.verify(&Manifest::of(record).canonical_bytes(), &Signature::from_bytes(&signature)) {
            Ok(()) => Ok(()),
            Err(_) => refuse("has a signature that does not match its manifest (tampered)".into()),
        }
    }
}

/// Creates a key pair: the secret seed (hex) in `path`, mode 0600, and the
/// public key (hex) in `path.pub`. Returns the public key.
pub fn keygen(path: &Path) -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(&crate::wal::log::random_bytes());
    seed[16..].copy_from_slice(&crate::wal::log::random_bytes());
    let key = SigningKey::from_bytes(&seed);
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("create key file {}", path.display()), e))?;
    writeln!(file, "{}", hex(&seed)).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    let public = *key.verifying_key().as_bytes();
    let pub_path = path.with_extension(match path.extension() {
        Some(ext) => format!("{}.pub", ext.to_string_lossy()),
        None => "pub".to_string(),
    });
    std::fs::write(&pub_path, format!("{}\n", hex(&public))).map_err(|e| Error::io(format!("write {}", pub_path.display()), e))?;
    Ok(public)
}

/// Reads a 32-byte key (hex, whitespace ignored) from a key file.
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read key file {}", path.display()), e))?;
    unhex(text.trim(), &format!("key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::Manifest;

    #[test]
    fn canonical_bytes_have_sorted_keys() {
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
        let value: serde_json::Value = serde_json::from_slice(&m.canonical_bytes()).unwrap();
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        assert!(text.starts_with("{\"artifact_format_version\":1,\"artifact_sha256\":\"a\""), "{text}");
    }
}
