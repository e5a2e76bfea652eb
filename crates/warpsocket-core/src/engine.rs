//! Process-wide state every thread reaches: live sockets, pending upgrades and
//! counters, and the operations on them (send, close, finishing events).
//! It outlives servers: ids are never reused within a process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::frame::{self, Kind};
use crate::registry::{IdMap, Registry};
use crate::socket::{Queued, Socket};
use crate::stats::Counters;

/// Below this many outstanding events a paused connection resumes reading.
pub(crate) const RESUME_READING_BELOW: u32 = 32;
/// At this many outstanding events a connection stops being read.
pub(crate) const PAUSE_READING_AT: u32 = 64;

/// `handle_open`'s answer: accept, or the HTTP status to refuse with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(u16),
}

#[derive(Default)]
pub struct Engine {
    pub(crate) sockets: Registry,
    /// Upgrades waiting for `handle_open`. Touched twice per connection, never
    /// per message, so one mutex is enough.
    opens: Mutex<IdMap<oneshot::Sender<Verdict>>>,
    pub stats: Counters,
    last_id: AtomicU64,
}

impl Engine {
    pub fn new() -> Arc<Self> {
        Arc::new(Engine::default())
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.last_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends one message to each id in `ids` (repeats count twice); the frame
    /// is encoded once and shared. Returns the number of recipients.
    pub fn send(&self, ids: &[u64], kind: Kind, payload: &[u8]) -> usize {
        let frame = frame::encode_message(kind, payload);
        let sent = ids
            .iter()
            .filter(|&&id| self.send_frame(id, &frame))
            .count();
        Counters::add(&self.stats.messages_out, sent as u64);
        Counters::add(&self.stats.bytes_out, (sent * payload.len()) as u64);
        sent
    }

    fn send_frame(&self, id: u64, frame: &Bytes) -> bool {
        match self.sockets.with(id, |s| s.send(frame)) {
            Some(Queued::Yes) => true,
            Some(Queued::Overflow) => {
                Counters::add(&self.stats.backpressure_closes, 1);
                log::warn!("socket {id}: closed with 1008, outgoing backpressure limit exceeded");
                false
            }
            Some(Queued::No) | None => false,
        }
    }

    /// Starts the close handshake; false when no open connection has this id.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        self.sockets
            .with(id, |s| s.close(code, reason))
            .unwrap_or(false)
    }

    /// Delivers `handle_open`'s verdict. False when the upgrade is no longer
    /// waiting (the client left, or the server is stopping).
    pub fn resolve_open(&self, id: u64, verdict: Verdict) -> bool {
        let Some(waiting) = self.opens.lock().remove(&id) else {
            return false;
        };
        if verdict == Verdict::Accept {
            match self.sockets.get(id) {
                Some(socket) => socket.accept(),
                None => return false,
            }
        }
        waiting.send(verdict).is_ok()
    }

    pub(crate) fn wait_for_verdict(&self, id: u64) -> oneshot::Receiver<Verdict> {
        let (tx, rx) = oneshot::channel();
        self.opens.lock().insert(id, tx);
        rx
    }

    pub(crate) fn forget_open(&self, id: u64) {
        self.opens.lock().remove(&id);
    }

    /// The handlers for these events finished (one id per event). Lets the
    /// connections read again once their backlog is small. The worker's own
    /// count is [`WorkerQueue::finished`](crate::dispatch::WorkerQueue::finished).
    pub fn finished(&self, ids: &[u64]) {
        for &id in ids {
            self.sockets
                .with(id, |s| s.event_finished(RESUME_READING_BELOW));
        }
    }

    /// Open connections (accepted or upgrading).
    pub fn connection_count(&self) -> usize {
        self.sockets.len()
    }

    pub(crate) fn all_sockets(&self) -> Vec<Arc<Socket>> {
        self.sockets.all()
    }
}
