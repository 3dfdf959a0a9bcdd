//! What one watch event costs the agent between the TLS plaintext and the filter's verdict,
//! for the events it drops (issue 17's irrelevant update: a kubelet's status heartbeat):
//! - `pod/scan`: serde_json skipping the whole line (`IgnoredAny`), the floor of any parse;
//! - `pod/view`: the line decoded as kube-rs's watcher decodes it (`WatchEvent<PodView>` from a
//!   `&str`: the view keeps only what NetworkPolicy reads, see `agent::objects`);
//! - `pod/view_and_filter`: that and `PodFilter::pass`, which drops it;
//! - `pod/sieve`: what the agent does with it instead, undecoded (`PodFilter`'s
//!   `unchanged_text` reads the fingerprint from the text and drops it);
//! - the same four for a Node heartbeat and `NodeFilter`.
//!
//! The objects are shaped as a cluster's are (managedFields, conditions, container statuses,
//! images): `agent_scale`'s synthetic cluster's, from its own source file. Each iteration decodes a
//! fresh heartbeat (its time and resourceVersion differ), so the filters compare against a
//! remembered view as in the agent.
//!
//! Run as a test (`cargo test --bench watch_decode`), each case runs once.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use kube::core::WatchEvent;
use kube::runtime::watcher::Event;
use kwire::agent::objects::{NodeView, PodView};
use kwire::agent::watches::{NodeFilter, PodFilter, TextFilter};
use serde::de::IgnoredAny;
use serde_json::json;

/// The synthetic cluster's shapes, shared with `agent_scale` (the bench reads the same file).
#[allow(dead_code)]
#[path = "../../tests/examples/agent_scale/synth.rs"]
mod synth;

/// What the API server adds to a stored object: its uid and resourceVersion.
fn stored(mut object: serde_json::Value, uid: &str, rv: u64) -> serde_json::Value {
    object["metadata"]["uid"] = json!(uid);
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    object
}

/// A Pod status heartbeat as a watch line: only the probe time, the restart count and the
/// resourceVersion change with `beat`.
fn pod_line(beat: u64) -> String {
    let d = &synth::deployments(1, 300)[0];
    let labels = synth::pod_labels(1, d, 1);
    let mut pod = synth::pod(&synth::ns_name(1), "web-0-7f9c", "node-00001", labels);
    pod["status"] = synth::pod_status("10.244.1.7", "192.0.2.1", beat)["status"].clone();
    watch_line(&stored(
        pod,
        "5b1c2a9e-0000-4000-8000-000000000001",
        1000 + beat,
    ))
}

/// A Node status heartbeat as a watch line (the kubelet's every ten seconds).
fn node_line(beat: u64) -> String {
    let key = "hCrsvDtCH1BHp6m0fYUJcMvnFjeiM1aUEW6sSB62F1c=";
    let mut node = synth::node("node-00001", "192.0.2.1", key, "192.0.2.1:51820");
    node["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    node["spec"] = json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]});
    node["status"] = synth::node_status_body("192.0.2.1", "node-00001", beat)["status"].clone();
    watch_line(&stored(
        node,
        "5b1c2a9e-0000-4000-8000-000000000002",
        1000 + beat,
    ))
}

/// A MODIFIED watch line as kube-apiserver writes it: `type` before `object` (a `json!` map
/// would sort `object` first, and serde would buffer the whole object before the tag).
fn watch_line(object: &serde_json::Value) -> String {
    format!("{{\"type\":\"MODIFIED\",\"object\":{object}}}")
}

/// Lines of 64 consecutive heartbeats, cycled through.
fn lines(f: fn(u64) -> String) -> Vec<String> {
    (0..64).map(f).collect()
}

fn object<K>(ev: WatchEvent<K>) -> K {
    match ev {
        WatchEvent::Added(k) | WatchEvent::Modified(k) | WatchEvent::Deleted(k) => k,
        _ => panic!("not an object event"),
    }
}

/// The three cases of one kind: `lines` cycled through, `pass` the kind's filter, which must
/// pass the first line's view and drop every later one.
fn group<K: serde::de::DeserializeOwned>(
    c: &mut Criterion,
    kind: &str,
    lines: &[String],
    mut pass: impl FnMut(K) -> bool,
) {
    let decode = |l: &str| object(serde_json::from_str::<WatchEvent<K>>(l).unwrap());
    let mut i = 0;
    let mut next = || {
        i = (i + 1) % lines.len();
        lines[i].clone()
    };
    let mut g = c.benchmark_group(kind);
    g.bench_function("scan", |b| {
        b.iter_batched(
            &mut next,
            |l| black_box(serde_json::from_str::<IgnoredAny>(&l).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("view", |b| {
        b.iter_batched(
            &mut next,
            |l| black_box(decode(&l)),
            criterion::BatchSize::SmallInput,
        )
    });
    assert!(pass(decode(&lines[0])), "the first view is news");
    g.bench_function("view_and_filter", |b| {
        b.iter_batched(
            &mut next,
            |l| assert!(!pass(decode(&l)), "a heartbeat is dropped"),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// `pod/sieve`, `node/sieve`: what the watch's line reader does with a heartbeat instead of
/// decoding it: the filter reads the object's text for its fingerprint, finds it unchanged,
/// and the line is dropped undecoded (`TextFilter::unchanged_text`). `item` makes the first
/// line's view an update the filter is given first.
fn sieve<K: serde::de::DeserializeOwned, F: TextFilter>(
    c: &mut Criterion,
    name: &str,
    lines: &[String],
    mut f: F,
    item: impl Fn(K) -> F::Item,
) {
    let first: WatchEvent<K> = serde_json::from_str(&lines[0]).unwrap();
    assert!(f.pass(&item(object(first))), "the first view is news");
    const MODIFIED: &str = r#"{"type":"MODIFIED","object":"#;
    let mut i = 0;
    let mut next = || {
        i = (i + 1) % lines.len();
        lines[i].clone()
    };
    c.bench_function(name, |b| {
        b.iter_batched(
            &mut next,
            |l| {
                let object = l.strip_prefix(MODIFIED).expect("a MODIFIED line");
                assert!(f.unchanged_text(object).is_some(), "a heartbeat is dropped")
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn bench(c: &mut Criterion) {
    let pods = lines(pod_line);
    let nodes = lines(node_line);
    println!(
        "watch line: Pod {} bytes, Node {} bytes",
        pods[0].len(),
        nodes[0].len()
    );
    let mut pod_filter = PodFilter::new(Arc::default());
    group(c, "pod", &pods, |v: PodView| {
        pod_filter.pass(&Event::Apply(v))
    });
    let filter = PodFilter::new(Arc::default());
    sieve(c, "pod/sieve", &pods, filter, Event::Apply);
    let mut node_filter = NodeFilter::new("another-node", Arc::default());
    group(c, "node", &nodes, |v: NodeView| {
        node_filter.pass(&Ok(Event::Apply(v)))
    });
    let filter = NodeFilter::new("another-node", Arc::default());
    sieve(c, "node/sieve", &nodes, filter, |v: NodeView| {
        Ok(Event::Apply(v))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
