//! The saved inputs ([`PolicyIndex::save_inputs`], `saved.rs`) read back into an index.

use std::collections::BTreeMap;

use super::index::{PolicyIndex, Scope};
use super::model::ContainerPort;
use super::saved::{SavedError, Writer};
use super::spec::Policy;
use super::{Namespace, PolicySet, Protocol, Verdict};

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Policy {
    let np = serde_json::from_value(
        serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .unwrap();
    Policy::from_k8s_lenient(&np).unwrap().0
}

fn pod(ns: &str, name: &str, ips: &[&str], node: &str, app: &str) -> crate::policy::Pod {
    crate::policy::Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: BTreeMap::from([("app".into(), app.into())]),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        // A named port (kept) and an unnamed one (policy cannot name it: not kept).
        container_ports: [
            (Some("http"), 8080, Protocol::Tcp),
            (None, 81, Protocol::Udp),
        ]
        .map(|(name, port, protocol)| ContainerPort {
            name: name.map(String::from),
            port,
            protocol,
        })
        .into(),
        node_name: node.into(),
        host_network: false,
    }
}

/// Every kind of part a policy can have, invalid ones included.
fn odd_policies() -> Vec<Policy> {
    vec![
        policy(
            "x",
            "every-part",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "a"},
                    "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x", "y"]},
                        {"key": "k", "operator": "Exists"}, {"key": "j", "operator": "DoesNotExist"}]},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{}, {"from": [
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                    {"ipBlock": {"cidr": "fd00::/64"}},
                    {"ipBlock": {"cidr": "not-a-cidr"}},
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}],
                    "ports": [{"port": 80, "endPort": 90}, {"port": "http"},
                        {"protocol": "UDP"}, {"protocol": "SCTP", "port": 70000}]}],
                "egress": [{"to": [{"podSelector": {"matchExpressions":
                    [{"key": "app", "operator": "In", "values": ["a", "b"]}]}}]}]
            }),
        ),
        policy(
            "x",
            "bad-selector",
            serde_json::json!({"podSelector": {"matchExpressions":
                [{"key": "a", "operator": "Sometimes"}]}, "policyTypes": ["Egress"]}),
        ),
    ]
}

/// Namespace x given, the odd policies, pods x/a (two addresses), z/c (none), y/h (host
/// network): one pod per namespace.
fn pinned_index(scope: Scope) -> PolicyIndex {
    let mut ix = PolicyIndex::new(scope);
    ix.apply_namespace(Namespace::new(
        "x",
        BTreeMap::from([("team".into(), "t".into())]),
    ));
    for p in odd_policies() {
        ix.apply_policy(p);
    }
    ix.apply_pod(pod("x", "a", &["10.0.0.1", "fd00::1"], "n1", "a"));
    ix.apply_pod(pod("z", "c", &[], "n2", "a"));
    let mut host = pod("y", "h", &["192.0.2.1"], "n1", "a");
    host.host_network = true;
    ix.apply_pod(host);
    ix
}

/// The pinned index and a second pod in x, on another node.
fn index() -> PolicyIndex {
    let mut ix = pinned_index(Scope::Node("n1".into()));
    ix.apply_pod(pod("x", "b", &["10.0.0.2"], "n2", "b"));
    ix
}

#[test]
fn every_policy_part_reads_back_equal() {
    let ix = index();
    let back = PolicyIndex::restore_inputs(Scope::Node("n1".into()), &ix.save_inputs())
        .expect("reads back");
    assert_eq!(back.pod_count(), 4);
    assert_eq!(back.policy_count(), 2);
    assert_eq!(back.identity_count(), ix.identity_count());
    let mut names: Vec<_> = back.namespace_names().collect();
    names.sort();
    assert_eq!(names, ["x"], "y was never given as an object");
    for p in odd_policies() {
        assert_eq!(back.policy(&p.namespace, &p.name), Some(&p));
    }
}

#[test]
fn a_restored_index_folds_the_same_objects_as_unchanged() {
    let ix = index();
    let mut back =
        PolicyIndex::restore_inputs(Scope::Node("n1".into()), &ix.save_inputs()).unwrap();
    let before: PolicySet = back.snapshot();
    let stats = back.stats();
    // The API's lists after a restart: the same objects.
    for p in odd_policies() {
        assert!(!back.apply_policy(p));
    }
    assert!(!back.apply_pod(pod("x", "a", &["10.0.0.1", "fd00::1"], "n1", "a")));
    assert!(!back.apply_namespace(Namespace::new(
        "x",
        BTreeMap::from([("team".into(), "t".into())])
    )));
    assert!(!back.is_changed());
    assert_eq!(back.stats().changes, stats.changes);
    let v = |s: &PolicySet| -> Vec<Verdict> {
        let ip = |t: &str| t.parse().unwrap();
        vec![
            s.ingress_verdict(ip("10.0.0.2"), ip("10.0.0.1"), Protocol::Tcp, 8080),
            s.ingress_verdict(ip("10.9.0.2"), ip("10.0.0.1"), Protocol::Tcp, 85),
            s.egress_verdict(ip("10.0.0.1"), ip("10.0.0.2"), Protocol::Tcp, 1),
        ]
    };
    assert_eq!(v(&before), v(&back.snapshot()));
}

/// The encoding of a fixed index (one pod per namespace, so that the order is fixed).
/// When this fails, the saved format changed: give it a new `POLICY_STATE_VERSION` in
/// the agent's `policy_state` (an old file must be refused, not misread), then update
/// the figures here.
#[test]
fn the_encoding_is_pinned() {
    let bytes = pinned_index(Scope::All).save_inputs();
    // FNV-1a: stable, unlike std's hasher.
    let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    assert_eq!(
        (bytes.len(), fnv),
        (328, 10906901944525459776),
        "the saved format changed"
    );
}

#[test]
fn every_truncation_and_many_corruptions_are_errors_not_panics() {
    let bytes = index().save_inputs();
    for len in 0..bytes.len() {
        assert!(
            PolicyIndex::restore_inputs(Scope::All, &bytes[..len]).is_err(),
            "truncated at {len}"
        );
    }
    // Flipped bytes either read as something else or are refused; never a panic. (The
    // agent's file adds a checksum, which refuses them all.)
    for i in 0..bytes.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let _ = PolicyIndex::restore_inputs(Scope::All, &b);
        }
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        PolicyIndex::restore_inputs(Scope::All, &long).unwrap_err(),
        SavedError {
            what: "data after the end",
            at: bytes.len()
        }
    );
    // A count far beyond the data allocates nothing.
    let mut w = Writer::default();
    w.uint(u64::MAX >> 1);
    assert!(PolicyIndex::restore_inputs(Scope::All, &w.buf).is_err());
}

/// A count the bytes left allow reserves room for no more items than fit in those bytes:
/// without the cap, a 1 MiB body of nested counts (rules, peers, requirements, values) made
/// the reader reserve 190 MB before failing at byte 38.
#[test]
fn a_count_reserves_no_more_memory_than_the_bytes_left() {
    use super::saved::Reader;
    use super::spec::Rule;
    let mut w = Writer::default();
    w.uint(4000);
    w.buf.resize(4096, 0);
    let mut r = Reader::new(&w.buf);
    let n = r.count().expect("4000 items may follow 4094 bytes");
    assert_eq!(n, 4000);
    let rules: Vec<Rule> = r.list(n);
    assert!(rules.capacity() < n);
    assert!(rules.capacity() * std::mem::size_of::<Rule>() <= 4094);
    let bytes: Vec<u8> = r.list(n);
    assert_eq!(bytes.capacity(), n, "items that fit are reserved at once");

    // The nested counts of one policy: each as large as the bytes left allow, then nothing
    // valid. Refused where the data stops making sense.
    let mut w = Writer::default();
    w.uint(1); // namespaces
    w.str("a");
    w.byte(0); // not given
    w.uint(0); // label sets
    w.uint(0); // pods
    w.uint(1); // policies
    w.str("p");
    w.uint(0); // pod selector
    w.byte(1); // ingress
    let size = 1 << 16;
    // Rules; a rule with peers; a peer of pods without a namespace selector (its pod
    // selector's requirements); an `In` requirement with the key "" (its values).
    for prefix in [&[][..], &[1][..], &[1, 0][..], &[0, 0][..]] {
        w.buf.extend_from_slice(prefix);
        w.uint(size - 64);
    }
    let nested = w.buf.len();
    w.buf.resize(size as usize, 0xff);
    let e = PolicyIndex::restore_inputs(Scope::All, &w.buf).unwrap_err();
    assert_eq!(e.what, "integer too long");
    assert!(e.at > nested, "{e}");
}

/// The pods of `ix` as namespace/name, sorted.
fn pods_of(ix: &PolicyIndex) -> Vec<String> {
    let mut v: Vec<String> = ix.pod_names().map(|(ns, n)| format!("{ns}/{n}")).collect();
    v.sort();
    v
}

#[test]
fn a_save_in_steps_writes_each_namespace_as_it_is_at_its_step() {
    // Unchanged between steps: the same bytes as one save.
    let ix = index();
    let mut save = ix.start_save();
    while save.step(&ix) {}
    assert_eq!(save.finish(), ix.save_inputs());

    // Namespaces are written in name order: x, y, z.
    let mut ix = index();
    let mut save = ix.start_save();
    assert!(save.step(&ix), "x written");
    // After x's step: a pod added to x is not saved, one added to z is (on a node no pod
    // written before used: a new number), y's pod goes.
    ix.apply_pod(pod("x", "late", &["10.0.0.9"], "n1", "a"));
    ix.apply_pod(pod("z", "d", &["10.0.0.8"], "n3", "b"));
    assert!(ix.delete_pod("y", "h"));
    // A namespace created after the start is not in this save.
    ix.apply_pod(pod("w", "new", &["10.0.0.7"], "n1", "a"));
    while save.step(&ix) {}
    let back =
        PolicyIndex::restore_inputs(Scope::Node("n1".into()), &save.finish()).expect("reads back");
    assert_eq!(pods_of(&back), ["x/a", "x/b", "z/c", "z/d"]);
    assert_eq!(back.policy_count(), 2);
    // What it holds is a state the live index went through, namespace by namespace: saving
    // it again gives what the live index gives once x's late pod and w are gone.
    assert!(ix.delete_pod("x", "late"));
    assert!(ix.delete_pod("w", "new"));
    assert_eq!(pods_of(&back), pods_of(&ix));
    let again = PolicyIndex::restore_inputs(Scope::Node("n1".into()), &ix.save_inputs()).unwrap();
    assert_eq!(back.save_inputs().len(), again.save_inputs().len());
}

#[test]
fn a_namespace_emptied_before_its_step_reads_back_as_nothing() {
    let mut ix = index();
    let mut save = ix.start_save();
    assert!(save.step(&ix), "x written");
    // z's only pod goes: z is no longer held at all when its turn comes.
    assert!(ix.delete_pod("z", "c"));
    while save.step(&ix) {}
    let back =
        PolicyIndex::restore_inputs(Scope::Node("n1".into()), &save.finish()).expect("reads back");
    assert_eq!(pods_of(&back), ["x/a", "x/b", "y/h"]);
    // Nothing of z is written again.
    let again = PolicyIndex::restore_inputs(Scope::Node("n1".into()), &back.save_inputs()).unwrap();
    assert_eq!(pods_of(&again), ["x/a", "x/b", "y/h"]);
}
