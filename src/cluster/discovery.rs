//! Finding nodes: probing an address range, or every address a DNS name
//! resolves to (a Kubernetes headless Service), with the QUIC handshake
//! only; and LAN announcements by multicast (opt-in on both sides; the
//! datagrams are `net::announce`'s).

pub use crate::net::announce::{listen, Announcement, DEFAULT_GROUP};

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::net::auth::{client_handshake, ClusterKey};
use crate::net::message::{Capabilities, PeerRole};
use crate::net::{tls, NetError};

/// The largest range a probe accepts (a /16).
pub const MAX_PROBE: u64 = 1 << 16;

#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub addr: String,
    /// Present when the cluster key matched.
    pub capabilities: Option<Capabilities>,
    /// A sollol node answered but refused the key (or had none).
    pub key_refused: bool,
}

/// The host addresses of an IPv4 CIDR block (network and broadcast excluded
/// for blocks larger than /31).
pub fn hosts(cidr: &str) -> Result<Vec<Ipv4Addr>> {
    let bad = || Error::InvalidRequest(format!("'{cidr}' is not an IPv4 CIDR block like 192.168.1.0/24"));
    let (ip, bits) = cidr.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let bits: u32 = bits.parse().map_err(|_| bad())?;
    if bits > 32 {
        return Err(bad());
    }
    let size = 1u64 << (32 - bits);
    if size > MAX_PROBE {
        return Err(Error::InvalidRequest(format!("{cidr} holds {size} addresses; probe at most a /16")));
    }
    let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
    let base = u32::from(ip) & mask;
    let all = (0..size).map(|i| Ipv4Addr::from(base + i as u32));
    Ok(if size > 2 { all.skip(1).take(size as usize - 2).collect() } else { all.collect() })
}

/// Probes `port` on every host of `cidr`, `concurrency` at a time, each with
/// `wait` to answer. Only the handshake is run: no model traffic.
pub async fn probe(cidr: &str, port: u16, key: &ClusterKey, concurrency: usize, wait: Duration) -> Result<Vec<Found>> {
    let addrs = hosts(cidr)?.into_iter().map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, port))).collect();
    probe_addrs(addrs, key, concurrency, wait).await
}

/// Probes every address `name` resolves to (`host` or `host:port`, `port`
/// when it names none): the pods behind a Kubernetes headless Service.
pub async fn probe_dns(name: &str, port: u16, key: &ClusterKey, concurrency: usize, wait: Duration) -> Result<Vec<Found>> {
    let target =
        if name.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) { name.to_string() } else { format!("{name}:{port}") };
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host(&target).await.map_err(|e| Error::InvalidRequest(format!("cannot resolve {target}: {e}")))?.collect();
    probe_addrs(addrs, key, concurrency, wait).await
}

/// Probes each of `addrs`, `concurrency` at a time.
async fn probe_addrs(addrs: Vec<SocketAddr>, key: &ClusterKey, concurrency: usize, wait: Duration) -> Result<Vec<Found>> {
    let endpoint = tls::client_endpoint("0.0.0.0:0".parse().expect("address"))?;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for addr in addrs {
        let (endpoint, key, permits) = (endpoint.clone(), key.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            probe_one(&endpoint, addr, &key, wait).await
        });
    }
    let mut found = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(f)) = r {
            found.push(f);
        }
    }
    found.sort_by_key(|f| f.addr.parse::<SocketAddr>().ok());
    Ok(found)
}

async fn probe_one(endpoint: &quinn::Endpoint, addr: SocketAddr, key: &ClusterKey, wait: Duration) -> Option<Found> {
    let conn = tokio::time::timeout(wait, endpoint.connect(addr, tls::SERVER_NAME).ok()?).await.ok()?.ok()?;
    let result = client_handshake(&conn, key, PeerRole::Head).await;
    conn.close(0u32.into(), b"probe");
    match result {
        Ok((_, _, caps)) => Some(Found { addr: addr.to_string(), capabilities: Some(caps), key_refused: false }),
        // It spoke our protocol: a node, with another key.
        Err(NetError::Auth(_)) => Some(Found { addr: addr.to_string(), capabilities: None, key_refused: true }),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks_expand_to_host_addresses() {
        assert_eq!(hosts("10.0.0.0/30").unwrap(), vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(hosts("127.0.0.5/32").unwrap(), vec![Ipv4Addr::new(127, 0, 0, 5)]);
        assert_eq!(hosts("192.168.1.77/24").unwrap().len(), 254);
        assert!(hosts("10.0.0.0/8").is_err(), "too large");
        assert!(hosts("nonsense").is_err());
        assert!(hosts("10.0.0.0/33").is_err());
    }
}
