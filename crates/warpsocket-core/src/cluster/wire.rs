//! What nodes say to each other through Redis, as bytes: the names of the
//! Redis keys and pub/sub channels, and the messages.
//!
//! Every message is one Redis payload; integers are big-endian, variable
//! parts (payloads, names, reasons) run to the end or carry a length.
//! Decoding never trusts the input: anything short or unknown is `None`.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::Kind;

/// The counter that hands out node numbers.
pub(super) const NODE_COUNTER: &str = "warpsocket:nodes";
/// The hash that holds the cluster's key/value store.
pub(super) const KV_HASH: &str = "warpsocket:kv";
/// The pub/sub channel every node listens to.
pub(super) const ALL_NODES: &[u8] = b"warpsocket:all";
pub(super) const CHANNEL_PREFIX: &[u8] = b"warpsocket:c:";
/// The pub/sub channel clients (processes that are no node) listen on, only
/// to know that Redis is up: nothing is published there.
pub(super) const CLIENTS_KEY: &[u8] = b"warpsocket:clients";
/// The `origin` of what a client broadcasts: no node has it (node numbers
/// start at 1, see `ids::node_number`), so every node delivers it.
pub(super) const CLIENT_ORIGIN: u16 = 0;

/// The pub/sub channel of a WarpSocket channel.
pub(super) fn channel_key(name: &[u8]) -> Bytes {
    [CHANNEL_PREFIX, name].concat().into()
}

/// The pub/sub channel of a history channel: its messages come with their
/// offsets, so it is not the plain one.
pub(super) const HISTORY_PREFIX: &[u8] = b"warpsocket:h:";
/// Where Redis keeps a history channel's epoch and last offset (a hash), and
/// its kept messages (a list).
const HISTORY_META_PREFIX: &[u8] = b"warpsocket:hm:";
const HISTORY_LIST_PREFIX: &[u8] = b"warpsocket:hl:";
/// The counter that makes epochs unique (with Redis's clock).
pub(super) const EPOCH_COUNTER: &str = "warpsocket:epochs";

/// The pub/sub channel a node listens on for a WarpSocket channel.
pub(super) fn pubsub_key(name: &[u8], history: bool) -> Bytes {
    if history {
        [HISTORY_PREFIX, name].concat().into()
    } else {
        channel_key(name)
    }
}

/// The Redis keys of a history channel: its meta hash and its list.
pub(super) fn history_keys(name: &[u8]) -> [Vec<u8>; 2] {
    [
        [HISTORY_META_PREFIX, name].concat(),
        [HISTORY_LIST_PREFIX, name].concat(),
    ]
}

/// The pub/sub channel of one node, for requests to it.
pub(super) fn node_key(node: u16) -> Bytes {
    format!("warpsocket:n:{node}").into_bytes().into()
}

/// A channel broadcast: the node it came from (so it can skip its own echo)
/// and the message, encoded once for every node.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Broadcast<'a> {
    pub(crate) origin: u16,
    pub(crate) kind: Kind,
    pub(crate) payload: &'a [u8],
}

impl Broadcast<'_> {
    pub(crate) fn encode(origin: u16, kind: Kind, payload: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(3 + payload.len());
        out.put_u16(origin);
        out.put_u8(kind_byte(kind));
        out.put_slice(payload);
        out.freeze()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Broadcast<'_>> {
        let mut r = Reader(bytes);
        Some(Broadcast {
            origin: r.u16()?,
            kind: byte_kind(r.u8()?)?,
            payload: r.rest(),
        })
    }
}

/// A history channel's message as Redis publishes it, once it has its
/// offset: `epoch NUL offset NUL kind payload`, the offset in ASCII decimal
/// (the Lua script that sequences it writes it so).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sequenced<'a> {
    pub(crate) epoch: &'a [u8],
    pub(crate) offset: u64,
    pub(crate) kind: Kind,
    pub(crate) payload: &'a [u8],
}

impl Sequenced<'_> {
    /// What the sender hands the script: the kind and the payload.
    pub(crate) fn body(kind: Kind, payload: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(1 + payload.len());
        out.put_u8(kind_byte(kind));
        out.put_slice(payload);
        out.freeze()
    }

    pub(crate) fn encode(&self) -> Bytes {
        let offset = self.offset.to_string();
        let mut out =
            BytesMut::with_capacity(self.epoch.len() + offset.len() + 3 + self.payload.len());
        out.put_slice(self.epoch);
        out.put_u8(0);
        out.put_slice(offset.as_bytes());
        out.put_u8(0);
        out.put_slice(&Self::body(self.kind, self.payload));
        out.freeze()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Sequenced<'_>> {
        let (epoch, rest) = split_at_nul(bytes)?;
        let (offset, rest) = split_at_nul(rest)?;
        let (kind, payload) = decode_body(rest)?;
        Some(Sequenced {
            epoch,
            offset: decimal(offset)?,
            kind,
            payload,
        })
    }
}

/// A kept message as Redis's list holds it: `millis:` then the body.
pub(crate) fn decode_kept(entry: &[u8]) -> Option<(Kind, &[u8])> {
    let colon = entry.iter().position(|&b| b == b':')?;
    decode_body(&entry[colon + 1..])
}

fn decode_body(body: &[u8]) -> Option<(Kind, &[u8])> {
    let (&kind, payload) = body.split_first()?;
    Some((byte_kind(kind)?, payload))
}

fn split_at_nul(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..nul], &bytes[nul + 1..]))
}

/// A positive decimal without leading zeros (the only spelling the script
/// writes, so that what decodes encodes back the same).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.first().is_none_or(|&d| d == b'0') || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A request for the node that owns a socket (on that node's own Redis
/// channel), or for every node (on the shared channel).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Send {
        id: u64,
        kind: Kind,
        payload: &'a [u8],
    },
    Subscribe {
        delta: i64,
        ids: Vec<u64>,
        channel: &'a [u8],
    },
    /// `subscribe(source_channel, channel)`: every node applies it to its
    /// own subscribers of `source`.
    SubscribeChannel {
        origin: u16,
        delta: i64,
        source: &'a [u8],
        channel: &'a [u8],
    },
    Close {
        id: u64,
        code: u16,
        reason: &'a [u8],
    },
    DeleteVirtual {
        id: u64,
        expected: Option<u64>,
    },
    CreateVirtual {
        reply_to: u16,
        request: u64,
        target: u64,
        prefix: &'a [u8],
    },
    /// The answer to `CreateVirtual`: the new id, or `None` when the target
    /// is not an open socket there.
    Created {
        request: u64,
        id: Option<u64>,
    },
    /// `recover` for sockets of the node it is sent to.
    Recover {
        epoch: &'a [u8],
        offset: u64,
        ids: Vec<u64>,
        channel: &'a [u8],
    },
}

impl Op<'_> {
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(32);
        match self {
            Op::Send { id, kind, payload } => {
                out.put_u8(b'S');
                out.put_u8(kind_byte(*kind));
                out.put_u64(*id);
                out.put_slice(payload);
            }
            Op::Subscribe {
                delta,
                ids,
                channel,
            } => {
                out.put_u8(b'U');
                out.put_i64(*delta);
                out.put_u32(ids.len() as u32);
                for id in ids {
                    out.put_u64(*id);
                }
                out.put_slice(channel);
            }
            Op::SubscribeChannel {
                origin,
                delta,
                source,
                channel,
            } => {
                out.put_u8(b'X');
                out.put_u16(*origin);
                out.put_i64(*delta);
                out.put_u32(source.len() as u32);
                out.put_slice(source);
                out.put_slice(channel);
            }
            Op::Close { id, code, reason } => {
                out.put_u8(b'C');
                out.put_u64(*id);
                out.put_u16(*code);
                out.put_slice(reason);
            }
            Op::DeleteVirtual { id, expected } => {
                out.put_u8(b'D');
                out.put_u64(*id);
                out.put_u64(expected.unwrap_or(0));
            }
            Op::CreateVirtual {
                reply_to,
                request,
                target,
                prefix,
            } => {
                out.put_u8(b'V');
                out.put_u16(*reply_to);
                out.put_u64(*request);
                out.put_u64(*target);
                out.put_slice(prefix);
            }
            Op::Created { request, id } => {
                out.put_u8(b'R');
                out.put_u64(*request);
                out.put_u64(id.unwrap_or(0));
            }
            Op::Recover {
                epoch,
                offset,
                ids,
                channel,
            } => {
                out.put_u8(b'H');
                out.put_u64(*offset);
                out.put_u32(epoch.len() as u32);
                out.put_slice(epoch);
                out.put_u32(ids.len() as u32);
                for id in ids {
                    out.put_u64(*id);
                }
                out.put_slice(channel);
            }
        }
        out.freeze()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Op<'_>> {
        let mut r = Reader(bytes);
        let op = match r.u8()? {
            b'S' => {
                let kind = byte_kind(r.u8()?)?;
                Op::Send {
                    id: r.u64()?,
                    kind,
                    payload: r.rest(),
                }
            }
            b'U' => {
                let delta = r.i64()?;
                let ids = r.ids()?;
                Op::Subscribe {
                    delta,
                    ids,
                    channel: r.rest(),
                }
            }
            b'X' => {
                let origin = r.u16()?;
                let delta = r.i64()?;
                let len = r.u32()? as usize;
                Op::SubscribeChannel {
                    origin,
                    delta,
                    source: r.take(len)?,
                    channel: r.rest(),
                }
            }
            b'C' => Op::Close {
                id: r.u64()?,
                code: r.u16()?,
                reason: r.rest(),
            },
            b'D' => Op::DeleteVirtual {
                id: r.u64()?,
                expected: Some(r.u64()?).filter(|&e| e != 0),
            },
            b'V' => Op::CreateVirtual {
                reply_to: r.u16()?,
                request: r.u64()?,
                target: r.u64()?,
                prefix: r.rest(),
            },
            b'R' => Op::Created {
                request: r.u64()?,
                id: Some(r.u64()?).filter(|&id| id != 0),
            },
            b'H' => {
                let offset = r.u64()?;
                let len = r.u32()? as usize;
                let epoch = r.take(len)?;
                let ids = r.ids()?;
                Op::Recover {
                    epoch,
                    offset,
                    ids,
                    channel: r.rest(),
                }
            }
            _ => return None,
        };
        Some(op)
    }
}

/// Decodes `bytes` as a broadcast, a request and a history channel's
/// message, and encodes again what
/// decoded: the entry point of the `cluster_wire` fuzz target (`fuzz/`), which
/// checks that decoding never panics and that a decoded message encodes back
/// to exactly the bytes it came from (nothing skipped, misread or invented).
#[doc(hidden)]
pub fn reencode_message(bytes: &[u8]) -> [Option<Bytes>; 3] {
    [
        Broadcast::decode(bytes).map(|b| Broadcast::encode(b.origin, b.kind, b.payload)),
        Op::decode(bytes).map(|op| op.encode()),
        Sequenced::decode(bytes).map(|m| m.encode()),
    ]
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Text => 1,
        Kind::Binary => 2,
    }
}

fn byte_kind(byte: u8) -> Option<Kind> {
    match byte {
        1 => Some(Kind::Text),
        2 => Some(Kind::Binary),
        _ => None,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.array()?))
    }

    /// A count, then that many ids.
    fn ids(&mut self) -> Option<Vec<u64>> {
        let count = self.u32()? as usize;
        // Bounded by the bytes present, not by the announced count.
        let mut ids = Vec::with_capacity(count.min(self.0.len() / 8));
        for _ in 0..count {
            ids.push(self.u64()?);
        }
        Some(ids)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_survives_a_round_trip() {
        let ops = [
            Op::Send {
                id: 7 << 40 | 3,
                kind: Kind::Text,
                payload: b"hello",
            },
            Op::Subscribe {
                delta: -2,
                ids: vec![1, 2, u64::MAX],
                channel: b"room",
            },
            Op::SubscribeChannel {
                origin: 8191,
                delta: 1,
                source: b"a",
                channel: b"",
            },
            Op::Close {
                id: 9,
                code: 4000,
                reason: "bye ✓".as_bytes(),
            },
            Op::DeleteVirtual {
                id: 5,
                expected: None,
            },
            Op::DeleteVirtual {
                id: 5,
                expected: Some(4),
            },
            Op::CreateVirtual {
                reply_to: 2,
                request: 77,
                target: 12,
                prefix: b"\xff",
            },
            Op::Created {
                request: 77,
                id: Some(13),
            },
            Op::Created {
                request: 78,
                id: None,
            },
            Op::Recover {
                epoch: b"1733.5.2",
                offset: u64::MAX,
                ids: vec![3, 4],
                channel: b"room:1",
            },
        ];
        for op in ops {
            assert_eq!(Op::decode(&op.encode()), Some(op));
        }
        let broadcast = Broadcast::encode(3, Kind::Binary, b"\x00\x01");
        assert_eq!(
            Broadcast::decode(&broadcast),
            Some(Broadcast {
                origin: 3,
                kind: Kind::Binary,
                payload: b"\x00\x01"
            })
        );
    }

    #[test]
    fn sequenced_messages_survive_a_round_trip_and_refuse_odd_spellings() {
        let m = Sequenced {
            epoch: b"1733.5.2",
            offset: 17,
            kind: Kind::Text,
            payload: b"a\0b",
        };
        let bytes = m.encode();
        assert_eq!(&bytes[..], b"1733.5.2\x0017\x00\x01a\x00b");
        assert_eq!(Sequenced::decode(&bytes), Some(m));
        for odd in [
            &b"e\x00017\x00\x01x"[..],
            b"e\x00\x00\x01x",
            b"e\x00+1\x00\x01x",
            b"e\x0099999999999999999999\x00\x01x",
            b"e\x001\x00\x03x",
            b"e\x001\x00",
            b"e\x001",
        ] {
            assert_eq!(Sequenced::decode(odd), None, "{odd:?}");
        }
        assert_eq!(
            decode_kept(b"1733:\x02\x00:"),
            Some((Kind::Binary, &b"\x00:"[..]))
        );
        assert_eq!(decode_kept(b"1733"), None);
        assert_eq!(decode_kept(b"1733:"), None);
    }

    #[test]
    fn truncated_or_unknown_input_is_refused() {
        let op = Op::Subscribe {
            delta: 1,
            ids: vec![1, 2],
            channel: b"c",
        }
        .encode();
        for cut in 0..13 + 16 {
            assert_eq!(Op::decode(&op[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Op::decode(b"Z"), None);
        assert_eq!(Op::decode(b"U\0\0\0\0\0\0\0\x01\xff\xff\xff\xff"), None);
        assert_eq!(Op::decode(b"S\x03\0\0\0\0\0\0\0\x01"), None, "bad kind");
        assert_eq!(Broadcast::decode(b"\0\x01\x09"), None);
        assert_eq!(Broadcast::decode(b"\0"), None);
    }
}
