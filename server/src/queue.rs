//! Admission: a bounded queue in front of each model.
//!
//! A model decodes at most `max_seqs` sequences at once (its continuous
//! batch). Sequences beyond that wait here, at most `max_waiting` of them;
//! past that a request is refused at once with 429 rather than piling up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    max_seqs: usize,
    max_waiting: usize,
    waiting: AtomicUsize,
}

/// Seats in the running batch; released when dropped.
pub struct Seats {
    _permit: OwnedSemaphorePermit,
    /// How long the request waited for its seats.
    pub queued_for: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    QueueFull,
    /// The request asks for more sequences than the model ever runs at once.
    TooManySequences { max: usize },
}

impl Admission {
    pub fn new(max_seqs: usize, max_waiting: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_seqs)),
            max_seqs,
            max_waiting,
            waiting: AtomicUsize::new(0),
        }
    }

    pub fn max_seqs(&self) -> usize {
        self.max_seqs
    }

    pub fn running(&self) -> usize {
        self.max_seqs - self.slots.available_permits()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for `n` seats, or refuses when the queue is already full.
    pub async fn admit(&self, n: usize) -> Result<Seats, Refused> {
        if n > self.max_seqs {
            return Err(Refused::TooManySequences { max: self.max_seqs });
        }
        let start = Instant::now();
        if let Ok(permit) = self.slots.clone().try_acquire_many_owned(n as u32) {
            return Ok(Seats {
                _permit: permit,
                queued_for: start.elapsed(),
            });
        }
        // Reserve a place in the queue, or refuse.
        let reserved = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w + n <= self.max_waiting).then_some(w + n)
            });
        if reserved.is_err() {
            return Err(Refused::QueueFull);
        }
        let _leave = LeaveQueue(&self.waiting, n);
        let permit = self
            .slots
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("the admission semaphore is never closed");
        Ok(Seats {
            _permit: permit,
            queued_for: start.elapsed(),
        })
    }
}

/// Leaves the queue even when the waiting request is dropped (client gone).
struct LeaveQueue<'a>(&'a AtomicUsize, usize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_refuses_and_frees_on_release() {
        let admission = Arc::new(Admission::new(1, 1));
        let first = admission.admit(1).await.unwrap();
        assert_eq!(admission.running(), 1);

        let a = admission.clone();
        let waiter = tokio::spawn(async move { a.admit(1).await.map(|_| ()) });
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(admission.admit(1).await.err(), Some(Refused::QueueFull));

        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.running(), 0);
    }

    #[tokio::test]
    async fn more_sequences_than_the_batch_is_refused() {
        let admission = Admission::new(2, 10);
        assert_eq!(
            admission.admit(3).await.err(),
            Some(Refused::TooManySequences { max: 2 })
        );
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let admission = Arc::new(Admission::new(1, 4));
        let _held = admission.admit(1).await.unwrap();
        let a = admission.clone();
        let waiter = tokio::spawn(async move { a.admit(1).await.map(|_| ()) });
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(admission.waiting(), 0);
    }
}
