//! NetworkPolicy for the packet loop: watches Pods, Namespaces and NetworkPolicies cluster
//! wide, and after any change (at most every [`REBUILD_DELAY`]) compiles a new snapshot and
//! swaps it in. Nothing is enforced before all three lists have been read once.

use crate::dataplane::ports::Pods;
use crate::policy::PolicySet;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Changes arriving within this window are compiled together.
pub const REBUILD_DELAY: Duration = Duration::from_millis(100);

/// What one watch item did to the watched lists.
pub(super) enum Change {
    /// A watch event of list `0`; `true` when it completed a full list.
    Event(usize, bool),
    /// Watch `0` failed (it retries with backoff).
    Error(usize, String),
}

impl<K> From<(usize, Result<Event<K>, watcher::Error>)> for Change {
    fn from((idx, r): (usize, Result<Event<K>, watcher::Error>)) -> Change {
        match r {
            Ok(Event::InitDone) => Change::Event(idx, true),
            Ok(_) => Change::Event(idx, false),
            Err(e) => Change::Error(idx, e.to_string()),
        }
    }
}

fn watch<K>(api: Api<K>, idx: usize) -> (Store<K>, impl futures::Stream<Item = Change>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let s = reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
        .backoff(super::WatchBackoff::default())
        .map(move |r| Change::from((idx, r)));
    (store, s)
}

fn owned<K>(s: &Store<K>) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    s.state().iter().map(|o| (**o).clone()).collect()
}

/// Runs until aborted.
pub async fn run(client: Client, pods: Arc<Pods>) {
    let (pod_store, s0) = watch(Api::<Pod>::all(client.clone()), 0);
    let (ns_store, s1) = watch(Api::<Namespace>::all(client.clone()), 1);
    let (np_store, s2) = watch(Api::<NetworkPolicy>::all(client), 2);
    let events = futures::stream::select(futures::stream::select(s0, s1), s2);
    let kinds = &["Pods", "Namespaces", "NetworkPolicies"];
    let rebuild = || {
        let (p, n, np) = (owned(&pod_store), owned(&ns_store), owned(&np_store));
        let pods = pods.clone();
        async move {
            let started = Instant::now();
            let compiled = tokio::task::spawn_blocking(move || {
                let (set, errors) = PolicySet::from_k8s(&n, &p, &np);
                (
                    set,
                    errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    np.len(),
                )
            })
            .await;
            match compiled {
                Ok((set, errors, count)) => {
                    for e in errors.iter().take(10) {
                        warn!(problem = %e, "NetworkPolicy input read fail-closed or skipped");
                    }
                    pods.set_policy(Arc::new(set));
                    info!(
                        policies = count,
                        took_ms = started.elapsed().as_millis() as u64,
                        "NetworkPolicy snapshot swapped in"
                    );
                }
                Err(e) => warn!(error = %e, "compiling NetworkPolicies failed"),
            }
        }
    };
    debounced(
        events,
        kinds,
        "the last policy stays in force",
        |c| c,
        rebuild,
    )
    .await
}

/// The control loop of a compiled snapshot: takes watch items (`take` applies each and says
/// what changed), and after any change, at most every [`REBUILD_DELAY`] and only once every
/// list in `kinds` was read in full, runs `rebuild`. Each watch's errors are logged at most
/// once per `WATCH_ERROR_LOG_INTERVAL` (`keeps`: what stays in force meanwhile). Runs until the streams end.
pub(super) async fn debounced<I, F: std::future::Future<Output = ()>>(
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
