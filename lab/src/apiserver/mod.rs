//! A Kubernetes API stand-in: the slice of kube-apiserver that kube-rs and kubectl need for the
//! kinds kwire watches (core/v1 nodes, pods, namespaces, services, events, serviceaccounts,
//! secrets; discovery.k8s.io/v1 endpointslices; networking.k8s.io/v1 networkpolicies;
//! events.k8s.io/v1 events; rbac.authorization.k8s.io/v1 roles and bindings;
//! admissionregistration.k8s.io/v1 validating admission policies and bindings;
//! apiextensions.k8s.io/v1 CustomResourceDefinitions, and the custom kinds they define, served
//! like the built-in ones with their schemas checked, see [`crd`]), with podCIDR allocation for
//! new Nodes as kube-controller-manager does it.
//!
//! **Security, as in a real cluster:** HTTPS only, with a CA made per server ([`tls`]);
//! bearer-token authentication ([`authn`]: an admin token, and service account tokens bound to a
//! node, 401 for anything else); every request authorized by RBAC ([`rbac`]) with the roles and
//! bindings applied to it (403 Forbidden worded as the real server words it); every write
//! admitted by the ValidatingAdmissionPolicies applied to it, their CEL run ([`admission`]).
//! The request path: authenticate, [`request`] info, authorize, then [`http`] routes to the
//! [`registry`] (allocation, admission) and the [`store`].
//!
//! What is faithful: one global, monotonically increasing resourceVersion across kinds (a
//! no-op write keeps it); uid, creationTimestamp, generation (set to 1 on objects with a
//! `spec`, bumped when the spec changes); 400/401/403/404/409/410/415/422 as `Status` objects;
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
//! knows the merge keys of the kinds it serves (`patch::LIST_STRATEGIES`); no finalizers, no
//! graceful deletion (pods go at once), no namespace cascade (Terminating) on delete; no mutating
//! admission, no admission plugins besides ValidatingAdmissionPolicy (see [`admission`] for what
//! of it is missing); no client certificates, no impersonation, tokens are not JWTs
//! ([`authn`]); no OpenAPI schemas for built-in kinds (a stub v3 document tells kubectl that the server validates,
//! and `fieldValidation=Strict` is ignored: unknown fields are kept, not rejected); no
//! protobuf, no dryRun (400), no deletecollection, no managedFields, no aggregated discovery
//! (clients fall back to the legacy documents); a watch from a resourceVersion newer than the
//! store starts there instead of waiting; lists honour `limit` even with resourceVersion=0.
//!
//! Stop and restart: [`ApiServer::stop`] stops listening and drops every connection (as a
//! crashed API server would: new connections are refused); [`ApiServer::resume`] listens again
//! on the same address with the same objects and resourceVersions. The listening socket itself
//! stays open in between (it is only taken out of the listening state), so no other socket can
//! take its port, and a copy of its descriptor in a forked child cannot keep it listening.

pub mod admission;
pub mod alloc;
pub mod authn;
pub mod cidr;
pub mod crd;
pub mod error;
pub mod http;
pub mod kubeconfig;
pub mod kubernetes_service;
pub mod names;
pub mod openapi;
pub mod patch;
pub mod rbac;
pub mod registry;
pub mod request;
pub mod resources;
pub mod selector;
pub mod store;
pub mod strategy;
pub mod table;
pub mod tls;
pub mod validate;
pub mod watch;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
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

pub use authn::UserInfo;
pub use error::ApiError;
pub use http::AuditEntry;
pub use resources::ResourceKind;
pub use store::{ListOptions, ListPage, Store};

use alloc::Allocators;
use authn::TokenAuthenticator;
use cidr::{CidrConfigError, PodCidrAllocator, ServiceIpAllocator};
use http::{AppState, HttpSettings};
use registry::Registry;
use store::StoreConfig;

/// Events kept for watches by default: the real watch cache keeps 100 per kind and etcd keeps
/// about five minutes; 10 000 across kinds lets a lab's watchers resume after a short outage.
pub const DEFAULT_HISTORY_SIZE: usize = 10_000;

/// Bookmark interval by default: the real API server sends them about once a minute.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// Watch length when the client gives no `timeoutSeconds`: kube-apiserver's
/// `--min-request-timeout` default (1800 s).
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// IPv6 ClusterIPs (dual-stack Services) come from here (None: IPv4 only).
    pub service_cidr_v6: Option<Ipv6Network>,
    /// Writes kept for watches and paged lists; older resourceVersions get 410 Gone.
    pub history_size: usize,
    pub bookmark_interval: Duration,
    pub default_watch_timeout: Duration,
    /// Names and addresses for the serving certificate besides `localhost`, 127.0.0.1, ::1,
    /// the `kubernetes.default.svc` names and the listen address (e.g. where a proxy forwards
    /// from).
    pub tls_names: Vec<String>,
    /// The address clients outside the host reach this server at (kube-apiserver's
    /// `--advertise-address` and secure port): when set (with an IPv4 or IPv6 service range),
    /// the server keeps the `default/kubernetes` Service and its EndpointSlice pointing at it
    /// ([`kubernetes_service`]).
    pub advertise: Option<SocketAddr>,
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
            service_cidr_v6: None,
            history_size: DEFAULT_HISTORY_SIZE,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            default_watch_timeout: DEFAULT_WATCH_TIMEOUT,
            tls_names: Vec::new(),
            advertise: None,
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
    #[error("cannot set up the API stand-in's TLS")]
    Tls(#[from] tls::TlsError),
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
const LISTEN_BACKLOG: i32 = 1024;

/// A listening socket bound to an explicit port, so that it keeps the port while it is taken
/// out of the listening state (a socket bound to port 0 would give the port up then). For
/// port 0, a first socket finds a free port and a second binds it explicitly (both with
/// SO_REUSEADDR, which Linux allows while neither listens) before the first is closed.
fn listening_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let bound = |addr: SocketAddr| -> std::io::Result<TcpSocket> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    let socket = if addr.port() == 0 {
        let probe = bound(addr)?;
        let explicit = bound(probe.local_addr()?)?;
        drop(probe);
        explicit
    } else {
        bound(addr)?
    };
    socket.listen(LISTEN_BACKLOG as u32)?.into_std()
}

enum Serving {
    Running {
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    },
    Stopped,
}

/// A running (or paused) API stand-in. Dropping it stops serving.
pub struct ApiServer {
    state: Arc<AppState>,
    addr: SocketAddr,
    /// The one listening socket, open for the server's whole life.
    socket: std::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    ca_pem: String,
    admin_token: String,
    serving: Mutex<Serving>,
    /// `default/kubernetes`: its ClusterIP (the primary service range's first host address)
    /// and the advertised endpoint.
    kubernetes: Option<(IpAddr, SocketAddr)>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Ok(mut serving) = self.serving.try_lock() {
            if let Serving::Running { stop, .. } =
                std::mem::replace(&mut *serving, Serving::Stopped)
            {
                let _ = stop.send(());
            }
        }
    }
}

impl ApiServer {
    /// Builds the store (with the bootstrap RBAC roles), makes the CA and serving certificate,
    /// and starts serving HTTPS on `config.listen`.
    pub async fn start(config: ApiServerConfig) -> Result<ApiServer, ApiServerError> {
        let pod_cidrs = PodCidrAllocator::new(
            config
                .cluster_cidr
                .map(|n| (IpNetwork::V4(n), config.node_cidr_mask)),
            config
                .cluster_cidr_v6
                .map(|n| (IpNetwork::V6(n), config.node_cidr_mask_v6)),
        )?;
        let cidrs: Vec<IpNetwork> = (config.service_cidr.map(IpNetwork::V4).into_iter())
            .chain(config.service_cidr_v6.map(IpNetwork::V6))
            .collect();
        let service_ips = ServiceIpAllocator::new(&cidrs)?;
        let store = Arc::new(Store::new(StoreConfig {
            history_size: config.history_size,
        }));
        let registry = Arc::new(Registry::new(
            store,
            Allocators::new(pod_cidrs, service_ips),
        ));
        let bind_err = |source| ApiServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = listening_socket(config.listen).map_err(bind_err)?;
        let addr = socket.local_addr().map_err(bind_err)?;
        let mut names = config.tls_names.clone();
        names.push(addr.ip().to_string());
        let server_tls = tls::make(&names)?;
        let authn = Arc::new(TokenAuthenticator::default());
        let admin_token = authn.issue(UserInfo::admin());
        let state = Arc::new(AppState {
            registry,
            authn,
            settings: HttpSettings {
                bookmark_interval: config.bookmark_interval,
                default_watch_timeout: config.default_watch_timeout,
                server_address: addr.to_string(),
            },
            audit: Default::default(),
        });
        let server = ApiServer {
            state,
            addr,
            socket,
            tls: tokio_rustls::TlsAcceptor::from(server_tls.config),
            ca_pem: server_tls.ca_pem,
            admin_token,
            serving: Mutex::new(Serving::Stopped),
            kubernetes: config.advertise.and_then(|ep| {
                let first = |n: IpNetwork| n.iter().nth(1);
                let range = config
                    .service_cidr
                    .map(IpNetwork::V4)
                    .or(config.service_cidr_v6.map(IpNetwork::V6))?;
                Some((first(range)?, ep))
            }),
        };
        for object in rbac::bootstrap_objects() {
            server
                .create(object)
                .expect("the bootstrap RBAC objects are valid");
        }
        if let Err(e) = server.reconcile_kubernetes_service() {
            tracing::warn!(error = %e, "cannot create the default/kubernetes Service");
        }
        server.resume().await?;
        tracing::info!(%addr, "Kubernetes API stand-in listening (HTTPS, tokens, RBAC, admission)");
        Ok(server)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR`, the `server:` of the kubeconfig.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM) that signed the serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The administrator's token (group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Issues a token for service account `namespace/name`, bound to a pod on `node` (its
    /// user's extra carries `authentication.kubernetes.io/node-name`). The token is accepted
    /// while the ServiceAccount exists.
    pub fn issue_service_account_token(
        &self,
        namespace: &str,
        name: &str,
        node: Option<&str>,
    ) -> String {
        self.state
            .authn
            .issue(UserInfo::service_account(namespace, name, node))
    }

    /// The object store, for in-process reads and writes (the same the HTTP API uses).
    pub fn store(&self) -> &Arc<Store> {
        self.state.registry.store()
    }

    /// Every distinct (user, verb, API group, resource, allowed) the server has seen.
    pub fn audit(&self) -> BTreeSet<AuditEntry> {
        self.state
            .audit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops listening and drops every open connection (watches end abruptly, new
    /// connections are refused); the store and its resourceVersions stay, and the port stays
    /// reserved for [`ApiServer::resume`]. Idempotent.
    pub async fn stop(&self) {
        let mut serving = self.serving.lock().await;
        if let Serving::Running { stop, task } = std::mem::replace(&mut *serving, Serving::Stopped)
        {
            // Out of the listening state at once: new connections are refused from here on,
            // whoever else holds a copy of the descriptor.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.socket),
                nix::sys::socket::Shutdown::Both,
            );
            let _ = stop.send(());
            let _ = task.await;
            tracing::info!(addr = %self.addr, "Kubernetes API stand-in stopped");
        }
    }

    /// Listens again on the same address, with the same store. Idempotent.
    pub async fn resume(&self) -> Result<(), ApiServerError> {
        let mut serving = self.serving.lock().await;
        if let Serving::Stopped = &*serving {
            let err = |source| ApiServerError::Bind {
                addr: self.addr,
                source,
            };
            nix::sys::socket::listen(
                &self.socket.as_fd(),
                nix::sys::socket::Backlog::new(LISTEN_BACKLOG).map_err(|e| err(e.into()))?,
            )
            .map_err(|e| err(e.into()))?;
            let listener = self
                .socket
                .try_clone()
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                })
                .map_err(err)?;
            *serving = serve(self.state.clone(), self.tls.clone(), listener);
            tracing::info!(addr = %self.addr, "Kubernetes API stand-in serving");
        }
        Ok(())
    }

    pub async fn is_serving(&self) -> bool {
        matches!(&*self.serving.lock().await, Serving::Running { .. })
    }

    /// The kubeconfig text for this server with `token` (the admin's when None).
    pub fn kubeconfig(&self, token: Option<&str>) -> String {
        kubeconfig::kubeconfig_yaml(
            &self.url(),
            &self.ca_pem,
            Some(token.unwrap_or(&self.admin_token)),
        )
    }

    /// Writes the admin's kubeconfig to `path` (mode 0600; context `kwire-lab`, namespace
    /// default).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        kubeconfig::write_private(path, self.kubeconfig(None).as_bytes()).map_err(|source| {
            ApiServerError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Drops the whole event history: watches and paged lists from older resourceVersions get
    /// 410 Gone, as after an etcd compaction.
    pub fn compact_history(&self) {
        self.store().compact();
    }

    /// The served resource for `apiVersion` + `kind` (`"v1"`, `"Node"`).
    pub fn kind(api_version: &str, kind: &str) -> Result<&'static ResourceKind, ApiServerError> {
        resources::by_kind(api_version, kind).ok_or_else(|| ApiServerError::UnknownKind {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
        })
    }

    /// Creates an object in-process, as the lab's control plane; `apiVersion`, `kind` and
    /// (for namespaced kinds) `metadata.namespace` (default `default`) come from the object.
    /// Admission applies. Returns it as stored.
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
        self.state
            .registry
            .create(&UserInfo::control_plane(), kind, ns.as_deref(), object)
    }

    pub fn get(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.store().get(kind, namespace, name)
    }

    /// Reads, changes and writes an object in-process as the lab's control plane.
    fn modify_as_control_plane(
        &self,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        status: bool,
        change: impl FnOnce(Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        self.state.registry.modify(
            &UserInfo::control_plane(),
            kind,
            namespace,
            name,
            status,
            change,
        )
    }

    /// Applies a JSON merge patch (RFC 7386) in-process, to the object or its `status`.
    pub fn merge_patch(
        &self,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.modify_as_control_plane(kind, namespace, name, status, |mut current| {
            patch::merge_patch(&mut current, patch);
            Ok(current)
        })
    }

    /// Replaces an object in-process (PUT semantics: a non-empty `metadata.resourceVersion`
    /// must be the stored one), or its `status` with `status`.
    pub fn update(
        &self,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        object: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.modify_as_control_plane(kind, namespace, name, status, |_| Ok(object))
    }

    /// Applies a JSON patch (RFC 6902) in-process.
    pub fn json_patch(
        &self,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.modify_as_control_plane(kind, namespace, name, status, |current| {
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
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.state.registry.delete(
            &UserInfo::control_plane(),
            kind,
            namespace,
            name,
            None,
            None,
        )
    }

    /// All objects of a kind (`namespace` None: every namespace), newest state.
    pub fn list(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
    ) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .store()
            .list(kind, namespace, &ListOptions::default())?
            .items
            .iter()
            .map(|o| (**o).clone())
            .collect())
    }
}

/// Accepts connections until told to stop, then drops every connection (as a crashed API
/// server would). Each connection does its TLS handshake on its own task.
fn serve(state: Arc<AppState>, tls: tokio_rustls::TlsAcceptor, listener: TcpListener) -> Serving {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let router = http::router(state);
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        // As kube-apiserver's: Go turns Nagle off on every TCP connection, so
                        // no event waits for the client's (possibly delayed) ACK of the last.
                        let _ = stream.set_nodelay(true);
                        let service = TowerToHyperService::new(router.clone());
                        let tls = tls.clone();
                        connections.spawn(async move {
                            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake with an API client failed");
                                    return;
                                }
                                Err(_) => return,
                            };
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
        connections.shutdown().await;
    });
    Serving::Running { stop, task }
}
