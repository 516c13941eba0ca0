//! Library, ABI and persisted-format versions.
include!("abi_version.rs");

/// The library's semantic version (the crate version).
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The PyTorch release the library is built for.
pub const TORCH_VERSION: &str = "2.11.0";

/// Version of the artifact format (file layout + metadata), distinct from the ABI.
pub const ARTIFACT_FORMAT_VERSION: u32 = 1;

/// Checks a caller's ABI against ours: the major must match exactly and the
/// caller's minor must not be newer than ours (it may use calls we lack).
pub fn check_abi(major: u32, minor: u32) -> crate::base::error::Result<()> {
    if major != ABI_MAJOR {
        return Err(crate::base::error::Error::new(
            crate::base::error::ErrorCode::AbiMismatch,
            format!(
                "header ABI {major}.{minor} is incompatible with library ABI {ABI_MAJOR}.{ABI_MINOR} \
                 (library {LIBRARY_VERSION}): the ABI major must match; rebuild against this library's header"
            ),
        ));
    }
    if minor > ABI_MINOR {
        return Err(crate::base::error::Error::new(
            crate::base::error::ErrorCode::AbiMismatch,
            format!(
                "header ABI {major}.{minor} is newer than library ABI {ABI_MAJOR}.{ABI_MINOR} \
                 (library {LIBRARY_VERSION}): load a library at least as new as the header"
            ),
        ));
    }
    Ok(())
}
