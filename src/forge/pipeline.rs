//! The compile pipeline of queued jobs: prepare (adopt a durable artifact
//! or set up a compile) → compile on a worker under the job's budgets →
//! finish (store, commit, announce — or record the failure). Draining the
//! queue overlaps them: the next job compiles while the last is stored.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::engine::Forge;
use super::host::LogLevel;
use super::ledger::{Adoption, Committing};
use super::report::{JobReport, JobStatus, Progress};
use super::share::{Admission, Admitted, Probed, Waiting};
use super::telemetry::{self, events};
use crate::base::error::{Error, ErrorCode, FailureReason, Result};
use crate::base::hex;
use crate::base::leyline::{TelemetryEvent, TelemetryLevel};
use crate::base::version::{ARTIFACT_FORMAT_VERSION, LIBRARY_VERSION, TORCH_VERSION};
use crate::build::compile::{self, CompileJob, CompiledArtifact};
use crate::fleet::lease::Lease;
use crate::fleet::publish::PendingPublication;
use crate::state::artifact::ArtifactRecord;
use crate::state::wal::journal::Job;

/// A queued job started by `drain` and not finished yet.
struct InFlight {
    /// Its index in the drained queue.
    position: usize,
    prepared: Result<Prepared>,
    /// Its compile, when it needs one (or why it could not start).
    compile: Option<Result<JoinHandle<Result<CompiledArtifact>>>>,
    /// The fleet lease it compiles under, given back once it is published.
    lease: Option<Lease>,
}

impl InFlight {
    /// Whether it adopts a durable artifact (no compile).
    fn adopts(&self) -> bool {
        matches!(self.prepared, Ok(Prepared::Adopted(_)))
    }
}

/// A compiled job stored durably here, whose commit waits for its upload
/// to the fleet's bucket (so that its catalog update carries the bucket's
/// reference) while the drain goes on with other jobs.
struct Uploading {
    /// Its index in the drained queue.
    position: usize,
    /// The fleet lease it compiled under.
    lease: Option<Lease>,
    stored: Stored,
}

/// A compiled artifact stored durably here, not committed yet.
struct Stored {
    record: ArtifactRecord,
    /// Its upload to the fleet's bucket, when there is one.
    publication: Option<PendingPublication>,
    /// The compile's start event and start.
    compiled: (TelemetryEvent, Instant),
    /// When the compile ran.
    compiled_during: Option<(Instant, Instant)>,
}

impl Stored {
    /// Whether it can be committed without waiting.
    fn uploaded(&self) -> bool {
        self.publication.as_ref().is_none_or(PendingPublication::is_finished)
    }
}

/// What finishing a started job left to do.
enum Finished {
    /// Nothing: its report (committed, or failed), and whether this forge
    /// published its artifact to the fleet's bucket all the same.
    Done(JobReport, bool),
    /// Its commit, once its upload ends (see [`Forge::commit_stored`]).
    Stored(Stored),
}

/// A job ready to compile.
pub(super) struct PendingCompile {
    job: CompileJob,
    budget: Duration,
    started: TelemetryEvent,
    begun: Instant,
}

/// What starting a job decided.
pub(super) enum Prepared {
    /// A durable artifact of its cache key exists: commit it, no compile.
    Adopted(ArtifactRecord),
    /// It must compile.
    Compile(PendingCompile),
}

/// Where a drain stands: jobs not started (in order, each with what the
/// fleet decided for it so far), jobs waiting for another host's lease,
/// jobs started.
struct Drain {
    ready: VecDeque<(usize, Admission)>,
    /// What the opening probe found of cache keys the bucket did not give.
    probed: HashMap<String, Probed>,
    waiting: Vec<Waiting>,
    in_flight: VecDeque<InFlight>,
    /// Jobs compiled and stored here, in queue order, committed as their
    /// uploads end.
    uploading: VecDeque<Uploading>,
    /// A claim was lost since the bucket was last listed.
    lost_claim: bool,
    /// The bucket's claims are few enough to list (see
    /// [`Forge::set_aside_claimed`]); false once a listing found too many.
    claims_listable: bool,
    /// How many jobs finished so far.
    finished: usize,
    /// How many jobs had finished when the bucket was last looked at
    /// (listed, or probed by the opening lookup).
    looked_after: usize,
}

impl Forge {
    /// Runs every queued job (priority, then FIFO) and returns their reports.
    ///
    /// Up to `effective_concurrency` jobs compile at once, started and
    /// committed in queue order. The queue is pipelined: as soon as a
    /// job's compile ends the next one starts, and the finished job is
    /// stored, committed and announced while it compiles — the forge's
    /// durable work hides behind the next compile instead of adding to it.
    /// Jobs adopting durable artifacts in a row commit together. In a fleet, artifacts the bucket holds are fetched first (all at
    /// once), and a job whose lease another host holds waits while the
    /// others run.
    pub fn drain(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Vec<JobReport> {
        let queue: Vec<Job> = self.ledger.state().queue().into_iter().cloned().collect();
        let total = queue.len();
        self.set_aside_unusable(&queue);
        let ready = self.start_order(&queue);
        let probed = self.fetch_from_fleet(&queue, ready.iter().map(|(position, _)| *position));
        let mut reports = Vec::with_capacity(total);
        let mut drain = Drain {
            ready,
            probed,
            waiting: Vec::new(),
            in_flight: VecDeque::new(),
            uploading: VecDeque::new(),
            lost_claim: false,
            claims_listable: true,
            finished: 0,
            looked_after: 0,
        };
        self.seek_start(&queue, &mut drain.ready, &mut drain.waiting, &drain.probed);
        loop {
            self.start_jobs(&queue, &mut drain, progress);
            let Some(front) = drain.in_flight.pop_front() else {
                // Whatever is uploading is committed before the drain waits or ends.
                self.commit_uploaded(&queue, &mut drain, true, progress, &mut reports);
                if drain.waiting.is_empty() || self.shutdown.load(Ordering::Acquire) {
                    break;
                }
                drain.ready = self.wait_for_fleet(&queue, &mut drain.waiting);
                continue;
            };
            if front.adopts() {
                // Commits stay in queue order.
                self.commit_uploaded(&queue, &mut drain, true, progress, &mut reports);
                // A run of adoptions in a row commits together.
                let mut run = vec![front];
                while let Some(next) = drain.in_flight.pop_front() {
                    if !next.adopts() {
                        drain.in_flight.push_front(next);
                        break;
                    }
                    run.push(next);
                }
                self.start_jobs(&queue, &mut drain, progress);
                let finished = self.finish_adopted(&queue, &run);
                for (adopted, report) in run.into_iter().zip(finished) {
                    self.hand_on(adopted.position, adopted.lease, report, false, total, progress, &mut reports);
                }
                drain.finished = reports.len();
                continue;
            }
            let InFlight { position, prepared, compile, lease } = front;
            // Uploads that ended while jobs compiled are committed before
            // this one's compile is waited for.
            self.commit_uploaded(&queue, &mut drain, false, progress, &mut reports);
            let compiled = compile.map(|c| {
                c.and_then(|h| h.join().unwrap_or_else(|_| Err(Error::new(ErrorCode::Internal, "compile thread panicked"))))
            });
            // The next job starts compiling before this one is stored.
            self.start_jobs(&queue, &mut drain, progress);
            let job = &queue[position];
            // A blueprint's revisions follow its commits: an earlier job
            // of the same blueprint commits before this one is stored.
            if drain.uploading.iter().any(|u| u.stored.record.blueprint_id == job.blueprint_id) {
                self.commit_uploaded(&queue, &mut drain, true, progress, &mut reports);
            }
            match self.finish_started(job, prepared, compiled) {
                Finished::Stored(stored) => {
                    drain.uploading.push_back(Uploading { position, lease, stored });
                    self.commit_uploaded(&queue, &mut drain, false, progress, &mut reports);
                }
                Finished::Done(report, published) => {
                    self.commit_uploaded(&queue, &mut drain, true, progress, &mut reports);
                    self.hand_on(position, lease, report, published, total, progress, &mut reports);
                    drain.finished = reports.len();
                }
            }
        }
        // Shutting down: leases of jobs that did not start go back at once.
        self.give_up_admissions(drain.ready.into_iter().map(|(_, admission)| admission));
        if let Some(fleet) = &self.fleet {
            fleet.settle();
        }
        self.share_pending();
        reports
    }

    /// Commits the stored jobs whose uploads ended, in queue order (all of
    /// them, waiting for their uploads, when `all`), and hands their
    /// reports on.
    fn commit_uploaded(
        &mut self,
        queue: &[Job],
        drain: &mut Drain,
        all: bool,
        progress: &mut dyn FnMut(Progress<'_>),
        reports: &mut Vec<JobReport>,
    ) {
        while drain.uploading.front().is_some_and(|u| all || u.stored.uploaded()) {
            let Uploading { position, lease, stored } = drain.uploading.pop_front().expect("an upload");
            let (report, published) = self.commit_stored(&queue[position], stored);
            self.hand_on(position, lease, report, published, queue.len(), progress, reports);
            drain.finished = reports.len();
        }
    }

    /// After the report of the job at `position`: ends its lease (kept if
    /// the bucket now holds its artifact — `published` says so of a job
    /// that failed here after publishing it) and hands the report on.
    #[allow(clippy::too_many_arguments)]
    fn hand_on(
        &mut self,
        position: usize,
        lease: Option<Lease>,
        report: JobReport,
        published: bool,
        total: usize,
        progress: &mut dyn FnMut(Progress<'_>),
        reports: &mut Vec<JobReport>,
    ) {
        if let Some(lease) = lease {
            let published = published || report.record.as_ref().is_some_and(|r| self.ledger.is_shared(r));
            self.end_lease(lease, published);
        }
        progress(Progress::Finished(position, total, &report));
        reports.push(report);
    }

    /// Runs one queued job to its end on the calling thread's watch, under
    /// `budget` when given (else its strategy's).
    pub(super) fn execute(&mut self, job: &Job, budget: Option<Duration>) -> JobReport {
        // Urgent: the bucket is asked, but no other host's lease is waited for.
        self.set_aside_unusable(std::slice::from_ref(job));
        self.fetch_from_fleet(std::slice::from_ref(job), 0..1);
        let prepared = self.record_start(job).and_then(|_| self.prepare(job, &mut |_| {})).map(|prepared| match (prepared, budget) {
            (Prepared::Compile(mut c), Some(budget)) => {
                c.budget = budget;
                Prepared::Compile(c)
            }
            (prepared, _) => prepared,
        });
        let compiled = match &prepared {
            Ok(Prepared::Compile(c)) => {
                Some(compile::compile_under(c.job.clone(), c.budget, self.config.memory_budget_bytes, self.execution(1)))
            }
            _ => None,
        };
        self.finish(job, prepared, compiled)
    }

    /// How a compile runs when `concurrent` compile at once: on the forge's
    /// workers, abandoned at shutdown, sharing the caller's libtorch
    /// intra-op threads among them so that they do not oversubscribe the cores.
    fn execution(&self, concurrent: usize) -> compile::Execution {
        let threads = tch::get_num_threads().max(1);
        compile::Execution {
            abort: Some(self.shutdown.clone()),
            workers: Some(self.workers.clone()),
            intra_op_threads: Some((threads / concurrent.max(1) as i32).max(1)),
        }
    }

    /// Starts queued jobs, in order, while fewer than `effective_concurrency`
    /// compile (none once shutting down); jobs whose lease another host
    /// holds are set aside to wait.
    fn start_jobs(&mut self, queue: &[Job], drain: &mut Drain, progress: &mut dyn FnMut(Progress<'_>)) {
        let total = queue.len();
        // Adoptions in a row have their starts recorded together.
        let mut adopting = Vec::new();
        while !drain.ready.is_empty() && !self.shutdown.load(Ordering::Acquire) {
            // Once a claim is lost, the bucket is listed again — as soon
            // as a job finished since the last look: the other hosts have
            // likely published about as much meanwhile.
            if drain.lost_claim && drain.looked_after < drain.finished {
                (drain.lost_claim, drain.looked_after) = (false, drain.finished);
                self.look_again(queue, &mut drain.ready, &mut drain.waiting, &mut drain.probed);
            }
            let width = (self.effective_concurrency() as usize).max(1);
            // The claims of the next job and of the `width` after it go
            // out now, to be answered while compiles run.
            self.claim_ahead(queue, &mut drain.ready, &drain.probed, width + 1);
            if drain.in_flight.iter().filter(|f| matches!(f.compile, Some(Ok(_)))).count() >= width {
                break;
            }
            let (position, admission) = drain.ready.pop_front().expect("a ready job");
            let job = &queue[position];
            let admitted = match admission {
                Admission::Go(lease) => Admitted::Go(lease),
                Admission::Ask => self.admit(job, drain.probed.remove(&job.cache_key), None),
                Admission::Claiming(claim) => self.admit(job, drain.probed.remove(&job.cache_key), Some(claim)),
            };
            let lease = match admitted {
                Admitted::Go(lease) => lease,
                Admitted::Wait(generation) => {
                    drain.waiting.push(Waiting { position, since: None, generation, lease_read: None });
                    drain.lost_claim = true;
                    // The next jobs are likely taken too: one listing of
                    // the claims says which, instead of a lost claim each.
                    if drain.claims_listable {
                        drain.claims_listable = self.set_aside_claimed(queue, &mut drain.ready, &mut drain.waiting, &drain.probed);
                    }
                    continue;
                }
            };
            progress(Progress::Started(position, total, &job.blueprint_id));
            let prepared = self.prepare(job, progress);
            if matches!(prepared, Ok(Prepared::Adopted(_))) {
                adopting.push(InFlight { position, prepared, compile: None, lease });
                continue;
            }
            let compile = match &prepared {
                Ok(Prepared::Compile(c)) => {
                    let execution = self.execution(width.min(drain.ready.len() + 1));
                    let (job, budget, memory) = (c.job.clone(), c.budget, self.config.memory_budget_bytes);
                    let spawned = std::thread::Builder::new()
                        .name("tz-wait".into())
                        .spawn(move || compile::compile_under(job, budget, memory, execution));
                    Some(spawned.map_err(|e| Error::io("start a compile", e)))
                }
                _ => None,
            };
            // Recorded once the compile is under way, so that the msync
            // overlaps it rather than delaying it.
            self.start_adopted(queue, &mut adopting, &mut drain.in_flight);
            let prepared = match (prepared, self.record_start(job)) {
                (Ok(prepared), Ok(())) => Ok(prepared),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
            drain.in_flight.push_back(InFlight { position, prepared, compile, lease });
        }
        self.start_adopted(queue, &mut adopting, &mut drain.in_flight);
    }

    /// Records the starts of adopting jobs in one journal append and moves
    /// them in flight (where a failure to record fails them).
    fn start_adopted(&mut self, queue: &[Job], adopting: &mut Vec<InFlight>, in_flight: &mut VecDeque<InFlight>) {
        if adopting.is_empty() {
            return;
        }
        let seqs: Vec<u64> = adopting.iter().map(|f| queue[f.position].seq).collect();
        match self.ledger.record_starts(&seqs) {
            Ok(retries) => self.observer.counters.retried += retries.len() as u64,
            Err(error) => adopting.iter_mut().for_each(|f| f.prepared = Err(error.clone())),
        }
        in_flight.extend(adopting.drain(..));
    }

    /// Why a job may not compile here, if it may not: a forge that accepts
    /// only artifacts signed by a trusted key but has no signing key would
    /// store an artifact it refuses itself (and announce a kernel it then
    /// will not serve).
    fn cannot_sign(&self, job: &Job) -> Option<Error> {
        let keys = self.ledger.keys();
        if !keys.verifies() || keys.signs() {
            return None;
        }
        let what = if self.fleet.is_some() { "has no usable copy from the fleet's bucket, and this forge" } else { "is not compiled: this forge" };
        Some(Error::failure(
            ErrorCode::Unsupported,
            FailureReason::SignatureInvalid,
            format!(
                "{} {what} accepts only artifacts signed by a trusted key but has no signing key to sign its own \
                 (give it one whose public key it trusts)",
                job.blueprint_id
            ),
        ))
    }

    /// Sets aside the stored artifacts of `jobs` that do not verify (see
    /// [`super::ledger::Ledger::set_aside_unusable`]), saying why for each, and that its
    /// job looks in the fleet's bucket (if any) before compiling.
    fn set_aside_unusable(&mut self, jobs: &[Job]) {
        let instead = if self.fleet.is_some() { "asking the fleet's bucket, else compiling" } else { "compiling" };
        for (job, error) in self.ledger.set_aside_unusable(jobs) {
            self.log_not_adopted(job, &error, instead);
        }
    }

    /// Says why the artifact stored here under a job's cache key is not
    /// used, and what the job does `instead`.
    fn log_not_adopted(&mut self, job: &Job, error: &Error, instead: &str) {
        let message = format!("{}: the durable artifact of its cache key is not adopted ({error}); {instead}", job.blueprint_id);
        self.host.log(LogLevel::Warn, &message);
    }

    /// Records durably that a job started (a crash from here on makes its
    /// next run a retry).
    fn record_start(&mut self, job: &Job) -> Result<()> {
        if self.ledger.record_start(job.seq)? {
            self.observer.counters.retried += 1;
        }
        Ok(())
    }

    /// Sets a job up: either adopts a durable artifact of its cache key (a
    /// crash came between storing and committing it) or prepares its
    /// compile.
    fn prepare(&mut self, job: &Job, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Prepared> {
        match self.ledger.adoption(job) {
            Adoption::Adopt(record) => {
                self.observer.cache.hits += 1;
                self.ledger.store().touch(&record.cache_key);
                return Ok(Prepared::Adopted(*record));
            }
            Adoption::Refused(error) => self.log_not_adopted(job, &error, "compiling"),
            Adoption::Nothing => {}
        }
        if let Some(error) = self.cannot_sign(job) {
            return Err(error);
        }
        let compile_job = CompileJob {
            descriptor: job.descriptor.clone(),
            overrides: job.overrides.clone(),
            strategy: job.strategy,
            device: job.device.to_tch(),
            batch: job.batch,
            input_shapes: job.input_shapes.clone(),
        };
        self.observer.counters.started += 1;
        self.observer.cache.misses += 1;
        progress(Progress::Compiling(&job.blueprint_id, &job.cache_key));
        let started = telemetry::event(
            events::COMPILE_STARTED,
            TelemetryLevel::Info,
            &[("blueprint_id", job.blueprint_id.clone()), ("strategy", job.strategy.name().to_string())],
        );
        let budget = self.effective_budget(job.strategy);
        Ok(Prepared::Compile(PendingCompile { job: compile_job, budget, started, begun: Instant::now() }))
    }

    /// Ends a job whose compile (if it needed one) is done: stores and
    /// commits, feeds the governor, records a failure, reports.
    fn finish(&mut self, job: &Job, prepared: Result<Prepared>, compiled: Option<Result<CompiledArtifact>>) -> JobReport {
        match self.finish_started(job, prepared, compiled) {
            Finished::Done(report, _) => report,
            Finished::Stored(stored) => self.commit_stored(job, stored).0,
        }
    }

    /// [`Self::finish`] up to the commit of a compiled artifact, which it
    /// leaves to [`Self::commit_stored`] once the artifact is stored here
    /// (its upload to the fleet's bucket may still be under way).
    fn finish_started(&mut self, job: &Job, prepared: Result<Prepared>, compiled: Option<Result<CompiledArtifact>>) -> Finished {
        let compiled_during = compiled.as_ref().and_then(|c| c.as_ref().ok()).map(|a| a.ran);
        let mut published = false;
        let outcome = match prepared {
            Err(e) => Err(e),
            Ok(Prepared::Adopted(record)) => self.commit_adopted(&[(job, &record)]).map(|_| (JobStatus::Cached, record)),
            Ok(Prepared::Compile(c)) => match compiled.expect("a compile result for a compile job") {
                Err(e) => Err(e.context(format!("{} ({})", job.blueprint_id, job.descriptor.name))),
                Ok(artifact) => {
                    self.observer.counters.compile_us_total += (artifact.job_ms * 1e3) as u64;
                    match self.store_compiled(job, &c, artifact, compiled_during) {
                        Ok(stored) => return Finished::Stored(stored),
                        Err((e, uploaded)) => {
                            published = uploaded;
                            Err(e)
                        }
                    }
                }
            },
        };
        Finished::Done(self.conclude(job, outcome, compiled_during), published)
    }

    /// Commits a compiled artifact stored here once its upload ended
    /// (waiting for it if need be), and reports its job; also whether the
    /// bucket now holds the artifact (even if the commit failed).
    fn commit_stored(&mut self, job: &Job, stored: Stored) -> (JobReport, bool) {
        let Stored { record, publication, compiled, compiled_during } = stored;
        let shared = self.finish_publish(&record, publication);
        let outcome = self.commit(job, &record, Some(compiled), shared).map(|()| (JobStatus::Ok, record));
        (self.conclude(job, outcome, compiled_during), shared)
    }

    /// Ends jobs adopting durable artifacts: commits them together, then
    /// reports each as [`Self::finish`] would.
    fn finish_adopted(&mut self, queue: &[Job], run: &[InFlight]) -> Vec<JobReport> {
        let adopted: Vec<(&Job, &ArtifactRecord)> = run
            .iter()
            .filter_map(|f| match &f.prepared {
                Ok(Prepared::Adopted(record)) => Some((&queue[f.position], record)),
                _ => None,
            })
            .collect();
        let committed = self.commit_adopted(&adopted);
        adopted
            .into_iter()
            .map(|(job, record)| {
                let outcome = committed.clone().map(|()| (JobStatus::Cached, record.clone()));
                self.conclude(job, outcome, None)
            })
            .collect()
    }

    /// Feeds the governor with a job's outcome, records a failure, and
    /// reports it (`compiled_during`: how long its compile ran).
    fn conclude(
        &mut self,
        job: &Job,
        outcome: Result<(JobStatus, ArtifactRecord)>,
        compiled_during: Option<(Instant, Instant)>,
    ) -> JobReport {
        let name = job.descriptor.name.clone();
        if self.shutdown.load(Ordering::Acquire) {
            if let Err(error) = outcome {
                // Abandoned by shutdown: not a failure of the job, which stays
                // queued (durably) and resumes at the next open.
                return self.report(&job.blueprint_id, &name, JobStatus::Failed, None, Some(error));
            }
        }
        let changes = match &outcome {
            Ok((JobStatus::Ok, _)) => self.governor.job_succeeded(),
            Ok(_) => self.governor.refresh(),
            Err(e) => self.governor.job_failed(e.reason()),
        };
        self.announce(changes);
        match outcome {
            Ok((status, record)) => {
                let mut report = self.report(&job.blueprint_id, &name, status, Some(record), None);
                report.compiled_during = compiled_during;
                report
            }
            Err(error) => {
                self.observer.counters.failed += 1;
                if error.code() == ErrorCode::BudgetExceeded {
                    self.observer.counters.abandoned += 1;
                }
                let reason = error.reason_name();
                self.host.log(LogLevel::Error, &format!("{} failed: {error}", job.blueprint_id));
                if let Err(e) = self.ledger.record_failure(job.seq, reason, error.message()) {
                    self.host.log(LogLevel::Error, &format!("could not record the failure of {}: {e}", job.blueprint_id));
                }
                let failed = telemetry::event(
                    events::COMPILE_FAILED,
                    TelemetryLevel::Error,
                    &[("blueprint_id", job.blueprint_id.clone()), ("reason", reason.to_string())],
                );
                let metrics = self.observer.counters.metrics();
                self.emit_telemetry(metrics, vec![failed]);
                self.report(&job.blueprint_id, &name, JobStatus::Failed, None, Some(error))
            }
        }
    }

    /// Stores a compiled artifact durably here while its upload to the
    /// fleet's bucket starts (see [`Self::commit_stored`] for the rest).
    /// On failure, also whether the bucket now holds the artifact.
    fn store_compiled(
        &mut self,
        job: &Job,
        c: &PendingCompile,
        artifact: CompiledArtifact,
        compiled_during: Option<(Instant, Instant)>,
    ) -> std::result::Result<Stored, (Error, bool)> {
        let descriptor = &c.job.descriptor;
        let record = ArtifactRecord {
            blueprint_id: job.blueprint_id.clone(),
            name: descriptor.name.clone(),
            descriptor_hash: hex::encode(&descriptor.content_hash()),
            params: artifact.params.values().clone(),
            strategy: artifact.strategy.name().to_string(),
            variant: artifact.variant.clone(),
            device: artifact.device.clone(),
            cache_key: artifact.cache_key.clone(),
            artifact_file: String::new(),
            checksum: String::new(),
            size_bytes: 0,
            guard_digest: artifact.guard_digest.clone(),
            guard_spec: artifact.guard_spec.clone(),
            dynamic_batch: artifact.dynamic_batch,
            compile_ms: artifact.compile_ms,
            prewarm_p50_ms: artifact.prewarm_p50_ms,
            prewarm_p95_ms: artifact.prewarm_p95_ms,
            tezzeret_version: LIBRARY_VERSION.to_string(),
            torch_version: TORCH_VERSION.to_string(),
            format_version: ARTIFACT_FORMAT_VERSION,
            revision: self.ledger.next_revision(&job.blueprint_id),
            signature: None,
        };
        // The uploads to the fleet's bucket overlap the local durable store.
        let bytes = std::sync::Arc::new(artifact.bytes);
        let record = self.ledger.complete_record(record, &bytes);
        let publication = self.start_publish(&record, &bytes);
        if let Err(error) = self.ledger.store_compiled(&record, &bytes) {
            // Not stored here: the upload ends before the lease is ended
            // (kept if the bucket now holds the artifact).
            return Err((error, self.finish_publish(&record, publication)));
        }
        Ok(Stored { record, publication, compiled: (c.started.clone(), c.begun), compiled_during })
    }

    /// Makes a compiled artifact, stored, current (journal, guard slot),
    /// then tells the host: the catalog update only once it is durable
    /// everywhere. `shared`: the fleet's bucket has just received it.
    fn commit(&mut self, job: &Job, record: &ArtifactRecord, compiled: Option<(TelemetryEvent, Instant)>, shared: bool) -> Result<()> {
        self.make_current(&[(job, record)], shared)?;
        self.tell_committed(record, compiled);
        Ok(())
    }

    /// Makes durable artifacts that jobs adopt current, together (one
    /// journal append, one guard-table sync), then tells the host of each.
    fn commit_adopted(&mut self, adopted: &[(&Job, &ArtifactRecord)]) -> Result<()> {
        self.make_current(adopted, false)?;
        for (_, record) in adopted {
            self.tell_committed(record, None);
        }
        Ok(())
    }

    /// Commits stored artifacts in one durable step and sends their
    /// catalog updates (to the host, and to the bus's outbox).
    fn make_current(&mut self, commits: &[(&Job, &ArtifactRecord)], shared: bool) -> Result<()> {
        self.log_bus_notes();
        self.log_checkpoint_failure();
        let published = self.bus.as_ref().map(|b| b.take_published()).unwrap_or_default();
        let committing: Vec<Committing<'_>> = commits
            .iter()
            .map(|&(job, record)| {
                let remote_ref = match &self.fleet {
                    Some(fleet) if shared => Some(fleet.artifact_url(record)),
                    _ => self.remote_ref(record),
                };
                Committing { seq: job.seq, record, remote_ref }
            })
            .collect();
        let committed = match self.ledger.commit_all(&committing, published.clone()) {
            Ok(committed) => committed,
            Err(error) => {
                // The commit may have become durable before failing (a guard
                // slot, a checkpoint): whatever the outbox now holds goes out.
                if let Some(bus) = &self.bus {
                    bus.untake_published(published);
                }
                self.announce_outbox();
                return Err(error);
            }
        };
        for (commit, (update, announcement)) in committing.into_iter().zip(committed) {
            self.prefetcher.set_current(commit.record, commit.remote_ref);
            self.observer.counters.completed += 1;
            self.send_catalog_update(&update, announcement.as_ref());
        }
        Ok(())
    }

    /// Tells the host's telemetry and log that an artifact became current
    /// (`compiled`: its compile's start event and start, when it compiled).
    fn tell_committed(&mut self, record: &ArtifactRecord, compiled: Option<(TelemetryEvent, Instant)>) {
        let strategy = record.strategy.as_str();
        let mut metrics = self.observer.counters.metrics();
        metrics.push(telemetry::metric("tezzeret.compilation.duration_ms", record.compile_ms, "ms", &[("strategy", strategy)]));
        for (quantile, value) in [("p50", record.prewarm_p50_ms), ("p95", record.prewarm_p95_ms)] {
            metrics.push(telemetry::metric("tezzeret.prewarm.ms", value, "ms", &[("strategy", strategy), ("quantile", quantile)]));
        }
        let id = record.blueprint_id.clone();
        let mut events_out = Vec::new();
        if let Some((started, begun)) = compiled {
            events_out.push(started);
            events_out.push(telemetry::event(events::PREWARM_COMPLETED, TelemetryLevel::Info, &[("blueprint_id", id.clone())]));
            events_out.push(telemetry::event(
                events::COMPILE_SUCCEEDED,
                TelemetryLevel::Info,
                &[("blueprint_id", id.clone()), ("job_ms", format!("{:.3}", begun.elapsed().as_secs_f64() * 1e3))],
            ));
        }
        self.emit_telemetry(metrics, events_out);
        self.host.log(LogLevel::Debug, &format!("{id} committed ({:.1} ms compile)", record.compile_ms));
    }
}
