//! Signing and versioning of artifacts.
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

use super::artifact::{ArtifactRecord, Manifest, ManifestSignature};
use crate::base::error::{Error, ErrorCode, FailureReason, Result};
use crate::base::hex::{decode_array, encode as hex};
use crate::sys::random;

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
    /// A key ring from a 32-byte secret seed (optional) and trusted public
    /// keys. With both, the signing key's public half must be trusted:
    /// otherwise everything it signs would be refused, by this forge too.
    pub fn new(signing_seed: Option<[u8; 32]>, trusted: &[[u8; 32]]) -> Result<Self> {
        let trusted = trusted
            .iter()
            .enumerate()
            .map(|(i, k)| VerifyingKey::from_bytes(k).map_err(|e| Error::invalid(format!("trusted key {i} is not an ed25519 public key: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        let signing = signing_seed.map(|s| SigningKey::from_bytes(&s));
        if let Some(key) = signing.as_ref().filter(|_| !trusted.is_empty()) {
            let public = key.verifying_key();
            if !trusted.contains(&public) {
                return Err(Error::invalid(format!(
                    "the signing key's public key {} is not among the trusted keys: what it signs would be refused, \
                     here too (trust it, or check that the signing key is the secret key, not a public one)",
                    hex(public.as_bytes())
                )));
            }
        }
        Ok(KeyRing { signing, trusted })
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

    /// Signs a complete record's manifest in place (clears the signature
    /// without a signing key).
    pub fn sign_record(&self, record: &mut ArtifactRecord) {
        record.signature = self.sign(&Manifest::of(record));
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
        let refuse =
            |why: String| Err(Error::failure(ErrorCode::Corrupt, FailureReason::SignatureInvalid, format!("artifact of {id} {why}")));
        let Some(signed) = &record.signature else { return refuse("is unsigned".into()) };
        match self.check(signed, &Manifest::of(record).canonical_bytes()) {
            Ok(()) => Ok(()),
            Err(SignatureProblem::MalformedKey) => refuse("carries a malformed public key".into()),
            Err(SignatureProblem::UntrustedKey) => refuse(format!("is signed by an untrusted key {}", &signed.public_key)),
            Err(SignatureProblem::MalformedSignature) => refuse("carries a malformed signature".into()),
            Err(SignatureProblem::Mismatch) => refuse("has a signature that does not match its manifest (tampered)".into()),
        }
    }

    /// Whether a record carries a well-formed signature by a key that is
    /// not trusted: retired by a key rotation, rather than unsigned or
    /// changed since it was signed.
    pub fn signed_by_untrusted_key(&self, record: &ArtifactRecord) -> bool {
        let manifest = Manifest::of(record).canonical_bytes();
        record.signature.as_ref().is_some_and(|signed| self.check(signed, &manifest) == Err(SignatureProblem::UntrustedKey))
    }

    /// Signs arbitrary bytes (None without a signing key).
    pub fn sign_bytes(&self, bytes: &[u8]) -> Option<ManifestSignature> {
        let key = self.signing.as_ref()?;
        Some(ManifestSignature { public_key: hex(key.verifying_key().as_bytes()), signature: hex(&key.sign(bytes).to_bytes()) })
    }

    /// Checks a signature over `bytes` against the trusted keys.
    pub fn check(&self, signed: &ManifestSignature, bytes: &[u8]) -> std::result::Result<(), SignatureProblem> {
        let public: [u8; 32] = decode_array(&signed.public_key, "public key").map_err(|_| SignatureProblem::MalformedKey)?;
        let key = self.trusted.iter().find(|k| k.as_bytes() == &public).ok_or(SignatureProblem::UntrustedKey)?;
        let signature: [u8; 64] = decode_array(&signed.signature, "signature").map_err(|_| SignatureProblem::MalformedSignature)?;
        key.verify(bytes, &Signature::from_bytes(&signature)).map_err(|_| SignatureProblem::Mismatch)
    }
}

/// Why a signature is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureProblem {
    /// The public key is not 32 bytes of hex.
    MalformedKey,
    /// The key is not among the trusted ones.
    UntrustedKey,
    /// The signature is not 64 bytes of hex.
    MalformedSignature,
    /// The signature does not match the bytes (they were changed).
    Mismatch,
}

/// A new ed25519 key pair from the OS random generator (no fallback):
/// the 32-byte secret seed and the 32-byte public key.
pub fn generate_keypair() -> Result<([u8; 32], [u8; 32])> {
    let seed: [u8; 32] = random::bytes().map_err(|e| Error::io("draw a signing key from the OS random generator", e))?;
    Ok((seed, SigningKey::from_bytes(&seed).verifying_key().to_bytes()))
}

/// Creates a key pair: the secret seed (hex) in `path`, mode 0600, and the
/// public key (hex) in `path.pub`. Returns the public key. The seed comes
/// from the operating system's random generator; if that fails, so does
/// this (no key is written).
pub fn keygen(path: &Path) -> Result<[u8; 32]> {
    let (seed, _) = generate_keypair()?;
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
    // Durable before it is used: a key lost to a power loss would leave
    // artifacts signed by a key nobody holds.
    file.sync_all().map_err(|e| Error::io(format!("fsync {}", path.display()), e))?;
    let public = *key.verifying_key().as_bytes();
    let pub_path = path.with_extension(match path.extension() {
        Some(ext) => format!("{}.pub", ext.to_string_lossy()),
        None => "pub".to_string(),
    });
    crate::sys::fs::durable_write(&pub_path, format!("{}\n", hex(&public)).as_bytes())?;
    Ok(public)
}

/// Reads a 32-byte key (hex, whitespace ignored) from a key file.
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read key file {}", path.display()), e))?;
    decode_array(text.trim(), &format!("key file {}", path.display())).map_err(|e| Error::invalid(e.message()))
}
