//! Feeds arbitrary bytes into `frame::Decoder`, split at arbitrary points.
//!
//! Input layout: `[limit selector, split count n, n split sizes..., stream...]`;
//! bit 3 of the limit selector decodes with permessage-deflate negotiated.
//! The stream is decoded three ways: in one `feed`, in chunks whose sizes cycle
//! through the split sizes, and one byte at a time. All three must produce the
//! same messages and the same violation (a decoder must not depend on how TCP
//! segmented the bytes), and every message must respect the protocol rules the
//! decoder promises: text is UTF-8, data fits `max_message_size`, control
//! payloads fit 125 bytes, close codes are valid, nothing follows a close.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warpsocket_core::frame::{close_code, is_valid_close_code, Decoder, Incoming, Violation};

/// `max_message_size` values around the frame-length encodings' edges.
const LIMITS: [usize; 8] = [0, 1, 125, 126, 1024, 65_535, 65_536, 16 << 20];

struct Outcome {
    messages: Vec<Incoming>,
    violation: Option<Violation>,
}

fn decode<'a>(max: usize, inflate: bool, chunks: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut decoder = Decoder::new(max, inflate);
    let mut messages = Vec::new();
    let mut violation = None;
    for chunk in chunks {
        if let Err(v) = decoder.feed(chunk, &mut |m| messages.push(m)) {
            violation = Some(v);
            break;
        }
    }
    check(max, &messages, violation);
    Outcome {
        messages,
        violation,
    }
}

fn check(max: usize, messages: &[Incoming], violation: Option<Violation>) {
    for (i, message) in messages.iter().enumerate() {
        match message {
            Incoming::Text(data) => {
                assert!(data.len() <= max, "text of {} bytes over {max}", data.len());
                assert!(std::str::from_utf8(data).is_ok(), "text is not UTF-8");
            }
            Incoming::Binary(data) => {
                assert!(
                    data.len() <= max,
                    "binary of {} bytes over {max}",
                    data.len()
                );
            }
            Incoming::Ping(data) => assert!(data.len() <= 125, "ping of {} bytes", data.len()),
            Incoming::Pong => {}
            Incoming::Close(code) => {
                if let Some(code) = code {
                    assert!(is_valid_close_code(*code), "close code {code} let through");
                }
                assert_eq!(
                    i + 1,
                    messages.len(),
                    "messages decoded after a close frame"
                );
                assert!(
                    violation.is_none(),
                    "violation reported after a close frame"
                );
            }
        }
    }
    if let Some(v) = violation {
        assert!(
            matches!(
                v.code,
                close_code::PROTOCOL | close_code::INVALID_DATA | close_code::TOO_BIG
            ),
            "unexpected close code {v:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let max = LIMITS[usize::from(limit) % LIMITS.len()];
    let inflate = limit & 8 != 0;
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    // Split sizes 1..=256; none given: split in two halves.
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![stream.len().div_ceil(2).max(1)]
    } else {
        sizes.iter().map(|&s| usize::from(s) + 1).collect()
    };

    let whole = decode(max, inflate, std::iter::once(stream));

    let mut chunks = Vec::new();
    let mut pos = 0;
    for size in sizes.iter().cycle() {
        if pos >= stream.len() {
            break;
        }
        let end = (pos + size).min(stream.len());
        chunks.push(&stream[pos..end]);
        pos = end;
    }
    let split = decode(max, inflate, chunks.into_iter());
    assert_eq!(
        whole.messages, split.messages,
        "split feed decoded differently"
    );
    assert_eq!(
        whole.violation, split.violation,
        "split feed failed differently"
    );

    let bytewise = decode(max, inflate, stream.chunks(1));
    assert_eq!(
        whole.messages, bytewise.messages,
        "byte-wise feed decoded differently"
    );
    assert_eq!(
        whole.violation, bytewise.violation,
        "byte-wise feed failed differently"
    );
});
