//! The head's side of the QUIC pipeline: connections to every stage, the
//! data stream into the first one, and event streams out of all of them.
//!
//! Token ids go to stage 1; hidden states flow stage to stage; the last stage
//! samples and sends only the token back. Results are matched to waiting
//! steps by step id, so many sessions can be in flight at once.
//!
//! A stage can be replaced while sessions are live ([`Pipeline::replace_stage`]):
//! the new node loads the slice, steps pause (in-flight ones finish), every
//! live session's KV state moves from the old node to the new one, the chain
//! is re-linked, steps resume. Nothing is recomputed.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::client::{NodeClient, Pending, RingEvent, RingResults};
use super::engine::{Engine, SampleSpec, StepOutput};
use crate::cluster::netmodel::{Observed, MAX_MICRO_BATCHES};
use crate::model::Pooling;
use crate::net::auth::ClusterKey;
use crate::net::connection::FrameWriter;
use crate::net::frame::Frame;
use crate::net::message::{
    Capabilities, ErrorCode, ForwardHeader, ForwardInput, KvStateHeader, LoadRequest, LoadedSlice, Message, Ring, RingLink, SampleRequest,
    StageStep, StepResult,
};
use crate::net::resolve_addr;
use crate::net::tensor::WireDType;
use crate::net::{kv, tls, NetError};

/// How long a step may take before the head gives up on it. Dead peers are
/// noticed sooner, by QUIC's idle timeout; this bounds a stage that is alive
/// but stuck.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Pipeline {
    stages: RwLock<Vec<Arc<NodeClient>>>,
    data: tokio::sync::Mutex<FrameWriter>,
    pending: Pending,
    next_step: AtomicU64,
    loaded: RwLock<Vec<LoadedSlice>>,
    /// Sessions opened and not closed by this head (what a stage replacement
    /// moves), each with its micro-batch.
    live: Mutex<HashMap<u64, u8>>,
    /// Micro-batches as set (`set_micro_batches`), else as the network
    /// model picks them from `observed`.
    micro_batches: Mutex<Option<usize>>,
    /// What decode steps have measured of the stages and the hops.
    observed: Mutex<Observed>,
    /// The count last chosen (logged when it changes).
    chosen: AtomicUsize,
    /// A block move failed after a node began loading its new slice: the
    /// stages may no longer hold what `loaded` says, nor the sessions.
    broken: std::sync::atomic::AtomicBool,
    /// Held (shared) by every step from send to result; a stage replacement
    /// takes it exclusively, so it runs between steps, after halting the
    /// rings ([`Pipeline::pause`]).
    gate: tokio::sync::RwLock<()>,
    /// Stage replacements under way: no ring begins meanwhile.
    pausing: AtomicUsize,
    /// Whether the last stage is linked back to the first, for rings.
    ring: std::sync::atomic::AtomicBool,
    /// Ring steps whose results engines read (steps the head did not send).
    ring_steps: AtomicU64,
    wire: Mutex<WireDType>,
}

/// A ring the head began ([`Ring`]): its results as they come, and the
/// step ids it may feed back.
pub struct RingRun {
    results: RingResults,
    session: u64,
    steps: Range<u64>,
    pending: Pending,
}

impl RingRun {
    /// The ring's next result and when it arrived; `None` once the head
    /// halted the ring.
    async fn next(&mut self) -> Result<Option<(Instant, StepResult)>, NetError> {
        match tokio::time::timeout(STEP_TIMEOUT, self.results.recv()).await {
            Ok(Some(RingEvent::Result(at, result))) => Ok(Some((at, result?))),
            Ok(Some(RingEvent::Halted)) => Ok(None),
            Ok(None) => Err(NetError::Pipeline("the chain dropped a ring's step".into())),
            Err(_) => Err(NetError::Timeout(STEP_TIMEOUT, format!("a ring step of session {}", self.session))),
        }
    }
}

impl Drop for RingRun {
    /// Nobody reads the ring's results any more: stop queueing them.
    fn drop(&mut self) {
        self.pending.lock().expect("pending lock").forget_ring(self.session, self.steps.start);
    }
}

/// What a stage replacement did.
#[derive(Debug, Clone)]
pub struct Replaced {
    pub old: String,
    pub new: String,
    pub sessions_moved: usize,
    pub kv_bytes: u64,
    /// How long steps were paused.
    pub paused: Duration,
}

impl Pipeline {
    /// Connects and authenticates to every stage, in chain order.
    pub async fn connect(addrs: &[String], key: &ClusterKey) -> Result<Self, NetError> {
        if addrs.is_empty() {
            return Err(NetError::Connection("no nodes given".into()));
        }
        let endpoint = tls::client_endpoint(resolve_addr(&addrs[0]).await?)?;
        let mut clients = Vec::new();
        for addr in addrs {
            clients.push(NodeClient::connect(&endpoint, addr, key).await?);
        }
        Self::from_clients(clients).await
    }

    /// A pipeline over connected nodes: their events now complete this
    /// pipeline's steps, and a data stream into the first one is opened.
    pub async fn from_clients(stages: Vec<Arc<NodeClient>>) -> Result<Self, NetError> {
        let first = stages.first().ok_or_else(|| NetError::Connection("no nodes given".into()))?;
        let pending: Pending = Pending::default();
        for (i, s) in stages.iter().enumerate() {
            s.attach(pending.clone(), i + 1);
        }
        let data = first.open_data_stream().await?;
        let loaded: Vec<LoadedSlice> = stages.iter().filter_map(|s| s.capabilities().loaded).collect();
        let loaded = if loaded.len() == stages.len() { loaded } else { Vec::new() };
        Ok(Self {
            stages: RwLock::new(stages),
            data: tokio::sync::Mutex::new(data),
            pending,
            next_step: AtomicU64::new(1),
            loaded: RwLock::new(loaded),
            live: Mutex::new(HashMap::new()),
            micro_batches: Mutex::new(None),
            observed: Mutex::new(Observed::default()),
            chosen: AtomicUsize::new(0),
            broken: std::sync::atomic::AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
            pausing: AtomicUsize::new(0),
            ring: std::sync::atomic::AtomicBool::new(false),
            ring_steps: AtomicU64::new(0),
            wire: Mutex::new(WireDType::F16),
        })
    }

    pub fn capabilities(&self) -> Vec<(String, Capabilities)> {
        self.clients().iter().map(|s| (s.addr.clone(), s.capabilities())).collect()
    }

    pub fn clients(&self) -> Vec<Arc<NodeClient>> {
        self.stages.read().expect("stages lock").clone()
    }

    fn client(&self, i: usize) -> Arc<NodeClient> {
        self.stages.read().expect("stages lock")[i].clone()
    }

    pub fn loaded(&self) -> Vec<LoadedSlice> {
        self.loaded.read().expect("loaded lock").clone()
    }

    pub fn addrs(&self) -> Vec<String> {
        self.clients().iter().map(|s| s.addr.clone()).collect()
    }

    /// Sessions this head has open on the chain.
    pub fn live_sessions(&self) -> Vec<u64> {
        self.live.lock().expect("live lock").keys().copied().collect()
    }

    /// How many micro-batches new sessions are spread over: as set, else
    /// the count the network model predicts fastest for the sessions open
    /// now, from what the chain's steps measured
    /// ([`Observed::best_micro_batches`]); until they have measured enough,
    /// one per group of stages that can compute at once ([`independent_stages`]).
    pub fn micro_batches(&self) -> usize {
        if let Some(n) = *self.micro_batches.lock().expect("micro-batches lock") {
            return n;
        }
        let stages = self.capabilities();
        let clients = self.live.lock().expect("live lock").len() + 1;
        let current = self.chosen.load(Ordering::Relaxed).max(1);
        let observed = self.observed.lock().expect("observed lock").best_micro_batches(&core_groups(&stages), clients, current);
        let n = observed.unwrap_or_else(|| independent_stages(&stages));
        if self.chosen.swap(n, Ordering::Relaxed) != n {
            tracing::info!(micro_batches = n, sessions = clients, measured = observed.is_some(), "micro-batches for new sessions");
        }
        n
    }

    /// The micro-batch count new sessions were last given: as set, else as
    /// last chosen (1 before any session).
    pub fn micro_batches_now(&self) -> usize {
        let set = *self.micro_batches.lock().expect("micro-batches lock");
        set.unwrap_or_else(|| self.chosen.load(Ordering::Relaxed).max(1))
    }

    /// Sets the micro-batches (1 to 256) for sessions opened from now on;
    /// `None` goes back to the model's choice.
    pub fn set_micro_batches(&self, n: Option<usize>) {
        *self.micro_batches.lock().expect("micro-batches lock") = n.map(|n| n.clamp(1, MAX_MICRO_BATCHES));
    }

    /// Puts a new session in the micro-batch with the fewest live sessions.
    fn assign_micro_batch(&self, session: u64) -> u8 {
        let n = self.micro_batches();
        let mut live = self.live.lock().expect("live lock");
        live.remove(&session);
        let least = least_used(live.values().copied(), n);
        live.insert(session, least);
        least
    }

    /// One control request to stage `i`; a node's error becomes `Remote`.
    pub async fn request(&self, i: usize, frame: Frame, wait: Duration) -> Result<Frame, NetError> {
        self.client(i).request(frame, wait).await
    }

    /// Loads `plan[i]` of `model` on stage `i` (all at once), then links the
    /// chain. A stage already holding exactly that slice of that model keeps it
    /// (and its sessions).
    pub async fn load(&mut self, model: &str, digest: Option<String>, plan: &[Range<usize>], wire: WireDType) -> Result<(), NetError> {
        let stages = self.clients();
        if plan.len() != stages.len() {
            return Err(NetError::Pipeline(format!("a plan of {} slices for {} stages", plan.len(), stages.len())));
        }
        let this = &*self;
        let loads = plan.iter().enumerate().map(|(i, r)| {
            let held = stages[i]
                .capabilities()
                .loaded
                .filter(|l| l.start as usize == r.start && l.end as usize == r.end && digest.as_ref().is_some_and(|d| *d == l.digest));
            let req = LoadRequest { model: model.to_string(), start: r.start as u32, end: r.end as u32, digest: digest.clone() };
            async move {
                match held {
                    Some(info) => Ok(info),
                    None => match this.request(i, Frame::new(Message::Load(req)), Duration::from_secs(600)).await?.message {
                        Message::Loaded(info) => Ok(info),
                        other => Err(NetError::Unexpected { got: other.kind(), expected: "Loaded" }),
                    },
                }
            }
        });
        let mut loaded = Vec::new();
        for info in join_all(loads).await {
            loaded.push(info?);
        }
        *self.loaded.write().expect("loaded lock") = loaded;
        self.link(wire).await
    }

    /// Tells each stage where its output goes: the next stage, or nowhere
    /// (the last), which also feeds rings back to the first where they pay
    /// ([`rings_pay`]; `SOLLOL_RINGS=1` always, `=0` never, to compare). A
    /// last stage that cannot reach the first is linked without: decode
    /// then goes through the head.
    pub async fn link(&self, wire: WireDType) -> Result<(), NetError> {
        *self.wire.lock().expect("wire lock") = wire;
        let stages = self.clients();
        let mut ring = match std::env::var("SOLLOL_RINGS").as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            _ => rings_pay(&stages).await,
        };
        for i in (0..stages.len()).rev() {
            let linked = stages[i].request(link_frame(&stages, i, wire, ring), Duration::from_secs(15)).await;
            match linked {
                Err(e) if i + 1 == stages.len() && stages.len() > 1 => {
                    tracing::warn!(last = %stages[i].addr, first = %stages[0].addr, "no ring: the last stage cannot reach the first ({e})");
                    ring = false;
                    stages[i].request(link_frame(&stages, i, wire, ring), Duration::from_secs(15)).await?;
                }
                linked => {
                    linked?;
                }
            }
        }
        self.ring.store(ring, Ordering::Release);
        Ok(())
    }

    /// Whether a failed block move left the stages unlike `loaded`.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub fn n_stages(&self) -> usize {
        self.stages.read().expect("stages lock").len()
    }

    /// Moves stage `i`'s slice and the KV state of every live session to
    /// `new` (a connected node), then links it into the chain in place of the
    /// old node, which is told to unload. Steps pause only for the transfer
    /// and re-link; the load happens before.
    pub async fn replace_stage(&self, i: usize, new: Arc<NodeClient>) -> Result<Replaced, NetError> {
        let n = self.n_stages();
        let old = self.clients().get(i).cloned().ok_or_else(|| NetError::Pipeline(format!("the pipeline has no stage {}", i + 1)))?;
        let slice = self.loaded().get(i).cloned().ok_or_else(|| NetError::Pipeline("the pipeline has no loaded plan".into()))?;
        if self.addrs().contains(&new.addr) {
            return Err(NetError::Pipeline(format!("{} is already a stage of this pipeline", new.addr)));
        }
        let req = LoadRequest { model: slice.model.clone(), start: slice.start, end: slice.end, digest: Some(slice.digest.clone()) };
        let info = match new.request(Frame::new(Message::Load(req)), Duration::from_secs(600)).await?.message {
            Message::Loaded(info) => info,
            other => return Err(NetError::Unexpected { got: other.kind(), expected: "Loaded" }),
        };
        let wire = *self.wire.lock().expect("wire lock");
        // The new node's results must complete this pipeline's steps.
        new.attach(self.pending.clone(), i + 1);

        let _paused = self.pause().await;
        let t = Instant::now();
        let sessions = self.live_sessions();
        let mut kv_bytes = 0;
        let mut moved = 0;
        for &session in &sessions {
            let reply = match old.request(Frame::new(Message::ExportKv { session, dtype: WireDType::F32 }), Duration::from_secs(60)).await {
                Ok(r) => r,
                // A session the node already dropped (an error, a timeout) has nothing to move.
                Err(e) if e.code() == Some(ErrorCode::UnknownSession) => continue,
                Err(e) => return Err(e),
            };
            let Message::KvState(header) = reply.message else {
                return Err(NetError::Unexpected { got: reply.message.kind(), expected: "KvState" });
            };
            kv_bytes += reply.payload.len() as u64;
            new.request(Frame::with_payload(Message::ImportKv(header), reply.payload), Duration::from_secs(60)).await?;
            moved += 1;
        }
        if i == 0 {
            *self.data.lock().await = new.open_data_stream().await?;
        }
        self.stages.write().expect("stages lock")[i] = new.clone();
        // The stage before now sends to the new node, and the last stage's
        // ring goes back to the first: simplest to link them all again.
        self.link(wire).await?;
        if let Some(l) = self.loaded.write().expect("loaded lock").get_mut(i) {
            *l = info;
        }
        let paused = t.elapsed();
        drop(_paused);
        // The old node is out of the chain; free its memory (best effort: it may be going down).
        let _ = old.request(Frame::new(Message::Unload), Duration::from_secs(15)).await;
        tracing::info!(stage = i + 1, of = n, old = %old.addr, new = %new.addr, moved, kv_bytes, ?paused, "stage replaced");
        Ok(Replaced { old: old.addr.clone(), new: new.addr.clone(), sessions_moved: moved, kv_bytes, paused })
    }

    /// Runs one step through the chain and waits for the last stage's result.
    pub async fn step(
        &self,
        session: u64,
        tokens: &[u32],
        open: Option<u32>,
        sample: Option<SampleRequest>,
        want_logits: bool,
    ) -> Result<StepResult, NetError> {
        let header = ForwardHeader { open, sample, want_logits, ..ForwardHeader::new(session, 0, ForwardInput::Tokens(tokens.to_vec())) };
        Ok(self.send_step(header).await?.0)
    }

    /// An embedding step: the last stage pools its final hidden states
    /// (`StepResult::pooled`) instead of sampling.
    pub async fn pool_step(&self, session: u64, tokens: &[u32], open: Option<u32>, pooling: Pooling) -> Result<StepResult, NetError> {
        let header = ForwardHeader { open, pool: Some(pooling), ..ForwardHeader::new(session, 0, ForwardInput::Tokens(tokens.to_vec())) };
        Ok(self.send_step(header).await?.0)
    }

    /// Whether rings may begin now: the last stage feeds back to the
    /// first, and no stage replacement waits.
    pub fn rings(&self) -> bool {
        self.ring.load(Ordering::Acquire) && self.pausing.load(Ordering::Acquire) == 0
    }

    /// Whether the last stage is linked back to the first: decode steps go
    /// round a ring.
    pub fn ringed(&self) -> bool {
        self.ring.load(Ordering::Acquire)
    }

    /// Ring steps read so far: decode steps that the last stage fed back
    /// to the first instead of the head sending them.
    pub fn ring_steps(&self) -> u64 {
        self.ring_steps.load(Ordering::Relaxed)
    }

    /// Takes the gate exclusively, once the steps in flight are done. The
    /// rings are halted first, and waited for: the first stage drops what
    /// they feed back from then on, and the last answers each halt once
    /// none of its steps is left in flight, having sent every result (so
    /// every stage holds the positions the head read, when a block move
    /// joins two stages' states). Their engines read those results, then
    /// go on with steps of their own. Nothing waits for an engine, which
    /// may be the caller.
    async fn pause(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.pausing.fetch_add(1, Ordering::SeqCst);
        let open = self.pending.lock().expect("pending lock").rings_open();
        let mut answers = Vec::new();
        for &session in &open {
            let answer = self.pending.lock().expect("pending lock").halt(session);
            answers.push(answer);
            self.halt(session).await;
        }
        // A stage that does not answer is failing: the replacement finds out.
        let _ = tokio::time::timeout(Duration::from_secs(10), join_all(answers)).await;
        {
            let mut pending = self.pending.lock().expect("pending lock");
            open.iter().for_each(|&s| pending.halt_ring(s));
        }
        let paused = self.gate.write().await;
        self.pausing.fetch_sub(1, Ordering::SeqCst);
        paused
    }

    /// One step through the chain (`header` as the head asks it; its id
    /// and micro-batch are set here), with the ring it begins, if any and
    /// its last stage goes on.
    async fn send_step(&self, mut header: ForwardHeader) -> Result<(StepResult, Option<RingRun>), NetError> {
        let _running = self.gate.read().await;
        let session = header.session;
        header.micro_batch = match header.open {
            Some(_) => self.assign_micro_batch(session),
            None => self.live.lock().expect("live lock").get(&session).copied().unwrap_or(0),
        };
        // The ring's steps take the ids after this one.
        let left = header.ring.as_ref().map_or(0, |r| r.left);
        let step = self.next_step.fetch_add(1 + u64::from(left), Ordering::Relaxed);
        header.step = step;
        let ring_steps = step + 1..step + 1 + u64::from(left);
        let (rx, ring) = {
            let mut pending = self.pending.lock().expect("pending lock");
            let rx = pending.step(step, session);
            // Checked under the lock `pause` halts the rings under: a ring
            // registered after the halt would run through the replacement.
            if self.pausing.load(Ordering::SeqCst) > 0 {
                header.ring = None;
            }
            let ring = header.ring.as_mut().map(|r| {
                r.id = step;
                pending.ring(session, ring_steps.clone())
            });
            (rx, ring)
        };
        let forget = || {
            let mut pending = self.pending.lock().expect("pending lock");
            pending.forget_step(step);
            pending.forget_ring(session, ring_steps.start);
        };
        let decode = matches!(&header.input, ForwardInput::Tokens(t) if t.len() == 1) && header.pool.is_none();
        let t = Instant::now();
        let sent = self.data.lock().await.write(&Frame::new(Message::Forward(header))).await;
        if let Err(e) = sent {
            forget();
            return Err(NetError::Connection(format!("cannot send to stage 1 ({}): {e}", self.client(0).addr)));
        }
        let outcome = match tokio::time::timeout(STEP_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(NetError::Pipeline("the pipeline dropped the step".into())),
            Err(_) => Err(NetError::Timeout(STEP_TIMEOUT, format!("step {step} of session {session}"))),
        };
        match outcome {
            Ok(result) => {
                if decode {
                    self.observe(&result.stage_steps, t.elapsed());
                }
                let ring = ring.map(|results| RingRun { results, session, steps: ring_steps, pending: self.pending.clone() });
                Ok((result, ring))
            }
            Err(e) => {
                forget();
                Err(e)
            }
        }
    }

    /// Learns from a decode step that took `wall` from its send (or, on a
    /// ring, from the result before) to its result (`Observed`).
    fn observe(&self, stage_steps: &[StageStep], wall: Duration) {
        let overlapped = {
            let live = self.live.lock().expect("live lock");
            let mut batches = live.values();
            let first = batches.next();
            batches.any(|m| Some(m) != first)
        };
        self.observed.lock().expect("observed lock").record(stage_steps, wall.as_secs_f64(), overlapped);
    }

    /// Ends a session's ring on the first stage: the steps the last stage
    /// feeds back from now on are dropped there (`Message::Halt`).
    pub async fn halt(&self, session: u64) {
        let _ = self.data.lock().await.write(&Frame::new(Message::Halt { session })).await;
    }

    /// Moves `blocks` blocks from stage `from` to its neighbour `to`, with
    /// every live session's KV state for them: both nodes load their new
    /// slices, each session's state is split and joined at the head and
    /// imported, the chain is re-linked. Steps pause for the whole move
    /// (slice loads included); nothing is recomputed.
    pub async fn move_blocks(&self, from: usize, to: usize, blocks: usize) -> Result<Duration, NetError> {
        let loaded = self.loaded();
        if to.abs_diff(from) != 1 || from.max(to) >= loaded.len() {
            return Err(NetError::Pipeline(format!("stages {} and {} are not neighbours of this chain", from + 1, to + 1)));
        }
        let (f, t) = (&loaded[from], &loaded[to]);
        if blocks == 0 || blocks >= (f.end - f.start) as usize {
            return Err(NetError::Pipeline(format!("stage {} cannot give {blocks} of its {} blocks", from + 1, f.end - f.start)));
        }
        let k = blocks as u32;
        // New ranges; `give` are the giver's blocks that move (as indices into its slice).
        let (new_from, new_to, give) = if to == from + 1 {
            ((f.start, f.end - k), (f.end - k, t.end), (f.end - f.start - k) as usize..(f.end - f.start) as usize)
        } else {
            ((f.start + k, f.end), (t.start, f.start + k), 0..blocks)
        };
        let _paused = self.pause().await;
        let started = Instant::now();
        let (cf, ct) = (self.client(from), self.client(to));
        let mut states = Vec::new();
        for session in self.live_sessions() {
            let export = |c: Arc<NodeClient>| async move {
                let r = c.request(Frame::new(Message::ExportKv { session, dtype: WireDType::F32 }), Duration::from_secs(60)).await?;
                match r.message {
                    Message::KvState(h) => Ok((h, r.payload)),
                    other => Err(NetError::Unexpected { got: other.kind(), expected: "KvState" }),
                }
            };
            match (export(cf.clone()).await, export(ct.clone()).await) {
                (Ok(a), Ok(b)) => states.push((a, b)),
                (Err(e), _) | (_, Err(e)) if e.code() == Some(ErrorCode::UnknownSession) => continue,
                (Err(e), _) | (_, Err(e)) => return Err(e),
            }
        }
        let load = |c: Arc<NodeClient>, (start, end): (u32, u32)| {
            let req = LoadRequest { model: f.model.clone(), start, end, digest: Some(f.digest.clone()) };
            async move {
                match c.request(Frame::new(Message::Load(req)), Duration::from_secs(600)).await?.message {
                    Message::Loaded(info) => Ok(info),
                    other => Err(NetError::Unexpected { got: other.kind(), expected: "Loaded" }),
                }
            }
        };
        // From here a failure leaves the chain half moved: it is marked, and
        // rebuilt as it was by the next failed step (`SharedChain::recover`).
        let moved = async {
            let (lf, lt) = tokio::join!(load(cf.clone(), new_from), load(ct.clone(), new_to));
            let (lf, lt) = (lf?, lt?);
            for ((hf, pf), (ht, pt)) in states {
                let giver = kv::blocks(&hf, &pf)?;
                let taker = kv::blocks(&ht, &pt)?;
                let moving = &giver[give.clone()];
                let staying: Vec<&[u8]> = giver.iter().enumerate().filter(|(i, _)| !give.contains(i)).map(|(_, c)| *c).collect();
                let joined: Vec<&[u8]> = if to == from + 1 { [moving, &taker].concat() } else { [&taker, moving].concat() };
                for (c, like, parts) in [(cf.clone(), &hf, staying), (ct.clone(), &ht, joined)] {
                    let (h, payload) = kv::join(like, &parts)?;
                    c.request(Frame::with_payload(Message::ImportKv(h), payload), Duration::from_secs(60)).await?;
                }
            }
            {
                let mut l = self.loaded.write().expect("loaded lock");
                l[from] = lf;
                l[to] = lt;
            }
            Ok::<_, NetError>(())
        };
        if let Err(e) = moved.await {
            self.broken.store(true, Ordering::Release);
            return Err(e);
        }
        let wire = *self.wire.lock().expect("wire lock");
        self.link(wire).await?;
        let paused = started.elapsed();
        tracing::info!(from = from + 1, to = to + 1, blocks, ?paused, "blocks moved between stages");
        Ok(paused)
    }

    /// Frees the session on every stage (the close travels down the chain).
    pub async fn close(&self, session: u64) {
        self.live.lock().expect("live lock").remove(&session);
        let _ = self.data.lock().await.write(&Frame::new(Message::Close { session })).await;
    }

    /// The KV state stage `i` holds for `session`.
    pub async fn export_kv(&self, i: usize, session: u64, dtype: WireDType) -> Result<(KvStateHeader, Vec<u8>), NetError> {
        let reply = self.request(i, Frame::new(Message::ExportKv { session, dtype }), Duration::from_secs(60)).await?;
        match reply.message {
            Message::KvState(h) => Ok((h, reply.payload)),
            other => Err(NetError::Unexpected { got: other.kind(), expected: "KvState" }),
        }
    }

    pub async fn import_kv(&self, i: usize, header: KvStateHeader, payload: Vec<u8>) -> Result<(), NetError> {
        self.request(i, Frame::with_payload(Message::ImportKv(header), payload), Duration::from_secs(60)).await?;
        Ok(())
    }

    /// Round trip of a Ping to stage `i`.
    pub async fn ping(&self, i: usize) -> Result<Duration, NetError> {
        let t = Instant::now();
        self.request(i, Frame::new(Message::Ping { nonce: 1 }), Duration::from_secs(5)).await?;
        Ok(t.elapsed())
    }
}

/// Whether rings pay on a chain: not when several stages are on this
/// machine's loopback and compute on the head's own cores. There a hop
/// costs a tenth of a millisecond, and the head reading each result while
/// the stages compute the next takes those cores from them: two and three
/// such stages decoded a few percent slower with rings (BENCHMARKS.md,
/// "Rings"). Anywhere else a ring saves a hop per token.
async fn rings_pay(stages: &[Arc<NodeClient>]) -> bool {
    if stages.len() == 1 {
        // No hop at all: the stage feeds itself, and sends its results at
        // most every 10 ms in one frame, so the head wakes seldom.
        return true;
    }
    let head = crate::sys::compute_id("cpu");
    for s in stages {
        let local = resolve_addr(&s.addr).await.is_ok_and(|a| a.ip().is_loopback());
        if !local || s.capabilities().compute != head {
            return true;
        }
    }
    false
}

/// The Link request for stage `i` of a chain: its next stage, and on the
/// last, with `ring`, where rings go back in.
fn link_frame(stages: &[Arc<NodeClient>], i: usize, wire: WireDType, ring: bool) -> Frame {
    let next = stages.get(i + 1).map(|s| s.addr.clone());
    let ring = (ring && i + 1 == stages.len()).then(|| if i == 0 { RingLink::Itself } else { RingLink::First(stages[0].addr.clone()) });
    Frame::new(Message::Link { next, wire, ring })
}

/// How many alternatives a step's sample request asks for.
fn spec_logprobs(sample: &Option<SampleRequest>) -> usize {
    sample.as_ref().and_then(|s| s.logprobs).map_or(0, usize::from)
}

/// The first of `n` micro-batches that the fewest of `used` are in.
fn least_used(used: impl Iterator<Item = u8>, n: usize) -> u8 {
    let mut counts = vec![0usize; n.max(1)];
    for m in used {
        if let Some(c) = counts.get_mut(m as usize) {
            *c += 1;
        }
    }
    (0..counts.len()).min_by_key(|&m| counts[m]).unwrap_or(0) as u8
}

/// How many stages of a chain can compute at once: the number of distinct
/// cores they report (`Capabilities::compute`). Stages on one machine's
/// shared cores take turns anyway, and one larger batch reads their weights
/// once instead of once per micro-batch.
pub fn independent_stages(stages: &[(String, Capabilities)]) -> usize {
    stages.iter().map(|(_, c)| c.compute.as_str()).collect::<HashSet<_>>().len().max(1)
}

/// Each stage's cores as an index, the same for stages that report the
/// same (`Capabilities::compute`), as the network model takes them.
fn core_groups(stages: &[(String, Capabilities)]) -> Vec<usize> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    stages
        .iter()
        .map(|(_, c)| {
            let n = seen.len();
            *seen.entry(c.compute.as_str()).or_insert(n)
        })
        .collect()
}

/// The pipeline as a synchronous [`Engine`] for the generation loop. Steps
/// block on the runtime through `handle`, so the loop runs on a plain or a
/// blocking thread; many engines may share one pipeline.
///
/// A decode step the loop will follow with more (`SampleSpec::ahead`)
/// begins a ring: the last stage feeds each sampled token back to the first
/// itself, and the loop's next steps, when they ask for exactly what the
/// ring feeds, read its results as they come. A step that asks for
/// anything else (a stop string ended the text, a replacement waits) leaves
/// the ring: it rewinds the stages to the positions the loop has read.
pub struct PipelineEngine {
    handle: tokio::runtime::Handle,
    pipeline: Arc<Pipeline>,
    context_length: usize,
    /// Capacity to send with each open session's first step.
    opening: HashMap<u64, u32>,
    /// Rewinds to send with a session's next step.
    rewinding: HashMap<u64, u32>,
    /// Positions of each session the loop has had computed.
    positions: HashMap<u64, u32>,
    rings: HashMap<u64, Riding>,
}

/// A session's running ring, and the step it feeds back next.
struct Riding {
    run: RingRun,
    /// The ring as the step `next` carries it (its `left` after that step).
    ring: Ring,
    next: u64,
    token: u32,
    sample: SampleRequest,
    /// When the result before arrived: a ring step's time runs from there.
    since: Instant,
}

impl PipelineEngine {
    /// An engine over a shared pipeline, for one request on a blocking thread.
    pub fn shared(handle: tokio::runtime::Handle, pipeline: Arc<Pipeline>, context_length: usize) -> Self {
        Self {
            handle,
            pipeline,
            context_length,
            opening: HashMap::new(),
            rewinding: HashMap::new(),
            positions: HashMap::new(),
            rings: HashMap::new(),
        }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The ring's next result, when the step asked for is the one the ring
    /// feeds back; `None` when it is not (or there is no ring).
    fn ride(
        &mut self,
        session: u64,
        tokens: &[u32],
        sample: &Option<SampleRequest>,
        want_logits: bool,
    ) -> crate::Result<Option<StepOutput>> {
        let Some(ride) = self.rings.get_mut(&session) else { return Ok(None) };
        if want_logits || tokens != [ride.token] || sample.as_ref() != Some(&ride.sample) || !self.pipeline.rings() {
            return Ok(None);
        }
        let got = self.handle.block_on(ride.run.next()).and_then(|got| match got {
            Some((_, r)) if r.step != ride.next => {
                Err(NetError::Pipeline(format!("a ring sent step {} where {} was due", r.step, ride.next)))
            }
            got => Ok(got),
        });
        let (at, result) = match got {
            Ok(Some(got)) => got,
            // Halted: the step goes from the head.
            Ok(None) => return Ok(None),
            Err(e) => {
                self.rings.remove(&session);
                return Err(e.into());
            }
        };
        let wall = at.saturating_duration_since(ride.since);
        ride.since = at;
        // Results the last stage held and sent together time no trip.
        let compute: u64 = result.stage_steps.iter().map(|s| s.nanos).sum();
        if wall.as_nanos() >= u128::from(compute) {
            self.pipeline.observe(&result.stage_steps, wall);
        }
        self.pipeline.ring_steps.fetch_add(1, Ordering::Relaxed);
        *self.positions.entry(session).or_default() += 1;
        // Whether the last stage fed the token back, by the rule it applies.
        match result.token.filter(|&t| ride.ring.goes_on(t, false)) {
            Some(token) => {
                ride.next += 1;
                ride.ring.left -= 1;
                ride.sample = ride.sample.after(token);
                ride.token = token;
            }
            None => {
                self.rings.remove(&session);
            }
        }
        // Stage N → stage 1, … → stage N; none when the one stage feeds itself.
        let hops = match self.pipeline.n_stages() {
            1 => 0,
            n => n as u32,
        };
        Ok(Some(step_output(result, wall, hops, spec_logprobs(sample))))
    }

    /// Leaves a session's ring, if it has one: its steps fed back from now
    /// on are dropped, and those it ran ahead are rewound with the next step.
    fn leave_ring(&mut self, session: u64) {
        if self.rings.remove(&session).is_some() {
            let at = self.positions.get(&session).copied().unwrap_or(0);
            self.rewinding.entry(session).or_insert(at);
        }
    }
}

/// What a step's result tells the loop: `wall` from its send (or, on a
/// ring, from the result before) to its result, over `hops` hops.
fn step_output(r: StepResult, wall: Duration, hops: u32, asked: usize) -> StepOutput {
    let stage_times: Vec<Duration> = r.stage_steps.iter().map(|s| Duration::from_nanos(s.nanos)).collect();
    let compute: Duration = stage_times.iter().sum();
    // A stage reports no more alternatives than were asked for.
    let logprobs = r.logprobs.map(|mut l| {
        l.top.truncate(asked);
        l
    });
    StepOutput {
        token: r.token,
        logprobs,
        logits: r.logits,
        stage_times,
        // A ring on one stage has no hop at all.
        hop_latency: (hops > 0).then(|| wall.saturating_sub(compute) / hops),
        hop_bytes: r.hop_bytes,
        f16_fallbacks: r.f16_fallbacks,
    }
}

impl Engine for PipelineEngine {
    fn open(&mut self, session: u64, capacity: usize) -> crate::Result<()> {
        self.rings.remove(&session);
        self.rewinding.remove(&session);
        self.opening.insert(session, capacity as u32);
        Ok(())
    }

    fn step(&mut self, session: u64, tokens: &[u32], spec: Option<SampleSpec<'_>>, want_logits: bool) -> crate::Result<StepOutput> {
        let sample = spec.as_ref().map(|s| {
            let recent = if s.params.repeat_penalty != 1.0 {
                s.history[s.history.len().saturating_sub(s.params.repeat_last_n)..].to_vec()
            } else {
                Vec::new()
            };
            let logprobs = s.logprobs.map(|n| n.min(crate::model::sampling::MAX_TOP_LOGPROBS) as u8);
            SampleRequest { params: s.params.clone(), recent, draw: s.step, logprobs, allowed: s.allowed.map(<[u32]>::to_vec) }
        });
        if let Some(out) = self.ride(session, tokens, &sample, want_logits)? {
            return Ok(out);
        }
        self.leave_ring(session);
        let open = self.opening.remove(&session);
        let truncate = self.rewinding.remove(&session);
        // A ring when the loop will take more steps than this one, each
        // asking only for the token sampled before.
        let ring = spec.as_ref().filter(|s| s.ahead > 0 && s.allowed.is_none() && !want_logits && self.pipeline.rings()).map(|s| Ring {
            id: 0,
            left: s.ahead.min(u32::MAX as usize) as u32,
            stop: s.stop.to_vec(),
        });
        let header = ForwardHeader {
            open,
            truncate,
            sample: sample.clone(),
            want_logits,
            ring: ring.clone(),
            ..ForwardHeader::new(session, 0, ForwardInput::Tokens(tokens.to_vec()))
        };
        let t = Instant::now();
        let (r, run) = self.handle.block_on(self.pipeline.send_step(header))?;
        let wall = t.elapsed();
        let position = self.positions.entry(session).or_default();
        if open.is_some() {
            *position = 0;
        }
        if let Some(keep) = truncate {
            *position = keep;
        }
        *position += tokens.len() as u32;
        if let (Some(run), Some(mut ring), Some(sample), Some(token)) = (run, ring, &sample, r.token) {
            if ring.goes_on(token, false) {
                let (next, sample) = (run.steps.start, sample.after(token));
                ring.left -= 1;
                self.rings.insert(session, Riding { run, ring, next, token, sample, since: Instant::now() });
            }
        }
        // Hops: head → stage 1 → … → stage N → head.
        let hops = self.pipeline.n_stages() as u32 + 1;
        Ok(step_output(r, wall, hops, spec_logprobs(&sample)))
    }

    fn pool(&mut self, session: u64, tokens: &[u32], pooling: Pooling) -> crate::Result<Vec<f32>> {
        let open = self.opening.remove(&session);
        let r = self.handle.block_on(self.pipeline.pool_step(session, tokens, open, pooling))?;
        r.pooled.ok_or_else(|| crate::Error::InvalidRequest("the last stage returned no pooled state".into()))
    }

    fn rewind(&mut self, session: u64, keep: usize) -> crate::Result<()> {
        self.rings.remove(&session);
        self.rewinding.insert(session, keep as u32);
        Ok(())
    }

    fn settle(&mut self, session: u64) {
        if self.rings.contains_key(&session) {
            self.leave_ring(session);
            self.handle.block_on(self.pipeline.halt(session));
        }
    }

    fn close(&mut self, session: u64) {
        self.rings.remove(&session);
        self.opening.remove(&session);
        self.rewinding.remove(&session);
        self.positions.remove(&session);
        self.handle.block_on(self.pipeline.close(session));
    }

    fn prefill_chunk(&self, session: u64) -> usize {
        let others = self.pipeline.live.lock().expect("live lock").keys().any(|&s| s != session);
        if others {
            crate::head::generation::SHARED_PREFILL_CHUNK
        } else {
            crate::head::generation::PREFILL_CHUNK
        }
    }

    fn context_length(&self) -> usize {
        self.context_length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_spread_over_micro_batches_evenly() {
        let mut live: Vec<u8> = Vec::new();
        for _ in 0..8 {
            let m = least_used(live.iter().copied(), 3);
            live.push(m);
        }
        assert_eq!(live, [0, 1, 2, 0, 1, 2, 0, 1]);
        // Sessions of micro-batch 0 ended: the next go there.
        live.retain(|&m| m != 0);
        assert_eq!(least_used(live.iter().copied(), 3), 0);
        // Fewer micro-batches than before: sessions in a dropped one do not count.
        assert_eq!(least_used([0, 5, 5, 5].into_iter(), 2), 1);
        assert_eq!(least_used(std::iter::empty(), 0), 0);
    }

    #[test]
    fn stages_on_shared_cores_count_once() {
        let caps = |compute: &str| Capabilities {
            protocol: 6,
            build: String::new(),
            device: "cpu".into(),
            cores: 2,
            threads: 2,
            total_memory: 0,
            free_memory: 0,
            memory_limit: None,
            loaded: None,
            sessions: 0,
            link: None,
            compute: compute.into(),
        };
        let chain = |ids: &[&str]| ids.iter().map(|id| (String::new(), caps(id))).collect::<Vec<_>>();
        assert_eq!(independent_stages(&chain(&["m/cpu0-1/", "m/cpu0-1/", "m/cpu0-1/"])), 1);
        assert_eq!(independent_stages(&chain(&["m/cpu0-1//lab-h1", "m/cpu0-1//lab-h2", "m/cpu0-1/"])), 3);
        assert_eq!(independent_stages(&chain(&["a/cuda:0", "a/cuda:1", "b/cuda:0", "a/cuda:0"])), 3);
        assert_eq!(independent_stages(&[]), 1);
    }
}
