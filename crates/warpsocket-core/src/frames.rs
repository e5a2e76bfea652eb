//! The frames of one message on its way to many recipients, each form
//! encoded (and compressed) at most once however many get it.
//!
//! A broadcast to thousands of sockets must cost one encoding and one
//! deflate run, not one per recipient: the recipients share the frame's
//! bytes, and only the variants some of them need (compressed, prefixed by a
//! virtual socket) are made, on first demand.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use crate::deflate::MIN_COMPRESS_SIZE;
use crate::frame::{self, FrameBytes, Kind};
use crate::registry::Prefix;
use crate::socket::Socket;
use crate::stats::Counters;

/// The frames of one message being sent, each encoded at most once however
/// many recipients get it: the plain frame, the compressed one for the
/// recipients that negotiated permessage-deflate (compressed without context
/// takeover, so the same frame serves them all), and both again for each
/// distinct prefix of the virtual sockets it goes through.
pub(crate) struct Frames<'a> {
    kind: Kind,
    /// A history channel's stamp (`17:`), between a virtual socket's prefix
    /// and the payload; empty for every other message.
    stamp: &'a [u8],
    payload: &'a [u8],
    plain: Forms,
    prefixed: HashMap<Prefix, Forms>,
    /// Counts each deflate run as it happens, before the frame is queued,
    /// so a client that has the frame can already see the count.
    compressions: &'a AtomicU64,
}

/// One message's frame, and its compressed frame once a recipient wanted it
/// (`Some(None)`: it was not worth compressing).
struct Forms {
    plain: FrameBytes,
    compressed: Option<Option<FrameBytes>>,
}

impl<'a> Frames<'a> {
    pub(crate) fn new(kind: Kind, payload: &'a [u8], compressions: &'a AtomicU64) -> Self {
        Self::stamped(kind, &[], payload, compressions)
    }

    /// The frames of a history channel's message: `stamp` goes into each
    /// frame as it is encoded, so the stamped payload is never a copy of
    /// its own.
    pub(crate) fn stamped(
        kind: Kind,
        stamp: &'a [u8],
        payload: &'a [u8],
        compressions: &'a AtomicU64,
    ) -> Self {
        Frames {
            kind,
            stamp,
            payload,
            plain: Forms::new(frame::encode_prefixed(kind, stamp, payload)),
            prefixed: HashMap::new(),
            compressions,
        }
    }

    /// The frame for `socket`, reached through a virtual socket with `prefix`.
    pub(crate) fn for_socket(&mut self, socket: &Socket, prefix: Option<Prefix>) -> &FrameBytes {
        let Frames {
            kind,
            stamp,
            payload,
            plain,
            prefixed,
            compressions,
        } = self;
        let (kind, prefix, forms) = match prefix {
            None => (*kind, Prefix::new(), plain),
            Some(prefix) => {
                let kind = prefixed_kind(*kind, &prefix);
                let forms = prefixed.entry(prefix.clone()).or_insert_with(|| {
                    with_head(&prefix, stamp, |head| {
                        Forms::new(frame::encode_prefixed(kind, head, payload))
                    })
                });
                (kind, prefix, forms)
            }
        };
        let len = prefix.len() + stamp.len() + payload.len();
        if len < MIN_COMPRESS_SIZE || !socket.deflate().is_some_and(|n| n.fits_window(len)) {
            return &forms.plain;
        }
        forms
            .compressed
            .get_or_insert_with(|| {
                Counters::add(compressions, 1);
                with_head(&prefix, stamp, |head| {
                    frame::encode_compressed(kind, head, payload)
                })
            })
            .as_ref()
            .unwrap_or(&forms.plain)
    }
}

impl Forms {
    fn new(plain: FrameBytes) -> Self {
        Forms {
            plain,
            compressed: None,
        }
    }
}

/// Calls `f` with what goes before the payload: a virtual socket's prefix,
/// then a history channel's stamp (copied together only when there are both).
fn with_head<R>(prefix: &[u8], stamp: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if stamp.is_empty() {
        f(prefix)
    } else if prefix.is_empty() {
        f(stamp)
    } else {
        f(&[prefix, stamp].concat())
    }
}

/// The kind of a prefixed copy of a message. Text stays text only when the
/// prefix is valid UTF-8, so no client ever receives invalid text.
fn prefixed_kind(kind: Kind, prefix: &[u8]) -> Kind {
    match kind {
        Kind::Text if std::str::from_utf8(prefix).is_err() => Kind::Binary,
        kind => kind,
    }
}
