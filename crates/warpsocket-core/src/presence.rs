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

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use hashbrown::{HashMap, HashTable};

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

/// The hasher of every table here. Clients choose channel and member names,
/// so its seeds come from the OS's randomness (through std's `RandomState`)
/// rather than foldhash's own guess from addresses and the time.
type Hasher = SeedableRandomState;

fn hasher() -> Hasher {
    fn random() -> u64 {
        std::hash::RandomState::new().hash_one(0u8)
    }
    static SHARED: OnceLock<SharedSeed> = OnceLock::new();
    SeedableRandomState::with_seed(
        random(),
        SHARED.get_or_init(|| SharedSeed::from_u64(random())),
    )
}

/// One member of one channel: 32 bytes, so that 100,000 of them stay small.
struct Member {
    /// Shared with the links of the sockets tracked as this member.
    name: Arc<str>,
    /// Tracked sockets (at most one membership per socket and channel).
    sockets: u32,
    /// Boxed: most tracks give none, and `Info` is 40 bytes.
    info: Option<Box<Info>>,
}

/// A channel with members present; its slot in the slab is its id.
struct Channel {
    /// The one allocation of the name: changes and links share it.
    name: Bytes,
    members: HashTable<Member>,
}

/// A socket's membership in one channel: 24 bytes.
struct Link {
    channel: u32,
    member: Arc<str>,
}

/// A socket's memberships. Almost every socket is tracked in one channel,
/// kept inline; a socket in several has them in a short vector.
enum Links {
    One(Link),
    /// Two or more (one left becomes `One`).
    /// Boxed, so that `Links` is no bigger than a `Link` (a `Vec` is).
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Link>>),
}

impl Links {
    fn as_slice(&self) -> &[Link] {
        match self {
            Links::One(link) => std::slice::from_ref(link),
            Links::Many(links) => links,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Link] {
        match self {
            Links::One(link) => std::slice::from_mut(link),
            Links::Many(links) => links,
        }
    }

    fn position(&self, channel: u32) -> Option<usize> {
        self.as_slice().iter().position(|l| l.channel == channel)
    }

    fn push(&mut self, link: Link) {
        match self {
            Links::Many(links) => links.push(link),
            Links::One(first) => {
                let first = Link {
                    channel: first.channel,
                    member: first.member.clone(),
                };
                *self = Links::Many(Box::new(vec![first, link]));
            }
        }
    }

    /// Removes the `i`th link; None when it is the only one, which goes
    /// with the socket's whole entry.
    fn remove(&mut self, i: usize) -> Option<Link> {
        let Links::Many(links) = self else {
            return None;
        };
        let link = links.swap_remove(i);
        if links.len() == 1 {
            if let Some(last) = links.pop() {
                *self = Links::One(last);
            }
        } else if links.capacity() > 8 && links.len() * 4 < links.capacity() {
            links.shrink_to(links.len() * 2);
        }
        Some(link)
    }

    fn into_iter(self) -> impl Iterator<Item = Link> {
        let (first, rest) = match self {
            Links::One(link) => (Some(link), Vec::new()),
            Links::Many(links) => (None, *links),
        };
        first.into_iter().chain(rest)
    }
}

/// One tracked socket: whom its changes are reported to, and as whom it is
/// tracked in each channel.
struct Tracked<O> {
    owner: O,
    links: Links,
}

/// Two indexes kept in step. Per channel (found by name through `names`, kept
/// in the `channels` slab so that a socket's link names it by a 4-byte id),
/// its members; per socket id, its links. Each name is hashed once per call.
pub(crate) struct Presence<O> {
    hasher: Hasher,
    /// Channel ids, hashed by their channel's name.
    names: HashTable<u32>,
    channels: Vec<Option<Channel>>,
    /// Empty slots of `channels`.
    free: Vec<u32>,
    sockets: HashMap<u64, Tracked<O>, Hasher>,
    /// (channel, member) pairs present: `stats()["presence_members"]`.
    pairs: usize,
}

// Not derived: that would ask for `O: Default`.
impl<O> Default for Presence<O> {
    fn default() -> Self {
        Presence {
            hasher: hasher(),
            names: HashTable::new(),
            channels: Vec::new(),
            free: Vec::new(),
            sockets: HashMap::with_hasher(hasher()),
            pairs: 0,
        }
    }
}

/// Whether a table is mostly empty, and should give back its spare room so
/// that a burst of channels, members or sockets does not stay allocated.
fn sparse(len: usize, capacity: usize) -> bool {
    capacity > 64 && len * 4 < capacity
}

/// The name of channel `id`, to hash it again as `names` grows or shrinks.
fn name_of(channels: &[Option<Channel>], id: u32) -> &[u8] {
    channels[id as usize].as_ref().map_or(&[], |c| &c.name[..])
}

fn channel_slot(channels: &mut [Option<Channel>], id: u32) -> Option<&mut Channel> {
    channels.get_mut(id as usize).and_then(Option::as_mut)
}

/// The id of the channel named `channel`, whose name hashes to `hash`.
fn find_channel(
    names: &HashTable<u32>,
    channels: &[Option<Channel>],
    hash: u64,
    channel: &[u8],
) -> Option<u32> {
    names
        .find(hash, |&id| {
            channels[id as usize]
                .as_ref()
                .is_some_and(|c| c.name == channel)
        })
        .copied()
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
        let Presence {
            hasher,
            names,
            channels,
            free,
            sockets,
            pairs,
        } = self;
        let hash = hasher.hash_one(channel);
        let cid = match find_channel(names, channels, hash, channel) {
            Some(cid) => cid,
            None => {
                let new = Channel {
                    name: Bytes::copy_from_slice(channel),
                    members: HashTable::new(),
                };
                let cid = match free.pop() {
                    Some(cid) => {
                        channels[cid as usize] = Some(new);
                        cid
                    }
                    None => {
                        channels.push(Some(new));
                        u32::try_from(channels.len() - 1).expect("under 2^32 channels")
                    }
                };
                names.insert_unique(hash, cid, |&c| hasher.hash_one(name_of(channels, c)));
                cid
            }
        };
        let mut tracked = sockets.get_mut(&id);
        let owner = tracked.as_ref().map_or(owner, |t| &t.owner).clone();
        let previous = tracked.as_ref().and_then(|t| t.links.position(cid));
        let Some(ch) = channel_slot(channels, cid) else {
            unreachable!("a channel found or made above")
        };
        let member_hash = hasher.hash_one(member);
        if let (Some(i), Some(t)) = (previous, &tracked) {
            if &*t.links.as_slice()[i].member == member {
                // The same membership: only the info is new.
                if let Some(m) = ch.members.find_mut(member_hash, |m| &*m.name == member) {
                    m.info = info.map(Box::new);
                }
                return false;
            }
        }
        // The join first, so that the old member's leave cannot empty (and
        // drop) the channel; the changes are queued in their order.
        let (name, joined) = match ch.members.find_mut(member_hash, |m| &*m.name == member) {
            Some(m) => {
                m.sockets += 1;
                m.info = info.map(Box::new);
                (m.name.clone(), false)
            }
            None => {
                let name = Arc::<str>::from(member);
                ch.members.insert_unique(
                    member_hash,
                    Member {
                        name: name.clone(),
                        sockets: 1,
                        info: info.map(Box::new),
                    },
                    |m| hasher.hash_one(&*m.name),
                );
                *pairs += 1;
                (name, true)
            }
        };
        let channel_name = ch.name.clone();
        let link = Link {
            channel: cid,
            member: name.clone(),
        };
        match (previous, tracked.as_mut()) {
            (Some(i), Some(t)) => {
                let old = std::mem::replace(&mut t.links.as_mut_slice()[i], link);
                if let Some(change) =
                    Self::leave(hasher, names, channels, free, pairs, cid, &old.member)
                {
                    changes.push((owner.clone(), change));
                }
            }
            (_, Some(t)) => t.links.push(link),
            (_, None) => {
                sockets.insert(
                    id,
                    Tracked {
                        owner: owner.clone(),
                        links: Links::One(link),
                    },
                );
            }
        }
        if joined {
            changes.push((
                owner,
                Change {
                    channel: channel_name,
                    member: name,
                    joined: true,
                },
            ));
        }
        joined
    }

    /// Untracks socket `id` from `channel`. Returns the change when its
    /// member left (this was its last tracked socket there), with the owner
    /// it is reported to; None when it stays, or `id` was not tracked there.
    pub(crate) fn untrack(&mut self, id: u64, channel: &[u8]) -> Option<(O, Change)> {
        let Presence {
            hasher,
            names,
            channels,
            free,
            sockets,
            pairs,
        } = self;
        let tracked = sockets.get_mut(&id)?;
        let cid = find_channel(names, channels, hasher.hash_one(channel), channel)?;
        let i = tracked.links.position(cid)?;
        let owner = tracked.owner.clone();
        let link = match tracked.links.remove(i) {
            Some(link) => link,
            None => {
                let gone = sockets.remove(&id)?;
                if sparse(sockets.len(), sockets.capacity()) {
                    sockets.shrink_to(sockets.len() * 2);
                }
                match gone.links {
                    Links::One(link) => link,
                    Links::Many(_) => return None,
                }
            }
        };
        Self::leave(hasher, names, channels, free, pairs, cid, &link.member)
            .map(|change| (owner, change))
    }

    /// Untracks socket `id` from every channel; appends the members that
    /// left, with the owner they are reported to.
    pub(crate) fn remove(&mut self, id: u64, changes: &mut Vec<(O, Change)>) {
        let Presence {
            hasher,
            names,
            channels,
            free,
            sockets,
            pairs,
        } = self;
        let Some(tracked) = sockets.remove(&id) else {
            return;
        };
        if sparse(sockets.len(), sockets.capacity()) {
            sockets.shrink_to(sockets.len() * 2);
        }
        for link in tracked.links.into_iter() {
            if let Some(change) = Self::leave(
                hasher,
                names,
                channels,
                free,
                pairs,
                link.channel,
                &link.member,
            ) {
                changes.push((tracked.owner.clone(), change));
            }
        }
    }

    /// One socket of `member` in channel `cid` is gone; the change if it was
    /// the last. The channel is dropped once it has no member.
    fn leave(
        hasher: &Hasher,
        names: &mut HashTable<u32>,
        channels: &mut Vec<Option<Channel>>,
        free: &mut Vec<u32>,
        pairs: &mut usize,
        cid: u32,
        member: &Arc<str>,
    ) -> Option<Change> {
        let ch = channel_slot(channels, cid)?;
        let Ok(mut entry) = ch.members.find_entry(hasher.hash_one(&**member), |m| {
            Arc::ptr_eq(&m.name, member) || m.name == *member
        }) else {
            return None;
        };
        entry.get_mut().sockets -= 1;
        if entry.get().sockets > 0 {
            return None;
        }
        let (gone, _) = entry.remove();
        *pairs -= 1;
        let channel = if ch.members.is_empty() {
            let hash = hasher.hash_one(&ch.name[..]);
            if let Ok(entry) = names.find_entry(hash, |&c| c == cid) {
                entry.remove();
            }
            let name = channels[cid as usize].take().map(|c| c.name)?;
            free.push(cid);
            if free.len() == channels.len() {
                // Every channel gone: give back the slab and the name index.
                channels.clear();
                channels.shrink_to(0);
                free.clear();
                free.shrink_to(0);
                names.shrink_to(0, |_| 0);
            } else if sparse(names.len(), names.capacity()) {
                names.shrink_to(names.len() * 2, |&c| hasher.hash_one(name_of(channels, c)));
            }
            name
        } else {
            if sparse(ch.members.len(), ch.members.capacity()) {
                ch.members
                    .shrink_to(ch.members.len() * 2, |m| hasher.hash_one(&*m.name));
            }
            ch.name.clone()
        };
        Some(Change {
            channel,
            member: gone.name,
            joined: false,
        })
    }

    fn channel(&self, channel: &[u8]) -> Option<&Channel> {
        let cid = find_channel(
            &self.names,
            &self.channels,
            self.hasher.hash_one(channel),
            channel,
        )?;
        self.channels[cid as usize].as_ref()
    }

    /// The members present in `channel`, with their info.
    pub(crate) fn members(&self, channel: &[u8]) -> Members {
        self.channel(channel).map_or_else(Vec::new, |ch| {
            ch.members
                .iter()
                .map(|m| (m.name.clone(), m.info.as_deref().cloned()))
                .collect()
        })
    }

    /// How many members are present in `channel`: O(1).
    pub(crate) fn count(&self, channel: &[u8]) -> usize {
        self.channel(channel).map_or(0, |ch| ch.members.len())
    }

    /// (channel, member) pairs present.
    pub(crate) fn pairs(&self) -> usize {
        self.pairs
    }

    /// Every (channel, member) pair present, with the member's info: what a
    /// cluster node tells Redis it holds.
    pub(crate) fn snapshot(&self) -> Vec<(Bytes, Arc<str>, Option<Info>)> {
        let mut all = Vec::with_capacity(self.pairs);
        for ch in self.channels.iter().flatten() {
            all.extend(
                ch.members
                    .iter()
                    .map(|m| (ch.name.clone(), m.name.clone(), m.info.as_deref().cloned())),
            );
        }
        all
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.names.is_empty()
            && self.channels.is_empty()
            && self.sockets.is_empty()
            && self.pairs == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_entries_stay_small() {
        assert_eq!(std::mem::size_of::<Member>(), 32);
        assert_eq!(std::mem::size_of::<Links>(), 24);
        assert_eq!(std::mem::size_of::<Tracked<Arc<()>>>(), 32);
    }

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
