//! One connection's task: the upgrade, then the open connection — reading
//! frames into worker events, writing the outbox, the close handshake — in a
//! single task so an idle connection costs one small future and no buffers.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::admission::Handshake;
use crate::clock;
use crate::context::LiveGuard;
use crate::dispatch::{Payload, ReadAt, PAUSE_READING_AT, RESUME_READING_AT};
use crate::frame::{self, close_code, Decoder, FrameBytes, Incoming, Kind};
use crate::lifecycle::{Closer, Lifecycle};
use crate::read_buffer;
use crate::socket::Socket;
use crate::stats::{Counters, NO_CODE};
use crate::tls::Stream;
use crate::upgrade::{self, SocketGuard, Upgraded, CLOSE_TIMEOUT};

/// Most frames handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// The most plaintext one TLS record carries (RFC 8446 5.1): what one
/// gathered TLS write holds.
const TLS_RECORD: usize = 16 * 1024;

thread_local! {
    /// One gather buffer per I/O thread for TLS writes (see
    /// `Writer::poll_write_gathered`): at most [`TLS_RECORD`] bytes, kept.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The task serving one accepted TCP connection until it is closed.
/// `upgrading` is the connection's pending-upgrade slot, given back once the
/// upgrade is done (or refused); `live` counts the task until it ends.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
    upgrading: Handshake,
) -> Task {
    Task::Upgrading(Box::pin(upgrade::upgrade(stream, peer, live, upgrading)))
}

/// One connection's task: every open connection keeps it for its whole life,
/// so it is written by hand rather than as an `async` block, whose state
/// would hold the arguments, the handshake's and the loop's locals side by
/// side. Tokio adds 96 bytes (and up to 8 for its own tag) and rounds tasks
/// up to 128 bytes: kept at most 152 bytes (see the test), a connection's
/// task takes 256.
pub(crate) enum Task {
    /// The handshake, in its own allocation, freed once the connection is up.
    Upgrading(Pin<Box<dyn Future<Output = Option<Upgraded>> + Send>>),
    Open(Connection),
    Done,
}

impl Future for Task {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let task = self.get_mut();
        loop {
            match task {
                Task::Upgrading(upgrade) => match upgrade.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(upgraded)) => *task = Task::Open(Connection::open(upgraded)),
                    Poll::Ready(None) => break,
                },
                Task::Open(conn) => {
                    if conn.poll_run(cx).is_pending() {
                        return Poll::Pending;
                    }
                    break;
                }
                Task::Done => return Poll::Ready(()),
            }
        }
        // Drops the connection (unregistering its socket) as soon as it ends.
        *task = Task::Done;
        Poll::Ready(())
    }
}

/// Frames taken from the outbox and not yet fully written.
#[derive(Default)]
struct Writer {
    frames: VecDeque<FrameBytes>,
    /// Bytes of the front frame already written.
    offset: usize,
}

impl Writer {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Writes as much as the stream takes now, telling `socket` of each
    /// write as it happens: a fast reader may have the bytes before this
    /// returns, and they must no longer count against the backpressure limit.
    /// Ready with the bytes of frames written (0 when only TLS records went
    /// out); Pending when nothing could be written, with the task woken once
    /// the stream can take more.
    fn poll_flush(
        &mut self,
        stream: &mut Stream,
        socket: &Socket,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut total = 0;
        let mut blocked = false;
        while !self.frames.is_empty() {
            let polled = if stream.is_tls() {
                self.poll_write_gathered(stream, cx)
            } else {
                self.poll_write_vectored(stream, cx)
            };
            let mut written = match polled {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    blocked = true;
                    break;
                }
            };
            total += written;
            socket.written(written);
            while written > 0 {
                let Some(front) = self.frames.front() else {
                    break;
                };
                let rest = front.len() - self.offset;
                if written >= rest {
                    written -= rest;
                    self.offset = 0;
                    self.frames.pop_front();
                } else {
                    self.offset += written;
                    written = 0;
                }
            }
        }
        if self.frames.is_empty() {
            // Idle connections hold no buffers; a busy one allocates once per burst.
            self.frames = VecDeque::new();
        }
        // TLS: the frames' records (or a message of rustls's own) that TCP
        // did not take all of wait in the stream.
        if stream.wants_write() {
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => blocked = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => blocked = true,
            }
        }
        if total == 0 && blocked {
            return Poll::Pending;
        }
        Poll::Ready(Ok(total))
    }

    /// Plain TCP: one `writev` of up to [`MAX_IOVECS`] frames, no copy.
    fn poll_write_vectored(
        &self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut count = 0;
        for (i, frame) in self.frames.iter().take(MAX_IOVECS).enumerate() {
            let start = if i == 0 { self.offset } else { 0 };
            slices[i] = IoSlice::new(&frame[start..]);
            count += 1;
        }
        Pin::new(stream).poll_write_vectored(cx, &slices[..count])
    }

    /// TLS: the frames copied into one buffer of up to a full record's
    /// plaintext and encrypted as one slice (rustls encrypts one slice at a
    /// time), so a pass becomes one record (or a few full ones) and one
    /// write of them. A first frame of a record or more goes as it is (the
    /// stream cuts it into records).
    fn poll_write_gathered(
        &self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let Some(front) = self.frames.front() else {
            return Poll::Ready(Ok(0));
        };
        let first = &front[self.offset..];
        if first.len() >= TLS_RECORD || self.frames.len() == 1 {
            return Pin::new(stream).poll_write(cx, first);
        }
        GATHER.with(|gather| {
            let mut buf = gather.borrow_mut();
            buf.clear();
            buf.reserve_exact(TLS_RECORD);
            buf.extend_from_slice(first);
            for frame in self.frames.iter().skip(1) {
                // Part of a frame fills the record; the offset keeps its rest.
                let room = TLS_RECORD - buf.len();
                buf.extend_from_slice(&frame[..frame.len().min(room)]);
                if buf.len() == TLS_RECORD {
                    break;
                }
            }
            Pin::new(stream).poll_write(cx, &buf)
        })
    }
}

pub(crate) struct Connection {
    stream: Stream,
    /// The socket and the server; cleans up when the connection ends.
    guard: SocketGuard,
    decoder: Decoder,
    writer: Writer,
    /// Armed once our close frame is written while the peer's is awaited.
    /// Only closing connections have a timer, in its own allocation.
    close_deadline: Option<Pin<Box<Sleep>>>,
    /// This task's view of the close lifecycle, whose authoritative value is
    /// in the outbox: a copy of the state returned by each of its locked
    /// calls to the socket, so reading it per frame takes no lock.
    life: Lifecycle,
    /// Its handlers fell [`PAUSE_READING_AT`] events behind: neither read
    /// nor decoded until they are down to [`RESUME_READING_AT`]. Not part of
    /// the lifecycle: flow control comes and goes in any state that reads,
    /// is decided by the worker's backlog rather than by frames, and only
    /// this task looks at it.
    paused: bool,
}

impl Connection {
    /// The connection is open: fed with what came after the request.
    fn open(upgraded: Upgraded) -> Self {
        let Upgraded {
            stream,
            guard,
            early,
        } = upgraded;
        let shared = guard.shared();
        let decoder = Decoder::new(
            shared.config.max_message_size,
            guard.socket.deflate().is_some(),
        );
        // From now on the server's keepalive sweep pings it.
        guard.socket.keepalive.start(clock::now_ms());
        let mut conn = Connection {
            stream,
            guard,
            decoder,
            writer: Writer::default(),
            close_deadline: None,
            life: Lifecycle::Active,
            paused: false,
        };
        if !early.is_empty() {
            conn.on_bytes(&early);
        }
        conn
    }

    /// Serves the open connection until it ends: reads frames into events,
    /// writes the outbox, runs the close handshake.
    ///
    /// Waits on, in this order: its outbox (frames, a close, reading may
    /// resume), the stream (reading and/or writing), the close deadline.
    /// Polled by hand rather than with `select!` over `Notify::notified` and
    /// the stream's futures: those carry waiter nodes that every waiting
    /// connection would keep in its task, while the socket and the stream's
    /// `poll_*` methods keep one waker each.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.life.is_terminated() {
                break;
            }
            if self.life.awaits_peer() && self.close_deadline.is_none() {
                // Our close frame is out: the peer gets a moment to answer.
                self.close_deadline = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
            }
            if self.guard.socket.poll_woken(cx).is_ready() {
                self.take_outbox();
                continue;
            }
            let inflight = self.guard.socket.inflight();
            if inflight >= PAUSE_READING_AT {
                self.pause();
            } else if self.paused && inflight <= RESUME_READING_AT {
                self.paused = false;
                // Frames read before the pause come before anything read now.
                self.decode(&[]);
                continue;
            }
            let reading = self.life.reads() && !self.paused;
            let writing = !self.writer.is_empty() || self.stream.wants_write();
            let read = reading && self.poll_read(cx).is_ready();
            let wrote = writing && self.poll_write(cx).is_ready();
            if read || wrote {
                continue;
            }
            if let Some(sleep) = &mut self.close_deadline {
                if sleep.as_mut().poll(cx).is_ready() {
                    break;
                }
            }
            return Poll::Pending;
        }
        // Best effort, not awaited: completes at once for TCP (shutdown(2) of
        // the write side); with TLS it first sends what TCP takes of a
        // close_notify.
        let _ = Pin::new(&mut self.stream).poll_shutdown(cx);
        Poll::Ready(())
    }

    fn take_outbox(&mut self) {
        // After a backpressure close, a frame already partly written must be
        // finished so the close frame after it is well-formed.
        let keep_front = self.writer.offset > 0;
        self.life = self.guard.socket.take(&mut self.writer.frames, keep_front);
    }

    /// Ready once something was written or writing failed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let polled = self
            .writer
            .poll_flush(&mut self.stream, &self.guard.socket, cx);
        if let Poll::Ready(Err(_)) = polled {
            self.life = self.guard.socket.mark_closed();
        }
        if self.life.close_in_writer() && self.writer.is_empty() && !self.stream.wants_write() {
            self.life = self.guard.socket.close_written();
        }
        polled.map(drop)
    }

    /// Ready once bytes were read (and decoded) or the stream ended.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (polled, drained) = read_buffer::with(|chunk| {
            let size = chunk.len();
            let mut buf = ReadBuf::new(chunk);
            let polled = Pin::new(&mut self.stream).poll_read(cx, &mut buf);
            let drained = match polled {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    self.on_bytes(buf.filled());
                    buf.filled().len() < size
                }
                Poll::Ready(_) => {
                    self.life = self.guard.socket.mark_closed();
                    false
                }
                Poll::Pending => true,
            };
            (polled, drained)
        });
        if drained && !self.paused {
            self.guard.socket.keepalive.listening();
        }
        polled.map(drop)
    }

    /// Stops reading until the handlers are down to [`RESUME_READING_AT`];
    /// meanwhile the keepalive cannot tell a silent peer from an unheard one.
    fn pause(&mut self) {
        self.paused = true;
        self.guard.socket.keepalive.deaf();
    }

    fn on_bytes(&mut self, bytes: &[u8]) {
        self.guard.socket.keepalive.heard();
        self.decode(bytes);
    }

    /// Decodes `bytes` after what the decoder holds, stopping at
    /// [`PAUSE_READING_AT`] outstanding events: one read full of small
    /// messages queues no more than that, the rest waits in the decoder.
    /// The events' queue wait starts here (for frames a paused reader held
    /// back: when it resumes).
    fn decode(&mut self, bytes: &[u8]) {
        let read_at = ReadAt::now();
        let socket = self.guard.socket.clone();
        let mut full = false;
        let mut decoder = std::mem::replace(&mut self.decoder, Decoder::new(0, false));
        let result = decoder.feed_while(
            bytes,
            &mut || {
                full = socket.inflight() >= PAUSE_READING_AT;
                !full
            },
            &mut |incoming| self.on_incoming(incoming, read_at),
        );
        self.decoder = decoder;
        // Paused even if the worker catches up at once: what the decoder
        // holds is decoded on resuming, before the next read.
        if full {
            self.pause();
        }
        if let Err(violation) = result {
            self.fail(violation.code, violation.reason);
        }
    }

    fn on_incoming(&mut self, incoming: Incoming, read_at: ReadAt) {
        match incoming {
            Incoming::Text(data) => self.on_message(Kind::Text, data, read_at),
            Incoming::Binary(data) => self.on_message(Kind::Binary, data, read_at),
            Incoming::Ping(payload) => {
                self.guard.socket.send(&frame::encode_pong(&payload));
            }
            Incoming::Pong => {}
            Incoming::Close(code) => {
                // Past `Active` ours is under way (or out) and answers it.
                let reply = (self.life == Lifecycle::Active).then(|| match code {
                    Some(code) => frame::encode_close(code, ""),
                    None => frame::encode_empty_close(),
                });
                let (echoed, life) = self.guard.socket.peer_closed(reply);
                if echoed {
                    let stats = self.guard.shared().engine.stats();
                    stats.closes.count(code.unwrap_or(NO_CODE));
                }
                self.life = life;
            }
        }
    }

    fn on_message(&mut self, kind: Kind, data: Vec<u8>, read_at: ReadAt) {
        if !self.life.delivers() {
            return;
        }
        let handlers = self.guard.shared().config.handlers;
        let handled = match kind {
            Kind::Text => handlers.text,
            Kind::Binary => handlers.binary,
        };
        if !handled {
            let what = if kind == Kind::Text { "text" } else { "binary" };
            log::debug!(target: "warpsocket",
                "socket {}: no handler for {what} messages, closing with 1003",
                self.guard.socket.id
            );
            self.fail(close_code::UNSUPPORTED, "no handler for this message type");
            return;
        }
        if let Some(limit) = &self.guard.shared().rate_limit {
            // Checked before the message is counted or queued: the excess of
            // a flood never reaches a worker.
            let now_ns = u64::try_from(clock::elapsed().as_nanos()).unwrap_or(u64::MAX);
            if !self.guard.socket.within_rate(limit, now_ns) {
                log::debug!(target: "warpsocket",
                    "socket {}: over max_message_rate, closing with 1008",
                    self.guard.socket.id
                );
                // A clean close: the peer hears why, and what it sends
                // meanwhile is read and dropped (no reset with its data
                // unread).
                if self.close(Closer::Handler, close_code::POLICY, "rate limit") {
                    let stats = self.guard.shared().engine.stats();
                    Counters::add(&stats.rate_limit_closes, 1);
                }
                return;
            }
        }
        let stats = self.guard.shared().engine.stats();
        Counters::add(&stats.messages_in, 1);
        Counters::add(&stats.bytes_in, data.len() as u64);
        let socket = &self.guard.socket;
        socket.worker.push(
            socket,
            match kind {
                Kind::Text => Payload::Text(data),
                Kind::Binary => Payload::Binary(data),
            },
            read_at,
        );
    }

    /// Fails the connection: close frame with `code`, then the TCP connection.
    fn fail(&mut self, code: u16, reason: &str) {
        self.close(Closer::Protocol, code, reason);
    }

    /// Queues our close frame with `code`; false when a close was already
    /// under way.
    fn close(&mut self, by: Closer, code: u16, reason: &str) -> bool {
        let (queued, life) = self
            .guard
            .socket
            .request_close(by, frame::encode_close(code, reason));
        if queued {
            self.guard.shared().engine.stats().closes.count(code);
        }
        self.life = life;
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass of many small frames over TLS goes out as full records (one
    /// per 16 KB of plaintext), in order, however many frames it holds.
    #[tokio::test]
    async fn a_tls_pass_of_small_frames_goes_out_as_full_records() {
        use std::future::poll_fn;
        use std::io::Read;
        use tokio::io::AsyncReadExt;

        let (server, mut tcp, mut client) = crate::tls::tests::tls12_pair().await;
        let mut stream = Stream::Tls(Box::new(server));
        let workers = crate::socket::Workers::default();
        workers.add().unwrap();
        let socket = Socket::new(1, workers.pick().unwrap(), usize::MAX);
        // 1,000 frames of 100 bytes, and one of 40 KB in the middle.
        let mut writer = Writer::default();
        let mut sent = Vec::new();
        for i in 0..1000u32 {
            let frame = if i == 500 {
                vec![b'L'; 40 * 1024]
            } else {
                vec![(i % 251) as u8; 100]
            };
            sent.extend_from_slice(&frame);
            writer.frames.push_back(FrameBytes::copy_from_slice(&frame));
        }
        // Its own task: the client reads while TCP takes the records.
        let writing = tokio::spawn(async move {
            while !writer.is_empty() || stream.wants_write() {
                poll_fn(|cx| writer.poll_flush(&mut stream, &socket, cx))
                    .await
                    .unwrap();
            }
            (stream, workers)
        });
        // Read the records off the wire, counting them, and decrypt them.
        let (mut wire, mut received, mut records) = (Vec::new(), Vec::new(), 0);
        let mut header_at = 0;
        while received.len() < sent.len() {
            let mut chunk = [0u8; 65536];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "the stream ended early");
            wire.extend_from_slice(&chunk[..n]);
            while let Some(header) = wire.get(header_at..header_at + 5) {
                assert_eq!(header[0], 0x17, "an application data record");
                records += 1;
                header_at += 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
            }
            // rustls takes a few KB per read_tls.
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                client.process_new_packets().unwrap();
                match client.reader().read_to_end(&mut received) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        drop(writing.await.unwrap());
        assert!(received == sent, "the bytes arrive whole and in order");
        // 140,860 bytes: 9 records, where a vectored write of up to 64 frames
        // per record made 18. The 40 KB frame may add two partial records
        // around it.
        let full = sent.len().div_ceil(TLS_RECORD);
        assert!(
            records <= full + 2,
            "{records} records for {full} records' worth"
        );
    }

    /// Every open connection keeps its task's state for its whole life; this
    /// keeps it from growing unnoticed (the memory target is ~2 KB per
    /// connection in all). Tokio adds 96 bytes of task header, scheduler and
    /// trailer (plus up to 8 for its own tag) and rounds tasks up to 128
    /// bytes: up to 152 bytes of state, a connection's task takes 256.
    #[tokio::test]
    async fn connection_task_state_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let shared = crate::context::test_shared();
        let slot = shared.admit(peer.ip()).unwrap();
        let task = serve(stream, peer, LiveGuard::new(&shared), slot);
        assert!(
            std::mem::size_of_val(&task) <= 152,
            "{} bytes",
            std::mem::size_of_val(&task)
        );
        drop((task, client));
    }
}
