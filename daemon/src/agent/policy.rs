//! NetworkPolicy for the packet loop: one watch each on Pods, Namespaces and NetworkPolicies
//! (cluster wide, objects stripped while parsing, see [`super::objects`]), folded change by
//! change into a [`PolicyIndex`] scoped to this node; after each burst of changes the new
//! snapshot is swapped in. An update that changes nothing policy reads (a status heartbeat, an
//! annotation) is dropped after one comparison and swaps nothing. No snapshot is taken before
//! all three lists have been read once; until then the inputs saved by the last run are in
//! force, or, without them, pods' new flows are dropped (the agent's `policy_state` module).
//!
//! API etiquette: each kind is listed once (pages of [`super::lister::PAGE_SIZE`], the next
//! page asked for as soon as the one before has arrived, see [`super::lister`]), then watched
//! from that resourceVersion with bookmarks, resuming from the last one seen when a watch ends;
//! only a 410 Gone makes it list again. Failures back off
//! exponentially (see [`super::WatchBackoff`]). The agent never writes Pods, Namespaces or NetworkPolicies.

use super::objects::{NamespaceView, NetworkPolicyView, PodView};
use crate::dataplane::ports::Pods;
use crate::policy::{Namespace, Pod, Policy, PolicyIndex, Scope};
use futures::{FutureExt, StreamExt};
use kube::runtime::watcher::Event;
use kube::runtime::WatchStreamExt;
use kube::Client;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Changes folded into the index before a snapshot is swapped in, at most: bounds how long a
/// change waits behind a burst (a few milliseconds of folding).
pub const MAX_BATCH: usize = 1024;
/// At most this many problem lines (unreadable Pods, invalid policy parts) per
/// [`PROBLEM_LOG_INTERVAL`]; the rest are counted in one line.
pub const PROBLEM_LOG_BURST: u32 = 10;
pub const PROBLEM_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// The kinds watched, as indexes into per-kind state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pods = 0,
    Namespaces = 1,
    NetworkPolicies = 2,
}

impl Kind {
    fn name(self) -> &'static str {
        ["Pods", "Namespaces", "NetworkPolicies"][self as usize]
    }
}

/// One item of the merged watch streams.
pub enum Change {
    Pod(Event<PodView>),
    Namespace(Event<NamespaceView>),
    Policy(Event<NetworkPolicyView>),
    /// A watched update the Pod sieve dropped undecoded: nothing to fold.
    Unchanged,
    Error(Kind, String),
}

impl Change {
    /// From a watch (not a list, not an error): what paces the loop's reads.
    fn is_watch_event(&self) -> bool {
        use super::lister::is_watch_event;
        match self {
            Change::Pod(ev) => is_watch_event(ev),
            Change::Namespace(ev) => is_watch_event(ev),
            Change::Policy(ev) => is_watch_event(ev),
            Change::Unchanged => true,
            Change::Error(..) => false,
        }
    }
}

fn watch<K>(
    client: Client,
    kind: Kind,
    wrap: fn(Event<K>) -> Change,
    sieve: Option<Arc<dyn super::lister::Sieve>>,
) -> impl futures::Stream<Item = Change> + Send
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    super::lister::watch::<K>(client, sieve)
        .backoff(super::WatchBackoff::default())
        .map(move |r| match r {
            Ok(super::lister::Seen::Event(ev)) => wrap(ev),
            Ok(super::lister::Seen::Unchanged) => Change::Unchanged,
            Err(e) => Change::Error(kind, e.to_string()),
        })
}

/// Rate-limited problem lines.
struct ProblemLog {
    since: Instant,
    logged: u32,
    suppressed: u32,
}

impl ProblemLog {
    fn new() -> Self {
        ProblemLog {
            since: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    fn warn(&mut self, problem: &dyn std::fmt::Display) {
        if self.since.elapsed() >= PROBLEM_LOG_INTERVAL {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "more NetworkPolicy input problems were not logged"
                );
            }
            *self = ProblemLog::new();
        }
        if self.logged < PROBLEM_LOG_BURST {
            self.logged += 1;
            warn!(problem = %problem, "NetworkPolicy input read fail-closed or skipped");
        } else {
            self.suppressed += 1;
        }
    }
}

/// The watch events folded into the index, and what the watches have delivered so far.
pub struct Folder {
    pub index: PolicyIndex,
    /// Per kind: a complete list has been read.
    listed: [bool; 3],
    /// Per kind, during a re-list: the objects it has delivered so far (the others are gone
    /// at its end). `None` outside a re-list, and during a first list (nothing to remove).
    relist: [Option<HashSet<(String, String)>>; 3],
    /// Per kind: a list is in progress.
    listing: [bool; 3],
    problems: ProblemLog,
    last_error: [Option<Instant>; 3],
}

/// `(namespace, name)` of an object (empty for a missing one).
pub(super) fn key_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Folder {
    /// A Folder holding `index` (the saved inputs) as complete lists of every kind: its
    /// snapshot may be taken, and the first real lists replace it (see [`Folder::fold`]).
    pub fn restored(index: PolicyIndex) -> Self {
        Folder {
            index,
            listed: [true; 3],
            relist: [None, None, None],
            listing: [false; 3],
            problems: ProblemLog::new(),
            last_error: [None; 3],
        }
    }

    pub fn new(node_name: &str) -> Self {
        Folder {
            index: PolicyIndex::new(Scope::Node(node_name.to_string())),
            listed: [false; 3],
            relist: [None, None, None],
            listing: [false; 3],
            problems: ProblemLog::new(),
            last_error: [None; 3],
        }
    }

    /// Whether a snapshot may be taken: every kind listed once, no re-list half done.
    pub fn ready(&self) -> bool {
        self.listed.iter().all(|l| *l) && !self.listing.iter().any(|l| *l)
    }

    /// Folds one watch item into the index.
    pub fn fold(&mut self, change: Change) {
        match change {
            Change::Pod(ev) => self.event(Kind::Pods, ev, Self::apply_pod, |ix, (ns, n)| {
                ix.delete_pod(ns, n)
            }),
            Change::Namespace(ev) => {
                self.event(Kind::Namespaces, ev, Self::apply_namespace, |ix, (_, n)| {
                    ix.delete_namespace(n)
                })
            }
            Change::Policy(ev) => self.event(
                Kind::NetworkPolicies,
                ev,
                Self::apply_policy,
                |ix, (ns, n)| ix.delete_policy(ns, n),
            ),
            Change::Unchanged => {}
            Change::Error(kind, e) => {
                let last = &mut self.last_error[kind as usize];
                if last.is_none_or(|t| t.elapsed() >= super::WATCH_ERROR_LOG_INTERVAL) {
                    warn!(error = %e, "watching {} failed; retrying with backoff, the last policy stays in force", kind.name());
                    *last = Some(Instant::now());
                }
            }
        }
    }

    fn event<K: kube::Resource>(
        &mut self,
        kind: Kind,
        ev: Event<K>,
        apply: fn(&mut Self, K),
        delete: fn(&mut PolicyIndex, (&str, &str)) -> bool,
    ) {
        let k = kind as usize;
        match ev {
            Event::Init => {
                self.listing[k] = true;
                let known = match kind {
                    Kind::Pods => self.index.pod_count() > 0,
                    Kind::Namespaces => self.index.namespace_names().next().is_some(),
                    Kind::NetworkPolicies => self.index.policy_count() > 0,
                };
                self.relist[k] = known.then(HashSet::new);
            }
            Event::InitApply(o) => {
                if let Some(seen) = self.relist[k].as_mut() {
                    seen.insert(key_of(o.meta()));
                }
                apply(self, o);
            }
            Event::InitDone => {
                if let Some(seen) = self.relist[k].take() {
                    let gone: Vec<(String, String)> = match kind {
                        Kind::Pods => self
                            .index
                            .pod_names()
                            .map(|(ns, n)| (ns.to_string(), n.to_string()))
                            .collect(),
                        Kind::Namespaces => self
                            .index
                            .namespace_names()
                            .map(|n| (String::new(), n.to_string()))
                            .collect(),
                        Kind::NetworkPolicies => self
                            .index
                            .policy_names()
                            .map(|(ns, n)| (ns.to_string(), n.to_string()))
                            .collect(),
                    };
                    for key in gone.into_iter().filter(|key| !seen.contains(key)) {
                        delete(&mut self.index, (&key.0, &key.1));
                    }
                }
                if !self.listed[k] {
                    info!(kind = kind.name(), "listed");
                }
                self.listed[k] = true;
                self.listing[k] = false;
            }
            Event::Apply(o) => apply(self, o),
            Event::Delete(o) => {
                let (ns, n) = key_of(o.meta());
                delete(&mut self.index, (&ns, &n));
            }
        }
    }

    fn apply_pod(&mut self, view: PodView) {
        let (ns, name) = key_of(&view.metadata);
        match Pod::from_k8s_owned(view.into_k8s()) {
            Ok(pod) => {
                self.index.apply_pod(pod);
            }
            Err(e) => {
                // Unreadable now: as if it were gone (fail closed for what it might match).
                self.problems.warn(&e);
                self.index.delete_pod(&ns, &name);
            }
        }
    }

    fn apply_namespace(&mut self, view: NamespaceView) {
        match Namespace::from_k8s(&view.into_k8s()) {
            Ok(ns) => {
                self.index.apply_namespace(ns);
            }
            Err(e) => self.problems.warn(&e),
        }
    }

    fn apply_policy(&mut self, view: NetworkPolicyView) {
        match Policy::from_k8s_lenient(&view.into_k8s()) {
            Ok((policy, errors)) => {
                if self.index.apply_policy(policy) {
                    for e in &errors {
                        self.problems.warn(e);
                    }
                }
            }
            Err(e) => self.problems.warn(&e),
        }
    }
}

/// Holds the loop's Folder, which the saved inputs a restart enforces first are read from (a
/// trait so that this module does not depend on `policy_state`, which implements it).
pub trait FolderStore: Send + Sync {
    /// The Folder, locked: by the loop for each batch, by the writer while it encodes.
    fn folder(&self) -> std::sync::MutexGuard<'_, Folder>;
    /// A complete set of inputs changed (a snapshot is taken).
    fn changed(&self);
}

/// Starts the policy loop ([`run`]) on a thread of its own, with a single-threaded runtime and
/// an API client of its own (see `watches::spawn`): its reads are paced (`watches::Pacer`), which
/// takes a thread that runs nothing else, and its first snapshot (every selector at once) and
/// the state writer's hold on the Folder block only this thread; `turn` is the pacer's turn,
/// and the Pod filter counts in `pod_tally`. The loop ends when the returned sender is dropped.
pub fn start(
    config: kube::Config,
    pods: Arc<Pods>,
    store: Arc<dyn FolderStore>,
    turn: std::time::Duration,
    pod_tally: Arc<crate::node_state::FilterCounts>,
) -> std::io::Result<tokio::sync::oneshot::Sender<()>> {
    super::watches::spawn_stoppable("kwire-policy", config, move |client, stop| {
        run(client, pods, store, turn, pod_tally, stop)
    })
}

/// Runs until `stop`'s sender is dropped, on a thread of its own (see [`start`]). `store` holds
/// the Folder to fold into: the saved inputs (already swapped in; the first lists fold on top
/// of them) or an empty one.
async fn run(
    client: Client,
    pods: Arc<Pods>,
    store: Arc<dyn FolderStore>,
    turn: std::time::Duration,
    pod_tally: Arc<crate::node_state::FilterCounts>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // Unchanged Pods (status heartbeats, annotations) stop at the filter: a watched update
    // as text, before it is decoded (the filter as the watch's sieve); a listed Pod, or an
    // update the sieve could not judge, after it is decoded and before it is converted and
    // compared. Every Pod item is handed to the filter before the next is read (see `Sieve`).
    let pod_filter = Arc::new(super::watches::Shared::new(super::watches::PodFilter::new(
        pod_tally,
    )));
    let sieve: Arc<dyn super::lister::Sieve> = pod_filter.clone();
    let s0 = watch::<PodView>(client.clone(), Kind::Pods, Change::Pod, Some(sieve));
    let s1 = watch::<NamespaceView>(client.clone(), Kind::Namespaces, Change::Namespace, None);
    let s2 = watch::<NetworkPolicyView>(client, Kind::NetworkPolicies, Change::Policy, None);
    let events = futures::stream::select(futures::stream::select(s0, s1), s2);
    let mut events = std::pin::pin!(events);
    let mut enforcing = false;
    let fold = |folder: &mut Folder, change: Change| {
        if let Change::Pod(ev) = &change {
            if !pod_filter.pass(ev) {
                return;
            }
        }
        folder.fold(change);
    };
    let mut pacer = super::watches::Pacer::new(turn);
    loop {
        let Some(Some(first)) = pacer.next(&mut events, &mut stop).await else {
            return;
        };
        let mut watched = first.is_watch_event();
        let mut folder = store.folder();
        fold(&mut folder, first);
        // Everything else already here joins this batch.
        for _ in 1..MAX_BATCH {
            match events.next().now_or_never() {
                Some(Some(change)) => {
                    watched |= change.is_watch_event();
                    fold(&mut folder, change)
                }
                Some(None) => return,
                None => break,
            }
        }
        pacer.arm(watched);
        if !folder.ready() || !folder.index.is_changed() {
            continue;
        }
        // Only complete inputs are saved (a half-listed set could lack the policies).
        store.changed();
        let started = Instant::now();
        // The first one computes every selector at once, blocking this thread only.
        let set = folder.index.snapshot();
        pods.set_policy(Arc::new(set));
        let ix = &folder.index;
        let took_us = started.elapsed().as_micros() as u64;
        if enforcing {
            debug!(took_us, "NetworkPolicy snapshot swapped in");
        } else {
            info!(
                pods = ix.pod_count(),
                policies = ix.policy_count(),
                identities = ix.identity_count(),
                compiled = ix.compiled_policy_count(),
                selectors = ix.selector_count(),
                took_ms = took_us / 1000,
                "NetworkPolicy snapshot swapped in; enforcing"
            );
            enforcing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_event(name: &str, labels: serde_json::Value, heartbeat: &str) -> PodView {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "x", "resourceVersion": "1", "labels": labels,
                "annotations": {"note": heartbeat}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": heartbeat}]}
        }))
        .unwrap()
    }

    fn listed(folder: &mut Folder) {
        for kind in [Kind::Pods, Kind::Namespaces, Kind::NetworkPolicies] {
            let done = match kind {
                Kind::Pods => Change::Pod(Event::InitDone),
                Kind::Namespaces => Change::Namespace(Event::InitDone),
                Kind::NetworkPolicies => Change::Policy(Event::InitDone),
            };
            folder.fold(done);
        }
    }

    #[test]
    fn a_heartbeat_folds_into_no_change() {
        let mut f = Folder::new("n1");
        listed(&mut f);
        f.fold(Change::Pod(Event::Apply(pod_event(
            "a",
            json!({"app": "a"}),
            "2025-01-01T00:00:00Z",
        ))));
        assert!(f.ready() && f.index.is_changed());
        f.index.snapshot();
        let before = f.index.stats();
        // Status heartbeat and an annotation: nothing policy reads.
        f.fold(Change::Pod(Event::Apply(pod_event(
            "a",
            json!({"app": "a"}),
            "2025-01-01T00:05:00Z",
        ))));
        assert!(!f.index.is_changed(), "no snapshot is due");
        assert_eq!(f.index.stats().unchanged, before.unchanged + 1);
        assert_eq!(f.index.stats().changes, before.changes);
        // A label: relevant.
        f.fold(Change::Pod(Event::Apply(pod_event(
            "a",
            json!({"app": "b"}),
            "2025-01-01T00:05:00Z",
        ))));
        assert!(f.index.is_changed());
    }

    #[test]
    fn a_relist_removes_what_it_no_longer_lists_and_holds_snapshots_meanwhile() {
        let mut f = Folder::new("n1");
        listed(&mut f);
        f.fold(Change::Pod(Event::Apply(pod_event("a", json!({}), "t"))));
        f.fold(Change::Pod(Event::Apply(pod_event("b", json!({}), "t"))));
        assert_eq!(f.index.pod_count(), 2);
        // After a 410 Gone: a new list that no longer has `a`.
        f.fold(Change::Pod(Event::Init));
        f.fold(Change::Pod(Event::InitApply(pod_event(
            "b",
            json!({}),
            "t",
        ))));
        assert!(!f.ready(), "no snapshot from half a list");
        f.fold(Change::Pod(Event::InitDone));
        assert!(f.ready());
        assert_eq!(f.index.pod_names().collect::<Vec<_>>(), [("x", "b")]);
    }
}
