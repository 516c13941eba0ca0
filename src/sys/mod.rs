//! The operating-system layer: every syscall whose failure or ordering
//! matters for durability lives here — durable writes, directory syncs,
//! space reservation, the state-directory lock, randomness, failpoints,
//! resource readings and the signal mask of threads that use the network.
//! The layers above never call `libc` for these.
pub mod failpoint;
pub mod fs;
pub mod host;
pub mod lock;
pub mod random;
pub mod resources;
pub mod signals;
