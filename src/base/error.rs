//! The library's error type: a stable code plus a message naming the problem.
use std::fmt;

/// Stable error codes. Their numeric values are part of the C ABI
/// (`TEZZERET_CODE_*`) and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// An argument is invalid (wrong value, out of range, wrong size).
    InvalidArgument = 1,
    /// A required pointer argument was NULL.
    NullArgument = 2,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 3,
    /// Bytes could not be decoded (protobuf, JSON, on-disk format).
    Malformed = 4,
    /// The caller's header speaks an incompatible ABI major version.
    AbiMismatch = 5,
    /// The state directory is held by another forge (this or another process).
    StateLocked = 6,
    /// A named thing (blueprint, artifact, parameter) does not exist.
    NotFound = 7,
    /// The blueprint is quarantine-only and quarantine compilation is off.
    Quarantined = 8,
    /// Compilation or validation of a blueprint failed.
    CompileFailed = 9,
    /// An operating-system I/O operation failed.
    Io = 10,
    /// Persistent state is corrupt; recovery refused to guess.
    Corrupt = 11,
    /// A handle was poisoned by an earlier internal error.
    Poisoned = 12,
    /// An internal error (a contained panic or a broken invariant).
    Internal = 13,
    /// A budget (time, memory) was exceeded.
    BudgetExceeded = 14,
    /// The operation is not supported in this build or on this machine.
    Unsupported = 15,
}

impl ErrorCode {
    /// Short lowercase name, used in messages and the CLI's JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NullArgument => "null_argument",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::Malformed => "malformed",
            ErrorCode::AbiMismatch => "abi_mismatch",
            ErrorCode::StateLocked => "state_locked",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Quarantined => "quarantined",
            ErrorCode::CompileFailed => "compile_failed",
            ErrorCode::Io => "io",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::Poisoned => "poisoned",
            ErrorCode::Internal => "internal",
            ErrorCode::BudgetExceeded => "budget_exceeded",
            ErrorCode::Unsupported => "unsupported",
        }
    }
}

/// Why a job or an artifact was refused, in words a machine matches on.
/// Set where the error is made and carried by it; [`FailureReason::as_str`]
/// is the one place the wire strings (job failure records, telemetry
/// `reason` attributes, `KernelArtifactError.reason`) are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// A job ran past its time budget and was abandoned.
    BudgetExceeded,
    /// A job grew process memory past its budget and was abandoned.
    MemoryBudgetExceeded,
    /// A job was abandoned because its forge was shutting down.
    Abandoned,
    /// An output contained NaN or infinity.
    NonFiniteOutput,
    /// The compiled output differs from the eager reference.
    NumericMismatch,
    /// Outputs exploded past the magnitude limit.
    MagnitudeExceeded,
    /// Outputs vanished below the magnitude floor.
    VanishingOutput,
    /// Two eager runs on the same inputs disagreed.
    NondeterministicOutput,
    /// A forward or a libtorch call failed while compiling.
    CompileError,
    /// No current artifact exists for the blueprint.
    MissingArtifact,
    /// The artifact file is gone or unreadable.
    ArtifactNotFound,
    /// The artifact file's sha256 is not the recorded one.
    ChecksumMismatch,
    /// The manifest is unsigned, signed by an untrusted key, or tampered.
    SignatureInvalid,
}

impl FailureReason {
    /// The reason as it appears on the wire and in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::BudgetExceeded => "budget_exceeded",
            FailureReason::MemoryBudgetExceeded => "memory_budget_exceeded",
            FailureReason::Abandoned => "abandoned",
            FailureReason::NonFiniteOutput => "non_finite_output",
            FailureReason::NumericMismatch => "numeric_mismatch",
            FailureReason::MagnitudeExceeded => "magnitude_exceeded",
            FailureReason::VanishingOutput => "vanishing_output",
            FailureReason::NondeterministicOutput => "nondeterministic_output",
            FailureReason::CompileError => "compile_error",
            FailureReason::MissingArtifact => "missing_artifact",
            FailureReason::ArtifactNotFound => "artifact_not_found",
            FailureReason::ChecksumMismatch => "checksum_mismatch",
            FailureReason::SignatureInvalid => "signature_invalid",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a stable code and a human-readable message that names the
/// offending input (field, parameter, path, blueprint); errors that refuse
/// a job or an artifact also carry a typed [`FailureReason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: ErrorCode,
    reason: Option<FailureReason>,
    message: String,
}

impl Error {
    /// Creates an error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, reason: None, message: message.into() }
    }

    /// Creates an error carrying a failure reason; its message starts with
    /// the reason's wire name (`checksum_mismatch: …`).
    pub fn failure(code: ErrorCode, reason: FailureReason, detail: impl fmt::Display) -> Self {
        Error { code, reason: Some(reason), message: format!("{reason}: {detail}") }
    }

    /// The failure reason, when the error refuses a job or an artifact.
    pub fn reason(&self) -> Option<FailureReason> {
        self.reason
    }

    /// The machine-readable reason of a failed job: its failure reason, else
    /// `compile_error` for compile failures, else the code's name.
    pub fn reason_name(&self) -> &'static str {
        match (self.reason, self.code) {
            (Some(reason), _) => reason.as_str(),
            (None, ErrorCode::CompileFailed) => FailureReason::CompileError.as_str(),
            (None, code) => code.name(),
        }
    }

    /// Shorthand for [`ErrorCode::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorCode::Malformed`].
    pub fn malformed(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Malformed, message)
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Self {
        Error::new(ErrorCode::Io, format!("{context}: {err}"))
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message (without the code name).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with context, keeping the code.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error { code: self.code, reason: self.reason, message: format!("{context}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code.name())
    }
}

impl std::error::Error for Error {}

impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Self {
        Error::new(ErrorCode::CompileFailed, format!("libtorch: {err}"))
    }
}

/// The text of a caught panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
