//! Kernel I/O: tun queues and UDP sockets. The only module in the daemon with `unsafe` (the
//! crate denies it everywhere else); each block carries a `// SAFETY:` comment that says why it
//! is sound (clippy's `undocumented_unsafe_blocks` checks). Everything above talks to these
//! through safe, small types.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod epoll;
pub mod malloc;
pub mod netlink;
pub mod netns;
pub mod scm;
pub mod tun;
pub mod udp;
pub mod uring;

use std::io;

/// Converts a libc return value into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same as [`cvt`] for `ssize_t` returns.
pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}
