//! Control messages: what a frame's header says. Encoded with bincode; bulk
//! numbers (activations, KV state) travel as the frame's raw payload.

use serde::{Deserialize, Serialize};

use super::frame::Frame;
use super::tensor::{TensorHeader, WireDType};
use super::NetError;
use crate::model::sampling::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRole {
    /// The head: plans, routes, tokenizes, streams to users.
    Head,
    /// A stage sending activations to the next stage.
    Stage,
}

/// What a later stream of an authenticated connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamPurpose {
    /// Forward and Close frames into this stage, in order.
    Data,
    /// Results and errors out of this stage, to the head.
    Events,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First frame of a connection: who is calling, and proof of the cluster key.
    Hello {
        protocol: u8,
        build: String,
        role: PeerRole,
        proof: Vec<u8>,
    },
    /// The node's answer to a valid Hello: its capabilities and its own proof.
    Welcome {
        capabilities: Capabilities,
        proof: Vec<u8>,
    },
    /// First frame of every later stream.
    Attach {
        purpose: StreamPurpose,
    },

    // Control requests, answered on the same stream.
    GetCapabilities,
    Capabilities(Capabilities),
    Load(LoadRequest),
    Loaded(LoadedSlice),
    Unload,
    /// Connect to the next stage (None: this is the last stage), and, on
    /// the last stage, to where a ring's sampled tokens go back in.
    Link {
        next: Option<String>,
        wire: WireDType,
        ring: Option<RingLink>,
    },
    ExportKv {
        session: u64,
        dtype: WireDType,
    },
    /// KV state of a session; the payload holds it (see [`KvStateHeader`]).
    KvState(KvStateHeader),
    /// Import a session's KV state (payload as in [`Message::KvState`]).
    ImportKv(KvStateHeader),
    Ping {
        nonce: u64,
    },
    /// `tokens`: positions computed since the node started (prompt and
    /// decode alike), so a head can prove that nothing was recomputed.
    Pong {
        nonce: u64,
        sessions: u32,
        busy_nanos: u64,
        tokens: u64,
        batches: u64,
    },
    /// Times the link: the payload is as many bytes as the head sends to
    /// measure its throughput; answered with `Probed` once all arrived.
    Probe,
    Probed {
        bytes: u64,
    },
    /// Time the link from this node to the node at `addr` (a stage-to-stage
    /// link, which the head cannot see): its round trip, and its throughput
    /// when `rate`. Answered with `PeerProbed`.
    ProbePeer {
        addr: String,
        rate: bool,
    },
    PeerProbed(super::probe::LinkTiming),
    Ok,

    // The data path.
    /// Run a step; a Hidden input's bytes are the payload.
    Forward(ForwardHeader),
    /// Steps that ran as one batch on the stage before, for the next stage
    /// (which batches them alike): the payload is theirs one after another
    /// ([`forwards_frame`], [`split_forwards`]).
    Forwards(Vec<ForwardHeader>),
    /// Free a session on this stage and every stage after it.
    Close {
        session: u64,
    },
    /// Stop a session's ring: the first stage takes no more of the steps
    /// the last stage feeds back to it (the session stays open). It travels
    /// the chain behind the ring's steps, and the last stage answers it with
    /// `Halted`: by then no step of the ring is left in flight.
    Halt {
        session: u64,
    },

    // Events, to the head.
    Result(StepResult),
    /// Results of steps that ran as one batch on the last stage: the payload
    /// holds their logits one after another ([`results_frames`],
    /// [`split_results`]).
    ///
    /// [`results_frames`]: super::frame::results_frames
    /// [`split_results`]: super::frame::split_results
    Results(Vec<StepResult>),
    Error(RemoteError),
    /// The last stage's answer to a `Halt`.
    Halted {
        session: u64,
    },
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Attach { .. } => "Attach",
            Message::GetCapabilities => "GetCapabilities",
            Message::Capabilities(_) => "Capabilities",
            Message::Load(_) => "Load",
            Message::Loaded(_) => "Loaded",
            Message::Unload => "Unload",
            Message::Link { .. } => "Link",
            Message::ExportKv { .. } => "ExportKv",
            Message::KvState(_) => "KvState",
            Message::ImportKv(_) => "ImportKv",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Probe => "Probe",
            Message::Probed { .. } => "Probed",
            Message::ProbePeer { .. } => "ProbePeer",
            Message::PeerProbed(_) => "PeerProbed",
            Message::Ok => "Ok",
            Message::Forward(_) => "Forward",
            Message::Forwards(_) => "Forwards",
            Message::Close { .. } => "Close",
            Message::Halt { .. } => "Halt",
            Message::Result(_) => "Result",
            Message::Results(_) => "Results",
            Message::Error(_) => "Error",
            Message::Halted { .. } => "Halted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub protocol: u8,
    pub build: String,
    /// "cpu", "cuda:0", "metal".
    pub device: String,
    pub cores: u32,
    pub threads: u32,
    pub total_memory: u64,
    /// Memory the node offers for weights and KV: the smaller of what is
    /// available and its `--memory-limit`, less what it already holds.
    pub free_memory: u64,
    pub memory_limit: Option<u64>,
    pub loaded: Option<LoadedSlice>,
    pub sessions: u32,
    /// How the node's host is linked, as its operator describes it
    /// (`sollol node --link`; the lab's rate and delay), for the dashboard.
    pub link: Option<String>,
    /// Which cores the node computes on (`sys::compute_id`): nodes that
    /// report the same share them, so their stages cannot run at once.
    pub compute: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadRequest {
    /// A model source the node resolves itself (path, tag, hub id, catalog name).
    pub model: String,
    pub start: u32,
    pub end: u32,
    /// The digest the head computed; the node refuses a model that differs.
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedSlice {
    pub model: String,
    /// The model's architecture (`llama`, `gemma3`, …).
    pub architecture: String,
    pub digest: String,
    pub start: u32,
    pub end: u32,
    pub n_layers: u32,
    pub hidden: u32,
    pub weight_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ForwardInput {
    /// Token ids, to the first stage.
    Tokens(Vec<u32>),
    /// Hidden states `[1, seq, hidden]`; the bytes are the frame's payload.
    Hidden(TensorHeader),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRequest {
    pub params: SamplingParams,
    /// The last `repeat_last_n` tokens of the session (empty without a repeat penalty).
    pub recent: Vec<u32>,
    /// Tokens sampled before in this session: keys the random draw.
    pub draw: u64,
    /// Report the chosen token's log-probability and this many alternatives'.
    pub logprobs: Option<u8>,
    /// A grammar's allowed tokens (bit `t % 32` of word `t / 32`).
    pub allowed: Option<Vec<u32>>,
}

impl SampleRequest {
    /// The request for the step after this one sampled `token`: one more
    /// draw, and `token` among the recent ones when a penalty reads them.
    pub fn after(&self, token: u32) -> SampleRequest {
        let mut recent = self.recent.clone();
        if self.params.repeat_penalty != 1.0 {
            recent.push(token);
            let over = recent.len().saturating_sub(self.params.repeat_last_n);
            recent.drain(..over);
        }
        SampleRequest { recent, draw: self.draw + 1, ..self.clone() }
    }
}

/// Where the last stage feeds a ring's sampled tokens back in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RingLink {
    /// The first stage, at this address.
    First(String),
    /// This stage: the chain has one stage.
    Itself,
}

/// A ring: the last stage feeds each token it samples straight back to the
/// first stage as the session's next step, instead of the head doing so a
/// hop later, while the head reads the results as they come. Decode then
/// crosses one hop fewer per token, and the head's own wake-ups leave the
/// token's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// The id of the head's step that began the ring; the steps fed back
    /// take the ids after it, one each.
    pub id: u64,
    /// Steps the ring may still feed back after this one.
    pub left: u32,
    /// Tokens after which nothing is fed back (the end-of-sequence ones).
    pub stop: Vec<u32>,
}

impl Ring {
    /// Whether `token`, sampled by the ring's step (under a grammar's mask
    /// when `constrained`), goes round again: the
    /// head's rule for what it waits for, and the last stage's for what it
    /// sends. A grammar's mask is the head's to compute, so a constrained
    /// step never goes round.
    pub fn goes_on(&self, token: u32, constrained: bool) -> bool {
        self.left > 0 && !constrained && !self.stop.contains(&token)
    }

    /// The step the last stage feeds back after `h` sampled `token`.
    pub fn next_step(&self, h: &ForwardHeader, token: u32) -> Option<ForwardHeader> {
        if !self.goes_on(token, h.sample.as_ref().is_none_or(|s| s.allowed.is_some())) {
            return None;
        }
        let sample = h.sample.as_ref().map(|s| s.after(token));
        Some(ForwardHeader {
            sample,
            micro_batch: h.micro_batch,
            ring: Some(Ring { id: self.id, left: self.left - 1, stop: self.stop.clone() }),
            ..ForwardHeader::new(h.session, h.step + 1, ForwardInput::Tokens(vec![token]))
        })
    }
}

/// What one stage did for a step: the batch the step was computed in took
/// `nanos` for `rows` positions (all its sessions' together). The head
/// learns each stage's cost per batch size from these (`netmodel::Observed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStep {
    pub nanos: u64,
    pub rows: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardHeader {
    pub session: u64,
    /// Identifies this step's result.
    pub step: u64,
    /// Open the session with room for this many positions (first step only).
    pub open: Option<u32>,
    /// Before this step, keep only the first N cached positions (a new turn
    /// of a conversation reusing its prefix).
    pub truncate: Option<u32>,
    pub input: ForwardInput,
    /// Sample on the last stage (else only fill the caches).
    pub sample: Option<SampleRequest>,
    pub want_logits: bool,
    /// An embedding step: the last stage pools its final hidden states
    /// instead of sampling.
    pub pool: Option<crate::model::Pooling>,
    /// Each stage's batch so far: its compute time and rows.
    pub stage_steps: Vec<StageStep>,
    /// Hops so far that sent f32 because f16 would have overflowed.
    pub f16_fallbacks: u32,
    /// Payload bytes sent on each hop so far.
    pub hop_bytes: Vec<u64>,
    /// Which of the chain's micro-batches the session steps in: a stage
    /// batches one micro-batch's steps at a time, so the micro-batches can
    /// be at different stages at once (the head assigns them).
    pub micro_batch: u8,
    /// The ring the step is part of: from the head, it begins one; from
    /// the last stage (`step` past the ring's id), it was fed back.
    pub ring: Option<Ring>,
}

impl ForwardHeader {
    /// A step of `session` with `input` and nothing else asked: no opening,
    /// no sampling, micro-batch 0, nothing measured yet.
    pub fn new(session: u64, step: u64, input: ForwardInput) -> Self {
        Self {
            session,
            step,
            open: None,
            truncate: None,
            input,
            sample: None,
            want_logits: false,
            pool: None,
            stage_steps: Vec::new(),
            f16_fallbacks: 0,
            hop_bytes: Vec::new(),
            micro_batch: 0,
            ring: None,
        }
    }

    /// Whether the last stage fed this step back (a ring's, not the head's).
    pub fn fed_back(&self) -> bool {
        self.ring.as_ref().is_some_and(|r| r.id != self.step)
    }

    /// The payload bytes its input needs: none for token ids.
    fn payload_bytes(&self) -> Option<u64> {
        match &self.input {
            ForwardInput::Tokens(_) => Some(0),
            ForwardInput::Hidden(th) => th.payload_bytes(),
        }
    }
}

/// One frame for steps bound to the same stage: a `Forward` for one, else
/// `Forwards` with their payloads joined in order. One frame is one write
/// and one wake-up at each end instead of one per session.
pub fn forwards_frame(mut steps: Vec<(ForwardHeader, Vec<u8>)>) -> Frame {
    if steps.len() == 1 {
        let (h, payload) = steps.pop().expect("one step");
        return Frame::with_payload(Message::Forward(h), payload);
    }
    let mut payload = Vec::with_capacity(steps.iter().map(|(_, p)| p.len()).sum());
    let headers = steps
        .into_iter()
        .map(|(h, p)| {
            payload.extend_from_slice(&p);
            h
        })
        .collect();
    Frame::with_payload(Message::Forwards(headers), payload)
}

/// Splits a `Forwards` frame back into its steps, each with the payload its
/// input needs; refused unless the lengths add up to the payload exactly.
pub fn split_forwards(headers: Vec<ForwardHeader>, payload: &[u8]) -> Result<Vec<(ForwardHeader, Vec<u8>)>, NetError> {
    Ok(split_joined(headers, payload, "Forwards", ForwardHeader::payload_bytes)?.into_iter().map(|(h, p)| (h, p.to_vec())).collect())
}

/// Splits the payload of a frame that joins several parts' (`Forwards`,
/// `Results`) among them in order, each taking what `bytes_of` says (None:
/// more than any payload); refused unless they take the payload exactly.
pub(crate) fn split_joined<'p, T>(
    parts: Vec<T>,
    payload: &'p [u8],
    kind: &str,
    bytes_of: impl Fn(&T) -> Option<u64>,
) -> Result<Vec<(T, &'p [u8])>, NetError> {
    if parts.is_empty() {
        return Err(NetError::Decode(format!("a {kind} frame with nothing in it")));
    }
    let mut at = 0u64;
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let end = bytes_of(&part)
            .and_then(|n| at.checked_add(n))
            .filter(|&end| end <= payload.len() as u64)
            .ok_or_else(|| NetError::Decode(format!("the parts of a {kind} frame need more than its {} payload bytes", payload.len())))?;
        out.push((part, &payload[at as usize..end as usize]));
        at = end;
    }
    if at != payload.len() as u64 {
        return Err(NetError::Decode(format!("a {kind} frame's parts take {at} of its {} payload bytes", payload.len())));
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub session: u64,
    pub step: u64,
    pub token: Option<u32>,
    /// The token's log-probabilities, when asked for.
    pub logprobs: Option<crate::model::sampling::Logprobs>,
    /// Travels in the frame's payload ([`StepResult::into_frame`]): a 262k
    /// vocabulary's logits are 1 MiB, the header's whole limit.
    #[serde(skip)]
    pub logits: Option<Vec<f32>>,
    /// How many f32 logits the payload holds.
    pub logits_len: Option<u32>,
    /// An embedding step's pooled (not yet averaged or normalised) state.
    pub pooled: Option<Vec<f32>>,
    pub stage_steps: Vec<StageStep>,
    pub f16_fallbacks: u32,
    pub hop_bytes: Vec<u64>,
}

/// What kind of failure a node reports: the head acts on the code (retry
/// elsewhere, tell the client to come back later, give up), never on the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame or payload that does not decode, or breaks a bound.
    Malformed,
    /// The peer has not proved the cluster key, or speaks another protocol.
    Refused,
    /// No such session here (expired, closed, or opened on another node).
    UnknownSession,
    /// The node has no model loaded, or not the slice asked for.
    NoModel,
    /// The node is at a limit (sessions, KV memory, connections): try later
    /// or elsewhere.
    Capacity,
    /// A request that cannot be served as asked (a range outside the model,
    /// a prompt past the session's capacity).
    Invalid,
    /// An operation failed for reasons of its own (a model that does not
    /// load, a next stage that cannot be reached).
    Failed,
    /// A bug on the node: a step that panicked. The node goes on.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub session: Option<u64>,
    pub step: Option<u64>,
    /// Which node said it (its listen address).
    pub node: String,
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    /// An error about no session in particular.
    pub fn new(node: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { session: None, step: None, node: node.into(), code, message: message.into() }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.node.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "node {}: {}", self.node, self.message)
        }
    }
}

/// A session's KV cache: the payload holds, for each block in order, K then V,
/// each `[1, n_kv_heads, len, head_dim]` in `dtype`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStateHeader {
    pub session: u64,
    pub len: u32,
    /// Positions the session may grow to.
    pub capacity: u32,
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub dtype: WireDType,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(session: u64, values: usize) -> (ForwardHeader, Vec<u8>) {
        let input = if values == 0 {
            ForwardInput::Tokens(vec![7])
        } else {
            ForwardInput::Hidden(TensorHeader { dtype: WireDType::F16, shape: vec![1, 1, values as u32] })
        };
        let h = ForwardHeader::new(session, session, input);
        (h, (0..values * 2).map(|i| (i as u8).wrapping_add(session as u8)).collect())
    }

    #[test]
    fn steps_travel_in_one_frame_and_come_apart_as_sent() {
        let steps = vec![step(1, 4), step(2, 0), step(3, 3)];
        let frame = forwards_frame(steps.clone());
        let Message::Forwards(headers) = frame.message else { panic!("several steps make a Forwards frame") };
        assert_eq!(frame.payload.len(), 14);
        assert_eq!(split_forwards(headers, &frame.payload).unwrap(), steps);
        // One step is a plain Forward.
        let frame = forwards_frame(vec![step(9, 2)]);
        assert!(matches!(frame.message, Message::Forward(ref h) if h.session == 9));
        assert_eq!(frame.payload.len(), 4);
    }

    #[test]
    fn a_ring_feeds_back_what_the_head_would_ask_for_and_stops_where_it_would() {
        let params = SamplingParams { temperature: 0.8, repeat_penalty: 1.3, repeat_last_n: 3, seed: 7, ..Default::default() };
        // The head asks with the last `repeat_last_n` tokens of the history.
        let ask = |history: &[u32], draw: u64| SampleRequest {
            params: params.clone(),
            recent: history[history.len().saturating_sub(3)..].to_vec(),
            draw,
            logprobs: Some(2),
            allowed: None,
        };
        let mut history = vec![5, 6];
        let ring = Ring { id: 40, left: 2, stop: vec![2] };
        let mut h = ForwardHeader {
            sample: Some(ask(&history, 1)),
            ring: Some(ring),
            micro_batch: 3,
            ..ForwardHeader::new(9, 40, ForwardInput::Tokens(vec![6]))
        };
        assert!(!h.fed_back(), "the head's step begins the ring");
        for (token, step) in [(11, 41), (12, 42)] {
            history.push(token);
            let next = h.ring.as_ref().unwrap().next_step(&h, token).expect("the ring goes on");
            assert!(next.fed_back());
            assert_eq!((next.session, next.step, next.micro_batch), (9, step, 3));
            assert_eq!(next.input, ForwardInput::Tokens(vec![token]));
            assert_eq!(next.sample, Some(ask(&history, history.len() as u64 - 1)), "as the head would ask after {history:?}");
            h = next;
        }
        assert_eq!(h.ring.as_ref().unwrap().left, 0);
        assert!(h.ring.as_ref().unwrap().next_step(&h, 13).is_none(), "no steps left");
        // A stop token, or a grammar's mask (the head's to compute), ends it.
        h.ring.as_mut().unwrap().left = 5;
        assert!(h.ring.as_ref().unwrap().next_step(&h, 2).is_none());
        h.sample.as_mut().unwrap().allowed = Some(vec![u32::MAX]);
        assert!(h.ring.as_ref().unwrap().next_step(&h, 13).is_none());
        // Without a penalty the recent tokens are not sent at all.
        let plain = SampleRequest { params: SamplingParams::default(), recent: Vec::new(), draw: 4, logprobs: None, allowed: None };
        assert_eq!(plain.after(3), SampleRequest { draw: 5, ..plain.clone() });
    }

    #[test]
    fn forwards_whose_lengths_do_not_add_up_are_refused() {
        let headers: Vec<ForwardHeader> = vec![step(1, 4).0, step(2, 3).0];
        assert!(split_forwards(headers.clone(), &[0; 13]).is_err(), "short");
        assert!(split_forwards(headers.clone(), &[0; 15]).is_err(), "bytes left over");
        assert!(split_forwards(Vec::new(), &[]).is_err(), "no steps");
        let mut huge = step(1, 1).0;
        huge.input = ForwardInput::Hidden(TensorHeader { dtype: WireDType::F32, shape: vec![u32::MAX, u32::MAX, u32::MAX] });
        assert!(split_forwards(vec![huge], &[0; 4]).is_err(), "a shape past any payload");
        assert_eq!(split_forwards(headers, &[0; 14]).unwrap().len(), 2);
    }
}
