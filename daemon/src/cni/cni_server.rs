//! The local socket `kwire-cni` talks to (`<run-dir>/cni.sock`, proto::cni): ADD, CHECK, DEL,
//! STATUS, GC. Root peers only (SO_PEERCRED). Pod records live in `<state-dir>/pods.json`, so a
//! restarted daemon re-attaches the pods' persistent tuns before it serves; DELs the plugin
//! queued while the daemon was down are replayed at start.

use super::ipam::{AttachmentKey, IpamError, IpamStore};
use super::netns::{self, NetnsError};
use super::result::add_result;
use super::{write_atomic, PodAttachment, PodDataPlane, PodRecord};
use crate::io::scm::recv_with_fd;
use crate::io::tun::{check_ifname, dup, TunQueue};
use ipnetwork::IpNetwork;
use kwire_proto::cni::{
    code, Command, Error as CniError, Request, Response, MAX_MESSAGE_BYTES, SUPPORTED_VERSIONS,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// The socket's file name inside the run directory.
pub const SOCKET_NAME: &str = "cni.sock";
/// The IPAM table's file name inside the state directory.
pub const IPAM_FILE: &str = "ipam.json";
/// The pod records' file name inside the state directory.
pub const PODS_FILE: &str = "pods.json";
/// Every request is answered within this; the plugin gives up at 8 s and the CNI runtime
/// expects an answer within 10 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(7_500);
/// Tunnel MTU when neither the configuration's `mtu` nor the daemon says otherwise: 1500 minus
/// the WireGuard overhead over IPv6 (40 + 8 + 32).
pub const DEFAULT_MTU: u32 = 1420;
/// kwire error code (spec: 100 and up are the plugin's): ADD for a (CNI_CONTAINERID,
/// CNI_IFNAME) that is already attached, without a DEL in between.
pub const ALREADY_ATTACHED: u32 = 101;
/// kwire error code: CHECK found the pod's interface not as ADD left it.
pub const CHECK_FAILED: u32 = 102;

/// Where the server keeps things and what it hands out.
#[derive(Debug, Clone)]
pub struct CniServerConfig {
    /// Holds `cni.sock` (created 0700; the socket is 0600). `/run/kwire` in production.
    pub run_dir: PathBuf,
    /// Holds `ipam.json` and `pods.json` (0700). `/var/lib/kwire` in production.
    pub state_dir: PathBuf,
    /// The plugin's `delQueueDir` (default `/var/lib/kwire/cni-del-queue`), replayed at start.
    pub del_queue_dir: PathBuf,
    /// This node's `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNetwork>,
    /// The tunnel MTU, used when the network configuration has no `mtu`.
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("creating directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading pod records {}: {source}", path.display())]
    LoadPods {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pod records {} are not valid JSON ({source}); move the file aside (GC will reconcile)", path.display())]
    CorruptPods {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing pod records {}: {source}", path.display())]
    PersistPods {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listening on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ServerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ServerError::Ipam(e) => e.metric_label(),
            ServerError::Dir { .. } => "dir",
            ServerError::LoadPods { .. } => "load_pods",
            ServerError::CorruptPods { .. } => "corrupt_pods",
            ServerError::PersistPods { .. } => "persist_pods",
            ServerError::Bind { .. } => "bind",
        }
    }
}

/// A pod attachment as the server tracks it.
enum Slot {
    /// An ADD, DEL or GC is working on it.
    Busy,
    /// Attached. `tun` is the server's own handle on the device (a dup of the data plane's),
    /// kept to clear the persist flag on DEL even when the netns path is out of reach.
    Live { record: PodRecord, tun: TunQueue },
}

/// The daemon side of `kwire-cni`.
pub struct CniServer {
    cfg: CniServerConfig,
    dataplane: Arc<dyn PodDataPlane>,
    ipam: IpamStore,
    pods: Mutex<BTreeMap<AttachmentKey, Slot>>,
    ready: AtomicBool,
}

fn err(code: u32, msg: impl Into<String>) -> CniError {
    CniError::new(code, msg)
}

fn make_dir(path: &Path) -> Result<(), ServerError> {
    let e = |source| ServerError::Dir {
        path: path.into(),
        source,
    };
    std::fs::create_dir_all(path).map_err(e)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(e)
}

fn arg(req: &Request, k: &str) -> Option<String> {
    req.args
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

impl CniServer {
    /// Loads IPAM and pod records from the state directory, re-attaches every recorded pod's
    /// tun (calling `dataplane.attach` for each), replays queued DELs, and releases addresses
    /// that no pod holds. Blocking; call before serving. Not ready until [`set_ready`].
    ///
    /// [`set_ready`]: CniServer::set_ready
    pub fn new(
        cfg: CniServerConfig,
        dataplane: Arc<dyn PodDataPlane>,
    ) -> Result<Arc<CniServer>, ServerError> {
        make_dir(&cfg.state_dir)?;
        let ipam = IpamStore::open(&cfg.state_dir.join(IPAM_FILE), &cfg.pod_cidrs)?;
        let pods_path = cfg.state_dir.join(PODS_FILE);
        let records: Vec<PodRecord> = match std::fs::read(&pods_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| ServerError::CorruptPods {
                path: pods_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(ServerError::LoadPods {
                    path: pods_path,
                    source,
                })
            }
        };
        let server = Arc::new(CniServer {
            cfg,
            dataplane,
            ipam,
            pods: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
        });
        // Queued DELs first, so a deleted pod is never handed to the data plane again.
        let (queued, files) = server.read_del_queue();
        let mut records = records;
        records.retain(|r| {
            let Some(del) = queued.iter().find(|q| q.container_id == r.container_id && q.ifname == r.ifname) else { return true };
            let path = if del.netns.is_empty() { r.netns.as_str() } else { del.netns.as_str() };
            if let Err(e) = netns::remove_at(path, &r.tun_name) {
                tracing::warn!(key = %r.key(), error = %e, "queued DEL could not remove the pod's tun");
            }
            tracing::info!(key = %r.key(), "replayed queued DEL");
            false
        });
        for record in records {
            server.restore(record);
        }
        for q in &queued {
            if let Err(e) = server
                .ipam
                .release(&AttachmentKey::new(&q.container_id, &q.ifname))
            {
                tracing::warn!(container_id = %q.container_id, ifname = %q.ifname, error = %e, "queued DEL could not release addresses; GC will");
            }
        }
        for f in files {
            let _ = std::fs::remove_file(f);
        }
        let live: HashSet<AttachmentKey> = server.lock().keys().cloned().collect();
        for (key, ips) in server.ipam.retain(|k| live.contains(k))? {
            tracing::info!(%key, ?ips, "released addresses no pod holds");
        }
        server.persist_pods()?;
        Ok(server)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AttachmentKey, Slot>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-attaches one recorded pod after a restart (recreating its tun if the netns is still
    /// there but the device is not).
    fn restore(&self, record: PodRecord) {
        let key = record.key();
        let tun = match netns::reattach(&record.netns, &record.tun_name) {
            Ok(t) => Ok(t),
            Err(NetnsError::Missing { .. }) => netns::open_netns(&record.netns).and_then(|ns| {
                netns::create(ns.as_fd(), &record.tun_name, &record.ips, record.mtu)
            }),
            Err(e) => Err(e),
        };
        match tun {
            Ok(tun) => {
                if let Err(e) = self.go_live(record, tun) {
                    tracing::warn!(%key, error = %e, "could not re-attach pod tun");
                }
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "pod's network namespace is gone or unusable; forgetting the pod")
            }
        }
    }

    /// Records `tun` as the live interface of `record` and hands it to the data plane.
    fn go_live(&self, record: PodRecord, tun: TunQueue) -> io::Result<()> {
        let mine = TunQueue::from_owned_fd(dup(tun.as_raw_fd())?, tun.offload());
        let pod = PodAttachment {
            container_id: record.container_id.clone(),
            ifname: record.ifname.clone(),
            netns: record.netns.clone(),
            ips: record.ips.clone(),
            tun,
            mtu: record.mtu,
            pod_namespace: record.pod_namespace.clone(),
            pod_name: record.pod_name.clone(),
        };
        self.lock()
            .insert(record.key(), Slot::Live { record, tun: mine });
        self.dataplane.attach(pod);
        Ok(())
    }

    fn persist_pods(&self) -> Result<(), ServerError> {
        let pods = self.lock();
        let records: Vec<&PodRecord> = pods
            .values()
            .filter_map(|s| {
                if let Slot::Live { record, .. } = s {
                    Some(record)
                } else {
                    None
                }
            })
            .collect();
        let path = self.cfg.state_dir.join(PODS_FILE);
        let body = serde_json::to_vec_pretty(&records).expect("pod records serialise");
        write_atomic(&path, &body).map_err(|source| ServerError::PersistPods { path, source })
    }

    /// The DELs the plugin queued while the daemon was down, and the files to delete once
    /// they are applied (unreadable ones are dropped with a warning).
    fn read_del_queue(&self) -> (Vec<Request>, Vec<PathBuf>) {
        let (mut reqs, mut files) = (Vec::new(), Vec::new());
        let Ok(entries) = std::fs::read_dir(&self.cfg.del_queue_dir) else {
            return (reqs, files);
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()))
            {
                Ok(req) if req.command == Command::Del && !req.container_id.is_empty() => {
                    reqs.push(req)
                }
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "queued request is not a DEL; dropped")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable queued DEL; dropped")
                }
            }
            files.push(path);
        }
        (reqs, files)
    }

    /// STATUS answers ok only once this is set (the agent sets it when the data plane runs).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The attached pods.
    pub fn pods(&self) -> Vec<PodRecord> {
        self.lock()
            .values()
            .filter_map(|s| {
                if let Slot::Live { record, .. } = s {
                    Some(record.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    /// The socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.cfg.run_dir.join(SOCKET_NAME)
    }

    /// Creates the run directory (0700) and listens on `cni.sock` (0600), replacing a stale one.
    pub fn listen(&self) -> Result<UnixListener, ServerError> {
        make_dir(&self.cfg.run_dir)?;
        let path = self.socket_path();
        let bind = |source| ServerError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(bind(e)),
            _ => {}
        }
        let l = UnixListener::bind(&path).map_err(bind)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
        Ok(l)
    }

    /// Serves `listener` until `shutdown` completes, then removes the socket file.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.connection(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the CNI socket failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(self.socket_path());
    }

    async fn connection(self: Arc<Self>, mut stream: UnixStream) {
        let resp = match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {
                match tokio::time::timeout(REQUEST_TIMEOUT, self.clone().exchange(&mut stream)).await {
                    Ok(r) => r,
                    Err(_) => Response::Error(err(code::TRY_AGAIN_LATER, format!("kwire daemon did not finish the request within {REQUEST_TIMEOUT:?}; retry"))),
                }
            }
            Ok(c) => {
                tracing::warn!(uid = c.uid(), "refused a CNI request from a non-root peer");
                // Read the request first: a client that writes before it reads (kwire-cni
                // does) would otherwise see a broken pipe instead of this answer.
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), drain_request(&mut stream)).await;
                Response::Error(err(
                    code::INVALID_ENV,
                    format!(
                        "kwire daemon refuses CNI requests from uid {}: only root may call it",
                        c.uid()
                    ),
                ))
            }
            Err(e) => Response::Error(err(
                code::IO_FAILURE,
                format!("reading the peer's credentials: {e}"),
            )),
        };
        let body = serde_json::to_vec(&resp).expect("response serialises");
        let mut msg = (body.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(&msg).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }

    /// Reads one request (and the netns fd riding with it) and answers it.
    async fn exchange(self: Arc<Self>, stream: &mut UnixStream) -> Response {
        let (req, fd) = match read_request(stream).await {
            Ok(r) => r,
            Err(e) => return Response::Error(e),
        };
        match tokio::task::spawn_blocking(move || self.handle(&req, fd)).await {
            Ok(r) => r,
            Err(e) => Response::Error(err(
                code::IO_FAILURE,
                format!("kwire daemon failed handling the request: {e}"),
            )),
        }
    }

    /// Answers one request. Blocking (namespace work, file writes).
    pub fn handle(&self, req: &Request, netns_fd: Option<OwnedFd>) -> Response {
        let r = self.validate(req).and_then(|ver| match req.command {
            Command::Add => self.add(req, &ver, netns_fd),
            Command::Del => self.del(req).map(|()| Value::Null),
            Command::Check => self.check(req, netns_fd).map(|()| Value::Null),
            Command::Status => {
                if self.is_ready() {
                    Ok(Value::Null)
                } else {
                    Err(err(
                        code::NOT_READY,
                        "kwire daemon is starting: the data plane is not ready yet",
                    ))
                }
            }
            Command::Gc => self.gc(req).map(|()| Value::Null),
        });
        match r {
            Ok(v) => Response::Ok(v),
            Err(e) => {
                tracing::info!(command = ?req.command, container_id = %req.container_id, ifname = %req.ifname, code = e.code, error = %e.msg, "CNI request failed");
                Response::Error(e)
            }
        }
    }

    fn validate(&self, req: &Request) -> Result<String, CniError> {
        let ver = req
            .config
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !SUPPORTED_VERSIONS.contains(&ver) {
            return Err(err(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {ver:?} is not supported; use one of {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if matches!(req.command, Command::Add | Command::Del | Command::Check) {
            if req.container_id.is_empty() {
                return Err(err(code::INVALID_ENV, "CNI_CONTAINERID is not set"));
            }
            check_ifname(&req.ifname)
                .map_err(|e| err(code::INVALID_ENV, format!("CNI_IFNAME: {e}")))?;
        }
        Ok(ver.to_string())
    }

    fn mtu(&self, req: &Request) -> Result<u32, CniError> {
        match req.config.get("mtu") {
            None => Ok(self.cfg.mtu),
            Some(m) => m
                .as_u64()
                .filter(|m| (576..=65535).contains(m))
                .map(|m| m as u32)
                .ok_or_else(|| {
                    err(
                        code::INVALID_CONFIG,
                        format!("\"mtu\" must be a number from 576 to 65535, got {m}"),
                    )
                }),
        }
    }

    fn add(&self, req: &Request, ver: &str, netns_fd: Option<OwnedFd>) -> Result<Value, CniError> {
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let fd = netns_fd.ok_or_else(|| {
            err(
                code::INVALID_ENV,
                format!("ADD for {key} came without the pod's netns fd"),
            )
        })?;
        let mtu = self.mtu(req)?;
        {
            let mut pods = self.lock();
            if pods.contains_key(&key) {
                return Err(err(ALREADY_ATTACHED, format!("{key} is already attached: ADD twice without a DEL in between; DEL it first")));
            }
            pods.insert(key.clone(), Slot::Busy);
        }
        let r = self.add_reserved(req, ver, &key, fd.as_fd(), mtu);
        if r.is_err() {
            let mut pods = self.lock();
            if matches!(pods.get(&key), Some(Slot::Busy)) {
                pods.remove(&key);
            }
        }
        r
    }

    fn add_reserved(
        &self,
        req: &Request,
        ver: &str,
        key: &AttachmentKey,
        fd: std::os::fd::BorrowedFd<'_>,
        mtu: u32,
    ) -> Result<Value, CniError> {
        let ips = match self.ipam.allocate(key) {
            Ok(ips) => ips,
            // Held without a pod record (a daemon that died mid-ADD): the key's own, reuse it.
            Err(IpamError::AlreadyAllocated { ips, .. }) => ips,
            Err(e @ (IpamError::Exhausted { .. } | IpamError::NoPodCidrs)) => {
                return Err(err(code::NO_ADDRESS, e.to_string()))
            }
            Err(e) => return Err(err(code::IO_FAILURE, e.to_string())),
        };
        let undo_ipam = || {
            let _ = self.ipam.release(key);
        };
        let tun = match netns::create(fd, &req.ifname, &ips, mtu) {
            Ok(t) => t,
            Err(e) => {
                undo_ipam();
                let c = if matches!(e, NetnsError::Exists { .. }) {
                    code::INVALID_ENV
                } else {
                    code::IO_FAILURE
                };
                return Err(err(c, format!("{key}: {e}")));
            }
        };
        let record = PodRecord {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            ips: ips.clone(),
            tun_name: req.ifname.clone(),
            mtu,
            pod_namespace: arg(req, "K8S_POD_NAMESPACE"),
            pod_name: arg(req, "K8S_POD_NAME"),
        };
        let mine = match dup(tun.as_raw_fd()) {
            Ok(fd) => TunQueue::from_owned_fd(fd, tun.offload()),
            Err(e) => {
                let _ = tun.set_persist(false);
                let _ = netns::remove(fd, &req.ifname);
                undo_ipam();
                return Err(err(
                    code::IO_FAILURE,
                    format!("{key}: duplicating the tun fd: {e}"),
                ));
            }
        };
        self.lock().insert(
            key.clone(),
            Slot::Live {
                record: record.clone(),
                tun: mine,
            },
        );
        if let Err(e) = self.persist_pods() {
            self.lock().insert(key.clone(), Slot::Busy);
            let _ = tun.set_persist(false);
            let _ = netns::remove(fd, &req.ifname);
            undo_ipam();
            return Err(err(code::IO_FAILURE, format!("{key}: {e}")));
        }
        self.dataplane.attach(PodAttachment {
            container_id: record.container_id,
            ifname: record.ifname,
            netns: record.netns,
            ips: ips.clone(),
            tun,
            mtu,
            pod_namespace: record.pod_namespace,
            pod_name: record.pod_name,
        });
        tracing::info!(%key, ?ips, "pod attached");
        Ok(add_result(
            ver,
            &req.ifname,
            &req.netns,
            &ips,
            mtu,
            req.config.get("dns"),
        ))
    }

    /// Takes down one attachment's interface: data plane first, then the device.
    fn teardown(&self, key: &AttachmentKey, record: &PodRecord, tun: TunQueue, netns_path: &str) {
        self.dataplane.detach(&key.container_id, &key.ifname);
        // Not persistent any more: the device goes with the last fd even if its netns is out of reach.
        let _ = tun.set_persist(false);
        drop(tun);
        let path = if netns_path.is_empty() {
            record.netns.as_str()
        } else {
            netns_path
        };
        if let Err(e) = netns::remove_at(path, &record.tun_name) {
            tracing::warn!(%key, error = %e, "removing the pod's tun failed; it goes when its netns does");
        }
    }

    /// DEL: idempotent; succeeds when the netns or the whole attachment is already gone.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let taken = {
            let mut pods = self.lock();
            match pods.get(&key) {
                Some(Slot::Busy) => {
                    return Err(err(
                        code::TRY_AGAIN_LATER,
                        format!("{key}: another request for it is in progress; retry"),
                    ))
                }
                Some(Slot::Live { .. }) => match pods.insert(key.clone(), Slot::Busy) {
                    Some(Slot::Live { record, tun }) => Some((record, tun)),
                    _ => None,
                },
                None => None,
            }
        };
        if let Some((record, tun)) = taken {
            self.teardown(&key, &record, tun, &req.netns);
        }
        let r = self.ipam.release(&key);
        self.lock().remove(&key);
        let p = self.persist_pods();
        r.map_err(|e| err(code::IO_FAILURE, format!("DEL {key}: {e}")))?;
        p.map_err(|e| err(code::IO_FAILURE, format!("DEL {key}: {e}")))?;
        Ok(())
    }

    fn check(&self, req: &Request, netns_fd: Option<OwnedFd>) -> Result<(), CniError> {
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let record = match self.lock().get(&key) {
            Some(Slot::Live { record, .. }) => record.clone(),
            Some(Slot::Busy) => {
                return Err(err(
                    code::TRY_AGAIN_LATER,
                    format!("{key}: another request for it is in progress; retry"),
                ))
            }
            None => {
                return Err(err(
                    code::UNKNOWN_CONTAINER,
                    format!("kwire has no attachment for {key}"),
                ))
            }
        };
        let fd = netns_fd.ok_or_else(|| {
            err(
                code::INVALID_ENV,
                format!("CHECK for {key} came without the pod's netns fd"),
            )
        })?;
        // The runtime's cached result must name the addresses we gave out.
        if let Some(prev) = req
            .config
            .get("prevResult")
            .and_then(|p| p.get("ips"))
            .and_then(Value::as_array)
        {
            for a in prev {
                let addr = a
                    .get("address")
                    .and_then(Value::as_str)
                    .and_then(|s| s.split('/').next())
                    .and_then(|s| s.parse::<IpAddr>().ok());
                if let Some(addr) = addr {
                    if !record.ips.contains(&addr)
                        && (a.get("interface").and_then(Value::as_u64) == Some(0))
                    {
                        return Err(err(
                            CHECK_FAILED,
                            format!(
                                "{key}: prevResult address {addr} is not the one kwire gave ({:?})",
                                record.ips
                            ),
                        ));
                    }
                }
            }
        }
        let ipam_ips = self.ipam.get(&key).unwrap_or_default();
        if ipam_ips != record.ips {
            return Err(err(
                CHECK_FAILED,
                format!(
                    "{key}: IPAM holds {ipam_ips:?}, the pod record {:?}",
                    record.ips
                ),
            ));
        }
        netns::check(fd.as_fd(), &record.tun_name, &record.ips, record.mtu)
            .map_err(|e| err(CHECK_FAILED, format!("CHECK {key}: {e}")))
    }

    /// GC: releases every attachment `cni.dev/valid-attachments` does not list.
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let list = req
            .config
            .get("cni.dev/valid-attachments")
            .and_then(Value::as_array)
            .ok_or_else(|| err(code::INVALID_CONFIG, "GC needs \"cni.dev/valid-attachments\" (a list of {containerID, ifname}) in the configuration"))?;
        let mut valid = HashSet::new();
        for a in list {
            let k: AttachmentKey = serde_json::from_value(a.clone()).map_err(|e| {
                err(
                    code::DECODE_FAILURE,
                    format!("cni.dev/valid-attachments entry {a}: {e}"),
                )
            })?;
            valid.insert(k);
        }
        let stale: Vec<(AttachmentKey, PodRecord, TunQueue)> = {
            let mut pods = self.lock();
            let keys: Vec<AttachmentKey> = pods
                .iter()
                .filter(|(k, s)| matches!(s, Slot::Live { .. }) && !valid.contains(*k))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| match pods.insert(k.clone(), Slot::Busy) {
                    Some(Slot::Live { record, tun }) => Some((k, record, tun)),
                    _ => None,
                })
                .collect()
        };
        let stale_keys: HashSet<AttachmentKey> = stale.iter().map(|(k, _, _)| k.clone()).collect();
        for (k, record, tun) in stale {
            self.teardown(&k, &record, tun, "");
        }
        let busy: HashSet<AttachmentKey> = self
            .lock()
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Busy))
            .map(|(k, _)| k.clone())
            .collect();
        let released = self
            .ipam
            .retain(|k| valid.contains(k) || (busy.contains(k) && !stale_keys.contains(k)));
        {
            let mut pods = self.lock();
            for k in &stale_keys {
                pods.remove(k);
            }
        }
        let p = self.persist_pods();
        let released = released.map_err(|e| err(code::IO_FAILURE, format!("GC: {e}")))?;
        p.map_err(|e| err(code::IO_FAILURE, format!("GC: {e}")))?;
        if !released.is_empty() {
            tracing::info!(
                released = released.len(),
                "GC released attachments not listed as valid"
            );
        }
        Ok(())
    }
}

/// Reads the length-prefixed JSON request and the first fd sent with it.
async fn read_request(stream: &mut UnixStream) -> Result<(Request, Option<OwnedFd>), CniError> {
    let io_err = |e: io::Error| {
        err(
            code::IO_FAILURE,
            format!("reading the request from kwire-cni: {e}"),
        )
    };
    let mut buf = vec![0u8; 64 * 1024];
    let (mut have, fd) = loop {
        stream.readable().await.map_err(io_err)?;
        match stream.try_io(Interest::READABLE, || {
            recv_with_fd(stream.as_raw_fd(), &mut buf)
        }) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io_err(e)),
        }
    };
    while have < 4 {
        let n = stream.read(&mut buf[have..]).await.map_err(io_err)?;
        if n == 0 {
            return Err(err(
                code::DECODE_FAILURE,
                "kwire-cni closed the connection before sending a request",
            ));
        }
        have += n;
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
    if len > MAX_MESSAGE_BYTES {
        return Err(err(
            code::DECODE_FAILURE,
            format!("request of {len} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"),
        ));
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        buf.resize(total, 0);
    }
    if have < total {
        stream
            .read_exact(&mut buf[have..total])
            .await
            .map_err(io_err)?;
    }
    let req: Request = serde_json::from_slice(&buf[4..total]).map_err(|e| {
        err(
            code::DECODE_FAILURE,
            format!("undecodable request from kwire-cni: {e}"),
        )
    })?;
    Ok((req, fd))
}

/// Reads and discards one length-prefixed request (bounded by the protocol's limit).
async fn drain_request(stream: &mut UnixStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let n = u32::from_be_bytes(len).min(kwire_proto::cni::MAX_MESSAGE_BYTES) as u64;
    tokio::io::copy(&mut stream.take(n), &mut tokio::io::sink()).await?;
    Ok(())
}
