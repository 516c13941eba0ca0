//! Job control: cooperative cancellation, time budgets enforced by a
//! watchdog, and a memory budget checked between pipeline stages.
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::workers::{name_current_thread, WorkerPool};
use crate::base::cancel::CancelToken;
use crate::base::error::{panic_message, Error, ErrorCode, FailureReason, Result};
use crate::sys::resources::process_rss_bytes;

/// Limits one job runs under.
#[derive(Debug, Clone)]
pub struct JobLimits {
    /// Set when the job is abandoned; checked between stages.
    pub cancel: CancelToken,
    /// Largest growth of process RSS the job may cause (None = unchecked).
    pub memory_budget_bytes: Option<u64>,
    rss_at_start: Option<u64>,
}

impl JobLimits {
    /// Limits with a fresh cancel token and an optional memory budget.
    pub fn new(memory_budget_bytes: Option<u64>) -> Self {
        JobLimits { cancel: CancelToken::new(), memory_budget_bytes, rss_at_start: None }
    }

    /// Records the RSS the memory budget is measured from.
    pub fn start(&mut self) {
        self.rss_at_start = self.memory_budget_bytes.and_then(|_| process_rss_bytes());
    }

    /// Fails when the job was abandoned or grew RSS beyond its budget.
    pub fn check(&self, stage: &str) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::failure(ErrorCode::BudgetExceeded, FailureReason::BudgetExceeded, format!("job abandoned during {stage}")));
        }
        let (Some(budget), Some(start)) = (self.memory_budget_bytes, self.rss_at_start) else { return Ok(()) };
        if let Some(now) = process_rss_bytes() {
            let grown = now.saturating_sub(start);
            if grown > budget {
                return Err(Error::failure(
                    ErrorCode::BudgetExceeded,
                    FailureReason::MemoryBudgetExceeded,
                    format!(
                        "process memory grew by {} MiB during {stage}, budget {} MiB",
                        grown >> 20,
                        budget >> 20
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Runs `job` on its own thread and waits at most `budget` for it. On
/// timeout the job's cancel token is set, its late result will be
/// discarded, and its thread ends (and frees what it holds) as soon as it
/// notices; the caller gets a `budget_exceeded` error at once.
pub fn run_with_budget<T: Send + 'static>(
    what: &str,
    budget: Duration,
    cancel: CancelToken,
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    run_with_budget_or_abort(what, budget, cancel, None, None, job)
}

/// As [`run_with_budget`], also abandoning the job as soon as `abort` is set
/// (a forge shutting down does not wait for a compile to finish), and
/// running it on a worker of `workers` when given (else on a new thread).
pub fn run_with_budget_or_abort<T: Send + 'static>(
    what: &str,
    budget: Duration,
    cancel: CancelToken,
    abort: Option<&std::sync::atomic::AtomicBool>,
    workers: Option<&WorkerPool>,
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (sender, receiver) = mpsc::sync_channel(1);
    let started = Instant::now();
    let name = format!("tz-{what}"); // short: Linux keeps 15 bytes of a thread name
    // A pooled worker takes the job's name while it runs it.
    let rename = workers.is_some().then(|| name.clone());
    let task = move || {
        if let Some(name) = &rename {
            name_current_thread(name);
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).unwrap_or_else(|panic| {
            Err(Error::new(ErrorCode::Internal, format!("compile job panicked: {}", panic_message(&*panic))))
        });
        if rename.is_some() {
            name_current_thread("tz-worker");
        }
        let _ = sender.send(outcome); // the receiver is gone when abandoned
    };
    let worker = match workers {
        Some(pool) => {
            let worker = pool.take()?;
            worker.run(Box::new(task))?;
            Some(worker)
        }
        None => {
            std::thread::Builder::new()
                .name(name)
                .spawn(task)
                .map_err(|e| Error::io("spawn compile thread", e))?;
            None
        }
    };
    let outcome = wait_for_outcome(what, started + budget, &cancel, abort, &receiver);
    if let (Some(pool), Some(worker)) = (workers, worker) {
        match &outcome {
            // The task has returned: the worker is free again.
            Ok(_) => pool.give_back(worker),
            Err(_) => worker.retire(),
        }
    }
    outcome.unwrap_or_else(|abandoned| Err(abandoned))
}

/// Waits for a job's outcome until `deadline`; `Err` means the job was
/// abandoned (over budget or shut down) and may still be running.
fn wait_for_outcome<T>(
    what: &str,
    deadline: Instant,
    cancel: &CancelToken,
    abort: Option<&std::sync::atomic::AtomicBool>,
    receiver: &mpsc::Receiver<Result<T>>,
) -> std::result::Result<Result<T>, Error> {
    let started = Instant::now();
    let budget = deadline.saturating_duration_since(started);
    let outcome = loop {
        let now = Instant::now();
        let slice = deadline.saturating_duration_since(now).min(Duration::from_millis(20));
        match receiver.recv_timeout(slice) {
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if abort.is_some_and(|a| a.load(Ordering::Acquire)) {
                    cancel.cancel();
                    return Err(Error::failure(
                        ErrorCode::BudgetExceeded,
                        FailureReason::Abandoned,
                        format!("{what} was running at shutdown"),
                    ));
                }
            }
            other => break other,
        }
    };
    match outcome {
        Ok(outcome) => Ok(outcome),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            cancel.cancel();
            Err(Error::failure(
                ErrorCode::BudgetExceeded,
                FailureReason::BudgetExceeded,
                format!(
                    "{what} still running after {:.1} s (budget {:.1} s); abandoned",
                    started.elapsed().as_secs_f64(),
                    budget.as_secs_f64()
                ),
            ))
        }
        // The task ended without sending: only a worker that died can do that.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(Error::new(ErrorCode::Internal, format!("{what}: compile thread ended without a result")))
        }
    }
}
