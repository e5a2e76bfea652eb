//! A connection's close lifecycle as one sans-I/O state machine: which
//! frames may still be queued, whether the reader reads and hands messages
//! on, when our close frame goes to the writer, and when the connection is
//! over. Shaped like tungstenite's `WebSocketState`, with the writer's
//! progress on our close frame folded in. A leaf: it does no I/O, takes no
//! lock and uses nothing of the crate.
//!
//! # States
//!
//! | state           | senders queue | reader reads | messages  | ends when                    |
//! |-----------------|---------------|--------------|-----------|------------------------------|
//! | `Active`        | yes           | yes          | handed on | -                            |
//! | `ClosedByUs(p)` | no            | yes          | dropped   | (goes on to `AwaitingPeer`)  |
//! | `AwaitingPeer`  | no            | yes          | dropped   | the peer's close, or timeout |
//! | `Ending(p)`     | no            | no           | dropped   | our close frame is written   |
//! | `Terminated`    | no            | no           | dropped   | (over)                       |
//!
//! `p` ([`Pending`]) is where our close frame is: `Queued` in the outbox,
//! `Discarding` (queued by the backpressure limit: the frames the writer
//! already holds are dropped before it), or `Taken` by the writer.
//!
//! # Transitions
//!
//! ```text
//! Active ──close(Handler)───▶ ClosedByUs(Queued) ─────take──▶ ClosedByUs(Taken)
//! Active ──close(Limit)─────▶ ClosedByUs(Discarding) ─take──▶ ClosedByUs(Taken)
//! ClosedByUs(Taken) ──close_written──▶ AwaitingPeer
//! Active ──close(Protocol|Keepalive), peer_closed──▶ Ending(Queued) ──take──▶ Ending(Taken)
//! Ending(Taken) ──close_written──▶ Terminated
//! ClosedByUs(p) ──peer_closed, close(Protocol)──▶ Ending(p)
//! AwaitingPeer ──peer_closed, close(Protocol)──▶ Terminated
//! any state ──terminate──▶ Terminated   (stream failed, close timed out, task gone)
//! ```
//!
//! A second close request is ignored: the first close frame is the one the
//! peer gets (the connection's own reader is the exception: on a protocol
//! violation it stops reading even when a close is already on its way).
//! Nothing leaves `Terminated`. Writing a close frame that the writer never
//! took is a bug, caught by a `debug_assert`.
//!
//! # Who holds it
//!
//! The one authoritative value lives in the socket's outbox, under the lock
//! that senders (worker threads) and the connection's I/O task already take
//! to queue and to take frames, so no transition costs a lock of its own:
//! senders check and move it while queueing, and the task moves it while
//! taking the outbox. The task keeps a copy as its read-only view, refreshed
//! by every locked call it makes (each returns the state after it), and reads
//! that copy per frame and per poll without locking. The view may lag the
//! outbox, never lead it: a close another thread queued reaches the reader
//! when its writer takes it, so messages read until then still reach the
//! handlers, as they were sent before the peer could see our close.
//! The task's other transitions (the peer's close, a protocol violation, our
//! close written, the stream failing) each lock once in a connection's life,
//! never per frame.
//!
//! Flow control (the reader paused while its handlers are behind) is not
//! here: it comes and goes in any state that reads, and is the task's alone.

/// Where the connection is in its close lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Nothing is closing: frames are queued, messages handed on.
    Active,
    /// We close cleanly (a handler, the API, the server's shutdown, the
    /// backpressure limit): our close frame goes out after the frames queued
    /// before it, then the peer's close is awaited.
    ClosedByUs(Pending),
    /// Our close frame is written; the peer has a moment to answer.
    AwaitingPeer,
    /// Reading is over and the connection ends once our close frame is
    /// written: the peer closed (ours answers it), or we fail the connection
    /// (a protocol violation, a keepalive timeout) and wait for nothing.
    Ending(Pending),
    /// Nothing more is read or written.
    Terminated,
}

/// Where our close frame is while it is not yet written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// In the outbox, after every frame queued before it.
    Queued,
    /// In the outbox, queued by the backpressure limit: the frames the writer
    /// already holds are dropped rather than written before it.
    Discarding,
    /// Taken by the writer, after the frames it holds.
    Taken,
}

/// Who asks for a close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closer {
    /// A handler, the API or the server's shutdown: a clean close.
    Handler,
    /// The backpressure limit (1008): a clean close, but what is queued
    /// before it is dropped.
    Limit,
    /// The connection's reader: the peer broke the protocol or sent a
    /// message no handler takes. Reading stops at once.
    Protocol,
    /// The keepalive sweep heard nothing: the peer is not waited for.
    Keepalive,
}

impl Lifecycle {
    /// Asks for a close. True when the caller must queue its close frame
    /// (after everything queued so far); false when a close is already on
    /// its way, whose frame is the one that goes out.
    pub(crate) fn close(&mut self, by: Closer) -> bool {
        use Lifecycle::*;
        match (*self, by) {
            (Active, Closer::Handler) => *self = ClosedByUs(Pending::Queued),
            (Active, Closer::Limit) => *self = ClosedByUs(Pending::Discarding),
            (Active, Closer::Protocol | Closer::Keepalive) => *self = Ending(Pending::Queued),
            // The reader stops reading even though the close under way is
            // someone else's: the peer is no longer to be believed.
            (ClosedByUs(pending), Closer::Protocol) => {
                *self = Ending(pending);
                return false;
            }
            (AwaitingPeer, Closer::Protocol) => {
                *self = Terminated;
                return false;
            }
            _ => return false,
        }
        true
    }

    /// The peer's close frame was read. True when the caller must queue the
    /// answer (the echo of its code); otherwise ours is already on its way,
    /// or written and this was the answer to it.
    pub(crate) fn peer_closed(&mut self) -> bool {
        use Lifecycle::*;
        match *self {
            Active => {
                *self = Ending(Pending::Queued);
                true
            }
            ClosedByUs(pending) => {
                *self = Ending(pending);
                false
            }
            AwaitingPeer => {
                *self = Terminated;
                false
            }
            // We are failing the connection (a keepalive verdict the reader
            // has not taken yet): that close answers this one.
            Ending(_) | Terminated => false,
        }
    }

    /// The writer takes the outbox. True when it must first drop the frames
    /// it still holds (see [`Pending::Discarding`]).
    pub(crate) fn take(&mut self) -> bool {
        use Lifecycle::*;
        let (discard, next) = match *self {
            ClosedByUs(Pending::Queued) => (false, ClosedByUs(Pending::Taken)),
            ClosedByUs(Pending::Discarding) => (true, ClosedByUs(Pending::Taken)),
            Ending(Pending::Queued) => (false, Ending(Pending::Taken)),
            Ending(Pending::Discarding) => (true, Ending(Pending::Taken)),
            // No close to take: the outbox held frames only, or was woken
            // for the reader.
            other => (false, other),
        };
        *self = next;
        discard
    }

    /// The writer has put our close frame on the wire (TLS records included).
    pub(crate) fn close_written(&mut self) {
        use Lifecycle::*;
        match *self {
            ClosedByUs(Pending::Taken) => *self = AwaitingPeer,
            Ending(Pending::Taken) => *self = Terminated,
            Terminated => {}
            other => debug_assert!(false, "close frame written in {other:?}"),
        }
    }

    /// The stream failed, the peer hung up, the close timed out or the
    /// connection's task is gone.
    pub(crate) fn terminate(&mut self) {
        *self = Lifecycle::Terminated;
    }

    /// Senders may queue frames.
    pub(crate) fn accepts_frames(self) -> bool {
        self == Lifecycle::Active
    }

    /// A message read now goes to the handlers; after any close it is
    /// dropped (the peer's messages after our close frame, or after its own,
    /// have no one to answer them).
    pub(crate) fn delivers(self) -> bool {
        self == Lifecycle::Active
    }

    /// The reader keeps reading: until the peer's close, or the close is
    /// ours and waits for the peer's.
    pub(crate) fn reads(self) -> bool {
        matches!(
            self,
            Lifecycle::Active | Lifecycle::ClosedByUs(_) | Lifecycle::AwaitingPeer
        )
    }

    /// Our close frame is out and the peer's is awaited: the close timeout
    /// runs.
    pub(crate) fn awaits_peer(self) -> bool {
        self == Lifecycle::AwaitingPeer
    }

    /// The writer holds our close frame, last: once it has written
    /// everything, [`close_written`](Self::close_written) is due.
    pub(crate) fn close_in_writer(self) -> bool {
        matches!(
            self,
            Lifecycle::ClosedByUs(Pending::Taken) | Lifecycle::Ending(Pending::Taken)
        )
    }

    pub(crate) fn is_terminated(self) -> bool {
        self == Lifecycle::Terminated
    }
}

#[cfg(test)]
mod tests {
    use super::Lifecycle::*;
    use super::*;

    const PENDING: [Pending; 3] = [Pending::Queued, Pending::Discarding, Pending::Taken];
    const CLOSERS: [Closer; 4] = [
        Closer::Handler,
        Closer::Limit,
        Closer::Protocol,
        Closer::Keepalive,
    ];

    fn all_states() -> Vec<Lifecycle> {
        let mut all = vec![Active, AwaitingPeer, Terminated];
        for p in PENDING {
            all.push(ClosedByUs(p));
            all.push(Ending(p));
        }
        all
    }

    fn after(mut state: Lifecycle, step: impl FnOnce(&mut Lifecycle) -> bool) -> (Lifecycle, bool) {
        let said = step(&mut state);
        (state, said)
    }

    #[test]
    fn a_close_from_active_queues_a_frame() {
        let expected = [
            (Closer::Handler, ClosedByUs(Pending::Queued)),
            (Closer::Limit, ClosedByUs(Pending::Discarding)),
            (Closer::Protocol, Ending(Pending::Queued)),
            (Closer::Keepalive, Ending(Pending::Queued)),
        ];
        for (by, state) in expected {
            assert_eq!(after(Active, |s| s.close(by)), (state, true), "{by:?}");
        }
    }

    #[test]
    fn a_second_close_request_is_ignored() {
        for state in all_states().into_iter().filter(|s| *s != Active) {
            for by in [Closer::Handler, Closer::Limit, Closer::Keepalive] {
                assert_eq!(
                    after(state, |s| s.close(by)),
                    (state, false),
                    "{state:?} {by:?}"
                );
            }
        }
    }

    #[test]
    fn a_protocol_violation_while_closing_stops_reading_without_a_second_frame() {
        for p in PENDING {
            assert_eq!(
                after(ClosedByUs(p), |s| s.close(Closer::Protocol)),
                (Ending(p), false)
            );
            assert_eq!(
                after(Ending(p), |s| s.close(Closer::Protocol)),
                (Ending(p), false)
            );
        }
        assert_eq!(
            after(AwaitingPeer, |s| s.close(Closer::Protocol)),
            (Terminated, false)
        );
        assert_eq!(
            after(Terminated, |s| s.close(Closer::Protocol)),
            (Terminated, false)
        );
    }

    #[test]
    fn the_peers_close_is_echoed_only_when_active() {
        assert_eq!(
            after(Active, Lifecycle::peer_closed),
            (Ending(Pending::Queued), true)
        );
        for p in PENDING {
            // Ours is under way and answers it; a backpressure close still
            // drops what the writer holds.
            assert_eq!(
                after(ClosedByUs(p), Lifecycle::peer_closed),
                (Ending(p), false)
            );
            assert_eq!(after(Ending(p), Lifecycle::peer_closed), (Ending(p), false));
        }
        assert_eq!(
            after(AwaitingPeer, Lifecycle::peer_closed),
            (Terminated, false)
        );
        assert_eq!(
            after(Terminated, Lifecycle::peer_closed),
            (Terminated, false)
        );
    }

    #[test]
    fn taking_the_outbox_takes_a_queued_close_once() {
        let expected = [
            (
                ClosedByUs(Pending::Queued),
                ClosedByUs(Pending::Taken),
                false,
            ),
            (
                ClosedByUs(Pending::Discarding),
                ClosedByUs(Pending::Taken),
                true,
            ),
            (Ending(Pending::Queued), Ending(Pending::Taken), false),
            (Ending(Pending::Discarding), Ending(Pending::Taken), true),
        ];
        for (before, state, discard) in expected {
            assert_eq!(
                after(before, Lifecycle::take),
                (state, discard),
                "{before:?}"
            );
            assert_eq!(
                after(state, Lifecycle::take),
                (state, false),
                "twice: {before:?}"
            );
        }
        for state in [Active, AwaitingPeer, Terminated] {
            assert_eq!(after(state, Lifecycle::take), (state, false));
        }
    }

    #[test]
    fn writing_our_close_awaits_the_peer_or_ends() {
        let written = |mut s: Lifecycle| {
            s.close_written();
            s
        };
        assert_eq!(written(ClosedByUs(Pending::Taken)), AwaitingPeer);
        assert_eq!(written(Ending(Pending::Taken)), Terminated);
        assert_eq!(written(Terminated), Terminated);
    }

    #[test]
    #[cfg(debug_assertions)]
    fn writing_a_close_never_taken_is_a_bug() {
        let illegal = [
            Active,
            ClosedByUs(Pending::Queued),
            ClosedByUs(Pending::Discarding),
            Ending(Pending::Queued),
            Ending(Pending::Discarding),
            AwaitingPeer,
        ];
        for state in illegal {
            let panicked = std::panic::catch_unwind(|| {
                let mut s = state;
                s.close_written();
            });
            assert!(panicked.is_err(), "{state:?}");
        }
    }

    #[test]
    fn terminate_ends_every_state_and_nothing_leaves_terminated() {
        for state in all_states() {
            let mut s = state;
            s.terminate();
            assert_eq!(s, Terminated);
        }
        for by in CLOSERS {
            assert_eq!(after(Terminated, |s| s.close(by)), (Terminated, false));
        }
        assert_eq!(
            after(Terminated, Lifecycle::peer_closed),
            (Terminated, false)
        );
        assert_eq!(after(Terminated, Lifecycle::take), (Terminated, false));
    }

    #[test]
    fn what_each_state_allows() {
        // (state, accepts frames, delivers, reads, awaits peer, close in writer, terminated)
        let table = [
            (Active, true, true, true, false, false, false),
            (
                ClosedByUs(Pending::Queued),
                false,
                false,
                true,
                false,
                false,
                false,
            ),
            (
                ClosedByUs(Pending::Discarding),
                false,
                false,
                true,
                false,
                false,
                false,
            ),
            (
                ClosedByUs(Pending::Taken),
                false,
                false,
                true,
                false,
                true,
                false,
            ),
            (AwaitingPeer, false, false, true, true, false, false),
            (
                Ending(Pending::Queued),
                false,
                false,
                false,
                false,
                false,
                false,
            ),
            (
                Ending(Pending::Discarding),
                false,
                false,
                false,
                false,
                false,
                false,
            ),
            (
                Ending(Pending::Taken),
                false,
                false,
                false,
                false,
                true,
                false,
            ),
            (Terminated, false, false, false, false, false, true),
        ];
        assert_eq!(table.len(), all_states().len());
        for (s, frames, delivers, reads, awaits, in_writer, over) in table {
            assert_eq!(
                (
                    s.accepts_frames(),
                    s.delivers(),
                    s.reads(),
                    s.awaits_peer(),
                    s.close_in_writer(),
                    s.is_terminated()
                ),
                (frames, delivers, reads, awaits, in_writer, over),
                "{s:?}"
            );
        }
    }

    /// A clean close started by us, answered by the peer.
    #[test]
    fn our_close_handshake() {
        let mut s = Active;
        assert!(s.close(Closer::Handler));
        assert!(!s.take());
        s.close_written();
        assert!(s.awaits_peer());
        assert!(!s.peer_closed());
        assert!(s.is_terminated());
    }

    /// The peer closes while a backpressure close is queued: the echo is not
    /// queued, the writer still drops what it holds, and the connection
    /// ends without waiting once our close is out.
    #[test]
    fn the_peer_closes_during_a_backpressure_close() {
        let mut s = Active;
        assert!(s.close(Closer::Limit));
        assert!(!s.peer_closed());
        assert!(!s.reads());
        assert!(s.take());
        s.close_written();
        assert!(s.is_terminated());
    }

    /// The state is two bytes in the outbox and in the connection's task.
    #[test]
    fn lifecycle_is_small() {
        assert!(std::mem::size_of::<Lifecycle>() <= 2);
    }
}
