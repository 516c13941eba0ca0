//! Failpoints for crash and error testing of every durable write.
//!
//! `TEZZERET_FAILPOINTS="wal.msync=error@3,store.rename=crash@1"` makes the
//! 3rd `wal.msync` return an I/O error and the 1st `store.rename` kill the
//! process with SIGKILL (as `kill -9` would, mid-operation). Unset (the
//! normal case), a failpoint costs one atomic load. With
//! `TEZZERET_FAILPOINTS_LOG=FILE`, every failpoint that fires appends a line
//! `fired NAME ACTION HIT` to FILE first (before a crash, too), so a test can
//! tell a failpoint that fired from one its run never reached.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every failpoint of a durable write, for tests that sweep them. Besides
/// these, `sys.random` fails the OS random generator (keys, salts, ids),
/// `bus.publish` a bus publication, `fleet.leased` fires as a fleet
/// lease is won (to kill a lease holder), `wal.recovered_sync` fails
/// the sync of a reopened log's recovered entries, and `guard.supersede`
/// fires between a guard table's replacement and marking the old one.
pub const ALL: &[&str] = &[
    "wal.fallocate",
    "wal.write",
    "wal.msync",
    "wal.rename",
    "wal.fsync_dir",
    "store.write",
    "store.fsync",
    "store.rename",
    "store.fsync_dir",
    "guard.write",
    "guard.msync",
];

#[derive(Debug, Clone, Copy)]
enum Action {
    Error,
    Crash,
}

struct Point {
    action: Action,
    at: u64,
    hits: AtomicU64,
}

fn points() -> Option<&'static HashMap<String, Point>> {
    static POINTS: OnceLock<Option<HashMap<String, Point>>> = OnceLock::new();
    POINTS
        .get_or_init(|| {
            let spec = std::env::var("TEZZERET_FAILPOINTS").ok()?;
            let mut map = HashMap::new();
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, rest) = item.split_once('=')?;
                let (action, at) = rest.split_once('@').unwrap_or((rest, "1"));
                let action = match action {
                    "error" => Action::Error,
                    "crash" => Action::Crash,
                    _ => continue,
                };
                map.insert(name.to_string(), Point { action, at: at.parse().unwrap_or(1), hits: AtomicU64::new(0) });
            }
            Some(map)
        })
        .as_ref()
}

/// Appends the firing to `TEZZERET_FAILPOINTS_LOG`, if set (one `write` of
/// an O_APPEND file: it survives the SIGKILL that may follow).
fn record_firing(name: &str, action: Action, hit: u64) {
    let Some(path) = std::env::var_os("TEZZERET_FAILPOINTS_LOG") else { return };
    let action = match action {
        Action::Error => "error",
        Action::Crash => "crash",
    };
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        use std::io::Write;
        let _ = file.write_all(format!("fired {name} {action} {hit}\n").as_bytes());
    }
}

/// Passes through failpoint `name`: an injected I/O error, a SIGKILL of
/// this process, or (normally) nothing.
pub fn hit(name: &str) -> std::io::Result<()> {
    let Some(point) = points().and_then(|p| p.get(name)) else { return Ok(()) };
    if point.hits.fetch_add(1, Ordering::SeqCst) + 1 != point.at {
        return Ok(());
    }
    record_firing(name, point.action, point.at);
    match point.action {
        Action::Error => Err(std::io::Error::other(format!("failpoint {name} injected an I/O error"))),
        Action::Crash => {
            // SAFETY: signalling ourselves; SIGKILL cannot be caught.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL delivered")
        }
    }
}
