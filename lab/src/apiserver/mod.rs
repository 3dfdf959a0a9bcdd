//! A Kubernetes API stand-in: the slice of kube-apiserver that kube-rs and kubectl need for the
//! kinds kwire watches (core/v1 nodes, pods, namespaces, services, events;
//! discovery.k8s.io/v1 endpointslices; networking.k8s.io/v1 networkpolicies; events.k8s.io/v1
//! events), with podCIDR allocation for new Nodes as kube-controller-manager does it.
//!
//! **Security:** it serves plain HTTP with no authentication (unless a bearer token is
//! configured) and is meant for loopback only (`127.0.0.1`); the kubeconfig it writes says
//! `server: http://127.0.0.1:PORT`. Never expose it beyond the machine.
//!
//! What is faithful: one global, monotonically increasing resourceVersion across kinds (a
//! no-op write keeps it); uid, creationTimestamp, generation (set to 1 on objects with a
//! `spec`, bumped when the spec changes); 400/403/404/409/410/415/422 as `Status` objects;
//! namespaces must exist (`default`, `kube-system`, `kube-public`, `kube-node-lease` do);
//! list with resourceVersion ("", "0", N), resourceVersionMatch, limit/continue over one
//! consistent snapshot; watch with ADDED/MODIFIED/DELETED/BOOKMARK/ERROR, selectors turning
//! entering/leaving changes into ADDED/DELETED, timeoutSeconds, sendInitialEvents with the
//! initial-events-end bookmark, 410 Gone from a bounded history; label and field selectors
//! (unsupported fields are 400); merge patch, strategic merge patch, JSON patch; `status` subresources (main-resource
//! writes keep the status, status writes keep the rest); write-once `spec.podCIDRs`; events in
//! both APIs over one storage; defaults kwire reads (NetworkPolicy `policyTypes`, port
//! `protocol`, Service `targetPort`); ClusterIP and NodePort allocation; server-side Table
//! printing (also for `kubectl get -w`).
//!
//! What is not: no server-side apply (415, saying the real one has it); strategic merge patch
//! knows the merge keys of the kinds it serves (`patch::LIST_STRATEGIES`); no finalizers, no graceful
//! deletion (pods go at once), no namespace cascade (Terminating) on delete; no admission, no
//! RBAC; no OpenAPI schemas (a stub v3 document tells kubectl that the server validates, and
//! `fieldValidation=Strict` is ignored: unknown fields are kept, not rejected); no protobuf, no
//! dryRun (400), no deletecollection, no managedFields, no aggregated discovery (clients fall
//! back to the legacy documents); a watch from a resourceVersion newer than the store starts
//! there instead of waiting; lists honour `limit` even with resourceVersion=0.
//!
//! Stop and restart: [`ApiServer::stop`] closes the listener and drops every connection (as a
//! crashed API server would); [`ApiServer::resume`] listens on the same address again with the
//! same objects and resourceVersions.

pub mod cidr;
pub mod error;
pub mod http;
pub mod kubeconfig;
pub mod openapi;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod store;
pub mod strategy;
pub mod table;
pub mod validate;
pub mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, Mutex};
use tokio::task::{JoinHandle, JoinSet};

pub use error::ApiError;
pub use resources::ResourceKind;
pub use store::{ListOptions, ListPage, Store};

use cidr::{CidrConfigError, PodCidrAllocator, ServiceIpAllocator};
use http::{AppState, HttpSettings};
use store::StoreConfig;

/// Events kept for watches by default: the real watch cache keeps 100 per kind and etcd keeps
/// about five minutes; 10 000 across kinds lets a lab's watchers resume after a short outage.
pub const DEFAULT_HISTORY_SIZE: usize = 10_000;

/// Bookmark interval by default: the real API server sends them about once a minute.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// Watch length when the client gives no `timeoutSeconds`: kube-apiserver's
/// `--min-request-timeout` default (1800 s).
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// How the stand-in runs.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Address to listen on; port 0 picks a free port (read it back with [`ApiServer::addr`]).
    pub listen: SocketAddr,
    /// IPv4 cluster CIDR podCIDRs come from (None: no IPv4 podCIDRs).
    pub cluster_cidr: Option<Ipv4Network>,
    /// IPv6 cluster CIDR podCIDRs come from (None: no IPv6 podCIDRs).
    pub cluster_cidr_v6: Option<Ipv6Network>,
    /// Prefix length of each Node's IPv4 podCIDR (`--node-cidr-mask-size-ipv4`).
    pub node_cidr_mask: u8,
    /// Prefix length of each Node's IPv6 podCIDR (`--node-cidr-mask-size-ipv6`).
    pub node_cidr_mask_v6: u8,
    /// Service ClusterIPs come from here (None: Services need an explicit clusterIP).
    pub service_cidr: Option<Ipv4Network>,
    /// Writes kept for watches and paged lists; older resourceVersions get 410 Gone.
    pub history_size: usize,
    pub bookmark_interval: Duration,
    pub default_watch_timeout: Duration,
    /// When set, every request must carry `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster_cidr: Some("10.244.0.0/16".parse().expect("valid")),
            cluster_cidr_v6: None,
            node_cidr_mask: 24,
            node_cidr_mask_v6: 64,
            service_cidr: Some("10.96.0.0/12".parse().expect("valid")),
            history_size: DEFAULT_HISTORY_SIZE,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            default_watch_timeout: DEFAULT_WATCH_TIMEOUT,
            token: None,
        }
    }
}

/// Why the stand-in could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error(
        "cannot listen on {addr} for the API stand-in (is another kwire-lab apiserver running?)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster CIDR settings are inconsistent")]
    Cidr(#[from] CidrConfigError),
    #[error("cannot write the kubeconfig to {path}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no resource of kind {kind} in {api_version} is served by the API stand-in")]
    UnknownKind { api_version: String, kind: String },
}

/// Backlog of the listening socket.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listening socket with SO_REUSEADDR, so it can take the port back from the
/// placeholder (and from connections of the previous run in TIME_WAIT).
fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = bound_socket(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn bound_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

enum Serving {
    Running {
        stop: oneshot::Sender<()>,
        task: JoinHandle<Option<TcpSocket>>,
    },
    /// Stopped: a bound, non-listening socket holds the port, so that connections are refused
    /// and no other socket (an outgoing connection's ephemeral port) can take it meanwhile.
    Stopped { _placeholder: Option<TcpSocket> },
}

/// A running (or paused) API stand-in. Dropping it stops serving.
pub struct ApiServer {
    state: Arc<AppState>,
    addr: SocketAddr,
    serving: Mutex<Serving>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Ok(mut serving) = self.serving.try_lock() {
            if let Serving::Running { .. } = &*serving {
                if let Serving::Running { stop, .. } =
                    std::mem::replace(&mut *serving, Serving::Stopped { _placeholder: None })
                {
                    let _ = stop.send(());
                }
            }
        }
    }
}

impl ApiServer {
    /// Builds the store and starts serving on `config.listen`.
    pub async fn start(config: ApiServerConfig) -> Result<ApiServer, ApiServerError> {
        let pod_cidrs = PodCidrAllocator::new(
            config
                .cluster_cidr
                .map(|n| (IpNetwork::V4(n), config.node_cidr_mask)),
            config
                .cluster_cidr_v6
                .map(|n| (IpNetwork::V6(n), config.node_cidr_mask_v6)),
        )?;
        let service_ips = ServiceIpAllocator::new(config.service_cidr.map(IpNetwork::V4))?;
        let store = Arc::new(Store::new(StoreConfig {
            history_size: config.history_size,
            pod_cidrs,
            service_ips,
        }));
        let bind_err = |source| ApiServerError::Bind {
            addr: config.listen,
            source,
        };
        let listener = listen_on(config.listen).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let state = Arc::new(AppState {
            store,
            settings: HttpSettings {
                token: config.token.clone(),
                bookmark_interval: config.bookmark_interval,
                default_watch_timeout: config.default_watch_timeout,
                server_address: addr.to_string(),
            },
        });
        let serving = serve(state.clone(), listener, addr);
        tracing::info!(%addr, "Kubernetes API stand-in listening (plain HTTP, loopback only)");
        Ok(ApiServer {
            state,
            addr,
            serving: Mutex::new(serving),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the `server:` of the kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The object store, for in-process reads and writes (the same the HTTP API uses).
    pub fn store(&self) -> &Arc<Store> {
        &self.state.store
    }

    /// Stops listening and drops every open connection (watches end abruptly, new
    /// connections are refused); the store and its resourceVersions stay, and the port stays
    /// reserved for [`ApiServer::resume`]. Idempotent.
    pub async fn stop(&self) {
        let mut serving = self.serving.lock().await;
        if let Serving::Running { .. } = &*serving {
            if let Serving::Running { stop, task } =
                std::mem::replace(&mut *serving, Serving::Stopped { _placeholder: None })
            {
                let _ = stop.send(());
                let placeholder = task.await.ok().flatten();
                *serving = Serving::Stopped {
                    _placeholder: placeholder,
                };
                tracing::info!(addr = %self.addr, "Kubernetes API stand-in stopped");
            }
        }
    }

    /// Listens again on the same address, with the same store. Idempotent.
    pub async fn resume(&self) -> Result<(), ApiServerError> {
        let mut serving = self.serving.lock().await;
        if let Serving::Stopped { .. } = &*serving {
            // Bind while the placeholder still holds the port; it is dropped right after.
            let listener = listen_on(self.addr).map_err(|source| ApiServerError::Bind {
                addr: self.addr,
                source,
            })?;
            *serving = serve(self.state.clone(), listener, self.addr);
            tracing::info!(addr = %self.addr, "Kubernetes API stand-in resumed");
        }
        Ok(())
    }

    pub async fn is_serving(&self) -> bool {
        matches!(&*self.serving.lock().await, Serving::Running { .. })
    }

    /// Writes a kubeconfig for this server to `path` (context `kwire-lab`, namespace default).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        kubeconfig::write_kubeconfig(path, &self.url(), self.state.settings.token.as_deref())
            .map_err(|source| ApiServerError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Drops the whole event history: watches and paged lists from older resourceVersions get
    /// 410 Gone, as after an etcd compaction.
    pub fn compact_history(&self) {
        self.state.store.compact();
    }

    /// The served resource for `apiVersion` + `kind` (`"v1"`, `"Node"`).
    pub fn kind(api_version: &str, kind: &str) -> Result<&'static ResourceKind, ApiServerError> {
        resources::by_kind(api_version, kind).ok_or_else(|| ApiServerError::UnknownKind {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
        })
    }

    /// Creates an object in-process; `apiVersion`, `kind` and (for namespaced kinds)
    /// `metadata.namespace` (default `default`) come from the object. Returns it as stored.
    pub fn create(&self, object: Value) -> Result<Value, ApiError> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind_name = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let kind = resources::by_kind(api_version, kind_name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "no kind {kind_name:?} is registered for version {api_version:?}"
            ))
        })?;
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.state.store.create(kind, ns.as_deref(), object)
    }

    pub fn get(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.state.store.get(kind, namespace, name)
    }

    /// Applies a JSON merge patch (RFC 7386) in-process, to the object or its `status`.
    pub fn merge_patch(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.state
            .store
            .modify(kind, namespace, name, status, |mut current| {
                patch::merge_patch(&mut current, patch);
                Ok(current)
            })
    }

    /// Replaces an object in-process (PUT semantics: a non-empty `metadata.resourceVersion`
    /// must be the stored one), or its `status` with `status`.
    pub fn update(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        object: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.state
            .store
            .update(kind, namespace, name, object, status)
    }

    /// Applies a JSON patch (RFC 6902) in-process.
    pub fn json_patch(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.state
            .store
            .modify(kind, namespace, name, status, |current| {
                patch::json_patch(&current, patch).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the JSON patch for {} \"{name}\" cannot be applied: {e}",
                            kind.qualified_plural()
                        ),
                    )
                })
            })
    }

    pub fn delete(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.state.store.delete(kind, namespace, name, None, None)
    }

    /// All objects of a kind (`namespace` None: every namespace), newest state.
    pub fn list(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
    ) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .state
            .store
            .list(kind, namespace, &ListOptions::default())?
            .items)
    }
}

/// Accepts connections until told to stop; then drops the listener, reserves the port with a
/// placeholder socket, and drops every connection (as a crashed API server would).
fn serve(state: Arc<AppState>, listener: TcpListener, addr: SocketAddr) -> Serving {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let router = http::router(state);
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let service = TowerToHyperService::new(router.clone());
                        connections.spawn(async move {
                            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "API connection ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on the API stand-in");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        // Open connections still hold the port here, so nothing else can take it first.
        let placeholder = bound_socket(addr)
            .inspect_err(
                |e| tracing::warn!(%addr, error = %e, "cannot reserve the API port while stopped"),
            )
            .ok();
        connections.shutdown().await;
        placeholder
    });
    Serving::Running { stop, task }
}
