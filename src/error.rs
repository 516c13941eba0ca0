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

/// An error with a stable code and a human-readable message that names the
/// offending input (field, parameter, path, blueprint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: ErrorCode,
    message: String,
}

impl Error {
    /// Creates an error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
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
        Error { code: self.code, message: format!("{context}: {}", self.message) }
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

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
