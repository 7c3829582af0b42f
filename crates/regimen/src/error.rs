//! The library's one error type.
//!
//! Every variant names what was wrong and where: the layer (by its path in the model, like
//! `features.3 (Conv2d 32->64 k3)`), the field, the file, and the shapes or values that were
//! expected and found. A panic is reserved for broken internal invariants.

use std::fmt;

/// A shape, printed like `[128, 1, 28, 28]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ShapeDisplay(pub Vec<usize>);

impl fmt::Display for ShapeDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
impl fmt::Debug for ShapeDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor reached a layer or a loss with a shape it cannot take.
    #[error("{layer}: expected input of shape {expected}, got {got}")]
    Shape {
        layer: String,
        expected: String,
        got: ShapeDisplay,
    },
    /// A configuration value is out of range.
    #[error("invalid {field} = {value}: {reason}")]
    Config {
        field: String,
        value: String,
        reason: String,
    },
    /// `backward` was called without a matching `forward` in training mode.
    #[error("{layer}: backward called before forward(.., Mode::Train)")]
    NoForwardCache { layer: String },
    /// Bad data in a file.
    #[error("{file}: {reason}")]
    Data { file: String, reason: String },
    /// Training produced a non-finite loss; the model was put back to its last finite state.
    #[error("training diverged: the {what} of step {step} (epoch {epoch}) {verb} not finite (NaN or infinity); the model is back at its state {restored}")]
    Diverged {
        epoch: usize,
        step: u64,
        restored: String,
        /// "loss" (a step's loss), or "weights after the update" (the epoch's last update
        /// made a parameter non-finite, which no loss of the epoch could show).
        what: &'static str,
        verb: &'static str,
    },
    /// A device cannot be used (no driver, no such GPU, a build without its feature).
    #[error("{device}: {reason}")]
    Device { device: String, reason: String },
    /// Data-parallel training: a launcher without MPI support, ranks that disagree, a rank
    /// that stopped answering.
    #[error("{0}")]
    Distributed(String),
    /// An operating-system error, with what was being done (`reading data/x.idx`). Its
    /// `source()` is the OS error (printed after the context by `{:#}` in anyhow chains).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Prefix the layer path of a shape/cache error with the path of the parent that holds it.
    pub fn in_layer(self, path: &str) -> Error {
        match self {
            Error::Shape {
                layer,
                expected,
                got,
            } => Error::Shape {
                layer: format!("{path} ({layer})"),
                expected,
                got,
            },
            Error::NoForwardCache { layer } => Error::NoForwardCache {
                layer: format!("{path} ({layer})"),
            },
            other => other,
        }
    }

    pub(crate) fn shape(
        layer: impl Into<String>,
        expected: impl Into<String>,
        got: &[usize],
    ) -> Error {
        Error::Shape {
            layer: layer.into(),
            expected: expected.into(),
            got: ShapeDisplay(got.to_vec()),
        }
    }

    pub(crate) fn config(field: &str, value: impl fmt::Display, reason: &str) -> Error {
        Error::Config {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
