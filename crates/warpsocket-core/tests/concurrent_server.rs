//! A real server under concurrent use from many threads, end to end: a tokio
//! server on loopback TCP, real WebSocket clients (tungstenite's blocking
//! client) that connect, talk, close, drop or get refused, two "worker"
//! threads draining their queues like the Python workers do, and "meddler"
//! threads that call subscribe / send / broadcast / virtual sockets / kv /
//! close on whatever connections exist while they come and go.
//!
//! It asserts the engine's bookkeeping invariants (every accepted connection
//! gets exactly one close event, after its other events; nothing is left in a
//! channel or registry once everything closed; the kv counter equals the
//! compare-and-set wins), and it is the test that gives ThreadSanitizer
//! (`scripts/tsan.sh`) the dispatch paths to watch: accept, upgrade verdicts,
//! the reader pushing events, workers draining them, sends from foreign
//! threads into outboxes, the writer taking them, closes from both sides and
//! the server's shutdown.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message, WebSocket};
use warpsocket_core::{
    Config, Engine, Handlers, Kind, Payload, Server, Target, Verdict, WorkerQueue,
};

/// Client threads, and connections each opens one after the other.
const CLIENTS: usize = 4;
const CONNECTIONS_PER_CLIENT: usize = 40;
/// Messages a well-behaved connection sends (each waits for its echo).
const MESSAGES: usize = 6;
const MEDDLERS: usize = 3;
/// Connections still open when the server is shut down.
const LEFT_OPEN: usize = 6;
/// Generous: under ThreadSanitizer everything runs 5-15x slower.
const PATIENCE: Duration = Duration::from_secs(60);
const MEDDLER_CLOSE: u16 = 4000;

/// What the worker threads saw, checked at the end.
#[derive(Default)]
struct Seen {
    /// Per accepted socket: messages handled, close events.
    sockets: Mutex<HashMap<u64, (usize, usize)>>,
    /// Open connections, for the meddlers to pick from.
    live: Mutex<Vec<u64>>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    closes: AtomicUsize,
}

/// A tiny xorshift generator: the meddlers need variety, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn channel(name: &str) -> Bytes {
    Bytes::copy_from_slice(name.as_bytes())
}

/// What a worker thread does with one event: the part of the Python worker
/// that matters to the engine (verdicts, replies, subscriptions, closes).
fn handle(engine: &Engine, seen: &Seen, id: u64, payload: Payload) {
    match payload {
        Payload::Open(request) => {
            let mut sockets = seen.sockets.lock().unwrap();
            assert!(sockets.get(&id).is_none(), "socket {id}: second open event");
            if request.path == "/refuse" {
                drop(sockets);
                seen.refused.fetch_add(1, Ordering::Relaxed);
                engine.resolve_open(id, Verdict::Refuse(403));
                return;
            }
            sockets.insert(id, (0, 0));
            drop(sockets);
            // Subscribed inside "handle_open", before the verdict.
            engine.subscribe(&[Target::Socket(id)], &channel("all"), 1);
            seen.live.lock().unwrap().push(id);
            seen.accepted.fetch_add(1, Ordering::Relaxed);
            // The client may have left already: then the verdict finds nobody.
            engine.resolve_open(id, Verdict::Accept);
        }
        Payload::Text(data) => {
            note_message(seen, id);
            if data == b"close-me" {
                engine.close(id, 1000, "asked to");
                return;
            }
            let room = channel(&format!("room{}", id % 3));
            engine.subscribe(&[Target::Socket(id)], &room, 1);
            engine.send(&[Target::Socket(id)], Kind::Text, &data);
            engine.send(&[Target::Channel(room)], Kind::Text, b"room broadcast");
        }
        Payload::Binary(data) => {
            note_message(seen, id);
            engine.send(&[Target::Socket(id)], Kind::Binary, &data);
        }
        Payload::Close => {
            let mut sockets = seen.sockets.lock().unwrap();
            let entry = sockets
                .get_mut(&id)
                .unwrap_or_else(|| panic!("socket {id}: close event without an accepted open"));
            entry.1 += 1;
            assert_eq!(entry.1, 1, "socket {id}: second close event");
            drop(sockets);
            seen.live.lock().unwrap().retain(|&live| live != id);
            seen.closes.fetch_add(1, Ordering::Relaxed);
            // Like a handle_close that cleans up: the socket is in no channel
            // any more, so this changes nothing.
            assert_eq!(
                engine.subscribe(&[Target::Socket(id)], &channel("all"), -1),
                Vec::<u64>::new(),
                "socket {id}: still subscribed at its close event"
            );
        }
        Payload::Presence(change) => panic!("socket {id}: nothing is tracked here: {change:?}"),
    }
}

fn note_message(seen: &Seen, id: u64) {
    let mut sockets = seen.sockets.lock().unwrap();
    let entry = sockets
        .get_mut(&id)
        .unwrap_or_else(|| panic!("socket {id}: message before its open"));
    assert_eq!(entry.1, 0, "socket {id}: message after its close event");
    entry.0 += 1;
}

/// One worker thread: wait for the wakeup descriptor, drain, handle.
fn worker_loop(
    engine: Arc<Engine>,
    queue: Arc<WorkerQueue>,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) {
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let mut fds = libc::pollfd {
            fd: queue.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the descriptor lives as long as `queue`.
        unsafe { libc::poll(&mut fds, 1, 20) };
        let events = queue.drain();
        if events.is_empty() && stopping {
            return;
        }
        for event in events {
            let id = event.socket_id();
            handle(&engine, &seen, id, event.payload);
        }
        queue.settle();
    }
}

/// One meddler: random engine calls on random live connections.
fn meddler(engine: Arc<Engine>, seen: Arc<Seen>, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut wins = 0;
    let (room, vroom, copy) = (channel("room"), channel("vroom"), channel("copy"));
    while !stop.load(Ordering::Acquire) {
        let id = {
            let live = seen.live.lock().unwrap();
            if live.is_empty() {
                None
            } else {
                Some(live[rng.below(live.len() as u64) as usize])
            }
        };
        let Some(id) = id else {
            thread::sleep(Duration::from_millis(1));
            continue;
        };
        // Paced, so the clients get their share of the cores; a close is rare
        // so most connections live long enough to talk.
        thread::sleep(Duration::from_micros(20));
        if rng.below(400) == 0 {
            engine.close(id, MEDDLER_CLOSE, "meddler");
            continue;
        }
        match rng.below(40) {
            0..=5 => {
                engine.subscribe(&[Target::Socket(id)], &room, 1);
            }
            6..=10 => {
                engine.send(
                    &[Target::Channel(room.clone())],
                    Kind::Text,
                    b"meddler broadcast",
                );
            }
            11..=14 => {
                engine.send(
                    &[Target::Socket(id), Target::Channel(channel("all"))],
                    Kind::Binary,
                    &[1, 2, 3],
                );
            }
            15..=19 => {
                if let Ok(v) = engine.create_virtual_socket(id, Some(b"v:")) {
                    engine.subscribe(&[Target::Socket(v)], &vroom, 1);
                    engine.send(&[Target::Channel(vroom.clone())], Kind::Text, b"via vroom");
                    if rng.below(2) == 0 {
                        // False when the connection closed meanwhile (that deletes it too).
                        engine.delete_virtual_socket(v, Some(id));
                    }
                }
            }
            20..=26 => {
                // A shared counter by compare-and-set, and plain sets and gets.
                let current = engine.get_key(b"counter").unwrap();
                let n: u64 = current
                    .as_deref()
                    .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                let next = (n + 1).to_string();
                if engine
                    .set_key_if(b"counter", Some(next.as_bytes()), current.as_deref())
                    .unwrap()
                {
                    wins += 1;
                }
                let key = format!("socket:{}", id % 8);
                engine.set_key(key.as_bytes(), Some(b"x")).unwrap();
                engine.get_key(key.as_bytes()).unwrap();
            }
            27..=30 => {
                engine.has_subscriptions(&room);
                engine.subscribe(&[Target::Channel(room.clone())], &copy, 1);
                engine.subscribe(&[Target::Channel(copy.clone())], &copy, -1);
            }
            31..=36 => {
                engine.subscribe(&[Target::Socket(id)], &room, -1);
            }
            _ => {
                engine.send(&[Target::Socket(id)], Kind::Text, b"direct");
            }
        }
    }
    wins
}

/// How a client connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// By the client's close handshake, a dropped TCP connection, or the
    /// server's close (the code) when asked to close.
    Done,
    Refused,
    /// The server closed it with this code while it waited for a reply.
    ClosedBy(u16),
}

fn connect(addr: SocketAddr, path: &str) -> Result<WebSocket<TcpStream>, u16> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_nodelay(true).unwrap();
    match tungstenite::client(format!("ws://{addr}{path}"), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(HandshakeError::Failure(WsError::Http(response))) => Err(response.status().as_u16()),
        Err(e) => panic!("handshake: {e}"),
    }
}

/// Reads until `want` arrives, skipping broadcasts; `Err(code)` if the server
/// closed the connection first.
fn wait_for(ws: &mut WebSocket<TcpStream>, want: &Message) -> Result<(), u16> {
    loop {
        match ws.read() {
            Ok(ref m) if m == want => return Ok(()),
            Ok(Message::Close(frame)) => return Err(close_code(frame)),
            Ok(_) => {}
            Err(WsError::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                panic!("no reply to {want:?} within {PATIENCE:?}")
            }
            Err(e) => panic!("waiting for {want:?}: {e}"),
        }
    }
}

fn close_code(frame: Option<CloseFrame>) -> u16 {
    frame.map_or(1005, |f| f.code.into())
}

/// Reads until the connection is closed (by either side); returns the code
/// of the server's close frame, if it sent one first.
fn read_to_end(ws: &mut WebSocket<TcpStream>) -> Option<u16> {
    let mut code = None;
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => code = code.or(Some(close_code(frame))),
            Ok(_) => {}
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return code,
            Err(WsError::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                panic!("connection not closed within {PATIENCE:?}")
            }
            // A reset after the close handshake or a dropped connection.
            Err(e) => {
                eprintln!("read_to_end: {e}");
                return code;
            }
        }
    }
}

/// One client connection, in one of four behaviours.
fn client_connection(addr: SocketAddr, n: usize) -> End {
    let path = if n % 4 == 3 { "/refuse" } else { "/" };
    let mut ws = match connect(addr, path) {
        Ok(ws) => ws,
        Err(403) if n % 4 == 3 => return End::Refused,
        Err(status) => panic!("connection {n}: upgrade refused with HTTP {status}"),
    };
    assert!(n % 4 != 3, "connection {n}: should have been refused");
    let messages = if n % 4 == 1 { 1 } else { MESSAGES };
    for i in 0..messages {
        let message = if i % 2 == 0 {
            Message::text(format!("message {n}.{i}"))
        } else {
            Message::binary(format!("binary {n}.{i}").into_bytes())
        };
        ws.send(message.clone()).expect("send");
        if let Err(code) = wait_for(&mut ws, &message) {
            assert_eq!(code, MEDDLER_CLOSE, "connection {n}: unexpected close");
            read_to_end(&mut ws);
            return End::ClosedBy(code);
        }
    }
    match n % 4 {
        // The client closes.
        0 => {
            ws.close(None).expect("close");
            read_to_end(&mut ws);
        }
        // The client just goes away.
        1 => drop(ws),
        // The server closes, when asked.
        _ => {
            ws.send(Message::text("close-me")).expect("send");
            let code = read_to_end(&mut ws);
            assert!(
                matches!(code, Some(1000 | MEDDLER_CLOSE)),
                "connection {n}: closed with {code:?}"
            );
        }
    }
    End::Done
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn many_threads_use_the_engine_while_connections_come_and_go() {
    let engine = Engine::new();
    let config = Config {
        bind: vec!["127.0.0.1:0".into()],
        io_threads: 2,
        // Keepalive pings run too (the clients answer them while reading).
        ping_interval: Duration::from_millis(20),
        ping_timeout: PATIENCE,
        open_timeout: PATIENCE,
        ..Config::default()
    };
    let mut server = Server::bind(engine.clone(), config, None).unwrap();
    let addr = server.local_addrs()[0];
    let queues = [
        server.workers().add().unwrap(),
        server.workers().add().unwrap(),
    ];
    server
        .serve(Handlers {
            open: true,
            text: true,
            binary: true,
        })
        .unwrap();

    let seen = Arc::new(Seen::default());
    let stop_workers = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = queues
        .iter()
        .map(|queue| {
            let (engine, queue, seen, stop) = (
                engine.clone(),
                queue.clone(),
                seen.clone(),
                stop_workers.clone(),
            );
            thread::spawn(move || worker_loop(engine, queue, seen, stop))
        })
        .collect();
    let stop_meddlers = Arc::new(AtomicBool::new(false));
    let meddlers: Vec<_> = (0..MEDDLERS as u64)
        .map(|i| {
            let (engine, seen, stop) = (engine.clone(), seen.clone(), stop_meddlers.clone());
            thread::spawn(move || meddler(engine, seen, stop, 0x9e37_79b9_7f4a_7c15 ^ (i + 1)))
        })
        .collect();

    // Phase 1: connections open, talk and end in every way, concurrently.
    let meddler_closes = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let meddler_closes = meddler_closes.clone();
            thread::spawn(move || {
                let mut refused = 0;
                for k in 0..CONNECTIONS_PER_CLIENT {
                    match client_connection(addr, c * CONNECTIONS_PER_CLIENT + k) {
                        End::Done => {}
                        End::Refused => refused += 1,
                        End::ClosedBy(_) => {
                            meddler_closes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                refused
            })
        })
        .collect();
    let refused: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(refused, CLIENTS * CONNECTIONS_PER_CLIENT / 4);

    // Phase 2: shutdown with connections open and meddlers still busy.
    let readers: Vec<_> = (0..LEFT_OPEN)
        .map(|_| {
            let mut ws = connect(addr, "/").expect("upgrade");
            let hello = Message::text("still here");
            ws.send(hello.clone()).unwrap();
            // A meddler may close it first: then its close frame came instead.
            let early = wait_for(&mut ws, &hello).err();
            thread::spawn(move || early.or(read_to_end(&mut ws)))
        })
        .collect();
    server.shutdown(PATIENCE);
    for reader in readers {
        let code = reader.join().unwrap();
        assert!(
            matches!(code, Some(1001 | MEDDLER_CLOSE)),
            "left open, then closed with {code:?}"
        );
    }

    // Every accepted connection's close event reaches its worker.
    wait_until("every close event is handled", || {
        seen.closes.load(Ordering::Relaxed) == seen.accepted.load(Ordering::Relaxed)
    });
    stop_meddlers.store(true, Ordering::Release);
    let wins: u64 = meddlers.into_iter().map(|m| m.join().unwrap()).sum();
    stop_workers.store(true, Ordering::Release);
    for worker in workers {
        worker.join().unwrap();
    }

    let sockets = seen.sockets.lock().unwrap();
    let accepted = CLIENTS * CONNECTIONS_PER_CLIENT - refused + LEFT_OPEN;
    assert_eq!(sockets.len(), accepted);
    assert_eq!(seen.refused.load(Ordering::Relaxed), refused);
    for (id, &(_, closes)) in sockets.iter() {
        assert_eq!(closes, 1, "socket {id}: {closes} close events");
    }
    // Only a connection a meddler closed before its first message arrived
    // gets none to its worker (messages after a close are not delivered).
    let silent = sockets.values().filter(|s| s.0 == 0).count();
    assert!(silent <= meddler_closes.load(Ordering::Relaxed) as usize + LEFT_OPEN);
    assert_eq!(engine.connection_count(), 0);
    assert_eq!(engine.virtual_socket_count(), 0);
    assert_eq!(
        (engine.channel_count(), engine.subscription_count()),
        (0, 0),
        "channels left behind"
    );
    let counter = engine.get_key(b"counter").unwrap();
    assert_eq!(
        counter
            .as_deref()
            .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap()),
        wins
    );
    eprintln!(
        "{accepted} connections accepted, {refused} refused, {} closed by a meddler while \
         waiting, {wins} counter increments, {} messages in, {} frames out",
        meddler_closes.load(Ordering::Relaxed),
        warpsocket_core::stats::Counters::get(&engine.stats().messages_in),
        warpsocket_core::stats::Counters::get(&engine.stats().messages_out),
    );
}
