//! Lua worker threads: a fixed number of OS threads taking jobs from one bounded queue and
//! giving each to the handler the workers were started with. A job runs to completion on
//! the thread that took it; a panicking handler is contained and the thread goes on. The
//! queue bound is the only place jobs wait; a job refused is handed back to the caller.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Why a job was not queued; it comes back with the error.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds its maximum number of jobs.
    #[error("the worker queue is full")]
    Full,
    /// The workers have been stopped.
    #[error("the workers have stopped")]
    Stopped,
}

/// A fixed set of worker threads.
pub struct Workers<J> {
    sender: Mutex<Option<Sender<J>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    panics: Arc<AtomicUsize>,
}

impl<J: Send + 'static> std::fmt::Debug for Workers<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("queued", &self.queued())
            .finish()
    }
}

impl<J: Send + 'static> Workers<J> {
    /// Starts `count` threads (at least one) with `stack` bytes of stack each, sharing a
    /// queue of at most `queue` waiting jobs, each job given to `handler`.
    pub fn start<H>(count: usize, queue: usize, stack: usize, handler: H) -> io::Result<Workers<J>>
    where
        H: Fn(J) + Send + Sync + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded::<J>(queue.max(1));
        let panics = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let rx: Receiver<J> = rx.clone();
            let panics = panics.clone();
            let handler = handler.clone();
            let handle = std::thread::Builder::new()
                .name(format!("lua-{i}"))
                .stack_size(stack)
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if catch_unwind(AssertUnwindSafe(|| handler(job))).is_err() {
                            panics.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })?;
            threads.push(handle);
        }
        Ok(Workers {
            sender: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            panics,
        })
    }

    /// Queues a job without waiting; a refused job comes back.
    pub fn submit(&self, job: J) -> Result<(), (SubmitError, J)> {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = sender.as_ref() else {
            return Err((SubmitError::Stopped, job));
        };
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(j)) => Err((SubmitError::Full, j)),
            Err(TrySendError::Disconnected(j)) => Err((SubmitError::Stopped, j)),
        }
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        sender.as_ref().map_or(0, |s| s.len())
    }

    /// Jobs that panicked (each one a bug; the thread survived it).
    pub fn panics(&self) -> usize {
        self.panics.load(Ordering::Relaxed)
    }

    /// Refuses new jobs, lets the queued ones finish and joins the threads.
    pub fn join(&self) {
        drop(self.sender.lock().unwrap_or_else(|e| e.into_inner()).take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    type Job = Box<dyn FnOnce() + Send>;

    fn start(count: usize, queue: usize) -> Workers<Job> {
        Workers::start(count, queue, 1 << 20, |j: Job| j()).unwrap()
    }

    #[test]
    fn runs_jobs_and_survives_panics() {
        let w = start(2, 8);
        let (tx, rx) = mpsc::channel();
        w.submit(Box::new(|| panic!("job bug"))).unwrap();
        for i in 0..4 {
            let tx = tx.clone();
            w.submit(Box::new(move || tx.send(i).unwrap())).unwrap();
        }
        let mut got: Vec<i32> = (0..4).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        w.join();
    }

    #[test]
    fn full_queue_is_refused() {
        let w = start(1, 1);
        let (block_tx, block_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        w.submit(Box::new(move || {
            started_tx.send(()).unwrap();
            block_rx.recv().unwrap();
        }))
        .unwrap();
        started_rx.recv().unwrap();
        w.submit(Box::new(|| {})).unwrap();
        let refused = w.submit(Box::new(|| {}));
        assert!(matches!(refused, Err((SubmitError::Full, _))));
        block_tx.send(()).unwrap();
        w.join();
    }
}
