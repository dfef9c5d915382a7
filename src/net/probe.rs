//! Timing a link over a control stream: its round trip (empty requests),
//! and its throughput (payloads four times larger each, until one's
//! transfer is long enough that QUIC's slow start and the round trip weigh
//! little). The head times its links to the nodes this way, and a node the
//! link to another node, which the head cannot see.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::connection::Control;
use super::frame::Frame;
use super::message::Message;
use super::NetError;

/// How long a node may take to time its link to another node, all in (the
/// last 16 MiB probe at 5 Mbit/s takes 27 s), after connecting to it (at
/// most [`PEER_CONNECT_WAIT`]).
pub const PEER_PROBE_WAIT: Duration = Duration::from_secs(45);
/// How long a node waits to reach another node (the next stage, a peer to time).
pub const PEER_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a head waits for a node's answer to `ProbePeer`: longer than
/// the node's connection and probe together, so that an answer never comes
/// after the head gave up on it (and is then read as the next one's).
pub const PEER_PROBE_REPLY_WAIT: Duration = Duration::from_secs(60);

/// What one link measured, from the side that sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkTiming {
    pub rtt: Duration,
    /// None where only the round trip was timed.
    pub bits_per_sec: Option<f64>,
}

/// The least of a few round trips of a Ping: a probe's first, with its
/// connection's setup behind it, is not the link's.
pub async fn round_trip(control: &mut Control, wait: Duration) -> Result<Duration, NetError> {
    const PINGS: u64 = 3;
    let mut best = Duration::MAX;
    for nonce in 0..PINGS {
        let t = Instant::now();
        match control.request(Frame::new(Message::Ping { nonce }), wait).await?.message {
            Message::Pong { .. } => best = best.min(t.elapsed()),
            other => return Err(NetError::Unexpected { got: other.kind(), expected: "Pong" }),
        }
    }
    Ok(best)
}

/// The link's throughput towards the peer, in bits per second: probes from
/// 64 KiB to 16 MiB until one's transfer, less the round trip `rtt`, lasts
/// 100 ms and eight round trips: QUIC's window opens one round trip at a
/// time, so on a far link a probe of only 100 ms is mostly slow start (a
/// 50 Mbit/s link 40 ms away timed at 17 Mbit/s). `wait` bounds each request.
pub async fn rate(control: &mut Control, rtt: Duration, wait: Duration) -> Result<f64, NetError> {
    const FIRST: usize = 64 << 10;
    const LAST: usize = 16 << 20;
    let long_enough = Duration::from_millis(100).max(rtt * 8);
    let mut bytes = FIRST;
    loop {
        let t = Instant::now();
        match control.request(Frame::with_payload(Message::Probe, vec![0; bytes]), wait).await?.message {
            Message::Probed { bytes: got } if got == bytes as u64 => {}
            Message::Probed { bytes: got } => {
                return Err(NetError::Pipeline(format!("the peer counted {got} bytes of a {bytes}-byte probe")))
            }
            other => return Err(NetError::Unexpected { got: other.kind(), expected: "Probed" }),
        }
        let transfer = t.elapsed().saturating_sub(rtt);
        if transfer >= long_enough || bytes >= LAST {
            return Ok(bytes as f64 * 8.0 / transfer.max(Duration::from_micros(1)).as_secs_f64());
        }
        bytes *= 4;
    }
}

/// Round trip, then throughput when `with_rate`.
pub async fn time_link(control: &mut Control, with_rate: bool, wait: Duration) -> Result<LinkTiming, NetError> {
    let rtt = round_trip(control, wait).await?;
    let bits_per_sec = if with_rate { Some(rate(control, rtt, wait).await?) } else { None };
    Ok(LinkTiming { rtt, bits_per_sec })
}
