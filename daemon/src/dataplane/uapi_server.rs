//! Serves the WireGuard userspace API on a root-only unix socket, so `wg` from
//! wireguard-tools can read and change the device.

use crate::wg::device::NetworkControl;
use crate::wg::uapi::{format_errno, format_get, parse_request, Request, MAX_REQUEST_BYTES};
use crate::wg::Device;
use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

/// Where wireguard-tools looks for userspace API sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// How long a client may take to send a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket at `path` (mode 0600, directory created 0755 as wireguard-tools expects).
/// A live socket there means another instance: refused. A stale one is replaced.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use: another WireGuard implementation serves this interface; stop it first", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(l)
}

/// Accepts connections until the task is aborted. Only root (uid 0) is served.
pub async fn serve<N: NetworkControl + Clone + Send + 'static>(
    listener: UnixListener,
    device: Arc<Device>,
    net: N,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accepting a userspace API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {}
            Ok(c) => {
                warn!(
                    uid = c.uid(),
                    "refusing a userspace API connection from a non-root user"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "cannot read userspace API peer credentials; refusing");
                continue;
            }
        }
        let device = device.clone();
        let net = net.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, device, net).await {
                debug!(error = %e, "userspace API connection ended");
            }
        });
    }
}

async fn handle<N: NetworkControl + Clone + Send + 'static>(
    stream: UnixStream,
    device: Arc<Device>,
    net: N,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut lines: Vec<String> = Vec::new();
        let mut total = 0usize;
        loop {
            let mut line = String::new();
            let n = match tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(()); // client closed
            }
            total += n;
            if total > MAX_REQUEST_BYTES {
                w.write_all(format_errno(Err(crate::wg::uapi::Errno::Invalid)).as_bytes())
                    .await?;
                return Ok(());
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                break;
            }
            lines.push(line.to_string());
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let reply = match parse_request(&refs) {
            Ok(Request::Get) => format_get(&device.info()).to_string(),
            Ok(Request::Set(req)) => {
                let device = device.clone();
                let mut net = net.clone();
                let r = tokio::task::spawn_blocking(move || device.apply(req, &mut net))
                    .await
                    .map_err(std::io::Error::other)?;
                match r {
                    Ok(()) => {
                        info!("configuration changed through the userspace API");
                        format_errno(Ok(()))
                    }
                    Err(e) => {
                        warn!(error = %e, "userspace API set refused");
                        format_errno(Err(e.errno))
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "malformed userspace API request");
                format_errno(Err(e.errno))
            }
        };
        // Zeroize the request lines: a set may carry keys.
        for l in lines.iter_mut() {
            zeroize::Zeroize::zeroize(l);
        }
        w.write_all(reply.as_bytes()).await?;
    }
}
