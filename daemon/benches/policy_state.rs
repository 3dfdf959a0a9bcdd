//! What saving and restoring the NetworkPolicy inputs costs at issue 17's scale: 150,000 pods
//! (5,000 nodes x 30, 7 labels each, two ports), 500 namespaces, 5,000 policies, folded into
//! the policy loop's Folder as the API lists deliver them:
//! - `save`: one write of the file (encoded from the Folder's index under its lock, then
//!   written and synced);
//! - `encode`: the encoding of a write, in one go; the agent makes it in steps of one
//!   namespace, each under the Folder's lock (printed: the longest step, what the policy loop
//!   may wait for);
//! - `load_and_compile`: one start's restore up to the snapshot that is swapped in before pods
//!   re-attach (read, checksum, decode into a Folder, snapshot).
//!
//! Prints the file's size, the resident memory of the Folder (the index, which the agent holds
//! anyway) and what saving adds to it (no copy is kept; a write's buffer is freed after it),
//! and one restore's phases.
//!
//! Run as a test (`cargo test --bench policy_state`), the cluster is a tenth of the size.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use kube::runtime::watcher::Event;
use kwire::agent::policy::{Change, Folder, FolderStore};
use kwire::agent::policy_state::{self, Persist};
use kwire::policy::{PolicyIndex, Scope};
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

/// The three lists, one item at a time.
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
    let persist = Persist::new(&dir, Folder::new("node-0"));
    changes(|ch| persist.folder().fold(ch));
    let folded = rss_kib();
    persist.changed();
    persist.save_if_dirty();
    let saved = rss_kib();
    let file = dir.join(policy_state::POLICY_STATE_FILE);
    eprintln!(
        "policy_state: {} pods; the Folder holds {} MiB of RSS, saving adds {} MiB; file {:.1} MiB",
        150_000 / scale(),
        folded.saturating_sub(before) / 1024,
        saved.saturating_sub(folded) / 1024,
        std::fs::metadata(&file).map_or(0, |m| m.len()) as f64 / (1024.0 * 1024.0)
    );
    // One restore's phases (the criterion figure below is the whole).
    let t = Instant::now();
    let bytes = std::fs::read(&file).unwrap();
    let read = t.elapsed();
    let body = &bytes[policy_state::HEADER..];
    let t = Instant::now();
    let mut index = PolicyIndex::restore_inputs(Scope::Node("node-0".into()), body).unwrap();
    let decode = t.elapsed();
    let t = Instant::now();
    black_box(index.snapshot());
    eprintln!(
        "policy_state: restore phases: read {read:?}, decode into the index {decode:?}, snapshot {:?}",
        t.elapsed()
    );
    drop(index);
    // The save in steps, as the writer makes it: what each step holds the Folder's lock for.
    let mut longest = Vec::new();
    let mut steps = Vec::new();
    for _ in 0..10 {
        let folder = persist.folder();
        let mut save = folder.index.start_save();
        let mut times = Vec::new();
        loop {
            let t = Instant::now();
            let more = save.step(&folder.index);
            times.push(t.elapsed());
            if !more {
                break;
            }
        }
        black_box(save.finish());
        times.sort();
        longest.push(*times.last().unwrap());
        steps.push(times[times.len() / 2]);
    }
    longest.sort();
    steps.sort();
    eprintln!(
        "policy_state: a save in steps of one namespace ({} namespaces): median step {:?}, longest step {:?} (medians of 10 saves)",
        500 / scale(),
        steps[5],
        longest[5]
    );

    let mut g = c.benchmark_group("policy_state");
    g.sample_size(10);
    g.bench_function("save", |b| {
        b.iter(|| {
            persist.changed();
            persist.save_if_dirty();
        })
    });
    g.bench_function("encode", |b| {
        b.iter(|| black_box(policy_state::encode(&persist.folder().index)))
    });
    g.bench_function("load_and_compile", |b| {
        b.iter(|| {
            let mut folder = policy_state::load(&dir, "node-0").unwrap().unwrap();
            black_box(folder.index.snapshot())
        })
    });
    g.finish();
    std::fs::remove_dir_all(&dir).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
