//! One error type for the crate. Every variant names what went wrong and where (the op, the file,
//! the tensor), so a user can act on the message without a backtrace.

use std::fmt;
use std::path::PathBuf;

use crate::DType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug)]
pub enum Error {
    /// Shapes that do not fit an op: names the op and every shape involved.
    Shape { op: &'static str, msg: String },
    /// A dtype an op cannot take.
    DType {
        op: &'static str,
        got: DType,
        expected: &'static str,
    },
    /// A tensor on a device the op does not support (yet).
    Device { op: &'static str, msg: String },
    /// Reading or writing a file.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file that is there but does not hold what it should (corrupt, missing tensor, ...).
    Format { path: PathBuf, msg: String },
    /// No usable CUDA driver or GPU, or a build without kernels.
    NoGpu(String),
    /// A CUDA driver call that failed.
    Cuda(String),
    /// Any other invalid argument, with its explanation.
    Invalid(String),
}

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { op, msg } => write!(f, "{op}: shape mismatch: {msg}"),
            Error::DType { op, got, expected } => {
                write!(f, "{op}: unsupported dtype {got:?} (expected {expected})")
            }
            Error::Device { op, msg } => write!(f, "{op}: {msg}"),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, msg } => write!(f, "{}: {msg}", path.display()),
            Error::NoGpu(msg) => write!(f, "no usable GPU: {msg}"),
            Error::Cuda(msg) => write!(f, "CUDA error: {msg}"),
            Error::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
