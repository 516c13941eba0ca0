//! One connection to Redis that survives outages: while Redis cannot be
//! reached, attempts are spaced by an exponential backoff (a breaker that
//! opens on failure and lets one attempt through when its delay is over),
//! so that a down Redis is not hammered and callers never block long.
use std::time::{Duration, Instant};

use redis::{Connection, RedisError, Value};

use super::stats::BusStats;

/// First delay after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest delay between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest a connect, a write or a non-blocking read may take.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Which connection of the bus this is (for health and error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Adds catalog updates and telemetry.
    Publisher,
    /// Reads prefetch requests and answers them.
    Reader,
}

/// A Redis connection with reconnection and backoff.
pub struct Link {
    client: redis::Client,
    role: Role,
    /// Extra read time for blocking reads (`XREADGROUP … BLOCK`).
    block: Duration,
    connection: Option<Connection>,
    delay: Duration,
    next_attempt: Instant,
    /// Bumped on every new connection (so callers redo per-connection setup).
    generation: u64,
    /// The Redis server's clock minus ours, ms (stream ids carry the
    /// server's time, and trimming by age must use it).
    clock_offset_ms: i64,
}

impl Link {
    /// A link to the Redis at `client` (not connected yet).
    pub fn new(client: redis::Client, role: Role, block: Duration) -> Self {
        Link { client, role, block, connection: None, delay: BACKOFF_MIN, next_attempt: Instant::now(), generation: 0, clock_offset_ms: 0 }
    }

    /// The connection, connecting first if the backoff allows; `None`
    /// while Redis is unreachable (see [`Self::retry_in`]).
    pub fn connection(&mut self, stats: &BusStats) -> Option<&mut Connection> {
        if self.connection.is_none() && Instant::now() >= self.next_attempt {
            match self.connect() {
                Ok((connection, offset)) => {
                    self.connection = Some(connection);
                    self.clock_offset_ms = offset;
                    self.delay = BACKOFF_MIN;
                    self.generation += 1;
                    self.set_up(stats, true);
                }
                Err(error) => self.failed(stats, &error),
            }
        }
        self.connection.as_mut()
    }

    fn connect(&self) -> redis::RedisResult<(Connection, i64)> {
        let mut connection = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        connection.set_read_timeout(Some(IO_TIMEOUT + self.block))?;
        let (seconds, micros): (i64, i64) = redis::cmd("TIME").query(&mut connection)?;
        let offset = seconds * 1000 + micros / 1000 - now_ms() as i64;
        Ok((connection, offset))
    }

    /// `MINID` for entries older than `ttl` by the server's clock: stream
    /// ids start with their creation time in ms.
    pub fn min_id(&self, ttl: Duration) -> String {
        let server_now = now_ms() as i64 + self.clock_offset_ms;
        format!("{}-0", (server_now - ttl.as_millis() as i64).max(0))
    }

    /// Which connection this is since start (0: never connected).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How long until the next connection attempt.
    pub fn retry_in(&self) -> Duration {
        self.next_attempt.saturating_duration_since(Instant::now())
    }

    /// Records a failed command or connect: the connection is dropped and
    /// the next attempt waits for the (doubled) backoff.
    pub fn failed(&mut self, stats: &BusStats, error: &RedisError) {
        self.connection = None;
        self.next_attempt = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        stats.link_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let role = match self.role {
            Role::Publisher => "publisher",
            Role::Reader => "request reader",
        };
        *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("bus {role}: {error}"));
        let connection_lost = error.is_io_error() || error.is_connection_refusal() || error.is_timeout() || error.is_connection_dropped();
        stats.note_link_failure(&error.to_string(), connection_lost);
        self.set_up(stats, false);
    }

    fn set_up(&self, stats: &BusStats, up: bool) {
        stats.link_state(matches!(self.role, Role::Reader), up);
    }
}

/// One stream entry: its id and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Stream id (`<ms>-<seq>`).
    pub id: String,
    /// Field/value pairs.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// The value of a field, if present.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice())
    }
}

/// The bytes of a string-like reply.
pub fn bytes_of(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(v) | Value::Set(v) => v,
        _ => &[],
    }
}

/// Entries of an `[id, [field, value, …]]` list (as XRANGE, XAUTOCLAIM and
/// each stream of XREADGROUP give them); deleted entries (nil fields) skipped.
pub fn entries(value: &Value) -> Vec<Entry> {
    items(value)
        .iter()
        .filter_map(|item| {
            let pair = items(item);
            let id = String::from_utf8(bytes_of(pair.first()?)?).ok()?;
            let flat: Vec<Vec<u8>> = match pair.get(1)? {
                Value::Map(kv) => kv.iter().flat_map(|(k, v)| [bytes_of(k), bytes_of(v)]).collect::<Option<_>>()?,
                other => items(other).iter().map(bytes_of).collect::<Option<_>>()?,
            };
            let fields = flat.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone())).collect();
            Some(Entry { id, fields })
        })
        .collect()
}

/// The entries of every stream in an XREAD/XREADGROUP reply (RESP2 array
/// or RESP3 map); none on a timeout.
pub fn read_reply_entries(value: &Value) -> Vec<Entry> {
    match value {
        Value::Map(streams) => streams.iter().flat_map(|(_, v)| entries(v)).collect(),
        other => items(other).iter().flat_map(|stream| items(stream).get(1).map(entries).unwrap_or_default()).collect(),
    }
}

/// The `(id, deliveries)` pairs of an extended XPENDING reply.
pub fn pending_deliveries(value: &Value) -> Vec<(String, u64)> {
    items(value)
        .iter()
        .filter_map(|row| {
            let row = items(row);
            let id = String::from_utf8(bytes_of(row.first()?)?).ok()?;
            let deliveries = match row.get(3)? {
                Value::Int(n) => *n as u64,
                other => String::from_utf8(bytes_of(other)?).ok()?.parse().ok()?,
            };
            Some((id, deliveries))
        })
        .collect()
}

/// The entries of an XAUTOCLAIM reply (`[cursor, entries, deleted]`) and
/// its next cursor.
pub fn autoclaim_reply(value: &Value) -> (String, Vec<Entry>) {
    let parts = items(value);
    let cursor = parts.first().and_then(bytes_of).and_then(|b| String::from_utf8(b).ok()).unwrap_or_else(|| "0-0".into());
    (cursor, parts.get(1).map(entries).unwrap_or_default())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// Adds `XADD stream MINID ~ <min_id> * fields…` to a pipeline: entries
/// older than the TTL (see [`Link::min_id`]) are trimmed, approximately,
/// on every add.
pub fn add_entry(pipe: &mut redis::Pipeline, stream: &str, min_id: &str, fields: &[(&str, &[u8])]) {
    let cmd = pipe.cmd("XADD").arg(stream).arg("MINID").arg("~").arg(min_id).arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(*value);
    }
}
