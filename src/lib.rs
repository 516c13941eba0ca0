//! Tezzeret: the embeddable compilation forge of Esper.
//!
//! The layers, bottom to top (each may use only those below it):
//! - [`base`]: errors and failure reasons, Leyline messages, versions, and
//!   small shared types;
//! - [`sys`]: the operating system — durable writes, directory syncs, space
//!   reservation, the state-directory lock, randomness, failpoints, readings;
//! - [`build`]: catalog, blueprints, compilation, guard specs (libtorch);
//! - [`state`]: the state directory — WAL and journal, artifact store,
//!   manifests and signing, guard table, offline verification;
//! - [`bus`]: the Oona bus on Redis Streams — prefetch requests answered,
//!   catalog updates and telemetry published;
//! - [`fleet`]: artifacts shared by many hosts through an S3-compatible
//!   bucket — verified fetches, signed publications, compile leases;
//! - [`forge`]: the forge that ties them together, and its service;
//! - [`ffi`]: the C ABI, which only converts and delegates.
//!
//! Hosts link the cdylib through `include/tezzeret.h`; Rust users (the
//! `tezzeret` CLI among them) use this crate directly. See ARCHITECTURE.md.
#![warn(missing_docs)]

pub mod base;
pub mod build;
pub mod bus;
pub mod ffi;
pub mod fleet;
pub mod forge;
pub mod state;
pub mod sys;

pub use base::error::{Error, ErrorCode, FailureReason, Result};
