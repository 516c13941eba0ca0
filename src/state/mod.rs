//! The state layer: everything a forge keeps in its state directory and
//! how it survives crashes. [`layout`] names the files; [`wal`] is the
//! write-ahead log and the job journal replayed from it; [`store`] holds
//! content-addressed artifact files and their manifests ([`artifact`]);
//! [`signing`] signs and verifies manifests; [`guard_table`] is the
//! memory-mapped table hosts check inputs against; [`verify`] re-checks a
//! directory offline. Nothing here compiles or talks to a host.
pub mod artifact;
pub mod guard_table;
pub mod layout;
pub mod signing;
pub mod store;
pub mod verify;
pub mod wal;
