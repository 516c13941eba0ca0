//! The C ABI: a thin layer that validates and converts arguments,
//! delegates to the Rust core, and contains every panic.
//!
//! Conventions: fallible functions return `tezzeret_status*` (NULL = OK);
//! out-parameters are written only on success; structs start with
//! `struct_size`; enums cross as `uint32_t`; handles are opaque, made by
//! `args::into_handle` and freed by `args::free_handle`, and their free functions
//! accept NULL. Every unsafe operation sits in its own block with the
//! reason it is sound.
#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]
// Every entry point's safety contract is its C documentation (pointers valid
// for the stated sizes and lifetimes, handles from this library); functions
// that only accept NULL or library-made pointers stay callable as safe
// `extern "C"` functions, as in rustls-ffi.
#![allow(clippy::missing_safety_doc, clippy::not_unsafe_ptr_arg_deref)]

mod args;
mod buffer;
mod bus;
mod config;
mod fleet;
mod forge;
mod guards;
mod host;
mod kernel;
mod keys;
mod runtime;
mod status;
mod version;

pub use buffer::*;
pub use bus::*;
pub use config::*;
pub use fleet::*;
pub use forge::*;
pub use guards::*;
pub use host::*;
pub use kernel::*;
pub use keys::*;
pub use runtime::*;
pub use status::*;
pub use version::*;
