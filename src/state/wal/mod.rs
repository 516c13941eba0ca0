//! The write-ahead log and the job journal kept in it.
//!
//! [`log`] is the file format and its durability discipline; [`journal`]
//! gives meaning to the records: jobs enqueued, finished or failed,
//! artifacts committed or evicted, and checkpoints that keep the log short.
pub mod format;
pub mod journal;
pub mod log;
pub mod recovery;

pub use journal::{Journal, JournalState, Job, Record};
pub use log::Wal;
pub use recovery::{read_only, scan, Recovery, Transaction};
