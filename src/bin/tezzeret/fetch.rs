//! `tezzeret fetch`: what a consumer on any host does with an announced
//! artifact reference: downloads it from the fleet's bucket, checks that
//! its bytes hash to the sha256 the reference names, and writes it durably.
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::options::parse_request_timeout;
use tezzeret::fleet::{fetch_artifact, ArtifactReference, FleetConfig};
use tezzeret::{ErrorCode, Result};

#[derive(Args)]
pub struct FetchArgs {
    /// The artifact's reference, as catalog updates and prefetch answers
    /// carry it: s3://BUCKET/PREFIX/artifacts/SHA256.pt.
    #[arg(value_name = "REFERENCE")]
    reference: String,
    /// Where the artifact goes (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also require this sha256 (the announcement's checksum).
    #[arg(long, value_name = "SHA256")]
    checksum: Option<String>,
    /// The S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long = "s3-endpoint", value_name = "URL")]
    endpoint: Option<String>,
    /// Region requests are signed for (default AWS_REGION or us-east-1).
    #[arg(long = "s3-region", value_name = "REGION")]
    region: Option<String>,
    /// How long the store may take to start its answer, seconds; the
    /// whole artifact may take a second more per MiB of its size.
    #[arg(long = "s3-timeout", value_name = "SECONDS", default_value = "5", value_parser = parse_request_timeout, allow_negative_numbers = true)]
    timeout: Duration,
}

/// Fetches one artifact and says where it went. An artifact that could
/// not be fetched (missing, damaged, too large, the store or the disk
/// failing) ends in exit status 1; a bad reference, setting or
/// destination is an error (exit status 2).
pub fn fetch(args: FetchArgs) -> Result<bool> {
    let mut config = FleetConfig::new(ArtifactReference::parse(&args.reference)?.bucket);
    config.endpoint = args.endpoint;
    config.region = args.region;
    config.request_timeout = args.timeout;
    match fetch_artifact(&config, &args.reference, args.checksum.as_deref(), &args.out) {
        Ok(fetched) => {
            println!("{} → {} ({} bytes, sha256 {}, checked)", args.reference, fetched.path.display(), fetched.size, fetched.sha256);
            Ok(true)
        }
        Err(e) if matches!(e.code(), ErrorCode::InvalidArgument | ErrorCode::InvalidUtf8) => Err(e),
        Err(e) => {
            eprintln!("tezzeret: {e}");
            Ok(false)
        }
    }
}
