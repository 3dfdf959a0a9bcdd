//! Linux tun devices: multi-queue, with virtio-net headers and TSO offloads, so the kernel
//! hands the loop 64 KB TCP segments and accepts coalesced ones back
//! (Documentation/networking/tuntap.rst; wireguard-go `tun/tun_linux.go` does the same).

use super::{cvt, cvt_size};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;

const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// Whether this kernel's tun took UDP segmentation offload (Linux 6.2 and later) when a queue
/// was opened here: then it also takes UDP super-packets written to a tun.
static KERNEL_USO: AtomicBool = AtomicBool::new(false);

/// Size of `struct virtio_net_hdr` without `num_buffers`, what we ask the kernel to prepend.
pub const VNET_HDR_LEN: usize = 10;

/// Linux limits interface names to IFNAMSIZ - 1 bytes.
pub const IFNAMSIZ: usize = 16;

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// How a tun queue was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunOptions {
    /// Ask for IFF_VNET_HDR and TSO/checksum offloads.
    pub offload: bool,
    /// Ask for IFF_MULTI_QUEUE.
    pub multi_queue: bool,
}

/// One queue of a tun device. Reads and writes are whole packets, each prefixed with a
/// virtio-net header when `offload` is on.
#[derive(Debug)]
pub struct TunQueue {
    file: File,
    offload: bool,
    uso: bool,
}

/// Checks an interface name the way the kernel will, so the error names the real problem.
pub fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() >= IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: 1 to 15 characters, no '/', ':' or spaces"),
        ));
    }
    Ok(())
}

impl TunQueue {
    /// Opens (creating if needed) tun `name` in the current network namespace.
    pub fn open(name: &str, opts: TunOptions) -> io::Result<TunQueue> {
        check_ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReqFlags {
            name: [0; IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        if opts.offload {
            req.flags |= IFF_VNET_HDR;
        }
        if opts.multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a repr(C) struct of
        // at least that size (40 bytes) that lives across the call.
        cvt(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) })?;
        let mut uso = false;
        if opts.offload {
            let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which is valid.
            cvt(unsafe {
                libc::ioctl(
                    file.as_raw_fd(),
                    TUNSETVNETHDRSZ,
                    &hdr as *const libc::c_int,
                )
            })?;
            let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // USO where the kernel has it (an application's UDP_SEGMENT sends stay one
            // super-packet up to us, and we may write such back); else TSO alone.
            let set = |flags: libc::c_uint| {
                // SAFETY: TUNSETOFFLOAD takes its argument by value.
                cvt(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) })
            };
            uso = set(tso | TUN_F_USO4 | TUN_F_USO6).is_ok();
            if uso {
                KERNEL_USO.store(true, Ordering::Relaxed);
            } else {
                set(tso)?;
            }
        }
        Ok(TunQueue {
            file,
            offload: opts.offload,
            uso,
        })
    }

    /// Whether the queue takes UDP super-packets (USO) both ways.
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Whether frames carry a virtio-net header.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Marks the device persistent (it outlives this process) or not.
    pub fn set_persist(&self, persist: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        cvt(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                persist as libc::c_ulong,
            )
        })?;
        Ok(())
    }

    /// Blocking read of one frame.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let r = cvt_size(unsafe {
                libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Writes one frame.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
            let r = cvt_size(unsafe {
                libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len())
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Switches the queue between blocking and non-blocking reads.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        set_nonblocking(self.file.as_raw_fd(), nonblocking)
    }

    /// Waits until the queue is readable or `timeout_ms` passes (-1: forever).
    pub fn poll_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        poll_in(self.file.as_raw_fd(), timeout_ms)
    }

    pub fn into_owned_fd(self) -> OwnedFd {
        self.file.into()
    }

    /// Wraps a tun fd received from elsewhere (a persistent pod device handed over a socket).
    /// It takes UDP super-packets when the kernel's tuns do ([`TunQueue::open`] found out).
    pub fn from_owned_fd(fd: OwnedFd, offload: bool) -> TunQueue {
        TunQueue {
            file: File::from(fd),
            offload,
            uso: offload && KERNEL_USO.load(Ordering::Relaxed),
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

pub(crate) fn set_nonblocking(fd: RawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own take no pointers.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above; the flags are the descriptor's own with O_NONBLOCK changed.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })?;
    Ok(())
}

pub(crate) fn poll_in(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        match cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The kernel's index of interface `name` in the current namespace, if it exists.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Duplicates a descriptor (CLOEXEC).
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that we then own exclusively.
    let n = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `n` is the new descriptor F_DUPFD_CLOEXEC returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}
