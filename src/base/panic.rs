//! Panics the library contains stay silent: a library must not write to its
//! host's streams. The message of a contained panic travels in the error it
//! becomes; the process's own panic hook still reports panics elsewhere.
use std::cell::Cell;
use std::panic;
use std::sync::Once;

thread_local! {
    /// Depth of nested quiet sections on this thread.
    static QUIET: Cell<u32> = const { Cell::new(0) };
}

/// Thread-name prefixes of the library's own threads, whose panics are
/// always contained (and so always silent).
const LIBRARY_THREADS: [&str; 2] = ["tz-", "tezzeret-"];

fn install_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let quiet = QUIET.with(Cell::get) > 0
                || std::thread::current().name().is_some_and(|n| LIBRARY_THREADS.iter().any(|p| n.starts_with(p)));
            if !quiet {
                previous(info);
            }
        }));
    });
}

/// Runs `body` with panics on this thread kept off stderr (the caller
/// catches them and reports them its own way).
pub fn quiet_panics<T>(body: impl FnOnce() -> T) -> T {
    install_hook();
    QUIET.with(|q| q.set(q.get() + 1));
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(q.get().saturating_sub(1)));
        }
    }
    let _restore = Restore;
    body()
}
