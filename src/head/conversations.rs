//! Conversations kept for their next turn: a finished chat turn's session
//! stays on the stages with its KV state, and the next turn sharing its
//! prefix resumes it instead of computing the prefix again.
//!
//! The cache is bounded by a KV budget (least recently used first out) and
//! by age; eviction is always safe, since a later turn just recomputes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::generation::Resume;
use super::pipeline::Pipeline;

/// Idle conversations are dropped by the head well before nodes free them (10 min).
const TTL: Duration = Duration::from_secs(300);
/// Fewer shared tokens than this are not worth a lookup.
const MIN_REUSE: usize = 8;

/// A finished conversation turn whose KV state stays on the stages.
pub struct Conversation {
    pub model: String,
    pub session: u64,
    /// The tokens the session's caches hold.
    pub fed: Vec<u32>,
    pub capacity: usize,
    pub pipeline: Arc<Pipeline>,
    pub bytes_per_token: usize,
}

pub struct Conversations {
    held: Mutex<Vec<(Conversation, Instant)>>,
    budget_bytes: usize,
}

impl Conversations {
    pub fn new(budget_bytes: usize) -> Self {
        Self { held: Mutex::new(Vec::new()), budget_bytes }
    }

    pub fn len(&self) -> usize {
        self.held.lock().expect("conversations lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The idle conversation of `model` sharing the longest prefix with
    /// `prompt`, taken out of the cache (a session serves one turn at a
    /// time): its session, how much of it to keep, and the pipeline holding it.
    pub fn take(&self, model: &str, prompt: &[u32]) -> Option<(u64, Resume, Arc<Pipeline>)> {
        let mut held = self.held.lock().expect("conversations lock");
        held.retain(|(_, used)| used.elapsed() < TTL);
        let common = |c: &Conversation| c.fed.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let (i, keep) = held
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| c.model == model && c.capacity > prompt.len())
            .map(|(i, (c, _))| (i, common(c)))
            .max_by_key(|(_, n)| *n)?;
        if keep < MIN_REUSE.min(prompt.len().saturating_sub(1)).max(1) {
            return None;
        }
        let (c, _) = held.remove(i);
        Some((c.session, Resume { keep, capacity: c.capacity }, c.pipeline))
    }

    /// Keeps a finished turn; returns the conversations evicted to stay
    /// within the budget, whose sessions the caller closes.
    pub fn keep(&self, turn: Conversation) -> Vec<(Arc<Pipeline>, u64)> {
        let mut held = self.held.lock().expect("conversations lock");
        held.push((turn, Instant::now()));
        let mut evicted = Vec::new();
        while held.iter().map(|(c, _)| c.fed.len() * c.bytes_per_token).sum::<usize>() > self.budget_bytes && !held.is_empty() {
            let oldest = held.iter().enumerate().min_by_key(|(_, (_, used))| *used).map(|(i, _)| i).expect("not empty");
            let (c, _) = held.remove(oldest);
            evicted.push((c.pipeline, c.session));
        }
        evicted
    }
}
