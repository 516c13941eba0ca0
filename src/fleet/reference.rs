//! Fetching an announced artifact by its reference, for a consumer on any
//! host (a Kasmina process, a loader) that has no forge of its own:
//! `s3://<bucket>/<prefix>artifacts/<sha256>.pt` names the artifact by its
//! content, so the bytes are checked against the sha256 in the name (and
//! against the checksum the announcement carried, when given) before they
//! are written, durably, where the caller asked.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::config::FleetConfig;
use super::objects::ObjectNames;
use super::remote::{RemoteStore, Streamed};
use crate::base::error::{Error, ErrorCode, Result};
use crate::base::hex;
use crate::sys::fs::{directory_of, remove_stale_temp_files_of, DurableFile};

/// The largest artifact a fetch reads (1 GiB): the bucket is untrusted,
/// and an object larger than this is refused without being read further
/// (nor written: a fetch streams to disk, holding little in memory).
pub const FETCH_LIMIT: u64 = 1 << 30;

/// How old a temp file beside the destination, left by a killed fetch of
/// the same path, must be for a fetch to remove it: two days, longer than
/// any fetch may last (a request timeout of at most a day, then a second
/// per MiB of at most [`FETCH_LIMIT`]), so a fetch under way keeps its own.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(2 * 24 * 3600);

/// An artifact reference taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactReference {
    /// The bucket it lives in.
    pub bucket: String,
    /// Its object name in the bucket (`<prefix>artifacts/<sha256>.pt`).
    pub object: String,
    /// The sha256 (lowercase hex) its bytes must hash to.
    pub sha256: String,
}

impl ArtifactReference {
    /// Parses `s3://<bucket>/<prefix>artifacts/<sha256>.pt`, as catalog
    /// updates and prefetch answers carry once an artifact is published.
    pub fn parse(text: &str) -> Result<Self> {
        let shape = "s3://<bucket>/<prefix>artifacts/<sha256>.pt";
        let Some(rest) = text.strip_prefix("s3://") else {
            let hint = if text.starts_with('/') {
                ": a local path is readable only on the host whose forge wrote it (its forge announces an s3:// \
                 reference once the artifact is published)"
            } else {
                ""
            };
            return Err(Error::invalid(format!("artifact reference {text:?} is not {shape}{hint}")));
        };
        let (bucket, object) = rest.split_once('/').unwrap_or((rest, ""));
        let sha256 = object.rsplit_once("artifacts/").map(|(_, file)| file).and_then(|file| file.strip_suffix(".pt"));
        let sha256 = match sha256 {
            Some(sha) if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => sha,
            _ => return Err(Error::invalid(format!("artifact reference {text:?} is not {shape} (sha256 in lowercase hex)"))),
        };
        let prefix = &object[..object.len() - "artifacts/".len() - sha256.len() - ".pt".len()];
        // The same bucket and prefix rules a fleet's configuration follows.
        let mut names = FleetConfig::new(bucket);
        names.prefix = prefix.to_string();
        names.validate().map_err(|e| e.context(format!("artifact reference {text:?}")))?;
        let canonical = ObjectNames::new(bucket, prefix).artifact(sha256);
        if canonical != object {
            return Err(Error::invalid(format!(
                "artifact reference {text:?} is not {shape}: its object name is not a fleet's ({canonical:?} would be)"
            )));
        }
        Ok(ArtifactReference { bucket: bucket.to_string(), object: object.to_string(), sha256: sha256.to_string() })
    }
}

/// An artifact fetched and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedArtifact {
    /// Where it was written.
    pub path: PathBuf,
    /// Its sha256 (lowercase hex), checked.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Fetches the artifact `reference` names from its bucket and writes it
/// durably at `path` (replacing any file there; nothing is written unless
/// every check passes). Its bytes must hash to the sha256 the reference
/// carries and, when `expected_sha256` is given (the `checksum` of the
/// catalog update or prefetch answer that announced it), to that too.
/// `config` says how to reach the store (endpoint, region, credentials,
/// request timeout; its other settings are checked as for a forge, but
/// not used); its bucket may be left empty, and otherwise must be the
/// reference's. The destination must be a regular file or not exist (a
/// symbolic link, device or FIFO there is refused, not replaced). A fetch
/// killed midway leaves only its temp file beside `path`, which a later
/// fetch to `path` removes once it is two days old. Errors a caller can
/// match: `InvalidArgument` (a malformed reference or
/// checksum, another bucket, such a destination), `NotFound` (the bucket
/// lacks it), `Corrupt` (its bytes do not hash right), `BudgetExceeded`
/// (larger than [`FETCH_LIMIT`]), `Io` (the store or the file system
/// failed, or the bucket does not exist).
pub fn fetch_artifact(config: &FleetConfig, reference: &str, expected_sha256: Option<&str>, path: &Path) -> Result<FetchedArtifact> {
    let parsed = ArtifactReference::parse(reference)?;
    if let Some(expected) = expected_sha256 {
        if !(expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(Error::invalid(format!("expected sha256 {expected:?} is not 64 hexadecimal digits")));
        }
        let expected = expected.to_ascii_lowercase();
        if expected != parsed.sha256 {
            return Err(Error::invalid(format!(
                "artifact reference {reference:?} names sha256 {}, but the expected checksum is {expected}",
                parsed.sha256
            )));
        }
    }
    check_destination(path)?;
    let mut config = config.clone();
    if config.bucket.is_empty() {
        config.bucket = parsed.bucket.clone();
    } else if config.bucket != parsed.bucket {
        return Err(Error::invalid(format!(
            "artifact reference {reference:?} is in bucket {:?}, not in the configured bucket {:?}",
            parsed.bucket, config.bucket
        )));
    }
    let store = RemoteStore::connect(&config)?;
    // Killed fetches of this path leave their temp files: no forge's
    // state directory is there to clean them at open.
    remove_stale_temp_files_of(path, STALE_TEMP_AGE);
    // Streamed to a temp file while hashed, so that memory stays flat
    // whatever the artifact's size; it takes the path's name only once
    // every check passed (dropped, it leaves nothing behind).
    let mut file = DurableFile::create(path)?;
    let mut hasher = Sha256::new();
    let streamed = store.run(store.stream(&parsed.object, FETCH_LIMIT, &mut |chunk| {
        hasher.update(chunk);
        file.write(chunk)
    }))?;
    let size = match streamed {
        Streamed::Done(size) => size,
        Streamed::Missing => {
            return Err(Error::new(ErrorCode::NotFound, format!("{reference}: no such artifact at {}", store.endpoint())))
        }
        Streamed::TooLarge => {
            return Err(Error::new(ErrorCode::BudgetExceeded, format!("{reference}: the bucket's object is over {FETCH_LIMIT} bytes")))
        }
    };
    let sha256 = hex::encode(&hasher.finalize());
    if sha256 != parsed.sha256 {
        return Err(Error::new(
            ErrorCode::Corrupt,
            format!("{reference}: the bucket's copy is damaged ({size} bytes hashing to {sha256}); nothing was written"),
        ));
    }
    file.commit()?;
    Ok(FetchedArtifact { path: path.to_path_buf(), sha256, size })
}

/// Refuses a destination the artifact cannot be written at as a regular
/// file: a directory, something other than a regular file (a symbolic
/// link, a device such as `/dev/null`, a FIFO: a rename would replace
/// it), a path naming no file (empty, or ending in `/`), or a path whose
/// directory does not exist.
fn check_destination(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(Error::invalid(format!("{} is a directory: name the artifact's file", path.display()))),
        Ok(meta) if !meta.file_type().is_file() => {
            return Err(Error::invalid(format!(
                "{} is not a regular file (a symbolic link, device, FIFO or socket): it would be replaced; name a file's path",
                path.display()
            )))
        }
        _ => {}
    }
    if path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err(Error::invalid(format!("{:?} names no file to write the artifact to", path.display().to_string())));
    }
    let dir = directory_of(path);
    if !dir.is_dir() {
        return Err(Error::invalid(format!("{}: no directory {} to write it in", path.display(), dir.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ArtifactReference;
    use crate::base::error::ErrorCode;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_are_taken_apart_and_bad_ones_named() {
        let parsed = ArtifactReference::parse(&format!("s3://fleet/runs/a/artifacts/{SHA}.pt")).unwrap();
        assert_eq!(parsed.bucket, "fleet");
        assert_eq!(parsed.object, format!("runs/a/artifacts/{SHA}.pt"));
        assert_eq!(parsed.sha256, SHA);
        assert_eq!(ArtifactReference::parse(&format!("s3://fleet/artifacts/{SHA}.pt")).unwrap().object, format!("artifacts/{SHA}.pt"));
        for (bad, says) in [
            (format!("/var/lib/tezzeret/artifacts/{SHA}.pt"), "a local path"),
            (format!("http://fleet/artifacts/{SHA}.pt"), "is not s3://"),
            (format!("s3://fleet/artifacts/{}.pt", SHA.to_uppercase()), "lowercase hex"),
            (format!("s3://fleet/artifacts/{}.pt", &SHA[1..]), "lowercase hex"),
            (format!("s3://fleet/manifests/{SHA}.json"), "lowercase hex"),
            ("s3://fleet".to_string(), "lowercase hex"),
            (format!("s3://Fleet!/artifacts/{SHA}.pt"), "not an S3 bucket name"),
            (format!("s3://fleet/a b/artifacts/{SHA}.pt"), "has the character ' '"),
            (format!("s3://fleet/a/./artifacts/{SHA}.pt"), "empty, '.' or '..' part"),
            (format!("s3://fleet/a//artifacts/{SHA}.pt"), "(\"a/artifacts/0123"),
            (format!("s3://fleet//artifacts/{SHA}.pt"), "not a fleet's"),
            (format!("s3://fleet/xartifacts/{SHA}.pt"), "(\"x/artifacts/0123"),
            (format!("s3://-fleet/artifacts/{SHA}.pt"), "not an S3 bucket name"),
            (format!("s3://fleet../artifacts/{SHA}.pt"), "not an S3 bucket name"),
            (format!("s3://127.0.0.1/artifacts/{SHA}.pt"), "not an S3 bucket name"),
        ] {
            let error = ArtifactReference::parse(&bad).unwrap_err();
            assert_eq!(error.code(), ErrorCode::InvalidArgument, "{bad}");
            assert!(error.message().contains(says), "{bad}: {}", error.message());
        }
    }
}
