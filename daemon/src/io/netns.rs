//! Network namespaces: run a closure with a thread's network namespace switched to a pod's.
//! The switch happens on a short-lived dedicated thread, so no tokio worker and no other
//! thread of the daemon ever leaves the host namespace. No `unsafe` here: nix wraps setns.

use nix::sched::{setns, CloneFlags};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

/// Runs `f` on a fresh thread whose network namespace is `netns` (an fd of a netns, such as
/// an open `/var/run/netns/NAME` or the fd a CNI plugin sent). Children that `f` spawns
/// (`ip ...`) inherit that namespace. The thread ends when `f` returns.
pub fn run_in<F, R>(netns: BorrowedFd<'_>, f: F) -> io::Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("kwire-netns".into())
            .spawn_scoped(s, move || {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("setns(CLONE_NEWNET): {e}"),
                    )
                })?;
                Ok(f())
            })?;
        h.join()
            .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}
