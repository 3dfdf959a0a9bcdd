//! The last NetworkPolicy inputs, saved beside the state file so a restarted agent enforces
//! the last known policy before the API answers (and while it does not).
//!
//! The saved objects are the stripped views the policy [`Folder`] folds (see
//! [`super::objects`]), kept as the watches deliver them and written as k8s JSON: JSON,
//! atomically, mode 0600, at most every [`SAVE_INTERVAL`] while what the index reads changes,
//! and at graceful shutdown. At start [`restore`] folds them into a [`Folder`] as one list of
//! each kind; the first real lists replace them (the Folder's re-list removes what they no
//! longer list). A missing or unreadable file restores nothing: the data plane then fails
//! closed until the first lists arrive (see [`crate::dataplane::ports::Pods::require_policy`]).

use super::objects::{NamespaceView, NetworkPolicyView, PodView};
use super::policy::{key_of, Change, Folder, Recorder};
use super::state::write_atomic;
use kube::runtime::watcher::Event;
use kube::Resource;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Name of the file inside the state directory.
pub const POLICY_STATE_FILE: &str = "policy-state.json";
/// Format version written; files of another version are not restored.
pub const POLICY_STATE_VERSION: u32 = 1;
/// At most one write per interval (a write at 150,000 pods serializes all of them).
pub const SAVE_INTERVAL: Duration = Duration::from_secs(10);

type Key = (String, String);

/// The objects of one kind as last delivered, each as its k8s JSON (a few hundred bytes for a
/// Pod; the view itself takes several times that), and during a list the keys it delivered.
struct Objects<V> {
    by_key: BTreeMap<Key, Box<str>>,
    listing: Option<HashSet<Key>>,
    /// The view's k8s JSON.
    json: fn(&V) -> String,
}

impl<V: Resource> Objects<V> {
    fn new(json: fn(&V) -> String) -> Self {
        Objects {
            by_key: BTreeMap::new(),
            listing: None,
            json,
        }
    }

    fn record(&mut self, ev: &Event<V>) {
        let key = |o: &V| key_of(o.meta());
        match ev {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(o) => {
                if let Some(seen) = self.listing.as_mut() {
                    seen.insert(key(o));
                }
                self.by_key.insert(key(o), (self.json)(o).into());
            }
            Event::InitDone => {
                if let Some(seen) = self.listing.take() {
                    self.by_key.retain(|k, _| seen.contains(k));
                }
            }
            Event::Apply(o) => {
                self.by_key.insert(key(o), (self.json)(o).into());
            }
            Event::Delete(o) => {
                self.by_key.remove(&key(o));
            }
        }
    }

    /// `"name":[...]` of the file.
    fn write(&self, name: &str, out: &mut impl Write) -> std::io::Result<()> {
        write!(out, "\"{name}\":[")?;
        for (i, o) in self.by_key.values().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            out.write_all(o.as_bytes())?;
        }
        out.write_all(b"]")
    }
}

/// The JSON of a view as its k8s type (plain data: it serializes).
fn k8s_json<T: Serialize>(o: T) -> String {
    serde_json::to_string(&o).expect("k8s objects serialize")
}

/// The policy inputs as last delivered; shared by the policy loop (which records) and the
/// writer (which saves).
pub struct Store {
    dir: PathBuf,
    pods: Objects<PodView>,
    namespaces: Objects<NamespaceView>,
    policies: Objects<NetworkPolicyView>,
    /// Something policy reads changed since the last write.
    dirty: bool,
}

/// The Store as the policy loop and the writer share it.
pub struct Persist {
    store: Mutex<Store>,
    /// Wakes the writer when the Store became dirty.
    changed: tokio::sync::Notify,
}

pub type Shared = Arc<Persist>;

impl Persist {
    pub fn new(store: Store) -> Shared {
        Arc::new(Persist {
            store: Mutex::new(store),
            changed: tokio::sync::Notify::new(),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Recorder for Persist {
    fn record(&self, change: &Change) {
        self.lock().record(change);
    }

    /// A complete, changed set of inputs was folded: the writer saves it (at once, or
    /// [`SAVE_INTERVAL`] after its last write).
    fn changed(&self) {
        self.lock().mark_dirty();
        self.changed.notify_one();
    }
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Store {
            dir: dir.to_path_buf(),
            pods: Objects::new(|v| k8s_json(v.clone().into_k8s())),
            namespaces: Objects::new(|v| k8s_json(v.clone().into_k8s())),
            policies: Objects::new(|v| k8s_json(v.clone().into_k8s())),
            dirty: false,
        }
    }

    /// Keeps what a watch item delivers (before the Folder consumes it).
    pub fn record(&mut self, change: &Change) {
        match change {
            Change::Pod(ev) => self.pods.record(ev),
            Change::Namespace(ev) => self.namespaces.record(ev),
            Change::Policy(ev) => self.policies.record(ev),
            Change::Error(..) => {}
        }
    }

    /// What the index reads changed: the next write is due.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Writes the file if something changed since the last write.
    pub fn save_if_dirty(&mut self) {
        if !self.dirty {
            return;
        }
        match self.save() {
            Ok(()) => {
                self.dirty = false;
                debug!(pods = self.pods.by_key.len(), "NetworkPolicy inputs saved");
            }
            Err(e) => {
                warn!(path = %self.dir.join(POLICY_STATE_FILE).display(), error = %e, "cannot save the NetworkPolicy inputs; a restart before the API answers fails closed");
            }
        }
    }

    fn save(&self) -> std::io::Result<()> {
        write_atomic(&self.dir, POLICY_STATE_FILE, |out| {
            let mut w = std::io::BufWriter::new(out);
            write!(w, "{{\"version\":{POLICY_STATE_VERSION},")?;
            self.namespaces.write("namespaces", &mut w)?;
            w.write_all(b",")?;
            self.policies.write("policies", &mut w)?;
            w.write_all(b",")?;
            self.pods.write("pods", &mut w)?;
            w.write_all(b"}")?;
            w.flush()
        })
    }
}

#[derive(Deserialize)]
struct FileIn {
    version: u32,
    namespaces: Vec<NamespaceView>,
    policies: Vec<NetworkPolicyView>,
    pods: Vec<PodView>,
}

/// Why nothing was restored.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid ({why}); it is rewritten once the API answers")]
    Invalid { path: PathBuf, why: String },
}

/// Reads the saved inputs into a Folder (as one complete list of each kind) and a Store that
/// holds them; `Ok(None)` when there is no file.
pub fn load(dir: &Path, node_name: &str) -> Result<Option<(Folder, Store)>, LoadError> {
    let path = dir.join(POLICY_STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path, source }),
    };
    let invalid = |why: String| LoadError::Invalid {
        path: path.clone(),
        why,
    };
    let file: FileIn = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if file.version != POLICY_STATE_VERSION {
        return Err(invalid(format!(
            "version {} (this agent reads {POLICY_STATE_VERSION})",
            file.version
        )));
    }
    let mut folder = Folder::new(node_name);
    let mut store = Store::new(dir);
    let mut feed = |change: Change| {
        store.record(&change);
        folder.fold(change);
    };
    feed(Change::Namespace(Event::Init));
    for o in file.namespaces {
        feed(Change::Namespace(Event::InitApply(o)));
    }
    feed(Change::Namespace(Event::InitDone));
    feed(Change::Policy(Event::Init));
    for o in file.policies {
        feed(Change::Policy(Event::InitApply(o)));
    }
    feed(Change::Policy(Event::InitDone));
    feed(Change::Pod(Event::Init));
    for o in file.pods {
        feed(Change::Pod(Event::InitApply(o)));
    }
    feed(Change::Pod(Event::InitDone));
    Ok(Some((folder, store)))
}

/// At start, before pods are re-attached: the saved inputs compiled and swapped in, or
/// nothing (an error is logged; the data plane stays fail-closed until the first lists).
/// Returns the Folder to go on from, the Store to record into, and whether a saved file was
/// there but could not be restored.
pub fn restore(
    dir: &Path,
    node_name: &str,
    pods: &crate::dataplane::ports::Pods,
) -> (Option<Folder>, Shared, bool) {
    let mut failed = false;
    let (folder, store) = match load(dir, node_name) {
        Ok(Some((mut folder, store))) => {
            let set = folder.index.snapshot();
            pods.set_policy(Arc::new(set));
            info!(
                pods = folder.index.pod_count(),
                policies = folder.index.policy_count(),
                "restored the saved NetworkPolicy inputs; enforcing them before the API answers"
            );
            (Some(folder), store)
        }
        Ok(None) => {
            info!("no saved NetworkPolicy inputs; pods' new flows are dropped (policy_not_synced) until the API lists arrive");
            (None, Store::new(dir))
        }
        Err(e) => {
            failed = true;
            warn!(error = %e, "not restoring the saved NetworkPolicy inputs; pods' new flows are dropped (policy_not_synced) until the API lists arrive");
            (None, Store::new(dir))
        }
    };
    (folder, Persist::new(store), failed)
}

/// Writes the file when the inputs changed, at most once per [`SAVE_INTERVAL`] (the first
/// change at once: a restart soon after the first lists finds them); runs until aborted.
pub async fn writer(persist: Shared) {
    loop {
        persist.changed.notified().await;
        let p = persist.clone();
        let _ = tokio::task::spawn_blocking(move || p.lock().save_if_dirty()).await;
        tokio::time::sleep(SAVE_INTERVAL).await;
    }
}

/// The last write, at graceful shutdown.
pub fn flush(persist: &Shared) {
    persist.lock().save_if_dirty();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Verdict;
    use serde_json::json;
    use std::os::unix::fs::MetadataExt;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kwire-policy-state-{}-{}",
            std::process::id(),
            rand_core::RngCore::next_u32(&mut rand_core::OsRng)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pod(name: &str, node: &str, ip: &str, app: &str) -> PodView {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "x", "resourceVersion": "1",
                "labels": {"app": app}, "annotations": {"big": "ignored"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    /// A deny-all-ingress policy in `x` and one admitting `app=client` on port 80.
    fn inputs() -> Vec<Change> {
        let ns: NamespaceView = serde_json::from_value(json!({
            "metadata": {"name": "x", "labels": {"team": "a"}}
        }))
        .unwrap();
        let deny: NetworkPolicyView = serde_json::from_value(json!({
            "metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let allow: NetworkPolicyView = serde_json::from_value(json!({
            "metadata": {"name": "allow", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "ports": [{"port": "http"}]}]}
        }))
        .unwrap();
        vec![
            Change::Namespace(Event::Init),
            Change::Namespace(Event::InitApply(ns)),
            Change::Namespace(Event::InitDone),
            Change::Policy(Event::Init),
            // In (namespace, name) order, as the API lists and the file holds them: the
            // verdicts name policies by the index's ids, which follow the order folded.
            Change::Policy(Event::InitApply(allow)),
            Change::Policy(Event::InitApply(deny)),
            Change::Policy(Event::InitDone),
            Change::Pod(Event::Init),
            Change::Pod(Event::InitApply(pod("client", "n2", "10.0.1.3", "client"))),
            Change::Pod(Event::InitApply(pod("other", "n2", "10.0.1.4", "other"))),
            Change::Pod(Event::InitApply(pod("server", "n1", "10.0.0.2", "server"))),
            Change::Pod(Event::InitDone),
        ]
    }

    fn verdicts(set: &crate::policy::PolicySet) -> Vec<Verdict> {
        let tcp = crate::policy::Protocol::from_ip_protocol(6);
        let ip = |s: &str| s.parse().unwrap();
        [("10.0.1.3", 80), ("10.0.1.4", 80), ("10.0.1.3", 81)]
            .iter()
            .map(|(src, port)| set.ingress_verdict(ip(src), ip("10.0.0.2"), tcp, *port))
            .collect()
    }

    #[test]
    fn saved_inputs_restore_the_same_policy() {
        let dir = temp_dir();
        assert!(load(&dir, "n1").unwrap().is_none(), "no file: nothing");
        let mut folder = Folder::new("n1");
        let mut store = Store::new(&dir);
        for c in inputs() {
            store.record(&c);
            folder.fold(c);
        }
        assert!(folder.ready());
        let live = folder.index.snapshot();
        store.save_if_dirty();
        assert!(!dir.join(POLICY_STATE_FILE).exists(), "nothing changed yet");
        store.mark_dirty();
        store.save_if_dirty();
        let meta = std::fs::metadata(dir.join(POLICY_STATE_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(dir.join(POLICY_STATE_FILE)).unwrap();
        assert!(
            !text.contains("ignored"),
            "only the stripped views are saved"
        );

        let (mut restored, store2) = load(&dir, "n1").unwrap().unwrap();
        assert!(restored.ready());
        assert_eq!(restored.index.pod_count(), 3);
        assert_eq!(restored.index.policy_count(), 2);
        let again = restored.index.snapshot();
        assert!(again.has_policies());
        assert_eq!(verdicts(&again), verdicts(&live));
        let allowed: Vec<bool> = verdicts(&live).iter().map(|v| v.is_allowed()).collect();
        assert_eq!(allowed, [true, false, false]);
        // The store read back writes the same file.
        let mut store2 = store2;
        store2.mark_dirty();
        store2.save_if_dirty();
        assert_eq!(
            std::fs::read_to_string(dir.join(POLICY_STATE_FILE)).unwrap(),
            text
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(POLICY_STATE_FILE)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_real_list_replaces_the_restored_objects() {
        let dir = temp_dir();
        let mut store = Store::new(&dir);
        let mut folder = Folder::new("n1");
        for c in inputs() {
            store.record(&c);
            folder.fold(c);
        }
        store.mark_dirty();
        store.save_if_dirty();
        let (mut folder, mut store) = load(&dir, "n1").unwrap().unwrap();
        // The API's list: the allow policy is gone.
        let now = [
            Change::Policy(Event::Init),
            Change::Policy(Event::InitApply(
                serde_json::from_value(json!({
                    "metadata": {"name": "deny", "namespace": "x"},
                    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
                }))
                .unwrap(),
            )),
            Change::Policy(Event::InitDone),
        ];
        for c in now {
            store.record(&c);
            folder.fold(c);
        }
        assert_eq!(folder.index.policy_count(), 1);
        assert_eq!(store.policies.by_key.len(), 1);
        let set = folder.index.snapshot();
        assert!(!verdicts(&set)[0].is_allowed(), "only the deny-all is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_restores_nothing_and_says_where() {
        let dir = temp_dir();
        for bad in [
            &b"{\"version\":1,"[..],
            b"{\"version\":9,\"namespaces\":[],\"policies\":[],\"pods\":[]}",
        ] {
            std::fs::write(dir.join(POLICY_STATE_FILE), bad).unwrap();
            let e = load(&dir, "n1").err().expect("an error");
            assert!(e.to_string().contains(POLICY_STATE_FILE), "{e}");
            let pods = crate::dataplane::ports::Pods::new(1, false).unwrap();
            pods.require_policy();
            let (folder, _, failed) = restore(&dir, "n1", &pods);
            assert!(folder.is_none() && failed);
            assert!(pods.table().policy_pending, "fails closed");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
