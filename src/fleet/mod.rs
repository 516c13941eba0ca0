//! The fleet layer: many forges, on many hosts, sharing one set of signed
//! artifacts through an S3-compatible bucket. The bucket is untrusted: a
//! manifest is used only if its signature verifies with a trusted key and
//! its artifact only if its sha256 matches ([`manifest`]). A [`Fleet`]
//! ([`member`]) looks artifacts up ([`lookup`]), publishes them with
//! conditional create ([`publish`]), and claims cache keys ([`claims`])
//! with leases ([`lease`]) so that each compiles once for the whole
//! fleet, kept in the bucket or in the fleet's Redis
//! ([`lease_objects`]), which then also announces each publication
//! ([`redis_hash`]);
//! [`remote`] is the bucket as plain operations, [`objects`] where each
//! thing lives in it, [`stats`] what was counted, [`survey`] what the
//! bucket holds, checked, and [`mod@reference`] how a consumer without a forge
//! fetches an announced artifact by its `s3://` reference.
//!
//! The local state directory stays each host's source of truth: what comes
//! from the bucket is written durably into it, journaled and announced like
//! a local compile, and an unreachable bucket never fails a job.
pub mod claims;
pub mod config;
pub mod lease;
pub mod lease_objects;
pub mod lookup;
pub mod manifest;
pub mod member;
pub mod objects;
pub mod publish;
pub mod redis_hash;
pub mod reference;
pub mod remote;
pub mod stats;
pub mod survey;

pub use config::{Credentials, FleetConfig};
pub use lease::Claim;
pub use manifest::Refusal;
pub use lookup::{Lookup, Watched};
pub use member::Fleet;
pub use publish::Publication;
pub use reference::{fetch_artifact, ArtifactReference, FetchedArtifact};
pub use survey::{ArtifactCheck, Survey};
pub use stats::{FleetEvent, FleetMetrics};
