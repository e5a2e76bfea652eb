//! The upgrade of one accepted TCP connection: the TLS handshake when the
//! server speaks TLS, then reads the HTTP request, answers plain HTTP (static
//! files or 426), registers the socket, waits for `handle_open`'s verdict,
//! and writes 101 or the refusal.
//!
//! Owns the handshake I/O and [`SocketGuard`], the registration every
//! upgraded connection keeps until it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::admission::Handshake;
use crate::context::{LiveGuard, Shared};
use crate::deflate;
use crate::dispatch::{Payload, ReadAt};
use crate::handshake::{self, Refusal, Request};
use crate::limits::Slot;
use crate::request_head;
use crate::socket::Socket;
use crate::stats::Counters;
use crate::tls::{AcceptError, Stream, PLAIN_HTTP};
use crate::verdict::{OpenRequest, Verdict};

/// How long to wait for the peer's close frame (or for our last bytes to be
/// written) before dropping the TCP connection.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection that was answered 101: its socket is registered and accepted.
pub(crate) struct Upgraded {
    pub(crate) stream: Stream,
    pub(crate) guard: SocketGuard,
    /// What the client sent after its request (its first frames, if any).
    pub(crate) early: Vec<u8>,
}

/// Reads the request, asks `handle_open`, and answers 101 or an error.
/// `upgrading` is the connection's slot among the pending upgrades, given
/// back once the upgrade is done (or refused); while the request is still
/// being read a newcomer may take it, which ends the connection. `live`
/// counts the connection's task.
pub(crate) async fn upgrade(
    stream: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
    mut upgrading: Handshake,
) -> Option<Upgraded> {
    let shared = &live.shared().clone();
    let (mut stream, upgrade, early) = tokio::select! {
        read = read_upgrade(stream, peer, shared) => read?,
        _ = upgrading.evicted() => return None,
    };
    upgrading.deciding();
    let Some(worker) = shared.workers.pick() else {
        refuse(
            stream,
            shared,
            Refusal::new(handshake::status::UNAVAILABLE, "no worker is available"),
        )
        .await;
        return None;
    };
    // Before `handle_open` is asked: a refused upgrade never reaches it.
    // From here on nothing returns before the guard owns the slot.
    let slot = if shared.limits.active() {
        match shared.limits.take(peer.ip()) {
            Ok(slot) => Some(Box::new(slot)),
            Err(status) => {
                Counters::add(&shared.engine.stats().connections_refused, 1);
                let reason = if status == handshake::status::UNAVAILABLE {
                    "too many connections"
                } else {
                    "too many connections from this address"
                };
                refuse(stream, shared, Refusal::new(status, reason)).await;
                return None;
            }
        }
    } else {
        None
    };
    // The answer always asks for client_no_context_takeover: see
    // deflate::negotiate.
    let (deflate, extensions) = shared
        .config
        .compression
        .then(|| {
            let (_, offers) = upgrade
                .headers
                .iter()
                .find(|(name, _)| name == "sec-websocket-extensions")?;
            deflate::negotiate(offers)
        })
        .flatten()
        .unzip();
    let max_backpressure = shared.config.max_backpressure;
    let socket = shared
        .engine
        .add_socket(|id| Socket::new(id, worker, max_backpressure).with_deflate(deflate));
    socket.worker.connection_opened();
    let guard = SocketGuard { socket, live, slot };
    let socket = &guard.socket;

    if shared.config.handlers.open {
        let verdict = shared.engine.wait_for_verdict(socket.id);
        socket.worker.push(
            socket,
            Payload::Open(Box::new(OpenRequest {
                ip: peer.ip().to_canonical().to_string(),
                path: upgrade.path.clone(),
                headers: upgrade.headers.clone(),
            })),
            ReadAt::now(),
        );
        let verdict = tokio::select! {
            v = verdict => v.unwrap_or(Verdict::Refuse(handshake::status::INTERNAL_ERROR)),
            _ = tokio::time::sleep(shared.config.open_timeout) => Verdict::Refuse(handshake::status::INTERNAL_ERROR),
            _ = shared.stopping() => return None,
        };
        if let Verdict::Refuse(status) = verdict {
            refuse(
                stream,
                shared,
                Refusal::new(status, "connection refused by the application"),
            )
            .await;
            return None;
        }
    } else {
        socket.accept();
    }
    stream
        .write_all(&handshake::accept_response(&upgrade, extensions.as_deref()))
        .await
        .ok()?;
    drop(upgrading);
    Some(Upgraded {
        stream,
        guard,
        early,
    })
}

/// Runs the TLS handshake when the server speaks TLS, then reads the
/// request: an upgrade request comes back with what the client sent after
/// it; anything else is answered here.
async fn read_upgrade(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(Stream, handshake::Upgrade, Vec<u8>)> {
    let _ = tcp.set_nodelay(true);
    // One time limit for the TLS handshake and the request together, so a
    // client cannot take it twice.
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let mut stream = match &shared.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let accepted = tokio::select! {
                // Boxed: only a TLS server needs it, and rustls's state is large.
                r = tokio::time::timeout_at(deadline, Box::pin(tls.accept(tcp))) => r,
                _ = shared.stopping() => return None,
            };
            match accepted {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    if let AcceptError::PlainHttp = e {
                        let stats = shared.engine.stats();
                        stats.handshakes_refused.count(PLAIN_HTTP.status);
                    }
                    log::debug!(target: "warpsocket", "{peer}: {e}");
                    return None;
                }
                Err(_) => {
                    log::debug!(target: "warpsocket", "{peer}: TLS handshake timed out");
                    return None;
                }
            }
        }
    };
    let read = tokio::select! {
        r = tokio::time::timeout_at(deadline, request_head::read(&mut stream)) => r,
        _ = shared.stopping() => return None,
    };
    let (request, early) = match read {
        Ok(Ok(Ok(Some(parsed)))) => parsed,
        Ok(Ok(Err(refusal))) => {
            refuse(stream, shared, refusal).await;
            return None;
        }
        // The peer left, broke the connection, or was too slow.
        Ok(Ok(Ok(None))) | Ok(Err(_)) | Err(_) => return None,
    };
    match request {
        Request::Upgrade(upgrade) => Some((stream, upgrade, early)),
        Request::Plain {
            method,
            path,
            headers,
        } => {
            plain_http(stream, shared, method, path, headers).await;
            None
        }
    }
}

/// A static-file response, read from disk on tokio's blocking pool. `None`
/// when there is nothing to write: the work panicked, a bug in the static-file
/// code that is logged rather than only dropping the connection, or was
/// cancelled by the runtime's shutdown, which is nothing to report.
async fn off_the_io_thread<F>(respond: F) -> Option<Vec<u8>>
where
    F: FnOnce() -> Vec<u8> + Send + 'static,
{
    match tokio::task::spawn_blocking(respond).await {
        Ok(response) => Some(response),
        Err(e) => {
            if e.is_panic() {
                log::warn!(target: "warpsocket", "static file response panicked, connection dropped: {e}");
            }
            None
        }
    }
}

/// Answers a request that is not an upgrade: a static file when a folder is
/// configured, else 426. Boxed, like [`refuse`]: inline, this rarer path's
/// state would enlarge every pending handshake's future.
fn plain_http(
    mut stream: Stream,
    shared: &Shared,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let Some(files) = shared.static_files.clone() else {
            return refuse(stream, shared, handshake::WEBSOCKET_ONLY).await;
        };
        let Some(response) =
            off_the_io_thread(move || files.respond(&method, &path, &headers)).await
        else {
            return;
        };
        let _ = tokio::time::timeout(shared.config.handshake_timeout, async {
            stream.write_all(&response).await?;
            stream.shutdown().await
        })
        .await;
    })
}

/// Answers with an HTTP error and ends the connection. Boxed: its state (a
/// timer and the write) would otherwise sit in every pending handshake's
/// future, a transient allocation that, like a request buffer (see
/// `request_head`), leaves holes among the connections' long-lived ones.
fn refuse(
    mut stream: Stream,
    shared: &Shared,
    refusal: Refusal,
) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        shared
            .engine
            .stats()
            .handshakes_refused
            .count(refusal.status);
        let response = handshake::refusal_response(refusal);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            stream.write_all(&response).await?;
            stream.shutdown().await
        })
        .await;
    })
}

/// Unregisters the socket however the task ends (also when the runtime drops
/// it at shutdown), and owes the worker exactly one close event.
pub(crate) struct SocketGuard {
    pub(crate) socket: Arc<Socket>,
    /// Dropped after the cleanup below: the task counts as live until then.
    live: LiveGuard,
    /// Its place under `max_connections`/`max_connections_per_ip`, if one
    /// is set. Boxed: one pointer in every connection's task state, and
    /// the allocation only when a limit is on.
    slot: Option<Box<Slot>>,
}

impl SocketGuard {
    pub(crate) fn shared(&self) -> &Shared {
        self.live.shared()
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let socket = &self.socket;
        // The close event is queued by the engine, just before the presence
        // changes of this close: `handle_close` runs before `handle_presence`.
        self.shared().engine.remove_socket(socket.id, || {
            socket.mark_closed();
            if socket.is_accepted() {
                socket.worker.push(socket, Payload::Close, ReadAt::now());
            }
        });
        if let Some(slot) = self.slot.take() {
            self.shared().limits.release(*slot);
        }
        // Last: a retired worker's successor stops watching its queue once
        // the count is 0, so every close event must already be queued.
        self.socket.worker.connection_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Keeps the warnings logged in this test binary (the first logger set
    /// wins, and no other test of the crate sets one).
    struct Warnings(Mutex<Vec<String>>);

    impl log::Log for Warnings {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                if let Ok(mut kept) = self.0.lock() {
                    kept.push(format!("{}: {}", record.target(), record.args()));
                }
            }
        }
        fn flush(&self) {}
    }

    static WARNINGS: Warnings = Warnings(Mutex::new(Vec::new()));

    #[tokio::test]
    async fn a_static_file_response_that_panics_is_logged_and_gives_nothing() {
        let _ = log::set_logger(&WARNINGS);
        log::set_max_level(log::LevelFilter::Warn);
        assert_eq!(
            off_the_io_thread(|| b"ok".to_vec()).await,
            Some(b"ok".to_vec())
        );
        assert_eq!(off_the_io_thread(|| panic!("a bug")).await, None);
        let kept = WARNINGS
            .0
            .lock()
            .map(|kept| kept.clone())
            .unwrap_or_default();
        assert!(
            kept.iter()
                .any(|w| w.starts_with("warpsocket: static file response panicked")),
            "{kept:?}"
        );
    }
}
