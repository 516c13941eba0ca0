//! Durable file operations: every create, write and rename that must
//! survive a crash goes through here (temp file, fsync, rename, directory
//! fsync), and so does space reservation.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::failpoint;
use crate::base::error::{Error, Result};

/// Prefix of the temp files of durable writes (removed as debris at open).
pub const TEMP_PREFIX: &str = ".tmp-";

/// Writes a file durably: temp file in the same directory, fsync, rename
/// over the target, fsync of the directory.
pub fn durable_write(path: &Path, bytes: &[u8]) -> Result<()> {
    durable_write_all(&[(path, bytes)])
}

/// Writes several files durably, in their order, sharing the syncs a
/// journaling file system can share: every temp file is written and
/// fsynced first, then all are renamed, then each directory is fsynced
/// once (the first directory fsync usually commits every rename). When it
/// returns Ok, every file is durable under its name; on error no temp file
/// is left and no target is partly written.
pub fn durable_write_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut temps = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, bytes) in files {
            let dir = path.parent().ok_or_else(|| Error::invalid(format!("{} has no parent directory", path.display())))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            let temp = dir.join(format!("{TEMP_PREFIX}{}-{name}", std::process::id()));
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(|e| Error::io(format!("create {}", temp.display()), e))?;
            temps.push(temp.clone());
            failpoint::hit("store.write")
                .and_then(|_| file.write_all(bytes))
                .map_err(|e| Error::io(format!("write {}", temp.display()), e))?;
            failpoint::hit("store.fsync")
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::io(format!("fsync {}", temp.display()), e))?;
        }
        for ((path, _), temp) in files.iter().zip(&temps) {
            failpoint::hit("store.rename")
                .and_then(|_| fs::rename(temp, path))
                .map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
        }
        let mut synced: Vec<&Path> = Vec::new();
        for (path, _) in files {
            let dir = path.parent().expect("checked above");
            if !synced.contains(&dir) {
                failpoint::hit("store.fsync_dir").map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))?;
                sync_dir(dir)?;
                synced.push(dir);
            }
        }
        Ok(())
    })();
    if result.is_err() {
        for temp in &temps {
            let _ = fs::remove_file(temp);
        }
    }
    result
}

/// fsyncs a directory so a create/rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Reserves `len` bytes for `file`: space a mapping may then cover without
/// risking SIGBUS on a full disk. `posix_fallocate` reserves with the file
/// system's `fallocate` where it has one and otherwise writes the blocks
/// (ext2, ext3, some network file systems), so a full disk is an error here
/// either way.
pub fn fallocate(file: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: posix_fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Sets a file's mtime to now (best effort: last-use times only steer
/// eviction, so nothing is synced and failures are ignored).
pub fn touch(path: &Path) {
    if let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a NUL-terminated path; NULL times means "now".
        unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), std::ptr::null(), 0) };
    }
}

/// Removes the temp files of interrupted durable writes in `dir`; returns how many.
pub fn remove_temp_files(dir: &Path) -> Result<usize> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
