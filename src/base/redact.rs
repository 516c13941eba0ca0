//! Secrets kept out of messages and debug output.

/// A server URL without its credentials, for errors, logs and `Debug`
/// output: `redis://user:secret@host:6379` shows as `redis://…@host:6379`,
/// and a query (`unix:///run/redis.sock?pass=secret`, where Redis clients
/// read a password) as `?…`. Credentials are cut up to the last `@`
/// first, so a `?` or `@` inside a password never leaves part of it in
/// view (an `@` in a query cuts more than needed, never less). A
/// configuration's password never reaches a log file by way of an error.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let (credentials, address) = match rest.rfind('@') {
        Some(at) => ("…", &rest[at..]),
        None => ("", rest),
    };
    match address.split_once('?') {
        Some((before, _)) => format!("{scheme}{credentials}{before}?…"),
        None => format!("{scheme}{credentials}{address}"),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn credentials_are_cut_and_the_rest_kept() {
        assert_eq!(redacted_url("redis://:hunter2@10.0.0.5:6379/0"), "redis://…@10.0.0.5:6379/0");
        assert_eq!(redacted_url("rediss://user:p@ss@cache.example:6380"), "rediss://…@cache.example:6380");
        assert_eq!(redacted_url("redis://10.0.0.5:6379"), "redis://10.0.0.5:6379");
        assert_eq!(redacted_url("unix:///run/redis.sock"), "unix:///run/redis.sock");
        assert_eq!(redacted_url("user:hunter2@no-scheme"), "…@no-scheme");
        assert_eq!(redacted_url("redis://:hun?ter2@host:6379"), "redis://…@host:6379");
        assert_eq!(redacted_url("redis://:hun@ter2@host:6379"), "redis://…@host:6379");
        assert_eq!(redacted_url("unix:///run/redis.sock?pass=a@b"), "unix://…@b");
        assert_eq!(redacted_url("unix:///run/redis.sock?db=1&pass=hunter2"), "unix:///run/redis.sock?…");
        assert_eq!(redacted_url("redis://:hunter2@host:6379/0?protocol=resp3"), "redis://…@host:6379/0?…");
        assert_eq!(redacted_url("http://key:secret@127.0.0.1:8333"), "http://…@127.0.0.1:8333");
    }
}
