//! Worker queues: how events reach the worker threads.
//!
//! I/O threads push events onto the queue of the connection's worker; the
//! first event into an empty queue signals the worker's wakeup descriptor, and
//! the worker drains what is queued turn by turn without waiting again. A
//! busy worker therefore pays one wakeup for a whole batch.
//!
//! Fair turns (docs/api.md, "Fairness and abuse limits"): the queue is a
//! sequence of turns, each holding at most one event of each connection.
//! A connection's next event goes into the turn after its previous one, or
//! into the oldest turn still waiting if that is later, so a connection that
//! queued 64 events fills 64 turns, and one that queues an event after it
//! joins the first of them: it waits behind at most one waiting event of
//! each other connection, and each connection's events keep their order.
//! The worker takes one turn per drain ([`WorkerQueue::drain_turn`]). An I/O thread that batches its wake-ups (see
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
/// a count of its events not yet handled that paces its reader (see
/// [`PAUSE_READING_AT`]), and the turn its next event may take.
pub trait Backlog: Send + Sync {
    fn id(&self) -> u64;
    /// The first turn the connection's next event may go into: one past
    /// the turn of its latest. Read and written only with its worker
    /// queue locked (relaxed is enough); 0 for a new connection.
    fn next_turn(&self) -> &AtomicU64;
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

/// The turns of a worker queue (see the module's notes).
struct Turns<S> {
    /// `rounds[i]` holds the events of turn `head + i`, in the order they
    /// were pushed. Never an empty turn between two others.
    rounds: VecDeque<Vec<Event<S>>>,
    /// Events of the oldest turn whose connections had nothing else
    /// waiting: they go first in it (as a fair queue serves its sparse
    /// flows first), so a quiet connection waits for the turn the worker is
    /// running, not also behind the busy ones' events of the next.
    fresh: Vec<Event<S>>,
    /// The number of the oldest turn still waiting.
    head: u64,
    /// Events in all the turns.
    len: usize,
    /// Emptied turns' buffers, reused for new turns: a flood of one
    /// connection makes a turn per event, and a buffer allocated and freed
    /// for each would churn the heap.
    spare: Vec<Vec<Event<S>>>,
    /// The turn of the latest presence change queued: a later change never
    /// goes into an earlier turn, so the worker sees each (channel,
    /// member)'s changes in the order they happened, as the hub queues them.
    presence_turn: u64,
}

impl<S> Turns<S> {
    fn new() -> Self {
        Turns {
            rounds: VecDeque::new(),
            fresh: Vec::new(),
            head: 0,
            len: 0,
            spare: Vec::new(),
            presence_turn: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Puts `event` in turn `turn`, which is at most one past the last;
    /// `fresh`: its connection has nothing else waiting.
    fn put(&mut self, turn: u64, fresh: bool, event: Event<S>) {
        if fresh && turn == self.head {
            self.fresh.push(event);
            self.len += 1;
            return;
        }
        // Fits: `turn` is at most `head + rounds.len()` (a connection's next
        // turn is one past a turn that was queued), far below usize::MAX.
        let at = usize::try_from(turn - self.head).unwrap_or(usize::MAX);
        while self.rounds.len() <= at {
            let buffer = self.spare.pop().unwrap_or_default();
            self.rounds.push_back(buffer);
        }
        self.rounds[at].push(event);
        self.len += 1;
    }

    /// Moves up to `max` events of the oldest turn to `batch`; the turn is
    /// done once all of its events are taken.
    fn take_turn(&mut self, max: usize, batch: &mut Vec<Event<S>>) {
        // Only when a turn holds more connections than a batch does `max`
        // cut it: the rest of the turn stays first.
        let fresh = self.fresh.len().min(max);
        batch.extend(self.fresh.drain(..fresh));
        self.len -= fresh;
        if !self.fresh.is_empty() {
            shrink_drained(&mut self.fresh);
            return;
        }
        let room = max - fresh;
        if let Some(front) = self.rounds.front_mut() {
            if front.len() > room {
                batch.extend(front.drain(..room));
                self.len -= room;
                shrink_drained(front);
                return;
            }
            self.len -= front.len();
            batch.append(front);
            if let Some(buffer) = self.rounds.pop_front() {
                if self.spare.len() < SPARE_TURNS && buffer.capacity() <= RETAINED_EVENTS {
                    self.spare.push(buffer);
                }
            }
        }
        self.head += 1;
    }

    /// Frees the buffers of a burst once the queue is empty (see
    /// [`RETAINED_EVENTS`]).
    fn trim(&mut self) {
        if self.rounds.capacity() > SPARE_TURNS {
            self.rounds = VecDeque::new();
        }
        let mut kept = 0;
        self.spare.retain(|buffer| {
            kept += buffer.capacity();
            kept <= RETAINED_EVENTS
        });
    }
}

/// A buffer being drained a batch at a time gives back its room beyond twice
/// what it still holds, once that is more than four times (and more than
/// [`KEPT_ROOM`] events): a turn of one event per connection fills a buffer
/// of that size while the next turn fills another, and each kept its full
/// room until emptied, so a closed loop of 10,000 connections held three or
/// four 16,384-event buffers (~2.4 MiB) for ~10,000 events
/// (docs/benchmarks.md, "Issue 29: memory under load"). Shrinking is a
/// `realloc` in place; the batches' hysteresis makes it one per several.
fn shrink_drained<T>(buffer: &mut Vec<T>) {
    let held = buffer.len();
    if buffer.capacity() > KEPT_ROOM && buffer.capacity() > 4 * held {
        buffer.shrink_to((2 * held).max(KEPT_ROOM));
    }
}

/// Events' room a drained buffer always keeps (48 KiB): no `realloc` for
/// the turns of a queue that is not deep.
const KEPT_ROOM: usize = 1_024;

/// Emptied turn buffers a queue keeps (a connection's backlog is at most
/// [`PAUSE_READING_AT`] turns and a few held events).
const SPARE_TURNS: usize = 256;

/// The queue of one worker thread.
pub struct WorkerQueue<S> {
    id: u32,
    /// Plain mutex around the turns: pushes and drains are a few
    /// instructions each (a drain moves at most a turn), so contention stays
    /// short. The buffers are kept from batch to batch, up to
    /// [`RETAINED_EVENTS`] events' worth: a queue that handed its buffer
    /// over with each batch, or split it, allocated one of another size for
    /// every batch, and the freed ones of all sizes were left as holes in
    /// the heap, resident (docs/benchmarks.md, "Over-aligned allocations and
    /// the worker queue's buffers").
    events: Mutex<Turns<S>>,
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
            events: Mutex::new(Turns::new()),
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

    /// Queues an event for `socket`, which must be pinned to this worker, in
    /// the connection's next turn (see the module's notes).
    pub(crate) fn push(&self, socket: &Arc<S>, payload: Payload, read_at: ReadAt) {
        socket.event_queued();
        self.depth.fetch_add(1, Ordering::Relaxed);
        let presence = matches!(payload, Payload::Presence(_));
        let mut events = self.events.lock();
        let was_empty = events.is_empty();
        let next = socket.next_turn().load(Ordering::Relaxed);
        // Nothing of it waits (its latest is drained): not a presence
        // change, which keeps its place behind earlier ones.
        let fresh = next <= events.head && !presence;
        let mut turn = next.max(events.head);
        if presence {
            turn = turn.max(events.presence_turn);
            events.presence_turn = turn;
        }
        socket.next_turn().store(turn + 1, Ordering::Relaxed);
        events.put(
            turn,
            fresh,
            Event {
                socket: socket.clone(),
                payload,
                read_at,
            },
        );
        let len = events.len;
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

    /// Takes every waiting event, turn by turn. They count as handled from
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
    /// rest. Several turns at once: for a drain whose order across
    /// connections does not matter (a retired worker's closes); a worker
    /// serving its connections takes [`drain_turn`](Self::drain_turn)s.
    pub fn drain_at_most(&self, max: usize, batch: &mut Vec<Event<S>>) {
        self.take(max, usize::MAX, batch);
    }

    /// Takes the oldest waiting turn, at most `max` events of it (the rest
    /// of the turn comes first next time): one event of each connection
    /// with events waiting, appended to `batch`; then the turns after it
    /// while fewer than `fill` events are taken (and at most `max`).
    /// Settles the turn before, as [`drain`](Self::drain) does. A worker
    /// that runs one turn before taking the next (`fill` 0) makes an event
    /// of one connection wait behind at most one of each other connection;
    /// `fill` lets a worker whose handlers are quick take a flooding
    /// connection's one-event turns a few at a time, each call costing
    /// what the whole batch's turns share.
    pub fn drain_turn(&self, max: usize, fill: usize, batch: &mut Vec<Event<S>>) {
        self.take(max, fill, batch);
    }

    fn take(&self, max: usize, fill: usize, batch: &mut Vec<Event<S>>) {
        self.settle();
        let start = batch.len();
        {
            let mut events = self.events.lock();
            loop {
                let taken = batch.len() - start;
                if taken >= max || events.is_empty() || (taken > 0 && taken >= fill) {
                    break;
                }
                events.take_turn(max - taken, batch);
            }
            if events.is_empty() {
                // Cleared with the queue locked: a push that comes after
                // finds it empty and signals again, none is lost. While
                // events wait, the descriptor stays signalled (or owed by a
                // batching thread) for them.
                self.wakeup.clear();
                self.waiting_since_ms.store(0, Ordering::Relaxed);
                events.trim();
            } else if batch.len() > start {
                // The worker is alive now: the rest waits from here on.
                self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
            }
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
        next_turn: AtomicU64,
    }

    impl Conn {
        fn new(id: u64) -> Arc<Self> {
            Arc::new(Conn {
                id,
                inflight: AtomicU32::new(0),
                next_turn: AtomicU64::new(0),
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
        fn next_turn(&self) -> &AtomicU64 {
            &self.next_turn
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
    fn a_drained_buffer_gives_back_room_beyond_twice_what_it_holds() {
        let mut buffer: Vec<u64> = Vec::with_capacity(16_384);
        buffer.extend(0..10_000);
        buffer.drain(..5_000);
        shrink_drained(&mut buffer);
        // 5,000 held in 16,384: not yet four times.
        assert_eq!(buffer.capacity(), 16_384);
        buffer.drain(..4_000);
        shrink_drained(&mut buffer);
        assert!(buffer.capacity() >= 2_000 && buffer.capacity() < 4_000);
        assert_eq!(buffer, (9_000..10_000).collect::<Vec<_>>());
        // Never below the room kept for a queue that is not deep.
        buffer.drain(..999);
        shrink_drained(&mut buffer);
        assert!(buffer.capacity() >= KEPT_ROOM);
    }

    #[test]
    fn the_queue_keeps_its_buffers_between_batches_but_not_after_a_burst() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let sockets: Vec<_> = (0..3000).map(Conn::new).collect();
        let capacity = |q: &WorkerQueue<Conn>| {
            let events = q.events.lock();
            events
                .rounds
                .iter()
                .chain(&events.spare)
                .map(Vec::capacity)
                .sum::<usize>()
        };
        for round in 0..2u32 {
            for (i, socket) in sockets.iter().enumerate() {
                q.push(
                    socket,
                    Payload::Text(vec![round as u8, i as u8]),
                    ReadAt::now(),
                );
            }
        }
        let grown = capacity(&q);
        let mut seen = 0u32;
        let mut batch = Vec::new();
        while seen < 6000 {
            q.drain_turn(1024, 0, &mut batch);
            assert!(batch.len() <= 1024 && !batch.is_empty());
            for event in batch.drain(..) {
                let round = (seen / 3000) as u8;
                assert_eq!(
                    event.payload,
                    Payload::Text(vec![round, (seen % 3000) as u8])
                );
                seen += 1;
            }
            // Drained in place: no buffer was grown; room beyond twice what
            // a buffer still holds went back (`shrink_drained`).
            assert!(capacity(&q) <= grown);
            q.settle();
        }
        assert_eq!(q.queue_depth(), 0);
        let socket = &sockets[0];
        for (i, other) in sockets.iter().cycle().take(RETAINED_EVENTS + 1).enumerate() {
            let _ = i;
            q.push(other, Payload::Close, ReadAt::now());
        }
        while !drain_at_most(&q, 1024).is_empty() {
            q.settle();
        }
        assert!(
            capacity(&q) <= RETAINED_EVENTS,
            "a burst's buffers are freed once drained"
        );
        assert_eq!(socket.inflight(), 0);
    }

    fn payloads(events: &[Event<Conn>]) -> Vec<(u64, &Payload)> {
        events.iter().map(|e| (e.socket_id(), &e.payload)).collect()
    }

    #[test]
    fn fill_takes_the_next_turns_until_that_many_events_are_taken() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let (a, b) = (Conn::new(1), Conn::new(2));
        for i in 0..10u8 {
            q.push(&a, Payload::Text(vec![i]), ReadAt::now());
        }
        q.push(&b, Payload::Text(vec![100]), ReadAt::now());
        let text = |i: u8| Payload::Text(vec![i]);
        let mut batch = Vec::new();
        // The first turn (a and b) and the next ones, one event each, up to 4.
        q.drain_turn(usize::MAX, 4, &mut batch);
        assert_eq!(
            payloads(&batch),
            vec![(1, &text(0)), (2, &text(100)), (1, &text(1)), (1, &text(2))]
        );
        batch.clear();
        // A whole turn however small `fill` is; never more than `max`.
        q.drain_turn(2, 1, &mut batch);
        assert_eq!(payloads(&batch), vec![(1, &text(3))]);
        batch.clear();
        q.drain_turn(2, 10, &mut batch);
        assert_eq!(payloads(&batch), vec![(1, &text(4)), (1, &text(5))]);
    }

    #[test]
    fn a_turn_takes_one_event_of_each_waiting_connection_in_order() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let (a, b, c) = (Conn::new(1), Conn::new(2), Conn::new(3));
        for i in 0..64u8 {
            q.push(&a, Payload::Text(vec![i]), ReadAt::now());
        }
        q.push(&b, Payload::Text(vec![100]), ReadAt::now());
        let mut batch = Vec::new();
        q.drain_turn(usize::MAX, 0, &mut batch);
        let text = |i: u8| Payload::Text(vec![i]);
        assert_eq!(payloads(&batch), vec![(1, &text(0)), (2, &text(100))]);
        batch.clear();
        // c arrives while a still has 63 waiting: it joins the next turn,
        // first, having nothing else waiting.
        q.push(&c, Payload::Text(vec![200]), ReadAt::now());
        q.push(&c, Payload::Text(vec![201]), ReadAt::now());
        q.drain_turn(usize::MAX, 0, &mut batch);
        assert_eq!(payloads(&batch), vec![(3, &text(200)), (1, &text(1))]);
        batch.clear();
        // A connection's order holds however its turns interleave.
        let mut seen_a = vec![0u8, 1];
        let mut seen_c = vec![200u8];
        while {
            q.drain_turn(usize::MAX, 0, &mut batch);
            !batch.is_empty()
        } {
            let ids: Vec<u64> = batch.iter().map(Event::socket_id).collect();
            let mut unique = ids.clone();
            unique.dedup();
            assert_eq!(ids, unique, "one event per connection per turn");
            for event in batch.drain(..) {
                let Payload::Text(ref data) = event.payload else {
                    panic!()
                };
                match event.socket_id() {
                    1 => seen_a.push(data[0]),
                    _ => seen_c.push(data[0]),
                }
            }
        }
        assert_eq!(seen_a, (0..64).collect::<Vec<u8>>());
        assert_eq!(seen_c, vec![200, 201]);
        q.settle();
        assert_eq!((q.queue_depth(), a.inflight(), c.inflight()), (0, 0, 0));
        assert!(!readable(&q));
    }

    #[test]
    fn a_turn_larger_than_the_batch_is_taken_in_parts_and_comes_first() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let sockets: Vec<_> = (0..5).map(Conn::new).collect();
        for s in &sockets {
            q.push(s, Payload::Close, ReadAt::now());
        }
        q.push(&sockets[0], Payload::Binary(vec![]), ReadAt::now());
        let mut batch = Vec::new();
        q.drain_turn(3, 0, &mut batch);
        assert_eq!(
            batch.iter().map(Event::socket_id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        batch.clear();
        q.drain_turn(3, 0, &mut batch);
        assert_eq!(
            batch.iter().map(Event::socket_id).collect::<Vec<_>>(),
            [3, 4]
        );
        batch.clear();
        assert!(readable(&q), "one more turn waits");
        q.drain_turn(3, 0, &mut batch);
        assert_eq!(payloads(&batch), vec![(0, &Payload::Binary(vec![]))]);
        assert!(!readable(&q));
    }

    #[test]
    fn presence_changes_keep_their_order_across_connections() {
        let workers = Workers::<Conn>::default();
        let q = workers.add().unwrap();
        let (a, b) = (Conn::new(1), Conn::new(2));
        let change = |joined| {
            Payload::Presence(Box::new(Change {
                channel: bytes::Bytes::from_static(b"room"),
                member: "m".into(),
                joined,
            }))
        };
        for _ in 0..3 {
            q.push(&a, Payload::Binary(vec![]), ReadAt::now());
        }
        q.push(&a, change(true), ReadAt::now());
        q.push(&b, change(false), ReadAt::now());
        let events = q.drain();
        let order: Vec<(u64, bool)> = events
            .iter()
            .filter_map(|e| match &e.payload {
                Payload::Presence(c) => Some((e.socket_id(), c.joined)),
                _ => None,
            })
            .collect();
        assert_eq!(order, vec![(1, true), (2, false)]);
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
