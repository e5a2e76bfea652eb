//! Presence (docs/api.md#presence): who is present in which channel, each
//! member counted once however many sockets it is tracked through.
//!
//! Two indexes kept in step: per channel, its members (each with how many
//! sockets track it there and the info of its latest track), and per
//! socket, the (channel, member) ids it is tracked as ([`Links`], 12 bytes),
//! so that forgetting a socket costs O(its own tracks). The second is kept
//! by the caller, in the hub's per-socket record, and handed in: this
//! table keeps nothing per socket. Every change of a member between absent
//! and present comes back as a [`Change`], in the order it happened, for the
//! caller to report. It takes no lock and knows nothing of sockets: the hub
//! keeps it under one mutex.

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use hashbrown::HashTable;

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

/// One member of one channel, in the members slab: 32 bytes.
struct Member {
    /// Shared by the changes that name this member.
    name: Arc<str>,
    /// Tracked sockets (at most one membership per socket and channel).
    sockets: u32,
    /// Boxed: most tracks give none, and `Info` is 40 bytes.
    info: Option<Box<Info>>,
}

/// A channel with members present; its slot in the channels slab is its id.
struct Channel {
    /// The one allocation of the name: every change event shares it.
    name: Bytes,
    /// Ids in the members slab, hashed by the member's name.
    members: HashTable<u32>,
}

/// A socket's membership in one channel, by ids: 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    channel: u32,
    member: u32,
}

/// A socket's memberships: 12 bytes, kept by the hub with the socket's
/// other links (every socket has one, tracked or not), so they are ids, not
/// pointers. Almost every tracked socket is in one channel, kept inline; a
/// socket in several has them in a list of the table's `lists` slab.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    #[default]
    Empty,
    One(Link),
    /// Two or more (one left becomes `One`): the id of their list.
    Many(u32),
}

impl Links {
    /// Whether the socket is tracked nowhere.
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Links::Empty)
    }
}

/// The lists of the sockets tracked in several channels.
type Lists = Slab<Vec<Link>>;

fn as_slice<'a>(links: &'a Links, lists: &'a Lists) -> &'a [Link] {
    match links {
        Links::Empty => &[],
        Links::One(link) => std::slice::from_ref(link),
        Links::Many(id) => lists.get(*id).map_or(&[], Vec::as_slice),
    }
}

fn position(links: &Links, lists: &Lists, channel: u32) -> Option<usize> {
    as_slice(links, lists)
        .iter()
        .position(|l| l.channel == channel)
}

/// Puts `link` in the `i`th link's place; the old one comes back.
fn replace(links: &mut Links, lists: &mut Lists, i: usize, link: Link) -> Link {
    match links {
        Links::Empty => unreachable!("no link to replace"),
        Links::One(old) => std::mem::replace(old, link),
        Links::Many(id) => match lists.get_mut(*id) {
            Some(list) => std::mem::replace(&mut list[i], link),
            None => unreachable!("a live list"),
        },
    }
}

fn push(links: &mut Links, lists: &mut Lists, link: Link) {
    match links {
        Links::Empty => *links = Links::One(link),
        Links::One(first) => *links = Links::Many(lists.insert(vec![*first, link])),
        Links::Many(id) => {
            if let Some(list) = lists.get_mut(*id) {
                list.push(link);
            }
        }
    }
}

/// Removes the `i`th link (which exists).
fn remove(links: &mut Links, lists: &mut Lists, i: usize) -> Link {
    match *links {
        Links::Empty => unreachable!("no link to remove"),
        Links::One(link) => {
            *links = Links::Empty;
            link
        }
        Links::Many(id) => {
            let Some(list) = lists.get_mut(id) else {
                unreachable!("a live list")
            };
            let link = list.swap_remove(i);
            if list.len() == 1 {
                *links = Links::One(list[0]);
                lists.remove(id);
            } else if list.capacity() > 8 && list.len() * 4 < list.capacity() {
                list.shrink_to(list.len() * 2);
            }
            link
        }
    }
}

fn into_vec(links: Links, lists: &mut Lists) -> Vec<Link> {
    match links {
        Links::Empty => Vec::new(),
        Links::One(link) => vec![link],
        Links::Many(id) => lists.remove(id).unwrap_or_default(),
    }
}

/// Entries found by a `u32` id, their slot's index; free slots are reused,
/// and the room is given back as the slab empties from its end.
struct Slab<T> {
    slots: Vec<Option<T>>,
    /// Empty slots, and (lazily dropped) ids past the end once it shrank.
    free: Vec<u32>,
    live: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> u32 {
        self.live += 1;
        // Ids past the end went with a truncation; the slab only grows at
        // its end once they are all dropped, so any id below it is free.
        while let Some(id) = self.free.pop() {
            if let Some(slot @ None) = self.slots.get_mut(id as usize) {
                *slot = Some(value);
                return id;
            }
        }
        self.slots.push(Some(value));
        u32::try_from(self.slots.len() - 1).expect("under 2^32 entries")
    }

    fn get(&self, id: u32) -> Option<&T> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    fn remove(&mut self, id: u32) -> Option<T> {
        let value = self.slots.get_mut(id as usize)?.take()?;
        self.live -= 1;
        if self.live == 0 {
            // Everything gone: give back the slots and the free list.
            *self = Slab::default();
            return Some(value);
        }
        self.free.push(id);
        if id as usize + 1 == self.slots.len() {
            while let Some(None) = self.slots.last() {
                self.slots.pop();
            }
            if sparse(self.slots.len(), self.slots.capacity()) {
                self.slots.shrink_to(self.slots.len() * 2);
                let len = self.slots.len();
                self.free.retain(|&f| (f as usize) < len);
                self.free.shrink_to(self.free.len() * 2);
            }
        }
        Some(value)
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    fn is_empty(&self) -> bool {
        self.live == 0
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;

    fn index(&self, id: u32) -> &T {
        self.get(id).expect("a live slab id")
    }
}

/// Per channel (found by name through `names`, kept in the `channels` slab
/// so that a link names it by a 4-byte id), its members (kept in the
/// `members` slab, likewise). Each socket's links, the other side of the
/// index, are kept by the caller and handed in. Each name is hashed once
/// per call.
pub(crate) struct Presence {
    hasher: Hasher,
    /// Channel ids, hashed by their channel's name.
    names: HashTable<u32>,
    channels: Slab<Channel>,
    members: Slab<Member>,
    lists: Lists,
    /// (channel, member) pairs present: `stats()["presence_members"]`.
    pairs: usize,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            hasher: hasher(),
            names: HashTable::new(),
            channels: Slab::default(),
            members: Slab::default(),
            lists: Slab::default(),
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
fn name_of(channels: &Slab<Channel>, id: u32) -> &[u8] {
    channels.get(id).map_or(&[], |c| &c.name[..])
}

/// The name of member `id`, to hash it again as its channel's table grows
/// or shrinks.
fn member_name(members: &Slab<Member>, id: u32) -> &str {
    members.get(id).map_or("", |m| &m.name)
}

/// The id of the channel named `channel`, whose name hashes to `hash`.
fn find_channel(
    names: &HashTable<u32>,
    channels: &Slab<Channel>,
    hash: u64,
    channel: &[u8],
) -> Option<u32> {
    names
        .find(hash, |&id| {
            channels.get(id).is_some_and(|c| c.name == channel)
        })
        .copied()
}

impl Presence {
    /// Tracks the socket whose memberships are `links` in `channel` as
    /// `member` with `info`, replacing the member it was tracked as there.
    /// Returns whether `member` became present, and appends the changes
    /// (the old member leaving, then the new one joining) to `changes`.
    pub(crate) fn track(
        &mut self,
        links: &mut Links,
        channel: &[u8],
        member: &str,
        info: Option<Info>,
        changes: &mut Vec<Change>,
    ) -> bool {
        let Presence {
            hasher,
            names,
            channels,
            members,
            lists,
            pairs,
        } = self;
        let hash = hasher.hash_one(channel);
        let cid = match find_channel(names, channels, hash, channel) {
            Some(cid) => cid,
            None => {
                let cid = channels.insert(Channel {
                    name: Bytes::copy_from_slice(channel),
                    members: HashTable::new(),
                });
                names.insert_unique(hash, cid, |&c| hasher.hash_one(name_of(channels, c)));
                cid
            }
        };
        let previous = position(links, lists, cid);
        if let Some(i) = previous {
            let mid = as_slice(links, lists)[i].member;
            if let Some(m) = members.get_mut(mid).filter(|m| &*m.name == member) {
                // The same membership: only the info is new.
                m.info = info.map(Box::new);
                return false;
            }
        }
        let Some(ch) = channels.get_mut(cid) else {
            unreachable!("a channel found or made above")
        };
        let member_hash = hasher.hash_one(member);
        // The join first, so that the old member's leave cannot empty (and
        // drop) the channel; the changes are queued in their order.
        let found = ch
            .members
            .find(member_hash, |&m| member_name(members, m) == member)
            .copied();
        let (mid, joined) = match found.and_then(|mid| Some((mid, members.get_mut(mid)?))) {
            Some((mid, m)) => {
                m.sockets += 1;
                m.info = info.map(Box::new);
                (mid, false)
            }
            None => {
                let mid = members.insert(Member {
                    name: Arc::from(member),
                    sockets: 1,
                    info: info.map(Box::new),
                });
                ch.members.insert_unique(member_hash, mid, |&m| {
                    hasher.hash_one(member_name(members, m))
                });
                *pairs += 1;
                (mid, true)
            }
        };
        let channel_name = ch.name.clone();
        let link = Link {
            channel: cid,
            member: mid,
        };
        match previous {
            Some(i) => {
                let old = replace(links, lists, i, link);
                changes.extend(Self::leave(hasher, names, channels, members, pairs, old));
            }
            None => push(links, lists, link),
        }
        if joined {
            changes.push(Change {
                channel: channel_name,
                member: members[mid].name.clone(),
                joined: true,
            });
        }
        joined
    }

    /// Untracks the socket whose memberships are `links` from `channel`.
    /// Returns the change when its member left (this was its last tracked
    /// socket there); None when it stays, or the socket was not tracked
    /// there.
    pub(crate) fn untrack(&mut self, links: &mut Links, channel: &[u8]) -> Option<Change> {
        if links.is_empty() {
            return None;
        }
        let Presence {
            hasher,
            names,
            channels,
            members,
            lists,
            pairs,
        } = self;
        let cid = find_channel(names, channels, hasher.hash_one(channel), channel)?;
        let i = position(links, lists, cid)?;
        let link = remove(links, lists, i);
        Self::leave(hasher, names, channels, members, pairs, link)
    }

    /// Untracks the socket whose memberships were `links` from every
    /// channel; appends the members that left.
    pub(crate) fn remove(&mut self, links: Links, changes: &mut Vec<Change>) {
        let Presence {
            hasher,
            names,
            channels,
            members,
            lists,
            pairs,
        } = self;
        for link in into_vec(links, lists) {
            changes.extend(Self::leave(hasher, names, channels, members, pairs, link));
        }
    }

    /// One socket of the link's member is gone; the change if it was the
    /// last. The channel is dropped once it has no member.
    fn leave(
        hasher: &Hasher,
        names: &mut HashTable<u32>,
        channels: &mut Slab<Channel>,
        members: &mut Slab<Member>,
        pairs: &mut usize,
        link: Link,
    ) -> Option<Change> {
        let m = members.get_mut(link.member)?;
        m.sockets -= 1;
        if m.sockets > 0 {
            return None;
        }
        let gone = members.remove(link.member)?;
        *pairs -= 1;
        let ch = channels.get_mut(link.channel)?;
        if let Ok(entry) = ch
            .members
            .find_entry(hasher.hash_one(&*gone.name), |&m| m == link.member)
        {
            entry.remove();
        }
        let channel = if ch.members.is_empty() {
            let hash = hasher.hash_one(&ch.name[..]);
            if let Ok(entry) = names.find_entry(hash, |&c| c == link.channel) {
                entry.remove();
            }
            let name = channels.remove(link.channel).map(|c| c.name)?;
            if channels.is_empty() {
                names.shrink_to(0, |_| 0);
            } else if sparse(names.len(), names.capacity()) {
                names.shrink_to(names.len() * 2, |&c| hasher.hash_one(name_of(channels, c)));
            }
            name
        } else {
            if sparse(ch.members.len(), ch.members.capacity()) {
                ch.members.shrink_to(ch.members.len() * 2, |&m| {
                    hasher.hash_one(member_name(members, m))
                });
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
        self.channels.get(cid)
    }

    fn entries<'a>(&'a self, ch: &'a Channel) -> impl Iterator<Item = &'a Member> + 'a {
        ch.members.iter().filter_map(|&m| self.members.get(m))
    }

    /// The members present in `channel`, with their info.
    pub(crate) fn members(&self, channel: &[u8]) -> Members {
        self.channel(channel).map_or_else(Vec::new, |ch| {
            self.entries(ch)
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
        for ch in self.channels.iter() {
            all.extend(
                self.entries(ch)
                    .map(|m| (ch.name.clone(), m.name.clone(), m.info.as_deref().cloned())),
            );
        }
        all
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.names.is_empty()
            && self.channels.slots.capacity() == 0
            && self.members.slots.capacity() == 0
            && self.lists.slots.capacity() == 0
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
        assert_eq!(std::mem::size_of::<Option<Member>>(), 32);
        assert_eq!(std::mem::size_of::<Link>(), 8);
        assert_eq!(std::mem::size_of::<Links>(), 12);
    }

    /// The table with the sockets' links, as the hub keeps them: each
    /// change comes back with the id of the socket that caused it.
    #[derive(Default)]
    struct Table {
        p: Presence,
        sockets: HashMap<u64, Links>,
    }

    type Changes = Vec<(u64, Change)>;

    impl Table {
        fn track(
            &mut self,
            id: u64,
            channel: &[u8],
            member: &str,
            info: Option<Info>,
            changes: &mut Changes,
        ) -> bool {
            let mut made = Vec::new();
            let links = self.sockets.entry(id).or_default();
            let joined = self.p.track(links, channel, member, info, &mut made);
            changes.extend(made.into_iter().map(|c| (id, c)));
            joined
        }

        fn untrack(&mut self, id: u64, channel: &[u8]) -> Option<(u64, Change)> {
            let links = self.sockets.get_mut(&id)?;
            self.p.untrack(links, channel).map(|c| (id, c))
        }

        fn remove(&mut self, id: u64, changes: &mut Changes) {
            let mut made = Vec::new();
            if let Some(links) = self.sockets.remove(&id) {
                self.p.remove(links, &mut made);
            }
            changes.extend(made.into_iter().map(|c| (id, c)));
        }

        fn is_empty(&self) -> bool {
            self.p.is_empty() && self.sockets.values().all(Links::is_empty)
        }
    }

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
        let mut t = Table::default();
        let mut changes = Changes::new();
        assert!(t.track(1, b"room", "ada", text("tab 1"), &mut changes));
        assert!(!t.track(2, b"room", "ada", text("tab 2"), &mut changes));
        assert!(t.track(3, b"room", "bob", None, &mut changes));
        assert_eq!(
            changes,
            vec![
                (1, change("room", "ada", true)),
                (3, change("room", "bob", true))
            ]
        );
        assert_eq!((t.p.count(b"room"), t.p.pairs()), (2, 2));
        let mut members = t.p.members(b"room");
        members.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            members,
            vec![("ada".into(), text("tab 2")), ("bob".into(), None)],
            "the info of the latest track"
        );
        assert_eq!(t.untrack(1, b"room"), None, "tab 2 stays");
        assert_eq!(t.untrack(1, b"room"), None, "no longer tracked");
        assert_eq!(t.untrack(2, b"other"), None);
        assert_eq!(
            t.untrack(2, b"room"),
            Some((2, change("room", "ada", false)))
        );
        assert_eq!(t.p.count(b"room"), 1);
        changes.clear();
        t.remove(3, &mut changes);
        assert_eq!(changes, vec![(3, change("room", "bob", false))]);
        assert!(t.is_empty(), "every channel and socket forgotten");
        assert_eq!((t.p.count(b"room"), t.p.members(b"room")), (0, vec![]));
    }

    #[test]
    fn tracking_again_replaces_the_member_and_info() {
        let mut t = Table::default();
        let mut changes = Changes::new();
        t.track(1, b"c", "ada", None, &mut changes);
        assert!(!t.track(1, b"c", "ada", text("away"), &mut changes));
        assert_eq!(t.p.members(b"c"), vec![("ada".into(), text("away"))]);
        assert!(t.track(1, b"c", "bob", None, &mut changes));
        assert_eq!(
            changes,
            vec![
                (1, change("c", "ada", true)),
                (1, change("c", "ada", false)),
                (1, change("c", "bob", true))
            ]
        );
        assert_eq!((t.p.count(b"c"), t.p.pairs()), (1, 1));
        changes.clear();
        t.track(1, b"d", "bob", None, &mut changes);
        t.track(1, b"e", "bob", None, &mut changes);
        assert_eq!(
            changes,
            vec![(1, change("d", "bob", true)), (1, change("e", "bob", true))]
        );
        assert!(matches!(t.sockets[&1], Links::Many(_)));
        assert_eq!(t.untrack(1, b"d"), Some((1, change("d", "bob", false))));
        changes.clear();
        t.remove(1, &mut changes);
        changes.sort_by(|a, b| a.1.channel.cmp(&b.1.channel));
        assert_eq!(
            changes,
            vec![
                (1, change("c", "bob", false)),
                (1, change("e", "bob", false))
            ]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn slabs_reuse_free_slots_and_give_back_their_room() {
        let mut t = Table::default();
        let mut changes = Changes::new();
        for id in 0..1000u64 {
            t.track(id, b"c", &format!("m{id}"), None, &mut changes);
        }
        let grown = t.p.members.slots.capacity();
        for id in 0..10u64 {
            t.untrack(id, b"c");
        }
        for id in 0..10u64 {
            t.track(id, b"c", &format!("n{id}"), None, &mut changes);
        }
        assert_eq!(t.p.members.slots.len(), 1000, "freed slots reused");
        // Emptied from the end, the slab shrinks as it goes.
        for id in (10..1000u64).rev() {
            t.untrack(id, b"c");
        }
        assert_eq!(t.p.count(b"c"), 10);
        assert!(t.p.members.slots.capacity() < grown / 4);
        for id in 1000..1100u64 {
            t.track(id, b"c", &format!("m{id}"), None, &mut changes);
        }
        assert_eq!(t.p.count(b"c"), 110);
        let mut got: Vec<Arc<str>> = t.p.members(b"c").into_iter().map(|m| m.0).collect();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 110, "no member lost nor doubled");
        for id in (0..10u64).chain(1000..1100) {
            t.remove(id, &mut changes);
        }
        assert!(t.is_empty());
    }

    /// Random operations against a model: the counts, the pairs and the
    /// alternation of each (channel, member)'s changes always agree.
    #[test]
    fn random_operations_keep_the_indexes_in_step() {
        let mut t = Table::default();
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
                    t.track(socket, &[channel], member, None, &mut changes);
                    model.insert((socket, channel), member);
                }
                2 => {
                    changes.extend(t.untrack(socket, &[channel]));
                    model.remove(&(socket, channel));
                }
                _ => {
                    t.remove(socket, &mut changes);
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
                    t.p.members(&[channel])
                        .into_iter()
                        .map(|(m, _)| m)
                        .collect();
                got.sort_unstable();
                assert_eq!(got.len(), t.p.count(&[channel]));
                assert_eq!(got.iter().map(|m| &**m).collect::<Vec<_>>(), expected);
            }
            assert_eq!(t.p.pairs(), present.values().filter(|&&p| p).count());
            assert_eq!(t.p.members.live, t.p.pairs());
        }
    }
}
