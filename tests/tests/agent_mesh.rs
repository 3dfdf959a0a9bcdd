//! `kwire agent` end to end: three nodes (network namespaces on one bridge), the Kubernetes
//! API stand-in, the real binary in each node, run as `deploy/kwire.yaml`'s DaemonSet runs it
//! (confined by kwire-lab's container runtime, with deploy/'s RBAC and admission policy and a
//! token bound to its node). Needs root; skipped with a message otherwise.
//!
//! The topology, and how the stand-in is reached from the nodes: `mesh_support`.

mod mesh_support;

use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use kwire_tests::{require_root, try_wait_until, wait_until, Netns, Proc, Scratch};
use mesh_support::{gateway, http_get, nodes_kind, Cluster, PORT, TUN};
use serde_json::{json, Value};
use std::time::Duration;

/// What the agents converge within (watch, reconcile, route, handshake; restart from saved
/// state): generous for a debug build on two loaded cores, free when things are on time.
const CONVERGE: Duration = Duration::from_secs(30);

fn pod_cidrs(api: &ApiServer, name: &str) -> Vec<String> {
    let n = api.get(nodes_kind(), None, name).unwrap();
    n.pointer("/spec/podCIDRs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn annotation(api: &ApiServer, name: &str, key: &str) -> Option<String> {
    let n = api.get(nodes_kind(), None, name).ok()?;
    n.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
        .map(String::from)
}

fn routes(ns: &Netns, cidr: &str) -> String {
    let fam = if cidr.contains(':') { "-6" } else { "-4" };
    ns.run(&["ip", fam, "route", "show", "exact", cidr])
}

#[test]
fn agents_mesh_through_the_api_stand_in() {
    require_root!();
    kwire_tests::require_tool("curl");
    let scratch = Scratch::new("agent");
    let (sw, mut nodes) = mesh_support::nodes("n", 3);
    let id = kwire_tests::unique_id();

    sw.ns.run_in(|| {
        let config = ApiServerConfig { cluster_cidr_v6: Some("fd00:10:244::/56".parse().unwrap()), ..ApiServerConfig::default() };
        let cluster = Cluster::start(config, &scratch, &mut nodes, &[], |n| {
            json!({"addresses": [{"type": "InternalIP", "address": n.ip}, {"type": "Hostname", "address": n.name}]})
        });
        let (rt, api) = (&cluster.rt, &cluster.api);
        // A Node with an all-zero key: skipped, an Event on it, a metric.
        let bad = format!("bad-{id}");
        api.create(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": bad, "annotations": {"kwire.dev/public-key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.99"}]},
        }))
        .unwrap();
        let cidrs: Vec<Vec<String>> = nodes.iter().map(|n| pod_cidrs(api, &n.name)).collect();
        for c in &cidrs {
            assert_eq!(c.len(), 2, "dual-stack podCIDRs expected: {c:?}");
        }

        let mut agents: Vec<Proc> = nodes.iter().map(|n| cluster.spawn_agent(n, &scratch, "1")).collect();

        // 1. Each agent publishes its key and endpoint.
        wait_until(CONVERGE, "every agent to publish its annotations", || {
            nodes.iter().all(|n| {
                annotation(api, &n.name, "kwire.dev/public-key").is_some()
                    && annotation(api, &n.name, "kwire.dev/endpoint") == Some(format!("{}:{PORT}", n.ip))
            })
        });

        // 2. Every node reaches every other node's gateways (IPv4 and IPv6) through the tunnels.
        for (i, n) in nodes.iter().enumerate() {
            for (j, c) in cidrs.iter().enumerate() {
                if i == j {
                    continue;
                }
                for cidr in c {
                    n.ns.wait_ping(&gateway(cidr), CONVERGE);
                    assert!(routes(&n.ns, cidr).contains("blackhole"), "no blackhole behind {cidr} on {}", n.name);
                }
            }
        }
        // The tun MTU is the underlay's minus 80.
        assert!(nodes[0].ns.run(&["ip", "link", "show", "dev", TUN]).contains("mtu 1420"));

        // 3. The bad Node: an Event and a metric; the good peers are connected and named.
        let events_kind = ApiServer::kind("events.k8s.io/v1", "Event").unwrap();
        wait_until(CONVERGE, "an Event on the Node with the zero key", || {
            api.list(events_kind, None).unwrap().iter().any(|e| {
                e.pointer("/regarding/name").and_then(Value::as_str) == Some(bad.as_str())
                    && e.get("reason").and_then(Value::as_str) == Some("KwireZeroPublicKey")
            })
        });
        wait_until(CONVERGE, "metrics of node 1", || {
            let (ok, m) = http_get(&nodes[0].ns, "/metrics");
            ok && m.contains("kwire_invalid_peer_total{reason=\"zero_key\"} 1")
                && m.contains(&format!("kwire_peer_up{{node=\"{}\"}} 1", nodes[1].name))
                && m.contains("kwire_peers_expected 2")
                && m.contains("kwire_peers_connected 2")
        });
        let (ok, _) = http_get(&nodes[0].ns, "/readyz");
        assert!(ok, "node 1 is ready");

        // 4. A Node deleted from the API is dropped by the others: its route and blackhole go,
        //    the cluster range's unreachable route covers its range.
        api.delete(nodes_kind(), None, &nodes[2].name).unwrap();
        for n in &nodes[..2] {
            for cidr in &cidrs[2] {
                wait_until(CONVERGE, format!("{} to drop the route of {cidr}", n.name), || {
                    let r = routes(&n.ns, cidr);
                    r.trim().is_empty()
                });
            }
            n.ns.assert_no_ping(&gateway(&cidrs[2][0]), None, 2);
        }
        nodes[0].ns.wait_ping(&gateway(&cidrs[1][0]), CONVERGE);

        // 5. The API goes away: traffic keeps flowing.
        rt.block_on(api.stop());
        assert!(nodes[0].ns.ping_once(&gateway(&cidrs[1][0]), None));
        assert!(nodes[1].ns.ping_once(&gateway(&cidrs[0][1]), None));

        // 6. Restart node 1's agent while the API is down: it exits 0, removes its socket, and
        //    forwards again from its saved peer set alone.
        let (st, killed) = agents[0].stop();
        assert!(st.success() && !killed, "agent exits 0 on SIGTERM: {st:?}");
        let sock = nodes[0].spec().uapi_socket();
        assert!(!sock.exists(), "{} removed on exit", sock.display());
        assert!(routes(&nodes[0].ns, &cidrs[1][0]).contains("blackhole"), "blackholes stay after exit");
        agents[0] = cluster.spawn_agent(&nodes[0], &scratch, "2");
        nodes[0].ns.wait_ping(&gateway(&cidrs[1][0]), CONVERGE);
        nodes[0].ns.wait_ping(&gateway(&cidrs[1][1]), CONVERGE);
        assert!(try_wait_until(CONVERGE, || http_get(&nodes[0].ns, "/readyz").0), "ready from the saved state");

        // 7. The API comes back: a change made afterwards is applied (watch resumed with backoff).
        rt.block_on(api.resume()).unwrap();
        let key2 = annotation(api, &nodes[1].name, "kwire.dev/public-key").unwrap();
        api.merge_patch(nodes_kind(), None, &nodes[1].name, &json!({"metadata": {"annotations": {"kwire.dev/persistent-keepalive": "7"}}}), false)
            .unwrap();
        wait_until(Duration::from_secs(40), "node 1 to apply node 2's keepalive after the API returned", || {
            kwire_lab::commands::status::uapi_get(&nodes[0].spec().uapi_socket())
                .is_ok_and(|peers| peers.iter().any(|p| p.public_key == key2 && p.persistent_keepalive == 7))
        });
        nodes[0].ns.wait_ping(&gateway(&cidrs[1][0]), CONVERGE);
        for a in agents.iter_mut() {
            assert!(a.is_running(), "{} died:\n{}", a.name(), a.log());
            if std::env::var_os("KWIRE_TEST_SHOW_LOGS").is_some() {
                eprintln!("---- {} ----\n{}", a.name(), a.log());
            }
        }
    });
}
