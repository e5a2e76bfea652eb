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

use crate::engine::RESUME_READING_BELOW;
use crate::socket::Socket;
use crate::wakeup::Wakeup;

/// What happened to a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload {
    /// An upgrade request waiting for `handle_open`'s verdict. Boxed: it is
    /// rare and large, and every queued event has the size of the largest
    /// variant.
    Open(Box<OpenRequest>),
    /// A text message; the bytes are valid UTF-8.
    Text(Vec<u8>),
    Binary(Vec<u8>),
    /// The connection is gone; `handle_close` must run.
    Close,
}

/// The upgrade request `handle_open` is asked about.
#[derive(Debug, PartialEq, Eq)]
pub struct OpenRequest {
    pub ip: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Something a worker's handlers must see, in the order it happened.
pub struct Event {
    socket: Arc<Socket>,
    pub payload: Payload,
}

impl Event {
    pub fn socket_id(&self) -> u64 {
        self.socket.id
    }
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

    /// Queues an event for `socket`, which must be pinned to this worker.
    pub(crate) fn push(&self, socket: &Arc<Socket>, payload: Payload) {
        socket.event_queued();
        self.depth.fetch_add(1, Ordering::Relaxed);
        let mut events = self.events.lock();
        let was_empty = events.is_empty();
        events.push(Event {
            socket: socket.clone(),
            payload,
        });
        if was_empty {
            self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        drop(events);
        if was_empty {
            self.wakeup.signal();
        }
    }

    /// Wakes an idle worker as if an event waited, so that a worker stuck in a
    /// handler shows as stalled even when its connections are quiet.
    pub fn probe(&self) {
        let events = self.events.lock();
        if events.is_empty() && self.waiting_since_ms.load(Ordering::Relaxed) == 0 {
            self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
            drop(events);
            self.wakeup.signal();
        }
    }

    /// Takes every waiting event, oldest first. They count as handled from
    /// here on: the worker runs synchronous handlers at once and reports
    /// the events it keeps waiting or awaiting with [`hold`](Self::hold).
    pub fn drain(&self) -> Vec<Event> {
        self.drain_at_most(usize::MAX)
    }

    /// Like [`drain`](Self::drain), but takes at most `max` events; if more
    /// wait, the wakeup stays signalled for the rest. A worker that drains
    /// in bounded batches keeps its own memory bounded when thousands of
    /// connections send at once.
    pub fn drain_at_most(&self, max: usize) -> Vec<Event> {
        self.wakeup.clear();
        let (events, more) = {
            let mut events = self.events.lock();
            if events.len() <= max {
                self.waiting_since_ms.store(0, Ordering::Relaxed);
                (std::mem::take(&mut *events), false)
            } else {
                // The worker is alive now: the rest waits from here on.
                self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
                let rest = events.split_off(max);
                (std::mem::replace(&mut *events, rest), true)
            }
        };
        if more {
            self.wakeup.signal();
        }
        for event in &events {
            event.socket.event_finished(RESUME_READING_BELOW);
        }
        self.depth.fetch_sub(events.len(), Ordering::Relaxed);
        events
    }

    /// An event of `socket` (if still open) is waiting behind another or
    /// being awaited: it counts against the connection's backlog and the
    /// queue depth until [`release`](Self::release).
    pub fn hold(&self, socket: Option<&Socket>) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        if let Some(socket) = socket {
            socket.event_queued();
        }
    }

    pub fn release(&self, socket: Option<&Socket>) {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        if let Some(socket) = socket {
            socket.event_finished(RESUME_READING_BELOW);
        }
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
        let socket = Arc::new(Socket::new(1, q.clone(), 1 << 20));
        q.push(&socket, Payload::Text(b"a".to_vec()));
        q.push(&socket, Payload::Close);
        assert_eq!((q.queue_depth(), socket.inflight()), (2, 2));
        let mut fds = libc::pollfd {
            fd: q.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 1);
        let events = q.drain();
        let payloads: Vec<&Payload> = events.iter().map(|e| &e.payload).collect();
        assert_eq!(
            payloads,
            vec![&Payload::Text(b"a".to_vec()), &Payload::Close]
        );
        assert_eq!(events[0].socket_id(), 1);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 0);
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        q.hold(Some(&socket));
        assert_eq!((q.queue_depth(), socket.inflight()), (1, 1));
        q.release(Some(&socket));
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }

    /// Events wait in the queue by the thousand under load: keep them small.
    #[test]
    fn events_stay_small() {
        assert!(std::mem::size_of::<Event>() <= 40);
    }

    #[test]
    fn a_bounded_drain_leaves_the_rest_signalled() {
        let workers = Workers::default();
        let q = workers.add().unwrap();
        let socket = Arc::new(Socket::new(1, q.clone(), 1 << 20));
        for i in 0..5u8 {
            q.push(&socket, Payload::Text(vec![i]));
        }
        let mut fds = libc::pollfd {
            fd: q.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let texts = |events: Vec<Event>| -> Vec<Payload> {
            events.into_iter().map(|e| e.payload).collect()
        };
        let first = texts(q.drain_at_most(3));
        assert_eq!(
            first,
            (0..3u8).map(|i| Payload::Text(vec![i])).collect::<Vec<_>>()
        );
        assert_eq!((q.queue_depth(), socket.inflight()), (2, 2));
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 1, "still signalled");
        let rest = texts(q.drain_at_most(3));
        assert_eq!(
            rest,
            (3..5u8).map(|i| Payload::Text(vec![i])).collect::<Vec<_>>()
        );
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 0);
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }

    #[test]
    fn a_probe_makes_an_idle_queue_look_waiting() {
        let workers = Workers::default();
        let q = workers.add().unwrap();
        q.probe();
        std::thread::sleep(Duration::from_millis(20));
        assert!(q.stalled_for() >= Duration::from_millis(10));
        assert!(q.drain().is_empty());
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }
}
