//! What a stage's next batch holds, and how long it waits to fill.
//!
//! A batch reads the slice's weights once for all its rows, so sessions that
//! step together cost a stage little more than one. Two things decide who
//! steps together:
//! - **Micro-batches.** The head puts each session in one of the chain's
//!   micro-batches (`ForwardHeader::micro_batch`), as many as the chain has
//!   stages that can compute at once. A batch holds one micro-batch's steps,
//!   so while stage 2 runs one micro-batch, stage 1 runs the next: every
//!   stage busy on different sessions. Stages that share cores get one
//!   micro-batch, where the same work in fewer, larger batches is faster.
//! - **Waiting for who is due.** Each session's steps come back to a stage
//!   once per trip round the chain. A batch waits a moment for the sessions
//!   of its micro-batch whose next step is due (expected from the interval
//!   between their last two arrivals), so they step together instead of one
//!   weight read each; sessions that drifted apart (a new one's prefill, a
//!   late one) fall back into step within a few trips, the leading ones
//!   waiting for those just behind.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::stage::{Work, MAX_BATCH_ROWS};
use crate::net::message::{ForwardHeader, ForwardInput};

/// The longest a batch waits for a due session.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// When the sessions a stage serves arrive.
#[derive(Default)]
pub struct Arrivals {
    seen: HashMap<u64, Seen>,
}

struct Seen {
    micro_batch: u8,
    last: Instant,
    /// Between its last two arrivals: one trip round the chain.
    interval: Option<Duration>,
}

impl Arrivals {
    pub fn arrived(&mut self, h: &ForwardHeader, at: Instant) {
        let seen = self.seen.entry(h.session).or_insert(Seen { micro_batch: h.micro_batch, last: at, interval: None });
        if at > seen.last {
            seen.interval = Some(at - seen.last);
        }
        seen.last = at;
        seen.micro_batch = h.micro_batch;
    }

    /// Forgets the sessions `keep` rejects (closed, or freed by the stage).
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.seen.retain(|&s, _| keep(s));
    }

    /// The sessions of `micro_batch` to wait for at `now`, none of them
    /// `queued`, and until when: those expected within half a trip (at most
    /// `MAX_WAIT`), or late by less than a quarter of one.
    pub fn due(&self, micro_batch: u8, queue: &VecDeque<Work>, now: Instant) -> (HashSet<u64>, Instant) {
        let queued: HashSet<u64> = queue.iter().filter_map(awaited_no_more).collect();
        let mut due = HashSet::new();
        let mut until = now;
        for (&session, seen) in &self.seen {
            let Some(interval) = seen.interval else { continue };
            if seen.micro_batch != micro_batch || queued.contains(&session) {
                continue;
            }
            let expected = seen.last + interval;
            let (ahead, grace) = ((interval / 2).min(MAX_WAIT), (interval / 4).min(MAX_WAIT));
            if expected <= now + ahead && now <= expected + grace {
                due.insert(session);
                until = until.max((expected + grace).min(now + MAX_WAIT));
            }
        }
        (due, until)
    }
}

/// The session and micro-batch of a queued forward step.
fn forward(work: &Work) -> Option<&ForwardHeader> {
    match work {
        Work::Forward { header, .. } => Some(header),
        _ => None,
    }
}

fn rows(h: &ForwardHeader) -> usize {
    match &h.input {
        ForwardInput::Tokens(ids) => ids.len(),
        ForwardInput::Hidden(th) => th.shape.get(1).copied().unwrap_or(1) as usize,
    }
}

/// Which micro-batch steps next at `now`: the first of those queued (ahead
/// of any other kind of work) that waits for none of its due sessions
/// still `open`, so that while one micro-batch waits for a session behind,
/// another that is all here steps; else the front step's, with when its
/// wait is over. `None` when no step is at the front.
pub fn next_micro_batch(
    arrivals: &Arrivals,
    queue: &VecDeque<Work>,
    now: Instant,
    open: impl Fn(u64) -> bool,
) -> Option<(u8, Option<Instant>)> {
    let mut front = None;
    let mut tried = HashSet::new();
    for h in queue.iter().map_while(forward) {
        if !tried.insert(h.micro_batch) {
            continue;
        }
        let (due, until) = arrivals.due(h.micro_batch, queue, now);
        if !due.iter().any(|&s| open(s)) {
            return Some((h.micro_batch, None));
        }
        front.get_or_insert((h.micro_batch, Some(until)));
    }
    front
}

/// The session a step or a close (its generation ended) is of: once one
/// is queued, the session is no longer awaited.
pub fn awaited_no_more(work: &Work) -> Option<u64> {
    match work {
        Work::Forward { header, .. } => Some(header.session),
        Work::Close { session } => Some(*session),
        _ => None,
    }
}

/// Takes the next batch: the steps of `micro_batch`, in arrival order, up to the first that repeats a session (its next chunk
/// waits for the previous one), would pass `MAX_BATCH_ROWS` rows (one step
/// is always taken), or lies past another kind of work (a close, a KV
/// export: they see the steps queued before them done). Other micro-batches'
/// steps stay queued, in order.
pub fn take_batch(queue: &mut VecDeque<Work>, micro_batch: u8) -> Vec<(ForwardHeader, Vec<u8>)> {
    let mut picked = Vec::new();
    let mut sessions = HashSet::new();
    let mut total = 0;
    for (i, work) in queue.iter().enumerate() {
        let Some(h) = forward(work) else { break };
        if h.micro_batch != micro_batch {
            continue;
        }
        let n = rows(h);
        if !picked.is_empty() && (total + n > MAX_BATCH_ROWS || sessions.contains(&h.session)) {
            break;
        }
        sessions.insert(h.session);
        total += n;
        picked.push(i);
    }
    // Removed back to front so the indices stay valid, then put in order.
    let mut batch: Vec<_> = picked
        .iter()
        .rev()
        .filter_map(|&i| match queue.remove(i) {
            Some(Work::Forward { header, payload, .. }) => Some((header, payload)),
            _ => None,
        })
        .collect();
    batch.reverse();
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(session: u64, micro_batch: u8, tokens: usize) -> ForwardHeader {
        ForwardHeader { micro_batch, ..ForwardHeader::new(session, session, ForwardInput::Tokens(vec![1; tokens])) }
    }

    fn step(session: u64, micro_batch: u8, tokens: usize) -> Work {
        Work::Forward { header: header(session, micro_batch, tokens), payload: Vec::new(), arrived: Instant::now() }
    }

    fn sessions(batch: &[(ForwardHeader, Vec<u8>)]) -> Vec<u64> {
        batch.iter().map(|(h, _)| h.session).collect()
    }

    fn left(queue: &VecDeque<Work>) -> Vec<u64> {
        queue.iter().filter_map(forward).map(|h| h.session).collect()
    }

    #[test]
    fn a_batch_holds_one_micro_batch_in_arrival_order() {
        let mut queue: VecDeque<Work> = [step(1, 0, 1), step(2, 1, 1), step(3, 0, 1), step(4, 1, 1), step(5, 0, 1)].into();
        assert_eq!(sessions(&take_batch(&mut queue, 0)), [1, 3, 5]);
        assert_eq!(left(&queue), [2, 4]);
        assert_eq!(sessions(&take_batch(&mut queue, 1)), [2, 4]);
        assert!(queue.is_empty());
        assert!(take_batch(&mut queue, 0).is_empty());
    }

    #[test]
    fn a_batch_stops_at_a_repeated_session_a_full_batch_and_other_work() {
        // Session 1's second chunk waits for its first; so does what follows it.
        let mut queue: VecDeque<Work> = [step(1, 0, 1), step(2, 0, 1), step(1, 0, 1), step(3, 0, 1)].into();
        assert_eq!(sessions(&take_batch(&mut queue, 0)), [1, 2]);
        assert_eq!(left(&queue), [1, 3]);
        // A close ends the batch: the steps before it are done first.
        let mut queue: VecDeque<Work> = [step(1, 0, 1), Work::Close { session: 9 }, step(2, 0, 1)].into();
        assert_eq!(sessions(&take_batch(&mut queue, 0)), [1]);
        assert!(matches!(queue.front(), Some(Work::Close { session: 9 })));
        assert!(take_batch(&mut queue, 0).is_empty(), "a close at the front is not a batch");
        // Rows: a whole prefill chunk alone, then the steps that fit.
        let mut queue: VecDeque<Work> = [step(1, 0, MAX_BATCH_ROWS), step(2, 0, 1), step(3, 0, MAX_BATCH_ROWS - 1)].into();
        assert_eq!(sessions(&take_batch(&mut queue, 0)), [1]);
        assert_eq!(sessions(&take_batch(&mut queue, 0)), [2, 3]);
    }

    #[test]
    fn a_batch_waits_for_its_micro_batchs_sessions_due_soon() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut arrivals = Arrivals::default();
        let at = |session: u64, micro_batch: u8| header(session, micro_batch, 1);
        // Trips of 10 ms: 1 and 2 arrive together, 3 is 4 ms behind, 4 is
        // 6 ms behind (more than half a trip), 5 is in another micro-batch,
        // 6 has arrived once (its trip unknown).
        for (s, mb, offset) in [(1, 0, 0), (2, 0, 0), (3, 0, 4), (4, 0, 6), (5, 1, 0)] {
            arrivals.arrived(&at(s, mb), t0 + ms(offset));
            arrivals.arrived(&at(s, mb), t0 + ms(10 + offset));
        }
        arrivals.arrived(&at(6, 0), t0 + ms(10));
        let now = t0 + ms(20);
        let queued: VecDeque<Work> = [step(1, 0, 1), Work::Close { session: 2 }].into();
        let (due, until) = arrivals.due(0, &queued, now);
        assert_eq!(due, [3].into());
        // Expected at 24 ms, waited for until 26.5 ms (a quarter trip late).
        assert_eq!(until, t0 + ms(24) + Duration::from_micros(2500));
        // A session that is late by more than a quarter trip is not awaited.
        let (due, _) = arrivals.due(0, &queued, t0 + ms(27));
        assert_eq!(due, [4].into(), "4 is due at 26 ms; 3 was given up at 26.5 ms");
        // A closed session is forgotten.
        arrivals.retain(|s| s != 3);
        let (due, until) = arrivals.due(0, &queued, now);
        assert!(due.is_empty());
        assert_eq!(until, now);
        // Micro-batch 1's own.
        let (due, _) = arrivals.due(1, &VecDeque::new(), now);
        assert_eq!(due, [5].into());
    }

    #[test]
    fn waits_are_bounded_for_slow_trips() {
        let t0 = Instant::now();
        let mut arrivals = Arrivals::default();
        let h = header(1, 0, 1);
        // A 400 ms trip: the session is due 100 ms from now, too far to wait for.
        arrivals.arrived(&h, t0);
        arrivals.arrived(&h, t0 + Duration::from_millis(400));
        let (due, _) = arrivals.due(0, &VecDeque::new(), t0 + Duration::from_millis(700));
        assert!(due.is_empty());
        // Due in 10 ms: waited for, 20 ms at most.
        let now = t0 + Duration::from_millis(790);
        let (due, until) = arrivals.due(0, &VecDeque::new(), now);
        assert_eq!(due, [1].into());
        assert_eq!(until, now + MAX_WAIT);
    }

    #[test]
    fn a_micro_batch_all_here_steps_before_one_that_waits() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut arrivals = Arrivals::default();
        // Trips of 10 ms: micro-batch 0 is sessions 1 and 2 (2 a millisecond
        // behind), micro-batch 1 is sessions 3 and 4.
        for (s, mb, offset) in [(1, 0, 0), (2, 0, 1), (3, 1, 0), (4, 1, 0)] {
            arrivals.arrived(&header(s, mb, 1), t0 + ms(offset));
            arrivals.arrived(&header(s, mb, 1), t0 + ms(10 + offset));
        }
        let open = |_| true;
        let now = t0 + ms(20);
        // 1 is here and waits for 2; all of micro-batch 1 is here: it steps first.
        let queue: VecDeque<Work> = [step(1, 0, 1), step(3, 1, 1), step(4, 1, 1)].into();
        assert_eq!(next_micro_batch(&arrivals, &queue, now, open), Some((1, None)));
        // With 4 missing too, the front waits, until 2 is a quarter trip late.
        let queue: VecDeque<Work> = [step(1, 0, 1), step(3, 1, 1)].into();
        assert_eq!(next_micro_batch(&arrivals, &queue, now, open), Some((0, Some(t0 + ms(21) + Duration::from_micros(2500)))));
        // A session no longer open is not waited for.
        assert_eq!(next_micro_batch(&arrivals, &queue, now, |s| s != 2), Some((0, None)));
        // Steps behind other work wait for it; no step in front, no batch.
        let queue: VecDeque<Work> = [step(1, 0, 1), Work::Close { session: 9 }, step(3, 1, 1), step(4, 1, 1)].into();
        assert_eq!(next_micro_batch(&arrivals, &queue, now, open).map(|(mb, _)| mb), Some(0));
        let queue: VecDeque<Work> = [Work::Close { session: 9 }, step(3, 1, 1)].into();
        assert_eq!(next_micro_batch(&arrivals, &queue, now, open), None);
    }
}
