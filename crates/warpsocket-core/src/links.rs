//! Per-id cleanup indexes: the channels a socket id is subscribed to, the
//! virtual sockets that point at it and the channels it is tracked in
//! (presence), so that deleting an id costs O(its own subscriptions and
//! tracks).
//!
//! The registry and the hub keep one per id; their lock order is in `hub`.

use std::collections::HashSet;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::presence::Links as PresenceLinks;

/// The indexes that make cleanup O(own subscriptions): the channels a socket
/// id is subscribed to and the virtual sockets that point at it.
///
/// Every connection has one, and most have no virtual socket and no or one
/// channel: one channel's name is kept inline, and the sets live in their own
/// allocation, made on the second subscription or the first child and freed
/// when both are empty again.
#[derive(Default)]
pub(crate) struct Links(Mutex<LinkState>);

#[derive(Default)]
pub(crate) struct LinkState {
    /// Set once the id is deleted; no subscription or child may be added.
    pub(crate) dead: bool,
    sets: Sets,
    /// Where the id is tracked (presence), in the presence table's ids:
    /// changed only with the presence table locked too. Empty unless it is
    /// tracked, and only then does its delete need the table.
    pub(crate) presence: PresenceLinks,
}

/// What a deleted id leaves to clean up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Killed {
    pub(crate) channels: Vec<Bytes>,
    pub(crate) children: Vec<u64>,
    pub(crate) presence: PresenceLinks,
}

#[derive(Default)]
enum Sets {
    #[default]
    Empty,
    /// The one channel and no children, without the two allocations of the
    /// sets (~110 bytes with malloc's headers, per subscribed connection).
    One(Bytes),
    Many(Box<LinkSets>),
}

#[derive(Default)]
struct LinkSets {
    channels: ChannelSet,
    children: Vec<u64>,
}

/// Above this many channels a socket's channel names go into a hash set.
const FEW_CHANNELS: usize = 16;

/// The channels of one id: a short list, or a set once it is long.
enum ChannelSet {
    Few(Vec<Bytes>),
    // Boxed so that the enum, and every socket's link sets, stay small.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<Bytes>>),
}

impl Default for ChannelSet {
    fn default() -> Self {
        ChannelSet::Few(Vec::new())
    }
}

impl ChannelSet {
    fn is_empty(&self) -> bool {
        match self {
            ChannelSet::Few(list) => list.is_empty(),
            ChannelSet::Many(set) => set.is_empty(),
        }
    }

    /// Adds a name known not to be in the set.
    fn add(&mut self, name: Bytes) {
        match self {
            ChannelSet::Few(list) if list.len() < FEW_CHANNELS => {
                // Grow one at a time while short: most sockets have one channel.
                if list.len() == list.capacity() && list.len() < 4 {
                    list.reserve_exact(1);
                }
                list.push(name);
            }
            ChannelSet::Few(list) => {
                let mut set: HashSet<Bytes> = std::mem::take(list).into_iter().collect();
                set.insert(name);
                *self = ChannelSet::Many(Box::new(set));
            }
            ChannelSet::Many(set) => {
                set.insert(name);
            }
        }
    }

    fn remove(&mut self, name: &[u8]) {
        match self {
            ChannelSet::Few(list) => {
                if let Some(i) = list.iter().position(|n| n.as_ref() == name) {
                    list.swap_remove(i);
                }
            }
            ChannelSet::Many(set) => {
                set.remove(name);
            }
        }
    }

    fn into_vec(self) -> Vec<Bytes> {
        match self {
            ChannelSet::Few(list) => list,
            ChannelSet::Many(set) => set.into_iter().collect(),
        }
    }
}

impl LinkState {
    /// Runs `f` on the sets, allocated (with the inline channel moved in) if
    /// need be.
    fn with_sets(&mut self, f: impl FnOnce(&mut LinkSets)) {
        let mut sets = match std::mem::take(&mut self.sets) {
            Sets::Many(sets) => sets,
            Sets::One(name) => {
                let mut sets = Box::<LinkSets>::default();
                sets.channels.add(name);
                sets
            }
            Sets::Empty => Box::default(),
        };
        f(&mut sets);
        self.sets = Sets::Many(sets);
    }

    /// Frees the sets once both are empty.
    fn shrink(&mut self) {
        if let Sets::Many(s) = &self.sets {
            if s.channels.is_empty() && s.children.is_empty() {
                self.sets = Sets::Empty;
            }
        }
    }

    /// Records a channel the id was just subscribed to (it was not before).
    pub(crate) fn add_channel(&mut self, name: Bytes) {
        if let Sets::Empty = self.sets {
            self.sets = Sets::One(name);
        } else {
            self.with_sets(|sets| sets.channels.add(name));
        }
    }

    pub(crate) fn remove_channel(&mut self, name: &[u8]) {
        match &mut self.sets {
            Sets::Empty => {}
            Sets::One(one) => {
                if one.as_ref() == name {
                    self.sets = Sets::Empty;
                }
            }
            Sets::Many(sets) => {
                sets.channels.remove(name);
                self.shrink();
            }
        }
    }

    pub(crate) fn add_child(&mut self, id: u64) {
        self.with_sets(|sets| sets.children.push(id));
    }

    pub(crate) fn remove_child(&mut self, id: u64) {
        if let Sets::Many(sets) = &mut self.sets {
            sets.children.retain(|&child| child != id);
            self.shrink();
        }
    }

    /// Marks the id deleted and hands over its channels, children and
    /// presence links.
    pub(crate) fn kill(&mut self) -> Killed {
        self.dead = true;
        let presence = std::mem::take(&mut self.presence);
        let (channels, children) = match std::mem::take(&mut self.sets) {
            Sets::Empty => (Vec::new(), Vec::new()),
            Sets::One(name) => (vec![name], Vec::new()),
            Sets::Many(sets) => {
                let LinkSets { channels, children } = *sets;
                (channels.into_vec(), children)
            }
        };
        Killed {
            channels,
            children,
            presence,
        }
    }

    #[cfg(test)]
    fn allocated(&self) -> bool {
        matches!(self.sets, Sets::Many(_))
    }
}

impl Links {
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, LinkState> {
        self.0.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: usize) -> Bytes {
        Bytes::from(format!("ch{i}"))
    }

    /// Every socket, connection or virtual, has one: 56 bytes, 64 with the
    /// mutex (48 and 56 before they held the presence links; a virtual
    /// socket's allocation stays 128 bytes with malloc's rounding).
    #[test]
    fn link_state_stays_small() {
        assert_eq!(std::mem::size_of::<LinkState>(), 56);
        assert_eq!(std::mem::size_of::<Links>(), 64);
    }

    #[test]
    fn one_channel_stays_inline_and_the_sets_are_freed_when_empty() {
        let links = Links::default();
        let mut state = links.lock();
        state.add_channel(name(1));
        assert!(!state.allocated(), "one channel needs no allocation");
        state.remove_channel(b"ch2");
        state.remove_channel(b"ch1");
        assert!(matches!(state.sets, Sets::Empty));
        state.add_channel(name(1));
        state.add_child(7);
        assert!(state.allocated());
        state.remove_channel(b"ch1");
        assert!(state.allocated(), "a child is left");
        state.remove_child(7);
        assert!(matches!(state.sets, Sets::Empty));
        state.remove_channel(b"nothing");
        state.remove_child(8);
        state.add_channel(name(2));
        state.add_channel(name(3));
        assert!(state.allocated());
        state.remove_channel(b"ch2");
        state.remove_channel(b"ch3");
        assert!(matches!(state.sets, Sets::Empty));
        state.add_channel(name(4));
        let killed = state.kill();
        assert_eq!((killed.channels, killed.children), (vec![name(4)], vec![]));
        assert!(state.dead);
        assert_eq!(
            state.kill(),
            Killed {
                channels: vec![],
                children: vec![],
                presence: PresenceLinks::Empty
            }
        );
    }

    #[test]
    fn many_channels_move_to_a_set_and_all_come_back_on_kill() {
        let links = Links::default();
        let mut state = links.lock();
        for i in 0..40 {
            state.add_channel(name(i));
        }
        for i in (0..40).step_by(2) {
            state.remove_channel(&name(i));
        }
        state.add_child(3);
        let Killed {
            mut channels,
            children,
            ..
        } = state.kill();
        channels.sort();
        let mut expected: Vec<Bytes> = (1..40).step_by(2).map(name).collect();
        expected.sort();
        assert_eq!((channels, children), (expected, vec![3]));
    }
}
