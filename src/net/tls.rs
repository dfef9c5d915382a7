//! TLS 1.3 for every QUIC connection: node certificates (generated and
//! persisted on first start) and the endpoint configurations.
//!
//! Peers are authenticated by the cluster key (see `auth`), bound to this TLS
//! session; the client still checks that the server holds the private key of
//! the certificate it presents.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::NetError;

pub const ALPN: &[u8] = b"sollol/1";
/// The name nodes put in their certificates and clients ask for.
pub const SERVER_NAME: &str = "sollol-node";

fn tls_err(e: impl std::fmt::Display) -> NetError {
    NetError::Tls(e.to_string())
}

/// The node's certificate and key from `dir`, created there on first start.
/// Both live in one file written by rename, so processes starting together
/// never see a certificate paired with another one's key.
pub fn load_or_create_cert(dir: &Path) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), NetError> {
    let path = dir.join("node-identity.der");
    let split_identity = |bytes: &[u8]| -> Option<(Vec<u8>, Vec<u8>)> {
        let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let cert = bytes.get(4..4 + n)?.to_vec();
        let key = bytes.get(4 + n..)?.to_vec();
        (!key.is_empty()).then_some((cert, key))
    };
    let pair = match std::fs::read(&path).ok().as_deref().and_then(split_identity) {
        Some(pair) => pair,
        None => {
            let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(tls_err)?;
            let (cert, key) = (certified.cert.der().to_vec(), certified.signing_key.serialize_der());
            let mut bytes = (cert.len() as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&cert);
            bytes.extend_from_slice(&key);
            std::fs::create_dir_all(dir).map_err(|e| tls_err(format!("cannot create {}: {e}", dir.display())))?;
            let tmp = dir.join(format!("node-identity.{}.tmp", std::process::id()));
            std::fs::write(&tmp, &bytes).map_err(|e| tls_err(format!("cannot write {}: {e}", tmp.display())))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600));
            }
            std::fs::rename(&tmp, &path).map_err(|e| tls_err(format!("cannot write {}: {e}", path.display())))?;
            (cert, key)
        }
    };
    Ok((CertificateDer::from(pair.0), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.1))))
}

/// Dead peers are noticed within the idle timeout; keep-alives keep healthy
/// but quiet links open. Windows fit a prefill chunk of a large model.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(Duration::from_secs(3).try_into().expect("valid idle timeout")));
    t.stream_receive_window((64u32 << 20).into());
    t.receive_window((256u32 << 20).into());
    t.send_window(256 << 20);
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(16u32.into());
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn server_config(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Result<quinn::ServerConfig, NetError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).map_err(tls_err)?));
    cfg.transport_config(transport());
    Ok(cfg)
}

pub fn client_config() -> Result<quinn::ClientConfig, NetError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KeyHolderVerifier { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).map_err(tls_err)?));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// A server endpoint on `addr` that can also open connections (to the next stage).
pub fn server_endpoint(addr: SocketAddr, state_dir: &Path) -> Result<quinn::Endpoint, NetError> {
    let (cert, key) = load_or_create_cert(state_dir)?;
    let mut ep = quinn::Endpoint::server(server_config(cert, key)?, addr)
        .map_err(|e| NetError::Connection(format!("cannot listen on {addr}: {e}")))?;
    ep.set_default_client_config(client_config()?);
    Ok(ep)
}

/// A client-only endpoint on an ephemeral port of the family of `towards`.
pub fn client_endpoint(towards: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let bind: SocketAddr = if towards.is_ipv6() { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
    let mut ep = quinn::Endpoint::client(bind).map_err(|e| NetError::Connection(format!("cannot bind a UDP socket: {e}")))?;
    ep.set_default_client_config(client_config()?);
    Ok(ep)
}

/// Accepts any certificate (identity comes from the cluster key) but verifies
/// the handshake signature, so the server must hold the certificate's key.
#[derive(Debug)]
struct KeyHolderVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for KeyHolderVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
