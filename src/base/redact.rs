//! Secrets kept out of messages and debug output.

/// A server URL without its credentials, for errors, logs and `Debug`
/// output: `redis://user:secret@host:6379` shows as `redis://…@host:6379`,
/// and a query (`unix:///run/redis.sock?pass=secret`, where Redis clients
/// read a password) as `?…`. A configuration's password never reaches a
/// log file by way of an error.
pub fn redacted_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((before, _)) => (before, "?…"),
        None => (url, ""),
    };
    let url = match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) if at > scheme.len() => format!("{scheme}://…{}", &url[at..]),
        _ => url.to_string(),
    };
    format!("{url}{query}")
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
        assert_eq!(redacted_url("no scheme@all"), "no scheme@all");
        assert_eq!(redacted_url("unix:///run/redis.sock?db=1&pass=hunter2"), "unix:///run/redis.sock?…");
        assert_eq!(redacted_url("redis://:hunter2@host:6379/0?protocol=resp3"), "redis://…@host:6379/0?…");
        assert_eq!(redacted_url("http://key:secret@127.0.0.1:8333"), "http://…@127.0.0.1:8333");
    }
}
