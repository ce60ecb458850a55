//! The one error type that crosses the PyO3 boundary: `lib.rs` maps each kind to a Python
//! exception once (`impl From<SplitterError> for PyErr`). No PyO3 here.

use thiserror::Error;

use crate::codec::CodecError;
use crate::nxmx::NxmxError;

#[derive(Debug, Error)]
pub enum SplitterError {
    /// A blob that cannot be decoded (Python: `intxr._splitter.DecodeError`, a ValueError).
    #[error(transparent)]
    Decode(#[from] CodecError),
    /// The NXmx writer failed (Python: OSError for file and HDF5 errors, else ValueError).
    #[error(transparent)]
    Nxmx(#[from] NxmxError),
    /// An argument or option that cannot work, named with the reason (Python: ValueError).
    #[error("{0}")]
    Invalid(String),
    /// The Splitter's run ended with an error (Python: ValueError, as before).
    #[error("{0}")]
    Run(String),
    /// The Splitter's thread panicked or its state was poisoned by one (Python: RuntimeError).
    #[error("{0}")]
    Internal(&'static str),
}

impl SplitterError {
    pub fn invalid(message: impl Into<String>) -> Self {
        SplitterError::Invalid(message.into())
    }
}
