//! How a forge joins a fleet: the S3-compatible bucket the fleet shares,
//! its credentials, and the lease times that make a blueprint compile once
//! for the whole fleet.
use std::time::Duration;

use crate::base::error::{Error, Result};
use crate::base::redact::redacted_url;

/// S3 credentials given explicitly (otherwise the usual `AWS_*`
/// environment variables are read).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

/// How a forge shares artifacts with its fleet.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// The S3 endpoint, e.g. `http://127.0.0.1:8333`; `None`: AWS itself
    /// (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// The bucket (it must exist).
    pub bucket: String,
    /// Object names start with this (`fleet-a` → `fleet-a/artifacts/…`);
    /// empty: the bucket's root. ASCII letters, digits, `-`, `_`, `.` and
    /// `/` only, so that every store names the objects alike.
    pub prefix: String,
    /// The region requests are signed for (`AWS_REGION` or `us-east-1`
    /// when `None`).
    pub region: Option<String>,
    /// Explicit credentials; `None`: `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` from the environment.
    pub credentials: Option<Credentials>,
    /// Publish what this forge compiles (off: it only reads).
    pub publish: bool,
    /// How long a claim to compile a blueprint holds: a crashed holder
    /// delays the others this long at most.
    pub lease_ttl: Duration,
    /// How long a forge waits for a blueprint another host holds the lease
    /// of before compiling it itself.
    pub lease_wait: Duration,
    /// The longest one request to the store may take (an outage costs a
    /// job no more than this before it compiles locally). Keep it under a
    /// third of `lease_ttl`: a lease is renewed only while it outlives one
    /// request.
    pub request_timeout: Duration,
    /// How often unpublished artifacts are offered to the store again
    /// while it is unreachable.
    pub retry_interval: Duration,
    /// This host's index in its fleet (0, 1, 2…, a scheduler's rank), so
    /// that hosts starting together begin their queues in different,
    /// evenly spread places and never race for one claim; `None` (the
    /// default): each host starts at a random place.
    pub member_index: Option<u32>,
    /// A Redis (`redis://host:port/db` or `unix://path`) that keeps the
    /// fleet's leases instead of the bucket — often the bus's: a claim
    /// then costs one Redis round trip instead of a conditional create in
    /// the bucket — and announces its publications, so that waiting hosts
    /// ask the bucket only for artifacts. Every host of the fleet must use
    /// the same one. `None` (the default): leases live in the bucket, unless
    /// [`Self::leases_on_bus`].
    pub lease_redis: Option<String>,
    /// Keep the leases (and announcements) on the forge's bus's Redis, as
    /// [`Self::lease_redis`] would with its URL, without naming it twice:
    /// for a fleet whose hosts all share that bus. Needs a bus; not with
    /// [`Self::lease_redis`]. Off by default.
    pub leases_on_bus: bool,
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret key.
        f.debug_struct("FleetConfig")
            .field("endpoint", &self.endpoint.as_deref().map(redacted_url))
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|c| c.access_key_id.clone()))
            .field("publish", &self.publish)
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .field("member_index", &self.member_index)
            .field("lease_redis", &self.lease_redis.as_deref().map(redacted_url))
            .field("leases_on_bus", &self.leases_on_bus)
            .finish_non_exhaustive()
    }
}

/// The error of a fleet told to keep its leases in two places.
fn two_lease_places() -> Error {
    Error::invalid(
        "fleet leases_on_bus (the CLI's --fleet-leases-on-bus, TEZZERET_FLEET_LEASES_ON_BUS in C) and a lease Redis \
         are both set: choose one place for the leases",
    )
}

/// Whether a Redis URL is one the fleet's Redis client can keep leases
/// on (`redis://` or `unix://`).
fn can_keep_leases(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("unix://")
}

/// Whether a bucket name has the form of an IPv4 address (four groups of
/// digits), which S3 refuses as a name.
fn looks_like_an_ip_address(name: &str) -> bool {
    let groups: Vec<&str> = name.split('.').collect();
    groups.len() == 4 && groups.iter().all(|g| !g.is_empty() && g.len() <= 3 && g.bytes().all(|b| b.is_ascii_digit()))
}

impl FleetConfig {
    /// Defaults for a bucket: AWS's endpoint and credentials from the
    /// environment, no prefix, publishing on, 30 s leases, waiting up to
    /// 60 s for another host's compile, 5 s per request, retrying
    /// publication every 2 s, no member index, leases in the bucket.
    pub fn new(bucket: impl Into<String>) -> Self {
        FleetConfig {
            endpoint: None,
            bucket: bucket.into(),
            prefix: String::new(),
            region: None,
            credentials: None,
            publish: true,
            lease_ttl: Duration::from_secs(30),
            lease_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_secs(2),
            member_index: None,
            lease_redis: None,
            leases_on_bus: false,
        }
    }

    /// The Redis that keeps the fleet's leases for a forge whose bus, if it
    /// has one, is at `bus_redis`: the bus's with [`Self::leases_on_bus`]
    /// (an error without a bus), else [`Self::lease_redis`] (none: the
    /// bucket).
    pub fn lease_redis_beside(&self, bus_redis: Option<&str>) -> Result<Option<String>> {
        if !self.leases_on_bus {
            return Ok(self.lease_redis.clone());
        }
        if self.lease_redis.is_some() {
            return Err(two_lease_places());
        }
        match bus_redis {
            Some(url) if can_keep_leases(url) => Ok(Some(url.to_string())),
            Some(url) => Err(Error::invalid(format!(
                "fleet leases_on_bus: the bus's Redis {:?} cannot keep the fleet's leases (a redis:// or unix:// one can)",
                redacted_url(url)
            ))),
            None => Err(Error::invalid(
                "fleet leases_on_bus (the CLI's --fleet-leases-on-bus, TEZZERET_FLEET_LEASES_ON_BUS in C) needs a bus, \
                 whose Redis keeps the leases",
            )),
        }
    }

    /// Refuses configurations that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bucket = &self.bucket;
        let alphanumeric = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && alphanumeric(bucket.bytes().next())
            && alphanumeric(bucket.bytes().last())
            && !bucket.contains("..")
            && !looks_like_an_ip_address(bucket)
            && !["xn--", "sthree-"].iter().any(|reserved| bucket.starts_with(reserved))
            && !["-s3alias", "--ol-s3"].iter().any(|reserved| bucket.ends_with(reserved));
        if !bucket_ok {
            return Err(Error::invalid(format!(
                "fleet bucket {bucket:?} is not an S3 bucket name (3 to 63 lowercase letters, digits, '-' or '.', \
                 starting and ending with a letter or digit, no '..', not an IP address, no prefix or suffix S3 \
                 reserves)"
            )));
        }
        if let Some(endpoint) = &self.endpoint {
            check_endpoint(endpoint, "fleet endpoint")?;
        }
        let prefix = self.prefix.trim_matches('/');
        if prefix.split('/').any(|part| (part.is_empty() && !prefix.is_empty()) || part == "." || part == "..") {
            return Err(Error::invalid(format!("fleet prefix {:?} has an empty, '.' or '..' part", self.prefix)));
        }
        if let Some(odd) = prefix.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))) {
            return Err(Error::invalid(format!(
                "fleet prefix {:?} has the character {odd:?}: only ASCII letters, digits, '-', '_', '.' and '/' \
                 name objects the same in every S3 store and in s3:// references",
                self.prefix
            )));
        }
        if let Some(region) = &self.region {
            check_region(region, "fleet region")?;
        }
        if self.leases_on_bus && self.lease_redis.is_some() {
            return Err(two_lease_places());
        }
        if let Some(url) = &self.lease_redis {
            if !can_keep_leases(url) {
                return Err(Error::invalid(format!("fleet lease Redis {:?} is not a redis:// or unix:// URL", redacted_url(url))));
            }
            redis::Client::open(url.as_str())
                .map_err(|e| Error::invalid(format!("fleet lease Redis {:?}: {e}", redacted_url(url))))?;
        }
        if let Some(c) = &self.credentials {
            if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
                return Err(Error::invalid("fleet credentials have an empty access key id or secret key"));
            }
            check_credential(&c.access_key_id, "fleet access key id")?;
            check_credential(&c.secret_access_key, "fleet secret key")?;
        }
        for (what, field, value, least) in [
            ("lease TTL", "lease_ttl", self.lease_ttl, LEAST_LEASE_TTL),
            ("lease wait", "lease_wait", self.lease_wait, LEAST_LEASE_WAIT),
            ("request timeout", "request_timeout", self.request_timeout, LEAST_REQUEST_TIMEOUT),
            ("retry interval", "retry_interval", self.retry_interval, LEAST_RETRY_INTERVAL),
        ] {
            if value < least || value > MAX_TIME {
                let seconds = |d: Duration| d.as_secs_f64();
                return Err(Error::invalid(format!(
                    "fleet {what} ({field}) of {} s is outside {} s to {} s",
                    seconds(value),
                    seconds(least),
                    seconds(MAX_TIME)
                )));
            }
        }
        Ok(())
    }
}

/// Refuses an S3 endpoint (`what` names it) that is not a plain
/// `http(s)://host[:port]`: a path would be taken for the bucket, and
/// credentials in it would be shown in every error.
pub fn check_endpoint(endpoint: &str, what: &str) -> Result<()> {
    let Some(address) = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://")) else {
        return Err(Error::invalid(format!("{what} {:?} is not an http:// or https:// URL", redacted_url(endpoint))));
    };
    let authority = address.split(['/', '?', '#']).next().unwrap_or_default();
    let rest = &address[authority.len()..];
    if !(rest.is_empty() || rest == "/") {
        return Err(Error::invalid(format!(
            "{what} {:?} has a path or query: give the server's address only \
             (http://host:port); the bucket and prefix are named separately",
            redacted_url(endpoint)
        )));
    }
    if authority.contains('@') {
        return Err(Error::invalid(format!(
            "{what} {:?} carries credentials: requests are signed with an access key and secret instead \
             (the fleet's credentials, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            redacted_url(endpoint)
        )));
    }
    match url::Url::parse(endpoint) {
        Ok(parsed) if parsed.host_str().is_some_and(|host| !host.is_empty()) => Ok(()),
        Ok(_) => Err(Error::invalid(format!("{what} {:?} names no host", redacted_url(endpoint)))),
        Err(e) => Err(Error::invalid(format!("{what} {:?} is not a valid URL: {e}", redacted_url(endpoint)))),
    }
}

/// Refuses a region that cannot name an S3 region: requests are signed
/// for it, and without an endpoint it is part of the store's host name.
pub fn check_region(region: &str, what: &str) -> Result<()> {
    let ok = (1..=64).contains(&region.len()) && region.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        return Ok(());
    }
    Err(Error::invalid(format!("{what} {region:?} is not a region name (1 to 64 ASCII letters, digits, '-', '_' or '.')")))
}

/// Refuses a credential with a character that is not visible ASCII: it
/// goes into request headers (or signs them), where a control character or
/// a space cannot travel. The value itself is never shown.
pub fn check_credential(value: &str, what: &str) -> Result<()> {
    if value.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    Err(Error::invalid(format!("{what} has a character that is not visible ASCII (a space, a control character or non-ASCII)")))
}

/// The longest lease, wait or timeout accepted (a day).
pub const MAX_TIME: Duration = Duration::from_secs(24 * 3600);
/// The shortest lease TTL accepted.
pub const LEAST_LEASE_TTL: Duration = Duration::from_millis(100);
/// The shortest lease wait accepted (none: compile at once).
pub const LEAST_LEASE_WAIT: Duration = Duration::ZERO;
/// The shortest request timeout accepted.
pub const LEAST_REQUEST_TIMEOUT: Duration = Duration::from_millis(10);
/// The shortest publication retry interval accepted.
pub const LEAST_RETRY_INTERVAL: Duration = Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::{Credentials, FleetConfig};

    #[test]
    fn bad_fields_are_named() {
        let ok = FleetConfig::new("fleet-bucket");
        ok.validate().unwrap();
        let cases: Vec<(FleetConfig, &str)> = vec![
            (FleetConfig { bucket: "A".into(), ..ok.clone() }, "bucket"),
            (FleetConfig { endpoint: Some("127.0.0.1:9000".into()), ..ok.clone() }, "endpoint"),
            (FleetConfig { endpoint: Some("http://127.0.0.1:9000/some/path".into()), ..ok.clone() }, "has a path"),
            (FleetConfig { endpoint: Some("http://127.0.0.1:9000?region=x".into()), ..ok.clone() }, "has a path"),
            (FleetConfig { endpoint: Some("http://127.0.0.1:99999".into()), ..ok.clone() }, "is not a valid URL: invalid port number"),
            (FleetConfig { endpoint: Some("http://:80".into()), ..ok.clone() }, "endpoint \"http://:80\""),
            (FleetConfig { region: Some("not a region!".into()), ..ok.clone() }, "fleet region \"not a region!\""),
            (FleetConfig { region: Some(String::new()), ..ok.clone() }, "fleet region"),
            (
                FleetConfig { credentials: Some(Credentials { access_key_id: "a\nb".into(), secret_access_key: "s".into() }), ..ok.clone() },
                "fleet access key id has a character that is not visible ASCII",
            ),
            (FleetConfig { prefix: "a//b".into(), ..ok.clone() }, "prefix"),
            (FleetConfig { prefix: "a/../b".into(), ..ok.clone() }, "prefix"),
            (FleetConfig { prefix: "run-é".into(), ..ok.clone() }, "prefix"),
            (FleetConfig { prefix: "q?x".into(), ..ok.clone() }, "prefix"),
            (FleetConfig { prefix: "*".into(), ..ok.clone() }, "prefix"),
            (FleetConfig { lease_ttl: std::time::Duration::ZERO, ..ok.clone() }, "lease TTL (lease_ttl) of 0 s is outside 0.1 s to 86400 s"),
            (FleetConfig { lease_redis: Some("http://127.0.0.1:6379".into()), ..ok.clone() }, "lease Redis"),
            (FleetConfig { lease_redis: Some("redis://127.0.0.1:notaport".into()), ..ok.clone() }, "lease Redis"),
        ];
        for (config, field) in cases {
            let error = config.validate().unwrap_err();
            assert!(error.message().contains(field), "{field}: {error}");
        }
        for bad in ["-fleet", "fleet-", ".fleet", "a..b", "192.168.1.1", "192.168.01.1", "xn--fleet", "sthree-fleet", "fleet-s3alias", "f--ol-s3"] {
            let error = FleetConfig { bucket: bad.into(), ..ok.clone() }.validate().unwrap_err();
            assert!(error.message().contains("is not an S3 bucket name"), "{bad}: {error}");
        }
        for good in ["fleet.example.com", "a-b", "1.2.3", "192.168.1.1.5"] {
            FleetConfig { bucket: good.into(), ..ok.clone() }.validate().unwrap();
        }
        FleetConfig { lease_redis: Some("redis://127.0.0.1:6379/2".into()), ..ok.clone() }.validate().unwrap();
        FleetConfig { prefix: "/runs/2026-12_07.a/".into(), endpoint: Some("https://s3.example:9000/".into()), ..ok }
            .validate()
            .unwrap();
    }

    #[test]
    fn leases_go_to_the_given_redis_or_when_asked_to_the_buss() {
        let fleet = FleetConfig::new("fleet-bucket");
        let bus = Some("redis://bus:6379/0");
        assert_eq!(fleet.lease_redis_beside(bus).unwrap(), None, "by default the bucket, bus or not");
        let own = FleetConfig { lease_redis: Some("redis://leases:6379/1".into()), ..fleet.clone() };
        assert_eq!(own.lease_redis_beside(bus).unwrap().as_deref(), Some("redis://leases:6379/1"));
        let on_bus = FleetConfig { leases_on_bus: true, ..fleet.clone() };
        assert_eq!(on_bus.lease_redis_beside(bus).unwrap().as_deref(), bus);
        assert_eq!(on_bus.lease_redis_beside(Some("unix:///run/redis.sock")).unwrap().as_deref(), Some("unix:///run/redis.sock"));
        assert!(on_bus.lease_redis_beside(None).unwrap_err().message().contains("needs a bus"));
        let secure = on_bus.lease_redis_beside(Some("rediss://:hunter2@bus:6380")).unwrap_err();
        assert!(secure.message().contains("cannot keep the fleet's leases") && !secure.message().contains("hunter2"), "{secure}");
        let both = FleetConfig { leases_on_bus: true, ..own };
        assert!(both.validate().unwrap_err().message().contains("both set"));
        assert!(both.lease_redis_beside(bus).unwrap_err().message().contains("both set"));
    }

    #[test]
    fn lease_redis_passwords_are_never_shown() {
        let config = FleetConfig { lease_redis: Some("redis://:hunter2@10.0.0.5:6379/0".into()), ..FleetConfig::new("fleet-bucket") };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && shown.contains("redis://…@10.0.0.5:6379/0"), "{shown}");
        for url in ["rediss://:hunter2@10.0.0.5", "redis://:hunter2@10.0.0.5:notaport", "tcp://10.0.0.5?pass=hunter2"] {
            let bad = FleetConfig { lease_redis: Some(url.into()), ..config.clone() };
            let error = bad.validate().unwrap_err().to_string();
            assert!(!error.contains("hunter2") && error.contains("lease Redis"), "{error}");
        }
        // A password in a socket URL's query, or credentials in the endpoint.
        let socket = FleetConfig { lease_redis: Some("unix:///run/redis.sock?pass=hunter2".into()), ..config.clone() };
        assert!(!format!("{socket:?}").contains("hunter2"), "{socket:?}");
        let endpoint = FleetConfig { endpoint: Some("http://key:hunter2@10.0.0.6:8333".into()), ..config.clone() };
        assert!(!format!("{endpoint:?}").contains("hunter2"), "{endpoint:?}");
        let error = endpoint.validate().unwrap_err().to_string();
        assert!(!error.contains("hunter2") && error.contains("carries credentials"), "{error}");
        let bad_endpoint = FleetConfig { endpoint: Some("ftp://key:hunter2@10.0.0.6".into()), ..config };
        let error = bad_endpoint.validate().unwrap_err().to_string();
        assert!(!error.contains("hunter2") && error.contains("endpoint"), "{error}");
    }
}
