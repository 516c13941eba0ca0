//! Tezzeret's integration suite: one binary, one module per area.
mod abi;
mod bus;
mod cabi;
mod catalog;
mod cli;
mod concurrency;
mod consumers;
mod crash;
mod fleet;
mod hazards;
mod holding_proxy;
mod guards;
mod header;
mod hotpath;
mod integrity;
mod leyline;
mod loaders;
mod outparams;
/// Measurement helpers shared with `tezzeret bench` (sample jobs).
#[path = "../../src/bin/tezzeret/bench/measure.rs"]
#[allow(dead_code)]
mod measure;
mod pipeline;
mod promises;
/// A real redis-server for the bus tests (shared with `tezzeret bench`).
#[path = "../../src/bin/tezzeret/bench/redis_server.rs"]
mod redis_server;
mod runtime;
/// A real SeaweedFS for the fleet tests (shared with `tezzeret bench`).
#[path = "../../src/bin/tezzeret/bench/seaweed_server.rs"]
mod seaweed_server;
/// The server processes those two start (shared with `tezzeret bench`).
#[path = "../../src/bin/tezzeret/bench/server_process.rs"]
mod server_process;
mod signing;
mod wal;

/// A fresh temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates `/tmp/tezzeret-test-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tezzeret-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic xorshift generator for randomised tests.
pub struct Rng(pub u64);

impl Rng {
    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A host that enumerates a fixed catalog, the same at every call.
pub struct FixedCatalog(pub tezzeret::build::catalog::Catalog);

impl tezzeret::forge::Host for FixedCatalog {
    fn enumerate(&mut self) -> tezzeret::Result<Option<tezzeret::build::catalog::Catalog>> {
        Ok(Some(self.0.clone()))
    }
}

/// A loop-mounted file system, unmounted (and its image removed) on drop.
pub struct Mounted {
    /// Where it is mounted.
    pub dir: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl Mounted {
    /// Mounts a fresh 64 MiB ext2 image with 128-byte inodes — timestamps
    /// in whole seconds, as a coarse file system keeps them — at `dir`.
    /// None when this user may not mount (CI runs as root).
    pub fn coarse_timestamps(dir: &std::path::Path) -> Option<Mounted> {
        use std::process::Command;
        std::fs::create_dir_all(dir).ok()?;
        let image = dir.with_extension("img");
        let made = std::fs::File::create(&image).and_then(|f| f.set_len(64 << 20)).is_ok()
            && Command::new("mkfs.ext2").args(["-q", "-F", "-I", "128"]).arg(&image).status().is_ok_and(|s| s.success());
        let mounted = made && Command::new("mount").args(["-o", "loop"]).arg(&image).arg(dir).status().is_ok_and(|s| s.success());
        mounted.then(|| Mounted { dir: dir.to_path_buf(), image })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Waits until `done` holds, polling; fails naming `what` if that takes
/// longer than any healthy run could (the bound is not a budget: it only
/// keeps a broken run from hanging the suite).
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A catalog file `catalog.json` under `dir` holding only the default
/// catalog's blueprints `ids` (for the CLI).
pub fn catalog_file(dir: &std::path::Path, ids: &[&str]) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/karn-default-catalog.json")).unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let chosen: Vec<_> = all.into_iter().filter(|d| ids.contains(&d["blueprint_id"].as_str().unwrap())).collect();
    let path = dir.join("catalog.json");
    std::fs::write(&path, serde_json::to_string(&chosen).unwrap()).unwrap();
    path
}

/// The repository root.
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
