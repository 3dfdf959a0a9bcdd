//! `kwire tunnel IFNAME`: a standalone userspace WireGuard device in the foreground, like
//! `wireguard-go -f IFNAME`: the data plane ([`crate::dataplane`]) on a tun of its own, the
//! userspace API on a socket, and a small tokio runtime that waits for signals.

use crate::dataplane::uapi_server::{self, UAPI_DIR};
use crate::dataplane::workers::TunIo;
use crate::dataplane::{TunnelDevice, TunnelOptions};
use std::path::PathBuf;
use tracing::info;

#[derive(Debug, clap::Args)]
pub struct TunnelArgs {
    /// Name of the tun interface to create (1 to 15 characters).
    pub ifname: String,
    /// Worker threads (tun queue and UDP socket pairs); default: one per core.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Directory of the userspace API socket.
    #[arg(long, default_value = UAPI_DIR)]
    pub uapi_dir: PathBuf,
    /// Turn off tun TSO/GRO offloads (virtio-net headers); for comparison and old kernels.
    #[arg(long)]
    pub no_offload: bool,
    /// How tun frames are read: `read` (one read(2) per frame) or `uring` (io_uring
    /// multishot reads, many frames per system call; falls back to `read` where the kernel
    /// or a seccomp profile refuses io_uring).
    #[arg(long, value_enum, env = TunIo::ENV, default_value = "read")]
    pub tun_io: TunIo,
}

/// Runs `kwire tunnel` until SIGTERM or SIGINT.
pub fn run(args: TunnelArgs) -> anyhow::Result<()> {
    crate::io::tun::check_ifname(&args.ifname)?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let sock_path = args.uapi_dir.join(format!("{}.sock", args.ifname));
        // Claim the socket path first: a second instance must fail before touching the tun.
        let listener = uapi_server::bind(&sock_path)?;
        let opts = TunnelOptions {
            workers,
            offload: !args.no_offload,
            persist: false,
            listen_port: 0,
            tun_io: args.tun_io,
        };
        let tun = match TunnelDevice::start(&args.ifname, opts) {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&sock_path);
                return Err(e);
            }
        };
        info!(ifname = %args.ifname, socket = %sock_path.display(), "kwire tunnel up");
        let server = tokio::spawn(uapi_server::serve(
            listener,
            tun.device.clone(),
            tun.net.clone(),
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        server.abort();
        let _ = std::fs::remove_file(&sock_path);
        Ok::<(), anyhow::Error>(())
    })?;
    // The tun is not persistent: it goes away with our descriptors when the process exits.
    // Worker threads are blocked in system calls; exiting is the clean way to end them.
    std::process::exit(0)
}
