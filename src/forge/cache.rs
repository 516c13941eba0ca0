//! Cache maintenance: entries unused for longer than the TTL expire, then
//! the least recently used go until the cache fits its cap; stale queue
//! entries and the debris of interrupted writes are removed on the same pass.
use std::time::{Duration, SystemTime};

use super::engine::Forge;
use super::host::LogLevel;
use super::observe::CacheStats;
use super::report::MaintenanceReport;
use crate::base::error::Result;
use crate::state::artifact::ArtifactRecord;

/// Which of `entries` (record, last use) to evict at `now`: those unused for
/// longer than `ttl`, then the least recently used until `capacity` bytes fit.
pub fn eviction_plan(
    mut entries: Vec<(ArtifactRecord, SystemTime)>,
    now: SystemTime,
    ttl: Duration,
    capacity: u64,
) -> Vec<ArtifactRecord> {
    entries.sort_by_key(|(_, used)| *used);
    let mut bytes: u64 = entries.iter().map(|(r, _)| r.size_bytes).sum();
    let mut evict = Vec::new();
    for (record, used) in entries {
        let expired = now.duration_since(used).unwrap_or_default() > ttl;
        if expired || bytes > capacity {
            bytes = bytes.saturating_sub(record.size_bytes);
            evict.push(record);
        }
    }
    evict
}

impl Forge {
    /// Cache lifecycle: evicts entries unused for longer than the TTL, then
    /// the least recently used until the cache fits its cap. An evicted
    /// current artifact leaves the stored catalog (journal record, guard
    /// slot removed) and is compiled again when next needed.
    pub fn maintain_cache(&mut self) -> Result<CacheStats> {
        let entries = self.ledger.store().cache_entries();
        let plan = eviction_plan(entries, SystemTime::now(), self.config.cache_ttl, self.config.cache_capacity_bytes);
        for record in &plan {
            // Answers stop naming the artifact before its files go (and
            // name it again if it stays current because eviction failed).
            let current = self.ledger.artifacts().get(&record.blueprint_id).filter(|a| a.cache_key == record.cache_key).cloned();
            if current.is_some() {
                self.prefetcher.withdraw(&record.blueprint_id);
            }
            if let Err(error) = self.ledger.evict(record) {
                if let Some(still) = current.filter(|c| self.ledger.artifacts().get(&c.blueprint_id) == Some(c)) {
                    let remote = self.remote_ref(&still);
                    self.prefetcher.set_current(&still, remote);
                }
                return Err(error);
            }
            self.observer.cache.evictions += 1;
            let key = &record.cache_key[..16.min(record.cache_key.len())];
            self.host.log(LogLevel::Info, &format!("evicted {} ({key}) from the cache", record.blueprint_id));
        }
        let remaining = self.ledger.store().cache_entries();
        self.observer.cache.bytes = remaining.iter().map(|(r, _)| r.size_bytes).sum();
        self.observer.cache.entries = remaining.len() as u64;
        Ok(self.observer.cache)
    }

    /// One pass of TTL maintenance (every 5 minutes on the background
    /// thread and after each run): stale queue entries leave the queue,
    /// debris of interrupted writes is removed, cache entries expire and the
    /// cache is brought under its cap.
    pub fn maintain(&mut self) -> Result<MaintenanceReport> {
        let expired_jobs = self.expire_stale_jobs()?;
        let debris_removed = self.ledger.remove_debris()?;
        if debris_removed > 0 {
            self.host.log(LogLevel::Info, &format!("removed {debris_removed} files left by interrupted writes"));
        }
        let cache = self.maintain_cache()?;
        self.log_checkpoint_failure();
        Ok(MaintenanceReport { cache, expired_jobs, debris_removed })
    }
}
