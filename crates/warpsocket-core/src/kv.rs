//! The process-wide key/value store: sharded maps, each key linearizable
//! because every operation on it runs under its shard's lock.
//!
//! Only the engine holds one,
//! behind its kv backend, so that a cluster node never reaches it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::shards::Shards;

pub struct Kv {
    shards: Shards<Mutex<HashMap<Bytes, Bytes>>>,
    len: AtomicUsize,
}

impl Default for Kv {
    fn default() -> Self {
        Kv {
            shards: Shards::default(),
            len: AtomicUsize::new(0),
        }
    }
}

impl Kv {
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.shards.shard(key).lock().get(key).cloned()
    }

    /// Stores `value` (or deletes the key when `None`); returns the previous value.
    pub fn set(&self, key: &[u8], value: Option<&[u8]>) -> Option<Bytes> {
        let mut shard = self.shards.shard(key).lock();
        let previous = match value {
            Some(v) => shard.insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(v)),
            None => shard.remove(key),
        };
        self.count(previous.is_some(), value.is_some());
        previous
    }

    /// Compare-and-set: when the current value equals `check` (`None`: the key
    /// is absent), store `new` (`None`: delete). Returns whether it happened.
    pub fn set_if(&self, key: &[u8], new: Option<&[u8]>, check: Option<&[u8]>) -> bool {
        let mut shard = self.shards.shard(key).lock();
        if shard.get(key).map(|v| v.as_ref()) != check {
            return false;
        }
        let existed = check.is_some();
        match new {
            Some(v) => {
                shard.insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(v));
            }
            None => {
                shard.remove(key);
            }
        }
        self.count(existed, new.is_some());
        true
    }

    fn count(&self, existed: bool, exists: bool) {
        match (existed, exists) {
            (false, true) => {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_get_and_delete() {
        let kv = Kv::default();
        assert_eq!(kv.set(b"k", Some(b"1")), None);
        assert_eq!(kv.set(b"k", Some(b"2")).as_deref(), Some(&b"1"[..]));
        assert_eq!(kv.get(b"k").as_deref(), Some(&b"2"[..]));
        assert_eq!(kv.len(), 1);
        assert_eq!(kv.set(b"k", None).as_deref(), Some(&b"2"[..]));
        assert_eq!(kv.get(b"k"), None);
        assert!(kv.is_empty());
    }

    #[test]
    fn compare_and_set_semantics() {
        let kv = Kv::default();
        assert!(
            !kv.set_if(b"k", Some(b"x"), Some(b"y")),
            "check against a missing key"
        );
        assert!(
            kv.set_if(b"k", Some(b"x"), None),
            "absent-check on a missing key"
        );
        assert!(
            !kv.set_if(b"k", Some(b"z"), None),
            "absent-check on a present key"
        );
        assert!(kv.set_if(b"k", Some(b"z"), Some(b"x")));
        assert!(kv.set_if(b"k", None, Some(b"z")), "delete on success");
        assert_eq!(kv.get(b"k"), None);
        assert_eq!(kv.len(), 0);
    }

    #[test]
    fn concurrent_cas_counter_counts_every_success() {
        let kv = Arc::new(Kv::default());
        kv.set(b"n", Some(b"0"));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let kv = kv.clone();
                std::thread::spawn(move || {
                    let mut wins = 0u64;
                    for _ in 0..2000 {
                        let current = kv.get(b"n").unwrap();
                        let n: u64 = std::str::from_utf8(&current).unwrap().parse().unwrap();
                        if kv.set_if(b"n", Some((n + 1).to_string().as_bytes()), Some(&current)) {
                            wins += 1;
                        }
                    }
                    wins
                })
            })
            .collect();
        let wins: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(kv.get(b"n").unwrap(), wins.to_string().as_bytes());
    }
}
