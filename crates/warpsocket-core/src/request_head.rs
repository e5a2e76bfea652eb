//! The one reader of an HTTP request head, for the upgrade and for the
//! plain-HTTP request a TLS port answers with 400: reads until the head is
//! complete, too large, or not HTTP, and hands back what came after it.
//!
//! One reader so that every path bounds a head the same way (the same
//! [`MAX_REQUEST_BYTES`], the same chunked reads that see an oversized head
//! as such before it is complete) and a head trickled a byte at a time costs
//! no parse per byte anywhere.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::handshake::{self, Refusal, Request};
use crate::read_buffer;

/// Most bytes a request head may have.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Bytes read at most at a time while reading the head.
const REQUEST_READ: usize = 2048;

/// Reads until a whole request is in. Returns it with what the client sent
/// after it; `Ok(None)`: the peer closed.
pub(crate) async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<Result<Option<(Request, Vec<u8>)>, Refusal>> {
    let mut buf = match poll_fn(|cx| poll_first_read(stream, cx)).await? {
        FirstRead::Closed => return Ok(Ok(None)),
        FirstRead::Done(parsed) => return Ok(parsed.map(Some)),
        FirstRead::Partial(buf) => buf,
    };
    loop {
        let before = buf.len();
        buf.reserve(REQUEST_READ);
        // At most a chunk at a time (the Vec may have grown by more), so an
        // oversized request is seen as such before it is complete.
        let read = stream.read_buf(&mut (&mut buf).limit(REQUEST_READ)).await?;
        if read == 0 {
            return Ok(Ok(None));
        }
        // A client trickling its request a byte at a time would otherwise
        // cost a parse of everything so far per packet.
        if !handshake::may_end_head(&buf, before) {
            if buf.len() > MAX_REQUEST_BYTES {
                return Ok(Err(handshake::TOO_LARGE));
            }
            continue;
        }
        match handshake::parse(&buf) {
            Ok(Some((request, used))) => return Ok(Ok(Some((request, buf.split_off(used))))),
            Ok(None) if buf.len() > MAX_REQUEST_BYTES => return Ok(Err(handshake::TOO_LARGE)),
            Ok(None) => {}
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
}

/// What the first read of a request brought.
enum FirstRead {
    Closed,
    /// The whole request (with the bytes after it), or why it is refused.
    Done(Result<(Request, Vec<u8>), Refusal>),
    /// The start of a request, to be read on.
    Partial(Vec<u8>),
}

/// The first read goes into the I/O thread's read buffer, and is parsed
/// there (so what is not HTTP at all is refused at once). A request that
/// arrives whole, as nearly all do, never gets a buffer of its own: with
/// thousands of handshakes at once, freed per-connection buffers would be
/// left between the connections' long-lived allocations, and the heap's
/// pages with them (about 100 bytes of RSS per connection at 10,000 connections).
fn poll_first_read<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
) -> Poll<io::Result<FirstRead>> {
    read_buffer::with(|scratch| {
        let mut read = ReadBuf::new(&mut scratch[..REQUEST_READ]);
        let polled = Pin::new(&mut *stream).poll_read(cx, &mut read);
        let bytes = read.filled();
        polled.map_ok(|()| {
            if bytes.is_empty() {
                return FirstRead::Closed;
            }
            match handshake::parse(bytes) {
                Ok(Some((request, used))) => FirstRead::Done(Ok((request, bytes[used..].to_vec()))),
                Ok(None) => FirstRead::Partial(bytes.to_vec()),
                Err(refusal) => FirstRead::Done(Err(refusal)),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_trickled_head_comes_whole_with_what_followed_it() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let reading = tokio::spawn(async move { read(&mut server).await });
        for byte in b"GET /a HTTP/1.1\r\nHost: x\r\n\r" {
            client.write_all(&[*byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        // The head's last byte comes with the start of what follows it.
        client.write_all(b"\nafter").await.unwrap();
        let (request, early) = reading.await.unwrap().unwrap().unwrap().unwrap();
        assert!(matches!(request, Request::Plain { path, .. } if path == "/a"));
        assert_eq!(early, b"after");
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_refused_before_it_ends() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() <= MAX_REQUEST_BYTES + REQUEST_READ {
            head.extend_from_slice(b"X-Filler: 0123456789\r\n");
        }
        client.write_all(&head).await.unwrap();
        let refused = read(&mut server).await.unwrap().unwrap_err();
        assert_eq!(refused.status, handshake::TOO_LARGE.status);
    }

    #[tokio::test]
    async fn a_peer_that_leaves_first_is_none() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HT").await.unwrap();
        drop(client);
        assert!(read(&mut server).await.unwrap().unwrap().is_none());
    }
}
