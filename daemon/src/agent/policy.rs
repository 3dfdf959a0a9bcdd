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

enum Change {
    /// A watch event; `true` when it completed a full list.
    Event(usize, bool),
    Error(usize, String),
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
        .map(move |r| match r {
            Ok(Event::InitDone) => Change::Event(idx, true),
            Ok(_) => Change::Event(idx, false),
            Err(e) => Change::Error(idx, e.to_string()),
        });
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
    let mut events = std::pin::pin!(events);
    let mut listed = [false; 3];
    let mut dirty = false;
    // One warning per failing watch per interval.
    let mut last_err: [Option<Instant>; 3] = [None; 3];
    let mut tick = tokio::time::interval(REBUILD_DELAY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Change::Event(i, done)) => {
                    listed[i] |= done;
                    dirty = true;
                }
                Some(Change::Error(i, e)) => {
                    if last_err[i].is_none_or(|t| t.elapsed() >= super::WATCH_ERROR_LOG_INTERVAL) {
                        let what = ["Pods", "Namespaces", "NetworkPolicies"][i];
                        warn!(error = %e, "watching {what} failed; retrying with backoff, the last policy stays in force");
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
                let (p, n, np) = (owned(&pod_store), owned(&ns_store), owned(&np_store));
                let started = Instant::now();
                let compiled = tokio::task::spawn_blocking(move || {
                    let (set, errors) = PolicySet::from_k8s(&n, &p, &np);
                    (set, errors.iter().map(ToString::to_string).collect::<Vec<_>>(), np.len())
                })
                .await;
                match compiled {
                    Ok((set, errors, count)) => {
                        for e in errors.iter().take(10) {
                            warn!(problem = %e, "NetworkPolicy input read fail-closed or skipped");
                        }
                        pods.set_policy(Arc::new(set));
                        info!(policies = count, took_ms = started.elapsed().as_millis() as u64, "NetworkPolicy snapshot swapped in");
                    }
                    Err(e) => warn!(error = %e, "compiling NetworkPolicies failed"),
                }
            }
        }
    }
}
