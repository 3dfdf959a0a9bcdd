//! Cluster DNS in the lab (`kwire-lab up --dns`): a `kube-system/kube-dns` pod running
//! dnsmasq (Debian's `dnsmasq-base`) behind the `kube-dns` ClusterIP (10.96.0.10, ports 53 UDP
//! and TCP, as kubeadm places it), answering
//! - `<service>.<namespace>.svc.cluster.local`: the Service's ClusterIPs (A and AAAA);
//! - `<a-b-c-d>.<namespace>.pod.cluster.local` (IPv6: the address with `-` for `:`): the pod's
//!   address, for pods that have it (CoreDNS's `pods verified`);
//! - NXDOMAIN for any other name under `cluster.local`; names outside it are refused (the lab
//!   has no upstream resolver).
//!
//! The supervisor rewrites one hosts file under the lab directory whenever Services or Pods
//! change; dnsmasq watches that directory (`--hostsdir`) and applies additions and removals
//! by itself. Every other lab pod gets `/etc/netns/<netns>/resolv.conf` (search path and
//! `ndots:5` as the kubelet writes them), which `ip netns exec` (and so `kwire-lab exec`)
//! mounts over `/etc/resolv.conf`.
//!
//! Why dnsmasq: a small, well-kept resolver from Debian that reloads a watched hosts file on
//! its own; nothing to build on the lab machine, and what is served is the file we write.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::apiserver::ApiServer;

pub const NAMESPACE: &str = "kube-system";
pub const SERVICE: &str = "kube-dns";
/// The pod's name and the `k8s-app` label the Service selects.
pub const POD: &str = "kube-dns";
/// The DNS Service's ClusterIP: the tenth address of the service range, as kubeadm picks it.
pub const CLUSTER_IP: &str = "10.96.0.10";
pub const DOMAIN: &str = "cluster.local";
/// The image name that makes the lab's kubelet run dnsmasq instead of the pod server.
pub const IMAGE: &str = "kwire-lab/dns";
/// The hosts file's name inside [`records_dir`].
const HOSTS_FILE: &str = "cluster.hosts";

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// Where the supervisor writes the records dnsmasq serves.
pub fn records_dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("dns")
}

/// The objects `up --dns` creates: the DNS pod and its Service (kube-system exists already:
/// the agent's DaemonSet lives there).
pub fn objects() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": NAMESPACE, "name": SERVICE,
                         "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                "selector": {"k8s-app": "kube-dns"},
                "clusterIP": CLUSTER_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": NAMESPACE, "name": POD,
                         "labels": {"k8s-app": "kube-dns"}},
            "spec": {"containers": [{
                "name": "dnsmasq",
                "image": IMAGE,
                "ports": [
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                ],
            }]},
        }),
    ]
}

/// Whether the lab's kubelet runs dnsmasq for this pod.
pub fn is_dns_pod(pod: &Value) -> bool {
    pod.pointer("/spec/containers/0/image")
        .and_then(Value::as_str)
        == Some(IMAGE)
}

/// The pod-record label of an address: `10-244-1-5`, `fd00-10-244-1--5`.
pub fn pod_label(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The hosts file for these Services and Pods, sorted (the same input gives the same text).
pub fn records(services: &[Value], pods: &[Value]) -> String {
    let mut lines = BTreeSet::new();
    for svc in services {
        let (ns, name) = (s(svc, "/metadata/namespace"), s(svc, "/metadata/name"));
        let ips = svc
            .pointer("/spec/clusterIPs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|ip| ip.parse::<IpAddr>().ok());
        for ip in ips {
            lines.insert(format!("{ip} {name}.{ns}.svc.{DOMAIN}"));
        }
    }
    for pod in pods {
        let ns = s(pod, "/metadata/namespace");
        if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let ips = pod
            .pointer("/status/podIPs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("ip").and_then(Value::as_str))
            .filter_map(|ip| ip.parse::<IpAddr>().ok());
        for ip in ips {
            lines.insert(format!("{ip} {}.{ns}.pod.{DOMAIN}", pod_label(ip)));
        }
    }
    let mut out = String::from("# kwire-lab cluster DNS: written by the supervisor\n");
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Rewrites the hosts file when the records changed (write to a temporary file, rename: dnsmasq
/// never reads half a file).
pub fn reconcile(server: &ApiServer, lab_dir: &Path) {
    let (Ok(svc_kind), Ok(pod_kind)) = (
        ApiServer::kind("v1", "Service"),
        ApiServer::kind("v1", "Pod"),
    ) else {
        return;
    };
    let (Ok(services), Ok(pods)) = (server.list(svc_kind, None), server.list(pod_kind, None))
    else {
        return;
    };
    let text = records(&services, &pods);
    let dir = records_dir(lab_dir);
    let path = dir.join(HOSTS_FILE);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return;
    }
    let tmp = lab_dir.join(format!(".{HOSTS_FILE}.tmp"));
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&tmp, &text))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the cluster DNS records");
    }
}

/// The resolver configuration of a pod in `namespace`, as the kubelet writes it for
/// `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(namespace: &str) -> String {
    format!(
        "search {namespace}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\nnameserver {CLUSTER_IP}\noptions ndots:5\n"
    )
}

/// `/etc/netns/<netns>`: `ip netns exec` mounts the files in it over `/etc`.
pub fn etc_dir(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// dnsmasq in the foreground inside `netns`, serving the records in `lab_dir` only.
pub fn dnsmasq(netns: &str, lab_dir: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, "dnsmasq", "--keep-in-foreground"])
        .arg("--conf-file=/dev/null")
        .args(["--no-hosts", "--no-resolv", "--no-poll", "--domain-needed"])
        .arg(format!("--local=/{DOMAIN}/"))
        .arg(format!("--hostsdir={}", records_dir(lab_dir).display()))
        .arg(format!(
            "--pid-file={}",
            lab_dir
                .join("pods")
                .join(format!("{netns}.dnsmasq.pid"))
                .display()
        ))
        .args(["--user=root", "--log-facility=-", "--local-ttl=5"]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_for_services_and_pods() {
        let services = [
            json!({"metadata": {"namespace": "shop", "name": "web"},
                   "spec": {"clusterIPs": ["10.96.0.20", "fd00:10:96::14"]}}),
            json!({"metadata": {"namespace": "shop", "name": "headless"},
                   "spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
        ];
        let pods = [
            json!({"metadata": {"namespace": "shop", "name": "a"},
                   "status": {"podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::5"}]}}),
            json!({"metadata": {"namespace": "kube-system", "name": "agent"},
                   "spec": {"hostNetwork": true},
                   "status": {"podIPs": [{"ip": "192.0.2.1"}]}}),
        ];
        let r = records(&services, &pods);
        let lines: Vec<&str> = r.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "10.244.1.5 10-244-1-5.shop.pod.cluster.local",
                "10.96.0.20 web.shop.svc.cluster.local",
                "fd00:10:244:1::5 fd00-10-244-1--5.shop.pod.cluster.local",
                "fd00:10:96::14 web.shop.svc.cluster.local",
            ]
        );
        assert_eq!(records(&services, &pods), r, "stable");
        assert!(resolv_conf("shop").starts_with("search shop.svc.cluster.local svc.cluster.local"));
    }
}
