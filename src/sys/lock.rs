//! The exclusive lock on a state directory: one forge per directory, across
//! threads and processes (`flock` on `DIR/LOCK`, released when the process
//! dies, so a crashed forge never blocks the next one). A child forked by
//! the host lets go of its copy of the lock at once, so that it neither
//! keeps a killed parent's directory locked nor unlocks a live parent's.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use crate::base::error::{Error, ErrorCode, Result};

/// Holds `DIR/LOCK` exclusively until dropped.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
    /// The process that took it (a forked child's copy is not the lock).
    owner: u32,
    /// Its place in [`HELD`].
    slot: Option<usize>,
}

/// The descriptors of the locks this process holds (-1: free), for the
/// fork handler, which may only touch atomics.
static HELD: [AtomicI32; 64] = [const { AtomicI32::new(-1) }; 64];

/// In a forked child: points each held lock's descriptor at `/dev/null`,
/// so that the child's copy no longer keeps the lock's open file (which
/// would keep the directory locked after the parent dies), while the
/// descriptor number stays valid for the child's own `StateLock` to close.
/// Only async-signal-safe calls.
extern "C" fn let_go_in_child() {
    // SAFETY: open, dup2 and close are async-signal-safe; the path is a
    // NUL-terminated literal.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 {
            return;
        }
        for held in &HELD {
            let fd = held.load(Ordering::Relaxed);
            if fd >= 0 {
                libc::dup2(null, fd);
            }
        }
        libc::close(null);
    }
}

/// Records a held lock's descriptor (once, the fork handler).
fn register(fd: i32) -> Option<usize> {
    static HANDLER: Once = Once::new();
    // SAFETY: registers a plain extern "C" function as the child handler.
    HANDLER.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(let_go_in_child));
    });
    HELD.iter().position(|held| held.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed).is_ok())
}

impl StateLock {
    /// Takes the lock file at `path` without waiting; refuses with
    /// [`ErrorCode::StateLocked`] when another forge holds it.
    pub fn acquire(path: &Path) -> Result<Self> {
        let state_dir = path.parent().unwrap_or(Path::new("."));
        let path = path.to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("open lock file {}", path.display()), e))?;
        // SAFETY: flock on a valid descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::new(
                    ErrorCode::StateLocked,
                    format!(
                        "state directory {} is already open by another forge{}",
                        state_dir.display(),
                        if holder.is_empty() { String::new() } else { format!(" ({holder})") }
                    ),
                ));
            }
            return Err(Error::io(format!("lock {}", path.display()), err));
        }
        // Informational only: who holds the lock.
        let _ = file.set_len(0);
        let _ = write!(file, "pid {}", std::process::id());
        let slot = register(file.as_raw_fd());
        Ok(StateLock { file, path, owner: std::process::id(), slot })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            HELD[slot].store(-1, Ordering::Release);
        }
        // Closing the descriptor releases the lock; unlock explicitly anyway
        // — only in the process that took it: in a forked child the lock's
        // open file is the parent's, and unlocking it would free the
        // directory under the parent.
        if self.owner == std::process::id() {
            // SAFETY: valid descriptor.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}
