//! Long-lived compile threads, reused from job to job.
//!
//! libtorch sets up a lot per thread on first use (the OpenMP team, MKL and
//! oneDNN scratch, caches): measured here, the default catalog compiled on
//! a fresh thread took 2.7× as long as on a thread that had compiled it
//! before. Workers therefore live for the process and are shared by every
//! forge in it ([`shared_pool`]), so a reopened forge starts warm. A worker
//! whose job is abandoned (over budget, shutdown) is never reused: it ends,
//! freeing what the job held, as soon as the job returns.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::base::error::{Error, Result};

/// A unit of work for a worker thread.
pub type Task = Box<dyn FnOnce() + Send>;

/// A worker thread and the channel that feeds it.
pub struct Worker {
    tasks: mpsc::Sender<Task>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Hands `task` to the worker; it runs next, on the worker's thread.
    pub fn run(&self, task: Task) -> Result<()> {
        self.tasks.send(task).map_err(|_| Error::new(crate::base::error::ErrorCode::Internal, "compile worker ended unexpectedly"))
    }

    /// Lets the worker go without waiting: it ends once its current task
    /// returns (used for an abandoned job that may still be running).
    pub fn retire(mut self) {
        drop(self.thread.take()); // detached: the thread exits after the task
    }
}

/// Idle workers, at most `keep` of them.
pub struct WorkerPool {
    idle: Mutex<Vec<Worker>>,
    keep: AtomicUsize,
    spawned: AtomicU64,
}

/// The process's compile workers, shared by its forges. Idle ones (at most
/// the largest `max_concurrency` of any forge opened) wait on a channel for
/// the life of the process.
pub fn shared_pool() -> Arc<WorkerPool> {
    static POOL: OnceLock<Arc<WorkerPool>> = OnceLock::new();
    POOL.get_or_init(|| Arc::new(WorkerPool::new(1))).clone()
}

impl WorkerPool {
    /// A pool that keeps up to `keep` idle workers.
    pub fn new(keep: usize) -> Self {
        WorkerPool { idle: Mutex::new(Vec::new()), keep: AtomicUsize::new(keep.max(1)), spawned: AtomicU64::new(0) }
    }

    /// Keeps at least `keep` idle workers from now on.
    pub fn keep_at_least(&self, keep: usize) {
        self.keep.fetch_max(keep, Ordering::Relaxed);
    }

    /// An idle worker, or a new one.
    pub fn take(&self) -> Result<Worker> {
        if let Some(worker) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(worker);
        }
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let (tasks, receiver) = mpsc::channel::<Task>();
        let thread = std::thread::Builder::new()
            .name(format!("tz-worker-{n}"))
            .spawn(move || {
                for task in receiver {
                    task();
                }
            })
            .map_err(|e| Error::io("spawn compile worker", e))?;
        Ok(Worker { tasks, thread: Some(thread) })
    }

    /// Returns a worker whose task finished; beyond `keep` idle ones it ends.
    pub fn give_back(&self, worker: Worker) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep.load(Ordering::Relaxed) {
            idle.push(worker);
        } else {
            drop(idle);
            shut_down(worker);
        }
    }

    /// Threads this pool has started so far.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }
}

/// Closes a worker's channel and waits for its (idle) thread to end.
fn shut_down(mut worker: Worker) {
    let thread = worker.thread.take();
    drop(worker); // closes the channel: the loop ends
    if let Some(thread) = thread {
        let _ = thread.join();
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|p| p.into_inner()));
        idle.into_iter().for_each(shut_down);
    }
}

/// Names the calling thread (Linux keeps 15 bytes), so that `top` and a
/// debugger show which blueprint a worker is compiling.
pub fn name_current_thread(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: a NUL-terminated name for the calling thread.
    unsafe { libc::pthread_setname_np(libc::pthread_self(), bytes.as_ptr().cast()) };
}
