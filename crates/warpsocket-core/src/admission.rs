//! Admission to the handshake: the table of connections still upgrading,
//! at most `max_pending_upgrades`, and who makes room when it is full.
//!
//! Its own module because the rule is a defence (against slowloris and
//! reconnect churn) whose reasons and tests belong together, apart from the
//! rest of what a server's tasks share.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// The connections in their handshake, at most `max_pending_upgrades`.
///
/// Why a newcomer over the cap takes the slot of the longest-waiting
/// handshake of the source address (an IPv6 /64) that holds the most,
/// instead of being refused: refusing lets clients that never finish their
/// request (slowloris) hold every slot, and then nobody gets in until the
/// handshake timeout frees one. Taking a slot means nobody waits for one.
/// Taking it from the oldest alone is not enough: an attacker that reopens
/// each dropped connection at once churns the slots so fast that a prompt
/// client is dropped before its request arrives (measured: a few dozen
/// reconnects in the milliseconds a request takes). Taking it from the
/// largest source means the attacker's connections only ever replace each
/// other: a client from an address holding fewer slots than every attacking
/// address is never dropped, however fast the attack, and one address alone
/// can still use every slot while nobody else needs one (a proxy, a NAT).
/// A connection whose request is read and which waits for `handle_open`'s
/// verdict is never dropped (only the application makes that wait long);
/// when every slot waits so, a newcomer is refused.
pub(crate) struct PendingUpgrades {
    cap: usize,
    state: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    next: u64,
    /// Still reading their request, in the order they were admitted.
    reading: BTreeMap<u64, Reading>,
    /// How many of `reading` each source holds.
    sources: HashMap<IpAddr, usize>,
    /// Waiting for `handle_open`'s verdict.
    deciding: usize,
}

struct Reading {
    source: IpAddr,
    /// Dropped to tell the connection it was evicted.
    _evict: oneshot::Sender<()>,
}

impl PendingUpgrades {
    pub(crate) fn new(cap: usize) -> Self {
        PendingUpgrades {
            cap: cap.max(1),
            state: Mutex::default(),
        }
    }

    pub(crate) fn admit(this: &Arc<Self>, peer: IpAddr) -> Option<Handshake> {
        let source = source_of(peer);
        let (evict, evicted) = oneshot::channel();
        let mut state = this.state.lock();
        if state.reading.len() + state.deciding >= this.cap && !state.evict_from_largest_source() {
            return None;
        }
        let seq = state.next;
        state.next += 1;
        state.reading.insert(
            seq,
            Reading {
                source,
                _evict: evict,
            },
        );
        *state.sources.entry(source).or_default() += 1;
        drop(state);
        Some(Handshake {
            pending: this.clone(),
            seq,
            evicted,
            deciding: false,
        })
    }
}

impl PendingState {
    /// Drops the oldest reading connection of the source that holds the
    /// most (of those, the one whose oldest is oldest); false when none
    /// is reading. Linear in the slots, and only run when they are all taken.
    fn evict_from_largest_source(&mut self) -> bool {
        let Some(largest) = self.sources.values().copied().max() else {
            return false;
        };
        let Some(seq) = self
            .reading
            .iter()
            .find(|(_, r)| self.sources.get(&r.source) == Some(&largest))
            .map(|(seq, _)| *seq)
        else {
            return false;
        };
        self.forget(seq);
        true
    }

    fn forget(&mut self, seq: u64) {
        let Some(reading) = self.reading.remove(&seq) else {
            return;
        };
        if let Some(held) = self.sources.get_mut(&reading.source) {
            *held -= 1;
            if *held == 0 {
                self.sources.remove(&reading.source);
            }
        }
    }
}

/// IPv4 addresses count one by one; IPv6 ones by /64, the block one host
/// usually gets.
pub(crate) fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// One connection's slot among the pending upgrades, given back on drop.
pub(crate) struct Handshake {
    pending: Arc<PendingUpgrades>,
    seq: u64,
    evicted: oneshot::Receiver<()>,
    deciding: bool,
}

impl Handshake {
    /// Completes when a newcomer took this slot while the request was
    /// still being read.
    pub(crate) async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }

    /// The request is read: from now on the slot waits for `handle_open`
    /// and is never taken away. A connection evicted just before still
    /// counts here: it was prompt after all.
    pub(crate) fn deciding(&mut self) {
        let mut state = self.pending.state.lock();
        state.forget(self.seq);
        state.deciding += 1;
        self.deciding = true;
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut state = self.pending.state.lock();
        if self.deciding {
            state.deciding -= 1;
        } else {
            state.forget(self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn is_evicted(handshake: &mut Handshake) -> bool {
        handshake
            .evicted
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
    }

    #[test]
    fn a_newcomer_evicts_the_longest_waiting_reader() {
        let pending = Arc::new(PendingUpgrades::new(4));
        let mut held: Vec<Handshake> = (1..=4)
            .map(|i| PendingUpgrades::admit(&pending, ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        let mut newcomer = PendingUpgrades::admit(&pending, ip("10.0.0.9")).unwrap();
        assert!(is_evicted(&mut held[0]));
        assert!(held[1..].iter_mut().all(|h| !is_evicted(h)));
        assert!(!is_evicted(&mut newcomer));
        // The evicted one going away frees nothing twice.
        held.remove(0);
        let _next = PendingUpgrades::admit(&pending, ip("10.0.0.10")).unwrap();
        assert!(is_evicted(&mut held[0]));
    }

    #[test]
    fn the_source_holding_the_most_gives_up_its_oldest() {
        let pending = Arc::new(PendingUpgrades::new(4));
        let mut prompt = PendingUpgrades::admit(&pending, ip("10.0.0.1")).unwrap();
        let mut crowd: Vec<Handshake> = (0..3)
            .map(|_| PendingUpgrades::admit(&pending, ip("10.0.0.2")).unwrap())
            .collect();
        // However fast the crowd reconnects, it only replaces itself.
        for _ in 0..10 {
            crowd.push(PendingUpgrades::admit(&pending, ip("10.0.0.2")).unwrap());
            assert!(is_evicted(&mut crowd[0]));
            crowd.remove(0);
            assert!(!is_evicted(&mut prompt));
        }
        // IPv6 addresses of one /64 are one source: once it holds the most,
        // it gives up its own oldest.
        let mut a = PendingUpgrades::admit(&pending, ip("2001:db8::1")).unwrap();
        assert!(is_evicted(&mut crowd[0]));
        let mut b = PendingUpgrades::admit(&pending, ip("2001:db8::2")).unwrap();
        assert!(is_evicted(&mut crowd[1]));
        assert!(!is_evicted(&mut a) && !is_evicted(&mut b) && !is_evicted(&mut prompt));
        let _c = PendingUpgrades::admit(&pending, ip("2001:db8::3")).unwrap();
        assert!(is_evicted(&mut a));
    }

    #[test]
    fn a_handshake_waiting_for_its_verdict_is_never_evicted() {
        let pending = Arc::new(PendingUpgrades::new(2));
        let mut deciding: Vec<Handshake> = ["10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|a| PendingUpgrades::admit(&pending, ip(a)).unwrap())
            .collect();
        for handshake in &mut deciding {
            handshake.deciding();
        }
        assert!(PendingUpgrades::admit(&pending, ip("10.0.0.3")).is_none());
        deciding.pop();
        let _admitted = PendingUpgrades::admit(&pending, ip("10.0.0.3")).unwrap();
        assert!(PendingUpgrades::admit(&pending, ip("10.0.0.4")).is_some());
    }
}
