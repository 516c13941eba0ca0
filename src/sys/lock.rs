//! The exclusive lock on a state directory: one forge per directory, across
//! threads and processes (`flock` on `DIR/LOCK`, released when the process
//! dies, so a crashed forge never blocks the next one).
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::base::error::{Error, ErrorCode, Result};

/// Holds `DIR/LOCK` exclusively until dropped.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
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
        Ok(StateLock { file, path })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock; unlock explicitly anyway.
        // SAFETY: valid descriptor.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}
