//! The library's error type.
//!
//! One enum for the whole library: callers (the CLI, the node, the HTTP
//! API's `ApiError`) match on the variant to pick an exit code, a wire error
//! code or a status code, and the message is always one line a user can act
//! on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle (its message, without the backtrace
    /// candle appends when `RUST_BACKTRACE` is set).
    #[error("{0}")]
    Candle(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The model file exists but cannot be used as it is.
    #[error("invalid model file {path}: {reason}")]
    BadModel { path: PathBuf, reason: String },

    #[error("unsupported architecture '{name}' (supported: {supported})")]
    UnsupportedArchitecture { name: String, supported: String },

    /// A model source that no resolver recognised.
    #[error("unknown model '{0}': not a .gguf file, not a model directory, not an Ollama tag in the local store, not a hub repository, and not in the catalog")]
    UnknownModel(String),

    /// Fetching a model failed (network, pip, checksum).
    #[error("could not fetch model '{model}': {reason}")]
    Fetch { model: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    /// A request that cannot be served as asked.
    #[error("{0}")]
    InvalidRequest(String),

    /// The wire or a remote node.
    #[error("{0}")]
    Net(#[from] crate::net::NetError),

    #[error("a prompt of {prompt} tokens does not fit the context of {context} tokens")]
    ContextOverflow { prompt: usize, context: usize },

    /// A device kernel (`kernels/cuda`) refused its shapes or failed to launch.
    #[error("device kernel {kernel}: {reason}")]
    Kernel { kernel: String, reason: String },

    /// The network lab (namespaces, links, relays) could not be set up.
    #[error("network lab: {0}")]
    Lab(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(first_line(&e))
    }
}

/// The first line of an error's message: candle appends a backtrace after it.
pub fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub fn bad_model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadModel { path: path.into(), reason: reason.into() }
    }
}
