//! What saving and restoring the NetworkPolicy inputs costs at issue 17's scale: 150,000 pods
//! (5,000 nodes x 30, 7 labels each, two ports), 500 namespaces, 5,000 policies, as the policy
//! loop keeps them (`agent::policy_state::Store`): one write of the file, and one start's
//! load into a Folder (the compiled snapshot included). Prints the file's size and the
//! resident memory the kept views add.
//!
//! Run as a test (`cargo test --bench policy_state`), the cluster is a tenth of the size.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use kube::runtime::watcher::Event;
use kwire::agent::policy::{Change, Recorder};
use kwire::agent::policy_state::{self, Persist, Store};
use serde_json::json;

fn scale() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        1
    } else {
        10
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The three lists, one item at a time (each dropped once kept: the RSS measured is the Store's).
fn changes(mut f: impl FnMut(Change)) {
    let (nodes, namespaces) = (5000 / scale(), 500 / scale());
    f(Change::Namespace(Event::Init));
    for ns in 0..namespaces {
        f(Change::Namespace(Event::InitApply(
            serde_json::from_value(json!({"metadata": {"name": format!("ns-{ns}"),
                "labels": {"team": format!("team-{}", ns % 40)}}}))
            .unwrap(),
        )));
    }
    f(Change::Namespace(Event::InitDone));
    f(Change::Policy(Event::Init));
    for ns in 0..namespaces {
        for p in 0..10 {
            f(Change::Policy(Event::InitApply(
                serde_json::from_value(json!({
                    "metadata": {"name": format!("p-{p}"), "namespace": format!("ns-{ns}")},
                    "spec": {"podSelector": {"matchLabels": {"app": format!("app-{p}")}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels":
                            {"tier": "frontend"}}}], "ports": [{"port": 8080}]}]}
                }))
                .unwrap(),
            )));
        }
    }
    f(Change::Policy(Event::InitDone));
    f(Change::Pod(Event::Init));
    for i in 0..nodes * 30 {
        let (ns, app) = (i % namespaces, i % 10);
        let tier = ["frontend", "backend", "db", "cache", "worker"][app % 5];
        f(Change::Pod(Event::InitApply(
            serde_json::from_value(json!({
                "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{ns}"),
                    "resourceVersion": "1", "labels": {
                    "app": format!("app-{app}"), "app.kubernetes.io/name": format!("app-{app}"),
                    "app.kubernetes.io/part-of": format!("system-{}", ns % 5),
                    "tier": tier,
                    "version": "v1", "team": format!("team-{}", ns % 40),
                    "pod-template-hash": format!("{:08x}", ns * 1000 + app * 10)}},
                "spec": {"nodeName": format!("node-{}", i / 30), "containers": [{"name": "c",
                    "ports": [{"name": "http", "containerPort": 8080},
                        {"name": "metrics", "containerPort": 9090}]}]},
                "status": {"phase": "Running",
                    "podIP": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)}
            }))
            .unwrap(),
        )));
    }
    f(Change::Pod(Event::InitDone));
}

fn bench(c: &mut Criterion) {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("kwire-bench-policy-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let before = rss_kib();
    let persist = Persist::new(Store::new(&dir));
    changes(|ch| persist.record(&ch));
    let after = rss_kib();
    persist.changed();
    policy_state::flush(&persist);
    let file = dir.join(policy_state::POLICY_STATE_FILE);
    eprintln!(
        "policy_state: {} pods kept in {} MiB of RSS; file {} MiB",
        150_000 / scale(),
        (after.saturating_sub(before)) / 1024,
        std::fs::metadata(&file).map_or(0, |m| m.len()) / (1024 * 1024)
    );
    let mut g = c.benchmark_group("policy_state");
    g.sample_size(10);
    g.bench_function("save", |b| {
        b.iter(|| {
            persist.changed();
            policy_state::flush(&persist);
        })
    });
    g.bench_function("load_and_compile", |b| {
        b.iter(|| {
            let (mut folder, _) = policy_state::load(&dir, "node-0").unwrap().unwrap();
            black_box(folder.index.snapshot())
        })
    });
    g.finish();
    std::fs::remove_dir_all(&dir).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
