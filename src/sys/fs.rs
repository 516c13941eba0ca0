//! Durable file operations: every create, write and rename that must
//! survive a crash goes through here (temp file, fsync, rename, directory
//! fsync), and so does space reservation.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
/// is left and no target is partly written. Each temp file is new (created
/// exclusively, never through a symbolic link) and named for this write
/// alone, so concurrent writes to one name each land whole, the last
/// rename winning.
pub fn durable_write_all(files: &[(&Path, &[u8])]) -> Result<()> {
    // Dropped on an error, the files not yet renamed remove their temp files.
    let mut written = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        let mut file = DurableFile::create(path)?;
        file.write(bytes)?;
        file.sync()?;
        written.push(file);
    }
    for file in &mut written {
        file.rename_into_place()?;
    }
    let mut synced: Vec<&Path> = Vec::new();
    for (path, _) in files {
        let dir = directory_of(path);
        if !synced.contains(&dir) {
            sync_dir_of_write(dir)?;
            synced.push(dir);
        }
    }
    Ok(())
}

/// fsyncs the directory of a durable write, after its rename.
fn sync_dir_of_write(dir: &Path) -> Result<()> {
    failpoint::hit("store.fsync_dir").map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))?;
    sync_dir(dir)
}

/// The directory a file's name is in (`.` for a bare name).
pub fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A file written durably in pieces, for contents too large to hold in
/// memory: written to a temp file of its own beside the target, which
/// [`DurableFile::commit`] fsyncs and renames into place (then fsyncs the
/// directory). Dropped uncommitted, it removes its temp file and leaves
/// the target as it was.
pub struct DurableFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl DurableFile {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let (temp, file) = create_temp_beside(path)?;
        Ok(DurableFile { target: path.to_path_buf(), temp, file: Some(file) })
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("open until synced");
        failpoint::hit("store.write")
            .and_then(|_| file.write_all(bytes))
            .map_err(|e| Error::io(format!("write {} (as a temp file)", self.target.display()), e))
    }

    /// Makes what was written durable under the target's name.
    pub fn commit(mut self) -> Result<()> {
        self.sync()?;
        self.rename_into_place()?;
        sync_dir_of_write(directory_of(&self.target))
    }

    /// fsyncs what was written, and closes the temp file.
    fn sync(&mut self) -> Result<()> {
        let file = self.file.take().expect("synced once");
        failpoint::hit("store.fsync")
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(format!("fsync {} (as a temp file)", self.target.display()), e))
    }

    /// Renames the (synced) temp file over the target.
    fn rename_into_place(&mut self) -> Result<()> {
        failpoint::hit("store.rename")
            .and_then(|_| fs::rename(&self.temp, &self.target))
            .map_err(|e| Error::io(format!("rename to {}", self.target.display()), e))?;
        // Renamed: nothing left for drop to remove.
        self.temp = PathBuf::new();
        Ok(())
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// At most this many bytes of a target's name go into its temp file's
/// name, which must stay within the file system's limit on a name.
const TEMP_NAME_PART: usize = 64;

/// The part of a target's name that goes into its temp file's name (at
/// most [`TEMP_NAME_PART`] bytes, cut on a character boundary).
fn temp_name_part(name: &str) -> &str {
    let mut end = name.len().min(TEMP_NAME_PART);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Creates a new temp file in `path`'s directory for a durable write of
/// `path`: `.tmp-<pid>-<n>-<name>`, `n` counting this process's temp
/// files, created with `O_EXCL | O_NOFOLLOW` (a name already taken, even
/// by a symbolic link, is passed over for the next).
fn create_temp_beside(path: &Path) -> Result<(PathBuf, File)> {
    static CREATED: AtomicU64 = AtomicU64::new(0);
    let dir = directory_of(path);
    let name = temp_name_part(path.file_name().and_then(|n| n.to_str()).unwrap_or("file"));
    let mut last_error = None;
    for _ in 0..16 {
        let n = CREATED.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{n}-{name}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(Error::io(format!("create a temp file for {} in {}", path.display(), dir.display()), e)),
        }
    }
    let e = last_error.expect("16 tries, each failed");
    Err(Error::io(format!("create a temp file for {} in {} (16 names taken)", path.display(), dir.display()), e))
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

/// Removes the temp files interrupted durable writes of `path` left beside
/// it (`.tmp-<pid>-<n>-<name>`, as [`DurableFile`] names them) whose last
/// write is older than `age`, which the caller chooses longer than any of
/// its writes lasts, so that only a killed writer's are removed. A temp
/// file's name keeps only the first 64 bytes of its target's, so targets
/// that share those also share their temp files' names; a target whose
/// name is not UTF-8 (its temp files say `file`) is left alone. Best
/// effort (for a directory no forge cleans at open); returns how many
/// were removed.
pub fn remove_stale_temp_files_of(path: &Path, age: std::time::Duration) -> usize {
    let Some(name) = path.file_name().and_then(|n| n.to_str()).map(temp_name_part) else { return 0 };
    let Ok(entries) = fs::read_dir(directory_of(path)) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else { continue };
        // <pid>-<n>-<name>
        let mut parts = rest.splitn(3, '-');
        let numbered = |part: Option<&str>| part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !(numbered(parts.next()) && numbered(parts.next()) && parts.next() == Some(name)) {
            continue;
        }
        // Not followed: only a regular file of its own is a temp file.
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.file_type().is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|written| written.elapsed().ok())
            .is_some_and(|since| since > age);
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
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

#[cfg(test)]
mod tests {
    use super::{directory_of, durable_write, remove_stale_temp_files_of, DurableFile, TEMP_PREFIX};
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn a_durable_file_lands_whole_when_committed_and_leaves_nothing_when_dropped() {
        let dir = std::env::temp_dir().join(format!("tezzeret-fs-durable-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.pt");
        std::fs::write(&path, b"old").unwrap();
        let mut dropped = DurableFile::create(&path).unwrap();
        dropped.write(b"half").unwrap();
        drop(dropped);
        assert_eq!(std::fs::read(&path).unwrap(), b"old", "the target is left as it was");
        let mut file = DurableFile::create(&path).unwrap();
        file.write(b"new ").unwrap();
        file.write(b"bytes").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new bytes");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["a.pt"], "no temp file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_old_temp_files_of_the_same_target_are_removed_as_stale() {
        let dir = std::env::temp_dir().join(format!("tezzeret-fs-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        // 1 + 2 × 40 bytes: the 64-byte cut falls inside an 'é'.
        let long = format!("a{}.pt", "é".repeat(40));
        let make = |name: &str, old: bool| {
            let file = std::fs::File::create(dir.join(name)).unwrap();
            if old {
                file.set_modified(hour_ago).unwrap();
            }
        };
        // A killed write of a.pt, one still under way, another target's,
        // names that only look alike, and a long name's (its name cut short).
        make(".tmp-12-3-a.pt", true);
        make(".tmp-12-4-a.pt", false);
        make(".tmp-12-5-b.pt", true);
        make(".tmp-x-5-a.pt", true);
        make(".tmp-12-5-a.pt.bak", true);
        make("a.pt", true);
        make(".tmp-12-8-my-model.pt", true);
        let cut = super::temp_name_part(&long);
        assert_eq!(cut.len(), 63);
        make(&format!(".tmp-7-1-{cut}"), true);
        // Old symbolic links and directories by a temp file's name are not temp files.
        let link = dir.join(".tmp-12-6-a.pt");
        std::os::unix::fs::symlink(dir.join("a.pt"), &link).unwrap();
        std::fs::create_dir(dir.join(".tmp-12-9-a.pt")).unwrap();
        for path in [link, dir.join(".tmp-12-9-a.pt")] {
            let path = std::ffi::CString::new(path.into_os_string().into_encoded_bytes()).unwrap();
            let old = libc::timespec { tv_sec: hour_ago.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as libc::time_t, tv_nsec: 0 };
            // SAFETY: a NUL-terminated path and two timespecs (access, modification).
            let rc = unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), [old, old].as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
            assert_eq!(rc, 0);
        }
        assert_eq!(remove_stale_temp_files_of(&dir.join("a.pt"), Duration::from_secs(600)), 1);
        assert_eq!(remove_stale_temp_files_of(&dir.join(&long), Duration::from_secs(600)), 1);
        assert_eq!(remove_stale_temp_files_of(&dir.join("my-model.pt"), Duration::from_secs(600)), 1);
        let mut left: Vec<String> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        left.sort();
        let expected = [".tmp-12-4-a.pt", ".tmp-12-5-a.pt.bak", ".tmp-12-5-b.pt", ".tmp-12-6-a.pt", ".tmp-12-9-a.pt", ".tmp-x-5-a.pt", "a.pt"];
        assert_eq!(left, expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bare_name_is_in_the_current_directory() {
        assert_eq!(directory_of(Path::new("a.pt")), Path::new("."));
        assert_eq!(directory_of(Path::new("d/a.pt")), Path::new("d"));
        assert_eq!(directory_of(Path::new("/a.pt")), Path::new("/"));
    }

    #[test]
    fn concurrent_writes_of_one_name_each_land_whole_and_leave_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("tezzeret-fs-concurrent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.pt", "n".repeat(250)));
        std::thread::scope(|scope| {
            for writer in 0..6u8 {
                let path = &path;
                scope.spawn(move || {
                    for round in 0..20u8 {
                        let fill = writer * 20 + round;
                        durable_write(path, &vec![fill; 64 << 10]).unwrap();
                        let read = std::fs::read(path).unwrap();
                        assert!(read.len() == 64 << 10 && read.iter().all(|&b| b == read[0]), "a torn file");
                    }
                });
            }
        });
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(!left[0].to_string_lossy().starts_with(TEMP_PREFIX));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
