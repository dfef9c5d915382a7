//! The wire: frames, messages, activation encoding, QUIC connections, TLS and
//! cluster-key authentication.
//!
//! Layers, bottom up: [`frame`] (bytes ⇄ frame, no I/O), [`message`] (what a
//! frame says), [`tensor`] (activation payloads), [`connection`] (frames over a
//! QUIC stream), [`tls`] (certificates, endpoints), [`auth`] (the handshake).
//!
//! Architecture invariant: nothing outside `net` sees bytes on the wire.

pub mod auth;
pub mod connection;
pub mod frame;
pub mod message;
pub mod tensor;
pub mod tls;

use std::time::Duration;

pub use frame::{Frame, PROTOCOL_VERSION};

/// Errors of the wire. A small enum on purpose: the data path matches on it
/// (a version mismatch is reported, a closed stream ends a loop quietly).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("peer speaks protocol version {got}, this build speaks {want}")]
    Version { got: u8, want: u8 },
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("{0}")]
    Decode(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("connection: {0}")]
    Connection(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("unexpected {got} message (expected {expected})")]
    Unexpected { got: &'static str, expected: &'static str },
    /// An error a remote node reported.
    #[error("{0}")]
    Remote(String),
    #[error("tls: {0}")]
    Tls(String),
}

impl From<candle_core::Error> for NetError {
    fn from(e: candle_core::Error) -> Self {
        NetError::Decode(crate::error::first_line(&e))
    }
}

impl From<quinn::ConnectionError> for NetError {
    fn from(e: quinn::ConnectionError) -> Self {
        NetError::Connection(e.to_string())
    }
}

impl From<quinn::WriteError> for NetError {
    fn from(e: quinn::WriteError) -> Self {
        NetError::Connection(e.to_string())
    }
}

/// Bounds a wait; `what` names it in the error.
pub async fn timeout<T>(d: Duration, what: &str, fut: impl std::future::Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
    tokio::time::timeout(d, fut).await.map_err(|_| NetError::Timeout(d, what.to_string()))?
}
