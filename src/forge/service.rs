//! The forge as a service: one shared handle that several threads may call
//! at once (calls are serialised), a background thread for periodic work
//! (refresh and queue, telemetry, maintenance), containment of panics (a
//! panic poisons the handle), refusal of re-entrant calls from the forge's
//! own callbacks, and an orderly close. The C ABI, the CLI and Rust hosts
//! all use this one.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::ForgeConfig;
use super::engine::Forge;
use super::host::Host;
use super::prefetch::{PrefetchAnswer, Prefetcher};
use crate::base::leyline::KernelPrefetchRequest;
use crate::base::error::{panic_message, Error, ErrorCode, Result};

/// How often the background thread runs TTL maintenance.
pub const MAINTENANCE_EVERY: Duration = Duration::from_secs(300);
/// How often, with a bus, published catalog updates leave the outbox
/// durably when no commit does it first.
pub const OUTBOX_EVERY: Duration = Duration::from_millis(500);
/// How long a close waits for queued bus messages to be published.
pub const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// What the handle and its background thread share.
struct Shared {
    forge: Mutex<Option<Forge>>,
    poisoned: AtomicBool,
    /// Token of the thread currently inside a call (0 = none); detects
    /// re-entrant calls from callbacks, which would otherwise deadlock.
    owner: AtomicU64,
    /// Set at close; wakes the background thread.
    stop: Mutex<bool>,
    wake: Condvar,
    /// The forge's shutdown flag, reachable without its lock.
    shutdown: Arc<AtomicBool>,
    /// Answers prefetch requests without the forge's lock; the flag (set
    /// at close, under the write lock) refuses them once closing began, and
    /// close waits for those in progress.
    prefetch: RwLock<(Prefetcher, bool)>,
}

thread_local! {
    static THREAD_TOKEN: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// The calling thread's token (never 0).
fn thread_token() -> u64 {
    THREAD_TOKEN.with(|t| *t)
}

/// The error a contained panic turns into.
pub fn panic_error(panic: &(dyn std::any::Any + Send)) -> Error {
    Error::new(ErrorCode::Internal, format!("internal error (contained panic): {}", panic_message(panic)))
}

impl Shared {
    /// Runs `body` with exclusive access to the forge; a panic inside it
    /// poisons the handle and becomes an internal-error status.
    fn with<T>(&self, body: impl FnOnce(&mut Forge) -> Result<T>) -> Result<T> {
        let token = thread_token();
        if self.owner.load(Ordering::Acquire) == token {
            return Err(Error::invalid("re-entrant call on a forge from inside one of its own callbacks"));
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::new(ErrorCode::Poisoned, "forge handle is poisoned by an earlier internal error; close it"));
        }
        let mut guard = self.forge.lock().unwrap_or_else(|p| p.into_inner());
        self.owner.store(token, Ordering::Release);
        let outcome = match guard.as_mut() {
            Some(forge) => catch_unwind(AssertUnwindSafe(|| body(forge))),
            None => Ok(Err(Error::new(ErrorCode::Internal, "forge is closed"))),
        };
        self.owner.store(0, Ordering::Release);
        match outcome {
            Ok(result) => result,
            Err(panic) => {
                self.poisoned.store(true, Ordering::Release);
                Err(panic_error(&*panic))
            }
        }
    }
}

/// A forge shared between threads, with its background thread.
pub struct ForgeService {
    shared: Arc<Shared>,
    background: Option<JoinHandle<()>>,
}

impl ForgeService {
    /// Opens a forge; starts the background thread when the configuration
    /// asks for periodic refresh or telemetry.
    pub fn open(config: ForgeConfig, host: Box<dyn Host>) -> Result<ForgeService> {
        let every = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        let (refresh, telemetry) = (every(config.refresh_interval_ms), every(config.telemetry_interval_ms));
        let outbox = config.bus.as_ref().map(|_| OUTBOX_EVERY);
        let share = config.fleet.as_ref().filter(|f| f.publish).map(|f| f.retry_interval);
        let forge = Forge::open(config, host)?;
        let shutdown = forge.shutdown_flag();
        let prefetch = RwLock::new((forge.prefetcher(), false));
        let shared = Arc::new(Shared {
            forge: Mutex::new(Some(forge)),
            poisoned: AtomicBool::new(false),
            owner: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            shutdown,
            prefetch,
        });
        let background = if refresh.is_some() || telemetry.is_some() || outbox.is_some() || share.is_some() {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name("tezzeret-service".into())
                .spawn(move || background_loop(shared, Periods { refresh, telemetry, outbox, share }))
                .map_err(|e| Error::io("start the forge's background thread", e))?;
            Some(thread)
        } else {
            None
        };
        Ok(ForgeService { shared, background })
    }

    /// Runs `body` with exclusive access to the forge (other threads' calls
    /// wait). Refused when called from inside one of the forge's callbacks
    /// (re-entrant) or after a panic poisoned the handle; a panic inside
    /// `body` is contained, poisons the handle and becomes an error.
    pub fn with<T>(&self, body: impl FnOnce(&mut Forge) -> Result<T>) -> Result<T> {
        // Our own reference: a close on another thread waits for this call
        // (it needs the forge's lock) and cannot free what it still uses.
        let shared = Arc::clone(&self.shared);
        shared.with(body)
    }

    /// Answers a prefetch request like [`Forge::prefetch`], without waiting
    /// for calls in progress (a compile does not delay it). Refused once a
    /// panic poisoned the handle.
    pub fn prefetch(&self, request: &KernelPrefetchRequest) -> Result<PrefetchAnswer> {
        let shared = Arc::clone(&self.shared);
        if shared.poisoned.load(Ordering::Acquire) {
            return Err(Error::new(ErrorCode::Poisoned, "forge handle is poisoned by an earlier internal error; close it"));
        }
        let gate = shared.prefetch.read().unwrap_or_else(|p| p.into_inner());
        let (prefetcher, closed) = &*gate;
        if *closed {
            return Err(Error::new(ErrorCode::Internal, "forge is closed"));
        }
        catch_unwind(AssertUnwindSafe(|| prefetcher.answer(request))).map_err(|panic| panic_error(&*panic))
    }

    /// Whether the calling thread is inside a call on this forge (that is,
    /// in one of its callbacks): closing from there must be refused.
    pub fn called_from_inside(&self) -> bool {
        self.shared.owner.load(Ordering::Acquire) == thread_token()
    }

    /// Whether a contained panic poisoned the handle.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Closes the forge: abandons a running compile (queued jobs stay
    /// queued, durably), waits for calls in progress on other threads,
    /// stops the background thread, sends a last telemetry packet (unless
    /// poisoned), gives the bus a moment to publish what it has queued,
    /// and drops the forge (releasing the state lock and the host). No
    /// callback runs after this returns.
    pub fn close(self) {
        drop(self);
    }

    fn shut_down(&mut self) {
        let shared = &self.shared;
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // Abandon work in progress without taking the forge's lock (a job may hold it).
            shared.shutdown.store(true, Ordering::Release);
            shared.prefetch.write().unwrap_or_else(|p| p.into_inner()).1 = true;
            *shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
            shared.wake.notify_all();
            if let Some(thread) = self.background.take() {
                let _ = thread.join();
            }
            let mut inner = shared.forge.lock().unwrap_or_else(|p| p.into_inner()).take();
            // Calls back in from the callbacks below (close included) are
            // re-entrant ones, refused like any other.
            shared.owner.store(thread_token(), Ordering::Release);
            if !shared.poisoned.load(Ordering::Acquire) {
                if let Some(forge) = inner.as_mut() {
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        forge.emit_closing_telemetry();
                        if let Err(e) = forge.close_bus(CLOSE_FLUSH) {
                            forge.log_error("closing the bus", &e);
                        }
                    }));
                }
            }
            // Dropping may run the host's release callback.
            drop(inner);
            shared.owner.store(0, Ordering::Release);
        }));
    }
}

impl Drop for ForgeService {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// How often the background thread does each of its jobs (None: never).
struct Periods {
    refresh: Option<Duration>,
    telemetry: Option<Duration>,
    outbox: Option<Duration>,
    /// Offering unpublished artifacts to the fleet's bucket again.
    share: Option<Duration>,
}

/// The background thread: re-enumerates and runs the queue every refresh
/// interval, sends telemetry (with fresh resource readings) every telemetry
/// interval, records what the bus published, publishes to the fleet's
/// bucket what an outage left unpublished, maintains the cache every 5
/// minutes — until close.
fn background_loop(shared: Arc<Shared>, periods: Periods) {
    let Periods { refresh, telemetry, outbox, share } = periods;
    let start = Instant::now();
    let mut next_refresh = refresh.map(|d| start + d);
    let mut next_telemetry = telemetry.map(|d| start + d);
    let mut next_outbox = outbox.map(|d| start + d);
    let mut next_share = share.map(|d| start + d);
    let mut next_maintenance = start + MAINTENANCE_EVERY;
    loop {
        let deadline =
            [next_refresh, next_telemetry, next_outbox, next_share, Some(next_maintenance)].into_iter().flatten().min().expect("one deadline");
        {
            let stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
            let wait = deadline.saturating_duration_since(Instant::now());
            let (stop, _) = shared.wake.wait_timeout_while(stop, wait, |s| !*s).unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
        let now = Instant::now();
        if let (Some(due), Some(every)) = (next_refresh, refresh) {
            if now >= due {
                let _ = shared.with(|f| {
                    if let Err(e) = f.refresh() {
                        f.log_error("periodic refresh", &e);
                    }
                    f.drain(&mut |_| {});
                    Ok(())
                });
                next_refresh = Some(Instant::now() + every);
            }
        }
        if let (Some(due), Some(every)) = (next_telemetry, telemetry) {
            if now >= due {
                let _ = shared.with(|f| {
                    f.sample_resources();
                    f.emit_periodic_telemetry();
                    Ok(())
                });
                next_telemetry = Some(due + every);
            }
        }
        if let (Some(due), Some(every)) = (next_outbox, outbox) {
            if now >= due {
                let _ = shared.with(|f| {
                    if let Err(e) = f.record_published() {
                        f.log_error("recording published catalog updates", &e);
                    }
                    Ok(())
                });
                next_outbox = Some(Instant::now() + every);
            }
        }
        if let (Some(due), Some(every)) = (next_share, share) {
            if now >= due {
                // Read under the lock, published without it (a store that
                // does not answer must not hold the host's calls up), recorded
                // under it again.
                if let Ok(Some(pending)) = shared.with(|f| Ok(f.unshared_work())) {
                    let outcome = pending.publish();
                    let _ = shared.with(|f| Ok(f.record_shared_work(outcome)));
                }
                next_share = Some(Instant::now() + every);
            }
        }
        if now >= next_maintenance {
            let _ = shared.with(|f| {
                if let Err(e) = f.maintain() {
                    f.log_error("maintenance", &e);
                }
                Ok(())
            });
            next_maintenance = now + MAINTENANCE_EVERY;
        }
    }
}
