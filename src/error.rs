//! The library's error type. Every error knows whether it is the user's (bad input, bad
//! flags: exit code 2) or simile's own (exit code 1), so the binaries can map it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: a file, row, column or flag the user can fix. The message names them.
    #[error("{0}")]
    Input(String),
    /// Several input problems found in one pass, reported together.
    #[error("{}", .0.join("\n"))]
    InputMany(Vec<String>),
    /// A file the user named could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A Parquet or Arrow failure on a named file (unreadable or not Parquet: the user's).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A device was asked for that this machine does not have.
    #[error("{0}")]
    Device(String),
    /// Something simile did wrong: a bug or an environment failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// Distributed training failed between the processes (`torch_ext`): a peer that died, never
    /// came, or did not answer within the timeout; a collective that failed on the wire. Not
    /// the user's input (their mistakes there, a port in use or an address that is not this
    /// machine's, are `Input`), so simile's: exit 1, and re-running may well succeed.
    #[error("distributed: {0}")]
    Distributed(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Not a failure: the stage's output is already up to date, nothing was done (raised only
    /// where the binary turned reuse on; `cli::run` prints it and exits 0).
    #[error("{0}")]
    UpToDate(String),
}

impl Error {
    /// The process exit code this error maps to: 2 for the user's errors, 1 for ours.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_)
            | Error::InputMany(_)
            | Error::Io { .. }
            | Error::Format { .. }
            | Error::Device(_) => 2,
            Error::Internal(_) | Error::Distributed(_) | Error::Torch(_) => 1,
            Error::UpToDate(_) => 0,
        }
    }

    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Format {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
