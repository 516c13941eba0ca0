//! The queue: which descriptors become jobs, in which order they run, and
//! which queued jobs can no longer be useful. Jobs are durable from the
//! moment they are acknowledged; they run by priority, then in submission
//! order, and that order survives restarts.
use std::collections::BTreeMap;
use std::time::Duration;

use super::engine::Forge;
use super::host::LogLevel;
use super::report::{JobReport, JobStatus, Progress, RefreshReport};
use crate::base::device::ComputeDevice;
use crate::base::error::{Error, ErrorCode, Result};
use crate::base::leyline::MessagePriority;
use crate::build::blueprints::ResolvedParams;
use crate::build::catalog::Descriptor;
use crate::build::compile::{self, CompileJob};
use crate::state::artifact::ArtifactRecord;
use crate::state::wal::journal::Job;

/// What planning a descriptor decided.
pub(super) enum Planned {
    /// Nothing to run (cached, refused, or invalid).
    Done(Box<JobReport>),
    /// A new job to enqueue.
    Submit(Box<Job>),
    /// An identical job is already queued: its sequence number.
    AlreadyQueued(u64),
}

impl Forge {
    /// Durably queues a job for a catalog descriptor at a priority; returns
    /// its sequence number once acknowledged, or None when a current
    /// artifact already serves it. A job already queued for it keeps its
    /// place in submission order and takes this priority.
    pub fn submit(&mut self, blueprint_id: &str, priority: MessagePriority) -> Result<Option<u64>> {
        let descriptor = self.catalog_descriptor(blueprint_id)?;
        match self.plan(&descriptor) {
            Planned::Done(report) => match report.error {
                Some(error) => Err(error),
                None => Ok(None),
            },
            Planned::AlreadyQueued(seq) => {
                if self.ledger.state().pending[&seq].priority != priority {
                    self.ledger.reprioritize(seq, priority)?;
                }
                Ok(Some(seq))
            }
            Planned::Submit(mut job) => {
                job.priority = priority;
                Ok(Some(self.ledger.submit(vec![*job])?[0]))
            }
        }
    }

    /// Processes every descriptor of the catalog: reuses a current artifact
    /// with the same cache key, refuses quarantined blueprints (unless
    /// allowed), durably enqueues the rest in one group commit, then runs
    /// the queue — jobs resumed from before a crash included — in priority
    /// and submission order.
    pub fn run(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Vec<JobReport> {
        let queued_at_open = std::mem::take(&mut self.queued_at_open);
        if !queued_at_open.is_empty() {
            progress(Progress::Queued(&queued_at_open));
        }
        let descriptors = self.catalog.descriptors().to_vec();
        let mut reports: BTreeMap<String, JobReport> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut submissions = Vec::new();
        for descriptor in &descriptors {
            order.push(descriptor.blueprint_id.clone());
            match self.plan(descriptor) {
                Planned::Done(report) => {
                    reports.insert(descriptor.blueprint_id.clone(), *report);
                }
                Planned::Submit(job) => submissions.push(*job),
                Planned::AlreadyQueued(_) => {}
            }
        }
        if !submissions.is_empty() {
            let ids: Vec<String> = submissions.iter().map(|j| j.blueprint_id.clone()).collect();
            match self.ledger.submit(submissions) {
                Ok(seqs) => progress(Progress::Queued(&ids.into_iter().zip(seqs).collect::<Vec<_>>())),
                Err(error) => {
                    // Not acknowledged: every one of them is reported failed, none silently dropped.
                    self.host.log(LogLevel::Error, &format!("could not enqueue {} jobs: {error}", ids.len()));
                    for id in ids {
                        self.observer.counters.failed += 1;
                        let name = self.catalog.get(&id).map(|d| d.name.clone()).unwrap_or_default();
                        let error = error.clone().context("enqueue");
                        reports.insert(id.clone(), self.report(&id, &name, JobStatus::Failed, None, Some(error)));
                    }
                }
            }
        }
        for report in self.drain(progress) {
            if !reports.contains_key(&report.blueprint_id) && self.catalog.get(&report.blueprint_id).is_none() {
                order.push(report.blueprint_id.clone()); // resumed from before, no longer enumerated
            }
            reports.insert(report.blueprint_id.clone(), report);
        }
        if let Err(error) = self.maintain() {
            self.host.log(LogLevel::Error, &format!("maintenance failed: {error}"));
        }
        let metrics = self.metrics();
        self.emit_telemetry(metrics, Vec::new());
        let mut reports: Vec<JobReport> = order.into_iter().filter_map(|id| reports.remove(&id)).collect();
        // An artifact evicted right away (cap too small) is no longer current.
        for report in &mut reports {
            if report.record.as_ref().is_some_and(|r| self.ledger.artifacts().get(&r.blueprint_id) != Some(r)) {
                report.artifact_path = None;
            }
        }
        reports
    }

    /// Compiles (or reuses) one descriptor of the catalog by id, now,
    /// bypassing the queue order, under its strategy's budget.
    pub fn compile_one(&mut self, blueprint_id: &str) -> Result<JobReport> {
        self.compile_urgently(blueprint_id, None)
    }

    /// As [`Self::compile_one`], abandoning the compile if it runs longer
    /// than `budget` (a caller's deadline: it replaces the strategy's
    /// budget for this call only, and conservative mode does not stretch it).
    pub fn compile_one_within(&mut self, blueprint_id: &str, budget: Duration) -> Result<JobReport> {
        self.compile_urgently(blueprint_id, Some(budget))
    }

    fn compile_urgently(&mut self, blueprint_id: &str, budget: Option<Duration>) -> Result<JobReport> {
        let descriptor = self.catalog_descriptor(blueprint_id)?;
        let seq = match self.plan(&descriptor) {
            Planned::Done(report) => return Ok(*report),
            Planned::Submit(job) => self.ledger.submit(vec![*job])?[0],
            Planned::AlreadyQueued(seq) => seq,
        };
        let job = self.ledger.state().pending[&seq].clone();
        Ok(self.execute(&job, budget))
    }

    /// Enumerates the host's descriptors again: new or changed ones (by
    /// content hash) are durably queued; ones no longer enumerated are
    /// reported (their artifacts stay).
    pub fn refresh(&mut self) -> Result<RefreshReport> {
        let Some(catalog) = self.host.enumerate()? else { return Ok(RefreshReport::default()) };
        let removed: Vec<String> = self
            .catalog
            .descriptors()
            .iter()
            .filter(|d| catalog.get(&d.blueprint_id).is_none())
            .map(|d| d.blueprint_id.clone())
            .collect();
        self.catalog = catalog;
        self.expire_stale_jobs()?;
        let queued = self.enqueue_catalog()?.into_iter().map(|(id, _)| id).collect();
        for id in &removed {
            self.host.log(LogLevel::Warn, &format!("{id} is no longer enumerated by the host; its artifact is kept"));
        }
        Ok(RefreshReport { queued, removed })
    }

    /// A descriptor of the catalog by id, or a NotFound error naming it.
    fn catalog_descriptor(&self, blueprint_id: &str) -> Result<Descriptor> {
        self.catalog
            .get(blueprint_id)
            .cloned()
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("unknown blueprint {blueprint_id:?}")))
    }

    /// The job a descriptor of the catalog makes under this configuration.
    pub(super) fn job_for(&self, descriptor: &Descriptor) -> Result<Job> {
        let id = &descriptor.blueprint_id;
        let mut compile_job = CompileJob::new(descriptor.clone(), self.effective_strategy());
        compile_job.overrides = self.config.parameter_overrides.get(id).cloned().unwrap_or_default();
        compile_job.input_shapes = self.config.input_shapes.get(id).cloned();
        compile_job.device = self.device;
        compile_job.batch = self.config.batch;
        let params = ResolvedParams::resolve(descriptor, &compile_job.overrides)?;
        let cache_key = compile::cache_key(&compile_job, &params);
        Ok(Job {
            seq: 0,
            priority: MessagePriority::Normal,
            blueprint_id: id.clone(),
            descriptor: compile_job.descriptor,
            overrides: compile_job.overrides,
            input_shapes: compile_job.input_shapes,
            strategy: compile_job.strategy,
            device: ComputeDevice::from_tch(compile_job.device),
            batch: compile_job.batch,
            cache_key,
        })
    }

    /// The queued job identical to `job` (same blueprint and cache key), if any.
    fn queued_seq(&self, job: &Job) -> Option<u64> {
        let state = self.ledger.state();
        state.queued_with_key(&job.cache_key).filter(|seq| state.pending[seq].blueprint_id == job.blueprint_id)
    }

    pub(super) fn plan(&mut self, descriptor: &Descriptor) -> Planned {
        let id = &descriptor.blueprint_id;
        self.observer.counters.total += 1;
        if descriptor.is_quarantined() && !self.config.allow_quarantine {
            let error = Error::new(
                ErrorCode::Quarantined,
                format!(
                    "{id} ({}) is quarantine-only (tier {:?}): refused; enable quarantine compilation to build it",
                    descriptor.name, descriptor.tier
                ),
            );
            return Planned::Done(Box::new(self.report(id, &descriptor.name, JobStatus::Refused, None, Some(error))));
        }
        let job = match self.job_for(descriptor) {
            Ok(job) => job,
            Err(error) => {
                self.observer.counters.failed += 1;
                return Planned::Done(Box::new(self.report(id, &descriptor.name, JobStatus::Failed, None, Some(error))));
            }
        };
        if let Some(record) = self.ledger.artifacts().get(id) {
            if record.cache_key == job.cache_key && self.ledger.usable(record) {
                let record = record.clone();
                self.observer.cache.hits += 1;
                self.ledger.store().touch(&record.cache_key);
                return Planned::Done(Box::new(self.report(id, &descriptor.name, JobStatus::Cached, Some(record), None)));
            }
        }
        match self.queued_seq(&job) {
            Some(seq) => Planned::AlreadyQueued(seq),
            None => Planned::Submit(Box::new(job)),
        }
    }

    pub(super) fn report(&self, blueprint_id: &str, name: &str, status: JobStatus, record: Option<ArtifactRecord>, error: Option<Error>) -> JobReport {
        JobReport {
            blueprint_id: blueprint_id.to_string(),
            name: name.to_string(),
            status,
            artifact_path: record.as_ref().map(|r| self.ledger.store().artifact_path(r)),
            record,
            error,
            compiled_during: None,
        }
    }

    /// Durably queues, in one group commit at priority NORMAL, every
    /// descriptor of the catalog that has no current artifact of its cache
    /// key and no queued job (quarantined ones only when allowed). Returns
    /// the jobs queued. Touches no counter: nothing ran yet.
    pub(super) fn enqueue_catalog(&mut self) -> Result<Vec<(String, u64)>> {
        let mut jobs = Vec::new();
        for descriptor in self.catalog.descriptors() {
            if descriptor.is_quarantined() && !self.config.allow_quarantine {
                continue;
            }
            let Ok(job) = self.job_for(descriptor) else { continue }; // reported when planned
            let current = self.ledger.artifacts().get(&job.blueprint_id).is_some_and(|a| a.cache_key == job.cache_key);
            if !current && self.queued_seq(&job).is_none() {
                jobs.push(job);
            }
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.blueprint_id.clone()).collect();
        let seqs = self.ledger.submit(jobs)?;
        Ok(ids.into_iter().zip(seqs).collect())
    }

    /// Takes out of the queue the jobs that can no longer be useful: their
    /// descriptor is no longer enumerated, or changed since they were
    /// queued (the new content gets its own job). Returns how many.
    pub(super) fn expire_stale_jobs(&mut self) -> Result<usize> {
        let stale: Vec<(u64, String, &'static str)> = self
            .ledger
            .state()
            .pending
            .values()
            .filter_map(|job| {
                let reason = match self.catalog.get(&job.blueprint_id) {
                    None => "descriptor_removed",
                    Some(d) if d.content_hash() != job.descriptor.content_hash() => "descriptor_changed",
                    Some(_) => return None,
                };
                Some((job.seq, job.blueprint_id.clone(), reason))
            })
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let records: Vec<(u64, &str)> = stale.iter().map(|(seq, _, reason)| (*seq, *reason)).collect();
        self.ledger.expire(&records)?;
        self.observer.counters.expired += stale.len() as u64;
        for (seq, id, reason) in &stale {
            self.host.log(LogLevel::Info, &format!("queued job #{seq} for {id} expired: {reason}"));
        }
        Ok(stale.len())
    }
}
