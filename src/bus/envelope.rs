//! Stream entries as Esper writes them: field `payload` holds the bytes of
//! a Leyline `BusEnvelope`, and with a shared secret field `signature`
//! holds base64 (standard, padded) of HMAC-SHA256(secret, payload).
use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::base::leyline::{self, BusEnvelope, BusMessageType};

/// Field holding the envelope bytes.
pub const PAYLOAD_FIELD: &str = "payload";
/// Field holding the envelope's signature.
pub const SIGNATURE_FIELD: &str = "signature";
/// Envelope attribute with a message's stable id (duplicates share it).
pub const MESSAGE_ID: &str = "message_id";

/// The envelope attributes every message of ours carries: its stable id
/// and the subsystem it comes from.
pub fn attributes(message_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(MESSAGE_ID.to_string(), message_id.to_string()), ("source_subsystem".to_string(), "tezzeret".to_string())])
}

/// The fields of one entry to add to a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Envelope bytes.
    pub payload: Vec<u8>,
    /// Base64 signature, when a secret is set.
    pub signature: Option<String>,
}

fn mac(secret: &[u8], bytes: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(bytes);
    mac
}

/// Wraps a Leyline message into an envelope and signs it.
pub fn seal(
    message_type: BusMessageType,
    payload: Vec<u8>,
    attributes: BTreeMap<String, String>,
    secret: Option<&[u8]>,
) -> Sealed {
    let envelope = leyline::encode(&BusEnvelope { message_type: message_type as i32, payload, attributes });
    let signature = secret.map(|s| STANDARD.encode(mac(s, &envelope).finalize().into_bytes()));
    Sealed { payload: envelope, signature }
}

/// Why an entry was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// No `payload` field.
    MissingPayload,
    /// A secret is set and the entry has no signature.
    SignatureMissing,
    /// The signature does not match.
    SignatureInvalid,
    /// The payload is not a `BusEnvelope`.
    MalformedEnvelope,
    /// The envelope holds another message type than expected.
    UnexpectedType,
    /// The inner message does not decode.
    MalformedMessage,
    /// A required field of the inner message is empty.
    MissingField,
    /// A prefetch request older than the freshness window.
    Stale,
    /// A prefetch request id seen before.
    Replayed,
}

impl Refusal {
    /// Every refusal, for counters.
    pub const ALL: [Refusal; 9] = [
        Refusal::MissingPayload,
        Refusal::SignatureMissing,
        Refusal::SignatureInvalid,
        Refusal::MalformedEnvelope,
        Refusal::UnexpectedType,
        Refusal::MalformedMessage,
        Refusal::MissingField,
        Refusal::Stale,
        Refusal::Replayed,
    ];

    /// Its name in metrics (`reason` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MissingPayload => "missing_payload",
            Refusal::SignatureMissing => "signature_missing",
            Refusal::SignatureInvalid => "signature_invalid",
            Refusal::MalformedEnvelope => "malformed_envelope",
            Refusal::UnexpectedType => "unexpected_type",
            Refusal::MalformedMessage => "malformed_message",
            Refusal::MissingField => "missing_field",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
        }
    }
}

/// Checks an entry's signature (when a secret is set) and opens its
/// envelope, which must hold `expected`.
pub fn open(
    payload: Option<&[u8]>,
    signature: Option<&[u8]>,
    secret: Option<&[u8]>,
    expected: BusMessageType,
) -> Result<BusEnvelope, Refusal> {
    let payload = payload.ok_or(Refusal::MissingPayload)?;
    if let Some(secret) = secret {
        let signature = signature.ok_or(Refusal::SignatureMissing)?;
        let tag = STANDARD.decode(signature).map_err(|_| Refusal::SignatureInvalid)?;
        mac(secret, payload).verify_slice(&tag).map_err(|_| Refusal::SignatureInvalid)?;
    }
    let envelope: BusEnvelope = leyline::decode(payload).map_err(|_| Refusal::MalformedEnvelope)?;
    if envelope.message_type != expected as i32 {
        return Err(Refusal::UnexpectedType);
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_entries_open_only_with_the_right_secret() {
        let sealed = seal(BusMessageType::KernelPrefetchRequest, b"inner".to_vec(), BTreeMap::new(), Some(b"k1"));
        let sig = sealed.signature.as_deref().map(str::as_bytes);
        let kind = BusMessageType::KernelPrefetchRequest;
        assert_eq!(open(Some(&sealed.payload), sig, Some(b"k1"), kind).unwrap().payload, b"inner");
        assert_eq!(open(Some(&sealed.payload), sig, Some(b"k2"), kind), Err(Refusal::SignatureInvalid));
        assert_eq!(open(Some(&sealed.payload), None, Some(b"k1"), kind), Err(Refusal::SignatureMissing));
        assert_eq!(open(Some(&sealed.payload), Some(b"%%%"), Some(b"k1"), kind), Err(Refusal::SignatureInvalid));
        assert_eq!(open(Some(&sealed.payload), sig, Some(b"k1"), BusMessageType::Telemetry), Err(Refusal::UnexpectedType));
        assert_eq!(open(None, sig, None, kind), Err(Refusal::MissingPayload));
        assert_eq!(open(Some(b"\xff\xff"), None, None, kind), Err(Refusal::MalformedEnvelope));
    }

    #[test]
    fn signature_is_hmac_sha256_in_padded_base64() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let tag = mac(b"Jefe", b"what do ya want for nothing?").finalize().into_bytes();
        assert_eq!(crate::base::hex::encode(&tag), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(STANDARD.encode(tag).ends_with('='));
    }
}
