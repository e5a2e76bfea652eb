//! Worker queues: how events reach the worker threads.
//!
//! I/O threads push events onto the queue of the connection's worker; the
//! first event into an empty queue signals the worker's wakeup descriptor, and
//! the worker drains everything queued in one go. A busy worker therefore pays
//! one wakeup for a whole batch.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::wakeup::Wakeup;

/// Something a worker's handlers must see, in the order it happened.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An upgrade request waiting for `handle_open`'s verdict.
    Open {
        id: u64,
        ip: String,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A text message; `data` is valid UTF-8.
    Text {
        id: u64,
        data: Vec<u8>,
    },
    Binary {
        id: u64,
        data: Vec<u8>,
    },
    /// The connection is gone; `handle_close` must run.
    Close {
        id: u64,
    },
    /// Liveness probe: makes an idle queue non-empty so a worker that stopped
    /// draining shows as stalled. Never reaches a handler.
    Probe,
}

/// Milliseconds on a process-wide monotonic clock; 0 is reserved for "never".
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The queue of one worker thread.
pub struct WorkerQueue {
    id: u32,
    /// Plain mutex around a Vec: pushes and drains are a few instructions
    /// each, and a drain swaps the whole Vec out, so contention stays short.
    events: Mutex<Vec<Event>>,
    wakeup: Wakeup,
    /// Events handed to this worker whose handlers have not finished yet.
    depth: AtomicUsize,
    /// Open connections pinned to this worker.
    connections: AtomicUsize,
    /// When the oldest event still in `events` was queued (0: queue empty).
    /// This is the hang signal: a live worker drains long before it ages.
    waiting_since_ms: AtomicU64,
    retired: AtomicBool,
}

impl WorkerQueue {
    fn new(id: u32) -> io::Result<Self> {
        Ok(WorkerQueue {
            id,
            events: Mutex::new(Vec::new()),
            wakeup: Wakeup::new()?,
            depth: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            waiting_since_ms: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The descriptor that turns readable when events are waiting.
    pub fn fd(&self) -> i32 {
        self.wakeup.fd()
    }

    pub fn push(&self, event: Event) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.enqueue(event);
    }

    /// Queues a [`Event::Probe`] if nothing is waiting, so that a worker stuck
    /// in a handler is seen as stalled even when its connections are quiet.
    pub fn probe(&self) {
        if self.events.lock().is_empty() {
            self.enqueue(Event::Probe);
        }
    }

    fn enqueue(&self, event: Event) {
        let mut events = self.events.lock();
        let was_empty = events.is_empty();
        events.push(event);
        if was_empty {
            self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        drop(events);
        if was_empty {
            self.wakeup.signal();
        }
    }

    /// Takes every waiting event, oldest first.
    pub fn drain(&self) -> Vec<Event> {
        self.wakeup.clear();
        let mut events = self.events.lock();
        self.waiting_since_ms.store(0, Ordering::Relaxed);
        std::mem::take(&mut *events)
    }

    /// `count` events finished their handlers.
    pub fn finished(&self, count: usize) {
        self.depth.fetch_sub(count, Ordering::Relaxed);
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// How long the oldest waiting event has waited for the worker.
    pub fn stalled_for(&self) -> Duration {
        match self.waiting_since_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(now_ms().saturating_sub(since)),
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// The live workers of a server and the round-robin cursor over them.
#[derive(Default)]
pub struct Workers {
    list: RwLock<Vec<Arc<WorkerQueue>>>,
    next: AtomicUsize,
    next_id: AtomicU32,
}

impl Workers {
    /// Creates and registers a new worker queue.
    pub fn add(&self) -> io::Result<Arc<WorkerQueue>> {
        let queue = Arc::new(WorkerQueue::new(
            self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        )?);
        self.list.write().push(queue.clone());
        Ok(queue)
    }

    /// Takes a worker out of the rotation; it gets no new connections.
    pub fn retire(&self, id: u32) -> Option<Arc<WorkerQueue>> {
        let mut list = self.list.write();
        let index = list.iter().position(|w| w.id == id)?;
        let queue = list.remove(index);
        queue.retired.store(true, Ordering::Relaxed);
        Some(queue)
    }

    /// The next worker in round-robin order, if any is live.
    pub fn pick(&self) -> Option<Arc<WorkerQueue>> {
        let list = self.list.read();
        if list.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(list[n % list.len()].clone())
    }

    pub fn live(&self) -> Vec<Arc<WorkerQueue>> {
        self.list.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_retired_workers() {
        let workers = Workers::default();
        let a = workers.add().unwrap();
        let b = workers.add().unwrap();
        let picks: Vec<u32> = (0..4).map(|_| workers.pick().unwrap().id()).collect();
        assert_eq!(picks, vec![a.id(), b.id(), a.id(), b.id()]);
        workers.retire(a.id());
        assert!(a.is_retired());
        assert!((0..3).all(|_| workers.pick().unwrap().id() == b.id()));
        workers.retire(b.id());
        assert!(workers.pick().is_none());
    }

    #[test]
    fn drain_returns_events_in_order_and_clears_the_wakeup() {
        let workers = Workers::default();
        let q = workers.add().unwrap();
        q.push(Event::Text {
            id: 1,
            data: b"a".to_vec(),
        });
        q.push(Event::Close { id: 1 });
        let mut fds = libc::pollfd {
            fd: q.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 1);
        let events = q.drain();
        assert_eq!(
            events,
            vec![
                Event::Text {
                    id: 1,
                    data: b"a".to_vec()
                },
                Event::Close { id: 1 }
            ]
        );
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 0);
        assert_eq!(q.queue_depth(), 2);
        q.finished(2);
        assert_eq!(q.queue_depth(), 0);
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }
}
