//! Randomness from the operating system's generator. There is no fallback:
//! keys, salts and transaction ids come from `getrandom(2)` or the call fails.
use std::io;

use super::failpoint;

/// Fills `out` from the kernel's random source, retrying interrupted and
/// partial reads; any other failure is returned, never papered over.
pub fn fill(out: &mut [u8]) -> io::Result<()> {
    failpoint::hit("sys.random")?;
    let mut filled = 0;
    while filled < out.len() {
        let rest = &mut out[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// `N` random bytes from the kernel.
pub fn bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut out = [0u8; N];
    fill(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        let a = super::bytes::<32>().unwrap();
        let b = super::bytes::<32>().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }
}
