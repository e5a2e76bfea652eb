//! Presence (docs/api.md#presence): who is present in which channel, each
//! member counted once however many sockets it is tracked through.
//!
//! Two indexes kept in step: per channel, its members (each with how many
//! sockets track it there and the info of its latest track), and per socket
//! id, the channels it is tracked in and as whom, so that forgetting a
//! socket costs O(its own tracks). Every change of a member between absent
//! and present comes back as a [`Change`], in the order it happened, for the
//! caller to report. It takes no lock and knows nothing of sockets: the hub
//! keeps it under one mutex, and `O` is what it needs to know of a tracked
//! socket (the connection whose worker hears of its changes).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// A member's info, as `presence()` gives it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// Given as `str`: valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
}

/// The members present in a channel, each with the info of its latest track.
pub type Members = Vec<(Arc<str>, Option<Info>)>;

/// A member that became present (`joined`) or absent in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub channel: Bytes,
    pub member: Arc<str>,
    pub joined: bool,
}

/// One member of one channel.
struct Member {
    /// Tracked sockets (at most one membership per socket and channel).
    sockets: usize,
    info: Option<Info>,
}

/// One tracked socket: whom its changes are reported to, and as whom it is
/// tracked in each channel.
struct Tracked<O> {
    owner: O,
    channels: HashMap<Bytes, Arc<str>>,
}

pub(crate) struct Presence<O> {
    channels: HashMap<Bytes, HashMap<Arc<str>, Member>>,
    sockets: HashMap<u64, Tracked<O>>,
    /// (channel, member) pairs present: `stats()["presence_members"]`.
    pairs: usize,
}

// Not derived: that would ask for `O: Default`.
impl<O> Default for Presence<O> {
    fn default() -> Self {
        Presence {
            channels: HashMap::new(),
            sockets: HashMap::new(),
            pairs: 0,
        }
    }
}

/// Gives back a map's spare room once it is mostly empty, so that a burst of
/// channels or sockets does not stay allocated.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

impl<O: Clone> Presence<O> {
    /// Tracks socket `id` in `channel` as `member` with `info`, replacing
    /// the member it was tracked as there; `owner` is kept for the socket
    /// from its first track on. Returns whether `member` became present,
    /// and appends the changes (the old member leaving, then the new one
    /// joining) to `changes` with the owner they are reported to.
    pub(crate) fn track(
        &mut self,
        id: u64,
        owner: &O,
        channel: &[u8],
        member: &str,
        info: Option<Info>,
        changes: &mut Vec<(O, Change)>,
    ) -> bool {
        let tracked = self.sockets.entry(id).or_insert_with(|| Tracked {
            owner: owner.clone(),
            channels: HashMap::new(),
        });
        let owner = tracked.owner.clone();
        let previous = tracked.channels.get(channel).cloned();
        if previous.as_deref() == Some(member) {
            // The same membership: only the info is new.
            if let Some(m) = self
                .channels
                .get_mut(channel)
                .and_then(|members| members.get_mut(member))
            {
                m.info = info;
            }
            return false;
        }
        // One allocation of the name and of the member for both indexes.
        let (name, members) = match self.channels.get_key_value(channel) {
            Some((name, _)) => (name.clone(), None),
            None => (Bytes::copy_from_slice(channel), Some(HashMap::new())),
        };
        if let Some(members) = members {
            self.channels.insert(name.clone(), members);
        }
        if let Some(previous) = previous {
            if let Some(change) = self.leave(&name, &previous) {
                changes.push((owner.clone(), change));
            }
        }
        let members = self.channels.entry(name.clone()).or_default();
        let (member, joined) = match members.get_key_value(member) {
            Some((key, _)) => (key.clone(), false),
            None => (Arc::<str>::from(member), true),
        };
        let entry = members.entry(member.clone()).or_insert(Member {
            sockets: 0,
            info: None,
        });
        entry.sockets += 1;
        entry.info = info;
        if joined {
            self.pairs += 1;
            changes.push((
                owner,
                Change {
                    channel: name.clone(),
                    member: member.clone(),
                    joined: true,
                },
            ));
        }
        if let Some(tracked) = self.sockets.get_mut(&id) {
            tracked.channels.insert(name, member);
        }
        joined
    }

    /// Untracks socket `id` from `channel`. Returns the change when its
    /// member left (this was its last tracked socket there), with the owner
    /// it is reported to; None when it stays, or `id` was not tracked there.
    pub(crate) fn untrack(&mut self, id: u64, channel: &[u8]) -> Option<(O, Change)> {
        let tracked = self.sockets.get_mut(&id)?;
        let member = tracked.channels.remove(channel)?;
        let owner = tracked.owner.clone();
        if tracked.channels.is_empty() {
            self.sockets.remove(&id);
            shrink(&mut self.sockets);
        } else {
            shrink(&mut tracked.channels);
        }
        let name = self.channels.get_key_value(channel)?.0.clone();
        self.leave(&name, &member).map(|change| (owner, change))
    }

    /// Untracks socket `id` from every channel; appends the members that
    /// left, with the owner they are reported to.
    pub(crate) fn remove(&mut self, id: u64, changes: &mut Vec<(O, Change)>) {
        let Some(tracked) = self.sockets.remove(&id) else {
            return;
        };
        shrink(&mut self.sockets);
        for (name, member) in tracked.channels {
            if let Some(change) = self.leave(&name, &member) {
                changes.push((tracked.owner.clone(), change));
            }
        }
    }

    /// One socket of `member` in `channel` is gone; the change if it was the last.
    fn leave(&mut self, channel: &Bytes, member: &Arc<str>) -> Option<Change> {
        let members = self.channels.get_mut(channel)?;
        let entry = members.get_mut(member)?;
        entry.sockets -= 1;
        if entry.sockets > 0 {
            return None;
        }
        members.remove(member);
        self.pairs -= 1;
        if members.is_empty() {
            self.channels.remove(channel);
            shrink(&mut self.channels);
        } else {
            shrink(members);
        }
        Some(Change {
            channel: channel.clone(),
            member: member.clone(),
            joined: false,
        })
    }

    /// The members present in `channel`, with their info.
    pub(crate) fn members(&self, channel: &[u8]) -> Members {
        self.channels.get(channel).map_or_else(Vec::new, |members| {
            members
                .iter()
                .map(|(name, m)| (name.clone(), m.info.clone()))
                .collect()
        })
    }

    /// How many members are present in `channel`: O(1).
    pub(crate) fn count(&self, channel: &[u8]) -> usize {
        self.channels.get(channel).map_or(0, HashMap::len)
    }

    /// (channel, member) pairs present.
    pub(crate) fn pairs(&self) -> usize {
        self.pairs
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.sockets.is_empty() && self.pairs == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Changes = Vec<(u32, Change)>;

    fn change(channel: &str, member: &str, joined: bool) -> Change {
        Change {
            channel: Bytes::copy_from_slice(channel.as_bytes()),
            member: member.into(),
            joined,
        }
    }

    fn text(s: &str) -> Option<Info> {
        Some(Info::Text(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn a_member_is_present_while_any_of_its_sockets_is_tracked() {
        let mut p = Presence::<u32>::default();
        let mut changes = Changes::new();
        assert!(p.track(1, &10, b"room", "ada", text("tab 1"), &mut changes));
        assert!(!p.track(2, &20, b"room", "ada", text("tab 2"), &mut changes));
        assert!(p.track(3, &30, b"room", "bob", None, &mut changes));
        assert_eq!(
            changes,
            vec![
                (10, change("room", "ada", true)),
                (30, change("room", "bob", true))
            ]
        );
        assert_eq!((p.count(b"room"), p.pairs()), (2, 2));
        let mut members = p.members(b"room");
        members.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            members,
            vec![("ada".into(), text("tab 2")), ("bob".into(), None)],
            "the info of the latest track"
        );
        assert_eq!(p.untrack(1, b"room"), None, "tab 2 stays");
        assert_eq!(p.untrack(1, b"room"), None, "no longer tracked");
        assert_eq!(p.untrack(2, b"other"), None);
        assert_eq!(
            p.untrack(2, b"room"),
            Some((20, change("room", "ada", false)))
        );
        assert_eq!(p.count(b"room"), 1);
        changes.clear();
        p.remove(3, &mut changes);
        assert_eq!(changes, vec![(30, change("room", "bob", false))]);
        assert!(p.is_empty(), "every channel and socket forgotten");
        assert_eq!((p.count(b"room"), p.members(b"room")), (0, vec![]));
    }

    #[test]
    fn tracking_again_replaces_the_member_and_info() {
        let mut p = Presence::<u32>::default();
        let mut changes = Changes::new();
        p.track(1, &1, b"c", "ada", None, &mut changes);
        assert!(!p.track(1, &1, b"c", "ada", text("away"), &mut changes));
        assert_eq!(p.members(b"c"), vec![("ada".into(), text("away"))]);
        assert!(p.track(1, &1, b"c", "bob", None, &mut changes));
        assert_eq!(
            changes,
            vec![
                (1, change("c", "ada", true)),
                (1, change("c", "ada", false)),
                (1, change("c", "bob", true))
            ]
        );
        assert_eq!((p.count(b"c"), p.pairs()), (1, 1));
        // The owner is the first track's: a socket resolves to one connection.
        changes.clear();
        p.track(1, &99, b"d", "bob", None, &mut changes);
        assert_eq!(changes, vec![(1, change("d", "bob", true))]);
        changes.clear();
        p.remove(1, &mut changes);
        changes.sort_by(|a, b| a.1.channel.cmp(&b.1.channel));
        assert_eq!(
            changes,
            vec![
                (1, change("c", "bob", false)),
                (1, change("d", "bob", false))
            ]
        );
        assert!(p.is_empty());
    }

    /// Random operations against a model: the counts, the pairs and the
    /// alternation of each (channel, member)'s changes always agree.
    #[test]
    fn random_operations_keep_the_indexes_in_step() {
        let mut p = Presence::<u64>::default();
        let mut model: HashMap<(u64, u8), &str> = HashMap::new();
        let mut present: HashMap<(u8, Arc<str>), bool> = HashMap::new();
        let members = ["a", "b", "c"];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let (socket, channel) = (next() % 8, (next() % 3) as u8);
            let mut changes = Vec::new();
            match next() % 4 {
                0 | 1 => {
                    let member = members[(next() % 3) as usize];
                    p.track(socket, &socket, &[channel], member, None, &mut changes);
                    model.insert((socket, channel), member);
                }
                2 => {
                    changes.extend(p.untrack(socket, &[channel]));
                    model.remove(&(socket, channel));
                }
                _ => {
                    p.remove(socket, &mut changes);
                    model.retain(|&(s, _), _| s != socket);
                }
            }
            for (owner, change) in changes {
                assert_eq!(owner, socket);
                let was = present
                    .insert((change.channel[0], change.member.clone()), change.joined)
                    .unwrap_or(false);
                assert_ne!(was, change.joined, "{change:?} alternates");
            }
            for channel in 0..3u8 {
                let mut expected: Vec<&str> = model
                    .iter()
                    .filter(|((_, c), _)| *c == channel)
                    .map(|(_, m)| *m)
                    .collect();
                expected.sort_unstable();
                expected.dedup();
                let mut got: Vec<Arc<str>> =
                    p.members(&[channel]).into_iter().map(|(m, _)| m).collect();
                got.sort_unstable();
                assert_eq!(got.len(), p.count(&[channel]));
                assert_eq!(got.iter().map(|m| &**m).collect::<Vec<_>>(), expected);
            }
            assert_eq!(p.pairs(), present.values().filter(|&&p| p).count());
        }
    }
}
