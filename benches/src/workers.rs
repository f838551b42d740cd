//! Long-lived worker threads for the multi-threaded benches, as a VMM's vCPU threads are:
//! spawning threads for every sample would measure thread start-up and the C allocator's arena
//! assignment instead of the code under test.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// One thread per job. A round hands every job the same argument at once and lasts from the
/// first job's start to the last one's end.
#[derive(Debug)]
pub struct Workers {
    orders: Vec<mpsc::Sender<u64>>,
    spans: mpsc::Receiver<(Instant, Instant)>,
}

impl Workers {
    /// Starts one thread per job; they wait for rounds until the `Workers` is dropped.
    pub fn new(jobs: Vec<Box<dyn Fn(u64) + Send>>) -> Workers {
        let (span_tx, spans) = mpsc::channel();
        let orders = jobs
            .into_iter()
            .map(|job| {
                let (tx, rx) = mpsc::channel::<u64>();
                let span_tx = span_tx.clone();
                thread::spawn(move || {
                    for arg in rx {
                        let start = Instant::now();
                        job(arg);
                        if span_tx.send((start, Instant::now())).is_err() {
                            return;
                        }
                    }
                });
                tx
            })
            .collect();
        Workers { orders, spans }
    }

    /// The number of workers.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether there are no workers.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// Runs every job with `arg` and returns the span from the first start to the last end.
    pub fn round(&self, arg: u64) -> Duration {
        for order in &self.orders {
            order.send(arg).expect("worker alive");
        }
        let spans: Vec<_> = (0..self.orders.len())
            .map(|_| self.spans.recv().expect("worker alive"))
            .collect();
        let first = spans.iter().map(|s| s.0).min().expect("a worker");
        let last = spans.iter().map(|s| s.1).max().expect("a worker");
        last - first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn every_job_runs_once_per_round_with_the_argument() {
        let sum = Arc::new(AtomicU64::new(0));
        let jobs = (0..3)
            .map(|_| {
                let sum = Arc::clone(&sum);
                Box::new(move |arg: u64| {
                    sum.fetch_add(arg, Ordering::Relaxed);
                }) as Box<dyn Fn(u64) + Send>
            })
            .collect();
        let workers = Workers::new(jobs);
        assert_eq!(workers.len(), 3);
        workers.round(5);
        workers.round(7);
        assert_eq!(sum.load(Ordering::Relaxed), 3 * (5 + 7));
    }
}
