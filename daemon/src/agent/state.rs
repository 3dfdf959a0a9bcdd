//! What the agent keeps in its state directory besides the key: the last peer set and this
//! node's pod ranges, so a restart forwards again before the API answers. JSON, written
//! atomically (temp file, fsync, rename), mode 0600.

use crate::agent::external::ExternalPeer;
use crate::agent::peers::DesiredPeer;
use crate::wg::key::PresharedKey;
use ipnetwork::IpNetwork;
use kwire_proto::key::PublicKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "peers.json";
/// Format version written; files of another version are ignored (with a warning).
pub const STATE_VERSION: u32 = 1;

/// The saved state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub pod_cidrs: Vec<IpNetwork>,
    pub mtu: Option<u32>,
    pub peers: BTreeMap<String, DesiredPeer>,
    /// Accepted Peers (the `Peer` resource) as the device had them, by Peer name.
    pub external: BTreeMap<String, ExternalPeer>,
    /// Their preshared keys, by Peer name (the file is 0600 beside the private key).
    pub external_psks: BTreeMap<String, PresharedKey>,
}

#[derive(Serialize, Deserialize)]
struct FileV1 {
    version: u32,
    pod_cidrs: Vec<String>,
    #[serde(default)]
    mtu: Option<u32>,
    peers: Vec<PeerV1>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    external: Vec<ExternalV1>,
}

#[derive(Serialize, Deserialize)]
struct ExternalV1 {
    name: String,
    public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    allowed_ips: Vec<String>,
    #[serde(default)]
    keepalive: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    psk_secret: Option<String>,
    /// The preshared key (hex), as last read from `psk_secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preshared_key: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct PeerV1 {
    node: String,
    public_key: String,
    endpoint: String,
    allowed_ips: Vec<String>,
    #[serde(default)]
    keepalive: u16,
    /// The key the peer rotates to (absent: it does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_public_key: Option<String>,
    /// The relay node the peer is reached through (`endpoint` is the relay's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay: Option<String>,
    /// The peer is behind NAT (this node's relay forwards for it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    behind_nat: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is not valid ({why}); it is ignored and rewritten once the API answers"
    )]
    Invalid { path: PathBuf, why: String },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(path: &Path, why: impl Into<String>) -> StateError {
    StateError::Invalid {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// Reads `dir/peers.json`; `Ok(None)` when there is none.
pub fn load(dir: &Path) -> Result<Option<State>, StateError> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    let f: FileV1 = serde_json::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
    if f.version != STATE_VERSION {
        return Err(invalid(
            &path,
            format!("version {} (this agent reads {STATE_VERSION})", f.version),
        ));
    }
    let net = |s: &String| {
        s.parse::<IpNetwork>()
            .map_err(|_| invalid(&path, format!("bad CIDR {s:?}")))
    };
    let mut st = State {
        pod_cidrs: f.pod_cidrs.iter().map(net).collect::<Result<_, _>>()?,
        mtu: f.mtu,
        peers: BTreeMap::new(),
        external: BTreeMap::new(),
        external_psks: BTreeMap::new(),
    };
    for p in &f.external {
        let bad = |what: &str| invalid(&path, format!("Peer {}: {what}", p.name));
        let peer = ExternalPeer {
            name: p.name.clone(),
            public_key: PublicKey::from_base64(&p.public_key).map_err(|e| bad(&e.to_string()))?,
            endpoint: p
                .endpoint
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|_| bad("bad endpoint"))?,
            allowed_ips: p.allowed_ips.iter().map(net).collect::<Result<_, _>>()?,
            keepalive: p.keepalive,
            psk_secret: p.psk_secret.clone(),
        };
        if let Some(hex) = &p.preshared_key {
            let key = kwire_proto::key::decode_hex32(hex).map_err(|_| bad("bad preshared key"))?;
            st.external_psks
                .insert(p.name.clone(), PresharedKey(zeroize::Zeroizing::new(key)));
        }
        st.external.insert(p.name.clone(), peer);
    }
    for p in f.peers {
        let peer = DesiredPeer {
            public_key: PublicKey::from_base64(&p.public_key)
                .map_err(|e| invalid(&path, format!("peer {}: {e}", p.node)))?,
            endpoint: p
                .endpoint
                .parse()
                .map_err(|_| invalid(&path, format!("peer {}: bad endpoint", p.node)))?,
            allowed_ips: p.allowed_ips.iter().map(net).collect::<Result<_, _>>()?,
            keepalive: p.keepalive,
            next_public_key: p
                .next_public_key
                .as_deref()
                .map(PublicKey::from_base64)
                .transpose()
                .map_err(|e| invalid(&path, format!("peer {}: next key: {e}", p.node)))?,
            relay: p.relay,
            behind_nat: p.behind_nat,
            node: p.node,
        };
        st.peers.insert(peer.node.clone(), peer);
    }
    Ok(Some(st))
}

/// Writes `dir/peers.json` atomically with mode 0600.
pub fn save(dir: &Path, st: &State) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let f = FileV1 {
        version: STATE_VERSION,
        pod_cidrs: st.pod_cidrs.iter().map(ToString::to_string).collect(),
        mtu: st.mtu,
        peers: st
            .peers
            .values()
            .map(|p| PeerV1 {
                node: p.node.clone(),
                public_key: p.public_key.to_base64(),
                endpoint: p.endpoint.to_string(),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                keepalive: p.keepalive,
                next_public_key: p.next_public_key.map(|k| k.to_base64()),
                relay: p.relay.clone(),
                behind_nat: p.behind_nat,
            })
            .collect(),
        external: st
            .external
            .values()
            .map(|p| ExternalV1 {
                name: p.name.clone(),
                public_key: p.public_key.to_base64(),
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                keepalive: p.keepalive,
                psk_secret: p.psk_secret.clone(),
                preshared_key: st
                    .external_psks
                    .get(&p.name)
                    .map(|k| kwire_proto::key::encode_hex(&k.0[..])),
            })
            .collect(),
    };
    // It may hold preshared keys: zeroized once written.
    let text =
        zeroize::Zeroizing::new(serde_json::to_vec_pretty(&f).expect("plain data serializes"));
    write_atomic(dir, STATE_FILE, |out| out.write_all(&text)).map_err(|source| StateError::Write {
        path: path.clone(),
        source,
    })
}

/// How long the writer waits before it tries a failed write again (unless a newer set comes
/// first).
pub const WRITE_RETRY: Duration = Duration::from_secs(10);

/// Writes the state file on a thread of its own ("kwire-state"), so that the planner hands a
/// set over and goes on: encoding every peer and the write's two fsyncs took the planner
/// ~10–15 ms at 5,000 peers, and as long as the disk takes on a busy node, during which no
/// Node change reached the data plane. Sets handed over while a write runs are not queued
/// behind it: the next write takes the newest. A failed write is logged and tried again after
/// [`WRITE_RETRY`] (or with the next set). [`Writer::finish`] writes what is left and waits for
/// it, at shutdown. Were no thread to be had, each set is written where it is handed over.
pub struct Writer {
    dir: PathBuf,
    tx: Option<mpsc::Sender<State>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Writes that failed, so far.
    failed: Arc<AtomicU64>,
}

impl Writer {
    /// A writer for `dir`'s state file that retries a failed write after `retry`.
    pub fn start(dir: &Path, retry: Duration) -> Writer {
        let (tx, rx) = mpsc::channel();
        let to = dir.to_path_buf();
        let failed = Arc::new(AtomicU64::new(0));
        let count = failed.clone();
        let thread = std::thread::Builder::new()
            .name("kwire-state".into())
            .spawn(move || write_loop(&to, &rx, retry, &count));
        let (tx, thread) = match thread {
            Ok(thread) => (Some(tx), Some(thread)),
            Err(e) => {
                warn!(error = %e, "no thread for the state file's writer; the planner writes it itself");
                (None, None)
            }
        };
        Writer {
            dir: dir.to_path_buf(),
            tx,
            thread,
            failed,
        }
    }

    /// Hands `st` over to be written (at once, unless a write is running: then after it).
    pub fn submit(&self, st: State) {
        let st = match &self.tx {
            Some(tx) => match tx.send(st) {
                Ok(()) => return,
                // The thread is gone (it does not end before `finish`): written here.
                Err(mpsc::SendError(st)) => st,
            },
            None => st,
        };
        write(&self.dir, &st, &self.failed);
    }

    /// Writes that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The count of failed writes (for `/metrics`).
    pub fn failures(&self) -> Arc<AtomicU64> {
        self.failed.clone()
    }

    /// Writes what was handed over and not yet written, and waits for it; later sets are
    /// written where they are handed over.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The writer's thread: writes the newest set handed over, until the sender is gone and
/// everything handed over is written (or failed once more).
fn write_loop(dir: &Path, rx: &mpsc::Receiver<State>, retry: Duration, failed: &AtomicU64) {
    let mut pending: Option<State> = None;
    loop {
        let next = match pending {
            Some(_) => rx.recv_timeout(retry),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let closed = match next {
            Ok(st) => {
                pending = Some(st);
                false
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        // What came meanwhile: only the newest is written.
        while let Ok(st) = rx.try_recv() {
            pending = Some(st);
        }
        if let Some(st) = pending.take() {
            if !write(dir, &st, failed) {
                pending = Some(st);
            }
        }
        if closed {
            return;
        }
    }
}

/// [`save`], logged, a failure counted in `failed`; whether it was written.
fn write(dir: &Path, st: &State, failed: &AtomicU64) -> bool {
    let started = Instant::now();
    match save(dir, st) {
        Ok(()) => {
            debug!(
                peers = st.peers.len(),
                took_us = started.elapsed().as_micros() as u64,
                "peer set saved"
            );
            true
        }
        Err(e) => {
            failed.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "saving the peer set; tried again with the next set or after a pause");
            false
        }
    }
}

/// Writes `dir/name` atomically (a temp file beside it, fsync, rename, fsync of the
/// directory) with mode 0600; `write` fills the temp file.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let run = || -> std::io::Result<()> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        write(&mut out)?;
        out.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    run().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn round_trip_atomic_0600() {
        let dir = scratch("kwire-state");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), None);
        let mut st = State {
            pod_cidrs: vec![
                "10.244.0.0/24".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
            ],
            mtu: Some(1420),
            peers: BTreeMap::new(),
            external: BTreeMap::new(),
            external_psks: BTreeMap::new(),
        };
        // A Peer with a preshared key, one without an endpoint.
        for (i, n) in ["laptop", "phone"].iter().enumerate() {
            st.external.insert(
                n.to_string(),
                ExternalPeer {
                    name: n.to_string(),
                    public_key: PublicKey([i as u8 + 7; 32]),
                    endpoint: (i == 0).then(|| "203.0.113.9:40000".parse().unwrap()),
                    allowed_ips: vec![format!("198.51.100.{}/32", i + 1).parse().unwrap()],
                    keepalive: 25,
                    psk_secret: (i == 0).then(|| "laptop-psk".to_string()),
                },
            );
        }
        st.external_psks.insert(
            "laptop".into(),
            PresharedKey(zeroize::Zeroizing::new([0x5a; 32])),
        );
        for (i, n) in ["b", "c"].iter().enumerate() {
            st.peers.insert(
                n.to_string(),
                DesiredPeer {
                    node: n.to_string(),
                    public_key: PublicKey([i as u8 + 2; 32]),
                    next_public_key: None,
                    endpoint: format!("192.0.2.{}:51820", i + 2).parse().unwrap(),
                    allowed_ips: vec![
                        format!("10.244.{}.0/24", i + 1).parse().unwrap(),
                        "fd00:1::/64".parse().unwrap(),
                    ],
                    keepalive: 25,
                    relay: (i == 1).then(|| "r".to_string()),
                    behind_nat: i == 1,
                },
            );
        }
        save(&dir, &st).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(st.clone()));
        assert_eq!(
            std::fs::metadata(dir.join(STATE_FILE)).unwrap().mode() & 0o777,
            0o600
        );
        // Overwrite: still one file, no temp left behind.
        st.peers.remove("b");
        save(&dir, &st).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(st));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        // A corrupt file is an error naming the path, not a panic.
        std::fs::write(dir.join(STATE_FILE), b"{\"version\":1,").unwrap();
        let e = load(&dir).unwrap_err();
        assert!(e.to_string().contains(STATE_FILE), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory of its own under the temp dir (not created).
    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            rand_core::RngCore::next_u32(&mut rand_core::OsRng)
        ))
    }

    fn with_mtu(mtu: u32) -> State {
        State {
            mtu: Some(mtu),
            ..State::default()
        }
    }

    #[test]
    fn the_writer_writes_the_newest_set_and_all_of_it_by_finish() {
        let dir = scratch("kwire-state-writer");
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = Writer::start(&dir, Duration::from_secs(60));
        for mtu in 1000..1100 {
            w.submit(with_mtu(mtu));
        }
        w.finish();
        assert_eq!(load(&dir).unwrap(), Some(with_mtu(1099)));
        // After finish, a set is written where it is handed over.
        w.submit(with_mtu(1300));
        assert_eq!(load(&dir).unwrap(), Some(with_mtu(1300)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_is_tried_again() {
        let dir = scratch("kwire-state-retry");
        // No directory yet: the first write fails.
        let mut w = Writer::start(&dir, Duration::from_millis(20));
        w.submit(with_mtu(1280));
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.failed() == 0 {
            assert!(Instant::now() < deadline, "the write did not fail");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::create_dir_all(&dir).unwrap();
        while load(&dir).unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the failed write was not tried again"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(load(&dir).unwrap(), Some(with_mtu(1280)));
        w.finish();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
