//! The Node watch on a thread of its own, filtered there (see [`NodeFilter`]): nearly every
//! Node event changes nothing peer selection reads (status heartbeats every few minutes per
//! node, annotations of other controllers), and the planner on the main runtime is woken only
//! for one that does. The watch (listed and watched by `lister`) runs on a single-threaded
//! runtime with an API client of its own (its connections live there too); the filter is its
//! sieve, so a heartbeat is dropped as text, before it is decoded; what passes goes to the
//! planner over a bounded channel.
//!
//! The policy loop (its three watches, the fold and the snapshots) runs on such a thread too
//! (`policy::start`). There, [`PodFilter`] drops an unchanged Pod before it is converted and
//! compared with what the policy index holds; a watched one already as text (it is the Pod
//! watch's sieve). Both filters keep fingerprints ([`Prints`]) read alike from a decoded view
//! and from its text. The service loop (its two watches, the views and the table's compiles)
//! runs on one too (`services::start`); its watches' sieves ([`TextSieve`]) drop Service and
//! EndpointSlice updates as text.
//!
//! The three threads pace their reads ([`Pacer`]): after a turn of watch events a thread sleeps
//! [`WATCH_TURN`] before it reads again, so that a stream of heartbeats costs a wake-up per
//! turn, not per event.

use super::lister::Seen;
use super::objects::{Fingerprint, NodeView, PodView, Printed};
use crate::node_state::FilterCounts;
use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;
use std::time::Duration;
use tracing::error;

/// One item of the Node watch as the planner gets it.
pub type NodeItem = Result<Event<NodeView>, watcher::Error>;

/// Node items queued for the planner, at most (the watch waits while it is full).
pub const NODE_QUEUE: usize = 4096;

/// The watcher configuration of the kinds kube's watcher still watches (the Peer objects;
/// every other kind is listed and watched by `lister`, with the same list parameters).
pub fn watch_config() -> watcher::Config {
    watcher::Config::default()
        .any_semantic()
        .page_size(super::lister::PAGE_SIZE)
}

/// The fingerprints of the objects a filter or sieve has passed, one per object: two 64-bit
/// SipHashes with this process's random keys (so no one can craft a collision), one of its
/// key, one of its content without its resourceVersion (a view's [`Printed::hash_content`],
/// or a [`Fingerprint`] read from its text), about 32 bytes per object (4 MB for 150,000
/// Pods, where a copy of each view would cost tens of MB). By chance, an update is judged
/// unchanged wrongly with odds of about 2^-64.
#[derive(Default)]
struct Prints {
    keys: RandomState,
    last: HashMap<u64, u64>,
}

impl Prints {
    fn clear(&mut self) {
        self.last.clear();
    }

    /// Records `v`'s fingerprint; true when it differs from the one before.
    fn remember<V: Printed>(&mut self, v: &V) -> bool {
        let mut h = self.keys.build_hasher();
        v.hash_content(&mut h);
        let content = h.finish();
        self.last.insert(self.keys.hash_one(v.key()), content) != Some(content)
    }

    /// Records a fingerprint read from an object's text.
    fn keep(&mut self, print: &Fingerprint) {
        self.last.insert(print.key, print.content);
    }

    /// Forgets the object that `key` (as a view's [`Printed::key`]) names.
    fn forget(&mut self, key: impl std::hash::Hash) {
        self.last.remove(&self.keys.hash_one(key));
    }

    /// A watched update's fingerprint, as `read` reads it with these keys: its
    /// resourceVersion when it is the one remembered for its object, `None` when it differs
    /// or the text could not be read.
    fn unchanged(&self, read: impl FnOnce(&RandomState) -> Option<Fingerprint>) -> Option<String> {
        let print = read(&self.keys)?;
        (self.last.get(&print.key) == Some(&print.content)).then_some(print.resource_version)
    }
}

/// Drops Node updates that change nothing peer selection reads, before the planner sees
/// them (by their fingerprints, see [`Prints`]); a watched one already as text, before it is
/// decoded (it is the Node watch's sieve, see `lister::Sieve`). What the planner is given is
/// exactly what changes its state: every list (a re-list starts this filter afresh, as it
/// does the planner's view), every delete, every update of this node's own Node (the planner
/// follows its resourceVersion; its fingerprint is never kept, so the sieve never drops it),
/// and the first update after a watch error (it marks the API as reachable again).
pub struct NodeFilter {
    own: String,
    prints: Prints,
    after_error: bool,
    tally: Arc<FilterCounts>,
}

impl NodeFilter {
    /// A filter for the node named `own`, counting what it passes and drops in `tally`.
    pub fn new(own: &str, tally: Arc<FilterCounts>) -> Self {
        NodeFilter {
            own: own.to_string(),
            prints: Prints::default(),
            after_error: false,
            tally,
        }
    }

    /// Records `v`'s fingerprint, unless it is this node's own Node; true when it differs
    /// from the one before (always for the own Node).
    fn remember(&mut self, v: &NodeView) -> bool {
        v.key() == Some(self.own.as_str()) || self.prints.remember(v)
    }

    /// (passed, dropped) so far.
    pub fn counts(&self) -> (u64, u64) {
        self.tally.get()
    }
}

impl TextFilter for NodeFilter {
    type Item = NodeItem;

    fn pass(&mut self, item: &NodeItem) -> bool {
        let pass = match item {
            Err(_) => {
                self.after_error = true;
                true
            }
            Ok(Event::Init) => {
                self.prints.clear();
                true
            }
            Ok(Event::InitApply(v)) => {
                self.remember(v);
                true
            }
            Ok(Event::InitDone) => true,
            Ok(Event::Apply(v)) => {
                let after_error = std::mem::take(&mut self.after_error);
                self.remember(v) || after_error
            }
            Ok(Event::Delete(v)) => {
                self.prints.forget(v.key());
                true
            }
        };
        self.tally.add(pass)
    }

    fn unchanged_text(&mut self, object: &str) -> Option<String> {
        if self.after_error {
            return None;
        }
        let rv = self
            .prints
            .unchanged(|keys| NodeView::fingerprint_line(object, keys))?;
        self.tally.add(false);
        Some(rv)
    }
}

/// Drops Pod updates that change nothing NetworkPolicy reads (status heartbeats, annotations,
/// resourceVersion alone), before they are folded, by their fingerprints (see [`Prints`]); a
/// watched one already as text, before it is decoded (it is the Pod watch's sieve). Lists,
/// deletes and errors always pass; a re-list starts the filter afresh, as it does the index.
pub struct PodFilter {
    prints: Prints,
    tally: Arc<FilterCounts>,
}

impl PodFilter {
    /// An empty filter, counting what it passes and drops in `tally`.
    pub fn new(tally: Arc<FilterCounts>) -> Self {
        PodFilter {
            prints: Prints::default(),
            tally,
        }
    }

    /// (passed, dropped) so far.
    pub fn counts(&self) -> (u64, u64) {
        self.tally.get()
    }
}

impl TextFilter for PodFilter {
    type Item = Event<PodView>;

    fn pass(&mut self, ev: &Event<PodView>) -> bool {
        let pass = match ev {
            Event::Init => {
                self.prints.clear();
                true
            }
            Event::InitApply(v) => {
                self.prints.remember(v);
                true
            }
            Event::InitDone => true,
            Event::Apply(v) => self.prints.remember(v),
            Event::Delete(v) => {
                self.prints.forget(v.key());
                true
            }
        };
        self.tally.add(pass)
    }

    fn unchanged_text(&mut self, object: &str) -> Option<String> {
        let rv = self
            .prints
            .unchanged(|keys| PodView::fingerprint_line(object, keys))?;
        self.tally.add(false);
        Some(rv)
    }
}

/// A filter of decoded watch items that also judges a watched update as text (the object of
/// a MODIFIED line) before it is decoded.
pub trait TextFilter: Send + 'static {
    type Item;
    /// Whether the consumer must see `item`.
    fn pass(&mut self, item: &Self::Item) -> bool;
    /// The update's resourceVersion when it changes nothing the consumer reads (dropped and
    /// counted); `None` when it must be decoded and given to [`TextFilter::pass`].
    fn unchanged_text(&mut self, object: &str) -> Option<String>;
}

/// A [`TextFilter`] shared by a watch's line reader (as its sieve) and the loop that consumes
/// what passes; both run on one thread, one after the other.
pub struct Shared<F>(std::sync::Mutex<F>);

impl<F: TextFilter> Shared<F> {
    pub fn new(filter: F) -> Self {
        Shared(std::sync::Mutex::new(filter))
    }

    /// [`TextFilter::pass`].
    pub fn pass(&self, item: &F::Item) -> bool {
        self.lock().pass(item)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, F> {
        // The filter holds only fingerprints: one left half-updated by a panic is still safe
        // to read (a stale fingerprint lets the next update through).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<F: TextFilter> super::lister::Sieve for Shared<F> {
    fn unchanged(&self, object: &str) -> Option<String> {
        self.lock().unchanged_text(object)
    }
}

/// A sieve that keeps its own fingerprints, read from the objects' text as listed and as
/// watched ([`super::objects::fingerprint_text`] of what `kept` names): for kinds whose
/// consumer keeps no filter of its own (Services, EndpointSlices). It keeps them as the Pod
/// and Node filters keep theirs ([`Prints`]).
pub struct TextSieve {
    kept: &'static super::objects::Kept,
    prints: std::sync::Mutex<Prints>,
    tally: Arc<FilterCounts>,
}

impl TextSieve {
    /// Counting in `tally` what it passes on (listed objects, watch events) and drops.
    pub fn new(kept: &'static super::objects::Kept, tally: Arc<FilterCounts>) -> Self {
        TextSieve {
            kept,
            prints: Default::default(),
            tally,
        }
    }

    fn prints(&self) -> std::sync::MutexGuard<'_, Prints> {
        // Only fingerprints: a map left half-updated is still safe to read.
        self.prints.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl super::lister::Sieve for TextSieve {
    fn unchanged(&self, object: &str) -> Option<String> {
        let rv = self
            .prints()
            .unchanged(|keys| super::objects::fingerprint_text(object, keys, self.kept))?;
        self.tally.add(false);
        Some(rv)
    }

    fn relist(&self) {
        self.prints().clear();
    }

    fn listed(&self, page: &str) {
        let mut prints = self.prints();
        let listed = super::objects::fingerprint_list(page, &prints.keys, self.kept);
        for p in listed.into_iter().flatten() {
            self.tally.add(true);
            prints.keep(&p);
        }
    }

    fn seen(&self, object: &str) -> bool {
        let mut prints = self.prints();
        let Some(p) = super::objects::fingerprint_text(object, &prints.keys, self.kept) else {
            return false;
        };
        self.tally.add(true);
        prints.keep(&p);
        true
    }

    fn forget(&self, namespace: Option<&str>, name: Option<&str>) {
        self.tally.add(true);
        self.prints().forget((namespace, name));
    }
}

/// Runs the Node watch, passing what [`NodeFilter`] keeps to `tx`, until `tx`'s receiver is
/// gone. The filter is the watch's sieve too: each item is judged before the stream is polled
/// again, as `lister::Sieve` asks.
async fn nodes(
    client: Client,
    own: String,
    turn: Duration,
    tally: Arc<FilterCounts>,
    tx: tokio::sync::mpsc::Sender<NodeItem>,
) {
    let filter = Arc::new(Shared::new(NodeFilter::new(&own, tally)));
    let stream = super::lister::watch::<NodeView>(client, Some(filter.clone()))
        .backoff(super::WatchBackoff::default());
    let mut stream = std::pin::pin!(stream);
    let mut paced = Pacer::new(turn);
    loop {
        let Some(item) = paced.next(&mut stream, tx.closed()).await else {
            return;
        };
        paced.arm(matches!(&item, Some(Ok(seen)) if seen.is_watch_event()));
        let item = match item {
            None => {
                error!("the Node watch ended");
                return;
            }
            // Dropped as text by the filter, which counted it.
            Some(Ok(Seen::Unchanged)) => continue,
            Some(Ok(Seen::Event(ev))) => Ok(ev),
            Some(Err(e)) => Err(e),
        };
        if filter.pass(&item) && tx.send(item).await.is_err() {
            return;
        }
    }
}

/// How long a watch thread sleeps after a turn of watch events before it reads again (see
/// [`Pacer`]), unless `--watch-turn` says otherwise. At the goal size, against 20 ms: a
/// heartbeat costs 0.38–0.74× (a wake-up serves ~10 events at 200 a second, not 4), churn
/// 0.74–0.85×, and a relevant change under churn waits p99 56–76 ms, not 32–40
/// (docs/CAPACITY.md, fifteenth pass).
pub const WATCH_TURN: Duration = Duration::from_millis(50);
/// Yields to the connection's task, with nothing ready, before a turn is taken as over: the
/// connection hands the body over one chunk at a time, so an event already read (or arrived)
/// shows only after it has run.
const TURN_END_YIELDS: u32 = 2;

/// Paces a watch thread so that one wake-up serves every event that arrived within a turn
/// ([`WATCH_TURN`] by default), where each event would cost a wake-up, a TCP read and its ACK
/// of its own.
/// After a watch event (not a list item) the thread takes every event already arrived; once
/// nothing more comes, it sleeps. The sleep blocks the thread, which is its runtime: no one
/// waits in that runtime's epoll, so segments arriving meanwhile wake nothing, and the next
/// turn reads them together. A lone event is handled at once; one arriving during the sleep
/// waits at most a turn. A turn of zero never sleeps: each event is read as it comes. Only for
/// a thread that runs nothing else.
pub struct Pacer {
    turn: Duration,
    armed: bool,
    /// Turns ended with a sleep.
    sleeps: u64,
}

impl Pacer {
    /// A pacer that sleeps `turn` after a turn of watch events (zero: never).
    pub fn new(turn: Duration) -> Self {
        Pacer {
            turn,
            armed: false,
            sleeps: 0,
        }
    }

    /// The stream's next item, paced; `None` once `stop` completes first.
    pub async fn next<S: futures::Stream + Unpin>(
        &mut self,
        stream: &mut S,
        stop: impl std::future::Future,
    ) -> Option<Option<S::Item>> {
        if let Some(item) = self.ready(stream).await {
            return Some(item);
        }
        tokio::select! {
            item = stream.next() => Some(item),
            _ = stop => None,
        }
    }

    /// The next item if one is ready within this turn; `None` (after the sleep, when armed)
    /// otherwise. The stream is polled with the task's own waker, so no wake-up is lost.
    async fn ready<S: futures::Stream + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Option<Option<S::Item>> {
        if !self.armed {
            return None;
        }
        let mut yields = 0;
        loop {
            let next = std::future::poll_fn(|cx| match stream.poll_next_unpin(cx) {
                std::task::Poll::Ready(item) => std::task::Poll::Ready(Some(item)),
                std::task::Poll::Pending => std::task::Poll::Ready(None),
            })
            .await;
            if next.is_some() {
                return next;
            }
            if yields == TURN_END_YIELDS {
                break;
            }
            yields += 1;
            tokio::task::yield_now().await;
        }
        self.armed = false;
        self.sleeps += 1;
        std::thread::sleep(self.turn);
        None
    }

    /// Whether the turn just taken held a watch event: then the next [`Pacer::ready`] ends
    /// the turn with a sleep once nothing more is ready.
    pub fn arm(&mut self, watch_event: bool) {
        self.armed = watch_event && !self.turn.is_zero();
    }
}

/// Runs `work` with a client of its own on a new thread with a single-threaded runtime; the
/// thread ends when `work` does. A client that cannot be built is logged and ends the thread.
pub fn spawn<F, Fut>(name: &str, config: kube::Config, work: F) -> std::io::Result<()>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let what = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, thread = %what, "no runtime for the watch thread; its watches do not run");
                    return;
                }
            };
            rt.block_on(async move {
                match crate::kubeapi::client_for(config) {
                    Ok(client) => work(client).await,
                    Err(e) => {
                        error!(error = format!("{e:#}"), thread = %what, "no API client for the watch thread; its watches do not run")
                    }
                }
            });
        })
        .map(|_| ())
}

/// [`spawn`] for a loop that runs until the returned sender is dropped: `work` gets the
/// client and that signal.
pub fn spawn_stoppable<F, Fut>(
    name: &str,
    config: kube::Config,
    work: F,
) -> std::io::Result<tokio::sync::oneshot::Sender<()>>
where
    F: FnOnce(Client, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    spawn(name, config, move |client| work(client, stop_rx))?;
    Ok(stop_tx)
}

/// Starts the Node watch on a thread of its own, its reads paced by `turn`, its filter
/// counting in `tally`; the planner reads the returned receiver (the thread ends when it is
/// dropped).
pub fn start_nodes(
    config: kube::Config,
    own: String,
    turn: Duration,
    tally: Arc<FilterCounts>,
) -> std::io::Result<tokio::sync::mpsc::Receiver<NodeItem>> {
    let (tx, rx) = tokio::sync::mpsc::channel(NODE_QUEUE);
    spawn("kwire-nodes", config, move |client| {
        nodes(client, own, turn, tally, tx)
    })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, rv: &str, key: &str, heartbeat: &str) -> NodeView {
        serde_json::from_str(&node_text(name, rv, key, heartbeat)).unwrap()
    }

    /// [`node`]'s JSON text, as a watch line holds it.
    fn node_text(name: &str, rv: &str, key: &str, heartbeat: &str) -> String {
        serde_json::to_string(&json!({
            "metadata": {"name": name, "uid": format!("u-{name}"), "resourceVersion": rv,
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "annotations": {"kwire.dev/public-key": key, "node.alpha.kubernetes.io/ttl": heartbeat},
                "managedFields": [{"manager": "kubelet", "time": heartbeat}]},
            "spec": {"podCIDR": "10.244.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.2"}],
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]}
        }))
        .unwrap()
    }

    use crate::testing::xorshift;

    fn listed(f: &mut NodeFilter, nodes: &[NodeView]) {
        assert!(f.pass(&Ok(Event::Init)));
        for n in nodes {
            assert!(
                f.pass(&Ok(Event::InitApply(n.clone()))),
                "a list passes whole"
            );
        }
        assert!(f.pass(&Ok(Event::InitDone)));
    }

    /// A filter for node `me` that has passed a list of `n2` (key K1) and `me`.
    fn listed_n2_and_me() -> NodeFilter {
        let mut f = NodeFilter::new("me", Arc::default());
        listed(
            &mut f,
            &[node("n2", "1", "K1", "t0"), node("me", "1", "M", "t0")],
        );
        f
    }

    /// A stream that hands its items over as hyper's connection hands a body over: one at a
    /// time, the next only once the producing task has run again.
    fn handed_over_one_by_one(
        items: u32,
    ) -> (
        impl futures::Stream<Item = u32> + Unpin,
        tokio::sync::oneshot::Sender<u32>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (more_tx, more_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            for i in 0..items {
                tx.send(i).await.unwrap();
            }
            // One more, later, while the stream stays open.
            if let Ok(i) = more_rx.await {
                tx.send(i).await.unwrap();
            }
            std::future::pending::<()>().await
        });
        let stream = futures::stream::unfold(rx, |mut rx| async { Some((rx.recv().await?, rx)) });
        (Box::pin(stream), more_tx)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_turn_takes_every_event_already_arrived_and_a_later_one_still_arrives() {
        let (mut stream, more) = handed_over_one_by_one(100);
        let mut pacer = Pacer::new(WATCH_TURN);
        let mut got = Vec::new();
        while got.len() < 100 {
            let item = match pacer.ready(&mut stream).await {
                Some(item) => item,
                None => stream.next().await,
            };
            got.push(item.expect("the stream stays open"));
            pacer.arm(true);
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(
            pacer.sleeps, 0,
            "every event already there was taken in the same turn"
        );
        // Nothing more: the turn ends with one sleep.
        assert!(pacer.ready(&mut stream).await.is_none());
        assert_eq!(pacer.sleeps, 1);
        // Not armed (a list item, or a turn just ended): no sleep at all.
        assert!(pacer.ready(&mut stream).await.is_none());
        assert_eq!(pacer.sleeps, 1);
        // An event arriving after the turn is not lost.
        more.send(100).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
        assert_eq!(next.expect("the later event arrives"), Some(100));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_turn_of_zero_reads_each_event_as_it_comes() {
        let (mut stream, _more) = handed_over_one_by_one(3);
        let mut pacer = Pacer::new(Duration::ZERO);
        for want in 0..3 {
            assert_eq!(stream.next().await, Some(want));
            pacer.arm(true);
            // Nothing is held back for a turn: no item comes through `ready`, no sleep.
            assert!(pacer.ready(&mut stream).await.is_none());
        }
        assert_eq!(pacer.sleeps, 0);
    }

    #[test]
    fn a_heartbeat_does_not_reach_the_planner_a_key_does() {
        let mut f = listed_n2_and_me();
        // Status heartbeat and an annotation kwire does not read: dropped.
        assert!(!f.pass(&Ok(Event::Apply(node("n2", "2", "K1", "t1")))));
        assert!(!f.pass(&Ok(Event::Apply(node("n2", "3", "K1", "t2")))));
        // The planner follows its own Node's resourceVersion: passed.
        assert!(f.pass(&Ok(Event::Apply(node("me", "4", "M", "t1")))));
        // What peer selection reads: passed, then the same again is dropped.
        assert!(f.pass(&Ok(Event::Apply(node("n2", "5", "K2", "t2")))));
        assert!(!f.pass(&Ok(Event::Apply(node("n2", "6", "K2", "t3")))));
        // A new Node passes; a delete passes and forgets, so the same Node again passes.
        assert!(f.pass(&Ok(Event::Apply(node("n3", "7", "K3", "t0")))));
        assert!(f.pass(&Ok(Event::Delete(node("n3", "8", "K3", "t0")))));
        assert!(f.pass(&Ok(Event::Apply(node("n3", "9", "K3", "t0")))));
        assert_eq!(f.counts(), (9, 3));
        // A condition that flips is read (its heartbeat time is not).
        let down: NodeView = serde_json::from_value(json!({
            "metadata": {"name": "n2", "uid": "u-n2", "resourceVersion": "10",
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "annotations": {"kwire.dev/public-key": "K2", "node.alpha.kubernetes.io/ttl": "t4"}},
            "spec": {"podCIDR": "10.244.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.2"}],
                "conditions": [{"type": "Ready", "status": "False", "lastHeartbeatTime": "t4"}]}
        }))
        .unwrap();
        assert!(f.pass(&Ok(Event::Apply(down))));
    }

    #[test]
    fn after_an_error_and_a_relist_the_planner_sees_what_it_must() {
        let mut f = NodeFilter::new("me", Arc::default());
        listed(&mut f, &[node("n2", "1", "K1", "t0")]);
        assert!(f.pass(&Err(watcher::Error::NoResourceVersion)));
        // The first update after an error passes (the planner marks the API reachable again).
        assert!(f.pass(&Ok(Event::Apply(node("n2", "2", "K1", "t1")))));
        assert!(!f.pass(&Ok(Event::Apply(node("n2", "3", "K1", "t2")))));
        // A re-list starts afresh: the planner drops Nodes the list lacks, so a Node the
        // filter saw before is news again after it.
        listed(&mut f, &[]);
        assert!(f.pass(&Ok(Event::Apply(node("n2", "4", "K1", "t3")))));
    }

    /// The Node sieve (text) drops only what the filter (view) would drop, and never this
    /// node's own Node nor the first update after an error.
    #[test]
    fn the_node_sieve_drops_a_heartbeat_as_text_but_not_the_own_node_nor_after_an_error() {
        let mut f = listed_n2_and_me();
        let beat = node_text("n2", "2", "K1", "t1");
        assert_eq!(f.unchanged_text(&format!("{beat}}}")).as_deref(), Some("2"));
        // The own Node is decoded and passed, heartbeat or not.
        let own = node_text("me", "3", "M", "t1");
        assert_eq!(f.unchanged_text(&own), None);
        assert!(f.pass(&Ok(Event::Apply(node("me", "3", "M", "t1")))));
        assert_eq!(f.unchanged_text(&own), None);
        // A key change is decoded and passed; the same again is dropped as text.
        let rekeyed = node_text("n2", "4", "K2", "t1");
        assert_eq!(f.unchanged_text(&rekeyed), None);
        assert!(f.pass(&Ok(Event::Apply(node("n2", "4", "K2", "t1")))));
        assert_eq!(f.unchanged_text(&rekeyed).as_deref(), Some("4"));
        // After an error the next update is decoded and passed; then heartbeats drop again.
        assert!(f.pass(&Err(watcher::Error::NoResourceVersion)));
        let after = node_text("n2", "5", "K2", "t2");
        assert_eq!(f.unchanged_text(&after), None);
        assert!(f.pass(&Ok(Event::Apply(node("n2", "5", "K2", "t2")))));
        assert_eq!(f.unchanged_text(&after).as_deref(), Some("5"));
        // An unknown Node, text that is not a Node: decoded.
        assert_eq!(f.unchanged_text(&node_text("n3", "6", "K3", "t2")), None);
        assert_eq!(f.unchanged_text(r#"{"metadata": 7}"#), None);
        assert_eq!(f.counts(), (8, 3));
    }

    /// The planner's fold of what the filter passes ends where its fold of everything ends:
    /// for random histories, each update first judged as text by the sieve, the peer view
    /// built from the passed items equals the one built from all items.
    #[test]
    fn filtered_history_folds_to_the_same_peer_view() {
        use crate::agent::peers::NodeInfo;
        use std::collections::BTreeMap;
        fn fold(
            view: &mut BTreeMap<String, NodeInfo>,
            relist: &mut Option<Vec<String>>,
            item: &NodeItem,
        ) {
            match item {
                Ok(Event::Init) => *relist = Some(Vec::new()),
                Ok(Event::InitApply(v)) | Ok(Event::Apply(v)) => {
                    let name = v.metadata.name.clone().unwrap();
                    if let (Ok(Event::InitApply(_)), Some(seen)) = (item, relist.as_mut()) {
                        seen.push(name.clone());
                    }
                    view.insert(name, NodeInfo::from_node(&v.clone().into_k8s()));
                }
                Ok(Event::InitDone) => {
                    if let Some(seen) = relist.take() {
                        view.retain(|n, _| seen.contains(n));
                    }
                }
                Ok(Event::Delete(v)) => {
                    view.remove(v.metadata.name.as_deref().unwrap());
                }
                Err(_) => {}
            }
        }
        let mut rand = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut total_sieved = 0;
        for _ in 0..200 {
            let mut sieved = 0;
            let mut f = NodeFilter::new("n0", Arc::default());
            let (mut all, mut passed) = (BTreeMap::new(), BTreeMap::new());
            let (mut r1, mut r2) = (None, None);
            let mut rv = 0u64;
            // Each item with the text a watch line would hold for an update (the sieve judges
            // that first, as the Node watch's line reader does).
            let mut items: Vec<(NodeItem, Option<String>)> =
                vec![(Ok(Event::Init), None), (Ok(Event::InitDone), None)];
            for _ in 0..60 {
                rv += 1;
                let text = |rand: &mut dyn FnMut(u64) -> u64, rv: u64| {
                    let name = format!("n{}", rand(4));
                    let key = format!("K{}", rand(3));
                    node_text(&name, &rv.to_string(), &key, &format!("t{rv}"))
                };
                let view = |t: &str| serde_json::from_str::<NodeView>(t).unwrap();
                match rand(12) {
                    0 => items.push((Ok(Event::Delete(view(&text(&mut rand, rv)))), None)),
                    1 => items.push((Err(watcher::Error::NoResourceVersion), None)),
                    2 => {
                        // A re-list (after a 410 Gone), as the watcher delivers one.
                        items.push((Ok(Event::Init), None));
                        for _ in 0..rand(4) {
                            let v = view(&text(&mut rand, rv));
                            items.push((Ok(Event::InitApply(v)), None));
                        }
                        items.push((Ok(Event::InitDone), None));
                    }
                    _ => {
                        let t = text(&mut rand, rv);
                        items.push((Ok(Event::Apply(view(&t))), Some(t)));
                    }
                }
            }
            for (item, text) in &items {
                fold(&mut all, &mut r1, item);
                if let Some(rv) = text.as_deref().and_then(|t| f.unchanged_text(t)) {
                    let Ok(Event::Apply(v)) = item else {
                        panic!("only updates are sieved")
                    };
                    assert_eq!(Some(rv.as_str()), v.metadata.resource_version.as_deref());
                    assert_ne!(v.key(), Some("n0"), "the own Node is never sieved");
                    sieved += 1;
                    continue;
                }
                if f.pass(item) {
                    fold(&mut passed, &mut r2, item);
                }
            }
            assert_eq!(all, passed);
            assert_eq!(
                f.counts().1,
                sieved,
                "what the sieve passes on, the filter passes"
            );
            total_sieved += sieved;
        }
        assert!(total_sieved > 0, "some updates were dropped as text");
    }

    fn pod(name: &str, rv: u64, app: &str, ip: &str, heartbeat: &str) -> PodView {
        serde_json::from_str(&pod_text(name, rv, app, ip, heartbeat)).unwrap()
    }

    /// [`pod`]'s JSON text, as a watch line holds it.
    fn pod_text(name: &str, rv: u64, app: &str, ip: &str, heartbeat: &str) -> String {
        serde_json::to_string(&json!({
            "metadata": {"name": name, "namespace": "x", "uid": format!("u-{name}"),
                "resourceVersion": rv.to_string(), "labels": {"app": app},
                "annotations": {"note": heartbeat}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": heartbeat}]}
        }))
        .unwrap()
    }

    /// A Pod filter that has passed a list of Pod `a` (web, 10.0.0.1).
    fn listed_a() -> PodFilter {
        let mut f = PodFilter::new(Arc::default());
        assert!(f.pass(&Event::Init));
        assert!(f.pass(&Event::InitApply(pod("a", 1, "web", "10.0.0.1", "t0"))));
        assert!(f.pass(&Event::InitDone));
        f
    }

    /// The sieve (text) judges a watched update as the filter (view) does, and drops only what
    /// the filter would drop: after a drop the remembered fingerprint is the same, so a
    /// change back and forth passes both ways.
    #[test]
    fn the_sieve_drops_a_heartbeat_as_text_and_passes_a_change() {
        let mut f = listed_a();
        // A heartbeat's text: dropped, at its resourceVersion.
        let beat = pod_text("a", 2, "web", "10.0.0.1", "t1");
        assert_eq!(f.unchanged_text(&format!("{beat}}}")).as_deref(), Some("2"));
        // A relabel's text: not judged unchanged; decoded, it passes; then back again.
        let relabel = pod_text("a", 3, "db", "10.0.0.1", "t1");
        assert_eq!(f.unchanged_text(&relabel), None);
        assert!(f.pass(&Event::Apply(pod("a", 3, "db", "10.0.0.1", "t1"))));
        assert_eq!(f.unchanged_text(&relabel).as_deref(), Some("3"));
        let back = pod_text("a", 4, "web", "10.0.0.1", "t2");
        assert_eq!(f.unchanged_text(&back), None);
        assert!(f.pass(&Event::Apply(pod("a", 4, "web", "10.0.0.1", "t2"))));
        // An unknown Pod, text that is not a Pod, a Pod without a resourceVersion: decoded.
        assert_eq!(
            f.unchanged_text(&pod_text("b", 5, "web", "10.0.0.1", "t2")),
            None
        );
        assert_eq!(f.unchanged_text(r#"{"metadata": 7}"#), None);
        assert_eq!(
            f.unchanged_text("{\"metadata\": {\"name\": \"a\", \"namespace\": \"x\""),
            None
        );
        assert_eq!(f.counts(), (5, 2));
    }

    #[test]
    fn a_pod_heartbeat_is_dropped_labels_and_addresses_pass() {
        let mut f = listed_a();
        // Status heartbeat, an annotation, a new resourceVersion: nothing policy reads.
        assert!(!f.pass(&Event::Apply(pod("a", 2, "web", "10.0.0.1", "t1"))));
        assert!(!f.pass(&Event::Apply(pod("a", 3, "web", "10.0.0.1", "t2"))));
        // Labels and addresses are read; the same again is dropped.
        assert!(f.pass(&Event::Apply(pod("a", 4, "db", "10.0.0.1", "t2"))));
        assert!(f.pass(&Event::Apply(pod("a", 5, "db", "10.0.0.2", "t2"))));
        assert!(!f.pass(&Event::Apply(pod("a", 6, "db", "10.0.0.2", "t3"))));
        // A Pod of the same content under another name is news; a delete forgets.
        assert!(f.pass(&Event::Apply(pod("b", 7, "db", "10.0.0.2", "t3"))));
        assert!(f.pass(&Event::Delete(pod("b", 8, "db", "10.0.0.2", "t3"))));
        assert!(f.pass(&Event::Apply(pod("b", 9, "db", "10.0.0.2", "t3"))));
        // A re-list starts afresh.
        assert!(f.pass(&Event::Init));
        assert!(f.pass(&Event::InitDone));
        assert!(f.pass(&Event::Apply(pod("a", 10, "db", "10.0.0.2", "t4"))));
        assert_eq!(f.counts(), (11, 3));
    }

    fn ev_rv(ev: &Event<PodView>) -> Option<&str> {
        match ev {
            Event::Apply(v) => v.metadata.resource_version.as_deref(),
            _ => None,
        }
    }

    /// The policy index's fold of what the Pod filter passes ends where its fold of everything
    /// ends: for random histories of updates (labels, addresses, heartbeats), deletes and
    /// re-lists, each update first judged as text by the sieve, the Pods (as the index's model reads them) folded from the passed events
    /// equal those folded from all events.
    #[test]
    fn filtered_pod_history_folds_to_the_same_pods() {
        use crate::policy::Pod;
        use std::collections::{BTreeMap, BTreeSet};
        type View = BTreeMap<String, Pod>;
        fn fold(view: &mut View, relist: &mut Option<BTreeSet<String>>, ev: &Event<PodView>) {
            match ev {
                Event::Init => *relist = Some(BTreeSet::new()),
                Event::InitApply(v) | Event::Apply(v) => {
                    let name = v.metadata.name.clone().unwrap();
                    if let (Event::InitApply(_), Some(seen)) = (ev, relist.as_mut()) {
                        seen.insert(name.clone());
                    }
                    view.insert(name, Pod::from_k8s_owned(v.clone().into_k8s()).unwrap());
                }
                Event::InitDone => {
                    if let Some(seen) = relist.take() {
                        view.retain(|n, _| seen.contains(n));
                    }
                }
                Event::Delete(v) => {
                    view.remove(v.metadata.name.as_deref().unwrap());
                }
            }
        }
        let mut rand = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..200 {
            let mut f = PodFilter::new(Arc::default());
            let (mut all, mut passed) = (View::new(), View::new());
            let (mut r1, mut r2) = (None, None);
            // Each event with the text a watch line would hold for an update (the sieve
            // judges that first, as the Pod watch's line reader does).
            let mut events: Vec<(Event<PodView>, Option<String>)> =
                vec![(Event::Init, None), (Event::InitDone, None)];
            for rv in 1..=80u64 {
                let text = |rand: &mut dyn FnMut(u64) -> u64| {
                    let name = format!("p{}", rand(4));
                    let app = format!("app{}", rand(2));
                    let ip = format!("10.0.0.{}", rand(2));
                    pod_text(&name, rv, &app, &ip, &format!("t{}", rand(1000)))
                };
                let view = |t: &str| serde_json::from_str::<PodView>(t).unwrap();
                match rand(12) {
                    0 => events.push((Event::Delete(view(&text(&mut rand))), None)),
                    1 => {
                        events.push((Event::Init, None));
                        for _ in 0..rand(4) {
                            events.push((Event::InitApply(view(&text(&mut rand))), None));
                        }
                        events.push((Event::InitDone, None));
                    }
                    _ => {
                        let t = text(&mut rand);
                        events.push((Event::Apply(view(&t)), Some(t)))
                    }
                }
            }
            let mut sieved = 0;
            for (ev, text) in &events {
                fold(&mut all, &mut r1, ev);
                if let Some(rv) = text.as_deref().and_then(|t| f.unchanged_text(t)) {
                    assert_eq!(Some(rv.as_str()), ev_rv(ev));
                    sieved += 1;
                    continue;
                }
                if f.pass(ev) {
                    fold(&mut passed, &mut r2, ev);
                }
            }
            assert_eq!(all, passed);
            assert!(sieved > 0, "some updates were dropped as text");
            assert_eq!(
                f.counts().1,
                sieved,
                "what the sieve passes on, the filter passes"
            );
        }
    }
}
