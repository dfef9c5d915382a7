//! The node's network side: accept connections, authenticate them, and serve
//! three kinds of streams — control (request/response), data (Forward/Close
//! frames in), events (results/errors out to a head).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::stage::{spawn_worker, Admission, Fault, LoadedModel, Outputs, RingOut, Work, NEXT_QUEUE};
use crate::model::source;
use crate::model::{ModelFile, ModelSlice};
use crate::net::auth::{client_handshake, server_handshake, ClusterKey};
use crate::net::connection::{split, Control, FrameReader, FrameWriter};
use crate::net::frame::{Frame, PROTOCOL_VERSION};
use crate::net::message::{
    split_forwards, Capabilities, ErrorCode, ForwardHeader, LoadRequest, LoadedSlice, Message, PeerRole, RemoteError, RingLink,
    StreamPurpose,
};
use crate::net::probe::{self, LinkTiming, PEER_CONNECT_WAIT, PEER_PROBE_WAIT};
use crate::net::tensor::WireDType;
use crate::net::{resolve_addr, timeout, tls, NetError};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub key: ClusterKey,
    /// Memory the node offers (weights + KV); default: what the OS reports available.
    pub memory_limit: Option<u64>,
    /// Where the node keeps its certificate.
    pub state_dir: PathBuf,
    pub threads: usize,
    /// A file locked around every forward pass, shared by nodes on one machine
    /// so that their passes take turns on the cores instead of thrashing.
    pub compute_lock: Option<PathBuf>,
    /// Multicast group to announce this node on (LAN discovery, opt-in).
    pub announce: Option<std::net::SocketAddrV4>,
    /// Where slices, their KV caches and their compute live.
    pub device: candle_core::Device,
    /// Sessions and idle time; `admission.kv_bytes` is set at each load
    /// from `kv_memory` (or what the memory offered leaves after weights).
    pub admission: Admission,
    /// KV memory sessions may hold (default: the offered memory the
    /// weights leave).
    pub kv_memory: Option<u64>,
    /// Connections served at once; more are refused before their handshake.
    pub max_connections: usize,
    /// How the host is linked (reported, not used).
    pub link: Option<String>,
    /// Which cores the node computes on (default: `sys::compute_id`, found at start).
    pub compute_id: Option<String>,
}

impl NodeConfig {
    /// A loopback node on a free port, open (no key), on the CPU, with
    /// default limits.
    pub fn local(state_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            key: ClusterKey::default(),
            memory_limit: None,
            state_dir,
            threads: 0,
            compute_lock: None,
            announce: None,
            device: candle_core::Device::Cpu,
            admission: Admission::default(),
            kv_memory: None,
            max_connections: 256,
            link: None,
            compute_id: None,
        }
    }
}

struct Node {
    cfg: NodeConfig,
    endpoint: quinn::Endpoint,
    work: mpsc::Sender<Work>,
    outputs: Arc<Outputs>,
    loaded: Mutex<Option<LoadedSlice>>,
    /// The links to the next stage and (on the last stage) to the first,
    /// for a ring's steps, kept alive while linked.
    links: tokio::sync::Mutex<Links>,
}

#[derive(Default)]
struct Links {
    next: Option<NextLink>,
    ring: Option<NextLink>,
}

struct NextLink {
    conn: quinn::Connection,
    _control: (FrameReader, FrameWriter),
}

/// Serves until `shutdown` completes, then stops taking work, lets the
/// steps already queued finish, drops every session and closes its
/// connections. Prints `sollol node listening on ADDR` on stdout once the
/// socket is bound (the port is chosen when ADDR ends in :0).
pub async fn run(mut cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> crate::Result<()> {
    if !cfg.listen.ip().is_loopback() && !cfg.key.is_set() {
        return Err(crate::Error::InvalidRequest(format!(
            "refusing to listen on {} without a cluster key: pass --cluster-key or set SOLLOL_CLUSTER_KEY (only loopback addresses may run open)",
            cfg.listen
        )));
    }
    let endpoint = tls::server_endpoint(cfg.listen, &cfg.state_dir)?;
    cfg.compute_id.get_or_insert_with(|| crate::sys::compute_id(&crate::model::device::name(&cfg.device)));
    let local = endpoint.local_addr().map_err(|e| crate::Error::io("listen address", e))?;
    let outputs = Arc::new(Outputs::new(local.to_string()));
    let work = spawn_worker(outputs.clone(), open_lock(cfg.compute_lock.as_deref())?, cfg.admission)
        .map_err(|e| crate::Error::io("cannot start the stage worker", e))?;
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    let node =
        Arc::new(Node { work, cfg, endpoint: endpoint.clone(), outputs, loaded: Mutex::new(None), links: tokio::sync::Mutex::default() });
    if let Some(group) = node.cfg.announce {
        let iface = match local.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
            _ => std::net::Ipv4Addr::UNSPECIFIED,
        };
        tokio::spawn(async move {
            if let Err(e) = crate::net::announce::announce(group, iface, local.to_string(), std::time::Duration::from_secs(1)).await {
                tracing::warn!("announcements stopped: {e}");
            }
        });
    }
    // An idle worker still frees idle sessions.
    let sweeper = node.work.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Err(mpsc::error::TrySendError::Closed(_)) = sweeper.try_send(Work::Sweep) {
                break;
            }
        }
    });
    println!("sollol node listening on {local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refused a connection: {} are open", node.cfg.max_connections);
            incoming.refuse();
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            if let Err(e) = node.handle_connection(incoming).await {
                tracing::info!(%remote, "connection ended: {e}");
            }
        });
    }
    node.shut_down().await;
    Ok(())
}

fn open_lock(path: Option<&std::path::Path>) -> crate::Result<Option<std::fs::File>> {
    path.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(p)
            .map_err(|e| crate::Error::io(format!("cannot open the compute lock {}", p.display()), e))
    })
    .transpose()
}

fn error_frame(node: &str, code: ErrorCode, message: String) -> Frame {
    Frame::new(Message::Error(RemoteError::new(node, code, message)))
}

impl Node {
    /// Queues work for the stage worker, waiting while its queue is full.
    async fn send_work(&self, w: Work) -> Result<(), Fault> {
        self.work.send(w).await.map_err(|_| Fault::new(ErrorCode::Internal, "the stage worker stopped"))
    }

    /// Steps that came in one frame, to the worker, arrived together.
    async fn send_steps(&self, steps: Vec<(ForwardHeader, Vec<u8>)>) -> Result<(), Fault> {
        let arrived = Instant::now();
        for (header, payload) in steps {
            self.send_work(Work::Forward { header, payload, arrived }).await?;
        }
        Ok(())
    }

    /// Waits for the worker's answer to a request.
    async fn answer<T>(&self, rx: oneshot::Receiver<Result<T, Fault>>) -> Result<T, Fault> {
        rx.await.unwrap_or_else(|_| Err(Fault::new(ErrorCode::Internal, "the stage worker failed this request (see the node's log)")))
    }

    /// Stops taking work: the steps already queued run (their results go
    /// out), then every session is dropped and the connections close.
    async fn shut_down(&self) {
        tracing::info!("shutting down: finishing queued steps");
        let (done, rx) = oneshot::channel();
        if self.send_work(Work::Install { model: None, kv_bytes: 0, done }).await.is_ok() {
            let _ = rx.await;
        }
        self.endpoint.close(0u32.into(), b"node shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    fn capabilities(&self) -> Capabilities {
        // A GPU offers its own memory; the CPU the system's.
        let (total, available) = crate::model::device::memory(&self.cfg.device).or_else(crate::sys::memory_bytes).unwrap_or((0, 0));
        let held = self.loaded.lock().expect("loaded lock").as_ref().map_or(0, |l| l.weight_bytes);
        let offered = self.cfg.memory_limit.map_or(available, |l| l.min(available));
        Capabilities {
            protocol: PROTOCOL_VERSION,
            build: env!("CARGO_PKG_VERSION").to_string(),
            device: crate::model::device::name(&self.cfg.device),
            cores: crate::sys::cpu_cores() as u32,
            threads: if self.cfg.threads == 0 { crate::sys::cpu_cores() as u32 } else { self.cfg.threads as u32 },
            total_memory: self.cfg.memory_limit.unwrap_or(total),
            free_memory: offered.saturating_sub(held),
            memory_limit: self.cfg.memory_limit,
            link: self.cfg.link.clone(),
            compute: self.cfg.compute_id.clone().unwrap_or_default(),
            loaded: self.loaded.lock().expect("loaded lock").clone(),
            sessions: self.outputs.sessions.load(Ordering::Relaxed),
        }
    }

    async fn handle_connection(self: Arc<Self>, incoming: quinn::Incoming) -> Result<(), NetError> {
        let conn = incoming.await?;
        let (reader, writer, role) = match server_handshake(&conn, &self.cfg.key, || self.capabilities()).await {
            Ok(v) => v,
            Err(e) => {
                conn.close(1u32.into(), e.to_string().as_bytes());
                return Err(e);
            }
        };
        tracing::info!(remote = %conn.remote_address(), ?role, "authenticated");
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(e) = node.control_loop(reader, writer).await {
                tracing::info!("control stream ended: {e}");
            }
        });
        loop {
            let stream = conn.accept_bi().await?;
            let node = self.clone();
            tokio::spawn(async move {
                let (reader, writer) = split(stream);
                if let Err(e) = node.attached_stream(reader, writer).await {
                    tracing::info!("stream ended: {e}");
                }
            });
        }
    }

    async fn attached_stream(self: Arc<Self>, mut reader: FrameReader, mut writer: FrameWriter) -> Result<(), NetError> {
        match reader.expect().await?.message {
            Message::Attach { purpose: StreamPurpose::Data } => self.data_loop(reader, writer).await,
            Message::Attach { purpose: StreamPurpose::Events } => {
                let mut rx = self.outputs.subscribe();
                while let Some(frame) = rx.recv().await {
                    writer.write(&frame).await?;
                }
                Ok(())
            }
            other => {
                let e = NetError::Unexpected { got: other.kind(), expected: "Attach" };
                writer.write(&error_frame(&self.outputs.node, ErrorCode::Malformed, e.to_string())).await?;
                writer.finish_and_flush().await;
                Err(e)
            }
        }
    }

    /// Forward and Close frames, in order, into the worker. A bad frame is
    /// reported to the sender and to the heads; the stream cannot be trusted
    /// after it, so it ends, and the node goes on serving everyone else.
    async fn data_loop(&self, mut reader: FrameReader, mut writer: FrameWriter) -> Result<(), NetError> {
        loop {
            let Some(frame) = self.next_frame(&mut reader, &mut writer, "data").await? else { return Ok(()) };
            let sent = match frame.message {
                Message::Forward(header) => self.send_work(Work::Forward { header, payload: frame.payload, arrived: Instant::now() }).await,
                Message::Forwards(headers) => match split_forwards(headers, &frame.payload) {
                    Ok(steps) => self.send_steps(steps).await,
                    Err(e) => return Err(self.refuse(&mut writer, "data", e).await),
                },
                Message::Close { session } => self.send_work(Work::Close { session }).await,
                Message::Halt { session } => self.send_work(Work::Halt { session }).await,
                other => {
                    let e = NetError::Unexpected { got: other.kind(), expected: "Forward, Forwards, Close or Halt" };
                    writer.write(&error_frame(&self.outputs.node, ErrorCode::Malformed, e.to_string())).await?;
                    Ok(())
                }
            };
            if let Err(f) = sent {
                let _ = writer.write(&error_frame(&self.outputs.node, f.code, f.message.clone())).await;
                return Err(NetError::Remote(RemoteError::new(&self.outputs.node, f.code, f.message)));
            }
        }
    }

    /// The stream's next frame (`None` at its clean end). One that does not
    /// parse is refused with an Error frame to the sender (and, on a data
    /// stream, to the heads, whose steps may wait on it); the stream's
    /// framing cannot be trusted past it, so the stream ends.
    async fn next_frame(&self, reader: &mut FrameReader, writer: &mut FrameWriter, stream: &str) -> Result<Option<Frame>, NetError> {
        match reader.read().await {
            // The sender went away (a head that finished, a stage that died):
            // its own connection tells its side; nothing to refuse here.
            Err(e @ NetError::Connection(_)) => Err(e),
            Err(e) => Err(self.refuse(writer, stream, e).await),
            read => read,
        }
    }

    /// Refuses a frame that does not parse, or whose parts do not add up:
    /// an Error frame to the sender (and, on a data stream, to the heads),
    /// then the stream ends.
    async fn refuse(&self, writer: &mut FrameWriter, stream: &str, e: NetError) -> NetError {
        let message = format!("refused a frame on a {stream} stream: {e}");
        if stream == "data" {
            self.outputs.error(None, None, Fault::new(ErrorCode::Malformed, message.clone()));
        }
        let _ = writer.write(&error_frame(&self.outputs.node, ErrorCode::Malformed, message)).await;
        writer.finish_and_flush().await;
        e
    }

    /// Requests answered in order. A frame that does not parse is answered
    /// with an Error frame and ends the stream (its framing cannot be
    /// trusted past it); the connection's other streams go on.
    async fn control_loop(&self, mut reader: FrameReader, mut writer: FrameWriter) -> Result<(), NetError> {
        loop {
            let Some(frame) = self.next_frame(&mut reader, &mut writer, "control").await? else { return Ok(()) };
            let reply = match self.control(frame).await {
                Ok(reply) => reply,
                Err(f) => error_frame(&self.outputs.node, f.code, f.message),
            };
            writer.write(&reply).await?;
        }
    }

    async fn control(&self, frame: Frame) -> Result<Frame, Fault> {
        Ok(match frame.message {
            Message::GetCapabilities => Frame::new(Message::Capabilities(self.capabilities())),
            // A node whose worker stopped must not look healthy.
            Message::Ping { .. } if !self.outputs.worker_alive.load(Ordering::Acquire) => {
                return Err(Fault::new(ErrorCode::Internal, "the stage worker stopped; this node serves no steps"))
            }
            Message::Ping { nonce } => Frame::new(Message::Pong {
                nonce,
                sessions: self.outputs.sessions.load(Ordering::Relaxed),
                busy_nanos: self.outputs.busy_nanos.load(Ordering::Relaxed),
                tokens: self.outputs.tokens.load(Ordering::Relaxed),
                batches: self.outputs.batches.load(Ordering::Relaxed),
            }),
            Message::Probe => Frame::new(Message::Probed { bytes: frame.payload.len() as u64 }),
            Message::ProbePeer { addr, rate } => Frame::new(Message::PeerProbed(self.probe_peer(&addr, rate).await?)),
            Message::Load(req) => Frame::new(Message::Loaded(self.load(req).await?)),
            Message::Unload => {
                self.install(None, 0).await?;
                *self.loaded.lock().expect("loaded lock") = None;
                Frame::new(Message::Ok)
            }
            Message::Link { next, wire, ring } => {
                self.link(next, wire, ring).await?;
                Frame::new(Message::Ok)
            }
            Message::ExportKv { session, dtype } => {
                let (reply, rx) = oneshot::channel();
                self.send_work(Work::ExportKv { session, dtype, reply }).await?;
                self.answer(rx).await?
            }
            Message::ImportKv(header) => {
                let (reply, rx) = oneshot::channel();
                self.send_work(Work::ImportKv { header, payload: frame.payload, reply }).await?;
                self.answer(rx).await?;
                Frame::new(Message::Ok)
            }
            other => {
                return Err(Fault::new(
                    ErrorCode::Malformed,
                    NetError::Unexpected { got: other.kind(), expected: "a control request" }.to_string(),
                ))
            }
        })
    }

    async fn install(&self, model: Option<Box<LoadedModel>>, kv_bytes: u64) -> Result<(), Fault> {
        let (done, rx) = oneshot::channel();
        self.send_work(Work::Install { model, kv_bytes, done }).await?;
        rx.await.map_err(|_| Fault::new(ErrorCode::Internal, "the stage worker failed to install the slice"))
    }

    /// Resolves the model here (the node fetches it if needed), checks the
    /// digest and the memory, and loads only the slice's tensors.
    async fn load(&self, req: LoadRequest) -> Result<LoadedSlice, Fault> {
        let offered = {
            let caps = self.capabilities();
            caps.free_memory + self.loaded.lock().expect("loaded lock").as_ref().map_or(0, |l| l.weight_bytes)
        };
        let node = self.outputs.node.clone();
        let device = self.cfg.device.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<Box<LoadedModel>, Fault> {
            let resolved = source::resolve(&req.model)?;
            let mut file = ModelFile::open(&resolved.path)?;
            let digest = file.digest()?;
            if let Some(want) = &req.digest {
                if *want != digest {
                    return Err(Fault::new(
                        ErrorCode::Invalid,
                        format!("model '{}' on {node} has digest {digest}, the head expects {want}: not the same model", req.model),
                    ));
                }
            }
            let cfg = file.config()?;
            let (start, end) = (req.start as usize, req.end as usize);
            if start >= end || end > cfg.n_layers {
                return Err(Fault::new(
                    ErrorCode::Invalid,
                    format!("layers {start}..{end} are not a non-empty range inside the model's {} blocks", cfg.n_layers),
                ));
            }
            let need = file.slice_bytes(start..end)?;
            if need > offered {
                return Err(Fault::new(
                    ErrorCode::Capacity,
                    format!(
                        "blocks {start}..{end} need {} but {node} offers {}",
                        crate::sys::human_bytes(need),
                        crate::sys::human_bytes(offered)
                    ),
                ));
            }
            let slice = ModelSlice::load(&mut file, start..end, &device)?;
            let info = LoadedSlice {
                model: req.model.clone(),
                architecture: cfg.arch.name.to_string(),
                digest,
                start: req.start,
                end: req.end,
                n_layers: cfg.n_layers as u32,
                hidden: cfg.hidden_size as u32,
                weight_bytes: slice.weight_bytes() as u64,
            };
            Ok(Box::new(LoadedModel { slice, info }))
        })
        .await
        .map_err(|e| Fault::new(ErrorCode::Internal, format!("loading failed (a bug: {e})")))??;
        let info = loaded.info.clone();
        let kv_bytes = self.cfg.kv_memory.unwrap_or_else(|| offered.saturating_sub(info.weight_bytes));
        self.install(Some(loaded), kv_bytes).await?;
        *self.loaded.lock().expect("loaded lock") = Some(info.clone());
        tracing::info!(model = %info.model, start = info.start, end = info.end, kv = %crate::sys::human_bytes(kv_bytes), "loaded");
        Ok(info)
    }

    /// An authenticated connection to another node, and its control stream.
    async fn connect_peer(&self, addr: &str) -> Result<(quinn::Connection, FrameReader, FrameWriter), NetError> {
        let sock = resolve_addr(addr).await?;
        let conn = timeout(PEER_CONNECT_WAIT, &format!("a connection to {addr}"), async {
            Ok(self.endpoint.connect(sock, tls::SERVER_NAME).map_err(|e| NetError::Connection(e.to_string()))?.await?)
        })
        .await?;
        let (reader, writer, _) = client_handshake(&conn, &self.cfg.key, PeerRole::Stage).await?;
        Ok((conn, reader, writer))
    }

    /// Times this node's link to the node at `addr`. The peer passes the
    /// cluster-key handshake before a byte of the probe goes out, so a head
    /// can aim a node's probe at other nodes only.
    async fn probe_peer(&self, addr: &str, rate: bool) -> Result<LinkTiming, Fault> {
        let failed = |e: NetError| Fault::new(ErrorCode::Failed, format!("cannot time the link to {addr}: {e}"));
        let (conn, reader, writer) = self.connect_peer(addr).await.map_err(failed)?;
        let mut control = Control::new(reader, writer, addr);
        let timing =
            timeout(PEER_PROBE_WAIT, &format!("a probe of the link to {addr}"), probe::time_link(&mut control, rate, PEER_PROBE_WAIT))
                .await;
        conn.close(0u32.into(), b"probed");
        timing.map_err(failed)
    }

    /// Connects to the next stage and routes this stage's output there; on
    /// the last stage, also to where a ring's steps go back in (`ring`).
    async fn link(&self, next: Option<String>, wire: WireDType, ring: Option<RingLink>) -> Result<(), Fault> {
        *self.outputs.wire.lock().expect("wire lock") = wire;
        let mut links = self.links.lock().await;
        for old in [links.next.take(), links.ring.take()].into_iter().flatten() {
            old.conn.close(0u32.into(), b"relinked");
        }
        *self.outputs.next.lock().expect("next lock") = None;
        *self.outputs.ring.lock().expect("ring lock") = None;
        if let Some(next) = next {
            let (link, tx) = self.open_link(&next, "the next stage").await?;
            *self.outputs.next.lock().expect("next lock") = Some(tx);
            links.next = Some(link);
        }
        let ring = match ring {
            None => None,
            Some(RingLink::Itself) => Some(RingOut::Itself),
            Some(RingLink::First(first)) => {
                let (link, tx) = self.open_link(&first, "the first stage").await?;
                links.ring = Some(link);
                Some(RingOut::Link(tx))
            }
        };
        *self.outputs.ring.lock().expect("ring lock") = ring;
        Ok(())
    }

    /// A data stream to the node at `addr` (`what` it is, for errors), fed
    /// by the returned queue; a write that fails is reported to the heads.
    async fn open_link(&self, addr: &str, what: &str) -> Result<(NextLink, mpsc::Sender<Frame>), Fault> {
        let unreachable = |e: NetError| Fault::new(ErrorCode::Failed, format!("cannot reach {what} {addr}: {e}"));
        let (conn, reader, writer) = self.connect_peer(addr).await.map_err(unreachable)?;
        let (mut back, mut data) = split(conn.open_bi().await.map_err(|e| unreachable(e.into()))?);
        data.write(&Frame::new(Message::Attach { purpose: StreamPurpose::Data })).await.map_err(unreachable)?;
        let (tx, mut rx) = mpsc::channel::<Frame>(NEXT_QUEUE);
        let outputs = self.outputs.clone();
        let lost = format!("lost the link to {what} {addr}");
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if let Err(e) = data.write(&frame).await {
                    outputs.error(None, None, Fault::new(ErrorCode::Failed, format!("{lost}: {e}")));
                    break;
                }
            }
        });
        let outputs = self.outputs.clone();
        tokio::spawn(async move {
            // The peer answers on this stream only to refuse a frame.
            while let Ok(Some(frame)) = back.read().await {
                if let Message::Error(e) = frame.message {
                    outputs.to_heads(Frame::new(Message::Error(e)));
                }
            }
        });
        Ok((NextLink { conn, _control: (reader, writer) }, tx))
    }
}
