//! permessage-deflate (RFC 7692): negotiation, compression of whole messages
//! and inflation with a bound on the decompressed size.
//!
//! Neither side uses context takeover, so every message is compressed on its
//! own. The server's: a broadcast is compressed once and the same frame goes
//! to every recipient that negotiated the extension. The client's: the
//! server always answers with `client_no_context_takeover`, so what a client
//! sends is inflated by an inflater shared per thread and reset per message,
//! and no connection keeps inflate state (about 48 KiB each otherwise).

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Largest LZ77 window, as a power of two (RFC 7692 §7.1.2).
pub const MAX_WINDOW_BITS: u8 = 15;

/// Messages shorter than this go out uncompressed.
///
/// Measured on chat-like JSON (`measure_threshold` below, release build;
/// level 1, no context takeover, tail removed): 96 bytes compress to 94
/// (-3%), 128 to 120 (-6%), 144 to 125 (-13%), 160 to 131 (-18%), 192 to 142
/// (-26%), 256 to 163 (-37%), 1024 to 396 (-61%). Every call pays a fixed
/// cost first, resetting the hash table: 3.8 µs alone, against 3.6 to 4 µs
/// for a whole message of 160 to 256 bytes and 6.4 µs for 1 KiB. Below 160
/// bytes that fixed cost buys a few bytes; from 160 on it saves a fifth of
/// the message and more as messages grow.
pub const MIN_COMPRESS_SIZE: usize = 160;

/// Deflate level for outgoing messages. Measured as above: level 2 makes
/// 1 KiB of JSON 25% smaller than level 1 (299 against 396 bytes) and level 6
/// 31% smaller, but at 3.5 and 6 times the CPU (22 and 40 µs against 6.4).
/// Level 1 (zlib-rs' quick strategy) keeps a compressed broadcast near the
/// cost of an uncompressed one, and one-to-one messages are compressed per send.
const LEVEL: u32 = 1;

/// The four octets a sync flush ends with, removed before sending and put
/// back before inflating (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What was agreed with one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Largest window the server's compressed messages may use (8..=15).
    pub server_window_bits: u8,
}

impl Negotiated {
    /// Whether a message of `len` bytes compressed by [`compress`] may go to
    /// this client compressed. [`compress`] has a 15-bit window, but without
    /// context takeover a message of at most 2^N bytes never refers further
    /// back than 2^N: the frame is exactly what a compressor with the client's
    /// window could have made. Longer messages go to such a client (one that
    /// sent `server_max_window_bits` below 15, which browsers do not)
    /// uncompressed, so a broadcast is still compressed only once.
    pub fn fits_window(&self, len: usize) -> bool {
        self.server_window_bits >= MAX_WINDOW_BITS || len <= 1 << self.server_window_bits
    }
}

/// Chooses the first acceptable permessage-deflate offer in a request's
/// `Sec-WebSocket-Extensions` value (repeated headers joined with ", ") and
/// returns what was agreed with the response header value. `None` declines:
/// no offer, only unknown extensions, malformed offers or a malformed header.
///
/// The response always carries `server_no_context_takeover` and
/// `client_no_context_takeover`, which RFC 7692 §7.1.1.2 lets a server add
/// to any offer and which every client must obey: no connection holds
/// inflate state. A client's window (`client_max_window_bits`) is therefore
/// checked but needs no answer: the shared inflater's 15-bit window decodes
/// any smaller one.
pub fn negotiate(header: &str) -> Option<(Negotiated, String)> {
    parse_extensions(header.as_bytes())?
        .into_iter()
        .filter(|ext| ext.name.eq_ignore_ascii_case("permessage-deflate"))
        .find_map(|ext| accept(&ext.params))
}

/// The parameters of one offer, as RFC 7692 §7.1 defines them.
#[derive(Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// Offered, with or without a value (checked, then unused: see
    /// [`negotiate`]).
    client_max_window_bits: bool,
}

/// Accepts one permessage-deflate offer, or declines it (`None`).
fn accept(params: &[Param]) -> Option<(Negotiated, String)> {
    let mut offer = Offer::default();
    for param in params {
        let name = param.name.to_ascii_lowercase();
        let value = param.value.as_deref();
        match name.as_str() {
            "server_no_context_takeover" => {
                set_flag(&mut offer.server_no_context_takeover, value)?;
            }
            "client_no_context_takeover" => {
                set_flag(&mut offer.client_no_context_takeover, value)?;
            }
            "server_max_window_bits" => {
                if offer.server_max_window_bits.is_some() {
                    return None;
                }
                offer.server_max_window_bits = Some(window_bits(value?)?);
            }
            "client_max_window_bits" => {
                if offer.client_max_window_bits {
                    return None;
                }
                if let Some(v) = value {
                    window_bits(v)?;
                }
                offer.client_max_window_bits = true;
            }
            _ => return None,
        }
    }
    let mut response =
        String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    let server_window_bits = match offer.server_max_window_bits {
        // Accepting the parameter means echoing it (RFC 7692 §7.1.2.1).
        Some(bits) => {
            response.push_str(&format!("; server_max_window_bits={bits}"));
            bits
        }
        None => MAX_WINDOW_BITS,
    };
    Some((Negotiated { server_window_bits }, response))
}

/// A parameter without a value, given at most once.
fn set_flag(flag: &mut bool, value: Option<&str>) -> Option<()> {
    if *flag || value.is_some() {
        return None;
    }
    *flag = true;
    Some(())
}

/// A window size: "8" to "15", no sign, no leading zero (RFC 7692 §7.1.2.1).
fn window_bits(value: &str) -> Option<u8> {
    match value {
        "8" | "9" | "10" | "11" | "12" | "13" | "14" | "15" => value.parse().ok(),
        _ => None,
    }
}

/// One element of an extension list.
struct Extension {
    name: String,
    params: Vec<Param>,
}

struct Param {
    name: String,
    /// Unquoted.
    value: Option<String>,
}

/// Parses `1#extension` (RFC 6455 §9.1, empty list elements allowed as in
/// RFC 9110 §5.6.1). `None` if the header does not follow the grammar: where a
/// quote or separator is out of place, the offers cannot be told apart.
fn parse_extensions(header: &[u8]) -> Option<Vec<Extension>> {
    let mut p = Parser { s: header, i: 0 };
    let mut list = Vec::new();
    loop {
        p.skip_ws();
        match p.peek() {
            None => return Some(list),
            Some(b',') => {
                p.i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = p.token()?;
        let mut params = Vec::new();
        loop {
            p.skip_ws();
            match p.peek() {
                None | Some(b',') => break,
                Some(b';') => p.i += 1,
                Some(_) => return None,
            }
            p.skip_ws();
            let name = p.token()?;
            p.skip_ws();
            let value = if p.peek() == Some(b'=') {
                p.i += 1;
                p.skip_ws();
                Some(if p.peek() == Some(b'"') {
                    p.quoted()?
                } else {
                    p.token()?
                })
            } else {
                None
            };
            params.push(Param { name, value });
        }
        list.push(Extension { name, params });
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// `1*tchar` (RFC 9110 §5.6.2).
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        // tchars are ASCII.
        Some(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// A quoted-string whose content, unescaped, must be a token (RFC 6455 §9.1).
    fn quoted(&mut self) -> Option<String> {
        self.i += 1;
        let mut value = String::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let escaped = self.peek()?;
                    self.i += 1;
                    value.push(char::from(escaped));
                }
                _ => value.push(char::from(c)),
            }
        }
        if value.is_empty() || !value.bytes().all(is_tchar) {
            return None;
        }
        Some(value)
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// The thread's compressor, reset per message, and the buffer it writes
/// into. It costs about 380 KiB (window, hash chains, pending buffer): per
/// thread, not per connection.
struct Deflater {
    stream: Option<Compress>,
    out: Vec<u8>,
}

thread_local! {
    static DEFLATER: RefCell<Deflater> = const {
        RefCell::new(Deflater {
            stream: None,
            out: Vec::new(),
        })
    };
}

/// The thread's output buffer gives back memory beyond this after a large
/// message, so one big broadcast does not pin its size on every thread.
const KEEP_OUT_CAPACITY: usize = 64 * 1024;

/// Compresses `prefix` followed by `payload` as one message without context
/// takeover and hands the compressed payload (trailing `00 00 ff ff` removed)
/// to `build`, which frames it with RSV1 set. The result depends on nothing
/// but the message, so one frame serves every recipient for which
/// [`Negotiated::fits_window`] holds.
///
/// Returns `None` when the message should go out uncompressed: it is shorter
/// than [`MIN_COMPRESS_SIZE`] or did not get smaller. `build` must not call
/// `compress` itself.
pub fn compress<R>(prefix: &[u8], payload: &[u8], build: impl FnOnce(&[u8]) -> R) -> Option<R> {
    let len = prefix.len() + payload.len();
    if len < MIN_COMPRESS_SIZE {
        return None;
    }
    DEFLATER.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Deflater { stream, out } = &mut *guard;
        let stream = stream.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(LEVEL), false, MAX_WINDOW_BITS)
        });
        let done = deflate(stream, prefix, payload, out);
        // A compressor left mid-stream by an error must not leak into the next message.
        stream.reset();
        let result = match done {
            Some(()) if out.len() < len => Some(build(out)),
            _ => None,
        };
        out.clear();
        if out.capacity() > KEEP_OUT_CAPACITY {
            out.shrink_to(KEEP_OUT_CAPACITY);
        }
        result
    })
}

/// Deflates the two parts into `out` (cleared) and removes the sync flush's
/// tail. `None` only if the deflater fails, which a reset one does not do.
fn deflate(
    deflater: &mut Compress,
    prefix: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    out.clear();
    let len = prefix.len() + payload.len();
    // zlib's deflateBound for raw deflate plus the flush's empty block: one pass.
    out.reserve(len + (len >> 12) + (len >> 14) + (len >> 25) + 13 + 5);
    for (mut input, flush) in [
        (prefix, FlushCompress::None),
        (payload, FlushCompress::Sync),
    ] {
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = deflater.total_in();
            deflater.compress_vec(input, out, flush).ok()?;
            // Bounded by input.len(): total_in only counts what this call consumed.
            input = &input[(deflater.total_in() - before) as usize..];
            // zlib: the flush is complete once a call leaves output space unused.
            if input.is_empty() && (flush == FlushCompress::None || out.len() < out.capacity()) {
                break;
            }
        }
    }
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    Some(())
}

/// Why a compressed message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (close with 1009).
    TooBig,
    /// It is not valid deflate data (close with 1007).
    Invalid,
}

/// Inflates a client's messages. Fed fragment by fragment; the output
/// never grows past `limit + 1` bytes, so a deflate bomb costs at most the
/// limit in memory, however far it would expand.
struct Inflater {
    stream: Decompress,
    /// The client ended its deflate stream (a block with BFINAL set) inside
    /// the current message: the rest of the message is padding, and the next
    /// message starts a new stream.
    ended: bool,
}

impl Inflater {
    /// With the largest window, which decodes what any smaller one produced
    /// (RFC 7692's window of 8 included, which zlib cannot take itself for
    /// raw deflate: madler/zlib#171).
    fn new() -> Self {
        Inflater {
            stream: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
            ended: false,
        }
    }

    /// Forgets the window: the next message starts a new stream.
    fn reset(&mut self) {
        self.stream.reset(false);
        self.ended = false;
    }

    /// Inflates one fragment of the current message, appending to `out`,
    /// which holds the message so far. `TooBig` as soon as the message would
    /// pass `limit` bytes.
    fn feed(
        &mut self,
        fragment: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        self.inflate(fragment, FlushDecompress::None, out, limit)
    }

    /// Ends the current message after its last fragment was fed.
    fn finish(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), InflateError> {
        let result = self.inflate(&TAIL, FlushDecompress::Sync, out, limit);
        if self.ended {
            self.reset();
        }
        result
    }

    fn inflate(
        &mut self,
        mut input: &[u8],
        flush: FlushDecompress,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        while !self.ended {
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            if out.len() == out.capacity() {
                // Geometric growth, but never past the first byte over the limit.
                let want = out.len().max(input.len() * 2).max(256);
                out.reserve_exact(want.min(limit + 1 - out.len()));
            }
            let before = self.stream.total_in();
            let status = self
                .stream
                .decompress_vec(input, out, flush)
                .map_err(|_| InflateError::Invalid)?;
            // Bounded by input.len(): total_in only counts what this call consumed.
            input = &input[(self.stream.total_in() - before) as usize..];
            if status == Status::StreamEnd {
                self.ended = true;
            }
            // zlib: output may be pending while a call fills all the space.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        if out.len() > limit {
            return Err(InflateError::TooBig);
        }
        Ok(())
    }
}

thread_local! {
    /// The thread's inflater. One per thread, not per connection: about
    /// 48 KiB (state and window).
    static SHARED_INFLATER: RefCell<Inflater> = RefCell::new(Inflater::new());
}

/// Inflates one whole client message (without context takeover, as
/// [`negotiate`] makes every client agree) with the thread's shared
/// inflater, appending to `out`. The message must be inflated in one
/// call: fragments that arrived separately are joined first, since another
/// connection may use the inflater in between.
pub fn inflate_message(
    compressed: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), InflateError> {
    SHARED_INFLATER.with(|cell| {
        let mut inflater = cell.borrow_mut();
        inflater.reset();
        inflater.feed(compressed, out, limit)?;
        inflater.finish(out, limit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(header: &str) -> Option<(Negotiated, String)> {
        negotiate(header)
    }

    fn agreed(server_window_bits: u8) -> Negotiated {
        Negotiated { server_window_bits }
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn chromium_offer() {
        let got = offer("permessage-deflate; client_max_window_bits");
        assert_eq!(got, Some((agreed(15), BOTH.into())));
    }

    #[test]
    fn firefox_offer() {
        assert_eq!(offer("permessage-deflate"), Some((agreed(15), BOTH.into())));
    }

    #[test]
    fn python_websockets_offer() {
        // websockets' enable_client_permessage_deflate: ClientPerMessageDeflateFactory
        // with client_max_window_bits=True and no server_max_window_bits.
        let got = offer("permessage-deflate; client_max_window_bits");
        assert_eq!(got, Some((agreed(15), BOTH.into())));
        // Its documented tuning example.
        let got = offer("permessage-deflate; server_max_window_bits=11; client_max_window_bits=11");
        assert_eq!(
            got,
            Some((
                Negotiated {
                    server_window_bits: 11,
                },
                format!("{BOTH}; server_max_window_bits=11")
            ))
        );
    }

    #[test]
    fn aiohttp_offer() {
        // aiohttp's ws_ext_gen for a client: compress=15 by default, or a smaller window.
        let got = offer("permessage-deflate; client_max_window_bits");
        assert_eq!(got, Some((agreed(15), BOTH.into())));
        let got =
            negotiate("permessage-deflate; client_max_window_bits; server_max_window_bits=10");
        assert_eq!(
            got,
            Some((agreed(10), format!("{BOTH}; server_max_window_bits=10")))
        );
        let got = offer(
            "permessage-deflate; client_max_window_bits; server_max_window_bits=12; server_no_context_takeover",
        );
        assert_eq!(
            got.map(|(n, _)| n),
            Some(Negotiated {
                server_window_bits: 12,
            })
        );
    }

    #[test]
    fn client_no_context_takeover_is_accepted() {
        let got = offer("permessage-deflate; client_no_context_takeover");
        assert_eq!(got, Some((agreed(15), BOTH.into())));
        let got =
            offer("permessage-deflate; client_no_context_takeover; client_max_window_bits=10");
        assert_eq!(got, Some((agreed(15), BOTH.into())));
    }

    #[test]
    fn a_client_window_is_accepted_and_needs_no_answer() {
        for bits in 8..=15u8 {
            let got = offer(&format!(
                "permessage-deflate; client_max_window_bits={bits}"
            ));
            assert_eq!(got, Some((agreed(15), BOTH.into())));
        }
    }

    #[test]
    fn server_window_is_echoed() {
        for bits in 8..=15u8 {
            let got = offer(&format!(
                "permessage-deflate; server_max_window_bits={bits}"
            ));
            let (n, response) = got.expect("accepted");
            assert_eq!(n.server_window_bits, bits);
            assert_eq!(response, format!("{BOTH}; server_max_window_bits={bits}"));
            assert!(n.fits_window(1 << bits));
            assert_eq!(n.fits_window((1 << bits) + 1), bits == 15);
        }
    }

    #[test]
    fn small_windows_take_messages_that_fit() {
        // Compressed with 15 bits, inflated with the client's smaller window.
        for bits in 9..=14u8 {
            let message = chat_json(1 << bits, usize::from(bits));
            let data = compressed(b"", &message).unwrap();
            assert_eq!(client_inflate(&data, bits), message, "window {bits}");
        }
    }

    #[test]
    fn server_no_context_takeover_offered_or_not() {
        let got = offer("permessage-deflate; server_no_context_takeover");
        assert_eq!(got, Some((agreed(15), BOTH.into())));
    }

    #[test]
    fn quoted_values_case_and_whitespace() {
        let got = offer(
            "Permessage-Deflate ;\tServer_Max_Window_Bits = \"10\" ; CLIENT_MAX_WINDOW_BITS=\"9\"",
        );
        assert_eq!(
            got,
            Some((
                Negotiated {
                    server_window_bits: 10,
                },
                format!("{BOTH}; server_max_window_bits=10")
            ))
        );
        // An escaped digit is still the digit.
        let got = offer("permessage-deflate; server_max_window_bits=\"1\\2\"");
        assert_eq!(got.map(|(n, _)| n.server_window_bits), Some(12));
    }

    #[test]
    fn first_acceptable_offer_wins() {
        // Several headers arrive joined with ", " (handshake::Upgrade::headers).
        let header = "x-webkit-deflate-frame, permessage-deflate; foo=1, \
                      permessage-deflate; client_no_context_takeover, permessage-deflate";
        assert_eq!(offer(header), Some((agreed(15), BOTH.into())));
        let header = ", ,permessage-deflate; client_max_window_bits=16,permessage-deflate;server_max_window_bits=9,";
        assert_eq!(
            offer(header).map(|(n, _)| n),
            Some(Negotiated {
                server_window_bits: 9,
            })
        );
    }

    #[test]
    fn declined_offers() {
        for header in [
            "",
            "   ",
            "x-webkit-deflate-frame",
            "deflate-stream",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=\"x\"",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; server_max_window_bits=9; server_max_window_bits=9",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; client_max_window_bits=\"\"",
            "permessage-deflate; client_max_window_bits=\"1 0\"",
        ] {
            assert_eq!(offer(header), None, "{header:?}");
        }
    }

    #[test]
    fn malformed_header_is_declined() {
        for header in [
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate;",
            "permessage-deflate; =10",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate client_max_window_bits",
            "permessage-deflate; server_max_window_bits=9 10",
            "\"permessage-deflate\"",
            "permessage-deflate; client_max_window_bits=\u{fffd}",
            "x; a=\"unterminated, permessage-deflate",
        ] {
            assert_eq!(offer(header), None, "{header:?}");
        }
    }

    /// Chat-like JSON, `len` bytes long, different for each `seed`.
    fn chat_json(len: usize, seed: usize) -> Vec<u8> {
        let words = [
            "hello", "world", "the", "meeting", "is", "at", "noon", "see", "you", "there",
        ];
        let mut text = format!(
            "{{\"type\":\"message\",\"room\":\"general\",\"user\":\"user{}\",\"id\":{},\"text\":\"",
            seed % 97,
            seed * 7919
        );
        let mut i = seed;
        while text.len() + 2 < len {
            text.push_str(words[i % words.len()]);
            text.push(' ');
            i = i.wrapping_mul(31).wrapping_add(7);
        }
        text.truncate(len.saturating_sub(2));
        text.push_str("\"}");
        text.into_bytes()
    }

    fn compressed(prefix: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
        compress(prefix, payload, <[u8]>::to_vec)
    }

    /// Inflates with flate2's own decoder, the way a client would (RFC 7692 §7.2.2).
    fn client_inflate(data: &[u8], bits: u8) -> Vec<u8> {
        let mut input = data.to_vec();
        input.extend_from_slice(&TAIL);
        let mut d = Decompress::new_with_window_bits(false, bits);
        let mut out = Vec::with_capacity(1 << 20);
        let status = d
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(status, Status::Ok);
        assert_eq!(d.total_in(), input.len() as u64);
        out
    }

    #[test]
    fn compress_round_trips_through_a_client_decoder() {
        for len in [MIN_COMPRESS_SIZE, 200, 1000, 5000, 70_000, 300_000] {
            let message = chat_json(len, len);
            let data = compressed(b"", &message).expect("compressible");
            assert!(data.len() < message.len());
            assert_eq!(client_inflate(&data, 15), message);
        }
    }

    #[test]
    fn compress_includes_the_prefix() {
        let message = chat_json(500, 1);
        let data = compressed(b"room-7:", &message).unwrap();
        let mut expected = b"room-7:".to_vec();
        expected.extend_from_slice(&message);
        assert_eq!(client_inflate(&data, 15), expected);
        // The prefix counts toward the threshold.
        let short = chat_json(MIN_COMPRESS_SIZE - 10, 2);
        assert!(compressed(b"", &short).is_none());
        assert!(compressed(b"0123456789", &short).is_some());
    }

    #[test]
    fn compression_is_independent_per_message() {
        // Same input, same output: nothing of the previous message is referenced,
        // so one compressed frame can be shared by every recipient.
        let message = chat_json(1000, 3);
        let first = compressed(b"", &message).unwrap();
        let _ = compressed(b"", &chat_json(1000, 4)).unwrap();
        assert_eq!(compressed(b"", &message).unwrap(), first);
        assert_eq!(client_inflate(&first, 15), message);
    }

    #[test]
    fn short_or_incompressible_messages_stay_uncompressed() {
        assert!(compressed(b"", &chat_json(MIN_COMPRESS_SIZE - 1, 0)).is_none());
        assert!(compressed(b"", b"").is_none());
        // xorshift noise does not deflate.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compressed(b"", &noise).is_none());
    }

    #[test]
    fn compressed_sizes_of_json() {
        // Guards the ratios the threshold's comment relies on.
        for (len, at_most) in [(160, 140), (256, 175), (1024, 420), (16384, 5200)] {
            let size = compressed(b"", &chat_json(len, 11)).unwrap().len();
            assert!(size <= at_most, "{len} bytes compressed to {size}");
        }
    }

    #[test]
    fn large_output_buffer_is_released() {
        let big = chat_json(1 << 20, 5);
        assert!(compressed(b"", &big).is_some());
        let capacity = DEFLATER.with(|cell| cell.borrow().out.capacity());
        assert!(capacity <= KEEP_OUT_CAPACITY);
    }

    /// Compressed the way a client does: raw deflate, sync flush, tail removed.
    fn client_deflate(message: &[u8], bits: u8, stream: Option<&mut Compress>) -> Vec<u8> {
        let mut fresh = Compress::new_with_window_bits(Compression::new(6), false, bits);
        let c = stream.unwrap_or(&mut fresh);
        let mut out = Vec::with_capacity(message.len() + 64);
        let before = c.total_in();
        c.compress_vec(message, &mut out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(c.total_in() - before, message.len() as u64);
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn inflates_a_whole_message() {
        let message = chat_json(10_000, 9);
        let mut out = Vec::new();
        inflate_message(&client_deflate(&message, 15, None), &mut out, MIB).unwrap();
        assert_eq!(out, message);
        // The shared inflater starts afresh for the next message.
        let other = chat_json(3000, 10);
        let mut out = Vec::new();
        inflate_message(&client_deflate(&other, 12, None), &mut out, MIB).unwrap();
        assert_eq!(out, other);
    }

    #[test]
    fn empty_message() {
        // An empty message may be sent as a single 0x00 (RFC 7692 §7.2.3).
        let mut out = Vec::new();
        inflate_message(&[0x00], &mut out, MIB).unwrap();
        assert!(out.is_empty());
        inflate_message(&client_deflate(b"", 15, None), &mut out, MIB).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn fragments_fed_one_by_one() {
        let message = chat_json(50_000, 12);
        let data = client_deflate(&message, 15, None);
        for size in [1, 7, 1000] {
            let mut inflater = Inflater::new();
            let mut out = Vec::new();
            for fragment in data.chunks(size) {
                inflater.feed(fragment, &mut out, MIB).unwrap();
            }
            inflater.finish(&mut out, MIB).unwrap();
            assert_eq!(out, message);
        }
    }

    #[test]
    fn small_window_clients_are_inflated_by_the_shared_inflater() {
        // zlib cannot deflate with 8 either: 9 stands in for the smallest.
        for bits in [9, 12] {
            let message = chat_json(5000, 13);
            let mut out = Vec::new();
            inflate_message(&client_deflate(&message, bits, None), &mut out, MIB).unwrap();
            assert_eq!(out, message, "window {bits}");
        }
    }

    #[test]
    fn final_block_ends_the_stream_cleanly() {
        // A client may end a message with BFINAL set (RFC 7692 §7.2.3): the
        // appended tail is then surplus, and the next message is a new stream.
        let message = chat_json(2000, 14);
        let mut c = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut data = Vec::with_capacity(4096);
        c.compress_vec(&message, &mut data, FlushCompress::Finish)
            .unwrap();
        let mut inflater = Inflater::new();
        for _ in 0..2 {
            let mut out = Vec::new();
            inflater.feed(&data, &mut out, MIB).unwrap();
            inflater.finish(&mut out, MIB).unwrap();
            assert_eq!(out, message);
        }
    }

    #[test]
    fn invalid_data() {
        let mut out = Vec::new();
        // BTYPE 11 is reserved.
        assert_eq!(
            inflate_message(&[0xff, 0xff, 0xff], &mut out, MIB),
            Err(InflateError::Invalid)
        );
        // A stored block whose NLEN does not match LEN.
        assert_eq!(
            inflate_message(&[0x00, 0x05, 0x00, 0x00, 0x00], &mut out, MIB),
            Err(InflateError::Invalid)
        );
    }

    #[test]
    fn exactly_the_limit_passes_and_one_more_byte_does_not() {
        let limit = 100_000;
        for (len, expected) in [(limit, Ok(())), (limit + 1, Err(InflateError::TooBig))] {
            let message = chat_json(len, 15);
            let data = client_deflate(&message, 15, None);
            let mut out = Vec::new();
            assert_eq!(inflate_message(&data, &mut out, limit), expected, "{len}");
            assert!(out.capacity() <= limit + 1);
            if expected.is_ok() {
                assert_eq!(out, message);
            }
            // Fed in fragments too.
            let mut inflater = Inflater::new();
            let mut out = Vec::new();
            let mut result = Ok(());
            for fragment in data.chunks(333) {
                result = result.and_then(|()| inflater.feed(fragment, &mut out, limit));
            }
            result = result.and_then(|()| inflater.finish(&mut out, limit));
            assert_eq!(result, expected, "{len} in fragments");
        }
    }

    #[test]
    fn limit_counts_the_whole_message_across_fragments() {
        let message = chat_json(3000, 16);
        let data = client_deflate(&message, 15, None);
        let (first, rest) = data.split_at(data.len() / 2);
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        let result = inflater
            .feed(first, &mut out, 2999)
            .and_then(|()| inflater.feed(rest, &mut out, 2999))
            .and_then(|()| inflater.finish(&mut out, 2999));
        assert_eq!(result, Err(InflateError::TooBig));
    }

    #[test]
    fn deflate_bomb_is_refused_within_the_limit() {
        let zeros = vec![0u8; 10 * MIB];
        let bomb = client_deflate(&zeros, 15, None);
        assert!(bomb.len() < 11 * 1024, "bomb is {} bytes", bomb.len());
        drop(zeros);
        let peak_before = alloc_count::reset_peak();
        let mut out = Vec::new();
        assert_eq!(
            inflate_message(&bomb, &mut out, MIB),
            Err(InflateError::TooBig)
        );
        assert!(out.capacity() <= MIB + 1);
        assert!(out.len() <= MIB + 1);
        drop(out);
        let peak = alloc_count::peak() - peak_before;
        // The output, at most limit + 1 bytes, plus while the last growth
        // copies it the previous, smaller buffer, plus the thread's inflater.
        assert!(peak <= 2 * MIB + 64 * 1024, "peak {peak}");
        // Fed in fragments to a connection's own inflater.
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        let mut result = Ok(());
        for fragment in bomb.chunks(100) {
            result = result.and_then(|()| inflater.feed(fragment, &mut out, MIB));
        }
        assert_eq!(result, Err(InflateError::TooBig));
        assert!(out.capacity() <= MIB + 1);
    }

    /// The numbers behind MIN_COMPRESS_SIZE and LEVEL:
    /// `cargo test -p warpsocket-core --release --lib -- --ignored measure_threshold --nocapture`
    #[test]
    #[ignore]
    fn measure_threshold() {
        use std::time::Instant;
        const ROUNDS: usize = 20_000;
        for level in [1, 2, 6] {
            let mut c = Compress::new_with_window_bits(Compression::new(level), false, 15);
            let mut out = Vec::new();
            for len in [96, 128, 144, 160, 176, 192, 256, 1024, 4096] {
                let messages: Vec<Vec<u8>> = (0..64).map(|seed| chat_json(len, seed)).collect();
                let mut total = 0;
                let start = Instant::now();
                for i in 0..ROUNDS {
                    deflate(&mut c, b"", &messages[i % 64], &mut out).unwrap();
                    c.reset();
                    total += out.len();
                }
                let per_call = start.elapsed() / ROUNDS as u32;
                println!(
                    "level {level} len {len:>5}: compressed {:>7.1} bytes ({:>3.0}%), {per_call:?} per message",
                    total as f64 / ROUNDS as f64,
                    100.0 * total as f64 / (ROUNDS * len) as f64
                );
            }
        }
        let mut c = Compress::new_with_window_bits(Compression::new(LEVEL), false, 15);
        let start = Instant::now();
        for _ in 0..ROUNDS {
            c.reset();
        }
        println!("reset alone: {:?}", start.elapsed() / ROUNDS as u32);
        // Fresh compressor per message instead of a reset one.
        let message = chat_json(256, 1);
        let mut out = Vec::new();
        let start = Instant::now();
        for _ in 0..ROUNDS {
            let mut c = Compress::new_with_window_bits(Compression::new(1), false, 15);
            deflate(&mut c, b"", &message, &mut out).unwrap();
        }
        println!(
            "new compressor per 256-byte message: {:?}",
            start.elapsed() / ROUNDS as u32
        );
        let start = Instant::now();
        for _ in 0..ROUNDS {
            compress(b"", &message, |c| c.len()).unwrap();
        }
        println!(
            "compress() per 256-byte message: {:?}",
            start.elapsed() / ROUNDS as u32
        );
        // What inflaters and deflaters allocate.
        let data = client_deflate(&chat_json(1000, 1), 15, None);
        let before = alloc_count::reset_peak();
        let inflater = Inflater::new();
        println!("Inflater::new(): {} bytes", alloc_count::peak() - before);
        drop(inflater);
        let before = alloc_count::reset_peak();
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        inflater.feed(&data, &mut out, MIB).unwrap();
        inflater.finish(&mut out, MIB).unwrap();
        println!(
            "Inflater after a message: {} bytes",
            alloc_count::peak() - before - out.capacity()
        );
        let before = alloc_count::reset_peak();
        let c = Compress::new_with_window_bits(Compression::new(1), false, 15);
        println!("Compress(15): {} bytes", alloc_count::peak() - before);
        drop(c);
    }

    /// Counts the calling thread's allocations so a test can bound what one
    /// call allocated, whatever other tests do on their threads.
    mod alloc_count {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        struct Counting;

        thread_local! {
            static CURRENT: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        fn add(delta: isize) {
            // try_with: the thread may be shutting down.
            let _ = CURRENT.try_with(|c| {
                let now = c.get() + delta;
                c.set(now);
                let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
            });
        }

        // SAFETY: forwards every call to the system allocator unchanged.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                add(layout.size() as isize);
                System.alloc(layout)
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                add(-(layout.size() as isize));
                System.dealloc(ptr, layout)
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                // A realloc may copy: count the new block before freeing the old.
                add(new_size as isize);
                add(-(layout.size() as isize));
                System.realloc(ptr, layout, new_size)
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// Starts a new peak from the current level; returns that level.
        pub fn reset_peak() -> usize {
            let now = CURRENT.with(Cell::get);
            PEAK.with(|p| p.set(now));
            now.max(0) as usize
        }

        pub fn peak() -> usize {
            PEAK.with(Cell::get).max(0) as usize
        }
    }
}
