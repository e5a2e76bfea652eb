//! The server context: what every task of one running server shares — its
//! settings, engine, workers, static files and TLS, the stop signal, the count
//! of live connection tasks, and the connections still in their handshake.
//!
//! Owns [`Shared`] and [`LiveGuard`]; the rule of who may hold a handshake
//! slot is `admission`'s.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::admission::{Handshake, PendingUpgrades};
use crate::config::Config;
use crate::engine::Engine;
use crate::limits::{ConnectionLimits, RateLimit};
use crate::socket::Workers;
use crate::static_files::StaticFiles;
use crate::tls::Tls;

/// State shared by the server's tasks.
pub(crate) struct Shared {
    pub(crate) engine: Arc<Engine>,
    pub(crate) config: Config,
    pub(crate) workers: Arc<Workers>,
    pub(crate) static_files: Option<Arc<StaticFiles>>,
    /// Every connection starts with a TLS handshake when set.
    pub(crate) tls: Option<Tls>,
    /// Flips to true once when shutdown begins.
    stop: watch::Sender<bool>,
    /// The connections still in their handshake (up to the verdict of
    /// `handle_open`).
    upgrades: Arc<PendingUpgrades>,
    /// `max_message_rate`, if set.
    pub(crate) rate_limit: Option<RateLimit>,
    /// `max_connections` and `max_connections_per_ip`.
    pub(crate) limits: ConnectionLimits,
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
        tls: Option<Tls>,
    ) -> Arc<Shared> {
        let upgrades = Arc::new(PendingUpgrades::new(config.max_pending_upgrades));
        let (stop, _) = watch::channel(false);
        let rate_limit = config.max_message_rate.map(RateLimit::new);
        let limits = ConnectionLimits::new(config.max_connections, config.max_connections_per_ip);
        Arc::new(Shared {
            rate_limit,
            limits,
            engine,
            config,
            workers,
            static_files,
            tls,
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

    /// Admits a connection from `peer` to its handshake, dropping an older
    /// one still reading its request if that takes room (see
    /// [`PendingUpgrades`]). None only when every slot is waiting for
    /// `handle_open`'s verdict.
    pub(crate) fn admit(&self, peer: IpAddr) -> Option<Handshake> {
        PendingUpgrades::admit(&self.upgrades, peer)
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
    Shared::new(Engine::new(), config, Arc::default(), None, None)
}
