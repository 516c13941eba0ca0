//! A real `redis-server` for the bus tests and benchmarks: started on
//! 127.0.0.1 on a free port chosen at run time, stopped by its PID on drop.
//! (Shared with the test suite, which includes this file by path.)
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server_process::ServerProcess;

/// A directory of its own, removed on drop.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!("tezzeret-redis-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a redis data directory");
        DataDir(path)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `done` until it holds; panics naming `what` after a bound no
/// healthy start comes near (it only keeps a broken run from hanging).
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running Redis.
pub struct RedisServer {
    process: ServerProcess,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    persistent: bool,
    _data: Option<DataDir>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

fn spawn(port: u16, dir: &Path, persistent: bool) -> Child {
    let mut command = Command::new("redis-server");
    command.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""]).arg("--dir").arg(dir);
    if persistent {
        // Every write on disk before its reply: a SIGKILL loses nothing acknowledged.
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        command.args(["--appendonly", "no"]);
    }
    command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot start redis-server: {e}"))
}

impl RedisServer {
    /// A fresh in-memory Redis.
    #[allow(dead_code)]
    pub fn start() -> RedisServer {
        Self::try_start(false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A Redis that keeps every acknowledged write on disk (append-only
    /// file, fsync always), so that it can be killed and restarted.
    #[allow(dead_code)]
    pub fn start_persistent() -> RedisServer {
        Self::try_start(true).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts one, or says why not (no `redis-server` on this machine).
    pub fn try_start(persistent: bool) -> Result<RedisServer, String> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            return Err("redis-server not found; scripts/install-test-deps.sh installs it (Debian's redis-server)".into());
        }
        let data = DataDir::new();
        // The port was free a moment ago; another process may take it first: try again.
        for _ in 0..20 {
            let port = free_port();
            let mut server = RedisServer { process: ServerProcess::default(), port, dir: data.0.clone(), persistent, _data: None };
            server.process.set(spawn(port, &data.0, persistent));
            if server.wait_ready() {
                server._data = Some(data);
                return Ok(server);
            }
        }
        Err("redis-server did not start on any of 20 free ports".into())
    }

    /// Waits until it answers PING; false if it exited first.
    fn wait_ready(&mut self) -> bool {
        let url = self.url();
        let mut exited = false;
        wait_for("redis-server to answer PING", || {
            if self.process.exited() {
                exited = true;
                return true;
            }
            redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
        !exited
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client connection.
    #[allow(dead_code)]
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str()).unwrap().get_connection().expect("connect to the test redis")
    }

    /// Its PID.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port (and, persistent, the same data).
    #[allow(dead_code)]
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            self.process.set(spawn(self.port, &self.dir, self.persistent));
            if self.wait_ready() {
                return;
            }
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
