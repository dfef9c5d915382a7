//! The generation loop: prefill the prompt in chunks, then sample token by
//! token until EOS, a stop string, the token limit or the context end, while
//! streaming text as soon as it is unambiguous.

use std::time::{Duration, Instant};

use super::engine::{Engine, SampleSpec, StepOutput};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::model::sampling::{Logprobs, SamplingParams};

/// Prompt tokens per forward pass; bounds the activation buffer every stage holds.
pub const PREFILL_CHUNK: usize = 256;

/// Prompt tokens per forward pass while other sessions decode on the same
/// chain: their tokens wait for each chunk (256 tokens held them 230-540 ms
/// on 2 CPU cores; BENCHMARKS.md), so a prompt goes in more, shorter steps.
pub const SHARED_PREFILL_CHUNK: usize = 64;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Context to reserve; 0 means the model's.
    pub context: usize,
    /// Continue an open session whose first `keep` positions hold this
    /// prompt's prefix (a conversation's next turn), instead of opening one.
    pub resume: Option<Resume>,
    /// Leave the session open at the end, for a later `resume`.
    pub keep_session: bool,
    /// Report each generated token's log-probability and this many alternatives'.
    pub logprobs: Option<usize>,
    /// The output must be JSON (of a schema): sampling is constrained to it.
    pub format: Option<super::constraint::Format>,
}

#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// Cached positions that equal the start of the prompt.
    pub keep: usize,
    /// The open session's capacity.
    pub capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The caller stopped listening.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill: Duration,
    /// Time of the decode steps (after the first token).
    pub decode: Duration,
    pub time_to_first_token: Duration,
    /// Summed compute time per stage.
    pub stage_times: Vec<Duration>,
    /// One-way hop latency of each decode step (pipelines only).
    pub hop_latencies: Vec<Duration>,
    /// Payload bytes per stage-to-stage hop of the last decode step (one token).
    pub hop_bytes_per_token: Vec<u64>,
    /// Hops sent as f32 because f16 would have overflowed.
    pub f16_fallbacks: u64,
    /// Prompt tokens whose KV state was reused instead of computed.
    pub cached_tokens: usize,
    /// Time spent computing a grammar's allowed tokens and advancing it
    /// (structured outputs), and the masks computed.
    pub constraint: Duration,
    pub masks: usize,
}

impl Stats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens after the first (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }

    /// One line for stderr.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "prompt {} tok, prefill {:.1} tok/s, decode {} tok/s ({} tok), ttft {:.0} ms",
            self.prompt_tokens,
            self.prefill_tok_s(),
            format_args!("{:.1}", self.decode_tok_s()),
            self.generated_tokens,
            self.time_to_first_token.as_secs_f64() * 1e3
        );
        if self.masks > 0 {
            let per = self.constraint.as_secs_f64() / self.masks as f64;
            let step = 1.0 / self.decode_tok_s().max(1e-9);
            line += &format!("; grammar {:.3} ms/token ({:.1}% of a decode step)", per * 1e3, 100.0 * per / step);
        }
        line
    }

    fn record(&mut self, out: &StepOutput, decode: bool) {
        if self.stage_times.len() < out.stage_times.len() {
            self.stage_times.resize(out.stage_times.len(), Duration::ZERO);
        }
        for (acc, t) in self.stage_times.iter_mut().zip(&out.stage_times) {
            *acc += *t;
        }
        self.f16_fallbacks += out.f16_fallbacks as u64;
        if decode {
            self.hop_latencies.extend(out.hop_latency);
            self.hop_bytes_per_token.clone_from(&out.hop_bytes);
        }
    }

    /// The p-th percentile (0..=100) of the hop latencies.
    pub fn hop_latency_percentile(&self, p: f64) -> Option<Duration> {
        let mut v = self.hop_latencies.clone();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        Some(v[i.min(v.len() - 1)])
    }
}

#[derive(Debug, Clone)]
pub struct GenerateResult {
    pub tokens: Vec<u32>,
    /// One per token of `tokens`, when asked for.
    pub logprobs: Vec<Logprobs>,
    /// Every token the session's caches now hold, in order.
    pub fed: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub stats: Stats,
}

/// Turns a growing token list into text pieces: decodes a window of tokens and
/// emits only what the newest token added, holding back a trailing partial
/// UTF-8 character until the next token completes it.
struct TextStream {
    prefix: usize,
    read: usize,
}

impl TextStream {
    fn new() -> Self {
        Self { prefix: 0, read: 0 }
    }

    fn next(&mut self, tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
        let before = tok.decode(&tokens[self.prefix..self.read])?;
        let now = tok.decode(&tokens[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = tokens.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}

/// Holds back text that could be the start of a stop string.
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

enum StopOutcome {
    /// Safe to show.
    Emit(String),
    /// A stop string matched; the text before it is final.
    Stopped(String),
}

impl StopMatcher {
    fn push(&mut self, piece: &str) -> StopOutcome {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(before);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.pending.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Emit(out)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// A piece of streamed text and the tokens generated since the previous
/// piece, with their log-probabilities when they were asked for.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub text: &'a str,
    pub tokens: &'a [u32],
    pub logprobs: &'a [Logprobs],
}

/// Runs one request. `on_text` receives each new piece of text and returns
/// false to cancel. The session is closed on every path out.
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    session: u64,
    req: &GenerateRequest,
    on_text: &mut dyn FnMut(Piece<'_>) -> bool,
) -> Result<GenerateResult> {
    req.params.validate()?;
    if req.prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    let model_ctx = engine.context_length();
    let context = if req.context == 0 { model_ctx } else { req.context.min(model_ctx) };
    if req.prompt.len() >= context {
        return Err(Error::ContextOverflow { prompt: req.prompt.len(), context });
    }
    let capacity = match (req.resume, req.keep_session) {
        (Some(r), _) => r.capacity,
        // A kept session may grow over later turns: reserve the whole context
        // (the cache's pages are only touched as positions are written).
        (None, true) => context,
        (None, false) => context.min(req.prompt.len().saturating_add(req.max_tokens)),
    };
    if req.prompt.len() >= capacity {
        return Err(Error::ContextOverflow { prompt: req.prompt.len(), context: capacity });
    }
    let skip = match req.resume {
        Some(r) => {
            let keep = r.keep.min(req.prompt.len() - 1);
            engine.rewind(session, keep)?;
            keep
        }
        None => {
            engine.open(session, capacity)?;
            0
        }
    };
    let result = run(engine, tokenizer, session, req, capacity, skip, on_text);
    if result.is_err() || !req.keep_session {
        engine.close(session);
    } else {
        engine.settle(session);
    }
    result
}

fn run(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    session: u64,
    req: &GenerateRequest,
    capacity: usize,
    skip: usize,
    on_text: &mut dyn FnMut(Piece<'_>) -> bool,
) -> Result<GenerateResult> {
    let mut stats = Stats { prompt_tokens: req.prompt.len() - skip, cached_tokens: skip, ..Default::default() };
    let mut history = req.prompt.clone();
    let mut generated: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut stream = TextStream::new();
    let mut stops = StopMatcher { stops: req.stop.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() };
    let start = Instant::now();
    if req.max_tokens == 0 {
        return Ok(GenerateResult {
            tokens: generated,
            logprobs: Vec::new(),
            fed: req.prompt[..skip].to_vec(),
            text,
            finish: FinishReason::Length,
            stats,
        });
    }

    // Prefill: every chunk but the last only fills the caches.
    let chunks: Vec<&[u32]> = req.prompt[skip..].chunks(engine.prefill_chunk(session)).collect();
    let mut constraint = req.format.as_ref().map(|f| tokenizer.grammars()?.constraint(f)).transpose()?;
    let mut next = None;
    let mut next_logprobs = None;
    let mut logprobs = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let masked = Instant::now();
        let allowed = match constraint.as_mut() {
            Some(c) if last => Some(c.allowed()?),
            _ => None,
        };
        if allowed.is_some() {
            stats.constraint += masked.elapsed();
            stats.masks += 1;
        }
        let spec = last.then_some(SampleSpec {
            params: &req.params,
            history: &history,
            step: 0,
            logprobs: req.logprobs,
            allowed: allowed.as_deref(),
            ahead: if constraint.is_some() { 0 } else { steps_after(req, 0, history.len(), capacity) },
            stop: tokenizer.eos(),
        });
        let out = engine.step(session, chunk, spec, false)?;
        stats.record(&out, false);
        next = out.token;
        next_logprobs = out.logprobs;
    }
    stats.prefill = start.elapsed();
    stats.time_to_first_token = stats.prefill;
    let mut token = next.ok_or_else(|| Error::InvalidRequest("the engine returned no token".into()))?;
    let decode_start = Instant::now();
    let mut fed_generated = 0;
    // Tokens already handed out with a piece.
    let mut shown = 0;
    let mut piece = |text: &str, generated: &[u32], logprobs: &[Logprobs], shown: &mut usize| {
        let p = Piece { text, tokens: &generated[*shown..], logprobs: logprobs.get(*shown..).unwrap_or_default() };
        *shown = generated.len();
        on_text(p)
    };
    let finish = loop {
        if tokenizer.is_eos(token) {
            break FinishReason::Stop;
        }
        generated.push(token);
        history.push(token);
        if let Some(c) = constraint.as_mut() {
            let t = Instant::now();
            c.commit(token)?;
            stats.constraint += t.elapsed();
        }
        logprobs.extend(next_logprobs.take());
        let mut stopped = false;
        let text_piece = stream.next(tokenizer, &generated)?;
        let emit = match stops.push(&text_piece) {
            StopOutcome::Emit(s) => s,
            StopOutcome::Stopped(s) => {
                stopped = true;
                s
            }
        };
        if !emit.is_empty() {
            text.push_str(&emit);
            if !piece(&emit, &generated, &logprobs, &mut shown) {
                break FinishReason::Cancelled;
            }
        }
        if stopped || constraint.as_ref().is_some_and(|c| c.is_done()) {
            break FinishReason::Stop;
        }
        if generated.len() >= req.max_tokens || history.len() >= capacity {
            break FinishReason::Length;
        }
        let masked = Instant::now();
        let allowed = constraint.as_mut().map(|c| c.allowed()).transpose()?;
        if allowed.is_some() {
            stats.constraint += masked.elapsed();
            stats.masks += 1;
        }
        let spec = SampleSpec {
            params: &req.params,
            history: &history,
            step: generated.len() as u64,
            logprobs: req.logprobs,
            allowed: allowed.as_deref(),
            ahead: if constraint.is_some() { 0 } else { steps_after(req, generated.len(), history.len(), capacity) },
            stop: tokenizer.eos(),
        };
        let out = engine.step(session, &[token], Some(spec), false)?;
        fed_generated += 1;
        stats.record(&out, true);
        token = out.token.ok_or_else(|| Error::InvalidRequest("the engine returned no token".into()))?;
        next_logprobs = out.logprobs;
    };
    if finish != FinishReason::Cancelled {
        // Text held back for a stop string that never completed is final now.
        let rest = stops.flush();
        if !rest.is_empty() {
            text.push_str(&rest);
            piece(&rest, &generated, &logprobs, &mut shown);
        }
    }
    stats.generated_tokens = generated.len();
    stats.decode = decode_start.elapsed();
    // The prompt, then every generated token that was fed back (all but a
    // last one the loop stopped on).
    let mut fed = req.prompt.clone();
    fed.extend_from_slice(&generated[..fed_generated]);
    Ok(GenerateResult { tokens: generated, logprobs, fed, text, finish, stats })
}

/// How many decode steps follow a step taken with `generated` tokens
/// generated and `history` positions fed, unless a token ends the
/// generation: the `k`-th would feed the `k`-th token sampled from here,
/// and runs only while the generated tokens and the positions stay under
/// `max_tokens` and `capacity` (the loop's checks, below).
fn steps_after(req: &GenerateRequest, generated: usize, history: usize, capacity: usize) -> usize {
    req.max_tokens.saturating_sub(generated + 1).min(capacity.saturating_sub(history + 1))
}

/// The embedding of `ids`: the model's final hidden states pooled (`Mean`
/// over every position, the `First` or the `Last`), L2-normalised as
/// Ollama's are. Runs in a session of its own, closed at the end.
pub fn embed(engine: &mut dyn Engine, session: u64, ids: &[u32], pooling: crate::model::Pooling) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::InvalidRequest("an embedding needs at least one token".into()));
    }
    engine.open(session, ids.len())?;
    let mut pooled: Option<Vec<f32>> = None;
    let mut run = || -> Result<()> {
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let v = engine.pool(session, chunk, pooling)?;
            match (&mut pooled, pooling) {
                (Some(sum), crate::model::Pooling::Mean) if sum.len() == v.len() => sum.iter_mut().zip(&v).for_each(|(s, x)| *s += x),
                (Some(_), crate::model::Pooling::Mean) => return Err(Error::InvalidRequest("pooled states of different widths".into())),
                // The first chunk holds the first position.
                (Some(_), crate::model::Pooling::First) => {}
                _ => pooled = Some(v),
            }
        }
        Ok(())
    };
    let ran = run();
    engine.close(session);
    ran?;
    let mut v = pooled.unwrap_or_default();
    if pooling == crate::model::Pooling::Mean {
        v.iter_mut().for_each(|x| *x /= ids.len() as f32);
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher { stops: stops.iter().map(|s| s.to_string()).collect(), pending: String::new() }
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut m = matcher(&["\n\n", "END"]);
        assert!(matches!(m.push("Hello E"), StopOutcome::Emit(s) if s == "Hello "));
        assert!(matches!(m.push("N"), StopOutcome::Emit(s) if s.is_empty()));
        assert!(matches!(m.push("X"), StopOutcome::Emit(s) if s == "ENX"));
        assert!(matches!(m.push("a\n"), StopOutcome::Emit(s) if s == "a"));
        assert!(matches!(m.push("\nrest"), StopOutcome::Stopped(s) if s.is_empty()));
    }

    #[test]
    fn stop_string_inside_one_piece_cuts_it() {
        let mut m = matcher(&["END"]);
        assert!(matches!(m.push("abcENDdef"), StopOutcome::Stopped(s) if s == "abc"));
    }
}
