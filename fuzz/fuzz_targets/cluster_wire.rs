//! Feeds arbitrary bytes into the cluster wire decoder (`cluster/wire.rs`):
//! what one node reads from Redis pub/sub, published by another node (or by
//! anything else that can publish on the Redis server).
//!
//! Each input is decoded as a channel broadcast, as a request to a node and
//! as a history channel's message (sequenced by Redis: epoch, offset, body).
//! Besides not panicking (or allocating from an announced count: the ids of a
//! subscribe request are bounded by the bytes present), whatever decodes must
//! encode back to a prefix of the input (requests of a fixed size, `D` and
//! `R`, ignore bytes after their end; every other message is the whole input),
//! and that encoding must decode and encode to itself again. So a message is
//! never read as a different one: no payload cut short, no length taken from
//! the wrong field, no id read from a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warpsocket_core::cluster::reencode_message;

fuzz_target!(|data: &[u8]| {
    let decoded = reencode_message(data);
    for (slot, encoded) in decoded.into_iter().enumerate() {
        let what = ["broadcast", "request", "history message"][slot];
        let Some(encoded) = encoded else { continue };
        assert!(
            data.starts_with(&encoded),
            "{what} encoded as {encoded:?}, not a prefix of its input"
        );
        assert!(
            encoded.len() == data.len() || (slot == 1 && matches!(data[0], b'D' | b'R')),
            "{what} of {} bytes decoded from {} (bytes ignored)",
            encoded.len(),
            data.len()
        );
        let again = reencode_message(&encoded)[slot].clone();
        assert_eq!(
            again.as_deref(),
            Some(&encoded[..]),
            "{what} did not survive a second round trip"
        );
    }
});
