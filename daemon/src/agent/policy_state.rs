//! The last NetworkPolicy inputs, saved beside the state file so a restarted agent enforces
//! the last known policy before the API answers (and while it does not).
//!
//! What is saved is read from the policy [`Folder`]'s own index (no second copy of the objects
//! is kept for it): every Namespace, Pod and NetworkPolicy it folds, in the compact encoding of
//! [`crate::policy::PolicyIndex::save_inputs`] (label sets, nodes and port lists written once,
//! addresses as bytes), behind a header with a format version and a checksum. The file is
//! written atomically, mode 0600, only while all three lists are complete, at most every
//! [`SAVE_INTERVAL`] while what the index reads changes (less often when a write is slow, see
//! [`super::persist::pause_after`]), and at graceful shutdown; the encoding
//! is taken under the Folder's lock (tens of milliseconds at 150,000 pods), the write is not.
//!
//! At start [`restore`] reads it straight back into an index (no k8s objects, no JSON), takes
//! the snapshot and swaps it in before any pod is re-attached; the first real lists fold on top
//! (a re-list removes what they no longer list; what they list unchanged costs one comparison).
//! A missing, corrupt or other-version file restores nothing: the data plane then fails closed
//! until the first lists arrive (see [`crate::dataplane::ports::Pods::require_policy`]).

use super::persist::{self, Format, Inputs};
use super::policy::{Folder, FolderStore};
use crate::policy::{PolicyIndex, Scope};
use std::path::Path;
use std::sync::{Arc, MutexGuard};
use tracing::{info, warn};

pub use super::persist::{LoadError, HEADER, SAVE_INTERVAL};

/// Name of the file inside the state directory.
pub const POLICY_STATE_FILE: &str = "policy-state.bin";
/// The file of format 1 (JSON k8s objects, kwire before format 2): not read; removed at start.
pub const LEGACY_POLICY_STATE_FILE: &str = "policy-state.json";
/// Format version written; files of another version are not restored.
pub const POLICY_STATE_VERSION: u32 = 2;
/// The file: its magic, its version, the SHA-256 of the encoded inputs, the encoded inputs.
const FORMAT: Format = Format {
    magic: b"kwire-ps",
    version: POLICY_STATE_VERSION,
    what: "policy state",
};

impl Inputs for Folder {
    const FILE: &'static str = POLICY_STATE_FILE;
    const WHAT: &'static str = "NetworkPolicy inputs";

    fn complete(&self) -> bool {
        self.ready()
    }

    fn encode(&self) -> Vec<u8> {
        encode(&self.index)
    }

    /// In steps of one namespace, each under the lock ([`crate::policy::InputsSave`]): the
    /// policy loop waits one namespace's encoding at most (at 150,000 pods the whole took
    /// ~30 ms, and a relevant change arriving meanwhile waited for all of it). Stops (`None`)
    /// if the inputs stop being complete (a re-list) before the end.
    fn encode_locked<'a>(lock: &dyn Fn() -> MutexGuard<'a, Self>) -> Option<Vec<u8>>
    where
        Self: 'a,
    {
        let mut save = {
            let folder = lock();
            if !folder.ready() {
                return None;
            }
            folder.index.start_save()
        };
        loop {
            let folder = lock();
            if !folder.ready() {
                return None;
            }
            if !save.step(&folder.index) {
                break;
            }
        }
        Some(frame(&save.finish()))
    }
}

/// The policy loop's Folder, shared with the writer that saves what it holds.
pub type Persist = persist::Persist<Folder>;
pub type Shared = Arc<Persist>;

impl FolderStore for Persist {
    fn folder(&self) -> MutexGuard<'_, Folder> {
        self.lock()
    }

    /// A complete, changed set of inputs was folded: the writer saves it (at once, or
    /// [`SAVE_INTERVAL`] or more after its last write).
    fn changed(&self) {
        self.mark_changed();
    }
}

/// The file's bytes for an index's inputs.
pub fn encode(index: &PolicyIndex) -> Vec<u8> {
    frame(&index.save_inputs())
}

/// A file of this format around `body`: the header (magic, version, the body's checksum),
/// then the body. Public for the `policy_state` fuzz target, which frames arbitrary bodies so
/// that they reach the decoder.
pub fn frame(body: &[u8]) -> Vec<u8> {
    FORMAT.frame(body)
}

/// Whether `bytes` start with this format's magic (whatever their version or checksum).
pub fn has_magic(bytes: &[u8]) -> bool {
    FORMAT.has_magic(bytes)
}

/// Reads the saved inputs into a Folder (every kind listed); `Ok(None)` when there is no file.
pub fn load(dir: &Path, node_name: &str) -> Result<Option<Folder>, LoadError> {
    persist::load(dir, POLICY_STATE_FILE, |bytes| decode(bytes, node_name))
}

/// What [`load`] does with the file's bytes: checks the header (magic, version, checksum) and
/// reads the inputs into a Folder of `node_name` (every kind listed). `Err` says why the bytes
/// are not a valid file; damaged or hostile bytes give an error, never a panic. Public for the
/// `policy_state` fuzz target.
pub fn decode(bytes: &[u8], node_name: &str) -> Result<Folder, String> {
    let body = FORMAT.body(bytes)?;
    let index = PolicyIndex::restore_inputs(Scope::Node(node_name.to_string()), body)
        .map_err(|e| e.to_string())?;
    Ok(Folder::restored(index))
}

/// At start, before pods are re-attached: the saved inputs compiled and swapped in, or
/// nothing (an error is logged; the data plane stays fail-closed until the first lists).
/// Returns the Folder (restored or empty) shared with the writer, and whether a saved file
/// was there but could not be restored (a format-1 file of an older kwire counts too).
pub fn restore(
    dir: &Path,
    node_name: &str,
    pods: &crate::dataplane::ports::Pods,
) -> (Shared, bool) {
    let started = std::time::Instant::now();
    let mut failed = false;
    let legacy = dir.join(LEGACY_POLICY_STATE_FILE);
    if legacy.exists() {
        failed = true;
        let removed = std::fs::remove_file(&legacy);
        warn!(path = %legacy.display(), removed = removed.is_ok(), "a NetworkPolicy state file of format 1 (an older kwire) is not read; it is replaced by {POLICY_STATE_FILE} once the API lists arrive");
    }
    let folder = match load(dir, node_name) {
        Ok(Some(mut folder)) => {
            let set = folder.index.snapshot();
            pods.set_policy(Arc::new(set));
            info!(
                pods = folder.index.pod_count(),
                policies = folder.index.policy_count(),
                took_ms = started.elapsed().as_millis() as u64,
                "restored the saved NetworkPolicy inputs; enforcing them before the API answers"
            );
            folder
        }
        Ok(None) => {
            if !failed {
                info!("no saved NetworkPolicy inputs; pods' new flows are dropped (policy_not_synced) until the API lists arrive");
            }
            Folder::new(node_name)
        }
        Err(e) => {
            failed = true;
            warn!(error = %e, "not restoring the saved NetworkPolicy inputs; pods' new flows are dropped (policy_not_synced) until the API lists arrive");
            Folder::new(node_name)
        }
    };
    (Persist::new(dir, folder), failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::objects::{NamespaceView, NetworkPolicyView, PodView};
    use crate::agent::policy::Change;
    use crate::policy::Verdict;
    use kube::runtime::watcher::Event;
    use serde_json::json;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

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

    fn deny() -> NetworkPolicyView {
        serde_json::from_value(json!({
            "metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap()
    }

    /// A deny-all-ingress policy in `x` and one admitting `app=client` on port 80.
    fn inputs() -> Vec<Change> {
        let ns: NamespaceView = serde_json::from_value(json!({
            "metadata": {"name": "x", "labels": {"team": "a"}}
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
            // In (namespace, name) order, as the API lists them and the file holds them: the
            // verdicts name policies by the index's ids, which follow the order folded.
            Change::Policy(Event::InitApply(allow)),
            Change::Policy(Event::InitApply(deny())),
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

    /// The loop's Folder after the inputs, shared as the agent shares it.
    fn live(dir: &Path) -> Shared {
        let persist = Persist::new(dir, Folder::new("n1"));
        for c in inputs() {
            persist.folder().fold(c);
        }
        persist
    }

    #[test]
    fn saved_inputs_restore_the_same_policy() {
        let dir = temp_dir();
        assert!(load(&dir, "n1").unwrap().is_none(), "no file: nothing");
        let persist = live(&dir);
        let live = {
            let mut f = persist.folder();
            assert!(f.ready());
            f.index.snapshot()
        };
        persist.save_if_dirty();
        assert!(!dir.join(POLICY_STATE_FILE).exists(), "nothing changed yet");
        persist.changed();
        persist.save_if_dirty();
        let meta = std::fs::metadata(dir.join(POLICY_STATE_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let bytes = std::fs::read(dir.join(POLICY_STATE_FILE)).unwrap();
        assert!(
            !bytes.windows(7).any(|w| w == b"ignored"),
            "only what policy reads is saved"
        );

        let mut restored = load(&dir, "n1").unwrap().unwrap();
        assert!(restored.ready());
        assert_eq!(restored.index.pod_count(), 3);
        assert_eq!(restored.index.policy_count(), 2);
        let again = restored.index.snapshot();
        assert!(again.has_policies());
        assert_eq!(verdicts(&again), verdicts(&live));
        let allowed: Vec<bool> = verdicts(&live).iter().map(|v| v.is_allowed()).collect();
        assert_eq!(allowed, [true, false, false]);
        // The restored Folder saves what it read.
        let persist = Persist::new(&dir, restored);
        persist.changed();
        persist.save_if_dirty();
        assert_eq!(
            std::fs::metadata(dir.join(POLICY_STATE_FILE))
                .unwrap()
                .len(),
            bytes.len() as u64
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(POLICY_STATE_FILE)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_writer_takes_the_folder_once_per_namespace_and_stops_at_a_relist() {
        let folder = std::sync::Mutex::new(Folder::new("n1"));
        for c in inputs() {
            folder.lock().unwrap().fold(c);
        }
        // Namespace x only: taken to start, for x's step, and to see that none is left.
        let takes = std::cell::Cell::new(0);
        let lock = || {
            takes.set(takes.get() + 1);
            folder.lock().unwrap()
        };
        let bytes = Folder::encode_locked(&lock).expect("complete inputs are encoded");
        assert_eq!(takes.get(), 3);
        assert_eq!(
            bytes,
            encode(&folder.lock().unwrap().index),
            "same as in one go"
        );
        // A re-list begins between two steps: no file from half-listed inputs.
        takes.set(0);
        let relisting = || {
            takes.set(takes.get() + 1);
            let mut f = folder.lock().unwrap();
            if takes.get() == 2 {
                f.fold(Change::Pod(Event::Init));
            }
            f
        };
        assert!(Folder::encode_locked(&relisting).is_none());
    }

    #[test]
    fn a_failed_write_is_counted_and_tried_again() {
        let dir = temp_dir();
        let persist = live(&dir);
        let failed = persist.failures();
        // The state directory gone: the write fails, is counted, and stays due.
        std::fs::remove_dir_all(&dir).unwrap();
        persist.changed();
        persist.save_if_dirty();
        assert_eq!(failed.load(std::sync::atomic::Ordering::Relaxed), 1);
        std::fs::create_dir_all(&dir).unwrap();
        persist.save_if_dirty();
        assert!(
            dir.join(POLICY_STATE_FILE).exists(),
            "written once it can be"
        );
        assert_eq!(failed.load(std::sync::atomic::Ordering::Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_listed_inputs_are_not_saved() {
        let dir = temp_dir();
        let persist = Persist::new(&dir, Folder::new("n1"));
        // Pods and Namespaces listed; NetworkPolicies not yet (saving now would lose them).
        for c in inputs()
            .into_iter()
            .filter(|c| !matches!(c, Change::Policy(_)))
        {
            persist.folder().fold(c);
        }
        persist.changed();
        persist.save_if_dirty();
        assert!(!dir.join(POLICY_STATE_FILE).exists());
        // Once they are listed, the write that was due happens.
        for c in inputs()
            .into_iter()
            .filter(|c| matches!(c, Change::Policy(_)))
        {
            persist.folder().fold(c);
        }
        persist.save_if_dirty();
        assert!(dir.join(POLICY_STATE_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_real_list_replaces_the_restored_objects() {
        let dir = temp_dir();
        let persist = live(&dir);
        persist.changed();
        persist.save_if_dirty();
        let mut folder = load(&dir, "n1").unwrap().unwrap();
        // The API's list: the allow policy is gone.
        for c in [
            Change::Policy(Event::Init),
            Change::Policy(Event::InitApply(deny())),
            Change::Policy(Event::InitDone),
        ] {
            folder.fold(c);
        }
        assert_eq!(folder.index.policy_count(), 1);
        let set = folder.index.snapshot();
        assert!(!verdicts(&set)[0].is_allowed(), "only the deny-all is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_other_version_or_old_format_file_restores_nothing_and_is_counted() {
        let dir = temp_dir();
        let persist = live(&dir);
        let good = encode(&persist.folder().index);
        let mut damaged = good.clone();
        *damaged.last_mut().unwrap() ^= 0x10;
        let mut other_version = good.clone();
        other_version[8..12].copy_from_slice(&9u32.to_le_bytes());
        let v1 = b"{\"version\":1,\"namespaces\":[],\"policies\":[],\"pods\":[]}".to_vec();
        let cases: [(&str, &[u8], &str); 5] = [
            (POLICY_STATE_FILE, &good[..good.len() - 3], "checksum"),
            (POLICY_STATE_FILE, &damaged, "checksum"),
            (POLICY_STATE_FILE, &other_version, "version 9"),
            (POLICY_STATE_FILE, &v1, "not a kwire policy state file"),
            (LEGACY_POLICY_STATE_FILE, &v1, ""),
        ];
        for (name, bytes, why) in cases {
            std::fs::write(dir.join(name), bytes).unwrap();
            if name == POLICY_STATE_FILE {
                let e = load(&dir, "n1").err().expect("an error");
                let text = e.to_string();
                assert!(
                    text.contains(POLICY_STATE_FILE) && text.contains(why),
                    "{text}"
                );
            }
            let pods = crate::dataplane::ports::Pods::new(1, false).unwrap();
            pods.require_policy();
            let (persist, failed) = restore(&dir, "n1", &pods);
            assert!(failed, "{name}: counted");
            assert!(!persist.folder().ready(), "{name}: nothing restored");
            assert!(pods.table().policy_pending, "{name}: fails closed");
            let _ = std::fs::remove_file(dir.join(POLICY_STATE_FILE));
            assert!(
                !dir.join(LEGACY_POLICY_STATE_FILE).exists(),
                "the old format's file is removed"
            );
        }
        // Beside a good file, an old one is removed and counted; the good one is restored.
        std::fs::write(dir.join(POLICY_STATE_FILE), &good).unwrap();
        std::fs::write(dir.join(LEGACY_POLICY_STATE_FILE), &v1).unwrap();
        let pods = crate::dataplane::ports::Pods::new(1, false).unwrap();
        pods.require_policy();
        let (persist, failed) = restore(&dir, "n1", &pods);
        assert!(failed && persist.folder().ready());
        assert!(!pods.table().policy_pending);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A body the checksum vouches for (the digest is not a MAC) but the decoder cannot read:
    /// refused with the decoder's reason and where, counted, nothing restored.
    #[test]
    fn a_hostile_body_behind_a_valid_checksum_is_refused_with_where() {
        // One namespace "a" whose label-set count is as large as the bytes left allow, then
        // no valid label set.
        let mut body = vec![1, 1, b'a', 0, 0xf0, 0x0f];
        body.resize(4096, 0xff);
        let file = frame(&body);
        assert_eq!(
            decode(&file, "n1").err().expect("refused"),
            "integer too long at byte 16"
        );
        let dir = temp_dir();
        std::fs::write(dir.join(POLICY_STATE_FILE), &file).unwrap();
        let text = load(&dir, "n1").err().expect("an error").to_string();
        assert!(
            text.contains(POLICY_STATE_FILE) && text.contains("integer too long at byte 16"),
            "{text}"
        );
        let pods = crate::dataplane::ports::Pods::new(1, false).unwrap();
        pods.require_policy();
        let (persist, failed) = restore(&dir, "n1", &pods);
        assert!(failed && !persist.folder().ready());
        assert!(pods.table().policy_pending, "fails closed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
