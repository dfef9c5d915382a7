//! Cluster-key authentication, bound to the TLS session.
//!
//! Both ends derive keying material from the connection's TLS secrets
//! (RFC 5705 exporter) and prove knowledge of the cluster key with
//! HMAC-SHA256(key, role ‖ material). A man in the middle holds two different
//! TLS sessions, so a proof relayed from one is worthless on the other. The
//! node checks the head's proof before it reads any other frame; the head
//! checks the node's, so it never sends a prompt to an impostor.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::connection::{split, FrameReader, FrameWriter};
use super::frame::{Frame, Limits, PROTOCOL_VERSION};
use super::message::{Capabilities, ErrorCode, Message, PeerRole, RemoteError};
use super::{timeout, NetError};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const EXPORTER_LABEL: &[u8] = b"EXPORTER-sollol-cluster-key";

/// The shared secret of a cluster; `None` runs open (allowed on loopback only).
#[derive(Clone, Default)]
pub struct ClusterKey(Option<Vec<u8>>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ClusterKey(set)" } else { "ClusterKey(none)" })
    }
}

impl ClusterKey {
    pub fn new(key: Option<&str>) -> Self {
        Self(key.filter(|k| !k.is_empty()).map(|k| k.as_bytes().to_vec()))
    }

    /// A fresh random key (hex), for clusters this process starts itself.
    pub fn random_hex() -> String {
        let bytes: [u8; 16] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn proof(&self, conn: &quinn::Connection, role: &[u8]) -> Result<Vec<u8>, NetError> {
        let mut material = [0u8; 32];
        conn.export_keying_material(&mut material, EXPORTER_LABEL, role)
            .map_err(|_| NetError::Auth("authentication failed: cannot export TLS keying material".into()))?;
        let key = self.0.as_deref().unwrap_or(&[]);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(role);
        mac.update(&material);
        Ok(mac.finalize().into_bytes().to_vec())
    }

    fn verify(&self, conn: &quinn::Connection, role: &[u8], proof: &[u8]) -> Result<(), NetError> {
        let expected = self.proof(conn, role)?;
        // Constant-time comparison through the MAC's own verify would need the
        // raw MAC; compare in constant time by hand.
        let same = expected.len() == proof.len() && expected.iter().zip(proof).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(())
        } else {
            Err(NetError::Auth("authentication failed: wrong cluster key".into()))
        }
    }
}

const CLIENT_ROLE: &[u8] = b"sollol client";
const SERVER_ROLE: &[u8] = b"sollol server";

/// The caller's side: opens the first stream, proves the key, checks the
/// node's proof, and returns the stream (for control requests) and the
/// node's capabilities.
pub async fn client_handshake(
    conn: &quinn::Connection,
    key: &ClusterKey,
    role: PeerRole,
) -> Result<(FrameReader, FrameWriter, Capabilities), NetError> {
    timeout(HANDSHAKE_TIMEOUT, "the handshake", async {
        let (mut reader, mut writer) = split(conn.open_bi().await?);
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            build: env!("CARGO_PKG_VERSION").to_string(),
            role,
            proof: key.proof(conn, CLIENT_ROLE)?,
        };
        writer.write(&Frame::new(hello)).await?;
        match reader.expect().await?.message {
            Message::Welcome { capabilities, proof } => {
                if key.verify(conn, SERVER_ROLE, &proof).is_err() {
                    return Err(NetError::Auth("authentication failed: the node does not hold this cluster key".into()));
                }
                Ok((reader, writer, capabilities))
            }
            Message::Error(e) => Err(NetError::Auth(e.message)),
            other => Err(NetError::Unexpected { got: other.kind(), expected: "Welcome" }),
        }
    })
    .await
}

/// The node's side: reads Hello from the first stream and checks it before
/// anything else is read. On failure the node answers with an error frame
/// (the caller learns why) and the connection is closed by the caller.
pub async fn server_handshake(
    conn: &quinn::Connection,
    key: &ClusterKey,
    capabilities: impl FnOnce() -> Capabilities,
) -> Result<(FrameReader, FrameWriter, PeerRole), NetError> {
    timeout(HANDSHAKE_TIMEOUT, "the handshake", async {
        let (mut reader, mut writer) = split(conn.accept_bi().await?);
        reader.set_limits(Limits::PRE_AUTH);
        let refuse = |message: String| Frame::new(Message::Error(RemoteError::new("", ErrorCode::Refused, message)));
        let frame = match reader.expect().await {
            Ok(f) => f,
            Err(e) => {
                let _ = writer.write(&refuse(e.to_string())).await;
                writer.finish_and_flush().await;
                return Err(e);
            }
        };
        let (protocol, role, proof) = match frame.message {
            Message::Hello { protocol, role, proof, .. } => (protocol, role, proof),
            other => {
                let e = NetError::Unexpected { got: other.kind(), expected: "Hello" };
                let _ = writer.write(&refuse(e.to_string())).await;
                writer.finish_and_flush().await;
                return Err(e);
            }
        };
        if protocol != PROTOCOL_VERSION {
            let e = NetError::Version { got: protocol, want: PROTOCOL_VERSION };
            let _ = writer.write(&refuse(e.to_string())).await;
            writer.finish_and_flush().await;
            return Err(e);
        }
        if key.is_set() {
            if let Err(e) = key.verify(conn, CLIENT_ROLE, &proof) {
                let _ = writer.write(&refuse(e.to_string())).await;
                writer.finish_and_flush().await;
                return Err(e);
            }
        }
        let welcome = Message::Welcome { capabilities: capabilities(), proof: key.proof(conn, SERVER_ROLE)? };
        writer.write(&Frame::new(welcome)).await?;
        reader.set_limits(Limits::DEFAULT);
        Ok((reader, writer, role))
    })
    .await
}
