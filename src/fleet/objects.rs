//! Where things live in the fleet's bucket: `artifacts/<sha256>.pt` (the
//! exact artifact bytes, content-addressed), `manifests/<cache key>.json`
//! (the signed manifest) and `leases/<cache key>/<generation>.json` (claims
//! to compile), all under the configured prefix.
use super::remote::Listed;

/// The object names of one fleet (a bucket and a prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectNames {
    bucket: String,
    /// The prefix with one trailing `/`, or empty.
    prefix: String,
}

impl ObjectNames {
    /// The names under `prefix` (slashes at either end ignored) in `bucket`.
    pub fn new(bucket: &str, prefix: &str) -> Self {
        let trimmed = prefix.trim_matches('/');
        let prefix = if trimmed.is_empty() { String::new() } else { format!("{trimmed}/") };
        ObjectNames { bucket: bucket.to_string(), prefix }
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Where the fleet's objects are: the bucket, `/`, then the prefix
    /// (with its trailing `/`, if any).
    pub fn root(&self) -> String {
        format!("{}/{}", self.bucket, self.prefix)
    }

    /// The artifact with this sha256 (hex).
    pub fn artifact(&self, sha256: &str) -> String {
        format!("{}artifacts/{sha256}.pt", self.prefix)
    }

    /// The manifest of this cache key.
    pub fn manifest(&self, cache_key: &str) -> String {
        format!("{}manifests/{cache_key}.json", self.prefix)
    }

    /// The folder of every manifest.
    pub fn manifests(&self) -> String {
        format!("{}manifests/", self.prefix)
    }

    /// The folder of every artifact.
    pub fn artifacts(&self) -> String {
        format!("{}artifacts/", self.prefix)
    }

    /// The folder of every lease.
    pub fn leases(&self) -> String {
        format!("{}leases/", self.prefix)
    }

    /// The folder of the leases of one cache key.
    pub fn lease_folder(&self, cache_key: &str) -> String {
        format!("{}leases/{cache_key}/", self.prefix)
    }

    /// One generation of a cache key's lease.
    pub fn lease(&self, cache_key: &str, generation: u64) -> String {
        format!("{}leases/{cache_key}/{generation:010}.json", self.prefix)
    }

    /// The generation a lease object's name carries, if it is one.
    pub fn lease_generation(name: &str) -> Option<u64> {
        name.rsplit('/').next()?.strip_suffix(".json")?.parse().ok()
    }

    /// The cache key a lease object's name (under these names' prefix)
    /// carries, if it is one.
    pub fn lease_key<'a>(&self, name: &'a str) -> Option<&'a str> {
        let rest = name.strip_prefix(&self.leases())?;
        let (key, generation) = rest.split_once('/')?;
        Self::lease_generation(generation).map(|_| key)
    }

    /// The cache key a lease folder's name (under these names' prefix,
    /// ending in `/`, as [`Self::lease_folder`] gives it) carries, if it
    /// is one.
    pub fn lease_folder_key<'a>(&self, folder: &'a str) -> Option<&'a str> {
        let key = folder.strip_prefix(&self.leases())?.strip_suffix('/')?;
        (!key.is_empty() && !key.contains('/')).then_some(key)
    }

    /// The cache key a manifest object's name carries, if it is one.
    pub fn manifest_key(name: &str) -> Option<&str> {
        name.rsplit('/').next()?.strip_suffix(".json")
    }

    /// The cache keys of the manifests in a listing (other objects skipped).
    pub fn manifest_keys(listed: &[Listed]) -> impl Iterator<Item = &str> {
        listed.iter().filter_map(|m| Self::manifest_key(&m.name))
    }

    /// The reference a remote consumer fetches an artifact by:
    /// `s3://<bucket>/<prefix>artifacts/<sha256>.pt`.
    pub fn artifact_url(&self, sha256: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.artifact(sha256))
    }
}

#[cfg(test)]
mod tests {
    use super::ObjectNames;

    #[test]
    fn names_and_references() {
        let names = ObjectNames::new("fleet", "/runs/a/");
        assert_eq!(names.artifact("ab"), "runs/a/artifacts/ab.pt");
        assert_eq!(names.manifest("k"), "runs/a/manifests/k.json");
        assert_eq!(names.lease("k", 3), "runs/a/leases/k/0000000003.json");
        assert_eq!(ObjectNames::lease_generation(&names.lease("k", 12)), Some(12));
        assert_eq!(names.lease_key(&names.lease("k", 12)), Some("k"));
        assert_eq!(names.lease_key(&names.manifest("k")), None);
        assert_eq!(names.lease_folder_key(&names.lease_folder("k")), Some("k"));
        assert_eq!(names.lease_folder_key("runs/a/leases/"), None);
        assert_eq!(names.lease_folder_key("runs/a/leases/k/deeper/"), None);
        assert_eq!(names.lease_folder_key("runs/ab/leases/k/"), None);
        assert_eq!(ObjectNames::manifest_key(&names.manifest("kk")), Some("kk"));
        assert_eq!(names.artifact_url("ab"), "s3://fleet/runs/a/artifacts/ab.pt");
        assert_eq!(ObjectNames::new("fleet", "").artifact("ab"), "artifacts/ab.pt");
    }
}
