//! Graceful shutdown. On SIGTERM (a pod being deleted or rolled) the server
//! turns `/ready` to 503 so the Service stops sending it traffic, refuses new
//! API requests with 503 and `Retry-After` (a client retries on another
//! replica), lets the requests and streams already running finish for up to
//! `listen.shutdown_grace_s`, then stops. The count of running requests
//! lives in the response body (`Tracked`), so a stream counts until its
//! last chunk has gone out, not only until its handler returned.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::web::Bytes;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// One admitted request; dropping it (the response body finished or the
/// client went away) ends it.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Admits a request unless the server is draining.
    pub fn enter(self: &Arc<Self>) -> Option<InFlight> {
        // Counted before the check: a request that passes the check is
        // always seen by `wait_idle`, whichever thread wins the race.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.clone());
        (!self.is_draining()).then_some(guard)
    }

    pub fn begin(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no request is running, at most `grace`; true when none is.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a last request ending
            // in between still wakes this task.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }
}

/// A response body that holds its request's place in the count until the
/// body is done.
pub struct Tracked {
    pub body: BoxBody,
    pub guard: Option<InFlight>,
}

impl MessageBody for Tracked {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.body).poll_next(cx);
        if let Poll::Ready(None) = next {
            this.guard = None;
        }
        next
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the server gracefully");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_refuses_new_requests_and_waits_for_running_ones() {
        let drain = Arc::new(Drain::default());
        let running = drain.enter().expect("admitted before the drain");
        drain.begin();
        assert!(drain.enter().is_none(), "a new request is refused while draining");
        assert_eq!(drain.in_flight(), 1, "the refused one is not counted");
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait_idle(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the running request holds the drain");
        drop(running);
        assert!(waiter.await.unwrap(), "idle once the running request ends");
    }

    #[tokio::test]
    async fn the_grace_period_bounds_the_wait() {
        let drain = Arc::new(Drain::default());
        let _stuck = drain.enter().unwrap();
        drain.begin();
        let started = std::time::Instant::now();
        assert!(!drain.wait_idle(Duration::from_millis(100)).await);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_body_ends_its_request_when_its_last_chunk_is_read() {
        let drain = Arc::new(Drain::default());
        let mut body = Tracked {
            body: BoxBody::new("two chunks"),
            guard: drain.enter(),
        };
        assert_eq!(drain.in_flight(), 1);
        let bytes = actix_web::body::to_bytes(&mut body).await.unwrap();
        assert_eq!(bytes, "two chunks");
        assert_eq!(drain.in_flight(), 0);
    }
}
