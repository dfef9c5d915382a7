//! Admission: a bounded priority queue in front of a fixed number of
//! generation slots. Higher priority first, first come first served within a
//! priority; a full queue refuses at once instead of letting latency grow
//! without bound.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    Full(usize),
    #[error("the server is shutting down")]
    Closed,
}

struct Waiting {
    priority: i32,
    seq: u64,
    grant: oneshot::Sender<()>,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.priority == other.priority && self.seq == other.seq
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    /// The max-heap pops the highest priority, then the lowest sequence number.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority.cmp(&other.priority).then(other.seq.cmp(&self.seq))
    }
}

struct State {
    slots: usize,
    running: usize,
    max_waiting: usize,
    next_seq: u64,
    waiting: BinaryHeap<Waiting>,
}

impl State {
    /// Hands free slots to the best waiters whose callers are still there.
    fn dispatch(&mut self) {
        while self.running < self.slots {
            let Some(w) = self.waiting.pop() else { break };
            if w.grant.send(()).is_ok() {
                self.running += 1;
            }
        }
    }
}

/// Cheap to clone; all clones share one queue.
#[derive(Clone)]
pub struct Queue {
    state: Arc<Mutex<State>>,
}

/// A generation slot, returned to the queue when dropped.
pub struct Permit {
    state: Arc<Mutex<State>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.state.lock().expect("queue lock");
        s.running -= 1;
        s.dispatch();
    }
}

impl Queue {
    pub fn new(slots: usize, max_waiting: usize) -> Self {
        let state = State { slots: slots.max(1), running: 0, max_waiting, next_seq: 0, waiting: BinaryHeap::new() };
        Self { state: Arc::new(Mutex::new(state)) }
    }

    /// Waits for a slot. Refuses at once when `max_waiting` requests already wait.
    pub async fn acquire(&self, priority: i32) -> Result<Permit, QueueError> {
        let rx = {
            let mut s = self.state.lock().expect("queue lock");
            if s.running < s.slots && s.waiting.is_empty() {
                s.running += 1;
                return Ok(Permit { state: self.state.clone() });
            }
            if s.waiting.len() >= s.max_waiting {
                return Err(QueueError::Full(s.waiting.len()));
            }
            let (grant, rx) = oneshot::channel();
            let seq = s.next_seq;
            s.next_seq += 1;
            s.waiting.push(Waiting { priority, seq, grant });
            rx
        };
        // A caller that goes away drops `rx`; dispatch then skips its entry.
        rx.await.map_err(|_| QueueError::Closed)?;
        Ok(Permit { state: self.state.clone() })
    }

    /// (running, waiting)
    pub fn depth(&self) -> (usize, usize) {
        let s = self.state.lock().expect("queue lock");
        (s.running, s.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn higher_priority_first_and_fifo_within_a_priority() {
        let q = Queue::new(1, 10);
        let first = q.acquire(0).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, prio) in [("low-a", 0), ("high", 5), ("low-b", 0), ("mid", 2)] {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = q.acquire(prio).await.unwrap();
                order.lock().unwrap().push(name);
            }));
            // Let each request enqueue before the next, so arrival order is defined.
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(q.depth(), (1, 4));
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["high", "mid", "low-a", "low-b"]);
        assert_eq!(q.depth(), (0, 0));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let q = Queue::new(1, 1);
        let _running = q.acquire(0).await.unwrap();
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.acquire(0).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert_eq!(q.acquire(0).await.err(), Some(QueueError::Full(1)));
        waiting.abort();
    }

    #[tokio::test]
    async fn a_caller_that_leaves_frees_its_place() {
        let q = Queue::new(1, 4);
        let running = q.acquire(0).await.unwrap();
        let q2 = q.clone();
        let gone = tokio::spawn(async move { q2.acquire(9).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        gone.abort();
        let _ = gone.await;
        drop(running);
        // The slot went to nobody dead: a new caller gets it at once.
        let _p = tokio::time::timeout(std::time::Duration::from_secs(1), q.acquire(0)).await.unwrap().unwrap();
    }
}
