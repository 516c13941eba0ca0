//! The forge layer: a forge owns a state directory, learns descriptors from
//! its host, compiles what is not compiled yet, stores artifacts durably and
//! tells the host (catalog updates, telemetry, log lines).
//!
//! Each part owns its state: [`ledger`] the durable state and the rule that
//! journal, store and guard table agree; [`governor`] breakers and
//! conservative mode; [`observe`] counters, metrics and health;
//! [`prefetch`] the verifications prefetch answers from. [`engine`] ties
//! them into [`Forge`]; [`queue`], [`pipeline`], [`share`] (the fleet)
//! and [`cache`] are the forge's behaviour; [`service`] shares a forge between threads with a
//! background thread, and is what the C ABI and the CLI use.
pub mod breakers;
pub mod cache;
pub mod config;
pub mod engine;
pub mod governor;
pub mod host;
pub mod kernel;
pub mod ledger;
pub mod observe;
pub mod pipeline;
pub mod prefetch;
pub mod queue;
pub mod report;
pub mod service;
pub mod share;
pub mod telemetry;

pub use config::{DevicePreference, ForgeConfig, DEFAULT_MEMORY_BUDGET_BYTES};
pub use engine::Forge;
pub use governor::ResourceReading;
pub use host::{DefaultHost, Host, LogLevel};
pub use observe::CacheStats;
pub use prefetch::PrefetchAnswer;
pub use report::{JobReport, JobStatus, MaintenanceReport, Progress, RefreshReport};
pub use service::ForgeService;
