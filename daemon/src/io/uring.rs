//! Batched tun reads through io_uring: one multishot read (Linux 6.7 and later) on a tun
//! queue fills buffers the kernel picks from a ring of provided buffers, so a burst of frames
//! costs one `io_uring_enter` instead of one `read()` each; the ring also watches a second
//! descriptor (the worker's epoll of pods' tuns) for readability. With
//! `IORING_SETUP_DEFER_TASKRUN` the kernel does the reads when the thread asks for completions,
//! in one batch, instead of interrupting it.
//!
//! [`TunRing::new`] fails on kernels without io_uring, multishot reads or provided-buffer
//! rings, and where a seccomp profile refuses `io_uring_setup` (containerd's and Docker's
//! RuntimeDefault profiles do since 2023): the caller then reads with `read(2)` as before.
//! Nothing here allocates after [`TunRing::new`].

use io_uring::{cqueue, opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

/// The provided-buffer group the tun's reads take buffers from.
const BUF_GROUP: u16 = 0;
/// `user_data` of the multishot read.
const READ_TOKEN: u64 = 1;
/// `user_data` of the one-shot poll on the second descriptor.
const POLL_TOKEN: u64 = 2;
/// Submission slots: at most the read and the poll are pending at once.
const SQ_ENTRIES: u32 = 8;

/// What one completion brought.
pub enum Reaped<'a> {
    /// A frame read from the tun, in a buffer that goes back to the kernel after the callback.
    Frame(&'a mut [u8]),
    /// The watched descriptor is readable (poll it without blocking; it is armed again on
    /// the next [`TunRing::wait`]).
    Ready,
    /// The read failed (not for lack of buffers: that is handled here).
    Error(io::Error),
}

/// A tun queue read through io_uring, and one more descriptor watched for readability.
pub struct TunRing {
    ring: IoUring,
    tun: RawFd,
    watch: Option<RawFd>,
    /// `count` buffers of `buf_len` bytes, one block.
    bufs: Box<[u8]>,
    buf_len: usize,
    /// The provided-buffer ring shared with the kernel (`count` entries, page aligned).
    br: *mut types::BufRingEntry,
    br_bytes: usize,
    count: u16,
    /// Our copy of the ring's tail (buffers handed to the kernel so far, mod 2^16).
    tail: u16,
    read_armed: bool,
    poll_armed: bool,
}

// SAFETY: `br` points to memory this struct owns (mapped in `new`, unmapped in `drop`); the
// kernel reads it only through the ring that moves with it. Moving the struct to another
// thread before its first use is sound (the ring is made with SINGLE_ISSUER only when used on
// the thread that created it, see `new`).
unsafe impl Send for TunRing {}

impl TunRing {
    /// Sets up a ring for tun descriptor `tun` (non-blocking or not) with `count` (a power of
    /// two ≤ 32768) buffers of `buf_len` bytes, watching `watch` for readability if given.
    /// Must be called on the thread that will use it (the ring is single-issuer).
    pub fn new(tun: RawFd, watch: Option<RawFd>, count: u16, buf_len: usize) -> io::Result<Self> {
        if !count.is_power_of_two() || buf_len == 0 || buf_len > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "io_uring buffers: a power-of-two count and a length that fits 32 bits",
            ));
        }
        let cq = (2 * count as u32 + 8).next_power_of_two();
        // Deferred task work (6.1) batches the reads into our own io_uring_enter; older
        // kernels take the ring without it.
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(SQ_ENTRIES)
            .or_else(|_| IoUring::builder().setup_cqsize(cq).build(SQ_ENTRIES))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [opcode::ReadMulti::CODE, opcode::PollAdd::CODE] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks opcode {code} (multishot read needs Linux 6.7)"),
                ));
            }
        }
        let br_bytes = count as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                br_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut me = TunRing {
            ring,
            tun,
            watch,
            bufs: vec![0u8; count as usize * buf_len].into_boxed_slice(),
            buf_len,
            br: mem.cast(),
            br_bytes,
            count,
            tail: 0,
            read_armed: false,
            poll_armed: false,
        };
        // SAFETY: `br` is page aligned (mmap), `br_bytes` long, and stays mapped until `drop`,
        // which unregisters the group (by dropping the ring) before unmapping it.
        unsafe {
            me.ring
                .submitter()
                .register_buf_ring_with_flags(me.br as u64, count, BUF_GROUP, 0)?;
        }
        for bid in 0..count {
            me.give_back(bid);
        }
        me.publish_tail();
        Ok(me)
    }

    /// Puts buffer `bid` into the ring at our tail (seen by the kernel once published).
    fn give_back(&mut self, bid: u16) {
        let slot = (self.tail & (self.count - 1)) as usize;
        // SAFETY: `slot` < `count`, so the entry lies inside the mapping; the kernel does not
        // read entries past the published tail, so writing this one races with nothing.
        let e = unsafe { &mut *self.br.add(slot) };
        e.set_addr(self.bufs[bid as usize * self.buf_len..].as_ptr() as u64);
        e.set_len(self.buf_len as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back so far visible to the kernel.
    fn publish_tail(&mut self) {
        // SAFETY: the tail field lies in the first entry of our mapping and is 2-byte aligned;
        // the kernel reads it with an acquire load, as the io_uring ABI specifies.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.br).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Arms the read and the poll if they are not, submits, and blocks until at least one
    /// completion is there.
    pub fn wait(&mut self) -> io::Result<()> {
        {
            let mut sq = self.ring.submission();
            if !self.read_armed {
                let e = opcode::ReadMulti::new(types::Fd(self.tun), 0, BUF_GROUP)
                    .build()
                    .user_data(READ_TOKEN);
                // SAFETY: the read fills only buffers of our group, which outlive the ring.
                if unsafe { sq.push(&e) }.is_ok() {
                    self.read_armed = true;
                }
            }
            if let (false, Some(fd)) = (self.poll_armed, self.watch) {
                let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                    .build()
                    .user_data(POLL_TOKEN);
                // SAFETY: a poll references no memory of ours.
                if unsafe { sq.push(&e) }.is_ok() {
                    self.poll_armed = true;
                }
            }
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands every completion that is there to `f`, frames in the order read; their buffers
    /// go back to the kernel after `f` returns.
    pub fn reap(&mut self, mut f: impl FnMut(Reaped<'_>)) {
        let mut returned = false;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            match cqe.user_data() {
                READ_TOKEN => {
                    if !cqueue::more(cqe.flags()) {
                        self.read_armed = false;
                    }
                    let res = cqe.result();
                    if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                        if res > 0 && bid < self.count {
                            let at = bid as usize * self.buf_len;
                            let len = (res as usize).min(self.buf_len);
                            f(Reaped::Frame(&mut self.bufs[at..at + len]));
                        }
                        if bid < self.count {
                            self.give_back(bid);
                            returned = true;
                        }
                    } else if res < 0 && -res != libc::ENOBUFS && -res != libc::EAGAIN {
                        f(Reaped::Error(io::Error::from_raw_os_error(-res)));
                    }
                }
                POLL_TOKEN => {
                    self.poll_armed = false;
                    if cqe.result() >= 0 {
                        f(Reaped::Ready);
                    } else {
                        f(Reaped::Error(io::Error::from_raw_os_error(-cqe.result())));
                    }
                }
                _ => {}
            }
        }
        if returned {
            self.publish_tail();
        }
    }

    /// Whether the multishot read is still armed (it ends on errors and when the kernel runs
    /// out of buffers; [`TunRing::wait`] arms it again).
    pub fn read_armed(&self) -> bool {
        self.read_armed
    }
}

impl Drop for TunRing {
    fn drop(&mut self) {
        // Unregister before unmapping: the kernel must not see the ring after it is gone.
        let _ = self.ring.submitter().unregister_buf_ring(BUF_GROUP);
        // SAFETY: `br` is the mapping made in `new`, of `br_bytes` bytes, no longer
        // registered with the kernel.
        unsafe {
            libc::munmap(self.br.cast(), self.br_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A connected pair of Unix datagram sockets: `read()` on one returns one datagram, as
    /// on a tun queue.
    fn dgram_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just made and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, data: &[u8]) {
        // SAFETY: `data` is valid for reads of its length.
        let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
        assert_eq!(n, data.len() as isize, "{}", io::Error::last_os_error());
    }

    /// A ring, or None where this kernel or sandbox refuses io_uring (the data path then
    /// reads with read(2), which other tests cover); strict runs demand it.
    fn ring(fd: &OwnedFd, watch: Option<&OwnedFd>, count: u16) -> Option<TunRing> {
        match TunRing::new(fd.as_raw_fd(), watch.map(|w| w.as_raw_fd()), count, 256) {
            Ok(r) => Some(r),
            Err(e) => {
                crate::testing::skip("io_uring ring", &format!("io_uring unavailable: {e}"));
                None
            }
        }
    }

    /// Waits and reaps until `want` frames came; returns them in order.
    fn collect(r: &mut TunRing, want: usize) -> (Vec<Vec<u8>>, usize) {
        let (mut got, mut ready, mut rounds) = (Vec::new(), 0, 0);
        while got.len() < want {
            rounds += 1;
            assert!(rounds < 1000, "only {} of {want} frames", got.len());
            r.wait().expect("wait");
            r.reap(|x| match x {
                Reaped::Frame(f) => got.push(f.to_vec()),
                Reaped::Ready => ready += 1,
                Reaped::Error(e) => panic!("read failed: {e}"),
            });
        }
        (got, ready)
    }

    #[test]
    fn frames_arrive_whole_and_in_order_while_buffers_are_reused() {
        let (a, b) = dgram_pair();
        let Some(mut r) = ring(&b, None, 4) else {
            return;
        };
        // More frames than buffers, several times over, in bursts the size of the ring's
        // buffers and larger (the read then ends for lack of buffers and is armed again).
        let mut seq = 0u32;
        for burst in [1usize, 4, 7, 3, 9] {
            let first = seq;
            for _ in 0..burst {
                let len = 1 + (seq as usize * 37) % 200;
                let mut d = vec![0u8; len.max(4)];
                d[..4].copy_from_slice(&seq.to_le_bytes());
                send(&a, &d);
                seq += 1;
            }
            let (got, _) = collect(&mut r, burst);
            for (k, f) in got.iter().enumerate() {
                let n = first + k as u32;
                assert_eq!(
                    f[..4],
                    n.to_le_bytes(),
                    "frame {k} of the burst out of order"
                );
                assert_eq!(f.len(), (1 + (n as usize * 37) % 200).max(4));
            }
        }
    }

    #[test]
    fn a_frame_longer_than_a_buffer_is_cut_to_the_buffer() {
        let (a, b) = dgram_pair();
        let Some(mut r) = ring(&b, None, 2) else {
            return;
        };
        send(&a, &[9u8; 300]);
        let (got, _) = collect(&mut r, 1);
        assert_eq!(got[0].len(), 256);
    }

    #[test]
    fn the_watched_descriptor_reports_ready_once_per_arming() {
        let (a, b) = dgram_pair();
        let (wa, wb) = dgram_pair();
        let Some(mut r) = ring(&b, Some(&wb), 2) else {
            return;
        };
        send(&wa, b"x");
        r.wait().expect("wait");
        let mut ready = 0;
        r.reap(|x| {
            if let Reaped::Ready = x {
                ready += 1
            }
        });
        assert_eq!(ready, 1);
        // Still readable (not drained): armed again, it reports again (level, not edge).
        send(&a, b"frame");
        let (got, ready) = collect(&mut r, 1);
        assert_eq!(got, vec![b"frame".to_vec()]);
        assert!(ready <= 1);
        let mut again = 0;
        while again == 0 {
            r.wait().expect("wait");
            r.reap(|x| {
                if let Reaped::Ready = x {
                    again += 1
                }
            });
        }
        assert_eq!(again, 1);
    }

    #[test]
    fn bad_buffer_counts_are_refused() {
        let (_a, b) = dgram_pair();
        assert!(TunRing::new(b.as_raw_fd(), None, 3, 256).is_err());
        assert!(TunRing::new(b.as_raw_fd(), None, 4, 0).is_err());
    }
}
