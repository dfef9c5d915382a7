//! A fixed pool of compute threads that run one job at a time: a job is
//! one call per index `0..threads`, the caller running index 0.
//!
//! A decode step issues a few hundred small parallel regions (each matrix
//! product is tens of microseconds), so waking threads through the OS each
//! time would cost more than the work: workers spin for a short while after
//! a job and only then park on a condition variable. Parked workers cost
//! nothing while the node is idle or another process holds the cores.
//!
//! Workers claim indices; the caller, done with its own, runs every index no
//! worker has claimed yet instead of waiting for one. A worker parked, or
//! whose core the machine gave to someone else, then costs the region its
//! share of the work instead of its wake-up: on a virtual machine a vCPU
//! left idle for a few milliseconds (a pipeline stage between steps behind
//! a delayed link) took milliseconds to come back, and steps waited on it.

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
    /// The current job, valid from its epoch bump until `done` reaches the
    /// thread count.
    job: UnsafeCell<Option<*const Job>>,
    /// The next index of the current job to hand out (the caller holds 0).
    claim: AtomicUsize,
    /// Indices of the current job finished.
    done: AtomicUsize,
    parked: AtomicUsize,
    /// Bumped by [`Pool::rest`]: workers spinning for a next job park now.
    rest: AtomicU64,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the one caller holding `Pool::run_lock`
// while no worker reads it: every index of the previous job is done, and a
// worker reads it only after claiming an index below the thread count, which
// it can do only once `claim` was reset (after the write) for this job.
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
            claim: AtomicUsize::new(usize::MAX / 2),
            done: AtomicUsize::new(0),
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
                    .spawn(move || worker(&shared, threads))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self { shared, threads, run_lock: Mutex::new(()), workers }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(i)` once for every index `i` in `0..threads`, on whichever
    /// threads claim them (the caller runs 0 and whatever is left unclaimed
    /// when it is done), and returns when all have finished. The indices may
    /// run one after another on one thread: a job must not wait inside for
    /// another index. Callers from several threads take turns.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            job(0);
            return;
        }
        let _turn = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erasing the lifetime is sound because this function does not
        // return before every index is done (done == threads), and no worker
        // touches the job after its index is done.
        let ptr: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(job) };
        unsafe { *s.job.get() = Some(ptr) };
        s.done.store(0, Ordering::Release);
        // Release: a worker that claims an index sees the job written above.
        s.claim.store(1, Ordering::Release);
        // SeqCst on both sides (here and the worker's park) so a worker cannot
        // miss the bump while we miss its parking.
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job(0);
        s.done.fetch_add(1, Ordering::AcqRel);
        run_unclaimed(s, self.threads, job);
        spin_until(|| s.done.load(Ordering::Acquire) == self.threads);
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

fn worker(s: &Shared, threads: usize) {
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
        // Several indices, when the caller is late.
        run_unclaimed(s, threads, |i| {
            // SAFETY: see `Shared`; the caller keeps the job alive until every
            // index, this one included, is done.
            if let Some(job) = unsafe { *s.job.get() } {
                unsafe { (*job)(i) };
            }
        });
    }
}

/// Claims the current job's indices one by one and runs each, until none
/// is left: what every thread does, the caller once its own index is done.
fn run_unclaimed(s: &Shared, threads: usize, job: impl Fn(usize)) {
    loop {
        let i = s.claim.fetch_add(1, Ordering::AcqRel);
        if i >= threads {
            return;
        }
        job(i);
        s.done.fetch_add(1, Ordering::AcqRel);
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
    fn the_caller_runs_the_indices_of_workers_still_asleep() {
        let pool = Pool::new(3);
        let caller = std::thread::current().id();
        let mut by_caller = 0;
        for _ in 0..20 {
            // Parked workers take a wake-up to claim anything; the caller's
            // own index is instant, so it goes on to theirs.
            pool.rest();
            std::thread::sleep(Duration::from_millis(2));
            let ran: Vec<Mutex<Option<std::thread::ThreadId>>> = (0..3).map(|_| Mutex::new(None)).collect();
            pool.run(&|i| {
                let mut slot = ran[i].lock().unwrap();
                assert!(slot.is_none(), "index {i} ran twice");
                *slot = Some(std::thread::current().id());
            });
            assert!(ran.iter().all(|r| r.lock().unwrap().is_some()));
            by_caller += ran[1..].iter().filter(|r| *r.lock().unwrap() == Some(caller)).count();
        }
        assert!(by_caller > 0, "the caller always waited for the workers");
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
