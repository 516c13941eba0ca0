//! The operating-system layer: every syscall whose failure or ordering
//! matters for durability lives here — durable writes, directory syncs,
//! space reservation, the state-directory lock, randomness, failpoints and
//! resource readings. The layers above never call `libc` for these.
pub mod failpoint;
pub mod fs;
pub mod host;
pub mod lock;
pub mod random;
pub mod resources;
