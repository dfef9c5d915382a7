//! What the generation loop drives: something that keeps sessions, runs a
//! model on new tokens, and samples. A local whole-model slice is one
//! implementation; the QUIC pipeline of stages is another.

use std::collections::HashMap;
use std::time::Duration;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::sampling::{sample_constrained, Logprobs, SamplingParams};
use crate::model::{BatchItem, HostInput, KvCache, ModelSlice, Pooling, SliceOutput};

/// How to pick the token after a step, and what it needs to do so.
#[derive(Debug, Clone)]
pub struct SampleSpec<'a> {
    pub params: &'a SamplingParams,
    /// Tokens so far in the session (prompt + generated), for the repeat penalty.
    pub history: &'a [u32],
    /// Tokens sampled before in this session (keys the random draw).
    pub step: u64,
    /// Report the token's log-probability and this many alternatives'.
    pub logprobs: Option<usize>,
    /// Only these tokens may be sampled (a grammar's bitset).
    pub allowed: Option<&'a [u32]>,
    /// How many steps the loop takes after this one, each feeding the
    /// token sampled before, unless a token of `stop` is sampled (or its
    /// own reasons end it early, when it says so: `Engine::settle`,
    /// `Engine::close`, or a step asking for something else). 0: the loop
    /// decides step by step. A pipeline runs such steps as a ring.
    pub ahead: usize,
    /// Tokens that end the loop when sampled.
    pub stop: &'a [u32],
}

#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// The sampled token, when sampling was asked for.
    pub token: Option<u32>,
    /// Its log-probabilities, when asked for.
    pub logprobs: Option<Logprobs>,
    /// The last position's logits, when asked for (tests, logprobs).
    pub logits: Option<Vec<f32>>,
    /// Compute time per stage, in chain order.
    pub stage_times: Vec<Duration>,
    /// Mean one-way latency of a hop in this step (pipelines only): the step's
    /// wall time less all compute, over its hops (head → stages → head, or
    /// round a ring: from the result before, over the stages' hops).
    pub hop_latency: Option<Duration>,
    /// Payload bytes on each stage-to-stage hop.
    pub hop_bytes: Vec<u64>,
    /// Hops that sent f32 because f16 would have overflowed.
    pub f16_fallbacks: u32,
}

pub trait Engine {
    /// Opens a session with room for `capacity` positions.
    fn open(&mut self, session: u64, capacity: usize) -> Result<()>;
    /// Runs `tokens` at the session's position; samples when `sample` is given.
    fn step(&mut self, session: u64, tokens: &[u32], sample: Option<SampleSpec<'_>>, want_logits: bool) -> Result<StepOutput>;
    /// Runs `tokens` at the session's position and returns the last stage's
    /// final-normed hidden states pooled by `pooling` (summed for `Mean`).
    fn pool(&mut self, session: u64, tokens: &[u32], pooling: Pooling) -> Result<Vec<f32>>;
    /// Keeps the first `keep` positions of an open session and forgets the
    /// rest, so a prompt sharing that prefix continues from the cached state.
    fn rewind(&mut self, session: u64, keep: usize) -> Result<()>;
    /// The loop takes no more steps of the session for now, though it
    /// stays open (for a later turn): what runs ahead of the loop stops.
    fn settle(&mut self, _session: u64) {}
    /// Frees the session everywhere. Never fails: a missing session is already closed.
    fn close(&mut self, session: u64);
    /// The longest context the model supports.
    fn context_length(&self) -> usize;
    /// Prompt tokens per prefill step of `session`. A chunk is one step, and
    /// the decode steps batched with it wait for all of it; an engine whose
    /// chain serves other sessions takes smaller ones.
    fn prefill_chunk(&self, _session: u64) -> usize {
        super::generation::PREFILL_CHUNK
    }
}

/// The whole model in this process.
pub struct LocalEngine {
    slice: ModelSlice,
    sessions: HashMap<u64, KvCache>,
}

impl LocalEngine {
    pub fn new(slice: ModelSlice) -> Result<Self> {
        if !slice.is_first() || !slice.is_last() {
            return Err(Error::InvalidRequest("a local engine needs the whole model".into()));
        }
        Ok(Self { slice, sessions: HashMap::new() })
    }
}

impl Engine for LocalEngine {
    fn open(&mut self, session: u64, capacity: usize) -> Result<()> {
        let cache = self.slice.new_cache(capacity)?;
        self.sessions.insert(session, cache);
        Ok(())
    }

    fn step(&mut self, session: u64, tokens: &[u32], sample_spec: Option<SampleSpec<'_>>, want_logits: bool) -> Result<StepOutput> {
        let cache = self.sessions.get_mut(&session).ok_or_else(|| Error::InvalidRequest(format!("no session {session}")))?;
        let start = std::time::Instant::now();
        let input = Tensor::new(tokens, self.slice.device())?.unsqueeze(0)?;
        let logits = match self.slice.forward(&input, cache)? {
            SliceOutput::Logits(l) => l,
            SliceOutput::Hidden(_) => unreachable!("a whole-model slice ends in logits"),
        };
        let sampled = sample_spec.map(|s| sample_constrained(&logits, s.params, s.history, s.step, s.logprobs, s.allowed));
        Ok(StepOutput {
            token: sampled.as_ref().map(|s| s.0),
            logprobs: sampled.and_then(|s| s.1),
            logits: want_logits.then_some(logits),
            stage_times: vec![start.elapsed()],
            ..Default::default()
        })
    }

    fn pool(&mut self, session: u64, tokens: &[u32], pooling: Pooling) -> Result<Vec<f32>> {
        let cache = self.sessions.get_mut(&session).ok_or_else(|| Error::InvalidRequest(format!("no session {session}")))?;
        let mut out = self.slice.pool_batch(&mut [BatchItem { input: HostInput::Tokens(tokens), cache }], pooling)?;
        out.pop().ok_or_else(|| Error::InvalidRequest("the slice pooled nothing".into()))
    }

    fn rewind(&mut self, session: u64, keep: usize) -> Result<()> {
        let cache = self.sessions.get_mut(&session).ok_or_else(|| Error::InvalidRequest(format!("no session {session}")))?;
        cache.truncate(keep);
        Ok(())
    }

    fn close(&mut self, session: u64) {
        self.sessions.remove(&session);
    }

    fn context_length(&self) -> usize {
        self.slice.config().context_length
    }
}
