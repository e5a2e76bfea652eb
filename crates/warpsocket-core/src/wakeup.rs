//! A file descriptor that becomes readable when a worker has events waiting,
//! so the worker's own event loop (asyncio's `add_reader`) can wait on it
//! together with everything else it waits for.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An eventfd on Linux, a non-blocking pipe elsewhere.
pub struct Wakeup {
    read: OwnedFd,
    #[cfg(not(target_os = "linux"))]
    write: OwnedFd,
}

impl Wakeup {
    #[cfg(target_os = "linux")]
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no pointer arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Wakeup {
            read: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    #[cfg(not(target_os = "linux"))]
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid two-element array; the result is checked.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        for fd in fds {
            // SAFETY: fd was just returned by pipe().
            unsafe {
                libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        Ok(unsafe {
            Wakeup {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    /// The descriptor to wait on for readability.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Makes the descriptor readable. A full counter or pipe already means
    /// "readable", so that error is ignored.
    pub fn signal(&self) {
        let one: u64 = 1;
        #[cfg(target_os = "linux")]
        let fd = self.read.as_raw_fd();
        #[cfg(not(target_os = "linux"))]
        let fd = self.write.as_raw_fd();
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }

    /// Consumes pending signals so the descriptor stops being readable.
    pub fn clear(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live local buffer from a non-blocking descriptor
        // we own. One read resets an eventfd; a pipe is read until empty.
        let mut read =
            || unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        #[cfg(target_os = "linux")]
        read();
        #[cfg(not(target_os = "linux"))]
        while read() > 0 {}
    }
}
