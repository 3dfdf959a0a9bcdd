//! The CNI ADD result, in the shape of the configuration's `cniVersion` (spec "Success").

use serde_json::{json, Map, Value};
use std::net::IpAddr;

/// The result of an ADD for the pod's tun `ifname` in `sandbox` (the CNI_NETNS path).
/// - `interfaces`: the one pod interface (a tun has no MAC); for 1.1.0 also its `mtu`.
/// - `ips`: the pod's /32 and /128 on interface 0, no gateway (point-to-point device);
///   0.4.0 adds `version`.
/// - `routes`: a default route per family the pod has an address in.
/// - `dns`: the configuration's `dns` object, when it has one.
pub fn add_result(
    cni_version: &str,
    ifname: &str,
    sandbox: &str,
    ips: &[IpAddr],
    mtu: u32,
    dns: Option<&Value>,
) -> Value {
    let mut iface = Map::new();
    iface.insert("name".into(), json!(ifname));
    iface.insert("sandbox".into(), json!(sandbox));
    if cni_version == "1.1.0" {
        iface.insert("mtu".into(), json!(mtu));
    }
    let ips_json: Vec<Value> = ips
        .iter()
        .map(|ip| {
            let plen = if ip.is_ipv4() { 32 } else { 128 };
            let mut e = Map::new();
            if cni_version == "0.4.0" {
                e.insert(
                    "version".into(),
                    json!(if ip.is_ipv4() { "4" } else { "6" }),
                );
            }
            e.insert("address".into(), json!(format!("{ip}/{plen}")));
            e.insert("interface".into(), json!(0));
            Value::Object(e)
        })
        .collect();
    let mut routes = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        routes.push(json!({"dst": "::/0"}));
    }
    let mut r = Map::new();
    r.insert("cniVersion".into(), json!(cni_version));
    r.insert("interfaces".into(), json!([Value::Object(iface)]));
    r.insert("ips".into(), Value::Array(ips_json));
    r.insert("routes".into(), Value::Array(routes));
    if let Some(d) = dns.filter(|d| d.is_object()) {
        r.insert("dns".into(), d.clone());
    } else {
        r.insert("dns".into(), json!({}));
    }
    Value::Object(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips() -> Vec<IpAddr> {
        vec![
            "10.244.1.5".parse().unwrap(),
            "fd00:10:244:1::5".parse().unwrap(),
        ]
    }

    #[test]
    fn v1_result() {
        let dns = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
        let r = add_result(
            "1.0.0",
            "eth0",
            "/var/run/netns/p",
            &ips(),
            1420,
            Some(&dns),
        );
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
                "ips": [{"address": "10.244.1.5/32", "interface": 0}, {"address": "fd00:10:244:1::5/128", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
        let r = add_result("1.1.0", "eth0", "/n", &ips()[..1], 1420, None);
        assert_eq!(r["interfaces"][0]["mtu"], 1420);
        assert_eq!(r["routes"], json!([{"dst": "0.0.0.0/0"}]));
        assert_eq!(r["dns"], json!({}));
    }

    #[test]
    fn v04_result_has_versions() {
        let r = add_result("0.4.0", "eth0", "/n", &ips(), 1420, None);
        assert_eq!(
            r["ips"][0],
            json!({"version": "4", "address": "10.244.1.5/32", "interface": 0})
        );
        assert_eq!(r["ips"][1]["version"], "6");
        assert!(r["interfaces"][0].get("mtu").is_none());
    }
}
