// Shared by build.rs (SONAME) and the library: the C ABI version.
// Bump MAJOR on any incompatible change of the C ABI, MINOR on additions.

/// Major version of the C ABI; the shared library's SONAME carries it.
pub const ABI_MAJOR: u32 = 0;
/// Minor version of the C ABI: additions that keep old callers working.
pub const ABI_MINOR: u32 = 11;
