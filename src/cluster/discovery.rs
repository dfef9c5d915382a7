//! Finding nodes: probing an address range with the QUIC handshake only, and
//! LAN announcements by multicast (opt-in on both sides).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
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
    let hosts = hosts(cidr)?;
    let endpoint = tls::client_endpoint("0.0.0.0:0".parse().expect("address"))?;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for ip in hosts {
        let (endpoint, key, permits) = (endpoint.clone(), key.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
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

/// The default announcement group (administratively scoped, never routed off the site).
pub const DEFAULT_GROUP: &str = "239.255.70.70:7071";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub sollol: u8,
    pub addr: String,
    pub build: String,
}

fn multicast_socket(iface: Ipv4Addr, ttl: u32) -> Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| Error::io("multicast socket", e))?;
    s.set_reuse_address(true).map_err(|e| Error::io("multicast socket", e))?;
    s.set_multicast_if_v4(&iface).map_err(|e| Error::io(format!("multicast on {iface}"), e))?;
    s.set_multicast_ttl_v4(ttl).map_err(|e| Error::io("multicast ttl", e))?;
    s.set_multicast_loop_v4(true).map_err(|e| Error::io("multicast loop", e))?;
    Ok(s)
}

/// Sends this node's address to `group` every `every`, through `iface`. A
/// node listening on loopback announces on loopback only (TTL 0).
pub async fn announce(group: SocketAddrV4, iface: Ipv4Addr, node_addr: String, every: Duration) -> Result<()> {
    let ttl = if iface.is_loopback() { 0 } else { 1 };
    let socket = multicast_socket(iface, ttl)?;
    let socket: std::net::UdpSocket = socket.into();
    socket.set_nonblocking(true).map_err(|e| Error::io("multicast socket", e))?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| Error::io("multicast socket", e))?;
    let msg = serde_json::to_vec(&Announcement {
        sollol: crate::net::PROTOCOL_VERSION,
        addr: node_addr,
        build: env!("CARGO_PKG_VERSION").into(),
    })
    .expect("announcement serializes");
    loop {
        if let Err(e) = socket.send_to(&msg, group).await {
            tracing::debug!("announcement not sent: {e}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Collects announcements heard on `group` through `iface` for `duration`.
pub async fn listen(group: SocketAddrV4, iface: Ipv4Addr, duration: Duration) -> Result<Vec<Announcement>> {
    let socket = multicast_socket(iface, 0)?;
    let bind = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port()));
    socket.bind(&bind.into()).map_err(|e| Error::io(format!("cannot listen on {bind}"), e))?;
    socket.join_multicast_v4(group.ip(), &iface).map_err(|e| Error::io(format!("cannot join {} on {iface}", group.ip()), e))?;
    let socket: std::net::UdpSocket = socket.into();
    socket.set_nonblocking(true).map_err(|e| Error::io("multicast socket", e))?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| Error::io("multicast socket", e))?;
    let mut heard: Vec<Announcement> = Vec::new();
    let deadline = tokio::time::Instant::now() + duration;
    let mut buf = [0u8; 1024];
    while let Ok(Ok((n, from))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
        if let Ok(mut a) = serde_json::from_slice::<Announcement>(&buf[..n]) {
            // A node listening on every interface announces 0.0.0.0: use the sender's address.
            if let Ok(addr) = a.addr.parse::<SocketAddr>() {
                if addr.ip().is_unspecified() {
                    a.addr = SocketAddr::new(from.ip(), addr.port()).to_string();
                }
            }
            if !heard.iter().any(|h| h.addr == a.addr) {
                heard.push(a);
            }
        }
    }
    heard.sort_by(|a, b| a.addr.cmp(&b.addr));
    Ok(heard)
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
