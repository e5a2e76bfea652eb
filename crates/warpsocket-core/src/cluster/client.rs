//! A process that is no node talking to a cluster's sockets and channels
//! (docs/api.md#cluster-client): a Django view, a FastAPI endpoint, a task
//! queue's worker. It has no sockets and no subscribers of its own, so every
//! call goes to Redis through the same `conn.rs` a node uses, with the same
//! messages and keys: a request for a socket goes to the node that owns it
//! (its number is in the id), a channel's message to every node, a history
//! channel's message through Redis's sequencer.
//!
//! Its broadcasts carry [`CLIENT_ORIGIN`], which no node skips.

use bytes::Bytes;
use tokio::sync::oneshot;

use super::conn::{self, Conn, REDIS_TIMEOUT};
use super::kept::Read;
use super::presence;
use super::wire::{pubsub_key, Op, CLIENT_ORIGIN};
use crate::errors::{JoinError, Unreachable};
use crate::frame::Kind;
use crate::history::{Message, Policies, Policy};
use crate::hub::Target;
use crate::ids::owner;
use crate::presence::Members;

/// A connection to a cluster's Redis, for a process that is no node.
/// Thread-safe; [`disconnect`](Self::disconnect) (or dropping it) stops its
/// runtime's thread and closes its connections.
pub struct Client {
    conn: Conn,
    /// The history policies the cluster's nodes were started with.
    history: Policies,
}

impl Client {
    /// Connects to Redis at `url`. Fails when the URL is bad, or Redis does
    /// not answer (and take a pub/sub connection) within 3 s each.
    pub fn connect(url: &str, history: Policies) -> Result<Client, JoinError> {
        let (conn, redis_client) = Conn::open(
            url,
            "warpsocket-client",
            "the Cluster client is disconnected",
            Box::new(|_| {}),
        )?;
        let (ready, watching) = oneshot::channel();
        conn.handle.spawn(conn::watch_up(
            redis_client,
            conn.up.clone(),
            conn.stop_signal(),
            ready,
        ));
        let watching = conn
            .handle
            .block_on(async { tokio::time::timeout(REDIS_TIMEOUT, watching).await });
        if !matches!(watching, Ok(Ok(()))) {
            conn.close();
            return Err(JoinError::Unreachable {
                url: url.to_owned(),
                why: format!("no pub/sub connection within {REDIS_TIMEOUT:?}"),
            });
        }
        Ok(Client { conn, history })
    }

    /// Stops the runtime and closes the Redis connections; calls after it
    /// fail (sends count 0). From a thread outside the runtime.
    pub fn disconnect(&self) {
        self.conn.close();
    }

    pub fn is_disconnected(&self) -> bool {
        self.conn.is_closed()
    }

    /// True while the client's pub/sub connection to Redis is up.
    pub fn redis_connected(&self) -> bool {
        self.conn.is_up()
    }

    fn policy(&self, channel: &[u8]) -> Option<Policy> {
        self.history.find(channel)
    }

    /// Hands a message for every target to Redis; returns how many were
    /// (a socket id no node handed out counts 0).
    pub fn send(&self, targets: &[Target], kind: Kind, payload: &[u8]) -> usize {
        let mut sent = 0;
        for target in targets {
            let handed = match target {
                Target::Socket(id) if owner(*id) == 0 => false,
                Target::Socket(id) => {
                    let op = Op::Send {
                        id: *id,
                        kind,
                        payload,
                    };
                    self.conn.forward(*id, &op)
                }
                Target::Channel(name) => match self.policy(name) {
                    Some(policy) => self.conn.send_kept(name.clone(), policy, kind, payload),
                    None => self.conn.broadcast(CLIENT_ORIGIN, name, kind, payload),
                },
            };
            sent += usize::from(handed);
        }
        sent
    }

    /// Forwards the subscription change to the nodes that own the sockets,
    /// and a channel target's to every node. Returns nothing: which ids
    /// became subscribed is known only on their nodes.
    pub fn subscribe(&self, targets: &[Target], channel: &[u8], delta: i64) {
        let mut ids = Vec::new();
        for target in targets {
            match target {
                Target::Socket(id) if owner(*id) == 0 => {}
                Target::Socket(id) => ids.push(*id),
                Target::Channel(source) => {
                    self.conn
                        .subscribe_channel(CLIENT_ORIGIN, source, channel, delta);
                }
            }
        }
        self.conn.forward_subscribe(ids, channel, delta, |_| {});
    }

    /// Whether any node has subscribers for `channel` (a node listens on a
    /// channel's pub/sub key exactly while it has some); false when Redis
    /// cannot be asked, as a node answers for the others then.
    pub fn has_subscriptions(&self, channel: &[u8]) -> bool {
        let key = pubsub_key(channel, self.policy(channel).is_some());
        self.conn.listeners(&key).is_ok_and(|n| n > 0)
    }

    /// Forwards a close to the node that owns `id`; true when handed to
    /// Redis.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        if owner(id) == 0 {
            return false;
        }
        let op = Op::Close {
            id,
            code,
            reason: reason.as_bytes(),
        };
        self.conn.forward(id, &op)
    }

    fn read(&self, channel: &[u8], since: u64, limit: usize) -> Result<Option<Read>, Unreachable> {
        let Some(policy) = self.policy(channel) else {
            return Ok(None);
        };
        self.conn
            .read(channel, policy, since, limit, None)
            .map(Some)
    }

    /// `(epoch, last offset)` of a history channel, as the nodes see it;
    /// None when no policy covers it.
    pub fn position(&self, channel: &[u8]) -> Result<Option<(String, u64)>, Unreachable> {
        Ok(self.read(channel, 0, 0)?.map(|read| {
            let epoch = String::from_utf8_lossy(&read.epoch).into_owned();
            (epoch, read.last)
        }))
    }

    /// The kept messages of a history channel after `since`, at most `limit`.
    pub fn history(
        &self,
        channel: &[u8],
        since: u64,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, Unreachable> {
        Ok(self.read(channel, since, limit)?.map(|read| read.kept))
    }

    pub fn get_key(&self, key: &[u8]) -> Result<Option<Bytes>, Unreachable> {
        self.conn.get_key(key)
    }

    pub fn set_key(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Bytes>, Unreachable> {
        self.conn.set_key(key, value)
    }

    pub fn set_key_if(
        &self,
        key: &[u8],
        new: Option<&[u8]>,
        check: Option<&[u8]>,
    ) -> Result<bool, Unreachable> {
        self.conn.set_key_if(key, new, check)
    }

    /// The members present in `channel` across the cluster, with the info
    /// of their latest track.
    pub fn presence(&self, channel: &[u8]) -> Result<Members, Unreachable> {
        presence::members(&self.conn, channel)
    }

    /// How many members are present in `channel` across the cluster.
    pub fn presence_count(&self, channel: &[u8]) -> Result<usize, Unreachable> {
        presence::count(&self.conn, channel)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.conn.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{node_number, MAX_NODE};

    #[test]
    fn no_node_takes_the_clients_origin_so_every_node_delivers_its_broadcasts() {
        assert!((1..=2 * MAX_NODE + 1).all(|n| node_number(n) != CLIENT_ORIGIN));
    }
}
