//! Services without kube-proxy, in a `kwire-lab` with the real agents and plugin: the lab's
//! EndpointSlice controller lists the Service's pods (a named `targetPort` resolved per pod),
//! the agents compile the slices into their service tables, and a pod reaches the ClusterIP
//! over TCP and UDP, answered by a backend on its own node and by one on the other node;
//! a Service without endpoints is refused at once (TCP reset, ICMP port unreachable); a
//! NetworkPolicy denying the backend denies it through the ClusterIP; the underlay carries
//! only WireGuard meanwhile. Over IPv4 and IPv6: the Services are dual-stack
//! (`PreferDualStack`), one ClusterIP per family.

use std::time::Duration;

use kwire_tests::lab::{
    agent_status, lab_service, out_text, shop_pod, BridgeCapture, Json, JsonExt, Lab, Probe,
};
use kwire_tests::require_agent;
use kwire_tests::{prometheus_value, try_wait_until, wait_until, Scratch};

const WG_PORT: &str = "51820";
const UP_TIMEOUT_SECS: &str = "40";
/// Pods running, slices written, tables compiled and swapped on both nodes.
const CONVERGE: Duration = Duration::from_secs(30);

fn manifest(lab: &str) -> String {
    let pod = |name: &str, node: &str, app: &str, http: u16| {
        shop_pod(lab, name, node, &format!("app: {app}"), http)
    };
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
{}{}{}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: shop}}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {{app: nobody}}
  ports:
  - {{name: http, port: 80}}
  - {{name: dns, port: 53, protocol: UDP}}
"#,
        pod("client", "n1", "client", 8080),
        pod("web-1", "n1", "web", 8080),
        // Another container port behind the same name: the slice says 9090 for this pod.
        pod("web-2", "n2", "web", 9090),
    )
}

/// Probes `to` from the client with fresh flows until every name in `want` has answered.
fn both_backends_answer(lab: &Lab, to: &str, want: &[&str]) {
    let mut seen = std::collections::BTreeSet::new();
    let mut last = Json::Null;
    let ok = try_wait_until(Duration::from_secs(20), || {
        let Probe {
            reachable: ok,
            report: r,
            ..
        } = lab.probe("shop/client", to);
        if ok {
            let detail = r["detail"].as_str().unwrap_or_default();
            for w in want {
                if detail.contains(w) {
                    seen.insert(*w);
                }
            }
        }
        last = r;
        seen.len() == want.len()
    });
    assert!(
        ok,
        "{to}: answered by {seen:?} of {want:?}; last probe {last:?}"
    );
}

#[test]
fn cluster_ip_tcp_udp_v4_v6_both_nodes_refusal_policy_and_no_plaintext() {
    let kwire = require_agent!();
    let scratch = Scratch::new("lab-services");
    let lab = Lab::up(
        2,
        &[
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            UP_TIMEOUT_SECS,
        ],
    );
    let file = scratch.file("shop.yaml");
    std::fs::write(&file, manifest(lab.name())).unwrap();
    lab.cmd_ok("apply", &["-f", file.to_str().unwrap()]);

    // The lab's slice controller: both pods ready behind web (in both families), each with
    // its own target port.
    let mut st = lab.status();
    wait_until(
        CONVERGE,
        "shop/web with two ready endpoints per family",
        || {
            st = lab.status();
            lab_service(&st, "shop", "web").is_some_and(|s| s["endpoints"].array().len() == 4)
                && ["client", "web-1", "web-2"].iter().all(|n| {
                    st["pods"].array().iter().any(|p| {
                        p["name"].as_str() == Some(n) && p["phase"].as_str() == Some("Running")
                    })
                })
        },
    );
    let web = lab_service(&st, "shop", "web").unwrap().clone();
    let eps = web["endpoints"].strings();
    for port in [":8080", ":9090"] {
        assert_eq!(
            eps.iter().filter(|e| e.ends_with(port)).count(),
            2,
            "{eps:?}"
        );
    }
    assert_eq!(web["type"].as_str(), Some("ClusterIP"));
    assert!(web["node_ports"].array().is_empty());
    let vips = web["cluster_ips"].strings();
    assert!(
        vips.len() == 2 && vips[1].contains(':'),
        "dual-stack: {vips:?}"
    );
    let empty = lab_service(&st, "shop", "empty").unwrap().clone();
    assert!(empty["endpoints"].array().is_empty());
    let at = |ip: &str, port: &str| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };

    // Every agent compiled the table: 2 Services, 8 frontends (2 ports in 2 families each),
    // the 4 of `empty` without endpoints; and the API server's own `default/kubernetes`. Both
    // of web's endpoints behind each of its 4 frontends (8 backends, and kubernetes' one): the
    // lab's slice is not yet an agent's table, and the probes below run on the agents'.
    for node in st["nodes"].array() {
        let mut last = None;
        let ok = try_wait_until(CONVERGE, || {
            last = agent_status(&kwire, node);
            last.as_ref().is_some_and(|r| {
                let s = &r["services"];
                s["services"].as_u64() == Some(3)
                    && s["frontends"].as_u64() == Some(9)
                    && s["frontends_without_endpoints"].as_u64() == Some(4)
                    && s["backends"].as_u64() == Some(9)
            })
        });
        assert!(
            ok,
            "{}: service table {:?}",
            node["name"],
            last.map(|r| r["services"].clone())
        );
    }

    // Through each ClusterIP, TCP and UDP, both backends (one on the client's node, one on
    // the other) answer; only WireGuard crosses the underlay meanwhile.
    let capture = BridgeCapture::start(
        &lab,
        &scratch,
        "underlay",
        "not arp and not (tcp port 6443) and not ip6 multicast and not ip multicast and not (icmp6 and (ip6[40] >= 133 and ip6[40] <= 137))",
    );
    for vip in &vips {
        both_backends_answer(&lab, &at(vip, "80"), &["shop/web-1", "shop/web-2"]);
        both_backends_answer(&lab, &at(vip, "53/UDP"), &["shop/web-1", "shop/web-2"]);
    }
    let lines = capture.stop();
    assert!(!lines.is_empty(), "no traffic to web-2 on the underlay");
    let port = format!(".{WG_PORT}");
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains("UDP") && l.contains(&port)))
        .collect();
    assert!(
        other.is_empty(),
        "besides WireGuard UDP on the underlay: {other:#?}"
    );

    // No endpoints: refused, not timed out (a reset for TCP, port unreachable for UDP).
    let refused: Vec<String> = empty["cluster_ips"]
        .strings()
        .iter()
        .flat_map(|ip| [at(ip, "80"), at(ip, "53/UDP")])
        .collect();
    for to in &refused {
        let Probe {
            reachable: ok,
            report: r,
            ..
        } = lab.probe("shop/client", to);
        let detail = r["detail"].as_str().unwrap_or_default();
        assert!(!ok && detail.contains("refused"), "{to}: {r:?}");
    }

    // The client's node counted its translations and refusals.
    let n1 = format!("{}-n1", lab.name());
    let out = lab.exec(
        &n1,
        &[
            "curl",
            "-s",
            "-f",
            "-m",
            "2",
            "http://127.0.0.1:9742/metrics",
        ],
    );
    assert!(out.status.success(), "GET /metrics: {}", out_text(&out));
    let m = String::from_utf8_lossy(&out.stdout).into_owned();
    let translated = prometheus_value(&m, "kwire_service_translations_total").unwrap_or(0.0);
    assert!(translated >= 8.0, "translations {translated}");
    assert_eq!(
        prometheus_value(&m, "kwire_service_no_endpoint_total"),
        Some(refused.len() as f64)
    );

    // A policy denying the backends' ingress denies them through the ClusterIPs too.
    let deny = scratch.file("deny.yaml");
    std::fs::write(
        &deny,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n",
    )
    .unwrap();
    lab.cmd_ok("apply", &["-f", deny.to_str().unwrap()]);
    let mut last = Json::Null;
    let denied = try_wait_until(CONVERGE, || {
        // Every fresh flow is denied, wherever Maglev sends it.
        vips.iter().all(|vip| {
            (0..4).all(|_| {
                let Probe {
                    reachable: ok,
                    report: r,
                    ..
                } = lab.probe("shop/client", &at(vip, "80"));
                last = r;
                !ok
            })
        })
    });
    assert!(denied, "still reachable through a ClusterIP: {last:?}");
    let detail = last["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        !detail.contains("refused"),
        "a policy drop, not a refusal: {detail}"
    );
    lab.cmd_ok("delete", &["-f", deny.to_str().unwrap()]);
    both_backends_answer(&lab, &at(&vips[0], "80"), &["shop/web-1", "shop/web-2"]);

    // The nodes themselves reach the IPv4 ClusterIP (KWIRE_SERVICE_CIDR routes it into the
    // tun, where the loop translates it; no kube-proxy), TCP and UDP.
    for node in ["n1", "n2"] {
        for to in [at(&vips[0], "80"), at(&vips[0], "53/UDP")] {
            let mut last = Json::Null;
            let ok = try_wait_until(CONVERGE, || {
                let Probe {
                    reachable: ok,
                    report: r,
                    ..
                } = lab.probe(node, &to);
                last = r;
                ok
            });
            assert!(ok, "{node} -> {to}: {last:?}");
        }
    }
}
