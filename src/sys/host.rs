//! Who this process is on the network: the host name that names a forge
//! among its peers (bus consumers, fleet leases).

/// The machine's host name (`host` when it cannot be read).
pub fn hostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most name.len() bytes into name.
    let ok = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0;
    let end = name.iter().position(|&b| b == 0).unwrap_or(0);
    if ok && end > 0 {
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "host".into()
    }
}
