//! A fixed pool of compute threads that run one job at a time, every thread
//! with its own index, the caller being thread 0.
//!
//! A decode step issues a few hundred small parallel regions (each matrix
//! product is tens of microseconds), so waking threads through the OS each
//! time would cost more than the work: workers spin for a short while after
//! a job and only then park on a condition variable. Parked workers cost
//! nothing while the node is idle or another process holds the cores.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(300);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per job; workers run a job when they see it change.
    epoch: AtomicU64,
    /// The current job, valid from its epoch bump until `pending` reaches 0.
    job: UnsafeCell<Option<*const Job>>,
    pending: AtomicUsize,
    parked: AtomicUsize,
    /// Bumped by [`Pool::rest`]: workers spinning for a next job park now.
    rest: AtomicU64,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the one caller holding `Pool::run_lock`
// while no worker reads it (the previous job's `pending` reached 0), and read
// by workers only between the epoch bump and their `pending` decrement.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    run_lock: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            rest: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("sollol-compute-{index}"))
                    .spawn(move || worker(&shared, index))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self { shared, threads, run_lock: Mutex::new(()), workers }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(i)` for every thread index `i` in `0..threads` and returns
    /// when all have finished. Callers from several threads take turns.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            job(0);
            return;
        }
        let _turn = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erasing the lifetime is sound because this function does not
        // return before every worker is done with the job (pending == 0).
        let ptr: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(job) };
        unsafe { *s.job.get() = Some(ptr) };
        s.pending.store(self.threads - 1, Ordering::Release);
        // SeqCst on both sides (here and the worker's park) so a worker cannot
        // miss the bump while we miss its parking.
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job(0);
        spin_until(|| s.pending.load(Ordering::Acquire) == 0);
    }

    /// Tells idle workers that no job follows soon, so they park at once
    /// instead of spinning out [`SPIN`]: a pipeline stage calls it when it
    /// has no step left, because its next step is a hop away and a spinning
    /// worker would hold a core that another process on this machine (the
    /// next stage, the head) needs right then.
    pub fn rest(&self) {
        self.shared.rest.fetch_add(1, Ordering::Release);
    }
}

/// Waits for `done` inside a job, whose other threads are running: spinning
/// (they finish within microseconds), then yielding in case the machine
/// took their core away.
fn spin_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins += 1;
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let (start, rest) = (Instant::now(), s.rest.load(Ordering::Acquire));
        let mut spins = 0u32;
        loop {
            let epoch = s.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || (start.elapsed() < SPIN && s.rest.load(Ordering::Acquire) == rest) {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_add(1, Ordering::SeqCst);
            // Re-check under the lock: `run` notifies under it after bumping.
            let guard = s
                .wake
                .wait_while(guard, |_| s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::Acquire))
                .unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_sub(1, Ordering::AcqRel);
            drop(guard);
        }
        // SAFETY: see `Shared`; the caller keeps the job alive until pending == 0.
        if let Some(job) = unsafe { *s.job.get() } {
            unsafe { (*job)(index) };
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A one-use barrier inside one [`Pool::run`] job: a thread's `wait`
/// returns once every thread of the job has called it. Every thread of a
/// job runs it, so a job in two phases (the second reading what all threads
/// wrote in the first) needs one region instead of two.
pub struct Barrier {
    arrived: AtomicUsize,
    threads: usize,
}

impl Barrier {
    pub fn new(pool: &Pool) -> Self {
        Self { arrived: AtomicUsize::new(0), threads: pool.threads }
    }

    pub fn wait(&self) {
        // Release: this thread's first-phase writes; Acquire: everyone else's.
        self.arrived.fetch_add(1, Ordering::AcqRel);
        spin_until(|| self.arrived.load(Ordering::Acquire) == self.threads);
    }
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the compute thread count; effective if called before the first kernel runs.
pub fn set_threads(n: usize) {
    THREADS.store(n, Ordering::Release);
}

/// Lets the process-wide pool's workers park now, if the pool exists.
pub fn rest() {
    if let Some(pool) = POOL.get() {
        pool.rest();
    }
}

/// The process-wide compute pool (all cores unless [`set_threads`] said otherwise).
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match THREADS.load(Ordering::Acquire) {
            0 => crate::sys::cpu_cores(),
            n => n,
        };
        Pool::new(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_holds_every_thread_until_all_arrive() {
        let pool = Pool::new(3);
        for _ in 0..100 {
            let (barrier, before) = (Barrier::new(&pool), AtomicUsize::new(0));
            let seen: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i| {
                before.fetch_add(1, Ordering::Relaxed);
                barrier.wait();
                seen[i].store(before.load(Ordering::Relaxed), Ordering::Relaxed);
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 3));
        }
    }

    #[test]
    fn every_index_runs_once_per_job_across_parks_and_rests() {
        let pool = Pool::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..200 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            if round % 3 == 0 {
                // Told to rest while spinning, parking, or being woken.
                pool.rest();
            }
            if round % 50 == 0 {
                // Let the workers park, then wake them.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 200);
        }
    }
}
