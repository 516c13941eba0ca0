//! The fleet's bucket as plain operations: get, conditional create,
//! overwrite, delete, list — each bounded by the request timeout, each
//! error naming the object. `object_store` is async; the store owns a small
//! tokio runtime so that callers (the forge's threads, behind the C ABI)
//! stay synchronous, and batches of requests run concurrently on it.
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetResult, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

/// The largest manifest or lease object read (a manifest is a few KiB).
pub const SMALL_OBJECT_LIMIT: u64 = 4 << 20;

use super::config::{check_credential, check_endpoint, check_region, FleetConfig};
use crate::base::error::{Error, ErrorCode, Result};
use crate::base::redact::redacted_url;
use crate::sys::signals;

/// What a conditional create found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The object did not exist: ours is stored.
    Created,
    /// The object existed (another writer was first): nothing changed.
    Exists,
}

/// Periodic rewrites of one object (see [`RemoteStore::renew_every`]);
/// dropping them stops them after the rewrite under way, if any.
#[derive(Debug)]
pub struct Rewrites {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Rewrites {
    /// Runs `rewrite` on `runtime` every `every` until stopped (failures
    /// are the rewrite's to ignore: the next round tries again).
    pub fn start<F, R>(runtime: &tokio::runtime::Handle, every: Duration, rewrite: F) -> Self
    where
        F: Fn() -> R + Send + 'static,
        R: Future<Output = ()> + Send,
    {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = &mut stopped => return,
                }
                rewrite().await;
            }
        });
        Rewrites { stop: Some(stop), task: Some(task) }
    }

    /// Stops them and waits until no rewrite is under way.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Rewrites {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a bounded read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// The object's bytes.
    Bytes(Vec<u8>),
    /// No such object.
    Missing,
    /// The object is larger than the caller's limit (not read past it).
    TooLarge,
}

impl Got {
    /// The bytes, if the object was there and within the limit.
    pub fn bytes(self) -> Option<Vec<u8>> {
        match self {
            Got::Bytes(bytes) => Some(bytes),
            Got::Missing | Got::TooLarge => None,
        }
    }
}

/// What streaming an object did (see [`RemoteStore::stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streamed {
    /// Every byte went to the sink: this many.
    Done(u64),
    /// No such object.
    Missing,
    /// Larger than the caller's limit (nothing past it was read).
    TooLarge,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its full name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A connection to the fleet's bucket.
pub struct RemoteStore {
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
    endpoint: String,
    /// Operations issued (each one request, retries aside).
    operations: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// Connects to the configured bucket (no request is made yet).
    /// Settings the configuration leaves open come from the `AWS_*`
    /// environment variables.
    pub fn connect(config: &FleetConfig) -> Result<Self> {
        config.validate()?;
        let timeout = config.request_timeout;
        // No cap on a whole request here (nor on reads, whose timer runs
        // from the request's start until the answer's head, uploads
        // included): each operation bounds itself, with time for its bytes
        // (see `bounded_for` and `get`).
        let mut options = ClientOptions::new().with_timeout_disabled().with_connect_timeout(timeout);
        let explicit_credentials = config.credentials.is_some();
        let mut builder = builder_from_environment(explicit_credentials)
            .with_bucket_name(&config.bucket)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // Few, quick retries: a store that is down costs a job one
            // timeout, then the job goes on locally.
            .with_retry(RetryConfig {
                backoff: BackoffConfig { init_backoff: Duration::from_millis(20), max_backoff: Duration::from_millis(500), base: 2.0 },
                max_retries: 2,
                retry_timeout: timeout,
            });
        if !explicit_credentials {
            check_environment_credentials()?;
        }
        let mut endpoint = "aws".to_string();
        let chosen = match &config.endpoint {
            Some(url) => Some(url.clone()),
            None => endpoint_from_environment()?,
        };
        if let Some(url) = &chosen {
            // Set as the S3-specific endpoint too, which would otherwise win.
            builder = builder.with_endpoint(url).with_config(AmazonS3ConfigKey::S3Endpoint, url);
            endpoint = redacted_url(url);
        }
        if endpoint.starts_with("http://") {
            // Plain HTTP: no TLS, so the system's certificates (slow to load) are not needed.
            options = options.with_allow_http(true).with_no_system_certificates(true);
        }
        builder = builder.with_client_options(options);
        let from_environment = std::env::var("AWS_REGION").ok().filter(|region| !region.is_empty());
        if let (None, Some(region)) = (&config.region, &from_environment) {
            check_region(region, "AWS_REGION")?;
        }
        let region = config.region.clone().or(from_environment).unwrap_or_else(|| "us-east-1".into());
        builder = builder.with_region(region);
        if let Some(c) = &config.credentials {
            builder = builder.with_access_key_id(&c.access_key_id).with_secret_access_key(&c.secret_access_key);
        }
        let store = builder.build().map_err(|e| Error::invalid(format!("fleet store for bucket {:?}: {e}", config.bucket)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tz-fleet")
            .on_thread_start(signals::hold_broken_pipe_signal_for_this_thread)
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the fleet store's runtime", e))?;
        Ok(RemoteStore { store: Arc::new(store), runtime, timeout, endpoint, operations: Default::default() })
    }

    /// Runs requests (a future made of this store's async operations) to
    /// their end on the store's runtime. The calling thread drives them,
    /// with a lost connection's `SIGPIPE` held back meanwhile.
    pub fn run<F: Future>(&self, requests: F) -> F::Output {
        let _held = signals::hold_broken_pipe_signal();
        self.runtime.block_on(requests)
    }

    /// Runs requests in the background on the store's runtime.
    pub fn spawn<F>(&self, requests: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(requests)
    }

    /// The longest one request may take.
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// The endpoint requests go to (for messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// How many operations were issued so far.
    pub fn operations(&self) -> u64 {
        self.operations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bounds one operation by the request timeout.
    async fn bounded<T>(&self, what: &str, name: &str, op: impl Future<Output = object_store::Result<T>>) -> Result<T, StoreError> {
        self.bounded_for(what, name, 0, op).await
    }

    /// Bounds one operation moving up to `bytes` by the request timeout
    /// plus a second per MiB.
    async fn bounded_for<T>(
        &self,
        what: &str,
        name: &str,
        bytes: u64,
        op: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        self.operations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.within(what, name, tokio::time::Instant::now(), self.timeout_for(bytes), op).await
    }

    /// The time allowed to move `bytes`: the request timeout plus a
    /// second per MiB (at least 1 MiB/s is expected).
    fn timeout_for(&self, bytes: u64) -> Duration {
        self.timeout + Duration::from_secs(bytes >> 20)
    }

    /// Runs (part of) an operation begun at `started` until `allowed` has
    /// passed since, its outcome sorted. A missing bucket is a failure to
    /// report, not a missing object.
    async fn within<T>(
        &self,
        what: &str,
        name: &str,
        started: tokio::time::Instant,
        allowed: Duration,
        op: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout_at(started + allowed, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e @ object_store::Error::NotFound { .. })) if !e.to_string().contains("NoSuchBucket") => Err(StoreError::NotFound),
            Ok(Err(object_store::Error::AlreadyExists { .. })) => Err(StoreError::Exists),
            Ok(Err(e)) => Err(StoreError::Failed(Error::new(ErrorCode::Io, format!("fleet store: {what} {name}: {}", one_line(&e))))),
            Err(_) => Err(StoreError::Failed(Error::new(
                ErrorCode::Io,
                format!("fleet store: {what} {name}: no complete answer from {} within {allowed:?}", self.endpoint),
            ))),
        }
    }

    /// Asks for an object: its answer, once its head arrived (within the
    /// request timeout), and when the request started; `None` if there is
    /// no such object.
    async fn answer_head(&self, name: &str) -> Result<Option<(GetResult, tokio::time::Instant)>> {
        let started = tokio::time::Instant::now();
        match self.bounded("get", name, self.store.get(&Path::from(name))).await {
            Ok(found) => Ok(Some((found, started))),
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into_error("get", name)),
        }
    }

    /// An object's bytes, `None` if it does not exist; an object larger
    /// than `limit` bytes is refused from its announced size, or else not
    /// read past the limit (`Got::TooLarge`): the bucket is untrusted and
    /// must not exhaust this host's memory. The answer's head must come
    /// within the request timeout and the whole object within the request
    /// timeout plus a second per MiB of its size, both counted from the
    /// request's start.
    pub async fn get(&self, name: &str, limit: u64) -> Result<Got> {
        let mut bytes = Vec::new();
        let streamed = self
            .stream(name, limit, &mut |chunk| {
                bytes.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok(match streamed {
            Streamed::Done(_) => Got::Bytes(bytes),
            Streamed::Missing => Got::Missing,
            Streamed::TooLarge => Got::TooLarge,
        })
    }

    /// Streams an object's bytes to `sink` chunk by chunk, with the bounds
    /// of [`Self::get`] (refused from its announced size when over `limit`,
    /// never read past it), for objects too large to hold in memory. An
    /// error of the sink ends the read and is returned as it is.
    pub async fn stream(&self, name: &str, limit: u64, sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send)) -> Result<Streamed> {
        let Some((found, started)) = self.answer_head(name).await? else { return Ok(Streamed::Missing) };
        let allowed = self.timeout_for(found.meta.size.min(limit));
        let poured = self.within("get", name, started, allowed, pour(found, limit, sink)).await.map_err(|e| e.into_error("get", name))?;
        Ok(match poured? {
            Some(total) => Streamed::Done(total),
            None => Streamed::TooLarge,
        })
    }

    /// Renews an object every `every` on the store's runtime with the bytes
    /// `make` returns, until stopped — only while `still_ours` accepts what
    /// the object holds (given those bytes and the new ones): the bytes
    /// this renewal last wrote, as long as the object is unchanged since,
    /// else the object read again. Each write is conditional on the
    /// object's ETag (`If-Match`), so a renewal that reaches the store
    /// late, after the object was removed or replaced, writes nothing; when
    /// a write's outcome is unknown (no answer, or the object changed),
    /// the next round reads the object again first. (A store that gives no
    /// ETag is written unconditionally, after the read.) Failures are
    /// otherwise ignored: the next round tries again.
    pub fn renew_every(
        &self,
        name: &str,
        every: Duration,
        make: impl Fn() -> Vec<u8> + Send + Sync + 'static,
        still_ours: impl Fn(&[u8], &[u8]) -> bool + Send + Sync + 'static,
    ) -> Rewrites {
        let (store, location, timeout) = (self.store.clone(), Path::from(name), self.timeout);
        let written: Arc<Mutex<Option<LastWrite>>> = Arc::default();
        let (make, still_ours) = (Arc::new(make), Arc::new(still_ours));
        Rewrites::start(self.runtime.handle(), every, move || {
            let (store, location, written) = (store.clone(), location.clone(), written.clone());
            let (make, still_ours) = (make.clone(), still_ours.clone());
            async move {
                let bytes = make();
                let last = written.lock().unwrap_or_else(|p| p.into_inner()).take();
                let (current, e_tag) = match last {
                    Some((e_tag, last_bytes)) => (last_bytes, Some(e_tag)),
                    None => match tokio::time::timeout(timeout, read_tagged(&store, &location, SMALL_OBJECT_LIMIT)).await {
                        Ok(Ok((Got::Bytes(current), e_tag))) => (current, e_tag),
                        // Gone, unreadable or unanswered: nothing written.
                        _ => return,
                    },
                };
                if !still_ours(&current, &bytes) {
                    return;
                }
                let mode = match e_tag {
                    Some(e_tag) => PutMode::Update(UpdateVersion { e_tag: Some(e_tag), version: None }),
                    None => PutMode::Overwrite,
                };
                let put = store.put_opts(&location, PutPayload::from(bytes.clone()), PutOptions { mode, ..Default::default() });
                if let Ok(Ok(done)) = tokio::time::timeout(timeout, put).await {
                    *written.lock().unwrap_or_else(|p| p.into_inner()) = done.e_tag.map(|e_tag| (e_tag, bytes));
                }
            }
        })
    }

    /// Stores an object only if none exists under its name (`If-None-Match: *`).
    pub async fn create(&self, name: &str, bytes: Vec<u8>) -> Result<Create> {
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        let location = Path::from(name);
        let size = bytes.len() as u64;
        let put = self.store.put_opts(&location, PutPayload::from(bytes), options);
        match self.bounded_for("create", name, size, put).await {
            Ok(_) => Ok(Create::Created),
            Err(StoreError::Exists) => Ok(Create::Exists),
            Err(e) => Err(e.into_error("create", name)),
        }
    }

    /// Stores an object, replacing what its name held.
    pub async fn overwrite(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let location = Path::from(name);
        let size = bytes.len() as u64;
        let put = self.store.put(&location, PutPayload::from(bytes));
        self.bounded_for("overwrite", name, size, put).await.map(drop).map_err(|e| e.into_error("overwrite", name))
    }

    /// Removes an object (one already gone is not an error).
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.bounded("delete", name, self.store.delete(&Path::from(name))).await {
            Ok(()) | Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e.into_error("delete", name)),
        }
    }

    /// Every object whose name starts with the folder `folder` (ending in `/`).
    pub async fn list(&self, folder: &str) -> Result<Vec<Listed>> {
        Ok(self.list_up_to(folder, usize::MAX).await?.unwrap_or_default())
    }

    /// The objects under `folder`, if there are at most `limit` of them
    /// (None when there are more: the listing stops there instead of
    /// paging through a large bucket).
    pub async fn list_up_to(&self, folder: &str, limit: usize) -> Result<Option<Vec<Listed>>> {
        let prefix = Path::from(folder.trim_end_matches('/'));
        let listing = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| Listed { name: meta.location.to_string(), size: meta.size })
            .take(limit.saturating_add(1))
            .try_collect::<Vec<_>>();
        let listed = self.bounded("list", folder, listing).await.map_err(|e| e.into_error("list", folder))?;
        Ok((listed.len() <= limit).then_some(listed))
    }

    /// The folders right under `folder` (ending in `/`), each named in
    /// full with its trailing `/`, if there are at most `limit` of them
    /// (None when there are more). One level only: the store reads the
    /// folder itself, not every folder under it, which on SeaweedFS costs
    /// a fifth of a full listing of 42 folders of one object each. A
    /// store that keeps emptied folders (SeaweedFS does) lists those too.
    pub async fn list_folders_up_to(&self, folder: &str, limit: usize) -> Result<Option<Vec<String>>> {
        let listing = async {
            let mut folders = Vec::new();
            let mut page_token = None;
            loop {
                // Pages of S3's largest size, whatever the store's default.
                let options =
                    PaginatedListOptions { delimiter: Some("/".into()), max_keys: Some(1000), page_token, ..Default::default() };
                let page = self.store.list_paginated(Some(folder), options).await?;
                folders.extend(page.result.common_prefixes.iter().map(|path| format!("{path}/")));
                if folders.len() > limit {
                    return Ok(None);
                }
                match page.page_token {
                    Some(token) => page_token = Some(token),
                    None => return Ok(Some(folders)),
                }
            }
        };
        self.bounded("list", folder, listing).await.map_err(|e| e.into_error("list", folder))
    }
}

/// A store error as one line: an S3 error document in it is cut to its
/// code and message, and a failure to get credentials from the instance
/// metadata service (the last place asked) says that none were given.
fn one_line(error: &object_store::Error) -> String {
    let text = error.to_string();
    let mut line = match text.find("<?xml").or_else(|| text.find("<Error>")) {
        Some(at) => {
            let document = &text[at..];
            let field = |tag: &str| document.split(&format!("<{tag}>")).nth(1)?.split(&format!("</{tag}>")).next();
            let head = text[..at].trim_end().trim_end_matches(':');
            match (field("Code"), field("Message")) {
                (Some(code), Some(message)) => format!("{head}: {code}: {message}"),
                (Some(code), None) => format!("{head}: {code}"),
                _ => head.to_string(),
            }
        }
        None => text.clone(),
    };
    // The cause underneath (a refused connection, a timeout), when the
    // text does not already say it.
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let cause = cause.to_string();
    if !text.contains(&cause) {
        line = format!("{line} ({cause})");
    }
    line = line.replace(['\r', '\n'], " ");
    // Codes that mean a configuration to fix, not an outage to wait out.
    if ["SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"].iter().any(|code| line.contains(code)) {
        line.push_str(" (check the fleet's credentials)");
    } else if line.contains("NoSuchBucket") {
        line.push_str(" (check the fleet's bucket name)");
    }
    if text.contains("169.254.169.254") {
        line.push_str(
            " (no credentials were given — the fleet's, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY — \
             so they were asked of the instance metadata service)",
        );
    }
    line
}

/// The variables that name the store's endpoint, the S3-specific first.
const ENDPOINT_VARIABLES: [&str; 3] = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"];

/// A builder with the `AWS_*` settings of the environment, as the S3
/// client reads them, except the endpoint (chosen and checked by
/// [`RemoteStore::connect`]) and, when the configuration gives its own
/// key pair, the environment's credentials (a session token from there
/// would be sent with keys it does not belong to).
fn builder_from_environment(explicit_credentials: bool) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::new();
    for (key, value) in std::env::vars_os() {
        let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else { continue };
        let credential = matches!(key, "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_SESSION_TOKEN");
        if !key.starts_with("AWS_") || ENDPOINT_VARIABLES.contains(&key) || (explicit_credentials && credential) {
            continue;
        }
        if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            builder = builder.with_config(config_key, value);
        }
    }
    builder
}

/// The endpoint the environment names, if any, checked as a configured
/// one is.
fn endpoint_from_environment() -> Result<Option<String>> {
    for variable in ENDPOINT_VARIABLES {
        if let Some(url) = std::env::var(variable).ok().filter(|url| !url.is_empty()) {
            check_endpoint(&url, variable)?;
            return Ok(Some(url));
        }
    }
    Ok(None)
}

/// Refuses half of a key pair in the environment (one variable set, the
/// other unset or empty): requests would go out signed wrongly, or
/// not at all, and fail for a reason far from the cause; and credentials
/// that cannot travel in a request's headers.
fn check_environment_credentials() -> Result<()> {
    let set = |variable: &str| std::env::var_os(variable).is_some_and(|value| !value.is_empty());
    let (id, secret) = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY");
    for variable in [id, secret, "AWS_SESSION_TOKEN"] {
        if let Some(value) = std::env::var_os(variable).filter(|value| !value.is_empty()) {
            check_credential(&value.to_string_lossy(), variable)?;
        }
    }
    let (present, absent) = match (set(id), set(secret)) {
        (true, false) => (id, secret),
        (false, true) => (secret, id),
        _ => return Ok(()),
    };
    Err(Error::invalid(format!(
        "fleet credentials: {present} is set but {absent} is unset or empty (set both, or neither to use the \
         instance's role)"
    )))
}

/// A renewal's last write whose outcome is known: the ETag the store
/// gave it, and its bytes.
type LastWrite = (String, Vec<u8>);

/// An object's bytes (up to `limit`, see [`RemoteStore::get`]) and its ETag.
async fn read_tagged(store: &AmazonS3, location: &Path, limit: u64) -> object_store::Result<(Got, Option<String>)> {
    read_body(store.get(location).await?, limit).await
}

/// The body of an answer whose head arrived (up to `limit`; refused at
/// once when its announced size is larger) and its ETag.
async fn read_body(found: GetResult, limit: u64) -> object_store::Result<(Got, Option<String>)> {
    let e_tag = found.meta.e_tag.clone();
    let mut bytes = Vec::new();
    let Ok(poured) = pour(found, limit, |chunk| {
        bytes.extend_from_slice(chunk);
        Ok::<(), Infallible>(())
    })
    .await?;
    Ok((if poured.is_some() { Got::Bytes(bytes) } else { Got::TooLarge }, e_tag))
}

/// Pours the body of an answer whose head arrived into `sink`, chunk by
/// chunk: how many bytes it held, or `None` when it is larger than
/// `limit` (refused at once from its announced size, and never read past
/// the limit). The outer error is the store's, the inner the sink's (which
/// ends the read).
async fn pour<E>(
    found: GetResult,
    limit: u64,
    mut sink: impl FnMut(&[u8]) -> std::result::Result<(), E>,
) -> object_store::Result<std::result::Result<Option<u64>, E>> {
    if found.meta.size > limit {
        return Ok(Ok(None));
    }
    let mut chunks = found.into_stream();
    let mut total = 0u64;
    while let Some(chunk) = chunks.try_next().await? {
        total += chunk.len() as u64;
        if total > limit {
            return Ok(Ok(None));
        }
        if let Err(error) = sink(&chunk) {
            return Ok(Err(error));
        }
    }
    Ok(Ok(Some(total)))
}

/// How one operation ended, before the caller decides what is an error.
enum StoreError {
    NotFound,
    Exists,
    Failed(Error),
}

impl StoreError {
    fn into_error(self, what: &str, name: &str) -> Error {
        match self {
            StoreError::Failed(e) => e,
            StoreError::NotFound => Error::new(ErrorCode::NotFound, format!("fleet store: {what} {name}: no such object")),
            StoreError::Exists => Error::new(ErrorCode::Io, format!("fleet store: {what} {name}: the object exists")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{one_line, RemoteStore};
    use crate::fleet::{Credentials, FleetConfig};
    use crate::sys::signals::write_to_a_dropped_connection;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic { store: "S3", source: text.to_string().into() }
    }

    #[test]
    fn store_errors_end_with_the_cause_underneath_once() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|layer| layer as _)
            }
        }
        let refused = Layer("error sending request", Some(Box::new(Layer("client error", Some(Box::new(Layer("Connection refused", None)))))));
        let error = object_store::Error::Generic { store: "S3", source: Box::new(refused) };
        assert_eq!(one_line(&error), "Generic S3 error: error sending request (Connection refused)");
        // A cause the text already carries is not said twice.
        let said = Layer("HTTP error: Connection refused", Some(Box::new(Layer("Connection refused", None))));
        let error = object_store::Error::Generic { store: "S3", source: Box::new(said) };
        assert_eq!(one_line(&error), "Generic S3 error: HTTP error: Connection refused");
    }

    #[test]
    fn store_errors_are_one_line_without_the_error_document() {
        let forbidden = generic(
            "Error performing PUT http://h/b/k - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n\
             <Error><Code>SignatureDoesNotMatch</Code><Message>Check your key.</Message><Key>k</Key></Error>",
        );
        let line = one_line(&forbidden);
        assert!(line.ends_with("403 Forbidden: SignatureDoesNotMatch: Check your key. (check the fleet's credentials)"), "{line}");
        assert!(!line.contains('\n') && !line.contains("<Key>"), "{line}");
        let no_bucket = generic(
            "Error performing GET http://h/b - Server returned non-2xx status code: 404 Not Found: \
             <Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>",
        );
        assert!(one_line(&no_bucket).ends_with("NoSuchBucket: The specified bucket does not exist (check the fleet's bucket name)"));
        let plain = one_line(&generic("connection refused"));
        assert!(plain.contains("connection refused") && !plain.contains("credentials"), "{plain}");
        let metadata = one_line(&generic("Error performing PUT http://169.254.169.254/latest/api/token - 403 Forbidden"));
        assert!(metadata.contains("no credentials were given"), "{metadata}");
    }

    const CHILD: &str = "TEZZERET_TEST_SIGPIPE_CHILD";

    /// A host that keeps SIGPIPE's default action (most C hosts do) is not
    /// killed when a connection drops under a request, neither on the
    /// host's thread driving the requests nor on the store's own threads.
    /// The check runs in a child process of this test binary, so that
    /// the default action can end only the child.
    #[test]
    fn a_dropped_connection_does_not_end_a_host_that_keeps_sigpipe_fatal() {
        if std::env::var_os(CHILD).is_some() {
            // SAFETY: sets the default action before any thread writes; this process is the test's child.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let mut config = FleetConfig::new("bucket");
            config.endpoint = Some("http://127.0.0.1:9".into());
            config.credentials = Some(Credentials { access_key_id: "a".into(), secret_access_key: "b".into() });
            let store = RemoteStore::connect(&config).unwrap();
            assert_eq!(store.run(async { write_to_a_dropped_connection() }), Some(libc::EPIPE));
            let on_a_store_thread = store.spawn(async { write_to_a_dropped_connection() });
            assert_eq!(store.run(on_a_store_thread).unwrap(), Some(libc::EPIPE));
            return;
        }
        let name = "fleet::remote::tests::a_dropped_connection_does_not_end_a_host_that_keeps_sigpipe_fatal";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "child: {:?}\n{stdout}", out.status);
    }
}
