//! The server context: what every task of one running server shares — its
//! settings, engine, workers and static files, the stop signal, the count of
//! live connection tasks, and the pending-upgrade permits.
//!
//! Owns [`Shared`] and [`LiveGuard`]. May use the engine side (engine,
//! dispatch), config, keepalive (its clock) and static_files; the upgrade,
//! connection, sweep and server modules build on it, never the other way.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::engine::Engine;
use crate::keepalive::Clock;
use crate::socket::Workers;
use crate::static_files::StaticFiles;

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
    pub(crate) fn new(
        engine: Arc<Engine>,
        config: Config,
        workers: Arc<Workers>,
        static_files: Option<Arc<StaticFiles>>,
    ) -> Arc<Shared> {
        let upgrades = Arc::new(Semaphore::new(
            config.max_pending_upgrades.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let (stop, _) = watch::channel(false);
        Arc::new(Shared {
            id: SERVER_IDS.fetch_add(1, Ordering::Relaxed) + 1,
            clock: Clock::new(),
            engine,
            config,
            workers,
            static_files,
            stop,
            upgrades,
            live: AtomicUsize::new(0),
            all_gone: Notify::new(),
        })
    }

    /// Begins shutdown: every task waiting in [`stopping`](Self::stopping) wakes.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Completes once shutdown has begun.
    pub(crate) async fn stopping(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// A pending-upgrade permit, or None when `max_pending_upgrades`
    /// connections are already in their handshake.
    pub(crate) fn try_upgrade(&self) -> Option<OwnedSemaphorePermit> {
        self.upgrades.clone().try_acquire_owned().ok()
    }

    /// Completes once no connection task is left.
    pub(crate) async fn all_gone(&self) {
        loop {
            let notified = self.all_gone.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
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

#[cfg(test)]
pub(crate) fn test_shared() -> Arc<Shared> {
    let config = Config {
        max_pending_upgrades: 1,
        ..Config::default()
    };
    Shared::new(Engine::new(), config, Arc::default(), None)
}
