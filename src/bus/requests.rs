//! The prefetch service: a thread that reads `KernelPrefetchRequest`s from
//! the requests stream as one consumer of a group (forges in one group
//! share the requests), answers each like the C ABI's prefetch, and
//! acknowledges it after the answer is added. Entries that are not valid
//! requests — unsigned or wrongly signed with a secret set, undecodable,
//! of another type, missing fields, stale, replayed — are counted and
//! acknowledged unanswered. Requests a dead consumer left pending are
//! taken over after an idle time; one delivered too often goes to the
//! dead-letter stream instead of looping.
use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Connection, RedisResult, Value};

use super::envelope::{self, Refusal, Sealed};
use super::link::{add_entry, autoclaim_reply, pending_deliveries, read_reply_entries, Entry, Link, Role};
use super::publisher::fields;
use super::{Answerer, Shared};
use crate::base::leyline::{self, BusMessageType, KernelPrefetchRequest, PrefetchAnswer};

/// Most entries read per round trip.
const READ_COUNT: usize = 256;

/// The last request ids seen, to drop replays.
struct RecentIds {
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        RecentIds { seen: HashSet::new(), order: VecDeque::new(), capacity }
    }

    /// Remembers `id`; false if it was already remembered.
    fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }

    /// Forgets `id` (its request was not acknowledged and will come again).
    fn forget(&mut self, id: &str) {
        if self.seen.remove(id) {
            self.order.retain(|o| o != id);
        }
    }
}

/// What handling one entry produced.
enum Outcome {
    /// Add this answer (to the ready stream, else the errors stream), then
    /// acknowledge.
    Answer {
        /// Whether it is a `KernelArtifactReady`.
        ready: bool,
        /// The entry.
        sealed: Sealed,
        /// The request it answers.
        request_id: String,
    },
    /// Acknowledge without an answer.
    Dropped(Refusal),
    /// Answering failed (a contained panic): leave it pending, to be
    /// delivered again and, if it keeps failing, dead-lettered.
    Failed(String),
}

/// The reader: its link, its window of recent ids, when it last reclaimed.
struct Reader {
    shared: Arc<Shared>,
    answerer: Arc<dyn Answerer>,
    link: Link,
    recent: RecentIds,
    /// Connection generation the group was created on.
    group_ready: u64,
    /// The group vanished while we used it (recreate it from the start).
    group_lost: bool,
    next_reclaim: Instant,
}

/// The reader thread's body, until the forge closes.
pub fn run(shared: Arc<Shared>, answerer: Arc<dyn Answerer>) {
    let link = Link::new(shared.client.clone(), Role::Reader, shared.config.block);
    let recent = RecentIds::new(shared.config.replay_window);
    let mut reader = Reader { shared, answerer, link, recent, group_ready: 0, group_lost: false, next_reclaim: Instant::now() };
    while !reader.shared.stopping() {
        match reader.round() {
            Ok(()) => {}
            // The stream or group went away (deleted, or Redis restarted
            // without its data): create them again on the next round.
            Err(error) if error.code() == Some("NOGROUP") => {
                reader.group_ready = 0;
                reader.group_lost = true;
            }
            Err(error) => reader.link.failed(&reader.shared.stats, &error),
        }
    }
}

impl Reader {
    /// One round: connect (or wait for the backoff), set up the group,
    /// reclaim when due, read and answer one batch.
    fn round(&mut self) -> RedisResult<()> {
        let shared = self.shared.clone();
        let config = &shared.config;
        if self.link.connection(&shared.stats).is_none() {
            shared.sleep(self.link.retry_in().max(Duration::from_millis(1)));
            return Ok(());
        }
        let generation = self.link.generation();
        if self.group_ready != generation {
            let connection = self.link.connection(&shared.stats).expect("connected above");
            // Only the very first group reads from now on; one missing on a
            // later connection vanished with Redis's data and is read whole.
            let from = if generation == 1 && !self.group_lost { "$" } else { "0" };
            create_group(connection, &config.streams.requests, &config.group, from)?;
            self.group_ready = generation;
            self.group_lost = false;
        }
        if Instant::now() >= self.next_reclaim {
            let min_id = self.link.min_id(config.message_ttl);
            let connection = self.link.connection(&shared.stats).expect("connected above");
            let claimed = reclaim(connection, &shared, &min_id)?;
            self.next_reclaim = Instant::now() + (config.claim_idle / 2).max(Duration::from_millis(50));
            self.answer_batch(claimed)?;
        }
        if shared.stopping() {
            return Ok(());
        }
        let connection = self.link.connection(&shared.stats).expect("connected above");
        let reply: RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&config.group)
            .arg(&config.consumer)
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(config.block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&config.streams.requests)
            .arg(">")
            .query(connection);
        self.answer_batch(read_reply_entries(&reply?))
    }

    /// Answers entries and adds the answers in one round trip, then
    /// acknowledges in a second the entries handled: dropped ones, and
    /// answered ones whose answer Redis accepted (an answer refused — out of
    /// memory, a key of the wrong type — leaves its request pending, to be
    /// delivered again). Stops early when the forge closes; what is left
    /// stays pending for another consumer.
    fn answer_batch(&mut self, batch: Vec<Entry>) -> RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let config = &shared.config;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let min_id = self.link.min_id(config.message_ttl);
        let mut acks: Vec<&str> = Vec::with_capacity(batch.len());
        // (entry id, request id) of each answer added, in pipeline order.
        let mut answered: Vec<(&str, String)> = Vec::new();
        for entry in &batch {
            if shared.stopping() {
                break;
            }
            match self.handle(entry) {
                Outcome::Answer { ready, sealed, request_id } => {
                    let stream = if ready { &config.streams.ready } else { &config.streams.errors };
                    add_entry(&mut pipe, stream, &min_id, &fields(&sealed));
                    answered.push((entry.id.as_str(), request_id));
                }
                Outcome::Dropped(refusal) => {
                    shared.stats.drop_entry(refusal);
                    acks.push(entry.id.as_str());
                }
                Outcome::Failed(request_id) => self.recent.forget(&request_id),
            }
        }
        let added: RedisResult<Vec<RedisResult<Value>>> = if answered.is_empty() {
            Ok(Vec::new())
        } else {
            match self.link.connection(&shared.stats) {
                Some(connection) => pipe.query(connection),
                None => Err(lost_link()),
            }
        };
        let added = match added {
            Ok(added) => added,
            Err(error) => {
                // Not acknowledged: these come again and must not count as replays.
                for (_, request_id) in &answered {
                    self.recent.forget(request_id);
                }
                return Err(error);
            }
        };
        for ((entry_id, request_id), result) in answered.iter().zip(added.iter().map(Some).chain(std::iter::repeat(None))) {
            match result {
                Some(Ok(_)) => acks.push(entry_id),
                _ => {
                    shared.stats.answer_failures.fetch_add(1, Ordering::Relaxed);
                    self.recent.forget(request_id);
                }
            }
        }
        if acks.is_empty() {
            return Ok(());
        }
        let connection = self.link.connection(&shared.stats).ok_or_else(lost_link)?;
        redis::cmd("XACK").arg(&config.streams.requests).arg(&config.group).arg(&acks).query::<Value>(connection).map(drop)
    }

    /// Checks, decodes and answers one entry.
    fn handle(&mut self, entry: &Entry) -> Outcome {
        match self.request_of(entry) {
            Ok(request) => {
                let answer = catch_unwind(AssertUnwindSafe(|| self.answerer.answer(&request)));
                let Ok(answer) = answer else { return Outcome::Failed(request.request_id) };
                let stats = &self.shared.stats;
                let (ready, kind, bytes, count) = match answer {
                    PrefetchAnswer::Ready(r) => (true, BusMessageType::KernelPrefetchReady, leyline::encode(&r), &stats.answered_ready),
                    PrefetchAnswer::Error(e) => (false, BusMessageType::KernelPrefetchError, leyline::encode(&e), &stats.answered_error),
                };
                count.fetch_add(1, Ordering::Relaxed);
                let mut attributes = envelope::attributes(&format!("answer-{}", request.request_id));
                attributes.insert("request_id".to_string(), request.request_id.clone());
                attributes.insert("consumer".to_string(), self.shared.config.consumer.clone());
                let sealed = envelope::seal(kind, bytes, attributes, self.shared.config.secret.as_deref());
                Outcome::Answer { ready, sealed, request_id: request.request_id }
            }
            Err(refusal) => Outcome::Dropped(refusal),
        }
    }

    /// The request an entry holds, or why it is refused.
    fn request_of(&mut self, entry: &Entry) -> Result<KernelPrefetchRequest, Refusal> {
        let config = &self.shared.config;
        let envelope = envelope::open(
            entry.field(envelope::PAYLOAD_FIELD),
            entry.field(envelope::SIGNATURE_FIELD),
            config.secret.as_deref(),
            BusMessageType::KernelPrefetchRequest,
        )?;
        let request: KernelPrefetchRequest = leyline::decode(&envelope.payload).map_err(|_| Refusal::MalformedMessage)?;
        let Some(issued_at) = request.issued_at else { return Err(Refusal::MissingField) };
        if request.request_id.is_empty() || request.blueprint_id.is_empty() {
            return Err(Refusal::MissingField);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let issued = issued_at.seconds as f64 + f64::from(issued_at.nanos) / 1e9;
        if (now - issued).abs() > config.freshness.as_secs_f64() {
            return Err(Refusal::Stale);
        }
        if !self.recent.insert(&request.request_id) {
            return Err(Refusal::Replayed);
        }
        Ok(request)
    }
}

fn lost_link() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other("bus link lost"))
}

/// Creates the consumer group (the stream too, if missing); an existing
/// group is fine. A first group reads only entries added from now on
/// (`$`); one created again because it vanished (the stream was deleted,
/// Redis restarted without its data) reads the stream from its start, so
/// that requests added in between are not skipped (stale ones are dropped).
fn create_group(connection: &mut Connection, stream: &str, group: &str, from: &str) -> RedisResult<()> {
    let created: RedisResult<Value> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg(from).arg("MKSTREAM").query(connection);
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other.map(drop),
    }
}

/// Takes over requests pending longer than the idle time (their consumer
/// died or failed on them); those delivered more often than allowed go to
/// the dead-letter stream and are acknowledged. Returns the rest, to answer.
fn reclaim(connection: &mut Connection, shared: &Shared, min_id: &str) -> RedisResult<Vec<Entry>> {
    let config = &shared.config;
    let idle_ms = config.claim_idle.as_millis() as u64;
    let mut claimed = Vec::new();
    let mut cursor = "0-0".to_string();
    for _ in 0..16 {
        if shared.stopping() {
            break; // closing: what is claimed so far is answered, the rest waits
        }
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&config.streams.requests)
            .arg(&config.group)
            .arg(&config.consumer)
            .arg(idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(READ_COUNT)
            .query(connection)?;
        let (next, entries) = autoclaim_reply(&reply);
        claimed.extend(entries);
        if next == "0-0" || claimed.len() >= READ_COUNT {
            break;
        }
        cursor = next;
    }
    if claimed.is_empty() {
        return Ok(claimed);
    }
    // How often each was delivered (XAUTOCLAIM counted this delivery too).
    let mut pipe = redis::pipe();
    for entry in &claimed {
        pipe.cmd("XPENDING").arg(&config.streams.requests).arg(&config.group).arg(&entry.id).arg(&entry.id).arg(1);
    }
    let pending: Vec<Value> = pipe.query(connection)?;
    let deliveries: std::collections::HashMap<String, u64> = pending.iter().flat_map(pending_deliveries).collect();
    let (poison, retry): (Vec<Entry>, Vec<Entry>) =
        claimed.into_iter().partition(|e| deliveries.get(&e.id).is_some_and(|&n| n > config.max_deliveries));
    if !poison.is_empty() {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for entry in &poison {
            let count = deliveries[&entry.id].to_string();
            let mut fields: Vec<(&str, &[u8])> =
                entry.fields.iter().filter_map(|(k, v)| std::str::from_utf8(k).ok().map(|k| (k, v.as_slice()))).collect();
            fields.push(("dead_letter_reason", b"max_deliveries"));
            fields.push(("original_id", entry.id.as_bytes()));
            fields.push(("deliveries", count.as_bytes()));
            add_entry(&mut pipe, &config.streams.dead_letter, min_id, &fields);
        }
        let added: Vec<RedisResult<Value>> = pipe.query(connection)?;
        // Only what the dead-letter stream holds leaves the group.
        let moved: Vec<&str> = poison.iter().zip(&added).filter(|(_, r)| r.is_ok()).map(|(e, _)| e.id.as_str()).collect();
        if !moved.is_empty() {
            redis::cmd("XACK").arg(&config.streams.requests).arg(&config.group).arg(&moved).query::<Value>(connection)?;
        }
        shared.stats.dead_lettered.fetch_add(moved.len() as u64, Ordering::Relaxed);
    }
    shared.stats.reclaimed.fetch_add(retry.len() as u64, Ordering::Relaxed);
    Ok(retry)
}

#[cfg(test)]
mod tests {
    use super::RecentIds;

    #[test]
    fn recent_ids_forget_the_oldest_beyond_capacity() {
        let mut recent = RecentIds::new(2);
        assert!(recent.insert("a") && recent.insert("b"));
        assert!(!recent.insert("a"));
        assert!(recent.insert("c"));
        assert!(recent.insert("a"), "a was forgotten when c came");
        assert!(!recent.insert("c"));
    }
}
