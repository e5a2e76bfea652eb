//! A running server: the tokio runtime, its listeners, its workers, and the
//! shutdown plumbing (one watch channel every task can wait on).

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket as RawSocket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify, Semaphore};

use crate::config::{Config, Handlers};
use crate::connection;
use crate::engine::Engine;
use crate::frame::close_code;
use crate::keepalive::{self, Clock};
use crate::socket::Workers;
use crate::static_files::StaticFiles;

/// Pending connections the kernel keeps per listener.
const BACKLOG: i32 = 1024;

/// Numbers the servers of this process, so that a keepalive sweep skips
/// the connections of another server sharing the engine.
static SERVER_IDS: AtomicU32 = AtomicU32::new(0);

/// State shared by the server's tasks.
pub(crate) struct Shared {
    /// This server's number (from 1).
    pub(crate) id: u32,
    /// The keepalive clock of its connections.
    pub(crate) clock: Clock,
    pub(crate) engine: Arc<Engine>,
    pub(crate) config: Config,
    pub(crate) workers: Arc<Workers>,
    pub(crate) static_files: Option<Arc<StaticFiles>>,
    /// Flips to true once when shutdown begins.
    stop: watch::Sender<bool>,
    /// One permit per connection still in its handshake (up to the verdict
    /// of `handle_open`).
    upgrades: Arc<Semaphore>,
    /// Connection tasks still running, and a wakeup for when that reaches 0.
    live: AtomicUsize,
    all_gone: Notify,
}

impl Shared {
    /// Completes once shutdown has begun.
    pub(crate) async fn stopping(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|stopping| *stopping).await;
    }
}

/// Counts a connection task for the whole of its life, and gives it the
/// server's shared state.
pub(crate) struct LiveGuard(Arc<Shared>);

impl LiveGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.live.fetch_add(1, Ordering::AcqRel);
        LiveGuard(shared.clone())
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_gone.notify_waiters();
        }
    }
}

pub struct Server {
    engine: Arc<Engine>,
    /// Taken by [`serve`](Self::serve), which completes it with the handlers.
    config: Option<Config>,
    workers: Arc<Workers>,
    /// Exists once serving.
    shared: Option<Arc<Shared>>,
    static_files: Option<Arc<StaticFiles>>,
    runtime: Option<Runtime>,
    listeners: Vec<StdListener>,
    addrs: Vec<SocketAddr>,
}

impl Server {
    /// Binds every address (nothing is accepted until [`serve`](Self::serve)).
    /// The error names the address that failed.
    pub fn bind(engine: Arc<Engine>, config: Config) -> io::Result<Server> {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for text in &config.bind {
            let listener = bind_one(text)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {text}: {e}")))?;
            addrs.push(listener.local_addr()?);
            listeners.push(listener);
        }
        let static_files = match &config.static_dir {
            Some(dir) => Some(Arc::new(StaticFiles::new(dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot serve static files from {}: {e}", dir.display()),
                )
            })?)),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads.max(1))
            .thread_name("warpsocket-io")
            .enable_all()
            .build()?;
        Ok(Server {
            engine,
            config: Some(config),
            workers: Arc::default(),
            shared: None,
            static_files,
            runtime: Some(runtime),
            listeners,
            addrs,
        })
    }

    /// The addresses actually bound, in the order given.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    /// Starts accepting connections. `handlers` says which handlers the
    /// worker module has, known only once the workers have loaded it.
    pub fn serve(&mut self, handlers: Handlers) -> io::Result<()> {
        let (Some(runtime), Some(mut config)) = (&self.runtime, self.config.take()) else {
            return Err(io::Error::other("server already serving or stopped"));
        };
        config.handlers = handlers;
        let upgrades = Arc::new(Semaphore::new(config.max_pending_upgrades.max(1)));
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            id: SERVER_IDS.fetch_add(1, Ordering::Relaxed) + 1,
            clock: Clock::new(),
            engine: self.engine.clone(),
            config,
            workers: self.workers.clone(),
            static_files: self.static_files.clone(),
            upgrades,
            stop,
            live: AtomicUsize::new(0),
            all_gone: Notify::new(),
        });
        let _context = runtime.enter();
        for std_listener in self.listeners.drain(..) {
            let listener = TcpListener::from_std(std_listener)?;
            runtime.spawn(accept_loop(listener, shared.clone()));
        }
        runtime.spawn(keepalive::sweep(shared.clone()));
        self.shared = Some(shared);
        Ok(())
    }

    /// Graceful shutdown: stop accepting, close every connection with 1001,
    /// wait up to `timeout` for them to finish, then drop what is left.
    /// Every accepted connection's close event has been queued on return.
    pub fn shutdown(&mut self, timeout: Duration) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.listeners.clear();
        if let Some(shared) = self.shared.clone() {
            shared.stop.send_replace(true);
            for socket in self.engine.all_connections() {
                socket.close(close_code::GOING_AWAY, "server shutdown");
            }
            runtime.block_on(async move {
                let wait = async {
                    loop {
                        let notified = shared.all_gone.notified();
                        if shared.live.load(Ordering::Acquire) == 0 {
                            return;
                        }
                        notified.await;
                    }
                };
                let _ = tokio::time::timeout(timeout, wait).await;
            });
        }
        // Tasks still running are dropped here; their guards queue the close events.
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.stopping() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(upgrading) = shared.upgrades.clone().try_acquire_owned() else {
                    // Too many connections are still in their handshake (a flood of
                    // idle or slow clients): refuse this one at once.
                    log::debug!(target: "warpsocket", "{peer}: too many pending upgrades, connection dropped");
                    drop(stream);
                    continue;
                };
                let live = LiveGuard::new(&shared);
                tokio::spawn(connection::serve(stream, peer, live, upgrading));
            }
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                log::warn!(target: "warpsocket", "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn bind_one(text: &str) -> io::Result<StdListener> {
    let addr = text
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let socket = RawSocket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // Let "[::]:P" and "0.0.0.0:P" be bound side by side.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
pub(crate) fn test_shared() -> Arc<Shared> {
    let (stop, _) = watch::channel(false);
    Arc::new(Shared {
        id: SERVER_IDS.fetch_add(1, Ordering::Relaxed) + 1,
        clock: Clock::new(),
        engine: Engine::new(),
        config: Config::default(),
        workers: Arc::default(),
        static_files: None,
        upgrades: Arc::new(Semaphore::new(1)),
        stop,
        live: AtomicUsize::new(0),
        all_gone: Notify::new(),
    })
}
