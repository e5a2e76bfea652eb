//! The TLS record layer of a connection, on rustls's unbuffered API: records
//! are decrypted from and encrypted into per-thread buffers, and a connection
//! keeps bytes of its own only while something is half done (a record not
//! all received, records TCP did not take all of, plaintext its reader had
//! no room for). An idle connection holds no TLS buffers.
//!
//! rustls's buffered `ServerConnection` (through tokio-rustls) kept a
//! deframer buffer and outgoing and plaintext queues per connection, and
//! copied through each of them on every read and write.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use rustls::{ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most bytes one TCP read takes (a full record and a bit: 16 KB of
/// plaintext plus its header and tag).
const READ: usize = 17 * 1024;

/// The most plaintext one write encrypts: four full records.
const MAX_WRITE: usize = 64 * 1024;

/// The most bytes a record adds to its plaintext, with a margin.
const RECORD_OVERHEAD: usize = 64;

/// Reads of records that carry no application data (rustls's own messages)
/// one poll goes through before yielding to the other tasks.
const MAX_SILENT_READS: usize = 8;

thread_local! {
    /// Received records, decrypted in place; taken out while in use.
    static CIPHERTEXT_IN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Records being written; taken out while in use.
    static CIPHERTEXT_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's `buffer` taken out (so nothing `f` calls can
/// find it borrowed), then puts it back.
fn with_buffer<R>(
    buffer: &'static std::thread::LocalKey<RefCell<Vec<u8>>>,
    f: impl FnOnce(&mut Vec<u8>) -> R,
) -> R {
    let mut taken = buffer.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let result = f(&mut taken);
    buffer.with(|b| *b.borrow_mut() = taken);
    result
}

/// The server side of an established TLS connection.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls could not use yet: the start of a record (or of
    /// a handshake message across records). Empty, unallocated, otherwise.
    incoming: Vec<u8>,
    /// Records TCP has not taken yet, from `sent` on. Emptied (and freed)
    /// once all are written.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted bytes the reader had no room for, from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// The peer sent close_notify, or TCP ended: reads return end of stream.
    read_closed: bool,
    /// Our close_notify is queued: nothing more may be written.
    write_closed: bool,
}

/// What runs with the state that encrypts: the state, and the queue of
/// records to send (for what must go after what is queued).
type OnTraffic<'a> = dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) + 'a;

/// Where [`process`] stopped.
enum Stop {
    /// Everything usable was processed; application data may be sent.
    Traffic,
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// Both sides sent close_notify.
    Closed,
}

/// Copies `plaintext` into `out`, the rest (when `out` is full) into
/// `spill`.
fn deliver(out: &mut ReadBuf<'_>, spill: &mut Vec<u8>, plaintext: &[u8]) {
    let fits = plaintext.len().min(out.remaining());
    out.put_slice(&plaintext[..fits]);
    spill.extend_from_slice(&plaintext[fits..]);
}

/// Appends what `encode` writes to `out`, growing it as `encode` asks.
fn append<E>(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let at = out.len();
    let mut size = 512;
    loop {
        out.resize(at + size, 0);
        match encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(e) => match required(&e) {
                Some(needed) if needed > size => size = needed,
                _ => {
                    out.truncate(at);
                    return Err(e);
                }
            },
        }
    }
}

fn insufficient(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Writes `bytes` to TCP from `*sent` on until all are out; Pending (with
/// the task woken once TCP takes more) when TCP is full.
fn poll_write_all(
    tcp: &mut TcpStream,
    cx: &mut Context<'_>,
    bytes: &[u8],
    sent: &mut usize,
) -> Poll<io::Result<()>> {
    while *sent < bytes.len() {
        match ready!(Pin::new(&mut *tcp).poll_write(cx, &bytes[*sent..])) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => *sent += n,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Feeds `incoming` to rustls until it needs more bytes or application data
/// may be sent. Application data goes to `on_plain`; rustls's own messages
/// (handshake, alerts, session tickets, key updates) are appended to
/// `outgoing`, in order; `on_traffic`, if given, runs once with the state
/// that encrypts. Returns how many bytes of `incoming` were used up.
fn process(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut [u8],
    outgoing: &mut Vec<u8>,
    read_closed: &mut bool,
    on_plain: &mut dyn FnMut(&[u8]),
    mut on_traffic: Option<&mut OnTraffic<'_>>,
) -> Result<(usize, Stop), rustls::Error> {
    let mut used = 0;
    loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut incoming[used..]);
        match state? {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record?;
                    discard += record.discard;
                    on_plain(record.payload);
                }
            }
            ConnectionState::EncodeTlsData(mut message) => {
                append(
                    outgoing,
                    |out| message.encode(out),
                    |e| match e {
                        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                            Some(*required_size)
                        }
                        EncodeError::AlreadyEncoded => None,
                    },
                )
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            // Queued in `outgoing`, which goes out in order before anything
            // written after: as good as sent.
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::PeerClosed => *read_closed = true,
            ConnectionState::Closed => {
                *read_closed = true;
                return Ok((used + discard, Stop::Closed));
            }
            ConnectionState::WriteTraffic(mut traffic) => {
                if let Some(f) = on_traffic.take() {
                    f(&mut traffic, outgoing);
                }
                return Ok((used + discard, Stop::Traffic));
            }
            ConnectionState::BlockedHandshake => return Ok((used + discard, Stop::Blocked)),
            // Early data, which this server does not accept.
            _ => return Err(rustls::Error::General("unexpected TLS state".into())),
        }
        used += discard;
    }
}

impl TlsStream {
    /// Runs the server side of the handshake on `tcp`, which starts with a
    /// TLS record. Holds no timer: the caller races it against its deadline.
    pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let mut stream = TlsStream {
            tcp,
            conn: UnbufferedServerConnection::new(config).map_err(io_error)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            plain_at: 0,
            read_closed: false,
            write_closed: false,
        };
        let mut incoming = Vec::with_capacity(4096);
        loop {
            let TlsStream {
                conn,
                outgoing,
                read_closed,
                plain,
                ..
            } = &mut stream;
            // A client may send its first request right after its Finished.
            let processed = process(
                conn,
                &mut incoming,
                outgoing,
                read_closed,
                &mut |bytes| plain.extend_from_slice(bytes),
                None,
            );
            let (used, stop) = match processed {
                Ok(done) => done,
                Err(e) => {
                    stream.send_alert().await;
                    return Err(io_error(e));
                }
            };
            incoming.drain(..used);
            // What rustls answered goes out before waiting for the peer.
            poll_fn(|cx| stream.poll_flush_outgoing(cx)).await?;
            match stop {
                Stop::Traffic if !stream.conn.is_handshaking() => break,
                Stop::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Stop::Traffic | Stop::Blocked => {
                    incoming.reserve(4096);
                    if stream.tcp.read_buf(&mut incoming).await? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed during the TLS handshake",
                        ));
                    }
                }
            }
        }
        if !incoming.is_empty() {
            stream.incoming = incoming;
        }
        Ok(stream)
    }

    /// The protocol the client and server agreed on with ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The TLS version agreed on.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Records are waiting for TCP to take them.
    pub(crate) fn wants_write(&self) -> bool {
        self.sent < self.outgoing.len()
    }

    /// Best effort, after rustls failed: sends the alert it queued.
    async fn send_alert(&mut self) {
        let TlsStream {
            conn,
            outgoing,
            read_closed,
            ..
        } = self;
        // A failed connection only reports its error again, after giving
        // up its queued messages.
        let _ = process(conn, &mut [], outgoing, read_closed, &mut |_| {}, None);
        let _ = poll_fn(|cx| self.poll_flush_outgoing(cx)).await;
    }

    /// Writes the queued records; Ready once all are out.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(poll_write_all(
            &mut self.tcp,
            cx,
            &self.outgoing,
            &mut self.sent
        ))?;
        // Idle connections hold no buffers.
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Runs `f` with the state that encrypts, after handing rustls whatever
    /// it holds of ours.
    fn with_traffic(&mut self, f: &mut OnTraffic<'_>) -> io::Result<()> {
        let TlsStream {
            conn,
            incoming,
            outgoing,
            plain,
            read_closed,
            ..
        } = self;
        let (used, stop) = process(
            conn,
            incoming,
            outgoing,
            read_closed,
            &mut |bytes| plain.extend_from_slice(bytes),
            Some(f),
        )
        .map_err(io_error)?;
        incoming.drain(..used);
        if incoming.is_empty() {
            *incoming = Vec::new();
        }
        match stop {
            Stop::Traffic => Ok(()),
            Stop::Blocked | Stop::Closed => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Reads and decrypts into `out`; see [`AsyncRead::poll_read`].
    fn poll_read_plain(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.plain_at < self.plain.len() {
            let rest = &self.plain[self.plain_at..];
            let n = rest.len().min(out.remaining());
            out.put_slice(&rest[..n]);
            self.plain_at += n;
            if self.plain_at == self.plain.len() {
                self.plain = Vec::new();
                self.plain_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if self.read_closed || out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let polled = with_buffer(&CIPHERTEXT_IN, |buf| self.poll_read_records(cx, out, buf));
        if self.wants_write() {
            // rustls answered something (a key update, an alert): out with
            // it now, or once TCP wakes the task, whose loop then sees
            // `wants_write`.
            if let Poll::Ready(Err(e)) = self.poll_flush_outgoing(cx) {
                return Poll::Ready(Err(e));
            }
        }
        polled
    }

    /// Reads records from TCP into `buf` after the bytes kept from before,
    /// until some application data (or the end) comes out of them.
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<()>> {
        let mut end = self.incoming.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[..end].copy_from_slice(&self.incoming);
        self.incoming = Vec::new();
        let room = out.remaining();
        let before = out.filled().len();
        let mut result = Poll::Pending;
        let mut waiting = false;
        for _ in 0..MAX_SILENT_READS {
            // Plaintext is never longer than its records: reading no more
            // than the reader has room for, less what is kept, keeps it all
            // in `out` (but for a record larger than that).
            let limit = (if room > end { room - end } else { READ }).min(READ);
            if buf.len() < end + limit {
                buf.resize(end + limit, 0);
            }
            let mut read = ReadBuf::new(&mut buf[end..end + limit]);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut read) {
                Poll::Pending => {
                    waiting = true;
                    break;
                }
                Poll::Ready(Err(e)) => {
                    result = Poll::Ready(Err(e));
                    break;
                }
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // TCP ended, with or without close_notify.
                    self.read_closed = true;
                    result = Poll::Ready(Ok(()));
                    break;
                }
                Poll::Ready(Ok(())) => end += read.filled().len(),
            }
            let TlsStream {
                conn,
                outgoing,
                plain,
                read_closed,
                ..
            } = self;
            let processed = process(
                conn,
                &mut buf[..end],
                outgoing,
                read_closed,
                &mut |bytes| deliver(out, plain, bytes),
                None,
            );
            let used = match processed {
                Ok((used, _)) => used,
                Err(e) => {
                    // The alert rustls queued goes out with the flush after.
                    let _ = process(conn, &mut [], outgoing, read_closed, &mut |_| {}, None);
                    return Poll::Ready(Err(io_error(e)));
                }
            };
            buf.copy_within(used..end, 0);
            end -= used;
            if out.filled().len() > before || !self.plain.is_empty() || self.read_closed {
                result = Poll::Ready(Ok(()));
                break;
            }
        }
        if end > 0 {
            self.incoming.extend_from_slice(&buf[..end]);
        }
        if result.is_pending() && !waiting {
            // Stopped after MAX_SILENT_READS reads with more to come: the
            // task goes on after the others had their turn.
            cx.waker().wake_by_ref();
        }
        result
    }

    /// Encrypts `data` (up to [`MAX_WRITE`] bytes of it) and writes the
    /// records; see [`AsyncWrite::poll_write`].
    fn poll_write_plain(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // Records from before go first.
        ready!(self.poll_flush_outgoing(cx))?;
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        with_buffer(&CIPHERTEXT_OUT, |buf| {
            // Room for the records, zeroed once per thread: a record adds
            // at most 30 bytes (header, TLS 1.2's explicit nonce, tag, and
            // TLS 1.3's content type).
            let room = data.len() + data.len().div_ceil(16 * 1024) * RECORD_OVERHEAD;
            if buf.len() < room {
                buf.resize(room, 0);
            }
            let mut encrypted = Ok(0);
            self.with_traffic(&mut |traffic, _| {
                encrypted = loop {
                    match traffic.encrypt(data, buf) {
                        // Not expected: rustls's own messages come out
                        // before this, and records are no larger than said.
                        Err(EncryptError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) if required_size > buf.len() => buf.resize(required_size, 0),
                        done => break done,
                    }
                };
            })?;
            let len = encrypted.map_err(|e| io::Error::other(e.to_string()))?;
            let buf = &buf[..len];
            if self.outgoing.is_empty() {
                // The fast path: straight from this thread's buffer to TCP;
                // only what TCP does not take is kept.
                let mut sent = 0;
                let polled = poll_write_all(&mut self.tcp, cx, buf, &mut sent);
                if let Poll::Ready(Err(e)) = polled {
                    return Poll::Ready(Err(e));
                }
                if sent < buf.len() {
                    self.outgoing.extend_from_slice(&buf[sent..]);
                }
            } else {
                // rustls queued a message of its own: it goes first.
                self.outgoing.extend_from_slice(buf);
                if let Poll::Ready(Err(e)) = self.poll_flush_outgoing(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            // The records are ours to send from here: the bytes count as
            // written.
            Poll::Ready(Ok(data.len()))
        })
    }

    /// Queues close_notify (once), writes what is queued, then shuts TCP's
    /// write side.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            // A connection rustls already closed has nothing to add.
            let _ = self.with_traffic(&mut |traffic, outgoing| {
                let _ = append(
                    outgoing,
                    |out| traffic.queue_close_notify(out),
                    insufficient,
                );
            });
        }
        ready!(self.poll_flush_outgoing(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for TlsStream {
    /// Application data, decrypted; nothing added at the end of the stream
    /// (the peer's close_notify, or TCP's end).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_plain(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    /// Ready once `buf` is encrypted, even when TCP took only part of the
    /// records: the rest is kept and [`TlsStream::wants_write`] says so.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_plain(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_outgoing(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close(cx)
    }
}
