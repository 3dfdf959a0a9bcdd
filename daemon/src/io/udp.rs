//! The WireGuard UDP socket: dual-stack, SO_REUSEPORT so each worker has its own, large
//! buffers, recvmmsg with UDP GRO and sendmmsg with UDP GSO (quinn-udp and wireguard-go's
//! `conn/` do the same). Batches are built by the caller in [`TxBatch`]; this file turns them
//! into system calls.

use super::{cvt, cvt_size};
use crate::offload::gso::TxBatch;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Socket buffer size asked for (wireguard-go uses 7 MiB): room for a burst of 64 KB batches.
pub const SOCKET_BUFFER_BYTES: libc::c_int = 7 << 20;

/// Maximum segments in one UDP GSO send (UDP_MAX_SEGMENTS in the kernel).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Most messages one sendmmsg carries here.
pub const MAX_SEND_MSGS: usize = 128;

/// Room for one control message holding one int.
const CMSG_ROOM: usize = 32;

/// A bound UDP socket.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    v6: bool,
    gso: AtomicBool,
    port: u16,
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    })?;
    Ok(())
}

impl UdpSocket {
    /// Binds `port` (0: any) on all addresses: IPv6 dual-stack when the host has IPv6,
    /// else IPv4 only. With `reuseport`, several sockets can share the port.
    pub fn bind(port: u16, reuseport: bool, fwmark: u32) -> io::Result<UdpSocket> {
        match Self::bind_family(true, port, reuseport, fwmark) {
            Ok(s) => Ok(s),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                Self::bind_family(false, port, reuseport, fwmark)
            }
            Err(e) => Err(e),
        }
    }

    fn bind_family(v6: bool, port: u16, reuseport: bool, fwmark: u32) -> io::Result<UdpSocket> {
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: socket() takes no pointers; we own the result.
        let raw = cvt(unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `raw` is the descriptor socket() just returned; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if v6 {
            setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        }
        if reuseport {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        }
        // FORCE variants need CAP_NET_ADMIN; fall back to the capped ones.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER_BYTES).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER_BYTES);
            }
        }
        if fwmark != 0 {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_MARK, fwmark as libc::c_int)?;
        }
        // Receive coalesced datagrams when the kernel can (Linux 5.0+); optional.
        let _ = setsockopt_int(raw, SOL_UDP, UDP_GRO, 1);
        let addr = if v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        };
        let (sa, len) = to_sockaddr(&addr, v6);
        // SAFETY: `sa` is a sockaddr_storage holding a sockaddr of length `len`.
        cvt(unsafe { libc::bind(raw, (&sa as *const libc::sockaddr_storage).cast(), len) })?;
        let mut sock = UdpSocket {
            fd,
            v6,
            gso: AtomicBool::new(true),
            port: 0,
        };
        sock.port = sock.local_port()?;
        Ok(sock)
    }

    fn local_port(&self) -> io::Result<u16> {
        // SAFETY: all-zero is a valid sockaddr_storage (a plain C struct).
        let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `ss`, which has that many.
        cvt(unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        })?;
        from_sockaddr(&ss)
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("unknown address family"))
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )
    }

    /// Wakes any thread blocked in a receive on this socket (it then sees `Ok(0)` messages and
    /// a shut-down socket). Linux wakes readers even on an unconnected UDP socket.
    pub fn shutdown(&self) {
        // SAFETY: shutdown takes no pointers; ENOTCONN is expected and harmless.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sends one datagram.
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<()> {
        let (sa, len) = to_sockaddr(&dst, self.v6);
        // SAFETY: `buf` is readable for its length; `sa` holds `len` bytes of address.
        cvt_size(unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&sa as *const libc::sockaddr_storage).cast(),
                len,
            )
        })?;
        Ok(())
    }

    /// Sends every group of `batch`: a group of equal-sized segments to one address goes out
    /// as one GSO message where the kernel supports it. Send errors for single datagrams (a
    /// peer's unreachable address) are returned after the rest was tried.
    pub fn send_batch(&self, batch: &TxBatch, scratch: &mut SendScratch) -> io::Result<()> {
        let gso = self.gso.load(Ordering::Relaxed);
        let mut n = 0usize;
        let mut first_err = None;
        for g in batch.groups() {
            let data = batch.group_bytes(g);
            if gso && g.count > 1 {
                if n == MAX_SEND_MSGS {
                    self.flush(scratch, n, &mut first_err);
                    n = 0;
                }
                scratch.set(n, self.v6, g.dst, data, Some(g.segment as u16));
                n += 1;
            } else {
                for seg in data.chunks(g.segment as usize) {
                    if n == MAX_SEND_MSGS {
                        self.flush(scratch, n, &mut first_err);
                        n = 0;
                    }
                    scratch.set(n, self.v6, g.dst, seg, None);
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.flush(scratch, n, &mut first_err);
        }
        match first_err {
            Some(e) if e.raw_os_error() == Some(libc::EIO) && gso => {
                // The route's device cannot segment: send this and later batches unsegmented.
                self.gso.store(false, Ordering::Relaxed);
                self.send_batch(batch, scratch)
            }
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn flush(&self, s: &mut SendScratch, n: usize, first_err: &mut Option<io::Error>) {
        s.link(n);
        let mut sent = 0;
        while sent < n {
            // SAFETY: `link` pointed every header in [0, n) at live buffers in `s`, which is
            // not touched until the call returns.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    s.msgs.as_mut_ptr().add(sent),
                    (n - sent) as u32,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                // Skip the failing message and go on with the rest.
                first_err.get_or_insert(e);
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }

    /// Blocking receive of up to `batch.capacity()` messages. Returns how many arrived; 0 when
    /// the socket was shut down.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let n = batch.capacity();
        let hdrs = batch.link_headers();
        loop {
            // SAFETY: `link_headers` pointed each of the `n` headers at buffers owned by
            // `batch`, which stay borrowed until we return.
            let r = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    n as u32,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let r = r as usize;
            batch.finish(r);
            return Ok(r);
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Reusable sendmmsg headers, so a send allocates nothing.
pub struct SendScratch {
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    cmsgs: Vec<[u64; CMSG_ROOM / 8]>,
    segs: Vec<Option<u16>>,
}

// SAFETY: the raw pointers inside are only set and used within one `send_batch` call.
unsafe impl Send for SendScratch {}

impl Default for SendScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendScratch {
    pub fn new() -> SendScratch {
        SendScratch {
            msgs: (0..MAX_SEND_MSGS).map(|_| zeroed_c()).collect(),
            iovs: (0..MAX_SEND_MSGS).map(|_| zeroed_c()).collect(),
            addrs: (0..MAX_SEND_MSGS).map(|_| zeroed_c()).collect(),
            addr_lens: vec![0; MAX_SEND_MSGS],
            cmsgs: vec![[0; CMSG_ROOM / 8]; MAX_SEND_MSGS],
            segs: vec![None; MAX_SEND_MSGS],
        }
    }

    fn set(&mut self, i: usize, v6: bool, dst: SocketAddr, data: &[u8], seg: Option<u16>) {
        let (sa, len) = to_sockaddr(&dst, v6);
        self.addrs[i] = sa;
        self.addr_lens[i] = len;
        self.iovs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        self.segs[i] = seg;
    }

    /// Points the headers at the iovecs, addresses and control messages.
    fn link(&mut self, n: usize) {
        for i in 0..n {
            // Every pointer set below refers into `self`, whose vectors are never resized after
            // `new`.
            let mut h: libc::msghdr = zeroed_c();
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.addr_lens[i];
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            if let Some(seg) = self.segs[i] {
                let buf = &mut self.cmsgs[i];
                h.msg_control = buf.as_mut_ptr().cast();
                // SAFETY: `buf` (CMSG_ROOM bytes, 8-aligned) holds one cmsghdr with a u16 of
                // data; CMSG_FIRSTHDR of a header whose controllen covers it points into `buf`.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
            self.msgs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
    }
}

/// Buffers for one recvmmsg: `capacity` messages of up to `msg_len` bytes each (64 KB when
/// the kernel coalesces with GRO). Allocated once per worker.
pub struct RecvBatch {
    bufs: Vec<u8>,
    msg_len: usize,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; CMSG_ROOM / 8]>,
    filled: usize,
}

// SAFETY: the raw pointers inside point into the struct's own vectors and are re-made before
// every receive.
unsafe impl Send for RecvBatch {}

/// One received datagram (or a GRO train of equal-sized datagrams).
#[derive(Debug)]
pub struct RecvMsg<'a> {
    pub src: Option<SocketAddr>,
    pub data: &'a [u8],
    /// Segment size when the kernel coalesced several datagrams into `data`.
    pub segment: Option<u16>,
}

impl RecvBatch {
    pub fn new(capacity: usize, msg_len: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![0; capacity * msg_len],
            msg_len,
            hdrs: (0..capacity).map(|_| zeroed_c()).collect(),
            iovs: (0..capacity).map(|_| zeroed_c()).collect(),
            addrs: (0..capacity).map(|_| zeroed_c()).collect(),
            cmsgs: vec![[0; CMSG_ROOM / 8]; capacity],
            filled: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    fn link_headers(&mut self) -> &mut [libc::mmsghdr] {
        self.filled = 0;
        let base = self.bufs.as_mut_ptr();
        for i in 0..self.hdrs.len() {
            self.iovs[i] = libc::iovec {
                // SAFETY: offsets stay inside `bufs` (capacity * msg_len bytes).
                iov_base: unsafe { base.add(i * self.msg_len) }.cast(),
                iov_len: self.msg_len,
            };
            let mut h: libc::msghdr = zeroed_c();
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_ROOM as _;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        &mut self.hdrs
    }

    fn finish(&mut self, n: usize) {
        self.filled = n;
    }

    /// How many messages the last receive filled.
    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Message `i` of the last receive.
    pub fn get(&self, i: usize) -> RecvMsg<'_> {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.msg_len);
        // SAFETY: the header was filled by recvmmsg; its control pointer refers to `cmsgs[i]`.
        let segment = unsafe { gro_segment(&h.msg_hdr) };
        RecvMsg {
            src: from_sockaddr(&self.addrs[i]),
            data: &self.bufs[i * self.msg_len..i * self.msg_len + len],
            segment,
        }
    }
}

/// Reads the UDP GRO segment size from a received message's control data.
///
/// # Safety
/// `h` must be a header filled in by `recvmmsg`, with `msg_control` pointing at live memory.
pub(crate) unsafe fn gro_segment(h: &libc::msghdr) -> Option<u16> {
    let mut c = libc::CMSG_FIRSTHDR(h);
    while !c.is_null() {
        if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
            let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
            return u16::try_from(v).ok();
        }
        c = libc::CMSG_NXTHDR(h, c);
    }
    None
}

/// A plain C struct of the kernel ABI (addresses, headers, iovecs), all zero.
fn zeroed_c<T: PlainC>() -> T {
    // SAFETY: `PlainC` is implemented only for C structs made of integers, arrays of them and
    // raw pointers, for which all-zero bytes are a valid value (null pointers, zero lengths).
    unsafe { zeroed() }
}

/// C structs for which all-zero bytes are a valid value.
trait PlainC {}
impl PlainC for libc::sockaddr_storage {}
impl PlainC for libc::msghdr {}
impl PlainC for libc::mmsghdr {}
impl PlainC for libc::iovec {}

/// Socket address to C form; IPv4 becomes v4-mapped on a dual-stack socket.
pub(crate) fn to_sockaddr(
    addr: &SocketAddr,
    v6_socket: bool,
) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = zeroed_c();
    let v6 = match (addr, v6_socket) {
        (SocketAddr::V4(a), false) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger and at least as aligned as sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            return (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t);
        }
        (SocketAddr::V4(a), true) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        (SocketAddr::V6(a), _) => *a,
    };
    let sin6 = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: v6.port().to_be(),
        sin6_flowinfo: v6.flowinfo().to_be(),
        sin6_addr: libc::in6_addr {
            s6_addr: v6.ip().octets(),
        },
        sin6_scope_id: v6.scope_id(),
    };
    // SAFETY: sockaddr_storage is larger and at least as aligned as sockaddr_in6.
    unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
    (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
}

/// C socket address to Rust; v4-mapped IPv6 becomes IPv4.
pub(crate) fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    u32::from_be(sin6.sin6_flowinfo),
                    sin6.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for (a, v6) in [
            ("192.0.2.1:51820", false),
            ("192.0.2.1:51820", true),
            ("[2001:db8::1]:1", true),
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, _) = to_sockaddr(&a, v6);
            assert_eq!(from_sockaddr(&ss), Some(a));
        }
    }
}
