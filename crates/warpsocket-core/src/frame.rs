//! WebSocket frames (RFC 6455 §5).
//!
//! Server frames are never masked, so a message is encoded once into a
//! [`FrameBytes`] and every recipient's outbox holds a reference to the same
//! allocation.
//! Client frames go through [`Decoder`], a sans-I/O state machine: it is fed
//! whatever the socket produced and emits whole messages and control frames,
//! or the close code the connection must be failed with. Header parsing is
//! tungstenite's; the rules of what a server must accept are ours, and so
//! are the rules of what an application may put in a close frame.
//!
//! With permessage-deflate negotiated, a message whose first frame has RSV1
//! set is compressed: the decoder inflates it whole (see [`Decoder`]) and the
//! encoder can compress a message once for all its recipients
//! ([`encode_compressed`]).

use std::fmt;
use std::io::Cursor;
use std::ops::RangeInclusive;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::deflate::{self, InflateError};
pub use crate::frame_bytes::FrameBytes;

/// Close codes the server sends (docs/api.md#close-codes).
pub mod close_code {
    /// Defines each code and [`ALL`], the table `warpsocket.CloseCode` is
    /// made from: a code added here reaches Python without a second list.
    macro_rules! codes {
        ($($name:ident = $code:literal,)*) => {
            $(pub const $name: u16 = $code;)*
            /// Every code above with its name.
            pub const ALL: &[(&str, u16)] = &[$((stringify!($name), $name)),*];
        };
    }

    codes! {
        NORMAL = 1000,
        GOING_AWAY = 1001,
        PROTOCOL = 1002,
        UNSUPPORTED = 1003,
        INVALID_DATA = 1007,
        POLICY = 1008,
        TOO_BIG = 1009,
        INTERNAL = 1011,
    }
}

/// Largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Most bytes of UTF-8 a close reason may have: the rest of a close frame's
/// payload after the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD as usize - 2;

/// The longest header of an unmasked frame: two bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// Codes a close frame may carry (RFC 6455 §7.4): those defined for use on
/// the wire, and the ranges for libraries and applications.
const VALID_CLOSE_CODES: [RangeInclusive<u16>; 3] = [1000..=1003, 1007..=1014, 3000..=4999];

/// Why an application's close code or reason cannot go in a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadClose {
    /// The code is not one of [`VALID_CLOSE_CODES`].
    Code(i64),
    /// The reason has more than [`MAX_CLOSE_REASON`] bytes.
    ReasonTooLong,
}

impl fmt::Display for BadClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadClose::Code(code) => {
                f.write_str("code must be ")?;
                for (i, range) in VALID_CLOSE_CODES.iter().enumerate() {
                    let separator = match i {
                        0 => "",
                        _ if i + 1 == VALID_CLOSE_CODES.len() => " or ",
                        _ => ", ",
                    };
                    write!(f, "{separator}{}-{}", range.start(), range.end())?;
                }
                write!(f, ", got {code}")
            }
            BadClose::ReasonTooLong => {
                write!(
                    f,
                    "reason must be at most {MAX_CLOSE_REASON} bytes in UTF-8"
                )
            }
        }
    }
}

impl std::error::Error for BadClose {}

/// An application's close code, if a close frame may carry it.
pub fn check_close_code(code: i64) -> Result<u16, BadClose> {
    match u16::try_from(code) {
        Ok(code) if is_valid_close_code(code) => Ok(code),
        _ => Err(BadClose::Code(code)),
    }
}

/// Checks that an application's close reason fits in a close frame.
pub fn check_close_reason(reason: &str) -> Result<(), BadClose> {
    if reason.len() > MAX_CLOSE_REASON {
        return Err(BadClose::ReasonTooLong);
    }
    Ok(())
}

/// Kind of a data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

impl Kind {
    fn opcode(self) -> OpCode {
        match self {
            Kind::Text => OpCode::Data(Data::Text),
            Kind::Binary => OpCode::Data(Data::Binary),
        }
    }
}

/// Encodes one unfragmented, unmasked frame: `prefix` then `payload` as its payload.
fn encode_parts(opcode: OpCode, prefix: &[u8], payload: &[u8]) -> FrameBytes {
    let header = FrameHeader {
        is_final: true,
        opcode,
        ..FrameHeader::default()
    };
    encode_frame(&header, prefix, payload)
}

fn encode_frame(header: &FrameHeader, prefix: &[u8], payload: &[u8]) -> FrameBytes {
    let len = (prefix.len() + payload.len()) as u64;
    let mut head = [0u8; MAX_HEADER];
    let mut cursor = Cursor::new(&mut head[..]);
    // A header is at most MAX_HEADER bytes: writing it here cannot fail.
    let _ = header.format(len, &mut cursor);
    let used = cursor.position() as usize;
    FrameBytes::from_parts(&[&head[..used], prefix, payload])
}

/// Encodes a text or binary message as one frame.
pub fn encode_message(kind: Kind, payload: &[u8]) -> FrameBytes {
    encode_parts(kind.opcode(), &[], payload)
}

/// Encodes a message with `prefix` prepended to its payload (virtual sockets).
pub fn encode_prefixed(kind: Kind, prefix: &[u8], payload: &[u8]) -> FrameBytes {
    encode_parts(kind.opcode(), prefix, payload)
}

/// Encodes `prefix` then `payload` as one compressed message (RSV1 set,
/// permessage-deflate without context takeover), or `None` when it should
/// go out uncompressed (short, or it did not get smaller). The frame is the
/// same for every recipient that negotiated compression and for which
/// [`deflate::Negotiated::fits_window`] holds.
pub fn encode_compressed(kind: Kind, prefix: &[u8], payload: &[u8]) -> Option<FrameBytes> {
    deflate::compress(prefix, payload, |compressed| {
        let header = FrameHeader {
            is_final: true,
            rsv1: true,
            opcode: kind.opcode(),
            ..FrameHeader::default()
        };
        encode_frame(&header, &[], compressed)
    })
}

/// Encodes a close frame. A reason longer than [`MAX_CLOSE_REASON`] (which
/// [`check_close_reason`] refuses) is cut at a character boundary so the
/// payload stays within the 125 bytes a control frame may carry.
pub fn encode_close(code: u16, reason: &str) -> FrameBytes {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    encode_parts(
        OpCode::Control(Control::Close),
        &code.to_be_bytes(),
        &reason.as_bytes()[..cut],
    )
}

/// Encodes an empty close frame (the reply to a close frame without a code).
pub fn encode_empty_close() -> FrameBytes {
    encode_parts(OpCode::Control(Control::Close), &[], &[])
}

pub fn encode_ping(payload: &[u8]) -> FrameBytes {
    encode_parts(OpCode::Control(Control::Ping), &[], payload)
}

pub fn encode_pong(payload: &[u8]) -> FrameBytes {
    encode_parts(OpCode::Control(Control::Pong), &[], payload)
}

/// What the decoder found in the client's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message; the bytes are valid UTF-8.
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code (if any) and the reason.
    Close(Option<u16>),
}

/// Why the connection must be failed, and with which close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    const fn new(code: u16, reason: &'static str) -> Self {
        Violation { code, reason }
    }
}

/// A fragmented message still being received.
struct Partial {
    kind: Kind,
    /// The payload so far; still compressed for a compressed message.
    data: Vec<u8>,
    /// For uncompressed text: how many leading bytes are known to be valid
    /// UTF-8, so each fragment is checked once and invalid text fails as
    /// soon as it arrives.
    checked: usize,
    /// Its first frame had RSV1 set: inflated once it is complete.
    compressed: bool,
}

/// Sans-I/O decoder for the frames of one client connection.
///
/// Idle connections hold no buffers: what a decoder keeps between reads (the
/// tail of a frame that has not fully arrived, a fragmented message) lives in
/// one allocation that exists only while there is something to keep. The
/// decoder is part of every connection's task, so it stays small itself.
///
/// With permessage-deflate negotiated (`inflate`), compressed messages are
/// inflated with the I/O thread's shared inflater, since the server always
/// answers with `client_no_context_takeover`: no connection keeps inflate
/// state. A fragmented compressed message is collected compressed and
/// inflated when its last fragment arrives, as the shared inflater cannot
/// hold half a message while other connections use it.
pub struct Decoder {
    max_message_size: usize,
    held: Option<Box<Held>>,
    closed: bool,
    inflate: bool,
}

/// What a decoder keeps between reads.
#[derive(Default)]
struct Held {
    /// The start of a frame whose rest has not arrived yet.
    pending: Vec<u8>,
    partial: Option<Partial>,
}

impl Decoder {
    /// `inflate`: permessage-deflate was negotiated, so RSV1 marks a
    /// compressed message.
    pub fn new(max_message_size: usize, inflate: bool) -> Self {
        Decoder {
            max_message_size,
            held: None,
            closed: false,
            inflate,
        }
    }

    /// Feeds bytes read from the socket; calls `sink` for every complete
    /// message or control frame, in order. After a close frame nothing more is
    /// decoded. On a protocol violation, returns the close code to fail with.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl FnMut(Incoming)) -> Result<(), Violation> {
        self.feed_while(data, &mut || true, sink)
    }

    /// Like [`feed`](Self::feed), but asks `more()` before each frame: once it
    /// says no, the rest stays buffered, to be decoded by a later call (which
    /// may bring no new bytes). This is how a reader that must stop at a
    /// number of messages leaves the others undecoded.
    pub fn feed_while(
        &mut self,
        data: &[u8],
        more: &mut impl FnMut() -> bool,
        sink: &mut impl FnMut(Incoming),
    ) -> Result<(), Violation> {
        if self.closed {
            return Ok(());
        }
        let mut pending = match &mut self.held {
            Some(held) => std::mem::take(&mut held.pending),
            None => Vec::new(),
        };
        if pending.is_empty() {
            let used = self.decode(data, more, sink)?;
            pending.extend_from_slice(&data[used..]);
        } else {
            pending.extend_from_slice(data);
            let used = self.decode(&pending, more, sink)?;
            pending.drain(..used);
        }
        if !self.closed && !pending.is_empty() {
            self.held.get_or_insert_with(Box::default).pending = pending;
        }
        self.release_held();
        Ok(())
    }

    /// Frees what the decoder kept once nothing is left in it.
    fn release_held(&mut self) {
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.pending.is_empty() && h.partial.is_none())
        {
            self.held = None;
        }
    }

    fn partial(&self) -> Option<&Partial> {
        self.held.as_ref()?.partial.as_ref()
    }

    /// Decodes the complete frames at the start of `buf` while `more()` says
    /// so; returns the bytes used.
    fn decode(
        &mut self,
        buf: &[u8],
        more: &mut impl FnMut() -> bool,
        sink: &mut impl FnMut(Incoming),
    ) -> Result<usize, Violation> {
        let mut pos = 0;
        while !self.closed && more() {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(_) => return Err(Violation::new(close_code::PROTOCOL, "reserved opcode")),
            };
            self.check_header(&header, len)?;
            let start = pos + cursor.position() as usize;
            // len fits in usize: check_header bounded it by max_message_size or 125.
            let end = start + len as usize;
            if end > buf.len() {
                break;
            }
            let mut payload = buf[start..end].to_vec();
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            pos = end;
            self.frame(header, payload, sink)?;
        }
        Ok(pos)
    }

    fn check_header(&self, header: &FrameHeader, len: u64) -> Result<(), Violation> {
        // RSV1 marks a compressed message: only with permessage-deflate, and
        // only on the first frame of a data message (RFC 7692 §6).
        let first_data = matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        if header.rsv2 || header.rsv3 || (header.rsv1 && !(self.inflate && first_data)) {
            return Err(Violation::new(close_code::PROTOCOL, "reserved bits set"));
        }
        if header.mask.is_none() {
            return Err(Violation::new(
                close_code::PROTOCOL,
                "client frame not masked",
            ));
        }
        if len >> 63 != 0 {
            return Err(Violation::new(close_code::PROTOCOL, "invalid frame length"));
        }
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final {
                    return Err(Violation::new(
                        close_code::PROTOCOL,
                        "fragmented control frame",
                    ));
                }
                if len > MAX_CONTROL_PAYLOAD {
                    return Err(Violation::new(
                        close_code::PROTOCOL,
                        "control frame too long",
                    ));
                }
            }
            OpCode::Data(data) => {
                let (so_far, compressed) = match (self.partial(), data) {
                    (None, Data::Continue) => {
                        return Err(Violation::new(
                            close_code::PROTOCOL,
                            "continuation without a message",
                        ))
                    }
                    (Some(_), Data::Text | Data::Binary) => {
                        return Err(Violation::new(
                            close_code::PROTOCOL,
                            "new message inside a fragmented one",
                        ))
                    }
                    (Some(partial), _) => (partial.data.len() as u64, partial.compressed),
                    (None, _) => (0, header.rsv1),
                };
                // A compressed message is checked again, exactly, as it is inflated.
                let limit = if compressed {
                    compressed_limit(self.max_message_size)
                } else {
                    self.max_message_size
                };
                if so_far + len > limit as u64 {
                    return Err(Violation::new(close_code::TOO_BIG, "message too big"));
                }
            }
        }
        Ok(())
    }

    fn frame(
        &mut self,
        header: FrameHeader,
        payload: Vec<u8>,
        sink: &mut impl FnMut(Incoming),
    ) -> Result<(), Violation> {
        match header.opcode {
            OpCode::Control(Control::Ping) => sink(Incoming::Ping(payload)),
            OpCode::Control(Control::Pong) => sink(Incoming::Pong),
            OpCode::Control(Control::Close) => {
                let code = parse_close_payload(&payload)?;
                self.closed = true;
                self.held = None;
                sink(Incoming::Close(code));
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(Violation::new(close_code::PROTOCOL, "reserved opcode"))
            }
            OpCode::Data(Data::Continue) => {
                // check_header guarantees a partial message exists.
                let Some(partial) = self.held.as_mut().and_then(|h| h.partial.as_mut()) else {
                    return Err(Violation::new(
                        close_code::PROTOCOL,
                        "continuation without a message",
                    ));
                };
                partial.data.extend_from_slice(&payload);
                if partial.kind == Kind::Text && !partial.compressed {
                    partial.checked =
                        check_utf8_prefix(&partial.data, partial.checked, header.is_final)?;
                }
                if header.is_final {
                    let done = self.held.as_mut().and_then(|h| h.partial.take());
                    self.release_held();
                    if let Some(done) = done {
                        let data = if done.compressed {
                            self.inflate_message(done.kind, &done.data)?
                        } else {
                            done.data
                        };
                        sink(match done.kind {
                            Kind::Text => Incoming::Text(data),
                            Kind::Binary => Incoming::Binary(data),
                        });
                    }
                }
            }
            OpCode::Data(data) => {
                let kind = if data == Data::Text {
                    Kind::Text
                } else {
                    Kind::Binary
                };
                let compressed = header.rsv1;
                let checked = if kind == Kind::Text && !compressed {
                    check_utf8_prefix(&payload, 0, header.is_final)?
                } else {
                    0
                };
                if header.is_final {
                    let data = if compressed {
                        self.inflate_message(kind, &payload)?
                    } else {
                        payload
                    };
                    sink(match kind {
                        Kind::Text => Incoming::Text(data),
                        Kind::Binary => Incoming::Binary(data),
                    });
                } else {
                    self.held.get_or_insert_with(Box::default).partial = Some(Partial {
                        kind,
                        data: payload,
                        checked,
                        compressed,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Decoder {
    /// Inflates a whole compressed message, never past `max_message_size`
    /// (a deflate bomb costs at most the limit), and checks text for UTF-8.
    fn inflate_message(&self, kind: Kind, compressed: &[u8]) -> Result<Vec<u8>, Violation> {
        let mut data = Vec::new();
        match deflate::inflate_message(compressed, &mut data, self.max_message_size) {
            Ok(()) => {}
            Err(InflateError::TooBig) => {
                return Err(Violation::new(close_code::TOO_BIG, "message too big"))
            }
            // RFC 7692 §8: invalid compressed data fails the connection; the
            // payload is not what the extension said it is (1007).
            Err(InflateError::Invalid) => {
                return Err(Violation::new(
                    close_code::INVALID_DATA,
                    "invalid compressed data",
                ))
            }
        }
        if kind == Kind::Text {
            check_utf8_prefix(&data, 0, true)?;
        }
        Ok(data)
    }
}

/// Most compressed bytes a message of at most `max` bytes may take: deflate
/// can make incompressible data larger (stored blocks cost 5 bytes per
/// 64 KiB, a sync flush 5 more), so the compressed frames get 1/64 of slack
/// plus a little. What counts is the size once inflated, checked exactly.
fn compressed_limit(max: usize) -> usize {
    max.saturating_add(max / 64).saturating_add(64)
}

/// Checks `data[from..]` for UTF-8. A character cut at the end is fine unless
/// the message is complete. Returns how far the data is known to be valid.
fn check_utf8_prefix(data: &[u8], from: usize, complete: bool) -> Result<usize, Violation> {
    const INVALID: Violation = Violation::new(close_code::INVALID_DATA, "invalid UTF-8 in text");
    match simdutf8::compat::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() && !complete => Ok(from + e.valid_up_to()),
        Err(_) => Err(INVALID),
    }
}

/// Validates a close frame's payload (RFC 6455 §5.5.1, §7.4).
fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::new(
            close_code::PROTOCOL,
            "close payload of one byte",
        )),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(Violation::new(close_code::PROTOCOL, "invalid close code"));
            }
            if simdutf8::basic::from_utf8(&payload[2..]).is_err() {
                return Err(Violation::new(
                    close_code::INVALID_DATA,
                    "invalid UTF-8 in close reason",
                ));
            }
            Ok(Some(code))
        }
    }
}

/// Codes a peer may send in a close frame.
pub fn is_valid_close_code(code: u16) -> bool {
    VALID_CLOSE_CODES.iter().any(|range| range.contains(&code))
}

/// XORs `data` with the client's masking key, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a masked client frame the way a browser would.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<Incoming>, Violation> {
        let mut got = Vec::new();
        dec.feed(bytes, &mut |m| got.push(m))?;
        Ok(got)
    }

    #[test]
    fn encodes_small_and_large_frames() {
        let small = encode_message(Kind::Text, b"hi");
        assert_eq!(&small[..], &[0x81, 2, b'h', b'i']);
        let large = encode_message(Kind::Binary, &[7u8; 300]);
        assert_eq!(&large[..4], &[0x82, 126, 1, 44]);
        assert_eq!(large.len(), 304);
        let prefixed = encode_prefixed(Kind::Text, b"r1:", b"x");
        assert_eq!(&prefixed[..], &[0x81, 4, b'r', b'1', b':', b'x']);
        let close = encode_close(4001, "bye");
        assert_eq!(&close[..], &[0x88, 5, 0x0f, 0xa1, b'b', b'y', b'e']);
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = encode_close(1000, &reason);
        assert!(frame.len() - 2 <= 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn an_application_close_is_checked_against_the_wire_rules() {
        for code in [1000, 1003, 1007, 1014, 3000, 4999] {
            assert_eq!(check_close_code(code), Ok(code as u16));
        }
        for code in [-1, 999, 1004, 1006, 1015, 2999, 5000, 65536 + 1000] {
            assert_eq!(check_close_code(code), Err(BadClose::Code(code)));
        }
        assert_eq!(
            BadClose::Code(5000).to_string(),
            "code must be 1000-1003, 1007-1014 or 3000-4999, got 5000"
        );
        assert_eq!(check_close_reason(&"x".repeat(123)), Ok(()));
        assert_eq!(
            check_close_reason(&"é".repeat(62)),
            Err(BadClose::ReasonTooLong)
        );
        assert_eq!(
            BadClose::ReasonTooLong.to_string(),
            "reason must be at most 123 bytes in UTF-8"
        );
    }

    #[test]
    fn decodes_messages_split_at_every_byte() {
        let mut bytes = client_frame(0x81, "héllo".as_bytes());
        bytes.extend(client_frame(0x82, &[1, 2, 3]));
        bytes.extend(client_frame(0x89, b"p"));
        let mut dec = Decoder::new(1 << 20, false);
        let mut got = Vec::new();
        for b in &bytes {
            dec.feed(std::slice::from_ref(b), &mut |m| got.push(m))
                .unwrap();
        }
        assert_eq!(
            got,
            vec![
                Incoming::Text("héllo".as_bytes().to_vec()),
                Incoming::Binary(vec![1, 2, 3]),
                Incoming::Ping(b"p".to_vec())
            ]
        );
        assert!(dec.held.is_none(), "nothing kept once every frame is whole");
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control_frames() {
        let mut bytes = client_frame(0x01, b"ab");
        bytes.extend(client_frame(0x89, b""));
        bytes.extend(client_frame(0x00, b"cd"));
        bytes.extend(client_frame(0x80, b"e"));
        let got = decode_all(&mut Decoder::new(100, false), &bytes).unwrap();
        assert_eq!(
            got,
            vec![Incoming::Ping(vec![]), Incoming::Text(b"abcde".to_vec())]
        );
    }

    #[test]
    fn accepts_a_utf8_character_split_over_fragments() {
        let euro = "€".as_bytes();
        let mut bytes = client_frame(0x01, &euro[..1]);
        bytes.extend(client_frame(0x80, &euro[1..]));
        let got = decode_all(&mut Decoder::new(100, false), &bytes).unwrap();
        assert_eq!(got, vec![Incoming::Text(euro.to_vec())]);
    }

    #[test]
    fn rejects_protocol_violations() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(0xC1, b"x"), close_code::PROTOCOL), // rsv1
            (client_frame(0x83, b"x"), close_code::PROTOCOL), // reserved data opcode
            (client_frame(0x8B, b"x"), close_code::PROTOCOL), // reserved control opcode
            (client_frame(0x09, b"x"), close_code::PROTOCOL), // fragmented ping
            (client_frame(0x89, &[0; 126]), close_code::PROTOCOL), // long ping
            (client_frame(0x80, b"x"), close_code::PROTOCOL), // continuation first
            (vec![0x81, 0x01, b'x'], close_code::PROTOCOL),   // unmasked
            (client_frame(0x81, &[0xff, 0xfe]), close_code::INVALID_DATA),
            (client_frame(0x88, &[3]), close_code::PROTOCOL), // 1-byte close
            (
                client_frame(0x88, &1005u16.to_be_bytes()),
                close_code::PROTOCOL,
            ),
            (
                client_frame(0x88, &[3, 232, 0xff]),
                close_code::INVALID_DATA,
            ),
            (client_frame(0x82, &[0; 101]), close_code::TOO_BIG),
        ];
        for (bytes, code) in cases {
            let err = decode_all(&mut Decoder::new(100, false), &bytes).unwrap_err();
            assert_eq!(err.code, code, "{bytes:02x?}");
        }
        let mut nested = client_frame(0x01, b"a");
        nested.extend(client_frame(0x81, b"b"));
        assert_eq!(
            decode_all(&mut Decoder::new(100, false), &nested)
                .unwrap_err()
                .code,
            close_code::PROTOCOL
        );
    }

    #[test]
    fn invalid_utf8_fails_before_the_message_completes() {
        let bytes = client_frame(0x01, &[b'a', 0xff]);
        assert_eq!(
            decode_all(&mut Decoder::new(100, false), &bytes)
                .unwrap_err()
                .code,
            close_code::INVALID_DATA
        );
    }

    #[test]
    fn huge_announced_length_fails_without_the_payload() {
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            decode_all(&mut Decoder::new(1 << 20, false), &header)
                .unwrap_err()
                .code,
            close_code::TOO_BIG
        );
        let mut top_bit = vec![0x82, 0x80 | 127];
        top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
        top_bit.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            decode_all(&mut Decoder::new(1 << 20, false), &top_bit)
                .unwrap_err()
                .code,
            close_code::PROTOCOL
        );
    }

    #[test]
    fn fragment_total_counts_against_the_limit() {
        let mut bytes = client_frame(0x02, &[0; 60]);
        bytes.extend(client_frame(0x80, &[0; 60]));
        assert_eq!(
            decode_all(&mut Decoder::new(100, false), &bytes)
                .unwrap_err()
                .code,
            close_code::TOO_BIG
        );
    }

    #[test]
    fn stops_after_close() {
        let mut bytes = client_frame(0x88, &[3, 232, b'o', b'k']);
        bytes.extend(client_frame(0x81, b"late"));
        let got = decode_all(&mut Decoder::new(100, false), &bytes).unwrap();
        assert_eq!(got, vec![Incoming::Close(Some(1000))]);
    }

    /// A message compressed the way a client without context takeover does.
    fn deflated(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len() * 2 + 64);
        let mut stream = flate2::Compress::new(flate2::Compression::default(), false);
        stream
            .compress_vec(message, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert_eq!(stream.total_in(), message.len() as u64);
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn inflates_compressed_messages_whole_or_fragmented() {
        let text = "ünïcode text, ".repeat(50);
        let compressed = deflated(text.as_bytes());
        let mut bytes = client_frame(0xC1, &compressed);
        let third = compressed.len() / 3;
        bytes.extend(client_frame(0x42, &compressed[..third]));
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x00, &compressed[third..2 * third]));
        bytes.extend(client_frame(0x80, &compressed[2 * third..]));
        bytes.extend(client_frame(0x81, b"plain"));
        let mut dec = Decoder::new(1 << 20, true);
        let mut got = Vec::new();
        for b in &bytes {
            dec.feed(std::slice::from_ref(b), &mut |m| got.push(m))
                .unwrap();
        }
        assert_eq!(
            got,
            vec![
                Incoming::Text(text.as_bytes().to_vec()),
                Incoming::Ping(b"p".to_vec()),
                Incoming::Binary(text.as_bytes().to_vec()),
                Incoming::Text(b"plain".to_vec()),
            ]
        );
        assert!(dec.held.is_none());
    }

    #[test]
    fn rsv1_only_on_the_first_frame_of_a_negotiated_message() {
        let compressed = deflated(b"hello hello hello");
        let mut continued = client_frame(0x01, b"a");
        continued.extend(client_frame(0xC0, b"b"));
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (client_frame(0xC1, &compressed), false), // not negotiated
            (client_frame(0xC9, b""), true),          // on a ping
            (client_frame(0xA1, b"x"), true),         // RSV2
            (client_frame(0x91, b"x"), true),         // RSV3
            (continued, true),                        // on a continuation
        ];
        for (bytes, inflate) in cases {
            let err = decode_all(&mut Decoder::new(100, inflate), &bytes).unwrap_err();
            assert_eq!(err.code, close_code::PROTOCOL, "{bytes:02x?}");
        }
    }

    #[test]
    fn the_limit_applies_to_the_inflated_size() {
        let limit = 1000;
        for (len, fits) in [(limit, true), (limit + 1, false), (1 << 20, false)] {
            let message = vec![b'a'; len];
            let frame = client_frame(0xC2, &deflated(&message));
            let result = decode_all(&mut Decoder::new(limit, true), &frame);
            match fits {
                true => assert_eq!(result.unwrap(), vec![Incoming::Binary(message)]),
                false => assert_eq!(result.unwrap_err().code, close_code::TOO_BIG),
            }
        }
        // Incompressible data at the limit: its compressed frame is larger.
        let mut x = 0x9e37_79b9u32;
        let noise: Vec<u8> = (0..limit)
            .map(|_| {
                // xorshift32
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let compressed = deflated(&noise);
        assert!(compressed.len() > limit);
        let got = decode_all(
            &mut Decoder::new(limit, true),
            &client_frame(0xC2, &compressed),
        );
        assert_eq!(got.unwrap(), vec![Incoming::Binary(noise)]);
    }

    #[test]
    fn bad_compressed_data_fails_with_1007() {
        let mut bad_utf8 = client_frame(0xC1, &deflated(&[b'a', 0xff, b'b']));
        bad_utf8.extend(client_frame(0x81, b"late"));
        for bytes in [client_frame(0xC2, &[0xff, 0xff, 0xff]), bad_utf8] {
            let err = decode_all(&mut Decoder::new(100, true), &bytes).unwrap_err();
            assert_eq!(err.code, close_code::INVALID_DATA, "{bytes:02x?}");
        }
    }

    #[test]
    fn encodes_a_compressed_frame_with_rsv1() {
        let payload = "chat message ".repeat(40);
        let frame = encode_compressed(Kind::Text, b"p:", payload.as_bytes()).unwrap();
        assert_eq!(frame[0], 0xC1);
        assert!(frame.len() < payload.len() / 2);
        assert_eq!(encode_compressed(Kind::Text, b"", b"short"), None);
    }

    #[test]
    fn frames_after_a_pause_stay_buffered_until_fed_again() {
        let bytes: Vec<u8> = (0..5u8)
            .flat_map(|i| client_frame(0x81, &[b'a' + i]))
            .collect();
        let mut dec = Decoder::new(100, false);
        let mut got = Vec::new();
        // Room for two messages, asked before each frame.
        let mut room = 2u32;
        let mut more = || {
            let yes = room > 0;
            room = room.saturating_sub(1);
            yes
        };
        dec.feed_while(&bytes, &mut more, &mut |m| got.push(m))
            .unwrap();
        assert_eq!(
            got,
            vec![Incoming::Text(b"a".to_vec()), Incoming::Text(b"b".to_vec())]
        );
        // No new bytes: the buffered frames come out, in order, then what follows.
        dec.feed(&[], &mut |m| got.push(m)).unwrap();
        dec.feed(&client_frame(0x81, b"f"), &mut |m| got.push(m))
            .unwrap();
        let texts: Vec<Incoming> = (b'a'..=b'f').map(|c| Incoming::Text(vec![c])).collect();
        assert_eq!(got, texts);
        assert!(dec.held.is_none());
    }

    #[test]
    fn unmask_matches_bytewise_xor() {
        let mask = [1, 2, 3, 4];
        let original: Vec<u8> = (0..37).collect();
        let mut data = original.clone();
        unmask(&mut data, mask);
        for (i, b) in data.iter().enumerate() {
            assert_eq!(*b, original[i] ^ mask[i % 4]);
        }
    }
}
