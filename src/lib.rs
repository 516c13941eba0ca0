//! Tezzeret: the embeddable compilation forge of Esper.
//!
//! A pure-Rust core — [`catalog`], [`blueprints`], [`compile`], [`store`],
//! [`guard`], [`forge`], [`telemetry`] — behind a thin C ABI ([`ffi`]).
//! Hosts link the cdylib through `include/tezzeret.h`; Rust users (the
//! `tezzeret` CLI among them) use this crate directly.
#![warn(missing_docs)]

pub mod bench;
pub mod blueprints;
pub mod breakers;
pub mod catalog;
pub mod compile;
pub mod error;
pub mod failpoint;
pub mod ffi;
pub mod forge;
pub mod guard;
pub mod kernel;
pub mod leyline;
pub mod lock;
pub mod report;
pub mod resources;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod verify;
pub mod version;
pub mod wal;

pub use error::{Error, ErrorCode, Result};

/// The text of a caught panic payload.
pub fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
