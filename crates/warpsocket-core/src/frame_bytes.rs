//! An encoded frame's bytes, shared by every outbox that holds it.
//!
//! Under load each connection holds the frames waiting for its writer, and a
//! broadcast puts one handle to the same frame in every recipient's outbox:
//! the handles, not the frames, are most of what a busy server holds per
//! connection. `bytes::Bytes` is 32 bytes (pointer, length, data, vtable) and
//! a frame made from a `Vec` allocates its shared count apart on the first
//! clone; [`FrameBytes`] is one 8-byte pointer to one allocation that holds
//! the count, the length and the bytes (`triomphe::ThinArc`, which keeps no
//! weak count either). Measured in docs/benchmarks.md ("Issue 29: memory
//! under load").

use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Deref;

use triomphe::{Arc, HeaderSlice, HeaderWithLength, ThinArc, UniqueArc};

/// Immutable, reference-counted bytes behind a thin pointer: cloning one
/// (once per recipient) is one atomic increment.
#[derive(Clone, PartialEq, Eq)]
pub struct FrameBytes(ThinArc<(), u8>);

impl FrameBytes {
    /// The concatenation of `parts`, in one allocation.
    pub fn from_parts(parts: &[&[u8]]) -> Self {
        let len = parts.iter().map(|part| part.len()).sum();
        let mut unique: UniqueArc<HeaderSlice<HeaderWithLength<()>, [MaybeUninit<u8>]>> =
            UniqueArc::from_header_and_uninit_slice(HeaderWithLength::new((), len), len);
        let mut rest = &mut unique.slice[..];
        for part in parts {
            let (head, tail) = rest.split_at_mut(part.len());
            for (slot, byte) in head.iter_mut().zip(part.iter()) {
                slot.write(*byte);
            }
            rest = tail;
        }
        // SAFETY: the parts' lengths add up to `len`, so the loop above wrote
        // every byte of the slice.
        let filled = unsafe { unique.assume_init_slice_with_header() };
        FrameBytes(Arc::into_thin(filled.shareable()))
    }

    /// A copy of `bytes`.
    pub fn copy_from_slice(bytes: &[u8]) -> Self {
        FrameBytes::from_parts(&[bytes])
    }
}

impl Deref for FrameBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0.slice
    }
}

impl fmt::Debug for FrameBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameBytes({:?})", &self[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_one_pointer_and_its_parts_are_joined_in_order() {
        assert_eq!(std::mem::size_of::<FrameBytes>(), 8);
        assert_eq!(std::mem::size_of::<Option<FrameBytes>>(), 8);
        let frame = FrameBytes::from_parts(&[b"\x81\x05", b"", b"he", b"llo"]);
        assert_eq!(&frame[..], b"\x81\x05hello");
        let copy = frame.clone();
        drop(frame);
        assert_eq!(&copy[..], b"\x81\x05hello");
        assert!(FrameBytes::from_parts(&[]).is_empty());
    }

    #[test]
    fn a_large_frame_keeps_every_byte() {
        let payload: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let frame = FrameBytes::from_parts(&[&[0x82, 127], &payload]);
        assert_eq!(frame.len(), payload.len() + 2);
        assert_eq!(&frame[2..], &payload[..]);
    }
}
