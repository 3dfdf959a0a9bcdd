//! Services over time, in a `kwire-lab` with the real agents and plugin:
//! - an established TCP connection through a ClusterIP survives SIGKILL and restart of the
//!   agent on the client's node, on the backend's node, and of both: the restarted agents know
//!   no translated flow, so each picks the backend again by Maglev, and it is the same one (a
//!   different one would answer the connection's next segment with a reset);
//! - endpoints 0 → 3 → 2 → 0: with none, TCP is refused with a reset and UDP with ICMP port
//!   unreachable (the client sees "connection refused", not a timeout); with three, all three
//!   serve; after one pod is deleted, every new flow goes to the other two (a flow sent to the
//!   deleted pod would find nobody and fail);
//! - `default/kubernetes`, which the API stand-in keeps as kube-apiserver does (ClusterIP on
//!   the service range's first address, its EndpointSlice on the address it advertises on the
//!   underlay, outside the pod network), answers from every pod: HTTPS with the lab's CA,
//!   under the name `kubernetes.default.svc`.
//!
//! The lab has no hostNetwork pods (its kubelet runs only the agents so), so hostNetwork
//! endpoints are not exercised here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kwire_tests::echo::{echo_once, EchoServer, Ticker, ECHO_PORT};
use kwire_tests::lab::{lab_service, out_text, parse_json, shop_pod, Json, JsonExt, Lab, Probe};
use kwire_tests::{prometheus_value, require_agent, require_tool};
use kwire_tests::{try_wait_until, wait_until, Scratch};
use nix::sys::signal::Signal;

const UP_TIMEOUT_SECS: &str = "40";
/// Pods running, slices written, tables compiled and swapped on both nodes.
const CONVERGE: Duration = Duration::from_secs(30);
/// The supervisor restarts a killed agent and it serves CNI again within this (a debug build
/// on two shared cores).
const RESTART: Duration = Duration::from_secs(25);
/// The Service port in front of the echo servers.
const ECHO_SERVICE_PORT: u16 = 7000;

/// Two nodes with the real agents; `extra` arguments to `up`.
fn up(kwire: &Path, extra: &[&str]) -> Lab {
    let mut args = vec![
        "--kwire",
        kwire.to_str().unwrap(),
        "--timeout",
        UP_TIMEOUT_SECS,
    ];
    args.extend_from_slice(extra);
    Lab::up(2, &args)
}

/// A pod of namespace `shop` on node `n1`/`n2` of lab `lab`, serving `http` on 8080.
fn pod(lab: &str, name: &str, node: &str, app: &str) -> String {
    shop_pod(lab, name, node, &format!("app: {app}"), 8080)
}

fn apply(lab: &Lab, scratch: &Scratch, file: &str, text: &str) -> PathBuf {
    let path = scratch.file(file);
    std::fs::write(&path, text).unwrap();
    lab.cmd_ok("apply", &["-f", path.to_str().unwrap()]);
    path
}

fn running(st: &Json, names: &[&str]) -> bool {
    names.iter().all(|n| {
        st["pods"].array().iter().any(|p| {
            p["namespace"].as_str() == Some("shop")
                && p["name"].as_str() == Some(n)
                && p["phase"].as_str() == Some("Running")
        })
    })
}

fn netns(st: &Json, name: &str) -> String {
    st["pods"]
        .array()
        .iter()
        .find(|p| p["namespace"].as_str() == Some("shop") && p["name"].as_str() == Some(name))
        .and_then(|p| p["netns"].as_str())
        .unwrap_or_else(|| panic!("no netns for shop/{name}: {:?}", st["pods"]))
        .to_string()
}

/// `kwire status --json` of a lab node's agent: its `services` report.
fn agent_services(kwire: &Path, node: &Json) -> Option<Json> {
    let run_dir = PathBuf::from(node["run_dir"].as_str()?);
    let out = Command::new(kwire)
        .args(["status", "--json", "--run-dir", run_dir.to_str()?])
        .output()
        .ok()?;
    Some(parse_json(&String::from_utf8_lossy(&out.stdout)).ok()?["services"].clone())
}

/// Waits until every agent's service table has `services` Services and `backends` backends
/// (summed over frontends), so that what follows runs on the tables the test means.
fn agents_have(lab: &Lab, kwire: &Path, services: u64, backends: u64) {
    for node in lab.status()["nodes"].array() {
        let mut last = None;
        let ok = try_wait_until(CONVERGE, || {
            last = agent_services(kwire, node);
            last.as_ref().is_some_and(|s| {
                s["services"].as_u64() == Some(services) && s["backends"].as_u64() == Some(backends)
            })
        });
        assert!(
            ok,
            "{}: want {services} Services, {backends} backends; table {last:?}",
            node["name"]
        );
    }
}

#[test]
fn tcp_through_a_cluster_ip_survives_agent_restarts_on_both_ends() {
    let kwire = require_agent!();
    let scratch = Scratch::new("lab-svc-restart");
    let lab = up(&kwire, &[]);
    let l = lab.name().to_string();
    let (n1, n2) = (format!("{l}-n1"), format!("{l}-n2"));
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n{}{}{}{}---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: shop}}
spec:
  selector: {{app: echo}}
  ports: [{{port: {ECHO_SERVICE_PORT}, targetPort: {ECHO_PORT}}}]
",
        pod(&l, "client", "n1", "client"),
        pod(&l, "echo-1", "n1", "echo"),
        pod(&l, "echo-2", "n2", "echo"),
        pod(&l, "echo-3", "n2", "echo"),
    );
    apply(&lab, &scratch, "echo.yaml", &text);
    let backends = ["echo-1", "echo-2", "echo-3"];
    let mut st = lab.status();
    wait_until(CONVERGE, "three echo endpoints, pods running", || {
        st = lab.status();
        running(&st, &["client", "echo-1", "echo-2", "echo-3"])
            && lab_service(&st, "shop", "echo").is_some_and(|s| s["endpoints"].array().len() == 3)
    });
    // echo's three, and default/kubernetes' one.
    agents_have(&lab, &kwire, 2, 4);
    let vip = lab_service(&st, "shop", "echo").unwrap()["cluster_ips"].strings()[0].clone();
    let to: SocketAddr = format!("{vip}:{ECHO_SERVICE_PORT}").parse().unwrap();
    let servers: Vec<EchoServer> = backends
        .iter()
        .map(|b| EchoServer::start(&netns(&st, b)))
        .collect();
    let client = netns(&st, "client");

    // One long-lived connection per backend: fresh connections (a new source port each, so a
    // new Maglev choice) until every backend holds one; the others are closed again.
    let mut tickers: Vec<Option<Ticker>> = vec![None, None, None];
    for attempt in 0..60 {
        if tickers.iter().all(Option::is_some) {
            break;
        }
        let before: Vec<usize> = servers.iter().map(EchoServer::accepted).collect();
        let t = Ticker::start(&client, to, &format!("via {vip} #{attempt}"));
        t.wait_more(2, Duration::from_secs(10));
        let landed: Vec<usize> = (0..3)
            .filter(|i| servers[*i].accepted() > before[*i])
            .collect();
        assert_eq!(landed.len(), 1, "one connection, one backend: {landed:?}");
        let i = landed[0];
        if tickers[i].is_none() {
            tickers[i] = Some(t);
        }
    }
    let tickers: Vec<Ticker> = tickers
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| panic!("no connection reached {}", backends[i])))
        .collect();
    let accepted: Vec<usize> = servers.iter().map(EchoServer::accepted).collect();

    // The client's node, the backends' other node, then both at once. Every connection goes
    // on exchanging lines on the same backend: no reset, no new connection anywhere.
    for nodes in [vec![n1.as_str()], vec![n2.as_str()], vec![&n1, &n2]] {
        for t in &tickers {
            t.wait_more(3, Duration::from_secs(10));
        }
        lab.signal_agents(&nodes, Signal::SIGKILL, RESTART);
        for t in &tickers {
            t.wait_more(20, RESTART);
        }
    }
    for t in &tickers {
        t.check();
    }
    assert_eq!(
        servers.iter().map(EchoServer::accepted).collect::<Vec<_>>(),
        accepted,
        "a backend saw a new connection across the restarts"
    );
    // New connections through the ClusterIP still work after the restarts, once the new
    // agents have their service tables again (a new flow meets the table, where the old ones
    // may ride on what survived the restart).
    agents_have(&lab, &kwire, 2, 4);
    for _ in 0..3 {
        echo_once(&client, to).unwrap_or_else(|e| panic!("new connection to {to}: {e}"));
    }
    drop(tickers);
}

#[test]
fn endpoints_zero_three_two_zero_and_default_kubernetes_from_every_pod() {
    let kwire = require_agent!();
    require_tool("curl");
    let scratch = Scratch::new("lab-svc-life");
    let lab = up(&kwire, &[]);
    let l = lab.name().to_string();
    let n1 = format!("{l}-n1");
    apply(
        &lab,
        &scratch,
        "shop.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n{}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: dns}}
",
            pod(&l, "client", "n1", "client")
        ),
    );
    let mut st = lab.status();
    wait_until(CONVERGE, "client running, shop/web listed", || {
        st = lab.status();
        running(&st, &["client"]) && lab_service(&st, "shop", "web").is_some()
    });
    let vip = lab_service(&st, "shop", "web").unwrap()["cluster_ips"].strings()[0].clone();
    let (tcp, udp) = (format!("{vip}:80"), format!("{vip}:53/UDP"));
    let refused = |phase: &str| {
        // A reset / port unreachable arrives well within the probe's 2 s: "connection refused",
        // where a silent drop would read "timed out".
        for to in [&tcp, &udp] {
            let Probe {
                reachable: ok,
                detail,
                ..
            } = lab.probe("shop/client", to);
            assert!(
                !ok && detail.to_ascii_lowercase().contains("refused"),
                "{phase}: {to}: {detail}"
            );
        }
    };

    // The API server's own Service: on the first address of the service range, its slice on
    // the address the stand-in advertises on the underlay (outside the pod network).
    let k8s = lab_service(&st, "default", "kubernetes")
        .expect("default/kubernetes listed")
        .clone();
    assert_eq!(k8s["cluster_ips"].strings(), ["10.96.0.1"]);
    assert_eq!(k8s["endpoints"].strings(), ["192.0.2.254:6443"]);

    // 0 endpoints: refused at once.
    agents_have(&lab, &kwire, 2, 1);
    refused("no endpoints");

    // 3 endpoints: every one serves, TCP and UDP.
    apply(
        &lab,
        &scratch,
        "three.yaml",
        &[("web-1", "n1"), ("web-2", "n2"), ("web-3", "n2")]
            .iter()
            .map(|(n, node)| pod(&l, n, node, "web"))
            .collect::<String>(),
    );
    wait_until(CONVERGE, "three web endpoints", || {
        st = lab.status();
        running(&st, &["web-1", "web-2", "web-3"])
            && lab_service(&st, "shop", "web").is_some_and(|s| s["endpoints"].array().len() == 3)
    });
    agents_have(&lab, &kwire, 2, 2 * 3 + 1);
    for to in [&tcp, &udp] {
        let mut seen = std::collections::BTreeSet::new();
        let mut last = String::new();
        let ok = try_wait_until(Duration::from_secs(30), || {
            let Probe {
                reachable: ok,
                detail,
                ..
            } = lab.probe("shop/client", to);
            for w in ["web-1", "web-2", "web-3"] {
                if ok && detail.contains(&format!("shop/{w}")) {
                    seen.insert(w);
                }
            }
            last = detail;
            seen.len() == 3
        });
        assert!(ok, "{to}: answered by {seen:?}; last {last}");
    }

    // default/kubernetes answers from every pod, on either node: the API over HTTPS, its
    // certificate checked against the lab's CA under the Service's DNS name.
    let ca = lab.dir().join("ca.crt");
    for p in ["client", "web-1", "web-2", "web-3"] {
        let o = lab.exec(
            &format!("shop/{p}"),
            &[
                "curl",
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                ca.to_str().unwrap(),
                "--resolve",
                "kubernetes.default.svc:443:10.96.0.1",
                "https://kubernetes.default.svc/version",
            ],
        );
        let code = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(
            o.status.success() && ["200", "401", "403"].contains(&code.as_str()),
            "shop/{p} -> https://kubernetes.default.svc (10.96.0.1): HTTP {code}: {}",
            out_text(&o)
        );
    }

    // One endpoint removed (its pod deleted): once the agents dropped it, every new flow goes
    // to the other two. A flow sent to web-3 would find no pod and fail.
    let gone = scratch.file("web-3.yaml");
    std::fs::write(&gone, pod(&l, "web-3", "n2", "web")).unwrap();
    lab.cmd_ok("delete", &["-f", gone.to_str().unwrap()]);
    wait_until(CONVERGE, "two web endpoints", || {
        st = lab.status();
        lab_service(&st, "shop", "web").is_some_and(|s| s["endpoints"].array().len() == 2)
    });
    agents_have(&lab, &kwire, 2, 2 * 2 + 1);
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..30 {
        let to = if i % 3 == 2 { &udp } else { &tcp };
        let Probe {
            reachable: ok,
            detail,
            ..
        } = lab.probe("shop/client", to);
        assert!(ok, "flow {i} to {to} after web-3 left: {detail}");
        assert!(!detail.contains("shop/web-3"), "{to}: {detail}");
        let who = ["web-1", "web-2"]
            .into_iter()
            .find(|w| detail.contains(&format!("shop/{w}")))
            .unwrap_or_else(|| panic!("{to}: answered by whom? {detail}"));
        *served.entry(who.to_string()).or_default() += 1;
    }
    assert_eq!(
        served.len(),
        2,
        "both remaining endpoints serve: {served:?}"
    );

    // Back to 0: refused again, counted on the client's node.
    let rest = scratch.file("rest.yaml");
    std::fs::write(
        &rest,
        pod(&l, "web-1", "n1", "web") + &pod(&l, "web-2", "n2", "web"),
    )
    .unwrap();
    lab.cmd_ok("delete", &["-f", rest.to_str().unwrap()]);
    wait_until(CONVERGE, "no web endpoint", || {
        st = lab.status();
        lab_service(&st, "shop", "web").is_some_and(|s| s["endpoints"].array().is_empty())
    });
    agents_have(&lab, &kwire, 2, 1);
    refused("endpoints gone");
    let m = lab.exec(
        &n1,
        &["curl", "-sf", "-m", "5", "http://127.0.0.1:9742/metrics"],
    );
    let m = String::from_utf8_lossy(&m.stdout).into_owned();
    let rejected = prometheus_value(&m, "kwire_service_no_endpoint_total").unwrap_or(0.0);
    assert!(
        rejected >= 4.0,
        "no-endpoint rejections on {n1}: {rejected}"
    );
}

/// `getent hosts NAME` in a pod (its resolver is the cluster DNS): the addresses, or None
/// when the name does not resolve.
fn getent(lab: &Lab, pod: &str, db: &str, name: &str) -> Option<Vec<String>> {
    let o = lab.exec(pod, &["getent", db, name]);
    o.status.success().then(|| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    })
}

#[test]
fn cluster_dns_names_services_and_pods_and_follows_changes() {
    let kwire = require_agent!();
    require_tool("dnsmasq");
    require_tool("socat");
    let scratch = Scratch::new("lab-svc-dns");
    let lab = up(&kwire, &["--dns"]);
    let l = lab.name().to_string();
    let svc = |name: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n"
        )
    };
    apply(
        &lab,
        &scratch,
        "shop.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n{}{}{}",
            pod(&l, "client", "n1", "client"),
            pod(&l, "web-1", "n2", "web"),
            svc("web")
        ),
    );
    let mut st = lab.status();
    wait_until(CONVERGE, "pods, kube-dns and web's endpoint", || {
        st = lab.status();
        running(&st, &["client", "web-1"])
            && lab_service(&st, "shop", "web").is_some_and(|s| s["endpoints"].array().len() == 1)
            && lab_service(&st, "kube-system", "kube-dns")
                .is_some_and(|s| s["endpoints"].array().len() == 1)
    });
    // The lab's EndpointSlices are not yet the agents' tables: n1 refuses a connection to web
    // until its own watch has the endpoint. default/kubernetes' one, kube-dns' UDP and TCP
    // port, web's one.
    agents_have(&lab, &kwire, 3, 4);
    let kube_dns = lab_service(&st, "kube-system", "kube-dns").unwrap();
    assert_eq!(kube_dns["cluster_ips"].strings(), ["10.96.0.10"]);
    let vip = lab_service(&st, "shop", "web").unwrap()["cluster_ips"].strings()[0].clone();
    let web_ip = st["pods"]
        .array()
        .iter()
        .find(|p| p["name"].as_str() == Some("web-1"))
        .map(|p| p["ips"].strings()[0].clone())
        .unwrap();

    // The Service by its full name and by the search path; the pod by its address record.
    let client = "shop/client";
    let mut last = None;
    let ok = try_wait_until(CONVERGE, || {
        last = getent(&lab, client, "hosts", "web.shop.svc.cluster.local");
        last.as_deref() == Some(std::slice::from_ref(&vip))
    });
    assert!(ok, "web.shop.svc.cluster.local: {last:?}, want {vip}");
    assert_eq!(
        getent(&lab, client, "hosts", "web"),
        Some(vec![vip.clone()])
    );
    let pod_name = format!("{}.shop.pod.cluster.local", web_ip.replace('.', "-"));
    assert_eq!(
        getent(&lab, client, "ahostsv4", &pod_name).map(|v| v[0].clone()),
        Some(web_ip.clone()),
        "{pod_name}"
    );
    assert_eq!(
        getent(&lab, client, "hosts", "nope.shop.svc.cluster.local"),
        None
    );

    // Connecting by name: through the ClusterIP to the pod on the other node.
    for name in ["web.shop.svc.cluster.local", "web"] {
        let o = lab.exec(
            client,
            &[
                "socat",
                "-T",
                "5",
                "-u",
                &format!("TCP:{name}:80"),
                "STDOUT",
            ],
        );
        let answer = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success() && answer.contains("shop/web-1"),
            "{name}:80: {}",
            out_text(&o)
        );
    }

    // Records follow the API: a new Service resolves, a deleted one stops resolving, and so
    // does a deleted pod's address.
    let late = apply(&lab, &scratch, "late.yaml", &svc("late"));
    let mut late_ip = None;
    wait_until(CONVERGE, "late.shop.svc.cluster.local resolves", || {
        late_ip = getent(&lab, client, "hosts", "late.shop.svc.cluster.local");
        late_ip.is_some()
    });
    st = lab.status();
    assert_eq!(
        late_ip.unwrap(),
        lab_service(&st, "shop", "late").unwrap()["cluster_ips"].strings()
    );
    lab.cmd_ok("delete", &["-f", late.to_str().unwrap()]);
    wait_until(CONVERGE, "late.shop.svc.cluster.local gone", || {
        getent(&lab, client, "hosts", "late.shop.svc.cluster.local").is_none()
    });
    let web1 = scratch.file("web-1.yaml");
    std::fs::write(&web1, pod(&l, "web-1", "n2", "web")).unwrap();
    lab.cmd_ok("delete", &["-f", web1.to_str().unwrap()]);
    wait_until(CONVERGE, "the deleted pod's record gone", || {
        getent(&lab, client, "ahostsv4", &pod_name).is_none()
    });
}
