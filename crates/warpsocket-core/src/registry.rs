//! Every live connection by socket id, in a sharded map.
//!
//! Ids are handed out in sequence, so the low bits spread consecutive
//! connections over the shards; a send locks one shard for reading only.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::socket::Socket;

const SHARDS: usize = 64;

/// Socket ids are already well spread: use them as their own hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Multiply so the bits hashbrown takes from the top vary too.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

pub struct Registry {
    shards: Box<[RwLock<IdMap<Arc<Socket>>>]>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| RwLock::new(IdMap::default())).collect(),
        }
    }
}

impl Registry {
    fn shard(&self, id: u64) -> &RwLock<IdMap<Arc<Socket>>> {
        &self.shards[id as usize % SHARDS]
    }

    pub fn insert(&self, socket: Arc<Socket>) {
        self.shard(socket.id).write().insert(socket.id, socket);
    }

    pub fn remove(&self, id: u64) -> Option<Arc<Socket>> {
        self.shard(id).write().remove(&id)
    }

    pub fn get(&self, id: u64) -> Option<Arc<Socket>> {
        self.shard(id).read().get(&id).cloned()
    }

    /// Runs `f` on the socket without cloning its handle.
    pub fn with<R>(&self, id: u64, f: impl FnOnce(&Socket) -> R) -> Option<R> {
        self.shard(id).read().get(&id).map(|s| f(s))
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// A snapshot of every socket.
    pub fn all(&self) -> Vec<Arc<Socket>> {
        self.shards
            .iter()
            .flat_map(|s| s.read().values().cloned().collect::<Vec<_>>())
            .collect()
    }
}
