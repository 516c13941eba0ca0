//! The build layer: what a blueprint is and how it becomes an artifact.
//! [`catalog`] holds descriptors (the embedded default catalog among them),
//! [`blueprints`] builds a real libtorch module per descriptor name,
//! [`compile`] traces, optimises, validates and pre-warms it, and
//! [`guard_spec`] describes the inputs the result accepts. Nothing here
//! touches the state directory.
pub mod blueprints;
pub mod catalog;
pub mod compile;
pub mod guard_spec;
