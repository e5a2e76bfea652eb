//! Every live socket id (connections and virtual sockets), in a sharded map,
//! and the walk from a virtual socket to the connection it resolves to.
//!
//! Ids are handed out in sequence, so the low bits spread consecutive
//! connections over the shards; a send locks one shard for reading only.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use crate::ids::IdMap;
use crate::links::Links;
use crate::shards::Shards;
use crate::socket::Socket;

/// Up to 15 bytes prepended to every message a virtual socket receives.
pub(crate) type Prefix = Bytes;

/// Most bytes a virtual socket's prefix may have.
pub const MAX_PREFIX: usize = 15;

/// What a socket id names.
#[derive(Clone)]
pub(crate) enum Entry {
    Real(Arc<Socket>),
    Virtual(Arc<VirtualSocket>),
}

impl Entry {
    pub(crate) fn links(&self) -> &Links {
        match self {
            Entry::Real(s) => &s.links,
            Entry::Virtual(v) => &v.links,
        }
    }
}

/// An alias of another socket id, with an optional prefix.
pub(crate) struct VirtualSocket {
    pub(crate) target: u64,
    pub(crate) prefix: Option<Prefix>,
    pub(crate) links: Links,
}

#[derive(Default)]
pub struct Registry {
    shards: Shards<RwLock<IdMap<Entry>>>,
}

impl Registry {
    pub(crate) fn insert(&self, id: u64, entry: Entry) {
        self.shards.shard_of_id(id).write().insert(id, entry);
    }

    pub(crate) fn remove(&self, id: u64) -> Option<Entry> {
        self.shards.shard_of_id(id).write().remove(&id)
    }

    pub(crate) fn get(&self, id: u64) -> Option<Entry> {
        self.shards.shard_of_id(id).read().get(&id).cloned()
    }

    /// Follows virtual sockets to the connection `id` resolves to, and the
    /// first non-empty prefix met on the way.
    pub(crate) fn resolve(&self, mut id: u64) -> Option<(Arc<Socket>, Option<Prefix>)> {
        let mut prefix: Option<Prefix> = None;
        loop {
            let shard = self.shards.shard_of_id(id).read();
            match shard.get(&id)? {
                Entry::Real(socket) => return Some((socket.clone(), prefix)),
                Entry::Virtual(v) => {
                    if prefix.is_none() {
                        prefix = v.prefix.clone();
                    }
                    // A target existed before the virtual sockets pointing
                    // at it, so chains have no cycles and the walk ends.
                    id = v.target;
                }
            }
        }
    }

    /// Calls `f` for every actual connection, one shard locked (for reading)
    /// at a time; `f` must not touch the registry.
    pub(crate) fn for_each_connection(&self, mut f: impl FnMut(&Arc<Socket>)) {
        for shard in self.shards.iter() {
            for entry in shard.read().values() {
                if let Entry::Real(socket) = entry {
                    f(socket);
                }
            }
        }
    }

    /// A snapshot of every actual connection.
    pub(crate) fn connections(&self) -> Vec<Arc<Socket>> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(shard.read().values().filter_map(|e| match e {
                Entry::Real(s) => Some(s.clone()),
                Entry::Virtual(_) => None,
            }));
        }
        all
    }
}
