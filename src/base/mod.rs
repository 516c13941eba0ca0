//! The foundation every other layer uses: errors and failure reasons, the
//! Leyline wire messages, versions, and small shared types (hex,
//! cancellation, dtypes, devices, redacted URLs). Nothing here knows about
//! the state directory, compilation or the forge.
pub mod cancel;
pub mod device;
pub mod dtype;
pub mod error;
pub mod hex;
pub mod leyline;
pub mod panic;
pub mod redact;
pub mod version;
