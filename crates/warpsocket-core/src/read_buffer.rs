//! One read buffer per I/O thread, zeroed once and reused: connections keep
//! only the unparsed tail of a frame, and a handshake in progress keeps only
//! a request that did not arrive in one read.

use std::cell::RefCell;

/// The buffer's size: the most bytes one read takes.
pub(crate) const SIZE: usize = 16 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer, `SIZE` bytes long. The buffer is
/// taken out while `f` runs, so nothing `f` calls can find it borrowed.
pub(crate) fn with<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buffer = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    if buffer.len() < SIZE {
        buffer = vec![0; SIZE];
    }
    let result = f(&mut buffer);
    BUFFER.with(|b| *b.borrow_mut() = buffer);
    result
}
