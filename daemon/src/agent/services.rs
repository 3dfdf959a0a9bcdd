//! Services for the packet loop: watches Services and EndpointSlices cluster wide, keeps only
//! their stripped views (not the full objects) in a [`ServiceCompiler`], and after a change
//! to a view (at most every [`REBUILD_DELAY`]) compiles a new
//! [`crate::services::ServiceTable`], which recompiles only the changed Services, and swaps
//! it in whole. An update that changes no view (another controller's annotation, a status
//! condition, the EndpointSlice controller's trigger time) compiles nothing; one that changes
//! nothing the views are made of is dropped by its watch's sieve before it is even decoded
//! (`watches::TextSieve`). Nothing is
//! translated from the API before both lists have been read once: until then the table
//! restored from `service-state.bin` is in force (see [`super::service_state`]), and while
//! the API is unreachable the last table stays in force.

use super::lister::{Seen, Sieve};
use super::objects::{EndpointSliceView, ServiceObjView};
use super::persist::Persist;
use super::pod_network::Firewall;
use super::service_health::HealthServers;
use super::watches::{Pacer, TextSieve};
use crate::dataplane::ports::Pods;
use crate::node_state::FilterCounts;
use crate::services::table::{ObjectKey, Scope, ServiceCompiler};
use crate::services::{ServiceTable, ServiceView, SliceView};
use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Changes arriving within this window are compiled together.
pub const REBUILD_DELAY: Duration = Duration::from_millis(100);

/// What one watch item did to the watched lists.
#[derive(Debug)]
enum Change {
    /// A watch event of list `list`.
    Event {
        list: usize,
        /// It completed a full list of its kind.
        done: bool,
        /// It changed what the table is compiled from (an update of nothing a view holds, a
        /// status or an annotation, does not).
        changed: bool,
    },
    /// Watch `0` failed (it retries with backoff).
    Error(usize, String),
}

/// The control loop of a compiled snapshot: takes watch items (`take` applies each and says
/// what changed), and after a change or a completed list, at most every [`REBUILD_DELAY`]
/// and only once every list in `kinds` was read in full, runs `rebuild`; an event that
/// changed nothing runs nothing. Each watch's errors are logged at most once per
/// `WATCH_ERROR_LOG_INTERVAL` (`keeps`: what stays in force meanwhile). Reads are paced by
/// `pacer` (`watched` says which items are watch events). Runs until the streams end or
/// `stop` completes.
async fn debounced<I, F: std::future::Future<Output = ()>>(
    events: impl futures::Stream<Item = I>,
    kinds: &'static [&'static str],
    keeps: &'static str,
    (mut pacer, watched): (Pacer, fn(&I) -> bool),
    mut stop: impl std::future::Future + Unpin,
    mut take: impl FnMut(I) -> Change,
    mut rebuild: impl FnMut() -> F,
) {
    let mut events = std::pin::pin!(events);
    let mut listed = vec![false; kinds.len()];
    let mut dirty = false;
    // One warning per failing watch per interval.
    let mut last_err: Vec<Option<Instant>> = vec![None; kinds.len()];
    // Rebuilds fall on a grid of REBUILD_DELAY from the start, and the timer is armed only
    // while a change waits for one: an idle loop sleeps until an event comes.
    let start = tokio::time::Instant::now();
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        if due.is_none() && dirty && listed.iter().all(|l| *l) {
            due = Some(next_tick(start, tokio::time::Instant::now()));
        }
        let sleep = tokio::time::sleep_until(due.unwrap_or(start));
        tokio::select! {
            ev = pacer.next(&mut events, &mut stop) => match ev.flatten().map(|ev| {
                pacer.arm(watched(&ev));
                take(ev)
            }) {
                Some(Change::Event { list, done, changed }) => {
                    listed[list] |= done;
                    dirty |= done || changed;
                }
                Some(Change::Error(i, e)) => {
                    if last_err[i].is_none_or(|t| t.elapsed() >= super::WATCH_ERROR_LOG_INTERVAL) {
                        let what = kinds[i];
                        warn!(error = %e, "watching {what} failed; retrying with backoff, {keeps}");
                        last_err[i] = Some(Instant::now());
                    }
                }
                None => return,
            },
            _ = sleep, if due.is_some() => {
                due = None;
                dirty = false;
                rebuild().await;
            }
        }
    }
}

/// The first tick after `now` of a grid of [`REBUILD_DELAY`] starting at `start`.
fn next_tick(start: tokio::time::Instant, now: tokio::time::Instant) -> tokio::time::Instant {
    let period = REBUILD_DELAY.as_nanos();
    let ticks = now.saturating_duration_since(start).as_nanos() / period + 1;
    start + Duration::from_nanos((ticks * period) as u64)
}

/// What one watch event means for the views of its kind, by object (namespace, name).
enum Update<V> {
    /// One object's view changed (`None`: it is gone, or has nothing to translate).
    One(ObjectKey, Option<V>),
    /// A re-list completed: these are all the objects.
    All(BTreeMap<ObjectKey, V>),
}

/// The re-list in progress of one kind: the list held stays in force until the new one is
/// complete.
struct Relist<V>(Option<BTreeMap<ObjectKey, V>>);

impl<V> Default for Relist<V> {
    fn default() -> Self {
        Relist(None)
    }
}

impl<V> Relist<V> {
    /// Takes one watch event; `view` strips an object (`None`: nothing to translate).
    fn apply<K: ResourceExt>(
        &mut self,
        ev: Event<K>,
        view: impl Fn(&K) -> Option<V>,
    ) -> Option<Update<V>> {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match ev {
            Event::Init => {
                self.0 = Some(BTreeMap::new());
                None
            }
            Event::InitApply(o) => {
                if let (Some(m), Some(v)) = (self.0.as_mut(), view(&o)) {
                    m.insert(key(&o), v);
                }
                None
            }
            Event::InitDone => self.0.take().map(Update::All),
            Event::Apply(o) => Some(Update::One(key(&o), view(&o))),
            Event::Delete(o) => Some(Update::One(key(&o), None)),
        }
    }

    /// [`Relist::apply`], what it gives handed to `compiler`: one view to `put`, a completed
    /// list to `replace`. Whether the event completed a list.
    fn feed<K: ResourceExt>(
        &mut self,
        ev: Event<K>,
        view: impl Fn(&K) -> Option<V>,
        compiler: &mut ServiceCompiler,
        put: fn(&mut ServiceCompiler, ObjectKey, Option<V>),
        replace: fn(&mut ServiceCompiler, BTreeMap<ObjectKey, V>),
    ) -> bool {
        let done = matches!(ev, Event::InitDone);
        match self.apply(ev, view) {
            Some(Update::One(k, v)) => put(compiler, k, v),
            Some(Update::All(all)) => replace(compiler, all),
            None => {}
        }
        done
    }
}

/// The loop's views, shared with the writer that saves them (see [`super::service_state`]).
pub type Shared = Arc<Persist<State>>;

/// The views held, in the compiler that turns them into the table.
pub struct State {
    services: Relist<ServiceView>,
    slices: Relist<SliceView>,
    /// Services, EndpointSlices: listed in full at least once (or restored).
    pub(super) listed: [bool; 2],
    pub(super) compiler: ServiceCompiler,
}

impl State {
    /// Nothing held yet: the table waits for both lists.
    pub fn new(compiler: ServiceCompiler) -> State {
        State {
            services: Relist::default(),
            slices: Relist::default(),
            listed: [false; 2],
            compiler,
        }
    }

    /// Holding saved views, as complete lists: the first real lists replace them.
    pub fn restored(compiler: ServiceCompiler) -> State {
        State {
            listed: [true; 2],
            ..State::new(compiler)
        }
    }

    /// Whether both lists are complete (read from the API once, or restored).
    pub fn complete(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// Applies one watch item to the views; says what it changed.
    fn take(&mut self, item: Item) -> Change {
        let c = &mut self.compiler;
        let (list, done) = match item {
            // An update the watch's sieve dropped: nothing the views hold changed.
            Item::Service(Ok(Seen::Unchanged)) | Item::Slice(Ok(Seen::Unchanged)) => {
                return Change::Event {
                    list: matches!(item, Item::Slice(_)) as usize,
                    done: false,
                    changed: self.compiler.is_dirty(),
                }
            }
            Item::Service(Ok(Seen::Event(ev))) => {
                let (put, replace) = (
                    ServiceCompiler::put_service,
                    ServiceCompiler::replace_services,
                );
                (0, self.services.feed(ev, service_view, c, put, replace))
            }
            Item::Slice(Ok(Seen::Event(ev))) => {
                let (put, replace) = (ServiceCompiler::put_slice, ServiceCompiler::replace_slices);
                (1, self.slices.feed(ev, slice_view, c, put, replace))
            }
            Item::Service(Err(e)) => return Change::Error(0, e.to_string()),
            Item::Slice(Err(e)) => return Change::Error(1, e.to_string()),
        };
        self.listed[list] |= done;
        // The compiler keeps a view only when it differs from the one it holds; what it
        // holds differently waits for the next compile.
        Change::Event {
            list,
            done,
            changed: self.compiler.is_dirty(),
        }
    }
}

/// One item of either watch (moved once, straight into [`Views::apply`]: the size difference
/// between the variants costs nothing).
#[allow(clippy::large_enum_variant)]
enum Item {
    Service(Result<Seen<ServiceObjView>, watcher::Error>),
    Slice(Result<Seen<EndpointSliceView>, watcher::Error>),
}

fn service_view(o: &ServiceObjView) -> Option<ServiceView> {
    ServiceView::from_parts(&o.metadata, o.spec.as_ref(), o.status.as_ref())
}

fn slice_view(o: &EndpointSliceView) -> Option<SliceView> {
    SliceView::from_parts(
        &o.metadata,
        &o.address_type,
        o.ports.as_deref(),
        &o.endpoints,
    )
}

/// The compiler of this node's table: its name (local endpoints) and its Service ranges
/// (`firewall.services`, which give the node-port addresses).
pub fn compiler(node: &str, firewall: &Firewall) -> ServiceCompiler {
    ServiceCompiler::new(Scope::new(node, &firewall.services))
}

/// Swaps `table` in: the packet loop translates with it, and the host firewall steers its
/// node ports and ingress IPs into the loop (blocking: one `nft` run when they changed).
fn swap_in(table: &Arc<ServiceTable>, pods: &Pods, firewall: &Firewall) {
    pods.set_services(table.clone());
    if let Err(e) = firewall.set_steering(table.steering()) {
        warn!(error = %e, "cannot steer node ports into the loop (table inet kwire)")
    }
}

/// Starts the service loop ([`run`]) on a thread of its own with an API client of its own
/// (`watches::spawn`), its reads paced by `turn` as the Node and policy watches are (see
/// `watches::Pacer`): Services and EndpointSlices that change often then cost a wake-up per
/// turn, not per event. The health check servers of the table's Services run on that thread
/// too. The loop ends when the returned sender is dropped.
pub fn start(
    config: kube::Config,
    pods: Arc<Pods>,
    firewall: Firewall,
    store: Shared,
    turn: Duration,
    tallies: [Arc<FilterCounts>; 2],
) -> std::io::Result<tokio::sync::oneshot::Sender<()>> {
    super::watches::spawn_stoppable("kwire-services", config, move |client, stop| {
        run(client, pods, firewall, store, turn, tallies, stop)
    })
}

/// Runs until `stop`'s sender is dropped (see [`start`]). `store` holds the views to start
/// from: the saved ones (their table already swapped in) or none.
async fn run(
    client: Client,
    pods: Arc<Pods>,
    firewall: Firewall,
    store: Shared,
    turn: Duration,
    tallies: [Arc<FilterCounts>; 2],
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let health = Arc::new(tokio::sync::Mutex::new(HealthServers::default()));
    if let Some(restored) = pods.services() {
        health.lock().await.apply(restored.health_checks()).await;
    }
    // Listed and watched by the lister (pages fetched ahead, the watch's lines read there):
    // an update whose text changes nothing the views keep (another controller's annotation,
    // managedFields) is dropped by the kind's sieve before it is decoded.
    let [service_tally, slice_tally] = tallies;
    let sieve =
        |kept, tally| -> Option<Arc<dyn Sieve>> { Some(Arc::new(TextSieve::new(kept, tally))) };
    let services = super::lister::watch::<ServiceObjView>(
        client.clone(),
        sieve(&super::objects::SERVICE_KEPT, service_tally),
    )
    .backoff(super::WatchBackoff::default())
    .map(Item::Service);
    let slices = super::lister::watch::<EndpointSliceView>(
        client,
        sieve(&super::objects::SLICE_KEPT, slice_tally),
    )
    .backoff(super::WatchBackoff::default())
    .map(Item::Slice);
    // Shared with the compile on a blocking thread and with the writer that saves the views;
    // the loop below awaits each compile before it takes the next event.
    let take = |item: Item| {
        let mut st = store.lock();
        let change = st.take(item);
        // Saved when a view changed, and once the lists are first complete (an empty
        // cluster's table is a table a restart can start from).
        if let Change::Event { done, changed, .. } = change {
            if (done || changed) && st.complete() {
                store.mark_changed();
            }
        }
        change
    };
    let rebuild = || {
        let pods = pods.clone();
        let (firewall, health) = (firewall.clone(), health.clone());
        let store = store.clone();
        async move {
            let started = Instant::now();
            let compiled =
                tokio::task::spawn_blocking(move || store.lock().compiler.compile()).await;
            match compiled {
                Ok((table, built)) => {
                    info!(
                        services = table.services(),
                        frontends = table.frontends(),
                        without_endpoints = table.without_endpoints(),
                        backend_sets_new = built,
                        took_ms = started.elapsed().as_millis() as u64,
                        "service table swapped in"
                    );
                    let table = Arc::new(table);
                    let t = table.clone();
                    if let Err(e) =
                        tokio::task::spawn_blocking(move || swap_in(&t, &pods, &firewall)).await
                    {
                        warn!(error = %e, "cannot swap the service table in");
                    }
                    health.lock().await.apply(table.health_checks()).await;
                }
                Err(e) => warn!(error = %e, "compiling the service table failed"),
            }
        }
    };
    let events = futures::stream::select(services, slices);
    let watched: fn(&Item) -> bool = |item| match item {
        Item::Service(Ok(seen)) => seen.is_watch_event(),
        Item::Slice(Ok(seen)) => seen.is_watch_event(),
        _ => false,
    };
    debounced(
        events,
        &["Services", "EndpointSlices"],
        "the last service table stays in force",
        (Pacer::new(turn), watched),
        stop,
        take,
        rebuild,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn svc(name: &str, ip: &str) -> ServiceObjView {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIPs": [ip], "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    /// A LoadBalancer Service and a slice as the API serves them: managedFields, annotations
    /// (a last-applied copy), status conditions, topology hints.
    fn full_objects() -> (serde_json::Value, serde_json::Value) {
        let managed = serde_json::json!([{"manager": "kubectl", "operation": "Update",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {}}}}]);
        let svc = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "edge", "uid": "u1", "resourceVersion": "7",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\": 1}"},
                "labels": {"app": "edge"}, "managedFields": managed},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "selector": {"app": "edge"},
                "ports": [{"name": "https", "port": 443, "targetPort": 8443, "nodePort": 30443, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]},
                "conditions": [{"type": "x", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "r", "message": "m"}]}
        });
        let slice = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "edge-abcde", "resourceVersion": "8",
                "labels": {"kubernetes.io/service-name": "edge"}, "managedFields": managed,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "edge", "uid": "u1"}]},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "nodeName": "n1",
                 "targetRef": {"kind": "Pod", "name": "edge-1", "namespace": "shop"},
                 "hints": {"forZones": [{"name": "a"}]}, "zone": "a"},
                {"addresses": ["10.244.2.5"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "n2"}]
        });
        (svc, slice)
    }

    #[test]
    fn stripped_objects_give_the_views_full_objects_give() {
        let (svc, slice) = full_objects();
        let full: Service = serde_json::from_value(svc.clone()).unwrap();
        let view: ServiceObjView = serde_json::from_value(svc).unwrap();
        let v = service_view(&view).expect("a view");
        assert_eq!(Some(&v), ServiceView::from_k8s(&full).as_ref());
        assert_eq!(
            (v.affinity_secs, v.lb_ips.len(), v.health_check_node_port),
            (60, 1, Some(31000))
        );
        assert!(view.metadata.managed_fields.is_none() && view.metadata.annotations.is_none());
        let full: EndpointSlice = serde_json::from_value(slice.clone()).unwrap();
        let view: EndpointSliceView = serde_json::from_value(slice).unwrap();
        let v = slice_view(&view).expect("a view");
        assert_eq!(Some(&v), SliceView::from_k8s(&full).as_ref());
        assert_eq!((v.service.as_str(), v.endpoints.len()), ("edge", 2));
        assert!(view.metadata.managed_fields.is_none());
    }

    /// A Service event as the watch gives it.
    fn service_item(ev: Event<ServiceObjView>) -> Item {
        Item::Service(Ok(Seen::Event(ev)))
    }

    #[test]
    fn an_update_of_nothing_a_view_holds_changes_nothing() {
        let mut st = State::new(ServiceCompiler::new(Scope::default()));
        let changed = |c: Change| match c {
            Change::Event { changed, .. } => changed,
            Change::Error(_, e) => panic!("{e}"),
        };
        for ev in [Event::Init, Event::InitApply(svc("a", "10.96.0.10"))] {
            st.take(service_item(ev));
        }
        let done = st.take(service_item(Event::InitDone));
        assert!(matches!(
            done,
            Change::Event {
                list: 0,
                done: true,
                changed: true
            }
        ));
        st.compiler.compile();
        // Another controller's annotation, a status condition: the view is the same.
        let noisy: ServiceObjView = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "a", "resourceVersion": "99",
                "annotations": {"example.com/owner": "team-x"}},
            "spec": {"clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]},
            "status": {"conditions": [{"type": "x", "status": "True", "reason": "r", "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        assert!(!changed(st.take(service_item(Event::Apply(noisy)))));
        assert!(!changed(
            st.take(service_item(Event::Apply(svc("a", "10.96.0.10"))))
        ));
        // A new ClusterIP is a change, and stays one until the table is compiled.
        assert!(changed(
            st.take(service_item(Event::Apply(svc("a", "10.96.0.20"))))
        ));
        assert!(changed(
            st.take(service_item(Event::Apply(svc("a", "10.96.0.20"))))
        ));
        st.compiler.compile();
        assert!(!changed(
            st.take(service_item(Event::Apply(svc("a", "10.96.0.20"))))
        ));
        assert!(changed(
            st.take(service_item(Event::Delete(svc("a", "10.96.0.20"))))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_rebuilt_after_a_change_or_a_list_not_after_every_event() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
        let events =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        let rebuilds = Arc::new(AtomicUsize::new(0));
        let counted = rebuilds.clone();
        let unpaced: (Pacer, fn(&Change) -> bool) = (Pacer::new(Duration::ZERO), |_| false);
        let task = tokio::spawn(debounced(
            events,
            &["Services", "EndpointSlices"],
            "",
            unpaced,
            std::future::pending::<()>(),
            |c| c,
            move || {
                counted.fetch_add(1, SeqCst);
                std::future::ready(())
            },
        ));
        let event = |list, done, changed| Change::Event {
            list,
            done,
            changed,
        };
        // Waits (in the test's paused time) past a few rebuild ticks. The events are sent
        // half a tick after one, so that none is due while the loop takes them: which of two
        // ready branches `select!` takes first is random.
        tokio::time::sleep(REBUILD_DELAY / 2).await;
        let settle = || tokio::time::sleep(REBUILD_DELAY * 3);
        tx.send(event(0, true, false)).unwrap();
        settle().await;
        assert_eq!(
            rebuilds.load(SeqCst),
            0,
            "not before both lists are complete"
        );
        tx.send(event(1, true, false)).unwrap();
        settle().await;
        assert_eq!(rebuilds.load(SeqCst), 1, "once both lists are complete");
        for _ in 0..100 {
            tx.send(event(1, false, false)).unwrap();
        }
        settle().await;
        assert_eq!(
            rebuilds.load(SeqCst),
            1,
            "updates that changed nothing rebuild nothing"
        );
        for _ in 0..3 {
            tx.send(event(0, false, true)).unwrap();
        }
        settle().await;
        assert_eq!(
            rebuilds.load(SeqCst),
            2,
            "changes within a tick are compiled together"
        );
        drop(tx);
        task.await.unwrap();
    }

    /// The text sieves drop only what changes no view: for random histories of Service and
    /// EndpointSlice updates (annotations, labels, managedFields, spec, status, endpoints and
    /// their conditions), deletes and re-lists, written as an API server writes them (list
    /// pages, watch lines) and read through the lister's line reader with the kind's sieve,
    /// the views folded from what comes through equal those folded from every event decoded
    /// in full. Most annotation-only updates are dropped as text.
    #[tokio::test]
    async fn sieved_histories_fold_to_the_same_views() {
        use crate::node_state::FilterCounts;
        use serde_json::json;
        let mut rand = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut dropped = [0; 2];
        for round in 0..60 {
            let slices = round % 2 == 1;
            let object = |rand: &mut dyn FnMut(u64) -> u64, rv: u64| {
                let name = format!("o{}", rand(3));
                // What views read changes in one update of four or so; the rest is noise.
                let mut rand = |n: u64| if rand(4) == 0 { rand(n) } else { 0 };
                let meta = json!({"name": name, "namespace": "shop", "uid": format!("u-{name}"),
                    "resourceVersion": rv.to_string(),
                    "labels": {"kubernetes.io/service-name": format!("s{}", rand(2)), "x": rand(2).to_string()},
                    "annotations": {"note": rv.to_string()},
                    "managedFields": [{"manager": "m", "time": rv.to_string()}]});
                if slices {
                    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080 + rand(2), "protocol": "TCP"}],
                        "endpoints": [{"addresses": [format!("10.244.1.{}", rand(2) + 1)],
                            "conditions": {"ready": rand(2) == 0}, "nodeName": "n1"}]})
                } else {
                    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                        "spec": {"type": "LoadBalancer", "clusterIPs": [format!("10.96.0.{}", rand(2) + 10)],
                            "ports": [{"port": 80 + rand(2), "nodePort": 30080}]},
                        "status": {"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{}", rand(2) + 1)}]}}})
                }
            };
            let kept = if slices {
                &crate::agent::objects::SLICE_KEPT
            } else {
                &crate::agent::objects::SERVICE_KEPT
            };
            let tally = Arc::new(FilterCounts::default());
            let sieve: Arc<dyn Sieve> = Arc::new(TextSieve::new(kept, tally.clone()));
            // Views by name: from every event decoded, and from what the reader gave.
            let view = |o: &serde_json::Value| -> Option<String> {
                if slices {
                    let v: EndpointSliceView = serde_json::from_value(o.clone()).unwrap();
                    slice_view(&v).map(|v| format!("{v:?}"))
                } else {
                    let v: ServiceObjView = serde_json::from_value(o.clone()).unwrap();
                    service_view(&v).map(|v| format!("{v:?}"))
                }
            };
            let (mut all, mut through) = (BTreeMap::new(), BTreeMap::new());
            let name = |o: &serde_json::Value| o["metadata"]["name"].as_str().unwrap().to_string();
            let mut lines = Vec::new();
            // Reads the lines so far through the line reader and folds what comes out.
            async fn read(
                lines: &mut Vec<String>,
                sieve: &Arc<dyn Sieve>,
                slices: bool,
                through: &mut BTreeMap<String, Option<String>>,
            ) {
                use kube::core::WatchEvent::{Added, Deleted, Modified};
                let body = || futures::io::Cursor::new(lines.join("\n").into_bytes());
                fn fold<K: ResourceExt>(
                    through: &mut BTreeMap<String, Option<String>>,
                    ev: kube::core::WatchEvent<K>,
                    view: impl Fn(&K) -> Option<String>,
                ) {
                    match ev {
                        Added(o) | Modified(o) => {
                            through.insert(o.name_any(), view(&o));
                        }
                        Deleted(o) => {
                            through.remove(&o.name_any());
                        }
                        _ => {}
                    }
                }
                async fn through_reader<K>(
                    body: futures::io::Cursor<Vec<u8>>,
                    sieve: &Arc<dyn Sieve>,
                    through: &mut BTreeMap<String, Option<String>>,
                    view: impl Fn(&K) -> Option<String>,
                ) where
                    K: kube::Resource + ResourceExt + serde::de::DeserializeOwned + Send + 'static,
                {
                    let evs: Vec<_> =
                        super::super::lister::events::<K, _>(body, Some(sieve.clone()))
                            .collect()
                            .await;
                    for ev in evs {
                        fold(through, ev.unwrap(), &view);
                    }
                }
                if slices {
                    through_reader(body(), sieve, through, |o: &EndpointSliceView| {
                        slice_view(o).map(|v| format!("{v:?}"))
                    })
                    .await;
                } else {
                    through_reader(body(), sieve, through, |o: &ServiceObjView| {
                        service_view(o).map(|v| format!("{v:?}"))
                    })
                    .await;
                }
                lines.clear();
            }
            for rv in 1..=60u64 {
                match rand(10) {
                    0 => {
                        // A re-list: the lines so far are read, then the list replaces all.
                        read(&mut lines, &sieve, slices, &mut through).await;
                        let items: Vec<_> = (0..rand(4)).map(|_| object(&mut rand, rv)).collect();
                        all = items.iter().map(|o| (name(o), view(o))).collect();
                        through = all.clone();
                        sieve.relist();
                        let page = json!({"metadata": {"resourceVersion": rv.to_string()}, "items": items});
                        sieve.listed(&page.to_string());
                    }
                    1 => {
                        let o = object(&mut rand, rv);
                        all.remove(&name(&o));
                        lines.push(format!(r#"{{"type":"DELETED","object":{o}}}"#));
                    }
                    2 => {
                        let o = object(&mut rand, rv);
                        all.insert(name(&o), view(&o));
                        lines.push(format!(r#"{{"type":"ADDED","object":{o}}}"#));
                    }
                    _ => {
                        let o = object(&mut rand, rv);
                        all.insert(name(&o), view(&o));
                        lines.push(format!(r#"{{"type":"MODIFIED","object":{o}}}"#));
                    }
                }
            }
            read(&mut lines, &sieve, slices, &mut through).await;
            assert_eq!(all, through, "round {round}");
            dropped[slices as usize] += tally.get().1;
        }
        assert!(
            dropped.iter().all(|d| *d > 100),
            "updates dropped as text (Services, EndpointSlices): {dropped:?}"
        );
    }

    #[test]
    fn rebuilds_keep_to_a_grid_of_ticks() {
        let start = tokio::time::Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(next_tick(start, start), at(100));
        assert_eq!(next_tick(start, at(1)), at(100));
        assert_eq!(next_tick(start, at(99)), at(100));
        assert_eq!(next_tick(start, at(100)), at(200), "always after now");
        assert_eq!(next_tick(start, at(1234)), at(1300));
    }

    #[test]
    fn views_follow_events_and_a_relist_replaces_them() {
        let mut c = ServiceCompiler::new(Scope::default());
        let mut r = Relist::<ServiceView>::default();
        let mut feed = |c: &mut ServiceCompiler, ev: Event<ServiceObjView>| {
            let (put, replace) = (
                ServiceCompiler::put_service,
                ServiceCompiler::replace_services,
            );
            r.feed(ev, service_view, c, put, replace);
            c.compile().0
        };
        feed(&mut c, Event::Apply(svc("a", "10.96.0.10")));
        let t = feed(&mut c, Event::Apply(svc("b", "10.96.0.11")));
        assert_eq!(t.services(), 2);
        // A headless Service has nothing to translate: its view goes.
        let t = feed(&mut c, Event::Apply(svc("b", "None")));
        assert_eq!(t.services(), 1);
        feed(&mut c, Event::Init);
        let t = feed(&mut c, Event::InitApply(svc("c", "10.96.0.12")));
        assert_eq!(
            t.service_names(),
            ["shop/a"],
            "the old list holds until the new one is complete"
        );
        let t = feed(&mut c, Event::InitDone);
        assert_eq!((t.services(), t.service_names()), (1, vec!["shop/c"]));
        let t = feed(&mut c, Event::Delete(svc("c", "10.96.0.12")));
        assert_eq!(t.services(), 0);
    }
}
