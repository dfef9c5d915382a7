//! The wire: frames, messages, activation encoding, QUIC connections, TLS and
//! cluster-key authentication.
//!
//! Layers, bottom up: [`frame`] (bytes ⇄ frame, no I/O), [`message`] (what a
//! frame says), [`tensor`] (activation payloads), [`connection`] (frames over a
//! QUIC stream), [`tls`] (certificates, endpoints), [`auth`] (the handshake),
//! [`probe`] (timing a link over a control stream).
//!
//! Architecture invariant: nothing outside `net` sees bytes on the wire.

pub mod announce;
pub mod auth;
pub mod connection;
pub mod frame;
pub mod kv;
pub mod message;
pub mod probe;
pub mod tensor;
pub mod tls;

use std::time::Duration;

pub use frame::{Frame, PROTOCOL_VERSION};

/// Errors of the wire. A small enum on purpose: the data path matches on it
/// (a version mismatch is reported, a closed stream ends a loop quietly).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("peer speaks protocol version {got}, this build speaks {want}")]
    Version { got: u8, want: u8 },
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("{0}")]
    Decode(String),
    /// The cluster key did not match (the message says whose).
    #[error("{0}")]
    Auth(String),
    #[error("connection: {0}")]
    Connection(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("unexpected {got} message (expected {expected})")]
    Unexpected { got: &'static str, expected: &'static str },
    /// An error a remote node reported, with its code.
    #[error("{0}")]
    Remote(message::RemoteError),
    /// What the head's side of a pipeline cannot do as asked (a plan of the
    /// wrong length, a stage that does not exist).
    #[error("{0}")]
    Pipeline(String),
    #[error("tls: {0}")]
    Tls(String),
}

impl From<candle_core::Error> for NetError {
    fn from(e: candle_core::Error) -> Self {
        // candle appends a backtrace after the first line.
        NetError::Decode(e.to_string().lines().next().unwrap_or_default().to_string())
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

impl NetError {
    /// The remote error's code, if a node reported this.
    pub fn code(&self) -> Option<message::ErrorCode> {
        match self {
            NetError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Bounds a wait; `what` names it in the error.
pub async fn timeout<T>(d: Duration, what: &str, fut: impl std::future::Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
    tokio::time::timeout(d, fut).await.map_err(|_| NetError::Timeout(d, what.to_string()))?
}

/// The first address `addr` (`host:port`) resolves to.
pub async fn resolve_addr(addr: &str) -> Result<std::net::SocketAddr, NetError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| NetError::Connection(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| NetError::Connection(format!("{addr} resolves to no address")))
}
