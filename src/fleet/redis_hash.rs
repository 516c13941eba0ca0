//! A fleet's Redis, when it is given one: its lease objects live there
//! instead of in the bucket (a claim costs one Redis round trip instead of
//! a conditional create, the dearest request an S3 store serves), and each
//! publication is announced there with a copy of its signed manifest, so
//! that waiting hosts learn of it without asking the bucket for manifests;
//! a small artifact is relayed too, for a few minutes, so that they fetch
//! it without asking the bucket at all. Copies are only hints: each is
//! verified like the bucket's objects, and the bucket stays the fleet's
//! record.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::base::redact::redacted_url;
use super::objects::ObjectNames;
use super::remote::{Create, Got, Listed, Rewrites};
use crate::base::error::{Error, ErrorCode, Result};

/// How many fields one `HSCAN` step looks at.
const SCAN_STEP: usize = 256;

/// A field's value if it is at most `ARGV[2]` bytes; its size (an integer)
/// if it is larger, so that no oversized value crosses the network.
const BOUNDED_GET: &str = "local n = redis.call('HSTRLEN', KEYS[1], ARGV[1]) \
    if n > tonumber(ARGV[2]) then return n end \
    return redis.call('HGET', KEYS[1], ARGV[1])";

/// The longest field name a listing answers (S3's limit on an object's
/// name): a longer one is no object of the fleet's, and is not sent.
const NAME_LIMIT: usize = 1024;

/// One `HSCAN` step (cursor `ARGV[1]`, pattern `ARGV[2]`, count `ARGV[3]`)
/// answering names and sizes instead of values: the next cursor, then each
/// name of at most `ARGV[4]` bytes followed by its value's length.
const NAMES_AND_SIZES: &str = "local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3]) \
    local out = {} \
    local longest = tonumber(ARGV[4]) \
    for i = 1, #r[2], 2 do \
        if string.len(r[2][i]) <= longest then out[#out + 1] = r[2][i]; out[#out + 1] = string.len(r[2][i + 1]) end \
    end \
    return {r[1], out}";

/// Which generations, from 0 to `ARGV[2]`, of the lease objects in
/// the folder `ARGV[1]` exist (named as `ObjectNames::lease` names them):
/// looked up by name, so a claim costs the same however large the hash.
const LEASE_GENERATIONS: &str = "local out = {} \
    for g = 0, tonumber(ARGV[2]) do \
        if redis.call('HEXISTS', KEYS[1], string.format('%s%010d.json', ARGV[1], g)) == 1 then out[#out + 1] = g end \
    end \
    return out";

/// A lease's renewal: writes `ARGV[2]` to the field `ARGV[1]` only if it
/// still holds a lease of the same holder, live at `ARGV[3]` (ms since the
/// Unix epoch, by the renewing host's clock: when it was sent plus the
/// longest it may take to arrive), so that a renewal arriving late never
/// brings back a released or expired lease nor overwrites another holder's.
const RENEW: &str = "local current = redis.call('HGET', KEYS[1], ARGV[1]) \
    if not current then return 0 end \
    local ok_old, old = pcall(cjson.decode, current) \
    local ok_new, new = pcall(cjson.decode, ARGV[2]) \
    if not (ok_old and ok_new and type(old) == 'table' and type(new) == 'table') then return 0 end \
    if old.holder ~= new.holder then return 0 end \
    if type(old.expires_at_ms) ~= 'number' or old.expires_at_ms <= tonumber(ARGV[3]) then return 0 end \
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) \
    return 1";

/// A fleet's Redis: one hash (field: the object's name in the bucket,
/// value: its bytes) shared by every forge of the fleet, holding its lease
/// objects and copies of its published manifests, and beside it a key per
/// relayed artifact (see [`Self::relay`]).
pub struct FleetRedis {
    connection: ConnectionManager,
    /// The hash's key: one per bucket and prefix, so that fleets on
    /// different buckets or prefixes share a Redis without one's listings
    /// scanning the other's objects.
    hash: String,
    /// What the keys of relayed artifacts start with (their names follow).
    relay_prefix: String,
    timeout: Duration,
    /// The server, for messages (without credentials).
    server: String,
    /// Commands sent (each one round trip, reconnections aside).
    operations: AtomicU64,
    /// The fleet's runtime, where renewals run.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for FleetRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetRedis").field("server", &self.server).field("hash", &self.hash).finish_non_exhaustive()
    }
}

impl FleetRedis {
    /// The hash of the fleet whose objects are `names`.
    pub fn hash_key(names: &ObjectNames) -> String {
        format!("tezzeret:fleet:{}", names.root())
    }

    /// Prepares the connection to the Redis at `url` (made at the first
    /// command, and again after a failure: an unreachable Redis is not an
    /// error here). Must run inside the fleet's tokio runtime.
    pub fn connect(url: &str, names: &ObjectNames, timeout: Duration) -> Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| Error::invalid(format!("fleet Redis {:?}: {e}", redacted_url(url))))?;
        let server = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| Error::invalid(format!("fleet Redis {server}: {e}")))?;
        let runtime = tokio::runtime::Handle::current();
        Ok(FleetRedis {
            connection,
            hash: Self::hash_key(names),
            relay_prefix: format!("tezzeret:fleet-relay:{}/", names.bucket()),
            timeout,
            server,
            operations: AtomicU64::new(0),
            runtime,
        })
    }

    /// The server (`host:port` or a socket path), for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Commands sent so far.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    /// Runs one command, bounded by the request timeout; errors name the
    /// server, the command and the object.
    async fn query<T: redis::FromRedisValue>(&self, what: &str, name: &str, command: &redis::Cmd) -> Result<T> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        let mut connection = self.connection.clone();
        match tokio::time::timeout(self.timeout, command.query_async::<T>(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::new(ErrorCode::Io, format!("fleet Redis {}: {what} {name}: {e}", self.server))),
            Err(_) => Err(Error::new(
                ErrorCode::Io,
                format!("fleet Redis {}: {what} {name}: no answer within {:?}", self.server, self.timeout),
            )),
        }
    }

    fn command(&self, name: &str, verb: &str) -> redis::Cmd {
        let mut command = redis::cmd(verb);
        command.arg(&self.hash).arg(name);
        command
    }

    /// Stores an object only if none exists under its name (one winner).
    pub async fn create(&self, name: &str, bytes: Vec<u8>) -> Result<Create> {
        let created: i64 = self.query("create", name, self.command(name, "HSETNX").arg(bytes)).await?;
        Ok(if created == 1 { Create::Created } else { Create::Exists })
    }

    /// An object's bytes; one larger than `limit` is `Got::TooLarge`, and
    /// is not sent (the Redis is untrusted too: its size is read first, on
    /// the server, by the `BOUNDED_GET` script).
    pub async fn get(&self, name: &str, limit: u64) -> Result<Got> {
        let mut command = redis::cmd("EVAL");
        command.arg(BOUNDED_GET).arg(1).arg(&self.hash).arg(name).arg(limit);
        let value: redis::Value = self.query("get", name, &command).await?;
        match value {
            redis::Value::Nil => Ok(Got::Missing),
            redis::Value::Int(_) => Ok(Got::TooLarge),
            redis::Value::BulkString(bytes) if bytes.len() as u64 <= limit => Ok(Got::Bytes(bytes)),
            redis::Value::BulkString(_) => Ok(Got::TooLarge),
            other => Err(Error::new(ErrorCode::Io, format!("fleet Redis {}: get {name}: unexpected answer {other:?}", self.server))),
        }
    }

    /// Stores an object, replacing what its name held.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.query::<i64>("put", name, self.command(name, "HSET").arg(bytes)).await.map(drop)
    }

    /// The key of the relayed copy of the object `name`.
    fn relay_key(&self, name: &str) -> String {
        format!("{}{name}", self.relay_prefix)
    }

    /// Keeps a copy of the object `name` under a key of its own, which
    /// Redis drops after `ttl` (so relayed artifacts cost memory only
    /// while they are fresh).
    pub async fn relay(&self, name: &str, bytes: &[u8], ttl: Duration) -> Result<()> {
        let mut command = redis::cmd("SET");
        command.arg(self.relay_key(name)).arg(bytes).arg("PX").arg(ttl.as_millis().max(1) as u64);
        self.query::<()>("relay", name, &command).await
    }

    /// The relayed copy of the object `name`, not read past `limit` bytes
    /// (`Got::TooLarge`: the Redis is untrusted too).
    pub async fn relayed(&self, name: &str, limit: u64) -> Result<Got> {
        let mut command = redis::cmd("GETRANGE");
        // The end is inclusive: one byte past the limit tells it was exceeded.
        command.arg(self.relay_key(name)).arg(0).arg(limit);
        let bytes: Vec<u8> = self.query("relayed", name, &command).await?;
        Ok(match bytes.len() as u64 {
            0 => Got::Missing,
            n if n > limit => Got::TooLarge,
            _ => Got::Bytes(bytes),
        })
    }

    /// Removes an object (one already gone is not an error).
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.query::<i64>("delete", name, &self.command(name, "HDEL")).await.map(drop)
    }

    /// The objects under `folder` if there are at most `limit` of them
    /// (names longer than any of the fleet's are passed over, unsent).
    pub async fn list_up_to(&self, folder: &str, limit: usize) -> Result<Option<Vec<Listed>>> {
        let pattern = format!("{}*", glob_escaped(folder));
        // A scan may return a field twice (the hash grew meanwhile): by name.
        let mut listed = std::collections::BTreeMap::new();
        let mut cursor = 0u64;
        loop {
            let mut command = redis::cmd("EVAL");
            command.arg(NAMES_AND_SIZES).arg(1).arg(&self.hash).arg(cursor).arg(&pattern).arg(SCAN_STEP).arg(NAME_LIMIT);
            let (next, found): (u64, Vec<(Vec<u8>, u64)>) = self.query("list", folder, &command).await?;
            for (name, size) in found {
                listed.insert(String::from_utf8_lossy(&name).into_owned(), size);
            }
            if listed.len() > limit {
                return Ok(None);
            }
            if next == 0 {
                return Ok(Some(listed.into_iter().map(|(name, size)| Listed { name, size }).collect()));
            }
            cursor = next;
        }
    }

    /// The generations up to `max` of the lease objects in `folder` (a
    /// cache key's lease folder); None when generation `max` exists (more
    /// than `max` takeovers).
    pub async fn lease_generations(&self, folder: &str, max: usize) -> Result<Option<Vec<u64>>> {
        let mut command = redis::cmd("EVAL");
        command.arg(LEASE_GENERATIONS).arg(1).arg(&self.hash).arg(folder).arg(max);
        let generations: Vec<u64> = self.query("list", folder, &command).await?;
        Ok((!generations.contains(&(max as u64))).then_some(generations))
    }

    /// The longest one command may take.
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Renews a lease object every `every` with the body `make` returns
    /// (see [`Rewrites`]) — only while it still holds a live lease of the
    /// same holder (the `RENEW` script): a renewal that arrives after the
    /// lease was released, expired or taken by another holder writes nothing.
    /// The lease must live `margin` past the renewal's sending.
    pub fn renew_every(&self, name: &str, every: Duration, margin: Duration, make: impl Fn() -> Vec<u8> + Send + 'static) -> Rewrites {
        let (connection, hash, field, timeout) = (self.connection.clone(), self.hash.clone(), name.to_string(), self.timeout);
        Rewrites::start(&self.runtime, every, move || {
            let mut connection = connection.clone();
            let mut command = redis::cmd("EVAL");
            let live_until = super::lease::now_ms().saturating_add(margin.as_millis() as u64);
            command.arg(RENEW).arg(1).arg(&hash).arg(&field).arg(make()).arg(live_until);
            async move {
                let _ = tokio::time::timeout(timeout, command.query_async::<i64>(&mut connection)).await;
            }
        })
    }
}

/// `text` with Redis glob pattern characters escaped.
fn glob_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::glob_escaped;

    #[test]
    fn glob_characters_match_only_themselves() {
        assert_eq!(glob_escaped("run-1/leases/"), "run-1/leases/");
        assert_eq!(glob_escaped(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
    }
}
