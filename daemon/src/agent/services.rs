//! Services for the packet loop: watches Services and EndpointSlices cluster wide, keeps only
//! their stripped views (not the full objects), and after any change (at most every
//! [`REBUILD_DELAY`]) compiles a new [`ServiceTable`] and swaps it in. Nothing
//! is translated before both lists have been read once; while the API is unreachable the
//! last table stays in force.

use super::pod_network::Firewall;
use super::service_health::HealthServers;
use crate::dataplane::ports::Pods;
use crate::services::table::{Pools, Scope};
use crate::services::{ServiceTable, ServiceView, SliceView};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Changes arriving within this window are compiled together.
pub const REBUILD_DELAY: Duration = Duration::from_millis(100);

/// What one watch item did to the watched lists.
enum Change {
    /// A watch event of list `0`; `true` when it completed a full list.
    Event(usize, bool),
    /// Watch `0` failed (it retries with backoff).
    Error(usize, String),
}

/// The control loop of a compiled snapshot: takes watch items (`take` applies each and says
/// what changed), and after any change, at most every [`REBUILD_DELAY`] and only once every
/// list in `kinds` was read in full, runs `rebuild`. Each watch's errors are logged at most
/// once per `WATCH_ERROR_LOG_INTERVAL` (`keeps`: what stays in force meanwhile). Runs until the streams end.
async fn debounced<I, F: std::future::Future<Output = ()>>(
    events: impl futures::Stream<Item = I>,
    kinds: &'static [&'static str],
    keeps: &'static str,
    mut take: impl FnMut(I) -> Change,
    mut rebuild: impl FnMut() -> F,
) {
    let mut events = std::pin::pin!(events);
    let mut listed = vec![false; kinds.len()];
    let mut dirty = false;
    // One warning per failing watch per interval.
    let mut last_err: Vec<Option<Instant>> = vec![None; kinds.len()];
    let mut tick = tokio::time::interval(REBUILD_DELAY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.next() => match ev.map(&mut take) {
                Some(Change::Event(i, done)) => {
                    listed[i] |= done;
                    dirty = true;
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
            _ = tick.tick() => {
                if !dirty || !listed.iter().all(|l| *l) {
                    continue;
                }
                dirty = false;
                rebuild().await;
            }
        }
    }
}

/// The views of one kind, by object (namespace, name); a re-list builds a fresh map.
struct Views<V> {
    current: BTreeMap<(String, String), V>,
    relisting: Option<BTreeMap<(String, String), V>>,
}

impl<V> Default for Views<V> {
    fn default() -> Self {
        Views {
            current: BTreeMap::new(),
            relisting: None,
        }
    }
}

impl<V> Views<V> {
    /// Applies one watch event; `view` strips an object (`None`: nothing to translate).
    fn apply<K: ResourceExt>(&mut self, ev: Event<K>, view: impl Fn(&K) -> Option<V>) {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match ev {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                if let (Some(m), Some(v)) = (self.relisting.as_mut(), view(&o)) {
                    m.insert(key(&o), v);
                }
            }
            Event::InitDone => {
                if let Some(m) = self.relisting.take() {
                    self.current = m;
                }
            }
            Event::Apply(o) => match view(&o) {
                Some(v) => {
                    self.current.insert(key(&o), v);
                }
                None => {
                    self.current.remove(&key(&o));
                }
            },
            Event::Delete(o) => {
                self.current.remove(&key(&o));
            }
        }
    }
}

#[derive(Default)]
struct State {
    services: Views<ServiceView>,
    slices: Views<SliceView>,
}

/// One item of either watch (moved once, straight into [`Views::apply`]: the size difference
/// between the variants costs nothing).
#[allow(clippy::large_enum_variant)]
enum Item {
    Service(Result<Event<Service>, watcher::Error>),
    Slice(Result<Event<EndpointSlice>, watcher::Error>),
}

/// What the node's table depends on besides the objects: its name (local endpoints) and the
/// host firewall that steers its node ports (which also gives the node-port addresses).
pub struct NodeScope {
    pub node: String,
    pub firewall: Firewall,
}

/// Runs until aborted.
pub async fn run(client: Client, pods: Arc<Pods>, node: NodeScope) {
    let scope = Arc::new(Scope::new(&node.node, &node.firewall.services));
    let firewall = node.firewall;
    let health = Arc::new(tokio::sync::Mutex::new(HealthServers::default()));
    // The last compile's Maglev tables: a recompile builds only the changed Services'.
    let pools = Arc::new(Mutex::new(Pools::default()));
    let cfg = watcher::Config::default;
    let services = watcher::watcher(Api::<Service>::all(client.clone()), cfg())
        .backoff(super::WatchBackoff::default())
        .map(Item::Service);
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client), cfg())
        .backoff(super::WatchBackoff::default())
        .map(Item::Slice);
    let state = Mutex::new(State::default());
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let take = |item: Item| {
        let mut st = lock();
        match item {
            Item::Service(Ok(ev)) => {
                let done = matches!(ev, Event::InitDone);
                st.services.apply(ev, ServiceView::from_k8s);
                Change::Event(0, done)
            }
            Item::Slice(Ok(ev)) => {
                let done = matches!(ev, Event::InitDone);
                st.slices.apply(ev, SliceView::from_k8s);
                Change::Event(1, done)
            }
            Item::Service(Err(e)) => Change::Error(0, e.to_string()),
            Item::Slice(Err(e)) => Change::Error(1, e.to_string()),
        }
    };
    let rebuild = || {
        let (services, slices): (Vec<ServiceView>, Vec<SliceView>) = {
            let st = lock();
            (
                st.services.current.values().cloned().collect(),
                st.slices.current.values().cloned().collect(),
            )
        };
        let pods = pods.clone();
        let (scope, firewall, health) = (scope.clone(), firewall.clone(), health.clone());
        let pools = pools.clone();
        async move {
            let started = Instant::now();
            let compiled = tokio::task::spawn_blocking(move || {
                let mut pools = pools.lock().unwrap_or_else(|p| p.into_inner());
                ServiceTable::compile_with(&services, &slices, &scope, &mut pools)
            })
            .await;
            match compiled {
                Ok((table, built)) => {
                    info!(
                        services = table.services(),
                        frontends = table.frontends(),
                        without_endpoints = table.without_endpoints(),
                        maglev_tables_built = built,
                        took_ms = started.elapsed().as_millis() as u64,
                        "service table swapped in"
                    );
                    let table = Arc::new(table);
                    pods.set_services(table.clone());
                    let steer = table.steering().clone();
                    let fw = firewall.clone();
                    match tokio::task::spawn_blocking(move || fw.set_steering(&steer)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            warn!(error = %e, "cannot steer node ports into the loop (table inet kwire)")
                        }
                        Err(e) => warn!(error = %e, "cannot steer node ports into the loop"),
                    }
                    health.lock().await.apply(table.health_checks()).await;
                }
                Err(e) => warn!(error = %e, "compiling the service table failed"),
            }
        }
    };
    let events = futures::stream::select(services, slices);
    debounced(
        events,
        &["Services", "EndpointSlices"],
        "the last service table stays in force",
        take,
        rebuild,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIPs": [ip], "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn views_follow_events_and_a_relist_replaces_them() {
        let mut v = Views::<ServiceView>::default();
        v.apply(Event::Apply(svc("a", "10.96.0.10")), ServiceView::from_k8s);
        v.apply(Event::Apply(svc("b", "10.96.0.11")), ServiceView::from_k8s);
        // A headless Service has nothing to translate: its view goes.
        v.apply(Event::Apply(svc("b", "None")), ServiceView::from_k8s);
        assert_eq!(v.current.len(), 1);
        v.apply(Event::Init, ServiceView::from_k8s);
        v.apply(
            Event::InitApply(svc("c", "10.96.0.12")),
            ServiceView::from_k8s,
        );
        assert_eq!(
            v.current.len(),
            1,
            "the old list holds until the new one is complete"
        );
        v.apply(Event::InitDone, ServiceView::from_k8s);
        let names: Vec<_> = v.current.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["c"]);
        v.apply(Event::Delete(svc("c", "10.96.0.12")), ServiceView::from_k8s);
        assert!(v.current.is_empty());
    }
}
