//! Serves the WireGuard userspace API on a root-only unix socket, so `wg` from
//! wireguard-tools can read and change the device.

use crate::wg::device::NetworkControl;
use crate::wg::uapi::{
    format_errno, format_get, parse_request, Errno, Request, MAX_LINE_BYTES, MAX_REQUEST_BYTES,
};
use crate::wg::Device;
use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

/// Where wireguard-tools looks for userspace API sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// How long a client may take to send a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Mode of the socket's directory: root only (SECURITY.md); `wg` runs as root and needs no
/// more.
pub const UAPI_DIR_MODE: u32 = 0o700;

/// Binds the socket at `path` (mode 0600, in a directory made or tightened to 0700). A live
/// socket there means another instance: refused. A stale one is replaced.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(UAPI_DIR_MODE))
        .with_context(|| format!("restricting {} to root (mode 0700)", dir.display()))?;
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

/// Reads requests off a connection: bytes go into buffers that are zeroed when dropped or
/// grown (a `set` may carry keys), a line longer than [`MAX_LINE_BYTES`] or a request longer
/// than [`MAX_REQUEST_BYTES`] is refused before more of it is read.
struct RequestReader {
    stream: OwnedReadHalf,
    chunk: Zeroizing<Vec<u8>>,
    pending: Zeroizing<Vec<u8>>,
    /// Bytes of `pending` already looked at.
    scanned: usize,
    /// Length of the line being read.
    line: usize,
}

/// What the next request was.
enum Next {
    /// A whole request, its terminating blank line included.
    Request(Zeroizing<Vec<u8>>),
    /// The client closed the connection (or was silent too long).
    Closed,
    /// Over a limit: answered with EINVAL, then the connection is closed.
    TooLong,
}

/// Appends `data` to `buf`; a buffer that must grow is copied into a larger one and the old one
/// zeroed (a `Vec` that reallocates itself would leave the old bytes behind).
fn push_zeroizing(buf: &mut Zeroizing<Vec<u8>>, data: &[u8]) {
    if buf.capacity() - buf.len() < data.len() {
        let mut bigger = Zeroizing::new(Vec::with_capacity(
            (buf.len() + data.len()).max(buf.capacity() * 2),
        ));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(data);
}

impl RequestReader {
    fn new(stream: OwnedReadHalf) -> RequestReader {
        RequestReader {
            stream,
            chunk: Zeroizing::new(vec![0; 4096]),
            pending: Zeroizing::new(Vec::with_capacity(4096)),
            scanned: 0,
            line: 0,
        }
    }

    /// Looks at the bytes not yet looked at: the end of the first request (after its blank
    /// line), or too long a line. Each byte is looked at once.
    fn scan(&mut self) -> Option<Next> {
        while self.scanned < self.pending.len() {
            let b = self.pending[self.scanned];
            self.scanned += 1;
            if b != b'\n' {
                self.line += 1;
                if self.line > MAX_LINE_BYTES {
                    return Some(Next::TooLong);
                }
                continue;
            }
            let blank = self.line == 0;
            self.line = 0;
            if blank {
                let end = self.scanned;
                let mut req = Zeroizing::new(Vec::with_capacity(end));
                req.extend_from_slice(&self.pending[..end]);
                self.pending.drain(..end);
                self.scanned = 0;
                return Some(Next::Request(req));
            }
        }
        (self.pending.len() > MAX_REQUEST_BYTES).then_some(Next::TooLong)
    }

    async fn next(&mut self) -> std::io::Result<Next> {
        loop {
            if let Some(next) = self.scan() {
                return Ok(next);
            }
            let n = match tokio::time::timeout(REQUEST_TIMEOUT, self.stream.read(&mut self.chunk))
                .await
            {
                Ok(r) => r?,
                Err(_) => return Ok(Next::Closed),
            };
            if n == 0 {
                return Ok(Next::Closed);
            }
            push_zeroizing(&mut self.pending, &self.chunk[..n]);
        }
    }
}

async fn handle<N: NetworkControl + Clone + Send + 'static>(
    stream: UnixStream,
    device: Arc<Device>,
    net: N,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = RequestReader::new(r);
    loop {
        let req = match reader.next().await? {
            Next::Request(req) => req,
            Next::Closed => return Ok(()),
            Next::TooLong => {
                warn!("userspace API request over its size limit; connection closed");
                w.write_all(format_errno(Err(Errno::Invalid)).as_bytes())
                    .await?;
                return Ok(());
            }
        };
        let Ok(text) = std::str::from_utf8(&req) else {
            w.write_all(format_errno(Err(Errno::Invalid)).as_bytes())
                .await?;
            return Ok(());
        };
        let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
        // The reply to a `get` carries the private key: zeroed when dropped.
        let reply: Zeroizing<String> = match parse_request(&lines) {
            Ok(Request::Get) => format_get(&device.info()),
            Ok(Request::GetPeers(keys)) => format_get(&device.info_of(&keys)),
            Ok(Request::Set(req)) => {
                let device = device.clone();
                let mut net = net.clone();
                let r = tokio::task::spawn_blocking(move || device.apply(req, &mut net))
                    .await
                    .map_err(std::io::Error::other)?;
                Zeroizing::new(match r {
                    Ok(()) => {
                        info!("configuration changed through the userspace API");
                        format_errno(Ok(()))
                    }
                    Err(e) => {
                        warn!(error = %e, "userspace API set refused");
                        format_errno(Err(e.errno))
                    }
                })
            }
            Err(e) => {
                warn!(error = %e, "malformed userspace API request");
                Zeroizing::new(format_errno(Err(e.errno)))
            }
        };
        drop(lines);
        drop(req);
        w.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct NoNet;
    impl NetworkControl for NoNet {
        fn bind(&mut self, port: u16, _: u32) -> std::io::Result<u16> {
            Ok(port)
        }
        fn set_fwmark(&mut self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffers_grow_by_copy() {
        let mut b = Zeroizing::new(Vec::with_capacity(2));
        push_zeroizing(&mut b, b"abc");
        push_zeroizing(&mut b, b"defgh");
        assert_eq!(&b[..], b"abcdefgh");
    }

    /// A client that sends an endless line is answered EINVAL and cut off after about
    /// MAX_LINE_BYTES, not read whole; a normal request on the same server still works.
    #[tokio::test]
    async fn an_endless_line_is_refused_before_it_is_read_whole() {
        if !nix::unistd::geteuid().is_root() {
            crate::testing::skip(
                "an_endless_line_is_refused_before_it_is_read_whole",
                "the server serves root only",
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("kwire-uapi-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("kwcap0.sock");
        let listener = bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            UAPI_DIR_MODE
        );
        let server = tokio::spawn(serve(listener, Arc::new(Device::new()), NoNet));
        let mut c = UnixStream::connect(&sock).await.unwrap();
        let line = vec![b'a'; 64 * 1024];
        let mut sent = 0usize;
        let mut reply = Vec::new();
        // Keep writing until the server answers and closes: it must do so long before 64 MiB.
        loop {
            match tokio::time::timeout(Duration::from_millis(200), c.write_all(&line)).await {
                Ok(Ok(())) => sent += line.len(),
                _ => break,
            }
            if sent > 64 << 20 {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut reply)).await;
        assert!(sent < 8 << 20, "the server read {sent} bytes of one line");
        assert_eq!(String::from_utf8_lossy(&reply), "errno=-22\n\n");
        let mut c = UnixStream::connect(&sock).await.unwrap();
        c.write_all(b"get=1\n\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("listen_port="));
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
