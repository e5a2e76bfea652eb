//! A running server: the tokio runtime, its listeners, its workers; it
//! starts the accept loops and the keepalive sweep, and shuts them down.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket as RawSocket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use crate::config::{Config, Handlers};
use crate::connection;
use crate::context::{LiveGuard, Shared};
use crate::dispatch;
use crate::engine::Engine;
use crate::frame::close_code;
use crate::socket::Workers;
use crate::static_files::StaticFiles;
use crate::stats::Counters;
use crate::sweep;
use crate::tls::Tls;

/// Pending connections the kernel keeps per listener.
const BACKLOG: i32 = 1024;

pub struct Server {
    engine: Arc<Engine>,
    /// Taken by [`serve`](Self::serve), which completes it with the handlers.
    config: Option<Config>,
    workers: Arc<Workers>,
    /// Exists once serving.
    shared: Option<Arc<Shared>>,
    static_files: Option<Arc<StaticFiles>>,
    tls: Option<Tls>,
    runtime: Option<Runtime>,
    listeners: Vec<StdListener>,
    addrs: Vec<SocketAddr>,
}

impl Server {
    /// Binds every address (nothing is accepted until [`serve`](Self::serve)).
    /// With `tls` (see [`Tls::load`], called before this so a bad certificate
    /// binds nothing), every address speaks TLS only. The error names the
    /// address that failed.
    pub fn bind(engine: Arc<Engine>, config: Config, tls: Option<Tls>) -> io::Result<Server> {
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
            // Workers are woken once per pass over the ready connections, not
            // per first event: see dispatch::flush_wakeups.
            .on_thread_park(dispatch::flush_wakeups)
            .on_thread_stop(dispatch::flush_wakeups)
            .enable_all()
            .build()?;
        // Before the workers start: their handle_start may use the history.
        engine.set_history(config.history.clone());
        let workers = Arc::new(Workers::default());
        engine.set_workers(Some(workers.clone()));
        Ok(Server {
            engine,
            config: Some(config),
            workers,
            shared: None,
            static_files,
            tls,
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

    /// Takes a hung worker out of the rotation and ends its connections at
    /// once: closed with 1011, or refused with 500 while still upgrading.
    /// Returns the number of connections ended.
    pub fn retire_worker(&self, worker_id: u32) -> usize {
        self.workers.retire(worker_id);
        Counters::add(&self.engine.stats().worker_retirements, 1);
        self.engine
            .end_worker_connections(worker_id, close_code::INTERNAL, "worker hung")
    }

    /// Starts accepting connections. `handlers` says which handlers the
    /// worker module has, known only once the workers have loaded it.
    pub fn serve(&mut self, handlers: Handlers) -> io::Result<()> {
        let (Some(runtime), Some(mut config)) = (&self.runtime, self.config.take()) else {
            return Err(io::Error::other("server already serving or stopped"));
        };
        config.handlers = handlers;
        let shared = Shared::new(
            self.engine.clone(),
            config,
            self.workers.clone(),
            self.static_files.clone(),
            self.tls.take(),
        );
        let _context = runtime.enter();
        for std_listener in self.listeners.drain(..) {
            let listener = TcpListener::from_std(std_listener)?;
            runtime.spawn(accept_loop(listener, shared.clone()));
        }
        runtime.spawn(sweep::run(shared.clone()));
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
            shared.stop();
            for socket in self.engine.all_connections() {
                if socket.close(close_code::GOING_AWAY, "server shutdown") {
                    self.engine.stats().closes.count(close_code::GOING_AWAY);
                }
            }
            runtime.block_on(async move {
                let _ = tokio::time::timeout(timeout, shared.all_gone()).await;
            });
        }
        // Tasks still running are dropped here; their guards queue the close events.
        runtime.shutdown_timeout(Duration::from_secs(1));
        // The history was this server's: a server started later begins anew.
        self.engine.set_history(Default::default());
        self.engine.set_workers(None);
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
                let Some(upgrading) = shared.admit(peer.ip()) else {
                    // Every slot waits for handle_open's verdict: the
                    // application is behind, refuse this one at once.
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
