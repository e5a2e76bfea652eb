//! The part of a connection that every thread may touch: its id, its worker
//! and its outbox. The connection's own I/O task holds the TCP stream; other
//! threads only queue frames here and wake that task.
//!
//! Uses the leaves (`frame`, `deflate`, `links`, keepalive's per-connection state) and
//! `dispatch`, whose [`Backlog`] it implements so that a busy worker pauses
//! the connection's reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use crate::deflate::Negotiated;
use crate::dispatch::{self, Backlog, RESUME_READING_AT};
use crate::frame::{self, close_code};
use crate::keepalive::Keepalive;
use crate::links::Links;

/// The worker queues of this crate: they carry sockets' events.
pub type WorkerQueue = dispatch::WorkerQueue<Socket>;
pub type Workers = dispatch::Workers<Socket>;
pub type Event = dispatch::Event<Socket>;

/// Where a connection is in its life, as far as senders are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    /// A close frame is queued last; nothing more may be queued.
    Closing,
    /// The TCP connection is gone.
    Closed,
}

/// Frames waiting for the connection's writer, and the wakeup of its task.
struct Outbox {
    /// Only appended to and taken whole, so a `Vec` (the writer's side is a
    /// `VecDeque`, made from it without copying).
    frames: Vec<Bytes>,
    /// Bytes queued and not yet written, including frames the writer holds.
    queued: usize,
    /// The connection's task while it waits for [`Socket::poll_woken`].
    /// Kept under the outbox lock, which every wake-up takes anyway: no
    /// separate `Notify` in the socket and no waiter node in the task.
    waker: Option<Waker>,
    /// Something happened since the task last looked: frames queued, a close
    /// requested, or its handlers caught up so reading may resume.
    woken: bool,
    phase: Phase,
    /// The writer has taken the close frame.
    close_taken: bool,
    /// The close frame fails the connection: no waiting for the peer's.
    fail: bool,
    /// Frames already taken by the writer must be dropped (backpressure close).
    discard: bool,
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

/// What the writer took besides frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseTaken {
    No,
    /// Our close frame, after which the peer's close is awaited.
    Close,
    /// Our close frame failing the connection: end once it is written.
    Fail,
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
                phase: Phase::Open,
                close_taken: false,
                fail: false,
                discard: false,
            }),
            inflight: AtomicU32::new(0),
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
    pub fn send(&self, frame: &Bytes) -> Queued {
        let mut out = self.outbox.lock();
        if out.phase != Phase::Open {
            return Queued::No;
        }
        // A message larger than the limit still goes out to a connection that
        // has nothing waiting; the limit is on what piles up behind it.
        if out.queued != 0 && out.queued + frame.len() > self.max_backpressure {
            out.frames.clear();
            out.discard = true;
            let close = frame::encode_close(close_code::POLICY, "backpressure limit exceeded");
            out.queued = close.len();
            out.frames.push(close);
            out.phase = Phase::Closing;
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
        self.close_with(frame::encode_close(code, reason))
    }

    /// Like [`close`](Self::close) but with a prepared frame (an echo of the
    /// client's close, or an empty one).
    pub(crate) fn close_with(&self, frame: Bytes) -> bool {
        self.queue_close(frame, false)
    }

    /// Fails the connection from another task: like [`close`](Self::close),
    /// but the connection ends once the frame is written, without waiting
    /// for the peer's close (a keepalive timeout).
    pub(crate) fn fail(&self, code: u16, reason: &str) -> bool {
        self.queue_close(frame::encode_close(code, reason), true)
    }

    fn queue_close(&self, frame: Bytes, fail: bool) -> bool {
        let mut out = self.outbox.lock();
        if out.phase != Phase::Open {
            return false;
        }
        out.fail = fail;
        out.queued += frame.len();
        out.frames.push(frame);
        out.phase = Phase::Closing;
        wake(out);
        true
    }

    /// Neither closing nor closed: sends would be queued.
    pub(crate) fn is_open(&self) -> bool {
        self.outbox.lock().phase == Phase::Open
    }

    /// Moves the queued frames to the writer's buffer. After a backpressure
    /// close, the frames the writer still holds are dropped first, except
    /// the front one when `keep_front` (it is partly written).
    /// Says whether the close frame is the last of the frames just taken.
    pub(crate) fn take(&self, into: &mut VecDeque<Bytes>, keep_front: bool) -> CloseTaken {
        let mut out = self.outbox.lock();
        if std::mem::take(&mut out.discard) {
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
        if out.phase != Phase::Closing || out.close_taken {
            return CloseTaken::No;
        }
        out.close_taken = true;
        if out.fail {
            CloseTaken::Fail
        } else {
            CloseTaken::Close
        }
    }

    /// The writer put `bytes` on the wire.
    pub(crate) fn written(&self, bytes: usize) {
        let mut out = self.outbox.lock();
        out.queued = out.queued.saturating_sub(bytes);
    }

    /// The connection is gone: refuse new frames and free queued ones.
    pub(crate) fn mark_closed(&self) {
        let mut out = self.outbox.lock();
        out.phase = Phase::Closed;
        out.frames = Vec::new();
        out.queued = 0;
        out.waker = None;
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

    /// Every connection has one for its whole life: keep it from growing
    /// unnoticed. With the `Arc`'s two counts and malloc's header, 168 bytes
    /// is a 192-byte allocation (160 before the links kept one channel
    /// inline, which saves a subscribed connection two allocations).
    #[test]
    fn socket_stays_small() {
        assert!(
            std::mem::size_of::<Socket>() <= 168,
            "{} bytes",
            std::mem::size_of::<Socket>()
        );
    }
}
