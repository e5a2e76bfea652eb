//! WebSocket frames (RFC 6455 §5).
//!
//! Server frames are never masked, so a message is encoded once into a [`Bytes`]
//! and every recipient's outbox holds a reference to the same allocation.
//! Client frames go through [`Decoder`], a sans-I/O state machine: it is fed
//! whatever the socket produced and emits whole messages and control frames,
//! or the close code the connection must be failed with. Header parsing is
//! tungstenite's; the rules of what a server must accept are ours, and so
//! are the rules of what an application may put in a close frame.
//!
//! A leaf: uses nothing of the crate.

use std::fmt;
use std::io::Cursor;
use std::ops::RangeInclusive;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Close codes the server sends (API.md §5).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// Largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Most bytes of UTF-8 a close reason may have: the rest of a close frame's
/// payload after the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD as usize - 2;

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
fn encode_parts(opcode: OpCode, prefix: &[u8], payload: &[u8]) -> Bytes {
    let len = (prefix.len() + payload.len()) as u64;
    let header = FrameHeader {
        is_final: true,
        opcode,
        ..FrameHeader::default()
    };
    let mut buf = BytesMut::with_capacity(header.len(len) + len as usize);
    let mut writer = (&mut buf).writer();
    // Writing into a BytesMut cannot fail.
    let _ = header.format(len, &mut writer);
    buf.put_slice(prefix);
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a text or binary message as one frame.
pub fn encode_message(kind: Kind, payload: &[u8]) -> Bytes {
    encode_parts(kind.opcode(), &[], payload)
}

/// Encodes a message with `prefix` prepended to its payload (virtual sockets).
pub fn encode_prefixed(kind: Kind, prefix: &[u8], payload: &[u8]) -> Bytes {
    encode_parts(kind.opcode(), prefix, payload)
}

/// Encodes a close frame. A reason longer than [`MAX_CLOSE_REASON`] (which
/// [`check_close_reason`] refuses) is cut at a character boundary so the
/// payload stays within the 125 bytes a control frame may carry.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
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
pub fn encode_empty_close() -> Bytes {
    encode_parts(OpCode::Control(Control::Close), &[], &[])
}

pub fn encode_ping(payload: &[u8]) -> Bytes {
    encode_parts(OpCode::Control(Control::Ping), &[], payload)
}

pub fn encode_pong(payload: &[u8]) -> Bytes {
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
    data: Vec<u8>,
    /// For text: how many leading bytes are known to be valid UTF-8, so each
    /// fragment is checked once and invalid text fails as soon as it arrives.
    checked: usize,
}

/// Sans-I/O decoder for the frames of one client connection.
///
/// Idle connections hold no buffers: what a decoder keeps between reads (the
/// tail of a frame that has not fully arrived, a fragmented message) lives in
/// one allocation that exists only while there is something to keep. The
/// decoder is part of every connection's task, so it stays small itself.
pub struct Decoder {
    max_message_size: usize,
    held: Option<Box<Held>>,
    closed: bool,
}

/// What a decoder keeps between reads.
#[derive(Default)]
struct Held {
    /// The start of a frame whose rest has not arrived yet.
    pending: Vec<u8>,
    partial: Option<Partial>,
}

impl Decoder {
    pub fn new(max_message_size: usize) -> Self {
        Decoder {
            max_message_size,
            held: None,
            closed: false,
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
        if header.rsv1 || header.rsv2 || header.rsv3 {
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
                let so_far = match (self.partial(), data) {
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
                    (Some(partial), _) => partial.data.len() as u64,
                    (None, _) => 0,
                };
                if so_far + len > self.max_message_size as u64 {
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
                if partial.kind == Kind::Text {
                    partial.checked =
                        check_utf8_prefix(&partial.data, partial.checked, header.is_final)?;
                }
                if header.is_final {
                    let done = self.held.as_mut().and_then(|h| h.partial.take());
                    self.release_held();
                    if let Some(done) = done {
                        sink(match done.kind {
                            Kind::Text => Incoming::Text(done.data),
                            Kind::Binary => Incoming::Binary(done.data),
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
                let checked = if kind == Kind::Text {
                    check_utf8_prefix(&payload, 0, header.is_final)?
                } else {
                    0
                };
                if header.is_final {
                    sink(match kind {
                        Kind::Text => Incoming::Text(payload),
                        Kind::Binary => Incoming::Binary(payload),
                    });
                } else {
                    self.held.get_or_insert_with(Box::default).partial = Some(Partial {
                        kind,
                        data: payload,
                        checked,
                    });
                }
            }
        }
        Ok(())
    }
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
        let mut dec = Decoder::new(1 << 20);
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
        let got = decode_all(&mut Decoder::new(100), &bytes).unwrap();
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
        let got = decode_all(&mut Decoder::new(100), &bytes).unwrap();
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
            let err = decode_all(&mut Decoder::new(100), &bytes).unwrap_err();
            assert_eq!(err.code, code, "{bytes:02x?}");
        }
        let mut nested = client_frame(0x01, b"a");
        nested.extend(client_frame(0x81, b"b"));
        assert_eq!(
            decode_all(&mut Decoder::new(100), &nested)
                .unwrap_err()
                .code,
            close_code::PROTOCOL
        );
    }

    #[test]
    fn invalid_utf8_fails_before_the_message_completes() {
        let bytes = client_frame(0x01, &[b'a', 0xff]);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &bytes).unwrap_err().code,
            close_code::INVALID_DATA
        );
    }

    #[test]
    fn huge_announced_length_fails_without_the_payload() {
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            decode_all(&mut Decoder::new(1 << 20), &header)
                .unwrap_err()
                .code,
            close_code::TOO_BIG
        );
        let mut top_bit = vec![0x82, 0x80 | 127];
        top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
        top_bit.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            decode_all(&mut Decoder::new(1 << 20), &top_bit)
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
            decode_all(&mut Decoder::new(100), &bytes).unwrap_err().code,
            close_code::TOO_BIG
        );
    }

    #[test]
    fn stops_after_close() {
        let mut bytes = client_frame(0x88, &[3, 232, b'o', b'k']);
        bytes.extend(client_frame(0x81, b"late"));
        let got = decode_all(&mut Decoder::new(100), &bytes).unwrap();
        assert_eq!(got, vec![Incoming::Close(Some(1000))]);
    }

    #[test]
    fn frames_after_a_pause_stay_buffered_until_fed_again() {
        let bytes: Vec<u8> = (0..5u8)
            .flat_map(|i| client_frame(0x81, &[b'a' + i]))
            .collect();
        let mut dec = Decoder::new(100);
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
