//! Keeps a broken connection from ending the host process. Writing to a
//! socket or pipe whose peer has gone raises `SIGPIPE` on the writing
//! thread, and its default action kills the whole process; C and C++ hosts
//! usually keep that default, and vectored socket writes (the HTTP client
//! uses them) cannot opt out per call. So the library holds the signal back
//! on every thread while it talks to the network: the write then only
//! fails with `EPIPE`, which the caller handles like any lost connection.
use std::mem::MaybeUninit;

/// A signal set holding only `SIGPIPE`.
fn broken_pipe_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only adds a valid signal to it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGPIPE);
        set.assume_init()
    }
}

/// Whether a `SIGPIPE` waits for this thread or for the process.
fn broken_pipe_pending() -> bool {
    let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given; it is read only after success.
    unsafe { libc::sigpending(pending.as_mut_ptr()) == 0 && libc::sigismember(pending.as_ptr(), libc::SIGPIPE) == 1 }
}

/// Whether a `SIGPIPE` waits for this thread itself, as one raised by its
/// own write does (one sent to the process is the host's business). The
/// kernel tells the two apart only in `/proc`, read only when one waits;
/// if it cannot be read, a waiting one is taken as this thread's.
fn broken_pipe_pending_for_this_thread() -> bool {
    if !broken_pipe_pending() {
        return false;
    }
    let Ok(status) = std::fs::read_to_string("/proc/thread-self/status") else { return true };
    // `SigPnd:` is the thread's own pending set (`ShdPnd:` the process's), in hex.
    let thread_pending = status.lines().find_map(|line| line.strip_prefix("SigPnd:"));
    let mask = thread_pending.and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok());
    mask.is_none_or(|mask| mask & (1 << (libc::SIGPIPE - 1)) != 0)
}

/// Holds `SIGPIPE` back on the calling thread for the rest of its life:
/// for threads the library starts that talk to the network.
pub fn hold_broken_pipe_signal_for_this_thread() {
    let set = broken_pipe_set();
    // SAFETY: changes only this thread's mask, with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// `SIGPIPE` held back on the calling thread (a host's thread lent to the
/// library) while this value lives. One that the library's writes raised
/// on this thread meanwhile is discarded when it drops (one sent to the
/// process is left waiting), and the thread's mask is restored.
#[must_use = "the signal is held back only while the value lives"]
pub struct BrokenPipeSignalHeld {
    /// The thread's mask before, when it did not already hold the signal back.
    restore: Option<libc::sigset_t>,
    /// Whether a `SIGPIPE` already waited for this thread (the host's own:
    /// left alone).
    pending_before: bool,
}

/// Holds `SIGPIPE` back on the calling thread until the returned value drops.
pub fn hold_broken_pipe_signal() -> BrokenPipeSignalHeld {
    let set = broken_pipe_set();
    let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: changes only this thread's mask; `previous` is read only after success.
    let changed = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, previous.as_mut_ptr()) } == 0;
    // SAFETY: initialised by the successful call above.
    let restore = changed
        .then(|| unsafe { previous.assume_init() })
        .filter(|previous| unsafe { libc::sigismember(previous, libc::SIGPIPE) } == 0);
    BrokenPipeSignalHeld { restore, pending_before: broken_pipe_pending_for_this_thread() }
}

impl Drop for BrokenPipeSignalHeld {
    fn drop(&mut self) {
        if !self.pending_before && broken_pipe_pending_for_this_thread() {
            let set = broken_pipe_set();
            let no_wait = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: takes the pending SIGPIPE without blocking; one waiting
            // for this thread is taken before one waiting for the process.
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &no_wait) };
        }
        if let Some(previous) = &self.restore {
            // SAFETY: restores this thread's own mask as it was.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, previous, std::ptr::null_mut()) };
        }
    }
}

/// A vectored write (as the HTTP client makes) to a socket whose peer is
/// gone, for tests: fails with `EPIPE` (its OS error returned) and raises
/// `SIGPIPE` on the writing thread.
#[cfg(test)]
pub(crate) fn write_to_a_dropped_connection() -> Option<i32> {
    use std::io::{IoSlice, Write};
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(theirs);
    ours.write_vectored(&[IoSlice::new(b"lost")]).unwrap_err().raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_signal_is_discarded_and_the_mask_restored() {
        let held = hold_broken_pipe_signal();
        assert_eq!(write_to_a_dropped_connection(), Some(libc::EPIPE));
        assert!(broken_pipe_pending_for_this_thread(), "the write raised the signal on this thread, held back");
        drop(held);
        assert!(!broken_pipe_pending(), "discarded on release");
        let mut mask = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: reads this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), mask.as_mut_ptr()) };
        assert_eq!(unsafe { libc::sigismember(mask.as_ptr(), libc::SIGPIPE) }, 0, "mask restored");
    }
}
