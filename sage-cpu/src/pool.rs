//! A persistent pool of worker threads: spawned once, woken per step, no spawn per step.
//!
//! A job is a `Fn(worker_index)` that pulls work from a shared counter until none is left, so
//! any number of participants finishes it; the caller always takes part. While one caller uses
//! the pool, another (say, a second optimizer on another thread) runs its job alone instead of
//! waiting, so there is no nesting and no deadlock.
//!
//! A panic in a job (the caller's part or a worker's) is caught, every participant still
//! finishes, and the panic is re-raised in the caller; the pool stays whole: workers survive
//! (they catch it), and no lock is left poisoned, so the next job runs on every thread again.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, TryLockError};

/// The job's closure with its lifetime erased; see the SAFETY note in [`Pool::run`].
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync));
// SAFETY: the pointee is `Sync`, and `Pool::run` keeps it alive until every worker is done.
unsafe impl Send for JobPtr {}

struct State {
    /// Bumped for every job; a worker runs each epoch once.
    epoch: u64,
    job: Option<JobPtr>,
    /// Workers with an index below this take part in the current job.
    participants: usize,
    /// Workers that have not yet finished the current epoch.
    running: usize,
    /// A worker's panic payload, handed to the caller.
    panic: Option<Box<dyn Any + Send>>,
    /// Workers spawned so far.
    workers: usize,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
}

/// The process-wide pool.
pub(crate) struct Pool {
    shared: &'static Shared,
    /// Held by the caller whose job the workers run.
    busy: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a job is caught before any lock is held, so poisoning carries no
    // broken invariant: take the guard.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pool shared by every `SimdCpu`.
pub(crate) fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::new)
}

/// Threads this machine runs at once.
pub(crate) fn hardware_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Pool {
    /// A pool with no workers yet (they are spawned by the first job that wants them; their
    /// shared state lives as long as they do, for the rest of the process).
    fn new() -> Self {
        Pool {
            shared: Box::leak(Box::new(Shared {
                state: Mutex::new(State {
                    epoch: 0,
                    job: None,
                    participants: 0,
                    running: 0,
                    panic: None,
                    workers: 0,
                }),
                wake: Condvar::new(),
                done: Condvar::new(),
            })),
            busy: Mutex::new(()),
        }
    }

    /// Runs `job` on the caller (index 0) and up to `threads − 1` workers (indices 1..), and
    /// returns when all are done. A panic in any of them is re-raised here.
    pub(crate) fn run(&self, threads: usize, job: &(dyn Fn(usize) + Sync)) {
        if threads <= 1 {
            return job(0);
        }
        let busy = match self.busy.try_lock() {
            Ok(g) => g,
            // A panic re-raised below releases `busy` first, so this is not expected; but a
            // poisoned `busy` protects nothing (it guards no data) and must not leave every
            // later job on one thread.
            Err(TryLockError::Poisoned(p)) => {
                self.busy.clear_poison();
                p.into_inner()
            }
            // Another caller has the workers: run alone rather than wait.
            Err(TryLockError::WouldBlock) => return job(0),
        };
        let helpers = threads - 1;
        self.grow(helpers);
        // SAFETY: the erased `'static` lifetime is never relied on: this function does not
        // return (normally or by unwinding, since the caller's part is caught) before
        // `running` is back to 0, and a worker stops touching the job before decrementing it.
        let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            core::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                job,
            )
        };
        let sh = self.shared;
        {
            let mut st = lock(&sh.state);
            st.job = Some(JobPtr(erased));
            st.participants = helpers;
            st.running = st.workers;
            st.epoch += 1;
            sh.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let theirs = {
            let mut st = lock(&sh.state);
            while st.running > 0 {
                st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.job = None;
            st.panic.take()
        };
        // Release the workers before re-raising a panic, so the unwinding does not poison it.
        drop(busy);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }

    /// Spawns workers until there are at least `n`.
    fn grow(&self, n: usize) {
        let sh = self.shared;
        let mut st = lock(&sh.state);
        while st.workers < n {
            let index = st.workers;
            let seen = st.epoch;
            let spawned = std::thread::Builder::new()
                .name(format!("sage-cpu-{}", index + 1))
                .spawn(move || worker(sh, index, seen));
            if spawned.is_err() {
                // No more threads: the job still completes with those there are.
                break;
            }
            st.workers += 1;
        }
    }
}

fn worker(sh: &'static Shared, index: usize, mut seen: u64) {
    loop {
        let (job, take_part) = {
            let mut st = lock(&sh.state);
            while st.epoch == seen {
                st = sh.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            seen = st.epoch;
            (st.job, index < st.participants)
        };
        let mut panic = None;
        if let (Some(JobPtr(f)), true) = (job, take_part) {
            // SAFETY: `Pool::run` keeps the closure alive until `running` reaches 0, which
            // cannot happen before this worker decrements it below.
            let f = unsafe { &*f };
            panic = catch_unwind(AssertUnwindSafe(|| f(index + 1))).err();
        }
        let mut st = lock(&sh.state);
        if panic.is_some() && st.panic.is_none() {
            st.panic = panic;
        }
        st.running -= 1;
        if st.running == 0 {
            sh.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Runs a job on `threads` threads in which each participant waits (up to 10 s) until all
    /// `threads` have arrived; returns the participants' indices. A pool that runs the job on
    /// fewer threads returns fewer after the wait.
    fn participants(pool: &Pool, threads: usize) -> BTreeSet<usize> {
        let arrived = AtomicUsize::new(0);
        let seen = Mutex::new(BTreeSet::new());
        pool.run(threads, &|i| {
            lock(&seen).insert(i);
            arrived.fetch_add(1, Ordering::SeqCst);
            let t0 = Instant::now();
            while arrived.load(Ordering::SeqCst) < threads && t0.elapsed() < Duration::from_secs(10)
            {
                std::thread::yield_now();
            }
        });
        seen.into_inner().unwrap()
    }

    /// After a job that panics — in the caller's part or in a worker's — the panic reaches
    /// the caller, and the next job runs on every thread again. (Before, the panic poisoned
    /// the pool's lock and every later job ran on the caller alone, silently.)
    #[test]
    fn a_panicking_job_leaves_every_thread_working() {
        let pool = Pool::new();
        let threads = 4;
        let all: BTreeSet<usize> = (0..threads).collect();
        assert_eq!(participants(&pool, threads), all);
        for culprit in [0, 2, 0, 3] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(threads, &|i| {
                    if i == culprit {
                        panic!("planted panic in participant {i}");
                    }
                })
            }));
            let payload = r.expect_err("the panic reaches the caller");
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert!(msg.contains(&format!("participant {culprit}")), "{msg}");
            assert!(!pool.busy.is_poisoned(), "after a panic in {culprit}");
            assert_eq!(
                participants(&pool, threads),
                all,
                "after a panic in participant {culprit}"
            );
        }
        // A poisoned lock (as the old code left it) is recovered from, not obeyed.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let _g = pool.busy.lock();
            panic!("poison it");
        }));
        assert!(pool.busy.is_poisoned());
        assert_eq!(participants(&pool, threads), all);
        assert!(!pool.busy.is_poisoned());
    }
}
