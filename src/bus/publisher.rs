//! The publisher: a thread that adds what the forge hands it — catalog
//! updates from the outbox and telemetry packets — to their streams, in
//! batches (each one transaction), and reports which outbox entries Redis
//! has so the forge can take them out of its outbox durably.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::envelope::{self, Sealed};
use super::link::{add_entry, Link, Role};
use super::Shared;
use crate::base::leyline::{self, BusMessageType, KernelCatalogUpdate, MessagePriority, TelemetryLevel, TelemetryPacket};

/// Most telemetry packets kept waiting while Redis is down (older ones go).
pub const TELEMETRY_BACKLOG: usize = 1024;
/// Most entries added in one round trip.
const BATCH: usize = 256;
/// The entries of a batch kept for telemetry when there is some waiting.
const TELEMETRY_SHARE: usize = 32;

/// What waits to be published.
#[derive(Debug, Default)]
pub struct Queue {
    /// Catalog updates (outbox sequence, entry), oldest first.
    pub updates: VecDeque<(u64, Sealed)>,
    /// Telemetry packets (stream, entry), oldest first.
    pub telemetry: VecDeque<(String, Sealed)>,
    /// Outbox sequences Redis has, not yet taken by the forge.
    pub published: Vec<u64>,
    /// Outbox sequences queued or published and not yet taken: an update
    /// handed over again (after a failed commit, at open) is not doubled.
    pub known: std::collections::HashSet<u64>,
    /// Set when the forge closes.
    pub stop: bool,
    /// Until when a closing publisher still tries to empty the queue.
    pub flush_until: Option<Instant>,
}

impl Queue {
    /// The next batch: catalog updates first, in order, then telemetry —
    /// which keeps a share of every batch when some waits, so that updates
    /// Redis keeps refusing (a ready stream of the wrong type) do not hold
    /// back health and emergency packets.
    fn next_batch(&self) -> (Vec<(u64, Sealed)>, Vec<(String, Sealed)>) {
        let telemetry_share = TELEMETRY_SHARE.min(self.telemetry.len());
        let updates: Vec<(u64, Sealed)> = self.updates.iter().take(BATCH - telemetry_share).cloned().collect();
        let room = BATCH - updates.len();
        let telemetry: Vec<(String, Sealed)> = self.telemetry.iter().take(room).cloned().collect();
        (updates, telemetry)
    }
}

/// The envelope attributes of a published message: ours, and its priority.
fn attributes(message_id: &str, priority: MessagePriority) -> BTreeMap<String, String> {
    let mut attributes = envelope::attributes(message_id);
    attributes.insert("priority".to_string(), priority_name(priority).to_string());
    attributes
}

/// A priority's Leyline name without its prefix (`NORMAL`, `HIGH`, …).
fn priority_name(priority: MessagePriority) -> &'static str {
    match priority {
        MessagePriority::Unspecified => "UNSPECIFIED",
        MessagePriority::Low => "LOW",
        MessagePriority::Normal => "NORMAL",
        MessagePriority::High => "HIGH",
        MessagePriority::Critical => "CRITICAL",
    }
}

/// Seals a catalog update (its outbox id is its stable message id).
pub fn seal_update(message_id: &str, update: &KernelCatalogUpdate, secret: Option<&[u8]>) -> Sealed {
    let attributes = attributes(message_id, MessagePriority::Normal);
    envelope::seal(BusMessageType::KernelCatalogUpdate, leyline::encode(update), attributes, secret)
}

/// The priority of a telemetry packet: CRITICAL for a critical packet,
/// HIGH for an error, else NORMAL.
pub fn telemetry_priority(packet: &TelemetryPacket) -> MessagePriority {
    match TelemetryLevel::try_from(packet.level).unwrap_or(TelemetryLevel::Unspecified) {
        TelemetryLevel::Critical => MessagePriority::Critical,
        TelemetryLevel::Error => MessagePriority::High,
        _ => MessagePriority::Normal,
    }
}

/// Seals a telemetry packet.
pub fn seal_telemetry(packet: &TelemetryPacket, secret: Option<&[u8]>) -> Sealed {
    let attributes = attributes(&packet.packet_id, telemetry_priority(packet));
    envelope::seal(BusMessageType::Telemetry, leyline::encode(packet), attributes, secret)
}

/// The entry's fields for XADD.
pub fn fields(sealed: &Sealed) -> Vec<(&str, &[u8])> {
    let mut fields = vec![(envelope::PAYLOAD_FIELD, sealed.payload.as_slice())];
    if let Some(signature) = &sealed.signature {
        fields.push((envelope::SIGNATURE_FIELD, signature.as_bytes()));
    }
    fields
}

/// The publisher thread's body: until the forge closes (and, closing,
/// until the queue is empty, Redis is down or the flush time is over).
pub fn run(shared: Arc<Shared>, mut link: Link) {
    let config = &shared.config;
    // Connected from the start, so that health tells the truth before the first message.
    let _ = link.connection(&shared.stats);
    loop {
        let (updates, telemetry) = {
            let mut queue = shared.lock();
            while queue.updates.is_empty() && queue.telemetry.is_empty() && !queue.stop {
                let (next, idle) = shared.wake.wait_timeout(queue, IDLE_CHECK).unwrap_or_else(|p| p.into_inner());
                queue = next;
                if idle.timed_out() && queue.updates.is_empty() && queue.telemetry.is_empty() && !queue.stop {
                    // Idle: check the connection (or retry it), so an outage shows in health.
                    drop(queue);
                    check_idle(&shared, &mut link);
                    queue = shared.lock();
                }
            }
            let empty = queue.updates.is_empty() && queue.telemetry.is_empty();
            let flush_over = queue.flush_until.is_none_or(|t| Instant::now() >= t);
            if queue.stop && (empty || flush_over) {
                return;
            }
            queue.next_batch()
        };
        if let Err(error) = crate::sys::failpoint::hit("bus.publish") {
            link.failed(&shared.stats, &redis::RedisError::from(error));
            continue;
        }
        let min_id = link.min_id(config.message_ttl);
        let Some(connection) = link.connection(&shared.stats) else {
            let queue = shared.lock();
            if queue.stop {
                return; // closing while Redis is down: the outbox keeps the rest
            }
            let _ = shared.wake.wait_timeout(queue, link.retry_in().max(Duration::from_millis(1)));
            continue;
        };
        let mut pipe = redis::pipe();
        // One transaction: Redis out of memory refuses all of a batch or
        // none of it, so a refused catalog update is never overtaken on the
        // stream by a later one (for the same blueprint, say its s3://
        // reference by its local path). Each entry still gets its own
        // answer: a stream of the wrong type refuses only its own.
        pipe.atomic();
        for (_, sealed) in &updates {
            add_entry(&mut pipe, &config.streams.ready, &min_id, &fields(sealed));
        }
        for (stream, sealed) in &telemetry {
            add_entry(&mut pipe, stream, &min_id, &fields(sealed));
        }
        // Sent as packed commands so that the answer to `EXEC` itself is
        // seen as Redis gave it (the pipeline's own parsing reads a refused
        // `EXEC` as an answer it does not understand). The call is the one
        // `Pipeline::query` makes for a transaction (the same bytes, the
        // same count of answers skipped and read); redis-rs keeps it for
        // its own use, so the bus suite's tests check it on each upgrade.
        let answer = redis::ConnectionLike::req_packed_commands(connection, &pipe.get_packed_pipeline(), pipe.len() + 1, 1);
        let refused = match batch_answer(answer) {
            BatchAnswer::Entries(entries) => settle(&shared, &updates, &telemetry, &|i| {
                entries.get(i).cloned().unwrap_or_else(|| Err("no answer to this entry".to_string()))
            }),
            // Redis answers but refused the whole transaction: every entry.
            BatchAnswer::OutOfMemory(why) => settle(&shared, &updates, &telemetry, &|_| Err(why.clone())),
            BatchAnswer::Failed(error) => {
                link.failed(&shared.stats, &error);
                false
            }
        };
        if refused {
            // Redis refused some (out of memory, a key of the wrong type):
            // the updates among them wait, and are tried again after a
            // pause that new work does not cut short; closing does not
            // insist (the outbox keeps them).
            if shared.stopping() {
                return;
            }
            shared.sleep(REFUSED_PAUSE);
        }
    }
}

/// How long the publisher waits before trying again entries Redis refused.
const REFUSED_PAUSE: Duration = Duration::from_millis(500);

/// What Redis made of one batch's transaction.
#[derive(Debug)]
enum BatchAnswer {
    /// Each entry's answer, in the order they were added: taken, or
    /// refused with Redis's reason.
    Entries(Vec<Result<(), String>>),
    /// The whole transaction refused for want of memory, with Redis's
    /// reason: Redis answers, so the connection is kept; the batch's
    /// catalog updates wait and its telemetry is dropped (counted).
    OutOfMemory(String),
    /// No answer the batch can be settled by: the connection is dropped
    /// (and made again after a backoff).
    Failed(redis::RedisError),
}

/// Reads Redis's answer to a batch's `MULTI` … `EXEC` (the answer to
/// `EXEC`, or the error the connection gave). Redis refuses a transaction
/// for want of memory in one of two ways: each command as it is queued
/// (`EXEC` then aborts, listing them), or `EXEC` itself when the queued
/// commands crossed the limit; both are [`BatchAnswer::OutOfMemory`].
fn batch_answer(answer: redis::RedisResult<Vec<redis::Value>>) -> BatchAnswer {
    use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
    match answer {
        Ok(mut values) => match values.pop() {
            Some(Value::Array(entries)) => BatchAnswer::Entries(
                entries
                    .into_iter()
                    .map(|entry| match entry {
                        Value::ServerError(error) => Err(error.to_string()),
                        _ => Ok(()),
                    })
                    .collect(),
            ),
            Some(Value::ServerError(error)) => match exec_refused_for_want_of_memory(&error) {
                Some(why) => BatchAnswer::OutOfMemory(why),
                None => BatchAnswer::Failed(error.into()),
            },
            other => BatchAnswer::Failed(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "unexpected answer to a batch's EXEC",
                format!("{other:?}"),
            ))),
        },
        Err(error) => {
            let refused = (error.kind() == ErrorKind::Server(ServerErrorKind::ExecAbort))
                .then(|| error.clone().into_server_errors())
                .flatten()
                .unwrap_or_default();
            let all_for_memory = !refused.is_empty() && refused.iter().all(|(_, e)| e.code() == "OOM");
            if all_for_memory {
                BatchAnswer::OutOfMemory(format!("OOM {}", refused[0].1.details().unwrap_or("")).trim_end().to_string())
            } else {
                BatchAnswer::Failed(error)
            }
        }
    }
}

/// Redis's reason when it refused `EXEC` itself for want of memory
/// (`EXECABORT Transaction discarded because of: OOM …`), from `OOM` on.
fn exec_refused_for_want_of_memory(error: &redis::ServerError) -> Option<String> {
    let why = error.details()?.strip_prefix("Transaction discarded because of: ")?;
    (error.code() == "EXECABORT" && why.starts_with("OOM ")).then(|| why.trim_end().to_string())
}

/// Takes what Redis accepted out of the queue (updates into `published`),
/// drops refused telemetry (counted) and keeps refused updates, recording
/// why Redis refused them (for health) or that it took them all; returns
/// whether anything was refused. `outcome` gives the answer to the batch's
/// entry of that index: the updates first, then the telemetry.
fn settle(
    shared: &Shared,
    updates: &[(u64, Sealed)],
    telemetry: &[(String, Sealed)],
    outcome: &dyn Fn(usize) -> Result<(), String>,
) -> bool {
    let accepted = |i: usize| outcome(i).is_ok();
    let mut queue = shared.lock();
    let mut refused = 0u64;
    let mut published = Vec::new();
    let mut why_refused = None;
    for (i, (seq, _)) in updates.iter().enumerate() {
        match outcome(i) {
            Ok(()) => published.push(*seq),
            Err(why) => {
                refused += 1;
                why_refused.get_or_insert(why);
            }
        }
    }
    if !updates.is_empty() {
        shared.stats.refusing_updates(why_refused);
    }
    queue.updates.retain(|(seq, _)| !published.contains(seq));
    queue.published.extend(&published);
    let mut sent = 0u64;
    for (i, (_, packet)) in telemetry.iter().enumerate() {
        if accepted(updates.len() + i) {
            sent += 1;
        } else {
            refused += 1;
        }
        // Sent or refused, it leaves (found by value: older ones may have been trimmed meanwhile).
        if let Some(at) = queue.telemetry.iter().position(|(_, s)| s == packet) {
            queue.telemetry.remove(at);
        }
    }
    let stats = &shared.stats;
    stats.outbox_depth.store(queue.updates.len() as u64, Ordering::Relaxed);
    stats.catalog_updates_published.fetch_add(published.len() as u64, Ordering::Relaxed);
    stats.telemetry_published.fetch_add(sent, Ordering::Relaxed);
    stats.publish_failures.fetch_add(refused, Ordering::Relaxed);
    refused > 0
}

/// How often an idle publisher checks its connection.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A PING on the idle connection, or a connection attempt if the backoff allows.
fn check_idle(shared: &Shared, link: &mut Link) {
    if let Some(connection) = link.connection(&shared.stats) {
        if let Err(error) = redis::cmd("PING").query::<String>(connection) {
            link.failed(&shared.stats, &error);
        }
    }
}

/// Starts a publisher's link (no connection until the first batch).
pub fn link(shared: &Shared) -> Link {
    Link::new(shared.client.clone(), Role::Publisher, Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::{batch_answer, BatchAnswer, Queue, BATCH, TELEMETRY_SHARE};
    use crate::bus::envelope::Sealed;

    #[test]
    fn telemetry_keeps_a_share_of_batches_full_of_updates() {
        let sealed = || Sealed { payload: vec![1], signature: None };
        let mut queue = Queue::default();
        queue.updates.extend((0..300).map(|seq| (seq, sealed())));
        let (updates, telemetry) = queue.next_batch();
        assert_eq!((updates.len(), telemetry.len()), (BATCH, 0), "without telemetry, updates fill the batch");
        queue.telemetry.extend((0..5).map(|_| ("oona.telemetry".to_string(), sealed())));
        let (updates, telemetry) = queue.next_batch();
        assert_eq!((updates.len(), telemetry.len()), (BATCH - 5, 5));
        assert_eq!(updates.first().map(|u| u.0), Some(0), "updates stay in order");
        queue.telemetry.extend((0..100).map(|_| ("oona.telemetry".to_string(), sealed())));
        let (updates, telemetry) = queue.next_batch();
        assert_eq!((updates.len(), telemetry.len()), (BATCH - TELEMETRY_SHARE, TELEMETRY_SHARE));
        queue.updates.truncate(10);
        let (updates, telemetry) = queue.next_batch();
        assert_eq!((updates.len(), telemetry.len()), (10, 105), "telemetry fills what updates leave");
    }

    /// Redis's answer to a batch's transaction, as it sent it.
    fn answer(reply: &[u8]) -> BatchAnswer {
        batch_answer(Ok(vec![redis::parse_redis_value(reply).expect("a well-formed reply")]))
    }

    #[test]
    fn exec_refused_for_want_of_memory_refuses_the_batch_and_keeps_the_link() {
        // What Redis 7 answers to `EXEC` when the queued commands took it
        // over its memory limit.
        let reply = b"-EXECABORT Transaction discarded because of: OOM command not allowed when used memory > 'maxmemory'.\r\n";
        match answer(reply) {
            BatchAnswer::OutOfMemory(why) => assert_eq!(why, "OOM command not allowed when used memory > 'maxmemory'."),
            other => panic!("read as {other:?}"),
        }
    }

    #[test]
    fn exec_refused_for_another_reason_drops_the_link() {
        let reply = b"-EXECABORT Transaction discarded because of: READONLY You can't write against a read only replica.\r\n";
        assert!(matches!(answer(reply), BatchAnswer::Failed(_)));
        // A transaction aborted by a watched key (never sent: no WATCH).
        assert!(matches!(answer(b"*-1\r\n"), BatchAnswer::Failed(_)));
        assert!(matches!(answer(b"+OK\r\n"), BatchAnswer::Failed(_)));
        // Aborted over queued commands' errors: those come as the error
        // below, not as the answer to `EXEC`.
        assert!(matches!(answer(b"-EXECABORT Transaction discarded because of previous errors.\r\n"), BatchAnswer::Failed(_)));
        // A reason that only mentions memory further on is not a refusal for it.
        assert!(matches!(answer(b"-EXECABORT Transaction discarded because of: ERR not OOM here\r\n"), BatchAnswer::Failed(_)));
        let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert!(matches!(batch_answer(Err(lost.into())), BatchAnswer::Failed(_)));
    }

    #[test]
    fn each_entry_has_its_own_answer() {
        let reply = b"*3\r\n$15\r\n1700000000000-0\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n$15\r\n1700000000000-1\r\n";
        match answer(reply) {
            BatchAnswer::Entries(entries) => {
                assert_eq!(entries.len(), 3);
                assert!(entries[0].is_ok() && entries[2].is_ok());
                assert!(entries[1].as_ref().unwrap_err().contains("WRONGTYPE"), "{entries:?}");
            }
            other => panic!("read as {other:?}"),
        }
    }
}
