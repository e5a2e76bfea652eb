//! Worker queues: how events reach the worker threads.
//!
//! I/O threads push events onto the queue of the connection's worker; the
//! first event into an empty queue signals the worker's wakeup descriptor, and
//! the worker drains everything queued in one go. A busy worker therefore pays
//! one wakeup for a whole batch. An I/O thread that batches its wake-ups (see
//! [`flush_wakeups`]) holds that signal back until it runs out of work or the
//! queue holds [`WAKE_AT`] events, so a worker sharing its core is not woken
//! (and switched to) for every few events of one pass over ready connections.
//!
//! Also the flow control between a connection's reader and its worker (the
//! thresholds below, and [`Backlog`], which a connection implements).
//!
//! The connections it queues events for are seen through [`Backlog`], and
//! the types here are generic over them (`socket` names the instances the
//! crate uses, for its `Socket`), so the queues sit below the sockets.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::clock::{self, now_ms};
use crate::presence::Change;
use crate::verdict::OpenRequest;
use crate::wakeup::Wakeup;

/// At this many outstanding events a connection stops being read, and frames
/// already read but not decoded stay so.
pub(crate) const PAUSE_READING_AT: u32 = 64;
/// A paused connection resumes once its outstanding events are down to this
/// many: it then gets a batch's worth of room, not a wakeup per event.
pub(crate) const RESUME_READING_AT: u32 = 32;

/// A queue this many events long wakes its worker at once, even from a
/// thread that batches its wake-ups: the worker's wait stays bounded while
/// an I/O thread works through thousands of ready connections.
pub(crate) const WAKE_AT: usize = 64;

/// The most events a worker queue's buffer keeps room for once it is empty
/// (48 bytes each, 3 MiB): a backlog of one event per connection of a busy
/// server fits and is never reallocated, while the buffer of a rare larger
/// burst does not stay allocated.
const RETAINED_EVENTS: usize = 65_536;

thread_local! {
    /// On a thread that batches its wake-ups: the wakeups it owes, signalled
    /// by [`flush_wakeups`]. `None` on the others: a push signals at once.
    static OWED: RefCell<Option<Vec<Arc<Wakeup>>>> = const { RefCell::new(None) };
}

/// Signals the wakeups this thread's pushes owe, and batches its pushes
/// from now on: they wake their workers at the next call (or at [`WAKE_AT`]
/// events). For the I/O threads, before they park and when they end: a
/// thread that never calls it (a blocking-pool thread, a worker) signals at
/// once.
pub fn flush_wakeups() {
    let owed = OWED.with(|owed| std::mem::take(owed.borrow_mut().get_or_insert_with(Vec::new)));
    for wakeup in owed {
        wakeup.signal();
    }
}

/// The connection an event belongs to, as its worker queue sees it: an id,
/// and a count of its events not yet handled that paces its reader (see
/// [`PAUSE_READING_AT`]).
pub trait Backlog: Send + Sync {
    fn id(&self) -> u64;
    /// One more event outstanding.
    fn event_queued(&self);
    /// One event finished; a paused connection resumes reading once
    /// [`RESUME_READING_AT`] are outstanding.
    fn event_finished(&self);
}

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
    /// A member became present in a channel or left it, through a track,
    /// untrack or close of this connection or of a virtual socket resolving
    /// to it: `handle_presence` must run. Boxed, as `Open`: rare.
    Presence(Box<Change>),
}

/// Something a worker's handlers must see, in the order it happened.
pub struct Event<S> {
    socket: Arc<S>,
    pub payload: Payload,
    /// When the frame (or the upgrade request, or the end of the connection)
    /// was read: the start of the queue wait the metrics report.
    pub read_at: ReadAt,
}

impl<S: Backlog> Event<S> {
    pub fn socket_id(&self) -> u64 {
        self.socket.id()
    }
}

/// A moment on the process's clock (`clock`) in microseconds, wrapping
/// every 71 minutes: 4 bytes in every queued event rather than an `Instant`'s 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAt(u32);

impl ReadAt {
    /// One clock read: a connection takes it once per read, for all the
    /// frames that read brought.
    pub fn now() -> Self {
        // Truncation is the wrap-around.
        ReadAt(clock::elapsed().as_micros() as u32)
    }

    /// Time from `self` to `later`; right for spans under 71 minutes.
    pub fn until(self, later: ReadAt) -> Duration {
        Duration::from_micros(u64::from(later.0.wrapping_sub(self.0)))
    }

    /// The moment as microseconds on the clock (wrapping), for a caller that
    /// carries it outside the engine and hands it back to [`ReadAt::from_micros`].
    pub fn micros(self) -> u32 {
        self.0
    }

    /// The moment [`ReadAt::micros`] gave.
    pub fn from_micros(micros: u32) -> Self {
        ReadAt(micros)
    }
}

/// The queue of one worker thread.
pub struct WorkerQueue<S> {
    id: u32,
    /// Plain mutex around a ring buffer: pushes and drains are a few
    /// instructions each (a drain moves at most a batch), so contention stays
    /// short. The buffer is kept from batch to batch, up to
    /// [`RETAINED_EVENTS`]: a queue that handed its buffer over with each
    /// batch, or split it, allocated one of another size for every batch,
    /// and the freed ones of all sizes were left as holes in the heap,
    /// resident (docs/benchmarks.md, "Over-aligned allocations and the
    /// worker queue's buffers").
    events: Mutex<VecDeque<Event<S>>>,
    /// Shared with the I/O threads' lists of owed wakeups.
    wakeup: Arc<Wakeup>,
    /// Events handed to this worker whose handlers have not finished yet.
    depth: AtomicUsize,
    /// The sockets of the events last drained: they count as outstanding
    /// until [`settle`](WorkerQueue::settle), when the worker has run them or
    /// held the ones it keeps. Otherwise a connection whose events the worker
    /// is about to hold would look caught up, and be read meanwhile.
    unsettled: Mutex<Vec<Arc<S>>>,
    /// Open connections pinned to this worker.
    connections: AtomicUsize,
    /// When the oldest event still in `events` was queued (0: queue empty).
    /// This is the hang signal: a live worker drains long before it ages.
    waiting_since_ms: AtomicU64,
}

impl<S: Backlog> WorkerQueue<S> {
    fn new(id: u32) -> io::Result<Self> {
        Ok(WorkerQueue {
            id,
            events: Mutex::new(VecDeque::new()),
            wakeup: Arc::new(Wakeup::new()?),
            depth: AtomicUsize::new(0),
            unsettled: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            waiting_since_ms: AtomicU64::new(0),
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
    pub(crate) fn push(&self, socket: &Arc<S>, payload: Payload, read_at: ReadAt) {
        socket.event_queued();
        self.depth.fetch_add(1, Ordering::Relaxed);
        let mut events = self.events.lock();
        let was_empty = events.is_empty();
        events.push_back(Event {
            socket: socket.clone(),
            payload,
            read_at,
        });
        let len = events.len();
        if was_empty {
            self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        drop(events);
        if self.wake_now(was_empty, len) {
            self.wakeup.signal();
        }
    }

    /// Whether a push that left `len` events (`was_empty` before it) signals
    /// the worker now. On a thread that batches its wake-ups, the first event
    /// makes the worker owed a wakeup instead, until [`WAKE_AT`] events wait.
    fn wake_now(&self, was_empty: bool, len: usize) -> bool {
        OWED.with(|owed| {
            let mut owed = owed.borrow_mut();
            let Some(owed) = owed.as_mut() else {
                return was_empty;
            };
            let at = owed.iter().position(|w| Arc::ptr_eq(w, &self.wakeup));
            match at {
                Some(i) if len >= WAKE_AT => {
                    owed.swap_remove(i);
                    true
                }
                None if was_empty => {
                    owed.push(self.wakeup.clone());
                    false
                }
                _ => false,
            }
        })
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
    /// the next [`settle`](Self::settle) (or drain) on: the worker runs
    /// synchronous handlers at once and reports the events it keeps waiting
    /// or awaiting with [`hold`](Self::hold) before it settles.
    pub fn drain(&self) -> Vec<Event<S>> {
        let mut events = Vec::new();
        self.drain_at_most(usize::MAX, &mut events);
        events
    }

    /// Like [`drain`](Self::drain), but takes at most `max` events, appended
    /// to `batch` (a worker passes the same buffer every time, so draining
    /// allocates nothing); if more wait, the wakeup stays signalled for the
    /// rest. A worker that drains in bounded batches keeps its own memory
    /// bounded when thousands of connections send at once.
    pub fn drain_at_most(&self, max: usize, batch: &mut Vec<Event<S>>) {
        self.settle();
        self.wakeup.clear();
        let start = batch.len();
        let more = {
            let mut events = self.events.lock();
            let take = events.len().min(max);
            batch.extend(events.drain(..take));
            let more = !events.is_empty();
            if more {
                // The worker is alive now: the rest waits from here on.
                self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
            } else {
                self.waiting_since_ms.store(0, Ordering::Relaxed);
                if events.capacity() > RETAINED_EVENTS {
                    *events = VecDeque::new();
                }
            }
            more
        };
        if more {
            self.wakeup.signal();
        }
        self.unsettled
            .lock()
            .extend(batch[start..].iter().map(|e| e.socket.clone()));
    }

    /// The events last drained are run, or held: they stop counting.
    pub fn settle(&self) {
        let mut batch = std::mem::take(&mut *self.unsettled.lock());
        for socket in &batch {
            socket.event_finished();
        }
        self.depth.fetch_sub(batch.len(), Ordering::Relaxed);
        batch.clear();
        // Only the worker drains and settles: give the buffer back for the
        // next batch rather than growing a new one.
        let mut unsettled = self.unsettled.lock();
        if unsettled.is_empty() {
            *unsettled = batch;
        }
    }

    /// An event of `socket` (if still open) is waiting behind another or
    /// being awaited: it counts against the connection's backlog and the
    /// queue depth until [`release`](Self::release).
    pub fn hold(&self, socket: Option<&S>) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        if let Some(socket) = socket {
            socket.event_queued();
        }
    }

    pub fn release(&self, socket: Option<&S>) {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        if let Some(socket) = socket {
            socket.event_finished();
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
}

/// The live workers of a server and the round-robin cursor over them.
pub struct Workers<S> {
    list: RwLock<Vec<Arc<WorkerQueue<S>>>>,
    next: AtomicUsize,
    next_id: AtomicU32,
}

// Not derived: that would ask for `S: Default`.
impl<S> Default for Workers<S> {
    fn default() -> Self {
        Workers {
            list: RwLock::default(),
            next: AtomicUsize::new(0),
            next_id: AtomicU32::new(0),
        }
    }
}

impl<S: Backlog> Workers<S> {
    /// Creates and registers a new worker queue.
    pub fn add(&self) -> io::Result<Arc<WorkerQueue<S>>> {
        let queue = Arc::new(WorkerQueue::new(
            self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        )?);
        self.list.write().push(queue.clone());
        Ok(queue)
    }

    /// Takes a worker out of the rotation; it gets no new connections.
    pub fn retire(&self, id: u32) -> Option<Arc<WorkerQueue<S>>> {
        let mut list = self.list.write();
        let index = list.iter().position(|w| w.id == id)?;
        Some(list.remove(index))
    }

    /// The next worker in round-robin order, if any is live.
    pub fn pick(&self) -> Option<Arc<WorkerQueue<S>>> {
        let list = self.list.read();
        if list.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(list[n % list.len()].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection as its queue sees it.
    struct Conn {
        id: u64,
        inflight: AtomicU32,
    }

    impl Conn {
        fn new(id: u64) -> Arc<Self> {
            Arc::new(Conn {
                id,
                inflight: AtomicU32::new(0),
            })
        }

        fn inflight(&self) -> u32 {
            self.inflight.load(Ordering::Relaxed)
        }
    }

    impl Backlog for Conn {
        fn id(&self) -> u64 {
            self.id
        }
        fn event_queued(&self) {
            self.inflight.fetch_add(1, Ordering::Relaxed);
        }
        fn event_finished(&self) {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn round_robin_skips_retired_workers() {
        let workers = Workers::<Conn>::default();
        let a = workers.add().unwrap();
        let b = workers.add().unwrap();
        let picks: Vec<u32> = (0..4).map(|_| workers.pick().unwrap().id()).collect();
        assert_eq!(picks, vec![a.id(), b.id(), a.id(), b.id()]);
        assert!(workers.retire(a.id()).is_some());
        assert!(workers.retire(a.id()).is_none());
        assert!((0..3).all(|_| workers.pick().unwrap().id() == b.id()));
        workers.retire(b.id());
        assert!(workers.pick().is_none());
    }

    #[test]
    fn drain_returns_events_in_order_and_clears_the_wakeup() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let socket = Conn::new(1);
        q.push(&socket, Payload::Text(b"a".to_vec()), ReadAt::now());
        q.push(&socket, Payload::Close, ReadAt::now());
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
        // Drained events count until the worker settles them, after its holds.
        assert_eq!((q.queue_depth(), socket.inflight()), (2, 2));
        q.hold(Some(&*socket));
        q.settle();
        assert_eq!((q.queue_depth(), socket.inflight()), (1, 1));
        q.release(Some(&*socket));
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        q.hold(Some(&*socket));
        assert_eq!((q.queue_depth(), socket.inflight()), (1, 1));
        q.release(Some(&*socket));
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }

    /// Events wait in the queue by the thousand under load: keep them small
    /// (the socket, the payload and its tag, the read time).
    #[test]
    fn events_stay_small() {
        assert!(std::mem::size_of::<Event<Conn>>() <= 48);
    }

    #[test]
    fn read_at_measures_across_the_wrap() {
        let before = ReadAt(u32::MAX - 9);
        assert_eq!(before.until(ReadAt(10)), Duration::from_micros(20));
        let now = ReadAt::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now.until(ReadAt::now()) >= Duration::from_millis(2));
    }

    #[test]
    fn a_bounded_drain_leaves_the_rest_signalled() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let socket = Conn::new(1);
        for i in 0..5u8 {
            q.push(&socket, Payload::Text(vec![i]), ReadAt::now());
        }
        let mut fds = libc::pollfd {
            fd: q.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let texts = |events: Vec<Event<Conn>>| -> Vec<Payload> {
            events.into_iter().map(|e| e.payload).collect()
        };
        let first = texts(drain_at_most(&q, 3));
        assert_eq!(
            first,
            (0..3u8).map(|i| Payload::Text(vec![i])).collect::<Vec<_>>()
        );
        assert_eq!((q.queue_depth(), socket.inflight()), (5, 5));
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 1, "still signalled");
        // A drain settles the batch before.
        let rest = texts(drain_at_most(&q, 3));
        assert_eq!(
            rest,
            (3..5u8).map(|i| Payload::Text(vec![i])).collect::<Vec<_>>()
        );
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 0) }, 0);
        assert_eq!((q.queue_depth(), socket.inflight()), (2, 2));
        q.settle();
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }

    #[test]
    fn the_queue_keeps_its_buffer_between_batches_but_not_after_a_burst() {
        assert!(std::mem::size_of::<Event<Conn>>() <= 48);
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let socket = Conn::new(1);
        let capacity = |q: &WorkerQueue<Conn>| q.events.lock().capacity();
        for i in 0..3000u32 {
            q.push(
                &socket,
                Payload::Text(i.to_le_bytes().to_vec()),
                ReadAt::now(),
            );
        }
        let grown = capacity(&q);
        let mut seen = 0u32;
        let mut batch = Vec::new();
        while seen < 3000 {
            q.drain_at_most(1024, &mut batch);
            assert!(batch.len() <= 1024 && !batch.is_empty());
            for event in batch.drain(..) {
                assert_eq!(event.payload, Payload::Text(seen.to_le_bytes().to_vec()));
                seen += 1;
            }
            // Drained in place: the queue neither gave its buffer away nor grew a new one.
            assert_eq!(capacity(&q), grown);
            q.settle();
        }
        assert_eq!((q.queue_depth(), socket.inflight()), (0, 0));
        for _ in 0..(RETAINED_EVENTS + 1) {
            q.push(&socket, Payload::Close, ReadAt::now());
        }
        while !drain_at_most(&q, 1024).is_empty() {
            q.settle();
        }
        assert_eq!(capacity(&q), 0, "a burst's buffer is freed once drained");
    }

    fn drain_at_most(q: &WorkerQueue<Conn>, max: usize) -> Vec<Event<Conn>> {
        let mut batch = Vec::new();
        q.drain_at_most(max, &mut batch);
        batch
    }

    fn readable(q: &WorkerQueue<Conn>) -> bool {
        let mut fds = libc::pollfd {
            fd: q.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut fds, 1, 0) == 1 }
    }

    #[test]
    fn a_batching_thread_wakes_its_workers_when_it_flushes_or_at_wake_at() {
        let workers = Workers::<Conn>::default();
        let (q, other) = (workers.add().unwrap(), workers.add().unwrap());
        let socket = Conn::new(1);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Signals nothing owed yet; batches from here on.
                flush_wakeups();
                q.push(&socket, Payload::Close, ReadAt::now());
                other.push(&socket, Payload::Close, ReadAt::now());
                assert!(!readable(&q) && !readable(&other));
                flush_wakeups();
                assert!(readable(&q) && readable(&other));
                q.drain();
                other.drain();
                for i in 1..=WAKE_AT {
                    q.push(&socket, Payload::Close, ReadAt::now());
                    assert_eq!(readable(&q), i == WAKE_AT, "{i} events");
                }
                q.drain();
                // Owed nothing: the wakeup went out at WAKE_AT.
                flush_wakeups();
                assert!(!readable(&q));
            });
        });
        // Other threads signal at once.
        q.push(&socket, Payload::Close, ReadAt::now());
        assert!(readable(&q));
    }

    #[test]
    fn a_probe_makes_an_idle_queue_look_waiting() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        q.probe();
        std::thread::sleep(Duration::from_millis(20));
        assert!(q.stalled_for() >= Duration::from_millis(10));
        assert!(q.drain().is_empty());
        assert_eq!(q.stalled_for(), Duration::ZERO);
    }
}
