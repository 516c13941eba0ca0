//! A server process the tests and benchmarks start and own (Redis,
//! SeaweedFS): its PID, whether it exited, SIGKILL and reap — on drop too.
//! (Shared with the test suite, which includes this file by path.)
use std::process::Child;

/// A started server process, or none (between a kill and a restart).
#[derive(Default)]
pub struct ServerProcess(Option<Child>);

impl ServerProcess {
    /// Owns a started process (killing one it owned before).
    pub fn set(&mut self, child: Child) {
        self.kill();
        self.0 = Some(child);
    }

    /// Its PID.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// Whether it has exited (false while it runs, or when there is none).
    pub fn exited(&mut self) -> bool {
        self.0.as_mut().is_some_and(|child| child.try_wait().ok().flatten().is_some())
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
