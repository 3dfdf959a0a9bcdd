//! The Kubernetes API client every command that talks to the cluster builds the same way:
//! `--kubeconfig` if given, else the in-cluster configuration, else `$KUBECONFIG` or
//! `~/.kube/config`.
//!
//! Its connections notice a silent path loss (a NAT that dropped its mapping, a black-holed
//! route): TCP keepalive probes start after [`Liveness::idle`] of silence and a connection
//! whose probes, or whose sent data, go unanswered for [`Liveness::dead_after`] is closed by
//! the kernel. A watch on it then ends with an error and restarts from its last
//! resourceVersion on a new connection, as client-go's HTTP/2 health check does for
//! Kubernetes' own components. kube's builder takes no connector, so the stack it builds
//! (base URI, retry, auth, extra headers, rustls) is built here around one that has keepalive.
//!
//! Its TLS reads come out of a buffer ([`ReadBuffered`]): rustls asks the socket for at most
//! 4 KB at a time, so a paced watch thread (see `agent::watches::Pacer`) that finds a turn's
//! events waiting (~3.5 KB each) read them with a `recvfrom` each, and each read sent an ACK
//! whose processing (on loopback, the peer's receive path too) ran on that thread. With the
//! buffer, one read takes everything that arrived.

use anyhow::Context as _;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::client::ConfigExt;
use kube::Client;
use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Silence on an API connection before keepalive probes start, by default. With the probe
/// interval and count below a dead connection is closed after 45 s, what client-go's HTTP/2
/// health check (30 s read idle + 15 s ping timeout) gives Kubernetes' own components.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// Unanswered keepalive probes before the kernel gives a connection up.
const KEEPALIVE_PROBES: u32 = 3;

/// How this process's API connections notice that their path went silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Silence before the first probe; `None`: no keepalive (the kernel's defaults, hours).
    idle: Option<Duration>,
}

impl Liveness {
    /// Probes after `idle` of silence (whole seconds, at least one: the kernel counts
    /// keepalive time in seconds); zero turns keepalive off.
    pub fn after(idle: Duration) -> Liveness {
        Liveness {
            idle: (!idle.is_zero()).then(|| Duration::from_secs(idle.as_secs().max(1))),
        }
    }

    /// Silence before the first probe.
    pub fn idle(&self) -> Option<Duration> {
        self.idle
    }

    /// Between probes: a sixth of the idle time, at least a second.
    fn interval(&self) -> Option<Duration> {
        self.idle.map(|i| (i / 6).max(Duration::from_secs(1)))
    }

    /// After this long without an answer a connection is closed: the idle time and every
    /// probe's interval (keepalive), or unacknowledged data for as long (`TCP_USER_TIMEOUT`).
    pub fn dead_after(&self) -> Option<Duration> {
        Some(self.idle? + self.interval()? * KEEPALIVE_PROBES)
    }

    fn apply(&self, http: &mut HttpConnector) {
        http.set_keepalive(self.idle);
        http.set_keepalive_interval(self.interval());
        http.set_keepalive_retries(self.idle.map(|_| KEEPALIVE_PROBES));
        http.set_tcp_user_timeout(self.dead_after());
    }
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness::after(DEFAULT_KEEPALIVE)
    }
}

static LIVENESS: OnceLock<Liveness> = OnceLock::new();

/// Sets how every API client this process builds from now on keeps its connections alive
/// (`kwire agent --api-keepalive`). Only the first call counts; it returns false after that.
pub fn set_liveness(l: Liveness) -> bool {
    LIVENESS.set(l).is_ok()
}

fn liveness() -> Liveness {
    LIVENESS.get().copied().unwrap_or_default()
}

/// The API configuration for `kubeconfig`, or for the environment the process runs in.
pub async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    Ok(match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p).with_context(|| format!("reading --kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", p.display()))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => kube::Config::infer()
                .await
                .context("no Kubernetes API configuration: not in a cluster, no $KUBECONFIG, no ~/.kube/config; pass --kubeconfig")?,
        },
    })
}

/// Bytes an API connection reads from its socket at once, at most: what arrives during a watch
/// thread's turn at a few hundred events per second (rustls alone reads 4 KB at a time).
const READ_BUFFER: usize = 64 * 1024;

/// An API connection's socket with its reads buffered (see the module): rustls's small reads
/// are served from the buffer, which is filled with one read of whatever has arrived. Writes
/// go straight through.
struct ReadBuffered(tokio::io::BufReader<tokio::net::TcpStream>);

impl tokio::io::AsyncRead for ReadBuffered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ReadBuffered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for ReadBuffered {
    fn connected(&self) -> Connected {
        self.0.get_ref().connected()
    }
}

/// A client for `config` whose connections have keepalive (see the module). Its connections
/// and request queue live on the runtime this is called on.
pub fn client_for(config: kube::Config) -> anyhow::Result<Client> {
    if let Some(proxy) = &config.proxy_url {
        anyhow::bail!("the kubeconfig names a proxy ({proxy}); kwire connects to the API server directly: remove proxy-url");
    }
    // kube's own stack, in its order. Its read and write timeouts are unset in every
    // configuration `config` makes (they would cut watches); keepalive is what bounds them.
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    liveness().apply(&mut http);
    let http = tower::ServiceExt::map_response(http, |io: TokioIo<tokio::net::TcpStream>| {
        TokioIo::new(ReadBuffered(tokio::io::BufReader::with_capacity(
            READ_BUFFER,
            io.into_inner(),
        )))
    });
    let https = config
        .rustls_https_connector_with_connector(http)
        .context("the API client's TLS settings")?;
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, kube::client::Body>(https);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(
            config
                .auth_layer()
                .context("the API client's credentials")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("the API client's headers")?,
        )
        .map_err(BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace))
}

/// A client for `kubeconfig`, or for the environment the process runs in.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    client_for(config(kubeconfig).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gives_a_dead_connection_up_when_client_go_would() {
        let l = Liveness::default();
        assert_eq!(l.idle(), Some(Duration::from_secs(30)));
        assert_eq!(l.dead_after(), Some(Duration::from_secs(45)));
    }

    #[test]
    fn short_bounds_probe_every_second_and_zero_turns_keepalive_off() {
        assert_eq!(
            Liveness::after(Duration::from_secs(2)).dead_after(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            Liveness::after(Duration::from_millis(300)).idle(),
            Some(Duration::from_secs(1))
        );
        let off = Liveness::after(Duration::ZERO);
        assert_eq!((off.idle(), off.dead_after()), (None, None));
    }
}
