//! Signing keys through the C ABI.
use super::args::out_arg;
use super::status::{ffi_status, tezzeret_status};
use crate::state::signing::generate_keypair;

/// Makes a new ed25519 key pair from the OS random generator: the 32-byte
/// secret seed (for `tezzeret_config.signing_key`) into `out_secret` and
/// the 32-byte public key (for `trusted_keys`) into `out_public`. Nothing
/// is written if the generator fails.
#[no_mangle]
pub unsafe extern "C" fn tezzeret_keygen(out_secret: *mut u8, out_public: *mut u8) -> *mut tezzeret_status {
    ffi_status(|| {
        out_arg(out_secret, "out_secret")?;
        out_arg(out_public, "out_public")?;
        let (secret, public) = generate_keypair()?;
        // SAFETY: both are non-NULL (checked) with 32 writable bytes by contract.
        unsafe {
            std::ptr::copy_nonoverlapping(secret.as_ptr(), out_secret, 32);
            std::ptr::copy_nonoverlapping(public.as_ptr(), out_public, 32);
        }
        Ok(())
    })
}
