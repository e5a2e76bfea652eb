//! The part of a connection that every thread may touch: its id, its worker
//! and its outbox. The connection's own I/O task holds the TCP stream; other
//! threads only queue frames here and wake that task.
//!
//! It implements `dispatch`'s [`Backlog`] so that a busy worker pauses the
//! connection's reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::{Mutex, MutexGuard};

use crate::deflate::Negotiated;
use crate::dispatch::{self, Backlog, RESUME_READING_AT};
use crate::frame::{self, close_code, FrameBytes};
use crate::keepalive::Keepalive;
use crate::lifecycle::{Closer, Lifecycle};
use crate::limits::RateLimit;
use crate::links::Links;

/// The worker queues of this crate: they carry sockets' events.
pub type WorkerQueue = dispatch::WorkerQueue<Socket>;
pub type Workers = dispatch::Workers<Socket>;
pub type Event = dispatch::Event<Socket>;

/// Frames waiting for the connection's writer, and the wakeup of its task.
struct Outbox {
    /// Only appended to and taken whole, so a `Vec` (the writer's side is a
    /// `VecDeque`, made from it without copying).
    frames: Vec<FrameBytes>,
    /// Bytes queued and not yet written, including frames the writer holds.
    queued: usize,
    /// The connection's task while it waits for [`Socket::poll_woken`].
    /// Kept under the outbox lock, which every wake-up takes anyway: no
    /// separate `Notify` in the socket and no waiter node in the task.
    waker: Option<Waker>,
    /// Something happened since the task last looked: frames queued, a close
    /// requested, or its handlers caught up so reading may resume.
    woken: bool,
    /// The connection's close lifecycle. Here, under the lock that queueing
    /// and taking frames hold anyway, so that a close frame is queued after
    /// exactly the frames queued before it; the connection's task keeps a
    /// copy (see the `lifecycle` module).
    life: Lifecycle,
}

/// The shared handle of one accepted (or upgrading) connection.
pub struct Socket {
    pub id: u64,
    pub worker: Arc<WorkerQueue>,
    /// One lock per outbox, held for a push or a swap only.
    outbox: Mutex<Outbox>,
    /// Events of this connection handed to its worker and not yet finished;
    /// the reader pauses while too many are outstanding.
    inflight: AtomicU32,
    /// Its worker queue's turn for its next event (see `dispatch`).
    next_turn: AtomicU64,
    /// Rate limiting: when its next message is due, see [`RateLimit`].
    rate: AtomicU64,
    /// The upgrade was accepted: `handle_close` is owed when it ends.
    accepted: AtomicBool,
    /// Its channels and the virtual sockets pointing at it, for cleanup.
    pub(crate) links: Links,
    /// Looked after by the server's keepalive sweep.
    pub(crate) keepalive: Keepalive,
    max_backpressure: usize,
    /// What permessage-deflate agreed, if it was negotiated: senders pick
    /// the compressed frame of a message for this connection.
    deflate: Option<Negotiated>,
}

/// Result of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// The connection is closing or closed.
    No,
    /// Over `max_backpressure`: the connection is now closing with 1008.
    Overflow,
}

impl Socket {
    pub(crate) fn new(id: u64, worker: Arc<WorkerQueue>, max_backpressure: usize) -> Self {
        Socket {
            id,
            worker,
            outbox: Mutex::new(Outbox {
                frames: Vec::new(),
                queued: 0,
                waker: None,
                woken: false,
                life: Lifecycle::Active,
            }),
            inflight: AtomicU32::new(0),
            next_turn: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            accepted: AtomicBool::new(false),
            links: Links::default(),
            keepalive: Keepalive::default(),
            max_backpressure,
            deflate: None,
        }
    }

    /// The socket of a connection that negotiated permessage-deflate.
    pub(crate) fn with_deflate(mut self, deflate: Option<Negotiated>) -> Self {
        self.deflate = deflate;
        self
    }

    pub(crate) fn deflate(&self) -> Option<Negotiated> {
        self.deflate
    }

    /// Queues an encoded frame for this connection.
    pub fn send(&self, frame: &FrameBytes) -> Queued {
        let mut out = self.outbox.lock();
        if !out.life.accepts_frames() {
            return Queued::No;
        }
        // A message larger than the limit still goes out to a connection that
        // has nothing waiting; the limit is on what piles up behind it.
        if out.queued != 0 && out.queued + frame.len() > self.max_backpressure {
            out.life.close(Closer::Limit);
            out.frames.clear();
            let close = frame::encode_close(close_code::POLICY, "backpressure limit exceeded");
            out.queued = close.len();
            out.frames.push(close);
            wake(out);
            return Queued::Overflow;
        }
        let was_empty = out.frames.is_empty();
        out.frames.push(frame.clone());
        out.queued += frame.len();
        // A non-empty outbox has woken its task already.
        if was_empty {
            wake(out);
        }
        Queued::Yes
    }

    /// Queues a close frame after everything already queued. False when the
    /// connection was already closing.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        self.request_close(Closer::Handler, frame::encode_close(code, reason))
            .0
    }

    /// Fails the connection from another task: like [`close`](Self::close),
    /// but the connection ends once the frame is written, without waiting
    /// for the peer's close (a keepalive timeout).
    pub(crate) fn fail(&self, code: u16, reason: &str) -> bool {
        self.request_close(Closer::Keepalive, frame::encode_close(code, reason))
            .0
    }

    /// Asks for a close on behalf of `by`, queueing `frame` if no close was
    /// under way. Whether it was queued, and the state after.
    pub(crate) fn request_close(&self, by: Closer, frame: FrameBytes) -> (bool, Lifecycle) {
        let mut out = self.outbox.lock();
        if !out.life.close(by) {
            return (false, out.life);
        }
        let life = out.life;
        out.queued += frame.len();
        out.frames.push(frame);
        wake(out);
        (true, life)
    }

    /// The peer's close frame was read: queues `reply` when it is owed (no
    /// close of ours is under way). `reply` may be `None` when the caller's
    /// view is past `Active`: the outbox's state is too, so none is owed.
    /// Whether it was queued, and the state after.
    pub(crate) fn peer_closed(&self, reply: Option<FrameBytes>) -> (bool, Lifecycle) {
        let mut out = self.outbox.lock();
        let owed = out.life.peer_closed();
        let life = out.life;
        let Some(reply) = reply.filter(|_| owed) else {
            debug_assert!(!owed, "the peer's close is owed an answer");
            return (false, life);
        };
        out.queued += reply.len();
        out.frames.push(reply);
        wake(out);
        (true, life)
    }

    /// Neither closing nor closed: sends would be queued.
    pub(crate) fn is_open(&self) -> bool {
        self.outbox.lock().life.accepts_frames()
    }

    /// Moves the queued frames to the writer's buffer. After a backpressure
    /// close, the frames the writer still holds are dropped first, except
    /// the front one when `keep_front` (it is partly written).
    /// Returns the state after: whether the writer now holds our close frame.
    pub(crate) fn take(&self, into: &mut VecDeque<FrameBytes>, keep_front: bool) -> Lifecycle {
        let mut out = self.outbox.lock();
        if out.life.take() {
            into.truncate(usize::from(keep_front));
        }
        // Hand the whole buffer over: the outbox keeps no capacity while its
        // connection is idle.
        let frames = std::mem::take(&mut out.frames);
        if into.is_empty() {
            *into = VecDeque::from(frames);
        } else {
            into.extend(frames);
        }
        out.life
    }

    /// The writer put `bytes` on the wire.
    pub(crate) fn written(&self, bytes: usize) {
        let mut out = self.outbox.lock();
        out.queued = out.queued.saturating_sub(bytes);
    }

    /// The writer has put our close frame on the wire: the state after.
    pub(crate) fn close_written(&self) -> Lifecycle {
        let mut out = self.outbox.lock();
        out.life.close_written();
        out.life
    }

    /// The connection is gone: refuse new frames and free queued ones.
    pub(crate) fn mark_closed(&self) -> Lifecycle {
        let mut out = self.outbox.lock();
        out.life.terminate();
        out.frames = Vec::new();
        out.queued = 0;
        out.waker = None;
        out.life
    }

    /// Ready once the connection's task has something to look at (see
    /// `Outbox::woken`); else it is woken when it does.
    pub(crate) fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut out = self.outbox.lock();
        if std::mem::take(&mut out.woken) {
            return Poll::Ready(());
        }
        match &out.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => out.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Whether one more message at `now_ns` (on the process clock) keeps
    /// the connection within `limit`; counts it if so. Called by the
    /// connection's task only.
    pub(crate) fn within_rate(&self, limit: &RateLimit, now_ns: u64) -> bool {
        limit.allow(&self.rate, now_ns)
    }

    pub(crate) fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

impl Socket {
    pub(crate) fn accept(&self) {
        self.accepted.store(true, Ordering::Release);
    }

    pub(crate) fn is_accepted(&self) -> bool {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Backlog for Socket {
    fn id(&self) -> u64 {
        self.id
    }

    fn next_turn(&self) -> &AtomicU64 {
        &self.next_turn
    }

    fn event_queued(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// Wakes the reader when it may resume.
    fn event_finished(&self) {
        let before = self.inflight.fetch_sub(1, Ordering::Relaxed);
        if before == RESUME_READING_AT + 1 {
            wake(self.outbox.lock());
        }
    }
}

/// Marks the outbox woken and wakes its task, after releasing the lock.
fn wake(mut out: MutexGuard<'_, Outbox>) {
    out.woken = true;
    let waker = out.waker.take();
    drop(out);
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Pending;

    fn new_socket(max_backpressure: usize) -> (Socket, Workers) {
        let workers = Workers::default();
        workers.add().unwrap();
        let worker = workers.pick().unwrap();
        (Socket::new(1, worker, max_backpressure), workers)
    }

    fn is_close(frame: &FrameBytes) -> bool {
        frame[0] & 0x0f == 0x8
    }

    #[test]
    fn a_backpressure_close_drops_what_the_writer_holds_but_a_partly_written_frame() {
        for keep_front in [false, true] {
            let (socket, _workers) = new_socket(12);
            let mut writer = VecDeque::new();
            assert_eq!(
                socket.send(&FrameBytes::copy_from_slice(b"first")),
                Queued::Yes
            );
            assert_eq!(socket.take(&mut writer, false), Lifecycle::Active);
            assert_eq!(
                socket.send(&FrameBytes::copy_from_slice(b"second")),
                Queued::Yes
            );
            assert_eq!(
                socket.send(&FrameBytes::copy_from_slice(b"third")),
                Queued::Overflow
            );
            assert_eq!(
                socket.send(&FrameBytes::copy_from_slice(b"late")),
                Queued::No
            );
            assert!(!socket.is_open());
            assert_eq!(
                socket.take(&mut writer, keep_front),
                Lifecycle::ClosedByUs(Pending::Taken)
            );
            assert_eq!(writer.len(), 1 + usize::from(keep_front), "{writer:?}");
            assert!(is_close(writer.back().unwrap()));
            assert_eq!(socket.close_written(), Lifecycle::AwaitingPeer);
        }
    }

    #[test]
    fn the_first_close_wins_and_waits_for_the_peer() {
        let (socket, _workers) = new_socket(1 << 20);
        let mut writer = VecDeque::new();
        assert!(socket.close(1000, ""));
        assert!(!socket.close(1001, ""));
        assert!(!socket.fail(1011, "keepalive ping timeout"));
        assert_eq!(
            socket.take(&mut writer, false),
            Lifecycle::ClosedByUs(Pending::Taken)
        );
        assert_eq!(writer.len(), 1);
        assert_eq!(socket.close_written(), Lifecycle::AwaitingPeer);
        assert_eq!(socket.peer_closed(None), (false, Lifecycle::Terminated));
    }

    #[test]
    fn the_peers_close_is_echoed_unless_ours_is_queued() {
        let echo = || Some(frame::encode_close(1000, ""));
        let (socket, _workers) = new_socket(1 << 20);
        let mut writer = VecDeque::new();
        assert_eq!(
            socket.peer_closed(echo()),
            (true, Lifecycle::Ending(Pending::Queued))
        );
        assert!(!socket.close(1001, ""));
        assert_eq!(
            socket.take(&mut writer, false),
            Lifecycle::Ending(Pending::Taken)
        );
        assert_eq!(writer.len(), 1);
        assert_eq!(socket.close_written(), Lifecycle::Terminated);

        let (socket, _workers) = new_socket(1 << 20);
        let mut writer = VecDeque::new();
        assert!(socket.close(1001, ""));
        assert_eq!(
            socket.peer_closed(echo()),
            (false, Lifecycle::Ending(Pending::Queued))
        );
        socket.take(&mut writer, false);
        assert_eq!(writer.len(), 1, "our close answers the peer's");
    }

    #[test]
    fn a_closed_socket_takes_nothing() {
        let (socket, _workers) = new_socket(1 << 20);
        let mut writer = VecDeque::new();
        assert_eq!(
            socket.send(&FrameBytes::copy_from_slice(b"lost")),
            Queued::Yes
        );
        assert_eq!(socket.mark_closed(), Lifecycle::Terminated);
        assert_eq!(
            socket.send(&FrameBytes::copy_from_slice(b"late")),
            Queued::No
        );
        assert!(!socket.close(1000, ""));
        assert_eq!(socket.take(&mut writer, false), Lifecycle::Terminated);
        assert!(writer.is_empty());
    }

    /// Every connection has one for its whole life: keep it from growing
    /// unnoticed. With the `Arc`'s two counts and malloc's header, 192 bytes
    /// is a 224-byte allocation (184, a 208-byte one, before the links held
    /// the socket's presence links, which took presence's per-socket index
    /// away; 160 before the links kept one channel inline, which saves a
    /// subscribed connection two allocations; 168 before its worker-queue
    /// turn and its `max_message_rate` bucket).
    #[test]
    fn socket_stays_small() {
        assert!(
            std::mem::size_of::<Socket>() <= 192,
            "{} bytes",
            std::mem::size_of::<Socket>()
        );
    }
}
