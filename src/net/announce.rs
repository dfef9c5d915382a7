//! LAN announcements: a node's address as a small JSON datagram to a
//! multicast group, and a listener that collects them. Opt-in on both
//! sides; a heard address is only a hint (the head still proves the
//! cluster key over QUIC before using it).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::NetError;

fn io(what: impl std::fmt::Display, e: std::io::Error) -> NetError {
    NetError::Connection(format!("{what}: {e}"))
}

/// The default announcement group (administratively scoped, never routed off the site).
pub const DEFAULT_GROUP: &str = "239.255.70.70:7071";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub sollol: u8,
    pub addr: String,
    pub build: String,
}

fn multicast_socket(iface: Ipv4Addr, ttl: u32) -> Result<socket2::Socket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| io("multicast socket", e))?;
    s.set_reuse_address(true).map_err(|e| io("multicast socket", e))?;
    s.set_multicast_if_v4(&iface).map_err(|e| io(format!("multicast on {iface}"), e))?;
    s.set_multicast_ttl_v4(ttl).map_err(|e| io("multicast ttl", e))?;
    s.set_multicast_loop_v4(true).map_err(|e| io("multicast loop", e))?;
    Ok(s)
}

/// Sends this node's address to `group` every `every`, through `iface`. A
/// node listening on loopback announces on loopback only (TTL 0).
pub async fn announce(group: SocketAddrV4, iface: Ipv4Addr, node_addr: String, every: Duration) -> Result<(), NetError> {
    let ttl = if iface.is_loopback() { 0 } else { 1 };
    let socket = multicast_socket(iface, ttl)?;
    let socket: std::net::UdpSocket = socket.into();
    socket.set_nonblocking(true).map_err(|e| io("multicast socket", e))?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| io("multicast socket", e))?;
    let msg =
        serde_json::to_vec(&Announcement { sollol: super::PROTOCOL_VERSION, addr: node_addr, build: env!("CARGO_PKG_VERSION").into() })
            .map_err(|e| NetError::Decode(format!("cannot encode an announcement: {e}")))?;
    loop {
        if let Err(e) = socket.send_to(&msg, group).await {
            tracing::debug!("announcement not sent: {e}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Collects announcements heard on `group` through `iface` for `duration`.
pub async fn listen(group: SocketAddrV4, iface: Ipv4Addr, duration: Duration) -> Result<Vec<Announcement>, NetError> {
    let socket = multicast_socket(iface, 0)?;
    let bind = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port()));
    socket.bind(&bind.into()).map_err(|e| io(format!("cannot listen on {bind}"), e))?;
    socket.join_multicast_v4(group.ip(), &iface).map_err(|e| io(format!("cannot join {} on {iface}", group.ip()), e))?;
    let socket: std::net::UdpSocket = socket.into();
    socket.set_nonblocking(true).map_err(|e| io("multicast socket", e))?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| io("multicast socket", e))?;
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
